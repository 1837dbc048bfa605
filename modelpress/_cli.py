"""The client subcommands of the ``modelpress`` console script (``app/cli.py`` adds them to its
parser with :func:`add_client_commands`; the logic is here and in modelpress/_cli_resources.py, on
:class:`modelpress.Client`). Every command, with examples: docs/CLI.md.

    modelpress --version | completion bash|zsh|fish
    modelpress models [list] [--limit N] | models show MODEL | models delete MODEL [-y]
    modelpress models upload PATH [--name N] [--include GLOB ...] [--exclude GLOB ...] [--chunk-size SIZE]
                        [--dry-run] [--restart]       a model directory or one .safetensors file, resumable
                                                       (also: modelpress upload PATH ..., the same command)
    modelpress models import NAME SOURCE [--wait [--timeout S]]   the server fetches s3://... or https://...
    modelpress datasets [list] | datasets show ID | datasets delete ID [-y]
    modelpress datasets upload FILE [--name N]         a .txt or .jsonl dataset (also: upload-dataset FILE)
    modelpress compress MODEL_ID --step SPEC [--step SPEC ...] [--dataset ID] [--eval-dataset ID]
                        [--name N] [--no-eval | --evaluation JSON] [--wait [--timeout S]]
    modelpress jobs [list] [--status S] [--limit N]
    modelpress jobs estimate MODEL_ID --step SPEC [--step SPEC ...] [--dataset ID] [--eval-dataset ID]
                        [--no-eval | --evaluation JSON]
    modelpress jobs show|watch|wait|cancel|report JOB  (also: status, watch, wait, cancel, report JOB)
    modelpress jobs delete JOB [-y]                     a finished job and its artifact
    modelpress download JOB [-o DEST] [--file NAME]    (also: modelpress jobs download ...)
    modelpress report JOB [--open [--ttl S]]
    modelpress sweeps [list] | sweeps show SWEEP | sweeps delete SWEEP [-y]
    modelpress methods [list] | methods show METHOD
    modelpress keys list [--tenant NAME | --all] [--limit N]      (with --url / --api-key: through the API)
    modelpress keys create --tenant NAME [--admin]
    modelpress keys revoke KEY                                    (an id, a prefix or the whole key)

``keys`` is shared with the server CLI (app/cli.py): without ``--url`` or ``--api-key`` on its
command line it works on the server's database (the operator, where the server runs); with either,
it goes through the API with that (admin) key, like every command here. The environment
(``$MODELPRESS_URL``, ``$MODELPRESS_API_KEY``) fills in the other flag but never chooses the path.

Every one takes ``--url`` (else ``$MODELPRESS_URL``, else http://127.0.0.1:8000), ``--api-key``
(else ``$MODELPRESS_API_KEY``), ``--json`` and its newer spelling ``--output json`` (not
``download``: its ``-o/--output`` is the destination). Human output is plain-text tables on stdout,
fitted to the terminal's width (modelpress/_term.py); progress bars (tqdm, on a terminal only) and
the live ``--wait`` / ``watch`` line go to stderr. ``--json`` prints JSON only on stdout (the API's
objects as the server sent them; on an error ``{"error": {...}}``) and draws nothing live.

A step is ``METHOD`` or ``METHOD:key=value,key=value``. Values are read as JSON when they parse
(``0.5``, ``8``, ``true``, ``null``, ``"text"``, ``["lm_head"]``) and as a plain string otherwise
(``mask=2:4``); commas inside brackets or quotes do not split. A step may also be one JSON object:
``--step '{"method": "prune.magnitude", "params": {"sparsity": 0.5}}'``.

Uploads are resumable (modelpress/_upload.py): what is skipped is printed on stderr before any
byte is sent, and after an interruption the same command sends only what the server lacks.

Exit codes (``EXIT_*``): 0 success; 1 the job failed or was canceled (``compress --wait``,
``wait``), or an import failed (``models import --wait``); 2 usage error (bad flags, a bad
``--step``, a missing file, nothing left to upload); 3 the API answered an error (``Error: <title>:
<detail>``); 4 transport error (cannot connect, connection lost, a download that fails its sha256
check, an upload that gave up: run it again to resume); 5 ``--timeout`` ran out while waiting (the
job or import goes on); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from modelpress._cli_base import (
    EXIT_API,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_TRANSPORT,
    EXIT_USAGE,
    _client,
    _dump,
    _eprint,
    _fill,
    _kv_table,
    _model_line,
    _num,
    _pct,
    _print,
    _print_json,
    _ratio,
    _report_job,
    _size,
    _steps_text,
    _transfer_progress,
    _wait,
)

if TYPE_CHECKING:  # the tables are imported only when a command runs
    from modelpress._term import Table

EPILOG = """\
client commands (talk to a running service over HTTP; docs/CLI.md has them all):
  models, datasets, jobs, sweeps, methods: list (the group alone), show, delete where the API can;
  models upload|import, datasets upload, compress, jobs estimate|watch|wait|cancel|report|download;
  the older status, watch, wait, cancel, download, report, upload, upload-dataset;
  keys list|create|revoke when given --url or --api-key (without: on the server's database);
  completion bash|zsh|fish prints a shell completion script.
  The server URL and API key come from --url / --api-key, else $MODELPRESS_URL
  (default http://127.0.0.1:8000) / $MODELPRESS_API_KEY. --output json (or --json) prints JSON only.

example:
  export MODELPRESS_URL=http://127.0.0.1:8000 MODELPRESS_API_KEY=$(cat var/api-key)
  modelpress models upload gpt2/        (resumable: after Ctrl-C, run it again)
  modelpress compress MODEL_ID --step prune.magnitude:sparsity=0.5 --step quantize.cast:dtype=bfloat16
  modelpress jobs watch JOB
  modelpress download JOB -o out/ && modelpress report JOB

exit codes (client commands):
  0 success   1 job failed or canceled, import failed   2 usage error   3 API error ("Error: <title>: <detail>")
  4 transport error (cannot connect; download fails its sha256)   5 --timeout ran out while waiting
"""

STEP_HELP = (
    "METHOD[:key=value,...] (values parsed as JSON when they parse: 0.5, 8, true, null, "
    '"s", [..]) or a JSON object {"method": ..., "params": {...}}; repeat for several steps'
)


# -- step parsing ------------------------------------------------------------------------------


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside quotes and brackets."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ValueError("unbalanced quotes or brackets")
    parts.append("".join(cur))
    return parts


def _value(raw: str) -> Any:
    raw = raw.strip()
    try:
        return json.loads(raw)
    except ValueError:
        if len(raw) >= 2 and raw[0] == raw[-1] == "'":
            return raw[1:-1]
        return raw


def parse_step(spec: str) -> dict[str, Any]:
    """``prune.magnitude:sparsity=0.5,scope=layer`` (or a JSON step) -> ``{"method", "params"}``."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty --step")
    if spec.startswith("{"):
        try:
            step = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"--step {spec!r}: not valid JSON ({e})") from None
        if not isinstance(step, dict) or not isinstance(step.get("method"), str):
            raise ValueError(f'--step {spec!r}: a JSON step is {{"method": ..., "params": {{...}}}}')
        if not isinstance(step.get("params", {}), dict) or set(step) - {"method", "params"}:
            raise ValueError(f'--step {spec!r}: a JSON step has only "method" and "params" (an object)')
        return {"method": step["method"], "params": step.get("params") or {}}
    method, _, rest = spec.partition(":")
    method = method.strip()
    if not method or any(c.isspace() for c in method):
        raise ValueError(f"--step {spec!r}: expected METHOD[:key=value,...]")
    params: dict[str, Any] = {}
    if rest.strip():
        try:
            items = _split_top(rest)
        except ValueError as e:
            raise ValueError(f"--step {spec!r}: {e}") from None
        for item in items:
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"--step {spec!r}: {item.strip()!r} is not key=value")
            if key in params:
                raise ValueError(f"--step {spec!r}: {key!r} given twice")
            params[key] = _value(raw)
    return {"method": method, "params": params}


