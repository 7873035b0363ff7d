"""The scope object, the ContextVar that carries it, and ``request_scope()``.

The scope is created once per request (by the middleware or ``request_scope()``)
and set in the ContextVar once. Providers only read the ContextVar and store
instances *on the scope object*, so an instance created in a threadpool, a
streaming body or behind ``BaseHTTPMiddleware`` is visible to the whole request:
those places run on copies of the context, but the copies point at the same scope.
"""

from __future__ import annotations

import _thread
import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import GeneratorType, TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from ._threads import _Uncancellable, run_in_thread
from .exceptions import NoRequestScopeError, ScopeMisuseError, TeardownError

try:  # anyio comes with Starlette/FastAPI; plain asyncio is the fallback.
    import anyio

    _HAS_ANYIO = True
except ImportError:  # pragma: no cover - exercised only without anyio installed
    _HAS_ANYIO = False

try:
    # Private to anyio, so guarded, and covered by tests/test_threads.py: the anyio state of
    # each task that anyio knows, whose cancel_scope is None outside every anyio cancel scope.
    from anyio._backends._asyncio import _task_states

    _anyio_task_states: Any = _task_states
except ImportError:  # pragma: no cover - anyio missing, or reorganised: assume a scope
    _anyio_task_states = None


def _in_anyio_cancel_scope() -> bool:
    """Whether an anyio cancel scope may cancel the current task (a fraction of the cost of entering one)."""
    if _anyio_task_states is None:  # pragma: no cover - see the import
        return _HAS_ANYIO
    state = _anyio_task_states.get(asyncio.current_task())
    return state is not None and getattr(state, "cancel_scope", True) is not None


if TYPE_CHECKING:
    from ._observe import _Observers

__all__ = ["RequestScope", "current_scope", "request_scope"]

logger = logging.getLogger("di_request_scope")

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

_current: ContextVar[RequestScope | None] = ContextVar("di_request_scope", default=None)

# The registered observers (see _observe.observe()), None while there are none:
# each scope keeps the value it found when it opened.
_observers: _Observers | None = None

_NO_ERRORS: tuple[BaseException, ...] = ()


class _Finalizer(NamedTuple):
    """One teardown step: ``run(failure)`` returns None, or an awaitable when ``is_async``.

    ``run`` may also be a sync generator (a generator factory's, kept bare to
    save a wrapper per instance): :func:`run_step` resumes it.
    ``blocks(failure)``, when given, tells whether a sync step may block on I/O;
    without it every sync step is assumed to block and runs in a worker thread.
    """

    name: str
    is_async: bool
    run: Callable[[BaseException | None], Any] | Generator[Any, Any, Any]
    blocks: Callable[[BaseException | None], bool] | None = None


# A _Finalizer built in C from its four fields: the NamedTuple's own __new__ is a Python
# function, and the creation path builds one per context-manager instance.
_make_finalizer = cast(
    "Callable[[tuple[str, bool, Any, Any]], _Finalizer]", functools.partial(tuple.__new__, _Finalizer)
)

# A teardown step as a scope keeps it: a bare generator is a generator factory's
# (the common case, so it saves a _Finalizer per instance; see as_finalizer()).
_Step = _Finalizer | GeneratorType  # type: ignore[type-arg]
Hook = Callable[[], "Awaitable[None] | None"]


