"""Small generic helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Predicate = Callable[[], bool | Awaitable[bool]]


async def wait_for(
    predicate: Predicate, timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> None:
    """Poll ``predicate`` (sync or async) every ``interval`` s until it is true.

    Fails the test with a clear message if it is still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"condition not met within {timeout} s: {name}")
        await asyncio.sleep(interval)


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the first non-empty ``{...}``, else all."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key
