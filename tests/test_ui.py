"""The web dashboard (/ui): its sign-in and CSRF rules in-process (unit), and the whole flow in the
machine's real headless Chromium against the embedded service (e2e): sign in, upload a model
through the form, watch a sweep's job finish live on the jobs list, open its page (report with
charts, download), the sweep's frontier, sign out. No page may request another host or log a
console error. Screenshots go to ``$MODELPRESS_TEST_ARTIFACTS/ui`` (default
``var/test-artifacts/ui`` in the repository), kept as CI artifacts."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.ui import session
from app.ui.endpoints import UI_CSP

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("MODELPRESS_TEST_ARTIFACTS") or ROOT / "var" / "test-artifacts") / "ui"
TIMEOUT_MS = 60_000


# -- unit: the cookie and the CSRF rule -----------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("headers", "base", "ok"),
    [
        ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, "", True),
        ({"host": "example.com", "origin": "https://example.com"}, "", True),
        ({"host": "example.com:80", "origin": "http://example.com"}, "", True),
        # Behind a proxy that rewrites Host, the configured public base URL names the dashboard.
        ({"host": "10.0.0.5:8000", "origin": "https://mp.example.com"}, "https://mp.example.com/", True),
        ({"host": "127.0.0.1:8000", "referer": "http://127.0.0.1:8000/ui/models"}, "", True),
        ({"host": "127.0.0.1:8000", "origin": "http://evil.example"}, "", False),
        ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8001"}, "", False),
        ({"host": "127.0.0.1:8000", "origin": "null"}, "", False),
        ({"host": "127.0.0.1:8000"}, "", False),  # neither Origin nor Referer
        ({"host": "127.0.0.1:8000", "origin": "http://evil.example", "referer": "http://127.0.0.1:8000/"}, "", False),
    ],
)
def test_same_origin(headers: dict[str, str], base: str, ok: bool) -> None:
    assert session.same_origin(headers, base) is ok


@pytest.mark.unit
def test_pages_without_a_cookie_and_posts_from_elsewhere() -> None:
    client = TestClient(create_app(), follow_redirects=False)
    assert not any(p.startswith("/ui") for p in client.app.openapi()["paths"])
    login = client.get("/ui/login")
    assert login.status_code == 200 and login.headers["content-security-policy"] == UI_CSP
    assert 'action="/ui/login"' in login.text and "http://" not in login.text and "https://" not in login.text
    for path in ("/ui", "/ui/jobs", "/ui/jobs/x", "/ui/models", "/ui/sweeps/x", "/ui/jobs/x/artifact"):
        res = client.get(path)
        assert res.status_code == 303 and res.headers["location"].startswith("/ui/"), path
    for path in ("/ui/login", "/ui/logout"):
        res = client.post(path, data={"key": "mp_x_y"}, headers={"Origin": "http://evil.example"})
        assert res.status_code == 403 and "csrf_origin" in res.text, path
        assert client.post(path, data={"key": "mp_x_y"}).status_code == 403  # no Origin at all
    for name in ("dashboard.js", "dashboard.css"):
        asset = client.get(f"/ui/static/{name}")
        assert asset.status_code == 200 and "http://" not in asset.text and "https://" not in asset.text
    assert client.get("/ui/static/secret_key").status_code == 404


@pytest.mark.unit
def test_cookie_options() -> None:
    opts = session.cookie_options(secure=True)
    assert opts["httponly"] is True and opts["samesite"] == "strict" and opts["path"] == "/ui" and opts["secure"]
    assert session.cookie_options(secure=False)["secure"] is False


# -- e2e: the dashboard in Chromium ---------------------------------------------------------------


def _check_live_stream(base: str, key: str, job_id: str) -> None:
    """/ui/jobs/live with the cookie, after the job finished: its state, then ``end`` at once (an
    id that is not the tenant's job is not told)."""
    started = time.monotonic()
    with httpx.stream(
        "GET",
        f"{base}/ui/jobs/live",
        params={"ids": f"{job_id},no-such-job"},
        headers={"Cookie": f"{session.COOKIE}={key}"},
    ) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        body = "".join(res.iter_text())
    assert time.monotonic() - started < 5
    events = [block.split("\n")[0] for block in body.strip().split("\n\n")]
    assert events == ["event: job", "event: end"], body
    assert f'"job_id":"{job_id}","status":"succeeded"' in body


def _gpt2_with_tokenizer(tiny: dict[str, Path], path: Path) -> list[str]:
    """The session's tiny GPT-2 with a tokenizer beside it (so its report has perplexity, and its
    sweep a frontier plot): the files a person picks in the upload form. (The tokenizer's ids fit
    the model's vocabulary of 500; transformers is imported already, by the ``tiny`` fixture.)"""
    from tests.tokenizer_util import build_tokenizer

    shutil.copytree(tiny["gpt2"], path)
    build_tokenizer().save_pretrained(path)
    return [str(p) for p in sorted(path.iterdir())]


@pytest.mark.e2e
def test_dashboard_in_chromium(embedded, tiny: dict[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "no chromium executable on PATH (Debian: apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = embedded.service.url
    api = embedded.client()
    requests: list[str] = []
    problems: list[str] = []

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            context.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))

            # Sign in: a wrong key is refused on the form, the right one lands on the jobs.
            page.goto(f"{base}/ui")
            assert urlsplit(page.url).path == "/ui/login"
            page.fill("#key", "mp_000000000000_not-a-key")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("not valid")
            shot(page, "1-sign-in")
            page.fill("#key", embedded.key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/ui/jobs")
            cookie = next(c for c in context.cookies() if c["name"] == session.COOKIE)
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
            # The cookie is the dashboard's only: the API still wants the bearer key.
            assert (
                httpx.get(f"{base}/v1/jobs", headers={"Cookie": f"{session.COOKIE}={embedded.key}"}).status_code == 401
            )

            # Upload through the form: a refusal is the API's problem, shown above the form.
            page.goto(f"{base}/ui/models")
            (tmp_path / "weights.safetensors").write_bytes(b"not a safetensors file")
            page.set_input_files("#files", str(tmp_path / "weights.safetensors"))
            page.click("#upload button[type=submit]")
            expect(page.locator(".error")).to_contain_text("weights.safetensors")
            assert urlsplit(page.url).path == "/ui/models"
            page.set_input_files("#files", _gpt2_with_tokenizer(tiny, tmp_path / "gpt2"))
            page.fill("#name", "ui-gpt2")
            page.click("#upload button[type=submit]")
            page.wait_for_url(f"{base}/ui/models/*")
            model_id = urlsplit(page.url).path.rsplit("/", 1)[1]
            expect(page.locator("#model")).to_contain_text("GPT2LMHeadModel")
            assert api.get(f"/v1/models/{model_id}").json()["name"] == "ui-gpt2"
            shot(page, "2-model")

            # A one-point sweep: its job shows up on the list and turns succeeded without a reload.
            r = api.post(
                "/v1/sweeps",
                json={
                    "model_id": model_id,
                    "name": "ui-sweep",
                    "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
                    "vary": {"steps[0].params.sparsity": [0.5]},
                    "evaluation": {"seq_len": 16, "runs": 1, "warmup": 0, "max_samples": 4},
                },
            )
            assert r.status_code == 202, r.text
            sweep_id, job_id = r.json()["id"], r.json()["points"][0]["job_id"]
            page.goto(f"{base}/ui/jobs")
            page.evaluate("window.notReloaded = true")
            badge = page.locator(f'tr[data-job="{job_id}"] [data-role=status]')
            # Submitted a moment ago: unfinished when the page was drawn, so what follows is live.
            assert badge.inner_text() in ("queued", "running")
            expect(badge).to_have_text("succeeded", timeout=TIMEOUT_MS)
            assert page.evaluate("window.notReloaded === true")
            shot(page, "3-jobs")
            _check_live_stream(base, embedded.key, job_id)

            # The job's page: its report with charts in a frame, and the download.
            page.click(f'tr[data-job="{job_id}"] a')
            page.wait_for_url(f"{base}/ui/jobs/{job_id}")
            report = page.frame_locator("#report")
            expect(report.locator("h1")).to_contain_text("Job report", timeout=TIMEOUT_MS)
            expect(report.locator("svg.chart").first).to_be_visible(timeout=TIMEOUT_MS)
            shot(page, "4-job")
            with page.expect_download() as download:
                page.click("#download")
            path = download.value.path()
            assert download.value.suggested_filename == "model.zip" and zipfile.is_zipfile(path)
            with zipfile.ZipFile(path) as z:
                assert "config.json" in z.namelist()

            # The sweep's page: its frontier plot, drawn once the sweep has its point's figures
            # (the sweep settles just after its job: wait for that, not for the job alone).
            deadline = time.monotonic() + TIMEOUT_MS / 1000
            while api.get(f"/v1/sweeps/{sweep_id}").json()["status"] != "succeeded" and time.monotonic() < deadline:
                time.sleep(0.2)
            page.goto(f"{base}/ui/sweeps")
            page.click(f'a[href="/ui/sweeps/{sweep_id}"]')
            frontier = page.frame_locator("#report")
            expect(frontier.locator("h1")).to_contain_text("Sweep", timeout=TIMEOUT_MS)
            expect(frontier.locator("svg").first).to_be_visible(timeout=TIMEOUT_MS)
            shot(page, "5-sweep")

            # Sign out: the cookie is gone and the pages ask to sign in again.
            page.click("#signout")
            page.wait_for_url(f"{base}/ui/login")
            assert not [c for c in context.cookies() if c["name"] == session.COOKIE]
            page.goto(f"{base}/ui/jobs")
            assert urlsplit(page.url).path == "/ui/login"
        finally:
            browser.close()

    here = urlsplit(base).netloc
    elsewhere = [u for u in requests if not u.startswith("data:") and urlsplit(u).netloc != here]
    assert elsewhere == [], elsewhere
    assert len(requests) > 10  # the pages, their script and stylesheet, the frames, the streams
    # Chromium logs a page answered with an error status: the wrong key's 401 and the refused
    # upload's 422 are the only ones, and nothing else went wrong (CSP, script, stream).
    loaded = "error: Failed to load resource: the server responded with a status of"
    assert problems == [f"{loaded} 401 (Unauthorized)", f"{loaded} 422 (Unprocessable Entity)"], problems


@pytest.mark.integration
def test_model_page_submits_a_recipe_job(embedded, tmp_path: Path) -> None:
    """The model page's form: a named recipe (and a dataset for those that calibrate) submitted as
    POST /v1/jobs would be; a refusal is the API's problem drawn above the form, nothing recorded;
    a form posted from another origin is refused."""
    from tests.helpers import table_rows, upload_dir, wait_job
    from tests.tokenizer_util import build_models

    base, api = embedded.service.url, embedded.client()
    model_id = upload_dir(api, build_models(tmp_path / "models")["llama"], name="ui-llama").json()["id"]
    ui = httpx.Client(base_url=base, follow_redirects=False, timeout=60)
    origin = {"Origin": base}
    assert ui.post("/ui/login", data={"key": embedded.key}, headers=origin).status_code == 303

    form = ui.get(f"/ui/models/{model_id}")
    assert form.status_code == 200 and f'action="/ui/models/{model_id}/jobs"' in form.text
    assert '<option value="w4-best"' in form.text and "needs a dataset" in form.text

    jobs_before = table_rows(embedded, "jobs")
    refused = ui.post(f"/ui/models/{model_id}/jobs", data={"recipe": "sparse-50-fast"}, headers=origin)
    assert refused.status_code == 422 and 'class="error"' in refused.text and "dataset" in refused.text
    unknown = ui.post(f"/ui/models/{model_id}/jobs", data={"recipe": "w9"}, headers=origin)
    assert unknown.status_code == 422 and "unknown recipe" in unknown.text
    assert ui.post(f"/ui/models/{model_id}/jobs", data={"recipe": "w8"}).status_code == 403  # no Origin
    assert table_rows(embedded, "jobs") == jobs_before

    made = ui.post(f"/ui/models/{model_id}/jobs", data={"recipe": "w8", "dataset_id": ""}, headers=origin)
    assert made.status_code == 303 and made.headers["location"].startswith("/ui/jobs/"), made.text
    job = wait_job(api, made.headers["location"].rsplit("/", 1)[1])
    assert job["status"] == "succeeded" and job["recipe"] == "w8" and job["model_id"] == model_id, job
    assert [s["method"] for s in job["steps"]] == ["quantize.weight_only"]
