"""Real daemon processes and raw UDP peers for end-to-end tests.

:class:`DaemonProcess` runs ``python -m presence_daemon`` as a child process (in its own
process group, so nothing it starts outlives it), waits for its ready line and exposes
the UDP address it bound. stdout and stderr go to temp files, so a failure can show the
daemon's log. :class:`RawPeer` speaks the wire codec over a real UDP socket, for tests
that need to send exactly chosen datagrams (or withhold pings).

The pytest fixture ``daemon_factory`` starts daemons against the test's ``redis_url`` and
kills any left running at teardown; a test module enables it with
``from daemons import daemon_factory_fixture  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self, TypeVar

import pytest
import pytest_asyncio

from helpers import Watched
from presence_client.protocol import (
    MAX_DATAGRAM,
    AnyMessage,
    Connect,
    ConnectOk,
    Disconnect,
    DisconnectOk,
    Message,
    Ping,
    Pong,
    decode,
    encode,
)
from presence_client.sdk import PresenceClient
from presence_daemon.embedded import find_redis_server

READY_RE: Final = re.compile(
    r"presence-daemon listening on udp://(?P<host>\S+):(?P<port>\d+) instance=(?P<id>\S+)"
)
READY_TIMEOUT: Final = 10.0
"""Seconds a daemon may take to print its ready line."""
STOP_TIMEOUT: Final = 10.0
"""Seconds a daemon may take to exit after SIGTERM/SIGINT."""

Address = tuple[str, int]
M = TypeVar("M", bound=Message)

UNLIMITED: Final[dict[str, str | None]] = {
    f"--{kind}-rate{scope}": "0"
    for kind in ("connect", "friends", "snapshot")
    for scope in ("-per-address", "-per-user", "")
}
"""Flags that lift every request-rate limit."""


# ---------------------------------------------------------------------------
# Daemon processes.


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon child: ours without PRESENCE_* settings, plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class DaemonProcess:
    """One ``python -m presence_daemon`` child process.

    ``flags`` overrides the default flags (``{"--timeout": "1.0"}``; a value of None
    drops the flag); ``extra_args`` are appended. Use as a context manager or call
    :meth:`start` and :meth:`close`; :meth:`close` always leaves no process behind.
    """

    def __init__(
        self,
        redis_url: str | None,
        instance_id: str = "d1",
        *,
        flags: Mapping[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        defaults: dict[str, str | None] = {
            "--processes": "1",  # one daemon, no supervisor (unless a test asks for more)
            "--host": "127.0.0.1",
            "--port": "0",
            "--redis-url": redis_url,
            "--instance-id": instance_id,
            "--ping-interval": "0.2",
            "--timeout": "0.6",
            "--sweep-interval": "0.05",
            "--log-level": "info",
            # Scaled like the timings above (25x the defaults: ping 0.2 s, not 5 s).
            "--snapshot-interval": "0.04",
            "--notify-coalesce": "0.02",
            # No request-rate limits: every test client sends from 127.0.0.1 (500 fail
            # over at once), and hostile tests hammer one user. tests/test_limits.py
            # sets them explicitly.
            **UNLIMITED,
        }
        defaults.update(flags or {})
        self.args: list[str] = [sys.executable, "-m", "presence_daemon"]
        for flag, value in defaults.items():
            if value is not None:
                self.args += [flag, value]
        self.args += list(extra_args)
        self.env = daemon_env(env)
        self.ready_timeout = ready_timeout
        self.instance_id = instance_id
        self.process: subprocess.Popen[bytes] | None = None
        self.address: Address = ("", 0)
        self._dir = tempfile.TemporaryDirectory(prefix="presence-daemon-test-")
        self.stdout_path = Path(self._dir.name) / "stdout.txt"
        self.stderr_path = Path(self._dir.name) / "stderr.txt"
        self._files: list[IO[bytes]] = []

    # -- lifecycle -----------------------------------------------------------------

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be ready."""
        if self.process is not None:
            raise RuntimeError("daemon already started")
        stdout = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in close()
        stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self._files = [stdout, stderr]
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=self.env,
            start_new_session=True,  # own process group: close() kills all of it
        )
        return self.process

    def start(self) -> Self:
        """Start the daemon and wait (bounded) for its ready line."""
        process = self.spawn()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            match = READY_RE.search(self.stdout())
            if match:
                self.address = (match["host"], int(match["port"]))
                self.instance_id = match["id"]
                return self
            if process.poll() is not None:
                self.close()
                pytest.fail(
                    f"daemon exited with {process.returncode} before it was ready; "
                    f"stderr:\n{self.stderr()}"
                )
            if time.monotonic() >= deadline:
                self.close()
                pytest.fail(
                    f"daemon not ready within {self.ready_timeout} s; stderr:\n{self.stderr()}"
                )
            time.sleep(0.01)

    async def astart(self) -> Self:
        """:meth:`start` without blocking the event loop (clients keep pinging)."""
        return await asyncio.to_thread(self.start)

    @property
    def pid(self) -> int:
        assert self.process is not None, "daemon not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon process itself (not its group)."""
        assert self.process is not None, "daemon not started"
        self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait (bounded) for the process to exit; fails the test if it does not."""
        assert self.process is not None, "daemon not started"
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"daemon did not exit within {timeout} s; stderr:\n{self.stderr()}")

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait (bounded), return the exit code."""
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    async def aterminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """:meth:`terminate` without blocking the event loop."""
        return await asyncio.to_thread(self.terminate, timeout)

    def kill(self) -> int:
        """SIGKILL the daemon's whole process group and reap it; returns the exit code."""
        assert self.process is not None, "daemon not started"
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """Kill whatever is left (the process group), close and remove the log files."""
        if self.process is not None:
            if self.process.poll() is None:
                self.kill()
            else:
                # The daemon is gone; anything still in its group is a leftover.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
        for file in self._files:
            file.close()
        self._files = []

    def cleanup(self) -> None:
        """:meth:`close`, then delete the temp dir holding the logs."""
        self.close()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- output --------------------------------------------------------------------

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<DaemonProcess {self.instance_id} {self.address[0]}:{self.address[1]} {state}>"


