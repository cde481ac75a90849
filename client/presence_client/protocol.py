"""The presence wire protocol: messages, their msgpack encoding, and its errors.

Theory of operation
-------------------
Every datagram is one msgpack map. Two keys are always present: ``v`` (the protocol
version, :data:`PROTOCOL_VERSION`) and ``t`` (the message type, :class:`MessageType`).
The other keys depend on the type and are listed on each message class below; keys a
decoder does not know are ignored, so later versions may add optional keys.

This module is sans-I/O: it imports only the standard library and msgpack, never reads
a clock and never touches a socket. :func:`decode` turns bytes into one of the frozen
message dataclasses or raises :class:`ProtocolError` with an :class:`ErrorCode`;
:func:`encode` turns a message back into bytes. Names (users, client ids, friends) are
validated here, so everything past the codec can trust them.

No datagram is larger than :data:`MAX_DATAGRAM` bytes. Lists that may not fit (a friend
list, a snapshot of friends) travel in parts: :func:`split_names` and
:func:`split_friend_states` cut them so that each encoded part fits.

``docs/protocol.md`` is the normative description; this module implements it.
"""

from __future__ import annotations

import enum
import functools
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar, cast

import msgpack
import precis_i18n
from precis_i18n.bidi import has_rtl
from precis_i18n.derived import CONTEXTJ, CONTEXTO, PVALID, derived_property

PROTOCOL_VERSION: Final = 1
"""Value of the ``v`` key in every datagram this code sends and accepts."""

SUPPORTED_VERSIONS: Final = (PROTOCOL_VERSION,)
"""The versions this code speaks: the ``vs`` key of an UNSUPPORTED_VERSION error."""

MAX_DATAGRAM: Final = 1200
"""Largest datagram either side sends or accepts, in bytes (fits any path's MTU)."""

MIN_CONNECT_SIZE: Final = 128
"""A CONNECT smaller than this is dropped unanswered: no CONNECT_OK would fit in a reply
no larger than it (see MAX_DATAGRAM and address verification). Clients pad CONNECT."""

MAX_NAME_CHARS: Final = 64
"""Longest user name, client id or friend name, in code points."""

SESSION_BYTES: Final = 16
"""Length of a session token (128 bits from a CSPRNG)."""

MAX_PARTS: Final = 256
"""Most parts one multi-part friend list or snapshot may have (1,000 names of 64
four-byte characters need about 230)."""

MAX_REQUEST_ID: Final = 2**32 - 1
"""Request ids are unsigned 32-bit integers chosen by the client."""

MAX_COUNTER: Final = 2**53 - 1
"""Connect numbers (CONNECT ``n``) are unsigned integers exact in a double (Redis's Lua
compares them as numbers)."""

MAX_NESTING: Final = 3
"""Deepest nesting of maps and arrays in a datagram, the outer map counting as 1: the
deepest value the protocol uses is a friend state, map -> array -> [name, online,
version]. Anything deeper is MALFORMED, refused before any field is looked at."""

NAME_PUNCTUATION: Final = "_.@+-"
"""The only ASCII characters in a name besides ASCII letters and digits."""

UNICODE_VERSION: Final = unicodedata.unidata_version
"""The Unicode version the name rules are checked against: Python's own ``unicodedata``
(14.0.0 on Python 3.11), which precis-i18n reads. A code point unassigned in it is
DISALLOWED by PRECIS, so such a name is refused."""

_ASCII_NAME_RE: Final = re.compile(
    rf"[A-Za-z0-9{re.escape(NAME_PUNCTUATION)}]{{1,{MAX_NAME_CHARS}}}"
)
_ASCII_ALLOWED: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" + NAME_PUNCTUATION
)
_USERNAME_PROFILE: Final = precis_i18n.get_profile("UsernameCasePreserved")
_UCD: Final = _USERNAME_PROFILE.base.ucd


class MessageType(enum.IntEnum):
    """The ``t`` key: which message a datagram carries."""

    CONNECT = 1
    CONNECT_OK = 2
    PING = 3
    PONG = 4
    DISCONNECT = 5
    DISCONNECT_OK = 6
    FRIENDS = 7
    FRIENDS_OK = 8
    SNAPSHOT_REQUEST = 9
    SNAPSHOT = 10
    NOTIFY = 11
    ERROR = 12
    GO_AWAY = 13


CLIENT_TO_DAEMON: Final = frozenset(
    {
        MessageType.CONNECT,
        MessageType.PING,
        MessageType.DISCONNECT,
        MessageType.FRIENDS,
        MessageType.SNAPSHOT_REQUEST,
    }
)
"""The message types a daemon accepts. Any other known type arriving at a daemon is
dropped unanswered: answering could make two spoofed daemons bounce errors at each
other."""

DAEMON_TO_CLIENT: Final = frozenset(set(MessageType) - CLIENT_TO_DAEMON)
"""The message types only a daemon sends."""


