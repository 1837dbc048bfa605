"""The one strict JSON loader for every parser of user bytes: safetensors headers, uploaded JSON
files (config.json, tokenizer.json, the shard index), dataset lines, pagination cursors and JSON
request bodies (app/http_limits.py).

Python's ``json`` takes documents that break what comes after it: a number of more than 4,300
digits raises ``ValueError`` (the interpreter's integer-string limit), nesting a few hundred
levels deep raises ``RecursionError`` (and the same depth breaks ``json.dumps``, pydantic and the
idempotency digest later), ``"\\ud800"`` yields a string that cannot be encoded as UTF-8 (nor
stored by PostgreSQL, nor written as a file name), ``NaN`` is not JSON, and a repeated key is
silently the last one. :func:`loads` refuses all of these with one typed error,
:class:`JSONRejected`, whose ``code`` says which rule and whose ``path`` says where::

    ValueError
    └── JSONRejected
          code: invalid_json | json_not_utf8 | json_too_deep | json_number_too_long
                | json_non_finite_number | json_invalid_string | json_duplicate_key

Callers turn it into their own 4xx (the file and field named); nothing here raises anything else
for any input (tests/test_hostile.py checks that with hypothesis).
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Callable
from itertools import accumulate
from typing import Any

# Deeper than any document the service reads legitimately (a config.json nests 3-4 levels, a job
# body 5) and far below the interpreter's recursion limit, with room for the callers' own frames.
MAX_DEPTH = 64
# Longer than any number a writer emits (a float64 repr is at most 24 characters) and far below
# Python's 4,300-digit limit on int(str).
MAX_NUMBER_CHARS = 100

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# "[" and "{" -> +1, "]" and "}" -> -1 (as signed bytes).
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)
# A string that may hold a lone surrogate or NUL once decoded: an escape of either, or (in a str
# handed in already decoded) the raw character. Escaped surrogate pairs match too and are then
# found fine by the exact check on the parsed strings.
_SUSPECT = re.compile(r"\\u(?:[dD][89a-fA-F][0-9a-fA-F]{2}|0000)|[\ud800-\udfff\x00]")
_BAD_CHAR = re.compile(r"[\ud800-\udfff\x00]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,59}")


class JSONRejected(ValueError):
    """A document the strict loader refuses: ``code`` (machine-readable), ``reason`` (what is
    wrong, without the location) and ``path`` (keys and indices down to the offending value,
    every key ASCII-safe and short: it goes into problem bodies and logs)."""

    def __init__(self, code: str, reason: str, path: tuple[str | int, ...] = ()) -> None:
        self.code = code
        self.reason = reason
        self.path = path
        super().__init__(f"{reason} at {format_path(path)}" if path else reason)


def safe_text(s: str, limit: int = 60) -> str:
    """``s`` cut to ``limit`` characters with anything unprintable or unencodable escaped: user
    text quoted in an error message must itself be valid UTF-8 JSON."""
    cut = s if len(s) <= limit else s[:limit] + "..."
    return cut if cut.isprintable() and not _BAD_CHAR.search(cut) else cut.encode("unicode_escape").decode("ascii")


def format_path(path: tuple[str | int, ...] | list[str | int]) -> str:
    """``steps[0].params.sparsity``-style text of a path (``$`` for the document itself)."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _PLAIN_KEY.fullmatch(p):
            out += f".{p}" if out else p
        else:
            out += f"[{json.dumps(p)}]"
    return out or "$"


def _safe_key(k: str) -> str:
    return k if len(k) <= 60 and _PLAIN_KEY.fullmatch(k) else safe_text(k)


class _Refused(Exception):
    """Raised by a parse hook; :func:`loads` re-parses to find where."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason


def _depth_over(text: str, max_depth: int) -> bool:
    """Whether the containers of ``text`` nest more than ``max_depth`` deep, without recursion:
    strings dropped, every bracket left a +1 or -1, the largest running sum is the depth (in C
    loops: ~40 ns a bracket). Malformed bracketing is the parser's to report."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii").translate(_STEP)
    return max(accumulate(array("b", brackets)), default=0) > max_depth


