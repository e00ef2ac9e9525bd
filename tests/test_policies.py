"""Per-task timeouts and retries, the flow's timeout, params that refer to earlier data."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from flowsvc import (
    Condition,
    Flow,
    FlowEngine,
    FlowStatus,
    Task,
    TaskContext,
    TaskRegistry,
    TaskResult,
    TaskStatus,
)
from flowsvc.models import RetryPolicy
from flowsvc.validation import Limits
from tests.support import chain, flow_pb, server_process, to_dict

pb = flow_service_pb2


def timed_then_noop(name: str) -> Flow:
    """`name` with a 0.2 s timeout, its failure routed to `noop`."""
    return Flow(
        "t", name, (Task(name, timeout_s=0.2), Task("noop")), (Condition(name, "end", "noop"),)
    )


def run(registry: TaskRegistry, flow: Flow, flow_input: dict | None = None):
    # Its own thread pool, not asyncio's default one, which asyncio.run() would wait for
    # at exit (a test that abandons a stuck sync task would then wait for it too).
    pool = ThreadPoolExecutor(max_workers=4)
    engine = FlowEngine(registry, executor=pool)
    try:
        return asyncio.run(engine.run(engine.prepare(flow), flow_input or {}))
    finally:
        pool.shutdown(wait=False)


def flaky(registry: TaskRegistry, fail_times: int, name: str = "flaky", **failure) -> list[float]:
    """Register a task failing `fail_times` times, then succeeding; returns call times."""
    calls: list[float] = []

    async def task() -> TaskResult:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= fail_times:
            return TaskResult.failure(f"attempt {len(calls)} failed", **failure)
        return TaskResult.success({"calls": len(calls)})

    registry.register(name, task)
    return calls


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(err).details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


# -- timeouts ---------------------------------------------------------------------------


def slow_task() -> tuple[Callable[[], Awaitable[TaskResult]], list[bool]]:
    """An async task that sleeps 30 s, and the list it appends True to when cancelled."""
    cancelled: list[bool] = []

    async def slow() -> TaskResult:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return TaskResult.success()

    return slow, cancelled


def test_async_task_past_its_timeout_is_cancelled_and_fails(registry: TaskRegistry) -> None:
    slow, cancelled = slow_task()

    registry.register("slow", slow)
    flow = timed_then_noop("slow")
    execution = run(registry, flow)
    first = execution.history[0]
    assert first.status is TaskStatus.FAILURE and first.error == "timed out after 0.2s"
    assert cancelled == [True]
    assert [r.task for r in execution.history] == ["slow", "noop"]  # the failure route


def test_async_task_ignoring_its_cancellation_is_abandoned_at_its_timeout(registry) -> None:
    ignored = []

    async def stubborn() -> TaskResult:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            ignored.append(True)  # and goes on; a second cancel (asyncio.run's) ends it
            await asyncio.sleep(30)
        return TaskResult.success()

    registry.register("stubborn", stubborn)
    flow = timed_then_noop("stubborn")
    execution = run(registry, flow)
    # Waiting for it would have made it a success, 30 s later.
    assert execution.history[0].error == (
        "timed out after 0.2s (it ignored its cancellation: abandoned)"
    )
    assert ignored == [True]
    assert [r.task for r in execution.history] == ["stubborn", "noop"]


def test_a_coroutine_from_a_sync_task_is_cancelled_at_its_timeout_not_abandoned(
    registry,
) -> None:
    """A plain function that returns a coroutine: its thread has returned, and what runs
    past the timeout is the coroutine, on the loop. It is cancelled like an async task's
    (and waited for), and the error does not say a thread was abandoned."""
    slow, cancelled = slow_task()

    def hands_back_a_coroutine():
        return slow()

    registry.register("hands_back", hands_back_a_coroutine)
    execution = run(registry, timed_then_noop("hands_back"))
    assert execution.history[0].error == "timed out after 0.2s"
    assert cancelled == [True]  # by the time the attempt failed
    assert [r.task for r in execution.history] == ["hands_back", "noop"]


def test_sync_task_past_its_timeout_is_abandoned_and_the_flow_moves_on(registry) -> None:
    release = threading.Event()

    def stuck() -> TaskResult:
        release.wait(30)
        return TaskResult.success()

    registry.register("stuck", stuck)
    flow = timed_then_noop("stuck")
    try:
        execution = run(registry, flow)
    finally:
        release.set()
    error = execution.history[0].error
    assert error.startswith("timed out after 0.2s") and "abandoned" in error
    assert execution.history[-1].task == "noop"
    assert execution.status is FlowStatus.SUCCEEDED


def _busy_pool() -> tuple[ThreadPoolExecutor, threading.Event]:
    """A one-thread pool whose thread is taken (as by a cancelled flow's sync task, which
    keeps its thread until it returns), and the event that frees it."""
    pool = ThreadPoolExecutor(max_workers=1)
    free = threading.Event()
    pool.submit(free.wait, 30)
    return pool, free


def test_sync_task_timing_out_while_it_waits_for_a_thread_never_runs(registry) -> None:
    ran = []
    registry.register("quick", lambda: ran.append(1) or TaskResult.success())
    flow = timed_then_noop("quick")
    pool, free = _busy_pool()
    try:
        engine = FlowEngine(registry, executor=pool)
        execution = asyncio.run(engine.run(engine.prepare(flow), {}))
    finally:
        free.set()
    error = execution.history[0].error
    assert error == (
        "timed out after 0.2s (it never started: every worker thread for sync tasks was busy)"
    )
    assert execution.history[0].status is TaskStatus.FAILURE
    pool.submit(lambda: None).result(timeout=10)  # the thread is free, and went past it
    pool.shutdown()
    assert ran == []


def test_sync_task_run_is_timed_from_when_a_thread_takes_it_up(registry) -> None:
    """Its started_at and duration are its run's, not its wait for a free thread."""
    submitted = threading.Event()

    class Pool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
            future = super().submit(fn, *args, **kwargs)
            submitted.set()
            return future

    def quick() -> TaskResult:
        return TaskResult.success()

    registry.register("quick", quick)
    pool = Pool(max_workers=1)
    free = threading.Event()
    pool.submit(free.wait, 30)
    submitted.clear()
    engine = FlowEngine(registry, executor=pool)

    async def main():
        plan = engine.prepare(Flow("t", "quick", (Task("quick"),)))
        flow = asyncio.create_task(engine.run(plan, {}))
        deadline = time.monotonic() + 10
        while not submitted.is_set():  # until it is queued behind the busy thread
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        freed_at = datetime.now(UTC)
        free.set()
        return freed_at, await flow, datetime.now(UTC)

    try:
        freed_at, execution, ended_at = asyncio.run(main())
    finally:
        free.set()
        pool.shutdown()
    record = execution.history[0]
    assert record.started_at >= freed_at
    assert record.duration_s <= (ended_at - freed_at).total_seconds()


