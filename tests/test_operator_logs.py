"""What an operator reads in a real server's log: its settings at start, why a task raised
or a flow was cancelled, and refusals at the in-flight cap."""

from __future__ import annotations

import asyncio
import signal
import textwrap
from pathlib import Path
from typing import Any

import grpc
from flowmanager.v1 import flow_service_pb2, flow_service_pb2_grpc

from tests.support import chain, server_process, wait_until


def lines_with(srv: Any, msg: str, count: int = 1) -> list[dict[str, Any]]:
    """The server's log lines saying `msg`, once there are at least `count` of them."""

    def found() -> list[dict[str, Any]]:
        lines = [line for line in srv.log_lines() if line["msg"] == msg]
        return lines if len(lines) >= count else []

    return wait_until(found)


def test_the_start_line_shows_the_effective_settings(tmp_path: Path) -> None:
    env = {"FLOWSVC_LOG_LEVEL": "info", "FLOWSVC_MAX_IN_FLIGHT": "7"}
    with server_process(
        tmp_path, "--db", "x.db", "--sync-task-workers", "3", "--max-tasks", "50", env=env
    ) as srv:
        (line,) = lines_with(srv, "server started")
    settings = line["settings"]
    assert line["port"] == srv.port
    assert settings["listen"] == "127.0.0.1:0"
    assert settings["db"] == "x.db" and settings["db_synchronous"] == "FULL"
    assert settings["max_in_flight"] == 7  # from the environment
    assert settings["sync_task_workers"] == 3 and settings["max_tasks"] == 50  # from flags
    assert settings["log_level"] == "INFO"
    assert settings["retention_seconds"] == 604800.0
    assert line["event_loop"] in {"uvloop", "asyncio"}


RAISING_TASK = """
    from flowsvc import register_task

    @register_task("explodes")
    def explodes():
        raise RuntimeError("kaboom")
    """


async def test_a_task_that_raised_is_logged_with_its_attempt_and_flow(tmp_path: Path) -> None:
    (tmp_path / "exploding.py").write_text(textwrap.dedent(RAISING_TASK))
    env = {"PYTHONPATH": str(tmp_path)}
    with server_process(tmp_path, "--task-modules", "exploding", env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            flow = chain("explodes")
            flow.name = "nightly export"
            flow.tasks[0].retry.max_attempts = 2
            flow.tasks[0].retry.initial_backoff.FromMilliseconds(1)
            response = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=flow))
        raised = lines_with(srv, "task raised", 2)
    assert [(r["task"], r["attempt"], r["step"]) for r in raised] == [
        ("explodes", 1, 1),
        ("explodes", 2, 2),
    ]
    assert {r["flow"] for r in raised} == {"nightly export"}
    assert {r["flow_id"] for r in raised} == {response.flow_id}
    assert "RuntimeError: kaboom" in raised[0]["traceback"]


async def test_a_cancelled_flow_is_logged_with_why(tmp_path: Path) -> None:
    with server_process(tmp_path, "--db", ":memory:") as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            slow = chain(("sleep", {"seconds": 30}))
            # The client's deadline passes.
            try:
                await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=slow), timeout=0.5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The client cancels its stream.
            call = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=slow))
            started = await call.read()
            call.cancel()
            # CancelExecution.
            call2 = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=slow))
            cancelled = await call2.read()
            await stub.CancelExecution(
                flow_service_pb2.CancelExecutionRequest(flow_id=cancelled.started.flow_id)
            )
            ended = lines_with(srv, "flow ended", 3)
            by_id = {line["flow_id"]: line for line in ended}
            stream = by_id.pop(started.started.flow_id)
            by_cancel = by_id.pop(cancelled.started.flow_id)
            (by_deadline,) = by_id.values()
            got = await stub.GetExecution(
                flow_service_pb2.GetExecutionRequest(flow_id=by_deadline["flow_id"])
            )
    assert {line["status"] for line in ended} == {"cancelled"}
    assert "the caller went away (its deadline passed)" in by_deadline["reason"]
    assert "the caller went away (it cancelled the call or disconnected)" in stream["reason"]
    assert "cancelled by CancelExecution" in by_cancel["reason"]
    # The execution's record says the same.
    assert got.execution.message.endswith("the caller went away (its deadline passed)")


