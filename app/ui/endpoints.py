"""The dashboard's routes (docs/UI.md). Left out of the OpenAPI document: they answer HTML pages,
not the API.

Every route but the sign-in page, the static files and ``POST /ui/login`` needs the sign-in
cookie (app/ui/session.py); without a working one a page redirects to ``/ui/login``. Every POST
passes the CSRF check first. A refusal (404, 409, 422, ...) is the same typed error the API raises,
drawn as a page by :class:`UiRoute` instead of problem+json.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Cookie, Depends, Form, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from app.auth import Caller
from app.deps import SettingsDep, StorageDep, UoW
from app.jobs import downloads, events
from app.jobs import service as jobs
from app.models import service as models
from app.models.schemas import ModelOut
from app.negotiation import HTML_HEADERS
from app.reports import units
from app.sweeps import service as sweeps
from app.ui import service, session
from app.uploads import StagingArea, parse_upload_form
from core.errors import ModelpressError, NotFound
from core.jobs.schemas import JobStatus
from core.signing import public_base_url

# What the dashboard's pages need: its own script and stylesheet, fetch/EventSource to itself, the
# report pages in frames of its own, forms posted to itself. Nothing from anywhere else.
UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": UI_CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# A report page (app/reports) shown in a frame of the job's or sweep's page: the report's own
# policy, framed only by this origin.
FRAMED_HEADERS = {
    **HTML_HEADERS,
    "Content-Security-Policy": HTML_HEADERS["Content-Security-Policy"].replace(
        "frame-ancestors 'none'", "frame-ancestors 'self'"
    ),
}
_STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


class SignInRequired(Exception):
    """No cookie, or one whose key no longer works: the page redirects to the sign-in form."""


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else units.DASH


@cache
def environment() -> jinja2.Environment:
    """As the reports' (app/reports/html.py): package templates, autoescaping, StrictUndefined."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("app.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, size=units.size, percent=units.percent, count=units.count)
    return env


