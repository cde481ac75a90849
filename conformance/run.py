#!/usr/bin/env python3
"""Run the conformance kit's daemon vectors and scenarios against a live daemon.

    python conformance/run.py --server 127.0.0.1:13131 [--only ID] [--requires TAG]

Prints one line per vector or scenario (PASS, FAIL with the reason, or SKIP when it
needs a daemon set up otherwise) and exits 1 if anything failed. Needs Python 3.11+ and
``msgpack``, nothing else: it does not use the reference client, so it judges a daemon
by the kit alone. The formats it reads are described in conformance/README.md.

The same functions (:func:`run_vector`, :func:`run_scenario`) are what the project's
own tests run against its daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import secrets
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack

KIT: Final = Path(__file__).resolve().parent
VECTORS: Final = KIT / "vectors"
SCENARIOS: Final = KIT / "scenarios"

MAX_DATAGRAM: Final = 1200
REPLY_TIMEOUT: Final = 3.0
"""Seconds to wait for an expected datagram."""
NO_REPLY_GRACE: Final = 0.1
"""Seconds a vector expecting no reply waits, after the barrier, for a late one."""
TRY_AGAIN: Final = 20
ERROR: Final = 12
CONNECT_OK: Final = 2
DISCONNECT_OK: Final = 6

Address = tuple[str, int]
Vars = dict[str, Any]


class Failure(Exception):
    """A vector or scenario did not hold; the message says why."""


# ---------------------------------------------------------------------------
# Values: templates (what to send) and patterns (what must arrive).


def substitute(text: str, run: str) -> str:
    """``text`` with ``{run}`` replaced by this run's tag."""
    return text.replace("{run}", run)


_counter = itertools.count()


def fresh_number() -> int:
    """A connect number (``n``) larger than any earlier one: microseconds since the
    epoch plus a counter (below 2^53, as the protocol requires)."""
    return time.time_ns() // 1000 + next(_counter)


def build(template: Any, variables: Vars, run: str) -> Any:
    """The msgpack-ready value a template stands for.

    ``{"$bin": hex}`` is a bin, ``{"$zeros": k}`` a bin of k zero bytes, ``{"$var": name}``
    a variable's value, ``{"$fresh": name}`` a new connect number (also bound to name);
    strings have ``{run}`` replaced; everything else is itself.
    """
    if isinstance(template, str):
        return substitute(template, run)
    if isinstance(template, list):
        return [build(item, variables, run) for item in template]
    if isinstance(template, dict):
        if "$bin" in template:
            return bytes.fromhex(template["$bin"])
        if "$zeros" in template:
            return bytes(template["$zeros"])
        if "$var" in template:
            name = template["$var"]
            if name not in variables:
                raise Failure(f"variable {name!r} is not set")
            return variables[name]
        if "$fresh" in template:
            number = fresh_number()
            variables[template["$fresh"]] = number
            return number
        return {key: build(value, variables, run) for key, value in template.items()}
    return template


_TYPES: Final = {
    "uint": lambda v: type(v) is int and v >= 0,
    "int": lambda v: type(v) is int,
    "bool": lambda v: type(v) is bool,
    "str": lambda v: type(v) is str,
    "bin": lambda v: type(v) is bytes,
    "array": lambda v: type(v) is list,
    "map": lambda v: type(v) is dict,
    "nil": lambda v: v is None,
}


