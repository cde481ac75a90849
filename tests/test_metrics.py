"""The metrics endpoint of real daemon processes: /metrics values move as clients come
and go, /healthz and /readyz follow Redis, the port flags, and the Grafana dashboard
queries only metrics a daemon serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemons import (  # noqa: F401 - the fixture
    DaemonFactory,
    DaemonProcess,
    RawPeer,
    daemon_env,
    daemon_factory_fixture,
)
from faults import (  # noqa: F401 - fixtures
    FaultKit,
    RedisServer,
    fault_kit_fixture,
    private_daemons_fixture,
    private_redis_fixture,
)
from helpers import wait_for
from presence_daemon.metrics import MAX_CONNECTIONS

DASHBOARD: Final = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "presence.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_tcp_port(count: int = 1) -> int:
    """A port P such that P .. P + count - 1 were free a moment ago on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + count - 1 > 65535:
            continue
        held = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise AssertionError("no free TCP ports")


async def http_get(port: int, path: str, *, method: str = "GET") -> tuple[int, str]:
    """One HTTP request to 127.0.0.1:``port``; the status and the body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5.0)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(port: int) -> Samples:
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    return parse(body)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_port() -> int:
    return free_tcp_port()


@pytest.mark.backends
async def test_metrics_move_as_clients_connect_and_disconnect(
    daemon_factory: DaemonFactory, metrics_port: int
) -> None:
    daemon = await daemon_factory.astart(flags={"--metrics-port": str(metrics_port)})
    before = await scrape(metrics_port)
    assert value(before, "presence_sessions") == 0
    assert value(before, "presence_ready") == 1
    assert value(before, "presence_lease_held") == 1
    assert value(before, "presence_info", instance_id=daemon.instance_id) == 1
    if sys.platform == "linux":  # read from /proc/net/udp
        assert value(before, "presence_udp_receive_drops_total") == 0

    async with (
        await RawPeer.open(daemon.address) as alice,
        await RawPeer.open(daemon.address) as bob,
    ):
        await alice.connect("alice", "a1", ["bob"])
        await bob.connect("bob", "b1", ["alice"])
        for _ in range(3):
            await alice.ping()
        now = await scrape(metrics_port)
        assert value(now, "presence_sessions") == 2
        assert value(now, "presence_connects_total") == 2
        assert value(now, "presence_transitions_total", to="online") == 2
        assert value(now, "presence_datagrams_received_total", type="connect") == 2
        assert value(now, "presence_datagrams_sent_total", type="connect_ok") == 2
        assert value(now, "presence_datagrams_received_total", type="ping") == 3
        assert value(now, "presence_datagrams_sent_total", type="pong") == 3
        # Bob's connect told alice (a NOTIFY) once her address was verified by a ping,
        # or numbered it unsent before: either way it was accounted for.
        told = value(now, "presence_notifications_sent_total") + value(
            now, "presence_notifications_withheld_total", reason="unverified"
        )
        assert told >= 1
        assert value(now, "presence_redis_round_trip_seconds_count") > 0
        assert value(now, "presence_redis_commands_total") > 0

        await bob.disconnect()
        after = await scrape(metrics_port)
        assert value(after, "presence_sessions") == 1
        assert value(after, "presence_sessions_removed_total", reason="disconnect") == 1
        assert value(after, "presence_transitions_total", to="offline") == 1
        assert value(after, "presence_datagrams_sent_total", type="disconnect_ok") == 1

        alice.send(b"\x00garbage")
        await alice.barrier()
        bad = await scrape(metrics_port)
        assert value(bad, "presence_datagrams_received_total", type="other") == 1
        assert sum(v for (n, _), v in bad.items() if n == "presence_datagrams_rejected_total") == 1
    assert await daemon.aterminate() == 0


async def test_health_and_readiness_follow_redis(
    private_redis: RedisServer,
    fault_kit: FaultKit,
    private_daemons: DaemonFactory,
    metrics_port: int,
) -> None:
    """/readyz turns 503 with a reason when Redis is cut off, /healthz stays 200, and
    both come back (one log line down, one up)."""
    proxy = fault_kit.proxy(private_redis.address)
    daemon = await private_daemons.astart(
        flags={"--redis-url": proxy.redis_url(), "--metrics-port": str(metrics_port)}
    )
    assert await http_get(metrics_port, "/readyz") == (200, "ready\n")
    assert await http_get(metrics_port, "/healthz") == (200, "ok\n")

    proxy.cut()

    async def not_ready() -> bool:
        return (await http_get(metrics_port, "/readyz"))[0] == 503

    await wait_for(not_ready, 10.0, 0.1, "readyz answers 503")
    status, body = await http_get(metrics_port, "/readyz")
    assert status == 503 and body.startswith("not ready: ") and body.count("\n") == 1
    assert await http_get(metrics_port, "/healthz") == (200, "ok\n")
    down = await scrape(metrics_port)
    assert value(down, "presence_ready") == 0
    await wait_for(lambda: "Redis down" in daemon.stderr(), 5.0, 0.05, "'Redis down' logged")

    proxy.heal()

    async def ready() -> bool:
        return (await http_get(metrics_port, "/readyz"))[0] == 200

    await wait_for(ready, 10.0, 0.1, "readyz answers 200 again")
    await wait_for(lambda: "Redis up again" in daemon.stderr(), 5.0, 0.05, "'Redis up' logged")
    assert value(await scrape(metrics_port), "presence_ready") == 1
    assert daemon.stderr().count("Redis down") == 1
    assert daemon.stderr().count("Redis up again") == 1
    assert await daemon.aterminate() == 0


async def test_http_endpoint_answers_only_get_on_known_paths(
    daemon_factory: DaemonFactory, metrics_port: int
) -> None:
    await daemon_factory.astart(flags={"--metrics-port": str(metrics_port)})
    assert (await http_get(metrics_port, "/metrics", method="POST"))[0] == 405
    assert (await http_get(metrics_port, "/nothing"))[0] == 404
    # A request head larger than the bound is refused, not buffered.
    reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert (await http_get(metrics_port, "/healthz"))[0] == 200


async def test_connections_that_send_nothing_cannot_starve_a_probe(
    daemon_factory: DaemonFactory, metrics_port: int
) -> None:
    await daemon_factory.astart(flags={"--metrics-port": str(metrics_port)})
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 8):  # every place taken by a half-sent head
            reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            await writer.drain()
            idle.append((reader, writer))
        for _ in range(3):
            assert (await http_get(metrics_port, "/healthz"))[0] == 200
    finally:
        for _, writer in idle:
            writer.close()


def run_daemon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "presence_daemon", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=daemon_env(env),
    )


@contextlib.contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def test_metrics_port_in_use_fails_the_start_in_one_line(redis_url: str) -> None:
    port = free_tcp_port()
    with listening(port):
        result = run_daemon(
            "--processes", "1", "--port", "0", "--redis-url", redis_url, "--metrics-port", str(port)
        )
    assert result.returncode == 1
    assert result.stderr == (
        f"presence-daemon: error: cannot listen on http://127.0.0.1:{port} (--metrics-port): "
        "address already in use\n"
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--metrics-port", "70000"], {}, "--metrics-port: invalid value 70000"),
        (["--metrics-port", "x"], {}, "--metrics-port: invalid value 'x'"),
        ([], {"PRESENCE_METRICS_PORT": "-1"}, "PRESENCE_METRICS_PORT: invalid value -1"),
        (["--processes", "2", "--metrics-port", "65535"], {}, "--metrics-port: invalid value"),
        ([], {"PRESENCE_METRICS_HOST": "localhost"}, "PRESENCE_METRICS_HOST: invalid value"),
    ],
)
def test_bad_metrics_flags_are_one_line_usage_errors(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_daemon(*args, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"presence-daemon: error: {message}")


async def test_each_worker_serves_metrics_on_its_own_port(redis_url: str) -> None:
    """With --processes 2, worker 1 serves on the given port and worker 2 on the next."""
    port = free_tcp_port(2)
    daemon = DaemonProcess(redis_url, "w", flags={"--processes": "2", "--metrics-port": str(port)})
    try:
        await daemon.astart()
        ids = set()
        for k in (0, 1):
            assert await http_get(port + k, "/healthz") == (200, "ok\n")
            samples = await scrape(port + k)
            (instance,) = [
                dict(labels)["instance_id"] for (n, labels) in samples if n == "presence_info"
            ]
            ids.add(instance)
        assert ids == {"w-1", "w-2"}
        assert await daemon.aterminate() == 0
    finally:
        daemon.cleanup()


METRIC_RE: Final = re.compile(r"\bpresence_[a-z_]+\b")


def dashboard_metrics() -> set[str]:
    """Every presence_* name the dashboard's queries use."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in METRIC_RE.findall(expr)}


