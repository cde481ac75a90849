"""Ping throughput: the daemon against a bare uvloop + msgpack ceiling, in one run.

1. *Ceiling*: ``loadgen.py ceiling-server`` (uvloop ``DatagramProtocol``, msgpack-decode
   each datagram, reply with a small msgpack map) is loaded with pings.
2. *Daemon*: ``python -m presence_daemon`` against a private Redis; the load generator
   opens ``--clients`` real sessions (padded ``Connect`` -> ``ConnectOk``) spread over
   ``--sockets`` UDP sockets, then pings them round-robin at full speed.

Both targets get the same load: ``--window`` pings in flight per socket, ``--warmup``
seconds unmeasured, then ``--duration`` seconds counted. The server is pinned to one
CPU and the load generator to another (``os.sched_setaffinity``) when there are two.
Redis ``INFO commandstats`` is read before and after the daemon's ping phase: pings are
answered from memory, so the expected figure is 0 commands per ping.

3. *Processes* (``--processes N``, N > 1): the daemon with ``--processes 1`` and then
   with ``--processes N`` (a supervisor and N workers on one port), under the same load,
   with nothing pinned: the workers and the load generator share every CPU. The scaling
   is the ratio of the two reply rates. The load generator is one process and needs a
   core of its own at these rates: on a machine with N cores or fewer, the figure says
   how the workers share what the load generator leaves, not how N cores scale.

Run alone: ``.venv/bin/python bench/ping_rate.py [--duration S] [--clients N]
[--processes N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from loadgen import (
    bench_main,
    pin_pid,
    plan_cpus,
    run_loadgen,
    start_ceiling,
    start_daemon,
    stop_process,
)

from presence_daemon.embedded import EmbeddedRedis


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=1000, help="daemon sessions pinged")
    parser.add_argument("--sockets", type=int, default=16, help="load generator sockets")
    parser.add_argument("--window", type=int, default=16, help="pings in flight per socket")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="also measure the daemon with this many processes against 1 (both unpinned)",
    )


def load_args(args: argparse.Namespace, server: tuple[str, int]) -> list[str]:
    return [
        "ping",
        "--server",
        f"{server[0]}:{server[1]}",
        "--clients",
        str(args.clients),
        "--sockets",
        str(args.sockets),
        "--window",
        str(args.window),
        "--warmup",
        str(args.warmup),
        "--duration",
        str(args.duration),
    ]


def measure_daemon(
    args: argparse.Namespace,
    redis: EmbeddedRedis,
    server_cpu: int | None,
    load_cpu: int | None,
    processes: int = 1,
) -> dict[str, Any]:
    """Start a daemon with ``processes`` processes on ``redis``, load it, stop it."""
    timeout = args.warmup + args.duration + 120.0
    daemon = start_daemon(redis.url, server_cpu, processes=processes)
    try:
        result = run_loadgen(
            [
                *load_args(args, daemon.address),
                "--connect",
                "--redis-url",
                redis.url,
                "--server-pid",
                str(daemon.proc.pid),
                "--redis-pid",
                str(redis.process.pid),
            ],
            load_cpu,
            timeout,
        )
    finally:
        daemon.stop()
    result["processes"] = processes
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the ceiling, then the daemon; returns both results and their ratio (and,
    with ``--processes`` above 1, the daemon with 1 and N processes, unpinned)."""
    if args.processes < 1:
        raise SystemExit("ping_rate.py: --processes must be at least 1")
    server_cpu, load_cpu = plan_cpus()
    timeout = args.warmup + args.duration + 120.0

    ceiling, address = start_ceiling(server_cpu)
    try:
        ceiling_result = run_loadgen(
            [*load_args(args, address), "--server-pid", str(ceiling.pid)], load_cpu, timeout
        )
    finally:
        stop_process(ceiling)

    with EmbeddedRedis() as redis:
        pin_pid(redis.process.pid, load_cpu)  # idle while pinging; keep it off the server CPU
        daemon_result = measure_daemon(args, redis, server_cpu, load_cpu)
        result: dict[str, Any] = {
            "pinning": {"server_cpu": server_cpu, "load_cpu": load_cpu},
            "ceiling": ceiling_result,
            "daemon": daemon_result,
            "ratio": daemon_result["replies_per_s"] / max(ceiling_result["replies_per_s"], 1e-9),
            "cpu_ratio": cpu_us(ceiling_result["server_cpu"], ceiling_result["replies_per_s"])
            / cpu_us(daemon_result["server_cpu"], daemon_result["replies_per_s"]),
        }
        if args.processes > 1:
            pin_pid(redis.process.pid, None)
            one = measure_daemon(args, redis, None, None, 1)
            many = measure_daemon(args, redis, None, None, args.processes)
            result["processes"] = {
                "cpus": len(os.sched_getaffinity(0)),
                "one": one,
                "many": many,
                "scaling": many["replies_per_s"] / max(one["replies_per_s"], 1e-9),
            }
    return result


