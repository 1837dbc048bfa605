"""API keys and the tenant of the caller.

A key looks like ``mp_<prefix>_<secret>``. The prefix is stored in clear to find the row; the
secret only as a sha256 digest (keys are 190-bit random, so a slow KDF adds nothing) compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import UoW
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


def current_caller(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], uow: UoW
) -> Caller:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials.strip():
        raise Unauthorized("send 'Authorization: Bearer <api key>'")
    caller = resolve_key(uow.session, creds.credentials.strip())
    if caller is None:
        raise Unauthorized("the API key is not valid")
    return caller


CurrentCaller = Annotated[Caller, Depends(current_caller)]
