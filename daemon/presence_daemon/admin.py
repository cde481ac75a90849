"""``presence-admin``: operator commands on the presence state in Redis.

Theory of operation
-------------------
Every command reads (or, for ``set-friends``, changes) the state the daemons keep in
Redis, with the same client the daemon builds for the same URL (single Redis or
``redis+cluster://``). No daemon is asked anything: what Redis holds is the truth.

Commands are one function each, registered with :func:`subcommand`; each returns a
:class:`Result`, which holds one JSON-ready document (printed with ``--json``) and the
text for people (an aligned table). Adding a command means writing one more decorated
function. A command that prints as it goes (a stream) prints itself (``args.json``
says how) and returns a Result whose ``data`` is None.

Listing users (``online``) is a keyspace scan: SCAN with a MATCH pattern over every
key (on a cluster, over every master), so its cost grows with the whole keyspace, not
with the number of users online. ``--list`` pages with a cursor that names the master
being scanned, its SCAN cursor, and the users of the last SCAN batch not shown yet (a
batch can hold more users than the page has room for); SCAN's guarantees hold: a user
online for the whole listing is listed, and one who comes or goes meanwhile may or may
not be.

Exit codes: 0 done; 1 Redis unreachable, refusing the credentials or failing a command;
2 a bad argument (the message names it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from redis.asyncio import RedisCluster
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_client.protocol import ProtocolError, check_name, is_valid_name
from presence_daemon import keys
from presence_daemon.config import Config, package_version, safe_url
from presence_daemon.presence import (
    DEFAULT_MAX_FRIENDS,
    Presence,
    PresenceError,
    StreamGap,
    redis_client,
)
from presence_daemon.store import (
    CLUSTER_SCHEMES,
    ClusterURLError,
    Store,
    is_cluster_url,
    parse_cluster_url,
)

PROG: Final = "presence-admin"
URL_VARIABLE: Final = "PRESENCE_REDIS_URL"
DEFAULT_REDIS_URL: Final = str(Config.__dataclass_fields__["redis_url"].default)
"""The daemon's default."""
REDIS_TIMEOUT: Final = 5.0
"""Seconds one Redis call may take."""
DEFAULT_PAGE: Final = 100
"""Users per ``online --list`` page unless ``--limit`` says otherwise."""
MAX_PAGE: Final = 10_000
COUNT_SCAN: Final = 1000
"""SCAN COUNT (keys looked at per call) while counting."""
CLIENTS_KEY_RE: Final = re.compile(
    "^" + re.escape(keys.PREFIX) + r":\{(?P<user>[^{}:|]+)\}:clients$"
)
"""A user's clients hash; it exists exactly while the user has a client (is online)."""
CLIENTS_MATCH: Final = f"{keys.PREFIX}:{{*}}:clients"
"""SCAN MATCH pattern for the clients hashes ({ and } are not special in a pattern)."""


class UsageError(ValueError):
    """A bad argument found after parsing (a cursor that does not fit, say); exit 2."""


# ---------------------------------------------------------------------------
# Results and tables.


@dataclass(frozen=True, slots=True)
class Result:
    """What a command answers: one JSON document, and the text for people."""

    data: dict[str, Any] | None
    """Printed with ``--json`` (keys documented in docs/operations.md); None: nothing
    more to print (the command printed as it went)."""
    text: str
    """Printed otherwise."""


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str) -> str:
    """An aligned table with a header row; ``empty`` alone if there are no rows.
    Numbers are right-aligned, everything else left-aligned."""
    if not rows:
        return empty
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


# ---------------------------------------------------------------------------
# The subcommand table.


@dataclass(frozen=True, slots=True)
class Context:
    """What every command gets: the Redis client and the URL it was built from."""

    redis: Store
    url: str

    @property
    def cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

    async def now_ms(self) -> int:
        """Redis's clock, in milliseconds (on a cluster, one node's)."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


Run = Callable[[Context, argparse.Namespace], Awaitable[Result]]
Arguments = Callable[[argparse.ArgumentParser], None]
Check = Callable[[argparse.Namespace], None]
"""Checks parsed arguments before Redis is reached; raises UsageError."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _no_check(args: argparse.Namespace) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Subcommand:
    """One ``presence-admin`` command."""

    name: str
    help: str
    arguments: Arguments
    run: Run
    check: Check = _no_check


