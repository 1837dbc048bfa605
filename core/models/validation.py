"""Checks on uploaded files. Nothing here executes or unpickles a byte: safetensors headers are
parsed as JSON by hand before any tensor library sees the file, JSON files are parsed as JSON (both
by the strict loader, core/jsonsafe.py: depth, number length, lone surrogates), and text files must
be UTF-8 without NUL bytes.

Uploaded files sit in the staging folder under names of the service's own (``part-0001``): every
check takes the name the client gave (``name=``) for its messages, so a refusal never names a
staging file.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import jsonsafe

# dtype -> bytes per element (safetensors names). Sub-byte and exotic types are refused.
SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz"}
ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}
TEXT_SUFFIXES = {".txt", ".jinja", ".md"}
# Used with fullmatch only: "$" would also match before a trailing newline.
FILENAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
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
    """An uploaded file is refused. ``code`` is machine-readable, the message says why; ``field``
    names the place inside the file (``__metadata__.a``, ``architectures[0]``) where there is
    one, and ``kind`` the precise rule (e.g. ``json_too_deep``; defaults to ``code``)."""

    def __init__(
        self,
        filename: str,
        code: str,
        reason: str,
        status: int = 422,
        *,
        field: str | None = None,
        kind: str | None = None,
    ) -> None:
        shown = jsonsafe.safe_text(filename, 200)
        super().__init__(f"{shown}: {reason}")
        self.filename = shown
        self.code = code
        self.reason = reason
        self.status = status
        self.field = field
        self.kind = kind or code


def load_json_bytes(raw: bytes, name: str, code: str, what: str = "") -> Any:
    """``raw`` parsed by the strict loader, or FileRejected(``code``) naming the file and the
    place inside it (``what`` prefixes the place: "header")."""
    try:
        return jsonsafe.loads(raw)
    except jsonsafe.JSONRejected as e:
        where = jsonsafe.format_path(e.path) if e.path else None
        at = f" at {where}" if where else ""
        raise FileRejected(
            name, code, f"{what}{' ' if what else ''}{e.reason}{at}".strip(), field=where, kind=e.code
        ) from None


@dataclass
class SafetensorsInfo:
    parameters: int
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_filename(name: str) -> str:
    """Return the suffix class of an acceptable file name, or raise."""
    if not FILENAME_RE.fullmatch(name) or ".." in name:
        raise FileRejected(
            name, "bad_filename", "file names must be plain names of letters, digits, '.', '_' and '-' (no folders)"
        )
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise FileRejected(
            name,
            "pickle_refused",
            f"'{suffix}' files may contain pickled code and are never accepted; convert the weights to safetensors",
        )
    if suffix in ARCHIVE_SUFFIXES or name.lower().endswith(".tar.gz"):
        raise FileRejected(
            name,
            "archive_refused",
            "archives are not accepted; upload the files of the model directory as separate parts",
        )
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".json":
        return "json"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise FileRejected(
        name, "unsupported_file_type", "only *.safetensors, *.json and text files (*.txt, *.jinja, *.md) are accepted"
    )


def sniff_magic(name: str, head: bytes) -> None:
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            code = "pickle_refused" if what == "pickle" else "archive_refused"
            raise FileRejected(name, code, f"the file's bytes are a {what}, not what its name claims")
    if head[257:262] == b"ustar":  # POSIX and GNU tar put their magic in the first header block
        raise FileRejected(name, "archive_refused", "the file's bytes are a tar archive, not what its name claims")


def check_safetensors(path: Path, max_header: int, name: str | None = None) -> SafetensorsInfo:
    """The header of a safetensors file checked against its data; ``name``: the file's name for
    messages (the client's, not the staging file's)."""
    name = name or path.name
    size = path.stat().st_size
    header_len, header = _safetensors_header(path, size, max_header, name)
    data_len = size - 8 - header_len
    ranges: list[tuple[int, int, str]] = []
    params = 0
    for tname, info in header.items():
        numel, begin, end = _check_tensor_entry(name, tname, info, data_len)
        params += numel
        ranges.append((begin, end, tname))
    _check_coverage(name, ranges, data_len)
    return SafetensorsInfo(parameters=params, tensors=header)


def _safetensors_header(path: Path, size: int, max_header: int, name: str) -> tuple[int, dict[str, Any]]:
    """The declared header length and the header's tensor entries (``__metadata__`` checked and removed)."""
    if size < 8:
        raise FileRejected(name, "invalid_safetensors", "file is too short to be safetensors")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > max_header:
            raise FileRejected(
                name, "invalid_safetensors", f"declared header size {n} bytes is outside 1..{max_header}"
            )
        if 8 + n > size:
            raise FileRejected(name, "invalid_safetensors", "declared header runs past the end of the file")
        raw = f.read(n)
    if not raw.lstrip().startswith(b"{"):
        raise FileRejected(name, "invalid_safetensors", "header is not a JSON object")
    header = load_json_bytes(raw, name, "invalid_safetensors", "header:")
    if not isinstance(header, dict):
        raise FileRejected(name, "invalid_safetensors", "header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise FileRejected(
            name, "invalid_safetensors", "__metadata__ must map strings to strings", field="__metadata__"
        )
    if len(header) > MAX_TENSORS:
        raise FileRejected(name, "invalid_safetensors", "too many tensors")
    return n, header


