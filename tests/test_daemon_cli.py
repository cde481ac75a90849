"""The ``presence-daemon`` command line, run as a real process (``python -m``), and the
Config it builds."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from daemons import REDIS_PASSWORD as PASSWORD
from daemons import DaemonProcess, RawPeer, daemon_env, password_redis_fixture, port_open  # noqa: F401
from presence_client.protocol import is_valid_name
from presence_daemon.config import (
    Config,
    ConfigError,
    config_args,
    config_from_args,
    safe_url,
)

RUN_TIMEOUT = 20.0
"""Upper bound for a command that is expected to exit by itself."""

UNREACHABLE = ("--host", "127.0.0.1", "--port", "0", "--redis-url", "redis://127.0.0.1:1/0")
"""Flags that make a daemon given a valid configuration exit at once (no Redis)."""

EMBEDDED_RE = re.compile(r"started embedded redis-server at redis://127\.0\.0\.1:(\d+)/0")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "presence_daemon", "--processes", "1", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env({"COLUMNS": "200", **(env or {})}),
        timeout=RUN_TIMEOUT,
    )


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
        # The Redis call timeout: seconds like the other durations.
        (["--redis-timeout", "abc"], {}, ["--redis-timeout", "'abc'"]),
        (["--redis-timeout", "0", *UNREACHABLE], {}, ["--redis-timeout", "0.0"]),
        (["--redis-timeout", "0.001", *UNREACHABLE], {}, ["--redis-timeout", "0.001"]),
        (["--redis-timeout", "nan", *UNREACHABLE], {}, ["--redis-timeout", "nan"]),
        (["--redis-timeout", "inf", *UNREACHABLE], {}, ["--redis-timeout", "inf"]),
        (["--redis-timeout", "86401", *UNREACHABLE], {}, ["--redis-timeout", "86401"]),
        ([], {"PRESENCE_REDIS_TIMEOUT": "x"}, ["PRESENCE_REDIS_TIMEOUT", "'x'"]),
        ([*UNREACHABLE], {"PRESENCE_REDIS_TIMEOUT": "0"}, ["PRESENCE_REDIS_TIMEOUT", "0.0"]),
        # The drain grace: 0 to 600 seconds.
        (["--drain-grace", "soon"], {}, ["--drain-grace", "'soon'"]),
        (["--drain-grace", "-1", *UNREACHABLE], {}, ["--drain-grace", "-1"]),
        (["--drain-grace", "600.5", *UNREACHABLE], {}, ["--drain-grace", "600.5"]),
        (["--drain-grace", "nan", *UNREACHABLE], {}, ["--drain-grace", "nan"]),
        (["--drain-grace", "inf", *UNREACHABLE], {}, ["--drain-grace", "inf"]),
        ([], {"PRESENCE_DRAIN_GRACE": ""}, ["PRESENCE_DRAIN_GRACE", "''"]),
        ([*UNREACHABLE], {"PRESENCE_DRAIN_GRACE": "700"}, ["PRESENCE_DRAIN_GRACE", "700"]),
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
        "redis-timeout-abc",
        "redis-timeout-zero",
        "redis-timeout-too-small",
        "redis-timeout-nan",
        "redis-timeout-inf",
        "redis-timeout-too-large",
        "env-redis-timeout-x",
        "env-redis-timeout-zero",
        "drain-grace-soon",
        "drain-grace-negative",
        "drain-grace-too-large",
        "drain-grace-nan",
        "drain-grace-inf",
        "env-drain-grace-empty",
        "env-drain-grace-700",
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


@pytest.mark.parametrize("url", ["redis://:s3cr#t@127.0.0.1:1/0", "redis://:s3cr/t@127.0.0.1:1/0"])
def test_a_url_redis_cannot_parse_is_one_line_without_the_password(url: str) -> None:
    # redis-py's own message quotes what it took for the port: part of the password.
    result = run("--redis-url", url)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--redis-url" in lines[0] and "percent-encoded" in lines[0], lines[0]
    assert "s3cr" not in result.stderr


@pytest.mark.parametrize(
    "extra",
    [
        [],
        # The edges of the new settings' ranges are accepted (the run gets as far as Redis).
        ["--drain-grace", "0", "--redis-timeout", "0.01"],
        ["--drain-grace", "600", "--redis-timeout", "86400"],
    ],
    ids=["defaults", "low-edges", "high-edges"],
)
def test_unreachable_redis_exits_with_one_line(extra: list[str]) -> None:
    result = run(
        "--host", "127.0.0.1", "--port", "0", "--redis-url", "redis://127.0.0.1:1/0", *extra
    )
    assert result.returncode == 1, result.stderr
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


def test_a_second_daemon_with_a_live_instance_id_exits_at_once(redis_url: str) -> None:
    with DaemonProcess(redis_url, "twin") as first:
        started = time.monotonic()
        result = run(
            "--host", "127.0.0.1", "--port", "0", "--redis-url", redis_url, "--instance-id", "twin"
        )
        elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "twin" in lines[0] and "in use" in lines[0], lines[0]
        assert "listening" not in result.stdout
        # Told quickly (the holder's renewals prove it alive), not after the lease TTL.
        assert elapsed < Config().lease_ttl, elapsed
        assert first.running
        assert first.terminate() == 0, first.stderr()


# ---------------------------------------------------------------------------
# The Config the command line builds (in process).


def test_new_settings_defaults() -> None:
    config = Config()
    assert config.lease_ttl == 10.0
    assert config.redis_timeout == 2.0
    assert config.drain_grace == 3.0


def test_new_settings_from_flags_and_variables() -> None:
    config = config_from_args(["--redis-timeout", "0.5", "--drain-grace", "0"], environ={})
    assert (config.redis_timeout, config.drain_grace) == (0.5, 0.0)
    environ = {"PRESENCE_REDIS_TIMEOUT": "3", "PRESENCE_DRAIN_GRACE": "600"}
    config = config_from_args([], environ=environ)
    assert (config.redis_timeout, config.drain_grace) == (3.0, 600.0)
    # A flag wins over its variable.
    config = config_from_args(["--drain-grace", "1.5"], environ=environ)
    assert (config.redis_timeout, config.drain_grace) == (3.0, 1.5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redis_timeout", 0.0),
        ("redis_timeout", -1.0),
        ("redis_timeout", float("nan")),
        ("redis_timeout", 86_400.5),
        ("drain_grace", -0.1),
        ("drain_grace", 600.1),
        ("drain_grace", float("inf")),
        ("drain_grace", float("nan")),
    ],
)
def test_new_settings_out_of_range_name_the_flag(field: str, value: float) -> None:
    flag = "--" + field.replace("_", "-")
    settings: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=f"^{flag}: invalid value"):
        Config(**settings)


def test_pick_instance_id() -> None:
    assert Config(instance_id="fixed-1").pick_instance_id() == "fixed-1"
    # Unset: host-random, a fresh one each time (two containers on one host both run
    # the daemon as PID 1, so the PID would not tell them apart).
    picked = {Config().pick_instance_id() for _ in range(20)}
    assert len(picked) == 20
    for instance_id in picked:
        assert is_valid_name(instance_id), instance_id
        host, suffix = instance_id.rsplit("-", 1)
        assert host and re.fullmatch("[0-9a-f]{8}", suffix), instance_id
    assert not hasattr(Config, "resolved_instance_id")


# ---------------------------------------------------------------------------
# --processes: how many daemon processes share the port.


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--processes", "0"], {}, ["--processes", "0", "1-1024"]),
        (["--processes", "-2"], {}, ["--processes", "-2"]),
        (["--processes", "1025"], {}, ["--processes", "1025"]),
        (["--processes", "1.5"], {}, ["--processes", "'1.5'"]),
        (["--processes", "two"], {}, ["--processes", "'two'"]),
        ([], {"PRESENCE_PROCESSES": "0"}, ["PRESENCE_PROCESSES", "0"]),
        ([], {"PRESENCE_PROCESSES": "2.0"}, ["PRESENCE_PROCESSES", "'2.0'"]),
        (["--processes", "2", "--instance-id", "x" * 53], {}, ["--instance-id", "52"]),
    ],
    ids=["zero", "negative", "too-many", "fraction", "word", "env-zero", "env-float", "long-id"],
)
def test_bad_processes_exit_with_one_line_naming_it(
    args: list[str], env: dict[str, str], named: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "presence_daemon", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env(env),
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])


def test_processes_default_to_the_cpus_available_and_come_from_flag_or_variable() -> None:
    assert Config().processes == len(os.sched_getaffinity(0))
    assert config_from_args(["--processes", "3"], environ={}).processes == 3
    assert config_from_args([], environ={"PRESENCE_PROCESSES": "4"}).processes == 4
    assert config_from_args(["--processes", "1"], {"PRESENCE_PROCESSES": "4"}).processes == 1
    assert Config(processes=2, instance_id="x" * 52).processes == 2  # room for "-<k>.<n>"


def test_config_args_give_a_worker_the_same_settings() -> None:
    config = Config(
        processes=1,
        port=0,
        reuse_port=True,
        ping_interval=0.2,
        timeout=0.6,
        instance_id="w-1.2",
        friend_lists="app",
        connect_rate=0.0,
        embedded_redis=True,
    )
    assert config_from_args(config_args(config), environ={}) == config
    assert config_from_args(config_args(Config(processes=1)), environ={}) == Config(processes=1)


# ---------------------------------------------------------------------------
# Rough edges of issue 13: the port, the Redis URL, credentials, help and --version.


def _held_udp_port() -> socket.socket:
    """A UDP socket bound to a free loopback port (without SO_REUSEPORT), to be in use."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_port_in_use_is_one_line_with_the_reason_before_any_redis_starts() -> None:
    with _held_udp_port() as held:
        port = held.getsockname()[1]
        result = run("--host", "127.0.0.1", "--port", str(port), "--embedded-redis")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    # One line: the port is bound first, so no embedded redis-server was started
    # (its "started embedded redis-server" line would come before the error).
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0], lines[0]
    assert "address already in use" in lines[0], lines[0]
    assert "listening" not in result.stdout


