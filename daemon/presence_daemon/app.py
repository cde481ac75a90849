"""Run the daemon: wire the UDP socket, the presence library and Redis together.

The asyncio glue is deliberately thin: :class:`DatagramHandler` only moves bytes into
:class:`~presence_daemon.server.Server`, and :func:`serve` runs until its
``shutdown_trigger`` completes (SIGTERM/SIGINT by default), then removes every client it
holds from Redis so that no user stays online because its daemon stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, cast

from presence_daemon import auth, logs, metrics
from presence_daemon.config import Config, ConfigError, safe_url
from presence_daemon.embedded import EmbeddedRedis
from presence_daemon.presence import InstanceIdInUse, Presence, redis_client
from presence_daemon.server import Address, Server

log = logging.getLogger("presence_daemon")

READY_PREFIX: Final = "presence-daemon listening on udp://"
"""Start of the line printed to stdout once the daemon serves (tests and scripts wait on it)."""


class DatagramHandler(asyncio.DatagramProtocol):
    """Moves datagrams between the socket and the Server; nothing else."""

    def __init__(self, server: Server) -> None:
        self.server = server
        # The event loop looks this up on every datagram: the server's own method,
        # bound here, saves a Python call per datagram (a tenth of a PING's cost).
        self.datagram_received = server.datagram_received  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport.
        self.server.set_sender(cast(asyncio.DatagramTransport, transport).sendto)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.server.datagram_received(data, addr)  # replaced in __init__; kept for clarity

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. a client's port closed) arrive here; they are routine on UDP.
        self.server.counters["socket_errors"] += 1


def _install_signal_trigger() -> Callable[[], Awaitable[None]]:
    """Catch SIGTERM and SIGINT from now on; returns a trigger that waits for one.

    Installed before the daemon says it is ready, so a signal sent the moment it is
    ready still shuts it down cleanly. After the first signal, further ones are only
    logged: a second Ctrl-C must not cut short the clean-up that keeps users from
    staying online. (The handlers go away with the loop.)
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            log.info("already shutting down")
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)

    async def wait_for_signal() -> None:
        await stop.wait()

    return wait_for_signal


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    on_ready: Callable[[Server, Address], None] | None = None,
) -> Server:
    """Serve until ``shutdown_trigger()`` returns; then drain and clean up.

    Returns the Server (its counters are final). Raises BindError if the UDP port cannot
    be bound (before any Redis is started or reached), redis errors or OSError if Redis
    cannot be reached at start-up.
    """
    verifier = auth.from_config(config)  # before anything starts: bad key files fail fast
    # The port next: one in use (or an address not ours) fails before any Redis starts.
    # Datagrams that arrive before the daemon serves wait in the socket's buffer.
    bound = bind_udp(config.host, config.port, reuse_port=config.reuse_port)
    udp_inode = metrics.socket_inode(bound)  # (the kernel's drop count is kept by inode)
    sock: socket.socket | None = bound
    metrics_sock: socket.socket | None = None
    embedded: EmbeddedRedis | None = None
    endpoint: metrics.MetricsServer | None = None
    try:
        if config.metrics_port:
            metrics_sock = metrics.bind_tcp(config.metrics_host, config.metrics_port)
        redis_url = config.redis_url
        if config.embedded_redis:
            embedded = EmbeddedRedis()
            embedded.start()
            redis_url = embedded.url
            log.info("started embedded redis-server at %s", redis_url)
        presence = Presence(
            redis_client(
                redis_url, max_connections=config.workers + 16, timeout=config.redis_timeout
            ),
            instance_id=config.pick_instance_id(),
            max_friends=config.max_friends,
            lease_ttl=config.lease_ttl,
            stream_max_len=config.stream_max_len,
        )
        logs.set_instance(presence.instance_id)
        # Before start(): reaping at start notifies friends.
        server = Server(config, presence, verifier=verifier)
        transitions = metrics.TransitionCounter()
        presence.subscribe(transitions)
        health = metrics.Health(server)
        if metrics_sock is not None:
            registry = metrics.registry_for(server, health, transitions, udp_inode)
            endpoint = metrics.MetricsServer(registry, health)
            await endpoint.start(metrics_sock)  # /readyz: "starting" until it serves
            metrics_sock = None  # the endpoint's now
        trigger = shutdown_trigger or _install_signal_trigger()
        try:
            await presence.start()
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: DatagramHandler(server), sock=sock
            )
            sock = None  # the transport's now
            _enlarge_receive_buffer(transport)
            watcher: asyncio.Task[None] | None = None
            try:
                server.start()
                health.started = True
                watcher = asyncio.create_task(_watch(server, health))
                host, port = transport.get_extra_info("sockname")[:2]
                print(f"{READY_PREFIX}{host}:{port} instance={server.instance_id}", flush=True)
                _log_start(server, (host, port), redis_url, endpoint)
                _log_auth(config, verifier)
                if on_ready is not None:
                    on_ready(server, (host, port))
                await trigger()
                log.info(
                    "shutting down: removing %d clients from Redis",
                    len(server.by_client),
                    extra={"event": "stopping", "clients": len(server.by_client)},
                )
                await server.stop()
            finally:
                if watcher is not None:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
                transport.close()
            log.info(
                "stopped; counters: %s",
                dict(sorted(server.counters.items())),
                extra={"event": "stopped"},
            )
            return server
        finally:
            await presence.close()
    finally:
        if endpoint is not None:
            await endpoint.close()
        if sock is not None:
            sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
        if embedded is not None:
            embedded.stop()


