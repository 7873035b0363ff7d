"""The notes service's test database: created once per module, one rolled-back transaction per test.

`di_engine` is the hook of di_request_scope's pytest plugin: its `di_transaction`
fixture opens a connection on that engine, begins a transaction, and rolls it
back after each test. The tables are created here, once; the tests never see
each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from examples.notes_app.models import Base


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module's database: a SQLite file, or a schema of its own on the shared PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('notes')}/notes.sqlite3"
        return
    server = request.getfixturevalue("postgres_url")
    schema = f"notes_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield (
            make_url(server).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
        )
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


# --8<-- [start:di_engine]
@pytest.fixture(scope="module")
def di_engine(database_url: str) -> Iterator[Engine]:
    """The engine the plugin's transactions run on; the tables exist before the first test."""
    engine = create_engine(database_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


# --8<-- [end:di_engine]
