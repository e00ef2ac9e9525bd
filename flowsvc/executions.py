"""Executions that outlive their RPC: the layer between the servicer and engine + store.

Knows nothing of gRPC. Each execution runs in its own asyncio task (a "drive"), not in
the RPC handler that started it, so that callers can come and go:

    attach = await manager.start(flow, input, request_id=..., continue_on_disconnect=...)
    async for sequence, event in manager.events(attach): ...
    manager.release(attach, completed=...)       # the caller went away, or is done

The drive commits each event to the store *before* publishing it to followers, so
nothing a client was sent can be lost by a crash. A caller that goes away cancels
its execution, unless it asked to continue on disconnect. The in-flight cap, request
idempotency, crash recovery, retention and the store's health live here too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from flowsvc.engine import FlowEngine, PreparedFlow, StopHandle, log_ended
from flowsvc.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ShuttingDownError,
    StillStoppingError,
    StoreUnavailableError,
    TooManyExecutionsError,
)
from flowsvc.logs import Tally
from flowsvc.logs import event as log_event
from flowsvc.metrics import Metrics
from flowsvc.models import (
    Event,
    Flow,
    FlowFinished,
    FlowStarted,
    FlowStatus,
    TaskCompleted,
    new_flow_id,
)
from flowsvc.store import (
    ExecutionRecord,
    ExecutionStore,
    ExecutionSummary,
    NewExecution,
    StoredEvent,
)
from flowsvc.store.codec import dumps, flow_to_json, request_hash
from flowsvc.validation import nested_too_deep, too_deep

logger = logging.getLogger("flowsvc.executions")

MAX_REQUEST_ID = 128
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    #: Most executions running at once; beyond it, start() raises TooManyExecutionsError.
    max_in_flight: int = 1000
    #: Finished executions older than this many seconds are deleted (0: keep forever).
    retention_seconds: float = 7 * 24 * 3600.0
    #: How long to wait for a stopped execution to end before CancelExecution answers.
    cancel_wait_seconds: float = 10.0
    #: The largest answer that carries an execution (0: no limit): a flow and input that
    #: would not fit in one, with RECORD_RESERVE_BYTES to spare, are refused at submission.
    max_record_bytes: int = 0


#: Stored events read per job of the store (fewer when they are large): GetExecution and
#: WatchExecution read a long execution a part at a time, other flows' commits between.
READ_CHUNK_EVENTS = 256
#: Events of one execution queued for commit at most, before its engine waits.
MAX_UNCOMMITTED = 64
#: Events an execution's drive takes from its engine between two turns of the event loop.
#: An async task that returns at once (noop) never gives the loop up, and the in-memory
#: store commits without an await: a loop of 100,000 such steps held every other flow and
#: health check about a second (a turn every 64 steps costs under 1 % of a noop step).
EVENTS_PER_TURN = 64
#: An execution that a store failure stopped, before its end could be written.
_END_NOT_RECORDED = (
    "execution {flow_id} was stopped by a failure of the execution store; its end is "
    "recorded as soon as the store can write again"
)
#: Expired executions deleted per transaction by retention: a sweep of many takes turns
#: with the flows' own writes instead of holding the store for seconds.
RETENTION_BATCH = 500
#: Why an execution whose every caller went away is stopped (without continue_on_disconnect):
#: CALLER_LEFT, then how it went in brackets (see release); CALLER_LEFT_EARLY when it went
#: while the execution's record was being written.
CALLER_LEFT = "the caller went away"
CALLER_LEFT_EARLY = f"{CALLER_LEFT} before the execution started"
#: How the message of an execution stopped that way ends (the engine puts the reason last).
_ENDS_AS_CALLER_LEFT = re.compile(
    f": {re.escape(CALLER_LEFT)}( \\([^()]*\\)| before the execution started)$"
)
#: The message of an execution stopped before its first task began (the engine's
#: "Flow cancelled before step 1 ('task'): <reason>"): it ran nothing.
_RAN_NOTHING = re.compile(r"^Flow cancelled before step 1 \(")
#: What a retry of one of those, stopped after a task had begun, is told.
_RETRY_OF_LEFT = (
    "request_id {request_id!r}: its execution {flow_id} was cancelled because its caller "
    "went away (deadline passed, cancelled or disconnected) after a task had begun, so it "
    "is not run again under this request_id. Send a new request_id to run the flow again "
    "(continue_on_disconnect keeps an execution running when its caller leaves); "
    "GetExecution reads the cancelled one ({where})"
)
#: How long a cancelled execution may take to end at shutdown before it is cut off.
CUT_OFF_SECONDS = 1.0
#: What an execution's answer holds besides its flow, input, history and final message:
#: its id, status, request_id (128 characters, 4 bytes each at most), times, last
#: sequence and the fields' tags, with room to spare for a message cut to fit.
RECORD_RESERVE_BYTES = 1024
#: How many prepared flows (validated, routed, compiled) are kept, by their bytes.
PREPARED_CACHE_SIZE = 512
#: The most bytes of flows (their request bytes and stored JSON) the cache keeps: a
#: prepared flow holds about twice that in memory. Counting entries only, 512 distinct
#: flows of 3.5 MB (each retained 13 MB) could take a client's server to 7 GB.
PREPARED_CACHE_BYTES = 32 * 1024 * 1024
#: What the cache counts for each reference ("${input.a}") in a flow's params, besides
#: its bytes: compiled, one holds about 430 bytes of memory (its Ref, _Whole or _Text,
#: and its place in the template's list of references), where its request bytes and
#: JSON count 13. Counted at half that, as the rest is (memory about twice the count):
#: without it, flows of references held 18 times what the cache counted.
REFERENCE_CACHE_BYTES = 256
#: A store job running longer than this (a frozen file system, a throttled volume, a
#: network disk gone quiet) turns health NOT_SERVING until the store writes again: every
#: call was waiting for it, and health said SERVING, so an orchestrator saw nothing wrong.
STORE_STALL_SECONDS = 5.0
#: How often the store is looked at for a stall.
STORE_STALL_CHECK_SECONDS = 1.0
#: At most one line per this many seconds for the calls refused at --max-in-flight.
REFUSALS_LOG_SECONDS = 10.0


#: A request's flow or input larger than this (serialized) is converted and checked in a
#: thread, not on the event loop: a 3.6 MB input of 900,000 nulls took 1.3 s of
#: conversion and checks, a stall of every flow and health check. (The thread still
#: shares the GIL: the loop runs between its slices, every few milliseconds.)
OFF_LOOP_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Prepared:
    plan: PreparedFlow
    flow_json: str
    flow_digest: str
    flow_bytes: int  # the flow's size in an answer (0: not measured, no limit)


def _cache_bytes(key: bytes, prepared: _Prepared) -> int:
    """What a prepared flow counts for in the cache: its request bytes and JSON, and its
    references (see REFERENCE_CACHE_BYTES)."""
    references = sum(len(node.template.refs()) for node in prepared.plan.nodes.values())
    return len(key) + len(prepared.flow_json) + references * REFERENCE_CACHE_BYTES


def _interrupted(message: str) -> Callable[[ExecutionRecord], FlowFinished]:
    """The `finished` event that closes a cut-off execution, for store.finish_running."""

    def final(record: ExecutionRecord) -> FlowFinished:
        return FlowFinished(
            record.flow_id,
            FlowStatus.INTERRUPTED,
            message,
            datetime.now(UTC),
            max(0, record.last_sequence - 1),  # the events after `started` are task results
        )

    return final


class Run:
    """A live execution: its committed events so far, and the followers waiting for more.

    Followers wait on futures of their own, woken only when there is something new; a
    caller that only wants the end (ExecuteFlow) is woken once, at the end.
    """

    __slots__ = (
        "_commits_waiter",
        "_done_waiters",
        "_waiters",
        "callers",
        "continue_on_disconnect",
        "error",
        "events",
        "finished",
        "flow_id",
        "stop",
        "task",
        "unpublished",
    )

    def __init__(self, flow_id: str, continue_on_disconnect: bool) -> None:
        self.flow_id = flow_id
        self.continue_on_disconnect = continue_on_disconnect
        self.stop = StopHandle()
        self.events: list[Event] = []  # events[i] has sequence i + 1
        self.finished = False
        self.error: BaseException | None = None
        self.callers = 0
        #: Events queued for commit whose on_commit callback has not come yet.
        self.unpublished = 0
        self.task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []  # followers: woken by every event
        self._done_waiters: list[asyncio.Future[None]] = []  # woken at the end only
        # The drive, waiting for commits: (woken when unpublished <= this, its future)
        self._commits_waiter: tuple[int, asyncio.Future[None]] | None = None

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()

    def publish(self, event: Event) -> None:
        self.events.append(event)
        if self._waiters:
            self._wake(self._waiters)
        if isinstance(event, FlowFinished):
            self.finished = True
            self._wake(self._done_waiters)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake(self._waiters)
        self._wake(self._done_waiters)

    def on_commit(self, event: Event, error: BaseException | None) -> None:
        """The store's callback for each event: publish it, or stop on a failed commit."""
        self.unpublished -= 1
        if error is not None:
            if self.error is None:
                self.fail(error)
        elif self.error is None:
            self.publish(event)
        waiter = self._commits_waiter
        if waiter is not None and (self.unpublished <= waiter[0] or self.error is not None):
            self._commits_waiter = None
            if not waiter[1].done():
                waiter[1].set_result(None)

    async def commits_down_to(self, count: int) -> None:
        """Wait until at most `count` events await their commit (or a commit failed)."""
        while self.unpublished > count and self.error is None:
            future = asyncio.get_running_loop().create_future()
            self._commits_waiter = (count, future)
            await future

    async def follow(self, after: int) -> AsyncIterator[tuple[int, Event]]:
        index = after
        events = self.events
        while True:
            while index < len(events):
                index += 1
                yield index, events[index - 1]
            if self.finished:
                return
            if self.error is not None:
                raise self.error
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._unwait(self._waiters, waiter)

    async def wait_done(self) -> None:
        while not self.finished and self.error is None:
            waiter = asyncio.get_running_loop().create_future()
            self._done_waiters.append(waiter)
            try:
                await waiter
            finally:
                self._unwait(self._done_waiters, waiter)

    @staticmethod
    def _unwait(waiters: list[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
        """A waiter that was not woken (its caller went away: cancelled, or its stream
        closed) leaves the list: kept until the next event, the futures of a long task's
        watchers and retries piled up one a call, for hours."""
        if not waiter.done() or waiter.cancelled():
            waiter.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)


class Attachment(NamedTuple):
    """A caller's hold on an execution (new, or found again by request_id)."""

    flow_id: str
    run: Run | None  # None: the execution had already ended
    created: bool
    #: An ended execution's events, read when it was found (see _attach_existing).
    ended: AsyncIterator[tuple[int, Event]] | None = None


def _caller_left_reason(record: ExecutionRecord) -> re.Match[str] | None:
    """The execution was cancelled because every caller went away (its message ends with
    the reason the engine was given: see release): the match of that reason, else None."""
    if record.status is not FlowStatus.CANCELLED:
        return None
    return _ENDS_AS_CALLER_LEFT.search(record.message)


def _caller_left(reason: str | None) -> bool:
    """The execution is being stopped because every caller went away (see release)."""
    return reason is not None and reason.startswith(CALLER_LEFT)


def parse_flow_id(value: str, field: str = "flow_id") -> str:
    """The canonical form of a UUID flow id, or INVALID_ARGUMENT."""
    if not value:
        raise InvalidArgumentError.one(field, "is required")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidArgumentError.one(field, f"{shown!r} is not a UUID") from None


class ExecutionManager:
    """Starts, follows, cancels, lists and recovers executions."""

    def __init__(
        self,
        engine: FlowEngine,
        store: ExecutionStore,
        settings: ManagerSettings | None = None,
        on_store_health: Callable[[bool], Any] | None = None,
        flow_bytes: Callable[[Flow], int] | None = None,
        input_bytes: Callable[[Mapping[str, Any]], int] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`flow_bytes` and `input_bytes` measure a flow and an input as an execution's
        answer carries them: with `settings.max_record_bytes`, what the size check at
        submission adds up. `metrics`, if given, counts each committed event."""
        self.engine = engine
        self.metrics = metrics
        self._flow_bytes = flow_bytes
        self._input_bytes = input_bytes
        self.store = store
        self.settings = settings or ManagerSettings()
        self._on_store_health = on_store_health
        self._live: dict[str, Run] = {}
        self._starting = 0
        # Executions whose record is being written: id -> their Run once launched (None:
        # not launched). The store may answer a retry's, a watcher's or a cancel's read
        # of the record before the creator has resumed and launched it: they wait here.
        self._launching: dict[str, asyncio.Future[Run | None]] = {}
        # request_id -> the store's write of its execution's record, while it is written:
        # a retry that comes meanwhile waits for it instead of counting against the cap.
        self._creating: dict[str, asyncio.Future[ExecutionRecord | None]] = {}
        #: Drives cut off at shutdown whose task ignored its cancellation: still there.
        self.left_behind: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        # Why stop_all() stopped every execution (None: it has not): one launched since,
        # whose record was being written then, is stopped at once for the same reason.
        self._stopped_all: str | None = None
        self.store_healthy = True
        self._probe: asyncio.Task[None] | None = None
        self._stall_watch: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        # Executions that ended without their `finished` event committed: id -> message.
        # Written (INTERRUPTED) once the store can write (see _record_ends).
        self._unrecorded: dict[str, str] = {}
        self._secret = b""
        self._prepared: OrderedDict[bytes, _Prepared] = OrderedDict()
        self._prepared_bytes = 0  # _cache_bytes() of every cached flow
        # Calls refused at the cap: logged, but counted, as a burst can bring thousands.
        self._refusals = Tally(
            logger,
            logging.WARNING,
            "executions refused: the in-flight cap is reached",
            "refused",
            every=REFUSALS_LOG_SECONDS,
        )

    # -- life cycle ----------------------------------------------------------------------

    async def open(self) -> list[str]:
        """Open the store and close what a crash left RUNNING; returns those ids."""
        await self.store.open()
        try:
            return await self._recover()
        except BaseException:
            # Refused (full, read-only ...) once the store is open: closed again, or its
            # thread ran on and it held the database's lock, so that a server started
            # again in this process was refused as "in use by another flowsvc server".
            # (A failed retention sweep has started a store probe: it goes too.)
            for task in (self._probe, self._stall_watch):
                if task is not None:
                    task.cancel()
            await self.store.close()
            raise

    async def _recover(self) -> list[str]:
        """Crash recovery, retention and the write check of open()."""
        # First, with the room the store keeps for it: a database full of executions a
        # crash (or a store failure) cut off must record their ends, so that retention
        # can free their room, or the server could never start again.
        recovered = await self.store.finish_running(
            _interrupted(
                "Flow interrupted: the server stopped abruptly while it ran; every result "
                "committed before is kept, and the execution is not resumed"
            )
        )
        for flow_id in recovered:
            log_event(logger, logging.WARNING, "execution interrupted by a crash", flow_id=flow_id)
        if self.settings.retention_seconds > 0:
            # A database that filled up must get back the room that retention frees. No
            # flow runs yet: one transaction, three times as quick as batches.
            await self._sweep(batch=None)
        # A store that opens but cannot write (a read-only file, a full database) refuses
        # to start, rather than serving with every execution failing UNAVAILABLE.
        await self.store.check_writable()
        self._secret = await self.store.secret()
        if self.settings.retention_seconds > 0:
            self._retention = asyncio.create_task(self._retention_loop())
        self._stall_watch = asyncio.create_task(self._watch_store())
        return recovered

    async def cut_off(self, wait: float = CUT_OFF_SECONDS) -> None:
        """Cancel every execution still running; one whose task ignores its cancellation
        for `wait` seconds is left behind: its end is recorded (INTERRUPTED, at close)
        and its followers are told at once, so that their calls end before the server's.
        (`wait` 0: they have had their time already, since a stop_all().)"""
        drives = {
            run.task: run
            for run in self._live.values()
            if run.task is not None and run.task not in self.left_behind
        }
        for drive in drives:
            drive.cancel()
        if not drives:
            return
        done, stuck = await asyncio.wait(drives, timeout=wait)
        for drive in done:
            if not drive.cancelled():
                drive.exception()  # retrieved (the drive logged it)
        for drive in stuck:
            run = drives[drive]
            self.left_behind.add(drive)
            self._unrecorded[run.flow_id] = (
                "Flow interrupted: the server stopped while its running task ignored "
                "cancellation; every result committed before is kept"
            )
            started = run.events[0] if run.events else None
            name, began = (
                (started.flow_name, started.started_at)
                if isinstance(started, FlowStarted)
                else ("", datetime.now(UTC))  # its start not even committed yet
            )
            log_ended(
                run.flow_id,
                name,
                FlowStatus.INTERRUPTED,
                sum(isinstance(event, TaskCompleted) for event in run.events),
                began,
                reason="its running task ignored cancellation at shutdown",
            )
            run.fail(
                ShuttingDownError(
                    "the server stopped while the flow's task ran",
                    reason="EXECUTION_INTERRUPTED",
                    metadata={"flowId": run.flow_id},
                )
            )

    async def close(self) -> None:
        """Cut off whatever still runs (recorded INTERRUPTED) and close the store."""
        for task in (self._retention, self._probe, self._stall_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._launching:
            # Records still being written (a slow or locked database): each execution is
            # launched once its record is, and stopped below like the others. Closed
            # first, the store took the record but none of its events: left RUNNING, it
            # was taken at the next start for one a crash had cut off.
            await asyncio.wait(list(self._launching.values()))
        await self.cut_off()
        self._refusals.close()
        try:
            await self._record_ends()
        except StoreUnavailableError as exc:
            # Left RUNNING in the store (a full disk ...): the next start records them
            # INTERRUPTED as if a crash had cut them off. Said here, or nothing did.
            log_event(
                logger,
                logging.ERROR,
                "execution ends not recorded: the store cannot write; the next start "
                "records them interrupted",
                flow_ids=sorted(self._unrecorded),
                error=str(exc),
            )
        await self.store.close()

    async def _record_ends(self) -> None:
        """Close, INTERRUPTED, the executions whose end could not be committed."""
        pending = dict(self._unrecorded)
        if not pending:
            return

        def final(record: ExecutionRecord) -> FlowFinished:
            return _interrupted(pending[record.flow_id])(record)

        # The store numbers the event after the last one it committed, whatever was in
        # flight when the execution was cut off.
        await self.store.finish_running(final, only=set(pending))
        for flow_id in pending:
            self._unrecorded.pop(flow_id, None)

    @property
    def in_flight(self) -> int:
        """Executions running, and those whose record is being written."""
        return len(self._live) + self._starting

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def stop_all(self, reason: str) -> None:
        self._stopped_all = reason
        for run in list(self._live.values()):
            run.stop.request(reason)

    # -- starting and following ----------------------------------------------------------

    def cached(self, key: bytes | None) -> _Prepared | None:
        """The prepared flow, its stored JSON and its digest, when `key` (the flow's
        canonical bytes) was seen before. A flow is submitted again and again, and
        validating it is most of the cost of starting it: a hit costs no coroutine."""
        if key is None:
            return None
        hit = self._prepared.get(key)
        if hit is not None:
            self._prepared.move_to_end(key)
        return hit

    async def prepare(
        self, build: Callable[[], Flow | None], key: bytes | None = None
    ) -> _Prepared:
        """A flow not in the cache (see `cached`): built, validated and cached under `key`.
        A large one is built and validated in a thread (see OFF_LOOP_BYTES)."""
        if key is None:
            return self._build(build)
        if len(key) > OFF_LOOP_BYTES:
            loop = asyncio.get_running_loop()
            return await asyncio.to_thread(self._build_and_remember, loop, build, key)
        prepared = self._build(build)
        self._remember(key, prepared)
        return prepared

    def _build_and_remember(
        self, loop: asyncio.AbstractEventLoop, build: Callable[[], Flow | None], key: bytes
    ) -> _Prepared:
        """_build in a thread, the flow then kept by the loop even if the caller has left
        meanwhile (its deadline shorter than the build): its retry finds it in the cache,
        instead of having it built, and being cancelled, again on every try. Scheduled
        before the caller's await returns, so the caller finds it there too."""
        prepared = self._build(build)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody to keep it for
            loop.call_soon_threadsafe(self._remember, key, prepared)
        return prepared

    def _build(self, build: Callable[[], Flow | None]) -> _Prepared:
        """Convert, validate and measure a flow (on the loop, or in a thread: it touches
        nothing shared)."""
        flow = build()
        plan = self.engine.prepare(flow)  # INVALID_ARGUMENT, never cached
        flow_json = dumps(flow_to_json(plan.flow))
        measure = self._flow_bytes if self.settings.max_record_bytes else None
        return _Prepared(
            plan,
            flow_json,
            hashlib.sha256(flow_json.encode()).hexdigest(),
            measure(plan.flow) if measure is not None else 0,
        )

    def _remember(self, key: bytes, prepared: _Prepared) -> None:
        """Keep a prepared flow in the cache, under its canonical bytes (once: two calls
        may have built the same large flow in threads at once)."""
        size = _cache_bytes(key, prepared)
        # A flow bigger than a 16th of the cache is not kept: it would push out many.
        if key not in self._prepared and size <= PREPARED_CACHE_BYTES // 16:
            self._prepared[key] = prepared
            self._prepared_bytes += size
            while (
                len(self._prepared) > PREPARED_CACHE_SIZE
                or self._prepared_bytes > PREPARED_CACHE_BYTES
            ):
                old_key, old = self._prepared.popitem(last=False)
                self._prepared_bytes -= _cache_bytes(old_key, old)

    async def start(
        self,
        flow: Callable[[], Flow | None],
        flow_input: Mapping[str, Any],
        *,
        request_id: str = "",
        continue_on_disconnect: bool = False,
        cache_key: bytes | None = None,
        input_bytes: int = 0,
    ) -> Attachment:
        """Start an execution of the flow that `flow()` builds (not called on a cache hit
        for `cache_key`); `input_bytes` is the input's size in an answer."""
        # INVALID_ARGUMENT before anything else.
        prepared = self.cached(cache_key) or await self.prepare(flow, cache_key)
        if input_bytes > OFF_LOOP_BYTES:
            await asyncio.to_thread(self._check_input, prepared, input_bytes, flow_input)
        else:
            self._check_input(prepared, input_bytes, flow_input)
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgumentError.one(
                "request_id", f"is {len(request_id)} characters; the limit is {MAX_REQUEST_ID}"
            )
        digest = ""
        if request_id:  # what a retry must match: only needed with a request_id
            digest = request_hash(prepared.flow_digest, flow_input)
        while True:
            attachment = await self._attach_or_create(
                prepared, flow_input, request_id, digest, continue_on_disconnect
            )
            if attachment is not None:
                return attachment
            # The execution found for request_id is gone: a concurrent retry created it
            # first, and it then gave up its request_id (its caller had left before
            # anything ran), or retention deleted it (and its request_id with it)
            # before its events were read. Start it anew.

    async def _attach_or_create(
        self,
        prepared: _Prepared,
        flow_input: Mapping[str, Any],
        request_id: str,
        digest: str,
        continue_on_disconnect: bool,
    ) -> Attachment | None:
        """The execution of `request_id`, or a new one; None if the execution found for
        `request_id` gave it up meanwhile."""
        plan = prepared.plan
        if request_id:
            found = await self._by_request_id(request_id, digest, continue_on_disconnect)
            if found is None and (writing := self._creating.get(request_id)) is not None:
                # Its first call is writing the record: the execution to attach to, even
                # if that call took the last free slot. (Its failure is that call's to
                # report; this one then starts the execution itself.)
                with contextlib.suppress(Exception):
                    await asyncio.shield(writing)
                found = await self._by_request_id(request_id, digest, continue_on_disconnect)
            if found is not None:
                return found
        # After the request_id's look-up: a retry of an execution running here attaches
        # to it while the server drains (another instance, with its own store, would run
        # the flow a second time); only new executions are refused.
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another instance")
        if self.in_flight >= self.settings.max_in_flight:
            self._refusals.add(max_in_flight=self.settings.max_in_flight)
            raise TooManyExecutionsError(
                f"{self.settings.max_in_flight} execution"
                f"{' is' if self.settings.max_in_flight == 1 else 's are'} running, the most "
                "this server runs at once; retry later",
                retry_after=1.0,
                metadata={"maxInFlight": self.settings.max_in_flight},
            )
        new = NewExecution(
            flow_id=new_flow_id(),
            flow=plan.flow,
            flow_json=prepared.flow_json,
            input=flow_input,
            request_id=request_id or None,
            request_hash=digest,
            created_at=datetime.now(UTC),
        )
        # Counted as running from here: a shutdown that begins while the record is being
        # written gives this execution its grace period too (see wait_idle).
        self._starting += 1
        self._idle.clear()
        orphaned = False
        run: Run | None = None
        try:
            creating = self.store.create_nowait(new)
            if creating.done():  # the in-memory store: no wait, nothing to shield
                existing = creating.result()
            else:
                self._launching[new.flow_id] = asyncio.get_running_loop().create_future()
                if request_id:
                    self._creating[request_id] = creating
                    creating.add_done_callback(lambda done: self._written(request_id, done))
                try:
                    # Shielded: the record is written whatever happens to this caller,
                    # so it must be driven to an end even if the caller leaves meanwhile.
                    existing = await asyncio.shield(creating)
                except asyncio.CancelledError:
                    # Still starting until _launch_orphan has launched it (or not).
                    orphaned = True
                    creating.add_done_callback(
                        lambda done: self._launch_orphan(
                            done, new.flow_id, plan, flow_input, continue_on_disconnect
                        )
                    )
                    raise
                except BaseException:
                    self._launched(new.flow_id, None)
                    raise
            if existing is None:
                run = self._launch(new.flow_id, plan, flow_input, continue_on_disconnect, callers=1)
        except StoreUnavailableError as exc:
            self._set_store_health(False, exc)
            raise
        finally:
            if not orphaned:
                self._started()
        if existing is not None:  # a concurrent retry created it first
            self._launched(new.flow_id, None)
            return await self._attach_existing(existing, digest, continue_on_disconnect)
        return Attachment(new.flow_id, run, created=True)

    def _check_input(
        self, prepared: _Prepared, input_bytes: int, flow_input: Mapping[str, Any]
    ) -> None:
        """INVALID_ARGUMENT for an input nested too deep, or too large to be read back
        with its flow (on the loop, or in a thread: it touches nothing shared)."""
        if flow_input and nested_too_deep(flow_input):
            raise InvalidArgumentError.one("input", too_deep())
        self._check_record_size(prepared.flow_bytes, input_bytes, flow_input)

    def _check_record_size(
        self, flow_bytes: int, input_bytes: int, flow_input: Mapping[str, Any]
    ) -> None:
        """INVALID_ARGUMENT for a flow and input that no answer could carry back: the
        execution would run, and GetExecution could never return them. `input_bytes` is
        the input's size in the request."""
        limit = self.settings.max_record_bytes
        if not limit:
            return
        if self._input_bytes is not None and (
            flow_bytes + 2 * input_bytes + RECORD_RESERVE_BYTES > limit
        ):
            # An answer carries the input back as the store gives it, up to twice the
            # request's size (a Value with no kind set, 2 bytes in a list, comes back a
            # null, 4): measured as such when that could matter, a large input only.
            input_bytes = self._input_bytes(flow_input)
        if flow_bytes + input_bytes + RECORD_RESERVE_BYTES <= limit:
            return
        field = "input" if input_bytes >= flow_bytes else "flow"
        raise InvalidArgumentError.one(
            field,
            f"the flow ({flow_bytes:,} bytes) and input ({input_bytes:,} bytes) are too large "
            f"for GetExecution to return: together they may take at most "
            f"{limit - RECORD_RESERVE_BYTES:,} bytes, this server's largest answer "
            f"(--max-response-bytes, {limit:,}) less {RECORD_RESERVE_BYTES:,} for the rest "
            "of the execution",
            reason="FLOW_INPUT_TOO_LARGE",
            metadata={
                "flowBytes": flow_bytes,
                "inputBytes": input_bytes,
                "maxResponseBytes": limit,
            },
        )

    def _written(self, request_id: str, creating: asyncio.Future[Any]) -> None:
        """The record of `request_id`'s execution is written (or failed): see _creating."""
        if self._creating.get(request_id) is creating:
            del self._creating[request_id]

    def _started(self) -> None:
        """A start has launched its execution, or given up: it no longer counts."""
        self._starting -= 1
        if not self._starting and not self._live:
            self._idle.set()

    def _launch(
        self,
        flow_id: str,
        plan: Any,
        flow_input: Mapping[str, Any],
        continue_on_disconnect: bool,
        callers: int,
    ) -> Run:
        run = Run(flow_id, continue_on_disconnect)
        run.callers = callers
        self._live[flow_id] = run
        self._idle.clear()
        if self._stopped_all is not None:  # its record was being written at stop_all()
            run.stop.request(self._stopped_all)
        # Not named: naming a task costs more than the rest of its creation.
        run.task = asyncio.create_task(self._drive(run, plan, flow_input))
        if self._launching:
            self._launched(flow_id, run)
        return run

    def _launched(self, flow_id: str, run: Run | None) -> None:
        """Tell whoever waits for `flow_id` to be launched (see _launching) that it is."""
        waiting = self._launching.pop(flow_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(run)

    async def _live_run(self, flow_id: str) -> Run | None:
        """The running execution `flow_id`, waiting for it if its record is being
        written; None if it is not running."""
        run = self._live.get(flow_id)
        if run is None and (launching := self._launching.get(flow_id)) is not None:
            run = await asyncio.shield(launching)
        return run

    def _launch_orphan(
        self,
        creating: asyncio.Future[ExecutionRecord | None],
        flow_id: str,
        plan: Any,
        flow_input: Mapping[str, Any],
        continue_on_disconnect: bool,
    ) -> None:
        """Its caller left while the record was written: run it anyway, so that it ends
        (at once, CANCELLED, unless the caller asked to continue on disconnect)."""
        try:
            if creating.cancelled() or creating.exception() is not None:
                self._launched(flow_id, None)
                return
            if creating.result() is not None:  # a retry's: not created
                self._launched(flow_id, None)
                return
            run = self._launch(flow_id, plan, flow_input, continue_on_disconnect, callers=0)
            if not continue_on_disconnect:
                run.stop.request(CALLER_LEFT_EARLY)
        finally:
            self._started()

    async def _by_request_id(
        self, request_id: str, digest: str, continue_on_disconnect: bool
    ) -> Attachment | None:
        # Looked up before the in-flight cap: a retry of a running execution attaches to
        # it even when the server is full. create() settles races between two retries.
        record = await self._store(self.store.get_by_request_id(request_id))
        if record is None:
            return None
        return await self._attach_existing(record, digest, continue_on_disconnect)

    async def _attach_existing(
        self, record: ExecutionRecord, digest: str, continue_on_disconnect: bool
    ) -> Attachment | None:
        """Attach to the execution a request_id made; None if it gave up its request_id
        (the retry starts the flow anew)."""
        if record.request_hash != digest:
            raise AlreadyExistsError(
                f"request_id {record.request_id!r} was already used for execution "
                f"{record.flow_id} with a different flow or input",
                metadata={"requestId": record.request_id, "flowId": record.flow_id},
            )
        run = await self._live_run(record.flow_id)
        if run is not None and _caller_left(run.stop.reason):
            # Stopping because its callers went away: attached, this retry would only be
            # told CANCELLED. How it ends decides what the retry gets (see _drive).
            log_event(
                logger,
                logging.INFO,
                "retry waits for the end of an execution its caller left",
                flow_id=record.flow_id,
                request_id=record.request_id,
            )
            if run.task is not None:
                await asyncio.wait([run.task])  # not cancelled if this caller leaves
            found = await self._store(self.store.get(record.flow_id))
            if found is None or found.request_id is None:
                return None
            record, run = found, None
        left = _caller_left_reason(record) if run is None else None
        if left is not None:
            if _RAN_NOTHING.match(record.message):
                # It ran nothing, yet holds its request_id: it gives it up in a commit of
                # its own after its end's (see _drive), which a crash or a store failure
                # between the two lost. Given up now: the retry runs the flow.
                await self._store(self.store.forget_request_id(record.flow_id))
                return None
            raise FailedPreconditionError(
                _RETRY_OF_LEFT.format(
                    request_id=record.request_id,
                    flow_id=record.flow_id,
                    # "Flow cancelled during step 1 ('task')": the message up to its reason
                    # (a task's name may hold ": " too).
                    where=record.message[: left.start()],
                ),
                reason="REQUEST_ID_ABANDONED",
                metadata={"requestId": record.request_id, "flowId": record.flow_id},
            )
        ended = None
        if run is not None:
            run.callers += 1
            if continue_on_disconnect:
                # A retry for a client that will reattach: its going away, or its first
                # call's, must not cancel the execution either.
                run.continue_on_disconnect = True
        else:
            # Its record and first READ_CHUNK_EVENTS events are read now: deleted by
            # retention from here on, it is still the retry's answer, not a NOT_FOUND
            # for an id the client never asked about (a longer history's later chunks
            # can still be cut short, as any reader's can).
            try:
                found_record, stored = await self._read(record.flow_id, 0)
            except NotFoundError:
                return None  # deleted since the look-up, its request_id with it
            ended = self._replay(found_record, stored)
        log_event(
            logger,
            logging.INFO,
            "retry attached to the running execution" if run else "retry of an ended execution",
            flow_id=record.flow_id,
            request_id=record.request_id,
        )
        return Attachment(record.flow_id, run, created=False, ended=ended)

    def release(
        self,
        attachment: Attachment,
        *,
        completed: bool,
        gone: str = "cancelled, deadline passed or disconnected",
    ) -> None:
        """The caller is done (`completed`) or went away (`gone` says how, for the
        execution's message and the log); the latter may cancel the run."""
        run = attachment.run
        if run is None:
            return
        run.callers -= 1
        if (
            not completed
            and run.callers <= 0
            and not run.finished
            and not run.continue_on_disconnect
        ):
            run.stop.request(f"{CALLER_LEFT} ({gone})")

    def follow(self, flow_id: str, after: int = 0) -> AsyncIterator[tuple[int, Event]]:
        """(sequence, event) after `after`, until the end: the live run's own iterator
        (no generator in between: each message of a stream passes through it), else the
        stored events."""
        run = self._live.get(flow_id)
        if run is not None:
            return run.follow(after)
        return self._follow_stored(flow_id, after)

    async def _follow_stored(self, flow_id: str, after: int) -> AsyncIterator[tuple[int, Event]]:
        run = await self._live_run(flow_id)  # its record was being written a moment ago
        if run is not None:
            async for item in run.follow(after):
                yield item
            return
        record, stored_events = await self._read(flow_id, after)
        async for item in self._replay(record, stored_events):
            yield item

    @staticmethod
    async def _replay(
        record: ExecutionRecord, stored_events: AsyncIterator[StoredEvent]
    ) -> AsyncIterator[tuple[int, Event]]:
        """The stored events of an execution that is not live, so has ended (or a crash
        or store failure cut it short): every event it will ever have is in the store."""
        async for stored in stored_events:
            yield stored.sequence, stored.event
        if record.status is FlowStatus.RUNNING:
            # Stopped by a store failure, its end not written yet: a stream ends with
            # `finished`, or with an error that says to come back.
            raise StoreUnavailableError(
                _END_NOT_RECORDED.format(flow_id=record.flow_id),
                metadata={"flowId": record.flow_id},
            )

    def events(self, attachment: Attachment) -> AsyncIterator[tuple[int, Event]]:
        """Every (sequence, event) of the attached execution, until its end (what
        StreamFlow sends)."""
        if attachment.run is not None:
            return attachment.run.follow(0)
        assert attachment.ended is not None  # an ended execution's, read when found
        return attachment.ended

    async def drain(self, attachment: Attachment) -> list[Event]:
        """Every event of the execution, once it has ended (what ExecuteFlow returns)."""
        run = attachment.run
        if run is not None:
            await run.wait_done()
            if run.error is not None:
                raise run.error
            return run.events
        return [event async for _, event in self.events(attachment)]

    # -- the drive: engine -> store -> followers -----------------------------------------

    async def _drive(self, run: Run, plan: Any, flow_input: Mapping[str, Any]) -> None:
        """Run the engine; commit each event, and publish it once committed.

        Commits are pipelined: the engine goes on to its next task while an event is
        being committed (the store batches it with other executions' events), and the
        event is published to followers only from the store's on_commit callback, in
        order. So no client ever sees an uncommitted event, and no execution waits for
        the disk between two tasks (at most MAX_UNCOMMITTED events are in flight per
        execution).
        """
        sequence = 0
        append = self.store.append_nowait
        on_commit = run.on_commit
        flow_id = run.flow_id
        metrics = self.metrics
        if metrics is not None:
            # Counted once committed, as the clients see it: an event whose commit failed
            # (the execution is recorded INTERRUPTED) is not counted, its finish least.
            count = metrics.event

            def on_commit(event: Event, error: BaseException | None) -> None:
                run.on_commit(event, error)
                if run.error is None:  # published
                    count(event)

        try:
            events = self.engine.events(plan, flow_input, flow_id, run.stop)
            try:
                async for event in events:
                    sequence += 1
                    run.unpublished += 1
                    append(flow_id, sequence, event, on_commit)
                    if run.unpublished > MAX_UNCOMMITTED:
                        await run.commits_down_to(MAX_UNCOMMITTED // 2)
                    elif not sequence % EVENTS_PER_TURN:
                        await asyncio.sleep(0)
                    if run.error is not None:
                        break  # a commit failed: stop running tasks whose results are lost
            finally:
                await events.aclose()
            if run.unpublished:
                await run.commits_down_to(0)
            if run.error is not None:
                raise run.error
            if _caller_left(run.stop.reason) and not run.stop.began:
                # Nobody waits for it, and it ran nothing: a retry of its request (a
                # first call whose deadline was too short) runs the flow, as this
                # execution would have, instead of being told CANCELLED for ever.
                with contextlib.suppress(StoreUnavailableError):
                    await self._store(self.store.forget_request_id(flow_id))
        except StoreUnavailableError as exc:
            # The event could not be committed, so it is not sent. Its end is recorded
            # once the store can write again (see _probe_store).
            self._set_store_health(False, exc)
            self._unrecorded[run.flow_id] = f"Flow interrupted: the execution store failed: {exc}"
            if run.error is None:
                run.fail(exc)
        except asyncio.CancelledError:
            # Cut off at close(), which records the end.
            self._unrecorded[run.flow_id] = "Flow interrupted: the server stopped before it ended"
            run.fail(
                ShuttingDownError(
                    "the server stopped",
                    reason="EXECUTION_INTERRUPTED",
                    metadata={"flowId": run.flow_id},
                )
            )
            raise
        except ShuttingDownError:
            # Cut off at shutdown (cut_off() failed the run and records its end): its
            # task, which had ignored its cancellation, has come back since. Not a bug.
            pass
        except Exception as exc:  # a bug: keep the server up, tell the followers
            logger.exception("execution drive failed", extra={"flow_id": run.flow_id})
            self._unrecorded[run.flow_id] = "Flow interrupted by an internal error"
            run.fail(exc)
            with contextlib.suppress(StoreUnavailableError):
                await self._record_ends()
        finally:
            self._live.pop(run.flow_id, None)
            if not self._live and not self._starting:
                self._idle.set()
            if metrics is not None:
                metrics.cut_off(flow_id)  # counted interrupted if it has no finished event

    # -- look-ups ----------------------------------------------------------------------------

    async def get(self, flow_id: str) -> tuple[ExecutionRecord, list[Event]]:
        record, stored_events = await self._read(flow_id, 0)
        return record, [stored.event async for stored in stored_events]

    async def _read(
        self, flow_id: str, after: int
    ) -> tuple[ExecutionRecord, AsyncIterator[StoredEvent]]:
        """The execution, and an iterator of its stored events after `after`, read
        READ_CHUNK_EVENTS at a time: one job of the store's thread for all of a long
        execution held every flow's commits back (10,000 events: about 0.1 s).

        The record is read with the first events, so its status agrees with them; the
        rest are those up to its last_sequence, committed already and never changed, so
        the whole agrees with the record even as later events commit. An execution that
        retention deletes meanwhile is NOT_FOUND (never part of it, then OK)."""
        found = await self._store(self.store.execution(flow_id, after, READ_CHUNK_EVENTS))
        if found is None:
            raise NotFoundError(f"no execution {flow_id}", metadata={"flowId": flow_id})
        record, first = found
        return record, self._rest(flow_id, first, record.last_sequence)

    async def _rest(
        self, flow_id: str, chunk: list[StoredEvent], upto: int
    ) -> AsyncIterator[StoredEvent]:
        while chunk:
            for stored in chunk:
                yield stored
            after = chunk[-1].sequence
            if after >= upto:
                return
            found = await self._store(self.store.events(flow_id, after, upto, READ_CHUNK_EVENTS))
            if found is None:
                raise NotFoundError(f"no execution {flow_id}", metadata={"flowId": flow_id})
            chunk = found

    async def record(self, flow_id: str) -> ExecutionRecord:
        """The execution without its events (its last_sequence says how many it has)."""
        record: ExecutionRecord | None = await self._store(self.store.get(flow_id))
        if record is None:
            raise NotFoundError(f"no execution {flow_id}", metadata={"flowId": flow_id})
        return record

    async def cancel(self, flow_id: str) -> tuple[ExecutionRecord, list[Event]]:
        run = await self._live_run(flow_id)
        if run is None:
            record = await self._store(self.store.get(flow_id))
            if record is None:
                raise NotFoundError(f"no execution {flow_id}", metadata={"flowId": flow_id})
            if record.status is FlowStatus.RUNNING:
                raise StoreUnavailableError(
                    _END_NOT_RECORDED.format(flow_id=flow_id), metadata={"flowId": flow_id}
                )
            raise FailedPreconditionError(
                f"execution {flow_id} has already ended ({record.status.value})",
                reason="EXECUTION_ENDED",
                metadata={"flowId": flow_id, "status": f"FLOW_STATUS_{record.status.name}"},
            )
        run.stop.request("cancelled by CancelExecution")
        stopped = True
        try:
            await asyncio.wait_for(run.wait_done(), self.settings.cancel_wait_seconds)
        except TimeoutError:
            stopped = False
        if run.error is not None:
            # Its end could not be committed (a store failure), or it was cut off at
            # shutdown: its record still says RUNNING, and OK would say the cancel took.
            raise run.error
        record, events = await self.get(flow_id)
        if record.status.is_final and record.status is not FlowStatus.CANCELLED:
            # It ended on its own before the cancel took effect (its last task had
            # finished): OK would say it was cancelled.
            raise FailedPreconditionError(
                f"execution {flow_id} ended ({record.status.value}) before the cancel took effect",
                reason="EXECUTION_ENDED_BEFORE_CANCEL",
                metadata={"flowId": flow_id, "status": f"FLOW_STATUS_{record.status.name}"},
            )
        if not record.status.is_final and not stopped:
            # Its async task ignores cancellation and has no timer to cut it off. OK would
            # say it was cancelled; it will be, once that task returns.
            raise StillStoppingError(
                f"execution {flow_id} is stopping: no task starts after the one it runs, but "
                f"that task has not stopped {self.settings.cancel_wait_seconds:g}s after the "
                "cancel (it does not obey cancellation); the execution ends "
                "FLOW_STATUS_CANCELLED when the task returns (WatchExecution follows it)",
                metadata={
                    "flowId": flow_id,
                    "cancelWaitSeconds": f"{self.settings.cancel_wait_seconds:g}",
                },
            )
        return record, events

    async def page(
        self, page_size: int, page_token: str, status: FlowStatus | None, flow_name: str
    ) -> tuple[list[ExecutionSummary], str]:
        """A page of executions, newest first, and the token of the next page ("" at the end)."""
        if page_size < 0:
            raise InvalidArgumentError.one("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = {"status": status.value if status else "", "flow_name": flow_name}
        before = self._read_token(page_token, query) if page_token else None
        records = await self._store(self.store.page(size + 1, before, status, flow_name or None))
        next_token = ""
        if len(records) > size:
            records = records[:size]
            next_token = self._make_token(records[-1].cursor, query)
        return records, next_token

    def _make_token(self, cursor: int, query: dict[str, str]) -> str:
        payload = json.dumps({"c": cursor, "q": query}, separators=(",", ":")).encode()
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(payload + mac).decode().rstrip("=")

    def _read_token(self, token: str, query: dict[str, str]) -> int:
        bad = InvalidArgumentError.one(
            "page_token",
            "is not a page token this server issued (tampered or truncated)",
            reason="PAGE_TOKEN_INVALID",
        )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise bad from None
        payload, mac = raw[:-16], raw[-16:]
        expected = hmac.new(self._secret, payload, hashlib.sha256).digest()[:16]
        if len(raw) <= 16 or not hmac.compare_digest(mac, expected):
            raise bad
        data = json.loads(payload)
        if data["q"] != query:
            raise InvalidArgumentError.one(
                "page_token",
                "was issued for other filters; keep status and flow_name the same",
                reason="PAGE_TOKEN_INVALID",
            )
        cursor: int = data["c"]
        return cursor

    # -- store health and retention ----------------------------------------------------------

    async def _store(self, awaitable: Any) -> Any:
        """Await a store call; on StoreUnavailableError, turn unhealthy until a probe succeeds."""
        try:
            return await awaitable
        except StoreUnavailableError as exc:
            self._set_store_health(False, exc)
            raise

    def _set_store_health(self, healthy: bool, error: Exception | None = None) -> None:
        """Record whether the store can write; `error` is why it cannot (for the log: the
        operator who reads "execution store failed" needs the reason the clients got)."""
        if healthy == self.store_healthy:
            return
        self.store_healthy = healthy
        if healthy:
            log_event(logger, logging.INFO, "execution store is writable again")
        else:
            log_event(logger, logging.ERROR, "execution store failed", error=str(error))
        if self._on_store_health is not None:
            self._on_store_health(healthy)
        if not healthy and (self._probe is None or self._probe.done()):
            self._probe = asyncio.create_task(self._probe_store())

    async def _probe_store(self) -> None:
        failed = ""  # the last unexpected error logged: logged once, not every 0.25 s
        while True:
            await asyncio.sleep(0.25)
            try:
                # The ends first: the store keeps room for them, and a database full of
                # executions whose end is not recorded frees none (retention deletes
                # only executions that ended), so the write check would never pass.
                await self._record_ends()
                began = time.monotonic()
                await self.store.check_writable()
            except StoreUnavailableError:
                continue
            except Exception as exc:  # a bug: ended, the probe would leave health NOT_SERVING
                if f"{type(exc).__name__}: {exc}" != failed:
                    failed = f"{type(exc).__name__}: {exc}"
                    logger.exception("store probe failed")
                continue
            if self._unrecorded:
                # An execution a failure stopped after _record_ends took the ends to
                # record: turned healthy, nothing would record it (it stayed RUNNING).
                continue
            if time.monotonic() - began > STORE_STALL_SECONDS:
                # Written, but as slowly as the stall the watch reported (a throttled
                # disk: every write slow): turned SERVING, health flapped, the watch
                # turning it back a few seconds later, again and again.
                continue
            self._set_store_health(True)
            return

    async def _watch_store(self) -> None:
        """Health NOT_SERVING while a store job has run past STORE_STALL_SECONDS; the
        store probe turns it back once a write goes through again within that time.
        Nothing fails for it: the calls wait for the store as before, but an orchestrator
        is told."""
        while True:
            await asyncio.sleep(STORE_STALL_CHECK_SECONDS)
            since = self.store.busy_since
            if since is None or not self.store_healthy:
                continue
            waited = time.monotonic() - since
            if waited > STORE_STALL_SECONDS:
                self._set_store_health(
                    False,
                    StoreUnavailableError(
                        f"execution store stalled: a job has run {waited:.0f} s (a stalled "
                        "disk, or a lock held outside the server; calls wait for it)"
                    ),
                )

    async def _retention_loop(self) -> None:
        keep = self.settings.retention_seconds
        interval = min(max(keep / 10, 1.0), 3600.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._sweep()
            except StoreUnavailableError:
                pass
            except Exception:  # a bug: ended, retention would never run again
                logger.exception("retention sweep failed")

    async def _sweep(self, batch: int | None = RETENTION_BATCH) -> None:
        """Delete the executions that ended more than retention_seconds ago, `batch` per
        transaction (None: all in one, the quickest, when no flow runs yet), so that the
        flows' writes queued meanwhile are committed between two batches."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.retention_seconds)
        deleted = 0
        while True:
            count = await self._store(self.store.delete_finished_before(cutoff, batch))
            deleted += count
            if batch is None or count < batch:
                break
        if deleted:
            log_event(logger, logging.INFO, "old executions deleted", count=deleted)


__all__ = ["Attachment", "ExecutionManager", "ManagerSettings", "Run", "parse_flow_id"]
