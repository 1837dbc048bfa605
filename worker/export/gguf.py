"""A Hugging Face model folder -> one GGUF file for llama.cpp, written with the ``gguf`` package.

What llama.cpp's own ``convert_hf_to_gguf.py`` does, for the families core/exports/gguf.py lists,
tensor by tensor from the memory-mapped safetensors (the model is never held whole):

* metadata: the architecture's hyperparameters under ``{arch}.*`` keys, the tokenizer from
  ``tokenizer.json`` (byte-level BPE as llama.cpp's "gpt2" model with its merges and
  pre-tokenizer name; byte-fallback BPE as its SentencePiece "llama" model with scores by merge
  rank and the space-prefix flag; token types, special token ids, add_bos/add_eos) and the chat
  template;
* tensor names: HF -> GGUF through ``gguf.get_tensor_name_map``; Llama/Mistral q and k rows are
  permuted into llama.cpp's rotary layout (each head's two halves interleaved); GPT-2's Conv1D
  weights are transposed into (out, in); Gemma 3's norms ``w`` become ``1 + w``; an LM head tied
  to the embeddings is not written (llama.cpp reuses ``token_embd``);
* types: 1-D tensors (norms, biases) and learned positions stay float32; matrices are F16, BF16,
  Q8_0 or Q4_0 (``gguf.quants``; Q4_0 files keep the LM head in Q8_0, ``token_embd`` when the
  head is tied to it, as llama.cpp's quantizer keeps the head at higher precision). Q4_K_M is
  llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python) run on a 16-bit
  file written first: gguf-py has no K-quantizer.

Compressed-tensors sources (``quantization_config``: pack-quantized, int-quantized,
naive-quantized). Where the stored integers are symmetric with a scale per row or per group of a
multiple of 32 columns and fit the block (int8 for Q8_0, -8..7 for Q4_0), the GGUF blocks are
built from those integers and scales directly: no second rounding. The block scale is float16,
so a tensor is exact when every stored scale is a float16 value (a bfloat16 scale of normal
magnitude is); ``inexact_tensors`` names the others. Exact means: GGUF's dequantized weight
(``d * q``, computed exactly in float32) rounded to the artifact's scale dtype is bit-identical
to the artifact's own dequantized weight (``q * scale`` in the scale dtype). Tensors the steps
left in float (embeddings, the LM head) keep their stored float type in such a file, so the whole
model is the job's model. Any other quantized source is dequantized (``(q - zero_point) * scale``,
as compressed-tensors does) and converted as a float model (reported inexact). Sparse formats are
refused (GGUF is dense).

Failures raise ``ExportError`` naming the tensor (or the tokenizer / quantizer step) and leave no
file behind.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.exports import gguf as spec

# Buffers some checkpoints carry that are not weights (recomputed by every runtime).
_SKIP = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")
# A quantized module's tensors besides its integers: read with them, never written on their own
# (activation scales too: llama.cpp quantizes activations its own way).
_QUANT_LEAVES = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale", "input_zero_point")


class ExportError(Exception):
    """The model cannot be written as GGUF; the message names the tensor or step that failed."""


@dataclass
class _Scheme:
    """The compressed-tensors weight scheme of a quantized source (one for all layers)."""

    fmt: str
    bits: int
    symmetric: bool
    group: int | None  # None: one scale per row


@dataclass
class _Item:
    """One GGUF tensor: its name, logical shape (rows, cols) numpy order, type and producer."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    make: Callable[[], Any]  # -> numpy array in the bytes the type stores
    source: str


@dataclass
class _Report:
    exact: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)


class _Source:
    """The folder's safetensors, memory-mapped; tensors read on demand."""

    def __init__(self, src_dir: Path) -> None:
        from safetensors import safe_open

        files = sorted(src_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{src_dir} has no .safetensors file")
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {n: h for h in self.handles for n in h.keys()}  # noqa: SIM118 - a safe_open handle is not iterable

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> Any:
        return self.where[name].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self.where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self.where[name].get_slice(name).get_dtype())

    def headers(self) -> dict[str, tuple[str, list[int]]]:
        return {n: (self.dtype(n), self.shape(n)) for n in self.where}


