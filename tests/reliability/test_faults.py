"""Faults: for each, what the client receives, what was committed, which finalizers ran, what leaked.

``test_fault_table`` is the table of docs/reliability.md: one app (a unit-of-work
session between two other request-scoped resources) on SQLite and PostgreSQL,
one row per fault. Each row checks the client's status, whether the request's
row was committed (read through a connection of the test's own), that the
other finalizers ran once each, in reverse creation order, with the request's
outcome, that the session was closed and no connection is left checked out, and
that the next request succeeds. The faults that need a real server (a client
that leaves mid-request or mid-stream, the database going away) follow on
uvicorn. The pool of every app here holds one connection, so one request
holding it exhausts the pool.
"""

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
from dependency_injector import containers, providers
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, registry
from sqlalchemy.pool import NullPool

from di_request_scope import RequestFailed, RequestScoped, RequestScopeMiddleware, container_lifespan
from di_request_scope.sqlalchemy import managed_engine, unit_of_work

from .load_app import Ledger, ledger_sessionmaker

WAIT = 30  # bounds a wait that only a bug would make long; never used to order anything


# --------------------------------------------------------------------------------------------------
# The app: one session per request between two other request-scoped resources.
# --------------------------------------------------------------------------------------------------


class Probe:
    """A request-scoped resource; ``label`` is the text of the request that used it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.label = ""


class Tracker:
    """Every teardown, in order, as (request label, resource name, the failure it received)."""

    def __init__(self) -> None:
        self.teardowns: list[tuple[str, str, BaseException | None]] = []
        self._changed = threading.Condition()

    def _record(self, label: str, name: str, failure: BaseException | None) -> None:
        with self._changed:
            self.teardowns.append((label, name, failure))
            self._changed.notify_all()

    def resource(self, name: str) -> Iterator[Probe]:
        probe = Probe(name)
        failure: BaseException | None = None
        try:
            yield probe
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._record(probe.label, name, failure)

    def failing_resource(self, name: str) -> Iterator[Probe]:
        probe = Probe(name)
        yield probe
        self._record(probe.label, name, None)
        raise RuntimeError(f"teardown of {name} failed")

    def of(self, label: str) -> list[tuple[str, BaseException | None]]:
        return [(name, failure) for lbl, name, failure in self.teardowns if lbl == label]

    def wait_for(self, label: str, count: int) -> None:
        """Wait until ``count`` resources of a request were torn down: a server tears down after replying."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.of(label)) >= count, WAIT):
                pytest.fail(f"{label}: {self.of(label)} torn down, expected {count}")


def notes_table(metadata: MetaData, *, deferred: bool) -> Table:
    # Deferred on PostgreSQL, so a duplicate fails at COMMIT itself; on SQLite the
    # duplicate fails in the flush that commit() runs. Both are the commit failing.
    unique = (
        UniqueConstraint("text", deferrable=True, initially="DEFERRED")
        if deferred
        else UniqueConstraint("text")
    )
    return Table(
        "notes", metadata, Column("id", Integer, primary_key=True), Column("text", String(64)), unique
    )


@dataclass
class FaultApp:
    """The app, its container, and what it recorded; ``texts()`` reads the committed rows."""

    app: FastAPI
    container: Any
    url: str
    tracker: Tracker
    ledger: Ledger
    events: dict[str, Any] = field(default_factory=dict)

    def texts(self) -> list[str]:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return sorted(conn.execute(text("SELECT text FROM notes")).scalars())
        finally:
            engine.dispose()

    def checked_out(self) -> int:
        return int(self.container.engine().pool.checkedout())


