"""``RequestScopeMiddleware(websocket_scope="message")``: a unit of work per WebSocket message.

Real FastAPI and Starlette WebSocket endpoints, driven by Starlette's ``TestClient`` and,
once, served by uvicorn on 127.0.0.1 to the ``websockets`` client. What was committed is
read from the SQLite file through a connection of the test's own, while the WebSocket is
still open. Handlers that must be caught mid-message wait on ``threading`` events the test
sets; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject
from fastapi import Depends, FastAPI, WebSocket
from sqlalchemy import Engine, String, create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from starlette.applications import Starlette
from starlette.endpoints import WebSocketEndpoint
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from di_request_scope import (
    RequestScope,
    RequestScoped,
    RequestScopeMiddleware,
    ScopeMisuseError,
    ScopeObserver,
    current_scope,
    observe,
    request_scope,
)
from di_request_scope.sqlalchemy import LateCommitError, unit_of_work

# Bounds a wait that only a bug would make long; never used to order anything.
WAIT = 10


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100), unique=True)


def make_container(engine: Engine) -> Any:
    class Container(containers.DeclarativeContainer):
        session_factory = providers.Singleton(sessionmaker, bind=providers.Object(engine))
        session = RequestScoped(unit_of_work, session_factory)

    return Container()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    """A SQLite file with the notes table, and the app's engine on it; disposed after the test."""
    path = tmp_path / "notes.sqlite3"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    yield engine, path
    engine.dispose()


@pytest.fixture
def wire() -> Iterator[Any]:
    """Wire a container into this module (after the test defined its endpoints); unwire after."""
    wired: list[Any] = []

    def _wire(container: Any) -> Any:
        container.wire(modules=[__name__])
        wired.append(container)
        return container

    yield _wire
    for container in wired:
        container.unwire()


def committed(path: Path) -> list[str]:
    """The notes committed to the file, read through a connection of the test's own."""
    with closing(sqlite3.connect(path)) as connection:
        return [text for (text,) in connection.execute("SELECT text FROM notes ORDER BY id")]


def message_scoped(app: Any) -> Any:
    app.add_middleware(RequestScopeMiddleware, websocket_scope="message")
    return app


class Served:
    """The app, and a way to wait until it has served its WebSocket to the end, teardown included.

    Leaving TestClient's ``websocket_connect`` block cancels an app that is still running;
    each test ends the conversation, then waits here, so every outcome is the app's own.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.done = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "websocket":
                self.done.set()

    def wait(self) -> None:
        assert self.done.wait(WAIT), "the app did not return"


def waits_for(event: threading.Event) -> Any:
    """An awaitable that waits for a test thread's event in a worker thread, bounded."""
    return anyio.to_thread.run_sync(event.wait, WAIT)


# --------------------------------------------------------------------------------------------------
# One session per message, committed before the reply.
# --------------------------------------------------------------------------------------------------


