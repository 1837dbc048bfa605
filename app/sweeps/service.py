"""Sweeps: validate the grid, create one child job per point in the request's transaction, and
assemble the report (every point's metrics, the status and the Pareto frontier)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from app.auth import Caller
from app.jobs import service as jobs_service
from app.models import repository as models_repo
from app.sweeps import repository
from app.sweeps.pareto import number, sweep_frontier
from app.sweeps.schemas import (
    MAX_POINTS,
    Counts,
    PointError,
    PointMetrics,
    PointOut,
    SweepIn,
    SweepOut,
    SweepSpec,
    SweepSummary,
)
from core import recipes
from core.db import UnitOfWork
from core.errors import NotFound, Unprocessable
from core.jobs.schemas import JobIn, StepIn
from core.storage import Storage
from core.tables import Job, Sweep

# Canonical: no leading zeros, so two different paths never name the same parameter.
# Used with fullmatch only: "$" would also match before a trailing newline.
PATH_RE = re.compile(r"steps\[(0|[1-9][0-9]{0,8})\]\.params\.([A-Za-z_][A-Za-z0-9_]{0,99})")
# The vary path whose values are recipe names (GET /v1/recipes): one point per recipe.
RECIPE_PATH = "recipe"
JOB_NAME_MAX = 200


def _key(value: Any) -> str:
    """A canonical text of a JSON value (1 and 1.0 differ, like the JSON they came from)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _check_source(body: SweepIn) -> None:
    """Where the points' steps come from: the steps given, a recipe's, or (``vary`` on
    ``recipe``) each point's own recipe; exactly one."""
    loc: list[str | int]
    if RECIPE_PATH in body.vary:
        given = [k for k in ("steps", "recipe") if getattr(body, k) is not None]
        others = [p for p in body.vary if p != RECIPE_PATH]
        if given or others:
            loc = ["body", given[0]] if given else ["body", "vary", others[0]]
            msg = "a sweep that varies the recipe takes its steps from each recipe: " + (
                f"leave out {given[0]}" if given else f"it cannot also vary {others[0]!r} (recipes differ in steps)"
            )
            raise Unprocessable(msg, code="invalid_vary", errors=[{"loc": loc, "msg": msg, "type": "recipe_and_steps"}])
        return
    if body.steps is not None and body.recipe is not None:
        msg = "give steps or a recipe, not both"
        raise Unprocessable(msg, errors=[{"loc": ["body", "steps"], "msg": msg, "type": "recipe_and_steps"}])
    if body.steps is None and body.recipe is None:
        msg = 'give steps, a recipe, or vary the recipe ("vary": {"recipe": [...]})'
        raise Unprocessable(msg, errors=[{"loc": ["body", "steps"], "msg": msg, "type": "missing"}])


def _base_steps(body: SweepIn) -> list[dict[str, Any]]:
    """The steps every point starts from: those given, or the fixed recipe's; [] when the recipe varies."""
    if body.steps is not None:
        return [s.model_dump() for s in body.steps]
    recipe = recipes.get(body.recipe) if body.recipe is not None else None
    return recipe.expand() if recipe is not None else []


