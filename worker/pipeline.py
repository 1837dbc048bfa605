"""One job: claim → load → run steps → save → store → record. Every write after the claim is
fenced by the attempt number (core.jobs.repository)."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import platform
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

import core
from core import logs
from core.config import Settings, get_settings
from core.db import get_sessionmaker
from core.jobs import repository as jobs_repo
from core.reconcile import drop_artifacts
from core.storage import Storage, get_storage
from core.tables import Dataset, Job, Model
from worker import evaluate, exporting, heartbeat, limits, memory, methods, model_io, stream, sweep
from worker.context import JobPort, Sample, StoredModel

log = logging.getLogger("modelpress.worker")

model_io.preload()
memory.return_freed_memory()

# Output shard size when an offloaded (block path) model is saved. ct_offload.save_offloaded holds
# one module whatever the shard size; the fallback it leaves some models to (save_pretrained: fused
# MoE experts, MTP layers, quantized embeddings) gathers a whole shard's tensors in memory.
BLOCK_SAVE_SHARD_BYTES = 512 << 20

# jobs.progress_stage is a VARCHAR(100).
PROGRESS_STAGE_MAX = 100

# Fixed zip entry time: the same inputs give a byte-identical artifact (and sha256) on every run.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class JobFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ClaimUnavailable(Exception):
    """The database could not be reached to claim the job: nothing about the job was decided, so
    its message must go back to the queue (worker/tasks.py), not be acknowledged and left to the
    reconciler's requeue minutes later."""


class LostLease(Exception):
    """This attempt no longer holds the job (it was claimed again): stop without writing."""


class DbJobPort:
    """The job's row in the database, for the attempt that runs it (fenced on the attempt)."""

    def __init__(self, job_id: str, attempt: int, settings: Settings) -> None:
        self.job_id, self.attempt, self.settings = job_id, attempt, settings

    def record_progress(self, stage: str, fraction: float) -> bool | None:
        try:
            with get_sessionmaker()() as s:
                return jobs_repo.progress(s, self.job_id, self.attempt, stage, fraction, self.settings.job_lease_s)
        except OperationalError:
            return None

    def cancel_requested(self) -> bool:
        try:
            with get_sessionmaker()() as s:
                return jobs_repo.cancel_requested(s, self.job_id)
        except OperationalError:
            return False  # asked again at the next step

    def tenant_model(self, model_id: str) -> StoredModel | None:
        from sqlalchemy import select

        with get_sessionmaker()() as s:
            # Scoped to the job's tenant here too: a spec is only checked at submit time.
            tenant_id = select(Job.tenant_id).where(Job.id == self.job_id).scalar_subquery()
            row = s.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant_id))
            return None if row is None else StoredModel(row.format, row.storage_prefix, [f["name"] for f in row.files])


