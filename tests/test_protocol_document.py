"""A client written only from ``docs/protocol.md``, against a real daemon; and the
document's tables checked against the code, so neither can drift.

``DocClient`` never uses ``presence_client``: the constants below are copied from the
document, messages are plain dicts packed with ``msgpack``, and the socket is a plain
blocking UDP socket with timeouts. If one of its tests fails, either the daemon or the
document is wrong; the document is supposed to be enough to write a client.

The last section (*the document against the code*) is the one place that imports the
code: it parses the document's tables (message types, error codes, GO_AWAY reasons,
the timing model) and compares them, both ways, with the enums, constants and config
defaults they describe.
"""

from __future__ import annotations

import inspect
import itertools
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgpack
import pytest

from daemons import DaemonFactory, daemon_factory_fixture  # noqa: F401
from presence_client import protocol, sdk  # only for "the document against the code"
from presence_daemon import config as daemon_config
from presence_daemon import presence as daemon_presence
from presence_daemon import server as daemon_server

# -- constants, from docs/protocol.md -------------------------------------------------

VERSION: Final = 1
MAX_DATAGRAM: Final = 1200
MIN_CONNECT: Final = 128
SESSION_LEN: Final = 16

CONNECT: Final = 1
CONNECT_OK: Final = 2
PING: Final = 3
PONG: Final = 4
DISCONNECT: Final = 5
DISCONNECT_OK: Final = 6
FRIENDS: Final = 7
FRIENDS_OK: Final = 8
SNAPSHOT_REQUEST: Final = 9
SNAPSHOT: Final = 10
NOTIFY: Final = 11
ERROR: Final = 12

OP_ADD: Final = 1
OP_REMOVE: Final = 2
OP_SET: Final = 3

E_INVALID_NAME: Final = 6
E_UNKNOWN_SESSION: Final = 10
E_CLIENT_ID_IN_USE: Final = 11
E_STALE: Final = 15
E_TRY_AGAIN: Final = 20

Msg = dict[str, Any]
Address = tuple[str, int]

_request_ids = itertools.count(1)


def pack(msg: Msg) -> bytes:
    data: bytes = msgpack.packb(msg, use_bin_type=True)
    return data


def unpack(data: bytes) -> Msg:
    """One msgpack map and nothing else (``unpackb`` rejects trailing bytes)."""
    msg = msgpack.unpackb(data, raw=False)
    assert isinstance(msg, dict), f"datagram is not a map: {msg!r}"
    return msg


def padded(msg: Msg, size: int = MAX_DATAGRAM) -> bytes:
    """``msg`` with a ``pad`` bin so that the encoded datagram is exactly ``size`` bytes.

    The bin header grows with the payload (bin8 up to 255 bytes, bin16 after), so search
    for the payload length that lands exactly on ``size``.
    """
    for n in range(size, -1, -1):
        data = pack({**msg, "pad": b"\0" * n})
        if len(data) == size:
            return data
    raise AssertionError(f"cannot pad {msg!r} to {size} bytes")


