"""FastAPI markers that inject without a threadpool hop.

dependency-injector's ``Provide[...]`` marker is a synchronous callable, so FastAPI
calls every ``Depends(Provide[...])`` in its threadpool: one thread hop per
injected parameter, which costs more than the whole rest of the request. The
markers here are drop-in replacements whose ``__call__`` is a coroutine, so
FastAPI awaits them on the event loop; ``@inject`` then injects exactly as before::

    from di_request_scope.fastapi import Provide

    @app.get("/")
    @inject
    async def index(session: Session = Depends(Provide[Container.session])): ...

They are dependency-injector markers (subclasses), so everything else, wiring
included, works unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dependency_injector import wiring

__all__ = ["Closing", "Provide", "Provider"]

if TYPE_CHECKING:
    from dependency_injector.wiring import Closing, Provide, Provider
else:

    class Provide(wiring.Provide):
        """``Provide[...]`` that FastAPI awaits on the event loop."""

        async def __call__(self) -> Provide:
            return self

    class Provider(wiring.Provider):
        """``Provider[...]`` (injects the provider itself) that FastAPI awaits on the event loop."""

        async def __call__(self) -> Provider:
            return self

    class Closing(wiring.Closing):
        """``Closing[...]`` that FastAPI awaits on the event loop."""

        async def __call__(self) -> Closing:
            return self
