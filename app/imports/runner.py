"""The API process's import threads: fetch, validate and store the models of POST /v1/models/import.

Every API process runs an :class:`Importer` while its app runs (the imports router's lifespan, so
``create_app`` needs nothing more): a pool of ``import_concurrency`` threads and a scan thread.

* **Queue.** ``enqueue(model_id)`` (after the row's commit) hands the import to this process's
  pool. An import waiting for a free thread holds nothing: its row's lease is still null.
* **Claim.** A thread claims the import by compare-and-set on the row's lease (null, or past:
  its holder is gone) and sets it ``import_lease_s`` ahead; if another process claimed it first,
  the thread does nothing. So an import runs in one process at a time, and is stored once.
* **Lease.** While it runs, a keeper thread renews the lease every third of ``import_lease_s``
  and writes the progress at most every ``PROGRESS_S``, both fenced by the lease's value (see
  app/imports/repository.py). A holder that lost its lease (it stalled past it and another took
  over, or the model was deleted) stops and removes what it stored.
* **Take-over.** Every ``import_lease_s / 3`` seconds (and at start) the scan thread looks for
  imports nobody holds (never claimed, or a lease that ran out because its process died) and
  queues them here while threads are free. The new attempt starts from scratch, in a storage
  folder of its own (``models/<id>/import-<attempt>``). An import whose holder died
  ``max_attempts`` times (the jobs' setting) is failed with ``too_many_attempts``.
* **Outcome.** Ready: files stored, the row filled in and ``status`` "ready" in one transaction
  with the tenant's storage quota checked (as an upload). Failed: the stored files removed, the
  problem body an upload of the same bytes would have got in ``error``. Either way the staging
  folder (in this process's own tmp folder, app/sweeper.py) is removed.
* **Stop.** At shutdown, running imports give their lease back (null) so another process takes
  them over at its next scan.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app import quotas
from app.imports import fetch
from app.imports import repository as repo
from app.models import service as models_service
from app.uploads import MAX_FILE_PARTS, StagedFile, StagingArea
from core.config import Settings, get_settings
from core.db import UnitOfWork, get_sessionmaker
from core.errors import ModelpressError, PayloadTooLarge
from core.storage import Storage, get_storage
from core.tables import utcnow

log = logging.getLogger("modelpress.imports")

PROGRESS_S = 1.0  # progress reaches the row at most this often


def problem_body(e: ModelpressError) -> dict[str, Any]:
    """The RFC 9457 body the API answers for ``e`` (app/errors.py's ``problem``)."""
    body: dict[str, Any] = {
        **e.extensions,
        "type": f"/problems/{e.code}",
        "title": e.title,
        "status": e.status,
        "detail": e.detail,
        "code": e.code,
    }
    if e.errors is not None:
        body["errors"] = e.errors
    return body


def _write(fn: Any) -> Any:
    """``fn(session)`` in a transaction of its own, committed."""
    with get_sessionmaker()() as s:
        out = fn(s)
        s.commit()
        return out


@dataclass(frozen=True)
class Claim:
    model_id: str
    tenant_id: str
    source: fetch.Source
    token: datetime  # the lease this attempt wrote: its fencing token
    deaths: int  # earlier attempts whose process died


def claim(model_id: str, settings: Settings) -> Claim | None:
    """Take the import if nobody holds it (compare-and-set on the lease); None if it is held,
    finished, deleted, or failed here for too many dead attempts."""
    with get_sessionmaker()() as s:
        row = repo.get(s, model_id)
        now = utcnow()
        if row is None or row.status != "importing" or row.source is None:
            return None
        seen = row.lease_expires_at
        if seen is not None and seen >= now:
            return None
        deaths = int((row.progress or {}).get("deaths", 0)) + (seen is not None)
        if deaths >= settings.max_attempts:
            err = ModelpressError(
                f"the import's API process died {deaths} times while importing it; import again or check "
                "the API's memory and disk",
                code="too_many_attempts",
            )
            if repo.cas(s, model_id, seen, status="failed", error=problem_body(err), lease_expires_at=None):
                s.commit()
                log.error("import %s: failed, its process died %d times", model_id, deaths)
            return None
        token = now + timedelta(seconds=settings.import_lease_s)
        progress = {**fetch.Progress().snapshot(), "deaths": deaths}
        if not repo.cas(s, model_id, seen, lease_expires_at=token, progress=progress, error=None):
            return None
        s.commit()
        return Claim(model_id, row.tenant_id, fetch.parse(row.source), token, deaths)


class Keeper:
    """Renews one import's lease and writes its progress, from a thread of its own; ``lost`` is
    set once a write finds the lease taken (or the row gone)."""

    def __init__(self, c: Claim, settings: Settings, progress: fetch.Progress) -> None:
        self.model_id, self.token, self.deaths = c.model_id, c.token, c.deaths
        self.lease = timedelta(seconds=settings.import_lease_s)
        self.progress = progress
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._written: dict[str, Any] | None = None
        self._thread = threading.Thread(
            target=self._loop, name=f"modelpress-import-lease-{c.model_id[:8]}", daemon=True
        )

    def start(self) -> Keeper:
        self._thread.start()
        return self

    def snapshot(self) -> dict[str, Any]:
        return {**self.progress.snapshot(), "deaths": self.deaths}

    def _loop(self) -> None:
        while not self._stop.wait(PROGRESS_S) and not self.lost.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the database is down: try again; the outcome's write is fenced
                log.warning("import %s: lease renewal failed: %s", self.model_id, type(e).__name__)

    def tick(self) -> None:
        now = utcnow()
        renew = self.token - now < self.lease * 2 / 3
        snap = self.snapshot()
        if not renew and snap == self._written:
            return
        new = now + self.lease if renew else self.token
        if _write(lambda s: repo.cas(s, self.model_id, self.token, lease_expires_at=new, progress=snap)):
            self.token, self._written = new, snap
        else:
            log.warning("import %s: lease lost (taken over, or the model was deleted)", self.model_id)
            self.lost.set()

    def stop(self) -> datetime:
        """Stop renewing; the lease's current value (the token of the outcome's write)."""
        self._stop.set()
        self._thread.join()
        return self.token


def _fetch_all(
    c: Claim, settings: Settings, staging: StagingArea, progress: fetch.Progress, abandon: Any
) -> list[StagedFile]:
    """List the source, run the upload's checks that need no bytes (names, count, sizes, the
    quota), then fetch every file to the staging folder."""
    remotes = fetch.list_files(c.source, settings)
    if len(remotes) > MAX_FILE_PARTS:
        raise PayloadTooLarge(f"more than {MAX_FILE_PARTS} files in one upload", code="too_many_files")
    models_service.check_file_names([r.name for r in remotes])
    known = [r.size for r in remotes if r.size is not None]
    total = sum(known)
    if total > settings.max_upload_bytes:
        raise PayloadTooLarge(f"import of {total} bytes is over the limit of {settings.max_upload_bytes} bytes")
    with get_sessionmaker()() as s:  # refused before a byte is fetched (checked again when stored)
        quotas.check_storage(s, c.tenant_id, total)
    with progress.lock:
        progress.files_total = len(remotes)
        progress.bytes_total = total if len(known) == len(remotes) else None
    files = []
    for i, remote in enumerate(remotes, 1):
        files.append(fetch.fetch(c.source, remote, staging.dir / f"part-{i:04d}", settings, progress, abandon))
        with progress.lock:
            progress.files_done = i
    return files


def _finish(c: Claim, token: datetime, info: dict[str, Any], prefix: str, progress: dict[str, Any]) -> bool:
    """Make the model ready: the quota checked with the tenant locked and the row filled in, in one
    transaction, if this attempt still holds the lease. Whether it did."""
    with get_sessionmaker()() as s:
        uow = UnitOfWork(s)
        try:
            quotas.check_storage(s, c.tenant_id, info["size_bytes"])
            done = repo.cas(
                s,
                c.model_id,
                token,
                status="ready",
                error=None,
                lease_expires_at=None,
                storage_prefix=prefix,
                progress=progress,
                **info,
            )
        except BaseException:
            uow.rollback()
            raise
        if not done:
            uow.rollback()
            return False
        uow.commit()
        return True


def run(model_id: str, settings: Settings, storage: Storage, stopping: threading.Event) -> None:
    """One attempt at one import (a no-op if another process holds it)."""
    c = claim(model_id, settings)
    if c is None:
        return
    fetch.fresh_s3()
    progress = fetch.Progress()
    keeper = Keeper(c, settings, progress).start()
    prefix = f"models/{model_id}/import-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    log.info("import %s: attempt started (%s)", model_id, fetch.shown(c.source.url))
    try:
        with StagingArea(settings.tmp_dir) as staging:
            files = _fetch_all(c, settings, staging, progress, lambda: stopping.is_set() or keeper.lost.is_set())
            info = models_service.validate_upload(files, settings)
            models_service.store_files(storage, files, prefix)
        if keeper.lost.is_set():
            raise fetch.Abandoned
        token = keeper.stop()
        if not _finish(c, token, info, prefix, keeper.snapshot()):
            raise fetch.Abandoned
        log.info(
            "import %s: ready, %d files, %d bytes in %.1f s",
            model_id,
            len(info["files"]),
            info["size_bytes"],
            time.monotonic() - started,
        )
    except fetch.Abandoned:
        token = keeper.stop()
        storage.delete_prefix(prefix)
        if stopping.is_set() and _write(lambda s: repo.cas(s, model_id, token, lease_expires_at=None)):
            log.info("import %s: given back at shutdown", model_id)
    except Exception as e:
        _fail(model_id, keeper, storage, prefix, e)
    finally:
        keeper.stop()  # whatever ended the attempt (even an interrupt), its lease is no longer renewed


def _fail(model_id: str, keeper: Keeper, storage: Storage, prefix: str, e: Exception) -> None:
    """Record a failed import (if this attempt still holds it) and remove what it stored."""
    if isinstance(e, ModelpressError):
        body = problem_body(e)
        log.info("import %s: failed, %s: %s", model_id, e.code, e.detail)
    else:
        log.error("import %s: failed", model_id, exc_info=e)
        detail = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        body = problem_body(ModelpressError(f"the import failed: {detail}", code="import_failed"))
    token = keeper.stop()
    snap = keeper.snapshot()

    def record(s: Any) -> bool:
        if repo.cas(s, model_id, token, status="failed", error=body, lease_expires_at=None, progress=snap):
            return True
        # Not ours any more; but if the row points at this attempt's files (a commit whose answer
        # was lost), they are the model's: keep them.
        row = repo.get(s, model_id)
        return row is None or row.storage_prefix != prefix

    if _write(record):
        storage.delete_prefix(prefix)


class Importer:
    """This process's import pool and its scan for imports nobody holds (module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self._pool = ThreadPoolExecutor(settings.import_concurrency, thread_name_prefix="modelpress-import")
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._scanner: threading.Thread | None = None

    def start(self) -> Importer:
        self._scanner = threading.Thread(target=self._scan_loop, name="modelpress-import-scan", daemon=True)
        self._scanner.start()
        return self

    def submit(self, model_id: str) -> bool:
        with self._lock:
            if self.stopping.is_set() or model_id in self._inflight:
                return False
            self._inflight.add(model_id)
        future = self._pool.submit(self._run, model_id)
        # Cancelled at shutdown before it ran: no longer in flight here (its row's lease is null).
        future.add_done_callback(lambda f: self._discard(model_id) if f.cancelled() else None)
        return True

    def _discard(self, model_id: str) -> None:
        with self._lock:
            self._inflight.discard(model_id)

    def _run(self, model_id: str) -> None:
        try:
            run(model_id, self.settings, get_storage(), self.stopping)
        except Exception:
            log.exception("import %s: attempt crashed", model_id)
        finally:
            self._discard(model_id)

    def scan(self) -> int:
        """Queue imports nobody holds while this process has free threads; how many were queued."""
        with self._lock:
            free = self.settings.import_concurrency - len(self._inflight)
            busy = set(self._inflight)
        if free <= 0:
            return 0
        with get_sessionmaker()() as s:
            ids = [i for i in repo.claimable(s, utcnow(), free + len(busy)) if i not in busy][:free]
        return sum(self.submit(i) for i in ids)

    def _scan_loop(self) -> None:
        interval = max(1.0, self.settings.import_lease_s / 3)
        while not self.stopping.is_set():
            try:
                self.scan()
            except Exception as e:  # noqa: BLE001 - the database is down: the next scan tries again
                log.warning("import scan failed: %s", type(e).__name__)
            self.stopping.wait(interval)

    def stop(self, timeout: float = 15.0) -> None:
        self.stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._inflight:
                    break
            time.sleep(0.05)
        if self._scanner is not None:
            self._scanner.join(timeout=1)


_importer: Importer | None = None
_importer_lock = threading.Lock()


def importer() -> Importer:
    """This process's importer, started on first use (the lifespan starts it with the app)."""
    global _importer
    with _importer_lock:
        if _importer is None or _importer.stopping.is_set():
            _importer = Importer(get_settings()).start()
        return _importer


def enqueue(model_id: str) -> None:
    """Queue an import in this process (after its row's commit). Never raises: an import not
    queued here is found by a scan."""
    try:
        importer().submit(model_id)
    except Exception:
        log.exception("import %s: could not be queued here; a scan will find it", model_id)


@asynccontextmanager
async def lifespan(_app: Any) -> AsyncIterator[None]:
    """The imports router's lifespan (FastAPI merges it into the app's): the importer runs while
    the app does, so imports left by a dead API process are taken over even before a request."""
    import asyncio

    await asyncio.to_thread(importer)
    try:
        yield
    finally:
        global _importer
        with _importer_lock:
            running, _importer = _importer, None
        if running is not None:
            await asyncio.to_thread(running.stop)