def test_flow_timeout_ends_the_flow_timed_out(registry: TaskRegistry) -> None:
    flow = Flow(
        "t",
        "noop",
        (Task("noop"), Task("sleep", params={"seconds": 30})),
        (Condition("noop", "sleep", "end"),),
        timeout_s=0.3,
    )
    execution = run(registry, flow)
    assert execution.status is FlowStatus.TIMED_OUT
    assert "0.3s" in execution.message
    assert [r.task for r in execution.history] == ["noop", "sleep"]
    assert "flow's timeout" in execution.history[-1].error


async def test_a_flow_timeout_ends_the_flow_timed_out_under_uvloop(tmp_path: Path) -> None:
    # uvloop's timers count whole milliseconds: the flow's timer could fire a fraction of
    # a millisecond before loop.time() reached the deadline, and the engine, reading the
    # clock again, took the cut-off attempt for a plain failure: about one flow in five
    # went on along its failure route after its timeout, ending SUCCEEDED or FAILED.
    flow = flow_pb(
        ["noop", ("sleep", {"seconds": 30}), "echo"],
        {"noop": ("sleep", "end"), "sleep": ("end", "echo")},
    )
    flow.timeout.FromMilliseconds(50)
    request = flow_service_pb2.ExecuteFlowRequest(flow=flow)
    with server_process(tmp_path, "--event-loop", "uvloop", "--db", ":memory:") as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            for _ in range(40):
                response = await stub.ExecuteFlow(request, timeout=30)
                ran = [r.task for r in response.execution_history]
                assert (flow_pb2.FlowStatus.Name(response.status), ran) == (
                    "FLOW_STATUS_TIMED_OUT",
                    ["noop", "sleep"],
                ), response.message


def test_flow_timeout_during_a_backoff_wait(registry: TaskRegistry) -> None:
    flaky(registry, fail_times=5)
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=10)
    flow = Flow("t", "flaky", (Task("flaky", retry=policy),), timeout_s=0.2)
    execution = run(registry, flow)
    assert execution.status is FlowStatus.TIMED_OUT
    assert len(execution.history) == 1  # the 10 s backoff was cut short by the flow timeout


