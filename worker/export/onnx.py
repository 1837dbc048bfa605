"""ONNX export of a Hugging Face model folder, optionally int8-quantized with ONNX Runtime.

What is written, and which models are taken, is core/exports/onnx.py's docstring. How:

1. transformers loads the folder in float32 (``from_pretrained``: a compressed-tensors artifact
   is decompressed; never ``trust_remote_code``);
2. PyTorch's exporter (``torch.onnx.export(dynamo=True)``, opset :data:`OPSET`) traces a wrapper
   whose inputs and outputs are flat tensors named as optimum's ONNX models are, with dynamic
   batch / sequence / past axes. A decoder's wrapper fills a ``DynamicCache`` from the
   ``past_key_values.*`` inputs and returns the cache after the step as ``present.*``;
3. ``int8_dynamic``: ``quantize_dynamic`` (weights int8 per output channel; activations
   quantized per pass); ``int8_static``: ``quantize_static`` in QDQ format (activations uint8,
   weights int8 per channel), min/max calibrated on the given token id sequences. Before either,
   a decoder's activations are smoothed (SmoothQuant's exact float rewrite,
   :func:`smooth_activations`, on the calibration sequences or a few built-in sentences): ONNX
   Runtime quantizes each activation tensor with one scale, and a few outlier channels otherwise
   cost the rest their precision (Gemma 3 270M, int8_dynamic: perplexity +8.4 % without, +2.3 % with);
   tied LM heads (``MatMul(h, Transpose(embedding))``) get their own transposed initializer,
   which the quantizers need to see a weight;
4. the file is opened in ONNX Runtime and run once (two tokens) before it is called done;
5. config.json (without a ``quantization_config``: the ONNX weights are plain floats or ORT's
   int8) and the tokenizer files are written beside ``model.onnx``.

Everything is written into a scratch folder inside ``out_dir`` and moved into place at the end,
so an export that fails leaves nothing behind; it raises :class:`ExportError` naming the stage
and, where the exporter says so, the operator or module that failed.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from core.exports.onnx import CLASSIFICATION_TASK, DECODER_TASK, onnx_task, refusals

OPSET = 18
MODEL_FILE = "model.onnx"
# protobuf's limit on one message: past it the weights go into an external data file.
_PROTOBUF_LIMIT = 2**31 - 2**26
# Files copied beside the model: tokenizer and generation settings (config.json is re-written).
_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Example sizes for tracing: each >= 2, because torch.export specializes a dimension whose example
# is 0 or 1 to that constant.
_BATCH, _SEQ, _PAST = 2, 3, 4


class ExportError(RuntimeError):
    """The export failed; the message names the stage and the operator or module where known."""


def export_onnx(
    src_dir: Path,
    out_dir: Path,
    quantize: str | None = None,
    calibration: list[list[int]] | None = None,
    *,
    reduce_range: bool = True,
) -> dict[str, Any]:
    """Export ``src_dir`` (a transformers model folder) to ``out_dir/model.onnx``.

    ``quantize``: None, ``int8_dynamic`` or ``int8_static`` (needs ``calibration``: token id
    sequences). ``reduce_range``: int8 weights in 7 bits (core/exports OnnxOutput says why).
    Returns {"files", "bytes", "opset", "quantize", "reduce_range", "seconds", "inputs", "outputs"}."""
    t0 = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = _read_config(src_dir)
    reasons = refusals(config, {}, quantize, bool(calibration))
    if reasons:
        raise ExportError("; ".join(reasons))
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    try:
        files, inputs, outputs, smoothed = _export_into(src_dir, scratch, config, quantize, calibration, reduce_range)
        for name in files:
            (scratch / "final" / name).replace(out_dir / name)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "files": files,
        "bytes": sum((out_dir / n).stat().st_size for n in files),
        "opset": OPSET,
        "quantize": quantize,
        "reduce_range": reduce_range if quantize else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "inputs": inputs,
        "outputs": outputs,
        "smoothing": smoothed,
    }


def _read_config(src_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((src_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"ONNX export needs a transformers model folder with a readable config.json: {e}") from e
    if not isinstance(config, dict):
        raise ExportError("ONNX export: config.json is not a JSON object")
    return config


def _export_into(
    src_dir: Path,
    scratch: Path,
    config: dict[str, Any],
    quantize: str | None,
    calibration: list[list[int]] | None,
    reduce_range: bool = True,
) -> tuple[list[str], list[str], list[str], dict[str, Any] | None]:
    task = onnx_task(config)
    assert task is not None  # refusals() said so
    model = _load(src_dir, task)
    smoothed = _smooth_for_int8(model, src_dir, calibration) if quantize else None
    final = scratch / "final"
    final.mkdir()
    fp32 = scratch / "fp32" if quantize else final
    fp32.mkdir(exist_ok=True)
    inputs, outputs = _torch_export(model, task, fp32 / MODEL_FILE)
    if quantize:
        _fold_weight_transposes(fp32 / MODEL_FILE)
    if quantize == "int8_dynamic":
        _quantize_dynamic(fp32 / MODEL_FILE, final / MODEL_FILE, reduce_range)
    elif quantize == "int8_static":
        assert calibration
        _quantize_static(fp32 / MODEL_FILE, final / MODEL_FILE, model.config, task, calibration, reduce_range)
    if quantize:
        shutil.rmtree(fp32)
    _smoke_run(final / MODEL_FILE)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the ONNX weights are not compressed-tensors any more
    cfg.save_pretrained(final)
    for name in _SIDE_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, final / name)
    return sorted(p.name for p in final.iterdir()), inputs, outputs, smoothed


def _load(src_dir: Path, task: str) -> Any:
    import torch
    import transformers

    cls = {
        DECODER_TASK: transformers.AutoModelForCausalLM,
        CLASSIFICATION_TASK: transformers.AutoModelForSequenceClassification,
    }.get(task, transformers.AutoModel)
    try:
        model = cls.from_pretrained(src_dir, dtype=torch.float32, trust_remote_code=False)
    except Exception as e:
        raise ExportError(f"ONNX export could not load the model with {cls.__name__}: {e}") from e
    return model.eval()


# --- activation smoothing before int8 --------------------------------------------------------------

# Per decoder layer: (the module whose output feeds the linears, the linears). The first two are
# the norms before attention and the MLP; the last is the MLP's up projection, whose output is
# multiplied into down_proj's input (``act(gate(x)) * up(x)``), so scaling its rows scales that
# input.
_SMOOTH_GROUPS = {
    "llama": (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    "gemma3_text": (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    "gpt2": (("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
}
_SMOOTH_GROUPS["mistral"] = _SMOOTH_GROUPS["qwen2"] = _SMOOTH_GROUPS["llama"]
SMOOTH_ALPHA = 0.65  # of 0.5, 0.65, 0.8 the best on Gemma 3 270M (bench/bench_onnx.py): +2.8, +2.3, +4.5 % perplexity
_SMOOTH_SEQUENCES = 32  # at most this many calibration sequences feed the statistics


def _decoder_layers(model: Any) -> list[Any]:
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    return list(layers or [])


def _input_absmax(model: Any, linears: list[Any], sequences: Sequence[Sequence[int]]) -> dict[int, Any]:
    """Per input channel, the largest |activation| entering each of ``linears`` over the sequences."""
    import torch

    stats: dict[int, Any] = {}

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        key = id(module)
        stats[key] = amax if key not in stats else torch.maximum(stats[key], amax)

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        with torch.no_grad():
            for seq in sequences:
                model(torch.tensor([list(seq)]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def _weight_in(module: Any) -> Any:
    """The weight as (out, in): transformers' Conv1D (GPT-2) keeps it as (in, out)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def _scale_source(module: Any, inv: Any) -> None:
    """Scale ``module``'s output channels by ``inv`` (a norm, or a linear's rows)."""
    if type(module).__name__.startswith("Gemma") and "RMSNorm" in type(module).__name__:
        module.weight.data = (1.0 + module.weight.data) * inv - 1.0  # Gemma's norms scale by (1 + w)
    elif type(module).__name__ == "Conv1D":
        module.weight.data *= inv[None, :]
    elif module.weight.dim() == 2:
        module.weight.data *= inv[:, None]
    else:
        module.weight.data *= inv
    if getattr(module, "bias", None) is not None:
        module.bias.data *= inv


