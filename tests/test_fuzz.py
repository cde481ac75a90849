"""The wire fuzzer (tests/fuzz.py), short: 20,000 mutants against a real daemon.

``make fuzz`` runs the long version (1,000,000). Both call the same ``fuzz.run``.
"""

from __future__ import annotations

import random
from typing import Final

import pytest

import fuzz
from presence_client.protocol import MAX_DATAGRAM, decode

DATAGRAMS: Final = 20_000
SEED: Final = 20261125


def test_mutants_never_crash_change_state_or_amplify() -> None:
    report = fuzz.run(DATAGRAMS, SEED)
    summary = "\n".join(report.lines())
    assert report.ok, summary
    assert report.datagrams == DATAGRAMS, summary
    # The daemon saw every mutant (the windows kept its socket buffer from overflowing)
    # and its counters were read, so "0 internal errors" means something.
    assert report.internal_errors == 0, summary
    assert report.counters.get("datagrams_in", 0) >= DATAGRAMS, summary
    assert report.counters.get("rejected_malformed", 0) > 0, summary
    assert report.counters.get("dropped_daemon_message", 0) > 0, summary


def test_mutations_cover_every_kind_of_damage() -> None:
    seeds = fuzz.corpus(bytes(16))
    mutate = fuzz.Mutator(seeds, random.Random(SEED))
    outcomes: set[str] = set()
    for operator in mutate.operators:
        for _ in range(200):
            data = operator()
            try:
                decode(data)
                outcomes.add("valid")
            except Exception as exc:
                outcomes.add(getattr(getattr(exc, "code", None), "name", type(exc).__name__))
    expected = {"valid", "MALFORMED", "TOO_LARGE", "INVALID_FIELD", "UNKNOWN_TYPE"}
    assert expected | {"UNSUPPORTED_VERSION"} <= outcomes, outcomes
    deep = [mutate.deep_nesting() for _ in range(300)]
    # Some are about 1,000 levels deep and still no larger than a datagram.
    assert any(
        len(d) <= MAX_DATAGRAM and d.count(b"\x91") + d.count(b"\x81\x01") >= 950 for d in deep
    )


@pytest.mark.parametrize("datagram", [b"", b"\xc1", bytes(1300)])
def test_opens_a_session_is_false_for_junk(datagram: bytes) -> None:
    assert not fuzz.opens_a_session(datagram)
