"""``RequestScopeMiddleware``: one request scope per HTTP request or WebSocket connection (or message)."""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import Token
from types import CoroutineType
from typing import Any, Literal

from ._scope import _HAS_ANYIO, RequestScope, _aclose_and_report, _current, _shield, _shielded, logger
from ._types import AnyASGIApp, Message, Receive, Scope, Send
from .exceptions import RequestFailed, ScopeMisuseError

if _HAS_ANYIO:
    import anyio

__all__ = ["RequestScopeMiddleware", "container_lifespan"]

# Marks the ASGI scope so a second copy of the middleware joins the first one's scope.
_SCOPE_KEY = "di_request_scope"
_NORMAL_CLOSE_CODES = frozenset({1000, 1001})
# How many bare ``await asyncio.sleep(0)`` yields a WebSocket's close check steps through.
_CHECKPOINTS = 8
_OTHER_TASK_WARNING = (
    "RequestScopeMiddleware(websocket_scope='message'): receive() returned the previous message in "
    "another task than the one now calling it, so that message's scope was current only there and "
    "the handler resolved the connection's instances instead. Await receive() in the task that "
    "handles the messages: not through asyncio.wait_for() (a task of its own before Python 3.12; "
    "use asyncio.timeout() or anyio.fail_after()) or a separate reader task. For such designs, open "
    "`async with request_scope():` around each message's work instead."
)


async def _receive_nowait(receive: Receive, checkpoints: int = 1) -> Message | None:
    """The next message if ``receive()`` has one ready, else None; never waits, consumes nothing else."""
    awaitable = receive()
    if isinstance(awaitable, CoroutineType):
        return _poll(awaitable, checkpoints)
    return await _receive_nowait_anyio(awaitable)  # some other awaitable: let anyio cancel it


def _poll(coroutine: Coroutine[Any, Any, Message], checkpoints: int = 1) -> Message | None:
    """:func:`_receive_nowait` for a coroutine, which needs no coroutine of ours: stepped by hand.

    If it would wait, it is cancelled right there, before taking anything, as
    Starlette's ``is_disconnected()`` does with a cancel scope, minus a trip
    round the event loop. ``checkpoints`` bare yields (``await sleep(0)``, which
    anyio's memory streams, Starlette's ``TestClient``, make before taking a
    queued message) are stepped through first; a yielded future is a real wait
    and stops there.
    """
    try:
        for _ in range(checkpoints):
            if coroutine.send(None) is not None:
                break
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    try:
        coroutine.throw(asyncio.CancelledError())
    except asyncio.CancelledError:
        return None
    except StopIteration as stop:  # it caught the cancellation and still had a message
        return stop.value  # type: ignore[no-any-return]
    coroutine.close()  # it caught the cancellation and waited again: give up on it
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