def _check_tensor_entry(name: str, tname: str, info: Any, data_len: int) -> tuple[int, int, int]:
    """One tensor's entry checked (its fields, dtype, shape, and byte range within the data):
    its element count and byte range."""
    # A tensor name is the client's: quoted short and printable in messages.
    tfield = jsonsafe.safe_text(tname, 100)
    t = repr(tfield)

    def refuse(message: str) -> FileRejected:
        return FileRejected(name, "invalid_safetensors", f"tensor {t}: {message}", field=tfield)

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise refuse("entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise refuse(f"unknown dtype {jsonsafe.safe_text(repr(dtype), 40)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
    ):
        raise refuse(f"shape must be at most {MAX_DIMS} non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise refuse(f"data offsets {jsonsafe.safe_text(repr(offsets), 60)} are outside the file's data")
    numel = 1
    for d in shape:
        numel *= d
    if numel * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
        raise refuse(f"shape {shape} and dtype {dtype} do not match its byte range")
    return numel, offsets[0], offsets[1]


def _check_coverage(name: str, ranges: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors' byte ranges tile the data exactly: no overlap, no gap, no trailing bytes."""
    pos = 0
    for begin, end, tname in sorted(ranges):
        if begin != pos:
            what = "overlaps another tensor" if begin < pos else "leaves a gap before it"
            raise FileRejected(
                name,
                "invalid_safetensors",
                f"tensor {jsonsafe.safe_text(tname, 100)!r} {what}",
                field=jsonsafe.safe_text(tname, 100),
            )
        pos = end
    if pos != data_len:
        raise FileRejected(name, "invalid_safetensors", "tensor data does not cover the file exactly (trailing bytes)")


def load_json_file(path: Path, max_bytes: int, name: str | None = None) -> Any:
    name = name or path.name
    if path.stat().st_size > max_bytes:
        raise FileRejected(name, "file_too_large", f"JSON files are limited to {max_bytes} bytes", status=413)
    return load_json_bytes(path.read_bytes(), name, "invalid_json")


def check_text_file(path: Path, name: str | None = None) -> None:
    name = name or path.name
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if b"\x00" in chunk:
                raise FileRejected(name, "invalid_text", "text files must not contain NUL bytes")
    try:
        with path.open("r", encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError:
        raise FileRejected(name, "invalid_text", "text files must be UTF-8") from None


def find_remote_code(name: str, obj: Any) -> None:
    """``auto_map`` points transformers at Python files in the repo: refuse it anywhere."""
    if isinstance(obj, dict):
        if "auto_map" in obj:
            raise FileRejected(
                name,
                "remote_code_refused",
                "'auto_map' asks to run custom model code; modelpress never runs uploaded code",
            )
        for v in obj.values():
            find_remote_code(name, v)
    elif isinstance(obj, list):
        for v in obj:
            find_remote_code(name, v)