def _path_at_depth(text: str, max_depth: int) -> tuple[str | int, ...]:
    """Keys and indices down to the first container that opens deeper than ``max_depth``."""
    stack: list[list[Any]] = []  # [kind, key or index]
    key_next = False
    for m in _TOKEN.finditer(text):
        t = m.group()
        if t in ("[", "{"):
            if len(stack) >= max_depth:
                break
            stack.append([t, 0 if t == "[" else None])
            key_next = t == "{"
        elif t in ("]", "}"):
            if stack:
                stack.pop()
            key_next = False
        elif t == ",":
            if stack and stack[-1][0] == "[":
                stack[-1][1] += 1
            key_next = bool(stack) and stack[-1][0] == "{"
        elif key_next and stack:
            try:
                stack[-1][1] = _safe_key(json.loads(t))
            except ValueError:
                stack[-1][1] = "?"
            key_next = False
    return tuple(p for _, p in stack if p is not None)


_INF = float("inf")
_MARK = object()  # stands for an offending literal while locating it


def _locate(text: str, max_number_chars: int) -> tuple[str | int, ...]:
    """Path of the first offending literal or repeated key: the document parsed again with hooks
    that mark instead of raising, then searched."""

    def num(s: str) -> Any:
        too_big = len(s) > max_number_chars or (("." in s or "e" in s or "E" in s) and float(s) in (_INF, -_INF))
        return _MARK if too_big else 0

    def pairs(items: list[tuple[str, Any]]) -> dict[Any, Any]:
        d: dict[Any, Any] = {}
        for k, v in items:
            if k in d:
                return {k: _MARK}
            d[k] = v
        return d

    try:
        obj = json.loads(text, parse_int=num, parse_float=num, parse_constant=lambda _s: _MARK, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return ()
    return _find(obj, lambda v: v is _MARK) or ()


def _find(obj: Any, bad: Any) -> tuple[str | int, ...] | None:
    """Path of the first value (or key, for strings) in document order for which ``bad`` holds."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(obj, ())]
    while stack:
        v, path = stack.pop()
        if bad(v):
            return path
        if isinstance(v, dict):
            for k, child in reversed(list(v.items())):
                if isinstance(k, str) and bad(k):
                    # The key itself: its (escaped) text names it.
                    return (*path, _safe_key(k))
                stack.append((child, (*path, _safe_key(k) if isinstance(k, str) else str(k))))
        elif isinstance(v, list):
            stack.extend((child, (*path, i)) for i, child in reversed(list(enumerate(v))))
    return None


def _text(data: bytes | bytearray | memoryview | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONRejected("json_not_utf8", f"not UTF-8 (byte {e.start})") from None


def _number_parser(max_number_chars: int) -> Callable[[str], Any]:
    """json.loads's ``parse_int`` and ``parse_float``: refuses over-long and non-finite numbers."""

    def number(s: str) -> Any:
        if len(s) > max_number_chars:
            raise _Refused("json_number_too_long", f"a number of {len(s)} characters (at most {max_number_chars})")
        if "." in s or "e" in s or "E" in s:
            f = float(s)
            if f in (_INF, -_INF):
                raise _Refused("json_non_finite_number", f"{safe_text(s, 30)} is too large for a float64")
            return f
        return int(s)

    return number


def _refuse_constant(s: str) -> Any:
    raise _Refused("json_non_finite_number", f"{s} is not a JSON number")


def _unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(items)
    if len(d) != len(items):
        raise _Refused("json_duplicate_key", "a key is repeated in an object")
    return d


def loads(
    data: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH, max_number_chars: int = MAX_NUMBER_CHARS
) -> Any:
    """Parse a JSON document (bytes must be UTF-8) or raise :class:`JSONRejected`: nothing else,
    whatever the input."""
    text = _text(data)
    if _depth_over(text, max_depth):
        raise JSONRejected("json_too_deep", f"nested deeper than {max_depth} levels", _path_at_depth(text, max_depth))
    number = _number_parser(max_number_chars)
    try:
        obj = json.loads(
            text, parse_int=number, parse_float=number, parse_constant=_refuse_constant, object_pairs_hook=_unique_pairs
        )
    except _Refused as e:
        raise JSONRejected(e.code, e.reason, _locate(text, max_number_chars)) from None
    except json.JSONDecodeError as e:
        raise JSONRejected("invalid_json", f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except RecursionError:  # not reached after _depth_over; kept so nothing else ever escapes
        raise JSONRejected("json_too_deep", f"nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise JSONRejected("invalid_json", f"not valid JSON ({e.__class__.__name__})") from None
    if _SUSPECT.search(text):
        where = _find(obj, lambda v: isinstance(v, str) and _BAD_CHAR.search(v) is not None)
        if where is not None:
            raise JSONRejected(
                "json_invalid_string", "a string holds a lone surrogate or a NUL character (not storable text)", where
            )
    return obj
