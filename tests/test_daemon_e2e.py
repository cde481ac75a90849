"""End to end: real daemon processes, real Redis, real UDP, clients from the SDK.

Every wait is a bounded poll on a condition. "Exactly once" is checked two ways: the
FriendEvents a client emitted, and the number of notifications the daemon numbered for
the session (``settled_seq``: a snapshot round trip reports it), which also counts
duplicates the client would have absorbed silently.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from authkit import auth_flags, issue, write_secret
from daemons import (  # noqa: F401 - fixtures
    Clients,
    DaemonFactory,
    DaemonProcess,
    RawPeer,
    clients_fixture,
    daemon_factory_fixture,
)
from helpers import Watched, wait_for
from presence_client.protocol import (
    MAX_DATAGRAM,
    Connect,
    Error,
    ErrorCode,
    Notify,
    Ping,
    Snapshot,
    SnapshotRequest,
    encode,
)
from presence_client.sdk import (
    PresenceClient,
    PresenceClientError,
    StatusEvent,
)
from presence_daemon import keys
from presence_daemon.presence import Presence

pytestmark = pytest.mark.backends  # every test runs on one Redis and on a Valkey Cluster

REQUEST_TIMEOUT = 0.2
TIMEOUT_WAIT = 3.0
"""Upper bound for a silent client to be dropped (timeout 0.6 s + sweep 0.05 s + CI)."""


@pytest_asyncio.fixture
async def presence(redis_url: str) -> AsyncIterator[Presence]:
    """The presence library on the test's Redis, to read what the daemons stored."""
    library = Presence.from_url(redis_url)
    try:
        yield library
    finally:
        await library.close()


async def settled_seq(watched: Watched) -> int:
    """How many notifications the daemon has numbered for this session so far.

    A snapshot round trip carries the daemon's counter; the SDK adopts it. Anything the
    daemon decided to tell us before it handled the snapshot request is counted.
    """
    await watched.client.refresh()
    return watched.client.last_seq


async def online(presence: Presence, *users: str) -> dict[str, bool]:
    return await presence.query(users)


async def offline(presence: Presence, user: str) -> bool:
    return not (await presence.query([user]))[user]


# ---------------------------------------------------------------------------
# One daemon.


