from __future__ import annotations

import logging
from typing import Any

from app import quotas
from app.auth import Caller
from app.datasets import repository as datasets_repo
from app.models import repository as models_repo
from app.webhooks import service as webhooks_service
from core import exports
from core import workers as worker_registry
from core.config import get_settings
from core.db import UnitOfWork
from core.errors import Conflict, JobExceedsWorkerBudget, NotFound, Unprocessable
from core.jobs import plan as planner
from core.jobs import repository
from core.jobs.schemas import JobIn, JobOut
from core.methods import ModelInfo, StepError, load_all, validate_steps
from core.methods import get as get_method
from core.queue import enqueue_job
from core.storage import Storage, get_storage
from core.tables import Job, Model, utcnow

log = logging.getLogger("modelpress.jobs")


def submit(
    uow: UnitOfWork, caller: Caller, body: JobIn, *, sweep_id: str | None = None, sweep_point: dict | None = None
) -> Job:
    """Check the spec, plan the job (refused when no live worker's budget fits it), add the job
    row and enqueue it after the commit (a sweep adds one per point in one transaction: all
    points are recorded, or none)."""
    if body.webhook_url is not None:  # before any query: it may wait on DNS
        webhooks_service.check_url(body.webhook_url)
    model, steps = _checked(uow, caller, body)
    quotas.check_job(uow.session, caller.tenant_id)
    queue = "gpu" if any(get_method(s["method"]).needs_gpu for s in steps) else "cpu"
    plan = _plan_or_none(uow, model, steps, body.evaluation.model_dump(), queue, body.output.model_dump())
    if plan is not None:
        fleet = fleet_budget(uow, plan, queue)
        if fleet is not None and not fleet["fits"]:
            raise over_budget(plan, fleet)
    _check_fleet_runtime(uow, body, model, steps, queue)
    job = Job(
        tenant_id=caller.tenant_id,
        model_id=model.id,
        name=body.name,
        steps=steps,
        queue=queue,
        progress_stage=_gpu_stage(uow) if queue == "gpu" else "queued",
        dataset_id=body.dataset_id,
        eval_dataset_id=body.eval_dataset_id,
        enqueued_at=utcnow(),
        evaluation=body.evaluation.model_dump(),
        output=body.output.model_dump(),
        recipe=body.recipe,
        sweep_id=sweep_id,
        sweep_point=sweep_point,
        webhook_url=body.webhook_url,
        plan=plan,
    )
    uow.session.add(job)
    uow.session.flush()
    repository.record_submitted(uow.session, job)
    job_id = job.id
    # Only after the row is committed: a worker that sees the message must find the job.
    uow.after_commit(lambda: enqueue_job(job_id, queue))
    return job


def estimate(uow: UnitOfWork, caller: Caller, body: JobIn) -> dict[str, Any]:
    """The plan of a job spec, checked as a submit checks it, with what the fleet can take;
    nothing is recorded or run."""
    model, steps = _checked(uow, caller, body)
    queue = "gpu" if any(get_method(s["method"]).needs_gpu for s in steps) else "cpu"
    try:
        plan = plan_job(uow, model, steps, body.evaluation.model_dump(), queue, body.output.model_dump())
    except (OSError, planner.HeaderError) as e:
        raise Conflict(
            f"the model's stored files cannot be read to plan the job ({e})", code="model_unreadable"
        ) from None
    _check_fleet_runtime(uow, body, model, steps, queue)
    return {**plan, "fleet": fleet_budget(uow, plan, queue)}


