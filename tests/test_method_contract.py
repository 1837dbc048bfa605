"""The typed method contract (worker/context.py): every handler is typed, without ``Any``, as
``(model: LoadedModel, params: <its params model>, ctx: MethodContext) -> Metrics``; a handler
runs in-process against a fake context, with no database, broker or storage; and the pipeline's
JobContext reaches the job's row only through its port, faked here too."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from core.config import Settings
from core.methods import Refusal
from tests.helpers import build_tiny_models
from worker import methods, model_io
from worker.context import JobPort, MethodContext, Metrics, Sample, StoredModel
from worker.model_io import LoadedModel

pytestmark = pytest.mark.integration  # whole methods run in-process on real tiny models


@dataclass
class FakeContext:
    """A MethodContext for unit tests: the samples it is given, the progress it was told."""

    work_dir: Path
    settings: Settings = field(default_factory=Settings)
    rows: list[Sample] = field(default_factory=list)
    progress: list[tuple[str, float]] = field(default_factory=list)
    cancel: bool = False

    def step_progress(self, note: str, fraction: float) -> None:
        self.progress.append((note, fraction))

    def samples(self, which: str = "train") -> list[Sample]:
        return self.rows

    def cancel_requested(self) -> bool:
        return self.cancel

    def load_model(self, model_id: str) -> LoadedModel:
        raise LookupError(model_id)


@dataclass
class FakePort:
    """A JobPort: progress kept in a list; the job lost, the database down or a cancel on demand."""

    held: bool | None = True
    cancel: bool = False
    models: dict[str, StoredModel] = field(default_factory=dict)
    recorded: list[tuple[str, float]] = field(default_factory=list)

    def record_progress(self, stage: str, fraction: float) -> bool | None:
        self.recorded.append((stage, fraction))
        return self.held

    def cancel_requested(self) -> bool:
        return self.cancel

    def tenant_model(self, model_id: str) -> StoredModel | None:
        return self.models.get(model_id)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("contract-models"))


def _run(name: str, params: dict[str, object], model: LoadedModel, ctx: MethodContext) -> Metrics:
    spec = methods.get(name)
    assert spec is not None
    return spec.handler(model, spec.params.model_validate(params), ctx)


def test_every_handler_is_typed_without_any() -> None:
    for name, spec in methods.load_all().items():
        hints = typing.get_type_hints(spec.handler, localns={"LoadedModel": LoadedModel})
        assert list(hints) == ["model", "params", "ctx", "return"], name
        assert hints["model"] is LoadedModel, name
        assert hints["params"] is spec.params, name
        assert hints["ctx"] is MethodContext, name
        assert hints["return"] == dict[str, object], name
        assert "Any" not in repr(hints), (name, hints)


def test_the_fakes_are_what_the_pipeline_expects(tmp_path: Path) -> None:
    ctx: MethodContext = FakeContext(tmp_path)
    port: JobPort = FakePort()
    assert ctx.cancel_requested() is False and port.record_progress("x", 0.0) is True


def test_quantize_cast_with_a_fake_context(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = model_io.load(tiny_models["gpt2"], "hf")
    metrics = _run("quantize.cast", {"dtype": "bfloat16"}, model, FakeContext(tmp_path))
    assert metrics["dtype"] == "bfloat16" and metrics["from_dtypes"] == ["float32"]
    assert model.module is not None and {p.dtype for p in model.module.parameters()} == {torch.bfloat16}


def test_prune_magnitude_with_a_fake_context(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = model_io.load(tiny_models["gpt2"], "hf")
    _run("prune.magnitude", {"sparsity": 0.5}, model, FakeContext(tmp_path))
    weights = [t.weight for t in model.targets()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.5) < 0.01, zeros


def test_quantize_weight_only_with_a_fake_context(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = model_io.load(tiny_models["llama"], "hf")
    ctx = FakeContext(tmp_path)
    metrics = _run("quantize.weight_only", {"bits": 8}, model, ctx)
    assert metrics and model.saver is not None, metrics  # compressed-tensors writes the artifact


def test_the_worker_refuses_a_strict_group_size_naming_every_blocking_layer(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    # The submit check may have had only the config; the worker sees every layer (hidden 64, MLP 128).
    model = model_io.load(tiny_models["llama"], "hf")
    with pytest.raises(Refusal) as e:
        params = {"bits": 4, "group_size": 128, "strict_group_size": True}
        _run("quantize.weight_only", params, model, FakeContext(tmp_path))
    names = [b["name"] for b in e.value.fields["blocking_layers"]]
    assert e.value.fields["blocking_count"] == 12 and e.value.fields["valid_group_sizes"] == [32, 64]
    assert "model.layers.1.mlp.up_proj" in names and not any("down_proj" in n for n in names)
    assert "Group sizes that divide every input width: 32, 64" in str(e.value)


def test_job_context_reaches_the_job_row_only_through_its_port(tmp_path: Path) -> None:
    from worker.pipeline import JobContext, JobFailed, LostLease

    port = FakePort()
    ctx = JobContext("job-1", 1, Settings(), storage=None, work_dir=tmp_path, port=port)  # type: ignore[arg-type]
    ctx.step_label, ctx.step_span = "quantize.cast", (0.2, 0.6)
    ctx.step_progress("half", 0.5)
    assert port.recorded == [("quantize.cast: half", 0.4)]
    assert ctx.cancel_requested() is False
    port.cancel = True
    assert ctx.cancel_requested() is True
    port.held = None  # the database is down: the job goes on
    ctx.progress("evaluating", 0.9)
    port.held = False  # another attempt holds the job now
    with pytest.raises(LostLease):
        ctx.progress("evaluating", 0.95)
    with pytest.raises(JobFailed, match="no longer exists"):
        ctx.load_model("gone")
