"""Kick (issue 13): ``Presence.kick(client_id)`` removes a client's session through the
normal guarded disconnect (friends see the user go offline) and tells the owning daemon,
which sends the client GO_AWAY (kicked); the SDK then stops for good, and the terminal
client says "disconnected by an operator" and exits 3.

Real daemon processes, real Redis (one and a cluster), real UDP clients.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from daemons import DaemonFactory, daemon_factory_fixture  # noqa: F401
from helpers import Watched, wait_for
from presence_client.protocol import GoAwayReason
from presence_client.sdk import PresenceClient
from presence_daemon import keys
from presence_daemon.presence import Presence, Replaced, Superseded, parse_inbox, redis_client

pytestmark = pytest.mark.backends  # every test runs on one Redis and on a Valkey Cluster

REQUEST_TIMEOUT = 0.2


@pytest_asyncio.fixture
async def operator(redis_url: str) -> AsyncIterator[Presence]:
    """A library instance, as an admin tool would use it (no lease)."""
    p = Presence(redis_client(redis_url), instance_id="admin", lease_ttl=None)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def client(user: str, friends: list[str], address: tuple[str, int]) -> PresenceClient:
    return PresenceClient(
        user, friends, servers=[address], client_id=f"{user}-1", request_timeout=REQUEST_TIMEOUT
    )


async def test_a_kicked_client_goes_offline_for_its_friends_and_stays_away(
    daemon_factory: DaemonFactory, operator: Presence, r: Redis
) -> None:
    d1, d2 = await asyncio.gather(daemon_factory.astart("d1"), daemon_factory.astart("d2"))
    alice = Watched(client("alice", ["bob"], d1.address))
    bob = Watched(client("bob", ["alice"], d2.address))
    await alice.client.connect()
    await bob.client.connect()
    try:
        await wait_for(lambda: bob.friends.get("alice") is True, what="bob sees alice online")
        assert await operator.kick("alice-1") is True
        await wait_for(lambda: alice.client.kicked, what="alice told GO_AWAY kicked")
        assert alice.statuses()[-1] == "kicked"
        await wait_for(lambda: bob.friends.get("alice") is False, what="bob sees alice offline")
        assert await r.exists(keys.clients_key("alice")) == 0
        # Alice does not come back by herself: sample a window a reconnect would fall in
        # (the client would retry within a request timeout or two).
        deadline = time.monotonic() + 10 * REQUEST_TIMEOUT
        while time.monotonic() < deadline:
            assert await r.exists(keys.clients_key("alice")) == 0
            await asyncio.sleep(0.05)
        assert "reconnecting" not in alice.statuses()
        assert not alice.client.connected
        # A second kick, or a kick of a client id nobody uses, finds nothing.
        assert await operator.kick("alice-1") is False
        assert await operator.kick("nobody-1") is False
    finally:
        await alice.client.disconnect()
        await bob.client.disconnect()


async def test_the_terminal_client_says_who_disconnected_it_and_exits_3(
    daemon_factory: DaemonFactory, operator: Presence
) -> None:
    daemon = await daemon_factory.astart("d1")
    host, port = daemon.address
    args = [sys.executable, "-m", "presence_client", "--plain", "--user", "carol"]
    args += ["--client-id", "carol-1", "--server", f"{host}:{port}"]
    with subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:

            async def connected() -> bool:
                return bool(await operator.clients("carol"))

            await wait_for(connected, timeout=10, what="carol connected")
            assert await operator.kick("carol-1") is True
            out, err = await asyncio.to_thread(proc.communicate, timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 3, (out, err)
    assert out.splitlines()[-1] == "disconnected by an operator"
    assert err == "presence-client: disconnected by an operator\n"


def test_an_inbox_kick_item_is_parsed() -> None:
    token = "ab" * 16
    message = f'[["carol-1","{token}","kick"],["dave-1","{token}"]]'
    assert parse_inbox(message) == (
        [],
        [Replaced("carol-1", token, kicked=True), Replaced("dave-1", token)],
    )
    with pytest.raises(ValueError):
        parse_inbox(f'[["carol-1","{token}","ban"]]')
    assert int(GoAwayReason.KICKED) == 3


async def test_a_kicked_session_is_never_put_back_by_its_owner(
    redis_url: str, operator: Presence
) -> None:
    # The owner missed the kick message (its inbox was down): its next reconciliation,
    # or a lease lost and taken again, tries to put back the session it still holds.
    owner = Presence(redis_client(redis_url), instance_id="owner")
    await owner.start()
    try:
        connection = await owner.connected("alice-1", "alice", address="127.0.0.1:9")
        assert await operator.kick("alice-1") is True
        with pytest.raises(Superseded):
            await owner.connected(
                "alice-1", "alice", address="127.0.0.1:9", token=connection.token, restore=True
            )
        assert await operator.query(["alice"]) == {"alice": False}
        # Not a ban: a new session of the same client id is served.
        again = await owner.connected("alice-1", "alice", address="127.0.0.1:9")
        assert again.token != connection.token
        assert await operator.query(["alice"]) == {"alice": True}
    finally:
        await owner.close()
