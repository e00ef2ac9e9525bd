"""Structured logging: one JSON object per line, fields passed as `extra`.

Hot paths call `logger.isEnabledFor` first (or use `event()`), so a line that
is not emitted costs no formatting.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
#: One encoder for every line (json.dumps with options builds one per call).
_encode = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON object with its `extra` fields at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        # The date and time to the second change once a second: format them then only.
        second = int(created)
        if second != self._second:
            moment = datetime.fromtimestamp(second, UTC)
            self._second, self._second_text = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return _encode(out)


def configure(level: str) -> None:
    """Send flowsvc's logs to stderr as JSON lines at `level`."""
    # What the lines never show is not gathered (the logging HOWTO's "Optimization"):
    # the caller's file and line (a stack walk per line), thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx (the http task's client) logs every request at INFO with its full URL:
    # passwords and API keys in URLs would land in the log, a line per request.
    for chatty in QUIET_LIBRARIES:
        logging.getLogger(chatty).setLevel(logging.WARNING)


#: Libraries whose INFO and DEBUG lines never reach flowsvc's log.
QUIET_LIBRARIES = ("httpx", "httpcore")


def event(
    logger: logging.Logger, level: int, msg: str, *, exc_info: bool = False, **fields: Any
) -> None:
    """Log `msg` with structured `fields`, skipping all work when the level is off."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra=fields)
