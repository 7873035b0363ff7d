"""Small initializers and waits shared by the provider and scope tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest


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


async def wait_for(event: asyncio.Event, *tasks: asyncio.Future[Any]) -> None:
    """Wait until ``event`` is set, failing at once (not hanging) if one of ``tasks`` ends first."""
    waiting = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiting, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    if waiting in done:
        return
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    for task in done:
        task.result()  # re-raise what ended it
    pytest.fail(f"a task ended before setting {event!r}")
