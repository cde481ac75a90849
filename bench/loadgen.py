"""Load generators and process plumbing shared by the benchmarks.

Run as a program, this module is one of three *processes* a benchmark starts:

``loadgen.py ceiling-server``
    The ceiling: a minimal uvloop ``DatagramProtocol`` that msgpack-decodes every
    datagram and answers with a small msgpack datagram. Prints ``ready PORT``.
``loadgen.py ping --server HOST:PORT ...``
    Optionally connects N sessions (raw ``Connect``/``ConnectOk``), then sends pings as
    fast as a bounded window allows for warm-up + duration seconds and prints one JSON
    line of results.
``loadgen.py churn --server HOST:PORT ...``
    Sets up users with mutual friends (half of them stay online), then cycles the other
    half through connect + disconnect with a bounded window and prints one JSON line.
``loadgen.py pace --server HOST:PORT [--server ...] --rate N ...``
    Connects N sessions spread over the servers, prints ``ready``, then sends pings at a
    fixed rate (open loop: not waiting for replies) until its stdin closes; disconnects
    its sessions and prints one JSON line. Background load for bench/notify_latency.py.

The load generators use plain non-blocking sockets and ``epoll`` (no asyncio), send
pre-encoded datagrams, and count replies without decoding them where they can, so that
they cost less per datagram than the server they load. Each reports its own CPU use and
the server's (from ``/proc``), so a reader can tell which side was the bottleneck.

Imported, it offers the helpers the benchmark scripts use to start and pin processes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import msgpack

from presence_client.protocol import (
    MAX_DATAGRAM,
    Connect,
    ConnectOk,
    Disconnect,
    DisconnectOk,
    Error,
    ErrorCode,
    Notify,
    Ping,
    Pong,
    ProtocolError,
    decode,
    encode,
)

BENCH_DIR: Final = Path(__file__).resolve().parent
LOOPBACK: Final = "127.0.0.1"
READY_PREFIX: Final = "presence-daemon listening on udp://"
UNLIMITED: Final = [
    arg
    for kind in ("connect", "friends", "snapshot")
    for scope in ("-per-address", "-per-user", "")
    for arg in (f"--{kind}-rate{scope}", "0")
]
"""Flags that lift every request-rate limit."""
PONG_TYPE: Final = 4
"""``t`` of a Pong; in ``{"v": 1, "t": 4, ...}`` it is byte 6 of the datagram."""

Address = tuple[str, int]

# ---------------------------------------------------------------------------
# Process plumbing (used by the benchmark scripts, in the parent process).


def bench_main(
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    argv: Sequence[str] | None,
) -> int:
    """The command line every benchmark script shares: its flags plus ``--json``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def plan_cpus() -> tuple[int | None, int | None]:
    """(server cpu, load cpu): the first two CPUs this process may use, or Nones."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pinned(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child (and every thread it starts) to ``cpu``."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def pin_pid(pid: int, cpu: int | None) -> None:
    """Pin every thread of a running process to ``cpu`` (no-op without a cpu)."""
    if cpu is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {cpu})


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of ``pid`` and of its live descendants (a supervisor's
    workers); what ended children used is counted once the parent has reaped them."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            children = [int(child) for child in f.read().split()]
    except OSError:
        return total
    return total + sum(tree_cpu_seconds(child) for child in children)


def read_line(stream: IO[str], timeout: float) -> str:
    """Read one line from a child's pipe, or raise TimeoutError after ``timeout`` s."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line within {timeout} s")
    return stream.readline()


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Daemon:
    """A ``presence_daemon`` subprocess and where it listens."""

    proc: subprocess.Popen[str]
    address: Address
    stderr: IO[str]

    def stop(self) -> None:
        stop_process(self.proc)
        self.stderr.close()


