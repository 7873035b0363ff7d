"""The reliability suite's switches and shared fixtures.

``DI_REQUEST_SCOPE_SOAK=1`` (set by ``python3 dev.py soak``) turns the bounded CI
counts into the long ones. Every test that measures something adds a line to
the "reliability figures" section at the end of pytest's output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy.pool import NullPool

SOAK = os.environ.get("DI_REQUEST_SCOPE_SOAK") == "1"

_figures: list[str] = []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def figures() -> list[str]:
    """Lines of measured figures, printed together after the run."""
    return _figures


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _figures:
        terminalreporter.section("reliability figures")
        for line in _figures:
            terminalreporter.write_line(line)


@pytest.fixture
def postgres_schema_url(postgres_url: str, unique_name: str) -> Iterator[str]:
    """A PostgreSQL URL whose connections use a schema of their own, dropped after the test.

    The server is shared (other runs, other tests): fixed table names then never collide.
    """
    admin = create_engine(postgres_url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {unique_name}")
    url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={unique_name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {unique_name} CASCADE")
        admin.dispose()
