"""The worker threads that run blocking commits and teardown off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import multiprocessing
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

from di_request_scope import RequestScoped, _threads, request_scope
from di_request_scope._scope import _in_anyio_cancel_scope, _shield, _shielded, _to_thread
from di_request_scope._threads import run_in_thread

pytestmark = pytest.mark.anyio

WAIT = 10  # bounds a wait only a bug makes long
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "di_request_scope worker"]


async def test_the_function_runs_in_another_thread_in_a_copy_of_the_callers_context() -> None:
    request_id.set("request 1")
    thread, value = await run_in_thread(lambda: (threading.get_ident(), request_id.get()))
    assert value == "request 1"
    assert thread != threading.get_ident()


async def test_an_exception_in_the_worker_is_raised_to_the_awaiting_coroutine() -> None:
    def fail() -> None:
        raise LookupError("from the worker")

    with pytest.raises(LookupError, match="from the worker"):
        await run_in_thread(fail)


async def test_jobs_never_queue_behind_each_other() -> None:
    """Twelve jobs that each wait for all the others finish: a bounded pool would deadlock here.

    (Commits blocked on each other's row locks are this situation; the barrier's
    timeout turns a deadlock into a failure instead of a hang.)
    """
    jobs = 12
    barrier = threading.Barrier(jobs, timeout=30)
    results = await asyncio.gather(*(run_in_thread(barrier.wait) for _ in range(jobs)))
    assert sorted(results) == list(range(jobs))


async def test_an_idle_worker_is_reused() -> None:
    first = await run_in_thread(threading.get_ident)
    second = await run_in_thread(threading.get_ident)
    assert first == second


async def test_idle_workers_exit_after_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_threads, "IDLE_SECONDS", 0.05)
    release = threading.Event()

    def job() -> threading.Thread:
        release.wait(30)
        return threading.current_thread()

    # Two at once, so that two workers run them; each then waits for work with the short timeout.
    started = [run_in_thread(job) for _ in range(2)]  # both submitted now: the first blocks its worker
    release.set()
    workers = set(await asyncio.gather(*started))
    assert len(workers) == 2
    for worker in workers:
        worker.join(timeout=30)  # returns as soon as the worker exits
    assert not any(worker.is_alive() for worker in workers)
    assert not any(worker in workers for worker in _workers())


async def test_a_cancelled_waiter_leaves_the_worker_usable() -> None:
    release = threading.Event()
    done = threading.Event()

    def blocked() -> None:
        release.wait(30)
        done.set()

    waiter = run_in_thread(blocked)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    assert await asyncio.to_thread(done.wait, 30)
    assert await run_in_thread(lambda: "still working") == "still working"


def _run_in_child(results: multiprocessing.Queue[str]) -> None:
    results.put(asyncio.run(_child_job()))


async def _child_job() -> str:
    return await run_in_thread(lambda: "ran in the child")


@pytest.mark.skipif(not hasattr(multiprocessing, "get_context"), reason="no multiprocessing")
async def test_a_forked_child_gets_workers_of_its_own() -> None:
    """The parent's idle workers do not exist in a forked child; handing them work would hang it."""
    await run_in_thread(lambda: None)  # leaves an idle worker behind in this process
    assert _threads._idle
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[str] = context.Queue()
    child = context.Process(target=_run_in_child, args=(results,))
    child.start()
    try:
        assert results.get(timeout=60) == "ran in the child"
    finally:
        child.join(timeout=60)
        if child.is_alive():  # hung: do not leave it behind
            child.kill()
    assert child.exitcode == 0


async def test_a_stop_iteration_in_the_worker_is_raised_as_a_runtime_error() -> None:
    """A future refuses a StopIteration: handed over as it is, the caller would wait forever."""

    def exhausted() -> object:
        return next(iter(()))

    with pytest.raises(RuntimeError, match="raised StopIteration") as raised:
        await asyncio.wait_for(run_in_thread(exhausted), 30)  # a bound on a hang, not a timing
    assert isinstance(raised.value.__cause__, StopIteration)


async def test_code_in_a_worker_may_call_back_into_the_event_loop_with_anyio() -> None:
    """As in anyio's worker threads: teardown code (or a SQLAlchemy listener) may use anyio.from_thread."""
    loop_thread = threading.get_ident()
    called_on: list[int] = []

    def on_the_loop() -> None:
        called_on.append(threading.get_ident())

    def teardown_calls_back() -> object:
        yield "resource"
        anyio.from_thread.run_sync(on_the_loop)

    assert await run_in_thread(lambda: anyio.from_thread.run_sync(threading.get_ident)) == loop_thread
    provider = RequestScoped(teardown_calls_back)
    async with request_scope():
        assert provider() == "resource"
    assert called_on == [loop_thread]


