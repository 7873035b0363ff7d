"""``RequestScopeWSGIMiddleware``: one request scope per WSGI request (Flask, Django, any PEP 3333 app)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from ._scope import RequestScope, _current, logger
from .asgi import default_is_failure_status
from .exceptions import RequestFailed

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["RequestScopeWSGIMiddleware"]

# Marks the environ so a second copy of the middleware joins the first one's scope.
_ENVIRON_KEY = "di_request_scope"

_ERROR_STATUS = "500 Internal Server Error"
_ERROR_BODY = b"Internal Server Error"
_ERROR_HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(_ERROR_BODY)))]


def _discard(data: bytes) -> None:
    """The ``write()`` handed to an app whose response was replaced by a 500."""


class RequestScopeWSGIMiddleware:
    """Open a request scope around each WSGI request, response body included.

    The WSGI twin of :class:`~di_request_scope.RequestScopeMiddleware`. The scope
    is current while the app runs *and* while the server iterates the response
    body (a generator, Flask's ``stream_with_context``, Django's
    ``StreamingHttpResponse``), and it is torn down exactly once, when the server
    calls ``close()`` on the body (PEP 3333), after the app's own ``close()``.

    The request's outcome reaches finalizers: an exception raised by the app or
    while the body is iterated, an error status, or a body the server stopped
    reading early because the client went away. Hooks registered with
    :meth:`RequestScope.call_before_response` (the SQLAlchemy unit of work's
    commit) run when the app calls ``start_response`` with a successful status; if
    one fails, the server is handed a plain 500 instead of the app's response, so
    the client never gets a 2xx for lost data. Teardown errors, and the failure of
    a before-response hook, are logged on the ``di_request_scope`` logger.

    Flask: ``app.wsgi_app = RequestScopeWSGIMiddleware(app.wsgi_app)``. Django, in
    ``wsgi.py``: ``application = RequestScopeWSGIMiddleware(get_wsgi_application())``.

    Args:
        app: The WSGI application to wrap.
        is_failure_status: Decides which response statuses roll back; by default
            every status >= 400.

    .. versionadded:: 0.2.0
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        is_failure_status: Callable[[int], bool] = default_is_failure_status,
    ) -> None:
        self.app = app
        self.is_failure_status = is_failure_status

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if _ENVIRON_KEY in environ:  # an outer copy of the middleware owns the scope
            return self.app(environ, start_response)
        request = _Request(self, environ, start_response)
        environ[_ENVIRON_KEY] = request.scope
        token = _current.set(request.scope)
        try:
            if request.scope._observers is not None:
                request.scope._opened(f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '')}")
            result = self.app(environ, request.start_response)
        except BaseException as exc:
            # No body will come back, so nobody will call close(): tear down now.
            request.scope.fail(exc)
            request.teardown()
            raise
        finally:
            # The server thread serves other requests next: leave it as it was.
            _current.reset(token)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if (
            isinstance(file_wrapper, type)
            and isinstance(result, file_wrapper)
            and request.replaced is None
            and request.scope._close_if_nothing_to_tear_down()
        ):
            return result  # nothing left to tear down: let the server use sendfile
        return _ScopedBody(request, result)


class _Request:
    """One request's scope, and what the middleware learned about its response."""

    __slots__ = ("environ", "is_failure_status", "replaced", "scope", "server_start_response", "started")

    def __init__(
        self, middleware: RequestScopeWSGIMiddleware, environ: WSGIEnvironment, start_response: StartResponse
    ) -> None:
        self.scope = RequestScope()
        # Teardown runs in this thread with no event loop: an async instance
        # (AsyncSession) could never be closed, so refuse to create one.
        self.scope._sync_only = True
        self.environ = environ
        self.server_start_response = start_response
        self.is_failure_status = middleware.is_failure_status
        self.started = False
        # The body sent instead of the app's when a before-response hook failed.
        self.replaced: bytes | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        scope = self.scope
        if self.replaced is not None:
            return _discard  # the client gets the 500 already handed to the server
        self.started = True
        code = _status_code(status)
        if self.is_failure_status(code):
            scope.fail(RequestFailed(f"the response status was {code}", status_code=code))
        elif scope._before_response and scope.failure is None:
            try:
                scope._run_before_response_sync()
            except Exception as exc:  # noqa: BLE001 - logged, and the client gets a 500
                # Nothing was sent yet: the server gets a 500 instead of the app's status.
                scope.fail(exc)
                self._log(
                    f"a before-response hook (the commit) failed; answered 500, not {status!r},",
                    exc,
                )
                self.replaced = _ERROR_BODY
                scope._response_started = True
                self.server_start_response(_ERROR_STATUS, list(_ERROR_HEADERS))
                return _discard
        scope._response_started = True
        if exc_info is None:
            return self.server_start_response(status, headers)
        return self.server_start_response(status, headers, exc_info)

    def teardown(self) -> None:
        scope = self.scope
        if not self.started and scope.failure is None:
            scope.fail(RequestFailed("the app returned without calling start_response"))
        if scope._close_if_nothing_to_tear_down():
            return
        for err in scope.close():
            self._log("teardown failed", err)

    def _log(self, what: str, err: BaseException) -> None:
        logger.error(
            "%s in %s %s (request outcome: %s)",
            what,
            self.environ.get("REQUEST_METHOD", "?"),
            self.environ.get("PATH_INFO", ""),
            "success" if self.scope.failure is None else repr(self.scope.failure),
            exc_info=err,
        )


class _ScopedBody:
    """The response body: iterated inside the request's scope, which ``close()`` tears down."""

    __slots__ = ("_closed", "_exhausted", "_iterator", "_request", "_result")

    def __init__(self, request: _Request, result: Iterable[bytes]) -> None:
        self._request = request
        self._result = result
        self._iterator: Iterator[bytes] | None = None
        self._exhausted = False
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        request = self._request
        if request.replaced is not None:
            return self._next_replacement()
        token = _current.set(request.scope)
        try:
            if self._iterator is None:
                self._iterator = iter(self._result)  # may run app code (Django's streaming)
            chunk = next(self._iterator)
        except StopIteration:
            self._exhausted = True
            raise
        except BaseException as exc:
            request.scope.fail(exc)
            raise
        finally:
            _current.reset(token)
        if self._replaced():  # start_response was called in the first iteration
            return self._next_replacement()
        return chunk

    def _replaced(self) -> bool:
        return self._request.replaced is not None

    def _next_replacement(self) -> bytes:
        body, self._request.replaced = self._request.replaced, b""
        if not body:
            self._exhausted = True
            raise StopIteration
        return body

    def close(self) -> None:
        """Close the app's body, then tear the scope down: once, however often it is called."""
        if self._closed:
            return
        self._closed = True
        request = self._request
        scope = request.scope
        if not self._exhausted and scope.failure is None:
            scope.fail(RequestFailed("the server stopped sending the response body: the client disconnected"))
        token = _current.set(scope)
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                try:
                    close()  # the app's own cleanup (Flask's call_on_close, Django's request_finished)
                except BaseException as exc:
                    scope.fail(exc)
                    raise
        finally:
            try:
                request.teardown()
            finally:
                _current.reset(token)


def _status_code(status: str) -> int:
    try:
        return int(status.split(None, 1)[0])
    except (ValueError, IndexError):
        raise ValueError(
            f"start_response() was called with the status {status!r}; a WSGI status is a code and a "
            "reason phrase, such as '200 OK'"
        ) from None
