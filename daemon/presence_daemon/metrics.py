"""Prometheus metrics, liveness and readiness over a small HTTP endpoint.

Theory of operation
-------------------
The daemon counts what happens in plain ints (``Server.counters``, the per-type lists,
the Batcher's round-trip buckets): nothing on the datagram path knows about
Prometheus. :class:`DaemonCollector` reads those numbers when Prometheus scrapes and
turns them into metric families, so the cost of metrics is the scrape's, not each
datagram's.

:class:`Health` decides readiness from what the daemon already tracks: the event-loop
time of the last lease renewal that found the lease held (Redis answered), when the
lease runs out, a Redis error since the last renewal (the daemon then answers CONNECT
and SNAPSHOT_REQUEST with TRY_AGAIN), and shutdown. It also logs when Redis goes down
and comes back, once per change.

:class:`MetricsServer` is a deliberately small HTTP/1.x server on the daemon's own event
loop: GET only, one request per connection, a bounded request head, a timeout for
reading it and a bound on connections at once. Paths: ``/metrics`` (Prometheus text
format), ``/healthz`` (200 while the process runs), ``/readyz`` (200, or 503 with a
one-line reason). It serves from before Redis is reached (``/readyz``: "starting"), so a
port in use fails the start at once, with one line, and a probe never hangs on a daemon
still waiting for Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from presence_client.protocol import CLIENT_TO_DAEMON, DAEMON_TO_CLIENT, ErrorCode, MessageType
from presence_daemon.batch import ROUND_TRIP_BUCKETS
from presence_daemon.limits import SCOPES
from presence_daemon.presence import Transition

if TYPE_CHECKING:
    from presence_daemon.server import Server

log = logging.getLogger("presence_daemon.health")
transition_log = logging.getLogger("presence_daemon.server")
"""Transitions are logged with the server's connects and disconnects."""

MAX_REQUEST_HEAD: Final = 8192
"""Bytes a request line and headers may take; a longer head is answered 431."""
REQUEST_TIMEOUT: Final = 5.0
"""Seconds a client has to send its request head (and to read the answer)."""
MAX_CONNECTIONS: Final = 32
"""HTTP connections served at once. A connection beyond them takes the place of the one
that has waited longest for its request head (a prober is never starved by connections
that send nothing); with none waiting, it is closed unanswered."""
REDIS_GRACE: Final = 0.5
"""Seconds, on top of two renewal intervals, without a renewal before Redis counts as
down."""

SHED: Final = {
    "dropped_overload": "queue_full",
    "refused_stopping": "stopping",
    "connects_deferred": "connect_deferred",
    "snapshots_deferred": "snapshot_deferred",
}
"""Counter -> reason label of presence_shed_total."""
WITHHELD: Final = {
    "notifications_coalesced": "coalesced",
    "notifications_superseded": "superseded",
    "notifications_stale": "stale",
    "notifications_unverified": "unverified",
    "notifications_dropped_ended": "session_ended",
}
"""Counter -> reason label of presence_notifications_withheld_total."""
REJECTED: Final = (
    *(code.name.lower() for code in ErrorCode if code is not ErrorCode.TRY_AGAIN),
    "connect_too_small",
)
"""Reasons of presence_datagrams_rejected_total always listed (others appear when seen)."""
LIMITED: Final = ("connect", "friends", "snapshot")
"""Request kinds with rate limits (presence_rate_limited_total)."""
NAMED: Final = frozenset(
    {
        "datagrams_in",
        "datagrams_out",
        "pings",
        "connects",
        "notifications",
        "handoffs",
        "redis_errors",
        "dropped_daemon_message",
        *SHED,
        *WITHHELD,
    }
)
"""Counters with a metric of their own; every other one is a presence_events_total."""


def _type_name(kind: int) -> str:
    return MessageType(kind).name.lower()


class TransitionCounter:
    """Counts the transitions this daemon decides (a listener of Presence.subscribe)
    and logs each at debug."""

    def __init__(self) -> None:
        self.online = 0
        self.offline = 0

    def __call__(self, transition: Transition) -> None:
        if transition.online:
            self.online += 1
        else:
            self.offline += 1
        if transition_log.isEnabledFor(logging.DEBUG):
            state = "online" if transition.online else "offline"
            transition_log.debug(
                "transition: user %s went %s (version %d)",
                transition.user,
                state,
                transition.version,
                extra={
                    "event": "transition",
                    "user": transition.user,
                    "state": state,
                    "version": transition.version,
                },
            )