def test_each_message_gets_its_own_session_committed_before_its_reply(
    database: tuple[Engine, Path],
) -> None:
    """Each message's session is new, and its note is committed when its reply arrives, mid-message."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    checked: queue.Queue[None] = queue.Queue()
    closed_sessions: list[bool] = []

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            session = container.session()
            assert container.session() is session  # one per message, whoever resolves it
            session.add(Note(text=text))
            await websocket.send_json({"session": session.hash_key})
            # Still handling this message: its scope is open until the next receive().
            await anyio.to_thread.run_sync(lambda: checked.get(timeout=WAIT))
            closed_sessions.append(session.in_transaction())

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("first")
        first = websocket.receive_json()
        assert committed(path) == ["first"]  # before the message ended, and the connection
        checked.put(None)
        websocket.send_text("second")
        second = websocket.receive_json()
        assert committed(path) == ["first", "second"]
        checked.put(None)
        websocket.close()
        served.wait()

    assert first["session"] != second["session"]
    assert closed_sessions == [False, False]  # nothing left to commit after the reply
    assert engine.pool.checkedout() == 0


def test_a_session_created_after_the_reply_commits_when_the_message_ends(
    database: tuple[Engine, Path],
) -> None:
    """Writes made after the message's first frame are committed at its end: before the next message."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    written: queue.Queue[None] = queue.Queue()
    checked: queue.Queue[None] = queue.Queue()

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_text("working on it")  # the first frame: no session yet
            container.session().add(Note(text=text))
            written.put(None)
            await anyio.to_thread.run_sync(lambda: checked.get(timeout=WAIT))  # still handling it

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("late")
        assert websocket.receive_text() == "working on it"
        written.get(timeout=WAIT)
        assert committed(path) == []  # written, not committed: the message is still being handled
        checked.put(None)
        websocket.send_text("next")  # its receive() ends the first message
        assert websocket.receive_text() == "working on it"
        written.get(timeout=WAIT)
        assert committed(path) == ["late"]
        checked.put(None)
        websocket.close()
        served.wait()

    assert committed(path) == ["late", "next"]
    assert engine.pool.checkedout() == 0


def test_a_frame_sent_by_a_task_outside_the_message_is_not_its_reply(database: tuple[Engine, Path]) -> None:
    """A heartbeat started before the first message sends mid-message: that commits nothing."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    checked = threading.Event()

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        beat = asyncio.Event()

        async def heartbeat() -> None:
            await beat.wait()
            await websocket.send_text("ping")

        pinging = asyncio.ensure_future(heartbeat())  # outside any message: the connection's context
        async for text in websocket.iter_text():
            container.session().add(Note(text=text))
            beat.set()
            await pinging  # "ping" went out while this message is being handled
            await waits_for(checked)
            await websocket.send_text("saved")

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("one")
        assert websocket.receive_text() == "ping"
        assert committed(path) == []
        checked.set()
        assert websocket.receive_text() == "saved"
        assert committed(path) == ["one"]
        websocket.close()
        served.wait()


# --------------------------------------------------------------------------------------------------
# Failures: only the message that failed is rolled back.
# --------------------------------------------------------------------------------------------------


def test_a_message_failed_by_its_handler_rolls_back_only_its_own_writes(
    database: tuple[Engine, Path],
) -> None:
    """A handler that catches an error and fails the scope loses that message's notes, no other's."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            session = container.session()
            session.add(Note(text=f"{text} (part 1)"))
            try:
                if text == "invalid":
                    raise ValueError("invalid note")
                session.add(Note(text=f"{text} (part 2)"))
            except ValueError as exc:
                current_scope().fail(exc)
                await websocket.send_json({"error": str(exc)})
            else:
                await websocket.send_json({"saved": text})

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        for text in ("one", "invalid", "two"):
            websocket.send_text(text)
            websocket.receive_json()
        websocket.close()
        served.wait()

    assert committed(path) == ["one (part 1)", "one (part 2)", "two (part 1)", "two (part 2)"]
    assert engine.pool.checkedout() == 0