def _estimate_table(est: Any) -> Table:
    t = _kv_table()
    t.add_row("path", est.path + (" (tensor by tensor)" if est.path == "stream" else " (the model loaded whole)"))
    t.add_row(
        "peak memory",
        f"{_size(est.peak_memory_bytes)} (baseline {_size(est.baseline_bytes)} + "
        f"{est.memory_factor:g}× {'largest tensor' if est.path == 'stream' else 'model'})",
    )
    t.add_row("scratch disk", _size(est.scratch_bytes))
    t.add_row("artifact", _size(est.artifact_bytes))
    t.add_row("seconds", f"~{est.seconds:,.1f}" + ("" if est.throughput_measured else " (default throughput)"))
    t.add_row(
        "model",
        f"{_size(est.model_bytes)}, {est.parameters:,} parameters, largest tensor "
        f"{_size(est.largest_tensor_bytes)} (float32)",
    )
    if est.fleet is None:
        t.add_row("workers", "no live worker published a budget: a submit is accepted and the worker decides")
    else:
        f = est.fleet
        verdict = "fits" if f.fits else "exceeds every worker's budget (a submit is refused)"
        t.add_row(
            "workers",
            f"{verdict}: largest {f.queue} budget {_size(f.memory_bytes)} memory, "
            f"{_size(f.scratch_bytes)} scratch ({f.workers} live)",
        )
    for note in est.notes:
        t.add_row("note", note)
    return t


def _report_table(rep: Any) -> Table:
    """Original against compressed, one row per measured quantity (docs/REPORTS.md)."""
    from modelpress._term import Table

    t = Table(title=f"Report of job {rep.job_id}" + (f" ({rep.job_name})" if rep.job_name else ""))
    t.add_column("section")
    t.add_column("metric", overflow="wrap", min_width=12)
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    # One convention, the HTML report's: ratios are compressed ÷ original (below 1: smaller, faster).
    t.add_column("compressed ÷ original", overflow="wrap", min_width=12)
    size = rep.size or {}
    ratio = size.get("compression_ratio")  # original ÷ artifact in the JSON
    t.add_row(
        "size",
        "artifact bytes",
        _size(size.get("original_bytes")),
        _size(size.get("artifact_bytes")),
        _ratio(1 / ratio) if isinstance(ratio, (int, float)) and ratio > 0 else "",
    )
    if size.get("original_weight_bytes") is not None:
        wr = size.get("weight_bytes_ratio")
        t.add_row(
            "",
            "weight bytes",
            _size(size.get("original_weight_bytes")),
            _size(size.get("artifact_weight_bytes")),
            _ratio(wr),
        )
    params = size.get("parameters") or {}
    if params:
        t.add_row(
            "", "parameters (nonzero)", _num(params.get("original"), "{:,}"), _num(params.get("nonzero"), "{:,}"), ""
        )
    if size.get("mean_bits_per_weight") is not None:
        t.add_row("", "bits per weight", "", _num(size.get("mean_bits_per_weight")), "")
    sp = rep.sparsity or {}
    t.add_row("sparsity", "targeted layers", "", _pct(sp.get("sparsity")), "")
    t.add_row("", "all parameters", "", _pct(sp.get("overall")), "")
    _available_rows(t, "speed", rep.speed, _speed_rows)
    _available_rows(t, "quality", rep.quality, _quality_rows)
    _available_rows(t, "fidelity", rep.fidelity, _fidelity_rows)
    mem = rep.memory or {}
    if mem.get("peak_rss_bytes") is not None:
        t.add_row("memory", "worker peak RSS", "", _size(mem.get("peak_rss_bytes")), "")
    return t


def _available_rows(
    t: Table, section: str, data: dict[str, Any] | None, rows: Callable[[dict[str, Any]], list[tuple[str, ...]]]
) -> None:
    if not data:
        t.add_row(section, "—", "", "", "not measured")
    elif not data.get("available", True):
        t.add_row(section, "—", "", "", data.get("reason") or "not available")
    else:
        for i, row in enumerate(rows(data)):
            t.add_row(section if i == 0 else "", *row)


def _speed_rows(s: dict[str, Any]) -> list[tuple[str, ...]]:
    orig, comp = (s.get("original") or {}).get("median_ms"), (s.get("compressed") or {}).get("median_ms")
    if s.get("speedup"):
        # Latency, compressed ÷ original: below 1 is faster.
        change = _ratio(s["latency_ratio"] if s.get("latency_ratio") is not None else 1 / s["speedup"]) + " latency"
    else:
        change = f"no speed-up claimed (runs {s.get('runs_as') or 'as the original'})"
    return [(f"median latency ({s.get('device') or '?'})", _num(orig, "{:.4g} ms"), _num(comp, "{:.4g} ms"), change)]


