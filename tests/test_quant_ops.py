"""Quantization math on tiny tensors (worker/ops/quant.py), against hand computations and against
compressed-tensors' own quantize (the integers it writes must be the ones our metrics describe),
plus the submit-time checks of the quantize.* methods (no service needed)."""

from __future__ import annotations

import pytest
import torch

from core.methods import ModelInfo, StepError, validate_steps
from worker.ops import quant

pytestmark = pytest.mark.unit

# float32 rounding of w / scale and of q * scale: a few ulps of |w| on top of scale / 2.
ULPS = 4 * 2.0**-24


def _weights(rows: int = 16, cols: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = 0.0  # an all-zero row: scale falls back to eps, zeros stay zeros
    w[1, 5] = 0.9  # an outlier that sets one row's range
    w[2] = w[2].abs()  # a row with no negative values (asymmetric lo is clamped to 0)
    return w


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, symmetric):
    w = _weights()
    scale, zp = quant.rtn_qparams(w, bits, group_size, symmetric)
    groups = 1 if group_size is None else w.shape[1] // group_size
    assert scale.shape == (w.shape[0], groups) and zp.shape == scale.shape and zp.dtype == torch.int8
    q = quant.quantize(w, scale, None if symmetric else zp, bits, group_size)
    qmin, qmax = quant.int_range(bits)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    deq = quant.dequantize(q, scale, None if symmetric else zp, group_size)
    # The scale of each weight, expanded to the weight's shape.
    per_w = scale.repeat_interleave(w.shape[1] // groups, dim=1)
    err = (w.double() - deq.double()).abs()
    assert bool((err <= per_w.double() / 2 + w.double().abs() * ULPS).all()), float((err / per_w).max())
    assert bool((deq[0] == 0).all()), "an all-zero row must stay zero"
    if symmetric:
        assert bool((zp == 0).all())
        # The extra negative code is used: scale = max|w| / 127.5 (8 bit), / 7.5 (4 bit).
        row_max = w.abs().reshape(w.shape[0], groups, -1).amax(-1)
        nz = row_max > 0
        assert torch.allclose(scale[nz], row_max[nz] / ((2**bits - 1) / 2))
    # Round to nearest: no other grid value is closer (checked against the neighbours).
    for step in (-1, 1):
        q2 = (q.to(torch.int16) + step).clamp(qmin, qmax).to(torch.int8)
        other = (w.double() - quant.dequantize(q2, scale, None if symmetric else zp, group_size).double()).abs()
        assert bool((err <= other + w.double().abs() * ULPS).all())


def test_rtn_by_hand():
    # One row, symmetric 4 bit: max|w| = 1.5, scale = 1.5 / 7.5 = 0.2.
    w = torch.tensor([[1.5, -1.5, 0.31, -0.29, 0.1, 0.0, 0.7, -0.5]])
    scale, zp = quant.rtn_qparams(w, 4)
    assert scale.item() == pytest.approx(0.2)
    q = quant.quantize(w, scale, None, 4)
    # 1.5/0.2 = 7.5 -> clamp to 7; -7.5 -> -8 (half to even); 0.31/0.2=1.55 -> 2; -1.45 -> -1;
    # 0.5 -> 0 (half to even); 0.7/0.2 = 3.5 -> 4; -2.5 -> -2.
    assert q.tolist() == [[7, -8, 2, -1, 0, 0, 4, -2]]
    # Asymmetric 4 bit on [0, 1.5]: scale = 1.5 / 15 = 0.1, zero point -8.
    w = torch.tensor([[0.0, 1.5, 0.74, 0.76]])
    scale, zp = quant.rtn_qparams(w, 4, symmetric=False)
    assert scale.item() == pytest.approx(0.1) and zp.item() == -8
    assert quant.quantize(w, scale, zp, 4).tolist() == [[-8, 7, -1, 0]]


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"),
    [(8, None, True), (4, 32, True), (4, 32, False), (4, None, False), (8, 64, False)],
)
def test_integers_match_compressed_tensors(bits, group_size, symmetric):
    """The integers our metrics describe are the ones compressed-tensors stores, given our scales."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    w = _weights(seed=bits + (group_size or 0))
    args = QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy="group" if group_size else "channel", group_size=group_size
    )
    scale, zp = quant.rtn_qparams(w, bits, group_size, symmetric)
    theirs = quantize(w, scale, None if symmetric else zp, args, dtype=torch.int8)
    ours = quant.quantize(w, scale, None if symmetric else zp, bits, group_size)
    assert torch.equal(ours, theirs)
    assert torch.equal(
        quant.dequantize(ours, scale, None if symmetric else zp, group_size),
        dequantize(theirs, scale, None if symmetric else zp, args),
    )
    # And our scales equal the library's own min-max formula.
    from compressed_tensors.quantization.utils import calculate_qparams

    g = w.reshape(w.shape[0], -1, group_size or w.shape[1])
    s2, z2 = calculate_qparams(g.amin(-1), g.amax(-1), args)
    assert torch.allclose(scale, s2, rtol=1e-6, atol=0)
    # Row 0 is all zeros: compressed-tensors computes its zero point as qmin - 0/0 (NaN, cast to 0);
    # ours is qmin - 0/eps = qmin. Both dequantize the row to exact zeros (checked above).
    assert torch.equal(zp[1:], z2[1:].to(torch.int8))


def test_pack_unpack_round_trip_4bit():
    """4-bit packing is compressed-tensors' (pack-quantized); we rely on it round-tripping."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (6, 40), generator=g, dtype=torch.int8)  # 40: not a multiple of 8
    packed = pack_to_int32(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (6, 5)  # 40 * 4 bits = 5 words
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size(q.shape)), q)


