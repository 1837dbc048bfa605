"""Plain-text output for the client CLI: file sizes, aligned tables, and progress bars (tqdm).

Why not rich: rich pulls Pygments (9.5 MiB, for syntax highlighting the CLI never uses) and
markdown-it-py/mdurl: 13.4 MiB of the SDK's ~31 MiB install, for four features (a console, a file
size, a table, a progress bar). Tables here are plain text, no colours; they fit the terminal's
width (long cells wrap or end in "…", minor columns go) but never cut an id, and piped they are
not fitted at all (stable for scripts that grep them). Progress bars are tqdm's (one small
package, no dependencies), on stderr.

tqdm draws only on a terminal (``disable=None``: off when stderr is not a TTY). Piped or captured,
a bar writes one final summary line to stderr when it closes (as rich did), so logs still show
what was transferred, and stdout stays clean either way.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
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


Overflow = Literal["keep", "wrap", "ellipsis"]


def output_width() -> int | None:
    """The width tables fit into: ``$COLUMNS`` when set, else the terminal's when stdout is one.
    None (no limit) when stdout is piped: output that scripts read keeps every id whole."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


class Table:
    """Aligned columns: an optional title line, a header row with a rule under it, then the rows.

    ``Table()`` then ``add_column(name, justify=...)`` per column; ``Table(header=False)`` makes a
    two-column ``key  value`` listing. ``str(table)`` renders it (no trailing spaces).

    Fitting a width (``width``, else :func:`output_width`): columns marked ``overflow="wrap"`` or
    ``"ellipsis"`` shrink, widest first, down to their ``min_width``; if that is not enough, the
    column with the highest ``drop`` rank goes (0: never dropped) and the fit starts again.
    ``"keep"`` columns (ids, statuses) are never cut: an id printed is an id that can be pasted."""

    def __init__(self, title: str | None = None, *, header: bool = True, width: int | None = None) -> None:
        self.title = title
        self.header = header
        self.width = width
        self.columns: list[str] = []
        self.justify: list[Literal["left", "right"]] = []
        self.overflow: list[Overflow] = []
        self.min_width: list[int] = []
        self.drop: list[int] = []
        self.rows: list[list[str]] = []

    def add_column(
        self,
        name: str = "",
        *,
        justify: Literal["left", "right"] = "left",
        overflow: Overflow = "keep",
        min_width: int | None = None,
        drop: int = 0,
    ) -> None:
        self.columns.append(name)
        self.justify.append(justify)
        self.overflow.append(overflow)
        self.min_width.append(max(1, len(name) if min_width is None else min_width))
        self.drop.append(drop)

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def _natural(self, cols: list[int]) -> list[int]:
        return [
            max(
                [len(line) for row in self.rows for line in row[i].split("\n")]
                + ([len(self.columns[i])] if self.header else []),
                default=0,
            )
            for i in cols
        ]

    def _fit(self, width: int) -> tuple[list[int], list[int]]:
        """The columns shown and their widths: shrink what may shrink, then drop by rank."""
        cols = list(range(len(self.columns)))
        while True:
            widths = self._natural(cols)
            excess = sum(widths) + 2 * (len(cols) - 1) - width
            while excess > 0:
                room = [k for k, i in enumerate(cols) if self.overflow[i] != "keep" and widths[k] > self.min_width[i]]
                if not room:
                    break
                widths[max(room, key=lambda k: widths[k])] -= 1
                excess -= 1
            droppable = [i for i in cols if self.drop[i]]
            if excess <= 0 or not droppable:
                return cols, widths  # (when nothing more can go, wider than asked: ids stay whole)
            cols.remove(max(droppable, key=lambda i: self.drop[i]))

    def _lines(self, text: str, i: int, width: int) -> list[str]:
        out: list[str] = []
        for line in text.split("\n"):
            if len(line) <= width or self.overflow[i] == "keep":
                out.append(line)
            elif self.overflow[i] == "ellipsis":
                out.append(line[: width - 1] + "…")
            else:
                out += textwrap.wrap(line, width, break_on_hyphens=False) or [""]
        return out

    def render(self) -> str:
        limit = self.width if self.width is not None else output_width()
        lines = [self.title] if self.title else []
        if self.title and limit and len(self.title) > limit:
            lines = textwrap.wrap(self.title, limit)
        if not self.columns:
            return "\n".join(lines)
        if limit:
            cols, widths = self._fit(limit)
        else:
            cols = list(range(len(self.columns)))
            widths = self._natural(cols)

        def fmt(row: Sequence[str]) -> list[str]:
            cells = [self._lines(row[i], i, w) for i, w in zip(cols, widths, strict=True)]
            out = []
            for k in range(max(len(cell) for cell in cells)):
                parts = []
                for (i, w), cell in zip(zip(cols, widths, strict=True), cells, strict=True):
                    text = cell[k] if k < len(cell) else ""
                    parts.append(text.rjust(w) if self.justify[i] == "right" else text.ljust(w))
                out.append("  ".join(parts).rstrip())
            return out

        if self.header:
            lines += fmt(self.columns)
            lines.append("  ".join("-" * w for w in widths))
        for row in self.rows:
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
    """A job's stage and fraction while waiting for it: ``update(fraction, text)``.

    ``log=True`` (``modelpress jobs watch``): when stderr is not a terminal, a line for each
    update whose ``key`` differs from the last one's, so a log follows the job; otherwise (``wait``)
    only the summary at the end."""

    def __init__(self, desc: str, *, log: bool = False) -> None:
        super().__init__(desc, total=100, bar_format="{desc} |{bar}| {elapsed}", mininterval=0.2)
        self.text = desc
        self.log = log
        self.key: object = None

    def update(self, fraction: float, text: str, key: object = None) -> None:
        self.text = text
        if self.bar.disable:
            if self.log and (key is None or key != self.key):
                print(text, file=sys.stderr, flush=True)
            self.key = key
            return
        self.bar.set_description_str(text, refresh=False)
        self.bar.n = max(0.0, min(100.0, fraction * 100))
        self.bar.refresh()

    def summary(self, seconds: float) -> str:
        return f"{self.text} ({seconds:.1f} s)"
