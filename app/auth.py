"""API keys and the tenant of the caller.

A key looks like ``mp_<prefix>_<secret>``. The prefix is stored in clear to find the row; the
secret only as a sha256 digest (keys are 190-bit random, so a slow KDF adds nothing) compared in
constant time.

A key that resolved is remembered in this process for ``AUTH_CACHE_TTL_S`` seconds (setting
``auth_cache_ttl_s`` when it exists; 0 turns the cache off): a client polling a job does not look
its key up in the database on every request. The entry is keyed by the sha256 of the whole key
as presented and is dropped when it expires, so **revoking a key (setting ``api_keys.revoked_at``)
or deleting it or its tenant takes effect in every API process within that TTL**, not at once.
Refusals are never cached: a key created a moment ago works on its first request. The cache holds
at most ``_CACHE_MAX`` keys (it is emptied when full).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.config import get_settings
from app.db import read_uow
from app.errors import Unauthorized
from app.tables import ApiKey, Tenant

_DUMMY_DIGEST = hashlib.sha256(b"no-such-key").hexdigest()


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    tenant_name: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> str:
    """Create (or reuse) the tenant and return a new key; the caller commits."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, secret_sha256=_digest(secret)))
    session.flush()
    return f"mp_{prefix}_{secret}"


def resolve_key(session: Session, key: str) -> Caller | None:
    parts = key.split("_", 2)
    prefix, secret = (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "mp" else ("", key)
    row = session.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    ).first()
    # Compare even when no row matched, so timing does not tell whether a prefix exists.
    expected = row[0].secret_sha256 if row else _DUMMY_DIGEST
    ok = hmac.compare_digest(expected, _digest(secret))
    if row is None or not ok:
        return None
    return Caller(tenant_id=row[0].tenant_id, tenant_name=row[1])


# auto_error=False: a missing header must be our 401 problem, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer mp_...`")


AUTH_CACHE_TTL_S = 5.0
_CACHE_MAX = 10_000
# sha256(key) -> (caller, monotonic time the entry expires)
_cache: dict[str, tuple[Caller, float]] = {}


def _cache_ttl() -> float:
    return float(get_settings().auth_cache_ttl_s)


def clear_cache() -> None:
    """Forget every resolved key (tests; an operator who cannot wait for the TTL restarts the API)."""
    _cache.clear()


def _resolve_in_db(key: str) -> Caller | None:
    with read_uow() as uow:
        return resolve_key(uow.session, key)


async def authenticate(scheme: str, credentials: str) -> Caller:
    """The caller whose key is ``credentials`` of an ``Authorization: <scheme> <credentials>``
    header (401 unless a valid bearer key).

    A key resolved less than the TTL ago costs a dict lookup on the event loop; otherwise the
    lookup runs in the thread pool on a read-only session of its own."""
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("send 'Authorization: Bearer <api key>'")
    key = credentials.strip()
    ttl = _cache_ttl()
    digest = _digest(key)
    now = time.monotonic()
    hit = _cache.get(digest) if ttl > 0 else None
    if hit is not None and hit[1] > now:
        return hit[0]
    caller = await run_in_threadpool(_resolve_in_db, key)
    if caller is None:
        _cache.pop(digest, None)
        raise Unauthorized("the API key is not valid")
    if ttl > 0:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[digest] = (caller, now + ttl)
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
