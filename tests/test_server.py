"""ExecuteFlow and StreamFlow over a real server: streaming, cancellation, threads, logs."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc
from grpc_health.v1 import health_pb2

from flowsvc import TaskContext, TaskResult
from flowsvc.config import Settings
from flowsvc.server import build_server
from tests.support import chain, flow_pb, to_dict


async def test_failed_task_is_not_an_rpc_error(stub) -> None:
    flow = chain("noop", ("fail", {"message": "card declined"}), "echo")
    response = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=flow), timeout=10)
    assert response.status == flow_pb2.FLOW_STATUS_FAILED
    assert [r.task for r in response.execution_history] == ["noop", "fail"]
    failed = response.execution_history[1]
    assert failed.status == flow_pb2.TASK_STATUS_FAILURE
    assert failed.error == "card declined"
    assert "card declined" in response.message


async def test_a_task_calling_exit_or_cancelling_itself_fails_and_the_server_serves_on(
    stub, registry
) -> None:
    async def quits() -> TaskResult:
        raise SystemExit(3)

    def interrupts() -> TaskResult:
        raise KeyboardInterrupt

    async def cancels_itself() -> TaskResult:
        raise asyncio.CancelledError("my own")

    for name, fn in (("quits", quits), ("interrupts", interrupts), ("cancels", cancels_itself)):
        registry.register(name, fn)
        flow = chain(name)
        response = await stub.ExecuteFlow(
            flow_service_pb2.ExecuteFlowRequest(flow=flow), timeout=10
        )
        assert response.status == flow_pb2.FLOW_STATUS_FAILED, response.message
        assert response.execution_history[0].status == flow_pb2.TASK_STATUS_FAILURE
    fine = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")))
    assert fine.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_a_params_check_calling_exit_or_cancelling_itself_is_skipped_and_the_server_serves_on(
    stub, registry
) -> None:
    # "One that raises is logged and skipped": a check's exit() or KeyboardInterrupt
    # stopped the whole server, and its own CancelledError left the call unanswered.
    def quits(params):
        raise SystemExit(3)

    def interrupts(params):
        raise KeyboardInterrupt

    def cancels_itself(params):
        raise asyncio.CancelledError("my own")

    def task(ctx: TaskContext) -> TaskResult:
        return TaskResult.success({"ran": True})

    for name, check in (("quits", quits), ("interrupts", interrupts), ("cancels", cancels_itself)):
        registry.register(name, task, check=check)
        flow = chain((name, {"x": 1}))
        valid = await stub.ValidateFlow(flow_service_pb2.ValidateFlowRequest(flow=flow), timeout=10)
        assert valid.valid
        response = await stub.ExecuteFlow(
            flow_service_pb2.ExecuteFlowRequest(flow=flow), timeout=10
        )
        assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED, response.message
    fine = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")))
    assert fine.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_history_is_a_list_with_repeats_in_order(stub, registry) -> None:
    attempts = {"n": 0}

    def flaky() -> TaskResult:
        attempts["n"] += 1
        return TaskResult("success" if attempts["n"] == 3 else "failure", {"n": attempts["n"]})

    registry.register("flaky", flaky)
    flow = flow_pb(["flaky", "noop"], {"flaky": ("noop", "flaky")})
    response = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=flow), timeout=10)
    assert [(r.task, r.step) for r in response.execution_history] == [
        ("flaky", 1),
        ("flaky", 2),
        ("flaky", 3),
        ("noop", 4),
    ]
    assert [to_dict(r.data) for r in response.execution_history[:3]] == [
        {"n": 1.0},
        {"n": 2.0},
        {"n": 3.0},
    ]


async def test_input_reaches_every_task(stub, registry) -> None:
    registry.register("echo_again", registry.get("echo").fn)
    request = flow_service_pb2.ExecuteFlowRequest(flow=chain(("echo", {"k": "v"}), "echo_again"))
    request.input.update({"customer_id": "c-42"})
    response = await stub.ExecuteFlow(request, timeout=10)
    for result in response.execution_history:
        assert to_dict(result.data)["input"] == {"customer_id": "c-42"}
    assert to_dict(response.execution_history[0].data)["params"] == {"k": "v"}


async def test_stream_sends_each_result_as_soon_as_its_task_finishes(stub, registry) -> None:
    # The second task finishes only once the client holds the first task's result: a
    # stream that held results back until the flow ended would never get there (the
    # call's deadline would pass). No timing margin involved.
    seen_first = asyncio.Event()

    @registry.task("after_client_saw_task1")
    async def after_client_saw_task1() -> TaskResult:
        await seen_first.wait()
        return TaskResult.success()

    flow = chain("task1", "after_client_saw_task1", "task3")
    messages: list[flow_service_pb2.StreamFlowResponse] = []
    async for message in stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=flow), timeout=10):
        messages.append(message)
        if message.WhichOneof("event") == "task_result" and message.task_result.task == "task1":
            seen_first.set()
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds == ["started", "task_result", "task_result", "task_result", "finished"]
    assert messages[0].started.flow_id
    assert [m.task_result.task for m in messages[1:4]] == [
        "task1",
        "after_client_saw_task1",
        "task3",
    ]
    assert messages[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    assert messages[-1].finished.steps == 3


async def test_stream_and_execute_agree(stub) -> None:
    flow = chain("noop", ("echo", {"x": 1}), ("fail", {"message": "no"}))
    unary = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=flow), timeout=10)
    messages = [m async for m in stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=flow))]
    streamed = [m.task_result for m in messages if m.WhichOneof("event") == "task_result"]
    strip = lambda r: (r.task, r.status, to_dict(r.data), r.error, r.step)  # noqa: E731
    assert [strip(r) for r in streamed] == [strip(r) for r in unary.execution_history]
    assert messages[-1].finished.status == unary.status == flow_pb2.FLOW_STATUS_FAILED


def _cancellable(registry):
    """Register `long` (async, records its cancellation) and `after` (records if it ran)."""
    state = {"started": threading.Event(), "cancelled": threading.Event(), "after": []}

    async def long(ctx: TaskContext) -> TaskResult:
        state["started"].set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state["cancelled"].set()
            raise
        return TaskResult.success()

    def after() -> TaskResult:
        state["after"].append(1)
        return TaskResult.success()

    registry.register("long", long)
    registry.register("after", after)
    return state


async def _wait(event: threading.Event, limit: float = 10.0) -> None:
    """Poll a thread-safe event from the loop, failing after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not event.is_set():
        assert time.monotonic() < deadline, "event not set in time"
        await asyncio.sleep(0.01)


