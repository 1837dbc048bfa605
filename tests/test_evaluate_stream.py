"""Evaluation of a model too large to hold twice (worker/evaluate.py ``measure_side_by_side``):
both models with their weights on disk, text by text side by side, gives the in-memory
evaluation's figures on the same texts. Tiny models in-process; the pipeline's choice of the
streamed branch through a worker's memory budget is tested through the service in
tests/test_plan.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tokenizer_util import build_models
from worker import evaluate, model_io

pytestmark = pytest.mark.integration  # whole methods run in-process on real tiny models

# Generous: every text runs in both evaluations, so they see the same inputs.
SETTINGS = {
    "enabled": True,
    "batch_size": 1,
    "seq_len": 16,
    "runs": 3,
    "warmup": 1,
    "max_samples": 8,
    "budget_s": 3600.0,
}


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("stream-eval-models"))


def _builtin():
    lines = evaluate.BUILTIN_CORPUS.read_text().splitlines()
    return [{"text": t} for t in lines if t.strip()], {"source": "builtin", "id": None}


class _Ctx:
    def step_progress(self, *a, **k) -> None:
        pass

    def progress(self, *a, **k) -> None:
        pass


def _quantized(src: Path, out: Path) -> Path:
    """The whole path's 4-bit weight-only artifact of ``src`` (packed integers, compressed-tensors)."""
    from worker import methods

    methods.load_all()
    loaded = model_io.load(src, "hf")
    spec = methods.get("quantize.weight_only")
    spec.handler(loaded, spec.params.model_validate({"bits": 4, "group_size": None}), _Ctx())
    model_io.save(loaded, out, {"modelpress_manifest": 1})
    return out


@pytest.fixture(scope="module")
def llama_int4(tok_models, tmp_path_factory) -> Path:
    return _quantized(tok_models["llama"], tmp_path_factory.mktemp("llama-int4") / "out")


def _in_memory(src: Path, artifact: Path, settings=SETTINGS) -> dict:
    ev = evaluate.Evaluator(settings, src, _builtin)
    ev.measure_original(model_io.load(src, "hf").module)
    ev.measure_compressed(artifact)
    return ev.sections()


def _on_disk(src: Path, artifact: Path, work: Path, settings=SETTINGS, seen=None) -> tuple[dict, evaluate.Evaluator]:
    ev = evaluate.Evaluator(settings, src, _builtin, *([seen] if seen is not None else []))
    original = model_io.load(src, "hf", work / "offload-original").module
    assert model_io.is_offloaded(original)
    ev.measure_side_by_side(original, artifact, work / "offload-artifact")
    return ev.sections(), ev


