"""The transition stream (issue 13): every transition decided by any daemon or library
instance is appended to one capped Redis Stream before it is confirmed told, and
``Presence.watch`` reads it, resumable by id, reporting a gap instead of skipping.

Real redis-server / Valkey Cluster, real daemon processes, real UDP clients (SDK).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from conftest import CLUSTER_NODE_TIMEOUT_MS
from daemons import DaemonFactory, daemon_factory_fixture  # noqa: F401
from helpers import ManualClock, wait_for
from presence_client.sdk import PresenceClient
from presence_daemon import keys
from presence_daemon.embedded import EmbeddedCluster
from presence_daemon.presence import (
    OUTBOX_GRACE,
    Presence,
    StreamEntry,
    StreamGap,
    Transition,
    redis_client,
    stop_tasks,
)

pytestmark = pytest.mark.backends  # every test runs on one Redis and on a Valkey Cluster

STREAM = keys.TRANSITIONS_STREAM
REQUEST_TIMEOUT = 0.2

MakePresence = Callable[..., Awaitable[Presence]]


@pytest_asyncio.fixture
async def make_presence(redis_url: str) -> AsyncIterator[MakePresence]:
    """Library instances on the test's Redis (no lease: nothing reaps), closed at the end."""
    made: list[Presence] = []

    async def make(**kwargs: Any) -> Presence:
        kwargs.setdefault("lease_ttl", None)
        p = Presence(redis_client(redis_url), **kwargs)
        await p.start()
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            await p.close()


async def take(entries: AsyncIterator[StreamEntry], n: int, timeout: float = 10.0) -> list[Any]:
    """The next ``n`` entries of a watch (bounded)."""

    async def collect() -> list[StreamEntry]:
        return [await anext(entries) for _ in range(n)]

    return await asyncio.wait_for(collect(), timeout)


def pairs(entries: list[StreamEntry]) -> list[tuple[str, bool]]:
    return [(e.transition.user, e.transition.online) for e in entries]


async def test_each_transition_is_appended_with_who_decided_it(make_presence: MakePresence) -> None:
    p = await make_presence(instance_id="lib-a")
    c1 = await p.connected("a1", "alice")
    await p.connected("a2", "alice")  # no transition: alice is online already
    await p.disconnected("a1", user="alice", token=c1.token)  # none: a2 is still there
    assert await p.disconnected("a2", user="alice")
    entries = await take(p.watch("0"), 2)
    assert pairs(entries) == [("alice", True), ("alice", False)]
    assert entries[0].transition == Transition("alice", True, c1.version)
    assert entries[1].transition.version > c1.version
    assert {(e.decided_by, e.retold) for e in entries} == {("lib-a", False)}
    assert entries[0].decided_ms <= entries[1].decided_ms
    assert entries[0].id < entries[1].id or len(entries[0].id) < len(entries[1].id)


async def test_watch_from_now_skips_what_came_before(make_presence: MakePresence) -> None:
    p = await make_presence()
    await p.connected("a1", "alice")
    watch = p.watch()
    first = asyncio.ensure_future(anext(watch))
    # The watch starts at some point after alice's entry: whatever it yields first is
    # one of the users connected from here on, never alice.
    n = 0

    async def started() -> bool:
        nonlocal n
        n += 1
        await p.connected(f"b{n}", f"bob{n}")
        return first.done()

    await wait_for(started, timeout=10, interval=0.05, what="an entry after alice's")
    assert first.result().transition.user.startswith("bob")
    await watch.aclose()


async def test_a_stream_cap_of_zero_appends_nothing(make_presence: MakePresence, r: Redis) -> None:
    p = await make_presence(stream_max_len=0)
    await p.connected("a1", "alice")
    assert await p.disconnected("a1")
    assert await r.exists(STREAM) == 0
    with pytest.raises(ValueError):
        await make_presence(stream_max_len=-1)


async def test_repeats_of_one_transition_are_dropped_by_the_iterator(
    make_presence: MakePresence, r: Redis
) -> None:
    p = await make_presence()
    c = await p.connected("a1", "alice")
    # The same transition told again (its first teller died before it confirmed).
    repeat: dict[Any, Any] = {"user": "alice", "online": 1, "version": c.version}
    repeat |= {"decided_ms": 1, "retold": 1}
    await r.xadd(STREAM, repeat)
    await p.connected("b1", "bob")
    entries = await take(p.watch("0"), 2)
    assert pairs(entries) == [("alice", True), ("bob", True)]


