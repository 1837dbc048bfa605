from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from sqlalchemy import bindparam, select
from starlette.concurrency import run_in_threadpool

from app import idempotency
from app.auth import Caller, CurrentCaller
from app.conditional import PAGE_LINK_HEADERS
from app.deps import PageLimit, StorageDep, UoW
from app.errors import API_ERRORS, BODY_ERRORS, problem_responses
from app.idempotency import IdempotencyKeyHeader
from app.jobs import downloads, events, service
from app.negotiation import HTML_HEADERS, prefers_html
from app.routing import DirectRoute
from core import recipes, signing
from core.config import get_settings
from core.db import HotRead, hot_reads_available, read_uow
from core.errors import Conflict, NotFound
from core.jobs import repository
from core.jobs.schemas import (
    JobEstimate,
    JobIn,
    JobOut,
    JobPage,
    JobReport,
    JobStatus,
    LinkIn,
    LinkOut,
    MethodOut,
    RecipeOut,
    WorkerOut,
)
from core.methods import load_all
from core.pagination import link_header, next_cursor, query_int
from core.storage import Storage
from core.tables import Job

router = APIRouter(prefix="/v1", tags=["jobs"])

# The Location of a created job, which clients (and schemathesis's stateful phase) follow.
_LOCATION = {"Location": {"description": "`/v1/jobs/{id}`: where to poll the job", "schema": {"type": "string"}}}


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    responses={
        202: {"description": "The job, queued", "headers": _LOCATION},
        **problem_responses(*BODY_ERRORS, 409, 429),  # 409 model_not_ready: an import not finished
    },
)
def submit_job(
    body: JobIn, caller: CurrentCaller, uow: UoW, response: Response, idempotency_key: IdempotencyKeyHeader = None
) -> JobOut | JSONResponse:
    """Submit a compression job; it is queued and runs on a worker. With `Idempotency-Key`, a retry
    of the same request returns the first response instead of submitting another job."""
    key = idempotency.check_key(idempotency_key)
    scope = (
        None
        if key is None
        else idempotency.Scope(
            caller.tenant_id,
            "POST /v1/jobs",
            key,
            idempotency.json_digest(body.model_dump(mode="json")),
            "/v1/jobs/{id}",
        )
    )

    def create() -> tuple[str, JobOut]:
        job = service.submit(uow, caller, body)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job.id, service.job_out(uow, job)

    return idempotency.run(uow, scope, 202, create)


@router.post("/jobs/estimate", response_model=JobEstimate, responses=problem_responses(*BODY_ERRORS, 409))
def estimate_job(body: JobIn, caller: CurrentCaller, uow: UoW) -> JobEstimate:
    """The plan of a job without running it: peak memory, scratch disk, artifact bytes, seconds,
    and whether a live worker's budget fits it. Takes the body of `POST /v1/jobs`, checked the same way."""
    return JobEstimate.model_validate(service.estimate(uow, caller, body))


@router.get(
    "/jobs",
    response_model=JobPage,
    responses={200: {"headers": PAGE_LINK_HEADERS}, **problem_responses(*API_ERRORS)},
)
def list_jobs(
    caller: CurrentCaller,
    uow: UoW,
    request: Request,
    response: Response,
    status: JobStatus | None = None,
    limit: PageLimit = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobPage:
    """List the caller's jobs, newest first, optionally by status."""
    rows = repository.list_page(uow.session, caller.tenant_id, status, limit, cursor)
    nxt = next_cursor(rows, limit)
    response.headers["Link"] = link_header(request, nxt)
    return JobPage(items=[service.job_out(uow, j) for j in rows[:limit]], next_cursor=nxt)


async def get_job(job_id: str, caller: CurrentCaller) -> Response:
    """One job: status, progress, error, metrics and artifact. Its `ETag` changes whenever any of
    that does: poll with `If-None-Match` and get 304 while nothing has."""
    # What clients poll, so it is kept short (bench/bench_load.py, docs/BENCHMARKS.md): served as
    # an app.routing.DirectRoute (no per-request dependency solving); the caller usually comes
    # from app.auth's cache; on PostgreSQL the row is read on the event loop through asyncpg
    # (core.db.HotRead); the body is serialized once, byte for byte what FastAPI would send for the
    # JobOut (a Response is not validated again against response_model, which stays for the
    # OpenAPI spec). Either way the body is service.job_out's, as for every route that answers a job.
    if not hot_reads_available():  # SQLite (embedded mode): the usual read, in the thread pool
        return _json(await run_in_threadpool(_job_json, caller, job_id))
    job = await _HOT_JOB_BY_ID.first({"job_id": job_id, "tenant_id": caller.tenant_id})
    if job is None:
        raise NotFound(f"no job {job_id}")
    # service.stage reads the database only for a queued job (a GPU one: the worker registry), so
    # only a queued job's JobOut is built in the thread pool, with a session.
    out = await run_in_threadpool(_queued_job_out, job) if job.status == "queued" else JobOut.from_row(job)
    return _json(out.model_dump_json().encode())


router.add_api_route(
    "/jobs/{job_id}",
    get_job,
    methods=["GET"],
    response_model=JobOut,
    responses=problem_responses(*API_ERRORS, 404),
    route_class_override=DirectRoute,
)


# The job by id within the caller's tenant (as service.get), built once, read as a Core row of every
# column on an autocommit connection (one round trip): building an ORM select per request, and
# loading the row into a session, cost more than the round trip itself. Kept because it builds the
# same JobOut as service.job_out (JobOut.from_row reads the row's attributes, which a Core row of
# all columns has, with the same column types' result processors).
_HOT_JOB_BY_ID = HotRead(
    select(*Job.__table__.c).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
)


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def _queued_job_out(job: Any) -> JobOut:
    with read_uow() as uow:
        return service.job_out(uow, job)


def _job_json(caller: Caller, job_id: str) -> bytes:
    with read_uow() as uow:
        return service.job_out(uow, service.get(uow, caller, job_id)).model_dump_json().encode()


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=problem_responses(*API_ERRORS, 404, 409))
def cancel_job(job_id: str, caller: CurrentCaller, uow: UoW) -> JobOut:
    """Cancel a job: a queued one at once, a running one at its next step boundary."""
    job = service.cancel(uow, caller, job_id)
    return service.job_out(uow, job)


