"""The Lua scripts, loaded once at start-up and called by SHA.

Each script is a ``.lua`` file in this package's ``lua/`` folder and opens with its
contract (KEYS, ARGV, return value). :meth:`Scripts.load` sends every script with
``SCRIPT LOAD`` so a syntax error fails at boot, not on first use. Calls go out as
``EVALSHA``; after ``NOSCRIPT`` (Redis restarted or flushed its script cache) the
scripts are loaded again and only the failed calls are retried. Calls may go through a
:class:`~presence_daemon.batch.Batcher` (the library's hot paths do) or straight to a
client.

On a cluster ``SCRIPT LOAD`` goes to every master, and each script call to the master
that serves its keys' slot (every key of one call shares one hash tag). A replica
promoted by a failover, or a node added later, may not have the scripts: its first
call answers ``NOSCRIPT``, and the same reload-and-retry loads them on every master
the client knows then.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

from redis.exceptions import NoScriptError

from presence_daemon.batch import Batcher
from presence_daemon.store import Store

SCRIPT_NAMES: Final = (
    "connect",
    "disconnect",
    "friends",
    "fans",
    "peek",
    "claim",
    "release",
    "reap",
    "told",
    "settle",
    "synced",
    "lease",
    "stream",
)

Call = tuple[str, Sequence[str], Sequence[str | int]]
"""One script call: (script name, KEYS, ARGV)."""


def _read(name: str) -> str:
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """The service's Lua scripts, by name, bound to their SHA1."""

    def __init__(self) -> None:
        self.source: dict[str, str] = {name: _read(name) for name in SCRIPT_NAMES}
        self.sha: dict[str, str] = {
            name: hashlib.sha1(text.encode()).hexdigest() for name, text in self.source.items()
        }

    async def load(self, redis: Store | Batcher) -> None:
        """SCRIPT LOAD every script (on every master of a cluster); raises
        redis.ResponseError on a script that is broken."""
        for name, text in self.source.items():
            sha = await redis.script_load(text)
            if sha != self.sha[name]:  # pragma: no cover - Redis computes the same SHA1
                raise RuntimeError(f"Redis returned SHA {sha} for {name}.lua")

    async def call(
        self, redis: Store | Batcher, name: str, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """Run one script; reload the cache and retry once on NOSCRIPT."""
        command = ("EVALSHA", self.sha[name], len(keys), *keys, *args)
        try:
            return await redis.execute_command(*command)
        except NoScriptError:
            await self.load(redis)
            return await redis.execute_command(*command)

    def queue(self, pipe: Any, name: str, keys: Sequence[str], args: Sequence[str | int]) -> None:
        """Add one script call to a pipeline (its result may be a NoScriptError).

        Sent as a raw EVALSHA: redis-py's cluster pipeline refuses its ``evalsha()``
        method, yet routes a raw EVALSHA by its keys like any keyed command."""
        pipe.execute_command("EVALSHA", self.sha[name], len(keys), *keys, *args)

    async def call_many(self, redis: Store | Batcher, calls: Sequence[Call]) -> list[Any]:
        """Run many script calls in one pipeline (no transaction), results in order.

        Calls in a batch may touch different hash tags; each script stays atomic on its
        own keys. After NOSCRIPT only the calls that failed are sent again.
        """
        if not calls:
            return []
        results = await self._pipeline(redis, calls)
        failed = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if failed:
            await self.load(redis)
            retried = await self._pipeline(redis, [calls[i] for i in failed])
            for i, result in zip(failed, retried, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _pipeline(self, redis: Store | Batcher, calls: Sequence[Call]) -> list[Any]:
        if isinstance(redis, Batcher):
            return await redis.execute_many(
                [("EVALSHA", self.sha[name], len(keys), *keys, *args) for name, keys, args in calls]
            )
        pipe = redis.pipeline(transaction=False)
        for name, keys, args in calls:
            self.queue(pipe, name, keys, args)
        return list(await pipe.execute(raise_on_error=False))
