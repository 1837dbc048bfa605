"""The ``modelpress`` command line without a server: which function each spelling runs (the old
ones kept), ``--output json``, ``--version``, the completion scripts and what a TAB completes,
tables fitted to 80 columns, and the refusal to delete without ``--yes`` where nobody can be
asked. The commands against a real server are in tests/test_cli_client.py."""

from __future__ import annotations

import argparse
import io
import uuid
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import pytest

from app.cli import build_parser
from modelpress import Job, Method, Sweep
from modelpress._cli import jobs_table, print_keys, run
from modelpress._cli_base import EXIT_USAGE, _job_table, watch_key, watch_line
from modelpress._cli_resources import (
    _param_rows,
    cmd_jobs_delete,
    cmd_models_delete,
    cmd_sweeps_delete,
    completion_script,
    description_text,
    method_tables,
    sweep_points_table,
)
from modelpress._entry import complete
from modelpress._term import Table

pytestmark = pytest.mark.unit

# (argv, the command function, attributes the parsed namespace must have)
SPELLINGS: list[tuple[list[str], str, dict[str, Any]]] = [
    (["models"], "cmd_models", {"limit": 20, "json": False}),
    (["models", "list", "--output", "json", "--limit", "3"], "cmd_models", {"limit": 3, "json": True}),
    # A flag given to the group before the subcommand is not reset by the subcommand's default.
    (["models", "--json", "--limit", "5", "list"], "cmd_models", {"limit": 5, "json": True}),
    (["models", "show", "M"], "cmd_models_show", {"model": "M"}),
    (["models", "delete", "M", "-y"], "cmd_models_delete", {"model": "M", "yes": True}),
    (["upload", "d/"], "cmd_upload", {"path": "d/"}),
    (["models", "upload", "d/"], "cmd_upload", {"path": "d/"}),
    (["upload-dataset", "a.txt"], "cmd_upload_dataset", {"path": "a.txt"}),
    (["datasets", "upload", "a.txt", "--name", "n"], "cmd_upload_dataset", {"path": "a.txt", "name": "n"}),
    (["datasets"], "cmd_datasets_list", {"limit": 20}),
    (["datasets", "show", "D", "--output", "json"], "cmd_datasets_show", {"dataset": "D", "json": True}),
    (["datasets", "delete", "D"], "cmd_datasets_delete", {"dataset": "D", "yes": False}),
    (["jobs", "delete", "J", "--yes"], "cmd_jobs_delete", {"job": "J", "yes": True}),
    (["sweeps", "delete", "S"], "cmd_sweeps_delete", {"sweep": "S", "yes": False}),
    (["jobs", "--status", "running"], "cmd_jobs", {"status": "running", "limit": 20}),
    (["jobs", "list", "--status", "failed", "--limit", "2"], "cmd_jobs", {"status": "failed", "limit": 2}),
    (["status", "J"], "cmd_status", {"job": "J"}),
    (["jobs", "show", "J", "--output", "json"], "cmd_status", {"job": "J", "json": True}),
    (["cancel", "J"], "cmd_cancel", {"job": "J"}),
    (["jobs", "cancel", "J"], "cmd_cancel", {"job": "J"}),
    (["wait", "J", "--timeout", "3"], "cmd_wait", {"job": "J", "timeout": 3.0}),
    (["jobs", "watch", "J", "--poll", "0.5"], "cmd_watch", {"job": "J", "poll": 0.5}),
    (["watch", "J", "--json", "--output", "table"], "cmd_watch", {"json": False}),
    (["report", "J", "--open"], "cmd_report", {"job": "J", "open": True}),
    (["jobs", "report", "J"], "cmd_report", {"job": "J", "open": False}),
    # download's -o/--output is where the file goes, as before: it has no --output FORMAT.
    (["download", "J", "--output", "out/"], "cmd_download", {"output": "out/", "json": False}),
    (["jobs", "download", "J", "-o", "x", "--json"], "cmd_download", {"output": "x", "json": True}),
    (["jobs", "estimate", "M", "--step", "prune.magnitude"], "cmd_estimate", {"model_id": "M"}),
    (["sweeps"], "cmd_sweeps_list", {"limit": 20}),
    (["sweeps", "show", "S"], "cmd_sweeps_show", {"sweep": "S"}),
    (["methods"], "cmd_methods_list", {}),
    (["methods", "show", "prune.magnitude", "--output", "json"], "cmd_methods_show", {"json": True}),
    (["keys", "list", "--output", "json"], "cmd_keys_list", {"json": True}),
    (["keys", "show", "K", "--all", "--json"], "cmd_keys_show", {"key": "K", "all_tenants": True, "json": True}),
    (["keys", "revoke", "K", "--api-key", "k"], "cmd_keys_revoke", {"key": "K", "api_key": "k"}),
    (["completion", "fish"], "cmd_completion", {"shell": "fish"}),
]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.mark.parametrize(("argv", "fn", "attrs"), SPELLINGS, ids=[" ".join(a) for a, _, _ in SPELLINGS])
def test_every_spelling_parses_to_its_command(
    parser: argparse.ArgumentParser, argv: list[str], fn: str, attrs: dict[str, Any]
) -> None:
    args = parser.parse_args(argv)
    assert args.fn.__name__ == fn
    for key, value in attrs.items():
        assert getattr(args, key) == value, key


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"modelpress {version('modelpress')}"


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nospace -o default -o bashdefault"), ("zsh", "#compdef modelpress"), ("fish", "complete")],
)
def test_completion_scripts(shell: str, marker: str) -> None:
    script = completion_script(shell)
    assert marker in script and "modelpress" in script and "_ARGCOMPLETE" in script


