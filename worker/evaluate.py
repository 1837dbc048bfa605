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


class PeakMemory:
    """Peak resident memory of this process during the job. Linux lets a process reset its RSS
    high-water mark (``echo 5 > /proc/self/clear_refs``), so a worker child that ran earlier jobs
    reports this job's peak, not its lifetime's."""

    def __init__(self) -> None:
        self.how = "VmHWM of the worker process since the job started (reset through /proc/self/clear_refs)"
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.how = "peak RSS of the worker process over its lifetime (this system cannot reset it per job)"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict[str, Any]:
        peak = None
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
        except OSError:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {"peak_rss_bytes": peak, "how": self.how, "peak_cuda_bytes": cuda}


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


@dataclass
class _Sample:
    ids: torch.Tensor  # (1, T)
    mask: torch.Tensor  # (1, T)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # token_type_ids
    label: int | None = None


@dataclass
class _Run:
    """One model's outputs on the evaluation inputs."""

    kind: str
    shape: tuple[int, frozenset[str]] | None = None  # (parameters, float dtypes): what kernels run
    latency: dict[str, Any] | None = None
    latency_error: str | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)  # per sample: logits or hidden states
    embeddings: list[torch.Tensor] = field(default_factory=list)  # per sample: mean-pooled hidden
    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    error: str | None = None


