"""Plain-text output for the client CLI: file sizes, aligned tables, and progress bars (tqdm).

Why not rich: rich pulls Pygments (9.5 MiB, for syntax highlighting the CLI never uses) and
markdown-it-py/mdurl: 13.4 MiB of the SDK's ~31 MiB install, for four features (a console, a file
size, a table, a progress bar). Tables here are plain text (no colours, no wrapping; stable for
scripts that grep them); progress bars are tqdm's (one small package, no dependencies), on stderr.

tqdm draws only on a terminal (``disable=None``: off when stderr is not a TTY). Piped or captured,
a bar writes one final summary line to stderr when it closes (as rich did), so logs still show
what was transferred, and stdout stays clean either way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self

_UNITS = ("kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def filesize(n: int | float) -> str:
    """Decimal (SI) size, as ``rich.filesize.decimal`` wrote it: ``1 byte``, ``512 bytes``, ``1.2 kB``."""
    size = int(n)
    if size == 1:
        return "1 byte"
    if size < 1000:
        return f"{size:,} bytes"
    base = 1000
    for i, unit in enumerate(_UNITS, start=2):
        if size < base**i or unit == _UNITS[-1]:
            return f"{base * size / base**i:,.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _rate(n: float, seconds: float) -> str:
    return f"{filesize(n / seconds)}/s" if seconds > 0 else "—"


class Table:
    """Aligned columns: an optional title line, a header row with a rule under it, then the rows.

    ``Table()`` then ``add_column(name, justify=...)`` per column; ``Table(header=False)`` makes a
    two-column ``key  value`` listing. ``str(table)`` renders it (no trailing spaces)."""

    def __init__(self, title: str | None = None, *, header: bool = True) -> None:
        self.title = title
        self.header = header
        self.columns: list[str] = []
        self.justify: list[Literal["left", "right"]] = []
        self.rows: list[list[str]] = []

    def add_column(self, name: str = "", *, justify: Literal["left", "right"] = "left") -> None:
        self.columns.append(name)
        self.justify.append(justify)

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        lines = [self.title] if self.title else []
        if not self.columns:
            return "\n".join(lines)
        # A cell may hold several lines: each line is laid out in the column.
        grid = [[cell.split("\n") for cell in row] for row in self.rows]
        head = [[c] for c in self.columns] if self.header else None
        widths = [
            max([len(line) for row in ([head] if head else []) + grid for line in row[i]], default=0)
            for i in range(len(self.columns))
        ]

        def fmt(row: Sequence[list[str]]) -> list[str]:
            out = []
            for k in range(max(len(cell) for cell in row)):
                parts = []
                for i, cell in enumerate(row):
                    text = cell[k] if k < len(cell) else ""
                    parts.append(text.rjust(widths[i]) if self.justify[i] == "right" else text.ljust(widths[i]))
                out.append("  ".join(parts).rstrip())
            return out

        if head:
            lines += fmt(head)
            lines.append("  ".join("-" * w for w in widths))
        for row in grid:
            lines += fmt(row)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


class _Bar:
    """A tqdm bar on stderr; when tqdm is off (not a TTY) one summary line at the end instead."""

    def __init__(self, desc: str, **kwargs: Any) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type hints

        self.desc = desc
        self.started = time.monotonic()
        self.bar = tqdm(desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True, leave=True, **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def summary(self, seconds: float) -> str:
        raise NotImplementedError

    def close(self) -> None:
        if self.bar.disable:
            print(self.summary(time.monotonic() - self.started), file=sys.stderr, flush=True)
        self.bar.close()


class TransferBar(_Bar):
    """Bytes sent or received: ``update(done, total)`` (``total`` may be None: no bar, a count)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, total=None, unit="B", unit_scale=True, unit_divisor=1000, miniters=1)
        self.done = 0
        self.total: int | None = None

    def update(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total
        if self.bar.disable:
            return
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def summary(self, seconds: float) -> str:
        of = f" of {filesize(self.total)}" if self.total is not None and self.total != self.done else ""
        return f"{self.desc}: {filesize(self.done)}{of} in {seconds:.1f} s ({_rate(self.done, seconds)})"


class StageBar(_Bar):
    """A job's stage and fraction while waiting for it: ``update(fraction, text)``."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, total=100, bar_format="{desc} |{bar}| {elapsed}", mininterval=0.2)
        self.text = desc

    def update(self, fraction: float, text: str) -> None:
        self.text = text
        if self.bar.disable:
            return
        self.bar.set_description_str(text, refresh=False)
        self.bar.n = max(0.0, min(100.0, fraction * 100))
        self.bar.refresh()

    def summary(self, seconds: float) -> str:
        return f"{self.text} ({seconds:.1f} s)"
