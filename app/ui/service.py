"""What the dashboard's pages read, on top of the API's services (no rule of its own: a job, a
model or a sweep is found, checked and shaped exactly as the API does it), and the one live stream
of its own: the state of the jobs a list page shows.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio

from app.auth import Caller
from app.datasets import repository as datasets_repo
from app.jobs import service as jobs
from app.models import repository as models_repo
from app.models.schemas import ModelOut
from app.sweeps import repository as sweeps_repo
from app.sweeps import service as sweeps
from app.sweeps.schemas import SweepSummary
from app.ui import repository
from core import recipes
from core.db import UnitOfWork, read_uow
from core.errors import Conflict, Unprocessable
from core.jobs import repository as jobs_repo
from core.jobs.schemas import JobIn, JobOut
from core.tables import Dataset, Job

PAGE = 50  # rows of a list page (the newest); the API's list routes page through the rest
LIVE_MAX_JOBS = PAGE
LIVE_POLL_S = 1.0
LIVE_KEEPALIVE_S = 15.0
TERMINAL = jobs_repo.TERMINAL


def job_list(uow: UnitOfWork, caller: Caller, status: str | None) -> list[JobOut]:
    return [jobs.job_out(uow, j) for j in jobs_repo.list_page(uow.session, caller.tenant_id, status, PAGE, None)]


def model_list(uow: UnitOfWork, caller: Caller) -> list[ModelOut]:
    rows = models_repo.list_page(uow.session, caller.tenant_id, PAGE, None)
    return [ModelOut.model_validate(m, from_attributes=True) for m in rows]


def sweep_list(uow: UnitOfWork, caller: Caller) -> list[SweepSummary]:
    return sweeps.summaries(uow, sweeps_repo.list_page(uow.session, caller.tenant_id, PAGE, None))


def model_jobs(uow: UnitOfWork, caller: Caller, model_id: str) -> list[JobOut]:
    """The newest jobs of a model (from the tenant's newest page of jobs)."""
    return [j for j in job_list(uow, caller, None) if j.model_id == model_id]


def recipe_choices() -> list[dict[str, Any]]:
    """The named recipes as ``GET /v1/recipes`` shows them, in its order (per target, the
    recommended one first), for the model page's form."""
    order = list(recipes.TARGETS)
    rows = sorted(recipes.RECIPES.values(), key=lambda r: (order.index(r.target), not r.recommended, r.name))
    return [recipes.describe(r) for r in rows]


def dataset_choices(uow: UnitOfWork, caller: Caller) -> list[Dataset]:
    """The tenant's newest datasets, for a recipe that calibrates on one."""
    return datasets_repo.list_page(uow.session, caller.tenant_id, PAGE, None)


def submit_recipe(uow: UnitOfWork, caller: Caller, model_id: str, recipe: str, dataset_id: str | None) -> Job:
    """A job of a named recipe on the model, through the API's own submit (the same checks,
    refusals and plan; enqueued once the request's transaction commits)."""
    if recipes.get(recipe) is None:
        msg = recipes.unknown_message(recipe)
        raise Unprocessable(msg, errors=[{"loc": ["body", "recipe"], "msg": msg, "type": "unknown_recipe"}])
    return jobs.submit(uow, caller, JobIn(model_id=model_id, recipe=recipe, dataset_id=dataset_id))


def succeeded(uow: UnitOfWork, caller: Caller, job_id: str) -> Job:
    """The job, if its artifact can be downloaded (409 ``artifact_not_ready`` otherwise, as the API)."""
    job = jobs.get(uow, caller, job_id)
    if job.status != "succeeded" or not job.artifact_key:
        raise Conflict(f"the job is {job.status}; the artifact exists once it has succeeded", code="artifact_not_ready")
    return job


def _states(tenant_id: str, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    with read_uow() as uow:
        rows = repository.job_states(uow.session, tenant_id, job_ids)
    return {
        r.id: {"job_id": r.id, "status": r.status, "stage": r.progress_stage, "fraction": r.progress_fraction}
        for r in rows
    }


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def live_jobs(tenant_id: str, job_ids: list[str]) -> AsyncIterator[str]:
    """Server-sent events for a list page: ``event: job`` with ``{job_id, status, stage, fraction}``
    for each of the jobs (the tenant's among ``job_ids``) at once and whenever it changes, read
    every ``LIVE_POLL_S``; ``event: end`` when all are finished. One connection for the whole
    table: a browser opens at most six to a host, so not one ``/v1/jobs/{id}/events`` per row."""
    seen: dict[str, dict[str, Any]] = {}
    quiet = 0.0
    while True:
        states = await anyio.to_thread.run_sync(_states, tenant_id, job_ids)
        changed = [s for i, s in states.items() if seen.get(i) != s]
        for state in changed:
            seen[state["job_id"]] = state
            yield _sse("job", state)
        if all(s["status"] in TERMINAL for s in states.values()):
            yield _sse("end", {"jobs": len(states)})
            return
        quiet = 0.0 if changed else quiet + LIVE_POLL_S
        if quiet >= LIVE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await anyio.sleep(LIVE_POLL_S)
