"""The ``modelpress`` console script.

    modelpress serve [--host H] [--port P]     API (embedded mode: also a worker subprocess)
    modelpress worker [--queues cpu] [-c N]    a Celery worker
    modelpress migrate                         alembic upgrade head
    modelpress reconcile [--once]              re-send messages of stale jobs
    modelpress keys create --tenant NAME [--admin]   print a new API key for the tenant
    modelpress keys list [--tenant NAME]       the keys (every tenant's unless --tenant), never secrets
    modelpress keys show KEY                   one key by id, prefix or the whole key, never its secret
    modelpress keys revoke KEY                 revoke a key by id, prefix or the whole key

The ``keys`` commands work on the database of the server's settings (run them where the server
runs); given ``--url`` or ``--api-key`` they go through the API instead, with an admin key
(modelpress/_cli.py). A revocation is seen by every API process within a second (app/auth.py).

``serve``, ``worker`` and ``reconcile`` refuse to start (a message on stderr, exit 2) in cluster
mode without ``MODELPRESS_SECRET_KEY`` (core/signing.py), and with a ``MODELPRESS_PUBLIC_BASE_URL``
that is not an absolute http(s) URL. ``serve`` in embedded mode without a public base URL sets it
from ``--host``/``--port``; in cluster mode links stay relative until one is configured.

The client subcommands (upload, upload-dataset, compress, jobs, status, wait, cancel, download,
report) talk to a running service over HTTP; they live in ``modelpress._cli`` (the SDK's CLI).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


def _alembic_config():  # noqa: ANN202
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def migrate() -> None:
    from alembic import command

    from core.config import get_settings

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(_alembic_config(), "head")


def cmd_migrate(_args: argparse.Namespace) -> int:
    migrate()
    print("database schema is at head")
    return 0


def _refuse_to_start(command: str) -> bool:
    """Print why this configuration may not run ``command`` (a long-running server process) and
    return True, or return False if it may. Checked before anything starts, so a misconfigured
    process exits at once with the reason instead of signing what no other host can verify."""
    from core.config import get_settings
    from core.signing import BadPublicBaseUrl, check_public_base_url, secret_key_problem

    s = get_settings()
    problems = [p for p in (secret_key_problem(s),) if p]
    try:
        check_public_base_url(s.public_base_url)
    except BadPublicBaseUrl as e:
        problems.append(str(e))
    for p in problems:
        print(f"modelpress {command}: refusing to start: {p}", file=sys.stderr, flush=True)
    return bool(problems)


def cmd_reconcile(args: argparse.Namespace) -> int:
    import threading

    if _refuse_to_start("reconcile"):
        return 2
    from core.reconcile import reconcile_once, start_background

    if args.once:
        for job_id in reconcile_once():
            print(job_id)
        return 0
    stop = threading.Event()
    start_background(stop).join()
    return 0


def _keys_on_db(args: argparse.Namespace, work: Any) -> int:
    """Run ``work(session)`` for a ``keys`` command on the database, committing after it; the
    errors an operator can fix are one line on stderr, not a traceback."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from core.config import get_settings
    from core.db import get_sessionmaker
    from core.errors import ModelpressError
    from modelpress._cli import EXIT_API, EXIT_USAGE

    settings = get_settings()
    if settings.is_sqlite:
        from sqlalchemy.engine import make_url

        path = make_url(settings.database_url).database
        if path and path != ":memory:" and not Path(path).exists():
            # Not here: opening it would leave an empty database file behind (a client's folder).
            print(
                f"Error: no modelpress database at {path}: run this where the server runs, with its MODELPRESS_* "
                "settings, or pass --url / --api-key to go through the API",
                file=sys.stderr,
            )
            return 1
    try:
        with get_sessionmaker()() as s:
            work(s)
            s.commit()
    except ModelpressError as e:
        print(f"Error: {e.title}: {e.detail}", file=sys.stderr)
        return EXIT_USAGE if e.status == 422 else EXIT_API
    except (OperationalError, ProgrammingError) as e:
        from sqlalchemy.engine import make_url

        db = make_url(get_settings().database_url).render_as_string(hide_password=True)
        print(
            f"Error: cannot use the API keys of the database {db} ({type(e.orig or e).__name__}): run this where the "
            "server runs, with its MODELPRESS_* settings (after `modelpress migrate`), or pass --url / --api-key "
            "to go through the API",
            file=sys.stderr,
        )
        return 1
    return 0


def _client_keys_command(name: str) -> Any:
    import modelpress._cli as client_cli

    fn = getattr(client_cli, name)
    return lambda args: client_cli.run(fn, args)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from modelpress._cli import print_created, through_api

    if through_api(args):
        return _client_keys_command("cmd_keys_create")(args)
    from app.keys import service

    made: list[Any] = []

    def work(s: Any) -> None:
        made.append(service.create(s, args.tenant, ["admin"] if args.admin else []))

    rc = _keys_on_db(args, work)
    if rc == 0:  # printed once committed: a key that is shown works
        print_created(made[0], args.json)
    return rc


