"""Issue 10: every view heals after a lossy, duplicating, reordering network.

Theory of operation
-------------------
Twelve SDK clients (:class:`~presence_client.sdk.PresenceClient`) of six users talk to
one or two real daemon processes through seeded :class:`~faults.UdpRelay` s (one relay
per daemon). Each user has two terminals: ``<user>-1`` declares its own friend list and
``<user>-2`` keeps the stored one (``friends=None``, the "second terminal", connected
after the first declared the list). The users' lists mix mutual and one-sided
friendships and a name that never connects.

With every client connected and every view right, the relays start dropping 20 %,
duplicating 5 % and delaying (uniform 0-50 ms, so they reorder) the datagrams in both
directions. Under those faults a seeded sequence of operations runs: a terminal
disconnects or connects again, or adds or removes a friend, the SDK retrying as it
does. An operation that ends in :class:`~presence_client.sdk.PresenceClientError`
(no answer after its retries, refused because a reconnect replaced the session, or
tried while the SDK was reconnecting) has an unknown outcome: the test does not guess
it, it reads the truth from Redis.

Then the test waits (faults still on) until Redis holds exactly the modelled clients: a
client whose goodbye was never acknowledged, or a CONNECT whose duplicate arrived after
the goodbye, leaves a session that the daemon drops only after its timeout. From then
on Redis has nothing left to change on its own. A last burst of friend changes follows,
and the faults stop (``relay.clear()``) as soon as it returns, so some of its
notifications were lost and the views have repairing to do. From ``clear()``:

- within :data:`CONVERGE_BOUND` every terminal that should be connected is connected
  and its ``.friends`` equals the truth read from Redis: its keys are exactly the
  names in ``SMEMBERS presence:{user}:friends`` (so a terminal keeping the stored list
  shows exactly the stored names) and a name is shown online iff that friend has a
  ``presence:{friend}:clients`` key and both declare each other;
- for :data:`STABLE_WINDOW` after that the views stay right (a late or duplicated
  datagram changes nothing) and Redis holds exactly the modelled clients;
- every terminal then holds the session Redis holds for its client id.

The seed drives the relays and the operations; SDK jitter and scheduling are not
seeded, so a seed replays the same fault per datagram index, not the same run. Each
run prints the relays' counters, the SDK's own reconnects and the operation log (also
in every failure message).

Three small deterministic tests at the end isolate what the big one found: a terminal
keeping the stored list that changes a friend replaces the view (and, on its next
connect, the user's list) with its own partial list; a terminal keeping the stored list
never learns a name another terminal of its user added while nothing was notified about
it; a friend change whose retry is refused UNKNOWN_SESSION (the SDK reconnected
meanwhile) is rolled back in the view although the daemon applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import pytest
import pytest_asyncio
import redis.asyncio

from daemons import DaemonFactory
from faults import (  # noqa: F401
    Direction,
    FaultKit,
    RedisServer,
    UdpRelay,
    fault_kit_fixture,
    private_daemons_fixture,
    private_redis_fixture,
)
from helpers import wait_for
from presence_client.protocol import (
    ConnectOk,
    ErrorCode,
    Friends,
    FriendsOk,
    Pong,
    ProtocolError,
    Snapshot,
    decode,
)
from presence_client.sdk import Event, PresenceClient, PresenceClientError, StatusEvent
from presence_daemon import keys

Address = tuple[str, int]

# ---------------------------------------------------------------------------
# Timing, all derived from the flags.

PING_INTERVAL: Final = 0.2
"""The daemons' ``--ping-interval`` (seconds)."""
DAEMON_TIMEOUT: Final = 2.0
"""The daemons' ``--timeout``: long enough that a burst of dropped pings (20 % loss
each way, a probe every ping interval) never times a live session out."""
SWEEP_INTERVAL: Final = 0.05
"""The daemons' ``--sweep-interval`` (the test factory's default, stated here)."""
DAEMON_FLAGS: Final = {
    "--ping-interval": str(PING_INTERVAL),
    "--timeout": str(DAEMON_TIMEOUT),
    "--sweep-interval": str(SWEEP_INTERVAL),
}

