"""The name rules, row by row from ``conformance/names.tsv``.

Each row of the conformance table is checked against :func:`is_valid_name` and against
a live daemon (a CONNECT with that user name, and one with it as a friend name, is
answered INVALID_NAME or works), so the table other-language clients check themselves
against is the one the reference implementation obeys.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import precis_i18n
import pytest
import pytest_asyncio
from precis_i18n.derived import PVALID, derived_property

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
TABLE: Final = ROOT / "conformance" / "names.tsv"
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


# -- the fast path is the rule -----------------------------------------------------------

PROFILE: Final = precis_i18n.get_profile("UsernameCasePreserved")


def reference_is_valid_name(name: str) -> bool:
    """The rule as docs/protocol.md states it, with no shortcut."""
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return False
    if any(c.isascii() and not (c.isalnum() or c in "_.@+-") for c in name):
        return False
    try:
        return bool(PROFILE.enforce(name) == name)
    except UnicodeError:
        return False


def test_no_pvalid_code_point_is_changed_by_width_mapping() -> None:
    # is_valid_name accepts a name of PVALID code points that is NFC and LTR without
    # running enforcement; that is exact only because of this.
    ucd = PROFILE.base.ucd
    changed = [
        hex(cp)
        for cp in range(0x110000)
        if not 0xD800 <= cp <= 0xDFFF
        and derived_property(cp, ucd)[0] == PVALID
        and ucd.width_map(chr(cp)) != chr(cp)
    ]
    assert changed == []


def test_is_valid_name_equals_the_reference_rule_across_unicode() -> None:
    # Every 13th code point, alone and after an ASCII letter (all of them agree too:
    # about 45 s, run by hand when the fast path changes).
    disagreements = [
        hex(cp)
        for cp in range(0, 0x110000, 13)
        if not 0xD800 <= cp <= 0xDFFF
        for name in (chr(cp), "a" + chr(cp))
        if is_valid_name(name) != reference_is_valid_name(name)
    ]
    assert disagreements == []


ALPHABETS: Final = [
    "abcXYZ019_.@+-",
    "\u00e9\u00eb\u00c5\u00df\u0131e\u0301\u0308\u212b\u212a\u01c5",
    "\u0928\u092e\u0938\u094d\u0924\u0947\u093f\u0915\u0937\u200c\u200d",
    "\u0645\u0631\u062d\u0628\u0627\u0661\u0662\u06f2\u064e\u05e9\u05dc\u0031",
    "\u7528\u6237\u540d\u3072\u30ab\u30fb\u3007\uff21\uff41\uff76\u3000",
    "\u1100\u1161\u11a8\uac00\ud55c\u00b7l\u0375\u03b1\u05f3\u05d0",
    "\U0001f600\u2764\u00a0\u00ad\ufeff\u200b\u0378\ue000\ufdd0\U0001d400 {|:",
]


def test_is_valid_name_equals_the_reference_rule_on_random_names() -> None:
    rng = random.Random(8265)
    disagreements = []
    for _ in range(20_000):
        alphabet = rng.choice(ALPHABETS) + rng.choice(ALPHABETS)
        name = "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 3, 5, 8, 64, 65])))
        if is_valid_name(name) != reference_is_valid_name(name):
            disagreements.append(name)
    assert disagreements == []
    for row in ROWS:
        assert reference_is_valid_name(row.name) is row.valid, row


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