def _tab(monkeypatch: pytest.MonkeyPatch, line: str) -> list[str]:
    """What the shell gets for a TAB at the end of ``line`` (the script's environment, in-process)."""
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    monkeypatch.setenv("_ARGCOMPLETE_IFS", "\n")
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    out = io.StringIO()

    def done(code: int) -> None:
        raise SystemExit(code)

    with pytest.raises(SystemExit) as exit_:
        complete(build_parser(), output=out, exit_method=done)
    assert exit_.value.code == 0
    return [w.strip() for w in out.getvalue().split("\n")]


def test_tab_completes_commands_subcommands_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _tab(monkeypatch, "modelpress mo") == ["models"]
    assert {"list", "show", "delete", "upload", "import"} <= set(_tab(monkeypatch, "modelpress models "))
    assert set(_tab(monkeypatch, "modelpress jobs w")) == {"watch", "wait"}
    assert set(_tab(monkeypatch, "modelpress completion ")) >= {"bash", "zsh", "fish"}
    assert _tab(monkeypatch, "modelpress jobs list --output j") == ["json"]


def _job(**kw: Any) -> Job:
    now = datetime.now(UTC)
    steps = [
        {"method": "prune.wanda", "params": {"sparsity": 0.5, "mask": "2:4", "ignore": ["lm_head", "embed_tokens"]}},
        {"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 64}},
    ]
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "name": "a job name long enough to be cut somewhere",
        "model_id": str(uuid.uuid4()),
        "eval_dataset_id": str(uuid.uuid4()),
        "status": "running",
        "steps": steps,
        "queue": "cpu",
        "progress": {"stage": "evaluating compressed model: sample 3/8 of the eval dataset", "fraction": 0.456},
        "created_at": now,
        "started_at": now,
        "artifact": {"size_bytes": 12_345_678, "sha256": "0123456789abcdef" * 4, "filename": "model.zip"},
        "metrics": {"size": {"compression_ratio": 3.2, "original_bytes": 500_000_000, "artifact_bytes": 156_000_000}},
        "plan": {"path": "stream", "peak_memory_bytes": 10**9, "scratch_bytes": 10**9, "artifact_bytes": 10**8},
    }
    fields["plan"]["seconds"] = 12.0
    return Job(**{**fields, **kw})


def _lines(text: Any) -> list[str]:
    return str(text).splitlines()


