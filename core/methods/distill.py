"""``distill``: knowledge distillation of the job's model (the teacher) into a smaller student,
which then replaces the model (the artifact is the student, with the teacher's tokenizer files).

The student is exactly one of:

* ``layers: k`` -- the teacher with k layers, DistilBERT-style: embeddings, final norm and head are
  copied, and student layer j starts as teacher layer ``round(j·(n−1)/(k−1))`` (k evenly spaced
  layers, first and last included; k=1 takes layer 0). k must be below the teacher's layer count.
* ``student_config`` -- overrides of the teacher's config fields, e.g.
  ``{"num_hidden_layers": 1, "intermediate_size": 64}``; every weight whose shape still matches the
  teacher's is copied (layers evenly spaced as above), the rest is randomly initialised. Size
  fields may only shrink; ``vocab_size``, the labels and the model type cannot change (the student
  must produce the teacher's logits).
* ``student_model_id`` -- another uploaded HF model of the same tenant, with the same tokenizer
  and vocabulary (checked when the job is submitted).

Loss: ``α·CE + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))`` (``worker.ops.distill``), KL averaged
over the real (non-padding) token positions. CE is next-token prediction for a causal LM
(``*ForCausalLM`` / ``*LMHeadModel``) or the dataset's labels for a sequence classifier
(``*ForSequenceClassification``; the dataset must then be labeled, and its labels are mapped to the
teacher's ``label2id`` when they are its label names, used as ids when they are in range, and
otherwise numbered in sorted order). **Any other architecture -- a bare encoder such as
``BertModel``, seq2seq, multiple-choice, token classification -- is refused at submit (422)**: there
is either no output distribution to distill or no task loss defined for it here.

**Hidden-state loss** (``hidden_loss``: ``"cosine"`` or ``"mse"``, weight ``hidden_weight`` β; off by
default): ``β·H`` is added to the loss above, where H is the mean over the student's layers of a
distance between student layer j's output and the output of the teacher layer it was initialised
from (the evenly spaced map above; DistilBERT's cosine loss, TinyBERT's MSE), averaged over the real
token positions. ``cosine`` is ``1 − cos`` (scale-free: start there); ``mse`` is in the residual
stream's own units, which grow large in deep models, so β must be scaled to them. Refused at submit
(422, constraint ``hidden_alignment``) for an uploaded student (``student_model_id``: its layers
were not initialised from the teacher's and its width cannot be checked at submit) and for a
``student_config`` that changes the hidden width (no projection is learned here).

**Learning-rate schedule**: ``warmup_steps`` linear warm-up steps (the rate reaches ``lr`` at step
``warmup_steps``), then ``lr_schedule`` ``"constant"`` or ``"cosine"`` (decay from ``lr`` towards 0
at the last step). The defaults (``constant``, no warm-up) keep the behaviour of jobs submitted
before these parameters existed; for runs of more than a few dozen steps ``cosine`` with a warm-up
of ~5-10 % of the steps is the usual choice.

**Frozen embeddings** (``freeze_embeddings: true``): the student's token embeddings and its LM head
(tied to them or not) stay the teacher's and are not trained. In a small model with a large
vocabulary they are most of the parameters (Gemma 3 270M: 168 M of 268 M), so each step is cheaper
(no gradient for the vocabulary-sized matrix, no optimizer state for it) and the student keeps the
teacher's token space; off by default.

**Held-out evaluation**: the last ``holdout`` fraction of the dataset's samples (at most
``holdout_max_samples``; default 10 %, at most 64) is kept out of training; texts that also occur
among the training samples are dropped from it, so the two are disjoint. The teacher, the student
before training and the student after training are measured on it: perplexity (token-weighted,
``exp`` of the mean next-token loss) for a causal LM, accuracy against the labels for a classifier.
The job's metrics carry them under ``heldout`` with the sample and token counts; with ``holdout:
0`` (or a dataset too small to spare a sample) every sample trains and ``heldout`` says why there
is no figure. The progress notes carry each step's loss, its running mean over the last 10 steps
and the learning rate.

Needs a dataset (``dataset_id``) and the model's tokenizer files (``tokenizer.json``, ``vocab.txt``,
or ``vocab.json`` + ``merges.txt``) in the upload; texts are cut to ``max_length`` tokens (and to
the model's position limit). Training is AdamW (no weight decay, gradients clipped to norm 1) in
float32; the student is cast back to the teacher's dtype at the end.

Example: ``{"method": "distill", "params": {"layers": 2, "steps": 500, "temperature": 2.0}}``; with
the hidden-state loss and a schedule: ``{"layers": 6, "steps": 2000, "alpha": 0.5, "hidden_loss":
"cosine", "hidden_weight": 1.0, "lr": 1e-4, "lr_schedule": "cosine", "warmup_steps": 100}``
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.methods import (
    NEEDS_TOKENIZER,
    MethodConstraint,
    ModelInfo,
    Refusal,
    StrictParams,
    has_tokenizer,
    register,
)

# Config fields a student_config may not change: the student must emit the teacher's logits over
# the same vocabulary / classes, and the class and remote code are not the user's to pick.
FROZEN_FIELDS = frozenset(
    {
        "model_type",
        "architectures",
        "auto_map",
        "vocab_size",
        "num_labels",
        "id2label",
        "label2id",
        "problem_type",
        "is_encoder_decoder",
        "dtype",
        "torch_dtype",
        "transformers_version",
    }
)
# Canonical names PretrainedConfig subclasses map onto their own (GPT-2: n_layer, n_embd, ...).
CANONICAL_FIELDS = frozenset({"num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"})
# Size fields, grouped by meaning across model families: a student may shrink them, not grow them.
SIZE_GROUPS = (
    ("num_hidden_layers", "n_layer", "num_layers"),
    ("hidden_size", "n_embd", "d_model"),
    ("intermediate_size", "n_inner", "ffn_dim"),
    ("num_attention_heads", "n_head"),
    ("num_key_value_heads",),
)
LAYER_FIELDS = SIZE_GROUPS[0]
WIDTH_FIELDS = SIZE_GROUPS[1]
HIDDEN_WEIGHT_DEFAULT = 1.0


class DistillParams(StrictParams):
    layers: int | None = Field(
        default=None, ge=1, le=1024, description="student = the teacher with this many (evenly spaced) layers"
    )
    student_config: dict[str, Any] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description='student = the teacher\'s config with these fields overridden, e.g. {"num_hidden_layers": 1}',
    )
    student_model_id: str | None = Field(
        default=None, min_length=1, max_length=64, description="student = this uploaded model (same tokenizer)"
    )
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the task loss (CE); 1 − alpha weighs T²·KL")
    temperature: float = Field(default=2.0, gt=0, le=100, description="softmax temperature T of the soft targets")
    steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="optimizer steps (default 100 when epochs is not given)"
    )
    epochs: int | None = Field(default=None, ge=1, le=10_000, description="passes over the dataset (instead of steps)")
    lr: float = Field(default=5e-5, gt=0, le=1, description="AdamW learning rate")
    batch_size: int = Field(default=8, ge=1, le=4096)
    max_length: int = Field(default=128, ge=2, le=131_072, description="tokens per sample (longer texts are cut)")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    hidden_loss: Literal["cosine", "mse"] | None = Field(
        default=None,
        description="add a loss between each student layer's output and its teacher layer's (null: logits only)",
    )
    hidden_weight: float = Field(
        default=HIDDEN_WEIGHT_DEFAULT, ge=0, le=10_000, description="weight β of the hidden-state loss"
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="after the warm-up: a constant rate, or a cosine decay towards 0"
    )
    warmup_steps: int = Field(default=0, ge=0, le=10_000_000, description="linear learning-rate warm-up steps")
    holdout: float = Field(
        default=0.1, ge=0, le=0.5, description="fraction of the dataset (its last samples) held out to evaluate"
    )
    holdout_max_samples: int = Field(default=64, ge=1, le=100_000, description="at most this many held-out samples")
    freeze_embeddings: bool = Field(
        default=False, description="keep the token embeddings and the LM head (tied or not) as the teacher's"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, data: Any) -> Any:
        # The default is filled in before validation so the stored (normalised) spec says 100.
        if isinstance(data, dict) and data.get("steps") is None and data.get("epochs") is None:
            data = {**data, "steps": 100}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> DistillParams:
        given = [n for n in ("layers", "student_config", "student_model_id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'layers', 'student_config' or 'student_model_id' (got {given or 'none'})"
            )
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either 'steps' or 'epochs', not both")
        # Compared with the default, not model_fields_set: the stored spec has every default filled in.
        if self.hidden_loss is None and self.hidden_weight != HIDDEN_WEIGHT_DEFAULT:
            raise ValueError("hidden_weight is the weight of hidden_loss: give hidden_loss ('cosine' or 'mse') too")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.student_config is not None:
            bad = sorted(set(self.student_config) & FROZEN_FIELDS)
            if bad:
                raise ValueError(f"student_config cannot change {bad}: the student must produce the teacher's logits")
        return self


def head_kind(architecture: str | None) -> str | None:
    """``causal_lm``, ``sequence_classification``, or None (no head distill can train)."""
    if not architecture:
        return None
    if architecture.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    return None


def _config_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def check(params: DistillParams, info: ModelInfo) -> None:
    """Submit-time: a head to distill, a tokenizer, and a student smaller than the teacher."""
    config = info.config or {}
    kind = head_kind(info.architecture)
    if kind is None or config.get("is_encoder_decoder"):
        raise ValueError(
            f"distill needs a causal LM (*ForCausalLM / *LMHeadModel) or a sequence classifier "
            f"(*ForSequenceClassification); {info.architecture or 'this model'} has no such head"
        )
    if kind == "sequence_classification":
        labels = config.get("id2label")
        if config.get("problem_type") in ("regression", "multi_label_classification") or (
            isinstance(labels, dict) and len(labels) < 2
        ):
            raise ValueError(
                "distill trains single-label classifiers (cross-entropy over >= 2 classes); "
                "this one is a regression or multi-label model"
            )
    if not has_tokenizer(info.files):
        raise ValueError(
            "distill tokenizes the dataset with the model's own tokenizer: "
            "upload tokenizer.json (or vocab.txt, or vocab.json + merges.txt) with the model"
        )
    teacher_layers = _config_int(config, LAYER_FIELDS)
    if params.layers is not None and teacher_layers is not None and params.layers >= teacher_layers:
        raise ValueError(f"layers must be below the teacher's {teacher_layers} layers")
    if params.student_config is not None:
        for key, value in params.student_config.items():
            if key not in config and key not in CANONICAL_FIELDS:
                raise ValueError(f"student_config: {key!r} is not a field of the teacher's config")
            for group in SIZE_GROUPS:
                if key in group:
                    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                        raise ValueError(f"student_config: {key!r} must be a positive integer")
                    teacher = _config_int(config, group)
                    if teacher is not None and value > teacher:
                        raise ValueError(f"student_config: {key!r} = {value} is larger than the teacher's {teacher}")
    _check_hidden_alignment(params, config)


def _check_hidden_alignment(params: DistillParams, config: dict[str, Any]) -> None:
    """The hidden-state loss compares student layer j with the teacher layer it was copied from:
    that needs a student built from the teacher, at the teacher's width."""
    if params.hidden_loss is None:
        return
    if params.student_model_id is not None:
        raise Refusal(
            "hidden_loss needs a student built from the teacher ('layers' or 'student_config'): an uploaded "
            "student's layers were not initialised from the teacher's, so no layer alignment exists",
            constraint="hidden_alignment",
            param="hidden_loss",
        )
    teacher_width = _config_int(config, WIDTH_FIELDS)
    for key, value in (params.student_config or {}).items():
        if key in WIDTH_FIELDS and value != teacher_width:
            raise Refusal(
                f"hidden_loss compares hidden states of the teacher's width ({teacher_width}); student_config sets "
                f"{key!r} = {value}, and no projection between the two widths is learned here",
                constraint="hidden_alignment",
                param="hidden_loss",
                teacher_hidden_size=teacher_width,
            )


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer indices for student layers 0..k−1: first and last included, evenly spaced."""
    if n_student >= n_teacher:  # same depth (a narrower student): layer j from layer j
        return list(range(n_teacher))
    if n_student == 1:
        return [0]
    return [round(j * (n_teacher - 1) / (n_student - 1)) for j in range(n_student)]


CONSTRAINTS = [
    MethodConstraint(
        id="one_student",
        rule="Give exactly one of layers, student_config and student_model_id, and at most one of steps and epochs.",
        params=("layers", "student_config", "student_model_id", "steps", "epochs"),
    ),
    MethodConstraint(
        id="architectures",
        rule=(
            "The teacher is a causal LM (*ForCausalLM / *LMHeadModel) or a single-label sequence classifier "
            "(*ForSequenceClassification, >= 2 classes); encoders without a head, seq2seq and other heads are refused."
        ),
        values={"architecture_suffixes": ["ForCausalLM", "LMHeadModel", "ForSequenceClassification"]},
    ),
    NEEDS_TOKENIZER,
    MethodConstraint(
        id="student_smaller",
        rule=(
            "The student is smaller: layers below the teacher's layer count; student_config fields are the "
            "teacher's, size fields only shrink, and the fields that fix the logits cannot change."
        ),
        params=("layers", "student_config"),
        values={"frozen_fields": sorted(FROZEN_FIELDS)},
    ),
    MethodConstraint(
        id="same_tokenizer",
        rule="student_model_id is another uploaded model of the tenant with the teacher's tokenizer and vocabulary.",
        params=("student_model_id",),
    ),
    MethodConstraint(
        id="hidden_alignment",
        rule=(
            "hidden_loss needs a student built from the teacher (layers or student_config) at the teacher's hidden "
            "width: student layer j is compared with the teacher layer it was initialised from."
        ),
        params=("hidden_loss", "student_model_id", "student_config"),
    ),
    MethodConstraint(
        id="warmup_below_steps",
        rule="warmup_steps is below steps; hidden_weight is given only with hidden_loss.",
        params=("warmup_steps", "steps", "hidden_weight"),
    ),
]


register(
    "distill",
    params=DistillParams,
    summary="Knowledge distillation into a smaller student (fewer layers, a smaller config, or an uploaded model).",
    needs_data=True,
    formats=("hf",),
    check=check,
    constraints=CONSTRAINTS,
)
