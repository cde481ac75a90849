"""Datagrams with a forged or foreign source address, against a real daemon process.

Two kinds of sender:

- **Another host** (no privileges needed): a UDP socket bound to another loopback
  address, 127.0.0.2 and up, sending what it likes, including a victim's session token
  (as if the token had leaked).
- **A forged source** (needs a raw socket: root or CAP_NET_RAW, else those tests skip):
  a hand-built IPv4 + UDP header whose source is any address we choose, the victim's
  own IP included. Where we forge an address we also bind a socket to it, so every
  datagram the daemon sends there is caught and measured.

What must hold (docs/protocol.md, "Amplification and address verification"): a datagram
carrying the victim's token from any address but the victim's changes nothing in Redis
and neither ends nor redirects the victim's session (it keeps getting PONGs, and its
notifications, at its own address); nothing sent to a forged address is larger than
what was received from there; a forged CONNECT gets at most a reply no larger than
itself. Session takeover through CONNECT and login tokens belong to the auth tests.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import pytest
import pytest_asyncio

from daemons import DaemonFactory, DaemonProcess, RawPeer, daemon_factory_fixture  # noqa: F401
from helpers import redis_state, wait_for
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
    FriendsOp,
    Message,
    Notify,
    Ping,
    SnapshotRequest,
    decode,
    encode,
)
from presence_client.sdk import PresenceClient, StatusEvent

Address = tuple[str, int]

OTHER_HOSTS: Final = [f"127.0.0.{i}" for i in range(2, 6)]
"""Loopback addresses that stand for other hosts (Linux routes all of 127/8 to lo)."""

_ports = itertools.count(20000 + os.getpid() % 20000)


def session_messages(token: bytes, request: int) -> list[Message]:
    """One datagram of every client -> daemon type that carries a session token."""
    return [
        Ping(token),
        Disconnect(request, token),
        Friends(request, token, FriendsOp.SET, ("mallory",)),
        Friends(request, token, FriendsOp.REMOVE, ("pal",)),
        SnapshotRequest(request, token),
    ]


# ---------------------------------------------------------------------------
# Raw sockets.


def raw_socket_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        return False
    return True


class Forger:
    """Sends UDP datagrams with any IPv4 source, through a raw socket (IP_HDRINCL)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def send(self, source: Address, target: Address, payload: bytes) -> int:
        udp = struct.pack("!HHHH", source[1], target[1], 8 + len(payload), 0) + payload
        # The kernel fills in the IP checksum (and the id when 0); a UDP checksum of 0
        # means "none" in IPv4.
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            0,
            0,
            64,
            socket.IPPROTO_UDP,
            0,
            socket.inet_aton(source[0]),
            socket.inet_aton(target[0]),
        )
        self.sock.sendto(header + udp, (target[0], 0))
        return len(payload)

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------
# Listening at the addresses we send from (or forge).


@dataclass
class Listener:
    """A socket bound to one address we send from or forge; records what it got."""

    sock: socket.socket
    address: Address
    largest_sent: int = 0
    received: list[bytes] = field(default_factory=list)

    @classmethod
    def bind(cls, host: str) -> Listener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        return cls(sock, sock.getsockname())

    def sent(self, size: int) -> None:
        self.largest_sent = max(self.largest_sent, size)

    async def barrier(self, daemon: Address) -> list[bytes]:
        """Everything the daemon sent here before it answered a fresh probe from here
        (a DISCONNECT for an unknown session, answered at once, in order)."""
        loop = asyncio.get_running_loop()
        request = 4_000_000_000 + next(_ports)
        self.sock.sendto(encode(Disconnect(request, bytes(16))), daemon)
        before: list[bytes] = []
        deadline = loop.time() + 2.0
        while True:
            try:
                data = await asyncio.wait_for(
                    loop.sock_recv(self.sock, 2048), deadline - loop.time()
                )
            except TimeoutError:
                pytest.fail(f"barrier at {self.address} not answered; got {before!r}")
            msg = decode(data)
            if isinstance(msg, DisconnectOk) and msg.request == request:
                self.received += before
                return before
            before.append(data)

    async def answer_to(self, request: int) -> list[bytes]:
        """Everything received here up to and including the answer to ``request`` (a
        CONNECT is queued behind Redis work, so a barrier could overtake its answer)."""
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        deadline = loop.time() + 2.0
        while True:
            try:
                data = await asyncio.wait_for(
                    loop.sock_recv(self.sock, 2048), deadline - loop.time()
                )
            except TimeoutError:
                pytest.fail(f"no answer to request {request} at {self.address}; got {got!r}")
            got.append(data)
            if getattr(decode(data), "request", None) == request:
                self.received += got
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> DaemonProcess:
    return daemon_factory("spoof")


