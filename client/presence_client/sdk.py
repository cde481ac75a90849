"""Asyncio client SDK for the presence daemon.

Theory of operation
-------------------
:class:`PresenceClient` opens a UDP socket to one daemon from its server list and
sends a Connect (padded to the full datagram size, so the daemon may answer with a full
reply before it has verified our address). Requests carry a client-chosen request id;
replies resolve the future stored under that id. A request is retried with exponential
backoff and jitter until answered; after a few silent attempts the client moves to the
next server in its list.

Once connected, the client pings every ``ping_interval`` the daemon asked for. A
missed reply is normal on UDP, so an unanswered ping is repeated (``PROBES`` tries, a
quarter interval apart); when none is answered, when the daemon's port is unreachable
(ICMP), or when the daemon sends GO_AWAY (it is stopping), the client connects again,
to the next server, with the same client id (a reconnect that arrives before the dead
daemon is reaped keeps the user online without a flap). After UNKNOWN_SESSION it
connects again to the same server; after GO_AWAY "state lost" it also declares its
friend list again (the names it knows, if it keeps the stored list). After GO_AWAY
"kicked" (an operator disconnected this client) it does not reconnect: it closes and
reports ``StatusEvent("kicked")``.

The friend view is kept exactly right in the end even when datagrams are lost: every
notification carries a per-session sequence number and every Pong the last one sent;
a gap triggers a snapshot request. Each friend state carries its version, and a state
is applied only if its version is not older than the one held, so late or reordered
notifications and snapshots can be applied in any order. A complete snapshot (or a
complete CONNECT_OK) lists every declared name: names it omits are no longer declared
(another client of the user changed the list) and are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from presence_client.protocol import (
    MAX_DATAGRAM,
    MAX_REQUEST_ID,
    RETRYABLE_CODES,
    AnyMessage,
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
    Notify,
    Ping,
    Pong,
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    check_name,
    decode,
    encode,
    overhead,
    split_names,
)

log = logging.getLogger(__name__)

Server = tuple[str, int]
TokenSource = str | bytes | Callable[[], str | bytes | Awaitable[str | bytes]]
"""A login token, or a function (plain or async) that returns a fresh one."""

DEFAULT_PORT: Final = 13131
REQUEST_TIMEOUT: Final = 0.5
"""Seconds to wait for a reply before the first retry (then doubling)."""
MAX_BACKOFF: Final = 4.0
"""Longest wait between two retries of one request, in seconds."""
ATTEMPTS_PER_SERVER: Final = 3
"""Silent attempts at one server before trying the next one."""
PROBES: Final = 3
"""Pings sent, a probe interval apart, without any answer before failing over."""
PROBE_INTERVAL: Final = (0.25, 1.0)
"""A quarter of the ping interval, kept within these bounds (seconds): a dead daemon is
left at most ping interval + 3 s after its last answer, with the default 5 s interval."""
MIN_PING_INTERVAL: Final = 0.05
"""Never ping more often than this, whatever a daemon asks."""
SNAPSHOT_ATTEMPTS: Final = 3
"""Snapshots one :meth:`PresenceClient.refresh` asks for while each answer is overtaken
by a friend change of ours (then the next PONG showing the gap asks again)."""


class PresenceClientError(Exception):
    """A request failed; ``code`` is the daemon's ErrorCode, or None for no answer."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class FriendEvent:
    """A declared friend's visible status changed (online means online and mutual)."""

    name: str
    online: bool


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """The connection changed: ``connected``, ``reconnecting``, ``disconnected`` or
    ``kicked`` (an operator disconnected this client: it closed and will not reconnect)."""

    status: str
    server: Server | None


Event = FriendEvent | StatusEvent


