"""``RequestScopeMiddleware``: one request scope per HTTP request or WebSocket connection."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ._scope import _HAS_ANYIO, RequestScope, _current, _shield, _shielded, logger
from ._types import ASGIApp, Message, Receive, Scope, Send
from .exceptions import RequestFailed

if _HAS_ANYIO:
    import anyio

__all__ = ["RequestScopeMiddleware", "container_lifespan"]

# Marks the ASGI scope so a second copy of the middleware joins the first one's scope.
_SCOPE_KEY = "di_request_scope"
_NORMAL_CLOSE_CODES = frozenset({1000, 1001})


async def _receive_nowait(receive: Receive) -> Message | None:
    """The next message if ``receive()`` has one ready, else None; never waits, consumes nothing else.

    The coroutine is stepped by hand in this task: if it would wait, it is
    cancelled right there, before taking anything, as Starlette's
    ``is_disconnected()`` does with a cancel scope, minus a trip round the event loop.
    """
    awaitable = receive()
    if not inspect.iscoroutine(awaitable):  # some other awaitable: let anyio cancel it
        return await _receive_nowait_anyio(awaitable)
    try:
        awaitable.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    try:
        awaitable.throw(asyncio.CancelledError())
    except asyncio.CancelledError:
        return None
    except StopIteration as stop:  # it caught the cancellation and still had a message
        return stop.value  # type: ignore[no-any-return]
    awaitable.close()  # it caught the cancellation and waited again: give up on it
    return None


async def _receive_nowait_anyio(awaitable: Awaitable[Message]) -> Message | None:
    if not _HAS_ANYIO:  # pragma: no cover - Starlette and FastAPI bring anyio
        close = getattr(awaitable, "close", None)
        if close is not None:
            close()
        return None
    with anyio.CancelScope() as cancel_scope:
        cancel_scope.cancel()
        return await awaitable
    return None  # cancelled: it would have waited


def default_is_failure_status(status: int) -> bool:
    """4xx and 5xx responses roll back; everything else commits."""
    return status >= 400


class RequestScopeMiddleware:
    """Open a request scope around each HTTP request and WebSocket connection.

    A pure ASGI middleware (not ``BaseHTTPMiddleware``), so the scope is seen by
    sync endpoints in the threadpool, streaming bodies and background tasks, and
    torn down only after all of them finished. It may sit anywhere in the stack;
    with FastAPI or Starlette, ``app.add_middleware(RequestScopeMiddleware)``.

    The request's outcome reaches finalizers: an exception raised by the app, an
    error status the framework already rendered (``HTTPException``), or a client
    that went away before the response completed. Hooks registered with
    :meth:`RequestScope.call_before_response` (the SQLAlchemy unit of work's
    commit) run before a successful status is sent; if one fails, the exception
    propagates instead, so the client gets a 5xx, never a 2xx. Teardown errors are
    logged on the ``di_request_scope`` logger: the response is already gone.

    Args:
        app: The ASGI application to wrap.
        is_failure_status: Decides which response statuses roll back; by default
            every status >= 400.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        is_failure_status: Callable[[int], bool] = default_is_failure_status,
    ) -> None:
        self.app = app
        self.is_failure_status = is_failure_status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or _SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return

        request_scope = RequestScope()
        scope[_SCOPE_KEY] = request_scope
        token = _current.set(request_scope)
        is_failure_status = self.is_failure_status
        complete = client_gone = accepted = False
        receiving = 0
        peeked: Message | None = None

        async def receive_wrapper() -> Message:
            nonlocal client_gone, peeked, receiving
            if peeked is not None:
                message, peeked = peeked, None
                return message
            receiving += 1
            try:
                message = await receive()
            finally:
                receiving -= 1
            kind = message["type"]
            if kind == "http.disconnect" and not complete:
                client_gone = True
            elif kind == "websocket.disconnect":
                code = message.get("code", 1005)
                if code not in _NORMAL_CLOSE_CODES:
                    request_scope.fail(RequestFailed(f"the client closed the WebSocket with code {code}"))
            return message

        async def client_left() -> bool:
            # Servers drop sends to a closed connection silently, so look before
            # committing: a receive() that does not block tells, one that would
            # block is cancelled at once and consumes nothing. Never while the app
            # itself waits in receive(): a server may deliver the disconnect once.
            nonlocal client_gone, peeked
            if client_gone or peeked is not None or receiving:
                return client_gone
            peeked = await _receive_nowait(receive)
            if peeked is not None:
                client_gone = peeked["type"] == "http.disconnect"
            return client_gone

        async def before_response_start(kind: str) -> None:
            if kind == "http.response.start" and await client_left():
                request_scope.fail(RequestFailed("the client disconnected before the response started"))
            if request_scope._failure is None:
                try:
                    await request_scope._run_before_response()
                except BaseException as exc:
                    # Raised into the app instead of sending the status: the
                    # client gets a 5xx from the server or ServerErrorMiddleware.
                    request_scope.fail(exc)
                    raise

        async def send_wrapper(message: Message) -> None:
            nonlocal complete, accepted
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":  # noqa: PLR1714
                status = message["status"]
                if is_failure_status(status):
                    request_scope.fail(RequestFailed(f"the response status was {status}", status_code=status))
                elif request_scope._before_response:
                    await before_response_start(kind)
                request_scope._response_started = True
            elif kind == "http.response.body":
                if not message.get("more_body", False):
                    complete = True
            elif kind == "http.response.pathsend":
                complete = True
            elif kind == "websocket.accept":
                accepted = True
            elif kind == "websocket.close":
                code = message.get("code", 1000)
                if not accepted:  # the server answers 403: the handshake was rejected
                    request_scope.fail(RequestFailed("the WebSocket handshake was rejected", status_code=403))
                elif code not in _NORMAL_CLOSE_CODES:
                    request_scope.fail(RequestFailed(f"the WebSocket was closed with code {code}"))
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            error = exc
            request_scope.fail(exc)
            raise
        finally:
            if kind == "http" and error is None:
                if client_gone:
                    request_scope.fail(RequestFailed("the client disconnected before the response completed"))
                elif not complete:
                    request_scope.fail(RequestFailed("the app returned without completing the response"))
            cancelled = False
            try:
                closed_now = request_scope._close_now()
                if closed_now is None:
                    errors, cancelled = await _shield(request_scope.aclose)
                else:
                    errors = closed_now
                if errors:
                    self._log_teardown_errors(scope, request_scope, errors)
            finally:
                _current.reset(token)
            if cancelled and error is None:
                raise asyncio.CancelledError  # re-raise the cancellation that teardown absorbed

    @staticmethod
    def _log_teardown_errors(scope: Scope, request_scope: RequestScope, errors: list[BaseException]) -> None:
        for err in errors:
            logger.error(
                "teardown failed after %s %s (request outcome: %s)",
                scope.get("method", "WEBSOCKET"),
                scope.get("path", ""),
                "success" if request_scope.failure is None else repr(request_scope.failure),
                exc_info=err,
            )


def container_lifespan(
    container: Any,
    lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """Tie a container's resources (engines, pools) to the app's lifespan.

    ``FastAPI(lifespan=container_lifespan(container))`` initialises every
    ``providers.Resource`` at startup and shuts them down (``engine.dispose()``)
    at shutdown, once per worker process, so ``--reload`` and ``--workers`` leave
    no pool behind. An existing lifespan may be wrapped: it runs inside.

    .. versionadded:: 0.1
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        started = container.init_resources()
        if inspect.isawaitable(started):
            await started
        try:
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state
        finally:
            stopped = container.shutdown_resources()
            if inspect.isawaitable(stopped):
                await _shielded(lambda: stopped)

    return run
