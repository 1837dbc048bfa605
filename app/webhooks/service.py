"""Job webhooks: the submit-time target check and the deliveries a job's owner may read. The signing
secret and signature are core/webhooks/signature.py's; sending is the worker's (worker/webhooks.py).
"""

from __future__ import annotations

from app.auth import Caller
from core.config import get_settings
from core.db import UnitOfWork
from core.errors import NotFound, Unprocessable
from core.jobs import repository as jobs_repo
from core.tables import WebhookDelivery
from core.webhooks import repository, ssrf


def check_url(url: str) -> None:
    """At submit: 422 unless ``url`` resolves only to addresses the service may connect to
    (core/webhooks/ssrf.py). ``webhook_url_refused``: a private, loopback, link-local (...) address;
    ``webhook_url_unresolvable``: the host does not resolve."""

    def refuse(code: str, msg: str) -> Unprocessable:
        return Unprocessable(
            f"webhook_url refused: {msg}",
            code=code,
            errors=[{"loc": ["body", "webhook_url"], "msg": msg, "type": code}],
        )

    try:
        ssrf.check(url, get_settings().webhook_allow_networks)
    except ssrf.TargetRefused as e:
        raise refuse("webhook_url_refused", e.reason) from None
    except ssrf.TargetUnresolvable as e:
        raise refuse("webhook_url_unresolvable", str(e)) from None
    except ValueError as e:  # not an http(s) URL (the schema checks this first)
        raise refuse("webhook_url_refused", str(e)) from None


def deliveries(uow: UnitOfWork, caller: Caller, job_id: str) -> list[WebhookDelivery]:
    """The webhook deliveries of one of the caller's jobs (404 for another tenant's job)."""
    job = jobs_repo.get(uow.session, caller.tenant_id, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return repository.list_for_job(uow.session, job.id)
