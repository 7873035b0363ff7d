"""request_scope(): nesting, decorator, teardown outcomes and errors, cancellation, threads, a model test."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dependency_injector import containers
from dependency_injector.wiring import Provide, inject
from hypothesis import given, settings
from hypothesis import strategies as st

from di_request_scope import (
    NoRequestScopeError,
    RequestScope,
    RequestScoped,
    ScopeMisuseError,
    TeardownError,
    current_scope,
    request_scope,
)

from .helpers import recording_async_generator, recording_generator, wait_for


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Connection:
    """A plain object to hand out; each instance is a distinct identity."""


class Abort(BaseException):
    """A BaseException that is not cancellation, like KeyboardInterrupt, safe to raise in tests."""


def failing_generator(log: list[str], name: str, error: BaseException) -> Any:
    """A generator whose teardown logs its name and raises ``error``, whatever the outcome."""

    def gen() -> Iterator[str]:
        try:
            yield name
        finally:
            log.append(name)
            raise error

    return gen


def teardown_logging_generator(log: list[str], name: str) -> Any:
    def gen() -> Iterator[str]:
        try:
            yield name
        finally:
            log.append(name)

    return gen


# --------------------------------------------------------------------------- nesting and current_scope


def test_nested_scope_is_independent_and_the_outer_one_is_restored() -> None:
    """An inner request_scope() has its own instances; leaving it restores the outer scope."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    calls = RequestScoped(Connection)
    with request_scope() as outer:
        outer_conn = calls()
        provider()
        with request_scope() as inner:
            assert inner is not outer
            assert current_scope() is inner
            inner_conn = calls()
            assert inner_conn is not outer_conn
            assert calls() is inner_conn
            provider()
        assert log == [("conn", None)]  # only the inner scope's instance was torn down
        assert current_scope() is outer
        assert calls() is outer_conn
    assert len(log) == 2
    with pytest.raises(NoRequestScopeError):
        current_scope()


@pytest.mark.anyio
async def test_nested_async_scope_is_independent_and_the_outer_one_is_restored() -> None:
    """The same isolation holds for ``async with``."""
    provider = RequestScoped(Connection)
    async with request_scope() as outer:
        outer_conn = provider()
        async with request_scope() as inner:
            assert current_scope() is inner
            assert provider() is not outer_conn
        assert current_scope() is outer
        assert provider() is outer_conn


def test_current_scope_outside_any_scope_raises_with_a_hint() -> None:
    """current_scope() with no scope open explains how to open one."""
    with pytest.raises(NoRequestScopeError) as info:
        current_scope()
    message = str(info.value)
    assert message.startswith("current_scope() was resolved outside a request scope")
    assert "request_scope()" in message
    assert "RequestScopeMiddleware" in message


def test_current_scope_is_the_scope_returned_by_enter() -> None:
    """``with request_scope() as scope`` and current_scope() are the same open RequestScope."""
    with request_scope() as scope:
        assert isinstance(scope, RequestScope)
        assert current_scope() is scope
        assert not scope.closed
        assert scope.failure is None
    assert scope.closed


def test_current_scope_from_a_context_that_outlived_the_scope_raises() -> None:
    """A context copied inside the scope sees it closed afterwards."""
    with request_scope():
        late = contextvars.copy_context()
    with pytest.raises(NoRequestScopeError, match="already closed"):
        late.run(current_scope)


def test_entering_one_request_scope_object_twice_raises_scope_misuse() -> None:
    """A request_scope() object opens one scope at a time; the open one keeps working."""
    opener = request_scope()
    provider = RequestScoped(Connection)
    with opener as scope:
        conn = provider()
        with pytest.raises(ScopeMisuseError, match="already open"), opener:
            pass  # pragma: no cover - never entered
        assert current_scope() is scope
        assert provider() is conn
    assert scope.closed
    with pytest.raises(NoRequestScopeError):
        current_scope()