async def test_client_cancel_cancels_the_running_task(stub, registry) -> None:
    state = _cancellable(registry)
    call = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=chain("long", "after")))
    first = await call.read()
    assert first.WhichOneof("event") == "started"
    await _wait(state["started"])
    call.cancel()
    await _wait(state["cancelled"])
    assert state["after"] == []


async def test_deadline_cancels_the_running_task(stub, registry) -> None:
    state = _cancellable(registry)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(
            flow_service_pb2.ExecuteFlowRequest(flow=chain("long", "after")), timeout=0.5
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait(state["cancelled"])
    assert state["after"] == []
    # The client's deadline ends the flow CANCELLED (its own timeout would be TIMED_OUT).
    listed = await stub.ListExecutions(flow_service_pb2.ListExecutionsRequest())
    flow_id = listed.executions[0].flow_id
    for _ in range(500):
        got = await stub.GetExecution(flow_service_pb2.GetExecutionRequest(flow_id=flow_id))
        if got.execution.status != flow_pb2.FLOW_STATUS_RUNNING:
            break
        await asyncio.sleep(0.01)
    assert got.execution.status == flow_pb2.FLOW_STATUS_CANCELLED


async def test_sync_task_does_not_block_other_rpcs_or_health(stub, health_stub, registry) -> None:
    release, entered = threading.Event(), threading.Event()

    def blocking() -> TaskResult:
        entered.set()
        release.wait(timeout=30)
        return TaskResult.success({"released": release.is_set()})

    registry.register("blocking", blocking)
    slow = asyncio.ensure_future(
        stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("blocking")), timeout=30)
    )
    await _wait(entered)
    try:
        # The sync task holds its thread until we release it; these must answer meanwhile.
        health = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        other = await stub.ExecuteFlow(
            flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")), timeout=5
        )
        assert other.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert not slow.done()
    finally:
        release.set()
    response = await slow
    assert to_dict(response.execution_history[0].data) == {"released": True}


