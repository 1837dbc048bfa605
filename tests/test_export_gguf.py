"""GGUF export (core/exports/gguf.py, worker/export/gguf.py) and the llama.cpp runner
(worker/runtimes/llamacpp.py) on tiny Llama / Mistral / Qwen2 / GPT-2 models (hidden 64, 2
layers) with a byte-level BPE tokenizer trained on the test corpus (a GGUF vocabulary needs BPE;
tests/tokenizer_util's word-level one has no llama.cpp equivalent, which is checked too).

What is checked: submit-time refusals and ``exact_type``; every file reads back with
gguf.GGUFReader with its metadata (architecture, tokens, merges, special ids, chat template);
F16 / BF16 / Q8_0 files load in transformers' GGUF loader and give the original logits within
stated tolerances; a compressed-tensors W4 group-32 (and W8 per-channel) artifact made by the
project's own quantize.weight_only is exported to Q4_0 (Q8_0) with weights bit-identical to the
artifact's own dequantization; failures name the tensor and leave no file; llama.cpp loads the
files and its logits match transformers'."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from core.exports import gguf as spec
from tests.tokenizer_util import sentences

VOCAB = 320
IDS = [0, 260, 274, 277, 263, 277, 100, 50, 7, 300]  # BOS, then tokens of the corpus and bytes
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _tokenizer():  # noqa: ANN202 - a transformers PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentences(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = TEMPLATE
    return fast


def _models() -> dict:
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "vocab_size": VOCAB}
    dec = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    dec.update(num_key_value_heads=2, max_position_embeddings=64, **ids)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(**dec)),
        "tiny-mistral": MistralForCausalLM(MistralConfig(**dec)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**dec)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **ids)),
        "gemma3": Gemma3ForCausalLM(Gemma3TextConfig(**dec, head_dim=256, sliding_window=4)),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """The five tiny models (float32) and a bfloat16 Llama, each saved with the tokenizer."""
    root = tmp_path_factory.mktemp("gguf-zoo")
    tok = _tokenizer()
    torch.manual_seed(0)
    out = {}
    for name, model in _models().items():
        with torch.no_grad():  # norms are initialized to 1 (0 for Gemma's 1 + w): make them matter
            for n, p in model.named_parameters():
                if "norm" in n or "ln_" in n:
                    p.normal_(float(p.mean()), 0.3)
        out[name] = root / name
        model.save_pretrained(out[name])
        tok.save_pretrained(out[name])
        if name == "llama":
            out["llama-bf16"] = root / "llama-bf16"
            model.to(torch.bfloat16).save_pretrained(out["llama-bf16"])
            tok.save_pretrained(out["llama-bf16"])
    return out


def _headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _hf(path: Path, gguf_file: str | None = None):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32).eval()


# --- core: refusals and exact_type ----------------------------------------------------------------

LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 320,
    "bos_token_id": 0,
}


@pytest.mark.unit
def test_refusals_name_what_is_wrong() -> None:
    ok = {"model.layers.0.mlp.down_proj.weight": ("BF16", [64, 128]), "model.norm.weight": ("BF16", [64])}
    assert spec.refusals(LLAMA_CONFIG, ok, "Q4_0") == []
    assert spec.refusals(LLAMA_CONFIG, {}, "F16") == []

    (msg,) = spec.refusals({**LLAMA_CONFIG, "model_type": "bert"}, ok, "F16")
    assert "'bert'" in msg and all(t in msg for t in ("gpt2", "llama", "mistral", "qwen2"))

    odd = {**ok, "model.layers.1.mlp.up_proj.weight": ("BF16", [128, 48])}
    (msg,) = spec.refusals(LLAMA_CONFIG, odd, "Q8_0")
    assert "model.layers.1.mlp.up_proj.weight (rows of 48)" in msg and "multiple of 32" in msg
    assert spec.refusals(LLAMA_CONFIG, odd, "F16") == []  # 16-bit floats hold any row
    # GPT-2's Conv1D weights are (in, out): the GGUF row is the first axis
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 320}
    assert spec.refusals(gpt2, {"h.0.mlp.c_fc.weight": ("F32", [64, 250])}, "Q4_0") == []
    assert "rows of 250" in spec.refusals(gpt2, {"h.0.mlp.c_proj.weight": ("F32", [250, 64])}, "Q4_0")[0]
    # packed 4-bit integers: 8 a word, so 6 words are rows of 48
    packed = {**LLAMA_CONFIG, "quantization_config": _ct_config(4, 32, "pack-quantized")}
    assert "rows of 48" in spec.refusals(packed, {"m.w.weight_packed": ("I32", [64, 6])}, "Q4_K_M")[0]

    assert "GGUF type 'Q3_K'" in spec.refusals(LLAMA_CONFIG, ok, "Q3_K")[0]
    wrong_vocab = {"model.embed_tokens.weight": ("BF16", [300, 64])}
    assert "vocab_size is 320" in spec.refusals(LLAMA_CONFIG, wrong_vocab, "F16")[0]
    assert "outside the vocabulary" in spec.refusals({**LLAMA_CONFIG, "bos_token_id": 320}, {}, "F16")[0]
    assert "num_key_value_heads 3" in spec.refusals({**LLAMA_CONFIG, "num_key_value_heads": 3}, {}, "F16")[0]
    yarn = {**LLAMA_CONFIG, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    assert "rope type 'yarn'" in spec.refusals(yarn, {}, "F16")[0]
    sparse = {
        **LLAMA_CONFIG,
        "quantization_config": {**_ct_config(8, None, "dense"), "sparsity_config": {"format": "sparse-24-bitmask"}},
    }
    assert "sparse" in spec.refusals(sparse, {}, "F16")[0]
    assert (
        "lacks hidden_size"
        in spec.refusals({k: v for k, v in LLAMA_CONFIG.items() if k != "hidden_size"}, {}, "F16")[0]
    )


def _ct_config(bits: int, group: int | None, fmt: str, symmetric: bool = True) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group else "channel"}
    if group:
        weights["group_size"] = group
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": {"weights": weights}}}


@pytest.mark.unit
def test_exact_type_follows_the_last_quantization() -> None:
    def wo(**p):  # noqa: ANN202
        return {"method": "quantize.weight_only", "params": p}

    assert spec.exact_type([wo(bits=4, group_size=32)]) == "Q4_0"
    assert spec.exact_type([wo(bits=8, group_size=32)]) == "Q8_0"
    assert spec.exact_type([wo(bits=8)]) == "Q8_0"  # one scale a row: every block takes the row's
    assert spec.exact_type([wo(bits=4, group_size=128)]) == "Q4_0"
    assert spec.exact_type([wo(bits=4, group_size=32, symmetric=False)]) is None  # zero points
    prune = {"method": "prune.magnitude", "params": {"sparsity": 0.5}}
    assert spec.exact_type([prune, wo(bits=4, group_size=32)]) == "Q4_0"
    assert spec.exact_type([prune]) is None
    assert spec.exact_type([]) is None
    assert spec.exact_type([{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}]) is None
    assert spec.exact_type([{"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 32}}]) == "Q4_0"
    assert spec.exact_type([{"method": "quantize.gptq", "params": {"scheme": "W8A16"}}]) == "Q8_0"
    assert spec.exact_type([{"method": "quantize.fixed_point", "params": {"frac_bits": 7}}]) == "Q8_0"
    assert spec.exact_type([{"method": "quantize.fixed_point", "params": {"frac_bits": 3, "bits": 4}}]) == "Q4_0"
    assert set(spec.GGUF_TYPES) >= {"F16", "BF16", "Q8_0", "Q4_0"} and "Q4_K_M" in spec.GGUF_TYPES
    assert {"llama", "mistral", "qwen2", "gpt2"} <= set(spec.MODEL_TYPES)


# --- worker: files, transformers' loader ----------------------------------------------------------

# max |logit difference| to the float32 original, from measurements on these models (logits up to
# ~0.9): F16 2.3e-4, BF16 2.2e-3, Q8_0 6.7e-3 (Q4_0 ~0.1, not checked against a bound).
TOLERANCE = {"F16": 2e-3, "BF16": 1e-2, "Q8_0": 3e-2}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["llama", "tiny-mistral", "qwen2", "gpt2", "gemma3"])
def test_gguf_reads_back_and_loads_in_transformers(zoo, tmp_path, name) -> None:
    import gguf

    from worker.export.gguf import export_gguf

    src = zoo[name]
    ref = _logits(_hf(src), IDS)
    for gguf_type in ("F16", "Q8_0"):
        res = export_gguf(src, tmp_path / f"m-{gguf_type}.gguf", gguf_type)
        assert res["file"] == f"m-{gguf_type}.gguf" and res["bytes"] == (tmp_path / res["file"]).stat().st_size
        assert res["exact"] is None and res["inexact_tensors"] == []
        reader = gguf.GGUFReader(tmp_path / res["file"])
        assert len(reader.tensors) == res["tensors"]
        _check_metadata(reader, spec.MODEL_TYPES[json.loads((src / "config.json").read_text())["model_type"]])
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["token_embd.weight"] == gguf_type and types["output_norm.weight"] == "F32"
        got = _logits(_hf(tmp_path, res["file"]), IDS)
        assert (got - ref).abs().max().item() <= TOLERANCE[gguf_type], (name, gguf_type)


def _check_metadata(reader, arch: str) -> None:  # noqa: ANN001
    def field(key: str):  # noqa: ANN202
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == 2 and field(f"{arch}.embedding_length") == 64
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and tokens[:3] == ["<s>", "</s>", "<pad>"]
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # control, then normal
    assert len(field("tokenizer.ggml.merges")) == VOCAB - 256 - 3
    assert field("tokenizer.ggml.bos_token_id") == 0 and field("tokenizer.ggml.eos_token_id") == 1
    assert field("tokenizer.ggml.add_bos_token") is True
    assert field("tokenizer.chat_template") == TEMPLATE


@pytest.mark.integration
def test_bf16_and_q4_0_from_a_bfloat16_model(zoo, tmp_path) -> None:
    import gguf

    from worker.export.gguf import export_gguf

    src = zoo["llama-bf16"]
    ref = _logits(_hf(src), IDS)
    res = export_gguf(src, tmp_path / "bf16.gguf", "BF16")
    assert (_logits(_hf(tmp_path, "bf16.gguf"), IDS) - ref).abs().max().item() == 0.0  # bf16 kept as is
    res = export_gguf(src, tmp_path / "q4.gguf", "Q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q4.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q4_0"
    # a head tied to the embeddings (Gemma 3 here) is token_embd itself: Q8_0, and no output.weight
    export_gguf(zoo["gemma3"], tmp_path / "tied.gguf", "Q4_0")
    tied = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    assert tied["token_embd.weight"] == "Q8_0" and "output.weight" not in tied
    got = _logits(_hf(tmp_path, "q4.gguf"), IDS)
    # 4-bit round to nearest on a random model: close in direction, not in value
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item() > 0.9
    assert res["exact"] is None


# --- the exact path -------------------------------------------------------------------------------


def _quantize(src: Path, out: Path, params: dict, name: str = "quantize.weight_only") -> Path:
    """The project's own quantization method (in memory), saved as the job saves it."""
    from worker import methods, model_io

    loaded = model_io.load(src, "hf")
    method = methods.get(name)
    method.handler(loaded, method.params.model_validate(params), None)
    model_io.save(loaded, out, {"modelpress_manifest": 1, "test": True})
    return out


