"""Failover end to end: rolling restarts, SIGKILL, shutdown with nowhere to go.

Real processes throughout: a real ``redis-server`` (the session one), real daemon
processes (``daemon_factory``), real UDP, SDK ``PresenceClient``s that list both daemons.

What is shown:

- a rolling restart (SIGTERM d1, restart it with the same instance id, then d2) makes no
  user flap: GO_AWAY moves every client to the other daemon within the drain grace;
- after a SIGKILL, clients that list another daemon move to it (ICMP, probes) before the
  dead daemon's lease runs out, so its reap finds nothing of theirs; a client that does
  not fail over goes offline once, within lease TTL + 2 s;
- a daemon stopped while no other daemon is alive removes its clients at once.

Every wait is a bounded poll (``helpers.wait_for``). Where something must NOT happen,
the test observes over a bounded window and asserts on what it recorded there.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import pytest
import pytest_asyncio
import redis.asyncio

from daemons import (  # noqa: F401
    Address,
    DaemonFactory,
    DaemonProcess,
    daemon_factory_fixture,
)
from helpers import wait_for
from presence_client.sdk import Event, FriendEvent, PresenceClient, StatusEvent
from presence_daemon import keys
from presence_daemon.presence import Presence, parse_inbox
from presence_daemon.store import Inbox

COUNTERS_RE: Final = re.compile(r"stopped; counters: (\{.*\})")
MOVED_RE: Final = re.compile(r"shutdown: (\d+) of (\d+) clients moved to another daemon")
CONNECT_CONCURRENCY: Final = 50
"""SDK connects (or disconnects) in flight at once while setting up or closing."""
CLOSE_TIMEOUT: Final = 10.0
"""Seconds one client may take to say goodbye (its daemon may be gone)."""


# ---------------------------------------------------------------------------
# Helpers.


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 free right now: a restarted daemon must come back on the
    address its clients list, so each daemon gets a fixed port instead of port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def udp_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the UDP socket bound to 127.0.0.1:``port`` (its
    receive buffer was full), from /proc/net/udp; None where that is not available."""
    try:
        lines = open("/proc/net/udp").read().splitlines()[1:]  # noqa: SIM115
    except OSError:
        return None
    wanted = f"0100007F:{port:04X}"
    for line in lines:
        fields = line.split()
        if len(fields) > 12 and fields[1] == wanted:
            return int(fields[12])
    return None


def daemon_counters(daemon: DaemonProcess) -> dict[str, int]:
    """The counters a daemon logs as it stops ({} if it did not log them)."""
    match = COUNTERS_RE.search(daemon.stderr())
    if match is None:
        return {}
    counters: dict[str, int] = ast.literal_eval(match[1])
    return counters


def daemon_moved(daemon: DaemonProcess) -> tuple[int, int] | None:
    """(moved, held) from the daemon's shutdown log line, if it waited for clients."""
    match = MOVED_RE.search(daemon.stderr())
    return None if match is None else (int(match[1]), int(match[2]))


