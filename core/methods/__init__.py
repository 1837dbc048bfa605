"""The method registry: what the API knows of each compression method.

A method is a pair of files with the same name (docs/ARCHITECTURE.md):

* ``core/methods/<name>.py``: the module docstring (the paper, a sample config; ``GET /v1/methods``
  shows it), a strict pydantic parameter model and its submit-time check, registered with
  :func:`register`. No torch: the API validates job specs with it.
* ``worker/methods/<name>.py``: the handler (and its streaming form), registered against the same
  method name with ``worker.methods.handler``.

Every module here is imported by :func:`load_all` (those whose name starts with ``_`` hold what
several methods share), so a new file is picked up by the API's validation and ``GET /v1/methods``;
the worker refuses to start when a method registered here has no handler, or a handler no method.

A method tells its limits up front: ``register(..., constraints=[MethodConstraint(...)])`` in its
own file, next to its parameters. ``GET /v1/methods`` lists them (:meth:`MethodSpec.describe`),
docs/METHODS.md is generated from them (``python -m core.methods._doc``; a test keeps it in step),
and a check that refuses a model raises :class:`Refusal` naming the constraint, so the 422 says
which limit it hit, with the facts (e.g. the blocking layers and the group sizes that would work).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StrictParams(BaseModel):
    """Base for method parameters: unknown keys are errors, values are not coerced from strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# Files from which AutoTokenizer builds an uploaded model's tokenizer (a fast tokenizer, a
# WordPiece vocabulary, or a byte-level BPE pair): methods that tokenize text need one of them.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"))


def has_tokenizer(files: tuple[str, ...] | list[str]) -> bool:
    names = set(files)
    return any(all(f in names for f in fs) for fs in TOKENIZER_FILE_SETS)


class TensorHeader(Protocol):
    """One tensor as a safetensors header describes it (core.jobs.plan.Tensor is one)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class ModelInfo:
    """What submit-time checks know of the job's model (no weights are read)."""

    format: str  # "hf" | "safetensors"
    architecture: str | None = None
    config: dict[str, Any] | None = None  # config.json of an HF model
    files: tuple[str, ...] = ()  # names of the uploaded files (e.g. to see a tokenizer is there)
    # The tensors of the stored safetensors files, from their headers: called only by a check that
    # needs every layer's shape (it may read storage: OSError, or ValueError for a bad header, and
    # the check then falls back on the config). None: the shapes are not known here.
    tensors: Callable[[], Sequence[TensorHeader]] | None = None


class MethodConstraint(BaseModel):
    """One limit of a method, told up front: ``GET /v1/methods`` and docs/METHODS.md list it, and
    a refusal that it causes names it (the 422 error entry's ``constraint``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="the limit's key, the same in every method that has it (e.g. group_divides_inputs)")
    rule: str = Field(description="the limit in a sentence")
    params: tuple[str, ...] = Field(default=(), description="the parameters it limits (none: the model or the job)")
    checked: Literal["submit", "run"] | None = Field(
        default="submit",
        description=(
            "submit: a job that breaks it is refused with a 422; run: the worker enforces it when the job "
            "runs; null: it says what the method acts on, and nothing is refused"
        ),
    )
    values: dict[str, Any] = Field(
        default_factory=dict,
        description="machine-readable facts: allowed values, model types, architectures, layer types",
    )


class Refusal(ValueError):
    """A submit-time check's refusal of a job (-> 422) that names the constraint it hit and carries
    its facts: ``fields`` are added to the error entry (e.g. ``blocking_layers``), ``param`` makes
    the entry's ``loc`` point at the parameter."""

    def __init__(self, msg: str, *, constraint: str, param: str | None = None, **fields: Any) -> None:
        super().__init__(msg)
        self.constraint = constraint
        self.param = param
        self.fields = fields

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword arguments: the default (cls, args) would lose them when a worker pickles it.
        return (_refusal, (str(self), self.constraint, self.param, self.fields))


def _refusal(msg: str, constraint: str, param: str | None, fields: dict[str, Any]) -> Refusal:
    return Refusal(msg, constraint=constraint, param=param, **fields)


