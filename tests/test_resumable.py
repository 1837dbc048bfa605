"""Resumable uploads (tus 1.0 at /v1/uploads) against the real cluster stack (API process,
PostgreSQL, Redis, a worker): the protocol (creation, HEAD, PATCH in chunks, checksum, termination,
expiration), its refusals (409, 412, 413, 415, 460, another tenant's 404), a PATCH cut off midway
then resumed, concurrent PATCHes, and models and datasets made from finished uploads, which must
be the same as the multipart upload of the same files and refused the same way.

After every test the staging folder (``<data_dir>/uploads``) holds exactly one file per live
upload, as long as its offset: no failure leaves bytes behind."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import query, safetensors_bytes, upload_dir

pytestmark = pytest.mark.integration

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _create(c: httpx.Client, length: int, filename: str | None = "model.safetensors", **meta: str) -> httpx.Response:
    pairs = ({"filename": filename} if filename is not None else {}) | meta
    headers = {**TUS, "Upload-Length": str(length)}
    if pairs:
        headers["Upload-Metadata"] = ",".join(f"{k} {_b64(v)}" for k, v in pairs.items())
    return c.post("/v1/uploads", headers=headers)


def _new(c: httpx.Client, length: int, filename: str = "model.safetensors") -> str:
    r = _create(c, length, filename)
    assert r.status_code == 201, r.text
    return r.headers["Location"]


def _patch(c: httpx.Client, url: str, offset: int, data: bytes, **headers: str) -> httpx.Response:
    h = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS, **headers}
    return c.patch(url, content=data, headers=h)


def _offset(c: httpx.Client, url: str) -> int:
    r = c.head(url, headers=TUS)
    assert r.status_code == 200, (r.status_code, r.headers)
    return int(r.headers["Upload-Offset"])


def _send(c: httpx.Client, data: bytes, filename: str, chunk: int = 64 * 1024) -> str:
    """A whole file through tus in chunks; the upload's id."""
    url = _new(c, len(data), filename)
    for start in range(0, len(data), chunk):
        r = _patch(c, url, start, data[start : start + chunk])
        assert r.status_code == 204, r.text
        assert int(r.headers["Upload-Offset"]) == min(start + chunk, len(data))
    return url.rsplit("/", 1)[1]


def _upload_files(c: httpx.Client, folder: Path) -> dict[str, str]:
    return {p.name: _send(c, p.read_bytes(), p.name) for p in sorted(folder.iterdir()) if p.is_file()}


def _cut_patch(base_url: str, key: str, path: str, offset: int, declared: int, sent: bytes) -> None:
    """A PATCH that declares ``declared`` bytes, sends ``sent`` and hangs up (a client cut off)."""
    u = urlsplit(base_url)
    head = (
        f"PATCH {path} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {key}\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: {offset}\r\nContent-Type: {OCTETS}\r\nContent-Length: {declared}\r\n\r\n"
    )
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(head.encode() + sent)
        time.sleep(0.3)


def _staging(stack) -> Path:
    return stack.data_dir / "uploads"


def _check_staging(stack) -> None:
    """One staging file per live upload, as long as its offset; none for a consumed one."""
    rows = {
        uid: (offset, consumed)
        for uid, offset, consumed in query(stack, 'SELECT id, "offset", consumed_at FROM uploads')
    }
    files = {p.name: p.stat().st_size for p in _staging(stack).iterdir()} if _staging(stack).is_dir() else {}
    live = {uid: offset for uid, (offset, consumed) in rows.items() if consumed is None}
    assert files == live, (files, live)


@pytest.fixture
def c(cluster):
    with cluster.client() as client:
        yield client
    _check_staging(cluster)


