"""Litestar dependencies backed by dependency-injector providers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from litestar.di import Provide


def provide(provider: Callable[[], Any]) -> Provide:
    """Hand a provider to Litestar's dependency injection: ``{"service": provide(container.service)}``.

    Litestar reads a dependency's signature, and a provider has none, so it is wrapped
    in a function. An async one: Litestar awaits it on the event loop, never in a worker
    thread (creating a session does no I/O), and it serves async providers (an
    ``AsyncSession``) as well as sync ones.
    """

    async def dependency() -> Any:
        instance = provider()
        return await instance if inspect.isawaitable(instance) else instance

    return Provide(dependency)
