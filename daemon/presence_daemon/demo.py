"""``presence-demo``: a scripted tour of the presence service, self-contained.

Starts a private ``redis-server`` (:class:`~presence_daemon.embedded.EmbeddedRedis`) and
one daemon in this process, then plays a short script with simulated users (SDK
clients in this process, plus one real ``presence-client`` process that is killed to
show a crash). Every notification is shown as ``HH:MM:SS  alice  is told  bob is
online``, every scripted step as a narration line. At the end each live client's view
is compared with the truth in Redis (``Presence.friend_view``); the last line is
``demo finished: all N views correct`` (exit 0) or a mismatch report (exit 1).

The cast: alice and bob list each other (mutual); alice lists carol, who adds alice
later (the friendship becomes mutual while both are online); dave lists alice but
alice does not list dave (neither is told about the other); erin is unrelated.

Step delays scale with ``--duration`` so the script fits; Ctrl-C or SIGTERM stop
everything the demo started (clients, the client process, the daemon, redis-server)
and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from rich.console import Console
from rich.text import Text

from presence_client.sdk import Event, FriendEvent, PresenceClient, Server
from presence_client.terminal import positive
from presence_daemon.app import serve
from presence_daemon.config import Config, package_version
from presence_daemon.embedded import EmbeddedRedis
from presence_daemon.presence import Presence
from presence_daemon.server import Server as DaemonServer

PROG: Final = "presence-demo"
USERS: Final = ("alice", "bob", "carol", "dave", "erin")
STEPS: Final = 12
"""Scripted steps (each followed by one pause)."""
_FRIEND_LINE: Final = re.compile(r"friend (\S+) (online|offline)")


class _UsageError(Exception):
    pass


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description=(
            "Scripted demo of the presence service: starts an embedded redis-server and "
            "a daemon, simulates users coming and going, shows who is told what, and "
            "checks every client's view against Redis at the end."
        ),
    )
    parser.add_argument(
        "--duration",
        type=positive("duration", float),
        default=20.0,
        metavar="SECONDS",
        help="how long the script takes (default 20); delays scale with it",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the random pauses")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


@dataclass(frozen=True, slots=True)
class Timing:
    """Daemon settings and pauses scaled to the demo's duration."""

    ping_interval: float
    timeout: float
    sweep_interval: float
    pause: float

    @classmethod
    def for_duration(cls, duration: float) -> Timing:
        scale = min(1.0, duration / 20.0)
        ping = max(0.2, round(1.0 * scale, 2))
        timeout = 3 * ping
        sweep = max(0.05, ping / 4)
        # Leave room for start-up, the crash timeout and the final check.
        budget = duration * 0.85 - timeout - 2.0
        return cls(ping, timeout, sweep, max(0.05, budget / STEPS))


