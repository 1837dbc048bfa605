"""docs/METHODS.md, generated from the method registry: every method with its parameters, their
defaults and its constraints, as ``GET /v1/methods`` serves them (``MethodSpec.describe``).

Write it again after changing a method: ``python -m core.methods._doc`` (tests/test_method_constraints.py
fails while the file and the registry differ).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.methods import MethodSpec, ModelInfo, StepError, load_all, validate_steps

DOC = Path(__file__).resolve().parents[2] / "docs" / "METHODS.md"

INTRO = """\
# Compression methods

Generated from the method registry (`core/methods/`, one file per method) by
`python -m core.methods._doc`: do not edit by hand. A test fails when this file and the registry
differ. `GET /v1/methods` serves the same facts: each method's `params_schema` (JSON Schema) and
its `constraints`.

A method's **constraints** are the limits it has beyond its parameters' types. Each has an `id`
(the same id in every method that has it), the rule, the parameters it limits, and when it is
checked:

* **submit**: a job that breaks it is refused with a 422 problem whose `errors[]` entry names it in
  `constraint` and carries its facts (see group sizes below);
* **run**: the worker enforces it when the job runs;
* **-**: it says what the method acts on; nothing is refused.

## Group sizes

`quantize.weight_only`, `quantize.gptq` and `quantize.awq` store one scale per `group_size`
consecutive input columns of each Linear weight (compressed-tensors' `group` strategy), so a layer
takes a group size only where it divides its input width (`in_features`). The accepted sizes are
32, 64 and 128; `null` (one scale per output channel) always works.

**Fallbacks (the default).** A layer the requested size does not divide gets the largest accepted
size below it that divides its width, or one scale per output channel where none does: on a model
of hidden width 576 (SmolLM-135M, Gemma-3-270M-like: 576 = 64 x 9), `group_size` 128 quantizes
the 1536-wide `down_proj` layers in groups of 128 and the 576-wide projections in groups of 64.
The artifact records each fallback as a compressed-tensors config group of its own whose
`targets` name its layers exactly (compressed-tensors and vLLM match an exact name before the
class name `Linear`), so it loads in transformers and vLLM like any other; the step's metrics list
every such layer and what it got (`group_fallbacks`: `{{"model.layers.0.self_attn.q_proj": 64,
...}}`, `"channel"` for per-channel scales), and the report shows them with the step.

**`strict_group_size: true`** keeps one layout for users who need it: the job is refused at
submit (from the model's safetensors headers, or the widths its `config.json` names when the
headers cannot be read; the worker checks every layer again). The refusal names the blocking
layers and the accepted sizes that would work. The same 576-wide model refuses
`{{"group_size": 128, "strict_group_size": true}}` with this `errors[]` entry (`blocking_layers`
shortened here to two of its entries):

```json
{example}
```

`blocking_layers` lists up to 100 layers (`blocking_count` counts them all); `valid_group_sizes`
lists the accepted sizes (32, 64, 128) that divide every input width, and may be empty (then only
`null` works). Where only the config is known, `blocking_config` names the config fields instead
(e.g. `{{"hidden_size": 576}}`).
"""


@dataclass(frozen=True)
class _Header:
    name: str
    dtype: str
    shape: tuple[int, ...]


def smollm_like(layers: int = 30, hidden: int = 576, ffn: int = 1536) -> list[_Header]:
    """The Linear weights of a SmolLM-135M-shaped Llama, as its safetensors headers give them."""
    out = [_Header("model.embed_tokens.weight", "BF16", (49152, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [_Header(f"{p}.self_attn.{m}.weight", "BF16", (hidden, hidden)) for m in ("q_proj", "o_proj")]
        out += [_Header(f"{p}.self_attn.{m}.weight", "BF16", (192, hidden)) for m in ("k_proj", "v_proj")]
        out += [_Header(f"{p}.mlp.{m}.weight", "BF16", (ffn, hidden)) for m in ("gate_proj", "up_proj")]
        out.append(_Header(f"{p}.mlp.down_proj.weight", "BF16", (hidden, ffn)))
    return out


def group_refusal_example() -> dict[str, Any]:
    """The 422 error entry of ``quantize.weight_only`` with strict groups of 128 on a SmolLM-like model."""
    info = ModelInfo("hf", "LlamaForCausalLM", {"model_type": "llama", "hidden_size": 576}, (), smollm_like)
    step = {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 128, "strict_group_size": True}}
    try:
        validate_steps([step], info)
    except StepError as e:
        return e.errors[0]
    raise AssertionError("groups of 128 were not refused on a width of 576")


_EXAMPLE = re.compile(r"Example: ``(.+?)``", re.S)


def _cell(text: str) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _type(prop: dict[str, Any]) -> str:
    """A parameter's type from its JSON Schema, as a reader says it."""
    if "enum" in prop:
        return " or ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    bounds = [
        f"{op} {prop[key]}"
        for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
        if key in prop
    ]
    return ", ".join([str(kind), *bounds])


def _params(spec: MethodSpec, schema: dict[str, Any]) -> list[str]:
    props: dict[str, Any] = schema.get("properties", {})
    if not props:
        return ["No parameters."]
    required = set(schema.get("required", []))
    rows = ["| Parameter | Type | Default | Description |", "|---|---|---|---|"]
    for name, prop in props.items():
        # From the model, not the schema: a default_factory's value is not in the JSON Schema.
        value = spec.params.model_fields[name].get_default(call_default_factory=True)
        default = "required" if name in required else f"`{json.dumps(value)}`"
        rows.append(f"| `{name}` | {_cell(_type(prop))} | {default} | {_cell(prop.get('description', ''))} |")
    return rows


def _constraints(items: list[dict[str, Any]]) -> list[str]:
    if not items:
        return ["None beyond the parameters' types."]
    rows = ["| Constraint | Rule | Parameters | Checked | Values |", "|---|---|---|---|---|"]
    for c in items:
        params = ", ".join(f"`{p}`" for p in c["params"]) or "-"
        values = f"`{_cell(json.dumps(c['values']))}`" if c["values"] else "-"
        rows.append(f"| `{c['id']}` | {_cell(c['rule'])} | {params} | {c['checked'] or '-'} | {values} |")
    return rows


def _method(spec: MethodSpec) -> list[str]:
    d = spec.describe()
    lines = [f"## `{d['name']}`", "", d["summary"], ""]
    facts = [f"formats: {', '.join(d['formats'])}", f"needs data: {'yes' if d['needs_data'] else 'no'}"]
    facts.append(f"GPU only: {'yes' if d['needs_gpu'] else 'no'}")
    lines += ["; ".join(facts) + ".", ""]
    example = _EXAMPLE.search(d["description"])
    if example:
        lines += [f"Example step: `{' '.join(example.group(1).split())}`", ""]
    lines += ["Parameters:", "", *_params(spec, d["params_schema"]), ""]
    lines += ["Constraints:", "", *_constraints(d["constraints"])]
    return [*lines, ""]


def render() -> str:
    """docs/METHODS.md as the registry has it now."""
    specs = list(load_all().values())
    index = ["## Methods", "", "| Method | Summary |", "|---|---|"]
    index += [f"| [`{s.name}`](#{s.name.replace('.', '')}) | {_cell(s.summary)} |" for s in specs]
    example = {**group_refusal_example()}
    example["blocking_layers"] = example["blocking_layers"][:2]
    shown = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in example.items()) + "\n}"
    out = [INTRO.format(example=shown), *index, ""]
    for spec in specs:
        out += _method(spec)
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")
