"""A real request scope for dependency-injector: one instance per request, torn down by its outcome."""

from ._observe import LoggingObserver, Observation, ScopeObserver, observe
from ._provider import RequestScoped
from ._scope import RequestScope, current_scope, request_scope
from ._validation import check_scopes, find_captive_dependencies
from .asgi import RequestScopeMiddleware, container_lifespan
from .exceptions import (
    CaptiveDependencyError,
    NoRequestScopeError,
    RequestFailed,
    RequestScopeError,
    ScopeMisuseError,
    TeardownError,
)
from .wsgi import RequestScopeWSGIMiddleware

__version__ = "0.1.0"

__all__ = [
    "CaptiveDependencyError",
    "LoggingObserver",
    "NoRequestScopeError",
    "Observation",
    "RequestFailed",
    "RequestScope",
    "RequestScopeError",
    "RequestScopeMiddleware",
    "RequestScopeWSGIMiddleware",
    "RequestScoped",
    "ScopeMisuseError",
    "ScopeObserver",
    "TeardownError",
    "__version__",
    "check_scopes",
    "container_lifespan",
    "current_scope",
    "find_captive_dependencies",
    "observe",
    "request_scope",
]
