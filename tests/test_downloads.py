"""Downloads (docs/API_DOWNLOADS.md): the whole artifact and one file of it, with HEAD, Range,
ETag / If-None-Match / If-Range and Repr-Digest, against the real embedded service; and the SDK's
resume, which never appends to a ``.part`` of another artifact."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import modelpress
from modelpress import Client
from tests.helpers import Service, upload_dir, wait_job
from tests.servers import SeaweedS3

pytestmark = pytest.mark.integration

NO_EVAL = {"enabled": False}


def _run(c: httpx.Client, model_id: str, step: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/v1/jobs", json={"model_id": model_id, "steps": [step], "evaluation": NO_EVAL})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def client(embedded) -> httpx.Client:
    return embedded.client()


@pytest.fixture(scope="module")
def hf(client: httpx.Client, tiny: dict[str, Path]) -> dict[str, Any]:
    """Two succeeded jobs on a tiny GPT-2 (two different zips) and the first one's bytes."""
    m = upload_dir(client, tiny["gpt2"]).json()
    job = _run(client, m["id"], {"method": "quantize.cast", "params": {"dtype": "bfloat16"}})
    other = _run(client, m["id"], {"method": "prune.magnitude", "params": {"sparsity": 0.5}})
    data = client.get(f"/v1/jobs/{job['id']}/artifact").content
    return {"job": job, "other": other, "data": data, "url": f"/v1/jobs/{job['id']}/artifact"}


@pytest.fixture(scope="module")
def bare(client: httpx.Client, tiny: dict[str, Path]) -> dict[str, Any]:
    path = tiny["bare"]
    m = client.post("/v1/models", files=[("files", (path.name, path.read_bytes()))]).json()
    job = _run(client, m["id"], {"method": "quantize.cast", "params": {"dtype": "bfloat16"}})
    return {"job": job, "data": client.get(f"/v1/jobs/{job['id']}/artifact").content}


def _digest(resp: httpx.Response) -> str:
    value = resp.headers["repr-digest"]
    assert value.startswith("sha-256=:") and value.endswith(":")
    return base64.b64decode(value.removeprefix("sha-256=:").removesuffix(":")).hex()


_SAME = ("etag", "repr-digest", "accept-ranges", "content-disposition", "content-length", "content-type")


