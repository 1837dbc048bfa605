"""The streaming engine: data-free methods run tensor by tensor from the checkpoint's shards,
without ever building the model (the way llm-compressor's ``model_free_ptq`` works, but row chunk
by row chunk, so memory does not grow with the shard or tensor size either).

A job takes this path when every step's method has a streaming form (``worker.methods.Method.stream``):
``stream(params, ctx) -> StreamStep``. The engine

1. reads the safetensors headers (validated, worker/shards.py) and, for an HF model,
   builds the model's skeleton on the ``meta`` device: no weights, but the same module tree, so
   the methods' targets (every Linear/Conv1D weight but embeddings and the LM head) are exactly
   those of the in-memory path (``LoadedModel.targets``);
2. lets each step make its pre-passes (global magnitude pruning finds its exact threshold here,
   in a pass that reads the targets once);
3. plans every output tensor (name, dtype, shape) so the output's headers are known up front;
4. streams: each tensor is read once (a view of the memory-mapped shard), goes through every
   step in row chunks of ~32 MB, and is written once, in order, to one sequential sink (the
   artifact's zip entries or a bare safetensors file). Tensors no step selects are copied byte
   for byte; tied tensors are stored once, as in the input.

Steps see row chunks and must not modify their input in place (it may be the read-only map).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker import model_io
from worker.model_io import DEFAULT_SHARD_BYTES
from worker.shards import (
    Shard,
    ShardError,
    ShardReader,
    TensorSpec,
    index_json,
    layout,
    tensor_bytes,
)

__all__ = ["NotStreamable", "ShardError", "StreamStep", "TensorSpec", "Source", "run"]

CHUNK_BYTES = 32 << 20  # float32 bytes of one row chunk: bounds each step's temporaries
# Tensors that compressed-tensors attaches (scales...): storage overhead, not parameters.
QUANT_SUFFIXES = ("_scale", "_zero_point", "_g_idx", "_global_scale", "weight_shape")


class _Canceled(Exception):
    """The job was canceled during a pre-pass."""


class NotStreamable(Exception):
    """This model cannot take the streaming path (the pipeline then builds it in memory)."""


@dataclass
class Target:
    """A weight the methods act on, as the in-memory path would see it."""

    name: str
    row_dim: int  # 0 nn.Linear, 1 GPT-2 Conv1D
    module_type: str  # "Linear" | "Conv1D" | "" (bare state dict)


class StreamStep:
    """A method's streaming form. Subclasses override what they need."""

    final = False  # leaves packed weights: the last step

    def select(self, spec: TensorSpec, target: Target | None) -> bool:
        """Does this step change this tensor? (Default: the methods' targets.)"""
        return target is not None

    def out_dtype(self, spec: TensorSpec) -> torch.dtype:
        return spec.dtype

    def out_shape(self, spec: TensorSpec, target: Target | None) -> tuple[int, ...]:
        """The shape of what ``rows`` makes of a selected tensor, all chunks together (a step that
        drops rows or columns, such as structured pruning, makes it smaller; a final step's
        packed outputs are its ``out_specs``, this stays the shape they unpack to)."""
        return spec.shape

    def out_specs(self, spec: TensorSpec, target: Target | None) -> list[TensorSpec]:
        """Output tensors of a final step for one input tensor: the row-streamed one first, then
        those ``end`` returns, in that order."""
        return [TensorSpec(spec.name, self.out_dtype(spec), self.out_shape(spec, target))]

    def bind(self, skeleton: Any, targets: dict[str, Target]) -> None:
        """Called once before any ``select``: the model's skeleton on the meta device (None for a
        bare state dict) and its targets, for a step whose selection and output shapes follow the
        model's structure (structured pruning selects the biases of the layers it shrinks)."""

    def prepare(self, source: Source) -> None:
        """A pass over every selected tensor before anything is written (e.g. a global threshold)."""

    def whole_tensor(self, spec: TensorSpec, target: Target | None) -> bool:
        """True when ``rows`` must see the whole tensor at once."""
        return False

    def start(self, spec: TensorSpec, target: Target | None, whole: Callable[[], torch.Tensor]) -> None:
        """Before a tensor's chunks; ``whole()`` gives the tensor as it enters this step."""

    # A step whose pre-pass must see every target as earlier steps leave it (global pruning): the
    # engine starts a new pass at such a step rather than recomputing earlier steps in the pre-pass.
    needs_prepass = False
    # A final step that counts the non-zeros of the rows it is given (``input_nonzero``, set by
    # each ``rows`` call), so the engine does not read them once more to count them.
    counts_input = False
    input_nonzero = 0
    # A last, non-final step that knows the non-zeros of what its ``rows`` returned sets this
    # (else None), so the engine does not read the rows once more to count them.
    output_nonzero: int | None = None

    def rows(
        self, spec: TensorSpec, target: Target | None, x: torch.Tensor, r0: int, record: bool = True
    ) -> torch.Tensor:
        """Rows ``r0:r0+len(x)`` of the tensor, transformed (a new tensor; ``x`` stays as it is).
        ``record`` false: a look ahead for a later step (whole tensor), not counted in metrics."""
        raise NotImplementedError

    def end(self, spec: TensorSpec, target: Target | None) -> dict[str, torch.Tensor]:
        """Outputs after a tensor's row-streamed one (final steps: scales, shapes)."""
        return {}

    def metrics(self) -> dict[str, Any]:
        return {}

    def update_config(self, config: dict[str, Any]) -> None:
        """Changes to config.json (HF models)."""

    notes: dict[str, Any] = {}


