"""Edge cases of the wire rules (issue 14, decisions 7-9), on raw datagrams against a
real daemon process.

- A map holding the same key twice is MALFORMED (a receiver must not pick one).
- A MALFORMED datagram whose first map is readable echoes that map's ``r`` when it is
  a valid request id (trailing bytes, duplicate keys, nesting too deep), else 0.
- Parts of one multi-part FRIENDS SET (one ``r``) that disagree on ``n`` are refused
  INVALID_FIELD, part by part; the consistent parts still complete the request.
- A datagram of a daemon -> client type is never answered, however broken (wrong
  ``v``, trailing bytes, bad fields), only counted.
- An unknown ``v`` is answered UNSUPPORTED_VERSION with ``vs`` = [1], unless that
  would make the reply larger than the datagram (then without ``vs``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from daemons import DaemonProcess, RawPeer
from presence_client.protocol import (
    DAEMON_TO_CLIENT,
    SUPPORTED_VERSIONS,
    Disconnect,
    Error,
    ErrorCode,
    Friends,
    FriendsOk,
    FriendsOp,
    MessageType,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    decode,
    encode,
)
from presence_daemon.config import Config
from presence_daemon.embedded import EmbeddedRedis
from presence_daemon.presence import Presence
from presence_daemon.server import Server

UNKNOWN = bytes(range(16))


@pytest.fixture(scope="module")
def daemon(redis_server: EmbeddedRedis) -> Iterator[DaemonProcess]:
    with DaemonProcess(redis_server.url, "edges") as process:
        yield process
        assert "Traceback" not in process.stderr(), process.stderr()


@pytest.fixture
def redis_url(redis_url_keeping_daemons: str) -> str:
    """The module's daemon lives across tests: keep its lease (see conftest)."""
    return redis_url_keeping_daemons


@pytest_asyncio.fixture
async def peer(daemon: DaemonProcess, redis_url: str) -> AsyncIterator[RawPeer]:
    async with await RawPeer.open(daemon.address) as raw:
        yield raw


def pack(body: dict[Any, Any], pad: int = 40) -> bytes:
    data: bytes = msgpack.packb({**body, "pad": bytes(pad)}, use_bin_type=True)
    return data


def with_duplicate(body: dict[str, Any], key: str, value: Any) -> bytes:
    """``body`` packed, then ``key`` = ``value`` appended as a second entry for it."""
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    assert 0 < len(body) < 15
    extra: bytes = msgpack.packb(key) + msgpack.packb(value, use_bin_type=True)
    return bytes([0x80 | (len(body) + 1)]) + packed[1:] + extra


async def answer(peer: RawPeer, datagram: bytes) -> list[Error]:
    peer.send(datagram)
    answers = await peer.barrier()
    errors = []
    for data in answers:
        assert len(data) <= len(datagram), "answer larger than the datagram"
        msg = decode(data)
        assert isinstance(msg, Error), msg
        errors.append(msg)
    return errors


# ---------------------------------------------------------------------------
# The codec alone.


def test_duplicate_key_is_malformed_and_echoes_a_unique_request() -> None:
    body = {"v": 1, "t": 5, "r": 7, "s": UNKNOWN}
    with pytest.raises(ProtocolError) as info:
        decode(with_duplicate(body, "s", UNKNOWN))
    assert (info.value.code, info.value.request) == (ErrorCode.MALFORMED, 7)
    with pytest.raises(ProtocolError) as info:
        decode(with_duplicate(body, "r", 7))  # the same value twice is still twice
    assert (info.value.code, info.value.request) == (ErrorCode.MALFORMED, 0)


def test_duplicate_key_in_a_nested_map_is_malformed() -> None:
    nested = b"\x82\xa1x\x01\xa1x\x02"
    head: bytes = msgpack.packb({"v": 1, "t": 5, "r": 9, "s": UNKNOWN}, use_bin_type=True)
    datagram = bytes([head[0] + 1]) + head[1:] + msgpack.packb("ext") + nested
    with pytest.raises(ProtocolError) as info:
        decode(datagram)
    assert (info.value.code, info.value.request) == (ErrorCode.MALFORMED, 9)


