"""The Lua scripts called one by one against a real redis-server: each script's contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from helpers import hash_tag
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


def ukeys(user: str) -> tuple[str, str, str, str]:
    return keys.user_keys(user)


async def version(r: Redis, user: str) -> int:
    return int(await r.get(ukeys(user)[1]) or 0)


def changes(flat: list[Any]) -> set[tuple[str, int, int]]:
    """The friends script's flat change list as a set of (name, added, is_fan)."""
    assert len(flat) % 3 == 0
    return {(flat[i], int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)}


# ---------------------------------------------------------------------------
# The hash tag helper itself, and the key layout.


def test_hash_tag_helper() -> None:
    assert hash_tag("presence:{alice}:clients") == "alice"
    assert hash_tag("presence:{}:x") == "presence:{}:x"  # empty tag: the whole key
    assert hash_tag("plain") == "plain"
    assert hash_tag("a{b}c{d}") == "b"
    assert hash_tag(keys.client_key("c1")) == "c1"
    assert {hash_tag(k) for k in keys.user_keys("Zoë")} == {"Zoë"}
    assert hash_tag(keys.clients_key("a")) != hash_tag(keys.clients_key("b"))


def test_user_keys_match_the_single_key_builders() -> None:
    clients, _, friends, fans = keys.user_keys("bob")
    assert clients == keys.clients_key("bob")
    assert friends == keys.friends_key("bob")
    assert fans == keys.fans_key("bob")


async def test_runner_refuses_keys_of_two_tags(run: ScriptRunner) -> None:
    mixed = (*ukeys("a")[:3], ukeys("b")[3])
    with pytest.raises(AssertionError):
        await run("peek", mixed, "x")
    await run("peek", ukeys("a"), "x")


# ---------------------------------------------------------------------------
# connect.lua


async def test_connect_first_client_goes_online_with_mutual_friends(
    run: ScriptRunner, r: Redis
) -> None:
    _, _, friends, fans = ukeys("A")
    await r.sadd(friends, "B", "C", "E")
    await r.sadd(fans, "B", "D", "E")
    went_online, v, mutual, previous = await run("connect", ukeys("A"), "c1", "t1|own1|1.2.3.4:5")
    assert (went_online, v, previous) == (1, 1, "")
    assert sorted(mutual) == ["B", "E"]
    assert await version(r, "A") == 1
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t1|own1|1.2.3.4:5"}


async def test_connect_second_client_is_no_transition(run: ScriptRunner, r: Redis) -> None:
    await r.sadd(ukeys("A")[2], "B")
    await r.sadd(ukeys("A")[3], "B")
    assert await run("connect", ukeys("A"), "c1", "t1|own1|") == [1, 1, ["B"], ""]
    assert await run("connect", ukeys("A"), "c2", "t2|own2|") == [0, 1, [], ""]
    assert await version(r, "A") == 1
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t1|own1|", "c2": "t2|own2|"}


async def test_connect_same_client_again_replaces_the_entry(run: ScriptRunner, r: Redis) -> None:
    assert await run("connect", ukeys("A"), "c1", "t1|own1|x") == [1, 1, [], ""]
    # The replaced entry is returned, so its owner's set can be kept exact.
    assert await run("connect", ukeys("A"), "c1", "t2|own2|y") == [0, 1, [], "t1|own1|x"]
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t2|own2|y"}
    assert await version(r, "A") == 1


async def test_connect_after_going_offline_bumps_again(run: ScriptRunner, r: Redis) -> None:
    assert (await run("connect", ukeys("A"), "c1", "t1|o|"))[:2] == [1, 1]
    assert (await run("disconnect", ukeys("A"), "c1", "t1"))[:3] == [1, 1, 2]
    assert (await run("connect", ukeys("A"), "c1", "t2|o|"))[:2] == [1, 3]
    assert await version(r, "A") == 3


async def test_connect_touches_only_its_user(run: ScriptRunner, r: Redis) -> None:
    await run("connect", ukeys("A"), "c1", "t1|o|")
    assert sorted(await r.keys("*")) == sorted([keys.clients_key("A"), ukeys("A")[1]])


# ---------------------------------------------------------------------------
# disconnect.lua


