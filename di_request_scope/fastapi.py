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

Faster still, :func:`inject` keeps the injected parameters away from FastAPI
altogether, so no ``Depends`` is needed::

    from dependency_injector.wiring import Provide
    from di_request_scope.fastapi import inject

    @app.get("/")
    @inject
    async def index(session: Session = Provide[Container.session]): ...
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast, get_args, get_origin

from dependency_injector import wiring

__all__ = ["Closing", "Provide", "Provider", "inject"]

F = TypeVar("F", bound=Callable[..., Any])
# Classes at runtime; the stubs type them as marker instances.
_MARKERS = cast("tuple[type, ...]", (wiring.Provide, wiring.Provider, wiring.Closing))


def _is_injected(parameter: inspect.Parameter) -> bool:
    """A ``Provide[...]`` default or ``Annotated`` mark, bare or in ``Depends(...)``."""
    if get_origin(parameter.annotation) is Annotated:
        candidates: tuple[Any, ...] = get_args(parameter.annotation)[1:]
    else:
        candidates = (parameter.default,)
    return any(isinstance(getattr(c, "dependency", c), _MARKERS) for c in candidates)


def inject(func: F) -> F:
    """dependency-injector's ``@inject``, with the injected parameters hidden from FastAPI.

    FastAPI then solves no dependency per injected parameter and runs no marker in
    its threadpool: ``@inject``'s own wrapper resolves them, on the event loop for an
    ``async def`` endpoint and in FastAPI's worker thread, with the endpoint, for a
    ``def`` one. Mark parameters as dependency-injector does outside FastAPI
    (``service: Service = Provide[Container.service]`` or
    ``Annotated[Service, Provide[Container.service]]``); ``Depends(Provide[...])``
    works too. The module must be wired, as for ``@inject``.

    .. versionadded:: 0.2.0
    """
    # Evaluated annotations (``from __future__ import annotations`` makes them strings), so
    # @inject finds ``Annotated`` markers and FastAPI reads the hidden signature as is.
    signature = inspect.signature(func, eval_str=True)
    func.__signature__ = signature  # type: ignore[attr-defined]
    patched = _resolving(func, wiring.inject(func))
    kept = [parameter for parameter in signature.parameters.values() if not _is_injected(parameter)]
    patched.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    return cast(F, patched)


def _resolving(func: Callable[..., Any], patched: Callable[..., Any]) -> Callable[..., Any]:
    """``patched`` (``wiring.inject``'s wrapper) redone as a plain wrapper that resolves the injections.

    Wiring still binds the providers (``container.wire()``, ``unwire()``) on the
    record it keeps for ``patched``, now registered for the new wrapper as well;
    the wrapper reads that record on each call. This saves
    dependency-injector's resolver object and its two coroutines per call, about 1%
    of a small request. Anything else keeps ``patched``'s own way: ``Closing``
    markers, an async generator, a dependency-injector that keeps no such record.
    """
    registry = getattr(wiring, "_patched_registry", None)
    if registry is None:
        return patched
    record = registry.get_callable(patched)
    if record is None or not all(hasattr(record, name) for name in ("injections", "closing")):
        return patched
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def resolving(*args: Any, **kwargs: Any) -> Any:
            if record.closing:
                return await patched(*args, **kwargs)
            waiting: list[tuple[str, Any]] | None = None
            for name, provider in record.injections.items():  # read per call: wiring replaces it
                if name not in kwargs or isinstance(kwargs[name], _MARKERS):
                    value = provider()
                    if inspect.isawaitable(value):  # an async provider
                        if waiting is None:
                            waiting = []
                        waiting.append((name, value))
                    else:
                        kwargs[name] = value
            if waiting is not None:  # as dependency-injector does: together, each in a task of its own
                values = await asyncio.gather(*(awaitable for _, awaitable in waiting))
                kwargs.update(zip((name for name, _ in waiting), values, strict=True))
            return await func(*args, **kwargs)

    elif inspect.isfunction(func) and not inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        def resolving(*args: Any, **kwargs: Any) -> Any:
            if record.closing:
                return patched(*args, **kwargs)
            for name, provider in record.injections.items():
                if name not in kwargs or isinstance(kwargs[name], _MARKERS):
                    kwargs[name] = provider()
            return func(*args, **kwargs)

    else:
        return patched
    # Registered as the record's callable too, so wiring a module that imports the
    # function from elsewhere (``wire(modules=[app.api])``) finds and binds it.
    record.patched = resolving
    registry.register_callable(record)
    return resolving


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
