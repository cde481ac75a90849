"""Small generic helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

import redis

from presence_client.sdk import Event, FriendEvent, PresenceClient, StatusEvent

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


DAEMON_BOOKKEEPING_RE: Final = re.compile(
    r"presence:owners|presence:owner:\{[^}]*\}:(lease|marker)"
)
"""Keys a live daemon rewrites on its own, whatever datagrams arrive: its lease, its
marker and the set of owners. Everything else in Redis is state datagrams may change."""


def is_daemon_bookkeeping(key: str) -> bool:
    return DAEMON_BOOKKEEPING_RE.fullmatch(key) is not None


def redis_state(url: str) -> dict[str, object]:
    """Every key in the Redis at ``url`` but the daemons' bookkeeping, with its value
    (hash, set, sorted set, list or string), for before/after comparisons."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        state: dict[str, object] = {}
        for key in sorted(client.scan_iter()):
            if is_daemon_bookkeeping(key):
                continue
            kind = client.type(key)
            value: object
            if kind == "hash":
                value = client.hgetall(key)
            elif kind == "set":
                value = sorted(client.smembers(key))
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "string":
                value = client.get(key)
            else:
                value = f"<{kind!r}>"
            state[key] = value
        return state
    finally:
        client.close()


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the first non-empty ``{...}``, else all."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


class ManualClock:
    """A wall clock that stands still until the test moves it on. A Presence built with
    it (``Presence(clock=...)``) sees ``now()`` = this + the offset to Redis's clock
    measured at start(), so every now_ms it passes to the scripts moves only with it."""

    def __init__(self) -> None:
        self.seconds = time.time()

    def __call__(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


class Watched:
    """A PresenceClient and every event it emitted, in order."""

    def __init__(self, client: PresenceClient) -> None:
        self.client = client
        self.events: list[Event] = []
        client.add_listener(self.events.append)

    @property
    def user(self) -> str:
        return self.client.user

    @property
    def friends(self) -> dict[str, bool]:
        return self.client.friends

    def friend_events(self, name: str | None = None) -> list[FriendEvent]:
        return [
            e
            for e in self.events
            if isinstance(e, FriendEvent) and (name is None or e.name == name)
        ]

    def seen(self, name: str) -> list[bool]:
        """The online values of the FriendEvents about ``name``, in order."""
        return [e.online for e in self.friend_events(name)]

    def statuses(self) -> list[str]:
        return [e.status for e in self.events if isinstance(e, StatusEvent)]
