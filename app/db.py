"""Engine, sessions, and the request-scoped unit of work.

The request's session commits at the boundary (after the endpoint returns, before the response is
sent); work registered with ``after_commit`` (for example enqueueing a Celery task) runs only once
that commit succeeded, and is dropped on rollback.

Reads that need no transaction (polling a job) can use :func:`read_uow` instead: a session on an
autocommit connection, so a lookup is one round trip to the database (no BEGIN, no COMMIT). On
PostgreSQL, :func:`async_read_engine` gives the same kind of connection to ``async`` code through
psycopg's asyncio driver: no hop to the thread pool, whose hand-off cost a job poll more CPU than
its query (bench/bench_load.py). :class:`HotRead` runs one such SELECT on it for the hottest path.

Pooled PostgreSQL connections are pinged before use only when they have sat idle in the pool for
``IDLE_PING_S`` or longer (a dead one is replaced, as ``pool_pre_ping`` would), not on every
checkout: under load a connection comes back to the pool and leaves it again within milliseconds,
and a ``SELECT 1`` per request was one round trip in five of a job poll. A connection that dies
while in steady use fails its statement; SQLAlchemy then invalidates the pool, the request
answers 503 (app/errors.py) and the next one connects afresh.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends
from sqlalchemy import Engine, Select, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        db_path = make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            # WAL lets the API read while the worker process writes; FKs are off by default.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_when_idle(engine)
    return engine


# A pooled connection idle at least this long is pinged before use (see the module docstring).
IDLE_PING_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record) -> None:  # noqa: ANN001
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn, record, _proxy) -> None:  # noqa: ANN001
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


# One asyncio engine per event loop (its connections belong to the loop that opened them), for
# the database URL it was made for.
_async_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, AsyncEngine]] = weakref.WeakKeyDictionary()


def async_read_engine() -> AsyncEngine | None:
    """An asyncio engine on autocommit connections, for reads from ``async`` code, each statement
    its own transaction (it must not write); None on SQLite (no asyncio driver is installed:
    such code reads through :func:`read_uow` in the thread pool). Its pool is separate from the
    sync engine's, sized the same (connections are opened on demand; fewer pooled than requests in
    flight would open and close one per request), and pings idle connections the same way. Call
    it on the event loop."""
    url = get_settings().database_url
    if url.startswith("sqlite"):
        return None
    loop = asyncio.get_running_loop()
    held = _async_engines.get(loop)
    if held is not None and held[0] == url:
        return held[1]
    from sqlalchemy.ext.asyncio import create_async_engine

    # Autocommit connections have no transaction to roll back when they return to the pool.
    engine = create_async_engine(url, pool_size=10, max_overflow=20, isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
    _ping_when_idle(engine.sync_engine)
    _async_engines[loop] = (url, engine)
    return engine


class HotRead:
    """One SELECT of table columns for a hot ``async`` path, run on a pooled connection of
    :func:`async_read_engine` straight through psycopg's ``AsyncConnection``: compiled once per
    dialect, its values passed through each column type's own SQLAlchemy result processor, so
    :meth:`first` returns what ``(await conn.execute(stmt, params)).first()`` would (as a named
    tuple) for about half the CPU: SQLAlchemy's asyncio adaptation layer was the largest single
    cost of a job poll (bench/bench_load.py). The pool, its idle pings and its autocommit
    connections are SQLAlchemy's; driver errors are raised as SQLAlchemy's exception classes (so
    app/errors.py answers 503 / 422 as for any other query), and a lost connection is invalidated
    with the rest of the pool, as SQLAlchemy does. PostgreSQL (psycopg) only."""

    def __init__(self, stmt: Select) -> None:
        self._columns = list(stmt.selected_columns)
        self._stmt = stmt
        self.row_type = namedtuple("HotRow", [c.key for c in self._columns])  # type: ignore[misc]
        self._compiled: dict[int, Any] = {}  # id(dialect) -> Compiled
        self._processors: dict[tuple[int, ...], list[Any]] = {}  # column type oids -> processors

    async def first(self, engine: AsyncEngine, params: dict[str, Any]) -> Any:
        dialect = engine.dialect
        compiled = self._compiled.get(id(dialect))
        if compiled is None:
            compiled = self._compiled[id(dialect)] = self._stmt.compile(dialect=dialect)
        sql, bound = compiled.string, compiled.construct_params(params)
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            try:
                async with driver.cursor() as cur:
                    await cur.execute(sql, bound)
                    values = await cur.fetchone()
                    result = cur.pgresult
                    oids = tuple(result.ftype(i) for i in range(result.nfields)) if result is not None else ()
            except dialect.loaded_dbapi.Error as e:
                if dialect.is_disconnect(e, driver, None):
                    # As SQLAlchemy does on a lost connection: this one is dropped, and the pool's
                    # other connections (most likely lost too: a restart) are not reused.
                    await conn.invalidate(e)
                    await engine.dispose(close=False)
                raise exc.DBAPIError.instance(sql, bound, e, dialect.loaded_dbapi.Error) from e
            except BaseException:  # interrupted mid-query (a cancelled task): its state is unknown
                await conn.invalidate()
                raise
        if values is None:
            return None
        processors = self._processors.get(oids)
        if processors is None:
            processors = self._processors[oids] = [
                c.type.dialect_impl(dialect).result_processor(dialect, oid) for c, oid in zip(self._columns, oids)
            ]
        return self.row_type(*[p(v) if p is not None else v for p, v in zip(processors, values)])


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


# scope="function": exit code runs right after the endpoint, before the response is sent, so a
# failed commit becomes an error response instead of a lost write behind a 2xx.
UoW = Annotated[UnitOfWork, Depends(get_uow, scope="function")]
