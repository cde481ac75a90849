"""The presence library: who is online, decided in Redis, usable without any UDP.

Theory of operation
-------------------
A *client* (a terminal, a device, a WebSocket) is connected from ``connected()`` until
``disconnected()``. A *user* is online while at least one of its clients is connected.
Each user's state lives under keys that share the user's hash tag (see ``keys.py``):
its clients, a version counter, the friends it declared and the reverse index of who
declared it. Every state change is one Lua script over one user's keys, so each
offline->online and online->offline transition is decided exactly once, by whichever
call made the client count go 1->0 or 0->1, however many processes call concurrently.

A client id belongs to one user at a time: ``presence:client:{id}`` binds it to
"user|token|claimed_ms". A binding whose user has no entry for the client id may pass
to another user only once it is ``stale_binding_after`` seconds old (younger, it is most
likely a connect in flight), and every connect reads the binding back after writing its
entry, so two users racing for one client id never both get it.

Each connect gets a fresh session token; removals are guarded by it, so a late or stale
disconnect (or the sweep of a daemon that lost the client to another one) never removes
a newer session.

Mutuality (A declares B and B declares A) can be read from one user's keys alone:
mutual(A) = friends(A) & fans(A). How user B looks to viewer A (online and mutual) is
likewise a function of B's keys alone, and every change to them bumps B's version; so a
(name, visible, version) triple is a consistent fact that clients may apply in any
order, keeping the highest version.

Work that spans hash tags (telling mutual friends, updating the reverse index of a
changed friend) happens after the atomic decision, as pipelined calls. Notifications
are handed to the ``deliver`` callback as :class:`Delivery` records; the daemon routes
them to the daemon that owns each client. Transitions decided by this instance go to
listeners registered with :meth:`Presence.subscribe` or :meth:`Presence.transitions`.

Told at least once: the script that decides a transition also writes it to the user's
outbox (``pending``, same hash tag, so the decision and the record are one atomic
write). Telling is confirmed (``told.lua``) only after every mutual friend's owner has
been handed the news. Until then every later connect or disconnect of that user, and
so every retry, reap or reconciliation, reads the outbox back and tells it again: a
decision whose answer was lost, or whose decider died, still reaches every friend.
Versions make a repeat harmless, and versions never fall below the wall clock (in ms),
so they keep growing even across a Redis that restarted empty.

A transition decided while an older one is still unconfirmed goes in front of it in the
outbox ("new;old"): friends need only the newest, but each older one still has to
reach the transition stream, and the teller of the newest appends them first.

The transition stream: before a teller confirms a transition told, it appends it to one
capped Redis Stream (``keys.TRANSITIONS_STREAM``, ``XADD MAXLEN ~``), in the same
pipeline as its first fan-out read. Only once that append succeeded is ``told.lua``
run, so a transition whose teller died or lost Redis stays in the outbox and is
appended when it is told again: every transition reaches the stream at least once
(repeats carry the same user and version). :meth:`Presence.watch` reads it, resumable
by entry id, and raises :class:`StreamGap` rather than skip entries the cap trimmed or
a Redis restart lost.

Fencing: an owner's lease is renewed by ``lease.lua``, which never re-creates a lapsed
lease and answers with the moment (on Redis's clock) the lease runs out. Every connect
carries that moment; ``connect.lua`` refuses to write once it has passed. So a write
delayed in a socket, or sent by a stalled or partitioned owner, cannot land after a
survivor may have reaped that owner's clients. An owner whose lease lapsed takes a new
one and is asked (``on_lease_lost``) to put back the sessions it still holds; putting
back (``restore``) never replaces a newer session of the same client id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from presence_client.protocol import (
    MAX_COUNTER,
    ErrorCode,
    FriendState,
    ProtocolError,
    check_name,
)
from presence_daemon import keys
from presence_daemon.batch import Batcher
from presence_daemon.scripts import Call, Scripts
from presence_daemon.store import (
    UNAVAILABLE,
    Store,
    check_redis_url,
    cluster_client,
    is_cluster_url,
    publish_verb,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_FRIENDS: Final = 1000
STALE_BINDING_AFTER: Final = 10.0
"""Seconds before a client id's binding with no connected entry may go to another user."""
DEFAULT_LEASE_TTL: Final = 10.0
"""Seconds an owner's lease lives unless renewed; survivors reap its clients after. Longer
than a client needs to notice a dead daemon and fail over (see docs/design.md)."""
LEASE_RENEW_INTERVAL: Final = 1.0
"""Seconds between renewals (a third of the TTL if that is shorter)."""
MARKER_TTL: Final = 86_400.0
"""Seconds an owner's marker outlives its last renewal (it tells a lapse from data loss)."""
FENCE_MARGIN: Final = 0.5
"""Seconds before the lease runs out at which writes stop (a tenth of the TTL if that
is shorter): room for clock differences between the nodes of a cluster."""
DEFAULT_REDIS_TIMEOUT: Final = 2.0
"""Seconds a Redis call may take before it fails (its effect may still happen later)."""
DEFAULT_MAX_CONNECTIONS: Final = 64
"""Redis connections of a library instance's own pool; further calls wait for one."""
REAP_BATCH: Final = 100
"""Clients of a dead owner listed per round trip while reaping."""
REAP_CONCURRENCY: Final = 16
"""Disconnects of a dead owner's clients in flight at once."""
CLOSE_GRACE: Final = 2.5
"""Seconds close() waits for pending fan-out retries."""
LEASE_ERROR_LOG_INTERVAL: Final = 5.0
FAN_OUT_RETRY_DELAYS: Final = (0.1, 0.25, 0.5, 1.0, 2.0)
"""Seconds before each background retry of a fan-out that hit a Redis error; the last
one repeats until Redis answers or the instance closes."""
KICKED_MEMORY: Final = 600.0
"""Seconds a kicked session's token is remembered, so that no restore puts it back
(longer than a reconciliation interval and a lease lapse)."""
TRANSITION_QUEUE_SIZE: Final = 10_000
DEFAULT_STREAM_MAX_LEN: Final = 100_000
"""Entries the transition stream keeps, about (trimmed with ``MAXLEN ~``); 0: no stream."""
WATCH_BLOCK: Final = 0.25
"""Seconds one blocking read of the transition stream waits for a new entry (kept well
under the Redis client's timeout)."""
WATCH_PAGE: Final = 500
"""Stream entries read per round trip by :meth:`Presence.watch`."""
WATCH_REMEMBERED: Final = 10_000
"""(user, version) pairs :meth:`Presence.watch` remembers to drop repeats."""
OUTBOX_GRACE: Final = 2.0
"""Seconds an unconfirmed transition is left to the call that decided it; older, any
call that touches the user tells it again (its decider lost the answer, or died)."""


class PresenceError(Exception):
    """A refused presence operation; ``code`` is the wire ErrorCode that describes it."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class Superseded(PresenceError):
    """A session could not be put back: the client id has a newer session (elsewhere)."""

    def __init__(self, client_id: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_SESSION, f"client id {client_id!r} has a newer session")


@dataclass(frozen=True, slots=True)
class _Admission:
    """What lets a connect in: its connect number (0: none) and its proof ('*': the
    caller vouches; else the token of the session it may replace, '' for none)."""

    number: int
    proof: str


class SessionInUse(PresenceError):
    """The client id has a session this connect has no proof it may replace."""

    def __init__(self, client_id: str, entry: str) -> None:
        super().__init__(
            ErrorCode.CLIENT_ID_IN_USE,
            f"client id {client_id!r} has a live session this connect may not replace",
        )
        self.entry = entry
        """The session's entry, "token|owner|address"."""

    @property
    def owner(self) -> str:
        """The owner holding that session ('' if the entry cannot be read)."""
        return self.entry.split("|", 2)[1] if self.entry.count("|") >= 2 else ""

    @property
    def token(self) -> str:
        """That session's token (hex)."""
        return self.entry.split("|", 1)[0]


