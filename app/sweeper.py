"""The API's staging files: owned by the API process, swept when that process is gone.

An upload is streamed to a staging folder (app/uploads.py) under ``settings.tmp_dir``. In an API
process that runs :func:`install_sweeper`'s lifespan, that is a folder of its own,
``<data_dir>/tmp/api.<process token>`` (core/procid.py: machine, pid, start time), so every staging
file has a known owner. When the process stops cleanly it removes its folder; when it was killed
(kill -9, an OOM kill, a lost host), the next sweep by any API process of the same data folder
removes it:

* at once on the owner's own machine, where the token says exactly whether that process still
  runs (a reused pid has another start time);
* from another machine sharing the folder (a network volume), once the folder's heartbeat (its
  mtime, touched every ``HEARTBEAT_S`` by its process) is older than ``STALE_AFTER_S``.

Sweeps run when an API process starts and every ``MODELPRESS_SWEEP_INTERVAL_S``. Staging folders
of the older layout (``<data_dir>/tmp/upload-*``, no owner) are removed once nothing in them was
written for ``LEGACY_IDLE_S``. Job scratch folders (``job-*``) are the workers' (worker/sweep.py).

The same rounds remove expired resumable uploads (tus, ``<data_dir>/uploads``): their rows and
staging files (app/resumable/service.py, ``sweep_expired``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from app.resumable.service import sweep_expired
from core import procid
from core.config import Settings, get_settings

log = logging.getLogger("modelpress.sweeper")

PREFIX = "api."
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
LEGACY_IDLE_S = 24 * 3600.0


def _tree_bytes(path: Path) -> tuple[int, float]:
    """(bytes, newest mtime) of a folder's tree."""
    total, newest = 0, path.stat().st_mtime
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
            newest = max(newest, st.st_mtime)
    return total, newest


def _owner_gone(path: Path, now: float) -> bool:
    alive = procid.alive(path.name[len(PREFIX) :])
    if alive is not None:
        return not alive
    try:
        return now - path.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def sweep_staging(settings: Settings | None = None, own: str | None = None) -> tuple[int, int]:
    """Remove the staging folders of API processes that are gone; returns (folders, bytes)."""
    settings = settings or get_settings()
    root = settings.tmp_root
    if not root.is_dir():
        return 0, 0
    now = time.time()
    folders = size = 0
    for path in root.iterdir():
        if not path.is_dir() or path.name == own:
            continue
        try:
            if path.name.startswith(PREFIX):
                gone = _owner_gone(path, now)
                n = _tree_bytes(path)[0] if gone else 0
            elif path.name.startswith("upload-"):
                n, newest = _tree_bytes(path)
                gone = now - newest > LEGACY_IDLE_S
            else:
                continue
        except OSError:  # removed meanwhile by another sweeper
            continue
        if gone:
            shutil.rmtree(path, ignore_errors=True)
            folders += 1
            size += n
    if folders:
        log.warning("swept %d staging folder(s) of API processes that are gone, %d bytes", folders, size)
    return folders, size


def sweep_uploads(settings: Settings) -> None:
    """Expired resumable uploads removed; a failure (the database down) waits for the next round."""
    try:
        sweep_expired(settings)
    except Exception:  # noqa: BLE001 - logged; the next round tries again
        log.exception("upload expiry sweep failed")


class Staging:
    """This process's staging folder: claimed at start, its heartbeat renewed, removed at stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = PREFIX + procid.token()
        self.path = settings.tmp_root / self.name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.settings.use_private_tmp(self.name)
        sweep_staging(self.settings, own=self.name)
        sweep_uploads(self.settings)
        interval = self.settings.sweep_interval_s

        def loop() -> None:
            next_sweep = time.monotonic() + interval
            while not self._stop.wait(min(HEARTBEAT_S, interval)):
                try:
                    self.path.mkdir(parents=True, exist_ok=True)
                    os.utime(self.path)
                    if time.monotonic() >= next_sweep:
                        sweep_staging(self.settings, own=self.name)
                        sweep_uploads(self.settings)
                        next_sweep = time.monotonic() + interval
                except Exception:  # noqa: BLE001 - a full or unmounted disk: try again next round
                    log.exception("staging sweep failed")

        self._thread = threading.Thread(target=loop, name="modelpress-staging", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.settings.use_private_tmp(None)
        shutil.rmtree(self.path, ignore_errors=True)


def install_sweeper(app: Any) -> None:
    """Give the API process a staging folder of its own for the app's lifetime, and sweep the
    folders of API processes that are gone (at start and every ``MODELPRESS_SWEEP_INTERVAL_S``).
    Wraps the app's lifespan (whatever it already does runs inside)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        staging = Staging(get_settings())
        await asyncio.to_thread(staging.start)
        try:
            async with inner(a) as state:
                yield state
        finally:
            await asyncio.to_thread(staging.stop)

    app.router.lifespan_context = lifespan