def _checked(uow: UnitOfWork, caller: Caller, body: JobIn) -> tuple[Model, list[dict]]:
    """The job's model and its validated steps, or the 422 that says what is wrong."""
    model = models_repo.get(uow.session, caller.tenant_id, body.model_id)
    if model is None:
        raise Unprocessable(
            f"no model {body.model_id}",
            code="unknown_model",
            errors=[{"loc": ["body", "model_id"], "msg": "no such model", "type": "unknown_model"}],
        )
    _check_ready(model)
    for field in ("dataset_id", "eval_dataset_id"):
        ds_id = getattr(body, field)
        if ds_id is not None and datasets_repo.get(uow.session, caller.tenant_id, ds_id) is None:
            raise Unprocessable(
                f"no dataset {ds_id}",
                code="unknown_dataset",
                errors=[{"loc": ["body", field], "msg": "no such dataset", "type": "unknown_dataset"}],
            )
    info = ModelInfo(
        format=model.format,
        architecture=model.architecture,
        config=model.config,
        files=tuple(f["name"] for f in model.files),
        # Every layer's shape, for the group-size check (read only when a step has one).
        tensors=lambda: _model_tensors(uow, model),
    )
    try:
        steps = validate_steps(body.raw_steps(), info, has_dataset=body.dataset_id is not None)
    except StepError as e:
        raise Unprocessable(f"invalid job spec: {e}", errors=e.errors) from None
    _check_student_models(uow, caller, model, steps)
    _check_output(body, info, steps)
    return model, steps


def _check_output(body: JobIn, info: ModelInfo, steps: list[dict]) -> None:
    """422 ``output_unsupported`` when the model cannot be written in the requested format, with
    every reason (each names the tensor or setting at fault, and what the format supports)."""
    output = body.output.model_dump()
    reasons = exports.refusals(output, info, steps, has_dataset=body.dataset_id is not None)
    if reasons:
        raise Unprocessable(
            f"the model cannot be exported as {output['format']}: {reasons[0]}"
            + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""),
            code="output_unsupported",
            errors=[
                {"loc": ["body", "output"], "msg": r, "type": "output_unsupported", "format": output["format"]}
                for r in reasons
            ],
        )


# --- plans and the fleet's budgets -------------------------------------------------------------


def _model_tensors(uow: UnitOfWork, model: Model) -> list[planner.Tensor]:
    """The model's tensors from the headers of its stored safetensors files (no weights are
    read), once per request (a sweep plans every point on the same model)."""
    cache = uow.session.info.setdefault("model_tensors", {})
    if model.id not in cache:
        storage, limit = get_storage(), get_settings().max_safetensors_header_bytes
        tensors: list[planner.Tensor] = []
        for f in model.files:
            if f["name"].endswith(".safetensors"):
                with storage.open(f"{model.storage_prefix}/{f['name']}") as fh:
                    tensors += planner.read_header(fh, limit)
        cache[model.id] = tensors
    return cache[model.id]


def plan_job(
    uow: UnitOfWork, model: Model, steps: list[dict], evaluation: dict, queue: str, output: dict | None = None
) -> dict[str, Any]:
    """The job's plan (core/jobs/plan.py), with the live workers' measured throughput and the
    export stage of an output format (core.exports.with_export)."""
    storage = get_storage()
    tensors = _model_tensors(uow, model)
    # MODELPRESS_STREAM_ENGINE false (the workers' setting, read here too) builds every model in memory.
    settings = get_settings()
    stream = planner.stream_capable(steps, load_all()) and settings.stream_engine
    blocks = not stream and planner.blocks_capable(model.format, steps, load_all()) and settings.block_engine
    plan = planner.compute(
        fmt=model.format,
        tensors=tensors,
        other_bytes=sum(f["size_bytes"] for f in model.files if not f["name"].endswith(".safetensors")),
        input_bytes=model.size_bytes,
        steps=steps,
        evaluation=evaluation,
        stream=stream,
        blocks=blocks,
        input_on_scratch=not storage.is_local,
        throughput=_fleet_throughput(uow, queue),
        memory_bytes=_fleet_memory(uow, queue),
        activation_memory_bytes=settings.activation_memory_mb << 20,
    )
    return exports.with_export(plan, output or {}, steps, model.config)


