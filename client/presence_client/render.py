"""Pure rendering for the terminal client: event lines and the live view.

Nothing here touches a terminal, a socket or a clock: :func:`render_event_line` turns an
SDK event into the stable one-line format of plain mode, and :func:`render_view` turns a
:class:`ViewState` into a rich renderable for the live mode. Tests call them directly.

Plain-mode lines (one per event, stable and parseable)::

    connected server=127.0.0.1:13131
    friend bob online
    friend bob offline
    reconnecting server=127.0.0.1:13132
    disconnected
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from presence_client.sdk import Event, FriendEvent, Server

LOG_LINES: Final = 10
"""How many recent transitions the live view keeps."""


def format_server(server: Server | None) -> str:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6), or ``-`` for no server."""
    if server is None:
        return "-"
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def state_word(online: bool) -> str:
    return "online" if online else "offline"


def render_event_line(event: Event) -> str:
    """The plain-mode line for one event, e.g. ``friend bob online``."""
    if isinstance(event, FriendEvent):
        return f"friend {event.name} {state_word(event.online)}"
    if event.status == "kicked":
        return "disconnected by an operator"
    if event.server is None:
        return event.status
    return f"{event.status} server={format_server(event.server)}"


def render_friend_lines(friends: Mapping[str, bool]) -> list[str]:
    """One ``friend NAME online|offline`` line per friend, in the mapping's order."""
    return [render_event_line(FriendEvent(name, online)) for name, online in friends.items()]


@dataclass
class ViewState:
    """Everything the live view shows; updated with :meth:`apply` and :meth:`sync`.

    ``friends`` maps each declared friend to online, offline, or None for unknown: nothing
    is known before the first connection, and what was known goes stale the moment the
    connection is lost, so every friend shows unknown until the next one is made.
    """

    user: str
    friends: dict[str, bool | None]
    servers: Sequence[Server] = ()
    status: str = "connecting"
    server: Server | None = None
    log: deque[tuple[datetime, str]] = field(default_factory=lambda: deque(maxlen=LOG_LINES))

    def apply(self, event: Event, now: datetime) -> None:
        """Fold one event into the state; a friend event that changes nothing is ignored."""
        if isinstance(event, FriendEvent):
            if self.friends.get(event.name) == event.online:
                return
            self.friends[event.name] = event.online
            self.log.append((now, f"{event.name} is {state_word(event.online)}"))
            return
        self.status = event.status
        self.server = event.server
        if event.status != "connected":
            self.friends = dict.fromkeys(self.friends)
        where = f" to {format_server(event.server)}" if event.server is not None else ""
        self.log.append((now, f"{event.status}{where}"))

    def sync(self, friends: Mapping[str, bool | None]) -> None:
        """Take the client's current friend states (names and what is known of them);
        while not connected every friend stays unknown."""
        if self.status == "connected":
            self.friends = dict(friends)
        else:
            self.friends = dict.fromkeys(friends)


_STATUS_STYLES: Final = {
    "connected": "bold green",
    "connecting": "yellow",
    "reconnecting": "bold yellow",
    "disconnected": "bold red",
    "kicked": "bold red",
}


def render_view(state: ViewState) -> RenderableType:
    """The live view: status line, friends table, recent transitions, key help."""
    header = Text()
    header.append("presence-client  ", style="bold")
    header.append("user ")
    header.append(state.user, style="bold cyan")
    header.append("  status ")
    header.append(state.status, style=_STATUS_STYLES.get(state.status, ""))
    if state.server is not None:
        header.append(f"  server {format_server(state.server)}")
    elif state.servers:
        header.append("  servers " + ", ".join(format_server(s) for s in state.servers))

    table = Table(title="friends", title_justify="left", expand=False)
    table.add_column("friend", style="bold")
    table.add_column("status")
    if not state.friends:
        table.add_row(Text("(no friends declared)", style="dim"), "")
    for name, online in state.friends.items():
        if online is None:
            table.add_row(Text(name, style="dim"), Text("? unknown", style="dim italic"))
        elif online:
            table.add_row(name, Text("● online", style="bold green"))
        else:
            table.add_row(Text(name, style="dim"), Text("○ offline", style="dim"))

    log = Text()
    for i, (when, text) in enumerate(state.log):
        if i:
            log.append("\n")
        log.append(when.strftime("%H:%M:%S"), style="dim")
        log.append("  " + text)
    if not state.log:
        log.append("(nothing yet)", style="dim")
    panel = Panel(log, title="recent changes", title_align="left")

    footer = Text("q or Ctrl-C to quit", style="dim")
    return Group(header, table, panel, footer)