SUBCOMMANDS: dict[str, Subcommand] = {}
"""Every command, by name, in the order registered (the order ``--help`` lists them)."""


def subcommand(
    name: str, help: str, arguments: Arguments = _no_arguments, check: Check = _no_check
) -> Callable[[Run], Run]:
    """Register ``run`` as the command ``name``; ``arguments`` adds its arguments,
    ``check`` refuses bad combinations before Redis is reached."""

    def register(run: Run) -> Run:
        SUBCOMMANDS[name] = Subcommand(name, help, arguments, run, check)
        return run

    return register


def name_type(what: str) -> Callable[[str], str]:
    """argparse type of a name (user name, client id...): the one line on a bad name
    names it and says what a name may hold."""

    def parse(text: str) -> str:
        try:
            return check_name(text, what)
        except ProtocolError:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r} (1-64 letters, digits, '_', '.', '@', '+' or '-')"
            ) from None

    return parse


user_name = name_type("user name")


def _positive(most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} (expected 1-{most})")
        return value

    return parse


# ---------------------------------------------------------------------------
# online


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where an ``online --list`` page ends: the master being scanned ('' on a single
    Redis; None once every master is done), its SCAN cursor, and the users already
    read from Redis but not shown yet."""

    node: str | None
    scan: int
    held: tuple[str, ...] = ()

    def encode(self) -> str:
        raw = json.dumps([self.node, self.scan, list(self.held)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Raises UsageError naming ``text`` if it is not a cursor this command gave."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            node, scan, held = json.loads(raw)
            if not (node is None or type(node) is str) or type(scan) is not int or scan < 0:
                raise ValueError
            if type(held) is not list or not all(is_valid_name(u) for u in held):
                raise ValueError
            return cls(node, scan, tuple(held))
        except (ValueError, TypeError, binascii.Error):
            raise UsageError(
                f"--cursor: invalid value {text!r} (not a cursor a page gave)"
            ) from None


async def _masters(ctx: Context) -> list[str]:
    """The nodes to scan: '' for a single Redis, else every master's host:port, sorted."""
    if not isinstance(ctx.redis, RedisCluster):
        return [""]
    await ctx.redis.initialize()
    return sorted(node.name for node in ctx.redis.get_primaries())


async def _scan(ctx: Context, node: str, cursor: int, count: int) -> tuple[int, list[str]]:
    """One SCAN call for clients hashes (on ``node``, a master of a cluster): the next
    cursor and the users whose hash it found."""
    args = ("SCAN", cursor, "MATCH", CLIENTS_MATCH, "COUNT", count)
    if isinstance(ctx.redis, RedisCluster):
        target = ctx.redis.get_node(node_name=node)
        if target is None:
            raise RedisError(f"cluster node {node} went away during the scan")
        reply = await ctx.redis.execute_command(*args, target_nodes=target)
    else:
        reply = await ctx.redis.execute_command(*args)  # type: ignore[no-untyped-call]
    next_cursor, found = reply
    if isinstance(next_cursor, dict):  # the cluster client answers {node name: cursor}
        (next_cursor,) = next_cursor.values()
    users = []
    for key in found:
        match = CLIENTS_KEY_RE.match(key.decode() if isinstance(key, bytes) else str(key))
        if match:
            users.append(match["user"])
    return int(next_cursor), users


async def online_count(ctx: Context) -> int:
    """How many users are online: a full keyspace scan (every master of a cluster)."""
    total = 0
    for node in await _masters(ctx):
        cursor = 0
        while True:
            cursor, users = await _scan(ctx, node, cursor, COUNT_SCAN)
            total += len(users)
            if cursor == 0:
                break
    return total