def _plan_or_none(
    uow: UnitOfWork, model: Model, steps: list[dict], evaluation: dict, queue: str, output: dict | None = None
) -> dict[str, Any] | None:
    """A submit's plan; None when the stored files cannot be read (the job is accepted unplanned:
    the worker's own load reports the problem)."""
    try:
        return plan_job(uow, model, steps, evaluation, queue, output)
    except (OSError, planner.HeaderError) as e:
        log.warning("model %s: no plan (%s)", model.id, e)
        return None


def _live(uow: UnitOfWork, queue: str) -> list[Any]:
    cache = uow.session.info.setdefault("live_workers", {})
    if queue not in cache:
        cache[queue] = repository.live_workers(uow.session, queue, worker_registry.live_since())
    return cache[queue]


def _fleet_memory(uow: UnitOfWork, queue: str) -> int | None:
    """The largest memory budget of the queue's live workers (None: unknown), which decides how
    the plan counts evaluation (planner.evaluation_mode)."""
    budgets = [w.memory_budget_bytes for w in _live(uow, queue)]
    return None if not budgets or any(b is None for b in budgets) else max(budgets)


def _fleet_throughput(uow: UnitOfWork, queue: str) -> dict[str, float]:
    """Mean measured work bytes per second of the queue's live workers, by plan path."""
    found: dict[str, list[float]] = {}
    for w in _live(uow, queue):
        for path, m in (w.throughput or {}).items():
            if isinstance(m, dict) and m.get("bytes_per_s"):
                found.setdefault(path, []).append(float(m["bytes_per_s"]))
    return {p: sum(v) / len(v) for p, v in found.items()}


def _check_fleet_runtime(uow: UnitOfWork, body: JobIn, model: Model, steps: list[dict], queue: str) -> None:
    """422 ``output_runtime_unavailable`` when the output can only be made by an optional runtime
    (a GGUF Q4_K_M needs llama.cpp's quantizer) that no live worker of the queue has: the job
    would otherwise fail on whichever worker took it. Unknown fleets (no live worker, or one that
    published no runtimes) are not refused, as for budgets."""
    output = body.output.model_dump()
    need = exports.required_runtime(output, steps, model.config)
    if need is None:
        return
    workers = _live(uow, queue)
    if not workers or any(w.runtimes is None for w in workers):
        return
    if any(need in w.runtimes for w in workers):
        return
    package = exports.OPTIONAL_RUNTIMES[need]
    msg = (
        f"{output['format']} {output.get('type')} is written by {package}, which none of the {len(workers)} live "
        f"{queue} workers has (pip install 'modelpress[llamacpp]' on a worker, docs/EXPORTS.md); "
        "the other GGUF types (F16, BF16, Q8_0, Q4_0) need no extra package"
    )
    raise Unprocessable(
        msg,
        code="output_runtime_unavailable",
        errors=[{"loc": ["body", "output"], "msg": msg, "type": "output_runtime_unavailable", "runtime": package}],
    )


def fleet_budget(uow: UnitOfWork, plan: dict[str, Any], queue: str) -> dict[str, Any] | None:
    """The largest budgets of the queue's live workers and whether one fits the plan; None when
    the fleet's budgets are unknown (no live worker, or one that published none: it takes anything)."""
    workers = _live(uow, queue)
    if not workers or any(w.memory_budget_bytes is None or w.scratch_budget_bytes is None for w in workers):
        return None
    return {
        "queue": queue,
        "workers": len(workers),
        "memory_bytes": max(w.memory_budget_bytes for w in workers),
        "scratch_bytes": max(w.scratch_budget_bytes for w in workers),
        "fits": any(planner.fits(plan, w.memory_budget_bytes, w.scratch_budget_bytes) for w in workers),
    }