def start_daemon(
    redis_url: str,
    cpu: int | None,
    timeout: float = 30.0,
    *,
    limits: Sequence[str] = UNLIMITED,
    processes: int = 1,
) -> Daemon:
    """Start the real daemon on 127.0.0.1 (free port) against ``redis_url``, pinned;
    ``limits`` are its request-rate flags (default: none; () keeps the daemon's own).
    With ``processes`` above 1, a supervisor and that many workers (pinned together to
    ``cpu``'s set: the caller passes None to let them spread)."""
    stderr = open(os.devnull, "w")  # noqa: SIM115 - closed by Daemon.stop
    args = [
        sys.executable,
        "-m",
        "presence_daemon",
        "--processes",
        str(processes),
        "--host",
        LOOPBACK,
        "--port",
        "0",
        "--redis-url",
        redis_url,
        "--ping-interval",
        "30",
        "--timeout",
        "90",
        "--log-level",
        "warning",
        # The benchmarks drive thousands of connects a second from one address: no
        # request-rate limits unless asked (bench/forged_connects.py measures those).
        *limits,
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=stderr, text=True, preexec_fn=pinned(cpu)
    )
    assert proc.stdout is not None
    try:
        line = read_line(proc.stdout, timeout)
    except TimeoutError:
        stop_process(proc)
        raise RuntimeError("the daemon did not print its ready line") from None
    if not line.startswith(READY_PREFIX):
        stop_process(proc)
        raise RuntimeError(f"unexpected daemon output: {line!r}")
    host, _, port = line[len(READY_PREFIX) :].split()[0].rpartition(":")
    return Daemon(proc, (host, int(port)), stderr)


def start_ceiling(cpu: int | None, timeout: float = 10.0) -> tuple[subprocess.Popen[str], Address]:
    """Start the ceiling server (see module doc), pinned; returns it and its address."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "loadgen.py"), "ceiling-server"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(cpu),
    )
    assert proc.stdout is not None
    line = read_line(proc.stdout, timeout)
    if not line.startswith("ready "):
        stop_process(proc)
        raise RuntimeError(f"unexpected ceiling server output: {line!r}")
    return proc, (LOOPBACK, int(line.split()[1]))


def run_loadgen(args: Sequence[str], cpu: int | None, timeout: float) -> dict[str, Any]:
    """Run ``loadgen.py ARGS`` pinned to ``cpu``; return the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "loadgen.py"), *args],
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        preexec_fn=pinned(cpu),
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"load generator failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class CommandStats:
    """Reads ``INFO commandstats`` over one connection, so that its own handshake
    (HELLO, CLIENT SETINFO) happens before the first snapshot and is not counted."""

    def __init__(self, redis_url: str) -> None:
        import redis

        # A cluster's seed list (redis+cluster://h:p,h:p) names the masters to sum over.
        if redis_url.startswith("redis+cluster://"):
            seeds = redis_url.removeprefix("redis+cluster://").split(",")
            urls = [f"redis://{seed}/0" for seed in seeds]
        else:
            urls = [redis_url] if redis_url else []
        self.clients = [redis.Redis.from_url(url) for url in urls]
        self.snapshot()

    def snapshot(self) -> dict[str, int]:
        """Calls per command so far (commands run inside Lua scripts included), summed
        over the servers."""
        total: dict[str, int] = {}
        for client in self.clients:
            for name, calls in parse_commandstats(client.info("commandstats")).items():
                total[name] = total.get(name, 0) + calls
        return total

    def close(self) -> None:
        for client in self.clients:
            client.close()


def parse_commandstats(info: dict[str, Any]) -> dict[str, int]:
    """``{command: calls}`` from a parsed ``INFO commandstats`` reply."""
    return {
        name.removeprefix("cmdstat_"): int(stats["calls"])
        for name, stats in info.items()
        if isinstance(stats, dict)
    }


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls made between two snapshots, without the INFO calls that took them."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: n for name, n in sorted(delta.items()) if n > 0 and name != "info"}