async def online_page(
    ctx: Context, limit: int, after: Cursor | None
) -> tuple[list[str], Cursor | None]:
    """At most ``limit`` online users, in SCAN order, from where ``after`` ended (None:
    the start); and the cursor of the next page (None after the last one)."""
    nodes = await _masters(ctx)
    cursor = after or Cursor(nodes[0], 0)
    users: list[str] = []
    if cursor.held:  # read earlier: show only those still online
        still = await Presence(ctx.redis, lease_ttl=None).query(cursor.held)
        users += [user for user in cursor.held if still[user]]
    node = cursor.node
    if node is not None and node not in nodes:
        if node == "" or nodes == [""]:
            kind = "a single Redis" if node == "" else "a cluster"
            raise UsageError(f"--cursor: {cursor.encode()!r} is from a listing of {kind}")
        raise UsageError(
            f"--cursor: {node} is not a master now (masters: {', '.join(nodes)}): the "
            "topology changed; list again from the start"
        )
    scan = cursor.scan
    while node is not None and len(users) < limit:
        # SCAN COUNT is how many slots of the keyspace to look at: asking for what the
        # page still needs keeps the users read beyond it (held in the cursor) few.
        count = min(max(limit - len(users), 10), COUNT_SCAN)
        scan, found = await _scan(ctx, node, scan, count)
        users += found
        if scan == 0:  # this node is done: the next master (from its start), or the end
            index = nodes.index(node) + 1
            node = nodes[index] if index < len(nodes) else None
    page, held = users[:limit], tuple(users[limit:])
    if node is None and not held:
        return page, None
    return page, Cursor(node, scan, held)


def _online_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", action="store_true", help="how many users are online")
    what.add_argument("--list", action="store_true", help="one page of online users")
    parser.add_argument(
        "--limit",
        type=_positive(MAX_PAGE),
        default=DEFAULT_PAGE,
        metavar="N",
        help=f"users per page with --list (default {DEFAULT_PAGE})",
    )
    parser.add_argument(
        "--cursor", metavar="C", help="with --list: the page after the one that gave C"
    )


def _online_check(args: argparse.Namespace) -> None:
    if args.count and args.cursor is not None:
        raise UsageError("--cursor: only with --list")
    args.after = Cursor.decode(args.cursor) if args.cursor is not None else None


@subcommand(
    "online",
    "users online: --count, or --list one page (a keyspace scan: costs O(all keys))",
    _online_arguments,
    _online_check,
)
async def online(ctx: Context, args: argparse.Namespace) -> Result:
    if args.count:
        count = await online_count(ctx)
        return Result({"online": count}, f"{count} user{'s' if count != 1 else ''} online")
    users, next_cursor = await online_page(ctx, args.limit, args.after)
    encoded = next_cursor.encode() if next_cursor is not None else None
    data = {"users": users, "next_cursor": encoded, "last_page": encoded is None}
    text = table(["USER"], [[user] for user in users], empty="no users online")
    if encoded is None:
        text += "\n(last page)"
    else:
        text += f"\n(more: --cursor {encoded})"
    return Result(data, text)


# ---------------------------------------------------------------------------
# query, friends, clients


def _users_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("users", nargs="+", type=user_name, metavar="USER", help="user names")


@subcommand("query", "online or offline, per user", _users_argument)
async def query(ctx: Context, args: argparse.Namespace) -> Result:
    users: list[str] = list(dict.fromkeys(args.users))
    found = await Presence(ctx.redis, lease_ttl=None).query(users)
    rows = [[user, "online" if found[user] else "offline"] for user in users]
    data = {"users": [{"user": user, "online": found[user]} for user in users]}
    return Result(data, table(["USER", "STATUS"], rows, empty="no users"))


def _user_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", type=user_name, metavar="USER", help="a user name")


@subcommand(
    "friends", "whom USER declared, who declared USER (fans), the mutual ones", _user_argument
)
async def friends(ctx: Context, args: argparse.Namespace) -> Result:
    user: str = args.user
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.smembers(keys.friends_key(user))
    pipe.smembers(keys.fans_key(user))
    declared_raw, fans_raw = await pipe.execute()
    declared, fans = {str(n) for n in declared_raw}, {str(n) for n in fans_raw}
    names = sorted(declared | fans)
    status = await Presence(ctx.redis, lease_ttl=None).query(names) if names else {}
    data = {
        "user": user,
        "friends": sorted(declared),
        "fans": sorted(fans),
        "mutual": sorted(declared & fans),
        "online": [name for name in names if status[name]],
    }
    rows = [
        [name, name in declared, name in fans, name in declared and name in fans, status[name]]
        for name in names
    ]
    text = table(
        ["NAME", "DECLARED", "FAN", "MUTUAL", "ONLINE"],
        rows,
        empty=f"{user} declares no friends and nobody declares {user}",
    )
    return Result(data, text)