@pytest_asyncio.fixture
async def victim(daemon: DaemonProcess, redis_url: str) -> AsyncIterator[RawPeer]:
    """A verified session of user "victim", whose friend "pal" declares it back."""
    async with await RawPeer.open(daemon.address) as pal:
        await pal.connect("pal", "pal-1", ["victim"])
        await pal.disconnect()
    async with await RawPeer.open(daemon.address) as peer:
        await peer.connect("victim", "victim-1", ["pal"])
        await peer.ping()
        yield peer


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    made: list[Listener] = []
    yield made
    for listener in made:
        listener.close()


@pytest.fixture
def forger() -> Iterator[Forger]:
    if not raw_socket_available():
        pytest.skip(
            "forging a source address needs a raw socket (root or CAP_NET_RAW); "
            "the tests from other loopback addresses cover the unprivileged case"
        )
    made = Forger()
    yield made
    made.close()


async def settled_state(redis_url: str) -> dict[str, object]:
    """Redis state once it stopped changing on its own (outboxes being confirmed)."""
    previous = await asyncio.to_thread(redis_state, redis_url)

    async def stable() -> bool:
        nonlocal previous
        current = await asyncio.to_thread(redis_state, redis_url)
        same = current == previous
        previous = current
        return same

    await wait_for(stable, timeout=5.0, interval=0.1, what="Redis state settles")
    return previous


async def assert_victim_unharmed(
    victim: RawPeer, daemon: DaemonProcess, redis_url: str, before: dict[str, object]
) -> None:
    """Redis is as it was; the victim still gets PONGs, and its notifications, at home."""
    assert await asyncio.to_thread(redis_state, redis_url) == before
    pong, got = await victim.ping()
    assert pong.seq == 0 and got == [], got
    async with await RawPeer.open(daemon.address) as pal:
        await pal.connect("pal", "pal-1")
        notify, _ = await victim.recv_until(Notify)
        assert (notify.seq, notify.friend.name, notify.friend.online) == (1, "pal", True)
        await pal.disconnect()
    notify, _ = await victim.recv_until(Notify)
    assert (notify.seq, notify.friend.online) == (2, False)
    address = "{}:{}".format(*victim.local_address)
    assert address in str(await asyncio.to_thread(redis_state, redis_url))


def assert_no_amplification(listener: Listener, answers: list[bytes], sent: int) -> None:
    assert len(answers) <= 1, answers
    for answer in answers:
        assert len(answer) <= sent, (listener.address, decode(answer))
        msg = decode(answer)
        assert isinstance(msg, Error | DisconnectOk), msg
        if isinstance(msg, Error):
            assert msg.code is ErrorCode.UNKNOWN_SESSION, msg


# ---------------------------------------------------------------------------
# Another host (no privileges needed).


async def test_victims_token_from_other_hosts_changes_nothing(
    victim: RawPeer, daemon: DaemonProcess, redis_url: str, listeners: list[Listener]
) -> None:
    assert victim.session is not None
    before = await settled_state(redis_url)
    for host in OTHER_HOSTS:
        listener = Listener.bind(host)
        listeners.append(listener)
        for message in session_messages(victim.session, victim.next_request()):
            data = encode(message)
            listener.sock.sendto(data, daemon.address)
            answers = await listener.barrier(daemon.address)
            assert_no_amplification(listener, answers, len(data))
            if answers:  # at most UNKNOWN_SESSION: the token is not this address's
                error = decode(answers[0])
                assert isinstance(error, Error) and error.code is ErrorCode.UNKNOWN_SESSION
    await assert_victim_unharmed(victim, daemon, redis_url, before)


async def test_connect_from_another_host_is_answered_no_larger_than_itself(
    daemon: DaemonProcess, redis_url: str, listeners: list[Listener]
) -> None:
    listener = Listener.bind(OTHER_HOSTS[0])
    listeners.append(listener)

    def send(data: bytes) -> int:
        listener.sock.sendto(data, daemon.address)
        return len(data)

    await check_connects_of_every_size(listener, send)