async def test_health_serves_both_names(health_stub) -> None:
    for service in ("", "flowmanager.v1.FlowService"):
        response = await health_stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_stub.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # List (grpc's own servicer answers UNIMPLEMENTED and logs it as an error).
    listed = await health_stub.List(health_pb2.HealthListRequest())
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        "flowmanager.v1.FlowService": health_pb2.HealthCheckResponse.SERVING,
    }


async def test_shutdown_goes_not_serving_refuses_new_flows_and_drains(
    server, stub, health_stub, registry
) -> None:
    state = _cancellable(registry)
    release = threading.Event()

    def gated() -> TaskResult:
        state["started"].set()
        release.wait(timeout=30)
        return TaskResult.success()

    registry.register("gated", gated)
    watch = health_stub.Watch(health_pb2.HealthCheckRequest(service="flowmanager.v1.FlowService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    running = asyncio.ensure_future(
        stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("gated")), timeout=30)
    )
    await _wait(state["started"])
    stopping = asyncio.ensure_future(server.shutdown(grace=20))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not stopping.done()
    release.set()
    response = await running  # the running flow got its grace period and finished
    assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    await stopping


async def test_structured_log_lines_for_flow_and_tasks(stub, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="flowsvc")
    response = await stub.ExecuteFlow(
        flow_service_pb2.ExecuteFlowRequest(flow=chain("noop", ("fail", {"message": "x"}))),
        timeout=10,
    )
    mine = [r for r in caplog.records if getattr(r, "flow_id", None) == response.flow_id]
    lines = [(r.levelname, r.getMessage()) for r in mine]
    # At INFO, one line per flow (as it ends) and one per failed attempt; the rest at DEBUG.
    assert lines == [
        ("DEBUG", "flow started"),
        ("DEBUG", "task finished"),
        ("INFO", "task finished"),
        ("INFO", "flow ended"),
    ]
    task_lines = [r for r in mine if r.getMessage() == "task finished"]
    assert [(r.task, r.status) for r in task_lines] == [("noop", "success"), ("fail", "failure")]
    assert task_lines[1].error == "x"
    assert all(r.duration_s >= 0 for r in task_lines)
    assert mine[-1].status == "failed" and mine[-1].steps == 2 and mine[-1].duration_s >= 0


async def test_list_tasks_describes_the_registry(stub, registry) -> None:
    def custom() -> TaskResult:
        """A custom task."""
        return TaskResult.success()

    registry.register("custom", custom)
    response = await stub.ListTasks(flow_service_pb2.ListTasksRequest())
    by_name = {t.name: t for t in response.tasks}
    assert {"task1", "task2", "task3", "noop", "fail", "sleep", "echo", "custom"} <= set(by_name)
    assert by_name["custom"].description == "A custom task."
    assert by_name["custom"].source.endswith(
        "test_list_tasks_describes_the_registry.<locals>.custom"
    )
    assert not by_name["custom"].is_async and by_name["sleep"].is_async
    assert by_name["task1"].source == "flowsvc.tasks.builtin:fetch_data"


async def test_list_tasks_describes_a_partial_or_a_callable_object_by_what_it_runs(
    stub, registry
) -> None:
    # A functools.partial was described by partial's own docstring, and its source was its
    # repr, with a memory address; a callable object's source was its repr too.
    import functools

    def send(ctx: TaskContext, *, region: str) -> TaskResult:
        """Send to one region."""
        return TaskResult.success({"region": region})

    class Sender:
        """Send through a configured client."""

        def __call__(self) -> TaskResult:
            return TaskResult.success()

    registry.register("send_eu", functools.partial(send, region="eu"))
    registry.register("sender", Sender())
    response = await stub.ListTasks(flow_service_pb2.ListTasksRequest(), timeout=10)
    by_name = {t.name: t for t in response.tasks}
    assert by_name["send_eu"].description == "Send to one region."
    assert by_name["send_eu"].source.endswith(".<locals>.send")
    assert by_name["sender"].description == "Send through a configured client."
    assert by_name["sender"].source.endswith(".<locals>.Sender")
    assert " at 0x" not in by_name["send_eu"].source + by_name["sender"].source