class Evaluator:
    def __init__(
        self,
        settings: dict[str, Any],
        src_dir: Path,
        texts: Callable[[], tuple[list[dict[str, Any]], dict[str, Any]]],
        progress: Callable[[str], None] = lambda note: None,
    ) -> None:
        """``settings``: app.jobs.schemas.EvaluationIn as a dict. ``texts()`` returns the eval
        samples (``[{"text", "label"?}]``) and a description of where they come from."""
        self.settings = settings
        self.src_dir = src_dir
        self._texts = texts
        self.on_progress = progress
        self.device = torch.device("cpu")
        self.seq_len = int(settings["seq_len"])
        self.notes: list[str] = []
        self.samples: list[_Sample] = []
        self.data_info: dict[str, Any] = {}
        self.text_reason: str | None = None  # why the inputs are not real text, when they are not
        self.original: _Run | None = None
        self.compressed: _Run | None = None
        self.kernel: dict[str, Any] = {"runs_as": "dense", "kernel": "PyTorch dense float matmuls", "note": None}
        self.skip_reason: str | None = None
        self.label_map: dict[Any, int] | None = None

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
                self.samples.append(_Sample(enc["input_ids"], enc["attention_mask"], extra, self._label(s.get("label"), config)))
            self.data_info = {**info, "samples": len(self.samples), "tokens": sum(int(s.mask.sum()) for s in self.samples)}
        if self.text_reason is not None:
            # Fidelity needs no text: the same random token ids go to both models.
            g = torch.Generator().manual_seed(SEED)
            n = min(int(self.settings["max_samples"]), 8)
            hi = max(self.vocab, 2)
            self.samples = [
                _Sample(torch.randint(0, hi, (1, self.seq_len), generator=g), torch.ones(1, self.seq_len, dtype=torch.long))
                for _ in range(n)
            ]
            self.data_info = {"source": "random_token_ids", "id": None, "samples": n, "tokens": n * self.seq_len,
                              "why": self.text_reason}

    def _tokenizer(self) -> Any:
        from worker.methods import has_tokenizer

        if not has_tokenizer([p.name for p in self.src_dir.iterdir()]):
            return "the upload has no tokenizer files (tokenizer.json, vocab.txt, vocab.json + merges.txt, ...)"
        try:
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
    def _forward(self, module: torch.nn.Module, s: _Sample) -> Any:
        return module(input_ids=s.ids.to(self.device), attention_mask=s.mask.to(self.device),
                      output_hidden_states=True, **{k: v.to(self.device) for k, v in s.extra.items()})

    def _latency(self, module: torch.nn.Module) -> dict[str, Any]:
        bs, warmup, runs = int(self.settings["batch_size"]), int(self.settings["warmup"]), int(self.settings["runs"])
        g = torch.Generator().manual_seed(SEED + 1)
        ids = torch.randint(0, max(self.vocab, 2), (bs, self.seq_len), generator=g).to(self.device)
        mask = torch.ones_like(ids)
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                module(input_ids=ids, attention_mask=mask)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        return m.latency_stats(times)

    def _run(self, module: torch.nn.Module, which: str) -> _Run:
        run = _Run(kind=model_kind(module))
        params = [p for n, p in module.named_parameters() if not n.endswith(QUANT_PARAM_SUFFIXES)]
        run.shape = (sum(p.numel() for p in params), frozenset(str(p.dtype) for p in params if p.is_floating_point()))
        self.on_progress(f"evaluating {which} model: latency")
        try:
            run.latency = self._latency(module)
        except Exception as e:
            log.exception("latency of the %s model", which)
            run.latency_error = f"the {which} model failed a timed forward pass: {e.__class__.__name__}: {str(e)[:300]}"
        self.on_progress(f"evaluating {which} model: quality and fidelity on {len(self.samples)} samples")
        try:
            with torch.inference_mode():
                for s in self.samples:
                    out = self._forward(module, s)
                    logits = getattr(out, "logits", None)
                    hidden = out.hidden_states[-1][0] if getattr(out, "hidden_states", None) else getattr(out, "last_hidden_state")[0]
                    mask = s.mask[0]
                    run.embeddings.append(m.mean_pool(hidden.float().cpu(), mask))
                    if logits is not None:
                        lg = logits[0].float().cpu()
                        run.outputs.append(lg if lg.ndim == 2 else lg.unsqueeze(0))
                        if run.kind == "causal_lm" and self.text_reason is None:
                            nll, n = m.next_token_nll(lg, s.ids[0])
                            run.nll += nll
                            run.tokens += n
                        if run.kind == "classifier" and s.label is not None:
                            run.correct += int(int(lg.reshape(-1).argmax()) == s.label)
                    else:
                        run.outputs.append(hidden.float().cpu())
        except Exception as e:
            log.exception("evaluating the %s model", which)
            run.error = f"the {which} model failed on the evaluation inputs: {e.__class__.__name__}: {str(e)[:300]}"
        return run

    def measure_original(self, module: torch.nn.Module | None) -> None:
        if module is None:
            self.skip_reason = ("a bare safetensors state dict has no architecture to run; upload a Hugging Face "
                                "directory (config.json) to get speed, quality and fidelity")
            return
        self.device = next(module.parameters()).device
        self._prepare(module)
        self.original = self._run(module, "original")

    def measure_compressed(self, artifact_dir: Path) -> None:
        if self.skip_reason is not None or self.original is None:
            return
        self.on_progress("evaluating compressed model: loading the artifact")
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(artifact_dir, trust_remote_code=False)
            # The artifact exactly as a user's transformers loads it: what they get is what we measure.
            module = model_io.model_class(config).from_pretrained(
                artifact_dir, trust_remote_code=False, use_safetensors=True, dtype="auto"
            ).to(self.device).eval()
        except Exception as e:
            log.exception("loading the artifact for evaluation")
            self.compressed = _Run(kind="?", error=f"the artifact did not load for evaluation: {e.__class__.__name__}: {str(e)[:300]}",
                                   latency_error="the artifact did not load")
            return
        qc = getattr(config, "quantization_config", None)
        self.compressed = self._run(module, "compressed")
        if qc is not None:
            self._quantized_kernels(module, artifact_dir, qc)
        del module
        gc.collect()

    def _quantized_kernels(self, module: torch.nn.Module, artifact_dir: Path, qc: Any) -> None:
        """A compressed-tensors artifact loads decompressed to float. Where this device has kernels
        that run its compressed form (CPU: PyTorch's dynamic int8 Linear, fbgemm/x86, for W8A8),
        its latency is measured with them; otherwise the report says it runs decompressed."""
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        groups = (qc.get("config_groups") or {}).values()
        w8a8 = bool(groups) and all(
            (g.get("weights") or {}).get("num_bits") == 8 and (g.get("input_activations") or {}).get("num_bits") == 8
            and (g.get("input_activations") or {}).get("dynamic") for g in groups
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
            name.removesuffix(".weight_scale") for name in _tensor_entries(artifact_dir) if name.endswith(".weight_scale")
        )
        try:
            import torch.ao.quantization as tq

            self.on_progress("evaluating compressed model: latency with int8 kernels")
            spec = {name: tq.per_channel_dynamic_qconfig for name in quantized}
            kernel_model = tq.quantize_dynamic(module, spec, dtype=torch.qint8, inplace=False)
            latency = self._latency(kernel_model)
            del kernel_model
        except Exception as e:
            log.exception("int8 kernel latency")
            self.kernel = {"runs_as": "decompressed", "kernel": "transformers decompressed float",
                           "note": f"int8 kernels failed ({e.__class__.__name__}: {str(e)[:200]}); latency is of the decompressed model"}
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
        out = {"speed": self._speed(), "quality": self._guard(self._quality), "fidelity": self._guard(self._fidelity)}
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

    def _speed(self) -> dict[str, Any]:
        o, c = self.original, self.compressed
        if o.latency is None or c.latency is None:
            return _unavailable(o.latency_error or c.latency_error or "latency was not measured")
        ratio = c.latency["median_ms"] / o.latency["median_ms"] if o.latency["median_ms"] else None
        claim = self.kernel["runs_as"] != "decompressed"
        kernel = dict(self.kernel)
        if kernel["runs_as"] == "dense" and o.shape == c.shape:
            # Same parameter count and dtypes: the same dense matmuls run, zeros or not. A measured
            # difference is noise, and calling it a speed-up would be a lie.
            claim = False
            kernel["note"] = ("the compressed model has the original's shapes and dtypes and runs the same dense kernels "
                              "(unstructured zeros need sparse kernels, which PyTorch on CPU does not use): no speed-up is "
                              "claimed; the latency difference is run-to-run noise")
        return {
            "available": True, "reason": None,
            "device": self.device.type, "threads": torch.get_num_threads(),
            "batch_size": int(self.settings["batch_size"]), "seq_len": self.seq_len,
            "runs": int(self.settings["runs"]), "warmup": int(self.settings["warmup"]),
            "original": o.latency, "compressed": c.latency,
            **{k: v for k, v in kernel.items() if k != "decompressed"},
            **({"decompressed": kernel["decompressed"]} if "decompressed" in kernel else {}),
            "latency_ratio": _round(ratio, 4),
            "speedup": _round(1 / ratio, 4) if claim and ratio else None,
        }

    def _quality(self) -> dict[str, Any]:
        o, c = self.original, self.compressed
        if o.error or c.error:
            raise Unavailable(o.error or c.error)
        base = {"available": True, "reason": None, "dataset": self.data_info}
        if o.kind == "causal_lm":
            if self.text_reason is not None:
                raise Unavailable(f"perplexity needs real text: {self.text_reason}")
            if o.tokens == 0 or c.tokens == 0:
                raise Unavailable("the evaluation texts are too short to score (fewer than 2 tokens each)")
            po, pc = m.perplexity(o.nll, o.tokens), m.perplexity(c.nll, c.tokens)
            return {**base, "metric": "perplexity", "higher_is_better": False,
                    "original": _round(po, 6), "compressed": _round(pc, 6), "delta": _round(pc - po, 6)}
        if o.kind == "classifier":
            labeled = [s for s in self.samples if s.label is not None]
            if self.text_reason is not None or not labeled:
                raise Unavailable("accuracy needs an eval dataset (eval_dataset_id) whose samples carry labels the model's "
                                  "config maps (label2id or integer class ids)")
            n = len(labeled)
            ao, ac = o.correct / n, c.correct / n
            return {**base, "metric": "accuracy", "higher_is_better": True, "labeled_samples": n,
                    "original": _round(ao, 6), "compressed": _round(ac, 6), "delta": _round(ac - ao, 6)}
        # Encoders and base models: how close each text's embedding stays to the original's.
        ref = torch.stack(o.embeddings)
        before = float(m.cosine_rows(ref, ref).mean())
        after = float(m.cosine_rows(torch.stack(c.embeddings), ref).mean())
        return {**base, "metric": "embedding_cosine", "higher_is_better": True,
                "definition": "mean cosine between each text's mean-pooled last hidden state and the original model's",
                "original": _round(before), "compressed": _round(after), "delta": _round(after - before)}

    def _fidelity(self) -> dict[str, Any]:
        o, c = self.original, self.compressed
        if o.error or c.error:
            raise Unavailable(o.error or c.error)
        shapes_match = all(a.shape == b.shape for a, b in zip(o.outputs, c.outputs))
        has_logits = o.kind != "base" and c.kind != "base"
        if not shapes_match:
            raise Unavailable("the two models' outputs have different shapes on the same inputs")
        kl, agree, cos = [], [], []
        for a, b in zip(o.outputs, c.outputs):
            cos.append(m.cosine_rows(a, b))
            if has_logits:
                kl.append(m.kl_per_position(a, b))
                agree.append(m.top1_agreement(a, b))
        positions = int(sum(x.numel() for x in cos))
        reasons = {}
        if not has_logits:
            why = "the model outputs hidden states, not a distribution over tokens or classes"
            reasons = {"kl_mean": why, "top1_agreement": why}
        return {
            "available": True, "reason": None,
            "on": "logits" if has_logits else "last_hidden_state",
            "inputs": self.data_info.get("source"),
            "samples": len(o.outputs), "tokens": positions,
            "kl_mean": _round(float(torch.cat(kl).mean())) if kl else None,
            "top1_agreement": _round(float(torch.cat(agree).mean())) if agree else None,
            "output_cosine": _round(float(torch.cat(cos).mean())),
            "reasons": reasons,
        }