def test_a_failed_commit_is_raised_from_send_instead_of_the_reply(database: tuple[Engine, Path]) -> None:
    """A commit that fails (a duplicate) replaces the reply; the handler answers it and goes on."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            container.session().add(Note(text=text))  # no flush: the duplicate fails at commit
            try:
                await websocket.send_json({"saved": text})
            except IntegrityError:
                await websocket.send_json({"error": f"{text} exists"})

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        replies = []
        for text in ("one", "one", "two"):
            websocket.send_text(text)
            replies.append(websocket.receive_json())
        websocket.close()
        served.wait()

    assert replies == [{"saved": "one"}, {"error": "one exists"}, {"saved": "two"}]
    assert committed(path) == ["one", "two"]
    assert engine.pool.checkedout() == 0


def test_a_handler_that_raises_rolls_back_its_message_and_fails_the_connection(
    database: tuple[Engine, Path],
) -> None:
    """An exception leaving the endpoint rolls back the message it was handling; earlier ones stay."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    connection_outcome: list[BaseException | None] = []

    def connection_probe() -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            connection_outcome.append(exc)
            raise
        connection_outcome.append(None)

    probe = RequestScoped(connection_probe)

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        probe()  # before any message: the connection's
        await websocket.accept()
        async for text in websocket.iter_text():
            container.session().add(Note(text=text))
            if text == "boom":
                raise RuntimeError("the handler failed")
            await websocket.send_json({"saved": text})

    served = Served(app)
    with pytest.raises(RuntimeError, match="the handler failed"):  # noqa: SIM117 - TestClient re-raises at exit
        with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
            websocket.send_text("kept")
            websocket.receive_json()
            websocket.send_text("boom")
            served.wait()

    assert committed(path) == ["kept"]
    [failure] = connection_outcome
    assert isinstance(failure, RuntimeError)
    assert engine.pool.checkedout() == 0


@pytest.mark.parametrize(
    ("code", "replies", "saved"),
    [
        (4000, True, False),
        (4000, False, False),
        (1006, False, False),
        (1000, True, True),
        (1001, False, True),
    ],
    ids=["4000-then-reply", "4000-no-reply", "1006-no-reply", "1000-then-reply", "1001-no-reply"],
)
def test_a_client_closing_abnormally_mid_message_rolls_that_message_back(
    database: tuple[Engine, Path], code: int, replies: bool, saved: bool
) -> None:
    """A close with a code other than 1000/1001 while a message is handled rolls it back, reply or not."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    written, closed = threading.Event(), threading.Event()

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            container.session().add(Note(text=text))
            if text == "held":
                written.set()
                await waits_for(closed)  # the client closes now, mid-message
            if replies or text != "held":
                await websocket.send_json({"saved": text})

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("before")
        websocket.receive_json()
        websocket.send_text("held")
        assert written.wait(WAIT)
        websocket.close(code=code)
        closed.set()
        served.wait()

    assert committed(path) == (["before", "held"] if saved else ["before"])
    assert engine.pool.checkedout() == 0


def test_the_app_closing_with_an_error_code_mid_message_rolls_that_message_back(
    database: tuple[Engine, Path],
) -> None:
    """``websocket.close(1011)`` while handling a message fails it, as it fails the connection."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            container.session().add(Note(text=text))
            if text == "fatal":
                await websocket.close(code=1011)
                return
            await websocket.send_json({"saved": text})

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("kept")
        websocket.receive_json()
        websocket.send_text("fatal")
        with pytest.raises(WebSocketDisconnect) as closed:
            websocket.receive_json()
        served.wait()

    assert closed.value.code == 1011
    assert committed(path) == ["kept"]
    assert engine.pool.checkedout() == 0


# --------------------------------------------------------------------------------------------------
# The connection's scope, outside messages.
# --------------------------------------------------------------------------------------------------