def _artifact_weights(path: Path) -> dict[str, torch.Tensor]:
    """The artifact's own dequantized weights: compressed-tensors' unpack and dequantize."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors import safe_open

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**qc["config_groups"]["group_0"]["weights"])
    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118
            if k.endswith(".weight_packed"):
                m = k.removesuffix(".weight_packed")
                shape = torch.Size(f.get_tensor(f"{m}.weight_shape").tolist())
                q = unpack_from_int32(f.get_tensor(k), args.num_bits, shape)
                out[f"{m}.weight"] = dequantize(q, f.get_tensor(f"{m}.weight_scale"), None, args)
            elif f"{k}_scale" in f.keys():  # int-quantized: int8 weight  # noqa: SIM118
                out[k] = dequantize(f.get_tensor(k), f.get_tensor(f"{k}_scale"), None, args)
            elif k.endswith(".weight"):
                out[k] = f.get_tensor(k)
    return out


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "params", "gguf_type"),
    [
        ("quantize.weight_only", {"bits": 4, "group_size": 32}, "Q4_0"),
        ("quantize.weight_only", {"bits": 8}, "Q8_0"),  # pack-quantized, one scale a row
        ("quantize.dynamic_int8", {}, "Q8_0"),  # int-quantized: int8 `weight` tensors
    ],
)
def test_exact_export_is_bit_identical(zoo, tmp_path, method, params, gguf_type) -> None:
    """Every matrix of the GGUF, dequantized (gguf.quants, through transformers' loader, which also
    undoes the q/k permutation), rounded to the artifact's dtype (bfloat16), equals the artifact's
    own dequantized weight bit for bit; norms are float32 copies of the bfloat16 ones."""
    import gguf

    from worker.export.gguf import export_gguf

    art = _quantize(zoo["llama-bf16"], tmp_path / "art", params, method)
    assert spec.exact_type([{"method": method, "params": params}]) == gguf_type
    res = export_gguf(art, tmp_path / "x.gguf", gguf_type)
    assert res["exact"] is True and res["inexact_tensors"] == [] and res["exact_tensors"] == 14
    reader = gguf.GGUFReader(tmp_path / "x.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == gguf_type and types["token_embd.weight"] == "BF16"
    # one tensor straight from the file (no permutation on v): gguf.quants.dequantize
    (v,) = [t for t in reader.tensors if t.name == "blk.0.attn_v.weight"]
    direct = torch.from_numpy(gguf.quants.dequantize(v.data, v.tensor_type).copy())
    want = _artifact_weights(art)
    assert torch.equal(direct.to(torch.bfloat16), want["model.layers.0.self_attn.v_proj.weight"])
    loaded = _hf(tmp_path, "x.gguf").state_dict()
    compared = 0
    for name, w in want.items():
        assert torch.equal(loaded[name].to(torch.bfloat16), w), name
        compared += 1
    assert compared == 14 + 2 + 5  # quantized Linears, embeddings and head, norms


@pytest.mark.integration
def test_float32_scales_are_reported_inexact(zoo, tmp_path) -> None:
    """A float32 model's scales are float32: float16 block scales round them, and the result says
    which tensors (all 14 here) instead of claiming exactness."""
    from worker.export.gguf import export_gguf

    art = _quantize(zoo["llama"], tmp_path / "art", {"bits": 4, "group_size": 32})
    res = export_gguf(art, tmp_path / "x.gguf", "Q4_0")
    assert res["exact"] is False and len(res["inexact_tensors"]) == 14
    assert "model.layers.0.self_attn.q_proj" in res["inexact_tensors"]
    # a 4-bit artifact asked for as F16 is dequantized (and so inexact by definition here)
    res = export_gguf(art, tmp_path / "f.gguf", "F16")
    assert res["exact"] is False and res["exact_tensors"] == 0


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_failures_name_the_tensor_and_leave_no_file(zoo, tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    from tests.tokenizer_util import build_tokenizer
    from worker.export import gguf as exporter

    out = tmp_path / "x.gguf"
    # a word-level tokenizer has no llama.cpp vocabulary type
    word = tmp_path / "word"
    _hf(zoo["llama"]).save_pretrained(word)
    build_tokenizer().save_pretrained(word)
    with pytest.raises(exporter.ExportError, match="tokenizer: a WordLevel tokenizer"):
        exporter.export_gguf(word, out, "F16")
    assert not out.exists()
    # refusals come first, with the tensor named
    with pytest.raises(exporter.ExportError, match="GGUF type 'Q5_K'"):
        exporter.export_gguf(zoo["llama"], out, "Q5_K")
    # a tensor llama.cpp's llama has no name for
    odd = tmp_path / "odd"
    _hf(zoo["llama"]).save_pretrained(odd)
    _tokenizer().save_pretrained(odd)
    state = load_file(odd / "model.safetensors")
    state["model.layers.0.extra.weight"] = torch.zeros(4, 4)
    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(exporter.ExportError, match="model.layers.0.extra.weight: no GGUF name"):
        exporter.export_gguf(odd, out, "F16")
    assert not out.exists()
    # Q4_K_M where llama-cpp-python is not installed: said, and neither file left behind
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(exporter.ExportError, match="Q4_K_M needs llama.cpp's quantizer"):
        exporter.export_gguf(zoo["llama"], out, "Q4_K_M")
    assert list(tmp_path.glob("*.gguf*")) == []
    # a failure halfway through writing: the partial file is removed, the tensor named
    real = exporter._encode

    def failing(t, qtype):  # noqa: ANN001, ANN202
        if t.shape == (128, 64):
            raise RuntimeError("disk full")
        return real(t, qtype)

    monkeypatch.setattr(exporter, "_encode", failing)
    with pytest.raises(
        exporter.ExportError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight -> blk\.0\.ffn_gate"
    ):
        exporter.export_gguf(zoo["llama"], out, "Q8_0")
    assert not out.exists() and list(tmp_path.glob("*.gguf*")) == []


# --- llama.cpp ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "gemma3"])
def test_llama_cpp_runs_the_files(zoo, tmp_path, name) -> None:
    """llama.cpp loads F16 / Q8_0 / Q4_0 files; its logits match transformers' on the original
    (F16 within 1e-2, Q8_0 within 5e-2) and its tokenizer reads the vocabulary back."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from worker.export.gguf import export_gguf
    from worker.runtimes.llamacpp import LlamaCppRunner

    hf_tok = AutoTokenizer.from_pretrained(zoo[name])
    ref = _logits(_hf(zoo[name]), IDS).numpy()
    for gguf_type, tol in (("F16", 1e-2), ("Q8_0", 5e-2), ("Q4_0", None)):
        export_gguf(zoo[name], tmp_path / f"{gguf_type}.gguf", gguf_type)
        with LlamaCppRunner(tmp_path / f"{gguf_type}.gguf", n_threads=2, n_ctx=64) as run:
            got = run.logits([IDS, IDS[:4]])
            assert got.shape == (2, len(IDS), VOCAB)
            assert abs(got[1, :4] - got[0, :4]).max() < 1e-3  # the cache is reset between sequences
            if tol is not None:
                assert abs(got[0] - ref).max() <= tol, (name, gguf_type, abs(got[0] - ref).max())
            assert run.tokens_per_second(IDS[:3], 8) > 0
            # llama.cpp's tokenizer, built from the GGUF's vocabulary, splits text as the HF one
            for text in sentences()[:5]:
                assert run.llm.tokenize(text.encode(), add_bos=True, special=False) == hf_tok(text).input_ids


