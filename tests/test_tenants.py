"""Tenant isolation, enumerated from the OpenAPI spec so a new route is covered without editing
this file: every route with an ``{id}`` answers 404 to another tenant's key, and no list route
shows another tenant's objects. A new kind of path parameter fails the test until it is mapped
in ``_ids`` below."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.helpers import upload_dir, wait_job

pytestmark = pytest.mark.integration

# Tenant-free by design (no tenant's objects in them), so not checked as tenant lists:
TENANT_FREE = {
    "/metrics",  # Prometheus, aggregated over all tenants; own token (MODELPRESS_METRICS_TOKEN)
    "/healthz",  # liveness probe, no auth
    "/readyz",  # readiness probe, no auth
    "/v1/methods",  # the installed compression methods: the same for everyone
    "/v1/recipes",  # the named recipes (static, with their benchmark figures): the same for everyone
    "/v1/workers",  # the registered workers (queues, devices): shared infrastructure
}
# Per-tenant values that are not lists (no ``items``): each tenant must get its own.
PER_TENANT = {
    "/v1/webhooks/secret",  # the tenant's webhook signing secret
}
# Routes that need no key by design: signed links. Without a valid signature they must be 404.
SIGNED = re.compile(r"/view$")

PARAM = re.compile(r"\{([^}]+)\}")
STEPS = [{"method": "quantize.cast", "params": {"dtype": "float16"}}]


def _spec(client: httpx.Client) -> dict[str, Any]:
    """The running service's spec: ``create_app().openapi()`` as served at /openapi.json (the same
    document, without building an app, and its settings, in the test process)."""
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    return r.json()


def _body(op: dict[str, Any]) -> dict[str, Any]:
    """A minimal request body: ``{}`` for JSON (the link routes' bodies are all optional fields);
    routes with an id take no multipart bodies today."""
    content = op.get("requestBody", {}).get("content", {})
    if not content:
        return {}
    if "application/offset+octet-stream" in content:  # a tus PATCH: a chunk at offset 0
        headers = {"Content-Type": "application/offset+octet-stream", "Tus-Resumable": "1.0.0", "Upload-Offset": "0"}
        return {"content": b"x", "headers": headers}
    assert "application/json" in content, f"no minimal body known for {list(content)}: extend _body"
    return {"json": {}}


def _all_items(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    """Every item of a list route, following ``next_cursor`` (or a top-level list)."""
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        r = client.get(path, params={"limit": 100, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, (path, r.status_code, r.text)
        body = r.json()
        if isinstance(body, list):
            return out + body
        assert "items" in body, f"{path}: a list route without `items`; teach _all_items its shape"
        out += body["items"]
        cursor = body.get("next_cursor")
        if not cursor:
            return out
    raise AssertionError(f"{path}: more than 1000 pages")


def test_other_tenant_gets_404_on_every_id_route_and_sees_nothing_in_lists(embedded, tiny, tmp_path):
    a, b = embedded.client(), embedded.client(embedded.other_key)
    anon = embedded.client(None)

    # Tenant A: one object of each kind; the job succeeds so its report, artifact and events exist.
    model = upload_dir(a, tiny["gpt2"])
    assert model.status_code == 201, model.text
    model_id = model.json()["id"]
    ds = a.post("/v1/datasets", files={"file": ("d.txt", b"hello world\nanother line\n")})
    assert ds.status_code == 201, ds.text
    dataset_id = ds.json()["id"]
    job = a.post("/v1/jobs", json={"model_id": model_id, "steps": STEPS})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    sweep = a.post(
        "/v1/sweeps",
        json={"model_id": model_id, "steps": STEPS, "vary": {"steps[0].params.dtype": ["float16", "bfloat16"]}},
    )
    assert sweep.status_code == 202, sweep.text
    sweep_id = sweep.json()["id"]
    assert wait_job(a, job_id)["status"] == "succeeded"
    # Tenant B owns something too, so its lists are not trivially empty.
    b_ds = b.post("/v1/datasets", files={"file": ("b.txt", b"tenant b\n")})
    assert b_ds.status_code == 201, b_ds.text
    # A resumable upload of tenant A (tus, /v1/uploads), not finished.
    tus = {"Tus-Resumable": "1.0.0"}
    up = a.post("/v1/uploads", headers={**tus, "Upload-Length": "5", "Upload-Metadata": "filename ZC50eHQ="})
    assert up.status_code == 201, up.text
    upload_id = up.headers["Location"].rsplit("/", 1)[1]

    ids = {
        "model_id": model_id,
        "job_id": job_id,
        "dataset_id": dataset_id,
        "sweep_id": sweep_id,
        "name": "config.json",
        "upload_id": upload_id,
    }
    spec = _spec(anon)
    checked: list[str] = []
    for path, ops in spec["paths"].items():
        names = PARAM.findall(path)
        if not names:
            continue
        unknown = [n for n in names if n not in ids]
        if unknown:
            pytest.fail(
                f"{path}: path parameter(s) {unknown} are not mapped to an object of tenant A; "
                f"create one in this test and add it to `ids`"
            )
        url = PARAM.sub(lambda m: ids[m.group(1)], path)
        for method, op in ops.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            what = f"{method.upper()} {path}"
            kw = _body(op)
            if SIGNED.search(path):
                # No key needed by design: without a signature (or with a wrong one) it is a 404,
                # for anyone; B's key does not help.
                for client, params in (
                    (anon, None),
                    (b, None),
                    (anon, {"expires": "9999999999", "signature": "0" * 64}),
                ):
                    r = client.request(method.upper(), url, params=params, **kw)
                    assert r.status_code == 404, (what, params, r.status_code, r.text[:300])
            else:
                r = b.request(method.upper(), url, **kw)
                assert r.status_code == 404, (f"{what} with another tenant's key", r.status_code, r.text[:300])
                assert r.headers["content-type"] == "application/problem+json", what
            checked.append(what)
    # The spec walk really covered the id routes (guards against a parsing slip skipping them all).
    for must in (
        "GET /v1/models/{model_id}",
        "DELETE /v1/models/{model_id}",
        "GET /v1/jobs/{job_id}/artifact",
        "GET /v1/jobs/{job_id}/events",
        "GET /v1/jobs/{job_id}/report",
        "POST /v1/jobs/{job_id}/cancel",
        "GET /v1/datasets/{dataset_id}",
        "GET /v1/sweeps/{sweep_id}",
        "GET /v1/sweeps/{sweep_id}/view",
        "PATCH /v1/uploads/{upload_id}",
        "DELETE /v1/uploads/{upload_id}",
    ):
        assert must in checked, (must, checked)

    # B's DELETE and cancel calls changed nothing of A's.
    for url in (f"/v1/models/{model_id}", f"/v1/datasets/{dataset_id}", f"/v1/sweeps/{sweep_id}", f"/v1/jobs/{job_id}"):
        assert a.get(url).status_code == 200, url
    assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert a.head(f"/v1/uploads/{upload_id}", headers=tus).headers["Upload-Offset"] == "0"
    assert a.get(f"/v1/jobs/{job_id}/artifact").status_code == 200

    # Lists: every GET route without path parameters, except the tenant-free ones.
    lists = [
        p
        for p, ops in spec["paths"].items()
        if "get" in ops and not PARAM.search(p) and p not in TENANT_FREE | PER_TENANT
    ]
    assert {"/v1/models", "/v1/jobs", "/v1/datasets", "/v1/sweeps"} <= set(lists), lists
    assert set(spec["paths"]) >= TENANT_FREE | PER_TENANT, "an exception names a route that no longer exists"
    for path in PER_TENANT:
        ra, rb = a.get(path), b.get(path)
        assert ra.status_code == rb.status_code == 200, (path, ra.text, rb.text)
        assert ra.json() != rb.json(), f"{path}: tenant B gets tenant A's value"
    for path in lists:
        mine = {item["id"] for item in _all_items(a, path)}
        assert mine, f"{path}: tenant A's list is empty, so the check below would prove nothing"
        theirs = {item["id"] for item in _all_items(b, path)}
        leaked = mine & theirs
        assert not leaked, f"{path}: tenant B's list shows tenant A's objects {sorted(leaked)}"
    assert {model_id} <= {i["id"] for i in _all_items(a, "/v1/models")}
    assert {job_id} <= {i["id"] for i in _all_items(a, "/v1/jobs")}
    assert b_ds.json()["id"] in {i["id"] for i in _all_items(b, "/v1/datasets")}
