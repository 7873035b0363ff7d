"""Observers: hooks on a scope's life, for logs, traces and metrics.

Each scope takes a snapshot of the registered observers when it opens
(``_scope._observers``, None when there are none), so a request pays for one
``is not None`` check per step while nobody listens, and an observer sees every
scope opened while it was registered from ``scope_opened`` to ``scope_closed``,
even if it is removed in between.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from time import perf_counter
from types import TracebackType
from typing import Any

from . import _scope
from ._scope import RequestScope, _Finalizer, logger, run_step

__all__ = ["LoggingObserver", "Observation", "ScopeObserver", "observe"]


class ScopeObserver:
    """Receive the events of every request scope; subclass it and override what you need.

    Register an instance with :func:`observe`. Methods you do not override cost
    nothing. They run in the code that caused the event: the event loop, a
    worker thread (sync endpoints, sync teardown) or a job, so keep them short
    and thread-safe. An exception raised by an observer is logged on the
    ``di_request_scope`` logger (once per observer and event) and never reaches
    the request. Per-scope state belongs in :attr:`RequestScope.info`, under a
    key of your own such as the observer itself.

    .. versionadded:: 0.2.0
    """

    def scope_opened(self, scope: RequestScope) -> None:
        """A scope opened; :attr:`RequestScope.origin` says for what."""

    def instance_created(self, scope: RequestScope, provider: str, instance: object) -> None:
        """A request-scoped provider created its instance in ``scope`` (once per scope)."""

    def scope_failed(self, scope: RequestScope, failure: BaseException) -> None:
        """The scope recorded its (first) failure: its instances will roll back instead of committing.

        It may come before the response is sent (an exception, an error status)
        or after it (a client that left, a background task that raised).
        """

    def instance_finalized(
        self, scope: RequestScope, provider: str, duration: float, error: BaseException | None
    ) -> None:
        """An instance was torn down in ``duration`` seconds; ``error`` is what its teardown raised.

        Teardown runs in reverse creation order, with :attr:`RequestScope.failure`
        as the outcome (commit when None, roll back otherwise).
        """

    def teardown_error(self, scope: RequestScope, provider: str, error: BaseException) -> None:
        """The teardown of ``provider``'s instance raised ``error``; the next teardown steps still run."""

    def scope_closed(self, scope: RequestScope, errors: Sequence[BaseException]) -> None:
        """Teardown finished; ``errors`` holds what it raised, ``scope.failure`` the outcome."""


class _Observers:
    """The observers registered when a scope opened, each event's methods looked up once."""

    __slots__ = (
        "_closed",
        "_created",
        "_failed",
        "_finalized",
        "_opened",
        "_reported",
        "_teardown_error",
        "entries",
    )

    def __init__(
        self, entries: tuple[tuple[object, ScopeObserver], ...], previous: _Observers | None
    ) -> None:
        self.entries = entries
        self._opened = self._methods("scope_opened")
        self._created = self._methods("instance_created")
        self._failed = self._methods("scope_failed")
        self._finalized = self._methods("instance_finalized")
        self._teardown_error = self._methods("teardown_error")
        self._closed = self._methods("scope_closed")
        # (id(observer), event) already logged: a broken observer logs once, not per request,
        # nor again when other observers come or go (kept only for observers still registered).
        ids = {id(observer) for _, observer in entries}
        self._reported: set[tuple[int, str]] = (
            set() if previous is None else {key for key in previous._reported if key[0] in ids}
        )

    def _methods(self, event: str) -> tuple[Callable[..., object], ...]:
        base = getattr(ScopeObserver, event)
        return tuple(
            getattr(observer, event)
            for _, observer in self.entries
            if getattr(type(observer), event, base) is not base
        )

    def _notify(self, methods: tuple[Callable[..., object], ...], *args: Any) -> None:
        for method in methods:
            try:
                method(*args)
            except Exception as exc:  # noqa: BLE001 - an observer must never break a request
                self._report(method, exc)

    def _report(self, method: Callable[..., object], exc: Exception) -> None:
        observer = getattr(method, "__self__", method)
        event = getattr(method, "__name__", "?")
        key = (id(observer), event)
        if key in self._reported:
            return
        self._reported.add(key)
        logger.error(
            "the observer %r raised in %s(); the request went on, and later errors of this observer "
            "in %s() are not logged. Fix the observer, or remove it with the handle observe() returned",
            observer,
            event,
            event,
            exc_info=exc,
        )

    def opened(self, scope: RequestScope) -> None:
        if self._opened:
            self._notify(self._opened, scope)

    def _open_late(self, scope: RequestScope) -> None:
        """Announce a scope whose opener did not (a RequestScope() made elsewhere): events stay paired."""
        with scope._lock:
            if hasattr(scope, "_origin"):
                return
            scope._origin = None
        self.opened(scope)

    def created(self, scope: RequestScope, provider: str, instance: object) -> None:
        if not hasattr(scope, "_origin"):
            self._open_late(scope)
        if self._created:
            self._notify(self._created, scope, provider, instance)

    def failed(self, scope: RequestScope, failure: BaseException) -> None:
        if not hasattr(scope, "_origin"):
            self._open_late(scope)
        if self._failed:
            self._notify(self._failed, scope, failure)

    def closed(self, scope: RequestScope, errors: list[BaseException]) -> None:
        if not hasattr(scope, "_origin"):
            self._open_late(scope)
        if self._closed:
            self._notify(self._closed, scope, tuple(errors))

    def wrap(self, scope: RequestScope, finalizers: list[_Finalizer]) -> list[_Finalizer]:
        """Time each teardown step and report its end; order, kind and ``blocks`` are kept."""
        if not self._finalized and not self._teardown_error:
            return finalizers
        return [self._wrap(scope, fin) for fin in finalizers]

    def _finished(self, scope: RequestScope, name: str, started: float, error: BaseException | None) -> None:
        if self._finalized:
            self._notify(self._finalized, scope, name, perf_counter() - started, error)
        if error is not None and self._teardown_error:
            self._notify(self._teardown_error, scope, name, error)

    def _wrap(self, scope: RequestScope, fin: _Finalizer) -> _Finalizer:
        name = fin.name
        if fin.is_async:

            async def run_async(failure: BaseException | None) -> None:
                started = perf_counter()
                try:
                    await run_step(fin, failure)
                except BaseException as exc:
                    self._finished(scope, name, started, exc)
                    raise
                self._finished(scope, name, started, None)

            return _Finalizer(name, True, run_async, fin.blocks)

        def run_sync(failure: BaseException | None) -> None:
            started = perf_counter()
            try:
                run_step(fin, failure)
            except BaseException as exc:
                self._finished(scope, name, started, exc)
                raise
            self._finished(scope, name, started, None)

        return _Finalizer(name, False, run_sync, fin.blocks)