def cmd_keys_list(args: argparse.Namespace) -> int:
    from modelpress._cli import print_keys, through_api

    if through_api(args):
        return _client_keys_command("cmd_keys_list")(args)
    from app.keys import repository, service

    def work(s: Any) -> None:
        tenant_id = None
        if args.tenant:
            tenant_id = repository.tenant_id_of(s, args.tenant)
            if tenant_id is None:
                from core.errors import NotFound

                raise NotFound(f"no tenant {args.tenant}")
        rows = repository.list_page(s, tenant_id, args.limit or 10_000, None)
        print_keys(service.out(s, rows), args.json)

    return _keys_on_db(args, work)


def cmd_keys_show(args: argparse.Namespace) -> int:
    from modelpress._cli import find_key, print_key, through_api

    if through_api(args):
        return _client_keys_command("cmd_keys_show")(args)
    from app.keys import repository, service

    def work(s: Any) -> None:
        key = find_key(service.out(s, repository.list_page(s, None, 100_000, None)), args.key)
        if key is None:
            from core.errors import NotFound

            raise NotFound(f"no key {args.key}")
        print_key(key, args.json)

    return _keys_on_db(args, work)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from modelpress._cli import key_prefix_or_id, print_revoked, through_api

    if through_api(args):
        return _client_keys_command("cmd_keys_revoke")(args)
    from app.keys import service

    shown: list[Any] = []

    def work(s: Any) -> None:
        # The revocation's NOTIFY (PostgreSQL) reaches every API process at this session's commit.
        shown.append(service.revoke(s, key_prefix_or_id(args.key))[0])

    rc = _keys_on_db(args, work)
    if rc == 0:
        print_revoked(shown[0], args.json)
    return rc


