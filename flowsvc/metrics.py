"""Prometheus metrics (--metrics-listen): what the server counts, and the HTTP endpoint.

Counting is a few dict and list operations per event, done only when metrics are on (the
manager and the servicer hold None otherwise, and pay one comparison). The figures that
already exist elsewhere (executions in flight, the store's health and commits, the
process's CPU and memory) are read when a scrape comes, not kept up to date.

The endpoint is plain HTTP/1.1 on an address of its own, `GET /metrics` in Prometheus'
text format (0.0.4); it shares the event loop. A scrape costs it about 30 us for each
task name that has run (its histogram's lines): under a millisecond for a few dozen
tasks, 60 ms for 2,000. No TLS and no authentication: bind it where only the scraper
reaches (the pod's network, 127.0.0.1 behind an agent).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from flowsvc.models import Event, FlowFinished, FlowStarted, TaskCompleted

#: Histogram buckets, in seconds: from a no-op step to a long task or flow.
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0)
#: The most bytes of a scrape's request line and headers read; beyond, 431.
MAX_REQUEST_BYTES = 16 * 1024
#: How long a scraper may take to send its request.
REQUEST_TIMEOUT_SECONDS = 10.0


class Histogram:
    """Counts per bucket (not cumulative: summed when rendered), sum and count."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: over every bucket (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count `value` (seconds) in its bucket and in the sum."""
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value


class Metrics:
    """What one server counts. `read_at_scrape` are figures kept elsewhere: (name, help,
    type, read), read() giving a number or {labels: number}."""

    def __init__(self) -> None:
        self.started_at = _process_start() or time.time()
        self.executions_started = 0
        self.executions_ended: dict[str, int] = {}  # by status
        self.execution_seconds = Histogram()
        self.task_attempts: dict[tuple[str, str], int] = {}  # by (task, status)
        self.task_seconds: dict[str, Histogram] = {}  # by task
        self.rpcs: dict[str, int] = {}  # by method
        self.rpc_errors: dict[tuple[str, str], int] = {}  # by (method, reason)
        self.read_at_scrape: list[tuple[str, str, str, Callable[[], Any]]] = []
        self._begun: dict[str, float] = {}  # flow_id -> its started event's time

    # -- counted as it happens ----------------------------------------------------------

    def event(self, event: Event) -> None:
        """An execution's event, as it is committed (see ExecutionManager._drive)."""
        if isinstance(event, TaskCompleted):
            record = event.record
            key = (record.task, record.status.value)
            self.task_attempts[key] = self.task_attempts.get(key, 0) + 1
            histogram = self.task_seconds.get(record.task)
            if histogram is None:
                histogram = self.task_seconds[record.task] = Histogram()
            histogram.observe(record.duration_s)
        elif isinstance(event, FlowStarted):
            self.executions_started += 1
            self._begun[event.flow_id] = event.started_at.timestamp()
        elif isinstance(event, FlowFinished):
            self.ended(event.flow_id, event.status.value, event.finished_at.timestamp())

    def ended(self, flow_id: str, status: str, at: float | None = None) -> None:
        """An execution ended (`status`) at `at` (Unix time; now if None)."""
        self.executions_ended[status] = self.executions_ended.get(status, 0) + 1
        began = self._begun.pop(flow_id, None)
        if began is not None:
            self.execution_seconds.observe(max(0.0, (at or time.time()) - began))

    def cut_off(self, flow_id: str) -> None:
        """The execution's drive is over: if it started but had no finished event (a
        store failure, a shutdown cut it off), it ended interrupted."""
        if flow_id in self._begun:
            self.ended(flow_id, "interrupted")

    def rpc(self, method: str) -> None:
        """A FlowService call reached `method`."""
        self.rpcs[method] = self.rpcs.get(method, 0) + 1

    def rpc_error(self, method: str, reason: str) -> None:
        """A call of `method` was answered with an error status of ErrorInfo `reason`."""
        key = (method, reason)
        self.rpc_errors[key] = self.rpc_errors.get(key, 0) + 1

    # -- the text a scrape gets ------------------------------------------------------------

    def render(self) -> str:
        """Every metric, in Prometheus' text format (0.0.4)."""
        out: list[str] = []
        counter = _Family(out, "counter")
        counter(
            "flowsvc_executions_started_total",
            "Executions started.",
            [((), self.executions_started)],
        )
        counter(
            "flowsvc_executions_ended_total",
            "Executions ended, by status.",
            [((("status", s),), n) for s, n in sorted(self.executions_ended.items())],
        )
        _histogram(
            out,
            "flowsvc_execution_duration_seconds",
            "From an execution's start to its end (executions started by this process).",
            [((), self.execution_seconds)],
        )
        counter(
            "flowsvc_task_attempts_total",
            "Task attempts, by task and status (success, failure).",
            [((("task", t), ("status", s)), n) for (t, s), n in sorted(self.task_attempts.items())],
        )
        _histogram(
            out,
            "flowsvc_task_duration_seconds",
            "How long each task attempt ran, by task.",
            [((("task", t),), h) for t, h in sorted(self.task_seconds.items())],
        )
        counter(
            "flowsvc_rpcs_total",
            "FlowService calls received, by method.",
            [((("method", m),), n) for m, n in sorted(self.rpcs.items())],
        )
        counter(
            "flowsvc_rpc_errors_total",
            "FlowService calls that ended with an error status, by method and reason "
            "(the ErrorInfo reason; a client's own deadline or cancel is not counted).",
            [((("method", m), ("reason", r)), n) for (m, r), n in sorted(self.rpc_errors.items())],
        )
        for name, text, kind, read in self.read_at_scrape:
            value = read()
            family = _Family(out, kind)
            if isinstance(value, dict):
                family(name, text, sorted(value.items()))
            else:
                family(name, text, [((), value)])
        _process(out, self.started_at)
        return "".join(out)


