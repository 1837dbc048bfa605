"""A forked child never talks to the database on its parent's sockets (core/db.py,
``_blind_inherited_connections``): a Celery pool child forked while a thread of the worker's main
process was mid-query used to reset that connection when it finalized its copy, and from then on
both processes read each other's results (the chaos test's ``unexpected result EMPTY_QUERY from
command 'ROLLBACK'``)."""

from __future__ import annotations

import os
import threading

import pytest
from sqlalchemy import text

from core.db import make_engine
from tests.helpers import PG_ADMIN_URL

pytestmark = pytest.mark.integration

URL = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://")


def test_a_forked_child_cannot_use_its_parents_connection() -> None:
    engine = make_engine(URL)
    try:
        with engine.connect() as conn:  # checked out at the fork, as a busy thread's would be
            assert conn.execute(text("SELECT 1")).scalar() == 1
            raw = conn.connection.dbapi_connection
            fd = raw.pgconn.socket
            # A thread of the parent is what forks in Celery; here the test's own thread does.
            pid = os.fork()
            if pid == 0:  # the child: what finalizing the inherited connection does, and a query
                code = 0
                try:
                    if not os.path.samestat(os.fstat(fd), os.stat(os.devnull)):
                        code = 2  # the inherited descriptor still reaches the server
                    raw.rollback()
                    raw.execute("SELECT 42").fetchone()
                    code = code or 3  # a statement went through the parent's socket
                except BaseException:  # noqa: BLE001 - expected: the socket is /dev/null
                    pass
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "the child reached the server on the parent's socket"
            # The parent's connection is in step: every statement gets its own answer.
            for i in range(20):
                assert conn.execute(text(f"SELECT {i}")).scalar() == i
            # And its pool keeps working from other threads.
            out: list[int] = []
            t = threading.Thread(target=lambda: out.append(engine.connect().execute(text("SELECT 7")).scalar()))
            t.start()
            t.join(30)
            assert out == [7]
    finally:
        engine.dispose()
