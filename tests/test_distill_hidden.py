"""``distill``, issue #22 item 6: the hidden-state loss, the learning-rate schedule, frozen
embeddings, and the held-out evaluation before and after training: the math against hand-computed
values (unit), the parameters and the submit checks (unit), and whole runs of the handler on the
tiny test models (integration)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.tokenizer_util import build_models, labeled_jsonl, sentences

# --------------------------------------------------------------------------- the math, by hand


@pytest.mark.unit
def test_cosine_hidden_loss_by_hand():
    import torch

    from worker.ops.distill import hidden_state_loss

    # One layer, batch 1, 3 positions, width 2: cos = 1, 0, −1 → 1 − cos = 0, 1, 2.
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    t = torch.tensor([[[5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    assert float(hidden_state_loss([s], [t], "cosine")) == pytest.approx(1.0, abs=1e-6)
    # The third position is padding: (0 + 1) / 2.
    mask = torch.tensor([[1, 1, 0]])
    assert float(hidden_state_loss([s], [t], "cosine", mask)) == pytest.approx(0.5, abs=1e-6)
    # Two layers: the mean of the layers' means ((0 + 1) / 2 and 0 for identical states).
    assert float(hidden_state_loss([s, t], [t, t], "cosine", mask)) == pytest.approx(0.25, abs=1e-6)
    # Scale-free: scaling either side changes nothing.
    assert float(hidden_state_loss([7 * s], [0.1 * t], "cosine", mask)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.unit
def test_mse_hidden_loss_by_hand():
    import torch

    from worker.ops.distill import hidden_state_loss

    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[1.0, 1.0], [4.0, -4.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    # Per position: mean over the width of (s − t)²: 2.5, 0.5, 0, 16; mean 4.75.
    assert float(hidden_state_loss([s], [t], "mse")) == pytest.approx(4.75, abs=1e-6)
    mask = torch.tensor([[1, 1], [1, 0]])  # the 16 is padding: (2.5 + 0.5 + 0) / 3
    assert float(hidden_state_loss([s], [t], "mse", mask)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        hidden_state_loss([s], [t], "l1")
    with pytest.raises(ValueError, match="layers"):
        hidden_state_loss([s, s], [t], "mse")


@pytest.mark.unit
def test_hidden_loss_gradient_reaches_the_student_only():
    import torch

    from worker.ops.distill import DistillLoss, hidden_state_loss, with_hidden

    s = torch.tensor([[[1.0, 2.0]]], requires_grad=True)
    t = torch.tensor([[[0.0, 0.0]]], requires_grad=True)
    h = hidden_state_loss([s], [t], "mse")
    zero = torch.tensor(0.0)
    total = with_hidden(DistillLoss(torch.tensor(3.0), zero, zero), h, 0.5)
    assert float(total.total.detach()) == pytest.approx(3.0 + 0.5 * 2.5)
    assert float(total.hidden.detach()) == pytest.approx(2.5)
    total.total.backward()
    assert s.grad is not None and t.grad is None  # the teacher's states are targets
    # d/ds of 0.5 · mean((s − t)²) over 2 dims = 0.5 · 2 · (s − t) / 2 = (s − t) / 2 = [0.5, 1]
    assert s.grad.flatten().tolist() == pytest.approx([0.5, 1.0])


@pytest.mark.unit
def test_lr_factor_by_hand():
    from worker.ops.distill import lr_factor

    # Warm-up 2 of 10 steps: 1/2, 1, then the schedule.
    assert [lr_factor(i, 10, 2, "constant") for i in range(1, 11)] == [0.5] + [1.0] * 9
    cos = [lr_factor(i, 10, 2, "cosine") for i in range(1, 11)]
    assert cos[:3] == [0.5, 1.0, 1.0]  # step 3 is the first after the warm-up: full rate
    # step i > 2: ½(1 + cos(π·(i − 3)/8))
    assert cos[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    assert cos[6] == pytest.approx(0.5)  # half-way: i − 3 = 4 = 8/2
    assert cos[9] == pytest.approx(0.5 * (1 - math.cos(math.pi / 8)))  # ≈ 0.038, not 0
    assert all(a > b for a, b in zip(cos[2:], cos[3:], strict=False))
    # No warm-up: the first step at the full rate.
    assert lr_factor(1, 4, 0, "cosine") == 1.0 and lr_factor(1, 4, 0, "constant") == 1.0
    assert lr_factor(3, 4, 0, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lr_factor(0, 4, 0, "constant")
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(1, 4, 0, "linear")


@pytest.mark.unit
def test_nll_sums_match_the_mean_ce():
    import torch

    from worker.ops.distill import causal_lm_ce, causal_lm_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    total, n = causal_lm_nll(logits, ids, mask)
    assert n == 3 + 1  # 3 targets in the first row, 1 in the second (padding is no target)
    assert total / n == pytest.approx(float(causal_lm_ce(logits, ids, mask)), rel=1e-6)
    # By hand for the second row's one target: position 0 predicts token 1.
    row = logits[1, 0].tolist()
    by_hand = -(row[1] - math.log(sum(math.exp(x) for x in row)))
    assert causal_lm_nll(logits[1:, :2], ids[1:, :2])[0] == pytest.approx(by_hand, rel=1e-6)
    assert causal_lm_nll(logits[:, :1], ids[:, :1]) == (0.0, 0)


# --------------------------------------------------------------------------- params and checks


def _spec():
    from worker.methods import load_all

    return load_all()["distill"]


@pytest.mark.unit
def test_new_params_defaults_and_refusals():
    from pydantic import ValidationError

    P = _spec().params
    p = P.model_validate({"layers": 1})
    # Defaults keep earlier jobs' training: no hidden loss, a constant rate, no warm-up.
    assert (p.hidden_loss, p.hidden_weight, p.lr_schedule, p.warmup_steps) == (None, 1.0, "constant", 0)
    assert (p.holdout, p.holdout_max_samples, p.freeze_embeddings) == (0.1, 64, False)
    ok = P.model_validate(
        {"layers": 1, "hidden_loss": "mse", "hidden_weight": 0.1, "lr_schedule": "cosine", "warmup_steps": 99}
    )
    assert ok.hidden_loss == "mse" and ok.warmup_steps == 99  # steps defaults to 100
    assert P.model_validate({"layers": 1, "epochs": 1, "warmup_steps": 500}).warmup_steps == 500
    # The stored spec (every default filled in) validates again on the worker.
    for given in ({"layers": 1}, {"layers": 2, "hidden_loss": "cosine", "hidden_weight": 0.5, "warmup_steps": 3}):
        stored = P.model_validate(given).model_dump(mode="json")
        assert P.model_validate(stored) == P.model_validate(given)
    for bad, why in (
        ({"layers": 1, "hidden_weight": 2.0}, "hidden_loss"),
        ({"layers": 1, "hidden_loss": "l1"}, "hidden_loss"),
        ({"layers": 1, "lr_schedule": "linear"}, "lr_schedule"),
        ({"layers": 1, "steps": 10, "warmup_steps": 10}, "below steps"),
        ({"layers": 1, "warmup_steps": -1}, "warmup_steps"),
        ({"layers": 1, "holdout": 0.9}, "holdout"),
        ({"layers": 1, "hidden_loss": "cosine", "hidden_weight": -1}, "hidden_weight"),
    ):
        with pytest.raises(ValidationError, match=why):
            P.model_validate(bad)


@pytest.mark.unit
def test_hidden_loss_needs_an_aligned_student_at_submit():
    from core.methods import ModelInfo, Refusal

    spec = _spec()
    P = spec.params
    tok = ("config.json", "model.safetensors", "tokenizer.json")
    gpt2 = ModelInfo("hf", "GPT2LMHeadModel", {"n_layer": 4, "n_embd": 32, "n_head": 2, "n_inner": None}, tok)
    llama = ModelInfo("hf", "LlamaForCausalLM", {"num_hidden_layers": 4, "hidden_size": 32}, tok)
    spec.check(P.model_validate({"layers": 2, "hidden_loss": "cosine"}), gpt2)
    spec.check(P.model_validate({"student_config": {"n_layer": 2, "n_inner": 16}, "hidden_loss": "mse"}), gpt2)
    spec.check(P.model_validate({"student_config": {"hidden_size": 32}, "hidden_loss": "mse"}), llama)
    spec.check(P.model_validate({"student_model_id": "m1"}), gpt2)  # no hidden loss: no alignment needed
    for params, info, why in (
        (P.model_validate({"student_model_id": "m1", "hidden_loss": "cosine"}), gpt2, "uploaded student"),
        (P.model_validate({"student_config": {"n_embd": 16}, "hidden_loss": "cosine"}), gpt2, "width"),
        (P.model_validate({"student_config": {"hidden_size": 16}, "hidden_loss": "mse"}), llama, "width"),
    ):
        with pytest.raises(Refusal, match=why) as e:
            spec.check(params, info)
        assert e.value.constraint == "hidden_alignment" and e.value.param == "hidden_loss"
    # The 422's entry names the constraint and points at the parameter.
    from core.methods import StepError, validate_steps

    with pytest.raises(StepError) as err:
        validate_steps(
            [{"method": "distill", "params": {"student_model_id": "m1", "hidden_loss": "cosine"}}], model=gpt2
        )
    (entry,) = err.value.errors
    assert entry["constraint"] == "hidden_alignment" and entry["loc"][-1] == "hidden_loss"


# --------------------------------------------------------------------------- whole runs in-process


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("tokmodels-hidden"))


class _Ctx:
    def __init__(self, samples) -> None:
        self._samples = samples
        self.notes: list[tuple[str, float]] = []

    def samples(self, which: str = "train"):
        return self._samples

    def step_progress(self, note: str, fraction: float) -> None:
        self.notes.append((note, fraction))

    def cancel_requested(self) -> bool:
        return False


def _run(path: Path, params: dict, samples: list[dict]) -> tuple[dict, _Ctx, object]:
    from worker import model_io

    spec = _spec()
    m = model_io.load(path, "hf")
    ctx = _Ctx(samples)
    metrics = spec.handler(m, spec.params.model_validate(params), ctx)
    json.dumps(metrics, allow_nan=False)  # the job's metrics are strict JSON
    return metrics, ctx, m.module


@pytest.mark.integration
def test_hidden_loss_schedule_and_heldout_on_llama(tok_models):
    from worker.ops.distill import lr_factor

    samples = [{"text": s} for s in sentences()]  # 20 sentences
    base = {
        "student_config": {"intermediate_size": 16},  # same depth, narrower MLPs: random, so H > 0
        "steps": 12,
        "lr": 3e-3,
        "batch_size": 4,
        "holdout": 0.2,
        "lr_schedule": "cosine",
        "warmup_steps": 3,
    }
    plain, _, _ = _run(tok_models["llama"], base, samples)
    # The tiny random teacher's hidden states are small (MSE ~1e-6): β makes the term visible.
    hidden, ctx, student = _run(tok_models["llama"], {**base, "hidden_loss": "mse", "hidden_weight": 1000.0}, samples)

    # The hidden term: its pairs, and the probe's loss is the logit loss plus β·H (same init, seed).
    h = hidden["hidden"]
    assert plain["hidden"] is None
    assert h["loss"] == "mse" and h["weight"] == 1000.0 and h["pairs"] == [[0, 0], [1, 1]]
    assert h["initial"] > 0 and h["final"] > 0 and h["final"] != h["initial"]
    added = hidden["initial_loss"] - plain["initial_loss"]
    assert added > 0 and added == pytest.approx(1000.0 * h["initial"], rel=1e-2)
    assert hidden["final_loss"] != pytest.approx(plain["final_loss"], rel=1e-3)  # it changed the training

    # The schedule: the last step ran at lr · factor(12 of 12, warm-up 3).
    assert hidden["lr_schedule"] == {
        "schedule": "cosine",
        "warmup_steps": 3,
        "lr": 3e-3,
        "last_lr": pytest.approx(3e-3 * lr_factor(12, 12, 3, "cosine"), rel=1e-5),
    }

    # Held out: the last 4 of 20 samples, not trained on; three perplexities on the same tokens.
    ho = hidden["heldout"]
    assert hidden["samples"] == 16 and ho["samples"] == 4 and ho["metric"] == "perplexity" and ho["tokens"] > 0
    assert ho["dropped_duplicates"] == 0 and "last 4 samples" in ho["source"]
    for k in ("teacher", "student_before", "student_after"):
        assert ho[k] > 1.0 and ho["mean_nll"][k] == pytest.approx(math.log(ho[k]), rel=1e-4)
    assert ho["teacher"] == plain["heldout"]["teacher"]  # the same held-out texts for every run
    assert ho["student_after_vs_teacher"] == pytest.approx(ho["student_after"] / ho["teacher"], rel=1e-3)
    # Before and after are measured on the student itself: training moved the figure.
    assert ho["mean_nll"]["student_after"] != ho["mean_nll"]["student_before"]

    # Progress: the held-out notes, then steps with the running loss and the rate.
    notes = [n for n, _ in ctx.notes]
    assert notes[:2] == ["held-out teacher: 4 samples", "held-out student before: 4 samples"]
    assert notes[-1] == "held-out student after: 4 samples"
    last = [n for n in notes if n.startswith("step 12/12 ")]
    assert last and " running " in last[0] and last[0].endswith(f"lr {3e-3 * lr_factor(12, 12, 3, 'cosine'):.2e}")
    assert student.config.intermediate_size == 16


@pytest.mark.integration
def test_heldout_split_edge_cases(tok_models):
    texts = sentences()
    # The tail repeats a training text: it is dropped from the held-out samples.
    samples = [{"text": t} for t in [*texts[:10], texts[0]]]
    m, _, _ = _run(tok_models["gpt2"], {"layers": 1, "steps": 2, "holdout": 0.2}, samples)
    assert m["samples"] == 9 and m["heldout"]["samples"] == 1 and m["heldout"]["dropped_duplicates"] == 1
    # holdout 0, or too few samples: every sample trains, and the metrics say why there is no figure.
    m, ctx, _ = _run(tok_models["gpt2"], {"layers": 1, "steps": 2, "holdout": 0}, samples)
    assert m["samples"] == 11 and m["heldout"] == {"metric": None, "skipped": "holdout is 0: every sample trains"}
    assert not any(n.startswith("held-out") for n, _ in ctx.notes)
    m, _, _ = _run(tok_models["gpt2"], {"layers": 1, "steps": 2}, samples[:5])
    assert m["samples"] == 5 and "too few" in m["heldout"]["skipped"]
    # holdout_max_samples caps it.
    params = {"layers": 1, "steps": 2, "holdout": 0.5, "holdout_max_samples": 3}
    m, _, _ = _run(tok_models["gpt2"], params, samples[:10])
    assert m["samples"] == 7 and m["heldout"]["samples"] == 3


@pytest.mark.integration
def test_ce_alone_runs_no_teacher_while_training_and_frozen_embeddings(tok_models):
    import torch
    from safetensors.torch import load_file

    samples = [{"text": s} for s in sentences()]
    calls = {"n": 0}
    from worker import model_io

    spec = _spec()
    m = model_io.load(tok_models["gpt2"], "hf")
    m.module.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    params = {"layers": 1, "steps": 5, "alpha": 1.0, "batch_size": 4, "freeze_embeddings": True, "lr": 3e-3}
    metrics = spec.handler(m, spec.params.model_validate(params), _Ctx(samples))
    # The teacher ran for its held-out figure only (2 samples: one batch), not for the 5 steps or the probes.
    assert calls["n"] == 1 and metrics["heldout"]["samples"] == 2
    assert metrics["final_loss"] < metrics["initial_loss"]
    teacher = load_file(str(tok_models["gpt2"] / "model.safetensors"))
    trained = m.module.state_dict()
    assert torch.equal(trained["transformer.wte.weight"], teacher["transformer.wte.weight"])
    assert not torch.equal(trained["transformer.h.0.mlp.c_fc.weight"], teacher["transformer.h.0.mlp.c_fc.weight"])
    wte = trained["transformer.wte.weight"].numel()
    assert metrics["trainable_parameters"] == metrics["student_parameters"] - wte
    assert all(p.requires_grad for p in m.module.parameters())  # thawed for whoever uses it next


@pytest.mark.integration
def test_classifier_heldout_accuracy_with_cosine_loss(tok_models):
    rows = [json.loads(line) for line in labeled_jsonl().decode().splitlines()]
    m, _, _ = _run(
        tok_models["bert-cls"],
        {"layers": 1, "steps": 6, "lr": 3e-3, "hidden_loss": "cosine", "holdout": 0.25, "batch_size": 8},
        rows,
    )
    ho = m["heldout"]
    assert ho["metric"] == "accuracy" and ho["samples"] >= 1 and ho["labeled"] == ho["samples"]
    for k in ("teacher", "student_before", "student_after"):
        assert 0.0 <= ho[k] <= 1.0 and ho[k] * ho["samples"] == pytest.approx(round(ho[k] * ho["samples"]))
    # The student's only layer starts as the teacher's layer 0: the aligned states agree at first.
    assert m["hidden"]["pairs"] == [[0, 0]] and m["hidden"]["initial"] == pytest.approx(0.0, abs=1e-5)