def test_options_create_head_and_patch_in_chunks(cluster, c):
    r = c.options("/v1/uploads")
    assert r.status_code == 204, r.text
    assert r.headers["Tus-Resumable"] == "1.0.0" and r.headers["Tus-Version"] == "1.0.0"
    assert r.headers["Tus-Extension"] == "creation,checksum,expiration,termination"
    assert r.headers["Tus-Checksum-Algorithm"] == "sha1,sha256"
    assert int(r.headers["Tus-Max-Size"]) == 24 * 1024 * 1024  # the stack's max_upload_bytes

    data = bytes(range(256)) * 1000  # 256,000 bytes
    r = _create(c, len(data), "notes.txt", note="hé, a note")
    assert r.status_code == 201, r.text
    url = r.headers["Location"]
    assert url.startswith("/v1/uploads/") and r.headers["Tus-Resumable"] == "1.0.0" and r.headers["Upload-Expires"]
    h = c.head(url, headers=TUS)
    assert h.status_code == 200 and h.headers["Cache-Control"] == "no-store"
    assert (h.headers["Upload-Offset"], h.headers["Upload-Length"]) == ("0", str(len(data)))
    assert h.headers["Upload-Expires"] == r.headers["Upload-Expires"]
    meta = dict(p.split(" ") for p in h.headers["Upload-Metadata"].split(","))
    assert base64.b64decode(meta["note"]).decode() == "hé, a note"
    # Three chunks, the second with a checksum; the upload's sha256 is recorded once complete.
    cuts = [0, 100_000, 200_000, len(data)]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        extra = {"Upload-Checksum": f"sha256 {_b64(hashlib.sha256(data[a:b]).digest())}"} if i == 1 else {}
        r = _patch(c, url, a, data[a:b], **extra)
        assert r.status_code == 204 and r.headers["Upload-Offset"] == str(b) and r.headers["Tus-Resumable"] == "1.0.0"
        assert _offset(c, url) == b
    uid = url.rsplit("/", 1)[1]
    assert query(cluster, "SELECT sha256 FROM uploads WHERE id = %s", uid)[0][0] == hashlib.sha256(data).hexdigest()
    assert (_staging(cluster) / uid).read_bytes() == data
    # An empty PATCH at the end changes nothing; DELETE removes the row and the bytes.
    assert _patch(c, url, len(data), b"").status_code == 204
    r = c.delete(url, headers=TUS)
    assert r.status_code == 204 and r.headers["Tus-Resumable"] == "1.0.0"
    assert c.head(url, headers=TUS).status_code == 404 and not (_staging(cluster) / uid).exists()
    assert c.delete(url, headers=TUS).status_code == 404


def test_a_patch_cut_off_midway_is_resumed_from_head(cluster, c):
    data = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB
    url = _new(c, len(data))
    assert _patch(c, url, 0, data[:40_000]).status_code == 204
    _cut_patch(cluster.service.url, cluster.key, url, 40_000, len(data) - 40_000, data[40_000:90_000])
    # The bytes that arrived may be kept (then they are on disk and counted) or not; the client
    # resumes wherever HEAD says, retrying while the cut request is still being wound up.
    for _ in range(50):
        offset = _offset(c, url)
        assert 40_000 <= offset <= 90_000
        r = _patch(c, url, offset, data[offset:])
        if r.status_code == 204:
            break
        assert r.status_code == 409 and r.json()["code"] in ("upload_busy", "offset_mismatch"), r.text
        time.sleep(0.1)
    assert r.status_code == 204 and _offset(c, url) == len(data)
    uid = url.rsplit("/", 1)[1]
    assert query(cluster, "SELECT sha256 FROM uploads WHERE id = %s", uid)[0][0] == hashlib.sha256(data).hexdigest()
    assert c.delete(url, headers=TUS).status_code == 204


