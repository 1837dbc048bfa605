from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

WebhookEvent = Literal["job.succeeded", "job.failed", "job.canceled"]
DeliveryStatus = Literal["pending", "delivered", "failed"]


class WebhookDeliveryOut(BaseModel):
    """A webhook delivery of a job and how its tries went."""

    id: str
    job_id: str
    event: WebhookEvent
    url: str
    status: DeliveryStatus = Field(
        description="pending (a try is due or in flight), delivered (a 2xx answer) or failed (gave up)"
    )
    attempts: int = Field(description="tries started so far")
    next_attempt_at: datetime | None = Field(description="when the next try is due, while pending")
    last_attempt_at: datetime | None
    last_status_code: int | None = Field(description="the HTTP status of the last try, if the target answered")
    last_error: str | None = Field(
        description="why the last try did not deliver (timeout, refused target, non-2xx status, ...)"
    )
    created_at: datetime
    delivered_at: datetime | None


class WebhookDeliveryList(BaseModel):
    items: list[WebhookDeliveryOut]


class WebhookSecretOut(BaseModel):
    """The caller's webhook signing secret. Every delivery carries ``X-Modelpress-Signature:
    sha256=<hex>``, the HMAC-SHA256 with this secret (its UTF-8 bytes as the key) over
    ``<X-Modelpress-Timestamp>.<raw request body>``."""

    secret: str
    algorithm: Literal["HMAC-SHA256"] = "HMAC-SHA256"
    signed_content: str = "<X-Modelpress-Timestamp>.<raw body>"
