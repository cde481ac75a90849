"""Several daemon processes on one UDP port: a supervisor and its workers.

Theory of operation
-------------------
With ``--processes N`` (N > 1) the ``presence-daemon`` process does not serve clients
itself. It reserves the port (binds it with SO_REUSEPORT; with port 0 the kernel picks
one), then starts N workers: ``python -m presence_daemon`` with the same settings plus
``--processes 1 --reuse-port``, that port, and instance id ``<id>-<k>``. Once every
worker has printed its ready line, the supervisor closes its own socket (the kernel
would otherwise hand it a share of the clients) and prints one ready line naming all
the workers. With ``--metrics-port P``, worker k serves its metrics, health and
readiness on port P + k - 1 (the supervisor serves none).

Each worker is a whole daemon: its own instance id, lease, sessions and Redis
connections. The kernel spreads clients over the workers' sockets by a hash of the
addresses, so all of one client's datagrams reach the same worker while the set of
sockets stays the same.

A worker that dies is started again with a new instance id (``<id>-<k>.<n>``), at once
the first time and after a growing backoff while it keeps dying young. Its clients'
pings now reach a worker that does not know them: they are told UNKNOWN_SESSION and
connect again, as after any failover. (A socket leaving or joining the group can move
other workers' clients too; they re-home the same way.) Its entries in Redis are
reaped by the survivors once its lease runs out.

SIGTERM or SIGINT is passed on to every worker, and each stops as a lone daemon does
(GO_AWAY, grace, removal from Redis); the supervisor exits once all have, with 0 if
all exited cleanly. A worker that fails before its first ready line (Redis out of
reach, a bad key file) fails the start: the others are stopped and its exit code is
the supervisor's. Workers get SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Final

from presence_daemon import logs
from presence_daemon.app import READY_PREFIX, bind_udp
from presence_daemon.config import Config, config_args
from presence_daemon.embedded import EmbeddedRedis, pdeathsig_preexec

log = logging.getLogger("presence_daemon.supervisor")

RESTART_BACKOFF: Final = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before a worker that died is started again: the first entry, then each next
one while it keeps dying within YOUNG seconds of its start."""
YOUNG: Final = 30.0
"""A worker that dies sooner than this after its start moves one step up the backoff."""


@dataclass(eq=False)
class Worker:
    """One worker process slot (``index`` 1..N), across its restarts."""

    index: int
    base_id: str
    instance_id: str = ""
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    strikes: int = 0
    """Deaths in a row, each (after the first) within YOUNG seconds of its start."""

    def next_instance_id(self) -> str:
        """``<id>-<k>``, then ``<id>-<k>.<n>`` for the n-th restart: never reused, so a
        restarted worker never waits out its dead predecessor's lease."""
        suffix = f"-{self.index}" + (f".{self.starts}" if self.starts else "")
        return self.base_id + suffix


