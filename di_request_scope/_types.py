"""ASGI type aliases, copied from Starlette's ``starlette/types.py`` so the core needs no Starlette."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# What the middleware wraps and how it is called, typed loosely: any framework's app, whatever
# its own ASGI types (Litestar's are TypedDicts, which mypy does not take as MutableMappings).
AnyASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
