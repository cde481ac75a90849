"""``Server.datagram_received`` in process: it never raises, and a failure of its own is
counted on every datagram but logged once per reason per HOSTILE_LOG_INTERVAL.

A ``send`` that raises stands in for any bug met while handling a datagram (a socket
can also refuse a destination): the handler must swallow it, count it, and not write
a traceback per datagram (a flood would fill the disk)."""

from __future__ import annotations

import logging

import pytest

from helpers import ManualClock
from presence_client.protocol import Ping, Pong, encode
from presence_daemon.config import Config
from presence_daemon.presence import Presence
from presence_daemon.server import HOSTILE_LOG_INTERVAL, Server


def failing_send(data: bytes, addr: tuple[str, int]) -> None:
    raise RuntimeError("send failed")


async def test_failures_are_counted_per_datagram_and_logged_per_interval(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    presence = Presence.from_url(redis_url)  # never started: nothing here needs Redis
    server = Server(Config(), presence, send=failing_send, clock=clock)
    garbage = b"\xc1" * 100  # answered MALFORMED: the send raises
    try:
        with caplog.at_level(logging.ERROR, logger="presence_daemon.server"):
            for _ in range(100):
                server.datagram_received(garbage, ("127.0.0.1", 5000))  # must not raise
            assert server.counters["internal_errors"] == 100
            assert len(caplog.records) == 1
            assert caplog.records[0].exc_info is not None  # the one line has the traceback

            clock.advance(HOSTILE_LOG_INTERVAL / 2)
            server.datagram_received(garbage, ("127.0.0.1", 5000))
            assert len(caplog.records) == 1

            clock.advance(HOSTILE_LOG_INTERVAL)
            server.datagram_received(garbage, ("127.0.0.1", 5000))
            assert len(caplog.records) == 2
            assert "internal_errors=102" in caplog.records[1].getMessage()
            assert server.counters["internal_errors"] == 102
            assert server.counters["rejected_malformed"] == 102
    finally:
        await presence.close()


async def test_daemon_messages_are_dropped_without_a_reply(redis_url: str) -> None:
    sent: list[bytes] = []
    presence = Presence.from_url(redis_url)
    server = Server(Config(), presence, send=lambda data, addr: sent.append(data))
    try:
        for datagram in (encode(Pong(1)), b"\x83\xa1v\x01\xa1t\x02\xa1r\x05"):  # CONNECT_OK, bad
            server.datagram_received(datagram, ("127.0.0.1", 5000))
        assert sent == []
        assert server.counters["dropped_daemon_message"] == 2
        server.datagram_received(encode(Ping(bytes(16))), ("127.0.0.1", 5000))
        assert len(sent) == 1  # a client message is still answered (UNKNOWN_SESSION)
    finally:
        await presence.close()