async def test_mutual_friends_see_each_other_come_and_go(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    daemon = daemon_factory()
    alice = await clients.connect("alice", ["bob"], daemon)
    assert alice.friends == {"bob": False}

    bob = await clients.connect("bob", ["alice"], daemon)
    # Bob learns that alice is online from the CONNECT_OK itself.
    assert bob.friends == {"alice": True}
    assert bob.seen("alice") == [True]
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")
    assert await online(presence, "alice", "bob") == {"alice": True, "bob": True}

    await bob.client.disconnect()
    await wait_for(lambda: not alice.friends["bob"], what="alice sees bob offline")
    assert await online(presence, "alice", "bob") == {"alice": True, "bob": False}

    assert alice.seen("bob") == [True, False]
    assert alice.friend_events() == alice.friend_events("bob")
    assert await settled_seq(alice) == 2


async def test_one_sided_friendship_is_never_visible_and_nothing_is_broadcast(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    daemon = daemon_factory()
    dave = await clients.connect("dave", ["frank"], daemon)  # related to nobody here
    alice = await clients.connect("alice", ["carol"], daemon)  # carol does not list alice
    carol = await clients.connect("carol", ["erin"], daemon)
    assert "alice" not in carol.friends
    assert alice.friends == {"carol": False}
    assert await online(presence, "alice", "carol", "dave") == dict.fromkeys(
        ("alice", "carol", "dave"), True
    )
    assert [(s.name, s.online) for s in await presence.friend_view("alice")] == [("carol", False)]
    assert await settled_seq(alice) == 0
    assert await settled_seq(carol) == 0

    await carol.client.disconnect()
    carol = await clients.connect("carol", ["erin"], daemon)
    await alice.client.disconnect()
    await carol.client.disconnect()
    assert await online(presence, "alice", "carol") == {"alice": False, "carol": False}

    assert await settled_seq(dave) == 0
    assert dave.friend_events() == []
    assert alice.friend_events() == []
    assert carol.friend_events() == []


async def test_friend_list_change_while_both_online(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    daemon = daemon_factory()
    alice = await clients.connect("alice", ["carol"], daemon)
    carol = await clients.connect("carol", [], daemon)
    assert not alice.friends["carol"]

    await carol.client.add_friends(["alice"])  # now mutual
    await wait_for(lambda: alice.friends["carol"], what="alice sees carol online")
    await wait_for(lambda: carol.friends.get("alice", False), what="carol sees alice online")
    assert await presence.friends("carol") == {"alice"}

    await carol.client.remove_friends(["alice"])  # one-sided again
    await wait_for(lambda: not alice.friends["carol"], what="alice sees carol offline")
    assert "alice" not in carol.friends
    assert await presence.friends("carol") == set()

    assert alice.seen("carol") == [True, False]
    assert carol.seen("alice") == [True, False]
    # Each side was told once when the friendship became mutual and once when it ended.
    assert await settled_seq(alice) == 2
    assert await settled_seq(carol) == 2


async def test_same_user_on_two_clients_is_online_while_either_is(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    daemon = daemon_factory()
    alice = await clients.connect("alice", ["bob"], daemon)
    laptop = await clients.connect("bob", ["alice"], daemon, client_id="bob-laptop")
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")
    phone = await clients.connect("bob", ["alice"], daemon, client_id="bob-phone")
    assert phone.friends == {"alice": True}
    assert set(await presence.clients("bob")) == {"bob-laptop", "bob-phone"}

    await laptop.client.disconnect()
    # The disconnect is acknowledged after its effects; the snapshot comes after that.
    assert await settled_seq(alice) == 1
    assert alice.friends["bob"]
    assert await online(presence, "bob") == {"bob": True}

    await phone.client.disconnect()
    await wait_for(lambda: not alice.friends["bob"], what="alice sees bob offline")
    assert alice.seen("bob") == [True, False]
    assert await settled_seq(alice) == 2


async def test_reconnect_with_same_client_id_after_disconnect_and_after_timeout(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    daemon = daemon_factory()
    alice = await clients.connect("alice", ["bob"], daemon)

    # Session 1, then session 2 right after a clean disconnect.
    bob = await clients.connect("bob", ["alice"], daemon, client_id="bob-1")
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")
    await bob.client.disconnect()
    await wait_for(lambda: not alice.friends["bob"], what="alice sees bob offline")
    bob = await clients.connect("bob", ["alice"], daemon, client_id="bob-1")
    assert bob.friends == {"alice": True}
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob online again")
    assert alice.seen("bob") == [True, False, True]
    await bob.client.disconnect()
    await wait_for(lambda: not alice.friends["bob"], what="alice sees bob offline")

    # Session 3 stops pinging (a raw client that verifies its address, then goes quiet).
    async with await RawPeer.open(daemon.address) as silent:
        await silent.connect("bob", "bob-1", ["alice"])
        await silent.ping()
        await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")
        await wait_for(
            lambda: not alice.friends["bob"], TIMEOUT_WAIT, what="bob times out for alice"
        )

    # Session 4, same client id, right after the timeout.
    bob = await clients.connect("bob", ["alice"], daemon, client_id="bob-1")
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")
    assert alice.seen("bob") == [True, False] * 3 + [True]
    assert await settled_seq(alice) == 7
    assert set(await presence.clients("bob")) == {"bob-1"}


async def test_restarted_client_replaces_its_session_without_a_flap(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence, tmp_path: Path
) -> None:
    """With auth, a client that restarts (new port, same client id, its old session
    token lost) proves who it is with its login token and replaces its session at once.
    (Without auth it must wait for the old session's timeout: tests/test_auth.py.)"""
    daemon = daemon_factory(flags=auth_flags(write_secret(tmp_path)))
    alice = await clients.connect("alice", ["bob"], daemon, token=issue("alice"))
    old = await RawPeer.open(daemon.address)
    witness = await RawPeer.open(daemon.address)
    try:
        await old.connect("bob", "bob-1", ["alice"], auth=issue("bob"))
        await old.ping()
        await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")

        # The client restarts on a new port with the same client id and goes on pinging;
        # the old address falls silent. A witness goes silent at the same moment.
        bob = await clients.connect("bob", ["alice"], daemon, client_id="bob-1", token=issue("bob"))
        await witness.connect("wendy", "wendy-1", auth=issue("wendy"))
        await witness.ping()
        await wait_for(
            lambda: offline(presence, "wendy"), TIMEOUT_WAIT, what="the silent witness times out"
        )
        # The old session would have timed out by now too; bob never went offline.
        assert bob.client.connected
        assert alice.seen("bob") == [True]
        assert await settled_seq(alice) == 1
        assert await online(presence, "bob") == {"bob": True}
    finally:
        old.close()
        witness.close()


async def test_silent_client_times_out_and_friends_are_told_once(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    daemon = daemon_factory()
    alice = await clients.connect("alice", ["bob"], daemon)
    async with await RawPeer.open(daemon.address) as bob:
        await bob.connect("bob", "bob-1", ["alice"])
        await bob.ping()
        await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")

        # bob stops pinging: dropped within timeout + sweep interval (bounded poll).
        await wait_for(
            lambda: not alice.friends["bob"], TIMEOUT_WAIT, what="bob times out for alice"
        )
        assert await online(presence, "bob") == {"bob": False}
        assert alice.seen("bob") == [True, False]
        assert await settled_seq(alice) == 2

        # The daemon forgot the session: a late ping is told so.
        assert bob.session is not None
        bob.send(Ping(bob.session))
        error, _ = await bob.recv_until(Error)
        assert error.code is ErrorCode.UNKNOWN_SESSION


# ---------------------------------------------------------------------------
# Several daemons over one Redis.


async def test_two_daemons_notify_each_other_both_ways(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    one, two = daemon_factory("d1"), daemon_factory("d2")
    alice = await clients.connect("alice", ["bob"], one)
    bob = await clients.connect("bob", ["alice"], two)
    assert bob.friends == {"alice": True}
    await wait_for(lambda: alice.friends["bob"], what="alice (d1) sees bob (d2) online")
    # Each daemon owns the client that connected through it.
    assert {cid: owner for cid, (owner, _) in (await presence.clients("alice")).items()} == {
        alice.client.client_id: "d1"
    }
    assert {cid: owner for cid, (owner, _) in (await presence.clients("bob")).items()} == {
        bob.client.client_id: "d2"
    }

    # d1 -> d2: alice leaves and comes back; bob hears both.
    await alice.client.disconnect()
    await wait_for(lambda: not bob.friends["alice"], what="bob (d2) sees alice (d1) offline")
    alice = await clients.connect("alice", ["bob"], one)
    assert alice.friends == {"bob": True}
    await wait_for(lambda: bob.friends["alice"], what="bob (d2) sees alice (d1) online")

    assert bob.seen("alice") == [True, False, True]
    assert await settled_seq(bob) == 2  # alice offline, alice online: once each

    # d2 -> d1: bob leaves.
    await bob.client.disconnect()
    await wait_for(lambda: not alice.friends["bob"], what="alice (d1) sees bob (d2) offline")
    assert alice.seen("bob") == [True, False]  # online from its CONNECT_OK, then offline
    assert await settled_seq(alice) == 1


async def test_two_daemons_decide_each_transition_once(
    daemon_factory: DaemonFactory, clients: Clients
) -> None:
    one, two = daemon_factory("d1"), daemon_factory("d2")
    alice = await clients.connect("alice", ["bob"], one)
    bob_one = clients.create("bob", ["alice"], one, client_id="bob-on-d1")
    bob_two = clients.create("bob", ["alice"], two, client_id="bob-on-d2")

    # bob's two clients connect at the same moment through different daemons.
    await asyncio.gather(bob_one.client.connect(), bob_two.client.connect())
    await wait_for(lambda: alice.friends["bob"], what="alice sees bob online")
    assert await settled_seq(alice) == 1

    # ...and leave at the same moment.
    await asyncio.gather(bob_one.client.disconnect(), bob_two.client.disconnect())
    await wait_for(lambda: not alice.friends["bob"], what="alice sees bob offline")
    assert alice.seen("bob") == [True, False]
    assert await settled_seq(alice) == 2


async def test_sigterm_disconnects_held_clients_and_tells_friends_elsewhere(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    doomed, survivor = daemon_factory("doomed"), daemon_factory("survivor")
    alice = await clients.connect("alice", ["carol"], doomed, auto_reconnect=False)
    bob = await clients.connect("bob", ["carol"], doomed, auto_reconnect=False)
    carol = await clients.connect("carol", ["alice", "bob"], survivor)
    assert carol.friends == {"alice": True, "bob": True}

    assert await doomed.aterminate() == 0
    assert await online(presence, "alice", "bob", "carol") == {
        "alice": False,
        "bob": False,
        "carol": True,
    }
    await wait_for(
        lambda: carol.friends == {"alice": False, "bob": False},
        what="carol (on the other daemon) sees alice and bob offline",
    )
    assert carol.seen("alice") == [True, False]
    assert carol.seen("bob") == [True, False]
    assert await settled_seq(carol) == 2
    # The clients of the stopped daemon notice that it is gone.
    await wait_for(
        lambda: not alice.client.connected and not bob.client.connected,
        TIMEOUT_WAIT,
        what="alice's and bob's clients notice their daemon is gone",
    )


async def test_killed_daemon_users_go_offline_once_its_lease_expires(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    lease = {"--lease-ttl": "0.5"}
    doomed, survivor = (
        daemon_factory("doomed", flags=lease),
        daemon_factory("survivor", flags=lease),
    )
    await clients.connect("alice", ["carol"], doomed, auto_reconnect=False)
    carol = await clients.connect("carol", ["alice"], survivor)
    assert carol.friends == {"alice": True}

    doomed.kill()  # SIGKILL: no goodbye, nothing removed from Redis
    await wait_for(
        lambda: carol.friends == {"alice": False},
        TIMEOUT_WAIT,
        what="carol sees alice offline after the dead daemon's lease expired",
    )
    assert carol.seen("alice") == [True, False]
    assert await online(presence, "alice", "carol") == {"alice": False, "carol": True}


async def test_client_failing_over_before_the_reap_causes_no_flap(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    lease = {"--lease-ttl": "2.0"}
    doomed, survivor = (
        daemon_factory("doomed", flags=lease),
        daemon_factory("survivor", flags=lease),
    )
    alice = await clients.connect("alice", ["carol"], doomed, failover=[survivor])
    carol = await clients.connect("carol", ["alice"], survivor)
    assert carol.friends == {"alice": True}

    doomed.kill()
    # alice's client notices the silence and moves to the survivor, same client id,
    # before the doomed daemon's lease (2 s) runs out.
    await wait_for(
        lambda: alice.client.connected and alice.client.server == survivor.address,
        TIMEOUT_WAIT,
        what="alice fails over to the survivor",
    )

    # Wait until the survivor has dealt with the dead owner (it is unregistered).
    async def reaped() -> bool:
        return not await presence.redis.sismember(keys.OWNERS_KEY, "doomed")

    await wait_for(reaped, 6.0, what="the survivor reaps the dead daemon")
    assert await online(presence, "alice") == {"alice": True}
    assert carol.seen("alice") == [True]  # never a flap


async def test_restarted_daemon_with_the_same_id_clears_what_it_left_at_once(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    first = daemon_factory("d1", flags={"--lease-ttl": "1"})
    other = daemon_factory("d2", flags={"--lease-ttl": "5"})
    await clients.connect("alice", ["carol"], first, auto_reconnect=False)
    carol = await clients.connect("carol", ["alice"], other)
    assert carol.friends == {"alice": True}

    first.kill()
    # Same instance id: the new process waits out its predecessor's lease (1 s), then
    # clears the clients it left, sooner than d2 (5 s lease) would reap them.
    daemon_factory("d1", flags={"--lease-ttl": "1"})
    await wait_for(
        lambda: carol.friends == {"alice": False},
        TIMEOUT_WAIT,
        what="carol sees alice offline as soon as d1 restarts",
    )
    assert carol.seen("alice") == [True, False]


async def test_stalled_daemon_that_was_reaped_registers_its_clients_again(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    lease = {"--lease-ttl": "0.5"}
    survivor = daemon_factory("survivor", flags=lease)
    # Slow pings, so alice's client does not notice a short stall of its daemon.
    stalled = daemon_factory("stalled", flags={**lease, "--ping-interval": "2", "--timeout": "6"})
    alice = await clients.connect("alice", ["carol"], stalled)
    carol = await clients.connect("carol", ["alice"], survivor)
    session = alice.client.session

    stalled.send_signal(signal.SIGSTOP)  # frozen: its lease lapses, the survivor reaps
    try:
        await wait_for(
            lambda: carol.friends == {"alice": False},
            TIMEOUT_WAIT,
            what="the survivor reaps the stalled daemon's client",
        )
    finally:
        stalled.send_signal(signal.SIGCONT)
    # Thawed, the daemon finds its lease lost and puts its clients back.
    await wait_for(
        lambda: carol.friends == {"alice": True},
        TIMEOUT_WAIT,
        what="the thawed daemon registers alice again",
    )
    assert carol.seen("alice") == [True, False, True]
    assert await online(presence, "alice") == {"alice": True}
    assert alice.client.session == session  # alice's client noticed nothing


# ---------------------------------------------------------------------------
# Refusals, sizes, repair.


async def test_client_id_in_use_for_another_user_is_refused(
    daemon_factory: DaemonFactory, clients: Clients
) -> None:
    daemon = daemon_factory()
    async with await RawPeer.open(daemon.address) as ann, await RawPeer.open(daemon.address) as ben:
        await ann.connect("ann", "shared-id")
        request = ben.next_request()
        ben.send(Connect(request, "shared-id", "ben"), pad_to=MAX_DATAGRAM)
        error, _ = await ben.recv_until(Error)
        assert (error.request, error.code) == (request, ErrorCode.CLIENT_ID_IN_USE)

        refused = clients.create("ben", [], daemon, client_id="shared-id")
        with pytest.raises(PresenceClientError) as caught:
            await refused.client.connect()
        assert caught.value.code is ErrorCode.CLIENT_ID_IN_USE

        # Once ann lets go of it, the client id is free for ben.
        await ann.disconnect()
        reply = await ben.connect("ben", "shared-id")
        assert len(reply.session) == 16


async def test_large_friend_list_survives_connect_and_snapshot(
    daemon_factory: DaemonFactory, clients: Clients, presence: Presence
) -> None:
    daemon = daemon_factory()
    names = [f"friend-{i:03d}-".ljust(40, "x") for i in range(300)]
    assert len(encode(Connect(0, "c", "popular", tuple(names)))) > MAX_DATAGRAM
    first = await clients.connect(names[0], ["popular"], daemon)  # one mutual, online

    popular = await clients.connect("popular", names, daemon)  # multi-part SET after connect
    assert await presence.friends("popular") == set(names)
    await wait_for(lambda: popular.friends[names[0]], what="popular sees its mutual friend")
    await wait_for(lambda: first.friends["popular"], what="the friend sees popular online")

    # A second client that keeps the stored list learns every name from a snapshot.
    second = await clients.connect("popular", None, daemon)
    await second.client.refresh()
    assert set(second.friends) == set(names)
    assert {name for name, up in second.friends.items() if up} == {names[0]}

    # On the wire: the CONNECT_OK is cut short and the snapshot comes in several parts.
    async with await RawPeer.open(daemon.address) as raw:
        reply = await raw.connect("popular", "raw-client")
        assert not reply.complete
        await raw.ping()
        assert raw.session is not None
        request = raw.next_request()
        raw.send(SnapshotRequest(request, raw.session))
        parts: dict[int, Snapshot] = {}
        while True:
            part, _ = await raw.recv_until(Snapshot, request=request)
            parts[part.part] = part
            if len(parts) == part.parts:
                break
        assert len(parts) > 1
        received = [state for p in parts.values() for state in p.friends]
        assert sorted(state.name for state in received) == sorted(names)
        assert [s.name for s in received if s.online] == [names[0]]
        assert all(len(encode(p)) <= MAX_DATAGRAM for p in parts.values())


async def test_withheld_notifications_are_repaired_by_snapshot(
    daemon_factory: DaemonFactory, clients: Clients
) -> None:
    daemon = daemon_factory()
    async with await RawPeer.open(daemon.address) as alice:
        reply = await alice.connect("alice", "alice-1", ["bob"])
        assert reply.seq == 0
        assert [(s.name, s.online) for s in reply.friends] == [("bob", False)]
        # alice has not pinged: her address is unverified, so notifications are withheld.
        bob = await clients.connect("bob", ["alice"], daemon)
        assert bob.friends == {"alice": True}

        pong, before = await alice.ping()
        assert not [m for m in before if isinstance(m, Notify)]
        assert pong.seq == 1  # one notification was numbered but never sent: a gap

        # Repair: a snapshot shows bob online and covers the gap.
        request = alice.next_request()
        assert alice.session is not None
        alice.send(SnapshotRequest(request, alice.session))
        snapshot, _ = await alice.recv_until(Snapshot, request=request)
        assert (snapshot.part, snapshot.parts) == (0, 1)
        assert snapshot.seq == 1  # nothing else happened since the pong
        assert [(s.name, s.online) for s in snapshot.friends] == [("bob", True)]

        # Now verified, alice hears about bob directly, numbered after the gap.
        await bob.client.disconnect()
        notify, _ = await alice.recv_until(Notify)
        assert notify.seq == 2
        assert (notify.friend.name, notify.friend.online) == ("bob", False)
        assert notify.friend.version > snapshot.friends[0].version


# ---------------------------------------------------------------------------
# Regressions found in review.


async def test_concurrent_mutual_adds_are_seen_by_both_sdk_clients(
    daemon_factory: DaemonFactory, clients: Clients
) -> None:
    # Both online, each adds the other at the same moment: the friendship becomes
    # mutual, so both views must show the other online (no pong gap repairs a
    # notification that was never numbered).
    daemon = daemon_factory()
    for i in range(30):
        a, b = f"A{i}", f"B{i}"
        alice = await clients.connect(a, [], daemon)
        bob = await clients.connect(b, [], daemon)
        await asyncio.gather(alice.client.add_friends([b]), bob.client.add_friends([a]))
        await wait_for(
            lambda: alice.friends == {b: True} and bob.friends == {a: True},  # noqa: B023
            2.0,
            what=f"round {i}: both sides see the other online",
        )
        await alice.client.disconnect()
        await bob.client.disconnect()


async def test_refused_reconnect_from_new_address_keeps_the_old_session_working(
    daemon_factory: DaemonFactory, presence: Presence
) -> None:
    daemon = daemon_factory(
        flags={"--max-friends": "2", "--ping-interval": "10", "--timeout": "30"}
    )
    async with (
        await RawPeer.open(daemon.address) as alice,
        await RawPeer.open(daemon.address) as other,
        await RawPeer.open(daemon.address) as bob,
    ):
        await alice.connect("alice", "c1", ["bob"])
        await alice.ping()
        # The same client id and user from another address, with too many friends.
        request = other.next_request()
        other.send(Connect(request, "c1", "alice", ("x", "y", "z")), pad_to=MAX_DATAGRAM)
        error, before = await other.recv_until(Error, request=request)
        assert error.code is ErrorCode.TOO_MANY_FRIENDS
        assert before == []
        assert await presence.friends("alice") == {"bob"}

        # The old session still hears about its mutual friend, numbered.
        await bob.connect("bob", "b1", ["alice"])
        await bob.ping()
        pong, before = await alice.ping()  # the daemon sent any notify before bob's reply
        notifies = [m for m in before if isinstance(m, Notify)]
        assert [(n.seq, n.friend.name, n.friend.online) for n in notifies] == [(1, "bob", True)]
        assert pong.seq == 1

        # A clean shutdown removes the old session from Redis too.
        assert await daemon.aterminate() == 0
        assert await online(presence, "alice", "bob") == {"alice": False, "bob": False}


async def test_repeated_connect_with_refused_friend_list_gets_one_reply(
    daemon_factory: DaemonFactory, presence: Presence
) -> None:
    daemon = daemon_factory(flags={"--max-friends": "2"})
    async with await RawPeer.open(daemon.address) as peer:
        await peer.connect("carl", "k1", ["ann"])
        await peer.ping()
        assert peer.session is not None
        # The same client id, user and address connect again; the friend list is refused.
        request = peer.next_request()
        peer.send(Connect(request, "k1", "carl", ("x", "y", "z")), pad_to=MAX_DATAGRAM)
        # A snapshot request of this client is queued behind that connect: whatever the
        # connect caused has been sent before the snapshot arrives.
        snapshot_request = peer.next_request()
        peer.send(SnapshotRequest(snapshot_request, peer.session))
        snapshot, before = await peer.recv_until(Snapshot, request=snapshot_request)
        assert [(type(m), getattr(m, "request", None)) for m in before] == [(Error, request)]
        error = before[0]
        assert isinstance(error, Error) and error.code is ErrorCode.TOO_MANY_FRIENDS
        assert [s.name for s in snapshot.friends] == ["ann"]
        assert await presence.friends("carl") == {"ann"}
        await peer.disconnect()


async def test_disconnect_during_reconnect_leaves_nothing_behind(
    daemon_factory: DaemonFactory, presence: Presence
) -> None:
    # Regression: the reconnect the SDK starts when the daemon says UNKNOWN_SESSION was
    # not stopped by disconnect(); it connected afterwards, leaving a session, a socket
    # and the user online behind.
    daemon = daemon_factory()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a server that never answers
    silent.bind(("127.0.0.1", 0))
    host, port = silent.getsockname()
    current = asyncio.current_task()
    tasks_before = asyncio.all_tasks()
    client = PresenceClient(
        "alice",
        [],
        servers=[daemon.address, (host, port)],
        client_id="c1",
        request_timeout=REQUEST_TIMEOUT,
    )
    statuses: list[str] = []
    client.add_listener(lambda e: statuses.append(e.status) if isinstance(e, StatusEvent) else None)

    def leftover() -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() - tasks_before if t is not current}

    try:
        await client.connect()
        # Another address takes over the client id (a restarted client) and leaves.
        async with await RawPeer.open(daemon.address) as kicker:
            await kicker.connect("alice", "c1", previous=client.session)
            await kicker.disconnect()
        # Hold every Redis write (the daemon's scripts) so that whichever server the
        # reconnect tries, it cannot finish while we call disconnect().
        await presence.redis.client_pause(5000, all=False)
        try:
            # The SDK's next ping is answered UNKNOWN_SESSION: it starts reconnecting.
            await wait_for(lambda: client.session is None, what="the SDK starts reconnecting")
            assert statuses == ["connected", "reconnecting"]
            await asyncio.wait_for(client.disconnect(), 5.0)
        finally:
            await presence.redis.client_unpause()
        await wait_for(lambda: not leftover(), 4.0, what="no task of the client still runs")
        assert client.session is None, "the client connected again after disconnect()"
        assert client._transport is None, "a socket is open after disconnect()"
        assert statuses == ["connected", "reconnecting", "disconnected"]
        # A connect the daemon received before disconnect() may complete; nothing pings
        # that session, so it times out and the user ends offline.
        await wait_for(lambda: offline(presence, "alice"), TIMEOUT_WAIT, what="alice ends offline")
    finally:
        for task in leftover():
            task.cancel()
        client._close_transport()
        silent.close()
