"""Tests of the Starlette notes service, through httpx's ASGITransport and on a real uvicorn server.

Run: `.venv/bin/pytest examples/starlette_app -q`

Each test builds the app on its own SQLite file with `create_app()`, runs its
lifespan (the container's engine is created at startup, disposed at exit) and
checks what was committed through a connection of its own. `create_app()` wires
the endpoints to the container it creates, so the newest app owns the endpoints:
build one app per test.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from dependency_injector import providers
from sqlalchemy import create_engine, event, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette

from di_request_scope import NoRequestScopeError
from examples.notes_app.models import Note, User
from examples.notes_app.services import NotesService
from examples.starlette_app.main import create_app

WAIT = 10  # bounds a wait only a bug makes long; never orders anything


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def database_path(tmp_path: Path) -> Path:
    return tmp_path / "notes.sqlite3"


@pytest.fixture
def app(database_path: Path) -> Starlette:
    return create_app(f"sqlite:///{database_path}")


class BoundedClient(httpx.AsyncClient):
    """An in-process client whose requests fail, instead of hanging, if the app deadlocks."""

    async def send(self, *args: Any, **kwargs: Any) -> httpx.Response:
        with anyio.fail_after(WAIT):
            return await super().send(*args, **kwargs)


# --8<-- [start:client]
def client_for(app: Starlette, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return BoundedClient(transport=transport, base_url="http://notes")


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


# --8<-- [end:client]


def stored(database_path: Path) -> dict[str, list[str]]:
    """What is committed, read through a connection of its own: {email: [note texts]}."""
    engine = create_engine(f"sqlite:///{database_path}", poolclass=NullPool)
    try:
        with Session(engine) as session:
            users = session.scalars(select(User).options(selectinload(User.notes))).all()
            return {user.email: [note.text for note in user.notes] for user in users}
    finally:
        engine.dispose()


def checked_out(app: Starlette) -> int:
    """Connections the app's sessions hold: 0 once every request's session was closed."""
    return int(app.state.container.engine().pool.checkedout())


async def register(client: httpx.AsyncClient, email: str = "ada@example.com", name: str = "Ada") -> int:
    response = await client.post("/users", json={"email": email, "name": name})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


@pytest.mark.anyio
async def test_a_successful_request_commits_and_every_session_is_closed(
    app: Starlette, database_path: Path
) -> None:
    async with app.router.lifespan_context(app), client_for(app) as client:
        user_id = await register(client)
        response = await client.post(f"/users/{user_id}/notes", json=["buy milk", "call Bob"])
        assert response.status_code == 201
        assert response.json() == {"added": 2}
        assert (await client.get(f"/users/{user_id}")).json() == {
            "id": user_id,
            "email": "ada@example.com",
            "name": "Ada",
            "notes": ["buy milk", "call Bob"],
        }
        assert stored(database_path) == {"ada@example.com": ["buy milk", "call Bob"]}
        assert checked_out(app) == 0
    assert not app.state.container.engine.initialized  # the lifespan disposed the engine


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/debug/sessions", "/debug/sessions-sync"])
async def test_every_injection_point_of_a_request_gets_its_one_session(
    client: httpx.AsyncClient, path: str
) -> None:
    """Both endpoint parameters and both repositories share a session, in async and threadpool endpoints."""
    first = (await client.get(path)).json()
    second = (await client.get(path)).json()
    for body in (first, second):
        assert len(body["sessions"]) == 4
        assert len(set(body["sessions"].values())) == 1
    assert first["sessions"] != second["sessions"]  # the next request gets a new session
    # The async endpoint ran on the event loop (this thread), the sync one in a worker thread.
    ran_on_the_loop = first["thread"] == threading.get_ident()
    assert ran_on_the_loop is (path == "/debug/sessions")


@pytest.mark.anyio
async def test_concurrent_requests_never_share_a_session(client: httpx.AsyncClient) -> None:
    paths = ["/debug/sessions", "/debug/sessions-sync"] * 10
    responses = await asyncio.gather(*(client.get(path) for path in paths))
    keys: list[int] = []
    for response in responses:
        assert response.status_code == 200
        injected = set(response.json()["sessions"].values())
        assert len(injected) == 1
        keys.extend(injected)
    assert len(set(keys)) == len(paths)


@pytest.mark.anyio
async def test_an_exception_handler_status_rolls_back_the_writes_made_before_it(
    app: Starlette, client: httpx.AsyncClient, database_path: Path
) -> None:
    user_id = await register(client)
    # "write report" is flushed to the database before the blank note raises InvalidNoteError,
    # which the app's exception handler answers with a 422: the middleware sees the status.
    response = await client.post(f"/users/{user_id}/notes", json=["write report", "  "])
    assert response.status_code == 422
    assert response.json() == {"detail": "notes must not be blank"}
    assert stored(database_path) == {"ada@example.com": []}
    assert (await client.get("/users/999")).status_code == 404
    assert checked_out(app) == 0


class NotesServiceWithAFailingMailer(NotesService):
    """Adds the notes, then fails the way an unexpected bug or outage would."""

    def add_notes(self, user_id: int, texts: list[str]) -> list[Note]:
        super().add_notes(user_id, texts)
        raise RuntimeError("mail server down")


@pytest.mark.anyio
async def test_an_unexpected_exception_is_a_500_and_rolls_back(app: Starlette, database_path: Path) -> None:
    container = app.state.container
    failing = providers.Factory(NotesServiceWithAFailingMailer, users=container.users, notes=container.notes)
    async with app.router.lifespan_context(app), client_for(app, raise_app_exceptions=False) as client:
        user_id = await register(client)
        with container.service.override(failing):
            response = await client.post(f"/users/{user_id}/notes", json=["never saved"])
        assert response.status_code == 500  # from Starlette's ServerErrorMiddleware
        assert stored(database_path) == {"ada@example.com": []}
        assert checked_out(app) == 0


@pytest.mark.anyio
async def test_a_commit_that_fails_is_a_500_and_nothing_is_committed(database_path: Path) -> None:
    """A reader's SHARED lock keeps the commit from writing to the SQLite file: the client gets a 500."""
    app = create_app(f"sqlite:///{database_path}?timeout=0")  # fail at once, do not wait for the lock
    async with app.router.lifespan_context(app), client_for(app, raise_app_exceptions=False) as client:
        reader = sqlite3.connect(database_path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT * FROM users").fetchall()  # holds SHARED until COMMIT
            response = await client.post("/users", json={"email": "ada@example.com", "name": "Ada"})
        finally:
            reader.execute("COMMIT")
            reader.close()
        assert response.status_code == 500  # never the 201 the endpoint returned
        assert stored(database_path) == {}
        assert checked_out(app) == 0


@pytest.mark.anyio
async def test_a_streaming_body_reads_with_the_request_session_until_it_is_sent(app: Starlette) -> None:
    log: list[str] = []

    async def observed(scope: Any, receive: Any, send: Any) -> None:
        """The app, with each message it sends written to the same log as the pool's events."""

        async def logging_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                log.append("body" if message.get("more_body") else "last body")
            else:
                log.append(message["type"])
            await send(message)

        await app(scope, receive, logging_send)

    async with app.router.lifespan_context(app), client_for(app) as client:
        user_id = await register(client)
        assert (await client.post(f"/users/{user_id}/notes", json=["one", "two"])).status_code == 201
        engine = app.state.container.engine()
        event.listen(engine, "checkout", lambda *args: log.append("checkout"))
        event.listen(engine, "checkin", lambda *args: log.append("checkin"))
        async with client_for(observed) as observing_client:  # type: ignore[arg-type]
            response = await observing_client.get(f"/users/{user_id}/notes.txt")
        assert checked_out(app) == 0

    assert response.text == "one\ntwo\n"
    # The endpoint looks the user up (its transaction is committed before the status), then the
    # body queries with the same session, which keeps its connection until the last chunk is sent.
    assert log == [
        "checkout",
        "checkin",
        "http.response.start",
        "checkout",
        "body",
        "body",
        "last body",
        "checkin",
    ]


@pytest.mark.anyio
async def test_resolving_outside_a_request_raises_no_request_scope_error(app: Starlette) -> None:
    container = app.state.container
    async with app.router.lifespan_context(app):
        with pytest.raises(NoRequestScopeError, match="RequestScopeMiddleware"):
            container.session()
        with pytest.raises(NoRequestScopeError):
            container.service()  # its repositories need the session


class Completed:
    """ASGI wrapper counting HTTP requests whose app call returned, so teardown had finished."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.count = 0
        self.condition = threading.Condition()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                with self.condition:
                    self.count += 1
                    self.condition.notify_all()

    def wait_for(self, count: int) -> None:
        with self.condition:
            assert self.condition.wait_for(lambda: self.count >= count, timeout=WAIT)


@pytest.mark.server
def test_on_uvicorn_sessions_commits_rollbacks_and_streams(
    app: Starlette, database_path: Path, uvicorn_server: Any
) -> None:
    completed = Completed(app)
    with uvicorn_server(completed) as server, httpx.Client(base_url=server.url, timeout=WAIT) as client:
        user_id = client.post("/users", json={"email": "ada@example.com", "name": "Ada"}).json()["id"]
        assert client.post(f"/users/{user_id}/notes", json=["buy milk"]).status_code == 201
        assert client.post(f"/users/{user_id}/notes", json=["write report", " "]).status_code == 422
        assert client.get(f"/users/{user_id}/notes.txt").text == "buy milk\n"

        async def load() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
                paths = ["/debug/sessions", "/debug/sessions-sync"] * 10
                return await asyncio.gather(*(http.get(path) for path in paths))

        responses = asyncio.run(load())
        completed.wait_for(4 + len(responses))
        assert checked_out(app) == 0  # every session closed, teardown included
    keys = [set(response.json()["sessions"].values()) for response in responses]
    assert all(len(injected) == 1 for injected in keys)
    assert len(set().union(*keys)) == len(responses)
    assert stored(database_path) == {"ada@example.com": ["buy milk"]}
