"""Imports by reference: POST /v1/models/import (docs/IMPORTS.md)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app import idempotency
from app.auth import CurrentCaller
from app.deps import SettingsDep, UoW
from app.errors import BODY_ERRORS, problem_responses
from app.idempotency import IdempotencyKeyHeader
from app.imports import runner, service
from app.imports.schemas import ImportIn
from app.models.schemas import ModelOut

# The lifespan runs this process's import threads while the app runs (FastAPI merges a router's
# lifespan into the app's when it is included).
router = APIRouter(prefix="/v1/models", tags=["models"], lifespan=runner.lifespan)

_LOCATION = {"Location": {"description": "`/v1/models/{id}`: where to follow the import", "schema": {"type": "string"}}}


@router.post(
    "/import",
    status_code=202,
    response_model=ModelOut,
    responses={
        202: {"description": "The model, importing", "headers": _LOCATION},
        **problem_responses(*BODY_ERRORS, 403, 429),
    },
)
def import_model(
    body: ImportIn,
    caller: CurrentCaller,
    uow: UoW,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ModelOut | JSONResponse:
    """Import a model by reference (an S3 prefix or object, or an https file): the server fetches,
    validates and stores it; follow `status` and `progress` at the Location. With
    `Idempotency-Key`, a retry of the same request returns the first response."""
    key = idempotency.check_key(idempotency_key)
    scope = (
        None
        if key is None
        else idempotency.Scope(
            caller.tenant_id,
            "POST /v1/models/import",
            key,
            idempotency.json_digest(body.model_dump(mode="json")),
            "/v1/models/{id}",
        )
    )

    def create() -> tuple[str, ModelOut]:
        model = service.start(uow, caller, settings, body)
        response.headers["Location"] = f"/v1/models/{model.id}"
        return model.id, ModelOut.model_validate(model, from_attributes=True)

    return idempotency.run(uow, scope, 202, create)