class DaemonFactory:
    """Starts daemons against one Redis; :meth:`close_all` kills the leftovers."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.daemons: list[DaemonProcess] = []

    def __call__(
        self,
        instance_id: str | None = None,
        *,
        flags: Mapping[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> DaemonProcess:
        """Start one more daemon and wait until it is ready."""
        daemon = self.create(instance_id, flags=flags, extra_args=extra_args, env=env)
        return daemon.start()

    def create(
        self,
        instance_id: str | None = None,
        *,
        flags: Mapping[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> DaemonProcess:
        """A daemon that is tracked for cleanup but not started yet."""
        daemon = DaemonProcess(
            self.redis_url,
            instance_id or f"d{len(self.daemons) + 1}",
            flags=flags,
            extra_args=extra_args,
            env=env,
        )
        self.daemons.append(daemon)
        return daemon

    async def astart(self, instance_id: str | None = None, **kwargs: Any) -> DaemonProcess:
        """Start a daemon without blocking the event loop."""
        return await self.create(instance_id, **kwargs).astart()

    def close_all(self) -> list[DaemonProcess]:
        """Kill every daemon still running; returns those whose log shows a traceback."""
        broken = []
        for daemon in self.daemons:
            daemon.close()
            if "Traceback" in daemon.stderr():
                broken.append(daemon)
        return broken

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.cleanup()


@pytest.fixture(name="daemon_factory")
def daemon_factory_fixture(redis_url: str) -> Iterator[DaemonFactory]:
    """Start daemon processes on the test's Redis: ``daemon = daemon_factory()``.

    At teardown every daemon still running is killed (SIGKILL to its process group),
    and the test errors if a daemon logged a traceback.
    """
    factory = DaemonFactory(redis_url)
    try:
        yield factory
        broken = factory.close_all()
        if broken:
            logs = "\n\n".join(f"{d!r} stderr:\n{d.stderr()}" for d in broken)
            pytest.fail(f"daemon logged a traceback:\n{logs}")
    finally:
        factory.close_all()
        factory.cleanup()


# ---------------------------------------------------------------------------
# Raw UDP peers.


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: a test waiting for a reply times out and says so


class RawPeer:
    """A UDP socket on 127.0.0.1 that speaks the codec, byte for byte, to one daemon.

    Nothing happens behind the test's back: no pings, no retries, no repair.
    """

    def __init__(
        self, transport: asyncio.DatagramTransport, receiver: _Receiver, server: Address
    ) -> None:
        self.transport = transport
        self.receiver = receiver
        self.server = server
        self.session: bytes | None = None
        self.received: list[AnyMessage] = []
        """Every decoded datagram, in arrival order (also those a recv skipped)."""
        self._request = 1000

    @classmethod
    async def open(cls, server: Address, *, host: str = "127.0.0.1") -> RawPeer:
        """A peer on ``host`` (any 127.x.y.z works on Linux: another source address)."""
        loop = asyncio.get_running_loop()
        transport, receiver = await loop.create_datagram_endpoint(
            _Receiver, local_addr=(host, 0), remote_addr=server
        )
        return cls(transport, receiver, server)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    @property
    def local_address(self) -> Address:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def next_request(self) -> int:
        self._request += 1
        return self._request

    # -- sending / receiving -------------------------------------------------------

    def send(self, msg: Message | bytes, *, pad_to: int | None = None) -> int:
        """Send a message (or raw bytes); returns the datagram's size."""
        data = msg if isinstance(msg, bytes) else encode(msg, pad_to=pad_to)
        self.transport.sendto(data)
        return len(data)

    async def recv_bytes(self, timeout: float = 2.0) -> bytes:
        """The next datagram; raises TimeoutError if none arrives within ``timeout``."""
        return await asyncio.wait_for(self.receiver.queue.get(), timeout)

    async def recv(self, timeout: float = 2.0) -> AnyMessage:
        msg = decode(await self.recv_bytes(timeout))
        self.received.append(msg)
        return msg

    async def recv_until(
        self, kind: type[M], timeout: float = 2.0, *, request: int | None = None
    ) -> tuple[M, list[AnyMessage]]:
        """Receive until a ``kind`` message (with ``request`` id, if given) arrives.

        Returns it and the messages that came before it. Fails the test after
        ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        before: list[AnyMessage] = []
        while True:
            remaining = deadline - loop.time()
            try:
                msg = await self.recv(max(remaining, 0.0))
            except TimeoutError:
                pytest.fail(f"no {kind.__name__} within {timeout} s; got {before!r}")
            if isinstance(msg, kind) and (
                request is None or getattr(msg, "request", None) == request
            ):
                return msg, before
            before.append(msg)

    def pending(self) -> list[bytes]:
        """Datagrams already received and not yet read (does not wait)."""
        items = []
        while not self.receiver.queue.empty():
            items.append(self.receiver.queue.get_nowait())
        return items

    async def barrier(self, timeout: float = 2.0) -> list[bytes]:
        """Every datagram the daemon sent us before it handled a fresh probe.

        The probe is a DISCONNECT for an unknown session, which the daemon answers at
        once with DISCONNECT_OK (in order with anything it answered before on the same
        path). Returns the raw datagrams that arrived before that answer.
        """
        request = self.next_request()
        self.send(Disconnect(request, bytes(16)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        before: list[bytes] = []
        while True:
            try:
                data = await self.recv_bytes(max(deadline - loop.time(), 0.0))
            except TimeoutError:
                pytest.fail(f"barrier not answered within {timeout} s; got {before!r}")
            with contextlib.suppress(Exception):
                msg = decode(data)
                if isinstance(msg, DisconnectOk) and msg.request == request:
                    return before
            before.append(data)

    # -- conversations -------------------------------------------------------------

    async def connect(
        self,
        user: str,
        client_id: str,
        friends: Sequence[str] | None = None,
        *,
        pad: bool = True,
        timeout: float = 2.0,
        auth: str | None = None,
        previous: bytes | None = None,
    ) -> ConnectOk:
        """CONNECT (padded to MAX_DATAGRAM unless ``pad`` is False); wait for CONNECT_OK.
        ``auth``: a login token, for a daemon with auth; ``previous``: the session of the
        client id this one replaces (its proof, without auth)."""
        request = self.next_request()
        msg = Connect(
            request,
            client_id,
            user,
            None if friends is None else tuple(friends),
            auth=None if auth is None else auth.encode(),
            previous=previous,
        )
        self.send(msg, pad_to=MAX_DATAGRAM if pad else None)
        reply, _ = await self.recv_until(ConnectOk, timeout, request=request)
        self.session = reply.session
        return reply

    async def ping(self, timeout: float = 2.0) -> tuple[Pong, list[AnyMessage]]:
        """PING with our session; returns the PONG and what arrived before it."""
        assert self.session is not None, "not connected"
        self.send(Ping(self.session))
        return await self.recv_until(Pong, timeout)

    async def disconnect(self, timeout: float = 2.0) -> None:
        assert self.session is not None, "not connected"
        request = self.next_request()
        self.send(Disconnect(request, self.session))
        await self.recv_until(DisconnectOk, timeout, request=request)
        self.session = None


# -- a Redis that needs a password ---------------------------------------------------

REDIS_PASSWORD: Final = "s3cret-pw"
"""The password :func:`password_redis` requires."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module", name="password_redis")
def password_redis_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server that requires REDIS_PASSWORD; yields its port. (Import it
    into a test module to use it.)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            find_redis_server(),
            *("--port", str(port), "--bind", "127.0.0.1", "--requirepass", REDIS_PASSWORD),
            *("--save", "", "--appendonly", "no"),
        ],
        cwd=tmp_path_factory.mktemp("password-redis"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20.0
        while not port_open(port):
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=20.0)


