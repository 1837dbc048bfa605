"""Engine, sessions, and the unit of work (the API wraps it in a request dependency: app/deps.py).

The request's session commits at the boundary (after the endpoint returns, before the response is
sent); work registered with ``after_commit`` (for example enqueueing a Celery task) runs only once
that commit succeeded, and is dropped on rollback.

Reads that need no transaction (polling a job) can use :func:`read_uow` instead: a session on an
autocommit connection, so a lookup is one round trip to the database (no BEGIN, no COMMIT). On
PostgreSQL, :class:`HotRead` runs one SELECT from ``async`` code on the event loop through
asyncpg, for the hottest path (bench/bench_load.py).

Pooled PostgreSQL connections are pinged before use only when they have sat idle in the pool for
``IDLE_PING_S`` or longer (a dead one is replaced, as ``pool_pre_ping`` would), not on every
checkout: under load a connection comes back to the pool and leaves it again within milliseconds,
and a ``SELECT 1`` per request was one round trip in five of a job poll. A connection that dies
while in steady use fails its statement; SQLAlchemy then invalidates the pool, the request
answers 503 (app/errors.py) and the next one connects afresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, Engine, Select, create_engine, event, exc
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.sql.dml import UpdateBase

from core.config import get_settings


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        db_path = make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets the API read while the worker process writes; FKs are off by default.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine)
    _blind_in_forks(engine)
    return engine


# Every PostgreSQL connection this process opened, to blind in a forked child (below).
_OPENED: weakref.WeakSet[Any] = weakref.WeakSet()


def _blind_in_forks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _opened(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        _OPENED.add(dbapi_conn)


def _blind_inherited_connections() -> None:
    """In a forked child, at once: point every inherited PostgreSQL socket at /dev/null.

    Why: a Celery prefork worker forks a new pool child whenever one dies, while the main
    process's own threads (reconciler, registry, webhooks) may be mid-query on pooled connections.
    The child inherits those sockets; ``engine.dispose(close=False)`` in ``worker_process_init``
    drops the pool, but a connection that was checked out at the fork is still referenced, and
    when the child finalizes it SQLAlchemy resets it (a ROLLBACK) on the parent's socket. The
    server's answers then go to whichever process reads first, and both get results of each
    other's statements from then on (seen in the chaos test: ``unexpected result EMPTY_QUERY from
    command 'ROLLBACK'``, selects answered by updates, a worker failing every job it took).
    Duplicating /dev/null over the descriptor in the child leaves the parent's socket untouched
    and makes anything the child does with its copy fail locally."""
    conns = list(_OPENED)
    _OPENED.clear()
    if not conns:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for conn in conns:
            try:
                fd = conn.pgconn.socket
            except Exception:  # noqa: BLE001 - closed, or not psycopg: nothing to blind
                continue
            if fd >= 0:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_blind_inherited_connections)


# A pooled connection idle at least this long is pinged before use (see the module docstring).
IDLE_PING_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_S:
            return  # a new connection, or one in steady use
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as e:  # the pool replaces the connection and tries again (3 times)
            raise exc.DisconnectionError(f"idle connection failed its ping: {e.__class__.__name__}") from e


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@lru_cache(maxsize=4)
def _read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


def get_read_sessionmaker() -> sessionmaker[Session]:
    """Sessions on autocommit connections from the engine's pool: every statement stands alone.
    (Keyed on the engine, so clearing get_engine's cache also gives new read sessions.)"""
    return _read_sessionmaker(get_engine())


# One asyncpg pool per event loop (its connections belong to the loop that opened them), for the
# database URL it was made for: (url, the task creating the pool).
_hot_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, asyncio.Task[Any]]] = (
    weakref.WeakKeyDictionary()
)
HOT_POOL_SIZE = 10  # as the sync engine's pool_size: one connection per request in flight under load
HOT_CONNECT_TIMEOUT_S = 10.0
# So an operator (and tests/test_api.py) can tell these connections apart in pg_stat_activity.
HOT_APPLICATION_NAME = "modelpress-api-hot-read"


def hot_reads_available() -> bool:
    """Whether :class:`HotRead` can run here: PostgreSQL only (SQLite, the embedded mode, has no
    asyncio driver installed; such code reads through :func:`read_uow` in the thread pool)."""
    return not get_settings().is_sqlite


async def _hot_pool() -> Any:
    url = get_settings().database_url
    loop = asyncio.get_running_loop()
    held = _hot_pools.get(loop)
    if held is None or held[0] != url or (held[1].done() and held[1].exception() is not None):
        held = _hot_pools[loop] = (url, loop.create_task(_open_pool(url)))
    # shield: a request cancelled while the pool opens must not cancel it for the others
    return await asyncio.shield(held[1])