def test_a_request_scope_object_is_its_scope_and_is_not_reopened_after_closing() -> None:
    """Reopening would revive the scope for contexts that outlived it; it raises instead."""
    opener = request_scope()
    with opener as scope:
        late = contextvars.copy_context()
    assert scope is opener
    with pytest.raises(ScopeMisuseError, match="was used; create a new request_scope"), opener:
        pass  # pragma: no cover - never entered
    with pytest.raises(NoRequestScopeError, match="already closed"):
        late.run(current_scope)


def test_exiting_a_request_scope_that_was_never_entered_raises_scope_misuse() -> None:
    """``__exit__`` without ``__enter__`` is a misuse, not a silent no-op."""
    with pytest.raises(ScopeMisuseError, match="without being entered"):
        request_scope().__exit__(None, None, None)


def test_closing_a_scope_twice_raises_scope_misuse() -> None:
    """A RequestScope is closed exactly once."""
    with request_scope() as scope:
        pass
    with pytest.raises(ScopeMisuseError, match="already closed"):
        scope.close()


# --------------------------------------------------------------------------- outcome handed to finalizers


def test_the_blocks_exception_is_the_failure_thrown_into_finalizers() -> None:
    """The very exception object leaving the block reaches every finalizer and keeps propagating."""
    log: list[Any] = []
    a = RequestScoped(recording_generator(log, "a"))
    b = RequestScoped(recording_generator(log, "b"))
    error = ValueError("bad input")
    with pytest.raises(ValueError, match="bad input") as info, request_scope() as scope:
        a()
        b()
        raise error
    assert info.value is error
    assert scope.failure is error
    assert log == [("b", error), ("a", error)]


def test_first_recorded_failure_wins() -> None:
    """``scope.fail`` keeps the first failure; finalizers receive it even if the block later raises."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    first, second, raised = RuntimeError("first"), RuntimeError("second"), KeyError("raised")
    with pytest.raises(KeyError), request_scope() as scope:
        provider()
        scope.fail(first)
        scope.fail(second)
        assert scope.failure is first
        raise raised
    assert log == [("conn", first)]


def test_success_gives_finalizers_no_failure() -> None:
    """A block that completes hands None to finalizers (the commit path)."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    with request_scope():
        provider()
    assert log == [("conn", None)]


# --------------------------------------------------------------------------- teardown errors


def test_every_finalizer_runs_even_if_one_raises_and_the_error_is_raised_as_itself() -> None:
    """One failing finalizer does not stop the others; its exception is raised unchanged."""
    log: list[str] = []
    boom = RuntimeError("commit failed")
    a = RequestScoped(teardown_logging_generator(log, "a"))
    b = RequestScoped(failing_generator(log, "b", boom))
    c = RequestScoped(teardown_logging_generator(log, "c"))
    with pytest.raises(RuntimeError) as info, request_scope():
        a()
        b()
        c()
    assert info.value is boom
    assert log == ["c", "b", "a"]


def test_several_failing_finalizers_raise_teardown_error_with_all_errors() -> None:
    """Two or more teardown errors are wrapped in TeardownError, in teardown order."""
    log: list[str] = []
    first_created, second_created = OSError("close failed"), RuntimeError("commit failed")
    a = RequestScoped(failing_generator(log, "a", first_created))
    b = RequestScoped(teardown_logging_generator(log, "b"))
    c = RequestScoped(failing_generator(log, "c", second_created))
    with pytest.raises(TeardownError) as info, request_scope():
        a()
        b()
        c()
    assert info.value.errors == (second_created, first_created)
    assert info.value.__cause__ is second_created
    assert "2 finalizers failed" in str(info.value)
    assert "commit failed" in str(info.value)
    assert "close failed" in str(info.value)
    assert log == ["c", "b", "a"]


