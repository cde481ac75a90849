"""Rate limits: token buckets on the daemon's clock, and bounded tables of them.

Theory of operation
-------------------
A :class:`TokenBucket` holds up to ``burst`` tokens and gains ``rate`` tokens a second;
a request takes one token or is refused. Time is passed in (the server's injected
monotonic clock), never read, so tests drive it by hand.

A :class:`BucketTable` keeps one bucket per key (a source address, a user) in
least-recently-used order, at most ``capacity`` of them, so a flood of distinct keys
(spoofed source addresses, invented user names) costs bounded memory. When the table is
full the least recently used bucket is evicted, *whatever its level*, and a key that
comes back later starts with a fresh, full bucket. That is accepted on purpose: to get
its own bucket evicted, a sender must first make ``capacity`` other keys more recent,
and every request of every key also has to pass the daemon-wide (global) bucket, which
no eviction can reset. So eviction can weaken fairness between keys during a flood,
never the bound on total work. (The alternative, evicting only full buckets, would have
to refuse *new* keys when the table is full of busy ones: that lets a flood of spoofed
addresses lock every new client out.)

A :class:`Limiter` is one kind of request (CONNECT, FRIENDS, SNAPSHOT_REQUEST) limited at
three scopes: per source address, per user, and per daemon. A request is admitted only
if every scope has a token, and then takes one from each; a refused request takes
nothing, so refusals at one scope do not drain another.
"""

from __future__ import annotations

import collections
import ipaddress
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from presence_daemon.config import Config

BUCKETS_PER_TABLE: Final = 16_384
"""Most keys one table tracks. One bucket with its key and table entry is about 270
bytes (measured with tracemalloc, IPv4 keys; a 64-character user name adds ~60), so the
six tables (three kinds, address and user scopes) stay around 30 MB at worst."""

SCOPES: Final = ("address", "user", "global")
"""Scope names, in the order they are checked (and named in counters)."""


def burst_for(rate: float) -> float:
    """The burst allowed at ``rate`` per second: two seconds' worth, at least one.

    Two seconds absorb the ordinary clumps (a client's retry right after its request,
    a few clients behind one NAT starting together) without a separate setting.
    """
    return max(1.0, 2.0 * rate)


def address_key(host: str) -> str:
    """The key an address is limited under: an IPv4 address as it is, an IPv6 address
    by its /64 prefix (one host or one customer usually holds a whole /64, so per-/128
    limits would be no limits)."""
    if ":" not in host:
        return host
    try:
        network = ipaddress.IPv6Network((host.split("%", 1)[0], 64), strict=False)
    except ValueError:
        return host
    return str(network.network_address)


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` a second on a passed-in clock."""

    rate: float
    """Tokens gained per second."""
    burst: float
    """Most tokens held."""
    tokens: float
    """Tokens held as of ``updated``."""
    updated: float
    """Clock reading of the last refill."""

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def level(self, now: float) -> float:
        """Refill up to ``now`` and return the tokens held. A clock reading older than
        the last one adds nothing (it never removes tokens either)."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        return self.tokens

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if held; False (and nothing taken) otherwise."""
        if self.level(now) < cost:
            return False
        self.tokens -= cost
        return True


class BucketTable:
    """One bucket per key, at most ``capacity`` keys, least recently used evicted."""

    def __init__(self, rate: float, *, capacity: int = BUCKETS_PER_TABLE) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity!r}")
        self.rate = rate
        self.burst = burst_for(rate)
        self.capacity = capacity
        self.evictions = 0
        self._buckets: collections.OrderedDict[Hashable, TokenBucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._buckets

    def bucket(self, key: Hashable, now: float) -> TokenBucket:
        """The key's bucket (a full new one if it has none), now the most recent."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        if len(self._buckets) >= self.capacity:
            self._buckets.popitem(last=False)
            self.evictions += 1
        bucket = self._buckets[key] = TokenBucket.full(self.rate, self.burst, now)
        return bucket


class Limiter:
    """One kind of request limited per address, per user and per daemon.

    A rate of 0 leaves that scope unlimited.
    """

    def __init__(
        self,
        kind: str,
        *,
        per_address: float,
        per_user: float,
        overall: float,
        now: float,
        capacity: int = BUCKETS_PER_TABLE,
    ) -> None:
        self.kind = kind
        self.by_address = BucketTable(per_address, capacity=capacity) if per_address else None
        self.by_user = BucketTable(per_user, capacity=capacity) if per_user else None
        self.overall = TokenBucket.full(overall, burst_for(overall), now) if overall else None

    @classmethod
    def from_config(cls, kind: str, config: Config, now: float) -> Limiter:
        """The limiter of ``kind`` ("connect", "friends", "snapshot") from the
        daemon's ``<kind>_rate_per_address``, ``<kind>_rate_per_user`` and
        ``<kind>_rate`` settings."""
        return cls(
            kind,
            per_address=getattr(config, f"{kind}_rate_per_address"),
            per_user=getattr(config, f"{kind}_rate_per_user"),
            overall=getattr(config, f"{kind}_rate"),
            now=now,
        )

    def admit(
        self, address: str | None, user: str | None, now: float, *, overall: bool = True
    ) -> str | None:
        """Take a token at every scope and return None, or, if some scope has none,
        take nothing and return the first such scope's name ("address", "user",
        "global"). A scope given as None (or ``overall`` False) is not charged: a daemon
        with auth charges the user only once the login token proved who it is, so
        forged CONNECTs naming a user cannot use up that user's tokens."""
        buckets: list[tuple[str, TokenBucket]] = []
        if self.by_address is not None and address is not None:
            buckets.append(("address", self.by_address.bucket(address, now)))
        if self.by_user is not None and user is not None:
            buckets.append(("user", self.by_user.bucket(user, now)))
        if self.overall is not None and overall:
            buckets.append(("global", self.overall))
        for scope, bucket in buckets:
            if bucket.level(now) < 1.0:
                return scope
        for _, bucket in buckets:
            bucket.tokens -= 1.0
        return None
