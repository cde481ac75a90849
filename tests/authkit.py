"""Login tokens for tests: a shared HS256 secret, key pairs, and a token issuer that
does what an application's backend does (docs/security.md, "Issuing tokens")."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SECRET: Final = b"test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
"""The HS256 secret every auth test daemon is given (48 bytes)."""


def write_secret(directory: Path, secret: bytes = SECRET) -> Path:
    path = directory / "hs256.secret"
    path.write_bytes(secret + b"\n")  # a trailing newline, as an editor leaves it
    return path


def issue(
    user: str,
    *,
    client_id: str | None = None,
    ttl: float = 300.0,
    key: Any = SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A login token for ``user`` (``sub``), expiring ``ttl`` seconds from now."""
    payload: dict[str, Any] = {"sub": user, "exp": int(time.time() + ttl), **claims}
    if client_id is not None:
        payload["cid"] = client_id
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def public_pem(private: PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def auth_flags(secret_file: Path) -> dict[str, str | None]:
    """Daemon flags for HS256 auth with ``secret_file``."""
    return {"--auth-hs256-secret-file": str(secret_file)}
