"""Checks on uploaded files. Nothing here executes or unpickles a byte: safetensors headers are
parsed as JSON by hand before any tensor library sees the file, JSON files are parsed as JSON, and
text files must be UTF-8 without NUL bytes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# dtype -> bytes per element (safetensors names). Sub-byte and exotic types are refused.
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz"}
ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}
TEXT_SUFFIXES = {".txt", ".jinja", ".md"}
FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
# Leading bytes of formats that must never be accepted whatever the file is called.
MAGIC = {
    b"PK\x03\x04": "zip archive",
    b"PK\x05\x06": "zip archive",
    b"7z\xbc\xaf\x27\x1c": "7z archive",
    b"\x1f\x8b": "gzip archive",
    b"BZh": "bzip2 archive",
    b"\xfd7zXZ\x00": "xz archive",
    b"(\xb5/\xfd": "zstd archive",
    b"Rar!": "rar archive",
    b"\x80\x02": "pickle",
    b"\x80\x03": "pickle",
    b"\x80\x04": "pickle",
    b"\x80\x05": "pickle",
}
MAX_DIMS = 8
MAX_TENSORS = 1_000_000


class FileRejected(Exception):
    """An uploaded file is refused. ``code`` is machine-readable, the message says why."""

    def __init__(self, filename: str, code: str, reason: str, status: int = 422) -> None:
        super().__init__(f"{filename}: {reason}")
        self.filename = filename
        self.code = code
        self.reason = reason
        self.status = status


@dataclass
class SafetensorsInfo:
    parameters: int
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_filename(name: str) -> str:
    """Return the suffix class of an acceptable file name, or raise."""
    if not FILENAME_RE.match(name) or ".." in name:
        raise FileRejected(name, "bad_filename", "file names must be plain names of letters, digits, '.', '_' and '-' (no folders)")
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise FileRejected(name, "pickle_refused", f"'{suffix}' files may contain pickled code and are never accepted; convert the weights to safetensors")
    if suffix in ARCHIVE_SUFFIXES or name.lower().endswith(".tar.gz"):
        raise FileRejected(name, "archive_refused", "archives are not accepted; upload the files of the model directory as separate parts")
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".json":
        return "json"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise FileRejected(name, "unsupported_file_type", "only *.safetensors, *.json and text files (*.txt, *.jinja, *.md) are accepted")


def sniff_magic(name: str, head: bytes) -> None:
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            code = "pickle_refused" if what == "pickle" else "archive_refused"
            raise FileRejected(name, code, f"the file's bytes are a {what}, not what its name claims")
    if head[257:262] == b"ustar":  # POSIX and GNU tar put their magic in the first header block
        raise FileRejected(name, "archive_refused", "the file's bytes are a tar archive, not what its name claims")


def check_safetensors(path: Path, max_header: int) -> SafetensorsInfo:
    name = path.name
    size = path.stat().st_size
    if size < 8:
        raise FileRejected(name, "invalid_safetensors", "file is too short to be safetensors")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > max_header:
            raise FileRejected(name, "invalid_safetensors", f"declared header size {n} bytes is outside 1..{max_header}")
        if 8 + n > size:
            raise FileRejected(name, "invalid_safetensors", "declared header runs past the end of the file")
        raw = f.read(n)
    if not raw.lstrip().startswith(b"{"):
        raise FileRejected(name, "invalid_safetensors", "header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileRejected(name, "invalid_safetensors", f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise FileRejected(name, "invalid_safetensors", "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise FileRejected(name, "invalid_safetensors", "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise FileRejected(name, "invalid_safetensors", "too many tensors")
    data_len = size - 8 - n
    ranges: list[tuple[int, int, str]] = []
    params = 0
    for tname, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FileRejected(name, "invalid_safetensors", f"tensor {tname!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise FileRejected(name, "invalid_safetensors", f"tensor {tname!r}: unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
        ):
            raise FileRejected(name, "invalid_safetensors", f"tensor {tname!r}: shape must be at most {MAX_DIMS} non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise FileRejected(name, "invalid_safetensors", f"tensor {tname!r}: data offsets {offsets!r} are outside the file's data")
        numel = 1
        for d in shape:
            numel *= d
        if numel * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise FileRejected(name, "invalid_safetensors", f"tensor {tname!r}: shape {shape} and dtype {dtype} do not match its byte range")
        params += numel
        ranges.append((offsets[0], offsets[1], tname))
    ranges.sort()
    pos = 0
    for begin, end, tname in ranges:
        if begin != pos:
            what = "overlaps another tensor" if begin < pos else "leaves a gap before it"
            raise FileRejected(name, "invalid_safetensors", f"tensor {tname!r} {what}")
        pos = end
    if pos != data_len:
        raise FileRejected(name, "invalid_safetensors", "tensor data does not cover the file exactly (trailing bytes)")
    return SafetensorsInfo(parameters=params, tensors=header)


def load_json_file(path: Path, max_bytes: int) -> Any:
    if path.stat().st_size > max_bytes:
        raise FileRejected(path.name, "file_too_large", f"JSON files are limited to {max_bytes} bytes", status=413)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FileRejected(path.name, "invalid_json", "the file is not valid UTF-8 JSON") from None


def check_text_file(path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if b"\x00" in chunk:
                raise FileRejected(path.name, "invalid_text", "text files must not contain NUL bytes")
    try:
        with path.open("r", encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError:
        raise FileRejected(path.name, "invalid_text", "text files must be UTF-8") from None


def find_remote_code(name: str, obj: Any) -> None:
    """``auto_map`` points transformers at Python files in the repo: refuse it anywhere."""
    if isinstance(obj, dict):
        if "auto_map" in obj:
            raise FileRejected(name, "remote_code_refused", "'auto_map' asks to run custom model code; modelpress never runs uploaded code")
        for v in obj.values():
            find_remote_code(name, v)
    elif isinstance(obj, list):
        for v in obj:
            find_remote_code(name, v)
