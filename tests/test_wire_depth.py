"""Deeply nested values, against a real daemon process over raw UDP.

Regression: a CONNECT whose ``u`` or ``f`` was an array nested about 1,000 levels deep
(about 1,135 bytes) raised RecursionError inside the handler (``repr`` of the value in
the error message): no reply, and some 1.5 KB of traceback logged per datagram. The
codec now refuses anything nested deeper than the protocol uses (MAX_NESTING) as
MALFORMED before any field is checked (echoing ``r`` when the map is readable), and the
daemon never lets an exception escape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import msgpack
import pytest
import pytest_asyncio
import redis.asyncio

from daemons import DaemonProcess, RawPeer
from helpers import is_daemon_bookkeeping
from presence_client.protocol import MAX_DATAGRAM, Error, ErrorCode, decode
from presence_daemon.embedded import EmbeddedRedis


@pytest.fixture(scope="module")
def daemon(redis_server: EmbeddedRedis) -> Iterator[DaemonProcess]:
    with DaemonProcess(redis_server.url, "depth") as process:
        yield process


@pytest.fixture
def redis_url(redis_url_keeping_daemons: str) -> str:
    """The module's daemon lives across tests: keep its lease (see conftest)."""
    return redis_url_keeping_daemons


async def state_keys(client: redis.asyncio.Redis) -> list[str]:
    """Every key in Redis but the daemon's own bookkeeping."""
    return [key async for key in client.scan_iter() if not is_daemon_bookkeeping(key)]


@pytest_asyncio.fixture
async def peer(daemon: DaemonProcess, redis_url: str) -> AsyncIterator[RawPeer]:
    async with await RawPeer.open(daemon.address) as raw:
        yield raw


def nested_connect(key: str, depth: int, size: int = 1135) -> bytes:
    """A CONNECT whose ``key`` is a string inside ``depth`` one-element arrays, padded
    with an ignored ``pad`` bin to about ``size`` bytes. Built by hand: msgpack's own
    packer refuses such depths."""
    body = {"v": 1, "t": 1, "r": 7, "c": "deep-1", "u": "deep", "f": ["bob"]}
    del body[key]
    head: bytes = msgpack.packb(body, use_bin_type=True)
    value = b"\x91" * depth + b"\xa1x"
    fields = head[1:] + msgpack.packb(key) + value
    count = len(body) + 1
    datagram = bytes([0x80 | count]) + fields
    room = size - len(datagram) - 4 - 2  # "pad" str, bin8 header
    if 0 <= room < 256:
        datagram = bytes([0x80 | (count + 1)]) + fields + msgpack.packb("pad") + b"\xc4"
        datagram += bytes([room]) + bytes(room)
    return datagram


@pytest.mark.parametrize("key", ["u", "f"])
@pytest.mark.parametrize("depth", [3, 4, 100, 900, 1000, 1100, 1150])
async def test_deeply_nested_name_is_malformed_and_answered(
    key: str,
    depth: int,
    peer: RawPeer,
    daemon: DaemonProcess,
    redis_client: redis.asyncio.Redis,
) -> None:
    datagram = nested_connect(key, depth)
    assert len(datagram) <= MAX_DATAGRAM
    # The nesting itself is readable msgpack up to msgpack's own stack limit.
    try:
        msgpack.unpackb(datagram, raw=False)
        readable = True
    except msgpack.StackError:
        readable = False
    assert readable or depth >= 1000
    logged = len(daemon.stderr())
    peer.send(datagram)
    answers = await peer.barrier()
    assert len(answers) == 1, answers
    assert len(answers[0]) <= len(datagram)
    error = decode(answers[0])
    assert isinstance(error, Error)
    assert error.code is ErrorCode.MALFORMED
    # A readable map's valid `r` is echoed (decision 8 of issue 14), else 0.
    assert error.request == (7 if readable else 0)
    assert await state_keys(redis_client) == []
    assert daemon.running
    assert daemon.stderr()[logged:] == "", "a hostile datagram was logged"


async def test_shallow_nesting_is_a_field_of_the_wrong_type(peer: RawPeer) -> None:
    for key, depth in (("u", 1), ("u", 2), ("f", 2)):
        peer.send(nested_connect(key, depth))
        answers = await peer.barrier()
        assert len(answers) == 1, (key, depth, answers)
        error = decode(answers[0])
        assert isinstance(error, Error)
        assert (error.code, error.request) == (ErrorCode.INVALID_FIELD, 7), (key, depth)
