"""GET /metrics and the request id, against a real embedded service (its own: JSON logs and a
metrics token), plus in-process checks of the scrape's failure path and the log formats."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Service, upload_dir, wait_job

TOKEN = "scrape-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str, Path]]:
    data = tmp_path_factory.mktemp("metrics")
    service = Service(
        {
            "MODELPRESS_MODE": "embedded",
            "MODELPRESS_DATA_DIR": str(data),
            "MODELPRESS_LOG_FORMAT": "json",
            "MODELPRESS_METRICS_TOKEN": TOKEN,
        },
        data,
        worker=False,
    )
    service.start()  # `serve` runs the worker as a subprocess: both log to api.log
    yield service, (data / "api-key").read_text().strip(), data / "api.log"
    service.stop()


def scrape(service: Service) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def log_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the CLI's banner, Celery's start-up banner: prints, not log records
        if isinstance(rec, dict) and "logger" in rec:
            out.append(rec)
    return out


@pytest.mark.integration
def test_metrics_change_when_a_job_runs(svc, tiny):
    service, key, _ = svc
    before = scrape(service)
    with service.client(key) as c:
        model = upload_dir(c, tiny["gpt2"]).json()
        r = c.post(
            "/v1/jobs",
            json={"model_id": model["id"], "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert wait_job(c, job_id)["status"] == "succeeded"
        assert c.get("/no/such/path").status_code == 404
    after = scrape(service)

    posted = value(after, "modelpress_http_requests_total", method="POST", route="/v1/jobs", status="202")
    assert posted >= value(before, "modelpress_http_requests_total", method="POST", route="/v1/jobs", status="202") + 1
    # Route templates, never raw paths: bounded label values.
    assert value(after, "modelpress_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") >= 1
    assert value(after, "modelpress_http_requests_total", method="GET", route="unmatched", status="404") >= 1
    routes = {dict(labels)["route"] for name, labels in after if name == "modelpress_http_requests_total"}
    assert not any(job_id in route for route in routes), routes
    assert value(after, "modelpress_http_request_duration_seconds_count", method="POST", route="/v1/jobs") >= 1

    assert value(after, "modelpress_jobs", state="succeeded") == value(before, "modelpress_jobs", state="succeeded") + 1
    for state in ("queued", "running", "failed", "canceled"):
        assert ("modelpress_jobs", frozenset({("state", state)})) in after  # every state, 0 included
    gcount = "modelpress_job_duration_seconds_gcount"
    assert (
        value(after, gcount, method="prune.magnitude", state="succeeded")
        == value(before, gcount, method="prune.magnitude", state="succeeded") + 1
    )
    assert (
        value(after, "modelpress_job_duration_seconds_bucket", method="prune.magnitude", state="succeeded", le="+Inf")
        >= 1
    )
    for queue in ("cpu", "gpu"):
        assert ("modelpress_queue_depth", frozenset({("queue", queue)})) in after
    assert value(after, "modelpress_workers", queue="cpu") >= 1
    assert value(after, "modelpress_scrape_errors_total") == 0
    assert value(after, "process_resident_memory_bytes") > 0


@pytest.mark.integration
def test_request_id_follows_the_job_into_the_worker(svc, tiny):
    service, key, log_path = svc
    with service.client(key) as c:
        model = upload_dir(c, tiny["gpt2"]).json()
        r = c.post(
            "/v1/jobs",
            headers={"X-Request-ID": "test-rid-123"},
            json={"model_id": model["id"], "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}]},
        )
        assert r.status_code == 202, r.text
        assert r.headers["X-Request-ID"] == "test-rid-123"
        job_id = r.json()["id"]
        assert wait_job(c, job_id)["status"] == "succeeded"

    lines = log_lines(log_path)
    for rec in lines:
        assert {"ts", "level", "logger", "message"} <= rec.keys()
    mine = [rec for rec in lines if rec.get("request_id") == "test-rid-123"]
    by_logger = {rec["logger"] for rec in mine}
    # The API side: the access line and the send; the worker side: the pipeline, with the job's id.
    assert {"modelpress.access", "modelpress.queue", "modelpress.worker"} <= by_logger, by_logger
    started = [rec for rec in mine if rec["logger"] == "modelpress.worker" and rec["message"].endswith("started")]
    assert started and started[0]["job_id"] == job_id and started[0]["attempt"] == 1
    assert any(rec["logger"] == "modelpress.worker" and rec["message"].endswith("succeeded") for rec in mine)
    access = next(rec for rec in mine if rec["logger"] == "modelpress.access")
    assert access["route"] == "/v1/jobs" and access["status"] == 202 and access["method"] == "POST"
    # Other jobs' lines do not carry this request's id.
    assert all(rec.get("job_id") in (None, job_id) for rec in mine)
    # uvicorn's own records go through the same JSON handler.
    assert any(rec["logger"].startswith("uvicorn") for rec in lines)


@pytest.mark.integration
def test_request_id_is_generated_unless_sane(svc):
    service, _, _ = svc
    plain = httpx.get(f"{service.url}/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", plain.headers["X-Request-ID"])
    for bad in ("has spaces", "x" * 129, "semi;colon"):
        got = httpx.get(f"{service.url}/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert got != bad and re.fullmatch(r"[0-9a-f]{32}", got)
    ok = "A.b_c-" + "9" * 122
    assert httpx.get(f"{service.url}/healthz", headers={"X-Request-ID": ok}).headers["X-Request-ID"] == ok
    # Errors carry it too (problem+json from the app's handlers).
    assert httpx.get(f"{service.url}/v1/jobs", headers={"X-Request-ID": "rid-401"}).headers["X-Request-ID"] == "rid-401"


@pytest.mark.integration
def test_metrics_token(svc):
    service, key, _ = svc
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {key}"},
    ):
        r = httpx.get(f"{service.url}/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "unauthorized"
    assert httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # OpenMetrics when the scraper asks for it: job durations are a gauge histogram there.
    r = httpx.get(
        f"{service.url}/metrics",
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/openmetrics-text;version=1.0.0"},
    )
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert "# TYPE modelpress_job_duration_seconds gaugehistogram" in r.text
    assert r.text.rstrip().endswith("# EOF")


@pytest.mark.integration
def test_cluster_scrape_reads_postgres_and_logs_json_by_default(cluster):
    """The same queries on PostgreSQL; cluster mode logs JSON without being told to."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.get(f"{cluster.service.url}/metrics", timeout=30)  # no MODELPRESS_METRICS_TOKEN: open
        assert r.status_code == 200
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text)
            for s in fam.samples
        }
        if value(samples, "modelpress_workers", queue="cpu") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert value(samples, "modelpress_workers", queue="cpu") >= 1
    assert value(samples, "modelpress_scrape_errors_total") == 0
    assert {
        ("modelpress_jobs", frozenset({("state", st)}))
        for st in ("queued", "running", "succeeded", "failed", "canceled")
    } <= samples.keys()
    assert ("modelpress_queue_depth", frozenset({("queue", "cpu")})) in samples
    worker_records = log_lines(cluster.data_dir / "worker.log")
    assert any(rec["logger"] == "modelpress.registry" for rec in worker_records)


