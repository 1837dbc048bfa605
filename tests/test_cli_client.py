"""The client commands of the ``modelpress`` console script, run as subprocesses against the real
embedded service with ``MODELPRESS_URL`` / ``MODELPRESS_API_KEY``: upload, compress --wait,
status, jobs, download (an artifact that unzips), report (a table; --open prints a signed link),
and the exit codes of a refused job (3), a canceled one (1), a bad flag (2) and no server (4)."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import MODELPRESS, free_port

QUICK_EVAL = '{"runs": 1, "warmup": 0, "max_samples": 4}'


def run(
    stack, *args: str, url: str | None = None, extra_env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"MODELPRESS_URL": url or stack.service.url, "MODELPRESS_API_KEY": stack.key, **(extra_env or {})})
    return subprocess.run([MODELPRESS, *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_json(stack, *args: str) -> Any:
    res = run(stack, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def cli_job(embedded, tiny: dict[str, Path]) -> dict[str, Any]:
    model = run_json(embedded, "upload", str(tiny["gpt2"]), "--name", "cli-gpt2")
    job = run_json(
        embedded,
        "compress",
        model["id"],
        "--step",
        "prune.magnitude:sparsity=0.5,scope=global",
        "--name",
        "cli",
        "--evaluation",
        QUICK_EVAL,
        "--wait",
        "--poll",
        "0.2",
    )
    return {"model": model, "job": job}


@pytest.mark.e2e
def test_upload_and_compress_wait_json(cli_job: dict[str, Any]) -> None:
    model, job = cli_job["model"], cli_job["job"]
    assert model["architecture"] == "GPT2LMHeadModel" and model["name"] == "cli-gpt2"
    assert job["status"] == "succeeded" and job["name"] == "cli" and job["model_id"] == model["id"]
    assert job["steps"][0]["method"] == "prune.magnitude" and job["steps"][0]["params"]["sparsity"] == 0.5
    assert job["artifact"]["filename"] == "model.zip"


@pytest.mark.e2e
def test_status_and_jobs_json(embedded, cli_job: dict[str, Any]) -> None:
    job = cli_job["job"]
    status = run_json(embedded, "status", job["id"])
    assert status["id"] == job["id"] and status["status"] == "succeeded"
    assert status["artifact"]["sha256"] == job["artifact"]["sha256"]
    listed = run_json(embedded, "jobs", "--limit", "100")
    assert isinstance(listed, list) and job["id"] in [j["id"] for j in listed]
    succeeded = run_json(embedded, "jobs", "--status", "succeeded")
    assert all(j["status"] == "succeeded" for j in succeeded)


@pytest.mark.e2e
def test_human_output(embedded, cli_job: dict[str, Any], tiny: dict[str, Path]) -> None:
    up = run(embedded, "upload", str(tiny["bare"]))
    assert up.returncode == 0, up.stderr
    assert "uploaded" in up.stdout and "safetensors" in up.stdout
    assert "upload" in up.stderr and "kB" in up.stderr  # the progress bar: bytes (and rate)
    model_id = up.stdout.split()[1]
    res = run(
        embedded,
        "compress",
        model_id,
        "--step",
        "prune.magnitude:sparsity=0.25",
        "--no-eval",
        "--wait",
        "--poll",
        "0.2",
    )
    assert res.returncode == 0, res.stderr
    assert "succeeded" in res.stdout and "%" in res.stderr  # the live line: stage and fraction
    status = run(embedded, "status", cli_job["job"]["id"])
    assert status.returncode == 0 and cli_job["job"]["id"] in status.stdout and "model.zip" in status.stdout
    jobs = run(embedded, "jobs")
    assert jobs.returncode == 0 and cli_job["job"]["id"] in jobs.stdout


@pytest.mark.e2e
def test_download_and_report(embedded, cli_job: dict[str, Any], tmp_path: Path) -> None:
    job = cli_job["job"]
    out = tmp_path / "out"
    res = run(embedded, "download", job["id"], "-o", str(out))
    assert res.returncode == 0, res.stderr
    artifact = out / "model.zip"
    assert "verified" in res.stdout and "kB" in res.stderr
    with zipfile.ZipFile(artifact) as z:
        z.extractall(tmp_path / "unzipped")
    assert (tmp_path / "unzipped" / "config.json").is_file()
    assert (tmp_path / "unzipped" / "model.safetensors").is_file()

    # Resume from a .part holding the first half.
    data = artifact.read_bytes()
    artifact.unlink()
    (out / "model.zip.part").write_bytes(data[: len(data) // 2])
    (out / "model.zip.part.etag").write_text(f'"{job["artifact"]["sha256"]}"')  # the artifact it holds
    got = run_json(embedded, "jobs", "download", job["id"], "-o", str(out))
    assert got["resumed_from"] == len(data) // 2 and got["sha256"] == job["artifact"]["sha256"]
    assert artifact.read_bytes() == data and not (out / "model.zip.part.etag").exists()
    # One file of the artifact.
    got = run_json(embedded, "jobs", "download", job["id"], "--file", "config.json", "-o", str(tmp_path / "one"))
    assert (tmp_path / "one" / "config.json").read_bytes() == zipfile.ZipFile(artifact).read("config.json")

    rep = run(embedded, "report", job["id"])
    assert rep.returncode == 0, rep.stderr
    for word in ("sparsity", "size", "speed", "fidelity", "original", "compressed", "50.0%"):
        assert word in rep.stdout
    data = run_json(embedded, "report", job["id"])
    assert data["job_id"] == job["id"] and data["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)

    # --open: a signed link, printed and handed to the browser ($BROWSER=true: a no-op command).
    opened = run(embedded, "report", job["id"], "--open", extra_env={"BROWSER": "true"})
    assert opened.returncode == 0, opened.stderr
    assert f"/v1/jobs/{job['id']}/report/view?expires=" in opened.stdout


@pytest.mark.e2e
def test_api_errors_exit_3(embedded, cli_job: dict[str, Any]) -> None:
    # GPT-2's Conv1D layers are refused by the integer quantizers at submit: a 422.
    res = run(
        embedded,
        "compress",
        cli_job["model"]["id"],
        "--step",
        "prune.magnitude:sparsity=0.5",
        "--step",
        "quantize.weight_only:bits=8",
        "--wait",
    )
    assert res.returncode == 3
    assert res.stderr.startswith("Error: Request could not be processed: ")
    assert "steps.1" in res.stderr  # the field the error is about
    res = run(embedded, "cancel", cli_job["job"]["id"])
    assert res.returncode == 3 and res.stderr.startswith("Error: Conflict: ")
    res = run(embedded, "status", "no-such-job", "--json")
    assert res.returncode == 3 and res.stderr.startswith("Error: Not found: ")
    assert json.loads(res.stdout)["error"]["status"] == 404
    res = run(embedded, "status", cli_job["job"]["id"], "--api-key", "mp_000000000000_wrong")
    assert res.returncode == 3 and res.stderr.startswith("Error: Missing or invalid API key")


@pytest.mark.e2e
def test_canceled_job_exits_1(embedded, tiny: dict[str, Path]) -> None:
    model = run_json(embedded, "upload", str(tiny["gpt2-big"]))
    steps = [a for s in ("0.2", "0.4", "0.6") for a in ("--step", f"prune.magnitude:sparsity={s}")]
    job = run_json(embedded, "compress", model["id"], *steps)
    canceled = run_json(embedded, "cancel", job["id"])
    assert canceled["cancel_requested"] or canceled["status"] == "canceled"
    res = run(embedded, "wait", job["id"], "--poll", "0.2")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Error: job canceled" in res.stderr and "canceled" in res.stdout


@pytest.mark.e2e
def test_usage_errors_exit_2(embedded, cli_job: dict[str, Any]) -> None:
    mid = cli_job["model"]["id"]
    for step in ("prune.magnitude:sparsity", "prune.magnitude:sparsity=[0.5", "{not json"):
        res = run(embedded, "compress", mid, "--step", step)
        assert res.returncode == 2 and res.stderr.startswith("Error: --step"), (step, res.stderr)
    res = run(embedded, "compress", mid)  # a --step is required without --export
    assert res.returncode == 2 and "--step" in res.stderr
    res = run(embedded, "upload", "/nonexistent/dir")
    assert res.returncode == 2 and "no such file" in res.stderr


@pytest.mark.e2e
def test_unreachable_server_exits_4(embedded) -> None:
    res = run(embedded, "jobs", url=f"http://127.0.0.1:{free_port()}")
    assert res.returncode == 4 and res.stderr.startswith("Error: transport error: cannot connect")


@pytest.mark.unit
def test_step_parsing() -> None:
    from modelpress._cli import parse_step

    assert parse_step("prune.magnitude:sparsity=0.5,scope=layer") == {
        "method": "prune.magnitude",
        "params": {"sparsity": 0.5, "scope": "layer"},
    }
    assert parse_step('prune.wanda:mask=2:4,ignore=["lm_head", "x"],num_samples=8') == {
        "method": "prune.wanda",
        "params": {"mask": "2:4", "ignore": ["lm_head", "x"], "num_samples": 8},
    }
    assert parse_step('quantize.weight_only:bits=4,group_size=null,symmetric=false,tag="a,b"') == {
        "method": "quantize.weight_only",
        "params": {"bits": 4, "group_size": None, "symmetric": False, "tag": "a,b"},
    }
    assert parse_step("quantize.dynamic_int8") == {"method": "quantize.dynamic_int8", "params": {}}
    assert parse_step('{"method": "quantize.cast", "params": {"dtype": "bfloat16"}}') == {
        "method": "quantize.cast",
        "params": {"dtype": "bfloat16"},
    }
    for bad in ("", "a b", "m:k", "m:k=1,k=2", '{"params": {}}'):
        with pytest.raises(ValueError):
            parse_step(bad)


@pytest.mark.e2e
def test_keys_go_through_the_api_only_when_the_command_line_says_so(embedded, tmp_path) -> None:
    # The client's environment alone (MODELPRESS_URL / MODELPRESS_API_KEY) does not switch `keys` to
    # the API: it works on the server's database, and there is none here (nothing is created).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"MODELPRESS_URL": embedded.service.url, "MODELPRESS_API_KEY": embedded.key})
    res = subprocess.run(
        [MODELPRESS, "keys", "list"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1 and "no modelpress database" in res.stderr and "--api-key" in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []
    # --api-key on the command line: through the API ($MODELPRESS_URL fills in the address).
    res = subprocess.run(
        [MODELPRESS, "keys", "list", "--api-key", embedded.key, "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    keys = json.loads(res.stdout)
    assert {k["tenant"] for k in keys} == {"default"} and embedded.key not in res.stdout
    assert any(k["prefix"] == embedded.key.split("_")[1] and k["scopes"] == ["admin"] for k in keys)


@pytest.fixture
def cli(embedded, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    """The console script's main() in this process (no interpreter start per command): argv ->
    (exit code, stdout, stderr)."""
    from modelpress._entry import main

    monkeypatch.setenv("MODELPRESS_URL", embedded.service.url)
    monkeypatch.setenv("MODELPRESS_API_KEY", embedded.key)
    monkeypatch.setenv("MODELPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("COLUMNS", raising=False)

    def call(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        got = capsys.readouterr()
        return code, got.out, got.err

    return call


@pytest.mark.e2e
def test_models_jobs_watch_methods_and_80_columns(
    cli, embedded, cli_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    job, model = cli_job["job"], cli_job["model"]
    code, out, _ = cli("models", "show", model["id"], "--output", "json")
    assert code == 0 and json.loads(out)["id"] == model["id"]
    code, out, _ = cli("jobs", "list", "--limit", "100", "--output", "json")
    assert job["id"] in [j["id"] for j in json.loads(out)]
    monkeypatch.setenv("COLUMNS", "80")
    for argv in (("jobs",), ("jobs", "show", job["id"]), ("models",), ("report", job["id"])):
        code, out, err = cli(*argv)
        assert code == 0, err
        assert job["id"] in out or argv == ("models",)
        assert max(len(line) for line in out.splitlines()) <= 80, out
    monkeypatch.delenv("COLUMNS")

    # watch a finished job: its state at once, the exit code of its outcome.
    code, out, _ = cli("jobs", "watch", job["id"], "--output", "json")
    assert code == 0 and [json.loads(line)["status"] for line in out.splitlines()] == ["succeeded"]
    code, out, err = cli("watch", job["id"])
    assert code == 0 and job["id"] in out and "100% succeeded" in err  # the log line: not a terminal

    code, out, _ = cli("methods")
    assert code == 0 and "prune.magnitude" in out
    code, out, _ = cli("methods", "show", "prune.magnitude")
    assert code == 0 and "sparsity" in out and "parameters" in out
    code, out, _ = cli("methods", "show", "prune.magnitude", "--output", "json")
    assert json.loads(out)["name"] == "prune.magnitude"
    code, _, err = cli("methods", "show", "prune.magnitud")
    assert code == 2 and "did you mean prune.magnitude" in err

    code, out, _ = cli("sweeps", "--output", "json")
    assert code == 0 and isinstance(json.loads(out), list)
    code, _, err = cli("sweeps", "show", "no-such-sweep")
    assert code == 3 and err.startswith("Error: Not found")
    code, out, _ = cli("keys", "list", "--api-key", embedded.key, "--output", "json")
    assert code == 0 and any(k["scopes"] == ["admin"] for k in json.loads(out))


@pytest.mark.e2e
def test_datasets_and_models_show_and_delete(cli, tiny: dict[str, Path], tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("the first sample\nthe second sample\n")
    code, out, err = cli("datasets", "upload", str(calib), "--name", "cli-calib", "--json")
    assert code == 0, err
    ds = json.loads(out)
    code, out, _ = cli("datasets", "--output", "json")
    assert ds["id"] in [d["id"] for d in json.loads(out)]
    code, out, _ = cli("datasets", "show", ds["id"])
    assert code == 0 and "cli-calib" in out and ds["sha256"] in out
    code, _, err = cli("datasets", "delete", ds["id"])  # no terminal here: --yes is needed
    assert code == 2 and "without --yes" in err
    code, out, _ = cli("datasets", "delete", ds["id"], "--yes", "--output", "json")
    assert code == 0 and json.loads(out) == {"id": ds["id"], "kind": "dataset", "deleted": True}
    code, _, err = cli("datasets", "show", ds["id"])
    assert code == 3 and err.startswith("Error: Not found")

    code, out, err = cli("models", "upload", str(tiny["bare"]), "--name", "to-delete", "--json")
    assert code == 0, err
    model = json.loads(out)
    code, out, _ = cli("models", "show", model["id"])
    assert code == 0 and "to-delete" in out and model["sha256"] in out
    code, out, _ = cli("models", "delete", model["id"], "-y")
    assert code == 0 and out.strip() == f"model {model['id']} deleted"
    code, _, err = cli("models", "show", model["id"], "--json")
    assert code == 3 and err.startswith("Error: Not found")


@pytest.mark.integration
def test_the_console_script_answers_a_tab_and_version(tmp_path: Path) -> None:
    res = subprocess.run([MODELPRESS, "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("modelpress ")
    # What the completion script does at a TAB (argcomplete's protocol), answered through a file.
    answer = tmp_path / "answer"
    env = {
        **os.environ,
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": " ",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),
        "COMP_LINE": "modelpress datasets ",
        "COMP_POINT": "20",
    }
    res = subprocess.run([MODELPRESS], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert {"list", "show", "delete", "upload"} <= set(answer.read_text().split())