# Text for the smoothing statistics when the job gives no calibration data: ordinary English prose
# (not the evaluator's corpus, so its perplexity stays out of sample). Outlier channels are a
# property of the model more than of the text: a few sentences find them.
_SMOOTHING_TEXT = (
    "The committee met on Tuesday to discuss the budget for the coming year and agreed to postpone the vote.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "After the storm, volunteers cleared fallen branches from the roads and checked on elderly neighbours.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The museum's new exhibition traces the history of printing from woodblocks to digital presses.",
    "Prices rose by 3.2 percent in March, driven mainly by energy and food costs.",
    "She packed her bag, locked the door, and walked to the station in the early morning fog.",
    "Q: What is the capital of Australia? A: Canberra, not Sydney as many people assume.",
)


def _smooth_for_int8(model: Any, src_dir: Path, calibration: list[list[int]] | None) -> dict[str, Any] | None:
    """Smooth a decoder's activations before int8 (:func:`smooth_activations`) on the job's
    calibration sequences, else on :data:`_SMOOTHING_TEXT` through the model's tokenizer."""
    if getattr(model.config, "model_type", "") not in _SMOOTH_GROUPS:
        return None
    source = "calibration"
    if not calibration:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False)
        except Exception:  # no usable tokenizer: export without smoothing rather than fail
            return None
        calibration = [tok(text)["input_ids"] for text in _SMOOTHING_TEXT]
        source = "built-in text"
    try:
        groups = smooth_activations(model, [list(seq)[:512] for seq in calibration[:_SMOOTH_SEQUENCES] if seq])
    except Exception as e:
        raise ExportError(f"activation smoothing before int8 failed{_culprit(e)}: {_first_lines(e)}") from e
    return {"method": "smoothquant", "alpha": SMOOTH_ALPHA, "groups": groups, "statistics": source}


