"""The name rules, row by row from ``docs/conformance/names.tsv``.

Each row of the conformance table is checked against :func:`is_valid_name` and against
a live daemon (a CONNECT with that user name, and one with it as a friend name, is
answered INVALID_NAME or works), so the table other-language clients check themselves
against is the one the reference implementation obeys.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import pytest_asyncio

from daemons import DaemonProcess, RawPeer
from presence_client.protocol import (
    MAX_DATAGRAM,
    MAX_NAME_CHARS,
    UNICODE_VERSION,
    Connect,
    ConnectOk,
    Error,
    ErrorCode,
    ProtocolError,
    check_name,
    is_valid_name,
    normalize_name,
)
from presence_daemon.embedded import EmbeddedRedis

ROOT: Final = Path(__file__).resolve().parent.parent
TABLE: Final = ROOT / "docs" / "conformance" / "names.tsv"
PROTOCOL_DOC: Final = ROOT / "docs" / "protocol.md"


@dataclass(frozen=True)
class Row:
    escaped: str
    name: str
    valid: bool
    reason: str


def read_table() -> tuple[str, list[Row]]:
    """The table's Unicode version (from its header comment) and its rows."""
    version = ""
    rows: list[Row] = []
    lines = TABLE.read_text(encoding="ascii").splitlines()
    header_seen = False
    for line in lines:
        if line.startswith("#"):
            match = re.search(r"Unicode (\d+\.\d+\.\d+)", line)
            version = match[1] if match else version
            continue
        if not header_seen:
            assert line.split("\t") == ["name", "valid", "reason"], line
            header_seen = True
            continue
        escaped, valid, reason = line.split("\t")
        assert valid in ("yes", "no"), line
        name = escaped.encode("ascii").decode("unicode_escape")
        rows.append(Row(escaped, name, valid == "yes", reason))
    return version, rows


VERSION, ROWS = read_table()


def test_table_covers_what_it_must() -> None:
    assert len(ROWS) >= 60
    assert len({row.escaped for row in ROWS}) == len(ROWS), "duplicate rows"
    valid = [row for row in ROWS if row.valid]
    invalid = [row for row in ROWS if not row.valid]
    assert len(valid) >= 20 and len(invalid) >= 20
    lengths = {len(row.name) for row in ROWS}
    assert {MAX_NAME_CHARS, MAX_NAME_CHARS + 1} <= lengths
    for char in "_.@+-":
        assert any(row.valid and char in row.name for row in ROWS), char


def test_table_and_document_state_the_runtime_unicode_version() -> None:
    # The rules are checked against Python's unicodedata; the table and the document
    # must say which version that is (a daemon on another Python would differ).
    assert VERSION == UNICODE_VERSION, (VERSION, UNICODE_VERSION)
    assert f"Unicode {UNICODE_VERSION}" in PROTOCOL_DOC.read_text()
    assert "docs/conformance/names.tsv" in PROTOCOL_DOC.read_text() or (
        "conformance/names.tsv" in PROTOCOL_DOC.read_text()
    )


@pytest.mark.parametrize("row", ROWS, ids=[f"{i:02d}-{r.reason[:30]}" for i, r in enumerate(ROWS)])
def test_is_valid_name_agrees_with_the_table(row: Row) -> None:
    assert is_valid_name(row.name) is row.valid, row
    if row.valid:
        assert check_name(row.name, "user name") == row.name
        assert normalize_name(row.name) == row.name  # a canonical name stays as it is
    else:
        with pytest.raises(ProtocolError) as info:
            check_name(row.name, "user name")
        assert info.value.code is ErrorCode.INVALID_NAME


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("\uff21\uff2c\uff29\uff23\uff25", "ALICE"),  # fullwidth: made halfwidth, case kept
        ("Zoe\u0308", "Zo\u00eb"),  # NFD: composed
        ("\u212bngstr\u00f6m", "\u00c5ngstr\u00f6m"),  # ANGSTROM SIGN: its NFC form
        ("\u1100\u1161", "\uac00"),  # conjoining jamo: the syllable
        ("alice", "alice"),
        ("Alice", "Alice"),  # never case-folded
    ],
)
def test_normalize_name_canonicalizes_typed_names(typed: str, canonical: str) -> None:
    assert not is_valid_name(typed) or typed == canonical
    assert normalize_name(typed) == canonical
    assert is_valid_name(canonical)


@pytest.mark.parametrize("typed", ["", "a b", "{alice}", "a|b", "\U0001f600", "x" * 65, "a\udcff"])
def test_normalize_name_refuses_what_no_canonical_form_saves(typed: str) -> None:
    with pytest.raises(ProtocolError) as info:
        normalize_name(typed)
    assert info.value.code is ErrorCode.INVALID_NAME
    assert repr(typed) in info.value.message


# -- against a live daemon -------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(redis_server: EmbeddedRedis) -> Iterator[DaemonProcess]:
    with DaemonProcess(redis_server.url, "names") as process:
        yield process
        assert "Traceback" not in process.stderr(), process.stderr()


@pytest.fixture
def redis_url(redis_url_keeping_daemons: str) -> str:
    """The module's daemon lives across tests: keep its lease (see conftest)."""
    return redis_url_keeping_daemons


@pytest_asyncio.fixture
async def peer(daemon: DaemonProcess, redis_url: str) -> AsyncIterator[RawPeer]:
    async with await RawPeer.open(daemon.address) as raw:
        yield raw


async def test_the_daemon_agrees_with_the_table(peer: RawPeer) -> None:
    wrong: list[str] = []
    for index, row in enumerate(ROWS):
        for where in ("user", "friend"):
            request = peer.next_request()
            if where == "user":
                connect = Connect(request, f"names-{index}", row.name)
            else:
                connect = Connect(request, f"names-{index}", "names", (row.name,))
            peer.send(connect, pad_to=MAX_DATAGRAM)
            answer = await peer.recv()
            while getattr(answer, "request", None) != request:
                answer = await peer.recv()
            if row.valid and isinstance(answer, ConnectOk):
                peer.session = answer.session
                await peer.disconnect()
            elif not (
                not row.valid
                and isinstance(answer, Error)
                and answer.code is ErrorCode.INVALID_NAME
            ):
                wrong.append(f"{row.escaped} as {where}: {answer!r} ({row.reason})")
    assert wrong == []
