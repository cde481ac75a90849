"""5,000,000 users in a real Valkey Cluster: load time, memory per node, latency ratios.

An :class:`EmbeddedCluster` (``--masters`` 3, ``--replicas`` 0 by default, to save
memory) is filled twice: first with ``--small`` users (10,000), then, after a FLUSHALL,
with ``--users`` (5,000,000; ``--quick``: 100,000). Each time:

1. **Load.** Pipelined direct key writes in the layout the Lua scripts expect (see
   ``presence_daemon.keys``), sent as raw RESP to the master of each key's slot (like
   ``valkey-cli --pipe``): every user declares its ``--friends`` ring neighbours (all
   mutual: friends and fans sets) and has a version; even users are online with one
   client (clients hash entry "token|owner|address", connect number, client binding
   key, and a member of one of ``--owners`` owners' client sets). Printed: load time,
   keys and ``used_memory`` per node, bytes per user.
2. **Latency.** One library instance (:class:`Presence` on a
   ``redis.asyncio.RedisCluster``, no lease, deliveries counted and dropped: the
   figures are for the store, not for pub/sub) runs ``--samples`` calls of each kind,
   one at a time, on users drawn uniformly from the whole population: ``connected``
   (an offline user goes online: a new client, the daemon's arguments, fan-out reads
   of its online friends), ``disconnected`` (the same clients, by token), ``query``
   (20 users) and ``friend_view`` (the snapshot a CONNECT_OK carries). p50/p99 in ms.

Then the big/small ratio of each percentile: flat (about 1) means the data size does
not slow a call down. Figures only; nothing asserts.

Run: ``.venv/bin/python bench/cluster_scale.py [--users N | --quick] [--friends 6]``.
Needs about 1 GB of RAM per million users (see ``free -g`` first).
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import multiprocessing
import random
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
from loadgen import bench_main
from redis.asyncio import Redis
from redis.crc import key_slot

from presence_daemon import keys
from presence_daemon.embedded import EmbeddedCluster, EmbeddedRedis, find_valkey_binaries
from presence_daemon.presence import Delivery, Presence, redis_client

NOW_MS = b"1780000000000"
CHUNK = 20_000
"""Users per pipelined chunk (one buffer per node)."""
QUERY_SIZE = 20


def user_name(i: int) -> str:
    return f"user{i:07d}"


def client_id(i: int) -> str:
    return f"c-{i:012x}"


def owner_id(i: int, owners: int) -> str:
    return f"daemon-{i % owners:02d}-a1b2c3d4"


def address(i: int) -> str:
    return f"203.0.{i // 256 % 256}.{i % 256}:{40000 + i % 20000}"


def ring(i: int, users: int, friends: int) -> list[str]:
    half = friends // 2
    return [user_name((i + d) % users) for d in range(-half, half + 1) if d != 0][:friends]


def resp(*parts: bytes) -> bytes:
    """One command in the Redis protocol."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def bulk(part: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(part), part)


def slot_of(tag: str) -> int:
    """The hash slot of every key tagged ``{tag}`` (CRC16 of the tag, mod 16384)."""
    return binascii.crc_hqx(tag.encode(), 0) % 16384


