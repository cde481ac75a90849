"""Rate limits, snapshot interval and notification coalescing (issue 11).

Pure tests of the token bucket and its tables on a hand-driven clock; then real daemon
processes with low limits, counting the TRY_AGAIN replies on the wire and the Redis
commands (``INFO commandstats``) a flood of forged datagrams causes.
"""

from __future__ import annotations

import pytest

from presence_daemon.limits import (
    BucketTable,
    Limiter,
    TokenBucket,
    address_key,
    burst_for,
)

# ---------------------------------------------------------------------------
# Pure: buckets on a manual clock.


def test_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=4.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(5)] == [True] * 4 + [False]
    assert not bucket.take(100.4)  # 0.8 of a token
    assert bucket.take(100.5)  # one whole token after half a second at 2/s
    assert not bucket.take(100.5)
    # A long pause refills to the burst, never beyond it.
    assert [bucket.take(1000.0) for _ in range(5)] == [True] * 4 + [False]


def test_bucket_refused_take_costs_nothing_and_clock_going_back_adds_nothing() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1.0, now=10.0)
    assert bucket.take(10.0)
    for _ in range(100):
        assert not bucket.take(10.5)  # refusals do not push the refill further away
    assert bucket.take(11.0)
    assert not bucket.take(5.0)  # an older reading: no refill, no harm
    assert bucket.level(5.0) == 0.0
    assert bucket.take(12.0)


@pytest.mark.parametrize(("rate", "burst"), [(0.01, 1.0), (0.5, 1.0), (1.0, 2.0), (20.0, 40.0)])
def test_burst_is_two_seconds_worth_at_least_one(rate: float, burst: float) -> None:
    assert burst_for(rate) == burst


def test_table_is_bounded_and_evicts_the_least_recently_used() -> None:
    table = BucketTable(1.0, capacity=3)
    for key in ("a", "b", "c"):
        assert table.bucket(key, 0.0).take(0.0)
        assert table.bucket(key, 0.0).take(0.0)  # burst 2: now empty
    table.bucket("a", 0.0)  # "a" is now the most recent; "b" the least
    for n in range(1000):  # a flood of distinct keys
        table.bucket(f"flood-{n}", 0.0)
        assert len(table) <= 3
    assert table.evictions == 1000
    assert "a" not in table and "b" not in table
    # An evicted key comes back with a fresh, full bucket (documented: the global
    # bucket bounds the total however often keys are evicted).
    assert table.bucket("b", 0.0).level(0.0) == 2.0

    table = BucketTable(1.0, capacity=3)
    for key in ("a", "b", "c"):
        table.bucket(key, 0.0).take(0.0)
    table.bucket("a", 0.0)
    table.bucket("d", 0.0)
    assert "b" not in table and {"a", "c", "d"} == {k for k in "abcd" if k in table}


def test_limiter_takes_from_every_scope_or_from_none() -> None:
    limiter = Limiter("connect", per_address=1.0, per_user=0.5, overall=2.0, now=0.0)
    # user burst 1, address burst 2, global burst 4.
    assert limiter.admit("10.0.0.1", "ann", 0.0) is None
    assert limiter.admit("10.0.0.1", "ann", 0.0) == "user"  # refused: nothing taken
    assert limiter.admit("10.0.0.1", "ben", 0.0) is None  # so the address still had one
    assert limiter.admit("10.0.0.1", "cat", 0.0) == "address"
    assert limiter.admit("10.0.0.2", "cat", 0.0) is None
    assert limiter.admit("10.0.0.3", "dan", 0.0) is None
    assert limiter.admit("10.0.0.4", "eve", 0.0) == "global"  # 4 admitted in all
    assert limiter.admit("10.0.0.4", "eve", 0.5) is None  # the global refilled one


def test_limiter_with_zero_rates_is_unlimited() -> None:
    limiter = Limiter("snapshot", per_address=0, per_user=0, overall=0, now=0.0)
    assert all(limiter.admit("10.0.0.1", "ann", 0.0) is None for _ in range(10_000))
    assert limiter.by_address is None and limiter.by_user is None and limiter.overall is None


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::"),
        ("fe80::1%eth0", "fe80::"),
        ("::1", "::"),
    ],
)
def test_ipv6_addresses_are_limited_by_their_64_prefix(host: str, key: str) -> None:
    assert address_key(host) == key