def test_body_exception_wins_and_teardown_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """When the block raised, teardown errors are logged and the block's exception propagates."""
    log: list[str] = []
    e1, e2 = RuntimeError("teardown one"), OSError("teardown two")
    a = RequestScoped(failing_generator(log, "a", e1))
    b = RequestScoped(failing_generator(log, "b", e2))
    body_error = ValueError("the real problem")
    with (
        caplog.at_level(logging.ERROR, logger="di_request_scope"),
        pytest.raises(ValueError) as info,
        request_scope(),
    ):
        a()
        b()
        raise body_error
    assert info.value is body_error
    assert log == ["b", "a"]
    logged = [r.exc_info[1] for r in caplog.records if r.name == "di_request_scope" and r.exc_info]
    assert logged == [e2, e1]
    assert all(r.levelno == logging.ERROR for r in caplog.records if r.name == "di_request_scope")


def test_a_base_exception_from_teardown_is_raised_before_ordinary_errors() -> None:
    """A non-Exception teardown error (cancellation, KeyboardInterrupt) is never wrapped or hidden."""
    log: list[str] = []
    ordinary, abort = RuntimeError("ordinary"), Abort("stop")
    a = RequestScoped(failing_generator(log, "a", abort))
    b = RequestScoped(failing_generator(log, "b", ordinary))
    with pytest.raises(Abort) as info, request_scope():
        a()
        b()
    assert info.value is abort
    assert log == ["b", "a"]


@pytest.mark.anyio
async def test_async_teardown_errors_follow_the_same_rules() -> None:
    """Under ``async with``: one error as itself, several as TeardownError, all finalizers run."""
    log: list[str] = []
    sync_error, async_error = RuntimeError("sync teardown"), OSError("async teardown")

    async def failing_async() -> AsyncIterator[str]:
        try:
            yield "async"
        finally:
            log.append("async")
            raise async_error

    a = RequestScoped(failing_generator(log, "sync", sync_error))
    b = RequestScoped(failing_async)
    c = RequestScoped(teardown_logging_generator(log, "last"))
    with pytest.raises(TeardownError) as info:
        async with request_scope():
            a()
            await b()
            c()
    assert info.value.errors == (async_error, sync_error)
    assert log == ["last", "async", "sync"]

    log.clear()
    with pytest.raises(OSError, match="async teardown") as single:
        async with request_scope():
            await b()
    assert single.value is async_error


# --------------------------------------------------------------------------- threads and the event loop


@pytest.mark.anyio
async def test_sync_teardown_under_async_with_runs_off_the_event_loop_thread() -> None:
    """Blocking teardown (generators and ``__exit__``) runs in a worker thread, not on the loop."""
    loop_thread = threading.get_ident()
    teardown_threads: list[int] = []

    def gen() -> Iterator[str]:
        yield "gen"
        teardown_threads.append(threading.get_ident())

    class Blocking:
        def __enter__(self) -> Blocking:
            return self

        def __exit__(self, *exc: object) -> None:
            teardown_threads.append(threading.get_ident())

    a = RequestScoped(gen)
    b = RequestScoped(Blocking)
    async with request_scope():
        a()
        b()
    assert len(teardown_threads) == 2
    assert loop_thread not in teardown_threads


@pytest.mark.anyio
async def test_async_teardown_under_async_with_runs_on_the_event_loop() -> None:
    """Async finalizers are awaited on the loop, in the task's context."""
    loop_thread = threading.get_ident()
    seen: list[Any] = []

    async def gen() -> AsyncIterator[str]:
        yield "agen"
        seen.append(threading.get_ident())
        seen.append(asyncio.get_running_loop())

    provider = RequestScoped(gen)
    async with request_scope():
        await provider()
    assert seen == [loop_thread, asyncio.get_running_loop()]


@pytest.mark.anyio
async def test_async_instance_under_sync_with_is_refused_at_creation() -> None:
    """A sync ``with`` cannot await async teardown, so the async instance is never created: nothing leaks."""
    log: list[Any] = []
    provider = RequestScoped(recording_async_generator(log, "aconn"))
    sync_log: list[Any] = []
    sync_provider = RequestScoped(recording_generator(sync_log, "conn"))
    with pytest.raises(ScopeMisuseError, match=r"async with request_scope\(\)") as info, request_scope():
        sync_provider()
        provider()
    assert "cannot await its teardown" in str(info.value)
    assert log == []  # the async generator never started
    assert sync_log == [("conn", info.value)]  # the sync finalizer still ran, with the failure