DROP: Final = 0.20
DUPLICATE: Final = 0.05
DELAY: Final = (0.0, 0.05)
"""Relay faults, the same both ways."""

REQUEST_TIMEOUT: Final = 0.2
"""The SDK's first retry delay (then doubling)."""
MAX_BACKOFF: Final = 0.4
"""The SDK's longest wait between two retries. Short, so that a request retried while
the faults were on is sent again soon after they stop."""
JITTER: Final = 1.2
"""The SDK stretches each retry wait by up to this factor."""

SNAPSHOT_SLACK: Final = MAX_BACKOFF * JITTER + 2 * DELAY[1] + 0.02
"""0.6 s for one snapshot round trip, however the repair was left when the faults
stopped: a request (snapshot request, or a reconnect's CONNECT) waiting for its retry is
sent again within ``MAX_BACKOFF * JITTER`` (0.48 s); the round trip crosses the relay,
whose datagrams delayed before ``clear()`` still arrive within ``DELAY[1]`` each way
(0.1 s); 20 ms for the daemon's Redis reads and scheduling."""
CONVERGE_BOUND: Final = 2 * PING_INTERVAL + SNAPSHOT_SLACK
"""1.0 s from ``clear()``. Two ping intervals for a gap to show: the SDK pings every
interval, and the PONG after ``clear()`` reports the last notification number, so a
lost NOTIFY shows up within an interval, or a probe interval (0.25 s, the SDK's floor)
later if the ping in flight was lost just before; then one snapshot round trip with the
slack above. The longest path measured is far shorter (see the printed times)."""
STABLE_WINDOW: Final = 3 * PING_INTERVAL
"""After converging, the views are sampled this long and must stay right."""
SETTLE_BOUND: Final = DAEMON_TIMEOUT + SWEEP_INTERVAL + 1.0
"""Redis drops a session whose client went away unacknowledged within the daemon's
timeout plus one sweep; 1 s more for the removal itself (the daemon's queue, the Redis
script, the fan-out) and for a duplicated CONNECT still delayed in the relay."""

OPERATIONS: Final = 16
OP_GAP: Final = (0.0, 0.2)
"""Seconds between two operations (seeded)."""
FAULT_TAIL: Final = 0.5
"""Seconds the faults stay on after the operations (pings and repairs under loss)."""
FINAL_BURST: Final = 4
"""Friend changes made back to back just before the faults stop."""

# ---------------------------------------------------------------------------
# Who declares whom.

DECLARED: Final[Mapping[str, tuple[str, ...]]] = {
    "ann": ("ben", "cat", "eve"),
    "ben": ("ann", "dan"),
    "cat": ("ann", "fay"),
    "dan": ("ben", "eve"),
    "eve": ("fay",),
    "fay": ("cat", "eve", "zed"),
}
"""Mutual: ann-ben, ann-cat, ben-dan, cat-fay, eve-fay. One-sided: ann->eve, dan->eve,
fay->zed (zed never connects)."""
USERS: Final = tuple(DECLARED)
NAMES: Final = (*USERS, "zed")
"""Every name an operation may add or remove."""


# ---------------------------------------------------------------------------
# Terminals and the model of who is connected.


@dataclass(slots=True)
class Terminal:
    """One SDK client and what the test believes about it."""

    client: PresenceClient
    should_be_connected: bool = False
    """The model: its last connect() returned and no disconnect() was called since."""
    reconnects: int = 0
    """How often the SDK reconnected on its own (probes unanswered, UNKNOWN_SESSION)."""

    def __post_init__(self) -> None:
        self.client.add_listener(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, StatusEvent) and event.status == "reconnecting":
            self.reconnects += 1

    @property
    def user(self) -> str:
        return self.client.user

    @property
    def client_id(self) -> str:
        return self.client.client_id

    @property
    def declares(self) -> bool:
        """True: it declared its own list; False: it keeps the stored list."""
        return self.client_id.endswith("-1")