def _check_vary(body: SweepIn, base: list[dict[str, Any]]) -> None:
    errors: list[dict[str, Any]] = []
    for path, values in body.vary.items():
        loc: list[str | int] = ["body", "vary", path]
        if path == RECIPE_PATH:
            for k, value in enumerate(values):
                if not isinstance(value, str) or recipes.get(value) is None:
                    msg = recipes.unknown_message(value) if isinstance(value, str) else "a recipe is named by a string"
                    errors.append({"loc": [*loc, k], "msg": msg, "type": "unknown_recipe"})
        m = PATH_RE.fullmatch(path)
        if m is None and path != RECIPE_PATH:
            errors.append(
                {
                    "loc": loc,
                    "msg": f"{path!r} is not a vary path: use steps[<i>].params.<name>, e.g. steps[0].params.sparsity, "
                    f"or {RECIPE_PATH!r}",
                    "type": "invalid_vary_path",
                }
            )
            continue
        if m is not None and int(m.group(1)) >= len(base):
            of = f"recipe {body.recipe!r}" if body.recipe is not None else "sweep"
            errors.append(
                {
                    "loc": loc,
                    "msg": f"there is no steps[{m.group(1)}]: the {of} has {len(base)} "
                    f"step{'s' if len(base) != 1 else ''}",
                    "type": "vary_index_out_of_range",
                }
            )
            continue
        seen: set[str] = set()
        for k, value in enumerate(values):
            try:
                json.dumps(value, allow_nan=False)
            except ValueError:
                errors.append(
                    {"loc": [*loc, k], "msg": "NaN and infinities are not JSON values", "type": "invalid_value"}
                )
                continue
            if _key(value) in seen:
                errors.append({"loc": [*loc, k], "msg": f"{_key(value)} is listed twice", "type": "duplicate_value"})
            seen.add(_key(value))
    if errors:
        raise Unprocessable("invalid vary: " + "; ".join(e["msg"] for e in errors), code="invalid_vary", errors=errors)
    n = math.prod(len(v) for v in body.vary.values())
    if n > MAX_POINTS:
        msg = f"the grid has {n} points; a sweep has at most {MAX_POINTS}"
        raise Unprocessable(
            msg, code="too_many_points", errors=[{"loc": ["body", "vary"], "msg": msg, "type": "too_many_points"}]
        )


def grid(vary: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every point's values, in order: the cartesian product, the last path varying fastest."""
    paths = list(vary)
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*(vary[p] for p in paths))]