async def test_disconnect_token_guard(run: ScriptRunner, r: Redis) -> None:
    await run("connect", ukeys("A"), "c1", "tok1|own|addr")
    # A wrong token, including one that is a prefix of the real one, removes nothing.
    for wrong in ("tok", "tok2", "tok1x", "own", "|", "TOK1"):
        assert await run("disconnect", ukeys("A"), "c1", wrong) == [0, 0, 1, [], ""], wrong
        assert await r.hget(keys.clients_key("A"), "c1") == "tok1|own|addr"
    assert await version(r, "A") == 1


async def test_disconnect_last_client_goes_offline_with_mutual(run: ScriptRunner, r: Redis) -> None:
    _, _, friends, fans = ukeys("A")
    await r.sadd(friends, "B", "C")
    await r.sadd(fans, "B", "D")
    await run("connect", ukeys("A"), "c1", "tok1|own|")
    await run("connect", ukeys("A"), "c2", "tok2|own|")
    # Matching token: removed, but another client remains.
    assert await run("disconnect", ukeys("A"), "c1", "tok1") == [1, 0, 1, [], "tok1|own|"]
    # '' removes whatever is there (and says which entry); this is the last client.
    assert await run("disconnect", ukeys("A"), "c2", "") == [1, 1, 2, ["B"], "tok2|own|"]
    assert await r.exists(keys.clients_key("A")) == 0
    assert await version(r, "A") == 2
    # Again: nothing there, no transition, version unchanged.
    assert await run("disconnect", ukeys("A"), "c2", "") == [0, 0, 2, [], ""]
    assert await run("disconnect", ukeys("A"), "c2", "tok2") == [0, 0, 2, [], ""]


async def test_disconnect_unknown_client(run: ScriptRunner, r: Redis) -> None:
    assert await run("disconnect", ukeys("A"), "nope", "") == [0, 0, 0, [], ""]
    await run("connect", ukeys("A"), "c1", "t|o|")
    assert await run("disconnect", ukeys("A"), "nope", "") == [0, 0, 1, [], ""]
    assert await run("disconnect", ukeys("A"), "nope", "t") == [0, 0, 1, [], ""]
    assert await r.hgetall(keys.clients_key("A")) == {"c1": "t|o|"}


# ---------------------------------------------------------------------------
# friends.lua


async def test_friends_add_remove_set_diffs(run: ScriptRunner, r: Redis) -> None:
    flist = ukeys("A")[2]
    await r.sadd(ukeys("A")[3], "B")  # B declares A
    status, v, online, flat = await run("friends", ukeys("A"), "A", "add", 10, "B", "C")
    assert (status, v, online) == (1, 1, 0)
    assert changes(flat) == {("B", 1, 1), ("C", 1, 0)}
    assert await r.smembers(flist) == {"B", "C"}

    # Adding what is there changes nothing and does not bump.
    assert await run("friends", ukeys("A"), "A", "add", 10, "B", "C", "C") == [1, 1, 0, []]

    # Removing: only names that were there count.
    status, v, _, flat = await run("friends", ukeys("A"), "A", "remove", 10, "C", "X")
    assert (status, v) == (1, 2)
    assert changes(flat) == {("C", 0, 0)}
    assert await r.smembers(flist) == {"B"}
    assert await run("friends", ukeys("A"), "A", "remove", 10, "X") == [1, 2, 0, []]

    # Set: the diff against the stored list.
    status, v, _, flat = await run("friends", ukeys("A"), "A", "set", 10, "C", "D")
    assert (status, v) == (1, 3)
    assert changes(flat) == {("B", 0, 1), ("C", 1, 0), ("D", 1, 0)}
    assert await r.smembers(flist) == {"C", "D"}
    assert await run("friends", ukeys("A"), "A", "set", 10, "D", "C") == [1, 3, 0, []]

    # Set to nothing empties the list.
    status, v, _, flat = await run("friends", ukeys("A"), "A", "set", 10)
    assert (status, v) == (1, 4)
    assert changes(flat) == {("C", 0, 0), ("D", 0, 0)}
    assert await r.exists(flist) == 0
    assert await version(r, "A") == 4
    # The script never touches the fans set.
    assert await r.smembers(ukeys("A")[3]) == {"B"}


