"""What checking a login token costs the daemon, per CONNECT (not a test: prints figures).

For each kind of key (HS256 secret, RS256, ES256, EdDSA): the first verification of a
valid token (signature checked), a repeat (served from the cache), and a forged token
(bad signature; the first time, then from the cache), in microseconds per call, measured
in this one run. A CONNECT that fails any of these never reaches Redis.

    .venv/bin/python bench/auth.py [--json] [--tokens N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from presence_daemon.auth import AuthError, Verifier, _hs256_key, _Key


def _per_call_us(calls: int, run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / calls * 1e6


def measure(algorithm: str, signing: Any, verifying: Any, tokens: int) -> dict[str, float]:
    exp = int(time.time()) + 3600
    valid = [
        jwt.encode({"sub": f"user{i}", "exp": exp}, signing, algorithm=algorithm).encode()
        for i in range(tokens)
    ]
    forged = [t[:-4] + (b"AAAA" if not t.endswith(b"AAAA") else b"BBBB") for t in valid]
    key = _hs256_key(verifying) if algorithm == "HS256" else _Key(verifying, algorithm)
    verifier = Verifier([key], cache_size=4 * tokens)

    def first() -> None:
        for i, token in enumerate(valid):
            verifier.verify(token, f"user{i}", "c")

    def again() -> None:
        for i, token in enumerate(valid):
            verifier.verify(token, f"user{i}", "c")

    def bad() -> None:
        for i, token in enumerate(forged):
            with contextlib.suppress(AuthError):
                verifier.verify(token, f"user{i}", "c")

    return {
        "first_us": round(_per_call_us(tokens, first), 1),
        "cached_us": round(_per_call_us(tokens, again), 1),
        "forged_first_us": round(_per_call_us(tokens, bad), 1),
        "forged_cached_us": round(_per_call_us(tokens, bad), 1),
        "token_bytes": len(valid[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per measurement")
    args = parser.parse_args(argv)
    secret = b"bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    results = {
        "HS256": measure("HS256", secret, secret, args.tokens),
        "RS256": measure("RS256", rsa_key, rsa_key.public_key(), args.tokens),
        "ES256": measure("ES256", ec_key, ec_key.public_key(), args.tokens),
        "EdDSA": measure("EdDSA", ed_key, ed_key.public_key(), args.tokens),
    }
    if args.json:
        json.dump({"auth": results}, sys.stdout)
        print()
        return 0
    print(f"login token verification, us per call ({args.tokens} tokens each)")
    print(f"{'alg':6} {'bytes':>5} {'first':>8} {'cached':>8} {'forged':>8} {'forged again':>13}")
    for name, r in results.items():
        print(
            f"{name:6} {r['token_bytes']:>5} {r['first_us']:>8} {r['cached_us']:>8} "
            f"{r['forged_first_us']:>8} {r['forged_cached_us']:>13}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