# -- SDK clients of one test -----------------------------------------------------------

CLIENT_REQUEST_TIMEOUT: Final = 0.2
"""The SDK's first retry delay for test clients (short: the daemons run on 127.0.0.1)."""


class Clients:
    """Creates SDK clients for a test and disconnects them all at teardown."""

    def __init__(self) -> None:
        self.all: list[PresenceClient] = []

    def create(
        self,
        user: str,
        friends: Iterable[str] | None,
        daemon: DaemonProcess,
        *,
        client_id: str | None = None,
        auto_reconnect: bool = True,
        failover: Iterable[DaemonProcess] = (),
        token: str | None = None,
    ) -> Watched:
        client = PresenceClient(
            user,
            friends,
            servers=[daemon.address, *(d.address for d in failover)],
            client_id=client_id or f"{user}-{len(self.all)}",
            request_timeout=CLIENT_REQUEST_TIMEOUT,
            auto_reconnect=auto_reconnect,
            token=token,
        )
        self.all.append(client)
        return Watched(client)

    async def connect(
        self,
        user: str,
        friends: Iterable[str] | None,
        daemon: DaemonProcess,
        *,
        client_id: str | None = None,
        auto_reconnect: bool = True,
        failover: Iterable[DaemonProcess] = (),
        token: str | None = None,
    ) -> Watched:
        watched = self.create(
            user,
            friends,
            daemon,
            client_id=client_id,
            auto_reconnect=auto_reconnect,
            failover=failover,
            token=token,
        )
        await watched.client.connect()
        return watched

    async def close(self) -> None:
        errors: list[BaseException] = []
        for client in self.all:
            try:
                # Bounded: a client whose daemon is gone retries its goodbye a few times.
                await asyncio.wait_for(client.disconnect(), 10)
            except Exception as exc:  # close the others first, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest_asyncio.fixture(name="clients")
async def clients_fixture() -> AsyncIterator[Clients]:
    """SDK clients, all disconnected at teardown. (Import it into a test module.)"""
    pool = Clients()
    try:
        yield pool
    finally:
        await pool.close()
