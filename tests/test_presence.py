"""The Presence library against a real redis-server, with real concurrency.

Tests marked ``backends`` (the library API: connect, disconnect, query, friends, reap)
run on a Valkey Cluster too.

Several Presence instances (each its own Redis connection pool) act at once, as several
daemons would. Transitions are collected from every instance and ordered by version,
which Redis assigns atomically, so "exactly once" can be checked whatever the order in
which the instances happen to report them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from faults import TcpProxy
from helpers import ManualClock, wait_for
from presence_client.protocol import ErrorCode, FriendState, ProtocolError
from presence_daemon import keys
from presence_daemon.embedded import EmbeddedRedis
from presence_daemon.presence import (
    DEFAULT_LEASE_TTL,
    DEFAULT_REDIS_TIMEOUT,
    FENCE_MARGIN,
    OUTBOX_GRACE,
    Connection,
    Delivery,
    InstanceIdInUse,
    Presence,
    PresenceError,
    Replaced,
    Superseded,
    Transition,
    parse_inbox,
    redis_client,
)
from presence_daemon.store import Inbox, queue_publish

ROUNDS = 50
INSTANCES = 4
GRACE_MS = round(OUTBOX_GRACE * 1000)
"""The grace the library passes to connect.lua and disconnect.lua (ms)."""

MakePresence = Callable[..., Awaitable[Presence]]


@pytest_asyncio.fixture
async def make_presence(redis_url: str) -> AsyncIterator[MakePresence]:
    """Factory of started Presence instances on the test Redis; all closed at the end."""
    made: list[Presence] = []

    async def make(**kwargs: Any) -> Presence:
        presence = Presence.from_url(redis_url, **kwargs)
        made.append(presence)
        await presence.start()
        return presence

    yield make
    for presence in made:
        await presence.close()


@pytest_asyncio.fixture
async def presence(make_presence: MakePresence) -> Presence:
    return await make_presence(instance_id="p0")


class Recorder:
    """Collects the transitions of several instances."""

    def __init__(self, instances: Iterable[Presence]) -> None:
        self.transitions: list[Transition] = []
        for instance in instances:
            instance.subscribe(self._add)

    def _add(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def take(self) -> list[Transition]:
        taken, self.transitions = self.transitions, []
        return taken


def by_user(transitions: Iterable[Transition]) -> dict[str, list[Transition]]:
    """Transitions per user in the order Redis decided them (by version)."""
    result: dict[str, list[Transition]] = defaultdict(list)
    for t in transitions:
        result[t.user].append(t)
    for ts in result.values():
        ts.sort(key=lambda t: t.version)
    return dict(result)


def assert_alternating(transitions: Iterable[Transition], start_online: bool = True) -> None:
    """Per user: distinct versions, and online/offline strictly alternating."""
    for user, ts in by_user(transitions).items():
        versions = [t.version for t in ts]
        assert len(set(versions)) == len(versions), (user, ts)
        for i, t in enumerate(ts):
            assert t.online == (start_online == (i % 2 == 0)), (user, ts)


async def entries_of(r: Redis, user: str) -> dict[str, str]:
    """The user's clients hash, client id -> "token|owner|address"."""
    raw = await r.hgetall(keys.clients_key(user))
    return {str(k): str(v) for k, v in raw.items()}


async def assert_query_agrees(presence: Presence, transitions: Iterable[Transition]) -> None:
    last = {user: ts[-1].online for user, ts in by_user(transitions).items()}
    assert await presence.query(last) == last


def now_ms(presence: Presence) -> int:
    """The instance's "now" in ms, as it passes it to the scripts. Versions are seeded from
    it (every bump is max(old + 1, now)), so a version decided after this call is >= it."""
    return round(presence.now() * 1000)


async def redis_ms(r: Redis) -> int:
    """Redis's clock in ms (the clock fences are compared with)."""
    seconds, micros = await r.time()
    return seconds * 1000 + micros // 1000


# ---------------------------------------------------------------------------
# Basics


@pytest.mark.backends
async def test_connected_disconnected_query(presence: Presence) -> None:
    rec = Recorder([presence])
    assert await presence.query(["alice", "bob"]) == {"alice": False, "bob": False}
    before = now_ms(presence)
    c1 = await presence.connected("c1", "alice", address="1.2.3.4:5")
    assert c1.went_online and c1.version >= before and len(c1.token) == 32
    assert await presence.query(["alice", "bob"]) == {"alice": True, "bob": False}
    assert await presence.clients("alice") == {"c1": ("p0", "1.2.3.4:5")}
    c2 = await presence.connected("c2", "alice")
    # No change to how alice looks: the same version.
    assert not c2.went_online and c2.version == c1.version and c2.token != c1.token
    assert rec.take() == [Transition("alice", True, c1.version)]

    assert await presence.disconnected("c1", user="alice", token=c1.token) is True
    assert await presence.query(["alice"]) == {"alice": True}
    assert rec.take() == []
    assert await presence.disconnected("c2", user="alice", token=c2.token) is True
    assert await presence.query(["alice"]) == {"alice": False}
    [offline] = rec.take()
    assert offline == Transition("alice", False, offline.version)
    assert offline.version > c1.version  # one more change: a higher version
    # Idempotent: a second disconnect changes nothing.
    assert await presence.disconnected("c2", user="alice", token=c2.token) is False
    assert await presence.disconnected("c2") is False
    assert rec.take() == []
    assert await presence.query([]) == {}


@pytest.mark.backends
async def test_disconnected_by_client_id_alone(presence: Presence, r: Redis) -> None:
    rec = Recorder([presence])
    await presence.connected("dev", "alice")
    assert await r.exists(keys.client_key("dev")) == 1
    assert await presence.disconnected("dev") is True
    assert await presence.query(["alice"]) == {"alice": False}
    assert await r.exists(keys.client_key("dev")) == 0  # the binding is released
    assert [t.online for t in rec.take()] == [True, False]
    # With a user that does not hold the client id: nothing happens.
    await presence.connected("dev", "alice")
    assert await presence.disconnected("dev", user="bob") is False
    assert await presence.query(["alice"]) == {"alice": True}
    assert await presence.disconnected("dev", user="alice") is True


async def test_disconnect_of_unknown_client(presence: Presence) -> None:
    assert await presence.disconnected("ghost") is False
    assert await presence.disconnected("ghost", user="alice", token="00" * 16) is False
    await presence.connected("c1", "alice")
    assert await presence.disconnected("ghost", user="alice", token="00" * 16) is False
    assert await presence.query(["alice"]) == {"alice": True}


async def test_invalid_names_are_refused(presence: Presence) -> None:
    for client_id, user in (("a b", "alice"), ("c1", "{x}"), ("", "alice"), ("c1", "a|b")):
        with pytest.raises(ProtocolError) as info:
            await presence.connected(client_id, user)
        assert info.value.code is ErrorCode.INVALID_NAME
    with pytest.raises(ProtocolError) as info:
        await presence.set_friends("alice", ["ok", "not ok"])
    assert info.value.code is ErrorCode.INVALID_NAME
    assert await presence.query(["alice"]) == {"alice": False}
    assert await presence.friends("alice") == set()


async def test_transitions_iterator(presence: Presence) -> None:
    iterator = presence.transitions()
    first = asyncio.ensure_future(anext(iterator))
    await wait_for(lambda: len(presence._listeners) == 1, what="iterator subscribed")
    c1 = await presence.connected("c1", "alice")
    await presence.connected("c2", "alice")  # no transition
    await presence.disconnected("c1")
    c3 = await presence.connected("c3", "bob")
    await presence.disconnected("c2")
    assert await asyncio.wait_for(first, 5) == Transition("alice", True, c1.version)
    assert await asyncio.wait_for(anext(iterator), 5) == Transition("bob", True, c3.version)
    offline = await asyncio.wait_for(anext(iterator), 5)
    assert (offline.user, offline.online) == ("alice", False)
    assert offline.version > c1.version
    await iterator.aclose()  # type: ignore[attr-defined]
    assert presence._listeners == []


async def test_subscribe_and_unsubscribe(presence: Presence) -> None:
    seen: list[Transition] = []
    unsubscribe = presence.subscribe(seen.append)

    def broken(_: Transition) -> None:
        raise RuntimeError("a failing listener must not break the others")

    presence.subscribe(broken)
    c1 = await presence.connected("c1", "alice")
    assert seen == [Transition("alice", True, c1.version)]
    unsubscribe()
    await presence.disconnected("c1")
    assert seen == [Transition("alice", True, c1.version)]
    assert await presence.query(["alice"]) == {"alice": False}


# ---------------------------------------------------------------------------
# Client ids belong to one user at a time