class Source(Sequence[torch.Tensor]):
    """The tensors a step selects, as they enter it (earlier steps applied), one at a time. A
    Sequence so that the in-memory path's tensor math (worker/ops) takes it unchanged: iterating
    yields one tensor, which is dropped before the next."""

    def __init__(self, engine: _Engine, index: int) -> None:
        self._engine = engine
        self._index = index
        self.skeleton = engine.skeleton  # the HF model on the meta device (None for a bare state dict)
        self.names = [n for n in engine.order if engine.chain(n, index)[-1:] == [index]]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self._engine.entering(self.names[i], self._index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for k, n in enumerate(self.names):
            if self._engine.canceled is not None and self._engine.canceled():
                raise _Canceled
            if k + 1 < len(self.names):
                # Read ahead: page faults on pages not yet read cost ~3x the disk time.
                self._engine.reader.prefetch(self.names[k + 1])
            yield self._engine.entering(n, self._index)
            self._engine.reader.done_with(n)

    def spec(self, i: int) -> TensorSpec:
        return self._engine.spec_entering(self.names[i], self._index)

    def target(self, i: int) -> Target | None:
        return self._engine.targets.get(self.names[i])

    def subset(self, indices: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(i, tensor)`` for these indices only, in the order given, one at a time as iterating
        gives them (cancel checks, the next one read ahead, pages released): for a pre-pass that
        needs some of the tensors its step selects (structured pruning scores ``v_proj`` and
        ``o_proj`` but shrinks ``q_proj`` and ``k_proj`` too, which it need not read first)."""
        for k, i in enumerate(indices):
            if self._engine.canceled is not None and self._engine.canceled():
                raise _Canceled
            if k + 1 < len(indices):
                self._engine.reader.prefetch(self.names[indices[k + 1]])
            yield i, self._engine.entering(self.names[i], self._index)
            self._engine.reader.done_with(self.names[i])


class Sink:
    """Where output files go, one after the other, each written sequentially."""

    def open(self, name: str, size: int, weights: bool) -> Any:  # -> a writable with write()/close()
        raise NotImplementedError


@dataclass
class Result:
    step_metrics: list[dict[str, Any]]
    parameters: dict[str, int]  # total, nonzero (quantization scales excluded)
    sparsity: dict[str, Any]
    memory_bytes: int
    weight_bytes_in: int
    weight_bytes_out: int
    notes: dict[str, Any] = field(default_factory=dict)


class _Engine:
    def __init__(self, reader: ShardReader, targets: dict[str, Target], steps: list[StreamStep]) -> None:
        self.reader = reader
        self.targets = targets
        self.steps = steps
        self.order = reader.names()
        self.skeleton: Any = None
        self.canceled: Callable[[], bool] | None = None
        self._chains: dict[str, list[int]] = {}
        self._specs: dict[tuple[str, int], TensorSpec] = {}

    def spec_entering(self, name: str, index: int) -> TensorSpec:
        """The tensor's spec as it enters step ``index`` (after the steps before it)."""
        key = (name, index)
        if key not in self._specs:
            spec = self.reader.spec(name)
            for i in range(index):
                if self.steps[i].select(spec, self.targets.get(name)):
                    spec = TensorSpec(
                        spec.name, self.steps[i].out_dtype(spec), self.steps[i].out_shape(spec, self.targets.get(name))
                    )
            self._specs[key] = spec
        return self._specs[key]

    def chain(self, name: str, upto: int | None = None) -> list[int]:
        """Indices of the steps that select this tensor (up to and including ``upto``)."""
        if name not in self._chains:
            out = []
            for i, s in enumerate(self.steps):
                if s.select(self.spec_entering(name, i), self.targets.get(name)):
                    out.append(i)
            self._chains[name] = out
        c = self._chains[name]
        return c if upto is None else [i for i in c if i <= upto]

    def entering(self, name: str, index: int) -> torch.Tensor:
        """The whole tensor as it enters step ``index``: the map itself when no earlier step
        changes it, else computed (one tensor in memory)."""
        x = self.reader.tensor(name)
        target = self.targets.get(name)
        for i in self.chain(name):
            if i >= index:
                break
            x = self.steps[i].rows(self.spec_entering(name, i), target, x, 0, record=False)
        return x

    def out_specs(self, name: str) -> list[TensorSpec]:
        chain = self.chain(name)
        spec = self.reader.spec(name)
        if not chain:
            return [spec]
        last = chain[-1]
        entering = self.spec_entering(name, last)
        return self.steps[last].out_specs(entering, self.targets.get(name))


def _row_chunks(spec: TensorSpec, whole: bool) -> Iterator[tuple[int, int]]:
    rows = spec.shape[0] if spec.shape else 1
    if whole or len(spec.shape) < 2:
        yield 0, rows
        return
    per_row = max(1, spec.numel // rows) * 4
    step = max(1, CHUNK_BYTES // per_row)
    for r in range(0, rows, step):
        yield r, min(rows, r + step)


def hf_targets(src_dir: Path, reader: ShardReader) -> tuple[dict[str, Target], Any]:
    """The methods' targets of an HF model, from its skeleton on the meta device (no weights)."""
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(src_dir, trust_remote_code=False)
    cls = model_io.model_class(config)
    try:
        with torch.device("meta"):
            module = cls(config)
    except Exception as e:  # an architecture that cannot be built on meta: the in-memory path
        raise NotStreamable(
            f"the model's skeleton could not be built on the meta device ({e.__class__.__name__}: {e})"
        ) from e
    skeleton = model_io.LoadedModel(format="hf", src_dir=src_dir, module=module)
    mods = dict(module.named_modules())
    out: dict[str, Target] = {}
    for t in skeleton.targets():
        if t.name not in reader:
            # The checkpoint's names differ from the module's (a base-model checkpoint, a legacy
            # prefix): transformers would rename on load; the in-memory path handles that.
            raise NotStreamable(f"target {t.name} is not a tensor of the checkpoint (names differ from the module's)")
        mod = mods[t.name.removesuffix(".weight")]
        if tuple(t.weight.shape) != reader.spec(t.name).shape:
            raise NotStreamable(
                f"{t.name}: checkpoint shape {reader.spec(t.name).shape} differs from the module's "
                f"{tuple(t.weight.shape)}"
            )
        out[t.name] = Target(t.name, t.row_dim, "Conv1D" if isinstance(mod, Conv1D) else type(mod).__name__)
    return out, module


def bare_targets(reader: ShardReader) -> dict[str, Target]:
    """The methods' targets of a bare state dict: the in-memory path's rule, on metadata."""
    state = {n: torch.empty(reader.spec(n).shape, dtype=reader.spec(n).dtype, device="meta") for n in reader.names()}
    skeleton = model_io.LoadedModel(format="safetensors", src_dir=Path("."), state=state)
    return {t.name: Target(t.name, t.row_dim, "") for t in skeleton.targets()}


class _Background:
    """A sink file written on a thread of its own: ``write`` queues the buffer (a view of the
    tensor, kept alive by the queue) and returns, so the CRC, the SHA-256 and the write of one
    chunk overlap the arithmetic of the next. ``then(fn)`` runs ``fn`` on that thread once
    everything queued before it is written. The first error is raised by the next ``write``,
    ``then`` or ``close`` in the caller's thread (a full disk ends the job as it did before)."""

    # Bytes queued at most (one more buffer is always accepted when the queue is empty): enough
    # to keep the writer busy while the next chunk is computed, and what the memory plan counts
    # (core/jobs/plan.py); computed chunks are fresh tensors, so each queued one is memory held.
    MAX_QUEUED = 16 << 20

    def __init__(self, w: Any) -> None:
        self._w = w
        self._items: list[Any] = []
        self._queued = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closing:
                    self._cv.wait()
                if not self._items:
                    return
                item, size = self._items.pop(0)
            try:
                if self._error is None:  # after an error: drain, the caller learns of it at its next call
                    if callable(item):
                        item()
                    else:
                        self._w.write(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            with self._cv:
                self._queued -= size
                self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, item: Any, size: int) -> None:
        self._raise()
        with self._cv:
            while self._queued and self._queued + size > self.MAX_QUEUED:
                self._cv.wait()
            self._items.append((item, size))
            self._queued += size
            self._cv.notify_all()

    def write(self, b: Any) -> None:
        self._put(b, memoryview(b).nbytes)

    def then(self, fn: Callable[[], None]) -> None:
        self._put(fn, 0)

    def close(self) -> None:
        """Wait for everything queued, then close the file (also after an error, so that nothing
        is left writing; the first error is raised)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        try:
            self._w.close()
        finally:
            self._raise()


class _Counter:
    """Parameters, non-zeros and per-target zeros of the result, counted as tensors stream by
    (on the float values before a final quantization step, as the in-memory path counts them)."""

    def __init__(self) -> None:
        self.total = 0
        self.nonzero = 0

    def add(self, name: str, t: torch.Tensor) -> int:
        """Count a tensor; returns its zeros."""
        n = t.numel()
        return self.add_counted(name, n, int(torch.count_nonzero(t)) if n else 0)

    def add_counted(self, name: str, n: int, nz: int) -> int:
        """Count ``n`` values of which ``nz`` are non-zero (counted by a step); returns the zeros."""
        if not name.endswith(QUANT_SUFFIXES):
            self.total += n
            self.nonzero += nz
        return n - nz


def passes(steps: list[StreamStep]) -> list[list[StreamStep]]:
    """The steps split into passes over the checkpoint: a step with a global pre-pass (which must
    see every target as the steps before it leave them) starts a new pass. Most recipes are one
    pass; ``prune.magnitude`` (global) after another step is two, the first written to scratch."""
    out: list[list[StreamStep]] = []
    for s in steps:
        if not out or (s.needs_prepass and out[-1]):
            out.append([])
        out[-1].append(s)
    # No step (a job that only exports, worker/exporting.py): one pass that copies every tensor.
    return out or [[]]


def run_passes(
    src_dir: Path,
    fmt: str,
    steps: list[StreamStep],
    sink: Sink,
    *,
    scratch: Path,
    extra_files: list[Path],
    manifest: dict[str, Any],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str, float], None] | None = None,
    canceled: Callable[[], bool] | None = None,
) -> Result | None:
    """Every pass of the recipe (:func:`passes`, usually one) into ``sink``: a pass before the
    last writes its result to ``scratch`` for the next to read, removed once read."""
    from worker.sinks import DirSink

    groups = passes(steps)
    report = progress or (lambda note, frac: None)
    metrics: list[dict[str, Any]] = []
    first: Result | None = None
    result: Result | None = None
    cur, prev = src_dir, None
    for k, group in enumerate(groups):
        last = k == len(groups) - 1
        note = "" if len(groups) == 1 else f"pass {k + 1}/{len(groups)}: "
        out = sink if last else DirSink(scratch / f"pass-{k + 1}")
        result = run(
            cur,
            fmt,
            group,
            out,
            extra_files=extra_files if last else [],
            manifest=manifest if last else {},
            shard_bytes=shard_bytes,
            canceled=canceled,
            progress=lambda n, f, k=k, note=note: report(f"{note}{n}", (k + f) / len(groups)),
        )
        if prev is not None:
            shutil.rmtree(prev, ignore_errors=True)
        if result is None:
            return None
        first = first or result
        metrics += result.step_metrics
        if not last:
            cur = prev = out.path  # type: ignore[attr-defined]
    assert first is not None and result is not None
    result.step_metrics = metrics
    result.weight_bytes_in = first.weight_bytes_in
    return result


def run(
    src_dir: Path,
    fmt: str,
    steps: list[StreamStep],
    sink: Sink,
    *,
    extra_files: list[Path],
    manifest: dict[str, Any],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str, float], None] | None = None,
    canceled: Callable[[], bool] | None = None,
) -> Result | None:
    """Stream the model in ``src_dir`` through ``steps`` into ``sink``. Returns None when
    ``canceled()`` turned true (checked between tensors). Raises ShardError for input that is not
    what its headers say, NotStreamable before anything is written when the path does not apply."""
    files = sorted(src_dir.glob("*.safetensors"))
    if not files:
        raise ShardError("the model has no .safetensors file")
    reader = ShardReader(files)
    try:
        return _run(reader, src_dir, fmt, steps, sink, extra_files, manifest, shard_bytes, progress, canceled)
    finally:
        reader.close()


def _run(reader, src_dir, fmt, steps, sink, extra_files, manifest, shard_bytes, progress, canceled):  # noqa: ANN001
    report = progress or (lambda note, frac: None)
    try:
        engine = _prepared_engine(reader, src_dir, fmt, steps, report, canceled)
        out_specs, produced = _planned_outputs(engine)
        config: dict[str, Any] | None = None
        if fmt == "hf":
            config = json.loads((src_dir / "config.json").read_text())
            for s in steps:
                s.update_config(config)
            shards = layout(out_specs, shard_bytes)
        else:
            shards = layout(out_specs, 2**62, metadata={"modelpress": json.dumps(manifest, sort_keys=True)})
        writer = _ShardWriter(engine, produced, shards, report)
        writer.write(sink, shards)
    except _Canceled:
        return None
    if fmt == "hf":
        assert config is not None
        _write_hf_files(sink, shards, config, extra_files, manifest)
    return _result(engine, writer, shards)


def _prepared_engine(
    reader: ShardReader,
    src_dir: Path,
    fmt: str,
    steps: list[StreamStep],
    report: Callable[[str, float], None],
    canceled: Callable[[], bool] | None,
) -> _Engine:
    """The engine over the checkpoint's targets, every step bound and its pre-pass (if any) run.
    Raises _Canceled when the job was canceled during a pre-pass."""
    skeleton = None
    if fmt == "hf":
        targets, skeleton = hf_targets(src_dir, reader)
    else:
        targets = bare_targets(reader)
    engine = _Engine(reader, targets, steps)
    engine.skeleton = skeleton
    engine.canceled = canceled
    for s in steps:  # before the first select: Source() below asks every step for its selection
        s.bind(skeleton, targets)
    for i, s in enumerate(steps):
        if i and s.needs_prepass:
            raise NotStreamable("a step that needs a pre-pass must come first in a pass (worker/stream passes())")
        source = Source(engine, i)
        if len(source):
            report(f"pre-pass over {len(source)} tensors", 0.0)
        s.prepare(source)
    return engine


def _planned_outputs(engine: _Engine) -> tuple[list[TensorSpec], dict[str, list[TensorSpec]]]:
    """Every output tensor, in input order, so headers can be written first; and the outputs of
    each input tensor."""
    out_specs: list[TensorSpec] = []
    produced: dict[str, list[TensorSpec]] = {}
    for name in engine.order:
        specs = engine.out_specs(name)
        produced[name] = specs
        out_specs.extend(specs)
    names = [s.name for s in out_specs]
    if len(set(names)) != len(names):
        raise NotStreamable("two output tensors would have the same name")
    return out_specs, produced


class _ShardWriter:
    """The output shards written in one sequential pass: every input tensor read once, copied as
    stored or through its chain of steps, and counted on the way (parameters, zeros, per layer)."""

    def __init__(
        self,
        engine: _Engine,
        produced: dict[str, list[TensorSpec]],
        shards: list[Shard],
        report: Callable[[str, float], None],
    ) -> None:
        self.engine, self.reader, self.produced, self.report = engine, engine.reader, produced, report
        self.counter = _Counter()
        self.per_layer: list[dict[str, Any]] = []
        self.total_in = sum(self.reader.spec(n).nbytes for n in engine.order)
        self.done_in = 0
        self.last_report = time.monotonic()
        self.owner = {s.name: name for name, specs in produced.items() for s in specs}
        self.pending: dict[str, torch.Tensor] = {}  # trailing outputs of the tensor being written
        # The input tensors in the order they are read, to start reading the next one ahead.
        sequence = list(dict.fromkeys(self.owner[spec.name] for shard in shards for spec in shard.specs))
        self.following = dict(zip(sequence, sequence[1:], strict=False))

    def write(self, sink: Sink, shards: list[Shard]) -> None:
        """Every shard into ``sink``. Raises _Canceled when the job was canceled (checked between
        tensors)."""
        for shard in shards:
            w = _Background(sink.open(shard.filename, len(shard.header()) + shard.data_bytes, weights=True))
            try:
                w.write(shard.header())
                for spec in shard.specs:
                    self._write_tensor(w, spec)
            finally:
                w.close()
        if self.pending:
            raise RuntimeError(f"outputs planned but not written: {sorted(self.pending)[:3]}")

    def _write_tensor(self, w: _Background, spec: TensorSpec) -> None:
        if spec.name in self.pending:
            t = self.pending.pop(spec.name)
            _check(t, spec)
            w.write(tensor_bytes(t))
            return
        engine, reader = self.engine, self.reader
        name = self.owner[spec.name]
        if engine.canceled is not None and engine.canceled():
            raise _Canceled
        if name in self.following:
            reader.prefetch(self.following[name])
        chain = engine.chain(name)
        in_spec = reader.spec(name)
        if not chain:
            zeros = self._copy(w, name, in_spec)
            if engine.targets.get(name) is not None:
                self._per_layer(name, in_spec.numel, zeros)
        else:
            zeros = _stream_tensor(engine, name, chain, w, self.counter, self.pending, self.produced[name])
            if engine.targets.get(name) is not None:
                # The weight as the steps leave it (a final step's packing aside): a step may
                # have changed its shape (structured pruning).
                self._per_layer(name, engine.spec_entering(name, len(engine.steps)).numel, zeros)
        # Once the writer has written it: the untouched tensors' chunks are views of the pages
        # being dropped.
        w.then(lambda name=name: reader.done_with(name))
        self.done_in += in_spec.nbytes
        if time.monotonic() - self.last_report > 2.0:
            self.last_report = time.monotonic()
            self.report(
                f"streaming {self.done_in / 2**30:.2f} of {self.total_in / 2**30:.2f} GiB",
                self.done_in / self.total_in if self.total_in else 1.0,
            )

    def _copy(self, w: _Background, name: str, in_spec: TensorSpec) -> int:
        """A tensor no step changes, copied as stored and counted on the way (each byte is read
        once); its zero count."""
        zeros = 0
        src = self.reader.tensor(name)
        for r0, r1 in _row_chunks(in_spec, False):
            part = src[r0:r1] if src.ndim else src
            w.write(tensor_bytes(part))
            zeros += self.counter.add(name, part)
        del src
        return zeros

    def _per_layer(self, name: str, n: int, zeros: int) -> None:
        self.per_layer.append(
            {"name": name, "parameters": n, "zeros": zeros, "sparsity": round(zeros / n, 6) if n else 0.0}
        )


def _write_hf_files(
    sink: Sink, shards: list[Shard], config: dict[str, Any], extra_files: list[Path], manifest: dict[str, Any]
) -> None:
    """The files of an HF folder besides the weights: the shard index, config.json (as the steps
    updated it), the model's other files as they are, and modelpress.json."""
    if len(shards) > 1:
        _write_small(sink, "model.safetensors.index.json", index_json(shards))
    _write_small(sink, "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    for p in extra_files:
        with p.open("rb") as f:
            w = sink.open(p.name, p.stat().st_size, weights=p.suffix == ".safetensors")
            try:
                while chunk := f.read(1 << 20):
                    w.write(chunk)
            finally:
                w.close()
    _write_small(sink, "modelpress.json", json.dumps(manifest, indent=2, sort_keys=True).encode())


def _result(engine: _Engine, writer: _ShardWriter, shards: list[Shard]) -> Result:
    """The pass's result: the steps' metrics and notes, parameter counts, sparsity, the bytes the
    result takes in memory and on disk."""
    steps, counter, per_layer = engine.steps, writer.counter, writer.per_layer
    rank = {n: i for i, n in enumerate(engine.targets)}  # the module's order, as the in-memory path lists them
    per_layer.sort(key=lambda x: rank[x["name"]])
    target_total = sum(x["parameters"] for x in per_layer)
    target_zeros = sum(x["zeros"] for x in per_layer)
    overall = 1 - counter.nonzero / counter.total if counter.total else 0.0
    step_metrics = [s.metrics() for s in steps]  # before the notes: steps fill them as they sum up
    notes: dict[str, Any] = {}
    for s in steps:
        notes.update(s.notes)
    out_bytes = sum(sh.data_bytes for sh in shards)
    memory = _result_memory(engine, notes, out_bytes)
    if "memory_bytes_compressed_delta" in notes:
        notes["memory_bytes"] = memory
        notes["memory_bytes_compressed"] = memory + notes.pop("memory_bytes_compressed_delta")
    return Result(
        step_metrics=step_metrics,
        parameters={"total": counter.total, "nonzero": counter.nonzero},
        sparsity={
            "target_parameters": target_total,
            "target_zeros": target_zeros,
            "sparsity": target_zeros / target_total if target_total else 0.0,
            "overall": round(overall, 6),
            "per_layer": per_layer,
        },
        memory_bytes=memory,
        weight_bytes_in=writer.total_in,
        weight_bytes_out=out_bytes,
        notes=notes,
    )


def _result_memory(engine: _Engine, notes: dict[str, Any], out_bytes: int) -> int:
    """Bytes the result takes once loaded (a bare state dict: its tensor data). Takes
    ``memory_bytes_extra`` out of ``notes``."""
    if engine.skeleton is None:
        return out_bytes
    # As transformers loads the result: every parameter and buffer of the module (tied ones
    # once, non-persistent buffers too) in the dtype the steps leave, plus what a quantizing
    # step attaches (scales, shapes); packed weights count as the floats they unpack to.
    reader, n_steps = engine.reader, len(engine.steps)
    return _module_bytes(
        engine.skeleton, lambda n: engine.spec_entering(n, n_steps) if n in reader else None
    ) + notes.pop("memory_bytes_extra", 0)


def _module_bytes(module: torch.nn.Module, spec_of: Callable[[str], TensorSpec | None]) -> int:
    seen: set[int] = set()
    total = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        # Quantization parameters a step attached to the skeleton are the step's to count.
        if id(t) in seen or name.endswith(QUANT_SUFFIXES):
            continue
        seen.add(id(t))
        # The checkpoint's tensors as the steps leave them (dtype and shape); buffers that are
        # not stored (rotary frequencies...) as the skeleton has them.
        spec = spec_of(name)
        total += spec.numel * spec.dtype.itemsize if spec is not None else t.numel() * t.dtype.itemsize
    return total


def _check(t: torch.Tensor, spec: TensorSpec) -> None:
    if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
        raise RuntimeError(f"{spec.name}: produced {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}")


def _stream_tensor(
    engine: _Engine,
    name: str,
    chain: list[int],
    w: Any,
    counter: _Counter,
    pending: dict[str, torch.Tensor],
    outs: list[TensorSpec],
) -> int:
    """One tensor through its chain of steps, row chunk by row chunk, written as it goes.
    Returns the target's zero count (of the values entering a final step, else of the output)."""
    steps = engine.steps
    target = engine.targets.get(name)
    spec0 = engine.reader.spec(name)
    for i in chain:
        steps[i].start(engine.spec_entering(name, i), target, lambda i=i: engine.entering(name, i))
    whole = any(steps[i].whole_tensor(engine.spec_entering(name, i), target) for i in chain)
    src = engine.reader.tensor(name)
    lead = outs[0]
    written_rows = 0
    zeros = 0
    final = steps[chain[-1]].final
    flat_shape = (spec0.shape[0], -1) if len(spec0.shape) >= 2 else None
    for r0, r1 in _row_chunks(spec0, whole):
        x = src[r0:r1] if src.ndim else src
        for i in chain:
            s = steps[i]
            if final and i == chain[-1]:
                if s.counts_input:
                    n_in = x.numel()
                    x = s.rows(engine.spec_entering(name, i), target, x, r0, record=True)
                    zeros += counter.add_counted(name, n_in, s.input_nonzero)
                    continue
                zeros += counter.add(name, x)
            x = s.rows(engine.spec_entering(name, i), target, x, r0, record=True)
        if not final:
            known = steps[chain[-1]].output_nonzero
            zeros += counter.add(name, x) if known is None else counter.add_counted(name, x.numel(), known)
        if x.dtype != lead.dtype:
            raise RuntimeError(f"{lead.name}: produced {x.dtype}, planned {lead.dtype}")
        w.write(tensor_bytes(x))
        written_rows += x.shape[0] if x.ndim else 1
        del x
    if flat_shape is not None and written_rows != lead.shape[0]:
        raise RuntimeError(f"{lead.name}: wrote {written_rows} rows, planned {lead.shape[0]}")
    trailing = steps[chain[-1]].end(engine.spec_entering(name, chain[-1]), target) if final else {}
    expected = [s.name for s in outs[1:]]
    if sorted(trailing) != sorted(expected):
        raise RuntimeError(f"{name}: trailing outputs {sorted(trailing)} differ from the plan {expected}")
    pending.update(trailing)
    return zeros


def _write_small(sink: Sink, name: str, data: bytes) -> None:
    w = sink.open(name, len(data), weights=False)
    try:
        w.write(data)
    finally:
        w.close()