@pytest.mark.integration
def test_q4_k_m_through_llama_cpp(zoo, tmp_path) -> None:
    """Q4_K_M by llama.cpp's own quantizer from an F16 file written first (removed after); rows of
    64 are not 256-blocks, so llama.cpp falls back to its 32-block types, as its own tool does."""
    pytest.importorskip("llama_cpp")
    import gguf

    from worker.export.gguf import export_gguf
    from worker.runtimes.llamacpp import LlamaCppRunner

    res = export_gguf(zoo["llama"], tmp_path / "k.gguf", "Q4_K_M")
    assert res["intermediate_type"].endswith(".f16.tmp") and list(tmp_path.iterdir()) == [tmp_path / "k.gguf"]
    # rows of 64 and 128: Q4_K/Q6_K need 256, so llama.cpp's fallbacks (Q5_0, Q8_0) hold them
    assert set(res["tensor_types"]) <= {"F32", "Q5_0", "Q5_1", "Q8_0"} and res["tensor_types"]["F32"] == 5
    reader = gguf.GGUFReader(tmp_path / "k.gguf")
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert reader.fields["tokenizer.chat_template"].contents() == TEMPLATE
    with LlamaCppRunner(tmp_path / "k.gguf", n_threads=2, n_ctx=64) as run:
        ref = _logits(_hf(zoo["llama"]), IDS).numpy()
        got = run.logits([IDS])[0]
        cos = (got * ref).sum(-1) / ((got**2).sum(-1) ** 0.5 * (ref**2).sum(-1) ** 0.5)
        assert cos.min() > 0.8


