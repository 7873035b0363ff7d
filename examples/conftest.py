"""Fixtures for the examples' tests: the project's own, plus a private PostgreSQL schema.

The examples' tables have fixed names ("users", "notes"), and the PostgreSQL
server is shared, so each test gets its own schema, put first on the search_path
through the connection URL (psycopg passes ``options`` to the server).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.pool import NullPool

from tests.conftest import postgres_url, sqlite_url, unique_name, uvicorn_server

__all__ = ["postgres_schema_url", "postgres_url", "sqlite_url", "unique_name", "uvicorn_server"]


@pytest.fixture
def postgres_schema_url(postgres_url: str, unique_name: str) -> Iterator[str]:
    """A PostgreSQL URL whose connections use a fresh schema, dropped after the test.

    The driver is psycopg 3, so the URL serves ``create_engine`` and ``create_async_engine`` alike.
    """
    admin = create_engine(postgres_url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {unique_name}")
    url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={unique_name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")  # a leaked transaction fails, not hangs
            conn.exec_driver_sql(f"DROP SCHEMA {unique_name} CASCADE")
        admin.dispose()
