"""``distill``: the loss against hand-computed values, the handler in-process on tiny models, and
the method end to end through the API (upload model + tokenizer, upload dataset, job, artifact
loaded with plain transformers)."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import pytest

from tests.helpers import upload_dir, wait_job
from tests.tokenizer_util import build_models, labeled_jsonl, sentences, txt_dataset, vocab

# --------------------------------------------------------------------------- the loss, by hand


def _softmax(xs: list[float], t: float) -> list[float]:
    m = max(x / t for x in xs)
    e = [math.exp(x / t - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def _kl(teacher: list[float], student: list[float], t: float) -> float:
    """KL(p_t ‖ p_s) = Σ_v p_t(v) · (log p_t(v) − log p_s(v))."""
    pt, ps = _softmax(teacher, t), _softmax(student, t)
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))


def _ce(logits: list[float], target: int) -> float:
    return -math.log(_softmax(logits, 1.0)[target])


# batch 2, length 3, vocab 4; the second sample's last position is padding.
S = [
    [[0.2, -1.0, 0.5, 1.5], [1.0, 0.0, -0.5, 0.3], [0.1, 0.2, 0.3, 0.4]],
    [[-0.3, 0.8, 0.0, 0.1], [2.0, -2.0, 0.5, 0.0], [9.0, -9.0, 9.0, -9.0]],
]
T = [
    [[1.0, 0.0, 0.2, 0.4], [0.0, 1.0, 0.0, -1.0], [0.5, 0.5, -0.5, 0.0]],
    [[0.3, 0.3, 1.2, -0.4], [1.5, -1.0, 0.0, 0.2], [-7.0, 7.0, -7.0, 7.0]],
]
IDS = [[1, 3, 2], [0, 2, 0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _hand_causal(alpha: float, temp: float) -> tuple[float, float, float]:
    real = [(b, i) for b in range(2) for i in range(3) if MASK[b][i]]
    kl = sum(_kl(T[b][i], S[b][i], temp) for b, i in real) / len(real)  # batchmean over 5 real positions
    # position i predicts token i+1, unless token i+1 is padding
    targets = [(b, i) for b in range(2) for i in range(2) if MASK[b][i + 1]]
    ce = sum(_ce(S[b][i], IDS[b][i + 1]) for b, i in targets) / len(targets)
    return alpha * ce + (1 - alpha) * temp**2 * kl, ce, kl


@pytest.mark.unit
@pytest.mark.parametrize(("alpha", "temp"), [(0.5, 2.0), (1.0, 2.0), (0.0, 2.0), (0.3, 1.0), (0.0, 4.0)])
def test_causal_loss_matches_hand_computation(alpha, temp):
    import torch

    from worker.ops import distill as ops

    s, t = torch.tensor(S), torch.tensor(T)
    got = ops.causal_lm_loss(s, t, torch.tensor(IDS), torch.tensor(MASK), alpha, temp)
    want, ce, kl = _hand_causal(alpha, temp)
    assert float(got.total) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(got.ce) == pytest.approx(ce, rel=1e-5)
    assert float(got.kl) == pytest.approx(kl, rel=1e-5)
    if alpha == 1.0:  # pure CE
        assert float(got.total) == pytest.approx(ce, rel=1e-5)
    if alpha == 0.0:  # pure T²·KL
        assert float(got.total) == pytest.approx(temp**2 * kl, rel=1e-5)


@pytest.mark.unit
def test_padding_is_masked_out_of_both_terms():
    import torch

    from worker.ops import distill as ops

    base = ops.causal_lm_loss(torch.tensor(S), torch.tensor(T), torch.tensor(IDS), torch.tensor(MASK), 0.5, 2.0)
    # Change everything at the padded position: logits of both models and the padded id.
    s2, t2, ids2 = torch.tensor(S), torch.tensor(T), torch.tensor(IDS)
    s2[1, 2] = torch.tensor([-50.0, 50.0, 3.0, 0.0])
    t2[1, 2] = torch.tensor([50.0, -50.0, 0.0, 3.0])
    ids2[1, 2] = 3
    moved = ops.causal_lm_loss(s2, t2, ids2, torch.tensor(MASK), 0.5, 2.0)
    assert float(moved.total) == pytest.approx(float(base.total), rel=1e-6)
    # Without the mask the padded position counts (the test can tell the difference).
    unmasked = ops.causal_lm_loss(s2, t2, ids2, None, 0.5, 2.0)
    assert abs(float(unmasked.total) - float(base.total)) > 1.0


@pytest.mark.unit
def test_classifier_loss_matches_hand_computation():
    import torch

    from worker.ops import distill as ops

    s = [[0.5, -0.2, 1.0], [2.0, 0.1, -1.0], [0.0, 0.0, 0.3]]
    t = [[1.0, 0.0, 0.0], [0.4, 0.4, 0.9], [-1.0, 2.0, 0.0]]
    labels = [2, 0, 1]
    for alpha, temp in ((0.5, 2.0), (1.0, 3.0), (0.0, 3.0)):
        got = ops.classifier_loss(torch.tensor(s), torch.tensor(t), torch.tensor(labels), alpha, temp)
        kl = sum(_kl(t[i], s[i], temp) for i in range(3)) / 3
        ce = sum(_ce(s[i], labels[i]) for i in range(3)) / 3
        assert float(got.total) == pytest.approx(alpha * ce + (1 - alpha) * temp**2 * kl, rel=1e-5)


@pytest.mark.unit
def test_zero_kl_when_student_equals_teacher():
    import torch

    from worker.ops import distill as ops

    x = torch.tensor(S)
    got = ops.causal_lm_loss(x, x.clone(), torch.tensor(IDS), torch.tensor(MASK), 0.0, 2.0)
    assert float(got.total) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- params and checks


def _spec():
    from worker.methods import load_all

    return load_all()["distill"]


@pytest.mark.unit
def test_params_exactly_one_student_and_steps_or_epochs():
    from pydantic import ValidationError

    P = _spec().params
    assert P.model_validate({"layers": 1}).steps == 100  # the default
    assert P.model_validate({"layers": 1, "epochs": 2}).steps is None
    p = P.model_validate({"layers": 1})
    assert (p.alpha, p.temperature, p.lr, p.batch_size, p.max_length, p.seed) == (0.5, 2.0, 5e-5, 8, 128, 0)
    for bad in (
        {},
        {"layers": 1, "student_config": {"num_hidden_layers": 1}},
        {"layers": 1, "student_model_id": "x"},
        {"layers": 1, "steps": 5, "epochs": 1},
        {"layers": 1, "alpha": 1.5},
        {"layers": 1, "temperature": 0},
        {"layers": 1, "bogus": 1},
        {"student_config": {"vocab_size": 10}},
    ):
        with pytest.raises(ValidationError):
            P.model_validate(bad)


@pytest.mark.unit
def test_evenly_spaced_layers():
    from core.methods.distill import evenly_spaced

    assert evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]
    assert evenly_spaced(6, 3) == [0, 2, 5]
    assert evenly_spaced(2, 1) == [0]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]


@pytest.mark.unit
def test_submit_checks():
    from core.methods import ModelInfo

    spec = _spec()
    P = spec.params
    tok = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    gpt2 = ModelInfo("hf", "GPT2LMHeadModel", {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": None}, tok)
    spec.check(P.model_validate({"layers": 1}), gpt2)
    spec.check(P.model_validate({"student_config": {"num_hidden_layers": 1, "n_embd": 16}}), gpt2)
    refused = [
        (P.model_validate({"layers": 2}), gpt2, "below"),
        (P.model_validate({"student_config": {"n_embd": 64}}), gpt2, "larger"),
        (P.model_validate({"student_config": {"no_such_field": 1}}), gpt2, "not a field"),
        (P.model_validate({"layers": 1}), ModelInfo("hf", "BertModel", {"num_hidden_layers": 2}, tok), "head"),
        (
            P.model_validate({"layers": 1}),
            ModelInfo("hf", "GPT2LMHeadModel", {"n_layer": 2}, ("config.json", "model.safetensors")),
            "tokenizer",
        ),
        (
            P.model_validate({"layers": 1}),
            ModelInfo(
                "hf", "BertForSequenceClassification", {"num_hidden_layers": 2, "problem_type": "regression"}, tok
            ),
            "regression",
        ),
    ]
    for params, info, why in refused:
        with pytest.raises(ValueError, match=why):
            spec.check(params, info)


# --------------------------------------------------------------------------- in-process training


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("tokmodels"))


class _Ctx:
    """What the handler uses of worker.pipeline.JobContext."""

    def __init__(self, samples, models: dict[str, Path] | None = None) -> None:
        self._samples = samples
        self.models = models or {}
        self.notes: list[tuple[str, float]] = []

    def samples(self, which: str = "train"):
        return self._samples

    def step_progress(self, note: str, fraction: float) -> None:
        self.notes.append((note, fraction))

    def cancel_requested(self) -> bool:
        return False

    def load_model(self, model_id: str):
        from worker import model_io

        return model_io.load(self.models[model_id], "hf")


def _batch(tok, texts):
    import torch

    enc = [tok(t)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.zeros((len(enc), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


@pytest.mark.integration
def test_a_few_steps_lower_the_loss(tok_models):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from worker import model_io
    from worker.ops import distill as ops

    teacher = GPT2LMHeadModel.from_pretrained(tok_models["gpt2"]).eval()
    tok = AutoTokenizer.from_pretrained(tok_models["gpt2"])
    ids, mask = _batch(tok, sentences())
    # The student DistilBERT-style, built here independently: the teacher's config with one layer,
    # teacher layer 0 and everything outside the layer stack copied.
    cfg = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "n_layer": 1})
    manual = GPT2LMHeadModel(cfg).eval()
    missing = manual.load_state_dict(
        {k: v for k, v in teacher.state_dict().items() if not k.startswith("transformer.h.1.")}, strict=False
    )
    assert not missing.missing_keys

    def loss(student) -> float:
        with torch.no_grad():
            t, s = (
                teacher(input_ids=ids, attention_mask=mask).logits,
                student(input_ids=ids, attention_mask=mask).logits,
            )
        return float(ops.causal_lm_loss(s, t, ids, mask, 0.5, 2.0).total)

    before = loss(manual)
    loaded = model_io.load(tok_models["gpt2"], "hf")
    # batch_size >= the 20 samples: the handler's probe batch is the whole dataset, like ours.
    params = _spec().params.model_validate({"layers": 1, "steps": 25, "lr": 3e-3, "batch_size": 32, "holdout": 0})
    ctx = _Ctx([{"text": s} for s in sentences()])
    metrics = _spec().handler(loaded, params, ctx)
    after = loss(loaded.module.eval())

    assert metrics["initial_loss"] == pytest.approx(before, rel=1e-4)
    assert metrics["final_loss"] == pytest.approx(after, rel=1e-4)
    assert after < before * 0.95, (before, after)
    assert loaded.module.config.n_layer == 1 and len(loaded.module.transformer.h) == 1
    assert metrics["steps"] == 25 and metrics["layers"] == {"teacher": 2, "student": 1, "from_teacher_layers": [0]}
    assert metrics["student_parameters"] == sum(p.numel() for p in loaded.module.parameters())
    assert metrics["teacher_parameters"] == sum(p.numel() for p in teacher.parameters())
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    # Progress: "step i/N loss x", at most every 0.5 s, and the last step always.
    assert ctx.notes and ctx.notes[-1][0].startswith("step 25/25 loss ") and ctx.notes[-1][1] == 1.0
    assert len(ctx.notes) <= 25


@pytest.mark.integration
def test_student_config_and_llama(tok_models):
    from worker import model_io

    spec = _spec()
    samples = [{"text": s} for s in sentences()]
    m = model_io.load(tok_models["llama"], "hf")
    p = spec.params.model_validate(
        {"student_config": {"num_hidden_layers": 1, "intermediate_size": 16}, "steps": 15, "lr": 3e-3, "batch_size": 32}
    )
    metrics = spec.handler(m, p, _Ctx(samples))
    cfg = m.module.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size) == (1, 16)
    assert m.module.model.layers[0].mlp.up_proj.weight.shape == (16, 32)
    # Attention and embeddings come from the teacher; the narrower MLP cannot.
    assert 0.3 < metrics["initialised_from_teacher"] < 1.0
    assert metrics["final_loss"] < metrics["initial_loss"]


@pytest.mark.integration
def test_classifier_and_unlabeled_data(tok_models):
    from worker import model_io

    spec = _spec()
    rows = [json.loads(line) for line in labeled_jsonl().decode().splitlines()]
    m = model_io.load(tok_models["bert-cls"], "hf")
    metrics = spec.handler(
        m, spec.params.model_validate({"layers": 1, "steps": 15, "lr": 3e-3, "batch_size": 32}), _Ctx(rows)
    )
    assert metrics["label_map"] == {"neg": 0, "pos": 1}
    assert m.module.config.num_hidden_layers == 1 and metrics["head"] == "sequence_classification"
    assert metrics["final_loss"] < metrics["initial_loss"]

    m = model_io.load(tok_models["bert-cls"], "hf")
    with pytest.raises(ValueError, match="labeled dataset"):
        spec.handler(m, spec.params.model_validate({"layers": 1, "steps": 2}), _Ctx([{"text": s} for s in sentences()]))


@pytest.mark.integration
def test_student_model(tok_models):
    import torch
    from safetensors.torch import load_file

    from worker import model_io

    spec = _spec()
    m = model_io.load(tok_models["gpt2"], "hf")
    ctx = _Ctx([{"text": s} for s in sentences()], {"s1": tok_models["gpt2-1layer"]})
    metrics = spec.handler(m, spec.params.model_validate({"student_model_id": "s1", "steps": 10, "lr": 3e-3}), ctx)
    assert metrics["student"] == "student_model_id" and m.module.config.n_layer == 1
    original = load_file(str(tok_models["gpt2-1layer"] / "model.safetensors"))
    trained = m.module.state_dict()
    assert not torch.equal(original["transformer.h.0.mlp.c_fc.weight"], trained["transformer.h.0.mlp.c_fc.weight"])


# --------------------------------------------------------------------------- through the API


def _upload_dataset(c, name: str, data: bytes) -> dict:
    r = c.post("/v1/datasets", files={"file": (name, data)})
    assert r.status_code == 201, r.text
    return r.json()


def _artifact(c, job: dict, dest: Path) -> Path:
    dl = c.get(f"/v1/jobs/{job['id']}/artifact")
    assert dl.status_code == 200
    zipfile.ZipFile(io.BytesIO(dl.content)).extractall(dest)
    return dest


def _finite_logits(model, tok) -> None:
    import torch

    enc = tok(["the cat sat on the mat", "a dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert torch.isfinite(logits).all()


@pytest.mark.integration
def test_distill_gpt2_end_to_end(stack, tok_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = stack.client()
    m = upload_dir(c, tok_models["gpt2"]).json()
    ds = _upload_dataset(c, "corpus.txt", txt_dataset())
    r = c.post(
        "/v1/jobs",
        json={
            "model_id": m["id"],
            "dataset_id": ds["id"],
            "steps": [{"method": "distill", "params": {"layers": 1, "steps": 20}}],
        },
    )
    assert r.status_code == 202, r.text
    assert r.json()["steps"][0]["params"]["alpha"] == 0.5  # defaults are filled in
    job = wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded", job
    step = job["metrics"]["steps"][0]
    assert step["steps"] == 20 and step["layers"]["student"] == 1 and step["layers"]["teacher"] == 2
    assert step["student_parameters"] < step["teacher_parameters"]
    assert math.isfinite(step["initial_loss"]) and math.isfinite(step["final_loss"])

    out = _artifact(c, job, tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and len(model.transformer.h) == 1
    assert sum(p.numel() for p in model.parameters()) == step["student_parameters"]
    tok = AutoTokenizer.from_pretrained(out)  # the teacher's tokenizer travels with the student
    assert len(tok) == len(vocab())
    _finite_logits(model, tok)


@pytest.mark.integration
def test_distill_bert_classifier_on_labeled_jsonl(cluster, tok_models, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    c = cluster.client()
    m = upload_dir(c, tok_models["bert-cls"]).json()
    ds = _upload_dataset(c, "sentiment.jsonl", labeled_jsonl())
    assert ds["labeled"] is True and ds["labels"] == ["neg", "pos"]
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={
                "model_id": m["id"],
                "dataset_id": ds["id"],
                "steps": [{"method": "distill", "params": {"layers": 1, "steps": 10, "batch_size": 4}}],
            },
        ).json()["id"],
    )
    assert job["status"] == "succeeded", job
    assert job["metrics"]["steps"][0]["label_map"] == {"neg": 0, "pos": 1}
    out = _artifact(c, job, tmp_path / "cls")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.num_labels == 2
    _finite_logits(model, AutoTokenizer.from_pretrained(out))

    # The same classifier on unlabeled text fails the job, saying why.
    txt = _upload_dataset(c, "plain.txt", txt_dataset())
    bad = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={
                "model_id": m["id"],
                "dataset_id": txt["id"],
                "steps": [{"method": "distill", "params": {"layers": 1, "steps": 2}}],
            },
        ).json()["id"],
    )
    assert bad["status"] == "failed" and bad["error"]["code"] == "method_failed"
    assert "labeled dataset" in bad["error"]["message"]


@pytest.mark.integration
def test_distill_is_refused_at_submit(cluster, tok_models, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    c = cluster.client()
    gpt2 = upload_dir(c, tok_models["gpt2"]).json()
    bare = upload_dir(c, tok_models["bert-bare"]).json()
    ds = _upload_dataset(c, "corpus.txt", txt_dataset())
    # A GPT-2 without tokenizer files.
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(vocab()), n_positions=64)
    ).save_pretrained(tmp_path / "notok")
    notok = upload_dir(c, tmp_path / "notok").json()
    layers1 = {"method": "distill", "params": {"layers": 1, "steps": 2}}
    cases = [
        ({"model_id": gpt2["id"], "steps": [layers1]}, ["body", "dataset_id"], "dataset_id"),
        (
            {"model_id": bare["id"], "dataset_id": ds["id"], "steps": [layers1]},
            ["body", "steps", 0, "params"],
            "BertModel has no such head",
        ),
        (
            {"model_id": notok["id"], "dataset_id": ds["id"], "steps": [layers1]},
            ["body", "steps", 0, "params"],
            "tokenizer",
        ),
        (
            {
                "model_id": gpt2["id"],
                "dataset_id": ds["id"],
                "steps": [{"method": "distill", "params": {"layers": 1, "student_config": {"n_layer": 1}}}],
            },
            ["body", "steps", 0, "params"],
            "exactly one",
        ),
        (
            {"model_id": gpt2["id"], "dataset_id": ds["id"], "steps": [{"method": "distill", "params": {"layers": 2}}]},
            ["body", "steps", 0, "params"],
            "below",
        ),
    ]
    for body, loc, words in cases:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        errs = r.json()["errors"]
        assert any(e["loc"] == loc and words in e["msg"] for e in errs), (loc, words, errs)


@pytest.mark.integration
def test_distill_then_prune_carries_both(cluster, tok_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    c = cluster.client()
    m = upload_dir(c, tok_models["gpt2"]).json()
    ds = _upload_dataset(c, "corpus.txt", txt_dataset())
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={
                "model_id": m["id"],
                "dataset_id": ds["id"],
                "steps": [
                    {"method": "distill", "params": {"layers": 1, "steps": 10}},
                    {"method": "prune.magnitude", "params": {"sparsity": 0.5}},
                ],
            },
        ).json()["id"],
    )
    assert job["status"] == "succeeded", {k: v for k, v in job.items() if "err" in k or "fail" in k}
    model = AutoModelForCausalLM.from_pretrained(_artifact(c, job, tmp_path / "chain"))
    assert model.config.num_hidden_layers == 1
    total = zeros = 0
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and mod is not model.get_output_embeddings():
            total += mod.weight.numel()
            zeros += int((mod.weight == 0).sum())
    assert zeros / total == pytest.approx(0.5, abs=0.005)
    assert job["metrics"]["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.005)


@pytest.mark.integration
def test_distill_into_an_uploaded_student(cluster, tok_models, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tokenizer_util import save_with_tokenizer

    a, b = cluster.client(), cluster.client(cluster.other_key)
    teacher = upload_dir(a, tok_models["gpt2"]).json()
    student = upload_dir(a, tok_models["gpt2-1layer"]).json()
    ds = _upload_dataset(a, "corpus.txt", txt_dataset())

    def submit(client, student_id):
        return client.post(
            "/v1/jobs",
            json={
                "model_id": teacher["id"],
                "dataset_id": ds["id"],
                "steps": [{"method": "distill", "params": {"student_model_id": student_id, "steps": 10, "lr": 1e-3}}],
            },
        )

    job = wait_job(a, submit(a, student["id"]).json()["id"])
    assert job["status"] == "succeeded", job
    out = _artifact(a, job, tmp_path / "s")
    trained = load_file(str(out / "model.safetensors"))
    original = load_file(str(tok_models["gpt2-1layer"] / "model.safetensors"))
    assert set(trained) == set(original)
    assert not torch.equal(
        trained["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.weight"]
    )

    # Another tenant's student answers like a missing one.
    other = upload_dir(b, tok_models["gpt2-1layer"]).json()
    for sid in (other["id"], "0" * 36):
        r = submit(a, sid)
        assert r.status_code == 422 and r.json()["code"] == "unknown_model", r.text
        assert r.json()["errors"][0]["loc"] == ["body", "steps", 0, "params", "student_model_id"]
    # A student with another vocabulary, or the same size but another tokenizer, is refused.
    torch.manual_seed(1)
    bigger = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(vocab()) + 5, n_positions=64))
    bigger.save_pretrained(tmp_path / "bigger")
    save_with_tokenizer(
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(vocab()), n_positions=64)),
        tmp_path / "othertok",
    )
    spec = json.loads((tmp_path / "othertok" / "tokenizer.json").read_text())
    words = spec["model"]["vocab"]
    first, second = "cat", "dog"
    words[first], words[second] = words[second], words[first]  # same size, other mapping
    (tmp_path / "othertok" / "tokenizer.json").write_text(json.dumps(spec))
    for path in (tmp_path / "bigger", tmp_path / "othertok"):
        sid = upload_dir(a, path).json()["id"]
        r = submit(a, sid)
        assert r.status_code == 422 and r.json()["code"] == "tokenizer_mismatch", r.text
