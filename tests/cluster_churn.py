"""Churn on a Valkey Cluster while a master dies: the scenario shared by
``tests/test_cluster_failover.py`` (which asserts) and ``bench/cluster_failover.py``
(which measures).

Two daemons on one cluster; *stable* users (one SDK client each, spread over both
daemons, every one listing the other daemon too) in a ring of mutual friendships, and
*churners* whose clients connect and disconnect over and over, each a mutual friend of
some stable users on both daemons. :meth:`Scenario.problems` compares the state with
reality: Redis must hold exactly the live clients (session token and owning daemon),
and every live client's view must show each declared friend online iff that friend
has a live client (all friendships here are mutual).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from daemons import DaemonProcess
from helpers import Watched
from presence_client.sdk import PresenceClient, PresenceClientError
from presence_daemon import keys
from presence_daemon.embedded import EmbeddedCluster
from presence_daemon.presence import redis_client
from presence_daemon.store import Store

REQUEST_TIMEOUT = 0.2
"""SDK clients retry fast (the test daemons ping every 0.2 s, time out after 0.6 s)."""
CHURN_PAUSE = 0.02
"""Seconds each churner waits between its connect and its disconnect, and back."""


@dataclass
class Member:
    """A user of the scenario and its current client."""

    user: str
    friends: list[str]
    servers: list[tuple[str, int]]
    watched: Watched | None = None
    live: bool = False
    """True from a successful connect until a disconnect was attempted."""
    ops: int = 0


@dataclass
class Scenario:
    """See the module doc. Use ``async with Scenario(...)``."""

    cluster: EmbeddedCluster
    daemons: list[DaemonProcess]
    stable: int = 16
    churners: int = 4
    seed: int = 1
    members: dict[str, Member] = field(default_factory=dict)
    redis: Store | None = None
    log: list[tuple[float, str, object]] = field(default_factory=list)
    """(monotonic time, user, SDK event) of every client, for explaining a failure."""
    last_wrong: tuple[float, list[str]] = (0.0, [])
    """Seconds after ``since`` of the last wrong sample :meth:`converge` saw, and what
    was wrong then."""

    async def __aenter__(self) -> Scenario:
        rng = random.Random(self.seed)
        addresses = [d.address for d in self.daemons]
        stable = [f"s{i}" for i in range(self.stable)]
        churn = [f"c{j}" for j in range(self.churners)]
        for i, user in enumerate(stable):
            home = i % len(addresses)
            friends = [stable[i - 1], stable[(i + 1) % len(stable)], churn[i % len(churn)]]
            servers = [addresses[home], *(a for a in addresses if a != addresses[home])]
            self.members[user] = Member(user, friends, servers)
        for j, user in enumerate(churn):
            friends = [s for i, s in enumerate(stable) if i % len(churn) == j]
            servers = list(addresses)
            rng.shuffle(servers)
            self.members[user] = Member(user, friends, servers)
        self.redis = redis_client(self.cluster.url)
        await asyncio.gather(*(self._connect(m) for m in self.members.values()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        async def goodbye(member: Member) -> None:
            if member.watched is not None:
                with contextlib.suppress(PresenceClientError, OSError):
                    await asyncio.wait_for(member.watched.client.disconnect(), 5.0)

        await asyncio.gather(*(goodbye(m) for m in self.members.values()))
        if self.redis is not None:
            await self.redis.aclose()

    @property
    def owner_of(self) -> dict[tuple[str, int], str]:
        return {d.address: d.instance_id for d in self.daemons}

    def churning(self) -> list[Member]:
        return [m for m in self.members.values() if m.user.startswith("c")]

    async def _connect(self, member: Member) -> bool:
        client = PresenceClient(
            member.user,
            member.friends,
            servers=member.servers,
            client_id=f"{member.user}-1",
            request_timeout=REQUEST_TIMEOUT,
        )
        member.watched = Watched(client)
        client.add_listener(lambda event: self.log.append((time.monotonic(), member.user, event)))
        try:
            await client.connect()
        except (PresenceClientError, OSError):
            with contextlib.suppress(PresenceClientError, OSError):
                await asyncio.wait_for(client.disconnect(), 5.0)
            member.live = False
            return False
        member.live = True
        return True

    async def _disconnect(self, member: Member) -> None:
        member.live = False  # whatever the answer: the client is gone or going
        assert member.watched is not None
        with contextlib.suppress(PresenceClientError, OSError):
            await asyncio.wait_for(member.watched.client.disconnect(), 5.0)

    async def churn(self, stop: asyncio.Event) -> int:
        """Connect and disconnect every churner over and over until ``stop`` is set;
        each ends connected. Returns how many connects and disconnects were attempted."""

        async def one(member: Member) -> None:
            while not stop.is_set():
                if member.live:
                    await self._disconnect(member)
                else:
                    await self._connect(member)
                member.ops += 1
                await asyncio.sleep(CHURN_PAUSE)
            while not member.live:
                await self._connect(member)
                member.ops += 1

        await asyncio.gather(*(one(m) for m in self.churning()))
        return sum(m.ops for m in self.churning())

    async def problems(self) -> list[str]:
        """What differs from reality now ([] once Redis and every view are right)."""
        assert self.redis is not None
        found: list[str] = []
        live = {u for u, m in self.members.items() if m.live}
        pipe = self.redis.pipeline(transaction=False)
        users = sorted(self.members)
        for user in users:
            pipe.hgetall(keys.clients_key(user))
        try:
            stored = dict(zip(users, await pipe.execute(), strict=True))
        except (RedisError, OSError) as exc:
            return [f"redis: {type(exc).__name__}: {exc}"]
        for user in users:
            member = self.members[user]
            entries = stored[user]
            if user not in live:
                if entries:
                    found.append(f"{user}: offline but Redis lists {sorted(entries)}")
                continue
            assert member.watched is not None
            client = member.watched.client
            if not client.connected or client.session is None:
                found.append(f"{user}: client not connected")
                continue
            owner = self.owner_of.get(client.server, "?")
            expected = f"{client.session.hex()}|{owner}|"
            got = entries.get(client.client_id, "")
            if len(entries) != 1 or not got.startswith(expected):
                found.append(f"{user}: Redis lists {entries}, expected {expected}...")
            view = dict(client.friends)
            truth = {name: name in live for name in member.friends}
            if view != truth:
                wrong = {n: view.get(n) for n in truth if view.get(n) != truth[n]}
                found.append(f"{user}: view wrong about {wrong}")
        return found

    async def converge(self, since: float, bound: float, settle: float = 1.0) -> float:
        """Poll (every 50 ms, at most ``bound`` s after ``since``) until :meth:`problems`
        is empty and stays so for ``settle`` s; return the seconds from ``since`` to the
        start of that run. Raises TimeoutError naming the last problems seen."""
        right_since: float | None = None
        last: list[str] = []
        while True:
            now = time.monotonic()
            last = await self.problems()
            if last:
                right_since = None
                self.last_wrong = (now - since, last)
            elif right_since is None:
                right_since = now
            if right_since is not None and now - right_since >= settle:
                return right_since - since
            if now - since > bound:
                raise TimeoutError(
                    f"not right within {bound:.0f} s; {len(last)} problems, e.g. {last[:5]}"
                )
            await asyncio.sleep(0.05)

    def explain(self, users: list[str], since: float) -> str:
        """The SDK events of ``users``' clients since ``since`` (for a failure message)."""
        lines = [
            f"{t - since:+.3f} {user}: {event}"
            for t, user, event in self.log
            if user in users and t >= since - 1.0
        ]
        for user in users:
            member = self.members[user]
            if member.watched is not None:
                client = member.watched.client
                lines.append(
                    f"{user}: server={client.server} last_seq={client.last_seq} "
                    f"friends={client.friends} versions={client.versions}"
                )
        return "\n".join(lines)