@router.delete("/jobs/{job_id}", status_code=204, responses=problem_responses(*API_ERRORS, 404, 409))
def delete_job(job_id: str, caller: CurrentCaller, uow: UoW, storage: StorageDep) -> Response:
    """Delete a finished job and its artifact (409 while it is queued or running, or a sweep's point)."""
    service.delete(uow, caller, storage, job_id)
    return Response(status_code=204)


_EVENT_ID = Annotated[
    query_int(0, 2**63 - 1) | None, Query(description="resume after this event id (as Last-Event-ID)")
]


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events until the job ends"},
        **problem_responses(*API_ERRORS, 404),
    },
)
def job_events(
    job_id: str,
    caller: CurrentCaller,
    uow: UoW,
    last_event_id: _EVENT_ID = None,
    # `int`, not `int | None`: a header has no null, and a nullable schema invites "null".
    last_event_id_header: Annotated[int, Header(alias="last-event-id", ge=0, le=2**63 - 1)] = None,  # type: ignore[assignment]
) -> StreamingResponse:
    """The job's changes as server-sent events, so a client need not poll; the stream ends when
    the job does.

    Each event is ``id: <n>`` / ``event: status|progress`` / ``data: <one-line JSON>``:

    - ``status`` (submitted, claimed by a worker, cancel requested, finished): ``{"job_id", "at",
      "status", "attempt", "cancel_requested", "progress": {"stage", "fraction"}}``, plus
      ``"error": {"code", "message"}`` when failed and ``"artifact": {"size_bytes", "sha256",
      "filename"}`` when succeeded;
    - ``progress`` (a running attempt's stage or fraction changed): ``{"job_id", "at", "status":
      "running", "attempt", "progress": {"stage", "fraction"}}``.

    Ids grow with every event of the job (they are shared by all jobs, so they skip). The stream
    starts after ``Last-Event-ID`` (header, as EventSource sends on reconnect; it wins over the
    query) or ``?last_event_id=``, else at the job's first event (``queued``); it replays what the
    client missed, then sends new events as they happen (read every 0.5 s) and a ``: keep-alive``
    comment after 15 s without one. After the terminal ``status`` event (succeeded, failed,
    canceled) comes ``event: end`` with ``data: {"job_id", "status"}`` and no id, and the stream
    closes; resuming after the terminal event gets ``end`` at once. A job that finished before
    events were recorded has no history: its stream is one ``status`` event built from the job with
    ``id: 0``, then ``end``.
    """
    job = service.get(uow, caller, job_id)
    after = last_event_id_header if last_event_id_header is not None else (last_event_id or 0)
    return StreamingResponse(
        events.stream(job.id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _html_report(report: dict) -> HTMLResponse:
    from app.reports.html import (
        render_job_report,  # matplotlib loads only when a page is drawn
    )

    return HTMLResponse(render_job_report(report), headers=HTML_HEADERS)


@router.get(
    "/jobs/{job_id}/report",
    response_model=JobReport,
    responses={
        200: {"content": {"text/html": {}}, "description": "The report (JSON, or HTML for Accept: text/html)"},
        **problem_responses(*API_ERRORS, 404, 409),
    },
)
def job_report(
    job_id: str, caller: CurrentCaller, uow: UoW, accept: Annotated[str | None, Header()] = None
) -> Response:
    """What the job changed: size, speed, quality and fidelity before and after; an HTML page with
    charts when the client prefers text/html."""
    report = service.report(service.get(uow, caller, job_id))
    page = (
        _html_report(report)
        if prefers_html(accept)
        else JSONResponse(JobReport.model_validate(report).model_dump(mode="json"))
    )
    page.headers["Vary"] = "Accept"  # one URL, two representations: caches must key on Accept
    return page


@router.post(
    "/jobs/{job_id}/report/link",
    status_code=201,
    response_model=LinkOut,
    responses=problem_responses(*BODY_ERRORS, 404, 409),
)
def job_report_link(
    job_id: str, caller: CurrentCaller, uow: UoW, request: Request, body: Annotated[LinkIn | None, Body()] = None
) -> LinkOut:
    """A short-lived link to the HTML report that a browser opens without an API key."""
    job = service.get(uow, caller, job_id)
    service.report(job)  # 409 until there is a report
    url, expires_at = signing.link(request, "job_report_view", "job", job.id, body.ttl_s if body else None)
    return LinkOut(url=url, expires_at=expires_at)


@router.get(
    "/jobs/{job_id}/report/view",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}}, "description": "The HTML report"},
        **problem_responses(404, 409, 410, 422, 503),
    },
)
def job_report_view(
    job_id: str,
    uow: UoW,
    expires: Annotated[query_int(0, 2**40) | None, Query()] = None,
    signature: Annotated[str | None, Query(max_length=128)] = None,
) -> HTMLResponse:
    """The HTML report through a signed link (no Authorization header; see POST .../report/link)."""
    # hmac.compare_digest refuses non-ASCII str (TypeError, a 500): such a signature is simply wrong.
    signing.verify("job", job_id, expires, signature if signature is None or signature.isascii() else "")
    return _html_report(service.report(service.get_unscoped(uow, job_id)))


