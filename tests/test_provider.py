"""RequestScoped: one instance per scope, every kind of ``provides``, concurrency, dependency-injector."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
import pytest
from dependency_injector import containers, providers
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from di_request_scope import (
    NoRequestScopeError,
    RequestFailed,
    RequestScoped,
    ScopeMisuseError,
    request_scope,
)

from .helpers import recording_async_generator, recording_generator, wait_for


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- helpers


class Connection:
    """A plain object to hand out; each instance is a distinct identity."""


class Repository:
    def __init__(self, session: Any) -> None:
        self.session = session


class Handle:
    """What ``Tracked.__enter__`` returns: the instance the scope hands out."""

    def __init__(self, owner: Tracked) -> None:
        self.owner = owner


class Tracked:
    """A sync context manager recording what ``__exit__`` received."""

    def __init__(self) -> None:
        self.exits: list[tuple[type[BaseException] | None, BaseException | None]] = []

    def __enter__(self) -> Handle:
        return Handle(self)

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.exits.append((et, exc))


class AsyncTracked:
    """An async context manager (no ``__exit__``) recording what ``__aexit__`` received."""

    def __init__(self) -> None:
        self.exits: list[tuple[type[BaseException] | None, BaseException | None]] = []

    async def __aenter__(self) -> Handle:
        return Handle(self)  # type: ignore[arg-type]

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.exits.append((et, exc))


def unit_of_work(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """The documented generator: commit when the scope succeeded, roll back when it failed."""
    with session_factory() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


async def async_unit_of_work(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(engine) as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()


INSERT = text("INSERT INTO items (name) VALUES (:name)")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "app.sqlite3"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    """A real SQLite file with an ``items`` table."""
    eng = create_engine(f"sqlite:///{db_path}")
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"))
    yield eng
    eng.dispose()


@pytest.fixture
async def async_engine(db_path: Path, engine: Engine) -> AsyncIterator[AsyncEngine]:
    """The same SQLite file through aiosqlite."""
    eng = create_async_engine(f"sqlite+aiosqlite:///{db_path}")
    yield eng
    await eng.dispose()


def committed_rows(db_path: Path) -> list[str]:
    """Names in ``items`` as a brand-new sqlite3 connection sees them."""
    with closing(sqlite3.connect(db_path)) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM items ORDER BY id")]


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    """Switch threads as often as possible so that races in creation would show."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


# --------------------------------------------------------------------------- one instance per scope


def test_resolving_twice_in_one_scope_returns_the_same_instance() -> None:
    """Every resolution inside one scope returns the one instance created first."""
    provider = RequestScoped(Connection)
    with request_scope():
        first = provider()
        assert isinstance(first, Connection)
        assert provider() is first
        assert provider() is first


def test_instance_is_created_lazily_on_first_resolution() -> None:
    """Opening a scope creates nothing; the factory runs on the first resolution only."""
    calls: list[int] = []

    def connect() -> Connection:
        calls.append(1)
        return Connection()

    provider = RequestScoped(connect)
    with request_scope():
        assert calls == []
        provider()
        assert calls == [1]
        provider()
        assert calls == [1]
    with request_scope():
        pass  # never resolved: never created
    assert calls == [1]


def test_next_scope_gets_a_new_instance() -> None:
    """A scope never sees the instance of a previous scope."""
    provider = RequestScoped(Connection)
    with request_scope():
        first = provider()
    with request_scope():
        second = provider()
        assert second is not first
        assert provider() is second


def test_several_request_scoped_providers_are_independent() -> None:
    """Two providers of the same class keep separate instances in the same scope."""
    a = RequestScoped(Connection)
    b = RequestScoped(Connection)
    with request_scope():
        a1, b1 = a(), b()
        assert a1 is not b1
        assert a() is a1
        assert b() is b1


def test_a_request_scoped_dependency_is_shared_by_its_dependents_in_the_scope() -> None:
    """A provider injected into two request-scoped providers gives both the same instance."""
    db = RequestScoped(Connection)
    repo_a = RequestScoped(Repository, db)
    repo_b = RequestScoped(Repository, session=db)
    with request_scope():
        assert repo_a().session is db()
        assert repo_b().session is db()
        assert repo_a() is not repo_b()


def test_provider_arguments_are_resolved_like_factory_arguments() -> None:
    """Provider args and kwargs are resolved at creation, plain values are passed as they are."""
    marker = object()

    def build(a: Any, b: Any, *, c: Any, d: Any) -> tuple[Any, Any, Any, Any]:
        return a, b, c, d

    provider = RequestScoped(build, providers.Object(1), marker, c=providers.Factory(Connection), d="x")
    with request_scope():
        a, b, c, d = provider()
    assert (a, d) == (1, "x")
    assert b is marker
    assert isinstance(c, Connection)