def over_budget(plan: dict[str, Any], fleet: dict[str, Any]) -> JobExceedsWorkerBudget:
    who = f"the largest live {fleet['queue']} worker ({fleet['workers']} live)"
    return JobExceedsWorkerBudget(
        planner.over_budget_message(plan, fleet["memory_bytes"], fleet["scratch_bytes"], who),
        errors=[
            {"loc": ["body"], "msg": "no live worker's budget fits the job's plan", "type": "job_exceeds_worker_budget"}
        ],
        extensions={
            "required": {
                "memory_bytes": plan["peak_memory_bytes"],
                "scratch_bytes": plan["scratch_bytes"],
                "path": plan["path"],
            },
            "available": {
                "memory_bytes": fleet["memory_bytes"],
                "scratch_bytes": fleet["scratch_bytes"],
                "queue": fleet["queue"],
                "workers": fleet["workers"],
            },
        },
    )


# Files that define a tokenizer's vocabulary: a student that brings its own must bring the same.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")


def _check_ready(model: Model) -> None:
    """Jobs run only on a ready model: 409 ``model_not_ready`` while it is importing or after its
    import failed (POST /v1/models/import)."""
    if model.status != "ready":
        why = "its import failed (see the model's error)" if model.status == "failed" else "it is still importing"
        raise Conflict(f"model {model.id} is not ready: {why}", code="model_not_ready")


def _check_student_models(uow: UnitOfWork, caller: Caller, teacher: Model, steps: list[dict]) -> None:
    """A step naming another model (``student_model_id``, distillation) may only name an HF model
    of the caller's tenant whose logits mean what the teacher's mean: same vocabulary size and,
    where it ships tokenizer files, the same files (by sha256)."""
    for i, step in enumerate(steps):
        student_id = step["params"].get("student_model_id")
        if student_id is None:
            continue
        refusal = _student_refusal(uow, caller, teacher, student_id)
        if refusal is not None:
            code, msg = refusal
            loc = ["body", "steps", i, "params", "student_model_id"]
            raise Unprocessable(f"invalid job spec: {msg}", code=code, errors=[{"loc": loc, "msg": msg, "type": code}])


def _student_refusal(uow: UnitOfWork, caller: Caller, teacher: Model, student_id: str) -> tuple[str, str] | None:
    """Why ``student_id`` cannot be the teacher's student, as ``(code, message)``; None if it can."""
    student = models_repo.get(uow.session, caller.tenant_id, student_id)
    if student is None:
        # Another tenant's model answers exactly like a missing one.
        return "unknown_model", f"no model {student_id}"
    _check_ready(student)
    if student.format != "hf":
        return "unsupported_model", "the student must be a Hugging Face model directory (with config.json)"
    t_vocab, s_vocab = (teacher.config or {}).get("vocab_size"), (student.config or {}).get("vocab_size")
    if t_vocab != s_vocab:
        return "tokenizer_mismatch", f"the student's vocab_size {s_vocab} differs from the teacher's {t_vocab}"
    teacher_files = {f["name"]: f["sha256"] for f in teacher.files}
    for name in _TOKENIZER_FILES:
        sha = next((f["sha256"] for f in student.files if f["name"] == name), None)
        if sha is not None and teacher_files.get(name) != sha:
            return (
                "tokenizer_mismatch",
                f"the student's {name} differs from the teacher's: it must use the same tokenizer",
            )
    return None


WAITING_FOR_GPU = "waiting for a GPU worker"


def _gpu_stage(uow: UnitOfWork) -> str:
    """What a queued GPU job waits for, from the worker registry: ``queued`` while a worker that
    serves the gpu queue is live, else the wait. Read once per request (a sweep or a list asks
    for every job at once)."""
    cache = uow.session.info
    if "gpu_stage" not in cache:
        seen = worker_registry.last_seen(uow.session, "gpu")
        if seen is None:
            cache["gpu_stage"] = f"{WAITING_FOR_GPU} (none has been seen)"
        elif seen < worker_registry.live_since():
            cache["gpu_stage"] = f"{WAITING_FOR_GPU} (none seen since {seen:%Y-%m-%dT%H:%M:%SZ})"
        else:
            cache["gpu_stage"] = "queued"
    return cache["gpu_stage"]