@pytest.mark.anyio
async def test_sync_with_inside_async_code_tears_down_sync_instances_in_place() -> None:
    """A sync ``with`` in async code runs sync teardown right away, on the calling thread."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    with request_scope():
        provider()
    assert log == [("conn", None)]


# --------------------------------------------------------------------------- cancellation


@pytest.mark.anyio
async def test_cancelled_body_still_runs_async_and_sync_finalizers_with_cancelled_error() -> None:
    """Cancelling the task in the block tears everything down with CancelledError as the failure."""
    log: list[Any] = []
    sync_provider = RequestScoped(recording_generator(log, "sync"))
    async_provider = RequestScoped(recording_async_generator(log, "async"))
    ready, never = asyncio.Event(), asyncio.Event()
    seen_scope: list[RequestScope] = []

    async def handler() -> None:
        async with request_scope() as scope:
            seen_scope.append(scope)
            sync_provider()
            await async_provider()
            ready.set()
            await never.wait()

    task = asyncio.create_task(handler())
    await wait_for(ready, task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [name for name, _ in log] == ["async", "sync"]
    assert all(isinstance(failure, asyncio.CancelledError) for _, failure in log)
    assert isinstance(seen_scope[0].failure, asyncio.CancelledError)
    assert seen_scope[0].closed


@pytest.mark.anyio
async def test_teardown_is_not_interrupted_when_the_task_is_cancelled_again_during_it() -> None:
    """A cancellation arriving while finalizers run does not cut an async teardown short."""
    # Known bug: anyio.CancelScope(shield=True) does not shield against native Task.cancel(),
    # so the finalizer is interrupted at its next await (a COMMIT or a connection close).
    log: list[str] = []
    in_teardown, finish = asyncio.Event(), asyncio.Event()

    async def connect() -> AsyncIterator[str]:
        yield "conn"
        in_teardown.set()
        try:
            await finish.wait()  # e.g. awaiting COMMIT
        except asyncio.CancelledError:
            log.append("interrupted")
            raise
        log.append("finished")

    provider = RequestScoped(connect)

    async def handler() -> None:
        async with request_scope():
            await provider()

    task = asyncio.create_task(handler())
    await wait_for(in_teardown, task)
    task.cancel()
    for _ in range(10):  # scheduler steps (no time passes) so the cancellation is delivered
        await asyncio.sleep(0)
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["finished"]


# --------------------------------------------------------------------------- decorator


def test_decorated_sync_function_gets_a_fresh_scope_per_call() -> None:
    """Each call of a decorated function runs in its own scope, torn down when it returns."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    conns = RequestScoped(Connection)

    @request_scope()
    def job(n: int) -> tuple[int, Connection]:
        provider()
        first = conns()
        assert conns() is first
        return n, first

    n1, c1 = job(1)
    assert log == [("conn", None)]
    n2, c2 = job(2)
    assert (n1, n2) == (1, 2)
    assert c1 is not c2
    assert len(log) == 2
    assert job.__name__ == "job"
    with pytest.raises(NoRequestScopeError):
        current_scope()


def test_nested_decorated_calls_get_their_own_scopes() -> None:
    """A decorated function called from another gets an inner scope; the outer one is restored."""
    log: list[str] = []
    conns = RequestScoped(Connection)
    finalizer = RequestScoped(teardown_logging_generator(log, "conn"))

    @request_scope()
    def inner() -> Connection:
        finalizer()
        return conns()

    @request_scope()
    def outer() -> tuple[Connection, Connection]:
        finalizer()
        mine = conns()
        theirs = inner()
        assert log == ["conn"]  # inner scope closed on return
        assert conns() is mine
        return mine, theirs

    mine, theirs = outer()
    assert mine is not theirs
    assert log == ["conn", "conn"]