@pytest.mark.backends
async def test_client_id_in_use_by_another_user(presence: Presence, r: Redis) -> None:
    rec = Recorder([presence])
    a = await presence.connected("shared", "alice")
    binding = await r.get(keys.client_key("shared"))
    with pytest.raises(PresenceError) as info:
        await presence.connected("shared", "bob")
    assert info.value.code is ErrorCode.CLIENT_ID_IN_USE
    # Nothing changed.
    assert await presence.query(["alice", "bob"]) == {"alice": True, "bob": False}
    assert await r.get(keys.client_key("shared")) == binding
    assert await presence.clients("alice") == {"shared": ("p0", "")}
    assert await r.exists(keys.clients_key("bob")) == 0
    assert rec.take() == [Transition("alice", True, a.version)]
    # Once alice lets go, bob may take it.
    assert await presence.disconnected("shared", user="alice", token=a.token) is True
    b = await presence.connected("shared", "bob")
    assert b.went_online
    assert await presence.query(["alice", "bob"]) == {"alice": False, "bob": True}
    assert await binding_of(r, "shared") == f"bob|{b.token}"


@pytest.mark.backends
async def test_concurrent_connects_of_one_client_id_for_two_users(
    instances: list[Presence], r: Redis
) -> None:
    # Regression: both claims could read the binding before either wrote it, and the
    # client id ended up connected for alice *and* bob.
    for i in range(100):
        p, q = instances[i % INSTANCES], instances[(i + 1) % INSTANCES]
        results = await asyncio.gather(
            p.connected("c", "alice"), q.connected("c", "bob"), return_exceptions=True
        )
        held = {user: await r.hexists(keys.clients_key(user), "c") for user in ("alice", "bob")}
        assert sum(held.values()) == 1, (i, held, results)
        winner = "alice" if held["alice"] else "bob"
        won, lost = results if winner == "alice" else results[::-1]
        assert isinstance(won, Connection), (i, results)
        assert isinstance(lost, PresenceError), (i, results)
        assert lost.code is ErrorCode.CLIENT_ID_IN_USE
        assert await binding_of(r, "c") == f"{winner}|{won.token}", i
        assert await p.query(["alice", "bob"]) == {
            "alice": winner == "alice",
            "bob": winner == "bob",
        }
        assert await q.disconnected("c", user=winner, token=won.token) is True
        assert await r.exists(keys.client_key("c")) == 0


async def binding_of(r: Redis, client_id: str) -> str | None:
    """The client id's binding as "user|token", without its claim time."""
    value = await r.get(keys.client_key(client_id))
    return None if value is None else str(value).rsplit("|", 1)[0]


async def test_stale_binding_is_taken_over(presence: Presence, r: Redis) -> None:
    # A binding whose session is gone (say its daemon died before releasing it), made
    # long ago.
    await r.set(keys.client_key("dev"), "alice|" + "ab" * 16 + "|1000")
    b = await presence.connected("dev", "bob")
    assert b.went_online
    assert await binding_of(r, "dev") == f"bob|{b.token}"


async def test_young_binding_without_entry_is_not_taken_over(presence: Presence, r: Redis) -> None:
    # A binding made just now with no entry yet looks like a connect in flight.
    now_ms = round(time.time() * 1000)
    await r.set(keys.client_key("dev"), f"alice|{'ab' * 16}|{now_ms}")
    with pytest.raises(PresenceError) as info:
        await presence.connected("dev", "bob")
    assert info.value.code is ErrorCode.CLIENT_ID_IN_USE
    assert await binding_of(r, "dev") == f"alice|{'ab' * 16}"
    assert await r.exists(keys.clients_key("bob")) == 0


# ---------------------------------------------------------------------------
# Exactly-once transitions under real concurrency


@pytest_asyncio.fixture
async def instances(make_presence: MakePresence) -> list[Presence]:
    return [await make_presence(instance_id=f"p{i}") for i in range(INSTANCES)]


async def test_concurrent_connect_and_disconnect_of_one_client(
    instances: list[Presence], r: Redis
) -> None:
    rec = Recorder(instances)
    everything: list[Transition] = []
    for i in range(ROUNDS):
        p, q = instances[i % INSTANCES], instances[(i + 1) % INSTANCES]
        token = f"{i:032x}"
        if i % 2:
            # The disconnect knows the session: it removes it or (if first) nothing.
            await asyncio.gather(
                p.connected("c", "alice", token=token),
                q.disconnected("c", user="alice", token=token),
            )
        else:
            # The disconnect looks the client id up.
            await asyncio.gather(p.connected("c", "alice", token=token), q.disconnected("c"))
        session = rec.take()
        # Per session: exactly one online; at most one offline.
        assert [t.online for t in session] in ([True], [True, False], [False, True]), session
        online = await r.hexists(keys.clients_key("alice"), "c")
        assert (await p.query(["alice"]))["alice"] == online
        assert len(session) == (1 if online else 2)
        everything += session
        if online:
            assert await q.disconnected("c") is True
            everything += rec.take()
        assert await r.exists(keys.client_key("c")) == 0
    assert_alternating(everything)
    assert len(everything) == 2 * ROUNDS
    assert await instances[0].query(["alice"]) == {"alice": False}


async def test_concurrent_connects_of_one_client(instances: list[Presence], r: Redis) -> None:
    rec = Recorder(instances)
    everything: list[Transition] = []
    for i in range(ROUNDS):
        token = f"{i:032x}"
        same_session = i % 2 == 0
        results = await asyncio.gather(
            *(
                p.connected("c", "alice", token=token if same_session else None)
                for p in instances[:2]
            )
        )
        assert sum(c.went_online for c in results) == 1
        session = rec.take()
        assert [t.online for t in session] == [True]
        entries = await entries_of(r, "alice")
        assert list(entries) == ["c"]
        winner = entries["c"].split("|")[0]
        assert winner in {c.token for c in results}
        everything += session
        if same_session:
            # One session: disconnecting the client id (registry lookup) ends it.
            assert await instances[2].disconnected("c") is True
        else:
            # Two sessions raced; the one whose entry is stored is ended with its token
            # (as its owner would). The registry lookup is not used here: see
            # test_disconnect_by_client_id_after_racing_connects.
            assert await instances[2].disconnected("c", user="alice", token=winner) is True
        assert await instances[0].query(["alice"]) == {"alice": False}
        everything += rec.take()
    assert_alternating(everything)
    assert len(everything) == 2 * ROUNDS


async def test_disconnect_by_client_id_after_racing_connects(presence: Presence, r: Redis) -> None:
    # Replay, step by step, an interleaving two concurrent connected("c", "alice")
    # calls really produce (seen a few times in 300 rounds with asyncio.gather): both
    # claims, then the connect scripts in the opposite order.
    scripts, key = presence.scripts, keys.client_key("c")
    assert await scripts.call(r, "claim", [key], ["alice", "aa" * 16, 1, "", 0]) == ""
    assert await scripts.call(r, "claim", [key], ["alice", "bb" * 16, 2, "", 0]) == ""
    user_keys, now = keys.user_keys("alice"), now_ms(presence)
    for entry in (f"{'bb' * 16}|p1|", f"{'aa' * 16}|p0|"):
        await scripts.call(r, "connect", user_keys, ["c", entry, now, 0, "connect", GRACE_MS])
    assert await presence.query(["alice"]) == {"alice": True}
    assert await presence.disconnected("c") is True
    assert await presence.query(["alice"]) == {"alice": False}


async def test_concurrent_disconnects_of_one_client(instances: list[Presence]) -> None:
    rec = Recorder(instances)
    everything: list[Transition] = []
    for i in range(ROUNDS):
        c = await instances[i % INSTANCES].connected("c", "alice")
        with_token = i % 2 == 0
        removed = await asyncio.gather(
            *(
                p.disconnected("c", user="alice", token=c.token)
                if with_token
                else p.disconnected("c")
                for p in instances
            )
        )
        assert sorted(removed) == [False] * (INSTANCES - 1) + [True]
        session = rec.take()
        assert [t.online for t in session] == [True, False]
        everything += session
    assert_alternating(everything)
    assert await instances[0].query(["alice"]) == {"alice": False}


async def test_many_clients_of_one_user_concurrently(instances: list[Presence]) -> None:
    rec = Recorder(instances)
    everything: list[Transition] = []
    clients = [f"c{k}" for k in range(5)]
    for i in range(ROUNDS):
        connections = await asyncio.gather(
            *(instances[(i + k) % INSTANCES].connected(c, "alice") for k, c in enumerate(clients))
        )
        assert sum(c.went_online for c in connections) == 1
        went_online = rec.take()
        assert [t.online for t in went_online] == [True]
        assert set(await instances[0].clients("alice")) == set(clients)
        removed = await asyncio.gather(
            *(
                instances[(i + k + 1) % INSTANCES].disconnected(
                    c, user="alice", token=connections[k].token
                )
                for k, c in enumerate(clients)
            )
        )
        assert all(removed)
        went_offline = rec.take()
        assert [t.online for t in went_offline] == [False]
        assert await instances[0].query(["alice"]) == {"alice": False}
        everything += went_online + went_offline
    assert_alternating(everything)
    assert len(everything) == 2 * ROUNDS