def test_jobs_list_and_job_table_fit_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    jobs = [_job(), _job(status="succeeded", name=None), _job(status="queued", progress={"fraction": 0})]
    listed = _lines(jobs_table(jobs))
    assert max(len(line) for line in listed) <= 80
    assert listed[0].split() == ["id", "name", "status", "steps"]  # date, stage, artifact size went
    for job, line in zip(jobs, listed[2:], strict=True):
        assert line.startswith(job.id + "  ")  # whole: it can be pasted into the next command
    assert "running 46%" in listed[2] and "…" in listed[2]

    shown = _lines(_job_table(jobs[0]))
    assert max(len(line) for line in shown) <= 80
    text = "\n".join(shown)
    for whole in (jobs[0].id, jobs[0].model_id, "0123456789abcdef" * 4):
        assert whole in text
    assert "quantize.weight_only:bits=4,group_size=64" in text  # wrapped at spaces, not cut

    monkeypatch.setenv("COLUMNS", "300")  # wide: every column, nothing cut
    wide = _lines(jobs_table(jobs))
    assert wide[0].split() == ["id", "name", "status", "steps", "stage", "created", "artifact"]
    assert "…" not in "\n".join(wide)


def test_sweep_points_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    points = [
        {
            "index": i,
            "values": {"steps[0].params.sparsity": s, "steps[1].params.bits": 8},
            "job_id": str(uuid.uuid4()),
            "status": "succeeded",
            "metrics": {"compression_ratio": 0.4, "quality": 31.25},
            "on_frontier": i == 1,
        }
        for i, s in enumerate((0.3, 0.5))
    ]
    spec = {"steps": [], "vary": {"steps[0].params.sparsity": [0.3, 0.5]}}
    sweep = Sweep(id="s", created_at=datetime.now(UTC), status="succeeded", spec=spec, counts={}, points=points)
    monkeypatch.setenv("COLUMNS", "80")
    lines = _lines(sweep_points_table(sweep))
    assert lines[0].split() == ["#", "values", "status", "ratio", "quality", "frontier"]  # the job ids went
    assert lines[3] == "1  sparsity=0.5, bits=8  succeeded   0.4×    31.25  *"
    monkeypatch.setenv("COLUMNS", "120")
    assert _lines(sweep_points_table(sweep))[2].endswith(points[0]["job_id"])


def test_keys_at_80_columns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    at = "2026-12-07T02:31:05.123456+00:00"
    key = {"id": str(uuid.uuid4()), "prefix": "0123456789ab", "tenant": "acme", "scopes": ["admin"], "created_at": at}
    monkeypatch.setenv("COLUMNS", "80")
    print_keys([{**key, "revoked_at": at}, {**key, "revoked_at": None}], as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "prefix", "tenant", "revoked"] and max(map(len, lines)) <= 80
    assert lines[2].endswith("2026-12-07 02:31")


def test_tables_are_not_fitted_when_piped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # and pytest's stdout is not a terminal
    t = Table()
    t.add_column("id")
    t.add_column("note", overflow="ellipsis")
    t.add_row("x" * 50, "y" * 100)
    assert _lines(t)[-1] == "x" * 50 + "  " + "y" * 100


def test_table_fitting_keeps_wraps_cuts_and_drops() -> None:
    t = Table(width=30)
    t.add_column("id")
    t.add_column("extra", drop=1)
    t.add_column("note", overflow="wrap", min_width=6)
    t.add_column("tag", overflow="ellipsis", min_width=4)
    t.add_row("a" * 12, "dropped first", "one two three four", "abcdefgh")
    assert _lines(t) == [
        "id            note     tag",
        "------------  -------  -------",
        "aaaaaaaaaaaa  one two  abcdef…",
        "              three",
        "              four",
    ]

    narrow = Table(width=10)  # nothing can go: wider than asked rather than a cut id
    narrow.add_column("id")
    narrow.add_row("z" * 36)
    assert _lines(narrow)[-1] == "z" * 36


