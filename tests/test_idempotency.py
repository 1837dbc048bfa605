"""Idempotency-Key on POST /v1/models, /v1/datasets, /v1/jobs (and /v1/sweeps), against the real
services: PostgreSQL with no worker (jobs stay queued) and embedded SQLite. Every test works in a
tenant of its own, so other tests' counts of jobs by status are not disturbed; jobs are canceled at
the end."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

import httpx
import pytest

from tests.helpers import stored_files, table_rows

pytestmark = pytest.mark.integration

CAST = [{"method": "quantize.cast", "params": {"dtype": "float16"}}]
N = 20


@pytest.fixture(params=["cluster_no_worker", "embedded"])
def idem(request):
    """(stack, a client of a fresh tenant, a key of a second fresh tenant)."""
    stack = request.getfixturevalue(request.param)
    key = stack.service.cli("keys", "create", "--tenant", f"idem-{uuid.uuid4().hex[:8]}")
    other = stack.service.cli("keys", "create", "--tenant", f"idem-other-{uuid.uuid4().hex[:8]}")
    return stack, stack.client(key), other


def _upload_bare(c: httpx.Client, path: Path, key: str | None, name: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return c.post(
        "/v1/models",
        files=[("files", (path.name, path.read_bytes()))],
        data={"name": name} if name else None,
        headers=headers,
    )


def _dataset(c: httpx.Client, text: bytes, key: str | None, name: str = "idem.txt") -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return c.post("/v1/datasets", files=[("file", (name, text))], headers=headers)


def _cancel_all(c: httpx.Client) -> None:
    for job in c.get("/v1/jobs", params={"limit": 200}).json()["items"]:
        if job["status"] in ("queued", "running"):
            c.post(f"/v1/jobs/{job['id']}/cancel")


def _concurrently(fn, n: int = N) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


def test_job_replay_and_reuse(idem, tiny):
    stack, c, _ = idem
    try:
        m = _upload_bare(c, tiny["bare"], None).json()
        body = {"model_id": m["id"], "steps": CAST, "name": "idem"}
        jobs_before = table_rows(stack, "jobs")
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "job-1"})
        assert first.status_code == 202, first.text
        assert "Idempotency-Replayed" not in first.headers
        # Same body with its keys in another order: the same request.
        again = c.post("/v1/jobs", json=dict(reversed(list(body.items()))), headers={"Idempotency-Key": "job-1"})
        assert again.status_code == 202, again.text
        assert again.headers["Idempotency-Replayed"] == "true"
        assert again.json() == first.json()
        assert again.headers["Location"] == first.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
        assert table_rows(stack, "jobs") == jobs_before + 1
        assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [first.json()["id"]]

        other_body = {**body, "name": "different"}
        r = c.post("/v1/jobs", json=other_body, headers={"Idempotency-Key": "job-1"})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "idempotency_key_reused" and "job-1" in r.json()["detail"]
        assert table_rows(stack, "jobs") == jobs_before + 1

        # A refused request stores nothing: the key can be used again once the request is right.
        bad = c.post("/v1/jobs", json={**body, "model_id": str(uuid.uuid4())}, headers={"Idempotency-Key": "job-2"})
        assert bad.status_code == 422 and bad.json()["code"] == "unknown_model"
        ok = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "job-2"})
        assert ok.status_code == 202 and "Idempotency-Replayed" not in ok.headers
        assert ok.json()["id"] != first.json()["id"]

        # Without a key: a new job every time, as before.
        a, b = c.post("/v1/jobs", json=body), c.post("/v1/jobs", json=body)
        assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
        assert table_rows(stack, "jobs") == jobs_before + 4
    finally:
        _cancel_all(c)


def test_invalid_keys_are_refused(idem, tiny):
    stack, c, _ = idem
    before = table_rows(stack, "models")
    for bad in ("", "k" * 201):
        r = _upload_bare(c, tiny["bare"], bad)
        assert r.status_code == 422, (len(bad), r.text)
        assert r.json()["code"] == "invalid_idempotency_key"
        assert (
            c.post("/v1/jobs", json={"model_id": "x", "steps": CAST}, headers={"Idempotency-Key": bad}).json()["code"]
            == "invalid_idempotency_key"
        )
    assert table_rows(stack, "models") == before
    r = _upload_bare(c, tiny["bare"], "k" * 200)
    assert r.status_code == 201, r.text


def test_concurrent_duplicate_jobs_create_one(idem, tiny):
    stack, c, _ = idem
    try:
        m = _upload_bare(c, tiny["bare"], None).json()
        body = {"model_id": m["id"], "steps": CAST}
        jobs_before = table_rows(stack, "jobs")
        key = f"burst-{uuid.uuid4().hex}"
        rs = _concurrently(lambda: c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))
        assert [r.status_code for r in rs] == [202] * N, [r.text for r in rs if r.status_code != 202]
        ids = {r.json()["id"] for r in rs}
        assert len(ids) == 1
        assert sum(r.headers.get("Idempotency-Replayed") == "true" for r in rs) == N - 1
        assert table_rows(stack, "jobs") == jobs_before + 1
        assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == list(ids)
    finally:
        _cancel_all(c)


def test_concurrent_duplicate_model_uploads_store_one(idem, tiny):
    stack, c, _ = idem
    models_before, files_before = table_rows(stack, "models"), set(stored_files(stack))
    key = f"model-{uuid.uuid4().hex}"
    rs = _concurrently(lambda: _upload_bare(c, tiny["bare"], key, name="idem-model"))
    assert [r.status_code for r in rs] == [201] * N, [r.text for r in rs if r.status_code != 201]
    ids = {r.json()["id"] for r in rs}
    assert len(ids) == 1
    assert sum(r.headers.get("Idempotency-Replayed") == "true" for r in rs) == N - 1
    assert table_rows(stack, "models") == models_before + 1
    # One stored file (the losers' moved files were deleted by their rollback), nothing in tmp.
    new_files = set(stored_files(stack)) - files_before
    assert [p.relative_to(stack.data_dir / "storage").as_posix() for p in new_files] == [
        f"models/{ids.pop()}/{tiny['bare'].name}"
    ]
    # Same key, other bytes: refused, and nothing new is kept.
    r = c.post(
        "/v1/models",
        files=[("files", ("other.safetensors", tiny["bare"].read_bytes()))],
        headers={"Idempotency-Key": key},
    )
    assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused"
    assert table_rows(stack, "models") == models_before + 1
    assert len(set(stored_files(stack)) - files_before) == 1


def test_concurrent_duplicate_dataset_uploads_store_one(idem):
    stack, c, _ = idem
    text = b"".join(b"sample number %d\n" % i for i in range(50))
    before, files_before = table_rows(stack, "datasets"), set(stored_files(stack))
    key = f"ds-{uuid.uuid4().hex}"
    rs = _concurrently(lambda: _dataset(c, text, key))
    assert [r.status_code for r in rs] == [201] * N, [r.text for r in rs if r.status_code != 201]
    assert len({r.json()["id"] for r in rs}) == 1
    assert table_rows(stack, "datasets") == before + 1
    assert len(set(stored_files(stack)) - files_before) == 1
    replay = _dataset(c, text, key)
    assert replay.status_code == 201 and replay.headers["Idempotency-Replayed"] == "true"
    assert replay.json() == rs[0].json()
    changed = _dataset(c, text + b"one more\n", key)
    assert changed.status_code == 422 and changed.json()["code"] == "idempotency_key_reused"
    assert table_rows(stack, "datasets") == before + 1


def test_keys_are_per_tenant(idem, tiny):
    stack, c, other_key = idem
    d = stack.client(other_key)
    text = b"hello\nworld\n"
    a = _dataset(c, text, "shared-key")
    b = _dataset(d, text, "shared-key")
    assert a.status_code == b.status_code == 201
    assert "Idempotency-Replayed" not in b.headers and a.json()["id"] != b.json()["id"]
    assert d.get(f"/v1/datasets/{a.json()['id']}").status_code == 404
    # The same key on another route is another key.
    m = _upload_bare(c, tiny["bare"], "shared-key")
    assert m.status_code == 201 and "Idempotency-Replayed" not in m.headers


def test_expired_keys_are_replaced(idem):
    stack, c, _ = idem
    text = b"old\n"
    first = _dataset(c, text, "aging")
    assert first.status_code == 201
    # Age the stored row past the TTL.
    from datetime import datetime

    from sqlalchemy import create_engine, update

    from core.tables import IdempotencyKey

    engine = create_engine(stack.database_url)
    with engine.begin() as conn:
        conn.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.key == "aging")
            .values(created_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
    engine.dispose()
    again = _dataset(c, b"new\n", "aging")
    assert again.status_code == 201 and "Idempotency-Replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert _dataset(c, b"new\n", "aging").headers["Idempotency-Replayed"] == "true"


def test_sweep_replay(cluster_no_worker, tiny):
    stack = cluster_no_worker
    c = stack.client(stack.service.cli("keys", "create", "--tenant", f"idem-sw-{uuid.uuid4().hex[:8]}"))
    try:
        m = _upload_bare(c, tiny["bare"], None).json()
        body = {
            "model_id": m["id"],
            "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
            "vary": {"steps[0].params.sparsity": [0.3, 0.5]},
        }
        rs = _concurrently(lambda: c.post("/v1/sweeps", json=body, headers={"Idempotency-Key": "sweep"}), 8)
        assert [r.status_code for r in rs] == [202] * 8, [r.text for r in rs]
        assert len({r.json()["id"] for r in rs}) == 1
        assert len(c.get("/v1/jobs").json()["items"]) == 2
    finally:
        _cancel_all(c)
