"""Imports by reference (POST /v1/models/import, docs/IMPORTS.md) against a real S3 server
(SeaweedFS) and a real API on PostgreSQL: an S3 prefix (a tiny HF folder) and one object import to
the same files and digests as an upload of the same bytes; a bucket not allowed is 403; a bad
object fails with the upload's 422 body and leaves no file; an http file imports through the SSRF
guard (loopback allowed here by ``webhook_allow_networks``) while private addresses, directly or
by redirect, are refused; a job on an importing or failed model is 409; an import whose lease ran
out (its process died) is taken over, one that died too often is failed; nothing stays in staging.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import REDIS_URL, Service, upload_dir
from tests.servers import SeaweedS3, private_database

# Every test needs the servers (integration) but the in-process one of the request-time rules (unit).
integration = pytest.mark.integration

NO_EVAL = {"enabled": False}
CAST = [{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}]
GARBAGE = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64


class _Files(BaseHTTPRequestHandler):
    """/files/<name>: a file; /slow/<name>: half of it, the rest once ``gate`` is set;
    /to-private, /to-file: redirects."""

    files: dict[str, bytes] = {}
    gate = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        kind, _, name = self.path.lstrip("/").partition("?")[0].partition("/")
        if kind == "to-private":
            self._redirect("http://169.254.169.254/latest/weights.safetensors")
            return
        if kind == "to-file":
            self._redirect(f"/files/{name}")
            return
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "slow":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.gate.wait(60)
            self.wfile.write(data[len(data) // 2 :])
        else:
            self.wfile.write(data)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _tiny_models(root: Path) -> dict[str, Path]:
    """A one-layer GPT-2 as save_pretrained lays it out, and a bare state dict, built with numpy
    (torch and transformers would cost this module seconds it does not have)."""
    from safetensors.numpy import save_file

    d, vocab, pos = 16, 100, 32
    layer = {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d),
        "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, 4 * d),
        "mlp.c_fc.bias": (4 * d,),
        "mlp.c_proj.weight": (4 * d, d),
        "mlp.c_proj.bias": (d,),
    }
    shapes = {
        "transformer.wte.weight": (vocab, d),
        "transformer.wpe.weight": (pos, d),
        **{f"transformer.h.0.{k}": v for k, v in layer.items()},
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    gpt2 = root / "gpt2"
    gpt2.mkdir(parents=True)
    save_file(_tensors(shapes, 0), str(gpt2 / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": d,
        "n_head": 2,
        "n_layer": 1,
        "n_positions": pos,
        "vocab_size": vocab,
        "torch_dtype": "float32",
    }
    (gpt2 / "config.json").write_text(json.dumps(config, indent=2))
    (gpt2 / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    bare = root / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    save_file(_tensors({"embed.weight": (100, 16), "layer.0.weight": (16, 16), "layer.0.bias": (16,)}, 1), str(bare))
    return {"gpt2": gpt2, "bare": bare}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def http_files(tiny: dict[str, Path]) -> Iterator[str]:
    _Files.files = {"weights.safetensors": tiny["bare"].read_bytes(), "big.safetensors": tiny["bare"].read_bytes()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Files.gate.set()
        server.shutdown()


def _fill(server: SeaweedS3, tiny: dict[str, Path]) -> None:
    fs = server.fs()
    for p in sorted(tiny["gpt2"].iterdir()):
        fs.put_file(str(p), f"{server.bucket}/src/gpt2/{p.name}")
    fs.put_file(str(tiny["gpt2"] / "config.json"), f"{server.bucket}/src/gpt2/sub/ignored.json")
    fs.put_file(str(tiny["bare"]), f"{server.bucket}/src/bare/weights.safetensors")
    fs.pipe(f"{server.bucket}/src/bad/garbage.safetensors", GARBAGE)
    fs.pipe(f"{server.bucket}/src/bad/model.bin", b"\x80\x04pickled")
    # A second bucket, empty (the server's 5 volumes go to the first one's collection): the 403
    # comes before any S3 request.
    fs.mkdir("secret")


class _Started(threading.Thread):
    """``start()`` a server in a thread while the test sets up the rest; ``get()`` joins it."""

    def __init__(self, fn: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # noqa: BLE001 - raised by get()
            self.error = e

    def get(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def _embedded(data: Path) -> Service:
    """The embedded mode (SQLite), without its worker subprocess."""
    env = {
        "MODELPRESS_MODE": "embedded",
        "MODELPRESS_DATA_DIR": str(data),
        "MODELPRESS_EMBEDDED_WORKER": "false",
        "MODELPRESS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
        "MODELPRESS_IMPORT_LEASE_S": "3",
    }
    return Service(env, data, worker=False)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """A real S3 server and an embedded API (SQLite), each started meanwhile in a thread, and an
    API on PostgreSQL, a database of its own (its short import lease takes over what it finds
    there); no worker (jobs stay queued: accepted is what these tests need). Tenant ``a`` may
    import from the bucket, tenant ``b`` from nothing."""
    root = tmp_path_factory.mktemp("imports")
    s3 = SeaweedS3(root / "seaweed")
    emb = _embedded(root / "embedded")
    (root / "embedded").mkdir()
    started = [_Started(lambda: _fill(s3.start(), tiny)), _Started(emb.start)]
    for t in started:
        t.start()
    a, b = f"imp-a-{uuid.uuid4().hex[:6]}", f"imp-b-{uuid.uuid4().hex[:6]}"
    try:
        with private_database() as db:
            svc = Service(
                {
                    "AWS_CONFIG_FILE": str(root / "no-aws-config"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
                    "AWS_EC2_METADATA_DISABLED": "true",
                    "MODELPRESS_MODE": "cluster",
                    "MODELPRESS_DATABASE_URL": db,
                    "MODELPRESS_BROKER_URL": REDIS_URL,
                    "MODELPRESS_BROKER_KEY_PREFIX": f"mptest-imp-{uuid.uuid4().hex[:8]}:",
                    "MODELPRESS_DATA_DIR": str(root / "data"),
                    "MODELPRESS_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
                    "MODELPRESS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
                    "MODELPRESS_IMPORT_S3_BUCKETS": json.dumps({a: [s3.bucket]}),
                    "MODELPRESS_IMPORT_LEASE_S": "3",
                    **s3.settings_env(),
                },
                root,
                worker=False,
            )
            try:
                svc.cli("migrate")
                key_a = svc.cli("keys", "create", "--tenant", a, "--admin")
                svc.start()
                with svc.client(key_a) as admin:
                    key_b = admin.post("/v1/keys", json={"tenant": b}).json()["key"]
                for t in started:
                    t.get()
                emb_key = (root / "embedded" / "api-key").read_text().strip()
                with svc.client(key_a) as ca, svc.client(key_b) as cb, emb.client(emb_key) as ce:
                    yield {
                        "svc": svc,
                        "a": ca,
                        "b": cb,
                        "db": db,
                        "root": root / "data",
                        "log": root / "api.log",
                        "embedded": {
                            "c": ce,
                            "db": root / "embedded" / "modelpress.sqlite3",
                            "root": root / "embedded",
                        },
                    }
            finally:
                svc.stop()
    finally:
        for t in started:
            t.join()
        emb.stop()
        s3.stop()


def _sql(db: str, stmt: str, *args: object) -> list[tuple]:
    with psycopg.connect(db.replace("postgresql+psycopg://", "postgresql://")) as conn:
        cur = conn.execute(stmt, args)
        return cur.fetchall() if cur.description else []


def _import(c: httpx.Client, source: str, **extra: Any) -> httpx.Response:
    return c.post("/v1/models/import", json={"source": source, **extra})


def _wait(c: httpx.Client, model_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = c.get(f"/v1/models/{model_id}").json()
        if m["status"] != "importing":
            return m
        time.sleep(0.1)
    raise AssertionError(f"model {model_id} still importing: {m}")


def _stored(api: dict[str, Any], model_id: str) -> list[Path]:
    folder = api["root"] / "storage" / "models" / model_id
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


_SAME = ("format", "architecture", "parameters", "size_bytes", "sha256", "files")


@integration
def test_s3_prefix_imports_the_same_model_as_an_upload(api: dict[str, Any], tiny: dict[str, Path]) -> None:
    a = api["a"]
    r = _import(a, "s3://modelpress/src/gpt2/")
    assert r.status_code == 202, r.text
    m = r.json()
    assert r.headers["location"] == f"/v1/models/{m['id']}"
    assert m["status"] == "importing" and m["source"] == "s3://modelpress/src/gpt2/" and m["name"] == "gpt2"
    assert set(m["progress"]) == {"bytes_done", "bytes_total", "files_done", "files_total"} and m["error"] is None

    done = _wait(a, m["id"])
    assert done["status"] == "ready" and done["error"] is None, done
    up = upload_dir(a, tiny["gpt2"]).json()
    assert up["status"] == "ready" and up["source"] is None and up["progress"] is None
    assert {k: done[k] for k in _SAME} == {k: up[k] for k in _SAME}  # the sub-folder's object is not imported
    total = sum(p.stat().st_size for p in tiny["gpt2"].iterdir())
    assert done["progress"] == {"bytes_done": total, "bytes_total": total, "files_done": 3, "files_total": 3}
    stored = _stored(api, m["id"])
    assert len(stored) == 3 and len({p.parent for p in stored}) == 1 and stored[0].parent.name.startswith("import-")
    for p in stored:
        assert (
            hashlib.sha256(p.read_bytes()).hexdigest()
            == hashlib.sha256((tiny["gpt2"] / p.name).read_bytes()).hexdigest()
        )

    job = a.post("/v1/jobs", json={"model_id": m["id"], "steps": CAST, "evaluation": NO_EVAL})
    assert job.status_code == 202, job.text
    # Replayed with the same Idempotency-Key: the same model, no second import.
    h = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = a.post("/v1/models/import", json={"source": "s3://modelpress/src/gpt2/", "name": "again"}, headers=h)
    again = a.post("/v1/models/import", json={"source": "s3://modelpress/src/gpt2/", "name": "again"}, headers=h)
    assert first.status_code == again.status_code == 202 and again.headers["idempotency-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert _wait(a, first.json()["id"])["status"] == "ready"


@integration
def test_one_s3_object(api: dict[str, Any], tiny: dict[str, Path]) -> None:
    a = api["a"]
    r = _import(a, "s3://modelpress/src/bare/weights.safetensors")
    assert r.status_code == 202, r.text
    assert r.json()["name"] == "weights" and r.json()["format"] == "safetensors"
    done = _wait(a, r.json()["id"])
    assert done["status"] == "ready", done
    assert done["sha256"] == hashlib.sha256(tiny["bare"].read_bytes()).hexdigest() and done["parameters"] > 0
    assert [f["name"] for f in done["files"]] == ["weights.safetensors"]


@integration
def test_buckets_not_allowed_are_403(api: dict[str, Any]) -> None:
    a, b = api["a"], api["b"]
    for c, source in (
        (a, "s3://secret/src/weights.safetensors"),
        (a, "s3://secret/"),
        (b, "s3://modelpress/src/gpt2/"),
    ):
        r = _import(c, source)
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "import_bucket_forbidden"
    assert b.get("/v1/models").json()["items"] == []  # nothing recorded
    for bad in ("s3://", "s3://Bad_Bucket!/x", "ftp://host/x.safetensors", "https://host/", "https://u:p@host/x"):
        r = _import(a, bad)
        assert r.status_code == 422 and r.json()["code"] == "invalid_import_source", (bad, r.text)


@integration
def test_a_bad_object_fails_with_the_upload_s_error_and_leaves_nothing(api: dict[str, Any]) -> None:
    a = api["a"]
    for source, name in (
        ("s3://modelpress/src/bad/garbage.safetensors", "garbage.safetensors"),
        ("s3://modelpress/src/bad/model.bin", "model.bin"),
        ("s3://modelpress/src/bad/", None),
    ):
        r = _import(a, source)
        assert r.status_code == 202, r.text
        failed = _wait(a, r.json()["id"])
        assert failed["status"] == "failed", failed
        if name is not None:
            data = GARBAGE if name.endswith(".safetensors") else b"\x80\x04pickled"
            up = a.post("/v1/models", files=[("files", (name, data))])
            assert up.status_code == 422
            assert failed["error"] == up.json(), (failed["error"], up.text)
        else:  # a folder: the names are checked before any byte is fetched, as an upload's
            assert failed["error"]["code"] == "pickle_refused" and failed["error"]["status"] == 422
        assert _stored(api, failed["id"]) == []
        job = a.post("/v1/jobs", json={"model_id": failed["id"], "steps": CAST})
        assert job.status_code == 409 and job.json()["code"] == "model_not_ready", job.text
        assert a.delete(f"/v1/models/{failed['id']}").status_code == 204
    missing = _wait(a, _import(a, "s3://modelpress/src/nothing-here/").json()["id"])
    assert missing["status"] == "failed" and missing["error"]["code"] in (
        "import_source_not_found",
        "import_source_empty",
    )


@integration
def test_http_import_through_the_ssrf_guard(api: dict[str, Any], http_files: str, tiny: dict[str, Path]) -> None:
    a = api["a"]
    # A presigned-style URL: its query string is kept in `source`, never written to the log.
    source = f"{http_files}/files/weights.safetensors?X-Amz-Signature=s3cr3t-{uuid.uuid4().hex}"
    r = _import(a, source, name="from-http")
    assert r.status_code == 202, r.text
    done = _wait(a, r.json()["id"])
    assert done["status"] == "ready" and done["name"] == "from-http" and done["source"] == source, done
    assert "s3cr3t" not in api["log"].read_text()
    assert done["sha256"] == hashlib.sha256(tiny["bare"].read_bytes()).hexdigest()
    # Redirects are followed, each target checked again; the file keeps the URL's name.
    redirected = _wait(a, _import(a, f"{http_files}/to-file/weights.safetensors").json()["id"])
    assert redirected["status"] == "ready" and redirected["files"][0]["name"] == "weights.safetensors"
    to_private = _wait(a, _import(a, f"{http_files}/to-private/weights.safetensors").json()["id"])
    assert to_private["status"] == "failed" and to_private["error"]["code"] == "import_url_refused", to_private
    assert "169.254.169.254" in to_private["error"]["detail"]
    # Private, link-local and loopback addresses not in webhook_allow_networks: refused at once.
    for url in (
        "http://10.0.0.1/w.safetensors",
        "http://169.254.169.254/w.safetensors",
        "http://[::1]:1/w.safetensors",
    ):
        r = _import(a, url)
        assert r.status_code == 422 and r.json()["code"] == "import_url_refused", (url, r.text)
    missing = _wait(a, _import(a, f"{http_files}/files/nope.safetensors").json()["id"])
    assert missing["status"] == "failed" and missing["error"]["code"] == "import_source_not_found"


@integration
def test_a_job_on_an_importing_model_is_409_and_progress_shows(api: dict[str, Any], http_files: str) -> None:
    a = api["a"]
    _Files.gate.clear()
    try:
        m = _import(a, f"{http_files}/slow/big.safetensors").json()
        size = len(_Files.files["big.safetensors"])
        deadline = time.monotonic() + 15
        while (p := a.get(f"/v1/models/{m['id']}").json()["progress"])["bytes_done"] == 0:
            assert time.monotonic() < deadline, p
            time.sleep(0.1)
        assert p == {"bytes_done": size // 2, "bytes_total": size, "files_done": 0, "files_total": 1}
        job = a.post("/v1/jobs", json={"model_id": m["id"], "steps": CAST})
        assert job.status_code == 409 and job.json()["code"] == "model_not_ready", job.text
        assert a.get(f"/v1/models/{m['id']}").json()["status"] == "importing"
    finally:
        _Files.gate.set()
    assert _wait(a, m["id"])["status"] == "ready"


@integration
def test_an_expired_lease_is_taken_over(api: dict[str, Any]) -> None:
    """Rows as an API process killed mid-import leaves them: "importing", a lease in the past."""
    a, db = api["a"], api["db"]
    tenant = _sql(db, "SELECT tenant_id FROM models WHERE status = 'ready' LIMIT 1")[0][0]
    past = datetime.now(UTC) - timedelta(minutes=5)
    ids = {"dead-once": str(uuid.uuid4()), "dead-thrice": str(uuid.uuid4())}
    for name, model_id in ids.items():
        deaths = 2 if name == "dead-thrice" else 0
        progress = {"bytes_done": 7, "bytes_total": None, "files_done": 0, "files_total": None, "deaths": deaths}
        _sql(
            db,
            "INSERT INTO models (id, tenant_id, name, format, parameters, size_bytes, sha256, files, storage_prefix, "
            "created_at, status, source, progress, lease_expires_at) VALUES (%s, %s, %s, 'hf', 0, 0, '', '[]', %s, "
            "now(), 'importing', 's3://modelpress/src/gpt2/', %s, %s)",
            model_id,
            tenant,
            name,
            f"models/{model_id}",
            json.dumps(progress),
            past,
        )
    taken = _wait(a, ids["dead-once"], timeout=20)
    assert taken["status"] == "ready" and len(_stored(api, taken["id"])) == 3, taken
    dead = _wait(a, ids["dead-thrice"], timeout=20)
    assert dead["status"] == "failed" and dead["error"]["code"] == "too_many_attempts", dead
    assert _sql(db, "SELECT count(*) FROM models WHERE lease_expires_at IS NOT NULL")[0][0] == 0


@pytest.mark.unit
def test_https_can_be_switched_off_and_buckets_are_per_tenant() -> None:
    """The request-time rules, in-process: import_https=False is 403; the allow-list by tenant id,
    tenant name or "*"; never the service's own storage."""
    from app.auth import Caller
    from app.errors import Forbidden
    from app.imports import service
    from app.imports.schemas import ImportIn
    from core.config import Settings

    caller = Caller(tenant_id="t-1", tenant_name="acme")
    off = Settings(import_https=False)  # type: ignore[call-arg]
    with pytest.raises(Forbidden) as e:
        service.check_source(ImportIn(source="https://example.com/w.safetensors"), caller, off)
    assert e.value.code == "import_https_disabled"
    rules = Settings(  # type: ignore[call-arg]
        import_s3_buckets={"t-1": ["by-id"], "acme": ["by-name"], "*": ["shared", "store"]},
        storage_url="s3://store/artifacts",
    )
    assert service.allowed_buckets(caller, rules) == {"by-id", "by-name", "shared", "store"}
    for ok in ("s3://by-id/m/", "s3://by-name/m.safetensors", "s3://shared/x/", "s3://store/elsewhere/"):
        service.check_source(ImportIn(source=ok), caller, rules)
    for refused in ("s3://other/m/", "s3://store/artifacts/models/x/", "s3://store/", "s3://store/artifacts"):
        with pytest.raises(Forbidden):
            service.check_source(ImportIn(source=refused), caller, rules)