def test_group_size_must_divide_columns():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quant.rtn_qparams(torch.randn(4, 48), 4, 32)


def test_fixed_point_is_the_studys_formula_and_counts_clipping():
    n, bits = 2, 4  # grid 0.25, integers -8..7: values -2.0 .. 1.75
    w = torch.tensor(
        [[0.3, -0.7, 1.26, 0.125, -2.2, 1.9, 0.0, -0.375], [5.0, -1.99, 0.624, 1.874, -0.126, 0.126, -2.0, 1.75]]
    )
    # round(w * 4) / 4 by hand (torch.round: half to even: 0.125*4 = 0.5 -> 0, -0.375*4 = -1.5 -> -2;
    # 0.624*4 = 2.496 -> 2, -0.126*4 = -0.504 -> -1)
    expect = torch.tensor(
        [[0.25, -0.75, 1.25, 0.0, -2.25, 2.0, 0.0, -0.5], [5.0, -2.0, 0.5, 1.75, -0.25, 0.25, -2.0, 1.75]]
    )
    assert torch.equal(quant.fixed_point_round(w, n), expect)
    q, clipped = quant.fixed_point(w, n, bits)
    # Clipped: -2.2 -> -9, 1.9 -> 8 and 5.0 -> 20 fall outside -8..7; -2.0 -> -8 and 1.75 -> 7 fit.
    assert clipped == 3
    assert clipped / w.numel() == pytest.approx(3 / 16)
    assert q.dtype == torch.int8
    deq = quant.dequantize(q, torch.tensor([quant.fixed_point_scale(n)]), None)
    inside = (expect >= -2.0) & (expect <= 1.75)
    assert torch.equal(deq[inside], expect[inside])
    assert deq.tolist()[0][4] == -2.0 and deq.tolist()[0][5] == 1.75 and deq.tolist()[1][0] == 1.75


@pytest.mark.parametrize(("n", "bits"), [(7, 8), (5, 4), (0, 2), (16, 8)])
def test_fixed_point_matches_compressed_tensors(n, bits):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    w = _weights(seed=n)
    args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="channel")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        wd = w.to(dtype)
        scale = torch.full((w.shape[0], 1), quant.fixed_point_scale(n), dtype=dtype)
        assert bool((scale.float() == 2.0**-n).all()), "2^-n must be exact in the stored dtype"
        q, _ = quant.fixed_point(wd, n, bits)
        assert torch.equal(q, quantize(wd, scale, None, args, dtype=torch.int8))
        assert torch.equal(q, quant.quantize(wd, scale, None, bits))


