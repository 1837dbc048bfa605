"""API keys over the API, the CLI and the SDK: who may list, create and revoke which keys, and a
revoked key refused by every API replica within a second (app/auth.py: NOTIFY at the revoking
commit, a LISTENing connection in each API process; a bound of 1 s when that listener is down).

The replicas are two real ``modelpress serve`` processes on one PostgreSQL database, each with a
data folder of its own; the embedded stack covers the single-process SQLite mode."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.auth import LISTENER_APPLICATION_NAME
from tests.helpers import MODELPRESS, REDIS_URL, Service, query

BOUND_S = 1.0


class Replicas:
    def __init__(self, a: Service, b: Service, admin: str, database_url: str) -> None:
        self.a, self.b, self.admin, self.database_url = a, b, admin, database_url


@pytest.fixture(scope="module")
def replicas(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("replicas")
    shared = {
        "MODELPRESS_MODE": "cluster",
        "MODELPRESS_DATABASE_URL": pg_database,
        "MODELPRESS_BROKER_URL": REDIS_URL,
        "MODELPRESS_BROKER_KEY_PREFIX": f"mptest-keys-{uuid.uuid4().hex[:8]}:",
        "MODELPRESS_SECRET_KEY": "replica-secret-" + uuid.uuid4().hex,
    }
    svcs = []
    for name in ("a", "b"):
        (root / name).mkdir()
        svcs.append(Service({**shared, "MODELPRESS_DATA_DIR": str(root / name)}, root / name, worker=False))
    a, b = svcs
    a.cli("migrate")
    admin = a.cli("keys", "create", "--tenant", f"ops-{uuid.uuid4().hex[:6]}", "--admin")
    started = []
    try:
        for svc in svcs:
            started.append(svc)
            svc.start()
        yield Replicas(a, b, admin, pg_database)
    finally:
        for svc in started:
            svc.stop()


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _ok(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/methods", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def _refused_after(url: str, key: str, t0: float, limit_s: float = 5.0) -> float:
    """Seconds from ``t0`` until ``url`` refuses ``key`` (polled as fast as it answers)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
        while True:
            status = c.get("/v1/methods").status_code
            now = time.monotonic()
            if status == 401:
                return now - t0
            assert status == 200, status
            assert now - t0 < limit_s, f"still accepted {now - t0:.2f} s after the revocation"


def _warm(url: str, key: str) -> None:
    """The key is in the replica's cache (a second request inside the TTL is a cache hit)."""
    for _ in range(3):
        assert _ok(url, key) == 200


@pytest.mark.integration
def test_revocation_reaches_the_other_replica_within_a_second(replicas: Replicas):
    admin_a = replicas.a.client(replicas.admin)
    latencies = []
    for _ in range(5):
        made = admin_a.post("/v1/keys", json={"tenant": _tenant()})
        assert made.status_code == 201, made.text
        victim = made.json()
        _warm(replicas.b.url, victim["key"])
        _warm(replicas.a.url, victim["key"])
        t0 = time.monotonic()
        r = admin_a.post("/v1/keys/revoke", json={"id": victim["id"]})
        assert r.status_code == 200 and r.json()["revoked_at"], r.text
        latencies.append(_refused_after(replicas.b.url, victim["key"], t0))
        assert _ok(replicas.a.url, victim["key"]) == 401  # the revoking replica: at once
    print(
        f"\nrevoked through replica A, refused by replica B after (s): "
        f"{', '.join(f'{x:.3f}' for x in latencies)}; "
        f"median {statistics.median(latencies):.3f}, max {max(latencies):.3f}"
    )
    assert max(latencies) < BOUND_S