class Pool:
    """Every terminal of the test; says goodbye for all of them at teardown."""

    def __init__(self) -> None:
        self.terminals: list[Terminal] = []
        self.relays: list[UdpRelay] = []

    def add(
        self, user: str, client_id: str, friends: Iterable[str] | None, server: Address
    ) -> Terminal:
        client = PresenceClient(
            user,
            friends,
            servers=[server],
            client_id=client_id,
            request_timeout=REQUEST_TIMEOUT,
            max_backoff=MAX_BACKOFF,
        )
        terminal = Terminal(client)
        self.terminals.append(terminal)
        return terminal

    async def close(self) -> None:
        for relay in self.relays:
            relay.clear()  # goodbyes need no retries

        async def goodbye(terminal: Terminal) -> None:
            with contextlib.suppress(PresenceClientError):
                await terminal.client.disconnect()

        await asyncio.wait_for(
            asyncio.gather(*(goodbye(t) for t in self.terminals), return_exceptions=True), 15.0
        )


@pytest_asyncio.fixture
async def pool(private_daemons: DaemonFactory, fault_kit: FaultKit) -> AsyncIterator[Pool]:
    """Terminals; closed before the relays and the daemons (it depends on both)."""
    terminals = Pool()
    try:
        yield terminals
    finally:
        await terminals.close()


