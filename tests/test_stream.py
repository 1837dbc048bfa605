"""The streaming engine (worker/stream) against the in-memory path: for every data-free method
and fused recipes, on Llama (Linear), GPT-2 (Conv1D, tied head), BERT and bare state dicts, the
artifact's tensors are bit-identical, its config says the same, and the step metrics, parameter
counts and sparsity agree. Then bad input: truncated shards, lying headers, a full disk."""

from __future__ import annotations

import json
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker import evaluate, methods, model_io, pipeline
from worker import stream as engine
from worker.shards import ShardReader
from worker.sinks import FileSink, ZipSink

MANIFEST = {"modelpress_manifest": 1, "test": True}


def _specs(steps):
    return [(methods.get(m), methods.get(m).params.model_validate(p)) for m, p in steps]


def _whole(src: Path, fmt: str, steps, out: Path):
    loaded = model_io.load(src, fmt)
    res = [spec.handler(loaded, params, None) for spec, params in _specs(steps)]
    counts = evaluate.parameter_counts(loaded.module, loaded.state)
    sparsity = pipeline._sparsity(loaded, counts)
    model_io.save(loaded, out, MANIFEST)
    return res, counts, sparsity


def _stream(src: Path, fmt: str, steps, out: Path, shard_bytes: int = 5 * 10**9):
    if fmt == "hf":
        sink = ZipSink(out.with_suffix(".zip"))
        extra = [
            p
            for p in src.iterdir()
            if p.name not in ("config.json",)
            and not p.name.endswith(".safetensors")
            and p.name != "model.safetensors.index.json"
        ]
    else:
        sink = FileSink(out.with_suffix(".safetensors"))
        extra = []
    result = engine.run_passes(
        src,
        fmt,
        [spec.stream(params, None) for spec, params in _specs(steps)],
        sink,
        scratch=out.parent / "scratch",
        extra_files=extra,
        manifest=MANIFEST,
        shard_bytes=shard_bytes,
    )
    size, sha = sink.close()
    assert size == sink.path.stat().st_size
    if fmt == "hf":
        with zipfile.ZipFile(sink.path) as zf:
            assert zf.testzip() is None
            for info in zf.infolist():  # weights are stored, never deflated
                assert info.compress_type == (
                    zipfile.ZIP_STORED if info.filename.endswith(".safetensors") else zipfile.ZIP_DEFLATED
                )
            zf.extractall(out)
    else:
        out.mkdir()
        (out / "model.safetensors").write_bytes(sink.path.read_bytes())
    return result


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same(whole_dir: Path, stream_dir: Path) -> None:
    a, b = _tensors(whole_dir), _tensors(stream_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


CASES = [
    ("llama", [("prune.magnitude", {"sparsity": 0.5})]),
    ("llama", [("prune.magnitude", {"sparsity": 0.3, "scope": "layer"})]),
    ("llama", [("prune.magnitude", {"sparsity": 0.3, "scope": "row"})]),
    ("llama", [("prune.magnitude", {"threshold": 0.01, "exclude": ["*.mlp.*"]})]),
    ("llama", [("quantize.cast", {"dtype": "bfloat16"})]),
    ("llama", [("quantize.weight_only", {"bits": 4, "group_size": 32})]),
    ("llama", [("quantize.weight_only", {"bits": 8, "symmetric": False})]),
    ("llama", [("quantize.weight_only", {"bits": 4, "group_size": 64, "symmetric": False})]),
    ("llama", [("quantize.dynamic_int8", {})]),
    ("llama", [("quantize.fixed_point", {"frac_bits": 7, "bits": 6})]),
    # Fused recipes: each tensor read once, through every step, written once.
    ("llama", [("quantize.cast", {"dtype": "bfloat16"}), ("prune.magnitude", {"sparsity": 0.3, "scope": "layer"})]),
    (
        "llama",
        [
            ("quantize.cast", {"dtype": "bfloat16"}),
            ("prune.magnitude", {"sparsity": 0.6}),
            ("quantize.weight_only", {"bits": 4, "group_size": 32}),
        ],
    ),
    ("llama", [("prune.magnitude", {"sparsity": 0.5, "scope": "row"}), ("quantize.cast", {"dtype": "float16"})]),
    ("gpt2", [("prune.magnitude", {"sparsity": 0.5})]),
    ("gpt2", [("prune.magnitude", {"sparsity": 0.4, "scope": "row"})]),
    ("gpt2", [("quantize.cast", {"dtype": "float16"}), ("prune.magnitude", {"sparsity": 0.5})]),
    ("bert", [("prune.magnitude", {"sparsity": 0.3, "scope": "layer"})]),
    ("bare", [("prune.magnitude", {"sparsity": 0.5})]),
    ("bare", [("quantize.cast", {"dtype": "bfloat16"}), ("prune.magnitude", {"sparsity": 0.2, "scope": "row"})]),
]


@pytest.mark.integration
@pytest.mark.parametrize(("model", "steps"), CASES, ids=[f"{m}-" + "+".join(s[0] for s in st) for m, st in CASES])
def test_stream_equals_in_memory(tiny, tmp_path, model, steps):
    src = tiny[model] if model != "bare" else tiny["bare"].parent
    fmt = "safetensors" if model == "bare" else "hf"
    wres, counts, sparsity = _whole(src, fmt, steps, tmp_path / "whole")
    sres = _stream(src, fmt, steps, tmp_path / "stream")
    _same(tmp_path / "whole", tmp_path / "stream")
    if fmt == "hf":
        ca = json.loads((tmp_path / "whole" / "config.json").read_text())
        cb = json.loads((tmp_path / "stream" / "config.json").read_text())
        assert ca.get("quantization_config") == cb.get("quantization_config")
        assert ca.get("dtype") == cb.get("dtype")
        assert json.loads((tmp_path / "stream" / "modelpress.json").read_text()) == MANIFEST
        assert (tmp_path / "stream" / "generation_config.json").exists() == (src / "generation_config.json").exists()
    else:
        with open(tmp_path / "stream" / "model.safetensors", "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            assert json.loads(json.loads(f.read(n))["__metadata__"]["modelpress"]) == MANIFEST
    for w, s in zip(wres, sres.step_metrics, strict=True):
        assert s.keys() == w.keys()
        for k in w:
            if isinstance(w[k], float):
                assert s[k] == pytest.approx(w[k], rel=1e-5, abs=1e-9), k
            elif k == "per_layer_relative_error":
                assert s[k].keys() == w[k].keys()
                for layer in w[k]:
                    assert s[k][layer] == pytest.approx(w[k][layer], abs=2e-6), layer
            else:
                assert s[k] == w[k], k
    assert sres.parameters == counts
    assert sres.sparsity == sparsity


@pytest.mark.integration
@pytest.mark.parametrize(
    "steps",
    [
        [("prune.magnitude", {"sparsity": 0.5}), ("quantize.weight_only", {"bits": 4, "group_size": 32})],
        [("quantize.dynamic_int8", {})],
        [("prune.magnitude", {"sparsity": 0.3, "scope": "layer"}), ("quantize.cast", {"dtype": "float16"})],
    ],
    ids=["prune+w4", "w8a8", "prune+fp16"],
)
def test_bfloat16_checkpoint(tmp_path, steps):
    """Real checkpoints are bf16: the map's bf16 views go through the same math as the module's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    m = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=120,
            max_position_embeddings=64,
        )
    ).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "src")
    wres, counts, sparsity = _whole(tmp_path / "src", "hf", steps, tmp_path / "whole")
    sres = _stream(tmp_path / "src", "hf", steps, tmp_path / "stream")
    _same(tmp_path / "whole", tmp_path / "stream")
    assert sres.parameters == counts and sres.sparsity == sparsity


@pytest.mark.integration
@pytest.mark.parametrize(
    ("params", "want"),
    [
        # Widths 96 (q/k/v/o/gate/up) and 256 (down): 128 divides 256 only, 96 falls back to 32.
        ({"bits": 4, "group_size": 128}, {"hidden": 32, "down": 128}),
        # Width 80 (hidden): none of 32/64 divides it, so per channel; 128 = 2 x 64 for down_proj.
        ({"bits": 4, "group_size": 64, "symmetric": False}, {"hidden": None, "down": 64}),
    ],
    ids=["w4g128-fallback-32", "w4g64-asym-fallback-channel"],
)
def test_group_size_fallbacks_stream_equals_in_memory_and_loads(tmp_path, params, want):
    """Any group size on any model (issue 22): layers the group size does not divide get the largest
    accepted size that does (or per-channel scales) as a config group of their own; both paths
    write the same tensors and config, the metrics list each such layer, and transformers loads it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    hidden, ffn = (96, 256) if params["group_size"] == 128 else (80, 128)
    torch.manual_seed(5)
    m = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_attention_heads=hidden // 16,
            num_key_value_heads=hidden // 16,
            vocab_size=120,
            max_position_embeddings=64,
        )
    ).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "src")
    steps = [("quantize.weight_only", params)]
    wres, _, _ = _whole(tmp_path / "src", "hf", steps, tmp_path / "whole")
    sres = _stream(tmp_path / "src", "hf", steps, tmp_path / "stream")
    _same(tmp_path / "whole", tmp_path / "stream")
    cfg_w = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    cfg_s = json.loads((tmp_path / "stream" / "config.json").read_text())["quantization_config"]
    assert cfg_w == cfg_s
    fallbacks = wres[0]["group_fallbacks"]
    assert fallbacks == sres.step_metrics[0]["group_fallbacks"]
    names = [
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    ]
    assert fallbacks == {n: ("channel" if want["hidden"] is None else want["hidden"]) for n in names}
    # compressed-tensors names the groups in the order it meets them: find each by its targets.
    groups = {tuple(sorted(g["targets"])): g["weights"] for g in cfg_w["config_groups"].values()}
    assert sorted(groups) == sorted([("Linear",), tuple(sorted(names))])
    assert (groups[("Linear",)]["strategy"], groups[("Linear",)]["group_size"]) == ("group", want["down"])
    fb = groups[tuple(sorted(names))]
    assert (fb["strategy"], fb["group_size"]) == (
        ("channel", None) if want["hidden"] is None else ("group", want["hidden"])
    )
    assert fb["symmetric"] == params.get("symmetric", True) and fb["num_bits"] == 4
    # The scales have the shapes each layer's own group gives them.
    t = _tensors(tmp_path / "stream")
    q_cols = 1 if want["hidden"] is None else hidden // want["hidden"]
    assert t["model.layers.0.self_attn.q_proj.weight_scale"].shape == (hidden, q_cols)
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (hidden, ffn // want["down"])
    # transformers + compressed-tensors load it with each layer's scheme, and it runs close to the original.
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "stream", dtype=torch.float32).eval()
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    assert q.get_submodule(names[0]).quantization_scheme.weights.group_size == want["hidden"]
    assert q.get_submodule("model.layers.0.mlp.down_proj").quantization_scheme.weights.group_size == want["down"]
    ids = torch.tensor([[5, 9, 11, 3, 7, 2, 8, 4]])
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.9
    # The plan (from the input's header) counts each layer with the group it falls back to.
    from core.jobs import plan

    with (tmp_path / "src" / "model.safetensors").open("rb") as f:
        outs = [plan._Out(x, x.nbytes) for x in plan.read_header(f, 1 << 24)]
    plan._apply_step(outs, "quantize.weight_only", params, [], 2)
    planned = {o.tensor.name.removesuffix(".weight"): o.nbytes for o in outs}
    for layer in (names[0], "model.layers.0.mlp.down_proj"):
        stored = sum(v.numel() * v.element_size() for k, v in t.items() if k.startswith(layer + ".weight"))
        assert planned[layer] == stored, (layer, planned[layer], stored)


