"""What a flood of forged CONNECTs from one address costs Redis, with and without limits.

``.venv/bin/python bench/forged_connects.py [--rate N] [--duration S] [--users N]``

Setup: ``--users`` users, each declaring ``--friends`` friends (the expensive case of
issue 11: every CONNECT reads each declared friend's state for its reply), connected
once through the SDK. Then one UDP socket on 127.0.0.1 sends forged CONNECTs (padded
to 128 bytes, new client id each, naming those users in turn) at ``--rate`` a second
for ``--duration`` seconds. Reported, for a daemon with its default limits and for
one with every limit lifted: Redis commands run per second (``INFO commandstats``,
calls inside scripts included, the daemon's idle background subtracted), Redis CPU
per second, the daemon's CPU, and how it answered (CONNECT_OK, TRY_AGAIN, nothing:
a datagram the daemon was too busy to read before its socket buffer filled).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
from loadgen import UNLIMITED, cpu_seconds, start_daemon

from presence_client.protocol import Connect, ConnectOk, Error, ErrorCode, decode, encode
from presence_client.sdk import PresenceClient
from presence_daemon.embedded import EmbeddedRedis


def redis_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def declare(address: tuple[str, int], users: int, friends: int) -> None:
    """Each user declares ``friends`` names, through the SDK (a multi-part SET)."""
    for n in range(users):
        names = [f"u{n}-friend-{i}" for i in range(friends)]
        client = PresenceClient(f"user{n}", names, servers=[address], client_id=f"real{n}")
        await client.connect()
        await client.disconnect()


def flood(address: tuple[str, int], rate: float, duration: float, users: int) -> dict[str, int]:
    """Send forged CONNECTs at ``rate`` for ``duration`` s; count the answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    answers = {"sent": 0, "connect_ok": 0, "try_again": 0, "other": 0}
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + duration + 0.5:
        while now < start + duration and n < (now - start) * rate:
            msg = Connect(n + 1, f"forged{n}", f"user{n % users}", None)
            sock.sendto(encode(msg, pad_to=128), address)
            n += 1
        try:
            while True:
                reply = decode(sock.recv(2048))
                if isinstance(reply, ConnectOk):
                    answers["connect_ok"] += 1
                elif isinstance(reply, Error) and reply.code is ErrorCode.TRY_AGAIN:
                    answers["try_again"] += 1
                else:
                    answers["other"] += 1
        except BlockingIOError:
            pass
        time.sleep(0.001)
    answers["sent"] = n
    sock.close()
    return answers


def measure(args: argparse.Namespace, limits: Sequence[str]) -> dict[str, Any]:
    with EmbeddedRedis() as server:
        # Long timeouts: no forged session expires (and costs Redis) while we measure.
        daemon = start_daemon(server.url, None, limits=limits)
        client = redis.Redis.from_url(server.url)
        try:
            asyncio.run(declare(daemon.address, args.users, args.friends))
            pid = server.process.pid
            before, cpu_before = redis_calls(client), cpu_seconds(pid)
            time.sleep(args.duration)
            idle = (redis_calls(client) - before) / args.duration
            idle_cpu = (cpu_seconds(pid) - cpu_before) / args.duration
            before, cpu_before = redis_calls(client), cpu_seconds(pid)
            daemon_cpu_before = cpu_seconds(daemon.proc.pid)
            started = time.monotonic()
            answers = flood(daemon.address, args.rate, args.duration, args.users)
            elapsed = time.monotonic() - started
            calls = redis_calls(client) - before
            cpu = cpu_seconds(pid) - cpu_before
            daemon_cpu = cpu_seconds(daemon.proc.pid) - daemon_cpu_before
        finally:
            client.close()
            daemon.stop()
    return {
        **answers,
        "commands_per_s": calls / elapsed - idle,
        "commands_per_forged": (calls - idle * elapsed) / max(answers["sent"], 1),
        "redis_cpu": cpu / elapsed - idle_cpu,
        "daemon_cpu": daemon_cpu / elapsed,
        "idle_commands_per_s": idle,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=2000, help="forged CONNECTs per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of flood")
    parser.add_argument("--users", type=int, default=1, help="users the forgeries name")
    parser.add_argument("--friends", type=int, default=1000, help="friends each user declares")
    args = parser.parse_args(argv)
    print(
        f"forged CONNECTs (128 B) from one address at {args.rate:,.0f}/s for "
        f"{args.duration} s, naming {args.users} user(s) with {args.friends} friends each"
    )
    for name, limits in (("default limits", ()), ("no limits", UNLIMITED)):
        r = measure(args, limits)
        print(
            f"{name:>15}: sent {r['sent']:,}, CONNECT_OK {r['connect_ok']:,}, "
            f"TRY_AGAIN {r['try_again']:,}, other {r['other']:,}; Redis "
            f"{r['commands_per_s']:,.0f} commands/s ({r['commands_per_forged']:.1f} per "
            f"forged datagram), cpu {r['redis_cpu']:.0%} (idle background "
            f"{r['idle_commands_per_s']:.1f} commands/s subtracted); daemon cpu "
            f"{r['daemon_cpu']:.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