# Model formats: "hf" (a transformers directory) and "safetensors" (a bare state dict).
ALL_FORMATS = frozenset({"hf", "safetensors"})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[StrictParams]
    summary: str
    # The module docstring of core/methods/<name>.py: the paper, the parameters, a sample config.
    description: str = ""
    needs_gpu: bool = False
    needs_data: bool = False
    # Model formats the method accepts: "hf" (a transformers directory) and/or "safetensors".
    formats: frozenset[str] = field(default_factory=lambda: ALL_FORMATS)
    # Optional submit-time check against the model: raise ValueError("why") to refuse (422).
    check: Callable[[Any, ModelInfo], None] | None = None
    # True when the method leaves weights in a form other methods cannot change (packed integers):
    # it must be the last weight-changing step of a job.
    final: bool = False
    # True when the method has a streaming form (worker/stream): it transforms the checkpoint
    # tensor by tensor from the shards without building the model. The worker's handler for the
    # method must then give its ``stream`` (checked when the worker loads its handlers).
    streams: bool = False
    # True when the handler only changes the model through llm-compressor's sequential pipeline,
    # which onloads one decoder block at a time: such steps run on a model whose weights stay on
    # disk (the block path, worker/pipeline.py). Handlers that write weights in place must not.
    blocks: bool = False
    # The method's own limits (``MethodConstraint``), declared in its file; :meth:`constraints`
    # adds those the flags above imply.
    own_constraints: tuple[MethodConstraint, ...] = ()
    # Methods one of which must come right after this one (a rotation does nothing useful on its
    # own: it prepares the weights for the quantizer that follows). None: no such rule.
    followed_by: frozenset[str] | None = None
    # For a method that needs data only with some parameters (a calibrated scheme among data-free
    # ones): ``needs_data_when(params)`` says whether these do; without a dataset they are refused
    # at submit like a method that always needs data.
    needs_data_when: Callable[[Any], bool] | None = None

    def constraints(self) -> list[MethodConstraint]:
        """Every limit of the method: those its flags imply (formats, data, GPU, last step), then
        its own."""
        implied = []
        if self.formats != ALL_FORMATS:
            implied.append(format_constraint(self.formats))
        if self.needs_data:
            implied.append(NEEDS_DATA)
        elif self.needs_data_when is not None:
            implied.append(NEEDS_DATA_FOR)
        if self.needs_gpu:
            implied.append(NEEDS_GPU)
        if self.final:
            implied.append(LAST_STEP)
        if self.followed_by is not None:
            implied.append(followed_by_constraint(self.followed_by))
        return [*implied, *self.own_constraints]

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/methods`` shows of the method (the fields of its ``MethodOut``)."""
        return {
            "name": self.name,
            "summary": self.summary,
            "description": self.description,
            "needs_gpu": self.needs_gpu,
            "needs_data": self.needs_data,
            "formats": sorted(self.formats),
            "params_schema": self.params.model_json_schema(),
            "constraints": [c.model_dump(mode="json") for c in self.constraints()],
        }


# The constraints the registry's flags imply (MethodSpec.constraints): validate_steps checks them.
_FORMAT_NAMES = {"hf": "a transformers model directory (config.json)", "safetensors": "a bare safetensors state dict"}


def format_constraint(formats: frozenset[str]) -> MethodConstraint:
    refused = " and ".join(_FORMAT_NAMES[f] for f in sorted(ALL_FORMATS - formats))
    return MethodConstraint(
        id="model_format",
        rule=f"Needs {' or '.join(_FORMAT_NAMES[f] for f in sorted(formats))}; {refused} is refused.",
        values={"formats": sorted(formats)},
    )


NEEDS_DATA = MethodConstraint(
    id="dataset_required",
    rule="Needs data: the job's dataset_id (calibration or training texts).",
)
NEEDS_DATA_FOR = MethodConstraint(
    id="dataset_required",
    rule="Needs data (the job's dataset_id) with the parameters that calibrate on it (the method's description "
    "names them); the others are data-free.",
)
NEEDS_GPU = MethodConstraint(
    id="gpu_only",
    rule="Runs on GPU workers only: the job waits on the gpu queue until one serves it.",
    checked="run",
)
# Declared by the methods that tokenize the job's dataset (has_tokenizer refuses the others).
NEEDS_TOKENIZER = MethodConstraint(
    id="tokenizer_required",
    rule="The model's tokenizer files must be uploaded with it (the dataset is tokenized with them).",
    values={"file_sets": [list(fs) for fs in TOKENIZER_FILE_SETS]},
)
LAST_STEP = MethodConstraint(
    id="last_step",
    rule="Must be the last step of the job: it leaves packed integer weights no other method can change.",
)


def followed_by_constraint(methods: frozenset[str]) -> MethodConstraint:
    return MethodConstraint(
        id="followed_by",
        rule=f"Must be followed directly by one of {', '.join(sorted(methods))}: on its own it prepares "
        "weights for a quantizer and changes nothing a user gains from.",
        values={"methods": sorted(methods)},
    )


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    params: type[StrictParams],
    summary: str,
    needs_gpu: bool = False,
    needs_data: bool = False,
    formats: tuple[str, ...] = ("hf", "safetensors"),
    check: Callable[[Any, ModelInfo], None] | None = None,
    final: bool = False,
    streams: bool = False,
    blocks: bool = False,
    constraints: Sequence[MethodConstraint] = (),
    followed_by: Sequence[str] | None = None,
    needs_data_when: Callable[[Any], bool] | None = None,
) -> MethodSpec:
    """Register the method ``name`` (called once, at the bottom of core/methods/<name>.py) with the
    limits it declares there (``constraints``; those its flags imply are added by the registry)."""
    if name in _REGISTRY:
        raise RuntimeError(f"method {name!r} registered twice")
    module = sys.modules.get(params.__module__)
    description = inspect.cleandoc(module.__doc__ or "") if module else ""
    ids = [c.id for c in constraints]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"method {name!r}: a constraint id is declared twice ({ids})")
    spec = MethodSpec(
        name,
        params,
        summary,
        description,
        needs_gpu,
        needs_data,
        frozenset(formats),
        check,
        final,
        streams,
        blocks,
        tuple(constraints),
        frozenset(followed_by) if followed_by is not None else None,
        needs_data_when,
    )
    _REGISTRY[name] = spec
    return spec


_loaded = False


def load_all() -> dict[str, MethodSpec]:
    """Import every method module (failing loudly on a broken one) and return the registry."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> MethodSpec | None:
    return load_all().get(name)