def _point_steps(steps: list[dict[str, Any]], values: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = copy.deepcopy(steps)
    for path, value in values.items():
        m = PATH_RE.fullmatch(path)
        assert m is not None  # checked by _check_vary (a varied recipe is a point's JobIn.recipe)
        out[int(m.group(1))].setdefault("params", {})[m.group(2)] = copy.deepcopy(value)
    return out


def _label(values: Mapping[str, Any]) -> str:
    return " ".join(f"{path}={_key(value)}" for path, value in values.items())


def _point_error(
    e: Unprocessable, index: int, values: Mapping[str, Any], vary: Mapping[str, list[Any]]
) -> Unprocessable:
    """The job service's refusal of one point, re-addressed to the sweep: the detail names the
    point, and an error on a varied parameter points at its value in ``vary``."""
    errors = []
    for err in e.errors or []:
        loc = list(err.get("loc", []))
        if len(loc) >= 5 and loc[:2] == ["body", "steps"] and loc[3] == "params":
            path = f"steps[{loc[2]}].params.{loc[4]}"
            if path in vary:
                k = next(k for k, v in enumerate(vary[path]) if _key(v) == _key(values[path]))
                loc = ["body", "vary", path, k, *loc[5:]]
        errors.append({**err, "loc": loc, "point": index})
    return Unprocessable(f"sweep point {index} ({_label(values)}) is invalid: {e.detail}", code=e.code, errors=errors)


def _point_step_models(
    steps: list[dict[str, Any]], index: int, values: Mapping[str, Any], vary: Mapping[str, list[Any]]
) -> list[StepIn]:
    """The point's steps as request models: a varied value of the wrong JSON type (true for an
    integer) is refused like one in ``steps`` (StepIn is strict), as a 422 naming the point."""
    out = []
    for j, step in enumerate(steps):
        try:
            out.append(StepIn.model_validate(step))
        except ValidationError as e:
            errors = []
            for err in e.errors(include_url=False, include_input=False):
                field = (err.get("ctx") or {}).get("field")
                loc = ["body", "steps", j, "params", field] if field else ["body", "steps", j, *err["loc"]]
                errors.append({"loc": loc, "msg": err["msg"], "type": err["type"]})
            detail = "; ".join(e["msg"] for e in errors)
            raise _point_error(Unprocessable(detail, errors=errors), index, values, vary) from None
    return out


def create(uow: UnitOfWork, caller: Caller, body: SweepIn) -> tuple[Sweep, list[Job]]:
    """Add the sweep and one job per point (each enqueued after the commit). A point the job
    service refuses is a 422 naming it, and the request's rollback leaves no row at all."""
    _check_source(body)
    base = _base_steps(body)
    _check_vary(body, base)
    if models_repo.get(uow.session, caller.tenant_id, body.model_id) is None:
        # Checked before the sweep row is written: that row references the model.
        raise Unprocessable(
            f"no model {body.model_id}",
            code="unknown_model",
            errors=[{"loc": ["body", "model_id"], "msg": "no such model", "type": "unknown_model"}],
        )
    points = grid(body.vary)
    spec = SweepSpec(
        steps=base,
        recipe=body.recipe,
        vary=body.vary,
        dataset_id=body.dataset_id,
        eval_dataset_id=body.eval_dataset_id,
        evaluation=body.evaluation.model_dump(),
        output=body.output.model_dump(),
    )
    sweep = Sweep(
        tenant_id=caller.tenant_id, model_id=body.model_id, name=body.name, spec=spec.model_dump(), points=len(points)
    )
    uow.session.add(sweep)
    uow.session.flush()
    jobs = []
    for i, values in enumerate(points):
        recipe = values.get(RECIPE_PATH)
        job_in = JobIn(
            model_id=body.model_id,
            # A point of a varied recipe is that recipe's job; one of a fixed recipe whose steps a
            # point changes is no longer the recipe: it is given as steps (its name says which).
            recipe=recipe,
            steps=[] if recipe is not None else _point_step_models(_point_steps(base, values), i, values, body.vary),
            name=f"{body.name or body.recipe or 'sweep'} [{i}] {_label(values)}"[:JOB_NAME_MAX],
            dataset_id=body.dataset_id,
            eval_dataset_id=body.eval_dataset_id,
            evaluation=body.evaluation,
            output=body.output,
        )
        try:
            jobs.append(jobs_service.submit(uow, caller, job_in, sweep_id=sweep.id, sweep_point=values))
        except Unprocessable as e:
            if any(list(err.get("loc", []))[:2] == ["body", "steps"] for err in e.errors or []):
                raise _point_error(e, i, values, body.vary) from None
            raise  # not about this point (an unknown dataset): the same for all of them
    return sweep, jobs


def get(uow: UnitOfWork, caller: Caller, sweep_id: str) -> Sweep:
    sweep = repository.get(uow.session, caller.tenant_id, sweep_id)
    if sweep is None:
        raise NotFound(f"no sweep {sweep_id}")
    return sweep


def delete(uow: UnitOfWork, caller: Caller, storage: Storage, sweep_id: str) -> None:
    """Delete a sweep and its points' jobs (with their artifacts, after the commit): 409
    ``job_not_finished`` while a point is queued or running."""
    sweep = get(uow, caller, sweep_id)
    jobs_service.delete_finished(
        uow,
        storage,
        repository.jobs_of(uow.session, sweep.id),
        "a point of the sweep is queued or running; cancel its jobs first (POST /v1/jobs/{id}/cancel)",
    )
    uow.session.delete(sweep)


def get_unscoped(uow: UnitOfWork, sweep_id: str) -> Sweep:
    sweep = repository.get_unscoped(uow.session, sweep_id)
    if sweep is None:
        raise NotFound(f"no sweep {sweep_id}")  # the same words as a bad signature
    return sweep


# --- the report ------------------------------------------------------------------------------


def _section(metrics: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A section of a job's metrics, or {} when it is missing, not a dict, or unavailable."""
    value = metrics.get(name)
    if not isinstance(value, Mapping) or value.get("available") is False:
        return {}
    return value


def point_metrics(metrics: Any) -> PointMetrics:
    """The sweep's view of a job's metrics; anything missing, unavailable or malformed is null."""
    if not isinstance(metrics, Mapping):
        return PointMetrics()
    size, quality = _section(metrics, "size"), _section(metrics, "quality")
    fidelity, sparsity = _section(metrics, "fidelity"), _section(metrics, "sparsity")
    speed_section = _section(metrics, "speed")
    speed = _section(speed_section, "compressed")
    artifact = number(size.get("artifact_bytes"))
    q = number(quality.get("compressed"))
    name = quality.get("metric")
    hib = quality.get("higher_is_better")
    return PointMetrics(
        artifact_bytes=int(artifact) if artifact is not None else None,
        compression_ratio=number(size.get("compression_ratio")),
        latency_ms=number(speed.get("median_ms")),
        speedup=number(speed_section.get("speedup")),
        quality_metric=name if isinstance(name, str) and q is not None else None,
        quality=q,
        higher_is_better=hib if isinstance(hib, bool) and q is not None else None,
        kl_mean=number(fidelity.get("kl_mean")),
        top1_agreement=number(fidelity.get("top1_agreement")),
        sparsity=number(sparsity.get("sparsity")),
    )


def sweep_status(counts: Counts) -> str:
    total = counts.queued + counts.running + counts.succeeded + counts.failed + counts.canceled
    if total == 0 or counts.queued == total:
        return "queued"
    if counts.queued or counts.running:
        return "running"
    if counts.succeeded == total:
        return "succeeded"
    if counts.canceled == total:
        return "canceled"
    return "failed" if counts.succeeded == 0 else "partial"


def _counts(by_status: Mapping[str, int]) -> Counts:
    return Counts(**{k: v for k, v in by_status.items() if k in Counts.model_fields})


def report(uow: UnitOfWork, sweep: Sweep) -> SweepOut:
    """The sweep with every point's status and metrics, and the Pareto frontier of those."""
    spec = SweepSpec.model_validate(sweep.spec)
    by_point = {
        _key(job.sweep_point): job for job in repository.jobs_of(uow.session, sweep.id) if job.sweep_point is not None
    }
    points: list[PointOut] = []
    for i, values in enumerate(grid(spec.vary)):
        job = by_point.get(_key(values))
        if job is None:  # cannot happen while jobs are never deleted on their own; said plainly if it does
            points.append(
                PointOut(
                    index=i,
                    values=values,
                    job_id=None,
                    status="failed",
                    error=PointError(code="job_missing", message="this point's job no longer exists"),
                )
            )
            continue
        error = None
        if job.status == "failed":
            error = PointError(code=job.error_code or "failed", message=job.error_message or "")
        points.append(
            PointOut(
                index=i,
                values=values,
                job_id=job.id,
                status=job.status,
                metrics=point_metrics(job.metrics) if job.status == "succeeded" else None,
                error=error,
            )
        )
    counts = _counts({s: sum(1 for p in points if p.status == s) for s in Counts.model_fields})
    front = sweep_frontier(
        [
            {"index": p.index, "status": p.status, "metrics": p.metrics.model_dump() if p.metrics else None}
            for p in points
        ]
    )
    on = set(front.indices)
    for p in points:
        p.on_frontier = p.index in on
    return SweepOut(
        id=sweep.id,
        name=sweep.name,
        model_id=sweep.model_id,
        created_at=sweep.created_at,
        status=sweep_status(counts),
        spec=spec,
        counts=counts,
        points=points,
        frontier=front.indices,
        frontier_axes=front.axes,
        frontier_note=front.note,
    )


def summaries(uow: UnitOfWork, sweeps: list[Sweep]) -> list[SweepSummary]:
    by_sweep = repository.status_counts(uow.session, [s.id for s in sweeps])
    out = []
    for s in sweeps:
        counts = _counts(by_sweep[s.id])
        out.append(
            SweepSummary(
                id=s.id,
                name=s.name,
                model_id=s.model_id,
                created_at=s.created_at,
                status=sweep_status(counts),
                points=s.points,
                spec=SweepSpec.model_validate(s.spec),
                counts=counts,
            )
        )
    return out