async def test_a_worker_that_served_another_loop_calls_back_into_the_loop_of_its_current_job() -> None:
    """Workers stay claimed for the loop they last served: a job from a new loop re-claims the worker."""

    def worker_and_loop_thread() -> tuple[int, int]:
        return threading.get_ident(), anyio.from_thread.run_sync(threading.get_ident)

    first_worker, first_loop = await run_in_thread(worker_and_loop_thread)

    async def on_a_second_loop() -> tuple[int, int]:
        return await run_in_thread(worker_and_loop_thread)

    def second_loop() -> tuple[tuple[int, int], int]:
        return asyncio.run(on_a_second_loop()), threading.get_ident()

    (second_worker, called_back_on), second_loop_thread = await anyio.to_thread.run_sync(second_loop)
    assert first_loop == threading.get_ident()
    assert second_worker == first_worker  # the idle worker was reused: the case under test
    assert called_back_on == second_loop_thread


async def test_a_worker_that_cannot_claim_itself_for_a_loop_fails_the_job_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claiming happens in the job's error handling: the caller gets the error and the worker lives on."""
    await run_in_thread(lambda: None)  # an idle worker, claimed for this loop

    def refuse(loop: asyncio.AbstractEventLoop) -> contextlib.AbstractContextManager[None]:
        raise RuntimeError("claim failed")

    async def on_a_second_loop() -> object:
        return await asyncio.wait_for(run_in_thread(threading.get_ident), WAIT)

    monkeypatch.setattr(_threads, "_claim", refuse)
    with pytest.raises(RuntimeError, match="claim failed"):
        await anyio.to_thread.run_sync(asyncio.run, on_a_second_loop())
    monkeypatch.undo()
    loop_thread = await run_in_thread(lambda: anyio.from_thread.run_sync(threading.get_ident))
    assert loop_thread == threading.get_ident()


def _thread_hop(body: Callable[[], object]) -> Awaitable[object]:
    return _to_thread(body)


def _shielded_task(body: Callable[[], object]) -> Awaitable[object]:
    async def work() -> object:
        return await asyncio.to_thread(body)

    return _shielded(work)


def _in_an_anyio_scope(
    shielded: Callable[[Callable[[], object]], Awaitable[object]],
) -> Callable[[Callable[[], object]], Awaitable[object]]:
    """The same work awaited inside an anyio cancel scope, as under TestClient: the anyio-shielded path."""

    async def in_a_scope(body: Callable[[], object]) -> object:
        with anyio.CancelScope():
            return await shielded(body)

    return in_a_scope


SHIELDED_WORK = pytest.mark.parametrize(
    "shielded",
    [_thread_hop, _shielded_task, _in_an_anyio_scope(_thread_hop), _in_an_anyio_scope(_shielded_task)],
    ids=["thread", "task", "thread in an anyio scope", "task in an anyio scope"],
)


@SHIELDED_WORK
async def test_a_caller_cancelled_while_its_work_fails_is_still_cancelled(
    shielded: Callable[[Callable[[], object]], Awaitable[object]],
) -> None:
    """The work's error does not swallow the cancellation: it is raised from it."""
    started, release = threading.Event(), threading.Event()

    def fails_later() -> None:
        started.set()
        release.wait(30)
        raise LookupError("failed after the cancellation")

    task = asyncio.ensure_future(shielded(fails_later))
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel()
    await asyncio.sleep(0)  # let the cancellation reach the task, which keeps waiting for its thread
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError) as raised:
        await task
    assert task.cancelled()
    assert isinstance(raised.value.__cause__, LookupError)