def test_error_stats():
    st = quant.ErrorStats()
    assert st.add(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert st.add(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(1 / 5)
    assert st.relative_rms_error == pytest.approx((1 / 50) ** 0.5)
    assert st.max_abs_err == 1.0 and st.elements == 4


def test_dynamic_int8_is_the_int8_w8a8_preset():
    """The scheme we write is compressed-tensors' INT8_W8A8 (per-channel weights, per-token
    dynamic activations), the layout its consumers know."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    preset = preset_name_to_scheme("W8A8", ["Linear"])  # = INT8_W8A8
    ours_w = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False)
    ours_a = QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
    assert preset.weights == ours_w and preset.input_activations == ours_a


LLAMA = ModelInfo(
    format="hf",
    architecture="LlamaForCausalLM",
    config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
)
GPT2 = ModelInfo(format="hf", architecture="GPT2LMHeadModel", config={"model_type": "gpt2", "n_embd": 64})
BARE = ModelInfo(format="safetensors")


@pytest.mark.parametrize(
    "step",
    [
        {"method": "quantize.dynamic_int8", "params": {}},
        {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 32}},
        {"method": "quantize.fixed_point", "params": {"frac_bits": 6, "bits": 8}},
    ],
)
def test_checks_at_submit(step):
    out = validate_steps([step], LLAMA)
    assert out[0]["method"] == step["method"]
    with pytest.raises(StepError) as e:
        validate_steps([step], GPT2)
    (err,) = e.value.errors
    assert err["loc"] == ["body", "steps", 0, "params"] and err["type"] == "unsupported_model"
    assert "Conv1D" in err["msg"] and "torch.nn.Linear" in err["msg"] and "GPT2LMHeadModel" in err["msg"]
    with pytest.raises(StepError) as e:
        validate_steps([step], BARE)
    assert "does not support 'safetensors'" in e.value.errors[0]["msg"]
    # Packed weights: nothing may follow.
    with pytest.raises(StepError) as e:
        validate_steps([step, {"method": "quantize.cast", "params": {"dtype": "float16"}}], LLAMA)
    assert e.value.errors[0]["type"] == "step_order"
    # A pruning step before is fine.
    validate_steps([{"method": "prune.magnitude", "params": {"sparsity": 0.5}}, step], LLAMA)
    # An already-quantized model is refused.
    quantized = ModelInfo(
        format="hf",
        architecture="LlamaForCausalLM",
        config={**LLAMA.config, "quantization_config": {"quant_method": "compressed-tensors"}},
    )
    with pytest.raises(StepError, match="already quantized"):
        validate_steps([step], quantized)


def test_group_size_checked_against_config():
    strict = {"bits": 4, "group_size": 128, "strict_group_size": True}
    with pytest.raises(StepError, match=r"group_size 128 does not divide the model's hidden_size \(64\)"):
        validate_steps([{"method": "quantize.weight_only", "params": strict}], LLAMA)
    validate_steps([{"method": "quantize.weight_only", "params": {**strict, "group_size": 64}}], LLAMA)
    # Without strict_group_size the layers 128 does not divide fall back in the worker.
    validate_steps([{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128}}], LLAMA)


@pytest.mark.parametrize(
    "params",
    [
        {"bits": 3},
        {"bits": 4, "group_size": 16},
        {"bits": 4, "symmetric": "no"},
        {"group_size": 32},
        {"bits": 8, "extra": 1},
    ],
)
def test_weight_only_params_refused(params):
    with pytest.raises(StepError):
        validate_steps([{"method": "quantize.weight_only", "params": params}])


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"frac_bits": -1},
        {"frac_bits": 17},
        {"frac_bits": 4, "bits": 1},
        {"frac_bits": 4, "bits": 9},
        {"frac_bits": True},
        {"frac_bits": "4"},
        {"frac_bits": 4.5},
    ],
)
def test_fixed_point_params_refused(params):
    with pytest.raises(StepError):
        validate_steps([{"method": "quantize.fixed_point", "params": params}])


def test_dynamic_int8_takes_no_params():
    with pytest.raises(StepError):
        validate_steps([{"method": "quantize.dynamic_int8", "params": {"bits": 8}}])


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"), [(8, None, True), (4, 32, True), (4, 32, False), (8, 64, False)]
)
def test_quantize_error_matches_dequantize(bits, group_size, symmetric):
    torch.manual_seed(bits + (group_size or 0))
    scratch = quant.Scratch()
    for shape in [(16, 128), (4, 64), (32, 128)]:  # buffers are reused and grown
        w = torch.randn(*shape) * 3
        scale, zp = quant.rtn_qparams(w, bits, group_size, symmetric)
        zp = None if symmetric else zp
        err = quant.quantize_error(w, scale, zp, bits, group_size, scratch)
        expected = quant.dequantize(quant.quantize(w, scale, zp, bits, group_size), scale, zp, group_size) - w
        assert err.shape == w.shape
        assert torch.allclose(err, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("bits", "cols"), [(4, 64), (8, 64), (4, 12), (8, 6), (2, 64)])
def test_pack_int32_is_compressed_tensors_packing(bits, cols):
    """The byte-built words (4 and 8 bits) and the fallback equal the library's pack_to_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qmin, qmax = quant.int_range(bits)
    g = torch.Generator().manual_seed(bits * 100 + cols)
    q = torch.randint(qmin, qmax + 1, (9, cols), generator=g, dtype=torch.int8)
    q[0, :] = qmin  # the extremes of the range, in every position
    q[1, :] = qmax
    expected = pack_to_int32(q.clone(), bits)
    assert torch.equal(quant.pack_int32(q.clone(), bits), expected)
    out = torch.full_like(expected, 12345)
    assert quant.pack_int32(q.clone(), bits, out=out) is out and torch.equal(out, expected)
    # As the streaming engine calls it: rows of a larger output, a reused scratch.
    big = torch.full((12, expected.shape[1]), 777, dtype=torch.int32)
    scratch = quant.Scratch()
    for _ in range(2):
        quant.pack_int32(q.clone(), bits, out=big[2:11], scratch=scratch)
        assert torch.equal(big[2:11], expected)
    assert (big[:2] == 777).all() and (big[11:] == 777).all()
    # One row starting at an odd byte (contiguous, but no int16 view of it): the same words.
    wide = torch.zeros(2, cols + 1, dtype=torch.int8)
    wide[0, 1:] = q[0]
    assert torch.equal(quant.pack_int32(wide[:1, 1:], bits), pack_to_int32(q[:1].clone(), bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"), [(8, None, True), (4, 32, True), (4, 32, False), (8, 64, False)]
)
def test_quantize_rows_is_the_librarys_quantize_and_dequantize(dtype, bits, group_size, symmetric):
    """The fused kernel's integers are compressed-tensors' (given the stored scale, in the weight's
    dtype), and its error sums are those of the library's dequantization minus the weights."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    w = _weights(rows=24, cols=128, seed=bits).to(dtype)
    args = QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy="group" if group_size else "channel", group_size=group_size
    )
    scale, zp = quant.rtn_qparams(w, bits, group_size, symmetric)
    scale = scale.to(dtype)
    zp = None if symmetric else zp
    scratch = quant.Scratch()
    for _ in range(2):  # the second call reuses the buffers
        q, se, sw, mx = quant.quantize_rows(w, scale, zp, bits, group_size, scratch)
        theirs = quantize(w, scale, zp, args, dtype=torch.int8)
        assert torch.equal(q, theirs)
        d = dequantize(theirs, scale, zp, args).to(dtype).float() - w.float()
        assert se == pytest.approx(float((d.double() ** 2).sum()), rel=1e-5)
        assert sw == pytest.approx(float((w.double() ** 2).sum()), rel=1e-5)
        assert mx == float(d.abs().max())
        err = quant.quantize_error(w, scale, zp, bits, group_size, scratch)
        assert torch.equal(err, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_nonzero_on_bit_patterns(dtype):
    w = torch.tensor([[0.0, -0.0, 1.0, -2.0], [float("nan"), 0.0, -1e-3, float("inf")]]).to(dtype)
    scratch = quant.Scratch()
    assert quant.count_nonzero(w, scratch) == int(torch.count_nonzero(w)) == 5
    assert quant.count_nonzero(w[:, 1], scratch) == int(torch.count_nonzero(w[:, 1])) == 0  # strided: torch's own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 8), (4, None), (8, None), (8, 16)])
def test_scales_from_magnitude_bits_are_rtn_qparams(dtype, bits, group_size):
    """The streaming engine's symmetric scales from the weights' bit patterns (the largest
    magnitude as an integer maximum) equal rtn_qparams' from float min and max, bit for bit,
    with all-zero groups, negative zeros and groups whose extreme is negative."""
    g = torch.Generator().manual_seed(bits + (group_size or 0))
    w = (torch.randn(6, 32, generator=g) * 0.05).to(dtype)
    w[0, :16] = 0.0
    w[1, :] = -0.0
    w[2, 3] = -4.0  # a negative extreme
    w[3] = -w[3].abs()
    scratch = quant.Scratch()
    mag = quant.magnitude_bits(w, scratch)
    assert mag is not None and mag.dtype == (torch.int32 if dtype == torch.float32 else torch.int16)
    scale, zp = quant.symmetric_qparams(quant.group_max_abs(mag, dtype, group_size), bits)
    want_scale, want_zp = quant.rtn_qparams(w.float(), bits, group_size, True)
    assert torch.equal(scale, want_scale) and torch.equal(zp, want_zp)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int8
    assert quant.count_nonzero(w, scratch, magnitude=mag) == int(torch.count_nonzero(w))
    assert quant.magnitude_bits(w[:, ::2], scratch) is None  # strided: no bit view
