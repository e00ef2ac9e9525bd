"""Structured logging: one JSON object per line, fields passed as `extra`.

Hot paths call `logger.isEnabledFor` first (or use `event()`), so a line that
is not emitted costs no formatting. Lines are formatted at once but written in
batches (`BatchedStreamHandler`): one write per batch, not one per line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
#: The fields every line has (beside "traceback", for a line with an exception).
_OWN = frozenset(("ts", "level", "logger", "msg"))
#: One encoder for every line (json.dumps with options builds one per call). NaN and the
#: infinities are no JSON (`NaN` in a line is refused by strict parsers): refused here.
_encode = json.JSONEncoder(default=str, allow_nan=False).encode
#: The most characters of a traceback a line keeps: its start (where it was raised from)
#: and its end (the exception's type and text), without what lies between. A task may
#: raise an exception whose text is megabytes long; its line must stay a line.
MAX_TRACEBACK_CHARS = 16_384
_TRACEBACK_HEAD = 4_096


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
        try:
            message, args = record.getMessage(), None
        except Exception:  # its args do not fit its text (a task's "%d" given a string)
            message, args = str(record.msg), repr(record.args)
        out: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        if args is not None:  # the line is still written, with what would not fit
            out["args"] = args
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                # A line's own fields stay its own: a task's extra={"level": "gold"} is kept
                # beside them, not over them (a pipeline filters on level and reads ts).
                out[f"extra_{key}" if key in _OWN else key] = value
        if record.exc_info:
            out["traceback"] = _bounded(self.formatException(record.exc_info))
        try:
            return _encode(out)
        except _UNENCODABLE:  # in an extra field (a task's own): see _encodable
            return _encode({key: _encodable(value) for key, value in out.items()})


#: What JSON refuses in a value: NaN, an infinity or a cycle (ValueError), a dict key that
#: is not a string, number, bool or None (TypeError), a nesting deeper than Python's
#: recursion limit (RecursionError).
_UNENCODABLE = (ValueError, TypeError, RecursionError)


def _encodable(value: Any) -> Any:
    """`value` if it encodes as JSON, else its text: the line is still written, and JSON."""
    try:
        _encode(value)
    except _UNENCODABLE:
        try:
            return str(value)
        except Exception:  # its text is too deep as well, or its __str__ raises
            return f"<{type(value).__name__} that cannot be written>"
    return value


def _bounded(text: str) -> str:
    """`text`, or its start and end with a note of how much was cut between them."""
    if len(text) <= MAX_TRACEBACK_CHARS:
        return text
    tail = MAX_TRACEBACK_CHARS - _TRACEBACK_HEAD
    cut = len(text) - _TRACEBACK_HEAD - tail
    return f"{text[:_TRACEBACK_HEAD]}\n... ({cut:,} characters cut) ...\n{text[-tail:]}"


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes its lines in batches, at most FLUSH_SECONDS late.

    Each line is formatted when it is logged (so it shows the values of that moment), and
    kept; the lines are written in one write when BATCH_LINES are waiting, when a line
    at WARNING or above comes (it and every line before it go out at once), and else by
    a flusher thread FLUSH_SECONDS after the first line waiting. At thousands of flows a
    second, a write per INFO line was a measurable part of a call's cost on the event
    loop's thread. flush() (and so logging.shutdown(), at exit) writes what waits; a
    kill -9 loses at most the last FLUSH_SECONDS of lines below WARNING.
    """

    BATCH_LINES = 256
    FLUSH_SECONDS = 0.1

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._armed = threading.Event()  # set while lines wait for the flusher
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        # Whatever goes wrong here (a closed or broken stderr) is logging's to report, as
        # StreamHandler does: never the error of the code that logged.
        try:
            line = self.format(record) + self.terminator
        except Exception:  # this line only: the lines waiting before it are still written
            self.handleError(record)
            return
        try:
            self._lines.append(line)
            if len(self._lines) >= self.BATCH_LINES or record.levelno >= logging.WARNING:
                self._write()
            elif not self._armed.is_set():
                self._arm()
        except Exception:
            self._lines.clear()  # not written, and never will be: not kept either
            self.handleError(record)

    def _arm(self) -> None:
        self._armed.set()
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_later, name="flowsvc-log-flusher", daemon=True
            )
            self._flusher.start()

    def _flush_later(self) -> None:
        while True:
            self._armed.wait()
            time.sleep(self.FLUSH_SECONDS)  # let a batch gather
            self.flush()

    def _write(self) -> None:
        self._armed.clear()
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()  # first: a failed write does not keep them
            self.stream.write(text)
            super().flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write()
            except Exception:  # the stream is gone (closed at exit): nothing to write to
                self._lines.clear()


def configure(level: str) -> None:
    """Send flowsvc's logs to stderr as JSON lines at `level`."""
    # What the lines never show is not gathered (the logging HOWTO's "Optimization"):
    # the caller's file and line (a stack walk per line), thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx (the http task's client) logs every request at INFO with its full URL:
    # passwords and API keys in URLs would land in the log, a line per request.
    for chatty in QUIET_LIBRARIES:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    core = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, _CallGoneFilter) for f in core.filters):
        core.addFilter(_CallGoneFilter())


#: Libraries whose INFO and DEBUG lines never reach flowsvc's log.
QUIET_LIBRARIES = ("httpx", "httpcore")
#: grpc's logger for what happens under a call, and how its line begins when a message
#: could not be sent because the call had already ended.
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_CALL_GONE = "ExecuteBatchError raised in core by servicer method"


class _CallGoneFilter(logging.Filter):
    """grpc's ERROR, with a traceback, for a stream message it could not send because
    the call had ended: a client that stopped reading its StreamFlow or WatchExecution
    and then cancelled it, or whose deadline passed or connection dropped meanwhile.
    Nothing failed in the server (the flow's own line says why it ended; a watcher's
    leaving changes nothing): an ERROR per client that goes away reads as a fault and
    buries the real ones. It is a DEBUG line, without the traceback, instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.getMessage().startswith(_CALL_GONE):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        record.exc_info = record.exc_text = None
        return True


def event(
    logger: logging.Logger,
    level: int,
    msg: str,
    *,
    exc_info: bool | BaseException = False,
    **fields: Any,
) -> None:
    """Log `msg` with structured `fields`, skipping all work when the level is off."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra=fields)


class Tally:
    """One log line for many of an event that comes in bursts (refusals when the server is
    full): the first is logged at once, the later ones are counted and logged as one line
    `every` seconds later, and so on while they keep coming. Each line's `count_field`
    says how many it stands for, so a burst of thousands writes two lines, not thousands,
    and none is lost: close() logs what is still counted. Used on the event loop only."""

    def __init__(
        self, logger: logging.Logger, level: int, msg: str, count_field: str, every: float
    ) -> None:
        self._logger, self._level, self._msg = logger, level, msg
        self._count_field, self._every = count_field, every
        self._count = 0
        self._fields: dict[str, Any] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, **fields: Any) -> None:
        """One more; `fields` (the latest given) go on the line that counts it."""
        self._count += 1
        self._fields = fields
        if self._timer is None:  # the first for `every` seconds: logged now
            self._write()
            self._timer = asyncio.get_running_loop().call_later(self._every, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._count:
            self._write()
            self._timer = asyncio.get_running_loop().call_later(self._every, self._tick)

    def _write(self) -> None:
        if self._logger.isEnabledFor(self._level):
            fields = {self._count_field: self._count, **self._fields}
            self._logger.log(self._level, self._msg, extra=fields)
        self._count = 0

    def close(self) -> None:
        """Log what is counted and not yet logged; stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._count:
            self._write()
