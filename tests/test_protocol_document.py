"""A client written only from ``docs/protocol.md``, against a real daemon.

Nothing here imports ``presence_client``: the constants below are copied from the
document, messages are plain dicts packed with ``msgpack``, and the socket is a plain
blocking UDP socket with timeouts. If one of these tests fails, either the daemon or
the document is wrong; the document is supposed to be enough to write a client.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgpack
import pytest

from daemons import DaemonFactory, daemon_factory_fixture  # noqa: F401

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
        assert msg.get("v") == VERSION, msg
        return msg

    # -- state keeping ---------------------------------------------------------------

    def apply(self, state: list[Any]) -> None:
        """Apply one friend state ``[name, online, version]`` with the version rule."""
        assert isinstance(state, list) and len(state) == 3, state
        name, online, version = state
        assert isinstance(name, str) and isinstance(online, bool), state
        assert isinstance(version, int) and version >= 0, state
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

    def connect(self, friends: list[str] | None = None) -> Msg:
        r = next(_request_ids)
        msg: Msg = {"v": VERSION, "t": CONNECT, "r": r, "c": self.client_id, "u": self.user}
        if friends is not None:
            msg["f"] = friends
        reply = self.request(padded(msg), r, (CONNECT_OK,))
        assert reply["t"] == CONNECT_OK, reply
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

    def friends_op(self, op: int, names: list[str], p: int = 0, n: int = 1) -> Msg:
        r = next(_request_ids)
        msg = {"v": VERSION, "t": FRIENDS, "r": r, "s": self.session, "op": op, "f": names}
        if n != 1:
            msg |= {"p": p, "n": n}
        return self.request(msg, r, (FRIENDS_OK,))

    def friends_set(self, names: list[str], per_part: int) -> Msg:
        """A multi-part ``set``: all parts with the same ``r``, one FRIENDS_OK."""
        r = next(_request_ids)
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


# -- the error-code table, row by row ---------------------------------------------------

DOC: Final = os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")

COVERED_ELSEWHERE: Final[dict[str, str]] = {
    "UNAUTHORIZED": "needs a daemon that requires login tokens (issue 11, auth work)",
    "FORBIDDEN": "needs a daemon where the application sets friend lists (issue 11)",
    "STALE": "needs a replayed connect number `n` after a newer one (issue 11)",
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
