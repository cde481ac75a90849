"""Model-based schedules: random steps against three Presence instances, checked
against a small reference model.

In the spirit of hypothesis' stateful testing, but each schedule is drawn from a seeded
``random.Random``, so a failing schedule replays exactly from the seed printed in the
failure (``MODEL_SEED=<seed> pytest tests/test_model_schedules.py``). Every schedule
runs three instances (short leases, one shared manual clock) on the session Redis,
emptied before it. A few users with one or two client ids each declare friends
(mutual and one-sided); the steps connect and disconnect clients on random instances
(a client id that connects again, on any instance, replaces its older session), change
friend lists, and inject faults:

* lost answer: connect.lua or disconnect.lua is run with the arguments the library
  would pass, and nothing is told or confirmed (the outbox keeps the transition);
* stall: an instance stops renewing (its lease lapses), another one reaps it; later
  the stalled one renews, learns its lease was lost and puts back (``restore``) the
  sessions the model says it holds;
* concurrency: several operations at once with ``asyncio.gather``;
* time: the manual clock moves on (up to past the outbox grace, so that a touch
  retells leftovers).

After the steps the system is healed (stalled instance back, clock past the grace,
every user touched once) and compared with the model:

1. ``query()`` says online exactly the users the model has a session for;
2. every user's outbox (``pending``) is empty;
3. for each mutual pair (A watches B), the view each live client of A holds (a
   snapshot at connect or on a "your list changed" delivery, then every Delivery, the
   highest version winning) shows B as ``friend_view(A)`` does: same visibility, at a
   version no higher (a bump that changes nothing A can see, such as B's friend list
   changing while B is offline, is not told, so the version held may lag);
4. no Delivery was ever about a pair that was not mutual at some moment of the step
   that sent it (the one offline when a mutual friendship ends is sent while the
   friendship was mutual at the step's start).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from itertools import product
from typing import Any

import pytest
from redis.asyncio import Redis

from helpers import ManualClock, wait_for
from presence_client.protocol import ErrorCode, FriendState
from presence_daemon import keys
from presence_daemon.presence import (
    OUTBOX_GRACE,
    Delivery,
    Presence,
    PresenceError,
    Superseded,
)

SCHEDULES = int(os.environ.get("MODEL_SCHEDULES", "400"))
"""Schedules in all (seeds 0 .. SCHEDULES-1), spread over BATCHES tests."""
BATCHES = 10
"""Tests the schedules are spread over (each test stays well inside the pytest timeout)."""
REPLAY = os.environ.get("MODEL_SEED")
"""If set, only the schedule with this seed runs (in the first batch)."""
INSTANCES = 3
GRACE_MS = round(OUTBOX_GRACE * 1000)
PAST_THE_GRACE = OUTBOX_GRACE + 1.0
"""How far healing moves the clock: past the outbox grace, with room for the offsets of
the instances (each measures its offset to Redis's clock at start(), a few ms apart, so
their views of the one manual clock differ by that much)."""
TOUCH_CLIENT = "zz-touch"
"""A client id no user ever connects: disconnecting it only retells what is pending."""
TOUCH_TOKEN = "00000000"


@dataclass(frozen=True, slots=True)
class Session:
    """A session the model says is live: its user, owner (instance index) and token."""

    user: str
    owner: int
    token: str


def user_of(client_id: str) -> str:
    return client_id.split("-", 1)[0]


def die(presence: Presence) -> None:
    """Stop renewing the lease (and reaping) without a word, as a stalled process."""
    for task in presence._lease_tasks:
        task.cancel()


def revive(presence: Presence) -> None:
    """Start the lease tasks again (as start() does), after a stall."""
    loop = asyncio.get_running_loop()
    presence._lease_tasks = [
        loop.create_task(presence._renew_forever(), name=f"lease-{presence.instance_id}"),
        loop.create_task(presence._reap_forever(), name=f"reaper-{presence.instance_id}"),
    ]


class Schedule:
    """One seeded schedule: the instances, the reference model and the steps."""

    def __init__(self, seed: int, redis_url: str, r: Redis) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.redis_url = redis_url
        self.r = r
        self.clock = ManualClock()
        rng = self.rng
        self.users = [f"u{j}" for j in range(rng.randint(4, 5))]
        self.clients = {u: [f"{u}-c{k}" for k in range(rng.randint(1, 2))] for u in self.users}
        self.all_clients = [c for u in self.users for c in self.clients[u]]
        self.lease_ttl = rng.uniform(0.3, 0.5)
        self.stalls_left = 1 if rng.random() < 0.25 else 0
        # The model.
        self.declared: dict[str, set[str]] = {u: set() for u in self.users}
        self.sessions: dict[str, Session] = {}
        self.lost: list[tuple[str, str, Session]] = []
        """Lost answers that a later step may retry: (kind, client id, session)."""
        # What was observed.
        self.views: dict[tuple[str, str], dict[str, FriendState]] = defaultdict(dict)
        self.delivered: list[tuple[int, int, Delivery]] = []
        self.possibly_mutual: list[set[tuple[str, str]]] = []
        self.step = 0
        self.log: list[str] = []
        self.instances: list[Presence] = []
        self.stalled: int | None = None
        self.restores = [0] * INSTANCES
        self.restore_errors: list[str] = []

    # -- plumbing ------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.log.append(f"[{self.step}] {text}")

    def live(self) -> list[int]:
        return [k for k in range(INSTANCES) if k != self.stalled]

    def token(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    async def start(self) -> None:
        for k in range(INSTANCES):
            p = Presence.from_url(
                self.redis_url,
                instance_id=f"s{self.seed}-i{k}",
                deliver=self.deliverer(k),
                lease_ttl=self.lease_ttl,
                on_lease_lost=self.restorer(k),
                clock=self.clock,
            )
            self.instances.append(p)
            await p.start()

    async def close(self) -> None:
        for p in self.instances:
            die(p)
        await asyncio.gather(*(p.close() for p in self.instances), return_exceptions=True)

    def deliverer(self, k: int) -> Callable[[list[Delivery]], Awaitable[None]]:
        async def deliver(deliveries: list[Delivery]) -> None:
            for d in deliveries:
                self.delivered.append((self.step, k, d))
                if d.friend is None:
                    await self.snapshot(d.client_id, d.token)
                else:
                    self.apply(d.client_id, d.token, d.friend)

        return deliver

    def restorer(self, k: int) -> Callable[[bool], Awaitable[None]]:
        async def restore(state_lost: bool) -> None:
            try:
                for client_id, s in list(self.sessions.items()):
                    if s.owner != k:
                        continue
                    try:
                        back = await self.instances[k].connected(
                            client_id, s.user, token=s.token, restore=True
                        )
                    except Superseded:
                        if self.sessions.get(client_id) == s:
                            del self.sessions[client_id]
                        self.note(f"restore {client_id} on i{k}: superseded")
                        continue
                    self.note(f"restore {client_id} on i{k}: new_entry={back.new_entry}")
                    if back.new_entry:  # it missed what was told meanwhile: resync
                        await self.snapshot(client_id, s.token)
            except Exception as exc:  # reported by the checks
                self.restore_errors.append(f"i{k}: {exc!r}")
            finally:
                self.restores[k] += 1

        return restore

    def apply(self, client_id: str, token: str, state: FriendState) -> None:
        view = self.views[(client_id, token)]
        held = view.get(state.name)
        if held is None or state.version > held.version:
            view[state.name] = state

    async def snapshot(self, client_id: str, token: str) -> None:
        for state in await self.instances[0].friend_view(user_of(client_id)):
            self.apply(client_id, token, state)

    async def settled(self) -> None:
        async def idle() -> bool:
            return all(not p._retries for p in self.instances)

        await wait_for(idle, what="background tellings finish")

    # -- operations (each updates the model after the library call) ------------------

    async def op_connect(self, client_id: str, k: int) -> None:
        user = user_of(client_id)
        try:
            c = await self.instances[k].connected(client_id, user)
        except PresenceError as exc:
            if exc.code != ErrorCode.TRY_AGAIN:  # fenced (lease lapsed by accident)
                raise
            self.note(f"connect {client_id} on i{k}: fenced")
            return
        self.sessions[client_id] = Session(user, k, c.token)
        await self.snapshot(client_id, c.token)

    async def op_disconnect(self, client_id: str, k: int, with_token: bool) -> None:
        s = self.sessions.get(client_id)
        if with_token and s is not None:
            await self.instances[k].disconnected(client_id, user=s.user, token=s.token)
        else:
            await self.instances[k].disconnected(client_id)
        self.sessions.pop(client_id, None)

    async def op_friends(self, user: str, op: str, names: list[str], k: int) -> None:
        p = self.instances[k]
        if op == "add":
            await p.add_friends(user, names)
            self.declared[user] |= set(names)
        elif op == "remove":
            await p.remove_friends(user, names)
            self.declared[user] -= set(names)
        else:
            await p.set_friends(user, names)
            self.declared[user] = set(names)

    async def lose_connect(self, client_id: str, k: int) -> None:
        """connected() up to connect.lua, with the same arguments; the answer is lost."""
        p, user, token = self.instances[k], user_of(client_id), self.token()
        await self.r.sadd(keys.owned_key(p.instance_id), keys.owned_member(user, client_id, token))
        holder = await p._claim_once(client_id, user, token)
        assert holder == "", f"client id {client_id} bound elsewhere: {holder}"
        args: list[str | int] = [
            client_id,
            f"{token}|{p.instance_id}|",
            p._now_ms(),
            p.fence_ms,
            "connect",
            GRACE_MS,
        ]
        status, *_ = await p.scripts.call(self.r, "connect", keys.user_keys(user), args)
        if status != 1:
            self.note(f"lost connect {client_id} on i{k}: fenced")
            return
        s = Session(user, k, token)
        self.sessions[client_id] = s
        self.lost.append(("connect", client_id, s))
        await self.snapshot(client_id, token)

    async def lose_disconnect(self, client_id: str, k: int, with_token: bool) -> None:
        """disconnected() up to disconnect.lua, same arguments; the answer is lost."""
        s = self.sessions[client_id]
        p = self.instances[k]
        args: list[str | int] = [client_id, s.token if with_token else "", p._now_ms(), GRACE_MS]
        await p.scripts.call(self.r, "disconnect", keys.user_keys(s.user), args)
        del self.sessions[client_id]
        self.lost.append(("disconnect", client_id, s))

    async def retry_lost(self) -> None:
        kind, client_id, s = self.lost.pop(self.rng.randrange(len(self.lost)))
        if s.owner == self.stalled:
            return
        p = self.instances[s.owner]
        if kind == "connect":
            if self.sessions.get(client_id) != s:
                return  # replaced or ended meanwhile: nobody retries it
            self.note(f"retry connect {client_id} on i{s.owner}")
            await p.connected(client_id, s.user, token=s.token)
        else:
            self.note(f"retry disconnect {client_id} on i{s.owner}")
            await p.disconnected(client_id, user=s.user, token=s.token)

    async def stall(self) -> None:
        k = self.rng.choice(self.live())
        self.stalls_left -= 1
        self.stalled = k
        p = self.instances[k]
        die(p)
        self.note(f"stall i{k}")

        async def lease_gone() -> bool:
            return not await self.r.exists(keys.lease_key(p.instance_id))

        await wait_for(lease_gone, timeout=self.lease_ttl + 5, what="the stalled lease lapses")
        reaper = self.rng.choice(self.live())
        reaped = await self.instances[reaper].reap_dead()
        self.note(f"i{reaper} reaped {reaped}")

    async def resume(self) -> None:
        k = self.stalled
        assert k is not None
        p = self.instances[k]
        before = self.restores[k]
        self.stalled = None
        held = await p.renew_lease()
        self.note(f"resume i{k}: lease held={held}")
        revive(p)
        if not held:
            await wait_for(lambda: self.restores[k] > before, what="on_lease_lost restores")

    # -- steps -----------------------------------------------------------------------

    def friend_op(self, user: str) -> tuple[str, list[str]]:
        rng = self.rng
        others = [u for u in self.users if u != user]
        op = rng.choice(["add", "add", "remove", "set"])
        if op == "remove" and self.declared[user] and rng.random() < 0.8:
            names = rng.sample(sorted(self.declared[user]), 1)
        else:
            names = rng.sample(others, rng.randint(1 if op != "set" else 0, 2))
        return op, names

    def simple_op(
        self, busy_clients: set[str], busy_users: set[str]
    ) -> tuple[str, Coroutine[Any, Any, None]]:
        """One connect, disconnect or friend change on names not in the busy sets."""
        rng = self.rng
        free = [c for c in self.all_clients if c not in busy_clients]
        kind = rng.choice(["connect", "connect", "disconnect", "friends"])
        if kind == "friends" or not free:
            user = rng.choice([u for u in self.users if u not in busy_users])
            busy_users.add(user)
            op, names = self.friend_op(user)
            k = rng.choice(self.live())
            return f"{op}_friends({user}, {names}) on i{k}", self.op_friends(user, op, names, k)
        client_id = rng.choice(free)
        busy_clients.add(client_id)
        if kind == "connect":
            k = rng.choice(self.live())
            return f"connect {client_id} on i{k}", self.op_connect(client_id, k)
        s = self.sessions.get(client_id)
        with_token = s is not None and s.owner != self.stalled and rng.random() < 0.6
        k = s.owner if with_token and s is not None else rng.choice(self.live())
        text = f"disconnect {client_id} on i{k}{' (token)' if with_token else ''}"
        return text, self.op_disconnect(client_id, k, with_token)

    async def run_step(self) -> None:
        rng = self.rng
        choices = ["op"] * 6 + ["gather"] * 2 + ["lost"] * 2 + ["clock"]
        if self.lost:
            choices.append("retry")
        if self.stalled is None and self.stalls_left:
            choices.append("stall")
        if self.stalled is not None:
            choices += ["resume"] * 2
        what = rng.choice(choices)
        if what == "op":
            text, work = self.simple_op(set(), set())
            self.note(text)
            await work
        elif what == "gather":
            busy_clients: set[str] = set()
            busy_users: set[str] = set()
            ops = [self.simple_op(busy_clients, busy_users) for _ in range(rng.randint(2, 4))]
            self.note("gather: " + "; ".join(text for text, _ in ops))
            await asyncio.gather(*(work for _, work in ops))
        elif what == "lost":
            live = [c for c, s in self.sessions.items() if s.owner != self.stalled]
            k = rng.choice(self.live())
            if live and rng.random() < 0.5:
                client_id = rng.choice(live)
                with_token = rng.random() < 0.5
                self.note(f"lost disconnect {client_id} on i{k} token={with_token}")
                await self.lose_disconnect(client_id, k, with_token)
            else:
                client_id = rng.choice(self.all_clients)
                self.note(f"lost connect {client_id} on i{k}")
                await self.lose_connect(client_id, k)
        elif what == "clock":
            seconds = self.rng.choice([0.5, OUTBOX_GRACE, PAST_THE_GRACE])
            self.note(f"clock +{seconds} s")
            self.clock.advance(seconds)
        elif what == "retry":
            await self.retry_lost()
        elif what == "stall":
            await self.stall()
        else:
            await self.resume()

    def mutual_pairs(self, *states: dict[str, set[str]]) -> set[tuple[str, str]]:
        """Ordered pairs (A, B) mutual in some mix of A's and B's declarations from
        ``states`` (what a concurrent step may have shown at some moment)."""
        pairs = set()
        for a, b in product(self.users, self.users):
            if a == b:
                continue
            for da, db in product(states, states):
                if b in da[a] and a in db[b]:
                    pairs.add((a, b))
                    break
        return pairs

    async def befriend(self) -> None:
        """The starting population: each pair mutual friends, one-sided, or strangers."""
        for a, b in product(self.users, self.users):
            if a < b:
                roll = self.rng.random()
                if roll < 0.45:
                    self.declared[a].add(b)
                    self.declared[b].add(a)
                elif roll < 0.7:
                    self.declared[a if roll < 0.575 else b].add(b if roll < 0.575 else a)
        for user in self.users:
            await self.instances[0].set_friends(user, sorted(self.declared[user]))
        self.note(f"friends {dict((u, sorted(n)) for u, n in self.declared.items())}")

    async def run(self) -> None:
        await self.start()
        await self.befriend()
        for step in range(self.rng.randint(10, 20)):
            self.step = step
            before = {u: set(names) for u, names in self.declared.items()}
            self.possibly_mutual.append(set())
            await self.run_step()
            await self.settled()
            self.possibly_mutual[step] = self.mutual_pairs(before, self.declared)
        await self.heal()
        await self.check()

    async def heal(self) -> None:
        self.step = len(self.possibly_mutual)
        self.possibly_mutual.append(self.mutual_pairs(self.declared))
        self.note("heal")
        if self.stalled is not None:
            await self.resume()
        self.clock.advance(PAST_THE_GRACE)
        for user in self.users:
            p = self.instances[self.rng.choice(self.live())]
            await p.disconnected(TOUCH_CLIENT, user=user, token=TOUCH_TOKEN)
        await self.settled()

    # -- checks ----------------------------------------------------------------------

    async def check(self) -> None:
        assert not self.restore_errors, self.restore_errors
        p = self.instances[0]
        # 1. Online exactly the users with a live session.
        expected = {u: any(s.user == u for s in self.sessions.values()) for u in self.users}
        assert await p.query(self.users) == expected, "query() disagrees with the model"
        # The model's sessions are the ones in Redis.
        for user in self.users:
            entries = await self.r.hgetall(keys.clients_key(user))
            tokens = {str(c): str(v).split("|", 1)[0] for c, v in entries.items()}
            model = {c: s.token for c, s in self.sessions.items() if s.user == user}
            assert tokens == model, f"sessions of {user}: redis {tokens} != model {model}"
        # 2. Every outbox told and confirmed.
        for user in self.users:
            pending = await self.r.get(keys.pending_key(user))
            assert pending is None, f"outbox of {user} not empty after healing: {pending!r}"
        # 3. The view each live client holds of each mutual friend converged.
        for a in self.users:
            view = {f.name: f for f in await p.friend_view(a)}
            for b in sorted(self.declared[a]):
                if a not in self.declared[b]:
                    continue
                for client_id, s in self.sessions.items():
                    if s.user != a:
                        continue
                    held = self.views[(client_id, s.token)].get(b)
                    # Same name and visibility; the version held may lag only by bumps
                    # that change nothing A can see (never told, by design).
                    assert (
                        held is not None
                        and (held.name, held.online) == (view[b].name, view[b].online)
                        and held.version <= view[b].version
                    ), f"{client_id} ({a}) holds {held} about {b}; friend_view says {view[b]}"
        # 4. Nothing told about a pair that was not mutual during the step that told it.
        for step, k, d in self.delivered:
            if d.friend is None:
                continue
            pair = (user_of(d.client_id), d.friend.name)
            assert pair in self.possibly_mutual[step], (
                f"step {step}: i{k} told {d.client_id} about {d.friend} (not mutual)"
            )


async def run_schedule(seed: int, redis_url: str, r: Redis) -> None:
    await r.flushall()
    schedule = Schedule(seed, redis_url, r)
    try:
        await schedule.run()
    except Exception as exc:
        steps = "\n".join(schedule.log)
        raise AssertionError(
            f"schedule seed={seed} failed (replay: MODEL_SEED={seed}): {exc}\n{steps}"
        ) from exc
    finally:
        await schedule.close()


@pytest.mark.parametrize("batch", range(BATCHES))
async def test_model_schedules(batch: int, redis_url: str, r: Redis) -> None:
    if REPLAY is not None:
        if batch:
            pytest.skip("replaying one seed (MODEL_SEED)")
        seeds: list[int] = [int(REPLAY)]
    else:
        seeds = list(range(batch, SCHEDULES, BATCHES))
    for seed in seeds:
        await run_schedule(seed, redis_url, r)
