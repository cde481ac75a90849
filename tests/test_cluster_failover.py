"""A master killed under load: two daemons on a real Valkey Cluster, mutual friends
spread over both, churn running; the master that serves some users' slots and one
daemon's inbox is SIGKILLed. Its replica takes over, the daemons follow the new
topology, and Redis and every client's view come right again within a bound (see
``cluster_churn.Scenario.problems`` for what "right" means).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cluster_churn import Scenario
from conftest import CLUSTER_NODE_TIMEOUT_MS
from daemons import DaemonFactory
from presence_daemon import keys
from presence_daemon.embedded import EmbeddedCluster

FAILOVER_WAIT = 30.0
"""Bound for the replica to take over (node timeout 1.5 s and an election; CI noise)."""
CONVERGE_WAIT = 30.0
"""Bound for Redis and every view to be right again after the kill."""


@pytest.fixture
def cluster_daemons() -> Iterator[tuple[EmbeddedCluster, DaemonFactory]]:
    """A private cluster (this test kills one of its masters) and daemons on it."""
    with EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS) as c:
        factory = DaemonFactory(c.url)
        try:
            yield c, factory
            broken = factory.close_all()
            if broken:
                logs = "\n\n".join(f"{d!r} stderr:\n{d.stderr()}" for d in broken)
                pytest.fail(f"daemon logged a traceback:\n{logs}")
        finally:
            factory.close_all()
            factory.cleanup()


async def test_a_master_killed_under_churn_is_healed_in_redis_and_every_view(
    cluster_daemons: tuple[EmbeddedCluster, DaemonFactory],
) -> None:
    cluster, factory = cluster_daemons
    daemons = [factory("d1"), factory("d2")]
    async with Scenario(cluster, daemons) as scenario:
        await scenario.converge(time.monotonic(), CONVERGE_WAIT)
        victim = cluster.node_for_key(keys.inbox_channel("d1"))
        on_victim = [
            u for u in scenario.members if cluster.node_for_key(keys.clients_key(u)) == victim
        ]
        assert on_victim, "the victim serves no user of the scenario"

        stop = asyncio.Event()
        churn = asyncio.get_running_loop().create_task(scenario.churn(stop))
        try:
            await _until(lambda: _ops(scenario) >= 10, "churn is under way")
            killed_at = time.monotonic()
            cluster.kill(victim)
            await asyncio.to_thread(cluster.wait_healthy, FAILOVER_WAIT)
            promoted = cluster.node_for_key(keys.inbox_channel("d1"))
            assert promoted.port != victim.port and promoted.role == "master"
            # Churn goes on through the new master for a while: every churner connects
            # or disconnects a few more times after the takeover.
            after = _ops(scenario)
            await _until(
                lambda: _ops(scenario) >= after + 4 * len(scenario.churning()),
                "churn goes on after the failover",
            )
        finally:
            stop.set()
            await asyncio.wait_for(churn, 30.0)
        took = await scenario.converge(killed_at, CONVERGE_WAIT)
        print(
            f"\nkilled master {victim.port} ({len(on_victim)} users, d1's inbox); "
            f"{_ops(scenario)} churn operations; right again {took:.2f} s after the kill"
        )


def _ops(scenario: Scenario) -> int:
    return sum(m.ops for m in scenario.churning())


async def _until(condition: object, what: str, timeout: float = FAILOVER_WAIT) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.02)
