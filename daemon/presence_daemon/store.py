"""Which Redis the presence library talks to: one server, or a Redis/Valkey Cluster.

Theory of operation
-------------------
A URL whose scheme is ``redis+cluster://`` or ``rediss+cluster://`` names a cluster by
one or more seed nodes (``redis+cluster://10.0.0.1:7000,10.0.0.2:7000``); any other is a
single server. The same code runs on both: every Lua script touches the keys of one hash
tag only (one slot), and pipelines may span slots (the cluster client splits them by
node and sends each part to its node).

Hand-off between daemons uses each owner's inbox channel. On one server that is plain
PUBLISH/SUBSCRIBE (it works on Redis 6.2, which has no sharded pub/sub). On a cluster a
plain PUBLISH is copied to every node, so there the inbox is a *sharded* channel:
SPUBLISH goes to the master that serves the channel's slot (the owner's hash tag) and
its replicas only, and the owner SSUBSCRIBEs on that master. Which one is used follows
from the client's type, so it is fixed once, when the client is built.

A sharded subscription lives on one node. :class:`Inbox` raises ``ConnectionError``
when that node goes away, stops serving the slot (a failover, a resharding: the node
says ``sunsubscribe``) or the cluster client learns that another node serves it now;
the caller subscribes again, on the node that serves the slot then. Hand-offs published
meanwhile are lost, as with any reconnect; the caller repairs what they carried.

The cluster client raises ``RedisClusterException`` for some topology troubles (no node
serves a slot, say), which is not a ``RedisError``, and a ``RuntimeError`` or
``AttributeError`` when it closes a connection under a call (those of a failed node).
:class:`PresenceCluster` turns those into ``ClusterError`` and ``ConnectionError``
(RedisErrors), so callers handle one error tree whatever the deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import unquote

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterDownError, ClusterError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Store: TypeAlias = Redis | RedisCluster
"""A client of one Redis server or of a cluster (see :func:`is_cluster`)."""

CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
DEFAULT_PORT: Final = 6379
CLUSTER_SPARE_CONNECTIONS: Final = 8
"""Connections per node beyond the calls allowed at once (see PresenceCluster)."""

UNAVAILABLE: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    OSError,
)
"""Errors that mean Redis is unreachable for now, or a cluster is failing over (CLUSTERDOWN
until a replica takes over, TRYAGAIN while a slot moves): worth waiting out."""

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d+))?$")


class ClusterURLError(ValueError):
    """A ``redis+cluster://`` URL that cannot be used; the message names the value."""


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """A parsed ``redis+cluster://`` or ``rediss+cluster://`` URL."""

    seeds: tuple[tuple[str, int], ...]
    """(host, port) of each seed node, in the order given."""
    tls: bool
    """True for ``rediss+cluster://``."""
    username: str | None = None
    """User name of the URL's user info, if any."""
    password: str | None = None
    """Password of the URL's user info, if any."""