def test_keys_equal_only_in_python_are_not_duplicates() -> None:
    # 1, true and 1.0 are three different msgpack keys (all ignored: not strings).
    head: bytes = msgpack.packb({"v": 1, "t": 5, "r": 9, "s": UNKNOWN}, use_bin_type=True)
    datagram = (
        bytes([head[0] + 3])
        + head[1:]
        + b"\x01\x00"
        + b"\xc3\x00"
        + b"\xcb"
        + bytes([0x3F, 0xF0, 0, 0, 0, 0, 0, 0])
        + b"\x00"
    )
    msg = decode(datagram)
    assert msg.TYPE is MessageType.DISCONNECT


@pytest.mark.parametrize("key", [b"\x91\x01", b"\x81\xa1k\x01", b"\x90", b"\xc0", b"\xc4\x01v"])
def test_a_key_of_any_other_type_is_ignored(key: bytes) -> None:
    # An array, a map, nil, a bin: keys that are not strings are ignored like unknown
    # keys, containers included (Python cannot hash them: msgpack's unpackb refuses).
    head: bytes = msgpack.packb({"v": 1, "t": 5, "r": 9, "s": UNKNOWN}, use_bin_type=True)
    datagram = bytes([head[0] + 1]) + head[1:] + key + b"\x01"
    assert decode(datagram) == Disconnect(9, UNKNOWN)


def test_a_container_key_does_not_hide_trailing_bytes() -> None:
    head: bytes = msgpack.packb({"v": 1, "t": 5, "r": 9, "s": UNKNOWN}, use_bin_type=True)
    datagram = bytes([head[0] + 1]) + head[1:] + b"\x91\x01\x01" + b"\x00"
    with pytest.raises(ProtocolError) as info:
        decode(datagram)
    assert (info.value.code, info.value.request) == (ErrorCode.MALFORMED, 9)


def test_a_container_key_still_counts_for_nesting() -> None:
    head: bytes = msgpack.packb({"v": 1, "t": 5, "r": 9, "s": UNKNOWN}, use_bin_type=True)
    datagram = bytes([head[0] + 1]) + head[1:] + b"\x91\x91\x91\x01" + b"\x01"
    with pytest.raises(ProtocolError) as info:
        decode(datagram)
    assert (info.value.code, info.value.request) == (ErrorCode.MALFORMED, 9)


def test_trailing_bytes_echo_a_readable_request() -> None:
    body = {"v": 1, "t": 5, "r": 7, "s": UNKNOWN}
    for tail, request in ((b"\x00", 7), (b"\xc1", 7)):
        with pytest.raises(ProtocolError) as info:
            decode(pack(body) + tail)
        assert (info.value.code, info.value.request) == (ErrorCode.MALFORMED, request)
    for bad_request in (0, -1, 2**32, "7", None):
        with pytest.raises(ProtocolError) as info:
            decode(pack({**body, "r": bad_request}) + b"\x00")
        assert (info.value.code, info.value.request) == (ErrorCode.MALFORMED, 0)


def test_unsupported_version_error_carries_the_versions() -> None:
    error = Error(7, ErrorCode.UNSUPPORTED_VERSION, versions=SUPPORTED_VERSIONS)
    data = encode(error)
    assert msgpack.unpackb(data) == {"v": 1, "t": 12, "r": 7, "e": 2, "vs": [1]}
    assert decode(data) == error
    assert decode(encode(Error(7, ErrorCode.UNSUPPORTED_VERSION))) == Error(
        7, ErrorCode.UNSUPPORTED_VERSION, versions=()
    )


# ---------------------------------------------------------------------------
# The daemon.


async def test_daemon_refuses_duplicate_keys_as_malformed(peer: RawPeer) -> None:
    body = {"v": 1, "t": 9, "r": 7, "s": UNKNOWN, "pad": bytes(40)}
    errors = await answer(peer, with_duplicate(body, "s", bytes(16)))
    assert [(e.code, e.request) for e in errors] == [(ErrorCode.MALFORMED, 7)]
    errors = await answer(peer, with_duplicate(body, "r", 8))
    assert [(e.code, e.request) for e in errors] == [(ErrorCode.MALFORMED, 0)]