def test_failed_creation_is_not_cached_and_the_next_resolution_tries_again() -> None:
    """A factory that raises leaves nothing behind in the scope."""
    attempts: list[int] = []

    def flaky() -> Connection:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("first try fails")
        return Connection()

    provider = RequestScoped(flaky)
    with request_scope():
        with pytest.raises(ConnectionError, match="first try fails"):
            provider()
        instance = provider()
        assert provider() is instance
    assert len(attempts) == 2


# --------------------------------------------------------------------------- kinds of provides and teardown


def test_generator_initializer_yields_the_instance_and_finishes_at_teardown() -> None:
    """The yielded value is the instance; code after ``yield`` runs when the scope closes."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    with request_scope():
        assert provider() == "conn"
        assert log == []
    assert log == [("conn", None)]


def test_failure_is_thrown_into_generator_initializers() -> None:
    """The exception leaving the block is thrown into the generator at its ``yield``."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    error = ValueError("request failed")
    with pytest.raises(ValueError, match="request failed") as info, request_scope():
        provider()
        raise error
    assert info.value is error
    assert log == [("conn", error)]


def test_context_manager_result_is_entered_and_exited_with_the_outcome() -> None:
    """A context manager is entered (its ``__enter__`` result is the instance) and exited with the failure."""
    tracked: list[Tracked] = []

    def make() -> Tracked:
        tracked.append(Tracked())
        return tracked[-1]

    provider = RequestScoped(make)
    with request_scope():
        handle = provider()
        assert isinstance(handle, Handle)
        assert handle.owner is tracked[0]
        assert tracked[0].exits == []
    assert tracked[0].exits == [(None, None)]

    error = KeyError("missing")
    with pytest.raises(KeyError), request_scope():
        provider()
        raise error
    assert tracked[1].exits == [(KeyError, error)]


@pytest.mark.anyio
async def test_async_generator_initializer_is_awaited_and_finished_at_teardown() -> None:
    """An async generator's value is the instance; its code after ``yield`` runs at async teardown."""
    log: list[Any] = []
    provider = RequestScoped(recording_async_generator(log, "aconn"))
    async with request_scope():
        assert await provider() == "aconn"
        assert log == []
    assert log == [("aconn", None)]

    error = RuntimeError("async request failed")
    with pytest.raises(RuntimeError):
        async with request_scope():
            await provider()
            raise error
    assert log[1] == ("aconn", error)


@pytest.mark.anyio
async def test_async_function_result_is_the_instance() -> None:
    """An async factory is awaited once per scope; its result is cached for the scope."""
    calls: list[int] = []

    async def connect() -> Connection:
        calls.append(1)
        return Connection()

    provider = RequestScoped(connect)
    async with request_scope():
        first = await provider()
        assert isinstance(first, Connection)
        assert await provider() is first
    async with request_scope():
        assert await provider() is not first
    assert calls == [1, 1]


@pytest.mark.anyio
async def test_async_context_manager_is_awaited_and_exited_with_the_outcome() -> None:
    """An object with ``__aenter__``/``__aexit__`` and no ``__exit__`` is entered and exited with await."""
    tracked: list[AsyncTracked] = []

    def make() -> AsyncTracked:
        tracked.append(AsyncTracked())
        return tracked[-1]

    provider = RequestScoped(make)
    async with request_scope():
        handle = await provider()
        assert isinstance(handle, Handle)
        assert handle.owner is tracked[0]  # type: ignore[comparison-overlap]
    assert tracked[0].exits == [(None, None)]

    error = LookupError("nope")
    with pytest.raises(LookupError):
        async with request_scope():
            await provider()
            raise error
    assert tracked[1].exits == [(LookupError, error)]


@pytest.mark.anyio
async def test_async_creation_switches_the_provider_to_async_mode() -> None:
    """Once created asynchronously, every resolution returns an awaitable, also of the cached instance."""

    async def connect() -> Connection:
        return Connection()

    provider = RequestScoped(connect)
    assert provider.is_async_mode_undefined()
    async with request_scope():
        first = provider()
        assert inspect.isawaitable(first)
        instance = await first
        assert provider.is_async_mode_enabled()
        again = provider()
        assert inspect.isawaitable(again)
        assert await again is instance


@pytest.mark.anyio
async def test_a_provider_depending_on_an_async_one_is_created_asynchronously() -> None:
    """A sync class injected with an async instance is awaited and gets the scope's instance."""
    log: list[Any] = []
    session = RequestScoped(recording_async_generator(log, "asession"))
    repository = RequestScoped(Repository, session=session)
    async with request_scope():
        repo = await repository()
        assert repo.session == "asession"
        assert await repository() is repo
        assert await session() == "asession"
    assert log == [("asession", None)]