@pytest.mark.parametrize("which", ["llama-int4", "gpt2-pruned"])
def test_weights_on_disk_give_the_in_memory_figures(tok_models, llama_int4, tmp_path, which):
    if which == "llama-int4":
        src, artifact = tok_models["llama"], llama_int4
    else:
        # A float result (GPT-2: Conv1D layers, tied head): one MLP weight zeroed in half.
        from transformers import GPT2LMHeadModel

        src = tok_models["gpt2"]
        model = GPT2LMHeadModel.from_pretrained(src)
        with torch.no_grad():
            w = model.transformer.h[0].mlp.c_fc.weight
            w[:, : w.shape[1] // 2] = 0
        artifact = tmp_path / "pruned"
        model.save_pretrained(artifact)
    whole = _in_memory(src, artifact)
    disk, ev = _on_disk(src, artifact, tmp_path)
    q0, f0, q1, f1 = whole["quality"], whole["fidelity"], disk["quality"], disk["fidelity"]
    assert q1["available"] and f1["available"], (q1, f1)
    assert q1["samples"] == q0["samples"] == f1["samples"] == 8 and q1["dataset"] == q0["dataset"]
    assert q1["weights_on_disk"] is True and q0["weights_on_disk"] is False
    # Onloading a module runs the same kernels on the same weights: the same logits. Stated
    # tolerance 1e-9 relative (observed: equal).
    for key in ("original", "compressed", "ratio"):
        assert q1[key] == pytest.approx(q0[key], rel=1e-9), key
        assert q1["ci95"][key] == pytest.approx(q0["ci95"][key], rel=1e-9), key
    for key in ("kl_mean", "top1_agreement", "output_cosine", "tokens"):
        assert f1[key] == pytest.approx(f0[key], rel=1e-9, abs=1e-12), key
    assert f1["kl_mean"] > 0  # the compression changed something the comparison sees
    # No latency of a model read from disk module by module: the report says why.
    assert disk["speed"]["available"] is False and "on disk" in disk["speed"]["reason"]
    assert whole["speed"]["available"] is True
    budget = q1["budget"]
    assert budget["shares_s"]["latency"] == 0.0 and budget["within_budget"] is True
    assert ev.original.samples == ev.compressed.samples == 8
    assert all(x is None for x in ev.original.outputs)  # each compared once, then let go


def test_weights_on_disk_follow_the_budget_and_progress(tok_models, llama_int4, tmp_path):
    seen: list[tuple[str, float | None]] = []
    s, ev = _on_disk(
        tok_models["llama"],
        llama_int4,
        tmp_path,
        {**SETTINGS, "budget_s": 0.001},
        seen=lambda note, fraction=None: seen.append((note, fraction)),
    )
    q = s["quality"]
    assert q["samples"] == evaluate.MIN_SAMPLES and q["limited_by"] == "budget" and "ran anyway" in q["budget_note"]
    assert q["budget"]["within_budget"] is False
    notes = [t for t, _ in seen if ": sample " in t]
    assert notes[-1] == f"evaluating both models, weights on disk: sample {evaluate.MIN_SAMPLES}/{evaluate.MIN_SAMPLES}"
    fractions = [x for _, x in seen]
    assert fractions == sorted(fractions)


def test_the_artifact_loads_with_its_weights_on_disk(llama_int4, tmp_path):
    off = tmp_path / "off"
    module = evaluate._load_offloaded_artifact(llama_int4, off)
    assert model_io.is_offloaded(module)

    def written() -> int:
        return sum(p.stat().st_size for p in off.iterdir() if p.is_file() and not p.is_symlink())

    # Loaded, the offload folder only links to the artifact's files; the first pass decompresses
    # the packed layers, and their float weights go to the folder (scratch), not to memory.
    assert written() == 0
    with torch.inference_mode():
        module(input_ids=torch.tensor([[5, 6, 7, 8]]))
    packed = [m for m in module.modules() if "weight_shape" in m._parameters]
    assert packed
    assert written() >= sum(int(m.weight_shape.prod()) for m in packed) * 4  # float32 here


# -- through the pipeline (worker/pipeline._execute, as a worker runs it, minus the job's database) --
def _pipeline_job(src: Path, root: Path, steps: list[dict], budget_mb: int) -> dict:
    """One job through ``pipeline._execute`` with the worker's memory budget set (1 MB: below its
    baseline, so no model fits twice; 0: the machine's memory). Returns the job's metrics."""
    from core.config import Settings
    from core.storage import Storage
    from tests.tokenizer_util import txt_dataset
    from worker import methods, pipeline

    methods.load_all()
    settings = Settings(data_dir=root / "var", worker_memory_budget_mb=budget_mb)
    storage = Storage(str(root / "storage"))
    files = []
    for p in sorted(src.iterdir()):
        storage.put_file(p, f"models/m/{p.name}")
        files.append({"name": p.name, "size": p.stat().st_size})
    data = root / "calib.txt"
    data.write_bytes(txt_dataset())
    storage.put_file(data, "datasets/calib.txt")
    datasets = {
        "train": {"id": "calib", "format": "txt", "storage_key": "datasets/calib.txt", "samples": None, "labels": None}
    }
    model_info = {
        "format": "hf",
        "prefix": "models/m",
        "files": files,
        "sha256": "0" * 64,
        "size_bytes": sum(f["size"] for f in files),
        "parameters": None,
    }

    class Ctx(pipeline.JobContext):
        def progress(self, stage: str, fraction: float) -> None:
            pass

        def cancel_requested(self) -> bool:
            return False

    work = settings.tmp_dir / f"job-{budget_mb}"
    evaluation = {**SETTINGS, "max_samples": 6}
    ctx = Ctx("job", 1, settings, storage, work, datasets, evaluation=evaluation)
    _, values = pipeline._execute(ctx, storage, work, model_info, steps)
    return values["metrics"]


@pytest.mark.parametrize(
    "steps,path",
    [
        ([{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}}], "stream"),
        ([{"method": "prune.wanda", "params": {"sparsity": 0.5, "num_samples": 8, "max_length": 32}}], "blocks"),
    ],
    ids=["stream", "blocks"],
)
def test_the_pipeline_streams_evaluation_when_the_budget_cannot_hold_the_model_twice(tok_models, tmp_path, steps, path):
    whole = _pipeline_job(tok_models["llama"], tmp_path / "whole", steps, budget_mb=0)
    disk = _pipeline_job(tok_models["llama"], tmp_path / "disk", steps, budget_mb=1)
    assert whole["engine"]["path"] == disk["engine"]["path"] == path
    assert "evaluate_streamed" in disk["stage_seconds"] and "evaluate_original" not in disk["stage_seconds"]
    assert "evaluate_streamed" not in whole["stage_seconds"]
    assert disk["quality"]["weights_on_disk"] is True and whole["quality"]["weights_on_disk"] is False
    assert disk["speed"]["available"] is False and whole["speed"]["available"] is True
    for section, keys in (
        ("quality", ("original", "compressed", "ratio", "samples")),
        ("fidelity", ("kl_mean", "top1_agreement", "output_cosine", "tokens")),
    ):
        for key in keys:
            assert disk[section][key] == pytest.approx(whole[section][key], rel=1e-9, abs=1e-12), (section, key)
    # The offload folders went with the evaluation.
    assert not list((tmp_path / "disk" / "var" / "tmp").glob("job-1/eval-offload-*"))
