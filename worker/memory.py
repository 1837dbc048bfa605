"""How much memory a job takes, as the operating system counts it.

``peak_rss_bytes`` is the process's resident high-water mark (VmHWM), which includes file pages
mapped into it: the streaming engine reads shards through memory maps, so VmHWM grows with what
it has read even though the kernel can drop those pages at any time. ``peak_anon_bytes`` is
anonymous memory alone (RssAnon: what the job allocated, what an OOM kill is about), sampled by a
thread every 20 ms, since Linux keeps no high-water mark for it.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any

import torch

SAMPLE_S = 0.02

# Allocations of at least this many bytes are their own memory maps, returned to the system when
# freed. glibc's default raises that threshold to the largest block freed (up to 32 MiB), after
# which every chunk-sized temporary comes from a heap that keeps what was freed: the streaming
# engine's pruning peaked at 121 MiB above its baseline where its live tensors are ~50 MiB (a
# 0.6 GiB float32 Llama, measured in-process); with a fixed threshold, 50 MiB. Setting it also
# turns glibc's adjustment off. A page fault per 4 KiB of a fresh block is the price: far below
# the arithmetic done on a multi-MB block.
MMAP_THRESHOLD = 1 << 20


def return_freed_memory() -> None:
    """Fix glibc's mmap threshold for this process (see ``MMAP_THRESHOLD``); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _sample(ref: weakref.ref[PeakMemory], stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_S):
        obj = ref()
        v = _status_kb("RssAnon:")
        if obj is None or v is None:
            return
        obj._anon = max(obj._anon, v)
        del obj


def available_bytes() -> int:
    """MemAvailable of the machine (what can be allocated without swapping or OOM)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class PeakMemory:
    """Peak memory of this process during the job. Linux lets a process reset its RSS
    high-water mark (``echo 5 > /proc/self/clear_refs``), so a worker child that ran earlier jobs
    reports this job's peak, not its lifetime's."""

    def __init__(self) -> None:
        self.how = "VmHWM of the worker process since the job started (reset through /proc/self/clear_refs)"
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.how = "peak RSS of the worker process over its lifetime (this system cannot reset it per job)"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._anon = _status_kb("RssAnon:") or 0
        self._stop = threading.Event()
        # The thread holds the object weakly: a job that fails before result() still ends it.
        threading.Thread(target=_sample, args=(weakref.ref(self), self._stop), name="peak-anon", daemon=True).start()

    def result(self) -> dict[str, Any]:
        self._stop.set()
        v = _status_kb("RssAnon:")
        if v is not None:
            self._anon = max(self._anon, v)
        peak = None
        hwm = _status_kb("VmHWM:")
        if hwm is not None:
            peak = hwm * 1024
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {
            "peak_rss_bytes": peak,
            "peak_anon_bytes": self._anon * 1024 or None,
            "how": self.how,
            "how_anon": f"RssAnon of the worker process, sampled every {int(SAMPLE_S * 1000)} ms during the job",
            "peak_cuda_bytes": cuda,
        }