class Health:
    """Readiness of one daemon, and the log lines when Redis goes down or comes back."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.started = False
        """Set once the daemon serves (Redis reached, lease taken, workers running)."""
        self.redis_up = True
        self._down_since = 0.0

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def redis_silence(self) -> float:
        """Seconds since the last lease renewal that found the lease held."""
        return max(self._now() - self.server.presence.renewed_at, 0.0)

    def redis_answering(self) -> bool:
        """True while lease renewals (about one a second) go through."""
        presence = self.server.presence
        return self.redis_silence() <= 2 * presence.renew_interval + REDIS_GRACE

    def lease_expires_in(self) -> float:
        """Seconds until this daemon's lease stops covering writes (negative: past)."""
        presence = self.server.presence
        return presence.fence_ms / 1000 - presence.now()

    def not_ready(self) -> str:
        """Why the daemon should get no new clients now, in one line; "" if ready."""
        server = self.server
        if not self.started:
            return "starting"
        if server.stopping:
            return "shutting down"
        if not self.redis_answering():
            return f"Redis has not answered a lease renewal for {self.redis_silence():.1f} s"
        if self.lease_expires_in() <= 0:
            return "lease not held"
        # (Private on purpose: readiness is the one other reader of this rule.)
        if not server._reads_trusted():
            return "a Redis call failed since the last lease renewal"
        return ""

    def poll(self) -> None:
        """Log a change of Redis's state (down, up again): once per change."""
        if not self.started:
            return
        up = self.redis_answering()
        if up == self.redis_up:
            return
        self.redis_up = up
        instance = self.server.instance_id
        if not up:
            self._down_since = self._now() - self.redis_silence()
            log.warning(
                "Redis down: no lease renewal for %.1f s; CONNECT and SNAPSHOT_REQUEST get "
                "TRY_AGAIN until it answers",
                self.redis_silence(),
                extra={"event": "redis_down", "instance": instance},
            )
        else:
            down_for = self._now() - self._down_since
            log.info(
                "Redis up again after %.1f s",
                down_for,
                extra={"event": "redis_up", "instance": instance, "down_seconds": down_for},
            )


