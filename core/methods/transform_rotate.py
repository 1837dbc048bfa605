"""``transform.rotate``: Hadamard rotations before quantization (QuaRot, Ashkboos et al., 2024,
arXiv:2404.00456; SpinQuant, Liu et al., 2024, arXiv:2405.16406; QuIP#, Tseng et al., 2024,
arXiv:2402.04396).

A few weight and activation channels are far larger than the rest, and they set the scale every
other value in their group is rounded against. Multiplying a layer's input by an orthogonal
(Hadamard) matrix, and its weight by the inverse, leaves the layer's output unchanged but spreads
those outliers over every channel, so 4-bit round-to-nearest or GPTQ loses much less. The step
only rotates: it must be followed directly by ``quantize.weight_only``, ``quantize.gptq``,
``quantize.autoround`` or ``quantize.fp4`` (alone it changes nothing a user gains from: 422).

``style``:

* ``spinquant`` (default): rotations R1 (the residual stream: embeddings, every projection that
  reads or writes it, the LM head) and R2 (each attention head's values and output projection),
  fused into the weights through the RMSNorms (whose scales are folded into the next
  projections). **The artifact is an ordinary model**: it loads and runs in transformers, vLLM
  and everything else, with no extra operation. For Llama and Mistral (plain RMSNorm, no biases
  on the rotated projections); other architectures are refused (use ``quip``). Tied embeddings
  are untied (the rotated head is its own tensor: the artifact grows by one vocab x hidden table).
  llm-compressor also centres the embeddings, which is exact only before a LayerNorm: on these
  RMSNorm models it would change the model, so it is not done here; the rotated model computes the
  original's function (the step's metrics report the largest logit difference on random ids).
* ``quip``: every targeted Linear gets an online Hadamard on its input (the weight keeps the
  inverse): any architecture with Linear layers. **The rotations run at inference**, so the
  artifact's compressed-tensors ``quantization_config.transform_config`` records them and the
  checkpoint holds their matrices: vLLM (compressed-tensors transforms) runs it; transformers
  5.17 does not apply them and would compute wrong outputs (modelpress' own evaluation applies
  them). GGUF and ONNX exports cannot express them and are refused at submit.

``transform_type``: ``random-hadamard`` (default: a Hadamard matrix with random signs, for widths
that are a power of two times one of the known Hadamard orders up to 256, e.g. 576 = 36 x 16,
640 = 40 x 16), ``hadamard`` (powers of two only), ``random-matrix`` (any width, a dense random
orthogonal matrix: slower). ``block_size``: rotate in blocks of this many channels (block
diagonal) instead of the whole width. ``ignore`` (``quip``): Linear layers left unrotated (the
LM head by default). Runs through llm-compressor's ``SpinQuantModifier`` / ``QuIPModifier``; no
calibration data.

Example: ``{"method": "transform.rotate", "params": {"style": "spinquant"}}`` followed by
``{"method": "quantize.gptq", "params": {"scheme": "W4A16", "group_size": 128}}``
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.methods import MethodConstraint, ModelInfo, Refusal, StrictParams, register
from core.methods._ct import CT_CONSTRAINTS, check_model

# Architectures whose norms and projection names SpinQuant's fused rotations are exact for
# (llm-compressor 0.14 maps LlamaForCausalLM; Mistral has the same modules and RMSNorm).
SPINQUANT_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM"})
# compressed-tensors 0.19's known Hadamard orders (transform/utils/hadamards.safetensors): a
# random-hadamard of width n exists when n = k * 2^j for one of them (a test reads the file).
KNOWN_HADAMARD_ORDERS = frozenset({1, 2, *range(4, 257, 4)})
FOLLOWED_BY = ("quantize.weight_only", "quantize.gptq", "quantize.autoround", "quantize.fp4")
RUNTIMES = {
    "spinquant": ["transformers", "vLLM", "any runtime (the weights are an ordinary model)"],
    "quip": ["vLLM (compressed-tensors transforms)"],
}

ARCHITECTURES = MethodConstraint(
    id="architectures",
    rule="style spinquant fuses its rotations through the norms: Llama and Mistral only. style quip "
    "rotates every targeted Linear's input online: any model with Linear layers.",
    params=("style",),
    values={"spinquant": sorted(SPINQUANT_ARCHITECTURES), "runtimes": RUNTIMES},
)
WIDTHS = MethodConstraint(
    id="hadamard_widths",
    rule="hadamard needs widths that are powers of two; random-hadamard widths of k * 2^j with k a "
    "known Hadamard order (1, 2 or a multiple of 4 up to 256); random-matrix any width. block_size "
    "must divide the widths it rotates.",
    params=("transform_type", "block_size"),
)


class TransformRotateParams(StrictParams):
    style: Literal["spinquant", "quip"] = Field(
        default="spinquant",
        description="spinquant: rotations fused into the weights (an ordinary model, loads anywhere); "
        "quip: online input Hadamards recorded in the compressed-tensors config (vLLM)",
    )
    transform_type: Literal["random-hadamard", "hadamard", "random-matrix"] = Field(
        default="random-hadamard", description="the rotation matrices (see the widths they support)"
    )
    block_size: int | None = Field(
        default=None, ge=2, le=65536, description="rotate in blocks of this many channels; null: the whole width"
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=64,
        description="quip: Linear layers left unrotated (names or 're:<regex>')",
    )


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported_width(n: int, transform_type: str) -> bool:
    if transform_type == "random-matrix":
        return n > 0
    if transform_type == "hadamard":
        return _pow2(n)
    return any(n % k == 0 and _pow2(n // k) for k in KNOWN_HADAMARD_ORDERS)


def _widths(config: dict[str, object], style: str) -> dict[str, int]:
    """The widths the style rotates, from config.json (the handler checks the real layers again)."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    out: dict[str, int] = {}
    keys = ("hidden_size", "head_dim") if style == "spinquant" else ("hidden_size", "intermediate_size")
    for key in keys:
        v = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(v, int) and v > 0:
            out[key] = v
    if "head_dim" in keys and "head_dim" not in out and isinstance(cfg, dict):
        h, n = cfg.get("hidden_size"), cfg.get("num_attention_heads")
        if isinstance(h, int) and isinstance(n, int) and n > 0:
            out["head_dim"] = h // n
    return out