class DocClient:
    """One session, on its own UDP socket, implemented from the document only.

    A background thread receives every datagram into a queue and, once the session is
    established (``keepalive``), sends a PING every ``pi`` milliseconds, as the document
    asks; the test thread consumes the queue with bounded waits.
    """

    def __init__(self, daemon: Address, client_id: str, user: str) -> None:
        self.daemon = daemon
        self.client_id = client_id
        self.user = user
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.session: bytes = b""
        self.keepalive = False
        self.ping_interval = 0.2
        self.timeout = 0.6
        self.seq = 0  # highest contiguous notification seq received
        self._gap = False  # a notification was lost: a snapshot is needed
        self.friends: dict[str, tuple[bool, int]] = {}  # name -> (online, version)
        self.declared: set[str] | None = None
        """Names declared or being declared (None: not known, every state is applied).
        A name counts as declared from the moment FRIENDS is sent; only a removed one
        may be ignored."""
        self.notifies: list[Msg] = []
        self.backlog: list[Msg] = []  # received, handled, not yet matched by a wait
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.last_ping = 0.0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def needs_snapshot(self) -> bool:
        """A NOTIFY skipped a number or a PONG reported more than we received."""
        return self._gap

    def close(self) -> None:
        self.closed.set()
        self.thread.join(2.0)
        self.sock.close()

    def _run(self) -> None:
        while not self.closed.is_set():
            if (
                self.keepalive
                and self.session
                and time.monotonic() - self.last_ping >= self.ping_interval
            ):
                self.ping()
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if addr[:2] == self.daemon:
                self.inbox.put(data)

    # -- raw datagrams -------------------------------------------------------------

    def send(self, msg: Msg | bytes) -> int:
        data = msg if isinstance(msg, bytes) else pack(msg)
        assert len(data) <= MAX_DATAGRAM
        return self.sock.sendto(data, self.daemon)

    def recv(self, timeout: float) -> Msg | None:
        """The next datagram from the daemon, or None after ``timeout`` seconds."""
        try:
            data = self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        assert len(data) <= MAX_DATAGRAM, f"datagram of {len(data)} bytes"
        msg = unpack(data)
        assert msg.get("v") == VERSION and type(msg.get("t")) is int, msg  # in every message
        return msg

    # -- state keeping ---------------------------------------------------------------

    def apply(self, state: list[Any]) -> None:
        """Apply one friend state ``[name, online, version]`` with the version rule."""
        assert isinstance(state, list) and len(state) == 3, state
        name, online, version = state
        assert isinstance(name, str) and isinstance(online, bool), state
        assert isinstance(version, int) and version >= 0, state
        if self.declared is not None and name not in self.declared:
            return  # a name we removed: the one case a state may be ignored
        held = self.friends.get(name)
        if held is None or version >= held[1]:
            self.friends[name] = (online, version)

    def handle(self, msg: Msg) -> None:
        """Bookkeeping for unsolicited messages (NOTIFY, PONG)."""
        if msg["t"] == NOTIFY:
            self.notifies.append(msg)
            if msg["q"] == self.seq + 1:
                self.seq = msg["q"]
            elif msg["q"] > self.seq + 1:
                self._gap = True
            self.apply(msg["f"])
        elif msg["t"] == PONG and msg["q"] > self.seq:
            self._gap = True

    def wait_for(self, match: Callable[[Msg], bool], timeout: float = 2.0) -> Msg:
        """The first received message (oldest first) that satisfies ``match``."""
        for i, msg in enumerate(self.backlog):
            if match(msg):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            got = self.recv(deadline - time.monotonic())
            if got is None:
                raise AssertionError(f"{self.user}/{self.client_id}: nothing matched")
            self.handle(got)
            if match(got):
                return got
            self.backlog.append(got)

    def pongs(self) -> None:
        """Forget PONGs and ERRORs waiting in the backlog (from background pings)."""
        self.backlog = [m for m in self.backlog if m["t"] not in (PONG, ERROR)]

    def request(
        self, msg: Msg | bytes, r: int, types: tuple[int, ...], timeout: float = 2.0
    ) -> Msg:
        """Send a request; wait for the reply with this ``r`` (or an ERROR for it)."""
        self.send(msg)
        return self.wait_for(
            lambda m: m["t"] in (*types, ERROR) and m.get("r") == r, timeout=timeout
        )

    # -- protocol operations -----------------------------------------------------------

    def try_connect(self, friends: list[str] | None = None, **extra: Any) -> Msg:
        """Send a padded CONNECT (``extra``: more keys, such as ``n`` or ``ps``); return
        its answer, CONNECT_OK or ERROR, without acting on it."""
        r = next(_request_ids)
        msg: Msg = {"v": VERSION, "t": CONNECT, "r": r, "c": self.client_id, "u": self.user}
        if friends is not None:
            msg["f"] = friends
        return self.request(padded(msg | extra), r, (CONNECT_OK,))

    def connect(self, friends: list[str] | None = None, **extra: Any) -> Msg:
        reply = self.try_connect(friends, **extra)
        assert reply["t"] == CONNECT_OK, reply
        self.declared = None if friends is None else set(friends)
        self.session = reply["s"]
        self.ping_interval = reply["pi"] / 1000
        self.timeout = reply["to"] / 1000
        self.seq = reply["q"]
        for state in reply["f"]:
            self.apply(state)
        self.ping()  # at once: this verifies the address
        self.keepalive = True  # ... and every `pi` milliseconds after
        return reply

    def ping(self) -> None:
        self.last_ping = time.monotonic()
        self.send({"v": VERSION, "t": PING, "s": self.session})

    def pong(self, timeout: float = 2.0) -> Msg:
        """PING now and return a PONG received after everything already queued."""
        while (msg := self.recv(0)) is not None:
            self.handle(msg)
            self.backlog.append(msg)
        self.pongs()
        self.ping()
        return self.wait_for(lambda m: m["t"] == PONG, timeout)

    def disconnect(self) -> Msg:
        r = next(_request_ids)
        msg = {"v": VERSION, "t": DISCONNECT, "r": r, "s": self.session}
        self.keepalive = False
        reply = self.request(msg, r, (DISCONNECT_OK,))
        self.session = b""
        return reply

    def declare(self, op: int, names: list[str]) -> None:
        """Bookkeeping when FRIENDS is sent (not when FRIENDS_OK comes): added names are
        declared at once, and offline until a NOTIFY or a snapshot says otherwise."""
        if op == OP_REMOVE:
            if self.declared is not None:
                self.declared -= set(names)
            return
        if op == OP_SET:
            self.declared = set()
        if self.declared is not None:
            self.declared |= set(names)
        for name in names:
            self.friends.setdefault(name, (False, -1))

    def friends_op(self, op: int, names: list[str], p: int = 0, n: int = 1) -> Msg:
        r = next(_request_ids)
        self.declare(op, names)
        msg = {"v": VERSION, "t": FRIENDS, "r": r, "s": self.session, "op": op, "f": names}
        if n != 1:
            msg |= {"p": p, "n": n}
        return self.request(msg, r, (FRIENDS_OK,))

    def friends_set(self, names: list[str], per_part: int) -> Msg:
        """A multi-part ``set``: all parts with the same ``r``, one FRIENDS_OK."""
        r = next(_request_ids)
        self.declare(OP_SET, names)
        chunks = [names[i : i + per_part] for i in range(0, len(names), per_part)]
        for p, chunk in enumerate(chunks):
            self.send(
                {
                    "v": VERSION,
                    "t": FRIENDS,
                    "r": r,
                    "s": self.session,
                    "op": OP_SET,
                    "f": chunk,
                    "p": p,
                    "n": len(chunks),
                }
            )
        return self.wait_for(lambda m: m["t"] in (FRIENDS_OK, ERROR) and m.get("r") == r)

    def snapshot(self) -> tuple[int, list[Msg]]:
        """SNAPSHOT_REQUEST; reassemble every part; apply; returns (q, parts)."""
        r = next(_request_ids)
        self.send({"v": VERSION, "t": SNAPSHOT_REQUEST, "r": r, "s": self.session})
        parts: dict[int, Msg] = {}
        count: int | None = None
        while count is None or len(parts) < count:
            msg = self.wait_for(lambda m: m["t"] in (SNAPSHOT, ERROR) and m.get("r") == r)
            assert msg["t"] == SNAPSHOT, msg
            if count is None:
                count = msg["n"]
            assert msg["n"] == count and 0 <= msg["p"] < count, msg
            parts[msg["p"]] = msg
        ordered = [parts[p] for p in range(count)]
        for part in ordered:
            for state in part["f"]:
                self.apply(state)
        q = max(part["q"] for part in ordered)
        if q >= self.seq:
            self.seq = q
            self._gap = False
        return q, ordered


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> Address:
    return daemon_factory().address