class ErrorCode(enum.IntEnum):
    """Stable numeric error codes, carried by :class:`Error` replies and ProtocolError."""

    MALFORMED = 1
    """Not a msgpack map, trailing bytes after it, a map holding one key twice, or
    maps and arrays nested deeper than MAX_NESTING."""
    UNSUPPORTED_VERSION = 2
    """The ``v`` key is missing or names a version this side does not speak."""
    UNKNOWN_TYPE = 3
    """The ``t`` key is missing or not a known message type."""
    INVALID_FIELD = 4
    """A required key is missing, or a value has the wrong type or range."""
    TOO_LARGE = 5
    """The datagram is larger than MAX_DATAGRAM."""
    INVALID_NAME = 6
    """A user name, client id or friend name breaks the name rules."""
    UNKNOWN_SESSION = 10
    """The session token is unknown or expired: connect again."""
    CLIENT_ID_IN_USE = 11
    """The client id is connected for another user, or by a live session this CONNECT
    has no proof it may replace (no valid token, no ``ps``): wait for that session's
    timeout, or use another client id."""
    TOO_MANY_FRIENDS = 12
    """The friend list is longer than the daemon allows."""
    UNAUTHORIZED = 13
    """The CONNECT lacks a valid login token for this user (and client id)."""
    FORBIDDEN = 14
    """The daemon does not let clients change friend lists (the application sets them)."""
    STALE = 15
    """The CONNECT's number is older than the client id's last one (a replay)."""
    TRY_AGAIN = 20
    """The daemon is overloaded or cannot reach its store: retry after a backoff."""


RETRYABLE_CODES: Final = frozenset({ErrorCode.TRY_AGAIN})
"""Codes after which the same request may succeed if sent again later."""


class GoAwayReason(enum.IntEnum):
    """Why a daemon asks a client to connect again (the ``w`` key of GO_AWAY).

    A client treats a value it does not know as SHUTDOWN.
    """

    SHUTDOWN = 1
    """The daemon is stopping: connect to another server now, same client id."""
    STATE_LOST = 2
    """The daemon's store lost its data: connect again (the same server is fine) and
    declare the friend list again."""
    KICKED = 3
    """An operator disconnected this client (the session is already gone): do not
    reconnect automatically. (A client older than this reason treats it as SHUTDOWN and
    reconnects: a kick is not a ban.)"""


class FriendsOp(enum.IntEnum):
    """What a :class:`Friends` message does to the user's declared friend list."""

    ADD = 1
    REMOVE = 2
    SET = 3
    """Replace the whole list; may span several parts, applied once all have arrived."""


class ProtocolError(Exception):
    """Raised by :func:`decode` (and by validators) for input that breaks the protocol.

    ``request`` is the datagram's request id when it could be read (so an ERROR reply
    can echo it), else 0. ``kind`` is the datagram's message type when it is a known
    one (a daemon drops, unanswered, anything of a type only daemons send), else None.
    """

    def __init__(self, code: ErrorCode, message: str, request: int = 0) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request = request
        self.kind: MessageType | None = None


def is_valid_name(name: object) -> bool:
    """True if ``name`` is a string usable as a user name, client id or friend name.

    A name is 1 to 64 code points; it equals its own PRECIS enforcement under RFC 8265
    section 3.4, UsernameCasePreserved (so it is already NFC, has no fullwidth forms,
    no spaces, controls, symbols or unassigned code points); and every ASCII character
    in it is a letter, a digit or one of ``_ . @ + -``. Names are case-sensitive and
    never normalized here: a name that enforcement would change is refused (see
    :func:`normalize_name` for user interfaces). ASCII names take a regex fast path.
    """
    if type(name) is not str:
        return False
    if _ASCII_NAME_RE.fullmatch(name) is not None:
        return True
    if not 1 <= len(name) <= MAX_NAME_CHARS or name.isascii():
        return False
    return _is_canonical_username(name)


_CHAR_OK: Final = 0
"""A code point a name may hold that changes nothing by itself: an allowed ASCII
character, or PVALID, left-to-right or neutral."""
_CHAR_BAD: Final = 1
"""A code point no valid name holds: ASCII outside the allowed set, or a PRECIS derived
property other than PVALID and the contextual ones (enforcement either refuses it or
maps it to something else)."""
_CHAR_CHECK: Final = 2
"""A code point that needs the whole name to judge: contextual (CONTEXTJ, CONTEXTO)
or right-to-left (the Bidi Rule)."""


@functools.lru_cache(maxsize=65536)
def _char_class(char: str) -> int:
    if char.isascii():
        return _CHAR_OK if char in _ASCII_ALLOWED else _CHAR_BAD
    kind = derived_property(ord(char), _UCD)[0]
    if kind not in (PVALID, CONTEXTJ, CONTEXTO):
        return _CHAR_BAD
    if kind != PVALID or has_rtl(char, _UCD):
        return _CHAR_CHECK
    return _CHAR_OK


