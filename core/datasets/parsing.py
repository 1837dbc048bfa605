"""Dataset files: ``.txt`` (one sample a line, blank lines skipped) or ``.jsonl`` (one object a
line with a string ``text`` and an optional ``label``, an int or a string). Used by the API to
validate uploads and by workers to read them; pure Python, no torch. JSON lines go through the
strict loader (core/jsonsafe.py): a line nested too deep, with a number too long to parse or a
string that is not storable text is refused, naming the line and the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core import jsonsafe

MAX_LINE_BYTES = 1 << 20


class DatasetInvalid(ValueError):
    """``line`` (1-based, None for the file as a whole), ``reason``; ``field``: the place inside
    the line's object where there is one; ``kind``: the precise rule (e.g. ``json_too_deep``)."""

    def __init__(self, line: int | None, reason: str, field: str | None = None, kind: str | None = None) -> None:
        super().__init__(f"line {line}: {reason}" if line else reason)
        self.line = line
        self.reason = reason
        self.field = field
        self.kind = kind


def dataset_format(filename: str) -> str:
    lower = filename.lower()
    if lower.endswith(".txt"):
        return "txt"
    if lower.endswith(".jsonl"):
        return "jsonl"
    raise DatasetInvalid(
        None, "dataset files are .txt (one sample a line) or .jsonl (objects with 'text' and optional 'label')"
    )


def iter_samples(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    for _, sample in iter_numbered(path, fmt):
        yield sample


def iter_numbered(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, sample)``: the API's checks across samples (label types) name the line."""
    with path.open("rb") as f:
        n = 0
        # readline with a cap: iterating the file would read a newline-free 20 GB upload whole.
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                # Editors on Windows write a UTF-8 BOM; json.loads would refuse line 1 for it.
                raw = raw[3:]
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetInvalid(n, f"line longer than {MAX_LINE_BYTES} bytes")
            if b"\x00" in raw:
                raise DatasetInvalid(n, "NUL byte")
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DatasetInvalid(n, "not UTF-8") from None
            if not line.strip():
                continue
            if fmt == "txt":
                yield n, {"text": line}
                continue
            try:
                obj = jsonsafe.loads(line)
            except jsonsafe.JSONRejected as e:
                if e.code == "invalid_json":
                    raise DatasetInvalid(n, "not a JSON object", kind=e.code) from None
                where = jsonsafe.format_path(e.path) if e.path else None
                raise DatasetInvalid(n, f"{e.reason}{f' at {where}' if where else ''}", where, e.code) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise DatasetInvalid(n, "each line needs a non-empty string 'text'")
            sample: dict[str, Any] = {"text": obj["text"]}
            if "label" in obj:
                label = obj["label"]
                if isinstance(label, bool) or not isinstance(label, (int, str)):
                    raise DatasetInvalid(n, "'label' must be an integer or a string")
                sample["label"] = label
            yield n, sample


def load_samples(path: Path, fmt: str) -> list[dict[str, Any]]:
    return list(iter_samples(path, fmt))
