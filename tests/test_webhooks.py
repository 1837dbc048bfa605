"""Job webhooks: the SSRF rule, the transactional outbox, the dispatcher's retries and give-up, and
the whole path on the real stacks (a job ends → a signed POST reaches a receiver on loopback, which
the test stacks allow-list with MODELPRESS_WEBHOOK_ALLOW_NETWORKS=127.0.0.1/32)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tests.helpers import upload_dir, wait_job

STEPS = [{"method": "quantize.cast", "params": {"dtype": "float16"}}]
NO_EVAL = {"enabled": False}


# --- a receiver on loopback ---------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that answers each POST with the next status of ``script`` (the
    last one repeats) and records what it got."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    n = len(receiver.requests)
                    receiver.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "at": time.time(),
                        }
                    )
                    status = receiver.script[min(n, len(receiver.script) - 1)]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?source=modelpress"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[callable]:
    made: list[Receiver] = []

    def make(*script: int) -> Receiver:
        made.append(Receiver(list(script)))
        return made[-1]

    yield make
    for r in made:
        r.close()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver does (the README's snippet): HMAC-SHA256 over "<timestamp>.<body>", and a
    timestamp close to now."""
    timestamp = headers["x-modelpress-timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return (
        hmac.compare_digest(expected, headers["x-modelpress-signature"])
        and abs(time.time() - int(timestamp)) <= tolerance_s
    )


# --- the SSRF rule --------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),  # a name: its addresses are what is checked
        ("http://2130706433/", "loopback"),  # 127.0.0.1 spelled as one number
        ("http://0x7f.1/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4-mapped IPv6
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[2002:7f00:1::1]/", "embedding 127.0.0.1"),  # 6to4 around loopback
        ("http://10.0.0.1/", "private"),
        ("http://192.168.1.10/", "private"),
        ("http://172.16.5.4/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
        ("http://[fe80::1]/", "link-local"),
        ("http://100.64.0.1/", "not globally routable"),  # carrier-grade NAT
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("https://240.0.0.1/", "reserved"),
    ],
)
def test_checker_refuses_non_global_targets(url, kind):
    from core.webhooks import ssrf

    with pytest.raises(ssrf.TargetRefused) as e:
        ssrf.check(url, "")
    assert kind in e.value.reason


@pytest.mark.unit
def test_checker_allow_list_and_url_rules():
    from core.webhooks import ssrf

    t = ssrf.check("http://127.0.0.1:9/hook", "127.0.0.1/32")
    assert (t.address, t.host, t.port, t.scheme) == ("127.0.0.1", "127.0.0.1", 9, "http")
    assert ssrf.check("http://[::ffff:127.0.0.1]:9/", "127.0.0.1/32").address == "::ffff:127.0.0.1"
    assert ssrf.check("http://10.1.2.3/", " 192.168.0.0/16 , 10.0.0.0/8").address == "10.1.2.3"
    with pytest.raises(ssrf.TargetRefused):  # allow-listing 127.0.0.1 does not open the rest of 127/8
        ssrf.check("http://127.0.0.2/", "127.0.0.1/32")
    with pytest.raises(ssrf.TargetRefused):
        ssrf.check("http://169.254.169.254/", "127.0.0.1/32")
    assert ssrf.check("https://93.184.215.14/x", "").address == "93.184.215.14"  # a public address
    for bad in (
        "ftp://example.com/",
        "http:///path",
        "//example.com/",
        "http://exa mple.com/",
        "http://h:99999/",
        "http://example.com/#frag",
        "http://" + "a" * 2000 + ".com/",
    ):
        with pytest.raises(ValueError):
            ssrf.parse(bad)
    with pytest.raises(ssrf.TargetUnresolvable):
        ssrf.check("http://no-such-host.invalid/", "")
    with pytest.raises(ValueError, match="MODELPRESS_WEBHOOK_ALLOW_NETWORKS"):
        ssrf.check("http://127.0.0.1/", "not-a-network")