def machine() -> dict[str, str]:
    """CPU count, CPU model and Python version, for the figures' caption."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count() or "?"),
        "cpu": model,
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }


# ---------------------------------------------------------------------------
# The ceiling server (a child process).


def serve_ceiling() -> None:
    """Answer every datagram with a small msgpack datagram, after decoding it."""
    import uvloop

    reply_map: dict[str, int] = {"v": 1, "t": PONG_TYPE, "q": 0}

    class Ceiling(asyncio.DatagramProtocol):
        transport: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Address) -> None:
            msgpack.unpackb(data, raw=False)
            self.transport.sendto(msgpack.packb(reply_map), addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Ceiling, local_addr=(LOOPBACK, 0))
        print(f"ready {transport.get_extra_info('sockname')[1]}", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# ---------------------------------------------------------------------------
# Load generator internals (in the child process).


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def open_sockets(count: int, server: Address) -> list[socket.socket]:
    """``count`` non-blocking UDP sockets on 127.0.0.1, each connected to ``server``."""
    raise_fd_limit(count + 64)
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((LOOPBACK, 0))
        sock.connect(server)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def machine_busy() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


Sample = tuple[float, float, float, float, float, float]


def _pids(value: int | Sequence[int] | None) -> list[int]:
    if not value:
        return []
    return [value] if isinstance(value, int) else [pid for pid in value if pid]


@dataclass
class CpuProbe:
    """CPU seconds of the server, its Redis, this process and the whole machine."""

    server_pid: int | None
    redis_pid: int | Sequence[int] | None

    def sample(self) -> Sample:
        busy, steal = machine_busy()
        return (
            time.monotonic(),
            tree_cpu_seconds(self.server_pid) if self.server_pid else 0.0,
            sum(cpu_seconds(pid) for pid in _pids(self.redis_pid)),
            time.process_time(),
            busy,
            steal,
        )

    @staticmethod
    def shares(a: Sample, b: Sample) -> dict[str, float]:
        """Fraction of one core each process used between samples ``a`` and ``b``.

        ``other_cpu`` is what the rest of the machine (other processes, the kernel's
        unattributed work, VM steal) used meanwhile: more than a few percent means the
        figures were taken on a busy machine.
        """
        wall = max(b[0] - a[0], 1e-9)
        ours = [(b[i] - a[i]) / wall for i in (1, 2, 3)]
        return {
            "server_cpu": ours[0],
            "redis_cpu": ours[1],
            "load_cpu": ours[2],
            "other_cpu": max(0.0, (b[4] - a[4]) / wall - sum(ours)),
            "steal_cpu": (b[5] - a[5]) / wall,
        }


@dataclass
class Pending:
    """A request waiting for its reply."""

    sock: int
    data: bytes
    sent_at: float
    on_reply: Callable[[Any], None]
    tries: int = 1


@dataclass
class Rpc:
    """Request/reply matching by request id over a set of sockets, with resends."""

    socks: list[socket.socket]
    rto: float = 1.0
    pending: dict[int, Pending] = field(default_factory=dict)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    next_request: int = 1
    _by_fd: dict[int, int] = field(default_factory=dict)
    _epoll: Any = None
    _retry_at: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._epoll = select.epoll()
        for i, sock in enumerate(self.socks):
            self._epoll.register(sock.fileno(), select.EPOLLIN)
            self._by_fd[sock.fileno()] = i

    def request_id(self) -> int:
        request = self.next_request
        self.next_request += 1
        return request

    def send(self, request: int, sock: int, data: bytes, on_reply: Callable[[Any], None]) -> None:
        self.pending[request] = Pending(sock, data, time.monotonic(), on_reply)
        self._transmit(sock, data)

    def send_plain(self, sock: int, data: bytes) -> None:
        """Send a datagram whose reply is not matched (e.g. a ping)."""
        self._transmit(sock, data)

    def _transmit(self, sock: int, data: bytes) -> None:
        try:
            self.socks[sock].send(data)
        except OSError:
            self.counts["send_errors"] += 1  # resent on timeout

    def poll(self, timeout: float) -> None:
        now = time.monotonic()
        for fd, _ in self._epoll.poll(timeout):
            sock = self.socks[self._by_fd[fd]]
            while True:
                try:
                    data = sock.recv(MAX_DATAGRAM + 100)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self.counts["recv_errors"] += 1
                    break
                self._dispatch(data)
        self._resend(now)

    def _dispatch(self, data: bytes) -> None:
        try:
            msg = decode(data)
        except ProtocolError:
            self.counts["undecodable"] += 1
            return
        if type(msg) is Notify:
            self.counts["notifications"] += 1
            return
        if type(msg) is Pong:
            self.counts["pongs"] += 1
            return
        request = getattr(msg, "request", None)
        entry = self.pending.get(request) if isinstance(request, int) else None
        if entry is None:
            self.counts["unmatched_replies"] += 1
            return
        if type(msg) is Error and msg.code is ErrorCode.TRY_AGAIN:
            self.counts["try_again"] += 1
            self._retry_at.append((time.monotonic() + 0.05, request))  # type: ignore[arg-type]
            entry.sent_at = float("inf")  # not a timeout: the retry list resends it
            return
        del self.pending[request]  # type: ignore[arg-type]
        entry.on_reply(msg)

    def _resend(self, now: float) -> None:
        if self._retry_at:
            due = [r for t, r in self._retry_at if t <= now]
            self._retry_at = [(t, r) for t, r in self._retry_at if t > now]
            for request in due:
                self._resend_one(request, now)
        if now - getattr(self, "_last_scan", 0.0) < self.rto / 4:
            return
        self._last_scan = now
        for request, entry in list(self.pending.items()):
            if now - entry.sent_at > self.rto:
                self.counts["timeouts"] += 1
                self._resend_one(request, now)

    def _resend_one(self, request: int, now: float) -> None:
        entry = self.pending.get(request)
        if entry is None:
            return
        entry.sent_at = now
        entry.tries += 1
        self.counts["resends"] += 1
        self._transmit(entry.sock, entry.data)

    def wait_idle(self, deadline: float) -> None:
        """Poll until nothing is pending or ``deadline`` (monotonic) passes."""
        while self.pending and time.monotonic() < deadline:
            self.poll(0.01)


def connect_all(
    rpc: Rpc,
    clients: Sequence[tuple[int, str, str, tuple[str, ...] | None]],
    window: int,
    on_ok: Callable[[int, ConnectOk], None],
    deadline: float,
) -> None:
    """Connect every (socket, client id, user, friends) with at most ``window`` in flight."""
    queue = collections.deque(clients)
    errors: collections.Counter[str] = rpc.counts

    def start_next() -> None:
        sock, client_id, user, friends = queue.popleft()
        request = rpc.request_id()
        data = encode(Connect(request, client_id, user, friends), pad_to=MAX_DATAGRAM)

        def done(msg: Any) -> None:
            if type(msg) is ConnectOk:
                on_ok(sock, msg)
            else:
                errors[f"connect_{type(msg).__name__}_{getattr(msg, 'code', '')}"] += 1

        rpc.send(request, sock, data, done)

    while (queue or rpc.pending) and time.monotonic() < deadline:
        while queue and len(rpc.pending) < window:
            start_next()
        rpc.poll(0.01)
    if queue or rpc.pending:
        raise RuntimeError(f"connect phase incomplete: {len(queue) + len(rpc.pending)} left")


# ---------------------------------------------------------------------------
# ping mode


def ping_mode(args: argparse.Namespace) -> dict[str, Any]:
    server = parse_address(args.server)
    socks = open_sockets(args.sockets, server)
    payloads: list[list[bytes]] = [[] for _ in socks]
    result: dict[str, Any] = {"clients": args.clients, "sockets": args.sockets}
    if args.connect:
        rpc = Rpc(socks)
        started = time.monotonic()

        def on_ok(sock: int, msg: ConnectOk) -> None:
            payloads[sock].append(encode(Ping(msg.session)))

        clients = [
            (i % len(socks), f"bench-c{i}", f"bench-u{i}", None) for i in range(args.clients)
        ]
        connect_all(rpc, clients, 128, on_ok, started + 60.0)
        result["connect_s"] = time.monotonic() - started
        rpc._epoll.close()
    else:  # the ceiling ignores sessions: any well-formed ping will do
        for i in range(args.clients):
            payloads[i % len(socks)].append(encode(Ping(i.to_bytes(16, "big"))))
    if any(not p for p in payloads):
        raise RuntimeError("fewer sessions than sockets")
    # Each session's first ping verifies its address; do it before measuring.
    probe = CpuProbe(args.server_pid, args.redis_pid)
    stats = CommandStats(args.redis_url)
    before = stats.snapshot()
    result.update(ping_phase(socks, payloads, args.window, args.warmup, args.duration, probe))
    if args.redis_url:
        calls = command_delta(before, stats.snapshot())
        result["redis_calls"] = calls
        result["redis_calls_per_ping"] = sum(calls.values()) / max(result["replies_total"], 1)
    return result


def ping_phase(
    socks: list[socket.socket],
    payloads: list[list[bytes]],
    window: int,
    warmup: float,
    duration: float,
    probe: CpuProbe,
) -> dict[str, Any]:
    """Keep ``window`` pings in flight per socket; count replies in the timed window."""
    epoll = select.epoll()
    index: dict[int, int] = {}
    for i, sock in enumerate(socks):
        epoll.register(sock.fileno(), select.EPOLLIN)
        index[sock.fileno()] = i
    count = len(socks)
    outstanding = [0] * count
    cursor = [0] * count
    last_rx = [0.0] * count
    buf = bytearray(MAX_DATAGRAM + 100)
    sent = replies = others = stalls = 0

    def refill(i: int) -> int:
        sock = socks[i]
        mine = payloads[i]
        n = len(mine)
        c = cursor[i]
        k = 0
        for _ in range(window - outstanding[i]):
            try:
                sock.send(mine[c])
            except OSError:
                break
            c = c + 1 if c + 1 < n else 0
            k += 1
        cursor[i] = c
        outstanding[i] += k
        return k

    start = time.monotonic()
    warm_end = start + warmup
    end = warm_end + duration
    for i in range(count):
        last_rx[i] = start
        sent += refill(i)
    measured: dict[str, Any] = {}
    mark: Sample | None = None
    base_sent = base_replies = 0
    next_scan = start + 0.05
    slices: list[tuple[float, int]] = []
    now = start
    while now < end:
        for fd, _ in epoll.poll(0.01):
            i = index[fd]
            sock = socks[i]
            got = 0
            while True:
                try:
                    size = sock.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if size > 6 and buf[6] == PONG_TYPE:
                    got += 1
                else:
                    others += 1
                    got += 1
            replies += got
            outstanding[i] -= min(got, outstanding[i])
            last_rx[i] = now
            sent += refill(i)
        now = time.monotonic()
        if mark is None and now >= warm_end:
            mark = probe.sample()
            base_sent, base_replies = sent, replies
            slices.append((now, replies))
        elif mark is not None and now - slices[-1][0] >= 0.5:
            slices.append((now, replies))
        if now >= next_scan:
            # A socket silent for 200 ms with pings in flight lost them: refill it.
            next_scan = now + 0.05
            for i in range(count):
                if outstanding[i] and now - last_rx[i] > 0.2:
                    stalls += 1
                    outstanding[i] = 0
                    sent += refill(i)
                    last_rx[i] = now
    final = probe.sample()
    assert mark is not None
    window_sent, window_replies = sent - base_sent, replies - base_replies
    wall = final[0] - mark[0]
    # Drain: stop sending, collect what is still in flight.
    drain_end = time.monotonic() + 0.3
    while time.monotonic() < drain_end:
        for fd, _ in epoll.poll(0.02):
            sock = socks[index[fd]]
            while True:
                try:
                    sock.recv_into(buf)
                except OSError:
                    break
                replies += 1
    epoll.close()
    measured.update(
        {
            "seconds": wall,
            "replies_per_s": window_replies / wall,
            "sent_per_s": window_sent / wall,
            "sent_total": sent,
            "replies_total": replies,
            "non_pong_replies": others,
            "loss": 1.0 - replies / sent if sent else 0.0,
            "stalls": stalls,
            "window": window,
            "slice_rates": slice_rates(slices),
        }
    )
    measured.update(CpuProbe.shares(mark, final))
    return measured


def slice_rates(samples: Sequence[tuple[float, int]]) -> list[float]:
    """Rates between consecutive (time, count) samples: the spread within a run."""
    return [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in itertools.pairwise(samples) if t1 > t0]


# ---------------------------------------------------------------------------
# churn mode


def ring_friends(i: int, users: int, friends: int) -> tuple[str, ...]:
    """User i's friends: the ``friends`` nearest on a ring (symmetric, so all mutual)."""
    half = friends // 2
    return tuple(user_name((i + d) % users) for d in range(-half, half + 1) if d != 0)