def export_gguf(src_dir: Path, out_path: Path, gguf_type: str) -> dict[str, Any]:
    """Write ``out_path`` (one .gguf) from the HF model folder ``src_dir`` in ``gguf_type``.

    Returns {"file", "bytes", "gguf_type", "tensors", "exact", "inexact_tensors", "seconds",
    "write_seconds", ...}; ``exact`` is None for a float source, else whether every quantized
    tensor kept its integers and scales. Raises ExportError; the partial file is removed."""
    t0 = time.perf_counter()
    src_dir, out_path = Path(src_dir), Path(out_path)
    config = _config(src_dir)
    source = _Source(src_dir)
    reasons = spec.refusals(config, source.headers(), gguf_type)
    if reasons:
        raise ExportError("; ".join(reasons))
    tmp = out_path.with_name(out_path.name + ".f16.tmp") if gguf_type == "Q4_K_M" else None
    try:
        if tmp is None:
            info = _write(src_dir, config, source, out_path, gguf_type)
        else:
            info = _write(src_dir, config, source, tmp, _float_type(config))
            info.update(_k_quantize(tmp, out_path, gguf_type))
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    report: _Report = info.pop("report")
    quantized = config.get("quantization_config") is not None
    return {
        "file": out_path.name,
        "bytes": out_path.stat().st_size,
        "gguf_type": gguf_type,
        "arch": spec.arch(config),
        "exact": (not report.inexact) if quantized else None,
        "exact_tensors": len(report.exact),
        "inexact_tensors": report.inexact,
        # What _write wrote, unless llama.cpp's quantizer made the file (its K-quant fallbacks
        # are only in the file).
        "tensor_types": info.pop("tensor_types") if tmp is None else _type_counts(out_path),
        "seconds": round(time.perf_counter() - t0, 3),
        **info,
    }


def _type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds (a K-quant's fallbacks show here: llama.cpp
    stores rows that are not a multiple of 256 in a 32-block type). Read from the header alone:
    gguf.GGUFReader would parse every token string first (seconds for a 262k vocabulary)."""
    import struct
    from collections import Counter

    import gguf

    with path.open("rb") as f:
        magic, _, n_tensors, n_kv = struct.unpack("<IIQQ", f.read(24))
        if magic != gguf.GGUF_MAGIC:
            raise ExportError(f"{path.name} is not a GGUF file")
        for _ in range(n_kv):
            _skip_string(f)
            _skip_value(f, struct.unpack("<I", f.read(4))[0])
        counts: Counter[str] = Counter()
        for _ in range(n_tensors):
            _skip_string(f)
            (n_dims,) = struct.unpack("<I", f.read(4))
            f.seek(8 * n_dims, 1)
            (kind,) = struct.unpack("<I", f.read(4))
            f.seek(8, 1)
            counts[gguf.GGMLQuantizationType(kind).name] += 1
    return dict(sorted(counts.items()))


# GGUF value types -> their size in bytes (8: string, 9: array are variable)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_string(f: Any) -> None:
    import struct

    f.seek(struct.unpack("<Q", f.read(8))[0], 1)


def _skip_value(f: Any, kind: int) -> None:
    import struct

    if kind == 8:
        _skip_string(f)
    elif kind == 9:
        item, n = struct.unpack("<IQ", f.read(12))
        if item in _GGUF_SIZES:
            f.seek(n * _GGUF_SIZES[item], 1)
        else:
            for _ in range(n):
                _skip_value(f, item)
    else:
        f.seek(_GGUF_SIZES[kind], 1)


def _config(src_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((src_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"config.json: {e}") from e


def _float_type(config: dict[str, Any]) -> str:
    """The 16-bit type of the intermediate file a K-quant is made from: BF16 for a bfloat16 model
    (no range lost), F16 otherwise."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return "BF16" if dtype == "bfloat16" else "F16"


# --- the file -------------------------------------------------------------------------------------


def _write(src_dir: Path, config: dict[str, Any], source: _Source, path: Path, gguf_type: str) -> dict[str, Any]:
    import gguf

    arch = spec.arch(config)
    assert arch is not None
    writer = _bulk_writer_class()(path, arch)
    try:
        _metadata(writer, config, src_dir, gguf_type)
        vocab = _vocab(writer, src_dir, config)
        report = _Report()
        items = list(_plan(config, source, gguf_type, report))
        for it in items:
            writer.add_tensor_info(it.name, _byte_shape(it), _np_dtype(it.qtype), _nbytes(it), raw_dtype=it.qtype)
        t_write = time.perf_counter()
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for it in items:
            writer.write_tensor_data(_produce(it))
        writer.close()
    except ExportError:
        writer.close()
        raise
    except Exception as e:
        writer.close()
        raise ExportError(f"writing {path.name}: {type(e).__name__}: {e}") from e
    return {
        "tensors": len(items),
        "tensor_types": dict(sorted(Counter(gguf.GGMLQuantizationType(it.qtype).name for it in items).items())),
        "write_seconds": round(time.perf_counter() - t_write, 3),
        "tokenizer": vocab,
        "report": report,
    }


