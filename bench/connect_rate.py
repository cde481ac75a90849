"""Connect/disconnect throughput of one daemon, and the Redis work each transition costs.

Setup: ``--clients`` users on a ring, each declaring its ``--friends`` nearest
neighbours (so every friendship is mutual), all connected once with their friend list
over raw UDP. Even users stay online (one verified session each: they receive the
notifications); odd users disconnect. Then the load generator keeps ``--window`` odd
users cycling ``Connect`` (padded, no friend list) -> ``ConnectOk`` -> ``Disconnect``
-> ``DisconnectOk``. Every reply is one user transition (offline->online or back), and
each tells that user's online mutual friends (half of them) with a ``Notify``.

Reported: transitions/s over ``--duration`` seconds after ``--warmup``, and Redis
commands per transition from ``INFO commandstats`` (commands run inside Lua scripts are
counted too, and listed per command), plus the CPU used by daemon, Redis and load.

Run alone: ``.venv/bin/python bench/connect_rate.py [--duration S] [--clients N]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from loadgen import bench_main, pin_pid, plan_cpus, run_loadgen, start_daemon
from ping_rate import cpu_us

from presence_daemon.embedded import EmbeddedCluster, EmbeddedRedis


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=1000, help="users (half stay online)")
    parser.add_argument("--friends", type=int, default=20, help="mutual friends per user")
    parser.add_argument("--window", type=int, default=64, help="users cycling at once")
    parser.add_argument("--sockets", type=int, default=16, help="load generator sockets")
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="MASTERS",
        help="run on a Valkey Cluster of this many masters (no replicas) instead of one Redis",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One daemon + its Redis under connect/disconnect churn; returns the loadgen result."""
    server_cpu, load_cpu = plan_cpus()
    store: EmbeddedRedis | EmbeddedCluster = (
        EmbeddedCluster(masters=args.cluster, replicas=0) if args.cluster else EmbeddedRedis()
    )
    with store:
        pids = (
            [node.pid for node in store.nodes]
            if isinstance(store, EmbeddedCluster)
            else [store.process.pid]
        )
        # Redis shares the load generator's CPU: the daemon keeps a core to itself.
        for pid in pids:
            pin_pid(pid, load_cpu)
        daemon = start_daemon(store.url, server_cpu)
        try:
            result = run_loadgen(
                [
                    "churn",
                    "--server",
                    f"{daemon.address[0]}:{daemon.address[1]}",
                    "--clients",
                    str(args.clients),
                    "--friends",
                    str(args.friends),
                    "--window",
                    str(args.window),
                    "--sockets",
                    str(args.sockets),
                    "--warmup",
                    str(args.warmup),
                    "--duration",
                    str(args.duration),
                    "--redis-url",
                    store.url,
                    "--server-pid",
                    str(daemon.proc.pid),
                    "--redis-pid",
                    ",".join(map(str, pids)),
                ],
                load_cpu,
                timeout=args.warmup + args.duration + 240.0,
            )
        finally:
            daemon.stop()
    result["pinning"] = {"server_cpu": server_cpu, "load_cpu": load_cpu}
    result["store"] = f"cluster of {args.cluster} masters" if args.cluster else "one Redis"
    return result


def report(r: dict[str, Any]) -> str:
    """Human-readable lines for one run."""
    transitions = max(r["transitions_total"], 1)
    per_command = ", ".join(
        f"{name} {calls / transitions:.2f}"
        for name, calls in sorted(r["redis_calls"].items(), key=lambda kv: -kv[1])
    )
    rates = r["slice_rates"]
    spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "n/a"
    pin = r["pinning"]
    placement = (
        "nothing pinned (fewer than 2 CPUs)"
        if pin["server_cpu"] is None
        else f"daemon on cpu {pin['server_cpu']}; redis + load generator on cpu {pin['load_cpu']}"
    )
    return "\n".join(
        [
            f"users {r['users']} ({r['online_users']} stay online), {r['friends']} mutual "
            f"friends each, {r['window']} cycling at once; setup {r['setup_s']:.1f} s",
            f"placement: {placement}",
            f"transitions/s {r['transitions_per_s']:,.0f} (0.5 s slices {spread}); "
            f"notifications received/s {r['notifications_per_s']:,.0f}",
            f"cpu: daemon {r['server_cpu']:.0%}, redis {r['redis_cpu']:.0%}, "
            f"load {r['load_cpu']:.0%}, other {r['other_cpu']:.0%}; per transition: "
            f"daemon {cpu_us(r['server_cpu'], r['transitions_per_s']):,.0f} cpu-us, "
            f"redis {cpu_us(r['redis_cpu'], r['transitions_per_s']):,.0f} cpu-us",
            f"redis commands per transition {r['redis_calls_per_transition']:.1f} "
            f"(EVALSHA {r['evalsha_per_transition']:.1f}); per command: {per_command}",
            f"online friends shown in ConnectOk: {r['visible_online_friends']:.1f} "
            f"of {r['friends']}; load-side counters: {r['counts'] or 'none'}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, add_arguments, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
