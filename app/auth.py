"""API keys, the caller of a request, and how fast a revoked key stops working.

A key looks like ``mp_<prefix>_<secret>``. The prefix is stored in clear to find the row; the
secret only as a sha256 digest (keys are 190-bit random, so a slow KDF adds nothing) compared in
constant time. A key belongs to a tenant and may carry scopes (``api_keys.scopes``): ``admin``
manages every tenant's keys (app/keys).

**The key cache.** A key that resolved is remembered in this process, so a client polling a job
does not look its key up in the database on every request. Entries are keyed by the sha256 of
the whole key as presented; refusals are never cached (a key created a moment ago works on its
first request); the cache holds at most ``_CACHE_MAX`` keys (it is emptied when full).

**Revocation within a second, on every API process.** Revoking a key (app/keys/repository.py)
sends ``NOTIFY modelpress_api_keys`` in the revoking transaction; PostgreSQL delivers it at commit
to every API process, each of which keeps one connection LISTENing (:class:`_Invalidations`, a
daemon thread started by the first authenticated request) and empties its cache on every
notification: the next request of that key is looked up and refused, milliseconds after the
commit. An entry is trusted for ``Settings.auth_cache_ttl_s`` (core/config.py, env
``MODELPRESS_AUTH_CACHE_TTL_S``, default 5 s, 0: no cache) only while that listener is known to be
alive (it pings every ``_PING_S``); otherwise, and always on SQLite (embedded mode, one API
process: a revocation through the API empties the cache at once, one made with the server CLI is
seen within the bound), for at most ``REVOCATION_BOUND_S``. A listener that (re)connects empties
the cache, since notifications sent while it was away are lost. A lookup that raced a revocation
(read before the commit, finished after the notification) is not cached (a generation counter).

Behind a pooler in transaction mode (PgBouncer), LISTEN does not work: point the API's
``MODELPRESS_DATABASE_URL`` at PostgreSQL itself, or set ``MODELPRESS_AUTH_CACHE_TTL_S`` to 1.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.errors import Forbidden
from core.config import get_settings
from core.db import read_uow
from core.errors import Unauthorized
from core.tables import ApiKey, Tenant

log = logging.getLogger("modelpress.auth")

_DUMMY_DIGEST = hashlib.sha256(b"no-such-key").hexdigest()
ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    tenant_name: str
    key_id: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """A fresh key: ``(prefix, the whole key to hand out, the digest to store)``."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    return prefix, f"mp_{prefix}_{secret}", _digest(secret)


def key_prefix(key: str) -> str | None:
    """The prefix of a key spelled ``mp_<prefix>_<secret>``, else None."""
    parts = key.split("_", 2)
    return parts[1] if len(parts) == 3 and parts[0] == "mp" and parts[1] else None