# -- retries ----------------------------------------------------------------------------


def test_retries_until_success_recording_every_attempt(registry: TaskRegistry) -> None:
    calls = flaky(registry, fail_times=2)
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, backoff_multiplier=2.0,
                         max_backoff_s=0.08)  # fmt: skip
    execution = run(registry, Flow("t", "flaky", (Task("flaky", retry=policy),)))
    assert [(r.attempt, r.status, r.error) for r in execution.history] == [
        (1, TaskStatus.FAILURE, "attempt 1 failed"),
        (2, TaskStatus.FAILURE, "attempt 2 failed"),
        (3, TaskStatus.SUCCESS, None),
    ]
    assert [r.step for r in execution.history] == [1, 2, 3]
    assert execution.status is FlowStatus.SUCCEEDED
    # Waits of 0.05 s, then 0.1 s capped to 0.08 s (lower bounds only: never flaky).
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.08


def test_a_failure_that_asks_for_a_wait_is_retried_no_sooner(registry: TaskRegistry) -> None:
    """TaskResult.retry_after_s (an HTTP Retry-After) raises the wait before the retry
    above the policy's backoff; a shorter one leaves the backoff as it is."""
    calls = flaky(registry, fail_times=1, retry_after_s=0.3)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    execution = run(registry, Flow("t", "flaky", (Task("flaky", retry=policy),)))
    assert execution.status is FlowStatus.SUCCEEDED
    assert calls[1] - calls[0] >= 0.3  # lower bound only: never flaky

    calls = flaky(registry, fail_times=1, name="shorter", retry_after_s=0.01)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.2)
    execution = run(registry, Flow("t", "shorter", (Task("shorter", retry=policy),)))
    assert execution.status is FlowStatus.SUCCEEDED
    assert calls[1] - calls[0] >= 0.2


def test_the_wait_a_failure_asks_for_is_bounded_by_the_server_cap(registry) -> None:
    """A day's Retry-After waits no longer than the server's --max-backoff-seconds."""
    calls = flaky(registry, fail_times=1, retry_after_s=86400.0)
    engine = FlowEngine(registry, limits=dataclasses.replace(Limits(), max_backoff_s=0.05))
    flow = Flow("t", "flaky", (Task("flaky", retry=RetryPolicy(max_attempts=2)),))

    async def main() -> FlowStatus:
        # Uncapped, the wait would be a day (and the 1 s default backoff): 60 s is far.
        execution = await asyncio.wait_for(engine.run(engine.prepare(flow), {}), 60)
        return execution.status

    assert asyncio.run(main()) is FlowStatus.SUCCEEDED
    assert len(calls) == 2


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "5", True, None])
def test_a_wait_that_is_not_a_number_of_seconds_is_refused(value) -> None:
    if value is None:  # no wait asked for
        assert TaskResult.failure("busy", retry_after_s=None).retry_after_s is None
        return
    with pytest.raises(ValueError, match="retry_after_s must be a finite number"):
        TaskResult.failure("busy", retry_after_s=value)
    with pytest.raises(ValueError, match="retry_after_s must be a finite number"):
        TaskResult(status="failure", error="busy", retry_after_s=value)


def test_a_task_is_told_which_attempt_it_is(registry: TaskRegistry) -> None:
    """ctx.attempt: 1, then 2, 3 as the policy retries it; 1 again on the next step."""
    seen: list[tuple[str, int, int]] = []

    def counted(ctx: TaskContext) -> TaskResult:
        seen.append((ctx.task, ctx.step, ctx.attempt))
        return TaskResult.failure("again") if ctx.attempt < 3 else TaskResult.success()

    def after(ctx: TaskContext) -> TaskResult:
        seen.append((ctx.task, ctx.step, ctx.attempt))
        return TaskResult.success()

    registry.register("counted", counted)
    registry.register("after", after)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0)
    flow = Flow(
        "t", "counted", (Task("counted", retry=policy), Task("after")),
        (Condition("counted", "after", "end"),),
    )  # fmt: skip
    execution = run(registry, flow)
    assert execution.status is FlowStatus.SUCCEEDED
    assert seen == [("counted", 1, 1), ("counted", 2, 2), ("counted", 3, 3), ("after", 4, 1)]


