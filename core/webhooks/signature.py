"""How a webhook delivery is signed. The API shows a tenant its secret; the worker's dispatcher
signs with it.

Signing: each tenant has its own secret, derived from the service's secret key
(core/signing.py ``secret_key()``: ``MODELPRESS_SECRET_KEY``, required in cluster mode; in embedded
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

from core.signing import secret_key as service_key


def secret_for(tenant_id: str) -> str:
    """The tenant's webhook signing secret (64 hex characters)."""
    return hmac.new(service_key(), f"webhook:{tenant_id}".encode(), hashlib.sha256).hexdigest()


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """The X-Modelpress-Signature value of ``body`` sent at ``timestamp`` (unix seconds)."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