@subcommand("clients", "USER's clients: owning daemon, address, connected age", _user_argument)
async def clients(ctx: Context, args: argparse.Namespace) -> Result:
    user: str = args.user
    entries = await ctx.redis.hgetall(keys.clients_key(user))
    found = sorted(
        (str(client_id), str(entry).split("|", 2)) for client_id, entry in entries.items()
    )
    now = await ctx.now_ms()
    pipe = ctx.redis.pipeline(transaction=False)
    for client_id, _ in found:
        pipe.get(keys.client_key(client_id))
    owners = sorted({entry[1] for _, entry in found if len(entry) == 3})
    for owner in owners:
        pipe.exists(keys.lease_key(owner))
    replies = await pipe.execute() if found else []
    bindings, alive = replies[: len(found)], dict(zip(owners, replies[len(found) :], strict=True))
    listed = []
    for (client_id, entry), binding in zip(found, bindings, strict=True):
        token, owner, address = entry if len(entry) == 3 else ("", "", "")
        listed.append(
            {
                "client_id": client_id,
                "owner": owner,
                "owner_alive": bool(alive.get(owner)),
                "address": address,
                "connected_seconds": _age(binding, user, token, now),
            }
        )
    rows = [
        [c["client_id"], c["owner"], c["owner_alive"], c["address"], c["connected_seconds"]]
        for c in listed
    ]
    text = table(
        ["CLIENT", "DAEMON", "DAEMON ALIVE", "ADDRESS", "CONNECTED (s)"],
        rows,
        empty=f"{user} has no clients connected",
    )
    return Result({"user": user, "clients": listed}, text)


def _age(binding: Any, user: str, token: str, now_ms: int) -> float | None:
    """Seconds since the session began, from the client id's binding
    ("user|token|claimed_ms"); None if the binding is of another session."""
    if binding is None:
        return None
    parts = str(binding).split("|")
    if len(parts) != 3 or parts[0] != user or parts[1] != token or not parts[2].isdigit():
        return None
    return round(max(0, now_ms - int(parts[2])) / 1000, 1)


# ---------------------------------------------------------------------------
# daemons


@subcommand("daemons", "live daemons (lease held), and dead ones whose clients await reaping")
async def daemons(ctx: Context, args: argparse.Namespace) -> Result:
    owners = sorted(str(o) for o in await ctx.redis.smembers(keys.OWNERS_KEY))
    pipe = ctx.redis.pipeline(transaction=False)
    for owner in owners:
        pipe.pttl(keys.lease_key(owner))
        pipe.scard(keys.owned_key(owner))
    replies = await pipe.execute() if owners else []
    listed = []
    for i, owner in enumerate(owners):
        ttl, held = int(replies[2 * i]), int(replies[2 * i + 1])
        if ttl < 0 and held == 0:
            continue  # registered, gone, nothing left to reap
        listed.append(
            {
                "instance_id": owner,
                "clients": held,
                "lease_seconds": round(ttl / 1000, 1) if ttl >= 0 else None,
                "state": "live" if ttl >= 0 else "awaiting_reaping",
            }
        )
    rows = [
        [d["instance_id"], d["clients"], d["lease_seconds"], str(d["state"]).replace("_", " ")]
        for d in listed
    ]
    text = table(["DAEMON", "CLIENTS", "LEASE LEFT (s)", "STATE"], rows, empty="no live daemons")
    return Result({"daemons": listed}, text)


# ---------------------------------------------------------------------------
# set-friends


def _set_friends_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", type=user_name, metavar="USER", help="a user name")
    names = parser.add_mutually_exclusive_group(required=True)
    names.add_argument(
        "names", nargs="*", type=user_name, metavar="NAME", default=[], help="the new list"
    )
    names.add_argument("--none", action="store_true", help="clear USER's list")
    parser.add_argument(
        "--max-friends",
        type=_positive(100_000),
        default=DEFAULT_MAX_FRIENDS,
        metavar="N",
        help=f"most friends allowed, as the daemons' --max-friends (default {DEFAULT_MAX_FRIENDS})",
    )


