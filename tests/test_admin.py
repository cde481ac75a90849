"""``presence-admin`` end to end: the installed command, run as a process, against real
daemons with real SDK clients (and raw UDP peers) on one Redis and on a Valkey Cluster.

Every wait is a bounded poll. The command runs as an asyncio subprocess, so the SDK
clients of the test keep pinging while it runs.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from daemons import REDIS_PASSWORD as PASSWORD
from daemons import (  # noqa: F401
    Clients,
    DaemonFactory,
    DaemonProcess,
    RawPeer,
    clients_fixture,
    daemon_env,
    daemon_factory_fixture,
    password_redis_fixture,
)
from helpers import wait_for
from presence_daemon import keys
from presence_daemon.admin import Context, Cursor, online_page
from presence_daemon.embedded import EmbeddedCluster
from presence_daemon.presence import Presence

ADMIN = Path(sys.executable).parent / "presence-admin"
"""The installed entry point (``make venv`` installs it)."""
RUN_TIMEOUT = 30.0


@dataclass(frozen=True)
class Ran:
    """One finished ``presence-admin`` run."""

    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, self.stderr
        assert self.stderr == "", self.stderr
        return json.loads(self.stdout)

    def error_line(self) -> str:
        """The one stderr line of a failed run."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self.stderr
        assert "Traceback" not in self.stderr
        assert self.stdout == ""
        return lines[0]


async def admin(*args: str, url: str | None = None, env: dict[str, str] | None = None) -> Ran:
    """Run ``presence-admin [--redis-url url] args...`` without blocking the event loop."""
    argv = [str(ADMIN), *(["--redis-url", url] if url is not None else []), *args]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon_env({"COLUMNS": "200", **(env or {})}),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def online_count(url: str) -> int:
    count: int = (await admin("--json", "online", "--count", url=url)).json()["online"]
    return count


async def statuses(url: str, *users: str) -> dict[str, bool]:
    rows = (await admin("--json", "query", *users, url=url)).json()["users"]
    return {row["user"]: row["online"] for row in rows}


# ---------------------------------------------------------------------------
# Against real daemons, on one Redis and on a cluster.