def test_outside_messages_the_connection_scope_holds_one_session_for_the_whole_connection(
    database: tuple[Engine, Path], wire: Any
) -> None:
    """Dependencies and code before the first or after the last message share the connection's session."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    seen: dict[str, Any] = {}
    held = threading.Event()
    Container = container.declarative_parent  # markers name the class's providers

    @inject
    def save(text: str, session: Session = Provide[Container.session]) -> int:
        session.add(Note(text=text))
        return session.hash_key

    @app.websocket("/notes")
    @inject
    async def notes(websocket: WebSocket, session: Session = Depends(Provide[Container.session])) -> None:
        seen["dependency"] = session.hash_key
        session.add(Note(text="connected"))  # the connection's: committed when it ends
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_json({"message": save(text), "connection": session.hash_key})
        seen["after"] = container.session().hash_key  # the disconnect ended the last message
        await waits_for(held)

    wire(container)
    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("one")
        one = websocket.receive_json()
        websocket.send_text("two")
        two = websocket.receive_json()
        websocket.close()
        assert committed(path) == ["one", "two"]  # the connection's session is still open
        held.set()  # ends the connection...
        served.wait()

    assert committed(path) == ["one", "two", "connected"]  # ... and commits its session
    assert one["connection"] == two["connection"] == seen["dependency"] == seen["after"]
    assert len({one["message"], two["message"], seen["dependency"]}) == 3
    assert engine.pool.checkedout() == 0


def test_the_default_keeps_one_scope_per_connection(database: tuple[Engine, Path]) -> None:
    """Without ``websocket_scope="message"``, every message shares the connection's session."""
    engine, path = database
    container = make_container(engine)
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            session = container.session()
            session.add(Note(text=text))
            await websocket.send_json({"session": session.hash_key})

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("one")
        one = websocket.receive_json()
        websocket.send_text("two")
        two = websocket.receive_json()
        assert committed(path) == []  # one transaction, for the whole connection
        websocket.close()
        served.wait()

    assert one == two
    assert committed(path) == ["one", "two"]


def test_websocket_scope_must_be_connection_or_message() -> None:
    """A typo in ``websocket_scope`` is refused when the middleware is built, naming both values."""
    with pytest.raises(ValueError, match=r"'connection'.*'message'.*got 'messages'"):
        RequestScopeMiddleware(FastAPI(), websocket_scope="messages")  # type: ignore[arg-type]


def test_observers_see_the_connection_scope_and_one_scope_per_message(database: tuple[Engine, Path]) -> None:
    """Each message scope is reported opened and closed, with its origin, inside the connection's."""
    engine, _ = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    events: list[tuple[str, str | None]] = []

    class Recorder(ScopeObserver):
        def scope_opened(self, scope: RequestScope) -> None:
            events.append(("opened", scope.origin))

        def scope_closed(self, scope: RequestScope, errors: Any) -> None:
            events.append(("closed", scope.origin))

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            container.session().add(Note(text=text))
            await websocket.send_text("saved")

    served = Served(app)
    with observe(Recorder()), TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        for text in ("one", "two"):
            websocket.send_text(text)
            websocket.receive_text()
        websocket.close()
        served.wait()

    message = ("WEBSOCKET /notes message",)
    assert events == [
        ("opened", "WEBSOCKET /notes"),
        ("opened", *message),
        ("closed", *message),
        ("opened", *message),
        ("closed", *message),
        ("closed", "WEBSOCKET /notes"),
    ]


# --------------------------------------------------------------------------------------------------
# Other ways in: Starlette's WebSocketEndpoint, one endpoint opting in with request_scope().
# --------------------------------------------------------------------------------------------------


def test_starlette_websocket_endpoint_on_receive_runs_in_a_scope_per_message(
    database: tuple[Engine, Path],
) -> None:
    """Each ``on_receive`` call of a ``WebSocketEndpoint`` has a session of its own, committed per message."""
    engine, path = database
    container = make_container(engine)

    class Notes(WebSocketEndpoint):
        encoding = "text"

        async def on_receive(self, websocket: WebSocket, data: Any) -> None:
            session = container.session()
            session.add(Note(text=data))
            await websocket.send_json({"session": session.hash_key})

    app = message_scoped(Starlette(routes=[WebSocketRoute("/notes", Notes)]))
    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("one")
        one = websocket.receive_json()
        assert committed(path) == ["one"]
        websocket.send_text("two")
        two = websocket.receive_json()
        assert committed(path) == ["one", "two"]
        websocket.close()
        served.wait()

    assert one["session"] != two["session"]
    assert engine.pool.checkedout() == 0


