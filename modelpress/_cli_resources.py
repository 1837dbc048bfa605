"""The CLI's resource commands: ``show`` and ``delete`` of models and datasets, ``list`` and
``show`` of datasets, sweeps and methods, ``delete`` of jobs and sweeps, ``jobs watch``, and
``completion``. Their parsers are
wired in modelpress/_cli.py beside the older commands; what both use is in modelpress/_cli_base.py.

What the HTTP API has, and so what the CLI can do (nothing here is done client-side but the
``methods show`` lookup, which picks one of ``GET /v1/methods``):

    models     list  show  delete          GET /v1/models, GET|DELETE /v1/models/{id}
    datasets   list  show  delete          GET /v1/datasets, GET|DELETE /v1/datasets/{id}
    jobs       list  show  cancel  watch   GET /v1/jobs, GET|DELETE /v1/jobs/{id}, POST .../cancel
               delete
    sweeps     list  show  delete          GET /v1/sweeps, GET|DELETE /v1/sweeps/{id}
    methods    list  show                  GET /v1/methods
    keys       list  create  revoke        app/cli.py; GET|POST /v1/keys, POST /v1/keys/revoke

A delete asks first on a terminal; without one (a script) it needs ``--yes``, so a pipeline that
forgot it stops instead of deleting.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import Any

from modelpress._cli_base import (
    EXIT_OK,
    EXIT_USAGE,
    _client,
    _dump,
    _fill,
    _kv_table,
    _model_line,
    _num,
    _print,
    _print_json,
    _size,
    _wait,
)

_STAMP = "%Y-%m-%d %H:%M:%S"


def _confirm(args: argparse.Namespace, what: str) -> bool:
    """True when the user agreed to delete ``what`` (``--yes``, or ``y`` at the prompt)."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError(f"not deleting {what} without --yes (no terminal to ask on)")
    answer = input(f"delete {what}? this cannot be undone [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _deleted(args: argparse.Namespace, kind: str, ident: str) -> int:
    if args.json:
        _print_json({"id": ident, "kind": kind, "deleted": True})
    else:
        _print(f"{kind} {ident} deleted")
    return EXIT_OK


def _not_deleted(kind: str, ident: str) -> int:
    print(f"{kind} {ident} not deleted", file=sys.stderr)
    return EXIT_USAGE


# -- models ------------------------------------------------------------------------------------


def model_table(model: Any) -> Any:
    t = _kv_table()
    t.add_row("model", model.id)
    t.add_row("name", model.name)
    t.add_row("status", model.status or "ready")
    t.add_row("format", model.format or "—")
    t.add_row("architecture", model.architecture or "—")
    t.add_row("parameters", _num(model.parameters, "{:,}"))
    t.add_row("size", _size(model.size_bytes))
    if model.sha256:
        t.add_row("sha256", model.sha256)
    t.add_row("created", model.created_at.strftime(_STAMP))
    if model.source:
        t.add_row("source", model.source)
    if model.progress is not None and model.status == "importing":
        p = model.progress
        t.add_row("fetched", f"{_size(p.bytes_done)} of {_size(p.bytes_total)}")
    if model.error:
        t.add_row("error", f"{model.error.get('code', '?')}: {model.error.get('detail', '')}")
    for f in model.files:
        t.add_row("file", f"{f.name} ({_size(f.size_bytes)})")
    return t


def cmd_models_show(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        model = mp.get_model(args.model)
    if args.json:
        _print_json(model)
    else:
        _print(model_table(model))
    return EXIT_OK


def cmd_models_delete(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        what = f"model {args.model}"
        if not args.yes and sys.stdin.isatty():
            what = f"model {args.model} ({_model_line(mp.get_model(args.model))})"
        if not _confirm(args, what):
            return _not_deleted("model", args.model)
        mp.delete_model(args.model)
    return _deleted(args, "model", args.model)


# -- datasets ----------------------------------------------------------------------------------


def _dataset_line(ds: Any) -> str:
    labels = f", labels {ds.labels}" if ds.labeled else ""
    return f"{ds.name}, {ds.format}, {ds.samples:,} samples{labels}, {_size(ds.size_bytes)}"


def cmd_datasets_list(args: argparse.Namespace) -> int:
    from modelpress._term import Table

    with _client(args) as mp:
        datasets = list(mp.datasets(limit=args.limit))
    if args.json:
        _print_json(datasets)
        return EXIT_OK
    t = Table()
    t.add_column("id")
    t.add_column("name", overflow="ellipsis", min_width=8, drop=1)
    t.add_column("format")
    t.add_column("samples", justify="right")
    t.add_column("labeled", drop=2)
    t.add_column("size", justify="right")
    t.add_column("created", drop=3)
    for d in datasets:
        t.add_row(
            d.id,
            d.name,
            d.format,
            f"{d.samples:,}",
            "yes" if d.labeled else "no",
            _size(d.size_bytes),
            d.created_at.strftime(_STAMP),
        )
    _print(t)
    if not datasets:
        _print("no datasets")
    return EXIT_OK


def cmd_datasets_show(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        ds = mp.get_dataset(args.dataset)
    if args.json:
        _print_json(ds)
        return EXIT_OK
    t = _kv_table()
    t.add_row("dataset", ds.id)
    t.add_row("name", ds.name)
    t.add_row("format", ds.format)
    t.add_row("samples", f"{ds.samples:,}")
    t.add_row("labels", ", ".join(str(v) for v in ds.labels) if ds.labeled and ds.labels else "none")
    t.add_row("size", _size(ds.size_bytes))
    t.add_row("sha256", ds.sha256)
    t.add_row("created", ds.created_at.strftime(_STAMP))
    _print(t)
    return EXIT_OK


def cmd_datasets_delete(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        what = f"dataset {args.dataset}"
        if not args.yes and sys.stdin.isatty():
            what = f"dataset {args.dataset} ({_dataset_line(mp.get_dataset(args.dataset))})"
        if not _confirm(args, what):
            return _not_deleted("dataset", args.dataset)
        mp.delete_dataset(args.dataset)
    return _deleted(args, "dataset", args.dataset)


# -- jobs --------------------------------------------------------------------------------------


def cmd_jobs_delete(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        what = f"job {args.job}"
        if not args.yes and sys.stdin.isatty():
            job = mp.get_job(args.job)
            what = f"job {args.job} ({job.status}{', ' + job.name if job.name else ''}) and its artifact"
        if not _confirm(args, what):
            return _not_deleted("job", args.job)
        mp.delete_job(args.job)
    return _deleted(args, "job", args.job)


# -- sweeps ------------------------------------------------------------------------------------


def _counts_text(c: Any) -> str:
    parts = [f"{n} {name}" for name, n in _dump(c).items() if n]
    return ", ".join(parts) or "none"


def cmd_sweeps_list(args: argparse.Namespace) -> int:
    from modelpress._term import Table

    with _client(args) as mp:
        sweeps = list(mp.sweeps(limit=args.limit))
    if args.json:
        _print_json(sweeps)
        return EXIT_OK
    t = Table()
    t.add_column("id")
    t.add_column("name", overflow="ellipsis", min_width=8, drop=1)
    t.add_column("status")
    t.add_column("points", justify="right")
    t.add_column("jobs", overflow="ellipsis", min_width=12)
    t.add_column("created", drop=2)
    for s in sweeps:
        t.add_row(s.id, s.name or "", s.status, str(s.points), _counts_text(s.counts), s.created_at.strftime(_STAMP))
    _print(t)
    if not sweeps:
        _print("no sweeps")
    return EXIT_OK


def _values_text(values: dict[str, Any]) -> str:
    """``steps[0].params.sparsity`` -> ``sparsity``: the column is about which value, not where."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={json.dumps(v)}" for k, v in values.items())


def sweep_points_table(sweep: Any) -> Any:
    from modelpress._term import Table

    t = Table()
    t.add_column("#", justify="right")
    t.add_column("values", overflow="wrap", min_width=12)
    t.add_column("status")
    t.add_column("ratio", justify="right")
    t.add_column("quality", justify="right", drop=1)
    t.add_column("frontier")
    t.add_column("job", drop=2)  # the widest goes first; a wider terminal or --output json has it
    for p in sweep.points:
        m = p.metrics
        t.add_row(
            str(p.index),
            _values_text(p.values),
            p.status,
            _num(m.compression_ratio, "{:.3g}×") if m else "—",
            _num(m.quality, "{:.4g}") if m else "—",
            "*" if p.on_frontier else "",
            p.job_id or "—",
        )
    return t


def cmd_sweeps_show(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        sweep = mp.get_sweep(args.sweep)
    if args.json:
        _print_json(sweep)
        return EXIT_OK
    t = _kv_table()
    t.add_row("sweep", sweep.id)
    if sweep.name:
        t.add_row("name", sweep.name)
    t.add_row("status", sweep.status)
    t.add_row("model", sweep.model_id or "—")
    t.add_row("created", sweep.created_at.strftime(_STAMP))
    t.add_row("jobs", _counts_text(sweep.counts))
    t.add_row("varies", ", ".join(f"{k} in {json.dumps(v)}" for k, v in sweep.spec.vary.items()))
    if sweep.frontier_axes:
        t.add_row("frontier", ", ".join(f"{k}: {v}" for k, v in sweep.frontier_axes.items()))
    if sweep.frontier_note:
        t.add_row("note", sweep.frontier_note)
    _print(t)
    _print()
    _print(sweep_points_table(sweep))
    return EXIT_OK


def cmd_sweeps_delete(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        what = f"sweep {args.sweep}"
        if not args.yes and sys.stdin.isatty():
            sweep = mp.get_sweep(args.sweep)
            name = f", {sweep.name}" if sweep.name else ""
            what = f"sweep {args.sweep} ({sweep.status}{name}) with its {len(sweep.points)} jobs and their artifacts"
        if not _confirm(args, what):
            return _not_deleted("sweep", args.sweep)
        mp.delete_sweep(args.sweep)
    return _deleted(args, "sweep", args.sweep)


# -- methods -----------------------------------------------------------------------------------


def _needs(m: Any) -> str:
    return ", ".join(n for n, on in (("data", m.needs_data), ("gpu", m.needs_gpu)) if on) or "—"


def cmd_methods_list(args: argparse.Namespace) -> int:
    from modelpress._term import Table

    with _client(args) as mp:
        methods = mp.methods()
    if args.json:
        _print_json(methods)
        return EXIT_OK
    t = Table()
    t.add_column("method")
    t.add_column("needs")
    t.add_column("formats", drop=1)
    t.add_column("summary", overflow="wrap", min_width=20)
    for m in methods:
        t.add_row(m.name, _needs(m), ", ".join(m.formats), m.summary)
    _print(t)
    _print("parameters and limits of one: modelpress methods show METHOD")
    return EXIT_OK


def cmd_methods_recipes(args: argparse.Namespace) -> int:
    from modelpress._term import Table

    with _client(args) as mp:
        recipes = mp.recipes()
    if args.json:
        _print_json(recipes)
        return EXIT_OK
    t = Table()
    t.add_column("target")
    t.add_column("recipe")
    t.add_column("ppl ×", justify="right")
    t.add_column("seconds", justify="right", drop=2)
    t.add_column("needs", drop=1)
    t.add_column("summary", overflow="wrap", min_width=20)
    for r in recipes:
        m = r.measured or {}
        ratio = m.get("perplexity_ratio")
        t.add_row(
            r.target,
            r.name + (" *" if r.recommended else ""),
            f"{ratio:.3f}" if isinstance(ratio, (int, float)) else ("refused" if m.get("refused") else "-"),
            f"{m['seconds']:.0f}" if isinstance(m.get("seconds"), (int, float)) else "-",
            "data" if r.needs_data else "",
            r.summary,
        )
    _print(t)
    model = next((r.measured.get("model") for r in recipes if r.measured), None)
    _print(
        "* recommended for its target; ppl ×: perplexity against the original"
        + (f" on {model}" if model else "")
        + "\nuse one: modelpress compress MODEL_ID --recipe NAME"
    )
    return EXIT_OK


def _schema_type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_schema_type(p) for p in prop["anyOf"])
    kind = prop.get("type")
    if kind == "array" and isinstance(prop.get("items"), dict):
        return f"list[{_schema_type(prop['items'])}]"
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    return str(kind or "any")


_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def _param_rows(schema: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description and bounds) of each parameter of a JSON schema."""
    required = set(schema.get("required") or [])
    rows = []
    for name, prop in (schema.get("properties") or {}).items():
        bounds = [f"{op} {prop[k]}" for k, op in _BOUNDS if k in prop]
        desc = " ".join(filter(None, [prop.get("description", ""), f"({', '.join(bounds)})" if bounds else ""]))
        default = "required" if name in required else json.dumps(prop.get("default"))
        rows.append((name, _schema_type(prop), default, desc))
    return rows


def _extra_text(value: Any) -> str:
    """A field this client does not know, readably: text as is, a list of texts a line each."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value) or "—"
    return json.dumps(value)


def method_tables(m: Any) -> list[Any]:
    from modelpress._term import Table

    t = _kv_table()
    t.add_row("method", m.name)
    t.add_row("summary", m.summary)
    t.add_row("needs", _needs(m))
    t.add_row("formats", ", ".join(m.formats) or "—")
    for key, value in (m.model_extra or {}).items():  # what a newer server adds (limits, ...)
        t.add_row(key.replace("_", " "), _extra_text(value))
    limits = Table(title="limits (a job that breaks one checked at submit is refused with a 422 naming it)")
    limits.add_column("limit")
    limits.add_column("checked")
    limits.add_column("rule", overflow="wrap", min_width=24)
    for c in m.constraints:
        limits.add_row(c.id, c.checked or "—", c.rule)
    params = Table(title="parameters (--step METHOD:name=value,...)")
    params.add_column("name")
    params.add_column("type", overflow="wrap", min_width=8)
    params.add_column("default", overflow="ellipsis", min_width=8)
    params.add_column("description", overflow="wrap", min_width=20)
    for row in _param_rows(m.params_schema):
        params.add_row(*row)
    return [t, params, limits] if m.constraints else [t, params]


def description_text(text: str) -> str:
    """A method's description (hard-wrapped RST-ish paragraphs) reflowed to the output's width."""
    paragraphs = [" ".join(p.split()).replace("``", "`") for p in text.split("\n\n") if p.strip()]
    return "\n\n".join(_fill(p) for p in paragraphs)


def cmd_methods_show(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        methods = {m.name: m for m in mp.methods()}
    m = methods.get(args.method)
    if m is None:
        close = difflib.get_close_matches(args.method, methods, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"no method {args.method!r}: {hint}the methods are {', '.join(sorted(methods))}")
    if args.json:
        _print_json(m)
        return EXIT_OK
    parts = [str(t) for t in method_tables(m)]
    if m.description:
        parts.append(description_text(m.description))
    _print("\n\n".join(parts))
    return EXIT_OK


# -- watch -------------------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as mp:
        return _wait(mp, args, args.job, watch=True)


# -- completion --------------------------------------------------------------------------------

SHELLS = ("bash", "zsh", "fish")
INSTALL = {
    "bash": 'eval "$(modelpress completion bash)"     # in ~/.bashrc',
    "zsh": 'eval "$(modelpress completion zsh)"      # in ~/.zshrc, after compinit',
    "fish": "modelpress completion fish > ~/.config/fish/completions/modelpress.fish",
}


def completion_script(shell: str) -> str:
    """The script that makes ``shell`` complete ``modelpress`` (argcomplete: each TAB asks
    ``modelpress`` itself, so the completions always match the installed version)."""
    try:
        from argcomplete.shell_integration import shellcode  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ValueError(
            "shell completion needs the argcomplete package: pip install argcomplete (then run this again)"
        ) from None
    return str(shellcode(["modelpress"], shell=shell))


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(args.shell))
    if sys.stdout.isatty():
        print(f"# install it with: {INSTALL[args.shell]}", file=sys.stderr)
    return EXIT_OK


__all__ = [
    "INSTALL",
    "SHELLS",
    "cmd_completion",
    "cmd_datasets_delete",
    "cmd_datasets_list",
    "cmd_datasets_show",
    "cmd_methods_list",
    "cmd_methods_show",
    "cmd_models_delete",
    "cmd_models_show",
    "cmd_sweeps_list",
    "cmd_sweeps_show",
    "cmd_watch",
    "completion_script",
    "description_text",
    "method_tables",
    "model_table",
    "sweep_points_table",
]