def _is_canonical_username(name: str) -> bool:
    """For a name of 1 to 64 code points: its ASCII characters are allowed and
    ``_USERNAME_PROFILE.enforce(name) == name``, at C speed for most names.

    precis-i18n costs about 3 us per code point (pure Python), which a flood of unique
    non-ASCII names could turn into milliseconds per datagram. So each code point is
    classified once (cached); a name of _CHAR_OK code points only that is NFC is its
    own enforcement (no PVALID code point is changed by width mapping, and without a
    right-to-left one the Bidi Rule does not apply: both checked in
    tests/test_names.py). Only names with a _CHAR_CHECK code point, or not NFC, go
    through full enforcement (cached per name).
    """
    check = False
    for char in name:
        kind = _char_class(char)
        if kind == _CHAR_BAD:
            return False
        if kind == _CHAR_CHECK:
            check = True
    if not check and unicodedata.is_normalized("NFC", name):
        return True
    return _enforcement_keeps(name)


@functools.lru_cache(maxsize=8192)
def _enforcement_keeps(name: str) -> bool:
    """True if PRECIS UsernameCasePreserved enforcement returns ``name`` unchanged."""
    try:
        return _USERNAME_PROFILE.enforce(name) == name
    except UnicodeError:  # precis-i18n reports every refusal as a UnicodeEncodeError
        return False


def check_name(name: object, what: str) -> str:
    """Return ``name`` if valid. A name that is not a string at all raises
    ProtocolError(INVALID_FIELD); a string that breaks the name rules raises
    ProtocolError(INVALID_NAME). Either names ``what``."""
    if type(name) is not str:
        # Never repr() the value: it may be a nested structure from the wire.
        raise ProtocolError(
            ErrorCode.INVALID_FIELD, f"{what} must be a string, not {type(name).__name__}"
        )
    if not is_valid_name(name):
        raise ProtocolError(ErrorCode.INVALID_NAME, f"invalid {what}: {name!r}")
    return name


def normalize_name(text: str) -> str:
    """The canonical form of a name a person typed: PRECIS UsernameCasePreserved
    enforcement (fullwidth to halfwidth, NFC), then the name rules.

    For user interfaces only; the wire carries canonical names and a daemon refuses any
    other. Case is kept (``Alice`` and ``alice`` are two users). Raises
    ProtocolError(INVALID_NAME) naming the value if no valid name results.
    """
    try:
        name = _USERNAME_PROFILE.enforce(text)
    except UnicodeError:
        name = text
    if not is_valid_name(name):
        raise ProtocolError(ErrorCode.INVALID_NAME, f"invalid name: {text!r}")
    return name


@dataclass(frozen=True, slots=True)
class FriendState:
    """What one client knows about one friend; ``[name, online, version]`` on the wire."""

    name: str
    """The friend's user name."""
    online: bool
    """True only if the friend is online *and* the friendship is mutual."""
    version: int
    """The friend's state version; a higher version supersedes a lower one."""

    def to_wire(self) -> list[object]:
        return [self.name, self.online, self.version]


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; ``TYPE`` is the value of the ``t`` key."""

    TYPE: ClassVar[MessageType]


@dataclass(frozen=True, slots=True)
class Connect(Message):
    """Client -> daemon: start (or refresh) a session. Keys ``r c u f a n ps``."""

    TYPE = MessageType.CONNECT
    request: int
    """Client-chosen request id, echoed in the reply."""
    client_id: str
    """Stable id of this client (device, terminal); belongs to one user at a time."""
    user: str
    """The user this client speaks for."""
    friends: tuple[str, ...] | None = None
    """Replace the user's declared friends with these; None keeps the stored list."""
    auth: bytes | None = None
    """Login token issued by the application (a JWT); required by a daemon with auth."""
    counter: int = 0
    """Connect number, strictly increasing per client id (0: none). A CONNECT whose
    number is below the last one seen for the client id, or equal to it once that
    session ended, is a replay and changes nothing."""
    previous: bytes | None = None
    """The session token this client held before (proof that it may replace it)."""


@dataclass(frozen=True, slots=True)
class ConnectOk(Message):
    """Daemon -> client: the session is open. Keys ``r s pi to q f done``."""

    TYPE = MessageType.CONNECT_OK
    request: int
    """The request id of the Connect this answers."""
    session: bytes
    """Session token to put in every later datagram (16 bytes)."""
    ping_interval_ms: int
    """How often the client must ping, in milliseconds."""
    timeout_ms: int
    """After this long without a datagram from the client, the daemon drops it."""
    seq: int
    """The last notification sequence number sent to this client so far."""
    friends: tuple[FriendState, ...]
    """Mutual friends and their status (as many as fit)."""
    complete: bool
    """False if ``friends`` was cut short; the client then sends a SnapshotRequest."""


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Client -> daemon: I am still here. Key ``s``."""

    TYPE = MessageType.PING
    session: bytes
    """The session token from ConnectOk."""


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Daemon -> client: answer to a Ping. Key ``q``."""

    TYPE = MessageType.PONG
    seq: int
    """The last notification sequence number sent to this client; a gap means loss."""


