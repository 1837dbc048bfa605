"""The Alembic migrations build the schema on SQLite and PostgreSQL, and agree with the models
(an autogenerate diff against the migrated database is empty)."""

from __future__ import annotations

import subprocess

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from core.tables import Base
from tests.helpers import MODELPRESS

pytestmark = pytest.mark.integration


def _migrate(url: str) -> None:
    env = {"MODELPRESS_DATABASE_URL": url, "MODELPRESS_MODE": "embedded", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([MODELPRESS, "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request, tmp_path, pg_database):
    # PostgreSQL: the session database; `migrate` is idempotent at head.
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}" if request.param == "sqlite" else pg_database
    _migrate(url)
    return url


def test_models_and_migrations_agree(migrated_url):
    engine = create_engine(migrated_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    engine.dispose()
    assert diff == []
    assert {"tenants", "api_keys", "models", "jobs", "alembic_version"} <= tables