@pytest.mark.anyio
async def test_teardown_runs_in_reverse_creation_order_across_sync_and_async() -> None:
    """Sync and async finalizers interleave in exact reverse creation order."""
    log: list[Any] = []
    a = RequestScoped(recording_generator(log, "a"))
    b = RequestScoped(recording_async_generator(log, "b"))
    c = RequestScoped(recording_generator(log, "c"))
    d = RequestScoped(recording_generator(log, "d"))
    e = RequestScoped(recording_async_generator(log, "e"))
    async with request_scope():
        # resolution order, not declaration order, decides
        await e()
        a()
        await b()
        c()
        d()
    assert [name for name, _ in log] == ["d", "c", "b", "a", "e"]


# --------------------------------------------------------------------------- real SQLAlchemy sessions


def make_session_container(engine: Engine) -> Any:
    class Container(containers.DeclarativeContainer):
        engine_ = providers.Object(engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine_)
        db = RequestScoped(session_factory)
        uow = RequestScoped(unit_of_work, session_factory)

    return Container()


def test_session_is_closed_and_its_connection_returned_at_teardown(engine: Engine) -> None:
    """A Session from ``RequestScoped(session_factory)`` is exited: its connection goes back to the pool."""
    container = make_session_container(engine)
    with request_scope():
        session = container.db()
        assert isinstance(session, Session)
        assert session.execute(text("SELECT 1")).scalar() == 1
        assert session.in_transaction()
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        assert container.db() is session
    assert not session.in_transaction()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_unit_of_work_generator_commits_when_the_scope_succeeds(engine: Engine, db_path: Path) -> None:
    """The generator commits after ``yield``: a fresh connection sees the row."""
    container = make_session_container(engine)
    with request_scope():
        container.uow().execute(INSERT, {"name": "kept"})
        assert committed_rows(db_path) == []
    assert committed_rows(db_path) == ["kept"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_unit_of_work_generator_rolls_back_when_the_block_raises(engine: Engine, db_path: Path) -> None:
    """The block's exception reaches the generator, which rolls back: nothing is stored."""
    container = make_session_container(engine)
    with pytest.raises(ZeroDivisionError), request_scope():
        container.uow().execute(INSERT, {"name": "lost"})
        _ = 1 / 0
    assert committed_rows(db_path) == []
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_scope_fail_rolls_back_without_raising(engine: Engine, db_path: Path) -> None:
    """``scope.fail(exc)`` hands the failure to finalizers while the block exits normally."""
    container = make_session_container(engine)
    outcome = RequestFailed("handled as a 409", status_code=409)
    with request_scope() as scope:
        container.uow().execute(INSERT, {"name": "lost"})
        scope.fail(outcome)
        assert scope.failure is outcome
    assert committed_rows(db_path) == []


@pytest.mark.parametrize(("fails", "expected"), [(False, ["kept"]), (True, [])])
def test_sessionmaker_begin_context_manager_commits_or_rolls_back_by_outcome(
    engine: Engine, db_path: Path, fails: bool, expected: list[str]
) -> None:
    """``RequestScoped(SessionLocal.begin)``: the failure is passed to ``__exit__``, which decides."""
    session_local = sessionmaker(bind=engine)

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(session_local.begin)

    container = Container()
    with pytest.raises(ValueError) if fails else nullcontext(), request_scope():
        session = container.db()
        assert isinstance(session, Session)
        session.execute(INSERT, {"name": "kept"})
        if fails:
            raise ValueError("roll back")
    assert committed_rows(db_path) == expected
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_async_session_is_closed_and_its_connection_returned_at_teardown(
    async_engine: AsyncEngine,
) -> None:
    """``RequestScoped(AsyncSession, bind=engine)`` is entered and closed with ``async with``."""

    class Container(containers.DeclarativeContainer):
        engine_ = providers.Object(async_engine)
        db = RequestScoped(AsyncSession, bind=engine_)

    container = Container()
    pool = async_engine.sync_engine.pool
    async with request_scope():
        session = await container.db()
        assert isinstance(session, AsyncSession)
        assert (await session.execute(text("SELECT 1"))).scalar() == 1
        assert session.in_transaction()
        assert pool.checkedout() == 1  # type: ignore[attr-defined]
        assert await container.db() is session
    assert not session.in_transaction()
    assert pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_async_unit_of_work_commits_on_success_and_rolls_back_on_failure(
    async_engine: AsyncEngine, db_path: Path
) -> None:
    """An async generator around AsyncSession commits or rolls back by the scope's outcome."""

    class Container(containers.DeclarativeContainer):
        engine_ = providers.Object(async_engine)
        uow = RequestScoped(async_unit_of_work, engine_)

    container = Container()
    async with request_scope():
        await (await container.uow()).execute(INSERT, {"name": "kept"})
    with pytest.raises(RuntimeError):
        async with request_scope():
            await (await container.uow()).execute(INSERT, {"name": "lost"})
            raise RuntimeError("roll back")
    assert committed_rows(db_path) == ["kept"]
    assert async_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- concurrency


def test_twenty_threads_resolving_at_once_create_exactly_one_instance(fast_thread_switching: None) -> None:
    """Threads sharing the scope through copied contexts race on first resolution; one instance wins."""
    # The race is repeated in ten scopes so that a missing lock fails reliably (checked: 15/15 runs).
    created: list[Connection] = []

    def connect() -> Connection:
        # Pure-Python work: without the scope's lock other threads would run in here too.
        sum(range(50_000))
        created.append(Connection())
        return created[-1]

    provider = RequestScoped(connect)

    def resolve(barrier: threading.Barrier) -> Any:
        barrier.wait(timeout=30)
        return provider()

    with ThreadPoolExecutor(max_workers=20) as pool:
        for round_ in range(10):
            with request_scope():
                barrier = threading.Barrier(20)
                futures = [pool.submit(contextvars.copy_context().run, resolve, barrier) for _ in range(20)]
                results = [f.result() for f in futures]
                assert len(created) == round_ + 1, f"round {round_}: {len(created) - round_} instances"
                assert all(r is created[-1] for r in results)
                assert provider() is created[-1]


def test_instance_created_in_a_worker_thread_is_the_one_the_scope_sees() -> None:
    """A ThreadPoolExecutor running copied contexts shares the scope with the caller."""
    provider = RequestScoped(Connection)
    with request_scope(), ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(contextvars.copy_context().run, provider) for _ in range(8)]
        results = [f.result() for f in futures]
        assert all(r is results[0] for r in results)
        assert provider() is results[0]