class RequestScope:
    """One request's instances and their teardown.

    Created by :class:`~di_request_scope.RequestScopeMiddleware` or
    :func:`request_scope`; application code rarely touches it directly.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "__weakref__",
        "_before_response",
        "_closed",
        "_failure",
        "_finalizers",
        "_info",
        "_instances",
        "_lock",
        "_loop",
        "_observers",
        "_origin",
        "_pending",
        "_response_started",
        "_sync_only",
        "_token",
    )
    # Unset until first needed: see __init__.
    _info: dict[Any, Any]
    _origin: str | None
    _pending: dict[object, Any] | None
    _finalizers: list[_Step] | None
    _before_response: list[Hook] | None
    _failure: BaseException | None
    _loop: asyncio.AbstractEventLoop | None
    _token: Token[RequestScope | None] | None
    # Set by a sync `with request_scope()`, which cannot await async teardown.
    _sync_only: bool

    def __init__(self) -> None:
        # provider -> instance; read without the lock on the hot path.
        self._instances: dict[object, object] = {}
        # Reentrant: a factory may resolve another request-scoped provider.
        self._lock = _thread.RLock()  # threading.RLock() is a Python-level wrapper around this
        # Fixed for the scope's life, so its observers see it from opened to closed.
        # _info and _origin stay unset until asked for: unobserved scopes never pay for them.
        self._observers = _observers
        self._closed = self._response_started = self._sync_only = False
        # One chained assignment, as this runs once per request. Until first needed:
        # _pending: provider -> its async creation in flight (_provider._Pending);
        # _finalizers: teardown steps in creation order; _before_response: hooks;
        # _failure: the first failure; _loop: the event loop of the first async
        # creation (async instances belong to it); _token: the ContextVar token of
        # an open request_scope() (a subclass), which is its own scope.
        self._pending = self._finalizers = self._before_response = None
        self._failure = self._loop = self._token = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        failed = f", failed={self._failure!r}" if self._failure is not None else ""
        return (
            f"<RequestScope {state}: {len(self._instances)} instances, "
            f"{len(self._finalizers or ())} pending finalizers{failed}>"
        )

    def _opened(self, origin: str | None) -> None:
        """Tell the observers the scope opened; openers call it only when there are some."""
        self._origin = origin
        self._info = {}  # observers keep their state here: spare them the lazy creation
        self._observers.opened(self)  # type: ignore[union-attr]

    def _opened_or_reset(self, origin: str | None, token: Token[RequestScope | None]) -> None:
        """:meth:`_opened` once the scope is current; an observer raising through leaves nothing set."""
        try:
            self._opened(origin)
        except BaseException:  # observers' Exceptions are caught: this is one like pytest.fail()
            _current.reset(token)
            raise

    @property
    def origin(self) -> str | None:
        """What opened the scope, for logs and traces: ``"GET /notes/1"``, ``"request_scope()"``...

        Recorded only while an observer is registered (see :func:`observe`),
        None for a scope opened while none was.

        .. versionadded:: 0.2.0
        """
        return getattr(self, "_origin", None)

    @property
    def info(self) -> dict[Any, Any]:
        """A dict for observers and application code to keep data about this scope.

        Like SQLAlchemy's ``Session.info``: the scope never reads it. Use a key of
        your own (an observer may use itself), since other code shares it.

        .. versionadded:: 0.2.0
        """
        try:
            return self._info
        except AttributeError:
            with self._lock:
                try:
                    return self._info
                except AttributeError:
                    info: dict[Any, Any] = {}
                    self._info = info
                    return info

    @property
    def closed(self) -> bool:
        """True once teardown has begun; nothing can be resolved from it any more."""
        return self._closed

    @property
    def failure(self) -> BaseException | None:
        """The first failure recorded for this scope, handed to every finalizer."""
        return self._failure

    @property
    def response_started(self) -> bool:
        """True once the HTTP response status was sent: later failures cannot reach the client."""
        return self._response_started

    def fail(self, exc: BaseException) -> None:
        """Record that the unit of work failed; the first failure wins.

        Finalizers then roll back instead of committing. The middleware calls this
        for exceptions, error statuses and incomplete responses; jobs may call it
        to roll back without raising.
        """
        with self._lock:  # threads may fail the scope at once: exactly one of them wins
            if self._failure is not None:
                return
            self._failure = exc
        if self._observers is not None:
            self._observers.failed(self, exc)

    def call_before_response(self, hook: Hook) -> None:
        """Run ``hook`` (sync or async) just before a successful response starts.

        This is where a unit of work commits, so that a failed commit can still
        become a 5xx. Hooks run in registration order, including hooks registered
        while earlier ones run; outside HTTP they never run.
        """
        if not self._add_before_response(hook):
            if self._closed:
                raise NoRequestScopeError("cannot register a hook on a request scope that has already closed")
            raise ScopeMisuseError(
                "the response has already started, so a before-response hook would never run; "
                "check `scope.response_started` first and do the work at teardown instead"
            )

    def _add_before_response(self, hook: Hook) -> bool:
        """Register ``hook`` unless the response started (or the scope closed): then False.

        Checked under the lock that the hooks are taken with, so a hook registered
        while hooks run is run too. (Where no hook was registered at all, the
        middleware marks the response started without the lock: a hook another
        thread registers at that very moment commits at teardown instead.)
        """
        with self._lock:
            if self._closed or self._response_started:
                return False
            if self._before_response is None:
                self._before_response = [hook]
            else:
                self._before_response.append(hook)
            return True

    def _take_before_response(self) -> list[Hook] | None:
        """The hooks not run yet; when there are none, the response counts as started.

        One step under the lock: a hook registered meanwhile (by a hook, or by
        another task while a commit is awaited) is taken in the next round, and
        one registered after the last round is refused.
        """
        lock = self._lock
        lock.acquire()  # not `with`: acquire() and release() cost half as much
        try:
            hooks = self._before_response
            if hooks is None:
                self._response_started = True
            else:
                self._before_response = None
            return hooks
        finally:
            lock.release()

    def _run_before_response(self) -> Awaitable[None] | None:
        """Run the hooks; None when all ran here, else an awaitable for the rest to await.

        Sync hooks (a unit of work's commit on the event loop) run right here, so most
        requests pay for no coroutine; one that returns an awaitable (a commit sent to
        a worker thread) hands it and the hooks after it back. A hook that fails fails
        the scope and propagates, so nothing is sent. Marks the response started once
        no hook is left.
        """
        try:
            while (hooks := self._take_before_response()) is not None:
                for done, hook in enumerate(hooks, 1):
                    result = hook()
                    if result is not None:
                        return self._await_hooks(result, hooks[done:])
        except BaseException as exc:
            self.fail(exc)
            raise
        return None

    async def _await_hooks(self, pending: Awaitable[None], rest: Sequence[Hook]) -> None:
        """The rest of :meth:`_run_before_response`, from the first hook that returned an awaitable."""
        hooks: Sequence[Hook] | None = rest
        try:
            await pending
            while hooks is not None:
                for hook in hooks:
                    result = hook()
                    if result is not None:
                        await result
                hooks = self._take_before_response()
        except BaseException as exc:
            self.fail(exc)
            raise

    def _run_before_response_sync(self) -> None:
        """Run the hooks where no event loop runs (WSGI): an async hook there is a setup error."""
        while (hooks := self._take_before_response()) is not None:
            for hook in hooks:
                result = hook()
                if result is not None:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()  # a coroutine never awaited: no "was never awaited" warning
                    raise ScopeMisuseError(
                        f"the before-response hook {hook!r} is async (an AsyncSession unit of work?), and "
                        "a WSGI server runs no event loop to await it; use a sync Session (sessionmaker) "
                        "under RequestScopeWSGIMiddleware"
                    )

    def _store(self, key: object, instance: object, finalizer: _Finalizer | None) -> bool:
        """Keep a new instance; False when the scope closed while it was created."""
        with self._lock:
            if self._closed:
                return False
            self._instances[key] = instance
            if finalizer is not None:
                self._add_finalizer(finalizer)
            return True

    def _add_finalizer(self, finalizer: _Step) -> None:
        """Under the lock: one more teardown step."""
        if self._finalizers is None:
            self._finalizers = [finalizer]
        else:
            self._finalizers.append(finalizer)

    def _close_if_nothing_to_tear_down(self) -> bool:
        """Close at once when nothing was created: most requests never pay for teardown."""
        with self._lock:
            if self._finalizers or self._pending or self._closed:
                return False
            self._mark_closed()
        if self._observers is not None:
            self._observers.closed(self, [])
        return True

    def _close_now(self) -> Sequence[BaseException] | None:
        """Close right here when no step awaits or may block; None when it cannot.

        Most requests end here (nothing created, or a session whose transaction
        already ended), paying for neither a task, a shield nor a worker thread:
        with no await there is nothing a cancellation could cut off.
        """
        lock = self._lock
        lock.acquire()  # not `with`: acquire() and release() cost half as much
        try:
            if self._pending or self._closed:
                return None
            finalizers = self._finalizers
            failure = self._failure
            if finalizers and _may_wait(finalizers, failure):
                return None
            self._closed = True  # _mark_closed(), inlined: every request ends here
            if self._instances:
                self._instances = {}  # later lookups miss and reach the closed check
            self._finalizers = self._before_response = None
        finally:
            lock.release()
        observers = self._observers
        if not finalizers:  # nothing to tear down: most requests
            if observers is not None:
                observers.closed(self, [])
            return _NO_ERRORS
        errors: list[BaseException] = []
        if observers is None:
            # _may_wait() let no bare generator through: each step's run is callable.
            for fin in reversed(finalizers):
                try:
                    fin.run(failure)
                except BaseException as exc:  # noqa: BLE001 - every finalizer must run
                    errors.append(exc)
        else:
            self._run_sync_steps(finalizers, errors)
            observers.closed(self, errors)
        return errors

    def _mark_closed(self) -> None:
        """Under the lock: nothing can be resolved, created or registered any more."""
        self._closed = True
        if self._instances:
            self._instances = {}  # later lookups miss and reach the closed check
        self._finalizers = self._before_response = None

    def _begin_close(self) -> Sequence[_Step]:
        """Mark the scope closed; return its teardown steps, newest first."""
        lock = self._lock
        lock.acquire()  # not `with`: acquire() and release() cost half as much
        try:
            if self._closed:
                raise ScopeMisuseError(f"{self!r} is already closed; a scope is closed exactly once")
            finalizers = self._finalizers
            pending = self._pending
            self._closed = True  # _mark_closed(), inlined: this runs once per scope
            if self._instances:
                self._instances = {}  # later lookups miss and reach the closed check
            self._finalizers = self._before_response = None
            if pending:
                for creation in pending.values():
                    creation.abandon()
        finally:
            lock.release()
        if not finalizers:
            return []
        finalizers.reverse()  # the list is ours alone now
        if self._observers is not None:
            return self._observers.wrap(self, [as_finalizer(fin) for fin in finalizers])
        return finalizers

    def _run_sync_steps(self, steps: list[_Step], errors: list[BaseException]) -> None:
        """Run sync steps (given in creation order) newest first, as observers see them."""
        finalizers = [as_finalizer(step) for step in reversed(steps)]
        if self._observers is not None:
            finalizers = self._observers.wrap(self, finalizers)
        errors.extend(_run_sync_batch(finalizers, self._failure))

    def close(self) -> list[BaseException]:
        """Run every finalizer in reverse creation order; return their errors."""
        errors: list[BaseException] = []
        failure = self._failure
        for fin in self._begin_close():
            try:
                if type(fin) is GeneratorType:  # the common case first
                    if failure is not None or next(fin, _DONE) is not _DONE:  # else done: inlined
                        _finish_generator(fin, failure, resumed=failure is None)
                elif fin.is_async:
                    errors.append(
                        ScopeMisuseError(
                            f"{fin.name} needs async teardown but its scope was closed synchronously; "
                            "use `async with request_scope():` (or the decorator on an async function)"
                        )
                    )
                else:
                    run_step(fin, failure)
            except BaseException as exc:  # noqa: BLE001 - every finalizer must run
                errors.append(exc)
        if self._observers is not None:
            self._observers.closed(self, errors)
        return errors

    async def aclose(self) -> list[BaseException]:
        """Like :meth:`close`, awaiting async finalizers and running sync ones in a worker thread."""
        errors: list[BaseException] = []
        finalizers = [as_finalizer(step) for step in self._begin_close()]
        failure = self._failure
        i = 0
        while i < len(finalizers):
            fin = finalizers[i]
            if fin.is_async:
                try:
                    await run_step(fin, failure)
                except BaseException as exc:  # noqa: BLE001 - every finalizer must run
                    errors.append(exc)
                i += 1
                continue
            # Consecutive sync finalizers share one thread hop; order is kept.
            j = i
            while j < len(finalizers) and not finalizers[j].is_async:
                j += 1
            batch = finalizers[i:j]
            if all(fin.blocks is not None and not fin.blocks(failure) for fin in batch):
                errors.extend(_run_sync_batch(batch, failure))  # no I/O: a thread hop costs more
            else:
                errors.extend(await _to_thread(functools.partial(_run_sync_batch, batch, failure)))
            i = j
        if self._observers is not None:
            self._observers.closed(self, errors)
        return errors


def _may_wait(steps: list[_Step], failure: BaseException | None) -> bool:
    """Whether a step awaits or may block, so that teardown needs a task or a thread."""
    try:
        for fin in steps:
            if type(fin) is GeneratorType or fin.is_async or fin.blocks is None or fin.blocks(failure):
                return True
    except Exception:  # noqa: BLE001 - aclose() runs the steps and reports their errors
        return True
    return False


def _run_sync(fin: _Finalizer, failure: BaseException | None, errors: list[BaseException]) -> None:
    try:
        run_step(fin, failure)
    except BaseException as exc:  # noqa: BLE001 - every finalizer must run
        errors.append(exc)


def as_finalizer(step: _Step) -> _Finalizer:
    """The step a scope keeps, as a ``_Finalizer``: what observers and ``aclose()`` work with."""
    if type(step) is GeneratorType:
        return _Finalizer(_generator_name(step), False, step)
    return step


def _generator_name(gen: Generator[Any, Any, Any]) -> str:
    return f"RequestScoped({getattr(gen, '__qualname__', 'generator')})"


def run_step(fin: _Finalizer, failure: BaseException | None) -> Any:
    """Run one teardown step; an awaitable for an async one."""
    run = fin.run
    if type(run) is GeneratorType:
        return _finish_generator(run, failure, fin.name)
    return run(failure)  # type: ignore[operator]


def _finish_generator(
    gen: Generator[Any, Any, Any],
    failure: BaseException | None,
    name: str | None = None,
    *,
    resumed: bool = False,
) -> None:
    """Run a generator's teardown with the scope's outcome; ``resumed``: it yielded again already."""
    if failure is None:
        if not resumed and next(gen, _DONE) is _DONE:
            return
    else:
        try:
            gen.throw(failure)
        except StopIteration:
            return
        except BaseException as exc:
            if exc is failure:  # re-raised after rollback: the expected path
                return
            raise
    gen.close()
    raise ScopeMisuseError(
        f"generator initializer of {name or _generator_name(gen)} yielded more than once; it must "
        "yield exactly once"
    )


_DONE = object()


def _run_sync_batch(batch: list[_Finalizer], failure: BaseException | None) -> list[BaseException]:
    errors: list[BaseException] = []
    for fin in batch:
        _run_sync(fin, failure, errors)
    return errors


async def _to_thread(func: Callable[[], R]) -> R:
    """Run blocking work (a commit, ``Session.close()``) off the event loop (see ``_threads``).

    Shielded, as anyio's ``to_thread.run_sync`` is by default: a cancelled caller
    still waits for the thread, so nothing tears the session down (in another
    thread) while this one still uses it; the cancellation is raised after.
    """
    result, cancelled = await _outlast(run_in_thread(func, shielded=True))
    if cancelled is not None:
        raise cancelled
    return result


async def _shield(func: Callable[[], Awaitable[R]]) -> tuple[R, asyncio.CancelledError | None]:
    """Run ``func()`` to completion even if the caller is cancelled; also hand back that cancellation.

    The work runs in a task of its own: an anyio shield stops anyio cancellation
    but not a native ``Task.cancel()`` (``asyncio.timeout``, a server shutting
    down), and a commit or rollback cut off half-way would lose data or a
    connection. The caller re-raises the cancellation once it has reported errors.
    """
    task = asyncio.ensure_future(func())
    # The caller waits on a future that refuses cancel(), so the cancellation never reaches the task.
    waiter: asyncio.Future[R] = _Uncancellable(loop=task.get_loop())
    task.add_done_callback(functools.partial(_relay, waiter))
    return await _outlast(waiter)


async def _outlast(future: asyncio.Future[R]) -> tuple[R, asyncio.CancelledError | None]:
    """Await a future that refuses ``cancel()``; a cancellation of the caller meanwhile is handed back.

    It is the very exception, for the caller to re-raise: anyio recognises its own
    cancellations by their message. If the work failed too, the cancellation is
    raised from that error: a cancelled task must not carry on.
    """
    try:
        if _in_anyio_cancel_scope():
            # anyio re-delivers its (level-triggered) cancellation every trip round the
            # loop until the task leaves the scope: without this shield the loop would spin.
            with anyio.CancelScope(shield=True):
                return await future, None
        return await future, None
    except asyncio.CancelledError as cancelled:
        error = future.exception() if future.done() else None
        if error is cancelled:  # the work itself was cancelled, not its caller
            raise
        if error is not None:
            raise cancelled from error
        return future.result(), cancelled


def _relay(waiter: asyncio.Future[R], task: asyncio.Future[R]) -> None:
    """Hand a finished task's outcome to the future its caller awaits."""
    if task.cancelled():
        waiter.set_exception(asyncio.CancelledError())
    elif (error := task.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(task.result())


async def _shielded(func: Callable[[], Awaitable[R]]) -> R:
    """:func:`_shield`, re-raising the cancellation once ``func()`` is done."""
    result, cancelled = await _shield(func)
    if cancelled is not None:
        raise cancelled
    return result


def current_scope() -> RequestScope:
    """Return the open scope of the running request, job or test.

    Raises:
        NoRequestScopeError: no scope is open here, or it has already closed.

    .. versionadded:: 0.1
    """
    scope = _current.get()
    if scope is None:
        raise NoRequestScopeError(outside_scope_message("current_scope()"))
    if scope._closed:
        raise NoRequestScopeError(closed_scope_message("current_scope()"))
    return scope


def outside_scope_message(what: str) -> str:
    return (
        f"{what} was resolved outside a request scope. Add RequestScopeMiddleware to the ASGI app "
        "(app.add_middleware(RequestScopeMiddleware)), or open a scope around jobs, CLI commands and "
        "tests with `with request_scope():` / `async with request_scope():`. Threads started with "
        "threading.Thread do not inherit the scope: start them with contextvars.copy_context().run."
    )


def closed_scope_message(what: str) -> str:
    return (
        f"{what} was resolved from a request scope that has already closed: a task, thread or "
        "callback outlived its request. Resolve what it needs before the request ends, or give the "
        "work its own scope with `request_scope()`."
    )


def raise_teardown_errors(errors: Sequence[BaseException], body_error: BaseException | None) -> None:
    """Surface teardown errors without hiding the body's own exception."""
    if not errors:
        return
    if body_error is not None:
        # The body's exception keeps propagating; teardown errors must not replace it.
        for err in errors:
            logger.error("finalizer failed while a failed request scope closed", exc_info=err)
        return
    for err in errors:
        if not isinstance(err, Exception):  # cancellation or KeyboardInterrupt goes first
            raise err
    if len(errors) == 1:
        raise errors[0]
    raise TeardownError(errors) from errors[0]


@contextmanager
def _inside(scope: RequestScope) -> Iterator[None]:
    """Make ``scope`` current for one step of a decorated generator, then restore the caller's."""
    token = _current.set(scope)
    try:
        yield
    finally:
        _current.reset(token)


async def _aclose_and_report(scope: RequestScope, body_error: BaseException | None) -> None:
    """Tear an async scope down; raise or log its errors as ``request_scope()`` promises."""
    closed_now = scope._close_now()
    errors: Sequence[BaseException]
    cancelled: asyncio.CancelledError | None = None
    if closed_now is None:
        errors, cancelled = await _shield(scope.aclose)
    else:
        errors = closed_now
    if cancelled is not None:
        raise_teardown_errors(errors, cancelled)  # logged: cancellation goes first
        raise cancelled  # re-raise what teardown absorbed
    raise_teardown_errors(errors, body_error)


def _not_entered() -> ScopeMisuseError:
    return ScopeMisuseError("request_scope() exited without being entered")


class request_scope(RequestScope):  # noqa: N801 - used like a function, as contextlib's helpers are
    """Open a request scope outside HTTP: jobs, CLI commands, tests.

    Works as ``with request_scope():``, ``async with request_scope():`` and as a
    decorator on sync and async functions (each call gets its own scope). An
    exception leaving the block is handed to finalizers (rollback); teardown
    errors are raised here when the block itself succeeded. Nesting opens an
    independent inner scope and restores the outer one on exit. The object is
    the scope (``with request_scope() as scope`` gives it back) and opens once.

    Raises:
        TeardownError: more than one finalizer failed (one failure is raised as itself).
        ScopeMisuseError: the object is entered while open, or again after it closed.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2.0 The object is the scope; entering it after it closed raises.
    """

    # The object is the scope itself (one allocation per block, not two); its
    # _token is set while it is open. What observers are told opened the scope:
    # _NamedScope (the decorator's) names the function.
    __slots__ = ()
    _opened_by = "request_scope()"

    def _open(self) -> RequestScope:
        if self._token is not None or self._closed:
            raise ScopeMisuseError(
                "this request_scope() is already open, or was used; create a new request_scope() for "
                "each block"
            )
        self._observers = _observers  # those registered now, not when the object was made
        token = _current.set(self)
        if self._observers is not None:
            self._opened_or_reset(self._opened_by, token)
        self._token = token
        return self

    def _take(self) -> Token[RequestScope | None]:
        token = self._token
        if token is None:
            raise _not_entered()
        self._token = None
        return token

    def __enter__(self) -> RequestScope:
        self._open()
        self._sync_only = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._take()
        try:
            if exc is not None:
                self.fail(exc)
            errors = self.close()
        finally:
            _current.reset(token)
        if errors:
            raise_teardown_errors(errors, exc)

    async def __aenter__(self) -> RequestScope:
        return self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._take()
        try:
            if exc is not None:
                self.fail(exc)
            await _aclose_and_report(self, exc)
        finally:
            _current.reset(token)

    def __call__(self, func: F) -> F:
        wrapper: Callable[..., Any]
        origin = f"@request_scope() {getattr(func, '__qualname__', func)}"
        if inspect.isasyncgenfunction(func):

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                # The scope is set only while the generator runs: a generator shares
                # its consumer's context, which must not see (or lose) the scope.
                scope, gen, error = RequestScope(), func(*args, **kwargs), None
                if scope._observers is not None:
                    scope._opened(origin)
                try:
                    sent: Any = None
                    thrown: BaseException | None = None
                    while True:
                        try:
                            with _inside(scope):
                                item = await (gen.athrow(thrown) if thrown is not None else gen.asend(sent))
                        except StopAsyncIteration:
                            return
                        sent = thrown = None
                        try:
                            sent = yield item
                        except GeneratorExit:
                            with _inside(scope):
                                await gen.aclose()
                            raise
                        except BaseException as exc:  # noqa: BLE001 - forwarded into the generator
                            thrown = exc
                except BaseException as exc:
                    error = exc
                    scope.fail(exc)
                    raise
                finally:
                    await _aclose_and_report(scope, error)

        elif inspect.isgeneratorfunction(func):

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                scope, gen, error = RequestScope(), func(*args, **kwargs), None
                scope._sync_only = True
                if scope._observers is not None:
                    scope._opened(origin)
                try:
                    sent: Any = None
                    thrown: BaseException | None = None
                    while True:
                        try:
                            with _inside(scope):
                                item = gen.throw(thrown) if thrown is not None else gen.send(sent)
                        except StopIteration as stop:
                            return stop.value
                        sent = thrown = None
                        try:
                            sent = yield item
                        except GeneratorExit:
                            with _inside(scope):
                                gen.close()
                            raise
                        except BaseException as exc:  # noqa: BLE001 - forwarded into the generator
                            thrown = exc
                except BaseException as exc:
                    error = exc
                    scope.fail(exc)
                    raise
                finally:
                    raise_teardown_errors(scope.close(), error)

        elif inspect.iscoroutinefunction(func):

            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                async with _NamedScope(origin):
                    return await func(*args, **kwargs)

        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with _NamedScope(origin):
                    return func(*args, **kwargs)

        functools.update_wrapper(wrapper, func)
        # Hide the wrapped signature: otherwise container.wire() finds its Provide[...]
        # markers and injects them again, outside this scope. An inner @inject
        # resolves them inside it.
        delattr(wrapper, "__wrapped__")
        return cast("F", wrapper)


class _NamedScope(request_scope):
    """A ``request_scope()`` whose observers are told ``origin``: the decorated function."""

    __slots__ = ("_opened_by",)

    def __init__(self, origin: str) -> None:
        super().__init__()
        self._opened_by = origin