@pytest_asyncio.fixture
async def store(private_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A Redis client of the test's own, to read the truth (never through a daemon)."""
    client = redis.asyncio.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------
# The truth, read straight from Redis.


@dataclass(frozen=True, slots=True)
class Truth:
    lists: dict[str, set[str]]
    """User -> SMEMBERS presence:{user}:friends (every name in NAMES)."""
    clients: dict[str, dict[str, str]]
    """User -> HGETALL presence:{user}:clients (client id -> "token|owner|address")."""

    def online(self, name: str) -> bool:
        return bool(self.clients[name])

    def view(self, user: str) -> dict[str, bool]:
        """How the user's declared names should look to every client of it."""
        return {
            name: self.online(name) and user in self.lists[name]
            for name in sorted(self.lists[user])
        }


async def read_truth(store: redis.asyncio.Redis) -> Truth:
    pipe = store.pipeline(transaction=True)  # one consistent cut of every key
    for name in NAMES:
        pipe.smembers(keys.friends_key(name))
        pipe.hgetall(keys.clients_key(name))
    replies = await pipe.execute()
    lists = {name: {str(n) for n in replies[2 * i]} for i, name in enumerate(NAMES)}
    clients = {
        name: {str(k): str(v) for k, v in replies[2 * i + 1].items()}
        for i, name in enumerate(NAMES)
    }
    return Truth(lists, clients)


def redis_mismatches(truth: Truth, terminals: Iterable[Terminal]) -> list[str]:
    """Where Redis's client entries differ from the model of who is connected."""
    wanted: dict[str, set[str]] = {name: set() for name in NAMES}
    for t in terminals:
        if t.should_be_connected:
            wanted[t.user].add(t.client_id)
    return [
        f"{name}: redis {sorted(truth.clients[name])} != model {sorted(wanted[name])}"
        for name in NAMES
        if set(truth.clients[name]) != wanted[name]
    ]


def view_mismatches(
    truth: Truth, terminals: Iterable[Terminal], *, connected: bool = True
) -> list[str]:
    """Every modelled-connected terminal whose view is wrong (or, with ``connected``,
    that is not connected right now: reconnecting)."""
    wrong = []
    for t in terminals:
        if not t.should_be_connected:
            continue
        if connected and not t.client.connected:
            wrong.append(f"{t.client_id}: not connected (reconnecting)")
            continue
        expected = truth.view(t.user)
        if t.client.friends != expected:
            kind = "declares" if t.declares else "stored list"
            wrong.append(f"{t.client_id} ({kind}): view {t.client.friends} != truth {expected}")
    return wrong


def session_mismatches(truth: Truth, terminals: Iterable[Terminal]) -> list[str]:
    """Connected terminals whose session is not the one Redis holds for their id."""
    wrong = []
    for t in terminals:
        if not t.should_be_connected:
            continue
        entry = truth.clients[t.user].get(t.client_id)
        session = t.client.session
        if entry is None or session is None or entry.split("|", 1)[0] != session.hex():
            held = session.hex()[:8] if session else None
            wrong.append(f"{t.client_id}: session {held}, redis entry {entry}")
    return wrong


def counters(relays: Sequence[UdpRelay]) -> str:
    return "; ".join(
        f"relay{i} seed={r.seed} received={r.received} sent={r.sent} dropped={r.dropped} "
        f"duplicated={r.duplicated} delayed={r.delayed}"
        for i, r in enumerate(relays)
    )


# ---------------------------------------------------------------------------
# Operations under faults.


class OpLog:
    """What each operation did, with the time since the faults started."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lines: list[str] = []
        self.unknown = 0

    def record(self, what: str, outcome: str) -> None:
        self.lines.append(f"{time.monotonic() - self.start:6.2f}s {what}: {outcome}")

    def __str__(self) -> str:
        return "\n".join(self.lines)


async def run_operation(
    rng: random.Random, terminals: Sequence[Terminal], log: OpLog, *, friends_only: bool = False
) -> None:
    """One seeded operation: toggle a terminal's connection, or change a friend list.

    The draws do not depend on earlier outcomes; a toggle connects a terminal the model
    holds disconnected and disconnects one it holds connected. With ``friends_only``,
    only connected terminals are picked and only friend changes are made.
    """
    candidates = [t for t in terminals if t.should_be_connected] if friends_only else terminals
    terminal = rng.choice(candidates)
    roll = rng.uniform(0.3, 1.0) if friends_only else rng.random()
    name = rng.choice([n for n in NAMES if n != terminal.user])
    client = terminal.client
    connecting = False
    if roll < 0.3 or not terminal.should_be_connected:
        if terminal.should_be_connected:
            what = f"{terminal.client_id} disconnect"
            terminal.should_be_connected = False  # closed, whatever the daemon heard
            call = client.disconnect()
        else:
            what = f"{terminal.client_id} connect"
            connecting = True
            call = client.connect()
    elif roll < 0.65:
        what = f"{terminal.client_id} add {name}"
        call = client.add_friends([name])
    else:
        what = f"{terminal.client_id} remove {name}"
        call = client.remove_friends([name])
    started = time.monotonic()
    try:
        await call
    except PresenceClientError as exc:
        log.unknown += 1
        log.record(what, f"outcome unknown after {time.monotonic() - started:.2f} s ({exc})")
        return
    terminal.should_be_connected |= connecting
    log.record(what, f"ok in {time.monotonic() - started:.2f} s")


# ---------------------------------------------------------------------------
# Waiting.


async def eventually(
    predicate: Callable[[], Awaitable[list[str]]],
    timeout: float,
    what: str,
    context: Callable[[], str],
) -> float:
    """Wait (bounded, through helpers.wait_for) until ``predicate`` lists no problem;
    returns the seconds it took. On failure the message shows the last problems seen
    and ``context()``."""
    last: list[str] = []
    started = time.monotonic()

    async def ok() -> bool:
        nonlocal last
        last = await predicate()
        return not last

    try:
        await wait_for(ok, timeout, interval=0.01, what=what)
    except AssertionError as exc:
        problems = "\n  ".join(last)
        raise AssertionError(f"{exc}\nlast seen:\n  {problems}\n{context()}") from None
    return time.monotonic() - started


# ---------------------------------------------------------------------------
# The test.


@pytest.mark.parametrize(
    ("seed", "daemon_count"),
    [
        pytest.param(101, 1, id="seed101-one-daemon"),
        pytest.param(202, 2, id="seed202-two-daemons"),
        pytest.param(303, 2, id="seed303-two-daemons"),
    ],
)
async def test_views_converge_after_lossy_network_heals(
    seed: int,
    daemon_count: int,
    private_daemons: DaemonFactory,
    fault_kit: FaultKit,
    pool: Pool,
    store: redis.asyncio.Redis,
) -> None:
    """Under 20 % loss, 5 % duplicates and 0-50 ms reordering both ways, seeded
    connects, disconnects and friend changes of 12 terminals; after ``clear()`` every
    connected terminal's view equals the truth in Redis within CONVERGE_BOUND (1 s),
    stays so, and Redis holds exactly the connected terminals, each under its session."""
    daemons = await asyncio.gather(
        *(private_daemons.astart(f"d{i + 1}", flags=DAEMON_FLAGS) for i in range(daemon_count))
    )
    relays = [fault_kit.relay(d.address, seed=seed + i) for i, d in enumerate(daemons)]
    pool.relays = relays
    # A user's two terminals go through different daemons when there are two.
    firsts = [
        pool.add(u, f"{u}-1", DECLARED[u], relays[i % len(relays)].address)
        for i, u in enumerate(USERS)
    ]
    seconds = [
        pool.add(u, f"{u}-2", None, relays[(i + 1) % len(relays)].address)
        for i, u in enumerate(USERS)
    ]
    terminals = pool.terminals
    log = OpLog()

    def context() -> str:
        reconnects = {t.client_id: t.reconnects for t in terminals if t.reconnects}
        return f"{counters(relays)}\nSDK reconnects: {reconnects}\noperations:\n{log}"

    async def all_right() -> list[str]:
        truth = await read_truth(store)
        return redis_mismatches(truth, terminals) + view_mismatches(truth, terminals)

    async def redis_vs_model() -> list[str]:
        return redis_mismatches(await read_truth(store), terminals)

    # A clean start: the first terminals declare, then the second ones keep that list.
    for group in (firsts, seconds):
        await asyncio.gather(*(t.client.connect() for t in group))
        for t in group:
            t.should_be_connected = True
    await eventually(all_right, 3.0, "every view is right before the faults", context)

    # Faults on; the seeded operations; a while of pings and repairs under loss.
    for relay in relays:
        relay.set_faults(drop=DROP, duplicate=DUPLICATE, delay=DELAY)
    log = OpLog()
    rng = random.Random(seed)
    for _ in range(OPERATIONS):
        await asyncio.sleep(rng.uniform(*OP_GAP))
        await run_operation(rng, terminals, log)
    await asyncio.sleep(FAULT_TAIL)
    # Sessions whose goodbye was lost time out; then Redis has nothing left to change
    # on its own, and the views can be held to it.
    await eventually(
        redis_vs_model, SETTLE_BOUND, "Redis holds exactly the connected terminals", context
    )
    # A last burst of friend changes, with the faults stopped at once after it: their
    # notifications are lost at 20 %, so the repair after clear() has work to do.
    for _ in range(FINAL_BURST):
        await run_operation(rng, terminals, log, friends_only=True)

    # Faults off: from now on every view must heal within the bound.
    for relay in relays:
        relay.clear()
    cleared = time.monotonic()
    reconnects_at_clear = {t.client_id: t.reconnects for t in terminals}
    wrong_at_clear = len(await all_right())
    await eventually(
        all_right,
        CONVERGE_BOUND - (time.monotonic() - cleared),
        f"every view equals the truth within {CONVERGE_BOUND:.2f} s of clear()",
        context,
    )
    took = time.monotonic() - cleared
    print(
        f"\nseed {seed}, {daemon_count} daemon(s): {wrong_at_clear} problem(s) at clear(), "
        f"converged {took:.3f} s after it (bound {CONVERGE_BOUND:.2f} s); "
        f"{log.unknown} of {OPERATIONS + FINAL_BURST} operations with unknown outcome; "
        f"connected at the end: {sum(t.should_be_connected for t in terminals)} of "
        f"{len(terminals)}\n{context()}",
        flush=True,
    )

    # Bounded observation window: the views stay right (late duplicates change nothing)
    # and Redis does not move. A terminal may still reconnect once, soon after clear():
    # its last probes went out, and were lost, while the faults were on (the view is
    # kept across the reconnect, so it is checked all the same).
    violations: list[str] = []
    window_end = time.monotonic() + STABLE_WINDOW
    while time.monotonic() < window_end:
        truth = await read_truth(store)
        violations += redis_mismatches(truth, terminals)
        violations += view_mismatches(truth, terminals, connected=False)
        await asyncio.sleep(0.02)
    assert not violations, f"{len(violations)} bad samples after converging: {violations[:5]}"

    async def sessions_held() -> list[str]:
        return session_mismatches(await read_truth(store), terminals)

    await eventually(
        sessions_held, CONVERGE_BOUND, "every terminal holds the session Redis holds", context
    )
    truth = await read_truth(store)
    for t in terminals:
        if t.should_be_connected and not t.declares:
            assert set(t.client.friends) == truth.lists[t.user], (
                f"{t.client_id} keeps the stored list but shows {sorted(t.client.friends)}, "
                f"stored: {sorted(truth.lists[t.user])}"
            )
    late = {
        t.client_id: t.reconnects - reconnects_at_clear[t.client_id]
        for t in terminals
        if t.reconnects > reconnects_at_clear[t.client_id]
    }
    print(f"SDK reconnects after clear(): {late}", flush=True)


# ---------------------------------------------------------------------------
# What the test above found, each alone: one daemon, deterministic (no random faults).


async def two_terminals(
    pool: Pool, declared: list[str], first_server: Address, second_server: Address
) -> tuple[Terminal, Terminal]:
    """ann's two terminals, connected: ``ann-1`` declares ``declared`` (through
    ``first_server``), then ``ann-2`` keeps the stored list (through ``second_server``)."""
    first = pool.add("ann", "ann-1", declared, first_server)
    second = pool.add("ann", "ann-2", None, second_server)
    for terminal in (first, second):
        await terminal.client.connect()
        terminal.should_be_connected = True
    return first, second


async def test_second_terminal_changing_a_friend_keeps_the_rest_of_the_stored_list(
    private_daemons: DaemonFactory, pool: Pool, store: redis.asyncio.Redis
) -> None:
    """A terminal that keeps the stored list (``friends=None``) removes one friend: its
    view keeps the user's other names, and its next connect (a reconnect, here made by
    hand) does not declare a list of its own over the user's."""
    daemon = private_daemons("d1", flags=DAEMON_FLAGS)
    _, second = await two_terminals(pool, ["ben", "cat"], daemon.address, daemon.address)
    assert second.client.friends == {"ben": False, "cat": False}

    await second.client.remove_friends(["ben"])
    assert (await read_truth(store)).lists["ann"] == {"cat"}
    view_after_remove = dict(second.client.friends)
    await second.client.disconnect()
    await second.client.connect()
    stored_after_reconnect = (await read_truth(store)).lists["ann"]
    assert (view_after_remove, stored_after_reconnect) == ({"cat": False}, {"cat"}), (
        "(ann-2's view after removing ben, ann's stored list after ann-2 reconnected)"
    )