class NodeWriter:
    """A socket to one master: send buffers, count the one-line replies."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owed = 0
        self.errors = 0
        self.first_error = b""
        self._tail = b""

    def send(self, data: bytes, commands: int) -> None:
        self.sock.sendall(data)
        self.owed += commands

    def drain(self) -> None:
        """Read replies until every command sent so far has answered."""
        while self.owed > 0:
            data = self._tail + self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("node closed the connection while loading")
            lines = data.split(b"\r\n")
            self._tail = lines.pop()
            for line in lines:
                if line.startswith(b"-"):
                    self.errors += 1
                    self.first_error = self.first_error or line
            self.owed -= len(lines)

    def close(self) -> None:
        self.sock.close()


class Loader:
    """Route each command to the master of its slot; one buffer per node."""

    def __init__(self, slots: list[tuple[int, int, str, int]]) -> None:
        self.writers: dict[tuple[str, int], NodeWriter] = {}
        self.slot_index = [0] * 16384
        for start, end, host, port in slots:
            if (host, port) not in self.writers:
                self.writers[(host, port)] = NodeWriter(host, port)
            index = list(self.writers).index((host, port))
            for slot in range(start, end + 1):
                self.slot_index[slot] = index
        self.nodes = list(self.writers.values())
        self.buffers: list[list[bytes]] = [[] for _ in self.nodes]
        self.counts = [0] * len(self.nodes)
        self.commands = 0

    def add(self, slot: int, data: bytes, commands: int) -> None:
        index = self.slot_index[slot]
        self.buffers[index].append(data)
        self.counts[index] += commands

    def flush(self) -> None:
        """Send what was added; the replies of the previous flush are read meanwhile."""
        for writer in self.nodes:
            writer.drain()
        for index, writer in enumerate(self.nodes):
            if self.buffers[index]:
                writer.send(b"".join(self.buffers[index]), self.counts[index])
                self.commands += self.counts[index]
                self.buffers[index].clear()
                self.counts[index] = 0

    def finish(self) -> int:
        self.flush()
        for writer in self.nodes:
            writer.drain()
        errors = sum(w.errors for w in self.nodes)
        if errors:
            first = next(w.first_error for w in self.nodes if w.errors)
            raise RuntimeError(f"{errors} load errors, first: {first!r}")
        for writer in self.nodes:
            writer.close()
        return self.commands


def cluster_slots(port: int) -> list[tuple[int, int, str, int]]:
    client = redis.Redis(port=port)
    try:
        raw = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return [(int(s), int(e), str(m[0], "ascii"), int(m[1])) for s, e, m, *_ in raw]


def load_part(
    slots: list[tuple[int, int, str, int]],
    users: int,
    friends: int,
    owners: int,
    part: int,
    parts: int,
) -> int:
    """Write the keys of users ``part``, ``part + parts``, ...; returns commands sent.

    The bytes are built by hand: the keys are those of ``presence_daemon.keys`` (checked
    against it for user 0 by :func:`check_layout`).
    """
    loader = Loader(slots)
    day = b"86400000"
    set_cmd, sadd_cmd, hset_cmd = b"*3\r\n$3\r\nSET\r\n", b"$4\r\nSADD\r\n", b"$4\r\nHSET\r\n"
    now = bulk(NOW_MS)
    owner_slots = [slot_of(owner_id(k, owners)) for k in range(owners)]
    owned_keys = [bulk(keys.owned_key(owner_id(k, owners)).encode()) for k in range(owners)]
    mine = range(part, users, parts)
    for base in range(0, len(mine), CHUNK):
        owned: list[list[bytes]] = [[] for _ in range(owners)]
        for i in mine[base : base + CHUNK]:
            user = user_name(i)
            slot = slot_of(user)
            tag = f"{keys.PREFIX}:{{{user}}}:"
            names = [bulk(name.encode()) for name in ring(i, users, friends)]
            header = b"*%d\r\n" % (len(names) + 2) + sadd_cmd
            block = [set_cmd, bulk(f"{tag}version".encode()), now]
            commands = 1
            if names:
                block += [header, bulk(f"{tag}friends".encode()), *names]
                block += [header, bulk(f"{tag}fans".encode()), *names]
                commands += 2
            if i % 2 == 0:
                cid, k = client_id(i), i % owners
                token = secrets.token_hex(16)
                entry = f"{token}|{owner_id(k, owners)}|{address(i)}"
                block += [b"*4\r\n", hset_cmd, bulk(f"{tag}clients".encode())]
                block += [bulk(cid.encode()), bulk(entry.encode())]
                block += [b"*5\r\n", set_cmd[4:], bulk(f"{tag}n:{cid}".encode()), b"$1\r\n1\r\n"]
                block += [b"$2\r\nPX\r\n", bulk(day)]
                commands += 2
                binding = keys.client_key(cid).encode()
                value = f"{user}|{token}|{NOW_MS.decode()}".encode()
                loader.add(slot_of(cid), set_cmd + bulk(binding) + bulk(value), 1)
                owned[k].append(bulk(f"{user}|{cid}|{token}".encode()))
            loader.add(slot, b"".join(block), commands)
        for k, members in enumerate(owned):
            if members:
                head = b"*%d\r\n" % (len(members) + 2) + sadd_cmd + owned_keys[k]
                loader.add(owner_slots[k], head + b"".join(members), 1)
        loader.flush()
    return loader.finish()


def check_layout() -> None:
    """The hand-built key names above are those of ``presence_daemon.keys``."""
    user, cid = user_name(0), client_id(0)
    tag = f"{keys.PREFIX}:{{{user}}}:"
    clients, version, friends, fans, _ = keys.user_keys(user)
    assert (clients, version, friends, fans) == (
        f"{tag}clients",
        f"{tag}version",
        f"{tag}friends",
        f"{tag}fans",
    )
    assert keys.connect_number_key(user, cid) == f"{tag}n:{cid}"
    assert keys.owned_member(user, cid, "t") == f"{user}|{cid}|t"
    assert key_slot(clients.encode()) == slot_of(user)
    assert key_slot(keys.client_key(cid).encode()) == slot_of(cid)


def load(
    port: int, users: int, friends: int, owners: int, processes: int, *, single: bool = False
) -> dict[str, Any]:
    """Write every user's keys from ``processes`` processes; load time and commands.
    ``single``: ``port`` is one server, not a cluster node."""
    check_layout()
    slots = [(0, 16383, "127.0.0.1", port)] if single else cluster_slots(port)
    started = time.monotonic()
    args = [(slots, users, friends, owners, part, processes) for part in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        commands = sum(pool.starmap(load_part, args))
    return {"users": users, "load_s": time.monotonic() - started, "commands": commands}


def node_memory(cluster: EmbeddedCluster) -> list[dict[str, Any]]:
    out = []
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        try:
            info = client.info("memory")
            out.append(
                {
                    "port": node.port,
                    "role": node.role,
                    "keys": int(client.dbsize()),
                    "used_memory": int(info["used_memory"]),
                    "used_memory_rss": int(info["used_memory_rss"]),
                }
            )
        finally:
            client.close()
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


async def server_usec(ports: Sequence[int]) -> int:
    """Microseconds the masters spent in commands so far (``INFO commandstats``), the
    benchmark's own INFO excluded."""
    total = 0
    for port in ports:
        client = Redis(port=port, decode_responses=True)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        for name, value in stats.items():
            if name not in ("cmdstat_info", "cmdstat_cluster|slots", "cmdstat_cluster|nodes"):
                total += int(value["usec"])
    return total


