"""The auto-pipelining Batcher and its lean connection, against real Redis servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from faults import RedisServer
from presence_daemon import keys
from presence_daemon.batch import Batcher, LeanCluster, LeanConnection
from presence_daemon.embedded import EmbeddedCluster
from presence_daemon.presence import redis_client


@pytest_asyncio.fixture(params=["lean", "redis-py"])
async def batcher(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Batcher]:
    """A Batcher on the session Redis, on either path."""
    client = redis_client(redis_url)
    b = Batcher(client, lean=request.param == "lean")
    assert (b.lean is not None) == (request.param == "lean")
    try:
        yield b
    finally:
        await b.close()
        await client.aclose()


async def test_one_tick_is_one_pipeline_and_each_caller_gets_its_answer(
    batcher: Batcher, r: redis.asyncio.Redis
) -> None:
    await r.hset("h", mapping={"a": "1", "b": "2"})
    await r.sadd("s", "x", "y")
    await r.set("k", "v")
    answers = await asyncio.gather(
        batcher.execute_command("HGETALL", "h"),
        batcher.execute_command("SMEMBERS", "s"),
        batcher.execute_command("GET", "k"),
        batcher.execute_command("GET", "missing"),
        batcher.execute_command("SADD", "s", "z"),
        batcher.execute_command("EVAL", "return {1, 'two', {3}}", 0),
        *[batcher.execute_command("INCR", "n") for _ in range(50)],
    )
    assert answers[:6] == [{"a": "1", "b": "2"}, {"x", "y"}, "v", None, 1, [1, "two", [3]]]
    assert sorted(answers[6:]) == list(range(1, 51))
    assert (batcher.pipelines, batcher.commands) == (1, 56)
    # The same answers as redis-py's own calls.
    assert answers[0] == await r.hgetall("h")
    assert await batcher.execute_command("SMEMBERS", "s") == await r.smembers("s")


async def test_an_error_reply_fails_only_its_own_command(batcher: Batcher) -> None:
    results = await batcher.execute_many(
        [("SET", "k", "v"), ("HGETALL", "k"), ("EVALSHA", "0" * 40, 0), ("GET", "k")]
    )
    assert results[0] is True or results[0] == "OK"
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    assert isinstance(results[2], NoScriptError)
    assert results[3] == "v"
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await batcher.execute_command("HGETALL", "k")


async def test_a_cancelled_caller_does_not_disturb_the_others(batcher: Batcher) -> None:
    doomed = asyncio.ensure_future(batcher.execute_command("INCR", "n"))
    kept = asyncio.ensure_future(batcher.execute_command("INCR", "n"))
    await asyncio.sleep(0)
    doomed.cancel()
    assert await kept in (1, 2)
    assert await batcher.execute_command("GET", "n") in ("1", "2")


async def test_lean_connection_speaks_auth_and_select(
    redis_url: str, r: redis.asyncio.Redis
) -> None:
    await r.acl_setuser(
        "lean", enabled=True, passwords=["+secret-pw"], keys=["*"], commands=["+@all"]
    )
    try:
        parts = urlsplit(redis_url)
        url = f"redis://lean:secret-pw@{parts.hostname}:{parts.port}/3"
        client = redis_client(url)
        b = Batcher(client)
        assert b.lean is not None
        try:
            await b.execute_command("SET", "in-db-3", "yes")
            assert await r.get("in-db-3") is None  # db 0 did not get it
            assert await client.get("in-db-3") == "yes"
        finally:
            await b.close()
            await client.aclose()
        wrong = LeanConnection(
            host=str(parts.hostname), port=int(str(parts.port)), username="lean", password="no"
        )
        with pytest.raises(ResponseError):
            await wrong.run([("PING",)])
        wrong.close()
    finally:
        await r.acl_deluser("lean")


def test_lean_path_is_used_only_where_it_can_speak_for_the_client() -> None:
    assert LeanConnection.for_client(redis_client("redis://127.0.0.1:1")) is not None
    assert LeanConnection.for_client(redis_client("unix:///tmp/none.sock")) is not None
    assert LeanConnection.for_client(redis_client("rediss://127.0.0.1:1")) is None
    raw = redis.asyncio.Redis.from_url("redis://127.0.0.1:1")  # bytes answers
    assert LeanConnection.for_client(raw) is None


async def test_lean_connection_fails_fast_when_redis_dies_and_recovers_when_it_is_back() -> None:
    with RedisServer() as server:
        lean = LeanConnection(host="127.0.0.1", port=server.port, timeout=1.0)
        try:
            assert await lean.run([("SET", "k", "v"), ("GET", "k")]) == ["OK", "v"]
            server.kill()
            with pytest.raises(RedisConnectionError):
                await lean.run([("GET", "k")])
            server.restart_empty()
            assert await lean.run([("GET", "k")]) == [None]  # a new connection, new server
        finally:
            lean.close()


async def test_lean_connection_times_out_on_a_stalled_redis_and_never_mixes_answers() -> None:
    with RedisServer() as server:
        lean = LeanConnection(host="127.0.0.1", port=server.port, timeout=0.5)
        try:
            await lean.run([("SET", "a", "A"), ("SET", "b", "B")])
            server.pause()
            try:
                with pytest.raises(RedisTimeoutError):
                    await lean.run([("GET", "a"), ("GET", "b"), ("GET", "a")])
            finally:
                server.resume()
            # The stalled GET's late answer ("A") must not be taken for this one.
            assert await lean.run([("GET", "b")]) == ["B"]
        finally:
            lean.close()


async def test_lean_cluster_sends_each_command_to_its_slots_master(
    cluster: EmbeddedCluster,
) -> None:
    cluster.flushall()
    client = redis_client(cluster.url)
    b = Batcher(client)
    assert isinstance(b.lean, LeanCluster)
    try:
        users = [f"u{i}" for i in range(30)]  # spread over the three masters
        masters = {cluster.node_for_key(keys.clients_key(u)).port for u in users}
        assert len(masters) == 3
        await b.execute_many([("HSET", keys.clients_key(u), "c", u) for u in users])
        answers = await b.execute_many([("HGETALL", keys.clients_key(u)) for u in users])
        assert answers == [{"c": u} for u in users]
        assert b.pipelines == 2 and b.lean.resent == 0
        # Each master holds its own users' keys: the commands went where they belong.
        for user in users:
            port = cluster.node_for_key(keys.clients_key(user)).port
            with redis.Redis(port=port, decode_responses=True) as direct:
                assert direct.hget(keys.clients_key(user), "c") == user
    finally:
        await b.close()
        await client.aclose()


async def test_lean_cluster_follows_a_redirect_from_a_stale_slot_map(
    cluster: EmbeddedCluster,
) -> None:
    cluster.flushall()
    client = redis_client(cluster.url)
    assert isinstance(client, RedisCluster)
    b = Batcher(client)
    assert isinstance(b.lean, LeanCluster)
    try:
        key = keys.clients_key("alice")
        await b.execute_command("HSET", key, "c", "1")
        # The map now names another master for alice's slot (as after a failover or a
        # resharding this client has not heard of): that node answers MOVED.
        manager = client.nodes_manager
        slot = client.keyslot(key)
        right = manager.get_node_from_slot(slot)
        wrong = next(n for n in client.get_primaries() if n.port != right.port)
        manager.slots_cache[slot] = [wrong]
        assert await b.execute_command("HGETALL", key) == {"c": "1"}
        assert b.lean.resent == 1
        # The cluster client learned the right node from the redirect.
        assert manager.get_node_from_slot(slot).port == right.port
    finally:
        await b.close()
        await client.aclose()