def test_one_endpoint_opts_in_with_request_scope_around_each_message(database: tuple[Engine, Path]) -> None:
    """Under the default middleware, ``async with request_scope():`` per message is a unit of work each."""
    engine, path = database
    container = make_container(engine)
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)
    sessions: list[int] = []

    # As in docs/websockets.md.
    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            try:
                async with request_scope():  # this message's session, committed at the end of the block
                    container.session().add(Note(text=text))
                    sessions.append(container.session().hash_key)
            except IntegrityError:
                await websocket.send_json({"error": f"{text} exists"})
            else:
                await websocket.send_json({"saved": text})  # after the block: committed

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        replies = []
        for text in ("one", "one", "two"):
            websocket.send_text(text)
            replies.append(websocket.receive_json())
            replies.append(committed(path))
        websocket.close()
        served.wait()

    assert replies == [
        {"saved": "one"},
        ["one"],
        {"error": "one exists"},
        ["one"],
        {"saved": "two"},
        ["one", "two"],
    ]
    assert len(set(sessions)) == 3
    assert engine.pool.checkedout() == 0


# --------------------------------------------------------------------------------------------------
# Misuse: receive() in another task.
# --------------------------------------------------------------------------------------------------


def test_receiving_in_another_task_than_the_handler_warns() -> None:
    """A message received in a task of its own cannot scope the handler: a RuntimeWarning says so."""
    app = message_scoped(FastAPI())
    scopes: list[Any] = []

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            try:
                # asyncio.wait_for() did this before Python 3.12.
                await asyncio.ensure_future(websocket.receive_text())
            except WebSocketDisconnect:
                return
            scopes.append(current_scope())
            await websocket.send_text("ok")

    served = Served(app)
    with pytest.warns(RuntimeWarning, match=r"asyncio\.wait_for\(\)"):  # noqa: SIM117
        with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
            for text in ("one", "two"):
                websocket.send_text(text)
                websocket.receive_text()
            websocket.close()
            served.wait()

    assert scopes[0] is scopes[1]  # the handler saw the connection's scope both times


def test_two_tasks_receiving_at_once_is_refused() -> None:
    """Concurrent receive() calls cannot each own a message scope: the second raises ScopeMisuseError."""
    app = message_scoped(FastAPI())
    errors: list[BaseException] = []

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        waiting = asyncio.Event()

        async def receive_first() -> Any:
            waiting.set()  # and, in the same step, enter receive() and wait there
            return await websocket.receive()

        first = asyncio.ensure_future(receive_first())
        await waiting.wait()
        try:
            with anyio.fail_after(WAIT):  # only if it were not refused: nothing arrives
                await websocket.receive()
        except ScopeMisuseError as exc:
            errors.append(exc)
        first.cancel()
        await websocket.close()

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        with pytest.raises(WebSocketDisconnect):
            websocket.receive_text()
        served.wait()

    [error] = errors
    assert "two tasks wait in receive()" in str(error)


# --------------------------------------------------------------------------------------------------
# The example, in-process and on a real uvicorn server.
# --------------------------------------------------------------------------------------------------


def test_the_example_saves_each_note_in_its_own_unit_of_work(tmp_path: Path) -> None:
    """examples/websocket_notes.py: one commit per note, a duplicate answered and rolled back alone."""
    from examples.websocket_notes import create_app

    path = tmp_path / "notes.sqlite3"
    app = create_app(f"sqlite:///{path}")
    served = Served(app)
    with TestClient(served) as client:
        with client.websocket_connect("/notes") as websocket:
            replies = []
            for text in ("milk", "milk", "eggs"):
                websocket.send_text(text)
                replies.append(websocket.receive_json())
            with closing(sqlite3.connect(path)) as connection:  # while the WebSocket is still open
                saved = [text for (text,) in connection.execute("SELECT text FROM ws_notes ORDER BY id")]
            websocket.close()
            served.wait()
        assert app.state.container.engine().pool.checkedout() == 0  # before the lifespan disposes it
    app.state.container.unwire()

    assert [sorted(reply) for reply in replies] == [["id"], ["error"], ["id"]]
    assert replies[1] == {"error": "'milk' is already saved"}
    assert saved == ["milk", "eggs"]


