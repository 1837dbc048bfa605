from __future__ import annotations

from app.auth import Caller
from app.db import UnitOfWork
from app.errors import Conflict, NotFound, Unprocessable
from app.jobs import repository
from app.jobs.schemas import JobIn
from app.datasets import repository as datasets_repo
from app.models import repository as models_repo
from app.tables import Job
from worker.celery_app import enqueue_job
from worker.methods import ModelInfo, StepError, validate_steps
from worker.methods import get as get_method


def submit(uow: UnitOfWork, caller: Caller, body: JobIn) -> Job:
    model = models_repo.get(uow.session, caller.tenant_id, body.model_id)
    if model is None:
        raise Unprocessable(
            f"no model {body.model_id}",
            code="unknown_model",
            errors=[{"loc": ["body", "model_id"], "msg": "no such model", "type": "unknown_model"}],
        )
    for field in ("dataset_id", "eval_dataset_id"):
        ds_id = getattr(body, field)
        if ds_id is not None and datasets_repo.get(uow.session, caller.tenant_id, ds_id) is None:
            raise Unprocessable(
                f"no dataset {ds_id}", code="unknown_dataset",
                errors=[{"loc": ["body", field], "msg": "no such dataset", "type": "unknown_dataset"}],
            )
    info = ModelInfo(
        format=model.format, architecture=model.architecture, config=model.config,
        files=tuple(f["name"] for f in model.files),
    )
    try:
        steps = validate_steps([s.model_dump() for s in body.steps], info, has_dataset=body.dataset_id is not None)
    except StepError as e:
        raise Unprocessable(f"invalid job spec: {e}", errors=e.errors) from None
    queue = "gpu" if any(get_method(s["method"]).needs_gpu for s in steps) else "cpu"
    job = Job(
        tenant_id=caller.tenant_id, model_id=model.id, name=body.name, steps=steps, queue=queue,
        dataset_id=body.dataset_id, eval_dataset_id=body.eval_dataset_id,
    )
    uow.session.add(job)
    uow.session.flush()
    job_id = job.id
    # Only after the row is committed: a worker that sees the message must find the job.
    uow.after_commit(lambda: enqueue_job(job_id, queue))
    return job


def get(uow: UnitOfWork, caller: Caller, job_id: str) -> Job:
    job = repository.get(uow.session, caller.tenant_id, job_id)
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
