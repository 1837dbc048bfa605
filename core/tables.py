"""ORM tables: the single metadata that Alembic migrations must match (tests/test_migrations.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # Public lookup part of the key; the secret part is only stored as a sha256 digest.
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # What the key may do beyond its tenant's own objects (app/keys/schemas.py SCOPES): ["admin"]
    # manages every tenant's keys. A list, not a flag, so a finer scope is a value, not a migration.
    scopes: Mapped[list[Any]] = mapped_column(default=list, server_default=text("'[]'"))


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # "hf" | "safetensors"
    architecture: Mapped[str | None] = mapped_column(String(200), default=None)
    parameters: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # [{"name", "size_bytes", "sha256"}] for every stored file.
    files: Mapped[list[Any]] = mapped_column(JSON)
    # config.json of an HF upload (methods check architecture facts at submit time).
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    storage_prefix: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # "ready" (usable by jobs) | "importing" (POST /v1/models/import: the server is fetching it;
    # files, sizes and digests are placeholders until ready) | "failed" (``error`` says why).
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default=text("'ready'"))
    # Where an import fetches from ("s3://bucket/prefix/", "https://..."); null for an upload.
    source: Mapped[str | None] = mapped_column(String(2000), default=None)
    # An import's progress: {"bytes_done", "bytes_total", "files_done", "files_total"}.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Why a failed import failed: the problem body an upload of the same bytes would have got.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The importing process renews it while it works: an import whose lease ran out (its process
    # died) is taken over or failed by the sweeper, never left "importing" for ever.
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_models_tenant_created", "tenant_id", "created_at"),)


class Upload(Base):
    """A resumable upload (tus 1.0, /v1/uploads): its bytes go to a staging file of the API's
    upload folder, its offset is that file's length once committed here. A finished upload is
    consumed by ``POST /v1/models`` or ``POST /v1/datasets`` (JSON ``files``); an unfinished or
    unconsumed one is removed when it expires."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    length: Mapped[int] = mapped_column(BigInteger)  # Upload-Length: declared at creation
    offset: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes received and durable
    # Upload-Metadata, decoded ({"filename": ...}); what the client said, checked again on use.
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # sha256 of the whole file once complete (hashed as the bytes arrive; the state of an
    # interrupted hash is not kept: it is recomputed from the staging file on resume).
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    # Set when a model or dataset took the upload's bytes (it can be used once).
    consumed_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_uploads_expires", "expires_at"),)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # "txt" | "jsonl"
    samples: Mapped[int] = mapped_column(Integer)
    labeled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Distinct labels, sorted, when every sample has one (classification); else null.
    labels: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at"),)


