"""What a job changed, measured: size, speed, quality and fidelity of the original next to the
compressed model, in the same worker process, one after the other (docs/REPORTS.md).

The pipeline calls, in order::

    ev = Evaluator(settings, src_dir, texts_source)       # after the original loads
    ev.measure_original(module)                            # before any step touches it
    ...steps, save...
    ev.measure_compressed(artifact_dir)                    # the artifact as transformers loads it
    report_sections = ev.sections()

Every section is ``{"available": true, ...}`` or ``{"available": false, "reason": "..."}``: a metric
that cannot be computed for a model says why, and an error while measuring never fails the job
(it becomes the section's reason). Math lives in worker/ops/metrics.py.
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker import model_io
from worker.ops import metrics as m

log = logging.getLogger("modelpress.worker")

BUILTIN_CORPUS = Path(__file__).with_name("data") / "eval_en.txt"
_clock = time.perf_counter  # every budget decision reads this clock (tests replace it)
SEED = 1234


class Unavailable(Exception):
    """A metric that cannot be computed for this model; the message is the report's reason."""


def _unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def _round(x: float | None, digits: int = 8) -> float | None:
    return None if x is None else round(float(x), digits)


def _tensor_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's header entry in the ``*.safetensors`` files of a directory (headers only;
    the files were written by us or validated at upload)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            entries.update((k, v) for k, v in json.loads(f.read(n)).items() if k != "__metadata__")
    return entries


def tensor_bytes(directory: Path) -> int:
    """Bytes of tensor data in every ``*.safetensors`` file of a directory (headers excluded)."""
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for v in _tensor_entries(directory).values())


# Parameters compressed-tensors attaches to quantized layers: storage overhead, not model weights
# (their bytes still count in the artifact's bytes and bits per weight).
QUANT_PARAM_SUFFIXES = ("_scale", "_zero_point", "_g_idx", "_global_scale")


def parameter_counts(module: torch.nn.Module | None, state: dict[str, torch.Tensor] | None) -> dict[str, int]:
    """Total and non-zero model parameters (tied tensors once, quantization scales excluded)."""
    if module is not None and model_io.is_offloaded(module):
        # Weights on disk: each read is a fresh copy, so ties are told by name (model_io).
        total = nonzero = 0
        for name, t in model_io.unique_tensors(module, buffers=False):
            if not name.endswith(QUANT_PARAM_SUFFIXES):
                total += t.numel()
                nonzero += int(torch.count_nonzero(t))
        return {"total": total, "nonzero": nonzero}
    if module is not None:
        tensors = [t for name, t in module.named_parameters() if not name.endswith(QUANT_PARAM_SUFFIXES)]
    else:
        tensors = list((state or {}).values())
    seen: set[int] = set()
    total = nonzero = 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return {"total": total, "nonzero": nonzero}


def model_kind(module: torch.nn.Module) -> str:
    """``causal_lm`` | ``classifier`` | ``lm_logits`` (e.g. masked LM) | ``base`` (hidden states)."""
    name = type(module).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "classifier"
    if name.endswith(("ForMaskedLM", "ForTokenClassification")):
        return "lm_logits"
    return "base"


STREAMED_SPEED_REASON = (
    "the model is too large for this worker to hold twice, so both models ran with their weights on disk, onloaded "
    "one module at a time: a pass that reads every weight from disk measures the disk, not the model, so no "
    "latency is reported"
)