class Output:
    """Narration and notification lines: rich colour on a terminal, plain text otherwise."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        self.color = self.console.is_terminal
        self.quiet = False
        """Drop notification lines (set while tearing down)."""

    def _emit(self, text: Text) -> None:
        if self.color:
            self.console.print(text, soft_wrap=True)
        else:
            print(text.plain, flush=True)

    @staticmethod
    def _stamp() -> Text:
        text = Text()
        text.append(time.strftime("%H:%M:%S") + "  ", style="dim")
        return text

    def step(self, message: str) -> None:
        text = self._stamp()
        text.append("* " + message, style="bold cyan")
        self._emit(text)

    def told(self, who: str, friend: str, online: bool) -> None:
        if self.quiet:
            return
        text = self._stamp()
        text.append(who, style="bold")
        text.append("  is told  ")
        text.append(friend, style="bold")
        text.append(" is ")
        text.append("online" if online else "offline", style="green" if online else "red")
        self._emit(text)

    def info(self, message: str, style: str = "") -> None:
        self._emit(Text(message, style=style))


@dataclass
class Demo:
    """The demo's moving parts; :meth:`cleanup` stops all of them."""

    out: Output
    timing: Timing
    rng: random.Random
    embedded: EmbeddedRedis | None = None
    presence: Presence | None = None
    address: Server | None = None
    daemon_stop: asyncio.Event = field(default_factory=asyncio.Event)
    daemon_task: asyncio.Task[DaemonServer] | None = None
    clients: dict[str, PresenceClient] = field(default_factory=dict)
    """Live SDK clients by label (``alice/phone``)."""
    process: asyncio.subprocess.Process | None = None
    process_reader: asyncio.Task[None] | None = None
    process_view: dict[str, bool] = field(default_factory=dict)
    process_connected: asyncio.Event = field(default_factory=asyncio.Event)

    # -- set-up ------------------------------------------------------------------------

    async def start(self) -> None:
        self.embedded = EmbeddedRedis()
        await asyncio.to_thread(self.embedded.start)
        self.out.info(f"embedded redis-server at {self.embedded.url}", style="dim")
        self.presence = Presence.from_url(self.embedded.url)
        await self.presence.start()
        config = Config(
            host="127.0.0.1",
            port=0,
            redis_url=self.embedded.url,
            ping_interval=self.timing.ping_interval,
            timeout=self.timing.timeout,
            sweep_interval=self.timing.sweep_interval,
            instance_id="demo-daemon",
            log_level="warning",
        )
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Server] = loop.create_future()

        def on_ready(server: DaemonServer, address: Server) -> None:
            if not ready.done():
                ready.set_result(address)

        async def shutdown_trigger() -> None:
            await self.daemon_stop.wait()

        self.daemon_task = asyncio.create_task(
            serve(config, shutdown_trigger=shutdown_trigger, on_ready=on_ready)
        )
        waiters: set[asyncio.Future[Any]] = {ready, self.daemon_task}
        await asyncio.wait(waiters, timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
        if self.daemon_task.done():
            self.daemon_task.result()  # raises the start-up error
            raise RuntimeError("the daemon stopped during start-up")
        if not ready.done():
            raise RuntimeError("the daemon did not start within 10 s")
        self.address = ready.result()
        self.out.info(
            f"daemon at udp://{self.address[0]}:{self.address[1]} "
            f"(ping every {self.timing.ping_interval:g}s, timeout {self.timing.timeout:g}s)",
            style="dim",
        )

    # -- actors --------------------------------------------------------------------------

    def _listener(self, label: str) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            if isinstance(event, FriendEvent):
                self.out.told(label, event.name, event.online)

        return on_event

    async def connect(self, label: str, user: str, friends: Sequence[str]) -> PresenceClient:
        assert self.address is not None
        client = PresenceClient(
            user, friends, servers=[self.address], client_id=label.replace("/", "-")
        )
        client.add_listener(self._listener(label))
        await client.connect()
        self.clients[label] = client
        return client

    async def disconnect(self, label: str) -> None:
        await self.clients.pop(label).disconnect()

    async def start_terminal(self, user: str, friends: Sequence[str]) -> None:
        """Run a real ``presence-client`` process in plain mode and narrate its lines."""
        assert self.address is not None
        args = ["-m", "presence_client.terminal", "--plain", "--user", user]
        for friend in friends:
            args += ["--friend", friend]
        args += ["--server", f"{self.address[0]}:{self.address[1]}", "--client-id", f"{user}-tty"]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.process_view = dict.fromkeys(friends, False)
        self.process_reader = asyncio.create_task(self._read_terminal(f"{user}/terminal"))
        await asyncio.wait_for(self.process_connected.wait(), 15.0)

    async def _read_terminal(self, label: str) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("connected"):
                self.process_connected.set()
            match = _FRIEND_LINE.fullmatch(line)
            if match:
                name, online = match[1], match[2] == "online"
                # The first lines are its initial picture; only changes are notifications.
                if self.process_view.get(name, False) != online:
                    self.out.told(label, name, online)
                self.process_view[name] = online

    async def crash_terminal(self) -> None:
        """SIGKILL the client process: no goodbye, the daemon must time it out."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    # -- pacing --------------------------------------------------------------------------

    async def pause(self) -> None:
        await asyncio.sleep(self.timing.pause * self.rng.uniform(0.8, 1.2))

    async def wait_until(self, predicate: Callable[[], bool], limit: float) -> bool:
        """Poll ``predicate`` every 20 ms for up to ``limit`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while not predicate():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- checking ------------------------------------------------------------------------

    async def truth(self, client: PresenceClient) -> dict[str, bool]:
        assert self.presence is not None
        return {s.name: s.online for s in await self.presence.friend_view(client.user)}

    async def mismatches(self) -> dict[str, tuple[dict[str, bool], dict[str, bool]]]:
        """Views that differ from Redis: label -> (client's view, truth)."""
        wrong = {}
        for label, client in self.clients.items():
            truth = await self.truth(client)
            if client.friends != truth:
                wrong[label] = (dict(client.friends), truth)
        return wrong

    async def summary(self) -> tuple[int, str]:
        """Print who is online and each view; the exit code and the final line."""
        assert self.presence is not None
        # Views are eventually right (a lost datagram is repaired by a snapshot): allow
        # a few ping intervals for that before calling a difference a mismatch.
        limit = 4 * self.timing.ping_interval + 1.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        wrong = await self.mismatches()
        while wrong and loop.time() < deadline:
            await asyncio.sleep(0.05)
            wrong = await self.mismatches()
        online = await self.presence.query(USERS)
        self.out.info("")
        self.out.info(
            "online at the end: "
            + (", ".join(u for u, on in online.items() if on) or "nobody")
            + "; offline: "
            + (", ".join(u for u, on in online.items() if not on) or "nobody"),
            style="bold",
        )
        for label, client in self.clients.items():
            view = ", ".join(
                f"{n} {'online' if on else 'offline'}" for n, on in client.friends.items()
            )
            if label in wrong:
                seen, truth = wrong[label]
                self.out.info(
                    f"view of {label} MISMATCH: client sees {seen}, Redis says {truth}",
                    style="bold red",
                )
            else:
                self.out.info(f"view of {label}: {view or '(no friends)'} (matches Redis)")
        if wrong:
            return 1, f"demo finished: {len(wrong)} of {len(self.clients)} views wrong"
        return 0, f"demo finished: all {len(self.clients)} views correct"

    # -- tear-down -----------------------------------------------------------------------

    async def cleanup(self) -> None:
        """Stop everything started, in reverse order; never raises."""
        clients, self.clients = list(self.clients.values()), {}
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True),
                10.0,
            )
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self.process_reader is not None:
            self.process_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.process_reader
        if self.daemon_task is not None:
            self.daemon_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.daemon_task, 10.0)
        if self.presence is not None:
            with contextlib.suppress(Exception):
                await self.presence.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


async def script(demo: Demo, deadline: float) -> None:
    """The scripted steps; stops early when the deadline passes."""
    out = demo.out
    loop = asyncio.get_running_loop()

    async def step(message: str, action: Callable[[], Awaitable[object]]) -> bool:
        if loop.time() > deadline:
            out.step("time is up: the rest of the script is skipped")
            return False
        out.step(message)
        await action()
        await demo.pause()
        return True

    async def carol_adds_alice() -> None:
        await demo.clients["carol"].add_friends(["alice"])

    async def bob_crashes() -> None:
        await demo.crash_terminal()
        alice = demo.clients["alice/laptop"]
        if not await demo.wait_until(lambda: not alice.friends["bob"], 3 * demo.timing.timeout + 2):
            out.info("alice/laptop was not told that bob went offline in time", style="red")

    timeout = f"{demo.timing.timeout:g}s"
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        (
            "alice connects from her phone (lists bob and carol; nobody else is online)",
            lambda: demo.connect("alice/phone", "alice", ["bob", "carol"]),
        ),
        (
            "bob starts presence-client in a terminal (lists alice: mutual, both are told)",
            lambda: demo.start_terminal("bob", ["alice"]),
        ),
        (
            "carol connects (lists nobody yet; alice lists carol, not mutual: neither is told)",
            lambda: demo.connect("carol", "carol", []),
        ),
        (
            "dave connects (dave lists alice, alice does not list dave: neither is told)",
            lambda: demo.connect("dave", "dave", ["alice"]),
        ),
        (
            "erin connects (lists frank, who never shows up; unrelated: nobody is told)",
            lambda: demo.connect("erin", "erin", ["frank"]),
        ),
        (
            "carol adds alice: the friendship becomes mutual while both are online",
            carol_adds_alice,
        ),
        (
            "alice opens her laptop too (already online: nobody is told; the laptop learns)",
            lambda: demo.connect("alice/laptop", "alice", ["bob", "carol"]),
        ),
        (
            "alice closes the phone (still online on the laptop: nobody is told)",
            lambda: demo.disconnect("alice/phone"),
        ),
        (
            "dave disconnects (not mutual with anyone: nobody is told)",
            lambda: demo.disconnect("dave"),
        ),
        ("carol disconnects (alice is told)", lambda: demo.disconnect("carol")),
        (
            f"bob's terminal crashes (killed, no goodbye): after the {timeout} timeout the "
            "daemon drops it and alice is told",
            bob_crashes,
        ),
        (
            "carol comes back (alice is told)",
            lambda: demo.connect("carol", "carol", ["alice"]),
        ),
    ]
    assert len(steps) == STEPS
    for message, action in steps:
        if not await step(message, action):
            return


async def run(duration: float, seed: int | None, out: Output) -> int:
    """Run the demo; the exit code."""
    loop = asyncio.get_running_loop()
    timing = Timing.for_duration(duration)
    demo = Demo(out, timing, random.Random(seed))
    deadline = loop.time() + duration
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)

    async def body() -> tuple[int, str]:
        await demo.start()
        await script(demo, deadline)
        return await demo.summary()

    task = asyncio.create_task(body())
    stopper = asyncio.create_task(stop.wait())
    code, final = 0, ""
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            out.info("demo stopped by signal: cleaning up", style="yellow")
        else:
            try:
                code, final = task.result()
            except Exception as exc:
                out.info(f"{PROG}: error: {type(exc).__name__}: {exc}", style="bold red")
                code = 1
    finally:
        stopper.cancel()
        out.quiet = True  # what the goodbyes cause is not part of the script
        await demo.cleanup()
        for signum in signals:
            loop.remove_signal_handler(signum)
    if final:  # last, after everything is stopped
        out.info(final, style="bold red" if code else "bold green")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The ``presence-demo`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args.duration, args.seed, Output()))


if __name__ == "__main__":
    sys.exit(main())