async def test_second_terminal_learns_a_name_another_terminal_added(
    private_daemons: DaemonFactory, pool: Pool, store: redis.asyncio.Redis
) -> None:
    """The first terminal adds a friend who is offline (nothing is notified about an
    offline friend): the terminal keeping the stored list shows the new name within
    CONVERGE_BOUND, as every view must list exactly the user's stored names."""
    daemon = private_daemons("d1", flags=DAEMON_FLAGS)
    first, second = await two_terminals(pool, ["ben"], daemon.address, daemon.address)

    await first.client.add_friends(["zed"])
    assert (await read_truth(store)).lists["ann"] == {"ben", "zed"}

    async def views_right() -> list[str]:
        return view_mismatches(await read_truth(store), [first, second])

    await eventually(views_right, CONVERGE_BOUND, "both terminals list ben and zed", lambda: "")


def drops_friends_ok_and_pong(data: bytes, direction: Direction) -> bool:
    with contextlib.suppress(ProtocolError):
        return isinstance(decode(data), FriendsOk | Pong)
    return False


async def test_friend_change_refused_after_a_reconnect_keeps_the_view_true(
    private_daemons: DaemonFactory,
    fault_kit: FaultKit,
    pool: Pool,
    store: redis.asyncio.Redis,
) -> None:
    """A terminal keeping the stored list adds a friend; the daemon applies it but every
    FRIENDS_OK and PONG is lost, so the SDK reconnects (new session) and the retry,
    still carrying the old session, is refused UNKNOWN_SESSION. The add happened: once
    the network is back, the view shows the name Redis stores, within CONVERGE_BOUND."""
    daemon = private_daemons("d1", flags=DAEMON_FLAGS)
    relay = fault_kit.relay(daemon.address, seed=7)
    pool.relays = [relay]
    _, second = await two_terminals(pool, ["ben"], daemon.address, relay.address)

    relay.set_faults(drop_if=drops_friends_ok_and_pong, directions=["down"])
    try:
        await second.client.add_friends(["zed"])
    except PresenceClientError as exc:
        outcome = exc.code
    else:
        outcome = None
    relay.clear()
    # The path this test is about (else the timing went another way: say so).
    assert (outcome, second.reconnects >= 1) == (ErrorCode.UNKNOWN_SESSION, True), (
        f"outcome {outcome}, reconnects {second.reconnects}"
    )
    assert (await read_truth(store)).lists["ann"] == {"ben", "zed"}, "the add was applied"

    async def view_right() -> list[str]:
        return view_mismatches(await read_truth(store), [second])

    await eventually(view_right, CONVERGE_BOUND, "ann-2 shows zed, as stored", lambda: "")