async def latencies(
    port: int,
    masters: Sequence[int],
    users: int,
    samples: int,
    seed: int,
    *,
    single: bool = False,
) -> dict[str, Any]:
    """Time each library call, one at a time, on uniformly drawn users: wall time, this
    process's CPU time and the masters' time in commands (both steadier than wall time
    on a shared machine). ``single``: a plain client of one server (for reference)."""
    client = redis_client(
        f"redis://127.0.0.1:{port}/0" if single else f"redis+cluster://127.0.0.1:{port}"
    )
    delivered = 0

    async def drop(deliveries: Sequence[Delivery]) -> None:
        nonlocal delivered
        delivered += len(deliveries)

    presence = Presence(client, instance_id="bench-scale", lease_ttl=None, deliver=drop)
    await presence.start()
    rng = random.Random(seed)
    offline = [rng.randrange(users // 2) * 2 + 1 for _ in range(samples)]
    offline = [i for i in dict.fromkeys(offline) if i < users]
    tokens = {i: secrets.token_hex(16) for i in offline}
    queries = [[user_name(rng.randrange(users)) for _ in range(QUERY_SIZE)] for _ in range(samples)]
    viewers = [user_name(rng.randrange(users)) for _ in range(samples)]

    def connect(i: int) -> Callable[[], Awaitable[Any]]:
        return lambda: presence.connected(
            f"bench-{i}",
            user_name(i),
            address="198.51.100.7:40000",
            token=tokens[i],
            number=1,
            proof="",
        )

    def disconnect(i: int) -> Callable[[], Awaitable[Any]]:
        return lambda: presence.disconnected(f"bench-{i}", user=user_name(i), token=tokens[i])

    def query(names: list[str]) -> Callable[[], Awaitable[Any]]:
        return lambda: presence.query(names)

    def view(name: str) -> Callable[[], Awaitable[Any]]:
        return lambda: presence.friend_view(name)

    kinds: dict[str, list[Callable[[], Awaitable[Any]]]] = {
        "connected": [connect(i) for i in offline],
        "disconnected": [disconnect(i) for i in offline],
        "query": [query(names) for names in queries],
        "friend_view": [view(name) for name in viewers],
    }
    calls: dict[str, dict[str, float]] = {}
    went_online = 0
    try:
        for kind, jobs in kinds.items():
            wall: list[float] = []
            server_before, cpu_before = await server_usec(masters), time.process_time()
            for job in jobs:
                started = time.perf_counter()
                result = await job()
                wall.append(time.perf_counter() - started)
                if kind == "connected":
                    went_online += result.went_online
            cpu = time.process_time() - cpu_before
            server = await server_usec(masters) - server_before
            calls[kind] = percentiles(wall)
            calls[kind]["client_cpu_us"] = cpu / len(jobs) * 1e6
            calls[kind]["server_us"] = server / len(jobs)
    finally:
        await presence.close()
    return {"calls": calls, "went_online": went_online, "deliveries": delivered}


def flush(cluster: EmbeddedCluster) -> None:
    """FLUSHALL SYNC on every master: memory is freed before the next reading."""
    for node in cluster.nodes:
        if node.role == "master":
            client = redis.Redis(port=node.port)
            try:
                client.execute_command("FLUSHALL", "SYNC")  # type: ignore[no-untyped-call]
            finally:
                client.close()


def scale(cluster: EmbeddedCluster, args: argparse.Namespace, users: int) -> dict[str, Any]:
    flush(cluster)
    port = cluster.ports[0]
    before = sum(n["used_memory"] for n in node_memory(cluster) if n["role"] == "master")
    result = load(port, users, args.friends, args.owners, args.load_processes)
    nodes = node_memory(cluster)
    masters = [n for n in nodes if n["role"] == "master"]
    result["nodes"] = nodes
    result["used_memory"] = sum(n["used_memory"] for n in masters)
    result["bytes_per_user"] = (result["used_memory"] - before) / users
    result["keys"] = sum(n["keys"] for n in masters)
    ports = [n["port"] for n in masters]
    result.update(asyncio.run(latencies(port, ports, users, args.samples, args.seed)))
    return result


def reference(args: argparse.Namespace) -> dict[str, Any]:
    """The small run on one Valkey server with the plain client (no cluster)."""
    with EmbeddedRedis(find_valkey_binaries()[0]) as server:
        result = load(
            server.port, args.small, args.friends, args.owners, args.load_processes, single=True
        )
        ports = [server.port]
        result.update(
            asyncio.run(
                latencies(server.port, ports, args.small, args.samples, args.seed, single=True)
            )
        )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=5_000_000, help="users in the big run")
    parser.add_argument("--quick", action="store_true", help="100,000 users in the big run")
    parser.add_argument("--small", type=int, default=10_000, help="users in the small run")
    parser.add_argument("--friends", type=int, default=6, help="mutual friends per user")
    parser.add_argument("--owners", type=int, default=16, help="daemons owning the clients")
    parser.add_argument("--masters", type=int, default=3, help="cluster masters")
    parser.add_argument("--replicas", type=int, default=0, help="replicas per master")
    parser.add_argument("--samples", type=int, default=2000, help="calls timed per kind")
    parser.add_argument("--load-processes", type=int, default=2, help="processes writing the keys")
    parser.add_argument("--seed", type=int, default=1, help="seed for the users drawn")


MEASURES = ("p50_ms", "p99_ms", "client_cpu_us", "server_us")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.users = 100_000
    # Loading keeps a node busy for seconds: a long node timeout keeps it from being
    # flagged as failing meanwhile (there is no replica to fail over to anyway).
    with EmbeddedCluster(args.masters, args.replicas, node_timeout_ms=30_000) as cluster:
        runs = {
            "small": scale(cluster, args, args.small),
            "big": scale(cluster, args, args.users),
            "small again": scale(cluster, args, args.small),
        }
    single = reference(args)
    # The small run before and after the big one: their spread is the noise to beat.
    ratios = {
        kind: {
            key: runs["big"]["calls"][kind][key]
            / statistics.fmean(runs[r]["calls"][kind][key] for r in ("small", "small again"))
            for key in MEASURES
        }
        for kind in runs["big"]["calls"]
    }
    return {
        "masters": args.masters,
        "replicas": args.replicas,
        "friends": args.friends,
        "owners": args.owners,
        "runs": runs,
        "ratios": ratios,
        "single": single,
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"cluster: {r['masters']} masters, {r['replicas']} replicas each; "
        f"{r['friends']} mutual friends per user, half the users online "
        f"(one client each, spread over {r['owners']} owners)"
    ]
    for label, s in r["runs"].items():
        per_node = ", ".join(
            f"{n['port']} {n['role']} {n['keys']:,} keys {n['used_memory'] / 2**20:,.0f} MiB "
            f"(rss {n['used_memory_rss'] / 2**20:,.0f} MiB)"
            for n in s["nodes"]
        )
        lines.append(
            f"{label}: {s['users']:,} users loaded in {s['load_s']:.1f} s "
            f"({s['users'] / s['load_s']:,.0f} users/s, {s['commands'] / s['load_s']:,.0f} "
            f"commands/s); {s['keys']:,} keys, used_memory {s['used_memory'] / 2**20:,.0f} MiB "
            f"= {s['bytes_per_user']:,.0f} B per user"
        )
        lines.append(f"  nodes: {per_node}")
        for kind, c in s["calls"].items():
            lines.append(
                f"  {kind:<13} p50 {c['p50_ms']:6.2f} ms  p99 {c['p99_ms']:6.2f} ms  "
                f"mean {c['mean_ms']:6.2f} ms; cpu-us per call: client "
                f"{c['client_cpu_us']:,.0f}, masters {c['server_us']:,.0f}"
            )
        lines.append(
            f"  ({s['went_online']} connects went online; {s['deliveries']} deliveries dropped)"
        )
    single = r["single"]
    lines.append(
        f"reference: {single['users']:,} users on one Valkey server, plain client "
        "(cpu-us per call: client, server):"
    )
    for kind, c in single["calls"].items():
        lines.append(
            f"  {kind:<13} p50 {c['p50_ms']:6.2f} ms  p99 {c['p99_ms']:6.2f} ms; "
            f"client {c['client_cpu_us']:,.0f}, server {c['server_us']:,.0f}"
        )
    big = r["runs"]["big"]["users"]
    lines.append(f"ratios {big:,} users / mean of the two small runs:")
    for kind, ratio in r["ratios"].items():
        lines.append(
            f"  {kind:<13} p50 {ratio['p50_ms']:.2f}  p99 {ratio['p99_ms']:.2f}  "
            f"client cpu {ratio['client_cpu_us']:.2f}  masters cpu {ratio['server_us']:.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, add_arguments, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