def user_name(i: int) -> str:
    return f"bu{i:06d}"


def churn_mode(args: argparse.Namespace) -> dict[str, Any]:
    users = args.clients
    if users < args.friends + 2 or args.friends % 2:
        raise SystemExit("need an even --friends and more --clients than friends")
    server = parse_address(args.server)
    socks = open_sockets(args.sockets, server)
    rpc = Rpc(socks)
    sessions: dict[int, bytes] = {}
    sock_of = [i % len(socks) for i in range(users)]

    # Setup: every user connects once with its friend list; odd users then leave.
    started = time.monotonic()
    order = {f"bc{i:06d}": i for i in range(users)}

    setup = [
        (sock_of[i], f"bc{i:06d}", user_name(i), ring_friends(i, users, args.friends))
        for i in range(users)
    ]
    # Connect in order, remembering sessions by client id through the request.
    queue = collections.deque(setup)
    deadline = started + 120.0
    while (queue or rpc.pending) and time.monotonic() < deadline:
        while queue and len(rpc.pending) < args.window:
            sock, client_id, user, friends = queue.popleft()
            idx = order[client_id]
            request = rpc.request_id()

            def done(msg: Any, idx: int = idx) -> None:
                if type(msg) is ConnectOk:
                    sessions[idx] = msg.session
                else:
                    rpc.counts["setup_errors"] += 1

            rpc.send(
                request,
                sock,
                encode(Connect(request, client_id, user, friends), pad_to=MAX_DATAGRAM),
                done,
            )
        rpc.poll(0.01)
    if len(sessions) != users:
        raise RuntimeError(f"setup connected {len(sessions)} of {users} users")
    for i in range(users):
        if i % 2 == 0:  # the first datagram with the token verifies the address
            rpc.send_plain(sock_of[i], encode(Ping(sessions[i])))
        else:
            request = rpc.request_id()
            rpc.send(
                request, sock_of[i], encode(Disconnect(request, sessions[i])), lambda msg: None
            )
            while len(rpc.pending) >= args.window:
                rpc.poll(0.01)
    rpc.wait_idle(time.monotonic() + 30.0)
    settle = time.monotonic() + 0.3
    while time.monotonic() < settle:
        rpc.poll(0.02)
    setup_s = time.monotonic() - started
    rpc.counts.clear()

    # Churn: keep `window` odd users cycling connect -> disconnect.
    probe = CpuProbe(args.server_pid, args.redis_pid)
    stats = CommandStats(args.redis_url)
    before = stats.snapshot()
    odd = list(range(1, users, 2))
    random.Random(1).shuffle(odd)  # neighbours on the ring should not cycle in lockstep
    idle = collections.deque(odd)
    transitions = 0
    visible_online: list[int] = []
    stopping = False

    def start_cycle() -> None:
        i = idle.popleft()
        request = rpc.request_id()
        data = encode(Connect(request, f"bc{i:06d}", user_name(i)), pad_to=MAX_DATAGRAM)
        rpc.send(request, sock_of[i], data, lambda msg: connected(i, msg))

    def connected(i: int, msg: Any) -> None:
        nonlocal transitions
        if type(msg) is not ConnectOk:
            rpc.counts[f"connect_error_{getattr(msg, 'code', '?')}"] += 1
            idle.append(i)
            return
        transitions += 1
        if len(visible_online) < 10_000:
            visible_online.append(sum(f.online for f in msg.friends))
        request = rpc.request_id()
        data = encode(Disconnect(request, msg.session))
        rpc.send(request, sock_of[i], data, lambda reply: disconnected(i, reply))

    def disconnected(i: int, msg: Any) -> None:
        nonlocal transitions
        if type(msg) is DisconnectOk:
            transitions += 1
        else:
            rpc.counts[f"disconnect_error_{getattr(msg, 'code', '?')}"] += 1
        idle.append(i)

    start = time.monotonic()
    warm_end = start + args.warmup
    end = warm_end + args.duration
    mark: Sample | None = None
    base = 0
    base_notes = 0
    slices: list[tuple[float, int]] = []
    now = start
    while now < end:
        while idle and len(rpc.pending) < args.window and not stopping:
            start_cycle()
        rpc.poll(0.005)
        now = time.monotonic()
        if mark is None and now >= warm_end:
            mark = probe.sample()
            base, base_notes = transitions, rpc.counts["notifications"]
            slices.append((now, transitions))
        elif mark is not None and now - slices[-1][0] >= 0.5:
            slices.append((now, transitions))
    final = probe.sample()
    window_transitions = transitions - base
    window_notes = rpc.counts["notifications"] - base_notes
    assert mark is not None
    wall = final[0] - mark[0]
    # Let every cycle in flight finish, so Redis work and transitions match up.
    stopping = True
    rpc.wait_idle(time.monotonic() + 30.0)
    settle = time.monotonic() + 0.2
    while time.monotonic() < settle:
        rpc.poll(0.02)
    result: dict[str, Any] = {
        "users": users,
        "friends": args.friends,
        "online_users": (users + 1) // 2,
        "window": args.window,
        "setup_s": setup_s,
        "seconds": wall,
        "transitions_per_s": window_transitions / wall,
        "notifications_per_s": window_notes / wall,
        "transitions_total": transitions,
        "visible_online_friends": sum(visible_online) / max(len(visible_online), 1),
        "slice_rates": slice_rates(slices),
        "counts": dict(rpc.counts),
    }
    result.update(CpuProbe.shares(mark, final))
    if args.redis_url:
        calls = command_delta(before, stats.snapshot())
        result["redis_calls"] = calls
        result["redis_calls_per_transition"] = sum(calls.values()) / max(transitions, 1)
        result["evalsha_per_transition"] = calls.get("evalsha", 0) / max(transitions, 1)
    return result


