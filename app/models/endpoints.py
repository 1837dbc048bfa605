from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app import idempotency
from app.auth import Caller, CurrentCaller
from app.conditional import PAGE_LINK_HEADERS
from app.deps import PageLimit, SettingsDep, StorageDep, UoW
from app.errors import API_ERRORS, BODY_ERRORS, problem_responses
from app.idempotency import IdempotencyKeyHeader
from app.models import repository, service
from app.models.schemas import ModelOut, ModelPage
from app.resumable import service as resumable
from app.resumable.schemas import FROM_UPLOADS_SCHEMA
from app.routing import etag_get
from app.uploads import StagingArea, parse_upload_form
from core.config import Settings
from core.db import UnitOfWork
from core.pagination import link_header, next_cursor
from core.storage import Storage

router = APIRouter(prefix="/v1/models", tags=["models"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
                        # The service's rule (app.models.service.NAME_RE; it also takes non-ASCII letters).
                        "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[\w .:@+-]+$"},
                    },
                }
            },
            # Or the files of finished resumable uploads (/v1/uploads, docs/UPLOADS.md).
            "application/json": {"schema": FROM_UPLOADS_SCHEMA},
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    openapi_extra=_UPLOAD_BODY,
    responses=problem_responses(*BODY_ERRORS, 404, 409, 413, 415, 429),
)
async def upload_model(
    request: Request,
    caller: CurrentCaller,
    uow: UoW,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> ModelOut | JSONResponse:
    """Upload a Hugging Face model directory or one bare safetensors file (multipart parts `files`),
    or make it from finished resumable uploads (JSON `{"name"?, "files": {file name: upload id}}`).
    With `Idempotency-Key`, a retry of the same upload returns the first response instead of
    storing the model again."""
    key = idempotency.check_key(idempotency_key)
    if resumable.is_json(request):
        return await _model_from_uploads(request, caller, uow, storage, settings, key)
    with StagingArea(settings.tmp_dir) as staging:
        files, fields = await parse_upload_form(request, staging, settings)
        # The digest of an upload is known once it is streamed (sha256s computed on the way).
        scope = (
            None
            if key is None
            else idempotency.Scope(caller.tenant_id, "POST /v1/models", key, idempotency.upload_digest(files, fields))
        )

        def create() -> tuple[str, ModelOut]:
            model = service.create(uow, caller, storage, settings, files, fields.get("name"))
            return model.id, ModelOut.model_validate(model, from_attributes=True)

        # Validation hashes and reads headers of multi-GB files: keep it off the event loop.
        return await run_in_threadpool(idempotency.run, uow, scope, 201, create)


async def _model_from_uploads(
    request: Request, caller: Caller, uow: UnitOfWork, storage: Storage, settings: Settings, key: str | None
) -> ModelOut | JSONResponse:
    """``POST /v1/models`` with JSON: the uploads become the multipart upload's staged files."""
    body = await resumable.read_from_uploads(request, settings)
    scope = (
        None
        if key is None
        else idempotency.Scope(caller.tenant_id, "POST /v1/models", key, idempotency.json_digest(body.model_dump()))
    )
    with StagingArea(settings.tmp_dir) as staging:

        def create() -> tuple[str, ModelOut]:
            files = resumable.take(uow, caller, settings, staging, body.files, "files")
            model = service.create(uow, caller, storage, settings, files, body.name)
            return model.id, ModelOut.model_validate(model, from_attributes=True)

        return await run_in_threadpool(resumable.create_once, uow, scope, create)


@router.get(
    "", response_model=ModelPage, responses={200: {"headers": PAGE_LINK_HEADERS}, **problem_responses(*API_ERRORS)}
)
def list_models(
    caller: CurrentCaller,
    uow: UoW,
    request: Request,
    response: Response,
    limit: PageLimit = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ModelPage:
    """List the caller's models, newest first."""
    rows = repository.list_page(uow.session, caller.tenant_id, limit, cursor)
    nxt = next_cursor(rows, limit)
    response.headers["Link"] = link_header(request, nxt)
    return ModelPage(items=[ModelOut.model_validate(m, from_attributes=True) for m in rows[:limit]], next_cursor=nxt)


@etag_get(router, "/{model_id}", response_model=ModelOut, responses=problem_responses(*API_ERRORS, 404))
def get_model(model_id: str, caller: CurrentCaller, uow: UoW) -> ModelOut:
    """One model (with an `ETag`: `If-None-Match` gets 304 while it is unchanged)."""
    return ModelOut.model_validate(service.get(uow, caller, model_id), from_attributes=True)


@router.delete("/{model_id}", status_code=204, responses=problem_responses(*API_ERRORS, 404, 409))
def delete_model(model_id: str, caller: CurrentCaller, uow: UoW, storage: StorageDep) -> Response:
    """Delete a model and its files (jobs and their artifacts are kept)."""
    service.delete(uow, caller, storage, model_id)
    return Response(status_code=204)
