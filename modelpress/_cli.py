"""The client subcommands of the ``modelpress`` console script (``app/cli.py`` adds them to its
parser with :func:`add_client_commands`; the logic is here, on :class:`modelpress.Client`).

    modelpress models upload PATH [--name N] [--include GLOB ...] [--exclude GLOB ...] [--chunk-size SIZE]
                        [--dry-run] [--restart]       a model directory or one .safetensors file, resumable
                                                       (also: modelpress upload PATH ..., the same command)
    modelpress models [--limit N]                      list models
    modelpress models import NAME SOURCE [--wait [--timeout S]]   the server fetches s3://... or https://...
    modelpress upload-dataset FILE [--name N]          a .txt or .jsonl dataset
    modelpress compress MODEL_ID --step SPEC [--step SPEC ...] [--dataset ID] [--eval-dataset ID]
                        [--name N] [--no-eval | --evaluation JSON] [--wait [--timeout S]]
    modelpress jobs [--status S] [--limit N]
    modelpress jobs estimate MODEL_ID --step SPEC [--step SPEC ...] [--dataset ID] [--eval-dataset ID]
                        [--no-eval | --evaluation JSON]
    modelpress status JOB
    modelpress wait JOB [--timeout S]
    modelpress cancel JOB
    modelpress download JOB [-o DEST] [--file NAME]    (also: modelpress jobs download ...)
    modelpress report JOB [--open [--ttl S]]
    modelpress keys list [--tenant NAME | --all] [--limit N]      (with --url / --api-key: through the API)
    modelpress keys create --tenant NAME [--admin]
    modelpress keys revoke KEY                                    (an id, a prefix or the whole key)

``keys`` is shared with the server CLI (app/cli.py): without ``--url`` or ``--api-key`` on its
command line it works on the server's database (the operator, where the server runs); with either,
it goes through the API with that (admin) key, like every command here. The environment
(``$MODELPRESS_URL``, ``$MODELPRESS_API_KEY``) fills in the other flag but never chooses the path.

Every one takes ``--url`` (else ``$MODELPRESS_URL``, else http://127.0.0.1:8000), ``--api-key``
(else ``$MODELPRESS_API_KEY``) and ``--json``. Human output is plain-text tables on stdout
(modelpress/_term.py); progress bars (tqdm, on a terminal only) and the live ``--wait`` line go to
stderr. ``--json`` prints JSON only on stdout (the API's
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tqdm and the client are imported only when a command runs
    from modelpress._client import Client
    from modelpress._term import Table, TransferBar

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_API, EXIT_TRANSPORT, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

EPILOG = """\
client commands (talk to a running service over HTTP):
  models, models upload (or upload), models import, upload-dataset, compress, jobs, jobs estimate,
  jobs download, status, wait, cancel, download, report;
  keys list|create|revoke when given --url or --api-key (without: on the server's database)
  The server URL and API key come from --url / --api-key, else $MODELPRESS_URL
  (default http://127.0.0.1:8000) / $MODELPRESS_API_KEY. --json prints JSON only.

example:
  export MODELPRESS_URL=http://127.0.0.1:8000 MODELPRESS_API_KEY=$(cat var/api-key)
  modelpress models upload gpt2/        (resumable: after Ctrl-C, run it again)
  modelpress compress MODEL_ID --step prune.magnitude:sparsity=0.5 --step quantize.cast:dtype=bfloat16 --wait
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


# No rich: it pulls Pygments (9.5 MiB of the SDK's install) for highlighting we never use. Output is
# plain text (modelpress/_term.py): tables never wrap or cut, so ids stay whole when piped.


def _print(text: Any = "") -> None:
    print(str(text), flush=True)


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
    t.add_column()
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
    t.add_row("queue / attempt", f"{job.queue or '—'} / {job.attempt}")
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
        t.add_row(
            "artifact", f"{job.artifact.filename}, {_size(job.artifact.size_bytes)}, sha256 {job.artifact.sha256}"
        )
    size = (job.metrics or {}).get("size") or {}
    if size.get("compression_ratio"):
        t.add_row(
            "size",
            f"{_size(size.get('original_bytes'))} → {_size(size.get('artifact_bytes'))} "
            f"({size['compression_ratio']:.3g}× smaller)",
        )
    if job.plan:
        t.add_row("plan", _plan_line(job.plan))
    return t


def _plan_line(plan: Any) -> str:
    return (
        f"{plan.path} path: peak memory {_size(plan.peak_memory_bytes)}, scratch {_size(plan.scratch_bytes)}, "
        f"artifact {_size(plan.artifact_bytes)}, ~{plan.seconds:,.0f} s"
    )


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
    t.add_column("metric")
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("change")
    size = rep.size or {}
    ratio = size.get("compression_ratio")
    t.add_row(
        "size",
        "artifact bytes",
        _size(size.get("original_bytes")),
        _size(size.get("artifact_bytes")),
        f"{ratio:.3g}× smaller" if isinstance(ratio, (int, float)) else "",
    )
    if size.get("original_weight_bytes") is not None:
        wr = size.get("weight_bytes_ratio")
        t.add_row(
            "",
            "weight bytes",
            _size(size.get("original_weight_bytes")),
            _size(size.get("artifact_weight_bytes")),
            f"{wr:.3g}×" if isinstance(wr, (int, float)) else "",
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
    if s.get("speedup") is not None:
        change = f"{s['speedup']:.3g}× faster" if s["speedup"] >= 1 else f"{1 / s['speedup']:.3g}× slower"
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


def _client(args: argparse.Namespace) -> Client:
    from modelpress import Client

    return Client(args.url, args.api_key)


def _model_line(model: Any) -> str:
    params = f"{model.parameters:,} parameters" if model.parameters is not None else "parameters unknown"
    return (
        f"{model.name}, {model.format or '—'}, {model.architecture or 'no architecture'}, "
        f"{params}, {_size(model.size_bytes)}"
    )


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
    for col in ("id", "name", "format", "status", "size", "created"):
        t.add_column(col)
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


def _wait(mp: Any, args: argparse.Namespace, job_id: str) -> int:
    from modelpress import JobError, WaitTimeout

    try:
        if args.json:
            job = mp.wait(job_id, timeout=args.timeout, poll_interval=args.poll)
        else:
            from modelpress._term import StageBar

            # The live line on stderr: a tqdm bar on a terminal, else the last stage line at the end.
            with StageBar(f"job {job_id}") as live:
                job = mp.wait(
                    job_id,
                    timeout=args.timeout,
                    poll_interval=args.poll,
                    on_progress=lambda j: live.update(j.progress.fraction, _stage_line(j)),
                )
    except WaitTimeout as e:
        _report_job(args, e.job)
        print(
            f"Error: timed out: job {e.job.id} is still {e.job.status} after {args.timeout} s "
            f"(it goes on; `modelpress wait {e.job.id}`)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    except JobError as e:
        _report_job(args, e.job)
        err = e.job.error
        print(
            f"Error: job {e.job.status}: " + (f"{err.code}: {err.message}" if err else f"job {e.job.id}"),
            file=sys.stderr,
        )
        return EXIT_JOB_FAILED
    _report_job(args, job)
    return EXIT_OK


def _report_job(args: argparse.Namespace, job: Any) -> None:
    if args.json:
        _print_json(job)
    else:
        _print(_job_table(job))


def _evaluation(args: argparse.Namespace) -> dict[str, Any] | None:
    evaluation = None
    if args.evaluation:
        evaluation = json.loads(args.evaluation)
        if not isinstance(evaluation, dict):
            raise ValueError("--evaluation must be a JSON object, e.g. '{\"runs\": 3}'")
    if args.no_eval:
        evaluation = {**(evaluation or {}), "enabled": False}
    return evaluation


def cmd_estimate(args: argparse.Namespace) -> int:
    steps = [parse_step(s) for s in args.step]
    with _client(args) as mp:
        est = mp.estimate(
            args.model_id,
            steps,
            dataset_id=args.dataset,
            eval_dataset_id=args.eval_dataset,
            evaluation=_evaluation(args),
        )
    if args.json:
        _print_json(est)
    else:
        _print(_estimate_table(est))
    return EXIT_OK


def cmd_compress(args: argparse.Namespace) -> int:
    steps = [parse_step(s) for s in args.step]
    evaluation = _evaluation(args)
    with _client(args) as mp:
        job = mp.submit(
            args.model_id,
            steps,
            name=args.name,
            dataset_id=args.dataset,
            eval_dataset_id=args.eval_dataset,
            evaluation=evaluation,
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


def cmd_jobs(args: argparse.Namespace) -> int:
    from modelpress._term import Table

    with _client(args) as mp:
        jobs = list(mp.jobs(status=args.status, limit=args.limit))
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    t = Table()
    for col in ("id", "name", "status", "progress", "steps", "created", "artifact"):
        t.add_column(col)
    for j in jobs:
        t.add_row(
            j.id,
            j.name or "",
            j.status,
            f"{j.progress.stage or ''} {j.progress.fraction * 100:.0f}%",
            _steps_text(j.steps),
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _size(j.artifact.size_bytes) if j.artifact else "",
        )
    _print(t)
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
            _print(f"speed: {note}")
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
    for col in ("id", "prefix", "tenant", "scopes", "created", "revoked"):
        t.add_column(col)
    for k in rows:
        t.add_row(
            k["id"],
            k["prefix"],
            k["tenant"],
            ",".join(k.get("scopes") or []) or "-",
            str(k["created_at"])[:19].replace("T", " "),
            str(k["revoked_at"] or "")[:19].replace("T", " "),
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
            lines.append(f"  {loc}: {err.get('msg', '')}")
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
    """The ``--url`` / ``--api-key`` / ``--json`` parent parser (app/cli.py's ``keys`` uses it)."""
    return _common()


def _common() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_argument_group("connection and output")
    g.add_argument("--url", default=None, help="server URL (default $MODELPRESS_URL, else http://127.0.0.1:8000)")
    g.add_argument("--api-key", default=None, help="API key (default $MODELPRESS_API_KEY)")
    g.add_argument("--json", action="store_true", help="print JSON only, for scripts (no tables or progress bars)")
    return c


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout", type=float, default=None, help="give up waiting after S seconds (exit 5; the job goes on)"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")


_Command = Callable[[argparse.Namespace], int]
# add(name, command, help, epilog) -> the command's parser (see add_client_commands)
_Add = Callable[[str, _Command, str, str], argparse.ArgumentParser]
_Subparsers = argparse._SubParsersAction  # the type of ArgumentParser.add_subparsers()


def add_client_commands(parser: argparse.ArgumentParser, sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """Add the client subcommands to the ``modelpress`` parser and its subparsers."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    common = [_common()]

    def add(name: str, fn: _Command, help_: str, epilog: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=common,
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(fn=_command(fn))
        return p

    _add_upload_commands(add)
    _add_models_commands(add, common)
    _add_compress_command(add)
    _add_jobs_commands(add, common)
    _add_job_commands(add)
    _add_result_commands(add)


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


def _add_upload_commands(add: _Add) -> None:
    p = add("upload", cmd_upload, _UPLOAD_HELP, _UPLOAD_EPILOG)
    _upload_args(p)

    p = add(
        "upload-dataset",
        cmd_upload_dataset,
        'upload a dataset: .txt (a sample a line) or .jsonl ({"text", "label"?})',
        "example: modelpress upload-dataset calib.txt   (then: compress ... --dataset ID)",
    )
    p.add_argument("path", help=".txt or .jsonl file")
    p.add_argument("--name", help="dataset name")


def _add_models_commands(add: _Add, common: list[argparse.ArgumentParser]) -> None:
    p = add(
        "models",
        cmd_models,
        "list models, newest first; `models upload` uploads one (resumable), `models import` has the server fetch one",
        "examples:\n  modelpress models --limit 50\n  modelpress models upload gpt2/ --name tiny-gpt2\n"
        "  modelpress models import llama s3://bucket/llama/ --wait",
    )
    p.add_argument("--limit", type=int, default=20, help="at most N models (default 20)")
    models_sub = p.add_subparsers(dest="models_command", metavar="{upload,import}")

    def sub(name: str, fn: _Command, help_: str, epilog: str) -> argparse.ArgumentParser:
        q = models_sub.add_parser(
            name,
            parents=common,
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        q.set_defaults(fn=_command(fn))
        return q

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


def _add_compress_command(add: _Add) -> None:
    p = add(
        "compress",
        cmd_compress,
        "submit a compression job (steps run in order)",
        "examples:\n"
        "  modelpress compress MODEL_ID --step prune.magnitude:sparsity=0.5 --step quantize.weight_only:bits=8 --wait\n"
        '  modelpress compress MODEL_ID --step \'prune.wanda:mask="2:4",ignore=["lm_head"]\' --dataset DATASET_ID\n'
        '  modelpress compress MODEL_ID --step \'{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}\'\n'
        "methods and their parameters: GET /v1/methods\n"
        "exit codes with --wait: 0 succeeded, 1 failed or canceled, 5 --timeout ran out",
    )
    p.add_argument("model_id", metavar="MODEL_ID")
    p.add_argument("--step", action="append", required=True, metavar="SPEC", help=STEP_HELP)
    p.add_argument("--dataset", metavar="ID", help="calibration / training dataset id (methods that need data)")
    p.add_argument("--eval-dataset", metavar="ID", help="dataset the report measures quality on")
    p.add_argument("--name", help="job name")
    p.add_argument(
        "--evaluation", metavar="JSON", help='how the report measures, e.g. \'{"runs": 3, "max_samples": 8}\''
    )
    p.add_argument(
        "--no-eval", action="store_true", help="report sizes and sparsity only (no speed, quality, fidelity)"
    )
    p.add_argument("--wait", action="store_true", help="wait for the job, showing its stage and progress live")
    _wait_flags(p)


def _add_jobs_commands(add: _Add, common: list[argparse.ArgumentParser]) -> None:
    p = add(
        "jobs",
        cmd_jobs,
        "list jobs, newest first; `jobs estimate` plans a job without running it; `jobs download` gets its artifact",
        "examples:\n  modelpress jobs --status running --limit 50\n"
        "  modelpress jobs estimate MODEL_ID --step prune.magnitude:sparsity=0.5 --no-eval",
    )
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    p.add_argument("--limit", type=int, default=20, help="at most N jobs (default 20)")
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="{estimate,download}")
    help_ = "a job's plan without running it: peak memory, scratch disk, artifact bytes, seconds"
    e = jobs_sub.add_parser(
        "estimate",
        parents=common,
        help=help_,
        description=help_,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Takes the arguments of `compress` (POST /v1/jobs/estimate takes the body of POST /v1/jobs).\n"
        "example: modelpress jobs estimate MODEL_ID --step quantize.weight_only:bits=4 --no-eval --json",
    )
    e.set_defaults(fn=_command(cmd_estimate))
    e.add_argument("model_id", metavar="MODEL_ID")
    e.add_argument("--step", action="append", required=True, metavar="SPEC", help=STEP_HELP)
    e.add_argument("--dataset", metavar="ID", help="calibration / training dataset id (methods that need data)")
    e.add_argument("--eval-dataset", metavar="ID", help="dataset the report measures quality on")
    e.add_argument("--evaluation", metavar="JSON", help="how the report measures, e.g. '{\"budget_s\": 10}'")
    e.add_argument("--no-eval", action="store_true", help="plan without the report's evaluation")

    d = jobs_sub.add_parser(
        "download",
        parents=common,
        help=_DOWNLOAD_HELP,
        description=_DOWNLOAD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_DOWNLOAD_EPILOG,
    )
    d.set_defaults(fn=_command(cmd_download))
    _download_args(d)


def _add_job_commands(add: _Add) -> None:
    """status, wait and cancel: one job each."""
    p = add("status", cmd_status, "show one job", "example: modelpress status JOB --json")
    p.add_argument("job", metavar="JOB")

    p = add(
        "wait",
        cmd_wait,
        "wait for a job to finish, showing its stage and progress live",
        "exit codes: 0 succeeded, 1 failed or canceled, 5 --timeout ran out",
    )
    p.add_argument("job", metavar="JOB")
    _wait_flags(p)

    p = add(
        "cancel",
        cmd_cancel,
        "cancel a job (a running one stops at its next step)",
        "A finished job cannot be canceled: exit 3 with 'Error: Conflict: ...'.",
    )
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


def _add_result_commands(add: _Add) -> None:
    """download and report: what a succeeded job made."""
    p = add("download", cmd_download, _DOWNLOAD_HELP, _DOWNLOAD_EPILOG)
    _download_args(p)

    p = add(
        "report",
        cmd_report,
        "show what a job changed: size, sparsity, speed, quality, fidelity",
        "--open asks for a signed link to the HTML report (no API key needed), prints it and opens it in a browser.\n"
        "example: modelpress report JOB --open",
    )
    p.add_argument("job", metavar="JOB")
    p.add_argument("--open", action="store_true", help="open the HTML report in a browser (prints the signed URL)")
    p.add_argument("--ttl", type=int, default=None, metavar="S", help="with --open: seconds the link stays valid")