def test_decorated_function_raising_hands_its_exception_to_finalizers() -> None:
    """The decorator behaves like ``with``: the exception is the failure and keeps propagating."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))
    error = PermissionError("denied")

    @request_scope()
    def job() -> None:
        provider()
        raise error

    with pytest.raises(PermissionError) as info:
        job()
    assert info.value is error
    assert log == [("conn", error)]


@pytest.mark.anyio
async def test_decorated_async_function_gets_a_fresh_scope_per_call() -> None:
    """Concurrent calls of a decorated coroutine function each get their own scope."""
    log: list[Any] = []
    provider = RequestScoped(recording_async_generator(log, "aconn"))
    conns = RequestScoped(Connection)
    arrived = 0
    both_inside = asyncio.Event()

    @request_scope()
    async def job() -> Connection:
        nonlocal arrived
        await provider()
        mine = conns()
        arrived += 1
        if arrived == 2:
            both_inside.set()
        await both_inside.wait()  # both scopes are open at the same time here
        assert conns() is mine
        return mine

    assert inspect.iscoroutinefunction(job)
    first, second = await asyncio.gather(job(), job())
    assert first is not second
    assert log == [("aconn", None), ("aconn", None)]
    third = await job()
    assert third is not first
    assert third is not second


@pytest.mark.anyio
async def test_nested_decorated_async_calls_get_their_own_scopes() -> None:
    """An async decorated function awaited from another gets an inner scope."""
    conns = RequestScoped(Connection)

    @request_scope()
    async def inner() -> Connection:
        return conns()

    @request_scope()
    async def outer() -> tuple[Connection, Connection]:
        mine = conns()
        theirs = await inner()
        assert conns() is mine
        return mine, theirs

    mine, theirs = await outer()
    assert mine is not theirs


# --------------------------------------------------------------------------- model-based property test


@dataclass
class ScopeModel:
    opener: request_scope
    scope: RequestScope
    instances: dict[int, object] = field(default_factory=dict)
    order: list[object] = field(default_factory=list)
    failure: BaseException | None = None


class Item:
    def __init__(self, index: int) -> None:
        self.index = index


OPERATIONS = st.lists(
    st.one_of(
        st.just(("open", 0)),
        st.just(("close", 0)),
        st.just(("fail", 0)),
        st.tuples(st.just("resolve"), st.integers(min_value=0, max_value=2)),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(operations=OPERATIONS)
def test_random_scope_operations_keep_one_instance_per_provider_per_scope(
    operations: list[tuple[str, int]],
) -> None:
    """Any sequence of open/resolve/fail/close: one instance per provider per scope, torn down once."""
    torn_down: list[tuple[object, BaseException | None]] = []

    def initializer(i: int) -> Any:
        def gen() -> Iterator[Item]:
            item = Item(i)
            try:
                yield item
            except BaseException as exc:
                torn_down.append((item, exc))
                raise
            torn_down.append((item, None))

        return gen

    scoped = [RequestScoped(initializer(i)) for i in range(3)]
    stack: list[ScopeModel] = []
    every_instance: list[object] = []

    def close_innermost() -> None:
        model = stack.pop()
        torn_down.clear()
        model.opener.__exit__(None, None, None)
        assert [item for item, _ in torn_down] == model.order[::-1]
        assert all(failure is model.failure for _, failure in torn_down)
        assert model.scope.closed
        if stack:
            assert current_scope() is stack[-1].scope
        else:
            with pytest.raises(NoRequestScopeError):
                current_scope()

    for op, index in operations:
        if op == "open":
            opener = request_scope()
            stack.append(ScopeModel(opener, opener.__enter__()))
        elif op == "resolve":
            if not stack:
                with pytest.raises(NoRequestScopeError):
                    scoped[index]()
                continue
            model = stack[-1]
            instance = scoped[index]()
            if index in model.instances:
                assert instance is model.instances[index]
            else:
                assert isinstance(instance, Item)
                assert instance.index == index
                assert all(instance is not seen for seen in every_instance)
                model.instances[index] = instance
                model.order.append(instance)
                every_instance.append(instance)
        elif op == "fail" and stack:
            error = RuntimeError(f"failure {len(every_instance)}")
            stack[-1].scope.fail(error)
            if stack[-1].failure is None:
                stack[-1].failure = error
        elif op == "close" and stack:
            close_innermost()
    while stack:
        close_innermost()
    for provider in scoped:
        with pytest.raises(NoRequestScopeError):
            provider()


def test_decorator_on_a_generator_function_keeps_the_scope_open_while_it_runs() -> None:
    """@request_scope() on a generator function opens the scope for the iteration, not just the call."""
    log: list[Any] = []
    provider = RequestScoped(recording_generator(log, "conn"))

    @request_scope()
    def rows() -> Iterator[str]:
        yield provider()
        yield provider()

    assert list(rows()) == ["conn", "conn"]
    assert log == [("conn", None)]


@pytest.mark.anyio
async def test_decorator_on_an_async_generator_function_keeps_the_scope_open_while_it_runs() -> None:
    """@request_scope() on an async generator function opens the scope for the iteration."""
    log: list[Any] = []
    provider = RequestScoped(recording_async_generator(log, "aconn"))

    @request_scope()
    async def rows() -> AsyncIterator[str]:
        yield await provider()
        yield await provider()

    assert [row async for row in rows()] == ["aconn", "aconn"]
    assert log == [("aconn", None)]


class WiredContainer(containers.DeclarativeContainer):
    thing = RequestScoped(object)


@request_scope()
@inject
def wired_job(thing: object = Provide[WiredContainer.thing]) -> object:
    return thing


def test_decorated_function_with_provide_markers_is_injected_inside_its_scope() -> None:
    """`@request_scope()` over `@inject`: container.wire() does not re-inject outside the scope."""
    container = WiredContainer()
    container.wire(modules=[__name__])
    try:
        first, second = wired_job(), wired_job()
    finally:
        container.unwire()
    assert type(first) is object  # the instance, not the Provide marker
    assert first is not second  # each call had its own scope


def test_decorated_generator_keeps_its_scope_out_of_the_callers_context() -> None:
    """Between iterations the caller keeps its own scope; interleaved decorated generators keep theirs."""
    made: list[object] = []
    session = RequestScoped(lambda: made.append(object()) or made[-1])

    @request_scope()
    def rows(n: int) -> Iterator[object]:
        for _ in range(n):
            yield session()

    with request_scope() as outer:
        mine = session()
        generator = rows(2)
        first = next(generator)
        assert current_scope() is outer
        assert session() is mine
        assert first is not mine
        assert list(generator) == [first]

    g1, g2 = rows(2), rows(2)
    a, b = next(g1), next(g2)
    assert list(g1) == [a]
    assert list(g2) == [b]  # g1 finishing did not take g2's scope away
    with pytest.raises(NoRequestScopeError):
        current_scope()  # and nothing leaked into this context


@pytest.mark.anyio
async def test_decorated_async_generator_keeps_its_scope_out_of_the_callers_context() -> None:
    """The async twin: the consumer's context never sees the generator's scope."""
    made: list[object] = []
    session = RequestScoped(lambda: made.append(object()) or made[-1])

    @request_scope()
    async def rows(n: int) -> AsyncIterator[object]:
        for _ in range(n):
            yield session()

    async with request_scope() as outer:
        mine = session()
        generator = rows(2)
        first = await generator.__anext__()
        assert current_scope() is outer
        assert session() is mine
        assert [row async for row in generator] == [first]


@pytest.mark.anyio
async def test_awaiting_a_kept_resolution_after_its_scope_closed_raises_no_request_scope_error() -> None:
    """An un-awaited resolution outliving its scope fails with the closed-scope error, not RuntimeError."""

    async def make() -> str:
        return "conn"

    provider = RequestScoped(make)
    async with request_scope():
        kept = provider()
    with pytest.raises(NoRequestScopeError, match="already closed"):
        await kept
