"""Heal times: how long the service takes to agree with reality again after each fault.

``.venv/bin/python bench/heal.py [--fast] [--only NAME ...] [--clients N] [--json]``

Real processes on 127.0.0.1 only: a private ``redis-server`` per scenario
(``faults.RedisServer``), two daemons ``d1`` and ``d2`` (``daemons.DaemonProcess``, with
the daemon's default timings, or ``--fast``: ping 0.5 s, timeout 1.5 s, lease 3 s) and
``--clients`` SDK ``PresenceClient``s (users in mutual pairs, server list ``[d1, d2]``,
so they all start on d1). Each scenario injects one fault for real (``faults.TcpProxy``,
``RedisServer.pause``/``restart_empty``, signals to d1, ``faults.UdpRelay``) and samples,
every 50 ms from the start of the fault:

- **Redis**: for every live client, ``presence:{user}:clients`` holds exactly that
  client, with its current session token and the instance id of the daemon it talks
  to; every user's declared friends and reverse index are what the clients declared.
- **views**: every live client's ``client.friends`` equals the truth (a declared friend
  is online iff its client is live and the friendship is mutual).

A heal time is measured from the end of the fault (for SIGKILL and SIGTERM: from the
signal) to the first sample of the last run of correct samples; 0 means the state was
already right when the fault ended and stayed right. A scenario ends once both have been
right for a settle period (ping interval + 1 s, at least 2.5 s) and any scenario-specific
event happened, or after a bound (lease + 2 pings + 5 s, or ``--bound``), when the
figure says "did not heal". **Flaps** are the FriendEvents saying a friend went offline,
seen by any client while that friend's client never stopped (from the start of the fault
to the end). Nothing asserts: the script prints figures (``--json``: the raw results as
well; ``--logs DIR`` keeps the daemons' logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis.asyncio
from loadgen import machine
from redis.exceptions import RedisError

from presence_client.sdk import Event, FriendEvent, PresenceClient, StatusEvent
from presence_daemon import keys

# The fault tools live with the tests (they import pytest, and raise pytest.fail's
# exception when a daemon does not start).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pytest

from daemons import UNLIMITED, DaemonProcess
from faults import RedisServer, TcpProxy, UdpRelay

Address = tuple[str, int]
Check = Callable[[], bool | Awaitable[bool]]

SAMPLE_INTERVAL: Final = 0.05
"""Seconds between two samples of the truth (the resolution of every figure)."""
SETUP_TIMEOUT: Final = 15.0
"""Seconds the clients may take to connect and see each other before a fault."""
CLOSE_TIMEOUT: Final = 3.0
"""Seconds one client may take to say goodbye at the end of a scenario."""
REDIS_READ_TIMEOUT: Final = 0.5
"""Socket timeout of the truth reader (Redis may be stopped)."""
UDP_FAULT: Final = 10.0
"""Seconds the lossy relay faults datagrams in the udp scenario."""
MOVED_RE: Final = re.compile(r"shutdown: (\d+) of (\d+) clients moved to another daemon")


# ---------------------------------------------------------------------------
# Timings.


@dataclass(frozen=True)
class Timings:
    ping: float
    timeout: float
    lease: float
    flags: Mapping[str, str | None]
    """DaemonProcess flags (None drops DaemonProcess's fast test default: daemon default)."""
    bound_override: float | None = None

    @classmethod
    def choose(cls, fast: bool, bound: float | None = None) -> Timings:
        # DaemonProcess passes test timings unless told otherwise; None = daemon default.
        # The request-rate limits too (the 20 clients share 127.0.0.1: within the bursts).
        flags: dict[str, str | None] = {
            "--ping-interval": None,
            "--timeout": None,
            "--sweep-interval": None,
            "--log-level": "info",
            "--snapshot-interval": None,
            "--notify-coalesce": None,
            **dict.fromkeys(UNLIMITED, None),
        }
        if not fast:
            return cls(5.0, 15.0, 10.0, flags, bound)
        # Everything 10x faster, the snapshot interval and coalescing window included.
        flags |= {
            "--ping-interval": "0.5",
            "--timeout": "1.5",
            "--lease-ttl": "3",
            "--snapshot-interval": "0.1",
            "--notify-coalesce": "0.05",
        }
        return cls(0.5, 1.5, 3.0, flags, bound)

    @property
    def settle(self) -> float:
        """Seconds both checks must hold before a scenario ends."""
        return max(2.5, self.ping + 1.0)

    @property
    def bound(self) -> float:
        """Seconds after the end of a fault before a check is reported as not healed."""
        if self.bound_override is not None:
            return self.bound_override
        return self.lease + 2 * self.ping + 5.0

    @property
    def long_fault(self) -> float:
        """A fault longer than the lease: lease + 2 s."""
        return self.lease + 2.0

    @property
    def short_pause(self) -> float:
        """A Redis pause shorter than the lease: 3 s (half the lease if that is less)."""
        return min(3.0, self.lease / 2)


# ---------------------------------------------------------------------------
# Clients and what they saw.


@dataclass
class Member:
    """One SDK client and every event it emitted, with its monotonic time."""

    user: str
    declared: tuple[str, ...]
    client: PresenceClient
    events: list[tuple[float, Event]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client.add_listener(self._record)

    def _record(self, event: Event) -> None:
        self.events.append((time.monotonic(), event))


class Track:
    """Samples of one check: (time, right?) and what was last seen wrong."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, bool]] = []
        self.since: float | None = None
        """First sample of the current run of right samples (None while wrong)."""
        self.detail = ""

    def add(self, t: float, ok: bool, detail: str) -> None:
        self.samples.append((t, ok))
        if not ok:
            self.since = None
            self.detail = detail
        elif self.since is None:
            self.since = t

    def heal_after(self, t_end: float) -> float | None:
        """Seconds from ``t_end`` until the check was right for good; None if it is not."""
        return None if self.since is None else max(0.0, self.since - t_end)

    def wrong_for(self, t_from: float) -> float:
        """Seconds the check was wrong after ``t_from`` (summed over sample gaps)."""
        total = 0.0
        for (t, ok), (t_next, _) in zip(self.samples, self.samples[1:], strict=False):
            if not ok and t >= t_from:
                total += t_next - t
        return total


def summarize(wrong: Sequence[str]) -> str:
    return f"{len(wrong)} wrong, e.g. {wrong[0]}" if wrong else ""


# ---------------------------------------------------------------------------
# One scenario's world: Redis, d1, d2, optional proxy and relay, clients.


class Scene:
    def __init__(
        self,
        timings: Timings,
        clients: int,
        *,
        proxy: bool = False,
        relay: bool = False,
        churners: int = 0,
        seed: int = 0,
    ) -> None:
        self.timings = timings
        self.n_clients = clients
        self.n_churners = churners
        self.use_proxy = proxy
        self.use_relay = relay
        self.seed = seed
        self.redis = RedisServer()
        self.proxy: TcpProxy | None = None
        self.relay: UdpRelay | None = None
        self.daemons: dict[str, DaemonProcess] = {}
        self.owner_of: dict[Address, str] = {}
        self.members: dict[str, Member] = {}
        self.live: set[str] = set()
        """Users whose client is meant to be connected right now."""
        self.stable: set[str] = set()
        """Users whose client is never stopped on purpose (an offline event is a flap)."""
        self.fans: dict[str, set[str]] = {}
        self._truth: redis.asyncio.Redis | None = None

    @property
    def truth(self) -> redis.asyncio.Redis:
        assert self._truth is not None, "scene not started"
        return self._truth

    @property
    def d1(self) -> DaemonProcess:
        return self.daemons["d1"]

    @property
    def d2(self) -> DaemonProcess:
        return self.daemons["d2"]

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        url1 = self.redis.url
        if self.use_proxy:
            self.proxy = TcpProxy(self.redis.address).start()
            url1 = self.proxy.redis_url()
        d1 = DaemonProcess(url1, "d1", flags=self.timings.flags)
        d2 = DaemonProcess(self.redis.url, "d2", flags=self.timings.flags)
        self.daemons = {"d1": d1, "d2": d2}
        await asyncio.gather(asyncio.to_thread(d1.start), asyncio.to_thread(d2.start))
        self.owner_of = {d1.address: "d1", d2.address: "d2"}
        front = d1.address
        if self.use_relay:
            self.relay = UdpRelay(d1.address, seed=self.seed).start()
            front = self.relay.address
            self.owner_of[front] = "d1"
        self._truth = redis.asyncio.Redis.from_url(
            self.redis.url,
            decode_responses=True,
            socket_timeout=REDIS_READ_TIMEOUT,
            socket_connect_timeout=REDIS_READ_TIMEOUT,
        )

        watched = [f"u{i:02d}" for i in range(self.n_clients)]
        churn = [f"x{k}" for k in range(self.n_churners)]
        declared: dict[str, list[str]] = {u: [watched[i ^ 1]] for i, u in enumerate(watched)}
        declared |= {x: [] for x in churn}
        for i, u in enumerate(watched):
            if churn:
                x = churn[i % len(churn)]
                declared[u].append(x)
                declared[x].append(u)
        for u in watched:
            self._add(u, declared[u], [front, d2.address])
        for x in churn:
            self._add(x, declared[x], [d2.address])
        self.fans = {u: {v for v, names in declared.items() if u in names} for u in declared}

        limit = asyncio.Semaphore(50)

        async def connect(member: Member) -> None:
            async with limit:
                await asyncio.wait_for(member.client.connect(), SETUP_TIMEOUT)

        await asyncio.gather(*(connect(m) for m in self.members.values()))
        self.live = set(self.members)
        self.stable = set(watched)
        await self._wait_steady()

    def _add(self, user: str, declared: Sequence[str], servers: Sequence[Address]) -> None:
        client = PresenceClient(user, declared, servers=list(servers), client_id=f"{user}-c")
        self.members[user] = Member(user, tuple(declared), client)

    async def _wait_steady(self) -> None:
        deadline = time.monotonic() + SETUP_TIMEOUT
        while True:
            views_ok, views_detail = self.check_views()
            redis_ok, redis_detail = await self.check_redis()
            if views_ok and redis_ok:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"setup not steady within {SETUP_TIMEOUT:.0f} s: {views_detail or redis_detail}"
                )
            await asyncio.sleep(SAMPLE_INTERVAL)

    # -- the truth -------------------------------------------------------------------

    def expected_view(self, user: str) -> dict[str, bool]:
        member = self.members[user]
        return {
            name: name in self.live and user in self.members[name].declared
            for name in member.declared
        }

    def check_views(self) -> tuple[bool, str]:
        wrong = []
        for user in sorted(self.live):
            seen, expected = self.members[user].client.friends, self.expected_view(user)
            if seen != expected:
                wrong.append(f"{user} sees {seen}, truth {expected}")
        return not wrong, summarize(wrong)

    async def check_redis(self) -> tuple[bool, str]:
        users = sorted(self.members)
        try:
            pipe = self.truth.pipeline(transaction=False)
            for user in users:
                pipe.hgetall(keys.clients_key(user))
                pipe.smembers(keys.friends_key(user))
                pipe.smembers(keys.fans_key(user))
            values = await asyncio.wait_for(pipe.execute(), 4 * REDIS_READ_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:
            return False, f"Redis not readable ({type(exc).__name__})"
        wrong = []
        for i, user in enumerate(users):
            entries, friends, fans = values[3 * i : 3 * i + 3]
            member = self.members[user]
            if user not in self.live:
                if entries:
                    wrong.append(f"{user} online in Redis, client gone")
                continue
            client = member.client
            if client.session is None:
                wrong.append(f"{user} client not connected")
                continue
            entry = entries.get(client.client_id)
            if entry is None:
                wrong.append(f"{user} offline in Redis")
                continue
            token, owner, _address = str(entry).split("|", 2)
            if token != client.session.hex() or owner != self.owner_of.get(client.server):
                wrong.append(f"{user} entry {token[:8]}@{owner}, client {client.session.hex()[:8]}")
            elif len(entries) != 1:
                wrong.append(f"{user} has {len(entries)} entries")
            elif set(friends) != set(member.declared):
                wrong.append(f"{user} friends {sorted(friends)} != {sorted(member.declared)}")
            elif set(fans) != self.fans[user]:
                wrong.append(f"{user} fans {sorted(fans)} != {sorted(self.fans[user])}")
        return not wrong, summarize(wrong)

    async def all_offline(self) -> bool:
        """Every stable user is gone from Redis (reaped)."""
        pipe = self.truth.pipeline(transaction=False)
        for user in sorted(self.stable):
            pipe.exists(keys.clients_key(user))
        return not any(await asyncio.wait_for(pipe.execute(), 4 * REDIS_READ_TIMEOUT))

    def all_on(self, daemon: DaemonProcess) -> bool:
        """Every stable client is connected to ``daemon``."""
        return all(
            self.members[u].client.connected and self.members[u].client.server == daemon.address
            for u in self.stable
        )

    # -- what users saw --------------------------------------------------------------

    def flaps(self, t_from: float, t_to: float) -> list[tuple[str, str, float]]:
        """(watcher, friend, time) of offline events about stable users."""
        found = []
        for member in self.members.values():
            for t, event in member.events:
                if (
                    t_from <= t <= t_to
                    and isinstance(event, FriendEvent)
                    and not event.online
                    and event.name in self.stable
                ):
                    found.append((member.user, event.name, t))
        return sorted(found, key=lambda f: f[2])

    def reconnects(self, t_from: float, t_to: float) -> int:
        return sum(
            1
            for u in self.stable
            for t, event in self.members[u].events
            if t_from <= t <= t_to and isinstance(event, StatusEvent)
            if event.status == "reconnecting"
        )

    def tracebacks(self) -> list[str]:
        return [name for name, d in self.daemons.items() if "Traceback" in d.stderr()]

    # -- teardown --------------------------------------------------------------------

    async def close(self, logs: Path | None = None, prefix: str = "") -> None:
        """Kill the daemons and the relay first (so goodbyes fail fast on ICMP), then
        close the clients (bounded), the reader, the proxy and Redis. With ``logs``, keep
        each daemon's log there as ``<prefix>-<daemon>.log``."""
        for daemon in self.daemons.values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(daemon.close)
        if self.relay is not None:
            self.relay.stop()

        async def goodbye(member: Member) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(member.client.disconnect(), CLOSE_TIMEOUT)

        await asyncio.gather(*(goodbye(m) for m in self.members.values()))
        if self._truth is not None:
            with contextlib.suppress(Exception):
                await self._truth.aclose()
        if self.proxy is not None:
            self.proxy.stop()
        await asyncio.to_thread(self.redis.stop)
        for name, daemon in self.daemons.items():
            if logs is not None:
                with contextlib.suppress(OSError):
                    (logs / f"{prefix}-{name}.log").write_text(daemon.stderr())
            daemon.cleanup()


# ---------------------------------------------------------------------------
# Sampling.


class Observer:
    """Samples the scene's two checks (and optional events) in the background."""

    def __init__(self, scene: Scene, events: Mapping[str, Check] | None = None) -> None:
        self.scene = scene
        self.redis = Track()
        self.views = Track()
        self.events = dict(events or {})
        self.first: dict[str, float] = {}
        """Event name -> the first time its check held."""
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 10.0)

    async def _run(self) -> None:
        while not self._stop:
            t = time.monotonic()
            self.views.add(t, *self.scene.check_views())
            ok, detail = await self.scene.check_redis()
            self.redis.add(time.monotonic(), ok, detail)
            for name, check in self.events.items():
                if name in self.first:
                    continue
                try:
                    result = check()
                    if inspect.isawaitable(result):
                        result = await result
                except (RedisError, OSError, TimeoutError):
                    result = False
                if result:
                    self.first[name] = time.monotonic()
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def settle(
        self, t_end: float, *, require: Iterable[str] = (), not_before: float = 0.0
    ) -> bool:
        """Wait until both checks held for the settle period (measured from no earlier
        than ``t_end``), every ``require``d event happened and ``not_before`` passed;
        False if the bound after ``t_end`` ran out first."""
        timings = self.scene.timings
        deadline = t_end + timings.bound
        required = list(require)
        while True:
            if self._task is not None and self._task.done():
                self._task.result()  # the sampler failed: raise its error
                raise RuntimeError("the sampler stopped")
            now = time.monotonic()
            r, v = self.redis.since, self.views.since
            if (
                r is not None
                and v is not None
                and now >= max(r, v, t_end) + timings.settle
                and now >= not_before
                and all(name in self.first for name in required)
            ):
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(0.1)


@dataclass
class Run:
    """One fault's timeline: start, end, the observer's samples and extra notes."""

    observer: Observer
    t_start: float
    t_end: float
    t_stop: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def since_start(self, name: str) -> float | None:
        t = self.observer.first.get(name)
        return None if t is None else t - self.t_start

    def since_end(self, name: str) -> float | None:
        t = self.observer.first.get(name)
        return None if t is None else t - self.t_end


@contextlib.asynccontextmanager
async def observing(
    scene: Scene, events: Mapping[str, Check] | None = None
) -> AsyncIterator[Observer]:
    async with Observer(scene, events) as observer:
        await asyncio.sleep(SAMPLE_INTERVAL)  # one sample of the steady state first
        yield observer


# ---------------------------------------------------------------------------
# Scenarios.


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


async def partition(scene: Scene) -> Run:
    """TcpProxy between d1 and Redis blackholed for lease + 2 s, then healed."""
    proxy = scene.proxy
    assert proxy is not None
    hold = scene.timings.long_fault
    async with observing(scene, {"reaped": scene.all_offline}) as obs:
        t_start = time.monotonic()
        proxy.partition()
        await asyncio.sleep(hold)
        proxy.heal()
        run = Run(obs, t_start, time.monotonic())
        await obs.settle(run.t_end)
    reaped = run.since_start("reaped")
    run.notes.append(
        f"{hold:.0f} s cut off; "
        + (f"d2 reaped all at +{reaped:.1f} s" if reaped is not None else "never all reaped")
    )
    run.extra["reaped_s"] = reaped
    return run


async def redis_pause(scene: Scene, hold: float) -> Run:
    """Redis SIGSTOPped for ``hold`` s, then SIGCONT."""
    async with observing(scene) as obs:
        t_start = time.monotonic()
        scene.redis.pause()
        try:
            await asyncio.sleep(hold)
        finally:
            scene.redis.resume()
        run = Run(obs, t_start, time.monotonic())
        await obs.settle(run.t_end)
    run.notes.append(f"Redis stopped {hold:.1f} s (lease {scene.timings.lease:.0f} s)")
    return run


async def daemon_stop(scene: Scene) -> Run:
    """d1 SIGSTOPped for lease + 2 s, then SIGCONT; watched past its timeout after that."""
    d1, d2 = scene.d1, scene.d2
    hold = scene.timings.long_fault
    async with observing(scene, {"moved": lambda: scene.all_on(d2)}) as obs:
        t_start = time.monotonic()
        d1.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(hold)
        finally:
            d1.send_signal(signal.SIGCONT)
        run = Run(obs, t_start, time.monotonic())
        # The thawed d1 still holds its old sessions until they time out: watch that long.
        await obs.settle(run.t_end, not_before=run.t_end + scene.timings.timeout + 1.0)
    moved = run.since_start("moved")
    run.notes.append(
        f"d1 stopped {hold:.0f} s; "
        + (f"all on d2 at +{moved:.1f} s into it" if moved is not None else "not all moved")
    )
    run.extra["moved_s_into_fault"] = moved
    return run


async def redis_restart(scene: Scene) -> Run:
    """Redis killed and restarted empty on the same port."""
    async with observing(scene) as obs:
        t_start = time.monotonic()
        await asyncio.to_thread(scene.redis.restart_empty)
        run = Run(obs, t_start, time.monotonic())
        await obs.settle(run.t_end)
    run.notes.append(f"kill + empty restart took {run.t_end - run.t_start:.2f} s")
    return run


async def daemon_kill(scene: Scene) -> Run:
    """d1 SIGKILLed: its clients fail over to d2; d2 reaps d1 once its lease lapses."""
    d1, d2 = scene.d1, scene.d2

    async def d1_unregistered() -> bool:
        return not await scene.truth.sismember(keys.OWNERS_KEY, "d1")

    events: dict[str, Check] = {"moved": lambda: scene.all_on(d2), "unregistered": d1_unregistered}
    async with observing(scene, events) as obs:
        t_start = time.monotonic()
        await asyncio.to_thread(d1.kill)
        run = Run(obs, t_start, t_start)
        await obs.settle(run.t_end, require=["moved", "unregistered"])
    moved, gone = run.since_end("moved"), run.since_end("unregistered")
    run.notes.append(f"all on d2 after {fmt_s(moved)}; d1 reaped and unregistered {fmt_s(gone)}")
    run.extra |= {"moved_s": moved, "unregistered_s": gone}
    return run


async def daemon_term(scene: Scene) -> Run:
    """d1 SIGTERMed while d2 is alive: GO_AWAY moves its clients, then it exits."""
    d1, d2 = scene.d1, scene.d2
    events: dict[str, Check] = {
        "moved": lambda: scene.all_on(d2),
        "exited": lambda: not d1.running,
    }
    async with observing(scene, events) as obs:
        t_start = time.monotonic()
        d1.send_signal(signal.SIGTERM)
        run = Run(obs, t_start, t_start)
        await obs.settle(run.t_end, require=["moved", "exited"])
    moved, exited = run.since_end("moved"), run.since_end("exited")
    code = d1.process.returncode if d1.process is not None else None
    said = MOVED_RE.search(d1.stderr())
    told = f"; d1 logged {said[1]} of {said[2]} moved" if said else ""
    run.notes.append(f"all on d2 after {fmt_s(moved)}; d1 exit {code} after {fmt_s(exited)}{told}")
    run.extra |= {"moved_s": moved, "exit_s": exited, "exit_code": code}
    return run


async def udp_lossy(scene: Scene) -> Run:
    """A UdpRelay in front of d1 drops 20 %, duplicates 5 % and delays 0-50 ms every
    datagram for 10 s while churn users come and go on d2, then is cleared."""
    relay = scene.relay
    assert relay is not None
    churners = sorted(set(scene.members) - scene.stable)

    async def churn() -> None:
        async def down(user: str) -> None:
            scene.live.discard(user)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(scene.members[user].client.disconnect(), CLOSE_TIMEOUT)

        async def up(user: str) -> None:
            await asyncio.wait_for(scene.members[user].client.connect(), SETUP_TIMEOUT)
            scene.live.add(user)

        await asyncio.sleep(0.1 * UDP_FAULT)
        await asyncio.gather(*(down(x) for x in churners))
        await asyncio.sleep(0.3 * UDP_FAULT)
        await asyncio.gather(*(up(x) for x in churners))
        await asyncio.sleep(0.3 * UDP_FAULT)
        await asyncio.gather(*(down(x) for x in churners[len(churners) // 2 :]))

    async with observing(scene) as obs:
        t_start = time.monotonic()
        relay.set_faults(drop=0.2, duplicate=0.05, delay=(0.0, 0.05))
        churning = asyncio.create_task(churn())
        try:
            await asyncio.sleep(UDP_FAULT)
            await asyncio.wait_for(churning, SETUP_TIMEOUT)
        finally:
            churning.cancel()
            relay.clear()
        run = Run(obs, t_start, time.monotonic())
        await obs.settle(run.t_end)
    moved = sum(1 for u in scene.stable if scene.members[u].client.server == scene.d2.address)
    run.notes.append(
        f"{relay.dropped} dropped, {relay.duplicated} duplicated; "
        f"{len(churners)} churn users on d2 went off/on/half off during it; "
        f"{moved} clients failed over to d2"
    )
    run.extra |= {"relay_dropped": relay.dropped, "relay_duplicated": relay.duplicated}
    run.extra |= {"failed_over": moved}
    return run


@dataclass(frozen=True)
class Scenario:
    name: str
    title: Callable[[Timings], str]
    run: Callable[[Scene], Awaitable[Run]]
    proxy: bool = False
    relay: bool = False
    churn: bool = False


SCENARIOS: Final = (
    Scenario(
        "partition",
        lambda t: f"d1 partitioned from Redis {t.long_fault:.0f} s",
        partition,
        proxy=True,
    ),
    Scenario(
        "redis_pause_short",
        lambda t: f"Redis SIGSTOP {t.short_pause:.1f} s",
        lambda s: redis_pause(s, s.timings.short_pause),
    ),
    Scenario(
        "redis_pause_long",
        lambda t: f"Redis SIGSTOP {t.long_fault:.0f} s",
        lambda s: redis_pause(s, s.timings.long_fault),
    ),
    Scenario("daemon_stop", lambda t: f"d1 SIGSTOP {t.long_fault:.0f} s", daemon_stop),
    Scenario("redis_restart", lambda t: "Redis restarted empty", redis_restart),
    Scenario("daemon_kill", lambda t: "d1 SIGKILL", daemon_kill),
    Scenario("daemon_term", lambda t: "d1 SIGTERM (d2 alive)", daemon_term),
    Scenario(
        "udp_lossy",
        lambda t: f"UDP 20% drop/5% dup/0-50ms {UDP_FAULT:.0f} s",
        udp_lossy,
        relay=True,
        churn=True,
    ),
)


async def run_scenario(
    scenario: Scenario, timings: Timings, args: argparse.Namespace
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "fault": scenario.title(timings),
        "redis_s": None,
        "views_s": None,
        "flaps": None,
        "bound_s": timings.bound,
    }
    scene = Scene(
        timings,
        args.clients,
        proxy=scenario.proxy,
        relay=scenario.relay,
        churners=args.clients // 5 if scenario.churn else 0,
        seed=args.seed,
    )
    started = time.monotonic()
    notes: list[str] = []
    try:
        await scene.start()
        run = await scenario.run(scene)
        run.t_stop = time.monotonic()
        obs = run.observer
        flaps = scene.flaps(run.t_start, run.t_stop)
        result |= {
            "redis_s": obs.redis.heal_after(run.t_end),
            "views_s": obs.views.heal_after(run.t_end),
            "flaps": len(flaps),
            "flapped_users": len({name for _, name, _ in flaps}),
            "flap_times_s": [round(t - run.t_end, 3) for _, _, t in flaps],
            "fault_s": run.t_end - run.t_start,
            "observed_s": run.t_stop - run.t_start,
            "redis_wrong_s": obs.redis.wrong_for(run.t_start),
            "views_wrong_s": obs.views.wrong_for(run.t_start),
            "reconnects": scene.reconnects(run.t_start, run.t_stop),
            "clients": len(scene.members),
        }
        result |= run.extra
        notes += run.notes
        for key, track in (("redis_s", obs.redis), ("views_s", obs.views)):
            if result[key] is None:
                notes.append(f"{key[:-2]}: {track.detail}")
        wrong_r, wrong_v = result["redis_wrong_s"], result["views_wrong_s"]
        if max(wrong_r, wrong_v) >= SAMPLE_INTERVAL:
            notes.append(f"wrong {wrong_r:.1f} s (Redis) / {wrong_v:.1f} s (views) in all")
        if flaps:
            notes.append(f"{result['flapped_users']} users flapped")
        if result["reconnects"]:
            notes.append(f"{result['reconnects']} reconnects")
    except (Exception, pytest.fail.Exception) as exc:
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        notes.append(f"ERROR {result['error']}")
    finally:
        broken = scene.tracebacks()
        if broken:
            notes.append(f"traceback in {', '.join(broken)} log")
            result["tracebacks"] = broken
        await scene.close(args.logs, scenario.name)
    result["notes"] = "; ".join(notes)
    result["wall_s"] = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------
# Report.


def fmt_heal(value: float | None, bound: float) -> str:
    return f"> {bound:.0f} s (did not heal)" if value is None else f"{value:.2f} s"


def table(rows: Sequence[Sequence[str]]) -> str:
    n = len(rows[0])
    widths = [max(len(row[i]) for row in rows) for i in range(n - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [f"{row[0]:<{widths[0]}}", *(f"{row[i]:>{widths[i]}}" for i in range(1, n - 1))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in [*widths, len(row[-1])]))
    return "\n".join(lines)


def report(results: Mapping[str, Mapping[str, Any]]) -> str:
    rows: list[tuple[str, str, str, str, str]] = [
        ("fault", "heal Redis", "heal views", "flaps", "notes")
    ]
    for result in results.values():
        errored = "error" in result
        rows.append(
            (
                result["fault"],
                "-" if errored else fmt_heal(result["redis_s"], result["bound_s"]),
                "-" if errored else fmt_heal(result["views_s"], result["bound_s"]),
                "-" if result["flaps"] is None else str(result["flaps"]),
                result["notes"],
            )
        )
    return table(rows)


async def run_all(args: argparse.Namespace, timings: Timings) -> dict[str, dict[str, Any]]:
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    results: dict[str, dict[str, Any]] = {}
    for index, scenario in enumerate(chosen, 1):
        print(f"[{index}/{len(chosen)}] {scenario.name}: {scenario.title(timings)} ...", flush=True)
        result = await run_scenario(scenario, timings, args)
        results[scenario.name] = result
        print(
            f"    redis {fmt_s(result['redis_s'])}, views {fmt_s(result['views_s'])}, "
            f"flaps {result['flaps']} ({result['wall_s']:.0f} s)",
            flush=True,
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--fast", action="store_true", help="ping 0.5 s, timeout 1.5 s, lease 3 s (~1.5 min)"
    )
    parser.add_argument("--clients", type=int, default=20, help="SDK clients (even: pairs)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[s.name for s in SCENARIOS],
        help="run only these scenarios",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the lossy UDP relay")
    parser.add_argument(
        "--bound",
        type=float,
        help="seconds after a fault before 'did not heal' (default: lease + 2 pings + 5 s)",
    )
    parser.add_argument("--logs", type=Path, help="keep the daemons' logs in this directory")
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    args = parser.parse_args(argv)
    if args.clients < 2 or args.clients % 2:
        parser.error("--clients must be an even number >= 2")
    timings = Timings.choose(args.fast, args.bound)
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)

    info = machine()
    load_before = os.getloadavg()[0]
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"{info['platform']}, load average before start {load_before:.2f}"
    )
    print(
        f"timings: ping {timings.ping:g} s, timeout {timings.timeout:g} s, lease "
        f"{timings.lease:g} s ({'--fast' if args.fast else 'daemon defaults'}); settle "
        f"{timings.settle:g} s, bound {timings.bound:g} s; {args.clients} clients on [d1, d2]",
        flush=True,
    )
    started = time.monotonic()
    results = asyncio.run(run_all(args, timings))
    load_after = os.getloadavg()[0]
    print(f"\n== heal times after each fault ({time.monotonic() - started:.0f} s)")
    print(report(results))
    print(
        "heal: from the end of the fault (kill/term: from the signal) until right for good; "
        f"resolution {SAMPLE_INTERVAL * 1000:.0f} ms. flaps: offline events about users "
        "whose client never stopped."
    )
    cpus = os.cpu_count() or 1
    if max(load_before, load_after) > cpus * 0.75:
        print(
            f"warning: load average {load_before:.2f} before, {load_after:.2f} after on "
            f"{cpus} CPUs: other work was running; the figures may be noisy."
        )
    if args.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "timings": {"ping_s": timings.ping, "timeout_s": timings.timeout}
                    | {"lease_s": timings.lease, "settle_s": timings.settle}
                    | {"bound_s": timings.bound, "fast": args.fast},
                    "load_average": [load_before, load_after],
                    "heal": results,
                },
                indent=2,
            )
        )
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