def _set_friends_check(args: argparse.Namespace) -> None:
    names = set(args.names)
    if not args.none and not names:
        raise UsageError("set-friends: give NAME... or --none")
    if len(names) > args.max_friends:
        raise UsageError(
            f"set-friends: {len(names)} names, more than --max-friends {args.max_friends}"
        )


@subcommand(
    "set-friends",
    "replace USER's declared friends (friends are told, as when a client declares them)",
    _set_friends_arguments,
    _set_friends_check,
)
async def set_friends(ctx: Context, args: argparse.Namespace) -> Result:
    user: str = args.user
    names: list[str] = [] if args.none else list(dict.fromkeys(args.names))
    # No lease: the admin owns no clients; its notifications go to the owners' inboxes.
    presence = Presence(ctx.redis, lease_ttl=None, max_friends=args.max_friends)
    try:
        await presence.start()
        await presence.set_friends(user, names)
        now = sorted(await presence.friends(user))
    finally:
        # (Waits briefly for a fan-out that is being retried; closes the client too.)
        await presence.close()
    text = f"{user} now declares: {', '.join(now)}" if now else f"{user} now declares no friends"
    return Result({"user": user, "friends": now}, text)


def _watch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--after",
        metavar="ID",
        default=None,
        help="resume after this entry id (as printed); '0' starts from the oldest entry "
        "kept; default: only transitions from now on",
    )
    parser.add_argument(
        "--limit",
        type=_positive(10_000_000),
        default=None,
        metavar="N",
        help="stop after N transitions (default: run until interrupted)",
    )


def _watch_check(args: argparse.Namespace) -> None:
    after = args.after
    if after is not None and after != "0" and not re.fullmatch(r"\d+-\d+", after):
        raise UsageError(
            f"watch: --after: invalid value {after!r} (expected an entry id MS-SEQ, or 0)"
        )


@subcommand(
    "watch",
    "print transitions as they happen, from every daemon (resumable with --after ID)",
    _watch_arguments,
    _watch_check,
)
async def watch(ctx: Context, args: argparse.Namespace) -> Result:
    """One line per transition (``--json``: one JSON object per line), flushed as it
    comes; ends after ``--limit`` entries, or on Ctrl-C."""
    presence = Presence(ctx.redis, lease_ttl=None)
    shown = 0
    try:
        async for entry in presence.watch(after=args.after):
            t = entry.transition
            if args.json:
                line = json.dumps(
                    {
                        "id": entry.id,
                        "user": t.user,
                        "online": t.online,
                        "version": t.version,
                        "decided_ms": entry.decided_ms,
                        "decided_by": entry.decided_by,
                        "retold": entry.retold,
                    },
                    ensure_ascii=False,
                )
            else:
                when = time.strftime("%H:%M:%S", time.localtime(entry.decided_ms / 1000))
                state = "online" if t.online else "offline"
                again = "  (told again)" if entry.retold else ""
                line = (
                    f"{when}.{entry.decided_ms % 1000:03d}  {t.user}  {state}  "
                    f"by {entry.decided_by}  id {entry.id}{again}"
                )
            print(line, flush=True)
            shown += 1
            if args.limit is not None and shown >= args.limit:
                break
    except StreamGap as exc:
        raise StreamLost(
            f"{exc}; watch again with --after 0 (the oldest kept) or without --after"
        ) from None
    finally:
        await presence.close()
    return Result(None, "")


class StreamLost(Exception):
    """The entries after ``--after`` are gone (exit 1, one line)."""


def _client_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("client", type=name_type("client id"), metavar="CLIENT", help="a client id")


@subcommand(
    "kick",
    "disconnect a client (friends are told if it was its user's last; the client is "
    "asked not to reconnect)",
    _client_argument,
)
async def kick(ctx: Context, args: argparse.Namespace) -> Result:
    presence = Presence(ctx.redis, lease_ttl=None)
    try:
        await presence.start()
        kicked = await presence.kick(args.client)
    finally:
        await presence.close()
    text = f"kicked {args.client}" if kicked else f"{args.client} is not connected"
    return Result({"client": args.client, "kicked": kicked}, text)


