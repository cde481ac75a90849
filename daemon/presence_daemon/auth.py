"""Login tokens: who a CONNECT may speak for.

Theory of operation
-------------------
The application's backend, which knows who its users are, signs a short-lived JSON Web
Token for a user that logs in: ``sub`` is the user name, ``exp`` its expiry, and an
optional ``cid`` pins the client id. The client sends it in CONNECT's ``a`` key. A daemon
with auth configured verifies it before the CONNECT costs Redis anything: a CONNECT
without a valid token for its ``u`` (and, with ``cid``, its ``c``) is refused
UNAUTHORIZED, counted, and changes nothing.

Keys are pinned to algorithms, never taken from the token's header: a shared secret
verifies HS256 only; an RSA public key RS256, a P-256 key ES256, an Ed25519 key EdDSA
(a JWKS file may hold several, chosen by ``kid``). So a token cannot pick a weaker
algorithm, or use a public key as an HMAC secret.

Verifying costs microseconds (HMAC) to a few hundred (ECDSA), so results are cached per
token, in a bounded table: a valid token until it expires, a bad one (forged signature,
malformed) for good, since it can never become valid. Whether the token's user and client
id match the CONNECT is checked on every use, against the cached identity.

A session outlives its token: the token proves who logs in, and is checked again at every
CONNECT (a reconnect, a failover to another daemon), so a client keeps a way to get a
fresh one (the SDK takes a function that returns one).
"""

from __future__ import annotations

import base64
import collections
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from presence_client.protocol import is_valid_name
from presence_daemon.config import Config, ConfigError

MIN_SECRET_BYTES: Final = 32
"""Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash's 256 bits)."""
CACHE_SIZE: Final = 65_536
"""Tokens whose verification is remembered (valid ones until they expire)."""
LEEWAY: Final = 30.0
"""Seconds of clock skew allowed between the token's issuer and the daemon (exp, nbf)."""
ASYMMETRIC: Final = ("RS256", "ES256", "EdDSA")
"""Algorithms a public key may verify (each key is pinned to the one its type implies)."""


class AuthError(Exception):
    """A login token does not let this CONNECT in; ``reason`` is a short word for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token says."""

    user: str
    """The ``sub`` claim: the only user name the token's holder may connect as."""
    client_id: str | None
    """The ``cid`` claim, if the token pins the client id."""
    expires: float
    """The ``exp`` claim, in Unix seconds."""


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    """A secret (bytes) or a public key object, or a PyJWK."""
    algorithm: str
    kid: str | None = None


class Verifier:
    """Verifies login tokens against fixed keys, with a bounded cache.

    ``clock`` returns Unix seconds (cache expiry); PyJWT reads the real clock for
    ``exp``/``nbf`` itself.
    """

    def __init__(
        self,
        keys: Sequence[_Key],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = LEEWAY,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("a verifier needs at least one key")
        self._keys = list(keys)
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._cache_size = cache_size
        self._clock = clock
        self._cache: collections.OrderedDict[bytes, Identity | AuthError] = (
            collections.OrderedDict()
        )
        self.verified = 0
        """Tokens verified with a signature check (cache misses)."""

    @property
    def algorithms(self) -> list[str]:
        return sorted({k.algorithm for k in self._keys})

    def verify(self, token: bytes | None, user: str, client_id: str) -> Identity:
        """The identity ``token`` proves, if it lets ``client_id`` connect as ``user``.

        Raises AuthError: ``missing``, ``malformed``, ``invalid`` (signature, algorithm,
        audience, issuer, claims), ``expired``, ``wrong_user``, ``wrong_client_id``.
        """
        if not token:
            raise AuthError("missing", "no login token (CONNECT key 'a')")
        identity = self._lookup(token)
        if identity.user != user:
            raise AuthError("wrong_user", f"the token is for another user than {user!r}")
        if identity.client_id is not None and identity.client_id != client_id:
            raise AuthError(
                "wrong_client_id", f"the token is for another client id than {client_id!r}"
            )
        return identity

    def _lookup(self, token: bytes) -> Identity:
        cached = self._cache.get(token)
        now = self._clock()
        if cached is not None:
            self._cache.move_to_end(token)
            if isinstance(cached, AuthError):
                raise cached
            if cached.expires + self._leeway > now:
                return cached
        try:
            result: Identity | AuthError = self._decode(token)
        except AuthError as exc:
            result = exc
        self._cache[token] = result
        self._cache.move_to_end(token)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        if isinstance(result, AuthError):
            raise result
        return result

    def _decode(self, token: bytes) -> Identity:
        self.verified += 1
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("malformed", str(exc)) from None
        kid = header.get("kid")
        candidates = [k for k in self._keys if k.kid is None or kid is None or k.kid == kid]
        candidates = [k for k in candidates if k.algorithm == header.get("alg")]
        if not candidates:
            raise AuthError("invalid", f"no key for alg {header.get('alg')!r}, kid {kid!r}")
        last: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options={
                        "require": ["exp", "sub"],
                        "verify_aud": self._audience is not None,
                    },
                )
            except jwt.ExpiredSignatureError as exc:
                raise AuthError("expired", str(exc)) from None
            except jwt.InvalidSignatureError as exc:
                last = exc
                continue
            except jwt.PyJWTError as exc:
                raise AuthError("invalid", str(exc)) from None
            return _identity(claims)
        raise AuthError("invalid", str(last))


