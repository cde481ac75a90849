"""Issue 11: only alice can be alice.

Login tokens (verified before any Redis work), proof for replacing a live session,
replayed CONNECTs, and friend lists owned by the application. The verifier is tested
alone (keys, algorithms, claims, cache); everything else against real daemon processes
over real UDP, reading Redis for what changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import jwt
import pytest
import pytest_asyncio
import redis.asyncio

from authkit import (
    SECRET,
    PrivateKey,
    auth_flags,
    ec_key,
    ed_key,
    issue,
    public_pem,
    rsa_key,
    write_secret,
)
from daemons import (  # noqa: F401
    DaemonFactory,
    DaemonProcess,
    RawPeer,
    daemon_env,
    daemon_factory_fixture,
)
from helpers import wait_for
from presence_client import terminal
from presence_client.protocol import (
    MAX_DATAGRAM,
    Connect,
    ConnectOk,
    Disconnect,
    DisconnectOk,
    Error,
    ErrorCode,
    Friends,
    FriendsOk,
    FriendsOp,
    Pong,
)
from presence_client.sdk import PresenceClient, PresenceClientError
from presence_daemon import auth, keys
from presence_daemon.config import Config, ConfigError, config_from_args
from presence_daemon.presence import Presence

# ---------------------------------------------------------------------------
# The verifier alone.


def hs256() -> auth.Verifier:
    return auth.Verifier([auth._Key(SECRET, "HS256")])


def test_valid_token_names_its_user_and_is_verified_once() -> None:
    verifier = hs256()
    token = issue("alice", client_id="phone").encode()
    identity = verifier.verify(token, "alice", "phone")
    assert (identity.user, identity.client_id) == ("alice", "phone")
    verifier.verify(token, "alice", "phone")
    assert verifier.verified == 1, "the second use comes from the cache"


@pytest.mark.parametrize(
    ("token", "user", "client_id", "reason"),
    [
        (None, "alice", "c1", "missing"),
        (b"", "alice", "c1", "missing"),
        (b"not a jwt", "alice", "c1", "malformed"),
        (
            issue("alice", key=b"another-secret-of-32-bytes-or-more!!").encode(),
            "alice",
            "c1",
            "invalid",
        ),
        (issue("alice", ttl=-120).encode(), "alice", "c1", "expired"),
        (issue("alice").encode(), "bob", "c1", "wrong_user"),
        (issue("alice", client_id="phone").encode(), "alice", "laptop", "wrong_client_id"),
        (issue("al ice").encode(), "al ice", "c1", "invalid"),
        (
            jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256").encode(),
            "alice",
            "c1",
            "invalid",
        ),
        (
            jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256").encode(),
            "alice",
            "c1",
            "invalid",
        ),
        (issue("alice", key=SECRET * 2, algorithm="HS512").encode(), "alice", "c1", "invalid"),
        (
            jwt.encode(
                {"sub": "alice", "exp": int(time.time()) + 60},
                None,  # type: ignore[arg-type]
                algorithm="none",
            ).encode(),
            "alice",
            "c1",
            "invalid",
        ),
    ],
    ids=[
        "none",
        "empty",
        "garbage",
        "wrong-secret",
        "expired",
        "other-user",
        "other-client-id",
        "bad-sub",
        "no-exp",
        "no-sub",
        "other-algorithm",
        "alg-none",
    ],
)
def test_bad_tokens_are_refused_with_their_reason(
    token: bytes | None, user: str, client_id: str, reason: str
) -> None:
    with pytest.raises(auth.AuthError) as caught:
        hs256().verify(token, user, client_id)
    assert caught.value.reason == reason


def test_a_refused_token_is_remembered_and_the_cache_is_bounded() -> None:
    verifier = auth.Verifier([auth._Key(SECRET, "HS256")], cache_size=8)
    forged = issue("alice", key=b"another-secret-of-32-bytes-or-more!!").encode()
    for _ in range(3):
        with pytest.raises(auth.AuthError):
            verifier.verify(forged, "alice", "c1")
    assert verifier.verified == 1
    for i in range(50):
        verifier.verify(issue(f"u{i}").encode(), f"u{i}", "c1")
    assert len(verifier._cache) == 8


def test_an_expired_cached_token_is_checked_again() -> None:
    now = [time.time()]
    verifier = auth.Verifier([auth._Key(SECRET, "HS256")], leeway=0, clock=lambda: now[0])
    token = issue("alice", ttl=60).encode()
    verifier.verify(token, "alice", "c1")
    verifier.verify(token, "alice", "c1")
    assert verifier.verified == 1
    now[0] += 120  # past exp on the cache's clock: the cache no longer vouches for it
    verifier.verify(token, "alice", "c1")  # (PyJWT's real clock still finds it valid)
    assert verifier.verified == 2


# ---------------------------------------------------------------------------
# Keys from files.


@pytest.mark.parametrize(
    "make_key, algorithm", [(rsa_key, "RS256"), (ec_key, "ES256"), (ed_key, "EdDSA")]
)
def test_public_key_file_verifies_its_algorithm_only(
    tmp_path: Path, make_key: Callable[[], PrivateKey], algorithm: str
) -> None:
    private = make_key()
    path = tmp_path / "key.pem"
    path.write_bytes(public_pem(private))
    verifier = auth.from_config(Config(auth_public_key_file=str(path)))
    assert verifier is not None and verifier.algorithms == [algorithm]
    assert (
        verifier.verify(
            issue("alice", key=private, algorithm=algorithm).encode(), "alice", "c"
        ).user
        == "alice"
    )
    # Algorithm confusion: the public key used as an HMAC secret must not verify.
    forged = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256"
    ).encode()
    with pytest.raises(auth.AuthError, match="invalid"):
        verifier.verify(forged, "alice", "c")


def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    first, second = ec_key(), rsa_key()
    document = {
        "keys": [
            {
                **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(first.public_key())),
                "kid": "k1",
                "alg": "ES256",
            },
            {
                **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(second.public_key())),
                "kid": "k2",
                "alg": "RS256",
            },
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    verifier = auth.from_config(Config(auth_public_key_file=str(path)))
    assert verifier is not None
    for key, algorithm, kid in ((first, "ES256", "k1"), (second, "RS256", "k2")):
        token = issue("alice", key=key, algorithm=algorithm, headers={"kid": kid}).encode()
        assert verifier.verify(token, "alice", "c").user == "alice"
    wrong_kid = issue("alice", key=first, algorithm="ES256", headers={"kid": "k2"}).encode()
    with pytest.raises(auth.AuthError, match="invalid"):
        verifier.verify(wrong_kid, "alice", "c")


@pytest.mark.parametrize(
    ("content", "flag", "message"),
    [
        (b"short\n", "--auth-hs256-secret-file", "has 5 bytes; HS256 needs at least 32"),
        (None, "--auth-hs256-secret-file", "cannot read"),
        (b"not a key", "--auth-public-key-file", "neither a PEM public key nor a JWKS"),
        (b'{"keys": []}', "--auth-public-key-file", "holds no signing key"),
    ],
    ids=["short-secret", "missing-file", "not-a-key", "empty-jwks"],
)
def test_bad_key_files_are_one_line_errors(
    tmp_path: Path, content: bytes | None, flag: str, message: str
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_bytes(content)
    field = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(ConfigError) as caught:
        auth.from_config(Config(**{field: str(path)}))  # type: ignore[arg-type]
    text = str(caught.value)
    assert text.startswith(f"{flag}: ") and message in text and "\n" not in text


def test_without_auth_only_loopback_or_an_explicit_insecure_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--host: '0\.0\.0\.0' is not a loopback address"):
        config_from_args(["--host", "0.0.0.0"], environ={})
    assert config_from_args(
        ["--host", "0.0.0.0", "--insecure-no-auth"], environ={}
    ).insecure_no_auth
    assert config_from_args(
        ["--host", "0.0.0.0"], environ={"PRESENCE_AUTH_HS256_SECRET_FILE": "/s"}
    ).auth
    assert config_from_args(["--host", "::1"], environ={}).host == "::1"
    assert Config().host == "127.0.0.1"


# ---------------------------------------------------------------------------
# Against real daemons.


@pytest_asyncio.fixture
async def store(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def user_state(store: redis.asyncio.Redis, user: str, client_id: str) -> dict[str, object]:
    """Every key of the user's that a CONNECT could change."""
    clients_key, version_key, friends_key, _, pending_key = keys.user_keys(user)
    return {
        "clients": await store.hgetall(clients_key),
        "version": await store.get(version_key),
        "friends": await store.smembers(friends_key),
        "pending": await store.get(pending_key),
        "number": await store.get(keys.connect_number_key(user, client_id)),
        "binding": await store.get(keys.client_key(client_id)),
    }


