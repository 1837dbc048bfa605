"""Resumable uploads from the SDK and the CLI (modelpress/_upload.py, ``modelpress models upload``)
and model imports (``import_model``, ``wait_model``, ``modelpress models import``).

Unit tests run the SDK's tus client against ``FakeTus``, an in-process tus 1.0 server on
``httpx.MockTransport`` (the protocol as docs and the brief define it: 201 + Location, HEAD offsets,
PATCH with Upload-Offset and Upload-Checksum, 409/460/404): what is skipped and why (and that the
rules agree with the server's, core/models/validation.py), the state file, chunking with a
checksum per PATCH, automatic retries of a cut connection, a rerun after giving up that sends
exactly the remaining bytes, a changed file starting over, the fallback to one multipart request
on a server without /v1/uploads, AsyncClient parity, and wait_model's outcomes. The CLI runs
in-process on the same fake server: the skip list is printed before the first request.

Integration tests run the CLI as a subprocess against the real cluster (tests/conftest.py): the
model equals the multipart upload's, the skip list, --include/--exclude, and an upload cut midway
then rerun sending exactly the remaining bytes (counted from the server's offsets)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelpress import AsyncClient, Client, ImportFailed, ImportTimeout, TransportError, plan_upload
from modelpress._upload import UploadState, parse_size, server_refusal

NOW = "2026-01-01T00:00:00Z"


# -- a tus 1.0 server in the process ---------------------------------------------------------------


class FakeTus:
    """The upload routes (and POST /v1/models from uploads) as the contract defines them.

    ``fail``: called with (upload, offset, body) before a PATCH is stored; it may return how many
    bytes of the body arrive before the connection breaks (the PATCH then raises WriteError), or
    None for a normal PATCH. ``tus``: False answers 404 on /v1/uploads (an older server)."""

    def __init__(self) -> None:
        self.uploads: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str, dict[str, str], int]] = []  # method, path, headers, body bytes
        self.patched = 0  # bytes stored by PATCHes
        self.fail: Callable[[dict[str, Any], int, bytes], int | None] | None = None
        self.checksum_failures = 0  # answer 460 to this many PATCHes
        self.max_body: int | None = None  # a limit on request bodies (413 before anything is read)
        self.busy = 0  # answer 409 upload_busy to this many PATCHes (the cut one is still being written)
        self.tus = True
        self.models: list[dict[str, Any]] = []
        self.replays: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> the model it made
        self.lose_answers = 0  # make the model, then drop the connection before the answer
        self.model_status: list[dict[str, Any]] = []  # GET /v1/models/{id} answers, in order

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        path = request.url.path
        self.log.append((request.method, path, dict(request.headers), len(body)))
        if path.startswith("/v1/uploads"):
            if not self.tus:
                return _problem(404, "not_found")
            return self._tus(request, path, body)
        if request.method == "POST" and path == "/v1/models":
            return self._create_model(request, body)
        if request.method == "GET" and path.startswith("/v1/models/"):
            answer = self.model_status.pop(0) if len(self.model_status) > 1 else self.model_status[0]
            return httpx.Response(200, json=answer)
        return _problem(404, "not_found")

    def _tus(self, request: httpx.Request, path: str, body: bytes) -> httpx.Response:
        h = request.headers
        assert h.get("tus-resumable") == "1.0.0"
        if request.method == "POST":
            uid = uuid.uuid4().hex
            name = base64.b64decode(h["upload-metadata"].split(" ", 1)[1]).decode()
            self.uploads[uid] = {"id": uid, "name": name, "length": int(h["upload-length"]), "data": bytearray()}
            return httpx.Response(201, headers={"Location": f"/v1/uploads/{uid}", "Tus-Resumable": "1.0.0"})
        up = self.uploads.get(path.rsplit("/", 1)[-1])
        if up is None:
            return _problem(404, "upload_not_found")
        offset = {"Upload-Offset": str(len(up["data"])), "Upload-Length": str(up["length"])}
        if request.method == "HEAD":
            return httpx.Response(200, headers=offset)
        if request.method == "DELETE":
            del self.uploads[up["id"]]
            return httpx.Response(204)
        assert request.method == "PATCH" and h["content-type"] == "application/offset+octet-stream"
        assert int(h["content-length"]) == len(body)
        if self.max_body is not None and len(body) > self.max_body:
            return _problem(413, "payload_too_large")
        if int(h["upload-offset"]) != len(up["data"]):
            return _problem(409, "offset_mismatch")
        if self.busy:
            self.busy -= 1
            return _problem(409, "upload_busy")
        if len(up["data"]) + len(body) > up["length"]:
            return _problem(413, "too_large")
        algo, digest = h["upload-checksum"].split(" ")
        assert algo == "sha256" and base64.b64decode(digest) == hashlib.sha256(body).digest()
        if self.checksum_failures:
            self.checksum_failures -= 1
            return _problem(460, "checksum_mismatch")
        cut = self.fail(up, len(up["data"]), body) if self.fail else None
        if cut is not None:
            up["data"] += body[:cut]
            self.patched += cut
            raise httpx.WriteError("connection reset by peer")
        up["data"] += body
        self.patched += len(body)
        return httpx.Response(204, headers={"Upload-Offset": str(len(up["data"])), "Tus-Resumable": "1.0.0"})

    def _create_model(self, request: httpx.Request, body: bytes) -> httpx.Response:
        if request.headers.get("content-type", "").startswith("multipart/"):
            self.models.append({"multipart": True})
            return httpx.Response(201, json=_model("multipart"))
        key = request.headers.get("idempotency-key", "")
        if key in self.replays:
            if self.lose_answers:
                self.lose_answers -= 1
                raise httpx.ReadError("connection lost before the answer")
            return httpx.Response(201, json=self.replays[key], headers={"Idempotency-Replayed": "true"})
        spec = json.loads(body)
        files = []
        for name, uid in sorted(spec["files"].items()):
            up = self.uploads.pop(uid)
            assert up["name"] == name and len(up["data"]) == up["length"], "an upload used before it was complete"
            files.append({"name": name, "size_bytes": up["length"], "sha256": hashlib.sha256(up["data"]).hexdigest()})
        model = _model(spec.get("name") or "model", files=files, key=key)
        self.models.append(model)
        self.replays[key] = model
        if self.lose_answers:
            self.lose_answers -= 1
            raise httpx.ReadError("connection lost before the answer")
        return httpx.Response(201, json=model)

    def requests(self, method: str) -> list[tuple[str, str, dict[str, str], int]]:
        return [r for r in self.log if r[0] == method]


def _problem(status: int, code: str) -> httpx.Response:
    body = {"type": f"/problems/{code}", "title": code, "status": status, "detail": code, "code": code}
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


def _model(name: str, **extra: Any) -> dict[str, Any]:
    files = extra.pop("files", [])
    return {
        "id": str(uuid.uuid4()),
        "name": name,
        "format": "hf",
        "parameters": 1,
        "size_bytes": sum(f["size_bytes"] for f in files),
        "sha256": "0" * 64,
        "created_at": NOW,
        "files": files,
        **extra,
    }


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The state files go here (``$MODELPRESS_CACHE_DIR``), never in the model folder."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MODELPRESS_CACHE_DIR", str(d))
    return d


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder with what a Hugging Face download holds, sendable or not."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    (d / "model.safetensors").write_bytes(os.urandom(300_000))
    (d / "tokenizer.json").write_text("{}")
    (d / "README.md").write_text("# a model\n")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (d / "tf_model.h5").write_bytes(b"hdf5")
    (d / "flax_model.msgpack").write_bytes(b"msgpack")
    (d / "tokenizer.model").write_bytes(b"sentencepiece")
    (d / ".gitattributes").write_text("*.bin lfs\n")
    (d / "original").mkdir()
    (d / "original" / "consolidated.00.pth").write_bytes(b"x")
    return d


SENT = ["README.md", "config.json", "model.safetensors", "tokenizer.json"]


def _client(server: FakeTus, **kw: Any) -> Client:
    return Client("http://mp.test", "k", transport=server.transport(), backoff_base=0.001, **kw)


# -- what is sent, and what is not ---------------------------------------------------------------


@pytest.mark.unit
def test_plan_skips_what_the_server_refuses_with_reasons(folder: Path) -> None:
    plan = plan_upload(folder)
    assert [f.name for f in plan.files] == SENT
    why = {s.name: s.reason for s in plan.skipped}
    assert set(why) == {
        ".gitattributes",
        "flax_model.msgpack",
        "original/",
        "pytorch_model.bin",
        "tf_model.h5",
        "tokenizer.model",
    }
    assert why[".gitattributes"] == "hidden" and "subdirectory" in why["original/"]
    assert "pickled code" in why["pytorch_model.bin"] and "safetensors only" in why["tf_model.h5"]
    assert (
        "safetensors only" in why["flax_model.msgpack"] and "'.model' files are not accepted" in why["tokenizer.model"]
    )
    assert plan.total == sum((folder / n).stat().st_size for n in SENT)


@pytest.mark.unit
def test_include_and_exclude_globs(folder: Path) -> None:
    plan = plan_upload(folder, include=["*.json", "*.safetensors"], exclude=["tokenizer*"])
    assert [f.name for f in plan.files] == ["config.json", "model.safetensors"]
    why = {s.name: s.reason for s in plan.skipped}
    assert why["tokenizer.json"] == "excluded by --exclude 'tokenizer*'"
    assert why["README.md"] == "not matched by any --include"
    # A glob names a path relative to the folder; exclude wins over include.
    assert [f.name for f in plan_upload(folder, exclude=["*.md", "model.*"]).files] == ["config.json", "tokenizer.json"]
    with pytest.raises(ValueError, match="no files to upload"):
        plan_upload(folder, include=["*.onnx"])


@pytest.mark.unit
def test_a_single_file_and_refused_single_files(folder: Path) -> None:
    plan = plan_upload(folder / "model.safetensors")
    assert [f.name for f in plan.files] == ["model.safetensors"] and not plan.skipped
    with pytest.raises(ValueError, match="pickled code"):
        plan_upload(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError):
        plan_upload(folder / "missing")


@pytest.mark.unit
def test_skip_rules_agree_with_the_server() -> None:
    """The SDK cannot import core (it stands alone): its copy of the rules is checked here."""
    from core.models import validation
    from modelpress import _upload

    assert validation.PICKLE_SUFFIXES == _upload.PICKLE_SUFFIXES
    assert validation.ARCHIVE_SUFFIXES == _upload.ARCHIVE_SUFFIXES
    assert validation.FILENAME_RE.pattern == _upload.FILENAME_RE.pattern
    names = [
        "config.json", "model.safetensors", "model-00001-of-00002.safetensors", "README.md", "chat.jinja",
        "merges.txt", "pytorch_model.bin", "x.pt", "a.pth", "w.ckpt", "m.pkl", "a.npy", "b.npz", "x.joblib",
        "tokenizer.model", "tf_model.h5", "flax_model.msgpack", "m.gguf", "m.onnx", "a.zip", "b.tar.gz",
        "c.tgz", "noext", "a b.json", "-x.json", "ü.json", "a..json", "vocab.TXT", "MODEL.SAFETENSORS",
    ]  # fmt: skip
    for name in names:
        try:
            validation.check_filename(name)
            server_ok = True
        except validation.FileRejected:
            server_ok = False
        assert (server_refusal(name) is None) == server_ok, name


@pytest.mark.unit
def test_parse_size() -> None:
    assert parse_size("16MiB") == 16 * 1024 * 1024 and parse_size("8M") == 8_000_000
    assert parse_size("1048576") == 1048576 and parse_size("64k") == 64_000 and parse_size("1.5KiB") == 1536
    for bad in ("", "0", "ten", "5 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.unit
def test_state_file_lives_in_the_cache_keyed_by_server_and_path(cache: Path, folder: Path) -> None:
    f = plan_upload(folder).files[1]
    st = UploadState("http://a.test/", folder)
    st.remember(f, "/v1/uploads/u1")
    assert st.path.parent == cache / "uploads" and not list(folder.glob(".modelpress*"))
    again = UploadState("http://a.test", folder)
    assert again.url_for(f) == "/v1/uploads/u1"
    assert UploadState("http://b.test", folder).url_for(f) is None  # another server
    os.utime(f.path, ns=(f.mtime_ns + 10**9, f.mtime_ns + 10**9))
    changed = plan_upload(folder).files[1]
    assert again.url_for(changed) is None and again.stale_url(changed) == "/v1/uploads/u1"
    st.path.write_text("{not json")
    assert UploadState("http://a.test", folder).files == {}  # damaged: ignored, the upload starts over
    stale = st.path.with_name("0" * 32 + ".json")
    stale.write_text("{}")
    os.utime(stale, (0, 0))
    UploadState("http://a.test", folder)
    assert not stale.exists() and st.path.exists()  # a month untouched: gone


# -- the protocol ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_upload_in_checksummed_chunks_then_create(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    seen: list[tuple[int, int]] = []
    with _client(srv) as mp:
        model = mp.upload_model(folder, name="m", chunk_size=64 * 1024, on_progress=lambda d, t: seen.append((d, t)))
    total = plan_upload(folder).total
    assert [f.name for f in model.files] == SENT
    for f in model.files:
        assert f.sha256 == hashlib.sha256((folder / f.name).read_bytes()).hexdigest()
    patches = srv.requests("PATCH")
    assert max(n for *_, n in patches) == 64 * 1024 and len(patches) == 3 + 5  # 300,000 bytes: 5 chunks
    assert srv.patched == total and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # progress only moves forward
    create = srv.requests("POST")[-1]
    assert create[1] == "/v1/models" and uuid.UUID(create[2]["idempotency-key"])
    assert not list((cache / "uploads").glob("*.json")), "the state file goes once the model exists"


@pytest.mark.unit
def test_a_cut_connection_is_retried_from_the_servers_offset(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    cuts = iter([1000, 0])  # the second chunk of the weights breaks twice, 1000 bytes of it arrived once

    def fail(up: dict[str, Any], offset: int, body: bytes) -> int | None:
        return next(cuts, None) if up["name"] == "model.safetensors" and 100_000 <= offset < 200_000 else None

    srv.fail = fail
    with _client(srv) as mp:
        model = mp.upload_model(folder, chunk_size=100_000)
    weights = next(f for f in model.files if f.name == "model.safetensors")
    assert weights.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert srv.patched == plan_upload(folder).total  # nothing sent twice: HEAD said where to go on
    assert len(srv.requests("HEAD")) == 2 and len(srv.requests("PATCH")) == 3 + 5


@pytest.mark.unit
def test_giving_up_then_a_rerun_sends_only_the_remaining_bytes(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    srv.fail = lambda up, offset, body: 5 if offset >= 150_000 else None  # the link dies for good
    with _client(srv, max_retries=2) as mp, pytest.raises(TransportError, match="run the same upload again"):
        mp.upload_model(folder, chunk_size=50_000)
    state = json.loads(next((cache / "uploads").glob("*.json")).read_text())
    assert set(state["files"]) == {"README.md", "config.json", "model.safetensors"}
    on_server = sum(len(u["data"]) for u in srv.uploads.values())
    total = plan_upload(folder).total
    assert 0 < on_server < total

    srv.fail, before, started = None, srv.patched, []
    with _client(srv) as mp:
        model = mp.upload_model(folder, chunk_size=50_000, on_start=lambda a, t: started.append((a, t)))
    assert started == [(on_server, total)]
    assert srv.patched - before == total - on_server  # exactly the bytes the server lacked
    assert [f.name for f in model.files] == SENT
    assert len(srv.requests("POST")) == 3 + 1 + 1  # 3 uploads, then the 4th and the model


@pytest.mark.unit
def test_checksum_mismatch_offset_mismatch_and_expired_uploads(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    srv.checksum_failures = 2  # 460 twice: the chunk is sent again
    with _client(srv) as mp:
        mp.upload_model(folder / "model.safetensors", chunk_size=200_000)
    assert len(srv.requests("PATCH")) == 2 + 2

    srv = FakeTus()
    srv.busy = 2  # 409 upload_busy: wait, ask the offset, go on
    with _client(srv) as mp:
        mp.upload_model(folder / "model.safetensors", chunk_size=200_000)
    assert len(srv.requests("PATCH")) == 2 + 2 and len(srv.requests("HEAD")) == 2

    # An upload the server forgot (expired: 404) starts that file over; a stale offset (409) asks.
    srv = FakeTus()
    srv.fail = lambda up, offset, body: 0 if offset == 100_000 else None
    with _client(srv, max_retries=0) as mp, pytest.raises(TransportError):
        mp.upload_model(folder / "model.safetensors", chunk_size=100_000)
    srv.uploads.clear()
    srv.fail = None
    with _client(srv) as mp:
        model = mp.upload_model(folder / "model.safetensors", chunk_size=100_000)
    assert model.files[0].size_bytes == 300_000 and srv.requests("HEAD")


@pytest.mark.unit
def test_a_rerun_after_a_lost_create_answer_gets_the_same_model(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    srv.lose_answers = 2  # the create and its one retry: made, but no answer reaches the client
    with _client(srv, max_retries=1) as mp, pytest.raises(TransportError):
        mp.upload_model(folder, name="m")
    assert len(srv.models) == 1 and not srv.uploads  # made once; its uploads used
    before = srv.patched
    with _client(srv) as mp:
        again = mp.upload_model(folder, name="m")
    assert again.id == srv.models[0]["id"] and len(srv.models) == 1 and srv.patched == before
    assert not list((cache / "uploads").glob("*.json"))


@pytest.mark.unit
def test_a_body_limit_halves_the_chunks(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    srv.max_body = 80_000  # e.g. a proxy's client_max_body_size
    with _client(srv) as mp:
        model = mp.upload_model(folder / "model.safetensors", chunk_size=300_000)
    assert model.files[0].size_bytes == 300_000 and srv.patched == 300_000
    assert [n for *_, n in srv.requests("PATCH")] == [300_000, 150_000, 75_000, 75_000, 75_000, 75_000]
    srv.max_body = 1000  # below the smallest chunk (64 KiB): the 413 is raised
    with _client(srv) as mp, pytest.raises(Exception, match="payload_too_large"):
        mp.upload_model(folder / "model.safetensors", restart=True)


@pytest.mark.unit
def test_a_changed_file_starts_over(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    srv.fail = lambda up, offset, body: 0 if up["name"] == "model.safetensors" and offset else None
    with _client(srv, max_retries=0) as mp, pytest.raises(TransportError):
        mp.upload_model(folder, chunk_size=100_000)
    old = {u["name"]: u["id"] for u in srv.uploads.values()}
    (folder / "model.safetensors").write_bytes(os.urandom(1000))
    srv.fail, before = None, srv.patched
    with _client(srv) as mp:
        model = mp.upload_model(folder, chunk_size=100_000)
    assert old["model.safetensors"] not in srv.uploads  # the old upload was deleted
    assert ("DELETE", f"/v1/uploads/{old['model.safetensors']}") in [(r[0], r[1]) for r in srv.log]
    assert srv.patched - before == 1000 + 2  # the new weights, and tokenizer.json ("{}"), not reached before
    assert next(f for f in model.files if f.name == "model.safetensors").size_bytes == 1000


@pytest.mark.unit
def test_an_older_server_gets_one_multipart_request(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    srv.tus = False
    with _client(srv) as mp:
        mp.upload_model(folder)
        assert srv.models == [{"multipart": True}]
        with pytest.raises(Exception, match="not_found"):
            mp.upload_model(folder, resumable=True)
    multipart = srv.requests("POST")[1]
    assert multipart[3] > plan_upload(folder).total  # every planned file in one request, no skipped one


@pytest.mark.unit
def test_async_client_resumes_the_same_way(cache: Path, folder: Path) -> None:
    srv = FakeTus()
    srv.fail = lambda up, offset, body: 0 if offset >= 100_000 else None

    async def upload(**kw: Any) -> Any:
        async with AsyncClient("http://mp.test", "k", transport=srv.transport(), backoff_base=0.001, **kw) as amp:
            return await amp.upload_model(folder, chunk_size=100_000)

    with pytest.raises(TransportError):
        asyncio.run(upload(max_retries=1))
    on_server = sum(len(u["data"]) for u in srv.uploads.values())
    srv.fail, before = None, srv.patched
    model = asyncio.run(upload())
    assert srv.patched - before == plan_upload(folder).total - on_server
    assert [f.name for f in model.files] == SENT


@pytest.mark.unit
def test_wait_model_outcomes() -> None:
    srv = FakeTus()
    importing = _model("m", status="importing", source="s3://b/m/", format=None, parameters=None, sha256=None)
    importing["progress"] = {"bytes_done": 10, "bytes_total": 100, "files_done": 0, "files_total": 2}
    ready = {**importing, "status": "ready", "progress": {"bytes_done": 100, "bytes_total": 100}}
    srv.model_status = [importing, importing, ready]
    seen: list[Any] = []
    with _client(srv) as mp:
        got = mp.wait_model(importing["id"], poll_interval=0.001, on_progress=seen.append)
        assert got.status == "ready" and got.ready and [m.status for m in seen] == ["importing", "ready"]
        assert seen[0].progress.bytes_total == 100 and seen[0].format is None
        failed = {**importing, "status": "failed", "error": {"code": "source_unreachable", "detail": "403"}}
        srv.model_status = [failed]
        with pytest.raises(ImportFailed, match="source_unreachable") as e:
            mp.wait_model(importing["id"], poll_interval=0.001)
        assert e.value.model.error == failed["error"]
        srv.model_status = [importing]
        with pytest.raises(ImportTimeout):
            mp.wait_model(importing["id"], timeout=0.01, poll_interval=0.001)
        srv.model_status = [_model("old")]  # an older server: no status, ready
        assert mp.wait_model("x").ready


# -- the CLI, in-process on the fake server -------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[tuple[FakeTus, list[str]]]:
    """The CLI's client on a FakeTus; ``events``: stderr lines and requests, in order."""
    from modelpress import _cli

    srv, events = FakeTus(), []
    handle = srv.handle

    def logged(request: httpx.Request) -> httpx.Response:
        events.append(f"{request.method} {request.url.path}")
        return handle(request)

    srv.handle = logged  # type: ignore[method-assign]
    monkeypatch.setattr(
        _cli, "_client", lambda args: Client(args.url, "k", transport=srv.transport(), backoff_base=0.001)
    )
    real = _cli._eprint
    monkeypatch.setattr(_cli, "_eprint", lambda text: (events.append(f"stderr {text}"), real(text)))
    yield srv, events