def _load_offloaded_artifact(artifact_dir: Path, offload_dir: Path) -> torch.nn.Module:
    """The artifact as transformers loads it, every weight on disk (compressed-tensors' disk
    offload, as model_io.load does for the original): the folder links to the artifact's files,
    and its first pass decompresses the quantized layers into it, one at a time."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(artifact_dir, trust_remote_code=False)
    cls = model_io.model_class(config)
    offload_dir.mkdir(parents=True, exist_ok=True)
    with load_offloaded_model(cls):
        module = cls.from_pretrained(
            artifact_dir,
            trust_remote_code=False,
            use_safetensors=True,
            dtype="auto",
            device_map="auto_offload",
            max_memory={"cpu": 1},
            offload_folder=str(offload_dir),
        )
    return module.eval()


# -- the budget (docs/REPORTS.md, "Evaluation on a budget") ------------------------------------------
# ``budget_s`` covers both models' measurements, from the original's first pass to the compressed
# model's last, loading the artifact included. It is split before anything runs:
RESERVE_SHARE = 0.2  # loading the artifact and its first forward (compressed-tensors decompresses there)
LATENCY_SHARE = 0.3  # timed passes of both models, warm-up included (half each)
# ...and the rest (0.5) goes to quality and fidelity samples of both models, which run the same texts.
MIN_SAMPLES = 4  # fewest texts a perplexity / KL figure and its interval come from, budget or not
MIN_RUNS = 3  # fewest timed passes a median comes from
MIN_WARMUP = 1  # untimed passes before timing, when no sample pass has warmed the model up
FIDELITY_MATH = 3.0  # the compressed model's per-sample math (NLL, KL, cosine) ~ this many NLLs
# A quantized artifact's forward pass against the original's (Evaluator.compressed_cost, set by
# the pipeline when a step quantizes): transformers runs compressed-tensors' weights decompressed
# and re-quantizes them on every pass. 128-token passes of Gemma 3 270M (4-bit) on the
# development machine: 258 vs 127 ms idle; at load average 4-8 the medians swung between 0.15
# and 10.5 s, the compressed model's the slower in 9 of 14 runs.
QUANTIZED_FORWARD_COST = 2.0


# tokenizer_config.json keys that make transformers encode differently from tokenizer.json alone
# (it rewrites the post-processor, the normalizer or the returned fields).
_ENCODING_KEYS = (
    "add_bos_token",
    "add_eos_token",
    "add_prefix_space",
    "do_lower_case",
    "legacy",
    "model_input_names",
    "clean_up_tokenization_spaces_on_encode",
    "auto_map",
)
# transformers 5's generic class: it encodes with tokenizer.json's pipeline unchanged and returns
# input_ids and attention_mask. Model-specific classes may build their own pipeline, and without a
# tokenizer_class (or a tokenizer_config.json) AutoTokenizer picks one from the model's type.
_PLAIN_CLASSES = ("TokenizersBackend",)


class _PlainTokenizer:
    """``tokenizer.json`` run by the ``tokenizers`` library directly, for uploads whose
    ``tokenizer_config.json`` asks for nothing else. transformers' AutoTokenizer gives the same ids
    (tests/test_eval_budget.py checks) but parses the file several times and deep-copies the
    Rust tokenizer: 3.5 s against 1.0 s for Gemma 3's 32 MB tokenizer.json on the development
    machine, paid by every job before anything is measured."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_padding()

    def __call__(
        self, text: str, truncation: bool = True, max_length: int | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        if truncation and max_length:
            self.tok.enable_truncation(max_length=max_length)
        else:
            self.tok.no_truncation()
        enc = self.tok.encode(text)
        return {
            "input_ids": torch.tensor([enc.ids], dtype=torch.long),
            "attention_mask": torch.tensor([enc.attention_mask], dtype=torch.long),
        }


def _plain_tokenizer(src_dir: Path) -> _PlainTokenizer | None:
    """The fast tokenizer, or None where AutoTokenizer must build it (no tokenizer.json, a
    model-specific class, or a setting that changes how it encodes)."""
    path = src_dir / "tokenizer.json"
    if not path.is_file():
        return None
    cfg_path = src_dir / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("tokenizer_class") not in _PLAIN_CLASSES:
        return None
    if any(k in cfg for k in _ENCODING_KEYS) or cfg.get("backend", "tokenizers") != "tokenizers":
        return None
    return _PlainTokenizer(path)


@dataclass
class _Sample:
    ids: torch.Tensor  # (1, T)
    mask: torch.Tensor  # (1, T)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # token_type_ids
    label: int | None = None


@dataclass
class _Run:
    """One model's measurements on the evaluation inputs (per sample, for the intervals)."""

    kind: str
    shape: tuple[int, frozenset[str]] | None = None  # (parameters, float dtypes): what kernels run
    latency: dict[str, Any] | None = None
    latency_error: str | None = None
    outputs: list[torch.Tensor | None] = field(default_factory=list)  # original only: logits or hidden states
    embeddings: list[torch.Tensor] = field(default_factory=list)  # per sample: mean-pooled hidden
    nll: list[float] = field(default_factory=list)  # per sample: Σ next-token NLL
    tokens: list[int] = field(default_factory=list)  # per sample: predicted tokens
    hits: list[int | None] = field(default_factory=list)  # per sample: 1/0 for a labeled one, else None
    # Fidelity (compressed run only), per sample: Σ over positions, and the positions.
    kl: list[float] = field(default_factory=list)
    agree: list[float] = field(default_factory=list)
    cos: list[float] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    fidelity_error: str | None = None
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # load, first_forward, samples, latency
    forward_s: list[float] = field(default_factory=list)  # per sample: the forward pass
    math_s: list[float] = field(default_factory=list)  # per sample: the metric math

    @property
    def samples(self) -> int:
        return len(self.forward_s)

    @property
    def correct(self) -> int:
        return sum(h for h in self.hits if h)

    @property
    def labeled(self) -> int:
        return sum(h is not None for h in self.hits)

    def keep(self, n: int) -> None:
        """Only the first ``n`` samples' figures (the other model ran no more than that)."""
        for name in ("outputs", "embeddings", "nll", "tokens", "hits", "forward_s", "math_s"):
            setattr(self, name, getattr(self, name)[:n])


class Evaluator:
    def __init__(
        self,
        settings: dict[str, Any],
        src_dir: Path,
        texts: Callable[[], tuple[list[dict[str, Any]], dict[str, Any]]],
        progress: Callable[..., None] = lambda note, fraction=None: None,
    ) -> None:
        """``settings``: core.jobs.schemas.EvaluationIn as a dict. ``texts()`` returns the eval
        samples (``[{"text", "label"?}]``) and a description of where they come from.
        ``progress(note, fraction)``: ``fraction`` (0..1, or None) of the current stage (the
        original's measurement, then the compressed model's)."""
        self.settings = settings
        self.src_dir = src_dir
        self._texts = texts
        self.on_progress = progress
        self.device = torch.device("cpu")
        self.seq_len = int(settings["seq_len"])
        self.budget_s = float(settings.get("budget_s") or 30.0)
        self.notes: list[str] = []
        self.samples: list[_Sample] = []
        self.data_info: dict[str, Any] = {}
        self.text_reason: str | None = None  # why the inputs are not real text, when they are not
        self.original: _Run | None = None
        self.compressed: _Run | None = None
        self.kernel: dict[str, Any] = {"runs_as": "dense", "kernel": "PyTorch dense float matmuls", "note": None}
        self.skip_reason: str | None = None
        # Fixed while the original is measured; the compressed model runs the same counts.
        self.n_samples = 0
        self.samples_available = 0
        self.warmup = 0
        self.runs = 0
        self.budget_notes: dict[str, str] = {}  # section -> why it ran more than its share
        self.prepare_s = 0.0  # loading the tokenizer, tokenizing: spent before the shares are set
        self.streamed = False  # both models ran with their weights on disk (measure_side_by_side)
        # The compressed model's forward pass per the original's, as the original plans counts
        # for both (QUANTIZED_FORWARD_COST for a quantized artifact); the plan only: what ran is
        # what is measured and reported.
        self.compressed_cost = 1.0
        self._last_fraction = 0.0

    # -- inputs --------------------------------------------------------------------------------
    def _prepare(self, module: torch.nn.Module) -> None:
        config = module.config
        limit = model_io.max_positions(config)
        if limit is not None and self.seq_len > limit:
            self.notes.append(f"seq_len {self.seq_len} cut to the model's {limit} positions")
            self.seq_len = limit
        self.vocab = int(getattr(config, "vocab_size", 0) or 0)
        texts, info = self._texts()
        texts = texts[: int(self.settings["max_samples"])]
        tokenizer = self._tokenizer()
        if isinstance(tokenizer, str):
            self.text_reason = tokenizer
        elif not texts:
            self.text_reason = "the evaluation data has no texts"
        if self.text_reason is None:
            for s in texts:
                enc = tokenizer(s["text"], truncation=True, max_length=self.seq_len, return_tensors="pt")
                if enc["input_ids"].shape[1] == 0:
                    continue
                if self.vocab and int(enc["input_ids"].max()) >= self.vocab:
                    self.text_reason = f"the tokenizer produces ids beyond the model's vocab_size {self.vocab}"
                    self.samples = []
                    break
                extra = {k: v for k, v in enc.items() if k == "token_type_ids"}
                self.samples.append(
                    _Sample(enc["input_ids"], enc["attention_mask"], extra, self._label(s.get("label"), config))
                )
            self.data_info = dict(info)
        if self.text_reason is not None:
            # Fidelity needs no text: the same random token ids go to both models.
            g = torch.Generator().manual_seed(SEED)
            n = min(int(self.settings["max_samples"]), 8)
            hi = max(self.vocab, 2)
            self.samples = [
                _Sample(
                    torch.randint(0, hi, (1, self.seq_len), generator=g), torch.ones(1, self.seq_len, dtype=torch.long)
                )
                for _ in range(n)
            ]
            self.data_info = {"source": "random_token_ids", "id": None, "why": self.text_reason}
        self.samples_available = len(self.samples)

    def _tokenizer(self) -> Any:
        from core.methods import has_tokenizer

        if not has_tokenizer([p.name for p in self.src_dir.iterdir()]):
            return "the upload has no tokenizer files (tokenizer.json, vocab.txt, vocab.json + merges.txt, ...)"
        try:
            plain = _plain_tokenizer(self.src_dir)
            if plain is not None:
                return plain
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.src_dir, trust_remote_code=False)
        except Exception as e:  # a tokenizer that does not load is a reason, not a failed job
            return f"the upload's tokenizer does not load: {e.__class__.__name__}: {str(e)[:200]}"

    def _label(self, label: Any, config: Any) -> int | None:
        if label is None:
            return None
        if isinstance(label, bool):
            return None
        if isinstance(label, int):
            return label
        label2id = getattr(config, "label2id", None) or {}
        return label2id.get(label)

    # -- running ---------------------------------------------------------------------------------
    def _say(self, note: str, fraction: float, new_stage: bool = False) -> None:
        """Progress within the current stage; the fraction never moves back (counts are re-planned
        as passes are timed, so ``i / n`` alone could)."""
        self._last_fraction = fraction if new_stage else max(fraction, self._last_fraction)
        self.on_progress(note, self._last_fraction)

    def _share(self, part: float) -> float:
        """Seconds of the budget for one part: the budget left once the inputs are prepared
        (tokenizer loaded, texts tokenized), split by the shares above."""
        return max(self.budget_s - self.prepare_s, 0.0) * part

    def _forward(self, module: torch.nn.Module, s: _Sample, hidden: bool) -> Any:
        return module(
            input_ids=s.ids.to(self.device),
            attention_mask=s.mask.to(self.device),
            output_hidden_states=hidden,
            **{k: v.to(self.device) for k, v in s.extra.items()},
        )

    def _latency(self, module: torch.nn.Module, which: str, lo: float, hi: float, plan: bool) -> dict[str, Any]:
        """Timed passes of ``batch_size x seq_len`` random ids. ``plan``: the original decides how
        many fit in its half of the latency share, between the minimum and the job's caps, from
        the cost of its sample passes (per token) and then of the timed passes themselves; later
        calls (the compressed model, int8 kernels) run the same counts."""
        bs = int(self.settings["batch_size"])
        g = torch.Generator().manual_seed(SEED + 1)
        ids = torch.randint(0, max(self.vocab, 2), (bs, self.seq_len), generator=g).to(self.device)
        mask = torch.ones_like(ids)
        # Both models run the same counts: the original plans them so that its passes and the
        # compressed model's (compressed_cost times as dear) fit the latency share together.
        f = self.compressed_cost
        share = self._share(LATENCY_SHARE) * ((1.0 / (1.0 + f)) if plan else (f / (1.0 + f)))
        warm_cap, run_cap = int(self.settings["warmup"]), int(self.settings["runs"])
        if plan:
            o = self.original
            tokens = sum(int(s.mask.sum()) for s in self.samples[: o.samples]) if o else 0
            if o and o.forward_s[1:] and tokens:
                # The samples ran first on this model (kernels chosen, memory touched): a timed
                # pass costs about their per-token cost; warm-up passes only where they are cheap.
                per_token = sum(o.forward_s[1:]) / (tokens - int(self.samples[0].mask.sum()) or 1)
                est = per_token * bs * self.seq_len
                self.warmup = m.runs_that_fit(share * 0.15, est, warm_cap, 0)
            else:
                est = None
                self.warmup = min(MIN_WARMUP, warm_cap)
            self.runs = run_cap if est is None else m.runs_that_fit(share - self.warmup * est, est, run_cap, MIN_RUNS)
        t_start = _clock()
        times: list[float] = []

        def one() -> float:
            t0 = _clock()
            module(input_ids=ids, attention_mask=mask)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return _clock() - t0

        with torch.inference_mode():
            for k in range(self.warmup):
                self._say(f"evaluating {which} model: latency warm-up {k + 1}/{self.warmup}", lo)
                cost = one()
                if plan and k == 0 and est is None:
                    self.runs = m.runs_that_fit(share - self.warmup * cost, cost, run_cap, MIN_RUNS)
            while len(times) < self.runs:
                self._say(
                    f"evaluating {which} model: latency run {len(times) + 1}/{self.runs}",
                    lo + (hi - lo) * len(times) / max(self.runs, 1),
                )
                times.append(one())
                if plan and len(times) >= MIN_RUNS:
                    # Timed passes replace the estimate: as many more as the share still holds.
                    left = share - (_clock() - t_start)
                    self.runs = len(times) + m.runs_that_fit(left, statistics.median(times), run_cap - len(times), 0)
        if plan and (_clock() - t_start) > share and len(times) <= MIN_RUNS < run_cap:
            self.budget_notes["speed"] = (
                f"the budget's latency share ({share:.1f} s for the original's passes) is smaller than "
                f"{MIN_RUNS} timed passes, the fewest a median comes from: they ran anyway"
            )
        return m.latency_stats(times)

    def _sample(self, module: torch.nn.Module, run: _Run, i: int, s: _Sample, hidden: bool) -> None:
        """One text through one model: its outputs, perplexity terms and (for the compressed
        model) its fidelity against the original's outputs on the same text, then dropped."""
        t0 = _clock()
        out = self._forward(module, s, hidden)
        t1 = _clock()
        logits = getattr(out, "logits", None)
        if hidden:
            states = out.hidden_states[-1][0] if getattr(out, "hidden_states", None) else out.last_hidden_state[0]
            run.embeddings.append(m.mean_pool(states.float().cpu(), s.mask[0]))
        if logits is not None:
            lg = logits[0].float().cpu()
            lg = lg if lg.ndim == 2 else lg.unsqueeze(0)
            if run.kind == "causal_lm" and self.text_reason is None:
                nll, n = m.next_token_nll(lg, s.ids[0])
                run.nll.append(nll)
                run.tokens.append(n)
            if run.kind == "classifier" and s.label is not None:
                run.hits.append(int(int(lg.reshape(-1).argmax()) == s.label))
            else:
                run.hits.append(None)
            y = lg
        else:
            y = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1])[0].float().cpu()
        if self.original is None or run is self.original:
            run.outputs.append(y)
        else:
            ref = self.original.outputs[i]
            self.original.outputs[i] = None  # compared once: free it
            if ref is None or ref.shape != y.shape:
                run.fidelity_error = "the two models' outputs have different shapes on the same inputs"
            elif run.fidelity_error is None:
                cos = m.cosine_rows(ref, y)
                run.cos.append(float(cos.sum()))
                run.positions.append(int(cos.numel()))
                if logits is not None and self.original.kind != "base":
                    run.kl.append(float(m.kl_per_position(ref, y).sum()))
                    run.agree.append(float(m.top1_agreement(ref, y).sum()))
        run.forward_s.append(t1 - t0)
        run.math_s.append(_clock() - t1)

    def _samples(self, module: torch.nn.Module, run: _Run, which: str, lo: float, hi: float) -> None:
        """Quality and fidelity passes. The original decides how many texts fit in the samples'
        share (its own passes plus the compressed model's estimated cost for the same texts);
        the compressed model then runs those texts, or fewer where it is slower than estimated
        (never below the minimum), and the original keeps the figures of the texts both ran."""
        plan = run is self.original
        hidden = run.kind in ("base", "lm_logits")
        share = self._share(1.0 - RESERVE_SHARE - LATENCY_SHARE)
        cap = len(self.samples)
        n = cap if plan else self.n_samples
        t_start = _clock()
        with torch.inference_mode():
            i = 0
            while i < n:
                self._say(f"evaluating {which} model: sample {i + 1}/{n}", lo + (hi - lo) * i / max(n, 1))
                self._sample(module, run, i, self.samples[i], hidden)
                i += 1
                if not plan and i == 1:
                    run.seconds["first_forward"] = run.forward_s[0]
                if not plan and min(MIN_SAMPLES, n) <= i < n:
                    # The original planned these texts from its own passes and an estimate of
                    # this model's; a model that runs slower than estimated (compressed-tensors
                    # re-quantizes the weights of every layer on every pass) stops where the
                    # samples' share is spent, and both models report the texts both ran.
                    fw = run.forward_s[1:]
                    ms = run.math_s[1:]
                    if fw:
                        cost_c = statistics.fmean(fw) + statistics.fmean(ms)
                        if self.original.seconds.get("samples", 0.0) + (_clock() - t_start) + cost_c > share:
                            break
                if plan and i < n:
                    # Per-sample cost from the passes so far (the first one pays for warm-up when
                    # there are others to go by); the compressed model's adds its fidelity math.
                    fw = run.forward_s[1:] or run.forward_s
                    ms = run.math_s[1:] or run.math_s
                    cost_o = statistics.fmean(fw) + statistics.fmean(ms)
                    cost_c = self.compressed_cost * statistics.fmean(fw) + FIDELITY_MATH * statistics.fmean(ms)
                    spent = _clock() - t_start
                    fits = i + m.runs_that_fit(share - spent - i * cost_c, cost_o + cost_c, cap - i, 0)
                    n = max(min(MIN_SAMPLES, cap), fits)
        if not plan and run.error is None and run.samples < self.n_samples:
            self.original.keep(run.samples)
            self.n_samples = run.samples
        if plan:
            self.n_samples = run.samples
            if run.samples > 0 and (_clock() - t_start) > share and run.samples <= MIN_SAMPLES < cap:
                self.budget_notes["samples"] = (
                    f"the budget's share for samples ({share:.1f} s for both models) is "
                    f"smaller than {MIN_SAMPLES} samples, the fewest a figure and its "
                    f"interval come from: they ran anyway"
                )
        run.seconds["samples"] = _clock() - t_start

    def _run(self, module: torch.nn.Module, which: str, spans: tuple[float, float, float]) -> _Run:
        run = _Run(kind=model_kind(module))
        if which == "original":
            self.original = run
        params = [p for n, p in module.named_parameters() if not n.endswith(QUANT_PARAM_SUFFIXES)]
        run.shape = (sum(p.numel() for p in params), frozenset(str(p.dtype) for p in params if p.is_floating_point()))
        lo, mid, hi = spans
        # Samples first: on an artifact, the first pass decompresses the weights (not a latency).
        try:
            self._samples(module, run, which, lo, mid)
        except Exception as e:
            log.exception("evaluating the %s model", which)
            run.error = f"the {which} model failed on the evaluation inputs: {e.__class__.__name__}: {str(e)[:300]}"
            if which == "original":
                self.n_samples = run.samples
        t0 = _clock()
        try:
            run.latency = self._latency(module, which, mid, hi, plan=which == "original")
        except Exception as e:
            log.exception("latency of the %s model", which)
            run.latency_error = f"the {which} model failed a timed forward pass: {e.__class__.__name__}: {str(e)[:300]}"
        run.seconds["latency"] = _clock() - t0
        return run

    def measure_original(self, module: torch.nn.Module | None) -> None:
        if module is None:
            self.skip_reason = (
                "a bare safetensors state dict has no architecture to run; upload a Hugging Face "
                "directory (config.json) to get speed, quality and fidelity"
            )
            return
        self.device = next(module.parameters()).device
        self._say("evaluating original model: preparing the inputs", 0.0, new_stage=True)
        t0 = _clock()
        self._prepare(module)
        self.prepare_s = _clock() - t0
        self._run(module, "original", (0.05, 0.7, 1.0))
        self.original.seconds["prepare"] = self.prepare_s

    # -- streamed: both models with their weights on disk, side by side ----------------------------
    def measure_side_by_side(self, original: torch.nn.Module | None, artifact_dir: Path, offload_dir: Path) -> None:
        """For a model too large to hold twice: ``original`` was loaded with its weights on disk
        (model_io.load with an offload folder), and the artifact is loaded the same way
        (compressed-tensors' disk offload: the folders link to the models' files; the artifact's
        integer layers are decompressed on its first pass into ``offload_dir``, not into memory).
        Every forward pass onloads one module at a time, so the process holds about one layer of
        each model, plus one text's outputs of each.

        Each text goes through the original, then the compressed model, and is compared at once:
        nothing of the original is kept across texts. The budget and the minimums are the
        in-memory evaluation's; counts are planned from the measured cost of a pair. Timed passes
        are not run: a pass that reads every weight from disk measures the disk, not the model
        (``speed`` says so), and their share of the budget goes to samples."""
        if original is None:
            self.skip_reason = (
                "a bare safetensors state dict has no architecture to run; upload a Hugging Face "
                "directory (config.json) to get speed, quality and fidelity"
            )
            return
        self.streamed = True
        self.device = torch.device("cpu")
        self._say("evaluating both models, weights on disk: preparing the inputs", 0.0, new_stage=True)
        t0 = _clock()
        self._prepare(original)
        self.prepare_s = _clock() - t0
        ro = self.original = _Run(kind=model_kind(original))
        ro.seconds["prepare"] = self.prepare_s
        ro.latency_error = STREAMED_SPEED_REASON
        self._say("evaluating both models, weights on disk: loading the artifact", 0.02)
        t0 = _clock()
        try:
            compressed = _load_offloaded_artifact(artifact_dir, offload_dir)
            self._online_rotations(compressed, artifact_dir)
        except Exception as e:
            log.exception("loading the artifact (weights on disk) for evaluation")
            self.compressed = _Run(
                kind="?",
                error=f"the artifact did not load for evaluation: {e.__class__.__name__}: {str(e)[:300]}",
                latency_error=STREAMED_SPEED_REASON,
            )
            return
        rc = self.compressed = _Run(kind=model_kind(compressed), latency_error=STREAMED_SPEED_REASON)
        rc.seconds["load"] = _clock() - t0
        # (No parameter shapes: they only decide the speed note, and reading them here would read
        # every weight from disk once more.)
        try:
            self._pairs(original, compressed, (0.05, 1.0))
        except Exception as e:
            log.exception("evaluating both models side by side")
            why = f"a model failed on the evaluation inputs: {e.__class__.__name__}: {str(e)[:300]}"
            ro.error = rc.error = why
        qc = getattr(compressed.config, "quantization_config", None)
        if qc is not None:
            self.kernel = {
                "runs_as": "decompressed",
                "kernel": "transformers + compressed-tensors decompress the integer weights to float on load",
                "note": None,
            }
        del compressed
        gc.collect()

    def _pairs(self, original: torch.nn.Module, compressed: torch.nn.Module, span: tuple[float, float]) -> None:
        """Texts through both models in turn, compared as they come; as many as the samples'
        share holds (the latency share too: no timed passes run), at least the minimum."""
        ro, rc = self.original, self.compressed
        hidden = ro.kind in ("base", "lm_logits")
        share = self._share(1.0 - RESERVE_SHARE)
        cap = len(self.samples)
        n = cap
        lo, hi = span
        t_start = _clock()
        with torch.inference_mode():
            i = 0
            while i < n:
                self._say(
                    f"evaluating both models, weights on disk: sample {i + 1}/{n}", lo + (hi - lo) * i / max(n, 1)
                )
                self._sample(original, ro, i, self.samples[i], hidden)
                self._sample(compressed, rc, i, self.samples[i], hidden)
                i += 1
                if i == 1:
                    rc.seconds["first_forward"] = rc.forward_s[0]
                if i < n:
                    # A pair's cost from the pairs so far (the first one pays for warm-up and,
                    # for an artifact, decompression, when there are others to go by).
                    cost = sum(statistics.fmean(xs[1:] or xs) for r in (ro, rc) for xs in (r.forward_s, r.math_s))
                    fits = i + m.runs_that_fit(share - (_clock() - t_start), cost, cap - i, 0)
                    n = max(min(MIN_SAMPLES, cap), fits)
        self.n_samples = i
        for r in (ro, rc):
            r.seconds["samples"] = sum(r.forward_s) + sum(r.math_s)
            r.seconds["latency"] = 0.0
        if i > 0 and (_clock() - t_start) > share and i <= MIN_SAMPLES < cap:
            self.budget_notes["samples"] = (
                f"the budget's share for samples ({share:.1f} s for both models) is "
                f"smaller than {MIN_SAMPLES} samples, the fewest a figure and its "
                f"interval come from: they ran anyway"
            )

    def measure_compressed(self, artifact_dir: Path) -> None:
        if self.skip_reason is not None or self.original is None:
            return
        self._say("evaluating compressed model: loading the artifact", 0.0, new_stage=True)
        t0 = _clock()
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(artifact_dir, trust_remote_code=False)
            # The artifact exactly as a user's transformers loads it: what they get is what we measure.
            module = (
                model_io.model_class(config)
                .from_pretrained(artifact_dir, trust_remote_code=False, use_safetensors=True, dtype="auto")
                .to(self.device)
                .eval()
            )
            self._online_rotations(module, artifact_dir)
        except Exception as e:
            log.exception("loading the artifact for evaluation")
            self.compressed = _Run(
                kind="?",
                error=f"the artifact did not load for evaluation: {e.__class__.__name__}: {str(e)[:300]}",
                latency_error="the artifact did not load",
            )
            return
        load_s = _clock() - t0
        qc = getattr(config, "quantization_config", None)
        self.compressed = self._run(module, "compressed", (0.05, 0.75, 1.0))
        self.compressed.seconds["load"] = load_s
        if qc is not None:
            t0 = _clock()
            self._quantized_kernels(module, artifact_dir, qc)
            self.compressed.seconds["latency"] += _clock() - t0
        del module
        gc.collect()

    def _online_rotations(self, module: torch.nn.Module, artifact_dir: Path) -> None:
        """An artifact with online rotations (transform.rotate style quip) runs them, as vLLM does;
        transformers alone would skip them (worker/ct_format.py), and the report says so."""
        from worker.ct_format import attach_online_transforms

        n = attach_online_transforms(module, artifact_dir)
        if n:
            self.notes.append(
                f"the artifact's online Hadamard rotations ({n} layers, compressed-tensors transform_config) were "
                "attached by modelpress for this evaluation, as vLLM runs them: transformers 5.17 alone ignores "
                "them and computes wrong outputs"
            )

    def measure_compressed_module(self, module: torch.nn.Module, load_s: float, kernel: dict[str, Any]) -> None:
        """The compressed model already built, e.g. an export in its runtime (worker/runtimes/module.py):
        measured as ``measure_compressed`` measures a loaded artifact, ``kernel`` saying what runs it."""
        if self.skip_reason is not None or self.original is None:
            return
        self.kernel = dict(kernel)
        self._say("evaluating compressed model", 0.0, new_stage=True)
        self.compressed = self._run(module, "compressed", (0.05, 0.75, 1.0))
        self.compressed.seconds["load"] = load_s

    def _quantized_kernels(self, module: torch.nn.Module, artifact_dir: Path, qc: Any) -> None:
        """A compressed-tensors artifact loads decompressed to float. Where this device has kernels
        that run its compressed form (CPU: PyTorch's dynamic int8 Linear, fbgemm/x86, for W8A8),
        its latency is measured with them; otherwise the report says it runs decompressed."""
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        groups = (qc.get("config_groups") or {}).values()
        w8a8 = bool(groups) and all(
            (g.get("weights") or {}).get("num_bits") == 8
            and (g.get("input_activations") or {}).get("num_bits") == 8
            and (g.get("input_activations") or {}).get("dynamic")
            for g in groups
        )
        decompressed_latency = self.compressed.latency if self.compressed else None
        if not (w8a8 and self.device.type == "cpu" and torch.backends.quantized.engine in ("x86", "fbgemm")):
            self.kernel = {
                "runs_as": "decompressed",
                "kernel": "transformers + compressed-tensors decompress the integer weights to float on load",
                "note": "no kernel on this device runs this quantized form; latency is of the decompressed model, "
                "so no speed-up is claimed (a serving engine with compressed-tensors kernels would run it packed)",
            }
            return
        quantized = sorted(
            name.removesuffix(".weight_scale")
            for name in _tensor_entries(artifact_dir)
            if name.endswith(".weight_scale")
        )
        try:
            import torch.ao.quantization as tq

            self._say("evaluating compressed model: latency with int8 kernels", 1.0)
            spec = {name: tq.per_channel_dynamic_qconfig for name in quantized}
            kernel_model = tq.quantize_dynamic(module, spec, dtype=torch.qint8, inplace=False)
            latency = self._latency(kernel_model, "compressed (int8 kernels)", 1.0, 1.0, plan=False)
            del kernel_model
        except Exception as e:
            log.exception("int8 kernel latency")
            self.kernel = {
                "runs_as": "decompressed",
                "kernel": "transformers decompressed float",
                "note": f"int8 kernels failed ({e.__class__.__name__}: {str(e)[:200]}); latency is of the "
                "decompressed model",
            }
            return
        self.kernel = {
            "runs_as": "int8_kernels",
            "kernel": f"torch.ao dynamic int8 Linear ({torch.backends.quantized.engine}) on {len(quantized)} layers: "
            "per-channel int8 weights, activations quantized per tensor at run time",
            "note": "latency is measured with int8 matmuls; quality and fidelity are of the artifact as transformers "
            "runs it (per-token activation quantization, simulated in float)",
            "decompressed": decompressed_latency,
        }
        if self.compressed is not None:
            self.compressed.latency = latency

    # -- report ----------------------------------------------------------------------------------
    def sections(self) -> dict[str, Any]:
        if self.skip_reason is not None:
            r = _unavailable(self.skip_reason)
            return {"speed": r, "quality": r, "fidelity": r}
        if self.original is None or self.compressed is None:
            r = _unavailable("the evaluation did not run")
            return {"speed": r, "quality": r, "fidelity": r}
        out = {
            "speed": self._guard(self._speed),
            "quality": self._guard(self._quality),
            "fidelity": self._guard(self._fidelity),
        }
        if self.notes:
            out["speed"].setdefault("notes", self.notes)
        return out

    def _guard(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return fn()
        except Unavailable as e:
            return _unavailable(str(e))
        except Exception as e:
            log.exception("report section")
            return _unavailable(f"could not be computed: {e.__class__.__name__}: {str(e)[:300]}")

    def _spent(self, key: str) -> dict[str, float | None]:
        o, c = self.original, self.compressed
        return {
            "original": _round(o.seconds.get(key), 3) if o else None,
            "compressed": _round(c.seconds.get(key), 3) if c else None,
        }

    def _budget(self) -> dict[str, Any]:
        """The whole evaluation's account, the same in every section: budget, shares, seconds."""
        o, c = self.original, self.compressed
        total = sum(r.seconds.get(k, 0.0) for r in (o, c) if r for k in ("prepare", "samples", "latency", "load"))
        # Streamed (weights on disk): no timed passes, their share went to the samples.
        latency_share = 0.0 if self.streamed else LATENCY_SHARE
        return {
            "budget_s": self.budget_s,
            "prepare_s": _round(self.prepare_s, 3),
            "shares_s": {
                "samples": _round(self._share(1.0 - RESERVE_SHARE - latency_share), 3),
                "latency": _round(self._share(latency_share), 3),
                "artifact_load": _round(self._share(RESERVE_SHARE), 3),
            },
            "seconds": _round(total, 3),
            "within_budget": total <= self.budget_s,
            "artifact_load_s": _round(c.seconds.get("load"), 3) if c else None,
            "first_forward_s": _round(c.seconds.get("first_forward"), 3) if c else None,
        }

    def _sample_counts(self, section: str) -> dict[str, Any]:
        requested = int(self.settings["max_samples"])
        n = self.n_samples
        if n >= self.samples_available:
            limited = "data" if self.samples_available < requested else "max_samples"
        else:
            limited = "budget"
        return {
            "samples": n,
            "samples_requested": requested,
            "samples_available": self.samples_available,
            "limited_by": limited,
            "budget_note": self.budget_notes.get("samples"),
            "seconds": self._spent("samples"),
            "budget": self._budget(),
            # True: both models ran with their weights on disk, text by text side by side
            # (measure_side_by_side); the figures are those of the in-memory evaluation.
            "weights_on_disk": self.streamed,
        }

    def _speed(self) -> dict[str, Any]:
        o, c = self.original, self.compressed
        if o.latency is None or c.latency is None:
            raise Unavailable(o.latency_error or c.latency_error or "latency was not measured")
        ratio = c.latency["median_ms"] / o.latency["median_ms"] if o.latency["median_ms"] else None
        claim = self.kernel["runs_as"] != "decompressed"
        kernel = dict(self.kernel)
        if kernel["runs_as"] == "dense" and o.shape == c.shape:
            # Same parameter count and dtypes: the same dense matmuls run, zeros or not. A measured
            # difference is noise, and calling it a speed-up would be a lie.
            claim = False
            kernel["note"] = (
                "the compressed model has the original's shapes and dtypes and runs the same dense kernels "
                "(unstructured zeros need sparse kernels, which PyTorch on CPU does not use): no speed-up is "
                "claimed; the latency difference is run-to-run noise"
            )
        runs_requested = int(self.settings["runs"])
        return {
            "available": True,
            "reason": None,
            "device": self.device.type,
            "threads": torch.get_num_threads(),
            "batch_size": int(self.settings["batch_size"]),
            "seq_len": self.seq_len,
            "runs": self.runs,
            "warmup": self.warmup,
            "runs_requested": runs_requested,
            "warmup_requested": int(self.settings["warmup"]),
            "limited_by": "budget" if self.runs < runs_requested else "runs",
            "budget_note": self.budget_notes.get("speed"),
            "seconds": self._spent("latency"),
            "budget": self._budget(),
            "original": o.latency,
            "compressed": c.latency,
            **{k: v for k, v in kernel.items() if k != "decompressed"},
            **({"decompressed": kernel["decompressed"]} if "decompressed" in kernel else {}),
            "latency_ratio": _round(ratio, 4),
            "speedup": _round(1 / ratio, 4) if claim and ratio else None,
        }

    def _quality(self) -> dict[str, Any]:
        o, c = self.original, self.compressed
        if o.error or c.error:
            raise Unavailable(o.error or c.error)
        if o.samples != c.samples:
            raise Unavailable(f"the models ran different sample counts ({o.samples} and {c.samples})")
        used = self.samples[: self.n_samples]
        dataset = {**self.data_info, "samples": len(used), "tokens": sum(int(s.mask.sum()) for s in used)}
        base = {"available": True, "reason": None, "dataset": dataset, **self._sample_counts("quality")}
        if o.kind == "causal_lm":
            if self.text_reason is not None:
                raise Unavailable(f"perplexity needs real text: {self.text_reason}")
            if sum(o.tokens) == 0 or sum(c.tokens) == 0:
                raise Unavailable("the evaluation texts are too short to score (fewer than 2 tokens each)")
            po, pc = m.perplexity(sum(o.nll), sum(o.tokens)), m.perplexity(sum(c.nll), sum(c.tokens))
            ci_o, ci_c = m.perplexity_interval(o.nll, o.tokens), m.perplexity_interval(c.nll, c.tokens)
            # Paired: the same tokens through both models; exp of the NLL difference is the ratio.
            ci_r = m.perplexity_interval([b - a for a, b in zip(o.nll, c.nll, strict=True)], o.tokens)
            ci = {"original": ci_o, "compressed": ci_c, "ratio": ci_r}
            return {
                **base,
                "metric": "perplexity",
                "higher_is_better": False,
                "original": _round(po, 6),
                "compressed": _round(pc, 6),
                "delta": _round(pc - po, 6),
                "ratio": _round(pc / po, 6),
                "ci95": {k: None if v is None else [_round(v[0], 6), _round(v[1], 6)] for k, v in ci.items()},
                "ci_method": "t-interval on the mean NLL per token (" + m.RATIO_CI_METHOD + "), through exp; "
                "ratio: the same on the paired per-text NLL differences",
                **({"ci_reason": "fewer than 2 samples: no interval"} if ci_o is None else {}),
            }
        if o.kind == "classifier":
            labeled = [s for s in used if s.label is not None]
            if self.text_reason is not None or not labeled:
                raise Unavailable(
                    "accuracy needs an eval dataset (eval_dataset_id) whose samples carry labels the model's "
                    "config maps (label2id or integer class ids)"
                )
            n = len(labeled)
            ao, ac = o.correct / n, c.correct / n
            return {
                **base,
                "metric": "accuracy",
                "higher_is_better": True,
                "labeled_samples": n,
                "original": _round(ao, 6),
                "compressed": _round(ac, 6),
                "delta": _round(ac - ao, 6),
            }
        # Encoders and base models: how close each text's embedding stays to the original's.
        ref = torch.stack(o.embeddings)
        before = float(m.cosine_rows(ref, ref).mean())
        after = float(m.cosine_rows(torch.stack(c.embeddings), ref).mean())
        return {
            **base,
            "metric": "embedding_cosine",
            "higher_is_better": True,
            "definition": "mean cosine between each text's mean-pooled last hidden state and the original model's",
            "original": _round(before),
            "compressed": _round(after),
            "delta": _round(after - before),
        }

    def _fidelity(self) -> dict[str, Any]:
        o, c = self.original, self.compressed
        if o.error or c.error:
            raise Unavailable(o.error or c.error)
        if c.fidelity_error:
            raise Unavailable(c.fidelity_error)
        if not c.positions:
            raise Unavailable("no evaluation input reached the models (every text tokenized to nothing)")
        if o.samples != c.samples:
            raise Unavailable(f"the models ran different sample counts ({o.samples} and {c.samples})")
        has_logits = bool(c.kl)
        positions = sum(c.positions)
        reasons = {}
        if not has_logits:
            why = "the model outputs hidden states, not a distribution over tokens or classes"
            reasons = {"kl_mean": why, "top1_agreement": why}
        ci = {
            "kl_mean": m.mean_interval(c.kl, c.positions, lo=0.0) if has_logits else None,
            "top1_agreement": m.mean_interval(c.agree, c.positions, lo=0.0, hi=1.0) if has_logits else None,
            "output_cosine": m.mean_interval(c.cos, c.positions, lo=-1.0, hi=1.0),
        }
        return {
            "available": True,
            "reason": None,
            "on": "logits" if has_logits else "last_hidden_state",
            "inputs": self.data_info.get("source"),
            **self._sample_counts("fidelity"),
            "tokens": positions,
            "kl_mean": _round(sum(c.kl) / positions) if has_logits else None,
            "top1_agreement": _round(sum(c.agree) / positions) if has_logits else None,
            "output_cosine": _round(sum(c.cos) / positions),
            "ci95": {k: None if v is None else [_round(v[0]), _round(v[1])] for k, v in ci.items()},
            "ci_method": m.RATIO_CI_METHOD + " (per-text sums over positions)",
            "reasons": reasons,
        }