async def test_a_malformed_resume_id_is_refused(make_presence: MakePresence) -> None:
    p = await make_presence()
    with pytest.raises(ValueError, match="stream entry id"):
        await anext(p.watch("yesterday"))


async def test_a_consumer_resumes_after_a_restart_and_loses_nothing(
    daemon_factory: DaemonFactory, make_presence: MakePresence
) -> None:
    """Transitions decided by two real daemons; the consumer is stopped (its task
    cancelled) halfway, and a new one resumes from the last id it had."""
    d1, d2 = await asyncio.gather(daemon_factory.astart("d1"), daemon_factory.astart("d2"))
    consumer = await make_presence()
    users = [f"u{i}" for i in range(6)]

    async def cycle(user: str, index: int) -> None:
        daemon = (d1, d2)[index % 2]
        client = PresenceClient(user, [], servers=[daemon.address], request_timeout=REQUEST_TIMEOUT)
        await client.connect()
        await client.disconnect()

    got: list[StreamEntry] = []

    async def consume() -> None:
        async for entry in consumer.watch("0"):
            got.append(entry)

    task = asyncio.create_task(consume())
    await asyncio.gather(*(cycle(u, i) for i, u in enumerate(users)))
    await wait_for(lambda: len(got) >= 2 * len(users), timeout=10, what="first half read")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    first_half = list(got)
    # While nobody watches, more transitions, from both daemons.
    for _ in range(2):
        await asyncio.gather(*(cycle(u, i + 1) for i, u in enumerate(users)))
    resumed = await take(consumer.watch(first_half[-1].id), 4 * len(users))
    everything = first_half + resumed
    seen = {(e.transition.user, e.transition.version) for e in everything}
    assert len(seen) == len(everything) == 6 * len(users)  # no repeat, nothing missed
    for user in users:
        mine = [e for e in everything if e.transition.user == user]
        assert [e.transition.online for e in mine] == [True, False] * 3
        versions = [e.transition.version for e in mine]
        assert versions == sorted(versions)
        assert {e.decided_by for e in mine} == {"d1", "d2"}


async def test_resuming_after_an_entry_the_cap_trimmed_is_a_gap(
    make_presence: MakePresence, r: Redis
) -> None:
    p = await make_presence(stream_max_len=10)
    await p.connected("a1", "alice")
    [first] = await take(p.watch("0"), 1)
    for _ in range(150):  # (MAXLEN ~ trims whole nodes of 100 entries)
        await p.connected("a1", "alice")
        await p.disconnected("a1")
    assert await r.xlen(STREAM) < 301
    with pytest.raises(StreamGap) as gap:
        await anext(p.watch(first.id))
    assert gap.value.after == first.id


async def test_a_consumer_that_falls_behind_the_cap_gets_a_gap(
    make_presence: MakePresence,
) -> None:
    p = await make_presence(stream_max_len=10)
    await p.connected("a1", "alice")
    watch = p.watch("0")
    first = await take(watch, 1)
    for _ in range(150):
        await p.disconnected("a1")
        await p.connected("a1", "alice")
    with pytest.raises(StreamGap):
        await anext(watch)
    assert first


async def test_a_lost_stream_is_a_gap_not_a_silent_skip(
    make_presence: MakePresence, r: Redis
) -> None:
    p = await make_presence()
    await p.connected("a1", "alice")
    [first] = await take(p.watch("0"), 1)
    await r.delete(STREAM)  # as after a Redis that restarted empty
    await p.connected("b1", "bob")  # a new stream, with newer ids
    with pytest.raises(StreamGap):
        await anext(p.watch(first.id))


