"""What killed job processes leave behind, swept: scratch folders and unfinished S3 multipart uploads.

Every worker sweeps when it starts and then every ``MODELPRESS_SWEEP_INTERVAL_S`` (a thread of its
main process). Nothing is deleted on a guess: each thing swept has an owner whose death is known.

* **Scratch folders** (``<data_dir>/tmp/job-<job id>-<attempt>.<process token>``, one per attempt,
  named by :func:`scratch_dir`) belong to the attempt and to the process that runs it
  (core/procid.py: machine, pid, start time). A folder goes when its process is gone (known at once
  on its own machine, whatever the job row says) or when the job row no longer has that attempt
  running (the attempt was taken over after its lease expired, or the job ended: true on any host
  sharing the folder). Folders of the older form ``job-<id>-<attempt>`` follow the second rule.
  Entries that are not job folders (the API's staging folders, app/sweeper.py) are not touched.
* **Multipart uploads** on S3 storage: one under ``artifacts/<job>/attempt-<n>/`` belongs to that
  attempt and is aborted once the job row no longer has it running; any other (a model or dataset
  upload of an API process) once it is older than ``MODELPRESS_MULTIPART_UPLOAD_MAX_AGE_S``.
* **Artifacts of poison jobs**: a job failed with ``too_many_attempts`` keeps no artifact, so
  whatever its dead attempts stored is deleted when it is given up (core/reconcile.py
  ``drop_artifacts``).

The folder is listed before the job rows are read: a folder exists only after its attempt's claim
committed, so the rows read afterwards show that attempt (or a later state) and a live attempt's
folder is never taken for an old one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from core import procid
from core.config import Settings, get_settings
from core.db import get_sessionmaker
from core.storage import Storage, get_storage
from core.tables import Job, utcnow

log = logging.getLogger("modelpress.sweep")

SCRATCH = re.compile(r"job-(?P<job>[0-9a-f-]{36})-(?P<attempt>\d+)(?:\.(?P<owner>[0-9a-f]{12}-\d+-\d+))?")
ARTIFACT_KEY = re.compile(r"artifacts/(?P<job>[0-9a-f-]{36})/attempt-(?P<attempt>\d+)/.+")


@dataclass
class Swept:
    items: list[str] = field(default_factory=list)
    bytes: int = 0

    def add(self, name: str, size: int) -> None:
        self.items.append(name)
        self.bytes += size


def scratch_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    """The attempt's work folder, owned by this process."""
    return settings.tmp_root / f"job-{job_id}-{attempt}.{procid.token()}"


def drop_earlier_scratch(settings: Settings, job_id: str, attempt: int) -> None:
    """Remove this host's scratch folders of the job's earlier (dead) attempts."""
    for path in settings.tmp_root.glob(f"job-{job_id}-*"):
        m = SCRATCH.fullmatch(path.name)
        if m and m["job"] == job_id and int(m["attempt"]) < attempt:
            shutil.rmtree(path, ignore_errors=True)


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _running_attempts(job_ids: set[str]) -> dict[str, int]:
    """job id -> attempt, for those of the jobs that are running."""
    if not job_ids:
        return {}
    with get_sessionmaker()() as s:
        rows = s.execute(select(Job.id, Job.attempt).where(Job.id.in_(sorted(job_ids)), Job.status == "running"))
        return {job_id: attempt for job_id, attempt in rows}


def sweep_scratch(settings: Settings | None = None) -> Swept:
    """Remove the scratch folders of dead job processes and of attempts that lost their job."""
    settings = settings or get_settings()
    swept = Swept()
    root = settings.tmp_root
    if not root.is_dir():
        return swept
    found = [(p, m) for p in root.iterdir() if (m := SCRATCH.fullmatch(p.name))]
    running = _running_attempts({m["job"] for _, m in found})
    for path, m in found:
        owner_alive = procid.alive(m["owner"]) if m["owner"] else None
        held = running.get(m["job"]) == int(m["attempt"])
        if owner_alive is False or not held:
            size = tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            swept.add(path.name, size)
    if swept.items:
        log.warning(
            "swept %d scratch folder(s) of dead or superseded job attempts, %d bytes: %s",
            len(swept.items),
            swept.bytes,
            ", ".join(swept.items),
        )
    return swept


def sweep_multipart(settings: Settings | None = None, storage: Storage | None = None) -> Swept:
    """Abort the unfinished S3 multipart uploads of dead attempts and old ones (see the module's
    docstring)."""
    settings = settings or get_settings()
    storage = storage or get_storage()
    swept = Swept()
    uploads = storage.multipart_uploads()
    if not uploads:
        return swept
    running = _running_attempts({m["job"] for u in uploads if (m := ARTIFACT_KEY.fullmatch(u.key))})
    too_old = utcnow() - timedelta(seconds=settings.multipart_upload_max_age_s)
    for u in uploads:
        m = ARTIFACT_KEY.fullmatch(u.key)
        dead = running.get(m["job"]) != int(m["attempt"]) if m else u.initiated < too_old
        if dead:
            storage.abort_multipart(u)
            swept.add(u.key, 0)
    if swept.items:
        log.warning("aborted %d unfinished multipart upload(s): %s", len(swept.items), ", ".join(swept.items))
    return swept


def sweep_once(settings: Settings | None = None) -> tuple[Swept, Swept]:
    settings = settings or get_settings()
    return sweep_scratch(settings), sweep_multipart(settings)


def start_background(stop: threading.Event) -> threading.Thread:
    """Sweep now, then every ``MODELPRESS_SWEEP_INTERVAL_S`` until ``stop`` is set."""
    interval = get_settings().sweep_interval_s

    def loop() -> None:
        while True:
            try:
                sweep_once()
            except Exception:  # a database or storage outage: try again next round
                log.exception("sweep failed")
            if stop.wait(interval):
                return

    t = threading.Thread(target=loop, name="modelpress-sweeper", daemon=True)
    t.start()
    return t