@pytest.mark.unit
def test_signature_and_backoff():
    from core.config import Settings
    from core.webhooks.signature import signature
    from worker.webhooks import backoff_s

    body = b'{"event":"job.succeeded"}'
    sig = signature("s3cret", 1700000000, body)
    assert sig == "sha256=" + hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert verify(
        "s3cret", {"x-modelpress-timestamp": "1700000000", "x-modelpress-signature": sig}, body, tolerance_s=10**10
    )
    s = Settings(webhook_backoff_s=2, webhook_backoff_max_s=10)
    assert [backoff_s(s, n) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


@pytest.mark.integration
def test_request_goes_to_the_checked_address_under_the_url_host():
    import httpx

    from core.webhooks.ssrf import Target
    from worker.webhooks import _request

    with httpx.Client(trust_env=False) as client:
        t = Target("https://hooks.example.com:8443/in?x=1", "https", "hooks.example.com", 8443, "93.184.215.14")
        req = _request(client, t, b"{}", {"X-Modelpress-Event": "job.failed"})
        assert str(req.url) == "https://93.184.215.14:8443/in?x=1"  # no second DNS lookup (rebinding)
        assert req.headers["host"] == "hooks.example.com:8443"
        assert req.extensions["sni_hostname"] == "hooks.example.com"  # the certificate is checked for the name
        t6 = Target("http://[2606:2800:220:1::1]/h", "http", "2606:2800:220:1::1", 80, "2606:2800:220:1::1")
        req = _request(client, t6, b"{}", {})
        assert str(req.url) == "http://[2606:2800:220:1::1]/h" and "sni_hostname" not in req.extensions


# --- outbox and dispatcher on a bare SQLite database -------------------------------------------


@pytest.fixture
def local(tmp_path, monkeypatch):
    """This process's settings, engine and secret pointed at a fresh SQLite database (the
    dispatcher's own ``get_sessionmaker``), restored afterwards."""
    from core import config, db, signing
    from core.tables import Base

    def clear() -> None:
        for fn in (config.get_settings, db.get_engine, db.get_sessionmaker, signing._key):
            fn.cache_clear()

    for k, v in {
        "MODELPRESS_MODE": "embedded",
        "MODELPRESS_DATA_DIR": str(tmp_path),
        "MODELPRESS_DATABASE_URL": f"sqlite:///{tmp_path / 'wh.sqlite3'}",
        "MODELPRESS_SECRET_KEY": "test-service-key",
        "MODELPRESS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
        "MODELPRESS_WEBHOOK_BACKOFF_S": "0.05",
        "MODELPRESS_WEBHOOK_TIMEOUT_S": "5",
    }.items():
        monkeypatch.setenv(k, v)
    clear()
    Base.metadata.create_all(db.get_engine())
    yield config.get_settings()
    db.get_engine().dispose()
    monkeypatch.undo()
    clear()


def _running_job(session: Session, url: str | None, tenant: str = "t") -> str:
    from core.tables import Job, Tenant

    t = session.scalar(select(Tenant).where(Tenant.name == tenant))
    if t is None:
        t = Tenant(name=tenant)
        session.add(t)
        session.flush()
    job = Job(tenant_id=t.id, model_id=None, steps=[], status="running", attempt=1, webhook_url=url)
    session.add(job)
    session.commit()
    return job.id


def _deliveries(session: Session, job_id: str) -> list:
    from core.tables import WebhookDelivery

    session.expire_all()
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))