async def test_a_transition_is_confirmed_told_only_once_it_is_in_the_stream(
    make_presence: MakePresence, r: Redis
) -> None:
    """While the append fails, the outbox entry stays (so any later call, or the retry,
    tells it again); once the append works, it is in the stream and confirmed."""
    p = await make_presence()
    await r.set(STREAM, "not a stream")  # every XADD now fails (WRONGTYPE)
    c = await p.connected("a1", "alice")
    assert c.went_online
    await wait_for(lambda: p.fan_out_failures >= 3, timeout=10, what="retries failed")
    assert await r.get(keys.pending_key("alice")) is not None  # not confirmed
    await r.delete(STREAM)
    await wait_for(_gone(r, keys.pending_key("alice")), timeout=10, what="outbox confirmed")
    [entry] = await take(p.watch("0"), 1)
    assert entry.transition == Transition("alice", True, c.version)


def _gone(r: Redis, key: str) -> Callable[[], Awaitable[bool]]:
    async def gone() -> bool:
        return not await r.exists(key)

    return gone


async def test_a_transition_whose_decider_died_is_appended_when_told_again(
    redis_url: str, make_presence: MakePresence, r: Redis
) -> None:
    clock = ManualClock()
    p = await make_presence(clock=clock, instance_id="lib-b")
    # alice's connect ran in Redis; its caller died before telling (or appending) it.
    decided = round(p.now() * 1000)
    args: list[str | int] = ["a1", f"{'aa' * 16}|d0|", decided, 0, "connect", 0]
    status, went_online, version, _, _ = await p.scripts.call(
        r, "connect", keys.user_keys("alice"), args
    )
    assert (status, went_online) == (1, 1)
    assert await r.exists(STREAM) == 0
    clock.advance(OUTBOX_GRACE + 1)
    # The next call that touches alice (without deciding one of its own) tells it, and
    # appends it before confirming it.
    again = await p.connected("a2", "alice")
    assert not again.went_online
    [entry] = await take(p.watch("0"), 1)
    assert (entry.transition, entry.retold) == (Transition("alice", True, version), True)
    assert (entry.decided_ms, entry.decided_by) == (decided, "lib-b")
    assert await r.exists(keys.pending_key("alice")) == 0


async def test_a_watch_ends_when_its_instance_closes(redis_url: str) -> None:
    p = Presence(redis_client(redis_url), lease_ttl=None)
    await p.start()
    got: list[StreamEntry] = []

    async def consume() -> None:
        async for entry in p.watch("0"):
            got.append(entry)

    task = asyncio.create_task(consume())
    await p.connected("a1", "alice")
    await wait_for(lambda: bool(got), timeout=10, what="alice's entry")
    await p.close()
    await asyncio.wait_for(task, 10)  # ended by itself, not cancelled
    assert pairs(got) == [("alice", True)]


async def test_an_untold_transition_replaced_by_the_next_one_still_reaches_the_stream(
    make_presence: MakePresence, r: Redis
) -> None:
    """The decider of alice's online died before telling it; her next change (offline)
    is decided before anyone told the online again: both reach the stream, in order."""
    p = await make_presence(instance_id="lib-c")
    decided = round(p.now() * 1000)
    token = "aa" * 16
    args: list[str | int] = ["a1", f"{token}|d0|", decided, 0, "connect", 0]
    _, went_online, version, _, _ = await p.scripts.call(
        r, "connect", keys.user_keys("alice"), args
    )
    assert went_online == 1
    assert await p.disconnected("a1", user="alice", token=token)
    entries = await take(p.watch("0"), 2)
    assert [(e.transition.online, e.retold) for e in entries] == [(True, True), (False, False)]
    assert entries[0].transition.version == version < entries[1].transition.version
    assert entries[0].decided_ms == decided
    assert await r.exists(keys.pending_key("alice")) == 0  # the whole chain confirmed