@pytest.mark.anyio
async def test_twenty_concurrent_async_resolutions_create_exactly_one_instance() -> None:
    """asyncio.gather of 20 first resolutions shares one creation."""
    created: list[Connection] = []
    release = asyncio.Event()

    async def connect() -> Connection:
        instance = Connection()
        created.append(instance)
        await release.wait()
        return instance

    provider = RequestScoped(connect)
    resolving = 0

    async def resolve() -> Any:
        nonlocal resolving
        pending = provider()
        resolving += 1
        if resolving == 20:  # every task has asked before the creation can finish
            release.set()
        return await pending

    async with request_scope():
        results = await asyncio.gather(*(resolve() for _ in range(20)))
        assert await provider() is created[0]
    assert len(created) == 1
    assert all(r is created[0] for r in results)


@pytest.mark.anyio
async def test_cancelled_creator_lets_a_waiter_create_the_instance() -> None:
    """When the task creating the instance is cancelled, a task waiting for it creates it instead."""
    attempts: list[int] = []
    started = asyncio.Event()
    never = asyncio.Event()

    async def connect() -> str:
        n = len(attempts)
        attempts.append(n)
        if n == 0:  # the first creation only ends by being cancelled
            started.set()
            await never.wait()
        return f"connection-{n}"

    provider = RequestScoped(connect)
    waiter_asked = asyncio.Event()

    async def creator() -> Any:
        return await provider()

    async def waiter() -> Any:
        pending = provider()
        waiter_asked.set()
        return await pending

    async with request_scope():
        creating = asyncio.create_task(creator())
        await wait_for(started, creating)
        waiting = asyncio.create_task(waiter())
        await wait_for(waiter_asked, waiting)
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating
        assert await waiting == "connection-1"
        assert await provider() == "connection-1"
    assert attempts == [0, 1]


@pytest.mark.anyio
async def test_cancelled_waiter_does_not_cancel_the_shared_creation() -> None:
    """A waiter being cancelled leaves the creator's work, and the instance, intact."""
    created: list[Connection] = []
    started = asyncio.Event()
    release = asyncio.Event()

    async def connect() -> Connection:
        started.set()
        await release.wait()
        created.append(Connection())
        return created[-1]

    provider = RequestScoped(connect)
    waiter_asked = asyncio.Event()

    async def waiter() -> Any:
        pending = provider()
        waiter_asked.set()
        return await pending

    async with request_scope():
        creating = asyncio.ensure_future(provider())
        await wait_for(started, creating)
        waiting = asyncio.create_task(waiter())
        await wait_for(waiter_asked, waiting)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        assert await creating is created[0]
        assert await provider() is created[0]
    assert len(created) == 1


@pytest.mark.anyio
async def test_waiters_get_the_creators_error_and_a_later_resolution_tries_again() -> None:
    """A failed async creation is reported to every waiter and is not cached."""
    attempts: list[int] = []
    release = asyncio.Event()

    async def connect() -> Connection:
        attempts.append(1)
        if len(attempts) == 1:
            await release.wait()
            raise ConnectionError("database down")
        return Connection()

    provider = RequestScoped(connect)
    async with request_scope():
        first, second = provider(), provider()
        release.set()
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        instance = await provider()
        assert isinstance(instance, Connection)
    assert len(attempts) == 2


