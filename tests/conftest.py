"""Fixtures that run the real thing: PostgreSQL, Redis, a Celery worker process and the API
process for cluster mode; SQLite, kombu's SQLAlchemy transport and the API's own worker
subprocess for embedded mode. Nothing of Postgres, Redis or Celery is mocked."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REDIS_URL, Service, build_tiny_models
from tests.servers import private_database

TIERS = ("unit", "integration", "e2e")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test carries exactly one tier (pyproject's markers): ``unit`` (in-process and quick: no
    server, no subprocess, no network, no whole method run on a model; ``make test-unit``),
    ``integration`` (real PostgreSQL, Redis, Celery and API processes, subprocesses, or whole
    methods run in-process on tiny models) or ``e2e`` (whole flows: the CLI, a browser,
    docker-compose, chaos).
    ``slow`` is orthogonal. A test with no tier or two fails the collection."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one of the tier markers {', '.join(TIERS)} "
            "(pytestmark = pytest.mark.<tier> in its module, or on the test):\n" + "\n".join(wrong)
        )
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        _schedule_for_xdist(items)


class _LoadGroupIds:
    """pytest 9.2 keeps node ids structured, and xdist 3.8.0 still writes the group suffix into the
    old ``_nodeid`` field: ``--dist loadgroup`` silently stops grouping (pytest-dev/pytest-xdist
    #1386, fix in #1388). Until that is released, write the ``@group`` suffix the scheduler reads
    into the structured id, where xdist did not already (trylast: after xdist's own hook)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not getattr(config.option, "loadgroup", False):
            return
        from _pytest.nodeid import coerce_node_id

        for item in items:
            marks = item.iter_markers("xdist_group")
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks})
            if names and "@" not in item.nodeid.rsplit("]", 1)[-1]:
                item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_LoadGroupIds(), "modelpress-loadgroup-ids")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under ``--dist loadgroup`` a non-unit test without an ``xdist_group`` joins its module's
    group (see _schedule_for_xdist); marked here, before any collection_modifyitems hook reads it."""
    grouped = any(item.iter_markers("xdist_group")) or item.get_closest_marker("unit") is not None
    if getattr(item.config.option, "loadgroup", False) and not grouped:
        item.add_marker(pytest.mark.xdist_group(item.path.stem))


def _schedule_for_xdist(items: list[pytest.Item]) -> None:
    """``make test`` runs ``-n auto --dist loadgroup``. Each xdist worker has its own session
    fixtures (a private database, Redis key prefix, ports, tmp dirs: nothing here is shared by
    name), so a test may run on either worker; what is grouped is for speed or for timing:

    * a test with an ``xdist_group`` mark goes, with its whole group, to one worker. The modules
      that kill processes or servers and bound how fast things recover (chaos, heartbeat,
      outages, leftovers, limits) share the group "kills": they run one after another on one
      worker, never two of them at once on this machine's cores;
    * every other non-unit test is grouped by its module: module-scoped fixtures start servers
      (plan_stack, replicas, beat, ...), which a module split over two workers would start twice;
    * unit tests stay ungrouped: scheduled one by one, they fill the end of the run.

    (xdist 3.8.0 does not group under pytest 9.2 by itself: _LoadGroupIds below.) Order (the
    scheduler hands groups out in collection order, ``--no-loadscope-reorder``): groups
    with a ``slow`` test first (the longest tests start first), then the other groups, then the
    unit tests."""
    groups: dict[str, int] = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is not None:
            name = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
            slow = item.get_closest_marker("slow") is not None
            groups[name] = min(groups.get(name, 1), 0 if slow else 1)

    def rank(item: pytest.Item) -> int:
        mark = item.get_closest_marker("xdist_group")
        if mark is None:
            return 2
        return groups[mark.args[0] if mark.args else mark.kwargs.get("name", "default")]

    items.sort(key=rank)  # stable: collection order within each rank


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.gpu`` tests need CUDA. Without it they are skipped with the reason, and
    ``-ra`` (pyproject addopts) lists every skip at the end of the run: reported, not hidden."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU; this machine has none (GPU results: docs/LLM_METHODS.md)")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@dataclass
class Stack:
    mode: str
    service: Service
    key: str
    other_key: str  # a second tenant
    data_dir: Path
    database_url: str

    def client(self, key: str | None = "default"):  # noqa: ANN201
        return self.service.client(self.key if key == "default" else key)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A private database on the machine's PostgreSQL, dropped at the end."""
    with private_database() as url:
        yield url


# The webhook tests' receiver listens on loopback; short retries keep them fast.
WEBHOOK_ENV = {
    "MODELPRESS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
    "MODELPRESS_WEBHOOK_BACKOFF_S": "0.2",
    "MODELPRESS_WEBHOOK_POLL_INTERVAL_S": "0.2",
}


def _cluster_env(db_url: str, data_dir: Path, prefix: str) -> dict[str, str]:
    return {
        "MODELPRESS_MODE": "cluster",
        "MODELPRESS_DATABASE_URL": db_url,
        "MODELPRESS_BROKER_URL": REDIS_URL,
        "MODELPRESS_BROKER_KEY_PREFIX": prefix,
        "MODELPRESS_DATA_DIR": str(data_dir),
        # Small, so the 413 test sends only a few MB (the largest test model is ~19 MB).
        "MODELPRESS_MAX_UPLOAD_BYTES": str(24 * 1024 * 1024),
        **WEBHOOK_ENV,
    }


@pytest.fixture(scope="session")
def cluster(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("cluster")
    svc = Service(_cluster_env(pg_database, data, f"mptest-{uuid.uuid4().hex[:8]}:"), data, worker=True)
    svc.cli("migrate")
    key, other = svc.cli("keys", "create", "--tenant", "alpha"), svc.cli("keys", "create", "--tenant", "beta")
    svc.start()
    yield Stack("cluster", svc, key, other, data, pg_database)
    svc.stop()


@pytest.fixture(scope="session")
def cluster_no_worker(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Same database, its own Redis key prefix and no worker: jobs stay queued."""
    data = tmp_path_factory.mktemp("cluster-idle")
    svc = Service(_cluster_env(pg_database, data, f"mptest-idle-{uuid.uuid4().hex[:8]}:"), data, worker=False)
    svc.cli("migrate")
    key = svc.cli("keys", "create", "--tenant", f"idle-{uuid.uuid4().hex[:6]}")
    svc.start()
    yield Stack("cluster", svc, key, key, data, pg_database)
    svc.stop()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("embedded")
    svc = Service({"MODELPRESS_MODE": "embedded", "MODELPRESS_DATA_DIR": str(data), **WEBHOOK_ENV}, data, worker=False)
    svc.start()  # `serve` migrates, writes the bootstrap key and starts its own worker
    key = (data / "api-key").read_text().strip()
    other = svc.cli("keys", "create", "--tenant", "other")
    yield Stack("embedded", svc, key, other, data, f"sqlite:///{data / 'modelpress.sqlite3'}")
    svc.stop()


@pytest.fixture(scope="session", params=["cluster", "embedded"])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue(request.param)
