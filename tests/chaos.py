"""Randomized, seeded, model-checked fault schedules against the real system (issue 10).

The truth must heal itself: whatever happened during a schedule (daemons stalled past
their lease, killed and restarted, Redis paused), once every fault is over, the state in
Redis and every connected client's friend view must agree with a reference model within
a bound. In the spirit of Jepsen and of hypothesis' stateful testing, but against the
real parts only: one private redis-server, three daemon processes (``tests/daemons.py``)
and SDK clients (``PresenceClient``) in this process.

A schedule
----------
:func:`generate` derives everything from one seed (``random.Random(seed)``): six users,
each with one or two clients; each user's initial friend declarations (some mutual,
some one-sided); each client's server list (all three daemons, in its own order); and a
timeline of steps. A step is a client operation (connect, disconnect, add / remove / set
friends) or a fault with its chosen duration: SIGSTOP a daemon, SIGKILL a daemon and
restart it later (same instance id, same UDP port), SIGSTOP Redis. Durations are drawn
both shorter and longer than the lease. The same seed always gives the same schedule;
the interleaving with the processes' own timers is real time and is not replayed, so a
timing-dependent failure replays often, not always.

Running it (:class:`Runner`)
----------------------------
Steps are dispatched at their times. Client operations go through one queue per client
(in order, never holding up the timeline) and are retried until they take effect: all
are idempotent, and retrying makes an operation whose answer was lost certain. Friend
lists change only through a user's first client, the only one that declares a list (a
second client connects with ``friends=None``, keeping the stored list), so the list in
Redis is exactly the model's even across the clients' automatic reconnects.

After the last step everything is healed: each fault ends at its chosen time, killed
daemons still down are restarted, and every client operation must complete (bounded).

The check (:class:`Model`, :func:`compare`)
-------------------------------------------
Redis and every connected client are observed for the whole convergence window,
``lease_ttl + 4 ping intervals + 2 s`` from the moment every operation completed, and
the last observation must match the model:

- a user is online in Redis (``presence:{user}:clients`` exists) iff at least one of its
  clients is connected in the model (its connect succeeded and it has not disconnected;
  clients keep pinging through faults and reconnect by themselves);
- each user's friend list in Redis is the model's (the last change wins), and the
  reverse index (``fans``) agrees with the lists;
- every client connected in the model is connected, and for each name its user
  declares it shows that friend online iff the friend is online in the model and both
  declare each other.

Each difference is reported with a kind, the schedule, a trace (every step, every event
the clients saw, every change of this schedule's entries and lists in Redis) and what
the daemons logged:

- ``online``: a user online in Redis and not in the model, or the reverse;
- ``friend-list``: a user's list in Redis is not the model's;
- ``fans-index``: the reverse index disagrees with the lists as stored;
- ``client-state``: a client connected in the model is not connected (still
  reconnecting at the end of the window); ``client-entry``: a connected client's
  entry in Redis is missing or names another session than the one it uses (a stale
  session won), or a disconnected client still has one;
- ``view``: a client shows a friend differently from what Redis itself says (a
  notification lost and never repaired); ``view-follows-redis``: the client agrees
  with Redis, which is wrong (a consequence of an ``online`` or ``friend-list`` kind);
- ``declared`` / ``declared-follows-redis``: the first client's own list (the SDK's
  ``declared``) is not the model's;
- ``op-stuck``, ``op-failed``: a client operation did not complete after healing, or
  was refused; ``restart-failed``: a daemon did not start again with Redis up;
  ``daemon-crashed``, ``daemon-traceback``; ``teardown-online``: a user still online
  after all its clients said goodbye; ``harness``, ``harness-error``: the harness itself.

Then every client disconnects and this schedule's users must all be offline within the
same bound. A schedule starts only when no user at all is online in Redis: the Redis and
the daemons are reused across schedules (each schedule has its own user names), so
leftovers of a failed schedule are removed through the presence library, never with
FLUSHALL while daemons hold sessions.

Run ``python tests/chaos.py --schedules N --seed S`` (seeds S .. S+N-1, so a failing
schedule replays with ``--seed <its seed> --schedules 1``); ``make chaos`` runs
thousands; ``tests/test_chaos.py`` runs as many as fit in about 75 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import signal
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TextIO

import pytest
import redis.asyncio
from redis.exceptions import RedisError

from daemons import DaemonProcess
from presence_client.sdk import Event, FriendEvent, PresenceClient, PresenceClientError
from presence_daemon import keys
from presence_daemon.embedded import EmbeddedRedis
from presence_daemon.presence import Presence

USERS: Final = 6
DAEMONS: Final = 3
OP_BOUND: Final = 15.0
"""Seconds after healing within which every queued client operation must complete."""
HEAL_BOUND: Final = 30.0
"""Seconds the faults' own timers (their chosen durations, restarts) may take to end."""
DISCONNECT_BOUND: Final = 10.0
"""Seconds a client's goodbye may take (the SDK retries it a few times, then gives up)."""
POLL: Final = 0.05
"""Seconds between two observations while waiting for a condition (always bounded)."""
TRACE_TAIL: Final = 300
LOG_TAIL: Final = 40

Address = tuple[str, int]
Job = Callable[[], Awaitable[None]]


# ---------------------------------------------------------------------------
# Timings.


@dataclass(frozen=True, slots=True)
class Timings:
    """Daemon and client timings: short, so that one schedule takes seconds."""

    ping_interval: float = 0.2
    timeout: float = 0.6
    sweep_interval: float = 0.05
    lease_ttl: float = 1.0
    request_timeout: float = 0.2
    """The SDK's first retry delay."""
    max_backoff: float = 1.0
    """The SDK's longest retry delay (so a client retries soon enough after healing)."""

    @classmethod
    def scaled(cls, ping_interval: float, lease_ttl: float) -> Timings:
        return cls(ping_interval, round(3 * ping_interval, 6), lease_ttl=lease_ttl)

    @property
    def bound(self) -> float:
        """Seconds after healing within which everything must match the model."""
        return self.lease_ttl + 4 * self.ping_interval + 2.0

    def daemon_flags(self, port: int) -> dict[str, str | None]:
        return {
            "--port": str(port),
            "--ping-interval": str(self.ping_interval),
            "--timeout": str(self.timeout),
            "--sweep-interval": str(self.sweep_interval),
            "--lease-ttl": str(self.lease_ttl),
        }

    def cli_args(self) -> str:
        """The flags that reproduce these timings (empty for the defaults)."""
        default = Timings()
        args = []
        if self.ping_interval != default.ping_interval:
            args.append(f"--ping-interval {self.ping_interval}")
        if self.lease_ttl != default.lease_ttl:
            args.append(f"--lease-ttl {self.lease_ttl}")
        return " ".join(args)


