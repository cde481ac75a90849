"""The conformance kit (``conformance/``) against the reference code, so the two cannot
drift apart.

- Every codec vector against the Python codec: the decoded message (or the error code
  and the echoed ``r``), and, for vectors marked canonical, the exact bytes the encoder
  makes of that message.
- Every daemon vector and scenario against a real daemon (single Redis), through the
  kit's own runner (``conformance/run.py``), as a client author would run it. Vectors
  needing another daemon setup (auth, friend lists set by the application) get a
  daemon started that way.
- Coverage: every MessageType appears in the vectors in both roles, and every
  ErrorCode (every row of the document's error-code table) both in the codec vectors
  and among the daemon's expected replies.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest

from authkit import auth_flags, write_secret
from daemons import DaemonProcess
from presence_client.protocol import (
    CLIENT_TO_DAEMON,
    DAEMON_TO_CLIENT,
    ErrorCode,
    FriendState,
    Message,
    MessageType,
    ProtocolError,
    decode,
    encode,
)
from presence_daemon.embedded import EmbeddedRedis

ROOT: Final = Path(__file__).resolve().parent.parent
KIT: Final = ROOT / "conformance"
PROTOCOL_DOC: Final = ROOT / "docs" / "protocol.md"


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conformance_run", KIT / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run: Any = _load_runner()

CODEC: Final[list[dict[str, Any]]] = json.loads((KIT / "vectors" / "codec.json").read_text())[
    "vectors"
]
DAEMON: Final[list[dict[str, Any]]] = run.daemon_vectors()
SCENARIOS: Final[list[dict[str, Any]]] = run.scenarios()

KIT_FLAGS: Final = {
    "--max-friends": "8",
    "--timeout": "2.0",
    "--ping-interval": "0.5",
    "--snapshot-interval": "1.0",
    "--notify-coalesce": "0.5",
}
"""The daemon the kit's README tells client authors to start (rate limits are lifted
by DaemonProcess's defaults)."""
KIT_SETUP: Final = frozenset({"max-friends=8"})

WIRE_KEYS: Final[dict[str, dict[str, str]]] = {
    "Connect": {
        "request": "r",
        "client_id": "c",
        "user": "u",
        "friends": "f",
        "auth": "a",
        "counter": "n",
        "previous": "ps",
    },
    "ConnectOk": {
        "request": "r",
        "session": "s",
        "ping_interval_ms": "pi",
        "timeout_ms": "to",
        "seq": "q",
        "friends": "f",
        "complete": "done",
    },
    "Ping": {"session": "s"},
    "Pong": {"seq": "q"},
    "Disconnect": {"request": "r", "session": "s"},
    "DisconnectOk": {"request": "r"},
    "Friends": {
        "request": "r",
        "session": "s",
        "op": "op",
        "names": "f",
        "part": "p",
        "parts": "n",
    },
    "FriendsOk": {"request": "r"},
    "SnapshotRequest": {"request": "r", "session": "s"},
    "Snapshot": {"request": "r", "part": "p", "parts": "n", "seq": "q", "friends": "f"},
    "Notify": {"seq": "q", "friend": "f"},
    "Error": {"request": "r", "code": "e", "versions": "vs"},
    "GoAway": {"session": "s", "reason": "w"},
}
"""The Python codec's attribute names -> the kit's (wire) key names."""


def plain(value: object) -> Any:
    """A codec value in the kit's JSON form (bin as {"$bin": hex})."""
    if isinstance(value, FriendState):
        return [value.name, value.online, value.version]
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    return value


def as_kit_message(msg: Message) -> dict[str, Any]:
    keys = WIRE_KEYS[type(msg).__name__]
    fields = {keys[f.name]: plain(getattr(msg, f.name)) for f in dataclasses.fields(msg)}
    assert set(fields) == set(keys.values())
    return {"type": msg.TYPE.name, "t": int(msg.TYPE), "fields": fields}


# ---------------------------------------------------------------------------
# The codec.


