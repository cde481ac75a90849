"""``presence-daemon``: the daemon's command line (also ``python -m presence_daemon``)."""

from __future__ import annotations

from collections.abc import Sequence

from presence_daemon.app import run
from presence_daemon.config import ConfigError, config_from_args, fail


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and PRESENCE_* variables, run the daemon (or, with ``--processes``
    above 1, a supervisor and that many daemons), return the exit code."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        return fail(str(exc))
    if config.processes > 1:
        from presence_daemon import supervisor

        return supervisor.run(config)
    return run(config)
