"""A runtime's model (ONNX Runtime, llama.cpp) behind the call a transformers model answers, so
the evaluator (worker/evaluate.py) measures an export in the runtime a user will run it in with
the same budget, samples, intervals and fidelity math as any other job.

The evaluator calls ``module(input_ids=..., attention_mask=...)`` and reads ``.logits`` (causal
LMs) or ``.last_hidden_state`` (encoders); it names the run's kind after the class
(``...ForCausalLM``), takes the device from the first parameter and the positions limit from
``.config``. The runners take token ids as lists and give numpy arrays; this adapter converts.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


class _RuntimeModule(torch.nn.Module):
    def __init__(self, runner: Any, config: Any) -> None:
        super().__init__()
        self.runner = runner
        self.config = config
        # The evaluator reads the device from the first parameter; a runtime holds its own weights,
        # so this one is a placeholder (the same in both models: it never sets their shapes apart).
        self._device_anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    @staticmethod
    def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
        """Rows of ids without their padding (the evaluator sends unpadded rows; a padded one is
        cut where its mask ends, which a runtime with no mask input needs)."""
        rows = input_ids.tolist()
        if attention_mask is None:
            return rows
        lengths = attention_mask.sum(dim=1).tolist()
        return [r[: int(n)] for r, n in zip(rows, lengths, strict=True)]


class RuntimeModelForCausalLM(_RuntimeModule):
    """A causal LM in a runtime: logits for every position (the name ends as the evaluator expects
    of a causal LM, evaluate.model_kind)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        rows = self._rows(input_ids, attention_mask)
        if len({len(r) for r in rows}) > 1:
            return SimpleNamespace(logits=_stack([self.runner.logits([r])[0] for r in rows]))
        return SimpleNamespace(logits=torch.from_numpy(self.runner.logits(rows)))


class RuntimeEncoderModel(_RuntimeModule):
    """An encoder in a runtime: its last hidden state."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        hidden = torch.from_numpy(self.runner.hidden(self._rows(input_ids, attention_mask)))
        return SimpleNamespace(last_hidden_state=hidden, hidden_states=None)


def _stack(arrays: list[Any]) -> torch.Tensor:
    longest = max(a.shape[0] for a in arrays)
    out = torch.zeros(len(arrays), longest, arrays[0].shape[-1])
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(a)
    return out


def wrap(runner: Any, config: Any, causal: bool) -> torch.nn.Module:
    return (RuntimeModelForCausalLM if causal else RuntimeEncoderModel)(runner, config)
