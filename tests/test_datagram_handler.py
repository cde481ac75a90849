"""``Server.datagram_received`` in process: it never raises, and a failure of its own is
counted on every datagram but logged once per reason per HOSTILE_LOG_INTERVAL.

A ``send`` that raises stands in for any bug met while handling a datagram (a socket
can also refuse a destination): the handler must swallow it, count it, and not write
a traceback per datagram (a flood would fill the disk)."""

from __future__ import annotations

import logging
from typing import Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ManualClock
from presence_client.protocol import Ping, Pong, encode
from presence_daemon.config import Config
from presence_daemon.presence import Presence
from presence_daemon.server import HOSTILE_LOG_INTERVAL, Server, Session


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


# ---------------------------------------------------------------------------
# The PING fast path has exactly the effects of the full path (decode, then _on_ping),
# for every datagram: the same replies, counters and session state.

ADDRESS: Final = ("127.0.0.1", 5000)
OTHER_ADDRESS: Final = ("127.0.0.1", 5001)


def _server_with_sessions(
    sessions: list[tuple[bytes, int, bool, bool]],
) -> tuple[Server, list[bytes]]:
    """A server (never started: nothing here needs Redis) holding one session per
    (token, seq, verified, closing), all at ADDRESS; and the list its sends land in."""
    sent: list[bytes] = []
    clock = ManualClock()
    clock.seconds = 1000.0  # the same for every server built here
    server = Server(
        Config(),
        Presence.from_url("redis://127.0.0.1:1"),
        send=lambda data, addr: sent.append(data + repr(addr).encode()),
        clock=clock,
    )
    for i, (token, seq, verified, closing) in enumerate(sessions):
        session = Session(f"c{i}", f"u{i}", token, ADDRESS, clock(), seq, verified, closing)
        server._hold(session)
        if closing:
            del server.recency[token]  # as expired() leaves it
    clock.advance(1.0)
    return server, sent


def _state(server: Server) -> object:
    return (
        dict(server.counters),
        [(s.token, s.seq, s.verified, s.closing, s.last_seen) for s in server.by_token.values()],
        list(server.recency),
    )


_session_specs = st.lists(
    st.tuples(
        st.binary(min_size=16, max_size=16),
        st.one_of(st.integers(0, 3), st.integers(0, 2**33)),
        st.booleans(),
        st.booleans(),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda spec: spec[0],
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    _session_specs,
    st.lists(
        st.tuples(
            st.integers(0, 5),  # which session's token (past the end: an unknown one)
            st.booleans(),  # from the session's own address?
            st.one_of(st.none(), st.tuples(st.integers(0, 40), st.binary(max_size=2))),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_the_ping_fast_path_has_the_effects_of_the_full_path(
    specs: list[tuple[bytes, int, bool, bool]],
    pings: list[tuple[int, bool, tuple[int, bytes] | None]],
) -> None:
    fast, fast_sent = _server_with_sessions(specs)
    full, full_sent = _server_with_sessions(specs)
    for which, own_address, mutation in pings:
        token = specs[which][0] if which < len(specs) else bytes(range(16))
        data = encode(Ping(token))
        if mutation is not None:
            at, junk = mutation
            data = data[:at] + junk + data[at + len(junk) :]
        addr = ADDRESS if own_address else OTHER_ADDRESS
        fast.datagram_received(data, addr)
        full._decode_and_dispatch(data, addr)  # what datagram_received did before
        assert fast_sent == full_sent
        assert _state(fast) == _state(full)


def test_counters_show_fast_pings_and_still_take_updates() -> None:
    token = bytes(range(16))
    server, sent = _server_with_sessions([(token, 7, False, False)])
    for _ in range(3):
        server.datagram_received(encode(Ping(token)), ADDRESS)
    assert sent == [encode(Pong(7)) + repr(ADDRESS).encode()] * 3
    assert server.counters["pings"] == 3
    assert server.counters["datagrams_in"] == 3
    assert server.counters["datagrams_out"] == 3
    server.counters["datagrams_out"] += 1  # as the rest of the daemon counts
    server.datagram_received(encode(Ping(token)), ADDRESS)
    server.datagram_received(b"\xc1" * 40, ADDRESS)  # the full path: MALFORMED
    assert server.counters["pings"] == 4
    assert server.counters["datagrams_in"] == 5
    assert server.counters["datagrams_out"] == 6
    assert server.counters["rejected_malformed"] == 1
