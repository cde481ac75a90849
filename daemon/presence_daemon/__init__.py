"""Presence daemon and the Redis-backed presence library.

The library is usable on its own from any asyncio program::

    from presence_daemon import Presence

    presence = Presence.from_url("redis://127.0.0.1:6379/0")
    await presence.start()
    await presence.connected("laptop-1", "alice", friends=["bob"])
    await presence.query(["alice", "bob"])  # {"alice": True, "bob": False}
    await presence.disconnected("laptop-1")
    async for entry in presence.watch():  # every transition, from every instance
        print(entry.id, entry.transition)
"""

from presence_daemon.presence import (
    Connection,
    Delivery,
    Presence,
    PresenceError,
    StreamEntry,
    StreamGap,
    Transition,
)

__all__ = [
    "Connection",
    "Delivery",
    "Presence",
    "PresenceError",
    "StreamEntry",
    "StreamGap",
    "Transition",
]
__version__ = "0.1.0"
