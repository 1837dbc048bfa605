"""``prune.structured``: remove whole feed-forward neurons and attention heads, shrinking the weights.

Unlike ``prune.magnitude`` (zeros in dense matrices), the matrices get physically smaller and the
config follows, so the artifact is smaller and faster and loads with plain ``transformers``
(``AutoModel*.from_pretrained``). The same number of neurons / heads goes from every layer: the
standard config has one width per model, not one per layer.

Parameters:

* ``ffn`` in [0, 1): fraction of each layer's feed-forward neurons to remove.
* ``heads`` in [0, 1): fraction of each layer's attention heads to remove. With grouped-query
  attention a key-value head and all the query heads that read it go together, so the fraction
  counts key-value groups, and ``num_attention_heads / num_key_value_heads`` is kept.
* ``norm``: ``"l2"`` (default) or ``"l1"``, the vector norm used by the scores below.

A fraction ``f`` of ``n`` removes ``floor(f * n + 0.5)`` (nearest, halves up); a request that
would remove none or all of them is refused at submit.

Importance scores (per layer; the lowest go):

* FFN neuron ``j``: the product of the norms of every weight vector that belongs only to it: its
  row in each input projection (``c_fc`` for GPT-2, ``intermediate.dense`` for BERT, ``gate_proj``
  and ``up_proj`` for Llama-style models; its bias entry counted as one more weight) and its
  column in the output projection (``c_proj`` / ``output.dense`` / ``down_proj``). A product, not
  a sum: ``|down[:, j] * act(gate_j . x) * (up_j . x)|`` is bounded by the product of the norms
  (times ``|x|``-terms), and a neuron with one zero factor contributes nothing and scores zero.
* Attention head group (one key-value head and its query heads): ``|V_g| * |O_g|``, the norm of
  its value rows (``v_proj``, bias included) times the norm of its output-projection columns
  (``o_proj``, all the group's query heads). A head writes a convex combination (softmax weights)
  of its value vectors through ``O``, so these two bound what it adds to the residual stream;
  the query and key rows only decide *where* it attends, not how much it writes, and are left
  out of the score (they are removed with the head, of course).

Supported: FFN of ``gpt2`` (``Conv1D``, config ``n_inner``), ``bert`` and ``roberta``
(``intermediate_size``), and the Llama family ``llama``, ``mistral``, ``qwen2`` (gated MLP,
``intermediate_size``); heads of the Llama family only, which keep ``head_dim`` in the config
(it is written explicitly, so the smaller ``num_attention_heads`` does not change it).
``LlamaConfig`` also insists that ``hidden_size`` be a multiple of ``num_attention_heads``, so
for Llama only the head counts that divide it are possible; the 422 lists the fractions that are.
Anything else (heads on BERT/GPT-2, other model types, a bare state dict) is refused at submit.

Streaming (``worker.methods.Method.stream``, worker/stream): the job never builds the model. The plan
(``_plan``: which layers, how many go, the checks and the config fields) is made on the meta
skeleton by the same code as in memory; a pre-pass reads the scored weights once each and keeps
only their norms; the write pass copies each row chunk's kept rows or columns. The scores and
indices come from the same functions (``_norms``, ``_keep``, ``_expand``) on the same values, so
the artifact is the in-memory one bit for bit (tests/test_prune_structured.py). The step starts a
pass of its own (its scores must see what earlier steps made of the weights); steps after it in
the pass (e.g. ``quantize.weight_only``) get the smaller tensors.

Example: ``{"method": "prune.structured", "params": {"ffn": 0.5, "heads": 0.25}}``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from core.methods import MethodConstraint, ModelInfo, StrictParams, register


class PruneStructuredParams(StrictParams):
    ffn: float = Field(default=0.0, ge=0, lt=1, description="fraction of each layer's feed-forward neurons to remove")
    heads: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description=(
            "fraction of each layer's attention heads to remove (key-value groups under grouped-query attention)"
        ),
    )
    norm: Literal["l1", "l2"] = Field(default="l2", description="vector norm of the importance scores")

    @model_validator(mode="after")
    def _something(self) -> PruneStructuredParams:
        if self.ffn == 0 and self.heads == 0:
            raise ValueError("give 'ffn' and/or 'heads' above 0: nothing would be removed")
        return self


@dataclass(frozen=True)
class _Family:
    mlp: Literal["conv1d", "bert", "gated"]  # how the FFN's modules are named and laid out
    ffn_key: str  # config key of the FFN width
    heads: bool  # q_proj/k_proj/v_proj/o_proj attention whose config keeps head_dim
    heads_divide_hidden: bool  # the config class validates hidden_size % num_attention_heads == 0


# By config model_type. A family is listed only when its module names and config keys are the
# ones handled here; a look-alike that is not listed is refused rather than guessed at.
FAMILIES: dict[str, _Family] = {
    "gpt2": _Family("conv1d", "n_inner", heads=False, heads_divide_hidden=False),
    "bert": _Family("bert", "intermediate_size", heads=False, heads_divide_hidden=False),
    "roberta": _Family("bert", "intermediate_size", heads=False, heads_divide_hidden=False),
    "llama": _Family("gated", "intermediate_size", heads=True, heads_divide_hidden=True),
    "mistral": _Family("gated", "intermediate_size", heads=True, heads_divide_hidden=False),
    "qwen2": _Family("gated", "intermediate_size", heads=True, heads_divide_hidden=False),
}


def removal_count(fraction: float, n: int) -> int:
    """How many of ``n`` a fraction removes: the nearest whole number, halves up."""
    return math.floor(fraction * n + 0.5)


def checked_removal(fraction: float, n: int, field: str, what: str) -> int:
    r = removal_count(fraction, n)
    if r < 1:
        raise ValueError(f"{field}={fraction} removes none of the {n} {what} (the smallest step is {1 / n:.4g})")
    if r >= n:
        raise ValueError(f"{field}={fraction} would remove all {n} {what}; at least one must stay")
    return r


def _int(cfg: dict[str, Any], key: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"config.json has no usable {key!r} (got {v!r})")
    return v


def _ffn_width(cfg: dict[str, Any], fam: _Family) -> int:
    if fam.ffn_key == "n_inner" and cfg.get("n_inner") is None:
        return 4 * _int(cfg, "n_embd")  # GPT-2's default width
    return _int(cfg, fam.ffn_key)


@dataclass(frozen=True)
class Heads:
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv


def head_layout(cfg: dict[str, Any]) -> Heads:
    hidden, n_heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    n_kv = cfg.get("num_key_value_heads") or n_heads
    if not isinstance(n_kv, int) or n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv!r})")
    head_dim = cfg.get("head_dim") or hidden // n_heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"config.json has no usable 'head_dim' (got {head_dim!r})")
    return Heads(n_heads, n_kv, head_dim, hidden)


def heads_removal(fraction: float, lay: Heads, fam: _Family) -> int:
    what = "key-value head groups" if lay.group > 1 else "attention heads"
    r = checked_removal(fraction, lay.n_kv, "heads", what)
    if fam.heads_divide_hidden and lay.hidden % ((lay.n_kv - r) * lay.group):
        ok = [round(k / lay.n_kv, 4) for k in range(1, lay.n_kv) if lay.hidden % ((lay.n_kv - k) * lay.group) == 0]
        raise ValueError(
            f"heads={fraction} would keep {(lay.n_kv - r) * lay.group} attention heads, but this config needs "
            f"hidden_size ({lay.hidden}) to be a multiple of num_attention_heads; "
            f"possible 'heads' values: {ok or 'none'}"
        )
    return r


def family_of(model_type: Any) -> _Family:
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise ValueError(f"prune.structured supports model types {sorted(FAMILIES)}, not {model_type!r}")
    return fam


def check(params: PruneStructuredParams, info: ModelInfo) -> None:
    """Submit-time refusal (pure Python on config.json: the API imports no torch)."""
    cfg = info.config or {}
    fam = family_of(cfg.get("model_type"))
    if params.ffn > 0:
        checked_removal(params.ffn, _ffn_width(cfg, fam), "ffn", "feed-forward neurons")
    if params.heads > 0:
        if not fam.heads:
            heads_ok = sorted(k for k, f in FAMILIES.items() if f.heads)
            raise ValueError(
                f"'heads' is supported for model types {heads_ok}; {cfg.get('model_type')} models support 'ffn' only"
            )
        heads_removal(params.heads, head_layout(cfg), fam)


CONSTRAINTS = [
    MethodConstraint(
        id="model_types",
        rule="ffn works on the model types listed under ffn, heads only on those under heads (config model_type).",
        params=("ffn", "heads"),
        values={"ffn": sorted(FAMILIES), "heads": sorted(k for k, f in FAMILIES.items() if f.heads)},
    ),
    MethodConstraint(
        id="removes_some_not_all",
        rule=(
            "A fraction f of n neurons or head groups removes floor(f*n + 0.5) of them: at least one, and "
            "not all; under grouped-query attention heads counts key-value groups."
        ),
        params=("ffn", "heads"),
    ),
    MethodConstraint(
        id="heads_divide_hidden",
        rule=(
            "Llama configs need hidden_size to be a multiple of num_attention_heads: heads may only keep a "
            "head count that divides it (the refusal lists the fractions that do)."
        ),
        params=("heads",),
        values={"model_types": sorted(k for k, f in FAMILIES.items() if f.heads_divide_hidden)},
    ),
]


register(
    "prune.structured",
    params=PruneStructuredParams,
    summary="Structured pruning: remove whole FFN neurons and attention heads, shrinking matrices and config.",
    formats=("hf",),
    check=check,
    streams=True,
    constraints=CONSTRAINTS,
)
