"""Evaluation on a budget (worker/evaluate.py, docs/REPORTS.md): sample and run counts follow
``evaluation.budget_s`` between a minimum and the job's caps, both models run the same texts,
the report says how many ran and why, perplexity and KL carry 95 % intervals, and progress moves
sample by sample. Tiny models in-process; no assertion reads a wall-clock time: where the counts
depend on cost, the evaluator's clock is replaced by one that only forward passes advance."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.tokenizer_util import build_models
from worker import evaluate
from worker.ops import metrics as m

pytestmark = pytest.mark.integration  # whole methods run in-process on real tiny models

SETTINGS = {"enabled": True, "batch_size": 2, "seq_len": 16, "runs": 5, "warmup": 2, "max_samples": 12}


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("budget-models"))


@pytest.fixture(scope="module")
def changed_gpt2(tok_models, tmp_path_factory) -> Path:
    """The tiny GPT-2 with one MLP weight halved: a compressed model that differs."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tok_models["gpt2"])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)
    out = tmp_path_factory.mktemp("changed-gpt2")
    model.save_pretrained(out)
    return out


def _builtin():
    lines = evaluate.BUILTIN_CORPUS.read_text().splitlines()
    return [{"text": t} for t in lines if t.strip()], {"source": "builtin", "id": None}


def _evaluate(
    src: Path, artifact: Path, settings: dict, progress=None, compressed_cost: float = 1.0
) -> tuple[dict, evaluate.Evaluator]:
    from worker import model_io

    ev = evaluate.Evaluator(settings, src, _builtin, *([progress] if progress else []))
    ev.compressed_cost = compressed_cost
    ev.measure_original(model_io.load(src, "hf").module)
    ev.measure_compressed(artifact)
    return ev.sections(), ev