def test_async_provider_resolved_without_event_loop_raises_scope_misuse() -> None:
    """An async instance cannot be created from a thread with no running event loop."""

    async def connect() -> Connection:
        return Connection()

    provider = RequestScoped(connect)
    with request_scope():
        with pytest.raises(ScopeMisuseError, match="no running event loop") as info:
            provider()
        assert "RequestScoped(" in str(info.value)
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(contextvars.copy_context().run, provider)
            with pytest.raises(ScopeMisuseError, match="resolve it from async code"):
                future.result()


@pytest.mark.anyio
async def test_async_provider_resolved_from_a_worker_thread_raises_scope_misuse() -> None:
    """A sync dependency run in a worker thread cannot create an async instance."""
    provider = RequestScoped(recording_async_generator([], "aconn"))
    async with request_scope():
        with pytest.raises(ScopeMisuseError, match="no running event loop"):
            await anyio.to_thread.run_sync(provider)


@pytest.mark.anyio
async def test_async_instance_already_created_resolved_from_a_worker_thread_raises_scope_misuse() -> None:
    """Resolving an existing async instance from a thread with no loop is ScopeMisuseError too."""
    # Known bug: dependency-injector's async mode wraps the cached instance in asyncio.Future(),
    # which raises RuntimeError("There is no current event loop in thread ...") instead.
    provider = RequestScoped(recording_async_generator([], "aconn"))
    async with request_scope():
        assert await provider() == "aconn"
        with pytest.raises(ScopeMisuseError):
            await anyio.to_thread.run_sync(provider)


@pytest.mark.anyio
async def test_resolving_from_a_worker_thread_while_an_async_creation_is_pending_raises_scope_misuse() -> (
    None
):
    """A sync caller in a worker thread must not receive a coroutine for a creation under way."""
    # Known bug: it gets the raw ``_await_pending`` coroutine back instead of an error.
    started, release = asyncio.Event(), asyncio.Event()

    async def connect() -> Connection:
        started.set()
        await release.wait()
        return Connection()

    provider = RequestScoped(connect)

    def resolve_in_thread() -> Any:
        try:
            result = provider()
        except ScopeMisuseError as exc:
            return exc
        if inspect.iscoroutine(result):
            result.close()  # keep the failure report free of "never awaited" noise
        return result

    async with request_scope():
        creating = asyncio.ensure_future(provider())
        await wait_for(started, creating)
        try:
            outcome = await anyio.to_thread.run_sync(resolve_in_thread)
        finally:
            release.set()
            instance = await creating
        assert isinstance(outcome, ScopeMisuseError), f"got {outcome!r}"
        assert await provider() is instance


# --------------------------------------------------------------------------- errors


def test_resolving_outside_any_scope_names_the_provider_and_how_to_open_a_scope() -> None:
    """NoRequestScopeError names ``Container.db`` and points to request_scope and the middleware."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    container = Container()
    with pytest.raises(NoRequestScopeError) as info:
        container.db()
    message = str(info.value)
    assert message.startswith("Container.db ")
    assert "outside a request scope" in message
    assert "request_scope()" in message
    assert "RequestScopeMiddleware" in message

    bare = RequestScoped(Connection)
    with pytest.raises(NoRequestScopeError, match=r"^RequestScoped\(Connection\) "):
        bare()


def test_resolving_from_a_closed_scope_in_a_thread_raises_no_request_scope() -> None:
    """A thread still holding the request's context after it closed cannot resolve from it."""
    provider = RequestScoped(Connection)
    with request_scope():
        provider()  # even an instance that existed is not handed out after close
        late_context = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(late_context.run, provider)
        with pytest.raises(NoRequestScopeError, match="already closed") as info:
            future.result()
    assert str(info.value).startswith("RequestScoped(Connection) ")


@pytest.mark.anyio
async def test_resolving_from_a_task_that_outlives_its_scope_raises_no_request_scope() -> None:
    """A task created in the scope and resolving after it closed gets NoRequestScopeError."""
    provider = RequestScoped(Connection)
    go = asyncio.Event()

    async def background_job() -> Any:
        await go.wait()
        return provider()

    async with request_scope():
        provider()
        task = asyncio.create_task(background_job())
    go.set()
    with pytest.raises(NoRequestScopeError, match="outlived its request"):
        await task


@pytest.mark.anyio
async def test_instance_created_while_its_scope_closes_is_torn_down_and_the_resolver_gets_an_error() -> None:
    """An async creation finishing after close is torn down at once with NoRequestScopeError."""
    log: list[Any] = []
    entered = asyncio.Event()
    release = asyncio.Event()

    async def connect() -> AsyncIterator[str]:
        entered.set()
        await release.wait()
        try:
            yield "orphan"
        except BaseException as exc:
            log.append(exc)
            raise
        log.append(None)

    provider = RequestScoped(connect)
    async with request_scope() as scope:
        task = asyncio.create_task(provider())
        await wait_for(entered, task)
    assert scope.closed
    release.set()
    with pytest.raises(NoRequestScopeError, match="already closed"):
        await task
    assert len(log) == 1
    assert isinstance(log[0], NoRequestScopeError)


