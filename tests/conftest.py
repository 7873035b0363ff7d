"""Shared fixtures: real SQLite files, a real PostgreSQL server, a real uvicorn server."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import pytest

POSTGRES_URL = os.environ.get(
    "DI_REQUEST_SCOPE_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("DI_REQUEST_SCOPE_REQUIRE_POSTGRES") == "1"


def _postgres_problem() -> str | None:
    try:
        import psycopg
        import sqlalchemy
    except ImportError as exc:  # pragma: no cover - the test extra installs both
        return f"psycopg/SQLAlchemy not installed: {exc}"
    url = sqlalchemy.make_url(POSTGRES_URL)
    try:
        with psycopg.connect(
            host=url.host, port=url.port or 5432, user=url.username, dbname=url.database, connect_timeout=3
        ):
            return None
    except psycopg.OperationalError as exc:
        return f"no PostgreSQL server at {url.host}:{url.port}: {exc}".strip()


_PG_PROBLEM: str | bool | None = False  # False: not probed yet


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A reachable PostgreSQL URL, or skip (fail when DI_REQUEST_SCOPE_REQUIRE_POSTGRES=1)."""
    global _PG_PROBLEM  # noqa: PLW0603 - probe once per session
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _postgres_problem()
    if _PG_PROBLEM:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required (DI_REQUEST_SCOPE_REQUIRE_POSTGRES=1) but {_PG_PROBLEM}")
        pytest.skip(str(_PG_PROBLEM))
    return POSTGRES_URL


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite:///{tmp_path / 'test.sqlite3'}"


@pytest.fixture
def unique_name() -> str:
    """A table or marker name no other test run uses (PostgreSQL is shared)."""
    return f"t_{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class UvicornServer:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, **config: Any) -> None:
        import uvicorn

        self.port = free_port()
        # uvicorn closes a keep-alive connection idle for 5 s; on a loaded machine a client may reuse
        # one just as it closes ("Server disconnected without sending a response").
        config.setdefault("timeout_keep_alive", 60)
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornServer:
        self.thread.start()
        # uvicorn offers no start-up event; poll its flag, bounded.
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def uvicorn_server() -> type[UvicornServer]:
    """The UvicornServer class: ``with uvicorn_server(app) as server: ...``."""
    return UvicornServer