async def test_refusals_at_the_in_flight_cap_are_logged_counted_not_one_line_each(
    tmp_path: Path,
) -> None:
    args = ("--db", ":memory:", "--max-in-flight", "1", "--grace-seconds", "0")
    with server_process(tmp_path, *args) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            slow = chain(("sleep", {"seconds": 30}))
            holder = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=slow))
            await holder.read()  # the one slot is taken
            burst = await asyncio.gather(
                *(
                    stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")))
                    for _ in range(40)
                ),
                return_exceptions=True,
            )
            codes = {exc.code() for exc in burst if isinstance(exc, grpc.aio.AioRpcError)}
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED} and len(burst) == 40
            # The first refusal is in the log at once, as a warning.
            (first,) = lines_with(srv, "executions refused: the in-flight cap is reached")
            assert first["level"] == "warning" and first["refused"] == 1
            assert first["max_in_flight"] == 1
            holder.cancel()
        # The rest are counted, and logged at the latest when the server stops.
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0
    refusals = [
        line
        for line in srv.log_lines()
        if line["msg"] == "executions refused: the in-flight cap is reached"
    ]
    assert len(refusals) == 2  # not 40
    assert sum(line["refused"] for line in refusals) == 40


def test_a_misspelled_flowsvc_variable_is_warned_about_not_ignored(tmp_path: Path) -> None:
    env = {"FLOWSVC_MAX_INFLIGHT": "5", "FLOWSVC_NOT_A_SETTING": "secret-value"}
    with server_process(tmp_path, "--db", ":memory:", env=env) as srv:
        (line,) = lines_with(srv, "unknown FLOWSVC_ variables ignored")
    assert line["level"] == "warning"
    assert line["variables"] == ["FLOWSVC_MAX_INFLIGHT", "FLOWSVC_NOT_A_SETTING"]
    assert line["did_you_mean"] == {"FLOWSVC_MAX_INFLIGHT": "FLOWSVC_MAX_IN_FLIGHT"}
    assert "secret-value" not in srv.log_path.read_text()  # names only, never values


async def test_a_client_that_leaves_a_stream_it_stopped_reading_is_no_error(
    tmp_path: Path,
) -> None:
    """A client that stops reading its stream and then cancels it leaves the server's
    write of the next message undone: grpc logged that as an ERROR with a traceback, a
    line per client that went away. It is a DEBUG line now, without the traceback."""
    loop = chain(("echo", {"blob": "x" * 200_000}))
    loop.max_steps = 100
    loop.conditions.add(source_task="echo", target_task_success="echo", target_task_failure="end")
    # The client's window stays at 64 KiB (no BDP probing to widen it): the server cannot
    # send the second 200 KB message until the client reads.
    options = [("grpc.http2.bdp_probe", 0)]
    method = "[/flowmanager.v1.FlowService/StreamFlow]"
    # grpc says one or the other of each call, as its cancel or the failed write comes
    # first (the write, most times): calls until a failed write is among them.
    gone = f"ExecuteBatchError raised in core by servicer method {method}"
    said = {gone, f"RPC cancelled for servicer method {method}"}
    with server_process(tmp_path, "--db", ":memory:", "--log-level", "DEBUG") as srv:
        async with grpc.aio.insecure_channel(srv.address, options=options) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            for calls in range(1, 21):
                call = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=loop))
                flow_id = (await call.read()).started.flow_id
                request = flow_service_pb2.GetExecutionRequest(
                    flow_id=flow_id, view=flow_service_pb2.EXECUTION_VIEW_BASIC
                )
                deadline = asyncio.get_running_loop().time() + 10
                # The flow runs on, its stream waiting for the client to read.
                while (await stub.GetExecution(request)).execution.last_sequence < 102:
                    assert asyncio.get_running_loop().time() < deadline, "the flow did not end"
                    await asyncio.sleep(0.02)
                call.cancel()

                def ended(calls: int = calls) -> list[dict[str, Any]]:
                    lines = [line for line in srv.log_lines() if line["msg"] in said]
                    return lines if len(lines) >= calls else []

                ends = wait_until(ended)
                if any(line["msg"] == gone for line in ends):
                    break
    failed_writes = [line for line in ends if line["msg"] == gone]
    assert failed_writes
    assert {line["level"] for line in failed_writes} == {"debug"}
    assert not [line for line in failed_writes if "traceback" in line]
    assert not [entry for entry in srv.log_lines() if entry["level"] == "error"]