@pytest.mark.parametrize("vector", CODEC, ids=[v["id"] for v in CODEC])
def test_codec_vector(vector: dict[str, Any]) -> None:
    assert "{" not in vector["hex"], "codec vectors have no placeholders"
    data = bytes.fromhex(vector["hex"])
    expect = vector["expect"]
    if "message" in expect:
        msg = decode(data)
        assert as_kit_message(msg) == expect["message"]
        direction = "client->daemon" if msg.TYPE in CLIENT_TO_DAEMON else "daemon->client"
        assert vector["direction"] == direction
        if expect.get("canonical"):
            assert encode(msg) == data
        return
    with pytest.raises(ProtocolError) as info:
        decode(data)
    error = expect["error"]
    assert ErrorCode(error["e"]).name == error["name"]
    assert (info.value.code, info.value.request) == (ErrorCode(error["e"]), error["r"])


# ---------------------------------------------------------------------------
# The daemon, through the kit's runner.


@pytest.fixture(scope="module")
def kit_daemon(redis_server: EmbeddedRedis) -> Iterator[DaemonProcess]:
    with DaemonProcess(redis_server.url, "kit", flags=KIT_FLAGS) as process:
        yield process
        assert "Traceback" not in process.stderr(), process.stderr()


def runner(
    daemon: DaemonProcess, setup: frozenset[str] = KIT_SETUP, reply_timeout: float = 3.0
) -> Any:
    return run.Run(daemon.address, requires=setup, reply_timeout=reply_timeout)


def by_requirement(requirement: str | None) -> list[dict[str, Any]]:
    return [v for v in DAEMON if v.get("requires") == requirement]


PLAIN_VECTORS: Final = by_requirement(None) + by_requirement("max-friends=8")


@pytest.mark.parametrize("vector", PLAIN_VECTORS, ids=[v["id"] for v in PLAIN_VECTORS])
def test_daemon_vector(vector: dict[str, Any], kit_daemon: DaemonProcess) -> None:
    assert run.run_vector(vector, runner(kit_daemon)) is None


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["id"] for s in SCENARIOS])
def test_scenario(scenario: dict[str, Any], kit_daemon: DaemonProcess) -> None:
    assert run.run_scenario(scenario, runner(kit_daemon)) is None