async def test_snapshot_overtaken_by_own_change_is_asked_again(
    private_daemons: DaemonFactory,
    fault_kit: FaultKit,
    pool: Pool,
    store: redis.asyncio.Redis,
) -> None:
    """Another terminal removes a friend (the terminal keeping the stored list only sees
    a sequence gap); the snapshot that gap asks for is answered only after the terminal
    has changed the list itself, so that answer cannot say which names are declared.
    The SDK must ask again rather than take the gap as repaired: the view drops the
    removed name within CONVERGE_BOUND of the answer getting through."""
    daemon = private_daemons("d1", flags=DAEMON_FLAGS)
    relay = fault_kit.relay(daemon.address, seed=11)
    pool.relays = [relay]
    first, second = await two_terminals(pool, ["ben", "cat"], daemon.address, relay.address)
    asked_before = second.client.snapshots_requested

    def drops_snapshots(data: bytes, direction: Direction) -> bool:
        with contextlib.suppress(ProtocolError):
            return isinstance(decode(data), Snapshot)
        return False

    relay.set_faults(drop_if=drops_snapshots, directions=["down"])
    await first.client.remove_friends(["ben"])  # ann-2: a gap, seen in its next PONG
    await wait_for(
        lambda: second.client.snapshots_requested > asked_before,
        5.0,
        what="ann-2 asks for a snapshot after the gap",
    )
    await second.client.add_friends(["zed"])  # while that snapshot is unanswered
    relay.clear()
    assert (await read_truth(store)).lists["ann"] == {"cat", "zed"}

    async def view_right() -> list[str]:
        return view_mismatches(await read_truth(store), [second])

    await eventually(
        view_right, CONVERGE_BOUND, "ann-2 no longer lists ben", lambda: counters([relay])
    )