async def test_friends_ignores_the_users_own_name(run: ScriptRunner, r: Redis) -> None:
    assert await run("friends", ukeys("A"), "A", "add", 10, "A") == [1, 0, 0, []]
    status, v, _, flat = await run("friends", ukeys("A"), "A", "set", 10, "A", "B")
    assert (status, v, changes(flat)) == (1, 1, {("B", 1, 0)})
    assert await r.smembers(ukeys("A")[2]) == {"B"}
    # Should the name be in the stored list anyway, remove ignores it, set drops it.
    await r.sadd(ukeys("A")[2], "A")
    assert await run("friends", ukeys("A"), "A", "remove", 10, "A") == [1, 1, 0, []]
    status, v, _, flat = await run("friends", ukeys("A"), "A", "set", 10, "B")
    assert (status, v, changes(flat)) == (1, 2, {("A", 0, 0)})


async def test_friends_limit_refusal_changes_nothing(run: ScriptRunner, r: Redis) -> None:
    await run("friends", ukeys("A"), "A", "set", 2, "B", "C")
    before = await r.smembers(ukeys("A")[2])
    assert await run("friends", ukeys("A"), "A", "add", 2, "D") == [0, 1, 0, []]
    assert await run("friends", ukeys("A"), "A", "set", 2, "B", "C", "D") == [0, 1, 0, []]
    assert await run("friends", ukeys("A"), "A", "add", 0, "E") == [0, 1, 0, []]
    assert await r.smembers(ukeys("A")[2]) == before
    assert await version(r, "A") == 1
    # Within the limit: a set that swaps a name, adding what is already there, removing.
    status, v, _, flat = await run("friends", ukeys("A"), "A", "set", 2, "B", "D")
    assert (status, v, changes(flat)) == (1, 2, {("C", 0, 0), ("D", 1, 0)})
    assert await run("friends", ukeys("A"), "A", "add", 2, "B") == [1, 2, 0, []]
    status, v, _, flat = await run("friends", ukeys("A"), "A", "remove", 0, "B")
    assert (status, v, changes(flat)) == (1, 3, {("B", 0, 0)})


async def test_friends_reports_online(run: ScriptRunner, r: Redis) -> None:
    await run("connect", ukeys("A"), "c1", "t|o|")
    status, v, online, flat = await run("friends", ukeys("A"), "A", "add", 10, "B")
    assert (status, v, online, changes(flat)) == (1, 2, 1, {("B", 1, 0)})
    assert await run("friends", ukeys("A"), "A", "add", 10, "B") == [1, 2, 1, []]


# ---------------------------------------------------------------------------
# fans.lua


async def test_fans_add_remove_and_version(run: ScriptRunner, r: Redis) -> None:
    fans = ukeys("A")[3]
    assert await run("fans", ukeys("A"), "add", "B") == [1, 0, 0]
    assert await r.smembers(fans) == {"B"}
    assert await run("fans", ukeys("A"), "add", "B") == [1, 0, 0]  # no change, no bump
    assert await run("fans", ukeys("A"), "remove", "B") == [2, 0, 0]
    assert await r.exists(fans) == 0
    assert await run("fans", ukeys("A"), "remove", "B") == [2, 0, 0]
    assert await version(r, "A") == 2


async def test_fans_visible_only_when_online_and_mutual(run: ScriptRunner, r: Redis) -> None:
    await r.sadd(ukeys("A")[2], "B")  # A declares B
    # A offline: not visible even though mutual.
    assert await run("fans", ukeys("A"), "add", "B") == [1, 0, 0]
    await run("connect", ukeys("A"), "c1", "t|o|")  # version 2
    # Online and mutual: visible (no change, so no bump).
    assert await run("fans", ukeys("A"), "add", "B") == [2, 1, 1]
    # Online but A does not declare C: not visible.
    assert await run("fans", ukeys("A"), "add", "C") == [3, 1, 0]
    # A removal is never visible.
    assert await run("fans", ukeys("A"), "remove", "B") == [4, 1, 0]
    assert await r.smembers(ukeys("A")[3]) == {"C"}


# ---------------------------------------------------------------------------
# peek.lua


