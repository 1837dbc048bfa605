"""One block of work per core, on threads of one torch thread each.

Why not torch's own intra-op threads: the streaming kernels are a dozen small element-wise ops on
a cache-sized block; with intra-op threads each op is split across the cores and synchronised (and
its data leaves the cache), which measured ~2x slower than one block per core. torch releases the
GIL inside its kernels, so these threads run in parallel.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_pool: tuple[int, ThreadPoolExecutor] | None = None
_lock = threading.Lock()
_local = threading.local()


def state() -> threading.local:
    """This thread's own namespace (per-thread scratch buffers)."""
    return _local


def map_ordered(fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``fn`` over ``items``, one per core at a time; the results in ``items``' order, so that
    sums over them are the same whichever thread finished first. The pool is made per process (a
    Celery pool child is forked after import) and its threads keep torch at one thread each (a
    per-thread setting: the caller's own threads are not changed)."""
    global _pool
    items = list(items)
    workers = torch.get_num_threads()
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (
                os.getpid(),
                ThreadPoolExecutor(
                    workers, thread_name_prefix="modelpress-block", initializer=torch.set_num_threads, initargs=(1,)
                ),
            )
        pool = _pool[1]
    return list(pool.map(fn, items))