_lock = threading.Lock()


class Observation:
    """The registration :func:`observe` returns: ``remove()`` it, or use it as a context manager.

    .. versionadded:: 0.2.0
    """

    __slots__ = ("_token", "observer")

    def __init__(self, observer: ScopeObserver, token: object) -> None:
        self.observer = observer
        self._token = token

    def __repr__(self) -> str:
        return f"<Observation of {self.observer!r}>"

    def remove(self) -> None:
        """Stop sending new scopes to the observer; scopes already open still report to it.

        Removing twice does nothing.
        """
        with _lock:
            current = _scope._observers
            if current is None:
                return
            entries = tuple(entry for entry in current.entries if entry[0] is not self._token)
            if len(entries) != len(current.entries):
                _scope._observers = _Observers(entries, current) if entries else None

    def __enter__(self) -> Observation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def observe(observer: ScopeObserver) -> Observation:
    """Send the events of every scope opened from now on to ``observer``, until removed.

    Thread-safe. The registration is global, like a logging handler: register
    at startup (or in a test, as ``with observe(recorder):``), and remove it
    with the returned :class:`Observation`.

    Raises:
        TypeError: ``observer`` is not a :class:`ScopeObserver` instance.
        ValueError: ``observer`` is already registered.

    .. versionadded:: 0.2.0
    """
    if not isinstance(observer, ScopeObserver):
        raise TypeError(
            f"observe() expects a ScopeObserver instance, got {observer!r}; subclass "
            "di_request_scope.ScopeObserver, override the events you need and pass an instance"
        )
    token = object()
    with _lock:
        current = _scope._observers
        entries = () if current is None else current.entries
        if any(registered is observer for _, registered in entries):
            raise ValueError(
                f"{observer!r} is already observing request scopes; it would receive every event twice. "
                "Keep the Observation from the first observe() call, or remove it before observing again"
            )
        _scope._observers = _Observers((*entries, (token, observer)), current)
    return Observation(observer, token)


_ids = itertools.count(1)


class LoggingObserver(ScopeObserver):
    """Log each scope's life on the ``di_request_scope`` logger, at DEBUG by default.

    Registered with ``observe(LoggingObserver())``: requests pay nothing for
    these messages until it is. It checks the logger's level at each event,
    so it may stay registered in production and be turned on by setting the
    logger to DEBUG. Teardown errors are logged at ERROR by the middleware and
    ``request_scope()`` whether or not this observer is registered.

    Args:
        logger: Where to log; the ``di_request_scope`` logger by default.
        level: The level of every message.

    .. versionadded:: 0.2.0
    """

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.DEBUG) -> None:
        self.logger = logging.getLogger("di_request_scope") if logger is None else logger
        self.level = level

    def _label(self, scope: RequestScope) -> str:
        state = scope.info.get(self)
        number = "?" if state is None else state[0]
        return f"request scope {number} ({scope.origin or 'unknown origin'})"

    def scope_opened(self, scope: RequestScope) -> None:
        # The number tells concurrent scopes apart; the start time gives the duration.
        scope.info[self] = (next(_ids), perf_counter())
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, "%s opened", self._label(scope))

    def instance_created(self, scope: RequestScope, provider: str, instance: object) -> None:
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, "%s: created %s", self._label(scope), provider)

    def scope_failed(self, scope: RequestScope, failure: BaseException) -> None:
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, "%s failed: %s", self._label(scope), _describe(failure))

    def instance_finalized(
        self, scope: RequestScope, provider: str, duration: float, error: BaseException | None
    ) -> None:
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "%s: finalized %s in %.2f ms (outcome: %s)%s",
                self._label(scope),
                provider,
                duration * 1000,
                "success" if scope.failure is None else "failure",
                "" if error is None else f"; its teardown raised {_describe(error)}",
            )

    def scope_closed(self, scope: RequestScope, errors: Sequence[BaseException]) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        state = scope.info.get(self)
        took = "" if state is None else f" after {(perf_counter() - state[1]) * 1000:.2f} ms"
        self.logger.log(
            self.level,
            "%s closed%s: %s%s",
            self._label(scope),
            took,
            _outcome(scope.failure),
            "" if not errors else f", {len(errors)} teardown error{'s' if len(errors) > 1 else ''}",
        )


def _outcome(failure: BaseException | None) -> str:
    return "success" if failure is None else f"failure: {_describe(failure)}"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
