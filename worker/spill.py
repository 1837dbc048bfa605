"""Calibration activations spilled to scratch disk past a memory budget (the block path).

llm-compressor's sequential pipeline carries every calibration sample's hidden states from one
decoder block to the next in an ``IntermediatesCache``, offloaded to a *device* (``cpu`` by
default): with many samples, long sequences or a wide model that is gigabytes of anonymous
memory (128 x 2048 tokens x 8192 wide in bf16 is 4 GiB), which it has no way to put on disk.

``spill_activations`` keeps the first ``budget_bytes`` of them in memory as the library does and
puts each further tensor in a file under ``scratch``: the tensor is a shared mapping of that file
(``torch.from_file``), so its pages are file pages the kernel writes back and drops under memory
pressure, not anonymous memory an OOM kill counts. The file is unlinked as soon as it is mapped,
so its disk space goes back when the cache drops the tensor, and nothing is left behind if the
job dies. Space is reserved up front (``posix_fallocate``): a full disk is an ``OSError`` here,
not a SIGBUS on a later page write. The values are the same bytes either way, so the method's
result does not change (tests/test_blocks.py).

It wraps one private classmethod of llm-compressor (``IntermediatesCache._offload_value``, 0.14);
the pinned version is what CI tests.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MIN_SPILL_BYTES = 1 << 20  # smaller tensors (masks, position ids) stay in memory


class ActivationSpill:
    def __init__(self, scratch: Path, budget_bytes: int) -> None:
        self.scratch = scratch
        self.budget = budget_bytes
        self.in_memory = 0  # bytes of carried activations in memory now
        self.peak_in_memory = 0
        self.spilled = 0  # bytes written to scratch files
        self.files = 0
        self._lock = threading.Lock()

    def wants(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.nbytes < MIN_SPILL_BYTES:
            return False
        with self._lock:
            if self.in_memory + t.nbytes <= self.budget:
                self.in_memory += t.nbytes
                self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
                # Given back when the cache drops it (the next block's outputs replace it).
                weakref.finalize(t, self._release, t.nbytes)
                return False
        return True

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.in_memory -= nbytes

    def store(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s values in a tensor backed by a new (unlinked) scratch file."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        path = self.scratch / f"act-{uuid.uuid4().hex}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(1, t.nbytes))
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            out = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        finally:
            path.unlink(missing_ok=True)  # the mapping keeps the inode; the space is freed with it
        out.copy_(t)
        with self._lock:
            self.spilled += t.nbytes
            self.files += 1
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "activation_budget_bytes": self.budget,
            "activation_peak_bytes_in_memory": self.peak_in_memory,
            "activation_bytes_spilled": self.spilled,
            "activation_files": self.files,
        }


@contextlib.contextmanager
def spill_activations(scratch: Path, budget_bytes: int) -> Iterator[ActivationSpill]:
    """While active, llm-compressor's sequential pipeline keeps at most ``budget_bytes`` of
    carried activations in memory and spills the rest to ``scratch``."""
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    spill = ActivationSpill(scratch, budget_bytes)
    original = IntermediatesCache.__dict__["_offload_value"]
    inner = original.__func__

    def offload(cls: Any, value: Any, offload_device: Any, onload_device: Any = None) -> Any:
        if (
            isinstance(value, torch.Tensor)
            and (offload_device is None or torch.device(offload_device).type == "cpu")
            and spill.wants(value)
        ):
            return IntermediateValue(value=spill.store(value.detach()), device=onload_device or value.device)
        return inner(cls, value, offload_device, onload_device)

    IntermediatesCache._offload_value = classmethod(offload)  # type: ignore[method-assign]
    try:
        yield spill
    finally:
        IntermediatesCache._offload_value = original  # type: ignore[method-assign]
