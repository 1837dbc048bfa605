"""Engine, sessions, and the request-scoped unit of work.

The request's session commits at the boundary (after the endpoint returns, before the response is
sent); work registered with ``after_commit`` (for example enqueueing a Celery task) runs only once
that commit succeeded, and is dropped on rollback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import Depends
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings


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
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


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


# scope="function": exit code runs right after the endpoint, before the response is sent, so a
# failed commit becomes an error response instead of a lost write behind a 2xx.
UoW = Annotated[UnitOfWork, Depends(get_uow, scope="function")]