def _main(*argv: str) -> int:
    from modelpress._entry import main

    return main(list(argv))


@pytest.mark.unit
def test_cli_prints_the_skip_list_before_any_byte(
    cli: tuple[FakeTus, list[str]], folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, events = cli
    assert _main("models", "upload", str(folder), "--chunk-size", "64KiB", "--exclude", "README*") == 0
    first_request = next(i for i, e in enumerate(events) if not e.startswith("stderr"))
    skip = next(i for i, e in enumerate(events) if e.startswith("stderr skipping"))
    assert skip < first_request
    err = capsys.readouterr().err
    assert "skipping 7 files (not sent):" in err and "README.md" in err and "excluded by --exclude" in err
    assert "pytorch_model.bin" in err and "pickled code" in err
    assert srv.models and [f["name"] for f in srv.models[-1]["files"]] == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


@pytest.mark.unit
def test_cli_dry_run_sends_nothing(
    cli: tuple[FakeTus, list[str]], folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, events = cli
    assert _main("upload", str(folder), "--dry-run", "--include", "*.json", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [f["name"] for f in out["files"]] == ["config.json", "tokenizer.json"]
    assert {"name": "README.md", "reason": "not matched by any --include"} in out["skipped"]
    assert not srv.log
    assert _main("models", "upload", str(folder / "pytorch_model.bin")) == 2  # nothing to send: a usage error


@pytest.mark.unit
def test_cli_rerun_resumes_and_says_so(
    cli: tuple[FakeTus, list[str]], folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, _ = cli
    srv.fail = lambda up, offset, body: 0 if offset >= 128 * 1024 else None
    assert _main("models", "upload", str(folder), "--chunk-size", "64KiB") == 4
    assert "run the same upload again" in capsys.readouterr().err
    on_server = sum(len(u["data"]) for u in srv.uploads.values())
    srv.fail, before = None, srv.patched
    assert _main("models", "upload", str(folder), "--chunk-size", "64KiB", "--json") == 0
    out = capsys.readouterr()
    total = plan_upload(folder).total
    assert f"({on_server} of {total} bytes)" in out.err and srv.patched - before == total - on_server
    assert json.loads(out.out)["files"]


@pytest.mark.unit
def test_cli_models_import_wait(cli: tuple[FakeTus, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    srv, _ = cli
    importing = _model("llama", status="importing", source="s3://b/llama/")
    failed = {**importing, "status": "failed", "error": {"code": "source_not_found", "detail": "no such prefix"}}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models/import":
            assert json.loads(request.read()) == {"name": "llama", "source": "s3://b/llama/"}
            return httpx.Response(202, json=importing)
        return httpx.Response(200, json=srv.model_status.pop(0) if len(srv.model_status) > 1 else srv.model_status[0])

    srv.handle = handle  # type: ignore[method-assign]
    srv.model_status = [importing, {**importing, "status": "ready"}]
    assert _main("models", "import", "llama", "s3://b/llama/", "--wait", "--poll", "0.01") == 0
    assert f"model {importing['id']} imported" in capsys.readouterr().out
    srv.model_status = [failed]
    assert _main("models", "import", "llama", "s3://b/llama/", "--wait", "--poll", "0.01") == 1
    assert "source_not_found: no such prefix" in capsys.readouterr().err
    assert _main("models", "import", "llama", "s3://b/llama/", "--json") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "importing"


# -- against the real service ----------------------------------------------------------------------


def _tus_ready(url: str, key: str) -> bool:
    try:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.options(f"{url}/v1/uploads", headers=headers, timeout=5).status_code in (200, 204)
    except httpx.HTTPError:
        return False


def _run(stack: Any, *args: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    from tests.helpers import MODELPRESS

    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"MODELPRESS_URL": stack.service.url, "MODELPRESS_API_KEY": stack.key})
    env["MODELPRESS_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([MODELPRESS, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def live(cluster: Any) -> Any:
    if not _tus_ready(cluster.service.url, cluster.key):
        pytest.skip("the server has no /v1/uploads yet (app/resumable in progress)")
    return cluster


@pytest.mark.integration
def test_cli_upload_equals_the_multipart_upload(live: Any, tiny: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from tests.helpers import upload_dir

    d = tmp_path / "gpt2"
    shutil.copytree(tiny["gpt2"], d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (d / "README.md").write_text("# tiny\n")
    res = _run(live, "models", "upload", str(d), "--chunk-size", "256KiB", "--json", cache_dir=tmp_path / "c")
    assert res.returncode == 0, res.stderr
    assert "pytorch_model.bin" in res.stderr and "pickled code" in res.stderr
    model = json.loads(res.stdout)
    with live.client() as c:
        (d / "pytorch_model.bin").unlink()
        multipart = upload_dir(c, d).json()
    assert model["sha256"] == multipart["sha256"] and model["files"] == multipart["files"]
    assert model["parameters"] == multipart["parameters"] and model["format"] == "hf"


class _Cut(httpx.HTTPTransport):
    """Counts the PATCH bytes it sends; after ``limit`` bytes every PATCH fails (the link is down)."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        self.limit, self.sent = limit, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            if self.limit is not None and self.sent >= self.limit:
                raise httpx.WriteError("link down")
            self.sent += int(request.headers["content-length"])
        return super().handle_request(request)


def _cut_upload(stack: Any, d: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Upload ``d`` until the link dies after 300 kB: the SDK retries, gives up and says to run it
    again. Returns the bytes the server has (its offsets, asked with HEAD)."""
    monkeypatch.setenv("MODELPRESS_CACHE_DIR", str(cache_dir))
    with Client(stack.service.url, stack.key, transport=_Cut(300_000), max_retries=1, backoff_base=0.01) as mp:
        with pytest.raises(TransportError, match="again"):
            mp.upload_model(d, chunk_size=100_000)
        state = json.loads(next((cache_dir / "uploads").glob("*.json")).read_text())
        heads = [mp._http.head(e["url"], headers={"Tus-Resumable": "1.0.0"}) for e in state["files"].values()]
    return sum(int(h.headers["upload-offset"]) for h in heads)


@pytest.mark.integration
def test_sdk_upload_cut_midway_then_rerun_sends_exactly_the_rest(
    live: Any, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, total = tiny["gpt2"], plan_upload(tiny["gpt2"]).total
    on_server = _cut_upload(live, d, tmp_path / "c", monkeypatch)
    assert 0 < on_server < total
    counting = _Cut()
    with Client(live.service.url, live.key, transport=counting) as mp:
        model = mp.upload_model(d, chunk_size=100_000)
    assert counting.sent == total - on_server
    with live.client() as c:
        from tests.helpers import upload_dir

        assert model.sha256 == upload_dir(c, d).json()["sha256"]


class _LoseCreate(httpx.HTTPTransport):
    """Sends POST /v1/models, then drops the answer (the model is made; the client never hears)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/models":
            response.close()
            raise httpx.ReadError("connection lost before the answer")
        return response


@pytest.mark.integration
def test_the_server_replays_a_lost_create_to_the_rerun(
    live: Any, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELPRESS_CACHE_DIR", str(tmp_path / "c"))
    lossy = Client(live.service.url, live.key, transport=_LoseCreate(), max_retries=0)
    with lossy as mp, pytest.raises(TransportError):
        mp.upload_model(tiny["bare"], name="lost-answer")
    with Client(live.service.url, live.key) as mp:
        model = mp.upload_model(tiny["bare"], name="lost-answer")
        named = [m for m in mp.models(limit=200) if m.name == "lost-answer"]
    assert [m.id for m in named] == [model.id]  # one model: the rerun got the first one's answer


@pytest.mark.integration
def test_cli_rerun_after_a_cut_resumes(
    live: Any, tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "c"
    d, total = tiny["llama"], plan_upload(tiny["llama"]).total
    on_server = _cut_upload(live, d, cache_dir, monkeypatch)
    res = _run(live, "models", "upload", str(d), "--chunk-size", "100000", "--json", cache_dir=cache_dir)
    assert res.returncode == 0, res.stderr
    assert f"({on_server} of {total} bytes)" in res.stderr  # what the rerun found on the server
    assert json.loads(res.stdout)["architecture"] == "LlamaForCausalLM"
    assert not list((cache_dir / "uploads").glob("*.json")), "the state file goes once the model exists"


@pytest.mark.integration
def test_ctrl_c_then_the_same_command_resumes(live: Any, tiny: dict[str, Path], tmp_path: Path) -> None:
    """The CLI as a user runs it: Ctrl-C (SIGINT) once the server has part of the weights, then the
    same command sends what is left."""
    from tests.helpers import MODELPRESS

    cache_dir, d = tmp_path / "c", tiny["gpt2-big"]
    total = plan_upload(d).total
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"MODELPRESS_URL": live.service.url, "MODELPRESS_API_KEY": live.key})
    env["MODELPRESS_CACHE_DIR"] = str(cache_dir)
    tus = {"Tus-Resumable": "1.0.0"}
    args = [MODELPRESS, "models", "upload", str(d), "--chunk-size", "64KiB", "--json"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    with live.client() as c:
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the upload did not start"
            state = [json.loads(p.read_text()) for p in (cache_dir / "uploads").glob("*.json")]
            entry = state[0]["files"].get("model.safetensors") if state else None
            if entry and int(c.head(entry["url"], headers=tus).headers.get("upload-offset", "0")) > 0:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "run the same command again to resume" in err
        urls = [
            e["url"] for e in json.loads(next((cache_dir / "uploads").glob("*.json")).read_text())["files"].values()
        ]
        on_server = sum(int(c.head(u, headers=tus).headers["upload-offset"]) for u in urls)
    assert 0 < on_server < total
    res = _run(live, "models", "upload", str(d), "--json", cache_dir=cache_dir)
    assert res.returncode == 0, res.stderr
    assert f"({on_server} of {total} bytes)" in res.stderr
    assert json.loads(res.stdout)["size_bytes"] == total


@pytest.mark.integration
def test_cli_include_exclude_against_the_server(live: Any, tiny: dict[str, Path], tmp_path: Path) -> None:
    res = _run(
        live, "models", "upload", str(tiny["gpt2"]), "--exclude", "generation_config.json", "--json",
        cache_dir=tmp_path / "c",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "generation_config.json" in res.stderr
    assert "generation_config.json" not in [f["name"] for f in json.loads(res.stdout)["files"]]


@pytest.mark.integration
def test_cli_models_import_from_http_wait(live: Any, tiny: dict[str, Path], tmp_path: Path) -> None:
    """``models import --wait`` against the real import (an http file on loopback, which the
    cluster's ``webhook_allow_networks`` lets through): ready with the file's digest; a missing
    file fails with the server's code (exit 1)."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(tiny["bare"].parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cache_dir = tmp_path / "c"
        res = _run(live, "models", "import", "from-http", f"{base}/weights.safetensors", "--wait", "--poll", "0.1",
                   "--json", cache_dir=cache_dir)  # fmt: skip
        assert res.returncode == 0, res.stderr
        model = json.loads(res.stdout)
        assert model["status"] == "ready" and model["name"] == "from-http" and model["source"].startswith(base)
        assert model["sha256"] == hashlib.sha256(tiny["bare"].read_bytes()).hexdigest()
        res = _run(live, "models", "import", "nope", f"{base}/nope.safetensors", "--wait", "--poll", "0.1",
                   cache_dir=cache_dir)  # fmt: skip
        assert res.returncode == 1 and "import_source_not_found" in res.stderr, res.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_sdk_dataset_through_uploads(live: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_CACHE_DIR", str(tmp_path / "c"))
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i}", "label": i % 2}) + "\n" for i in range(200)))
    counting = _Cut()
    with Client(live.service.url, live.key, transport=counting) as mp:
        ds = mp.create_dataset(data, name="calib", chunk_size=1024)
    assert ds.samples == 200 and ds.labeled and ds.name == "calib"
    assert counting.sent == data.stat().st_size  # the bytes went through PATCH /v1/uploads