def _produce(it: _Item) -> Any:
    try:
        data = it.make()
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"tensor {it.source} -> {it.name} ({it.qtype.name}): {type(e).__name__}: {e}") from e
    if data.nbytes != _nbytes(it):
        raise ExportError(f"tensor {it.source} -> {it.name}: {data.nbytes} bytes, expected {_nbytes(it)}")
    return data


def _byte_shape(it: _Item) -> tuple[int, ...]:
    from gguf.quants import quant_shape_to_byte_shape

    return tuple(quant_shape_to_byte_shape(it.shape, it.qtype)) if _is_block(it.qtype) else it.shape


def _is_block(qtype: Any) -> bool:
    return qtype.name in ("Q8_0", "Q4_0")


def _np_dtype(qtype: Any) -> Any:
    import numpy as np

    return {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(qtype.name, np.uint8)


def _nbytes(it: _Item) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[it.qtype]
    return math.prod(it.shape) // block * size


# --- metadata -------------------------------------------------------------------------------------

_FILE_TYPES = {"F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}


def _metadata(w: Any, config: dict[str, Any], src_dir: Path, gguf_type: str) -> None:
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(config.get("_name_or_path") or src_dir.name).rstrip("/").split("/")[-1] or "model")
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
    if gguf_type in ("Q8_0", "Q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch = spec.arch(config)
    if arch == "gpt2":
        _gpt2_metadata(w, config)
    else:
        _llama_metadata(w, config)
    if arch == "gemma3":
        _gemma3_metadata(w, config)


def _gpt2_metadata(w: Any, c: dict[str, Any]) -> None:
    w.add_context_length(c.get("n_positions") or c.get("n_ctx") or 1024)
    w.add_embedding_length(c["n_embd"])
    w.add_feed_forward_length(c.get("n_inner") or 4 * c["n_embd"])
    w.add_block_count(c["n_layer"])
    w.add_head_count(c["n_head"])
    w.add_layer_norm_eps(c.get("layer_norm_epsilon", 1e-5))
    w.add_vocab_size(c["vocab_size"])


def _llama_metadata(w: Any, c: dict[str, Any]) -> None:
    import gguf

    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    kind, rope = spec.rope(c)
    w.add_context_length(c.get("max_position_embeddings") or 2048)
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    w.add_rope_dimension_count(head_dim)
    if head_dim != c["hidden_size"] // heads and spec.arch(c) != "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(c["vocab_size"])
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def _gemma3_metadata(w: Any, c: dict[str, Any]) -> None:
    """What Gemma 3 adds: explicit head size, the local layers' window, which layers are local and
    their rope base, and the final logit soft-cap."""
    head_dim = c.get("head_dim") or 256
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if c.get("sliding_window"):
        w.add_sliding_window(c["sliding_window"])
        if c.get("layer_types"):  # which layers are local, as the config says (llama.cpp assumes 5 of 6)
            w.add_sliding_window_pattern([t == "sliding_attention" for t in c["layer_types"]])
        local = (c.get("rope_parameters") or {}).get("sliding_attention") or {}
        w.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
    if c.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))


# --- tokenizer ------------------------------------------------------------------------------------

# Pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre), told apart by their digits
# rule; anything else gets "default" (llama.cpp's GPT-2-like split) and the result says so.
_PRE_DIGITS = {r"\p{N}{1,3}": "llama-bpe", r"\p{N}|": "qwen2"}


