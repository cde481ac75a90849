"""Commands issued in one event-loop tick leave as one pipeline (auto-pipelining).

A daemon runs many jobs at once (one per client queue), and each awaits a few Redis
calls. Sent one by one through redis-py, every call pays a fixed cost of a round trip (a
pooled connection, a timeout context, a write and a read: measured ~150 us of CPU on the
benchmark machine) on top of ~25 us of per-command work. :class:`Batcher` queues every
command asked for during one tick of the event loop and sends them together, in order,
as one non-transactional pipeline; each caller gets its own command's answer (or error).

On a single Redis reached over TCP or a Unix socket (no TLS, no credential provider),
the pipeline goes through :class:`LeanConnection`: one pipelined RESP2 connection of our
own, packing with ``hiredis.pack_command`` and parsing with ``hiredis.Reader`` (both C),
~3 us of CPU per command instead of ~25. On a cluster (no TLS), :class:`LeanCluster`
sends each command over a LeanConnection to the master that serves its key's slot, as
the cluster client's own slot map says; a command answered with a redirect (MOVED, ASK),
a topology error (CLUSTERDOWN, TRYAGAIN) or lost with its node's connection is sent once
more through the cluster client itself, which follows redirects and re-reads the
topology. Anything else (TLS) goes through a redis-py pipeline.

Nothing about atomicity changes: each command (or Lua script) is atomic on its own, as
before, and commands of different callers never shared a transaction anyway. A caller
still waits for its own answer before it sends its next command, so one caller's
commands keep their order.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

MAX_BATCH: Final = 1024
"""Commands per pipeline at most; a larger tick's worth leaves as several pipelines."""
DEFAULT_TIMEOUT: Final = 2.0
"""Seconds a lean pipeline's answers may take when the client names no socket timeout."""
ROUND_TRIP_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
"""Upper bounds (seconds) of the pipeline round-trip histogram (``Batcher.round_trips``)."""


def _pairs(reply: Any) -> Any:
    if not isinstance(reply, list):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _members(reply: Any) -> Any:
    return set(reply) if isinstance(reply, list) else reply


REPLY_SHAPES: Final[dict[str, Callable[[Any], Any]]] = {
    "HGETALL": _pairs,
    "SMEMBERS": _members,
}
"""How a lean reply is shaped as redis-py shapes it (RESP2, decoded); others are as
hiredis parses them (str, int, None, lists)."""


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Resp(asyncio.Protocol):
    """The RESP2 byte stream of a LeanConnection: answers resolve futures in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="strict")
        self.waiting: deque[tuple[asyncio.Future[Any], str]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"bad reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self.fail(RedisConnectionError("Redis sent an answer nobody asked for"))
                return
            future, name = self.waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(reply))
            else:
                shape = REPLY_SHAPES.get(name)
                future.set_result(shape(reply) if shape else reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        """Close, and fail every unanswered command (their order is no longer known)."""
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.close()
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(_copy(exc))

    def send(self, commands: Sequence[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        futures = []
        for args in commands:
            future: asyncio.Future[Any] = loop.create_future()
            self.waiting.append((future, str(args[0]).upper()))
            futures.append(future)
        self.transport.write(b"".join([hiredis.pack_command(args) for args in commands]))
        return futures


class LeanConnection:
    """One pipelined RESP2 connection to a single Redis (see the module docstring).

    Connects on first use and again after the connection is lost. A pipeline whose
    answers take longer than ``timeout`` fails with a TimeoutError and the connection is
    closed (later answers could not be matched any more); as with any Redis call, the
    commands may still have run.
    """

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.username, self.password, self.db = username, password, db
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: _Resp | None = None
        self._connecting: asyncio.Future[_Resp] | None = None

    @classmethod
    def for_client(cls, redis: Any) -> LeanConnection | None:
        """A LeanConnection to the server ``redis`` (a redis-py asyncio client) talks
        to, or None if it is not a plain single-server client this class can speak for."""
        if not isinstance(redis, Redis):
            return None  # a cluster client (its pipelines route each command to its node)
        pool = redis.connection_pool
        from redis.asyncio.connection import Connection, UnixDomainSocketConnection

        kwargs = pool.connection_kwargs
        unix = pool.connection_class is UnixDomainSocketConnection
        if pool.connection_class not in (Connection, UnixDomainSocketConnection):
            return None  # TLS, or a connection class of the caller's own
        if kwargs.get("credential_provider") or kwargs.get("protocol") not in (None, 2, "2"):
            return None
        if not kwargs.get("decode_responses"):
            return None
        timeout = kwargs.get("socket_timeout") or DEFAULT_TIMEOUT
        return cls(
            host=kwargs.get("host", "localhost"),
            port=int(kwargs.get("port", 6379)),
            path=kwargs.get("path") if unix else None,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            db=int(kwargs.get("db") or 0),
            timeout=timeout,
            connect_timeout=kwargs.get("socket_connect_timeout") or timeout,
        )

    async def _ready(self) -> _Resp:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_future()
            try:
                protocol = await asyncio.wait_for(self._connect(), self.connect_timeout)
            except BaseException as exc:
                failed = self._connecting
                self._connecting = None
                error = exc
                if isinstance(exc, TimeoutError):
                    error = RedisTimeoutError("timed out connecting to Redis")
                elif isinstance(exc, OSError):
                    error = RedisConnectionError(f"cannot connect to Redis: {exc}")
                failed.set_exception(error)
                failed.exception()  # (retrieved: only waiters care)
                raise error from exc
            self._protocol = protocol
            self._connecting.set_result(protocol)
            self._connecting = None
            return protocol
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Resp:
        loop = asyncio.get_running_loop()
        if self.path is not None:
            _, protocol = await loop.create_unix_connection(_Resp, self.path)
        else:
            _, protocol = await loop.create_connection(_Resp, self.host, self.port)
        handshake: list[tuple[Any, ...]] = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            handshake.append(("AUTH", *auth))
        if self.db:
            handshake.append(("SELECT", self.db))
        if handshake:
            try:
                for future in protocol.send(handshake):
                    await future
            except BaseException:
                protocol.fail(RedisConnectionError("handshake failed"))
                raise
        return protocol

    async def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` as one pipeline; their answers in order (an error reply as
        its exception in place). Raises if the connection fails or times out."""
        protocol = await self._ready()
        futures = protocol.send(commands)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self.timeout,
            protocol.fail,
            RedisTimeoutError(f"no answer from Redis in {self.timeout:g} s"),
        )
        try:
            await futures[-1]  # answers come in order: the last one comes last
        except Exception:  # its own error reply, or the connection's failure (below)
            pass
        finally:
            timer.cancel()
        # Every outcome is read (so none is logged as never retrieved). A command the
        # connection's failure reached makes the whole pipeline fail, even if some
        # answers came; answers that all came before a later failure stand.
        outcomes = [f.exception() or f.result() for f in futures]
        if any(isinstance(o, (RedisConnectionError, RedisTimeoutError)) for o in outcomes):
            raise _copy(protocol.lost or outcomes[-1])
        return outcomes

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()