HEALTH_POLL_INTERVAL: Final = 0.25
"""Seconds between two looks at Redis's state (for the down/up log lines)."""


async def _watch(server: Server, health: metrics.Health) -> None:
    """Log Redis going down and coming back (once per change), and a summary of the bad
    datagrams of each interval (never a line per datagram; the last one when cancelled)."""
    summary = logs.BadDatagramSummary(lambda: server.counters)
    loop = asyncio.get_running_loop()
    next_summary = loop.time() + logs.BAD_DATAGRAM_LOG_INTERVAL
    try:
        while True:
            await asyncio.sleep(HEALTH_POLL_INTERVAL)
            health.poll()
            if loop.time() >= next_summary:
                next_summary = loop.time() + logs.BAD_DATAGRAM_LOG_INTERVAL
                summary.tick()
    finally:
        summary.tick()


def _log_start(
    server: Server,
    address: Address,
    redis_url: str,
    endpoint: metrics.MetricsServer | None,
) -> None:
    """The start line: where the daemon serves, as whom, on which Redis (no password)."""
    host, port = address
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    http = ""
    fields: dict[str, object] = {
        "event": "started",
        "address": f"udp://{where}",
        "instance": server.instance_id,
        "redis": safe_url(redis_url),
    }
    if endpoint is not None:
        mhost, mport = endpoint.address
        mwhere = f"[{mhost}]:{mport}" if ":" in mhost else f"{mhost}:{mport}"
        http = f"; metrics on http://{mwhere}/metrics"
        fields["metrics"] = f"http://{mwhere}"
    log.info(
        "serving on udp://%s as instance %s with redis %s%s",
        where,
        server.instance_id,
        safe_url(redis_url),
        http,
        extra=fields,
    )


def _log_auth(config: Config, verifier: auth.Verifier | None) -> None:
    """One line saying who may connect as whom."""
    if verifier is not None:
        log.info("auth: a CONNECT needs a login token (%s)", ", ".join(verifier.algorithms))
    elif config.insecure_no_auth:
        log.warning(
            "auth: NONE (--insecure-no-auth): anyone who can reach udp://%s:%d can connect "
            "as any user",
            config.host,
            config.port,
        )
    else:
        log.info("auth: none; serving loopback only, where every local process may be any user")


RECEIVE_BUFFER: Final = 4 * 1024 * 1024
"""Bytes asked for the UDP receive buffer: room for a burst of CONNECTs (clients moving
here from a stopping daemon) while the event loop is busy. The kernel may grant less
(net.core.rmem_max)."""


def _enlarge_receive_buffer(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


class BindError(OSError):
    """The UDP port cannot be bound; the message names host:port and the reason."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]"
        return self.strerror or super().__str__()


def bind_udp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port``, or BindError saying why not
    (e.g. "address already in use", "cannot assign requested address")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        reason = (exc.strerror or str(exc)).lower()
        raise BindError(exc.errno, f"cannot listen on udp://{where}: {reason}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _credentials_refused(url: str) -> str:
    """The one line for a Redis that refused our credentials (or their absence)."""
    if _has_password(url):
        why = "wrong user name or password (or the user is disabled)"
    else:
        why = "it needs a password (redis://[USER]:PASSWORD@HOST:PORT/DB) and the URL has none"
    return f"Redis at {safe_url(url)} refused the connection: {why}"


def _has_password(url: str) -> bool:
    if re.search(r"[?&]password=", url):
        return True
    authority = url.partition("://")[2].partition("/")[0]
    return ":" in authority.rpartition("@")[0]


def _run_with_uvloop(main: Coroutine[Any, Any, object]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def run(config: Config) -> int:
    """Run the daemon in the current thread with uvloop; returns a process exit code."""
    # A worker sharing its port with others (--processes) shares their log too: its
    # lines name it.
    who = config.instance_id if config.reuse_port and config.instance_id else ""
    logs.configure(config.log_level, config.log_format, instance=who)
    try:
        _run_with_uvloop(serve(config))
    except ConfigError as exc:
        print(f"presence-daemon: error: {exc}", file=sys.stderr)
        return 2
    except InstanceIdInUse as exc:
        print(f"presence-daemon: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as exc:
        print(f"presence-daemon: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from redis.exceptions import AuthenticationError, RedisError

        if isinstance(exc, AuthenticationError) and not config.embedded_redis:
            print(
                f"presence-daemon: error: {_credentials_refused(config.redis_url)}", file=sys.stderr
            )
            return 1
        if isinstance(exc, RedisError):
            print(f"presence-daemon: error: Redis: {exc}", file=sys.stderr)
            return 1
        raise
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