@pytest.mark.integration
def test_strict_group_size_refuses_in_the_worker(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.methods import Refusal

    LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=1,
            hidden_size=96,
            intermediate_size=256,
            num_attention_heads=6,
            num_key_value_heads=6,
            vocab_size=120,
            max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path / "src")
    steps = [("quantize.weight_only", {"bits": 4, "group_size": 128, "strict_group_size": True})]
    for run in (_whole, _stream):
        with pytest.raises(Refusal) as e:
            run(tmp_path / "src", "hf", steps, tmp_path / run.__name__)
        assert e.value.fields["blocking_count"] == 6 and e.value.fields["valid_group_sizes"] == [32]


@pytest.mark.integration
def test_sharded_input_and_output_round_trip(tmp_path):
    """A sharded upload (index.json) in, shards of a capped size out: HF's layout, loadable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    m = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=3,
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            max_position_embeddings=64,
        )
    )
    src = tmp_path / "src"
    m.save_pretrained(src, max_shard_size="300KB")
    assert len(list(src.glob("model-*.safetensors"))) > 2
    steps = [("prune.magnitude", {"sparsity": 0.5}), ("quantize.weight_only", {"bits": 4, "group_size": 128})]
    _whole(src, "hf", steps, tmp_path / "whole")
    res = _stream(src, "hf", steps, tmp_path / "stream", shard_bytes=100_000)
    shards = sorted((tmp_path / "stream").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == res.weight_bytes_out
    _same(tmp_path / "whole", tmp_path / "stream")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "stream")
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)


def _truncate(src: Path, dest: Path, cut: int) -> Path:
    dest.mkdir()
    for p in src.iterdir():
        data = p.read_bytes()
        (dest / p.name).write_bytes(data[:-cut] if p.suffix == ".safetensors" else data)
    return dest


@pytest.mark.integration
def test_truncated_shard_names_file_and_tensor(tiny, tmp_path):
    src = _truncate(tiny["llama"], tmp_path / "src", 1000)
    with pytest.raises(engine.ShardError, match=r"model\.safetensors: tensor '[^']+'"):
        _stream(src, "hf", [("prune.magnitude", {"sparsity": 0.5})], tmp_path / "out")


@pytest.mark.unit
def test_header_whose_offsets_lie(tmp_path):
    good = {"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8)}
    save_file(good, str(tmp_path / "ok.safetensors"))
    raw = (tmp_path / "ok.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["b.weight"]["data_offsets"] = [256, 1024]  # past the data, claims 768 bytes of 8x8 F32
    body = json.dumps(header).encode()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "weights.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(engine.ShardError, match=r"weights\.safetensors: tensor 'b\.weight'"):
        ShardReader([bad / "weights.safetensors"])


@pytest.mark.integration
def test_file_shrunk_after_its_header_was_read(tiny, tmp_path):
    """A shard cut short between the check and the read (a disk filling up, a bad copy): the read
    fails naming the file and the tensor; nothing is mapped past the end."""
    src = tmp_path / "src"
    src.mkdir()
    for p in tiny["llama"].iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    reader = ShardReader([src / "model.safetensors"])
    last = reader.names()[-1]
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate((src / "model.safetensors").stat().st_size - 64)
    with pytest.raises(engine.ShardError, match=rf"model\.safetensors: tensor '{last}'.*truncated"):
        reader.tensor(last)
    reader.close()


@pytest.mark.integration
def test_disk_full_fails_cleanly_and_removes_the_partial_artifact(tiny, tmp_path):
    """The artifact is written to a 64 KiB filesystem: the write fails with ENOSPC, and the sink's
    abort (what the pipeline calls) leaves no partial file."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    try:
        sink = ZipSink(mnt / "model.zip")
        with pytest.raises(OSError) as e:
            engine.run(
                tiny["gpt2"],
                "hf",
                [
                    methods.get("quantize.cast").stream(
                        methods.get("quantize.cast").params.model_validate({"dtype": "float16"}), None
                    )
                ],
                sink,
                extra_files=[],
                manifest=MANIFEST,
            )
        import errno

        assert e.value.errno == errno.ENOSPC
        sink.abort()
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.integration
def test_not_streamable_when_checkpoint_names_differ(tmp_path):
    """A checkpoint whose names are not the module's (a base-model checkpoint under a task head):
    the engine says so before writing, and the pipeline builds the model in memory instead."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    LlamaModel(cfg).save_pretrained(tmp_path / "base")
    c = json.loads((tmp_path / "base" / "config.json").read_text())
    c["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(c))
    sink = ZipSink(tmp_path / "a.zip")
    with pytest.raises(engine.NotStreamable):
        engine.run(
            tmp_path / "base",
            "hf",
            [
                methods.get("quantize.cast").stream(
                    methods.get("quantize.cast").params.model_validate({"dtype": "float16"}), None
                )
            ],
            sink,
            extra_files=[],
            manifest=MANIFEST,
        )
    sink.abort()
    assert not (tmp_path / "a.zip").exists()


@pytest.mark.unit
def test_every_data_free_method_streams_and_the_others_do_not():
    streams = {n for n, s in methods.load_all().items() if s.stream is not None}
    assert streams == {
        "quantize.cast",
        "quantize.weight_only",
        "quantize.fixed_point",
        "quantize.dynamic_int8",
        "prune.magnitude",
        "prune.structured",
        # Their data-free schemes stream (FP8 static refuses the stream path): tests/test_fp_quant.py.
        "quantize.fp8",
        "quantize.fp4",
    }  # data-free too: its equality is tested in tests/test_prune_structured.py


@pytest.mark.integration
@pytest.mark.parametrize(
    "steps",
    [
        [("quantize.weight_only", {"bits": 4, "group_size": 32, "symmetric": False})],
        [("quantize.dynamic_int8", {})],
        [("quantize.cast", {"dtype": "float16"})],
    ],
)
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_memory_bytes_is_what_transformers_loads(tiny, tmp_path, model, steps):
    """The report's in-memory size of the result: every parameter and buffer of the model as
    plain transformers loads the artifact (decompressed), counted like the in-memory path."""
    from transformers import AutoModel

    res = _stream(tiny[model], "hf", steps, tmp_path / "stream")
    loaded = (
        AutoModel.from_pretrained(tmp_path / "stream")
        if model == "bert"
        else __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    )
    if steps[0][0] != "quantize.cast":
        loaded(torch.tensor([[1, 2, 3]]))  # the first forward decompresses
    seen: set[int] = set()
    total = 0
    for t in [*loaded.parameters(), *loaded.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    assert res.memory_bytes == total


@pytest.mark.integration
def test_a_global_prune_after_another_step_starts_a_new_pass(tiny, tmp_path):
    """Global pruning must rank the weights as the steps before it leave them: it starts a pass of
    its own over the previous pass's result (on scratch, removed once read), not a recomputation
    of every earlier step inside its pre-pass."""
    steps = [
        ("prune.magnitude", {"sparsity": 0.2}),
        ("quantize.cast", {"dtype": "bfloat16"}),
        ("prune.magnitude", {"sparsity": 0.5}),
        ("prune.magnitude", {"sparsity": 0.3, "scope": "layer"}),
        ("prune.magnitude", {"sparsity": 0.7}),
    ]
    assert [len(p) for p in engine.passes([spec.stream(params, None) for spec, params in _specs(steps)])] == [2, 2, 1]
    wres, counts, sparsity = _whole(tiny["llama"], "hf", steps, tmp_path / "whole")
    sres = _stream(tiny["llama"], "hf", steps, tmp_path / "stream")
    _same(tmp_path / "whole", tmp_path / "stream")
    assert [m.get("achieved_sparsity", 0.0) for m in sres.step_metrics] == pytest.approx(
        [m.get("achieved_sparsity", 0.0) for m in wres]
    )
    assert sres.parameters == counts and sres.sparsity == sparsity
    assert not (tmp_path / "scratch").exists() or not any((tmp_path / "scratch").iterdir())