def _check(params: TransformRotateParams, info: ModelInfo) -> None:
    check_model("transform.rotate", info)
    if params.style == "spinquant" and info.architecture not in SPINQUANT_ARCHITECTURES:
        raise Refusal(
            f"transform.rotate style spinquant fuses its rotations through the model's norms, which is exact for "
            f"{', '.join(sorted(SPINQUANT_ARCHITECTURES))} only; {info.architecture or 'this model'} is not one "
            "(its norms or biases would change the model). Use style quip (online rotations, vLLM)",
            constraint=ARCHITECTURES.id,
            param="style",
        )
    for key, width in _widths(info.config or {}, params.style).items():
        if params.block_size is not None:
            if width % params.block_size:
                raise Refusal(
                    f"transform.rotate: block_size {params.block_size} does not divide the model's {key} ({width})",
                    constraint=WIDTHS.id,
                    param="block_size",
                )
            width = params.block_size
        if not supported_width(width, params.transform_type):
            raise Refusal(
                f"transform.rotate: transform_type {params.transform_type} has no matrix of width {width} (the "
                f"model's {key}); use random-hadamard (k * 2^j widths), random-matrix (any width) or a block_size",
                constraint=WIDTHS.id,
                param="transform_type",
            )


register(
    "transform.rotate",
    params=TransformRotateParams,
    summary="Hadamard rotations (SpinQuant fused, or QuIP online) that make the following quantizer lose less.",
    formats=("hf",),
    check=_check,
    constraints=[ARCHITECTURES, WIDTHS, *CT_CONSTRAINTS],
    followed_by=FOLLOWED_BY,
)