@pytest.mark.integration
def test_revocation_by_the_server_cli_reaches_every_replica(replicas: Replicas):
    key = replicas.a.cli("keys", "create", "--tenant", _tenant())
    for svc in (replicas.a, replicas.b):
        _warm(svc.url, key)
    out = json.loads(replicas.a.cli("keys", "revoke", key, "--json"))  # the whole key: its prefix names it
    t0 = time.monotonic()  # the CLI has committed (and exited)
    assert out["revoked_at"] and out["prefix"] == key.split("_")[1]
    seen = [_refused_after(svc.url, key, t0) for svc in (replicas.a, replicas.b)]
    print(
        f"\nrevoked with `modelpress keys revoke` (database): refused by replicas A/B "
        f"{seen[0]:.3f}/{seen[1]:.3f} s after the CLI returned"
    )
    assert max(seen) < BOUND_S


@pytest.mark.integration
def test_a_lost_listener_still_refuses_within_the_bound(replicas: Replicas):
    """Kill both replicas' listening connections, then revoke at once: the notification is lost,
    and the replicas still refuse the key within the bound (a reconnecting listener empties the
    cache; until then a cached key is trusted for at most 1 s)."""
    admin = replicas.a.client(replicas.admin)
    victim = admin.post("/v1/keys", json={"tenant": _tenant()}).json()
    _warm(replicas.b.url, victim["key"])
    killed = query(
        replicas,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = %s AND datname = current_database()",
        LISTENER_APPLICATION_NAME,
    )[0][0]
    assert killed >= 2, killed
    t0 = time.monotonic()
    with httpx.Client() as c:
        c.post(
            f"{replicas.a.url}/v1/keys/revoke",
            json={"id": victim["id"]},
            headers={"Authorization": f"Bearer {replicas.admin}"},
        ).raise_for_status()
    took = _refused_after(replicas.b.url, victim["key"], t0)
    print(f"\nlistener connections killed ({killed}), then revoked: refused by replica B after {took:.3f} s")
    assert took < BOUND_S + 0.2
    # The listeners come back (a later revocation is fast again).
    deadline = time.monotonic() + 15
    while (
        query(
            replicas,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            LISTENER_APPLICATION_NAME,
        )[0][0]
        < 2
    ):
        assert time.monotonic() < deadline, "the listeners did not reconnect"
        time.sleep(0.2)