def page(name: str, caller: Caller | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = environment().get_template(name).render(user=caller, **context)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


def _to_login() -> RedirectResponse:
    return RedirectResponse("/ui/login", status_code=303, headers={"Cache-Control": "no-store"})


class UiRoute(APIRoute):
    """A dashboard route: a typed error becomes an HTML page with its status, and
    :class:`SignInRequired` a redirect to the sign-in form (clearing a cookie that stopped working)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def serve(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                response = _to_login()
                if session.COOKIE in request.cookies:
                    response.delete_cookie(session.COOKIE, path=session.COOKIE_PATH)
                return response
            except ModelpressError as e:
                try:  # the page's header shows the tenant and the sign-out button when it can
                    caller = await session.caller_of(request.cookies.get(session.COOKIE))
                except ModelpressError:  # the database is what failed
                    caller = None
                return page("error.html.j2", caller, e.status, error=e)

        return serve


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=UiRoute)


_KeyCookie = Annotated[str | None, Cookie(alias=session.COOKIE)]


async def signed_in(key: _KeyCookie = None) -> Caller:
    caller = await session.caller_of(key)
    if caller is None:
        raise SignInRequired
    return caller


UiCaller = Annotated[Caller, Depends(signed_in)]


def same_origin(request: Request) -> None:
    session.check_origin(request.headers)


SameOrigin = Depends(same_origin)


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The dashboard's script and stylesheet, from the package (no CDN, no build step)."""
    if name not in _STATIC:
        raise NotFound(f"no file {name}")
    return Response(
        _static_bytes(name),
        media_type=_STATIC[name],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@cache
def _static_bytes(name: str) -> bytes:
    return (resources.files("app.ui") / "static" / name).read_bytes()


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login")
async def login_form(key: _KeyCookie = None) -> Response:
    """The sign-in form (the jobs list for a cookie that still works)."""
    if await session.caller_of(key) is not None:
        return RedirectResponse("/ui/jobs", status_code=303)
    return page("login.html.j2", None)


@router.post("/login", dependencies=[SameOrigin])
async def login(request: Request, key: Annotated[str, Form(max_length=500)] = "") -> Response:
    """Check the key as the API would and keep it in the sign-in cookie."""
    caller = await session.caller_of(key.strip())
    if caller is None:
        return page("login.html.j2", None, 401, error="That API key is not valid (or has been revoked).")
    response = RedirectResponse("/ui/jobs", status_code=303)
    # Secure over https, as this request came or as the public base URL says (TLS ended at a proxy).
    secure = request.url.scheme == "https" or public_base_url().startswith("https://")
    response.set_cookie(session.COOKIE, key.strip(), **session.cookie_options(secure))
    return response


@router.post("/logout", dependencies=[SameOrigin])
def logout() -> Response:
    response = _to_login()
    response.delete_cookie(session.COOKIE, path=session.COOKIE_PATH)
    return response


# -- jobs -----------------------------------------------------------------------------------------


@router.get("/jobs")
def job_list(caller: UiCaller, uow: UoW, status: JobStatus | None = None) -> HTMLResponse:
    """The newest jobs; the unfinished ones update live (``/ui/jobs/live``)."""
    rows = service.job_list(uow, caller, status)
    live = [j.id for j in rows if j.status not in service.TERMINAL]
    return page("jobs.html.j2", caller, jobs=rows, live=",".join(live), status=status or "", statuses=_STATUSES)


_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")


@router.get("/jobs/live")
async def jobs_live(
    caller: UiCaller, ids: Annotated[str, Query(max_length=64 * service.LIVE_MAX_JOBS)] = ""
) -> Response:
    """Server-sent events of the listed jobs' status and progress (service.live_jobs)."""
    job_ids = [i for i in dict.fromkeys(ids.split(",")) if i][: service.LIVE_MAX_JOBS]
    return StreamingResponse(
        service.live_jobs(caller.tenant_id, job_ids),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}")
def job_page(job_id: str, caller: UiCaller, uow: UoW, storage: StorageDep) -> HTMLResponse:
    """A job: status and progress (live), its report, its downloads."""
    job = jobs.get(uow, caller, job_id)
    files = downloads.list_files(job, storage).files if job.status == "succeeded" and job.artifact_key else []
    return page("job.html.j2", caller, job=jobs.job_out(uow, job), files=files, terminal=job.status in service.TERMINAL)


@router.get("/jobs/{job_id}/events")
def job_events(
    job_id: str,
    caller: UiCaller,
    uow: UoW,
    # What EventSource sends when it reconnects.
    last_event_id: Annotated[int, Header(alias="last-event-id", ge=0, le=2**63 - 1)] = 0,
) -> StreamingResponse:
    """The job's own event stream (GET /v1/jobs/{id}/events), for the cookie holder."""
    job = jobs.get(uow, caller, job_id)
    return StreamingResponse(
        events.stream(job.id, last_event_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/report")
def job_report(job_id: str, caller: UiCaller, uow: UoW) -> HTMLResponse:
    """The job's HTML report (app/reports), shown in a frame of the job's page."""
    from app.reports.html import render_job_report  # matplotlib loads only when a page is drawn

    report = jobs.report(jobs.get(uow, caller, job_id))
    return HTMLResponse(render_job_report(report), headers=FRAMED_HEADERS)


@router.get("/jobs/{job_id}/artifact")
def download_artifact(job_id: str, caller: UiCaller, uow: UoW, storage: StorageDep) -> Response:
    """The artifact, as GET /v1/jobs/{id}/artifact sends it."""
    job = service.succeeded(uow, caller, job_id)
    return downloads.serve(downloads.whole(job, storage), method="GET", range_=None, if_none_match=None, if_range=None)


@router.get("/jobs/{job_id}/files/{name}")
def download_file(job_id: str, name: str, caller: UiCaller, uow: UoW, storage: StorageDep) -> Response:
    """One file of the artifact, as GET /v1/jobs/{id}/artifact/files/{name} sends it."""
    job = service.succeeded(uow, caller, job_id)
    rep = downloads.one_file(job, storage, name)
    return downloads.serve(rep, method="GET", range_=None, if_none_match=None, if_range=None)


# -- sweeps ---------------------------------------------------------------------------------------


@router.get("/sweeps")
def sweep_list(caller: UiCaller, uow: UoW) -> HTMLResponse:
    return page("sweeps.html.j2", caller, sweeps=service.sweep_list(uow, caller))


@router.get("/sweeps/{sweep_id}")
def sweep_page(sweep_id: str, caller: UiCaller, uow: UoW) -> HTMLResponse:
    """A sweep: its counts and its points' jobs, and its page (frontier plot) in a frame."""
    sweep = sweeps.report(uow, sweeps.get(uow, caller, sweep_id))
    return page("sweep.html.j2", caller, sweep=sweep, terminal=sweep.status not in ("queued", "running"))


@router.get("/sweeps/{sweep_id}/report")
def sweep_report(sweep_id: str, caller: UiCaller, uow: UoW) -> HTMLResponse:
    from app.reports.html import render_sweep  # matplotlib loads only when a page is drawn

    sweep = sweeps.report(uow, sweeps.get(uow, caller, sweep_id))
    return HTMLResponse(render_sweep(sweep.model_dump(mode="json")), headers=FRAMED_HEADERS)


# -- models ---------------------------------------------------------------------------------------


@router.get("/models")
def model_list(caller: UiCaller, uow: UoW) -> HTMLResponse:
    """The newest models and the upload form."""
    return page("models.html.j2", caller, models=service.model_list(uow, caller), error=None)


@router.post("/models", dependencies=[SameOrigin])
async def upload_model(
    request: Request, caller: UiCaller, uow: UoW, storage: StorageDep, settings: SettingsDep
) -> Response:
    """The upload form's files, through the API's upload service (the same checks, the same
    limits); a refusal is shown above the form."""
    try:
        with StagingArea(settings.tmp_dir) as staging:
            files, fields = await parse_upload_form(request, staging, settings)
            files = [f for f in files if f.filename]  # a form's empty file input sends a part with no name
            name = fields.get("name", "").strip() or None
            model = await run_in_threadpool(models.create, uow, caller, storage, settings, files, name)
    except ModelpressError as e:
        uow.rollback()  # nothing of the refused upload is kept (its stored files go with it)
        rows = await run_in_threadpool(service.model_list, uow, caller)
        return page("models.html.j2", caller, e.status, models=rows, error=e)
    return RedirectResponse(f"/ui/models/{model.id}", status_code=303)


@router.get("/models/{model_id}")
def model_page(model_id: str, caller: UiCaller, uow: UoW) -> HTMLResponse:
    return _model_page(uow, caller, model_id)


def _model_page(uow: UoW, caller: Caller, model_id: str, error: ModelpressError | None = None) -> HTMLResponse:
    model = ModelOut.model_validate(models.get(uow, caller, model_id), from_attributes=True)
    return page(
        "model.html.j2",
        caller,
        error.status if error is not None else 200,
        model=model,
        jobs=service.model_jobs(uow, caller, model.id),
        recipes=service.recipe_choices(),
        datasets=service.dataset_choices(uow, caller),
        error=error,
    )


@router.post("/models/{model_id}/jobs", dependencies=[SameOrigin])
def submit_job(
    model_id: str,
    caller: UiCaller,
    uow: UoW,
    recipe: Annotated[str, Form(max_length=64)] = "",
    dataset_id: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """The model page's form: a job of a named recipe (GET /v1/recipes), submitted as POST /v1/jobs
    would be; a refusal (a recipe that needs a dataset, a plan over every worker's budget...) is
    shown above the form, and nothing is recorded."""
    try:
        job = service.submit_recipe(uow, caller, model_id, recipe, dataset_id or None)
    except ModelpressError as e:
        uow.rollback()
        return _model_page(uow, caller, model_id, e)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)