async def test_reflection_serves_the_options_other_languages_generate_with(server) -> None:
    # A client may generate its SDK from what reflection serves (grpcurl -protoset-out,
    # buf). Without go_package protoc-gen-go refused the files; without
    # java_multiple_files every Java class was nested in FlowOuterClass; without a prefix
    # Objective-C's classes were a bare Flow, Task ... in its one global namespace.
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="flowmanager.v1.FlowService"
        )
        (answer,) = [r async for r in info(iter([request]))]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]
    ours = {f.name: f.options for f in files if f.package == "flowmanager.v1"}
    assert set(ours) == {"flowmanager/v1/flow.proto", "flowmanager/v1/flow_service.proto"}
    for name, options in ours.items():
        assert options.go_package.endswith("/flowmanager/v1;flowmanagerv1"), name
        assert options.java_multiple_files, name
        assert options.java_package == "flowmanager.v1", name
        assert options.java_outer_classname.endswith("Proto"), name
        assert options.objc_class_prefix == "FXX", name


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_as_v1_and_v1alpha(server, version: str) -> None:
    # grpcurl 1.8 asks v1alpha; newer tools ask v1 first. Same messages on the wire.
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="flowmanager.v1.FlowService"
            ),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
        ]
        listed, flow_file, v1_file = [r async for r in info(iter(requests))]
    assert {s.name for s in listed.list_services_response.service} == {
        "flowmanager.v1.FlowService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    names = set()
    for raw in flow_file.file_descriptor_response.file_descriptor_proto:
        names.add(descriptor_pb2.FileDescriptorProto.FromString(raw).name)
    assert "flowmanager/v1/flow_service.proto" in names
    (raw,) = v1_file.file_descriptor_response.file_descriptor_proto
    v1 = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert v1.package == "grpc.reflection.v1"
    assert v1.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


async def test_a_draining_server_answers_the_calls_still_coming_before_it_stops(
    server, stub, monkeypatch
) -> None:
    # gRPC cancels the calls it holds unanswered when the server stops listening: a burst
    # at SIGTERM had calls end CANCELLED (which clients do not retry) instead of
    # UNAVAILABLE. A draining server now answers the calls still coming, and stops only
    # once none has come for SETTLE_QUIET_SECONDS.
    from flowsvc.server import SETTLE_QUIET_SECONDS

    stops: list[float] = []
    stop = server.server.stop

    async def recorded_stop(grace):
        stops.append(time.monotonic())
        return await stop(grace)

    monkeypatch.setattr(server.server, "stop", recorded_stop)
    noop = flow_service_pb2.ExecuteFlowRequest(flow=chain("noop"))
    assert (await stub.ExecuteFlow(noop)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
    shutting_down = asyncio.ensure_future(server.shutdown(grace=5))
    deadline = time.monotonic() + 10
    while not server.manager.draining:  # health says NOT_SERVING first
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    codes = []
    for _ in range(5):  # still coming: answered, not cut off
        try:
            await stub.ExecuteFlow(noop, timeout=10)
        except grpc.aio.AioRpcError as err:
            codes.append(err.code())
    await shutting_down
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 5
    (stopped,) = stops
    assert stopped - server._servicer.last_call >= SETTLE_QUIET_SECONDS


async def test_a_draining_server_waits_its_quiet_period_after_the_flows_end(server) -> None:
    """The quiet period before the server stops listening was counted from the last
    call's arrival only: the callers of the flows the grace period ended had called long
    before, so the server stopped at once, and the next call each sent the moment it was
    answered ended CANCELLED (up to 14 of 16 under SIGTERM, found by p51), not
    UNAVAILABLE. It now counts from the settle's start at the earliest. (White-box: the
    last call long ago, the settle must still wait the quiet period; a lower bound.)"""
    from flowsvc.server import SETTLE_QUIET_SECONDS

    server._servicer.last_call = time.monotonic() - 100.0
    began = time.monotonic()
    await server._settle(stop_by=began + 30.0)
    assert time.monotonic() - began >= SETTLE_QUIET_SECONDS


async def stall_reports(stub, caplog, task: str) -> list[logging.LogRecord]:
    """Run a flow of `task` (one that blocks the event loop) and wait for the loop's
    "unblocked" line; returns the "blocked" reports."""
    done = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain(task)), timeout=30)
    assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    deadline = time.monotonic() + 10
    while not [r for r in caplog.records if r.getMessage() == "event loop unblocked"]:
        assert time.monotonic() < deadline  # at the loop's next tick
        await asyncio.sleep(0.05)
    return [r for r in caplog.records if r.getMessage() == "event loop blocked"]