@pytest.mark.integration
def test_who_may_list_create_and_revoke(replicas: Replicas):
    admin = replicas.a.client(replicas.admin)
    t1, t2 = _tenant(), _tenant()
    k1 = admin.post("/v1/keys", json={"tenant": t1})
    assert k1.status_code == 201 and k1.headers["cache-control"] == "no-store", k1.text
    k1 = k1.json()
    assert k1["key"].startswith(f"mp_{k1['prefix']}_") and k1["scopes"] == [] and k1["tenant"] == t1
    k1b = replicas.a.cli("keys", "create", "--tenant", t1)
    k2 = admin.post("/v1/keys", json={"tenant": t2, "scopes": ["admin"]}).json()
    assert k2["scopes"] == ["admin"]
    user = replicas.b.client(k1["key"])

    # Anyone lists their own tenant's keys, never a secret.
    mine = user.get("/v1/keys")
    assert mine.status_code == 200, mine.text
    assert {k["tenant"] for k in mine.json()["items"]} == {t1} and len(mine.json()["items"]) == 2
    text = mine.text
    assert k1["key"] not in text and k1b not in text and "sha256" not in text and "secret" not in text
    assert set(mine.json()["items"][0]) == {"id", "tenant", "tenant_id", "prefix", "scopes", "created_at", "revoked_at"}
    # Pages, newest first.
    first = user.get("/v1/keys", params={"limit": 1}).json()
    second = user.get("/v1/keys", params={"limit": 1, "cursor": first["next_cursor"]}).json()
    assert first["next_cursor"] and second["next_cursor"] is None
    assert [first["items"][0]["prefix"], second["items"][0]["prefix"]] == [k1b.split("_")[1], k1["prefix"]]

    # Everything else needs admin: a 403 problem that says so, before the body is even looked at.
    for method, path, kw in (
        ("GET", "/v1/keys", {"params": {"all_tenants": "true"}}),
        ("GET", "/v1/keys", {"params": {"tenant": t2}}),
        ("POST", "/v1/keys", {"json": {"tenant": t1, "scopes": ["admin"]}}),
        ("POST", "/v1/keys", {"json": {"nonsense": 1}}),
        ("POST", "/v1/keys/revoke", {"json": {"id": k2["id"]}}),
    ):
        r = user.request(method, path, **kw)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == "admin_required"
    assert user.get("/v1/keys", params={"tenant": t1}).status_code == 200  # naming its own tenant is fine
    assert _ok(replicas.a.url, k2["key"]) == 200, "the refused revocation changed nothing"

    # Admin: any tenant, all tenants, unknown ones.
    assert {k["tenant"] for k in admin.get("/v1/keys", params={"tenant": t2}).json()["items"]} == {t2}
    everyone = {
        k["tenant"] for k in admin.get("/v1/keys", params={"all_tenants": "true", "limit": 200}).json()["items"]
    }
    assert {t1, t2} <= everyone
    assert admin.get("/v1/keys", params={"tenant": "no-such-tenant"}).status_code == 404
    assert admin.post("/v1/keys/revoke", json={"id": str(uuid.uuid4())}).status_code == 404
    for bad in (
        {"tenant": "bad name"},
        {"tenant": "x\n"},
        {"tenant": "a/b"},
        {"tenant": "t", "scopes": ["root"]},
        {"tenant": "t", "extra": 1},
        {},
    ):
        r = admin.post("/v1/keys", json=bad)
        assert r.status_code == 422, (bad, r.text)

    # Revoke: by prefix, idempotent (the first revocation's time stays).
    r1 = admin.post("/v1/keys/revoke", json={"id": k1["prefix"]})
    assert r1.status_code == 200 and r1.json()["id"] == k1["id"] and r1.json()["revoked_at"]
    r2 = admin.post("/v1/keys/revoke", json={"id": k1["id"]})
    assert r2.status_code == 200 and r2.json()["revoked_at"] == r1.json()["revoked_at"]
    assert _ok(replicas.a.url, k1["key"]) == 401
    assert _ok(replicas.a.url, k1b) == 200, "only that key"


