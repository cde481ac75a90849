"""``--processes N``: a supervisor and N daemon processes on one UDP port.

Real processes throughout: the session ``redis-server``, one ``presence-daemon
--processes 2`` (a supervisor and two workers sharing the port with SO_REUSEPORT),
SDK clients each on its own UDP socket (so the kernel spreads them over the workers).

What is shown:

- both workers serve: each owns some of the clients in Redis, and friends held by
  different workers see each other (notifications cross through the inbox);
- a worker killed with SIGKILL is started again under a new instance id; its clients
  connect again (UNKNOWN_SESSION) and end up owned by live workers, the dead one's
  entries are reaped, and every friend is seen online again;
- SIGTERM to the supervisor stops every worker cleanly: exit 0, no process left, no
  client left in Redis;
- a worker that fails before it is ready (Redis out of reach) fails the whole start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Final

import pytest_asyncio
import redis.asyncio

from daemons import DaemonFactory, DaemonProcess, daemon_env, daemon_factory_fixture  # noqa: F401
from helpers import wait_for
from presence_client.sdk import PresenceClient
from presence_daemon import keys

WORKER_RE: Final = re.compile(r"worker (\d+) started: pid (\d+), instance (\S+)")
USERS: Final = 16
"""Clients (one per user), each on its own source port: with two workers, all of them
landing on one worker has odds of 2**-15."""
FLAGS: Final = {"--processes": "2", "--lease-ttl": "2"}
SETTLE: Final = 15.0
"""Seconds the clients get to connect, re-home or be reaped (each a bounded poll)."""


def user_name(i: int) -> str:
    return f"u{i:02d}"


def ring_friends(i: int) -> tuple[str, str]:
    """Each user's two neighbours on a ring: every friendship is mutual."""
    return user_name((i - 1) % USERS), user_name((i + 1) % USERS)


def workers(daemon: DaemonProcess) -> dict[int, tuple[int, str]]:
    """Worker index -> (pid, instance id) of its latest start, from the supervisor's log."""
    latest: dict[int, tuple[int, str]] = {}
    for index, pid, instance in WORKER_RE.findall(daemon.stderr()):
        latest[int(index)] = (int(pid), instance)
    return latest


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def owners(r: redis.asyncio.Redis) -> dict[str, str]:
    """User -> the instance id that owns its client's entry in Redis (users with one)."""
    found = {}
    for i in range(USERS):
        entries = await r.hgetall(keys.clients_key(user_name(i)))
        for value in entries.values():
            found[user_name(i)] = text(value).split("|")[1]
    return found


@pytest_asyncio.fixture
async def clients(daemon_factory: DaemonFactory) -> AsyncIterator[list[PresenceClient]]:
    """A ``--processes 2`` daemon and USERS connected clients, one per user."""
    daemon = await daemon_factory.astart("mp", flags=FLAGS)
    made = [
        PresenceClient(
            user_name(i), ring_friends(i), servers=[daemon.address], client_id=f"{user_name(i)}-c"
        )
        for i in range(USERS)
    ]
    try:
        await asyncio.gather(*(c.connect() for c in made))
        yield made
    finally:
        for client in made:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5.0)


def all_see_friends_online(made: list[PresenceClient]) -> bool:
    return all(c.connected and all(c.friends.values()) for c in made)


async def test_both_workers_serve_and_friends_across_them_see_each_other(
    daemon_factory: DaemonFactory, clients: list[PresenceClient], r: redis.asyncio.Redis
) -> None:
    (daemon,) = daemon_factory.daemons
    assert daemon.instance_id == "mp-1,mp-2"  # the ready line names every worker
    await wait_for(lambda: all_see_friends_online(clients), SETTLE, what="friends online")
    owned = await owners(r)
    assert sorted(owned) == [user_name(i) for i in range(USERS)]
    assert set(owned.values()) == {"mp-1", "mp-2"}, owned  # the kernel used both
    for instance in ("mp-1", "mp-2"):
        members = await r.smembers(keys.owned_key(instance))
        assert {text(m).split("|")[0] for m in members} == {
            user for user, owner in owned.items() if owner == instance
        }


async def test_a_killed_worker_is_restarted_and_its_clients_rehome(
    daemon_factory: DaemonFactory, clients: list[PresenceClient], r: redis.asyncio.Redis
) -> None:
    (daemon,) = daemon_factory.daemons
    await wait_for(lambda: all_see_friends_online(clients), SETTLE, what="friends online")
    owned = await owners(r)
    victim_pid, victim = workers(daemon)[1]
    assert victim in owned.values()

    os.kill(victim_pid, signal.SIGKILL)

    await wait_for(lambda: workers(daemon)[1][1] == "mp-1.1", SETTLE, what="worker 1 restarted")
    new_pid, _ = workers(daemon)[1]
    assert new_pid != victim_pid and alive(new_pid)
    await wait_for(lambda: "worker 1 ready again as mp-1.1" in daemon.stderr(), SETTLE)

    async def rehomed() -> bool:
        now = await owners(r)
        return len(now) == USERS and set(now.values()) <= {"mp-1.1", "mp-2"}

    await wait_for(rehomed, SETTLE, what="every client owned by a live worker")
    await wait_for(
        lambda: all_see_friends_online(clients), SETTLE, what="friends online after the kill"
    )

    async def reaped() -> bool:
        return not await r.exists(keys.owned_key("mp-1"))

    await wait_for(reaped, SETTLE, what="the dead worker's entries reaped")
    assert daemon.running


async def test_sigterm_to_the_supervisor_stops_every_worker_cleanly(
    daemon_factory: DaemonFactory, clients: list[PresenceClient], r: redis.asyncio.Redis
) -> None:
    (daemon,) = daemon_factory.daemons
    await wait_for(lambda: all_see_friends_online(clients), SETTLE, what="friends online")
    pids = [pid for pid, _ in workers(daemon).values()]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)

    assert await daemon.aterminate() == 0, daemon.stderr()

    assert not any(alive(pid) for pid in pids)
    assert "stopped: all 2 workers exited cleanly" in daemon.stderr()
    assert daemon.stderr().count("stopped; counters:") == 2  # each worker drained
    assert await owners(r) == {}  # every client was removed as its worker stopped


def test_a_worker_that_cannot_start_fails_the_start_with_its_exit_code() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "presence_daemon",
            "--processes",
            "2",
            "--port",
            "0",
            "--redis-url",
            "redis://127.0.0.1:1/0",  # nothing listens there
            "--redis-timeout",
            "0.5",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""  # no ready line
    assert "before it was ready" in result.stderr
    pids = [int(pid) for _, pid, _ in WORKER_RE.findall(result.stderr)]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