async def commands_processed(store: redis.asyncio.Redis) -> int:
    return int((await store.info("stats"))["total_commands_processed"])


@pytest.fixture
def auth_daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    return daemon_factory("auth", flags=auth_flags(write_secret(tmp_path)))


async def test_connect_without_a_valid_token_is_refused_and_costs_redis_nothing(
    auth_daemon: DaemonProcess, store: redis.asyncio.Redis
) -> None:
    bad = [
        None,
        b"garbage",
        issue("alice", key=b"another-secret-of-32-bytes-or-more!!").encode(),
        issue("mallory").encode(),
        issue("alice", ttl=-120).encode(),
        issue("alice", client_id="phone").encode(),
    ]
    before = await user_state(store, "alice", "laptop")
    async with await RawPeer.open(auth_daemon.address) as peer:
        # Each command below is one Redis round trip of ours; the daemon's own lease
        # renewals (a few per second) are the only other traffic.
        start = await commands_processed(store)
        for token in bad:
            request = peer.next_request()
            peer.send(
                Connect(request, "laptop", "alice", ("bob",), auth=token), pad_to=MAX_DATAGRAM
            )
            reply, _ = await peer.recv_until(Error, request=request)
            assert reply.code is ErrorCode.UNAUTHORIZED, token
        spent = await commands_processed(store) - start
    assert await user_state(store, "alice", "laptop") == before
    assert spent <= 10, f"{spent} Redis commands during 6 refused CONNECTs (lease renewals only)"


