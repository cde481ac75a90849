"""Fault injection for black-box tests: a TCP proxy, a UDP relay and a private Redis.

Theory of operation
-------------------
Every fault is injected *between* real processes, never inside them: the daemon under
test is a real process, Redis a real ``redis-server``, clients speak real UDP. The tools
sit on 127.0.0.1 in the paths the test chooses:

- :class:`TcpProxy` sits between one daemon and Redis (give the daemon
  ``--redis-url proxy.redis_url()``). It forwards bytes both ways until told otherwise.
  :meth:`~TcpProxy.partition` is a blackhole: nothing is forwarded and nothing more is
  read, so bytes pile up in the kernel buffers (and in the proxy's hands) exactly as on a
  partitioned network; connections stay open, and new ones are accepted but not
  forwarded (no connection to the target is opened). :meth:`~TcpProxy.heal` forwards
  again: everything held flows, in order. :meth:`~TcpProxy.cut` resets every live
  connection (RST, via ``SO_LINGER`` 0) and resets new ones at once until healed.
- :class:`UdpRelay` sits between UDP clients and one daemon: clients send to
  ``relay.address``; for each client address the relay opens its own socket towards the
  daemon (so the daemon sees one distinct address per client) and relays replies back.
  Each datagram, in either direction, may be dropped, duplicated or delayed. Decisions
  come from ``random.Random`` seeded per direction, and every datagram draws the same
  number of values whatever the faults, so the n-th datagram in a direction meets the
  same fate in every run with the same seed. ``drop_if`` drops chosen datagrams
  deterministically (say, every NOTIFY).
- :class:`RedisServer` is a private ``redis-server`` for one test (never the session-wide
  one), with real signals: :meth:`~RedisServer.pause` (SIGSTOP),
  :meth:`~RedisServer.resume` (SIGCONT), :meth:`~RedisServer.kill` (SIGKILL) and
  :meth:`~RedisServer.restart_empty` (kill, then a fresh empty server on the same port).

The proxy and the relay each run their own event loop in their own thread, so they keep
moving bytes while the test's loop is busy (or blocked), and can be driven from sync or
async code alike. Their control methods are synchronous and return once the change is in
effect inside the tool's loop: a datagram or a chunk the tool handles after ``partition()``
or ``set_faults()`` returned is handled under the new rules. Counters are plain ints,
written only by the tool's thread.

Fixtures: ``private_redis`` (a :class:`RedisServer`, always resumed and killed at
teardown), ``fault_kit`` (a :class:`FaultKit` that makes proxies and relays and stops them
at teardown) and ``private_daemons`` (a :class:`~daemons.DaemonFactory` on the private
Redis; like ``daemon_factory`` it fails the test if a daemon logged a traceback). A test
module enables them with
``from faults import fault_kit_fixture, private_daemons_fixture, private_redis_fixture``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, cast

import pytest

from daemons import DaemonFactory
from presence_daemon.embedded import SERVER_TUNING, EmbeddedRedis, find_redis_server

__all__ = [
    "Direction",
    "DropIf",
    "FaultKit",
    "RedisServer",
    "TcpProxy",
    "UdpFaults",
    "UdpRelay",
    "fault_kit_fixture",
    "private_daemons_fixture",
    "private_redis_fixture",
]

Address = tuple[str, int]
Direction = Literal["up", "down"]
"""``up``: client -> daemon; ``down``: daemon -> client."""
DropIf = Callable[[bytes, Direction], bool]
"""A predicate choosing datagrams to drop whatever the probabilities say."""

LOOPBACK: Final = "127.0.0.1"
CONTROL_TIMEOUT: Final = 5.0
"""Seconds a control call may take inside a tool's loop before it is an error."""
REDIS_START_TIMEOUT: Final = 10.0
"""Seconds a fresh redis-server may take to answer PING."""

T = TypeVar("T")


# ---------------------------------------------------------------------------
# A private event loop in a thread.


class _LoopThread:
    """Runs an asyncio loop in a daemon thread; :meth:`_call` runs code inside it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{self._name} is not running")
        return self._loop

    def _start_loop(self) -> None:
        if self._loop is not None:
            raise RuntimeError(f"{self._name} already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name=self._name, daemon=True)
        thread.start()
        if not ready.wait(CONTROL_TIMEOUT):
            raise RuntimeError(f"{self._name}: event loop did not start")
        self._loop, self._thread = loop, thread

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` in the tool's loop and wait (bounded) for its result."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(f"{self._name}: control methods are for other threads")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CONTROL_TIMEOUT)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run the plain function ``fn`` in the tool's loop; returns its result."""

        async def call() -> T:
            return fn()

        return self._run(call())

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CONTROL_TIMEOUT)
        self._loop = self._thread = None
        if not thread.is_alive():
            loop.close()


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close a TCP transport with an RST (SO_LINGER 0), not a FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cast(asyncio.Transport, transport).abort()


