"""Tests for ``presence-demo``: the script runs, every view is right, nothing is left behind.

The demo starts its own embedded redis-server, an in-process daemon and one real
``presence-client`` process; these tests check it stops all of them, both when the
script ends and on SIGINT.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from presence_daemon.demo import main

WAIT = 30.0


def _children() -> set[int]:
    """Pids of this process's live (non-zombie) children (Linux /proc)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and state != "Z":
            pids.add(int(entry.name))
    return pids


def _port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except OSError:
        return True


def _redis_port(lines: list[str]) -> int:
    for line in lines:
        match = re.fullmatch(r"embedded redis-server at redis://127\.0\.0\.1:(\d+)/0", line)
        if match:
            return int(match[1])
    pytest.fail(f"no embedded redis-server line in {lines}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_demo_runs_its_script_and_all_views_are_correct(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _children()
    assert main(["--duration", "6", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    final = re.fullmatch(r"demo finished: all (\d+) views correct", lines[-1])
    assert final is not None, lines[-5:]
    assert int(final[1]) >= 3
    told = [line.split("  ", 1)[1] for line in lines if "  is told  " in line]
    # Mutual friends are told, through the SDK and through the real terminal process.
    assert "alice/phone  is told  bob is online" in told
    assert "bob/terminal  is told  alice is online" in told
    # The friendship that became mutual while both were online: both were told.
    assert "carol  is told  alice is online" in told
    assert "alice/phone  is told  carol is online" in told
    # The crash was noticed through the timeout.
    assert "alice/laptop  is told  bob is offline" in told
    # dave lists alice but alice does not list dave; erin is unrelated: never told.
    for quiet in ("dave", "erin"):
        assert not [t for t in told if t.startswith(f"{quiet}  ") or f" {quiet} is " in t]
    # Everything it started is gone: redis-server, the client process.
    assert _port_closed(_redis_port(lines))
    assert _children() - before == set()


def test_demo_sigint_stops_everything_and_exits_0() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "presence_daemon.demo", "--duration", "20"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + WAIT
        while not any("bob/terminal  is told" in line for line in seen):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the demo did not get going within {WAIT}s: {seen}")
            if line is None:
                pytest.fail(f"the demo ended early: {seen}")
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT) == 0
        while (line := lines.get(timeout=WAIT)) is not None:
            seen.append(line)
        assert "demo stopped by signal: cleaning up" in seen
        assert not any(line.startswith("demo finished") for line in seen)
        assert _port_closed(_redis_port(seen))
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