async def test_forged_connects_naming_a_user_do_not_use_up_its_rate_limit(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """With auth, a CONNECT is charged to its user only once its token proved who it
    is: a flood of forged CONNECTs naming alice (refused UNAUTHORIZED) leaves alice's
    own CONNECT within the per-user limit (1 a second here, burst 2)."""
    flags = {**auth_flags(write_secret(tmp_path)), "--connect-rate-per-user": "1"}
    daemon = daemon_factory("auth", flags=flags)
    async with (
        await RawPeer.open(daemon.address) as forger,
        await RawPeer.open(daemon.address) as alice,
    ):
        for _ in range(10):
            refused = await connect_raw(forger, "alice", "phone", number=1)
            assert isinstance(refused, Error) and refused.code is ErrorCode.UNAUTHORIZED
        ok = await connect_raw(alice, "alice", "phone", token=issue("alice"), number=2)
        assert isinstance(ok, ConnectOk)


async def test_valid_token_connects_and_the_sdk_asks_for_a_fresh_one_each_time(
    auth_daemon: DaemonProcess, store: redis.asyncio.Redis
) -> None:
    issued: list[str] = []

    async def fresh() -> str:
        issued.append(issue("alice", client_id="laptop", ttl=30))
        return issued[-1]

    client = PresenceClient(
        "alice", ["bob"], servers=[auth_daemon.address], client_id="laptop", token=fresh
    )
    await client.connect()
    try:
        assert await store.hexists(keys.clients_key("alice"), "laptop")
        await client.disconnect()
        await client.connect()
        assert len(issued) == 2
    finally:
        await client.disconnect()
    wrong = PresenceClient("alice", [], servers=[auth_daemon.address], token=issue("bob"))
    with pytest.raises(PresenceClientError) as caught:
        await wrong.connect()
    assert caught.value.code is ErrorCode.UNAUTHORIZED


async def connect_raw(
    peer: RawPeer,
    user: str,
    client_id: str,
    *,
    token: str | None = None,
    number: int = 0,
    previous: bytes | None = None,
    friends: tuple[str, ...] | None = None,
) -> ConnectOk | Error:
    request = peer.next_request()
    peer.send(
        Connect(
            request,
            client_id,
            user,
            friends,
            auth=None if token is None else token.encode(),
            counter=number,
            previous=previous,
        ),
        pad_to=MAX_DATAGRAM,
    )
    while True:
        reply = await peer.recv()
        if isinstance(reply, ConnectOk | Error) and reply.request == request:
            break
    if isinstance(reply, ConnectOk):
        peer.session = reply.session
    return reply


async def test_forged_connect_cannot_take_a_live_session_over_without_auth(
    daemon_factory: DaemonFactory, store: redis.asyncio.Redis
) -> None:
    """Without auth, a CONNECT with a victim's user and client id, from another address,
    is refused while the victim's session lives, unless it carries the victim's session
    token (``ps``: what a reconnecting client sends)."""
    daemon = daemon_factory("d1")
    async with (
        await RawPeer.open(daemon.address) as victim,
        await RawPeer.open(daemon.address) as attacker,
    ):
        ok = await connect_raw(victim, "alice", "phone", number=1, friends=("bob",))
        assert isinstance(ok, ConnectOk)
        await victim.ping()
        before = await user_state(store, "alice", "phone")

        forged = await connect_raw(attacker, "alice", "phone", number=2, friends=())
        assert isinstance(forged, Error) and forged.code is ErrorCode.CLIENT_ID_IN_USE
        wrong_proof = await connect_raw(attacker, "alice", "phone", number=3, previous=b"x" * 16)
        assert isinstance(wrong_proof, Error) and wrong_proof.code is ErrorCode.CLIENT_ID_IN_USE
        assert await user_state(store, "alice", "phone") == before
        pong, _ = await victim.ping()
        assert isinstance(pong, Pong), "the victim's session lives on"

        # The real client, moved to a new address, proves itself with its old session.
        moved = await connect_raw(attacker, "alice", "phone", number=4, previous=ok.session)
        assert isinstance(moved, ConnectOk)


async def test_with_auth_a_token_for_the_user_is_the_proof(
    auth_daemon: DaemonProcess, store: redis.asyncio.Redis
) -> None:
    async with (
        await RawPeer.open(auth_daemon.address) as victim,
        await RawPeer.open(auth_daemon.address) as other,
    ):
        ok = await connect_raw(victim, "alice", "phone", token=issue("alice"), number=1)
        assert isinstance(ok, ConnectOk)
        await victim.ping()
        forged = await connect_raw(other, "alice", "phone", token=issue("mallory"), number=2)
        assert isinstance(forged, Error) and forged.code is ErrorCode.UNAUTHORIZED
        # The same user, logged in again (a restarted app): replaces its session.
        again = await connect_raw(other, "alice", "phone", token=issue("alice"), number=3)
        assert isinstance(again, ConnectOk)
        entry = await store.hget(keys.clients_key("alice"), "phone")
        assert isinstance(entry, bytes) and entry.startswith(again.session.hex().encode())


async def test_connect_without_proof_succeeds_once_the_old_session_timed_out(
    daemon_factory: DaemonFactory, store: redis.asyncio.Redis
) -> None:
    daemon = daemon_factory("d1", flags={"--timeout": "1.0", "--ping-interval": "0.5"})
    async with await RawPeer.open(daemon.address) as old, await RawPeer.open(daemon.address) as new:
        assert isinstance(await connect_raw(old, "alice", "phone", number=1), ConnectOk)
        await old.ping()
        refused = await connect_raw(new, "alice", "phone", number=2)
        assert isinstance(refused, Error) and refused.code is ErrorCode.CLIENT_ID_IN_USE

        async def gone() -> bool:
            return not await store.hexists(keys.clients_key("alice"), "phone")

        await wait_for(gone, 10.0, what="the silent old session times out")
        assert isinstance(await connect_raw(new, "alice", "phone", number=3), ConnectOk)


async def test_connect_without_proof_replaces_a_session_whose_owner_is_dead(
    daemon_factory: DaemonFactory, redis_url: str, store: redis.asyncio.Redis
) -> None:
    """Without auth and without ``ps``, a session held by another owner is replaced only
    once that owner is dead (its lease gone), even before a survivor reaped it: the
    daemon reaps nobody in its first lease TTL (10 s here), so the entry is still there."""
    daemon = daemon_factory("d1")
    other = Presence.from_url(redis_url, instance_id="other")
    await other.start()
    closed = False
    try:
        await other.connected("phone", "alice")
        async with await RawPeer.open(daemon.address) as peer:
            refused = await connect_raw(peer, "alice", "phone", number=1)
            assert isinstance(refused, Error) and refused.code is ErrorCode.CLIENT_ID_IN_USE
            await other.close()  # gives up its lease and leaves its entry behind
            closed = True
            assert await store.hexists(keys.clients_key("alice"), "phone")
            assert isinstance(await connect_raw(peer, "alice", "phone", number=2), ConnectOk)
    finally:
        if not closed:
            await other.close()


async def test_replayed_connect_after_disconnect_changes_nothing(
    daemon_factory: DaemonFactory, store: redis.asyncio.Redis
) -> None:
    """A CONNECT delayed (or replayed) past its own DISCONNECT: no new session, no flap,
    no friend list reset; an older number than the last is refused too."""
    daemon = daemon_factory("d1")
    async with await RawPeer.open(daemon.address) as peer:
        first = Connect(peer.next_request(), "phone", "alice", ("bob",), counter=100)
        peer.send(first, pad_to=MAX_DATAGRAM)
        reply, _ = await peer.recv_until(ConnectOk, request=first.request)
        peer.session = reply.session
        await peer.ping()
        request = peer.next_request()
        peer.send(Friends(request, reply.session, FriendsOp.ADD, ("carol",)))
        await peer.recv_until(FriendsOk, request=request)
        await peer.disconnect()
        before = await user_state(store, "alice", "phone")

        for replay in (first, Connect(peer.next_request(), "phone", "alice", ("bob",), counter=99)):
            peer.send(replay, pad_to=MAX_DATAGRAM)
            answer, _ = await peer.recv_until(Error, request=replay.request)
            assert answer.code is ErrorCode.STALE
        assert await user_state(store, "alice", "phone") == before
        assert not before["clients"]
        # A new connect (higher number) is fine.
        assert isinstance(await connect_raw(peer, "alice", "phone", number=101), ConnectOk)


async def test_app_owned_friend_lists_ignore_clients(
    daemon_factory: DaemonFactory, store: redis.asyncio.Redis
) -> None:
    daemon = daemon_factory("d1", flags={"--friend-lists": "app"})
    await store.sadd(keys.friends_key("alice"), "bob")  # what the application set
    client = PresenceClient("alice", ["mallory"], servers=[daemon.address])
    await client.connect()
    try:
        assert await store.smembers(keys.friends_key("alice")) == {b"bob"}
        with pytest.raises(PresenceClientError) as caught:
            await client.add_friends(["eve"])
        assert caught.value.code is ErrorCode.FORBIDDEN
        assert await store.smembers(keys.friends_key("alice")) == {b"bob"}
    finally:
        await client.disconnect()


async def test_disconnect_of_unknown_session_still_acknowledged(auth_daemon: DaemonProcess) -> None:
    """Auth guards CONNECT; a DISCONNECT carries a session token (its own proof)."""
    async with await RawPeer.open(auth_daemon.address) as peer:
        request = peer.next_request()
        peer.send(Disconnect(request, b"\0" * 16))
        reply, _ = await peer.recv_until(DisconnectOk, request=request)
        assert reply.request == request


# ---------------------------------------------------------------------------
# Command lines.


def run_daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "presence_daemon", "--processes", "1", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=20,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--host", "0.0.0.0"], "--host: '0.0.0.0' is not a loopback address"),
        (["--auth-hs256-secret-file", "/nonexistent/secret"], "--auth-hs256-secret-file: cannot"),
    ],
    ids=["public-without-auth", "missing-secret"],
)
def test_daemon_refuses_to_start_insecurely_in_one_line(args: list[str], needle: str) -> None:
    result = run_daemon("--port", "0", "--redis-url", "redis://127.0.0.1:1/0", *args)
    lines = result.stderr.strip().splitlines()
    assert (result.returncode, len(lines)) == (2, 1), result.stderr
    assert needle in lines[0] and "listening" not in result.stdout


