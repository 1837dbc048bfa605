"""Safetensors shards read through memory maps and written in one sequential pass.

Reading: every input file's header is checked first with the upload validator
(core.models.validation.check_safetensors: offsets inside the data, no gaps or overlaps, shape and
dtype matching the byte range), so a truncated shard or a header whose offsets lie fails before a
single tensor is touched, with the file and tensor named. Tensors are then views of a private
(copy-on-write) memory map: the bytes stay in the page cache, which the kernel can drop, and never
become the worker's anonymous memory. Nothing here unpickles or executes a byte.

Writing: the engine knows every output tensor's name, dtype and shape before any data is computed
(``plan``), so a shard's header is written first and its tensors follow in order. The whole
output is therefore one sequential byte stream, which lets it go straight into a zip entry (the
artifact) or any non-seekable sink: nothing is written twice.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from core.models.validation import FileRejected, check_safetensors

# safetensors dtype names <-> torch dtypes (the subset the validator accepts and torch reads).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Headers of uploaded files were checked against the service's own limit at upload; this bound
# only stops a header from being read whole into memory if a stored file were replaced.
MAX_HEADER = 100 << 20


class ShardError(Exception):
    """An input file is not what its header says; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class _Entry:
    spec: TensorSpec
    file: Path
    start: int  # absolute byte offset of the tensor's data in the file
    end: int


class ShardReader:
    """The tensors of one or more safetensors files, by name, without loading them."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, _Entry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: list[BinaryIO] = []
        for path in sorted(files):
            try:
                info = check_safetensors(path, MAX_HEADER)
            except FileRejected as e:
                raise ShardError(f"{path.name}: {e.reason}") from None
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            base = 8 + n
            # Header order is not file order; keep the order a writer laid the tensors out in.
            for tname, t in sorted(info.tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if tname in self.entries:
                    raise ShardError(f"{path.name}: tensor {tname!r} is also in {self.entries[tname].file.name}")
                if t["dtype"] not in DTYPES:
                    raise ShardError(f"{path.name}: tensor {tname!r}: dtype {t['dtype']} is not supported")
                b, e = t["data_offsets"]
                self.entries[tname] = _Entry(
                    TensorSpec(tname, DTYPES[t["dtype"]], tuple(t["shape"])), path, base + b, base + e
                )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> TensorSpec:
        return self.entries[name].spec

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            f = path.open("rb")
            self._fds.append(f)
            # ACCESS_COPY: a writable (private) view torch.frombuffer accepts without copying;
            # nothing ever writes to it, so every page stays a file page.
            m = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            with contextlib.suppress(AttributeError, OSError):
                m.madvise(mmap.MADV_SEQUENTIAL)
        return m

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a view of the file's pages (no copy) where its offset is aligned, else a
        copy. Raises ShardError naming the file and tensor when the file is shorter than its
        header says (truncated after the upload check, e.g. on a full disk)."""
        e = self.entries[name]
        m = self._map(e.file)
        if e.end > len(m):
            raise ShardError(
                f"{e.file.name}: tensor {name!r} ends at byte {e.end} but the file has {len(m)} bytes (truncated)"
            )
        spec = e.spec
        if spec.numel == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        if e.start % spec.dtype.itemsize:
            t = torch.frombuffer(bytearray(m[e.start : e.end]), dtype=spec.dtype)
        else:
            t = torch.frombuffer(m, dtype=spec.dtype, count=spec.numel, offset=e.start)
        return t.view(spec.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading the tensor's pages now (asynchronous readahead), so the
        disk works on the next tensor while the CPU works on this one."""
        self._advise(self._map(self.entries[name].file), name, mmap.MADV_WILLNEED)

    def done_with(self, name: str) -> None:
        """Tell the kernel the tensor's pages will not be read again (they leave this process's
        resident set; the page cache may keep them)."""
        m = self._maps.get(self.entries[name].file)
        if m is not None:
            self._advise(m, name, mmap.MADV_DONTNEED)

    def _advise(self, m: mmap.mmap, name: str, advice: int) -> None:
        """``madvise`` over the tensor's bytes, from the page its data starts in (advice is a hint:
        a kernel or platform without it changes nothing)."""
        e = self.entries[name]
        start = e.start - e.start % mmap.PAGESIZE
        with contextlib.suppress(AttributeError, OSError, ValueError):
            m.madvise(advice, start, max(0, min(e.end, len(m)) - start))

    def close(self) -> None:
        for m in self._maps.values():
            # A view still alive somewhere keeps it open (BufferError); the GC closes it.
            with contextlib.suppress(BufferError):
                m.close()
        for f in self._fds:
            f.close()
        self._maps.clear()
        self._fds.clear()


@dataclass
class Shard:
    filename: str
    specs: list[TensorSpec]
    metadata: dict[str, str]

    def header(self) -> bytes:
        entries: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        pos = 0
        for s in self.specs:
            entries[s.name] = {"dtype": NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
            pos += s.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        return struct.pack("<Q", len(raw)) + raw

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def layout(
    specs: list[TensorSpec],
    max_bytes: int,
    single_name: str = "model.safetensors",
    metadata: dict[str, str] | None = None,
) -> list[Shard]:
    """Split output tensors, in order, into shards of at most ``max_bytes`` of data each (a tensor
    larger than that gets a shard of its own), named as save_pretrained names them."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        return [Shard(single_name, groups[0], meta)]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, meta) for i, g in enumerate(groups)]


def index_json(shards: list[Shard]) -> bytes:
    """model.safetensors.index.json for a sharded output (HF's layout: total_size + weight_map)."""
    weight_map = {s.name: sh.filename for sh in shards for s in sh.specs}
    total = sum(sh.data_bytes for sh in shards)
    return (
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    ).encode()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy (bfloat16 and friends included)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
