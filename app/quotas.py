"""Per-tenant quotas: jobs in flight (queued + running) and bytes stored (models, datasets and
job artifacts). Both limits are settings (``MODELPRESS_QUOTA_JOBS_IN_FLIGHT``,
``MODELPRESS_QUOTA_STORAGE_BYTES``; 0 means none) and apply to every tenant alike.

Over a quota a request is answered ``429`` with ``Retry-After`` and nothing is recorded: the
check runs inside the request's transaction, before the commit. On PostgreSQL the tenant's row
is locked first (``SELECT … FOR UPDATE``), so concurrent submissions of one tenant are counted
one after the other and cannot overshoot together; SQLite has one writer at a time anyway.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.config import get_settings
from core.errors import ModelpressError
from core.tables import Dataset, Job, Model, Tenant


class QuotaExceeded(ModelpressError):
    status, code, title = 429, "quota_exceeded", "Quota exceeded"


def _lock_tenant(session: Session, tenant_id: str) -> None:
    """Once per transaction (a sweep checks every point, a job both quotas): the lock is held
    until the commit anyway."""
    held = (tenant_id, id(session.get_transaction()))
    if session.get_bind().dialect.name == "postgresql" and session.info.get("quota_lock") != held:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
        session.info["quota_lock"] = held


def jobs_in_flight(session: Session, tenant_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status.in_(("queued", "running")))
        )
        or 0
    )


def storage_bytes(session: Session, tenant_id: str) -> int:
    models = session.scalar(select(func.coalesce(func.sum(Model.size_bytes), 0)).where(Model.tenant_id == tenant_id))
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant_id)
    )
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Job.artifact_size_bytes), 0)).where(
            Job.tenant_id == tenant_id, Job.artifact_key.is_not(None)
        )
    )
    return int(models or 0) + int(datasets or 0) + int(artifacts or 0)


def check_job(session: Session, tenant_id: str) -> None:
    """Before adding one job (a sweep calls it once per point: the rows it already added in this
    transaction count). A job also needs room for its artifact, so a tenant over its storage
    quota cannot submit either."""
    s = get_settings()
    if not (s.quota_jobs_in_flight or s.quota_storage_bytes):
        return
    _lock_tenant(session, tenant_id)
    if s.quota_jobs_in_flight:
        n = jobs_in_flight(session, tenant_id)
        if n >= s.quota_jobs_in_flight:
            raise QuotaExceeded(
                f"{n} jobs of this tenant are queued or running; the quota is {s.quota_jobs_in_flight}. "
                "Retry when one has finished.",
                code="quota_jobs_in_flight",
                headers={"Retry-After": str(s.quota_retry_after_s)},
            )
    check_storage(session, tenant_id, 0)


def check_storage(session: Session, tenant_id: str, adding_bytes: int) -> None:
    """Before storing ``adding_bytes`` more for the tenant (an upload)."""
    s = get_settings()
    if not s.quota_storage_bytes:
        return
    _lock_tenant(session, tenant_id)
    used = storage_bytes(session, tenant_id)
    if used + adding_bytes > s.quota_storage_bytes or (adding_bytes == 0 and used >= s.quota_storage_bytes):
        raise QuotaExceeded(
            f"this tenant stores {used} bytes; with {adding_bytes} more it would pass its quota of "
            f"{s.quota_storage_bytes} bytes. Delete models or datasets to make room.",
            code="quota_storage",
            headers={"Retry-After": str(s.quota_storage_retry_after_s)},
        )
