"""Every Redis key name the service uses, and nothing else builds key names.

A user's keys share the hash tag ``{user}``, so each Lua script, which only touches one
user's keys, runs unchanged on Redis Cluster. A client id's binding lives under the
client id's own tag; an owner's (a daemon's or library instance's) lease, client set and
inbox channel share the owner's tag.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "presence"


def user_keys(user: str) -> tuple[str, str, str, str, str]:
    """The five keys every per-user script takes, in the order the scripts expect.

    ``clients`` (hash client id -> "token|owner|address"), ``version`` (string),
    ``friends`` (set: whom the user declared), ``fans`` (set: who declared the user),
    ``pending`` (string "online|version|decided_ms": a transition not yet confirmed told,
    followed by ";online|version|decided_ms" for each older unconfirmed one it replaced).
    """
    tag = f"{PREFIX}:{{{user}}}"
    return (
        f"{tag}:clients",
        f"{tag}:version",
        f"{tag}:friends",
        f"{tag}:fans",
        f"{tag}:pending",
    )


def connect_number_key(user: str, client_id: str) -> str:
    """String: the client id's last CONNECT number (replays below it are refused)."""
    return f"{PREFIX}:{{{user}}}:n:{client_id}"


def pending_key(user: str) -> str:
    """The user's outbox: "online|version|decided_ms" of a transition not yet confirmed told
    (and ";online|version|decided_ms" of each older unconfirmed one it replaced)."""
    return f"{PREFIX}:{{{user}}}:pending"


def clients_key(user: str) -> str:
    """Hash of the user's connected clients: client id -> "token|owner|address"."""
    return f"{PREFIX}:{{{user}}}:clients"


def friends_key(user: str) -> str:
    """Set of the names the user declared as friends."""
    return f"{PREFIX}:{{{user}}}:friends"


def fans_key(user: str) -> str:
    """Set of the names that declared the user as a friend (the reverse index)."""
    return f"{PREFIX}:{{{user}}}:fans"


def reindex_key(user: str) -> str:
    """Hash name -> '1'/'0' of the user's list changes not yet confirmed in the friends'
    reverse indexes (only friends.lua and synced.lua take it)."""
    return f"{PREFIX}:{{{user}}}:reindex"


def kicked_key(user: str, client_id: str) -> str:
    """String with a TTL: the token of the client id's session an operator kicked. A
    restore of that session (its daemon missed the kick) is refused."""
    return f"{PREFIX}:{{{user}}}:kicked:{client_id}"


def client_key(client_id: str) -> str:
    """String binding a client id to its user and current session: "user|token|claimed_ms"."""
    return f"{PREFIX}:client:{{{client_id}}}"


OWNERS_KEY: Final = f"{PREFIX}:owners"
"""Set of the instance ids that own (or owned) clients: where survivors look for the dead."""


def lease_key(instance_id: str) -> str:
    """String with a TTL that exists while the owner ``instance_id`` is alive."""
    return f"{PREFIX}:owner:{{{instance_id}}}:lease"


def marker_key(instance_id: str) -> str:
    """String with a long TTL, refreshed with the lease: gone only if Redis lost its data."""
    return f"{PREFIX}:owner:{{{instance_id}}}:marker"


def owned_key(instance_id: str) -> str:
    """Set of "user|client id|token" for every client entry the owner holds in Redis."""
    return f"{PREFIX}:owner:{{{instance_id}}}:clients"


def owned_member(user: str, client_id: str, token: str) -> str:
    """A member of an owner's set (names never contain '|')."""
    return f"{user}|{client_id}|{token}"


def inbox_channel(instance_id: str) -> str:
    """Pub/sub channel on which a daemon receives notifications for clients it owns."""
    return f"{PREFIX}:owner:{{{instance_id}}}:inbox"


TRANSITIONS_STREAM: Final = f"{PREFIX}:transitions"
"""Capped stream of every transition decided by any daemon or library instance, with
fields ``user``, ``online`` (0/1), ``version``, ``decided_ms``, ``decided_by`` and
``retold`` (0/1): see ``Presence.watch``. One key, so one slot on a cluster."""
