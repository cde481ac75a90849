"""Pure tests of the wire codec (presence_client.protocol): no sockets, no Redis."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from presence_client.protocol import (
    MAX_DATAGRAM,
    MAX_NAME_CHARS,
    MAX_PARTS,
    MAX_REQUEST_ID,
    PING_PREFIX,
    PING_SIZE,
    PONGS_KEPT,
    PROTOCOL_VERSION,
    SESSION_BYTES,
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
    GoAwayReason,
    Message,
    MessageType,
    Notify,
    Ping,
    Pong,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    check_name,
    decode,
    encode,
    encode_pong,
    is_valid_name,
    overhead,
    ping_session,
    split_friend_states,
    split_names,
)
from presence_daemon.presence import DEFAULT_MAX_FRIENDS

SESSION = bytes(range(SESSION_BYTES))
LONG_NAME = "n" * MAX_NAME_CHARS
UNICODE_NAMES = ("Zoë", "用户名", "Ωmega_1", "ñandú.@+-", "é" * MAX_NAME_CHARS)

# ---------------------------------------------------------------------------
# Round trips: encode -> decode gives back an equal message.

ROUND_TRIPS: list[Message] = [
    Connect(request=1, client_id="c1", user="alice"),
    Connect(request=MAX_REQUEST_ID, client_id="用户名", user="Zoë", friends=()),
    Connect(request=7, client_id="dev-1", user="bob", friends=UNICODE_NAMES, auth=b"\x00tok"),
    Connect(request=8, client_id=LONG_NAME, user=LONG_NAME, friends=(LONG_NAME,), auth=b""),
    ConnectOk(
        request=1,
        session=SESSION,
        ping_interval_ms=15_000,
        timeout_ms=45_000,
        seq=0,
        friends=(),
        complete=True,
    ),
    ConnectOk(
        request=MAX_REQUEST_ID,
        session=SESSION,
        ping_interval_ms=1,
        timeout_ms=2**40,
        seq=2**63 - 1,
        friends=(FriendState("Zoë", True, 3), FriendState("bob", False, 0)),
        complete=False,
    ),
    Ping(session=SESSION),
    Pong(seq=0),
    Pong(seq=2**63 - 1),
    Disconnect(request=42, session=SESSION),
    DisconnectOk(request=42),
    Friends(request=3, session=SESSION, op=FriendsOp.ADD, names=("a", "用户名")),
    Friends(request=3, session=SESSION, op=FriendsOp.REMOVE, names=()),
    Friends(request=4, session=SESSION, op=FriendsOp.SET, names=()),
    Friends(request=4, session=SESSION, op=FriendsOp.SET, names=("x",), part=2, parts=3),
    Friends(request=4, session=SESSION, op=FriendsOp.SET, names=("y",), part=63, parts=MAX_PARTS),
    FriendsOk(request=MAX_REQUEST_ID),
    SnapshotRequest(request=5, session=SESSION),
    Snapshot(request=5, part=0, parts=1, seq=9, friends=()),
    Snapshot(
        request=5,
        part=3,
        parts=4,
        seq=9,
        friends=(FriendState("Ωmega_1", True, 2**40), FriendState(LONG_NAME, False, 1)),
    ),
    Notify(seq=1, friend=FriendState("Zoë", True, 17)),
    Notify(seq=2, friend=FriendState("bob", False, 0)),
    *(Error(request=6, code=code) for code in ErrorCode),
    Error(request=0, code=ErrorCode.TRY_AGAIN),
    *(GoAway(session=SESSION, reason=reason) for reason in GoAwayReason),
    # A reason this side does not know yet still decodes (a client treats it as SHUTDOWN).
    GoAway(session=bytes(SESSION_BYTES), reason=255),
]


@pytest.mark.parametrize("msg", ROUND_TRIPS, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert len(data) <= MAX_DATAGRAM
    decoded = decode(data)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert decode(data).TYPE is msg.TYPE


def test_every_message_type_has_a_round_trip() -> None:
    assert {m.TYPE for m in ROUND_TRIPS} == set(MessageType)


@pytest.mark.parametrize("msg", ROUND_TRIPS[:8], ids=lambda m: type(m).__name__)
def test_pad_to_max_datagram_is_exact_and_decodes(msg: Message) -> None:
    data = encode(msg, pad_to=MAX_DATAGRAM)
    assert len(data) == MAX_DATAGRAM
    assert decode(data) == msg


def test_pad_to_every_reachable_size() -> None:
    msg = Connect(request=1, client_id="c", user="u")
    base = len(encode(msg))
    # "pad" (4 bytes) + a bin8 value spans gaps of 6..261 bytes, "pad" + bin16 gaps of
    # 263 and up; only a gap of exactly 262 bytes has no exact filler.
    for size in range(base + 6, MAX_DATAGRAM + 1):
        data = encode(msg, pad_to=size)
        if size - base == 262:
            assert len(data) == size - 1
        else:
            assert len(data) == size, size
        assert decode(data) == msg
    # Shorter gaps cannot be filled exactly, but never overshoot.
    for size in range(base, base + 6):
        data = encode(msg, pad_to=size)
        assert base <= len(data) <= size
        assert decode(data) == msg
    # A target below the natural size leaves the message alone.
    assert encode(msg, pad_to=1) == encode(msg)


def test_go_away_wire_keys_and_values() -> None:
    assert int(MessageType.GO_AWAY) == 13
    assert (int(GoAwayReason.SHUTDOWN), int(GoAwayReason.STATE_LOST)) == (1, 2)
    body = msgpack.unpackb(encode(GoAway(SESSION, GoAwayReason.STATE_LOST)), raw=False)
    assert body == {"v": PROTOCOL_VERSION, "t": 13, "s": SESSION, "w": 2}
    decoded = decode(_pack(_T.GO_AWAY, s=SESSION, w=1))
    assert decoded == GoAway(SESSION, GoAwayReason.SHUTDOWN)
    assert isinstance(decoded, GoAway) and decoded.reason == GoAwayReason.SHUTDOWN


def test_unknown_keys_are_ignored() -> None:
    body = {"v": 1, "t": int(MessageType.PONG), "q": 4, "zz": [1, 2], 7: "x"}
    assert decode(msgpack.packb(body)) == Pong(seq=4)


def test_error_without_request_decodes_as_request_zero() -> None:
    body = {"v": 1, "t": int(MessageType.ERROR), "e": int(ErrorCode.TRY_AGAIN)}
    assert decode(msgpack.packb(body)) == Error(request=0, code=ErrorCode.TRY_AGAIN)


# ---------------------------------------------------------------------------
# Malformed input: each case with the exact ErrorCode it must raise.

_T = MessageType


def _body(t: MessageType, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "t": int(t), **fields}


def _pack(t: MessageType, **fields: Any) -> bytes:
    return bytes(msgpack.packb(_body(t, **fields), use_bin_type=True))


def _without(t: MessageType, key: str, **fields: Any) -> bytes:
    body = _body(t, **fields)
    del body[key]
    return bytes(msgpack.packb(body, use_bin_type=True))


_CONNECT: dict[str, Any] = {"r": 1, "c": "c1", "u": "alice"}
_CONNECT_OK: dict[str, Any] = {
    "r": 1,
    "s": SESSION,
    "pi": 100,
    "to": 300,
    "q": 0,
    "f": [],
    "done": True,
}
_FRIENDS: dict[str, Any] = {"r": 1, "s": SESSION, "op": 1, "f": ["b"]}
_SNAPSHOT: dict[str, Any] = {"r": 1, "p": 0, "n": 1, "q": 0, "f": []}
_GO_AWAY: dict[str, Any] = {"s": SESSION, "w": int(GoAwayReason.SHUTDOWN)}
_VALID = _pack(_T.CONNECT, **_CONNECT)

BAD_NAMES = [
    "",
    "a" * (MAX_NAME_CHARS + 1),
    "a{b",
    "a}b",
    "{tag}",
    "a|b",
    "a b",
    " a",
    "a\x00b",
    "a\tb",
    "abc\n",
    "a\x7fb",
    "a:b",
    "a/b",
    "a\u200bb",
]

MALFORMED: list[tuple[str, bytes, ErrorCode]] = [
    # not msgpack / not one map
    ("empty", b"", ErrorCode.MALFORMED),
    ("reserved-byte", b"\xc1", ErrorCode.MALFORMED),
    ("text", b"hello, world", ErrorCode.MALFORMED),
    ("truncated", _VALID[:-3], ErrorCode.MALFORMED),
    ("truncated-header", b"\xde\x00", ErrorCode.MALFORMED),
    ("trailing-byte", _VALID + b"\x00", ErrorCode.MALFORMED),
    ("two-maps", _VALID + _VALID, ErrorCode.MALFORMED),
    ("array", msgpack.packb([1, 1, "c1"]), ErrorCode.MALFORMED),
    ("int", msgpack.packb(1), ErrorCode.MALFORMED),
    ("nil", msgpack.packb(None), ErrorCode.MALFORMED),
    ("str", msgpack.packb("v"), ErrorCode.MALFORMED),
    ("bin", msgpack.packb(b"\x81\xa1v\x01", use_bin_type=True), ErrorCode.MALFORMED),
    # an array as a key is ignored, as any key that is not a string (issue 14): what is
    # left is a map without v
    ("unhashable-key", b"\x81\x91\x01\x01", ErrorCode.UNSUPPORTED_VERSION),
    # too large, whatever the content
    ("too-large-junk", b"\xc1" * (MAX_DATAGRAM + 1), ErrorCode.TOO_LARGE),
    (
        "too-large-connect",
        encode(Connect(1, "c1", "alice"), pad_to=MAX_DATAGRAM + 1),
        ErrorCode.TOO_LARGE,
    ),
    # version
    ("no-v", msgpack.packb({"t": 3, "s": SESSION}), ErrorCode.UNSUPPORTED_VERSION),
    ("v-2", msgpack.packb({"v": 2, "t": 4, "q": 0}), ErrorCode.UNSUPPORTED_VERSION),
    ("v-0", msgpack.packb({"v": 0, "t": 4, "q": 0}), ErrorCode.UNSUPPORTED_VERSION),
    ("v-true", msgpack.packb({"v": True, "t": 4, "q": 0}), ErrorCode.UNSUPPORTED_VERSION),
    ("v-float", msgpack.packb({"v": 1.0, "t": 4, "q": 0}), ErrorCode.UNSUPPORTED_VERSION),
    ("v-str", msgpack.packb({"v": "1", "t": 4, "q": 0}), ErrorCode.UNSUPPORTED_VERSION),
    ("v-nil", msgpack.packb({"v": None, "t": 4, "q": 0}), ErrorCode.UNSUPPORTED_VERSION),
    # type
    ("no-t", msgpack.packb({"v": 1, "q": 0}), ErrorCode.UNKNOWN_TYPE),
    ("t-0", msgpack.packb({"v": 1, "t": 0}), ErrorCode.UNKNOWN_TYPE),
    ("t-14", msgpack.packb({"v": 1, "t": 14}), ErrorCode.UNKNOWN_TYPE),
    ("t-neg", msgpack.packb({"v": 1, "t": -4, "q": 0}), ErrorCode.UNKNOWN_TYPE),
    ("t-true", msgpack.packb({"v": 1, "t": True, "s": SESSION}), ErrorCode.UNKNOWN_TYPE),
    ("t-str", msgpack.packb({"v": 1, "t": "4", "q": 0}), ErrorCode.UNKNOWN_TYPE),
    ("t-float", msgpack.packb({"v": 1, "t": 4.0, "q": 0}), ErrorCode.UNKNOWN_TYPE),
    # missing required keys
    *(
        (f"connect-no-{k}", _without(_T.CONNECT, k, **_CONNECT), ErrorCode.INVALID_FIELD)
        for k in _CONNECT
    ),
    *(
        (f"connect-ok-no-{k}", _without(_T.CONNECT_OK, k, **_CONNECT_OK), ErrorCode.INVALID_FIELD)
        for k in _CONNECT_OK
    ),
    *(
        (f"friends-no-{k}", _without(_T.FRIENDS, k, **_FRIENDS), ErrorCode.INVALID_FIELD)
        for k in _FRIENDS
    ),
    *(
        (f"snapshot-no-{k}", _without(_T.SNAPSHOT, k, **_SNAPSHOT), ErrorCode.INVALID_FIELD)
        for k in ("r", "q", "f")
    ),
    ("ping-no-s", _pack(_T.PING), ErrorCode.INVALID_FIELD),
    ("pong-no-q", _pack(_T.PONG), ErrorCode.INVALID_FIELD),
    ("disconnect-no-r", _pack(_T.DISCONNECT, s=SESSION), ErrorCode.INVALID_FIELD),
    ("disconnect-no-s", _pack(_T.DISCONNECT, r=1), ErrorCode.INVALID_FIELD),
    ("disconnect-ok-no-r", _pack(_T.DISCONNECT_OK), ErrorCode.INVALID_FIELD),
    ("friends-ok-no-r", _pack(_T.FRIENDS_OK), ErrorCode.INVALID_FIELD),
    ("snapshot-request-no-s", _pack(_T.SNAPSHOT_REQUEST, r=1), ErrorCode.INVALID_FIELD),
    ("snapshot-request-no-r", _pack(_T.SNAPSHOT_REQUEST, s=SESSION), ErrorCode.INVALID_FIELD),
    ("notify-no-f", _pack(_T.NOTIFY, q=1), ErrorCode.INVALID_FIELD),
    ("notify-no-q", _pack(_T.NOTIFY, f=["a", True, 1]), ErrorCode.INVALID_FIELD),
    ("error-no-e", _pack(_T.ERROR, r=1), ErrorCode.INVALID_FIELD),
    *(
        (f"go-away-no-{k}", _without(_T.GO_AWAY, k, **_GO_AWAY), ErrorCode.INVALID_FIELD)
        for k in _GO_AWAY
    ),
    ("go-away-empty", _pack(_T.GO_AWAY), ErrorCode.INVALID_FIELD),
    ("nil-request", _pack(_T.FRIENDS_OK, r=None), ErrorCode.INVALID_FIELD),
    # wrong types and ranges
    ("request-bool", _pack(_T.FRIENDS_OK, r=True), ErrorCode.INVALID_FIELD),
    ("request-negative", _pack(_T.FRIENDS_OK, r=-1), ErrorCode.INVALID_FIELD),
    ("request-too-big", _pack(_T.FRIENDS_OK, r=MAX_REQUEST_ID + 1), ErrorCode.INVALID_FIELD),
    ("request-str", _pack(_T.FRIENDS_OK, r="1"), ErrorCode.INVALID_FIELD),
    ("request-float", _pack(_T.FRIENDS_OK, r=1.0), ErrorCode.INVALID_FIELD),
    ("seq-negative", _pack(_T.PONG, q=-1), ErrorCode.INVALID_FIELD),
    ("seq-bool", _pack(_T.PONG, q=False), ErrorCode.INVALID_FIELD),
    ("seq-too-big", _pack(_T.PONG, q=2**64 - 1), ErrorCode.INVALID_FIELD),
    ("session-str", _pack(_T.PING, s="x" * SESSION_BYTES), ErrorCode.INVALID_FIELD),
    ("session-short", _pack(_T.PING, s=SESSION[:-1]), ErrorCode.INVALID_FIELD),
    ("session-long", _pack(_T.PING, s=SESSION + b"\x00"), ErrorCode.INVALID_FIELD),
    ("session-empty", _pack(_T.PING, s=b""), ErrorCode.INVALID_FIELD),
    ("session-list", _pack(_T.PING, s=list(SESSION)), ErrorCode.INVALID_FIELD),
    *(
        (
            f"go-away-session-{n}",
            _pack(_T.GO_AWAY, **{**_GO_AWAY, "s": bad}),
            ErrorCode.INVALID_FIELD,
        )
        for n, bad in (
            ("short", SESSION[:-1]),
            ("long", SESSION + b"\x00"),
            ("empty", b""),
            ("str", "x" * SESSION_BYTES),
            ("nil", None),
        )
    ),
    *(
        (
            f"go-away-reason-{w!r}",
            _pack(_T.GO_AWAY, **{**_GO_AWAY, "w": w}),
            ErrorCode.INVALID_FIELD,
        )
        for w in (-1, 256, 2**32, True, False, "1", 1.0, None, [1])
    ),
    (
        "ping-interval-float",
        _pack(_T.CONNECT_OK, **{**_CONNECT_OK, "pi": 1.5}),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "timeout-negative",
        _pack(_T.CONNECT_OK, **{**_CONNECT_OK, "to": -1}),
        ErrorCode.INVALID_FIELD,
    ),
    ("done-int", _pack(_T.CONNECT_OK, **{**_CONNECT_OK, "done": 1}), ErrorCode.INVALID_FIELD),
    ("done-nil", _pack(_T.CONNECT_OK, **{**_CONNECT_OK, "done": None}), ErrorCode.INVALID_FIELD),
    ("auth-str", _pack(_T.CONNECT, **_CONNECT, a="token"), ErrorCode.INVALID_FIELD),
    ("auth-int", _pack(_T.CONNECT, **_CONNECT, a=5), ErrorCode.INVALID_FIELD),
    ("connect-friends-str", _pack(_T.CONNECT, **_CONNECT, f="bob"), ErrorCode.INVALID_FIELD),
    ("connect-friends-map", _pack(_T.CONNECT, **_CONNECT, f={"bob": 1}), ErrorCode.INVALID_FIELD),
    ("friends-names-nil", _pack(_T.FRIENDS, **{**_FRIENDS, "f": None}), ErrorCode.INVALID_FIELD),
    ("friends-names-str", _pack(_T.FRIENDS, **{**_FRIENDS, "f": "b"}), ErrorCode.INVALID_FIELD),
    # names that are not strings at all: a field of the wrong type (INVALID_NAME is for
    # a string that breaks the name rules)
    ("client-id-int", _pack(_T.CONNECT, **{**_CONNECT, "c": 5}), ErrorCode.INVALID_FIELD),
    ("user-bytes", _pack(_T.CONNECT, **{**_CONNECT, "u": b"alice"}), ErrorCode.INVALID_FIELD),
    ("friend-name-int", _pack(_T.CONNECT, **_CONNECT, f=["ok", 3]), ErrorCode.INVALID_FIELD),
    ("friend-name-bool", _pack(_T.CONNECT, **_CONNECT, f=[True]), ErrorCode.INVALID_FIELD),
    ("friend-name-nil", _pack(_T.FRIENDS, **{**_FRIENDS, "f": [None]}), ErrorCode.INVALID_FIELD),
    ("user-array", _pack(_T.CONNECT, **{**_CONNECT, "u": ["alice"]}), ErrorCode.INVALID_FIELD),
    # request id 0 is reserved (ERROR uses it for "none")
    ("connect-request-0", _pack(_T.CONNECT, **{**_CONNECT, "r": 0}), ErrorCode.INVALID_FIELD),
    ("friends-request-0", _pack(_T.FRIENDS, **{**_FRIENDS, "r": 0}), ErrorCode.INVALID_FIELD),
    # nested deeper than any value of the protocol (map -> array -> friend state)
    ("nested-4-levels", _pack(_T.CONNECT, **_CONNECT, f=[["a", [1]]]), ErrorCode.MALFORMED),
    ("nested-map-in-state", _pack(_T.NOTIFY, q=1, f=["a", True, [{"x": 1}]]), ErrorCode.MALFORMED),
    ("nested-unknown-key", _pack(_T.PING, s=SESSION, x=[[[1]]]), ErrorCode.MALFORMED),
    # friend states
    ("states-not-list", _pack(_T.CONNECT_OK, **{**_CONNECT_OK, "f": "x"}), ErrorCode.INVALID_FIELD),
    ("states-nil", _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "f": None}), ErrorCode.INVALID_FIELD),
    ("state-map", _pack(_T.NOTIFY, q=1, f={"name": "a"}), ErrorCode.INVALID_FIELD),
    ("state-str", _pack(_T.NOTIFY, q=1, f="a"), ErrorCode.INVALID_FIELD),
    ("state-short", _pack(_T.NOTIFY, q=1, f=["a", True]), ErrorCode.INVALID_FIELD),
    ("state-long", _pack(_T.NOTIFY, q=1, f=["a", True, 1, 0]), ErrorCode.INVALID_FIELD),
    ("state-empty", _pack(_T.NOTIFY, q=1, f=[]), ErrorCode.INVALID_FIELD),
    ("state-online-int", _pack(_T.NOTIFY, q=1, f=["a", 1, 1]), ErrorCode.INVALID_FIELD),
    ("state-online-nil", _pack(_T.NOTIFY, q=1, f=["a", None, 1]), ErrorCode.INVALID_FIELD),
    ("state-version-neg", _pack(_T.NOTIFY, q=1, f=["a", True, -1]), ErrorCode.INVALID_FIELD),
    ("state-version-bool", _pack(_T.NOTIFY, q=1, f=["a", True, True]), ErrorCode.INVALID_FIELD),
    ("state-version-float", _pack(_T.NOTIFY, q=1, f=["a", True, 1.0]), ErrorCode.INVALID_FIELD),
    ("state-version-str", _pack(_T.NOTIFY, q=1, f=["a", True, "1"]), ErrorCode.INVALID_FIELD),
    ("state-name-int", _pack(_T.NOTIFY, q=1, f=[1, True, 1]), ErrorCode.INVALID_FIELD),
    ("state-name-bad", _pack(_T.NOTIFY, q=1, f=["a|b", True, 1]), ErrorCode.INVALID_NAME),
    (
        "snapshot-bad-state",
        _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "f": [["a", True, 1], ["b", True]]}),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "connect-ok-bad-state-name",
        _pack(_T.CONNECT_OK, **{**_CONNECT_OK, "f": [["", False, 1]]}),
        ErrorCode.INVALID_NAME,
    ),
    # friends op
    *(
        (f"op-{op!r}", _pack(_T.FRIENDS, **{**_FRIENDS, "op": op}), ErrorCode.INVALID_FIELD)
        for op in (0, 4, 255, 256, -1, True, "add", 1.0, None)
    ),
    # parts
    (
        "multi-part-add",
        _pack(_T.FRIENDS, **{**_FRIENDS, "op": int(FriendsOp.ADD), "p": 0, "n": 2}),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "multi-part-remove",
        _pack(_T.FRIENDS, **{**_FRIENDS, "op": int(FriendsOp.REMOVE), "p": 1, "n": 2}),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "part-equals-parts",
        _pack(_T.FRIENDS, **{**_FRIENDS, "op": int(FriendsOp.SET), "p": 2, "n": 2}),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "part-above-parts",
        _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "p": 5, "n": 3}),
        ErrorCode.INVALID_FIELD,
    ),
    ("zero-parts", _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "n": 0}), ErrorCode.INVALID_FIELD),
    (
        "part-only-1",
        _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "p": 1, "n": None}),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "too-many-parts",
        _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "n": MAX_PARTS + 1}),
        ErrorCode.INVALID_FIELD,
    ),
    (
        "part-negative",
        _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "p": -1, "n": 2}),
        ErrorCode.INVALID_FIELD,
    ),
    ("parts-bool", _pack(_T.SNAPSHOT, **{**_SNAPSHOT, "p": 0, "n": True}), ErrorCode.INVALID_FIELD),
    # error codes
    *(
        (f"error-code-{e!r}", _pack(_T.ERROR, r=1, e=e), ErrorCode.INVALID_FIELD)
        for e in (0, 7, 99, 255, 256, -1, True, "TRY_AGAIN")
    ),
    ("error-request-bool", _pack(_T.ERROR, r=False, e=1), ErrorCode.INVALID_FIELD),
    # invalid names in every name position
    *(
        (f"user-{i}", _pack(_T.CONNECT, **{**_CONNECT, "u": name}), ErrorCode.INVALID_NAME)
        for i, name in enumerate(BAD_NAMES)
    ),
    *(
        (f"client-id-{i}", _pack(_T.CONNECT, **{**_CONNECT, "c": name}), ErrorCode.INVALID_NAME)
        for i, name in enumerate(BAD_NAMES)
    ),
    *(
        (
            f"connect-friend-{i}",
            _pack(_T.CONNECT, **_CONNECT, f=["ok", name]),
            ErrorCode.INVALID_NAME,
        )
        for i, name in enumerate(BAD_NAMES)
    ),
    *(
        (
            f"friends-name-{i}",
            _pack(_T.FRIENDS, **{**_FRIENDS, "f": [name]}),
            ErrorCode.INVALID_NAME,
        )
        for i, name in enumerate(BAD_NAMES)
    ),
    *(
        (f"notify-name-{i}", _pack(_T.NOTIFY, q=1, f=[name, True, 1]), ErrorCode.INVALID_NAME)
        for i, name in enumerate(BAD_NAMES)
    ),
]


@pytest.mark.parametrize(
    ("data", "code"), [(d, c) for _, d, c in MALFORMED], ids=[n for n, _, _ in MALFORMED]
)
def test_malformed(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code is code


def test_malformed_cases_are_distinct() -> None:
    names = [n for n, _, _ in MALFORMED]
    assert len(names) == len(set(names))
    # Each INVALID_FIELD/INVALID_NAME case differs from a valid datagram only in the
    # broken part: the valid bases themselves decode.
    decode(_VALID)
    decode(_pack(_T.CONNECT_OK, **_CONNECT_OK))
    decode(_pack(_T.FRIENDS, **_FRIENDS))
    decode(_pack(_T.SNAPSHOT, **_SNAPSHOT))
    decode(_pack(_T.NOTIFY, q=1, f=["a", True, 1]))
    decode(_pack(_T.ERROR, r=1, e=1))
    decode(_pack(_T.GO_AWAY, **_GO_AWAY))


def test_a_full_size_datagram_is_accepted() -> None:
    data = encode(Ping(SESSION), pad_to=MAX_DATAGRAM)
    assert len(data) == MAX_DATAGRAM
    assert decode(data) == Ping(SESSION)


# ---------------------------------------------------------------------------
# decode() never raises anything but ProtocolError.

REAL_KEYS = ["v", "t", "r", "s", "c", "u", "f", "a", "pi", "to", "q", "done", "op", "p", "n", "e"]
REAL_KEYS.append("w")  # GO_AWAY's reason

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True),
    st.text(max_size=70),
    st.sampled_from(["alice", "a|b", "", "{x}", LONG_NAME, "用户名"]),
    st.binary(max_size=20),
    st.just(SESSION),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(
            st.one_of(st.sampled_from(REAL_KEYS), st.text(max_size=4), st.integers(-5, 5)),
            children,
            max_size=6,
        ),
    ),
    max_leaves=8,
)
_shallow = st.one_of(_scalars, st.lists(_scalars, max_size=4))
_datagrams = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(PROTOCOL_VERSION), _scalars),
        "t": st.one_of(st.integers(0, len(MessageType) + 1), _scalars),
    },
    optional={key: _shallow for key in REAL_KEYS if key not in ("v", "t")},
)
_names = st.lists(st.sampled_from(["bob", "Zoë", LONG_NAME]), max_size=4)
_states = st.lists(
    st.tuples(st.sampled_from(["bob", "x|y"]), st.booleans(), st.integers(-1, 5)).map(list),
    max_size=3,
)
# Nearly valid datagrams: right version and type, fields of the right kinds, so the
# deep decoder paths run too.
_near_valid = st.fixed_dictionaries(
    {"v": st.just(PROTOCOL_VERSION), "t": st.integers(1, len(MessageType))},
    optional={
        "r": st.integers(-1, MAX_REQUEST_ID + 1),
        "s": st.sampled_from([SESSION, SESSION[:5], "s" * 16]),
        "c": st.sampled_from(["c1", "", "a b"]),
        "u": st.sampled_from(["alice", "用户名", "x" * 65]),
        "f": st.one_of(
            _names, _states, st.tuples(st.just("a"), st.booleans(), st.integers(-1, 3)).map(list)
        ),
        "a": st.one_of(st.binary(max_size=4), st.text(max_size=2)),
        "pi": st.integers(-1, 10),
        "to": st.integers(-1, 10),
        "q": st.integers(-1, 10),
        "done": st.one_of(st.booleans(), st.integers(0, 1)),
        "op": st.integers(0, 4),
        "p": st.integers(-1, 65),
        "n": st.integers(-1, 65),
        "e": st.integers(0, 21),
        "w": st.integers(-1, 256),
    },
)


# Modest example counts keep this fast; no example database is written to the checkout.
FUZZ = settings(max_examples=300, deadline=None, database=None)


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    # Whatever decodes is a real message that encodes again and decodes the same.
    assert decode(encode(msg)) == msg


@FUZZ
@given(st.binary(max_size=MAX_DATAGRAM + 20))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    _decode_or_protocol_error(data)


@FUZZ
@given(_values)
def test_random_msgpack_values_only_raise_protocol_error(value: Any) -> None:
    _decode_or_protocol_error(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(_datagrams)
def test_random_maps_with_real_keys_only_raise_protocol_error(value: dict[str, Any]) -> None:
    _decode_or_protocol_error(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(_near_valid)
def test_nearly_valid_datagrams_only_raise_protocol_error(value: dict[str, Any]) -> None:
    _decode_or_protocol_error(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(st.sampled_from(ROUND_TRIPS), st.integers(0, 2000), st.binary(min_size=1, max_size=3))
def test_corrupted_valid_datagrams_only_raise_protocol_error(
    msg: Message, position: int, junk: bytes
) -> None:
    data = encode(msg)
    i = position % len(data)
    _decode_or_protocol_error(data[:i] + junk + data[i + len(junk) :])
    _decode_or_protocol_error(data[:i])


# ---------------------------------------------------------------------------
# Splitting lists into datagram-sized parts.


def _names_of(length: int, count: int, alphabet: str = "abcdefghij") -> list[str]:
    """``count`` distinct names of exactly ``length`` characters."""
    names = []
    for i in range(count):
        digits = str(i)
        names.append(alphabet[i % len(alphabet)] * (length - len(digits)) + digits)
    return names


NAME_LISTS: list[tuple[str, list[str]]] = [
    ("empty", []),
    ("one", ["bob"]),
    ("1000x64-ascii", _names_of(MAX_NAME_CHARS, 1000)),
    ("300x64-cjk", _names_of(MAX_NAME_CHARS, 300, "用户名字")),
    ("200x64-4byte", _names_of(MAX_NAME_CHARS, 200, "\U00010400\U00010401")),
    (
        "mixed",
        [n for i, n in enumerate(_names_of(MAX_NAME_CHARS, 400)) if i % 3] + ["a", "Zoë"] * 50,
    ),
]


@pytest.mark.parametrize("names", [n for _, n in NAME_LISTS], ids=[i for i, _ in NAME_LISTS])
def test_split_names_fits_and_keeps_order(names: list[str]) -> None:
    assert all(is_valid_name(n) for n in names)
    # Worst case for the fixed fields: the largest request id and a multi-part header.
    empty = Friends(MAX_REQUEST_ID, SESSION, FriendsOp.SET, (), part=MAX_PARTS - 1, parts=MAX_PARTS)
    parts = split_names(names, overhead(empty))
    assert parts and all(isinstance(p, list) for p in parts)
    assert [n for p in parts for n in p] == names
    assert all(p for p in parts) or parts == [[]]
    assert len(parts) <= MAX_PARTS
    for index, part in enumerate(parts):
        msg = Friends(
            MAX_REQUEST_ID, SESSION, FriendsOp.SET, tuple(part), part=index, parts=len(parts)
        )
        data = encode(msg)
        assert len(data) <= MAX_DATAGRAM, (index, len(data))
        assert decode(data) == msg


def test_split_names_1000_long_names_needs_several_parts() -> None:
    names = _names_of(MAX_NAME_CHARS, 1000)
    empty = Friends(MAX_REQUEST_ID, SESSION, FriendsOp.SET, (), part=0, parts=2)
    parts = split_names(names, overhead(empty))
    # 1000 x 66 bytes cannot fit in fewer than 56 datagrams of 1200 bytes.
    assert len(parts) >= (1000 * 66) // MAX_DATAGRAM
    assert len(parts) <= MAX_PARTS
    # Greedy: every part but the last is full enough that the next name would not fit.
    for part, following in itertools.pairwise(parts):
        msg = Friends(MAX_REQUEST_ID, SESSION, FriendsOp.SET, (*part, following[0]), 0, 2)
        assert len(encode(msg)) > MAX_DATAGRAM - 8


def _states_of(names: list[str]) -> list[FriendState]:
    return [FriendState(n, i % 2 == 0, i) for i, n in enumerate(names)]


@pytest.mark.parametrize("names", [n for _, n in NAME_LISTS], ids=[i for i, _ in NAME_LISTS])
def test_split_friend_states_fits_snapshot_and_keeps_order(names: list[str]) -> None:
    states = _states_of(names)
    empty = Snapshot(MAX_REQUEST_ID, 0, 1, 2**63 - 1, ())
    parts = split_friend_states(states, MAX_DATAGRAM - overhead(empty))
    assert [s for p in parts for s in p] == states
    for index, part in enumerate(parts):
        msg = Snapshot(MAX_REQUEST_ID, index, len(parts), 2**63 - 1, tuple(part))
        data = encode(msg)
        assert len(data) <= MAX_DATAGRAM, (index, len(data))
        assert decode(data) == msg


@pytest.mark.parametrize("size", [200, 600, MAX_DATAGRAM])
def test_split_friend_states_fits_connect_ok_budget(size: int) -> None:
    states = _states_of(_names_of(MAX_NAME_CHARS, 120))
    empty = ConnectOk(MAX_REQUEST_ID, SESSION, 2**32, 2**32, 2**63 - 1, (), False)
    budget = size - overhead(empty)
    parts = split_friend_states(states, budget)
    assert [s for p in parts for s in p] == states
    assert len(parts) > 1
    for part in parts:
        data = encode(
            ConnectOk(MAX_REQUEST_ID, SESSION, 2**32, 2**32, 2**63 - 1, tuple(part), False)
        )
        assert len(data) <= size


@pytest.mark.parametrize("alphabet", ["abcdefghij", "\U00010400\U00010401"], ids=["ascii", "4byte"])
def test_a_full_friend_list_of_longest_names_fits_in_max_parts(alphabet: str) -> None:
    names = _names_of(MAX_NAME_CHARS, DEFAULT_MAX_FRIENDS, alphabet)
    empty_friends = Friends(MAX_REQUEST_ID, SESSION, FriendsOp.SET, (), part=0, parts=2)
    name_parts = split_names(names, overhead(empty_friends))
    # Versions are bumped on every change; large ones are legitimate.
    states = [FriendState(n, True, 2**40 + i) for i, n in enumerate(names)]
    empty_snapshot = Snapshot(MAX_REQUEST_ID, 0, 1, 2**40, ())
    state_parts = split_friend_states(states, MAX_DATAGRAM - overhead(empty_snapshot))
    # The decoder refuses a part count above MAX_PARTS, so both must stay within it.
    assert len(name_parts) <= MAX_PARTS
    assert len(state_parts) <= MAX_PARTS


def test_split_of_nothing_is_one_empty_part() -> None:
    assert split_names([], 100) == [[]]
    assert split_friend_states([], 100) == [[]]


# ---------------------------------------------------------------------------
# Name rules.

GOOD_NAMES = ["a", "alice", "A_b.c@d+e-f", "0", LONG_NAME, *UNICODE_NAMES, "x" * MAX_NAME_CHARS]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)
    assert check_name(name, "user name") == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(ProtocolError) as info:
        check_name(name, "user name")
    assert info.value.code is ErrorCode.INVALID_NAME


@pytest.mark.parametrize("value", [None, 5, True, b"alice", ["a"], 1.5, {"a": 1}])
def test_a_name_that_is_not_a_string_is_a_field_of_the_wrong_type(value: object) -> None:
    assert not is_valid_name(value)
    with pytest.raises(ProtocolError) as info:
        check_name(value, "user name")
    assert info.value.code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize(
    ("body", "code", "request_id"),
    [
        ({"v": 2, "t": 1, "r": 9}, ErrorCode.UNSUPPORTED_VERSION, 9),
        ({"v": 1, "t": 99, "r": 9}, ErrorCode.UNKNOWN_TYPE, 9),
        ({"v": 1, "t": 1, "r": 9, "c": "c", "u": "bad user"}, ErrorCode.INVALID_NAME, 9),
        ({"v": 1, "t": 1, "r": -1, "c": "c", "u": "u"}, ErrorCode.INVALID_FIELD, 0),
        ({"v": 1, "t": 1, "r": 2**32, "c": "c", "u": "u"}, ErrorCode.INVALID_FIELD, 0),
        ({"v": 1, "t": 1, "r": True, "c": "c", "u": "u"}, ErrorCode.INVALID_FIELD, 0),
        ({"v": 1, "t": 99}, ErrorCode.UNKNOWN_TYPE, 0),
    ],
)
def test_errors_carry_the_request_id_when_it_is_readable(
    body: dict[str, object], code: ErrorCode, request_id: int
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(msgpack.packb(body))
    assert (info.value.code, info.value.request) == (code, request_id)


# ---------------------------------------------------------------------------
# The PING fast path: ping_session() reads the token without decoding, and is never
# wrong about it: where it answers, decode() gives the same PING; where it does not,
# decode() still decides.

_tokens = st.binary(min_size=SESSION_BYTES, max_size=SESSION_BYTES)


def _ping_variants(token: bytes) -> list[bytes]:
    """Other encodings of the same PING and near misses: none has the layout that
    encode() gives, so the fast path must leave every one to decode()."""
    return [
        msgpack.packb({"s": token, "v": 1, "t": 3}, use_bin_type=True),  # key order
        msgpack.packb({"v": 1, "t": 3, "s": token, "x": 0}, use_bin_type=True),  # extra key
        msgpack.packb({"v": 1, "t": 3, "s": token[:-1]}, use_bin_type=True),  # short token
        msgpack.packb({"v": 1, "t": 3, "s": token + b"\x00"}, use_bin_type=True),
        b"\x83\xa1v\xcc\x01\xa1t\x03\xa1s\xc4\x10" + token,  # v as a uint8: 28 bytes
        b"\x83\xa1v\x01\xa1t\x03\xa1s\xc5\x00\x10" + token,  # s as a bin16
        b"\x83\xa1v\x01\xa1t\x03\xa1s\xb0" + token,  # s as a str of 16 bytes
        b"\x83\xa1v\x01\xa1t\x05\xa1s\xc4\x10" + token,  # a DISCONNECT's type
        encode(Ping(token)) + b"\x00",  # trailing byte
    ]


@FUZZ
@given(_tokens)
def test_every_ping_encode_makes_takes_the_fast_path(token: bytes) -> None:
    data = encode(Ping(token))
    assert len(data) == PING_SIZE and data.startswith(PING_PREFIX)
    assert ping_session(data) == token
    assert decode(data) == Ping(token)


@FUZZ
@given(_tokens)
def test_other_encodings_of_a_ping_are_left_to_the_decoder(token: bytes) -> None:
    for data in _ping_variants(token):
        assert ping_session(data) is None
        _decode_or_protocol_error(data)


@FUZZ
@given(
    _tokens,
    st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete"]), st.integers(0, 40), st.binary(max_size=2)
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_a_mutated_ping_is_read_as_the_decoder_reads_it_or_left_to_it(
    token: bytes, edits: list[tuple[str, int, bytes]]
) -> None:
    data = bytearray(encode(Ping(token)))
    for kind, position, junk in edits:
        i = position % (len(data) + 1)
        if kind == "set":
            data[i : i + len(junk)] = junk
        elif kind == "insert":
            data[i:i] = junk
        else:
            del data[i : i + 1 + len(junk)]
    mutated = bytes(data)
    session = ping_session(mutated)
    if session is not None:
        assert decode(mutated) == Ping(session)
    else:
        _decode_or_protocol_error(mutated)


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_read_as_a_ping_decode_to_that_ping(data: bytes) -> None:
    for candidate in (data, PING_PREFIX + data):
        session = ping_session(candidate)
        if session is not None:
            assert decode(candidate) == Ping(session)


@pytest.mark.parametrize("seq", [0, 1, 127, 128, PONGS_KEPT - 1, PONGS_KEPT, 2**16, 2**40])
def test_pre_encoded_pongs_are_the_encoding_of_pong(seq: int) -> None:
    assert encode_pong(seq) == encode(Pong(seq))
