"""The fault tools of ``faults.py`` themselves: proxy, relay and private Redis.

Where a test proves that something does *not* happen (a byte not forwarded during a
partition), it observes for a bounded window and asserts on what was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from faults import FaultKit, RedisServer, UdpRelay, fault_kit_fixture, private_redis_fixture  # noqa: F401
from helpers import wait_for

Address = tuple[str, int]

QUIET_WINDOW = 0.3
"""Seconds we watch for bytes that must not arrive (a partition holds them)."""


# ---------------------------------------------------------------------------
# Little servers the tools sit in front of.


class EchoServer:
    """A TCP echo server in the test's loop that records its connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while data := await reader.read(4096):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @property
    def address(self) -> Address:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    echo.server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    try:
        yield echo
    finally:
        echo.server.close()
        for writer in echo.writers:
            writer.close()  # each handler then reads EOF and ends
        if echo.handlers:
            await asyncio.wait(echo.handlers, timeout=2.0)


class _Udp(asyncio.DatagramProtocol):
    """A UDP endpoint that records (data, source, arrival time); echoes if asked."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[bytes, Address, float]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        source = (str(addr[0]), int(addr[1]))
        self.received.append((data, source, time.monotonic()))
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def payloads(self) -> list[bytes]:
        return [data for data, _, _ in self.received]


@contextlib.asynccontextmanager
async def udp_endpoint(*, echo: bool = False) -> AsyncIterator[_Udp]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Udp(echo), local_addr=("127.0.0.1", 0)
    )
    try:
        yield protocol
    finally:
        transport.close()


async def read_exactly(reader: asyncio.StreamReader, size: int, timeout: float = 2.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), timeout)


async def nothing_arrives(reader: asyncio.StreamReader, window: float = QUIET_WINDOW) -> bool:
    """Watch ``reader`` for ``window`` seconds; True if no byte (and no EOF) arrived."""
    try:
        await asyncio.wait_for(reader.read(1), window)
    except TimeoutError:
        return True
    return False


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True once the peer closes or resets the connection (bounded wait)."""
    try:
        data = await asyncio.wait_for(reader.read(4096), timeout)
    except ConnectionError:
        return True
    return data == b""


async def refused(address: Address) -> bool:
    """True if a connection to ``address`` is reset, at connect or right after."""
    try:
        reader, writer = await asyncio.open_connection(*address)
    except ConnectionError:
        return True
    try:
        return await closed_by_peer(reader)
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# TcpProxy.


async def test_proxy_forwards_redis_traffic_and_counts_bytes(
    private_redis: RedisServer, fault_kit: FaultKit
) -> None:
    proxy = fault_kit.proxy(private_redis.address)
    client = redis.asyncio.Redis.from_url(proxy.redis_url(), decode_responses=True)
    try:
        await client.set("k", "v")
        assert await client.get("k") == "v"
    finally:
        await client.aclose()
    assert proxy.bytes_up > 0 and proxy.bytes_down > 0
    assert proxy.accepted >= 1 and proxy.refused == 0


async def test_partition_holds_bytes_and_new_connections_then_heal_delivers(
    fault_kit: FaultKit,
) -> None:
    async with echo_server() as echo:
        proxy = fault_kit.proxy(echo.address)
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"one")
        assert await read_exactly(reader, 3) == b"one"
        assert echo.connections == 1

        proxy.partition()
        before = proxy.bytes_forwarded
        writer.write(b"two")
        # A new connection is accepted by the proxy but never reaches the target.
        late_reader, late_writer = await asyncio.open_connection(*proxy.address)
        late_writer.write(b"late")
        # Observed for a bounded window: nothing crosses the partition either way.
        assert await nothing_arrives(reader)
        assert proxy.bytes_forwarded == before
        assert echo.received == b"one" and echo.connections == 1
        assert proxy.live_connections == 2

        proxy.heal()
        assert await read_exactly(reader, 3) == b"two"  # held, then delivered in order
        assert await read_exactly(late_reader, 4) == b"late"
        assert echo.connections == 2
        writer.close()
        late_writer.close()


async def test_cut_resets_connections_and_refuses_new_ones_until_healed(
    fault_kit: FaultKit,
) -> None:
    async with echo_server() as echo:
        proxy = fault_kit.proxy(echo.address)
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"ping")
        assert await read_exactly(reader, 4) == b"ping"

        proxy.cut()
        assert await closed_by_peer(reader)
        assert proxy.live_connections == 0
        assert await refused(proxy.address)
        assert proxy.refused == 1

        proxy.heal()
        fresh_reader, fresh_writer = await asyncio.open_connection(*proxy.address)
        fresh_writer.write(b"back")
        assert await read_exactly(fresh_reader, 4) == b"back"
        writer.close()
        fresh_writer.close()


async def test_partition_makes_redis_calls_time_out_and_heal_restores_them(
    private_redis: RedisServer, fault_kit: FaultKit
) -> None:
    proxy = fault_kit.proxy(private_redis.address)
    client = redis.asyncio.Redis.from_url(proxy.redis_url(), socket_timeout=0.3)
    try:
        assert await client.ping()
        proxy.partition()
        with pytest.raises(RedisTimeoutError):
            await client.ping()
        proxy.heal()
        assert await client.ping()
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------
# UdpRelay.


