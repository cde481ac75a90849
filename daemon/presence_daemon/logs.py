"""The daemon's log: text lines for people or JSON objects for machines, and a summary
of bad datagrams instead of a line for each.

What is logged (see docs/operations.md, *Logs*): at info, lifecycle events (start, stop,
lease lost and taken again, Redis down and up, a dead daemon's clients reaped); at
debug, each connect, disconnect and transition (user, client id, address: never a
session token or a login token). A structured field passed as ``extra={...}`` becomes a
key of the JSON object; the text line says the same in words.

Bad datagrams are counted by the server, never logged one by one: a flood would fill
the disk and slow the daemon down. :class:`BadDatagramSummary` writes at most one line
per interval with what was refused since the last line, by reason.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

BAD_DATAGRAM_LOG_INTERVAL: Final = 5.0
"""Seconds between two summary lines about refused datagrams (none if none came)."""

_RECORD_FIELDS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)
"""Attributes every LogRecord has: anything else on a record came from ``extra``."""

log = logging.getLogger("presence_daemon")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts`` (UTC, ISO 8601), ``level``,
    ``logger``, ``msg``, ``instance`` (if known), the record's ``extra`` fields, and
    ``exc`` (the traceback) if there is one."""

    def __init__(self, instance: str = "") -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        entry: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.instance:
            entry["instance"] = self.instance
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


def text_formatter(instance: str = "") -> logging.Formatter:
    """``<time> <LEVEL> <logger>[<instance>]: <message>`` (the instance only if given)."""
    who = f"[{instance}]" if instance else ""
    return logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s")


def configure(level: str, log_format: str, *, instance: str = "") -> None:
    """Log to stderr at ``level`` in ``log_format`` ('text' or 'json'); ``instance``
    names the process in each line (JSON: always when known; text: when given).

    Like ``logging.basicConfig``, does nothing if the root logger has handlers already
    (a host program's logging wins)."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(instance) if log_format == "json" else text_formatter(instance)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # redis-py's own debug lines (one per connection made, about server features it
    # probes) drown ours at debug; its warnings and errors still show.
    logging.getLogger("redis").setLevel(max(logging.INFO, logging.getLogger().level))


def set_instance(instance: str) -> None:
    """Name the instance in JSON lines from now on (it is picked once the daemon starts)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter) and not handler.formatter.instance:
            handler.formatter.instance = instance


BAD_DATAGRAM_PREFIXES: Final = ("rejected_",)
BAD_DATAGRAM_NAMES: Final = frozenset({"dropped_daemon_message"})


def bad_datagram_counts(counters: Mapping[str, int]) -> dict[str, int]:
    """The refused-datagram counts among the server's counters, by reason."""
    counts = {}
    for name, value in counters.items():
        if name in BAD_DATAGRAM_NAMES:
            counts[name.removeprefix("dropped_")] = value
        elif name.startswith(BAD_DATAGRAM_PREFIXES):
            counts[name.removeprefix("rejected_")] = value
    return counts


class BadDatagramSummary:
    """Writes one info line per call to :meth:`tick` (at most one per interval, by the
    caller's schedule) with the datagrams refused since the last line, by reason."""

    def __init__(
        self, counters: Callable[[], Mapping[str, int]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._counters = counters
        self._clock = clock
        self._seen = bad_datagram_counts(counters())
        self._since = clock()

    def tick(self) -> int:
        """Log what was refused since the last call (nothing if nothing was); returns
        how many datagrams the line was about."""
        now = bad_datagram_counts(self._counters())
        new = {
            reason: count - self._seen.get(reason, 0)
            for reason, count in sorted(now.items())
            if count > self._seen.get(reason, 0)
        }
        self._seen = now
        total = sum(new.values())
        if total:
            seconds = self._clock() - self._since
            reasons = ", ".join(f"{reason}={count}" for reason, count in new.items())
            log.info(
                "refused %d bad datagrams in the last %.1f s (%s); each is counted, not logged",
                total,
                seconds,
                reasons,
                extra={"event": "bad_datagrams", "refused": total, "reasons": new},
            )
        self._since = self._clock()
        return total