REDIRECTS: Final = ("MOVED ", "ASK ", "CLUSTERDOWN", "TRYAGAIN")
"""Error replies after which a command is sent again through the cluster client."""


def _key_of(args: Sequence[Any]) -> Any:
    """The key a command is routed by (its first key), or None for a keyless command."""
    name = str(args[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return args[3] if int(args[2]) > 0 else None
    return args[1] if len(args) > 1 else None


class LeanCluster:
    """The lean path on a cluster: one LeanConnection per master (see the module doc).

    ``cluster`` is the ``RedisCluster`` client whose slot map routes the commands and
    which sends again what a node redirects or loses.
    """

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        kwargs = cluster.nodes_manager.connection_kwargs
        self.username: str | None = kwargs.get("username")
        self.password: str | None = kwargs.get("password")
        self.timeout = kwargs.get("socket_timeout") or DEFAULT_TIMEOUT
        self.connect_timeout = kwargs.get("socket_connect_timeout") or self.timeout
        self._nodes: dict[tuple[str, int], LeanConnection] = {}
        self.resent = 0
        """Commands sent again through the cluster client (redirects, lost nodes)."""

    @classmethod
    def for_client(cls, redis: Any) -> LeanCluster | None:
        """A LeanCluster for ``redis`` if it is a cluster client this class can speak for."""
        if not isinstance(redis, RedisCluster):
            return None
        from redis.asyncio.connection import Connection

        kwargs = redis.nodes_manager.connection_kwargs
        if kwargs.get("connection_class", Connection) is not Connection:
            return None  # TLS
        if kwargs.get("credential_provider") or kwargs.get("protocol") not in (None, 2, "2"):
            return None
        if not kwargs.get("decode_responses"):
            return None
        return cls(redis)

    def _node(self, address: tuple[str, int]) -> LeanConnection:
        connection = self._nodes.get(address)
        if connection is None:
            connection = LeanConnection(
                host=address[0],
                port=address[1],
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                username=self.username,
                password=self.password,
            )
            self._nodes[address] = connection
        return connection

    async def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands``, each to its slot's master; answers in order (an error as its
        exception in place)."""
        results: list[Any] = [None] * len(commands)
        groups: dict[tuple[str, int], list[int]] = {}
        again: list[int] = []
        manager = self.cluster.nodes_manager
        if not manager.slots_cache:
            with contextlib.suppress(Exception):  # (then the cluster client sends it all)
                await self.cluster.initialize()  # the slot map, read once
        for i, args in enumerate(commands):
            key = _key_of(args)
            try:
                node = manager.get_node_from_slot(self.cluster.keyslot(key))
            except Exception:  # (keyless, or the slot map is not known yet)
                again.append(i)
                continue
            groups.setdefault((node.host, int(node.port)), []).append(i)

        async def send(address: tuple[str, int], indexes: list[int]) -> None:
            try:
                answers = await self._node(address).run([commands[i] for i in indexes])
            except (RedisConnectionError, RedisTimeoutError) as exc:
                answers = [exc] * len(indexes)
            for i, answer in zip(indexes, answers, strict=True):
                results[i] = answer

        await asyncio.gather(*(send(address, indexes) for address, indexes in groups.items()))
        for i, answer in enumerate(results):
            if isinstance(answer, RedisConnectionError) or (
                isinstance(answer, ResponseError) and str(answer).startswith(REDIRECTS)
            ):
                again.append(i)
        if again:
            self.resent += len(again)
            resent = await asyncio.gather(
                *(self.cluster.execute_command(*commands[i]) for i in again),
                return_exceptions=True,
            )
            for i, answer in zip(again, resent, strict=True):
                results[i] = answer  # (the cluster client shapes its own answers)
        return results

    def close(self) -> None:
        for connection in self._nodes.values():
            connection.close()


class Batcher:
    """Send the commands of one event-loop tick as one pipeline.

    ``redis`` is a ``redis.asyncio.Redis`` or ``RedisCluster`` client. ``pipelines`` and
    ``commands`` count what was sent (their ratio is the mean batch size).
    ``round_trips[i]`` counts the pipelines whose round trip (sent to last answer, or
    failure) took at most ``ROUND_TRIP_BUCKETS[i]`` seconds and more than the bound
    before (the last entry: longer than every bound); ``round_trip_seconds`` is their sum.
    One clock read and one bisect per pipeline, not per command.
    """

    def __init__(self, redis: Any, *, max_batch: int = MAX_BATCH, lean: bool = True) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.lean: LeanConnection | LeanCluster | None = None
        """The lean path, or None (redis-py pipelines)."""
        if lean:
            self.lean = LeanConnection.for_client(redis) or LeanCluster.for_client(redis)
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self.pipelines = 0
        self.commands = 0
        self.round_trips = [0] * (len(ROUND_TRIP_BUCKETS) + 1)
        self.round_trip_seconds = 0.0

    async def execute_command(self, *args: Any) -> Any:
        """Run one command (``"HGETALL", key`` say) in this tick's pipeline; its answer,
        parsed as ``redis.execute_command`` would, or its error raised."""
        return await self._enqueue(args)

    async def execute_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run several commands in this tick's pipeline; their answers in order, an
        error as the exception instance in its place (nothing is raised for it)."""
        futures = [self._enqueue(tuple(args)) for args in commands]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    def _enqueue(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    async def script_load(self, script: str) -> Any:
        """SCRIPT LOAD on the client itself (a cluster client loads it on every primary)."""
        return await self.redis.script_load(script)

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self.max_batch):
            task = asyncio.get_running_loop().create_task(
                self._send(queue[start : start + self.max_batch])
            )
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        live = [(args, future) for args, future in batch if not future.done()]
        if not live:
            return
        self.pipelines += 1
        self.commands += len(live)
        started = time.perf_counter()
        try:
            if self.lean is not None:
                results = await self.lean.run([args for args, _ in live])
            else:
                pipe = self.redis.pipeline(transaction=False)
                for args, _ in live:
                    pipe.execute_command(*args)
                results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # every waiter gets the failure
            self._timed(started)
            for _, future in live:
                if not future.done():
                    future.set_exception(_copy(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._timed(started)
        for (_, future), result in zip(live, results, strict=True):
            if future.done():
                continue  # its caller gave up (cancelled): the answer is not wanted
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _timed(self, started: float) -> None:
        seconds = time.perf_counter() - started
        self.round_trip_seconds += seconds
        self.round_trips[bisect.bisect_left(ROUND_TRIP_BUCKETS, seconds)] += 1

    async def close(self) -> None:
        """Wait for the pipelines in flight (their callers may be waiting on them), then
        close the lean connection."""
        if self._sending:
            await asyncio.wait(set(self._sending))
        if self.lean is not None:
            self.lean.close()


def _copy(exc: BaseException) -> BaseException:
    """An exception to raise in one more waiter (a raised exception's traceback grows
    with each raise; each waiter gets its own instance where that is possible)."""
    if isinstance(exc, asyncio.CancelledError):
        return asyncio.CancelledError()
    try:
        clone = type(exc)(*exc.args)
    except Exception:  # an exception type with another signature
        return exc
    clone.__cause__ = exc
    return clone