def _vocab(w: Any, src_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Tokens, types, merges/scores, special ids, add_bos/eos and chat template into ``w``."""
    path = src_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError("tokenizer: no tokenizer.json (GGUF carries the tokenizer; a fast tokenizer is needed)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"tokenizer: a {model.get('type')} tokenizer has no llama.cpp equivalent here "
            "(BPE tokenizers are exported: byte-level like GPT-2/Llama 3/Qwen, "
            "or SentencePiece-style with byte fallback)"
        )
    n_vocab = config["vocab_size"]
    spm = bool(model.get("byte_fallback"))
    tokens, types = _tokens(tok, n_vocab, spm)
    w.add_tokenizer_model("llama" if spm else "gpt2")
    pre = "default" if spm else _pre_name(tok)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        # llama.cpp's SentencePiece merges by score: earlier merges (lower rank) score higher.
        w.add_token_scores(_spm_scores(model, tokens))
        # llama.cpp prepends "▁" to SentencePiece input unless told not to; HF says it in the
        # normalizer (Prepend) or the Metaspace pre-tokenizer (Gemma prepends nothing)
        w.add_add_space_prefix(_space_prefix(tok))
    special = _special_vocab(src_dir, tok, spm, n_vocab)
    special.add_to_gguf(w, quiet=True)
    return {
        "model": "llama" if spm else "gpt2",
        "pre": pre,
        "tokens": len(tokens),
        "chat_template": special.chat_template is not None,
    }


def _special_vocab(src_dir: Path, tok: dict[str, Any], spm: bool, n_vocab: int) -> Any:
    """gguf-py's SpecialVocab (special token ids, add_bos/eos, chat template, merges) read from a
    folder whose tokenizer.json holds only what it reads of it: parsing the whole file again took
    ~1 s for a 262k-token vocabulary (Gemma 3), a third of such an export. The model's other files
    are symbolic links to the originals."""
    import gguf

    trimmed = {k: tok[k] for k in ("added_tokens", "post_processor") if k in tok}
    if not spm:
        trimmed["model"] = {"merges": (tok.get("model") or {}).get("merges")}
    with tempfile.TemporaryDirectory(prefix="gguf-vocab-") as d:
        for p in src_dir.iterdir():
            if p.name != "tokenizer.json" and p.suffix != ".safetensors":
                (Path(d) / p.name).symlink_to(p.resolve())
        (Path(d) / "tokenizer.json").write_text(json.dumps(trimmed), encoding="utf-8")
        return gguf.SpecialVocab(Path(d), load_merges=not spm, n_vocab=n_vocab)


@functools.cache
def _bulk_writer_class() -> type:
    import gguf

    class BulkWriter(gguf.GGUFWriter):  # type: ignore[misc]
        """gguf-py's writer, packing a metadata array of strings, integers or floats in one go:
        it packs each item through a Python call (2.2 s for the 786k values of a 262k-token
        vocabulary's tokens, scores and types). The same bytes (tests/test_export_gguf.py)."""

        _ARRAY_NUMPY = {
            gguf.GGUFValueType.INT32: "<i4",
            gguf.GGUFValueType.UINT32: "<u4",
            gguf.GGUFValueType.FLOAT32: "<f4",
        }

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            import struct

            import numpy as np

            if vtype != gguf.GGUFValueType.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE or not val:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            if isinstance(val, bytes) or not isinstance(val, (list, tuple)):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
            head = struct.pack("<I", vtype) if add_vtype else b""
            head += struct.pack("<IQ", ltype, len(val))
            if ltype == gguf.GGUFValueType.STRING and all(type(v) is str for v in val):
                encoded = [v.encode("utf-8") for v in val]
                lengths = np.fromiter((len(e) for e in encoded), dtype="<u8", count=len(encoded)).tobytes()
                parts = [b""] * (2 * len(encoded))
                parts[0::2] = [lengths[i : i + 8] for i in range(0, len(lengths), 8)]
                parts[1::2] = encoded
                return head + b"".join(parts)
            dtype = self._ARRAY_NUMPY.get(ltype)
            # As gguf-py would pack them: one Python type throughout when the type is inferred,
            # integers for an integer type, integers or floats for FLOAT32.
            kinds = {type(v) for v in val}
            ok = kinds <= ({int, float} if ltype == gguf.GGUFValueType.FLOAT32 else {int})
            if sub_type is None:
                ok = ok and len(kinds) == 1
            if dtype is not None and ok:
                arr = np.asarray(val, dtype=np.float64 if ltype == gguf.GGUFValueType.FLOAT32 else np.int64)
                if ltype != gguf.GGUFValueType.FLOAT32 and (
                    arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max
                ):
                    return super()._pack_val(val, vtype, add_vtype, sub_type)  # its own error
                return head + arr.astype(dtype).tobytes()
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return BulkWriter


def _tokens(tok: dict[str, Any], n_vocab: int, spm: bool) -> tuple[list[str], list[int]]:
    import gguf

    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    for text, i in tok["model"]["vocab"].items():
        _put(tokens, i, text)
        if spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = int(gguf.TokenType.BYTE)
    for a in tok.get("added_tokens") or []:
        _put(tokens, a["id"], a["content"])
        types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # embedding rows past the tokenizer (padded vocabularies), as convert_hf_to_gguf
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    return [t for t in tokens if t is not None], types


def _put(tokens: list[str | None], i: int, text: str) -> None:
    if not 0 <= i < len(tokens):
        raise ExportError(f"tokenizer: token {text!r} has id {i}, outside the model's vocab_size {len(tokens)}")
    tokens[i] = text


def _spm_scores(model: dict[str, Any], tokens: list[str]) -> list[float]:
    rank: dict[str, int] = {}
    for k, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, k)
    # merged pieces below every single character (0), the first merge highest
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def _space_prefix(tok: dict[str, Any]) -> bool:
    if '"Prepend"' in json.dumps(tok.get("normalizer") or {}):
        return True
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    if '"Metaspace"' not in pre:
        return False
    return '"never"' not in pre and '"add_prefix_space": false' not in pre


def _pre_name(tok: dict[str, Any]) -> str:
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    if '"Split"' in pre:
        for digits, name in _PRE_DIGITS.items():
            if json.dumps(digits)[1:-1] in pre:
                return name
        return "default"
    return "gpt-2" if '"ByteLevel"' in pre else "default"


# --- tensors --------------------------------------------------------------------------------------


def _plan(config: dict[str, Any], source: _Source, gguf_type: str, report: _Report) -> Iterator[_Item]:
    """The GGUF tensors in the source's order, each with a producer that reads it when written."""
    import gguf

    arch = spec.arch(config)
    n_layers = config.get("num_hidden_layers") or config.get("n_layer")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    scheme = _scheme(config)
    modules = {n.rsplit(".", 1)[0] for n in source.names() if n.endswith(".weight_scale")}
    tied = _tied(config, source)
    for name in source.names():
        module, _, leaf = name.rpartition(".")
        if _SKIP.search(name) or (module in modules and leaf in _QUANT_LEAVES):
            continue
        quantized = module in modules and leaf in ("weight", "weight_packed")
        hf = f"{module}.weight" if quantized else name
        if tied and hf == "lm_head.weight":
            continue
        new = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"tensor {name}: no GGUF name for it in llama.cpp's {arch} architecture")
        if quantized:
            yield _quantized_item(config, source, scheme, module, new, gguf_type, report)
        else:
            yield _float_item(config, source, name, new, gguf_type, scheme is not None)
    if spec.rope(config)[0] == "llama3" and arch == "llama":
        yield _rope_freqs(config)