def build_app(url: str, *, pool_timeout: float = WAIT) -> FaultApp:
    tracker = Tracker()
    metadata = MetaData()

    class Note:  # mapped afresh for each app: each has a table of its own
        def __init__(self, text: str) -> None:
            self.text = text

    registry().map_imperatively(Note, notes_table(metadata, deferred=url.startswith("postgresql")))

    def schema(engine: Any) -> Iterator[None]:
        metadata.create_all(engine)
        yield

    class Container(containers.DeclarativeContainer):
        engine = providers.Resource(
            managed_engine, url, pool_size=1, max_overflow=0, pool_timeout=pool_timeout
        )
        tables = providers.Resource(schema, engine)
        ledger = providers.Singleton(Ledger)
        session_factory = providers.Singleton(ledger_sessionmaker, engine, ledger)
        before = RequestScoped(tracker.resource, "before")
        session = RequestScoped(unit_of_work, session_factory)
        after = RequestScoped(tracker.resource, "after")
        failing = RequestScoped(tracker.failing_resource, "failing")

    container = Container()
    app = FastAPI(lifespan=container_lifespan(container))
    app.add_middleware(RequestScopeMiddleware)
    fault_app = FaultApp(app, container, url, tracker, container.ledger())
    events = fault_app.events

    def signal(name: str) -> None:
        """Set an event from a worker thread: a threading.Event (server tests) or an asyncio one."""
        event = events[name]
        if isinstance(event, threading.Event):
            event.set()
        else:
            anyio.from_thread.run_sync(event.set)

    def write(label: str, *, flush: bool = False) -> Session:
        """Create before, session and after in that order; add the request's row."""
        container.before().label = label
        session: Session = container.session()
        session.add(Note(label))
        if flush:  # takes the connection now: the transaction begins here
            session.flush()
        container.after().label = label
        return session

    @app.post("/ok")
    def ok(label: str) -> dict[str, str]:
        write(label)
        return {"written": label}

    @app.post("/raise")
    def crash(label: str) -> None:
        write(label)
        raise RuntimeError("the endpoint failed")

    @app.post("/http-error")
    def http_error(label: str) -> None:
        write(label)
        raise HTTPException(409, "conflict")

    @app.post("/finalizer-raises")
    def finalizer_raises(label: str) -> dict[str, str]:
        write(label)
        container.failing().label = label
        return {"written": label}

    @app.post("/duplicate")
    def duplicate(label: str, existing: str) -> dict[str, str]:
        write(label).add(Note(existing))  # the commit meets the unique constraint
        return {"written": label}

    def write_in_a_thread(label: str) -> None:
        """A sync dependency: its transaction begins in a worker thread."""
        write(label, flush=True)
        signal("written")

    @app.post("/wait")
    async def wait(label: str, _: Annotated[None, Depends(write_in_a_thread)]) -> None:
        await asyncio.Event().wait()  # only a cancellation ends this request

    @app.post("/hold")
    async def hold(label: str, _: Annotated[None, Depends(write_in_a_thread)]) -> dict[str, str]:
        await events["release"].wait()
        return {"written": label}

    @app.post("/write-now")
    def write_now(label: str) -> dict[str, str]:
        """Takes the pool's connection in the endpoint: waits for it in a worker thread if it is held."""
        with events["lock"]:
            events["inside"] += 1
            if events["inside"] == events["expected"]:
                signal("all inside")
        write(label, flush=True)
        return {"written": label}

    @app.post("/until-disconnect")
    async def until_disconnect(
        label: str, request: Request, _: Annotated[None, Depends(write_in_a_thread)]
    ) -> dict[str, str]:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # the (empty) body; the next message comes when the client leaves
        return {"written": label}

    @app.post("/stream")
    async def stream(label: str, _: Annotated[None, Depends(write_in_a_thread)]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first-chunk\n"
            container.session().add(Note(f"{label}-late"))  # after the status: committed at teardown
            signal("late")
            await anyio.Event().wait()  # never set: only the client leaving ends this body
            yield b"never sent\n"

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/killed")
    def killed(label: str, then: str) -> dict[str, str]:
        session = write(label, flush=True)
        events["pid"] = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        signal("began")
        if not events["killed"].wait(WAIT):
            raise RuntimeError("the test never killed the backend")
        if then == "queries":
            session.execute(text("SELECT 1"))
        return {"written": label}  # "returns": the commit meets the dead connection

    return fault_app


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'faults.sqlite3'}"
    return str(request.getfixturevalue("postgres_schema_url"))