async def test_relay_forwards_both_ways_from_one_socket_per_client(fault_kit: FaultKit) -> None:
    async with udp_endpoint(echo=True) as target, udp_endpoint() as a, udp_endpoint() as b:
        relay = fault_kit.relay(target.address)
        assert a.transport is not None and b.transport is not None
        a.transport.sendto(b"from-a", relay.address)
        b.transport.sendto(b"from-b", relay.address)
        await wait_for(lambda: a.payloads() == [b"from-a"] and b.payloads() == [b"from-b"])
        # Replies come back from the relay's address; the target saw one address per client.
        assert {source for _, source, _ in a.received + b.received} == {relay.address}
        sources = {data: source for data, source, _ in target.received}
        assert sources[b"from-a"] == relay.upstream_address(a.address)
        assert sources[b"from-b"] == relay.upstream_address(b.address)
        assert sources[b"from-a"] != sources[b"from-b"]
        assert relay.sent == {"up": 2, "down": 2} and relay.dropped == 0


async def relay_run(seed: int, count: int = 100) -> tuple[set[int], UdpRelay]:
    """Send ``count`` datagrams through a relay dropping half; which arrived?"""
    async with udp_endpoint() as sink, udp_endpoint() as client:
        with UdpRelay(sink.address, seed=seed) as relay:
            relay.set_faults(drop=0.5)
            assert client.transport is not None
            for start in range(0, count, 20):  # in batches: never overflow a socket buffer
                for i in range(start, min(start + 20, count)):
                    client.transport.sendto(str(i).encode(), relay.address)
                await wait_for(lambda: relay.received["up"] == min(start + 20, count))  # noqa: B023
            await wait_for(lambda: len(sink.received) == count - relay.dropped)
            return {int(data) for data in sink.payloads()}, relay


async def test_relay_drops_deterministically_under_a_seed() -> None:
    first, relay = await relay_run(seed=7)
    again, _ = await relay_run(seed=7)
    other, _ = await relay_run(seed=8)
    assert first == again
    assert first != other
    assert 25 <= 100 - len(first) <= 75
    assert {i for _, i in relay.dropped_log} == set(range(100)) - first


async def test_relay_duplicates_delays_and_stops_faulting_on_clear(fault_kit: FaultKit) -> None:
    async with udp_endpoint(echo=True) as target, udp_endpoint() as client:
        relay = fault_kit.relay(target.address, seed=1)
        assert client.transport is not None
        relay.set_faults(duplicate=1.0, delay=(0.05, 0.1), directions=["up"])
        sent_at = time.monotonic()
        client.transport.sendto(b"x", relay.address)
        await wait_for(lambda: len(client.received) == 2)
        assert relay.duplicated == 1 and relay.delayed == 2
        assert min(at for _, _, at in target.received) - sent_at >= 0.05
        assert relay.sent == {"up": 2, "down": 2}  # the echoes were not faulted

        relay.set_faults(drop_if=lambda data, direction: direction == "down")
        client.transport.sendto(b"y", relay.address)
        await wait_for(lambda: relay.dropped == 1)
        assert relay.dropped_log == [("down", 2)]

        relay.clear()
        client.transport.sendto(b"z", relay.address)
        await wait_for(lambda: client.payloads()[-1:] == [b"z"])
        assert client.payloads() == [b"x", b"x", b"z"]


# ---------------------------------------------------------------------------
# RedisServer.


async def test_pause_holds_answers_and_resume_delivers_them(private_redis: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(private_redis.url)
    impatient = redis.asyncio.Redis.from_url(private_redis.url, socket_timeout=0.3)
    try:
        await client.set("k", "1")
        assert await impatient.ping()
        private_redis.pause()
        with pytest.raises(RedisTimeoutError):
            await impatient.ping()
        pending = asyncio.ensure_future(client.incr("k"))
        # Observed for a bounded window: a paused server answers nothing.
        await asyncio.sleep(QUIET_WINDOW)
        assert not pending.done()
        private_redis.resume()
        assert await asyncio.wait_for(pending, 2.0) == 2
    finally:
        await client.aclose()
        await impatient.aclose()


async def test_restart_empty_keeps_the_port_and_loses_the_data(
    private_redis: RedisServer,
) -> None:
    client = redis.asyncio.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        await client.set("k", "v")
        port, pid = private_redis.port, private_redis.pid
        await asyncio.to_thread(private_redis.restart_empty)
        assert private_redis.port == port and private_redis.pid != pid
        assert private_redis.restarts == 1

        async def answers() -> bool:
            with contextlib.suppress(RedisConnectionError):
                return bool(await client.ping())
            return False

        await wait_for(answers, 5.0, what="the same client reaches the new server")
        assert await client.get("k") is None
        assert await client.dbsize() == 0

        private_redis.kill()
        assert not private_redis.running
        with pytest.raises(RedisConnectionError):
            await client.ping()
    finally:
        await client.aclose()
