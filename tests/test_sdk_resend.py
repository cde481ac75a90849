"""The SDK's resends, seen from the daemon's side of a real UDP socket.

A scripted peer on 127.0.0.1 plays the daemon (with the real codec), so the test sees
exactly which datagrams the client sends and can answer (or not) each one.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from presence_client.protocol import (
    Connect,
    ConnectOk,
    Disconnect,
    DisconnectOk,
    FriendState,
    Ping,
    Pong,
    Snapshot,
    SnapshotRequest,
    decode,
    encode,
)
from presence_client.sdk import PresenceClient

WAIT = 10.0
SESSION = bytes(range(16))


class Peer:
    """A UDP socket on 127.0.0.1 that receives the client's datagrams and answers them."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.client: tuple[str, int] | None = None

    async def receive(self, kind: type) -> object:
        """The next datagram of type ``kind`` (PINGs are answered on the way)."""
        loop = asyncio.get_running_loop()
        while True:
            data, self.client = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 2048), WAIT)
            msg = decode(data)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Ping):
                self.send(Pong(0))

    def send(self, msg: object) -> None:
        assert self.client is not None
        self.sock.sendto(encode(msg), self.client)  # type: ignore[arg-type]


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.sock.close()


async def test_a_snapshot_request_is_resent_with_a_new_r_and_late_parts_of_the_old_are_ignored(
    peer: Peer,
) -> None:
    client = PresenceClient("alice", ["bob", "carol"], servers=[peer.address], request_timeout=0.2)
    connecting = asyncio.create_task(client.connect())
    connect = await peer.receive(Connect)
    assert isinstance(connect, Connect)
    peer.send(ConnectOk(connect.request, SESSION, 60_000, 180_000, 0, (), True))
    await asyncio.wait_for(connecting, WAIT)

    refreshing = asyncio.create_task(client.refresh())
    first = await peer.receive(SnapshotRequest)
    second = await peer.receive(SnapshotRequest)  # the first went unanswered
    assert isinstance(first, SnapshotRequest) and isinstance(second, SnapshotRequest)
    assert first.request != second.request
    # A late part of the first answer (it says bob is online) must not be mixed in.
    peer.send(Snapshot(first.request, 0, 2, 0, (FriendState("bob", True, 5),)))
    peer.send(Snapshot(second.request, 0, 2, 0, (FriendState("bob", False, 7),)))
    peer.send(Snapshot(second.request, 1, 2, 0, (FriendState("carol", True, 3),)))
    await asyncio.wait_for(refreshing, WAIT)
    assert client.friends == {"bob": False, "carol": True}
    assert client.versions == {"bob": 7, "carol": 3}
    disconnecting = asyncio.create_task(client.disconnect())
    bye = await peer.receive(Disconnect)
    assert isinstance(bye, Disconnect)
    peer.send(DisconnectOk(bye.request))
    await asyncio.wait_for(disconnecting, WAIT)