class DaemonCollector(Collector):
    """Turns the daemon's plain counters into Prometheus metrics at scrape time."""

    def __init__(
        self,
        server: Server,
        health: Health,
        transitions: TransitionCounter,
        udp_inode: int | None = None,
    ) -> None:
        self.server = server
        self.health = health
        self.transitions = transitions
        self.udp_inode = udp_inode
        """The UDP socket's inode (its line in /proc/net/udp), if known."""

    def collect(self) -> Iterator[Metric]:
        server = self.server
        presence = server.presence
        counters = dict(server.counters)

        received = CounterMetricFamily(
            "presence_datagrams_received",
            "UDP datagrams received, by message type ('other': not decodable, or a type "
            "only daemons send)",
            labels=["type"],
        )
        by_type = {_type_name(k): server.received_by_type[k] for k in sorted(CLIENT_TO_DAEMON)}
        by_type["ping"] += server.fast_pongs
        decoded = sum(by_type.values())
        by_type["other"] = max(counters.get("datagrams_in", 0) - decoded, 0)
        for kind, count in sorted(by_type.items()):
            received.add_metric([kind], count)
        yield received

        sent = CounterMetricFamily(
            "presence_datagrams_sent", "UDP datagrams sent, by message type", labels=["type"]
        )
        out = {_type_name(k): server.sent_by_type[k] for k in sorted(DAEMON_TO_CLIENT)}
        out["pong"] += server.fast_pongs
        for kind, count in sorted(out.items()):
            sent.add_metric([kind], count)
        yield sent

        rejected = CounterMetricFamily(
            "presence_datagrams_rejected",
            "Datagrams refused (answered with an ERROR or dropped), by reason",
            labels=["reason"],
        )
        reasons = dict.fromkeys(REJECTED, 0)  # always there: no gaps in graphs
        for name, count in counters.items():
            if name.startswith("rejected_"):
                reasons[name.removeprefix("rejected_")] = count
        reasons["daemon_message"] = counters.get("dropped_daemon_message", 0)
        for reason, count in sorted(reasons.items()):
            rejected.add_metric([reason], count)
        yield rejected

        limited = CounterMetricFamily(
            "presence_rate_limited",
            "Requests answered TRY_AGAIN by a rate limit, by request kind and scope",
            labels=["kind", "scope"],
        )
        scopes = {(kind, scope): 0 for kind in LIMITED for scope in SCOPES}
        scopes["snapshot", "session"] = 0
        for name, count in counters.items():
            if name.startswith("rate_limited_"):
                kind, _, scope = name.removeprefix("rate_limited_").partition("_")
                scopes[kind, scope] = count
        for (kind, scope), count in sorted(scopes.items()):
            limited.add_metric([kind, scope], count)
        yield limited

        drops = udp_receive_drops(self.udp_inode) if self.udp_inode is not None else None
        if drops is not None:
            yield CounterMetricFamily(
                "presence_udp_receive_drops",
                "Datagrams the kernel dropped because the socket's receive buffer was full",
                value=drops,
            )

        shed = CounterMetricFamily(
            "presence_shed",
            "Work refused with TRY_AGAIN instead of done: queue full, stopping, or "
            "deferred until the next lease renewal after a Redis error",
            labels=["reason"],
        )
        for name, reason in SHED.items():
            shed.add_metric([reason], counters.get(name, 0))
        yield shed

        yield GaugeMetricFamily(
            "presence_sessions", "Client sessions this daemon holds", value=len(server.by_token)
        )
        yield CounterMetricFamily(
            "presence_connects",
            "CONNECTs that made a new session",
            value=counters.get("connects", 0),
        )
        removed = CounterMetricFamily(
            "presence_sessions_removed",
            "Sessions removed, by reason (disconnect, timeout, shutdown)",
            labels=["reason"],
        )
        for reason in ("disconnect", "timeout", "shutdown"):
            removed.add_metric([reason], counters.get(f"removed_{reason}", 0))
        yield removed

        transitions = CounterMetricFamily(
            "presence_transitions",
            "Users this daemon took online or offline",
            labels=["to"],
        )
        transitions.add_metric(["online"], self.transitions.online)
        transitions.add_metric(["offline"], self.transitions.offline)
        yield transitions

        yield CounterMetricFamily(
            "presence_notifications_sent",
            "NOTIFYs sent to clients this daemon holds",
            value=counters.get("notifications", 0),
        )
        yield CounterMetricFamily(
            "presence_notifications_handed_off",
            "Notifications published to the daemon holding the client",
            value=counters.get("handoffs", 0),
        )
        withheld = CounterMetricFamily(
            "presence_notifications_withheld",
            "Notifications not sent, by reason",
            labels=["reason"],
        )
        for name, reason in WITHHELD.items():
            withheld.add_metric([reason], counters.get(name, 0))
        yield withheld

        io = presence.io
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(ROUND_TRIP_BUCKETS, io.round_trips, strict=False):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", cumulative + io.round_trips[-1]))
        yield HistogramMetricFamily(
            "presence_redis_round_trip_seconds",
            "Time per Redis pipeline round trip (the commands of one event-loop tick)",
            buckets=buckets,
            sum_value=io.round_trip_seconds,
        )
        yield CounterMetricFamily(
            "presence_redis_commands",
            "Redis commands sent in pipelines",
            value=io.commands,
        )
        yield CounterMetricFamily(
            "presence_redis_errors",
            "Redis calls of client requests that failed",
            value=counters.get("redis_errors", 0),
        )
        yield GaugeMetricFamily(
            "presence_redis_up",
            "1 while lease renewals go through (Redis answers), else 0",
            value=int(self.health.started and self.health.redis_answering()),
        )
        yield GaugeMetricFamily(
            "presence_redis_silence_seconds",
            "Seconds since the last lease renewal that Redis answered",
            value=self.health.redis_silence(),
        )

        expires_in = self.health.lease_expires_in()
        yield GaugeMetricFamily(
            "presence_lease_held", "1 while this daemon's lease is held", value=int(expires_in > 0)
        )
        yield GaugeMetricFamily(
            "presence_lease_expires_in_seconds",
            "Seconds until the lease stops covering writes unless renewed",
            value=expires_in,
        )
        yield CounterMetricFamily(
            "presence_lease_losses",
            "Times the lease was found lapsed and taken again",
            value=presence.lease_losses,
        )
        yield CounterMetricFamily(
            "presence_reaped_clients",
            "Clients of dead daemons this daemon disconnected",
            value=presence.reaped,
        )
        yield GaugeMetricFamily(
            "presence_ready", "1 when /readyz answers 200", value=int(not self.health.not_ready())
        )

        now = server.clock()
        lag = 0.0
        if server.recency:
            oldest = next(iter(server.recency.values()))
            lag = max(now - server.config.timeout - oldest.last_seen, 0.0)
        yield GaugeMetricFamily(
            "presence_sweep_lag_seconds",
            "How long past its timeout the longest-silent session still held is",
            value=lag,
        )
        yield GaugeMetricFamily(
            "presence_event_loop_lag_seconds",
            "How late the last timeout sweep started (event-loop lag)",
            value=server.sweep_delay,
        )

        depths = [queue.qsize() for queue in server._queues]
        yield GaugeMetricFamily(
            "presence_queue_depth", "Jobs waiting in all worker queues", value=sum(depths)
        )
        yield GaugeMetricFamily(
            "presence_queue_depth_max",
            "Jobs waiting in the fullest worker queue",
            value=max(depths),
        )
        yield GaugeMetricFamily(
            "presence_queue_capacity",
            "Jobs one worker queue holds before new ones get TRY_AGAIN",
            value=server.config.queue_size,
        )
        yield GaugeMetricFamily(
            "presence_retries_pending",
            "Timeouts and restores waiting for the next sweep to retry them",
            value=len(server._failed_removals) + len(server._failed_restores),
        )

        events = CounterMetricFamily(
            "presence_events",
            "Everything else the daemon counts, by name (see docs/operations.md)",
            labels=["event"],
        )
        for name, count in sorted(counters.items()):
            if name in NAMED or name.startswith(("rejected_", "rate_limited_", "removed_")):
                continue
            events.add_metric([name], count)
        yield events

        info = GaugeMetricFamily(
            "presence_info", "This daemon's instance id (value always 1)", labels=["instance_id"]
        )
        info.add_metric([server.instance_id], 1)
        yield info