_ARTIFACT_TYPES = {
    "application/zip": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}
_FILE_TYPES = {"*/*": {"schema": {"type": "string", "format": "binary"}}}


def _h(description: str, required: bool = True) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}, "required": required}


_ARTIFACT_HEADERS = {
    "ETag": _h("the artifact's sha256, quoted (strong)"),
    "Repr-Digest": _h("RFC 9530: `sha-256=:<base64 of the sha256>:` of the whole artifact"),
    "Accept-Ranges": _h("`bytes`"),
    "Content-Disposition": _h("`attachment; filename=...`"),
    "Content-Length": _h("bytes in this response's body (HEAD: that GET would send)"),
}
_FILE_HEADERS = {
    "ETag": _h("strong: sha256 of `<artifact sha256>/<name>` for a file of a zip; the artifact's for a single file"),
    "Repr-Digest": _h("RFC 9530 sha-256 of the file: only for a single-file artifact", required=False),
    "Modelpress-CRC32": _h("a zip entry's CRC-32 (8 hex digits) as the zip records it", required=False),
    "Accept-Ranges": _h("`bytes`"),
    "Content-Disposition": _h("`attachment; filename=...`"),
    "Content-Length": _h("bytes in this response's body (HEAD: that GET would send)"),
}
_CONTENT_RANGE = {"Content-Range": _h("`bytes <start>-<end>/<size>`")}
_NOT_MODIFIED = {"ETag": _h("the current ETag")}
# `str`, not `str | None`: a header has no null, and a nullable schema invites "null".
_RangeHeader = Annotated[
    str, Header(alias="range", description="one `bytes=<start>-<end>` range; either end may be left out")
]
_IfNoneMatch = Annotated[
    str, Header(alias="if-none-match", description="ETags (or `*`): 304 Not Modified when one matches")
]
_IfRange = Annotated[
    str,
    Header(alias="if-range", description="an ETag: the Range is honoured only if it is the current one, else 200"),
]


def _download_responses(
    types: dict[str, Any], headers: dict[str, Any], what: str, redirect: bool
) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {
        200: {"content": types, "headers": headers, "description": what},
        206: {"content": types, "headers": {**headers, **_CONTENT_RANGE}, "description": f"Part of {what}"},
        304: {"headers": _NOT_MODIFIED, "description": "Not modified: If-None-Match named the current ETag"},
    }
    if redirect:
        out[307] = {
            "headers": {"Location": _h("a presigned object-storage URL of the artifact"), **_NOT_MODIFIED},
            "description": "With S3 storage and `storage_presign_downloads`: get the bytes from `Location`",
        }
    return {**out, **problem_responses(*API_ERRORS, 404, 409, 416)}


def _succeeded(uow: Any, caller: Caller, job_id: str) -> Job:
    job = service.get(uow, caller, job_id)
    if job.status != "succeeded" or not job.artifact_key:
        raise Conflict(f"the job is {job.status}; the artifact exists once it has succeeded", code="artifact_not_ready")
    return job


