"""``presence-client``: a terminal client of the presence service.

Two ways in:

* ``presence-client --user alice --friend bob --friend carol`` (non-interactive);
* ``presence-client`` alone, like the original Lockwood client: it asks for the user
  name, then friend names one per line, an empty line to finish. When stdin is not a
  terminal the same lines are read from it without prompts, so the flow is scriptable:
  ``printf 'alice\\nbob\\n\\n' | presence-client``.

When stdout is a terminal (and ``--plain`` is not given) a live view shows the friends,
the connection and the last transitions; otherwise one line per event is printed (see
:mod:`presence_client.render`). ``q`` (plus Enter in line mode), Ctrl-C or SIGTERM
disconnect cleanly and exit 0; ``--duration`` exits by itself. End of stdin does not
quit. No daemon answering exits 1; a bad command-line value exits 2 with one line.
An operator disconnecting the client (GO_AWAY kicked) shows "disconnected by an
operator" and exits 3, without reconnecting.

Before a connection is made, ``q`` quits at once (exit 0, silently), Ctrl-C or SIGTERM
exit 128 + the signal number (130, 143) and the end of ``--duration`` exits 1, these
two with one line on stderr naming the server(s); none prints "disconnected".
``python -m presence_client`` runs the same program.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, NoReturn, TextIO

from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler

from presence_client import __version__
from presence_client.protocol import MAX_NAME_CHARS, ProtocolError, normalize_name
from presence_client.render import (
    ViewState,
    format_server,
    render_event_line,
    render_friend_lines,
    render_view,
)
from presence_client.sdk import (
    DEFAULT_PORT,
    Event,
    FriendEvent,
    PresenceClient,
    PresenceClientError,
    Server,
    StatusEvent,
    TokenSource,
    parse_server,
)

PROG: Final = "presence-client"
EXIT_KICKED: Final = 3
"""Exit code after an operator disconnected the client."""
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
NAME_RULE: Final = (
    f"1-{MAX_NAME_CHARS} letters (any script), digits, '_', '.', '@', '+' or '-'; "
    "no spaces or symbols"
)
QUIT_WORDS: Final = frozenset({"q", "quit", "exit"})
DISTRIBUTION: Final = "presence-client"


def package_version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return __version__


class UsageError(Exception):
    """A bad command line or input; the message is one line naming the bad value."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad value in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _canonical_name(text: str) -> str | None:
    """The canonical form of a name typed by a person (fullwidth letters made halfwidth,
    NFC; case kept), or None if it is no valid name."""
    try:
        return normalize_name(text)
    except ProtocolError:
        return None


def _name_type(what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        name = _canonical_name(text)
        if name is None:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r} (expected {NAME_RULE})")
        return name

    return check