class _Exchange:
    """One HTTP request's ``receive``/``send`` as the app sees them, and what they tell the scope.

    An object with two bound methods costs a request less than closures
    sharing cells, and every request pays for it.
    """

    __slots__ = (
        "_failure_status",
        "_receive",
        "_receiving",
        "_scope",
        "_send",
        "client_gone",
        "complete",
        "peeked",
    )

    def __init__(
        self,
        request_scope: RequestScope,
        receive: Receive,
        send: Send,
        is_failure_status: Callable[[int], bool],
    ) -> None:
        self._scope = request_scope
        self._receive = receive
        self._send = send
        # None for the default, inlined in send().
        self._failure_status = None if is_failure_status is default_is_failure_status else is_failure_status
        self.complete = self.client_gone = False
        self._receiving = 0
        self.peeked: Message | None = None

    async def receive(self) -> Message:
        peeked = self.peeked
        if peeked is not None:
            self.peeked = None
            return peeked
        self._receiving += 1
        try:
            message = await self._receive()
        finally:
            self._receiving -= 1
        if message["type"] == "http.disconnect" and not self.complete:
            self.client_gone = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        # A plain method handing back the server's own awaitable: no coroutine of
        # ours per message, unless before-response hooks must run first.
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.start":
            status = message["status"]
            request_scope = self._scope
            failure_status = self._failure_status
            if status >= 400 if failure_status is None else failure_status(status):
                request_scope.fail(RequestFailed(f"the response status was {status}", status_code=status))
            elif request_scope._before_response and request_scope._failure is None:
                return self._start_after_hooks(message)
            request_scope._response_started = True
        elif kind == "http.response.pathsend":
            self.complete = True
        return self._send(message)

    async def _start_after_hooks(self, message: Message) -> None:
        request_scope = self._scope
        # Servers drop sends to a closed connection silently, so look before
        # committing: a receive() that does not block tells, one that would
        # block is cancelled at once and consumes nothing. Never while the app
        # itself waits in receive(): a server may deliver the disconnect once.
        if not self.client_gone and self.peeked is None and not self._receiving:
            awaitable = self._receive()  # _receive_nowait(), minus a coroutine of its own
            peeked = self.peeked = (
                _poll(awaitable)
                if isinstance(awaitable, CoroutineType)
                else await _receive_nowait_anyio(awaitable)
            )
            if peeked is not None:
                self.client_gone = peeked["type"] == "http.disconnect"
        if self.client_gone:
            request_scope.fail(RequestFailed("the client disconnected before the response started"))
        else:
            # A failure is raised into the app instead of sending the status:
            # the client gets a 5xx from the server or ServerErrorMiddleware.
            pending = request_scope._run_before_response()
            if pending is not None:
                await pending
        request_scope._response_started = True
        await self._send(message)


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

    A WebSocket connection is one scope by default. With
    ``websocket_scope="message"``, each message the app receives also gets a scope
    of its own, so a connection open for hours holds no session between messages:
    it is current from ``receive()`` returning the message until the app calls
    ``receive()`` again, commits before the first frame the app sends while
    handling it, and its teardown errors are raised from that next ``receive()``.

    Args:
        app: The ASGI application to wrap.
        is_failure_status: Decides which response statuses roll back; by default
            every status >= 400.
        websocket_scope: ``"connection"`` (the default): one scope per WebSocket
            connection. ``"message"`` (new in 0.2.0): a scope per received message
            as well, nested in the connection's, which stays current outside messages.

    Raises:
        ValueError: ``websocket_scope`` is neither ``"connection"`` nor ``"message"``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        is_failure_status: Callable[[int], bool] = default_is_failure_status,
        websocket_scope: Literal["connection", "message"] = "connection",
    ) -> None:
        if websocket_scope not in ("connection", "message"):
            raise ValueError(
                f"websocket_scope must be 'connection' (one scope per WebSocket connection) or 'message' "
                f"(a scope per received message as well), got {websocket_scope!r}"
            )
        self.app = app
        self.is_failure_status = is_failure_status
        self.websocket_scope = websocket_scope

    # Any, not Scope/Receive/Send: Litestar types the ASGI interface with TypedDicts, which mypy
    # does not accept where a MutableMapping[str, Any] is expected.
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _SCOPE_KEY in scope:
            await self._call_other(scope, receive, send)
            return
        # HTTP, inline: every request pays for this code, so it is kept short.
        request_scope = RequestScope()
        token = _current.set(request_scope)
        if request_scope._observers is not None:
            request_scope._opened_or_reset(f"{scope.get('method', 'HTTP')} {scope.get('path', '')}", token)
        scope[_SCOPE_KEY] = request_scope
        exchange = _Exchange(request_scope, receive, send, self.is_failure_status)
        error: BaseException | None = None
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException as exc:
            error = exc
            request_scope.fail(exc)
            raise
        finally:
            if error is None and (exchange.client_gone or not exchange.complete):
                request_scope.fail(
                    RequestFailed(
                        "the client disconnected before the response completed"
                        if exchange.client_gone
                        else "the app returned without completing the response"
                    )
                )
            cancelled: asyncio.CancelledError | None = None
            try:
                closed_now = request_scope._close_now()
                errors: Sequence[BaseException]
                if closed_now is None:
                    errors, cancelled = await _shield(request_scope.aclose)
                else:
                    errors = closed_now
                if errors:
                    self._log_teardown_errors(scope, request_scope, errors)
            finally:
                _current.reset(token)
            if cancelled is not None and error is None:
                raise cancelled  # re-raise the cancellation that teardown absorbed

    async def _call_other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anything but a first pass of an HTTP request: WebSockets, lifespan, a nested copy."""
        kind = scope["type"]
        if kind != "websocket" or _SCOPE_KEY in scope:
            await self.app(scope, receive, send)
        elif self.websocket_scope == "message":
            await self._call_per_message(scope, receive, send)
        else:
            await self._call_websocket(scope, receive, send)

    async def _call_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket connection with one scope."""
        request_scope = RequestScope()
        token = _current.set(request_scope)
        if request_scope._observers is not None:
            request_scope._opened_or_reset(f"WEBSOCKET {scope.get('path', '')}", token)
        scope[_SCOPE_KEY] = request_scope
        is_failure_status = self.is_failure_status
        accepted = False

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", 1005)
                if code not in _NORMAL_CLOSE_CODES:
                    request_scope.fail(RequestFailed(f"the client closed the WebSocket with code {code}"))
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal accepted
            kind = message["type"]
            if kind == "websocket.http.response.start":
                status = message["status"]
                if is_failure_status(status):
                    request_scope.fail(RequestFailed(f"the response status was {status}", status_code=status))
                elif request_scope._before_response and request_scope._failure is None:
                    pending = request_scope._run_before_response()
                    if pending is not None:
                        await pending
                request_scope._response_started = True
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
            cancelled: asyncio.CancelledError | None = None
            try:
                cancelled = await self._close_and_log(scope, request_scope)
            finally:
                _current.reset(token)
            if cancelled is not None and error is None:
                raise cancelled  # re-raise the cancellation that teardown absorbed

    async def _call_per_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket connection with a scope per received message, nested in the connection's.

        The message scope is set in the context of the task that received the
        message (the handler's: ``receive()`` is awaited there), and reset when
        that task calls ``receive()`` again. Tasks started before the message keep
        the connection scope.
        """
        connection = RequestScope()
        path = scope.get("path", "")
        token = _current.set(connection)
        if connection._observers is not None:
            connection._opened_or_reset(f"WEBSOCKET {path}", token)
        scope[_SCOPE_KEY] = connection
        is_failure_status = self.is_failure_status
        accepted = False
        receiving = 0
        peeked: Message | None = None
        message: RequestScope | None = None  # the message being handled
        message_token: Token[RequestScope | None] | None = None

        def check_disconnect(received: Message, target: RequestScope, during: str) -> None:
            if received["type"] == "websocket.disconnect":
                code = received.get("code", 1005)
                if code not in _NORMAL_CLOSE_CODES:
                    target.fail(RequestFailed(f"the client closed the WebSocket with code {code}{during}"))

        async def look_for_abnormal_close(current: RequestScope) -> None:
            # Servers drop or refuse frames to a closed connection, and the app
            # learns of the close only at its next receive(): look now, without
            # waiting and never while another task waits in receive().
            nonlocal peeked
            if peeked is None and not receiving:
                peeked = await _receive_nowait(receive, _CHECKPOINTS)
            if peeked is not None:
                check_disconnect(peeked, current, " while a message was being handled")

        async def before_reply(current: RequestScope) -> None:
            if current._failure is None:
                await look_for_abnormal_close(current)
            if current._failure is None:
                # A failure is raised from send() instead of sending the reply, as for HTTP.
                pending = current._run_before_response()
                if pending is not None:
                    await pending

        async def end_message(ending: RequestScope, ending_token: Token[RequestScope | None]) -> None:
            error: BaseException | None = None
            try:
                try:
                    # Only an outcome that decides something is worth a look.
                    if ending._failure is None and (ending._finalizers or ending._pending):
                        await look_for_abnormal_close(ending)
                except BaseException as exc:
                    error = exc
                    ending.fail(exc)
                    raise
                finally:
                    # Teardown errors (a failed commit) are raised from receive(), to the
                    # handler: the connection is still open to tell the client.
                    await _aclose_and_report(ending, error)
            finally:
                try:
                    _current.reset(ending_token)
                except ValueError:  # created in another context than this receive() runs in
                    warnings.warn(_OTHER_TASK_WARNING, RuntimeWarning, stacklevel=3)

        async def receive_wrapper() -> Message:
            nonlocal message, message_token, peeked, receiving
            if receiving:
                raise ScopeMisuseError(
                    "two tasks wait in receive() on one WebSocket at once, so neither message can be "
                    "given a scope (RequestScopeMiddleware(websocket_scope='message')); receive in one "
                    "task only"
                )
            if message is not None and message_token is not None:
                ending, ending_token = message, message_token
                message = message_token = None
                await end_message(ending, ending_token)
            if peeked is not None:
                received, peeked = peeked, None
            else:
                receiving += 1
                try:
                    received = await receive()
                finally:
                    receiving -= 1
            kind = received["type"]
            if kind == "websocket.receive":
                opened = RequestScope()
                opened_token = _current.set(opened)
                if opened._observers is not None:
                    opened._opened_or_reset(f"WEBSOCKET {path} message", opened_token)
                message, message_token = opened, opened_token
            elif kind == "websocket.disconnect":
                check_disconnect(received, connection, "")
            return received

        async def send_wrapper(sent: Message) -> None:
            nonlocal accepted
            kind = sent["type"]
            if kind == "websocket.send":
                current = message
                # The handler's first frame is the message's reply; frames sent by
                # tasks outside the message (a heartbeat) commit nothing.
                if current is not None and not current._response_started and _current.get() is current:
                    if current._before_response:
                        await before_reply(current)
                    current._response_started = True
            elif kind == "websocket.accept":
                accepted = True
            elif kind == "websocket.close":
                code = sent.get("code", 1000)
                if not accepted:  # the server answers 403: the handshake was rejected
                    connection.fail(RequestFailed("the WebSocket handshake was rejected", status_code=403))
                elif code not in _NORMAL_CLOSE_CODES:
                    failed = RequestFailed(f"the WebSocket was closed with code {code}")
                    connection.fail(failed)
                    if message is not None:
                        message.fail(failed)
            elif kind == "websocket.http.response.start":
                status = sent["status"]
                if is_failure_status(status):
                    connection.fail(RequestFailed(f"the response status was {status}", status_code=status))
                elif connection._before_response:
                    pending = connection._run_before_response()
                    if pending is not None:
                        await pending
                connection._response_started = True
            await send(sent)

        error: BaseException | None = None
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            error = exc
            connection.fail(exc)
            if message is not None:
                message.fail(exc)
            raise
        finally:
            cancelled: asyncio.CancelledError | None = None
            try:
                if message is not None:  # the app returned or raised while handling it
                    cancelled = await self._close_and_log(scope, message)
                    message = None
                cancelled = await self._close_and_log(scope, connection) or cancelled
            finally:
                _current.reset(token)
            if cancelled is not None and error is None:
                raise cancelled  # re-raise the cancellation that teardown absorbed

    async def _close_and_log(
        self, scope: Scope, request_scope: RequestScope
    ) -> asyncio.CancelledError | None:
        """Tear a scope down, shielded; log its errors; hand back a cancellation of the caller meanwhile."""
        closed_now = request_scope._close_now()
        errors: Sequence[BaseException]
        cancelled: asyncio.CancelledError | None = None
        if closed_now is None:
            errors, cancelled = await _shield(request_scope.aclose)
        else:
            errors = closed_now
        if errors:
            self._log_teardown_errors(scope, request_scope, errors)
        return cancelled

    @staticmethod
    def _log_teardown_errors(
        scope: Scope, request_scope: RequestScope, errors: Sequence[BaseException]
    ) -> None:
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
