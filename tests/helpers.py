"""Small initializers shared by the provider and scope tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any


def recording_generator(log: list[Any], name: str) -> Callable[[], Iterator[str]]:
    """A generator initializer logging (name, failure) at teardown."""

    def gen() -> Iterator[str]:
        try:
            yield name
        except BaseException as exc:
            log.append((name, exc))
            raise
        log.append((name, None))

    return gen


def recording_async_generator(log: list[Any], name: str) -> Callable[[], AsyncIterator[str]]:
    """The async twin of :func:`recording_generator`."""

    async def gen() -> AsyncIterator[str]:
        try:
            yield name
        except BaseException as exc:
            log.append((name, exc))
            raise
        log.append((name, None))

    return gen