# ---------------------------------------------------------------------------
# The command line.


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """``presence-admin [--redis-url URL] [--json] COMMAND ...``."""
    parser = _OneLineParser(
        prog=PROG,
        description="Operator commands on the presence state in Redis (single or cluster).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _global_options(parser, None, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(sub)
        # Also after the command (``presence-admin daemons --json``); given there, they
        # win; not given, they leave the values before the command alone.
        _global_options(sub, argparse.SUPPRESS, argparse.SUPPRESS)
    return parser


def _global_options(parser: argparse.ArgumentParser, url: Any, as_json: Any) -> None:
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        default=url,
        help=f"Redis (redis://, rediss://, unix://) or cluster seeds (redis+cluster://...); "
        f"default ${URL_VARIABLE}, else {DEFAULT_REDIS_URL}",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=as_json,
        help="print one JSON document (for scripts)",
    )


def _url(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> tuple[str, str]:
    """The Redis URL and where it came from (flag, variable or default)."""
    if args.redis_url is not None:
        return args.redis_url, "--redis-url"
    if environ.get(URL_VARIABLE):
        return environ[URL_VARIABLE], URL_VARIABLE
    return DEFAULT_REDIS_URL, "--redis-url"


def _check_url(url: str, source: str) -> None:
    if not url.startswith(("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)):
        raise UsageError(
            f"{source}: invalid value {safe_url(url)!r} (expected a redis://, rediss://, "
            "unix://, redis+cluster:// or rediss+cluster:// URL)"
        )
    if is_cluster_url(url):
        try:
            parse_cluster_url(url)
        except ClusterURLError as exc:
            raise UsageError(f"{source}: {safe_url(str(exc))}") from None


async def _run(command: Subcommand, args: argparse.Namespace, url: str) -> Result:
    try:
        redis = redis_client(url, max_connections=8, timeout=REDIS_TIMEOUT)
    except ValueError as exc:  # redis-py refuses the URL itself
        raise UsageError(f"--redis-url: {exc}") from None  # (it names no password)
    try:
        try:
            await redis.ping()  # unreachable or refusing us: one clear error up front
        except (RedisError, RedisClusterException, OSError) as exc:
            refused = _cause(exc, AuthenticationError)
            if refused is not None:  # (a cluster client wraps it: find it)
                raise refused from None
            raise Unreachable(_one_line(exc)) from None
        return await command.run(Context(redis, url), args)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await redis.aclose()


class Unreachable(Exception):
    """Redis did not answer the first command (the message says why)."""


def _cause(exc: BaseException, kind: type[AuthenticationError]) -> AuthenticationError | None:
    """``exc`` or the first of its causes that is a ``kind``."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0, 1 for Redis trouble, 2 for bad input)."""
    args = build_parser().parse_args(argv)
    url, source = _url(args, os.environ)
    command = SUBCOMMANDS[args.command]
    try:
        command.check(args)
        _check_url(url, source)
        result = asyncio.run(_run(command, args, url))
    except UsageError as exc:
        return _fail(str(exc), 2)
    except AuthenticationError:
        return _fail(_credentials_refused(url), 1)
    except BrokenPipeError:  # (watch | head): the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Unreachable, RedisConnectionError, RedisTimeoutError, OSError) as exc:
        return _fail(f"cannot reach Redis at {safe_url(url)}: {_one_line(exc)}", 1)
    except RedisError as exc:
        return _fail(f"Redis at {safe_url(url)} failed: {_one_line(exc)}", 1)
    except (PresenceError, StreamLost) as exc:  # the message says why
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback for an operator: one line to report
        return _fail(f"internal error: {type(exc).__name__}: {_one_line(exc)}", 1)
    try:
        if result.data is None:
            pass
        elif args.json:
            print(json.dumps(result.data, ensure_ascii=False))
        else:
            print(result.text)
        sys.stdout.flush()
    except BrokenPipeError:  # (| head): the reader has what it wanted
        # Python flushes stdout again at exit: point it at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _credentials_refused(url: str) -> str:
    """The one line for a Redis that refused our credentials (or their absence)."""
    authority = url.partition("://")[2].partition("/")[0]
    if ":" in authority.rpartition("@")[0] or re.search(r"[?&]password=", url):
        why = "wrong user name or password (or the user is disabled)"
    else:
        why = "it needs a password (redis://[USER]:PASSWORD@HOST:PORT/DB) and the URL has none"
    return f"Redis at {safe_url(url)} refused the connection: {why}"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