@pytest.mark.backends
async def test_many_users_many_clients_concurrently(instances: list[Presence]) -> None:
    rec = Recorder(instances)
    users = [f"u{k}" for k in range(5)]
    for i in range(ROUNDS // 5):
        pairs = [(f"{u}-c{j}", u) for u in users for j in range(3)]
        conns = await asyncio.gather(
            *(instances[k % INSTANCES].connected(c, u) for k, (c, u) in enumerate(pairs))
        )
        assert await instances[i % INSTANCES].query(users) == dict.fromkeys(users, True)
        await asyncio.gather(
            *(
                instances[(k + i) % INSTANCES].disconnected(c, user=u, token=conn.token)
                for k, ((c, u), conn) in enumerate(zip(pairs, conns, strict=True))
            )
        )
        assert await instances[0].query(users) == dict.fromkeys(users, False)
    ts = rec.take()
    assert_alternating(ts)
    for user, per_user in by_user(ts).items():
        assert len(per_user) == 2 * (ROUNDS // 5), user
    await assert_query_agrees(instances[0], ts)


async def test_reconnect_right_after_disconnect(instances: list[Presence], r: Redis) -> None:
    rec = Recorder(instances)
    everything: list[Transition] = []
    old = await instances[0].connected("c", "alice")
    for i in range(ROUNDS):
        p, q = instances[i % INSTANCES], instances[(i + 1) % INSTANCES]
        if i % 2:
            # Sequential: disconnect, then the same client id comes back at once.
            assert await p.disconnected("c", user="alice", token=old.token) is True
            new = await q.connected("c", "alice")
            assert new.went_online
        else:
            # Concurrent: the old session's disconnect races the new session's connect.
            _, new = await asyncio.gather(
                p.disconnected("c", user="alice", token=old.token), q.connected("c", "alice")
            )
        # Either way the new session ends up connected and bound.
        assert await instances[2].query(["alice"]) == {"alice": True}
        entry = (await entries_of(r, "alice")).get("c")
        assert entry is not None and entry.startswith(new.token + "|")
        assert await binding_of(r, "c") == f"alice|{new.token}"
        everything += rec.take()
        old = new
    assert_alternating(everything)
    await assert_query_agrees(instances[0], everything)
    assert everything[-1].online


async def test_one_user_on_two_clients(instances: list[Presence]) -> None:
    rec = Recorder(instances)
    everything: list[Transition] = []
    for i in range(ROUNDS):
        a, b = await asyncio.gather(
            instances[i % INSTANCES].connected("phone", "alice"),
            instances[(i + 1) % INSTANCES].connected("laptop", "alice"),
        )
        assert a.went_online != b.went_online
        first, second = ("phone", a), ("laptop", b)
        if i % 2:
            first, second = second, first
        assert await instances[(i + 2) % INSTANCES].disconnected(first[0], token=first[1].token)
        assert await instances[0].query(["alice"]) == {"alice": True}
        assert [t.online for t in rec.transitions] == [True]
        assert await instances[(i + 3) % INSTANCES].disconnected(second[0])
        assert await instances[0].query(["alice"]) == {"alice": False}
        session = rec.take()
        assert [t.online for t in session] == [True, False]
        everything += session
    assert_alternating(everything)


@pytest.mark.backends
async def test_mixed_concurrent_operations_stay_consistent(
    instances: list[Presence], r: Redis
) -> None:
    """A free-for-all: connects and disconnects of several clients of two users at once."""
    rec = Recorder(instances)
    everything: list[Transition] = []
    clients = {"alice": ["a1", "a2"], "bob": ["b1", "b2", "b3"]}
    for i in range(ROUNDS):
        ops: list[Awaitable[object]] = []
        for k, (user, ids) in enumerate(sorted(clients.items())):
            for j, c in enumerate(ids):
                p = instances[(i + j + k) % INSTANCES]
                ops.append(p.connected(c, user) if (i + j) % 3 else p.disconnected(c))
                if (i + j) % 4 == 0:
                    ops.append(instances[(i + j + 1) % INSTANCES].disconnected(c))
        await asyncio.gather(*ops)
        everything += rec.take()
        assert_alternating(everything)
        last = {user: ts[-1].online for user, ts in by_user(everything).items()}
        for user, ids in clients.items():
            entries = await entries_of(r, user)
            assert await instances[0].query([user]) == {user: bool(entries)}
            assert last.get(user, False) == bool(entries)
            # The client-id binding and the clients hash agree on every session.
            for c in ids:
                binding = await binding_of(r, c)
                if c in entries:
                    assert binding == f"{user}|{entries[c].split('|')[0]}", c
                else:
                    assert binding is None, c
    assert_alternating(everything)
    await assert_query_agrees(instances[0], everything)


# ---------------------------------------------------------------------------
# Token guard


async def test_stale_disconnect_after_reconnect_removes_nothing(
    instances: list[Presence], r: Redis
) -> None:
    rec = Recorder(instances)
    old = await instances[0].connected("dev", "alice")
    new = await instances[1].connected("dev", "alice")  # same client, new session
    assert not new.went_online and new.token != old.token
    assert await instances[0].disconnected("dev", user="alice", token=old.token) is False
    assert await instances[0].query(["alice"]) == {"alice": True}
    assert await instances[0].clients("alice") == {"dev": ("p1", "")}
    assert await binding_of(r, "dev") == f"alice|{new.token}"
    assert new.version == old.version
    assert rec.take() == [Transition("alice", True, old.version)]
    assert await instances[1].disconnected("dev", user="alice", token=new.token) is True
    [offline] = rec.take()
    assert (offline.user, offline.online) == ("alice", False) and offline.version > old.version


# ---------------------------------------------------------------------------
# Deliveries: only symmetric friends


async def version_of(presence: Presence, user: str) -> int:
    return int(await presence.redis.get(keys.user_keys(user)[1]) or 0)


class Deliveries:
    """Records notifications; the "your list changed" ones (friend None) apart."""

    def __init__(self) -> None:
        self.records: list[Delivery] = []
        self.resyncs: list[Delivery] = []

    async def __call__(self, deliveries: list[Delivery]) -> None:
        self.records.extend(d for d in deliveries if d.friend is not None)
        self.resyncs.extend(d for d in deliveries if d.friend is None)

    def take(self) -> list[Delivery]:
        taken, self.records = self.records, []
        return taken


def friend_of(delivery: Delivery) -> FriendState:
    """What a notification tells (not a "your list changed" one)."""
    assert delivery.friend is not None, delivery
    return delivery.friend


def told(records: Iterable[Delivery]) -> set[tuple[str, str, bool]]:
    """(recipient client, friend name, online) of each delivery."""
    return {(d.client_id, d.friend.name, d.friend.online) for d in records if d.friend}


@pytest.mark.backends
async def test_a_list_change_makes_the_users_other_clients_resync(
    make_presence: MakePresence,
) -> None:
    # A NOTIFY cannot say "this name is no longer declared": the user's clients are
    # sent a resync (friend None: the daemon turns it into a sequence gap, so the
    # client fetches a snapshot), all but the client that made the change.
    record = Deliveries()
    p = await make_presence(deliver=record)
    await p.connected("a1", "alice")
    await p.connected("a2", "alice")
    await p.add_friends("alice", ["bob"], origin="a1")
    assert [(d.client_id, d.friend) for d in record.resyncs] == [("a2", None)]
    record.resyncs.clear()
    await p.remove_friends("alice", ["bob"])  # from no client (a backend): all of them
    assert sorted(d.client_id for d in record.resyncs) == ["a1", "a2"]
    record.resyncs.clear()
    await p.remove_friends("alice", ["bob"])  # nothing changed: nothing to learn
    assert record.resyncs == []


@pytest_asyncio.fixture
async def sink() -> Deliveries:
    return Deliveries()


@pytest_asyncio.fixture
async def pair(make_presence: MakePresence, sink: Deliveries) -> tuple[Presence, Presence]:
    """Two instances that share one delivery sink."""
    return (
        await make_presence(instance_id="d0", deliver=sink),
        await make_presence(instance_id="d1", deliver=sink),
    )


async def test_one_sided_friendship_delivers_nothing(
    pair: tuple[Presence, Presence], sink: Deliveries
) -> None:
    p, q = pair
    await p.set_friends("A", ["B"])  # B does not list A
    await p.connected("a1", "A")
    await q.connected("b1", "B")
    await p.connected("a2", "A")
    await q.disconnected("a1")
    await p.disconnected("a2")
    await p.connected("a1", "A")
    assert sink.take() == []
    # A sees B offline although B is online: the friendship is not mutual.
    assert await p.friend_view("A") == [FriendState("B", False, await version_of(p, "B"))]
    assert await p.friend_view("B") == []
    await q.disconnected("b1")
    await p.disconnected("a1")
    assert sink.take() == []


@pytest.mark.backends
async def test_mutual_friends_are_told_once_per_transition(
    pair: tuple[Presence, Presence], sink: Deliveries
) -> None:
    p, q = pair
    await p.set_friends("A", ["B"])
    await q.set_friends("B", ["A"])
    assert sink.take() == []  # nobody online
    a1 = await p.connected("a1", "A")
    assert sink.take() == []  # B has no clients to tell
    b1 = await q.connected("b1", "B")
    got = sink.take()
    assert got == [Delivery("d0", "a1", a1.token, FriendState("B", True, b1.version))]
    a2 = await q.connected("a2", "A")  # A was online already: nobody is told
    b2 = await p.connected("b2", "B")
    assert sink.take() == []
    assert await p.friend_view("A") == [FriendState("B", True, b1.version)]
    assert await p.friend_view("B") == [FriendState("A", True, a1.version)]

    assert await p.disconnected("a1") is True  # A still has a2
    assert sink.take() == []
    assert await q.disconnected("a2") is True
    got = sink.take()
    version_a = (await p.friend_view("B"))[0].version
    assert sorted(got, key=lambda d: d.client_id) == [
        Delivery("d1", "b1", b1.token, FriendState("A", False, version_a)),
        Delivery("d0", "b2", b2.token, FriendState("A", False, version_a)),
    ]
    assert version_a > a1.version
    assert a2.token not in {d.token for d in got}
    await q.disconnected("b1")
    await p.disconnected("b2")  # B offline; A has no clients left
    assert sink.take() == []


@pytest.mark.backends
async def test_friendship_becoming_and_ending_mutual_while_online(
    pair: tuple[Presence, Presence], sink: Deliveries
) -> None:
    p, q = pair
    await p.set_friends("A", ["B"])
    await p.connected("a1", "A")
    await q.connected("b1", "B")
    assert sink.take() == []

    await q.add_friends("B", ["A"])  # now mutual, both online
    got = sink.take()
    assert told(got) == {("a1", "B", True), ("b1", "A", True)}
    assert len(got) == 2
    view_a, view_b = await p.friend_view("A"), await p.friend_view("B")
    assert view_a == [FriendState("B", True, view_a[0].version)]
    assert view_b == [FriendState("A", True, view_b[0].version)]
    assert {d.friend for d in got} == {view_a[0], view_b[0]}

    await q.add_friends("B", ["A"])  # no change: nothing told
    assert sink.take() == []

    await q.remove_friends("B", ["A"])  # no longer mutual
    got = sink.take()
    assert told(got) == {("a1", "B", False), ("b1", "A", False)}
    assert len(got) == 2
    for d in got:
        # The news is newer than what the recipient saw when the friendship started.
        friend = friend_of(d)
        assert friend.version > {"A": view_b[0].version, "B": view_a[0].version}[friend.name]
    assert await p.friend_view("A") == [FriendState("B", False, got_version(got, "B"))]

    # Mutual again through set_friends; then A drops B with set_friends.
    await q.set_friends("B", ["A", "C"])
    assert told(sink.take()) == {("a1", "B", True), ("b1", "A", True)}
    await p.set_friends("A", [])
    assert told(sink.take()) == {("a1", "B", False), ("b1", "A", False)}


@pytest.mark.backends
async def test_concurrent_mutual_adds_while_both_online_tell_both(
    pair: tuple[Presence, Presence], sink: Deliveries
) -> None:
    # Regression: A adds B while B adds A. Each call read "is the other my fan?" before
    # the other's reverse index was written, so nobody was told although the friendship
    # became mutual with both online.
    p, q = pair
    for i in range(30):
        a, b = f"A{i}", f"B{i}"
        await p.connected(f"a{i}", a)
        await q.connected(f"b{i}", b)
        assert sink.take() == []
        await asyncio.gather(p.add_friends(a, [b]), q.add_friends(b, [a]))
        got = sink.take()
        assert told(got) == {(f"a{i}", b, True), (f"b{i}", a, True)}, (i, got)
        view_a, view_b = await p.friend_view(a), await q.friend_view(b)
        assert [(s.name, s.online) for s in view_a] == [(b, True)]
        assert [(s.name, s.online) for s in view_b] == [(a, True)]


def got_version(records: Iterable[Delivery], name: str) -> int:
    versions = {friend_of(d).version for d in records if friend_of(d).name == name}
    assert len(versions) == 1
    return versions.pop()


async def test_mutual_change_with_one_side_offline(
    pair: tuple[Presence, Presence], sink: Deliveries
) -> None:
    p, _ = pair
    await p.set_friends("A", ["B"])
    b1 = await p.connected("b1", "B")
    await p.add_friends("B", ["A"])  # A is offline: B sees no change, A has no clients
    assert sink.take() == []
    a1 = await p.connected("a1", "A")
    assert told(sink.take()) == {("b1", "A", True)}
    await p.remove_friends("A", ["B"])  # both online: both told
    assert told(sink.take()) == {("a1", "B", False), ("b1", "A", False)}
    assert a1.token and b1.token


@pytest.mark.backends
async def test_third_party_never_hears_anything(
    pair: tuple[Presence, Presence], sink: Deliveries
) -> None:
    p, q = pair
    await p.set_friends("A", ["B"])
    await q.set_friends("B", ["A"])
    await p.set_friends("C", ["A", "B"])  # C lists both; neither lists C
    await p.connected("c1", "C")
    await p.connected("a1", "A")
    await q.connected("b1", "B")
    await p.add_friends("A", ["D"])
    await q.remove_friends("B", ["A"])
    await q.add_friends("B", ["A", "C2"])
    await p.disconnected("c1")
    await q.connected("c1", "C")
    await p.disconnected("a1")
    await q.disconnected("b1")
    got = sink.take()
    assert got  # A and B did hear about each other
    assert {d.client_id for d in got} <= {"a1", "b1"}
    assert {friend_of(d).name for d in got} <= {"A", "B"}
    # C lists A and B, who were online at times, but never saw them online.
    assert [s.name for s in await p.friend_view("C")] == ["A", "B"]
    assert not any(s.online for s in await p.friend_view("C"))


# ---------------------------------------------------------------------------
# Versions


async def test_delivered_versions_increase(
    pair: tuple[Presence, Presence], sink: Deliveries
) -> None:
    p, q = pair
    await p.set_friends("A", ["B", "C"])
    await q.set_friends("B", ["A"])
    await q.set_friends("C", ["A"])
    await p.connected("a1", "A")
    await p.connected("a2", "A")
    script: list[Callable[[], Awaitable[object]]] = [
        lambda: q.connected("b1", "B"),
        lambda: q.connected("c1", "C"),
        lambda: p.disconnected("b1"),
        lambda: q.connected("b2", "B"),
        lambda: q.remove_friends("B", ["A"]),
        lambda: q.add_friends("B", ["A"]),
        lambda: p.set_friends("C", []),
        lambda: p.disconnected("b2"),
        lambda: q.set_friends("C", ["A"]),
        lambda: p.connected("b1", "B"),
        lambda: q.disconnected("c1"),
        lambda: q.connected("c2", "C"),
    ]
    for step in script:
        await step()
    got = sink.take()
    assert got
    # Per recipient and friend: strictly increasing, in the order they were delivered.
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    for d in got:
        seen[(d.client_id, friend_of(d).name)].append(friend_of(d).version)
    for key, versions in seen.items():
        assert versions == sorted(set(versions)), (key, versions)
    # Both of A's clients heard the same story.
    for name in ("B", "C"):
        assert seen[("a1", name)] == seen[("a2", name)]
    # The view shows the latest version delivered, with the latest status.
    latest = {friend_of(d).name: friend_of(d) for d in got if d.client_id == "a1"}
    assert await p.friend_view("A") == [latest["B"], latest["C"]]
    assert latest["B"].online and latest["C"].online


# ---------------------------------------------------------------------------
# Friend list limit


async def test_too_many_friends(make_presence: MakePresence, r: Redis) -> None:
    p = await make_presence(max_friends=3)
    await p.set_friends("A", ["B", "C", "D"])
    version = await r.get(keys.user_keys("A")[1])
    attempts: list[Callable[[], Awaitable[None]]] = [
        lambda: p.add_friends("A", ["E"]),  # refused by the script (3 + 1 > 3)
        lambda: p.set_friends("A", ["B", "C", "D", "E"]),  # refused before the script
        lambda: p.add_friends("A", ["E", "F", "G", "H"]),
    ]
    for attempt in attempts:
        with pytest.raises(PresenceError) as info:
            await attempt()
        assert info.value.code is ErrorCode.TOO_MANY_FRIENDS
        assert await p.friends("A") == {"B", "C", "D"}
        assert await r.get(keys.user_keys("A")[1]) == version
        assert await r.exists(keys.fans_key("E")) == 0
    # A connect that would set too many friends is refused and connects nothing.
    with pytest.raises(PresenceError) as info:
        await p.connected("a1", "A", friends=["B", "C", "D", "E"])
    assert info.value.code is ErrorCode.TOO_MANY_FRIENDS
    assert await p.query(["A"]) == {"A": False}
    assert await p.friends("A") == {"B", "C", "D"}
    # Within the limit everything works; removals are never refused.
    await p.set_friends("A", ["B", "E", "F"])
    assert await p.friends("A") == {"B", "E", "F"}
    assert await r.smembers(keys.fans_key("E")) == {"A"}
    assert await r.exists(keys.fans_key("C")) == 0
    await p.remove_friends("A", ["B", "X"])
    assert await p.friends("A") == {"E", "F"}
    assert (await p.connected("a1", "A", friends=["E", "F", "G"])).went_online


# ---------------------------------------------------------------------------
# Leases: the clients of an owner that died are disconnected by a survivor.


def die(presence: Presence) -> None:
    """Stop renewing the lease (and reaping) without a word, as a killed process would."""
    for task in presence._lease_tasks:
        task.cancel()


@pytest.mark.backends
async def test_clients_of_a_dead_owner_are_reaped_once(
    make_presence: MakePresence, r: Redis
) -> None:
    told: list[Delivery] = []

    async def record(deliveries: list[Delivery]) -> None:
        told.extend(deliveries)

    survivor = await make_presence(instance_id="survivor", deliver=record)
    doomed = await make_presence(instance_id="doomed", lease_ttl=0.3)
    rec = Recorder([survivor, doomed])
    await survivor.connected("b1", "bob", friends=["alice"])
    await doomed.connected("a1", "alice", friends=["bob"])
    await doomed.connected("a2", "alice")
    assert await r.smembers(keys.owned_key("doomed")) == {
        f"alice|a1|{(await entries_of(r, 'alice'))['a1'].split('|')[0]}",
        f"alice|a2|{(await entries_of(r, 'alice'))['a2'].split('|')[0]}",
    }
    assert await survivor.reap_dead() == 0  # the lease is held: nothing happens
    rec.take()
    told.clear()

    # The doomed owner stops renewing its lease without a word, as a killed process.
    die(doomed)

    async def lease_gone() -> bool:
        return not await r.exists(keys.lease_key("doomed"))

    await wait_for(lease_gone, what="the doomed owner's lease expires")
    assert await survivor.reap_dead() == 2
    assert await survivor.query(["alice", "bob"]) == {"alice": False, "bob": True}
    assert [(t.user, t.online) for t in rec.take()] == [("alice", False)]
    told_offline = [(d.client_id, friend_of(d).name, friend_of(d).online) for d in told]
    assert told_offline == [("b1", "alice", False)]
    # Nothing of the dead owner is left, and a second reap finds nothing.
    assert await r.exists(keys.owned_key("doomed")) == 0
    assert "doomed" not in await r.smembers(keys.OWNERS_KEY)
    assert await survivor.reap_dead() == 0


@pytest.mark.backends
async def test_a_client_that_moved_before_the_reap_is_left_alone(
    make_presence: MakePresence, r: Redis
) -> None:
    survivor = await make_presence(instance_id="survivor")
    doomed = await make_presence(instance_id="doomed", lease_ttl=0.3)
    rec = Recorder([survivor, doomed])
    await doomed.connected("a1", "alice")
    die(doomed)
    # The client fails over to the survivor, same client id, new session.
    moved = await survivor.connected("a1", "alice")
    assert not moved.went_online
    # The replaced entry left the dead owner's set; the new one is in the survivor's.
    assert await r.scard(keys.owned_key("doomed")) == 0
    assert await r.smembers(keys.owned_key("survivor")) == {f"alice|a1|{moved.token}"}

    async def lease_gone() -> bool:
        return not await r.exists(keys.lease_key("doomed"))

    await wait_for(lease_gone, what="the doomed owner's lease expires")
    assert await survivor.reap_dead() == 0
    assert await survivor.query(["alice"]) == {"alice": True}
    assert [(t.user, t.online) for t in rec.take()] == [("alice", True)]  # no flap


@pytest.mark.backends
async def test_a_restarted_owner_clears_what_its_predecessor_left(
    make_presence: MakePresence, r: Redis
) -> None:
    first = await make_presence(instance_id="d1", lease_ttl=0.3)
    await first.connected("a1", "alice")
    die(first)  # its lease is still valid for a while
    # Same id: start() waits the dead process's lease out, then clears its leftovers.
    second = await make_presence(instance_id="d1", lease_ttl=0.3)
    assert second.reaped == 1
    assert await second.query(["alice"]) == {"alice": False}
    assert await r.scard(keys.owned_key("d1")) == 0


@pytest.mark.backends
async def test_a_clean_close_gives_up_the_lease_and_registration(
    make_presence: MakePresence, redis_url: str, r: Redis
) -> None:
    p = Presence.from_url(redis_url, instance_id="tidy")
    await p.start()
    assert await r.exists(keys.lease_key("tidy")) == 1
    assert "tidy" in await r.smembers(keys.OWNERS_KEY)
    await p.close()
    assert await r.exists(keys.lease_key("tidy")) == 0
    assert "tidy" not in await r.smembers(keys.OWNERS_KEY)


async def test_an_owner_whose_lease_lapsed_learns_it_and_is_told_to_register_again(
    make_presence: MakePresence, r: Redis
) -> None:
    lost: list[bool] = []

    async def register_again(state_lost: bool) -> None:
        lost.append(state_lost)

    survivor = await make_presence(instance_id="survivor")
    stalled = await make_presence(
        instance_id="stalled", lease_ttl=0.3, on_lease_lost=register_again
    )
    await stalled.connected("a1", "alice")
    assert await stalled.renew_lease() is True
    die(stalled)  # a stall longer than the TTL: nothing renews

    async def lease_gone() -> bool:
        return not await r.exists(keys.lease_key("stalled"))

    await wait_for(lease_gone, what="the stalled owner's lease expires")
    assert await survivor.reap_dead() == 1
    assert "stalled" not in await r.smembers(keys.OWNERS_KEY)
    # The stall ends: the next renewal finds the lease lost, registers the owner again
    # and asks it to put its clients back.
    assert await stalled.renew_lease() is False
    # A lapse, not data loss: the marker is still there.
    await wait_for(lambda: lost == [False], what="on_lease_lost(False) is called")
    assert stalled.lease_losses == 1
    assert "stalled" in await r.smembers(keys.OWNERS_KEY)
    assert await stalled.renew_lease() is True


async def test_a_second_live_process_cannot_take_an_instance_id(
    make_presence: MakePresence, r: Redis
) -> None:
    assert issubclass(InstanceIdInUse, RuntimeError)
    holder = await make_presence(instance_id="busy")  # the default TTL
    c = await holder.connected("a1", "alice")
    token = await r.get(keys.lease_key("busy"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(InstanceIdInUse, match="in use"):
        await make_presence(instance_id="busy")
    # Quickly: the holder's renewals prove it alive; the TTL is not waited out.
    assert loop.time() - started < DEFAULT_LEASE_TTL / 2
    # The holder is untouched: same tenure, its client still connected.
    assert await r.get(keys.lease_key("busy")) == token
    assert await holder.renew_lease() is True
    assert await holder.clients("alice") == {"a1": ("busy", "")}
    assert await r.smembers(keys.owned_key("busy")) == {f"alice|a1|{c.token}"}


async def test_reconcile_removes_entries_this_owner_no_longer_holds(
    make_presence: MakePresence, r: Redis
) -> None:
    owner = await make_presence(instance_id="owner")
    kept = await owner.connected("a1", "alice")
    lost = await owner.connected("b1", "bob")
    listed: set[str] = set()
    assert await owner.reconcile(lambda token: True, listed=listed) == 0
    assert listed == {kept.token, lost.token}  # every member seen is listed
    assert await owner.reconcile(lambda token: True) == 0
    assert await owner.reconcile(lambda token: token == kept.token) == 1
    assert await owner.query(["alice", "bob"]) == {"alice": True, "bob": False}
    assert await r.smembers(keys.owned_key("owner")) == {f"alice|a1|{kept.token}"}
    # A member whose entry is already gone is just dropped from the set.
    await r.sadd(keys.owned_key("owner"), f"carol|c1|{lost.token}")
    assert await owner.reconcile(lambda token: token == kept.token) == 0
    assert await r.smembers(keys.owned_key("owner")) == {f"alice|a1|{kept.token}"}


async def test_connecting_the_same_session_again_keeps_it_reapable(
    make_presence: MakePresence, r: Redis
) -> None:
    # What a daemon does when it registers its sessions again after losing its lease:
    # the same token again must leave the owner-set member in place.
    owner = await make_presence(instance_id="owner")
    first = await owner.connected("a1", "alice")
    again = await owner.connected("a1", "alice", token=first.token)
    assert not again.went_online
    assert await r.smembers(keys.owned_key("owner")) == {f"alice|a1|{first.token}"}


# ---------------------------------------------------------------------------
# Leases: renewal, lapse, data loss, fencing.


async def test_renewing_a_deleted_lease_reports_a_lapse_and_takes_a_new_tenure(
    make_presence: MakePresence, r: Redis
) -> None:
    lost: list[bool] = []

    async def on_lost(state_lost: bool) -> None:
        lost.append(state_lost)

    p = await make_presence(instance_id="own", on_lease_lost=on_lost)
    die(p)  # only the renewals this test makes
    lease, marker = keys.lease_key("own"), keys.marker_key("own")
    first_tenure = await r.get(lease)
    assert first_tenure and await r.exists(marker) == 1
    assert await p.renew_lease() is True and lost == []

    # The lease lapsed (the marker remembers the owner): False, on_lease_lost(False).
    await r.delete(lease)
    assert await p.renew_lease() is False
    await wait_for(lambda: lost == [False], what="on_lease_lost(False) is called")
    assert p.lease_losses == 1
    # A new tenure holds the lease: the renewal did not re-create the old one.
    second_tenure = await r.get(lease)
    assert second_tenure and second_tenure != first_tenure
    assert await p.renew_lease() is True
    assert await r.get(lease) == second_tenure and lost == [False]

    # Lease and marker gone: Redis lost this owner's state, on_lease_lost(True).
    await r.delete(lease, marker)
    assert await p.renew_lease() is False
    await wait_for(lambda: lost == [False, True], what="on_lease_lost(True) is called")
    assert p.lease_losses == 2
    assert await r.exists(lease, marker) == 2  # taken again, marker and all
    assert await r.get(lease) not in (first_tenure, second_tenure)
    assert "own" in await r.smembers(keys.OWNERS_KEY)
    assert await p.renew_lease() is True


async def test_the_fence_is_when_the_lease_runs_out_less_a_margin(
    make_presence: MakePresence, r: Redis
) -> None:
    ttl_ms = round(DEFAULT_LEASE_TTL * 1000)
    margin = round(min(FENCE_MARGIN * 1000, ttl_ms / 10))
    before = await redis_ms(r)
    p = await make_presence(instance_id="own")
    die(p)
    after = await redis_ms(r)
    assert before + ttl_ms - margin <= p.fence_ms <= after + ttl_ms - margin
    fence = p.fence_ms
    assert await p.renew_lease() is True
    assert p.fence_ms >= fence
    # Without a lease there is no fence.
    free = await make_presence(instance_id="free", lease_ttl=None)
    assert free.fence_ms == 0
    assert (await free.connected("f1", "fred")).went_online


async def test_a_connect_that_reaches_redis_after_the_fence_writes_nothing(
    make_presence: MakePresence, r: Redis
) -> None:
    p = await make_presence(instance_id="own")
    die(p)
    rec = Recorder([p])
    # As if the lease ran out while the call was on its way (a stall, a slow socket).
    p.fence_ms = await redis_ms(r) - 1
    with pytest.raises(PresenceError) as info:
        await p.connected("a1", "alice")
    assert info.value.code is ErrorCode.TRY_AGAIN
    assert await p.query(["alice"]) == {"alice": False}
    assert await r.exists(keys.clients_key("alice"), keys.user_keys("alice")[1]) == 0
    assert await r.exists(keys.pending_key("alice")) == 0
    assert await r.scard(keys.owned_key("own")) == 0
    assert rec.take() == []
    # A restore is fenced the same way.
    with pytest.raises(PresenceError) as info:
        await p.connected("a1", "alice", restore=True, token="ab" * 16)
    assert info.value.code is ErrorCode.TRY_AGAIN
    assert await r.exists(keys.clients_key("alice")) == 0
    # Renewed, the fence moves on and the retry succeeds.
    assert await p.renew_lease() is True
    c = await p.connected("a1", "alice")
    assert c.went_online
    assert await r.smembers(keys.owned_key("own")) == {f"alice|a1|{c.token}"}


@pytest.mark.backends
async def test_live_owners_are_the_others_whose_lease_is_held(
    make_presence: MakePresence, r: Redis
) -> None:
    a = await make_presence(instance_id="a")
    b = await make_presence(instance_id="b")
    c = await make_presence(instance_id="c")
    await make_presence(instance_id="solo", lease_ttl=None)  # no lease: not an owner
    assert await a.live_owners() == ["b", "c"]
    assert await b.live_owners() == ["a", "c"]
    die(c)
    await r.delete(keys.lease_key("c"))  # c's lease ran out (still registered)
    assert "c" in await r.smembers(keys.OWNERS_KEY)
    assert await a.live_owners() == ["b"]
    assert await c.live_owners() == ["a", "b"]


async def test_from_url_uses_a_blocking_pool_with_timeouts(redis_url: str) -> None:
    p = Presence.from_url(redis_url, lease_ttl=None)
    try:
        assert isinstance(p.redis, Redis)
        pool = p.redis.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.connection_kwargs["socket_timeout"] == DEFAULT_REDIS_TIMEOUT
        assert pool.connection_kwargs["socket_connect_timeout"] == DEFAULT_REDIS_TIMEOUT
        await p.start()
        assert (await p.connected("a1", "alice")).went_online
    finally:
        await p.close()
    client = redis_client(redis_url, max_connections=3, timeout=0.5)
    try:
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == 3 and pool.timeout == 0.5
        assert pool.connection_kwargs["socket_timeout"] == 0.5
        assert pool.connection_kwargs["decode_responses"] is True
        assert await client.ping()
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------
# Versions seeded from the clock.


async def test_versions_keep_growing_when_the_users_keys_are_lost(
    presence: Presence, r: Redis
) -> None:
    rec = Recorder([presence])
    before = now_ms(presence)
    c = await presence.connected("a1", "alice")
    assert c.version >= before
    await presence.disconnected("a1")
    [_, offline] = rec.take()
    assert offline.version > c.version
    # Redis loses alice's keys (restarted empty, say). Versions may run ahead of the clock
    # by one per change made within one ms; a restart takes far longer than that, which
    # the wait stands for.
    await r.delete(*keys.user_keys("alice"))
    await wait_for(lambda: now_ms(presence) > offline.version, what="the clock passes it")
    again = await presence.connected("a1", "alice")
    assert again.went_online and again.version > offline.version
    assert rec.take() == [Transition("alice", True, again.version)]


async def test_a_snapshot_of_a_user_without_a_version_stores_one(
    presence: Presence, r: Redis
) -> None:
    await presence.set_friends("viewer", ["ghost"])
    await r.delete(*keys.user_keys("ghost"))  # ghost's keys were lost
    before = now_ms(presence)
    [state] = await presence.friend_view("viewer")
    assert (state.name, state.online) == ("ghost", False) and state.version >= before
    # Stored: the next snapshot hands out the same version, and a later change of ghost
    # is numbered above it.
    assert int(await r.get(keys.user_keys("ghost")[1]) or 0) == state.version
    assert await presence.friend_view("viewer") == [state]
    assert (await presence.connected("g1", "ghost")).version > state.version


# ---------------------------------------------------------------------------
# Calls for one client id apply in call order.


async def test_calls_for_one_client_id_apply_in_call_order(presence: Presence, r: Redis) -> None:
    rec = Recorder([presence])
    for i in range(30):
        first, second, removed = await asyncio.gather(
            presence.connected("9", "sheep"),
            presence.connected("9", "sheep"),
            presence.disconnected("9"),
        )
        # The disconnect, made last, applied last: sheep is offline, nothing is left.
        assert removed is True, i
        assert await presence.query(["sheep"]) == {"sheep": False}, i
        assert await r.exists(keys.clients_key("sheep"), keys.client_key("9")) == 0, i
        assert await r.scard(keys.owned_key("p0")) == 0, i
        assert first.went_online and not second.went_online, i
        assert second.version == first.version, i
        online, offline = rec.take()
        assert online == Transition("sheep", True, first.version), i
        assert (offline.online, offline.version > online.version) == (False, True), i
    assert presence._client_locks == {}  # nothing kept once the calls are done


# ---------------------------------------------------------------------------
# Told at least once: the outbox.
#
# A decided transition waits in the user's outbox ("online|version|decided_ms") until
# its telling is confirmed. Younger than OUTBOX_GRACE it is left to the call that
# decided it; older, any call that touches the user tells it again, and a call whose
# connect or disconnect got no answer settles it (reads the outbox once the grace has
# passed and tells what is there). The tests drive the instances' clock past the grace.


PAST_THE_GRACE: float = OUTBOX_GRACE + 0.001
"""Seconds to move a clock on so that a transition decided at its old now counts as
abandoned (a millisecond more than the grace: ms rounding cannot land short of it)."""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest_asyncio.fixture
async def clocked_pair(
    make_presence: MakePresence, sink: Deliveries, clock: ManualClock
) -> tuple[Presence, Presence]:
    """Two instances that share one delivery sink and one manual clock."""
    return (
        await make_presence(instance_id="d0", deliver=sink, clock=clock),
        await make_presence(instance_id="d1", deliver=sink, clock=clock),
    )


async def mutual_friends_with_bob_online(p: Presence, q: Presence, sink: Deliveries) -> Connection:
    """alice and bob declare each other; bob is connected (b1, through q)."""
    await p.set_friends("alice", ["bob"])
    await q.set_friends("bob", ["alice"])
    b1 = await q.connected("b1", "bob")
    sink.take()
    return b1


async def lose_a_connect(p: Presence, r: Redis, client_id: str, user: str) -> tuple[str, int, int]:
    """What ``p.connected(client_id, user)`` does, step by step with the same arguments
    (owner-set member, binding, connect.lua), except that the connect script's answer is
    lost: nothing is told or confirmed. Returns (token, version, decided_ms)."""
    token = secrets.token_hex(16)
    await r.sadd(keys.owned_key(p.instance_id), keys.owned_member(user, client_id, token))
    claim: list[str | int] = [user, token, now_ms(p), "", round(p.stale_binding_after * 1000)]
    assert await p.scripts.call(r, "claim", [keys.client_key(client_id)], claim) == ""
    decided = now_ms(p)
    entry = f"{token}|{p.instance_id}|"
    args: list[str | int] = [client_id, entry, decided, p.fence_ms, "connect", GRACE_MS]
    status, went_online, version, previous, pending = await p.scripts.call(
        r, "connect", keys.user_keys(user), args
    )
    assert (status, went_online, previous) == (1, 1, "")
    assert pending[:3] == [1, version, decided]
    assert await r.get(keys.pending_key(user)) == f"1|{version}|{decided}"
    return token, int(version), decided


async def test_a_lost_answer_is_told_by_a_retry_once_the_grace_passed(
    clocked_pair: tuple[Presence, Presence], sink: Deliveries, clock: ManualClock, r: Redis
) -> None:
    p, q = clocked_pair
    rec = Recorder([p, q])
    b1 = await mutual_friends_with_bob_online(p, q, sink)
    a1 = await p.connected("a1", "alice")
    assert told(sink.take()) == {("b1", "alice", True)}
    assert await r.exists(keys.pending_key("alice")) == 0  # told and confirmed
    rec.take()
    # The disconnect runs in Redis, but its answer never reaches the caller.
    decided = now_ms(p)
    removed, went_offline, version, entry, pending = await p.scripts.call(
        r, "disconnect", keys.user_keys("alice"), ["a1", a1.token, decided, GRACE_MS]
    )
    assert (removed, went_offline, entry) == (1, 1, f"{a1.token}|d0|")
    assert pending == [0, version, decided, "bob"]
    outbox = f"0|{version}|{decided}"
    assert await r.get(keys.pending_key("alice")) == outbox
    assert sink.take() == []
    # The caller tries again at once, and again just before the grace ends: nothing is
    # left to remove, and the transition is young: for all Redis knows its decider is
    # telling it right now, so these calls do not tell it a second time.
    retold = p.retold
    for step in (0.0, OUTBOX_GRACE - 0.01):
        clock.advance(step)
        assert await p.disconnected("a1", user="alice", token=a1.token) is False
        assert sink.take() == []
        assert await r.get(keys.pending_key("alice")) == outbox
        assert p.retold == retold
    # Unconfirmed for the grace (its decider lost the answer): this try tells it and
    # confirms it.
    clock.advance(0.011)
    assert await p.disconnected("a1", user="alice", token=a1.token) is False
    assert sink.take() == [Delivery("d1", "b1", b1.token, FriendState("alice", False, version))]
    assert await r.exists(keys.pending_key("alice")) == 0
    assert p.retold == retold + 1
    assert rec.take() == []  # decided by the first call: not this call's transition
    # Told once is enough: another retry tells nothing.
    clock.advance(PAST_THE_GRACE)
    assert await p.disconnected("a1", user="alice", token=a1.token) is False
    assert sink.take() == []
    assert await p.friend_view("bob") == [FriendState("alice", False, version)]


async def test_a_connect_after_a_lost_answer_tells_the_pending_online_once_the_grace_passed(
    clocked_pair: tuple[Presence, Presence], sink: Deliveries, clock: ManualClock, r: Redis
) -> None:
    p, q = clocked_pair
    b1 = await mutual_friends_with_bob_online(p, q, sink)
    # alice's connect ran in Redis; its caller never heard back (nobody was told).
    decided = now_ms(p)
    entry = f"{'aa' * 16}|d0|"
    args: list[str | int] = ["a1", entry, decided, p.fence_ms, "connect", GRACE_MS]
    status, went_online, version, _, pending = await p.scripts.call(
        r, "connect", keys.user_keys("alice"), args
    )
    assert (status, went_online, pending) == (1, 1, [1, version, decided, "bob"])
    outbox = f"1|{version}|{decided}"
    # The client connects again at once (a new session): no transition, and the online
    # one is left to its decider while younger than the grace.
    again = await p.connected("a1", "alice")
    assert not again.went_online and again.version == version
    assert sink.take() == []
    assert await r.get(keys.pending_key("alice")) == outbox
    # Once it is that old, the next connect tells bob and confirms it.
    clock.advance(PAST_THE_GRACE)
    again = await p.connected("a1", "alice")
    assert not again.went_online and again.version == version
    assert sink.take() == [Delivery("d1", "b1", b1.token, FriendState("alice", True, version))]
    assert await r.exists(keys.pending_key("alice")) == 0


async def test_a_connect_whose_answer_was_lost_is_settled(
    clocked_pair: tuple[Presence, Presence], sink: Deliveries, clock: ManualClock, r: Redis
) -> None:
    p, q = clocked_pair
    rec = Recorder([p, q])
    b1 = await mutual_friends_with_bob_online(p, q, sink)
    rec.take()
    token, version, _ = await lose_a_connect(p, r, "a1", "alice")
    assert sink.take() == []
    # What the library does when the connect call raises (a Redis error or a timeout:
    # the script may have run). The settle reads the outbox after the grace, on the
    # instance's clock: moved on here, so what it finds counts as abandoned.
    retold = p.retold
    clock.advance(PAST_THE_GRACE)
    p._settle_later("alice")

    async def confirmed() -> bool:
        return not await r.exists(keys.pending_key("alice"))

    await wait_for(confirmed, timeout=OUTBOX_GRACE + 5, what="the lost connect is settled")
    assert sink.take() == [Delivery("d1", "b1", b1.token, FriendState("alice", True, version))]
    # The caller that lost the answer most likely decided it: its listeners hear it now.
    assert p.retold == retold
    assert rec.take() == [Transition("alice", True, version)]
    await wait_for(lambda: not p._retries, what="the settle task ends")
    assert await q.friend_view("bob") == [FriendState("alice", True, version)]
    # The session is whole: it ends like any other, and its offline transition is told.
    assert await r.smembers(keys.owned_key("d0")) == {f"alice|a1|{token}"}
    assert await q.disconnected("a1") is True
    [offline] = sink.take()
    assert (offline.client_id, offline.friend) == (
        "b1",
        FriendState("alice", False, await version_of(q, "alice")),
    )
    assert await r.scard(keys.owned_key("d0")) == 0


async def test_a_settle_after_a_newer_transition_was_told_tells_nothing_stale(
    clocked_pair: tuple[Presence, Presence], sink: Deliveries, clock: ManualClock, r: Redis
) -> None:
    p, q = clocked_pair
    b1 = await mutual_friends_with_bob_online(p, q, sink)
    _, online_version, _ = await lose_a_connect(p, r, "a1", "alice")
    clock.advance(PAST_THE_GRACE)
    # Before the settle runs, the client goes away through q: q decides the offline
    # transition (it replaces the unconfirmed online one), tells it and confirms it.
    assert await q.disconnected("a1") is True
    offline = FriendState("alice", False, await version_of(q, "alice"))
    assert offline.version > online_version
    assert sink.take() == [Delivery("d1", "b1", b1.token, offline)]
    assert await r.exists(keys.pending_key("alice")) == 0
    # The settle finds nothing: bob is never told the older "online" after "offline".
    retold = p.retold
    p._settle_later("alice")
    await wait_for(lambda: not p._retries, timeout=OUTBOX_GRACE + 5, what="the settle ends")
    assert sink.take() == []
    assert p.retold == retold
    assert await q.friend_view("bob") == [offline]


async def test_a_disconnect_whose_answer_is_lost_in_the_network_is_settled(
    make_presence: MakePresence,
    redis_server: EmbeddedRedis,
    sink: Deliveries,
    clock: ManualClock,
    r: Redis,
) -> None:
    # p reaches Redis through a proxy. The proxy holds the disconnect until p's call
    # has timed out, then lets it through: the script runs, and its answer is lost.
    q = await make_presence(instance_id="d1", deliver=sink, clock=clock)
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        client = redis_client(proxy.redis_url(), timeout=1.0)
        p = Presence(client, instance_id="d0", deliver=sink, lease_ttl=None, clock=clock)
        try:
            await p.start()
            rec = Recorder([p, q])
            b1 = await mutual_friends_with_bob_online(p, q, sink)
            a1 = await p.connected("a1", "alice")
            assert told(sink.take()) == {("b1", "alice", True)}
            assert await r.exists(keys.pending_key("alice")) == 0
            rec.take()
            retold = p.retold
            proxy.partition()
            with pytest.raises(RedisTimeoutError):
                await p.disconnected("a1", user="alice", token=a1.token)
            # The call gave up; its script has not run yet (held in the network).
            assert await r.hexists(keys.clients_key("alice"), "a1")
            clock.advance(PAST_THE_GRACE)
            proxy.heal()

            async def removed() -> bool:
                return not await r.exists(keys.clients_key("alice"))

            await wait_for(removed, what="the held disconnect runs in Redis")
            version = await version_of(q, "alice")
            assert version > a1.version

            async def confirmed() -> bool:
                return not await r.exists(keys.pending_key("alice"))

            await wait_for(confirmed, timeout=OUTBOX_GRACE + 5, what="the disconnect is settled")
            offline = FriendState("alice", False, version)
            assert sink.take() == [Delivery("d1", "b1", b1.token, offline)]
            # The caller that lost the answer decided it: its listeners hear it now.
            assert p.retold == retold
            assert rec.take() == [Transition("alice", False, version)]
            assert await q.friend_view("bob") == [offline]
        finally:
            await p.close()


async def test_a_failed_fan_out_is_retried_until_it_succeeds_then_confirmed(
    make_presence: MakePresence, clock: ManualClock, r: Redis
) -> None:
    delivered: list[Delivery] = []
    link_down = False

    async def flaky(deliveries: list[Delivery]) -> None:
        if link_down:
            raise RedisConnectionError("the link is down")
        delivered.extend(deliveries)

    p = await make_presence(instance_id="d0", deliver=flaky, clock=clock)
    await p.set_friends("alice", ["bob"])
    await p.set_friends("bob", ["alice"])
    b1 = await p.connected("b1", "bob")
    link_down = True
    decided = now_ms(p)
    a1 = await p.connected("a1", "alice")  # decided; the telling fails for now
    assert a1.went_online
    # Retried in the background, and unconfirmed while it fails.
    await wait_for(lambda: p.fan_out_failures >= 3, what="the fan-out is retried")
    assert await r.get(keys.pending_key("alice")) == f"1|{a1.version}|{decided}"
    assert delivered == []
    link_down = False

    async def confirmed() -> bool:
        return not await r.exists(keys.pending_key("alice"))

    await wait_for(confirmed, what="the retried fan-out confirms the outbox")
    assert delivered == [Delivery("d0", "b1", b1.token, FriendState("alice", True, a1.version))]
    await wait_for(lambda: not p._retries, what="the retry stops once it succeeded")


# ---------------------------------------------------------------------------
# Restore, and replaced sessions.


async def test_restore_puts_a_session_back_unless_a_newer_one_holds_the_client_id(
    instances: list[Presence], r: Redis
) -> None:
    p, q = instances[:2]
    rec = Recorder([p, q])
    old = await p.connected("a1", "alice", address="1.2.3.4:5")
    # A survivor reaped it while p's lease had lapsed.
    assert await q.disconnected("a1", user="alice", token=old.token) is True
    assert await binding_of(r, "a1") is None
    # p puts it back: same token, same owner, bound again.
    back = await p.connected("a1", "alice", address="1.2.3.4:5", restore=True, token=old.token)
    assert back.token == old.token and back.went_online and back.version > old.version
    assert await entries_of(r, "alice") == {"a1": f"{old.token}|p0|1.2.3.4:5"}
    assert await binding_of(r, "a1") == f"alice|{old.token}"
    assert await r.smembers(keys.owned_key("p0")) == {f"alice|a1|{old.token}"}
    # Putting back what is there changes nothing.
    again = await p.connected("a1", "alice", address="1.2.3.4:5", restore=True, token=old.token)
    assert not again.went_online and again.version == back.version
    assert await r.smembers(keys.owned_key("p0")) == {f"alice|a1|{old.token}"}
    # The client failed over meanwhile: a newer session through q.
    new = await q.connected("a1", "alice")
    assert not new.went_online
    with pytest.raises(Superseded) as info:
        await p.connected("a1", "alice", restore=True, token=old.token)
    assert isinstance(info.value, PresenceError)
    assert info.value.code is ErrorCode.UNKNOWN_SESSION
    # Nothing changed: the newer session stays, p holds nothing.
    assert await entries_of(r, "alice") == {"a1": f"{new.token}|p1|"}
    assert await binding_of(r, "a1") == f"alice|{new.token}"
    assert await r.scard(keys.owned_key("p0")) == 0
    assert await r.smembers(keys.owned_key("p1")) == {f"alice|a1|{new.token}"}
    # alice went offline when reaped and online when put back; never since.
    reaped_online, reaped, restored = rec.take()
    assert reaped_online == Transition("alice", True, old.version)
    assert (reaped.online, old.version < reaped.version < back.version) == (False, True)
    assert restored == Transition("alice", True, back.version)


async def test_restore_needs_a_valid_token(presence: Presence) -> None:
    with pytest.raises(ValueError, match="restore"):
        await presence.connected("a1", "alice", restore=True)
    with pytest.raises(ValueError, match="token"):
        await presence.connected("a1", "alice", restore=True, token="not hex")
    assert await presence.query(["alice"]) == {"alice": False}


@pytest.mark.backends
async def test_a_connect_that_replaces_another_owners_entry_tells_that_owner(
    instances: list[Presence], r: Redis
) -> None:
    p, q = instances[:2]
    channels = [keys.inbox_channel("p0"), keys.inbox_channel("p1")]
    # Plain channels on one Redis, sharded ones on a cluster (as the daemon listens).
    inboxes = [Inbox(p.redis, channel) for channel in channels]
    try:
        for inbox in inboxes:
            await inbox.subscribe()
        old = await p.connected("a1", "alice")
        new = await q.connected("a1", "alice")  # replaces p0's session: p0 is told
        newer = await q.connected("a1", "alice")  # replaces q's own: nobody is told
        await q.connected("a1", "alice", token=newer.token)  # the same session: neither
        assert new.token != old.token
        pipe = p.redis.pipeline(transaction=False)
        for channel in channels:  # a last message on each, to know all were read
            queue_publish(pipe, channel, "[]")
        await pipe.execute()
        got: dict[str, list[str]] = {channel: [] for channel in channels}
        for channel, inbox in zip(channels, inboxes, strict=True):
            while not got[channel] or got[channel][-1] != "[]":
                data = await inbox.get(timeout=5.0)
                assert data is not None, got
                got[channel].append(data)
    finally:
        for inbox in inboxes:
            await inbox.aclose()
    inbox_p0, inbox_p1 = got[channels[0]], got[channels[1]]
    assert inbox_p1 == ["[]"]
    assert len(inbox_p0) == 2 and inbox_p0[-1] == "[]"
    assert parse_inbox(inbox_p0[0]) == ([], [Replaced("a1", old.token)])
    assert await entries_of(r, "alice") == {"a1": f"{newer.token}|p1|"}


def test_parse_inbox_reads_deliveries_and_replaced_sessions() -> None:
    message = '[["c1","ab12ab12","bob",true,7],["c2","cd34cd34"],["c3","ef56ef56","Zoë",false,0]]'
    deliveries, replaced = parse_inbox(message)
    assert deliveries == [
        Delivery("", "c1", "ab12ab12", FriendState("bob", True, 7)),
        Delivery("", "c3", "ef56ef56", FriendState("Zoë", False, 0)),
    ]
    assert replaced == [Replaced("c2", "cd34cd34")]
    assert parse_inbox(b"[]") == ([], [])
    for bad in ("{", "5", '[["c1"]]', '[["a b","t"]]', '[["c1","t","bob",true]]', "null"):
        with pytest.raises(ValueError, match="malformed inbox"):
            parse_inbox(bad)


def test_parse_inbox_raises_only_value_error_for_malformed_items() -> None:
    # The daemon's inbox listener catches ValueError only: anything else escaping
    # parse_inbox ends the listener task, and the daemon hears no more notifications.
    # An item that is a JSON object of two keys is indexed (item[0]) as a Replaced
    # pair and raises KeyError.
    for bad in ('[{"a":1,"b":2}]', '[{"c1":1,"t":2}]', '[["c1","ab12ab12"],{"x":"y","z":"w"}]'):
        with pytest.raises(ValueError, match="malformed inbox"):
            parse_inbox(bad)


# ---------------------------------------------------------------------------
# A connect that answers its friend view


async def test_connect_with_view_answers_the_view_and_tells_without_reading_routes_again(
    make_presence: MakePresence, r: Redis
) -> None:
    told: list[Delivery] = []

    async def deliver(deliveries: list[Delivery]) -> None:
        told.extend(deliveries)

    # No lease: no background commands while Redis counts this connect's.
    presence = await make_presence(instance_id="p0", deliver=deliver, lease_ttl=None)
    # b and c are mutual friends of a and online; d is declared by a only; e is offline.
    await presence.set_friends("a", ["b", "c", "d", "e"])
    for name, friends in {"b": ["a"], "c": ["a", "x"], "d": [], "e": ["a"]}.items():
        await presence.set_friends(name, friends)
    for name in ("b", "c", "d"):
        await presence.connected(f"c-{name}", name, address="127.0.0.1:1")
    told.clear()
    marks: list[int] = []
    before = await r.info("commandstats")
    done = await presence.connected(
        "c-a", "a", address="127.0.0.1:2", view=True, before_view=lambda: marks.append(1)
    )
    after = await r.info("commandstats")
    assert marks == [1]
    assert done.went_online
    assert done.view == await presence.friend_view("a")
    assert [(f.name, f.online) for f in done.view] == [
        ("b", True),
        ("c", True),
        ("d", False),
        ("e", False),
    ]
    assert sorted((d.client_id, d.friend) for d in told if d.friend) == [
        ("c-b", FriendState("a", True, done.version)),
        ("c-c", FriendState("a", True, done.version)),
    ]

    def calls(stats: dict[str, Any], command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    # The routes came with the view: no HGETALL was sent on its own (the four inside the
    # peeks are all there is), and the friend list came with the connect (the one
    # SMEMBERS is connect.lua's; Redis counts the commands scripts run).
    assert calls(after, "hgetall") - calls(before, "hgetall") == 4
    assert calls(after, "smembers") - calls(before, "smembers") == 1


async def test_connect_without_view_answers_none(presence: Presence) -> None:
    done = await presence.connected("c-a", "a")
    assert done.view is None