# ---------------------------------------------------------------------------
# TCP proxy.

ProxyState = Literal["forwarding", "partitioned", "cut"]


class _Link:
    """One proxied connection: a client side, an upstream side, and what is held."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.held_up: list[bytes] = []
        """Client -> target bytes not forwarded yet."""
        self.held_down: list[bytes] = []
        """Target -> client bytes not forwarded yet."""
        self.client_gone = False
        self.upstream_gone = False

    # -- events from the two sides (in the proxy's loop) --------------------------

    def received(self, from_client: bool, data: bytes) -> None:
        if from_client:
            self.held_up.append(data)
        else:
            self.held_down.append(data)
        if self.proxy.state == "forwarding":
            self.flush()
        else:
            self.pause()

    def lost(self, from_client: bool) -> None:
        if from_client:
            self.client_gone = True
        else:
            self.upstream_gone = True
        if self.proxy.state == "forwarding":
            self.flush()  # a close is forwarded only while forwarding, after the bytes

    # -- actions ------------------------------------------------------------------

    def open_upstream(self) -> None:
        if self.upstream is None and self.connecting is None and not self.client_gone:
            self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _ProxySide(self, from_client=False), *self.proxy.target
            )
        except OSError:
            _reset(self.client)  # the target refused: so does the proxy
            self.proxy.links.discard(self)
            return
        finally:
            self.connecting = None
        self.upstream = transport
        if self.proxy.state == "forwarding":
            self.flush()
        else:
            self.pause()

    def pause(self) -> None:
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                transport.pause_reading()

    def flush(self) -> None:
        """Forward everything held, propagate closes, read again (while forwarding)."""
        if self.upstream is None and not self.client_gone:
            self.open_upstream()
        up, down = self.upstream, self.client
        if up is not None and not up.is_closing() and self.held_up:
            for chunk in self.held_up:
                up.write(chunk)
                self.proxy.bytes_up += len(chunk)
            self.held_up.clear()
        if down is not None and not down.is_closing() and self.held_down:
            for chunk in self.held_down:
                down.write(chunk)
                self.proxy.bytes_down += len(chunk)
            self.held_down.clear()
        if self.client_gone:
            if up is not None:
                up.close()  # FIN after the written bytes
            if self.connecting is not None:
                self.connecting.cancel()
        if self.upstream_gone and down is not None:
            down.close()
        if self.client_gone and (self.upstream is None or self.upstream_gone):
            self.proxy.links.discard(self)
            return
        for transport in (down, up):
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def reset(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        _reset(self.client)
        _reset(self.upstream)
        self.held_up.clear()
        self.held_down.clear()


class _ProxySide(asyncio.Protocol):
    def __init__(self, link: _Link, *, from_client: bool) -> None:
        self.link = link
        self.from_client = from_client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.from_client:
            self.link.client = cast(asyncio.Transport, transport)
            self.link.proxy._admit(self.link)

    def data_received(self, data: bytes) -> None:
        self.link.received(self.from_client, data)

    def eof_received(self) -> bool | None:
        return None  # close our side; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(self.from_client)


class TcpProxy(_LoopThread):
    """A TCP proxy on 127.0.0.1 (free port) to ``target``, with a blackhole and a cut.

    Use as a context manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(self, target: Address, *, host: str = LOOPBACK) -> None:
        super().__init__(f"TcpProxy->{target[0]}:{target[1]}")
        self.target = target
        self.host = host
        self.state: ProxyState = "forwarding"
        self.links: set[_Link] = set()
        self.bytes_up = 0
        """Bytes forwarded client -> target."""
        self.bytes_down = 0
        """Bytes forwarded target -> client."""
        self.accepted = 0
        """Connections accepted and kept (forwarded now or after a heal)."""
        self.refused = 0
        """Connections reset on arrival because the proxy was cut."""
        self._server: asyncio.Server | None = None
        self.address: Address = ("", 0)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def bytes_forwarded(self) -> int:
        """Bytes forwarded in both directions."""
        return self.bytes_up + self.bytes_down

    @property
    def live_connections(self) -> int:
        return len(self.links)

    def redis_url(self, db: int = 0) -> str:
        """A redis:// URL that goes through the proxy."""
        return f"redis://{self.host}:{self.port}/{db}"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Self:
        self._start_loop()

        async def listen() -> Address:
            self._server = await self.loop.create_server(self._accept, self.host, 0)
            host, port = self._server.sockets[0].getsockname()[:2]
            return str(host), int(port)

        self.address = self._run(listen())
        return self

    def _accept(self) -> _ProxySide:
        return _ProxySide(_Link(self), from_client=True)

    def _admit(self, link: _Link) -> None:
        """A client connected (called from its connection_made)."""
        if self.state == "cut":
            self.refused += 1
            _reset(link.client)
            return
        self.accepted += 1
        self.links.add(link)
        if self.state == "forwarding":
            link.open_upstream()
        else:
            link.pause()  # accepted, not forwarded: the target never hears of it

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self.links):
                link.reset()
            self.links.clear()
            await asyncio.sleep(0)  # let the transports finish closing
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            self._run(shutdown())
        self._stop_loop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------

    def partition(self) -> None:
        """Blackhole: forward nothing, read nothing more; connections stay open and new
        ones are accepted but not forwarded."""

        def apply() -> None:
            self.state = "partitioned"
            for link in list(self.links):
                link.pause()

        self._call(apply)

    def heal(self) -> None:
        """Forward again; what was held (bytes, closes, new connections) goes through."""

        def apply() -> None:
            self.state = "forwarding"
            for link in list(self.links):
                link.flush()

        self._call(apply)

    def cut(self) -> None:
        """Reset every live connection (RST) and reset new ones at once until heal()."""

        def apply() -> None:
            self.state = "cut"
            for link in list(self.links):
                link.reset()
            self.links.clear()

        self._call(apply)

    def __repr__(self) -> str:
        return (
            f"<TcpProxy {self.host}:{self.port} -> {self.target[0]}:{self.target[1]} "
            f"{self.state} up={self.bytes_up} down={self.bytes_down}>"
        )


