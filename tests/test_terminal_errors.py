"""The terminal client's error paths, driven through the real ``presence-client`` program.

A "silent server" is a bound UDP socket that never answers (no ICMP either), so the
client keeps trying to connect; the test reads the client's first datagram from it to
know, without sleeping, that the client is connecting. Quit keys are typed through a
pseudo-terminal, as a person would.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from presence_client.terminal import parse_args

WAIT = 10.0
"""Upper bound for an expected datagram or exit (normally well under 1 s)."""
QUICK = 3.0
"""Upper bound for an exit that must happen "at once" (connecting would take far longer)."""

PROGRAM = str(Path(sys.executable).parent / "presence-client")
NO_TRACEBACK = ("Traceback", "Task exception", "Error:")


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A bound UDP socket on 127.0.0.1 that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(WAIT)
        yield sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def run(args: list[str], timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, lines
    assert not any(word in lines[0] for word in NO_TRACEBACK), lines
    return lines[0]


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"client still running after {timeout}s")


# -- before any connection -------------------------------------------------------------


def test_duration_ending_before_connect_exits_1_with_one_line(silent: socket.socket) -> None:
    server = address(silent)
    done = run([PROGRAM, "--plain", "--user", "alice", "--server", server, "--duration", "0.3"])
    assert done.returncode == 1
    assert done.stdout == ""  # never connected: no "disconnected" line
    line = one_error_line(done.stderr)
    assert line.startswith(f"presence-client: error: could not reach {server}")
    assert "--duration 0.3s" in line


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_connecting_exits_nonzero(
    silent: socket.socket, signum: signal.Signals, code: int
) -> None:
    server = address(silent)
    args = [PROGRAM, "--plain", "--user", "alice", "--server", server, "--connect-attempts", "50"]
    with subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            silent.recvfrom(4096)  # the first CONNECT: the client is connecting
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=QUICK)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == code
    assert out == ""
    assert one_error_line(err) == (
        f"presence-client: {signum.name} while connecting to {server}: not connected"
    )


def test_q_in_line_mode_while_connecting_quits_at_once(silent: socket.socket) -> None:
    args = [PROGRAM, "--plain", "--user", "alice", "--server", address(silent)]
    with subprocess.Popen(
        [*args, "--connect-attempts", "50"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            silent.recvfrom(4096)
            assert proc.stdin is not None
            proc.stdin.write("q\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=QUICK)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert (proc.returncode, out, err) == (0, "", "")


def test_q_key_on_a_terminal_while_connecting_quits_at_once(silent: socket.socket) -> None:
    """The live view on a pseudo-terminal: one ``q`` key (no Enter) quits while connecting,
    and is consumed by the client (not left in the terminal for the shell)."""
    master, slave = os.openpty()
    args = [PROGRAM, "--user", "alice", "--friend", "bob", "--server", address(silent)]
    try:
        proc = subprocess.Popen(
            [*args, "--connect-attempts", "50"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "80", "LINES": "24"},
        )
        try:
            silent.recvfrom(4096)
            os.write(master, b"q")
            assert wait_exit(proc, QUICK) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert _pending_input(slave) == b""  # what a shell would read next
        screen = _drain(master)
        assert "alice" in screen  # the live view was drawn
        assert "Traceback" not in screen
    finally:
        os.close(master)
        os.close(slave)


def _pending_input(slave: int) -> bytes:
    """Input typed on the terminal that nobody has read yet (even without a newline)."""
    tty.setraw(slave)
    os.set_blocking(slave, False)
    try:
        return os.read(slave, 4096)
    except BlockingIOError:
        return b""


def _drain(master: int) -> str:
    """Everything the client wrote to the terminal (it has exited)."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


# -- command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "wanted"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range (1-65535)"),
        ("127.0.0.1:0", "port 0 is out of range (1-65535)"),
        ("[::1]:70000", "port 70000 is out of range (1-65535)"),
        ("localhost:port", "port 'port' is not a number (expected 1-65535)"),
        (":13131", "no host"),
    ],
)
def test_bad_server_port_is_named(server: str, wanted: str) -> None:
    done = run([PROGRAM, "--user", "alice", "--server", server])
    assert done.returncode == 2
    assert done.stdout == ""
    line = one_error_line(done.stderr)
    assert line.startswith("presence-client: error: ")
    assert repr(server) in line
    assert wanted in line


def test_friend_who_is_the_user_is_refused() -> None:
    done = run([PROGRAM, "--user", "alice", "--friend", "bob", "--friend", "alice"])
    assert done.returncode == 2
    assert done.stdout == ""
    line = one_error_line(done.stderr)
    assert line.startswith("presence-client: error: --friend 'alice' is you")
    # Case is part of a name: Alice is someone else.
    assert parse_args(["--user", "alice", "--friend", "Alice"]).friends == ("Alice",)


def test_friend_who_is_the_user_is_asked_again_on_stdin(silent: socket.socket) -> None:
    done = subprocess.run(
        [PROGRAM, "--plain", "--server", address(silent), "--duration", "0.2"],
        input="alice\nalice\n\n",
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert "friend name 'alice' is you" in done.stderr


def test_version_from_package_metadata() -> None:
    wanted = f"presence-client {metadata.version('presence-client')}\n"
    for args in ([PROGRAM], [sys.executable, "-m", "presence_client"]):
        done = run([*args, "--version"])
        assert (done.returncode, done.stdout) == (0, wanted)


def test_python_m_presence_client_runs_the_client(silent: socket.socket) -> None:
    server = address(silent)
    args = ["--plain", "--user", "alice", "--server", server, "--duration", "0.2"]
    done = run([sys.executable, "-m", "presence_client", *args])
    assert done.returncode == 1
    assert one_error_line(done.stderr).startswith(
        f"presence-client: error: could not reach {server}"
    )
