"""Client side of the presence service: the wire codec and an asyncio SDK."""

__version__ = "0.1.0"