# ---------------------------------------------------------------------------
# UDP relay.


@dataclass(frozen=True, slots=True)
class UdpFaults:
    """What a :class:`UdpRelay` does to each datagram (in ``directions``)."""

    drop: float = 0.0
    """Probability of dropping a datagram."""
    duplicate: float = 0.0
    """Probability of sending a datagram twice (each copy gets its own delay)."""
    delay: tuple[float, float] = (0.0, 0.0)
    """Uniform range, in seconds, of the delay before a datagram is sent on."""
    drop_if: DropIf | None = None
    """Drop every datagram this predicate accepts (whatever ``drop`` says)."""
    directions: frozenset[Direction] = frozenset(("up", "down"))
    """Where the faults apply; the other direction passes untouched."""


@dataclass(slots=True)
class _RelayClient:
    address: Address
    transport: asyncio.DatagramTransport | None = None
    pending: list[bytes] = field(default_factory=list)


class _RelayListener(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.relay._from_client(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP from a client that went away: routine on UDP


class _RelayUpstream(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, client: Address) -> None:
        self.relay = relay
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.relay._from_target(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # the daemon is not there (stopped, killed): the client will notice


class UdpRelay(_LoopThread):
    """A lossy UDP relay on 127.0.0.1 between clients and the daemon at ``target``.

    Clients send to :attr:`address`. ``seed`` makes every decision repeatable. No faults
    until :meth:`set_faults`; :meth:`clear` stops faulting (datagrams already delayed
    are still delivered when due).
    """

    def __init__(self, target: Address, *, seed: int = 0, host: str = LOOPBACK) -> None:
        super().__init__(f"UdpRelay->{target[0]}:{target[1]}")
        self.target = target
        self.host = host
        self.seed = seed
        self.faults = UdpFaults()
        self._rng: dict[Direction, random.Random] = {
            "up": random.Random(f"{seed}:up"),
            "down": random.Random(f"{seed}:down"),
        }
        self.received: dict[Direction, int] = {"up": 0, "down": 0}
        """Datagrams that reached the relay, per direction."""
        self.sent: dict[Direction, int] = {"up": 0, "down": 0}
        """Datagrams sent on, per direction (a duplicate counts twice)."""
        self.dropped = 0
        self.duplicated = 0
        self.delayed = 0
        """Datagram copies sent on after a delay > 0."""
        self.dropped_log: list[tuple[Direction, int]] = []
        """(direction, index among the datagrams received in that direction) of every drop."""
        self.clients: dict[Address, _RelayClient] = {}
        self._listener: asyncio.DatagramTransport | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self._closed = False
        self.address: Address = ("", 0)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Self:
        self._start_loop()

        async def listen() -> Address:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _RelayListener(self), local_addr=(self.host, 0)
            )
            self._listener = transport
            host, port = transport.get_extra_info("sockname")[:2]
            return str(host), int(port)

        self.address = self._run(listen())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._closed = True
            if self._listener is not None:
                self._listener.close()
            for task in self._opening:
                task.cancel()
            if self._opening:
                await asyncio.wait(self._opening, timeout=CONTROL_TIMEOUT)
            for client in self.clients.values():
                if client.transport is not None:
                    client.transport.close()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            self._run(shutdown())
        self._stop_loop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------

    def set_faults(
        self,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        drop_if: DropIf | None = None,
        directions: Iterable[Direction] = ("up", "down"),
    ) -> None:
        """Fault every datagram handled from now on (replaces the previous faults)."""
        if not (0.0 <= drop <= 1.0 and 0.0 <= duplicate <= 1.0):
            raise ValueError("probabilities are between 0 and 1")
        if not 0.0 <= delay[0] <= delay[1]:
            raise ValueError("delay is a range (low, high) of seconds, 0 <= low <= high")
        faults = UdpFaults(drop, duplicate, delay, drop_if, frozenset(directions))

        def apply() -> None:
            self.faults = faults

        self._call(apply)

    def clear(self) -> None:
        """Stop faulting from now on."""

        def apply() -> None:
            self.faults = UdpFaults()

        self._call(apply)

    def upstream_address(self, client: Address) -> Address:
        """The address the daemon sees for ``client`` (once it has sent something)."""

        def read() -> Address:
            relay_client = self.clients.get(client)
            if relay_client is None or relay_client.transport is None:
                raise KeyError(f"no upstream socket for {client} yet")
            host, port = relay_client.transport.get_extra_info("sockname")[:2]
            return str(host), int(port)

        return self._call(read)

    # -- datagrams (in the relay's loop) -------------------------------------------

    def _decide(self, direction: Direction, data: bytes) -> list[float]:
        """The delays of the copies to send on ([] for a drop). Always draws 4 values."""
        rng = self._rng[direction]
        u_drop, u_dup, u_delay1, u_delay2 = (rng.random() for _ in range(4))
        index = self.received[direction]
        self.received[direction] += 1
        faults = self.faults
        if direction not in faults.directions:
            return [0.0]
        if u_drop < faults.drop or (faults.drop_if is not None and faults.drop_if(data, direction)):
            self.dropped += 1
            self.dropped_log.append((direction, index))
            return []
        low, high = faults.delay
        delays = [low + (high - low) * u_delay1]
        if u_dup < faults.duplicate:
            self.duplicated += 1
            delays.append(low + (high - low) * u_delay2)
        return delays

    def _dispatch(self, delays: list[float], send: Callable[[], None]) -> None:
        for delay in delays:
            if delay > 0:
                self.delayed += 1
                self.loop.call_later(delay, send)
            else:
                send()

    def _from_client(self, data: bytes, addr: Address) -> None:
        client = self.clients.get(addr)
        if client is None:
            client = self.clients[addr] = _RelayClient(addr)
            task = self.loop.create_task(self._open_upstream(client))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        self._dispatch(self._decide("up", data), lambda: self._send_up(client, data))

    async def _open_upstream(self, client: _RelayClient) -> None:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _RelayUpstream(self, client.address),
            local_addr=(self.host, 0),
            remote_addr=self.target,
        )
        if self._closed:
            transport.close()
            return
        client.transport = transport
        pending, client.pending = client.pending, []
        for data in pending:
            self._send_up(client, data)

    def _send_up(self, client: _RelayClient, data: bytes) -> None:
        if self._closed:
            return
        if client.transport is None:
            client.pending.append(data)
            return
        client.transport.sendto(data)
        self.sent["up"] += 1

    def _from_target(self, data: bytes, client: Address) -> None:
        self._dispatch(self._decide("down", data), lambda: self._send_down(client, data))

    def _send_down(self, client: Address, data: bytes) -> None:
        if self._closed or self._listener is None:
            return
        self._listener.sendto(data, client)
        self.sent["down"] += 1

    def __repr__(self) -> str:
        return (
            f"<UdpRelay {self.address[0]}:{self.address[1]} -> {self.target[0]}:{self.target[1]} "
            f"seed={self.seed} dropped={self.dropped} duplicated={self.duplicated} "
            f"delayed={self.delayed}>"
        )


# ---------------------------------------------------------------------------
# A private Redis with real signals.


def _answers_ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis on 127.0.0.1:``port`` answers PING with PONG within ``timeout``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private ``redis-server`` for one test, with pause / resume / kill / restart.

    The first server is an :class:`~presence_daemon.embedded.EmbeddedRedis` (free port,
    no persistence); :meth:`restart_empty` replaces it by a fresh, empty ``redis-server``
    on the same port (same flags: no persistence, loopback only). :meth:`stop` always
    leaves no process behind (it resumes a paused server before killing it).
    """

    def __init__(self, *, startup_timeout: float = REDIS_START_TIMEOUT) -> None:
        self.startup_timeout = startup_timeout
        self._embedded = EmbeddedRedis(startup_timeout=startup_timeout)
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._replacement_dir: str | None = None
        self.paused = False
        self.restarts = 0
        """How many times :meth:`restart_empty` started a fresh server."""

    # -- properties ----------------------------------------------------------------

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("RedisServer is not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer is not started")
        return self._port

    @property
    def address(self) -> Address:
        return LOOPBACK, self.port

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the current server process is alive (paused or not)."""
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Self:
        self._embedded.start()
        self._process = self._embedded.process
        self._port = self._embedded.port
        return self

    def stop(self) -> None:
        """Resume (so nothing stays stopped), kill, reap; remove the temp dirs."""
        with contextlib.suppress(ProcessLookupError, RuntimeError):
            self.kill()
        self._embedded.stop()  # its process is dead already; removes its temp dir
        self._remove_replacement_dir()
        self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: the server answers what piled up, in order."""
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, so a paused server dies at once) and reap it."""
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(CONTROL_TIMEOUT)
        self.paused = False

    def restart_empty(self) -> None:
        """Kill the server and start a fresh, empty one on the same port.

        Raises RuntimeError if the new server does not answer PING within
        ``startup_timeout`` (for instance if something else took the port meanwhile).
        """
        port = self.port
        self.kill()
        self._remove_replacement_dir()
        self._replacement_dir = tempfile.mkdtemp(prefix="presence-redis-restart-")
        log_path = Path(self._replacement_dir) / "redis.log"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            process = self._spawn(port, log_path)
            while time.monotonic() < deadline and process.poll() is None:
                if _answers_ping(port):
                    self._process = process
                    self.restarts += 1
                    return
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.02)
            if process.poll() is None:
                process.kill()
            process.wait(CONTROL_TIMEOUT)
            if time.monotonic() >= deadline:
                log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise RuntimeError(f"redis-server did not restart on port {port}:\n{log}")

    def _spawn(self, port: int, log_path: Path) -> subprocess.Popen[bytes]:
        assert self._replacement_dir is not None
        args = [
            find_redis_server(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._replacement_dir,
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            *SERVER_TUNING,
        ]
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._replacement_dir,
            )

    def _remove_replacement_dir(self) -> None:
        directory, self._replacement_dir = self._replacement_dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("running" if self.running else "stopped")
        port = self._port if self._port is not None else "-"
        return f"<RedisServer port={port} {state} restarts={self.restarts}>"


