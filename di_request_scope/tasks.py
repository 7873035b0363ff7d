"""Background work on the event loop, each job in a request scope of its own.

A job started with ``asyncio.create_task()`` inside a request runs on a copy of
the request's context, so it resolves the *request's* scope: it shares the
request's session, and once the request ends it fails with
``NoRequestScopeError`` ("... from a request scope that has already closed").
:func:`spawn` gives the job a scope of its own instead. In a task group, wrap
the job with the :func:`~di_request_scope.request_scope` decorator, which opens
a new scope per call::

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(request_scope()(process), item)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from ._scope import request_scope

__all__ = ["spawn"]

logger = logging.getLogger("di_request_scope")

P = ParamSpec("P")
R = TypeVar("R")

# asyncio keeps only weak references to tasks: a job nobody holds could be
# garbage-collected half-way. These are the running ones.
_running: set[asyncio.Task[Any]] = set()


def spawn(func: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Task[R]:
    """Run ``await func(*args, **kwargs)`` in a new asyncio task, in a request scope of its own.

    For fire-and-forget work started from a request (an email, an audit record,
    a cache refresh) that may outlive it: the job gets its own instances (its own
    session), committed when ``func`` returns and rolled back when it raises,
    however long the request that started it lasts. Pass it ids, not instances
    bound to the request's session. Other context variables (tracing, logging)
    are inherited from the caller, as ``asyncio.create_task()`` does.

    The job may start before the request has committed; call ``spawn()`` from a
    background task, which runs after the response, when the job reads what the
    request wrote.

    The task is kept referenced until it finishes, so it cannot be
    garbage-collected half-way. An exception it raises is logged on the
    ``di_request_scope`` logger, since nobody may be awaiting it; awaiting the
    returned task raises it too.

    Args:
        func: The job: an async function, such as one decorated with ``@inject``.
            Its ``Provide[...]`` parameters are injected inside the new scope.
        *args: Positional arguments for ``func``.
        **kwargs: Keyword arguments for ``func``.

    Returns:
        The running task; await it to wait for the job, or cancel it.

    Raises:
        RuntimeError: no event loop is running in this thread.
        TypeError: ``func`` is a plain (sync) function.

    .. versionadded:: 0.2.0
    """
    if inspect.isfunction(func) and not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"spawn() runs async jobs, and {_name(func)} is a sync function: make it `async def`, or give "
            "a sync job its own scope with the @request_scope() decorator (run it in a thread with "
            "asyncio.to_thread if it blocks)"
        )
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"spawn({_name(func)}) needs a running event loop; call it from async code, or run sync "
            "jobs in a scope of their own with the @request_scope() decorator"
        ) from None
    task = loop.create_task(_in_own_scope(func, args, kwargs), name=f"spawn({_name(func)})")
    _running.add(task)
    task.add_done_callback(_finished)
    return task


async def _in_own_scope(func: Callable[..., Awaitable[R]], args: Any, kwargs: Any) -> R:
    # Opened inside the new task, whose context is a copy of the caller's: setting
    # the new scope there leaves the caller's scope untouched.
    async with request_scope():
        result = func(*args, **kwargs)
        if not inspect.isawaitable(result):  # a callable object whose __call__ is sync
            raise TypeError(
                f"spawn() runs async jobs, and {_name(func)} returned {type(result).__name__}, not an "
                "awaitable; its scope was rolled back: make it async, or use the @request_scope() decorator"
            )
        return await result


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():  # at shutdown, say: whatever it wrote was not committed
        logger.warning("background job %s was cancelled; its request scope was rolled back", task.get_name())
        return
    exc = task.exception()  # also marks it retrieved: asyncio will not log it again
    if exc is not None:
        logger.error(
            "background job %s failed; its request scope was rolled back", task.get_name(), exc_info=exc
        )


def _name(func: object) -> str:
    name = getattr(func, "__qualname__", None)
    return name if isinstance(name, str) else repr(func)