@pytest.mark.parametrize("provides", ["myapp.db.Session", 42, None, Connection()])
def test_invalid_provides_raises_type_error(provides: Any) -> None:
    """Strings and non-callables are rejected when the provider is declared."""
    with pytest.raises(TypeError, match="RequestScoped expects a class, a function or a provider to call"):
        RequestScoped(provides)


def test_generator_that_never_yields_raises_scope_misuse_on_resolution() -> None:
    """A generator initializer must yield its instance."""

    def broken() -> Iterator[str]:
        return
        yield "unreachable"

    provider = RequestScoped(broken)
    with request_scope(), pytest.raises(ScopeMisuseError, match="returned without yielding"):
        provider()


def test_generator_that_yields_twice_raises_scope_misuse_at_teardown() -> None:
    """A second ``yield`` is reported when the scope closes, and the generator is closed."""
    closed: list[bool] = []

    def twice() -> Iterator[str]:
        try:
            yield "first"
            yield "second"
        finally:
            closed.append(True)

    provider = RequestScoped(twice)
    with pytest.raises(ScopeMisuseError, match="yielded more than once"), request_scope():
        assert provider() == "first"
    assert closed == [True]


@pytest.mark.anyio
async def test_async_generator_that_never_yields_raises_scope_misuse_on_resolution() -> None:
    """An async generator initializer must yield its instance."""

    async def broken() -> AsyncIterator[str]:
        return
        yield "unreachable"

    provider = RequestScoped(broken)
    async with request_scope():
        with pytest.raises(ScopeMisuseError, match="returned without yielding"):
            await provider()


@pytest.mark.anyio
async def test_async_generator_that_yields_twice_raises_scope_misuse_at_teardown() -> None:
    """A second ``yield`` in an async generator is reported when the scope closes."""
    closed: list[bool] = []

    async def twice() -> AsyncIterator[str]:
        try:
            yield "first"
            yield "second"
        finally:
            closed.append(True)

    provider = RequestScoped(twice)
    with pytest.raises(ScopeMisuseError, match="yielded more than once"):
        async with request_scope():
            assert await provider() == "first"
    assert closed == [True]


# --------------------------------------------------------------------------- dependency-injector


def test_class_attribute_of_a_declarative_container_is_request_scoped() -> None:
    """Both the class attribute and the container instance's copy give one instance per scope."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    container = Container()
    assert isinstance(Container.db, RequestScoped)
    assert isinstance(container.db, RequestScoped)
    assert str(container.db) == "Container.db"
    with request_scope():
        assert Container.db() is Container.db()
        assert container.db() is container.db()
    with request_scope():
        assert isinstance(container.db(), Connection)


def test_two_container_instances_have_independent_copies() -> None:
    """Each container instance has its own provider, hence its own instance in the same scope."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    first, second = Container(), Container()
    assert first.db is not second.db
    assert first.db is not Container.db
    with request_scope():
        a, b = first.db(), second.db()
        assert a is not b
        assert first.db() is a
        assert second.db() is b