def _tied(config: dict[str, Any], source: _Source) -> bool:
    if config.get("tie_word_embeddings", spec.arch(config) == "gpt2"):
        return True
    return "lm_head.weight" not in source.where


def _scheme(config: dict[str, Any]) -> _Scheme | None:
    qc = config.get("quantization_config")
    if not qc:
        return None
    groups = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
    keys = {(w.get("num_bits"), w.get("symmetric", True), w.get("strategy"), w.get("group_size")) for w in groups}
    if len(keys) != 1:
        raise ExportError(f"quantization_config: {len(keys)} different weight schemes; one is converted")
    bits, symmetric, strategy, group = keys.pop()
    if strategy not in ("channel", "group", "tensor"):
        raise ExportError(f"quantization_config: weight strategy {strategy!r} is not converted to GGUF")
    return _Scheme(qc.get("format") or "dense", int(bits), bool(symmetric), group if strategy == "group" else None)


def _row_transform(config: dict[str, Any], hf: str) -> tuple[Callable[[Any], Any], bool]:
    """Tensors rearranged the way llama.cpp expects, and whether that transposes: Llama q/k rows
    permuted into its rotary layout (alike for weights, biases, integers and scales), GPT-2
    Conv1D (in, out) transposed, Gemma 3 norms shifted by 1."""
    arch = spec.arch(config)
    if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        heads = config["num_attention_heads"]
        if ".k_proj." in hf:
            heads = config.get("num_key_value_heads") or heads
        return (lambda t: _permute(t, heads)), False
    if arch == "gpt2" and hf.endswith(spec.CONV1D_SUFFIXES):
        return (lambda t: t.t()), True
    if arch == "gemma3" and hf.endswith("norm.weight"):
        # Gemma3RMSNorm scales by (1 + w) in float32; llama.cpp's norm scales by its weight
        return (lambda t: t.float() + 1.0), False
    return (lambda t: t), False


