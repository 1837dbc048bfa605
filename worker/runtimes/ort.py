"""Run an exported ``model.onnx`` (worker/export/onnx.py) in ONNX Runtime on the CPU.

:class:`OrtRunner` feeds the inputs the exporter names: a decoder takes ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value`` (empty, length 0, for a
full forward) and returns ``logits`` and ``present.*``; an encoder takes ``input_ids``,
``attention_mask`` (``token_type_ids``) and returns ``last_hidden_state`` (``logits`` with a
classification head). Sequences of unequal length are right-padded (mask 0; positions count the
real tokens only, as transformers' ``generate`` does).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

MODEL_FILE = "model.onnx"


class OrtRunner:
    """An ONNX Runtime session over ``model_dir/model.onnx`` (``threads``: intra-op threads;
    None lets ONNX Runtime use every core)."""

    def __init__(self, model_dir: Path | str, threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.is_decoder = "past_key_values.0.key" in self.inputs
        self._past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        config_path = self.model_dir / "config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}

    # --- feeds ---------------------------------------------------------------------------------

    def _batch(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids (pad 0) and their attention mask."""
        if not ids or not all(ids):
            raise ValueError("OrtRunner needs at least one non-empty sequence")
        width = max(len(s) for s in ids)
        arr = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            arr[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return arr, mask

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past key/values of length 0: a forward without a cache."""
        return {
            p.name: np.zeros((batch, p.shape[1], 0, p.shape[3]), dtype=np.float32)  # (batch, heads, 0, head_dim)
            for p in self._past
        }

    def step(
        self, ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder pass: ``ids`` (batch, new), ``attention_mask`` (batch, past + new), ``past``
        from the previous step's result (None: empty). Returns (logits, the next step's past)."""
        past = self.empty_past(ids.shape[0]) if past is None else past
        positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -ids.shape[1] :]
        feed = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": positions, **past}
        outs = self.session.run(None, feed)
        named = dict(zip(self.outputs, outs, strict=True))
        present = {
            n.replace("present.", "past_key_values.", 1): v for n, v in named.items() if n.startswith("present.")
        }
        return named["logits"], present

    def _encode(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        arr, mask = self._batch(ids)
        feed = {"input_ids": arr, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(arr)
        return dict(zip(self.outputs, self.session.run(None, feed), strict=True))

    # --- what the evaluator calls ----------------------------------------------------------------

    def logits(self, ids: list[list[int]]) -> np.ndarray:
        """Decoder: float32 (batch, seq, vocab), a full forward with an empty past. Encoder with a
        classification head: (batch, labels)."""
        if not self.is_decoder:
            if "logits" not in self.outputs:
                raise ValueError("this ONNX encoder has no classification head (no logits output)")
            return np.asarray(self._encode(ids)["logits"], dtype=np.float32)
        arr, mask = self._batch(ids)
        return np.asarray(self.step(arr, mask)[0], dtype=np.float32)

    def hidden(self, ids: list[list[int]]) -> np.ndarray:
        """Encoder: last_hidden_state, float32 (batch, seq, hidden)."""
        if self.is_decoder:
            raise ValueError("hidden() is for encoders; this ONNX model is a decoder (use logits())")
        return np.asarray(self._encode(ids)["last_hidden_state"], dtype=np.float32)

    def greedy(self, ids: list[list[int]], new_tokens: int, cache: bool = True) -> list[list[int]]:
        """Greedy continuation of equal-length prompts: with the KV cache (one token a step), or
        without it (the whole sequence every step)."""
        arr, mask = self._batch(ids)
        if not mask.all():
            raise ValueError("greedy() takes prompts of equal length")
        out = arr
        logits, past = self.step(arr, mask)
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            out = np.concatenate([out, nxt], axis=1)
            full_mask = np.ones_like(out)
            if cache:
                logits, past = self.step(nxt, full_mask, past)
            else:
                logits, _ = self.step(out, full_mask)
        return out[:, arr.shape[1] :].tolist()

    def latency_s(self, batch: int, seq_len: int, runs: int, warmup: int) -> list[float]:
        """Seconds of each of ``runs`` full forward passes over (batch, seq_len) random token ids,
        after ``warmup`` untimed ones."""
        vocab = int(self.config.get("vocab_size") or 2)
        ids = np.random.default_rng(0).integers(0, vocab, size=(batch, seq_len)).tolist()
        arr, mask = self._batch(ids)
        timings = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            if self.is_decoder:
                self.step(arr, mask)
            else:
                self._encode(ids)
            if i >= warmup:
                timings.append(time.perf_counter() - t0)
        return timings