@pytest.mark.parametrize(
    ("flags", "extra", "line"),
    [
        ({}, [], "auth: none; serving loopback only"),
        ({"--host": "0.0.0.0"}, ["--insecure-no-auth"], "auth: NONE (--insecure-no-auth)"),
    ],
    ids=["loopback", "insecure"],
)
async def test_daemon_says_in_one_line_who_may_connect(
    daemon_factory: DaemonFactory, flags: dict[str, str | None], extra: list[str], line: str
) -> None:
    daemon = daemon_factory("d1", flags=flags, extra_args=extra)

    def said() -> bool:
        return sum(line in text for text in daemon.stderr().splitlines()) == 1

    await wait_for(said, what="the auth line in the daemon's log")


def test_terminal_takes_the_token_from_flag_env_or_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PRESENCE_TOKEN", "from-env")
    assert terminal.parse_args(["--user", "ann"]).token == "from-env"
    assert terminal.parse_args(["--user", "ann", "--token", "from-flag"]).token == "from-flag"
    path = tmp_path / "token"
    path.write_text("first\n")
    source = terminal._token_source(terminal.parse_args(["--token-file", str(path)]))
    assert callable(source) and source() == "first"
    path.write_text("renewed\n")
    assert source() == "renewed", "read again before every connect"
