"""The UDP daemon: sessions in memory, state changes through the presence library.

Theory of operation
-------------------
``datagram_received`` decodes and dispatches without awaiting. A ping is answered on
the spot from memory: it refreshes the session's last-seen time and moves the session to
the back of an ordered dict, so the dict is always ordered by last-seen time and a
timeout sweep only looks at the front (its cost is what expired, not what is online).
Pings never touch Redis. A PING in the layout every client sends skips the decoder
altogether (see ``datagram_received``): pings are nearly all the traffic.

Everything that needs Redis (connect, disconnect, friend changes, snapshots, timeouts)
becomes a job on one of ``workers`` bounded queues, chosen by client id, so the jobs of
one client run in arrival order while different clients proceed concurrently. A full
queue refuses the job with TRY_AGAIN (counted); nothing waits without bound.

Notifications come from the presence library as Delivery records. Those for clients
this daemon holds are sent at once; the others are published to the owning daemon's
inbox channel, and each daemon listens on its own. Each session numbers its
notifications 1, 2, 3...; a Pong carries the last number, so a client that lost one sees
the gap and asks for a snapshot.

An address is *verified* once a datagram carrying the session token arrives from it
(the token was only ever sent there). Until then the daemon never answers it with more
bytes than it received, and sends it no notifications (they are numbered all the same,
so the gap is repaired by a snapshot).

Healing: what the daemon holds and what Redis says must come back into agreement after
any fault, without the client doing anything. A session replaced through another daemon
is forgotten (that daemon's connect says so through our inbox; a later PING gets
UNKNOWN_SESSION). When the lease is found lapsed, every held session is put back
(``restore``: never over a newer session elsewhere), and each client is made to see a
sequence gap, so it repairs its view by snapshot. When Redis lost its data altogether,
each client is also sent GO_AWAY (state lost) so it declares its friends again. Once a
minute, and soon after a lapse, the sessions held are compared with what Redis lists.
On shutdown, clients are sent GO_AWAY and given a grace to move to another daemon
before the rest are removed, so a rolling restart flaps nobody.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import RedisError

from presence_client.protocol import (
    CLIENT_TO_DAEMON,
    DAEMON_TO_CLIENT,
    MAX_DATAGRAM,
    MIN_CONNECT_SIZE,
    PING_PREFIX,
    PING_SIZE,
    PING_TOKEN_AT,
    PONGS,
    PONGS_KEPT,
    SUPPORTED_VERSIONS,
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
    ProtocolError,
    Snapshot,
    SnapshotRequest,
    decode,
    encode,
    encode_pong,
    overhead,
    split_friend_states,
)
from presence_daemon import keys
from presence_daemon.auth import AuthError, Verifier
from presence_daemon.config import Config
from presence_daemon.limits import Limiter, address_key
from presence_daemon.presence import (
    Connection,
    Delivery,
    Presence,
    PresenceError,
    Replaced,
    SessionInUse,
    Superseded,
    parse_inbox,
    stop_tasks,
)
from presence_daemon.store import Inbox

log = logging.getLogger(__name__)

Address = tuple[str, int]
Clock = Callable[[], float]

REDIS_ERROR_LOG_INTERVAL: Final = 5.0
"""Seconds between repeated log lines about an unreachable Redis."""

HOSTILE_LOG_INTERVAL: Final = 5.0
"""Seconds between two log lines for the same reason of failing on a datagram."""

RECONCILE_INTERVAL: Final = 60.0
"""Seconds between comparisons of what Redis says this daemon owns with what it holds."""

GO_AWAY_RESEND: Final = 0.5
"""Seconds between GO_AWAYs to a client that has not moved yet, during a shutdown grace."""
GO_AWAY_BATCH: Final = 64
"""GO_AWAYs sent at once; batches are GO_AWAY_PACE apart, so the clients' CONNECTs do not
all land on the next daemon's socket in the same instant (and overflow its buffer)."""
GO_AWAY_PACE: Final = 0.02
"""Seconds between two batches of GO_AWAY."""


def _log_session(what: str, session: Session, *, reason: str = "") -> None:
    """One debug line about a session: user, client id and address, never a token."""
    host, port = session.address[:2]
    log.debug(
        "%s: user %s, client %s, address %s:%d%s",
        what,
        session.user,
        session.client_id,
        host,
        port,
        f" ({reason})" if reason else "",
        extra={
            "event": what,
            "user": session.user,
            "client_id": session.client_id,
            "address": f"{host}:{port}",
            **({"reason": reason} if reason else {}),
        },
    )


def _token_bytes(token: str) -> bytes:
    try:
        return bytes.fromhex(token)
    except ValueError:
        return b""


