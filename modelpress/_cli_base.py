"""What the client commands share (modelpress/_cli.py and modelpress/_cli_resources.py import it;
it imports neither): the exit codes, printing (tables, JSON), the client from the flags, one job's
table, and following a job to its end (``wait``, ``watch``, ``compress --wait``)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tqdm and the client are imported only when a command runs
    from modelpress._client import Client
    from modelpress._term import Table, TransferBar

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_API, EXIT_TRANSPORT, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

# -- output helpers ----------------------------------------------------------------------------


def _dump(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [_dump(o) for o in obj]
    return obj


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_dump(obj), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _print_json_line(obj: Any) -> None:
    """One compact line (``jobs watch --json``: a line per change, JSON Lines)."""
    sys.stdout.write(json.dumps(_dump(obj), ensure_ascii=False) + "\n")
    sys.stdout.flush()


# No rich: it pulls Pygments (9.5 MiB of the SDK's install) for highlighting we never use. Output is
# plain text (modelpress/_term.py), fitted to the terminal; ids are never cut.


def _print(text: Any = "") -> None:
    print(str(text), flush=True)


def _fill(text: str) -> str:
    """A paragraph wrapped to the width tables fit (modelpress/_term.py), whole when piped."""
    import textwrap

    from modelpress._term import output_width

    width = output_width()
    return textwrap.fill(text, width) if width else text


def _eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _size(n: Any) -> str:
    from modelpress._term import filesize

    return filesize(n) if isinstance(n, (int, float)) else "—"


def _num(v: Any, fmt: str = "{:,.4g}") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def _pct(v: Any) -> str:
    return f"{v * 100:.1f}%" if isinstance(v, (int, float)) else "—"


def _ratio(r: Any) -> str:
    """A ratio as every report states it, compressed ÷ original (docs/REPORTS.md): ``0.646× (-35.4%)``."""
    if not isinstance(r, (int, float)) or isinstance(r, bool) or r <= 0:
        return ""
    return f"{r:.3g}× ({(r - 1) * 100:+.1f}%)"


def _steps_text(steps: list[Any]) -> str:
    out = []
    for s in steps:
        d = _dump(s)
        params = ",".join(f"{k}={json.dumps(v)}" for k, v in (d.get("params") or {}).items() if v is not None)
        out.append(d.get("method", "?") + (f":{params}" if params else ""))
    return " → ".join(out)


def _stage_line(job: Any) -> str:
    stage = job.progress.stage or job.status
    return f"{job.status} · {stage} … {job.progress.fraction * 100:.0f}%"


def _transfer_progress(desc: str) -> TransferBar:
    """Bytes, rate and time left on stderr (tqdm); one summary line there when not a terminal."""
    from modelpress._term import TransferBar

    return TransferBar(desc)


def _kv_table() -> Table:
    from modelpress._term import Table

    t = Table(header=False)
    t.add_column()
    t.add_column(overflow="wrap", min_width=20)  # long values wrap under themselves
    return t


def _job_table(job: Any) -> Table:
    t = _kv_table()
    t.add_row("job", job.id)
    if job.name:
        t.add_row("name", job.name)
    t.add_row("status", job.status)
    t.add_row("progress", f"{job.progress.stage or '—'} ({job.progress.fraction * 100:.0f}%)")
    t.add_row("model", job.model_id or "—")
    t.add_row("steps", _steps_text(job.steps))
    if job.dataset_id:
        t.add_row("dataset", job.dataset_id)
    if job.eval_dataset_id:
        t.add_row("eval dataset", job.eval_dataset_id)
    t.add_row("queue", f"{job.queue or '—'} (attempt {job.attempt})")
    t.add_row("created", job.created_at.isoformat(timespec="seconds"))
    if job.started_at:
        t.add_row("started", job.started_at.isoformat(timespec="seconds"))
    if job.finished_at:
        t.add_row("finished", job.finished_at.isoformat(timespec="seconds"))
    if job.cancel_requested and job.status not in ("canceled",):
        t.add_row("cancel", "requested")
    if job.error:
        t.add_row("error", f"{job.error.code}: {job.error.message}")
    if job.artifact:
        # The sha256 on a row of its own: 64 characters that fit whole at 80 columns.
        t.add_row("artifact", f"{job.artifact.filename}, {_size(job.artifact.size_bytes)}")
        t.add_row("sha256", job.artifact.sha256)
    size = (job.metrics or {}).get("size") or {}
    if size.get("compression_ratio"):  # original ÷ artifact in the JSON; shown the reports' way round
        t.add_row(
            "size",
            f"{_size(size.get('original_bytes'))} → {_size(size.get('artifact_bytes'))} "
            f"({_ratio(1 / size['compression_ratio'])})",
        )
    if job.plan:
        t.add_row("plan", _plan_line(job.plan))
    return t


def _plan_line(plan: Any) -> str:
    return (
        f"{plan.path} path: peak memory {_size(plan.peak_memory_bytes)}, scratch {_size(plan.scratch_bytes)}, "
        f"artifact {_size(plan.artifact_bytes)}, ~{plan.seconds:,.0f} s"
    )


def _client(args: argparse.Namespace) -> Client:
    from modelpress import Client

    return Client(args.url, args.api_key)


def _model_line(model: Any) -> str:
    params = f"{model.parameters:,} parameters" if model.parameters is not None else "parameters unknown"
    return (
        f"{model.name}, {model.format or '—'}, {model.architecture or 'no architecture'}, "
        f"{params}, {_size(model.size_bytes)}"
    )


# -- following a job ----------------------------------------------------------------------------

_COUNT = re.compile(r"(\d+)/(\d+)")


def watch_line(job: Any) -> str:
    """``45% running · prune.magnitude: 3/12 layers``: the fraction first (a cut line keeps it)."""
    stage = job.progress.stage or job.status
    return f"{job.progress.fraction * 100:3.0f}% {job.status} · {stage}"


def watch_key(job: Any) -> tuple[Any, ...]:
    """What a new line is printed for when stderr is not a terminal: a change of status or stage
    (its counts aside: ``sample 3/500`` is not 500 lines) or another tenth of the way."""
    return (job.status, _COUNT.sub("#", job.progress.stage or ""), int(job.progress.fraction * 10))


def _wait(mp: Any, args: argparse.Namespace, job_id: str, *, watch: bool = False) -> int:
    """Follow a job to its end (``wait``, ``compress --wait``, ``jobs watch``): a live line on
    stderr, then the job on stdout; the exit code says how it ended. ``watch`` also logs each
    stage when stderr is not a terminal, and with ``--json`` prints each change as one JSON line."""
    from modelpress import JobError, WaitTimeout

    try:
        if args.json:
            job = mp.wait(
                job_id,
                timeout=args.timeout,
                poll_interval=args.poll,
                on_progress=_print_json_line if watch else None,
            )
        else:
            from modelpress._term import StageBar

            # The live line on stderr: a tqdm bar on a terminal, else the last stage line at the end.
            with StageBar(f"job {job_id}", log=watch) as live:
                job = mp.wait(
                    job_id,
                    timeout=args.timeout,
                    poll_interval=args.poll,
                    on_progress=lambda j: live.update(
                        j.progress.fraction, watch_line(j) if watch else _stage_line(j), watch_key(j)
                    ),
                )
    except WaitTimeout as e:
        if not (watch and args.json):  # (watch printed the job's last state as a line already)
            _report_job(args, e.job)
        print(
            f"Error: timed out: job {e.job.id} is still {e.job.status} after {args.timeout} s "
            f"(it goes on; `modelpress wait {e.job.id}`)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    except JobError as e:
        if not (watch and args.json):
            _report_job(args, e.job)
        err = e.job.error
        print(
            f"Error: job {e.job.status}: " + (f"{err.code}: {err.message}" if err else f"job {e.job.id}"),
            file=sys.stderr,
        )
        return EXIT_JOB_FAILED
    if not (watch and args.json):
        _report_job(args, job)
    return EXIT_OK


def _report_job(args: argparse.Namespace, job: Any) -> None:
    if args.json:
        _print_json(job)
    else:
        _print(_job_table(job))
