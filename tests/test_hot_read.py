"""core.db's hot read connection settings (asyncpg from the SQLAlchemy URL), against the real
PostgreSQL. (What the job GET does with them: tests/test_api.py, tests/test_outages.py.)"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import PG_ADMIN_URL


@pytest.mark.unit
def test_hot_read_dsn_keeps_what_asyncpg_reads_and_translates_the_rest():
    """core.db.HotRead connects with asyncpg from the same URL as SQLAlchemy; libpq keywords
    asyncpg would pass on as server settings (refused by the server: every poll would fail) are
    translated or left out."""
    from core.db import HOT_APPLICATION_NAME, HOT_CONNECT_TIMEOUT_S, hot_dsn

    assert hot_dsn("postgresql+psycopg://postgres@127.0.0.1:5432/test") == (
        "postgresql://postgres@127.0.0.1:5432/test",
        HOT_CONNECT_TIMEOUT_S,
        {"application_name": HOT_APPLICATION_NAME},
    )
    dsn, timeout, settings = hot_dsn(
        "postgresql+psycopg://u:p%40ss@db:5433/mp?sslmode=require&connect_timeout=5&keepalives=1&tcp_user_timeout=9"
        "&options=-c%20search_path%3Dmp%20-cstatement_timeout%3D5000%20--lock-timeout%3D100"
    )
    assert dsn == "postgresql://u:p%40ss@db:5433/mp?sslmode=require"
    assert timeout == 5.0
    assert settings == {
        "search_path": "mp",
        "statement_timeout": "5000",
        "lock_timeout": "100",
        "application_name": HOT_APPLICATION_NAME,
    }


@pytest.mark.integration
def test_translated_options_are_accepted_by_the_server():
    """The URL options a psycopg URL may carry reach PostgreSQL as settings asyncpg's pool applies."""
    import asyncpg

    from core.db import HOT_APPLICATION_NAME, hot_dsn

    url = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://") + (
        "?connect_timeout=5&keepalives=1&options=-c%20statement_timeout%3D4321%20-c%20search_path%3Dpg_catalog"
    )

    async def read() -> tuple:
        dsn, timeout, settings = hot_dsn(url)
        conn = await asyncpg.connect(dsn, timeout=timeout, server_settings=settings)
        try:
            return (
                await conn.fetchval("SHOW statement_timeout"),
                await conn.fetchval("SHOW search_path"),
                await conn.fetchval("SHOW application_name"),
            )
        finally:
            await conn.close()

    assert asyncio.run(read()) == ("4321ms", "pg_catalog", HOT_APPLICATION_NAME)
