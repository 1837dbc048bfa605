"""A worker's budget for one job, published in the registry, and the check before a claim.

Budget (per job, i.e. per pool process): ``MODELPRESS_WORKER_MEMORY_BUDGET_MB`` (the peak
resident memory a job's process may reach, the worker's own libraries included) and
``MODELPRESS_WORKER_SCRATCH_BUDGET_MB`` (disk of the job's work folder). 0, the default, reads the
machine: ``MEMORY_FRACTION`` of its memory (or of its cgroup's limit, whichever is lower) and
``SCRATCH_FRACTION`` of the free disk under ``data_dir/tmp``, each divided by
``MODELPRESS_WORKER_CONCURRENCY`` (every pool process may run a job at once). With
``MODELPRESS_JOB_MEMORY_LIMIT_MB`` set, that machine-derived memory budget is at most the plan's
baseline plus the limit (the watchdog of worker/limits.py would stop the job above it); a budget
set explicitly is used as given (the watchdog stays the safety net for a plan that was wrong).
Budgets are computed once when the worker starts.

Each worker main process publishes its budgets in its ``workers`` row (``BudgetRegistration``),
where the API reads them: a job whose plan no live worker of its queue fits is refused at submit
(422 ``job_exceeds_worker_budget``). After each job the worker records its measured throughput
(work bytes per second, by plan path) in the same row; plans use the fleet's mean.

Before a claim (:func:`admit`), a worker compares the job's stored plan with its own budget:

* fits (or the job has no plan): the worker claims and runs it;
* over this worker's budget but another live worker of the queue fits it: the job is left queued
  without a claim (the message is acknowledged; the reconciler re-sends a queued job every
  ``MODELPRESS_REQUEUE_AFTER_S``, and the next delivery may reach the bigger worker);
* over every live worker's budget (the fleet shrank since the submit): the job fails at once with
  ``job_exceeds_worker_budget``, its message naming the figures, instead of a worker being
  OOM-killed.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from core.config import Settings, get_settings
from core.db import get_sessionmaker
from core.jobs import plan as planner
from core.jobs import repository as jobs_repo
from core.tables import Job, Worker
from core.workers import live_since
from worker import registry

log = logging.getLogger("modelpress.budget")

# Of the machine's memory: the rest is the OS, the worker's main process and page cache.
MEMORY_FRACTION = 0.8
# Of the free disk under data_dir/tmp when the worker starts.
SCRATCH_FRACTION = 0.9


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's (v2, then v1) limit when it is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


def memory_budget_bytes(settings: Settings) -> int:
    """The setting when given (the operator's word), else from the machine, capped by the
    watchdog's job memory limit (a job planned over it would be stopped by worker/limits.py)."""
    if settings.worker_memory_budget_mb:
        return settings.worker_memory_budget_mb * 2**20
    budget = int(machine_memory_bytes() * MEMORY_FRACTION / settings.worker_concurrency)
    if settings.job_memory_limit_mb:
        budget = min(budget, planner.BASELINE_BYTES + settings.job_memory_limit_mb * 2**20)
    return budget


def scratch_budget_bytes(settings: Settings) -> int:
    if settings.worker_scratch_budget_mb:
        return settings.worker_scratch_budget_mb * 2**20
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    return int(shutil.disk_usage(settings.tmp_dir).free * SCRATCH_FRACTION / settings.worker_concurrency)


class BudgetRegistration(registry.Registration):
    """The worker's registry row (worker/registry.py) with its budgets on every renewal."""

    def __init__(self, queues: list[str], device: str) -> None:
        super().__init__(queues, device)
        settings = get_settings()
        self.memory_budget = memory_budget_bytes(settings)
        self.scratch_budget = scratch_budget_bytes(settings)

    def beat(self) -> None:
        super().beat()
        with get_sessionmaker()() as s:
            s.execute(
                update(Worker)
                .where(Worker.id == self.id)
                .values(memory_budget_bytes=self.memory_budget, scratch_budget_bytes=self.scratch_budget)
            )
            s.commit()

    def start(self) -> None:
        log.info(
            "worker %s budget per job: %s of memory, %s of scratch disk",
            self.id,
            planner.gib(self.memory_budget),
            planner.gib(self.scratch_budget),
        )
        super().start()


_published: tuple[int, int] | None = None


def own_budget() -> tuple[int, int]:
    """(memory, scratch) budget of this process: the worker's, as its registry row publishes it
    (a prefork pool child reads its main process's row, so the API and the worker judge a plan
    by the same figures), else computed here."""
    global _published
    reg = registration()
    if reg is not None:
        return reg.memory_budget, reg.scratch_budget
    if _published is None:
        with get_sessionmaker()() as s:
            row = s.get(Worker, own_worker_id())
            if row is not None and row.memory_budget_bytes is not None and row.scratch_budget_bytes is not None:
                _published = (row.memory_budget_bytes, row.scratch_budget_bytes)
    if _published is not None:
        return _published
    settings = get_settings()
    return memory_budget_bytes(settings), scratch_budget_bytes(settings)


# This process's registry row: set by the worker's main process when it is ready
# (worker/tasks.py); None in a prefork pool child, and outside a worker.
_current: BudgetRegistration | None = None


def set_registration(reg: BudgetRegistration | None) -> None:
    """Called by worker/tasks.py once the worker is ready (this module does not import tasks)."""
    global _current
    _current = reg


def registration() -> BudgetRegistration | None:
    """This process's registry row, or None (a prefork pool child, or not a worker)."""
    return _current


def admit(job_id: str) -> bool:
    """Whether this worker may claim the job: True when its plan fits this worker's budget (or it
    has none, or it is not claimable: the claim then says so). Otherwise the job is left for a
    bigger live worker, or failed with ``job_exceeds_worker_budget`` when the fleet has none; False."""
    with get_sessionmaker()() as s:
        row = s.execute(select(Job.plan, Job.queue, Job.status).where(Job.id == job_id)).first()
        if row is None or row.plan is None or row.status not in ("queued", "running"):
            return True
        plan, queue = row.plan, row.queue
        memory, scratch = own_budget()
        if planner.fits(plan, memory, scratch):
            return True
        me = own_worker_id()
        others = [w for w in jobs_repo.live_workers(s, queue, live_since()) if w.id != me]
        bigger = [w for w in others if planner.fits(plan, w.memory_budget_bytes, w.scratch_budget_bytes)]
        if bigger:
            log.warning(
                "job %s: its plan is over this worker's budget; left queued for a bigger worker (%s)",
                job_id,
                ", ".join(w.id for w in bigger),
            )
            return False
        fleet_memory = max([memory, *(w.memory_budget_bytes or 0 for w in others)])
        fleet_scratch = max([scratch, *(w.scratch_budget_bytes or 0 for w in others)])
        message = planner.over_budget_message(
            plan, fleet_memory, fleet_scratch, f"the largest live {queue} worker ({len(others) + 1} live)"
        )
        if jobs_repo.fail_over_budget(s, job_id, message):
            log.error("job %s: failed with job_exceeds_worker_budget: %s", job_id, message)
        return False


def own_worker_id() -> str:
    """This worker's registry id: its main process's (a prefork pool child's parent, or the
    process itself in a solo pool)."""
    reg = registration()
    return reg.id if reg is not None else f"{socket.gethostname()}:{os.getppid()}"


def record_throughput(job_id: str) -> None:
    """After a job on a model of at least ``MIN_THROUGHPUT_SAMPLE_BYTES``: its work bytes per
    second (model bytes x the method's cost weight, over the job's seconds without evaluation and
    set-up) into this worker's row, for the plan's path."""
    with get_sessionmaker()() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "succeeded" or not job.plan or not job.metrics:
            return
        # A small model's seconds are mostly set-up: no figure per byte to learn from it.
        if job.plan["model_bytes"] < planner.MIN_THROUGHPUT_SAMPLE_BYTES:
            return
        work = _work_seconds(job.metrics.get("stage_seconds") or {})
        # A job done in less than the plan's set-up allowance still says something: its whole
        # time is an upper bound on its work time, so bytes over it a lower bound on the speed.
        secs = work - planner.FIXED_SECONDS if work > 2 * planner.FIXED_SECONDS else work
        if secs <= 0:
            return
        path = job.plan["path"]
        bps = job.plan["model_bytes"] * planner.job_cost(job.steps, path) / secs
        s.rollback()
        jobs_repo.record_throughput(s, own_worker_id(), path, bps)


def _work_seconds(stage_seconds: dict[str, Any]) -> float:
    total = float(stage_seconds.get("total") or 0.0)
    return total - sum(float(v) for k, v in stage_seconds.items() if k.startswith("evaluate"))
