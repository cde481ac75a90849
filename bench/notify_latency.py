"""Notification latency: from a user's CONNECT (or DISCONNECT) leaving its socket to a
mutual friend's NOTIFY arriving, one transition at a time.

A *watcher* session (raw protocol over UDP, verified by a first PING) declares the
*movers* as friends, and each mover declares the watcher (CONNECT ``f``), so every
pair is mutual. Movers then connect and disconnect one at a time, ``--cycles`` times in
all; for each transition the prober takes ``time.perf_counter_ns()`` just before the
send and just after the watcher's socket returns the NOTIFY (online, or offline), in
one process. The reply to the mover (CONNECT_OK, DISCONNECT_OK) is timed too.

The daemon holds a NOTIFY about a friend it told the same session about less than
``--notify-coalesce`` (0.5 s) ago, and sends only the newest when that window ends (see
docs/design.md). A latency benchmark must not wait for that window, so ``--movers``
movers take turns and none makes a transition within ``coalesce + 50 ms`` of its
previous NOTIFY; one warm-up round (each mover declares its friend list once) is not
measured.

Four settings, on one private Redis and two daemons ``d1`` and ``d2``:

- ``same_idle``: watcher and movers on d1, nothing else running;
- ``across_idle``: watcher on d1, movers on d2 (the NOTIFY is handed over through Redis);
- ``same_loaded`` / ``across_loaded``: the same while a pacer (``loadgen.py pace``, its
  own process) sends pings on established sessions at ``--load`` (0.5) of one daemon's
  ping capacity. The capacity is measured first in the same run (``loadgen.py ping``,
  closed loop, ``--capacity-duration`` seconds) on a third, throwaway daemon. Across
  daemons the pacer's sessions are split evenly over d1 and d2: both daemons share the
  server CPU, so in both loaded settings that CPU is about half busy with pings.

Daemons run on the server CPU; Redis, the pacer and the prober (this process, pinned for
the measurement) on the other (bench/README.md, "What runs where").

Run alone: ``.venv/bin/python bench/notify_latency.py [--cycles N] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from loadgen import (
    BENCH_DIR,
    LOOPBACK,
    Address,
    Daemon,
    bench_main,
    cpu_seconds,
    machine_busy,
    pin_pid,
    pinned,
    plan_cpus,
    read_line,
    run_loadgen,
    start_daemon,
    stop_process,
)

from presence_client.protocol import (
    MAX_DATAGRAM,
    Connect,
    ConnectOk,
    Disconnect,
    DisconnectOk,
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
from presence_daemon.config import Config
from presence_daemon.embedded import EmbeddedRedis

SETTINGS: Final = (
    ("same_idle", False, False),
    ("across_idle", True, False),
    ("same_loaded", False, True),
    ("across_loaded", True, True),
)
"""(name, movers on d2 rather than d1, background ping load)."""
REPLY_TIMEOUT: Final = 1.0
"""Seconds before a CONNECT or DISCONNECT without an answer is sent again."""
GIVE_UP: Final = 3.0
"""Seconds after which a transition whose NOTIFY has not come counts as missed."""
COALESCE_MARGIN: Final = 0.05
"""Seconds added to the daemon's coalescing window between two transitions of a mover."""
NS_PER_MS: Final = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycles", type=int, default=300, help="connect+disconnect cycles")
    parser.add_argument("--movers", type=int, default=64, help="movers taking turns")
    parser.add_argument(
        "--load", type=float, default=0.5, help="background pings, as a share of capacity"
    )
    parser.add_argument(
        "--capacity-duration", type=float, default=2.0, help="seconds of the capacity run"
    )
    parser.add_argument("--clients", type=int, default=1000, help="sessions the pings use")
    parser.add_argument(
        "--notify-coalesce",
        type=float,
        default=Config().notify_coalesce,
        help="the daemons' coalescing window, seconds (their --notify-coalesce)",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of load before probing")
    parser.add_argument(
        "--settings",
        default=",".join(name for name, _, _ in SETTINGS),
        help="comma-separated settings to run (default: all four)",
    )


# ---------------------------------------------------------------------------
# The prober (runs in this process, pinned to the load CPU).


@dataclass
class Watch:
    """A non-blocking UDP socket on 127.0.0.1 connected to one daemon."""

    sock: socket.socket

    @classmethod
    def open(cls, server: Address) -> Watch:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((LOOPBACK, 0))
        sock.connect(server)
        sock.setblocking(False)
        return cls(sock)

    def send(self, msg: Message, pad: bool = False) -> None:
        self.sock.send(encode(msg, pad_to=MAX_DATAGRAM if pad else None))

    def drain(self) -> Iterator[tuple[int, Message | None]]:
        """Every datagram waiting now, decoded, with its arrival time (ns)."""
        while True:
            try:
                data = self.sock.recv(MAX_DATAGRAM + 100)
            except (BlockingIOError, InterruptedError):
                return
            at = time.perf_counter_ns()
            try:
                yield at, decode(data)
            except ProtocolError:
                yield at, None


@dataclass
class Samples:
    """Latencies of one setting, in nanoseconds, by what was timed."""

    online: list[int] = field(default_factory=list)
    offline: list[int] = field(default_factory=list)
    connect_ok: list[int] = field(default_factory=list)
    disconnect_ok: list[int] = field(default_factory=list)
    missed: dict[str, int] = field(default_factory=lambda: {"online": 0, "offline": 0})
    failures: list[str] = field(default_factory=list)
    """Transitions that got no CONNECT_OK / DISCONNECT_OK (the mover sits out the rest)."""
    transitions: int = 0
    """Every transition made, the unmeasured warm-up round's included."""


class Prober:
    """One watcher and ``movers`` movers; times each transition of a mover until the
    watcher's NOTIFY about it arrives."""

    def __init__(
        self, tag: str, watcher_server: Address, mover_server: Address, movers: int
    ) -> None:
        self.watcher_user = f"lat{tag}w"
        self.movers = [f"lat{tag}m{i:03d}" for i in range(movers)]
        self.watcher = Watch.open(watcher_server)
        self.mover = Watch.open(mover_server)  # movers share a socket, like behind a NAT
        self.epoll = select.epoll()
        self.epoll.register(self.watcher.sock.fileno(), select.EPOLLIN)
        self.epoll.register(self.mover.sock.fileno(), select.EPOLLIN)
        self.request = 0
        self.watcher_session = b""
        self.sessions: dict[str, bytes] = {}
        self.numbers: dict[str, int] = dict.fromkeys(self.movers, 0)
        self.versions: dict[str, int] = dict.fromkeys(self.movers, 0)
        self.last_notified: dict[str, float] = dict.fromkeys(self.movers, 0.0)
        self.last_ping = 0.0
        self.transitions = 0
        self.failed: set[str] = set()
        self.opened = time.monotonic()

    def close(self) -> None:
        self.epoll.close()
        self.watcher.sock.close()
        self.mover.sock.close()

    def next_request(self) -> int:
        self.request += 1
        return self.request

    def start(self) -> None:
        """Connect the watcher (its friend list names every mover) and verify it."""
        request = self.next_request()
        connect = Connect(request, f"{self.watcher_user}-c", self.watcher_user, tuple(self.movers))
        reply = self._call(self.watcher, connect, request, pad=True)
        if type(reply) is not ConnectOk:
            raise RuntimeError(f"the watcher could not connect: {reply}")
        self.watcher_session = reply.session
        if problem := self._ping_watcher():
            raise RuntimeError(problem)

    def stop(self) -> None:
        request = self.next_request()
        self._call(self.watcher, Disconnect(request, self.watcher_session), request)

    def _ping_watcher(self) -> str:
        """A PING verifies the watcher's address (only verified sessions are told) and,
        repeated, keeps it alive however long the run. Returns what went wrong, if any."""
        started = time.monotonic()
        self.last_ping = started
        other: list[str] = []
        for _ in range(3):
            self.watcher.send(Ping(self.watcher_session))
            deadline = time.monotonic() + REPLY_TIMEOUT
            while time.monotonic() < deadline:
                self.epoll.poll(0.05)
                for _, msg in self.watcher.drain():
                    if type(msg) is Pong:
                        return ""
                    other.append(
                        type(msg).__name__ + (f" {msg.code.name}" if type(msg) is Error else "")
                    )
        return (
            f"the watcher's PING got no PONG in {time.monotonic() - started:.1f} s "
            f"(+{started - self.opened:.1f} s into the setting; got {other})"
        )

    def _call(self, watch: Watch, msg: Message, request: int, pad: bool = False) -> Message:
        """Send a request until its reply comes (for set-up, not timed)."""
        for _ in range(5):
            watch.send(msg, pad)
            deadline = time.monotonic() + REPLY_TIMEOUT
            while time.monotonic() < deadline:
                self.epoll.poll(0.05)
                for _, reply in watch.drain():
                    if getattr(reply, "request", None) == request:
                        assert reply is not None
                        return reply
        raise RuntimeError(f"no reply to {msg}")

    def run(self, cycles: int, coalesce: float, samples: Samples) -> None:
        """``cycles`` connect+disconnect cycles, movers taking turns in rounds: all of a
        round's movers connect, then all of them disconnect. Timed into ``samples``."""
        done = 0
        while done < cycles:
            batch = self.movers[: min(len(self.movers), cycles - done)]
            for online in (True, False):
                for user in batch:
                    if user not in self.failed:
                        self._transition(user, online, coalesce, samples)
            done += len(batch)

    def _transition(self, user: str, online: bool, coalesce: float, samples: Samples) -> None:
        # Keep clear of the daemon's coalescing window for this (watcher, mover) pair.
        wait = self.last_notified[user] + coalesce + COALESCE_MARGIN - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if time.monotonic() - self.last_ping > 10.0 and (problem := self._ping_watcher()):
            samples.failures.append(problem)
        request = self.next_request()
        msg: Message
        if online:
            self.numbers[user] += 1
            msg = Connect(
                request, f"{user}-c", user, (self.watcher_user,), counter=self.numbers[user]
            )
        else:
            msg = Disconnect(request, self.sessions[user])
        data = encode(msg, pad_to=MAX_DATAGRAM if online else None)
        sent = time.perf_counter_ns()
        self.mover.sock.send(data)
        resend_at = time.monotonic() + REPLY_TIMEOUT
        give_up = time.monotonic() + GIVE_UP
        told_at = replied_at = 0
        reply: Message | None = None
        while (
            not (told_at and replied_at)
            and type(reply) is not Error  # refused: no NOTIFY will come
            and time.monotonic() < give_up
        ):
            self.epoll.poll(0.1)
            for at, note in self.watcher.drain():
                if (
                    type(note) is Notify
                    and note.friend.name == user
                    and note.friend.online is online
                    and note.friend.version > self.versions[user]
                ):
                    self.versions[user] = note.friend.version
                    told_at = at
            for at, answer in self.mover.drain():
                if getattr(answer, "request", None) != request:
                    continue
                if type(answer) is Error and answer.code is ErrorCode.TRY_AGAIN:
                    resend_at = time.monotonic() + 0.05
                    continue
                reply, replied_at = answer, at
            if not replied_at and time.monotonic() >= resend_at:
                self.mover.sock.send(data)
                resend_at = time.monotonic() + REPLY_TIMEOUT
        self.last_notified[user] = time.monotonic()
        self.transitions += 1
        kind = "online" if online else "offline"
        if type(reply) is not (ConnectOk if online else DisconnectOk):
            # Not a latency: say what happened, and leave this mover out from now on.
            self.failed.add(user)
            failure = (
                f"{user} {'CONNECT' if online else 'DISCONNECT'}: {reply or 'no reply'} "
                f"after {GIVE_UP:.0f} s, NOTIFY {'came' if told_at else 'did not come'} "
                f"(+{time.monotonic() - self.opened:.1f} s into the setting)"
            )
            samples.failures.append(failure)
            return
        if isinstance(reply, ConnectOk):
            self.sessions[user] = reply.session
        if told_at:
            (samples.online if online else samples.offline).append(told_at - sent)
        else:
            samples.missed[kind] += 1
        (samples.connect_ok if online else samples.disconnect_ok).append(replied_at - sent)


def probe(
    tag: str, watcher_server: Address, mover_server: Address, args: argparse.Namespace
) -> tuple[Samples, Samples]:
    """Set up a watcher and movers, run one unmeasured round (each mover declares its
    friend list), then the measured cycles; returns (measured, warm-up)."""
    prober = Prober(tag, watcher_server, mover_server, args.movers)
    warmup, samples = Samples(), Samples()
    try:
        prober.start()
        prober.run(len(prober.movers), args.notify_coalesce, warmup)
        prober.run(args.cycles, args.notify_coalesce, samples)
        prober.stop()
        samples.transitions = prober.transitions + 2  # and the watcher's own two
    finally:
        prober.close()
    return samples, warmup


@contextlib.contextmanager
def pinned_here(cpu: int | None) -> Iterator[None]:
    """Pin this thread to ``cpu`` for the block, then restore its CPUs."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---------------------------------------------------------------------------
# Background load and the settings.


@dataclass
class Pacer:
    """A ``loadgen.py pace`` child: pings at a fixed rate until its stdin closes."""

    proc: subprocess.Popen[str]

    @classmethod
    def start(
        cls, servers: Sequence[Address], rate: float, prefix: str, clients: int, cpu: int | None
    ) -> Pacer:
        args = [sys.executable, str(BENCH_DIR / "loadgen.py"), "pace", "--rate", f"{rate:.0f}"]
        for host, port in servers:
            args += ["--server", f"{host}:{port}"]
        args += ["--clients", str(clients), "--prefix", prefix]
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pinned(cpu),
        )
        assert proc.stdout is not None
        line = read_line(proc.stdout, 90.0)
        if line.strip() != "ready":
            stop_process(proc)
            raise RuntimeError(f"unexpected pacer output: {line!r}")
        return cls(proc)

    def finish(self) -> dict[str, Any]:
        """Stop pinging (close stdin); the pacer disconnects and prints its figures."""
        out, _ = self.proc.communicate(timeout=60.0)  # closes stdin first
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(f"the pacer failed (exit {self.proc.returncode})")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


def measure_capacity(
    redis_url: str, server_cpu: int | None, load_cpu: int | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Closed-loop pings on a throwaway daemon (stopped after: its sessions would
    otherwise time out in the middle of a later measurement)."""
    daemon = start_daemon(redis_url, server_cpu)
    try:
        return run_loadgen(
            [
                "ping",
                "--server",
                f"{daemon.address[0]}:{daemon.address[1]}",
                "--connect",
                "--clients",
                str(args.clients),
                "--warmup",
                "0.5",
                "--duration",
                str(args.capacity_duration),
                "--server-pid",
                str(daemon.proc.pid),
            ],
            load_cpu,
            timeout=args.capacity_duration + 120.0,
        )
    finally:
        daemon.stop()


def percentile(values: Sequence[int], share: float) -> float:
    """Nearest-rank percentile of nanosecond values, in ms (nan if empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)] / NS_PER_MS


def summarize(samples: Samples) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for kind, values in (
        ("connect", samples.online),
        ("disconnect", samples.offline),
        ("connect_ok", samples.connect_ok),
        ("disconnect_ok", samples.disconnect_ok),
    ):
        for name, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
            figures[f"{kind}_{name}_ms"] = percentile(values, share)
    figures["connect_samples"] = len(samples.online)
    figures["disconnect_samples"] = len(samples.offline)
    figures["connect_missed"] = samples.missed["online"]
    figures["disconnect_missed"] = samples.missed["offline"]
    figures["failures"] = samples.failures
    return figures


def run_setting(
    name: str,
    tag: str,
    across: bool,
    loaded: bool,
    daemons: tuple[Daemon, Daemon],
    redis_pid: int,
    rate: float,
    cpus: tuple[int | None, int | None],
    args: argparse.Namespace,
) -> dict[str, Any]:
    d1, d2 = daemons
    watcher_server, mover_server = d1.address, (d2 if across else d1).address
    pacer = None
    if loaded:
        servers = [d1.address, d2.address] if across else [d1.address]
        pacer = Pacer.start(servers, rate, f"pace-{name}", args.clients, cpus[1])
        time.sleep(args.settle)  # the pacer's warm-up: its rate is steady before probing
    # CPU shares over the measurement: d1, d2, Redis, the pacer, this process, all.
    pids = [d1.proc.pid, d2.proc.pid, redis_pid, pacer.proc.pid if pacer else 0]
    try:
        before = cpu_sample(pids)
        with pinned_here(cpus[1]):
            samples, warmup = probe(tag, watcher_server, mover_server, args)
        after = cpu_sample(pids)
    finally:
        load = pacer.finish() if pacer is not None else None
    wall = after[0] - before[0]
    shares = [(b - a) / wall for a, b in zip(before[1:], after[1:], strict=True)]
    result = summarize(samples)
    result["warmup_missed"] = warmup.missed["online"] + warmup.missed["offline"]
    result["warmup_failures"] = warmup.failures
    result.update(
        {
            "seconds": wall,
            "daemon_cpu": shares[0] + shares[1],
            # Steadier than latency on a shared machine; meaningful for the idle settings.
            "daemon_cpu_us_per_transition": (shares[0] + shares[1])
            * wall
            * 1e6
            / max(samples.transitions, 1),
            "d1_cpu": shares[0],
            "d2_cpu": shares[1],
            "redis_cpu": shares[2],
            "pacer_cpu": shares[3],
            "prober_cpu": shares[4],
            "other_cpu": max(0.0, shares[5] - sum(shares[:5])),
            "load_target_per_s": rate if loaded else 0.0,
            "load_pings_per_s": load["replies_per_s"] if load else 0.0,
            "load_sent_per_s": load["sent_per_s"] if load else 0.0,
        }
    )
    if load is not None:
        result["load"] = load
    return result


def cpu_sample(pids: Sequence[int]) -> list[float]:
    """[now, CPU seconds of each pid (0 for none), of this process, of the machine]."""
    return [
        time.monotonic(),
        *(cpu_seconds(pid) if pid else 0.0 for pid in pids),
        time.process_time(),
        machine_busy()[0],
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Capacity first, then the four settings; returns every figure."""
    server_cpu, load_cpu = plan_cpus()
    result: dict[str, Any] = {
        "pinning": {"server_cpu": server_cpu, "load_cpu": load_cpu},
        "cycles": args.cycles,
        "movers": args.movers,
        "load_share": args.load,
        "notify_coalesce": args.notify_coalesce,
    }
    with EmbeddedRedis() as redis:
        pin_pid(redis.process.pid, load_cpu)
        capacity = measure_capacity(redis.url, server_cpu, load_cpu, args)
        result["capacity"] = capacity
        result["capacity_pings_per_s"] = capacity["replies_per_s"]
        rate = capacity["replies_per_s"] * args.load
        d1 = start_daemon(redis.url, server_cpu)
        try:
            d2 = start_daemon(redis.url, server_cpu)
            try:
                chosen = args.settings.split(",")
                for index, (name, across, loaded) in enumerate(SETTINGS):
                    if name not in chosen:
                        continue
                    result[name] = run_setting(
                        name,
                        str(index),
                        across,
                        loaded,
                        (d1, d2),
                        redis.process.pid,
                        rate,
                        (server_cpu, load_cpu),
                        args,
                    )
            finally:
                d2.stop()
        finally:
            d1.stop()
    return result


def ms4(r: dict[str, Any], kind: str) -> str:
    return "/".join(f"{r[f'{kind}_{p}_ms']:.2f}" for p in ("p50", "p90", "p99", "max"))


def report(r: dict[str, Any]) -> str:
    """Human-readable lines for one run."""
    pin = r["pinning"]
    placement = (
        "nothing pinned (fewer than 2 CPUs)"
        if pin["server_cpu"] is None
        else f"daemons on cpu {pin['server_cpu']}; redis, pacer and prober on cpu {pin['load_cpu']}"
    )
    capacity = r["capacity"]
    rows = [
        (
            "setting",
            "connect->online ms",
            "disconnect->offline ms",
            "CONNECT_OK ms",
            "load pings/s",
            "cpu: daemons, other",
        ),
        ("", "p50/p90/p99/max", "p50/p90/p99/max", "p50/p99", "", ""),
    ]
    ran = [name for name, _, _ in SETTINGS if name in r]
    for name in ran:
        s = r[name]
        missed = s["connect_missed"] + s["disconnect_missed"]
        failed = len(s["failures"])
        rows.append(
            (
                name,
                ms4(s, "connect"),
                ms4(s, "disconnect"),
                f"{s['connect_ok_p50_ms']:.2f}/{s['connect_ok_p99_ms']:.2f}",
                f"{s['load_pings_per_s']:,.0f}",
                f"{s['daemon_cpu']:.0%}, {s['other_cpu']:.0%}"
                + (f"; {missed} NOTIFYs missed" if missed else "")
                + (f"; {failed} requests unanswered" if failed else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = [
        f"{r['cycles']} cycles per setting ({r['movers']} movers taking turns, none within "
        f"{r['notify_coalesce']:.2f} s + {COALESCE_MARGIN * 1000:.0f} ms of its last NOTIFY)",
        f"placement: {placement}",
        f"capacity: {r['capacity_pings_per_s']:,.0f} pings/s closed loop "
        f"(daemon cpu {capacity['server_cpu']:.0%}); background load target "
        f"{r['load_share']:.0%} of it = {r['capacity_pings_per_s'] * r['load_share']:,.0f}/s",
        *(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ),
    ]
    idle = [
        f"{where} {r[name]['daemon_cpu_us_per_transition']:,.0f}"
        for name, where in (("same_idle", "same daemon"), ("across_idle", "across daemons"))
        if name in r
    ]
    if idle:
        lines.append(
            "daemon cpu-us per transition, idle (steadier than latency; both daemons): "
            + ", ".join(idle)
        )
    for name in ran:
        lines += [f"{name}: {failure}" for failure in r[name]["failures"]]
        lines += [f"{name} (warm-up): {failure}" for failure in r[name]["warmup_failures"]]
        if r[name]["warmup_missed"]:
            lines.append(f"{name} (warm-up): {r[name]['warmup_missed']} NOTIFYs missed")
    busy = max((r[name]["other_cpu"] for name in ran), default=0.0)
    if busy > 0.1:
        lines.append(
            f"warning: other processes used up to {busy:.0%} of a core during the runs; "
            "the latencies include their interference. Re-run on an idle machine."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, add_arguments, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