@pytest.mark.server
def test_on_uvicorn_each_message_commits_before_its_reply_and_an_abrupt_close_rolls_back(
    database: tuple[Engine, Path], uvicorn_server: Any
) -> None:
    """On a real server: per-message sessions and commits; a dropped TCP connection mid-message rolls back."""
    websockets_client = pytest.importorskip("websockets.sync.client")
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    written, lost = threading.Event(), threading.Event()

    class Protocol(WebSocketsSansIOProtocol):
        """uvicorn's own WebSocket protocol, telling the test when it noticed the connection drop."""

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            lost.set()

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            session = container.session()
            session.add(Note(text=text))
            if text == "dropped":
                written.set()
                await waits_for(lost)
                continue  # no reply: the next receive() ends the message
            await websocket.send_json({"session": session.hash_key})

    served = Served(app)
    with uvicorn_server(served, ws=Protocol) as server:
        url = server.url.replace("http://", "ws://") + "/notes"
        with websockets_client.connect(url, open_timeout=WAIT, close_timeout=WAIT) as websocket:
            keys = []
            for text in ("one", "two"):
                websocket.send(text)
                keys.append(json.loads(websocket.recv(timeout=WAIT))["session"])
                assert committed(path)[-1] == text  # committed when the reply arrived
            websocket.send("dropped")
            assert written.wait(WAIT)
            websocket.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the network went away
            served.wait()

    assert keys[0] != keys[1]
    assert committed(path) == ["one", "two"]
    assert engine.pool.checkedout() == 0


def test_a_connection_session_is_closed_even_when_teardown_of_a_message_fails(
    database: tuple[Engine, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A message whose commit fails at the end of the app is logged; every session is still closed."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        container.session().add(Note(text="connection"))
        text = await websocket.receive_text()
        await websocket.send_text("working on it")
        container.session().add(Note(text=text))  # after the reply: committed when the message ends
        container.session().add(Note(text=text))  # a duplicate: that commit fails
        await websocket.close()

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("twice")
        assert websocket.receive_text() == "working on it"
        with pytest.raises(WebSocketDisconnect):
            websocket.receive_text()
        served.wait()

    assert committed(path) == ["connection"]
    [record] = [r for r in caplog.records if r.name == "di_request_scope"]
    assert "WEBSOCKET /notes" in record.getMessage()
    assert record.exc_info is not None
    assert "NOT saved" in str(record.exc_info[1])
    assert engine.pool.checkedout() == 0


def test_a_message_commit_failing_at_its_end_is_raised_from_the_next_receive(
    database: tuple[Engine, Path],
) -> None:
    """Writes after the reply that fail to commit raise from the next receive(), where the handler answers."""
    engine, path = database
    container = make_container(engine)
    app = message_scoped(FastAPI())
    raised: list[BaseException] = []

    @app.websocket("/notes")
    async def notes(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            try:
                text = await websocket.receive_text()
            except LateCommitError as exc:  # the previous message's commit, after its first frame
                raised.append(exc)
                await websocket.send_text("the previous note was not saved")
                continue
            except WebSocketDisconnect:
                return
            await websocket.send_text("working on it")
            container.session().add(Note(text=text))
            if text.startswith("dup-"):
                container.session().add(Note(text=text.removeprefix("dup-")))

    served = Served(app)
    with TestClient(served) as client, client.websocket_connect("/notes") as websocket:
        websocket.send_text("one")
        assert websocket.receive_text() == "working on it"
        websocket.send_text("dup-one")  # "dup-one" and "one" again: the commit fails
        assert websocket.receive_text() == "working on it"
        websocket.send_text("two")
        assert websocket.receive_text() == "the previous note was not saved"
        assert websocket.receive_text() == "working on it"
        websocket.close()
        served.wait()

    [error] = raised
    assert isinstance(error.__cause__, IntegrityError)
    assert committed(path) == ["one", "two"]
    assert engine.pool.checkedout() == 0