def test_watch_lines_and_when_a_log_line_is_new() -> None:
    job = _job(progress={"stage": "evaluating compressed model: sample 3/8", "fraction": 0.5})
    assert watch_line(job) == " 50% running · evaluating compressed model: sample 3/8"
    later = _job(progress={"stage": "evaluating compressed model: sample 4/8", "fraction": 0.55})
    assert watch_key(later) == watch_key(job)  # the next sample, same tenth: no new log line
    assert watch_key(_job(progress={"stage": "saving", "fraction": 0.55})) != watch_key(job)
    assert watch_key(_job(progress={"stage": job.progress.stage, "fraction": 0.61})) != watch_key(job)


def test_method_parameters_from_the_json_schema() -> None:
    schema = {
        "properties": {
            "sparsity": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "description": "share of zeros"},
            "scope": {"enum": ["layer", "global"], "default": "layer"},
            "group_size": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": 128},
            "ignore": {"type": "array", "items": {"type": "string"}, "default": []},
        },
        "required": ["sparsity"],
    }
    assert _param_rows(schema) == [
        ("sparsity", "number", "required", "share of zeros (>= 0, < 1)"),
        ("scope", '"layer" | "global"', '"layer"', ""),
        ("group_size", "integer | null", "128", ""),
        ("ignore", "list[string]", "[]", ""),
    ]


def test_a_methods_limits_and_description_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = "group_size must divide the input width (in_features) of every quantized Linear layer: " * 2
    method = Method(
        name="quantize.weight_only",
        summary="Round-to-nearest int8/int4 weights",
        description="``bits``: 8 or 4.\nA second line of the same paragraph.\n\nAnother paragraph.",
        params_schema={"properties": {"bits": {"enum": [8, 4]}}, "required": ["bits"]},
        constraints=[{"id": "group_divides_inputs", "rule": rule, "params": ["group_size"], "checked": "submit"}],
    )
    monkeypatch.setenv("COLUMNS", "80")
    kv, params, limits = (_lines(t) for t in method_tables(method))
    assert params[-1].split() == ["bits", "8", "|", "4", "required"]
    assert limits[3].startswith("group_divides_inputs  submit   group_size must divide")
    assert len(limits) > 5 and max(len(line) for line in limits) <= 80  # the rule wraps under itself
    assert description_text(method.description) == (
        "`bits`: 8 or 4. A second line of the same paragraph.\n\nAnother paragraph."
    )
    no_limits = method.model_copy(update={"constraints": []})
    assert len(method_tables(no_limits)) == 2  # (an older server lists none)


def test_delete_without_yes_where_nobody_can_be_asked(capsys: pytest.CaptureFixture[str]) -> None:
    # pytest's stdin is not a terminal, as in a script; no request is sent (port 9: discard).
    args = argparse.Namespace(model="m1", yes=False, url="http://127.0.0.1:9", api_key="k", json=False)
    assert run(cmd_models_delete, args) == EXIT_USAGE
    assert "not deleting model m1 without --yes" in capsys.readouterr().err
    for fn, attr in ((cmd_jobs_delete, "job"), (cmd_sweeps_delete, "sweep")):
        args = argparse.Namespace(**{attr: "x1"}, yes=False, url="http://127.0.0.1:9", api_key="k", json=False)
        assert run(fn, args) == EXIT_USAGE
        assert f"not deleting {attr} x1 without --yes" in capsys.readouterr().err


def test_a_refusal_names_the_limit_it_broke(capsys: pytest.CaptureFixture[str]) -> None:
    from modelpress import Unprocessable

    msg = "group_size 128 does not divide 576"
    entry = {"loc": ["body", "steps", 1], "msg": msg, "constraint": "group_divides_inputs"}

    def refused(_args: argparse.Namespace) -> int:
        raise Unprocessable(422, "validation_error", "Request could not be processed", "1 error", errors=[entry])

    assert run(refused, argparse.Namespace(json=False)) == 3
    assert capsys.readouterr().err.splitlines()[1] == (
        "  body.steps.1: group_size 128 does not divide 576 [limit: group_divides_inputs]"
    )