def cpu_us(cpu_share: float, per_second: float) -> float:
    """CPU microseconds per operation: steadier than a rate on a shared machine."""
    return cpu_share / per_second * 1e6 if per_second else float("nan")


def report(result: dict[str, Any]) -> str:
    """Human-readable lines for one run."""
    pin = result["pinning"]
    lines = []
    if pin["server_cpu"] is None:
        lines.append("note: fewer than 2 CPUs available, nothing pinned")
    else:
        lines.append(
            f"pinned: server on cpu {pin['server_cpu']}, load generator on cpu {pin['load_cpu']}"
            " (server and load share this machine: a 2-core box measures one core each)"
        )
    for name in ("ceiling", "daemon"):
        r = result[name]
        lines.append(
            f"{name:8} {r['replies_per_s']:>10,.0f} replies/s  sent {r['sent_per_s']:>9,.0f}/s  "
            f"loss {r['loss']:.2%}  cpu: server {r['server_cpu']:.0%} "
            f"load {r['load_cpu']:.0%} other {r['other_cpu']:.0%}; "
            f"server {cpu_us(r['server_cpu'], r['replies_per_s']):.1f} cpu-us/reply  "
            f"({r['sockets']} sockets x {r['window']} in flight)"
        )
    daemon = result["daemon"]
    lines.append(
        f"daemon/ceiling ratio {result['ratio']:.2f} (replies/s), "
        f"{result['cpu_ratio']:.2f} (cpu-us per reply, ceiling/daemon)"
    )
    lines.append(
        f"daemon sessions {daemon['clients']} (connected in {daemon['connect_s']:.2f} s); "
        f"redis commands per ping {daemon['redis_calls_per_ping']:.4f} "
        f"({daemon['redis_calls'] or 'none'})"
    )
    if "processes" in result:
        lines.extend(report_processes(result["processes"]))
    for name in ("ceiling", "daemon"):
        if result[name]["load_cpu"] > 0.9 and result[name]["server_cpu"] < 0.9:
            lines.append(f"warning: the load generator, not the {name}, may be the bottleneck")
    return "\n".join(lines)


def report_processes(part: dict[str, Any]) -> list[str]:
    """Lines for the 1 vs N processes comparison."""
    one, many = part["one"], part["many"]
    lines = ["processes (nothing pinned: the workers and the load generator share the CPUs):"]
    for r in (one, many):
        lines.append(
            f"  {r['processes']:>2} process{'es' if r['processes'] > 1 else '  '} "
            f"{r['replies_per_s']:>10,.0f} replies/s  loss {r['loss']:.2%}  cpu: daemon "
            f"{r['server_cpu']:.0%} load {r['load_cpu']:.0%} other {r['other_cpu']:.0%}; "
            f"daemon {cpu_us(r['server_cpu'], r['replies_per_s']):.1f} cpu-us/reply"
        )
    lines.append(f"  scaling 1 -> {many['processes']} processes: {part['scaling']:.2f}x")
    if part["cpus"] <= many["processes"]:
        lines.append(
            f"  note: {part['cpus']} CPUs for {many['processes']} workers and the load "
            "generator, which needs about a core itself: this shows how the workers share "
            "what it leaves, not how that many cores scale"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, add_arguments, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