def test_port_in_use_under_the_supervisor_says_the_same() -> None:
    with _held_udp_port() as held:
        port = held.getsockname()[1]
        result = run("--host", "127.0.0.1", "--port", str(port), "--processes", "2")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"cannot listen on udp://127.0.0.1:{port}: address already in use" in last, last
    assert "listening" not in result.stdout


def test_an_address_not_ours_is_told_apart_from_a_port_in_use() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to this machine.
    result = run("--host", "192.0.2.1", "--port", "0", "--insecure-no-auth", "--embedded-redis")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "192.0.2.1:0" in lines[0], lines[0]
    assert "cannot assign requested address" in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (
            ["--embedded-redis", "--redis-url", "redis://:pw@10.0.0.1:6379/0"],
            {},
            ["--redis-url", "--embedded-redis", "redis://:***@10.0.0.1:6379/0"],
        ),
        (
            ["--embedded-redis"],
            {"PRESENCE_REDIS_URL": "redis://10.0.0.1:6379/0"},
            ["PRESENCE_REDIS_URL", "--embedded-redis", "redis://10.0.0.1:6379/0"],
        ),
        (
            ["--redis-url", "redis://10.0.0.1:6379/0"],
            {"PRESENCE_EMBEDDED_REDIS": "1"},
            ["--redis-url", "PRESENCE_EMBEDDED_REDIS"],
        ),
        (
            [],
            {"PRESENCE_EMBEDDED_REDIS": "yes", "PRESENCE_REDIS_URL": "redis://10.0.0.1:6379/0"},
            ["PRESENCE_REDIS_URL", "PRESENCE_EMBEDDED_REDIS"],
        ),
    ],
    ids=["flags", "flag-and-env-url", "env-embedded-and-flag", "env"],
)
def test_embedded_redis_with_a_redis_url_is_refused(
    args: list[str], env: dict[str, str], named: list[str]
) -> None:
    result = run("--port", "0", *args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert ":pw@" not in result.stderr
    assert result.stdout == ""


def test_embedded_redis_off_in_the_environment_keeps_the_url() -> None:
    environ = {"PRESENCE_EMBEDDED_REDIS": "0", "PRESENCE_REDIS_URL": "redis://h:1/0"}
    config = config_from_args(["--port", "0"], environ=environ)
    assert (config.embedded_redis, config.redis_url) == (False, "redis://h:1/0")
    config = config_from_args(["--embedded-redis"], environ={})
    assert config.embedded_redis and config.redis_url == Config().redis_url


@pytest.mark.parametrize(
    ("userinfo", "shown", "reason"),
    [
        ("", "redis://127.0.0.1:{port}/0", "needs a password"),
        (":wrong@", "redis://:***@127.0.0.1:{port}/0", "wrong user name or password"),
        ("nobody:wrong@", "redis://nobody:***@127.0.0.1:{port}/0", "wrong user name or password"),
    ],
    ids=["no-password", "wrong-password", "unknown-user"],
)
def test_redis_refusing_credentials_is_one_line_naming_the_url(
    password_redis: int, userinfo: str, shown: str, reason: str
) -> None:
    url = f"redis://{userinfo}127.0.0.1:{password_redis}/0"
    result = run("--port", "0", "--redis-url", url)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "refused the connection" in lines[0], lines[0]
    assert shown.format(port=password_redis) in lines[0], lines[0]
    assert reason in lines[0], lines[0]
    assert "wrong@" not in lines[0] and "HELLO" not in lines[0], lines[0]
    assert "listening" not in result.stdout


def test_the_right_password_serves(password_redis: int) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{password_redis}/0"
    with DaemonProcess(url, "with-password") as daemon:
        assert daemon.terminate() == 0, daemon.stderr()
        assert PASSWORD not in daemon.stderr(), daemon.stderr()


def test_help_shows_choices_and_no_empty_defaults() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "--log-level {debug,info,warning,error}" in result.stdout
    assert "--friend-lists {clients,app}" in result.stdout
    assert "''" not in result.stdout  # e.g. --instance-id: "default host-random" says it
    assert "--version" in result.stdout


@pytest.mark.parametrize(
    ("module", "prog"),
    [("presence_daemon", "presence-daemon"), ("presence_daemon.demo", "presence-demo")],
)
def test_version(module: str, prog: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{prog} {metadata.version('presence-daemon')}\n"
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://bob:pw@h:1/0", "redis://bob:***@h:1/0"),
        ("redis://pw@h:1/0", "redis://***@h:1/0"),
        ("rediss://bob:p@w@h:1/0", "rediss://bob:***@h:1/0"),
        ("unix://:pw@/tmp/redis.sock", "unix://:***@/tmp/redis.sock"),
        ("redis://h:1/0?password=pw&db=1", "redis://h:1/0?password=***&db=1"),
        ("redis+cluster://bob:pw@a:1,b:2", "redis+cluster://bob:***@a:1,b:2"),
        ("redis://:sec/ret@h:1/0", "redis://:***@h:1/0"),  # (not percent-encoded)
        ("redis://:s3cr#t@h:1/0", "redis://:***@h:1/0"),
        ("redis://bob:a?b@h:1/0", "redis://bob:***@h:1/0"),
    ],
)
def test_safe_url_hides_the_password_only(url: str, shown: str) -> None:
    assert safe_url(url) == shown