# ---------------------------------------------------------------------------
# Schedules.


@dataclass(frozen=True, slots=True)
class UserSpec:
    clients: int
    """1 or 2: client 0 declares the user's list, client 1 keeps the stored one."""
    friends: tuple[int, ...]
    """Users (indices) that client 0 declares when the schedule starts."""


@dataclass(frozen=True, slots=True)
class ClientSpec:
    user: int
    index: int
    servers: tuple[int, ...]
    """Daemon indices, in the order this client tries them."""

    @property
    def label(self) -> str:
        return f"u{self.user}c{self.index}"


@dataclass(frozen=True, slots=True)
class Connect:
    client: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    client: int


FriendsChange = Literal["add", "remove", "set"]


@dataclass(frozen=True, slots=True)
class ChangeFriends:
    user: int
    op: FriendsChange
    names: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StopDaemon:
    daemon: int
    duration: float


@dataclass(frozen=True, slots=True)
class KillDaemon:
    daemon: int
    restart_after: float | None
    """Seconds until the restart; None leaves it down until healing."""


@dataclass(frozen=True, slots=True)
class PauseRedis:
    duration: float


ClientAction = Connect | Disconnect | ChangeFriends
Fault = StopDaemon | KillDaemon | PauseRedis
Action = ClientAction | Fault


@dataclass(frozen=True, slots=True)
class Step:
    at: float
    """Seconds from the start of the schedule."""
    action: Action


@dataclass(frozen=True, slots=True)
class Schedule:
    seed: int
    lease_ttl: float
    users: tuple[UserSpec, ...]
    clients: tuple[ClientSpec, ...]
    steps: tuple[Step, ...]

    def primary(self, user: int) -> int:
        """The index of the user's client 0."""
        return next(i for i, c in enumerate(self.clients) if c.user == user and c.index == 0)

    def clients_of(self, user: int) -> list[int]:
        return [i for i, c in enumerate(self.clients) if c.user == user]

    def describe_action(self, action: Action) -> str:
        def span(seconds: float) -> str:
            side = "<" if seconds < self.lease_ttl else ">"
            return f"{seconds:.2f} s ({side} lease)"

        match action:
            case Connect(client):
                return f"connect {self.clients[client].label}"
            case Disconnect(client):
                return f"disconnect {self.clients[client].label}"
            case ChangeFriends(user, op, names):
                return f"u{user} {op} friends [{_labels(names)}]"
            case StopDaemon(daemon, duration):
                return f"SIGSTOP d{daemon} for {span(duration)}"
            case KillDaemon(daemon, None):
                return f"SIGKILL d{daemon}, restart when healing"
            case KillDaemon(daemon, after):
                return f"SIGKILL d{daemon}, restart after {after:.2f} s"
            case PauseRedis(duration):
                return f"SIGSTOP redis for {span(duration)}"
        raise AssertionError(action)

    def describe(self) -> str:
        lines = [
            f"schedule seed={self.seed}: {len(self.users)} users, {len(self.clients)} clients, "
            f"{len(self.steps)} steps, lease {self.lease_ttl} s"
        ]
        for u, spec in enumerate(self.users):
            lines.append(f"  u{u}: {spec.clients} client(s), declares [{_labels(spec.friends)}]")
        for client in self.clients:
            order = ",".join(f"d{d}" for d in client.servers)
            kind = "declares the list" if client.index == 0 else "friends=None"
            lines.append(f"  {client.label}: servers {order}, {kind}")
        for step in self.steps:
            lines.append(f"  +{step.at:6.3f} {self.describe_action(step.action)}")
        return "\n".join(lines)


def _labels(users: Iterable[int]) -> str:
    return ",".join(f"u{u}" for u in sorted(users))


def _duration(rng: random.Random, lease: float) -> float:
    """A fault duration: half the time shorter than the lease, half longer."""
    if rng.random() < 0.5:
        return round(rng.uniform(0.1, 0.8) * lease, 3)
    return round(rng.uniform(1.2, 2.5) * lease, 3)


def generate(seed: int, lease_ttl: float = Timings().lease_ttl) -> Schedule:
    """The schedule for ``seed``: a pure function of its arguments."""
    rng = random.Random(seed)
    users = tuple(
        UserSpec(
            clients=rng.randint(1, 2),
            friends=tuple(v for v in range(USERS) if v != u and rng.random() < 0.5),
        )
        for u in range(USERS)
    )
    clients = tuple(
        ClientSpec(u, j, tuple(rng.sample(range(DAEMONS), DAEMONS)))
        for u, spec in enumerate(users)
        for j in range(spec.clients)
    )
    primary = {c.user: i for i, c in enumerate(clients) if c.index == 0}
    restart_allowance = lease_ttl + 1.5  # a restarted daemon waits out its old lease

    steps: list[Step] = []
    t = 0.0
    connected: set[int] = set()
    lists = [set(spec.friends) for spec in users]
    daemon_free = [0.0] * DAEMONS
    redis_free = 0.0

    def add(action: Action) -> None:
        steps.append(Step(round(t, 3), action))

    for c in range(len(clients)):
        if rng.random() < 0.7:
            add(Connect(c))
            connected.add(c)
            t += rng.uniform(0.0, 0.05)

    count = rng.randint(8, 16)
    faults = 0
    for i in range(count):
        t += rng.uniform(0.05, 0.4)
        free = [d for d in range(DAEMONS) if daemon_free[d] <= t]
        declaring = [u for u in range(USERS) if primary[u] in connected]
        options: list[tuple[str, float]] = []
        if len(connected) < len(clients):
            options.append(("connect", 3.0))
        if connected:
            options.append(("disconnect", 1.5))
        if declaring:
            options.append(("friends", 2.0))
        if free:
            options += [("stop", 1.2), ("kill", 0.8)]
        if redis_free <= t:
            options.append(("redis", 0.8))
        if i == count - 1 and not faults:  # every schedule injects at least one fault
            options = [o for o in options if o[0] in ("stop", "kill", "redis")] or options
        kind = rng.choices([k for k, _ in options], [w for _, w in options])[0]
        if kind == "connect":
            client = rng.choice([c for c in range(len(clients)) if c not in connected])
            connected.add(client)
            add(Connect(client))
        elif kind == "disconnect":
            client = rng.choice(sorted(connected))
            connected.discard(client)
            add(Disconnect(client))
        elif kind == "friends":
            user = rng.choice(declaring)
            others = [v for v in range(USERS) if v != user]
            op: FriendsChange = rng.choice(("add", "remove", "set"))
            if op == "add" and not set(others) - lists[user]:
                op = "set"
            if op == "remove" and not lists[user]:
                op = "add"
            if op == "add":
                pool = sorted(set(others) - lists[user])
                names = tuple(sorted(rng.sample(pool, rng.randint(1, min(2, len(pool))))))
                lists[user] |= set(names)
            elif op == "remove":
                pool = sorted(lists[user])
                names = tuple(sorted(rng.sample(pool, rng.randint(1, min(2, len(pool))))))
                lists[user] -= set(names)
            else:
                names = tuple(v for v in others if rng.random() < 0.5)
                lists[user] = set(names)
            add(ChangeFriends(user, op, names))
        elif kind == "stop":
            daemon = rng.choice(free)
            duration = _duration(rng, lease_ttl)
            daemon_free[daemon] = t + duration + 0.05
            faults += 1
            add(StopDaemon(daemon, duration))
        elif kind == "kill":
            daemon = rng.choice(free)
            after = None if rng.random() < 0.3 else round(rng.uniform(0.1, 2.0) * lease_ttl, 3)
            daemon_free[daemon] = float("inf") if after is None else t + after + restart_allowance
            faults += 1
            add(KillDaemon(daemon, after))
        else:
            duration = _duration(rng, lease_ttl)
            redis_free = t + duration + 0.05
            faults += 1
            add(PauseRedis(duration))
    return Schedule(seed, lease_ttl, users, clients, tuple(steps))


