from __future__ import annotations

from fastapi import APIRouter, Response

from app.auth import CurrentCaller
from app.deps import UoW
from app.errors import problem_responses
from app.webhooks import service
from core.webhooks import signature
from core.webhooks.schemas import WebhookDeliveryList, WebhookDeliveryOut, WebhookSecretOut

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.get("/webhooks/secret", response_model=WebhookSecretOut, responses=problem_responses(401))
def webhook_secret(caller: CurrentCaller, response: Response) -> WebhookSecretOut:
    """The caller's secret for checking the X-Modelpress-Signature of webhook deliveries."""
    response.headers["Cache-Control"] = "no-store"
    return WebhookSecretOut(secret=signature.secret_for(caller.tenant_id))


@router.get(
    "/jobs/{job_id}/webhook-deliveries", response_model=WebhookDeliveryList, responses=problem_responses(401, 404)
)
def job_webhook_deliveries(job_id: str, caller: CurrentCaller, uow: UoW) -> WebhookDeliveryList:
    """The job's webhook deliveries: status, tries, last HTTP status or error."""
    rows = service.deliveries(uow, caller, job_id)
    return WebhookDeliveryList(items=[WebhookDeliveryOut.model_validate(r, from_attributes=True) for r in rows])