# libpq connection keywords asyncpg does not read: it would send them to the server as settings,
# which refuses them (every read failing). Client-side only, so left out here.
_LIBPQ_CLIENT_ONLY = frozenset(
    {
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "gssencmode",
        "channel_binding",
        "requirepeer",
        "hostaddr",
        "load_balance_hosts",
        "fallback_application_name",
        "require_auth",
    }
)


def hot_dsn(url: str) -> tuple[str, float, dict[str, str]]:
    """The SQLAlchemy database URL as what asyncpg takes: the libpq URI (same server, database,
    user and TLS options), the connect timeout (``connect_timeout`` if the URL has one), and the
    server settings (``options=-c name=value ...`` from the URL, and the application name)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    query = dict(u.query)
    connect_timeout = query.pop("connect_timeout", None)  # a str (a tuple only if given twice)
    timeout = float(connect_timeout) if isinstance(connect_timeout, str) and connect_timeout else HOT_CONNECT_TIMEOUT_S
    settings: dict[str, str] = {}
    words = iter(str(query.pop("options", "")).split())  # libpq's: "-c name=value", "-cname=value", "--name=value"
    for word in words:
        if word == "-c":
            pair = next(words, "")
        elif word.startswith(("-c", "--")):
            pair = word[2:]
        else:
            continue
        name, eq, value = pair.partition("=")
        if eq:
            settings[name.replace("-", "_")] = value
    query = {k: v for k, v in query.items() if k not in _LIBPQ_CLIENT_ONLY}
    settings["application_name"] = HOT_APPLICATION_NAME
    dsn = u.set(drivername="postgresql", query=query).render_as_string(hide_password=False)
    return dsn, timeout, settings


async def _open_pool(url: str) -> Any:
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

    dsn, connect_timeout, settings = hot_dsn(url)

    async def _init(conn: Any) -> None:
        # json and jsonb as Python objects, as SQLAlchemy's JSON type gives them.
        for name in ("json", "jsonb"):
            await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")

    async def _reset(_conn: Any) -> None:
        # Nothing to undo: these connections only ever run one SELECT outside a transaction (asyncpg
        # still rolls back an open one first). The default reset (RESET ALL, UNLISTEN *, ...) is
        # a round trip per release, a third of the hot read's cost.
        return None

    # min_size=0: nothing connects until a request needs it (creating the pool cannot fail while
    # the database is down); each statement is prepared once per connection (asyncpg's cache).
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=HOT_POOL_SIZE,
        init=_init,
        reset=_reset,
        timeout=connect_timeout,
        server_settings=settings,
    )


def _hot_error(e: BaseException, sql: str, params: Any) -> tuple[exc.DBAPIError, bool] | None:
    """asyncpg's exception as the SQLAlchemy class app/errors.py answers for (503 for an
    unreachable or restarting server, 422 for a value PostgreSQL refuses), and whether the
    connection it happened on is lost or in an unknown state (the read may be tried again on
    another); None if ``e`` is not a database error."""
    import asyncpg

    if isinstance(
        e,
        (
            OSError,
            TimeoutError,
            asyncpg.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,
            asyncpg.exceptions.InsufficientResourcesError,
        ),
    ):
        return exc.OperationalError(sql, params, e), True
    if isinstance(e, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
        # ConnectionDoesNotExistError, or a protocol caught between states: seen when the server
        # ended the session (pg_terminate_backend, a restart) just before the query went out, the
        # FATAL message read but the socket's close not yet.
        return exc.OperationalError(sql, params, e), True
    if isinstance(e, asyncpg.DataError):
        return exc.DataError(sql, params, e), False
    if isinstance(e, asyncpg.PostgresError):
        return exc.DBAPIError(sql, params, e), False
    return None


class HotRead:
    """One SELECT of table columns for a hot ``async`` path (polling a job), run on the event loop
    through asyncpg: compiled once for SQLAlchemy's asyncpg dialect, prepared once per pooled
    connection, its values passed through each column type's SQLAlchemy result processor, so
    :meth:`first` returns what ``session.execute(stmt, params).first()`` would (as a named tuple).

    Why not the sync engine, or SQLAlchemy's asyncio layer: a hop to the thread pool cost a job
    poll more CPU than its query, and psycopg's asyncio connection through SQLAlchemy cost
    ~240 µs of CPU a query where asyncpg's pool and prepared statement cost ~90 µs
    (bench/bench_load.py, docs/BENCHMARKS.md). The pool is asyncpg's (one per event loop, up to
    ``HOT_POOL_SIZE`` connections opened on demand); each statement is its own transaction, so it
    must not write.

    Errors are raised as SQLAlchemy's exception classes, so app/errors.py answers 503 / 422 as for
    any other query. A lost connection (the server restarted) expires every pooled connection and
    the read is tried once more on a fresh one: a read is safe to repeat, and the first request
    after a restart need not fail. PostgreSQL only (:func:`hot_reads_available`)."""

    def __init__(self, stmt: Select[*tuple[Any, ...]]) -> None:
        from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

        dialect = PGDialect_asyncpg()  # type: ignore[no-untyped-call]  # SQLAlchemy leaves it untyped
        compiled = stmt.compile(dialect=dialect)
        self.sql: str = compiled.string
        self._param_names = list(compiled.positiontup or ())
        self._columns = list(stmt.selected_columns)
        self._dialect = dialect
        self.row_type = namedtuple("HotRow", [c.key for c in self._columns])  # type: ignore[misc]
        self._processors: list[Any] | None = None  # known once the statement's result types are
        self._plain = False

    def _set_processors(self, oids: list[int]) -> None:
        d = self._dialect
        self._processors = [
            c.type.dialect_impl(d).result_processor(d, oid) for c, oid in zip(self._columns, oids, strict=True)
        ]
        self._plain = not any(self._processors)

    async def first(self, params: dict[str, Any]) -> Any:
        args = [params[n] for n in self._param_names]
        pool = None
        # A read that failed on a pooled connection the server had dropped (a restart, a failover,
        # pg_terminate_backend) is tried again: each failure closes its connection, and up to
        # HOT_POOL_SIZE of them may have been dropped at once, so one retry is not enough when
        # several requests race for the stale ones. A connect that fails (the server is down)
        # is retried once only: nothing is gained by knocking on a closed door ten times.
        for attempt in range(1, HOT_POOL_SIZE + 2):
            on_pooled = False
            try:
                pool = pool or await _hot_pool()
                async with pool.acquire() as conn:
                    on_pooled = True
                    try:
                        if self._processors is None:  # first use: the result column types, from the server
                            self._set_processors([a.type.oid for a in (await conn.prepare(self.sql)).get_attributes()])
                        record = await conn.fetchrow(self.sql, *args)
                    except BaseException as e:
                        known = _hot_error(e, self.sql, params)
                        if known is None or known[1]:
                            # Lost, or in a state nobody knows (interrupted mid-query, an
                            # unexpected error): closed, so the pool opens a new one in its place.
                            conn.terminate()
                        raise
                break
            except Exception as e:
                known = _hot_error(e, self.sql, params)
                if known is None:
                    raise
                error, lost = known
                if lost and (attempt == 1 or (on_pooled and attempt <= HOT_POOL_SIZE)):
                    if pool is not None and attempt == 1:
                        # The others were most likely lost too: each is replaced at its next
                        # acquire. (A coroutine: not awaited, it expired nothing, and a request
                        # racing for the dropped connections could get two stale ones in a row.)
                        await pool.expire_connections()
                    continue
                raise error from e
        if record is None:
            return None
        processors = self._processors
        if self._plain or processors is None:
            return self.row_type(*record)
        return self.row_type(*[p(v) if p is not None else v for p, v in zip(processors, record, strict=True)])


def rowcount(session: Session, stmt: UpdateBase) -> int:
    """Run an INSERT, UPDATE or DELETE in ``session``; the number of rows it matched."""
    result = session.execute(stmt)
    assert isinstance(result, CursorResult)  # what a DML statement's execution always gives
    return result.rowcount


class UnitOfWork:
    def __init__(self, session: Session) -> None:
        self.session = session
        self._after_commit: list[Callable[[], None]] = []
        self._on_rollback: list[Callable[[], None]] = []

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the transaction is committed (e.g. enqueue a task for a new row)."""
        self._after_commit.append(fn)

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the transaction does not commit (e.g. remove files written for it)."""
        self._on_rollback.append(fn)

    def commit(self) -> None:
        try:
            self.session.commit()
        except BaseException:
            self.rollback()
            raise
        hooks, self._after_commit, self._on_rollback = self._after_commit, [], []
        for fn in hooks:
            fn()

    def rollback(self) -> None:
        self.session.rollback()
        hooks, self._after_commit, self._on_rollback = self._on_rollback, [], []
        for fn in hooks:
            fn()


def get_uow() -> Iterator[UnitOfWork]:
    with get_sessionmaker()() as session:
        uow = UnitOfWork(session)
        try:
            yield uow
        except BaseException:
            uow.rollback()
            raise
        else:
            uow.commit()


@contextmanager
def read_uow() -> Iterator[UnitOfWork]:
    """A unit of work for reads only, on an autocommit connection: each statement is its own
    transaction (one round trip: no BEGIN, no COMMIT), so it must not write, and two reads in it
    may see different snapshots. Closing it returns the connection to the pool."""
    with get_read_sessionmaker()() as session:
        yield UnitOfWork(session)