async def test_dashboard_queries_only_metrics_a_daemon_serves(
    daemon_factory: DaemonFactory, metrics_port: int
) -> None:
    await daemon_factory.astart(flags={"--metrics-port": str(metrics_port)})
    served = {name for name, _ in await scrape(metrics_port)}
    wanted = dashboard_metrics()
    assert wanted - served == set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        assert panel.get("title"), panel


async def test_datagrams_the_kernel_dropped_are_counted(
    daemon_factory: DaemonFactory, metrics_port: int
) -> None:
    """A daemon stopped (SIGSTOP) while a burst arrives: what overflowed its receive
    buffer shows in presence_udp_receive_drops_total (Linux)."""
    if sys.platform != "linux":
        pytest.skip("read from /proc/net/udp")
    daemon = await daemon_factory.astart(flags={"--metrics-port": str(metrics_port)})
    daemon.send_signal(signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(20_000):  # 24 MB: more than the 4 MB buffer asked for
                with contextlib.suppress(BlockingIOError):
                    sender.sendto(b"\x00" * 1200, daemon.address)
    finally:
        daemon.send_signal(signal.SIGCONT)
    drops = value(await scrape(metrics_port), "presence_udp_receive_drops_total")
    assert drops > 0
    assert await daemon.aterminate() == 0


def test_a_workers_metrics_port_in_use_fails_the_start(redis_url: str) -> None:
    """With --processes 2, worker 2's port (the given one + 1) taken: the start fails,
    and the log names the port and why."""
    port = free_tcp_port(2)
    with listening(port + 1):
        result = run_daemon(
            "--processes", "2", "--port", "0", "--redis-url", redis_url, "--metrics-port", str(port)
        )
    assert result.returncode == 1
    assert (
        f"presence-daemon: error: cannot listen on http://127.0.0.1:{port + 1} (--metrics-port): "
        "address already in use\n"
    ) in result.stderr
    assert "Traceback" not in result.stderr


async def test_readyz_says_starting_until_redis_answers(
    private_redis: RedisServer,
    fault_kit: FaultKit,
    private_daemons: DaemonFactory,
    metrics_port: int,
) -> None:
    """The endpoint serves while the daemon still waits for Redis: /healthz 200,
    /readyz 503 "starting"; once Redis answers, 200."""
    proxy = fault_kit.proxy(private_redis.address)
    proxy.partition()
    daemon = private_daemons.create(
        flags={
            "--redis-url": proxy.redis_url(),
            "--metrics-port": str(metrics_port),
            "--redis-timeout": "30",
        }
    )
    daemon.spawn()

    async def answering() -> bool:
        try:
            return (await http_get(metrics_port, "/healthz"))[0] == 200
        except OSError:
            return False

    await wait_for(answering, 10.0, 0.05, "/healthz answers while Redis is out of reach")
    assert await http_get(metrics_port, "/readyz") == (503, "not ready: starting\n")
    assert value(await scrape(metrics_port), "presence_ready") == 0
    assert "listening" not in daemon.stdout()

    proxy.heal()

    async def ready() -> bool:
        return (await http_get(metrics_port, "/readyz"))[0] == 200

    await wait_for(ready, 10.0, 0.05, "ready once Redis answers")
    assert await daemon.aterminate() == 0