def _bootstrap_key(data_dir: Path) -> str:
    """Embedded mode: one key for tenant 'default', kept in <data_dir>/api-key (mode 0600) so each
    start can print it (only its digest is in the database).

    It is an admin key: embedded mode is one operator's service on one host, and whoever can read
    <data_dir> can use the database directly anyway; so `modelpress keys ...` through the API works
    with the key `serve` prints. A bootstrap key made before scopes existed is made admin here."""
    from app.auth import ADMIN, resolve_key
    from app.keys import repository
    from app.keys.service import create_key
    from core.db import get_sessionmaker

    path = data_dir / "api-key"
    with get_sessionmaker()() as s:
        if path.exists():
            key = path.read_text().strip()
            caller = resolve_key(s, key)
            if caller is not None:
                if not caller.is_admin:
                    repository.grant(s, caller.key_id, ADMIN)
                    s.commit()
                return key
        key = create_key(s, "default", [ADMIN])
        s.commit()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _die_with_parent() -> None:
    """In the embedded worker, before exec: the kernel sends it SIGTERM when `serve` dies, even
    by SIGKILL, so no orphan worker keeps taking jobs (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# After this many HTTP requests the server is warm: see run_uvicorn.
FREEZE_AFTER_REQUESTS = 1000


class _FreezeWhenWarm:
    """ASGI wrapper: at the start of the ``after``-th HTTP request, one ``gc.collect()`` then
    ``gc.freeze()`` (see run_uvicorn); otherwise a pass-through."""

    def __init__(self, app: Any, after: int) -> None:
        self.app = app
        self.left = after

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.left > 0 and scope["type"] == "http":
            self.left -= 1
            if self.left == 0:
                _freeze_heap()
        await self.app(scope, receive, send)


def _freeze_heap() -> None:
    import gc

    gc.collect()
    gc.freeze()


def run_uvicorn(app: Any, host: str, port: int) -> None:
    """Serve ``app`` as ``modelpress serve`` does: one process, uvicorn's own access log off (the
    app's middleware writes one), uvicorn's loggers propagating to our root handler
    (app/observability/). bench/bare_app.py serves its bare endpoint through this too, so a load
    comparison runs both apps under the same server configuration.

    The garbage collector: a full collection walks every object the process holds that could be
    in a cycle, ~100 ms on this project's machines for the ~110k objects of the imported modules
    and the app, and under load one ran every ~2 s, a pause of the whole server that every
    request in flight waited out (bench/bench_load.py: p99 ~100 ms at p90 ~20 ms). So what lives
    as long as the process is moved out of its reach with ``gc.freeze()``: everything allocated
    before serving, and once more at the ``FREEZE_AFTER_REQUESTS``-th request, what the first
    requests built lazily (the database dialect, drivers' type caches, compiled statements; ~20k
    objects). Collections then walk only what requests allocate. (A frozen object that later
    becomes cyclic garbage is never freed: at most the handful of requests in flight at that
    instant, once.)"""
    import uvicorn

    from core.config import get_settings

    _freeze_heap()
    uvicorn.run(
        _FreezeWhenWarm(app, FREEZE_AFTER_REQUESTS),
        host=host,
        port=port,
        log_level=get_settings().log_level.lower(),
        access_log=False,
        log_config=None,
    )


# Allocations of this size and more are mapped on their own and given back to the system when
# freed (glibc's M_MMAP_THRESHOLD); see _bound_malloc.
MMAP_THRESHOLD_BYTES = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _bound_malloc() -> None:
    """Transfers (tus PATCH batches of 4 MiB, import reads of an S3 part, S3 puts) allocate and free
    buffers of megabytes, from several threads. glibc raises its mmap threshold to the size of the
    largest such buffer freed (up to 32 MB), after which they come from the threads' heap arenas
    and stay in the process once freed: the API grew by 100-150 MB over a 5 GB upload or import
    (docs/BENCHMARKS.md). A fixed threshold of 1 MiB keeps every transfer buffer in a mapping of
    its own, unmapped when freed. Not set where the operator chose one (MALLOC_MMAP_THRESHOLD_),
    nor outside glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import configure_mappers

    from app.main import create_app
    from core.config import get_settings

    if _refuse_to_start("serve"):
        return 2
    _bound_malloc()
    from core.signing import serve_base_url

    s = get_settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    s.tmp_dir.mkdir(parents=True, exist_ok=True)
    if not s.public_base_url.strip() and s.mode == "embedded":
        # Links name the address this server listens on (the embedded worker inherits it too).
        s.public_base_url = os.environ["MODELPRESS_PUBLIC_BASE_URL"] = serve_base_url(args.host, args.port)
    elif not s.public_base_url.strip():
        import logging

        logging.getLogger("modelpress.cli").warning(
            "MODELPRESS_PUBLIC_BASE_URL is not set: signed links are relative (/v1/...); the SDK and CLI "
            "complete them with the address they use, a browser needs the service's public address in front"
        )
    worker: subprocess.Popen | None = None
    if s.mode == "embedded":
        migrate()
        key = _bootstrap_key(s.data_dir)
        if s.embedded_worker:
            worker = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", "--concurrency", str(s.worker_concurrency)],
                preexec_fn=_die_with_parent,
            )
        print(f"modelpress (embedded) on http://{args.host}:{args.port}  data: {s.data_dir}", flush=True)
        print(f"API key: {key}", flush=True)
        print(f"try:  curl -H 'Authorization: Bearer {key}' http://{args.host}:{args.port}/v1/methods", flush=True)
    else:
        print(f"modelpress (cluster) on http://{args.host}:{args.port}", flush=True)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default action that
    # kills this process before the `finally` below could stop the embedded worker.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        app = create_app()
        configure_mappers()  # what the first query would do, before run_uvicorn freezes the heap
        run_uvicorn(app, args.host, args.port)
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Check the configuration here, then become the worker: ``python -m worker`` (worker/__main__.py)
    replaces this process (same pid), so the API's code never imports the worker's."""
    from core.config import get_settings
    from core.queue import QUEUES

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        print(
            f"modelpress worker: unknown queue(s) {', '.join(unknown) or '(none given)'}; "
            f"the queues are {', '.join(QUEUES)}",
            file=sys.stderr,
        )
        return 2
    if _refuse_to_start("worker"):
        return 2
    s = get_settings()
    pool, concurrency = args.pool or "prefork", args.concurrency or s.worker_concurrency
    if "gpu" in queues:
        # One job at a time in the worker's own process: CUDA does not survive a fork, and one
        # process per GPU (CUDA_VISIBLE_DEVICES) keeps jobs from sharing a device's memory.
        if args.pool not in (None, "solo") or args.concurrency not in (None, 1):
            print(
                "modelpress worker: a gpu-queue worker runs one job at a time (--pool solo, --concurrency 1); "
                "run one process per GPU, e.g. CUDA_VISIBLE_DEVICES=0 modelpress worker --queues gpu",
                file=sys.stderr,
            )
            return 2
        pool, concurrency = "solo", 1
    s.tmp_dir.mkdir(parents=True, exist_ok=True)
    if s.mode == "embedded":
        migrate()
    argv = [
        sys.executable,
        "-m",
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
    ]
    if args.allow_no_gpu:
        argv.append("--allow-no-gpu")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelpress", description="Compression as a service for transformer models.")
    sub = p.add_subparsers(dest="command", required=True)

    _add_server_commands(sub)
    _add_keys_commands(sub)

    from modelpress._cli import add_client_commands

    add_client_commands(p, sub)
    return p


def _add_server_commands(sub: Any) -> None:
    """serve, worker, reconcile, migrate."""
    sp = sub.add_parser("serve", help="run the API (embedded mode also runs a worker subprocess)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.set_defaults(fn=cmd_serve)

    wp = sub.add_parser("worker", help="run a Celery worker")
    wp.add_argument(
        "--queues",
        default="cpu",
        help="comma-separated queues: cpu, gpu (default cpu); "
        "with gpu: solo pool, one job at a time, and a CUDA device is required (one process per GPU)",
    )
    wp.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=None,
        help="worker processes (default MODELPRESS_WORKER_CONCURRENCY; 1 with gpu)",
    )
    wp.add_argument(
        "--pool",
        default=None,
        choices=["prefork", "solo", "threads"],
        help="Celery pool (default prefork; solo with gpu)",
    )
    wp.add_argument(
        "--allow-no-gpu",
        action="store_true",
        help="serve the gpu queue without a CUDA device, on the CPU (tests, dry runs)",
    )
    wp.set_defaults(fn=cmd_worker)

    rp = sub.add_parser(
        "reconcile",
        help="re-send the messages of stale jobs (workers also do this every MODELPRESS_RECONCILE_INTERVAL_S)",
    )
    rp.add_argument("--once", action="store_true", help="one pass; print the ids of the jobs re-sent")
    rp.set_defaults(fn=cmd_reconcile)

    mp = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    mp.set_defaults(fn=cmd_migrate)


def _add_keys_commands(sub: Any) -> None:
    """keys create / list / revoke: on the database, or through the API with --url/--api-key."""
    from modelpress._cli import common_flags

    kp = sub.add_parser(
        "keys",
        help="manage API keys (the database here; with --url/--api-key, the API)",
        description="Manage API keys. Without --url or --api-key: on the database of the server's "
        "MODELPRESS_* settings (run where the server runs). With either: through the API, with an "
        "admin key ($MODELPRESS_URL / $MODELPRESS_API_KEY fill in the other).",
    )
    ksub = kp.add_subparsers(dest="keys_command", required=True)
    common = [common_flags()]
    kc = ksub.add_parser("create", parents=common, help="create a key for a tenant (created if new) and print it")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--admin", action="store_true", help="the admin scope: list, create and revoke every tenant's keys")
    kc.set_defaults(fn=cmd_keys_create)
    kl = ksub.add_parser("list", parents=common, help="list keys, newest first (never their secrets)")
    kl.add_argument(
        "--tenant",
        help="one tenant's keys (default: every tenant's on the database; the key's own tenant's through the API)",
    )
    kl.add_argument("--all", dest="all_tenants", action="store_true", help="through the API: every tenant's keys")
    kl.add_argument("--limit", type=int, default=None, help="at most N keys")
    kl.set_defaults(fn=cmd_keys_list)
    ks = ksub.add_parser(
        "show", parents=common, help="one key: its id, prefix, tenant, scopes, dates (never its secret)"
    )
    ks.add_argument("key", metavar="KEY", help="the key's id, its prefix, or the whole key (only its prefix is used)")
    ks.add_argument("--all", dest="all_tenants", action="store_true", help="through the API: among every tenant's keys")
    ks.set_defaults(fn=cmd_keys_show)
    kr = ksub.add_parser("revoke", parents=common, help="revoke a key; every API process refuses it within a second")
    kr.add_argument("key", metavar="KEY", help="the key's id, its prefix, or the whole key (only its prefix is used)")
    kr.set_defaults(fn=cmd_keys_revoke)


# The commands that run server code in this process (by their function's name): the API, a worker,
# the schema, the reconciler, and `keys` on the database. Everything else is a client command
# (modelpress/_cli.py). `keys ... --url/--api-key` is a client too: see :func:`runs_server`.
KEYS_COMMANDS = ("cmd_keys_create", "cmd_keys_list", "cmd_keys_show", "cmd_keys_revoke")
SERVER_COMMANDS = ("cmd_serve", "cmd_worker", "cmd_migrate", "cmd_reconcile", *KEYS_COMMANDS)
_SERVER_COMMANDS = SERVER_COMMANDS  # the old name: modelpress/_entry.py reads it


def runs_server(args: argparse.Namespace) -> bool:
    """Whether the parsed command runs server code here: a server command, except a ``keys``
    command sent through the API (``--url``/``--api-key``), which is a client of it."""
    command = getattr(args.fn, "__name__", "")
    if command in KEYS_COMMANDS:
        from modelpress._cli import through_api

        return not through_api(args)
    return command in SERVER_COMMANDS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if runs_server(args):
        # Server processes log through our formatter (MODELPRESS_LOG_FORMAT json|text); the client
        # commands (modelpress/_cli.py) skip importing the server's settings and FastAPI.
        from core.config import get_settings
        from core.logs import configure_logging

        configure_logging(get_settings())
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
