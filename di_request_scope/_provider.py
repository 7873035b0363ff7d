"""``RequestScoped``: a dependency-injector provider with one instance per scope."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import AbstractContextManager
from types import AsyncGeneratorType, CoroutineType, GeneratorType
from typing import Any, Generic, Protocol, TypeVar, overload

from dependency_injector import providers

from ._scope import (
    _DONE,
    RequestScope,
    _current,
    _Finalizer,
    _make_finalizer,
    _Step,
    _to_thread,
    closed_scope_message,
    outside_scope_message,
    run_step,
)
from .exceptions import CaptiveDependencyError, NoRequestScopeError, ScopeMisuseError

__all__ = ["RequestScoped"]

_current_get = _current.get
_fast_lock = threading.Lock()

T = TypeVar("T")


T_co = TypeVar("T_co", covariant=True)


class _ProviderOfFactory(Protocol[T_co]):
    """A provider (``Singleton(sessionmaker, ...)``) whose result is called to create the instance."""

    @property
    def provided(self) -> providers.ProvidedInstance: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Callable[..., T_co]: ...


class _Pending:
    """An async creation shared by every resolution in one scope until it completes.

    It runs as a task started by whichever resolution is *awaited* first: a
    resolution that is never awaited (dependency-injector hands un-awaited
    coroutines to providers stuck in sync mode) must not leave the others waiting
    on it forever. Cancelling the resolution that started it aborts the creation
    (a request that is cancelled stops connecting), and the others start over;
    cancelling any other awaiter leaves the creation alone.
    """

    __slots__ = ("loop", "provider", "result", "scope", "task")

    def __init__(
        self, provider: RequestScoped[Any], scope: RequestScope, result: Any, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.provider = provider
        self.scope = scope
        self.result = result
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None

    async def join(self) -> Any:
        if asyncio.get_running_loop() is not self.loop:
            raise ScopeMisuseError(
                f"{self.provider._name} is being created on another event loop; a request scope "
                "belongs to one event loop"
            )
        if self.task is None:
            if self.scope._closed:  # abandon() already discarded the factory's result
                raise NoRequestScopeError(closed_scope_message(self.provider._name))
            self.task = self.loop.create_task(self.provider._finish_async(self.scope, self.result))
            self.task.add_done_callback(_retrieve)
            return await self.task
        await asyncio.wait((self.task,))  # never cancels the task, unlike awaiting it
        if self.task.cancelled():  # its starter was cancelled: start over
            result = self.provider._provide((), {})
            return await result if inspect.isawaitable(result) else result
        return self.task.result()

    def abandon(self) -> None:
        """The scope closed before anyone awaited the creation: release what the factory returned."""
        if self.task is None:
            _discard(self.result)


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every awaiter sees the error; this only stops asyncio logging it as never retrieved.
    if not task.cancelled():
        task.exception()


def _call(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


class _Generator:
    """A generator handed through ``providers.Callable`` in a box.

    Bare, it would look like a coroutine to dependency-injector (asyncio counts
    generators as legacy coroutines), which would then check every later call's
    arguments and result for awaitables.
    """

    __slots__ = ("gen",)

    def __init__(self, gen: Generator[Any, Any, Any]) -> None:
        self.gen = gen


def _start_generator(
    func: Callable[..., Generator[Any, Any, Any]], /, *args: Any, **kwargs: Any
) -> _Generator:
    return _Generator(func(*args, **kwargs))


def _describe(obj: object) -> str:
    name = getattr(obj, "__qualname__", None)
    return name if isinstance(name, str) else type(obj).__qualname__


# Per-class answers: the creation path must not pay for ABC checks and failing
# attribute lookups on every new instance.
_NEEDS_AWAIT: dict[type, bool] = {
    _Generator: False,
    GeneratorType: False,
    CoroutineType: True,
    AsyncGeneratorType: True,
}
# Context-manager classes -> their teardown's (exit, blocks) functions, the unit of work's
# own or None; None for other classes.
_CONTEXT_MANAGERS: dict[type, tuple[Any, Any] | None] = {}
_UNKNOWN: Any = object()


def _needs_await(result: object) -> bool:
    cls = type(result)
    needs = _NEEDS_AWAIT.get(cls)
    if needs is None:
        needs = hasattr(cls, "__await__") or (hasattr(cls, "__aexit__") and not hasattr(cls, "__exit__"))
        _NEEDS_AWAIT[cls] = needs
    return needs


def _learn_context_manager(cls: type) -> tuple[Any, Any] | None:
    """``_CONTEXT_MANAGERS[cls]``, worked out and remembered: callers look in the cache first."""
    hooks: tuple[Any, Any] | None = None
    if hasattr(cls, "__enter__") and hasattr(cls, "__exit__"):
        # Our own context managers (the unit of work) take the failure directly and say
        # whether they block. Looked up on the class: a proxy or a mock answers any name.
        hooks = getattr(cls, "_di_request_scope_exit", None), getattr(cls, "_di_request_scope_blocks", None)
    _CONTEXT_MANAGERS[cls] = hooks
    return hooks


async def _finish_async_generator(gen: AsyncIterator[Any], name: str, failure: BaseException | None) -> None:
    try:
        if failure is None:
            await gen.__anext__()
        else:
            await gen.athrow(failure)  # type: ignore[attr-defined]
    except StopAsyncIteration:
        return
    except BaseException as exc:
        if exc is failure:
            return
        raise
    await gen.aclose()  # type: ignore[attr-defined]
    raise ScopeMisuseError(
        f"async generator initializer of {name} yielded more than once; it must yield exactly once"
    )


def _exit_args(failure: BaseException | None) -> tuple[Any, Any, Any]:
    if failure is None:
        return None, None, None
    return type(failure), failure, failure.__traceback__


def _enter_sync(result: Any, name: str) -> tuple[Any, _Finalizer | None]:
    """Turn a factory's result into the instance and its teardown step."""
    if type(result) is _Generator:
        result = result.gen
    if type(result) is GeneratorType:
        return _enter_generator(result, name)
    cls = type(result)
    hooks = _CONTEXT_MANAGERS.get(cls, _UNKNOWN)
    if hooks is _UNKNOWN:
        hooks = _learn_context_manager(cls)
    if hooks is None:
        return result, None
    instance = cls.__enter__(result)
    exit_step, blocks = hooks
    return instance, _make_finalizer(
        (
            name,
            False,
            exit_step.__get__(result) if exit_step is not None else _exit_step(cls, result),
            blocks.__get__(result) if blocks is not None else None,
        )
    )