async def test_a_task_that_blocks_the_event_loop_is_reported_with_where_it_blocks(
    server, stub, registry, caplog
) -> None:
    # An async task calling time.sleep stalls every flow and health check; nothing in the
    # log said so, nor which task it was. A thread now reports the loop blocked, with the
    # loop thread's stack at that moment, and the loop reports how long once it runs.
    caplog.set_level(logging.WARNING, logger="flowsvc.stalls")

    @registry.task("blocks_the_loop")
    async def blocks_the_loop() -> TaskResult:
        time.sleep(1.0)  # noqa: ASYNC251 (the mistake reported: no await)
        return TaskResult.success()

    reports = await stall_reports(stub, caplog, "blocks_the_loop")
    (blocked,) = [r for r in reports if "blocks_the_loop" in r.stack]
    assert "time.sleep(1.0)" in blocked.stack
    assert blocked.blocked_for_s >= 0.5 and "plain def" in blocked.hint
    unblocked = [r for r in caplog.records if r.getMessage() == "event loop unblocked"]
    assert any(0.5 <= r.blocked_for_s <= 30 for r in unblocked)


async def test_a_loop_that_ends_without_shutdown_is_neither_watched_nor_reported_blocked(
    registry, settings, caplog
) -> None:
    # The stall watch's thread is stopped by shutdown only: a loop that ended without one
    # (an embedding program's error, a failed test) left the thread running for good, one
    # per server, and each reported its loop "blocked" with the stack of whatever the
    # thread ran next.
    caplog.set_level(logging.WARNING, logger="flowsvc.stalls")

    async def abandoned() -> None:
        server = await build_server(settings, registry)
        await server.server.stop(0)  # no shutdown

    before = {t for t in threading.enumerate() if t.name == "flowsvc-stalls"}
    await asyncio.to_thread(asyncio.run, abandoned())
    deadline = time.monotonic() + 10
    while {t for t in threading.enumerate() if t.name == "flowsvc-stalls"} - before:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if r.getMessage() == "event loop blocked"]


async def test_a_task_that_blocks_deep_in_a_library_is_reported_with_its_own_line(
    server, stub, registry, caplog
) -> None:
    # A blocking library call (urllib, a database driver) in an async task is many frames
    # deep: the innermost frames alone were all the library's, and did not say which task
    # (nor which of its lines) blocked the loop.
    caplog.set_level(logging.WARNING, logger="flowsvc.stalls")

    def library(depth: int) -> None:
        if depth:
            library(depth - 1)
        else:
            time.sleep(1.0)

    @registry.task("blocks_deep_down")
    async def blocks_deep_down() -> TaskResult:
        library(20)  # the line to report
        return TaskResult.success()

    (blocked,) = await stall_reports(stub, caplog, "blocks_deep_down")
    assert "blocks_deep_down" in blocked.stack
    assert "library(20)  # the line to report" in blocked.stack
    assert "time.sleep(1.0)" in blocked.stack  # the innermost frames too


async def test_a_stack_whose_file_cannot_be_resolved_is_still_reported(
    server, stub, registry, caplog, tmp_path
) -> None:
    # Code whose file name lies under a symlink loop (exec'd, generated code) made the
    # stack's reading raise RuntimeError in the watch's thread: the thread died with a
    # traceback, and no stall was reported again for the life of the server.
    caplog.set_level(logging.WARNING, logger="flowsvc.stalls")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    source = "async def blocks_in_generated_code():\n    time.sleep(1.0)\n    return ok()\n"
    generated = {"time": time, "ok": TaskResult.success}
    exec(compile(source, str(tmp_path / "a" / "generated.py"), "exec"), generated)
    registry.task("blocks_in_generated_code")(generated["blocks_in_generated_code"])

    (blocked,) = await stall_reports(stub, caplog, "blocks_in_generated_code")
    assert "generated.py" in blocked.stack


