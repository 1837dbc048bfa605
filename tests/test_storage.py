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