@dataclass(frozen=True, slots=True)
class Disconnect(Message):
    """Client -> daemon: end the session. Keys ``r s``."""

    TYPE = MessageType.DISCONNECT
    request: int
    """Client-chosen request id, echoed in the reply."""
    session: bytes
    """The session token from ConnectOk."""


@dataclass(frozen=True, slots=True)
class DisconnectOk(Message):
    """Daemon -> client: the session is closed (also sent for an unknown session). Key ``r``."""

    TYPE = MessageType.DISCONNECT_OK
    request: int
    """The request id of the Disconnect this answers."""


@dataclass(frozen=True, slots=True)
class Friends(Message):
    """Client -> daemon: change the user's declared friends. Keys ``r s op p n f``."""

    TYPE = MessageType.FRIENDS
    request: int
    """Client-chosen request id; all parts of one SET share it."""
    session: bytes
    """The session token from ConnectOk."""
    op: FriendsOp
    """Add these names, remove them, or replace the whole list (SET)."""
    names: tuple[str, ...]
    """The friend names of this part."""
    part: int = 0
    """Index of this part, from 0."""
    parts: int = 1
    """Number of parts of this request (only SET may have more than one)."""


@dataclass(frozen=True, slots=True)
class FriendsOk(Message):
    """Daemon -> client: the friend change is applied. Key ``r``."""

    TYPE = MessageType.FRIENDS_OK
    request: int
    """The request id of the Friends message this answers."""


@dataclass(frozen=True, slots=True)
class SnapshotRequest(Message):
    """Client -> daemon: send me the state of all my friends. Keys ``r s``."""

    TYPE = MessageType.SNAPSHOT_REQUEST
    request: int
    """Client-chosen request id, echoed in every part of the reply."""
    session: bytes
    """The session token from ConnectOk."""


@dataclass(frozen=True, slots=True)
class Snapshot(Message):
    """Daemon -> client: one part of a snapshot. Keys ``r p n q f``."""

    TYPE = MessageType.SNAPSHOT
    request: int
    """The request id of the SnapshotRequest this answers."""
    part: int
    """Index of this part, from 0."""
    parts: int
    """Number of parts of this snapshot."""
    seq: int
    """Notification sequence number when the snapshot was taken."""
    friends: tuple[FriendState, ...]
    """Every declared friend of the user in this part, with its visible status."""


