"""Tests for presence_daemon.embedded (the real redis-server used by the suite)."""

from __future__ import annotations

import os

import pytest
import redis
import redis.asyncio

from presence_daemon.embedded import EmbeddedRedis, find_redis_server


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