class _Family:
    """Writes metric families of one type into `out`."""

    def __init__(self, out: list[str], kind: str) -> None:
        self.out, self.kind = out, kind

    def __call__(
        self, name: str, text: str, samples: Iterable[tuple[tuple[tuple[str, str], ...], Any]]
    ) -> None:
        self.out.append(f"# HELP {name} {text}\n# TYPE {name} {self.kind}\n")
        for labels, value in samples:
            self.out.append(f"{name}{_labels(labels)} {_number(value)}\n")


def _histogram(
    out: list[str],
    name: str,
    text: str,
    series: Iterable[tuple[tuple[tuple[str, str], ...], Histogram]],
) -> None:
    out.append(f"# HELP {name} {text}\n# TYPE {name} histogram\n")
    for labels, histogram in series:
        total = 0
        for bound, count in zip((*BUCKETS, float("inf")), histogram.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else _number(bound)
            out.append(f"{name}_bucket{_labels((*labels, ('le', le)))} {total}\n")
        out.append(f"{name}_sum{_labels(labels)} {_number(histogram.sum)}\n")
        out.append(f"{name}_count{_labels(labels)} {total}\n")


def _process(out: list[str], started_at: float) -> None:
    """The process's standard metrics, from /proc (Linux; left out elsewhere)."""
    gauge, counter = _Family(out, "gauge"), _Family(out, "counter")
    gauge(
        "process_start_time_seconds", "Start time of the process (Unix time).", [((), started_at)]
    )
    try:
        fields = _proc_stat()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError):
        return
    counter("process_cpu_seconds_total", "User and system CPU time.", [((), cpu)])
    gauge("process_resident_memory_bytes", "Resident memory.", [((), rss)])
    gauge("process_open_fds", "Open file descriptors.", [((), fds)])


