"""The flow engine: an async generator of events. Knows nothing of gRPC.

    engine = FlowEngine(TaskRegistry.with_builtins())
    plan = engine.prepare(flow)               # validates; raises FlowValidationError
    async for event in engine.events(plan, input):   # StreamFlow forwards these
        ...
    execution = await engine.run(plan, input)        # ExecuteFlow: drains events()

Routing is a dictionary built once per flow (task -> (on success, on failure)), and
params are compiled once per flow too, so each step costs the same however long the
flow runs. Sync tasks run in a thread pool, never on the event loop.

Each visit of a task makes one attempt or more (its RetryPolicy); every attempt is a
step, recorded and yielded as it ends, and only the last attempt's outcome routes the
flow. An attempt past the task's timeout is cancelled (async) or abandoned (sync) and
fails "timed out after ...". Past the flow's timeout the running attempt is cut off
the same way and the flow ends TIMED_OUT. A StopHandle ends it CANCELLED.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import reprlib
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from flowsvc.errors import FlowValidationError, Violation
from flowsvc.logs import event as log_event
from flowsvc.models import (
    END,
    Event,
    Execution,
    Flow,
    FlowFinished,
    FlowStarted,
    FlowStatus,
    FrozenDict,
    HistoryView,
    RetryPolicy,
    StepRecord,
    TaskCompleted,
    TaskContext,
    TaskResult,
    TaskStatus,
    clean_text,
    frozen_json,
    has_lone_surrogate,
    new_flow_id,
)
from flowsvc.references import (
    INPUT,
    MissingReferenceError,
    ParamsTooLargeError,
    Ref,
    Template,
    compile_params,
    follow_path,
    json_copy,
)
from flowsvc.registry import TaskRegistry, TaskSpec
from flowsvc.threads import TaskThreads
from flowsvc.validation import (
    MAX_JSON_DEPTH,
    MAX_RESULT_BYTES,
    Limits,
    count_violations,
    too_deep,
    too_large,
    validate_flow,
)

logger = logging.getLogger("flowsvc.engine")


@dataclass(frozen=True, slots=True)
class _Node:
    """A task of a prepared flow with its routes resolved and its params compiled."""

    name: str
    spec: TaskSpec
    template: Template
    timeout_s: float | None
    retry: RetryPolicy
    on_success: str  # a task name or END
    on_failure: str


@dataclass(frozen=True, slots=True)
class PreparedFlow:
    """A validated flow with its routing table, ready to run any number of times."""

    flow: Flow
    max_steps: int
    nodes: Mapping[str, _Node]


class StopHandle:
    """Lets another coroutine stop a running execution (CancelExecution, shutdown)."""

    __slots__ = ("_running", "began", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None
        #: True once the execution's first task attempt has begun: a stop before then
        #: ran nothing (no task, no side effect).
        self.began = False
        # The asyncio task running the execution while one of its tasks runs, else None.
        self._running: asyncio.Task[Any] | None = None

    def request(self, reason: str) -> None:
        """Stop the execution: the running task is cancelled, no further task starts.

        Call it on the event loop's thread (from a sync task: loop.call_soon_threadsafe).
        """
        if self.reason is not None:
            return
        self.reason = reason
        # A task that stops its own execution is not cut short: the check before the
        # next step ends it.
        if self._running is not None and self._running is not asyncio.current_task():
            self._running.cancel()

    def owns_cancellation(self) -> bool:
        """True when a CancelledError came from request() alone (then it is absorbed).

        Like asyncio.timeout(): uncancel() our own cancel; any other cancel (the client
        went away, the server is stopping) still propagates.
        """
        task = self._running
        return self.reason is not None and task is not None and task.uncancel() == 0

    def ignored_cancellation(self) -> bool:
        """True when request() cancelled the running task and it went on and finished
        (it caught the CancelledError). That cancel is absorbed, as owns_cancellation()
        absorbs one that ended the task; the execution stops after this step."""
        task = self._running
        return (
            self.reason is not None
            and task is not None
            and task.cancelling() > 0
            and task.uncancel() == 0  # only the stop's own cancel was pending
        )


class _FlowTimedOut(Exception):
    """The flow's own deadline passed (raised out of an attempt or a backoff wait)."""


