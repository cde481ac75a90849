"""Tests for the terminal client: pure rendering, CLI validation, real end-to-end runs.

The end-to-end tests start a real daemon process (``python -m presence_daemon``) on the
session's real redis-server and real ``presence-client`` processes in plain mode, and
read their output line by line with deadlines.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest
from rich.console import Console

from presence_client.render import (
    LOG_LINES,
    ViewState,
    format_server,
    render_event_line,
    render_friend_lines,
    render_view,
)
from presence_client.sdk import FriendEvent, PresenceClient, StatusEvent, parse_server
from presence_client.terminal import LineSource, UsageError, build_parser, main, read_names

WAIT = 10.0
"""Upper bound for any single expected line or exit (generous; normally well under 1 s)."""


# -- helpers -------------------------------------------------------------------------


class Proc:
    """A subprocess whose stdout lines are collected by a thread, read with deadlines."""

    def __init__(self, args: list[str], stdin: int | None = subprocess.DEVNULL) -> None:
        self.popen = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, predicate: Callable[[str], bool] | str, timeout: float = WAIT) -> str:
        """The next line matching ``predicate`` (or equal to it); fails at the deadline."""
        match = predicate if callable(predicate) else (lambda line: line == predicate)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                pytest.fail(f"no line matching {predicate!r} within {timeout}s; saw {self.seen}")
            if line is None:
                pytest.fail(f"output ended before a line matching {predicate!r}; saw {self.seen}")
            self.seen.append(line)
            if match(line):
                return line

    def rest(self, timeout: float = WAIT) -> list[str]:
        """All remaining lines until the output ends (the process must exit)."""
        rest: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"output did not end within {timeout}s; saw {self.seen + rest}")
            if line is None:
                return rest
            rest.append(line)

    def wait(self, timeout: float = WAIT) -> int:
        return self.popen.wait(timeout=timeout)

    def stderr(self) -> str:
        assert self.popen.stderr is not None
        return self.popen.stderr.read()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


def client_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "presence_client.terminal", *args]


@pytest.fixture
def daemon(redis_url: str) -> Iterator[str]:
    """A real daemon process with short timers; yields its ``HOST:PORT``."""
    proc = Proc(
        [
            sys.executable,
            "-m",
            "presence_daemon",
            "--processes",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--redis-url",
            redis_url,
            "--ping-interval",
            "0.2",
            "--timeout",
            "0.6",
            "--sweep-interval",
            "0.05",
            "--log-level",
            "warning",
        ]
    )
    try:
        ready = proc.expect(lambda line: line.startswith("presence-daemon listening on udp://"))
        match = re.search(r"udp://(\S+) ", ready)
        assert match is not None
        yield match[1]
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()


# -- rendering -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (FriendEvent("bob", True), "friend bob online"),
        (FriendEvent("bob", False), "friend bob offline"),
        (StatusEvent("connected", ("127.0.0.1", 13131)), "connected server=127.0.0.1:13131"),
        (StatusEvent("reconnecting", ("::1", 7)), "reconnecting server=[::1]:7"),
        (StatusEvent("disconnected", None), "disconnected"),
    ],
)
def test_render_event_line(event: FriendEvent | StatusEvent, line: str) -> None:
    assert render_event_line(event) == line


def test_render_friend_lines_keep_order() -> None:
    assert render_friend_lines({"zed": False, "amy": True}) == [
        "friend zed offline",
        "friend amy online",
    ]
    assert format_server(None) == "-"


def _text_of(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=100, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_view_state_and_render_view() -> None:
    state = ViewState("alice", {"bob": False, "carol": False}, [("127.0.0.1", 13131)])
    text = _text_of(render_view(state))
    assert "alice" in text
    assert "connecting" in text
    assert text.count("offline") == 2
    now = datetime(2024, 1, 2, 12, 0, 1)
    state.apply(StatusEvent("connected", ("127.0.0.1", 13131)), now)
    state.apply(FriendEvent("bob", True), now)
    state.apply(FriendEvent("bob", True), now)  # no change: not logged again
    assert state.status == "connected"
    assert state.friends == {"bob": True, "carol": False}
    assert [entry for _, entry in state.log] == ["connected to 127.0.0.1:13131", "bob is online"]
    text = _text_of(render_view(state))
    assert "12:00:01  bob is online" in text
    assert re.search(r"bob\s+│\s+● online", text)
    assert re.search(r"carol\s+│\s+○ offline", text)
    for i in range(2 * LOG_LINES):
        state.apply(FriendEvent("carol", i % 2 == 0), now)
    assert len(state.log) == LOG_LINES
    assert "(no friends declared)" in _text_of(render_view(ViewState("erin", {})))


def test_view_shows_friends_unknown_until_known_and_after_the_connection_is_lost() -> None:
    state = ViewState("alice", {"bob": None, "carol": None})
    text = _text_of(render_view(state))
    assert text.count("? unknown") == 2
    assert "offline" not in text
    now = datetime(2024, 1, 2, 12, 0, 1)
    state.sync({"bob": True, "carol": False})  # not connected yet: still unknown
    assert state.friends == {"bob": None, "carol": None}
    state.apply(StatusEvent("connected", ("127.0.0.1", 13131)), now)
    state.sync({"bob": True, "carol": None, "dave": False})  # names follow the client
    assert state.friends == {"bob": True, "carol": None, "dave": False}
    text = _text_of(render_view(state))
    assert re.search(r"bob\s+│\s+● online", text)
    assert re.search(r"carol\s+│\s+\? unknown", text)
    assert re.search(r"dave\s+│\s+○ offline", text)
    for status in ("reconnecting", "disconnected"):
        state.apply(StatusEvent("connected", None), now)
        state.sync({"bob": True})
        state.apply(StatusEvent(status, None), now)
        assert state.friends == {"bob": None}, status
        assert "? unknown" in _text_of(render_view(state))


# -- command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["--user", "bad name"], "'bad name'"),
        (["--user", "alice", "--friend", "bob", "--friend", "x{y}"], "'x{y}'"),
        (["--user", "alice", "--server", "localhost:port"], "'localhost:port'"),
        (["--user", "alice", "--server", "127.0.0.1:70000"], "'127.0.0.1:70000'"),
        (["--user", "alice", "--client-id", "a/b"], "'a/b'"),
        (["--user", "alice", "--duration", "-1"], "'-1'"),
        (["--user", "alice", "--log-level", "loud"], "'loud'"),
        (["--user", "alice", "--frobnicate"], "--frobnicate"),
    ],
)
def test_bad_command_line_values_exit_2_with_one_line(
    argv: list[str], bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("presence-client: error: ")
    assert bad in lines[0]


def test_no_server_answering_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    # A bound UDP socket that never answers: no ICMP, just silence.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        argv = ["--user", "alice", "--server", f"127.0.0.1:{port}", "--connect-attempts", "2"]
        assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("presence-client: error: could not connect")
    assert f"127.0.0.1:{port}" in lines[0]
    assert captured.out == ""


def test_read_names_lockwood_flow() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"  \nbad name\nalice\nbob\nno{good}\n carol \n\nq\n")
        os.close(write_fd)
        write_fd = -1
        source = LineSource(read_fd)
        err = io.StringIO()
        assert read_names(source, None, err) == ("alice", ["bob", "carol"])
        complaints = err.getvalue().splitlines()
        assert len(complaints) == 2
        assert "invalid user name 'bad name'" in complaints[0]
        assert "invalid friend name 'no{good}'" in complaints[1]
        # Nothing past the empty line was consumed: "q" is still there for the quit key.
        assert source.readline() == "q"
        assert source.readline() is None
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_typed_names_are_canonicalized() -> None:
    # Fullwidth letters and a decomposed accent, as an input method may produce them:
    # the terminal sends the canonical name (the daemon would refuse the typed form).
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, "\uff21lice\nZoe\u0308\nnamaste\u0020x\n\n".encode())
        os.close(write_fd)
        write_fd = -1
        err = io.StringIO()
        assert read_names(LineSource(read_fd), None, err) == ("Alice", ["Zo\u00eb"])
        assert "invalid friend name 'namaste x'" in err.getvalue()
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_command_line_names_are_canonicalized() -> None:
    args = build_parser().parse_args(
        ["--user", "\uff21lice", "--friend", "Zoe\u0308", "--client-id", "\uff43-1"]
    )
    assert (args.user, args.friends, args.client_id) == ("Alice", ["Zo\u00eb"], "c-1")


def test_read_names_without_user_is_a_usage_error() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"\n\nnot valid\n")
    os.close(write_fd)
    try:
        with pytest.raises(UsageError):
            read_names(LineSource(read_fd), None, io.StringIO())
    finally:
        os.close(read_fd)


# -- end to end (real daemon, real client processes) ---------------------------------


def test_two_terminal_clients_see_each_other(daemon: str) -> None:
    alice = Proc(client_args("--plain", "--user", "alice", "--friend", "bob", "--server", daemon))
    bob: Proc | None = None
    try:
        alice.expect(f"connected server={daemon}")
        alice.expect("friend bob offline")
        bob = Proc(client_args("--plain", "--user", "bob", "--friend", "alice", "--server", daemon))
        bob.expect(f"connected server={daemon}")
        bob.expect("friend alice online")  # the initial picture: alice was already there
        alice.expect("friend bob online")
        bob.popen.send_signal(signal.SIGINT)
        assert bob.rest() == ["disconnected"]
        assert bob.wait() == 0
        alice.expect("friend bob offline")
        alice.popen.send_signal(signal.SIGTERM)
        assert alice.rest() == ["disconnected"]
        assert alice.wait() == 0
    finally:
        alice.kill()
        if bob is not None:
            bob.kill()


async def test_sdk_friend_states_are_unknown_unless_connected(daemon: str) -> None:
    server = parse_server(daemon)
    bob = PresenceClient("bob", ["alice"], servers=[server])
    alice = PresenceClient("alice", ["bob", "carol"], servers=[server])
    assert alice.friend_states == {"bob": None, "carol": None}
    assert alice.friends == {"bob": False, "carol": False}  # the plain view says offline
    await bob.connect()
    try:
        await alice.connect()
        assert alice.friend_states == {"bob": True, "carol": False}
        await alice.disconnect()
        assert alice.friend_states == {"bob": None, "carol": None}
    finally:
        await bob.disconnect()


def test_stdin_flow_eof_does_not_quit_and_q_does(daemon: str) -> None:
    # alice: the Lockwood flow from a pipe, including one bad name; then stdin closes.
    alice = Proc(client_args("--plain", "--server", daemon), stdin=subprocess.PIPE)
    bob: Proc | None = None
    try:
        assert alice.popen.stdin is not None
        alice.popen.stdin.write("alice\nbad name\nbob\n\n")
        alice.popen.stdin.close()
        alice.expect(f"connected server={daemon}")
        alice.expect("friend bob offline")
        # bob: names on the command line, stdin kept open for the quit key.
        bob = Proc(
            client_args("--plain", "--user", "bob", "--friend", "alice", "--server", daemon),
            stdin=subprocess.PIPE,
        )
        bob.expect("friend alice online")
        # alice is still there after the end of her stdin: she is told about bob.
        alice.expect("friend bob online")
        assert alice.popen.poll() is None
        assert bob.popen.stdin is not None
        bob.popen.stdin.write("q\n")
        bob.popen.stdin.flush()
        assert bob.rest() == ["disconnected"]
        assert bob.wait() == 0
        alice.expect("friend bob offline")
        alice.popen.send_signal(signal.SIGINT)
        assert alice.rest() == ["disconnected"]
        assert alice.wait() == 0
        assert "invalid friend name 'bad name'" in alice.stderr()
    finally:
        alice.kill()
        if bob is not None:
            bob.kill()


def test_duration_exits_by_itself(daemon: str) -> None:
    carol = Proc(
        client_args(
            "--plain",
            "--user",
            "carol",
            "--friend",
            "dave",
            "--server",
            daemon,
            "--duration",
            "0.5",
        )
    )
    try:
        assert carol.rest() == [f"connected server={daemon}", "friend dave offline", "disconnected"]
        assert carol.wait() == 0
    finally:
        carol.kill()
