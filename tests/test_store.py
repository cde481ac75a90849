"""Cluster URLs, the cluster client and the inbox channel, on a real Valkey Cluster.

The destructive tests (a master killed, a manual failover) start a private cluster;
the others share the session cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ClusterError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from conftest import CLUSTER_NODE_TIMEOUT_MS
from helpers import wait_for
from presence_daemon import keys
from presence_daemon.config import Config, ConfigError
from presence_daemon.embedded import EmbeddedCluster
from presence_daemon.presence import DEFAULT_REDIS_TIMEOUT, Presence, redis_client
from presence_daemon.scripts import SCRIPT_NAMES, Scripts
from presence_daemon.store import (
    ClusterURL,
    ClusterURLError,
    Inbox,
    PresenceCluster,
    _as_redis_errors,
    is_cluster_url,
    parse_cluster_url,
    queue_publish,
)

FAILOVER_WAIT = 30.0
"""Upper bound for a replica to take over (node timeout 1.5 s, election, CI noise)."""


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+cluster://10.0.0.1:7000",
            ClusterURL((("10.0.0.1", 7000),), tls=False),
        ),
        (
            "redis+cluster://a:7000,b:7001,c",
            ClusterURL((("a", 7000), ("b", 7001), ("c", 6379)), tls=False),
        ),
        (
            "rediss+cluster://user:p%40ss@[::1]:7000,host:7001/0",
            ClusterURL((("::1", 7000), ("host", 7001)), tls=True, username="user", password="p@ss"),
        ),
        (
            "redis+cluster://:secret@h:1/",
            ClusterURL((("h", 1),), tls=False, password="secret"),
        ),
    ],
)
def test_cluster_urls_are_parsed(url: str, expected: ClusterURL) -> None:
    assert is_cluster_url(url)
    assert parse_cluster_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://h:0",
        "redis+cluster://h:70000",
        "redis+cluster://h:x",
        "redis+cluster://h:1,,h:2",
        "redis+cluster://h:1/3",
        "redis+cluster://h:1?timeout=3",
        "redis+cluster://[::1:7000",
        "redis://h:1",
    ],
)
def test_bad_cluster_urls_are_refused_naming_the_value(url: str) -> None:
    with pytest.raises(ClusterURLError) as refused:
        parse_cluster_url(url)
    message = str(refused.value)
    assert url in message and "\n" not in message


def test_the_daemon_config_refuses_a_bad_cluster_url_in_one_line() -> None:
    assert Config(redis_url="redis+cluster://h:1,h:2").redis_url == "redis+cluster://h:1,h:2"
    assert Config(redis_url="rediss+cluster://h:1").redis_url == "rediss+cluster://h:1"
    with pytest.raises(ConfigError) as refused:
        Config(redis_url="redis+cluster://h:1/2")
    message = str(refused.value)
    assert message.startswith("--redis-url:") and "redis+cluster://h:1/2" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="redis-url"):
        Config(redis_url="cluster://h:1")


async def test_a_cluster_url_gives_a_cluster_client_with_the_librarys_timeouts(
    cluster: EmbeddedCluster,
) -> None:
    client = redis_client(cluster.url, max_connections=3, timeout=0.5)
    try:
        assert isinstance(client, PresenceCluster)
        kwargs = client.nodes_manager.connection_kwargs
        assert kwargs["socket_timeout"] == 0.5 and kwargs["socket_connect_timeout"] == 0.5
        assert kwargs["decode_responses"] is True
        assert client.retry.get_retries() == 2
        assert await client.set("presence:{x}:k", "v")
        assert await client.get("presence:{x}:k") == "v"
        # Topology trouble is a RedisError like any other (the daemon catches those).
        with pytest.raises(ClusterError):
            await client.execute_command("GET")  # no key: no node to send it to
    finally:
        await client.aclose()
    default = redis_client(cluster.url)
    try:
        assert isinstance(default, PresenceCluster)
        kwargs = default.nodes_manager.connection_kwargs
        assert kwargs["socket_timeout"] == DEFAULT_REDIS_TIMEOUT
    finally:
        await default.aclose()


@pytest.mark.parametrize(
    "raised",
    [
        RuntimeError(
            "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
        ),
        AttributeError("'NoneType' object has no attribute 'writelines'"),
    ],
)
async def test_a_connection_closed_under_a_call_is_a_connection_error(
    raised: Exception,
) -> None:
    with pytest.raises(RedisConnectionError, match="closed under the call"):
        async with _as_redis_errors():
            raise raised


async def test_other_foreign_errors_pass_unchanged() -> None:
    with pytest.raises(RuntimeError, match="something else"):
        async with _as_redis_errors():
            raise RuntimeError("something else")


async def test_calls_beyond_the_cluster_clients_connections_wait_for_a_turn(
    cluster: EmbeddedCluster,
) -> None:
    # redis-py's own cluster pool would raise MaxConnectionsError past 2 + 8 here.
    client = redis_client(cluster.url, max_connections=2, timeout=5.0)
    try:
        counts = await asyncio.gather(*(client.incr("presence:{same}:n") for _ in range(200)))
        assert sorted(counts) == list(range(1, 201))
    finally:
        await client.aclose()


async def test_the_library_survives_600_concurrent_connects_on_a_cluster(
    cluster: EmbeddedCluster,
) -> None:
    presence = Presence.from_url(cluster.url)
    await presence.start()
    try:
        users = [f"many{i}" for i in range(600)]
        results = await asyncio.gather(
            *(presence.connected(f"c-{u}", u) for u in users), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} of 600 calls raised, e.g. {errors[0]!r}"
        assert await presence.query(users) == dict.fromkeys(users, True)
    finally:
        await presence.close()


async def test_scripts_load_on_every_master_and_pipelines_span_slots(
    cluster: EmbeddedCluster,
) -> None:
    scripts = Scripts()
    client = redis_client(cluster.url)
    try:
        await scripts.load(client)
        for node in cluster.nodes:
            if node.role == "master":
                with redis.Redis(port=node.port) as direct:
                    assert all(direct.script_exists(*scripts.sha.values()))
        # One pipeline, many users, so many slots: each call goes to its own master.
        users = [f"user{i}" for i in range(30)]
        results = await scripts.call_many(
            client, [("peek", keys.user_keys(user), ["viewer", 1]) for user in users]
        )
        assert results == [[0, 1]] * len(users)  # offline, first version = now (1)
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def private_cluster() -> AsyncIterator[EmbeddedCluster]:
    """A cluster of this test's own, for tests that kill or fail over its nodes."""
    with EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS) as c:
        yield c