MakeClient = Callable[[Address, str, str], DocClient]


@pytest.fixture
def clients() -> Iterator[MakeClient]:
    made: list[DocClient] = []

    def make(daemon: Address, client_id: str, user: str) -> DocClient:
        client = DocClient(daemon, client_id, user)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- tests -----------------------------------------------------------------------------


def test_padding_is_exact() -> None:
    small: Msg = {"v": 1, "t": CONNECT, "r": 1, "c": "c", "u": "u"}
    assert len(padded(small, MIN_CONNECT)) == MIN_CONNECT
    for count in range(12):
        msg: Msg = {**small, "f": [f"{i:02d}" + "x" * 62 for i in range(count)]}
        assert len(padded(msg)) == MAX_DATAGRAM


def test_connect_ok(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    reply = alice.connect(["bob"])
    assert isinstance(reply["s"], bytes) and len(reply["s"]) == SESSION_LEN
    assert reply["pi"] == 200 and reply["to"] == 600
    assert reply["q"] == 0  # numbered per session from 1: nothing sent yet
    assert reply["done"] is True
    assert reply["f"] == [["bob", False, reply["f"][0][2]]]
    assert isinstance(reply["f"][0][2], int)


def test_connect_is_idempotent_from_same_address(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    first = alice.connect(["bob"])
    again = alice.connect(["bob"])
    assert again["s"] == first["s"]


def test_small_connect_gets_no_answer(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    msg: Msg = {"v": 1, "t": CONNECT, "r": 1, "c": "alice-laptop", "u": "alice"}
    alice.send(padded(msg, MIN_CONNECT - 1))
    assert alice.recv(0.5) is None
    alice.send(padded(msg, MIN_CONNECT))  # 128 bytes is not "smaller than 128"
    reply = alice.recv(2.0)
    assert reply is not None and reply["t"] == CONNECT_OK and reply["r"] == 1


def test_ping_pong(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    alice.connect(["bob"])
    assert len(pack({"v": VERSION, "t": PING, "s": alice.session})) == 27  # sizes table
    pong = alice.pong()
    assert pong["t"] == PONG and pong["q"] == 0
    assert "r" not in pong or pong["r"] == 0


def test_session_survives_while_pinging(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    alice.connect(["bob"])
    deadline = time.monotonic() + 3 * alice.timeout
    while time.monotonic() < deadline:  # keep pinging past the timeout
        assert alice.pong()["t"] == PONG
    assert alice.pong()["t"] == PONG


def test_mutual_friends_notify(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    bob = clients(daemon, "bob-phone", "bob")
    alice.connect(["bob"])
    assert alice.friends["bob"][0] is False
    alice.pong()  # address verified: notifications will be sent to it

    bob_ok = bob.connect(["alice"])
    assert [s[:2] for s in bob_ok["f"]] == [["alice", True]]

    notify = alice.wait_for(lambda m: m["t"] == NOTIFY)
    assert notify["q"] == 1  # first notification of this session
    name, online, version = notify["f"]
    assert (name, online) == ("bob", True)
    assert isinstance(version, int)
    assert alice.friends["bob"] == (True, version)
    assert alice.pong()["q"] == 1 and not alice.needs_snapshot()

    # bob leaves: alice sees him offline, seq 2, with a larger version.
    bob.disconnect()
    off = alice.wait_for(lambda m: m["t"] == NOTIFY)
    assert off["q"] == 2
    assert off["f"][:2] == ["bob", False] and off["f"][2] > version
    assert alice.friends["bob"] == (False, off["f"][2])


def test_timeout_takes_user_offline(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    bob = clients(daemon, "bob-phone", "bob")
    alice.connect(["bob"])
    alice.pong()
    bob.connect(["alice"])
    alice.wait_for(lambda m: m["t"] == NOTIFY and m["f"][1] is True)
    bob.keepalive = False
    # bob stops pinging; alice keeps pinging and hears him go offline.
    off = alice.wait_for(lambda m: m["t"] == NOTIFY and m["f"][1] is False, timeout=2.5)
    assert off["f"][0] == "bob" and off["q"] == 2


def test_disconnect(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    alice.connect(["bob"])
    session = alice.session
    reply = alice.disconnect()
    assert reply["t"] == DISCONNECT_OK
    # a retry (session now unknown) is also answered DISCONNECT_OK
    alice.session = session
    assert alice.disconnect()["t"] == DISCONNECT_OK


def test_notification_before_first_ping_is_repaired_by_snapshot(
    daemon: Address, clients: MakeClient
) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    bob = clients(daemon, "bob-phone", "bob")
    # alice connects but does not ping yet: her address is not verified.
    r = next(_request_ids)
    msg: Msg = {"v": 1, "t": CONNECT, "r": r, "c": "alice-laptop", "u": "alice", "f": ["bob"]}
    alice.send(padded(msg))
    ok = alice.recv(2.0)
    assert ok is not None and ok["t"] == CONNECT_OK and ok["q"] == 0
    alice.session = ok["s"]
    # bob comes online: alice's NOTIFY is numbered (1) but not sent to her.
    bob.connect(["alice"])
    assert alice.recv(0.3) is None
    # her first PING reports q = 1 > 0: a notification was lost.
    alice.ping()
    pong = alice.wait_for(lambda m: m["t"] == PONG)
    assert pong["q"] == 1 and alice.needs_snapshot()
    assert not alice.notifies
    q, _ = alice.snapshot()
    assert q == 1 and alice.seq == 1 and not alice.needs_snapshot()
    assert alice.friends["bob"][0] is True


def test_snapshot_single_part(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    bob = clients(daemon, "bob-phone", "bob")
    alice.connect(["bob", "carol"])
    alice.pong()
    bob.connect(["alice"])
    alice.wait_for(lambda m: m["t"] == NOTIFY)
    q, parts = alice.snapshot()
    assert len(parts) == 1 and parts[0]["p"] == 0 and parts[0]["n"] == 1
    assert q == 1
    states = {s[0]: s[1] for s in parts[0]["f"]}
    assert states == {"bob": True, "carol": False}


def test_snapshot_many_parts(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    alice.connect([])
    names = [f"friend-{i:03d}-" + "x" * 50 for i in range(60)]  # ~3.6 kB of names
    ok = alice.friends_set(names, per_part=15)
    assert ok["t"] == FRIENDS_OK, ok
    q, parts = alice.snapshot()
    assert len(parts) > 1
    assert all(p["n"] == len(parts) and p["q"] == q for p in parts)
    assert [p["p"] for p in parts] == list(range(len(parts)))
    got = [s[0] for part in parts for s in part["f"]]
    assert sorted(got) == sorted(names) and len(got) == len(names)
    assert all(alice.friends[n][0] is False for n in names)
    assert q == 0

    # reconnecting with the stored list (no `f`) cannot fit it: done is false.
    again = alice.connect(None)
    assert again["done"] is False
    assert len(again["f"]) < len(names)


def test_unknown_session_error(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    alice.session = os.urandom(SESSION_LEN)
    r = next(_request_ids)
    reply = alice.request(
        {"v": 1, "t": SNAPSHOT_REQUEST, "r": r, "s": alice.session}, r, (SNAPSHOT,)
    )
    assert reply["t"] == ERROR and reply["e"] == E_UNKNOWN_SESSION and reply["r"] == r
    # a PING has no `r`: the error carries r = 0
    alice.send({"v": 1, "t": PING, "s": alice.session})
    err = alice.recv(2.0)
    assert err is not None and err["t"] == ERROR
    assert err["e"] == E_UNKNOWN_SESSION and err["r"] == 0


def test_unknown_session_from_other_address(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    thief = clients(daemon, "thief", "mallory")
    alice.connect(["bob"])
    thief.session = alice.session
    thief.send({"v": 1, "t": PING, "s": alice.session})
    err = thief.recv(1.0)
    assert err is not None and err["t"] == ERROR and err["e"] == E_UNKNOWN_SESSION
    assert alice.pong()["t"] == PONG  # alice's session is untouched


def test_friends_add_makes_friendship_mutual(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    bob = clients(daemon, "bob-phone", "bob")
    alice.connect(["bob"])
    alice.pong()
    bob_ok = bob.connect([])  # bob does not declare alice
    assert bob_ok["f"] == []
    bob.pong()
    # not mutual: alice still sees bob offline and got nothing
    assert alice.pong()["q"] == 0 and alice.friends["bob"][0] is False

    assert bob.friends_op(OP_ADD, ["alice"])["t"] == FRIENDS_OK
    to_alice = alice.wait_for(lambda m: m["t"] == NOTIFY)
    to_bob = bob.wait_for(lambda m: m["t"] == NOTIFY)
    assert to_alice["q"] == 1 and to_alice["f"][:2] == ["bob", True]
    assert to_bob["q"] == 1 and to_bob["f"][:2] == ["alice", True]

    # and removing it makes it one-sided again: each sees the other offline.
    assert bob.friends_op(OP_REMOVE, ["alice"])["t"] == FRIENDS_OK
    to_alice = alice.wait_for(lambda m: m["t"] == NOTIFY)
    to_bob = bob.wait_for(lambda m: m["t"] == NOTIFY)
    assert to_alice["q"] == 2 and to_alice["f"][:2] == ["bob", False]
    assert to_bob["q"] == 2 and to_bob["f"][:2] == ["alice", False]


def test_invalid_name_error_echoes_request_id(daemon: Address, clients: MakeClient) -> None:
    alice = clients(daemon, "alice-laptop", "alice")
    alice.connect(["bob"])
    r = next(_request_ids)
    msg = {"v": 1, "t": FRIENDS, "r": r, "s": alice.session, "op": OP_ADD, "f": ["no spaces"]}
    alice.send(msg)
    err = alice.wait_for(lambda m: m["t"] == ERROR)
    assert err["e"] == E_INVALID_NAME
    assert err["r"] == r


# -- cases the document decides (issue 14) ----------------------------------------------


def test_a_name_counts_as_declared_from_the_moment_friends_is_sent(
    daemon: Address, clients: MakeClient
) -> None:
    """The NOTIFY about a newly mutual friend may come before FRIENDS_OK; a client that
    takes the name as declared once FRIENDS is sent applies it, whatever the order.
    FRIENDS_OK carries nothing but `r`; an added friend is offline until told."""
    alice = clients(daemon, "alice-laptop", "alice")
    bob = clients(daemon, "bob-phone", "bob")
    bob.connect(["alice"])
    bob.pong()
    alice.connect(["carol"])
    alice.pong()

    ok = alice.friends_op(OP_ADD, ["bob"])
    assert ok["t"] == FRIENDS_OK and set(ok) == {"v", "t", "r"}, ok  # no friend states
    notify = alice.wait_for(lambda m: m["t"] == NOTIFY)  # (before or after FRIENDS_OK)
    assert notify["q"] == 1 and notify["f"][:2] == ["bob", True]
    assert alice.friends["bob"] == (True, notify["f"][2])
    assert alice.pong()["q"] == 1 and not alice.needs_snapshot()  # nothing was lost

    # carol is not online: no NOTIFY about her; she stays offline, as the client assumed.
    assert alice.friends_op(OP_ADD, ["dave"])["t"] == FRIENDS_OK
    assert alice.friends["dave"][0] is False and alice.pong()["q"] == 1


def test_a_silent_session_is_dropped_between_to_and_to_plus_one_sweep(
    daemon_factory: DaemonFactory, clients: MakeClient
) -> None:
    timeout, sweep = 0.6, 0.25
    flags = {"--timeout": str(timeout), "--sweep-interval": str(sweep)}
    daemon = daemon_factory(flags=flags).address
    alice = clients(daemon, "alice-laptop", "alice")
    bob = clients(daemon, "bob-phone", "bob")
    bob.connect(["alice"])
    bob.pong()
    alice.connect(["bob"])
    bob.wait_for(lambda m: m["t"] == NOTIFY and m["f"][:2] == ["alice", True])
    alice.keepalive = False
    alice.ping()  # her last datagram (a background ping racing it would only be later)
    off = bob.wait_for(lambda m: m["t"] == NOTIFY and m["f"][1] is False, timeout=5.0)
    heard = time.monotonic()
    assert off["f"][0] == "alice"
    silent = heard - alice.last_ping  # last_ping: taken just before the last PING left
    assert silent >= timeout, f"dropped after {silent:.3f} s < `to`"
    # `to` + one sweep, plus the removal through Redis and the NOTIFY's trip (slack).
    assert silent <= timeout + sweep + 0.5, f"dropped after {silent:.3f} s"


def test_a_resent_snapshot_request_takes_a_new_r(
    daemon_factory: DaemonFactory, clients: MakeClient
) -> None:
    """Within the snapshot interval a new `r` gets TRY_AGAIN (retry with backoff); the
    `r` served last gets the same answer again (for older clients)."""
    daemon = daemon_factory(flags={"--snapshot-interval": "30"}).address
    alice = clients(daemon, "alice-laptop", "alice")
    alice.connect(["bob", "carol"])
    alice.pong()
    _, parts = alice.snapshot()
    served = parts[0]["r"]

    r = next(_request_ids)
    again = {"v": VERSION, "t": SNAPSHOT_REQUEST, "r": r, "s": alice.session}
    err = alice.request(again, r, (SNAPSHOT,))
    assert err["t"] == ERROR and err["e"] == E_TRY_AGAIN and err["r"] == r, err

    same = {"v": VERSION, "t": SNAPSHOT_REQUEST, "r": served, "s": alice.session}
    replay = alice.request(same, served, (SNAPSHOT,))
    assert replay == parts[0]


def test_connect_repeat_replacement_and_replays(daemon: Address, clients: MakeClient) -> None:
    """The rules of *CONNECT: repeats, replacement and replays*, in their order."""
    first = clients(daemon, "alice-laptop", "alice")
    number = time.time_ns() // 1_000_000
    token = first.connect(["bob"], n=number)["s"]
    # Repeat: same client id, user and address, the session live: the same token.
    assert first.try_connect(["bob"], n=number)["s"] == token

    # From another address, without proof, while that session lives: refused.
    second = clients(daemon, "alice-laptop", "alice")
    refused = second.try_connect(n=number + 1)
    assert refused["t"] == ERROR and refused["e"] == E_CLIENT_ID_IN_USE, refused
    # With `ps`, the token it replaces: a new session; the old token is unknown now.
    replaced = second.connect(n=number + 1, ps=token)
    assert replaced["s"] != token
    first.keepalive = False
    first.send({"v": VERSION, "t": PING, "s": token})
    gone = first.wait_for(lambda m: m["t"] == ERROR)
    assert gone["e"] == E_UNKNOWN_SESSION and gone["r"] == 0

    # Replays: a lower number, or the same number once its session ended.
    older = first.try_connect(n=number, ps=replaced["s"])
    assert older["t"] == ERROR and older["e"] == E_STALE, older
    second.disconnect()
    delayed = second.try_connect(n=number + 1)
    assert delayed["t"] == ERROR and delayed["e"] == E_STALE, delayed
    # A higher number is a new connect.
    assert second.try_connect(n=number + 2)["t"] == CONNECT_OK


# -- the error-code table, row by row ---------------------------------------------------

DOC: Final = os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")

COVERED_ELSEWHERE: Final[dict[str, str]] = {
    "UNAUTHORIZED": "needs a daemon that requires login tokens (issue 11, auth work)",
    "FORBIDDEN": "needs a daemon where the application sets friend lists (issue 11)",
    "TRY_AGAIN": "needs Redis stopped or a full job queue: tests/test_convergence.py "
    "(test_connect_while_redis_is_stopped_gets_try_again_quickly, "
    "test_disconnects_during_a_redis_stall_are_told_to_friends_after_it)",
}
"""Error codes no single datagram to an unauthenticated daemon on a healthy Redis can
produce, each with where it is covered instead."""


def error_table() -> list[tuple[int, str]]:
    """(code, name) of every row of the document's error-code table."""
    with open(DOC, encoding="utf-8") as file:
        text = file.read()
    section = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1]))
    return rows


def connect_body(user: Any = "eve", client_id: Any = "eve-1", **extra: Any) -> Msg:
    r = next(_request_ids)
    return {"v": VERSION, "t": CONNECT, "r": r, "c": client_id, "u": user, **extra}


def producers(daemon: Address) -> dict[str, Callable[[DocClient], bytes]]:
    """For each producible code, a function that does any setup with its own client and
    returns the one datagram whose answer must carry the code."""

    def in_use(client: DocClient) -> bytes:
        owner = DocClient(daemon, "shared-1", "owner")
        try:
            owner.connect([])
        finally:
            owner.close()
        return padded({**connect_body("intruder", "shared-1")})

    def replayed(client: DocClient) -> bytes:
        number = time.time_ns() // 1_000_000
        client.connect([], n=number)
        client.disconnect()
        return padded({**connect_body(client.user, client.client_id), "n": number})

    return {
        "MALFORMED": lambda c: b"\xc1" * 100,
        "UNSUPPORTED_VERSION": lambda c: padded({"v": 2, "t": PING, "s": bytes(16)}, 100),
        "UNKNOWN_TYPE": lambda c: padded({"v": VERSION, "t": 99, "r": 5}, 100),
        "INVALID_FIELD": lambda c: padded({"v": VERSION, "t": PING, "s": bytes(15)}, 100),
        "TOO_LARGE": lambda c: padded(connect_body(), MAX_DATAGRAM + 1),
        "INVALID_NAME": lambda c: padded(connect_body("no spaces")),
        "UNKNOWN_SESSION": lambda c: pack({"v": VERSION, "t": PING, "s": os.urandom(16)}),
        "CLIENT_ID_IN_USE": in_use,
        "TOO_MANY_FRIENDS": lambda c: padded(connect_body(f=["f1", "f2", "f3"])),
        "STALE": replayed,
    }


def test_every_error_code_of_the_document_is_produced(daemon_factory: DaemonFactory) -> None:
    rows = error_table()
    assert len(rows) >= 10, rows
    daemon = daemon_factory(flags={"--max-friends": "2"}).address
    made = producers(daemon)
    unaccounted = [name for _, name in rows if name not in made and name not in COVERED_ELSEWHERE]
    assert unaccounted == [], "error codes neither produced here nor covered elsewhere"
    stale = sorted((set(made) | set(COVERED_ELSEWHERE)) - {name for _, name in rows})
    assert stale == [], "codes the document no longer lists"
    for code, name in rows:
        if name in COVERED_ELSEWHERE:
            continue
        client = DocClient(daemon, f"err-{code}", f"err{code}")
        try:
            datagram = made[name](client)
            client.sock.sendto(datagram, daemon)  # may be over MAX_DATAGRAM on purpose
            reply = client.wait_for(lambda m: m["t"] == ERROR)
            assert reply["e"] == code, (name, reply)
            data = pack(reply)
            assert len(data) <= len(datagram), (name, "reply larger than the datagram")
        finally:
            client.close()


# -- the document against the code -----------------------------------------------------
# The only tests here that import the code: they keep the document's tables and the
# enums, constants and defaults they describe equal, both ways.


def doc_text() -> str:
    with open(DOC, encoding="utf-8") as file:
        return file.read()


def section(title: str) -> str:
    """The text under the heading ``## title`` or ``### title``, up to the next heading
    of the same or a higher level."""
    text = doc_text()
    for marks in ("##", "###"):
        head = f"\n{marks} {title}\n"
        if head in text:
            body = text.split(head, 1)[1]
            # A heading of the same or a higher level: 2 to len(marks) hash marks.
            end = re.search(rf"^#{{2,{len(marks)}}} ", body, re.MULTILINE)
            return body[: end.start()] if end else body
    raise AssertionError(f"no section {title!r} in docs/protocol.md")


def table_rows(text: str) -> list[list[str]]:
    """Cells of every table row in ``text`` whose first cell is a number."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_constants_copied_from_the_document_are_the_code_s() -> None:
    assert VERSION == protocol.PROTOCOL_VERSION
    assert MAX_DATAGRAM == protocol.MAX_DATAGRAM
    assert MIN_CONNECT == protocol.MIN_CONNECT_SIZE
    assert SESSION_LEN == protocol.SESSION_BYTES
    names = {t.name: t.value for t in protocol.MessageType}
    copied = {name: value for name, value in globals().items() if name in names}
    assert copied == {name: value for name, value in names.items() if name in copied}
    assert (OP_ADD, OP_SET, OP_REMOVE) == (
        protocol.FriendsOp.ADD,
        protocol.FriendsOp.SET,
        protocol.FriendsOp.REMOVE,
    )
    copied_codes = {name[2:]: value for name, value in globals().items() if name[:2] == "E_"}
    assert copied_codes == {name: protocol.ErrorCode[name] for name in copied_codes}
    text = doc_text()
    assert f"**{protocol.MAX_DATAGRAM:,} bytes**" in text
    assert f"**{protocol.MIN_CONNECT_SIZE} bytes**" in text
    assert f"**{protocol.MAX_NAME_CHARS} code points**" in text
    assert f"**{protocol.MAX_NESTING} levels**" in text
    assert f"`n` ≤ {protocol.MAX_PARTS}" in text
    assert f"Unicode {protocol.UNICODE_VERSION}" in text


def test_message_type_table_is_the_code_s() -> None:
    rows = table_rows(section("Message types"))
    documented = {(int(cells[0]), cells[1]) for cells in rows}
    assert documented == {(t.value, t.name) for t in protocol.MessageType}
    assert len(rows) == len(documented), "a type listed twice"
    for cells in rows:
        kind = protocol.MessageType(int(cells[0]))
        expected = "client → daemon" if kind in protocol.CLIENT_TO_DAEMON else "daemon → client"
        assert cells[2] == expected, (kind.name, cells[2])
    friends = next(cells for cells in rows if cells[1] == "FRIENDS")[3]
    for op in protocol.FriendsOp:
        assert f"{op.value} {op.name.lower()}" in friends, op


MESSAGE_SAMPLES: Final[dict[protocol.MessageType, protocol.Message]] = {
    m.TYPE: m
    for m in (
        protocol.Connect(1, "c", "u", ("f",), auth=b"jwt", counter=2, previous=bytes(16)),
        protocol.ConnectOk(
            1, bytes(16), 5000, 15000, 0, (protocol.FriendState("f", True, 1),), True
        ),
        protocol.Ping(bytes(16)),
        protocol.Pong(3),
        protocol.Disconnect(1, bytes(16)),
        protocol.DisconnectOk(1),
        protocol.Friends(1, bytes(16), protocol.FriendsOp.SET, ("f",), part=0, parts=2),
        protocol.FriendsOk(1),
        protocol.SnapshotRequest(1, bytes(16)),
        protocol.Snapshot(1, 0, 1, 0, (protocol.FriendState("f", False, 1),)),
        protocol.Notify(1, protocol.FriendState("f", True, 2)),
        protocol.Error(1, protocol.ErrorCode.TRY_AGAIN),
        protocol.GoAway(bytes(16), protocol.GoAwayReason.SHUTDOWN),
    )
}
"""One message of each type, every optional key the encoder writes filled in."""


def test_message_keys_are_the_code_s() -> None:
    """Each type's documented keys against what the reference codec writes: every
    written key is documented, every key documented as required is written."""
    assert set(MESSAGE_SAMPLES) == set(protocol.MessageType)
    for cells in table_rows(section("Message types")):
        kind = protocol.MessageType(int(cells[0]))
        documented = dict(re.findall(r"`([a-z]+)`( \*opt\*)?", cells[3]))  # keys: lowercase
        required = {key for key, optional in documented.items() if not optional}
        written = set(unpack(protocol.encode(MESSAGE_SAMPLES[kind]))) - {"v", "t"}
        assert written <= set(documented), (kind.name, written - set(documented))
        assert required <= written, (kind.name, required - written)


def test_error_code_table_is_the_code_s() -> None:
    rows = error_table()
    assert sorted(rows) == sorted((c.value, c.name) for c in protocol.ErrorCode)
    assert len(rows) == len(set(rows)), "a code listed twice"
    edge_cases = section("Edge cases")
    for name in re.findall(r"`([A-Z_]{4,})`", edge_cases):
        assert name in protocol.ErrorCode.__members__, name


def test_go_away_reasons_are_the_code_s() -> None:
    rows = table_rows(section("GO_AWAY"))
    documented = {(int(cells[0]), cells[1]) for cells in rows}
    assert documented == {(w.value, w.name) for w in protocol.GoAwayReason}


def _source_value(source: str) -> float:
    """The value a timing-model row names: ``Config.x`` (its default), or
    ``module.NAME`` / ``module.NAME[i]`` (a constant)."""
    match = re.fullmatch(r"`(\w+)\.(\w+)(?:\[(\d)\])?`", source)
    assert match is not None, f"unreadable source {source!r}"
    owner, name, index = match.groups()
    modules = {"sdk": sdk, "presence": daemon_presence, "server": daemon_server}
    if owner == "Config":
        value = getattr(daemon_config.Config(processes=1), name)
    else:
        value = getattr(modules[owner], name)
    if index is not None:
        value = value[int(index)]
    assert isinstance(value, int | float), (source, value)
    return float(value)


def test_timing_model_defaults_are_the_code_s() -> None:
    text = section("Timing model")
    rows = []
    for line in text.split("\n\n", 2)[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`"):
            rows.append(cells)
    assert len(rows) >= 15, rows
    flags = {
        option
        for action in daemon_config.build_parser()._actions
        for option in action.option_strings
    }
    for quantity, default, set_by, source in rows:
        number = re.match(r"[\d.]+", default)
        assert number is not None, (quantity, default)
        assert float(number.group()) == _source_value(source), (quantity, default, source)
        for flag in re.findall(r"--[a-z-]+", set_by):
            assert flag in flags, (quantity, flag)
            if source.startswith("`Config."):
                assert flag == "--" + source[8:-1].replace("_", "-"), (quantity, flag)
    documented = {cells[3] for cells in rows}
    for name in ("ping_interval", "timeout", "sweep_interval", "lease_ttl", "drain_grace"):
        assert f"`Config.{name}`" in documented, name


def test_timing_relations_hold_for_the_defaults() -> None:
    """The relations the timing model states, computed from the code's defaults, and
    the derived figures the document quotes."""
    defaults = daemon_config.Config(processes=1)
    low, high = sdk.PROBE_INTERVAL
    probe = min(max(defaults.ping_interval / 4, low), high)
    leave = defaults.ping_interval + sdk.PROBES * probe
    renew = min(daemon_presence.LEASE_RENEW_INTERVAL, defaults.lease_ttl / 3)
    assert defaults.timeout > defaults.ping_interval
    assert leave < defaults.timeout  # a client moves before its daemon drops it
    assert leave < defaults.lease_ttl - renew  # ... and before a survivor reaps it
    text = doc_text()
    assert f"= {leave:g} s after its last answer" in text
    drop = (
        f"between **{defaults.timeout:g} s and {defaults.timeout + defaults.sweep_interval:g} s**"
    )
    assert drop in text
    reap = f"({defaults.lease_ttl - renew:g}\N{EN DASH}{defaults.lease_ttl + renew:g} s)"
    assert reap in text


def test_sizes_at_a_glance_are_the_codec_s() -> None:
    rows = {}
    for line in section("Sizes at a glance").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].isupper():
            rows[cells[0]] = cells[1]
    token = bytes(protocol.SESSION_BYTES)
    assert rows["PING"] == f"{len(protocol.encode(protocol.Ping(token)))} bytes"
    assert rows["GO_AWAY"] == f"{len(protocol.encode(protocol.GoAway(token, 1)))} bytes"
    pongs = (protocol.encode(protocol.Pong(q)) for q in (0, 2**32 - 1))
    assert rows["PONG"].startswith("{} to {} bytes".format(*map(len, pongs)))
    error = protocol.ErrorCode.UNSUPPORTED_VERSION
    smallest = len(protocol.encode(protocol.Error(1, error)))
    largest = len(protocol.encode(protocol.Error(protocol.MAX_REQUEST_ID, error)))
    versions = len(msgpack.packb({"vs": [protocol.PROTOCOL_VERSION]})) - 1  # (map header)
    assert rows["ERROR"] == (
        f"{smallest} to {largest} bytes (by the size of `r`), plus {versions} with `vs` = [1]"
    )
    now_ms = 1_764_126_000_000
    notify = protocol.encode(protocol.Notify(1, protocol.FriendState("", True, now_ms)))
    assert rows["NOTIFY"].startswith(f"{len(notify)} + name bytes")  # ("": a str header)
    assert rows["CONNECT"] == f"padded to {protocol.MAX_DATAGRAM:,}"


def test_state_machine_attempts_are_the_sdk_s() -> None:
    """The attempt counts in the state machine's timer table (the SDK has them as
    parameter defaults, not constants)."""
    timers = section("Client state machine")
    row = next(line for line in timers.splitlines() if line.startswith("| attempts |"))
    connect = inspect.signature(sdk.PresenceClient).parameters["connect_attempts"].default
    requests = inspect.signature(sdk.PresenceClient._request).parameters["attempts"].default
    assert f"CONNECT {sdk.ATTEMPTS_PER_SERVER} per server" in row
    assert f"the first connect {connect} in all" in row
    assert f"FRIENDS and SNAPSHOT_REQUEST {requests}" in row
    assert f"{sdk.PROBES} PINGs" in timers
    statuses = {"connected", "reconnecting", "disconnected"}  # the SDK's StatusEvents
    for status in statuses:
        assert f"emits *{status}*" in timers or f"emit *{status}*" in timers, status