# ---------------------------------------------------------------------------
# Fixtures.


class FaultKit:
    """Makes started proxies and relays for one test; :meth:`close` stops them all."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def proxy(self, target: Address) -> TcpProxy:
        """A started :class:`TcpProxy` to ``target``."""
        return self._stack.enter_context(TcpProxy(target))

    def relay(self, target: Address, *, seed: int = 0) -> UdpRelay:
        """A started :class:`UdpRelay` to ``target``."""
        return self._stack.enter_context(UdpRelay(target, seed=seed))

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(name="private_redis")
def private_redis_fixture() -> Iterator[RedisServer]:
    """A redis-server of the test's own (not the session one); at teardown it is resumed
    if paused, then killed."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(name="fault_kit")
def fault_kit_fixture() -> Iterator[FaultKit]:
    """Proxies and relays for the test (``fault_kit.proxy(target)``), stopped at teardown."""
    kit = FaultKit()
    try:
        yield kit
    finally:
        kit.close()


@pytest.fixture(name="private_daemons")
def private_daemons_fixture(
    private_redis: RedisServer, fault_kit: FaultKit
) -> Iterator[DaemonFactory]:
    """Daemon processes on ``private_redis`` (override ``--redis-url`` to go through a
    proxy). Torn down before the kit and the Redis, so no daemon sees its Redis vanish;
    the test errors if a daemon logged a traceback."""
    factory = DaemonFactory(private_redis.url)
    try:
        yield factory
        broken = factory.close_all()
        if broken:
            logs = "\n\n".join(f"{d!r} stderr:\n{d.stderr()}" for d in broken)
            pytest.fail(f"daemon logged a traceback:\n{logs}")
    finally:
        factory.close_all()
        factory.cleanup()
