"""spawn() and task groups: background jobs in scopes of their own, on a real ASGI app and SQLite files."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from dependency_injector import containers, providers
from fastapi import BackgroundTasks, FastAPI
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from di_request_scope import (
    NoRequestScopeError,
    RequestScope,
    RequestScoped,
    RequestScopeMiddleware,
    current_scope,
    request_scope,
)
from di_request_scope.sqlalchemy import unit_of_work
from di_request_scope.tasks import spawn

if sys.version_info < (3, 11):  # pragma: no cover - anyio brings the backport there
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("text", String(100), nullable=False, unique=True),
)


class Container(containers.DeclarativeContainer):
    session_factory = providers.Dependency(instance_of=async_sessionmaker)
    session = RequestScoped(unit_of_work, session_factory)


container = Container()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[str]:
    """A SQLite file the container's AsyncSessions write to; yields its URL for reading it back."""
    url = f"sqlite:///{tmp_path / 'notes.sqlite3'}"
    engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://"))

    @event.listens_for(engine.sync_engine, "connect")
    def no_implicit_begin(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def begin_immediate(conn: Any) -> None:
        # Concurrent jobs write to one file: with SQLite's deferred BEGIN the second
        # writer can fail at once ("database is locked") instead of waiting its turn.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    container.session_factory.override(providers.Object(async_sessionmaker(engine)))
    try:
        yield url
    finally:
        container.session_factory.reset_override()
        await engine.dispose()


def committed(url: str) -> list[str]:
    """What was committed, read through a connection of our own."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(select(notes.c.text)).scalars())
    finally:
        engine.dispose()


async def add_note(text: str) -> tuple[RequestScope, AsyncSession]:
    session = await container.session()
    await session.execute(insert(notes).values(text=text))
    return current_scope(), session


# --------------------------------------------------------------------------- spawn() from a request


@dataclass
class NotesApp:
    """A FastAPI app whose endpoint writes a note, then starts a job that writes another one later."""

    start: Callable[..., asyncio.Task[Any]]
    release: asyncio.Event = field(default_factory=asyncio.Event)
    jobs: list[asyncio.Task[Any]] = field(default_factory=list)
    seen: dict[str, tuple[RequestScope, AsyncSession]] = field(default_factory=dict)

    def build(self) -> FastAPI:
        app = FastAPI()
        app.add_middleware(RequestScopeMiddleware)

        async def later(text: str) -> None:
            await self.release.wait()  # until the test has seen the request end
            self.seen["job"] = await add_note(text)

        @app.post("/notes")
        async def create(text: str) -> dict[str, str]:
            self.seen["request"] = await add_note(text)
            self.jobs.append(self.start(later, f"{text} (from the job)"))
            return {"created": text}

        return app

    async def post(self, text: str) -> httpx.Response:
        # The transport returns once the app call is over, middleware teardown included.
        transport = httpx.ASGITransport(app=self.build())
        async with httpx.AsyncClient(transport=transport, base_url="http://notes") as client:
            return await client.post("/notes", params={"text": text})


async def test_spawned_job_outlives_its_request_with_a_session_of_its_own(database: str) -> None:
    """The job runs after the request's scope closed, in its own scope and session, and commits."""
    app = NotesApp(start=spawn)
    response = await app.post("ada")
    assert response.status_code == 200
    request_scope_, request_session = app.seen["request"]
    assert request_scope_.closed
    assert committed(database) == ["ada"]  # the request committed; the job has not written yet

    app.release.set()
    [job] = app.jobs
    await job
    job_scope, job_session = app.seen["job"]
    assert job_scope is not request_scope_
    assert job_session is not request_session
    assert job_scope.closed
    assert committed(database) == ["ada", "ada (from the job)"]


async def test_job_spawned_from_a_background_task_starts_after_the_request_committed(database: str) -> None:
    """spawn() as a background task: the job starts once the request's writes are committed."""
    jobs: list[asyncio.Task[bool]] = []

    async def welcome(text: str) -> bool:
        found = text in committed(database)  # not through the app's engine: its BEGIN would wait
        session = await container.session()
        await session.execute(insert(notes).values(text=f"welcome {text}"))
        return found

    # --8<-- [start:after_commit]
    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    async def start_welcome(email: str) -> None:
        jobs.append(spawn(welcome, email))  # the request does not wait for the job

    @app.post("/users")
    async def register(email: str, background: BackgroundTasks) -> dict[str, str]:
        session = await container.session()
        await session.execute(insert(notes).values(text=email))  # committed before the response
        background.add_task(start_welcome, email)  # runs after the response, so after the commit
        return {"registered": email}

    # --8<-- [end:after_commit]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://notes") as client:
        assert (await client.post("/users", params={"email": "erin@example.com"})).status_code == 200
    [job] = jobs
    assert await job is True  # the request's row was committed when the job started
    assert committed(database) == ["erin@example.com", "welcome erin@example.com"]


async def test_a_plain_create_task_job_finds_its_requests_scope_closed(database: str) -> None:
    """Why spawn() exists: asyncio.create_task() inherits the request's scope, closed when the job runs."""
    app = NotesApp(start=lambda func, *args: asyncio.create_task(func(*args)))
    assert (await app.post("bob")).status_code == 200
    app.release.set()
    [job] = app.jobs
    with pytest.raises(NoRequestScopeError, match="request scope that has already closed"):
        await job
    assert committed(database) == ["bob"]


async def test_spawned_job_that_raises_rolls_back_and_is_logged(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed job's writes roll back; the error is logged (nobody may await it) and raised to an awaiter."""

    async def fails_after_writing(text: str) -> None:
        await add_note(text)
        raise ValueError(f"{text}: refused")

    with caplog.at_level(logging.ERROR, logger="di_request_scope"):
        job = spawn(fails_after_writing, "carol")
        with pytest.raises(ValueError, match="carol: refused"):
            await job
    assert committed(database) == []
    [record] = [r for r in caplog.records if r.name == "di_request_scope"]
    assert "background job spawn(" in record.getMessage()
    assert "fails_after_writing" in record.getMessage()
    assert isinstance(record.exc_info and record.exc_info[1], ValueError)


async def test_spawn_leaves_the_callers_scope_current_and_untouched(database: str) -> None:
    """Spawning from inside a scope neither replaces the caller's scope nor shares its session."""
    async with request_scope() as outer:
        callers_session = await container.session()
        _, job_session = await spawn(add_note, "dave")
        assert current_scope() is outer
        assert await container.session() is callers_session
        assert job_session is not callers_session
    assert committed(database) == ["dave"]


def test_spawn_without_a_running_event_loop_says_what_to_do() -> None:
    """Outside async code spawn() raises a RuntimeError that names the job and the alternative."""

    async def job() -> None:  # pragma: no cover - never runs
        pass

    with pytest.raises(RuntimeError, match=r"spawn\(.*job\) needs a running event loop.*@request_scope"):
        spawn(job)


def test_spawn_refuses_a_sync_function_before_running_it() -> None:
    ran: list[bool] = []

    def job() -> None:
        ran.append(True)

    with pytest.raises(TypeError, match=r"spawn\(\) runs async jobs, and .*job is a sync function"):
        spawn(job)  # type: ignore[arg-type]
    assert ran == []


async def test_a_cancelled_job_is_logged_as_rolled_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="di_request_scope")  # whatever level others left the root at
    started = asyncio.Event()

    async def job() -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    task = spawn(job)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert any("was cancelled; its request scope was rolled back" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- task groups


async def test_each_job_in_a_task_group_gets_its_own_scope_and_session(database: str) -> None:
    """request_scope() as a decorator opens one scope per call: concurrent jobs never share a session."""
    arrived = 0
    all_arrived = anyio.Event()
    seen: list[tuple[RequestScope, AsyncSession]] = []

    async def job(text: str) -> None:
        nonlocal arrived
        session = await container.session()
        arrived += 1
        if arrived == 3:
            all_arrived.set()
        await all_arrived.wait()  # all three hold their sessions at once
        seen.append(await add_note(text))
        assert await container.session() is session

    async with request_scope() as outer, anyio.create_task_group() as tg:
        for text in ("erin", "frank", "grace"):
            tg.start_soon(request_scope()(job), text)
    assert len({id(scope) for scope, _ in seen}) == 3
    assert len({id(session) for _, session in seen}) == 3
    assert outer not in {scope for scope, _ in seen}
    assert all(scope.closed for scope, _ in seen)
    assert committed(database) == ["erin", "frank", "grace"]


async def test_a_failing_job_in_a_task_group_rolls_back_only_its_own_writes(database: str) -> None:
    """Each job commits or rolls back alone; the group still raises the failure."""
    done = {text: anyio.Event() for text in ("heidi", "ivan")}

    async def job(text: str) -> None:
        await add_note(text)

    async def failing_job() -> None:
        for finished in done.values():
            await finished.wait()  # the others have committed
        await add_note("mallory")
        raise ValueError("mallory: refused")

    async def then_mark_done(scoped: Callable[[str], Awaitable[None]], text: str) -> None:
        await scoped(text)  # its scope, and so its commit, is over here
        done[text].set()

    with pytest.raises(ExceptionGroup) as raised:
        async with anyio.create_task_group() as tg:
            tg.start_soon(request_scope()(failing_job))
            for text in done:
                tg.start_soon(then_mark_done, request_scope()(job), text)
    assert raised.group_contains(ValueError, match="mallory: refused")
    assert committed(database) == ["heidi", "ivan"]