# ---------------------------------------------------------------------------
# The reference model and the checker.


class Model:
    """What the system must show once healed, updated as operations take effect."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.connected = [False] * len(schedule.clients)
        self.declared = [frozenset(spec.friends) for spec in schedule.users]
        """What each user's client 0 declares (its connects send it)."""
        self.stored: list[frozenset[int]] = [frozenset()] * len(schedule.users)
        """Each user's list in Redis: empty until its client 0 first connects."""

    def connect_done(self, client: int) -> None:
        self.connected[client] = True
        spec = self.schedule.clients[client]
        if spec.index == 0:
            self.stored[spec.user] = self.declared[spec.user]

    def disconnect_done(self, client: int) -> None:
        self.connected[client] = False

    def friends_done(self, user: int, op: FriendsChange, names: Sequence[int]) -> None:
        old = self.declared[user]
        new = {"add": old | set(names), "remove": old - set(names), "set": frozenset(names)}[op]
        self.declared[user] = self.stored[user] = frozenset(new)

    def online(self, user: int) -> bool:
        return any(self.connected[c] for c in self.schedule.clients_of(user))

    def mutual(self, a: int, b: int) -> bool:
        return b in self.stored[a] and a in self.stored[b]

    def visible(self, viewer: int, friend: int) -> bool:
        return self.online(friend) and self.mutual(viewer, friend)


class Names:
    """Real user names and client ids of one schedule, and labels (u3, u3c1) back."""

    def __init__(self, schedule: Schedule, tag: str) -> None:
        self.users = [f"u{u}.{tag}" for u in range(len(schedule.users))]
        self.clients = [f"{spec.label}.{tag}" for spec in schedule.clients]
        self._labels = {name: f"u{u}" for u, name in enumerate(self.users)}
        self._labels.update(
            {cid: spec.label for cid, spec in zip(self.clients, schedule.clients, strict=True)}
        )

    def label(self, name: str) -> str:
        return self._labels.get(name, name)

    def labels(self, names: Iterable[str]) -> str:
        return ",".join(sorted(self.label(n) for n in names))

    def entries(self, entries: dict[str, str]) -> str:
        """A clients hash as ``u3c0@d1/9f2e`` (client, owner daemon, session token)."""
        shown = []
        for client_id, value in sorted(entries.items()):
            token, owner, _ = [*value.split("|", 2), "", ""][:3]
            shown.append(f"{self.label(client_id)}@{owner.removeprefix('chaos-')}/{token[:4]}")
        return ",".join(shown) or "none"


@dataclass(slots=True)
class Observation:
    entries: list[dict[str, str]]
    """Per user: its clients hash (client id -> "token|owner|address")."""
    friends: list[set[str]]
    fans: list[set[str]]
    views: list[dict[str, bool]]
    """Per client: a copy of its SDK friend view."""
    connected: list[bool]
    sessions: list[str | None]
    """Per client: its session token (hex), if it has one."""
    declared: list[list[str] | None]


Diff = tuple[str, str]
"""(kind, what differs)."""


def _onoff(value: bool) -> str:
    return "online" if value else "offline"


