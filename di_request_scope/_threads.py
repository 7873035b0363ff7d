"""Worker threads for blocking teardown and commits, off the event loop.

Not anyio's default limiter, which sync endpoints share: a commit holding a
pooled connection must never queue for a thread behind requests that wait for
that connection (FastAPI runs ``yield`` dependencies' exits outside it for the
same reason). Not a bounded executor either: commits blocked on each other's row
locks would then wait for each other's threads. So a thread is always
available: an idle one, or a new one; idle threads exit after a while.

A hop here is one queue put and one ``call_soon_threadsafe``: no limiter, no
checkpoint, and no task to shield: a shielded hop's future refuses ``cancel()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["run_in_thread"]

R = TypeVar("R")

# How long an idle worker waits for work before it exits.
IDLE_SECONDS = 10.0

try:
    # Private to anyio, so guarded, and covered by tests/test_threads.py: a worker marked as
    # anyio's own lets the code it runs (a SQLAlchemy listener, code after a generator's yield)
    # call back into the loop with anyio.from_thread.run(), as in anyio's worker threads.
    from anyio._backends._asyncio import AsyncIOBackend as _AsyncIOBackend
    from anyio._core._eventloop import claim_worker_thread as _claim_worker_thread

    def _claim(loop: asyncio.AbstractEventLoop) -> contextlib.AbstractContextManager[Any]:
        return _claim_worker_thread(_AsyncIOBackend, loop)

except ImportError:  # pragma: no cover - anyio missing, or reorganised: from_thread then needs a token

    def _claim(loop: asyncio.AbstractEventLoop) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context, Callable[[], Any]]

_lock = threading.Lock()
# Inboxes of idle workers, most recently idle last (it is reused first: its stack is warm).
_idle: list[queue.SimpleQueue[_Job]] = []


def _forget_workers() -> None:
    """In a forked child: the parent's workers do not exist here."""
    global _lock  # noqa: PLW0603 - a lock held by another thread at fork time stays held forever
    _lock = threading.Lock()
    _idle.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():  # an unshielded caller gave up; the work is done anyway
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _work(inbox: queue.SimpleQueue[_Job]) -> None:
    # Claimed as a worker of the loop it last served, until it serves another or exits:
    # claiming per job cost a commit's hop more than the rest of the worker's side.
    # An idle worker so keeps that loop referenced, for IDLE_SECONDS at most.
    claimed: asyncio.AbstractEventLoop | None = None
    claim: contextlib.AbstractContextManager[Any] | None = None
    try:
        while True:
            try:
                loop, future, context, func = inbox.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with _lock:
                    if inbox in _idle:  # nobody picked this worker meanwhile: retire it
                        _idle.remove(inbox)
                        return
                continue  # picked just now: its job is on the way
            error: BaseException | None = None
            result = None
            try:
                if loop is not claimed:  # inside the try: a failed claim is the caller's error, not a hang
                    previous, claim, claimed = claim, None, None
                    if previous is not None:
                        previous.__exit__(None, None, None)
                    entered = _claim(loop)
                    entered.__enter__()
                    claim, claimed = entered, loop
                result = context.run(func)
            except StopIteration as exc:  # a future refuses it (it would end a coroutine): as anyio does
                error = RuntimeError("a function run in a worker thread raised StopIteration")
                error.__cause__ = exc
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                error = exc
            del func, context
            with _lock:  # idle before the caller hears back, so its next job can come straight here
                _idle.append(inbox)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, result, error)
            del loop, future, result, error  # hold no job's objects while idle
    finally:
        if claim is not None:
            claim.__exit__(None, None, None)


class _Uncancellable(asyncio.Future):  # type: ignore[type-arg]
    """A future that refuses ``cancel()``: a task cancelled while awaiting it keeps waiting.

    ``Task.cancel()`` cancels the future the task awaits, unless that refuses; the
    task then raises ``CancelledError`` at that ``await`` once the future is done.
    That is what a shielded wait for a thread needs, without the outer future and
    the extra trip round the event loop of ``asyncio.shield()``.
    """

    __slots__ = ()

    def cancel(self, msg: Any = None) -> bool:
        return False


def run_in_thread(func: Callable[[], R], *, shielded: bool = False) -> asyncio.Future[R]:
    """Start ``func()`` in a worker thread, in a copy of this context; await the returned future.

    Cancelling the future (or a task awaiting it) does not stop the work: threads
    cannot be interrupted. With ``shielded``, the future refuses to be cancelled,
    so a cancelled task awaiting it waits for the work, then raises ``CancelledError``.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = _Uncancellable(loop=loop) if shielded else loop.create_future()
    job: _Job = (loop, future, contextvars.copy_context(), func)
    with _lock:
        inbox = _idle.pop() if _idle else None
    if inbox is None:
        inbox = queue.SimpleQueue()
        threading.Thread(target=_work, args=(inbox,), name="di_request_scope worker", daemon=True).start()
    inbox.put(job)
    return future