class FlowEngine:
    """Runs prepared flows against a TaskRegistry."""

    def __init__(
        self,
        registry: TaskRegistry,
        limits: Limits | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits or Limits()
        # Sync tasks' threads: the server's (sized by config), else a pool of this engine's.
        self._executor = executor or TaskThreads(DEFAULT_SYNC_WORKERS, name="flowsvc-task")
        #: Told of a sync task given up on while it runs (TaskThreads replaces its thread).
        self._abandon: Callable[[Future[Any]], None] | None = getattr(
            self._executor, "abandon", None
        )

    def validate(self, flow: Flow | None) -> list[Violation]:
        """Every violation in `flow` (empty when it would run)."""
        return validate_flow(flow, self.registry, self.limits)

    def count_violations(self, tasks: int, conditions: int) -> list[Violation]:
        """Violations for a flow of that many tasks and conditions over the limits: what
        `validate` alone reports of such a flow, known before the flow is converted."""
        return count_violations(tasks, conditions, self.limits)

    def prepare(self, flow: Flow | None) -> PreparedFlow:
        """Validate `flow` and build its routing table; raise FlowValidationError if bad."""
        violations = validate_flow(flow, self.registry, self.limits)
        if violations:
            raise FlowValidationError(violations)
        assert flow is not None  # validate_flow reports a missing flow
        routes = {c.source_task: c for c in flow.conditions}
        nodes: dict[str, _Node] = {}
        for task in flow.tasks:
            spec = self.registry.get(task.name)
            assert spec is not None  # validate_flow reports unregistered tasks
            cond = routes.get(task.name)
            nodes[task.name] = _Node(
                name=task.name,
                spec=spec,
                template=compile_params(task.params),
                timeout_s=task.timeout_s,
                retry=task.retry,
                on_success=cond.target_task_success if cond else END,
                on_failure=cond.target_task_failure if cond else END,
            )
        max_steps = flow.max_steps or self.limits.default_max_steps
        return PreparedFlow(flow=flow, max_steps=max_steps, nodes=nodes)

    async def run(
        self,
        plan: PreparedFlow,
        flow_input: Mapping[str, Any],
        flow_id: str | None = None,
        stop: StopHandle | None = None,
    ) -> Execution:
        """Run `plan` to the end and return the whole execution (drains events())."""
        history: list[StepRecord] = []
        started: FlowStarted | None = None
        async for ev in self.events(plan, flow_input, flow_id, stop):
            if isinstance(ev, TaskCompleted):
                history.append(ev.record)
            elif isinstance(ev, FlowStarted):
                started = ev
            else:
                assert started is not None
                return Execution(
                    flow_id=ev.flow_id,
                    flow_name=plan.flow.name,
                    status=ev.status,
                    message=ev.message,
                    history=tuple(history),
                    started_at=started.started_at,
                    finished_at=ev.finished_at,
                )
        raise AssertionError("events() ended without FlowFinished")  # pragma: no cover

    async def events(
        self,
        plan: PreparedFlow,
        flow_input: Mapping[str, Any],
        flow_id: str | None = None,
        stop: StopHandle | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Run `plan`, yielding FlowStarted, one TaskCompleted per attempt, FlowFinished.

        `stop.request(reason)` ends the execution CANCELLED: before its next attempt, or
        at once by cancelling the attempt that runs (whose result is then not recorded).
        """
        stop = stop or StopHandle()
        flow_id = flow_id or new_flow_id()
        # Read-only for the tasks (ctx.input): one task cannot change what later ones,
        # and their references, read. Once per execution; most inputs are empty.
        flow_input = frozen_json(flow_input) if flow_input else _NO_INPUT
        flow = plan.flow
        nodes = plan.nodes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flow.timeout_s if flow.timeout_s else None
        started_at = datetime.now(UTC)
        # Logged at INFO: one line per flow, as it ends (and any failed attempt); its start
        # and each successful attempt at DEBUG. At thousands of flows a second, every
        # line emitted is measurable (a JSON line costs ~40 us of the loop in a server).
        logging_info = logger.isEnabledFor(logging.INFO)  # checked once per execution
        if logging_info and logger.isEnabledFor(logging.DEBUG):
            log_event(logger, logging.DEBUG, "flow started", flow_id=flow_id, flow=flow.name)
        me = asyncio.current_task()  # the task running this generator, for stop.request()
        yield FlowStarted(flow_id, flow.name, started_at)

        history: list[StepRecord] = []
        latest: dict[str, StepRecord] = {}  # each task's most recent attempt
        current = flow.start_task
        step = 0
        status: FlowStatus | None = None
        message = ""
        try:
            while status is None:
                node = nodes[current]
                attempt = 0
                while True:  # the attempts of this visit
                    if stop.reason is not None:
                        status = FlowStatus.CANCELLED
                        message = (
                            f"Flow cancelled before step {step + 1} ({current!r}): {stop.reason}"
                        )
                        break
                    if step >= plan.max_steps:
                        status = FlowStatus.FAILED
                        again = " again" if current in latest else ""
                        message = (
                            f"Flow stopped: it reached its max_steps limit of "
                            f"{plan.max_steps} before running {current!r}{again}"
                        )
                        break
                    step += 1
                    attempt += 1
                    stop.began = True
                    stop._running = me
                    try:
                        record, retryable, asked_wait, cut_off = await self._attempt(
                            node, flow_id, flow.name, step, attempt, flow_input, history,
                            latest, deadline,
                        )  # fmt: skip
                        ignored = stop.reason is not None and stop.ignored_cancellation()
                    except asyncio.CancelledError:
                        if not stop.owns_cancellation():
                            raise
                        status = FlowStatus.CANCELLED
                        message = f"Flow cancelled during step {step} ({current!r}): {stop.reason}"
                        break
                    finally:
                        stop._running = None
                    history.append(record)
                    latest[node.name] = record
                    yield TaskCompleted(flow_id, record)
                    if ignored:  # its result stands, and nothing runs after it
                        status = FlowStatus.CANCELLED
                        message = f"Flow cancelled during step {step} ({current!r}): {stop.reason}"
                        break
                    # `cut_off`: the flow's timer stopped the attempt. uvloop's timers count
                    # whole milliseconds, so the clock may read a hair before the deadline.
                    if cut_off or (deadline is not None and loop.time() >= deadline):
                        status, message = FlowStatus.TIMED_OUT, _timed_out(flow)
                        break
                    if not _retry(node.retry, record, retryable, attempt):
                        break
                    if stop.reason is not None:
                        # Stopped while nothing ran to cancel (at the yield, or by the
                        # task itself): no wait, the check before the next attempt ends it.
                        continue
                    # Back off before the next attempt: bounded by the flow's deadline,
                    # cut short by a stop.
                    # At least what the failed call asked for (an HTTP Retry-After);
                    # the server's cap bounds every backoff, the defaults included.
                    delay = node.retry.backoff(attempt)
                    if asked_wait is not None and asked_wait > delay:
                        delay = asked_wait
                    delay = min(delay, self.limits.max_backoff_s)
                    if deadline is not None and loop.time() + delay >= deadline:
                        delay = max(0.0, deadline - loop.time())
                        status, message = FlowStatus.TIMED_OUT, _timed_out(flow)
                    stop._running = me
                    try:
                        await asyncio.sleep(delay)
                    except asyncio.CancelledError:
                        if not stop.owns_cancellation():
                            raise
                        status = FlowStatus.CANCELLED
                        message = f"Flow cancelled while {current!r} waited to retry: {stop.reason}"
                    finally:
                        stop._running = None
                    if status is not None:
                        break
                if status is not None:
                    break
                last = history[-1]
                succeeded = last.status is TaskStatus.SUCCESS
                nxt = node.on_success if succeeded else node.on_failure
                if nxt == END:
                    if succeeded:
                        status = FlowStatus.SUCCEEDED
                        message = (
                            f"Flow executed successfully: {step} task run(s), "
                            f"last task {current!r} succeeded"
                        )
                    else:
                        status = FlowStatus.FAILED
                        message = f"Flow failed: task {current!r} (step {step}) failed: " + (
                            last.error or "no error text"
                        )
                    break
                current = nxt
        except asyncio.CancelledError:
            reason = stop.reason or "its run was cancelled"
            log_ended(
                flow_id, flow.name, FlowStatus.CANCELLED, len(history), started_at, reason=reason
            )
            raise
        finished_at = datetime.now(UTC)
        # The runs recorded: a run a stop cut short is not (its step number is in `message`).
        steps = len(history)
        if logging_info:
            if status is FlowStatus.SUCCEEDED:
                log_ended(flow_id, flow.name, status, steps, started_at, finished_at)
            else:  # why it did not succeed: who stopped it, which task failed, its timeout
                log_ended(
                    flow_id, flow.name, status, steps, started_at, finished_at, reason=message
                )
        yield FlowFinished(flow_id, status, message, finished_at, steps)

    async def _attempt(
        self,
        node: _Node,
        flow_id: str,
        flow_name: str,
        step: int,
        attempt: int,
        flow_input: Mapping[str, Any],
        history: list[StepRecord],
        latest: Mapping[str, StepRecord],
        deadline: float | None,
    ) -> tuple[StepRecord, bool, float | None, bool]:
        """Run one attempt of a task: its record, whether a failure may be retried, the
        wait it asked for before a retry, and whether the flow's deadline cut it off.
        Every outcome is a record (never an exception, but for cancellation)."""
        started_at = datetime.now(UTC)
        t0 = time.perf_counter()
        sync = None if node.spec.is_async else _SyncRun(self._abandon)
        cut_off = False
        try:
            template = node.template
            params = template.params
            if template.renders:  # references to resolve, or objects to copy for this run
                params = template.render(_lookup(flow_input, latest))
        except (MissingReferenceError, ParamsTooLargeError) as exc:
            result = TaskResult.failure(f"cannot resolve params: {exc}", retryable=False)
        else:
            call = self._invoke(
                node, flow_id, flow_name, step, attempt, params, flow_input, history, sync
            )
            if node.timeout_s is None and deadline is None:
                result = await call  # the common case: no timer at all
            else:
                result, cut_off = await self._with_timeouts(node, call, deadline, sync)
        if sync is not None and sync.started_at is not None:
            # A sync task's run starts when a worker thread takes it up: it may have
            # waited for one (a cancelled flow's sync task keeps its thread till it returns).
            started_at, t0 = sync.started_at, sync.t0
        duration = time.perf_counter() - t0
        status = result.status
        assert isinstance(status, TaskStatus)  # TaskResult normalises it
        retryable = result.retryable
        error = None
        if status is TaskStatus.FAILURE and result.error is not None:
            error = clean_text(result.error)
            if len(error) > MAX_ERROR_CHARS:
                # The retry policy reads the whole text, the record keeps its start.
                if any(marker in error for marker in node.retry.non_retryable_errors):
                    retryable = False
                error = f"{error[:MAX_ERROR_CHARS]}... (cut: {len(error):,} characters in all)"
        record = StepRecord(  # positional: a named tuple builds twice as fast without keywords
            step,
            node.name,
            status,
            result.data,
            error,
            started_at,
            duration,
            attempt,
        )
        level = logging.DEBUG if status is TaskStatus.SUCCESS else logging.INFO
        if logger.isEnabledFor(level):  # no keyword dict to build when it is off
            log_event(
                logger,
                level,
                "task finished",
                flow_id=flow_id,
                task=node.name,
                step=step,
                attempt=attempt,
                status=status.value,
                duration_s=round(duration, 6),
                error=record.error,
            )
        return record, retryable, result.retry_after_s, cut_off

    async def _with_timeouts(
        self,
        node: _Node,
        call: Coroutine[Any, Any, TaskResult],
        deadline: float | None,
        sync: _SyncRun | None,
    ) -> tuple[TaskResult, bool]:
        """Await `call` within the task's timeout and the flow's deadline: its result, and
        whether the flow's deadline cut it off.

        The call runs as a task of its own, so that the timer holds even for a task that
        ignores its cancellation (catches CancelledError and goes on): it is left running,
        abandoned like a sync task's thread, and the attempt fails on time.
        """
        loop = asyncio.get_running_loop()
        task_deadline = loop.time() + node.timeout_s if node.timeout_s is not None else None
        when = min(d for d in (task_deadline, deadline) if d is not None)
        attempt = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({attempt}, timeout=max(0.0, when - loop.time()))
        except asyncio.CancelledError:  # the execution is being stopped
            attempt.cancel()
            await _let_go(attempt)
            raise
        if done:
            return attempt.result(), False
        attempt.cancel()
        # A sync task whose thread has returned a coroutine (see _invoke): what runs now
        # is that coroutine, on the loop, cancelled as an async task's is.
        if sync is not None and not (sync.future is not None and sync.future.done()):
            abandoned = (
                " (a sync task's thread cannot be stopped: abandoned)"
                if sync.give_up()
                else " (it never started: every worker thread for sync tasks was busy)"
            )
        elif not await _let_go(attempt):
            abandoned = " (it ignored its cancellation: abandoned)"
        else:
            abandoned = ""
        flow_cut_off = deadline is not None and deadline <= when
        if task_deadline is not None and task_deadline <= when:
            failure = TaskResult.failure(f"timed out after {node.timeout_s:g}s{abandoned}")
            return failure, flow_cut_off
        failure = TaskResult.failure(
            f"timed out: the flow's timeout passed while it ran{abandoned}", retryable=False
        )
        return failure, True

    async def _invoke(
        self,
        node: _Node,
        flow_id: str,
        flow_name: str,
        step: int,
        attempt: int,
        params: Mapping[str, Any],
        flow_input: Mapping[str, Any],
        history: list[StepRecord],
        sync: _SyncRun | None,
    ) -> TaskResult:
        """Call the task; anything but a TaskResult becomes a failure result."""
        spec = node.spec
        args: tuple[Any, ...] = ()
        if spec.takes_context:
            args = (
                TaskContext(
                    flow_id=flow_id,
                    flow_name=flow_name,
                    task=node.name,
                    step=step,
                    input=flow_input,
                    params=params,
                    results=HistoryView(history, len(history)),
                    attempt=attempt,
                ),
            )
        kwargs: dict[str, Any] = {}
        if spec.keyword_params is not None:
            kwargs = (
                dict(params)
                if spec.takes_all_params
                else {k: v for k, v in params.items() if k in spec.keyword_params}
            )
            for name in spec.int_params:  # usually none
                value = kwargs.get(name)
                if type(value) is float and value.is_integer():
                    kwargs[name] = int(value)  # 7.0 from the flow's JSON, 7 for `x: int`
        try:
            if spec.is_async:
                # No empty *args/**kwargs to unpack for a task that takes nothing.
                out = await (spec.fn(*args, **kwargs) if args or kwargs else spec.fn())
            else:
                assert sync is not None
                call = functools.partial(spec.fn, *args, **kwargs) if args or kwargs else spec.fn
                sync.future = self._executor.submit(sync.wrap(call))
                out = await asyncio.wrap_future(sync.future)
                if inspect.isawaitable(out):  # a plain function that returned a coroutine
                    out = await out
        except asyncio.CancelledError as exc:
            me = asyncio.current_task()
            if me is None or me.cancelling():
                if sync is not None:
                    sync.give_up()  # not started yet: it never will be
                raise
            # Nothing cancels this execution: the task's own code raised it.
            return _raised(exc, flow_id, flow_name, node.name, step, attempt)
        except GeneratorExit as exc:
            if exc.__traceback__ is None or exc.__traceback__.tb_next is None:
                raise  # thrown in at our own await: this coroutine is being closed
            # The task's code raised it:
            return _raised(exc, flow_id, flow_name, node.name, step, attempt)
        except BaseException as exc:
            # Whatever the task raises is its failure, not the server's end: its exit(),
            # KeyboardInterrupt (signals never raise them here: the server stops on SIGINT
            # and SIGTERM), or a BaseException of its own. Let through, it would end the
            # execution's drive, and the flow would hang RUNNING.
            return _raised(exc, flow_id, flow_name, node.name, step, attempt)
        if not isinstance(out, TaskResult):
            return TaskResult.failure(
                f"task returned {type(out).__name__}, not a TaskResult: {_shown(out)}"
            )
        data = out.data
        if type(data) is dict and not data:  # the common case: nothing to check
            return out
        try:
            problem = (
                _json_problem(data, "data")
                if isinstance(data, Mapping)
                else f"data is a {type(data).__name__}, not a mapping"
            )
        except Exception as exc:  # a mapping that raises as it is read (a closed shelf)
            return TaskResult.failure(f"task returned data that cannot be read: {_text(exc)}")
        if problem:
            return TaskResult.failure(f"task returned data that is not JSON: {problem}")
        # The result's own copy: a task may keep what it returned (a cache, a running
        # tally) and change it later, which must not change a result already recorded,
        # streamed or answered (the in-memory store kept the task's objects; the history
        # ExecuteFlow answers is built from them once the flow has ended).
        return replace(out, data=json_copy(data))


def _raised(
    exc: BaseException, flow_id: str, flow_name: str, task: str, step: int, attempt: int
) -> TaskResult:
    """The failure of a task that raised `exc` (logged with its traceback, and what
    tells one of its runs from another: the flow, the step and the attempt)."""
    log_event(
        logger,
        logging.WARNING,
        "task raised",
        flow_id=flow_id,
        flow=flow_name,
        task=task,
        step=step,
        attempt=attempt,
        exc_info=exc,
    )
    return TaskResult.failure(_text(exc))


def _text(exc: BaseException) -> str:
    """The text of an exception a task raised, as 'Type: text', or 'Type' alone when it
    has no text (never raising)."""
    try:
        text = str(exc)
    except Exception as err:  # the task's own __str__ is broken: its failure still stands
        text = f"(its text cannot be shown: str() raised {type(err).__name__})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: A task's wrong return value, as its failure shows it: short, and never raising.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 200


def _shown(value: Any) -> str:
    """repr() of what a task returned, cut short; a repr() that raises is replaced
    (reprlib's own fallback names the type)."""
    try:
        text = _SHOWN.repr(value)
    except Exception:  # a container whose own repr machinery fails
        text = f"<{type(value).__name__}>"
    return text[:200]


class _SyncRun:
    """A sync task's attempt: its future in the thread pool, and when a thread started
    it (None while it waits for a free thread)."""

    __slots__ = ("_abandon", "_ran", "future", "started_at", "t0")

    def __init__(self, abandon: Callable[[Future[Any]], None] | None) -> None:
        self._abandon = abandon
        self._ran: bool | None = None  # give_up()'s answer, once given
        self.future: Future[Any] | None = None
        self.started_at: datetime | None = None
        self.t0 = 0.0

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            self.started_at, self.t0 = datetime.now(UTC), time.perf_counter()
            try:
                return fn()
            except (StopIteration, GeneratorExit) as exc:
                # Neither may reach the awaiting coroutine as itself: an asyncio future
                # refuses StopIteration (nothing would wake the flow: it would hang), and
                # a GeneratorExit thrown into a coroutine closes the awaits it passes
                # through instead of raising in them (no handler of the engine's sees it).
                # What PEP 479 does for a generator, and asyncio for a coroutine.
                raise RuntimeError(f"task raised {type(exc).__name__}") from exc

        return run

    def give_up(self) -> bool:
        """Nothing waits for it any more: keep it from starting, or, if a thread runs it
        already (it cannot be stopped), tell the pool. True in that case."""
        if self._ran is None:
            future = self.future
            self._ran = future is not None and not future.cancel()  # cancel: only if queued
            if self._ran and self._abandon is not None:
                self._abandon(future)  # type: ignore[arg-type]
        return self._ran


_NO_INPUT = FrozenDict()

#: Threads for sync tasks of an engine built without a pool (the server passes its own).
DEFAULT_SYNC_WORKERS = 32
#: The longest error text a result keeps (the rest is cut, saying so). It travels in the
#: task's result and again in the flow's final message: with data's 1 MiB, each still
#: fits in a message every client accepts (4 MiB).
MAX_ERROR_CHARS = 64 * 1024
#: How long a cancelled attempt may take to end before it is abandoned.
CANCEL_GRACE_SECONDS = 1.0


async def _let_go(attempt: asyncio.Future[Any]) -> bool:
    """Give a cancelled attempt CANCEL_GRACE_SECONDS to end; True if it did. One that did
    not is abandoned: it may go on, but nothing waits for it or reads its result."""
    if not attempt.done():
        await asyncio.wait({attempt}, timeout=CANCEL_GRACE_SECONDS)
    if not attempt.done():
        attempt.add_done_callback(_forget)
        return False
    _forget(attempt)
    return True


def _forget(attempt: asyncio.Future[Any]) -> None:
    if not attempt.cancelled():
        attempt.exception()  # retrieved: asyncio would log it as never retrieved


def log_ended(
    flow_id: str,
    flow_name: str,
    status: FlowStatus,
    steps: int,
    started_at: datetime,
    finished_at: datetime | None = None,
    **extra: Any,
) -> None:
    """The one INFO line per flow, "flow ended" (also for a flow cut off at shutdown,
    whose drive never gets here)."""
    end = finished_at or datetime.now(UTC)
    log_event(
        logger,
        logging.INFO,
        "flow ended",
        flow_id=flow_id,
        flow=flow_name,
        status=status.value,
        steps=steps,
        duration_s=round((end - started_at).total_seconds(), 6),
        **extra,
    )


def _timed_out(flow: Flow) -> str:
    return f"Flow timed out: its timeout of {flow.timeout_s:g}s passed"


def _lookup(flow_input: Mapping[str, Any], latest: Mapping[str, StepRecord]) -> Any:
    def lookup(ref: Ref) -> Any:
        if ref.root == INPUT:
            return follow_path(flow_input, ref.path, ref)
        record = latest.get(ref.root)
        if record is None:
            raise MissingReferenceError(f"${{{ref.text}}}: {ref.root!r} has not run yet")
        result = {"data": record.data, "status": record.status.value, "error": record.error}
        if not ref.path:
            return result
        return follow_path(result[ref.path[0]], ref.path[1:], ref, ref.path[:1])

    return lookup


def _retry(policy: RetryPolicy, record: StepRecord, retryable: bool, attempt: int) -> bool:
    """Whether the attempt just made should be followed by another."""
    if record.status is TaskStatus.SUCCESS or attempt >= policy.max_attempts or not retryable:
        return False
    error = record.error or ""
    return not any(marker in error for marker in policy.non_retryable_errors)


_SCALARS = (int, float, bool, type(None))
#: From this many bits on, an integer may be past the largest double.
_FLOAT_BITS = 1024


def _overflows(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _json_problem(
    value: Any, path: str, levels: int = MAX_JSON_DEPTH, room: list[int] | None = None
) -> str | None:
    """Where `value` stops being JSON (str keys; str, finite number, bool, null, list,
    dict), nests deeper than `levels` (the deepest every client can read back), or holds
    more than MAX_RESULT_BYTES (`room`: what is left of them, counted as it goes)."""
    if room is None:
        room = [MAX_RESULT_BYTES]
    if isinstance(value, str):
        room[0] -= len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        if room[0] < 0:
            return f"data {too_large()}"
        return f"{path} is a string with a lone surrogate" if has_lone_surrogate(value) else None
    room[0] -= 8
    if room[0] < 0:  # numbers and keys count too, not only strings
        return f"data {too_large()}"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value}, not a JSON number"
    if isinstance(value, int) and value.bit_length() >= _FLOAT_BITS and _overflows(value):
        # A JSON number travels as a double (protobuf's Value): past its range no
        # message could carry it, and the stored result could never be read back.
        return f"{path} is an integer too large for a JSON number ({value.bit_length()} bits)"
    if isinstance(value, _SCALARS):
        return None
    if isinstance(value, Mapping | list | tuple) and levels <= 0:
        return f"{path} {too_deep()}"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a non-string key {key!r}"
            if has_lone_surrogate(key):
                return f"{path} has a key with a lone surrogate: {clean_text(key)!r}"
            room[0] -= len(key) if key.isascii() else len(key.encode())  # UTF-8, as strings
            problem = _json_problem(item, f"{path}.{key}", levels - 1, room)
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{path}.{i}", levels - 1, room)
            if problem:
                return problem
        return None
    return f"{path} is a {type(value).__name__}"
