from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from app import idempotency
from app.auth import CurrentCaller
from app.conditional import PAGE_LINK_HEADERS
from app.deps import PageLimit, StorageDep, UoW
from app.errors import API_ERRORS, BODY_ERRORS, problem_responses
from app.idempotency import IdempotencyKeyHeader
from app.negotiation import HTML_HEADERS, prefers_html
from app.routing import etag_get
from app.sweeps import repository, service
from app.sweeps.schemas import LinkIn, LinkOut, SweepIn, SweepOut, SweepPage
from core import signing
from core.pagination import link_header, next_cursor, query_int

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


def _html(sweep: SweepOut) -> HTMLResponse:
    from app.reports.html import render_sweep  # imported on use: charts pull in matplotlib

    return HTMLResponse(render_sweep(sweep.model_dump(mode="json")), headers=HTML_HEADERS)


_LOCATION = {"Location": {"description": "`/v1/sweeps/{id}`: where to poll the sweep", "schema": {"type": "string"}}}


@router.post(
    "",
    status_code=202,
    response_model=SweepOut,
    responses={
        202: {"description": "The sweep, its jobs queued", "headers": _LOCATION},
        **problem_responses(*BODY_ERRORS, 409, 429),  # 409 model_not_ready
    },
)
def create_sweep(
    body: SweepIn, caller: CurrentCaller, uow: UoW, response: Response, idempotency_key: IdempotencyKeyHeader = None
) -> SweepOut | JSONResponse:
    """Start a sweep: one job per combination of the `vary` values, all queued at once. With
    `Idempotency-Key`, a retry of the same request returns the first response instead of starting
    another sweep."""
    key = idempotency.check_key(idempotency_key)
    scope = (
        None
        if key is None
        else idempotency.Scope(
            caller.tenant_id,
            "POST /v1/sweeps",
            key,
            idempotency.json_digest(body.model_dump(mode="json")),
            "/v1/sweeps/{id}",
        )
    )

    def create() -> tuple[str, SweepOut]:
        sweep, _jobs = service.create(uow, caller, body)
        response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
        return sweep.id, service.report(uow, sweep)

    return idempotency.run(uow, scope, 202, create)


@router.get(
    "", response_model=SweepPage, responses={200: {"headers": PAGE_LINK_HEADERS}, **problem_responses(*API_ERRORS)}
)
def list_sweeps(
    caller: CurrentCaller,
    uow: UoW,
    request: Request,
    response: Response,
    limit: PageLimit = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> SweepPage:
    """List the caller's sweeps, newest first, with their status and counts."""
    rows = repository.list_page(uow.session, caller.tenant_id, limit, cursor)
    nxt = next_cursor(rows, limit)
    response.headers["Link"] = link_header(request, nxt)
    return SweepPage(items=service.summaries(uow, rows[:limit]), next_cursor=nxt)


@etag_get(
    router,
    "/{sweep_id}",
    response_model=SweepOut,
    responses={
        200: {
            "content": {"text/html": {"schema": {"type": "string"}}},
            "description": "The sweep as JSON, or as an HTML page when the Accept header prefers text/html",
        },
        **problem_responses(*API_ERRORS, 404),
    },
)
def get_sweep(
    sweep_id: str, caller: CurrentCaller, uow: UoW, response: Response, accept: Annotated[str | None, Header()] = None
) -> SweepOut | HTMLResponse:
    """One sweep: every point's metrics and the Pareto frontier; HTML when the client prefers it.
    With an `ETag` (JSON and HTML apart): `If-None-Match` gets 304 while it is unchanged."""
    sweep = service.report(uow, service.get(uow, caller, sweep_id))
    if prefers_html(accept):
        page = _html(sweep)
        page.headers["Vary"] = "Accept"
        return page
    response.headers["Vary"] = "Accept"
    return sweep


@router.delete("/{sweep_id}", status_code=204, responses=problem_responses(*API_ERRORS, 404, 409))
def delete_sweep(sweep_id: str, caller: CurrentCaller, uow: UoW, storage: StorageDep) -> Response:
    """Delete a sweep and its points' jobs with their artifacts (409 while a point is queued or running)."""
    service.delete(uow, caller, storage, sweep_id)
    return Response(status_code=204)


@router.post(
    "/{sweep_id}/link", status_code=201, response_model=LinkOut, responses=problem_responses(*BODY_ERRORS, 404)
)
def create_link(
    sweep_id: str,
    request: Request,
    caller: CurrentCaller,
    uow: UoW,
    body: Annotated[LinkIn | None, Body()] = None,
) -> LinkOut:
    """A signed, short-lived link that opens the sweep's HTML page without an API key."""
    sweep = service.get(uow, caller, sweep_id)
    url, expires_at = signing.link(request, "view_sweep", "sweep", sweep.id, body.ttl_s if body else None)
    return LinkOut(url=url, expires_at=expires_at)


@router.get(
    "/{sweep_id}/view",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}}, "description": "The sweep as an HTML page"},
        **problem_responses(404, 410, 422, 503),
    },
)
def view_sweep(
    sweep_id: str,
    uow: UoW,
    expires: Annotated[query_int(0, 2**40) | None, Query()] = None,
    signature: Annotated[str | None, Query(max_length=128)] = None,
) -> HTMLResponse:
    """The sweep's HTML page through a signed link (no Authorization header needed)."""
    # hmac.compare_digest refuses non-ASCII str (TypeError, a 500): such a signature is simply wrong.
    signing.verify("sweep", sweep_id, expires, signature if signature is None or signature.isascii() else "")
    return _html(service.report(uow, service.get_unscoped(uow, sweep_id)))
