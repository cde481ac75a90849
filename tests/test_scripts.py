"""The Lua scripts called one by one against a real redis-server: each script's contract."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from helpers import hash_tag, wait_for
from presence_daemon import keys
from presence_daemon.scripts import SCRIPT_NAMES, Call, Scripts


class ScriptRunner:
    """Calls scripts through Scripts and checks every call stays within one hash tag."""

    def __init__(self, redis: Redis, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def _check_keys(self, name: str, script_keys: Sequence[str]) -> None:
        assert script_keys, f"{name} called without keys"
        tags = {hash_tag(key) for key in script_keys}
        assert len(tags) == 1, f"{name} keys span hash tags {tags}"
        for key in script_keys:  # the tag is a real {...} tag, not the whole key
            assert "{" + hash_tag(key) + "}" in key
        self.calls.append((name, tuple(script_keys)))

    async def __call__(self, name: str, script_keys: Sequence[str], *args: str | int) -> Any:
        self._check_keys(name, script_keys)
        return await self.scripts.call(self.redis, name, script_keys, list(args))

    async def many(self, calls: Sequence[Call]) -> list[Any]:
        for name, script_keys, _ in calls:
            self._check_keys(name, script_keys)
        return await self.scripts.call_many(self.redis, calls)


@pytest_asyncio.fixture
async def run(r: Redis) -> AsyncIterator[ScriptRunner]:
    scripts = Scripts()
    await scripts.load(r)
    runner = ScriptRunner(r, scripts)
    yield runner
    # Every test here goes through the runner; make sure they all did call something.
    assert runner.calls


@pytest.fixture
def now() -> int:
    """A realistic "now" in ms, passed to the scripts as ARGV. The scripts take it as
    given (only the fence reads Redis's clock), so versions can be asserted exactly:
    every bump is max(old + 1, now)."""
    return round(time.time() * 1000)


def ukeys(user: str) -> tuple[str, str, str, str, str]:
    return keys.user_keys(user)


def fkeys(user: str) -> list[str]:
    """The keys friends.lua takes: the user's five, then its reindex hash."""
    return [*keys.user_keys(user), keys.reindex_key(user)]


async def version(r: Redis, user: str) -> int:
    return int(await r.get(ukeys(user)[1]) or 0)


async def redis_ms(r: Redis) -> int:
    """Redis's clock in ms (the clock the fence is compared with)."""
    seconds, micros = await r.time()
    return seconds * 1000 + micros // 1000


GRACE = 2_000
"""ms: how long an unconfirmed transition is left to the call that decided it (the
grace connect.lua and disconnect.lua take; older, any call that touches the user gets it
to tell again)."""


def changes(flat: list[Any]) -> set[tuple[str, int, int]]:
    """The friends script's flat change list as a set of (name, added, is_fan)."""
    assert len(flat) % 3 == 0
    return {(flat[i], int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)}


async def connect(
    run: ScriptRunner,
    user: str,
    client_id: str,
    entry: str,
    now: int,
    *,
    fence: int = 0,
    mode: str = "connect",
    grace: int = GRACE,
) -> list[Any]:
    result: list[Any] = await run("connect", ukeys(user), client_id, entry, now, fence, mode, grace)
    return result


async def disconnect(
    run: ScriptRunner,
    user: str,
    client_id: str,
    token: str,
    now: int,
    *,
    grace: int = GRACE,
) -> list[Any]:
    result: list[Any] = await run("disconnect", ukeys(user), client_id, token, now, grace)
    return result


async def settle(run: ScriptRunner, user: str, now: int, *, grace: int = GRACE) -> list[Any]:
    result: list[Any] = await run("settle", ukeys(user), now, grace)
    return result


async def friends(
    run: ScriptRunner, user: str, op: str, limit: int, now: int, *names: str
) -> list[Any]:
    """friends.lua, then synced.lua for every change it returned (what the library does
    once the reverse indexes are in step), so each call starts with nothing waiting."""
    result: list[Any] = await run("friends", fkeys(user), user, op, limit, now, "", *names)
    flat = result[3]
    pairs = [str(v) for i in range(0, len(flat), 3) for v in (flat[i], flat[i + 1])]
    if pairs:
        assert await run("synced", [keys.reindex_key(user)], *pairs) == len(pairs) // 2
    return result


def outbox(pending: list[Any]) -> str:
    """The outbox value of a returned pending, "online|version|decided_ms", followed by
    ";online|version|decided_ms..." of the older transitions it replaced (answered as a
    last element holding '|')."""
    assert len(pending) >= 3, pending
    older = pending[-1] if len(pending) > 3 and "|" in str(pending[-1]) else ""
    return f"{pending[0]}|{pending[1]}|{pending[2]}" + (f";{older}" if older else "")


async def tell(run: ScriptRunner, user: str, pending: list[Any]) -> None:
    """Confirm a pending transition as told (told.lua with its exact value)."""
    assert await run("told", [keys.pending_key(user)], outbox(pending)) == 1


async def dump_all(r: Redis) -> dict[str, Any]:
    """Every key's serialized value and time to live."""
    return {str(key): (await r.dump(key), await r.pttl(key)) for key in await r.keys("*")}


async def writes(r: Redis) -> int:
    """How many writes Redis has applied (its dirty counter, which only grows: the test
    server never saves). The same before and after a call: the call wrote nothing, not
    even a value over itself."""
    return int((await r.info("persistence"))["rdb_changes_since_last_save"])


# ---------------------------------------------------------------------------
# The hash tag helper itself, and the key layout.


def test_hash_tag_helper() -> None:
    assert hash_tag("presence:{alice}:clients") == "alice"
    assert hash_tag("presence:{}:x") == "presence:{}:x"  # empty tag: the whole key
    assert hash_tag("plain") == "plain"
    assert hash_tag("a{b}c{d}") == "b"
    assert hash_tag(keys.client_key("c1")) == "c1"
    assert {hash_tag(k) for k in keys.user_keys("Zoë")} == {"Zoë"}
    assert hash_tag(keys.reindex_key("Zoë")) == "Zoë"
    assert hash_tag(keys.clients_key("a")) != hash_tag(keys.clients_key("b"))
    assert {hash_tag(k) for k in (keys.lease_key("d1"), keys.marker_key("d1"))} == {"d1"}


def test_user_keys_match_the_single_key_builders() -> None:
    user_keys = keys.user_keys("bob")
    assert len(user_keys) == 5
    clients, version_key, friends_key, fans, pending = user_keys
    assert clients == keys.clients_key("bob")
    assert friends_key == keys.friends_key("bob")
    assert fans == keys.fans_key("bob")
    assert pending == keys.pending_key("bob")
    assert len(set(user_keys)) == 5 and version_key.startswith("presence:{bob}:")
    assert keys.reindex_key("bob") not in user_keys
    assert keys.marker_key("d1") != keys.lease_key("d1")


async def test_runner_refuses_keys_of_two_tags(run: ScriptRunner, now: int) -> None:
    mixed = (*ukeys("a")[:4], ukeys("b")[4])
    with pytest.raises(AssertionError):
        await run("peek", mixed, "x", now)
    await run("peek", ukeys("a"), "x", now)


# ---------------------------------------------------------------------------
# connect.lua


async def test_connect_first_client_goes_online_with_mutual_friends(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    _, _, friends_key, fans, pending = ukeys("A")
    await r.sadd(friends_key, "B", "C", "E")
    await r.sadd(fans, "B", "D", "E")
    status, went_online, v, previous, told = await connect(run, "A", "c1", "t1|own1|1.2.3.4:5", now)
    # A user without a version starts at now (versions are seeded from the clock).
    assert (status, went_online, v, previous) == (1, 1, now, "")
    # The transition to tell: online, its version, when it was decided (this call's
    # now), the mutual friends.
    assert told[:3] == [1, now, now] and sorted(told[3:]) == ["B", "E"]
    assert await version(r, "A") == now
    assert await r.get(pending) == f"1|{now}|{now}"
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t1|own1|1.2.3.4:5"}


async def test_connect_second_client_is_no_transition(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    await r.sadd(ukeys("A")[2], "B")
    await r.sadd(ukeys("A")[3], "B")
    first = await connect(run, "A", "c1", "t1|own1|", now)
    assert first == [1, 1, now, "", [1, now, now, "B"]]
    await tell(run, "A", first[4])
    # No transition, nothing unconfirmed: nothing to tell, the version stays.
    assert await connect(run, "A", "c2", "t2|own2|", now + 5) == [1, 0, now, "", []]
    assert await version(r, "A") == now
    assert await r.exists(ukeys("A")[4]) == 0
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t1|own1|", "c2": "t2|own2|"}


async def test_connect_same_client_again_replaces_the_entry(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    first = await connect(run, "A", "c1", "t1|own1|x", now)
    assert first == [1, 1, now, "", [1, now, now]]
    await tell(run, "A", first[4])
    # The replaced entry is returned, so its owner's set can be kept exact.
    assert await connect(run, "A", "c1", "t2|own2|y", now + 5) == [1, 0, now, "t1|own1|x", []]
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t2|own2|y"}
    assert await version(r, "A") == now


async def test_connect_after_going_offline_bumps_again(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    # Every bump is max(old + 1, now): a clock that did not move (or went back) still
    # gets a higher version; a clock that moved on is taken as it is.
    assert (await connect(run, "A", "c1", "t1|o|", now))[:3] == [1, 1, now]
    assert (await disconnect(run, "A", "c1", "t1", now))[:3] == [1, 1, now + 1]
    assert (await connect(run, "A", "c1", "t2|o|", now - 1000))[:3] == [1, 1, now + 2]
    assert (await disconnect(run, "A", "c1", "t2", now + 1000))[:3] == [1, 1, now + 1000]
    assert (await connect(run, "A", "c1", "t3|o|", now + 1000))[:3] == [1, 1, now + 1001]
    assert await version(r, "A") == now + 1001


async def test_connect_touches_only_its_user(run: ScriptRunner, r: Redis, now: int) -> None:
    await connect(run, "A", "c1", "t1|o|", now)
    clients, version_key, _, _, pending = ukeys("A")
    assert sorted(await r.keys("*")) == sorted([clients, version_key, pending])


FENCED = [0, 0, 0, "", []]
"""connect.lua's answer when the fence has passed."""


async def test_connect_is_fenced_once_the_lease_ran_out(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    await r.sadd(ukeys("A")[2], "B")
    await r.sadd(ukeys("A")[3], "B")
    before = await r.keys("*")
    # The fence is compared with Redis's own clock; a fence already passed refuses the
    # write: status 0 and nothing else, in either mode.
    for fence in (1, await redis_ms(r) - 1, await redis_ms(r) - 60_000):
        for mode in ("connect", "restore"):
            assert await connect(run, "A", "c1", "t1|o|", now, fence=fence, mode=mode) == FENCED
    assert sorted(await r.keys("*")) == sorted(before)  # no entry, no version, no outbox
    # A fence in the future: applied.
    fence = await redis_ms(r) + 60_000
    applied = await connect(run, "A", "c1", "t1|o|", now, fence=fence)
    assert applied == [1, 1, now, "", [1, now, now, "B"]]
    await tell(run, "A", applied[4])
    # Fenced with the user online: the second client is not written either.
    assert await connect(run, "A", "c2", "t2|o|", now, fence=await redis_ms(r) - 1) == FENCED
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t1|o|"}
    # Nor is a replacement of an existing entry.
    assert (await connect(run, "A", "c1", "t9|o|", now, fence=1))[0] == 0
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t1|o|"}
    assert await version(r, "A") == now


async def test_connect_restore(run: ScriptRunner, r: Redis, now: int) -> None:
    await r.sadd(ukeys("A")[2], "B")
    await r.sadd(ukeys("A")[3], "B")
    # No entry for the client id: restore writes it (a transition like any connect).
    restored = await connect(run, "A", "c1", "tok1|own|addr", now, mode="restore")
    assert restored == [1, 1, now, "", [1, now, now, "B"]]
    await tell(run, "A", restored[4])
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "tok1|own|addr"}
    # The same session (same token) is there: a no-op, no transition, version unchanged.
    again = await connect(run, "A", "c1", "tok1|own|addr", now + 5, mode="restore")
    assert again == [1, 0, now, "tok1|own|addr", []]
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "tok1|own|addr"}
    # Another session holds the client id: superseded (2), nothing written. A token
    # that is a prefix of the stored one, or extends it, is another token.
    await connect(run, "A", "c1", "tok2|other|b", now)  # a newer session, elsewhere
    snapshot = {k: await r.dump(k) for k in await r.keys("*")}
    for token in ("tok1", "tok", "tok2x", "own", ""):
        result = await connect(run, "A", "c1", f"{token}|own|addr", now + 9, mode="restore")
        assert result == [2, 0, now, "tok2|other|b", []], token
    assert {k: await r.dump(k) for k in await r.keys("*")} == snapshot
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "tok2|other|b"}
    # While 'connect' replaces whatever is there.
    assert (await connect(run, "A", "c1", "tok3|own|addr", now))[:4] == [1, 0, now, "tok2|other|b"]


# ---------------------------------------------------------------------------
# disconnect.lua


async def test_disconnect_token_guard(run: ScriptRunner, r: Redis, now: int) -> None:
    await tell(run, "A", (await connect(run, "A", "c1", "tok1|own|addr", now))[4])
    # A wrong token, including one that is a prefix of the real one, removes nothing.
    for wrong in ("tok", "tok2", "tok1x", "own", "|", "TOK1"):
        assert await disconnect(run, "A", "c1", wrong, now + 5) == [0, 0, now, "", []]
        assert await r.hget(keys.clients_key("A"), "c1") == "tok1|own|addr"
    assert await version(r, "A") == now


async def test_disconnect_last_client_goes_offline_with_mutual(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    _, _, friends_key, fans, pending = ukeys("A")
    await r.sadd(friends_key, "B", "C")
    await r.sadd(fans, "B", "D")
    await tell(run, "A", (await connect(run, "A", "c1", "tok1|own|", now))[4])
    await connect(run, "A", "c2", "tok2|own|", now)
    # Matching token: removed, but another client remains.
    assert await disconnect(run, "A", "c1", "tok1", now) == [1, 0, now, "tok1|own|", []]
    # '' removes whatever is there (and says which entry); this is the last client.
    gone = await disconnect(run, "A", "c2", "", now)
    # decided_ms is this call's now, whatever the version (bumped above it here).
    assert gone == [1, 1, now + 1, "tok2|own|", [0, now + 1, now, "B"]]
    assert await r.get(pending) == f"0|{now + 1}|{now}"
    assert await r.exists(keys.clients_key("A")) == 0
    assert await version(r, "A") == now + 1
    await tell(run, "A", gone[4])
    # Again: nothing there, no transition, version unchanged, nothing to tell.
    assert await disconnect(run, "A", "c2", "", now + 9) == [0, 0, now + 1, "", []]
    assert await disconnect(run, "A", "c2", "tok2", now + 9) == [0, 0, now + 1, "", []]


async def test_disconnect_unknown_client(run: ScriptRunner, r: Redis, now: int) -> None:
    # A user never seen: version 0 (nothing is stored by a disconnect that changes nothing).
    assert await disconnect(run, "A", "nope", "", now) == [0, 0, 0, "", []]
    assert await r.keys("*") == []
    await tell(run, "A", (await connect(run, "A", "c1", "t|o|", now))[4])
    assert await disconnect(run, "A", "nope", "", now + 5) == [0, 0, now, "", []]
    assert await disconnect(run, "A", "nope", "t", now + 5) == [0, 0, now, "", []]
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t|o|"}


# ---------------------------------------------------------------------------
# The outbox (pending) and told.lua


async def test_a_transition_sets_pending_and_only_its_exact_value_clears_it(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    pending = keys.pending_key("A")
    await connect(run, "A", "c1", "t1|o|", now)
    value = f"1|{now}|{now}"
    assert await r.get(pending) == value
    # Another value (another transition, another version, another decision time, the
    # old two-field form, a part of it) confirms nothing.
    others = (
        f"0|{now}|{now}",
        f"1|{now + 1}|{now}",
        f"1|{now - 1}|{now}",
        f"1|{now}|{now + 1}",
        f"1|{now}|{now - 1}",
        f"1|{now}",
        f"1|{now}|",
        f"{value}|",
        str(now),
        "1",
        "",
    )
    for other in others:
        assert await run("told", [pending], other) == 0, other
        assert await r.get(pending) == value
    assert await run("told", [pending], value) == 1
    assert await r.exists(pending) == 0
    assert await run("told", [pending], value) == 0  # nothing left to confirm
    # A newer transition decided before the older one was confirmed goes in front of it
    # (the older one still has to reach the transition stream): the older teller's
    # confirmation, or one of the newer alone, leaves both in place.
    await disconnect(run, "A", "c1", "t1", now)
    await connect(run, "A", "c1", "t2|o|", now + 1)
    chained = f"1|{now + 2}|{now + 1};0|{now + 1}|{now}"
    assert await r.get(pending) == chained
    for partial in (f"0|{now + 1}|{now}", f"1|{now + 2}|{now + 1}"):
        assert await run("told", [pending], partial) == 0
        assert await r.get(pending) == chained
    # Two transitions with the same online and version but decided at different
    # moments are different transitions too (a Redis that lost the keys in between).
    assert await run("told", [pending], f"1|{now + 2}|{now};0|{now + 1}|{now}") == 0
    assert await r.get(pending) == chained
    assert await run("told", [pending], chained) == 1


async def test_a_disconnect_that_removes_nothing_returns_the_pending_transition(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    await r.sadd(ukeys("A")[2], "B", "C")
    await r.sadd(ukeys("A")[3], "B")
    await tell(run, "A", (await connect(run, "A", "c1", "t1|o|", now))[4])
    first = await disconnect(run, "A", "c1", "t1", now)
    assert first == [1, 1, now + 1, "t1|o|", [0, now + 1, now, "B"]]
    # The answer was lost: the caller retries. Nothing is removed; once the offline
    # transition has been unconfirmed for the grace (its decider gave up on it), the
    # retry gets it to tell (and so does any other call that finds it, with or without
    # a token).
    later = now + GRACE
    retold = [0, 0, now + 1, "", [0, now + 1, now, "B"]]
    for _ in range(2):
        assert await disconnect(run, "A", "c1", "t1", later) == retold
    assert await disconnect(run, "A", "zz", "", later + 9) == retold
    await tell(run, "A", first[4])
    assert await disconnect(run, "A", "c1", "t1", later + 9) == [0, 0, now + 1, "", []]


async def test_a_connect_that_replaces_an_entry_returns_an_unconfirmed_pending(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    await r.sadd(ukeys("A")[2], "B")
    await r.sadd(ukeys("A")[3], "B")
    own = [1, now, now, "B"]
    assert await connect(run, "A", "c1", "t1|o1|", now) == [1, 1, now, "", own]
    # The first connect's answer was lost; the client connects again (new session,
    # maybe through another daemon) once the grace has passed: no transition, but the
    # online one is told again.
    later = now + GRACE
    assert await connect(run, "A", "c1", "t2|o2|", later) == [1, 0, now, "t1|o1|", own]
    # A second client of the user finds it too.
    assert await connect(run, "A", "c2", "t3|o2|", later + 5) == [1, 0, now, "", own]
    await tell(run, "A", own)
    assert await connect(run, "A", "c1", "t4|o1|", later + 5) == [1, 0, now, "t2|o2|", []]


async def test_an_unconfirmed_transition_goes_to_other_calls_only_once_the_grace_passed(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    pending = keys.pending_key("A")
    await r.sadd(ukeys("A")[2], "B")
    await r.sadd(ukeys("A")[3], "B")
    online = [1, now, now, "B"]
    assert await connect(run, "A", "c1", "t1|o|", now) == [1, 1, now, "", online]
    # Younger than the grace, its decider is most likely telling it right now: no other
    # call gets it (nobody is told twice), whatever else the call does.
    young = now + GRACE - 1
    assert await connect(run, "A", "c2", "t2|o|", young) == [1, 0, now, "", []]
    assert await connect(run, "A", "c2", "t3|o|", young) == [1, 0, now, "t2|o|", []]
    restored = await connect(run, "A", "c2", "t3|o|", young, mode="restore")
    assert restored == [1, 0, now, "t3|o|", []]
    assert await disconnect(run, "A", "c2", "t3", young) == [1, 0, now, "t3|o|", []]
    assert await disconnect(run, "A", "zz", "", young) == [0, 0, now, "", []]
    # A caller whose clock is behind the decider's finds it younger still.
    assert await disconnect(run, "A", "zz", "", now - 60_000) == [0, 0, now, "", []]
    assert await r.get(pending) == f"1|{now}|{now}"  # still unconfirmed, unchanged
    # From the grace on (its decider lost the answer, or died), every call gets it.
    assert await disconnect(run, "A", "zz", "", now + GRACE) == [0, 0, now, "", online]
    assert await connect(run, "A", "c2", "t4|o|", now + GRACE) == [1, 0, now, "", online]
    old = now + 100 * GRACE
    assert await disconnect(run, "A", "c2", "t4", old) == [1, 0, now, "t4|o|", online]
    # The grace is the caller's: with none, any call gets it at once.
    assert await disconnect(run, "A", "zz", "", now, grace=0) == [0, 0, now, "", online]
    assert await r.get(pending) == f"1|{now}|{now}"  # returning it confirms nothing
    # Confirmed, nobody gets it any more, however old.
    await tell(run, "A", online)
    assert await disconnect(run, "A", "zz", "", old) == [0, 0, now, "", []]
    assert await connect(run, "A", "c2", "t5|o|", old) == [1, 0, now, "", []]


async def test_a_call_that_decides_a_transition_always_gets_it(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    pending = keys.pending_key("A")
    await r.sadd(ukeys("A")[2], "B")
    await r.sadd(ukeys("A")[3], "B")
    # Its own transition goes to the decider whatever the grace.
    never = 10**12
    first = await connect(run, "A", "c1", "t1|o|", now, grace=never)
    assert first == [1, 1, now, "", [1, now, now, "B"]]
    # A newer transition decided while the older is unconfirmed (and young) goes in
    # front of it in the outbox, and goes to its own decider with the older one after.
    gone = await disconnect(run, "A", "c1", "t1", now + 1, grace=never)
    older = f"1|{now}|{now}"
    assert gone == [1, 1, now + 1, "t1|o|", [0, now + 1, now + 1, "B", older]]
    assert await r.get(pending) == f"0|{now + 1}|{now + 1};{older}"
    # decided_ms is the decider's now, even below the version (a clock behind), and the
    # grace counts from it (the newest's).
    back = await connect(run, "A", "c1", "t2|o|", now - 5000, grace=never)
    older = f"0|{now + 1}|{now + 1};{older}"
    assert back == [1, 1, now + 2, "", [1, now + 2, now - 5000, "B", older]]
    assert await r.get(pending) == f"1|{now + 2}|{now - 5000};{older}"
    assert await disconnect(run, "A", "zz", "", now - 5000 + GRACE - 1) == [0, 0, now + 2, "", []]
    assert await disconnect(run, "A", "zz", "", now - 5000 + GRACE) == [0, 0, now + 2, "", back[4]]


async def test_settle_returns_an_abandoned_transition_and_changes_nothing(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    _, _, friends_key, fans, pending = ukeys("A")
    # A user never seen: nothing to tell, and nothing is stored.
    assert await settle(run, "A", now) == []
    assert await r.keys("*") == []
    await r.sadd(friends_key, "B", "C", "E")
    await r.sadd(fans, "B", "D", "E")
    first = await connect(run, "A", "c1", "t1|o|", now)
    assert first[4][:3] == [1, now, now]
    snapshot, written = await dump_all(r), await writes(r)
    # Younger than the grace (a caller's clock behind the decider's included): left to
    # its decider.
    for at in (now - 60_000, now, now + GRACE - 1):
        assert await settle(run, "A", at) == [], at
    # From the grace on: as connect.lua returns it, online, version, decided_ms and the
    # mutual friends.
    for at in (now + GRACE, now + 100 * GRACE):
        settled = await settle(run, "A", at)
        assert settled[:3] == [1, now, now] and sorted(settled[3:]) == ["B", "E"], at
    settled = await settle(run, "A", now, grace=0)
    assert settled[:3] == [1, now, now] and sorted(settled[3:]) == ["B", "E"]
    # Read only: every key as it was (the outbox included: settling confirms nothing).
    assert await dump_all(r) == snapshot
    assert await writes(r) == written
    # The mutual friends are those of the moment it is read.
    await r.srem(fans, "E")
    assert await settle(run, "A", now + GRACE) == [1, now, now, "B"]
    # An offline transition, decided by a disconnect, the same way.
    gone = await disconnect(run, "A", "c1", "t1", now)
    assert gone[4] == [0, now + 1, now, "B", f"1|{now}|{now}"]  # (the online is untold)
    assert await settle(run, "A", now + GRACE - 1) == []
    assert await settle(run, "A", now + GRACE) == gone[4]
    # Confirmed told: nothing left, however old, and still nothing changed.
    await tell(run, "A", gone[4])
    snapshot, written = await dump_all(r), await writes(r)
    assert await settle(run, "A", now + 100 * GRACE) == []
    assert await settle(run, "A", now, grace=0) == []
    assert await dump_all(r) == snapshot
    assert await writes(r) == written
    assert await r.exists(pending) == 0


async def test_friends_fans_and_peek_leave_the_outbox_alone(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    pending = keys.pending_key("A")
    await connect(run, "A", "c1", "t1|o|", now)
    await friends(run, "A", "add", 10, now, "B")
    await run("fans", ukeys("A"), "add", "B", now)
    await run("peek", ukeys("A"), "B", now)
    await friends(run, "A", "set", 10, now)
    await run("fans", ukeys("A"), "remove", "B", now)
    assert await r.get(pending) == f"1|{now}|{now}"


# ---------------------------------------------------------------------------
# Versions seeded from the clock


async def test_versions_never_go_backwards_when_the_users_keys_are_lost(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    # A busy user: many changes within one millisecond push its version above now.
    await connect(run, "A", "c1", "t1|o|", now)
    for i in range(5):
        await disconnect(run, "A", "c1", f"t{i + 1}", now)
        await connect(run, "A", "c1", f"t{i + 2}|o|", now)
    high = await version(r, "A")
    assert high == now + 10
    # Redis loses the user's keys (restarted empty). Whatever script numbers the user
    # next starts from its now, not from 1: a while later (a now above the last version)
    # that is above every version handed out.
    later = now + 11
    calls: list[tuple[str, list[str | int]]] = [
        ("connect", ["c1", "t9|o|", later, 0, "connect", GRACE]),
        ("fans", ["add", "B", later]),
        ("peek", ["B", later]),
    ]
    for script, args in calls:
        await r.delete(*ukeys("A"))
        await run(script, ukeys("A"), *args)
        assert await version(r, "A") == later > high, script
    await r.delete(*ukeys("A"))
    await friends(run, "A", "add", 10, later, "B")
    assert await version(r, "A") == later > high


async def test_peek_of_an_unknown_user_stores_a_version_later_changes_exceed(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    assert await run("peek", ukeys("A"), "V", now) == [0, now]
    assert await version(r, "A") == now  # stored
    assert await run("peek", ukeys("A"), "V", now + 1000) == [0, now]  # kept, not moved
    # A writer whose clock is behind the one that peeked still numbers above it.
    assert (await connect(run, "A", "c1", "t|o|", now - 5000))[:3] == [1, 1, now + 1]
    await run("peek", ukeys("B"), "V", now)
    assert await run("fans", ukeys("B"), "add", "V", now - 5000) == [now + 1, 0, 0]
    await run("peek", ukeys("C"), "V", now)
    assert (await friends(run, "C", "add", 10, now - 5000, "V"))[:2] == [1, now + 1]


# ---------------------------------------------------------------------------
# friends.lua


async def test_friends_add_remove_set_diffs(run: ScriptRunner, r: Redis, now: int) -> None:
    flist = ukeys("A")[2]
    await r.sadd(ukeys("A")[3], "B")  # B declares A
    status, v, online, flat = await friends(run, "A", "add", 10, now, "B", "C")
    assert (status, v, online) == (1, now, 0)
    assert changes(flat) == {("B", 1, 1), ("C", 1, 0)}
    assert await r.smembers(flist) == {"B", "C"}

    # Adding what is there changes nothing and does not bump.
    assert await friends(run, "A", "add", 10, now, "B", "C", "C") == [1, now, 0, []]

    # Removing: only names that were there count.
    status, v, _, flat = await friends(run, "A", "remove", 10, now, "C", "X")
    assert (status, v) == (1, now + 1)
    assert changes(flat) == {("C", 0, 0)}
    assert await r.smembers(flist) == {"B"}
    assert await friends(run, "A", "remove", 10, now, "X") == [1, now + 1, 0, []]

    # Set: the diff against the stored list.
    status, v, _, flat = await friends(run, "A", "set", 10, now, "C", "D")
    assert (status, v) == (1, now + 2)
    assert changes(flat) == {("B", 0, 1), ("C", 1, 0), ("D", 1, 0)}
    assert await r.smembers(flist) == {"C", "D"}
    assert await friends(run, "A", "set", 10, now, "D", "C") == [1, now + 2, 0, []]

    # Set to nothing empties the list.
    status, v, _, flat = await friends(run, "A", "set", 10, now)
    assert (status, v) == (1, now + 3)
    assert changes(flat) == {("C", 0, 0), ("D", 0, 0)}
    assert await r.exists(flist) == 0
    assert await version(r, "A") == now + 3
    # The script never touches the fans set.
    assert await r.smembers(ukeys("A")[3]) == {"B"}


async def test_friends_ignores_the_users_own_name(run: ScriptRunner, r: Redis, now: int) -> None:
    # Nothing changed, no version yet: 0.
    assert await friends(run, "A", "add", 10, now, "A") == [1, 0, 0, []]
    status, v, _, flat = await friends(run, "A", "set", 10, now, "A", "B")
    assert (status, v, changes(flat)) == (1, now, {("B", 1, 0)})
    assert await r.smembers(ukeys("A")[2]) == {"B"}
    # Should the name be in the stored list anyway, remove ignores it, set drops it.
    await r.sadd(ukeys("A")[2], "A")
    assert await friends(run, "A", "remove", 10, now, "A") == [1, now, 0, []]
    status, v, _, flat = await friends(run, "A", "set", 10, now, "B")
    assert (status, v, changes(flat)) == (1, now + 1, {("A", 0, 0)})


async def test_friends_limit_refusal_changes_nothing(run: ScriptRunner, r: Redis, now: int) -> None:
    await friends(run, "A", "set", 2, now, "B", "C")
    before = await r.smembers(ukeys("A")[2])
    assert await friends(run, "A", "add", 2, now + 5, "D") == [0, now, 0, []]
    assert await friends(run, "A", "set", 2, now + 5, "B", "C", "D") == [0, now, 0, []]
    assert await friends(run, "A", "add", 0, now + 5, "E") == [0, now, 0, []]
    assert await r.smembers(ukeys("A")[2]) == before
    assert await version(r, "A") == now
    assert await r.exists(keys.reindex_key("A")) == 0  # nothing recorded either
    # Within the limit: a set that swaps a name, adding what is already there, removing.
    status, v, _, flat = await friends(run, "A", "set", 2, now, "B", "D")
    assert (status, v, changes(flat)) == (1, now + 1, {("C", 0, 0), ("D", 1, 0)})
    assert await friends(run, "A", "add", 2, now, "B") == [1, now + 1, 0, []]
    status, v, _, flat = await friends(run, "A", "remove", 0, now, "B")
    assert (status, v, changes(flat)) == (1, now + 2, {("B", 0, 0)})


async def test_friends_reports_online(run: ScriptRunner, r: Redis, now: int) -> None:
    await connect(run, "A", "c1", "t|o|", now)
    status, v, online, flat = await friends(run, "A", "add", 10, now, "B")
    assert (status, v, online, changes(flat)) == (1, now + 1, 1, {("B", 1, 0)})
    assert await friends(run, "A", "add", 10, now, "B") == [1, now + 1, 1, []]


async def test_friends_changes_wait_in_reindex_until_synced(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    reindex = keys.reindex_key("A")
    await r.sadd(ukeys("A")[3], "B")  # B declares A
    first = await run("friends", fkeys("A"), "A", "add", 10, now, "", "B", "C")
    assert changes(first[3]) == {("B", 1, 1), ("C", 1, 0)}
    assert await r.hgetall(reindex) == {"B": "1", "C": "1"}
    # The caller's answer was lost: a retry changes nothing (no bump) but gets the
    # waiting changes back; so does any later call, even one with no names.
    for names in (("B", "C"), ()):
        status, v, online, flat = await run(
            "friends", fkeys("A"), "A", "add", 10, now + 5, "", *names
        )
        assert (status, v, online) == (1, now, 0)
        assert changes(flat) == {("B", 1, 1), ("C", 1, 0)}
    # A new change comes first, then the waiting ones; a name changed again is listed
    # once, with its new value.
    status, v, _, flat = await run("friends", fkeys("A"), "A", "remove", 10, now, "", "C")
    assert (status, v) == (1, now + 1)
    assert flat[:3] == ["C", 0, 0]
    assert changes(flat) == {("C", 0, 0), ("B", 1, 1)}
    assert await r.hgetall(reindex) == {"B": "1", "C": "0"}
    # synced removes an entry only if it still holds the value that was propagated.
    assert await run("synced", [reindex], "C", "1", "B", "0", "X", "1") == 0
    assert await r.hgetall(reindex) == {"B": "1", "C": "0"}
    assert await run("synced", [reindex], "C", "0") == 1
    assert await r.hgetall(reindex) == {"B": "1"}
    assert await run("synced", [reindex], "B", "1", "C", "0") == 1
    assert await r.exists(reindex) == 0
    assert await run("friends", fkeys("A"), "A", "add", 10, now, "", "B") == [1, now + 1, 0, []]
    # A refused call records nothing.
    assert (await run("friends", fkeys("A"), "A", "add", 1, now, "", "D"))[0] == 0
    assert await r.exists(reindex) == 0


# ---------------------------------------------------------------------------
# fans.lua


async def test_fans_add_remove_and_version(run: ScriptRunner, r: Redis, now: int) -> None:
    fans = ukeys("A")[3]
    assert await run("fans", ukeys("A"), "add", "B", now) == [now, 0, 0]
    assert await r.smembers(fans) == {"B"}
    assert await run("fans", ukeys("A"), "add", "B", now + 5) == [now, 0, 0]  # no change, no bump
    assert await run("fans", ukeys("A"), "remove", "B", now) == [now + 1, 0, 0]
    assert await r.exists(fans) == 0
    assert await run("fans", ukeys("A"), "remove", "B", now + 5) == [now + 1, 0, 0]
    assert await version(r, "A") == now + 1
    assert await run("fans", ukeys("A"), "add", "C", now + 100) == [now + 100, 0, 0]


async def test_fans_visible_only_when_online_and_mutual(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    await r.sadd(ukeys("A")[2], "B")  # A declares B
    # A offline: not visible even though mutual.
    assert await run("fans", ukeys("A"), "add", "B", now) == [now, 0, 0]
    await connect(run, "A", "c1", "t|o|", now)  # version now + 1
    # Online and mutual: visible (no change, so no bump).
    assert await run("fans", ukeys("A"), "add", "B", now) == [now + 1, 1, 1]
    # Online but A does not declare C: not visible.
    assert await run("fans", ukeys("A"), "add", "C", now) == [now + 2, 1, 0]
    # A removal is never visible.
    assert await run("fans", ukeys("A"), "remove", "B", now) == [now + 3, 1, 0]
    assert await r.smembers(ukeys("A")[3]) == {"C"}


# ---------------------------------------------------------------------------
# peek.lua


async def test_peek(run: ScriptRunner, r: Redis, now: int) -> None:
    _, _, friends_key, fans, _ = ukeys("A")
    await r.set(ukeys("A")[1], now - 7)
    assert await run("peek", ukeys("A"), "V", now) == [0, now - 7]  # an existing version wins
    await r.sadd(friends_key, "V")
    await r.sadd(fans, "V")
    assert await run("peek", ukeys("A"), "V", now) == [0, now - 7]  # offline
    await connect(run, "A", "c1", "t|o|", now)  # version now
    assert await run("peek", ukeys("A"), "V", now + 5) == [1, now]
    assert await run("peek", ukeys("A"), "W", now + 5) == [0, now]  # not a friend
    await r.srem(fans, "V")
    assert await run("peek", ukeys("A"), "V", now + 5) == [0, now]  # A declares V only
    await r.sadd(fans, "V")
    await r.srem(friends_key, "V")
    assert await run("peek", ukeys("A"), "V", now + 5) == [0, now]  # V declares A only
    await r.sadd(friends_key, "V")
    assert await run("peek", ukeys("A"), "V", now + 5) == [1, now]
    # Read-only once a version exists: it did not move.
    assert await version(r, "A") == now


# ---------------------------------------------------------------------------
# claim.lua / release.lua


async def test_claim_and_release(run: ScriptRunner, r: Redis) -> None:
    key = keys.client_key("c1")
    young, old = 10_000, 10_000  # ms: a binding claimed at 10 s, seen at 10 s or later
    assert await run("claim", [key], "A", "tok1", 10_000, "", old) == ""
    assert await r.get(key) == "A|tok1|10000"
    # Another user is refused and told who holds it; nothing changes.
    assert await run("claim", [key], "B", "tok2", 10_000, "", old) == "A|tok1|10000"
    assert await run("claim", [key], "B", "tok2", 99_000, "A|other|1", old) == "A|tok1|10000"
    assert await r.get(key) == "A|tok1|10000"
    # A user whose name is a prefix of the holder's is another user.
    await r.set(key, "AB|tok|1")
    assert await run("claim", [key], "A", "tok3", 10_000, "", old) == "AB|tok|1"
    assert await r.get(key) == "AB|tok|1"
    await r.set(key, "A|tok1|10000")
    # The same user re-claims with a new token, whatever the age.
    assert await run("claim", [key], "A", "tok3", 12_000, "", old) == ""
    assert await r.get(key) == "A|tok3|12000"
    # Taking over needs the exact stale value ...
    assert await run("claim", [key], "B", "tok4", 99_000, "A|tok1|10000", old) == "A|tok3|12000"
    # ... and a binding old enough not to be a connect in flight.
    assert await run("claim", [key], "B", "tok4", 12_000 + young - 1, "A|tok3|12000", young) == (
        "A|tok3|12000"
    )
    assert await r.get(key) == "A|tok3|12000"
    assert await run("claim", [key], "B", "tok4", 12_000 + young, "A|tok3|12000", young) == ""
    assert await r.get(key) == "B|tok4|22000"

    # Release only with the matching user and token.
    assert await run("release", [key], "A|tok3") == 0
    assert await run("release", [key], "B|tok") == 0
    assert await run("release", [key], "B") == 0
    assert await r.get(key) == "B|tok4|22000"
    assert await run("release", [key], "B|tok4") == 1
    assert await r.exists(key) == 0
    assert await run("release", [key], "B|tok4") == 0
    # A free client id can be claimed by anyone.
    assert await run("claim", [key], "C", "tok5", 1, "", old) == ""
    assert await r.get(key) == "C|tok5|1"


# ---------------------------------------------------------------------------
# reap.lua


async def test_reap_lists_nothing_while_the_lease_is_held(run: ScriptRunner, r: Redis) -> None:
    lease, owned = keys.lease_key("d1"), keys.owned_key("d1")
    await r.set(lease, "alive")
    await r.sadd(owned, "alice|c1|t1", "bob|c2|t2")
    assert await run("reap", [lease, owned], 10, "0") == [0]
    # Unless the owner itself clears what an earlier process of its id left.
    listed = await run("reap", [lease, owned], 10, "1")
    assert listed[0] == 1 and sorted(listed[1:]) == ["alice|c1|t1", "bob|c2|t2"]
    # Listing removes nothing: members leave the set only when disconnected.
    assert await r.scard(owned) == 2


async def test_reap_lists_batches_until_the_set_is_empty(run: ScriptRunner, r: Redis) -> None:
    lease, owned = keys.lease_key("d1"), keys.owned_key("d1")
    members = {f"u{i}|c{i}|t{i}" for i in range(5)}
    await r.sadd(owned, *members)
    first = await run("reap", [lease, owned], 3, "0")
    assert first[0] == 1 and len(first) - 1 == 3 and set(first[1:]) <= members
    await r.srem(owned, *first[1:])  # what the caller's disconnects do
    second = await run("reap", [lease, owned], 3, "0")
    assert second[0] == 1 and set(second[1:]) == members - set(first[1:])
    await r.srem(owned, *second[1:])
    assert await run("reap", [lease, owned], 3, "0") == [2]


# ---------------------------------------------------------------------------
# lease.lua

LEASE_MS = 10_000
MARKER_MS = 86_400_000


def lease_keys(owner: str) -> list[str]:
    return [keys.lease_key(owner), keys.marker_key(owner)]


async def test_lease_take_and_renew(run: ScriptRunner, r: Redis) -> None:
    lease, marker = lease_keys("d1")
    before = await redis_ms(r)
    status, fence = await run("lease", [lease, marker], "tok1", LEASE_MS, "take", MARKER_MS)
    after = await redis_ms(r)
    # Held: the fence is when the lease runs out, on Redis's clock.
    assert status == 1 and before + LEASE_MS <= fence <= after + LEASE_MS
    assert await r.get(lease) == "tok1"
    assert 0 < await r.pttl(lease) <= LEASE_MS
    assert await r.exists(marker) == 1 and LEASE_MS < await r.pttl(marker) <= MARKER_MS
    # Another tenure cannot take a held lease: told the holder's time to live.
    status, ttl = await run("lease", [lease, marker], "tok2", LEASE_MS, "take", MARKER_MS)
    assert status == 0 and 0 < ttl <= LEASE_MS
    assert await r.get(lease) == "tok1"
    # Another tenure cannot renew it either (2), and changes nothing.
    await r.pexpire(lease, 5_000)
    assert await run("lease", [lease, marker], "tok2", LEASE_MS, "renew", MARKER_MS) == [2, 0]
    assert await r.get(lease) == "tok1" and await r.pttl(lease) <= 5_000
    # The holder renews: the TTL is back up and the fence moves on.
    status, renewed = await run("lease", [lease, marker], "tok1", LEASE_MS, "renew", MARKER_MS)
    assert status == 1 and renewed >= fence
    assert await r.pttl(lease) > 5_000
    # Taking again with the same token is a renewal too.
    assert (await run("lease", [lease, marker], "tok1", LEASE_MS, "take", MARKER_MS))[0] == 1


async def test_lease_renew_never_recreates_a_lapsed_lease(run: ScriptRunner, r: Redis) -> None:
    lease, marker = lease_keys("d1")
    assert (await run("lease", [lease, marker], "tok1", 50, "take", MARKER_MS))[0] == 1

    async def lapsed() -> bool:
        return not await r.exists(lease)

    await wait_for(lapsed, what="the 50 ms lease expires")
    # Lapsed (the marker remembers the owner): 2, and the lease stays gone, however
    # often a (late) renewal arrives.
    for _ in range(3):
        assert await run("lease", [lease, marker], "tok1", LEASE_MS, "renew", MARKER_MS) == [2, 0]
        assert await r.exists(lease) == 0
    assert await r.exists(marker) == 1
    # A new tenure takes it.
    assert (await run("lease", [lease, marker], "tok2", LEASE_MS, "take", MARKER_MS))[0] == 1
    assert await r.get(lease) == "tok2"
    # The old tenure's renewal is still refused.
    assert await run("lease", [lease, marker], "tok1", LEASE_MS, "renew", MARKER_MS) == [2, 0]
    assert await r.get(lease) == "tok2"


async def test_lease_renew_tells_data_loss_from_a_lapse(run: ScriptRunner, r: Redis) -> None:
    lease, marker = lease_keys("d1")
    await run("lease", [lease, marker], "tok1", LEASE_MS, "take", MARKER_MS)
    await r.delete(lease)
    assert await run("lease", [lease, marker], "tok1", LEASE_MS, "renew", MARKER_MS) == [2, 0]
    # Lease and marker gone: Redis lost this owner's state (3); nothing is re-created.
    await r.delete(marker)
    assert await run("lease", [lease, marker], "tok1", LEASE_MS, "renew", MARKER_MS) == [3, 0]
    assert await r.exists(lease, marker) == 0
    # The marker without the lease is a lapse; so is another tenure's lease.
    await r.set(marker, "1")
    assert await run("lease", [lease, marker], "tok1", LEASE_MS, "renew", MARKER_MS) == [2, 0]
    await r.set(lease, "tok9")
    assert await run("lease", [lease, marker], "tok1", LEASE_MS, "renew", MARKER_MS) == [2, 0]
    assert await r.get(lease) == "tok9"


# ---------------------------------------------------------------------------
# Scripts: loading and NOSCRIPT recovery.


async def test_load_puts_every_script_in_the_cache(r: Redis) -> None:
    scripts = Scripts()
    await r.script_flush()  # the session server may hold them from earlier tests
    assert await r.script_exists(*scripts.sha.values()) == [False] * len(SCRIPT_NAMES)
    await scripts.load(r)
    assert await r.script_exists(*scripts.sha.values()) == [True] * len(SCRIPT_NAMES)


async def test_call_recovers_after_script_flush(run: ScriptRunner, r: Redis, now: int) -> None:
    assert (await connect(run, "A", "c1", "t|o|", now))[:2] == [1, 1]
    await r.script_flush()
    assert await r.script_exists(run.scripts.sha["connect"]) == [False]
    assert (await connect(run, "A", "c2", "t2|o|", now))[:4] == [1, 0, now, ""]
    # Reloaded all of them, and the call ran exactly once.
    assert await r.script_exists(*run.scripts.sha.values()) == [True] * len(SCRIPT_NAMES)
    assert await r.hlen(keys.clients_key("A")) == 2


async def test_call_works_without_load(r: Redis, now: int) -> None:
    scripts = Scripts()
    await r.script_flush()
    assert await scripts.call(r, "peek", ukeys("A"), ["V", now]) == [0, now]


async def test_call_many_recovers_after_script_flush(run: ScriptRunner, r: Redis, now: int) -> None:
    await connect(run, "A", "c1", "t|o|", now)
    await r.sadd(ukeys("A")[2], "V")
    await r.sadd(ukeys("A")[3], "V")
    await r.script_flush()
    calls: list[Call] = [
        ("peek", ukeys("A"), ["V", now]),
        ("fans", ukeys("B"), ["add", "A", now]),
        ("peek", ukeys("B"), ["A", now]),
        ("fans", ukeys("C"), ["add", "A", now]),
    ]
    assert await run.many(calls) == [[1, now], [now, 0, 0], [0, now], [now, 0, 0]]
    # Each call ran once: a second fans run would have bumped the version to now + 1.
    assert await version(r, "B") == now
    assert await version(r, "C") == now
    assert await run.many([]) == []


async def test_call_many_retries_only_the_failed_calls(
    run: ScriptRunner, r: Redis, now: int
) -> None:
    # Only one script is missing from the cache: the calls that succeed on the first pass
    # must not run again (a second fans run would show in the version).
    await connect(run, "D", "d1", "t|o|", now)
    await r.sadd(ukeys("D")[2], "X")
    await r.sadd(ukeys("D")[3], "X")
    await r.script_flush()
    await r.script_load(run.scripts.source["peek"])
    calls: list[Call] = [("fans", ukeys("C"), ["add", "X", now]), ("peek", ukeys("D"), ["X", now])]
    assert await run.many(calls) == [[now, 0, 0], [1, now]]
    await r.script_flush()
    await r.script_load(run.scripts.source["fans"])
    calls = [("fans", ukeys("C"), ["add", "Y", now]), ("peek", ukeys("D"), ["X", now])]
    assert await run.many(calls) == [[now + 1, 0, 0], [1, now]]
    await r.script_flush()
    await r.script_load(run.scripts.source["peek"])
    calls = [("peek", ukeys("D"), ["X", now]), ("fans", ukeys("C"), ["remove", "X", now])]
    assert await run.many(calls) == [[1, now], [now + 2, 0, 0]]
    assert await version(r, "C") == now + 2
    assert await r.smembers(ukeys("C")[3]) == {"Y"}


async def test_call_many_raises_script_errors(run: ScriptRunner, r: Redis, now: int) -> None:
    await r.set(ukeys("A")[3], "not a set")
    with pytest.raises(ResponseError):
        await run.many([("peek", ukeys("B"), ["A", now]), ("fans", ukeys("A"), ["add", "B", now])])


async def test_friends_from_a_session_that_is_no_longer_current_change_nothing(
    run: ScriptRunner, r: Redis
) -> None:
    # A FRIENDS that waited in a stalled daemon, after its client moved elsewhere, must
    # not undo what the user changed since: the session must still be the current one.
    now = 1_700_000_000_000
    await run("connect", ukeys("A"), "c1", "new|d2|", now, "0", "connect", GRACE)
    before = await r.smembers(keys.friends_key("A"))
    stale = await run("friends", fkeys("A"), "A", "add", 10, now, "c1|old", "B")
    assert stale[0] == 2 and stale[3] == []
    assert await r.smembers(keys.friends_key("A")) == before
    gone = await run("friends", fkeys("A"), "A", "add", 10, now, "c9|new", "B")
    assert gone[0] == 2
    current = await run("friends", fkeys("A"), "A", "add", 10, now, "c1|new", "B")
    assert current[0] == 1
    assert await r.smembers(keys.friends_key("A")) == {"B"}