def socket_inode(sock: socket.socket) -> int | None:
    """The inode of ``sock`` (how /proc/net/udp names it), or None."""
    try:
        return os.fstat(sock.fileno()).st_ino
    except (OSError, ValueError):
        return None


def udp_receive_drops(udp_inode: int) -> int | None:
    """What the kernel dropped for the UDP socket with inode ``udp_inode`` (receive
    buffer full), from /proc/net/udp and udp6 (Linux); None where that cannot be read."""
    inode = str(udp_inode)
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)  # the header
                for line in lines:
                    fields = line.split()
                    if len(fields) >= 13 and fields[9] == inode:
                        return int(fields[12])
        except (OSError, ValueError):
            continue
    return None


def registry_for(
    server: Server,
    health: Health,
    transitions: TransitionCounter,
    udp_inode: int | None = None,
) -> CollectorRegistry:
    """A registry with the daemon's metrics and the standard process metrics."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(server, health, transitions, udp_inode))
    ProcessCollector(registry=registry)
    return registry


class MetricsBindError(OSError):
    """The metrics port cannot be bound; the message names host:port and the reason."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` for the metrics endpoint, or
    MetricsBindError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        reason = (exc.strerror or str(exc)).lower()
        raise MetricsBindError(
            exc.errno, f"cannot listen on http://{where} (--metrics-port): {reason}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on a bound socket (see the module doc)."""

    def __init__(self, registry: CollectorRegistry, health: Health) -> None:
        self.registry = registry
        self.health = health
        self._server: asyncio.Server | None = None
        self._open = 0
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        """Connections still waiting for their request head, oldest first."""
        self.scrapes = 0
        self.failures = 0

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=MAX_REQUEST_HEAD)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            if not self._waiting:
                writer.close()
                return
            oldest = next(iter(self._waiting))  # (its handler ends and frees its place)
            del self._waiting[oldest]
            oldest.close()
        self._open += 1
        try:
            self._waiting[writer] = None
            try:
                status, content_type, body = await self._answer(reader)
            finally:
                self._waiting.pop(writer, None)
            if writer.is_closing():  # evicted while it sent nothing: no one to answer
                return
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Allow: GET\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the client went away or stopped reading: nothing to tell it
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except TimeoutError:
            return 408, text, b"request head not received in time\n"
        except asyncio.LimitOverrunError:
            return 431, text, b"request head too large\n"
        except asyncio.IncompleteReadError:
            return 400, text, b"incomplete request\n"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, text, b"bad request line\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return 405, text, b"only GET\n"
        if target == b"/metrics":
            self.scrapes += 1
            try:
                return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
            except Exception:  # a bug of ours: answer 500, keep serving
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.exception("scrape failed (failures so far: %d)", self.failures)
                return 500, text, b"metrics could not be collected; see the daemon's log\n"
        if target == b"/healthz":
            return 200, text, b"ok\n"
        if target == b"/readyz":
            reason = self.health.not_ready()
            if reason:
                return 503, text, f"not ready: {reason}\n".encode()
            return 200, text, b"ready\n"
        return 404, text, b"not found: try /metrics, /healthz or /readyz\n"
