"""A GGUF file run by llama.cpp (through llama-cpp-python): logits for quality and fidelity
figures, and generation speed.

``logits`` evaluates each sequence from an empty KV cache with every position's logits kept
(``logits_all``), so perplexity, KL and top-1 agreement come from the runtime the user deploys.
``tokens_per_second`` times greedy decoding after a prompt, one token per step (what a chat
user waits on); the prompt's own evaluation is not counted.

Importing this module imports llama_cpp; callers check ``available()`` first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppRunner:
    """One model loaded in llama.cpp (CPU). ``n_ctx`` bounds prompt + generated tokens."""

    def __init__(self, path: Path | str, n_threads: int | None = None, n_ctx: int = 512) -> None:
        from llama_cpp import Llama

        self.path = Path(path)
        self.n_ctx = n_ctx
        threads = n_threads or os.cpu_count() or 1
        self.llm = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def logits(self, ids: list[list[int]]) -> Any:
        """float32 numpy (batch, tokens, vocab); sequences of unequal length are padded with 0s
        after their end (the padded positions are not computed)."""
        import numpy as np

        width = max((len(seq) for seq in ids), default=0)
        out = np.zeros((len(ids), width, self.n_vocab), dtype=np.float32)
        for b, seq in enumerate(ids):
            self._check(len(seq))
            self.llm.reset()
            self.llm.eval(seq)
            out[b, : len(seq)] = self.llm.scores[: len(seq)]
        return out

    def tokens_per_second(self, prompt_ids: list[int], n_new: int) -> float:
        """Greedy decoding speed after ``prompt_ids`` (end-of-sequence ignored: speed only)."""
        import numpy as np

        if n_new < 1:
            raise ValueError("n_new must be at least 1")
        self._check(len(prompt_ids) + n_new)
        self.llm.reset()
        self.llm.eval(prompt_ids)
        t0 = time.perf_counter()
        for _ in range(n_new):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([nxt])
        return n_new / (time.perf_counter() - t0)

    def _check(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens exceed n_ctx {self.n_ctx}")
        if n < 1:
            raise ValueError("empty sequence")

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