def safe_url(url: str) -> str:
    """The URL without its password (the user name stays), for logs and errors.

    Everything up to the last ``@`` counts as the user information, even past a ``/``,
    ``?`` or ``#``: a password with such a character not percent-encoded stays hidden
    (masking a little too much is the safe side)."""
    url = re.sub(r"([?&]password=)[^&]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not colon or "/" in user:  # "redis://secret@host": redis-py reads a user: hide it
        return f"{scheme}://***@{host}"
    return f"{scheme}://{user}:***@{host}"


def check_redis_url(url: str) -> None:
    """Raise ValueError, naming the URL without its password, if redis-py cannot parse
    this single-Redis URL (its own message may quote part of the password)."""
    try:
        parse_url(url)
    except ValueError:
        raise ValueError(
            f"cannot parse {safe_url(url)!r} as a Redis URL (characters such as / ? # @ : "
            "in a user name or password must be percent-encoded)"
        ) from None


def is_cluster_url(url: str) -> bool:
    """True if ``url`` names a cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.startswith(CLUSTER_SCHEMES)


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse ``redis[s]+cluster://[user[:password]@]host[:port][,host[:port]...][/0]``.

    Raises:
        ClusterURLError: with a one-line message naming the value.
    """
    tls = url.startswith("rediss+cluster://")
    if not is_cluster_url(url):
        raise ClusterURLError(f"{url!r} is not a redis+cluster:// or rediss+cluster:// URL")
    rest = url.split("://", 1)[1]
    username = password = None
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        name, _, secret = userinfo.partition(":")
        username = unquote(name) or None
        password = unquote(secret) if secret else None
    if "?" in rest:
        raise ClusterURLError(f"{url!r}: a cluster URL takes no query options")
    hosts, _, database = rest.partition("/")
    if database not in ("", "0"):
        raise ClusterURLError(f"{url!r}: a cluster has database 0 only")
    seeds = []
    for part in hosts.split(","):
        match = _HOST_PORT.match(part.strip())
        port = int(match["port"] or DEFAULT_PORT) if match else 0
        if match is None or not 1 <= port <= 65535:
            raise ClusterURLError(f"{url!r}: {part!r} is not a host:port seed node")
        seeds.append((match["v6"] or match["host"], port))
    return ClusterURL(tuple(seeds), tls, username, password)


_HOLDS_A_CALL: ContextVar[bool] = ContextVar("presence_cluster_holds_a_call", default=False)
"""Set while a task runs a call of a PresenceCluster: a call nested in it (a pipeline
resending a redirected command) must not wait for a second turn."""


@contextlib.asynccontextmanager
async def _as_redis_errors() -> AsyncIterator[None]:
    """Turn the cluster client's foreign errors into RedisErrors.

    RedisClusterException (no node serves a slot, say) is not a RedisError. And the
    client closes connections other tasks are using at that moment (those of a node
    that failed or left the topology): their write fails with RuntimeError ("the
    handler is closed") or AttributeError (its writer is already None) instead of a
    ConnectionError.
    """
    try:
        yield
    except RedisClusterException as exc:
        raise ClusterError(f"{type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        if "closed" not in str(exc):
            raise
        raise RedisConnectionError(f"connection closed under the call: {exc}") from exc
    except AttributeError as exc:
        if "'NoneType' object" not in str(exc):
            raise
        raise RedisConnectionError(f"connection closed under the call: {exc}") from exc


class _PresencePipeline(ClusterPipeline):
    """A cluster pipeline whose topology troubles are RedisErrors (see the module doc)."""

    cluster_client: PresenceCluster

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        async with self.cluster_client.turn(), _as_redis_errors():
            return await super().execute(raise_on_error, allow_redirections)


class PresenceCluster(RedisCluster):
    """``RedisCluster`` whose topology troubles are RedisErrors (see the module doc),
    and whose calls wait for a turn as calls on a single server wait for a free
    connection of their blocking pool.

    redis-py's cluster pool raises MaxConnectionsError at its limit instead of waiting;
    here at most ``max_calls`` calls (commands or pipelines) run at once, so no node
    ever sees more connections than that, and a call waits up to ``call_wait`` seconds
    for its turn (then ConnectionError, as the blocking pool raises).
    """

    def __init__(self, *args: Any, max_calls: int, call_wait: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(max_calls)
        self._call_wait = call_wait

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold one of the ``max_calls`` turns (a nested call shares its caller's)."""
        if _HOLDS_A_CALL.get():
            yield
            return
        try:
            await asyncio.wait_for(self._turns.acquire(), self._call_wait)
        except TimeoutError:
            raise RedisConnectionError(f"no free connection within {self._call_wait:g} s") from None
        held = _HOLDS_A_CALL.set(True)
        try:
            yield
        finally:
            _HOLDS_A_CALL.reset(held)
            self._turns.release()

    async def aclose(self) -> None:
        """Close every connection; called by the client itself (it does after CLUSTERDOWN
        and between pipeline retries, to re-read the topology), only mark the topology
        for a re-read. Closing then would cut the connections other tasks are using
        (their calls fail with foreign errors); nodes that left the topology have their
        connections closed by the re-read anyway."""
        if _HOLDS_A_CALL.get():
            self._initialize = True
            return
        await super().aclose()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command (see ``RedisCluster.execute_command``)."""
        async with self.turn(), _as_redis_errors():
            return await super().execute_command(*args, **kwargs)

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        """A pipeline without a transaction (a cluster has none across slots)."""
        if transaction or shard_hint:
            raise ClusterError("a cluster pipeline has no transaction and no shard hint")
        return _PresencePipeline(self)  # type: ignore[abstract]


def cluster_client(url: str, *, max_connections: int, timeout: float) -> PresenceCluster:
    """A cluster client configured as :func:`presence.redis_client` configures a single
    one: at most ``max_connections`` calls at once, a further call waits for its turn
    (up to ``timeout`` more); every call fails after ``timeout`` seconds; a call that
    hits a dead connection
    or a topology change (a failover: ConnectionError, CLUSTERDOWN, a slot not covered
    yet) is sent again, twice at most, after the client has re-read the topology. (On a
    cluster a timed-out call is retried too: the client cannot tell a dead master from a
    slow one. Every script is idempotent, so a repeat is harmless.)

    Raises:
        ClusterURLError: for a URL that cannot be used.
    """
    parsed = parse_cluster_url(url)
    return PresenceCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.seeds],
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        decode_responses=True,
        max_calls=max_connections,
        call_wait=timeout,
        # Each call holds at most one connection per node; the rest is slack for the
        # client's own topology reads.
        max_connections=max_connections + CLUSTER_SPARE_CONNECTIONS,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )


def is_cluster(redis: Store) -> bool:
    """True if ``redis`` is a cluster client (inboxes are then sharded channels)."""
    return isinstance(redis, RedisCluster)


def publish_verb(redis: Store) -> str:
    """The command that publishes to an inbox channel through ``redis``: SPUBLISH on a
    cluster (only the channel's shard sees it), PUBLISH on a single server."""
    return "SPUBLISH" if is_cluster(redis) else "PUBLISH"


def queue_publish(pipe: Pipeline | ClusterPipeline, channel: str, message: str) -> None:
    """Add the publication of ``message`` to an inbox ``channel`` to a pipeline: SPUBLISH
    on a cluster (only the channel's shard sees it), PUBLISH on a single server."""
    if isinstance(pipe, ClusterPipeline):
        pipe.spublish(channel, message)
    else:
        pipe.publish(channel, message)


class Inbox:
    """The subscription to one inbox channel (see the module doc).

    Call :meth:`subscribe` once, then :meth:`get` in a loop, and :meth:`aclose` at the
    end. Any ``RedisError`` or ``OSError`` means the subscription is gone: close this
    inbox and open a new one.
    """

    def __init__(self, redis: Store, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self._pubsub: PubSub | None = None
        self._own: Redis | None = None
        self._node: str | None = None
        """On a cluster: the name (host:port) of the node subscribed on."""

    async def subscribe(self) -> None:
        """Subscribe: plainly on one server, sharded on the master serving the channel."""
        if not isinstance(self.redis, RedisCluster):
            self._pubsub = self.redis.pubsub()
            await self._pubsub.subscribe(self.channel)
            return
        # A keyed read in the channel's slot: the client follows MOVED or re-reads the
        # topology on a dead node, so the node looked up next is the current master.
        await self.redis.exists(self.channel)
        node = self._serving_node(self.redis)
        self._node = node.name
        pool = ConnectionPool(
            connection_class=node.connection_class, max_connections=1, **node.connection_kwargs
        )
        self._own = Redis(connection_pool=pool)
        self._pubsub = self._own.pubsub()
        await self._pubsub.ssubscribe(self.channel)

    async def get(self, timeout: float) -> Any | None:
        """The next message's payload, or None if none came within ``timeout`` seconds.

        Raises:
            redis.exceptions.ConnectionError: if the channel's slot moved to another node.
        """
        if self._pubsub is None:
            raise RuntimeError("Inbox.subscribe() was not called")
        if (
            isinstance(self.redis, RedisCluster)
            and self._serving_node(self.redis).name != self._node
        ):
            raise RedisConnectionError(f"inbox {self.channel} moved to another node")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = max(0.0, deadline - loop.time())
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=False, timeout=remaining
            )
            if message is None:
                return None
            kind = message.get("type")
            if kind in ("message", "smessage"):
                return message["data"]
            if kind == "sunsubscribe":  # the node stopped serving the slot (a failover)
                raise RedisConnectionError(f"inbox {self.channel} was unsubscribed by {self._node}")
            if remaining == 0.0:  # (a confirmation of our own subscription)
                return None

    async def aclose(self) -> None:
        """Close the subscription (and its own connection, on a cluster)."""
        pubsub, self._pubsub = self._pubsub, None
        own, self._own = self._own, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        if own is not None:
            with contextlib.suppress(Exception):
                await own.aclose()

    def _serving_node(self, redis: RedisCluster) -> ClusterNode:
        try:
            node = redis.get_node_from_key(self.channel)
        except RedisClusterException as exc:
            raise ClusterError(f"{type(exc).__name__}: {exc}") from exc
        if node is None:
            raise ClusterError(f"no node serves inbox {self.channel}")
        return node
