"""A JSON-lines log observer for journald and log shippers, and what may go in a log.

Use it with ``twistd --logger=dockmirror.logs.json_lines dockmirror ...``: one
JSON object per line, with the formatted message and the event's own fields
(for the access log: client, key, method, uri, status, bytes, duration,
upstream, cache).

Every value an upstream sends (a header, a body, a URL it points to) goes
into a log event, or into an error message that may be logged, only through
:func:`printable`: short, on one line.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

#: The most characters of a value from an upstream that a log line shows.
SHOWN_MAX = 200

_SKIP = {
    "log_logger",
    "log_source",
    "log_format",
    "log_time",
    "log_level",
    "log_namespace",
    "log_failure",
    "log_io",
    "log_text",
    "log_legacy",
    "log_flattened",
    "log_trace",
    "log_system",
    "format",
    "message",
    "isError",
    "system",
    "time",
}


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if (
                key not in _SKIP
                and not key.startswith("_")
                and isinstance(value, str | int | float | bool | type(None))
            ):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


def json_lines() -> JSONLinesObserver:
    """The observer factory for ``twistd --logger``."""
    return JSONLinesObserver(sys.stdout)


def printable(text: str, limit: int = SHOWN_MAX) -> str:
    """*text* from an upstream, fit for a log line: printable, and at most *limit* characters."""
    shown = "".join(c if c.isprintable() else " " for c in text[: limit + 1])
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