@dataclass
class JobContext:
    """What a method's handler may use besides the model (worker/context.py ``MethodContext``):
    data, progress, the job's settings. It reaches the job's row only through ``port``."""

    job_id: str
    attempt: int
    settings: Settings
    storage: Storage
    work_dir: Path
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # "train"/"eval" -> row facts
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Set by the pipeline around each step: the fraction range the step's own progress maps into.
    step_span: tuple[float, float] = (0.0, 1.0)
    step_label: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)  # core.jobs.schemas.EvaluationIn
    # The artifact's format (core.exports.OutputIn as a dict); safetensors: the steps' own result.
    output: dict[str, Any] = field(default_factory=lambda: {"format": "safetensors"})
    port: JobPort | None = None  # None: the database's (DbJobPort)
    _samples: dict[str, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.port is None:
            self.port = DbJobPort(self.job_id, self.attempt, self.settings)

    def progress(self, stage: str, fraction: float) -> None:
        if len(stage) > PROGRESS_STAGE_MAX:
            # The column holds 100 characters; a long fused recipe's label is cut, its note kept.
            stage = stage[: PROGRESS_STAGE_MAX - 1] + "…"
        assert self.port is not None
        held = self.port.record_progress(stage, round(fraction, 4))
        if held is None:
            # The database is down: the job goes on (its result is recorded once the database is
            # back, see _record); the heartbeat keeps trying to renew the lease meanwhile.
            log.warning("job %s: progress not recorded (database unreachable)", self.job_id)
            return
        if not held:
            raise LostLease(self.job_id)

    def step_progress(self, note: str, fraction: float) -> None:
        """Progress inside the current step, e.g. ``ctx.step_progress("step 40/200 loss 2.31", 0.2)``."""
        lo, hi = self.step_span
        self.progress(
            f"{self.step_label}: {note}" if note else self.step_label, lo + (hi - lo) * min(max(fraction, 0.0), 1.0)
        )

    def samples(self, which: str = "train") -> list[Sample]:
        """The job's dataset (``train``: ``dataset_id``; ``eval``: ``eval_dataset_id``) as
        ``[{"text": str, "label"?: int | str}]``. Raises JobFailed when the job has none."""
        if which not in self._samples:
            info = self.datasets.get(which)
            if info is None:
                raise JobFailed(
                    "dataset_missing",
                    f"the job has no {'eval_dataset_id' if which == 'eval' else 'dataset_id'} (or it was deleted)",
                )
            from core.datasets.parsing import load_samples

            path = self.work_dir / f"dataset-{which}.{info['format']}"
            _fetch(self.storage, info["storage_key"], path)
            self._samples[which] = load_samples(path, info["format"])  # type: ignore[assignment]
        return self._samples[which]

    def has_samples(self, which: str = "train") -> bool:
        return which in self.datasets

    def load_model(self, model_id: str) -> model_io.LoadedModel:
        """Another uploaded model of the job's tenant (e.g. a distillation student), fetched and
        loaded like the job's own. Raises JobFailed when it is gone or does not load."""
        assert self.port is not None
        found = self.port.tenant_model(model_id)
        if found is None:
            raise JobFailed("model_missing", f"model {model_id} no longer exists (deleted after the job was submitted)")
        dest = self.work_dir / f"model-{model_id}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in found.files:
            _fetch(self.storage, f"{found.storage_prefix}/{name}", dest / name)
        try:
            return model_io.load(dest, found.format)
        except Exception as e:
            raise JobFailed("model_load_failed", f"model {model_id} could not be loaded: {e}") from e

    def cancel_requested(self) -> bool:
        assert self.port is not None
        return self.port.cancel_requested()


def _fetch(storage: Storage, key: str, dest: Path) -> None:
    """A stored file into the job's work dir: a hard link when storage is a local folder on the
    same filesystem (multi-GB weights are read-only inputs, copying them is wasted time), else a
    download."""
    local = storage.local_path(key)
    if local is not None:
        try:
            os.link(local, dest)
            return
        except OSError:
            pass
    storage.get_file(key, dest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _zip_dir(src: Path, dest: Path, level: int) -> None:
    """The HF artifact: weight files stored (floats and packed integers do not deflate; it cost
    more time than any other part of saving for a few percent), text files deflated."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level, allowZip64=True) as zf:
        for p in sorted(src.iterdir()):
            info = zipfile.ZipInfo(p.name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED if p.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with p.open("rb") as fin, zf.open(info, "w", force_zip64=True) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def _versions() -> dict[str, str]:
    import compressed_tensors
    import safetensors

    return {
        "modelpress": core.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "python": platform.python_version(),
    }


def _sparsity(loaded: model_io.LoadedModel, counts: dict[str, int]) -> dict[str, Any]:
    """Zeros in the weights methods act on (``sparsity``, per layer too) and in every parameter
    (``overall``, from ``counts``: evaluate.parameter_counts)."""
    total = zeros = 0
    per_layer = []
    for t in loaded.targets():
        n, z = t.weight.numel(), int((t.weight == 0).sum())
        total += n
        zeros += z
        per_layer.append({"name": t.name, "parameters": n, "zeros": z, "sparsity": round(z / n, 6) if n else 0.0})
    overall = 1 - counts["nonzero"] / counts["total"] if counts["total"] else 0.0
    return {
        "target_parameters": total,
        "target_zeros": zeros,
        "sparsity": zeros / total if total else 0.0,
        "overall": round(overall, 6),
        "per_layer": per_layer,
    }


def _memory_bytes(loaded: model_io.LoadedModel) -> int:
    """Bytes of parameters and buffers of the model as the result loads (a method that stores
    weights differently from how they load, e.g. packed integers, reports its own figure)."""
    if "memory_bytes" in loaded.notes:
        return int(loaded.notes["memory_bytes"])
    if loaded.module is not None and model_io.is_offloaded(loaded.module):
        return sum(t.numel() * t.element_size() for _, t in model_io.unique_tensors(loaded.module))
    if loaded.module is not None:
        seen: set[int] = set()  # tied weights count once
        total = 0
        for t in [*loaded.module.parameters(), *loaded.module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
    return sum(t.numel() * t.element_size() for t in loaded.state.values())


def run_job(job_id: str) -> bool:
    """Claim the job and run the attempt; False when there was nothing to claim (finished,
    canceled, held by another attempt, or given up), e.g. a message the reconciler re-sent."""
    settings = get_settings()
    storage = get_storage()
    try:
        with get_sessionmaker()() as s:
            attempt = jobs_repo.claim(s, job_id, settings.job_lease_s, settings.max_attempts)
            if attempt is None:
                # A poison job (every attempt so far killed its worker) is failed here rather than
                # run again; the CAS in give_up lets one of several workers (or the reconciler) do it.
                gave_up = jobs_repo.give_up(s, job_id, settings.max_attempts)
    except OperationalError as e:
        # Also when the claim's commit reached the database and only its answer was lost: the
        # message then comes back to a job held by that attempt, which the claim refuses, and the
        # attempt's lease expires into the reconciler's reclaim, as for a worker that died.
        raise ClaimUnavailable(str(e).splitlines()[0]) from e
    if attempt is None:
        if gave_up:
            log.error("job %s: failed with too_many_attempts (its worker died %d times)", job_id, settings.max_attempts)
            drop_artifacts(storage, job_id)
        else:
            log.info("job %s: not claimable (finished, canceled or held by another attempt)", job_id)
        return False
    # From here until the attempt's outcome is recorded, its lease is renewed by the keeper
    # process (worker/heartbeat.py), which dies with this process; a thread renews it whenever
    # the keeper is not running.
    keeper = heartbeat.keeper()
    keeper.hold(job_id, attempt, settings.job_lease_s)
    beat_stop = threading.Event()
    heartbeat.renew_from_thread(job_id, attempt, settings.job_lease_s, beat_stop, keeper)
    try:
        _run_attempt(job_id, attempt, settings, storage)
    finally:
        beat_stop.set()
        keeper.release(job_id, attempt)
    return True


def _run_attempt(job_id: str, attempt: int, settings: Settings, storage: Storage) -> None:
    steps, evaluation, datasets, model_info, output = _read_job(job_id)
    # The scratch folder is named after this attempt and this process (worker/sweep.py): a
    # sweeper removes it once the process is gone or the attempt lost the job.
    work = sweep.scratch_dir(settings, job_id, attempt)
    # Earlier attempts of this job died (their claims expired): their scratch folders on this
    # host are garbage (the sweepers of other hosts remove theirs).
    sweep.drop_earlier_scratch(settings, job_id, attempt)
    ctx = JobContext(job_id, attempt, settings, storage, work, datasets, evaluation=evaluation, output=output)
    logs.bind(job_id=job_id, attempt=attempt)  # undone when the task ends (worker/tasks.py)
    log.info("job %s attempt %d: started", job_id, attempt)

    def fail(code: str, message: str) -> None:
        _record(job_id, attempt, "failed", error_code=code, error_message=message, progress_stage="failed")

    watchdog = limits.Watchdog(settings.job_time_limit_s, settings.job_memory_limit_mb * 2**20, fail)
    try:
        watchdog.start()
        try:
            if model_info is None:
                raise JobFailed("model_deleted", "the job's model was deleted before the job ran")
            outcome = _execute(ctx, storage, work, model_info, steps)
        finally:
            watchdog.stop()
    except limits.LimitExceeded as e:
        fail(e.code, watchdog.message or str(e))
        return
    except LostLease:
        log.warning("job %s attempt %d: lost its lease; stopping without writing", job_id, attempt)
        return
    except JobFailed as e:
        fail(e.code, e.message)
        return
    except SoftTimeLimitExceeded:
        fail("time_limit", f"the job ran past its time limit of {settings.job_time_limit_s} s")
        return
    except Exception as e:  # a bug of ours: record it, keep the worker alive
        if isinstance(e, OSError) and _fills_scratch(e, settings):
            # Wherever it happened (fetching the model, a method's own files, an export): the same
            # answer as the stages that check for it themselves (_raise_if_scratch_full).
            log.warning("job %s attempt %d: the scratch disk is full: %s", job_id, attempt, e)
            fail("scratch_full", _scratch_full_message(settings, e))
            return
        log.exception("job %s attempt %d: internal error", job_id, attempt)
        fail("internal_error", f"internal error ({e.__class__.__name__})")
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _record_outcome(job_id, attempt, storage, outcome)


def _read_job(
    job_id: str,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """What the attempt needs of the job's rows, read in one session: its steps, its evaluation
    settings (the defaults filled in), its datasets, its model (None when it was deleted) and
    its output format."""
    from core.jobs.schemas import EvaluationIn

    with get_sessionmaker()() as s:
        job = s.get(Job, job_id)
        model = s.get(Model, job.model_id) if job.model_id else None
        steps = list(job.steps)
        evaluation = EvaluationIn.model_validate(job.evaluation or {}).model_dump()
        output = dict(job.output or {"format": "safetensors"})
        datasets = {}
        for which, ds_id in (("train", job.dataset_id), ("eval", job.eval_dataset_id)):
            ds = s.get(Dataset, ds_id) if ds_id else None
            if ds is not None:
                datasets[which] = {
                    "id": ds.id,
                    "format": ds.format,
                    "storage_key": ds.storage_key,
                    "samples": ds.samples,
                    "labels": ds.labels,
                }
        model_info = (
            None
            if model is None
            else {
                "format": model.format,
                "prefix": model.storage_prefix,
                "files": list(model.files),
                "sha256": model.sha256,
                "size_bytes": model.size_bytes,
                "parameters": model.parameters,
            }
        )
    return steps, evaluation, datasets, model_info, output


def _record_outcome(job_id: str, attempt: int, storage: Storage, outcome: tuple[str, dict[str, Any]] | None) -> None:
    """Record a finished attempt: canceled (``outcome`` None) or succeeded with its artifact."""
    if outcome is None:
        _record(job_id, attempt, "canceled", progress_stage="canceled")
        return
    key, values = outcome
    if not _record(job_id, attempt, "succeeded", progress_stage="done", progress_fraction=1.0, **values):
        # Another attempt owns the job now; our artifact was never referenced.
        storage.delete(key)
        return
    # An earlier attempt killed after storing its artifact (or half of it) left it unreferenced:
    # a job keeps exactly one artifact.
    for k in range(1, attempt):
        storage.delete_prefix(f"artifacts/{job_id}/attempt-{k}")


def _record(job_id: str, attempt: int, status: str, **values: Any) -> bool:
    """The attempt's outcome, fenced. A database outage does not lose a finished job's result:
    the write is retried until the database is back (the attempt's lease may expire meanwhile,
    and then the write is refused, as it must be: another attempt owns the job)."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            with get_sessionmaker()() as s:
                ok = jobs_repo.finish(s, job_id, attempt, status, **values)
            break
        except OperationalError:
            if waited > 3600:
                raise
            log.warning(
                "job %s attempt %d: database unreachable; retrying the %s record in %.1f s",
                job_id,
                attempt,
                status,
                delay,
            )
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)
    log.info("job %s attempt %d: %s%s", job_id, attempt, status, "" if ok else " (fenced off: not recorded)")
    return ok


def _eval_texts(ctx: JobContext) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The job's eval dataset, or the built-in English corpus when it has none."""
    if ctx.has_samples("eval"):
        return ctx.samples("eval"), {"source": "eval_dataset", "id": ctx.datasets["eval"]["id"]}
    lines = evaluate.BUILTIN_CORPUS.read_text(encoding="utf-8").splitlines()
    return [{"text": t} for t in lines if t.strip()], {
        "source": "builtin",
        "id": None,
        "name": "modelpress built-in English corpus",
    }


def _span_progress(ctx: JobContext, lo: float, hi: float) -> Callable[..., None]:
    def report(note: str, fraction: float | None = None) -> None:
        ctx.progress(note, lo if fraction is None else lo + (hi - lo) * min(max(fraction, 0.0), 1.0))

    return report


class _Canceled(Exception):
    """The job was canceled between two stages: :func:`_execute` returns None."""


def _stop_if_canceled(ctx: JobContext) -> None:
    if ctx.cancel_requested():
        raise _Canceled


def _evaluation_off() -> dict[str, Any]:
    """The report's speed, quality and fidelity sections of a job that turned evaluation off (a
    fresh dict per job: the metrics are the job's own)."""
    off = {"available": False, "reason": "evaluation was turned off for this job (evaluation.enabled false)"}
    return {"speed": off, "quality": off, "fidelity": off}


def _execute(ctx: JobContext, storage: Storage, work: Path, model_info: dict[str, Any], steps: list[dict[str, Any]]):
    """Run the job; return (artifact key, row values), or None when canceled."""
    t_start = time.perf_counter()
    peak = memory.PeakMemory()
    try:
        src = _fetch_model(ctx, storage, work, model_info)
        streamed = _stream_steps(steps)
        if streamed is not None and ctx.settings.stream_engine:
            try:
                return _execute_stream(ctx, storage, work, src, model_info, steps, streamed, t_start, peak)
            except stream.NotStreamable as e:
                # Decided before anything is written: the in-memory path runs the same steps.
                log.info("job %s: in-memory path (%s)", ctx.job_id, e)
                ctx.stage_seconds.pop("stream", None)
        return _execute_in_memory(ctx, storage, work, src, model_info, steps, t_start, peak)
    except _Canceled:
        return None


def _fetch_model(ctx: JobContext, storage: Storage, work: Path, model_info: dict[str, Any]) -> Path:
    """The model's files from storage into ``work/in``."""
    src = work / "in"
    src.mkdir(parents=True, exist_ok=True)
    ctx.progress("loading", 0.02)
    t0 = time.perf_counter()
    for f in model_info["files"]:
        _fetch(storage, f"{model_info['prefix']}/{f['name']}", src / f["name"])
    ctx.stage_seconds["fetch"] = time.perf_counter() - t0
    return src


def _execute_in_memory(
    ctx: JobContext,
    storage: Storage,
    work: Path,
    src: Path,
    model_info: dict[str, Any],
    steps: list[dict[str, Any]],
    t_start: float,
    peak: memory.PeakMemory,
):
    """The in-memory path: the model loaded whole (or block by block, its weights on disk), the
    steps' handlers run on it one after the other, then it is saved, evaluated and stored."""
    fmt = model_info["format"]
    original_weight_bytes = evaluate.tensor_bytes(src)
    blocks = _block_steps(fmt, steps, ctx.settings)
    # An export is measured in its runtime (the export stage), not as safetensors here.
    enabled = ctx.evaluation.get("enabled", True) and not exporting.wanted(ctx.output)
    # Too large to hold whole twice: evaluated after saving, both models with their weights on
    # disk, side by side (Evaluator.measure_side_by_side).
    streamed_eval = bool(blocks and enabled and not _fits_twice(original_weight_bytes, ctx.settings))
    # The evaluator reports (note, fraction of its own stage done); each stage maps it into its span.
    evaluator = evaluate.Evaluator(ctx.evaluation, src, lambda: _eval_texts(ctx), _span_progress(ctx, 0.02, 0.05))
    evaluator.compressed_cost = _compressed_cost(steps)
    loaded = _load_measured(ctx, evaluator, src, fmt, work, blocks, measure=enabled and not streamed_eval)
    step_metrics = _run_steps(ctx, loaded, steps)
    _stop_if_canceled(ctx)

    # Measured before saving: a saver may replace weights by their packed form.
    # One pass over every parameter: counting non-zeros of a 7B model twice is seconds of work.
    params = evaluate.parameter_counts(loaded.module, loaded.state)
    sparsity = _sparsity(loaded, params)
    memory_bytes = _memory_bytes(loaded)
    out = work / "out"
    _save(ctx, loaded, out, _manifest(steps, model_info), blocks)
    artifact_weight_bytes = evaluate.tensor_bytes(out)
    notes = loaded.notes
    # The pipeline is done with the in-memory model: free it before the artifact loads.
    del loaded
    sections = _evaluate_saved(ctx, evaluator, src, fmt, out, work, enabled, streamed_eval)
    t0 = time.perf_counter()
    filename, artifact = _package(ctx, out, work, fmt)
    filename, artifact, export, measured = _export(ctx, filename, artifact, fmt, src, work, steps)
    size, sha = artifact.stat().st_size, _sha256(artifact)
    key = _store(ctx, storage, artifact, filename, t0, t_start)
    metrics = {
        "size": _size_metrics(model_info, size, original_weight_bytes, artifact_weight_bytes, memory_bytes, params),
        **_export_sections(export),
        "notes": notes,
        "sparsity": sparsity,
        **sections,
        **measured,
        "memory": peak.result(),
        "engine": dict(_ENGINE_BLOCKS if blocks else _ENGINE_WHOLE),
        "steps": step_metrics,
        "stage_seconds": {k: round(v, 4) for k, v in ctx.stage_seconds.items()},
        "evaluation": ctx.evaluation,
    }
    return key, _row_values(key, filename, size, sha, metrics)


_ENGINE_BLOCKS = {
    "path": "blocks",
    "note": "weights stayed on disk; llm-compressor's sequential pipeline onloaded one decoder block at a time",
}
_ENGINE_WHOLE = {"path": "whole", "note": "the model was built in memory (a step has no streaming or block form)"}


def _evaluate_saved(
    ctx: JobContext,
    evaluator: evaluate.Evaluator,
    src: Path,
    fmt: str,
    out: Path,
    work: Path,
    enabled: bool,
    side_by_side: bool,
) -> dict[str, Any]:
    """The report's speed, quality and fidelity sections of the in-memory path, once the result is
    saved in ``out``: the original was measured before the steps, or both are measured now side by
    side with their weights on disk."""
    if not enabled:
        return _evaluation_off()
    _stop_if_canceled(ctx)
    if side_by_side:
        return _evaluate_streamed(ctx, evaluator, src, fmt, out, work, (0.88, 0.96))
    t0 = time.perf_counter()
    evaluator.on_progress = _span_progress(ctx, 0.88, 0.96)
    evaluator.measure_compressed(out)
    ctx.stage_seconds["evaluate_compressed"] = time.perf_counter() - t0
    return evaluator.sections()


def _load_measured(
    ctx: JobContext,
    evaluator: evaluate.Evaluator,
    src: Path,
    fmt: str,
    work: Path,
    blocks: bool,
    measure: bool,
) -> model_io.LoadedModel:
    """The model the steps run on, and the evaluator's measurement of the original before any
    step (``measure``; the side-by-side evaluation measures it after saving instead)."""
    if blocks and measure:
        # The steps will see the weights on disk; the original is measured whole, then freed.
        t0 = time.perf_counter()
        evaluator.measure_original(_load(src, fmt).module)
        ctx.stage_seconds["evaluate_original"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = _load(src, fmt, work / "offload" if blocks else None)
    ctx.stage_seconds["load"] = time.perf_counter() - t0
    if measure and not blocks:
        # Before any step: methods change the module in place.
        t0 = time.perf_counter()
        evaluator.measure_original(loaded.module)
        ctx.stage_seconds["evaluate_original"] = time.perf_counter() - t0
    return loaded


def _run_steps(ctx: JobContext, loaded: model_io.LoadedModel, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every step's handler on the loaded model, in order; each step's metrics. A handler's error
    fails the job as ``method_failed`` (the pipeline's own exceptions pass through)."""
    step_metrics = []
    n = len(steps)
    for i, step in enumerate(steps):
        _stop_if_canceled(ctx)
        spec = methods.get(step["method"])
        if spec is None:
            raise JobFailed("unknown_method", f"method {step['method']!r} is not installed on this worker")
        params = spec.params.model_validate(step["params"])
        ctx.step_label = f"step {i + 1}/{n}: {spec.name}"
        ctx.step_span = (0.05 + 0.8 * i / n, 0.05 + 0.8 * (i + 1) / n)
        ctx.progress(ctx.step_label, ctx.step_span[0])
        t0 = time.perf_counter()
        try:
            result = spec.handler(loaded, params, ctx)
        except (LostLease, JobFailed, SoftTimeLimitExceeded):
            raise
        except Exception as e:
            raise JobFailed("method_failed", f"step {i + 1} ({spec.name}) failed: {e}") from e
        secs = time.perf_counter() - t0
        ctx.stage_seconds[f"step{i + 1}:{spec.name}"] = secs
        step_metrics.append(
            {"method": spec.name, "params": step["params"], "seconds": round(secs, 4), **(result or {})}
        )
    return step_metrics


def _manifest(steps: list[dict[str, Any]], model_info: dict[str, Any]) -> dict[str, Any]:
    """modelpress.json of the artifact: the steps, the input and the libraries' versions."""
    return {
        "modelpress_manifest": 1,
        "steps": steps,
        "input": {"sha256": model_info["sha256"], "format": model_info["format"]},
        "versions": _versions(),
    }


def _save(ctx: JobContext, loaded: model_io.LoadedModel, out: Path, manifest: dict[str, Any], blocks: bool) -> None:
    ctx.progress("saving", 0.87)
    t0 = time.perf_counter()
    # The block path's fallback save (save_pretrained) holds one output shard in memory: that must
    # stay near a block's size, not the model's.
    shard = min(ctx.settings.shard_max_bytes, BLOCK_SAVE_SHARD_BYTES) if blocks else ctx.settings.shard_max_bytes
    model_io.save(loaded, out, manifest, max_shard_size=shard)
    ctx.stage_seconds["save"] = time.perf_counter() - t0


def _package(ctx: JobContext, out: Path, work: Path, fmt: str) -> tuple[str, Path]:
    """(filename, path) of the artifact: the saved folder zipped (HF), or its one safetensors file."""
    if fmt == "hf":
        filename = "model.zip"
        artifact = work / filename
        _zip_dir(out, artifact, ctx.settings.artifact_zip_level)
        return filename, artifact
    filename = "model.safetensors"
    return filename, out / filename


def _export(
    ctx: JobContext, filename: str, artifact: Path, fmt: str, src: Path, work: Path, steps: list[dict[str, Any]]
) -> tuple[str, Path, dict[str, Any] | None, dict[str, Any]]:
    """The job's output format (worker/exporting.py): (filename, artifact, the report's export
    section, the speed/quality/fidelity sections measured in the export's runtime); the steps'
    own artifact unchanged (no sections) for safetensors."""
    if not exporting.wanted(ctx.output):
        return filename, artifact, None, {}
    _stop_if_canceled(ctx)
    fmt_name = ctx.output["format"]
    ctx.progress(f"exporting ({fmt_name})", 0.9)
    t0 = time.perf_counter()
    static = ctx.output.get("quantize") == "int8_static" and ctx.has_samples("train")
    texts = [s["text"] for s in ctx.samples("train")] if static else None
    measured: dict[str, Any] = {}

    def measure(exported: Path, export: dict[str, Any]) -> dict[str, Any]:
        ctx.stage_seconds["export"] = time.perf_counter() - t0
        return _measure_export(ctx, src, exported, export, work, steps)

    try:
        new, section, measured_sections = exporting.export_artifact(
            artifact, fmt, work, ctx.output, steps, texts, measure if ctx.evaluation.get("enabled", True) else None
        )
        measured = measured_sections or {}
    except exporting.ExportFailed as e:
        raise JobFailed("export_failed", f"the {fmt_name} export failed: {e}") from e
    except OSError as e:
        _raise_if_scratch_full(ctx, e)
        raise
    final = work / "model.zip"
    new.replace(final)
    ctx.stage_seconds.setdefault("export", time.perf_counter() - t0)
    return final.name, final, section, measured


def _measure_export(
    ctx: JobContext, src: Path, exported: Path, export: dict[str, Any], work: Path, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    """Speed, quality and fidelity of the export in its runtime, the original exported to the same
    runtime beside it; unavailable (with the reason) where this worker lacks the runtime."""
    _stop_if_canceled(ctx)
    missing = exporting.runtime_missing(ctx.output)
    if missing is not None and ctx.output["format"] != "gguf":
        off = {"available": False, "reason": missing}
        return {"speed": off, "quality": off, "fidelity": off}
    t0 = time.perf_counter()
    evaluator = evaluate.Evaluator(ctx.evaluation, src, lambda: _eval_texts(ctx), _span_progress(ctx, 0.9, 0.96))
    evaluator.compressed_cost = 1.0  # both run in the same runtime, each with its own kernels
    try:
        if missing is not None:  # GGUF without llama.cpp: its weights' quality, through transformers
            return exporting.measure_gguf_weights(evaluator, src, exported, export)
        return exporting.measure_in_runtime(evaluator, ctx.output, src, exported, export, work)
    except exporting.ExportFailed:
        raise
    except Exception as e:  # the artifact stands; only its measurement failed, which the report says
        log.exception("job %s: measuring the export in its runtime", ctx.job_id)
        off = {"available": False, "reason": f"the runtime failed: {e.__class__.__name__}: {str(e)[:300]}"}
        return {"speed": off, "quality": off, "fidelity": off}
    finally:
        ctx.stage_seconds["evaluate_export"] = time.perf_counter() - t0


def _fills_scratch(e: OSError, settings: Settings) -> bool:
    """``e`` is "no space left" on the scratch disk: a write to a path under it failed, or (no
    path in the error) the scratch disk has less than 1 MiB free."""
    if e.errno != errno.ENOSPC:
        return False
    paths = [Path(str(p)) for p in (e.filename, e.filename2) if p]
    if paths:
        root = settings.tmp_root.resolve()
        return any(p.resolve().is_relative_to(root) for p in paths)
    try:
        return shutil.disk_usage(settings.tmp_root).free < 2**20
    except OSError:
        return False


def _scratch_full_message(settings: Settings, e: OSError) -> str:
    return f"the worker's scratch disk ({settings.tmp_dir}) is full: {e.strerror}"


def _raise_if_scratch_full(ctx: JobContext, e: OSError) -> None:
    """A full scratch disk is the job's ``scratch_full`` (its scratch goes with the attempt)."""
    if e.errno == errno.ENOSPC:
        raise JobFailed("scratch_full", _scratch_full_message(ctx.settings, e)) from e


def _export_sections(export: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``export`` section, and a note that the other sections measured the steps'
    safetensors result the export was converted from."""
    if export is None:
        return {}
    return {"export": export}


def _store(ctx: JobContext, storage: Storage, artifact: Path, filename: str, t0: float, t_start: float) -> str:
    """Move the artifact into storage under this attempt's key; the key. ``t0`` starts the
    "store" stage, ``t_start`` the job."""
    key = f"artifacts/{ctx.job_id}/attempt-{ctx.attempt}/{filename}"
    ctx.progress("storing", 0.97)
    storage.put_file(artifact, key, move=True)
    ctx.stage_seconds["store"] = time.perf_counter() - t0
    ctx.stage_seconds["total"] = time.perf_counter() - t_start
    return key


def _size_metrics(
    model_info: dict[str, Any],
    size: int,
    weight_bytes_in: int,
    weight_bytes_out: int,
    memory_bytes: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The report's size section, the same for every path."""
    return {
        "original_bytes": model_info["size_bytes"],
        "artifact_bytes": size,
        "compression_ratio": round(model_info["size_bytes"] / size, 4) if size else None,
        # Tensor data alone (safetensors headers, config and tokenizer files excluded).
        "original_weight_bytes": weight_bytes_in,
        "artifact_weight_bytes": weight_bytes_out,
        "weight_bytes_ratio": round(weight_bytes_out / weight_bytes_in, 6) if weight_bytes_in else None,
        # Bytes the result takes in memory once loaded, next to the bytes stored above.
        "memory_bytes": memory_bytes,
        "parameters": {"original": model_info["parameters"], **params},
        "mean_bits_per_weight": round(8 * weight_bytes_out / params["total"], 4) if params["total"] else None,
    }


def _row_values(key: str, filename: str, size: int, sha: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The job row's columns of a succeeded attempt."""
    return {
        "artifact_key": key,
        "artifact_filename": filename,
        "artifact_size_bytes": size,
        "artifact_sha256": sha,
        "metrics": metrics,
    }


def _load(src: Path, fmt: str, offload_dir: Path | None = None) -> model_io.LoadedModel:
    try:
        return model_io.load(src, fmt, offload_dir)
    except Exception as e:
        raise JobFailed("model_load_failed", f"the model could not be loaded: {e}") from e


def _block_steps(fmt: str, steps: list[dict[str, Any]], settings: Settings) -> bool:
    """Every step runs block by block through llm-compressor (MethodSpec.blocks): the weights
    stay on disk and one decoder block is onloaded at a time."""
    specs = [methods.get(s["method"]) for s in steps]
    return settings.block_engine and fmt == "hf" and all(s is not None and s.blocks for s in specs)


def _stream_steps(steps: list[dict[str, Any]]) -> list[tuple[Any, Any]] | None:
    """(spec, params) of every step when each has a streaming form, else None."""
    out = []
    for step in steps:
        spec = methods.get(step["method"])
        if spec is None or spec.stream is None:
            return None
        out.append((spec, spec.params.model_validate(step["params"])))
    return out


def _fits_twice(weight_bytes: int, settings: Settings) -> bool:
    """Can evaluation hold the original and then the compressed model whole? Else both run with
    their weights on disk (_evaluate_streamed). The job's memory is the least of the machine's
    available memory, the watchdog's limit and this worker's declared budget (less its own
    baseline): the plan (core/jobs/plan.evaluation_mode) makes the same choice from the budget."""
    from core.jobs import plan as planner

    avail = memory.available_bytes()
    if settings.job_memory_limit_mb:
        avail = min(avail, settings.job_memory_limit_mb * 2**20)
    if settings.worker_memory_budget_mb:
        avail = min(avail, settings.worker_memory_budget_mb * 2**20 - planner.BASELINE_BYTES)
    # Loaded weights plus activations and the evaluator's copies: measured ~2.5x the weights.
    return planner.EVAL_WHOLE_HOLD * weight_bytes < avail


def _compressed_cost(steps: list[dict[str, Any]]) -> float:
    """How dear the result's forward pass is against the original's, for the evaluator's counts:
    a quantized artifact re-quantizes its weights on every pass in transformers."""
    from core.jobs import plan as planner

    return evaluate.QUANTIZED_FORWARD_COST if planner.quantizes(steps) else 1.0


def _evaluate_streamed(
    ctx: JobContext,
    evaluator: evaluate.Evaluator,
    src: Path,
    fmt: str,
    out: Path,
    work: Path,
    span: tuple[float, float],
) -> dict[str, Any]:
    """The report's measurements of a model too large to hold twice: the original and the
    artifact in ``out`` both loaded with their weights on disk, every text through one then the
    other (one module onloaded at a time). Their offload folders are removed afterwards."""
    t0 = time.perf_counter()
    evaluator.on_progress = _span_progress(ctx, *span)
    original_dir, artifact_dir = work / "eval-offload-original", work / "eval-offload-artifact"
    try:
        # A bare state dict has no architecture to run (the evaluator says so): nothing to load.
        original = _load(src, fmt, original_dir) if fmt == "hf" else None
        evaluator.measure_side_by_side(original.module if original else None, out, artifact_dir)
        del original
    finally:
        shutil.rmtree(original_dir, ignore_errors=True)
        shutil.rmtree(artifact_dir, ignore_errors=True)
    ctx.stage_seconds["evaluate_streamed"] = time.perf_counter() - t0
    return evaluator.sections()


def _unpack_artifact(artifact: Path, fmt: str, out: Path) -> Path:
    """The streamed artifact as a model folder for evaluation: the zip unpacked (HF), or the single
    safetensors file linked in (a bare state dict)."""
    if fmt == "hf":
        with zipfile.ZipFile(artifact) as zf:
            zf.extractall(out)
    else:
        out.mkdir()
        os.link(artifact, out / artifact.name)
    return out


def _execute_stream(
    ctx: JobContext,
    storage: Storage,
    work: Path,
    src: Path,
    model_info: dict[str, Any],
    steps: list[dict[str, Any]],
    streamed: list[tuple[Any, Any]],
    t_start: float,
    peak: memory.PeakMemory,
):
    """The streaming path (worker/stream): every step is data-free, so the checkpoint goes
    tensor by tensor from the input shards through all steps into the artifact, written once.
    Raises stream.NotStreamable before anything is written when the model does not allow it."""
    fmt = model_info["format"]
    n = len(steps)
    names = ", ".join(spec.name for spec, _ in streamed)
    ctx.step_label = f"steps 1-{n} fused" if n > 1 else f"step 1/1: {names}" if n else "copying the tensors"
    ctx.step_span = (0.05, 0.85)
    ctx.progress(ctx.step_label, 0.05)
    filename = "model.zip" if fmt == "hf" else "model.safetensors"
    artifact = work / filename
    t0 = time.perf_counter()
    result, size, sha = _stream_to(ctx, artifact, src, fmt, streamed, _manifest(steps, model_info), work, names)
    secs = time.perf_counter() - t0
    ctx.stage_seconds["stream"] = secs
    step_metrics = [
        # The steps ran fused, in one pass: the pass's time is theirs together.
        {"method": spec.name, "params": step["params"], "seconds": None, "fused_seconds": round(secs, 4), **(m or {})}
        for (spec, _), step, m in zip(streamed, steps, result.step_metrics, strict=True)
    ]
    sections = _evaluate_stream_artifact(ctx, src, fmt, artifact, work, steps, result.weight_bytes_in)
    filename, exported, export, measured = _export(ctx, filename, artifact, fmt, src, work, steps)
    if export is not None:
        artifact, size, sha = exported, exported.stat().st_size, _sha256(exported)
        sections = {**sections, **measured}

    key = _store(ctx, storage, artifact, filename, time.perf_counter(), t_start)
    metrics = {
        "size": _size_metrics(
            model_info, size, result.weight_bytes_in, result.weight_bytes_out, result.memory_bytes, result.parameters
        ),
        **_export_sections(export),
        "notes": result.notes,
        "sparsity": result.sparsity,
        **sections,
        "memory": peak.result(),
        "engine": {
            "path": "stream",
            "note": "tensor by tensor from the input shards, every step fused in one pass; the model was never "
            "built in memory",
        },
        "steps": step_metrics,
        "stage_seconds": {k: round(v, 4) for k, v in ctx.stage_seconds.items()},
        "evaluation": ctx.evaluation,
    }
    return key, _row_values(key, filename, size, sha, metrics)


def _stream_to(
    ctx: JobContext,
    artifact: Path,
    src: Path,
    fmt: str,
    streamed: list[tuple[Any, Any]],
    manifest: dict[str, Any],
    work: Path,
    names: str,
) -> tuple[Any, int, str]:
    """One pass of the streaming engine into ``artifact`` (a zip for HF, else one safetensors
    file); (the engine's result, size, sha256). A half-written artifact is removed, whatever
    stops the pass; a cancel raises _Canceled. The engine's errors become the job's codes."""
    from worker.sinks import FileSink, ZipSink

    sink = ZipSink(artifact) if fmt == "hf" else FileSink(artifact)
    extra = [
        p
        for p in src.iterdir()
        if p.is_file() and not any(fnmatch.fnmatch(p.name, pat) for pat in model_io.WEIGHT_FILE_PATTERNS)
    ]
    try:
        try:
            result = stream.run_passes(
                src,
                fmt,
                [spec.stream(params, ctx) for spec, params in streamed],
                sink,
                scratch=work,
                extra_files=extra if fmt == "hf" else [],
                manifest=manifest,
                shard_bytes=ctx.settings.shard_max_bytes,
                progress=ctx.step_progress,
                canceled=ctx.cancel_requested,
            )
        except (LostLease, JobFailed, SoftTimeLimitExceeded, stream.NotStreamable):
            raise
        except stream.ShardError as e:
            raise JobFailed("model_load_failed", f"the model's weights could not be read: {e}") from e
        except OSError as e:
            _raise_if_scratch_full(ctx, e)
            raise
        except ValueError as e:
            raise JobFailed("method_failed", f"{names} failed: {e}") from e
        if result is None:
            sink.abort()
            raise _Canceled
        size, sha = sink.close()
    except _Canceled:
        raise
    except BaseException:
        sink.abort()
        raise
    return result, size, sha


def _evaluate_stream_artifact(
    ctx: JobContext, src: Path, fmt: str, artifact: Path, work: Path, steps: list[dict[str, Any]], weight_bytes_in: int
) -> dict[str, Any]:
    """The report's speed, quality and fidelity sections of a streamed job: the original and the
    artifact side by side with their weights on disk when both do not fit in memory, else one
    after the other, whole."""
    enabled = ctx.evaluation.get("enabled", True)
    if not enabled:
        return _evaluation_off()
    if exporting.wanted(ctx.output):
        return {}  # measured in the export's runtime by the export stage
    _stop_if_canceled(ctx)
    if not _fits_twice(weight_bytes_in, ctx.settings):
        evaluator = evaluate.Evaluator(ctx.evaluation, src, lambda: _eval_texts(ctx))
        evaluator.compressed_cost = _compressed_cost(steps)
        out = _unpack_artifact(artifact, fmt, work / "out")
        try:
            return _evaluate_streamed(ctx, evaluator, src, fmt, out, work, (0.85, 0.96))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    evaluator = evaluate.Evaluator(ctx.evaluation, src, lambda: _eval_texts(ctx), _span_progress(ctx, 0.85, 0.9))
    evaluator.compressed_cost = _compressed_cost(steps)
    t0 = time.perf_counter()
    if fmt == "hf":
        try:
            original = model_io.load(src, fmt)
        except Exception as e:
            raise JobFailed("model_load_failed", f"the model could not be loaded for evaluation: {e}") from e
        evaluator.measure_original(original.module)
        del original
    else:
        # A bare state dict has no architecture to run (the report says so): loading its
        # tensors would only cost memory (the plan counts none, core/jobs/plan.evaluation_mode).
        evaluator.measure_original(None)
    ctx.stage_seconds["evaluate_original"] = time.perf_counter() - t0
    _stop_if_canceled(ctx)
    t0 = time.perf_counter()
    out = _unpack_artifact(artifact, fmt, work / "out")
    evaluator.on_progress = _span_progress(ctx, 0.9, 0.96)
    evaluator.measure_compressed(out)
    shutil.rmtree(out, ignore_errors=True)
    ctx.stage_seconds["evaluate_compressed"] = time.perf_counter() - t0
    return evaluator.sections()