@pytest.mark.integration
def test_q4_k_m_with_256_wide_rows(tmp_path) -> None:
    """Where rows are multiples of 256, the file holds real K-quants: Q4_K, and Q6_K for the
    tensors Q4_K_M keeps at higher precision (output, half of attn_v / ffn_down)."""
    pytest.importorskip("llama_cpp")
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.export.gguf import export_gguf
    from worker.runtimes.llamacpp import LlamaCppRunner

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    )
    cfg.update({"vocab_size": VOCAB, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    res = export_gguf(tmp_path / "m", tmp_path / "k.gguf", "Q4_K_M")
    assert res["tensor_types"]["Q4_K"] >= 8 and res["tensor_types"]["Q6_K"] >= 2, res["tensor_types"]
    ref = _logits(_hf(tmp_path / "m"), IDS).numpy()
    with LlamaCppRunner(tmp_path / "k.gguf", n_threads=2, n_ctx=64) as run:
        got = run.logits([IDS])[0]
    cos = (got * ref).sum(-1) / ((got**2).sum(-1) ** 0.5 * (ref**2).sum(-1) ** 0.5)
    assert cos.min() > 0.9, cos  # 0.984 measured (random weights, 4-bit)


@pytest.mark.unit
def test_tokenizer_pre_and_sentencepiece_style_vocab() -> None:
    """The pre-tokenizer name llama.cpp needs, told from the regex; a byte-fallback BPE
    (Llama 2 / Gemma style) becomes llama.cpp's "llama" vocabulary: <0xXX> pieces are BYTE tokens
    and earlier merges score higher."""
    from worker.export import gguf as exporter

    def split(regex: str) -> dict:
        return {
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}},
                    {"type": "ByteLevel", "use_regex": False},
                ],
            }
        }

    llama3 = r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+"
    qwen2 = r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+"
    assert exporter._pre_name(split(llama3)) == "llama-bpe"
    assert exporter._pre_name(split(qwen2)) == "qwen2"
    assert exporter._pre_name(split(r"\w+")) == "default"
    assert exporter._pre_name({"pre_tokenizer": {"type": "ByteLevel"}}) == "gpt-2"

    tok = {
        "model": {
            "type": "BPE",
            "byte_fallback": True,
            "vocab": {"<unk>": 0, "<0x41>": 1, "▁": 2, "a": 3, "▁a": 4, "aa": 5},
            "merges": [["▁", "a"], ["a", "a"]],
        },
        "added_tokens": [{"id": 0, "content": "<unk>", "special": True}],
    }
    tokens, types = exporter._tokens(tok, 7, spm=True)
    assert tokens == ["<unk>", "<0x41>", "▁", "a", "▁a", "aa", "[PAD6]"]
    assert types == [3, 6, 1, 1, 1, 1, 5]  # control, byte, normal..., unused padding row
    assert exporter._spm_scores(tok["model"], tokens) == [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, 0.0]
    # llama.cpp prepends "▁" to SentencePiece input unless the file says not to
    assert (
        exporter._space_prefix(
            {
                "normalizer": {
                    "type": "Sequence",
                    "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace"}],
                }
            }
        )
        is True
    )  # Llama 2
    assert exporter._space_prefix({"normalizer": {"type": "Replace", "content": "▁"}}) is False  # Gemma
    assert exporter._space_prefix({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "first"}}) is True
    assert exporter._space_prefix({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}}) is False
    with pytest.raises(exporter.ExportError, match="outside the model's vocab_size 5"):
        exporter._tokens(tok, 5, spm=True)