def test_nested_container_provider_is_request_scoped() -> None:
    """``providers.Container(SubContainer)`` keeps the sub-container's provider request-scoped."""

    class Persistence(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    class Application(containers.DeclarativeContainer):
        persistence = providers.Container(Persistence)
        repository = providers.Factory(Repository, session=persistence.db)

    app = Application()
    with request_scope():
        db = app.persistence.db()
        assert app.persistence.db() is db
        assert app.repository().session is db
    with request_scope():
        assert app.persistence.db() is not db
    with pytest.raises(NoRequestScopeError, match=r"^Persistence\.db "):
        app.repository()


def test_injected_into_factory_and_callable_gives_the_scopes_instance() -> None:
    """Factory and Callable dependents get the current scope's instance on every call."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)
        repository = providers.Factory(Repository, session=db)
        session_of = providers.Callable(lambda session: session, db)

    container = Container()
    with request_scope():
        db = container.db()
        r1, r2 = container.repository(), container.repository()
        assert r1 is not r2
        assert r1.session is db
        assert r2.session is db
        assert container.session_of() is db
    with request_scope():
        assert container.repository().session is not db


def test_provided_attribute_access_reads_from_the_scopes_instance(engine: Engine) -> None:
    """``Container.db.provided.bind`` resolves the scope's session and reads its attribute."""

    class Container(containers.DeclarativeContainer):
        engine_ = providers.Object(engine)
        session_factory = providers.Singleton(sessionmaker, bind=engine_)
        db = RequestScoped(session_factory)
        bind = db.provided.bind

    container = Container()
    with request_scope():
        assert container.bind() is engine
        assert Container.db.provided.bind() is engine
        assert container.db.provided.bind() is container.db().bind
    with pytest.raises(NoRequestScopeError):
        container.bind()


def test_traverse_finds_the_providers_given_as_arguments() -> None:
    """``traverse()`` walks from a RequestScoped to its provides and argument providers."""

    class Container(containers.DeclarativeContainer):
        engine = providers.Singleton(create_engine, "sqlite://")
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        db = RequestScoped(session_factory)
        uow = RequestScoped(unit_of_work, session_factory)
        repository = RequestScoped(Repository, session=db)

    container = Container()
    assert container.engine in list(container.db.traverse())
    assert container.session_factory in list(container.db.traverse())
    assert container.engine in list(container.uow.traverse())
    assert container.db in list(container.repository.traverse())
    assert container.engine in list(container.repository.traverse())
    assert set(container.traverse(types=[RequestScoped])) == {
        container.db,
        container.uow,
        container.repository,
    }

    fake = providers.Object(Connection())
    container.db.override(fake)
    assert fake in list(container.db.traverse())


def test_overridden_with_object_needs_no_scope_until_reset() -> None:
    """An override bypasses the scope; ``reset_override()`` brings the scope back."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    container = Container()
    fake = Connection()
    container.db.override(providers.Object(fake))
    assert container.db() is fake  # no scope open
    with request_scope():
        assert container.db() is fake
    container.db.reset_override()
    with pytest.raises(NoRequestScopeError):
        container.db()
    with request_scope():
        assert container.db() is not fake


def test_overridden_with_factory_gives_the_factorys_instances_without_scope() -> None:
    """A Factory override makes a new object per call and needs no scope."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    container = Container()
    container.db.override(providers.Factory(Repository, session=None))
    a, b = container.db(), container.db()
    assert isinstance(a, Repository)
    assert a is not b


def test_overridden_with_another_request_scoped_uses_its_scope_instance() -> None:
    """Overriding with a RequestScoped gives that provider's per-scope instance."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    container = Container()
    replacement = RequestScoped(Repository, session="fake")
    container.db.override(replacement)
    with request_scope():
        first = container.db()
        assert isinstance(first, Repository)
        assert container.db() is first
        assert replacement() is first
    with request_scope():
        assert container.db() is not first
    with pytest.raises(NoRequestScopeError, match=r"^RequestScoped\(Repository\) "):
        container.db()


def test_override_as_context_manager_restores_the_provider() -> None:
    """``with container.db.override(...)`` applies only inside the block."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    container = Container()
    fake = Connection()
    with container.db.override(providers.Object(fake)):
        assert container.db() is fake
    with pytest.raises(NoRequestScopeError):
        container.db()


@pytest.mark.parametrize("how", ["override", "context manager", "container"])
def test_override_made_while_the_scope_holds_an_instance_applies_at_once(how: str) -> None:
    """Resolving the cached instance takes a shortcut; overriding and resetting must switch it off and on."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)
        repository = providers.Factory(Repository, session=db)

    container = Container()
    fake = Connection()
    with request_scope():
        real = container.db()
        assert container.db() is real  # now served by the shortcut
        if how == "override":
            container.db.override(providers.Object(fake))
            assert container.db() is fake
            assert container.repository().session is fake
            container.db.reset_override()
        else:
            override = (
                container.db.override(providers.Object(fake))
                if how == "context manager"
                else container.override_providers(db=providers.Object(fake))
            )
            with override:
                assert container.db() is fake
                assert container.repository().session is fake
        assert container.db() is real
        assert container.repository().session is real


@pytest.mark.anyio
async def test_async_mode_switched_on_after_the_instance_exists_hands_out_awaitables() -> None:
    """``enable_async_mode()`` makes every call awaitable, also for an instance resolved before."""
    db = RequestScoped(Connection)
    async with request_scope():
        real = db()
        assert db() is real
        db.enable_async_mode()
        resolved = db()
        assert inspect.isawaitable(resolved)
        assert await resolved is real
        db.disable_async_mode()
        assert db() is real


def test_container_override_providers_replaces_the_provider() -> None:
    """``container.override_providers(db=...)`` overrides, and restores as a context manager."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)
        repository = providers.Factory(Repository, session=db)

    container = Container()
    fake = Connection()
    with container.override_providers(db=providers.Object(fake)):
        assert container.db() is fake
        assert container.repository().session is fake
    with pytest.raises(NoRequestScopeError):
        container.repository()


def test_override_on_the_class_is_copied_to_new_container_instances() -> None:
    """An override made on the declarative class applies to container instances made afterwards."""

    class Container(containers.DeclarativeContainer):
        db = RequestScoped(Connection)

    fake = Connection()
    Container.db.override(providers.Object(fake))
    try:
        container = Container()
        assert container.db() is fake
    finally:
        Container.db.reset_override()


def test_session_factory_on_an_engine_resource_initialised_by_the_container(sqlite_url: str) -> None:
    """``RequestScoped(Singleton(sessionmaker, bind=Resource))`` works with init/shutdown_resources."""
    disposed: list[Engine] = []

    def init_engine(url: str) -> Iterator[Engine]:
        engine = create_engine(url)
        yield engine
        engine.dispose()
        disposed.append(engine)

    class Container(containers.DeclarativeContainer):
        engine = providers.Resource(init_engine, sqlite_url)
        session_factory = providers.Singleton(sessionmaker, bind=engine)
        db = RequestScoped(session_factory)

    container = Container()
    container.init_resources()
    engine = container.engine()
    with request_scope():
        session = container.db()
        assert session.get_bind() is engine
        session.execute(text("SELECT 1"))
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    container.shutdown_resources()
    assert disposed == [engine]


def test_raw_sessionmaker_argument_survives_container_copy_by_reference(
    engine: Engine, db_path: Path
) -> None:
    """A plain sessionmaker passed as an argument is the same object in every container copy."""
    session_local = sessionmaker(bind=engine)

    class Container(containers.DeclarativeContainer):
        uow = RequestScoped(unit_of_work, session_local)
        begin = RequestScoped(session_local.begin)

    container = Container()
    assert container.uow is not Container.uow
    assert container.uow.args[0] is session_local
    assert Container.uow.args[0] is session_local
    assert container.uow.provides is unit_of_work
    assert container.begin.provides is Container.begin.provides
    with request_scope():
        session = container.uow()
        assert session.get_bind() is engine
        session.execute(INSERT, {"name": "kept"})
    assert committed_rows(db_path) == ["kept"]


def test_container_copy_keeps_provider_arguments_wired_to_the_copies() -> None:
    """Provider arguments are copied with the container, so an override on the copy is seen."""

    class Container(containers.DeclarativeContainer):
        name = providers.Object("original")
        labelled = RequestScoped(lambda name: name, name)

    container = Container()
    assert container.labelled.args[0] is container.name
    container.name.override(providers.Object("overridden"))
    with request_scope():
        assert container.labelled() == "overridden"
        assert Container.labelled() == "original"


@pytest.mark.anyio
async def test_a_resolution_that_is_never_awaited_does_not_block_later_ones() -> None:
    """A forgotten ``await`` warns as Python does, and the next resolution creates the instance."""
    made: list[object] = []

    async def make() -> object:
        made.append(object())
        return made[-1]

    provider = RequestScoped(make)
    async with request_scope():
        with pytest.warns(RuntimeWarning, match="never awaited"):
            provider()  # the forgotten await
            gc.collect()
        with anyio.fail_after(30):  # a guard: the bug this test catches is a hang
            instance = await provider()
        assert instance is made[-1]
        assert await provider() is instance


@pytest.mark.anyio
async def test_a_resolution_kept_but_never_awaited_does_not_block_the_next_one() -> None:
    """A provider pinned to sync mode keeps an un-awaited resolution; the next resolution still completes."""

    async def connect() -> object:
        return object()

    class Repo:
        def __init__(self, session: Any) -> None:
            self.session = session

    class Container(containers.DeclarativeContainer):
        session = RequestScoped(connect)
        users = providers.Factory(Repo, session=session)
        notes = providers.Factory(Repo, session=session)

    container = Container()
    with container.users.override(providers.Factory(Repo, session=None)):
        async with request_scope():
            container.users()  # dependency-injector now treats `users` as sync for good
    async with request_scope():
        stuck = container.users()  # holds the un-awaited resolution of `session`
        with anyio.fail_after(30):  # a guard: the bug this test catches is a hang
            notes = await container.notes()
        assert notes.session is await stuck.session  # one instance, whoever awaited first


def test_a_context_manager_answering_every_attribute_name_is_still_exited() -> None:
    """A proxy or a mock answers any name: only a class's own teardown hook replaces __exit__."""
    calls: list[str] = []

    class Proxy:
        def __getattr__(self, name: str) -> Any:
            return lambda *args: calls.append(f"remote {name}")

        def __enter__(self) -> Proxy:
            return self

        def __exit__(self, *exc_info: object) -> None:
            calls.append("__exit__")

    provider = RequestScoped(Proxy)
    with request_scope():
        provider()
    assert calls == ["__exit__"]


def test_a_shallow_copy_is_a_working_provider_of_its_own() -> None:
    """copy.copy() gives a provider with the same factory and overridings, and its own instance."""
    import copy

    provider = RequestScoped(Connection)
    copied = copy.copy(provider)
    with request_scope():
        assert isinstance(copied(), Connection)
        assert copied() is copied()
        assert copied() is not provider()
    overridden = RequestScoped(Connection)
    replacement = Connection()
    overridden.override(providers.Object(replacement))
    assert copy.copy(overridden)() is replacement
