"""The async notes service's test database: created once per module, one rolled-back transaction per test.

`di_engine` is the hook of di_request_scope's pytest plugin; here it is an
AsyncEngine, for the `di_async_transaction` fixture.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from examples.notes_app.models import Base


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An async URL: a SQLite file through aiosqlite, or a schema of its own on the PostgreSQL server.

    The tables are created here, once, through a sync engine on the same database.
    """
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("notes") / "notes.sqlite3"
        url, sync_url = f"sqlite+aiosqlite:///{path}", f"sqlite:///{path}"
        schema = None
    else:
        server = request.getfixturevalue("postgres_url")  # postgresql+psycopg: sync and async
        schema = f"notes_{uuid.uuid4().hex[:12]}"
        url = sync_url = (
            make_url(server).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
        )
    engine = create_engine(sync_url, poolclass=NullPool)
    if schema is not None:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    Base.metadata.create_all(engine)
    try:
        yield url
    finally:
        if schema is not None:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()


# --8<-- [start:di_engine]
@pytest.fixture
def di_engine(database_url: str) -> AsyncEngine:
    """The AsyncEngine the plugin's transactions run on.

    NullPool: each test runs on an event loop of its own, and a pooled async
    connection must not outlive the loop it was opened on.
    """
    return create_async_engine(database_url, poolclass=NullPool)


# --8<-- [end:di_engine]