def test_whole_artifact_head_and_conditionals(client: httpx.Client, hf: dict[str, Any]) -> None:
    job, data, url = hf["job"], hf["data"], hf["url"]
    sha = job["artifact"]["sha256"]
    etag = f'"{sha}"'
    get = client.get(url)
    assert get.status_code == 200 and get.content == data and hashlib.sha256(data).hexdigest() == sha
    assert get.headers["etag"] == etag and _digest(get) == sha

    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert {h: head.headers.get(h) for h in _SAME} == {h: get.headers.get(h) for h in _SAME}
    assert int(head.headers["content-length"]) == len(data)

    for tag in (etag, "*", f'"nope", {etag}', f"W/{etag}"):
        r = client.get(url, headers={"If-None-Match": tag})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag, tag
    assert client.head(url, headers={"If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    # If-Range: the range only when the tag is the current one, else the whole artifact.
    r = client.get(url, headers={"Range": "bytes=10-", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[10:] and _digest(r) == sha
    assert r.headers["content-range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
    stale = f'"{hf["other"]["artifact"]["sha256"]}"'
    for tag in (stale, f"W/{etag}", "Sat, 01 Jan 2000 00:00:00 GMT"):
        r = client.get(url, headers={"Range": "bytes=10-", "If-Range": tag})
        assert r.status_code == 200 and r.content == data and "content-range" not in r.headers, tag

    # HEAD with a Range answers the headers of that GET.
    h = client.head(url, headers={"Range": "bytes=0-99"})
    assert h.status_code == 206 and h.headers["content-length"] == "100" and h.content == b""
    assert h.headers["content-range"] == f"bytes 0-99/{len(data)}"
    assert client.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416


def test_files_of_a_zip(client: httpx.Client, hf: dict[str, Any]) -> None:
    job, data, url = hf["job"], hf["data"], hf["url"]
    z = zipfile.ZipFile(io.BytesIO(data))
    infos = {i.filename: i for i in z.infolist()}
    listing = client.get(f"{url}/files")
    assert listing.status_code == 200, listing.text
    files = {f["name"]: f for f in listing.json()["files"]}
    assert set(files) == set(infos)
    assert all(files[n]["size_bytes"] == infos[n].file_size for n in infos)

    weights = next(n for n, i in infos.items() if n.endswith(".safetensors"))
    assert infos[weights].compress_type == zipfile.ZIP_STORED
    assert infos["config.json"].compress_type == zipfile.ZIP_DEFLATED
    for name in ("config.json", weights, "modelpress.json"):
        want = z.read(name)
        r = client.get(f"{url}/files/{name}")
        assert r.status_code == 200 and r.content == want, name
        assert r.headers["etag"] == files[name]["etag"] and r.headers["etag"] != f'"{job["artifact"]["sha256"]}"'
        assert int(r.headers["modelpress-crc32"], 16) == infos[name].CRC and "repr-digest" not in r.headers
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        head = client.head(f"{url}/files/{name}")
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(want))
        assert head.headers["etag"] == r.headers["etag"]
        # Range on the entry's bytes (stored: a slice of the zip; deflated: decompressed and skipped).
        part = client.get(f"{url}/files/{name}", headers={"Range": "bytes=5-40", "If-Range": r.headers["etag"]})
        assert part.status_code == 206 and part.content == want[5:41], name
        assert part.headers["content-range"] == f"bytes 5-40/{len(want)}"
        tail = client.get(f"{url}/files/{name}", headers={"Range": "bytes=-7"})
        assert tail.status_code == 206 and tail.content == want[-7:]
        stale = client.get(f"{url}/files/{name}", headers={"Range": "bytes=5-40", "If-Range": '"stale"'})
        assert stale.status_code == 200 and stale.content == want
        assert client.get(f"{url}/files/{name}", headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_file_names_refused(client: httpx.Client, hf: dict[str, Any]) -> None:
    """A name is one path segment; ``..`` (sent encoded: clients remove dot segments) is refused,
    a name with a slash matches no route, an unknown name is a 404: all problem+json."""
    url = hf["url"]
    for name, status, code in (
        ("%2E%2E", 422, "bad_file_name"),
        ("%2E", 422, "bad_file_name"),
        ("nope.json", 404, "not_found"),
        ("..%2Fconfig.json", 404, None),
        ("%2Fetc%2Fpasswd", 404, None),
    ):
        r = client.get(f"{url}/files/{name}")
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), name
        assert code is None or r.json()["code"] == code, name
        assert client.head(f"{url}/files/{name}").status_code == status, name


def test_single_file_artifact(client: httpx.Client, bare: dict[str, Any]) -> None:
    job, data = bare["job"], bare["data"]
    name, sha = job["artifact"]["filename"], job["artifact"]["sha256"]
    url = f"/v1/jobs/{job['id']}/artifact"
    files = client.get(f"{url}/files").json()["files"]
    assert files == [{"name": name, "size_bytes": len(data), "etag": f'"{sha}"', "crc32": None, "sha256": sha}]
    r = client.get(f"{url}/files/{name}")
    assert r.status_code == 200 and r.content == data and _digest(r) == sha and r.headers["etag"] == f'"{sha}"'
    assert client.get(f"{url}/files/{name}", headers={"Range": "bytes=8-15"}).content == data[8:16]
    assert client.get(f"{url}/files/other.safetensors").status_code == 404


def test_sdk_resume_and_foreign_part(embedded, hf: dict[str, Any], tmp_path: Path) -> None:
    job, other, data = hf["job"], hf["other"], hf["data"]
    requests: list[tuple[str, str | None, str | None]] = []

    def on_request(request: httpx.Request) -> None:
        if request.url.path.endswith("/artifact"):
            requests.append((request.method, request.headers.get("range"), request.headers.get("if-range")))

    with Client(embedded.service.url, embedded.key, event_hooks={"request": [on_request]}) as c:
        # A truncated .part of this artifact (its .etag says so): only the rest is asked for.
        dest = tmp_path / "a.zip"
        half = len(data) // 2
        Path(f"{dest}.part").write_bytes(data[:half])
        Path(f"{dest}.part.etag").write_text(f'"{job["artifact"]["sha256"]}"')
        got = c.download(job["id"], dest)
        assert requests == [("GET", f"bytes={half}-", f'"{job["artifact"]["sha256"]}"')]
        assert got.resumed_from == half and dest.read_bytes() == data
        assert not Path(f"{dest}.part").exists() and not Path(f"{dest}.part.etag").exists()

        # A .part of another artifact (the other job's, at the same path): never appended to.
        other_bytes = httpx.get(
            f"{embedded.service.url}/v1/jobs/{other['id']}/artifact",
            headers={"Authorization": f"Bearer {embedded.key}"},
        ).content
        dest2 = tmp_path / "b.zip"
        Path(f"{dest2}.part").write_bytes(other_bytes[:half])
        Path(f"{dest2}.part.etag").write_text(f'"{other["artifact"]["sha256"]}"')
        requests.clear()
        got = c.download(job["id"], dest2)
        assert requests == [("GET", None, None)] and got.resumed_from == 0 and dest2.read_bytes() == data

        # A .part of unknown origin (no .etag) starts over as well.
        dest3 = tmp_path / "c.zip"
        Path(f"{dest3}.part").write_bytes(data[:half])
        requests.clear()
        got = c.download(job["id"], dest3)
        assert requests == [("GET", None, None)] and got.resumed_from == 0 and dest3.read_bytes() == data

        # An interrupted download leaves a .part and its .etag; the next call resumes it.
        dest4 = tmp_path / "d.zip"
        Path(f"{dest4}.part").write_bytes(data[:100])
        Path(f"{dest4}.part.etag").write_text(f'"{job["artifact"]["sha256"]}"')
        requests.clear()
        assert c.download(job["id"], dest4).resumed_from == 100 and dest4.read_bytes() == data


def test_sdk_download_file(embedded, hf: dict[str, Any], bare: dict[str, Any], tmp_path: Path) -> None:
    job, data = hf["job"], hf["data"]
    z = zipfile.ZipFile(io.BytesIO(data))
    weights = next(n for n in z.namelist() if n.endswith(".safetensors"))
    with Client(embedded.service.url, embedded.key) as c:
        got = c.download_file(job["id"], "config.json", tmp_path)
        assert got.path == tmp_path / "config.json" and got.path.read_bytes() == z.read("config.json")

        # Resume a weight file from a .part recorded with the file's ETag.
        want = z.read(weights)
        etag = httpx.head(
            f"{embedded.service.url}/v1/jobs/{job['id']}/artifact/files/{weights}",
            headers={"Authorization": f"Bearer {embedded.key}"},
        ).headers["etag"]
        dest = tmp_path / "w.safetensors"
        Path(f"{dest}.part").write_bytes(want[:1000])
        Path(f"{dest}.part.etag").write_text(etag)
        got = c.download_file(job["id"], weights, dest)
        assert got.resumed_from == 1000 and dest.read_bytes() == want
        assert got.sha256 == hashlib.sha256(want).hexdigest()

        # A corrupted .part fails the zip's CRC-32 and is deleted.
        bad = tmp_path / "bad.safetensors"
        Path(f"{bad}.part").write_bytes(bytes(b ^ 0xFF for b in want[:1000]))
        Path(f"{bad}.part.etag").write_text(etag)
        with pytest.raises(modelpress.ChecksumMismatch):
            c.download_file(job["id"], weights, bad)
        assert not bad.exists() and not Path(f"{bad}.part").exists()

        # A single-file artifact: verified against its sha256 (Repr-Digest).
        b = bare["job"]
        got = c.download_file(b["id"], b["artifact"]["filename"], tmp_path / "bare")
        assert got.sha256 == b["artifact"]["sha256"] and got.path.read_bytes() == bare["data"]
        with pytest.raises(modelpress.NotFound):
            c.download_file(job["id"], "nope.json", tmp_path)


class _Servers:
    """A scripted API that redirects the artifact to a second server (another origin: object
    storage with a presigned URL), which serves ``data`` with Range; both record what they got."""

    def __init__(self, data: bytes, store_failures: int = 0) -> None:
        self.data, self.store_failures = data, store_failures
        self.api_requests: list[tuple[str, str, dict[str, str]]] = []
        self.store_requests: list[tuple[str, dict[str, str]]] = []
        sha = hashlib.sha256(data).hexdigest()
        outer = self
        self.job = {
            "id": "job-1",
            "status": "succeeded",
            "created_at": "2026-01-01T00:00:00Z",
            "artifact": {"size_bytes": len(data), "sha256": sha, "filename": "model.zip"},
        }

        class Api(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.api_requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/v1/jobs/job-1":
                    raw = json.dumps(outer.job).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                self.send_response(307)
                self.send_header("Location", f"{outer.store_url}/bucket/model.zip?X-Amz-Signature=abc")
                self.send_header("ETag", f'"{sha}"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Store(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.store_requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                if outer.store_failures:
                    outer.store_failures -= 1
                    self.send_response(403)  # an expired presigned URL
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                m = re.match(r"bytes=(\d+)-$", self.headers.get("range", ""))
                if m:
                    start = int(m.group(1))
                body = outer.data[start:]
                self.send_response(206 if m else 200)
                self.send_header("ETag", '"an-md5-not-the-sha"')
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.data) - 1}/{len(outer.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.api = ThreadingHTTPServer(("127.0.0.1", 0), Api)
        self.store = ThreadingHTTPServer(("127.0.0.1", 0), Store)
        self.api_url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.store_url = f"http://127.0.0.1:{self.store.server_address[1]}"

    def __enter__(self) -> _Servers:
        for s in (self.api, self.store):
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in (self.api, self.store):
            s.shutdown()
            s.server_close()


def test_sdk_follows_a_presigned_redirect(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    sha = hashlib.sha256(data).hexdigest()
    with _Servers(data, store_failures=1) as srv, Client(srv.api_url, "secret-key", backoff_base=0.01) as c:
        dest = tmp_path / "model.zip"
        Path(f"{dest}.part").write_bytes(data[:5000])
        Path(f"{dest}.part.etag").write_text(f'"{sha}"')
        got = c.download("job-1", dest)
        assert got.sha256 == sha and got.resumed_from == 5000 and dest.read_bytes() == data
    artifact = [(p, h) for m, p, h in srv.api_requests if p.endswith("/artifact")]
    # The API is asked with Range + If-Range; after the store's 403 (an expired URL) it is asked again.
    assert len(artifact) == 2 and all(h.get("if-range") == f'"{sha}"' for _, h in artifact)
    assert all(h.get("range") == "bytes=5000-" and h.get("authorization") == "Bearer secret-key" for _, h in artifact)
    # The store gets the Range, never the API key nor an If-Range (its ETag is not the sha256).
    assert [p for p, _ in srv.store_requests] == ["/bucket/model.zip?X-Amz-Signature=abc"] * 2
    for _, h in srv.store_requests:
        assert h.get("range") == "bytes=5000-" and "authorization" not in h and "if-range" not in h


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str, SeaweedS3]]:
    """An embedded service whose storage is a real S3 server (SeaweedFS), downloads redirected."""
    root = tmp_path_factory.mktemp("s3dl")
    s3 = SeaweedS3(root / "seaweed").start()
    (root / "data").mkdir()
    svc = Service(
        {
            "AWS_CONFIG_FILE": str(root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "MODELPRESS_MODE": "embedded",
            "MODELPRESS_DATA_DIR": str(root / "data"),
            "MODELPRESS_STORAGE_URL": f"s3://{s3.bucket}/dl",
            "MODELPRESS_STORAGE_PRESIGN_DOWNLOADS": "true",
            "MODELPRESS_STORAGE_PRESIGN_EXPIRY_S": "600",
            **s3.settings_env(),
        },
        root / "data",
        worker=False,
    )
    try:
        svc.start()
        yield svc, (root / "data" / "api-key").read_text().strip(), s3
    finally:
        svc.stop()
        s3.stop()


def test_s3_redirect_to_a_presigned_url(s3_stack, tiny: dict[str, Path], tmp_path: Path) -> None:
    svc, key, s3 = s3_stack
    c = svc.client(key)
    m = upload_dir(c, tiny["gpt2"])
    assert m.status_code == 201, m.text
    job = _run(c, m.json()["id"], {"method": "quantize.cast", "params": {"dtype": "bfloat16"}})
    sha, url = job["artifact"]["sha256"], f"/v1/jobs/{job['id']}/artifact"

    r = c.get(url)
    assert r.status_code == 307 and r.headers["etag"] == f'"{sha}"' and _digest(r) == sha
    location = r.headers["location"]
    assert location.startswith(s3.endpoint) and "Signature" in location
    data = httpx.get(location, timeout=60).content  # no credentials: the URL carries them
    assert hashlib.sha256(data).hexdigest() == sha
    # HEAD and 304 are the API's own; a file of the zip is served by the API from S3.
    head = c.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and _digest(head) == sha
    assert c.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    z = zipfile.ZipFile(io.BytesIO(data))
    weights = next(n for n in z.namelist() if n.endswith(".safetensors"))
    for name in ("config.json", weights):
        assert c.get(f"{url}/files/{name}").content == z.read(name), name
    part = c.get(f"{url}/files/{weights}", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == z.read(weights)[100:200]

    # The SDK follows the redirect, and resumes through it.
    with Client(svc.url, key) as sdk:
        dest = tmp_path / "model.zip"
        Path(f"{dest}.part").write_bytes(data[:1000])
        Path(f"{dest}.part.etag").write_text(f'"{sha}"')
        got = sdk.download(job["id"], dest)
        assert got.resumed_from == 1000 and got.sha256 == sha and dest.read_bytes() == data