@dataclass(frozen=True, slots=True)
class Notify(Message):
    """Daemon -> client: a friend's visible status changed. Keys ``q f``."""

    TYPE = MessageType.NOTIFY
    seq: int
    """Per-session sequence number: 1 for the first notification, then +1 each."""
    friend: FriendState
    """The friend and its new visible status."""


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Daemon -> client: the request was refused. Keys ``r e`` and, optionally, ``vs``."""

    TYPE = MessageType.ERROR
    request: int
    """Request id of the refused message, 0 if it had none or could not be read."""
    code: ErrorCode
    """Why; see ErrorCode."""
    versions: tuple[int, ...] = ()
    """With UNSUPPORTED_VERSION, the protocol versions the daemon speaks (``vs``,
    optional: left out when the reply would be larger than the datagram); else empty."""


@dataclass(frozen=True, slots=True)
class GoAway(Message):
    """Daemon -> client: connect again, now. Keys ``s w``."""

    TYPE = MessageType.GO_AWAY
    session: bytes
    """The session this is about (a client ignores a GO_AWAY for another session)."""
    reason: int
    """A GoAwayReason value; an unknown one means SHUTDOWN."""


AnyMessage = (
    Connect
    | ConnectOk
    | Ping
    | Pong
    | Disconnect
    | DisconnectOk
    | Friends
    | FriendsOk
    | SnapshotRequest
    | Snapshot
    | Notify
    | Error
    | GoAway
)

# ---------------------------------------------------------------------------
# Field readers: each raises ProtocolError(INVALID_FIELD) naming the key.

_T = TypeVar("_T")


def _missing(key: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, f"missing key {key!r}")


def _uint(m: dict[Any, Any], key: str, maximum: int = 2**63 - 1) -> int:
    value = m.get(key)
    if value is None:
        raise _missing(key)
    if type(value) is not int or not 0 <= value <= maximum:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"key {key!r} must be an integer")
    return value


def _request(m: dict[Any, Any]) -> int:
    # 0 is reserved: an ERROR carries r = 0 when the request id could not be read.
    request = _uint(m, "r", MAX_REQUEST_ID)
    if request == 0:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "key 'r' must be 1 to 2**32-1 (0 is reserved)")
    return request


def _bool(m: dict[Any, Any], key: str) -> bool:
    value = m.get(key)
    if type(value) is not bool:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"key {key!r} must be a boolean")
    return value


def _session(m: dict[Any, Any]) -> bytes:
    value = m.get("s")
    if value is None:
        raise _missing("s")
    if type(value) is not bytes or len(value) != SESSION_BYTES:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "key 's' must be 16 bytes")
    return value


def _name(m: dict[Any, Any], key: str, what: str) -> str:
    value = m.get(key)
    if value is None:
        raise _missing(key)
    return check_name(value, what)


def _names(value: object, key: str) -> tuple[str, ...]:
    if type(value) is not list:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"key {key!r} must be an array")
    return tuple(check_name(name, "friend name") for name in value)


def _friend_state(value: object) -> FriendState:
    if (
        type(value) is not list
        or len(value) != 3
        or type(value[1]) is not bool
        or type(value[2]) is not int
        or value[2] < 0
    ):
        raise ProtocolError(
            ErrorCode.INVALID_FIELD, "a friend state must be [name, online, version]"
        )
    return FriendState(check_name(value[0], "friend name"), value[1], value[2])


def _friend_states(m: dict[Any, Any], key: str) -> tuple[FriendState, ...]:
    value = m.get(key)
    if type(value) is not list:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"key {key!r} must be an array")
    return tuple(_friend_state(item) for item in value)


def _parts(m: dict[Any, Any]) -> tuple[int, int]:
    part = _uint(m, "p", MAX_PARTS - 1) if "p" in m else 0
    parts = _uint(m, "n", MAX_PARTS) if "n" in m else 1
    if not 0 <= part < parts:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "part must be below the number of parts")
    return part, parts


# ---------------------------------------------------------------------------
# Decoders, one per message type.


def _decode_connect(m: dict[Any, Any]) -> Connect:
    friends_value = m.get("f")
    auth = m.get("a")
    if auth is not None and type(auth) is not bytes:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "key 'a' must be bytes")
    previous = m.get("ps")
    if previous is not None and (type(previous) is not bytes or len(previous) != SESSION_BYTES):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "key 'ps' must be 16 bytes")
    return Connect(
        request=_request(m),
        client_id=_name(m, "c", "client id"),
        user=_name(m, "u", "user name"),
        friends=None if friends_value is None else _names(friends_value, "f"),
        auth=auth,
        counter=_uint(m, "n", MAX_COUNTER) if "n" in m else 0,
        previous=previous,
    )


def _decode_connect_ok(m: dict[Any, Any]) -> ConnectOk:
    return ConnectOk(
        request=_request(m),
        session=_session(m),
        ping_interval_ms=_uint(m, "pi"),
        timeout_ms=_uint(m, "to"),
        seq=_uint(m, "q"),
        friends=_friend_states(m, "f"),
        complete=_bool(m, "done"),
    )


def _decode_friends(m: dict[Any, Any]) -> Friends:
    op_value = _uint(m, "op", 255)
    try:
        op = FriendsOp(op_value)
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"unknown friends op {op_value}") from None
    part, parts = _parts(m)
    if parts > 1 and op is not FriendsOp.SET:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "only a SET may have several parts")
    return Friends(
        request=_request(m),
        session=_session(m),
        op=op,
        names=_names(m.get("f"), "f"),
        part=part,
        parts=parts,
    )


def _decode_snapshot(m: dict[Any, Any]) -> Snapshot:
    part, parts = _parts(m)
    return Snapshot(
        request=_request(m),
        part=part,
        parts=parts,
        seq=_uint(m, "q"),
        friends=_friend_states(m, "f"),
    )


def _decode_error(m: dict[Any, Any]) -> Error:
    code_value = _uint(m, "e", 255)
    try:
        code = ErrorCode(code_value)
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"unknown error code {code_value}") from None
    versions: tuple[int, ...] = ()
    if "vs" in m:
        value = m["vs"]
        if type(value) is not list or not all(
            type(v) is int and 0 <= v <= 2**63 - 1 for v in value
        ):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "key 'vs' must be an array of integers")
        versions = tuple(value)
    return Error(
        request=_uint(m, "r", MAX_REQUEST_ID) if "r" in m else 0, code=code, versions=versions
    )


_DECODERS: Final[dict[int, Callable[[dict[Any, Any]], AnyMessage]]] = {
    MessageType.CONNECT: _decode_connect,
    MessageType.CONNECT_OK: _decode_connect_ok,
    MessageType.PING: lambda m: Ping(session=_session(m)),
    MessageType.PONG: lambda m: Pong(seq=_uint(m, "q")),
    MessageType.DISCONNECT: lambda m: Disconnect(request=_request(m), session=_session(m)),
    MessageType.DISCONNECT_OK: lambda m: DisconnectOk(request=_request(m)),
    MessageType.FRIENDS: _decode_friends,
    MessageType.FRIENDS_OK: lambda m: FriendsOk(request=_request(m)),
    MessageType.SNAPSHOT_REQUEST: lambda m: SnapshotRequest(
        request=_request(m), session=_session(m)
    ),
    MessageType.SNAPSHOT: _decode_snapshot,
    MessageType.NOTIFY: lambda m: Notify(seq=_uint(m, "q"), friend=_friend_state(m.get("f"))),
    MessageType.ERROR: _decode_error,
    MessageType.GO_AWAY: lambda m: GoAway(session=_session(m), reason=_uint(m, "w", 255)),
}


_CONTAINER_TYPES: Final = frozenset((list, dict))


def _too_deep(m: dict[Any, Any]) -> tuple[bool, bool]:
    """Whether a map or array nests more than MAX_NESTING levels deep in ``m``, and
    whether ``m`` holds a map (at any level looked at).

    Iterative (no recursion), and it stops at the first level too many: its cost is
    bounded by the datagram's size, whatever the nesting. Map keys need no look: a key
    that is an array or map cannot be a dict key (such datagrams are read by
    _ignoring_container_keys, which looks at keys too).
    """
    level = [value for value in m.values() if type(value) is list or type(value) is dict]
    has_map = False
    for _ in range(MAX_NESTING - 1):
        if not level:
            return False, has_map
        below: list[Any] = []
        for container in level:
            values: Iterable[Any] = container
            if type(container) is dict:
                has_map = True
                values = container.values()
            for value in values:
                if type(value) is list or type(value) is dict:
                    below.append(value)
        level = below
    return bool(level), has_map


class _Pairs(list[tuple[Any, Any]]):
    """A msgpack map read as its list of (key, value) pairs, duplicates and all."""


def _map_length(data: bytes) -> int:
    """The entry count in the header of the msgpack map ``data`` starts with."""
    first = data[0]
    if first <= 0x8F:
        return first & 0x0F
    width = 2 if first == 0xDE else 4
    return int.from_bytes(data[1 : 1 + width], "big")


def _first_map(data: bytes, *, whole: bool = False) -> _Pairs | None:
    """The first msgpack object of ``data`` if it is a readable map (whatever follows
    it, unless ``whole``), as its pairs; else None."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, object_pairs_hook=_Pairs, max_buffer_size=MAX_DATAGRAM
    )
    try:
        unpacker.feed(data)
        first = unpacker.unpack()
    except Exception:  # anything msgpack refuses: no map to read
        return None
    if whole and unpacker.tell() != len(data):
        raise _malformed(data, "trailing bytes after the map")
    return first if type(first) is _Pairs else None


