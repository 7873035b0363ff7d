"""OpenTelemetry: what each request scope did, on the request's span and a teardown span.

``pip install di-request-scope[opentelemetry]``, then at startup::

    from di_request_scope import observe
    from di_request_scope.opentelemetry import OpenTelemetryObserver

    observe(OpenTelemetryObserver())

The observer writes on the span that is current when the scope opens: the
request span of ``opentelemetry-instrumentation-asgi`` (FastAPI's and
Starlette's instrumentations use it) when that middleware sits outside
:class:`~di_request_scope.RequestScopeMiddleware`, or a job's span around
``request_scope()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, TracerProvider

from . import __version__
from ._observe import ScopeObserver
from ._scope import RequestScope
from .exceptions import RequestFailed

__all__ = ["OpenTelemetryObserver"]

_PREFIX = "di_request_scope."


class _ScopeState:
    __slots__ = ("owner", "providers", "span", "teardown")

    def __init__(self, span: Span | None, owner: bool) -> None:
        self.span = span
        # False for a scope nested in another on the same span (a per-message
        # WebSocket scope, a request_scope() inside a request): it adds events
        # and teardown spans, and leaves the span's attributes to the outer scope.
        self.owner = owner
        self.providers: list[str] = []
        self.teardown: Span | None = None


class OpenTelemetryObserver(ScopeObserver):
    """Record each request scope on the current span, and its teardown as spans of its own.

    On the span current when the scope opened (the request span), as the
    request runs: a ``di_request_scope.instance_created`` event per instance,
    ``di_request_scope.instances`` (how many) and ``di_request_scope.providers``
    (which); when the scope fails, ``di_request_scope.outcome`` = ``"failure"``,
    ``di_request_scope.failure`` (the failure's type name) and, for
    :class:`~di_request_scope.RequestFailed`, ``di_request_scope.failure.reason``
    ("the response status was 409").

    Teardown runs after the response, and ASGI instrumentation ends the request
    span with the last body chunk, so what only teardown knows goes on a child
    span ``di_request_scope teardown``: the outcome (``"success"`` or
    ``"failure"``), the failure, ``di_request_scope.teardown_errors``, an error
    status if a step raised, and a child span ``teardown <provider>`` per step
    (commit or rollback, then close) with its exception. A span still open when
    the scope closes (a job's) gets the outcome and the teardown error count too.

    Args:
        tracer_provider: Where teardown spans go; the global provider by default.
        teardown_spans: False to record no teardown span.

    .. versionadded:: 0.2.0
    """

    def __init__(self, *, tracer_provider: TracerProvider | None = None, teardown_spans: bool = True) -> None:
        self._tracer = trace.get_tracer("di_request_scope", __version__, tracer_provider=tracer_provider)
        self._teardown_spans = teardown_spans
        self._lock = threading.Lock()
        # The spans an open scope writes its attributes on, so a nested scope does not overwrite them.
        self._owned: set[int] = set()

    def _claim(self, span: Span) -> bool:
        with self._lock:
            if id(span) in self._owned:
                return False
            self._owned.add(id(span))
            return True

    def _state(self, scope: RequestScope) -> _ScopeState:
        state: _ScopeState | None = scope.info.get(self)
        if state is None:
            state = scope.info[self] = _ScopeState(None, owner=False)
        return state

    def scope_opened(self, scope: RequestScope) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            scope.info[self] = _ScopeState(span, self._claim(span))
        else:  # perhaps RequestScopeMiddleware sits outside the instrumentation: see instance_created
            scope.info[self] = _ScopeState(None, owner=False)

    def instance_created(self, scope: RequestScope, provider: str, instance: object) -> None:
        state = self._state(scope)
        state.providers.append(provider)
        span = state.span
        if span is None:
            # The scope opened outside any span; the code creating instances may run in one.
            span = trace.get_current_span()
            if not span.is_recording():
                return
            state.span, state.owner = span, self._claim(span)
        if not span.is_recording():
            return
        span.add_event(_PREFIX + "instance_created", {_PREFIX + "provider": provider})
        if state.owner:
            span.set_attribute(_PREFIX + "instances", len(state.providers))
            span.set_attribute(_PREFIX + "providers", state.providers)

    def scope_failed(self, scope: RequestScope, failure: BaseException) -> None:
        state = self._state(scope)
        if state.owner and state.span is not None and state.span.is_recording():
            _set_outcome(state.span, failure)

    def instance_finalized(
        self, scope: RequestScope, provider: str, duration: float, error: BaseException | None
    ) -> None:
        state = self._state(scope)
        if not self._teardown_spans or state.span is None:
            return
        end = time.time_ns()
        start = end - int(duration * 1e9)
        if state.teardown is None:  # teardown began with this step
            state.teardown = self._tracer.start_span(
                "di_request_scope teardown", context=trace.set_span_in_context(state.span), start_time=start
            )
        step = self._tracer.start_span(
            f"teardown {provider}",
            context=trace.set_span_in_context(state.teardown),
            start_time=start,
            attributes={_PREFIX + "provider": provider},
        )
        if error is not None:
            step.record_exception(error)
            step.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        step.end(end_time=end)

    def scope_closed(self, scope: RequestScope, errors: Sequence[BaseException]) -> None:
        state = scope.info.pop(self, None)
        if state is None:
            return
        teardown_errors = len(errors)
        if state.teardown is not None:
            teardown = state.teardown
            _set_outcome(teardown, scope.failure)
            teardown.set_attribute(_PREFIX + "instances", len(state.providers))
            teardown.set_attribute(_PREFIX + "teardown_errors", teardown_errors)
            if teardown_errors:
                teardown.set_status(Status(StatusCode.ERROR, f"{teardown_errors} teardown step(s) raised"))
            teardown.end()
        span = state.span
        if span is None or not state.owner:
            return
        with self._lock:
            self._owned.discard(id(span))
        if span.is_recording():  # a job's span; a request span has usually ended with the response
            _set_outcome(span, scope.failure)
            span.set_attribute(_PREFIX + "teardown_errors", teardown_errors)


def _set_outcome(span: Span, failure: BaseException | None) -> None:
    span.set_attribute(_PREFIX + "outcome", "success" if failure is None else "failure")
    if failure is not None:
        span.set_attribute(_PREFIX + "failure", type(failure).__name__)
        if isinstance(failure, RequestFailed):
            span.set_attribute(_PREFIX + "failure.reason", failure.reason)
