"""Who may see, create and revoke which keys. Services never commit (the request's unit of work
does, core/db.py); the server CLI (app/cli.py) calls the same functions with a session of its own.

* Any key may list its own tenant's keys (never a secret: id, prefix, scopes, times).
* An ``admin`` key may also list another tenant's keys (``tenant=``) or every tenant's
  (``all_tenants=true``), create keys for any tenant, and revoke any key.
* Another tenant's key is never revealed to a non-admin: the routes it could name it in need admin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy.orm import Session

from app.auth import Caller, invalidate
from app.errors import Forbidden
from app.keys import repository
from app.keys.schemas import SCOPES, TENANT_NAME_PATTERN, ApiKeyCreated, ApiKeyOut
from core.db import UnitOfWork
from core.errors import NotFound, Unprocessable
from core.tables import ApiKey

_TENANT_NAME = re.compile(TENANT_NAME_PATTERN)


def check_tenant_name(name: str) -> str:
    # fullmatch and \Z-free pattern: a trailing newline is not a name character.
    if not _TENANT_NAME.fullmatch(name):
        raise Unprocessable(
            f"tenant name {name!r} is not valid: 1-100 of A-Z a-z 0-9 . _ -, starting with a letter or digit",
            errors=[{"loc": ["body", "tenant"], "msg": "invalid tenant name", "type": "value_error"}],
        )
    return name


def out(session: Session, rows: list[ApiKey]) -> list[ApiKeyOut]:
    names = repository.tenant_names(session, {r.tenant_id for r in rows})
    return [
        ApiKeyOut(
            id=r.id,
            tenant=names.get(r.tenant_id, ""),
            tenant_id=r.tenant_id,
            prefix=r.prefix,
            scopes=list(r.scopes or []),
            created_at=r.created_at,
            revoked_at=r.revoked_at,
        )
        for r in rows
    ]


def list_page(
    session: Session, caller: Caller, tenant: str | None, all_tenants: bool, limit: int, cursor: str | None
) -> list[ApiKey]:
    """The page of keys the caller asked for and may see (403 for another tenant's without admin)."""
    other_tenants = all_tenants or (tenant is not None and tenant != caller.tenant_name)
    if other_tenants and not caller.is_admin:
        raise Forbidden("only an admin key may list another tenant's keys", code="admin_required")
    if all_tenants:
        return repository.list_page(session, None, limit, cursor)
    tenant_id = caller.tenant_id if tenant is None else repository.tenant_id_of(session, tenant)
    if tenant_id is None:
        raise NotFound(f"no tenant {tenant}")
    return repository.list_page(session, tenant_id, limit, cursor)


def create_key(session: Session, tenant_name: str, scopes: Iterable[str] = ()) -> str:
    """Create (or reuse) the tenant and return a new key with ``scopes``, unchecked (the server
    CLI's bootstrap key); flushes, the caller commits."""
    _row, key = repository.add(session, tenant_name, sorted(set(scopes)))
    return key


def create(session: Session, tenant: str, scopes: list[str]) -> ApiKeyCreated:
    """A new key (the tenant is created if new); flushes. Who may call this is the caller's concern
    (admin over the API; the server CLI is the operator)."""
    check_tenant_name(tenant)
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise Unprocessable(f"unknown scope(s) {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}")
    row, key = repository.add(session, tenant, sorted(set(scopes)))
    [shown] = out(session, [row])
    return ApiKeyCreated(**shown.model_dump(), key=key)


def revoke(session: Session, ident: str) -> tuple[ApiKeyOut, bool]:
    """Revoke the key with this id or prefix (404 if none); idempotent. The key as it now is, and
    whether this call revoked it. Flushes; the revocation is announced when the caller commits."""
    row = repository.find(session, ident)
    if row is None:
        raise NotFound(f"no API key {ident}")
    changed = repository.revoke(session, row.id)
    session.refresh(row)
    [shown] = out(session, [row])
    return shown, changed


def revoke_for(uow: UnitOfWork, caller: Caller, ident: str) -> ApiKeyOut:
    """:func:`revoke` for an API request (admin only); this process forgets its cached keys as soon
    as the revocation is committed (the others hear of it through app/auth.py's listener)."""
    if not caller.is_admin:
        raise Forbidden("only an admin key may revoke keys", code="admin_required")
    shown, changed = revoke(uow.session, ident)
    if changed:
        uow.after_commit(invalidate)
    return shown
