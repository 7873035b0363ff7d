"""Exceptions raised by di_request_scope.

Every exception derives from :class:`RequestScopeError`, so one ``except`` clause
catches everything the library raises on its own account.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CaptiveDependencyError",
    "NoRequestScopeError",
    "RequestFailed",
    "RequestScopeError",
    "ScopeMisuseError",
    "TeardownError",
]


class RequestScopeError(Exception):
    """Base class of every exception raised by di_request_scope."""


class NoRequestScopeError(RequestScopeError):
    """A request-scoped provider was resolved with no open scope, or a closed one.

    The message names the provider and says how to open a scope.
    """


class ScopeMisuseError(RequestScopeError):
    """A scope was used in a way that would lose or share instances.

    Examples: an async instance created under a sync ``with request_scope()``, a
    scope entered twice, an instance awaited from another event loop.
    """


class CaptiveDependencyError(ScopeMisuseError):
    """A provider created once (``Singleton``, ``Resource``) depends on a request-scoped one.

    It would be created during the first request that needs it and keep that
    request's instance, closed when that request ended, for every later request:
    the "captive dependency" bug. ``captures`` holds one line per path, from the
    long-lived provider to the request-scoped one it captures.
    """

    def __init__(self, captures: Sequence[str]) -> None:
        self.captures = tuple(captures)
        listed = "\n".join(f"  {capture}" for capture in self.captures)
        super().__init__(
            "a provider created once depends on a request-scoped provider, so it would keep the first "
            f"request's instance for every later request:\n{listed}\n"
            "Make the long-lived provider a Factory (or RequestScoped) too, or inject the request-scoped "
            "provider itself (`Container.db.provider`) and call it each time it is needed."
        )


class RequestFailed(RequestScopeError):  # noqa: N818 - it describes an outcome, not a bug
    """The outcome handed to finalizers when a request failed without raising.

    The framework already turned the failure into a response (``HTTPException``,
    an exception handler, an error status) or the client went away before the
    response completed. Finalizers receive it exactly like an exception raised by
    the app: thrown into generator initializers, passed to ``__exit__``.
    """

    def __init__(self, reason: str, *, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


class TeardownError(RequestScopeError):
    """Several finalizers failed while a scope closed; ``errors`` holds them all.

    A single failing finalizer is re-raised as itself; this wrapper appears only
    when there is more than one, so none of them is lost.
    """

    def __init__(self, errors: Sequence[BaseException]) -> None:
        self.errors = tuple(errors)
        listed = "; ".join(f"{type(e).__name__}: {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} finalizers failed while the request scope closed: {listed}")