def drops_friends_up_and_pong_down(data: bytes, direction: Direction) -> bool:
    with contextlib.suppress(ProtocolError):
        msg = decode(data)
        return isinstance(msg, Friends) if direction == "up" else isinstance(msg, Pong)
    return False


async def test_friend_change_lost_during_a_reconnect_leaves_no_phantom_name(
    private_daemons: DaemonFactory,
    fault_kit: FaultKit,
    pool: Pool,
    store: redis.asyncio.Redis,
) -> None:
    """A terminal keeping the stored list adds a friend; every FRIENDS is lost on the
    way up and every PONG on the way down, so the SDK reconnects while the add is still
    being retried, and the add ends without an answer. The reconnect's CONNECT_OK came
    while the name was in flight (so it was kept); the add never happened, so once the
    network is back the view must drop the name within CONVERGE_BOUND."""
    daemon = private_daemons("d1", flags=DAEMON_FLAGS)
    relay = fault_kit.relay(daemon.address, seed=13)
    pool.relays = [relay]
    _, second = await two_terminals(pool, ["ben"], daemon.address, relay.address)

    relay.set_faults(drop_if=drops_friends_up_and_pong_down)
    with pytest.raises(PresenceClientError) as caught:
        await second.client.add_friends(["zed"])
    await wait_for(lambda: second.client.connected, 5.0, what="ann-2 reconnected")
    relay.clear()
    # The path this test is about (else the timing went another way: say so).
    assert caught.value.code in (None, ErrorCode.UNKNOWN_SESSION) and second.reconnects >= 1, (
        f"outcome {caught.value.code}, reconnects {second.reconnects}"
    )
    assert (await read_truth(store)).lists["ann"] == {"ben"}, "the add never arrived"

    async def view_right() -> list[str]:
        return view_mismatches(await read_truth(store), [second])

    await eventually(view_right, CONVERGE_BOUND, "ann-2 does not show zed", lambda: "")


