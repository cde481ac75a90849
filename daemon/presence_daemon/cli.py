"""``presence-daemon``: the daemon's command line (also ``python -m presence_daemon``)."""

from __future__ import annotations

from collections.abc import Sequence

from presence_daemon.app import run
from presence_daemon.config import ConfigError, config_from_args, fail


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and PRESENCE_* variables, run the daemon, return the exit code."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        return fail(str(exc))
    return run(config)
