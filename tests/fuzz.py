"""Wire fuzzer: mutated datagrams against a real daemon process on a private Redis.

Run ``make fuzz`` (1,000,000 datagrams; ``FUZZ_DATAGRAMS=N`` to change) or
``python tests/fuzz.py --datagrams N --seed S``; ``tests/test_fuzz.py`` runs a short
version inside ``make test``. The run:

1. starts an embedded redis-server and one ``python -m presence_daemon`` process;
2. opens a real session (so the corpus carries a real session token) and builds a
   corpus of valid datagrams of every message type, both directions;
3. sends N mutants (bit flips, byte edits, truncation, splicing, type confusion, deep
   nesting, huge integers, unknown keys, random bytes), from a seeded RNG, from a few
   sockets on other addresses than the session's, in windows closed by a barrier (a
   probe the daemon answers at once), so the daemon's socket buffer never overflows;
4. prints datagrams sent, crashes (the daemon process died), the daemon's
   ``internal_errors`` counter and tracebacks in its log, state changes (Redis keys
   and values before and after, the daemon's own lease bookkeeping excepted), the
   daemon's RSS before and after, and bytes out per byte in.

A mutant that still decodes to a valid CONNECT is not sent (it would rightly open a
session, a state change); it is counted. Every other mutant must change nothing: the
session's token only counts from the session's own address, which never sends one.

Exit status 1 on any crash, internal error, traceback, state change or amplification
(bytes out > bytes in); the seed is printed so a failure replays.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import random
import re
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemons import DaemonProcess
from helpers import redis_state
from presence_client.protocol import (
    MAX_DATAGRAM,
    MIN_CONNECT_SIZE,
    Connect,
    ConnectOk,
    Disconnect,
    DisconnectOk,
    Error,
    ErrorCode,
    Friends,
    FriendsOk,
    FriendsOp,
    FriendState,
    GoAway,
    Notify,
    Ping,
    Pong,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    decode,
    encode,
)
from presence_daemon.embedded import EmbeddedRedis

DEFAULT_DATAGRAMS: Final = 1_000_000
WINDOW_BYTES: Final = 64_000
"""Bytes sent between two barriers: well under a default socket receive buffer."""
SENDER_HOSTS: Final = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
COUNTERS_RE: Final = re.compile(r"stopped; counters: (\{.*\})")

HUGE_INTS: Final = (2**64 - 1, 2**63, 2**63 - 1, 2**32, 2**32 - 1, -1, -(2**63), 0)
ODD_VALUES: Final[tuple[Any, ...]] = (
    None,
    True,
    False,
    0,
    -1,
    1.5,
    float("nan"),
    "",
    "x" * 300,
    b"",
    bytes(16),
    bytes(15),
    [],
    {},
    ["a", True, 1],
    [["a", True, 1]],
    {"v": 1},
    msgpack.ExtType(5, b"ext"),
    *HUGE_INTS,
)


@dataclass
class Report:
    """What one fuzz run saw."""

    seed: int
    datagrams: int = 0
    """Datagrams sent to the daemon (mutants; barriers not included)."""
    skipped_valid: int = 0
    """Mutants that decoded to a valid CONNECT and were therefore not sent."""
    bytes_in: int = 0
    """Bytes the fuzzer sent (what the daemon received)."""
    bytes_out: int = 0
    """Bytes the daemon answered the mutants with."""
    largest_reply: int = 0
    crashed: bool = False
    exit_code: int | None = None
    internal_errors: int | None = None
    tracebacks: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    state_changes: list[str] = field(default_factory=list)
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_out / self.bytes_in if self.bytes_in else 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.crashed
            and self.internal_errors == 0
            and self.tracebacks == 0
            and not self.state_changes
            and self.bytes_out <= self.bytes_in
            and self.largest_reply <= MAX_DATAGRAM
        )

    def lines(self) -> list[str]:
        rate = self.datagrams / self.seconds if self.seconds else 0.0
        return [
            f"seed:               {self.seed}",
            f"datagrams sent:     {self.datagrams:,} in {self.seconds:.1f} s ({rate:,.0f}/s);"
            f" valid CONNECT mutants not sent: {self.skipped_valid:,}",
            f"crashes:            {int(self.crashed)} (exit code after SIGTERM: {self.exit_code})",
            f"internal_errors:    {self.internal_errors}; tracebacks in log: {self.tracebacks}",
            f"state changes:      {len(self.state_changes)}"
            + "".join(f"\n  {change}" for change in self.state_changes[:10]),
            f"daemon RSS:         {self.rss_before_kb:,} kB before, {self.rss_after_kb:,} kB after",
            f"bytes out per in:   {self.ratio:.4f} ({self.bytes_out:,} / {self.bytes_in:,});"
            f" largest reply {self.largest_reply} B",
            "daemon counters:    "
            + ", ".join(
                f"{k}={v}"
                for k, v in sorted(self.counters.items())
                if k.startswith(("rejected", "dropped", "datagrams", "internal", "replies"))
            ),
            "result:             " + ("OK" if self.ok else "FAILED"),
        ]


# ---------------------------------------------------------------------------
# The corpus.


def corpus(token: bytes) -> list[bytes]:
    """Valid datagrams of every message type; session messages carry ``token``."""
    states = (FriendState("bob", True, 2**40), FriendState("नमस्ते", False, 7))
    messages = [
        Connect(7, "fuzz-1", "fuzzer", ("bob", "carol")),
        Connect(8, "fuzz-2", "Zoë", None, auth=b"token", counter=3, previous=token),
        Ping(token),
        Disconnect(9, token),
        Friends(10, token, FriendsOp.ADD, ("bob",)),
        Friends(11, token, FriendsOp.SET, ("用户名", "a.b@c+d-e"), part=1, parts=3),
        Friends(12, token, FriendsOp.REMOVE, ()),
        SnapshotRequest(13, token),
        ConnectOk(7, token, 5000, 15000, 3, states, True),
        Pong(42),
        DisconnectOk(9),
        FriendsOk(10),
        Snapshot(13, 0, 2, 4, states),
        Notify(5, states[0]),
        Error(7, ErrorCode.TRY_AGAIN),
        GoAway(token, 1),
    ]
    datagrams = [encode(m) for m in messages]
    datagrams += [encode(m, pad_to=MAX_DATAGRAM) for m in messages[:2]]
    datagrams += [encode(messages[0], pad_to=size) for size in (MIN_CONNECT_SIZE, 300)]
    return datagrams


# ---------------------------------------------------------------------------
# Mutations.


def _nested(depth: int, rng: random.Random) -> bytes:
    """A msgpack value nested ``depth`` arrays or maps deep (built by hand: msgpack's
    packer refuses such depths)."""
    out = bytearray()
    for _ in range(depth):
        if rng.random() < 0.9:
            out.append(0x91)  # fixarray of 1 (one byte a level, so 1,000 levels fit)
        else:
            out += b"\x81\x01"  # fixmap of 1: 1 -> ...
    out += b"\xa1x"
    return bytes(out)


def _with_value(body: dict[Any, Any], key: Any, value: bytes) -> bytes:
    """``body`` packed with ``key`` set to the already-packed ``value``."""
    rest = {k: v for k, v in body.items() if k != key}
    packed: bytes = msgpack.packb(rest, use_bin_type=True)
    count = len(rest) + 1
    header = bytes([0x80 | count]) if count < 16 else b"\xde" + count.to_bytes(2, "big")
    body_bytes = packed[1:] if len(rest) < 16 else packed[3:]
    return header + body_bytes + msgpack.packb(key, use_bin_type=True) + value


def _bodies(seeds: Sequence[bytes]) -> list[dict[Any, Any]]:
    return [msgpack.unpackb(d, raw=False) for d in seeds]


class Mutator:
    """Seeded mutations of corpus datagrams."""

    def __init__(self, seeds: Sequence[bytes], rng: random.Random) -> None:
        self.seeds = list(seeds)
        self.bodies = _bodies(seeds)
        self.small_bodies = [b for b, d in zip(self.bodies, seeds, strict=True) if len(d) < 100]
        self.rng = rng
        self.operators: list[Callable[[], bytes]] = [
            self.bit_flips,
            self.byte_edits,
            self.truncate,
            self.splice,
            self.type_confusion,
            self.type_confusion,
            self.deep_nesting,
            self.huge_int,
            self.unknown_keys,
            self.random_bytes,
            self.as_is,
        ]

    def __call__(self) -> bytes:
        return self.rng.choice(self.operators)()

    def seed(self) -> bytes:
        return self.rng.choice(self.seeds)

    def body(self) -> dict[Any, Any]:
        return dict(self.rng.choice(self.bodies))

    def as_is(self) -> bytes:
        return self.seed()

    def bit_flips(self) -> bytes:
        data = bytearray(self.seed())
        for _ in range(self.rng.randint(1, 8)):
            index = self.rng.randrange(len(data))
            data[index] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def byte_edits(self) -> bytes:
        data = bytearray(self.seed())
        for _ in range(self.rng.randint(1, 4)):
            index = self.rng.randrange(len(data) + 1)
            action = self.rng.randrange(3)
            if action == 0 and index < len(data):
                data[index] = self.rng.randrange(256)
            elif action == 1:
                data[index:index] = self.rng.randbytes(self.rng.randint(1, 8))
            elif index < len(data):
                del data[index : index + self.rng.randint(1, 8)]
        return bytes(data)

    def truncate(self) -> bytes:
        data = self.seed()
        return data[: self.rng.randrange(len(data))]

    def splice(self) -> bytes:
        a, b = self.seed(), self.seed()
        return a[: self.rng.randrange(len(a) + 1)] + b[self.rng.randrange(len(b) + 1) :]

    def type_confusion(self) -> bytes:
        body = self.body()
        for _ in range(self.rng.randint(1, 3)):
            key = self.rng.choice([*body.keys(), "v", "t", "r", "s"])
            body[key] = self.rng.choice(ODD_VALUES)
        if self.rng.random() < 0.2:
            body["t"] = self.rng.randint(0, 14)
        return bytes(msgpack.packb(body, use_bin_type=True))

    def deep_nesting(self) -> bytes:
        body = self.rng.choice(self.small_bodies)
        key = self.rng.choice([*body.keys(), "zz"])
        depth = self.rng.choice([2, 3, 4, 5, 50, 500, 900, 950, 1000, 1020, 1100, 1150])
        return _with_value(body, key, _nested(depth, self.rng))

    def huge_int(self) -> bytes:
        body = self.body()
        key = self.rng.choice([*body.keys(), "n", "p", "q", "op", "e", "w"])
        body[key] = self.rng.choice(HUGE_INTS)
        return bytes(msgpack.packb(body, use_bin_type=True))

    def unknown_keys(self) -> bytes:
        body = self.body()
        for _ in range(self.rng.randint(1, 5)):
            key: Any = self.rng.choice(["x", "pad", 1, -5, b"k", True, 2.5, None])
            body[key] = self.rng.choice(ODD_VALUES)
        return bytes(msgpack.packb(body, use_bin_type=True))

    def random_bytes(self) -> bytes:
        size = self.rng.choice([0, 1, 2, 5, 30, 127, 128, 500, 1199, 1200, 1201, 1400])
        return self.rng.randbytes(size)


def opens_a_session(data: bytes) -> bool:
    """True if ``data`` is a valid CONNECT the daemon would rightly act on."""
    try:
        msg = decode(data)
    except Exception:  # ProtocolError, or a codec bug: the daemon's problem, send it
        return False
    return type(msg) is Connect and len(data) >= MIN_CONNECT_SIZE


# ---------------------------------------------------------------------------
# Talking to the daemon.


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Senders:
    """A few UDP sockets on loopback addresses other than the session's."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.socks: list[socket.socket] = []
        for host in SENDER_HOSTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.bind((host, 0))
            sock.setblocking(False)
            self.socks.append(sock)
        self.probe = 0

    def drain(self, report: Report, until: tuple[socket.socket, int] | None = None) -> None:
        """Read every reply waiting; with ``until``, wait (bounded) for the probe reply
        with that request id on that socket."""
        deadline = time.monotonic() + 5.0
        while True:
            readable, _, _ = select.select(self.socks, [], [], 0 if until is None else 0.5)
            if not readable:
                if until is None:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon stopped answering the barrier probe")
                continue
            for sock in readable:
                while True:
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    if until is not None and sock is until[0] and _is_probe_answer(data, until[1]):
                        until = None
                        continue
                    report.bytes_out += len(data)
                    report.largest_reply = max(report.largest_reply, len(data))
            if until is None:
                self.drain(report)
                return

    def barrier(self, report: Report) -> None:
        """Wait until the daemon has handled everything sent so far (it answers a
        DISCONNECT for an unknown session at once, in order)."""
        self.probe += 1
        request = 4_000_000_000 + self.probe
        sock = self.socks[self.probe % len(self.socks)]
        sock.sendto(encode(Disconnect(request, b"\xff" * 16)), self.target)
        self.drain(report, until=(sock, request))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def _is_probe_answer(data: bytes, request: int) -> bool:
    with contextlib.suppress(ProtocolError):
        msg = decode(data)
        return isinstance(msg, DisconnectOk) and msg.request == request
    return False