def _exit_step(cls: Any, result: Any) -> Callable[[BaseException | None], Any]:
    return lambda failure: cls.__exit__(result, *_exit_args(failure))


def _enter_generator(gen: Generator[Any, Any, Any], name: str) -> tuple[Any, _Finalizer]:
    try:
        instance = next(gen)
    except StopIteration:
        raise _no_yield_error(name) from None
    return instance, _Finalizer(name, False, gen)  # run_step resumes the generator itself


def _no_yield_error(name: str) -> ScopeMisuseError:
    return ScopeMisuseError(f"generator initializer of {name} returned without yielding an instance")


async def _enter_async(result: Any, name: str) -> tuple[Any, _Finalizer | None]:
    while inspect.isawaitable(result):  # async factories and async injections
        result = await result
    if inspect.isasyncgen(result):
        try:
            instance = await result.__anext__()
        except StopAsyncIteration:
            raise ScopeMisuseError(
                f"async generator initializer of {name} returned without yielding an instance"
            ) from None
        gen = result
        return instance, _Finalizer(name, True, lambda failure: _finish_async_generator(gen, name, failure))
    cls = type(result)
    if not hasattr(cls, "__exit__") and hasattr(cls, "__aenter__") and hasattr(cls, "__aexit__"):
        instance = await cls.__aenter__(result)
        return instance, _Finalizer(name, True, lambda failure: cls.__aexit__(result, *_exit_args(failure)))
    return _enter_sync(result, name)


