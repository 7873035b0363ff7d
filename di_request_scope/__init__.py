"""A real request scope for dependency-injector: one instance per request, torn down by its outcome."""

from ._provider import RequestScoped
from ._scope import RequestScope, current_scope, request_scope
from .asgi import RequestScopeMiddleware, container_lifespan
from .exceptions import (
    NoRequestScopeError,
    RequestFailed,
    RequestScopeError,
    ScopeMisuseError,
    TeardownError,
)

__version__ = "0.1.0"

__all__ = [
    "NoRequestScopeError",
    "RequestFailed",
    "RequestScope",
    "RequestScopeError",
    "RequestScopeMiddleware",
    "RequestScoped",
    "ScopeMisuseError",
    "TeardownError",
    "__version__",
    "container_lifespan",
    "current_scope",
    "request_scope",
]