class Sweep(Base):
    """A grid of jobs: base steps and the values to vary; each point is a child job."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), default=None)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    # The request as accepted: steps, vary, dataset ids, evaluation.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    points: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_sweeps_tenant_created", "tenant_id", "created_at", "id"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # SET NULL: deleting a model keeps the history (and artifacts) of finished jobs.
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    # The sweep this job is one point of, and the values of that point ({"steps[0].params.x": v}).
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="SET NULL"), default=None, index=True)
    sweep_point: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Calibration / training data for methods that need it, and data to evaluate on.
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), default=None)
    eval_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), default=None)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    steps: Mapped[list[Any]] = mapped_column(JSON)
    # How the report measures the job (app.jobs.schemas.EvaluationIn); null: the defaults.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The artifact's format (core.exports.OutputIn); null: safetensors (jobs from before formats).
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The named recipe the steps were expanded from (JobIn.recipe); null: steps given.
    recipe: Mapped[str | None] = mapped_column(String(64), default=None)
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    # Incremented by every claim; final writes only apply while the claimer's attempt holds.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_stage: Mapped[str | None] = mapped_column(String(100), default="queued")
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    artifact_key: Mapped[str | None] = mapped_column(String(400), default=None)
    artifact_filename: Mapped[str | None] = mapped_column(String(200), default=None)
    artifact_size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the job's message was last sent; the reconciler re-sends stale ones (core/reconcile.py).
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    # Indexed: GET /metrics reads the jobs finished in its window at every scrape.
    finished_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # POSTed to when the job ends (app/webhooks): a webhook_deliveries row is added in the
    # transaction of the terminal status.
    webhook_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    # The job's plan (core/jobs/plan.py), computed at submit: peak memory, scratch disk, artifact
    # bytes, seconds and their inputs. Null for jobs submitted before plans existed.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    __table_args__ = (Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),)


class JobEvent(Base):
    """One change of a job that a client sees (status or progress), written in the transaction of
    the change (core.jobs.repository). ``id`` is the server-sent event id of GET /v1/jobs/{id}/events:
    per job it grows in commit order, because every writer updates the job row (and so holds its
    lock) before it inserts the event."""

    __tablename__ = "job_events"

    # Integer on SQLite: only an INTEGER PRIMARY KEY is the auto-assigned rowid there.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))  # "status" | "progress"
    # status, attempt, progress {stage, fraction}; error {code, message} / artifact on a terminal status.
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class Worker(Base):
    """A worker main process (worker/registry.py): added when it is ready, seen again every
    reconcile interval, removed when it shuts down cleanly. A row not seen for three intervals is
    a worker that is gone (or cut off)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(300), primary_key=True)  # "<hostname>:<pid>"
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # The Celery queues it consumes, e.g. ["cpu"] or ["gpu"].
    queues: Mapped[list[Any]] = mapped_column(JSON)
    # "cpu", or "cuda:0 (<device name>)".
    device: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The budget of one job on this worker (worker/budget.py): memory a job's process may reach
    # and scratch disk in its work folder. Null: not published (a worker of an older version).
    memory_budget_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    scratch_budget_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # Measured work bytes per second by plan path, {"whole": {"bytes_per_s", "jobs"}, ...}.
    throughput: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The optional runtimes installed on it, by module name (core/exports.OPTIONAL_RUNTIMES), e.g.
    # ["llama_cpp", "onnxruntime"]: a job whose output needs one no live worker has is refused at
    # submit. Null: not published (a worker of an older version).
    runtimes: Mapped[list[Any] | None] = mapped_column(JSON, default=None)


class IdempotencyKey(Base):
    """The stored first response of a create request sent with an ``Idempotency-Key`` header
    (app/idempotency.py): written in the transaction of the object it created, so the unique
    (tenant, route, key) makes concurrent duplicates collide and all but one roll back."""

    __tablename__ = "idempotency_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    route: Mapped[str] = mapped_column(String(100))  # e.g. "POST /v1/jobs"
    key: Mapped[str] = mapped_column(String(200))
    # sha256 of the canonical request (JSON body, or the uploaded files' names and sha256s + fields).
    request_sha256: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSON)
    resource_id: Mapped[str | None] = mapped_column(String(36), default=None)
    # Rows older than app.idempotency.TTL are ignored and replaced.
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("tenant_id", "route", "key", name="uq_idempotency_keys_tenant_route_key"),)


class WebhookDelivery(Base):
    """The transactional outbox of job webhooks: added in the transaction that gives a job with a
    ``webhook_url`` its terminal status (core.jobs.repository), so a job that ended always has its
    delivery and a rolled-back end has none; sent and retried by the dispatcher in every worker
    (worker/webhooks.py).

    ``attempts`` counts the tries started; a dispatcher takes a try with a compare-and-set on it
    (status pending, due, the attempts it read) and pushes ``next_attempt_at`` past the try's
    timeout, so two dispatchers never send the same try, and a try whose dispatcher died is taken
    again once that lease runs out."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # No foreign key (migration 0016): a delivery outlives its job, so that deleting a job right
    # after it ended does not take the notification that it ended with it (the payload carries
    # the job as it ended). Once its outcome is final, a delivery whose job is gone is removed.
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2000))
    event: Mapped[str] = mapped_column(String(32))  # "job.succeeded" | "job.failed" | "job.canceled"
    # The JSON body, as built when the job ended: {"id", "event", "created_at", "job": <GET /v1/jobs/{id}>}.
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next try is due (pending), or until when the try in flight holds the row; null once final.
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)
