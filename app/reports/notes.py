"""A report's notes as sentences.

The worker's notes are data (``report["notes"]``: how the artifact is stored and runs, its memory;
``report["engine"]``: which path built it; ``speed["notes"]``: what the evaluator adjusted). The
page writes each as a sentence: the keys the worker writes today have their own wording, any other
key reads ``Key name: value.``, a list of strings is one sentence each, and nested values are
spelled out (``a: 1; b: 2``), never shown as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from app.reports import units

LIST_MAX = 6  # names listed in a sentence before "and N more"

# A key said within another key's sentence, when that key is there: (folded key, its host).
_FOLDED = {"runs_detail": "runs", "memory_bytes_compressed": "memory_bytes"}


def sentence(text: str) -> str:
    """``text`` with a capital first letter and a full stop. A first word that is a name
    (``seq_len``, ``lm_head``, ``int8``) keeps its spelling."""
    text = text.strip()
    if not text:
        return ""
    if text.split()[0].isalpha():
        text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def spelled(value: Any) -> str:
    """A value written out in words: lists comma-joined, objects as ``key: value`` pairs."""
    if isinstance(value, Mapping):
        return "; ".join(f"{_label(k)}: {spelled(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return _names([spelled(v) for v in value])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return units.plain(value)
    return units.text(value)


def _label(key: Any) -> str:
    return str(key).replace("_", " ")


def _names(items: list[str]) -> str:
    if not items:
        return "none"
    shown = items[:LIST_MAX]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more:,} more" if more else "")


def _runs(notes: Mapping[str, Any]) -> str:
    how = notes.get("runs")
    detail = notes.get("runs_detail")
    head = f"It runs {units.text(how)}" if how not in (None, "") else "How it runs"
    return f"{head}: {units.text(detail)}" if detail else head


def _memory(notes: Mapping[str, Any]) -> str:
    text = f"Once loaded, it takes {units.size(notes.get('memory_bytes'))} in memory"
    if notes.get("memory_bytes_compressed") is not None:
        text += (
            f" ({units.size(notes.get('memory_bytes_compressed'))} before its weights are decompressed, "
            "or in an engine that keeps them packed)"
        )
    return text


def _ignored(notes: Mapping[str, Any]) -> str:
    layers = notes.get("ignored_layers")
    if not isinstance(layers, list):
        return f"Layers left as they were: {spelled(layers)}"
    if not layers:
        return "No Linear layer was left out"
    n = len(layers)
    what = "Linear layer was" if n == 1 else "Linear layers were"
    return f"{n:,} {what} left in the original dtype: {_names([str(x) for x in layers])}"


_WORDING: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "format": lambda n: f"The artifact is stored as {units.text(n.get('format'))}",
    "written_by": lambda n: f"It was written by {units.text(n.get('written_by'))}",
    "runs": _runs,
    "memory_bytes": _memory,
    "ignored_layers": _ignored,
    "sparsity_structure": lambda n: f"The sparsity pattern is {units.text(n.get('sparsity_structure'))}",
}


def note_sentences(notes: Any) -> list[str]:
    """Sentences for ``report["notes"]`` (an object, a list or a string)."""
    if notes in (None, "", {}, []):
        return []
    if isinstance(notes, str):
        return [sentence(notes)]
    if isinstance(notes, list):
        return [s for s in (sentence(spelled(n)) for n in notes) if s]
    if not isinstance(notes, Mapping):
        return [sentence(spelled(notes))]
    out = []
    for key, value in notes.items():
        if _FOLDED.get(str(key)) in notes:
            continue
        wording = _WORDING.get(str(key))
        out.append(sentence(wording(notes) if wording else f"{_label(key).capitalize()}: {spelled(value)}"))
    return [s for s in out if s]


def engine_sentence(engine: Any) -> str:
    """``report["engine"]`` (``{path, note}``) as one sentence."""
    if not isinstance(engine, Mapping):
        return sentence(spelled(engine)) if engine not in (None, "", {}) else ""
    path, note = engine.get("path"), engine.get("note")
    head = f"Built on the {units.text(path)} path" if path else "How it was built"
    return sentence(f"{head}: {units.text(note)}" if note else head)
