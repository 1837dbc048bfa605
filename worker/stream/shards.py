"""The streaming engine's shard reader and writer live in worker/shards.py: the block path's save
(worker/ct_offload.py, run by model_io.save) writes with them too, and worker.stream imports
worker.model_io, so they sit outside this package. Their old names stay importable here."""

from worker.model_io import DEFAULT_SHARD_BYTES
from worker.shards import (
    DTYPES,
    MAX_HEADER,
    Shard,
    ShardError,
    ShardReader,
    TensorSpec,
    index_json,
    layout,
    tensor_bytes,
)

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DTYPES",
    "MAX_HEADER",
    "Shard",
    "ShardError",
    "ShardReader",
    "TensorSpec",
    "index_json",
    "layout",
    "tensor_bytes",
]