def _server_type(text: str) -> Server:
    try:
        return parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(what: str, cast: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse ``type`` accepting numbers > 0, naming ``what`` when refusing one."""

    def check(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r} (expected > 0)")
        return value

    return check


@dataclass(frozen=True, slots=True)
class Options:
    """The parsed command line."""

    user: str | None
    friends: tuple[str, ...]
    servers: tuple[Server, ...]
    client_id: str | None
    plain: bool
    duration: float | None
    log_level: str
    connect_attempts: int
    token: str | None = None
    token_file: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description=(
            "Terminal client of the presence service: shows which of your friends are "
            "online (a friend is shown online only if you list each other). Without "
            "--user, asks for the user name and then friend names, one per line, an "
            "empty line to finish (read from stdin without prompts when it is not a "
            "terminal). q + Enter, Ctrl-C or SIGTERM quit."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    parser.add_argument("--user", type=_name_type("user name"), help="who you are")
    parser.add_argument(
        "--friend",
        dest="friends",
        action="append",
        default=[],
        type=_name_type("friend name"),
        metavar="NAME",
        help="a friend to declare (repeat for more)",
    )
    parser.add_argument(
        "--server",
        dest="servers",
        action="append",
        default=[],
        type=_server_type,
        metavar="HOST:PORT",
        help=f"daemon to use; repeat for a failover list (default 127.0.0.1:{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--client-id", type=_name_type("client id"), help="this client's id (default random)"
    )
    parser.add_argument("--plain", action="store_true", help="print one line per event")
    parser.add_argument(
        "--duration",
        type=positive("duration", float),
        metavar="SECONDS",
        help="disconnect and exit after this many seconds",
    )
    parser.add_argument(
        "--connect-attempts",
        type=positive("connect attempts", int),
        default=8,
        metavar="N",
        help="attempts (along the server list) before giving up (default 8)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("PRESENCE_TOKEN") or None,
        metavar="JWT",
        help="login token from the application, for a daemon with auth [env PRESENCE_TOKEN]",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the login token from this file before every connect (so a process "
        "that renews it there keeps reconnects working)",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="warning", help="(default warning)"
    )
    return parser


def _token_source(opts: Options) -> TokenSource | None:
    """The token option, or a function reading the token file at each connect."""
    path = opts.token_file
    if path is None:
        return opts.token

    def read() -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise PresenceClientError(
                f"cannot read --token-file {path!r}: {exc.strerror}"
            ) from None

    return read


def parse_args(argv: Sequence[str] | None) -> Options:
    """Parse the command line; raises UsageError (one line) for a bad value."""
    args = build_parser().parse_args(argv)
    if args.user is not None and args.user in args.friends:
        raise UsageError(f"--friend {args.user!r} is you (--user {args.user!r}): list others")
    return Options(
        user=args.user,
        friends=tuple(args.friends),
        servers=tuple(args.servers) or (("127.0.0.1", DEFAULT_PORT),),
        client_id=args.client_id,
        plain=args.plain,
        duration=args.duration,
        log_level=args.log_level,
        connect_attempts=int(args.connect_attempts),
        token=args.token,
        token_file=args.token_file,
    )


# -- stdin ---------------------------------------------------------------------------


class LineSource:
    """Lines from a file descriptor, read with ``os.read`` (no hidden buffering), so the
    same descriptor can first answer the name prompts and later carry ``q``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    @property
    def is_tty(self) -> bool:
        return os.isatty(self.fd)

    def read_chunk(self) -> bytes:
        """Whatever is buffered, else one read (blocking); b"" at end of input."""
        if self.buffer:
            chunk, self.buffer = self.buffer, b""
            return chunk
        return self._read()

    def _read(self) -> bytes:
        """One ``os.read`` (blocking); b"" and ``eof`` set at end of input."""
        if self.eof:
            return b""
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
        return chunk

    def readline(self) -> str | None:
        """The next line without its newline (blocking); None at end of input."""
        while b"\n" not in self.buffer and not self.eof:
            self.buffer += self._read()
        if not self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace").rstrip("\r")


def _stdin_source() -> LineSource | None:
    """stdin as a LineSource, or None when there is no usable stdin descriptor."""
    try:
        return LineSource(sys.stdin.fileno()) if sys.stdin is not None else None
    except (OSError, ValueError, AttributeError):
        return None


def read_names(
    source: LineSource, prompt: Callable[[str], None] | None, err: TextIO
) -> tuple[str, list[str]]:
    """The Lockwood flow: a user name, then friend names until an empty line or EOF.

    ``prompt`` (interactive only) shows a prompt; a bad name is reported on ``err`` in
    one line and asked again. Raises UsageError when input ends before a user name.
    """
    user: str | None = None
    while user is None:
        if prompt is not None:
            prompt("user name: ")
        line = source.readline()
        if line is None:
            raise UsageError("no user name given (use --user, or type it on stdin)")
        name = line.strip()
        if not name:
            continue
        user = _canonical_name(name)
        if user is None:
            print(f"invalid user name {name!r}: expected {NAME_RULE}", file=err, flush=True)
    friends: list[str] = []
    while True:
        if prompt is not None:
            prompt("friend (empty line to finish): ")
        line = source.readline()
        name = "" if line is None else line.strip()
        if not name:
            return user, friends
        friend = _canonical_name(name)
        if friend is None:
            print(f"invalid friend name {name!r}: expected {NAME_RULE}", file=err, flush=True)
        elif friend == user:
            print(f"friend name {name!r} is you: list others", file=err, flush=True)
        else:
            friends.append(friend)


def _watch_input(
    loop: asyncio.AbstractEventLoop, source: LineSource, single_keys: bool, quit: Callable[[], None]
) -> None:
    """Call ``quit`` (in the loop) on ``q`` (+ Enter unless ``single_keys``); EOF is ignored."""

    def run() -> None:
        while True:
            if single_keys:
                chunk = source.read_chunk()
                if not chunk:
                    return
                wanted = b"q" in chunk.lower()
            else:
                line = source.readline()
                if line is None:
                    return
                wanted = line.strip().lower() in QUIT_WORDS
            if wanted:
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(quit)
                return

    # A daemon thread blocked in os.read does not keep the process alive.
    threading.Thread(target=run, name="stdin", daemon=True).start()


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    """Single keys without echo on a terminal; restores the terminal afterwards."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- displays ------------------------------------------------------------------------


class PlainDisplay:
    """One flushed line per event; the full friend picture after the first connect."""

    def __init__(self, client: PresenceClient, out: TextIO) -> None:
        self.client = client
        self.out = out
        self.shown: dict[str, bool] = {}
        self.connected_once = False

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        return None

    def emit(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # stdout gone: nothing to tell
            self.out.write(line + "\n")
            self.out.flush()

    def on_event(self, event: Event) -> None:
        if isinstance(event, FriendEvent):
            # Before the first connect line, the initial states are printed in full below.
            if self.connected_once and self.shown.get(event.name) != event.online:
                self.shown[event.name] = event.online
                self.emit(render_event_line(event))
            return
        self.emit(render_event_line(event))
        if event.status == "connected" and not self.connected_once:
            self.connected_once = True
            self.shown.update(self.client.friends)
            for line in render_friend_lines(self.client.friends):
                self.emit(line)


class LiveDisplay:
    """A rich Live view of :class:`ViewState`, redrawn on every event."""

    def __init__(self, client: PresenceClient, state: ViewState, console: Console) -> None:
        self.client = client
        self.state = state
        self.live = Live(
            render_view(state), console=console, auto_refresh=False, redirect_stderr=False
        )

    def __enter__(self) -> LiveDisplay:
        self.live.start(refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Draw the final state and stop (idempotent)."""
        if self.live.is_started:
            self.live.update(render_view(self.state), refresh=True)
            self.live.stop()

    def on_event(self, event: Event) -> None:
        self.state.apply(event, datetime.now())
        # Listeners run as the client emits, so its states are exactly as of this event.
        self.state.sync(self.client.friend_states)
        self.live.update(render_view(self.state), refresh=True)


# -- running -------------------------------------------------------------------------


async def run_client(
    opts: Options,
    user: str,
    friends: Sequence[str],
    source: LineSource | None,
    live: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Connect, show events until quit/signal/duration, disconnect; the exit code.

    Before the connection is made, ``q`` quits at once (exit 0), a signal exits
    128 + its number and the end of ``--duration`` exits 1 (see :func:`_not_connected`),
    with no "disconnected" line (there was no connection to end).
    """
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    client = PresenceClient(
        user,
        friends,
        servers=opts.servers,
        client_id=opts.client_id,
        connect_attempts=opts.connect_attempts,
        token=_token_source(opts),
    )
    display: PlainDisplay | LiveDisplay
    if live:
        console = Console(file=out)
        _setup_logging(opts.log_level, console)
        display = LiveDisplay(client, ViewState(user, client.friend_states, opts.servers), console)
    else:
        _setup_logging(opts.log_level, None)
        display = PlainDisplay(client, out)
    shown = True

    def show(event: Event) -> None:
        if shown:
            display.on_event(event)
        if isinstance(event, StatusEvent) and event.status == "kicked":
            stop.set()

    client.add_listener(show)
    single_keys = live and source is not None and source.is_tty
    keys = _cbreak(source.fd) if single_keys and source else contextlib.nullcontext()
    try:
        with keys, display:
            # Read keys from the start: q quits while connecting too, and in single-key
            # mode no key is left in the terminal for the shell after exit.
            if source is not None:
                _watch_input(loop, source, single_keys, stop.set)
            connecting = asyncio.create_task(client.connect())
            stopping = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait(
                    {connecting, stopping},
                    timeout=opts.duration,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not connecting.done():
                    connecting.cancel()
                    with contextlib.suppress(asyncio.CancelledError, PresenceClientError, OSError):
                        await connecting
                    shown = False  # never connected: no "disconnected" line
                    with contextlib.suppress(PresenceClientError):
                        await client.disconnect()  # closes the socket
                    display.close()
                    return _not_connected(opts, received, stop.is_set(), err)
                try:
                    connecting.result()
                except (PresenceClientError, OSError) as exc:
                    display.close()
                    print(f"{PROG}: error: could not connect: {exc}", file=err, flush=True)
                    return 1
                if opts.duration is None:
                    await stopping
                else:
                    remaining = opts.duration - (time.monotonic() - started)
                    await asyncio.wait({stopping}, timeout=max(0.0, remaining))
            finally:
                stopping.cancel()
            if client.kicked:
                shown = False  # (the "kicked" line said it all)
                await client.disconnect()  # (closed already: sends nothing)
                display.close()
                print(f"{PROG}: disconnected by an operator", file=err, flush=True)
                return EXIT_KICKED
            try:
                await client.disconnect()
            except PresenceClientError as exc:
                # The daemon drops the session after its timeout; say so, do not hide it.
                print(f"{PROG}: warning: {exc}", file=err, flush=True)
                return 1
        return 0
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _not_connected(opts: Options, received: Sequence[int], quit_typed: bool, err: TextIO) -> int:
    """Report a stop before any connection was made; the exit code."""
    servers = ", ".join(format_server(server) for server in opts.servers)
    if received:
        name = signal.Signals(received[0]).name
        print(f"{PROG}: {name} while connecting to {servers}: not connected", file=err, flush=True)
        return 128 + received[0]
    if quit_typed:
        return 0
    print(
        f"{PROG}: error: could not reach {servers} within --duration {opts.duration:g}s "
        "(no answer yet)",
        file=err,
        flush=True,
    )
    return 1


def _setup_logging(level: str, console: Console | None) -> None:
    handler: logging.Handler
    if console is not None:
        handler = RichHandler(console=console, show_path=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("presence_client")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """The ``presence-client`` command; returns the exit code."""
    out, err = sys.stdout, sys.stderr
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=err, flush=True)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    source = _stdin_source()
    user, friends = opts.user, list(opts.friends)
    try:
        if user is None:
            if source is None:
                raise UsageError("no user name given (use --user, or type it on stdin)")

            def prompt(text: str) -> None:
                err.write(text)
                err.flush()

            user, friends = read_names(source, prompt if source.is_tty else None, err)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=err, flush=True)
        return 2
    except KeyboardInterrupt:
        print(file=err)
        return 0
    live = not opts.plain and out.isatty()
    return asyncio.run(run_client(opts, user, friends, source, live, out, err))


if __name__ == "__main__":
    sys.exit(main())