def test_vectors_needing_another_daemon(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    setups: dict[str, dict[str, str | None]] = {
        "friend-lists=app": {"--friend-lists": "app"},
        "auth": auth_flags(write_secret(tmp_path)),
    }
    assert {v.get("requires") for v in DAEMON} == {None, "max-friends=8", *setups}
    for requirement, flags in setups.items():
        vectors = by_requirement(requirement)
        assert vectors, requirement
        instance = f"kit-{requirement.split('=')[0]}"  # its own: a lease outlives a kill
        with DaemonProcess(redis_server.url, instance, flags={**KIT_FLAGS, **flags}) as d:
            for vector in vectors:
                assert run.run_vector(vector, runner(d, frozenset({requirement}))) is None


def test_the_runner_fails_a_wrong_expectation(kit_daemon: DaemonProcess) -> None:
    vector = next(v for v in DAEMON if v["id"] == "daemon.malformed.trailing-bytes")
    wrong = json.loads(json.dumps(vector))
    wrong["expect"]["reply"]["r"] = 0
    reason = run.run_vector(wrong, runner(kit_daemon, reply_timeout=0.5))
    assert reason is not None and "r: 77 != 0" in reason
    silent = next(v for v in DAEMON if v["id"] == "daemon.not-for-daemon.pong")
    unknown_ping = next(v for v in DAEMON if v["id"] == "daemon.ping.unknown-session")
    wrong = {**silent, "hex": unknown_ping["hex"]}  # answered UNKNOWN_SESSION
    assert run.run_vector(wrong, runner(kit_daemon)) is not None
    scenario = json.loads(json.dumps(SCENARIOS[0]))
    scenario["steps"].append({"expect": "a", "msg": {"t": 4}, "timeout_ms": 200})
    reason = run.run_scenario(scenario, runner(kit_daemon, reply_timeout=0.5))
    assert reason is not None and reason.startswith(f"step {len(scenario['steps'])}")


def test_runner_command_line(kit_daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    host, port = kit_daemon.address
    server = f"{host}:{port}"
    assert run.main(["--server", server, "--only", "daemon.ping"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"PASS {v['id']}" for v in DAEMON if v["id"].startswith("daemon.ping.")]
    assert run.main(["--server", server, "--only", "daemon.friends.forbidden"]) == 1
    assert "SKIP daemon.friends.forbidden" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Coverage: the kit cannot fall behind the code (or the document).


def _datagram_types(vectors: list[dict[str, Any]]) -> set[int]:
    types = set()
    for vector in vectors:
        decoded = vector.get("decoded")
        if isinstance(decoded, dict) and isinstance(decoded.get("t"), int):
            types.add(decoded["t"])
    return types


def _expected_replies() -> Iterator[Any]:
    for vector in DAEMON:
        yield vector["expect"]["reply"]
    for scenario in SCENARIOS:
        for step in scenario["steps"]:
            if "expect" in step:
                yield step["msg"]


def test_every_message_type_is_covered() -> None:
    decoded = {v["expect"]["message"]["t"] for v in CODEC if "message" in v["expect"]}
    assert decoded == {int(t) for t in MessageType}
    # Every type sent to a daemon: the client -> daemon ones answered, the others not.
    assert {int(t) for t in MessageType} <= _datagram_types(DAEMON)
    for kind in DAEMON_TO_CLIENT:
        silent = [
            v for v in DAEMON if isinstance(v["decoded"], dict) and v["decoded"].get("t") == kind
        ]
        assert silent and all(v["expect"]["reply"] == "none" for v in silent), kind
    # Every daemon -> client type is expected from the daemon somewhere, but GO_AWAY
    # (sent on shutdown or lost state: outside what a kit run can cause).
    replied = {r["t"] for r in _expected_replies() if isinstance(r, dict) and "t" in r}
    assert replied == {int(t) for t in DAEMON_TO_CLIENT} - {MessageType.GO_AWAY}


def test_every_error_code_is_covered() -> None:
    everything = {int(code) for code in ErrorCode}
    in_codec = {
        v["expect"]["message"]["fields"]["e"]
        for v in CODEC
        if "message" in v["expect"] and v["expect"]["message"]["t"] == MessageType.ERROR
    }
    assert in_codec == everything
    from_daemon = {r["e"] for r in _expected_replies() if isinstance(r, dict) and r.get("t") == 12}
    assert from_daemon == everything
    decode_errors = {ErrorCode(v["expect"]["error"]["e"]) for v in CODEC if "error" in v["expect"]}
    assert decode_errors == {
        ErrorCode.MALFORMED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.INVALID_FIELD,
        ErrorCode.TOO_LARGE,
        ErrorCode.INVALID_NAME,
    }


def test_every_row_of_the_documents_error_table_is_covered() -> None:
    text = PROTOCOL_DOC.read_text()
    section = re.search(r"^#+ Error codes\s*$(.*?)(?=^#+ )", text, re.MULTILINE | re.DOTALL)
    assert section, "no section 'Error codes' in docs/protocol.md"
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", section[1], re.MULTILINE)
    assert rows, "no error-code table found in docs/protocol.md"
    assert {(int(code), name) for code, name in rows} == {(int(c), c.name) for c in ErrorCode}


@pytest.mark.parametrize("vector", DAEMON, ids=[v["id"] for v in DAEMON])
def test_daemon_vector_summary_says_what_the_pattern_says(vector: dict[str, Any]) -> None:
    reply = vector["expect"]["reply"]
    if reply == "none":
        assert vector["expect"]["summary"] == "no reply"
        return
    words = vector["expect"]["summary"].split()
    assert words[0] == MessageType(reply["t"]).name
    if reply["t"] == MessageType.ERROR:
        assert words[1:3] == [ErrorCode(reply["e"]).name, f"r={reply['r']}"]
        assert ("vs" in words) == isinstance(reply.get("vs"), list)


def test_ids_are_unique_and_names_table_is_in_the_kit() -> None:
    ids = [item["id"] for item in [*CODEC, *DAEMON, *SCENARIOS]]
    assert len(ids) == len(set(ids))
    assert (KIT / "names.tsv").is_file()