# --- in process ---------------------------------------------------------------------------------


@pytest.fixture
def fresh_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Settings, engine and sessions from this test's environment (a data dir with no schema)."""
    from core.config import get_settings
    from core.db import get_engine, get_sessionmaker

    for name in [k for k in os.environ if k.startswith("MODELPRESS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(tmp_path))
    caches = (get_settings, get_engine, get_sessionmaker)
    for fn in caches:
        fn.cache_clear()
    yield
    get_engine().dispose()
    for fn in caches:
        fn.cache_clear()


@pytest.mark.unit
def test_scrape_survives_a_database_error(fresh_settings, caplog):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as client, caplog.at_level(logging.WARNING, "modelpress.observability"):
        r = client.get("/metrics")  # no token set: open
        assert r.status_code == 200
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text)
            for s in fam.samples
        }
        assert samples[("modelpress_scrape_errors_total", frozenset())] == 1
        assert not any(
            name.startswith(("modelpress_jobs", "modelpress_workers", "modelpress_queue_depth")) for name, _ in samples
        )
    assert "could not read the database" in caplog.text


@pytest.mark.unit
def test_log_formats_carry_the_context():
    from core import logs

    record = logging.LogRecord("modelpress.worker", logging.INFO, __file__, 1, "job %s: %s", ("j1", "started"), None)
    with logs.log_context(request_id="rid-1", job_id="j1"), logs.log_context(attempt=2):
        logs.ContextFilter().filter(record)
    assert logs.current_request_id() is None  # unbound on the way out
    rec = json.loads(logs.JsonFormatter().format(record))
    assert rec["level"] == "INFO" and rec["logger"] == "modelpress.worker" and rec["message"] == "job j1: started"
    assert (rec["request_id"], rec["job_id"], rec["attempt"]) == ("rid-1", "j1", 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
    assert logs.TextFormatter().format(record).endswith("job j1: started [request_id=rid-1 job_id=j1 attempt=2]")


@pytest.mark.unit
def test_an_unhandled_error_is_counted_and_logged_with_its_request_id(fresh_settings):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core import logs

    app = create_app()

    @app.get("/boom/{n}")
    def boom(n: int) -> None:
        raise RuntimeError("boom")

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(logs.ContextFilter())
    errors_log = logging.getLogger("modelpress.errors")
    errors_log.addHandler(handler)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            assert client.get("/boom/1", headers={"X-Request-ID": "rid-boom"}).status_code == 500
            text = client.get("/metrics").text
    finally:
        errors_log.removeHandler(handler)
    assert 'modelpress_http_requests_total{method="GET",route="/boom/{n}",status="500"} 1.0' in text
    assert [getattr(r, "request_id", None) for r in records if r.getMessage() == "unhandled error"] == ["rid-boom"]


@pytest.mark.unit
def test_enqueue_sends_the_request_id_in_the_message_headers(monkeypatch):
    from core import logs, queue

    sent: list[dict] = []
    monkeypatch.setattr(queue.client(), "send_task", lambda *a, **kw: sent.append(kw))
    with logs.log_context(request_id="rid-api"):
        queue.enqueue_job("job-1", "cpu")
    queue.enqueue_job("job-2", "cpu")  # outside a request: the reconciler's re-send
    assert sent[0]["headers"] == {"request_id": "rid-api"}
    assert re.fullmatch(r"reconcile-[0-9a-f]{32}", sent[1]["headers"]["request_id"])
    assert logs.sane_request_id(sent[1]["headers"]["request_id"])  # the worker accepts it
