"""The one Settings object. Every setting is an environment variable ``MODELPRESS_<NAME>``.

Two modes share one code base:

* ``embedded`` (default): SQLite database, kombu's SQLAlchemy transport on a SQLite file as the
  Celery broker, artifacts in a local folder, and ``modelpress serve`` runs a worker subprocess.
* ``cluster``: PostgreSQL + Redis, set through ``MODELPRESS_DATABASE_URL`` and
  ``MODELPRESS_BROKER_URL``; API and workers run as separate processes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    mode: Literal["embedded", "cluster"] = "embedded"
    data_dir: Path = Path("var")
    # Empty means: derived from mode and data_dir (see _derive).
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""
    # Redis key prefix for the broker; lets several deployments (or test runs) share one Redis.
    broker_key_prefix: str = ""

    # Object storage (storage_url = "s3://bucket/prefix"; docs/STORAGE.md). Empty endpoint: AWS
    # S3 itself (or botocore's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL); any S3-compatible server
    # otherwise, e.g. "http://127.0.0.1:8333". Empty region: botocore's own (AWS_DEFAULT_REGION,
    # the shared config file). Empty keys: botocore's default credential chain (AWS_* variables,
    # AWS_PROFILE and the shared credentials/config files, SSO, container and instance roles).
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    s3_session_token: SecretStr = SecretStr("")
    # Puts and gets go in parts of s3_part_size_mb, at most s3_max_concurrency of them in flight
    # at once: one transfer holds at most part size x concurrency bytes in memory (32 MB at the
    # defaults). A put whose file would need over 10,000 parts (S3's limit: 80 GB at the
    # default) uses larger parts, size / 10,000. A failed put aborts its multipart upload.
    # 8, not 16: a 1 GB model stored to S3 grew the API by 114 MB at 16 MB parts, 74 MB at 8, for
    # 7 % less throughput (bench/bench_transfer.py, docs/BENCHMARKS.md).
    s3_part_size_mb: int = Field(default=8, ge=5, le=512)
    s3_max_concurrency: int = Field(default=4, ge=1, le=16)
    # Downloads of artifacts from S3 storage may be answered with a redirect to a presigned URL
    # (the bytes never pass through the API), valid this many seconds.
    storage_presign_downloads: bool = False
    storage_presign_expiry_s: int = Field(default=3600, ge=1, le=7 * 86400)

    max_upload_bytes: int = Field(default=20 * 1024**3, gt=0)
    # Resumable uploads (tus 1.0 at /v1/uploads, app/resumable): the bytes of unfinished uploads
    # sit in data_dir/uploads (shared by every API process of this data_dir, kept across
    # restarts); an upload not finished and consumed by a model or dataset within upload_expiry_s
    # of its creation is removed (tus's expiration extension: the Upload-Expires header).
    upload_expiry_s: int = Field(default=24 * 3600, gt=0)
    # Imports by reference (POST /v1/models/import, app/imports). S3 sources are read with the
    # server's own S3 settings above; a tenant may import only from buckets allowed here, as JSON
    # {"<tenant id or name>": ["bucket", ...], "*": [...every tenant...]}. https sources pass the
    # webhooks' SSRF guard (webhook_allow_networks lets private addresses through, as for webhooks).
    import_s3_buckets: dict[str, list[str]] = Field(default_factory=dict)
    import_https: bool = True
    # Imports run at once per API process (each is network and disk bound); more wait their turn.
    import_concurrency: int = Field(default=2, ge=1, le=16)
    # An import process renews its lease this often (a third of import_lease_s); an import whose
    # lease ran out (its process died) is resumed by another API process's sweeper.
    import_lease_s: int = Field(default=60, ge=3)
    max_json_file_bytes: int = Field(default=64 * 1024**2, gt=0)
    max_safetensors_header_bytes: int = Field(default=100 * 1024**2, gt=0)

    # Request bodies other than file uploads (app/http_limits.py). Multipart forms: at most this
    # many fields, each non-file field at most max_form_field_bytes; JSON bodies at most
    # max_json_body_bytes. A client that sends less than its Content-Length, or stalls mid-body,
    # is answered 408 after body_read_timeout_s without a byte arriving.
    max_form_fields: int = Field(default=64, gt=0)
    max_form_field_bytes: int = Field(default=64 * 1024, gt=0)
    max_json_body_bytes: int = Field(default=4 * 1024**2, gt=0)
    body_read_timeout_s: float = Field(default=60.0, gt=0)

    job_time_limit_s: int = Field(default=6 * 3600, gt=0)
    # A claimed job whose lease is not renewed within this many seconds may be claimed again. The
    # lease is renewed every job_lease_s / 6 seconds by a small keeper process next to the job's
    # process (worker/heartbeat.py) that lives exactly as long as it: when the job's process
    # dies the keeper ends the lease at once; when both die (a lost host) the renewals stop; a
    # live job keeps its lease even through a long native step that holds the GIL. So a dead
    # worker's job is claimable again at most job_lease_s after the kill, and re-sent by the
    # next reconciler pass (at most reconcile_interval_s later): under 60 s at the defaults.
    job_lease_s: int = Field(default=30, ge=3)
    # The reconciler (in every worker, every reconcile_interval_s) re-sends the message of a job
    # that is running with an expired lease at once (its worker died: the re-send goes ahead of
    # queued jobs on Redis), and of a job that is still queued and was last sent over
    # requeue_after_s ago (a message lost with a broker outage or a failed send). Duplicates are
    # harmless (the claim is a compare-and-set).
    requeue_after_s: int = Field(default=300, gt=0)
    # A job re-sent because its lease expired that is still unclaimed this long after the send
    # is sent again (not after requeue_after_s): that message can be lost too, e.g. taken by a
    # worker killed before it claimed the job, and then held by Redis until its visibility
    # timeout. A duplicate that finds the job claimed is dropped by the claim's compare-and-set.
    reclaim_resend_s: int = Field(default=30, gt=0)
    reconcile_interval_s: int = Field(default=10, gt=0)
    # Leftovers of processes killed mid-work (app/sweeper.py, worker/sweep.py), swept when a
    # worker or an API process starts and every sweep_interval_s: the scratch folders of job
    # processes that are gone (or whose attempt was taken over), the API's staging folders of
    # API processes that are gone, and unfinished S3 multipart uploads of dead job attempts or
    # older than multipart_upload_max_age_s (an upload that takes longer would be aborted).
    sweep_interval_s: int = Field(default=60, gt=0)
    multipart_upload_max_age_s: int = Field(default=24 * 3600, gt=0)
    # A job whose worker died this many times while running it (each claim ended without a
    # result: a SIGKILL, an OOM kill, a lost node) is failed with error code too_many_attempts
    # instead of being claimed again: a poison job does not kill workers forever.
    max_attempts: int = Field(default=3, ge=1)
    # Per-job limits, enforced in the worker by a watchdog (worker/limits.py). A job over either
    # fails with error code time_limit / memory_limit, and the worker goes on with the next job.
    # The memory limit counts the job's own growth of the worker process's RSS (above what the
    # worker held when the job started: torch and the libraries are the worker's, not the job's).
    # 0 means no memory limit.
    job_memory_limit_mb: int = Field(default=0, ge=0)
    # A worker's budget for one job (worker/budget.py): the memory its process may reach (peak
    # resident memory, the imported libraries included) and the scratch disk of its work folder.
    # A worker never claims a job whose plan (core/jobs/plan.py) is over either; a job no live
    # worker can take is refused at submit (422 job_exceeds_worker_budget). 0: from the machine,
    # 80 % of its memory (or of the cgroup's limit) and 90 % of the free disk under data_dir/tmp,
    # each divided by worker_concurrency; job_memory_limit_mb, when set, caps that derived memory
    # budget (an explicit one is used as given).
    worker_memory_budget_mb: int = Field(default=0, ge=0)
    worker_scratch_budget_mb: int = Field(default=0, ge=0)
    # Calibrated methods on the block path carry every sample's hidden states from one decoder
    # block to the next; past this many MB in memory they go to files in the job's scratch folder
    # (worker/spill.py), read back through the page cache.
    activation_memory_mb: int = Field(default=1024, ge=0)
    # Per-tenant quotas (0: none). Over one, a request is answered 429 with Retry-After.
    quota_jobs_in_flight: int = Field(default=0, ge=0)  # queued + running jobs of a tenant
    quota_storage_bytes: int = Field(default=0, ge=0)  # models + datasets + artifacts of a tenant
    # Retry-After of a 429 for jobs in flight (a job finishing frees a slot) and for storage
    # (only a deletion frees bytes: the client should not retry soon).
    quota_retry_after_s: int = Field(default=30, gt=0)
    quota_storage_retry_after_s: int = Field(default=3600, gt=0)

    # Webhooks (app/webhooks, worker/webhooks.py): POSTed when a job with webhook_url ends.
    # Private, loopback, link-local (and other non-global) targets are refused unless their
    # address is inside one of these comma-separated CIDRs / addresses, e.g. "127.0.0.1/32,10.0.0.0/8".
    webhook_allow_networks: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Delivery tries before a delivery is given up (failed), and the first retry delay; each
    # further retry waits twice as long (capped at webhook_backoff_max_s).
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    webhook_backoff_max_s: float = Field(default=600.0, gt=0)
    # How often the dispatcher in each worker looks for due deliveries.
    webhook_poll_interval_s: float = Field(default=1.0, gt=0)
    worker_concurrency: int = Field(default=1, ge=1)
    # embedded mode: start a worker subprocess next to the API.
    embedded_worker: bool = True
    # zip level for the artifacts' text files (config, tokenizer); weight files are stored, not
    # deflated: safetensors of floats or packed integers gain a few percent for most of the time.
    artifact_zip_level: int = Field(default=1, ge=0, le=9)
    # Jobs whose every step is data-free run on the streaming engine (worker/stream): tensor by
    # tensor from the shards, never building the model. false: always build it in memory.
    stream_engine: bool = True
    # Jobs whose every step runs through llm-compressor's sequential pipeline (Wanda, SparseGPT,
    # GPTQ, SmoothQuant, AWQ) keep the weights on disk and onload one decoder block at a time
    # (compressed-tensors' disk offload). false: build the model in memory.
    block_engine: bool = True
    # Output shards of the streaming engine hold at most this many bytes of tensor data (HF's
    # save_pretrained default, 5 GB; a tensor larger than that gets a shard of its own).
    shard_max_bytes: int = Field(default=5 * 10**9, ge=1 << 20)

    # Signs short-lived links to HTML reports (core/signing.py) and webhook deliveries. Required in
    # cluster mode (every API host and worker must share it: a link or a signature made on one host
    # verifies on every other); in embedded mode, empty means a random key kept in
    # <data_dir>/secret_key.
    secret_key: str = ""
    # The service's address as its clients reach it (e.g. "https://press.example.com"): links in
    # reports, webhook bodies and responses are built from it, never from a request's Host header.
    # Empty: http://127.0.0.1:8000 in embedded mode (`modelpress serve` sets it from --host/--port).
    public_base_url: str = ""
    # Lifetime of a signed report link when the request does not ask for one.
    report_link_ttl_s: int = Field(default=900, gt=0, le=7 * 86400)

    # Seconds an API process remembers a resolved API key (a poll then costs no key lookup); a
    # revoked key stops working within this time. 0 turns the cache off.
    auth_cache_ttl_s: float = Field(default=5.0, ge=0)

    log_level: str = "INFO"
    # "json" (one object a line: ts, level, logger, message, request_id, job_id, attempt) or
    # "text". Empty means: json in cluster mode (log shippers), text in embedded mode (a terminal).
    log_format: Literal["", "json", "text"] = ""
    # One access log line per HTTP request (probes and /metrics at DEBUG).
    access_log: bool = True
    # When set, GET /metrics needs "Authorization: Bearer <token>"; empty: open (Prometheus scrapers).
    metrics_token: str = ""
    # modelpress_job_duration_seconds covers the jobs that finished in this window.
    metrics_job_window_s: int = Field(default=86400, gt=0)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.data_dir = self.data_dir.resolve()
        if self.mode == "cluster":
            missing = [n for n in ("database_url", "broker_url") if not getattr(self, n)]
            if missing:
                raise ValueError("cluster mode needs " + ", ".join(f"MODELPRESS_{m.upper()}" for m in missing))
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'modelpress.sqlite3'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite3'}"
        if not self.storage_url:
            self.storage_url = str(self.data_dir / "storage")
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key.get_secret_value()):
            raise ValueError(
                "MODELPRESS_S3_ACCESS_KEY_ID and MODELPRESS_S3_SECRET_ACCESS_KEY go together "
                "(leave both empty for the AWS default credential chain)"
            )
        if self.s3_session_token.get_secret_value() and not self.s3_access_key_id:
            raise ValueError("MODELPRESS_S3_SESSION_TOKEN needs MODELPRESS_S3_ACCESS_KEY_ID and _SECRET_ACCESS_KEY")
        if not self.log_format:
            self.log_format = "json" if self.mode == "cluster" else "text"
        return self

    @property
    def is_sqlite(self) -> bool:
        """The database is SQLite: decided by the URL, not by ``mode`` (an embedded install may
        point MODELPRESS_DATABASE_URL at PostgreSQL, and a cluster one at a SQLite file)."""
        return self.database_url.startswith("sqlite")

    # Set by app/sweeper.py in an API process: its staging folder, named after the process.
    _private_tmp: str | None = PrivateAttr(default=None)

    @property
    def tmp_root(self) -> Path:
        """Scratch and staging of every process of this data_dir: job work folders (worker) and
        the API processes' staging folders."""
        return self.data_dir / "tmp"

    @property
    def tmp_dir(self) -> Path:
        """This process's temporary folder: ``tmp_root``, or in an API process that called
        :meth:`use_private_tmp` (app/sweeper.py) a folder of its own inside it, which the sweeper
        removes whole once that process is gone."""
        return self.tmp_root / self._private_tmp if self._private_tmp else self.tmp_root

    def use_private_tmp(self, name: str | None) -> None:
        self._private_tmp = name


@lru_cache
def get_settings() -> Settings:
    return Settings()