async def test_reconnect_whose_answers_were_lost_is_not_refused_as_in_use(
    private_daemons: DaemonFactory, fault_kit: FaultKit, pool: Pool
) -> None:
    """The SDK reconnects and the daemon applies its CONNECT, but every CONNECT_OK is
    lost: Redis now holds a session the client never learned. The next CONNECTs (a new
    socket, so another address) cannot prove they may replace it with the old session's
    token; they carry the same connect number, which is that proof. So once answers get
    through, the client connects at once, not after that session's 10 s timeout."""
    daemon = private_daemons("d1", flags={**DAEMON_FLAGS, "--timeout": "10"})
    relay = fault_kit.relay(daemon.address, seed=17)
    pool.relays = [relay]
    term = pool.add("ann", "ann-1", ["ben"], relay.address)
    await term.client.connect()
    term.should_be_connected = True
    connects_applied = 0

    def drops_answers(data: bytes, direction: Direction) -> bool:
        nonlocal connects_applied
        with contextlib.suppress(ProtocolError):
            msg = decode(data)
            if isinstance(msg, ConnectOk):
                connects_applied += 1
            return isinstance(msg, ConnectOk | Pong)
        return False

    relay.set_faults(drop_if=drops_answers, directions=["down"])
    await wait_for(lambda: connects_applied >= 3, 10.0, what="CONNECTs applied, answers lost")
    relay.clear()
    await wait_for(lambda: term.client.connected, 5.0, what="ann-1 connected again")
