"""Synthetic Llama checkpoints of any size, laid out exactly like a Hugging Face upload.

    .venv/bin/python bench/gen_checkpoint.py OUT --size 30GiB                 # ~16B parameters, bf16
    .venv/bin/python bench/gen_checkpoint.py OUT --size 2GiB --tokenizer      # for calibrated methods
    .venv/bin/python bench/gen_checkpoint.py OUT --hidden 4096 --layers 32    # Llama-2-7B shapes

    from bench.gen_checkpoint import generate
    info = generate("out", size="2GiB")          # -> GeneratedCheckpoint (config, files, bytes, ...)

What it writes (the files ``LlamaForCausalLM.save_pretrained`` writes, and nothing it would not):

* ``config.json`` (``LlamaConfig(...).to_json_file``, ``architectures: ["LlamaForCausalLM"]``,
  ``dtype`` set) and ``generation_config.json``;
* ``model.safetensors`` when everything fits one shard, else ``model-0000k-of-0000n.safetensors``
  plus ``model.safetensors.index.json`` (``{"metadata": {"total_parameters", "total_size"},
  "weight_map"}``, ``indent=2, sort_keys=True``). The split is huggingface_hub's own
  ``split_state_dict_into_shards_factory`` (the function ``save_pretrained`` calls) run on the
  tensors' sizes, so shard boundaries and names are the ones transformers would choose for the
  same cap. The default cap is 5 GB (``"5GB"``, decimal), what most Hub uploads use;
  transformers 5's own default is 50 GB, which would not shard anything under 50 GB.
* Inside a shard, the safetensors layout of ``safetensors.torch.save_file``: an 8-byte header
  length, a compact JSON header with ``__metadata__: {"format": "pt"}`` first and tensors sorted
  by name, padded with spaces to a multiple of 8, then the tensors' bytes in the same order.
  The tensor names and shapes are ``LlamaForCausalLM``'s (untied ``lm_head``, no biases);
  ``tests/test_gen_checkpoint.py`` compares them with the model built on the meta device.
* With ``--tokenizer``: a byte-level BPE ``tokenizer.json`` (256 byte tokens + BOS/EOS/PAD, no
  merges) and ``tokenizer_config.json``, JSON only as the service accepts; calibrated methods
  (GPTQ, Wanda, ...) tokenize their dataset with it.

Weights. Linear and embedding weights are normal(0, 0.02)-like; norm weights are ones (as
transformers initialises them). Two fills (``--fill``):

* ``pool`` (default): a pool of 64 random blocks of 2^20 values is drawn once (normal, each block
  with its own scale 0.02 * 2^u, u uniform in [-0.5, 0.5]); each tensor is filled 2^20 values at
  a time with a pool block picked by a per-tensor seeded generator and rotated by a random offset.
  Values repeat across the file, but no two neighbouring blocks are alike and every row sees
  realistic magnitudes, which is what quantizers (group scales) and magnitude pruning (a global
  threshold) look at. Writing is then a memory copy: the disk is the limit (~30 GiB in about a
  minute here), while drawing every value is ~60 M values/s on this machine's CPUs (~5 min for
  30 GiB of bf16).
* ``randn``: every value drawn (numpy PCG64 normal * 0.02), 2^20 at a time.

Both are deterministic for a ``--seed``. Memory stays bounded whatever the size: one tensor's
header entry at a time is all that is planned, and bytes go to the file 2^20 values at a time
(the pool is 64 x 2^20 values; ~256 MiB in float32, kept in the output dtype: 128 MiB for bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BLOCK = 1 << 20  # values written per chunk
POOL_BLOCKS = 64
STD = 0.02

# safetensors dtype name and bytes per value.
DTYPES = {"bf16": ("BF16", 2), "fp16": ("F16", 2), "fp32": ("F32", 4)}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Hidden sizes tried when only a size is given, each with the depth real Llamas of that width have
# (1B: 2048 x 16, 7B: 4096 x 32, 13B: 5120 x 40, 65/70B: 8192 x 80): the one whose depth for the
# requested size comes closest to its natural depth wins.
LADDER = {512: 8, 1024: 12, 2048: 16, 3072: 28, 4096: 32, 5120: 40, 6656: 60, 8192: 80}


def parse_size(text: str | int) -> int:
    """``30GiB``, ``2.5GB``, ``500MiB``, ``123456`` -> bytes (GiB/MiB/KiB binary, GB/MB/KB decimal)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"unreadable size {text!r} (e.g. 30GiB, 2GB, 500MiB, 123456)")
    unit = (m.group(2) or "B").upper()
    mult = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    return int(float(m.group(1)) * mult)


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def llama_intermediate(hidden: int) -> int:
    """Llama's FFN width: 2/3 of 4H rounded up to a multiple of 256 (4096 -> 11008, 5120 -> 13824)."""
    return -(-int(2 * 4 * hidden / 3) // 256) * 256


def tensor_shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    """Name -> shape, in ``LlamaForCausalLM.state_dict()`` order (which decides the sharding)."""
    hd = s.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (s.heads * hd, s.hidden)
        out[p + "self_attn.k_proj.weight"] = (s.kv_heads * hd, s.hidden)
        out[p + "self_attn.v_proj.weight"] = (s.kv_heads * hd, s.hidden)
        out[p + "self_attn.o_proj.weight"] = (s.hidden, s.heads * hd)
        out[p + "mlp.gate_proj.weight"] = (s.intermediate, s.hidden)
        out[p + "mlp.up_proj.weight"] = (s.intermediate, s.hidden)
        out[p + "mlp.down_proj.weight"] = (s.hidden, s.intermediate)
        out[p + "input_layernorm.weight"] = (s.hidden,)
        out[p + "post_attention_layernorm.weight"] = (s.hidden,)
    out["model.norm.weight"] = (s.hidden,)
    out["lm_head.weight"] = (s.vocab, s.hidden)
    return out


def _params_per_layer(hidden: int, intermediate: int, heads: int, kv_heads: int) -> int:
    hd = hidden // heads
    return 2 * hidden * heads * hd + 2 * hidden * kv_heads * hd + 3 * hidden * intermediate + 2 * hidden


def plan_shape(
    size_bytes: int | None = None,
    dtype: str = "bf16",
    *,
    hidden: int | None = None,
    intermediate: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    vocab: int = 32000,
) -> Shape:
    """Shapes for a checkpoint of at least ``size_bytes`` of tensor data (the layer count rounds
    up), or exactly the ones given. Widths default to Llama's rules: heads of 128, FFN from
    :func:`llama_intermediate`, grouped-query attention (8 KV heads) from hidden 8192 up."""
    itemsize = DTYPES[dtype][1]

    def complete(h: int) -> tuple[int, int, int]:
        nh = heads or max(1, h // 128)
        nkv = kv_heads or (8 if h >= 8192 else nh)
        return intermediate or llama_intermediate(h), nh, nkv

    if layers is None:
        if size_bytes is None:
            raise ValueError("give a size, or the number of layers")
        target = size_bytes / itemsize

        def depth(h: int) -> int:
            inter, nh, nkv = complete(h)
            fixed = 2 * vocab * h + h
            return max(1, math.ceil((target - fixed) / _params_per_layer(h, inter, nh, nkv)))

        if hidden is None:
            hidden = min(LADDER, key=lambda h: abs(math.log(depth(h) / LADDER[h])))
        layers = depth(hidden)
    elif hidden is None:
        hidden = 4096
    inter, nh, nkv = complete(hidden)
    shape = Shape(hidden, inter, layers, nh, nkv, vocab)
    # Group-128 quantization groups along each Linear's input dimension (hidden for q/k/v/gate/up,
    # intermediate for down_proj): both must be multiples of 128 for every group to be full.
    for name, v in (("hidden", shape.hidden), ("intermediate", shape.intermediate)):
        if v % 128:
            raise ValueError(f"{name} size {v} is not a multiple of 128 (group-128 quantization needs it)")
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(
            f"hidden {shape.hidden} must divide into {shape.heads} heads, and those into {shape.kv_heads} KV heads"
        )
    return shape


def llama_config(s: Shape, dtype: str):  # noqa: ANN201 - a transformers LlamaConfig
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        vocab_size=s.vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = TORCH_DTYPE_NAMES[dtype]
    return cfg


# --- safetensors writing -------------------------------------------------------------------------


def _header(names: list[str], shapes: dict[str, tuple[int, ...]], st_dtype: str, itemsize: int) -> bytes:
    """The header ``safetensors.torch.save_file`` writes for these tensors (same dtype: sorted by
    name), padded with spaces to a multiple of 8 bytes."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(names):
        n = math.prod(shapes[name]) * itemsize
        entries[name] = {"dtype": st_dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the output dtype's bytes (bf16: round to nearest even on the upper 16 bits)."""
    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return x.astype(np.float16)
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class _Filler:
    def __init__(self, dtype: str, fill: str, seed: int) -> None:
        self.dtype, self.fill, self.seed = dtype, fill, seed
        self.itemsize = DTYPES[dtype][1]
        # Pool blocks are drawn on first use (a tiny checkpoint needs a few, not 64), each from its
        # own seeded generator so the order of use does not change them.
        self.pool: list[bytes | None] = [None] * POOL_BLOCKS
        if fill not in ("pool", "randn"):
            raise ValueError(f"fill is 'pool' or 'randn', not {fill!r}")
        self.ones = _to_dtype(np.ones(BLOCK, dtype=np.float32), dtype).tobytes()

    def _block(self, i: int) -> bytes:
        if self.pool[i] is None:
            rng = np.random.default_rng([self.seed, 0x9001, i])
            x = rng.standard_normal(BLOCK, dtype=np.float32)
            x *= np.float32(STD * 2.0 ** rng.uniform(-0.5, 0.5))
            self.pool[i] = _to_dtype(x, self.dtype).tobytes()
        return self.pool[i]

    def chunks(self, name: str, numel: int) -> Iterator[bytes | memoryview]:
        """The tensor's bytes, at most BLOCK values per chunk."""
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            for start in range(0, numel, BLOCK):
                yield memoryview(self.ones)[: min(BLOCK, numel - start) * self.itemsize]
            return
        # A generator per tensor, seeded from the seed and the name: any tensor can be regenerated
        # on its own, and the order tensors are written in does not change their values.
        rng = np.random.default_rng([self.seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])
        for start in range(0, numel, BLOCK):
            n = min(BLOCK, numel - start)
            if self.fill == "randn":
                x = rng.standard_normal(n, dtype=np.float32)
                x *= np.float32(STD)
                yield _to_dtype(x, self.dtype).tobytes()
                continue
            block = memoryview(self._block(int(rng.integers(POOL_BLOCKS))))
            off = int(rng.integers(BLOCK)) * self.itemsize
            want = n * self.itemsize
            first = block[off : off + want]
            yield first
            if len(first) < want:
                yield block[: want - len(first)]


@dataclasses.dataclass
class GeneratedCheckpoint:
    path: Path
    shape: Shape
    dtype: str
    parameters: int
    tensor_bytes: int
    files: list[str]
    file_bytes: int
    seconds: float
    write_seconds: float  # the tensor data alone (imports and config files excluded)


def generate(
    out: str | os.PathLike[str],
    size: str | int | None = None,
    *,
    dtype: str = "bf16",
    hidden: int | None = None,
    intermediate: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    vocab: int = 32000,
    max_shard_size: str | int = "5GB",
    seed: int = 0,
    fill: str = "pool",
    tokenizer: bool = False,
    progress: bool = False,
) -> GeneratedCheckpoint:
    """Write a Llama checkpoint folder at ``out`` (created; must be empty or absent)."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    t_start = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype is one of {sorted(DTYPES)}, not {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    shape = plan_shape(
        parse_size(size) if size is not None else None,
        dtype,
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
    )
    st_dtype, itemsize = DTYPES[dtype]
    shapes = tensor_shapes(shape)
    parameters = sum(math.prod(s) for s in shapes.values())

    cfg = llama_config(shape, dtype)
    cfg.to_json_file(out / "config.json")
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(cfg).to_json_file(out / "generation_config.json")
    if tokenizer:
        write_tokenizer(out)

    # huggingface_hub's splitter over the sizes alone: the same boundaries save_pretrained picks.
    split = split_state_dict_into_shards_factory(
        shapes,
        get_storage_size=lambda s: math.prod(s) * itemsize,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    t_write = time.perf_counter()
    filler = _Filler(dtype, fill, seed)
    written = 0
    total = parameters * itemsize
    last_print = time.perf_counter()
    for filename, names in split.filename_to_tensors.items():
        header = _header(names, shapes, st_dtype, itemsize)
        tmp = out / f".{filename}.part"
        # Unbuffered: chunks are 2-4 MiB, Python's buffer would only add a copy.
        with open(tmp, "wb", buffering=0) as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for name in sorted(names):
                for chunk in filler.chunks(name, math.prod(shapes[name])):
                    view = memoryview(chunk)
                    while view:  # a raw write may be partial
                        view = view[f.write(view) :]
                    written += len(chunk)
                if progress and time.perf_counter() - last_print > 5:
                    last_print = time.perf_counter()
                    rate = written / (last_print - t_write) / 2**20
                    print(
                        f"  {written / 2**30:7.2f} / {total / 2**30:.2f} GiB  {rate:6.0f} MiB/s",
                        file=sys.stderr,
                        flush=True,
                    )
        os.replace(tmp, out / filename)
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": parameters, **split.metadata},
            "weight_map": dict(split.tensor_to_filename),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    files = sorted(p.name for p in out.iterdir())
    return GeneratedCheckpoint(
        out,
        shape,
        dtype,
        parameters,
        total,
        files,
        sum((out / n).stat().st_size for n in files),
        time.perf_counter() - t_start,
        time.perf_counter() - t_write,
    )


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE with no merges: every text tokenizes (one token per byte), ids < 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: pad (config pad_token_id 0), bos 1, eos 2
    vocab = {t: i for i, t in enumerate(specials + sorted(byte_tokens))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    fast.save_pretrained(out)
    # Only JSON reaches the service; anything else save_pretrained may add (e.g. a chat template
    # file) is not part of the checkpoint this generator promises.
    for p in out.iterdir():
        if (p.name.startswith("tokenizer") or p.name == "special_tokens_map.json") and p.suffix != ".json":
            p.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", help="folder to create (must be empty or absent)")
    ap.add_argument("--size", help="tensor bytes, at least (e.g. 30GiB, 2GB): picks widths and depth")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument(
        "--max-shard-size", default="5GB", help="shard cap, as save_pretrained's max_shard_size (default 5GB)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fill", choices=["pool", "randn"], default="pool", help="see the module docstring")
    ap.add_argument("--tokenizer", action="store_true", help="also write a byte-level tokenizer.json")
    args = ap.parse_args(argv)
    if args.size is None and args.layers is None:
        ap.error("give --size or --layers")
    try:
        shard = int(args.max_shard_size)
    except ValueError:
        shard = args.max_shard_size
    info = generate(
        args.out,
        args.size,
        dtype=args.dtype,
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        max_shard_size=shard,
        seed=args.seed,
        fill=args.fill,
        tokenizer=args.tokenizer,
        progress=True,
    )
    s = info.shape
    print(
        f"{info.path}: Llama hidden {s.hidden}, FFN {s.intermediate}, {s.layers} layers, {s.heads} heads "
        f"({s.kv_heads} KV), vocab {s.vocab}, {args.dtype}: {info.parameters / 1e9:.3f}B parameters, "
        f"{info.tensor_bytes / 2**30:.2f} GiB of tensors in {sum(n.endswith('.safetensors') for n in info.files)} "
        f"shard(s), {info.file_bytes / 2**30:.2f} GiB on disk, {info.seconds:.1f} s "
        f"(tensor data {info.write_seconds:.1f} s, {info.tensor_bytes / info.write_seconds / 2**20:.0f} MiB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