def _permute(t: Any, heads: int) -> Any:
    shape = t.shape
    return t.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _float_qtype(gguf_type: str, new: str, shape: list[int], dtype: str, quantized_source: bool, head: str) -> Any:
    """The type of a tensor stored in float; ``head`` is the GGUF name of the LM head
    (``token_embd.weight`` when tied)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or new.startswith("position_embd") or new.startswith("rope_freqs"):
        return q.F32
    if quantized_source and gguf_type in ("Q8_0", "Q4_0"):
        # the steps left this matrix in float: keep it as stored, so the file is the job's model
        return {"BF16": q.BF16, "F16": q.F16}.get(dtype, q.F32)
    if gguf_type == "Q4_0" and new == head:
        # as llama.cpp's quantizer: the head (the embeddings, when tied) at higher precision
        return q.Q8_0
    return getattr(q, gguf_type)


def _float_item(config: dict[str, Any], source: _Source, name: str, new: str, gguf_type: str, qsrc: bool) -> _Item:
    shape = source.shape(name)
    head = "token_embd.weight" if _tied(config, source) else "output.weight"
    qtype = _float_qtype(gguf_type, new, shape, source.dtype(name), qsrc, head)
    transform, transposes = _row_transform(config, name)
    if transposes:
        shape = shape[::-1]

    def make() -> Any:
        return _encode(transform(source.get(name)), qtype)

    return _Item(new, tuple(shape), qtype, make, name)


def _encode(t: Any, qtype: Any) -> Any:
    """A float torch tensor in the bytes of ``qtype`` (numpy)."""
    import torch
    from gguf import quants

    name = qtype.name
    if name == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if name == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if name == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("uint16")
    return quants.quantize(t.to(torch.float32).contiguous().numpy(), qtype)


def _rope_freqs(config: dict[str, Any]) -> _Item:
    """Llama 3's long-context rotary factors, one per frequency (as convert_hf_to_gguf computes them)."""
    import gguf

    _, rope = spec.rope(config)
    base = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, lo, hi = (
        float(rope.get("factor", 8.0)),
        float(rope.get("low_freq_factor", 1.0)),
        float(rope.get("high_freq_factor", 4.0)),
    )
    old = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / hi:
            factors.append(1.0)
        elif wavelen > old / lo:
            factors.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            factors.append(1 / ((1 - smooth) / factor + smooth))

    def make() -> Any:
        import numpy as np

        return np.asarray(factors, dtype=np.float32)

    return _Item("rope_freqs.weight", (len(factors),), gguf.GGMLQuantizationType.F32, make, "rope_scaling")


# --- compressed-tensors sources -------------------------------------------------------------------


def _quantized_item(
    config: dict[str, Any],
    source: _Source,
    scheme: _Scheme | None,
    module: str,
    new: str,
    gguf_type: str,
    report: _Report,
) -> _Item:
    import gguf

    assert scheme is not None
    if f"{module}.weight_g_idx" in source.where:
        raise ExportError(f"tensor {module}: activation-ordered groups (weight_g_idx) are not converted to GGUF")
    rows, cols = _int_shape(source, scheme, module)
    transform, transposes = _row_transform(config, f"{module}.weight")
    if transposes:
        raise ExportError(f"tensor {module}: quantized Conv1D weights are not converted to GGUF")
    exact = _exact_block(scheme, gguf_type)
    q = gguf.GGMLQuantizationType
    qtype = getattr(q, gguf_type) if gguf_type != "Q4_K_M" else getattr(q, _float_type(config))

    def make() -> Any:
        ints, scale, zp = _ints(source, scheme, module, rows, cols)
        if exact is not None and (zp is None or not zp.any()):
            data, ok = _blocks(transform(ints), transform(scale), exact, scheme, cols)
            (report.exact if ok else report.inexact).append(module)
            return data
        report.inexact.append(module)
        return _encode(transform(_dequantize(ints, scale, zp, cols)), qtype)

    return _Item(new, (rows, cols), qtype, make, f"{module}.weight")