@pytest.mark.unit
def test_outbox_row_is_written_with_the_terminal_status_and_only_then(local):
    from core.db import get_sessionmaker
    from core.jobs import repository as jobs_repo
    from core.tables import Job, utcnow

    with get_sessionmaker()() as s:
        plain = _running_job(s, None)
        assert jobs_repo.finish(s, plain, 1, "succeeded", progress_stage="done")
        assert _deliveries(s, plain) == []  # no webhook_url, no delivery

        hooked = _running_job(s, "http://127.0.0.1:9/h")
        assert jobs_repo.progress(s, hooked, 1, "loading", 0.5, 60)
        assert _deliveries(s, hooked) == []  # not terminal
        assert not jobs_repo.finish(s, hooked, 2, "failed", error_code="x", error_message="y")  # fenced off
        assert _deliveries(s, hooked) == []
        assert jobs_repo.finish(
            s, hooked, 1, "failed", error_code="boom", error_message="it broke", progress_stage="failed"
        )
        [d] = _deliveries(s, hooked)
        assert (d.event, d.status, d.attempts, d.url) == ("job.failed", "pending", 0, "http://127.0.0.1:9/h")
        assert d.payload["id"] == d.id and d.payload["event"] == "job.failed"
        job = d.payload["job"]
        assert (
            job["id"] == hooked
            and job["status"] == "failed"
            and job["error"] == {"code": "boom", "message": "it broke"}
        )
        assert job["webhook_url"] == "http://127.0.0.1:9/h" and job["finished_at"]

        # A queued job canceled from the API: job.canceled in the cancel's transaction ...
        queued = _running_job(s, "http://127.0.0.1:9/c")
        s.execute(update(Job).where(Job.id == queued).values(status="queued", attempt=0))
        s.commit()
        assert jobs_repo.cancel_queued(s, queued)
        s.rollback()  # ... and rolled back with it: no canceled job, no delivery
        assert s.get(Job, queued).status == "queued" and _deliveries(s, queued) == []
        assert jobs_repo.cancel_queued(s, queued)
        s.commit()
        assert [d.event for d in _deliveries(s, queued)] == ["job.canceled"]

        # A poison job failed by give_up.
        poison = _running_job(s, "http://127.0.0.1:9/p")
        s.execute(
            update(Job).where(Job.id == poison).values(attempt=3, lease_expires_at=utcnow() - timedelta(seconds=60))
        )
        s.commit()
        assert jobs_repo.give_up(s, poison, 3)
        [d] = _deliveries(s, poison)
        assert d.event == "job.failed" and d.payload["job"]["error"]["code"] == "too_many_attempts"


@pytest.mark.integration
def test_dispatcher_retries_then_gives_up_after_max_attempts(local, receiver):
    from core.db import get_sessionmaker
    from core.jobs import repository as jobs_repo
    from core.tables import Job
    from core.webhooks.signature import secret_for
    from worker.webhooks import dispatch_once

    settings = local.model_copy(update={"webhook_max_attempts": 3, "webhook_backoff_s": 0.05})
    down = receiver(503)
    with get_sessionmaker()() as s:
        job_id = _running_job(s, down.url)
        assert jobs_repo.finish(s, job_id, 1, "succeeded", progress_stage="done")
        tenant_id = s.get(Job, job_id).tenant_id
        deadline = time.monotonic() + 10
        while _deliveries(s, job_id)[0].status == "pending" and time.monotonic() < deadline:
            dispatch_once(settings)
            time.sleep(0.02)
        [d] = _deliveries(s, job_id)
    assert (d.status, d.attempts, d.last_status_code, d.last_error) == ("failed", 3, 503, "HTTP 503")
    assert d.next_attempt_at is None and d.delivered_at is None
    assert len(down.requests) == 3
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(down.requests)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1, gaps  # doubling backoff
    ids = {r["headers"]["x-modelpress-delivery"] for r in down.requests}
    assert ids == {d.id}, "every retry is the same delivery"
    for r in down.requests:
        assert r["path"] == "/hook?source=modelpress"
        assert r["headers"]["content-type"] == "application/json"
        assert r["headers"]["x-modelpress-event"] == "job.succeeded"
        assert r["headers"]["host"] == down.url.split("/")[2]
        assert verify(secret_for(tenant_id), r["headers"], r["body"])
        assert json.loads(r["body"]) == d.payload
    assert dispatch_once(settings) == 0  # nothing left to do