async def check_connects_of_every_size(
    listener: Listener, send: Callable[[bytes], int], client: str = "far"
) -> None:
    """CONNECTs of several sizes from ``listener``'s address (sent by ``send``): each is
    answered once, no larger than itself; one under MIN_CONNECT_SIZE not at all."""
    for index, size in enumerate((300, 600, MIN_CONNECT_SIZE, MAX_DATAGRAM)):
        request = 10 + index
        connect = Connect(request, f"{client}-{index}", client, ("pal", "victim"))
        sent = send(encode(connect, pad_to=size))
        answers = await listener.answer_to(request)
        assert len(answers) == 1, answers
        assert len(answers[0]) <= sent, (size, decode(answers[0]))
        assert isinstance(decode(answers[0]), ConnectOk)
    # A tiny one, then a padded one with the same client id for another user: it is
    # queued behind the tiny one (same client id), so an answer to the tiny one would
    # arrive first, and had it opened a session this one would be CLIENT_ID_IN_USE.
    send(encode(Connect(50, f"{client}-tiny", client), pad_to=MIN_CONNECT_SIZE - 1))
    sent = send(encode(Connect(51, f"{client}-tiny", f"{client}2"), pad_to=MAX_DATAGRAM))
    answers = await listener.answer_to(51)
    assert len(answers) == 1 and len(answers[0]) <= sent, answers
    assert isinstance(decode(answers[0]), ConnectOk)


# ---------------------------------------------------------------------------
# Forged sources (raw socket).


async def test_forged_sources_with_the_victims_token_change_nothing(
    forger: Forger,
    victim: RawPeer,
    daemon: DaemonProcess,
    redis_url: str,
    listeners: list[Listener],
) -> None:
    assert victim.session is not None
    victim_ip = victim.local_address[0]
    before = await settled_state(redis_url)
    # The victim's own IP on another port, and arbitrary addresses; we listen at each.
    for host in [victim_ip, *OTHER_HOSTS]:
        listener = Listener.bind(host)
        listeners.append(listener)
        for message in session_messages(victim.session, victim.next_request()):
            sent = forger.send(listener.address, daemon.address, encode(message))
            answers = await listener.barrier(daemon.address)
            assert_no_amplification(listener, answers, sent)
    # And addresses where nothing listens (the daemon gets ICMP port unreachable).
    for host in OTHER_HOSTS:
        for message in session_messages(victim.session, victim.next_request()):
            forger.send((host, next(_ports)), daemon.address, encode(message))
    await assert_victim_unharmed(victim, daemon, redis_url, before)
    assert daemon.running


async def test_forged_unknown_tokens_from_the_victims_address_do_not_end_its_session(
    forger: Forger, victim: RawPeer, daemon: DaemonProcess, redis_url: str
) -> None:
    # The attacker does not know the token but knows the victim's address: whatever it
    # sends in the victim's name is answered (if at all) no larger than itself, to the
    # victim, and the session lives on.
    before = await settled_state(redis_url)
    for message in session_messages(os.urandom(16), victim.next_request()):
        sent = forger.send(victim.local_address, daemon.address, encode(message))
        for answer in await victim.barrier():
            assert len(answer) <= sent, decode(answer)
    await assert_victim_unharmed(victim, daemon, redis_url, before)


async def test_forged_connect_gets_no_reply_larger_than_itself(
    forger: Forger, daemon: DaemonProcess, redis_url: str, listeners: list[Listener]
) -> None:
    for host_index, host in enumerate(OTHER_HOSTS):
        listener = Listener.bind(host)
        listeners.append(listener)

        def send(data: bytes, source: Address = listener.address) -> int:
            return forger.send(source, daemon.address, data)

        await check_connects_of_every_size(listener, send, f"forged{host_index}")
        # Forged connects from addresses nobody listens at: nothing to measure, but the
        # daemon (told "port unreachable" by ICMP) must carry on.
        for size in (40, MIN_CONNECT_SIZE, MAX_DATAGRAM):
            payload = encode(Connect(1, f"blind-{host_index}-{size}", "blind"), pad_to=size)
            forger.send((host, next(_ports)), daemon.address, payload)
    assert daemon.running
    async with await RawPeer.open(daemon.address) as honest:
        await honest.connect("honest", "honest-1")
        await honest.ping()
        await honest.disconnect()


async def test_forged_pings_from_an_sdk_clients_address_do_not_make_it_reconnect(
    forger: Forger, daemon: DaemonProcess
) -> None:
    """A PING with a made-up token, forged from an SDK client's address, makes the
    daemon answer UNKNOWN_SESSION to that client (an ERROR carries no session, so the
    client cannot tell it from a real one). The SDK checks with a PING of its own and,
    as its session answers, stays connected: no reconnect, no new session."""
    client = PresenceClient("victim", ["pal"], servers=[daemon.address], client_id="v-1")
    statuses: list[str] = []
    client.add_listener(lambda e: statuses.append(e.status) if isinstance(e, StatusEvent) else None)
    await client.connect()
    try:
        session = client.session
        assert client._transport is not None
        address = client._transport.get_extra_info("sockname")[:2]
        for _ in range(5):
            forger.send(address, daemon.address, encode(Ping(os.urandom(16))))
        await wait_for(lambda: client.spurious_unknown_session >= 1, what="the SDK checked")
        assert (client.session, statuses) == (session, ["connected"])
    finally:
        await client.disconnect()