class Supervisor:
    """Starts, watches and stops the workers of one port (see the module doc)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.base_id = config.pick_instance_id()
        self.workers = [Worker(k, self.base_id) for k in range(1, config.processes + 1)]
        self.stopping = asyncio.Event()
        self.port = 0
        self.redis_url = config.redis_url
        self._all_ready = asyncio.Event()
        self._first_failure: int | None = None
        self._ready_count = 0

    # -- workers -------------------------------------------------------------------

    def _worker_args(self, worker: Worker) -> list[str]:
        """The worker's command line: our settings, with its own port, id and Redis."""
        settings = dataclasses.replace(
            self.config,
            processes=1,
            reuse_port=True,
            port=self.port,
            instance_id=worker.instance_id,
            redis_url=self.redis_url,
            embedded_redis=False,  # the supervisor's embedded Redis, if any, is shared
            # Worker k serves metrics on the given port + k - 1: worker 1 on the port
            # itself, so a health check of the base port works with any N.
            metrics_port=self.config.metrics_port + worker.index - 1
            if self.config.metrics_port
            else 0,
        )
        return [sys.executable, "-m", "presence_daemon", *config_args(settings)]

    async def _spawn(self, worker: Worker) -> asyncio.subprocess.Process:
        worker.instance_id = worker.next_instance_id()
        worker.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
        process = await asyncio.create_subprocess_exec(
            *self._worker_args(worker),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=pdeathsig_preexec(),
        )
        worker.process = process
        log.info(
            "worker %d started: pid %d, instance %s", worker.index, process.pid, worker.instance_id
        )
        if self.stopping.is_set():  # a stop that came while it was being started
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        return process

    @staticmethod
    async def _read_ready_line(process: asyncio.subprocess.Process) -> bool:
        """Read the worker's stdout up to its ready line; False if it ended first."""
        assert process.stdout is not None
        while line := await process.stdout.readline():
            if line.decode(errors="replace").startswith(READY_PREFIX):
                return True
        return False

    async def _keep_running(self, worker: Worker) -> None:
        """Run one worker slot until the supervisor stops: start the worker, wait for
        it to end, start it again after a backoff."""
        first = True
        while not self.stopping.is_set():
            process = await self._spawn(worker)
            started = time.monotonic()
            ready = await self._read_ready_line(process)
            if ready and first:
                first = False
                self._ready_count += 1
                if self._ready_count == len(self.workers):
                    self._all_ready.set()
            elif ready:
                log.info("worker %d ready again as %s", worker.index, worker.instance_id)
            assert process.stdout is not None
            while await process.stdout.read(4096):  # nothing more is expected; keep it drained
                pass
            code = await process.wait()
            if self.stopping.is_set():
                return
            if first:  # it never served: the start fails (the others are stopped)
                if self._first_failure is None:
                    self._first_failure = code if code > 0 else 1
                log.error(
                    "worker %d (%s) exited with %d before it was ready",
                    worker.index,
                    worker.instance_id,
                    code,
                )
                self._all_ready.set()
                return
            young = time.monotonic() - started < YOUNG
            worker.strikes = worker.strikes + 1 if young else 1
            delay = RESTART_BACKOFF[min(worker.strikes, len(RESTART_BACKOFF)) - 1]
            log.warning(
                "worker %d (%s, pid %d) exited with %d; starting it again in %.1f s "
                "(its clients connect again to the others meanwhile)",
                worker.index,
                worker.instance_id,
                process.pid,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    def _stop_workers(self) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()

    def _on_signal(self) -> None:
        if self.stopping.is_set():
            log.info("already shutting down")
            return
        log.info("shutting down: stopping %d workers", len(self.workers))
        self.stopping.set()
        self._all_ready.set()
        self._stop_workers()

    # -- the whole ---------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        embedded: EmbeddedRedis | None = None
        reservation = _reserve_port(self.config.host, self.config.port)
        try:
            self.port = reservation.getsockname()[1]
            if self.config.embedded_redis:  # one Redis for all the workers
                embedded = EmbeddedRedis().start()
                self.redis_url = embedded.url
                log.info("started embedded redis-server at %s", self.redis_url)
            tasks = [asyncio.create_task(self._keep_running(w)) for w in self.workers]
            await self._all_ready.wait()
            reservation.close()  # the workers hold the port now
            if self._first_failure is None and not self.stopping.is_set():
                ids = ",".join(w.instance_id for w in self.workers)
                host = self.config.host
                print(
                    f"{READY_PREFIX}{host}:{self.port} instance={ids} "
                    f"processes={len(self.workers)}",
                    flush=True,
                )
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if not self.stopping.is_set():  # a worker failed its start: stop the rest
                self.stopping.set()
                self._stop_workers()
            # (Never a second SIGTERM: a worker past its clean-up would die of it.)
            await asyncio.gather(*tasks)
            if self._first_failure is not None:
                return self._first_failure
            codes = [w.process.returncode for w in self.workers if w.process is not None]
            bad = [code for code in codes if code != 0]
            if bad:
                log.error("workers exited with %s", bad)
                return bad[0] if bad[0] and bad[0] > 0 else 1
            log.info("stopped: all %d workers exited cleanly", len(self.workers))
            return 0
        finally:
            reservation.close()
            if embedded is not None:
                embedded.stop()


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT (port 0: a free one) so the workers can
    join the same port and nobody else takes it meanwhile."""
    return bind_udp(host, port, reuse_port=True)  # BindError says why not, in one line


def run(config: Config) -> int:
    """Run the supervisor and its ``config.processes`` workers; returns the exit code."""
    logs.configure(config.log_level, config.log_format)
    try:
        return asyncio.run(Supervisor(config).run())
    except OSError as exc:
        print(f"presence-daemon: error: {exc}", file=sys.stderr)
        return 1