def smooth_activations(model: Any, sequences: Sequence[Sequence[int]], alpha: float = SMOOTH_ALPHA) -> int:
    """SmoothQuant's equivalent rewrite (Xiao et al., 2023, arXiv:2211.10438): divide each input
    channel j of a group of linears by s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the
    module before them, and multiply the linears' weight column j by s_j. The float model computes
    the same function; its activations lose their outlier channels, which ONNX Runtime's dynamic
    int8 (one scale per activation tensor) otherwise quantizes every other channel around.
    Returns the number of groups smoothed (0 for a model type without a table)."""
    import torch

    groups = _SMOOTH_GROUPS.get(getattr(model.config, "model_type", ""), ())
    pairs = [
        (layer.get_submodule(src), [layer.get_submodule(t) for t in targets])
        for layer in _decoder_layers(model)
        for src, targets in groups
    ]
    if not pairs:
        return 0
    stats = _input_absmax(model, [t for _, ts in pairs for t in ts], sequences)
    with torch.no_grad():
        for source, targets in pairs:
            act = torch.stack([stats[id(t)] for t in targets]).amax(0)
            wmax = torch.stack([_weight_in(t).abs().amax(0) for t in targets]).amax(0).float()
            s = (act.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            _scale_source(source, (1.0 / s).to(source.weight.dtype))
            for t in targets:
                if type(t).__name__ == "Conv1D":
                    t.weight.data *= s[:, None].to(t.weight.dtype)
                else:
                    t.weight.data *= s[None, :].to(t.weight.dtype)
    return len(pairs)


# --- the traced wrappers ------------------------------------------------------------------------


def _kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's cache."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def _decoder_wrapper(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    layers = _kv_shape(model.config)[0]

    class DecoderWithPast(torch.nn.Module):
        """One step with a KV cache, on flat tensors: (ids, mask, positions, k0, v0, k1, ...) ->
        (logits, present k0, v0, ...)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            # A plain DynamicCache (no config): every layer keeps its whole past, and the masks
            # (sliding-window ones included) come from the config and attention_mask.
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            flat = [out.logits]
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    return DecoderWithPast().eval()


def _encoder_wrapper(model: Any, task: str, token_types: bool) -> Any:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, *rest: Any) -> tuple[Any, ...]:
            kwargs = {"token_type_ids": rest[0]} if token_types else {}
            if task != CLASSIFICATION_TASK:
                return (self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state,)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
            return out.hidden_states[-1], out.logits

    return Encoder().eval()


def _decoder_signature(config: Any) -> tuple[tuple[Any, ...], list[str], list[str], dict[str, Any]]:
    import torch
    from torch.export import Dim

    layers, kv_heads, head_dim = _kv_shape(config)
    batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    ids = torch.randint(0, config.vocab_size, (_BATCH, _SEQ))
    mask = torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.int64)
    pos = torch.arange(_PAST, _PAST + _SEQ).expand(_BATCH, _SEQ)
    kv = [torch.randn(_BATCH, kv_heads, _PAST, head_dim) for _ in range(2 * layers)]
    kv_names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv_names]
    outputs = ["logits"] + [f"present.{n}" for n in kv_names]
    shapes = {
        "input_ids": {0: batch, 1: seq},
        # past + sequence: torch.export cannot name a sum of two dims; it infers it (AUTO) and
        # _name_axes() renames it afterwards.
        "attention_mask": {0: batch, 1: Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in kv),
    }
    return (ids, mask, pos, *kv), inputs, outputs, shapes


def _encoder_signature(config: Any, task: str) -> tuple[tuple[Any, ...], list[str], list[str], dict[str, Any]]:
    import torch
    from torch.export import Dim

    batch, seq = Dim("batch_size"), Dim("sequence_length")
    ids = torch.randint(0, config.vocab_size, (_BATCH, _SEQ))
    args: tuple[Any, ...] = (ids, torch.ones(_BATCH, _SEQ, dtype=torch.int64))
    inputs = ["input_ids", "attention_mask"]
    shapes: dict[str, Any] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if getattr(config, "type_vocab_size", 0):
        args += (torch.zeros(_BATCH, _SEQ, dtype=torch.int64),)
        inputs.append("token_type_ids")
        shapes["rest"] = ({0: batch, 1: seq},)
    outputs = ["last_hidden_state"] + (["logits"] if task == CLASSIFICATION_TASK else [])
    return args, inputs, outputs, shapes


def _torch_export(model: Any, task: str, path: Path) -> tuple[list[str], list[str]]:
    import torch

    if task == DECODER_TASK:
        wrapper = _decoder_wrapper(model)
        args, inputs, outputs, shapes = _decoder_signature(model.config)
    else:
        args, inputs, outputs, shapes = _encoder_signature(model.config, task)
        wrapper = _encoder_wrapper(model, task, "token_type_ids" in inputs)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) >= _PROTOBUF_LIMIT
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
        assert program is not None
        program.save(str(path), external_data=big)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}{_culprit(e)}: {_first_lines(e)}") from e
    _name_axes(path)
    return inputs, outputs


_OPERATOR = re.compile(r"(aten[.:]{1,2}[\w.]+|onnx::\w+|torch\.ops\.[\w.]+)")
_MODULE = re.compile(r"(\b(?:model|self)\.[\w.]+)")


def _culprit(error: BaseException) -> str:
    """' (operator aten.x)' / ' (module model.layers.0...)' where the error text names one."""
    text = str(error)
    for pattern, what in ((_OPERATOR, "operator"), (_MODULE, "module")):
        found = pattern.search(text)
        if found:
            return f" ({what} {found.group(1)})"
    return ""


def _first_lines(error: BaseException, lines: int = 6, chars: int = 1500) -> str:
    text = "\n".join(str(error).strip().splitlines()[:lines])
    return f"{type(error).__name__}: {text[:chars]}"


def _name_axes(path: Path) -> None:
    """Give inferred axes (torch.export's ``s53``) the names optimum's models use, and drop the
    exporter's per-node debug metadata (Python stack traces with this machine's paths, FX nodes:
    more bytes than a tiny model's weights) but the module path of each node (``name_scopes``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            name = dim.dim_param
            if re.fullmatch(r"s\d+", name) or name == "past_sequence_length + sequence_length":
                dim.dim_param = "total_sequence_length"
    for node in model.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key == _SCOPES]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


_SCOPES = "pkg.torch.onnx.name_scopes"


def module_of(node: Any) -> str | None:
    """The PyTorch module an exported ONNX node came from (``model.layers.0.mlp.down_proj``)."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            scopes = [s.strip(" '") for s in prop.value.strip("[]").split(",")]
            module = scopes[-2] if len(scopes) >= 2 else ""
            return module.removeprefix("model.") or None  # the wrapper's own attribute
    return None


# --- quantization and the smoke run ---------------------------------------------------------------


def _fold_weight_transposes(path: Path) -> None:
    """Write ``Transpose(W)`` feeding MatMuls as a transposed initializer of its own.

    A tied LM head is exported as ``MatMul(h, Transpose(embed_tokens.weight))``, and ONNX
    Runtime's quantizers quantize a MatMul only when its weight is an initializer: without this
    the LM head, the largest matmul of a small-model, large-vocabulary LLM (Gemma 3 270M: 168 M of
    its 268 M parameters), would stay float32."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    external = _external(path)
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    folded, added = [], 0
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type != "Transpose" or node.input[0] not in inits or out in inits:
            continue
        if not all(u.op_type == "MatMul" and list(u.input).index(out) == 1 for u in users.get(out, [])):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[node.input[0]])
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), out))
        folded.append(node)
        added += weight.nbytes
    if not folded:
        return
    for node in folded:
        graph.node.remove(node)
    for data in path.parent.glob(path.name + "?*"):
        data.unlink()  # the external data file is re-written with the new initializer
    external = external or path.stat().st_size + added >= _PROTOBUF_LIMIT
    onnx.save(model, str(path), save_as_external_data=external, location=path.name + ".data")


