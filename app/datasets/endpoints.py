from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app import idempotency
from app.auth import Caller, CurrentCaller
from app.conditional import PAGE_LINK_HEADERS
from app.datasets import repository, service
from app.datasets.schemas import DatasetOut, DatasetPage
from app.deps import PageLimit, SettingsDep, StorageDep, UoW
from app.errors import API_ERRORS, BODY_ERRORS, problem_responses
from app.idempotency import IdempotencyKeyHeader
from app.resumable import service as resumable
from app.resumable.schemas import FROM_UPLOADS_SCHEMA
from app.routing import etag_get
from app.uploads import StagingArea, parse_upload_form
from core.config import Settings
from core.db import UnitOfWork
from core.errors import Unprocessable
from core.pagination import link_header, next_cursor
from core.storage import Storage

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": '.txt (one sample a line) or .jsonl ({"text", "label"?} a line)',
                        },
                        # The service's rule (app.datasets.service.NAME_RE; it also takes non-ASCII letters).
                        "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[\w .:@+-]+$"},
                    },
                }
            },
            # Or the file of a finished resumable upload (/v1/uploads, docs/UPLOADS.md): one entry.
            # The models' schema itself (one FilesFromUploads component, one class in a generated
            # client); the one-file rule is in its description and answered 422 `unexpected_part`.
            "application/json": {
                "schema": {
                    **FROM_UPLOADS_SCHEMA,
                    "description": "a dataset is one file: `files` names exactly one finished upload "
                    "(more: 422 `unexpected_part`)",
                }
            },
        },
    }
}


def _out(ds) -> DatasetOut:  # noqa: ANN001
    return DatasetOut.model_validate(ds, from_attributes=True)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=_UPLOAD_BODY,
    responses=problem_responses(*BODY_ERRORS, 404, 409, 413, 415, 429),
)
async def upload_dataset(
    request: Request,
    caller: CurrentCaller,
    uow: UoW,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> DatasetOut | JSONResponse:
    """Upload a dataset (multipart part `file`), or make it from a finished resumable upload (JSON
    `{"name"?, "files": {file name: upload id}}`): validated line by line, counted, stored. With
    `Idempotency-Key`, a retry of the same upload returns the first response instead of storing
    the dataset again."""
    key = idempotency.check_key(idempotency_key)
    if resumable.is_json(request):
        return await _dataset_from_upload(request, caller, uow, storage, settings, key)
    with StagingArea(settings.tmp_dir) as staging:
        files, fields = await parse_upload_form(request, staging, settings)
        scope = (
            None
            if key is None
            else idempotency.Scope(caller.tenant_id, "POST /v1/datasets", key, idempotency.upload_digest(files, fields))
        )

        def create() -> tuple[str, DatasetOut]:
            ds = service.create(uow, caller, storage, files, fields.get("name"))
            return ds.id, _out(ds)

        # Validation reads every line of a possibly multi-GB file: keep it off the event loop.
        return await run_in_threadpool(idempotency.run, uow, scope, 201, create)


async def _dataset_from_upload(
    request: Request, caller: Caller, uow: UnitOfWork, storage: Storage, settings: Settings, key: str | None
) -> DatasetOut | JSONResponse:
    """``POST /v1/datasets`` with JSON: the upload becomes the multipart upload's staged file."""
    body = await resumable.read_from_uploads(request, settings)
    if len(body.files) != 1:
        detail = f"a dataset is one file: name exactly one upload in 'files' (got {len(body.files)})"
        raise Unprocessable(
            detail, code="unexpected_part", errors=[{"loc": ["body", "files"], "msg": detail, "type": "one_file"}]
        )
    scope = (
        None
        if key is None
        else idempotency.Scope(caller.tenant_id, "POST /v1/datasets", key, idempotency.json_digest(body.model_dump()))
    )
    with StagingArea(settings.tmp_dir) as staging:

        def create() -> tuple[str, DatasetOut]:
            files = resumable.take(uow, caller, settings, staging, body.files, "file")
            ds = service.create(uow, caller, storage, files, body.name)
            return ds.id, _out(ds)

        return await run_in_threadpool(resumable.create_once, uow, scope, create)


@router.get(
    "", response_model=DatasetPage, responses={200: {"headers": PAGE_LINK_HEADERS}, **problem_responses(*API_ERRORS)}
)
def list_datasets(
    caller: CurrentCaller,
    uow: UoW,
    request: Request,
    response: Response,
    limit: PageLimit = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> DatasetPage:
    """List the caller's datasets, newest first."""
    rows = repository.list_page(uow.session, caller.tenant_id, limit, cursor)
    nxt = next_cursor(rows, limit)
    response.headers["Link"] = link_header(request, nxt)
    return DatasetPage(items=[_out(d) for d in rows[:limit]], next_cursor=nxt)


@etag_get(router, "/{dataset_id}", response_model=DatasetOut, responses=problem_responses(*API_ERRORS, 404))
def get_dataset(dataset_id: str, caller: CurrentCaller, uow: UoW) -> DatasetOut:
    """One dataset (with an `ETag`: `If-None-Match` gets 304 while it is unchanged)."""
    return _out(service.get(uow, caller, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=problem_responses(*API_ERRORS, 404, 409))
def delete_dataset(dataset_id: str, caller: CurrentCaller, uow: UoW, storage: StorageDep) -> Response:
    """Delete a dataset and its file (finished jobs keep their history; their dataset_id becomes null)."""
    service.delete(uow, caller, storage, dataset_id)
    return Response(status_code=204)