def test_only_the_last_attempt_routes(registry: TaskRegistry) -> None:
    flaky(registry, fail_times=9)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0)
    flow = Flow(
        "t", "flaky", (Task("flaky", retry=policy), Task("echo"), Task("noop")),
        (Condition("flaky", "noop", "echo"),),
    )  # fmt: skip
    execution = run(registry, flow)
    assert [(r.task, r.attempt) for r in execution.history] == [
        ("flaky", 1), ("flaky", 2), ("flaky", 3), ("echo", 1),
    ]  # fmt: skip


def test_failures_marked_not_retryable_are_not_retried(registry: TaskRegistry) -> None:
    flaky(registry, fail_times=9, name="final", retryable=False)
    flaky(registry, fail_times=9, name="declined")
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0, non_retryable_errors=("failed",))
    for name in ("final", "declined"):
        retry = policy if name == "declined" else RetryPolicy(max_attempts=5, initial_backoff_s=0)
        execution = run(registry, Flow("t", name, (Task(name, retry=retry),)))
        assert len(execution.history) == 1, name


def test_timeouts_are_retried(registry: TaskRegistry) -> None:
    attempts = []

    async def slow_then_fast() -> TaskResult:
        attempts.append(1)
        if len(attempts) == 1:
            await asyncio.sleep(30)
        return TaskResult.success()

    registry.register("slow_then_fast", slow_then_fast)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0)
    execution = run(
        registry,
        Flow("t", "slow_then_fast", (Task("slow_then_fast", timeout_s=0.2, retry=policy),)),
    )
    assert [r.status for r in execution.history] == [TaskStatus.FAILURE, TaskStatus.SUCCESS]


def test_every_attempt_counts_toward_max_steps(registry: TaskRegistry) -> None:
    flaky(registry, fail_times=9)
    policy = RetryPolicy(max_attempts=9, initial_backoff_s=0)
    execution = run(registry, Flow("t", "flaky", (Task("flaky", retry=policy),), max_steps=4))
    assert len(execution.history) == 4 and execution.status is FlowStatus.FAILED


async def test_attempts_are_streamed_as_they_happen(stub, registry) -> None:
    flaky(registry, fail_times=2)
    flow = flow_pb(["flaky"])
    flow.tasks[0].retry.max_attempts = 3
    flow.tasks[0].retry.initial_backoff.FromMilliseconds(10)
    messages = [m async for m in stub.StreamFlow(pb.StreamFlowRequest(flow=flow))]
    results = [m.task_result for m in messages if m.HasField("task_result")]
    assert [(r.attempt, r.status) for r in results] == [
        (1, flow_pb2.TASK_STATUS_FAILURE),
        (2, flow_pb2.TASK_STATUS_FAILURE),
        (3, flow_pb2.TASK_STATUS_SUCCESS),
    ]
    got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=messages[0].started.flow_id))
    assert got.execution.flow.tasks[0].retry.max_attempts == 3  # the policy is kept too


async def test_caps_on_policies_are_validation_errors(stub) -> None:
    flow = flow_pb(["noop", "echo"], {"noop": ("echo", "end")})
    flow.timeout.FromSeconds(10**7)
    noop, echo = flow.tasks
    noop.retry.max_attempts = 10**6
    noop.retry.backoff_multiplier = 0.5
    noop.retry.initial_backoff.FromSeconds(10**6)
    noop.timeout.FromSeconds(-1)
    echo.timeout.FromSeconds(10**6)
    echo.retry.max_backoff.FromSeconds(10**6)
    echo.retry.non_retryable_errors.extend(["denied", ""])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert set(found) == {
        "flow.tasks[0].timeout",
        "flow.tasks[0].retry.max_attempts",
        "flow.tasks[0].retry.initial_backoff",
        "flow.tasks[0].retry.backoff_multiplier",
        "flow.tasks[1].timeout",
        "flow.tasks[1].retry.max_backoff",
        "flow.tasks[1].retry.non_retryable_errors[1]",
        "flow.timeout",
    }
    assert "cap of 10" in found["flow.tasks[0].retry.max_attempts"]