@integration
def test_nothing_is_left_in_staging(api: dict[str, Any]) -> None:
    tmp = api["root"] / "tmp"
    assert [p for p in tmp.rglob("*") if p.is_file()] == []
    assert not any(p.name.startswith("upload-") for p in tmp.rglob("*"))


@pytest.fixture(scope="module")
def embedded_api(api: dict[str, Any]) -> dict[str, Any]:
    return api["embedded"]


@integration
def test_embedded_mode_imports_and_takes_over(
    embedded_api: dict[str, Any], http_files: str, tiny: dict[str, Path]
) -> None:
    import sqlite3

    c, url = embedded_api["c"], f"{http_files}/files/weights.safetensors"
    done = _wait(c, _import(c, url).json()["id"])
    assert done["status"] == "ready" and done["sha256"] == hashlib.sha256(tiny["bare"].read_bytes()).hexdigest()
    assert _wait(c, _import(c, f"{http_files}/files/nope.safetensors").json()["id"])["status"] == "failed"
    # A row as a killed API process leaves it: taken over on SQLite too.
    model_id = str(uuid.uuid4())
    with sqlite3.connect(embedded_api["db"]) as conn:
        tenant = conn.execute("SELECT tenant_id FROM models LIMIT 1").fetchone()[0]
        past = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S.%f")
        conn.execute(
            "INSERT INTO models (id, tenant_id, name, format, parameters, size_bytes, sha256, files, storage_prefix, "
            "created_at, status, source, progress, lease_expires_at) VALUES (?, ?, 'dead', 'safetensors', 0, 0, '', "
            "'[]', ?, ?, 'importing', ?, '{}', ?)",
            (model_id, tenant, f"models/{model_id}", past, url, past),
        )
    taken = _wait(c, model_id, timeout=20)
    assert taken["status"] == "ready" and taken["sha256"] == done["sha256"], taken
    tmp = embedded_api["root"] / "tmp"
    assert [p for p in tmp.rglob("*") if p.is_file()] == []