@pytest.mark.integration
def test_a_deleted_jobs_pending_delivery_is_still_sent_then_removed(local, receiver):
    """A client that deletes a job right after it ended still gets the webhook (the delivery is
    not deleted with the job); once final, the delivery of a deleted job leaves no row."""
    from core.db import get_sessionmaker
    from core.jobs import repository as jobs_repo
    from core.tables import WebhookDelivery
    from worker.webhooks import dispatch_once

    settings = local.model_copy(update={"webhook_max_attempts": 5, "webhook_backoff_s": 0.05})
    flaky = receiver(503, 200)
    with get_sessionmaker()() as s:
        job_id = _running_job(s, flaky.url)
        assert jobs_repo.finish(s, job_id, 1, "succeeded", progress_stage="done")
        assert dispatch_once(settings) == 1 and len(flaky.requests) == 1  # 503: pending, due again
        assert jobs_repo.delete_finished(s, [job_id])
        s.commit()
        [d] = _deliveries(s, job_id)
        assert d.status == "pending"
        deadline = time.monotonic() + 10
        while len(flaky.requests) < 2 and time.monotonic() < deadline:
            dispatch_once(settings)
            time.sleep(0.02)
        assert json.loads(flaky.requests[1]["body"])["job"]["id"] == job_id
        assert _deliveries(s, job_id) == []  # delivered, job gone: removed

        # A delivery already final goes with its job; one of a live job stays after it is final.
        kept = _running_job(s, flaky.url)
        assert jobs_repo.finish(s, kept, 1, "succeeded", progress_stage="done")
        assert dispatch_once(settings) == 1
        [d] = _deliveries(s, kept)
        assert d.status == "delivered"
        assert jobs_repo.delete_finished(s, [kept])
        s.commit()
        assert _deliveries(s, kept) == []
        s.expire_all()
        assert s.scalar(select(func.count()).select_from(WebhookDelivery)) == 0


@pytest.mark.integration
def test_dispatcher_refuses_a_private_target_at_delivery_and_never_sends_a_try_twice(local, receiver):
    from core.db import get_sessionmaker
    from core.jobs import repository as jobs_repo
    from core.webhooks import repository as repo
    from worker.webhooks import dispatch_once

    with get_sessionmaker()() as s:
        # Allowed when submitted, not any more (the allow-list changed, or the name now points
        # elsewhere): refused at the try, failed at once with the reason, nothing sent.
        job_id = _running_job(s, "http://10.0.0.1:9/hook")
        assert jobs_repo.finish(s, job_id, 1, "succeeded", progress_stage="done")
        assert dispatch_once(local) == 1
        [d] = _deliveries(s, job_id)
        assert d.status == "failed" and d.attempts == 1 and d.last_status_code is None
        assert d.last_error.startswith("refused: 10.0.0.1 is private"), d.last_error

        # Claims are compare-and-set: eight sessions racing for one due try, one wins.
        ok = receiver(200)
        job_id = _running_job(s, ok.url)
        assert jobs_repo.finish(s, job_id, 1, "succeeded", progress_stage="done")
    barrier = threading.Barrier(8)
    won: list = []

    def race() -> None:
        with get_sessionmaker()() as mine:
            barrier.wait()
            claim = repo.claim_next(mine, 3, 60)
            if claim is not None:
                won.append(claim)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c.attempt for c in won] == [1]
    with get_sessionmaker()() as s:
        assert dispatch_once(local) == 0, "the try is held by its claimer until its lease ends"
        assert repo.record(s, won[0], delivered=True, final=True, status_code=204, error=None, retry_in_s=1)
        assert not repo.record(s, won[0], delivered=True, final=True, status_code=204, error=None, retry_in_s=1)
        [d] = _deliveries(s, job_id)
        assert (d.status, d.attempts, d.last_status_code) == ("delivered", 1, 204) and d.delivered_at