def parse_server(text: str) -> Server:
    """Parse ``HOST:PORT`` (or ``HOST``, or ``[v6]:PORT``); raises ValueError naming it."""
    host, sep, port_text = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port_text = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host:
        raise ValueError(f"invalid server {text!r}: no host (expected HOST:PORT)")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"invalid server {text!r}: port {port_text!r} is not a number (expected 1-65535)"
        ) from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid server {text!r}: port {port} is out of range (1-65535)")
    return host, port


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, client: PresenceClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.client._datagram_received(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nothing listens there (the daemon stopped or died).
        log.debug("socket error: %s", exc)
        if isinstance(exc, ConnectionRefusedError):
            self.client._on_unreachable()


class _Unreachable(Exception):
    """The daemon's port answered with ICMP port unreachable."""


M = TypeVar("M", bound=Message)


class PresenceClient:
    """One client of the presence service.

    ``user`` is who this client speaks for; ``friends`` the friend list to declare on
    connect (None keeps the list stored for the user). ``servers`` is the list of daemons
    to try, in order. ``client_id`` identifies this client across reconnects (random by
    default). Use as ``async with PresenceClient(...) as client:``, or call
    :meth:`connect` and :meth:`disconnect`.
    """

    def __init__(
        self,
        user: str,
        friends: Iterable[str] | None = (),
        *,
        servers: Sequence[Server] = (("127.0.0.1", DEFAULT_PORT),),
        client_id: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        max_backoff: float = MAX_BACKOFF,
        connect_attempts: int = 8,
        auto_reconnect: bool = True,
        token: TokenSource | None = None,
    ) -> None:
        self.user = check_name(user, "user name")
        self.client_id = check_name(client_id or f"c-{secrets.token_hex(6)}", "client id")
        self.declared: list[str] | None = (
            None
            if friends is None
            else list(dict.fromkeys(check_name(f, "friend name") for f in friends))
        )
        if not servers:
            raise ValueError("at least one server is needed")
        self.servers = list(servers)
        self.request_timeout = request_timeout
        self.max_backoff = max_backoff
        self.connect_attempts = connect_attempts
        self.auto_reconnect = auto_reconnect
        self.server_index = 0
        self.token = token
        """The login token (a JWT from the application's backend), or a function that
        returns one (may be async): called before every CONNECT, so a reconnect an hour
        later sends a fresh token. None for a daemon without auth."""
        self.session: bytes | None = None
        self._previous_session: bytes | None = None
        """The last session we held: sent with a reconnect as proof that we may replace it."""
        self._connect_number = 0
        self._number_answered = True
        """Whether a CONNECT_OK came for ``_connect_number`` (then the next connect
        takes a new number; until then every CONNECT repeats it, see _connect_once)."""
        self.ping_interval = 5.0
        self.timeout = 15.0
        self.friends: dict[str, bool] = {name: False for name in self.declared or ()}
        """Declared friend -> visible online (online and mutual)."""
        self.versions: dict[str, int] = {}
        self.last_seq = 0
        self.snapshots_requested = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[int, asyncio.Future[AnyMessage]] = {}
        self._snapshot_parts: dict[int, dict[int, Snapshot]] = {}
        self._event_queues: list[asyncio.Queue[Event]] = []
        self._listeners: list[Callable[[Event], None]] = []
        self._ping_task: asyncio.Task[None] | None = None
        self._repair_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._heard = asyncio.Event()
        self._pong = asyncio.Event()
        self._check_task: asyncio.Task[None] | None = None
        self.spurious_unknown_session = 0
        """UNKNOWN_SESSION errors ignored because the session still answered PINGs."""
        self._redeclare = False
        self._names_in_flight: set[str] = set()
        self._list_changes = 0
        """Friend changes of ours applied so far (a snapshot asked for before the last
        one may list names older than ours)."""
        self._snapshot_list_changes: dict[int, int] = {}
        self._overtaken_snapshots: set[int] = set()
        """Snapshot requests whose answer arrived after a friend change of ours."""
        self._closed = False
        self.kicked = False
        """True once an operator disconnected this client (GO_AWAY kicked)."""
        self._next_request = secrets.randbelow(MAX_REQUEST_ID)

    # -- public API ----------------------------------------------------------------

    @property
    def server(self) -> Server:
        """The daemon this client talks to (or will try next)."""
        return self.servers[self.server_index]

    @property
    def connected(self) -> bool:
        return self.session is not None

    async def __aenter__(self) -> PresenceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event, as it happens (must not block)."""
        self._listeners.append(listener)

    async def events(self) -> AsyncIterator[Event]:
        """Every FriendEvent and StatusEvent from now on, in order."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._event_queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._event_queues.remove(queue)

    async def connect(self) -> None:
        """Connect (retrying with backoff along the server list), then start pinging.

        Raises PresenceClientError if the daemon refuses (for example CLIENT_ID_IN_USE)
        or no server answered within ``connect_attempts`` attempts. (After a kick, an
        explicit connect is allowed: a kick is not a ban.)
        """
        self._closed = False
        self.kicked = False
        await self._connect_once(self.connect_attempts, declare=True)
        self._ping_task = asyncio.create_task(self._ping_loop())

    async def disconnect(self) -> None:
        """Say goodbye to the daemon (retried a few times) and close the socket.

        The client is closed in any case; PresenceClientError is raised if the daemon
        never acknowledged (it then drops the session after its timeout).
        """
        self._closed = True
        for task in (self._ping_task, self._repair_task, self._reconnect_task, self._check_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        session = self.session
        error: PresenceClientError | None = None
        if session is not None and self._transport is not None:
            try:
                await self._request(
                    lambda r: Disconnect(r, session),
                    (DisconnectOk,),
                    attempts=4,
                    ok_codes={ErrorCode.UNKNOWN_SESSION},
                )
            except PresenceClientError as exc:
                error = exc
        self.session = None
        self._close_transport()
        self._emit(StatusEvent("disconnected", None))
        if error is not None:
            raise PresenceClientError(f"disconnect not acknowledged: {error}", error.code)

    @property
    def friend_states(self) -> dict[str, bool | None]:
        """Declared friend -> visible online, or None while unknown.

        Unknown means no state for the friend has arrived in the current session: before
        the first CONNECT_OK, while reconnecting, after a disconnect, and (briefly) for a
        name just added. :attr:`friends` says False for those; a program that shows
        presence to people should show them as unknown instead.
        """
        live = self.session is not None and not self._closed
        return {
            name: online if live and name in self.versions else None
            for name, online in self.friends.items()
        }

    async def add_friends(self, names: Iterable[str]) -> None:
        """Declare more friends."""
        await self._change_friends(FriendsOp.ADD, names)

    async def remove_friends(self, names: Iterable[str]) -> None:
        """Stop declaring these friends."""
        await self._change_friends(FriendsOp.REMOVE, names)

    async def set_friends(self, names: Iterable[str]) -> None:
        """Replace the declared friend list."""
        await self._change_friends(FriendsOp.SET, names)

    async def refresh(self) -> None:
        """Ask for a snapshot of all friends and apply it.

        An answer overtaken by a friend change of ours (made while it was on its way)
        may list names older than ours: its states are applied and the snapshot is
        asked for again, up to :data:`SNAPSHOT_ATTEMPTS` times. Only a whole answer
        marks the notification gap repaired, so if none was, the next PONG asks again.
        """
        for _ in range(SNAPSHOT_ATTEMPTS):
            if await self._snapshot_once():
                return

    async def _snapshot_once(self) -> bool:
        """One snapshot request; True if its answer was adopted whole."""
        session = self._require_session()
        self.snapshots_requested += 1
        request = self._new_request()
        self._snapshot_parts[request] = {}
        self._snapshot_list_changes[request] = self._list_changes

        def renewed(old: int, new: int) -> None:
            # A resend takes a new r (protocol.md, "Resending"): parts of the old
            # answer that arrive late are ignored, never mixed with the new one's.
            nonlocal request
            request = new
            self._snapshot_parts.pop(old, None)
            self._snapshot_parts[new] = {}
            self._snapshot_list_changes[new] = self._snapshot_list_changes.pop(
                old, self._list_changes
            )
            self._overtaken_snapshots.discard(old)

        try:
            await self._request(
                lambda r: SnapshotRequest(r, session),
                (Snapshot,),
                request=request,
                renewed=renewed,
            )
            return request not in self._overtaken_snapshots
        finally:
            self._snapshot_parts.pop(request, None)
            self._snapshot_list_changes.pop(request, None)
            self._overtaken_snapshots.discard(request)

    # -- requests ------------------------------------------------------------------

    def _new_request(self) -> int:
        self._next_request = self._next_request % MAX_REQUEST_ID + 1  # 1..MAX: 0 is reserved
        return self._next_request

    def _require_session(self) -> bytes:
        if self.session is None:
            raise PresenceClientError("not connected")
        return self.session

    async def _request(
        self,
        build: Callable[[int], Message],
        expect: tuple[type[M], ...],
        *,
        attempts: int = 6,
        request: int | None = None,
        pad: bool = False,
        extra: Sequence[Message] = (),
        ok_codes: set[ErrorCode] | None = None,
        renewed: Callable[[int, int], None] | None = None,
    ) -> AnyMessage:
        """Send ``build(request_id)`` (and ``extra`` parts) until an answer arrives.

        Each resend carries the same request id, unless ``renewed`` is given: then each
        resend takes a new one, and ``renewed(old, new)`` is called before it is sent.
        """
        request = self._new_request() if request is None else request
        msg = build(request)
        data = encode(msg, pad_to=MAX_DATAGRAM if pad else None)
        loop = asyncio.get_running_loop()
        delay = self.request_timeout
        try:
            for attempt in range(attempts):
                if attempt and renewed is not None:
                    old = request
                    self._pending.pop(old, None)
                    request = self._new_request()
                    renewed(old, request)
                    data = encode(build(request), pad_to=MAX_DATAGRAM if pad else None)
                future: asyncio.Future[AnyMessage] = loop.create_future()
                self._pending[request] = future
                self._send_bytes(data)
                for part in extra:
                    self._send_bytes(encode(part))
                try:
                    reply = await asyncio.wait_for(future, delay * random.uniform(0.8, 1.2))
                except TimeoutError:
                    delay = min(delay * 2, self.max_backoff)
                    continue
                except _Unreachable:
                    break  # nothing listens there: no point in waiting for an answer
                if isinstance(reply, Error):
                    if ok_codes and reply.code in ok_codes:
                        return reply
                    if reply.code in RETRYABLE_CODES:
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                        delay = min(delay * 2, self.max_backoff)
                        continue
                    raise PresenceClientError(f"refused: {reply.code.name}", reply.code)
                if isinstance(reply, expect):
                    return reply
            raise PresenceClientError(f"no answer from {self.server[0]}:{self.server[1]}")
        finally:
            self._pending.pop(request, None)

    async def _change_friends(self, op: FriendsOp, names: Iterable[str]) -> None:
        session = self._require_session()
        wanted = list(dict.fromkeys(check_name(n, "friend name") for n in names))
        empty = Friends(0, session, op, (), part=0, parts=2)
        chunks = split_names(wanted, overhead(empty) + 16)
        # The daemon sends the NOTIFY about a newly mutual friend before FRIENDS_OK: know
        # the new names already, or _apply drops that notification (no gap repairs it).
        added = [] if op is FriendsOp.REMOVE else [n for n in wanted if n not in self.friends]
        for name in added:
            self.friends[name] = False
        in_flight = set(wanted) - self._names_in_flight
        self._names_in_flight |= in_flight  # a snapshot taken meanwhile may not know them
        try:
            if op is FriendsOp.SET:
                request = self._new_request()
                parts = [
                    Friends(request, session, op, tuple(chunk), part=i, parts=len(chunks))
                    for i, chunk in enumerate(chunks)
                ]
                await self._request(
                    lambda r: parts[0], (FriendsOk,), request=request, extra=parts[1:]
                )
            else:
                for chunk in chunks:

                    def build(request: int, names: tuple[str, ...] = tuple(chunk)) -> Message:
                        return Friends(request, session, op, names)

                    await self._request(build, (FriendsOk,))
        except PresenceClientError as exc:
            if exc.code is ErrorCode.UNKNOWN_SESSION and self.session == session:
                self._start_reconnect(next_server=False)  # the daemon forgot us
            if exc.code in (None, ErrorCode.UNKNOWN_SESSION):
                # No answer, or the session ended meanwhile (we reconnected): the daemon
                # may have applied it. Keep the names; the next complete list the
                # daemon sends says which are really declared: ask for one now (one
                # that arrived while the change was in flight kept them regardless),
                # or, while reconnecting, the CONNECT_OK to come is one.
                if self.session is not None:
                    asyncio.get_running_loop().call_soon(self._schedule_repair)
                raise
            for name in added:
                self.versions.pop(name, None)
                if self.friends.pop(name, False):
                    self._emit(FriendEvent(name, False))
            raise
        finally:
            self._names_in_flight -= in_flight
        self._update_declared(op, wanted)

    def _update_declared(self, op: FriendsOp, names: list[str]) -> None:
        """The daemon applied a change: update the names we know (and our own list,
        if we keep one; a client keeping the stored list keeps doing so)."""
        known = list(self.friends) if self.declared is None else self.declared
        if op is FriendsOp.SET:
            known = names
        elif op is FriendsOp.ADD:
            known = list(dict.fromkeys([*known, *names]))
        else:
            known = [n for n in known if n not in names]
        if self.declared is not None:
            self.declared = known
        self._list_changes += 1
        kept = set(known)
        for name in list(self.friends):
            if name not in kept:
                was_online = self.friends.pop(name)
                self.versions.pop(name, None)
                if was_online:
                    self._emit(FriendEvent(name, False))
        for name in known:
            self.friends.setdefault(name, False)

    # -- connection ----------------------------------------------------------------

    async def _open(self) -> None:
        self._close_transport()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self), remote_addr=self.server
        )
        self._transport = transport

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _send_bytes(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.sendto(data)

    async def _connect_once(self, attempts: int, *, declare: bool) -> None:
        """Connect to a server of the list, starting with the current one.

        With ``declare`` the CONNECT carries our friend list (the first connect: the
        user's intent; or after the daemon said its store lost the lists). A reconnect
        otherwise keeps the stored list, which another client of the user may have
        changed meanwhile: sending ours again would undo that change.
        """
        friends = tuple(self.declared) if self.declared is not None and declare else None
        if self._redeclare:
            # The stored list was lost: declare ours, or the names we last knew.
            friends = tuple(self.declared if self.declared is not None else self.friends)
        if (
            friends is not None
            and len(encode(Connect(0, self.client_id, self.user, friends))) > MAX_DATAGRAM
        ):
            friends_in_connect: tuple[str, ...] | None = None  # sent as a multi-part SET after
        else:
            friends_in_connect = friends
        auth = await self._login_token()
        # One number until a CONNECT_OK comes, whichever server and however many calls
        # it takes: a CONNECT that was applied but whose answer was lost left a session
        # we never learned the token of; a later CONNECT with the same number is that
        # same connect again, so it may replace it (with a new number it would need a
        # proof we do not have, and wait for that session's timeout).
        number = self._next_connect_number() if self._number_answered else self._connect_number
        self._number_answered = False
        renumbered = False
        previous = self._previous_session
        last_error: PresenceClientError | None = None
        remaining = attempts
        while remaining > 0:
            if self._closed:
                raise PresenceClientError("client closed")
            await self._open()
            tries = min(ATTEMPTS_PER_SERVER, remaining)
            remaining -= tries
            try:
                reply = await self._request(
                    lambda r, n=number: Connect(  # type: ignore[misc]
                        r,
                        self.client_id,
                        self.user,
                        friends_in_connect,
                        auth=auth,
                        counter=n,
                        previous=previous,
                    ),
                    (ConnectOk,),
                    attempts=tries,
                    pad=True,
                )
            except PresenceClientError as exc:
                if exc.code is ErrorCode.STALE and not renumbered:
                    # This number's session ended (the daemon timed it out, or it was
                    # reaped) before a retry of its CONNECT arrived: a new connect.
                    renumbered = True
                    number = self._next_connect_number()
                    remaining += tries
                    continue
                if exc.code is not None:
                    self._close_transport()
                    raise
                last_error = exc
                self.server_index = (self.server_index + 1) % len(self.servers)
                continue
            assert isinstance(reply, ConnectOk)
            self._redeclare = False
            await self._on_connected(
                reply, friends_in_connect is None and friends is not None, friends
            )
            return
        self._close_transport()
        raise last_error or PresenceClientError("no server answered")

    def _next_connect_number(self) -> int:
        """Above every number this client id sent before, even from an earlier process
        (milliseconds of the wall clock, unless ours ran ahead)."""
        self._connect_number = max(self._connect_number + 1, time.time_ns() // 1_000_000)
        return self._connect_number

    async def _login_token(self) -> bytes | None:
        """The token to send with the next CONNECT (calling the token function)."""
        source = self.token
        token: object = source
        if callable(source):
            try:
                token = source()
                if inspect.isawaitable(token):
                    token = await token
            except Exception as exc:
                raise PresenceClientError(f"the login token function failed: {exc}") from exc
        if token is None:
            return None
        if isinstance(token, str):
            return token.encode()
        if isinstance(token, bytes):
            return token
        raise PresenceClientError(f"a login token is str or bytes, not {type(token).__name__}")

    async def _on_connected(
        self, reply: ConnectOk, send_friends: bool, friends: tuple[str, ...] | None
    ) -> None:
        self.session = reply.session
        self._previous_session = reply.session
        self._number_answered = True
        self.ping_interval = max(reply.ping_interval_ms / 1000, MIN_PING_INTERVAL)
        self.timeout = reply.timeout_ms / 1000
        self.last_seq = reply.seq
        # Each session starts a new baseline of versions (protocol.md).
        self.versions.clear()
        # Prove our address at once (the daemon holds notifications until then).
        self._send_bytes(encode(Ping(reply.session)))
        if reply.complete and not send_friends:
            self._adopt_names(state.name for state in reply.friends)
        elif self.declared is None:
            for state in reply.friends:  # a part of the stored list: real names all the same
                self.friends.setdefault(state.name, False)
        for state in reply.friends:
            self._apply(state)
        self._emit(StatusEvent("connected", self.server))
        if send_friends and friends is not None:
            await self.set_friends(friends)
        if not reply.complete:
            self._schedule_repair()

    async def _ping_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.ping_interval)
            if self._reconnect_task is not None and not self._reconnect_task.done():
                continue  # a reconnect is under way; it restarts the pings by succeeding
            if self.session is None or not await self._probe(self.session):
                self._start_reconnect(next_server=True)

    async def _probe(self, session: bytes) -> bool:
        """Ping until anything arrives from the daemon; False after PROBES silent tries."""
        low, high = PROBE_INTERVAL
        wait = min(max(self.ping_interval / 4, low), high)
        for _ in range(PROBES):
            if self.session != session:
                return True  # a reconnect replaced the session meanwhile
            self._heard.clear()
            self._send_bytes(encode(Ping(session)))
            try:
                await asyncio.wait_for(self._heard.wait(), wait)
                return True
            except TimeoutError:
                continue
        return False

    def _check_session(self) -> None:
        """Ping once (once at a time); reconnect unless a PONG comes within a probe
        interval."""
        if self._check_task is not None and not self._check_task.done():
            return
        self._check_task = asyncio.get_running_loop().create_task(self._verify_session())

    async def _verify_session(self) -> None:
        session = self.session
        if session is None:
            return
        low, high = PROBE_INTERVAL
        self._pong.clear()
        self._send_bytes(encode(Ping(session)))
        try:
            await asyncio.wait_for(self._pong.wait(), min(max(self.ping_interval / 4, low), high))
        except TimeoutError:
            if self.session == session:
                self._start_reconnect(next_server=False)
        else:
            self.spurious_unknown_session += 1
            log.info("ignored an UNKNOWN_SESSION: our session answers PINGs")

    def _on_unreachable(self) -> None:
        """ICMP port unreachable: fail the requests waiting on this server at once, and
        move a live session to the next server."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_Unreachable())
        if self.session is not None:
            self._start_reconnect(next_server=True)

    def _start_reconnect(self, *, next_server: bool) -> None:
        """Start reconnecting in the background, unless that is already under way."""
        if self._closed or (self._reconnect_task is not None and not self._reconnect_task.done()):
            return
        self.session = None
        self._reconnect_task = asyncio.get_running_loop().create_task(
            self._reconnect(next_server=next_server)
        )

    async def _reconnect(self, *, next_server: bool) -> None:
        """Connect again, retrying until it works or we close. After silence the next
        server is tried first; after UNKNOWN_SESSION (the daemon forgot us, or our
        address changed) the same one."""
        if not self.auto_reconnect:
            self._closed = True
            self._close_transport()
            self._emit(StatusEvent("disconnected", None))
            return
        if next_server:
            self.server_index = (self.server_index + 1) % len(self.servers)
        self._emit(StatusEvent("reconnecting", self.server))
        backoff = self.request_timeout
        while not self._closed:
            try:
                await self._connect_once(len(self.servers) * ATTEMPTS_PER_SERVER, declare=False)
                return
            except PresenceClientError as exc:
                log.warning("reconnect failed: %s", exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.max_backoff)

    # -- incoming ------------------------------------------------------------------

    def _datagram_received(self, data: bytes) -> None:
        try:
            msg = decode(data)
        except ProtocolError as exc:
            log.debug("dropped a bad datagram: %s", exc)
            return
        self._heard.set()
        if type(msg) is Pong:
            self._pong.set()
            if msg.seq > self.last_seq:
                self._schedule_repair()
        elif type(msg) is Notify:
            self._on_notify(msg)
        elif type(msg) is Snapshot:
            self._on_snapshot_part(msg)
        elif type(msg) is GoAway:
            if self.session is not None and msg.session == self.session:
                if msg.reason == GoAwayReason.KICKED:
                    self._on_kicked()
                    return
                lost = msg.reason == GoAwayReason.STATE_LOST
                self._redeclare = self._redeclare or lost
                self._start_reconnect(next_server=not lost)
        elif (
            type(msg) is Error
            and msg.code is ErrorCode.UNKNOWN_SESSION
            and msg.request not in self._pending
        ):
            # The daemon forgot us (timeout, restart, our address changed), or someone
            # sent it a PING with a bad token from our address (anyone can: an ERROR
            # carries no session). A PING of ours tells which: connect again unless it
            # is answered with a PONG.
            if self.session is not None:
                self._check_session()
        elif isinstance(msg, ConnectOk | DisconnectOk | FriendsOk | Error):
            future = self._pending.get(msg.request)
            if future is not None and not future.done():
                future.set_result(msg)

    def _on_kicked(self) -> None:
        """An operator disconnected us: close for good (no reconnect, no DISCONNECT:
        the session is already gone) and say so."""
        self.kicked = True
        self._closed = True
        self.session = None
        for task in (self._ping_task, self._repair_task, self._reconnect_task, self._check_task):
            if task is not None:
                task.cancel()
        self._close_transport()
        self._emit(StatusEvent("kicked", None))

    def _on_notify(self, msg: Notify) -> None:
        if msg.seq == self.last_seq + 1:
            self.last_seq = msg.seq
        elif msg.seq > self.last_seq + 1:
            self._schedule_repair()
        self._apply(msg.friend)

    def _on_snapshot_part(self, msg: Snapshot) -> None:
        parts = self._snapshot_parts.get(msg.request)
        future = self._pending.get(msg.request)
        if parts is None or future is None or future.done():
            return
        first = next(iter(parts.values()), None)
        if first is not None and (first.parts != msg.parts or first.seq != msg.seq):
            parts.clear()  # parts of an earlier answer to this request: start over
        parts[msg.part] = msg
        if len(parts) < msg.parts:
            return
        whole = self._snapshot_list_changes.get(msg.request) == self._list_changes
        if whole:
            self._adopt_names(state.name for part in parts.values() for state in part.friends)
        else:
            # We changed the list while this answer was on its way: its names may be
            # older than ours. Apply its states only; refresh() asks again.
            self._overtaken_snapshots.add(msg.request)
        for part in parts.values():
            for state in part.friends:
                self._apply(state)
        if whole:
            self.last_seq = max(self.last_seq, msg.seq)
        future.set_result(msg)

    def _schedule_repair(self) -> None:
        """Ask for a snapshot (once at a time) after a sequence gap."""
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.get_running_loop().create_task(self._repair())

    async def _repair(self) -> None:
        with contextlib.suppress(PresenceClientError):
            await self.refresh()

    def _adopt_names(self, names: Iterable[str]) -> None:
        """A complete list of the user's declared names arrived (snapshot, CONNECT_OK):
        drop the names it omits (another client of the user removed them) unless a
        change of ours to them is in flight, and learn the ones it adds (the list is
        the user's, shared by all its clients: the last change wins)."""
        listed = set(names)
        for name in list(self.friends):
            if name not in listed and name not in self._names_in_flight:
                self.versions.pop(name, None)
                if self.friends.pop(name):
                    self._emit(FriendEvent(name, False))
        for name in listed:
            self.friends.setdefault(name, False)
        if self.declared is not None:
            self.declared = list(self.friends)

    def _apply(self, state: FriendState) -> None:
        """Apply a friend state unless we already hold a newer one.

        A name we do not know is ignored: names are learned only from complete lists
        (CONNECT_OK, snapshots) and our own changes, so a late NOTIFY about a name that
        was just removed cannot bring it back. (A name added by another client of the
        user arrives with the snapshot its change makes us fetch.)
        """
        if state.name not in self.friends:
            return
        if state.version < self.versions.get(state.name, -1):
            return
        self.versions[state.name] = state.version
        if self.friends[state.name] != state.online:
            self.friends[state.name] = state.online
            self._emit(FriendEvent(state.name, state.online))

    def _emit(self, event: Event) -> None:
        for queue in self._event_queues:
            queue.put_nowait(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")
