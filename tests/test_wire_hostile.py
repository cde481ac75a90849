"""Hostile datagrams against one real daemon process, over real UDP.

For each bad datagram: the daemon stays up and keeps serving, Redis is untouched, and
whatever it answers is never larger than the datagram that caused it (the amplification
rule of docs/protocol.md) and carries the expected error code. A "barrier" (a DISCONNECT
for an unknown session, answered at once) tells when every answer to the bad datagram
has arrived, so no test waits on a timer.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import pytest_asyncio
import redis.asyncio

from daemons import DaemonProcess, RawPeer
from helpers import wait_for
from presence_client.protocol import (
    MAX_DATAGRAM,
    MAX_NAME_CHARS,
    MIN_CONNECT_SIZE,
    Connect,
    ConnectOk,
    Disconnect,
    DisconnectOk,
    Error,
    ErrorCode,
    FriendsOp,
    FriendState,
    Message,
    Notify,
    Ping,
    Pong,
    Snapshot,
    SnapshotRequest,
    decode,
    encode,
)
from presence_daemon import keys
from presence_daemon.embedded import EmbeddedRedis
from presence_daemon.presence import Presence

UNKNOWN = bytes(range(16))
"""A 16-byte session token the daemon never issued."""


@pytest.fixture(scope="module")
def daemon(redis_server: EmbeddedRedis) -> Iterator[DaemonProcess]:
    """One daemon for the whole module (each test still gets a flushed Redis)."""
    with DaemonProcess(redis_server.url, "hostile") as process:
        yield process
        assert process.running, f"daemon died; stderr:\n{process.stderr()}"
        assert "Traceback" not in process.stderr(), process.stderr()


@pytest_asyncio.fixture
async def peer(daemon: DaemonProcess, redis_url: str) -> AsyncIterator[RawPeer]:
    async with await RawPeer.open(daemon.address) as raw:
        yield raw


def pack(body: dict[str, Any], *, size: int = 0) -> bytes:
    """msgpack ``body``; with ``size``, add an ignored ``pad`` key to reach about that."""
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) < size:
        body = {**body, "pad": bytes(max(size - len(data) - 7, 0))}
        data = msgpack.packb(body, use_bin_type=True)
    return data


def connect_body(
    user: object = "mallory", client_id: object = "m-1", **extra: Any
) -> dict[str, Any]:
    return {"v": 1, "t": 1, "r": 7, "c": client_id, "u": user, **extra}


@dataclass(frozen=True)
class Case:
    datagram: bytes
    reply: ErrorCode | type[Message] | None
    """The expected answer: an Error with this code, a message of this type, or None
    for no answer at all."""
    required: bool = True
    """False if the answer may be withheld (it would be larger than the datagram)."""
    request: int = 0
    """The request id the answer must carry: the datagram's own when it could be read,
    else 0."""


def padded(message: Message, size: int = MAX_DATAGRAM) -> bytes:
    return encode(message, pad_to=size)


CASES: dict[str, Case] = {
    # Not msgpack / not one map.
    "empty": Case(b"", ErrorCode.MALFORMED, required=False),
    "garbage-1-byte": Case(b"\xc1", ErrorCode.MALFORMED, required=False),
    "garbage-long": Case(b"\xc1" * 100, ErrorCode.MALFORMED),
    "not-a-map": Case(msgpack.packb(list(range(60))), ErrorCode.MALFORMED),
    "trailing-bytes": Case(
        pack({"v": 1, "t": 3, "s": UNKNOWN}, size=80) + b"\x00", ErrorCode.MALFORMED
    ),
    "truncated": Case(padded(Connect(1, "m-1", "mallory"), 200)[:-9], ErrorCode.MALFORMED),
    # Version and type.
    "wrong-version": Case(
        pack({"v": 2, "t": 3, "s": UNKNOWN}, size=80), ErrorCode.UNSUPPORTED_VERSION
    ),
    "missing-version": Case(pack({"t": 3, "s": UNKNOWN}, size=80), ErrorCode.UNSUPPORTED_VERSION),
    "version-true": Case(
        pack({"v": True, "t": 3, "s": UNKNOWN}, size=80), ErrorCode.UNSUPPORTED_VERSION
    ),
    "unknown-type": Case(pack({"v": 1, "t": 99}, size=80), ErrorCode.UNKNOWN_TYPE),
    "missing-type": Case(pack({"v": 1}, size=80), ErrorCode.UNKNOWN_TYPE),
    "type-as-string": Case(pack({"v": 1, "t": "3", "s": UNKNOWN}, size=80), ErrorCode.UNKNOWN_TYPE),
    # Size.
    "too-large-1300": Case(
        padded(Connect(1, "big-1", "bigmallory", ("bob",)), 1300), ErrorCode.TOO_LARGE
    ),
    "too-large-1201": Case(
        padded(Connect(1, "big-1", "bigmallory"), MAX_DATAGRAM + 1), ErrorCode.TOO_LARGE
    ),
    # Names.
    "user-with-space": Case(
        pack(connect_body("bad user"), size=MAX_DATAGRAM), ErrorCode.INVALID_NAME, request=7
    ),
    "user-too-long": Case(
        pack(connect_body("x" * (MAX_NAME_CHARS + 1)), size=MAX_DATAGRAM),
        ErrorCode.INVALID_NAME,
        request=7,
    ),
    "user-empty": Case(
        pack(connect_body(""), size=MAX_DATAGRAM), ErrorCode.INVALID_NAME, request=7
    ),
    "user-hash-tag": Case(
        pack(connect_body("{alice}"), size=MAX_DATAGRAM), ErrorCode.INVALID_NAME, request=7
    ),
    "user-not-a-string": Case(
        pack(connect_body(12345), size=MAX_DATAGRAM), ErrorCode.INVALID_NAME, request=7
    ),
    "client-id-with-slash": Case(
        pack(connect_body(client_id="a/b"), size=MAX_DATAGRAM), ErrorCode.INVALID_NAME, request=7
    ),
    "friend-with-newline": Case(
        pack(connect_body(f=["bob", "eve\n"]), size=MAX_DATAGRAM), ErrorCode.INVALID_NAME, request=7
    ),
    # Fields.
    "request-negative": Case(
        pack({**connect_body(), "r": -1}, size=MAX_DATAGRAM), ErrorCode.INVALID_FIELD
    ),
    "request-too-big": Case(
        pack({**connect_body(), "r": 2**32}, size=MAX_DATAGRAM), ErrorCode.INVALID_FIELD
    ),
    "friends-not-a-list": Case(
        pack(connect_body(f="bob"), size=MAX_DATAGRAM), ErrorCode.INVALID_FIELD, request=7
    ),
    "session-15-bytes": Case(
        pack({"v": 1, "t": 3, "s": bytes(15)}, size=80), ErrorCode.INVALID_FIELD
    ),
    "session-as-string": Case(
        pack({"v": 1, "t": 3, "s": "0" * 16}, size=80), ErrorCode.INVALID_FIELD
    ),
    "friends-unknown-op": Case(
        pack({"v": 1, "t": 7, "r": 1, "s": UNKNOWN, "op": 9, "f": []}, size=80),
        ErrorCode.INVALID_FIELD,
        request=1,
    ),
    "friends-add-in-parts": Case(
        pack(
            {
                "v": 1,
                "t": 7,
                "r": 1,
                "s": UNKNOWN,
                "op": int(FriendsOp.ADD),
                "f": [],
                "p": 0,
                "n": 2,
            },
            size=80,
        ),
        ErrorCode.INVALID_FIELD,
        request=1,
    ),
    # Sessions the daemon never issued.
    "ping-unknown-session": Case(encode(Ping(UNKNOWN)), ErrorCode.UNKNOWN_SESSION),
    "snapshot-unknown-session": Case(
        encode(SnapshotRequest(5, UNKNOWN)), ErrorCode.UNKNOWN_SESSION, request=5
    ),
    "friends-unknown-session": Case(
        pack({"v": 1, "t": 7, "r": 5, "s": UNKNOWN, "op": int(FriendsOp.SET), "f": ["bob"]}),
        ErrorCode.UNKNOWN_SESSION,
        request=5,
    ),
    "disconnect-unknown-session": Case(encode(Disconnect(5, UNKNOWN)), DisconnectOk, request=5),
    # Messages only a daemon sends: never answered (answering them invites loops).
    "pong": Case(encode(Pong(3)), None),
    "error": Case(encode(Error(5, ErrorCode.MALFORMED)), None),
    "connect-ok": Case(padded(ConnectOk(5, UNKNOWN, 200, 600, 0, (), True)), None),
    "snapshot": Case(encode(Snapshot(5, 0, 1, 0, ())), None),
    "notify": Case(encode(Notify(1, FriendState("bob", True, 3))), None),
}


async def state_keys(redis_client: redis.asyncio.Redis, daemon: DaemonProcess) -> list[str]:
    """Every key in Redis except the daemon's own registration (lease, marker, the owners
    set), which it writes back by itself whenever a renewal finds it gone: the module's
    daemon outlives the FLUSHALL before each test, so those keys may or may not be there,
    depending on when its once-a-second renewal fell."""
    own = {keys.OWNERS_KEY, keys.lease_key(daemon.instance_id), keys.marker_key(daemon.instance_id)}
    return sorted({str(key) for key in await redis_client.keys("*")} - own)


async def exchange(peer: RawPeer, datagram: bytes) -> list[bytes]:
    """Send ``datagram``; return every datagram the daemon answered it with."""
    peer.send(datagram)
    return await peer.barrier()


async def assert_still_serves(peer: RawPeer) -> None:
    """A well-behaved client still connects, pings and leaves."""
    reply = await peer.connect("honest", "honest-1")
    pong, before = await peer.ping()
    # Nothing was sent to it, but its number may have moved on: the module's daemon
    # outlives each test's FLUSHALL, and when its renewal finds the lease gone it makes
    # every session it holds see a gap (and fetch a snapshot).
    assert before == []
    assert pong.seq >= reply.seq
    await peer.disconnect()


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_datagram_is_refused_without_amplification(
    name: str, peer: RawPeer, daemon: DaemonProcess, redis_client: redis.asyncio.Redis
) -> None:
    case = CASES[name]
    answers = await exchange(peer, case.datagram)

    assert len(answers) <= 1, answers
    for answer in answers:
        assert len(answer) <= len(case.datagram), "answer larger than the datagram"
    if case.reply is None:
        assert answers == []
    elif answers:
        msg = decode(answers[0])
        if isinstance(case.reply, ErrorCode):
            assert isinstance(msg, Error)
            assert msg.code is case.reply
        else:
            assert type(msg) is case.reply
        assert getattr(msg, "request", None) == case.request
    else:
        assert not case.required, "no answer where one fits"

    assert await state_keys(redis_client, daemon) == []
    assert daemon.running
    await assert_still_serves(peer)


async def test_random_datagrams_never_crash_or_amplify(
    peer: RawPeer, daemon: DaemonProcess, redis_client: redis.asyncio.Redis
) -> None:
    rng = random.Random(20240607)
    decode_codes = {
        ErrorCode.MALFORMED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.INVALID_FIELD,
        ErrorCode.INVALID_NAME,
        ErrorCode.TOO_LARGE,
        ErrorCode.UNKNOWN_SESSION,
    }
    # No valid name among the values: nothing may reach Redis.
    values: list[Any] = [None, True, -1, 0, 1, 2**40, "", "x" * 70, b"", UNKNOWN, [], {}, ["a b"]]
    for _ in range(150):
        if rng.random() < 0.5:
            datagram = rng.randbytes(rng.choice([1, 2, 8, 40, 300, 1199, 1250]))
        else:
            body: dict[str, Any] = {"v": 1, "t": rng.randint(0, 13)}
            for key in rng.sample(["r", "s", "c", "u", "f", "op", "p", "n", "q", "e"], 4):
                body[key] = rng.choice(values)
            datagram = pack(body, size=rng.choice([0, 100, MAX_DATAGRAM]))
        for answer in await exchange(peer, datagram):
            assert len(answer) <= len(datagram), (datagram, answer)
            msg = decode(answer)
            assert isinstance(msg, Error | DisconnectOk), (datagram, msg)
            if isinstance(msg, Error):
                assert msg.code in decode_codes, (datagram, msg)
    assert await state_keys(redis_client, daemon) == []
    assert daemon.running
    await assert_still_serves(peer)


async def test_small_connect_gets_a_cut_connect_ok_no_larger_than_itself(
    peer: RawPeer, redis_url: str
) -> None:
    friends = [f"fr{i:02d}" for i in range(40)]
    library = Presence.from_url(redis_url)
    try:
        await library.start()
        for name in friends:  # each friend lists the hub: all mutual
            await library.set_friends(name, ["hub"])
    finally:
        await library.close()

    # Not padded: the daemon may not answer with more bytes than this.
    connect = encode(Connect(9, "hub-1", "hub", tuple(friends)))
    assert len(connect) < 400
    peer.send(connect)
    answer = await peer.recv_bytes()  # connects are queued: wait for the answer itself
    assert len(answer) <= len(connect)
    reply = decode(answer)
    assert isinstance(reply, ConnectOk)
    assert reply.request == 9
    assert not reply.complete
    assert len(reply.friends) < len(friends)

    # Once the address is verified, a snapshot carries the whole list.
    peer.session = reply.session
    await peer.ping()
    request = peer.next_request()
    peer.send(SnapshotRequest(request, reply.session))
    snapshot, _ = await peer.recv_until(Snapshot, request=request)
    assert snapshot.parts == 1
    assert sorted(state.name for state in snapshot.friends) == friends
    await peer.disconnect()


async def test_tiny_unpadded_connect_is_dropped_unanswered(
    peer: RawPeer, redis_client: redis.asyncio.Redis
) -> None:
    connect = encode(Connect(9, "t-1", "tiny"))
    assert len(connect) < MIN_CONNECT_SIZE
    peer.send(connect)
    # Then a padded connect of the same client id for another user: it is queued behind
    # the first (same client id), so had the tiny one opened a session, this one would
    # be refused with CLIENT_ID_IN_USE; and anything answered to the tiny one would
    # arrive first.
    peer.send(Connect(10, "t-1", "other"), pad_to=MAX_DATAGRAM)
    reply, before = await peer.recv_until(ConnectOk, request=10)
    assert before == []  # a CONNECT_OK would not fit in the tiny datagram: none at all
    assert await redis_client.exists(keys.clients_key("tiny")) == 0
    peer.session = reply.session
    await peer.disconnect()


# ---------------------------------------------------------------------------
# Regressions found in review.


async def test_session_token_from_another_address_changes_nothing(
    daemon: DaemonProcess, peer: RawPeer, redis_url: str
) -> None:
    # Regression: a token sent from any (spoofable) source re-targeted the session and
    # marked that address verified, so a 31-byte SNAPSHOT_REQUEST sent the whole friend
    # list (and every later notification) to a third party.
    friends = [f"amp-friend-{i:02d}-".ljust(60, "x") for i in range(15)]
    library = Presence.from_url(redis_url)
    await library.start()
    try:
        # The module's daemon outlived this test's FLUSHALL: once its renewal finds the
        # lease gone it makes every session it holds see a gap (seq + 1). Let that pass
        # before the session whose numbers this test checks exists.
        lease = keys.lease_key(daemon.instance_id)

        async def registered() -> bool:
            return bool(await library.redis.exists(lease))

        await wait_for(registered, what="the daemon registered again")
        await library.set_friends("pal", ["amp"])
        reply = await peer.connect("amp", "amp-1", ["pal", *friends])
        assert reply.complete
        await peer.ping()
        assert peer.session is not None
        owner = peer.session
        async with await RawPeer.open(daemon.address) as other:
            for message in (Ping(owner), SnapshotRequest(other.next_request(), owner)):
                sent = other.send(message)
                answers = await other.barrier()
                # At most an UNKNOWN_SESSION error, no larger than what was sent.
                assert len(answers) <= 1, answers
                for answer in answers:
                    assert len(answer) <= sent, (message, decode(answer))
                    error = decode(answer)
                    assert isinstance(error, Error), (message, error)
                    assert error.code is ErrorCode.UNKNOWN_SESSION
                    assert error.request == getattr(message, "request", 0)
                # The session still answers at its own address, and only there.
                pong, before = await peer.ping()
                assert (pong.seq, before) == (0, [])

            # Notifications still go to the session's address, not to the other one.
            async with await RawPeer.open(daemon.address) as pal:
                await pal.connect("pal", "pal-1", ["amp"])
                notify, _ = await peer.recv_until(Notify)
                assert (notify.seq, notify.friend.name, notify.friend.online) == (1, "pal", True)
                await pal.disconnect()
            notify, _ = await peer.recv_until(Notify)
            assert (notify.seq, notify.friend.name, notify.friend.online) == (2, "pal", False)
            assert await other.barrier() == []
        address = "{}:{}".format(*peer.local_address)
        assert await library.clients("amp") == {"amp-1": ("hostile", address)}
        await peer.disconnect()
    finally:
        await library.close()


async def test_long_first_friend_name_still_gets_a_connect_ok(
    peer: RawPeer, redis_client: redis.asyncio.Redis
) -> None:
    # Regression: no friend state fits in a reply no larger than this unpadded connect,
    # and the whole CONNECT_OK was withheld although the user was online.
    connect = encode(Connect(9, "cut-1", "cutter", ("界" * MAX_NAME_CHARS,)))
    assert MIN_CONNECT_SIZE <= len(connect) < MAX_DATAGRAM
    peer.send(connect)
    reply, before = await peer.recv_until(ConnectOk, request=9)
    assert before == []
    assert len(encode(reply)) <= len(connect)
    assert not reply.complete
    assert reply.friends == ()
    assert await redis_client.exists(keys.clients_key("cutter")) == 1
    peer.session = reply.session
    await peer.ping()
    await peer.disconnect()
    assert await redis_client.exists(keys.clients_key("cutter")) == 0