def _has_duplicate_key(value: object) -> bool:
    """True if a map in ``value`` (maps read as _Pairs) holds one key twice. Keys are
    msgpack values: 1, true and 1.0 are three different keys. Keys that are maps or
    arrays are ignored (as every key that is not a string is) and not compared."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Pairs:
            keys = [(type(key), key) for key, _ in item if not _is_container(key)]
            try:
                if len(set(keys)) != len(keys):
                    return True
            except TypeError:  # unhashable inside an ext value: cannot be compared
                pass
            stack.extend(v for _, v in item if _is_container(v))
        elif type(item) is list:
            stack.extend(v for v in item if _is_container(v))
    return False


def _is_container(value: object) -> bool:
    return type(value) is _Pairs or type(value) is list


def _nests_too_deep(value: object) -> bool:
    """True if maps and arrays (read as _Pairs and lists, keys included) nest more than
    MAX_NESTING levels deep in ``value``. Iterative, stops at the first level too many."""
    level: list[Any] = [value]
    for _ in range(MAX_NESTING):
        below: list[Any] = []
        for item in level:
            for child in itertools.chain.from_iterable(item) if type(item) is _Pairs else item:
                if _is_container(child):
                    below.append(child)
        if not below:
            return False
        level = below
    return True


def _plain(value: Any) -> Any:
    """``value`` read with _Pairs as the decoder's dicts and lists, dropping the map
    entries whose key is a map or an array (only called within MAX_NESTING levels)."""
    if type(value) is _Pairs:
        return {k: _plain(v) for k, v in value if not _is_container(k)}
    if type(value) is list:
        return [_plain(item) for item in value]
    return value


def _ignoring_container_keys(data: bytes) -> dict[Any, Any]:
    """The datagram's map when msgpack's unpackb could not hash a key (a map or an
    array used as a key): such keys are ignored, as every key that is not a string is;
    the nesting and duplicate rules still apply to the whole datagram."""
    first = _first_map(data, whole=True)
    if first is None:
        raise ProtocolError(ErrorCode.MALFORMED, "not msgpack: unhashable key in a non-map")
    if _nests_too_deep(first):
        raise _malformed(data, f"nested deeper than {MAX_NESTING} levels")
    if _has_duplicate_key(first):
        raise _malformed(data, "a map holds the same key twice")
    plain: dict[Any, Any] = _plain(first)
    return plain


def _malformed(data: bytes, message: str) -> ProtocolError:
    """MALFORMED for ``data``, carrying the request id and message type of its first
    map when that map is readable and holds each of ``r`` and ``t`` once (decision:
    an ERROR echoes a valid ``r`` even after trailing bytes), else 0 and None."""
    error = ProtocolError(ErrorCode.MALFORMED, message)
    first = _first_map(data)
    if first is not None:
        request = [v for k, v in first if type(k) is str and k == "r"]
        if len(request) == 1 and type(request[0]) is int and 0 <= request[0] <= MAX_REQUEST_ID:
            error.request = request[0]
        kind = [v for k, v in first if type(k) is str and k == "t"]
        if len(kind) == 1:
            error.kind = _message_type(kind[0])
    return error


def _message_type(value: object) -> MessageType | None:
    if type(value) is not int:
        return None
    try:
        return MessageType(value)
    except ValueError:
        return None


def decode(data: bytes) -> AnyMessage:
    """Decode one datagram.

    Raises ProtocolError with code TOO_LARGE, MALFORMED, UNSUPPORTED_VERSION,
    UNKNOWN_TYPE, INVALID_FIELD or INVALID_NAME; never any other exception. Trailing
    bytes, a map holding one key twice, and a map or array nested deeper than
    MAX_NESTING are MALFORMED, so validation never meets a deep value (msgpack itself
    stops near 1,024 levels; ``repr`` would not) nor has to pick one of two values.

    The error's ``request`` is the datagram's ``r`` when its (first) map holds a valid
    one, else 0; its ``kind`` the message type ``t`` names when it is a known one.
    """
    if len(data) > MAX_DATAGRAM:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(data)} bytes > {MAX_DATAGRAM}")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except msgpack.ExtraData:
        raise _malformed(data, "trailing bytes after the map") from None
    except TypeError:  # a map or array as a key; anything else is the same error again
        m = _ignoring_container_keys(data)
    except Exception as exc:  # msgpack raises several unrelated types; this is the boundary
        raise ProtocolError(ErrorCode.MALFORMED, f"not msgpack: {type(exc).__name__}") from None
    if type(m) is not dict:
        raise ProtocolError(ErrorCode.MALFORMED, "a datagram must be a msgpack map")
    # Most datagrams (every PING) hold no array or map at all: one C-level pass says so.
    too_deep, has_map = False, False
    if not _CONTAINER_TYPES.isdisjoint(map(type, m.values())):
        too_deep, has_map = _too_deep(m)
    # A key given twice collapses in a dict: the header's count says so. Keys in a
    # nested map (rare: the protocol has none) are checked pair by pair.
    if (len(m) != _map_length(data) or has_map) and _has_duplicate_key(_first_map(data)):
        raise _malformed(data, "a map holds the same key twice")
    if too_deep:
        raise _malformed(data, f"nested deeper than {MAX_NESTING} levels")
    request = m.get("r")
    if type(request) is not int or not 0 <= request <= MAX_REQUEST_ID:
        request = 0
    kind = m.get("t")
    if m.get("v") != PROTOCOL_VERSION or type(m.get("v")) is not int:
        error = ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"version {m.get('v')!r}", request)
        error.kind = _message_type(kind)
        raise error
    decoder = _DECODERS.get(kind) if type(kind) is int else None
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"message type {kind!r}", request)
    try:
        return decoder(m)
    except ProtocolError as exc:
        exc.request = request
        exc.kind = MessageType(cast(int, kind))
        raise


# ---------------------------------------------------------------------------
# Encoders.


def _fields(msg: Message) -> dict[str, object]:
    match msg:
        case Connect():
            fields: dict[str, object] = {"r": msg.request, "c": msg.client_id, "u": msg.user}
            if msg.friends is not None:
                fields["f"] = list(msg.friends)
            if msg.auth is not None:
                fields["a"] = msg.auth
            if msg.counter:
                fields["n"] = msg.counter
            if msg.previous is not None:
                fields["ps"] = msg.previous
            return fields
        case ConnectOk():
            return {
                "r": msg.request,
                "s": msg.session,
                "pi": msg.ping_interval_ms,
                "to": msg.timeout_ms,
                "q": msg.seq,
                "f": [f.to_wire() for f in msg.friends],
                "done": msg.complete,
            }
        case Ping():
            return {"s": msg.session}
        case Pong():
            return {"q": msg.seq}
        case Disconnect() | SnapshotRequest():
            return {"r": msg.request, "s": msg.session}
        case DisconnectOk() | FriendsOk():
            return {"r": msg.request}
        case Friends():
            fields = {"r": msg.request, "s": msg.session, "op": int(msg.op), "f": list(msg.names)}
            if msg.parts != 1:
                fields["p"] = msg.part
                fields["n"] = msg.parts
            return fields
        case Snapshot():
            return {
                "r": msg.request,
                "p": msg.part,
                "n": msg.parts,
                "q": msg.seq,
                "f": [f.to_wire() for f in msg.friends],
            }
        case Notify():
            return {"q": msg.seq, "f": msg.friend.to_wire()}
        case Error():
            fields = {"r": msg.request, "e": int(msg.code)}
            if msg.versions:
                fields["vs"] = list(msg.versions)
            return fields
        case GoAway():
            return {"s": msg.session, "w": int(msg.reason)}
    raise TypeError(f"not a protocol message: {msg!r}")


def encode(msg: Message, *, pad_to: int | None = None) -> bytes:
    """Encode ``msg``; with ``pad_to``, add a ``pad`` key so the datagram is that long.

    Clients pad Connect to MAX_DATAGRAM: a daemon never answers an unverified address
    with more bytes than it received, so padding buys a full-size ConnectOk.
    """
    body: dict[str, object] = {"v": PROTOCOL_VERSION, "t": int(msg.TYPE)}
    body.update(_fields(msg))
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if pad_to is not None and len(data) < pad_to:
        # "pad" + a bin header of 1 to 3 bytes; pick the filler length that lands exactly.
        best = data
        for header in (2, 3, 5):
            filler = pad_to - len(data) - 4 - header
            if filler >= 0:
                body["pad"] = bytes(filler)
                padded: bytes = msgpack.packb(body, use_bin_type=True)
                if len(padded) == pad_to:
                    return padded
                if len(best) < len(padded) < pad_to:
                    best = padded
        # Some gaps cannot be filled exactly (very short ones, and the one byte between
        # the largest bin8 and the smallest bin16); a little under is fine.
        return best
    return data


_PONG_PREFIX: Final = msgpack.packb({"v": PROTOCOL_VERSION, "t": int(MessageType.PONG), "q": 0})[
    :-1
]

PONGS_KEPT: Final = 1024
"""How many PONGs are kept encoded (``PONGS``)."""

PONGS: Final = tuple(_PONG_PREFIX + msgpack.packb(seq) for seq in range(PONGS_KEPT))
"""``PONGS[seq] == encode(Pong(seq))`` for the numbers most sessions ever reach: the
daemon answers every ping with one, and a lookup is cheaper than an encoding."""


def encode_pong(seq: int) -> bytes:
    """``encode(Pong(seq))``, faster: the daemon answers every ping with one."""
    if 0 <= seq < PONGS_KEPT:
        return PONGS[seq]
    return _PONG_PREFIX + msgpack.packb(seq)


# ---------------------------------------------------------------------------
# The PING fast path.

PING_PREFIX: Final = encode(Ping(bytes(SESSION_BYTES)))[:-SESSION_BYTES]
"""What every PING that :func:`encode` makes starts with: a map of three keys, ``v`` 1,
``t`` 3 and ``s`` with a bin 8 header of length 16; the token fills the rest."""

PING_TOKEN_AT: Final = len(PING_PREFIX)
"""Where the session token starts in such a PING."""

PING_SIZE: Final = PING_TOKEN_AT + SESSION_BYTES
"""The size of every PING that :func:`encode` makes (27 bytes)."""


def ping_session(data: bytes) -> bytes | None:
    """The session token of ``data`` if it is a PING laid out as :func:`encode` lays it
    out (every PING this package sends), without decoding it; else None.

    Never wrong: ``decode(data) == Ping(ping_session(data))`` whenever the result is not
    None (the prefix fixes every byte but the token's 16, and there is room for nothing
    else). None says nothing: any other layout (keys in another order, an extra key, a
    longer integer encoding) is still a PING for :func:`decode` to judge.
    """
    if len(data) == PING_SIZE and data.startswith(PING_PREFIX):
        return data[PING_TOKEN_AT:]
    return None


# ---------------------------------------------------------------------------
# Splitting lists into parts that fit in one datagram.


def _split(items: Sequence[_T], item_size: Callable[[_T], int], budget: int) -> Iterator[list[_T]]:
    """Greedy cut of ``items`` into runs whose summed sizes (plus 5 for the array header)
    stay within ``budget``. Always yields at least one (possibly empty) run."""
    run: list[_T] = []
    used = 5
    for item in items:
        size = item_size(item)
        if run and used + size > budget:
            yield run
            run, used = [], 5
        run.append(item)
        used += size
    yield run


def _packed_len(value: object) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


def split_names(names: Sequence[str], overhead: int) -> list[list[str]]:
    """Cut friend names into parts that fit MAX_DATAGRAM after ``overhead`` bytes."""
    return list(_split(names, _packed_len, MAX_DATAGRAM - overhead))


def split_friend_states(states: Sequence[FriendState], budget: int) -> list[list[FriendState]]:
    """Cut friend states into parts of at most ``budget`` encoded bytes each."""
    return list(_split(states, lambda s: _packed_len(s.to_wire()), budget))


def overhead(msg: Message) -> int:
    """Encoded size of ``msg`` with its list field empty (it must be empty when called)."""
    return len(encode(msg))