class RequestScoped(providers.Provider[T], Generic[T]):
    """Provide one instance per request scope, created lazily and torn down with the scope.

    Takes the same arguments as ``providers.Factory``. ``provides`` may be a class
    or function, a generator or async generator function (code after ``yield``
    runs at teardown and receives the request's failure, if any), or another
    provider, whose result is called (``RequestScoped(session_factory)`` with
    ``session_factory = providers.Singleton(sessionmaker, bind=engine)``).
    Instances that are context managers (``Session``, ``AsyncSession``) are
    entered on creation and exited at teardown with the request's outcome.

    Provider arguments are resolved as ``Factory`` resolves them; other
    arguments are kept by reference when containers copy providers, so a
    ``sessionmaker`` or an engine can be passed directly.

    Raises:
        NoRequestScopeError: resolved with no open scope, or from a closed one.
        ScopeMisuseError: an async instance resolved from a thread with no event loop,
            or from another event loop than its scope's.
        CaptiveDependencyError: a provider created once (``Singleton``, ``Resource``)
            of the same container depends on this one.

    .. versionadded:: 0.1
    """

    # Slots, not a __dict__: the hot path reads _fast and _name, and a slot is read
    # about three times faster than an entry of a Cython-derived instance's dict.
    __slots__ = (
        "__weakref__",
        "_args",
        "_checked",
        "_created_async",
        "_factory",
        "_fast",
        "_kwargs",
        "_name",
        "_owner",
        "_provides",
    )

    @overload
    def __init__(self, provides: _ProviderOfFactory[T], *args: Any, **kwargs: Any) -> None: ...
    @overload
    def __init__(
        self, provides: Callable[..., AbstractContextManager[T]], *args: Any, **kwargs: Any
    ) -> None: ...
    @overload
    def __init__(self, provides: Callable[..., Iterator[T]], *args: Any, **kwargs: Any) -> None: ...
    @overload
    def __init__(self, provides: Callable[..., AsyncIterator[T]], *args: Any, **kwargs: Any) -> None: ...
    @overload
    def __init__(self, provides: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> None: ...
    @overload
    def __init__(self, provides: Callable[..., T], *args: Any, **kwargs: Any) -> None: ...
    def __init__(self, provides: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(provides, str) or not callable(provides):
            raise TypeError(
                f"RequestScoped expects a class, a function or a provider to call, got {provides!r}"
            )
        self._provides = provides
        self._args = args
        self._kwargs = kwargs
        self._name = f"RequestScoped({_describe(provides)})"
        self._created_async = False
        # True once a call found no overriding and async mode off, until either changes:
        # later calls then return the scope's existing instance without the round trip
        # through dependency-injector's Cython __call__ into the Python _provide.
        self._fast = False
        # The DeclarativeContainer class this provider was declared in, whose graph is
        # checked for captive dependencies before the first creation.
        self._owner: type | None = None
        self._checked = False
        if isinstance(provides, providers.Provider):
            self._factory: Callable[..., Any] = providers.Callable(_call, provides, *args, **kwargs)
        elif not args and not kwargs:
            # Nothing to inject: call it directly, with no providers.Callable in between.
            self._factory = provides
        elif inspect.isgeneratorfunction(provides):
            self._factory = providers.Callable(_start_generator, provides, *args, **kwargs)
        else:
            self._factory = providers.Callable(provides, *args, **kwargs)
        super().__init__()

    @overload
    def __call__(self, *args: Any, **kwargs: Any) -> T: ...
    @overload
    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[T]: ...  # type: ignore[overload-cannot-match]
    def __call__(self, *args: Any, **kwargs: Any) -> T | Awaitable[T]:
        if self._fast:  # like _provide, an existing instance ignores call-time arguments
            scope = _current_get()
            if scope is not None:
                instances = scope._instances
                # `in` first: a KeyError would cost a fresh scope more than the
                # second lookup costs a cached one.
                if self in instances:
                    return instances[self]  # type: ignore[return-value]
                return self._create(scope, args, kwargs)  # type: ignore[no-any-return]
        result: T = providers.Provider.__call__(self, *args, **kwargs)
        if not self._fast:
            with _fast_lock:  # not racing an override() in another thread
                self._fast = self.last_overriding is None and self.is_async_mode_disabled()
        return result

    def override(self, provider: Any) -> Any:
        with _fast_lock:
            self._fast = False
            return super().override(provider)

    def reset_last_overriding(self) -> None:
        with _fast_lock:
            self._fast = False
            super().reset_last_overriding()

    def reset_override(self) -> None:
        with _fast_lock:
            self._fast = False
            super().reset_override()

    def enable_async_mode(self) -> None:
        with _fast_lock:
            self._fast = False
            super().enable_async_mode()

    def disable_async_mode(self) -> None:
        with _fast_lock:
            self._fast = False
            super().disable_async_mode()

    def reset_async_mode(self) -> None:
        with _fast_lock:
            self._fast = False
            super().reset_async_mode()

    def __set_name__(self, owner: type, name: str) -> None:
        # DeclarativeContainer attributes: errors then say "Container.db".
        self._name = f"{owner.__name__}.{name}"
        from dependency_injector import containers  # not at import: it imports FastAPI when installed

        if issubclass(owner, containers.DeclarativeContainer):  # other classes have no graph to check
            self._owner = owner

    def _check_not_captive(self) -> None:
        if self._owner is not None:
            from ._validation import captures_of

            captures = captures_of(self._owner, self._name)
            if captures:
                raise CaptiveDependencyError(captures)
        self._checked = True

    def __deepcopy__(self, memo: dict[Any, Any] | None) -> RequestScoped[T]:
        if memo is None:
            memo = {}
        copied = memo.get(id(self))
        if copied is not None:
            return copied  # type: ignore[no-any-return]
        cls = type(self)
        copied = cls.__new__(cls)
        memo[id(self)] = copied

        def copy(value: Any) -> Any:
            return providers.deepcopy(value, memo) if isinstance(value, providers.Provider) else value

        copied.__init__(  # type: ignore[misc]
            copy(self._provides),
            *(copy(a) for a in self._args),
            **{k: copy(v) for k, v in self._kwargs.items()},
        )
        copied._name = self._name
        copied._owner = self._owner
        self._copy_overridings(copied, memo)
        return copied

    def __copy__(self) -> RequestScoped[T]:
        """A new provider (its own instance per scope) with the same arguments and overridings."""
        cls = type(self)
        copied = cls.__new__(cls)
        copied.__init__(self._provides, *self._args, **self._kwargs)  # type: ignore[misc]
        copied._name = self._name
        copied._owner = self._owner
        for overriding in self.overridden:
            copied.override(overriding)
        return copied

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<{self._name} at {id(self):#x}>"

    @property
    def provides(self) -> Any:
        """What is called to create the instance."""
        return self._provides

    @property
    def args(self) -> tuple[Any, ...]:
        """Positional injections, as given."""
        return self._args

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword injections, as given."""
        return dict(self._kwargs)

    @property
    def related(self) -> Iterator[providers.Provider[Any]]:
        """Providers this one depends on, for ``traverse()``."""
        candidates = (self._provides, *self._args, *self._kwargs.values())
        yield from (c for c in candidates if isinstance(c, providers.Provider))
        yield from super().related

    def _provide(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        scope = _current.get()
        if scope is None:
            raise NoRequestScopeError(outside_scope_message(self._name))
        instance = scope._instances.get(self, _DONE)
        if instance is _DONE:
            return self._create(scope, args, kwargs)
        if self._created_async:  # dependency-injector will wrap it in an awaitable
            _require_loop(self._name, "was created asynchronously", scope._loop)
        return instance

    def _create(  # noqa: PLR0912 - the creation path, kept in one frame for speed
        self, scope: RequestScope, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not self._checked:
            self._check_not_captive()
        lock = scope._lock
        lock.acquire()  # not `with`: acquire() and release() cost half as much
        try:
            if scope._closed:
                raise NoRequestScopeError(closed_scope_message(self._name))
            instance = scope._instances.get(self, _DONE)
            if instance is not _DONE:
                return instance
            if scope._pending:
                pending = scope._pending.get(self)
                if pending is not None:
                    _require_loop(self._name, "is being created asynchronously")
                    return pending.join()
            result = self._factory(*args, **kwargs) if args or kwargs else self._factory()
            cls = type(result)
            if cls is _Generator or cls is GeneratorType:  # the common cases first
                gen = result.gen if cls is _Generator else result
                try:
                    instance = next(gen)
                except StopIteration:
                    raise _no_yield_error(self._name) from None
                # The generator itself is the step, unless observers want the provider's name.
                finalizer: _Step | None = (
                    gen if scope._observers is None else _Finalizer(self._name, False, gen)
                )
            else:
                needs_await = _NEEDS_AWAIT.get(cls)
                if needs_await is None:
                    needs_await = _needs_await(result)
                if needs_await:
                    return self._create_async(scope, result)
                instance, finalizer = _enter_sync(result, self._name)
            # Still under the lock, so the scope cannot have closed meanwhile.
            scope._instances[self] = instance
            if finalizer is not None:
                finalizers = scope._finalizers
                if finalizers is None:
                    scope._finalizers = [finalizer]
                else:
                    finalizers.append(finalizer)
        finally:
            lock.release()
        if scope._observers is not None:  # outside the lock: other threads need not wait for them
            scope._observers.created(scope, self._name, instance)
        return instance

    def _create_async(self, scope: RequestScope, result: Any) -> Awaitable[Any]:
        """Under the scope's lock: start sharing an async creation; the awaitable joins it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _discard(result)
            raise ScopeMisuseError(
                f"{self._name} creates its instance asynchronously (an async factory, async "
                "generator or async context manager such as AsyncSession), but it was resolved "
                "from a thread with no running event loop, such as a sync endpoint or "
                "dependency; resolve it from async code"
            ) from None
        if scope._sync_only:
            _discard(result)
            raise ScopeMisuseError(
                f"{self._name} creates its instance asynchronously, but its scope is torn down "
                "synchronously (a sync `with request_scope()`, or RequestScopeWSGIMiddleware), "
                "which cannot await its teardown; use `async with request_scope()` (or the "
                "decorator on an async function), or under WSGI a sync instance (Session, "
                "not AsyncSession)"
            )
        self._created_async = True
        if scope._loop is None:
            scope._loop = loop
        pending = _Pending(self, scope, result, loop)
        if scope._pending is None:
            scope._pending = {self: pending}
        else:
            scope._pending[self] = pending
        return pending.join()

    async def _finish_async(self, scope: RequestScope, result: Any) -> Any:
        try:
            instance, finalizer = await _enter_async(result, self._name)
        except BaseException:
            with scope._lock:
                scope._pending.pop(self, None)  # type: ignore[union-attr]
            raise
        with scope._lock:  # one step: no resolver may see neither the creation nor its instance
            scope._pending.pop(self, None)  # type: ignore[union-attr]
            stored = scope._store(self, instance, finalizer)
        if not stored:
            # The scope closed while we awaited: tear the orphan down now, leak nothing.
            error = NoRequestScopeError(closed_scope_message(self._name))
            if finalizer is not None:
                if finalizer.is_async:
                    await run_step(finalizer, error)
                else:  # a rollback or close may block: keep it off the event loop
                    await _to_thread(functools.partial(run_step, finalizer, error))
            raise error
        if scope._observers is not None:
            scope._observers.created(scope, self._name, instance)
        return instance


def _require_loop(name: str, what: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        raise ScopeMisuseError(
            f"{name} {what}, but it was resolved from a thread with no running event loop (a sync "
            "endpoint or dependency); resolve it from async code"
        ) from None
    if loop is not None and running is not loop:
        raise ScopeMisuseError(
            f"{name} {what} on another event loop, and an async instance (an AsyncSession) works only "
            "on its own; a request scope belongs to one event loop: open a scope per loop"
        )


def _discard(result: Any) -> None:
    """Close an async object we cannot use, so Python does not warn it was never awaited."""
    close = getattr(result, "close", None)
    if inspect.iscoroutine(result) and close is not None:
        close()