def _quality_rows(q: dict[str, Any]) -> list[tuple[str, ...]]:
    delta = q.get("delta")
    better = q.get("higher_is_better")
    hint = "" if better is None else (" (higher is better)" if better else " (lower is better)")
    return [
        (
            q.get("metric") or "quality",
            _num(q.get("original"), "{:.6g}"),
            _num(q.get("compressed"), "{:.6g}"),
            (f"{delta:+.4g}" if isinstance(delta, (int, float)) else "") + hint,
        )
    ]


def _fidelity_rows(f: dict[str, Any]) -> list[tuple[str, ...]]:
    on = f.get("on") or "outputs"
    return [
        (f"KL divergence ({on})", "0", _num(f.get("kl_mean")), ""),
        ("top-1 agreement", "1", _num(f.get("top1_agreement")), ""),
        ("output cosine", "1", _num(f.get("output_cosine")), ""),
    ]


# -- commands ------------------------------------------------------------------------------------


def _print_skipped(plan: Any) -> None:
    """The files an upload leaves out and why, on stderr, before any byte is sent."""
    if not plan.skipped:
        return
    width = max(len(s.name) for s in plan.skipped)
    n = len(plan.skipped)
    lines = [f"skipping {n} file{'s' if n != 1 else ''} (not sent):"]
    lines += [f"  {s.name.ljust(width)}  {s.reason}" for s in plan.skipped]
    _eprint("\n".join(lines))


def _dry_run(args: argparse.Namespace, plan: Any) -> int:
    if args.json:
        _print_json(
            {
                "files": [{"name": f.name, "size_bytes": f.size} for f in plan.files],
                "skipped": [{"name": s.name, "reason": s.reason} for s in plan.skipped],
                "total_bytes": plan.total,
            }
        )
        return EXIT_OK
    from modelpress._term import Table

    t = Table(title=f"would send {len(plan.files)} file(s), {_size(plan.total)} (--dry-run: nothing sent)")
    t.add_column("file")
    t.add_column("size", justify="right")
    for f in plan.files:
        t.add_row(f.name, _size(f.size))
    _print(t)
    return EXIT_OK


def _on_start(already: int, total: int) -> None:
    if already:
        _eprint(
            f"resuming: {_size(already)} of {_size(total)} already on the server "
            f"({already} of {total} bytes); sending the remaining {_size(total - already)}"
        )


_RESUME_HINT = "run the same command again to resume: the bytes already sent are kept on the server for a while"


