"""Issue 10, "the truth heals itself": black-box regressions, one per finding.

Each test drives real daemon processes on a private Redis with real faults (a TCP proxy
partitioning a daemon from Redis, SIGSTOP/SIGCONT/SIGKILL of Redis or of a daemon,
Redis restarted empty, a lossy UDP relay) and asserts the behaviour the issue wants:
after a fault ends, Redis, the daemons and every client's view agree again, within a
bound, without clients having to notice.

The truth is read straight from Redis (a user is online iff ``presence:{user}:clients``
exists; an entry is ``token|owner|address``), never through the daemons under test.
Waits are bounded polls (``eventually``); where a test proves that something does *not*
happen (no flap, no zombie), it samples over a bounded window and asserts on what it
recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import pytest
import pytest_asyncio
import redis.asyncio
from redis.exceptions import RedisError

from daemons import DaemonFactory, DaemonProcess, RawPeer
from faults import (  # noqa: F401
    FaultKit,
    RedisServer,
    fault_kit_fixture,
    private_daemons_fixture,
    private_redis_fixture,
)
from helpers import Watched
from presence_client.protocol import (
    MAX_DATAGRAM,
    AnyMessage,
    Connect,
    ConnectOk,
    Error,
    ErrorCode,
    Message,
    Notify,
    Ping,
    Pong,
    ProtocolError,
    decode,
    encode,
)
from presence_client.sdk import (
    PresenceClient,
    PresenceClientError,
)
from presence_daemon import keys
from presence_daemon.presence import Presence

Address = tuple[str, int]
M = TypeVar("M", bound=Message)

REQUEST_TIMEOUT = 0.2
"""SDK clients retry fast (the daemons' ping interval is 0.2 s, timeout 0.6 s)."""
LEASE = {"--lease-ttl": "1"}
REDIS_TIMEOUT = {"--redis-timeout": "0.5"}
"""The daemon's bound on one Redis call (a flag being added for this issue)."""


# ---------------------------------------------------------------------------
# Waiting and observing.


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    detail: Callable[[], object] | None = None,
    interval: float = 0.02,
) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` s naming ``what`` and, if
    given, ``detail()`` (the state that was last seen). Redis errors count as false
    (Redis may be restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
        except (RedisError, OSError):
            result = False
        if result:
            return
        if time.monotonic() >= deadline:
            extra = ""
            if detail is not None:
                seen = detail()
                if inspect.isawaitable(seen):
                    seen = await seen
                extra = f"\nlast seen: {seen}"
            pytest.fail(f"not within {timeout:.1f} s: {what}{extra}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------
# The truth, read straight from Redis.


@dataclass(frozen=True, slots=True)
class Entry:
    token: str
    owner: str
    address: str


class Truth:
    """Reads presence state from Redis with a client of its own."""

    def __init__(self, url: str) -> None:
        self.redis = redis.asyncio.Redis.from_url(url, decode_responses=True)

    async def close(self) -> None:
        await self.redis.aclose()

    async def online(self, users: Iterable[str]) -> dict[str, bool]:
        names = list(users)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(keys.clients_key(name))
        return {n: bool(e) for n, e in zip(names, await pipe.execute(), strict=True)}

    async def offline_users(self, users: Iterable[str]) -> list[str]:
        return [u for u, up in (await self.online(users)).items() if not up]

    async def all_online(self, users: Iterable[str]) -> bool:
        return all((await self.online(users)).values())

    async def all_offline(self, users: Iterable[str]) -> bool:
        return not any((await self.online(users)).values())

    async def entry(self, user: str, client_id: str) -> Entry | None:
        value = await self.redis.hget(keys.clients_key(user), client_id)
        if value is None:
            return None
        token, owner, address = str(value).split("|", 2)
        return Entry(token, owner, address)

    async def friends(self, user: str) -> set[str]:
        return {str(name) for name in await self.redis.smembers(keys.friends_key(user))}

    async def visible(self, viewer: str, names: Iterable[str]) -> dict[str, bool]:
        """How each of ``names`` should look to ``viewer``: online and mutual."""
        result = {}
        viewer_friends = await self.friends(viewer)
        for name in names:
            online = (await self.online([name]))[name]
            mutual = name in viewer_friends and viewer in await self.friends(name)
            result[name] = online and mutual
        return result


@pytest_asyncio.fixture
async def truth(private_redis: RedisServer) -> AsyncIterator[Truth]:
    reader = Truth(private_redis.url)
    try:
        yield reader
    finally:
        await reader.close()


# ---------------------------------------------------------------------------
# SDK clients.


class Clients:
    """Creates SDK clients for a test; says goodbye for all of them at teardown."""

    def __init__(self) -> None:
        self.all: list[PresenceClient] = []

    def create(
        self,
        user: str,
        friends: Iterable[str] | None,
        servers: Sequence[Address],
        *,
        client_id: str | None = None,
    ) -> Watched:
        client = PresenceClient(
            user,
            friends,
            servers=list(servers),
            client_id=client_id or f"{user}-{len(self.all)}",
            request_timeout=REQUEST_TIMEOUT,
        )
        self.all.append(client)
        return Watched(client)

    async def connect(
        self,
        user: str,
        friends: Iterable[str] | None,
        servers: Sequence[Address],
        *,
        client_id: str | None = None,
    ) -> Watched:
        watched = self.create(user, friends, servers, client_id=client_id)
        await watched.client.connect()
        return watched

    async def close(self) -> None:
        async def goodbye(client: PresenceClient) -> None:
            with contextlib.suppress(PresenceClientError):
                await client.disconnect()  # a client whose daemon is gone gives up

        await asyncio.wait_for(
            asyncio.gather(*(goodbye(c) for c in self.all), return_exceptions=True), 15.0
        )


@pytest_asyncio.fixture
async def clients(private_daemons: DaemonFactory) -> AsyncIterator[Clients]:
    """SDK clients; closed before the daemons (this fixture depends on them)."""
    pool = Clients()
    try:
        yield pool
    finally:
        await pool.close()


async def connect_all(
    clients: Clients, specs: Sequence[tuple[str, list[str] | None, Sequence[Address]]]
) -> list[Watched]:
    return list(await asyncio.gather(*(clients.connect(u, f, s) for u, f, s in specs)))


# ---------------------------------------------------------------------------
# A raw UDP socket that talks to several daemons (RawPeer talks to one).


class _MultiReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queues: defaultdict[Address, asyncio.Queue[AnyMessage]] = defaultdict(asyncio.Queue)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        with contextlib.suppress(ProtocolError):
            self.queues[(str(addr[0]), int(addr[1]))].put_nowait(decode(data))

    def error_received(self, exc: Exception) -> None:
        pass


class MultiPeer:
    """One UDP socket on 127.0.0.1, speaking the codec to any daemon."""

    def __init__(self, transport: asyncio.DatagramTransport, receiver: _MultiReceiver) -> None:
        self.transport = transport
        self.receiver = receiver
        self._request = 5000

    @classmethod
    async def open(cls) -> Self:
        loop = asyncio.get_running_loop()
        transport, receiver = await loop.create_datagram_endpoint(
            _MultiReceiver, local_addr=("127.0.0.1", 0)
        )
        return cls(transport, receiver)

    def close(self) -> None:
        self.transport.close()

    def send(self, msg: Message, to: Address, *, pad_to: int | None = None) -> None:
        self.transport.sendto(encode(msg, pad_to=pad_to), to)

    def drain(self, source: Address) -> None:
        queue = self.receiver.queues[source]
        while not queue.empty():
            queue.get_nowait()

    async def recv_until(
        self, source: Address, kinds: tuple[type[M], ...], timeout: float
    ) -> M | None:
        """The next message of one of ``kinds`` from ``source``, or None after ``timeout``."""
        queue = self.receiver.queues[source]
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                return None
            if isinstance(msg, kinds):
                return msg
        return None

    async def connect(
        self, daemon: Address, user: str, client_id: str, previous: bytes | None = None
    ) -> ConnectOk:
        """CONNECT; ``previous``: the session it replaces (the proof a client sends)."""
        self._request += 1
        self.drain(daemon)
        msg = Connect(self._request, client_id, user, previous=previous)
        self.send(msg, daemon, pad_to=MAX_DATAGRAM)
        reply = await self.recv_until(daemon, (ConnectOk,), 2.0)
        if reply is None:
            pytest.fail(f"no CONNECT_OK from {daemon} for {user}/{client_id}")
        return reply

    async def ping(self, daemon: Address, session: bytes, timeout: float = 0.3) -> str:
        """PING; returns "PONG", "UNKNOWN_SESSION", another error name, or "nothing"."""
        self.drain(daemon)
        self.send(Ping(session), daemon)
        reply = await self.recv_until(daemon, (Pong, Error), timeout)
        if isinstance(reply, Pong):
            return "PONG"
        if isinstance(reply, Error):
            return reply.code.name
        return "nothing"


# ---------------------------------------------------------------------------
# Finding 1.


async def test_partitioned_daemon_registers_its_clients_again_after_heal(
    private_redis: RedisServer,
    fault_kit: FaultKit,
    private_daemons: DaemonFactory,
    clients: Clients,
    truth: Truth,
) -> None:
    """Finding 1: a daemon partitioned from Redis longer than its lease, whose clients
    kept pinging, is reaped by a survivor; after the partition heals, all its clients
    are online again within lease_ttl + 2 s, without any client reconnecting."""
    proxy = fault_kit.proxy(private_redis.address)
    one = private_daemons("d1", flags={**LEASE, "--redis-url": proxy.redis_url()})
    private_daemons("d2", flags=LEASE)  # the survivor, straight to Redis
    users = [f"p{i}" for i in range(20)]
    partner = {u: users[i ^ 1] for i, u in enumerate(users)}  # mutual pairs
    watched = await connect_all(clients, [(u, [partner[u]], [one.address]) for u in users])
    await eventually(
        lambda: all(w.friends == {partner[w.user]: True} for w in watched),
        3.0,
        "every client sees its partner online",
    )
    sessions = {w.user: w.client.session for w in watched}

    proxy.partition()
    await eventually(
        lambda: truth.all_offline(users),
        8.0,
        "the survivor reaps the partitioned daemon's clients",
    )
    assert all(w.client.connected for w in watched)  # pings never needed Redis
    proxy.heal()

    await eventually(
        lambda: truth.all_online(users),
        1 + 2,
        "every client of the healed daemon is online again in Redis",
        detail=lambda: truth.offline_users(users),
    )
    for w in watched:
        entry = await truth.entry(w.user, w.client.client_id)
        assert w.client.session is not None and entry is not None
        assert (entry.token, entry.owner) == (w.client.session.hex(), "d1")
    assert {w.user: w.client.session for w in watched} == sessions, "a client reconnected"
    assert all(w.statuses() == ["connected"] for w in watched)
    await eventually(
        lambda: all(w.friends == {partner[w.user]: True} for w in watched),
        2.0,
        "every client sees its partner online again",
        detail=lambda: {w.user: w.friends for w in watched if not all(w.friends.values())},
    )


# ---------------------------------------------------------------------------
# Finding 2.


async def test_disconnects_during_a_redis_stall_are_told_to_friends_after_it(
    private_redis: RedisServer, private_daemons: DaemonFactory, clients: Clients, truth: Truth
) -> None:
    """Finding 2: clients disconnect while Redis is stopped (SIGSTOP) for longer than the
    daemon's Redis call timeout; after Redis resumes, every watching mutual friend (on
    the same daemon or another) learns within ~3 s that the user went offline."""
    flags = {**REDIS_TIMEOUT, "--lease-ttl": "10"}  # long lease: no reaping in this test
    one, two = private_daemons("d1", flags=flags), private_daemons("d2", flags=flags)
    users = [f"u{i}" for i in range(10)]
    leaving = await connect_all(
        clients, [(u, [f"w{i}"], [one.address]) for i, u in enumerate(users)]
    )
    watchers = await connect_all(
        clients,
        [(f"w{i}", [u], [(one if i % 2 else two).address]) for i, u in enumerate(users)],
    )
    await eventually(
        lambda: all(w.friends == {u: True} for w, u in zip(watchers, users, strict=True)),
        3.0,
        "every watcher sees its friend online",
    )

    async with await RawPeer.open(one.address) as probe:
        private_redis.pause()
        try:
            goodbyes = [asyncio.create_task(w.client.disconnect()) for w in leaving]
            # A CONNECT queued after the disconnects: its TRY_AGAIN shows that the
            # daemon's Redis calls are timing out while Redis is stopped.
            request = probe.next_request()
            probe.send(Connect(request, "probe-1", "probe"), pad_to=MAX_DATAGRAM)
            error, _ = await probe.recv_until(Error, 5.0, request=request)
            assert error.code is ErrorCode.TRY_AGAIN
            # Redis stays stopped until every leaving client is done saying goodbye.
            await eventually(
                lambda: all(g.done() for g in goodbyes), 10.0, "the leaving clients give up"
            )
        finally:
            private_redis.resume()
    for goodbye in goodbyes:
        with contextlib.suppress(PresenceClientError):
            goodbye.result()

    pairs = list(zip(watchers, users, strict=True))
    await eventually(
        lambda: all(not w.friends[u] for w, u in pairs),
        3.0,
        "every watcher learns that its friend went offline",
        detail=lambda: {w.user: w.friends for w, u in pairs if w.friends[u]},
    )
    assert await truth.online(users) == dict.fromkeys(users, False)
    assert all(w.seen(u) == [True, False] for w, u in pairs)


# ---------------------------------------------------------------------------
# Finding 3.


@pytest.mark.parametrize(
    "timeout",
    [
        pytest.param("0.6", id="stall-longer-than-timeout"),
        # As with the defaults (lease 5 s, timeout 15 s): the thawed daemon still
        # believes in its sessions when it finds its lease lost.
        pytest.param("4", id="stall-shorter-than-timeout"),
    ],
)
async def test_thawed_daemon_leaves_clients_that_failed_over_alone(
    timeout: str, private_daemons: DaemonFactory, clients: Clients, truth: Truth
) -> None:
    """Finding 3: a daemon stopped (SIGSTOP) past its lease, whose clients failed
    over to a survivor, is woken (SIGCONT): its stale sessions must not come back. For
    a window longer than the timeout after the wake every user stays online, owned by
    its session on the survivor, and no watching friend sees it go offline.

    The lease is 2 s here: clients notice a silent daemon after a ping interval and
    three probes (0.2 + 3 x 0.25 = 0.95 s) and fail over; the timing model wants the
    lease clearly longer than that (docs/design.md), and with a 1 s lease a busy machine
    sometimes reaped a client before it had moved (a flap this test is not about)."""
    flags = {"--lease-ttl": "2", "--timeout": timeout}
    one, two = private_daemons("d1", flags=flags), private_daemons("d2", flags=flags)
    users = [f"f{i}" for i in range(6)]
    movers = await connect_all(
        clients, [(u, [f"g{i}"], [one.address, two.address]) for i, u in enumerate(users)]
    )
    watchers = await connect_all(
        clients, [(f"g{i}", [u], [two.address]) for i, u in enumerate(users)]
    )
    pairs = list(zip(watchers, users, strict=True))
    await eventually(
        lambda: all(w.friends == {u: True} for w, u in pairs), 3.0, "watchers see users online"
    )

    one.send_signal(signal.SIGSTOP)
    try:
        await eventually(
            lambda: all(m.client.connected and m.client.server == two.address for m in movers),
            5.0,
            "the stopped daemon's clients fail over to the survivor",
        )

        async def reaped() -> bool:
            return not await truth.redis.exists(keys.lease_key("d1")) and not (
                await truth.redis.sismember(keys.OWNERS_KEY, "d1")
            )

        await eventually(reaped, 5.0, "d1's lease lapses and the survivor deals with it")
    finally:
        one.send_signal(signal.SIGCONT)

    # Bounded observation window (past the timeout and several lease renewals after the
    # wake): record every sample in which a user is offline or owned by anything but its
    # current session on d2, then assert that nothing was recorded.
    sessions = {m.user: m.client.session for m in movers}
    violations: list[str] = []
    window_end = time.monotonic() + float(timeout) + 1.5
    while time.monotonic() < window_end:
        for m in movers:
            entry = await truth.entry(m.user, m.client.client_id)
            session = sessions[m.user]
            if entry is None:
                violations.append(f"{m.user} offline")
            elif entry.owner != "d2" or session is None or entry.token != session.hex():
                violations.append(f"{m.user} owned by {entry.owner} token {entry.token[:8]}")
        await asyncio.sleep(0.05)
    assert not violations, f"{len(violations)} bad samples, first: {violations[:5]}"
    assert {m.user: m.client.session for m in movers} == sessions
    assert all(w.seen(u) == [True] for w, u in pairs), {w.user: w.seen(u) for w, u in pairs}


# ---------------------------------------------------------------------------
# Finding 4.


async def test_session_replaced_through_another_daemon_leaves_no_zombie(
    private_daemons: DaemonFactory, truth: Truth
) -> None:
    """Finding 4: one socket connects client id X to D1, then to D2 (which replaces the
    session in Redis), then to D1 again. Within ~2 s exactly one daemon answers that
    socket's PINGs with PONG, for the session Redis holds; the other answers
    UNKNOWN_SESSION. The user then stays online while that session keeps pinging."""
    one, two = private_daemons("D1"), private_daemons("D2")
    owner_of = {one.address: "D1", two.address: "D2"}
    peer = await MultiPeer.open()
    try:
        first = (await peer.connect(one.address, "u", "X")).session
        assert await peer.ping(one.address, first) == "PONG"
        second = (await peer.connect(two.address, "u", "X", previous=first)).session
        assert await peer.ping(two.address, second) == "PONG"
        entry = await truth.entry("u", "X")
        assert entry is not None and (entry.owner, entry.token) == ("D2", second.hex())
        third = (await peer.connect(one.address, "u", "X", previous=second)).session
        tokens = {one.address: third, two.address: second}

        last: dict[str, object] = {}

        async def one_live_session() -> bool:
            # Both sessions are pinged each round, so neither times out meanwhile.
            replies = {a: await peer.ping(a, t) for a, t in tokens.items()}
            entry = await truth.entry("u", "X")
            last.update(replies={owner_of[a]: r for a, r in replies.items()}, entry=entry)
            live = [a for a, reply in replies.items() if reply == "PONG"]
            dead = [a for a, reply in replies.items() if reply == "UNKNOWN_SESSION"]
            return (
                entry is not None
                and len(live) == 1
                and len(dead) == 1
                and entry.owner == owner_of[live[0]]
                and entry.token == tokens[live[0]].hex()
            )

        await eventually(
            one_live_session,
            2.5,
            "exactly one daemon answers PONG, for the session Redis holds",
            detail=lambda: (
                f"{last} (first={first.hex()[:8]} second={second.hex()[:8]} "
                f"third={third.hex()[:8]})"
            ),
        )
        entry = await truth.entry("u", "X")
        assert entry is not None
        live = next(a for a in tokens if owner_of[a] == entry.owner)

        # Bounded observation window (> timeout + sweep): the live session keeps pinging;
        # record every sample where the user is offline or the entry changed.
        violations: list[str] = []
        window_end = time.monotonic() + 2.0
        while time.monotonic() < window_end:
            reply = await peer.ping(live, tokens[live])
            now = await truth.entry("u", "X")
            if reply != "PONG" or now != entry:
                violations.append(f"ping {reply}, entry {now}")
            await asyncio.sleep(0.1)
        assert not violations, violations[:5]
    finally:
        peer.close()


async def test_a_replacement_notice_lost_while_the_inbox_was_down_is_found_soon(
    private_daemons: DaemonFactory, truth: Truth
) -> None:
    """A client's CONNECT reaches D1 and, retried, D2, which replaces D1's session in
    Redis; the client goes on with D1's answer and never uses D2's session, which times
    out. D2's notice to D1 was lost: D1's inbox subscription was down (a failover of its
    cluster node; here SUBSCRIBE refused and the connection cut). D1 compares what it
    holds with what Redis lists right after it subscribes again, so within seconds,
    not at the once-a-minute comparison, Redis lists the session the client uses."""
    one, two = private_daemons("D1"), private_daemons("D2")
    peer = await MultiPeer.open()
    try:
        first = (await peer.connect(one.address, "u", "X")).session
        await truth.redis.acl_setuser("default", enabled=True, commands=["-subscribe"])
        try:
            await truth.redis.client_kill_filter(_type="pubsub")
            inbox = keys.inbox_channel("D1")

            async def unsubscribed() -> bool:
                return await truth.redis.pubsub_numsub(inbox) == [(inbox, 0)]

            await eventually(unsubscribed, 3.0, "D1's inbox has no subscriber")
            second = (await peer.connect(two.address, "u", "X", previous=first)).session
            entry = await truth.entry("u", "X")
            assert entry is not None and (entry.owner, entry.token) == ("D2", second.hex())
        finally:
            await truth.redis.acl_setuser("default", enabled=True, commands=["+subscribe"])

        last: list[object] = []

        async def listed_as_used() -> bool:
            # The client pings only D1's session (so D2's times out).
            reply = await peer.ping(one.address, first)
            entry = await truth.entry("u", "X")
            last[:] = [reply, entry]
            return (
                reply == "PONG"
                and entry is not None
                and (entry.token, entry.owner) == (first.hex(), "D1")
            )

        await eventually(
            listed_as_used,
            6.0,
            "Redis lists the session the client uses, D1's",
            detail=lambda: (last, one.stderr()[-1500:]),
        )
    finally:
        peer.close()


# ---------------------------------------------------------------------------
# Finding 5.


async def test_redis_restarted_empty_is_refilled_while_clients_keep_running(
    private_redis: RedisServer, private_daemons: DaemonFactory, clients: Clients, truth: Truth
) -> None:
    """Finding 5: Redis restarts empty under two daemons holding 30 clients. Within ~5 s
    every user is online again, every declared friend list is back, every client's
    session is the one Redis holds, every view equals the truth; and a change made
    after the restart reaches friends (versions did not go backwards)."""
    one, two = private_daemons("d1", flags=LEASE), private_daemons("d2", flags=LEASE)
    pairs = [(f"a{i}", f"b{i}") for i in range(15)]
    declared = {a: [b, f"z{i}"] for i, (a, b) in enumerate(pairs)}  # z: never connects
    declared |= {b: [a] for a, b in pairs}
    expected = {a: {b: True, f"z{i}": False} for i, (a, b) in enumerate(pairs)}
    expected |= {b: {a: True} for a, b in pairs}
    specs = [(a, declared[a], [one.address]) for a, _ in pairs]
    specs += [(b, declared[b], [two.address]) for _, b in pairs]
    watched = await connect_all(clients, specs)
    by_user = {w.user: w for w in watched}
    users = list(by_user)
    await eventually(
        lambda: all(w.friends == expected[w.user] for w in watched),
        3.0,
        "every client sees its partner online",
    )

    await asyncio.to_thread(private_redis.restart_empty)
    deadline = time.monotonic() + 5.0

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    await eventually(
        lambda: truth.all_online(users),
        left(),
        "every user is online again",
        detail=lambda: truth.offline_users(users),
    )

    async def lists_back() -> bool:
        return all([await truth.friends(u) == set(declared[u]) for u in users])

    async def lists_now() -> dict[str, set[str]]:
        return {u: await truth.friends(u) for u in users[:3]}

    await eventually(
        lists_back, left(), "every declared friend list is back in Redis", detail=lists_now
    )

    async def sessions_held() -> bool:
        for w in watched:
            entry = await truth.entry(w.user, w.client.client_id)
            if w.client.session is None or entry is None or entry.token != w.client.session.hex():
                return False
        return True

    async def sessions_now() -> dict[str, tuple[str | None, str | None]]:
        found = {}
        for w in watched[:3]:
            entry = await truth.entry(w.user, w.client.client_id)
            session = w.client.session.hex()[:8] if w.client.session else None
            found[w.user] = (session, entry.token[:8] if entry else None)
        return found

    await eventually(
        sessions_held,
        left(),
        "every client's session is the one Redis holds",
        detail=sessions_now,
    )

    async def views_true() -> bool:
        for w in watched:
            if w.friends != await truth.visible(w.user, declared[w.user]):
                return False
        return True

    async def views_now() -> dict[str, tuple[dict[str, bool], dict[str, bool]]]:
        found = {}
        for w in watched:
            visible = await truth.visible(w.user, declared[w.user])
            if w.friends != visible:
                found[w.user] = (w.friends, visible)
        return found

    await eventually(
        views_true, left(), "every client's view equals the truth (view, truth)", detail=views_now
    )
    assert all(w.friends == expected[w.user] for w in watched)

    # A change after the restart reaches the friend (its version is not lower).
    await by_user["a0"].client.disconnect()
    await eventually(
        lambda: by_user["b0"].friends == {"a0": False},
        2.0,
        "b0 sees a0 go offline after the restart",
        detail=lambda: (by_user["b0"].friends, by_user["b0"].client.versions),
    )


# ---------------------------------------------------------------------------
# Finding 6.


def is_notify(data: bytes, direction: str) -> bool:
    try:
        return isinstance(decode(data), Notify)
    except ProtocolError:
        return False


@pytest.mark.parametrize("notify", ["delivered", "lost"])
async def test_second_terminal_forgets_a_friendship_that_ended(
    notify: str, private_daemons: DaemonFactory, fault_kit: FaultKit, clients: Clients
) -> None:
    """Finding 6: a client that keeps the stored list (the "second terminal") stops
    showing a friend online within ~2 s after another client of the same user removes
    that friend, even when the NOTIFY to it is lost."""
    daemon = private_daemons("d1")
    relay = fault_kit.relay(daemon.address, seed=6)
    await clients.connect("bob", ["alice"], [daemon.address])
    first = await clients.connect("alice", ["bob"], [daemon.address], client_id="alice-1")
    second = await clients.connect("alice", None, [relay.address], client_id="alice-2")
    await eventually(
        lambda: second.friends == {"bob": True}, 2.0, "the second terminal sees bob online"
    )
    if notify == "lost":
        relay.set_faults(drop_if=is_notify, directions=["down"])

    await first.client.remove_friends(["bob"])
    await eventually(
        lambda: not second.friends.get("bob", False),
        2.0,
        "the second terminal no longer shows bob online",
        detail=lambda: (second.friends, relay),
    )


# ---------------------------------------------------------------------------
# Finding 8.


async def test_library_calls_take_effect_in_call_order(
    private_redis: RedisServer, truth: Truth
) -> None:
    """Finding 8 (order): connected, connected, disconnected gathered on one Presence
    leave the user offline, every time (30 rounds)."""
    presence = Presence.from_url(private_redis.url)
    await presence.start()
    try:
        wrong: list[str] = []
        for round_ in range(30):
            results = await asyncio.gather(
                presence.connected("9", "sheep"),
                presence.connected("9", "sheep"),
                presence.disconnected("9"),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                wrong.append(f"round {round_}: {errors[0]!r}")
            elif (await truth.online(["sheep"]))["sheep"]:
                wrong.append(f"round {round_}: sheep online")
                await presence.disconnected("9")
        assert not wrong, f"{len(wrong)} of 30 rounds wrong: {wrong[:3]}"
    finally:
        await presence.close()


async def test_library_survives_600_concurrent_connects(
    private_redis: RedisServer, truth: Truth
) -> None:
    """Finding 8 (pool): Presence.from_url survives 600 concurrent ``connected`` calls
    (no MaxConnectionsError)."""
    presence = Presence.from_url(private_redis.url)
    await presence.start()
    try:
        users = [f"many{i}" for i in range(600)]
        results = await asyncio.gather(
            *(presence.connected(f"c-{u}", u) for u in users), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} of 600 calls raised, e.g. {errors[0]!r}"
        assert await truth.online(users) == dict.fromkeys(users, True)
    finally:
        await presence.close()


# ---------------------------------------------------------------------------
# Finding 9.


async def test_connect_while_redis_is_stopped_gets_try_again_quickly(
    private_redis: RedisServer, private_daemons: DaemonFactory
) -> None:
    """Finding 9 (timeout): with Redis stopped, a CONNECT is answered TRY_AGAIN within
    ~1.5 s when the daemon runs with --redis-timeout 0.5."""
    daemon = private_daemons("d1", flags={**REDIS_TIMEOUT, "--lease-ttl": "10"})
    async with await RawPeer.open(daemon.address) as peer:
        private_redis.pause()
        try:
            request = peer.next_request()
            peer.send(Connect(request, "ann-1", "ann"), pad_to=MAX_DATAGRAM)
            error, _ = await peer.recv_until(Error, 1.5, request=request)
            assert error.code is ErrorCode.TRY_AGAIN
        finally:
            private_redis.resume()


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
async def test_sdk_disconnect_raises_when_never_acknowledged(
    fault: str, private_daemons: DaemonFactory
) -> None:
    """Finding 9 (SDK): ``disconnect()`` raises PresenceClientError when the daemon never
    acknowledged it (the daemon is stopped or killed)."""
    daemon = private_daemons("d1")
    client = PresenceClient(
        "ann", [], servers=[daemon.address], client_id="ann-1", request_timeout=REQUEST_TIMEOUT
    )
    await client.connect()
    if fault == "SIGSTOP":
        daemon.send_signal(signal.SIGSTOP)
    else:
        daemon.kill()
    try:
        with pytest.raises(PresenceClientError):
            await asyncio.wait_for(client.disconnect(), 10.0)
    finally:
        if fault == "SIGSTOP":
            daemon.send_signal(signal.SIGCONT)
    assert not client.connected


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


async def test_daemon_refuses_an_instance_id_a_live_daemon_holds(
    private_redis: RedisServer, private_daemons: DaemonFactory
) -> None:
    """Finding 9 (instance id): a daemon started with the instance id of a live daemon
    exits non-zero within ~5 s with a one-line error on stderr (no traceback)."""
    holder = private_daemons("same-id")
    # Not from the factory: this one is expected to fail, and is checked here.
    clash = DaemonProcess(private_redis.url, "same-id")
    try:
        process = clash.spawn()
        started = time.monotonic()
        code = await asyncio.to_thread(wait_exit, process, 6.0)
        if code is None:
            late = await asyncio.to_thread(wait_exit, process, 10.0)
            pytest.fail(
                f"still running 6 s after start (exit code {late} after "
                f"{time.monotonic() - started:.1f} s); stderr:\n{clash.stderr()}"
            )
        stderr = clash.stderr()
        assert code != 0
        assert "Traceback" not in stderr, stderr
        errors = [line for line in stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "same-id" in errors[0], stderr
        assert holder.running
    finally:
        clash.cleanup()