def compare(model: Model, obs: Observation, names: Names) -> list[Diff]:
    """Every way the observation differs from the model (empty: it matches)."""
    schedule = model.schedule
    diffs: list[Diff] = []
    for u in range(len(schedule.users)):
        want, got = model.online(u), bool(obs.entries[u])
        if got != want:
            held = names.entries(obs.entries[u])
            connected = ",".join(
                schedule.clients[c].label for c in schedule.clients_of(u) if model.connected[c]
            )
            diffs.append(
                (
                    "online",
                    f"u{u} is {_onoff(got)} in Redis (entries: {held}) but "
                    f"{_onoff(want)} in the model (connected: {connected or 'none'})",
                )
            )
        want_list = {names.users[v] for v in model.stored[u]}
        if obs.friends[u] != want_list:
            diffs.append(
                (
                    "friend-list",
                    f"u{u} declares [{names.labels(obs.friends[u])}] in Redis, "
                    f"model [{names.labels(want_list)}]",
                )
            )
        # The reverse index must agree with the lists as stored (whatever they are).
        declared_by = {
            names.users[v] for v in range(len(schedule.users)) if names.users[u] in obs.friends[v]
        }
        if obs.fans[u] != declared_by:
            diffs.append(
                (
                    "fans-index",
                    f"u{u} fans [{names.labels(obs.fans[u])}] in Redis, but "
                    f"[{names.labels(declared_by)}] declare it there",
                )
            )
    for c, spec in enumerate(schedule.clients):
        entry = obs.entries[spec.user].get(names.clients[c])
        if not model.connected[c]:
            if entry is not None and model.online(spec.user):  # (else "online" says it)
                diffs.append(
                    (
                        "client-entry",
                        f"{spec.label} is not connected, but Redis holds an entry for it "
                        f"({names.entries({names.clients[c]: entry})})",
                    )
                )
            continue
        session = obs.sessions[c]
        if not obs.connected[c]:
            diffs.append(("client-state", f"{spec.label} is not connected (model: connected)"))
        elif entry is None:
            if obs.entries[spec.user]:  # (else "online" says it)
                diffs.append(
                    (
                        "client-entry",
                        f"{spec.label} is connected (session {(session or '')[:4]}) but Redis "
                        "holds no entry for it",
                    )
                )
        elif session is not None and entry.split("|", 1)[0] != session:
            diffs.append(
                (
                    "client-entry",
                    f"{spec.label} uses session {session[:4]} but Redis holds "
                    f"{names.entries({names.clients[c]: entry})}",
                )
            )
        stored = obs.friends[spec.user]
        if spec.index == 0:
            # The SDK's own idea of its list: it changes it only on a change acknowledged
            # to it, and (since 032aaf7) adopts the list a CONNECT_OK or snapshot shows.
            declared = obs.declared[c]
            want_declared = {names.users[v] for v in model.declared[spec.user]}
            if declared is None or set(declared) != want_declared:
                kind = "declared-follows-redis" if set(declared or ()) == stored else "declared"
                diffs.append(
                    (
                        kind,
                        f"{spec.label} declares [{names.labels(declared or ())}], model "
                        f"[{names.labels(want_declared)}] (Redis: [{names.labels(stored)}])",
                    )
                )
        view = obs.views[c]
        for v in sorted(model.stored[spec.user]):
            want = model.visible(spec.user, v)
            shown = view.get(names.users[v])
            if shown is None and spec.index == 0:
                kind = "view" if names.users[v] in stored else "view-follows-redis"
                diffs.append((kind, f"{spec.label} has no entry for u{v}"))
            elif bool(shown) != want:
                why = (
                    f"u{v} {_onoff(model.online(v))}, "
                    f"{'mutual' if model.mutual(spec.user, v) else 'one-sided'}"
                )
                # Triage: a view that agrees with what Redis itself says only follows
                # from an "online" or "friend-list" difference; one that does not is a
                # notification that never arrived or was never repaired.
                user, friend = names.users[spec.user], names.users[v]
                in_redis = (
                    bool(obs.entries[v])
                    and friend in obs.friends[spec.user]
                    and user in obs.friends[v]
                )
                kind = "view-follows-redis" if bool(shown) == in_redis else "view"
                diffs.append(
                    (
                        kind,
                        f"{spec.label} shows u{v} {_onoff(bool(shown))}, model "
                        f"{_onoff(want)} ({why}; Redis: {_onoff(in_redis)})",
                    )
                )
    return diffs


# ---------------------------------------------------------------------------
# The system under test: one Redis, three daemons.


class DaemonStartError(RuntimeError):
    pass


def free_udp_ports(count: int) -> list[int]:
    """UDP ports on 127.0.0.1 that are free now and outside the ephemeral range (so
    that no client socket takes a killed daemon's port before it is restarted)."""
    low, high = 20000, 32000
    with contextlib.suppress(OSError, ValueError):
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral_low = int(text.split()[0])
        if ephemeral_low > 11000:
            low, high = max(10000, ephemeral_low - 12000), ephemeral_low
    ports: list[int] = []
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free UDP ports in {low}-{high}")


def _tail(text: str, lines: int = LOG_TAIL) -> str:
    return "\n".join(text.splitlines()[-lines:])


class DaemonSlot:
    """One of the three daemons: a fixed instance id and UDP port, and whichever
    process currently serves them."""

    def __init__(self, index: int, redis_url: str, port: int, timings: Timings) -> None:
        self.index = index
        self.instance_id = f"chaos-d{index}"
        self.redis_url = redis_url
        self.port = port
        self.timings = timings
        self.process: DaemonProcess | None = None
        self.state: Literal["up", "stopped", "dead", "starting"] = "dead"
        self.generation = 0
        """Bumped by every kill and start: a timer meant for an older process does nothing."""
        self.retired: list[DaemonProcess] = []
        """Killed processes, kept for their logs until the schedule ends."""

    @property
    def label(self) -> str:
        return f"d{self.index}"

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)

    async def start(self) -> None:
        self.generation += 1
        self.state = "starting"
        process = DaemonProcess(
            self.redis_url,
            self.instance_id,
            flags=self.timings.daemon_flags(self.port),
            ready_timeout=20.0,
        )
        self.process = process  # known at once: close() kills it, even mid-start
        try:
            await process.astart()
        except pytest.fail.Exception as exc:  # how DaemonProcess reports a failed start
            self.process = None
            self.state = "dead"
            self.retired.append(process)
            raise DaemonStartError(f"{self.label}: {exc}") from None
        self.state = "up"

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.state = "stopped"

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.state = "up"

    def kill(self) -> None:
        assert self.process is not None
        self.generation += 1
        self.process.kill()
        self.retired.append(self.process)
        self.process = None
        self.state = "dead"

    def crashed(self) -> bool:
        """The process exited although nobody killed it."""
        return self.state in ("up", "stopped") and (
            self.process is None or not self.process.running
        )

    def processes(self) -> list[DaemonProcess]:
        return [*self.retired, *([self.process] if self.process is not None else [])]

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
        for process in self.processes():
            process.cleanup()
        self.retired.clear()
        self.process = None
        self.state = "dead"


class Cluster:
    """The private Redis and the three daemon slots, reused across schedules."""

    def __init__(self, timings: Timings) -> None:
        self.timings = timings
        self.redis = EmbeddedRedis()
        self.slots: list[DaemonSlot] = []
        self.redis_paused = False
        self._client: redis.asyncio.Redis | None = None
        self._log_marks: dict[DaemonProcess, int] = {}

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        self._client = redis.asyncio.Redis.from_url(
            self.redis.url, decode_responses=True, socket_timeout=10
        )
        ports = free_udp_ports(DAEMONS)
        self.slots = [
            DaemonSlot(i, self.redis.url, port, self.timings) for i, port in enumerate(ports)
        ]
        await asyncio.gather(*(slot.start() for slot in self.slots))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.resume_redis()
        for slot in self.slots:
            with contextlib.suppress(Exception):
                slot.close()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        await asyncio.to_thread(self.redis.stop)

    @property
    def client(self) -> redis.asyncio.Redis:
        assert self._client is not None, "cluster not started"
        return self._client

    def daemon_label(self, address: Address | None) -> str:
        for slot in self.slots:
            if address is not None and slot.port == address[1]:
                return slot.label
        return str(address)

    def pause_redis(self) -> None:
        self.redis.process.send_signal(signal.SIGSTOP)
        self.redis_paused = True

    def resume_redis(self) -> None:
        if self.redis_paused:
            self.redis.process.send_signal(signal.SIGCONT)
            self.redis_paused = False

    async def online_users(self) -> list[str]:
        """Every user online in Redis, whatever its schedule."""
        pattern = keys.clients_key("*")
        return [str(key) async for key in self.client.scan_iter(match=pattern, count=1000)]

    async def remove_leftovers(self, clients_keys: Sequence[str]) -> list[str]:
        """Disconnect leftover entries through the library, each exactly as listed (the
        removal is token-guarded: an entry replaced meanwhile stays); returns what was
        removed."""
        library = Presence.from_url(self.redis.url, instance_id="chaos-janitor", lease_ttl=None)
        removed = []
        try:
            await library.start()
            for key in clients_keys:
                user = key.split("{", 1)[1].rsplit("}", 1)[0]
                entries = await self.client.hgetall(key)
                for client_id, value in entries.items():
                    client_id, value = str(client_id), str(value)  # decoded: str already
                    token = value.split("|", 1)[0]
                    if await library.disconnected(client_id, user=user, token=token):
                        removed.append(f"{user}/{client_id}")
        finally:
            await library.close()
        return removed

    def mark_logs(self) -> None:
        """Remember where each daemon's log stands, to read what a schedule adds."""
        self._log_marks = {}
        for slot in self.slots:
            for process in slot.processes():
                self._log_marks[process] = _size(process.stderr_path)

    def new_log(self, process: DaemonProcess) -> str:
        return _read_from(process.stderr_path, self._log_marks.get(process, 0))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Running one schedule.