def _problem(r: httpx.Response, status: int, code: str, body: bool = True) -> None:
    """A refusal with its status, problem code (not on HEAD: no body) and the protocol header."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Tus-Resumable"] == "1.0.0"
    if body:
        assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code, r.text


def test_refusals(cluster, c):
    url = _new(c, 1000)
    assert _patch(c, url, 0, b"a" * 300).status_code == 204
    # 409: a stale offset; 413: past the declared length (nothing of it kept).
    _problem(_patch(c, url, 0, b"b" * 10), 409, "offset_mismatch")
    _problem(_patch(c, url, 300, b"c" * 701), 413, "payload_too_large")
    # 460: the chunk does not match its checksum; discarded, the offset unchanged.
    bad = {"Upload-Checksum": f"sha256 {_b64(hashlib.sha256(b'other').digest())}"}
    _problem(_patch(c, url, 300, b"d" * 100, **bad), 460, "checksum_mismatch")
    _problem(_patch(c, url, 300, b"d" * 100, **{"Upload-Checksum": "md5 AAAA"}), 400, "unsupported_checksum_algorithm")
    assert _offset(c, url) == 300
    # 412: no or another Tus-Resumable, on every method but OPTIONS.
    for version in (None, "0.2.2"):
        h = {"Tus-Resumable": version} if version else {}
        _problem(c.post("/v1/uploads", headers={**h, "Upload-Length": "5"}), 412, "tus_version_unsupported")
        _problem(_patch(c, url, 300, b"e", **{"Tus-Resumable": version or ""}), 412, "tus_version_unsupported")
        _problem(c.delete(url, headers=h), 412, "tus_version_unsupported")
        r = c.head(url, headers=h)
        assert r.status_code == 412 and r.headers["Tus-Version"] == "1.0.0"
    # 415: not application/offset+octet-stream.
    _problem(_patch(c, url, 300, b"f", **{"Content-Type": "application/octet-stream"}), 415, "unsupported_media_type")
    assert _offset(c, url) == 300
    # Creation: 413 over max_upload_bytes, 400 without Upload-Length or filename, 422 for a name
    # that multipart refuses too.
    _problem(_create(c, 24 * 1024 * 1024 + 1), 413, "payload_too_large")
    _problem(c.post("/v1/uploads", headers=TUS), 400, "missing_upload_length")
    _problem(_create(c, 10, None), 400, "missing_filename")
    _problem(_create(c, 10, "weights.pt"), 422, "pickle_refused")
    _problem(_create(c, 10, "../config.json"), 422, "bad_filename")
    _problem(
        c.post("/v1/uploads", headers={**TUS, "Upload-Length": "1", "Upload-Metadata": "filename %%%"}),
        400,
        "invalid_metadata",
    )
    # Another tenant (or no key): 404 (401), with the protocol header all the same.
    with cluster.client(cluster.other_key) as b:
        r = b.head(url, headers=TUS)
        assert r.status_code == 404 and r.headers["Tus-Resumable"] == "1.0.0"
        _problem(_patch(b, url, 300, b"g"), 404, "not_found")
        _problem(b.delete(url, headers=TUS), 404, "not_found")
    with cluster.client(None) as anon:
        r = anon.patch(url, headers=TUS)
        assert r.status_code == 401 and r.headers["Tus-Resumable"] == "1.0.0"
    assert _offset(c, url) == 300
    # None of the refused bodies got into the file or into the sha256 the server carries between
    # PATCHes (app/resumable/service.py _HASHES): the finished upload's digest is its bytes'.
    assert _patch(c, url, 300, b"z" * 700).status_code == 204
    uid = url.rsplit("/", 1)[1]
    want = hashlib.sha256(b"a" * 300 + b"z" * 700).hexdigest()
    assert query(cluster, "SELECT sha256 FROM uploads WHERE id = %s", uid)[0][0] == want
    assert c.delete(url, headers=TUS).status_code == 204


def test_sha1_method_override_and_the_protocol_header_on_every_answer(cluster, c):
    """What standard tus clients rely on beyond a PATCH: sha1 checksums (every server must take
    them; tuspy sends them), POST with X-HTTP-Method-Override (tus-js-client's
    overridePatchMethod), and Tus-Resumable on every answer under /v1/uploads, those no upload
    route makes included (app/resumable/endpoints.py TusProtocol)."""
    data = bytes(range(256)) * 24_576  # 6 MiB: more than a POST's body may hold (the JSON limit, 4 MiB)
    half = len(data) // 2
    url = _new(c, len(data))
    wrong = {"Upload-Checksum": f"sha1 {_b64(hashlib.sha1(b'other').digest())}"}
    _problem(_patch(c, url, 0, data[:half], **wrong), 460, "checksum_mismatch")
    short = {"Upload-Checksum": f"sha1 {_b64(hashlib.sha256(data[:10]).digest())}"}  # 32 bytes, not sha1's 20
    _problem(_patch(c, url, 0, data[:10], **short), 400, "invalid_checksum")
    assert _offset(c, url) == 0
    right = {"Upload-Checksum": f"SHA1 {_b64(hashlib.sha1(data[:half]).digest())}"}
    r = _patch(c, url, 0, data[:half], **right)
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(half), r.text
    # The overrides: HEAD, then the rest as a PATCH (streamed to disk like one), then DELETE.
    r = c.post(url, headers={**TUS, "X-HTTP-Method-Override": "HEAD"})
    assert r.status_code == 200 and r.headers["Upload-Offset"] == str(half) and r.headers["Tus-Resumable"] == "1.0.0"
    r = c.post(
        url,
        content=data[half:],
        headers={**TUS, "X-HTTP-Method-Override": "patch", "Upload-Offset": str(half), "Content-Type": OCTETS},
    )
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(data)), r.text
    uid = url.rsplit("/", 1)[1]
    assert query(cluster, "SELECT sha256 FROM uploads WHERE id = %s", uid)[0][0] == hashlib.sha256(data).hexdigest()
    assert (_staging(cluster) / uid).read_bytes() == data
    # Any other method named is not taken: a POST to an upload, which no route answers (405).
    for other in ("GET", "PUT", "POST"):
        _problem(c.post(url, headers={**TUS, "X-HTTP-Method-Override": other}), 405, "method_not_allowed", body=False)
    assert c.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}).status_code == 204
    assert c.head(url, headers=TUS).status_code == 404 and not (_staging(cluster) / uid).exists()
    # Answers of no upload route carry the header too: the router's 405 and 404 under the prefix,
    # the body limits' refusal of a body that is not the JSON it says it is.
    r = c.put(url, headers=TUS)
    assert r.status_code == 405 and r.headers["Tus-Resumable"] == "1.0.0"
    r = c.put(url, headers={**TUS, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 422 and r.headers["Tus-Resumable"] == "1.0.0", r.text
    r = c.get("/v1/uploads/a/b", headers=TUS)
    assert r.status_code == 404 and r.headers["Tus-Resumable"] == "1.0.0"
    # Outside the prefix neither applies: no header, and the override names no method.
    r = c.get("/v1/jobs", headers={"X-HTTP-Method-Override": "DELETE"})
    assert r.status_code == 200 and "Tus-Resumable" not in r.headers


def test_concurrent_patches_one_wins(cluster, c):
    data = b"x" * 50_000
    url = _new(c, len(data))

    def one(_: int) -> httpx.Response:
        with cluster.client() as cc:
            return _patch(cc, url, 0, data)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [204] + [409] * 5, [(r.status_code, r.text) for r in results]
    assert {r.json()["code"] for r in results if r.status_code == 409} <= {"upload_busy", "offset_mismatch"}
    assert _offset(c, url) == len(data)
    assert c.delete(url, headers=TUS).status_code == 204


def _hf_dir(root: Path) -> Path:
    """A small Hugging Face directory (no torch needed): config, weights, tokenizer files."""
    d = root / "hf"
    d.mkdir()
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "torch_dtype": "float32", "n_embd": 8}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text('{"bos_token_id": 0}')
    (d / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "model": {"vocab": {str(i): i for i in range(50)}}})
    )
    wte, ln = bytes(range(256)) * 5 + bytes(256), bytes(32)  # 16x8 and 8 float32s
    header = {
        "transformer.wte.weight": {"dtype": "F32", "shape": [48, 8], "data_offsets": [0, len(wte)]},
        "transformer.ln_f.weight": {"dtype": "F32", "shape": [8], "data_offsets": [len(wte), len(wte) + len(ln)]},
    }
    (d / "model.safetensors").write_bytes(safetensors_bytes(header, wte + ln))
    return d


def test_model_from_uploads_is_the_multipart_model(cluster, c, tmp_path):
    d = _hf_dir(tmp_path)
    files = _upload_files(c, d)
    by_tus = c.post("/v1/models", json={"name": "by-tus", "files": files})
    assert by_tus.status_code == 201, by_tus.text
    by_multipart = upload_dir(c, d, name="by-multipart")
    assert by_multipart.status_code == 201, by_multipart.text
    a, b = by_tus.json(), by_multipart.json()
    assert a["name"] == "by-tus"
    for field in ("sha256", "files", "size_bytes", "format", "architecture", "parameters"):
        assert a[field] == b[field], field
    # The bytes moved into the model's storage, byte for byte.
    stored = cluster.data_dir / "storage" / "models" / a["id"]
    assert {p.name: p.read_bytes() for p in stored.iterdir()} == {p.name: p.read_bytes() for p in d.iterdir()}
    # The uploads are consumed: their staging files are gone, and they cannot be used again.
    for uid in files.values():
        assert not (_staging(cluster) / uid).exists()
        _problem(c.head(f"/v1/uploads/{uid}", headers=TUS), 410, "upload_consumed", body=False)
    again = c.post("/v1/models", json={"files": files})
    assert again.status_code == 409 and again.json()["code"] == "upload_consumed", again.text
    # Consumed uploads are still records until they expire: DELETE forgets them.
    for uid in files.values():
        assert c.delete(f"/v1/uploads/{uid}", headers=TUS).status_code == 204


def test_unusable_uploads_are_refused_and_nothing_is_taken(cluster, c):
    st = safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16)
    whole = _send(c, st, "w.safetensors")
    part = _new(c, 100).rsplit("/", 1)[1]
    # Incomplete, unknown, another tenant's.
    r = c.post("/v1/models", json={"files": {"w.safetensors": part}})
    assert r.status_code == 409 and r.json()["code"] == "upload_incomplete", r.text
    r = c.post("/v1/models", json={"files": {"w.safetensors": "00000000-0000-4000-8000-000000000000"}})
    assert r.status_code == 404 and r.json()["code"] == "unknown_upload", r.text
    with cluster.client(cluster.other_key) as b:
        r = b.post("/v1/models", json={"files": {"w.safetensors": whole}})
        assert r.status_code == 404 and r.json()["code"] == "unknown_upload", r.text
    # Bad bodies: 422 like any JSON route; a file name multipart refuses, refused the same way.
    for body in ({}, {"files": {}}, {"files": {"w.safetensors": 5}}, {"files": {"a": whole}, "x": 1}):
        assert c.post("/v1/models", json=body).status_code == 422, body
    r = c.post("/v1/models", json={"files": {"w.pt": whole}})
    assert r.status_code == 422 and r.json()["code"] == "pickle_refused", r.text
    # Invalid safetensors: the same 422 as multipart; the upload stays usable (not consumed).
    bad = safetensors_bytes({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16)
    bad_id = _send(c, bad, "w.safetensors")
    by_tus = c.post("/v1/models", json={"files": {"w.safetensors": bad_id}})
    by_multipart = c.post("/v1/models", files=[("files", ("w.safetensors", bad))])
    assert by_tus.status_code == by_multipart.status_code == 422
    assert by_tus.json()["code"] == by_multipart.json()["code"] == "invalid_safetensors"
    assert by_tus.json()["errors"] == by_multipart.json()["errors"]
    assert _offset(c, f"/v1/uploads/{bad_id}") == len(bad)
    # The good one still works, once.
    ok = c.post("/v1/models", json={"files": {"w.safetensors": whole}})
    assert ok.status_code == 201 and ok.json()["sha256"] == hashlib.sha256(st).hexdigest(), ok.text
    for uid in (part, bad_id):
        assert c.delete(f"/v1/uploads/{uid}", headers=TUS).status_code == 204


def test_dataset_from_an_upload_and_idempotency(cluster, c):
    # Long enough that its validation overlaps the concurrent duplicates below.
    text = b"".join(b"sample %d of the corpus\n" % i for i in range(100_000))
    uid = _send(c, text, "corpus.txt", chunk=1024 * 1024)
    key = {"Idempotency-Key": f"tus-{uid}"}
    body = {"name": "from-tus", "files": {"corpus.txt": uid}}

    def post(_: int) -> httpx.Response:
        with cluster.client() as cc:
            return cc.post("/v1/datasets", json=body, headers=key)

    # Concurrent duplicates: one dataset, every one of them answered with it.
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(post, range(6)))
    assert [r.status_code for r in results] == [201] * 6, [r.text for r in results]
    ds = results[0].json()
    assert {r.json()["id"] for r in results} == {ds["id"]}
    assert sum(r.headers.get("Idempotency-Replayed") == "true" for r in results) == 5
    assert (ds["name"], ds["samples"], ds["sha256"]) == ("from-tus", 100_000, hashlib.sha256(text).hexdigest())
    replay = post(0)
    assert replay.status_code == 201 and replay.json()["id"] == ds["id"], replay.text
    assert replay.headers["Idempotency-Replayed"] == "true"
    # The same uploads under another key: used already.
    r = c.post("/v1/datasets", json=body, headers={"Idempotency-Key": f"other-{uid}"})
    assert r.status_code == 409 and r.json()["code"] == "upload_consumed", r.text
    # One file only; a model file name is no dataset.
    a, b = _send(c, b"x\n", "a.txt"), _send(c, b"y\n", "b.txt")
    r = c.post("/v1/datasets", json={"files": {"a.txt": a, "b.txt": b}})
    assert r.status_code == 422 and r.json()["code"] == "unexpected_part", r.text
    r = c.post("/v1/datasets", json={"files": {"a.json": a}})
    assert r.status_code == 422 and r.json()["code"] == "unsupported_file_type", r.text
    for u in (a, b):
        assert c.delete(f"/v1/uploads/{u}", headers=TUS).status_code == 204


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_patch_bodies_stream_to_disk(cluster, c):
    """A PATCH larger than a JSON body may be (``max_json_body_bytes``, 4 MiB) streams to disk: the
    API's peak memory does not grow with it, and the bytes of a body cut off are kept."""
    size = 20 * 1024 * 1024
    url = _new(c, size)
    first = _patch(c, url, 0, b"p" * (5 * 1024 * 1024))
    assert first.status_code == 204, first.text
    # The rest in one chunked PATCH (no Content-Length), 64 KiB at a time.
    before = _peak_rss(cluster.service.api.pid)
    block = hashlib.sha256(b"block").digest() * 2048
    rest = size - 5 * 1024 * 1024
    r = _patch(c, url, 5 * 1024 * 1024, iter([block] * (rest // len(block))))
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(size), r.text
    assert _peak_rss(cluster.service.api.pid) - before < 8 * 1024 * 1024
    assert c.delete(url, headers=TUS).status_code == 204
    # Cut off after 1 MiB of 2: that MiB is on disk and counted.
    url = _new(c, 2 * 1024 * 1024)
    _cut_patch(cluster.service.url, cluster.key, url, 0, 2 * 1024 * 1024, b"q" * (1024 * 1024))
    deadline = time.monotonic() + 10
    while _offset(c, url) != 1024 * 1024:
        assert time.monotonic() < deadline, _offset(c, url)
        time.sleep(0.1)
    assert c.delete(url, headers=TUS).status_code == 204


@pytest.fixture
def sweeper_env(cluster, monkeypatch):
    """This process's settings and engine on the cluster's database and data folder, as an API
    process of the stack has them (the sweep runs here: no wait for the API's 60 s rounds)."""
    from core.config import get_settings
    from core.db import get_engine, get_sessionmaker

    for name in [k for k in cluster.service.env if k.startswith("MODELPRESS_")]:
        monkeypatch.setenv(name, cluster.service.env[name])
    caches = (get_settings, get_engine, get_sessionmaker)
    for fn in caches:
        fn.cache_clear()
    yield get_settings()
    get_engine().dispose()
    for fn in caches:
        fn.cache_clear()


def test_expired_uploads_are_refused_then_swept(cluster, c, sweeper_env):
    from app.sweeper import sweep_uploads

    done = _send(c, b"a finished upload\n", "late.txt")
    part = _new(c, 100).rsplit("/", 1)[1]
    assert _patch(c, f"/v1/uploads/{part}", 0, b"z" * 40).status_code == 204
    import psycopg

    with psycopg.connect(cluster.database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("UPDATE uploads SET expires_at = now() - interval '1 second' WHERE id = ANY(%s)", [[done, part]])
    # Expired, not swept yet: HEAD and PATCH 410, a model or dataset from it 409.
    _problem(c.head(f"/v1/uploads/{part}", headers=TUS), 410, "upload_expired", body=False)
    _problem(_patch(c, f"/v1/uploads/{part}", 40, b"z"), 410, "upload_expired")
    r = c.post("/v1/datasets", json={"files": {"late.txt": done}})
    assert r.status_code == 409 and r.json()["code"] == "upload_expired", r.text
    sweep_uploads(sweeper_env)
    assert query(cluster, "SELECT count(*) FROM uploads WHERE id = ANY(%s)", [done, part])[0][0] == 0
    assert not (_staging(cluster) / done).exists() and not (_staging(cluster) / part).exists()
    assert c.head(f"/v1/uploads/{part}", headers=TUS).status_code == 404


def test_embedded_mode_sqlite(embedded, tmp_path):
    """The same flow on the embedded stack (SQLite): a model from uploads, one of them sent in two
    PATCHes, equals the multipart upload; an upload is used once; nothing stays staged."""
    d = _hf_dir(tmp_path)
    with embedded.client() as c:
        files = {p.name: _send(c, p.read_bytes(), p.name) for p in d.iterdir() if p.suffix == ".json"}
        data = (d / "model.safetensors").read_bytes()
        files["model.safetensors"] = _send(c, data, "model.safetensors", chunk=len(data) // 2 + 1)
        by_tus = c.post("/v1/models", json={"files": files})
        assert by_tus.status_code == 201, by_tus.text
        by_multipart = upload_dir(c, d)
        assert by_tus.json()["sha256"] == by_multipart.json()["sha256"]
        assert by_tus.json()["files"] == by_multipart.json()["files"]
        again = c.post("/v1/models", json={"files": files})
        assert again.status_code == 409 and again.json()["code"] == "upload_consumed", again.text
        left = _new(c, 10, "x.txt")
        _problem(_patch(c, left, 0, b"0123456789", **{"Upload-Offset": "3"}), 409, "offset_mismatch")
        assert c.delete(left, headers=TUS).status_code == 204
        for uid in files.values():
            assert c.delete(f"/v1/uploads/{uid}", headers=TUS).status_code == 204
    # This test's uploads only: the embedded stack is the session's, other tests upload to it too.
    mine = {*files.values(), left.rsplit("/", 1)[1]}
    assert not {p.name for p in _staging(embedded).iterdir()} & mine