@SHIELDED_WORK
async def test_a_caller_cancelled_during_its_work_waits_for_it_then_is_cancelled(
    shielded: Callable[[Callable[[], object]], Awaitable[object]],
) -> None:
    """The future the caller awaits refuses Task.cancel(): the caller wakes when the work is done."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> str:
        started.set()
        release.wait(30)
        finished.set()
        return "done"

    task = asyncio.ensure_future(shielded(work))
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel()
    task.cancel()  # a second request changes nothing
    for _ in range(3):  # thread round trips: time for a caller that did not wait to give up
        await asyncio.to_thread(lambda: None)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError) as raised:
        await task
    assert finished.is_set()
    assert task.cancelled()
    assert raised.value.__cause__ is None


@pytest.mark.parametrize("shielded", [_thread_hop, _shielded_task], ids=["thread", "task"])
async def test_an_anyio_cancel_scope_cancelled_during_shielded_work_waits_without_spinning_the_loop(
    shielded: Callable[[Callable[[], object]], Awaitable[object]],
) -> None:
    """anyio re-delivers a cancellation every loop iteration unless shielded: the wait shields itself."""
    started, release = threading.Event(), threading.Event()
    outcome: list[object] = []
    scopes: list[anyio.CancelScope] = []

    def work() -> str:
        started.set()
        release.wait(30)
        return "done"

    async def in_a_scope() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            outcome.append(await shielded(work))
            await anyio.lowlevel.checkpoint()  # as with anyio's own threads: delivered at the next one
        outcome.append(scope.cancelled_caught)

    loop = asyncio.get_running_loop()
    iterations = 0
    run_once = loop._run_once  # type: ignore[attr-defined]

    def counting_run_once() -> None:
        nonlocal iterations
        iterations += 1
        run_once()

    task = asyncio.ensure_future(in_a_scope())
    assert await asyncio.to_thread(started.wait, 30)
    scopes[0].cancel()
    loop._run_once = counting_run_once  # type: ignore[attr-defined]
    try:
        # 50 ms of an idle loop: a handful of iterations, or thousands if it spins.
        await asyncio.to_thread(threading.Event().wait, 0.05)
    finally:
        del loop._run_once  # type: ignore[attr-defined]
    assert not task.done()
    release.set()
    await task
    assert iterations < 100, f"the event loop ran {iterations} iterations while it had nothing to do"
    assert outcome == ["done", True]  # as with anyio's own threads: the result, then the cancellation


async def test_only_a_task_inside_an_anyio_cancel_scope_pays_for_an_anyio_shield() -> None:
    """The check reads anyio's private task state: this fails if anyio reorganises it."""

    async def outside() -> bool:
        return _in_anyio_cancel_scope()

    async def inside() -> bool:
        with anyio.CancelScope():
            return _in_anyio_cancel_scope()

    async def after() -> bool:
        with anyio.CancelScope():
            pass
        return _in_anyio_cancel_scope()

    assert await asyncio.ensure_future(outside()) is False
    assert await asyncio.ensure_future(inside()) is True
    assert await asyncio.ensure_future(after()) is False
    async with anyio.create_task_group() as group:
        group.start_soon(_expect_inside)


async def _expect_inside() -> None:
    assert _in_anyio_cancel_scope()  # a task group's child runs in the group's cancel scope


async def test_shielded_work_hands_back_its_result_and_the_callers_cancellation() -> None:
    """A cancelled caller still gets what the work returned (teardown's errors, to log them)."""
    started, release = threading.Event(), threading.Event()

    async def work() -> str:
        started.set()
        await asyncio.to_thread(release.wait, 30)
        return "teardown errors"

    task = asyncio.ensure_future(_shield(work))
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel("stop")
    await asyncio.sleep(0)
    release.set()
    result, cancelled = await task
    assert result == "teardown errors"
    assert isinstance(cancelled, asyncio.CancelledError)
    assert cancelled.args == ("stop",)  # the caller's own cancellation, to be re-raised as it is


async def test_shielded_work_that_is_itself_cancelled_raises_the_cancellation() -> None:
    """A cancellation of the work's own task (a loop shutting down) is not turned into a result."""

    async def cancelled_work() -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)
        return "never"

    with pytest.raises(asyncio.CancelledError):
        await _shield(cancelled_work)


async def test_an_anyio_cancellation_forwarded_to_a_plain_task_in_teardown_stays_anyios() -> None:
    """anyio recognises its cancellation by the exception: teardown re-raises the same one, not a new one."""
    started, release = threading.Event(), threading.Event()

    async def connection() -> AsyncIterator[str]:
        yield "connection"
        started.set()
        await asyncio.to_thread(release.wait, 30)  # async teardown, under way when the scope is cancelled

    provider = RequestScoped(connection)

    async def job() -> None:
        async with request_scope():
            await provider()

    scopes: list[anyio.CancelScope] = []

    async def awaits_a_plain_task() -> bool:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await asyncio.ensure_future(job())  # anyio forwards its cancel to this task with Task.cancel()
        return scope.cancelled_caught

    outer = asyncio.ensure_future(awaits_a_plain_task())
    assert await asyncio.to_thread(started.wait, 30)
    scopes[0].cancel()
    await asyncio.sleep(0)
    release.set()
    assert await outer is True  # caught by its own scope, not escaping as a foreign cancellation