# ---------------------------------------------------------------------------
# pace mode


def pace_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Open-loop pings at ``args.rate`` per second over established sessions, until stdin
    closes (the parent's signal to stop); see the module doc."""
    servers = [parse_address(text) for text in args.server]
    per_server = max(args.sockets // len(servers), 1)
    socks = [sock for server in servers for sock in open_sockets(per_server, server)]
    rpc = Rpc(socks)
    sessions: list[tuple[int, bytes]] = []
    clients = [
        (i % len(socks), f"{args.prefix}-c{i}", f"{args.prefix}-u{i}", None)
        for i in range(args.clients)
    ]
    connect_all(
        rpc,
        clients,
        128,
        lambda sock, msg: sessions.append((sock, msg.session)),
        time.monotonic() + 60.0,
    )
    rpc._epoll.close()
    # Round-robin over sockets (and so over servers), then over each socket's sessions.
    by_sock: list[list[bytes]] = [[] for _ in socks]
    for sock, session in sessions:
        by_sock[sock].append(encode(Ping(session)))
    schedule = [
        (socks[i], mine[j])
        for j in range(max(map(len, by_sock)))
        for i, mine in enumerate(by_sock)
        if j < len(mine)
    ]
    print("ready", flush=True)
    result = pace_phase(socks, schedule, args.rate, args.warmup, args.tick)
    # Leave nothing behind: a session left to time out would cost the daemon a
    # transition in the middle of a later measurement.
    rpc = Rpc(socks)
    for sock, session in sessions:
        request = rpc.request_id()
        rpc.send(request, sock, encode(Disconnect(request, session)), lambda msg: None)
        while len(rpc.pending) >= 128:
            rpc.poll(0.01)
    rpc.wait_idle(time.monotonic() + 30.0)
    result.update({"clients": len(sessions), "sockets": len(socks), "servers": len(servers)})
    result["disconnects_unanswered"] = len(rpc.pending)
    return result


def pace_phase(
    socks: list[socket.socket],
    schedule: list[tuple[socket.socket, bytes]],
    rate: float,
    warmup: float,
    tick: float,
) -> dict[str, Any]:
    """Send ``rate`` pings a second, a few every ``tick`` seconds, until stdin closes.

    Sleeping between sends leaves the CPU to Redis and the prober that share it. If the
    sender falls more than 10 ms behind (starved of CPU), it skips ahead rather than
    bursting, and counts what it skipped: the achieved rate is then below the target.
    """
    epoll = select.epoll()
    for sock in socks:
        epoll.register(sock.fileno(), select.EPOLLIN)
    stdin = sys.stdin.fileno()
    epoll.register(stdin, select.EPOLLIN)
    by_fd = {sock.fileno(): sock for sock in socks}
    buf = bytearray(MAX_DATAGRAM + 100)
    most_behind = max(int(rate * 0.01), 1)
    size = len(schedule)
    cursor = sent = replies = skipped = send_errors = 0
    start = time.monotonic()
    warm_end = start + warmup
    mark: tuple[float, float, int, int] | None = None  # (time, cpu, sent, replies)
    slices: list[tuple[float, int]] = []
    stopping = False
    while not stopping:
        now = time.monotonic()
        due = int((now - start) * rate) - sent - skipped
        if due > most_behind:
            skipped += due - most_behind
            due = most_behind
        for _ in range(due):
            sock, data = schedule[cursor]
            cursor = cursor + 1 if cursor + 1 < size else 0
            try:
                sock.send(data)
            except OSError:
                send_errors += 1
            sent += 1
        for fd, _ in epoll.poll(0):
            if fd == stdin:
                stopping = not os.read(stdin, 4096)
                continue
            sock = by_fd[fd]
            while True:
                try:
                    got = sock.recv_into(buf)
                except OSError:
                    break
                if got > 6 and buf[6] == PONG_TYPE:
                    replies += 1
        if mark is None and now >= warm_end:
            mark = (now, time.process_time(), sent, replies)
            slices.append((now, replies))
        elif mark is not None and now - slices[-1][0] >= 0.5:
            slices.append((now, replies))
        time.sleep(tick)
    end = time.monotonic()
    epoll.close()
    if mark is None:  # stopped within the warm-up: measure from the start
        mark = (start, 0.0, 0, 0)
    wall = max(end - mark[0], 1e-9)
    return {
        "rate_target": rate,
        "seconds": wall,
        "sent_per_s": (sent - mark[2]) / wall,
        "replies_per_s": (replies - mark[3]) / wall,
        "sent_total": sent,
        "replies_total": replies,
        "skipped": skipped,
        "send_errors": send_errors,
        "load_cpu": (time.process_time() - mark[1]) / wall,
        "slice_rates": slice_rates(slices),
    }


# ---------------------------------------------------------------------------


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("ceiling-server", help="run the ceiling server")
    pace = sub.add_parser("pace", help="pings at a fixed rate until stdin closes")
    pace.add_argument("--server", action="append", required=True, help="HOST:PORT (repeat)")
    pace.add_argument("--rate", type=float, required=True, help="pings per second, in all")
    pace.add_argument("--clients", type=int, default=1000, help="sessions, over all servers")
    pace.add_argument("--sockets", type=int, default=16, help="sockets, over all servers")
    pace.add_argument("--prefix", default="pace", help="client id / user name prefix")
    pace.add_argument("--warmup", type=float, default=0.5, help="seconds before counting")
    pace.add_argument("--tick", type=float, default=0.0002, help="seconds between sends")
    for name in ("ping", "churn"):
        p = sub.add_parser(name)
        p.add_argument("--server", required=True, help="HOST:PORT of the target")
        p.add_argument("--clients", type=int, default=1000)
        p.add_argument("--sockets", type=int, default=16)
        p.add_argument("--window", type=int, default=16)
        p.add_argument("--warmup", type=float, default=1.0)
        p.add_argument("--duration", type=float, default=5.0)
        p.add_argument("--redis-url", default="")
        p.add_argument("--server-pid", type=int, default=0)
        p.add_argument(
            "--redis-pid",
            type=lambda text: [int(pid) for pid in text.split(",") if pid],
            default=[],
            help="Redis process id (a cluster: the masters' ids, comma-separated)",
        )
        if name == "ping":
            p.add_argument("--connect", action="store_true", help="establish real sessions")
        else:
            p.add_argument("--friends", type=int, default=20)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "ceiling-server":
        serve_ceiling()
        return 0
    modes = {"ping": ping_mode, "churn": churn_mode, "pace": pace_mode}
    result = modes[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
