"""Where the streaming engine's output goes: straight into the artifact.

``ZipSink`` writes the HF artifact (``model.zip``) as the files are produced: weight files are
*stored* entries (safetensors of floats or packed integers do not deflate: compressing them cost
more time than any other part of saving and won a few percent), small text files are deflated.
The zip is written as a pure stream (data descriptors after each entry, no seeking back), so its
SHA-256 is computed on the way out and no byte is written twice. ``FileSink`` writes a bare
state dict's single safetensors file the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from isal import isal_zlib

# zipfile computes each entry's CRC-32 with the module-level ``crc32`` (zlib's), serially with
# the write: 4 GB/s here, ~8 s of the one thread that writes a 30 GiB artifact. ISA-L's is the same
# function (the same polynomial and signature; tests/test_sinks.py compares them) at ~25 GB/s. Set
# once for the worker process, which is where artifacts are zipped and read back.
zipfile.crc32 = isal_zlib.crc32  # type: ignore[attr-defined]

# Fixed entry time: the same inputs give a byte-identical artifact (and sha256) on every run.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class _HashingStream:
    """A write-only, non-seekable file: zipfile then streams (no seek back to patch headers), so
    the bytes hashed are the bytes on disk.

    A large buffer's write and its SHA-256 run at once, the write on a thread of its own (both
    release the GIL): done one after the other they made the thread that writes an artifact the
    slowest stage of a streamed job (a global pruning job's main thread waited on it for a third
    of its time). Each ``write`` returns once both are done, so nothing outlives the caller's
    buffer and the file sees one write at a time, in order."""

    PARALLEL_MIN = 1 << 20  # below this, a thread hand-off costs more than it saves

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self._pool: ThreadPoolExecutor | None = None

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        if n < self.PARALLEL_MIN:
            self._f.write(b)
            self.sha.update(b)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="artifact-write")
            done = self._pool.submit(self._f.write, b)
            try:
                self.sha.update(b)
            finally:
                done.result()  # the write's error, if any, is the caller's (a full disk)
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class ZipSink:
    """``path``: the file to write; or ``fileobj``, an open binary file to write to instead (a
    ``PendingObject``'s, streaming into storage: the caller commits or aborts it)."""

    def __init__(self, path: Path | None = None, *, fileobj: BinaryIO | None = None) -> None:
        self.path = path
        self._f = fileobj if fileobj is not None else path.open("wb")  # type: ignore[union-attr]
        self._stream = _HashingStream(self._f)
        self._zip = zipfile.ZipFile(self._stream, "w", allowZip64=True)  # type: ignore[arg-type]
        self.files: list[str] = []

    def open(self, name: str, size: int, weights: bool) -> Any:
        info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_STORED if weights else zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        self.files.append(name)
        return self._zip.open(info, "w", force_zip64=size >= 2**31)

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (bytes, sha256 hex). A ``fileobj`` is flushed, not closed:
        its owner commits it."""
        self._zip.close()
        self._stream.shutdown()
        self._f.close() if self.path is not None else self._f.flush()
        return self._stream.size, self._stream.sha.hexdigest()

    def abort(self) -> None:
        """Drop the partial archive (a failed or canceled job stores nothing)."""
        self._zip.fp = None  # zipfile must not write its end record into what is being removed
        self._stream.shutdown()
        if self.path is not None:
            _close_quietly(self._f)
            self.path.unlink(missing_ok=True)


def _close_quietly(f: BinaryIO) -> None:
    # Closing flushes the buffer, which fails again on a full disk: the file is deleted anyway.
    with contextlib.suppress(OSError):
        f.close()


class _File:
    def __init__(self, stream: _HashingStream) -> None:
        self._s = stream

    def write(self, b: Any) -> int:
        return self._s.write(b)

    def close(self) -> None:
        pass


class FileSink:
    """One safetensors file (a bare state dict's artifact); ``fileobj`` as for ``ZipSink``."""

    def __init__(self, path: Path | None = None, *, fileobj: BinaryIO | None = None) -> None:
        self.path = path
        self._f = fileobj if fileobj is not None else path.open("wb")  # type: ignore[union-attr]
        self._stream = _HashingStream(self._f)
        self._opened = False

    def open(self, name: str, size: int, weights: bool) -> Any:
        if self._opened:
            raise RuntimeError("a bare state dict's artifact is one file")
        self._opened = True
        return _File(self._stream)

    def close(self) -> tuple[int, str]:
        self._stream.shutdown()
        self._f.close() if self.path is not None else self._f.flush()
        return self._stream.size, self._stream.sha.hexdigest()

    def abort(self) -> None:
        self._stream.shutdown()
        if self.path is not None:
            _close_quietly(self._f)
            self.path.unlink(missing_ok=True)


class DirSink:
    """Plain files in a folder: an intermediate pass's output, read by the next pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def open(self, name: str, size: int, weights: bool) -> Any:
        return (self.path / name).open("wb")

    def close(self) -> tuple[int, str]:
        return 0, ""

    def abort(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
