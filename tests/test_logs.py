"""The daemon's log, from real daemon processes: JSON lines that parse, lifecycle events
at info, connects/disconnects/transitions at debug without any token, and a flood of
bad datagrams summarised in a few lines."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authkit import auth_flags, issue, write_secret
from daemons import (  # noqa: F401 - the fixture
    DaemonFactory,
    RawPeer,
    daemon_env,
    daemon_factory_fixture,
)
from faults import (  # noqa: F401 - fixtures
    RedisServer,
    fault_kit_fixture,
    private_daemons_fixture,
    private_redis_fixture,
)
from helpers import wait_for
from presence_client.protocol import Ping
from presence_daemon.logs import BAD_DATAGRAM_LOG_INTERVAL, JsonFormatter


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object (fails the test on any other line)."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        for key in ("ts", "level", "logger", "msg"):
            assert key in entry, line
        entries.append(entry)
    return entries


def events(text: str) -> list[dict[str, Any]]:
    return [e for e in json_lines(text) if "event" in e]


async def test_json_logs_carry_lifecycle_and_debug_events_but_no_token(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    flags = {
        **auth_flags(write_secret(tmp_path)),
        "--log-format": "json",
        "--log-level": "debug",
    }
    daemon = await daemon_factory.astart("logd", flags=flags)
    login_tokens = {user: issue(user) for user in ("alice", "bob")}
    sessions = []
    async with (
        await RawPeer.open(daemon.address) as alice,
        await RawPeer.open(daemon.address) as bob,
    ):
        sessions.append(
            (await alice.connect("alice", "a1", ["bob"], auth=login_tokens["alice"])).session
        )
        sessions.append(
            (await bob.connect("bob", "b1", ["alice"], auth=login_tokens["bob"])).session
        )
        await alice.ping()
        await bob.disconnect()
    assert await daemon.aterminate() == 0

    log = daemon.stderr()
    entries = json_lines(log)
    assert all(e["instance"] == "logd" for e in entries)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if "event" in entry:
            by_event.setdefault(entry["event"], []).append(entry)
    (started,) = by_event["started"]
    assert started["level"] == "info"
    assert started["address"] == f"udp://{daemon.address[0]}:{daemon.address[1]}"
    assert started["redis"] == daemon_factory.redis_url
    assert [e["user"] for e in by_event["connected"]] == ["alice", "bob"]
    assert {e["client_id"] for e in by_event["connected"]} == {"a1", "b1"}
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", e["address"]) for e in by_event["connected"])
    assert [(e["user"], e["reason"]) for e in by_event["disconnected"][:1]] == [
        ("bob", "disconnect")
    ]
    transitions = [(e["user"], e["state"]) for e in by_event["transition"]]
    assert transitions[:3] == [("alice", "online"), ("bob", "online"), ("bob", "offline")]
    assert len(by_event["stopping"]) == 1 and len(by_event["stopped"]) == 1

    # Never a token: neither the session tokens the daemon made, nor the login tokens.
    for session in sessions:
        assert session.hex() not in log
        assert session.hex().upper() not in log
    for token in login_tokens.values():
        assert token not in log
        for part in token.split("."):  # not even the signature or the claims alone
            assert part not in log


def test_text_logs_by_default(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    daemon.terminate()
    lines = daemon.stderr().splitlines()
    assert lines and not any(line.startswith("{") for line in lines)
    assert any(
        f"serving on udp://{daemon.address[0]}:{daemon.address[1]} as instance d1 with redis "
        in line
        for line in lines
    )


def test_bad_log_format_is_a_one_line_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "presence_daemon", "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=30,
        env=daemon_env({}),
    )
    assert result.returncode == 2
    assert result.stderr == (
        "presence-daemon: error: --log-format: invalid value 'xml' (expected text/json)\n"
    )


FLOOD = 3000


@pytest.mark.timeout(60)
async def test_a_flood_of_bad_datagrams_is_logged_as_a_few_summary_lines(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory.astart(flags={"--log-format": "json"})
    before = len(daemon.stderr().splitlines())
    async with await RawPeer.open(daemon.address) as peer:
        for start in range(0, FLOOD, 300):
            for i in range(start, min(start + 300, FLOOD)):
                if i % 3 == 0:
                    peer.send(b"\xc1not msgpack")  # malformed
                elif i % 3 == 1:
                    peer.send(Ping(bytes(16)))  # no such session
                else:
                    peer.send(b"\x81\xa1t\x63")  # no protocol version
            await peer.barrier()  # handled (and answered) before the next batch

        def refused() -> int:
            return sum(e.get("refused", 0) for e in events(daemon.stderr()))

        await wait_for(
            lambda: refused() == FLOOD,
            3 * BAD_DATAGRAM_LOG_INTERVAL,
            0.1,
            "the summaries add up to the flood",
        )
    summaries = [e for e in events(daemon.stderr()) if e["event"] == "bad_datagrams"]
    assert 1 <= len(summaries) <= 3
    reasons: dict[str, int] = {}
    for summary in summaries:
        for reason, count in summary["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    assert reasons == {"malformed": 1000, "unknown_session": 1000, "unsupported_version": 1000}
    new_lines = daemon.stderr().splitlines()[before:]
    assert len(new_lines) <= 5, new_lines
    assert await daemon.aterminate() == 0


async def test_a_dead_daemons_clients_reaped_are_logged(daemon_factory: DaemonFactory) -> None:
    lease = {"--lease-ttl": "1.0", "--log-format": "json"}
    doomed = await daemon_factory.astart("doomed", flags=lease)
    survivor = await daemon_factory.astart("survivor", flags=lease)
    async with await RawPeer.open(doomed.address) as peer:
        await peer.connect("carol", "c1")
    doomed.kill()

    def reaped() -> list[dict[str, Any]]:
        return [e for e in json_lines(survivor.stderr()) if "reaped" in e["msg"]]

    await wait_for(lambda: bool(reaped()), 10.0, 0.05, "the survivor logs the reaping")
    (line,) = reaped()
    assert "doomed" in line["msg"] and "1 clients" in line["msg"]


async def test_lease_lost_and_taken_again_are_logged(
    private_redis: RedisServer, private_daemons: DaemonFactory
) -> None:
    """Redis restarts empty: the daemon logs the lost lease, taking it again (with the
    clients it puts back), each once."""
    daemon = await private_daemons.astart(
        "leased", flags={"--log-format": "json", "--timeout": "30"}
    )
    async with await RawPeer.open(daemon.address) as peer:
        await peer.connect("dave", "d1")
        private_redis.restart_empty()

        def regained() -> list[dict[str, Any]]:
            return [e for e in events(daemon.stderr()) if e["event"] == "lease_regained"]

        await wait_for(lambda: bool(regained()), 10.0, 0.05, "the lease is taken again")
    (line,) = regained()
    assert line["level"] == "info" and line["clients"] == 1 and line["state_lost"] is True
    lost = [e for e in json_lines(daemon.stderr()) if "was lost" in e["msg"]]
    assert len(lost) == 1 and lost[0]["level"] == "error"
    assert await daemon.aterminate() == 0


def test_json_formatter_keeps_extra_fields_and_tracebacks_on_one_line() -> None:
    formatter = JsonFormatter("inst-1")
    logger = logging.getLogger("presence_daemon.test")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord(
            "presence_daemon.test",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("here",),
            sys.exc_info(),
            extra={"user": "alice", "where": ("127.0.0.1", 5)},
        )
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["msg"] == "failed here"
    assert entry["logger"] == "presence_daemon.test" and entry["instance"] == "inst-1"
    assert entry["user"] == "alice" and entry["where"] == ["127.0.0.1", 5]
    assert "ValueError: boom" in entry["exc"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