def show(value: Any) -> str:
    """A short readable form of a received value, for failure reasons."""
    if isinstance(value, bytes):
        return f"bin({value[:8].hex()}{'...' if len(value) > 8 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def match(pattern: Any, value: Any, variables: Vars, run: str, where: str = "") -> str | None:
    """None if ``value`` matches ``pattern``, else the reason it does not.

    Captures (``$capture``) are written to ``variables`` only as the match goes; a
    caller that tries several values copies ``variables`` first.
    """
    here = where or "message"
    if isinstance(pattern, dict) and any(key.startswith("$") for key in pattern):
        if "$bin" in pattern:
            expected = bytes.fromhex(pattern["$bin"])
            return None if value == expected else f"{here}: {show(value)} != bin {pattern['$bin']}"
        if "$var" in pattern:
            name = pattern["$var"]
            if name not in variables:
                return f"{here}: variable {name!r} is not set"
            expected = variables[name]
            ok = value == expected and type(value) is type(expected)
            return None if ok else f"{here}: {show(value)} != ${name} ({show(expected)})"
        if "$unordered" in pattern:
            items = pattern["$unordered"]
            if type(value) is not list or len(value) != len(items):
                return f"{here}: {show(value)} is not an array of {len(items)}"
            left = list(value)
            for item in items:
                for index, candidate in enumerate(left):
                    if match(item, candidate, dict(variables), run) is None:
                        match(item, candidate, variables, run)
                        del left[index]
                        break
                else:
                    return f"{here}: no element of {show(value)} matches {item!r}"
            return None
        if "$type" in pattern:
            kind = pattern["$type"]
            if not _TYPES[kind](value):
                return f"{here}: {show(value)} is not {kind}"
            if "len" in pattern and len(value) != pattern["len"]:
                return f"{here}: {show(value)} is not {pattern['len']} long"
        if "$capture" in pattern:
            variables[pattern["$capture"]] = value
        return None
    if isinstance(pattern, dict):
        if type(value) is not dict:
            return f"{here}: {show(value)} is not a map"
        for key, sub in pattern.items():
            path = f"{where}.{key}" if where else key
            if isinstance(sub, dict) and sub.get("$absent"):
                if key in value:
                    return f"{path}: present ({show(value[key])}), must be absent"
                continue
            if key not in value:
                return f"{path}: missing in {show(value)}"
            reason = match(sub, value[key], variables, run, path)
            if reason is not None:
                return reason
        return None
    if isinstance(pattern, list):
        if type(value) is not list or len(value) != len(pattern):
            return f"{here}: {show(value)} is not an array of {len(pattern)}"
        for index, (sub, item) in enumerate(zip(pattern, value, strict=True)):
            reason = match(sub, item, variables, run, f"{where}[{index}]")
            if reason is not None:
                return reason
        return None
    if isinstance(pattern, str):
        pattern = substitute(pattern, run)
    if value == pattern and type(value) is type(pattern):
        return None
    return f"{here}: {show(value)} != {pattern!r}"