def test_a_module_beside_flowsvc_whose_name_starts_like_it_is_not_flowsvc_own() -> None:
    # The package's path was compared as a string prefix: a task module in a folder
    # beside it named flowsvc_tasks counted as flowsvc's own code, so a stall report put
    # the library call it made first, not the task's line.
    from flowsvc import stalls

    assert stalls._ours(stalls.__file__)
    assert not stalls._ours(stalls._PACKAGE + "_tasks/blocking.py")


async def test_a_tick_between_the_recheck_and_the_mark_does_not_lose_the_unblocked_line(
    caplog,
) -> None:
    # The watch re-checked the tick, then marked the stall reported: a tick in between
    # (the loop moving on right then) found no mark, said nothing, and the watch then
    # reported "event loop blocked" with no "unblocked" line ever to follow.
    import inspect

    from flowsvc import stalls

    caplog.set_level(logging.WARNING, logger="flowsvc.stalls")
    lines, first = inspect.getsourcelines(stalls.StallWatch._watch)
    mark = first + next(i for i, s in enumerate(lines) if s.strip() == "self._stalled_since = tick")
    watch = stalls.StallWatch()

    def tracer(frame, event, arg):  # holds the watch at its mark till the loop ticks
        if frame.f_code is not stalls.StallWatch._watch.__code__:
            return None

        def at_line(f, ev, a):
            if ev == "line" and f.f_lineno == mark:
                until = time.monotonic() + 1.0  # the fix holds the tick back: not forever
                while watch._tick == f.f_locals["tick"] and time.monotonic() < until:
                    time.sleep(0.01)
            return at_line

        return at_line

    threading.settrace(tracer)
    try:
        watch.start()
    finally:
        threading.settrace(None)
    try:
        await asyncio.sleep(0.2)
        time.sleep(stalls.STALL_SECONDS + 0.3)  # noqa: ASYNC251 - blocks the loop, on purpose
        deadline = time.monotonic() + 5
        while not [r for r in caplog.records if r.getMessage() == "event loop blocked"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        while not [r for r in caplog.records if r.getMessage() == "event loop unblocked"]:
            assert time.monotonic() < deadline, "blocked, and never unblocked"
            await asyncio.sleep(0.05)
    finally:
        watch.stop()
    said = [r.getMessage() for r in caplog.records]
    assert said == ["event loop blocked", "event loop unblocked"]


async def test_a_second_server_on_a_unix_socket_in_use_is_refused(registry, tmp_path) -> None:
    """gRPC removes the socket file of a unix: address before it binds: a second server on
    the same path took it over silently (the first served on, unreachable), and when the
    first stopped, it removed the second's socket file, leaving that one unreachable too.
    A socket some server listens on is now refused, as a TCP port in use is."""
    address = f"unix:{tmp_path / 's.sock'}"
    settings = Settings(listen=address, db=":memory:")
    first = await build_server(settings, registry)
    try:
        with pytest.raises(OSError, match="Address already in use"):
            await build_server(settings, registry)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            assert (await stub.ListTasks(flow_service_pb2.ListTasksRequest(), timeout=10)).tasks
    finally:
        await first.shutdown(grace=0)
    # A socket file no server listens on (left by a crash) is taken over, as before.
    stale = tmp_path / "crashed.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(stale))
    again = await build_server(Settings(listen=f"unix:{stale}", db=":memory:"), registry)
    await again.shutdown(grace=0)


def test_a_unix_socket_whose_server_accepts_no_more_is_refused_not_waited_on(tmp_path) -> None:
    """The in-use check connected with a blocking socket: on the socket of a server that
    is hung (its backlog full, nothing accepted), the start hung for ever, SIGINT and
    SIGTERM included. A server listens there: the start is refused, as for one that
    accepts."""
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(path))
        hung.listen(0)
        waiting = []
        try:
            while True:  # fill its backlog
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                waiting.append(client)
                client.setblocking(False)
                client.connect(str(path))
        except BlockingIOError:
            pass
        serve_args = ["--listen", f"unix:{path}", "--db", ":memory:"]
        try:
            result = subprocess.run(
                [sys.executable, "-m", "flowsvc", "serve", *serve_args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        finally:
            for client in waiting:
                client.close()
    assert result.returncode == 2, result.stderr
    assert "Address already in use" in result.stderr