async def test_the_outbox_keeps_a_bounded_chain_of_replaced_transitions(
    make_presence: MakePresence, r: Redis
) -> None:
    p = await make_presence()
    token = "aa" * 16
    for _ in range(40):  # decided, never told: each replaces the one before
        for mode in ("connect", "disconnect"):
            now = round(p.now() * 1000)
            if mode == "connect":
                args: list[str | int] = ["a1", f"{token}|d0|", now, 0, "connect", 0]
                await p.scripts.call(r, "connect", keys.user_keys("alice"), args)
            else:
                args = ["a1", token, now, 0]
                await p.scripts.call(r, "disconnect", keys.user_keys("alice"), args)
    value = str(await r.get(keys.pending_key("alice")) or "")
    assert 0 < len(value) <= 400
    parts = value.split(";")
    assert 10 <= len(parts) < 80
    versions = [int(part.split("|")[1]) for part in parts]
    assert versions == sorted(versions, reverse=True)  # newest first, oldest dropped
    # The next connect decides alice's online (the chain's oldest part may drop to make
    # room) and tells it all: each older transition, then the newest.
    c = await p.connected("a2", "alice")
    assert c.went_online
    entries: list[StreamEntry] = []
    async for entry in p.watch("0"):
        entries.append(entry)
        if entry.transition.version == c.version:
            break
    told = [e.transition.version for e in entries]
    assert len(told) >= 10
    assert told[:-1] == versions[: len(told) - 1][::-1]  # the newest of the older ones
    assert await r.exists(keys.pending_key("alice")) == 0


FAILOVER_WAIT = 30.0
"""Bound for a replica to take over (node timeout 1.5 s and an election; CI noise)."""


async def test_a_watch_follows_a_cluster_failover_of_the_stream_master() -> None:
    """The master serving the stream is SIGKILLed while a consumer watches; its replica
    takes over, and every transition decided after the takeover reaches the consumer,
    in order. (Entries the dead master acknowledged but had not yet replicated may be
    lost, as any Redis write is in a failover: if the consumer's own last entry is among
    them, the watch says so with StreamGap; the test accepts that and resumes.)"""
    with EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS) as c:
        p = Presence(redis_client(c.url), lease_ttl=None)
        await p.start()
        got: list[StreamEntry] = []
        gaps = 0

        async def consume() -> None:
            nonlocal gaps
            after = "0"
            while True:
                try:
                    async for entry in p.watch(after):
                        got.append(entry)
                        after = entry.id
                except StreamGap:
                    gaps += 1
                    after = "0"

        task = asyncio.create_task(consume())
        try:
            await p.connected("a1", "alice")
            await wait_for(lambda: len(got) == 1, timeout=10, what="alice's entry")
            victim = c.node_for_key(STREAM)
            c.kill(victim)
            await asyncio.to_thread(c.wait_healthy, FAILOVER_WAIT)
            assert c.node_for_key(STREAM).port != victim.port
            before = len(got)
            users = [f"u{i}" for i in range(5)]
            for user in users:  # (retried: the client may meet the failover first)
                await wait_for(_connects(p, user), timeout=FAILOVER_WAIT, interval=0.2)
            await wait_for(
                lambda: {e.transition.user for e in got[before:]} >= set(users),
                timeout=FAILOVER_WAIT,
                what="the transitions after the failover",
            )
            later = dict.fromkeys(e.transition.user for e in got[before:])
            assert [user for user in later if user != "alice"] == users
            assert gaps <= 1
        finally:
            await stop_tasks([task])
            await p.close()


def _connects(p: Presence, user: str) -> Callable[[], Awaitable[bool]]:
    async def connect() -> bool:
        try:
            await p.connected(f"{user}-1", user)
        except RedisError:
            return False
        return True

    return connect


async def test_a_malformed_entry_is_skipped(make_presence: MakePresence, r: Redis) -> None:
    p = await make_presence()
    await r.xadd(STREAM, {"user": "mallory", "online": "yes"})  # (no version)
    await p.connected("a1", "alice")
    [entry] = await take(p.watch("0"), 1)
    assert entry.transition.user == "alice"


async def test_an_outbox_part_without_its_decision_time_is_still_told(
    make_presence: MakePresence, r: Redis
) -> None:
    # An outbox value from before decision times were recorded: "online|version".
    await r.set(keys.pending_key("alice"), "0|5")
    p = await make_presence(instance_id="lib-a")
    c1 = await p.connected("a1", "alice")  # chains the old part behind its own
    assert c1.went_online
    entries = await take(p.watch("0"), 2)
    assert [(e.transition.online, e.transition.version, e.retold) for e in entries] == [
        (False, 5, True),
        (True, c1.version, False),
    ]
    assert entries[0].decided_ms == 0
    assert await r.get(keys.pending_key("alice")) is None  # confirmed told, whole