class Trace:
    """Timestamped lines about what happened, for the report of a failing schedule."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(f"{time.monotonic() - self.start:7.3f} {text}")


@dataclass(slots=True)
class ScheduleResult:
    schedule: Schedule
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    failed_starts: int = 0
    """Restarts that failed during the schedule (e.g. Redis paused); retried at healing."""
    violations: list[Diff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    duration: float = 0.0
    converged_in: float | None = None
    """Seconds from the start of the window to the first of the final run of matches."""
    relapses: int = 0
    """Times a matching state stopped matching again within the window."""

    @property
    def seed(self) -> int:
        return self.schedule.seed

    def violate(self, kind: str, text: str) -> None:
        self.violations.append((kind, text))

    def report(self, timings: Timings) -> str:
        replay = f"python tests/chaos.py --seed {self.seed} --schedules 1"
        if timings.cli_args():
            replay += " " + timings.cli_args()
        lines = [
            f"=== VIOLATION in schedule seed={self.seed} (replay: {replay})",
            *(f"  [{kind}] {text}" for kind, text in self.violations),
            *(f"  note: {note}" for note in self.notes),
            self.schedule.describe(),
            f"--- trace (last {TRACE_TAIL} lines)",
            *self.trace[-TRACE_TAIL:],
        ]
        for name, text in self.logs.items():
            lines += [f"--- {name} log during the schedule (last {LOG_TAIL} lines)", text]
        return "\n".join(lines)


class ChaosClient:
    """One SDK client, its operation queue, and a trace of what it saw."""

    def __init__(
        self,
        spec: ClientSpec,
        sdk: PresenceClient,
        trace: Trace,
        label_of: Callable[[str], str],
        daemon_of: Callable[[Address | None], str],
    ) -> None:
        self.spec = spec
        self.sdk = sdk
        self.trace = trace
        self.label_of = label_of
        self.daemon_of = daemon_of
        self.queue: asyncio.Queue[tuple[str, Job]] = asyncio.Queue()
        self.current: str | None = None
        self.errors: list[str] = []
        sdk.add_listener(self._on_event)
        self._worker = asyncio.create_task(self._work())

    def _on_event(self, event: Event) -> None:
        if isinstance(event, FriendEvent):
            self.trace(f"{self.spec.label} sees {self.label_of(event.name)} {_onoff(event.online)}")
        else:
            session = self.sdk.session.hex()[:4] if self.sdk.session else "-"
            where = self.daemon_of(event.server) if event.server else ""
            self.trace(f"{self.spec.label} {event.status} {where} session {session}")

    def submit(self, label: str, job: Job) -> None:
        self.queue.put_nowait((label, job))

    async def _work(self) -> None:
        while True:
            label, job = await self.queue.get()
            self.current = label
            try:
                await job()
            except Exception as exc:
                self.errors.append(f"{label}: {exc!r}")
                self.trace(f"{self.spec.label} {label} FAILED: {exc!r}")
            finally:
                self.current = None
                self.queue.task_done()

    async def close(self) -> None:
        """Stop taking operations and disconnect (bounded; idempotent)."""
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        try:
            await asyncio.wait_for(self.sdk.disconnect(), DISCONNECT_BOUND)
        except TimeoutError:
            self.trace(f"{self.spec.label} goodbye not done within {DISCONNECT_BOUND} s")
        except PresenceClientError as exc:  # closed all the same
            self.trace(f"{self.spec.label} goodbye: {exc}")


class Runner:
    """Runs one schedule against the cluster and checks the outcome."""

    def __init__(self, cluster: Cluster, schedule: Schedule, tag: str) -> None:
        self.cluster = cluster
        self.timings = cluster.timings
        self.schedule = schedule
        self.names = Names(schedule, tag)
        self.model = Model(schedule)
        self.trace = Trace()
        self.result = ScheduleResult(schedule)
        self.clients: list[ChaosClient] = []
        self.timers: list[asyncio.Task[None]] = []
        self.watcher: asyncio.Task[None] | None = None

    async def run(self) -> ScheduleResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._prepare()
            self.cluster.mark_logs()
            self.clients = [self._client(c) for c in range(len(self.schedule.clients))]
            self.watcher = asyncio.create_task(self._watch())
            t0 = loop.time()
            for step in self.schedule.steps:
                delay = t0 + step.at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the schedule's own timing
                self._dispatch(step.action)
            await self._heal()
            if await self._wait_operations():
                await self._converge()
            await self._teardown()
        except Exception:
            self.result.violate("harness-error", traceback.format_exc())
            raise
        finally:
            for task in [*self.timers, *([self.watcher] if self.watcher else [])]:
                task.cancel()
            # On an early exit, end the faults first so that the goodbyes get through.
            self.cluster.resume_redis()
            for slot in self.cluster.slots:
                if slot.state == "stopped":
                    slot.resume()
            await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
            self._check_daemons()
            self.result.trace = self.trace.lines
            self.result.duration = loop.time() - started
        return self.result

    # -- set-up --------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Every fault of an earlier schedule over, every daemon up, nobody online."""
        self.cluster.resume_redis()
        for slot in self.cluster.slots:
            if slot.state == "stopped":
                slot.resume()
        await self._restart_dead("before the schedule")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timings.bound
        while online := await self.cluster.online_users():
            if loop.time() >= deadline:
                removed = await self.cluster.remove_leftovers(online)
                self.result.notes.append(
                    f"online before the schedule (an earlier schedule's leftovers), "
                    f"removed: {', '.join(removed) or 'none'}"
                )
                break
            await asyncio.sleep(POLL)

    def _client(self, index: int) -> ChaosClient:
        spec = self.schedule.clients[index]
        user = spec.user
        declared = (
            [self.names.users[v] for v in self.schedule.users[user].friends]
            if spec.index == 0
            else None
        )
        sdk = PresenceClient(
            self.names.users[user],
            declared,
            servers=[self.cluster.slots[d].address for d in spec.servers],
            client_id=self.names.clients[index],
            request_timeout=self.timings.request_timeout,
            max_backoff=self.timings.max_backoff,
        )
        return ChaosClient(spec, sdk, self.trace, self.names.label, self.cluster.daemon_label)

    # -- steps ---------------------------------------------------------------------

    def _dispatch(self, action: Action) -> None:
        self.trace(self.schedule.describe_action(action))
        match action:
            case Connect(client):
                self.result.operations["connect"] += 1
                self.clients[client].submit("connect", lambda: self._connect(client))
            case Disconnect(client):
                self.result.operations["disconnect"] += 1
                self.clients[client].submit("disconnect", lambda: self._disconnect(client))
            case ChangeFriends(user, op, names):
                self.result.operations[f"friends-{op}"] += 1
                primary = self.schedule.primary(user)
                self.clients[primary].submit(
                    f"{op} friends", lambda: self._change_friends(primary, op, names)
                )
            case StopDaemon() | KillDaemon() | PauseRedis():
                self._fault(action)

    async def _connect(self, client: int) -> None:
        sdk = self.clients[client].sdk
        while True:
            try:
                await sdk.connect()  # itself retries along the server list
                break
            except PresenceClientError as exc:
                if exc.code is not None:
                    raise  # refused: not a fault the schedule injected
                self.trace(f"{self.clients[client].spec.label} connect: {exc}; again")
            # Retry policy (as the SDK's own reconnect): connect() gives up at once when
            # every daemon's port is closed (all killed), so pause before trying again.
            await asyncio.sleep(self.timings.request_timeout)
        self.model.connect_done(client)

    async def _disconnect(self, client: int) -> None:
        try:
            await self.clients[client].sdk.disconnect()
        except PresenceClientError as exc:
            # The client is closed all the same; the daemon drops the session after
            # its timeout (the check then expects the user offline).
            self.trace(f"{self.clients[client].spec.label} goodbye: {exc}")
        self.model.disconnect_done(client)

    async def _change_friends(self, client: int, op: FriendsChange, users: Sequence[int]) -> None:
        chaos_client = self.clients[client]
        sdk = chaos_client.sdk
        names = [self.names.users[v] for v in users]
        change = {"add": sdk.add_friends, "remove": sdk.remove_friends, "set": sdk.set_friends}
        while True:
            if sdk.connected:
                try:
                    await change[op](names)
                    break
                except PresenceClientError as exc:
                    self.trace(f"{chaos_client.spec.label} {op} friends: {exc}; again")
            # Retry policy: the change is idempotent; try again a ping interval later
            # (by then the client has noticed a lost session and is reconnecting).
            await asyncio.sleep(self.timings.ping_interval)
        self.model.friends_done(chaos_client.spec.user, op, users)

    def _fault(self, fault: Fault) -> None:
        lease = self.timings.lease_ttl
        match fault:
            case StopDaemon(daemon, duration):
                slot = self.cluster.slots[daemon]
                if slot.state != "up":
                    self.result.skipped["daemon-stop"] += 1
                    self.trace(f"  skipped: d{daemon} is {slot.state}")
                    return
                slot.stop()
                self.result.faults[
                    "daemon-stop" + ("<" if duration < lease else ">") + "lease"
                ] += 1
                self._timer(self._resume_daemon(slot, slot.generation, duration))
            case KillDaemon(daemon, after):
                slot = self.cluster.slots[daemon]
                if slot.state not in ("up", "stopped"):
                    self.result.skipped["daemon-kill"] += 1
                    self.trace(f"  skipped: d{daemon} is {slot.state}")
                    return
                slot.kill()
                self.result.faults["daemon-kill"] += 1
                if after is not None:
                    self._timer(self._restart_later(slot, after))
            case PauseRedis(duration):
                if self.cluster.redis_paused:
                    self.result.skipped["redis-pause"] += 1
                    self.trace("  skipped: redis is paused")
                    return
                self.cluster.pause_redis()
                self.result.faults[
                    "redis-pause" + ("<" if duration < lease else ">") + "lease"
                ] += 1
                self._timer(self._resume_redis(duration))

    def _timer(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        self.timers.append(asyncio.create_task(run()))

    async def _resume_daemon(self, slot: DaemonSlot, generation: int, duration: float) -> None:
        await asyncio.sleep(duration)  # the fault's chosen duration
        if slot.generation == generation and slot.state == "stopped":
            slot.resume()
            self.trace(f"SIGCONT {slot.label}")

    async def _resume_redis(self, duration: float) -> None:
        await asyncio.sleep(duration)  # the fault's chosen duration
        self.cluster.resume_redis()
        self.trace("SIGCONT redis")

    async def _restart_later(self, slot: DaemonSlot, after: float) -> None:
        await asyncio.sleep(after)  # the schedule's chosen downtime
        if slot.state == "dead":
            await self._restart(slot)

    async def _restart(self, slot: DaemonSlot, *, last_try: bool = False) -> None:
        """Start the slot's daemon again. A daemon may refuse to start while Redis is
        paused (it exits with an error): like a supervisor, the harness starts it again
        when healing; only a start that fails with Redis up (``last_try``) violates."""
        self.trace(f"restarting {slot.label}")
        try:
            await slot.start()
        except DaemonStartError as exc:
            process = slot.retired[-1]
            output = _tail(process.stderr() + process.stdout(), 10)
            if last_try:
                self.result.violate("restart-failed", f"{exc}\n{output}")
            else:
                self.result.failed_starts += 1
                self.trace(f"{slot.label} did not start (tried again when healing): {output}")
            return
        self.result.restarts += 1
        self.trace(f"{slot.label} ready")

    async def _restart_dead(self, when: str) -> None:
        """Restart every daemon that is down (Redis is up); one more try for each that
        does not start."""
        for last_try in (False, True):
            dead = [s for s in self.cluster.slots if s.state == "dead"]
            if dead:
                self.trace(f"{when}: restarting {','.join(s.label for s in dead)}")
                await asyncio.gather(*(self._restart(s, last_try=last_try) for s in dead))

    # -- healing and checking ------------------------------------------------------

    async def _heal(self) -> None:
        self.trace("heal: every fault ends at its chosen time; then restart what is down")
        pending = [t for t in self.timers if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=HEAL_BOUND)
            for timer in late:
                timer.cancel()
                self.result.violate("harness", f"a fault timer did not end in {HEAL_BOUND} s")
        self.cluster.resume_redis()
        for slot in self.cluster.slots:
            if slot.state == "stopped":
                slot.resume()
                self.trace(f"SIGCONT {slot.label}")
        await self._restart_dead("heal")
        self.trace("healed")

    async def _wait_operations(self) -> bool:
        """Wait (bounded) until every client operation has completed; False if some
        did not, in which case the model is not final and the check is skipped."""
        joins = asyncio.gather(*(c.queue.join() for c in self.clients))
        try:
            await asyncio.wait_for(joins, OP_BOUND)
        except TimeoutError:
            for c in self.clients:
                if c.current is not None or not c.queue.empty():
                    self.result.violate(
                        "op-stuck",
                        f"{c.spec.label}: {c.current!r} not done {OP_BOUND} s after healing "
                        f"({c.queue.qsize()} more queued)",
                    )
            return False
        for c in self.clients:
            for error in c.errors:
                self.result.violate("op-failed", f"{c.spec.label}: {error}")
        self.trace("every operation completed")
        return True

    async def _observe(self) -> Observation:
        pipe = self.cluster.client.pipeline(transaction=False)
        for user in self.names.users:
            pipe.hgetall(keys.clients_key(user))
            pipe.smembers(keys.friends_key(user))
            pipe.smembers(keys.fans_key(user))
        raw = await pipe.execute()
        return Observation(
            entries=[dict(raw[i]) for i in range(0, len(raw), 3)],
            friends=[set(raw[i]) for i in range(1, len(raw), 3)],
            fans=[set(raw[i]) for i in range(2, len(raw), 3)],
            views=[dict(c.sdk.friends) for c in self.clients],
            connected=[c.sdk.connected for c in self.clients],
            sessions=[None if c.sdk.session is None else c.sdk.session.hex() for c in self.clients],
            declared=[
                None if c.sdk.declared is None else list(c.sdk.declared) for c in self.clients
            ],
        )

    async def _watch(self) -> None:
        """Trace every change of this schedule's entries and lists in Redis, for the
        report of a failing schedule (nothing is decided from it)."""
        seen: dict[int, str] = {}
        while True:
            if not self.cluster.redis_paused:
                pipe = self.cluster.client.pipeline(transaction=False)
                for user in self.names.users:
                    pipe.hgetall(keys.clients_key(user))
                    pipe.smembers(keys.friends_key(user))
                try:
                    raw = await pipe.execute()
                except (RedisError, OSError):
                    raw = []
                for u in range(len(raw) // 2):
                    text = (
                        f"entries {self.names.entries(raw[2 * u])}, "
                        f"declares [{self.names.labels(raw[2 * u + 1])}]"
                    )
                    if seen.get(u) != text:
                        seen[u] = text
                        self.trace(f"redis u{u}: {text}")
            await asyncio.sleep(POLL)

    async def _converge(self) -> None:
        """Observe for the whole window; the last observation must match the model."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + self.timings.bound
        matched_since: float | None = None
        last: list[Diff] | None = None
        while True:
            diffs = compare(self.model, await self._observe(), self.names)
            now = loop.time()
            if diffs != last:
                self.trace(
                    "check: matches the model"
                    if not diffs
                    else "check: " + "; ".join(text for _, text in diffs[:6])
                )
                last = diffs
            if diffs:
                if matched_since is not None:
                    self.result.relapses += 1
                matched_since = None
            elif matched_since is None:
                matched_since = now
            if now >= end:
                break
            await asyncio.sleep(min(POLL, end - now))
        if matched_since is not None:
            self.result.converged_in = matched_since - start
        for kind, text in diffs:
            self.result.violate(kind, f"{text} ({self.timings.bound:.1f} s after healing)")

    async def _teardown(self) -> None:
        """Every client says goodbye; this schedule's users must then go offline."""
        await asyncio.gather(*(c.close() for c in self.clients))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timings.bound
        while True:
            pipe = self.cluster.client.pipeline(transaction=False)
            for user in self.names.users:
                pipe.hgetall(keys.clients_key(user))
            entries: list[dict[str, str]] = await pipe.execute()
            online = [(u, e) for u, e in enumerate(entries) if e]
            if not online:
                return
            if loop.time() >= deadline:
                for u, e in online:
                    self.result.violate(
                        "teardown-online",
                        f"u{u} still online {self.timings.bound:.1f} s after all its clients "
                        f"disconnected (entries: {self.names.entries(e)})",
                    )
                return
            await asyncio.sleep(POLL)

    def _check_daemons(self) -> None:
        """Crashes and tracebacks during the schedule; keep the logs of a failure."""
        for slot in self.cluster.slots:
            if slot.crashed():
                process = slot.process
                code = (
                    None if process is None or process.process is None else process.process.poll()
                )
                self.result.violate("daemon-crashed", f"{slot.label} exited with {code}")
                if process is not None:
                    slot.retired.append(process)
                slot.process = None
                slot.state = "dead"  # restarted before the next schedule
            for process in slot.processes():
                text = self.cluster.new_log(process)
                if "Traceback" in text:
                    start = text.index("Traceback")
                    self.result.violate(
                        "daemon-traceback", f"{slot.label}:\n{text[max(0, start - 300) :][:3000]}"
                    )
                if text.strip():
                    name = f"{slot.label} (pid {process.process.pid if process.process else '?'})"
                    self.result.logs[name] = _tail(text)
            for process in slot.retired:
                process.cleanup()
            slot.retired.clear()
        if not self.result.violations:
            self.result.logs.clear()


# ---------------------------------------------------------------------------
# Many schedules.


@dataclass(slots=True)
class Summary:
    base_seed: int
    timings: Timings
    schedules: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    failed_starts: int = 0
    violations: Counter[str] = field(default_factory=Counter)
    failing: list[int] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    converged_in: list[float] = field(default_factory=list)
    relapses: int = 0
    elapsed: float = 0.0

    def add(self, result: ScheduleResult) -> None:
        self.schedules += 1
        self.operations.update(result.operations)
        self.faults.update(result.faults)
        self.skipped.update(result.skipped)
        self.restarts += result.restarts
        self.failed_starts += result.failed_starts
        self.durations.append(result.duration)
        self.relapses += result.relapses
        if result.converged_in is not None:
            self.converged_in.append(result.converged_in)
        if result.violations:
            self.violations.update(kind for kind, _ in result.violations)
            self.failing.append(result.seed)
            self.reports.append(result.report(self.timings))

    @property
    def violation_count(self) -> int:
        return sum(self.violations.values())

    def render(self) -> str:
        def counts(counter: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        mean = sum(self.durations) / len(self.durations) if self.durations else 0.0
        lines = [
            f"chaos: base seed {self.base_seed}, timings {self.timings}",
            f"schedules run: {self.schedules} in {self.elapsed:.1f} s "
            f"(per schedule: mean {mean:.1f} s"
            + (
                f", min {min(self.durations):.1f} s, max {max(self.durations):.1f} s)"
                if self.durations
                else ")"
            ),
            f"operations: {sum(self.operations.values())} ({counts(self.operations)})",
            f"faults injected: {sum(self.faults.values())} ({counts(self.faults)}); "
            f"daemon restarts {self.restarts} (and {self.failed_starts} that failed, e.g. with "
            f"Redis paused, and were retried when healing); "
            f"skipped (target already down) {sum(self.skipped.values())}",
        ]
        if self.converged_in:
            ordered = sorted(self.converged_in)
            lines.append(
                f"matched the model after healing in: median {ordered[len(ordered) // 2]:.2f} s, "
                f"max {ordered[-1]:.2f} s; relapses within the window: {self.relapses}"
            )
        lines.append(f"violations: {self.violation_count} ({counts(self.violations)})")
        if self.failing:
            replay = f"python tests/chaos.py --seed {self.failing[0]} --schedules 1"
            if self.timings.cli_args():
                replay += " " + self.timings.cli_args()
            lines.append(
                f"failing schedules: {len(self.failing)}: {', '.join(map(str, self.failing[:20]))}"
            )
            lines.append(f"first failing seed: {self.failing[0]} (replay: {replay})")
        return "\n".join(lines)


async def run_async(
    *,
    base_seed: int,
    schedules: int | None,
    budget: float | None = None,
    timings: Timings | None = None,
    out: TextIO | None = None,
    verbose: bool = False,
    stop_on_failure: bool = False,
    reports: int = 5,
) -> Summary:
    """Run schedules with seeds base_seed, base_seed + 1, ...: ``schedules`` of them, or
    as many as fit in ``budget`` seconds (a schedule starts only if it is expected to
    end within the budget), whichever comes first.

    Prints one line per schedule with ``verbose``, else a progress line every 25; the
    full report (schedule, diff, trace, daemon logs) of the first ``reports`` failing
    schedules, and one line for each later one."""
    timings = timings or Timings()
    out = out or sys.stdout
    summary = Summary(base_seed, timings)
    loop = asyncio.get_running_loop()
    started = loop.time()
    seeds: Iterator[int] = (
        iter(range(base_seed, base_seed + schedules))
        if schedules is not None
        else itertools.count(base_seed)
    )
    cluster = Cluster(timings)
    try:
        await cluster.start()
        for index, seed in enumerate(seeds):
            elapsed = loop.time() - started
            expected = max(summary.durations) if summary.durations else 10.0
            if budget is not None and elapsed + expected > budget:
                break
            schedule = generate(seed, timings.lease_ttl)
            runner = Runner(cluster, schedule, tag=f"{seed}.{index}")
            try:
                result = await runner.run()
            except Exception:
                # A harness error: reported like a violation; the daemons start afresh.
                result = runner.result
                await cluster.close()
                cluster = Cluster(timings)
                await cluster.start()
            summary.add(result)
            if verbose:
                found = sorted({kind for kind, _ in result.violations})
                status = "VIOLATION " + ", ".join(found) if found else "ok"
                converged = "-" if result.converged_in is None else f"{result.converged_in:.2f}s"
                print(
                    f"seed {seed}: {result.duration:.1f} s, "
                    f"{sum(result.operations.values())} ops, "
                    f"faults {dict(result.faults)}, matched after {converged}: {status}",
                    file=out,
                    flush=True,
                )
            elif summary.schedules % 25 == 0:
                print(
                    f"[{summary.schedules} schedules, {loop.time() - started:.0f} s] "
                    f"violations so far: {summary.violation_count}",
                    file=out,
                    flush=True,
                )
            if result.violations:
                if len(summary.failing) <= reports:
                    print(result.report(timings), file=out, flush=True)
                else:
                    found = sorted({kind for kind, _ in result.violations})
                    print(
                        f"=== VIOLATION in schedule seed={seed}: {', '.join(found)}",
                        file=out,
                        flush=True,
                    )
                if stop_on_failure:
                    break
    finally:
        summary.elapsed = loop.time() - started
        await cluster.close()
    return summary


def run(
    *,
    base_seed: int,
    schedules: int | None,
    budget: float | None = None,
    timings: Timings | None = None,
    out: TextIO | None = None,
    verbose: bool = False,
    stop_on_failure: bool = False,
    reports: int = 5,
) -> Summary:
    """:func:`run_async` in a new event loop; SIGTERM cancels it (and it cleans up)."""

    async def main() -> Summary:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await run_async(
                base_seed=base_seed,
                schedules=schedules,
                budget=budget,
                timings=timings,
                out=out,
                verbose=verbose,
                stop_on_failure=stop_on_failure,
                reports=reports,
            )
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chaos",
        description="Seeded random fault schedules against real daemons, checked against "
        "a reference model. Schedule i has seed SEED+i: replay one with --seed S "
        "--schedules 1.",
    )
    parser.add_argument("--schedules", type=int, default=None, help="how many (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default random)")
    parser.add_argument(
        "--budget", type=float, default=None, help="stop starting schedules after this many s"
    )
    parser.add_argument("--ping-interval", type=float, default=Timings().ping_interval)
    parser.add_argument("--lease-ttl", type=float, default=Timings().lease_ttl)
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per schedule")
    parser.add_argument("-x", "--stop-on-failure", action="store_true")
    parser.add_argument(
        "--reports", type=int, default=5, help="full reports of the first N failing schedules"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    seed = args.seed if args.seed is not None else secrets.randbelow(10**9)
    schedules = args.schedules if args.schedules is not None or args.budget else 1
    timings = Timings.scaled(args.ping_interval, args.lease_ttl)
    print(f"chaos: base seed {seed}", flush=True)
    try:
        summary = run(
            base_seed=seed,
            schedules=schedules,
            budget=args.budget,
            timings=timings,
            verbose=args.verbose,
            stop_on_failure=args.stop_on_failure,
            reports=args.reports,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("chaos: interrupted (every process it started is stopped)", flush=True)
        return 130
    print(summary.render(), flush=True)
    return 1 if summary.violation_count else 0


if __name__ == "__main__":
    sys.exit(main())