@pytest.mark.integration
def test_sharded_source(zoo, tmp_path) -> None:
    """A checkpoint in several shards (model.safetensors.index.json) exports like one file."""
    from worker.export.gguf import export_gguf

    src = tmp_path / "sharded"
    _hf(zoo["qwen2"]).save_pretrained(src, max_shard_size="50KB")
    _tokenizer().save_pretrained(src)
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").is_file()
    res = export_gguf(src, tmp_path / "s.gguf", "F16")
    assert res["tensors"] == 27  # as from the single file
    got = _logits(_hf(tmp_path, "s.gguf"), IDS)
    assert (got - _logits(_hf(zoo["qwen2"]), IDS)).abs().max().item() <= TOLERANCE["F16"]


@pytest.mark.unit
def test_bulk_array_packing_writes_gguf_pys_bytes(tmp_path) -> None:
    """The exporter's writer packs large metadata arrays in one go; every byte is what gguf-py's
    own item-by-item packing writes (strings with non-ASCII and empty ones, ints, floats, a
    sub type given, and the cases it leaves to gguf-py)."""
    import gguf

    from worker.export.gguf import _bulk_writer_class

    bulk = _bulk_writer_class()(tmp_path / "a.gguf", "llama")
    plain = gguf.GGUFWriter(tmp_path / "b.gguf", "llama")
    T = gguf.GGUFValueType
    cases = [
        (["<bos>", "▁the", "", "é漢字", "[PAD7]"], None),
        ([0, 1, 2, -3, 2**31 - 1], None),
        ([1, 3, 4, 6], T.INT32),
        ([1, 3, 4, 6], T.UINT32),
        ([-1.0, 0.0, -262144.0, 1.5e-8, 3], T.FLOAT32),
        ([0.25, -2.5], None),
        ([True, False], None),
        (["a", 1], T.STRING),
        ([1, 2.5], None),  # mixed: gguf-py refuses
        ([1, 2.5], T.INT32),
        ([1, 2.5], T.FLOAT32),
        ([2**32], T.UINT32),
    ]
    for val, sub in cases:
        for add_vtype in (True, False):
            try:
                want = plain._pack_val(val, T.ARRAY, add_vtype, sub)
            except Exception as e:  # noqa: BLE001 - the same refusal either way
                with pytest.raises(type(e)):
                    bulk._pack_val(val, T.ARRAY, add_vtype, sub)
                continue
            assert bulk._pack_val(val, T.ARRAY, add_vtype, sub) == want, (val, sub, add_vtype)
    for scalar, vtype in (("x", T.STRING), (7, T.UINT32)):
        assert bulk._pack_val(scalar, vtype, True) == plain._pack_val(scalar, vtype, True)
