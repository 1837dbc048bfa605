"""All SQL on API keys (the key format and the lookup of a presented key are app/auth.py's: this
module imports app.auth, never the reverse)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select, text, update
from sqlalchemy.orm import Session

from app.auth import CHANNEL, new_key
from core.pagination import page
from core.tables import ApiKey, Tenant, utcnow


def add(session: Session, tenant_name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """A new key of the tenant (created if new): the row and the whole key. Flushes, never commits."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix, key, digest = new_key()
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, secret_sha256=digest, scopes=list(scopes))
    session.add(row)
    session.flush()
    return row, key


def find(session: Session, ident: str) -> ApiKey | None:
    """A key by its id or its prefix (revoked or not)."""
    return session.scalar(select(ApiKey).where(or_(ApiKey.id == ident, ApiKey.prefix == ident)))


def tenant_id_of(session: Session, name: str) -> str | None:
    return session.scalar(select(Tenant.id).where(Tenant.name == name))


def tenant_names(session: Session, tenant_ids: set[str]) -> dict[str, str]:
    if not tenant_ids:
        return {}
    rows = session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(tenant_ids)))
    return {tenant_id: name for tenant_id, name in rows}


def list_page(session: Session, tenant_id: str | None, limit: int, cursor: str | None) -> list[ApiKey]:
    """Keys newest first: of one tenant, or of every tenant (``tenant_id`` None)."""
    stmt = select(ApiKey)
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(page(stmt, ApiKey, limit, cursor)))


def revoke(session: Session, key_id: str) -> bool:
    """Revoke the key unless it already is (idempotent: the first revocation's time stays). In the
    same transaction, tell every API process to forget the keys it cached (app/auth.py: PostgreSQL
    delivers the notification at commit, and not at all on rollback). True if this revoked it."""
    res = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    changed = res.rowcount == 1
    if changed:
        notify_revoked(session, key_id)
    return changed


def notify_revoked(session: Session, key_id: str) -> None:
    bind: Any = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :key_id)"), {"channel": CHANNEL, "key_id": key_id})


def grant(session: Session, key_id: str, scope: str) -> None:
    row = session.get(ApiKey, key_id)
    if row is not None and scope not in (row.scopes or []):
        row.scopes = sorted({*(row.scopes or []), scope})
        session.flush()