def _refusal(status: int, client_id: str, previous: Any) -> PresenceError:
    """The error for a connect.lua status other than 1 (nothing was written)."""
    if status == 2:
        return Superseded(client_id)
    if status == 3:
        return PresenceError(ErrorCode.STALE, f"a replayed connect of client id {client_id!r}")
    if status == 4:
        return SessionInUse(client_id, _text(previous))
    return PresenceError(ErrorCode.TRY_AGAIN, "this owner's lease ran out")


class StreamGap(Exception):
    """Entries of the transition stream after ``after`` are gone: the cap trimmed past
    it (the consumer fell too far behind) or the stream was lost (Redis restarted
    empty). Transitions may have been missed: read current state again (``query``),
    then watch again from ``"0"`` (the oldest entry kept) or from now (None)."""

    def __init__(self, after: str) -> None:
        super().__init__(
            f"transition stream entries after {after} are gone (trimmed by the cap, or "
            "the stream was lost): transitions may have been missed"
        )
        self.after = after
        """The last entry id the consumer had."""


class InstanceIdInUse(RuntimeError):
    """Another live process holds this instance id's lease."""


def redis_client(
    url: str,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    timeout: float = DEFAULT_REDIS_TIMEOUT,
) -> Store:
    """A Redis client configured the way the presence library needs it: a cluster
    client for a ``redis+cluster://`` URL (see :func:`store.cluster_client`).

    A blocking pool (a call waits, up to ``timeout`` more, for a free connection instead
    of raising "too many connections"); every call fails after ``timeout`` seconds
    instead of hanging on a stalled server; a call on a connection that turns out to be
    dead (Redis restarted) is sent again on a fresh one (every script is idempotent, so
    a repeat is harmless).
    """
    if is_cluster_url(url):
        return cluster_client(url, max_connections=max_connections, timeout=timeout)
    check_redis_url(url)
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # Only a dead connection is worth a second try: a timeout means Redis is slow or
        # unreachable, and the caller's own retry (the client's) is the better judge.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, (RedisConnectionError,)),
    )
    return Redis.from_pool(pool)


@dataclass(frozen=True, slots=True)
class Transition:
    """A user went online or offline."""

    user: str
    """Whose state changed."""
    online: bool
    """True for offline->online, False for online->offline."""
    version: int
    """The user's state version after the change."""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry of the transition stream (see :meth:`Presence.watch`)."""

    id: str
    """The stream entry id ("ms-seq"): pass it as ``after`` to resume after it."""
    transition: Transition
    """What changed. A transition told twice (its first teller died before it
    confirmed) is in the stream twice, with the same (user, version): key on that."""
    decided_ms: int
    """When it was decided, in ms since the epoch (Redis's clock)."""
    decided_by: str
    """Instance id of the daemon or library instance that decided it, or, if
    ``retold``, of the one that told it again (the decider is not recorded)."""
    retold: bool
    """True if told again by a call that found it unconfirmed in the outbox."""


@dataclass(slots=True)
class _Record:
    """The stream appends of one telling (done at most once per telling)."""

    commands: list[tuple[str | int, ...]]
    done: bool = False


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notification for one connected client."""

    owner: str
    """Instance id of the daemon that holds the client."""
    client_id: str
    """The client to tell."""
    token: str
    """The session the notification is for (hex); a newer session ignores it."""
    friend: FriendState | None
    """What to tell: a friend's name, visible status and version; None means "your
    user's friend list changed": the client should fetch a snapshot (the daemon makes
    it see a sequence gap), as a NOTIFY cannot say that a name was removed."""


@dataclass(frozen=True, slots=True)
class Connection:
    """What ``connected()`` decided."""

    token: str
    """Session token (hex) now bound to the client id."""
    went_online: bool
    """True if this call took the user from offline to online."""
    version: int
    """The user's state version after the call."""
    new_entry: bool = True
    """True if the client id had no entry before (for a restore: it had been removed, so
    the session missed whatever was told while it was gone)."""
    view: list[FriendState] | None = None
    """With ``view=True``: how each declared friend looks to the user, as
    :meth:`Presence.friend_view` answers, read after the connect (None if that read
    failed: the connect itself stands)."""


@dataclass(frozen=True, slots=True)
class _View:
    """A connect's request for the friend view (see ``Presence.connected``)."""

    before: Callable[[], object] | None


@dataclass(slots=True)
class _ClientLock:
    """Orders the calls for one client id; lives while ``users`` hold or await it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


Deliver = Callable[[list[Delivery]], Awaitable[None]]
Listener = Callable[[Transition], None]


_TOKEN_RE: Final = re.compile(r"[0-9a-f]{8,64}")


def _names(names: Iterable[str]) -> list[str]:
    """Validated names, duplicates removed, order kept."""
    return list(dict.fromkeys(check_name(name, "friend name") for name in names))


@dataclass(frozen=True, slots=True)
class Replaced:
    """A session of a client this owner held was replaced through another owner."""

    client_id: str
    """The client that connected again elsewhere."""
    token: str
    """The session (hex) that ended: its holder should forget it."""
    kicked: bool = False
    """True if an operator removed the session (:meth:`Presence.kick`): its holder
    tells the client GO_AWAY (kicked)."""


def parse_inbox(data: str | bytes) -> tuple[list[Delivery], list[Replaced]]:
    """The deliveries and replaced sessions in one inbox message (see
    :meth:`Presence.publish`) for the owner that received it; raises ValueError if the
    message is malformed."""
    try:
        deliveries, replaced = [], []
        items = json.loads(data)
        if type(items) is not list:
            raise ValueError("not a list")
        for item in items:
            if type(item) is not list or len(item) not in (2, 3, 5):
                raise ValueError(f"bad item {item!r}")
            if len(item) == 2:
                client_id, token = item
                replaced.append(Replaced(check_name(client_id, "client id"), _inbox_token(token)))
                continue
            if len(item) == 3 and item[2] == "kick":  # [client id, token, "kick"]
                c, t, _ = item
                replaced.append(Replaced(check_name(c, "client id"), _inbox_token(t), True))
                continue
            if len(item) == 3:  # [client id, token, 0]: the user's list changed
                c, t, zero = item
                if type(zero) is not int or zero != 0:
                    raise ValueError(f"bad item {item!r}")
                deliveries.append(Delivery("", check_name(c, "client id"), _inbox_token(t), None))
                continue
            c, t, n, o, v = item
            if type(o) is not bool or type(v) is not int or v < 0:
                raise ValueError(f"bad friend state {item!r}")
            friend = FriendState(check_name(n, "friend name"), o, v)
            deliveries.append(Delivery("", check_name(c, "client id"), _inbox_token(t), friend))
        return deliveries, replaced
    except (TypeError, ValueError, ProtocolError) as exc:
        raise ValueError(f"malformed inbox message: {exc}") from None


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Cancel ``tasks`` and wait for them, bounded.

    A cancellation can be swallowed (on Python 3.11, ``asyncio.wait_for`` inside a
    library call may eat it), so a task that is still running is cancelled again; a
    shutdown never waits without bound for a loop that missed its cancellation.
    """
    pending = {task for task in tasks if not task.done()}
    for attempt in range(3):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=timeout if attempt == 0 else 1.0)
    log.error("%d tasks did not stop: %s", len(pending), [t.get_name() for t in pending])


def _inbox_token(value: object) -> str:
    if type(value) is not str or not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"bad session token {value!r}")
    return value