class FakeClock:
    """Time that only forward passes move: each model call costs ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        return self.now

    def tick(self, *_: object) -> None:
        self.now += self.step


@pytest.fixture
def fake_clock(monkeypatch):
    """Installs a FakeClock; every outermost model call (the original, and the artifact as
    transformers loads it; not the inner transformer it calls) advances it."""
    from transformers import PreTrainedModel

    clock = FakeClock(0.125)  # a binary fraction: the budget arithmetic in the tests is exact
    monkeypatch.setattr(evaluate, "_clock", clock)
    real_call = torch.nn.Module.__call__
    depth = [0]

    def call(self, *a, **k):
        if not isinstance(self, PreTrainedModel):
            return real_call(self, *a, **k)
        depth[0] += 1
        try:
            return real_call(self, *a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                clock.tick()

    monkeypatch.setattr(torch.nn.Module, "__call__", call)
    return clock


# -- the math --------------------------------------------------------------------------------------
def test_t_quantiles_and_the_ratio_interval_match_hand_values():
    assert m.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert m.t_quantile(0.975, 3) == pytest.approx(3.1824, abs=1e-4)
    assert m.t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-4)
    assert m.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    # Equal counts: the ratio interval is the plain t-interval of the values.
    r, lo, hi = m.ratio_t_interval([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1])
    sd = math.sqrt(sum((x - 2.5) ** 2 for x in (1, 2, 3, 4)) / 3)
    assert (
        r == 2.5
        and hi - r == pytest.approx(m.t_quantile(0.975, 3) * sd / 2, rel=1e-9)
        and r - lo == pytest.approx(hi - r)
    )
    # Token-weighted: Σ sums / Σ counts, not the mean of per-sample means.
    r, lo, hi = m.ratio_t_interval([10.0, 1.0], [10, 2])
    assert r == pytest.approx(11 / 12) and lo < r < hi
    assert m.ratio_t_interval([1.0], [3]) is None  # one sample: no spread, no interval
    ppl = m.perplexity_interval([20.0, 26.0, 31.0], [10, 12, 15])
    point = m.perplexity(77.0, 37)
    assert ppl[0] < point < ppl[1] and math.log(point) - math.log(ppl[0]) == pytest.approx(
        math.log(ppl[1]) - math.log(point)
    )
    assert m.mean_interval([0.0, 0.0, 0.0], [4, 5, 6], lo=0.0) == [0.0, 0.0]  # an unchanged model: KL exactly 0
    assert m.runs_that_fit(1.0, 0.3, cap=7, minimum=3) == 3 and m.runs_that_fit(10.0, 0.3, cap=7, minimum=3) == 7
    assert m.runs_that_fit(0.0, 0.3, cap=2, minimum=3) == 2  # the cap wins over the minimum


def test_float32_vocabulary_math_matches_float64():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 50_000, generator=g) * 4
    q = p + 0.05 * torch.randn(6, 50_000, generator=g)
    ids = torch.randint(0, 50_000, (6,), generator=g)
    ref_kl = m.kl_per_position(p.double(), q.double())  # float64 in: float64 all the way
    assert m.kl_per_position(p, q).tolist() == pytest.approx(ref_kl.tolist(), rel=1e-4)
    assert torch.equal(m.kl_per_position(p, p), torch.zeros(6, dtype=torch.float64))
    ref_nll = m.next_token_nll_per_position(p.double(), ids)
    assert m.next_token_nll_per_position(p, ids).tolist() == pytest.approx(ref_nll.tolist(), rel=1e-6)
    assert m.cosine_rows(p, q).tolist() == pytest.approx(m.cosine_rows(p.double(), q.double()).tolist(), abs=1e-9)
    bf = p.bfloat16()
    assert m.kl_per_position(bf, bf).abs().max() == 0.0  # bfloat16 logits are upcast, not rejected


# -- the evaluator ----------------------------------------------------------------------------------
def test_a_tight_budget_runs_the_minimum_and_the_report_says_so(tok_models, changed_gpt2):
    s, ev = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 0.001})
    q, f, sp = s["quality"], s["fidelity"], s["speed"]
    assert q["available"] and f["available"] and sp["available"]
    for sec in (q, f):
        assert sec["samples"] == evaluate.MIN_SAMPLES < sec["samples_requested"] == 12
        assert sec["samples_available"] == 12 and sec["limited_by"] == "budget"
        assert "ran anyway" in sec["budget_note"]
        assert sec["budget"]["budget_s"] == 0.001 and sec["budget"]["within_budget"] is False
        assert set(sec["seconds"]) == {"original", "compressed"}
    assert q["dataset"]["samples"] == evaluate.MIN_SAMPLES
    assert sp["runs"] == evaluate.MIN_RUNS < sp["runs_requested"] == 5 and sp["limited_by"] == "budget"
    assert sp["warmup"] == 0 and sp["warmup_requested"] == 2  # a warm-up pass is not a must: the samples ran first
    assert len(sp["original"]["samples_ms"]) == len(sp["compressed"]["samples_ms"]) == evaluate.MIN_RUNS
    assert "ran anyway" in sp["budget_note"]


def test_a_generous_budget_runs_up_to_the_caps(tok_models):
    s, ev = _evaluate(tok_models["gpt2"], tok_models["gpt2"], {**SETTINGS, "budget_s": 3600.0})
    q, f, sp = s["quality"], s["fidelity"], s["speed"]
    assert q["samples"] == f["samples"] == 12 and q["limited_by"] == "max_samples" and q["budget_note"] is None
    assert sp["runs"] == 5 and sp["warmup"] == 2 and sp["limited_by"] == "runs" and sp["budget_note"] is None
    assert q["budget"]["within_budget"] is True
    # Fewer texts than max_samples: every text, and the data is what limited it.
    s, _ = _evaluate(tok_models["gpt2"], tok_models["gpt2"], {**SETTINGS, "max_samples": 2000, "budget_s": 3600.0})
    n = len(_builtin()[0])
    assert s["quality"]["samples"] == n == s["quality"]["samples_available"] and s["quality"]["limited_by"] == "data"


def test_counts_follow_the_measured_cost_of_a_pass(tok_models, changed_gpt2, fake_clock):
    # Every model call costs 0.125 s and nothing else takes time. Budget 2.5 s: samples get half
    # (1.25 s for both models, 0.25 s per text and pair), so 5 texts; each model's latency gets
    # 0.375 s: 3 passes (the minimum; the estimate from the samples' per-token cost rules out a warm-up).
    s, ev = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 2.5})
    q, f, sp = s["quality"], s["fidelity"], s["speed"]
    assert q["samples"] == f["samples"] == 5 and q["limited_by"] == "budget" and q["budget_note"] is None
    assert q["seconds"] == {"original": 0.625, "compressed": 0.625}
    assert sp["runs"] == 3 and sp["warmup"] == 0
    # Twice the budget: twice the texts (the pair cost is fixed), more timed runs, up to the cap.
    s, _ = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 5.0})
    assert s["quality"]["samples"] == 10 and s["speed"]["runs"] == 5
    assert s["quality"]["budget"]["seconds"] <= 5.0 and s["quality"]["budget"]["within_budget"] is True


def test_both_models_run_the_same_samples(tok_models, changed_gpt2):
    s, ev = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 0.001})
    o, c = ev.original, ev.compressed
    assert o.samples == c.samples == ev.n_samples == s["quality"]["samples"] == s["fidelity"]["samples"]
    assert o.tokens == c.tokens and len(o.nll) == len(c.nll) == len(c.kl) == len(c.positions) == ev.n_samples
    assert s["fidelity"]["tokens"] == sum(c.positions)
    # The original's outputs were compared once and let go: nothing is kept for the report.
    assert all(x is None for x in o.outputs)


def test_intervals_bracket_the_point_estimates(tok_models, changed_gpt2):
    s, _ = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 3600.0})
    q, f = s["quality"], s["fidelity"]
    assert q["metric"] == "perplexity" and "t-interval" in q["ci_method"] and "exp" in q["ci_method"]
    for key in ("original", "compressed", "ratio"):
        lo, hi = q["ci95"][key]
        assert lo < q[key] < hi, key
    assert q["ratio"] == pytest.approx(q["compressed"] / q["original"], rel=1e-5)
    assert "t-interval" in f["ci_method"]
    for key in ("kl_mean", "top1_agreement", "output_cosine"):
        lo, hi = f["ci95"][key]
        assert lo <= f[key] <= hi, key
    assert f["kl_mean"] > 0 and f["ci95"]["kl_mean"][0] >= 0.0 and f["ci95"]["top1_agreement"][1] <= 1.0
    # Unchanged: KL exactly 0 and its interval too; the perplexity ratio is exactly 1.
    s, _ = _evaluate(tok_models["gpt2"], tok_models["gpt2"], {**SETTINGS, "budget_s": 3600.0})
    assert s["fidelity"]["kl_mean"] == 0.0 and s["fidelity"]["ci95"]["kl_mean"] == [0.0, 0.0]
    assert s["quality"]["ratio"] == 1.0 and s["quality"]["ci95"]["ratio"] == [1.0, 1.0]


def test_one_sample_has_no_interval_and_says_why(tok_models):
    s, _ = _evaluate(tok_models["gpt2"], tok_models["gpt2"], {**SETTINGS, "max_samples": 1, "budget_s": 0.001})
    q, f = s["quality"], s["fidelity"]
    assert q["samples"] == 1 and q["limited_by"] == "max_samples"  # the cap is below the minimum: the cap wins
    assert q["ci95"] == {"original": None, "compressed": None, "ratio": None} and "fewer than 2" in q["ci_reason"]
    assert f["ci95"]["kl_mean"] is None


def test_progress_moves_sample_by_sample(tok_models, changed_gpt2):
    seen: list[tuple[str, float | None]] = []
    s, ev = _evaluate(
        tok_models["gpt2"],
        changed_gpt2,
        {**SETTINGS, "budget_s": 0.001},
        progress=lambda note, fraction=None: seen.append((note, fraction)),
    )
    n = ev.n_samples
    for which in ("original", "compressed"):
        notes = [(t, x) for t, x in seen if t.startswith(f"evaluating {which} model")]
        fractions = [x for _, x in notes]
        assert all(x is not None and 0.0 <= x <= 1.0 for x in fractions)
        assert fractions == sorted(fractions), which  # within a stage, progress only moves forward
        assert fractions[-1] > fractions[0]
        samples = [t for t, _ in notes if ": sample " in t]
        assert samples[-1] == f"evaluating {which} model: sample {n}/{n}" and len(samples) == n
        assert any(": latency run 3/3" in t for t, _ in notes)
    assert seen[0][0] == "evaluating original model: preparing the inputs"
    assert any(t == "evaluating compressed model: loading the artifact" for t, _ in seen)


def test_random_ids_follow_the_budget_too(tok_models, tmp_path_factory):
    """Without a tokenizer, fidelity runs on seeded random rows: the same minimum and counts."""
    import shutil

    bare = tmp_path_factory.mktemp("no-tokenizer")
    for p in tok_models["gpt2"].iterdir():
        if p.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(p, bare / p.name)
    s, ev = _evaluate(bare, bare, {**SETTINGS, "budget_s": 0.001})
    f = s["fidelity"]
    assert f["inputs"] == "random_token_ids" and f["samples"] == evaluate.MIN_SAMPLES and f["samples_available"] == 8
    assert f["kl_mean"] == 0.0 and s["quality"]["available"] is False


def test_a_slower_compressed_model_stops_at_the_samples_share(tok_models, changed_gpt2, fake_clock, monkeypatch):
    """The original plans its texts estimating the compressed model at its own cost per pass; a
    compressed model three times slower (as a 4-bit artifact in transformers is: it re-quantizes
    its weights on every pass) stops once the samples' share is spent, and both models report
    the texts both ran."""
    from transformers import PreTrainedModel

    patched = torch.nn.Module.__call__  # the fake clock's: one tick per outermost model call
    slow = str(changed_gpt2)
    depth = [0]

    def call(self, *a, **k):
        if not isinstance(self, PreTrainedModel):
            return patched(self, *a, **k)
        depth[0] += 1
        try:
            return patched(self, *a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0 and self.config._name_or_path == slow:
                fake_clock.tick()
                fake_clock.tick()

    monkeypatch.setattr(torch.nn.Module, "__call__", call)
    # Budget 5 s: samples 2.5 s for both models. The original plans 10 texts (0.25 s a pair as
    # estimated) and spends 1.25 s; the compressed model's texts cost 0.375 s: 3 of them fit in
    # the 1.25 s left, and the minimum of 4 runs anyway.
    s, ev = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 5.0})
    q, f = s["quality"], s["fidelity"]
    assert ev.original.samples == ev.compressed.samples == ev.n_samples == evaluate.MIN_SAMPLES
    assert q["samples"] == f["samples"] == evaluate.MIN_SAMPLES and q["limited_by"] == "budget"
    assert len(ev.original.nll) == len(ev.compressed.nll) == len(ev.compressed.kl) == evaluate.MIN_SAMPLES
    assert q["dataset"]["samples"] == evaluate.MIN_SAMPLES
    assert q["seconds"] == {"original": 1.25, "compressed": 1.5}
    # Twice the budget: 20 texts planned, 12 (the cap) run in 1.5 s; 3.5 s are left of the 5 s
    # share, 9 compressed texts (3.375 s): both report 9.
    s, ev = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 10.0})
    assert s["quality"]["samples"] == ev.original.samples == ev.compressed.samples == 9
    # The original's 3 texts the compressed model did not run were spent all the same: counted.
    assert s["quality"]["budget_note"] is None and s["quality"]["seconds"] == {"original": 1.5, "compressed": 3.375}
    # Told the compressed model's passes cost 3x (the pipeline says 2x for a quantized result),
    # the original plans what both can run: 0.5 s a pair, 10 texts in the 5 s share, none wasted;
    # and timed passes for both in the latency share (3 s: 0.125 + 0.375 a pair, 6 runs, cap 5).
    s, ev = _evaluate(tok_models["gpt2"], changed_gpt2, {**SETTINGS, "budget_s": 10.0}, compressed_cost=3.0)
    assert s["quality"]["samples"] == ev.original.samples == ev.compressed.samples == 10
    assert s["quality"]["seconds"] == {"original": 1.25, "compressed": 3.75}
    assert s["speed"]["runs"] == 5 and s["speed"]["seconds"]["compressed"] == 5 * 0.375


def test_plain_tokenizer_gives_autotokenizer_ids(tok_models, tmp_path):
    from transformers import AutoTokenizer

    texts = [t["text"] for t in _builtin()[0]]
    src = tok_models["gpt2"]
    plain = evaluate._plain_tokenizer(src)
    assert plain is not None
    auto = AutoTokenizer.from_pretrained(src)
    for text in texts:
        for max_length in (4, 16, 128):
            a = auto(text, truncation=True, max_length=max_length, return_tensors="pt")
            b = plain(text, truncation=True, max_length=max_length, return_tensors="pt")
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), (text, max_length)
    # A setting that changes how transformers encodes (or a model-specific class): AutoTokenizer.
    for extra in ({"add_bos_token": True}, {"tokenizer_class": "LlamaTokenizer"}, {"tokenizer_class": None}):
        other = tmp_path / f"tok-{len(list(tmp_path.iterdir()))}"
        other.mkdir()
        shutil.copy(src / "tokenizer.json", other / "tokenizer.json")
        cfg = json.loads((src / "tokenizer_config.json").read_text())
        (other / "tokenizer_config.json").write_text(json.dumps({**cfg, **extra}))
        assert evaluate._plain_tokenizer(other) is None
    bare = tmp_path / "no-config"
    bare.mkdir()
    shutil.copy(src / "tokenizer.json", bare / "tokenizer.json")
    assert evaluate._plain_tokenizer(bare) is None  # AutoTokenizer would pick a class from config.json