def unpack(data: bytes) -> Any:
    """A received datagram as a value (any msgpack, or the reason it is not)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise Failure(f"received undecodable datagram {data[:40].hex()}: {exc}") from None


def pack(value: Any, pad_to: int | None = None) -> bytes:
    """msgpack ``value`` (a map); with ``pad_to``, a ``pad`` bin makes it that long (or a
    byte under where msgpack's bin headers cannot land exactly)."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    if pad_to is None or len(data) >= pad_to:
        return data
    best = data
    for header in (2, 3):
        room = pad_to - len(data) - 4 - header  # "pad" as a fixstr, then a bin header
        if room >= 0:
            padded: bytes = msgpack.packb({**value, "pad": bytes(room)}, use_bin_type=True)
            if len(best) < len(padded) <= pad_to:
                best = padded
    return best


# ---------------------------------------------------------------------------
# A UDP peer.


class Peer:
    """One UDP socket talking to the daemon; keeps what arrived until it is consumed."""

    def __init__(self, server: Address) -> None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.connect(server)
        self.inbox: list[bytes] = []
        self.last_sent = b""
        """The last datagram sent (a scenario resends it after a TRY_AGAIN)."""
        self.last_request: int | None = None
        """Its ``r``, if it had one."""

    def close(self) -> None:
        self.sock.close()

    def resend(self) -> None:
        self.send(self.last_sent)

    def send(self, data: bytes, *, remember: bool = True) -> None:
        if remember:
            self.last_sent = data
        try:
            self.sock.send(data)
        except ConnectionRefusedError:
            raise Failure("the daemon's port is unreachable (ICMP)") from None

    def _receive(self, deadline: float) -> bytes | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(65535)
        except TimeoutError:
            return None
        except ConnectionRefusedError:
            raise Failure("the daemon's port is unreachable (ICMP)") from None

    def expect(
        self,
        pattern: Any,
        variables: Vars,
        run: str,
        timeout: float = REPLY_TIMEOUT,
        *,
        give_up: Any = None,
    ) -> tuple[bytes, Any]:
        """The first datagram (already received or arriving within ``timeout``) that
        matches ``pattern``: removed from the inbox and returned with its value. Other
        datagrams stay in the inbox. One matching ``give_up`` first is removed and
        raises _TryAgain."""
        deadline = time.monotonic() + timeout
        reasons: list[str] = []
        index = 0
        while True:
            while index < len(self.inbox):
                data = self.inbox[index]
                trial = dict(variables)
                value = unpack(data)
                reason = match(pattern, value, trial, run)
                if reason is None:
                    variables.update(trial)
                    del self.inbox[index]
                    return data, value
                if give_up is not None and match(give_up, value, {}, run) is None:
                    del self.inbox[index]
                    raise _TryAgain(show(value))
                reasons.append(reason)
                index += 1
            data_in = self._receive(deadline)
            if data_in is None:
                got = "; ".join(reasons) if reasons else "nothing arrived"
                raise Failure(f"no matching datagram within {timeout:.1f} s ({got})")
            self.inbox.append(data_in)

    def quiet(self, timeout: float = REPLY_TIMEOUT, *, grace: float = 0.0) -> None:
        """Fail if anything arrived that was not consumed, up to a barrier: a
        DISCONNECT for a session that does not exist, which the daemon answers at once
        with DISCONNECT_OK, after whatever it sent before. With ``grace``, also if
        anything arrives within that many seconds after the barrier (a reply the daemon
        computes in the background, as a CONNECT's, may come after it)."""
        request = secrets.randbelow(2**31) + 2**31
        barrier = pack({"v": 1, "t": 5, "r": request, "s": secrets.token_bytes(16)})
        self.send(barrier, remember=False)
        deadline = time.monotonic() + timeout
        while True:
            for index, data in enumerate(self.inbox):
                value = unpack(data)
                if (
                    type(value) is dict
                    and value.get("t") == DISCONNECT_OK
                    and value.get("r") == request
                ):
                    del self.inbox[index]
                    if grace > 0:
                        late = self._receive(time.monotonic() + grace)
                        if late is not None:
                            self.inbox.append(late)
                    if self.inbox:
                        extra = ", ".join(show(unpack(d)) for d in self.inbox)
                        raise Failure(f"unexpected datagram(s): {extra}")
                    return
            data_in = self._receive(deadline)
            if data_in is None:
                raise Failure("the barrier (DISCONNECT of an unknown session) got no answer")
            self.inbox.append(data_in)


# ---------------------------------------------------------------------------
# Vectors.


@dataclass
class Run:
    """One run of the kit against one daemon."""

    server: Address
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    """Eight characters in every name the run uses, so runs never meet."""
    requires: frozenset[str] = frozenset()
    """Settings the daemon was started with (``auth``, ``max-friends=8``,
    ``friend-lists=app``): vectors that need another are skipped."""
    reply_timeout: float = REPLY_TIMEOUT
    """Seconds to wait for an expected datagram (a scenario step may set its own)."""


def load(path: Path) -> list[dict[str, Any]]:
    """The vectors of a vector file, or the scenarios of a scenario file."""
    document = json.loads(path.read_text(encoding="utf-8"))
    items: list[dict[str, Any]] = document.get("vectors") or document.get("scenarios") or []
    return items


def daemon_vectors() -> list[dict[str, Any]]:
    return load(VECTORS / "daemon.json")


def scenarios() -> list[dict[str, Any]]:
    return [item for path in sorted(SCENARIOS.glob("*.json")) for item in load(path)]


class _TryAgain(Failure):
    """The daemon answered TRY_AGAIN (a rate limit or a moment of overload)."""


_BUSY: Final = {"v": 1, "t": ERROR, "e": TRY_AGAIN}


def _with_retries(
    peer: Peer,
    data: bytes,
    pattern: Any,
    variables: Vars,
    run: str,
    timeout: float = REPLY_TIMEOUT,
) -> tuple[bytes, Any]:
    """Send ``data`` and wait for ``pattern``, sending it again after a TRY_AGAIN (a
    rate limit of the daemon: not what the kit tests here), with a growing pause."""
    delay = 0.25
    for _ in range(8):
        peer.send(data)
        try:
            return peer.expect(pattern, variables, run, timeout, give_up=_BUSY)
        except _TryAgain:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise Failure("still TRY_AGAIN after 8 attempts (start the daemon without rate limits)")


def open_session(peer: Peer, run: Run) -> bytes:
    """The vectors' "session" context: CONNECT as user kit-RUN-u1, client kit-RUN-c1
    with an empty friend list (padded to 1,200 bytes), then a PING from the same socket
    (which verifies the address). Returns the session token."""
    variables: Vars = {}
    connect = {
        "v": 1,
        "t": 1,
        "r": 1,
        "c": f"kit-{run.tag}-c1",
        "u": f"kit-{run.tag}-u1",
        "f": [],
        "n": fresh_number(),
    }
    pattern = {"v": 1, "t": CONNECT_OK, "r": 1, "s": {"$capture": "s", "$type": "bin", "len": 16}}
    _with_retries(peer, pack(connect, MAX_DATAGRAM), pattern, variables, run.tag)
    token: bytes = variables["s"]
    peer.send(pack({"v": 1, "t": 3, "s": token}))
    peer.expect({"v": 1, "t": 4, "q": 0}, variables, run.tag)
    return token


def close_session(peer: Peer, token: bytes) -> None:
    """DISCONNECT ``token`` (best effort, answered or not)."""
    peer.send(pack({"v": 1, "t": 5, "r": 2, "s": token}))
    with contextlib.suppress(Failure):
        peer.expect({"v": 1, "t": DISCONNECT_OK, "r": 2}, {}, "", timeout=REPLY_TIMEOUT)
    peer.inbox.clear()


def vector_datagram(vector: dict[str, Any], run: Run, session: bytes | None) -> bytes:
    """The vector's bytes, placeholders filled: ``{run}`` (the run tag's 8 ASCII bytes),
    ``{s}`` (the context's session token), ``{n}`` (a fresh connect number, 8 bytes)."""
    text: str = vector["hex"]
    text = text.replace("{run}", run.tag.encode().hex())
    if "{s}" in text:
        if session is None:
            raise Failure("vector uses {s} without a session context")
        text = text.replace("{s}", session.hex())
    if "{n}" in text:
        text = text.replace("{n}", f"{fresh_number():016x}")
    return bytes.fromhex(text)


def run_vector(vector: dict[str, Any], run: Run) -> str | None:
    """Run one daemon vector; None if it passed, else the reason it failed."""
    peer = Peer(run.server)
    session: bytes | None = None
    variables: Vars = {}
    try:
        if vector.get("context", "none") == "session":
            session = open_session(peer, run)
        data = vector_datagram(vector, run, session)
        reply = vector["expect"]["reply"]
        if reply == "none":
            peer.send(data)
            peer.quiet(grace=NO_REPLY_GRACE)
            return None
        if reply.get("e") == TRY_AGAIN:
            peer.send(data)
            received, value = peer.expect(reply, variables, run.tag, run.reply_timeout)
        else:
            received, value = _with_retries(
                peer, data, reply, variables, run.tag, run.reply_timeout
            )
        if session is None and len(received) > len(data):
            return f"reply of {len(received)} bytes to a {len(data)}-byte datagram"
        if type(value) is dict and value.get("t") == CONNECT_OK:
            token = value.get("s")
            peer.quiet()
            if type(token) is bytes:
                close_session(peer, token)
            return None
        peer.quiet()
        return None
    except Failure as exc:
        return str(exc)
    finally:
        if session is not None:
            close_session(peer, session)
        peer.close()


# ---------------------------------------------------------------------------
# Scenarios.


def run_scenario(scenario: dict[str, Any], run: Run) -> str | None:
    """Run one scenario; None if every step held, else which step failed and why."""
    peers: dict[str, Peer] = {}
    variables: Vars = {}
    try:
        for name in scenario["peers"]:
            peers[name] = Peer(run.server)
        for number, step in enumerate(scenario["steps"], 1):
            try:
                _step(step, peers, variables, run)
            except Failure as exc:
                label = step.get("note") or next(iter(step))
                return f"step {number} ({label}): {exc}"
        for name, peer in peers.items():
            try:
                peer.quiet()
            except Failure as exc:
                return f"at the end, {name}: {exc}"
        return None
    finally:
        for peer in peers.values():
            peer.close()


def _step(step: dict[str, Any], peers: dict[str, Peer], variables: Vars, run: Run) -> None:
    if "send" in step:
        value = build(step["msg"], variables, run.tag)
        peer = peers[step["send"]]
        peer.send(pack(value, step.get("pad_to")))
        request = value.get("r") if type(value) is dict else None
        peer.last_request = request if type(request) is int else None
    elif "expect" in step or "drop" in step:
        peer = peers[step.get("expect") or step["drop"]]
        timeout = step.get("timeout_ms", run.reply_timeout * 1000) / 1000
        _expect_step(peer, step["msg"], variables, run.tag, timeout)
    elif "quiet" in step:
        peers[step["quiet"]].quiet()
    elif "wait_ms" in step:
        wait = build(step["wait_ms"], variables, run.tag)
        if type(wait) is not int:
            raise Failure(f"wait_ms is not an integer: {wait!r}")
        time.sleep((wait + step.get("plus_ms", 0)) / 1000)
    else:
        raise Failure(f"unknown step {step!r}")


def _expect_step(peer: Peer, pattern: Any, variables: Vars, run: str, timeout: float) -> None:
    """An ``expect`` (or ``drop``) step. A TRY_AGAIN answering the peer's last request,
    when that is not what the step expects, is a rate limit of the daemon: the request
    is sent again after a growing pause, as a client would."""
    expects_busy = isinstance(pattern, dict) and pattern.get("e") == TRY_AGAIN
    busy = None
    if peer.last_request is not None and not expects_busy:
        busy = {**_BUSY, "r": peer.last_request}
    delay = 0.25
    for _ in range(8):
        try:
            peer.expect(pattern, variables, run, timeout, give_up=busy)
            return
        except _TryAgain:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            peer.resend()
    raise Failure("still TRY_AGAIN after 8 attempts (start the daemon without rate limits)")


# ---------------------------------------------------------------------------
# Command line.


def parse_server(text: str) -> Address:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def select(items: Sequence[dict[str, Any]], only: Sequence[str]) -> Iterator[dict[str, Any]]:
    for item in items:
        if not only or any(item["id"] == o or item["id"].startswith(o + ".") for o in only):
            yield item


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the conformance kit against a live daemon (no auth)."
    )
    parser.add_argument("--server", type=parse_server, required=True, help="HOST:PORT")
    parser.add_argument(
        "--only", action="append", default=[], help="run this id (or id prefix) only"
    )
    parser.add_argument(
        "--requires",
        action="append",
        default=[],
        help="the daemon runs with this setting (auth, max-friends=8, friend-lists=app)",
    )
    args = parser.parse_args(argv)
    run = Run(args.server, requires=frozenset(args.requires))
    failed = passed = skipped = 0
    items = [*daemon_vectors(), *scenarios()]
    for item in select(items, args.only):
        needs = item.get("requires")
        if needs and needs not in run.requires:
            print(f"SKIP {item['id']}: needs a daemon with {needs}", flush=True)
            skipped += 1
            continue
        runner = run_scenario if "steps" in item else run_vector
        try:
            reason = runner(item, run)
        except Exception as exc:  # a kit file this runner cannot read, a socket error
            reason = f"runner error: {type(exc).__name__}: {exc}"
        if reason is None:
            print(f"PASS {item['id']}", flush=True)
            passed += 1
        else:
            print(f"FAIL {item['id']}: {reason}", flush=True)
            failed += 1
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