async def test_a_value_just_over_a_cap_is_not_shown_equal_to_it(stub) -> None:
    """A duration a nanosecond over its cap is refused, and the message shows it whole
    (not "3600s is over this server's cap of 3600s")."""
    flow = flow_pb(["noop"])
    flow.tasks[0].timeout.FromNanoseconds(3600 * 10**9 + 1)
    flow.tasks[0].retry.max_backoff.FromNanoseconds(3600 * 10**9 + 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
    found = violations(info.value)
    assert found["flow.tasks[0].timeout"].startswith("3600.000000001s is over")
    assert found["flow.tasks[0].retry.max_backoff"].startswith("3600.000000001s is over")
    flow.tasks[0].timeout.FromSeconds(10**7)  # a round number is still shown short
    validated = await stub.ValidateFlow(pb.ValidateFlowRequest(flow=flow))
    shown = {v.field: v.description for v in validated.violations}
    assert shown["flow.tasks[0].timeout"] == "10000000s is over this server's cap of 3600s"


@pytest.mark.parametrize(
    ("seconds", "nanos", "shown"),
    [
        (315576000001, 0, "315576000001s is over this server's cap of 3600s"),
        (10**15 + 2, 0, "1000000000000002.0s is over this server's cap of 3600s"),
        (2**63 - 1, 0, "9.223372036854776e+18s is over this server's cap of 3600s"),
        (-(2**63), 0, "must be positive, not -9.223372036854776e+18s"),
        (-5, 0, "must be positive, not -5s"),
        (-1, -500_000_000, "must be positive, not -1.5s"),
    ],
)
async def test_durations_are_shown_as_they_were_written(stub, seconds, nanos, shown) -> None:
    """Whole seconds whole, whatever their size, and a value past a double's exact
    integers in full: before, "3.15576e+11s" or "315576000001.0s", and "-9.22337e+18s"
    for one but "9.223372036854776e+18s" for its opposite (found by p50)."""
    flow = flow_pb(["noop"])
    flow.tasks[0].timeout.seconds, flow.tasks[0].timeout.nanos = seconds, nanos
    validated = await stub.ValidateFlow(pb.ValidateFlowRequest(flow=flow))
    assert {v.field: v.description for v in validated.violations} == {
        "flow.tasks[0].timeout": shown
    }


async def test_non_retryable_errors_are_bounded(stub) -> None:
    """Each failure is searched for every marker: 200,000 markers and a 60 KB error held
    the event loop (every flow, the health check) for 7 s per failed attempt."""
    flow = flow_pb(["noop"])
    flow.tasks[0].retry.non_retryable_errors.extend(f"e{i}" for i in range(100))
    assert (await stub.ValidateFlow(pb.ValidateFlowRequest(flow=flow))).valid
    flow.tasks[0].retry.non_retryable_errors.append("one too many")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert set(found) == {"flow.tasks[0].retry.non_retryable_errors"}
    assert found["flow.tasks[0].retry.non_retryable_errors"] == "101 strings: at most 100"


# -- data between tasks -----------------------------------------------------------------


def test_references_keep_types_and_interpolate_text(registry: TaskRegistry) -> None:
    seen: list[TaskContext] = []

    def look(ctx: TaskContext) -> TaskResult:
        seen.append(ctx)
        return TaskResult.success(dict(ctx.params))

    registry.register("look", look)
    registry.register("make", lambda: TaskResult.success({"items": [{"id": 7}], "n": 2.5}))
    params = {
        "customer": "${input.customer_id}",
        "profile": "${input.profile}",
        "raw": "${task1.data.raw_data}",
        "first_id": "${make.data.items.0.id}",
        "line": "id=${input.customer_id} n=${make.data.n} items=${make.data.items}",
        "status": "${make.status}",
        "literal": "costs $${price}",
        "nested": {"deep": ["${input.customer_id}"]},
    }
    flow = Flow(
        "refs", "task1",
        (Task("task1", params={"delay_seconds": 0}), Task("make"), Task("look", params=params)),
        (Condition("task1", "make", "end"), Condition("make", "look", "end")),
    )  # fmt: skip
    execution = run(registry, flow, {"customer_id": 42, "profile": {"tier": "gold"}})
    assert execution.status is FlowStatus.SUCCEEDED, execution.message
    assert seen[0].params == {
        "customer": 42,
        "profile": {"tier": "gold"},
        "raw": "data",
        "first_id": 7,
        "line": 'id=42 n=2.5 items=[{"id": 7}]',
        "status": "success",
        "literal": "costs ${price}",
        "nested": {"deep": [42]},
    }
    assert seen[0].input == {"customer_id": 42, "profile": {"tier": "gold"}}
    assert [r.task for r in seen[0].results] == ["task1", "make"]


def test_an_escaped_reference_is_literal_text_in_params_without_references(
    registry: TaskRegistry,
) -> None:
    seen: list[TaskContext] = []
    registry.register("look", lambda ctx: seen.append(ctx) or TaskResult.success())
    params = {"x": "$${input.n}", "nested": {"l": ["cost: $${price}", 3]}}
    execution = run(registry, Flow("esc", "look", (Task("look", params=params),)), {"n": 1})
    assert execution.status is FlowStatus.SUCCEEDED, execution.message
    assert seen[0].params == {"x": "${input.n}", "nested": {"l": ["cost: ${price}", 3]}}


async def test_a_number_param_given_text_is_refused_unless_a_whole_reference(stub) -> None:
    """Text around a reference, or an escaped one, is always text: sleep's `seconds` is
    refused before running. One whole reference brings its own value: it is checked when
    the task runs."""
    flow = chain(("sleep", {"seconds": "1${input.s}"}), ("task2", {"delay_seconds": "$${a}"}))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
    assert violations(info.value) == {
        "flow.tasks[0].params.seconds": "must be number, not string",
        "flow.tasks[1].params.delay_seconds": "must be number, not string",
    }
    request = pb.ExecuteFlowRequest(flow=chain(("sleep", {"seconds": "${input.s}"})))
    request.input.update({"s": 0})
    response = await stub.ExecuteFlow(request, timeout=10)
    assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED, response.message


def test_whole_numbers_are_written_whole_inside_text(registry: TaskRegistry) -> None:
    # Through gRPC every JSON number is a float (protobuf Struct): a client's 42 must still
    # make "/customers/42", not "/customers/42.0".
    seen: list[TaskContext] = []
    registry.register("look", lambda ctx: seen.append(ctx) or TaskResult.success())
    params = {
        "url": "/customers/${input.id}",
        "line": "obj=${input.obj} big=${input.big} neg=${input.neg} half=${input.half}",
        "whole": "${input.id}",  # a whole reference keeps the value as it is
    }
    flow = Flow("nums", "look", (Task("look", params=params),), ())
    flow_input = {"id": 42.0, "obj": {"n": 3.0, "l": [1.0, 0.5]}, "big": 2.0**60,
                  "neg": -7.0, "half": 0.5}  # fmt: skip
    execution = run(registry, flow, flow_input)
    assert execution.status is FlowStatus.SUCCEEDED, execution.message
    assert seen[0].params == {
        "url": "/customers/42",
        "line": 'obj={"n": 3, "l": [1, 0.5]} big=1.152921504606847e+18 neg=-7 half=0.5',
        "whole": 42.0,
    }


def test_missing_reference_at_run_time_fails_the_task_clearly(registry) -> None:
    ran = []
    registry.register("never", lambda ctx: ran.append(1) or TaskResult.success())
    flow = Flow(
        "t", "echo",
        (Task("echo"), Task("never", params={"x": "${echo.data.input.absent}"},
                            retry=RetryPolicy(max_attempts=3, initial_backoff_s=0))),
        (Condition("echo", "never", "end"),),
    )  # fmt: skip
    execution = run(registry, flow)
    failed = execution.history[-1]
    assert failed.task == "never" and failed.status is TaskStatus.FAILURE
    assert "echo.data.input has no key 'absent'" in failed.error
    assert ran == [] and len(execution.history) == 2  # not called, and not retried


def test_a_task_in_a_loop_may_refer_to_its_own_earlier_run(registry: TaskRegistry) -> None:
    flow = Flow(
        "loop", "noop",
        (Task("noop"), Task("echo", params={"previous": "${echo.data}"})),
        (Condition("noop", "echo", "end"), Condition("echo", "echo", "end")),
    )  # fmt: skip
    assert FlowEngine(registry).validate(flow) == []
    # Without the loop, `echo` cannot have run before itself.
    flow = Flow(flow.name, flow.start_task, flow.tasks, flow.conditions[:1])
    (violation,) = FlowEngine(registry).validate(flow)
    assert violation.field == "flow.tasks[1].params.previous"


async def test_reference_to_a_task_that_cannot_have_run_is_invalid(stub) -> None:
    flow = chain(
        ("echo", {"x": "${task2.data.processed_data}", "ok": "${input.anything}"}),
        ("task2", {"delay_seconds": "${ghost.data}"}),
        ("sleep", {"seconds": "${oops"}),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert set(found) == {
        "flow.tasks[0].params.x",
        "flow.tasks[1].params.delay_seconds",
        "flow.tasks[2].params.seconds",
    }
    assert "'task2', which cannot have run before 'echo'" in found["flow.tasks[0].params.x"]
    assert "neither 'input' nor a task" in found["flow.tasks[1].params.delay_seconds"]
    assert "closing" in found["flow.tasks[2].params.seconds"]


async def test_many_unclosed_references_are_refused_at_once(stub, health_stub) -> None:
    # Each "${" without a "}" used to start a scan to the end of the string again: a
    # 100 KB param took the event loop for about half a minute (health and every other
    # call waited), a 2 MB one for hours.
    flow = chain(("echo", {"x": "${" * 50_000}))
    # (Bounded by the calls' deadlines: no timed assertion beyond them.)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    checked = await stub.ValidateFlow(pb.ValidateFlowRequest(flow=flow), timeout=5)
    assert [v.field for v in checked.violations] == ["flow.tasks[0].params.x"]
    assert "without its closing" in checked.violations[0].description
    served = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert served.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "param",
    ["${" * 50_000, "${" + "x." * 50_000 + "}", "${task2." + "y" * 100_000 + "}"],
    ids=["unclosed", "empty-segment", "after-task-name"],
)
async def test_a_long_bad_reference_is_shown_cut_short(stub, param: str) -> None:
    # The whole param used to be echoed: the violation alone outgrew the BadRequest
    # budget, so the detail said only "... and 1 more violation(s)".
    flow = chain(("echo", {"x": param}), "task2")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(info.value)
    assert list(found) == ["flow.tasks[0].params.x"]
    assert len(found["flow.tasks[0].params.x"]) < 200
    checked = await stub.ValidateFlow(pb.ValidateFlowRequest(flow=flow), timeout=10)
    assert [len(v.description) < 200 for v in checked.violations] == [True]


def test_a_long_missing_reference_fails_its_task_with_a_short_error(registry) -> None:
    path = ".".join(["a"] * 100_000)
    flow = Flow("f", "echo", (Task("echo", params={"x": "${input." + path + "}"}),), ())
    record = run(registry, flow, {"a": {}}).history[0]
    assert record.status is TaskStatus.FAILURE
    assert "has no key 'a'" in (record.error or "") and len(record.error or "") < 300


@pytest.mark.parametrize(
    "index", ["\u00b2", "\u0661", "\u0663"], ids=["superscript-2", "arabic-1", "arabic-3"]
)
async def test_a_list_index_that_is_not_ascii_digits_fails_the_task_not_the_rpc(
    stub, index: str
) -> None:
    # str.isdigit() is true for a superscript two and an Arabic-Indic one, which int()
    # then refused (the superscript) or read as a number (the Arabic-Indic one as 1): the
    # first ended the call INTERNAL and the execution INTERRUPTED.
    flow = chain(("echo", {"x": "${input.items." + index + "}"}))
    request = pb.ExecuteFlowRequest(flow=flow)
    request.input.update({"items": [10, 20, 30, 40]})
    done = await stub.ExecuteFlow(request, timeout=10)
    assert done.status == flow_pb2.FLOW_STATUS_FAILED
    (attempt,) = done.execution_history
    assert attempt.error == (
        f"cannot resolve params: ${{input.items.{index}}}: input.items is a list of 4; "
        f"no index {index!r}"
    )


@pytest.mark.parametrize(
    ("param", "value"),
    [("${input.big}" * 300, "x" * 100_000), (["${input.big}"] * 300, [[1] * 1000] * 100)],
    ids=["text", "whole"],
)
async def test_params_that_references_would_blow_up_fail_the_task(
    stub, param: object, value: object
) -> None:
    # A reference repeated in a param was replaced each time: a 100 KB input named 300
    # times made a 30 MB param (or 30 million copied list items), and a 4 MB request
    # could ask the server for hundreds of gigabytes. One render is bounded; past the
    # bound the task fails, not retried, and the server goes on.
    flow = chain(("echo", {"x": param}))
    flow.tasks[0].retry.max_attempts = 3
    request = pb.ExecuteFlowRequest(flow=flow)
    request.input.update({"big": value})
    done = await stub.ExecuteFlow(request, timeout=10)
    assert done.status == flow_pb2.FLOW_STATUS_FAILED
    (attempt,) = done.execution_history
    assert attempt.error.startswith("cannot resolve params: ")
    assert "more than 4,194,304" in attempt.error


async def test_builtin_tasks_refuse_a_param_they_do_not_take(stub) -> None:
    # A typo would otherwise be ignored: `secs` would sleep the default second.
    flow = chain(
        ("sleep", {"secs": 5}),
        ("fail", {"mesage": "x"}),
        ("task1", {"delay": 0}),
        ("noop", {"x": 1}),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(info.value) == {
        "flow.tasks[0].params.secs": "is not a param of this task (it takes: seconds)",
        "flow.tasks[1].params.mesage": "is not a param of this task (it takes: message)",
        "flow.tasks[2].params.delay": "is not a param of this task (it takes: delay_seconds)",
        "flow.tasks[3].params.x": "is not a param of this task (it takes: none)",
    }
    flow = chain(("sleep", {"seconds": "5"}), ("task2", {"delay_seconds": -1}))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
    assert violations(info.value) == {
        "flow.tasks[0].params.seconds": "must be number, not string",
        "flow.tasks[1].params.delay_seconds": "must be at least 0, not -1",
    }
    # Known only at run time (a reference): the task fails, and no retry repeats it.
    flow = chain(("sleep", {"seconds": "${input.wait}"}))
    flow.tasks[0].retry.max_attempts = 3
    request = pb.ExecuteFlowRequest(flow=flow)
    request.input.update({"wait": -1})
    done = await stub.ExecuteFlow(request)
    (attempt,) = done.execution_history
    assert attempt.error == "param 'seconds' must be a non-negative number, not -1.0"


async def test_params_schema_is_listed_and_enforced(stub, registry) -> None:
    async def typed(*, count: int, label: str = "x", tags: list[str] | None = None) -> TaskResult:
        """A task with declared params."""
        return TaskResult.success({"count": count, "label": label})

    registry.register("typed", typed)
    tasks = {t.name: t for t in (await stub.ListTasks(pb.ListTasksRequest())).tasks}
    schema = to_dict(tasks["typed"].params_schema)
    assert schema["required"] == ["count"]
    assert schema["properties"]["count"] == {"type": "integer"}
    assert schema["properties"]["label"] == {"type": "string", "default": "x"}
    assert schema["additionalProperties"] is False
    assert to_dict(tasks["http"].params_schema)["required"] == ["url"]

    ok = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain(("typed", {"count": 3}))))
    assert to_dict(ok.execution_history[0].data) == {"count": 3.0, "label": "x"}
    bad = chain(("typed", {"label": 5, "colour": "red"}))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=bad))
    found = violations(info.value)
    assert set(found) == {
        "flow.tasks[0].params.count",
        "flow.tasks[0].params.colour",
        "flow.tasks[0].params.label",
    }
    assert "required" in found["flow.tasks[0].params.count"]
    assert "must be string" in found["flow.tasks[0].params.label"]