@asynccontextmanager
async def serving(fault_app: FaultApp) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, its lifespan run: an exception the app raises becomes the server's 500."""
    async with fault_app.app.router.lifespan_context(fault_app.app):
        transport = httpx.ASGITransport(app=fault_app.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def wait_for(event: asyncio.Event, task: asyncio.Future[Any]) -> None:
    """Wait for ``event``, failing at once (not hanging) if ``task`` ends first."""
    waiting = asyncio.ensure_future(event.wait())
    with anyio.fail_after(WAIT):
        done, _ = await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
    if waiting not in done:
        waiting.cancel()
        pytest.fail(f"the request ended before the event: {task.result()!r}")


# --------------------------------------------------------------------------------------------------
# The fault table.
# --------------------------------------------------------------------------------------------------

Act = Callable[[httpx.AsyncClient, FaultApp, str], Awaitable["int | None"]]


def posting(path: str) -> Act:
    async def act(client: httpx.AsyncClient, fault_app: FaultApp, label: str) -> int | None:
        return (await client.post(path, params={"label": label})).status_code

    return act


async def commit_fails(client: httpx.AsyncClient, fault_app: FaultApp, label: str) -> int | None:
    assert (await client.post("/ok", params={"label": "taken"})).status_code == 200
    return (await client.post("/duplicate", params={"label": label, "existing": "taken"})).status_code


async def task_cancelled(client: httpx.AsyncClient, fault_app: FaultApp, label: str) -> int | None:
    """The request's task is cancelled (a timeout, a server shutting down) while its transaction is open."""
    fault_app.events["written"] = asyncio.Event()
    task = asyncio.ensure_future(client.post("/wait", params={"label": label}))
    await wait_for(fault_app.events["written"], task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return None  # no response at all


async def pool_exhausted(client: httpx.AsyncClient, fault_app: FaultApp, label: str) -> int | None:
    """Another request holds the pool's only connection: this one waits pool_timeout, then fails."""
    fault_app.events.update(written=asyncio.Event(), release=asyncio.Event())
    holder = asyncio.ensure_future(client.post("/hold", params={"label": f"{label}-holder"}))
    await wait_for(fault_app.events["written"], holder)
    status = (await client.post("/ok", params={"label": label})).status_code
    fault_app.events["release"].set()
    assert (await holder).status_code == 200
    return status


@dataclass
class Fault:
    act: Act
    status: int | None  # what the client receives; None: no response
    committed: bool  # the request's row, read through another connection
    failure: type[BaseException] | None  # what every other finalizer receives
    teardown_order: tuple[str, ...] = ("after", "before")  # reverse creation order
    logged: tuple[str, ...] = ()  # teardown errors on the di_request_scope logger


FAULTS = {
    "none": Fault(posting("/ok"), 200, True, None),
    "endpoint-exception": Fault(posting("/raise"), 500, False, RuntimeError),
    "http-exception": Fault(posting("/http-error"), 409, False, RequestFailed),
    "finalizer-raises": Fault(
        posting("/finalizer-raises"),
        200,
        True,  # committed before the response, so before any teardown
        None,
        ("failing", "after", "before"),
        ("teardown of failing failed",),
    ),
    "commit-fails": Fault(commit_fails, 500, False, None),  # failure: the database's IntegrityError
    "task-cancelled": Fault(task_cancelled, None, False, asyncio.CancelledError),
    "pool-exhausted": Fault(pool_exhausted, 500, False, PoolTimeout),
}


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
async def test_fault_table(fault: Fault, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Each fault: the client's status, what was committed, every other finalizer ran, nothing leaked."""
    pool_timeout = 0.5 if fault.act is pool_exhausted else WAIT  # how long a request waits for the pool
    fault_app = build_app(database_url, pool_timeout=pool_timeout)
    caplog.set_level(logging.ERROR, logger="di_request_scope")
    label = "the-request"
    async with serving(fault_app) as client:
        status = await fault.act(client, fault_app, label)
        checked_out = fault_app.checked_out()
        after_fault = (await client.post("/ok", params={"label": "next"})).status_code
        checked_out_at_the_end = fault_app.checked_out()

    assert status == fault.status
    assert (label in fault_app.texts()) is fault.committed
    teardowns = fault_app.tracker.of(label)
    assert [name for name, _ in teardowns] == list(fault.teardown_order)  # each once, newest first
    expected = IntegrityError if fault.act is commit_fails else fault.failure
    for name, failure in teardowns:
        if expected is None or name == "failing":
            assert failure is None, (name, failure)
        else:
            assert isinstance(failure, expected), (name, failure)
    logged = [str(r.exc_info[1]) for r in caplog.records if r.name == "di_request_scope" and r.exc_info]
    assert logged == list(fault.logged)
    ledger = fault_app.ledger
    assert sorted(ledger.closed) == sorted(ledger.created)  # every session closed exactly once
    assert checked_out == checked_out_at_the_end == 0
    assert after_fault == 200  # the app recovered: the next request commits
    assert "next" in fault_app.texts()


# --------------------------------------------------------------------------------------------------
# A commit must never wait for a worker thread that a request holds while it waits for a connection.
# --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_commit_does_not_wait_for_worker_threads_held_by_requests_waiting_for_its_connection(
    database_url: str,
) -> None:
    """Pool exhausted, threadpool saturated by requests waiting for the pool: the holder still commits.

    The holder took the pool's only connection in a worker thread, so its commit
    goes to a worker thread too. Two more requests wait for that connection in
    the only two worker threads there are. If the commit waited for one of those
    threads, nothing could move until the pool timeout failed the waiters: the
    deadlock FastAPI avoids for its own dependency exits with a limiter of their own.
    """
    fault_app = build_app(database_url, pool_timeout=5)  # bounds the deadlock, if there is one
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    limiter.total_tokens = 2
    all_inside = asyncio.Event()
    fault_app.events.update(
        written=asyncio.Event(), release=all_inside, lock=threading.Lock(), inside=0, expected=2
    )
    fault_app.events["all inside"] = all_inside
    try:
        async with serving(fault_app) as client:
            holder = asyncio.ensure_future(client.post("/hold", params={"label": "holder"}))
            await wait_for(fault_app.events["written"], holder)  # the only connection is taken
            waiters = [
                asyncio.ensure_future(client.post("/write-now", params={"label": f"waiter-{i}"}))
                for i in range(2)
            ]
            with anyio.fail_after(WAIT):
                responses = await asyncio.gather(holder, *waiters)
            checked_out = fault_app.checked_out()
    finally:
        limiter.total_tokens = tokens

    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert fault_app.texts() == ["holder", "waiter-0", "waiter-1"]
    assert checked_out == 0


# --------------------------------------------------------------------------------------------------
# On a real server: the client leaves; the database goes away.
# --------------------------------------------------------------------------------------------------


def send_request(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
    return sock


@pytest.mark.server
def test_client_leaving_mid_request_on_uvicorn_rolls_back_and_leaks_nothing(
    database_url: str, uvicorn_server: Any
) -> None:
    """The client closes its socket while its transaction is open: rolled back, finalizers told, no leak."""
    fault_app = build_app(database_url)
    fault_app.events["written"] = threading.Event()
    with uvicorn_server(fault_app.app) as server:
        with send_request(server.port, "/until-disconnect?label=gone"):
            assert fault_app.events["written"].wait(WAIT)
        fault_app.tracker.wait_for("gone", 2)
        checked_out = fault_app.checked_out()
        next_status = httpx.post(f"{server.url}/ok", params={"label": "next"}, timeout=WAIT).status_code

    assert fault_app.texts() == ["next"]
    teardowns = fault_app.tracker.of("gone")
    assert [name for name, _ in teardowns] == ["after", "before"]
    for _, failure in teardowns:
        assert isinstance(failure, RequestFailed)
        assert "disconnected" in str(failure)
    assert sorted(fault_app.ledger.closed) == sorted(fault_app.ledger.created)
    assert checked_out == 0
    assert next_status == 200


@pytest.mark.server
def test_client_leaving_mid_stream_on_uvicorn_keeps_the_early_commit_and_rolls_back_the_rest(
    database_url: str, uvicorn_server: Any
) -> None:
    """Mid-stream: the rows written before the status stay committed, those written after roll back."""
    fault_app = build_app(database_url)
    fault_app.events.update(written=threading.Event(), late=threading.Event())
    with uvicorn_server(fault_app.app) as server:
        with send_request(server.port, "/stream?label=streamed") as sock:
            received = b""
            while b"first-chunk" not in received:
                chunk = sock.recv(4096)
                assert chunk, f"the server closed the connection early: {received!r}"
                received += chunk
            assert fault_app.events["late"].wait(WAIT)
        fault_app.tracker.wait_for("streamed", 2)
        checked_out = fault_app.checked_out()
        next_status = httpx.post(f"{server.url}/ok", params={"label": "next"}, timeout=WAIT).status_code

    assert received.startswith(b"HTTP/1.1 200")  # the status was sent before the client left
    assert fault_app.texts() == ["next", "streamed"]  # the early row stays, the late one is gone
    for _, failure in fault_app.tracker.of("streamed"):
        assert isinstance(failure, RequestFailed)
    assert sorted(fault_app.ledger.closed) == sorted(fault_app.ledger.created)
    assert checked_out == 0
    assert next_status == 200


@pytest.mark.server
@pytest.mark.postgres
@pytest.mark.parametrize("then", ["queries", "returns"])
def test_database_going_away_mid_request_answers_500_commits_nothing_and_the_pool_recovers(
    then: str, postgres_schema_url: str, uvicorn_server: Any
) -> None:
    """pg_terminate_backend on the request's connection: a 5xx, never a 2xx; nothing saved; pool recovers.

    The endpoint began its transaction, then the test kills its backend. It goes
    on either querying (the query fails) or returning (the commit before the
    response fails).
    """
    fault_app = build_app(postgres_schema_url)
    fault_app.events.update(began=threading.Event(), killed=threading.Event())
    admin = create_engine(postgres_schema_url, poolclass=NullPool)
    try:
        with uvicorn_server(fault_app.app) as server, ThreadPoolExecutor(max_workers=1) as pool:
            response = pool.submit(
                httpx.post, f"{server.url}/killed", params={"label": "killed", "then": then}, timeout=WAIT
            )
            assert fault_app.events["began"].wait(WAIT)
            with admin.connect() as conn:
                # With a timeout (PostgreSQL >= 14) it returns once the backend has exited.
                query = text("SELECT pg_terminate_backend(:pid, :timeout_ms)")
                params = {"pid": fault_app.events["pid"], "timeout_ms": WAIT * 1000}
                assert conn.execute(query, params).scalar_one() is True
            fault_app.events["killed"].set()
            status = response.result(WAIT).status_code
            fault_app.tracker.wait_for("killed", 2)
            checked_out = fault_app.checked_out()
            next_status = httpx.post(f"{server.url}/ok", params={"label": "next"}, timeout=WAIT).status_code
    finally:
        admin.dispose()

    assert status == 500
    assert fault_app.texts() == ["next"]
    teardowns = fault_app.tracker.of("killed")
    assert [name for name, _ in teardowns] == ["after", "before"]  # the other finalizers still ran
    for _, failure in teardowns:
        assert isinstance(failure, OperationalError), failure
        assert "terminat" in str(failure)
    assert sorted(fault_app.ledger.closed) == sorted(fault_app.ledger.created)
    assert checked_out == 0
    assert next_status == 200  # the pool replaced the dead connection