@pytest.mark.backends
async def test_counts_lists_and_queries_follow_clients(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    empty = await admin("online", "--list", url=redis_url)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.splitlines() == ["no users online", "(last page)"]
    assert await online_count(redis_url) == 0

    daemon = daemon_factory()
    alice = await clients.connect("alice", ["bob"], daemon)
    await clients.connect("bob", ["alice"], daemon, client_id="bob-laptop")
    await clients.connect("bob", ["alice"], daemon, client_id="bob-phone")
    assert await online_count(redis_url) == 2  # bob's two clients make one user online
    page = (await admin("--json", "online", "--list", url=redis_url)).json()
    assert sorted(page["users"]) == ["alice", "bob"]
    assert (page["next_cursor"], page["last_page"]) == (None, True)
    assert await statuses(redis_url, "alice", "bob", "carol") == {
        "alice": True,
        "bob": True,
        "carol": False,
    }

    text = await admin("query", "carol", "alice", url=redis_url)
    assert text.returncode == 0, text.stderr
    assert [line.split() for line in text.stdout.splitlines()] == [
        ["USER", "STATUS"],
        ["carol", "offline"],
        ["alice", "online"],
    ]

    await alice.client.disconnect()  # acknowledged after its effects
    assert await online_count(redis_url) == 1
    assert await statuses(redis_url, "alice", "bob") == {"alice": False, "bob": True}
    listed = await admin("online", "--list", url=redis_url)
    assert listed.stdout.splitlines() == ["USER", "bob", "(last page)"]


@pytest.mark.backends
async def test_paging_visits_every_online_user_exactly_once(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    daemon = daemon_factory()
    users = [f"user{i}" for i in range(9)]
    for user in users:
        # Friends and fans too: keys that must not be mistaken for online users.
        await clients.connect(user, [u for u in users if u != user][:3], daemon)

    pages: list[list[str]] = []
    cursor: str | None = None
    for _ in range(20):
        args = ["--json", "online", "--list", "--limit", "2"]
        page = (await admin(*args, *(["--cursor", cursor] if cursor else []), url=redis_url)).json()
        pages.append(page["users"])
        cursor = page["next_cursor"]
        assert page["last_page"] == (cursor is None)
        if cursor is None:
            break
    assert cursor is None, f"no last page after {len(pages)} pages: {pages}"
    seen = [user for page in pages for user in page]
    assert sorted(seen) == users  # each exactly once
    assert all(len(page) == 2 for page in pages[:-1]), pages
    assert len(pages[-1]) <= 2

    # The same walk in text form: the cursor is printed for the next command.
    first = await admin("online", "--list", "--limit", "4", url=redis_url)
    lines = first.stdout.splitlines()
    assert lines[0] == "USER" and len(lines) == 6, first.stdout
    assert lines[-1].startswith("(more: --cursor ")
    cursor = lines[-1].removeprefix("(more: --cursor ").removesuffix(")")
    rest = (await admin("--json", "online", "--list", "--cursor", cursor, url=redis_url)).json()
    assert sorted(lines[1:5] + rest["users"]) == users
    assert rest["last_page"]

    bad = await admin("online", "--list", "--cursor", "not-a-cursor", url=redis_url)
    assert bad.returncode == 2
    assert "'not-a-cursor'" in bad.error_line()


@pytest.mark.backends
async def test_pages_of_one_keep_the_users_a_scan_batch_read_beyond_the_page(
    redis_url: str,
) -> None:
    """In process, to see the cursors: with --limit 1, SCAN batches hold more users than
    the page; those ride in the cursor and are shown on the next pages."""
    library = Presence.from_url(redis_url, lease_ttl=None)
    await library.start()
    try:
        users = sorted(f"u{i:02d}" for i in range(30))
        for user in users:
            await library.connected(f"{user}-c", user, friends=["x", "y"])
        ctx = Context(library.redis, redis_url)
        seen: list[str] = []
        cursors: list[Cursor] = []
        after: Cursor | None = None
        for _ in range(100):
            page, after = await online_page(ctx, 1, after)
            seen += page
            if after is None:
                break
            assert len(page) == 1
            cursors.append(after)
        assert after is None
        assert sorted(seen) == users
        assert any(cursor.held for cursor in cursors)  # the path under test was taken
    finally:
        await library.close()


@pytest.mark.backends
async def test_friends_clients_and_daemons_across_two_daemons(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    d1, d2 = daemon_factory("d1"), daemon_factory("d2")
    await clients.connect("alice", ["bob", "carol"], d1, client_id="alice-1")
    bob = await clients.connect("bob", ["alice"], d2, client_id="bob-1")
    await clients.connect("bob", ["alice"], d1, client_id="bob-2")
    await clients.connect("dave", ["alice"], d1, client_id="dave-1")

    friends = (await admin("--json", "friends", "alice", url=redis_url)).json()
    assert friends == {
        "user": "alice",
        "friends": ["bob", "carol"],
        "fans": ["bob", "dave"],
        "mutual": ["bob"],
        "online": ["bob", "dave"],
    }
    text = await admin("friends", "alice", url=redis_url)
    assert [line.split() for line in text.stdout.splitlines()] == [
        ["NAME", "DECLARED", "FAN", "MUTUAL", "ONLINE"],
        ["bob", "yes", "yes", "yes", "yes"],
        ["carol", "yes", "no", "no", "no"],
        ["dave", "no", "yes", "no", "yes"],
    ]

    listed = (await admin("--json", "clients", "bob", url=redis_url)).json()
    assert listed["user"] == "bob"
    by_id = {c["client_id"]: c for c in listed["clients"]}
    assert sorted(by_id) == ["bob-1", "bob-2"]
    assert (by_id["bob-1"]["owner"], by_id["bob-2"]["owner"]) == ("d2", "d1")
    for client in by_id.values():
        assert client["owner_alive"] is True
        assert client["address"].startswith("127.0.0.1:")
        assert 0 <= client["connected_seconds"] < RUN_TIMEOUT
    nobody = await admin("clients", "carol", url=redis_url)
    assert nobody.stdout.strip() == "carol has no clients connected"

    daemons = (await admin("--json", "daemons", url=redis_url)).json()["daemons"]
    assert [(d["instance_id"], d["clients"], d["state"]) for d in daemons] == [
        ("d1", 3, "live"),
        ("d2", 1, "live"),
    ]
    assert all(0 < d["lease_seconds"] <= 10 for d in daemons)

    await bob.client.disconnect()
    await wait_for(
        lambda: _daemon_clients(redis_url, "d2", 0), what="d2 holds no client after bob-1 left"
    )
    table = await admin("daemons", url=redis_url)
    assert table.stdout.splitlines()[0].split() == [
        "DAEMON",
        "CLIENTS",
        "LEASE",
        "LEFT",
        "(s)",
        "STATE",
    ]


async def _daemon_clients(url: str, daemon: str, count: int) -> bool:
    daemons = (await admin("--json", "daemons", url=url)).json()["daemons"]
    return any(d["instance_id"] == daemon and d["clients"] == count for d in daemons)


@pytest.mark.backends
async def test_a_dead_daemons_clients_await_reaping_until_a_survivor_reaps(
    redis_url: str, daemon_factory: DaemonFactory
) -> None:
    # Clients that never ping must not time out before the kill: a long timeout.
    doomed = daemon_factory(
        "doomed", flags={"--lease-ttl": "1", "--ping-interval": "10", "--timeout": "30"}
    )
    async with (
        await RawPeer.open(doomed.address) as erin,
        await RawPeer.open(doomed.address) as fred,
    ):
        await erin.connect("erin", "erin-1")
        await fred.connect("fred", "fred-1")
        doomed.kill()  # nobody else runs: nobody reaps

        async def awaiting() -> bool:
            daemons = (await admin("--json", "daemons", url=redis_url)).json()["daemons"]
            return bool(
                daemons
                == [
                    {
                        "instance_id": "doomed",
                        "clients": 2,
                        "lease_seconds": None,
                        "state": "awaiting_reaping",
                    }
                ]
            )

        await wait_for(awaiting, 10, 0.2, what="the dead daemon's clients await reaping")
        assert await online_count(redis_url) == 2
        table = await admin("daemons", url=redis_url)
        assert table.stdout.splitlines()[1].split() == ["doomed", "2", "-", "awaiting", "reaping"]

        daemon_factory("survivor")

        async def reaped() -> bool:
            return await online_count(redis_url) == 0

        await wait_for(reaped, 15, 0.2, what="the survivor reaps the dead daemon's clients")
        daemons = (await admin("--json", "daemons", url=redis_url)).json()["daemons"]
        assert [(d["instance_id"], d["clients"]) for d in daemons] == [("survivor", 0)]


@pytest.mark.backends
async def test_set_friends_tells_a_connected_friend_as_a_client_change_would(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    daemon = daemon_factory()
    bob = await clients.connect("bob", ["alice"], daemon)
    alice = await clients.connect("alice", [], daemon)
    assert bob.friends == {"alice": False}  # online, but not mutual

    done = await admin("set-friends", "alice", "bob", "carol", url=redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alice now declares: bob, carol"
    await wait_for(lambda: bob.friends["alice"], what="bob sees alice online")
    # Alice's own client learns its new list (a snapshot) and bob's state.
    await wait_for(
        lambda: alice.friends == {"bob": True, "carol": False}, what="alice's client has the list"
    )
    friends = (await admin("--json", "friends", "bob", url=redis_url)).json()
    assert friends["mutual"] == ["alice"]

    cleared = (await admin("--json", "set-friends", "alice", "--none", url=redis_url)).json()
    assert cleared == {"user": "alice", "friends": []}
    await wait_for(lambda: not bob.friends["alice"], what="bob sees alice offline")
    await wait_for(lambda: alice.friends == {}, what="alice's client has an empty list")
    assert bob.seen("alice") == [True, False]
    assert (await admin("--json", "friends", "bob", url=redis_url)).json()["fans"] == []


async def _last_stream_id(url: str) -> str:
    """The id of the transition stream's newest entry ("0" if there is none)."""
    presence = Presence.from_url(url, lease_ttl=None)
    try:
        last = await presence.redis.execute_command(
            "XREVRANGE", keys.TRANSITIONS_STREAM, "+", "-", "COUNT", 1
        )
    finally:
        await presence.close()
    return str(last[0][0]) if last else "0"


@pytest.mark.backends
async def test_watch_prints_transitions_and_resumes_after_an_id(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    first, second = daemon_factory(), daemon_factory()
    before = await _last_stream_id(redis_url)
    alice = await clients.connect("alice", ["bob"], first)
    bob = await clients.connect("bob", ["alice"], second)
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob")
    await asyncio.wait_for(bob.client.disconnect(), 10)
    await asyncio.wait_for(alice.client.disconnect(), 10)
    clients.all.clear()

    ran = await admin("--json", "watch", "--after", before, "--limit", "4", url=redis_url)
    assert ran.returncode == 0, ran.stderr
    entries = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [(e["user"], e["online"]) for e in entries] == [
        ("alice", True),
        ("bob", True),
        ("bob", False),
        ("alice", False),
    ]
    assert {e["decided_by"] for e in entries} == {first.instance_id, second.instance_id}
    # A consumer that stopped after the first entry resumes with nothing lost.
    resumed = await admin(
        "--json", "watch", "--after", entries[0]["id"], "--limit", "3", url=redis_url
    )
    assert [json.loads(line) for line in resumed.stdout.splitlines()] == entries[1:]
    # The table form: one line per transition, naming the user, the state and the id.
    table = await admin("watch", "--after", before, "--limit", "4", url=redis_url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == 4
    assert "  alice  online  by " in lines[0]
    assert lines[0].endswith(f"id {entries[0]['id']}")


async def test_watch_without_after_shows_only_what_happens_from_now(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    daemon = daemon_factory()
    await clients.connect("early", [], daemon)  # in the stream before the watch starts
    watching = asyncio.create_task(admin("watch", "--limit", "1", url=redis_url))
    # The watch starts at some point we cannot see: keep making transitions until it
    # prints one; whatever it prints first must be one of these, never the earlier one.
    probes = 0
    while not watching.done():
        assert probes < 200, "watch printed nothing"
        probe = await clients.connect(f"probe{probes}", [], daemon)
        await asyncio.wait_for(probe.client.disconnect(), 10)
        clients.all.remove(probe.client)
        probes += 1
        await asyncio.wait([watching], timeout=0.05)
    ran = await watching
    assert ran.returncode == 0, ran.stderr
    assert "  probe" in ran.stdout and "early" not in ran.stdout


async def test_watch_after_a_trimmed_id_says_so(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    daemon = daemon_factory()
    await clients.connect("alice", [], daemon)
    last = await _last_stream_id(redis_url)
    assert last != "0"
    redis.Redis.from_url(redis_url).xtrim(keys.TRANSITIONS_STREAM, maxlen=0)
    ran = await admin("watch", "--after", last, url=redis_url)
    assert ran.returncode == 1
    line = ran.error_line()
    assert last in line and "--after 0" in line


@pytest.mark.backends
async def test_kick_disconnects_a_client_and_its_friend_is_told(
    redis_url: str, daemon_factory: DaemonFactory, clients: Clients
) -> None:
    daemon = daemon_factory()
    bob = await clients.connect("bob", ["alice"], daemon, client_id="bobs-phone")
    alice = await clients.connect("alice", ["bob"], daemon)
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")

    kicked = await admin("kick", "bobs-phone", url=redis_url)
    assert kicked.returncode == 0, kicked.stderr
    assert kicked.stdout.strip() == "kicked bobs-phone"
    await wait_for(lambda: "kicked" in bob.statuses(), what="bob's client is told it was kicked")
    await wait_for(lambda: not alice.friends["bob"], what="alice sees bob offline")
    assert await statuses(redis_url, "bob") == {"bob": False}
    again = (await admin("--json", "kick", "bobs-phone", url=redis_url)).json()
    assert again == {"client": "bobs-phone", "kicked": False}
    clients.all.remove(bob.client)


# ---------------------------------------------------------------------------
# Bad input and unreachable Redis: one line, no traceback.


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        (["query", "alice", "bad name"], "'bad name'"),
        (["friends", "a{b}"], "'a{b}'"),
        (["clients", "x" * 65], "'" + "x" * 65 + "'"),
        (["set-friends", "alice", "bob", "no:colons"], "'no:colons'"),
        (["set-friends", "al|ce", "--none"], "'al|ce'"),
        (["set-friends", "alice"], "NAME"),
        (["set-friends", "alice", "bob", "--none"], "--none"),
        (["online"], "--count"),
        (["online", "--list", "--limit", "0"], "'0'"),
        (["set-friends", "alice", "a", "b", "c", "--max-friends", "2"], "--max-friends 2"),
        (["online", "--count", "--cursor", "x"], "--cursor"),
        (["watch", "--after", "yesterday"], "'yesterday'"),
        (["watch", "--limit", "0"], "'0'"),
        (["kick", "bad client"], "'bad client'"),
    ],
)
async def test_bad_arguments_are_one_line_exit_2(args: list[str], bad: str) -> None:
    # No Redis at this URL: arguments are checked before anything connects.
    ran = await admin(*args, url="redis://127.0.0.1:1/0")
    assert ran.returncode == 2, ran
    line = ran.error_line()
    assert line.startswith("presence-admin"), line
    assert bad in line, line


async def test_a_cursor_from_another_deployment_is_refused(
    redis_url: str, cluster: EmbeddedCluster
) -> None:
    cases = [
        (cluster.url, Cursor("", 0), "is from a listing of a single Redis"),
        (redis_url, Cursor("127.0.0.1:1", 0), "is from a listing of a cluster"),
        (cluster.url, Cursor("127.0.0.1:1", 0), "127.0.0.1:1 is not a master now"),
    ]
    for url, cursor, why in cases:
        ran = await admin("online", "--list", "--cursor", cursor.encode(), url=url)
        assert ran.returncode == 2, ran
        assert why in ran.error_line()


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:1/0",
        "redis://admin:s3cret@127.0.0.1:1/0",
        "redis+cluster://:s3cret@127.0.0.1:1,127.0.0.1:2",
    ],
)
@pytest.mark.parametrize("command", [["daemons"], ["online", "--count"], ["set-friends", "a", "b"]])
async def test_unreachable_redis_is_one_line_exit_1_without_the_password(
    url: str, command: list[str]
) -> None:
    ran = await admin(*command, url=url)
    assert ran.returncode == 1, ran
    line = ran.error_line()
    assert "cannot reach Redis at" in line and "127.0.0.1:1" in line, line
    assert "s3cret" not in line and ":***@" in line, line


async def test_a_bad_url_names_its_source() -> None:
    ran = await admin("daemons", env={"PRESENCE_REDIS_URL": "http://:s3cret@h/"})
    assert ran.returncode == 2
    line = ran.error_line()
    assert line.startswith("presence-admin: error: PRESENCE_REDIS_URL: invalid value"), line
    assert "s3cret" not in line
    ran = await admin("daemons", url="redis://:s3cr#t@127.0.0.1:1/0")  # redis-py cannot parse it
    assert ran.returncode == 2
    assert "percent-encoded" in ran.error_line() and "s3cr" not in ran.stderr
    ran = await admin("daemons", url="redis+cluster://h:99999")
    assert ran.returncode == 2
    assert "--redis-url" in ran.error_line() and "h:99999" in ran.error_line()


async def test_the_url_comes_from_the_environment(redis_url: str) -> None:
    ran = await admin("--json", "online", "--count", env={"PRESENCE_REDIS_URL": redis_url})
    assert ran.json() == {"online": 0}
    # The flag wins over the variable, before or after the command.
    away = {"PRESENCE_REDIS_URL": "redis://127.0.0.1:1/0"}
    ran = await admin("--json", "online", "--count", url=redis_url, env=away)
    assert ran.json() == {"online": 0}
    ran = await admin("online", "--count", "--json", "--redis-url", redis_url, env=away)
    assert ran.json() == {"online": 0}
    ran = await admin("online", "--count", env=away)
    assert ran.returncode == 1 and "127.0.0.1:1" in ran.error_line()


@pytest.mark.parametrize(
    ("userinfo", "shown", "reason"),
    [
        ("", "redis://127.0.0.1:{port}/0", "needs a password"),
        (":wrong@", "redis://:***@127.0.0.1:{port}/0", "wrong user name or password"),
    ],
    ids=["no-password", "wrong-password"],
)
async def test_redis_refusing_the_credentials_is_one_line_exit_1(
    password_redis: int, userinfo: str, shown: str, reason: str
) -> None:
    ran = await admin("daemons", url=f"redis://{userinfo}127.0.0.1:{password_redis}/0")
    assert ran.returncode == 1, ran
    line = ran.error_line()
    assert "refused the connection" in line and reason in line, line
    assert shown.format(port=password_redis) in line, line
    assert "wrong@" not in line and "HELLO" not in line, line
    right = await admin(
        "--json", "daemons", url=f"redis://:{PASSWORD}@127.0.0.1:{password_redis}/0"
    )
    assert right.json() == {"daemons": []}


async def test_a_cluster_refusing_the_credentials_is_one_line_exit_1(
    cluster: EmbeddedCluster,
) -> None:
    """The cluster client wraps the refusal in its own error: it is found and told."""
    user = "admin-test"
    for port in cluster.ports:
        with redis.Redis(port=port) as node:
            node.acl_setuser(
                user,
                enabled=True,
                passwords=[f"+{PASSWORD}"],
                keys="*",
                channels="*",
                commands=["+@all"],
            )
    try:
        seed = f"127.0.0.1:{cluster.ports[0]}"
        ran = await admin("daemons", url=f"redis+cluster://{user}:wrong@{seed}")
        assert ran.returncode == 1, ran
        line = ran.error_line()
        assert "refused the connection: wrong user name or password" in line, line
        assert f"redis+cluster://{user}:***@{seed}" in line and "wrong@" not in line, line
        right = await admin("--json", "daemons", url=f"redis+cluster://{user}:{PASSWORD}@{seed}")
        assert "daemons" in right.json()
    finally:
        for port in cluster.ports:
            with redis.Redis(port=port) as node:
                node.acl_deluser(user)


async def test_version_from_the_entry_point_and_the_module() -> None:
    ran = await admin("--version")
    assert ran.returncode == 0 and ran.stdout.startswith("presence-admin "), ran
    module = subprocess.run(
        [sys.executable, "-m", "presence_daemon.admin", "--version"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert module.returncode == 0 and module.stdout.startswith("presence-admin "), module
