"""Finding captive dependencies: a long-lived provider that would keep one request's instance.

A ``Singleton`` (or a ``Resource``, or anything else created once) that depends,
directly or through factories, on a ``RequestScoped`` provider is created during
the first request that needs it and keeps that request's instance, a session
already closed, for every later request. dependency-injector cannot see this;
the graph of providers can.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from dependency_injector import providers

from ._provider import RequestScoped
from .exceptions import CaptiveDependencyError

__all__ = ["check_scopes", "find_captive_dependencies"]

# Declarative container class -> (request-scoped provider's name, captured path) pairs.
_checked: weakref.WeakKeyDictionary[type, list[tuple[str, str]]] = weakref.WeakKeyDictionary()


def _lives_long(provider: providers.Provider[Any]) -> bool:
    """Created once and kept: every singleton but the context-local one, and resources."""
    if isinstance(provider, (providers.ContextLocalSingleton, providers.ContextLocalResource)):
        return False  # one per context: a request's task gets its own
    return isinstance(provider, (providers.BaseSingleton, providers.Resource))


def _passes_the_provider(provider: providers.Provider[Any]) -> bool:
    """Injected as the provider itself (``.provider``, ``Delegated*``), called later, per use."""
    return isinstance(provider, providers.Delegate) or providers.is_delegated(provider)


def _provider_names(container: Any) -> dict[int, str]:
    names: dict[int, str] = {}
    if isinstance(container, type):
        prefix = container.__name__
    else:
        declared = getattr(container, "declarative_parent", None)
        prefix = declared.__name__ if declared is not None else type(container).__name__

    def walk(holder: Any, path: str) -> None:
        for attr, provider in holder.providers.items():
            names.setdefault(id(provider), f"{path}.{attr}")
            if isinstance(provider, providers.Container):
                walk(provider.container, f"{path}.{attr}")

    walk(container, prefix)
    return names


def _describe(provider: providers.Provider[Any], names: dict[int, str]) -> str:
    name = names.get(id(provider))
    if name is None:
        name = str(provider) if isinstance(provider, RequestScoped) else repr(provider)
    return f"{name} ({type(provider).__name__})"


def _captures(root: providers.Provider[Any]) -> Iterator[list[providers.Provider[Any]]]:
    """Paths from ``root`` to each RequestScoped provider it would resolve when it is created."""
    seen: set[int] = set()
    stack: list[list[providers.Provider[Any]]] = [[root]]
    while stack:
        path = stack.pop()
        for dependency in path[-1].related:
            if id(dependency) in seen or _passes_the_provider(dependency):
                continue
            seen.add(id(dependency))
            if isinstance(dependency, RequestScoped):
                yield [*path, dependency]
            elif not _lives_long(dependency):  # a long-lived dependency is reported on its own
                stack.append([*path, dependency])


def _find(container: Any) -> list[tuple[str, str]]:
    # Here, not at the top: dependency_injector.containers imports its wiring module, which
    # imports FastAPI when installed (~0.6 s), and pytest's plugin imports this package in
    # every session.
    from dependency_injector import containers

    if not isinstance(container, containers.Container) and not (
        isinstance(container, type) and issubclass(container, containers.DeclarativeContainer)
    ):
        raise TypeError(f"expected a dependency-injector container or container class, got {container!r}")
    names = _provider_names(container)
    found: list[tuple[str, str]] = []
    every: Iterator[providers.Provider[Any]] = getattr(container, "traverse")()  # noqa: B009 - untyped stub
    for provider in every:
        if _lives_long(provider):
            for path in _captures(provider):
                found.append((str(path[-1]), " -> ".join(_describe(p, names) for p in path)))
    return found


def find_captive_dependencies(container: Any) -> list[str]:
    """Describe every long-lived provider of ``container`` that would capture a request's instance.

    ``container`` is a container instance or a ``DeclarativeContainer`` class.
    Returns one line per captured path, empty when the container is sound.

    .. versionadded:: 0.2.0
    """
    return [path for _, path in _find(container)]


def captures_of(owner: type, name: str) -> list[str]:
    """The captured paths ending at ``owner``'s request-scoped provider ``name``; one walk per class."""
    found = _checked.get(owner)
    if found is None:
        found = _checked[owner] = _find(owner)
    return [path for captured, path in found if captured == name]


def check_scopes(container: Any) -> None:
    """Raise :class:`CaptiveDependencyError` if a long-lived provider depends on a request-scoped one.

    Run it in a test over the whole container (or call it at start-up): it
    finds what :class:`RequestScoped` otherwise reports only when such a
    provider is first resolved.

    Raises:
        CaptiveDependencyError: naming each long-lived provider and the
            request-scoped provider it would capture, with the path between them.

    .. versionadded:: 0.2.0
    """
    problems = find_captive_dependencies(container)
    if problems:
        raise CaptiveDependencyError(problems)