def _exact_block(scheme: _Scheme, gguf_type: str) -> str | None:
    """The block type the stored integers go into as they are, None when they do not fit."""
    if not scheme.symmetric or (scheme.group is not None and scheme.group % 32):
        return None
    if gguf_type == "Q8_0" and scheme.bits <= 8:
        return "Q8_0"
    if gguf_type == "Q4_0" and scheme.bits <= 4:
        return "Q4_0"
    return None


def _int_shape(source: _Source, scheme: _Scheme, module: str) -> tuple[int, int]:
    if scheme.fmt == "pack-quantized":
        rows, cols = (int(x) for x in source.get(f"{module}.weight_shape").tolist())
        return rows, cols
    shape = source.shape(f"{module}.weight")
    if len(shape) != 2:
        raise ExportError(f"tensor {module}.weight: shape {shape}, expected a matrix")
    return shape[0], shape[1]


def _ints(source: _Source, scheme: _Scheme, module: str, rows: int, cols: int) -> tuple[Any, Any, Any]:
    """(int8 integers (rows, cols), scale (rows, groups) in its stored dtype, zero point or None)."""
    import torch

    if scheme.fmt == "pack-quantized":
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        ints = unpack_from_int32(source.get(f"{module}.weight_packed"), scheme.bits, torch.Size([rows, cols]))
    else:
        ints = source.get(f"{module}.weight")
    if ints.dtype != torch.int8:
        ints = ints.to(torch.int8)
    scale = source.get(f"{module}.weight_scale")
    zp_name = f"{module}.weight_zero_point"
    zp = source.get(zp_name) if zp_name in source.where else None
    scale = scale.reshape(rows, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(rows, 1)
    return ints, scale, zp


def _expand(scale: Any, cols: int, per: int) -> Any:
    """(rows, groups) scales -> one per ``per`` columns (rows, cols / per)."""
    groups = scale.shape[1]
    return scale.repeat_interleave(cols // per // groups, dim=1)


def _dequantize(ints: Any, scale: Any, zp: Any, cols: int) -> Any:
    """compressed-tensors' dequantization: ``(q - zero_point) * scale`` in the scale's dtype."""
    q = ints.to(scale.dtype)
    full = _expand(scale, cols, 1)
    if zp is not None:
        q = q - _expand(zp.reshape(scale.shape).to(scale.dtype), cols, 1)
    return q * full


def _blocks(ints: Any, scale: Any, kind: str, scheme: _Scheme, cols: int) -> tuple[Any, bool]:
    """Q8_0 / Q4_0 bytes straight from the integers and scales; whether every scale is exact in
    float16. A block: float16 ``d`` then 32 int8 (Q8_0) or 16 bytes of nibbles ``q + 8``, element
    j in the low nibble of byte j and element j + 16 in the high one (Q4_0)."""
    import numpy as np
    import torch

    if cols % 32:
        raise ExportError(f"rows of {cols} weights are not a multiple of 32")
    d = _expand(scale, cols, 32).reshape(-1, 1)
    d16 = d.to(torch.float16)
    ok = bool(torch.equal(d16.to(d.dtype), d)) and bool(torch.isfinite(d16).all())
    q = ints.reshape(-1, 32)
    if kind == "Q8_0":
        qs = q.numpy().view(np.uint8)
    else:
        if int(q.min()) < -8 or int(q.max()) > 7:
            raise ExportError("4-bit integers outside -8..7")
        u = (q + 8).to(torch.uint8)
        qs = (u[:, :16] | (u[:, 16:] << 4)).numpy()
    head = d16.numpy().view(np.uint8)
    rows = ints.shape[0]
    return np.concatenate([head, qs], axis=1).reshape(rows, -1), ok


# --- K-quants -------------------------------------------------------------------------------------

_LLAMA_FTYPES = {"Q4_K_M": 15}  # llama.h's LLAMA_FTYPE_MOSTLY_Q4_K_M


def _k_quantize(src: Path, out: Path, gguf_type: str) -> dict[str, Any]:
    """llama.cpp's quantizer on the 16-bit file ``src`` (its own K-quant mix and fallbacks)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"{gguf_type} needs llama.cpp's quantizer (llama-cpp-python), which is not installed") from e
    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _LLAMA_FTYPES[gguf_type]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise ExportError(f"llama.cpp's quantizer ({gguf_type}) failed with status {rc}")
    return {"quantize_seconds": round(time.perf_counter() - t0, 3), "intermediate_type": src.name}