def cmd_upload(args: argparse.Namespace) -> int:
    from modelpress import TransportError
    from modelpress._upload import DEFAULT_CHUNK_SIZE, plan_upload

    plan = plan_upload(args.path, include=args.include or (), exclude=args.exclude or ())
    _print_skipped(plan)  # before any byte is sent
    if args.dry_run:
        return _dry_run(args, plan)
    opts: dict[str, Any] = {
        "name": args.name,
        "chunk_size": args.chunk_size or DEFAULT_CHUNK_SIZE,
        "restart": args.restart,
        "on_start": _on_start,
    }
    try:
        with _client(args) as mp:
            if args.json:
                _print_json(mp.upload_model(plan, **opts))
                return EXIT_OK
            n = len(plan.files)
            _eprint(f"sending {n} file{'s' if n != 1 else ''}, {_size(plan.total)}")
            with _transfer_progress(f"upload {args.path}") as bar:
                model = mp.upload_model(plan, on_progress=bar.update, **opts)
    except KeyboardInterrupt:
        _eprint(f"upload interrupted; {_RESUME_HINT}")
        raise
    except TransportError as e:
        if "again" not in str(e):
            raise TransportError(f"{e}; {_RESUME_HINT}", e.url) from e
        raise
    _print(f"model {model.id} uploaded: {_model_line(model)}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from modelpress._term import Table

    with _client(args) as mp:
        models = list(mp.models(limit=args.limit))
    if args.json:
        _print_json(models)
        return EXIT_OK
    t = Table()
    t.add_column("id")
    t.add_column("name", overflow="ellipsis", min_width=8)
    t.add_column("format", drop=1)
    t.add_column("status")
    t.add_column("size", justify="right")
    t.add_column("created", drop=2)
    for m in models:
        t.add_row(
            m.id,
            m.name,
            m.format or "",
            m.status or "ready",
            _size(m.size_bytes),
            m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    _print(t)
    if not models:
        _print("no models")
    return EXIT_OK


def _import_progress(bar: Any, model: Any) -> None:
    p = model.progress
    if p is not None:
        bar.update(p.bytes_done, p.bytes_total)


def cmd_models_import(args: argparse.Namespace) -> int:
    from modelpress import ImportFailed, ImportTimeout

    with _client(args) as mp:
        model = mp.import_model(args.name, args.source)
        if not args.wait:
            if args.json:
                _print_json(model)
            else:
                _print(
                    f"model {model.id} {model.status or 'ready'}: {model.name} from {model.source or args.source}\n"
                    f"follow it: modelpress models import ... --wait, or GET /v1/models/{model.id}"
                )
            return EXIT_OK
        try:
            if args.json:
                model = mp.wait_model(model.id, timeout=args.timeout, poll_interval=args.poll)
            else:
                _eprint(f"model {model.id} importing from {model.source or args.source}")
                with _transfer_progress(f"import {args.name}") as bar:
                    model = mp.wait_model(
                        model.id,
                        timeout=args.timeout,
                        poll_interval=args.poll,
                        on_progress=lambda m: _import_progress(bar, m),
                    )
        except ImportTimeout as e:
            if args.json:
                _print_json(e.model)
            print(
                f"Error: timed out: model {e.model.id} is still {e.model.status} after {args.timeout} s "
                "(the import goes on)",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        except ImportFailed as e:
            if args.json:
                _print_json(e.model)
            print(f"Error: {e}", file=sys.stderr)
            return EXIT_JOB_FAILED
    if args.json:
        _print_json(model)
    else:
        _print(f"model {model.id} imported: {_model_line(model)}")
    return EXIT_OK


def cmd_upload_dataset(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        if args.json:
            _print_json(mp.create_dataset(args.path, name=args.name))
            return EXIT_OK
        with _transfer_progress(f"upload {args.path}") as bar:
            ds = mp.create_dataset(args.path, name=args.name, on_progress=bar.update)
    labels = f", labels {ds.labels}" if ds.labeled else ""
    _print(f"dataset {ds.id} uploaded: {ds.name}, {ds.format}, {ds.samples:,} samples{labels}")
    return EXIT_OK


def _evaluation(args: argparse.Namespace) -> dict[str, Any] | None:
    evaluation = None
    if args.evaluation:
        evaluation = json.loads(args.evaluation)
        if not isinstance(evaluation, dict):
            raise ValueError("--evaluation must be a JSON object, e.g. '{\"runs\": 3}'")
    if args.no_eval:
        evaluation = {**(evaluation or {}), "enabled": False}
    return evaluation


_RECIPE_HELP = "a named recipe instead of --step, e.g. w4-best, fp8, sparse-2of4 (list: modelpress methods recipes)"


def parse_export(spec: str) -> dict[str, Any]:
    """``--export gguf:type=Q4_0`` / ``onnx:quantize=int8_dynamic`` / ``safetensors`` (or a JSON
    object) -> the job spec's ``output``: the step syntax, its method being the format."""
    if spec.strip().startswith("{"):
        try:
            out = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"--export {spec!r}: not valid JSON ({e})") from None
        if not isinstance(out, dict) or not isinstance(out.get("format"), str):
            raise ValueError(f'--export {spec!r}: a JSON output is {{"format": ..., ...}}')
        return out
    try:
        step = parse_step(spec)
    except ValueError as e:
        raise ValueError(str(e).replace("--step", "--export").replace("METHOD", "FORMAT")) from None
    return {"format": step["method"], **step["params"]}


def _output(args: argparse.Namespace) -> dict[str, Any] | None:
    return parse_export(args.export) if getattr(args, "export", None) else None


def _steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The --step specs; none with --recipe (which stands for them), or with --export alone (the
    export is then the whole job)."""
    recipe = getattr(args, "recipe", None)
    if recipe and args.step:
        raise ValueError("--recipe stands for the steps: give --step or --recipe, not both")
    if not args.step and not recipe and not getattr(args, "export", None):
        raise ValueError(
            "--step is required (at least one), unless --recipe names them or --export makes the export the whole job"
        )
    return [parse_step(s) for s in args.step]


def cmd_estimate(args: argparse.Namespace) -> int:
    steps = _steps(args)
    with _client(args) as mp:
        est = mp.estimate(
            args.model_id,
            steps,
            recipe=args.recipe,
            dataset_id=args.dataset,
            eval_dataset_id=args.eval_dataset,
            evaluation=_evaluation(args),
            output=_output(args),
        )
    if args.json:
        _print_json(est)
    else:
        _print(_estimate_table(est))
    return EXIT_OK


def cmd_compress(args: argparse.Namespace) -> int:
    steps = _steps(args)
    evaluation = _evaluation(args)
    with _client(args) as mp:
        job = mp.submit(
            args.model_id,
            steps,
            recipe=args.recipe,
            name=args.name,
            dataset_id=args.dataset,
            eval_dataset_id=args.eval_dataset,
            evaluation=evaluation,
            output=_output(args),
        )
        if args.wait:
            if not args.json:
                _eprint(f"job {job.id} submitted ({job.queue} queue)")
            return _wait(mp, args, job.id)
    if args.json:
        _print_json(job)
    else:
        _print(
            f"job {job.id} {job.status} ({job.queue} queue): {_steps_text(job.steps)}\n"
            f"follow it: modelpress status {job.id}   or: modelpress wait {job.id}"
        )
    return EXIT_OK


def jobs_table(jobs: list[Any]) -> Table:
    """The jobs list. At 80 columns: the artifact's size, then the date, the stage and the steps
    go; the name ends in "…"; the id is always whole. A live job's fraction is in its status."""
    from modelpress._term import Table

    t = Table()
    t.add_column("id")
    t.add_column("name", overflow="ellipsis", min_width=8, drop=1)
    t.add_column("status")
    t.add_column("steps", overflow="ellipsis", min_width=11, drop=2)
    t.add_column("stage", overflow="ellipsis", min_width=10, drop=3)
    t.add_column("created", drop=4)
    t.add_column("artifact", justify="right", drop=5)
    for j in jobs:
        live = j.status in ("queued", "running") and j.progress.fraction > 0
        t.add_row(
            j.id,
            j.name or "",
            f"{j.status} {j.progress.fraction * 100:.0f}%" if live else j.status,
            " → ".join(s.method for s in j.steps),  # the parameters: `modelpress jobs show JOB`
            (j.progress.stage or "") if not j.done else "",
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _size(j.artifact.size_bytes) if j.artifact else "",
        )
    return t


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        jobs = list(mp.jobs(status=args.status, limit=args.limit))
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    _print(jobs_table(jobs))
    if not jobs:
        _print("no jobs" + (f" with status {args.status}" if args.status else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        _report_job(args, mp.get_job(args.job))
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        return _wait(mp, args, args.job)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        _report_job(args, mp.cancel(args.job))
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    import functools
    from pathlib import Path

    dest = Path(args.output)
    if args.output.endswith(("/", "\\")) or args.output in (".", "..") or not dest.suffix:
        dest.mkdir(parents=True, exist_ok=True)  # a folder: the artifact keeps its own name
    with _client(args) as mp:
        if args.file:
            fetch = functools.partial(mp.download_file, args.job, args.file, dest)
        else:
            fetch = functools.partial(mp.download, args.job, dest)
        if args.json:
            _print_json(fetch())
            return EXIT_OK
        with _transfer_progress(f"download {args.job[:8]}") as bar:
            got = fetch(on_progress=bar.update)
    resumed = f", resumed at {_size(got.resumed_from)}" if got.resumed_from else ""
    # A file of a zip is checked against the zip's CRC-32 (no sha256 of it exists on the server).
    checked = "verified" if not args.file else "(checked against the server's sha256 or CRC-32)"
    _print(f"saved {got.path} ({_size(got.size_bytes)}, sha256 {got.sha256} {checked}{resumed})")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        if args.open:
            import webbrowser

            url = mp.report_link(args.job, ttl_s=args.ttl)
            if args.json:
                _print_json({"url": url})
            else:
                _print(url)
            webbrowser.open(url)
            return EXIT_OK
        rep = mp.report(args.job)
    if args.json:
        _print_json(rep)
    else:
        _print(_report_table(rep))
        note = (rep.speed or {}).get("note")
        if note:
            _print(_fill(f"speed: {note}"))
    return EXIT_OK


# -- API keys (``modelpress keys ...`` through the API; app/cli.py dispatches) -------------------


def through_api(args: argparse.Namespace) -> bool:
    """Whether a ``keys`` command goes through the API: only when its own command line says so."""
    return bool(getattr(args, "url", None) or getattr(args, "api_key", None))


def key_prefix_or_id(key: str) -> str:
    """What names a key to the server: the prefix of a whole key (its secret never leaves this
    machine), else what was given (an id or a prefix)."""
    parts = key.strip().split("_", 2)
    return parts[1] if len(parts) == 3 and parts[0] == "mp" and parts[1] else key.strip()


def print_keys(keys: list[Any], as_json: bool) -> None:
    """A table of keys (or their JSON): the API's objects, or dicts of the same fields."""
    rows = [_dump(k) for k in keys]
    if as_json:
        _print_json(rows)
        return
    from modelpress._term import Table

    t = Table()
    t.add_column("id")
    t.add_column("prefix")
    t.add_column("tenant", overflow="ellipsis", min_width=8)
    t.add_column("scopes", drop=1)
    t.add_column("created", drop=2)
    t.add_column("revoked")
    for k in rows:
        t.add_row(
            k["id"],
            k["prefix"],
            k["tenant"],
            ",".join(k.get("scopes") or []) or "-",
            str(k["created_at"])[:16].replace("T", " "),  # to the minute: a revoked key's row fits 80 columns
            str(k["revoked_at"] or "")[:16].replace("T", " "),
        )
    _print(t)
    if not rows:
        _print("no keys")


def print_revoked(key: Any, as_json: bool) -> None:
    k = _dump(key)
    if as_json:
        _print_json(k)
    else:
        _print(f"key {k['prefix']} (id {k['id']}, tenant {k['tenant']}) revoked at {k['revoked_at']}")


def print_created(key: Any, as_json: bool) -> None:
    k = _dump(key)
    if as_json:
        _print_json(k)
    else:
        print(k["key"])  # plain: scripts capture it (KEY=$(modelpress keys create ...))


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        keys = list(mp.keys(tenant=args.tenant, all_tenants=args.all_tenants, limit=args.limit))
    print_keys(keys, args.json)
    return EXIT_OK


def find_key(keys: list[Any], key: str) -> Any | None:
    """The key named by an id, a prefix or the whole key (only its prefix is compared)."""
    wanted = key_prefix_or_id(key)
    return next((k for k in keys if wanted in (_dump(k)["id"], _dump(k)["prefix"])), None)


def print_key(key: Any, as_json: bool) -> None:
    k = _dump(key)
    if as_json:
        _print_json(k)
        return
    t = _kv_table()
    for field in ("id", "prefix", "tenant", "scopes", "created_at", "revoked_at"):
        value = k.get(field)
        t.add_row(field, ",".join(value) or "-" if isinstance(value, list) else str(value or "-"))
    _print(t)


def cmd_keys_show(args: argparse.Namespace) -> int:
    # No one-key route: the key is found in the list the caller may read (--all: every tenant's).
    with _client(args) as mp:
        key = find_key(list(mp.keys(all_tenants=args.all_tenants)), args.key)
    if key is None:
        _eprint(f"Error: no key {key_prefix_or_id(args.key)} among the keys this API key may list")
        return EXIT_API
    print_key(key, args.json)
    return EXIT_OK


def cmd_keys_create(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        print_created(mp.create_key(args.tenant, admin=args.admin), args.json)
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        print_revoked(mp.revoke_key(key_prefix_or_id(args.key)), args.json)
    return EXIT_OK


# -- error handling and the parser -------------------------------------------------------------


def _fail(args: argparse.Namespace, code: int, line: str, error: dict[str, Any]) -> int:
    if getattr(args, "json", False):
        _print_json({"error": error})
    print(line, file=sys.stderr)
    return code


def run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a client command; map exceptions to the documented exit codes."""
    from modelpress import APIError, ChecksumMismatch, TransportError

    # app.cli configures logging at INFO for the server; httpx would log every request.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return fn(args)
    except APIError as e:
        lines = [f"Error: {e.title}: {e.detail}"]
        for err in e.errors or []:
            loc = ".".join(str(p) for p in err.get("loc", []))
            # The method's limit it broke (`modelpress methods show METHOD` lists them).
            limit = f" [limit: {err['constraint']}]" if err.get("constraint") else ""
            lines.append(f"  {loc}: {err.get('msg', '')}{limit}")
        return _fail(
            args,
            EXIT_API,
            "\n".join(lines),
            {"status": e.status, "code": e.code, "title": e.title, "detail": e.detail, "errors": e.errors},
        )
    except TransportError as e:
        return _fail(
            args, EXIT_TRANSPORT, f"Error: transport error: {e}", {"code": "transport_error", "detail": str(e)}
        )
    except ChecksumMismatch as e:
        return _fail(
            args, EXIT_TRANSPORT, f"Error: checksum mismatch: {e}", {"code": "checksum_mismatch", "detail": str(e)}
        )
    except (ValueError, OSError) as e:
        return _fail(args, EXIT_USAGE, f"Error: {e}", {"code": "usage", "detail": str(e)})
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        return run(fn, args)

    call.__name__ = fn.__name__
    return call


def common_flags() -> argparse.ArgumentParser:
    """The ``--url`` / ``--api-key`` / ``--json`` / ``--output`` parent parser (app/cli.py's ``keys`` uses it)."""
    return _common()


class _OutputAction(argparse.Action):
    """``--output json`` is ``--json``; ``--output table`` (the default) undoes an earlier ``--json``."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        namespace.json = values == "json"


def _common(*, nested: bool = False, output: bool = True) -> argparse.ArgumentParser:
    """The flags every client command takes. ``nested``: for a command under a group (``models
    show``), whose group parser has the same flags: argparse copies a subcommand's defaults over
    what the group parsed, so here they are suppressed (``models --json show ID`` keeps --json).
    ``output=False``: no ``--output`` (``download``'s ``-o/--output`` is where the file goes)."""
    unset = argparse.SUPPRESS if nested else None
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("connection and output")
    g.add_argument("--url", default=unset, help="server URL (default $MODELPRESS_URL, else http://127.0.0.1:8000)")
    g.add_argument("--api-key", default=unset, help="API key (default $MODELPRESS_API_KEY)")
    g.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if nested else False,
        help="print JSON only, for scripts (no tables or progress bars)",
    )
    if output:
        g.add_argument(
            "--output",
            action=_OutputAction,
            dest="json",
            choices=("table", "json"),
            default=argparse.SUPPRESS,
            help="table (the default) or json (the same as --json)",
        )
    return c


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout", type=float, default=None, help="give up waiting after S seconds (exit 5; the job goes on)"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")


def _limit_flag(p: argparse.ArgumentParser, what: str, *, nested: bool = False) -> None:
    p.add_argument(
        "--limit", type=int, default=argparse.SUPPRESS if nested else 20, help=f"at most N {what} (default 20)"
    )


def _yes_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="do not ask (needed where there is no terminal to ask on)")


_Command = Callable[[argparse.Namespace], int]
_Subparsers = argparse._SubParsersAction  # the type of ArgumentParser.add_subparsers()


class _Add(Protocol):
    """add(name, command, help, epilog) -> the command's parser (see add_client_commands)."""

    def __call__(
        self, name: str, fn: _Command, help_: str, epilog: str = "", *, output: bool = True
    ) -> argparse.ArgumentParser: ...


def _adder(sub: _Subparsers[argparse.ArgumentParser], *, nested: bool) -> _Add:
    def add(name: str, fn: _Command, help_: str, epilog: str = "", *, output: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[_common(nested=nested, output=output)],
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(fn=_command(fn))
        return p

    return add


def _group(p: argparse.ArgumentParser, dest: str) -> _Add:
    """The subcommands of a group (``models list``): the group alone runs its own command (list)."""
    return _adder(p.add_subparsers(dest=dest, title="commands"), nested=True)


def add_client_commands(parser: argparse.ArgumentParser, sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """Add the client subcommands, ``--version`` and ``completion`` to the ``modelpress`` parser."""
    from modelpress._version import __version__

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("-V", "--version", action="version", version=f"modelpress {__version__}")
    add = _adder(sub, nested=False)

    _add_upload_commands(add)
    _add_models_commands(add)
    _add_datasets_commands(add)
    _add_compress_command(add)
    _add_jobs_commands(add)
    _add_job_commands(add)
    _add_result_commands(add)
    _add_sweeps_and_methods_commands(add)
    _add_completion_command(sub)


_UPLOAD_HELP = "upload a model, resumably: a Hugging Face directory or one .safetensors file"
_UPLOAD_EPILOG = (
    "Sends the regular files directly in the directory. Before any byte is sent it lists, on stderr, what it\n"
    "skips and why: hidden files, subdirectories, --exclude / --include, and what the server refuses (pickle\n"
    "weights *.bin *.pt *.pth *.ckpt ..., other weights *.h5 *.msgpack *.gguf *.onnx ..., archives, any type\n"
    "but .safetensors .json .txt .jinja .md, e.g. tokenizer.model).\n"
    "Resumable: each file goes in --chunk-size chunks (sha256-checked) to /v1/uploads; after Ctrl-C or a cut\n"
    "connection, run the same command again and only the bytes the server lacks are sent (a file whose size\n"
    "or mtime changed starts over). The uploads are remembered in $MODELPRESS_CACHE_DIR (default\n"
    "~/.cache/modelpress)/uploads/, never in the model folder.\n"
    "examples:\n"
    "  modelpress models upload gpt2/ --name tiny-gpt2\n"
    "  modelpress models upload llama/ --exclude 'original*' --dry-run\n"
    "  modelpress upload weights.safetensors          (the same command, by its older name)"
)


def _upload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="model directory or .safetensors file")
    p.add_argument("--name", help="model name (default: the server's)")
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="send only files matching GLOB (relative to the directory; repeatable)",
    )
    p.add_argument(
        "--exclude", action="append", metavar="GLOB", help="skip files matching GLOB (repeatable; wins over --include)"
    )
    p.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=None,
        metavar="SIZE",
        help="bytes per request, e.g. 16MiB (the default), 8M, 1048576",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be sent and skipped; send nothing")
    p.add_argument("--restart", action="store_true", help="forget an earlier interrupted upload; start over")


def _chunk_size(text: str) -> int:
    from modelpress._upload import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_DATASET_HELP = 'upload a dataset: .txt (a sample a line) or .jsonl ({"text", "label"?})'


def _add_upload_commands(add: _Add) -> None:
    p = add("upload", cmd_upload, _UPLOAD_HELP, _UPLOAD_EPILOG)
    _upload_args(p)

    p = add(
        "upload-dataset",
        cmd_upload_dataset,
        _DATASET_HELP,
        "example: modelpress upload-dataset calib.txt   (then: compress ... --dataset ID)\n"
        "(also: modelpress datasets upload FILE, the same command)",
    )
    p.add_argument("path", help=".txt or .jsonl file")
    p.add_argument("--name", help="dataset name")


def _add_models_commands(add: _Add) -> None:
    from modelpress import _cli_resources as res

    p = add(
        "models",
        cmd_models,
        "models: list them (the default), show, delete, upload (resumable), import (the server fetches one)",
        "examples:\n  modelpress models --limit 50        (the same as: modelpress models list --limit 50)\n"
        "  modelpress models show MODEL\n  modelpress models delete MODEL --yes\n"
        "  modelpress models upload gpt2/ --name tiny-gpt2\n"
        "  modelpress models import llama s3://bucket/llama/ --wait",
    )
    _limit_flag(p, "models")
    sub = _group(p, "models_command")
    _limit_flag(sub("list", cmd_models, "list models, newest first"), "models", nested=True)
    q = sub("show", res.cmd_models_show, "show one model: format, architecture, parameters, size, files")
    q.add_argument("model", metavar="MODEL", help="the model's id")
    q = sub(
        "delete",
        res.cmd_models_delete,
        "delete a model and its files (DELETE /v1/models/MODEL)",
        "Asks first on a terminal; elsewhere it needs --yes. The server refuses (exit 3, Conflict) while a\n"
        "queued or running job uses the model.",
    )
    q.add_argument("model", metavar="MODEL", help="the model's id")
    _yes_flag(q)
    _upload_args(sub("upload", cmd_upload, _UPLOAD_HELP, _UPLOAD_EPILOG))
    q = sub(
        "import",
        cmd_models_import,
        "have the server fetch a model from S3 or an https URL (POST /v1/models/import)",
        "The model is listed at once with status importing; --wait follows it (bytes fetched) until it is\n"
        "ready (exit 0) or failed (exit 1, with the server's reason); --timeout ends the wait (exit 5),\n"
        "not the import.\n"
        "examples:\n  modelpress models import llama s3://bucket/models/llama/ --wait\n"
        "  modelpress models import gpt2 https://example.org/gpt2/ --json",
    )
    q.add_argument("name", metavar="NAME", help="model name")
    q.add_argument("source", metavar="SOURCE", help="s3://bucket/prefix/ or an https:// URL")
    q.add_argument("--wait", action="store_true", help="wait until the import is ready or failed, showing progress")
    _wait_flags(q)


def _add_datasets_commands(add: _Add) -> None:
    from modelpress import _cli_resources as res

    p = add(
        "datasets",
        res.cmd_datasets_list,
        "datasets: list them (the default), show, delete, upload",
        "examples:\n  modelpress datasets\n  modelpress datasets upload calib.txt --name calib\n"
        "  modelpress datasets show DATASET --output json\n  modelpress datasets delete DATASET --yes",
    )
    _limit_flag(p, "datasets")
    sub = _group(p, "datasets_command")
    _limit_flag(sub("list", res.cmd_datasets_list, "list datasets, newest first"), "datasets", nested=True)
    q = sub("show", res.cmd_datasets_show, "show one dataset: format, samples, labels, size")
    q.add_argument("dataset", metavar="DATASET", help="the dataset's id")
    q = sub(
        "delete",
        res.cmd_datasets_delete,
        "delete a dataset (DELETE /v1/datasets/DATASET)",
        "Asks first on a terminal; elsewhere it needs --yes. The server refuses (exit 3, Conflict) while a\n"
        "queued or running job uses the dataset.",
    )
    q.add_argument("dataset", metavar="DATASET", help="the dataset's id")
    _yes_flag(q)
    q = sub("upload", cmd_upload_dataset, _DATASET_HELP, "(also: modelpress upload-dataset FILE, the same command)")
    q.add_argument("path", help=".txt or .jsonl file")
    q.add_argument("--name", help="dataset name")


def _add_compress_command(add: _Add) -> None:
    p = add(
        "compress",
        cmd_compress,
        "submit a compression job (steps run in order)",
        "examples:\n"
        "  modelpress compress MODEL_ID --step prune.magnitude:sparsity=0.5 --step quantize.weight_only:bits=8 --wait\n"
        '  modelpress compress MODEL_ID --step \'prune.wanda:mask="2:4",ignore=["lm_head"]\' --dataset DATASET_ID\n'
        '  modelpress compress MODEL_ID --step \'{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}\'\n'
        "  modelpress compress MODEL_ID --recipe w4-best --dataset DATASET_ID --wait\n"
        "methods and their parameters: modelpress methods; named recipes: modelpress methods recipes\n"
        "exit codes with --wait: 0 succeeded, 1 failed or canceled, 5 --timeout ran out",
    )
    p.add_argument("model_id", metavar="MODEL_ID")
    p.add_argument("--step", action="append", default=[], metavar="SPEC", help=STEP_HELP + " (none: --export alone)")
    p.add_argument("--recipe", metavar="NAME", help=_RECIPE_HELP)
    p.add_argument("--dataset", metavar="ID", help="calibration / training dataset id (methods that need data)")
    p.add_argument("--eval-dataset", metavar="ID", help="dataset the report measures quality on")
    p.add_argument("--name", help="job name")
    p.add_argument(
        "--evaluation", metavar="JSON", help='how the report measures, e.g. \'{"runs": 3, "max_samples": 8}\''
    )
    p.add_argument(
        "--no-eval", action="store_true", help="report sizes and sparsity only (no speed, quality, fidelity)"
    )
    p.add_argument("--export", metavar="FORMAT[:key=value]", help=_EXPORT_HELP)
    p.add_argument("--wait", action="store_true", help="wait for the job, showing its stage and progress live")
    _wait_flags(p)


_EXPORT_HELP = (
    "the artifact's format: safetensors (default), gguf[:type=F16|BF16|Q8_0|Q4_0|Q4_K_M] (llama.cpp) or "
    "onnx[:quantize=int8_dynamic|int8_static[,reduce_range=false]] (ONNX Runtime; reduce_range=false: 8-bit "
    "weights, for VNNI/ARM CPUs); docs/EXPORTS.md"
)


def _jobs_filters(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
    p.add_argument(
        "--status",
        choices=["queued", "running", "succeeded", "failed", "canceled"],
        default=argparse.SUPPRESS if nested else None,
    )
    _limit_flag(p, "jobs", nested=nested)


def _add_jobs_commands(add: _Add) -> None:
    from modelpress import _cli_resources as res

    p = add(
        "jobs",
        cmd_jobs,
        "jobs: list them (the default), show, watch, wait, cancel, delete, report, estimate, download",
        "examples:\n  modelpress jobs --status running --limit 50      (the same as: modelpress jobs list ...)\n"
        "  modelpress jobs watch JOB\n"
        "  modelpress jobs estimate MODEL_ID --step prune.magnitude:sparsity=0.5 --no-eval\n"
        "  modelpress jobs delete JOB --yes      (a finished job: cancel a queued or running one first)",
    )
    _jobs_filters(p)
    sub = _group(p, "jobs_command")
    _jobs_filters(sub("list", cmd_jobs, "list jobs, newest first"), nested=True)
    sub("show", cmd_status, "show one job (also: modelpress status JOB)").add_argument("job", metavar="JOB")
    q = sub("watch", res.cmd_watch, _WATCH_HELP, _WATCH_EPILOG)
    q.add_argument("job", metavar="JOB")
    _wait_flags(q)
    q = sub("wait", cmd_wait, "wait for a job to finish (also: modelpress wait JOB)", _WAIT_EPILOG)
    q.add_argument("job", metavar="JOB")
    _wait_flags(q)
    q = sub("cancel", cmd_cancel, "cancel a job (also: modelpress cancel JOB)", _CANCEL_EPILOG)
    q.add_argument("job", metavar="JOB")
    q = sub(
        "delete",
        res.cmd_jobs_delete,
        "delete a finished job and its artifact (DELETE /v1/jobs/JOB)",
        "Asks first on a terminal; elsewhere it needs --yes. The server refuses (exit 3, Conflict) while the\n"
        "job is queued or running (cancel it first), and for a sweep's point (delete the sweep).",
    )
    q.add_argument("job", metavar="JOB", help="the job's id")
    _yes_flag(q)
    _report_args(sub("report", cmd_report, _REPORT_HELP + " (also: modelpress report JOB)", _REPORT_EPILOG))
    e = sub(
        "estimate",
        cmd_estimate,
        "a job's plan without running it: peak memory, scratch disk, artifact bytes, seconds",
        "Takes the arguments of `compress` (POST /v1/jobs/estimate takes the body of POST /v1/jobs).\n"
        "example: modelpress jobs estimate MODEL_ID --step quantize.weight_only:bits=4 --no-eval --json",
    )
    e.add_argument("model_id", metavar="MODEL_ID")
    e.add_argument("--step", action="append", default=[], metavar="SPEC", help=STEP_HELP + " (none: --export alone)")
    e.add_argument("--recipe", metavar="NAME", help=_RECIPE_HELP)
    e.add_argument("--dataset", metavar="ID", help="calibration / training dataset id (methods that need data)")
    e.add_argument("--eval-dataset", metavar="ID", help="dataset the report measures quality on")
    e.add_argument("--evaluation", metavar="JSON", help="how the report measures, e.g. '{\"budget_s\": 10}'")
    e.add_argument("--no-eval", action="store_true", help="plan without the report's evaluation")
    e.add_argument("--export", metavar="FORMAT[:key=value]", help=_EXPORT_HELP)
    _download_args(sub("download", cmd_download, _DOWNLOAD_HELP, _DOWNLOAD_EPILOG, output=False))


_WATCH_HELP = "follow a job live until it ends: a progress bar with its stage (and sample i/N)"
_WATCH_EPILOG = (
    "On a terminal: a bar on stderr with the fraction done and the worker's stage (e.g. 'evaluating\n"
    "compressed model: sample 3/8'); elsewhere a line per new stage or tenth of the way, for logs.\n"
    "Then the job's table on stdout. With --output json: one JSON object per change (JSON Lines), the\n"
    "last one the finished job. Exit codes: 0 succeeded, 1 failed or canceled, 5 --timeout ran out.\n"
    "example: modelpress jobs watch JOB   (also: modelpress watch JOB)"
)
_WAIT_EPILOG = "exit codes: 0 succeeded, 1 failed or canceled, 5 --timeout ran out"
_CANCEL_EPILOG = "A finished job cannot be canceled: exit 3 with 'Error: Conflict: ...'."


def _add_job_commands(add: _Add) -> None:
    """status, watch, wait and cancel: one job each (``jobs show|watch|wait|cancel`` are the same)."""
    from modelpress import _cli_resources as res

    p = add("status", cmd_status, "show one job", "example: modelpress status JOB --json")
    p.add_argument("job", metavar="JOB")

    p = add("watch", res.cmd_watch, _WATCH_HELP, _WATCH_EPILOG)
    p.add_argument("job", metavar="JOB")
    _wait_flags(p)

    p = add("wait", cmd_wait, "wait for a job to finish, showing its stage and progress live", _WAIT_EPILOG)
    p.add_argument("job", metavar="JOB")
    _wait_flags(p)

    p = add("cancel", cmd_cancel, "cancel a job (a running one stops at its next step)", _CANCEL_EPILOG)
    p.add_argument("job", metavar="JOB")


_DOWNLOAD_HELP = "download a succeeded job's artifact (resumable, sha256-verified)"
_DOWNLOAD_EPILOG = (
    "Writes DEST.part (and DEST.part.etag, the artifact it holds) and renames it once its sha256 matches;\n"
    "run again to resume a broken download (a .part of another artifact starts over, never appended to).\n"
    "example: modelpress jobs download JOB -o out/   (out/model.zip, or out/model.safetensors)\n"
    "         modelpress download JOB -o out/        (the same)"
)


def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB")
    p.add_argument(
        "-o",
        "--output",
        default=".",
        metavar="DEST",
        help="a folder (default: the current one; created if missing), or a file path with a suffix",
    )
    p.add_argument(
        "--file",
        metavar="NAME",
        help="only this file of the artifact (e.g. config.json; GET /v1/jobs/JOB/artifact/files lists them)",
    )


_REPORT_HELP = "show what a job changed: size, sparsity, speed, quality, fidelity"
_REPORT_EPILOG = (
    "--open asks for a signed link to the HTML report (no API key needed), prints it and opens it in a browser.\n"
    "example: modelpress report JOB --open"
)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB")
    p.add_argument("--open", action="store_true", help="open the HTML report in a browser (prints the signed URL)")
    p.add_argument("--ttl", type=int, default=None, metavar="S", help="with --open: seconds the link stays valid")


def _add_result_commands(add: _Add) -> None:
    """download and report: what a succeeded job made."""
    _download_args(add("download", cmd_download, _DOWNLOAD_HELP, _DOWNLOAD_EPILOG, output=False))
    _report_args(add("report", cmd_report, _REPORT_HELP, _REPORT_EPILOG))


def _add_sweeps_and_methods_commands(add: _Add) -> None:
    from modelpress import _cli_resources as res

    p = add(
        "sweeps",
        res.cmd_sweeps_list,
        "sweeps: list them (the default), show one with its points and Pareto frontier, delete",
        "examples:\n  modelpress sweeps\n  modelpress sweeps show SWEEP\n  modelpress sweeps delete SWEEP --yes\n"
        "sweeps are created with the SDK (Client.sweep) or POST /v1/sweeps.",
    )
    _limit_flag(p, "sweeps")
    sub = _group(p, "sweeps_command")
    _limit_flag(sub("list", res.cmd_sweeps_list, "list sweeps, newest first"), "sweeps", nested=True)
    q = sub("show", res.cmd_sweeps_show, "show a sweep: what it varies, its points, which are on the frontier (*)")
    q.add_argument("sweep", metavar="SWEEP", help="the sweep's id")
    q = sub(
        "delete",
        res.cmd_sweeps_delete,
        "delete a sweep and its points' jobs with their artifacts (DELETE /v1/sweeps/SWEEP)",
        "Asks first on a terminal; elsewhere it needs --yes. The server refuses (exit 3, Conflict) while a\n"
        "point's job is queued or running (cancel them first).",
    )
    q.add_argument("sweep", metavar="SWEEP", help="the sweep's id")
    _yes_flag(q)

    p = add(
        "methods",
        res.cmd_methods_list,
        "compression methods: list them (the default), show one's parameters and limits",
        "examples:\n  modelpress methods\n  modelpress methods show quantize.weight_only",
    )
    sub = _group(p, "methods_command")
    sub("list", res.cmd_methods_list, "list the methods: what each needs and does")
    sub(
        "recipes",
        res.cmd_methods_recipes,
        "the named recipes (GET /v1/recipes): per target the recommended one, with its measured figures",
    )
    q = sub("show", res.cmd_methods_show, "show a method: its description and every parameter (type, default)")
    q.add_argument("method", metavar="METHOD", help="e.g. prune.magnitude")


def _add_completion_command(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    from modelpress import _cli_resources as res

    help_ = "print a shell completion script: bash, zsh or fish"
    p = sub.add_parser(
        "completion",
        help=help_,
        description=help_,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="install it:\n" + "\n".join(f"  {shell}: {line}" for shell, line in res.INSTALL.items()),
    )
    p.add_argument("shell", choices=res.SHELLS)
    p.set_defaults(fn=_command(res.cmd_completion), json=False)