async def test_a_promoted_replica_without_the_scripts_gets_them_on_the_first_call(
    private_cluster: EmbeddedCluster,
) -> None:
    presence = Presence.from_url(private_cluster.url, instance_id="p1", lease_ttl=None)
    await presence.start()
    try:
        assert (await presence.connected("a1", "alice")).went_online
        master = private_cluster.node_for_key(keys.clients_key("alice"))
        private_cluster.kill(master)
        await asyncio.to_thread(private_cluster.wait_healthy, FAILOVER_WAIT)
        promoted = private_cluster.node_for_key(keys.clients_key("alice"))
        with redis.Redis(port=promoted.port) as direct:
            # Replicas never had the scripts: SCRIPT LOAD is not replicated.
            assert not any(direct.script_exists(*presence.scripts.sha.values()))

        async def disconnect() -> bool:
            try:
                return await presence.disconnected("a1")
            except RedisError:  # the client has not seen the new master yet
                return False

        await wait_for(disconnect, FAILOVER_WAIT, what="a disconnect through the new master")
        assert (await presence.query(["alice"])) == {"alice": False}
        with redis.Redis(port=promoted.port) as direct:
            assert all(direct.script_exists(*presence.scripts.sha.values()))
        assert len(presence.scripts.sha) == len(SCRIPT_NAMES)
    finally:
        await presence.close()