async def test_daemon_echoes_request_after_trailing_bytes(peer: RawPeer) -> None:
    datagram = pack({"v": 1, "t": 9, "r": 77, "s": UNKNOWN}) + b"\x00"
    errors = await answer(peer, datagram)
    assert [(e.code, e.request) for e in errors] == [(ErrorCode.MALFORMED, 77)]


def wrong_direction_variants(kind: MessageType) -> dict[str, bytes]:
    return {
        "bare": pack({"v": 1, "t": kind, "r": 5}),
        "wrong-version": pack({"v": 2, "t": kind, "r": 5}),
        "no-version": pack({"t": kind, "r": 5}),
        "trailing": pack({"v": 1, "t": kind, "r": 5}) + b"\x00",
        "duplicate-key": with_duplicate({"v": 1, "t": kind, "r": 5, "pad": bytes(40)}, "r", 6),
        "bad-field": pack({"v": 1, "t": kind, "r": 5, "s": 1, "f": [1, 2], "q": -1}),
        "too-deep": pack({"v": 1, "t": kind, "r": 5, "x": [[[1]]]}),
    }


@pytest.mark.parametrize("kind", sorted(DAEMON_TO_CLIENT))
async def test_daemon_to_client_types_are_never_answered(kind: MessageType, peer: RawPeer) -> None:
    for name, datagram in wrong_direction_variants(kind).items():
        assert await answer(peer, datagram) == [], name


async def test_daemon_to_client_types_are_counted(redis_url: str) -> None:
    sent: list[bytes] = []
    presence = Presence.from_url(redis_url)
    server = Server(Config(), presence, send=lambda data, addr: sent.append(data))
    try:
        datagrams = [d for k in DAEMON_TO_CLIENT for d in wrong_direction_variants(k).values()]
        for datagram in datagrams:
            server.datagram_received(datagram, ("127.0.0.1", 5000))
        assert sent == []
        assert server.counters["dropped_daemon_message"] == len(datagrams) == 8 * 7
    finally:
        await presence.close()


async def test_daemon_answers_unknown_version_with_the_versions_it_speaks(
    peer: RawPeer,
) -> None:
    for version in (0, 2, 200, "1", None):
        datagram = pack({"v": version, "t": 9, "r": 7, "s": UNKNOWN})
        errors = await answer(peer, datagram)
        assert errors == [Error(7, ErrorCode.UNSUPPORTED_VERSION, versions=(1,))], version


async def test_unsupported_version_drops_vs_rather_than_amplify(peer: RawPeer) -> None:
    # 13 bytes: the ERROR without vs is 13, with it 18.
    datagram = msgpack.packb({"v": 2, "t": 3, "r": 7, "x": 1})
    assert len(datagram) == 13
    errors = await answer(peer, datagram)
    assert errors == [Error(7, ErrorCode.UNSUPPORTED_VERSION)]
    datagram = msgpack.packb({"v": 2, "t": 3, "r": 7, "x": "abcdef"})
    assert len(datagram) >= 18
    errors = await answer(peer, datagram)
    assert errors == [Error(7, ErrorCode.UNSUPPORTED_VERSION, versions=(1,))]


async def test_friends_part_with_inconsistent_count_is_invalid_field(peer: RawPeer) -> None:
    await peer.connect("edge-parts", "edge-parts-1")
    await peer.ping()
    assert peer.session is not None
    session = peer.session
    request = peer.next_request()
    peer.send(Friends(request, session, FriendsOp.SET, ("bob",), part=0, parts=2))
    peer.send(Friends(request, session, FriendsOp.SET, ("eve",), part=1, parts=3))
    error, _ = await peer.recv_until(Error, request=request)
    assert error.code is ErrorCode.INVALID_FIELD
    # The consistent part 1 completes the request the first part began.
    peer.send(Friends(request, session, FriendsOp.SET, ("carol",), part=1, parts=2))
    await peer.recv_until(FriendsOk, request=request)
    snapshot_request = peer.next_request()
    peer.send(SnapshotRequest(snapshot_request, session))
    snapshot, _ = await peer.recv_until(Snapshot, request=snapshot_request)
    assert sorted(s.name for s in snapshot.friends) == ["bob", "carol"]
    await peer.disconnect()