# --- the real stacks ------------------------------------------------------------------------------


def _wait_delivery(client, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}/webhook-deliveries")
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        if items and items[0]["status"] != "pending":
            return items[0]
        time.sleep(0.2)
    raise AssertionError(f"no final delivery for job {job_id}: {items}")


@pytest.mark.integration
def test_job_webhook_is_signed_retried_and_recorded(stack, tiny, receiver):
    c = stack.client()
    flaky = receiver(500, 502, 200)  # fails twice, then takes it
    model = upload_dir(c, tiny["gpt2"])
    assert model.status_code == 201, model.text
    r = c.post(
        "/v1/jobs",
        json={"model_id": model.json()["id"], "steps": STEPS, "evaluation": NO_EVAL, "webhook_url": flaky.url},
    )
    assert r.status_code == 202, r.text
    assert r.json()["webhook_url"] == flaky.url
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job

    d = _wait_delivery(c, job["id"])
    assert d["status"] == "delivered", d
    assert d["attempts"] == 3 and d["last_status_code"] == 200 and d["last_error"] is None
    assert d["event"] == "job.succeeded" and d["url"] == flaky.url and d["job_id"] == job["id"]
    assert d["delivered_at"] and d["next_attempt_at"] is None

    secret = c.get("/v1/webhooks/secret")
    assert secret.status_code == 200 and secret.headers["cache-control"] == "no-store"
    key = secret.json()["secret"]
    assert len(flaky.requests) == 3
    for req in flaky.requests:
        h = req["headers"]
        assert h["x-modelpress-event"] == "job.succeeded" and h["x-modelpress-delivery"] == d["id"]
        assert verify(key, h, req["body"]), h
        assert not verify(key, h, req["body"] + b" "), "the signature covers the body"
        payload = json.loads(req["body"])
        assert payload["id"] == d["id"] and payload["event"] == "job.succeeded"
        # The job as GET /v1/jobs/{id} shows it.
        assert payload["job"] == job
    # Another tenant: another secret, and the deliveries are not theirs to read.
    other = stack.client(stack.other_key)
    assert other.get("/v1/webhooks/secret").json()["secret"] != key
    r = other.get(f"/v1/jobs/{job['id']}/webhook-deliveries")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


@pytest.mark.integration
def test_private_and_bad_webhook_urls_are_refused_at_submit(stack, tiny):
    c = stack.client()
    model = upload_dir(c, tiny["gpt2"]).json()

    def submit(url: str):  # noqa: ANN202
        return c.post(
            "/v1/jobs", json={"model_id": model["id"], "steps": STEPS, "evaluation": NO_EVAL, "webhook_url": url}
        )

    for url, what in (
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.1/hook", "private"),
        ("http://127.0.0.2:8080/hook", "loopback"),
        ("http://[::1]:8080/", "loopback"),
    ):
        r = submit(url)
        assert r.status_code == 422, (url, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["code"] == "webhook_url_refused" and what in body["detail"], body
        assert body["errors"] == [
            {"loc": ["body", "webhook_url"], "msg": body["errors"][0]["msg"], "type": "webhook_url_refused"}
        ]
    r = submit("http://no-such-host.invalid/hook")
    assert r.status_code == 422 and r.json()["code"] == "webhook_url_unresolvable", r.text
    for url in ("ftp://example.com/hook", "not a url", "http://" + "a" * 2001):
        r = submit(url)
        assert r.status_code == 422 and r.json()["code"] == "validation_error", (url, r.text)
        assert r.json()["errors"][0]["loc"] == ["body", "webhook_url"]
    # Nothing was created by the refused submits.
    assert not [j for j in c.get("/v1/jobs", params={"limit": 200}).json()["items"] if j["model_id"] == model["id"]]