@pytest.mark.integration
def test_cli_and_sdk_through_the_api(replicas: Replicas):
    from modelpress import Client
    from modelpress._errors import Forbidden

    def cli(*args: str, key: str = replicas.admin) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        return subprocess.run(
            [MODELPRESS, "keys", *args, "--url", replicas.b.url, "--api-key", key],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    tenant = _tenant()
    made = cli("create", "--tenant", tenant, "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    listed = cli("list", "--tenant", tenant, "--json")
    assert listed.returncode == 0 and [k["tenant"] for k in json.loads(listed.stdout)] == [tenant]
    table = cli("list", "--all")
    assert table.returncode == 0 and key.split("_")[1] in table.stdout and key not in table.stdout
    denied = cli("list", "--all", key=key)
    assert denied.returncode == 3 and denied.stderr.startswith("Error: Forbidden: "), denied.stderr
    shown = cli("show", key, "--all", "--json")  # found in the list by the whole key's prefix
    assert shown.returncode == 0 and json.loads(shown.stdout)["tenant"] == tenant, shown.stderr
    assert "key" not in json.loads(shown.stdout), "never the secret"
    unknown = cli("show", "mp_nosuchprefix_x")
    assert unknown.returncode == 3 and "no key nosuchprefix" in unknown.stderr, unknown.stderr
    revoked = cli("revoke", key)
    assert revoked.returncode == 0 and "revoked at" in revoked.stdout, revoked.stderr
    assert _ok(replicas.a.url, key) == 401

    with Client(replicas.a.url, replicas.admin) as mp:
        created = mp.create_key(_tenant())
        assert created.key.startswith("mp_") and not created.revoked
        assert created.id in {k.id for k in mp.keys(tenant=created.tenant)}
        assert mp.revoke_key(created.key).revoked  # a whole key: only its prefix is sent
        assert mp.revoke_key(created).revoked_at == mp.revoke_key(created.id).revoked_at
        with Client(replicas.a.url, replicas.a.cli("keys", "create", "--tenant", _tenant())) as user:
            listed = list(user.keys())  # the SDK's key listing (an iterator), not a dict's
            assert [k.tenant for k in listed] and all(not k.revoked for k in listed)
            with pytest.raises(Forbidden) as e:
                user.revoke_key(created.id)
            assert e.value.code == "admin_required"


@pytest.mark.integration
def test_embedded_bootstrap_key_is_admin_and_revocation_is_immediate(embedded):
    admin = embedded.client()
    me = admin.get("/v1/keys").json()["items"]
    assert any(k["scopes"] == ["admin"] and k["tenant"] == "default" for k in me)
    victim = admin.post("/v1/keys", json={"tenant": _tenant()}).json()
    _warm(embedded.service.url, victim["key"])
    assert admin.post("/v1/keys/revoke", json={"id": victim["id"]}).status_code == 200
    assert _ok(embedded.service.url, victim["key"]) == 401, "the revoking process forgets it at once"

    # The server CLI on the SQLite file: no notification, the bound applies.
    other = embedded.service.cli("keys", "create", "--tenant", _tenant())
    _warm(embedded.service.url, other)
    embedded.service.cli("keys", "revoke", other.split("_")[1])
    took = _refused_after(embedded.service.url, other, time.monotonic())
    print(f"\nembedded: revoked with the server CLI, refused {took:.3f} s after the CLI returned")
    assert took < BOUND_S + 0.1


@pytest.mark.integration
def test_embedded_listing_through_the_cli_on_the_database(embedded):
    listed = json.loads(embedded.service.cli("keys", "list", "--json"))
    assert {"default", "other"} <= {k["tenant"] for k in listed}
    assert all("key" not in k for k in listed)
    one = listed[0]
    assert json.loads(embedded.service.cli("keys", "show", one["prefix"], "--json")) == one
    assert one["id"] in embedded.service.cli("keys", "show", one["id"])
    res = subprocess.run(
        [MODELPRESS, "keys", "list", "--tenant", "no-such-tenant"],
        env=embedded.service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3 and "no tenant no-such-tenant" in res.stderr
    assert Path(embedded.data_dir / "api-key").read_text().strip() == embedded.key


@pytest.mark.unit
def test_a_bootstrap_key_from_before_scopes_becomes_admin(tmp_path, monkeypatch):
    """An embedded data folder whose api-key predates scopes (migration 0011 gives it none): the
    next `serve` keeps the same key and makes it admin."""
    from app import cli
    from app.auth import resolve_key
    from core import config, db

    for k in [k for k in os.environ if k.startswith("MODELPRESS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MODELPRESS_DATA_DIR", str(tmp_path))

    def fresh() -> None:
        config.get_settings.cache_clear()
        db.get_engine.cache_clear()
        db.get_sessionmaker.cache_clear()

    fresh()
    try:
        cli.migrate()
        with db.get_sessionmaker()() as s:
            from app.keys.service import create_key

            old = create_key(s, "default")  # no scope, as every key before 0011
            s.commit()
        (tmp_path / "api-key").write_text(old + "\n")
        assert cli._bootstrap_key(tmp_path) == old
        with db.get_sessionmaker()() as s:
            assert resolve_key(s, old).is_admin
        new_dir = tmp_path / "new"
        new_dir.mkdir()
        made = cli._bootstrap_key(new_dir)  # no api-key file there: a new admin key
        with db.get_sessionmaker()() as s:
            assert made != old and resolve_key(s, made).is_admin
    finally:
        db.get_engine().dispose()
        monkeypatch.undo()
        fresh()
