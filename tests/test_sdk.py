"""The Python SDK (``modelpress.Client`` / ``AsyncClient``) against the real embedded service, and
its retry policy against a small local HTTP server (``http.server`` on 127.0.0.1, no mock
library): typed results and errors, a streamed upload, wait with progress, a verified and resumed
download, idempotency keys that survive retries, and an import that stays light."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import threading
import uuid
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import modelpress
from modelpress import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    Conflict,
    Dataset,
    Job,
    JobCanceled,
    JobFailed,
    Model,
    NotFound,
    RateLimited,
    Report,
    ServiceUnavailable,
    Sweep,
    TransportError,
    Unauthorized,
    Unprocessable,
    WaitTimeout,
)
from tests.helpers import free_port

QUICK_EVAL = {"runs": 1, "warmup": 0, "max_samples": 4}


@pytest.fixture(scope="module")
def mp(embedded) -> Iterator[Client]:
    with Client(embedded.service.url, embedded.key, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def finished(mp: Client, tiny: dict[str, Path]) -> dict[str, Any]:
    """A tiny GPT-2 uploaded, pruned and waited for, with what the callbacks saw."""
    sent: list[tuple[int, int]] = []
    model = mp.upload_model(tiny["gpt2"], name="sdk-gpt2", on_progress=lambda n, total: sent.append((n, total)))
    job = mp.submit(model.id, [("prune.magnitude", {"sparsity": 0.5})], name="sdk", evaluation=QUICK_EVAL)
    seen: list[Job] = []
    done = mp.wait(job.id, timeout=300, poll_interval=0.2, on_progress=seen.append)
    return {"model": model, "submitted": job, "job": done, "seen": seen, "sent": sent}


@pytest.mark.integration
def test_upload_submit_wait_report(mp: Client, finished: dict[str, Any], tiny: dict[str, Path]) -> None:
    model, job = finished["model"], finished["job"]
    assert isinstance(model, Model) and model.architecture == "GPT2LMHeadModel" and model.format == "hf"
    expected = sorted(p.name for p in tiny["gpt2"].iterdir() if p.is_file() and not p.name.startswith("."))
    assert [f.name for f in model.files] == expected
    total = sum((tiny["gpt2"] / n).stat().st_size for n in expected)
    assert finished["sent"] and finished["sent"][-1] == (total, total)  # the upload streamed every byte

    assert (
        finished["submitted"].status in ("queued", "running")
        and finished["submitted"].steps[0].method == "prune.magnitude"
    )
    assert isinstance(job, Job) and job.status == "succeeded" and job.done
    assert job.artifact is not None and job.artifact.filename == "model.zip"
    seen = finished["seen"]
    assert seen and all(isinstance(j, Job) for j in seen)
    assert seen[-1].status == "succeeded" and seen[-1].progress.fraction == 1.0
    assert all(0.0 <= j.progress.fraction <= 1.0 for j in seen)

    report = mp.report(job.id)
    assert isinstance(report, Report) and report.job_id == job.id
    assert report.sparsity["sparsity"] == pytest.approx(0.5, abs=0.01)
    # Dense pruned weights keep their bytes (weight files are stored, not deflated).
    assert report.size["compression_ratio"] == pytest.approx(1.0, abs=0.01)
    assert report.model_dump(mode="json")["stage_seconds"]  # fields round-trip to JSON

    url = mp.report_link(job.id, ttl_s=60)
    assert f"/v1/jobs/{job.id}/report/view?" in url and "signature=" in url
    page = httpx.get(url, timeout=60)  # no Authorization header
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    assert mp.get_model(model.id).id == model.id
    assert any(m.id == model.id for m in mp.models(limit=50))
    assert any(m.name == "prune.magnitude" for m in mp.methods())


@pytest.mark.integration
def test_jobs_listing_pages(mp: Client, finished: dict[str, Any], tiny: dict[str, Path]) -> None:
    other = mp.submit(
        finished["model"].id,
        [{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}],
        evaluation={"enabled": False},
    )
    mp.wait(other, timeout=300, poll_interval=0.2)
    pages: list[str] = []
    hooked = Client(mp.base_url, mp.api_key, event_hooks={"request": [lambda r: pages.append(str(r.url))]})
    with hooked:
        two = list(hooked.jobs(limit=2, page_size=1))
        assert [j.id for j in two] == [other.id, finished["job"].id]  # newest first, across two pages
        assert len([u for u in pages if "/v1/jobs?" in u]) == 2 and "cursor=" in pages[-1]
        assert {j.id for j in hooked.jobs(status="succeeded")} >= {other.id, finished["job"].id}


@pytest.mark.integration
def test_sweep(mp: Client, finished: dict[str, Any]) -> None:
    sweep = mp.sweep(
        finished["model"].id,
        [("prune.magnitude", {"sparsity": 0.5})],
        {"steps[0].params.sparsity": [0.3, 0.6]},
        name="sdk-sweep",
        evaluation={"enabled": False},
    )
    assert isinstance(sweep, Sweep) and len(sweep.points) == 2 and sweep.name == "sdk-sweep"
    assert [p.values for p in sweep.points] == [{"steps[0].params.sparsity": 0.3}, {"steps[0].params.sparsity": 0.6}]
    for p in sweep.points:
        mp.wait(p.job_id, timeout=300, poll_interval=0.2)
    again = mp.get_sweep(sweep.id)
    assert again.done and again.counts.succeeded == 2 and again.frontier
    assert any(s.id == sweep.id for s in mp.sweeps(limit=10))
    assert f"/v1/sweeps/{sweep.id}/view?" in mp.sweep_link(sweep.id)


@pytest.mark.integration
def test_create_dataset(mp: Client, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"sample {i}", "label": i % 2}) + "\n" for i in range(5)))
    ds = mp.create_dataset(path, name="sdk-data")
    assert isinstance(ds, Dataset) and ds.samples == 5 and ds.labeled and ds.labels == [0, 1]
    assert mp.get_dataset(ds.id).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any(d.id == ds.id for d in mp.datasets())
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(Unprocessable) as e:
        mp.create_dataset(path)
    assert e.value.status == 422 and "2" in e.value.detail  # the bad line is named


@pytest.mark.integration
def test_download_resume_and_verification(mp: Client, finished: dict[str, Any], tmp_path: Path) -> None:
    job = finished["job"]
    ranges: list[str | None] = []

    def on_request(request: httpx.Request) -> None:
        if request.url.path.endswith("/artifact"):
            ranges.append(request.headers.get("range"))

    progress: list[tuple[int, int]] = []
    with Client(mp.base_url, mp.api_key, event_hooks={"request": [on_request]}) as c:
        full = c.download(job.id, tmp_path, on_progress=lambda n, total: progress.append((n, total)))
        assert full.path == tmp_path / "model.zip" and full.resumed_from == 0 and ranges == [None]
        data = full.path.read_bytes()
        assert full.sha256 == job.artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert full.size_bytes == len(data) == job.artifact.size_bytes and progress[-1] == (len(data), len(data))
        with zipfile.ZipFile(full.path) as z:
            assert "config.json" in z.namelist()

        # Resume: the first half is already in the .part file; only the rest is asked for.
        dest = tmp_path / "resumed.zip"
        half = len(data) // 2
        dest.with_name("resumed.zip.part").write_bytes(data[:half])
        tag = f'"{job.artifact.sha256}"'  # <dest>.part.etag: the artifact the .part is of
        dest.with_name("resumed.zip.part.etag").write_text(tag)
        ranges.clear()
        got = c.download(job.id, dest)
        assert ranges == [f"bytes={half}-"]
        assert got.resumed_from == half and got.path == dest and dest.read_bytes() == data
        assert not dest.with_name("resumed.zip.part").exists()

        # A complete .part is verified and renamed without asking for any bytes.
        dest.unlink()
        dest.with_name("resumed.zip.part").write_bytes(data)
        dest.with_name("resumed.zip.part.etag").write_text(tag)
        ranges.clear()
        assert c.download(job.id, dest).sha256 == job.artifact.sha256 and ranges == [] and dest.read_bytes() == data

        # A corrupted .part: the resumed file does not verify; it is deleted and nothing lands at dest.
        bad = tmp_path / "bad.zip"
        bad.with_name("bad.zip.part").write_bytes(bytes(b ^ 0xFF for b in data[:half]))
        bad.with_name("bad.zip.part.etag").write_text(tag)
        ranges.clear()
        with pytest.raises(ChecksumMismatch) as e:
            c.download(job.id, bad)
        assert ranges == [f"bytes={half}-"] and e.value.expected == job.artifact.sha256
        assert not bad.exists() and not bad.with_name("bad.zip.part").exists()
        assert not bad.with_name("bad.zip.part.etag").exists()
        assert c.download(job.id, bad).sha256 == job.artifact.sha256  # a fresh download then succeeds


@pytest.mark.integration
def test_typed_errors(mp: Client, finished: dict[str, Any], embedded) -> None:
    with pytest.raises(Conflict) as e:
        mp.cancel(finished["job"].id)
    assert e.value.status == 409 and e.value.code and e.value.title and "succeeded" in e.value.detail

    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as e:
        mp.get_job(missing)
    assert (e.value.status, e.value.code) == (404, "not_found") and missing in str(e.value)
    with pytest.raises(NotFound):
        mp.download(missing, "unused")

    with Client(embedded.service.url, "mp_000000000000_not-a-key") as bad, pytest.raises(Unauthorized) as e:
        bad.get_job(finished["job"].id)
    assert e.value.status == 401 and e.value.headers.get("www-authenticate") == "Bearer"

    with pytest.raises(Unprocessable) as e:
        mp.submit(finished["model"].id, [("prune.magnitude", {"sparsity": 1.5})])
    assert e.value.errors and any("sparsity" in [str(p) for p in err["loc"]] for err in e.value.errors)
    # GPT-2's Conv1D layers are refused by the integer quantizers at submit.
    with pytest.raises(Unprocessable) as e:
        mp.submit(finished["model"].id, [("quantize.weight_only", {"bits": 8})])
    assert e.value.code

    with pytest.raises(ValueError):
        mp.submit(finished["model"].id, [])
    with pytest.raises(FileNotFoundError):
        mp.upload_model("/nonexistent/model/dir")

    # 403: a valid key without the admin scope (the embedded bootstrap key has it; another does not).
    from modelpress._errors import Forbidden

    with Client(embedded.service.url, embedded.other_key) as plain, pytest.raises(Forbidden) as e:
        plain.create_key("someone")
    assert (e.value.status, e.value.code) == (403, "admin_required")
    listed = list(mp.keys())  # the SDK's key listing (an iterator), not a dict's
    assert {k.tenant for k in listed} == {"default"} and any("admin" in k.scopes for k in listed)


@pytest.mark.integration
def test_async_client_round_trip(embedded, tiny: dict[str, Path], tmp_path: Path) -> None:
    async def main() -> tuple[Model, Job, Any, Report, list[Job], list[str]]:
        seen: list[Job] = []
        async with AsyncClient(embedded.service.url, embedded.key) as amp:
            model = await amp.upload_model(tiny["bare"])
            job = await amp.submit(model, ("prune.magnitude", {"sparsity": 0.25}), evaluation={"enabled": False})
            done = await amp.wait(job, timeout=300, poll_interval=0.2, on_progress=seen.append)
            got = await amp.download(done.id, tmp_path / "weights.safetensors")
            report = await amp.report(done.id)
            ids = [j.id async for j in amp.jobs(limit=3)]
            with pytest.raises(NotFound):
                await amp.get_job(str(uuid.uuid4()))
        return model, done, got, report, seen, ids

    model, done, got, report, seen, ids = asyncio.run(main())
    assert model.format == "safetensors" and done.status == "succeeded" and seen
    assert got.sha256 == done.artifact.sha256 == hashlib.sha256(got.path.read_bytes()).hexdigest()
    assert report.sparsity["sparsity"] == pytest.approx(0.25, abs=0.01)
    assert done.id in ids


# --- a local HTTP server that answers from a script ------------------------------------------------


_JOB = {
    "id": "00000000-0000-4000-8000-000000000001",
    "name": None,
    "model_id": "m",
    "status": "queued",
    "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
    "queue": "cpu",
    "progress": {"stage": "queued", "fraction": 0.0},
    "attempt": 0,
    "cancel_requested": False,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
}


def _problem(status: int, code: str, title: str, detail: str) -> dict[str, Any]:
    return {"type": f"/problems/{code}", "title": title, "status": status, "detail": detail, "code": code}


class ScriptedServer:
    """Answers each request with the next (status, headers, JSON body) of its script (the last
    one repeats) and records (method, path, headers) of every request."""

    def __init__(self, script: list[tuple[int, dict[str, str], Any]]) -> None:
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                outer.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                raw = json.dumps(body).encode()
                self.send_response(status)
                ctype = "application/problem+json" if status >= 400 else "application/json"
                for k, v in {"Content-Type": ctype, "Content-Length": str(len(raw)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


UNAVAILABLE = (
    503,
    {"Retry-After": "0"},
    _problem(503, "database_unavailable", "Service temporarily unavailable", "retry later"),
)


@pytest.mark.unit
def test_retries_503_with_the_same_idempotency_key() -> None:
    with ScriptedServer([UNAVAILABLE, UNAVAILABLE, (201, {}, _JOB)]) as srv, Client(srv.url, "k") as c:
        job = c.submit("m", [("prune.magnitude", {"sparsity": 0.5})])
    assert job.id == _JOB["id"]
    assert [(m, p) for m, p, _ in srv.requests] == [("POST", "/v1/jobs")] * 3
    keys = {h.get("Idempotency-Key") for _, _, h in srv.requests}
    assert len(keys) == 1 and uuid.UUID(keys.pop()).version == 4
    assert all(h.get("Authorization") == "Bearer k" for _, _, h in srv.requests)


@pytest.mark.unit
def test_retries_run_out_and_keys_differ_per_call() -> None:
    limited = (429, {"Retry-After": "0"}, _problem(429, "rate_limited", "Too many requests", "slow down"))
    with ScriptedServer([limited]) as srv, Client(srv.url, "k", max_retries=2) as c:
        with pytest.raises(RateLimited) as e:
            c.submit("m", ["prune.magnitude"], idempotency_key="my-key")
        assert e.value.status == 429 and e.value.code == "rate_limited" and e.value.headers["retry-after"] == "0"
        assert [h.get("Idempotency-Key") for _, _, h in srv.requests] == ["my-key"] * 3
        srv.requests.clear()
        srv.script = [UNAVAILABLE]
        with pytest.raises(ServiceUnavailable):
            c.submit("m", ["prune.magnitude"])
        with pytest.raises(ServiceUnavailable):
            c.submit("m", ["prune.magnitude"])
    keys = [h.get("Idempotency-Key") for _, _, h in srv.requests]
    assert len(keys) == 6 and len(set(keys[:3])) == 1 and len(set(keys[3:])) == 1 and keys[0] != keys[3]


@pytest.mark.unit
def test_wait_raises_typed_job_outcomes() -> None:
    failed = {
        **_JOB,
        "status": "failed",
        "progress": {"stage": "step 1/1", "fraction": 0.4},
        "error": {"code": "method_failed", "message": "boom"},
    }
    running = {**_JOB, "status": "running", "progress": {"stage": "step 1/1", "fraction": 0.4}}
    with ScriptedServer([(200, {}, running), (200, {}, running), (200, {}, failed)]) as srv, Client(srv.url, "k") as c:
        seen: list[Job] = []
        with pytest.raises(JobFailed) as e:
            c.wait(_JOB["id"], poll_interval=0.01, on_progress=seen.append)
        assert e.value.job.error.code == "method_failed" and "boom" in str(e.value)
        assert [j.status for j in seen] == ["running", "failed"]  # called on changes only
        srv.script = [(200, {}, {**_JOB, "status": "canceled"})]
        with pytest.raises(JobCanceled):
            c.wait(_JOB["id"], poll_interval=0.01)
        srv.script = [(200, {}, running)]
        with pytest.raises(WaitTimeout) as t:
            c.wait(_JOB["id"], timeout=0.2, poll_interval=0.05)
        assert isinstance(t.value, TimeoutError) and t.value.job.status == "running"


@pytest.mark.integration
def test_unreachable_server_is_a_transport_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "k", max_retries=1, backoff_base=0.01) as c, pytest.raises(TransportError) as e:
        c.get_job("x")
    assert "cannot connect" in str(e.value) and isinstance(e.value.__cause__, httpx.ConnectError)


@pytest.mark.unit
def test_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_URL", "http://example.invalid:9000/")
    monkeypatch.setenv("MODELPRESS_API_KEY", "mp_env_key")
    with Client() as c:
        assert c.base_url == "http://example.invalid:9000" and c.api_key == "mp_env_key"
    monkeypatch.delenv("MODELPRESS_URL")
    with Client(api_key="x") as c:
        assert c.base_url == modelpress.DEFAULT_URL and c.api_key == "x"


@pytest.mark.unit
def test_step_forms() -> None:
    want = [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}, {"method": "quantize.cast", "params": {}}]
    assert modelpress.normalize_steps([("prune.magnitude", {"sparsity": 0.5}), "quantize.cast"]) == want
    assert (
        modelpress.normalize_steps(
            [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}, {"method": "quantize.cast"}]
        )
        == want
    )
    assert modelpress.normalize_steps(("prune.magnitude", {"sparsity": 0.5})) == want[:1]
    with pytest.raises(ValueError):
        modelpress.normalize_steps([{"method": "x", "parms": {}}])


@pytest.mark.integration
def test_import_is_light() -> None:
    code = (
        "import sys; import modelpress; from modelpress import Client, AsyncClient; "
        "print(','.join(sorted(m for m in ('torch', 'transformers', 'app', 'core', 'worker', 'fastapi', 'sqlalchemy', "
        "'celery', 'numpy') if m in sys.modules)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
