"""API behaviour against the running cluster stack: refusals, auth and tenants, job validation,
cancel, failing methods, problem+json errors, health."""

from __future__ import annotations

import json
import pickle
import struct
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import pytest

from tests.helpers import query, safetensors_bytes, stored_files, table_rows, upload_dir, wait_job

pytestmark = pytest.mark.integration


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/modelpress-canary", "w"))


class _Nested:
    """A pickle whose payload unpickles the evil one: refused by its first bytes all the same."""

    def __reduce__(self):
        return (pickle.loads, (pickle.dumps(_Evil()),))


def _tar_bytes() -> bytes:
    """A tar archive whose member would escape the folder it is unpacked in."""
    buf = BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"owned"
        info = tarfile.TarInfo("../../tmp/modelpress-canary")
        info.size = len(data)
        tf.addfile(info, BytesIO(data))
    return buf.getvalue()


SEVEN_ZIP = b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\0" * 24


def _zip_bytes() -> bytes:
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.safetensors", b"x")
    return buf.getvalue()


def _good_header() -> tuple[dict, bytes]:
    return {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16


def _refusals(tiny):
    cfg = (tiny["gpt2"] / "config.json").read_bytes()
    weights = (tiny["gpt2"] / "model.safetensors").read_bytes()
    auto_map = json.loads(cfg)
    auto_map["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    h, d = _good_header()
    overlap = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    return {
        "pickle_bin": ([("pytorch_model.bin", pickle.dumps(_Evil()))], "pickle_refused"),
        "pickle_named_safetensors": ([("model.safetensors", pickle.dumps(_Evil()))], "pickle_refused"),
        "pickle_protocol0_named_safetensors": (
            [("model.safetensors", pickle.dumps(_Evil(), protocol=0))],
            "invalid_safetensors",
        ),
        "nested_pickle_named_safetensors": ([("model.safetensors", pickle.dumps(_Nested()))], "pickle_refused"),
        **{
            f"pickle_protocol{p}_named_bin": ([("weights.bin", pickle.dumps(_Evil(), protocol=p))], "pickle_refused")
            for p in range(6)
        },
        "pickle_protocol0_named_config": (
            [("config.json", pickle.dumps(_Evil(), protocol=0)), ("model.safetensors", weights)],
            "invalid_json",
        ),
        "pt_file": ([("model.pt", b"anything")], "pickle_refused"),
        "ckpt_file": ([("weights.ckpt", b"anything")], "pickle_refused"),
        "zip_archive": ([("model.zip", _zip_bytes())], "archive_refused"),
        "zip_named_safetensors": ([("model.safetensors", _zip_bytes())], "archive_refused"),
        "tar_archive": ([("model.tar", b"\0" * 1024)], "archive_refused"),
        "tar_dotdot": ([("model.tar", _tar_bytes())], "archive_refused"),
        "tar_dotdot_named_safetensors": ([("model.safetensors", _tar_bytes())], "archive_refused"),
        "7z_archive": ([("model.7z", SEVEN_ZIP)], "archive_refused"),
        "7z_named_safetensors": ([("model.safetensors", SEVEN_ZIP)], "archive_refused"),
        "auto_map": (
            [("config.json", json.dumps(auto_map).encode()), ("model.safetensors", weights)],
            "remote_code_refused",
        ),
        "offsets_past_end": (
            [
                (
                    "w.safetensors",
                    safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                )
            ],
            "invalid_safetensors",
        ),
        "overlapping_ranges": ([("w.safetensors", safetensors_bytes(overlap, b"\0" * 12))], "invalid_safetensors"),
        "header_past_end": ([("w.safetensors", safetensors_bytes(h, d, header_len=10_000))], "invalid_safetensors"),
        "huge_header_declared": (
            [("w.safetensors", struct.pack("<Q", 200 * 1024 * 1024) + b"{}")],
            "invalid_safetensors",
        ),
        "unknown_dtype": (
            [
                (
                    "w.safetensors",
                    safetensors_bytes({"a": {"dtype": "F4X", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
                )
            ],
            "invalid_safetensors",
        ),
        "absurd_shape": (
            [
                (
                    "w.safetensors",
                    safetensors_bytes(
                        {"a": {"dtype": "F32", "shape": [2**39, 2**39], "data_offsets": [0, 4]}}, b"\0" * 4
                    ),
                )
            ],
            "invalid_safetensors",
        ),
        "truncated": ([("w.safetensors", safetensors_bytes(h, d)[:-5])], "invalid_safetensors"),
        "empty": ([("w.safetensors", b"")], "invalid_safetensors"),
        "config_not_json": ([("config.json", b"\x80\x04not json"), ("model.safetensors", weights)], "pickle_refused"),
        "config_bad_json": ([("config.json", b"{nope"), ("model.safetensors", weights)], "invalid_json"),
        "text_with_nul": (
            [("config.json", cfg), ("model.safetensors", weights), ("vocab.txt", b"a\0b")],
            "invalid_text",
        ),
        "path_in_name": ([("../evil.safetensors", safetensors_bytes(h, d))], "bad_filename"),
        "unsupported_type": ([("model.onnx", b"onnx")], "unsupported_file_type"),
        "hf_without_weights": ([("config.json", cfg)], "missing_weights"),
        "no_config": ([("model.safetensors", weights), ("tokenizer.json", b"{}")], "missing_config"),
        "shards_without_index": (
            [("config.json", cfg), ("model-00001-of-00001.safetensors", weights)],
            "missing_index",
        ),
    }


def test_every_refusal_is_a_4xx_that_leaves_nothing(cluster, tiny):
    c = cluster.client()
    canary = Path("/tmp/modelpress-canary")
    canary.unlink(missing_ok=True)
    rows_before, files_before = table_rows(cluster, "models"), set(stored_files(cluster))
    for case, (files, code) in _refusals(tiny).items():
        r = c.post("/v1/models", files=[("files", (n, b)) for n, b in files])
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json", case
        body = r.json()
        assert body["code"] == code, (case, body)
        assert body["status"] == r.status_code and body["detail"] and body["title"] and body["type"]
    assert not canary.exists(), "a pickle payload ran"
    assert table_rows(cluster, "models") == rows_before
    assert set(stored_files(cluster)) == files_before


def test_upload_over_the_size_limit_is_413_and_leaves_nothing(cluster):
    c = cluster.client()
    rows_before, files_before = table_rows(cluster, "models"), set(stored_files(cluster))
    big = 25 * 1024 * 1024  # the cluster stack's limit is 24 MiB
    h = {"a": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]}}
    r = c.post("/v1/models", files=[("files", ("w.safetensors", safetensors_bytes(h, b"\0" * big)))])
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert table_rows(cluster, "models") == rows_before
    assert set(stored_files(cluster)) == files_before


def test_wrong_content_type_is_415(cluster):
    c = cluster.client()
    rows_before, files_before = table_rows(cluster, "models"), set(stored_files(cluster))
    for route in ("/v1/models", "/v1/datasets"):
        for ctype, body in [
            ("application/octet-stream", pickle.dumps(_Evil())),
            ("text/plain", b"hello"),
            ("application/x-www-form-urlencoded", b"files=x"),
        ]:
            r = c.post(route, content=body, headers={"Content-Type": ctype})
            assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", (route, ctype, r.text)
        # JSON is the other form of these routes (files of finished uploads, /v1/uploads): checked as such.
        for body in ({}, {"files": []}):
            r = c.post(route, json=body)
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "files"], (route, body, r.text)
    # JSON where a job spec's JSON belongs, in another form: refused, not guessed at.
    r = c.post("/v1/jobs", content=b"model_id=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/problem+json", r.text
    assert not Path("/tmp/modelpress-canary").exists()
    assert table_rows(cluster, "models") == rows_before and set(stored_files(cluster)) == files_before


def test_sharded_upload_is_accepted(cluster, tiny, tmp_path):
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel.from_pretrained(tiny["gpt2"])
    m.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    r = upload_dir(cluster.client(), tmp_path / "sharded")
    assert r.status_code == 201, r.text
    assert r.json()["parameters"] == sum(p.numel() for p in m.state_dict().values()) - m.lm_head.weight.numel()


def test_auth_is_required(cluster):
    for key in (None, "mp_nope_nope", "garbage", cluster.key + "x"):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/jobs"), ("GET", "/v1/methods"), ("POST", "/v1/jobs")):
            r = cluster.service.client(key).request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 401, (key, path, r.status_code)
            assert r.json()["code"] == "unauthorized"
    assert cluster.service.client(None).get("/healthz").status_code == 200
    assert cluster.service.client(None).get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}


def test_other_tenants_see_404_exactly_like_missing_ids(cluster, tiny):
    a, b = cluster.client(), cluster.client(cluster.other_key)
    m = upload_dir(a, tiny["gpt2"]).json()
    job = wait_job(
        a,
        a.post(
            "/v1/jobs",
            json={"model_id": m["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}]},
        ).json()["id"],
    )
    for method, path in (
        ("GET", f"/v1/models/{m['id']}"),
        ("DELETE", f"/v1/models/{m['id']}"),
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/artifact"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
    ):
        theirs = b.request(method, path)
        missing = a.request(method, path.replace(m["id"], "0" * 36).replace(job["id"], "0" * 36))
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
        assert theirs.json()["code"] == missing.json()["code"] == "not_found"
    assert all(x["id"] != m["id"] for x in b.get("/v1/models").json()["items"])
    assert all(x["id"] != job["id"] for x in b.get("/v1/jobs").json()["items"])
    r = b.post(
        "/v1/jobs", json={"model_id": m["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}]}
    )
    assert r.status_code == 422 and r.json()["code"] == "unknown_model"
    assert a.get(f"/v1/models/{m['id']}").status_code == 200


def test_job_spec_is_validated_at_submit(cluster, tiny):
    c = cluster.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    cases = [
        ([{"method": "prune.nope"}], ["body", "steps", 0, "method"]),
        ([{"method": "prune.magnitude", "params": {"sparsity": 1.5}}], ["body", "steps", 0, "params", "sparsity"]),
        (
            [{"method": "prune.magnitude", "params": {"sparsity": 0.5, "bogus": 1}}],
            ["body", "steps", 0, "params", "bogus"],
        ),
        (
            [{"method": "quantize.cast", "params": {}}, {"method": "quantize.cast", "params": {"dtype": "int3"}}],
            ["body", "steps", 0, "params", "dtype"],
        ),
        ([{"method": "prune.magnitude", "params": {}}], ["body", "steps", 0, "params"]),
        ([], ["body", "steps"]),
    ]
    jobs_before = table_rows(cluster, "jobs")
    for steps, loc in cases:
        r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": steps})
        assert r.status_code == 422, r.text
        body = r.json()
        assert r.headers["content-type"] == "application/problem+json"
        assert any(e["loc"] == loc for e in body["errors"]), (loc, body["errors"])
    assert table_rows(cluster, "jobs") == jobs_before


def test_methods_are_listed_with_schemas(cluster):
    methods = {m["name"]: m for m in cluster.client().get("/v1/methods").json()}
    assert {"prune.magnitude", "quantize.cast"} <= set(methods)
    schema = methods["prune.magnitude"]["params_schema"]
    assert {"sparsity", "threshold", "scope"} <= set(schema["properties"])
    assert schema.get("additionalProperties") is False
    assert methods["quantize.cast"]["params_schema"]["properties"]["dtype"]["enum"] == ["float16", "bfloat16"]


def test_failing_method_fails_the_job_and_the_worker_survives(cluster, tiny):
    c = cluster.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    bad = c.post(
        "/v1/jobs",
        json={
            "model_id": m["id"],
            "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5, "targets": ["no.such.module*"]}}],
        },
    ).json()
    job = wait_job(c, bad["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "method_failed"
    assert "no target weights matched" in job["error"]["message"]
    assert job["artifact"] is None and job["metrics"] is None
    assert c.get(f"/v1/jobs/{job['id']}/artifact").status_code == 409
    ok = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={"model_id": m["id"], "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]},
        ).json()["id"],
    )
    assert ok["status"] == "succeeded"


def test_cancel_queued_job_is_immediate(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = c.post(
        "/v1/jobs", json={"model_id": m["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}]}
    ).json()
    assert c.get(f"/v1/jobs/{job['id']}/artifact").status_code == 409
    # The job read's ETag (PostgreSQL: the hot read): 304 while the job is as it was, a new one once
    # it has changed.
    first = c.get(f"/v1/jobs/{job['id']}")
    etag = first.headers["etag"]
    same = c.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert (same.status_code, same.content, same.headers["etag"]) == (304, b"", etag)
    r = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled" and r.json()["finished_at"]
    changed = c.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "canceled" and changed.headers["etag"] != etag
    again = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "job_finished"
    # The stack is shared (tests/test_gpu_queue.py cancels jobs in it too): this job is listed under
    # "canceled", not under any other status, and the filter lists nothing else.
    canceled = c.get("/v1/jobs", params={"status": "canceled"}).json()["items"]
    assert job["id"] in [j["id"] for j in canceled] and {j["status"] for j in canceled} == {"canceled"}
    assert job["id"] not in [j["id"] for j in c.get("/v1/jobs", params={"status": "queued"}).json()["items"]]


def test_cancel_running_job_stops_at_a_step_boundary(cluster, tiny):
    c = cluster.client()
    m = upload_dir(c, tiny["gpt2-big"]).json()
    # 32 steps over ~5M weights take seconds; the cancel lands within milliseconds of "running".
    steps = [{"method": "prune.magnitude", "params": {"sparsity": round(0.02 * (i + 1), 2)}} for i in range(32)]
    r = c.post("/v1/jobs", json={"model_id": m["id"], "steps": steps})
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cur = c.get(f"/v1/jobs/{job['id']}").json()
        if cur["status"] == "running":
            break
        assert cur["status"] == "queued", cur
        time.sleep(0.02)
    assert cur["status"] == "running", cur
    r = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = wait_job(c, job["id"])
    assert done["status"] == "canceled", done
    assert done["artifact"] is None and done["progress"]["stage"] == "canceled"
    assert c.get(f"/v1/jobs/{job['id']}/artifact").status_code == 409


def test_model_delete(cluster, tiny):
    c = cluster.client()
    m = upload_dir(c, tiny["bert"]).json()
    prefix = cluster.data_dir / "storage" / "models" / m["id"]
    assert prefix.is_dir()
    etag = c.get(f"/v1/models/{m['id']}").headers["etag"]
    assert c.get(f"/v1/models/{m['id']}", headers={"If-None-Match": etag}).status_code == 304
    assert c.delete(f"/v1/models/{m['id']}").status_code == 204
    assert c.get(f"/v1/models/{m['id']}", headers={"If-None-Match": etag}).status_code == 404
    assert not prefix.exists()


def test_job_delete(cluster, tiny):
    c, other = cluster.client(), cluster.client(cluster.other_key)
    m = upload_dir(c, tiny["gpt2-big"]).json()
    # 32 steps over ~5M weights take seconds: the delete finds the job queued or running.
    steps = [{"method": "prune.magnitude", "params": {"sparsity": round(0.02 * (i + 1), 2)}} for i in range(32)]
    busy = c.post("/v1/jobs", json={"model_id": m["id"], "steps": steps}).json()
    r = c.delete(f"/v1/jobs/{busy['id']}")
    assert r.status_code == 409 and r.json()["code"] == "job_not_finished", r.text
    assert c.post(f"/v1/jobs/{busy['id']}/cancel").status_code == 200
    assert wait_job(c, busy["id"])["status"] == "canceled"
    assert c.delete(f"/v1/jobs/{busy['id']}").status_code == 204

    job = c.post("/v1/jobs", json={"model_id": m["id"], "steps": steps[:1]}).json()
    assert wait_job(c, job["id"])["status"] == "succeeded"
    artifacts = cluster.data_dir / "storage" / "artifacts" / job["id"]
    assert any(p.is_file() for p in artifacts.rglob("*"))
    assert other.delete(f"/v1/jobs/{job['id']}").status_code == 404  # another tenant's: not found
    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert c.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert c.get(f"/v1/jobs/{job['id']}/events").status_code == 404
    assert not artifacts.exists()
    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 404


def test_job_list_pages_by_cursor(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    m = upload_dir(c, tiny["bert"]).json()
    ids = [
        c.post(
            "/v1/jobs",
            json={"model_id": m["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}]},
        ).json()["id"]
        for _ in range(5)
    ]
    seen, cursor = [], None
    while True:
        page = c.get(
            "/v1/jobs", params={"limit": 2, "status": "queued", **({"cursor": cursor} if cursor else {})}
        ).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    # The same pages by their Link headers (relative here: no public base URL), to the last one.
    seen, url = [], "/v1/jobs?status=queued&limit=2"
    while url:
        r = c.get(url)
        seen += [j["id"] for j in r.json()["items"]]
        assert r.links["first"]["url"] == "/v1/jobs?status=queued&limit=2", r.headers["link"]
        url = r.links.get("next", {}).get("url")
        assert (url is None) == (r.json()["next_cursor"] is None)
    assert seen == list(reversed(ids))
    assert c.get("/v1/jobs", params={"cursor": "!!"}).status_code == 422


def test_unknown_route_and_bad_json_are_problems(cluster):
    c = cluster.client()
    r = c.get("/v1/nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = c.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Traceback" not in r.text


def test_job_get_authenticates_exactly_like_dependency_routes(cluster, tiny):
    """GET /v1/jobs/{id} is an app.routing.DirectRoute: it parses Authorization by hand instead of
    through the HTTPBearer dependency every other route uses. Same header, same answer."""
    c = cluster.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={"model_id": m["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}]},
        ).json()["id"],
    )
    headers = [
        None,
        "",
        "Bearer",
        f"Basic {cluster.key}",
        f"Token {cluster.key}",
        cluster.key,
        "Bearer mp_nope_nope",
        f"Bearer {cluster.key}x",
        f"bearer {cluster.key}",
        f"BEARER {cluster.key}",
        f"Bearer  {cluster.key}",
        f"Bearer {cluster.key}",
        f"Bearer {cluster.other_key}",
    ]
    with httpx.Client(base_url=cluster.service.url, timeout=60) as raw:
        for h in headers:
            hdr = {} if h is None else {"Authorization": h}
            direct = raw.get(f"/v1/jobs/{job['id']}", headers=hdr)
            via_dependency = raw.get(f"/v1/models/{m['id']}", headers=hdr)
            if via_dependency.status_code == 401:
                assert direct.status_code == 401, (h, direct.text)
                assert direct.json() == via_dependency.json(), h
                assert direct.headers.get("www-authenticate") == via_dependency.headers.get("www-authenticate")
            else:  # the owner sees both; the other tenant neither (404)
                assert direct.status_code == via_dependency.status_code, (
                    h,
                    direct.status_code,
                    via_dependency.status_code,
                )
    assert c.get(f"/v1/jobs/{job['id']}").json() == next(
        j for j in c.get("/v1/jobs").json()["items"] if j["id"] == job["id"]
    )


def test_job_get_survives_its_database_connections_being_killed(cluster, tiny):
    """The job GET reads through its own asyncpg pool (core.db.HotRead). Connections the server
    drops (a restart, a failover, an idle-connection killer) are replaced: no request fails."""
    c = cluster.client()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={"model_id": m["id"], "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}]},
        ).json()["id"],
    )
    from core.db import HOT_APPLICATION_NAME

    url = f"/v1/jobs/{job['id']}"
    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            # several requests at once: several pooled connections
            assert {r.status_code for r in pool.map(lambda _: c.get(url), range(16))} == {200}
            killed = query(
                cluster,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                "AND datname = current_database()",
                HOT_APPLICATION_NAME,
            )
            assert killed and all(ok for (ok,) in killed), killed
            # at once: some connections are caught with the server's FATAL read but not yet closed
            after = list(pool.map(lambda _: c.get(url), range(8)))
            assert [r.status_code for r in after] == [200] * 8, [r.text for r in after if r.status_code != 200]
            assert all(r.json()["id"] == job["id"] for r in after)
    assert c.get("/v1/jobs/" + "0" * 36).json()["code"] == "not_found"
    r = c.get("/v1/jobs/bad\x00id".replace("\x00", "%00"))
    assert r.status_code == 422, r.text