def _identity(claims: dict[str, Any]) -> Identity:
    user = claims.get("sub")
    if not is_valid_name(user):
        raise AuthError("invalid", f"claim 'sub' is not a valid user name: {user!r}")
    client_id = claims.get("cid")
    if client_id is not None and not is_valid_name(client_id):
        raise AuthError("invalid", f"claim 'cid' is not a valid client id: {client_id!r}")
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise AuthError("invalid", "claim 'exp' is not a number")
    return Identity(user=str(user), client_id=client_id, expires=float(expires))


# ---------------------------------------------------------------------------
# Building a verifier from the daemon's settings.


def from_config(config: Config) -> Verifier | None:
    """The verifier the settings ask for, or None without auth.

    Raises ConfigError naming the flag and the problem (file missing, secret too short,
    not a public key) in one line.
    """
    keys: list[_Key] = []
    if config.auth_hs256_secret_file:
        keys.append(_hs256_key(_read_secret(config.auth_hs256_secret_file)))
    if config.auth_public_key_file:
        keys.extend(_read_public_keys(config.auth_public_key_file))
    if not keys:
        return None
    return Verifier(
        keys,
        audience=config.auth_audience or None,
        issuer=config.auth_issuer or None,
    )


def _hs256_key(secret: bytes) -> _Key:
    """The secret as a prepared JWK (PyJWT then skips re-checking it on every call)."""
    k = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    return _Key(jwt.PyJWK({"kty": "oct", "k": k}, "HS256"), "HS256")


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path!r}: {exc.strerror or exc}") from None


def _read_secret(path: str) -> bytes:
    flag = "--auth-hs256-secret-file"
    secret = _read(path, flag).strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{flag}: the secret in {path!r} has {len(secret)} bytes; "
            f"HS256 needs at least {MIN_SECRET_BYTES}"
        )
    return secret


def _read_public_keys(path: str) -> list[_Key]:
    flag = "--auth-public-key-file"
    data = _read(path, flag)
    if data.lstrip().startswith(b"{"):
        return _jwks(data, path, flag)
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ConfigError(
            f"{flag}: {path!r} is neither a PEM public key nor a JWKS (JSON) file"
        ) from None
    return [_Key(key, _algorithm_for(key, path, flag))]


def _algorithm_for(key: object, path: str, flag: str) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigError(
                f"{flag}: the RSA key in {path!r} has {key.key_size} bits; need 2048+"
            )
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ConfigError(f"{flag}: {path!r} holds a {type(key).__name__}; use RSA, P-256 or Ed25519")


def _jwks(data: bytes, path: str, flag: str) -> list[_Key]:
    try:
        document = json.loads(data)
        entries = document["keys"]
        assert isinstance(entries, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ConfigError(f'{flag}: {path!r} is not a JWKS document ({{"keys": [...]}})') from None
    keys = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise ConfigError(f"{flag}: a key in {path!r} is not usable: {exc}") from None
        if jwk.algorithm_name not in ASYMMETRIC:
            raise ConfigError(
                f"{flag}: a key in {path!r} is for {jwk.algorithm_name}; "
                f"use {', '.join(ASYMMETRIC)}"
            )
        keys.append(_Key(jwk, jwk.algorithm_name, entry.get("kid")))
    if not keys:
        raise ConfigError(f"{flag}: {path!r} holds no signing key")
    return keys