def _external(path: Path) -> bool:
    return any(p.name.startswith(path.name) and p != path for p in path.parent.iterdir())


def _quantize_dynamic(src: Path, dst: Path, reduce_range: bool = True) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            src,
            dst,
            # MatMul only: the projections and the LM head carry the compute; ORT's int8 Gather
            # (embeddings) would shrink the file further but adds a dequantize per lookup.
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            # 7-bit weights unless asked otherwise: without VNNI, x86 kernels sum pairs of
            # uint8 x int8 products in int16, which 8-bit weights overflow (ORT's documented
            # saturation; tests/test_export_onnx.py failed by 4x its bound on an AVX2 machine).
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            use_external_data_format=_external(src),
        )
    except Exception as e:
        raise ExportError(f"onnxruntime quantize_dynamic (int8_dynamic) failed{_culprit(e)}: {_first_lines(e)}") from e


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over token id sequences (one per pass)."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._feeds: Iterator[dict[str, Any]] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


def calibration_feeds(config: Any, task: str, sequences: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """One ONNX Runtime feed per sequence: the full sequence, an empty past."""
    import numpy as np

    feeds = []
    for seq in sequences:
        ids = np.asarray([list(seq)], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if task == DECODER_TASK:
            layers, kv_heads, head_dim = _kv_shape(config)
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
            empty = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
            for i in range(layers):
                feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
        elif getattr(config, "type_vocab_size", 0):
            feed["token_type_ids"] = np.zeros_like(ids)
        feeds.append(feed)
    return feeds


def _quantize_static(
    src: Path, dst: Path, config: Any, task: str, calibration: list[list[int]], reduce_range: bool = True
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    try:
        quantize_static(
            src,
            dst,
            _Calibration(calibration_feeds(config, task, calibration)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            # uint8 activations with int8 weights: the pair ORT's x86 kernels (VNNI) run fastest.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,  # as in _quantize_dynamic
            use_external_data_format=_external(src),
            # Weights' MatMuls only: attention's Q.K^T and P.V multiply two activations, and static
            # ranges on those (softmax probabilities among them) cost more than they save. (The
            # QDQ quantizer ignores extra_options' MatMulConstBOnly: the nodes are named instead.)
            nodes_to_quantize=_weight_matmuls(src),
        )
    except Exception as e:
        raise ExportError(f"onnxruntime quantize_static (int8_static) failed{_culprit(e)}: {_first_lines(e)}") from e


def _weight_matmuls(path: Path) -> list[str]:
    """The MatMul nodes whose second input is an initializer (a weight)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]


def _smoke_run(path: Path) -> None:
    """Open the file in ONNX Runtime and run two tokens through it (empty past)."""
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {}
        for arg in session.get_inputs():
            if arg.name.startswith("past_key_values."):
                shape = [1, arg.shape[1], 0, arg.shape[3]]
                feed[arg.name] = np.zeros(shape, dtype=np.float32)
            elif arg.name == "position_ids":
                feed[arg.name] = np.arange(2, dtype=np.int64)[None]
            elif arg.name == "token_type_ids":
                feed[arg.name] = np.zeros((1, 2), dtype=np.int64)
            else:
                feed[arg.name] = np.ones((1, 2), dtype=np.int64)
        session.run(None, feed)
    except Exception as e:
        raise ExportError(
            f"ONNX Runtime could not run the exported file{_node_module(path, e)}: {_first_lines(e)}"
        ) from e


def _node_module(path: Path, error: BaseException) -> str:
    """' (node X, module model.layers.3.mlp)' for an ONNX Runtime error that names a node."""
    found = re.search(r"Name:'([^']+)'", str(error))
    if not found:
        return _culprit(error)
    import onnx

    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.name == found.group(1):
            module = module_of(node)
            return f" (node {node.name} {node.op_type}" + (f", module {module})" if module else ")")
    return f" (node {found.group(1)})"
