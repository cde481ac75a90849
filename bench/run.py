"""Run every benchmark and print one summary table (this is what ``make bench`` runs).

``.venv/bin/python bench/run.py [--duration S] [--clients N] [--processes N] [--json]``

With ``--json`` the report goes to stderr and stdout holds only the JSON document.

The figures are for the machine printed above the table; on a 2-core machine the server
gets one core and the load generator the other (see bench/README.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import connect_rate
import notify_latency
import ping_rate
from loadgen import machine
from ping_rate import cpu_us

BEFORE: dict[str, tuple[str, str]] = {
    "ping_ratio": ("0.54", "0.68-0.75 (other machine)"),
    "ping_cpu_us": ("16.8", "10.4 (other machine)"),
    "transitions_per_s": ("383", "857-958 (other machine)"),
    "transition_cpu_us": ("2,600", "1,100 (other machine)"),
    "commands_per_transition": ("81.3", "71.7"),
    "cluster_transitions_per_s": ("not wired", "not wired"),
}
"""Figures before issue 12: main at e38d538 measured on this benchmark machine (2 CPUs,
AMD EPYC; see docs/performance.md), and the issue's own baseline. Kept here so every run
prints its figures beside them."""

GOALS: dict[str, str] = {
    "ping_ratio": ">= 0.90",
    "ping_cpu_us": "",
    "transitions_per_s": ">= 10,000 per process",
    "transition_cpu_us": "",
    "commands_per_transition": "<= 10",
    "cluster_transitions_per_s": "",
}


def before_after(
    ping: dict[str, Any], churn: dict[str, Any], cluster: dict[str, Any] | None
) -> str:
    """The issue-12 table: each figure before (this machine, and the issue's) and now."""
    daemon = ping["daemon"]
    now = {
        "ping_ratio": f"{ping['ratio']:.2f}",
        "ping_cpu_us": f"{cpu_us(daemon['server_cpu'], daemon['replies_per_s']):.1f}",
        "transitions_per_s": fmt_rate(churn["transitions_per_s"]),
        "transition_cpu_us": f"{cpu_us(churn['server_cpu'], churn['transitions_per_s']):,.0f}",
        "commands_per_transition": f"{churn['redis_calls_per_transition']:.1f}",
        "cluster_transitions_per_s": fmt_rate(cluster["transitions_per_s"]) if cluster else "-",
    }
    names = {
        "ping_ratio": "pings: daemon / ceiling",
        "ping_cpu_us": "pings: daemon cpu-us per ping",
        "transitions_per_s": "transitions/s, one process, 20 friends",
        "transition_cpu_us": "transitions: daemon cpu-us each",
        "commands_per_transition": "Redis commands per transition",
        "cluster_transitions_per_s": "transitions/s on a 3-master cluster",
    }
    rows = [("figure", "before (e38d538)", "now", "issue baseline", "goal")]
    for key, name in names.items():
        rows.append((name, BEFORE[key][0], now[key], BEFORE[key][1], GOALS[key]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def spread(rates: Sequence[float]) -> str:
    if not rates:
        return ""
    return (
        f"0.5 s slices {min(rates):,.0f}..{max(rates):,.0f}, median {statistics.median(rates):,.0f}"
    )


def table(rows: Sequence[tuple[str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}".rstrip())
        if n == 0:
            lines.append(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * widths[2]}")
    return "\n".join(lines)


def summary(ping: dict[str, Any], churn: dict[str, Any], latency: dict[str, Any]) -> str:
    ceiling, daemon = ping["ceiling"], ping["daemon"]
    rows: list[tuple[str, str, str]] = [("figure", "value", "notes")]
    rows.append(
        (
            "ceiling: uvloop+msgpack echo, replies/s",
            fmt_rate(ceiling["replies_per_s"]),
            f"loss {ceiling['loss']:.2%}; "
            f"{cpu_us(ceiling['server_cpu'], ceiling['replies_per_s']):.1f} server cpu-us/reply; "
            f"cpu server {ceiling['server_cpu']:.0%} "
            f"load {ceiling['load_cpu']:.0%}; {spread(ceiling['slice_rates'])}",
        )
    )
    rows.append(
        (
            f"daemon: pings/s, {daemon['clients']} sessions",
            fmt_rate(daemon["replies_per_s"]),
            f"loss {daemon['loss']:.2%}; "
            f"{cpu_us(daemon['server_cpu'], daemon['replies_per_s']):.1f} daemon cpu-us/ping; "
            f"cpu daemon {daemon['server_cpu']:.0%} "
            f"load {daemon['load_cpu']:.0%}; {spread(daemon['slice_rates'])}",
        )
    )
    cpu_ratio = cpu_us(ceiling["server_cpu"], ceiling["replies_per_s"]) / cpu_us(
        daemon["server_cpu"], daemon["replies_per_s"]
    )
    rows.append(
        (
            "daemon / ceiling",
            f"{ping['ratio']:.2f}",
            f"pings/s over replies/s (by cpu-us per reply: {cpu_ratio:.2f})",
        )
    )
    rows.append(
        (
            "redis commands per ping",
            f"{daemon['redis_calls_per_ping']:.4f}",
            f"{daemon['replies_total']:,} pings; expected 0 (pings are answered from memory)",
        )
    )
    if "processes" in ping:
        part = ping["processes"]
        one, many = part["one"], part["many"]
        rows.append(
            (
                f"daemon: pings/s, {many['processes']} processes (unpinned)",
                fmt_rate(many["replies_per_s"]),
                f"1 process unpinned: {fmt_rate(one['replies_per_s'])}; "
                f"{cpu_us(many['server_cpu'], many['replies_per_s']):.1f} daemon cpu-us/ping; "
                f"cpu daemon {many['server_cpu']:.0%} load {many['load_cpu']:.0%}",
            )
        )
        rows.append(
            (
                f"scaling 1 -> {many['processes']} processes",
                f"{part['scaling']:.2f}x",
                f"{part['cpus']} CPUs shared with the load generator"
                + (
                    " (it needs a core too: not a cores-scaling figure)"
                    if part["cpus"] <= many["processes"]
                    else ""
                ),
            )
        )
    rows.append(
        (
            f"daemon: transitions/s ({churn['friends']} friends, half online)",
            fmt_rate(churn["transitions_per_s"]),
            f"{churn['window']} users cycling; per transition "
            f"{cpu_us(churn['server_cpu'], churn['transitions_per_s']):,.0f} daemon cpu-us, "
            f"{cpu_us(churn['redis_cpu'], churn['transitions_per_s']):,.0f} redis cpu-us; "
            f"cpu daemon {churn['server_cpu']:.0%} redis {churn['redis_cpu']:.0%} "
            f"load {churn['load_cpu']:.0%}; {spread(churn['slice_rates'])}",
        )
    )
    rows.append(
        (
            "redis commands per transition",
            f"{churn['redis_calls_per_transition']:.1f}",
            f"incl. inside Lua; EVALSHA {churn['evalsha_per_transition']:.1f}, "
            f"HGETALL {churn['redis_calls'].get('hgetall', 0) / churn['transitions_total']:.1f}",
        )
    )
    rows.append(
        (
            "notifications received/s",
            fmt_rate(churn["notifications_per_s"]),
            "Notify datagrams to the online friends, during the churn",
        )
    )
    load = f"{latency['load_share']:.0%} ping load"
    for where in ("same", "across"):
        idle, loaded = latency[f"{where}_idle"], latency[f"{where}_loaded"]
        rows.append(
            (
                f"connect -> mutual friend notified, p50/p99 ms, {where} daemon"
                + ("s" if where == "across" else ""),
                f"{idle['connect_p50_ms']:.2f}/{idle['connect_p99_ms']:.2f}",
                f"idle; at {load} ({loaded['load_pings_per_s']:,.0f}/s) "
                f"{loaded['connect_p50_ms']:.2f}/{loaded['connect_p99_ms']:.2f}; "
                f"disconnect -> offline idle "
                f"{idle['disconnect_p50_ms']:.2f}/{idle['disconnect_p99_ms']:.2f}, "
                f"loaded {loaded['disconnect_p50_ms']:.2f}/{loaded['disconnect_p99_ms']:.2f}; "
                f"{latency['cycles']} cycles",
            )
        )
    return table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=1000, help="sessions / users")
    parser.add_argument(
        "--latency-cycles", type=int, default=300, help="notify latency: cycles per setting"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="also measure pings with this many daemon processes against 1 (1: skip)",
    )
    parser.add_argument(
        "--cluster",
        type=int,
        default=3,
        metavar="MASTERS",
        help="also measure transitions on a Valkey Cluster of this many masters (0: skip)",
    )
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    args = parser.parse_args(argv)
    # With --json, stdout is the JSON document alone (tools compare versions by it); the
    # human-readable report goes to stderr.
    say = functools.partial(print, file=sys.stderr if args.json else sys.stdout)

    info = machine()
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    say(f"command: {command}  (make bench)")
    say(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"{info['platform']}, load average before start {os.getloadavg()[0]:.2f}"
    )
    started = time.monotonic()

    ping_args = argparse.Namespace(
        duration=args.duration,
        warmup=args.warmup,
        clients=args.clients,
        sockets=16,
        window=16,
        processes=args.processes,
    )
    say("\n== ping rate (bench/ping_rate.py)", flush=True)
    ping = ping_rate.run(ping_args)
    say(ping_rate.report(ping), flush=True)

    churn_args = argparse.Namespace(
        duration=args.duration,
        warmup=args.warmup,
        clients=args.clients,
        friends=20,
        window=64,
        sockets=16,
        cluster=0,
    )
    say("\n== connect rate (bench/connect_rate.py)", flush=True)
    churn = connect_rate.run(churn_args)
    say(connect_rate.report(churn), flush=True)
    cluster = None
    if args.cluster:
        say(f"\n== connect rate on a {args.cluster}-master cluster (--cluster)", flush=True)
        cluster = connect_rate.run(
            argparse.Namespace(**{**vars(churn_args), "cluster": args.cluster})
        )
        say(connect_rate.report(cluster), flush=True)

    latency_parser = argparse.ArgumentParser()
    notify_latency.add_arguments(latency_parser)
    latency_args = latency_parser.parse_args(["--cycles", str(args.latency_cycles)])
    say("\n== notify latency (bench/notify_latency.py)", flush=True)
    latency = notify_latency.run(latency_args)
    say(notify_latency.report(latency), flush=True)

    say(f"\n== summary ({time.monotonic() - started:.0f} s)")
    say(summary(ping, churn, latency))
    say("\n== issue 12: before and after")
    say(before_after(ping, churn, cluster))
    busy = max(
        ping["ceiling"]["other_cpu"],
        ping["daemon"]["other_cpu"],
        churn["other_cpu"],
        *([cluster["other_cpu"]] if cluster else []),
        *(latency[name]["other_cpu"] for name, _, _ in notify_latency.SETTINGS),
    )
    if ping["pinning"]["server_cpu"] is None:
        say("note: fewer than 2 CPUs available: server and load generator were not pinned.")
    else:
        say(
            f"note: only {info['nproc']} CPUs here: the server runs on cpu "
            f"{ping['pinning']['server_cpu']}, the load generator (and Redis) on cpu "
            f"{ping['pinning']['load_cpu']}; nothing else should run meanwhile."
        )
    if busy > 0.1:
        say(
            f"warning: other processes used up to {busy:.0%} of a core during the runs; "
            "the figures are low and noisy. Re-run on an idle machine."
        )
    if args.json:
        results = {"machine": info, "ping": ping, "connect": churn, "latency": latency}
        if cluster:
            results["connect_cluster"] = cluster
        print(json.dumps(results, indent=2))  # stdout holds the JSON document alone
    return 0


if __name__ == "__main__":
    sys.exit(main())