class StepError(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def _data_error(spec: MethodSpec) -> dict[str, Any]:
    return {
        "loc": ["body", "dataset_id"],
        "msg": f"{spec.name} with these parameters calibrates on data: give the job a dataset_id "
        "(or choose a data-free setting: see GET /v1/methods)",
        "type": "dataset_required",
        "constraint": NEEDS_DATA_FOR.id,
    }


def _followed_by_error(spec: MethodSpec, steps: list[dict[str, Any]], i: int) -> dict[str, Any] | None:
    """The error of step ``i`` when the method must be followed by one of some methods and is not."""
    if spec.followed_by is None:
        return None
    after = steps[i + 1].get("method") if i + 1 < len(steps) else None
    if after in spec.followed_by:
        return None
    return {
        "loc": ["body", "steps", i, "method"],
        "msg": f"{spec.name} must be followed directly by one of {', '.join(sorted(spec.followed_by))} (it "
        "prepares the weights for that quantizer; "
        + ("nothing follows it" if after is None else f"{after!r} follows it")
        + ")",
        "type": "step_order",
        "constraint": "followed_by",
    }


def validate_steps(
    steps: list[dict[str, Any]], model: ModelInfo | None = None, has_dataset: bool = True
) -> list[dict[str, Any]]:
    """Validate raw steps against the registry (and the model, when given); return them
    normalised (defaults filled in).

    Raises StepError with one entry per problem, each with a ``loc`` naming the field.
    """
    registry = load_all()
    errors: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    final_at: int | None = None
    for i, step in enumerate(steps):
        loc = ["body", "steps", i]
        spec = registry.get(step.get("method", ""))
        if spec is None:
            errors.append(
                {
                    "loc": [*loc, "method"],
                    "msg": f"unknown method {step.get('method')!r}; see GET /v1/methods",
                    "type": "unknown_method",
                }
            )
            continue
        if model is not None and model.format not in spec.formats:
            errors.append(
                {
                    "loc": [*loc, "method"],
                    "msg": f"{spec.name} does not support {model.format!r} models",
                    "type": "unsupported_model",
                    "constraint": "model_format",
                }
            )
            continue
        if spec.needs_data and not has_dataset:
            errors.append(
                {
                    "loc": ["body", "dataset_id"],
                    "msg": f"{spec.name} needs data: give the job a dataset_id",
                    "type": "dataset_required",
                    "constraint": NEEDS_DATA.id,
                }
            )
            continue
        if final_at is not None:
            errors.append(
                {
                    "loc": [*loc, "method"],
                    "msg": f"step {final_at} leaves packed weights; it must be the last step",
                    "type": "step_order",
                    "constraint": LAST_STEP.id,
                }
            )
            continue
        try:
            params = spec.params.model_validate(step.get("params") or {})
        except ValidationError as e:
            for err in e.errors(include_url=False, include_input=False, include_context=False):
                errors.append({"loc": [*loc, "params", *err["loc"]], "msg": err["msg"], "type": err["type"]})
            continue
        if spec.needs_data_when is not None and not has_dataset and spec.needs_data_when(params):
            errors.append(_data_error(spec))
            continue
        if model is not None and spec.check is not None:
            try:
                spec.check(params, model)
            except Refusal as e:
                where = [*loc, "params", *([e.param] if e.param else [])]
                errors.append(
                    {"loc": where, "msg": str(e), "type": "unsupported_model", "constraint": e.constraint, **e.fields}
                )
                continue
            except ValueError as e:
                errors.append({"loc": [*loc, "params"], "msg": str(e), "type": "unsupported_model"})
                continue
        if spec.final:
            final_at = i
        order = _followed_by_error(spec, steps, i)
        if order is not None:
            errors.append(order)
            continue
        out.append({"method": spec.name, "params": params.model_dump(mode="json")})
    if errors:
        raise StepError(errors)
    return out
