"""API keys over the API: list (any key: its own tenant's; admin: any tenant's), create and revoke
(admin). The server CLI does the same on the database directly (``modelpress keys ...``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.auth import AdminCaller, CurrentCaller
from app.conditional import PAGE_LINK_HEADERS
from app.deps import PageLimit, UoW
from app.errors import API_ERRORS, BODY_ERRORS, problem_responses
from app.keys import service
from app.keys.schemas import ApiKeyCreated, ApiKeyIn, ApiKeyOut, ApiKeyPage, RevokeIn
from core.pagination import link_header, next_cursor

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.get(
    "",
    response_model=ApiKeyPage,
    responses={200: {"headers": PAGE_LINK_HEADERS}, **problem_responses(*API_ERRORS, 403, 404)},
)
def list_keys(
    caller: CurrentCaller,
    uow: UoW,
    request: Request,
    response: Response,
    tenant: Annotated[str | None, Query(max_length=100, description="another tenant's keys, by name (admin)")] = None,
    all_tenants: Annotated[bool, Query(description="every tenant's keys (admin)")] = False,
    limit: PageLimit = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ApiKeyPage:
    """List API keys, newest first: the caller's tenant's, or (admin) another tenant's or all."""
    rows = service.list_page(uow.session, caller, tenant, all_tenants, limit, cursor)
    nxt = next_cursor(rows, limit)
    response.headers["Link"] = link_header(request, nxt)
    return ApiKeyPage(items=service.out(uow.session, rows[:limit]), next_cursor=nxt)


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=problem_responses(*BODY_ERRORS, 403))
def create_key(body: ApiKeyIn, caller: AdminCaller, uow: UoW, response: Response) -> ApiKeyCreated:
    """Create a key for a tenant (created if new); the whole key is in this answer only (admin)."""
    response.headers["Cache-Control"] = "no-store"
    return service.create(uow.session, body.tenant, list(body.scopes))


@router.post("/revoke", response_model=ApiKeyOut, responses=problem_responses(*BODY_ERRORS, 403, 404))
def revoke_key(body: RevokeIn, caller: AdminCaller, uow: UoW) -> ApiKeyOut:
    """Revoke a key by id or prefix (admin). Idempotent: a revoked key stays revoked, at its first
    revocation's time. Every API process refuses it within a second (app/auth.py)."""
    return service.revoke_for(uow, caller, body.id)