def resolve_key(session: Session, key: str) -> Caller | None:
    parts = key.split("_", 2)
    prefix, secret = (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "mp" else ("", key)
    row = session.execute(
        select(ApiKey.id, ApiKey.tenant_id, ApiKey.secret_sha256, ApiKey.scopes, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    ).first()
    # Compare even when no row matched, so timing does not tell whether a prefix exists.
    expected = row.secret_sha256 if row else _DUMMY_DIGEST
    ok = hmac.compare_digest(expected, _digest(secret))
    if row is None or not ok:
        return None
    return Caller(
        tenant_id=row.tenant_id,
        tenant_name=row.name,
        key_id=row.id,
        scopes=frozenset(s for s in (row.scopes or []) if isinstance(s, str)),
    )


# auto_error=False: a missing header must be our 401 problem, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer mp_...`")


# The longest a revoked key may still be accepted by a process that cannot count on hearing of
# the revocation (no listener, or one not known to be alive).
REVOCATION_BOUND_S = 1.0
_CACHE_MAX = 10_000
# sha256(key) -> (caller, monotonic time it was looked up, generation it was looked up in)
_cache: dict[str, tuple[Caller, float, int]] = {}
_generation = 0
_generation_lock = threading.Lock()

CHANNEL = "modelpress_api_keys"
LISTENER_APPLICATION_NAME = "modelpress-api-key-listener"
_PING_S = 0.5  # the listener proves its connection alive this often ...
_ALIVE_FOR_S = 1.0  # ... and is trusted this long after each proof


def _cache_ttl() -> float:
    return float(get_settings().auth_cache_ttl_s)


def invalidate() -> None:
    """Forget every resolved key, including lookups in flight (a revocation was committed)."""
    global _generation
    with _generation_lock:
        _generation += 1
        _cache.clear()


def clear_cache() -> None:
    """Forget every resolved key (tests; a revocation calls :func:`invalidate`)."""
    invalidate()


class _Invalidations:
    """The LISTEN side of revocation (see the module docstring): one daemon thread per process with
    its own autocommit connection, outside the engine's pool."""

    def __init__(self) -> None:
        self._started = False
        self._lock = threading.Lock()
        self._alive_until = 0.0
        self.notifications = 0  # received so far (tests, debugging)

    def alive(self, now: float) -> bool:
        return now < self._alive_until

    def ensure_started(self) -> None:
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            self._started = True
            if get_settings().is_sqlite:
                return  # one API process; REVOCATION_BOUND_S covers the server CLI
            threading.Thread(target=self._run, name="modelpress-key-listener", daemon=True).start()

    def _conninfo(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(get_settings().database_url).set(drivername="postgresql").render_as_string(hide_password=False)

    def _run(self) -> None:
        import psycopg

        backoff, warned = 0.5, False
        while True:
            try:
                with psycopg.connect(
                    self._conninfo(),
                    autocommit=True,
                    connect_timeout=5,
                    application_name=LISTENER_APPLICATION_NAME,
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=2,
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    invalidate()  # a revocation sent while nobody listened was lost
                    self._alive_until = time.monotonic() + _ALIVE_FOR_S
                    if warned:
                        log.info("API key listener reconnected; keys are cached for %.1f s again", _cache_ttl())
                    backoff, warned = 0.5, False
                    while True:
                        for _ in conn.notifies(timeout=_PING_S):
                            self.notifications += 1
                            invalidate()
                        conn.execute("SELECT 1")
                        self._alive_until = time.monotonic() + _ALIVE_FOR_S
            except Exception as e:  # the database restarted or is unreachable: reconnect
                self._alive_until = 0.0
                if not warned:
                    log.warning(
                        "API key listener lost its connection (%s); keys are cached for at most %.1f s "
                        "until it is back",
                        e.__class__.__name__,
                        REVOCATION_BOUND_S,
                    )
                    warned = True
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


_invalidations = _Invalidations()


def _resolve_in_db(key: str) -> Caller | None:
    with read_uow() as uow:
        return resolve_key(uow.session, key)


async def authenticate(scheme: str, credentials: str) -> Caller:
    """The caller whose key is ``credentials`` of an ``Authorization: <scheme> <credentials>``
    header (401 unless a valid bearer key).

    A key resolved recently enough (see the module docstring) costs a dict lookup on the event
    loop; otherwise the lookup runs in the thread pool on a read-only session of its own."""
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("send 'Authorization: Bearer <api key>'")
    key = credentials.strip()
    ttl = _cache_ttl()
    digest = _digest(key)
    now = time.monotonic()
    if ttl > 0:
        _invalidations.ensure_started()
        hit = _cache.get(digest)
        if hit is not None and hit[2] == _generation:
            trusted = ttl if _invalidations.alive(now) else min(ttl, REVOCATION_BOUND_S)
            if now - hit[1] < trusted:
                return hit[0]
    generation = _generation
    caller = await run_in_threadpool(_resolve_in_db, key)
    if caller is None:
        _cache.pop(digest, None)
        raise Unauthorized("the API key is not valid")
    if ttl > 0 and generation == _generation:  # else a revocation landed during the lookup
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[digest] = (caller, now, generation)
    return caller


async def caller_from_header(authorization: str | None) -> Caller:
    """:func:`authenticate` on a raw ``Authorization`` header value, parsed as HTTPBearer does."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    return await authenticate(scheme, credentials)


async def current_caller(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """The caller of the request, from its ``Authorization: Bearer`` key (401 without a valid one).
    An ``async`` dependency: a cached key never leaves the event loop."""
    return await authenticate(creds.scheme, creds.credentials) if creds else await authenticate("", "")


CurrentCaller = Annotated[Caller, Depends(current_caller)]


async def admin_caller(caller: CurrentCaller) -> Caller:
    """The caller, if its key has the ``admin`` scope (403 otherwise)."""
    if not caller.is_admin:
        raise Forbidden(
            "this needs an API key with the admin scope (`modelpress keys create --tenant NAME --admin`)",
            code="admin_required",
        )
    return caller


AdminCaller = Annotated[Caller, Depends(admin_caller)]