def test_a_backoff_cap_below_the_defaults_refuses_no_flow_and_bounds_every_wait(
    registry: TaskRegistry,
) -> None:
    """Defaults (1 s, then up to 60 s) are lowered to a lower cap, not refused; a value
    the flow asks for over the cap is refused."""
    from flowsvc import FlowValidationError
    from flowsvc.validation import Limits

    attempts = []

    def flaky() -> TaskResult:
        attempts.append(time.monotonic())
        return TaskResult.failure("try again")

    registry.register("flaky", flaky)
    engine = FlowEngine(registry, Limits(max_backoff_s=0.01))
    engine.prepare(Flow("plain", "noop", (Task("noop"),)))  # no retry policy at all
    retried = Flow("r", "flaky", (Task("flaky", retry=RetryPolicy(max_attempts=3)),))
    execution = asyncio.run(engine.run(engine.prepare(retried), {}))
    assert [r.attempt for r in execution.history] == [1, 2, 3]
    # The default 1 s, then 2 s, would show; the cap makes both waits 0.01 s.
    assert attempts[-1] - attempts[0] < 1.0
    asking = RetryPolicy(max_attempts=2, max_backoff_s=90)
    with pytest.raises(FlowValidationError) as info:
        engine.prepare(Flow("x", "flaky", (Task("flaky", retry=asking),)))
    assert [v.field for v in info.value.violations] == ["flow.tasks[0].retry.max_backoff"]
    # Shown as asked: "1s is over ..." read as a contradiction, 1 s itself being accepted.
    just_over = RetryPolicy(max_attempts=2, initial_backoff_s=1.000000001)
    with pytest.raises(FlowValidationError) as info:
        engine.prepare(Flow("x", "flaky", (Task("flaky", retry=just_over),)))
    assert info.value.violations[0].description == (
        "1.000000001s is over this server's cap of 0.01s"
    )


@pytest.mark.parametrize(("multiplier", "attempt"), [(2.0, 1100), (100.0, 200)])
def test_backoff_of_a_late_attempt_is_the_max_not_an_overflow(multiplier, attempt) -> None:
    policy = RetryPolicy(max_attempts=5000, backoff_multiplier=multiplier, max_backoff_s=7)
    assert policy.backoff(attempt) == 7
