"""Cluster mode has one secret: processes refuse to start without it, nothing falls back to a key
of its own host, and what one host signs verifies on every other.

The cross-host test runs three "hosts" on this machine, each with a data folder of its own (where
a per-host ``secret_key`` file used to be made) and one shared artifact store (as S3 would be):
API A with a worker, and API B. Links made on either open on the other; webhook deliveries signed
by the worker verify with the secret that either API hands the tenant (GET /v1/webhooks/secret),
exactly as the README tells a receiver to check them. Before this, a worker and an API host
without a shared data folder derived different secrets: 0 of 10 deliveries verified."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests import test_webhooks
from tests.helpers import MODELPRESS, REDIS_URL, Service, safetensors_bytes, wait_job
from tests.servers import private_database
from tests.test_webhooks import verify

receiver = test_webhooks.receiver  # the webhook receiver fixture, shared

PUBLIC = "https://press.example.com/mp"
JOBS = 10


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    return {**env, **extra}


def _cluster(db_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "MODELPRESS_MODE": "cluster",
        "MODELPRESS_DATABASE_URL": db_url,
        "MODELPRESS_BROKER_URL": REDIS_URL,
        "MODELPRESS_DATA_DIR": str(data_dir),
        **extra,
    }


# --- refusing to start -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["serve", "--port", "9"], {}, "MODELPRESS_SECRET_KEY"),
        (["worker"], {}, "MODELPRESS_SECRET_KEY"),
        (["reconcile"], {}, "MODELPRESS_SECRET_KEY"),
        (["serve", "--port", "9"], {"MODELPRESS_SECRET_KEY": "short"}, "at least 32"),
        (
            ["serve", "--port", "9"],
            {"MODELPRESS_SECRET_KEY": "k" * 40, "MODELPRESS_PUBLIC_BASE_URL": "press.example.com"},
            "MODELPRESS_PUBLIC_BASE_URL",
        ),
    ],
    ids=["serve", "worker", "reconcile", "short-secret", "bad-public-url"],
)
def test_cluster_processes_refuse_to_start(tmp_path, args, env, says):
    # The database is never reached: the check comes first (an unreachable URL proves it).
    cfg = _cluster("postgresql+psycopg://nobody@127.0.0.1:1/none", tmp_path, **env)
    started = time.monotonic()
    res = subprocess.run([MODELPRESS, *args], env=_env(**cfg), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert f"modelpress {args[0]}: refusing to start" in res.stderr and says in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "secret_key").exists()


@pytest.mark.integration
def test_a_worker_started_without_the_cli_stops_too(tmp_path):
    """``celery -A worker.celery_app worker`` skips `modelpress worker`'s check; the webhook
    dispatcher, started when the worker is ready, stops the process before it signs anything."""
    import sys

    cfg = _cluster("postgresql+psycopg://nobody@127.0.0.1:1/none", tmp_path)
    code = (
        "import threading; from worker.webhooks import start_background; "
        "start_background(threading.Event()); print('ran')"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env(**cfg), capture_output=True, text=True, timeout=60)
    assert res.returncode == 78 and "ran" not in res.stdout, (res.returncode, res.stdout, res.stderr)
    assert "MODELPRESS_SECRET_KEY" in res.stderr


@pytest.mark.unit
def test_no_fallback_to_a_host_key_in_cluster_mode(tmp_path, monkeypatch):
    """In-process: the key lookup itself refuses in cluster mode (whatever entry point was used),
    and embedded mode keeps its per-host key file."""
    from core import config, signing
    from core.webhooks.signature import secret_for

    def use(**env: str) -> None:
        for k in [k for k in os.environ if k.startswith("MODELPRESS_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        config.get_settings.cache_clear()
        signing._key.cache_clear()

    try:
        use(**_cluster("postgresql+psycopg://x@127.0.0.1:1/x", tmp_path))
        with pytest.raises(signing.MissingSecretKey, match="MODELPRESS_SECRET_KEY"):
            secret_for("tenant")
        with pytest.raises(signing.MissingSecretKey):
            signing.sign("job", "j", 60)
        assert not (tmp_path / "secret_key").exists()

        use(**_cluster("postgresql+psycopg://x@127.0.0.1:1/x", tmp_path, MODELPRESS_SECRET_KEY="s" * 32))
        shared = secret_for("tenant")
        use(**_cluster("postgresql+psycopg://x@127.0.0.1:1/x", tmp_path / "elsewhere", MODELPRESS_SECRET_KEY="s" * 32))
        assert secret_for("tenant") == shared, "the same secret key gives the same tenant secret on any host"

        use(MODELPRESS_MODE="embedded", MODELPRESS_DATA_DIR=str(tmp_path))
        secret_for("tenant")
        assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    finally:
        monkeypatch.undo()
        config.get_settings.cache_clear()
        signing._key.cache_clear()


# --- three hosts, one secret -------------------------------------------------------------------------


class Hosts:
    def __init__(self, a: Service, b: Service, worker: Service, key: str, data: dict[str, Path]) -> None:
        self.a, self.b, self.worker, self.key, self.data = a, b, worker, key, data


@pytest.fixture(scope="module")
def hosts_database() -> Iterator[str]:
    """A database of its own: the session's cluster stack shares ``pg_database``, and its worker's
    webhook dispatcher (signing with that stack's secret) would deliver these jobs' webhooks too."""
    with private_database() as url:
        yield url


@pytest.fixture(scope="module")
def hosts(hosts_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    pg_database = hosts_database
    root = tmp_path_factory.mktemp("hosts")
    shared = {
        "MODELPRESS_SECRET_KEY": "cluster-secret-" + uuid.uuid4().hex,
        "MODELPRESS_BROKER_KEY_PREFIX": f"mptest-hosts-{uuid.uuid4().hex[:8]}:",
        "MODELPRESS_STORAGE_URL": str(root / "object-store"),  # what S3 is to real hosts
        "MODELPRESS_PUBLIC_BASE_URL": PUBLIC,
        "MODELPRESS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
        "MODELPRESS_WEBHOOK_BACKOFF_S": "0.2",
        "MODELPRESS_WEBHOOK_POLL_INTERVAL_S": "0.2",
    }
    data = {name: root / name for name in ("a", "b", "w")}
    for d in data.values():
        d.mkdir()
    a = Service(_cluster(pg_database, data["a"], **shared), data["a"], worker=False)
    b = Service(_cluster(pg_database, data["b"], **shared), data["b"], worker=False)
    w = Service(_cluster(pg_database, data["w"], **shared), data["w"], worker=False)
    a.cli("migrate")
    key = a.cli("keys", "create", "--tenant", f"hosts-{uuid.uuid4().hex[:6]}")
    started: list[Service] = []
    try:
        w.start_worker()
        started.append(w)
        for svc in (a, b):
            started.append(svc)
            svc.start()
        yield Hosts(a, b, w, key, data)
    finally:
        for svc in started:
            svc.stop()


def _model(client: httpx.Client) -> str:
    data = bytes(range(256))
    header = {"layer.weight": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, len(data)]}}
    r = client.post(
        "/v1/models",
        files=[("files", ("weights.safetensors", safetensors_bytes(header, data)))],
        data={"name": "hosts"},
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.integration
def test_signatures_and_links_verify_on_every_host(hosts: Hosts, receiver):
    hook = receiver(200)
    a, b = hosts.a.client(hosts.key), hosts.b.client(hosts.key)
    model = _model(a)
    jobs = []
    for i in range(JOBS):  # half through each API host
        r = (a if i % 2 else b).post(
            "/v1/jobs",
            json={
                "model_id": model,
                "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}],
                "evaluation": {"enabled": False},
                "webhook_url": hook.url,
            },
        )
        assert r.status_code == 202, r.text
        jobs.append(r.json()["id"])
    for job in jobs:
        assert wait_job(a, job, timeout=120)["status"] == "succeeded"
    deadline = time.monotonic() + 30
    while len(hook.requests) < JOBS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(hook.requests) == JOBS, len(hook.requests)

    # The secret as each API host hands it out, and how many deliveries it verifies.
    secrets = [c.get("/v1/webhooks/secret").json()["secret"] for c in (a, b)]
    assert secrets[0] == secrets[1], "both API hosts give the tenant the same secret"
    verified = sum(verify(secrets[0], r["headers"], r["body"]) for r in hook.requests)
    print(f"\nwebhook signatures verified with the secret from API host A/B: {verified}/{JOBS}")
    assert verified == JOBS
    assert {json.loads(r["body"])["job"]["id"] for r in hook.requests} == set(jobs)

    # Report links: built on the configured public URL whatever Host the request named, and
    # opened through the other host (the path behind the proxy's /mp prefix).
    hostile = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
    opened = 0
    for maker, opener in ((a, hosts.b.url), (b, hosts.a.url)):
        for job in jobs[:2]:
            r = maker.post(f"/v1/jobs/{job}/report/link", json={"ttl_s": 120}, headers=hostile)
            assert r.status_code == 201, r.text
            url = r.json()["url"]
            assert url.startswith(f"{PUBLIC}/v1/jobs/{job}/report/view?"), url
            parts = urlsplit(url)
            page = httpx.get(f"{opener}{parts.path.removeprefix('/mp')}?{parts.query}", timeout=30)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"], page.text[:300]
            opened += 1
    print(f"report links made on one API host and opened on the other: {opened}/{opened}")

    # No host made a key of its own.
    assert not [p for d in hosts.data.values() for p in d.rglob("secret_key")]