async def test_peek(run: ScriptRunner, r: Redis) -> None:
    _, _, friends, fans = ukeys("A")
    assert await run("peek", ukeys("A"), "V") == [0, 0]
    await r.sadd(friends, "V")
    await r.sadd(fans, "V")
    await r.set(ukeys("A")[1], 7)
    assert await run("peek", ukeys("A"), "V") == [0, 7]  # offline
    await run("connect", ukeys("A"), "c1", "t|o|")  # version 8
    assert await run("peek", ukeys("A"), "V") == [1, 8]
    assert await run("peek", ukeys("A"), "W") == [0, 8]  # not a friend
    await r.srem(fans, "V")
    assert await run("peek", ukeys("A"), "V") == [0, 8]  # A declares V only
    await r.sadd(fans, "V")
    await r.srem(friends, "V")
    assert await run("peek", ukeys("A"), "V") == [0, 8]  # V declares A only
    await r.sadd(friends, "V")
    assert await run("peek", ukeys("A"), "V") == [1, 8]
    # Read-only: the version did not move.
    assert await version(r, "A") == 8


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
# Scripts: loading and NOSCRIPT recovery.


async def test_load_puts_every_script_in_the_cache(r: Redis) -> None:
    scripts = Scripts()
    await r.script_flush()  # the session server may hold them from earlier tests
    assert await r.script_exists(*scripts.sha.values()) == [False] * len(SCRIPT_NAMES)
    await scripts.load(r)
    assert await r.script_exists(*scripts.sha.values()) == [True] * len(SCRIPT_NAMES)


async def test_call_recovers_after_script_flush(run: ScriptRunner, r: Redis) -> None:
    assert (await run("connect", ukeys("A"), "c1", "t|o|"))[0] == 1
    await r.script_flush()
    assert await r.script_exists(run.scripts.sha["connect"]) == [False]
    assert await run("connect", ukeys("A"), "c2", "t2|o|") == [0, 1, [], ""]
    # Reloaded all of them, and the call ran exactly once.
    assert await r.script_exists(*run.scripts.sha.values()) == [True] * len(SCRIPT_NAMES)
    assert await r.hlen(keys.clients_key("A")) == 2


async def test_call_works_without_load(r: Redis) -> None:
    scripts = Scripts()
    assert await scripts.call(r, "peek", ukeys("A"), ["V"]) == [0, 0]


async def test_call_many_recovers_after_script_flush(run: ScriptRunner, r: Redis) -> None:
    await run("connect", ukeys("A"), "c1", "t|o|")
    await r.sadd(ukeys("A")[2], "V")
    await r.sadd(ukeys("A")[3], "V")
    await r.script_flush()
    calls: list[Call] = [
        ("peek", ukeys("A"), ["V"]),
        ("fans", ukeys("B"), ["add", "A"]),
        ("peek", ukeys("B"), ["A"]),
        ("fans", ukeys("C"), ["add", "A"]),
    ]
    assert await run.many(calls) == [[1, 1], [1, 0, 0], [0, 1], [1, 0, 0]]
    # Each call ran once: the fans writes bumped each version exactly once.
    assert await version(r, "B") == 1
    assert await version(r, "C") == 1
    assert await run.many([]) == []


async def test_call_many_retries_only_the_failed_calls(run: ScriptRunner, r: Redis) -> None:
    # Only one script is missing from the cache: the calls that succeed on the first pass
    # must not run again (a second fans run would show in the version).
    await run("connect", ukeys("D"), "d1", "t|o|")
    await r.sadd(ukeys("D")[2], "X")
    await r.sadd(ukeys("D")[3], "X")
    await r.script_flush()
    await r.script_load(run.scripts.source["peek"])
    calls: list[Call] = [("fans", ukeys("C"), ["add", "X"]), ("peek", ukeys("D"), ["X"])]
    assert await run.many(calls) == [[1, 0, 0], [1, 1]]
    await r.script_flush()
    await r.script_load(run.scripts.source["fans"])
    calls = [("fans", ukeys("C"), ["add", "Y"]), ("peek", ukeys("D"), ["X"])]
    assert await run.many(calls) == [[2, 0, 0], [1, 1]]
    await r.script_flush()
    await r.script_load(run.scripts.source["peek"])
    calls = [("peek", ukeys("D"), ["X"]), ("fans", ukeys("C"), ["remove", "X"])]
    assert await run.many(calls) == [[1, 1], [3, 0, 0]]
    assert await version(r, "C") == 3
    assert await r.smembers(ukeys("C")[3]) == {"Y"}


async def test_call_many_raises_script_errors(run: ScriptRunner, r: Redis) -> None:
    await r.set(ukeys("A")[3], "not a set")
    with pytest.raises(ResponseError):
        await run.many([("peek", ukeys("B"), ["A"]), ("fans", ukeys("A"), ["add", "B"])])