def _presigned(storage: Storage, key: str) -> str | None:
    """A presigned URL of the artifact when downloads are redirected (S3 storage and the setting)."""
    settings = get_settings()
    if not (settings.storage_presign_downloads and storage.is_s3):
        return None
    return storage.presigned_url(key, settings.storage_presign_expiry_s)


@router.get(
    "/jobs/{job_id}/artifact",
    response_class=StreamingResponse,
    responses=_download_responses(
        _ARTIFACT_TYPES, _ARTIFACT_HEADERS, "The artifact: a zip (HF directory) or one safetensors file", True
    ),
)
@router.head(
    "/jobs/{job_id}/artifact",
    response_class=Response,
    responses=_download_responses({}, _ARTIFACT_HEADERS, "The artifact's headers (no body)", False),
)
def download_artifact(
    job_id: str,
    request: Request,
    caller: CurrentCaller,
    uow: UoW,
    storage: StorageDep,
    range_: _RangeHeader = None,  # type: ignore[assignment]
    if_none_match: _IfNoneMatch = None,  # type: ignore[assignment]
    if_range: _IfRange = None,  # type: ignore[assignment]
) -> Response:
    """Download the result: a zip of a Hugging Face directory, or one safetensors file
    (docs/API_DOWNLOADS.md: Range, If-None-Match, If-Range, Repr-Digest; HEAD for the headers)."""
    job = _succeeded(uow, caller, job_id)
    redirect = _presigned(storage, job.artifact_key) if request.method == "GET" else None
    return downloads.serve(
        downloads.whole(job, storage),
        method=request.method,
        range_=range_,
        if_none_match=if_none_match,
        if_range=if_range,
        redirect=redirect,
    )


@router.get(
    "/jobs/{job_id}/artifact/files",
    response_model=downloads.ArtifactFiles,
    responses=problem_responses(*API_ERRORS, 404, 409),
)
def list_artifact_files(job_id: str, caller: CurrentCaller, uow: UoW, storage: StorageDep) -> downloads.ArtifactFiles:
    """The files in the artifact (a zip's entries, or the one safetensors file): name, size, ETag."""
    job = _succeeded(uow, caller, job_id)
    return downloads.list_files(job, storage)


@router.get(
    "/jobs/{job_id}/artifact/files/{name}",
    response_class=StreamingResponse,
    responses=_download_responses(_FILE_TYPES, _FILE_HEADERS, "One file of the artifact", False),
)
@router.head(
    "/jobs/{job_id}/artifact/files/{name}",
    response_class=Response,
    responses=_download_responses({}, _FILE_HEADERS, "One file's headers (no body)", False),
)
def download_artifact_file(
    job_id: str,
    name: str,
    request: Request,
    caller: CurrentCaller,
    uow: UoW,
    storage: StorageDep,
    range_: _RangeHeader = None,  # type: ignore[assignment]
    if_none_match: _IfNoneMatch = None,  # type: ignore[assignment]
    if_range: _IfRange = None,  # type: ignore[assignment]
) -> Response:
    """One file of the artifact (`config.json`, `model.safetensors`, ...): a name is one path
    segment (an artifact is flat); a weight file is served as a byte range of the zip, no copy."""
    job = _succeeded(uow, caller, job_id)
    return downloads.serve(
        downloads.one_file(job, storage, name),
        method=request.method,
        range_=range_,
        if_none_match=if_none_match,
        if_range=if_range,
    )


@router.get("/methods", response_model=list[MethodOut], tags=["methods"], responses=problem_responses(401, 503))
def list_methods(caller: CurrentCaller) -> list[MethodOut]:
    """Every compression method with the JSON schema of its parameters and its constraints."""
    return [MethodOut(**spec.describe(), recipes=recipes.recipes_of(spec.name)) for spec in load_all().values()]


@router.get("/recipes", response_model=list[RecipeOut], tags=["methods"], responses=problem_responses(401, 503))
def list_recipes(caller: CurrentCaller) -> list[RecipeOut]:
    """The named recipes a job can give instead of steps (``"recipe": "w4-best"``): per target, the one
    this service recommends and the alternatives, with their figures on the benchmark model."""
    return [RecipeOut(**recipes.describe(r)) for r in sorted(recipes.RECIPES.values(), key=_recipe_order)]


def _recipe_order(r: recipes.Recipe) -> tuple[int, bool, str]:
    return (recipes.TARGETS.index(r.target), not r.recommended, r.name)


@router.get("/workers", response_model=list[WorkerOut], tags=["workers"], responses=problem_responses(401, 503))
def list_workers(caller: CurrentCaller, uow: UoW) -> list[WorkerOut]:
    """Every registered worker, whatever the caller's tenant: queues, device, when last seen, live."""
    return [WorkerOut(**w) for w in service.workers(uow)]