def _raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled and a library call swallowed it
    (redis-py's cluster client can, on Python 3.11): a watch stops when cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


_STREAM_ID_RE: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _stream_entry(entry_id: str, raw: Any) -> StreamEntry | None:
    """A transition stream entry from its flat field list (None if malformed)."""
    try:
        fields = {_text(k): _text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}
        transition = Transition(fields["user"], fields["online"] == "1", int(fields["version"]))
        return StreamEntry(
            entry_id,
            transition,
            int(fields["decided_ms"]),
            fields.get("decided_by", ""),
            fields.get("retold", "0") == "1",
        )
    except (KeyError, TypeError, ValueError):
        return None


def _outbox_part(part: str) -> tuple[bool, int, int]:
    """(online, version, decided_ms) of one "online|version|decided_ms" outbox part; an
    older part without its decision time ("online|version") gives 0 for it."""
    online, version, *since = part.split("|", 2)
    return online == "1", int(version), int(since[0]) if since else 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(value: Any) -> tuple[str, str, str]:
    """Split a clients-hash value into (token, owner, address)."""
    token, owner, address = _text(value).split("|", 2)
    return token, owner, address


class Presence:
    """Presence state in Redis for any asyncio program.

    ``redis`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` client (see
    :func:`redis_client`).
    ``instance_id`` names this process as the owner of the clients it connects.
    ``deliver`` receives every notification that a change decided here causes; by
    default (:meth:`publish`) each goes to the inbox channel of the owner of the client
    it is for. An owner that holds clients of its own (a WebSocket backend, say)
    subscribes to ``keys.inbox_channel(instance_id)`` with :class:`store.Inbox` (sharded
    on a cluster) and reads what arrives with
    :func:`parse_inbox`. ``clock`` (wall-clock seconds) dates client-id bindings (see
    ``stale_binding_after``) and seeds versions. ``on_lease_lost(state_lost)`` is
    awaited when the lease was found lapsed (``state_lost``: Redis forgot this owner
    altogether, so friend lists may be gone too). ``stream_max_len`` caps the transition
    stream (see :meth:`watch`; 0: this instance appends nothing). Call :meth:`start`
    once before use.

    Calls for one client id take effect in the order they were made (each waits for
    the one before it); calls for different client ids run concurrently.
    """

    def __init__(
        self,
        redis: Store,
        *,
        instance_id: str | None = None,
        max_friends: int = DEFAULT_MAX_FRIENDS,
        deliver: Deliver | None = None,
        stale_binding_after: float = STALE_BINDING_AFTER,
        lease_ttl: float | None = DEFAULT_LEASE_TTL,
        on_lease_lost: Callable[[bool], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
        stream_max_len: int = DEFAULT_STREAM_MAX_LEN,
    ) -> None:
        if stream_max_len < 0:
            raise ValueError("stream_max_len is 0 (no stream) or more")
        self.redis = redis
        self.io = Batcher(redis)
        self._publish = publish_verb(redis)
        """PUBLISH, or SPUBLISH on a cluster (see store.py)."""
        """The hot paths' commands go through it: those of one event-loop tick leave as
        one pipeline (see batch.py)."""
        self.instance_id = instance_id or f"lib-{secrets.token_hex(4)}"
        self.max_friends = max_friends
        self.deliver: Deliver = deliver or self.publish
        self.stale_binding_after = stale_binding_after
        self.lease_ttl = lease_ttl
        self.on_lease_lost = on_lease_lost
        self.clock = clock
        self.stream_max_len = stream_max_len
        """Entries the transition stream keeps, about; 0: transitions are not appended."""
        self._clock_offset = 0.0
        self.scripts = Scripts()
        self.fan_out_failures = 0
        """Fan-out attempts that hit a Redis error (each is retried until it succeeds)."""
        self.reaped = 0
        """Clients of dead owners this instance disconnected."""
        self.retold = 0
        """Transitions told again because their first telling was not confirmed."""
        self._listeners: list[Listener] = []
        self._retries: set[asyncio.Task[None]] = set()
        self.lease_losses = 0
        """Times the lease was found lost at renewal."""
        self.cleanup_failures = 0
        """Unbindings and owner-set removals that failed after a disconnect (harmless
        leftovers: a stale binding passes on after ``stale_binding_after``, a stale
        owner-set member is dropped by the next reap or restart)."""
        self._lease_tasks: list[asyncio.Task[None]] = []
        self._lease_token = ""
        self.fence_ms = 0
        """When the lease runs out (ms, Redis's clock), less a margin; 0 without a lease.
        Every connect carries it, and Redis refuses it once that moment has passed."""
        self._last_lease_error = -LEASE_ERROR_LOG_INTERVAL
        self._client_locks: dict[str, _ClientLock] = {}
        self._closing = False
        self._reap_after = 0.0
        """Event-loop time before which this instance reaps nobody (see _reap_forever)."""
        self._renewed_at = 0.0
        """Event-loop time of the last renewal that found the lease held."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Presence:
        """Build a Presence with its own Redis client for ``url`` (see :func:`redis_client`)."""
        return cls(redis_client(url), **kwargs)

    async def start(self) -> None:
        """Load the Lua scripts and, with a lease, take it and keep it.

        Raises if Redis is unreachable or a script is broken, and InstanceIdInUse if a
        live process holds this instance id. A lease left by a dead process of the same
        id is waited out (at most one TTL); then the clients it left in Redis are
        disconnected (this process holds none of them) and dead owners are reaped from
        then on.
        """
        await self.scripts.load(self.redis)
        seconds, micros = await self.redis.time()
        self._clock_offset = seconds + micros / 1e6 - self.clock()
        if self.lease_ttl is None:
            return
        await self._take_lease()
        loop = asyncio.get_running_loop()
        self._renewed_at = loop.time()
        await self.reap(self.instance_id, even_if_alive=True)
        self._lease_tasks = [
            loop.create_task(self._renew_forever(), name=f"lease-{self.instance_id}"),
            loop.create_task(self._reap_forever(), name=f"reaper-{self.instance_id}"),
        ]

    async def close(self) -> None:
        """Stop the lease tasks, let pending fan-out retries finish (briefly), give up
        the lease and close the Redis client.

        Clients still connected stay connected in Redis: disconnect them first for a
        clean stop. (If this process is the only owner, nobody reaps them; a process
        started later with the same instance id clears them.)
        """
        self._closing = True
        await stop_tasks(self._lease_tasks)
        self._lease_tasks = []
        if self._retries:
            _, pending = await asyncio.wait(set(self._retries), timeout=CLOSE_GRACE)
            for task in pending:
                task.cancel()
        await self.io.close()
        if self.lease_ttl is not None and self._lease_token:
            try:
                await self._give_up_lease()
            except (RedisError, OSError) as exc:
                log.warning("could not give up the lease: %s", exc)
        await self.redis.aclose()

    def now(self) -> float:
        """Wall-clock seconds as Redis sees them (our clock, corrected at start())."""
        return self.clock() + self._clock_offset

    def _now_ms(self) -> int:
        return round(self.now() * 1000)

    @contextlib.asynccontextmanager
    async def _in_order(self, client_id: str) -> AsyncIterator[None]:
        """Run the body after every earlier call for ``client_id`` (FIFO, per client).

        The lock lives while any call holds or awaits it (counted: a released lock
        looks free before its next waiter has woken up to take it).
        """
        entry = self._client_locks.get(client_id)
        if entry is None:
            entry = self._client_locks[client_id] = _ClientLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._client_locks[client_id]

    # -- leases: a survivor disconnects the clients of an owner that died -------------

    @property
    def _lease_ms(self) -> int:
        assert self.lease_ttl is not None
        return max(1, round(self.lease_ttl * 1000))

    @property
    def renewed_at(self) -> float:
        """Event-loop time of the last renewal that found the lease held (0: none yet)."""
        return self._renewed_at

    @property
    def renew_interval(self) -> float:
        """Seconds between lease renewals."""
        return min(LEASE_RENEW_INTERVAL, self._lease_ms / 3000)

    async def _lease_call(self, mode: str) -> tuple[int, int]:
        status, value = await self.scripts.call(
            self.redis,
            "lease",
            [keys.lease_key(self.instance_id), keys.marker_key(self.instance_id)],
            [self._lease_token, self._lease_ms, mode, round(MARKER_TTL * 1000)],
        )
        if status == 1:
            margin = min(FENCE_MARGIN * 1000, self._lease_ms / 10)
            self.fence_ms = int(value) - round(margin)
        return int(status), int(value)

    async def _take_lease(self) -> None:
        """Take the lease for this instance id, waiting out one a dead process left.

        A live holder renews its lease every ``renew_interval``: a time to live that
        goes up between two looks proves it, and InstanceIdInUse is raised at once.
        """
        self._lease_token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lease_ms / 1000 + 1
        last_ttl: int | None = None
        while True:
            status, ttl = await self._lease_call("take")
            if status == 1:
                break
            if (last_ttl is not None and ttl > last_ttl) or loop.time() > deadline:
                raise InstanceIdInUse(
                    f"instance id {self.instance_id!r} is in use by another live process"
                )
            last_ttl = ttl
            await asyncio.sleep(min(max(ttl, 10), 100) / 1000)
        await self.redis.sadd(keys.OWNERS_KEY, self.instance_id)

    async def renew_lease(self) -> bool:
        """Renew the lease (and the registration); False if it had been lost meanwhile.

        A lost lease (it lapsed during a stall, a partition or a Redis outage, or Redis
        lost its data) means a survivor may have reaped this instance's clients: a new
        lease is taken at once and ``on_lease_lost`` is called so the owner can put its
        sessions back.
        """
        pipe = self.redis.pipeline(transaction=False)
        self.scripts.queue(
            pipe,
            "lease",
            [keys.lease_key(self.instance_id), keys.marker_key(self.instance_id)],
            [self._lease_token, self._lease_ms, "renew", round(MARKER_TTL * 1000)],
        )
        pipe.sadd(keys.OWNERS_KEY, self.instance_id)
        result, _ = await pipe.execute(raise_on_error=False)
        if isinstance(result, NoScriptError):
            await self.scripts.load(self.redis)
            return await self.renew_lease()
        if isinstance(result, Exception):
            raise result
        status, value = int(result[0]), int(result[1])
        if status == 1:
            margin = min(FENCE_MARGIN * 1000, self._lease_ms / 10)
            self.fence_ms = value - round(margin)
            self._renewed_at = asyncio.get_running_loop().time()
            return True
        state_lost = status == 3
        self.lease_losses += 1
        self._reap_after = asyncio.get_running_loop().time() + self._lease_ms / 1000
        log.error(
            "lease of %s was lost (%s): its clients may have been reaped%s",
            self.instance_id,
            "Redis lost its data"
            if state_lost
            else f"stall, partition or Redis outage longer than {self._lease_ms / 1000:.1f} s",
            "; putting them back" if self.on_lease_lost else "",
        )
        self._lease_token = secrets.token_hex(8)
        await self._lease_call("take")
        if self.on_lease_lost is not None:
            self._background(self.on_lease_lost(state_lost))
        return False

    async def _give_up_lease(self) -> None:
        """Clean stop: drop our lease, and the registration if nothing is owned any more."""
        key = keys.lease_key(self.instance_id)
        if _text(await self.redis.get(key) or "") == self._lease_token:
            await self.redis.delete(key, keys.marker_key(self.instance_id))
        if not await self.redis.scard(keys.owned_key(self.instance_id)):
            await self.redis.srem(keys.OWNERS_KEY, self.instance_id)

    async def _renew_forever(self) -> None:
        """Renew about once a second, in a task of its own: a long reap never delays it."""
        while not self._closing:
            await asyncio.sleep(self.renew_interval)
            try:
                await self.renew_lease()
            except Exception as exc:  # keep renewing whatever happens: lapsing is worse
                self._log_lease_error("renewing the lease", exc)

    async def _reap_forever(self) -> None:
        """Look for dead owners as often as the lease is renewed, but only after holding
        our own lease for a whole TTL: a lease that lapsed while we could not reach Redis
        either (Redis paused, restarted, or cut off from everyone) is no sign of death,
        and its owner takes it again within a renewal interval once Redis answers."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(self.renew_interval)
            # (And only while our own renewals go through: a reaper that cannot renew may
            # be the one cut off, and its view of the others' leases is stale.)
            now = loop.time()
            if now < self._reap_after or now - self._renewed_at > 2 * self.renew_interval:
                continue
            try:
                await self.reap_dead()
            except Exception as exc:
                self._log_lease_error("reaping dead owners", exc)

    def _log_lease_error(self, what: str, exc: Exception) -> None:
        now = self.clock()
        if now - self._last_lease_error >= LEASE_ERROR_LOG_INTERVAL:
            self._last_lease_error = now
            if isinstance(exc, RedisError | OSError):
                log.error(
                    "%s failed: %s (repeats within %.0f s not logged)",
                    what,
                    exc,
                    LEASE_ERROR_LOG_INTERVAL,
                )
            else:
                log.exception("%s failed", what)

    def _background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def reconcile(
        self, is_held: Callable[[str], bool], *, listed: set[str] | None = None
    ) -> int:
        """Disconnect every client this instance owns in Redis but does not hold.

        ``is_held(token)`` says whether a session token is live in this process. Such
        leftovers come from operations whose outcome was lost (a connect whose reply
        never came back from Redis). Cost: one SSCAN pass over this owner's set. The
        tokens of every member seen are added to ``listed`` if given, so the caller can
        find the sessions it holds that Redis no longer lists. Returns how many entries
        were removed.
        """
        owned = keys.owned_key(self.instance_id)
        removed = 0
        async for raw in self.redis.sscan_iter(owned, count=500):
            member = _text(raw)
            user, client_id, token = member.split("|", 2)
            if listed is not None:
                listed.add(token)
            if is_held(token):
                continue
            if await self.disconnected(client_id, user=user, token=token):
                removed += 1
            else:
                await self.redis.srem(owned, member)
        if removed:
            log.warning("reconcile: removed %d client entries this process no longer held", removed)
        return removed

    async def owner_alive(self, owner: str) -> bool:
        """True if ``owner`` holds its lease (alive, as far as Redis knows)."""
        return bool(await self.redis.exists(keys.lease_key(owner)))

    async def live_owners(self) -> list[str]:
        """The other registered owners whose lease is held (alive, as far as Redis knows)."""
        owners = sorted(_text(o) for o in await self.redis.smembers(keys.OWNERS_KEY))
        owners = [o for o in owners if o != self.instance_id]
        if not owners:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(keys.lease_key(owner))
        return [o for o, alive in zip(owners, await pipe.execute(), strict=True) if alive]

    async def reap_dead(self) -> int:
        """Disconnect the clients of every registered owner whose lease has expired;
        returns how many were disconnected."""
        owners = {_text(o) for o in await self.redis.smembers(keys.OWNERS_KEY)}
        owners.discard(self.instance_id)
        return sum([await self.reap(owner) for owner in sorted(owners)])

    async def reap(self, owner: str, *, even_if_alive: bool = False) -> int:
        """Disconnect the clients ``owner`` holds in Redis if its lease has expired (or
        regardless, with ``even_if_alive``); returns how many were disconnected.

        Each removal is guarded by the session token, so a client that reconnected
        elsewhere in the meantime is left alone and its friends see nothing. A member
        leaves the owner's set only once handled, so a pass that fails half-way loses
        nothing: the next one lists the rest again.
        """
        lease, owned = keys.lease_key(owner), keys.owned_key(owner)
        limit = asyncio.Semaphore(REAP_CONCURRENCY)

        async def handle(member: str) -> bool:
            user, client_id, token = member.split("|", 2)
            async with limit:
                if await self.disconnected(client_id, user=user, token=token):
                    return True
                await self.redis.srem(owned, member)  # nothing there any more: stale
                return False

        reaped, seen = 0, set[str]()
        status = 0
        while True:
            status, *listed = await self.scripts.call(
                self.redis, "reap", [lease, owned], [REAP_BATCH, "1" if even_if_alive else "0"]
            )
            members = [_text(m) for m in listed]
            if status != 1 or seen.issuperset(members):
                break  # alive, done, or only members whose removal keeps failing
            seen.update(members)
            results = await asyncio.gather(*map(handle, members), return_exceptions=True)
            reaped += sum(result is True for result in results)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                log.warning(
                    "reaping %s: %d removals failed (%s); retried next pass",
                    owner,
                    len(failed),
                    failed[0],
                )
                break
        if status == 2 and not even_if_alive:
            # Unregister, unless it came back meanwhile (its renewal registers it again).
            await self.redis.srem(keys.OWNERS_KEY, owner)
        if reaped:
            self.reaped += reaped
            log.warning("reaped %d clients of owner %s (lease expired)", reaped, owner)
        return reaped

    # -- transitions ---------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every transition this instance decides; returns a
        function that unsubscribes it. Listeners must not block."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def transitions(self) -> AsyncIterator[Transition]:
        """Iterate over the transitions this instance decides, from now on."""
        queue: asyncio.Queue[Transition] = asyncio.Queue(TRANSITION_QUEUE_SIZE)

        def put(transition: Transition) -> None:
            if queue.full():  # a consumer this far behind loses the oldest, loudly
                queue.get_nowait()
                log.warning("transition iterator overflowed; dropped the oldest")
            queue.put_nowait(transition)

        unsubscribe = self.subscribe(put)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    async def watch(
        self, after: str | None = None, *, block: float = WATCH_BLOCK
    ) -> AsyncGenerator[StreamEntry, None]:
        """Iterate over the transition stream: every transition decided by any daemon or
        library instance on this Redis, in the order they were appended, forever.

        ``after``: None for the entries appended from now on, ``"0"`` for every entry
        the stream still keeps, or the ``id`` of the last :class:`StreamEntry` a
        consumer had, to resume after it with nothing lost (within the cap).

        A transition is appended before it is confirmed told, so none is lost, but one
        whose first teller died is appended again when it is told again: such repeats
        carry the same (user, version), and the ones within the last
        ``WATCH_REMEMBERED`` transitions seen are dropped here. Consumers that resume
        should key on (user, version) too.

        Raises :class:`StreamGap` if entries after the one the consumer had are gone
        (the cap trimmed past it, or Redis lost the stream): read the state again and
        watch afresh. Raises ValueError for a malformed ``after``. While Redis is
        unreachable it retries (a cluster failover included); each blocking read waits
        at most ``block`` seconds, on a connection of the client's pool. It ends when
        this instance is closed.
        """
        stream = keys.TRANSITIONS_STREAM
        if after is None:
            last = await self.redis.execute_command("XREVRANGE", stream, "+", "-", "COUNT", 1)
            cursor = _text(last[0][0]) if last else "0-0"
        elif after in ("0", "0-0"):
            cursor = "0-0"
        elif _STREAM_ID_RE.fullmatch(after):
            cursor = after
        else:
            raise ValueError(f"a stream entry id is 'MS-SEQ' (or '0'): {after!r}")
        seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        failures = 0
        while not self._closing:
            try:
                kept, page = await self.scripts.call(
                    self.redis, "stream", [stream], [cursor, WATCH_PAGE]
                )
                if not kept:
                    raise StreamGap(cursor)
                if not page:
                    # Wait for a newer entry; the script reads it (and checks again).
                    await self.redis.execute_command(
                        "XREAD", "COUNT", 1, "BLOCK", max(1, round(block * 1000)),
                        "STREAMS", stream, cursor,
                    )  # fmt: skip
                failures = 0
            except UNAVAILABLE as exc:
                _raise_if_cancelled()
                if failures % 10 == 0:
                    log.warning("reading the transition stream: %s (retrying)", exc)
                await asyncio.sleep(FAN_OUT_RETRY_DELAYS[min(failures, 4)])
                failures += 1
                continue
            _raise_if_cancelled()
            for raw_id, raw_fields in page:
                cursor = _text(raw_id)
                entry = _stream_entry(cursor, raw_fields)
                if entry is None:
                    log.warning("skipped a malformed transition stream entry %s", cursor)
                    continue
                pair = (entry.transition.user, entry.transition.version)
                if pair in seen:
                    continue
                seen[pair] = None
                if len(seen) > WATCH_REMEMBERED:
                    seen.popitem(last=False)
                yield entry

    def _emit(self, transition: Transition) -> None:
        for listener in list(self._listeners):
            try:
                listener(transition)
            except Exception:
                log.exception("transition listener failed")

    # -- clients -------------------------------------------------------------------

    async def connected(
        self,
        client_id: str,
        user: str,
        *,
        friends: Iterable[str] | None = None,
        address: str = "",
        token: str | None = None,
        restore: bool = False,
        number: int = 0,
        proof: str | None = None,
        view: bool = False,
        before_view: Callable[[], object] | None = None,
    ) -> Connection:
        """Mark ``client_id`` of ``user`` connected (idempotent per session).

        ``friends``, if given, replaces the user's declared friend list first. With
        ``restore`` (and the ``token`` of a session this owner held), the session is put
        back only if the client id has no session or that same one in Redis: Superseded
        is raised if it has a newer one.

        ``number`` is the client's connect number (0: none): one below the client id's
        last, or equal to it once that session ended, is a replay and raises
        PresenceError(STALE) with nothing changed. ``proof`` says whether this connect
        may replace a live session of the client id: None (the caller vouches, e.g. it
        verified a login token for ``user``), or the token of the session it replaces
        ('' for none: then a live session of another token raises
        PresenceError(CLIENT_ID_IN_USE) with nothing changed).

        With ``view``, the answer carries the user's friend view (``Connection.view``),
        read in the same pass as the reads that tell the user's mutual friends (one read
        per friend instead of two); ``before_view`` is called just before that read is
        sent (a daemon notes there which notifications the view may already include).

        Raises PresenceError(CLIENT_ID_IN_USE) if the client id is connected for another
        user, PresenceError(INVALID_NAME) or (TOO_MANY_FRIENDS) for bad arguments, and
        PresenceError(TRY_AGAIN) if this owner's lease ran out before the write reached
        Redis (nothing was written).
        """
        check_name(client_id, "client id")
        check_name(user, "user name")
        if friends is not None:
            friends = self._check_friends(friends)
        if token is not None and not _TOKEN_RE.fullmatch(token):
            raise ValueError("a session token is 8 to 64 hex digits")
        if restore and token is None:
            raise ValueError("restore needs the token of the session to put back")
        if not 0 <= number <= MAX_COUNTER:
            raise ValueError(f"a connect number is 0 to {MAX_COUNTER}")
        token = token or secrets.token_hex(16)
        admission = _Admission(number, "*" if proof is None else proof)
        want = _View(before_view) if view else None
        async with self._in_order(client_id):
            return await self._connect(
                client_id, user, friends, address, token, restore, admission, want
            )

    async def _connect(
        self,
        client_id: str,
        user: str,
        friends: list[str] | None,
        address: str,
        token: str,
        restore: bool,
        admission: _Admission,
        want: _View | None = None,
    ) -> Connection:
        if admission.number or admission.proof != "*":
            # Checked before anything is written (binding, friend list): a replayed or
            # unproven connect must change nothing. connect.lua checks again, atomically.
            status, _, _, previous, _ = await self._run_connect(
                client_id, user, address, token, "check", admission
            )
            if status != 1:
                raise _refusal(status, client_id, previous)
        member = keys.owned_member(user, client_id, token)
        owned = keys.owned_key(self.instance_id)
        # Recorded before the entry exists (in the same pipeline as the claim, which
        # runs after it), so a survivor can reap the entry if we die after writing it.
        sadd = self.io.execute_command("SADD", owned, member)
        entry_may_exist = False
        try:
            unbound = False
            if restore:
                # Bound to another user meanwhile: the session is not ours to put back.
                # (Bound to another session of ours: connect.lua decides which is newer.)
                _, holder = await asyncio.gather(
                    sadd, self.io.execute_command("GET", keys.client_key(client_id))
                )
                if holder is not None and _text(holder).split("|", 1)[0] != user:
                    raise Superseded(client_id)
                unbound = holder is None
            else:
                await asyncio.gather(sadd, self._claim(client_id, user, token))
            if friends is not None:
                await self._change_friends(user, "set", friends, origin=client_id)
            entry_may_exist = True
            mode = "restore" if restore else "connect"
            status, went_online, version, previous, pending, *declared = await self._run_connect(
                client_id, user, address, token, mode, admission, view=want is not None
            )
            if status != 1:
                entry_may_exist = False  # refused: the script wrote nothing
                raise _refusal(status, client_id, previous)
        except BaseException as exc:
            # If the connect script may have run (its answer lost), the member stays so
            # the entry can still be found and removed (reconcile(), reap, restart), and
            # a transition it may have decided is told once Redis answers again.
            if not entry_may_exist:
                with contextlib.suppress(RedisError, OSError):
                    await self.io.execute_command("SREM", owned, member)
            elif isinstance(exc, RedisError | OSError):
                self._settle_later(user)
            raise
        # From here on the entry exists: nothing may stop its transition being told.
        # Take the replaced entry out of its owner's set (and tell that owner, so it
        # forgets the session), and read the binding back: it lives under another tag,
        # so a concurrent connect of this client id for another user may have taken it
        # over before our entry landed; the binding decides, and the loser undoes its
        # entry. A restore whose binding is gone (a reaper released it) binds again.
        bound: Any = None
        commands: list[tuple[Any, ...]] = []
        old_token, old_owner, _ = _entry(previous) if previous else (token, "", "")
        if old_token != token:  # (the same session again keeps its member)
            old_member = keys.owned_member(user, client_id, old_token)
            commands.append(("SREM", keys.owned_key(old_owner), old_member))
            if old_owner != self.instance_id:
                message = json.dumps([[client_id, old_token]], separators=(",", ":"))
                commands.append((self._publish, keys.inbox_channel(old_owner), message))
        claim_call: Call | None = None
        if not restore:
            commands.append(("GET", keys.client_key(client_id)))
        elif unbound:
            claim_call = ("claim", [keys.client_key(client_id)], self._claim_args(user, token))
        # The view's reads (which carry the routes the tell needs) go in the same
        # pipeline as this bookkeeping.
        cleanup = asyncio.gather(
            self.io.execute_many(commands),
            self.scripts.call_many(self.io, [claim_call] if claim_call else []),
        )
        view: list[FriendState] | None = None
        routes: dict[str, Any] = {}
        try:
            if want is not None and declared:
                view, routes = await self._peek_all(user, declared[0], want.before)
            await self._tell(user, pending, decided=bool(went_online), routes=routes)
        except BaseException:
            # (cancelled: the bookkeeping's outcome is nobody's now, but is retrieved)
            cleanup.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        try:
            results, claimed = await cleanup
            for result in results:
                if isinstance(result, Exception):
                    raise result
            if not restore:
                bound = results[-1]
            elif claimed and claimed[0]:
                bound = claimed[0]  # claim.lua answers the other user's binding
        except (RedisError, OSError) as exc:
            self.cleanup_failures += 1
            log.warning("after connecting %s: %s", client_id, exc)
        if bound is not None and _text(bound).split("|", 1)[0] != user:
            await self._disconnect(client_id, user, token)
            if restore:
                raise Superseded(client_id)
            raise PresenceError(
                ErrorCode.CLIENT_ID_IN_USE, f"client id {client_id!r} is connected for another user"
            )
        return Connection(token, bool(went_online), int(version), new_entry=not previous, view=view)

    async def _peek_all(
        self, user: str, declared: Iterable[Any], before: Callable[[], object] | None
    ) -> tuple[list[FriendState] | None, dict[str, Any]]:
        """The friend view of ``user`` and, for each friend, its clients (routes)."""
        names = sorted(_text(name) for name in declared)
        now = self._now_ms()
        if before is not None:
            before()
        calls: list[Call] = [("peek", keys.user_keys(name), [user, now, 1]) for name in names]
        try:
            results = await self.scripts.call_many(self.io, calls)
        except (RedisError, OSError) as exc:
            log.warning("reading the friend view of %s: %s", user, exc)
            return None, {}
        view = []
        routes = {}
        for name, (visible, version, flat) in zip(names, results, strict=True):
            view.append(FriendState(name, bool(visible), int(version)))
            routes[name] = dict(zip(flat[::2], flat[1::2], strict=True))
        return view, routes

    def _claim_args(self, user: str, token: str, stale: str = "") -> list[str | int]:
        """ARGV of claim.lua (see its header)."""
        return [user, token, self._now_ms(), stale, round(self.stale_binding_after * 1000)]

    async def _run_connect(
        self,
        client_id: str,
        user: str,
        address: str,
        token: str,
        mode: str,
        admission: _Admission,
        *,
        view: bool = False,
    ) -> list[Any]:
        """Run connect.lua once (see its header for the answer)."""
        result: list[Any] = await self.scripts.call(
            self.io,
            "connect",
            [
                *keys.user_keys(user),
                keys.connect_number_key(user, client_id),
                *([keys.kicked_key(user, client_id)] if mode == "restore" else []),
            ],
            [
                client_id,
                f"{token}|{self.instance_id}|{address}",
                self._now_ms(),
                self.fence_ms,
                mode,
                round(OUTBOX_GRACE * 1000),
                admission.number,
                admission.proof,
                "1" if view else "0",
            ],
        )
        return result

    async def _claim_once(self, client_id: str, user: str, token: str, stale: str = "") -> str:
        """Run claim.lua once; '' if the client id is now bound to us, else the holder."""
        key = keys.client_key(client_id)
        args = self._claim_args(user, token, stale)
        return _text(await self.scripts.call(self.io, "claim", [key], args))

    async def _claim(self, client_id: str, user: str, token: str) -> None:
        holder = await self._claim_once(client_id, user, token)
        if not holder:
            return
        other_user = holder.split("|", 1)[0]
        # The binding may be stale (its session is gone): check the holder's own keys.
        # claim.lua takes it over only if it is also old enough not to be a connect
        # still in flight.
        if await self.redis.hexists(keys.clients_key(other_user), client_id):
            raise PresenceError(
                ErrorCode.CLIENT_ID_IN_USE, f"client id {client_id!r} is connected for another user"
            )
        if await self._claim_once(client_id, user, token, stale=holder):
            raise PresenceError(
                ErrorCode.CLIENT_ID_IN_USE, f"client id {client_id!r} is connected for another user"
            )

    async def disconnected(
        self, client_id: str, *, user: str | None = None, token: str | None = None
    ) -> bool:
        """Mark ``client_id`` disconnected; True if it was connected (idempotent).

        With ``token``, only that session is removed: a newer session of the same client
        id (a reconnect, possibly through another daemon) is left alone. Without it,
        whatever session the client id has is removed. ``user`` saves a lookup when the
        caller knows it (it is required with ``token``).

        A transition of the user that an earlier call decided but did not get told (its
        answer was lost, or its caller died) is told now, even if nothing is removed.
        """
        async with self._in_order(client_id):
            if user is None or token is None:
                bound = await self.redis.get(keys.client_key(client_id))
                if bound is None:
                    return False
                bound_user = _text(bound).split("|", 1)[0]
                if user is not None and user != bound_user:
                    return False
                user = bound_user
            return await self._disconnect(client_id, user, token)

    async def kick(self, client_id: str) -> bool:
        """Disconnect ``client_id`` as an operator; True if it was connected.

        The session is removed like any disconnect (guarded by its token; if it was the
        user's last client, the offline transition is decided and told), then its owner
        is told through its inbox: a daemon sends the client GO_AWAY (kicked), which
        tells a current client not to reconnect. Telling the owner is best effort
        (pub/sub): if that message is lost, the daemon still finds the session gone
        from Redis soon and forgets it; the client, asked to connect again, may do so.
        A kick is not a ban: the client may connect again later.
        """
        check_name(client_id, "client id")
        async with self._in_order(client_id):
            bound = await self.redis.get(keys.client_key(client_id))
            if bound is None:
                return False
            user = _text(bound).split("|", 1)[0]
            entry = await self.redis.hget(keys.clients_key(user), client_id)
            if entry is None:
                return False
            token, owner, _ = _entry(entry)
            # First the tombstone: if the owner misses the message below, its next
            # reconciliation must not put the kicked session back (connect.lua refuses).
            await self.io.execute_command(
                "SET", keys.kicked_key(user, client_id), token, "PX", round(KICKED_MEMORY * 1000)
            )
            if not await self._disconnect(client_id, user, token):
                return False
        message = json.dumps([[client_id, token, "kick"]], separators=(",", ":"))
        try:
            await self.io.execute_command(self._publish, keys.inbox_channel(owner), message)
        except (RedisError, OSError) as exc:
            log.warning("kicked %s but could not tell its owner %s: %s", client_id, owner, exc)
        return True

    async def _disconnect(self, client_id: str, user: str, token: str | None) -> bool:
        try:
            removed, went_offline, _, entry, pending = await self.scripts.call(
                self.io,
                "disconnect",
                [*keys.user_keys(user), keys.connect_number_key(user, client_id)],
                [client_id, token or "", self._now_ms(), round(OUTBOX_GRACE * 1000)],
            )
        except (RedisError, OSError):
            self._settle_later(user)  # the script may have run: its answer was lost
            raise
        # Told before the owner-set member goes: while the member is there, a reaper or
        # reconciliation that finds it disconnects again and so tells what is pending.
        await self._tell(user, pending, decided=bool(went_offline))
        if not removed:
            return False
        # Unbind only the session that ended (a concurrent connect's binding stays) and
        # take the entry out of its owner's set. Best effort: what a failure leaves
        # behind is harmless (see cleanup_failures).
        ended_token, owner, _ = _entry(entry)
        try:
            srem = ("SREM", keys.owned_key(owner), keys.owned_member(user, client_id, ended_token))
            await asyncio.gather(
                self.scripts.call(
                    self.io, "release", [keys.client_key(client_id)], [f"{user}|{ended_token}"]
                ),
                self.io.execute_command(*srem),
            )
        except (RedisError, OSError) as exc:
            self.cleanup_failures += 1
            log.warning("after disconnecting %s: %s", client_id, exc)
        return True

    async def _tell(
        self, user: str, pending: Any, *, decided: bool, routes: dict[str, Any] | None = None
    ) -> None:
        """Tell a transition from the user's outbox to every mutual friend, then confirm.

        ``pending`` is a script's ``{online, version, decided_ms, mutual...[, older]}``
        (empty: nothing to tell); ``decided`` says this call decided it (else it is told
        again, having been decided earlier by a call that did not confirm it). ``older``
        ("online|version|decided_ms;...", newest first) lists unconfirmed transitions it
        replaced: friends need only the newest, the transition stream gets them all.
        ``routes`` holds the clients of some friends, read after the decision (those
        need no second read).
        """
        if not pending:
            return
        online, version, since = bool(pending[0]), int(pending[1]), int(pending[2])
        names = [_text(name) for name in pending[3:]]
        older = names.pop() if names and "|" in names[-1] else ""
        if decided:
            self._emit(Transition(user, online, version))
        else:
            self.retold += 1
        state = FriendState(user, online, version)
        told = f"{int(online)}|{version}|{since}" + (f";{older}" if older else "")
        appends = [
            self._xadd(user, *_outbox_part(part), retold=True)
            for part in reversed(older.split(";") if older else [])
        ]
        appends.append(self._xadd(user, online, version, since, retold=not decided))
        await self._fan_out(
            [(name, state) for name in names],
            confirm=("told", [keys.pending_key(user)], [told]),
            routes=routes,
            record=_Record(appends) if self.stream_max_len else None,
        )

    def _xadd(
        self, user: str, online: bool, version: int, since: int, *, retold: bool
    ) -> tuple[str | int, ...]:
        """The command that appends one transition to the transition stream."""
        return (
            "XADD",
            keys.TRANSITIONS_STREAM,
            "MAXLEN",
            "~",
            self.stream_max_len,
            "*",
            "user",
            user,
            "online",
            int(online),
            "version",
            version,
            "decided_ms",
            since,
            "decided_by",
            self.instance_id,
            "retold",
            int(retold),
        )

    def _settle_later(self, user: str) -> None:
        """A connect or disconnect of ``user`` got no answer: its script may have run
        and decided a transition. Once Redis answers again (after the outbox grace,
        retrying while Redis is unreachable), read the outbox and tell what is there;
        this instance most likely decided it, so listeners hear it too."""

        async def settle() -> None:
            delay = OUTBOX_GRACE
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    # Grace 0: we waited it out; a clock stepped back must not hide it.
                    pending = await self.scripts.call(
                        self.io, "settle", keys.user_keys(user), [self._now_ms(), 0]
                    )
                except UNAVAILABLE:  # (a cluster failing over answers CLUSTERDOWN)
                    delay = FAN_OUT_RETRY_DELAYS[-1]
                    continue
                except RedisError as exc:
                    log.error("settling %s failed: %s", user, exc)
                    return
                await self._tell(user, pending, decided=True)
                return

        self._background(settle())

    async def _fan_out(
        self,
        targets: list[tuple[str, FriendState | None]],
        *,
        confirm: Call | None = None,
        origin: str | None = None,
        routes: dict[str, Any] | None = None,
        record: _Record | None = None,
    ) -> None:
        """Deliver a decided change to every client of each target user (and append
        the ``record`` to the transition stream, in the same pipeline as the first
        read); then run the ``confirm`` script call, which empties the outbox entry
        that recorded it. The confirm waits for the append: a change is never
        confirmed told before it is in the stream.

        The decision is already made in Redis, so a failure here must not undo or
        fail the call: it is retried in the background until it succeeds. (Deliveries
        are versioned facts: a repeat is harmless; and an outbox left unconfirmed is
        told again by the next call that touches the user.)
        """
        try:
            await self._deliver_and_confirm(targets, confirm, origin, routes, record)
        except (RedisError, OSError) as exc:
            self.fan_out_failures += 1
            log.warning("fan-out failed (%s); retrying in the background", exc)
            self._background(self._fan_out_retry(targets, confirm, origin, record))

    async def _deliver_and_confirm(
        self,
        targets: list[tuple[str, FriendState | None]],
        confirm: Call | None,
        origin: str | None,
        routes: dict[str, Any] | None = None,
        record: _Record | None = None,
    ) -> None:
        # Started in the same tick, the append leaves in the same pipeline as the
        # deliveries' reads (see batch.py): no round trip of its own.
        appended = self._append(record)
        try:
            if targets:
                deliveries = await self._deliveries(targets, routes or {})
                # The client that made a list change knows it: no snapshot for it.
                await self.deliver(
                    [d for d in deliveries if d.friend is not None or d.client_id != origin]
                )
        finally:
            await appended  # (its failure, if any, is raised; a retry appends again)
        if confirm is not None:
            await self.scripts.call(self.io, *confirm)

    def _append(self, record: _Record | None) -> asyncio.Future[None]:
        """Start appending ``record`` to the transition stream (unless done already)."""

        async def append() -> None:
            if record is not None and not record.done:
                for result in await self.io.execute_many(record.commands):
                    if isinstance(result, Exception):
                        raise result
                record.done = True

        return asyncio.ensure_future(append())

    async def _fan_out_retry(
        self,
        targets: list[tuple[str, FriendState | None]],
        confirm: Call | None,
        origin: str | None,
        record: _Record | None = None,
    ) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(FAN_OUT_RETRY_DELAYS[min(attempt, len(FAN_OUT_RETRY_DELAYS) - 1)])
            attempt += 1
            try:
                await self._deliver_and_confirm(targets, confirm, origin, record=record)
                return
            except (RedisError, OSError):
                self.fan_out_failures += 1
                continue

    async def _deliveries(
        self, targets: Sequence[tuple[str, FriendState | None]], routes: dict[str, Any]
    ) -> list[Delivery]:
        """Read the clients of each target user (unless ``routes`` has them, read after
        the change was decided); one Delivery per client."""
        unknown = sorted({user for user, _ in targets if user not in routes})
        if unknown:
            read = await self.io.execute_many([("HGETALL", keys.clients_key(u)) for u in unknown])
            routes = {**routes, **dict(zip(unknown, read, strict=True))}
        deliveries = []
        for user, state in targets:
            clients = routes[user]
            if isinstance(clients, Exception):
                raise clients
            for client_id, value in clients.items():
                token, owner, _ = _entry(value)
                deliveries.append(Delivery(owner, _text(client_id), token, state))
        return deliveries

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        """Hand each delivery to its owner's inbox channel (one message per owner)."""
        by_owner: dict[str, list[list[object]]] = defaultdict(list)
        for d in deliveries:
            if d.friend is None:
                by_owner[d.owner].append([d.client_id, d.token, 0])
                continue
            by_owner[d.owner].append(
                [d.client_id, d.token, d.friend.name, d.friend.online, d.friend.version]
            )
        if not by_owner:
            return
        results = await self.io.execute_many(
            [
                (self._publish, keys.inbox_channel(owner), json.dumps(items, separators=(",", ":")))
                for owner, items in by_owner.items()
            ]
        )
        for result in results:
            if isinstance(result, Exception):
                raise result

    # -- reading -------------------------------------------------------------------

    async def query(self, users: Iterable[str]) -> dict[str, bool]:
        """Which of ``users`` are online (one pipelined round trip)."""
        names = list(users)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(keys.clients_key(name))
        return {name: bool(n) for name, n in zip(names, await pipe.execute(), strict=True)}

    async def clients(self, user: str) -> dict[str, tuple[str, str]]:
        """The user's connected clients: client id -> (owner instance, address)."""
        raw = await self.redis.hgetall(keys.clients_key(user))
        result = {}
        for client_id, value in raw.items():
            _, owner, address = _entry(value)
            result[_text(client_id)] = (owner, address)
        return result

    async def friends(self, user: str) -> set[str]:
        """The names ``user`` declared as friends."""
        names = await self.io.execute_command("SMEMBERS", keys.friends_key(user))
        return {_text(name) for name in names}

    async def friend_view(self, user: str) -> list[FriendState]:
        """How each declared friend of ``user`` looks to it, sorted by name.

        A friend is visible as online only if it is online and the friendship is mutual.
        """
        names = sorted(await self.friends(user))
        now = self._now_ms()
        calls: list[Call] = [("peek", keys.user_keys(name), [user, now]) for name in names]
        results = await self.scripts.call_many(self.io, calls)
        return [
            FriendState(name, bool(visible), int(version))
            for name, (visible, version) in zip(names, results, strict=True)
        ]

    # -- friends -------------------------------------------------------------------

    async def set_friends(
        self,
        user: str,
        names: Iterable[str],
        *,
        origin: str | None = None,
        token: str | None = None,
    ) -> None:
        """Replace the friends ``user`` declares; mutual friends are told what changed,
        and the user's clients other than ``origin`` (the client id that asked, if any)
        are made to fetch a snapshot. With ``origin`` and ``token`` (the asking session),
        Superseded is raised and nothing changes unless that session is the client
        id's current one: a request that waited in a stalled daemon cannot undo the
        user's later changes."""
        await self._change_friends(user, "set", names, origin=origin, token=token)

    async def add_friends(
        self,
        user: str,
        names: Iterable[str],
        *,
        origin: str | None = None,
        token: str | None = None,
    ) -> None:
        """Add to the friends ``user`` declares (see :meth:`set_friends`)."""
        await self._change_friends(user, "add", names, origin=origin, token=token)

    async def remove_friends(
        self,
        user: str,
        names: Iterable[str],
        *,
        origin: str | None = None,
        token: str | None = None,
    ) -> None:
        """Remove from the friends ``user`` declares (see :meth:`set_friends`)."""
        await self._change_friends(user, "remove", names, origin=origin, token=token)

    def _check_friends(self, names: Iterable[str]) -> list[str]:
        wanted = _names(names)
        if len(wanted) > self.max_friends:
            raise PresenceError(ErrorCode.TOO_MANY_FRIENDS, f"more than {self.max_friends}")
        return wanted

    async def _change_friends(
        self,
        user: str,
        op: str,
        names: Iterable[str],
        *,
        origin: str | None = None,
        token: str | None = None,
    ) -> None:
        check_name(user, "user name")
        wanted = self._check_friends(names) if op != "remove" else _names(names)
        session = f"{origin}|{token}" if origin is not None and token is not None else ""
        status, version, online, flat = await self.scripts.call(
            self.io,
            "friends",
            [*keys.user_keys(user), keys.reindex_key(user)],
            [user, op, self.max_friends, self._now_ms(), session, *wanted],
        )
        if status == 2:
            raise Superseded(origin or "?")
        if not status:
            raise PresenceError(ErrorCode.TOO_MANY_FRIENDS, f"more than {self.max_friends}")
        changes = [
            (_text(flat[i]), bool(flat[i + 1]), bool(flat[i + 2])) for i in range(0, len(flat), 3)
        ]
        if not changes:
            return
        # Keep each changed friend's reverse index in step (its own hash tag).
        calls: list[Call] = [
            ("fans", keys.user_keys(name), ["add" if added else "remove", user, self._now_ms()])
            for name, added, _ in changes
        ]
        results = await self.scripts.call_many(self.io, calls)
        # Only a pair that is mutual before or after the change sees anything, and an
        # offline party looks the same before and after, so nothing is sent about it.
        # Mutual before/after is known from the friend's side (``visible``, read after
        # its reverse index changed) or from ours (``is_fan``). Both are needed: when
        # two users add each other at once, each call may read is_fan = 0, but each
        # call's fans.lua then sees the other's declaration already made (visible = 1).
        targets: list[tuple[str, FriendState | None]] = []
        for (name, added, is_fan), (friend_version, friend_online, visible) in zip(
            changes, results, strict=True
        ):
            if friend_online and (is_fan or visible):
                targets.append((user, FriendState(name, bool(visible), int(friend_version))))
            if online and is_fan:
                targets.append((name, FriendState(user, added, int(version))))
        # The user's other clients learn of the change by snapshot (a NOTIFY cannot say
        # that a name was removed, nor add a name a client does not know).
        targets.append((user, None))
        synced = [str(v) for name, added, _ in changes for v in (name, int(added))]
        await self._fan_out(
            targets, confirm=("synced", [keys.reindex_key(user)], synced), origin=origin
        )
