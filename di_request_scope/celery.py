"""One request scope per Celery task execution: its own session, committed by the task's outcome.

Make it every task's base class, or one task's::

    app = Celery("jobs", task_cls=ScopedTask)

    @app.task(base=ScopedTask)
    def import_rows(rows: list[str]) -> int: ...

The scope wraps the task's ``run``: it opens when the body starts, in the thread
that runs it (prefork child, thread of the threads pool, solo worker, or the
caller under ``task_always_eager``), and closes before Celery records the
result. So a failed commit fails the task instead of reporting a success, and a
client or a chained task that sees the result also sees the committed data.
Celery's signals cannot do this: ``task_postrun`` and ``task_success`` are sent
after the result was stored and the callbacks were sent.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from celery import Task

from ._scope import request_scope

__all__ = ["ScopedTask"]

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)

# Set on the run functions this module wrapped, so a class inheriting one wraps nothing.
_SCOPED = "_di_request_scope_scoped"

if TYPE_CHECKING:
    _Task = Task
else:

    class _Task(Task):
        # celery-types declares Task generic; only recent Celery releases accept Task[...] at runtime.
        __class_getitem__ = classmethod(lambda cls, params: cls)


class ScopedTask(_Task[P, R_co]):
    """A Celery task base class that runs each execution in a request scope of its own.

    Every ``RequestScoped`` instance the task resolves (its session, directly or
    through repositories and services) is created once for that execution and
    torn down when the body returns or raises: the unit of work commits when
    the body returns, and rolls back when it raises, which includes
    ``self.retry()`` (``Retry``), ``Ignore``, ``Reject`` and
    ``SoftTimeLimitExceeded``. A commit that fails makes the task fail with
    the commit's exception, so ``autoretry_for`` can retry it. A process killed by
    a hard time limit or ``revoke(terminate=True)`` runs no teardown; the
    database rolls back the transaction of the connection that died.

    Under ``task_always_eager`` the task runs inside the caller, and still gets
    a fresh scope, as it would in a worker: its session is not the caller's, and
    the caller's scope is current again when the task returns.

    Raises:
        TypeError: the task is an ``async def``; Celery runs task bodies synchronously.

    .. versionadded:: 0.2.0
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # `@app.task` builds a subclass whose `run` is the decorated function. Wrap
        # `run` rather than `__call__`, so that the scope sits inside Celery's
        # autoretry wrapper, which replaces `run` on the instance afterwards.
        raw = inspect.getattr_static(cls, "run")
        func = raw.__func__ if isinstance(raw, staticmethod) else raw
        if func is Task.run or getattr(func, _SCOPED, False):
            return
        _refuse_async(func, cls)
        if isinstance(raw, staticmethod):
            cls.run = staticmethod(_scoped_function(func))  # type: ignore[method-assign]
        else:
            cls.run = _scoped_method(func)  # type: ignore[method-assign]


def _refuse_async(func: Any, cls: type) -> None:
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(
            f"task {cls.__module__}.{cls.__qualname__} is an async function, but Celery runs task bodies "
            "synchronously and would never await it; make it a plain `def` (and use a sync Session), or "
            "run async work with asyncio.run() inside the task"
        )


def _scoped_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """`run` of a task made by `@app.task`: a staticmethod, or the function itself with `bind=True`."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with request_scope():
            return func(*args, **kwargs)

    return _finish(run, func)


def _scoped_method(func: Callable[..., Any]) -> Callable[..., Any]:
    """`run` defined on a task class, which may call `super().run()` of another scoped class."""

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if type(self).run is not run:
            # Reached through super() from the subclass's run, which opened the scope.
            return func(self, *args, **kwargs)
        with request_scope():
            return func(self, *args, **kwargs)

    return _finish(run, func)


def _finish(wrapper: Callable[..., Any], func: Callable[..., Any]) -> Callable[..., Any]:
    functools.update_wrapper(wrapper, func)
    # Hide the wrapped signature, as request_scope() does: otherwise container.wire()
    # finds the task's Provide[...] markers and injects them outside the scope.
    del wrapper.__wrapped__  # type: ignore[attr-defined]
    setattr(wrapper, _SCOPED, True)
    return wrapper
