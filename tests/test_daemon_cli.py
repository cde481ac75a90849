"""The ``presence-daemon`` command line, run as a real process (``python -m``)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from daemons import DaemonProcess, RawPeer, daemon_env
from presence_daemon.config import Config

RUN_TIMEOUT = 20.0
"""Upper bound for a command that is expected to exit by itself."""

UNREACHABLE = ("--host", "127.0.0.1", "--port", "0", "--redis-url", "redis://127.0.0.1:1/0")
"""Flags that make a daemon given a valid configuration exit at once (no Redis)."""

EMBEDDED_RE = re.compile(r"started embedded redis-server at redis://127\.0\.0\.1:(\d+)/0")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "presence_daemon", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env({"COLUMNS": "200", **(env or {})}),
        timeout=RUN_TIMEOUT,
    )


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def test_help_names_every_flag_and_its_variable() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for field in fields(Config):
        flag = "--" + field.name.replace("_", "-")
        variable = "PRESENCE_" + field.name.upper()
        assert re.search(rf"{flag}\b", result.stdout), flag
        assert variable in result.stdout, variable


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "abc"], {}, ["--port", "abc"]),
        (["--port", "70000"], {}, ["--port", "70000"]),
        (["--timeout", "1"], {}, ["--timeout", "1"]),  # not above the default ping interval
        (["--log-level", "loud"], {}, ["--log-level", "loud"]),
        (["--instance-id", "a b"], {}, ["--instance-id", "a b"]),
        (["--host", "nothost"], {}, ["--host", "nothost"]),
        (["--bogus"], {}, ["--bogus"]),
        ([], {"PRESENCE_PORT": "x"}, ["PRESENCE_PORT", "'x'"]),
        ([], {"PRESENCE_TIMEOUT": "0.5"}, ["PRESENCE_TIMEOUT", "0.5"]),
        # Durations must be finite and sane (the daemon would otherwise start; an
        # unreachable Redis and port 0 keep such a run short and harmless).
        (["--timeout", "inf", *UNREACHABLE], {}, ["--timeout", "inf"]),
        (["--ping-interval", "nan", *UNREACHABLE], {}, ["--ping-interval", "nan"]),
        (["--ping-interval", "0.001", *UNREACHABLE], {}, ["--ping-interval", "0.001"]),
    ],
    ids=[
        "port-abc",
        "port-70000",
        "timeout-below-ping",
        "log-level",
        "instance-id",
        "host",
        "unknown-flag",
        "env-port",
        "env-timeout",
        "timeout-inf",
        "ping-interval-nan",
        "ping-interval-too-small",
    ],
)
def test_bad_value_exits_with_one_line_naming_it(
    args: list[str], env: dict[str, str], named: list[str]
) -> None:
    result = run(*args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert result.stdout == ""


def test_unreachable_redis_exits_with_one_line() -> None:
    result = run("--host", "127.0.0.1", "--port", "0", "--redis-url", "redis://127.0.0.1:1/0")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "127.0.0.1:1" in lines[0]
    assert "listening" not in result.stdout


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'.
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(text.split(" ", 1)[0]))
    return found


async def test_embedded_redis_serves_and_sigint_stops_everything() -> None:
    daemon = DaemonProcess(
        None, "embedded", flags={"--redis-url": None}, extra_args=["--embedded-redis"]
    )
    try:
        await daemon.astart()
        match = EMBEDDED_RE.search(daemon.stderr())
        assert match, daemon.stderr()
        redis_port = int(match[1])
        assert port_open(redis_port)
        children = _children(daemon.pid) if Path("/proc/self/stat").exists() else []
        if children:  # Linux: the redis-server is the daemon's only child
            assert len(children) == 1, children

        async with await RawPeer.open(daemon.address) as peer:
            reply = await peer.connect("alice", "alice-1")
            pong, _ = await peer.ping()
            assert pong.seq == reply.seq == 0

        daemon.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(daemon.wait) == 0, daemon.stderr()
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
        # The daemon stopped its redis-server before exiting: nothing is left listening.
        assert not port_open(redis_port)
        for pid in children:
            assert not Path(f"/proc/{pid}").exists(), f"child {pid} outlived the daemon"
    finally:
        daemon.cleanup()


def test_sigterm_without_clients_exits_zero(redis_url: str) -> None:
    with DaemonProcess(redis_url, "idle") as daemon:
        assert daemon.terminate() == 0, daemon.stderr()
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