class _SeqMark:
    """Notes a session's sequence number when its first friend view is read: the
    CONNECT_OK carries it, so a notification numbered during the read is a gap the
    client sees (and repairs), not one hidden inside the reply's `q`."""

    __slots__ = ("seq", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.seq: int | None = None

    def __call__(self) -> None:
        self.seq = self.session.seq


@dataclass(slots=True, eq=False)
class Session:
    """One connected client, as its owning daemon holds it."""

    client_id: str
    user: str
    token: bytes
    address: Address
    last_seen: float
    seq: int = 0
    verified: bool = False
    closing: bool = False
    friend_parts: dict[int, tuple[str, ...]] | None = None
    """Parts of a multi-part friend SET received so far (only while one is pending)."""
    friend_request: int = -1
    friend_part_count: int = 0
    """The part count ``n`` of that SET (every part of it must carry the same)."""
    snapshot_at: float = -math.inf
    """When this session was last admitted a snapshot (server clock)."""
    snapshot_request: int = -1
    """The request id of that snapshot."""
    snapshot_answer: tuple[bytes, ...] = ()
    """Its answer's datagrams, kept for one snapshot interval after it was sent."""
    notified: collections.OrderedDict[str, tuple[float, int]] = dataclasses.field(
        default_factory=collections.OrderedDict
    )
    """Friend name -> (when, version) of the last NOTIFY sent about it, oldest first;
    entries older than the coalescing window are pruned as new ones are added."""
    held: dict[str, FriendState] = dataclasses.field(default_factory=dict)
    """The newest state of each friend whose NOTIFY waits for its window to end."""

    @property
    def token_hex(self) -> str:
        return self.token.hex()


Job = Callable[[], Awaitable[None]]


class Server:
    """The daemon's state and logic, independent of how datagrams arrive.

    ``send`` is called with (bytes, address) for every datagram to send; ``clock``
    returns monotonic seconds. Both are injectable so tests can drive them.
    """

    def __init__(
        self,
        config: Config,
        presence: Presence,
        *,
        send: Callable[[bytes, Address], None] | None = None,
        clock: Clock = time.monotonic,
        verifier: Verifier | None = None,
    ) -> None:
        self.config = config
        self.verifier = verifier
        """Checks login tokens; None without auth (any CONNECT speaks for its user)."""
        self.presence = presence
        self.instance_id = presence.instance_id
        presence.deliver = self.deliver
        presence.on_lease_lost = self.register_again
        self.clock = clock
        self._send: Callable[[bytes, Address], None] = send or (lambda data, addr: None)
        self.by_token: dict[bytes, Session] = {}
        self.by_client: dict[str, Session] = {}
        # Ordered by last_seen: pings move a session to the end; sweeps read the front.
        self.recency: collections.OrderedDict[bytes, Session] = collections.OrderedDict()
        self._counts: collections.Counter[str] = collections.Counter()
        # Counted in plain ints on the ping path, merged into _counts when read: a
        # Counter update costs more than the rest of a ping's bookkeeping.
        self._datagrams_in = 0
        """Datagrams received that the fast path did not answer."""
        self._pongs = 0
        """PINGs answered by the fast path (each also one datagram in and one out)."""
        self.fast_pongs = 0
        """PINGs answered by the fast path, up to the last read of ``counters``."""
        self.received_by_type = [0] * (max(MessageType) + 1)
        """Datagrams decoded on the full path, by message type (the fast path's pings
        are ``fast_pongs``)."""
        self.sent_by_type = [0] * (max(MessageType) + 1)
        """Datagrams sent other than the fast path's pongs, by message type."""
        self.sweep_delay = 0.0
        """Seconds the last timeout sweep started late (event-loop lag)."""
        self._queues: list[asyncio.Queue[Job]] = [
            asyncio.Queue(config.queue_size) for _ in range(config.workers)
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._housekeeping: list[asyncio.Task[None]] = []
        self._last_redis_error_log = -REDIS_ERROR_LOG_INTERVAL
        self._redis_trouble_at = -math.inf
        """Event-loop time of the last Redis error (see _reads_trusted)."""
        self.stopping = False
        # Timed-out sessions whose removal could not be queued or failed: retried first
        # by the next sweep (kept apart so the recency order stays sorted by last_seen).
        self._failed_removals: list[Session] = []
        # Sessions to put back into Redis whose restore could not be queued or failed
        # for a reason that may pass (Redis unreachable): retried by the next sweep.
        self._failed_restores: list[Session] = []
        self._verify_task: asyncio.Task[None] | None = None
        self._stopped = False
        self.ping_interval_ms = round(config.ping_interval * 1000)
        self.timeout_ms = round(config.timeout * 1000)
        now = clock()
        self.connect_limits = Limiter.from_config("connect", config, now)
        self.friends_limits = Limiter.from_config("friends", config, now)
        self.snapshot_limits = Limiter.from_config("snapshot", config, now)

    # -- lifecycle -----------------------------------------------------------------

    def set_sender(self, send: Callable[[bytes, Address], None]) -> None:
        self._send = send

    def start(self) -> None:
        """Start the workers, the timeout sweeper, the reconciler and the inbox listener."""
        self._workers = [asyncio.create_task(self._work(queue)) for queue in self._queues]
        self._housekeeping = [
            asyncio.create_task(self._sweep_forever()),
            asyncio.create_task(self._reconcile_forever()),
        ]
        self._tasks = [
            *self._workers,
            *self._housekeeping,
            asyncio.create_task(self._listen_inbox()),
        ]

    async def stop(self, *, drain_timeout: float = 5.0) -> None:
        """Stop taking new work, finish what is queued, ask clients to move to another
        daemon (GO_AWAY) and give them ``config.drain_grace`` seconds to do so, then
        remove every client still held from Redis (their friends are told) and stop
        the tasks."""
        self.stopping = True
        for task in self._housekeeping:  # no new timeouts or reconciliation from now on
            task.cancel()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(queue.join() for queue in self._queues)), drain_timeout
            )
        except TimeoutError:
            log.warning("shutdown: queued work did not finish within %.1f s", drain_timeout)
            for task in self._workers:
                task.cancel()  # nothing may land in Redis after the removal pass
        await self._let_clients_move()
        # Every session held, including one whose connect was cut short above.
        sessions = list(self.by_token.values())
        for session in sessions:
            session.closing = True
        limit = asyncio.Semaphore(len(self._queues))

        async def remove(session: Session) -> None:
            async with limit:
                await self._remove(session, reason="shutdown")

        results = await asyncio.gather(*(remove(s) for s in sessions), return_exceptions=True)
        failed = sum(isinstance(r, BaseException) for r in results)
        if failed:
            log.error(
                "shutdown: %d of %d clients could not be removed from Redis", failed, len(results)
            )
        self._stopped = True
        if self._verify_task is not None:
            self._tasks.append(self._verify_task)
        await stop_tasks(self._tasks)
        self._tasks.clear()

    async def _let_clients_move(self) -> None:
        """Send GO_AWAY to every verified client and wait (at most the drain grace)
        until each has connected elsewhere: the daemon it moved to replaces its entry
        in Redis and tells us through the inbox, and we forget the session. Skipped
        when no other daemon is alive: there is nowhere to go."""
        grace = self.config.drain_grace
        if grace <= 0 or not self.by_token:
            return
        try:
            others = await self.presence.live_owners()
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            others = []
        if not others:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        held = len(self.by_token)
        resend_at = 0.0
        while loop.time() < deadline:
            # (An unverified address gets nothing: it could be anyone's.)
            movable = [s for s in self.by_token.values() if s.verified]
            if not movable:
                break
            if loop.time() >= resend_at:
                resend_at = loop.time() + GO_AWAY_RESEND
                for start in range(0, len(movable), GO_AWAY_BATCH):
                    for session in movable[start : start + GO_AWAY_BATCH]:
                        if self.by_token.get(session.token) is session:
                            message = GoAway(session.token, GoAwayReason.SHUTDOWN)
                            self._reply(message, session.address)
                            self.counters["go_away_sent"] += 1
                    await asyncio.sleep(GO_AWAY_PACE)
            else:
                await asyncio.sleep(GO_AWAY_PACE)
        log.info(
            "shutdown: %d of %d clients moved to another daemon within %.1f s",
            held - len(self.by_token),
            held,
            grace,
        )

    # -- datagrams -----------------------------------------------------------------

    _quiet_until: dict[str, float] | None = None
    """Per reason, when the next log line about failing on a datagram may be written."""

    @property
    def counters(self) -> collections.Counter[str]:
        """What happened so far, by name (``pings``, ``datagrams_in``, ``rejected_*``...).

        The ping path counts in plain ints; they are added in here on each read, so
        this is always the whole count (and ``counters[name] += 1`` works as usual).
        """
        counts = self._counts
        if self._datagrams_in or self._pongs:
            pongs, self._pongs = self._pongs, 0
            counts["datagrams_in"] += self._datagrams_in + pongs
            self._datagrams_in = 0
            counts["pings"] += pongs
            self.fast_pongs += pongs
            counts["datagrams_out"] += pongs
        return counts

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Handle one datagram; never awaits, never raises, whatever the bytes.

        Bad input is counted (``rejected_<code>``) and answered with at most an ERROR
        no larger than the datagram. A message of a type only daemons send is dropped
        unanswered (``dropped_daemon_message``): answering could make two spoofed
        daemons bounce errors at each other. A failure of our own is counted
        (``internal_errors``) and logged once per reason per HOSTILE_LOG_INTERVAL.

        The common case, a PING in the layout every client sends from the address of
        a session held here, is answered without decoding (see ``ping_session`` in
        the protocol module): the same effects as :meth:`_on_ping`, in fewer steps.
        Anything else takes the full path.
        """
        try:
            # ping_session(data), inlined: a call costs as much as the check itself.
            if len(data) == PING_SIZE and data.startswith(PING_PREFIX):
                token = data[PING_TOKEN_AT:]
                session = self.by_token.get(token)
                if session is not None and session.address == addr:
                    session.verified = True
                    session.last_seen = self.clock()
                    if not session.closing:
                        self.recency.move_to_end(token)
                    seq = session.seq
                    self._send(PONGS[seq] if seq < PONGS_KEPT else encode_pong(seq), addr)
                    self._pongs += 1
                    return
        except Exception as exc:  # as on the full path: a failure of ours is counted
            self._datagrams_in += 1
            self.counters["pings"] += 1
            self._internal_error(exc)
            return
        self._decode_and_dispatch(data, addr)

    def _internal_error(self, exc: Exception) -> None:
        self.counters["internal_errors"] += 1
        self._log_rarely(f"datagram-{type(exc).__name__}", exc)

    def _decode_and_dispatch(self, data: bytes, addr: Address) -> None:
        """The full path of :meth:`datagram_received`: decode, then dispatch by type."""
        self._datagrams_in += 1
        try:
            try:
                msg = decode(data)
            except ProtocolError as exc:
                if exc.kind in DAEMON_TO_CLIENT:
                    self.counters["dropped_daemon_message"] += 1
                    return
                self.counters[f"rejected_{exc.code.name.lower()}"] += 1
                if exc.code is ErrorCode.UNSUPPORTED_VERSION:
                    # With the versions we speak, if that fits the amplification rule.
                    versions = Error(exc.request, exc.code, versions=SUPPORTED_VERSIONS)
                    if self._reply(versions, addr, limit=len(data), count_withheld=False):
                        return
                self._reply(Error(exc.request, exc.code), addr, limit=len(data))
                return
            self.received_by_type[msg.TYPE] += 1
            if msg.TYPE not in CLIENT_TO_DAEMON:
                self.counters["dropped_daemon_message"] += 1
            elif type(msg) is Ping:
                self._on_ping(msg, addr, len(data))
            elif type(msg) is Connect and len(data) < MIN_CONNECT_SIZE:
                # No answer could fit, so the client could never use the session: drop
                # it before it costs Redis anything (or lets a spoofed source log in).
                self.counters["rejected_connect_too_small"] += 1
            elif type(msg) is Connect:
                if not self._admit_connect(msg, addr, len(data)):
                    return  # answered (TRY_AGAIN or UNAUTHORIZED) and counted
                self._enqueue(
                    msg.client_id,
                    lambda: self._on_connect(msg, addr, len(data)),
                    msg.request,
                    addr,
                    len(data),
                )
            elif isinstance(msg, Disconnect | Friends | SnapshotRequest):
                self._on_session_message(msg, addr, len(data))
        except Exception as exc:  # the one place a bug meets hostile input: count, go on
            self._internal_error(exc)

    def _log_rarely(self, reason: str, exc: Exception) -> None:
        """Log ``exc`` (with its traceback) at most once per ``reason`` per
        HOSTILE_LOG_INTERVAL seconds; the datagrams in between are only counted."""
        now = self.clock()
        if self._quiet_until is None:
            self._quiet_until = {}
        if now < self._quiet_until.get(reason, -math.inf):
            return
        self._quiet_until[reason] = now + HOSTILE_LOG_INTERVAL
        log.error(
            "failed to handle a datagram (%s; internal_errors=%d; repeats within %.0f s "
            "are counted, not logged)",
            reason,
            self.counters["internal_errors"],
            HOSTILE_LOG_INTERVAL,
            exc_info=exc,
        )

    def _authenticate(self, msg: Connect, addr: Address, size: int) -> bool:
        """With auth, let a CONNECT in only with a valid login token for its user (and
        client id); else refuse it UNAUTHORIZED before it costs Redis anything."""
        if self.verifier is None:
            return True
        try:
            self.verifier.verify(msg.auth, msg.user, msg.client_id)
        except AuthError as exc:
            self.counters[f"rejected_unauthorized_{exc.reason}"] += 1
            self._reply(Error(msg.request, ErrorCode.UNAUTHORIZED), addr, limit=size)
            return False
        return True

    def _proof(self, msg: Connect) -> str | None:
        """What lets this CONNECT replace a live session of its client id: a verified
        login token (None: the daemon vouches), or the previous session's token."""
        if self.verifier is not None:
            return None
        return msg.previous.hex() if msg.previous is not None else ""

    def _reply(
        self,
        msg: Message,
        addr: Address,
        *,
        limit: int | None = None,
        count_withheld: bool = True,
    ) -> bool:
        """Send ``msg``; with ``limit`` (an unverified address) only if it is no larger."""
        data = encode(msg)
        if limit is not None and len(data) > limit:
            if count_withheld:
                self.counters["replies_withheld_amplification"] += 1
            return False
        self._send(data, addr)
        self.counters["datagrams_out"] += 1
        self.sent_by_type[msg.TYPE] += 1
        return True

    def _on_ping(self, msg: Ping, addr: Address, size: int) -> None:
        session = self.by_token.get(msg.session)
        if session is None or not self._touch(session, addr):
            self.counters["rejected_unknown_session"] += 1
            self._reply(Error(0, ErrorCode.UNKNOWN_SESSION), addr, limit=size)
            return
        self.counters["pings"] += 1
        self._send(encode_pong(session.seq), addr)
        self.counters["datagrams_out"] += 1
        self.sent_by_type[MessageType.PONG] += 1

    def _touch(self, session: Session, addr: Address) -> bool:
        """A datagram with the session's token arrived from ``addr``.

        From the session's own address it verifies the address (the token was only ever
        sent there) and keeps the session alive. From any other address it is refused:
        a token replayed from elsewhere must not redirect the session's datagrams (that
        would let anyone aim replies at a third party). A client whose address really
        changed (NAT rebinding) is told UNKNOWN_SESSION and connects again, with the
        same client id, without its user going offline.
        """
        if session.address != addr:
            self.counters["rejected_address_mismatch"] += 1
            return False
        session.verified = True
        session.last_seen = self.clock()
        if not session.closing:
            self.recency.move_to_end(session.token)
        return True

    def _on_session_message(
        self, msg: Disconnect | Friends | SnapshotRequest, addr: Address, size: int
    ) -> None:
        session = self.by_token.get(msg.session)
        if session is not None and not self._touch(session, addr):
            self._reply(Error(msg.request, ErrorCode.UNKNOWN_SESSION), addr, limit=size)
            return
        if session is None:
            if type(msg) is Disconnect:
                # Idempotent: a retried disconnect whose first copy worked is acknowledged.
                self.counters["disconnects_unknown"] += 1
                self._reply(DisconnectOk(msg.request), addr, limit=size)
            else:
                self.counters["rejected_unknown_session"] += 1
                self._reply(Error(msg.request, ErrorCode.UNKNOWN_SESSION), addr, limit=size)
            return
        job: Job
        if type(msg) is Disconnect:
            job = lambda: self._on_disconnect(msg, session)  # noqa: E731
        elif type(msg) is Friends:
            job = lambda: self._on_friends(msg, session)  # noqa: E731
        else:
            assert type(msg) is SnapshotRequest
            job = lambda: self._on_snapshot(msg, session)  # noqa: E731
        if isinstance(msg, Friends | SnapshotRequest) and self._session_over_limit(
            msg, session, addr, size
        ):
            return
        if not self._enqueue(session.client_id, job, msg.request, addr, size) and (
            type(msg) is SnapshotRequest
        ):
            # Refused after all (overload, stopping): it used up no interval.
            session.snapshot_at = -math.inf
            session.snapshot_request = -1

    def _admit_connect(self, msg: Connect, addr: Address, size: int) -> bool:
        """Limits and login token of a CONNECT, before it costs Redis anything. With
        auth, the address and the daemon are charged before the token is checked (so a
        flood of forged tokens is bounded) and the user only after (so forged CONNECTs
        naming a user cannot lock it out)."""
        limits = self.connect_limits
        if self.verifier is None:
            return not self._over_limit(limits, msg.user, msg.request, addr, size)
        if self._over_limit(limits, None, msg.request, addr, size):
            return False
        if not self._authenticate(msg, addr, size):
            return False
        return not self._over_limit(
            limits, msg.user, msg.request, addr, size, address=False, overall=False
        )

    def _over_limit(
        self,
        limiter: Limiter,
        user: str | None,
        request: int,
        addr: Address,
        size: int,
        *,
        address: bool = True,
        overall: bool = True,
    ) -> bool:
        """Charge one request of ``limiter``'s kind to the address, the user and the
        daemon (those asked for); if one of them is out of tokens, answer TRY_AGAIN (no
        larger than the request), count it and return True."""
        where = address_key(addr[0]) if address else None
        scope = limiter.admit(where, user, self.clock(), overall=overall)
        if scope is None:
            return False
        self.counters[f"rate_limited_{limiter.kind}_{scope}"] += 1
        self._reply(Error(request, ErrorCode.TRY_AGAIN), addr, limit=size)
        return True

    def _session_over_limit(
        self, msg: Friends | SnapshotRequest, session: Session, addr: Address, size: int
    ) -> bool:
        """The limits of a FRIENDS or SNAPSHOT_REQUEST of a known session (see
        docs/design.md, *Limits*); True if it was refused."""
        if type(msg) is Friends:
            # A multi-part SET is one request: only part 0 is charged (the list is
            # applied only once every part, part 0 included, has arrived).
            return msg.part == 0 and self._over_limit(
                self.friends_limits, session.user, msg.request, addr, size
            )
        now = self.clock()
        if now - session.snapshot_at < self.config.snapshot_interval:
            if msg.request == session.snapshot_request:
                # The request served last, again: its answer was lost (send it again,
                # from memory: Redis is not asked) or is still on its way (ignore this).
                for data in session.snapshot_answer:
                    self._send(data, session.address)
                self.counters["datagrams_out"] += len(session.snapshot_answer)
                self.sent_by_type[MessageType.SNAPSHOT] += len(session.snapshot_answer)
                replayed = "snapshots_replayed" if session.snapshot_answer else "snapshots_pending"
                self.counters[replayed] += 1
                return True
            self.counters["rate_limited_snapshot_session"] += 1
            self._reply(Error(msg.request, ErrorCode.TRY_AGAIN), addr, limit=size)
            return True
        if self._over_limit(self.snapshot_limits, session.user, msg.request, addr, size):
            return True
        session.snapshot_at = now
        session.snapshot_request = msg.request
        session.snapshot_answer = ()
        return False

    def _enqueue(self, client_id: str, job: Job, request: int, addr: Address, size: int) -> bool:
        """Queue ``job``; False if it was refused (TRY_AGAIN sent, counted)."""
        if self.stopping:
            self.counters["refused_stopping"] += 1
            self._reply(Error(request, ErrorCode.TRY_AGAIN), addr, limit=size)
            return False
        queue = self._queue_for(client_id)
        try:
            queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counters["dropped_overload"] += 1
            self._reply(Error(request, ErrorCode.TRY_AGAIN), addr, limit=size)
            return False
        return True

    def _queue_for(self, client_id: str) -> asyncio.Queue[Job]:
        """The one queue all of a client's jobs go through, so they run in order."""
        return self._queues[hash(client_id) % len(self._queues)]

    # -- jobs (run by workers; may await Redis) --------------------------------------

    async def _work(self, queue: asyncio.Queue[Job]) -> None:
        while not self._stopped:
            job = await queue.get()
            try:
                await job()
            except Exception:
                self.counters["internal_errors"] += 1
                log.exception("job failed")
            finally:
                queue.task_done()

    def _redis_failed(self, exc: Exception) -> None:
        self._redis_trouble_at = asyncio.get_running_loop().time()
        self.counters["redis_errors"] += 1
        now = self.clock()
        if now - self._last_redis_error_log >= REDIS_ERROR_LOG_INTERVAL:
            self._last_redis_error_log = now
            log.error("Redis operation failed: %s (repeats are counted, not logged)", exc)

    async def _on_connect(self, msg: Connect, addr: Address, size: int) -> None:
        if not self._reads_trusted():
            self._defer("connects", msg.request, addr, size)
            return
        friends = msg.friends
        if friends is not None and self.config.friend_lists == "app":
            friends = None  # the application sets friend lists, not clients
            self.counters["connect_friends_ignored"] += 1
        existing = self.by_client.get(msg.client_id)
        if existing is not None and existing.user != msg.user:
            self.counters["rejected_client_id_in_use"] += 1
            self._reply(Error(msg.request, ErrorCode.CLIENT_ID_IN_USE), addr, limit=size)
            return
        if existing is not None and existing.address == addr and not existing.closing:
            # A retried connect (its reply was lost): same session, same answer, once
            # Redis confirms the session is still this one (it may have been replaced
            # through another daemon, or lost with Redis's data: then put it back).
            mark = _SeqMark(existing)
            try:
                done = await self.presence.connected(
                    msg.client_id,
                    msg.user,
                    friends=friends,
                    address=f"{addr[0]}:{addr[1]}",
                    token=existing.token_hex,
                    restore=True,
                    number=msg.counter,
                    view=True,
                    before_view=mark,
                )
            except Superseded:
                self._drop(existing)  # a newer session elsewhere: this request starts anew
                existing = None
            except (PresenceError, RedisError, OSError) as exc:
                self._refuse(exc, msg.request, addr, size)
                return
            else:
                self.counters["connects_repeated"] += 1
                await self._send_connect_ok(msg, existing, addr, size, done.view, mark.seq)
                return
        session = Session(
            client_id=msg.client_id,
            user=msg.user,
            token=secrets.token_bytes(16),
            address=addr,
            last_seen=self.clock(),
        )
        # Hold the session before Redis knows it, so a notification decided meanwhile
        # finds it (it is numbered; the client repairs what it missed by snapshot).
        self._hold(session)
        mark = _SeqMark(session)
        try:
            done = await self._connect_new(msg, session, friends, addr, mark)
        except (PresenceError, RedisError, OSError) as exc:
            self._drop(session)
            if existing is not None and existing.token in self.by_token:
                self.by_client[msg.client_id] = existing  # the old session lives on
            self._refuse(exc, msg.request, addr, size)
            return
        if existing is not None:
            # Same client id and user, new address (the client restarted): the Redis
            # entry now names the new session; forget the old one without a transition.
            self._drop(existing)
            self.counters["sessions_replaced"] += 1
        self.counters["connects"] += 1
        if log.isEnabledFor(logging.DEBUG):
            _log_session("connected", session)
        await self._send_connect_ok(msg, session, addr, size, done.view, mark.seq)

    async def _connect_new(
        self,
        msg: Connect,
        session: Session,
        friends: tuple[str, ...] | None,
        addr: Address,
        mark: _SeqMark,
    ) -> Connection:
        """Put a new session into Redis. Without a proof (login token, previous session
        token) it may replace the client id's session there only if that one is dead:
        its owner's lease is gone, or this daemon holds it and it timed out."""
        connect = functools.partial(
            self.presence.connected,
            msg.client_id,
            msg.user,
            friends=friends,
            address=f"{addr[0]}:{addr[1]}",
            token=session.token_hex,
            number=msg.counter,
            view=True,
            before_view=mark,
        )
        try:
            return await connect(proof=self._proof(msg))
        except SessionInUse as exc:
            if not await self._session_dead(exc):
                raise
            return await connect(proof=None)  # the daemon vouches: that session is over

    async def _session_dead(self, in_use: SessionInUse) -> bool:
        """True if the session in the way has ended in all but Redis: held by a dead
        owner, or by us but timed out (or unknown to us: left by an earlier process)."""
        if not in_use.owner:
            return False  # (not an entry we can read: assume it lives)
        if in_use.owner == self.instance_id:
            try:
                held = self.by_token.get(bytes.fromhex(in_use.token))
            except ValueError:
                return False
            return held is None or self.clock() - held.last_seen > self.config.timeout
        return not await self.presence.owner_alive(in_use.owner)

    def _refuse(self, exc: Exception, request: int, addr: Address, size: int | None) -> None:
        if isinstance(exc, PresenceError):
            code = exc.code
            self.counters[f"rejected_{code.name.lower()}"] += 1
        else:
            code = ErrorCode.TRY_AGAIN
            self._redis_failed(exc)
        self._reply(Error(request, code), addr, limit=size)

    async def _send_connect_ok(
        self,
        msg: Connect,
        session: Session,
        addr: Address,
        size: int,
        view: list[FriendState] | None,
        seq: int | None,
    ) -> None:
        """Answer a CONNECT with the view read with it (``seq``: the session's sequence
        number when that read was sent), or, if there is none, with a fresh read."""
        complete = True
        if view is None or seq is None:
            # Taken before the read: a notification numbered while we read is then a
            # gap the client sees (and repairs), not one hidden inside the reply's `q`.
            seq = session.seq
            try:
                view = await self.presence.friend_view(session.user)
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
                view = []
                complete = False
        reply = ConnectOk(
            request=msg.request,
            session=session.token,
            ping_interval_ms=self.ping_interval_ms,
            timeout_ms=self.timeout_ms,
            seq=seq,
            friends=(),
            complete=complete,
        )
        # The address is not verified yet: the reply may be no larger than the connect.
        budget = min(size, MAX_DATAGRAM) - overhead(reply)
        parts = split_friend_states(view, budget) if view else [[]]
        if len(parts) > 1 or budget < 8:
            complete = False
        first = parts[0] if budget >= 8 else []
        reply = ConnectOk(
            request=msg.request,
            session=session.token,
            ping_interval_ms=self.ping_interval_ms,
            timeout_ms=self.timeout_ms,
            seq=seq,
            friends=tuple(first),
            complete=complete,
        )
        if len(encode(reply)) > size:
            # Even the first friend does not fit (a long name): answer without friends.
            reply = dataclasses.replace(reply, friends=(), complete=False)
        self._reply(reply, addr, limit=size)

    async def _on_disconnect(self, msg: Disconnect, session: Session) -> None:
        session.closing = True
        self.recency.pop(session.token, None)
        try:
            await self._remove(session, reason="disconnect")
        except (RedisError, OSError) as exc:
            # Keep the session so the client's retry finds it (or it times out later).
            session.closing = False
            session.last_seen = self.clock()
            self.recency[session.token] = session
            self._refuse(exc, msg.request, session.address, None)
            return
        self._reply(DisconnectOk(msg.request), session.address)

    async def _remove(self, session: Session, *, reason: str) -> None:
        """Remove the session from Redis, then from memory; raises on a Redis error."""
        await self.presence.disconnected(
            session.client_id, user=session.user, token=session.token_hex
        )
        self._drop(session)
        self.counters[f"removed_{reason}"] += 1
        if log.isEnabledFor(logging.DEBUG):
            _log_session("disconnected", session, reason=reason)

    async def _on_friends(self, msg: Friends, session: Session) -> None:
        if self.config.friend_lists == "app":
            self.counters["rejected_forbidden"] += 1
            self._reply(Error(msg.request, ErrorCode.FORBIDDEN), session.address)
            return
        if (
            msg.request == session.friend_request
            and session.friend_parts is not None
            and msg.parts != session.friend_part_count
        ):
            # A part that disagrees with the SET its `r` began: refused on its own (the
            # consistent parts still complete that SET).
            self.counters["rejected_invalid_field"] += 1
            self._reply(Error(msg.request, ErrorCode.INVALID_FIELD), session.address)
            return
        if msg.op is not FriendsOp.SET or msg.parts == 1:
            names: tuple[str, ...] = msg.names
        else:
            if msg.request != session.friend_request or session.friend_parts is None:
                session.friend_request = msg.request
                session.friend_part_count = msg.parts
                session.friend_parts = {}
            parts = session.friend_parts
            parts[msg.part] = msg.names
            if len(parts) < msg.parts:
                return  # wait for the other parts; the client resends all if no FriendsOk
            names = tuple(n for i in range(msg.parts) for n in parts.get(i, ()))
            session.friend_parts = None
            session.friend_request = -1
        change = {
            FriendsOp.ADD: self.presence.add_friends,
            FriendsOp.REMOVE: self.presence.remove_friends,
            FriendsOp.SET: self.presence.set_friends,
        }[msg.op]
        try:
            await change(session.user, names, origin=session.client_id, token=session.token_hex)
        except Superseded as exc:
            # Redis no longer lists this session (replaced elsewhere, or reaped): it is
            # dead. Forget it; the client connects again on UNKNOWN_SESSION.
            self._drop(session)
            self._refuse(exc, msg.request, session.address, MAX_DATAGRAM)
        except (PresenceError, RedisError, OSError) as exc:
            self._refuse(exc, msg.request, session.address, MAX_DATAGRAM)
        else:
            self.counters["friend_changes"] += 1
            self._reply(FriendsOk(msg.request), session.address)

    def _reads_trusted(self) -> bool:
        """False from a Redis error until the next renewal finds our lease held.

        Redis may have restarted empty meanwhile: then a friend view read from it lists
        no names, and a client would take that list as its own and declare it when told
        (GO_AWAY) that the lists were lost. The renewal tells (and sends that GO_AWAY
        first); until it has, views are not handed out: CONNECT and SNAPSHOT_REQUEST
        are answered TRY_AGAIN (retryable), at most a renewal interval (~1 s) long.
        """
        if self.presence.lease_ttl is None:
            return True
        return self.presence.renewed_at > self._redis_trouble_at

    def _defer(self, kind: str, request: int, addr: Address, size: int | None) -> None:
        self.counters[f"{kind}_deferred"] += 1
        self._reply(Error(request, ErrorCode.TRY_AGAIN), addr, limit=size)

    async def _on_snapshot(self, msg: SnapshotRequest, session: Session) -> None:
        if not self._reads_trusted():
            self._defer("snapshots", msg.request, session.address, None)
            return
        seq = session.seq  # taken before the read: later notifications supersede by version
        try:
            view = await self.presence.friend_view(session.user)
        except (RedisError, OSError) as exc:
            self._refuse(exc, msg.request, session.address, None)
            return
        empty = Snapshot(msg.request, 0, 1, seq, ())
        parts = split_friend_states(view, MAX_DATAGRAM - overhead(empty))
        self.counters["snapshots"] += 1
        answer = tuple(
            encode(Snapshot(msg.request, index, len(parts), seq, tuple(states)))
            for index, states in enumerate(parts)
        )
        for data in answer:
            self._send(data, session.address)
        self.counters["datagrams_out"] += len(answer)
        self.sent_by_type[MessageType.SNAPSHOT] += len(answer)
        interval = self.config.snapshot_interval
        if interval > 0 and session.snapshot_request == msg.request:
            # Kept for one interval, to answer the same request again if this was lost.
            session.snapshot_answer = answer
            asyncio.get_running_loop().call_later(
                interval, self._forget_snapshot_answer, session, answer
            )

    @staticmethod
    def _forget_snapshot_answer(session: Session, answer: tuple[bytes, ...]) -> None:
        if session.snapshot_answer is answer:
            session.snapshot_answer = ()

    # -- sessions ------------------------------------------------------------------

    def _hold(self, session: Session) -> None:
        self.by_token[session.token] = session
        self.by_client[session.client_id] = session
        self.recency[session.token] = session

    def _drop(self, session: Session) -> None:
        self.by_token.pop(session.token, None)
        self.recency.pop(session.token, None)
        if self.by_client.get(session.client_id) is session:
            del self.by_client[session.client_id]

    def expired(self, now: float) -> list[Session]:
        """Take the sessions silent for longer than the timeout out of the recency order.

        Cost is proportional to what expired: the order is by last-seen time, so the
        scan stops at the first session still alive.
        """
        deadline = now - self.config.timeout
        expired = []
        while self.recency:
            token, session = next(iter(self.recency.items()))
            if session.last_seen > deadline:
                break
            del self.recency[token]
            session.closing = True
            expired.append(session)
        return expired

    def sweep(self, now: float) -> int:
        """Queue the removal of every timed-out session (and retry the removals that
        failed before); returns how many were queued."""
        retries, self._failed_removals = self._failed_removals, []
        expired = retries + self.expired(now)
        for session in expired:
            self._enqueue_removal(session)
        restores, self._failed_restores = self._failed_restores, []
        for session in restores:
            self._enqueue_restore(session)
        return len(expired)

    def _enqueue_removal(self, session: Session) -> None:
        async def remove() -> None:
            try:
                await self._remove(session, reason="timeout")
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
                self._failed_removals.append(session)  # never lose a timeout: next sweep

        queue = self._queue_for(session.client_id)
        try:
            queue.put_nowait(remove)
        except asyncio.QueueFull:
            self._failed_removals.append(session)

    async def _reconcile_forever(self) -> None:
        """Now and then, compare what Redis says we own with what we hold."""
        while not self._stopped:
            await asyncio.sleep(RECONCILE_INTERVAL)
            await self.verify()

    async def register_again(self, state_lost: bool = False) -> None:
        """Our lease lapsed, so a survivor may have reaped our clients: put every held
        session back in Redis (same token: the client notices nothing, its friends see
        it come back online), unless its client id has a newer session elsewhere (then
        it is forgotten, and its next PING gets UNKNOWN_SESSION).

        Every client is also made to see a sequence gap, so it repairs its view by
        snapshot (what it was told during the fault may be incomplete). With
        ``state_lost`` (Redis lost its data, friend lists included), every client is
        sent GO_AWAY (state lost) so it connects again declaring its friends.
        """
        self.counters["lease_lost"] += 1
        log.info(
            "lease of %s taken again: putting back the %d clients held%s",
            self.instance_id,
            len(self.by_token),
            " and asking them to declare their friends again (Redis lost its data)"
            if state_lost
            else "",
            extra={
                "event": "lease_regained",
                "instance": self.instance_id,
                "clients": len(self.by_token),
                "state_lost": state_lost,
            },
        )
        for session in list(self.by_token.values()):
            session.seq += 1
            if state_lost and session.verified:
                self._reply(GoAway(session.token, GoAwayReason.STATE_LOST), session.address)
                self.counters["go_away_sent"] += 1
            self._enqueue_restore(session)
        self._verify_soon()

    def _enqueue_restore(self, session: Session) -> None:
        # Through the client's own queue, so it cannot overtake its disconnect.
        queue = self._queue_for(session.client_id)
        try:
            queue.put_nowait(functools.partial(self._restore, session))
        except asyncio.QueueFull:
            self._failed_restores.append(session)  # never lose a session: next sweep

    async def _restore(self, session: Session) -> None:
        if session.closing or self.by_token.get(session.token) is not session:
            return
        address = f"{session.address[0]}:{session.address[1]}"
        try:
            restored = await self.presence.connected(
                session.client_id,
                session.user,
                address=address,
                token=session.token_hex,
                restore=True,
            )
        except Superseded:
            self.counters["sessions_replaced_elsewhere"] += 1
            self._drop(session)
        except PresenceError as exc:
            if exc.code is not ErrorCode.TRY_AGAIN:
                self.counters["lost_on_restore"] += 1
                self._drop(session)
            else:
                self._failed_restores.append(session)
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            self._failed_restores.append(session)
        else:
            if restored.new_entry:
                # Its entry was gone: whatever was told meanwhile missed this client.
                # The gap makes it fetch a snapshot, taken after this restore.
                session.seq += 1
                self.counters["restored"] += 1

    def _verify_soon(self) -> None:
        """Compare what we hold with what Redis lists a little after a lapse (a reaper
        may still have been busy with our clients when we put them back)."""
        if self._verify_task is not None and not self._verify_task.done():
            return
        delay = 2 * self.presence.renew_interval if self.presence.lease_ttl else 1.0

        async def later() -> None:
            await asyncio.sleep(delay)
            await self.verify()

        self._verify_task = asyncio.get_running_loop().create_task(later())

    async def verify(self) -> None:
        """Remove entries Redis says we own but we do not hold; put back the sessions we
        hold that Redis no longer lists (reaped, or lost with Redis's data)."""
        listed: set[str] = set()
        try:
            self.counters["reconciled"] += await self.presence.reconcile(
                lambda token: _token_bytes(token) in self.by_token, listed=listed
            )
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            return
        for session in list(self.by_token.values()):
            if not session.closing and session.token_hex not in listed:
                self.counters["verify_missing"] += 1
                self._enqueue_restore(session)

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped:
            due = loop.time() + self.config.sweep_interval
            await asyncio.sleep(self.config.sweep_interval)
            self.sweep_delay = max(loop.time() - due, 0.0)
            self.sweep(self.clock())

    # -- notifications -------------------------------------------------------------

    async def deliver(self, deliveries: list[Delivery]) -> None:
        """Send each notification from the daemon that holds its client; hand the
        others to their owners' inboxes."""
        remote = []
        for d in deliveries:
            if d.owner == self.instance_id:
                self.notify(d.client_id, d.token, d.friend)
            else:
                remote.append(d)
        if remote:
            await self.presence.publish(remote)
            self.counters["handoffs"] += len(remote)

    def notify(self, client_id: str, token: str, friend: FriendState | None) -> None:
        """Number and send one notification to a client this daemon holds; with no
        ``friend``, only number it: the gap makes the client fetch a snapshot.

        A notification about a friend that this session was sent a NOTIFY about less
        than ``notify_coalesce`` seconds ago is held instead: a newer one replaces it,
        and only the newest is numbered and sent, when the window ends (a friend that
        flaps costs each watcher one NOTIFY per window). A state no newer than what was
        last sent or held about that friend is dropped: the client would ignore it.
        """
        session = self.by_client.get(client_id)
        if session is None or session.token_hex != token:
            self.counters["notifications_stale"] += 1
            return
        if friend is None:
            session.seq += 1
            self.counters["resyncs"] += 1
            return
        if not session.verified:
            session.seq += 1
            self.counters["notifications_unverified"] += 1
            return
        window = self.config.notify_coalesce
        if window > 0:
            held = session.held.get(friend.name)
            if held is not None:
                if friend.version > held.version:
                    session.held[friend.name] = friend
                self.counters["notifications_coalesced"] += 1
                return
            now = self.clock()
            notified = session.notified
            while notified and next(iter(notified.values()))[0] <= now - window:
                notified.popitem(last=False)
            last = notified.get(friend.name)
            if last is not None:
                sent_at, version = last
                if friend.version <= version:
                    self.counters["notifications_superseded"] += 1
                    return
                session.held[friend.name] = friend
                self.counters["notifications_held"] += 1
                asyncio.get_running_loop().call_later(
                    max(sent_at + window - now, 0.0), self._flush_held, session, friend.name
                )
                return
        self._send_notify(session, friend)

    def _send_notify(self, session: Session, friend: FriendState) -> None:
        """Number and send a NOTIFY (numbered only now: the sequence stays gap-free
        over what is actually sent, so a held notification never shows as a gap)."""
        session.seq += 1
        self.counters["notifications"] += 1
        self._reply(Notify(session.seq, friend), session.address)
        if self.config.notify_coalesce > 0:
            session.notified[friend.name] = (self.clock(), friend.version)
            session.notified.move_to_end(friend.name)

    def _flush_held(self, session: Session, name: str) -> None:
        """The coalescing window of ``name`` at ``session`` ended: send the newest state
        held, unless the session ended meanwhile (then it is dropped)."""
        friend = session.held.pop(name, None)
        if friend is None:
            return
        if self._stopped or session.closing or self.by_token.get(session.token) is not session:
            self.counters["notifications_dropped_ended"] += 1
            return
        self._send_notify(session, friend)

    async def _listen_inbox(self) -> None:
        """Receive notifications other daemons hand over for our clients."""
        channel = keys.inbox_channel(self.instance_id)
        failed = False
        while not self._stopped:
            # Sharded on a cluster: the inbox follows the master serving its slot (a
            # failover or resharding ends the subscription, and it is made again).
            inbox = Inbox(self.presence.redis, channel)
            try:
                await inbox.subscribe()
                if failed:
                    # Hand-offs published while we were not subscribed are lost, and
                    # only the sender knew of them. Count one notification for every
                    # session: its next Pong shows a gap and the client asks for a
                    # snapshot, which repairs whatever was missed. A lost notice that
                    # a session was replaced elsewhere is found by comparing what we
                    # hold with what Redis lists (the replacing connect took the
                    # session out of our set): soon, not at the next minute.
                    for session in self.by_token.values():
                        session.seq += 1
                    self._verify_soon()
                    failed = False
                while not self._stopped:
                    data = await inbox.get(timeout=1.0)
                    if data is not None:
                        self._on_inbox(data)
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)  # (also: views wait for the next renewal)
                failed = True
                await asyncio.sleep(1.0)
            finally:
                await inbox.aclose()

    def _on_inbox(self, data: Any) -> None:
        try:
            deliveries, replaced = parse_inbox(data)
        except ValueError:
            self.counters["inbox_malformed"] += 1
            log.exception("malformed inbox message")
            return
        for d in deliveries:
            self.notify(d.client_id, d.token, d.friend)
        for r in replaced:
            self._forget_replaced(r)

    def _forget_replaced(self, replaced: Replaced) -> None:
        """The client connected again through another daemon, or an operator kicked it
        (then it is told GO_AWAY kicked): forget this session (a disconnect or removal
        of it in flight finds nothing, as its token is guarded)."""
        session = self.by_client.get(replaced.client_id)
        if session is not None and session.token_hex == replaced.token:
            if replaced.kicked:
                self.counters["sessions_kicked"] += 1
                self._reply(GoAway(session.token, GoAwayReason.KICKED), session.address)
                self.counters["go_away_sent"] += 1
            else:
                self.counters["sessions_replaced_elsewhere"] += 1
            self._drop(session)
