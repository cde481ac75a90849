"""CPU per Redis command on the daemon's side: redis-py calls, redis-py pipelines, and the
lean pipelined connection the library uses on a single Redis (``batch.LeanConnection``).

Each way runs the same commands (``GET`` of a short string, ``HGETALL`` of a hash of two
clients) against a private Redis on 127.0.0.1 and prints process CPU microseconds per
command (``time.process_time``, so a busy machine inflates it less than wall time), for
single calls (``--concurrency`` in flight) and for pipelines of 5 and of 100.

Run: ``.venv/bin/python bench/redis_path.py [--commands 20000] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from loadgen import bench_main

from presence_daemon.batch import LeanConnection
from presence_daemon.embedded import EmbeddedRedis
from presence_daemon.presence import redis_client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--commands", type=int, default=20_000, help="commands per way")
    parser.add_argument("--concurrency", type=int, default=100, help="single calls in flight")


async def _measure(commands: int, batch: int, send: Callable[[int], Awaitable[Any]]) -> float:
    await send(batch)  # warm up (connections made, scripts cached)
    start = time.process_time()
    for _ in range(commands // batch):
        await send(batch)
    return (time.process_time() - start) / (commands // batch * batch) * 1e6


async def _run(url: str, args: argparse.Namespace) -> dict[str, float]:
    client = redis_client(url)
    await client.set("k", "v")
    await client.hset("h", mapping={"c-1": "a" * 32 + "|d1|127.0.0.1:5000", "c-2": "b" * 40})
    lean = LeanConnection.for_client(client)
    assert lean is not None
    result: dict[str, float] = {}
    for command in (("GET", "k"), ("HGETALL", "h")):
        name = command[0].lower()

        async def singles(n: int, command: tuple[str, ...] = command) -> None:
            await asyncio.gather(*[client.execute_command(*command) for _ in range(n)])

        result[f"redis_py_single_{name}_us"] = await _measure(
            args.commands, args.concurrency, singles
        )
        for size in (5, 100):

            async def pipelined(n: int, command: tuple[str, ...] = command) -> None:
                pipe = client.pipeline(transaction=False)
                for _ in range(n):
                    pipe.execute_command(*command)
                await pipe.execute()

            async def leaned(n: int, command: tuple[str, ...] = command) -> None:
                await lean.run([command] * n)

            result[f"redis_py_pipeline{size}_{name}_us"] = await _measure(
                args.commands, size, pipelined
            )
            result[f"lean_pipeline{size}_{name}_us"] = await _measure(args.commands, size, leaned)
    lean.close()
    await client.aclose()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    with EmbeddedRedis() as redis:
        return uvloop.run(_run(redis.url, args))


def report(result: dict[str, Any]) -> str:
    lines = ["CPU microseconds per command, daemon side (lower is better)"]
    lines.append(f"{'command':8} {'way':22} {'us/cmd':>8}")
    for key, value in result.items():
        way, _, command = key.removesuffix("_us").rpartition("_")
        lines.append(f"{command:8} {way:22} {value:8.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(bench_main(__doc__, add_arguments, run, report, None))
