"""Storage.open_write: an artifact streamed into storage is visible only once committed, and an
aborted one leaves nothing (a local folder, and fsspec's in-process memory filesystem for the
remote code path; a real S3 server is issue 17's)."""

from __future__ import annotations

import uuid
import zipfile
from pathlib import Path

import pytest

from core.storage import Storage
from worker.sinks import FileSink, ZipSink

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path: Path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    return Storage(f"memory://mp-test-{uuid.uuid4().hex}")


def _leftovers(storage: Storage, prefix: str) -> list[str]:
    path = f"{storage.root}/{prefix}"
    return sorted(storage.fs.find(path)) if storage.fs.exists(path) else []


def test_committed_zip_is_the_stream_written(storage: Storage, tmp_path: Path) -> None:
    pending = storage.open_write("artifacts/j1/attempt-1/model.zip")
    sink = ZipSink(fileobj=pending.file)
    w = sink.open("model.safetensors", 5, weights=True)
    w.write(b"hello")
    w.close()
    size, sha = sink.close()
    pending.commit()
    assert storage.size("artifacts/j1/attempt-1/model.zip") == size
    local = tmp_path / "got.zip"
    storage.get_file("artifacts/j1/attempt-1/model.zip", local)
    import hashlib

    assert hashlib.sha256(local.read_bytes()).hexdigest() == sha
    with zipfile.ZipFile(local) as z:
        assert z.read("model.safetensors") == b"hello"
    # The object alone: no temporary name left beside it.
    assert [p.rsplit("/", 1)[-1] for p in _leftovers(storage, "artifacts/j1")] == ["model.zip"]


def test_local_object_is_invisible_until_commit(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "store"))
    pending = storage.open_write("a/b.safetensors")
    sink = FileSink(fileobj=pending.file)
    sink.open("b.safetensors", 3, weights=True).write(b"abc")
    sink.close()
    assert not storage.exists("a/b.safetensors")  # only the temporary name exists so far
    pending.commit()
    assert (tmp_path / "store" / "a" / "b.safetensors").read_bytes() == b"abc"
    assert [p.name for p in (tmp_path / "store" / "a").iterdir()] == ["b.safetensors"]


def test_abort_leaves_nothing(storage: Storage) -> None:
    pending = storage.open_write("artifacts/j2/attempt-1/model.zip")
    sink = ZipSink(fileobj=pending.file)
    w = sink.open("model.safetensors", 1 << 20, weights=True)
    w.write(b"x" * (1 << 20))
    sink.abort()
    pending.abort()
    assert not storage.exists("artifacts/j2/attempt-1/model.zip")
    assert _leftovers(storage, "artifacts/j2") == []


def test_zip_crcs_are_zlibs(tmp_path: Path) -> None:
    """worker/sinks.py hands zipfile ISA-L's crc32 (~6x zlib's): the same function, so an entry's
    recorded CRC-32 is zlib's of its bytes, for buffers of every size and running values."""
    import os
    import zlib

    from isal import isal_zlib

    for n in (0, 1, 15, 4096, 1 << 20, (1 << 20) + 7):
        b = os.urandom(n)
        assert isal_zlib.crc32(b) == zlib.crc32(b)
        assert isal_zlib.crc32(b, 0x12345678) == zlib.crc32(b, 0x12345678)
    parts = [os.urandom(3 << 20), os.urandom(100), os.urandom(2 << 20)]
    sink = ZipSink(tmp_path / "a.zip")
    w = sink.open("model.safetensors", sum(map(len, parts)), weights=True)
    for p in parts:
        w.write(p)
    w.close()
    sink.close()
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        info = z.getinfo("model.safetensors")
        assert zlib.crc32(b"".join(parts)) == info.CRC
        assert z.read("model.safetensors") == b"".join(parts)


def test_large_writes_and_their_hash_overlap_in_order(tmp_path: Path) -> None:
    """A buffer of 1 MiB or more is written on a second thread while it is hashed: the bytes land
    in order, the SHA-256 is of the file as written, and a failed write is the caller's error."""
    import errno
    import hashlib
    import os

    parts = [os.urandom(n) for n in (5, 1 << 20, 3 << 20, 17, 2 << 20)]
    sink = FileSink(tmp_path / "a.safetensors")
    w = sink.open("a.safetensors", sum(map(len, parts)), weights=True)
    for p in parts:
        w.write(p)
    size, sha = sink.close()
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data == b"".join(parts) and size == len(data)
    assert sha == hashlib.sha256(data).hexdigest()

    class Full:
        """A file that takes 1 MiB and then reports a full disk."""

        def __init__(self) -> None:
            self.n = 0

        def write(self, b: bytes) -> int:
            if self.n:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(b)
            return len(b)

        def flush(self) -> None:
            pass

    sink = FileSink(fileobj=Full())  # type: ignore[arg-type]
    w = sink.open("a.safetensors", 2 << 20, weights=True)
    w.write(bytes(1 << 20))
    with pytest.raises(OSError) as e:
        w.write(bytes(1 << 20))
    assert e.value.errno == errno.ENOSPC
    sink.abort()