@dataclass
class Recorded:
    """One SDK client and every event it emitted, each with its monotonic time."""

    client: PresenceClient
    friends: tuple[str, ...]
    events: list[tuple[float, Event]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client.add_listener(lambda event: self.events.append((time.monotonic(), event)))

    @property
    def user(self) -> str:
        return self.client.user

    def offline_events(self, since: float = 0.0) -> list[FriendEvent]:
        """FriendEvents saying a friend went offline, emitted at or after ``since``."""
        return [
            e for t, e in self.events if t >= since and isinstance(e, FriendEvent) and not e.online
        ]

    def seen(self, name: str) -> list[bool]:
        """The online values of the FriendEvents about ``name``, in order."""
        return [e.online for _, e in self.events if isinstance(e, FriendEvent) and e.name == name]

    def statuses(self, since: float = 0.0) -> list[tuple[float, str]]:
        return [(t, e.status) for t, e in self.events if t >= since and isinstance(e, StatusEvent)]

    def sees_all_friends_online(self) -> bool:
        return all(self.client.friends.get(name, False) for name in self.friends)


class Pool:
    """Creates recorded SDK clients and disconnects them all (bounded) at the end."""

    def __init__(self) -> None:
        self.all: list[Recorded] = []

    def create(
        self,
        user: str,
        friends: Iterable[str],
        servers: Sequence[Address],
        *,
        auto_reconnect: bool = True,
    ) -> Recorded:
        names = tuple(friends)
        client = PresenceClient(
            user,
            names,
            servers=list(servers),
            client_id=f"{user}-c",
            auto_reconnect=auto_reconnect,
        )
        recorded = Recorded(client, names)
        self.all.append(recorded)
        return recorded

    async def connect_all(self, recorded: Iterable[Recorded]) -> None:
        """Connect these clients concurrently, at most CONNECT_CONCURRENCY at once."""
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(r: Recorded) -> None:
            async with limit:
                await r.client.connect()

        await asyncio.gather(*(one(r) for r in recorded))

    async def close(self) -> None:
        """Disconnect every client (each bounded); report the first failure afterwards."""
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(r: Recorded) -> BaseException | None:
            async with limit:
                try:
                    await asyncio.wait_for(r.client.disconnect(), CLOSE_TIMEOUT)
                except Exception as exc:
                    return exc
                return None

        errors = [e for e in await asyncio.gather(*(one(r) for r in self.all)) if e]
        if errors:
            raise errors[0]


@pytest_asyncio.fixture
async def pool() -> AsyncIterator[Pool]:
    clients = Pool()
    try:
        yield clients
    finally:
        await clients.close()


class OnlineWatch:
    """Polls Redis in the background: is every one of ``users`` online?

    Records every check and every user found offline, so a test can assert that nobody
    was ever seen offline during the window the watch ran (a bounded observation).
    """

    def __init__(self, r: redis.asyncio.Redis, users: Iterable[str], interval: float) -> None:
        self.r = r
        self.users = list(users)
        self.interval = interval
        self.checks = 0
        self.offline: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def check(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        for user in self.users:
            pipe.exists(keys.clients_key(user))
        results = await pipe.execute()
        now = time.monotonic()
        self.checks += 1
        self.offline += [(now, u) for u, n in zip(self.users, results, strict=True) if not n]

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop polling (bounded), after one last check.

        The loop is asked to stop rather than cancelled: a cancellation that lands
        inside a redis-py pipeline call can be swallowed, and the poll goes on.
        """
        assert self._task is not None
        self._stop.set()
        await asyncio.wait_for(self._task, 5.0)
        await self.check()


async def stop_daemon(daemon: DaemonProcess, timeout: float = 10.0) -> tuple[int, float]:
    """SIGTERM the daemon; wait (bounded, off the event loop so clients keep running)
    for it to exit. Returns its exit code and how long it took."""
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(daemon.wait, timeout)
    return code, time.monotonic() - started


def all_connected_to(clients: Sequence[Recorded], server: Address) -> Callable[[], bool]:
    """A predicate: every one of ``clients`` is connected, to ``server``."""
    return lambda: all(c.client.connected and c.client.server == server for c in clients)


def move_durations(clients: Iterable[Recorded], since: float) -> list[float]:
    """Seconds from each "reconnecting" StatusEvent to the next "connected" one."""
    durations = []
    for c in clients:
        began: float | None = None
        for t, status in c.statuses(since):
            if status == "reconnecting":
                began = t
            elif status == "connected" and began is not None:
                durations.append(t - began)
                began = None
    return durations


def explain_connections(clients: Iterable[Recorded], server: Address, since: float) -> str:
    """The clients not connected to ``server``, with their status events since ``since``."""
    lines = [
        f"{c.user} servers={c.client.servers} connected={c.client.connected} "
        f"server={c.client.server} statuses={[(round(t - since, 3), s) for t, s in c.statuses()]}"
        for c in clients
        if not (c.client.connected and c.client.server == server)
    ]
    return "\n".join(lines[:15]) + f"\n({len(lines)} clients)"


async def explain_views(clients: Iterable[Recorded], r: redis.asyncio.Redis) -> str:
    """For each client that does not see all its friends online: its view, what Redis
    says about the friend, and whether a snapshot repairs the view."""
    lines = []
    for c in clients:
        if c.sees_all_friends_online():
            continue
        missing = [n for n in c.friends if not c.client.friends.get(n, False)]
        facts = []
        for name in missing:
            online = bool(await r.exists(keys.clients_key(name)))
            mutual = bool(await r.sismember(keys.friends_key(name), c.user)) and bool(
                await r.sismember(keys.fans_key(name), c.user)
            )
            facts.append(f"{name}: redis online={online} mutual={mutual}")
        before = (dict(c.client.friends), dict(c.client.versions), c.client.last_seq)
        try:
            await asyncio.wait_for(c.client.refresh(), 3.0)
            repaired = c.sees_all_friends_online()
        except Exception as exc:
            repaired = False
            facts.append(f"refresh failed: {exc!r}")
        lines.append(
            f"{c.user} on {c.client.server} connected={c.client.connected} "
            f"view/versions/last_seq={before} {facts}; refresh repairs: {repaired}; "
            f"events={[(round(t, 3), e) for t, e in c.events]}"
        )
    return "\n".join(lines[:20]) + f"\n({len(lines)} clients)"


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], deadline: float, what: str
) -> None:
    """``wait_for`` until an absolute monotonic ``deadline`` (fails once it has passed)."""
    await wait_for(predicate, max(deadline - time.monotonic(), 0.0), 0.02, what)


# ---------------------------------------------------------------------------
# 1. Rolling restart: no flap.

ROLLING_FLAGS: Final = {
    "--ping-interval": "1",
    "--timeout": "3",
    "--lease-ttl": "3",
    "--drain-grace": "3",
}
GROUPS_OF_TWO: Final = 100
GROUPS_OF_THREE: Final = 100
"""500 users, one client each, in mutual pairs and triples: everyone is watched."""


def friend_groups() -> list[list[str]]:
    groups = [[f"p{i}a", f"p{i}b"] for i in range(GROUPS_OF_TWO)]
    groups += [[f"t{i}a", f"t{i}b", f"t{i}c"] for i in range(GROUPS_OF_THREE)]
    return groups


async def test_rolling_restart_flaps_nobody(
    daemon_factory: DaemonFactory, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    ports = {"d1": free_udp_port(), "d2": free_udp_port()}

    def create(instance_id: str) -> DaemonProcess:
        flags = {**ROLLING_FLAGS, "--port": str(ports[instance_id])}
        return daemon_factory.create(instance_id, flags=flags)

    d1, d2 = await create("d1").astart(), await create("d2").astart()
    addresses = {"d1": d1.address, "d2": d2.address}

    # Half the clients list [d1, d2], half [d2, d1]; within a group they alternate, so
    # most friendships span the two daemons (hand-off through the inbox).
    index = 0
    for group in friend_groups():
        for user in group:
            order = ("d1", "d2") if index % 2 == 0 else ("d2", "d1")
            pool.create(user, [u for u in group if u != user], [addresses[o] for o in order])
            index += 1
    clients = pool.all
    assert len(clients) == 500
    setup_started = time.monotonic()
    await pool.connect_all(clients)
    try:
        await wait_for(
            lambda: all(c.sees_all_friends_online() for c in clients),
            10.0,
            0.05,
            "every client sees all its friends online",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await explain_views(clients, redis_client)}") from None
    setup_seconds = time.monotonic() - setup_started
    assert sum(c.client.server == d1.address for c in clients) == 250

    watch = OnlineWatch(redis_client, [c.user for c in clients], 0.1)
    start = time.monotonic()
    watch.start()

    exits: list[tuple[str, int, float]] = []
    stopped: list[DaemonProcess] = []
    phases: list[tuple[str, float]] = []
    drops: list[tuple[str, int | None]] = []

    def phase(what: str) -> None:
        phases.append((what, time.monotonic() - start))

    for name, other in (("d1", "d2"), ("d2", "d1")):
        old = d1 if name == "d1" else d2
        code, took = await stop_daemon(old)
        exits.append((name, code, took))
        stopped.append(old)
        phase(f"{name} exited")
        # Every client now talks to the other daemon (they moved within the grace).
        try:
            await wait_for(
                all_connected_to(clients, addresses[other]),
                5.0,
                0.05,
                f"every client is connected to {other} after {name} stopped",
            )
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; addresses {addresses}; phases {phases}\n"
                + explain_connections(clients, addresses[other], start)
                + f"\n{name} log:\n{old.stderr()[-3000:]}"
            ) from None
        phase(f"all on {other}")
        drops.append((other, udp_drops(ports[other])))
        # The same instance id comes back on the same address.
        new = await create(name).astart()
        assert (new.instance_id, new.address) == (name, addresses[name])
        phase(f"{name} ready again")
        if name == "d1":
            d1 = new
        else:
            d2 = new

    await watch.stop()
    elapsed = time.monotonic() - start

    # What must NOT happen is checked on what was recorded over a bounded window, from
    # `start` to the restart of d2: no client emitted an offline FriendEvent, and no
    # poll of Redis (every 0.1 s) found any user offline.
    offline_events = [
        (round(t - start, 2), c.user, e.name)
        for c in clients
        for t, e in c.events
        if t >= start and isinstance(e, FriendEvent) and not e.online
    ]
    print(
        f"\nrolling restart: setup {setup_seconds:.1f} s, restart {elapsed:.1f} s, "
        f"{watch.checks} online checks; exits {exits}\n"
        f"  phases: {[(what, round(t, 2)) for what, t in phases]}\n"
        f"  datagrams dropped at the receiving daemon's socket: {drops}\n"
        f"  offline events: {len(offline_events)} {sorted(offline_events)[:3]}; "
        f"seen offline in Redis: {len(watch.offline)} "
        f"{[(round(t - start, 2), u) for t, u in watch.offline[:3]]}"
    )
    for daemon in stopped:
        counters = daemon_counters(daemon)
        print(
            f"  {daemon.instance_id}: moved {daemon_moved(daemon)}, "
            + ", ".join(
                f"{k}={counters.get(k, 0)}"
                for k in (
                    "go_away_sent",
                    "sessions_replaced_elsewhere",
                    "connects_repeated",
                    "refused_stopping",
                    "redis_errors",
                    "internal_errors",
                )
            )
        )
    reconnects = sum(
        1 for c in clients for _, status in c.statuses(start) if status == "reconnecting"
    )
    moves = sorted(move_durations(clients, start))
    print(
        f"  client reconnects: {reconnects}; reconnecting -> connected took "
        f"median {moves[len(moves) // 2]:.3f} s, max {moves[-1]:.3f} s"
    )
    assert offline_events == []
    assert watch.checks >= 10
    assert watch.offline == []
    assert [(name, code) for name, code, _ in exits] == [("d1", 0), ("d2", 0)]
    for daemon in stopped:
        assert daemon_moved(daemon) == (250 if daemon is stopped[0] else 500,) * 2
        assert daemon_counters(daemon).get("internal_errors", 0) == 0
    assert all(c.client.connected and c.client.server == d1.address for c in clients)
    assert all(c.sees_all_friends_online() for c in clients)
    # The d1 clients moved twice, the d2 clients once (extra reconnects, say after
    # unanswered probes, are no flap by themselves and are only printed above).
    assert reconnects >= 250 + 500

    # Clean stop of the restarted pair once the clients are gone.
    await pool.close()
    for daemon in (d2, d1):
        code, _ = await stop_daemon(daemon)
        assert code == 0


# ---------------------------------------------------------------------------
# 2. SIGKILL: clients fail over before the reap; a client that cannot is reaped once.

KILL_FLAGS: Final = {"--ping-interval": "0.5", "--timeout": "1.5", "--lease-ttl": "3"}
LEASE_TTL: Final = 3.0
RENEW_INTERVAL: Final = 1.0
"""The daemon renews its lease every second (a third of the TTL if that is shorter)."""
MOVERS: Final = 40


@pytest.mark.backends
async def test_sigkill_clients_fail_over_before_the_reap(
    daemon_factory: DaemonFactory, pool: Pool, redis_client: redis.asyncio.Redis
) -> None:
    r = redis_client
    d1 = daemon_factory("d1", flags=KILL_FLAGS)
    d2 = daemon_factory("d2", flags=KILL_FLAGS)
    watchers = [pool.create(f"w{i}", [f"m{i}"], [d2.address]) for i in range(MOVERS)]
    movers = [pool.create(f"m{i}", [f"w{i}"], [d1.address, d2.address]) for i in range(MOVERS)]
    lonely_watcher = pool.create("lw", ["lonely"], [d2.address])
    await pool.connect_all([*watchers, lonely_watcher])
    await pool.connect_all(movers)
    # Fails over nowhere: one server, no reconnect.
    lonely = pool.create("lonely", ["lw"], [d1.address], auto_reconnect=False)
    await lonely.client.connect()
    await wait_for(
        lambda: all(c.sees_all_friends_online() for c in pool.all),
        5.0,
        0.02,
        "every client sees its friend online",
    )
    assert {c.client.server for c in movers} == {d1.address}
    assert await r.scard(keys.owned_key("d1")) == MOVERS + 1

    watch = OnlineWatch(r, [c.user for c in movers], 0.05)
    watch.start()
    killed = time.monotonic()
    d1.kill()

    # The movers fail over to d2 (ICMP on their next ping, else the probes), well
    # before d1's lease can have run out (its last renewal was at most 1 s before the
    # kill, so no survivor can reap before killed + TTL - 1 s).
    earliest_reap = killed + LEASE_TTL - RENEW_INTERVAL
    await eventually(
        all_connected_to(movers, d2.address),
        earliest_reap,
        "every mover is connected to d2 before d1's lease can run out",
    )
    # What d1 still lists can only be the client that did not fail over: each mover's
    # connect through d2 took its member out of d1's set.
    left = {
        m.decode() if isinstance(m, bytes) else m for m in await r.smembers(keys.owned_key("d1"))
    }
    assert {member.split("|", 2)[1] for member in left} <= {lonely.client.client_id}
    failover_times = [
        next(t for t, status in c.statuses(killed) if status == "connected") - killed
        for c in movers
    ]

    # Within TTL + 2 s of the kill, d2 has reaped what was left of d1: only the client
    # that did not fail over, which goes offline, and its watcher is told.
    async def nothing_left_of_d1() -> bool:
        return not await r.exists(keys.owned_key("d1")) or not await r.scard(keys.owned_key("d1"))

    deadline = killed + LEASE_TTL + 2.0
    await eventually(nothing_left_of_d1, deadline, "d1's owner set is empty or gone")
    await eventually(
        lambda: lonely_watcher.client.friends["lonely"] is False,
        deadline,
        "lw sees lonely offline",
    )
    reaped_after = time.monotonic() - killed
    assert not await r.exists(keys.clients_key("lonely"))
    assert not lonely.client.connected

    # Observe a little longer (a bounded window: 1 s more), then assert on what was
    # recorded since the kill: no second offline notification, no mover ever offline.
    await asyncio.sleep(1.0)
    await watch.stop()
    print(
        f"\nsigkill: failover in {min(failover_times):.2f}-{max(failover_times):.2f} s, "
        f"d1 reaped within {reaped_after:.2f} s, {watch.checks} online checks; "
        f"d1 still registered: {bool(await r.sismember(keys.OWNERS_KEY, 'd1'))}"
    )
    assert watch.offline == []
    assert [(w.user, e.name) for w in watchers for e in w.offline_events()] == []
    assert [(m.user, e.name) for m in movers for e in m.offline_events()] == []
    assert all(w.seen(f"m{i}") == [True] for i, w in enumerate(watchers))
    assert lonely_watcher.seen("lonely") == [True, False]
    # The daemon numbered exactly two notifications for lw: lonely online, then
    # offline (a snapshot round trip reports the count; a duplicate would show here).
    await lonely_watcher.client.refresh()
    assert lonely_watcher.client.last_seq == 2
    assert not await r.sismember(keys.OWNERS_KEY, "d1")


# ---------------------------------------------------------------------------
# 3. Shutdown with no other daemon alive: no grace, clients removed at once.


@pytest.mark.backends
async def test_sigterm_of_the_only_daemon_removes_its_clients_at_once(
    daemon_factory: DaemonFactory, pool: Pool, redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    r = redis_client
    daemon = daemon_factory("only", flags={**ROLLING_FLAGS, "--drain-grace": "5"})
    users = [f"s{i}" for i in range(20)]
    # A friend held elsewhere: a web backend on the presence library (no lease, so it
    # is not an owner a stopping daemon could send clients to). Notifications for its
    # client arrive on its inbox channel.
    library = Presence.from_url(redis_url, instance_id="web", lease_ttl=None)
    await library.start()
    inbox = Inbox(library.redis, keys.inbox_channel("web"))  # sharded on a cluster
    await inbox.subscribe()
    told: list[tuple[str, bool]] = []
    # Asked to stop, not cancelled (see OnlineWatch.stop), and awaited with a bound.
    done = asyncio.Event()

    async def listen() -> None:
        while not done.is_set():
            data = await inbox.get(timeout=1.0)
            if data is not None:
                deliveries, _ = parse_inbox(data)
                told.extend((d.friend.name, d.friend.online) for d in deliveries if d.friend)

    listener = asyncio.get_running_loop().create_task(listen())
    try:
        await library.connected("web-1", "observer", friends=users)
        # One server and no reconnect: these clients have nowhere to go.
        clients = [
            pool.create(user, ["observer"], [daemon.address], auto_reconnect=False)
            for user in users
        ]
        await pool.connect_all(clients)
        await wait_for(
            lambda: all(c.sees_all_friends_online() for c in clients),
            5.0,
            what="every client sees the observer online",
        )
        assert (await library.query(users)) == dict.fromkeys(users, True)

        code, took = await stop_daemon(daemon)
        gone = await library.query(users)  # right after the exit: nothing was left
        await wait_for(
            lambda: sorted(told) == sorted((u, online) for u in users for online in (True, False)),
            2.0,
            what="the observer's inbox got every user online, then offline",
        )
        # The clients notice (ICMP on their next ping) and close; observing that long
        # also shows that no second offline notification arrives.
        await wait_for(
            lambda: not any(c.client.connected for c in clients),
            3.0,
            what="every client notices its daemon is gone",
        )
        counters = daemon_counters(daemon)
        print(
            f"\nonly daemon: exit {code} after {took:.2f} s; go_away_sent="
            f"{counters.get('go_away_sent', 0)}, moved line: {daemon_moved(daemon)}"
        )
        assert code == 0
        assert took < 2.0, f"the daemon waited {took:.2f} s with nowhere to send its clients"
        assert gone == dict.fromkeys(users, False)
        assert sorted(told) == sorted((u, online) for u in users for online in (True, False))
        assert counters.get("go_away_sent", 0) == 0
        assert daemon_moved(daemon) is None
        assert not await r.exists(keys.owned_key("only"))
        assert not await r.sismember(keys.OWNERS_KEY, "only")
    finally:
        done.set()
        await asyncio.wait_for(listener, 5.0)
        await inbox.aclose()
        with contextlib.suppress(Exception):
            await library.disconnected("web-1")
        await library.close()
