"""Daemon memory per session: the daemon's resident set before and after it holds N
sessions (raw CONNECTs over UDP; ``--friends`` ring neighbours declared by each, default none).

The figure is ``(VmRSS after - VmRSS before) / sessions``, read from ``/proc``, after a
first batch of sessions has warmed the allocator (its growth is not counted). Redis is
the embedded one; nothing asserts, figures are printed.

Run: ``.venv/bin/python bench/daemon_memory.py [--sessions 20000] [--json]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from loadgen import (
    Rpc,
    bench_main,
    connect_all,
    open_sockets,
    plan_cpus,
    ring_friends,
    start_daemon,
    user_name,
)

from presence_daemon.embedded import EmbeddedRedis


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=20_000, help="sessions measured")
    parser.add_argument("--warmup", type=int, default=2_000, help="sessions before the first read")
    parser.add_argument("--friends", type=int, default=0, help="friends declared per user")
    parser.add_argument("--sockets", type=int, default=64, help="client sockets (addresses)")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpu, _ = plan_cpus()
    total = args.warmup + args.sessions
    with EmbeddedRedis() as redis:
        daemon = start_daemon(redis.url, server_cpu)  # (sessions live 90 s unpinged)
        try:
            socks = open_sockets(args.sockets, daemon.address)
            rpc = Rpc(socks)
            clients = [
                (i % len(socks), f"c-{i:08x}", user_name(i), ring_friends(i, total, args.friends))
                for i in range(total)
            ]
            connect_all(rpc, clients[: args.warmup], 128, lambda s, m: None, time.monotonic() + 120)
            time.sleep(0.5)
            before = rss_bytes(daemon.proc.pid)
            start = time.monotonic()
            connect_all(rpc, clients[args.warmup :], 128, lambda s, m: None, time.monotonic() + 600)
            elapsed = time.monotonic() - start
            time.sleep(0.5)
            after = rss_bytes(daemon.proc.pid)
        finally:
            daemon.stop()
    return {
        "sessions": args.sessions,
        "friends": args.friends,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_session": (after - before) / args.sessions,
        "connect_s": elapsed,
        "errors": dict(rpc.counts),
    }


def report(r: dict[str, Any]) -> str:
    return (
        f"{r['sessions']:,} sessions ({r['friends']} friends each) connected in "
        f"{r['connect_s']:.1f} s; daemon RSS {r['rss_before_mb']:.1f} -> "
        f"{r['rss_after_mb']:.1f} MiB: {r['bytes_per_session']:,.0f} B per session"
        + (f"; errors {r['errors']}" if r["errors"] else "")
    )


if __name__ == "__main__":
    raise SystemExit(bench_main(__doc__, add_arguments, run, report, None))