def open_session(daemon: DaemonProcess) -> tuple[socket.socket, bytes]:
    """A real session (its socket stays open and silent); returns it and its token."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3.0)
    sock.sendto(
        encode(Connect(1, "fuzz-victim", "victim", ("pal",)), pad_to=MAX_DATAGRAM), daemon.address
    )
    reply = decode(sock.recv(2048))
    if not isinstance(reply, ConnectOk):
        raise RuntimeError(f"could not open a session: {reply!r}")
    sock.sendto(encode(Ping(reply.session)), daemon.address)
    if not isinstance(decode(sock.recv(2048)), Pong):
        raise RuntimeError("the session's first PING was not answered")
    return sock, reply.session


def settled_state(url: str) -> dict[str, object]:
    """Redis state once two reads 0.1 s apart agree (outboxes confirm in the background)."""
    previous = redis_state(url)
    for _ in range(50):
        time.sleep(0.1)
        current = redis_state(url)
        if current == previous:
            return current
        previous = current
    raise RuntimeError("Redis state did not settle")


def diff(before: dict[str, object], after: dict[str, object]) -> list[str]:
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            changes.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


@contextlib.contextmanager
def environment() -> Iterator[tuple[EmbeddedRedis, DaemonProcess]]:
    with EmbeddedRedis() as redis_server:
        daemon = DaemonProcess(
            redis_server.url,
            "fuzz",
            # The session must outlive the run without pinging: a timeout would be a
            # (legitimate) state change.
            flags={"--ping-interval": "3000", "--timeout": "7200", "--log-level": "info"},
        )
        try:
            yield redis_server, daemon.start()
        finally:
            daemon.cleanup()


def run(datagrams: int, seed: int, *, progress: Callable[[str], None] | None = None) -> Report:
    """Fuzz a fresh daemon with ``datagrams`` mutants from ``seed``; see the module doc."""
    report = Report(seed=seed)
    with environment() as (redis_server, daemon):
        session_sock, token = open_session(daemon)
        senders = Senders(daemon.address)
        try:
            mutate = Mutator(corpus(token), random.Random(seed))
            before = settled_state(redis_server.url)
            report.rss_before_kb = rss_kb(daemon.pid)
            started = time.monotonic()
            window = 0
            while report.datagrams < datagrams:
                data = mutate()
                if opens_a_session(data):
                    report.skipped_valid += 1
                    continue
                senders.socks[report.datagrams % len(senders.socks)].sendto(data, daemon.address)
                report.datagrams += 1
                report.bytes_in += len(data)
                window += len(data)
                if window >= WINDOW_BYTES:
                    window = 0
                    senders.barrier(report)
                    if not daemon.running:
                        break
                    if progress is not None and report.datagrams % 100_000 < 200:
                        progress(f"{report.datagrams:,} datagrams")
            if daemon.running:
                senders.barrier(report)
            report.seconds = time.monotonic() - started
            report.crashed = not daemon.running
            if not report.crashed:
                report.rss_after_kb = rss_kb(daemon.pid)
                report.state_changes = diff(before, settled_state(redis_server.url))
                daemon.send_signal(signal.SIGTERM)
                report.exit_code = daemon.wait()
                report.crashed = report.exit_code != 0
            else:
                report.exit_code = daemon.process.poll() if daemon.process else None
        finally:
            senders.close()
            session_sock.close()
        log = daemon.stdout() + daemon.stderr()
        report.tracebacks = log.count("Traceback")
        match = COUNTERS_RE.search(log)
        if match:
            report.counters = ast.literal_eval(match[1])
            report.internal_errors = report.counters.get("internal_errors", 0)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--datagrams",
        type=int,
        default=int(os.environ.get("FUZZ_DATAGRAMS", DEFAULT_DATAGRAMS)),
        help="mutants to send (default $FUZZ_DATAGRAMS or 1,000,000)",
    )
    parser.add_argument("--seed", type=int, default=None, help="RNG seed (default random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"fuzzing with {args.datagrams:,} datagrams, seed {seed}", flush=True)
    report = run(args.datagrams, seed, progress=lambda line: print(line, flush=True))
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
