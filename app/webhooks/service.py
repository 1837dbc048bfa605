"""Job webhooks: the submit-time target check, the per-tenant signing secret, the signature, and
the deliveries a job's owner may read. Sending is the worker's (worker/webhooks.py).

Signing: each tenant has its own secret, derived from the service's secret key
(app/signing.py ``secret_key()``: ``MODELPRESS_SECRET_KEY``, required in cluster mode; in embedded
mode, when empty, the random key in ``<data_dir>/secret_key``) as
``hex(HMAC-SHA256(service key, "webhook:<tenant id>"))``. Nothing is stored: the API host that hands
a tenant its secret (GET /v1/webhooks/secret) and the worker that signs a delivery derive the same
one because they share the service key, and only because of that (a key per host, as cluster mode
once allowed, made every delivery fail to verify). Changing the service key changes every tenant's
secret (and invalidates signed report links). A delivery is signed with
``sha256=hex(HMAC-SHA256(secret, "<unix seconds>.<raw body>"))``, so a receiver can check both the
body and its age (replays).
"""

from __future__ import annotations

import hashlib
import hmac

from app.auth import Caller
from app.config import get_settings
from app.db import UnitOfWork
from app.errors import NotFound, Unprocessable
from app.jobs import repository as jobs_repo
from app.signing import secret_key as service_key
from app.tables import WebhookDelivery
from app.webhooks import repository, ssrf


def secret_for(tenant_id: str) -> str:
    """The tenant's webhook signing secret (64 hex characters)."""
    return hmac.new(service_key(), f"webhook:{tenant_id}".encode(), hashlib.sha256).hexdigest()


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """The X-Modelpress-Signature value of ``body`` sent at ``timestamp`` (unix seconds)."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def check_url(url: str) -> None:
    """At submit: 422 unless ``url`` resolves only to addresses the service may connect to
    (app/webhooks/ssrf.py). ``webhook_url_refused``: a private, loopback, link-local (...) address;
    ``webhook_url_unresolvable``: the host does not resolve."""
    def refuse(code: str, msg: str) -> Unprocessable:
        return Unprocessable(f"webhook_url refused: {msg}", code=code,
                             errors=[{"loc": ["body", "webhook_url"], "msg": msg, "type": code}])

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