def _process_start() -> float | None:
    """When the process started (Unix time), from /proc (Linux; else None): not when
    metrics were set up, which comes a second or so later, after the imports."""
    try:
        ticks = int(_proc_stat()[19])  # starttime
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _proc_stat() -> list[bytes]:
    """The fields of /proc/self/stat after the process's name (field 3 on: utime is [11],
    stime [12], starttime [19], rss [21]). OSError off Linux."""
    with open("/proc/self/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


# -- the endpoint ---------------------------------------------------------------------------


class MetricsEndpoint:
    """`GET /metrics` on `host:port`, over plain HTTP/1.1, one request per connection."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self.port = 0
        #: The connections being answered, with the tasks answering them.
        self._open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}

    async def start(self, listen: str) -> None:
        """Listen on `listen` (host:port; port 0 picks one: see `port`)."""
        host, _, port = listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if host == "::":
            # Every address, IPv4 too, as `--listen [::]:50051` takes them: asyncio makes
            # an IPv6 socket IPv6-only, and a scraper of the pod's IPv4 address was refused.
            self._server = await asyncio.start_server(
                self._answer, sock=_dual_stack(int(port)), limit=MAX_REQUEST_BYTES
            )
        else:
            self._server = await asyncio.start_server(
                self._answer, host or None, int(port), limit=MAX_REQUEST_BYTES
            )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, and end the connections still open (a scraper sending its
        request slowly, or not reading the answer): left open, their tasks were cancelled
        as the event loop closed, and asyncio logged an ERROR with a traceback for each;
        on Python 3.12 and later, wait_closed() also waited for them (up to
        REQUEST_TIMEOUT_SECONDS, or for ever for a scraper that does not read)."""
        if self._server is not None:
            self._server.close()
            for writer in self._open:
                writer.transport.abort()  # its task ends on the lost connection
            if self._open:
                await asyncio.wait(self._open.values(), timeout=1.0)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[writer] = task
        try:
            try:
                head = await asyncio.wait_for(_request_head(reader), REQUEST_TIMEOUT_SECONDS)
            except (asyncio.LimitOverrunError, ValueError):
                await _reply(writer, 431, "request header fields too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            method, _, rest = head.partition(b" ")
            target = rest.partition(b" ")[0].split(b"?", 1)[0]
            if target != b"/metrics":
                await _reply(writer, 404, "not found: metrics are at /metrics\n")
            elif method not in (b"GET", b"HEAD"):
                await _reply(writer, 405, "method not allowed: GET /metrics\n", allow=True)
            else:
                body = self.metrics.render()
                await _reply(writer, 200, body, head_only=method == b"HEAD", metrics=True)
        except (ConnectionError, OSError):
            pass
        finally:
            self._open.pop(writer, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _dual_stack(port: int) -> socket.socket:
    """A listening socket on every IPv6 and IPv4 address (`[::]`), at `port`."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(100)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _request_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers, up to the empty line that ends them: CRLF as HTTP
    says, or a bare LF, as RFC 9112 lets a server take (nc, hand-written probes).
    ValueError past MAX_REQUEST_BYTES."""
    head = b""
    while True:
        line = await reader.readuntil(b"\n")
        head += line
        if len(head) > MAX_REQUEST_BYTES:
            raise ValueError("request head too large")
        if line in (b"\r\n", b"\n"):
            return head


async def _reply(
    writer: asyncio.StreamWriter,
    code: int,
    body: str,
    *,
    head_only: bool = False,
    metrics: bool = False,
    allow: bool = False,
) -> None:
    data = body.encode()
    kind = "text/plain; version=0.0.4; charset=utf-8" if metrics else "text/plain; charset=utf-8"
    headers = (
        f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n"
        + ("Allow: GET, HEAD\r\n" if allow else "")
        + "\r\n"
    )
    writer.write(headers.encode() + (b"" if head_only else data))
    await writer.drain()


__all__ = ["Metrics", "MetricsEndpoint"]
