"""``prune.wanda``: Wanda, pruning by weights and activations (Sun et al., 2023,
"A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695).

Each weight's score is ``|W_ij| · ‖X_j‖₂``: its magnitude times the norm of the input feature it
multiplies, measured on calibration data; in every output row the lowest-scoring weights are
zeroed. No weight update, no second-order information: one forward pass of calibration data per
layer. On Llama-2-7B at 50% it keeps WikiText-2 perplexity at 6.42 where magnitude pruning gives
14.89 (dense 5.12).

Runs through llm-compressor's ``WandaPruningModifier`` with its sequential pipeline (one decoder
layer at a time). Parameters: ``sparsity`` in (0, 1) **or** ``mask`` ``"2:4"`` / ``"4:8"``;
``num_samples`` and ``max_length`` of the calibration texts (the job's ``dataset_id``, tokenized
with the model's tokenizer). Prunes the Linear layers of the model's blocks (never embeddings or
the LM head); the weights stay dense and ``config.json`` gets ``sparsity_config``
(``sparsity_structure`` "2:4", "4:8" or "unstructured"). Refused at submit: bare state dicts,
models without tokenizer files, GPT-2-style Conv1D models (llm-compressor prunes nn.Linear only).

Example: ``{"method": "prune.wanda", "params": {"mask": "2:4", "num_samples": 64}}`` with a ``dataset_id``.
"""

from __future__ import annotations

from core.methods import ModelInfo, register
from core.methods._llmc import PRUNE_CONSTRAINTS, PruneParams, check_model


class PruneWandaParams(PruneParams):
    pass


def _check(params: PruneWandaParams, info: ModelInfo) -> None:
    check_model("prune.wanda", info, quantizes=False)


register(
    "prune.wanda",
    params=PruneWandaParams,
    summary="Wanda: prune by |weight| x input-activation norm on calibration data (llm-compressor).",
    needs_data=True,
    formats=("hf",),
    check=_check,
    blocks=True,
    constraints=PRUNE_CONSTRAINTS,
)