def stage(uow: UnitOfWork, job: Any) -> str | None:
    """The job's progress stage as of now: a queued GPU job's says whether a GPU worker is live."""
    if job.status == "queued" and job.queue == "gpu":
        return _gpu_stage(uow)
    return job.progress_stage


def job_out(uow: UnitOfWork, job: Any) -> JobOut:
    """The job as every route that answers a job sends it (``JobOut``): the row, an ORM ``Job``
    or a Core row of all its columns (GET /v1/jobs/{id}'s hot read), with its stage as of now."""
    return JobOut.from_row(job, stage(uow, job))


def workers(uow: UnitOfWork) -> list[dict]:
    """Every registered worker, for operators: the same list whatever the caller's tenant."""
    since = worker_registry.live_since()
    return [
        {
            "id": w.id,
            "hostname": w.hostname,
            "queues": w.queues,
            "device": w.device,
            "started_at": w.started_at,
            "last_seen_at": w.last_seen_at,
            "live": w.last_seen_at >= since,
            "memory_budget_bytes": w.memory_budget_bytes,
            "scratch_budget_bytes": w.scratch_budget_bytes,
            "throughput": w.throughput,
            "runtimes": w.runtimes,
        }
        for w in worker_registry.all_workers(uow.session)
    ]


def get(uow: UnitOfWork, caller: Caller, job_id: str) -> Job:
    job = repository.get(uow.session, caller.tenant_id, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def report(job: Job) -> dict:
    """The report of a succeeded job: its metrics with the job's identity."""
    if job.status != "succeeded" or not job.metrics:
        raise Conflict(f"the job is {job.status}; its report exists once it has succeeded", code="report_not_ready")
    return {
        "job_id": job.id,
        "job_name": job.name,
        "model_id": job.model_id,
        "sweep_id": job.sweep_id,
        "status": job.status,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        **job.metrics,
    }


def get_unscoped(uow: UnitOfWork, job_id: str) -> Job:
    """A job by id for a signed link (the signature, checked first, is the authorization)."""
    job = uow.session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def cancel(uow: UnitOfWork, caller: Caller, job_id: str) -> Job:
    job = get(uow, caller, job_id)
    if job.status in repository.TERMINAL:
        raise Conflict(f"the job is already {job.status}", code="job_finished")
    if not repository.cancel_queued(uow.session, job.id):
        repository.request_cancel(uow.session, job.id)
    uow.session.refresh(job)
    return job


def delete(uow: UnitOfWork, caller: Caller, storage: Storage, job_id: str) -> None:
    """Delete a finished job (its events, webhook deliveries and, once committed, its artifact);
    a sweep's point goes only with its sweep."""
    job = get(uow, caller, job_id)
    if job.sweep_id is not None:
        raise Conflict(f"the job is a point of sweep {job.sweep_id}; delete the sweep instead", code="job_in_sweep")
    delete_finished(uow, storage, [job], "the job is queued or running; cancel it first (POST /v1/jobs/{id}/cancel)")


def delete_finished(uow: UnitOfWork, storage: Storage, jobs: list[Job], busy: str) -> None:
    """Delete these jobs, all or none: 409 ``job_not_finished`` (saying ``busy``) while one is
    queued or running. Their artifacts (every attempt's, under ``artifacts/<id>``) are deleted
    once the transaction has committed."""
    if not repository.delete_finished(uow.session, [j.id for j in jobs]):
        raise Conflict(busy, code="job_not_finished")
    prefixes = [f"artifacts/{j.id}" for j in jobs]

    def remove() -> None:
        for prefix in prefixes:
            storage.delete_prefix(prefix)

    uow.after_commit(remove)