async def _next_payload(inbox: Inbox, timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            payload = await inbox.get(timeout=0.5)
            if payload is not None:
                return payload


async def _publish(client: Redis | RedisCluster, channel: str, message: str) -> None:
    pipe = client.pipeline(transaction=False)
    queue_publish(pipe, channel, message)
    await pipe.execute()


async def test_the_inbox_on_one_redis_is_a_plain_channel(redis_url: str) -> None:
    client = redis_client(redis_url)
    inbox = Inbox(client, keys.inbox_channel("d1"))
    try:
        await inbox.subscribe()
        assert await client.pubsub_numsub(keys.inbox_channel("d1")) == [
            (keys.inbox_channel("d1"), 1)
        ]
        await _publish(client, keys.inbox_channel("d1"), "hello")
        assert await _next_payload(inbox) == "hello"
    finally:
        await inbox.aclose()
        await client.aclose()


async def test_the_inbox_on_a_cluster_is_a_sharded_channel_on_its_master(
    cluster: EmbeddedCluster,
) -> None:
    channel = keys.inbox_channel("d1")
    client = redis_client(cluster.url)
    inbox = Inbox(client, channel)
    try:
        await inbox.subscribe()
        serving = cluster.node_for_key(channel)
        for node in cluster.nodes:
            with redis.Redis(port=node.port, decode_responses=True) as direct:
                sharded = direct.execute_command("PUBSUB", "SHARDNUMSUB", channel)
                plain = direct.execute_command("PUBSUB", "NUMSUB", channel)
            assert sharded == [channel, 1 if node.port == serving.port else 0], node
            assert plain == [channel, 0], node
        # A plain subscriber on another master hears nothing: nothing is broadcast.
        other = next(n for n in cluster.nodes if n.role == "master" and n.port != serving.port)
        eavesdropper = redis.Redis(port=other.port).pubsub()  # type: ignore[no-untyped-call]
        eavesdropper.subscribe(channel)
        await _publish(client, channel, "hello")
        assert await _next_payload(inbox) == "hello"
        heard = [eavesdropper.get_message(timeout=0.2) for _ in range(3)]
        assert [m["type"] for m in heard if m is not None] == ["subscribe"]
        eavesdropper.close()
    finally:
        await inbox.aclose()
        await client.aclose()


async def _resubscribe_until_it_hears(client: RedisCluster, channel: str, message: str) -> Inbox:
    """Subscribe again (as the daemon's listener does after an error) until a message
    published after the subscription arrives."""

    async def attempt() -> Inbox | None:
        inbox = Inbox(client, channel)
        try:
            await inbox.subscribe()
            await _publish(client, channel, message)
            if await _next_payload(inbox, timeout=2.0) == message:
                return inbox
        except (RedisError, OSError, TimeoutError):
            pass
        await inbox.aclose()
        return None

    async with asyncio.timeout(FAILOVER_WAIT):
        while (inbox := await attempt()) is None:
            await asyncio.sleep(0.2)
    return inbox


async def test_the_inbox_follows_a_manual_failover_and_a_killed_master(
    private_cluster: EmbeddedCluster,
) -> None:
    channel = keys.inbox_channel("d1")
    client = redis_client(private_cluster.url)
    assert isinstance(client, RedisCluster)
    inbox = Inbox(client, channel)
    try:
        await inbox.subscribe()
        first = private_cluster.node_for_key(channel)

        # Graceful: the replica takes over; the old master drops its shard subscribers.
        replica = next(
            n.port
            for n in private_cluster.nodes
            if n.role == "replica" and _master_port(n.port) == first.port
        )
        with redis.Redis(port=replica) as direct:
            direct.execute_command("CLUSTER", "FAILOVER")
        await asyncio.to_thread(
            _wait_until, lambda: private_cluster.node_for_key(channel).port == replica
        )
        with pytest.raises(RedisError):
            async with asyncio.timeout(FAILOVER_WAIT):
                while True:
                    await inbox.get(timeout=0.5)
        await inbox.aclose()
        inbox = await _resubscribe_until_it_hears(client, channel, "after failover")

        # Brutal: the new master is killed; its replica (the old master) takes over.
        private_cluster.kill(replica)
        with pytest.raises(RedisError):
            async with asyncio.timeout(FAILOVER_WAIT):
                while True:
                    await inbox.get(timeout=0.5)
        await inbox.aclose()
        inbox = await _resubscribe_until_it_hears(client, channel, "after the kill")
        assert private_cluster.node_for_key(channel).port == first.port
    finally:
        await inbox.aclose()
        await client.aclose()


def _master_port(replica_port: int) -> int:
    with redis.Redis(port=replica_port, decode_responses=True) as direct:
        role = direct.execute_command("ROLE")
    return int(role[2])


def _wait_until(condition: Any, timeout: float = FAILOVER_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)
