"""Every error the server sends carries a google.rpc.ErrorInfo (AIP-193): a stable reason,
the domain "flowsvc" and the ids that go with it, beside the details it had before.

One test provokes each reason through a real server and a real client; the last ones check
that the reasons of the code, of the servicer's table and of the README agree, so that no
new error reaches a client without one."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import logging
import re
import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from flowsvc import convert
from flowsvc.config import Settings
from flowsvc.errors import FlowsvcError
from flowsvc.servicer import ERROR_DOMAIN, REASONS
from tests.support import ROOT, chain, flow_pb
from tests.test_executions import (
    StoreHold,
    eventually,
    gate,
    left_during_a_task,
    read_all,
    serving,
    stubborn,
)

pb = flow_service_pb2
TIMEOUT = 10
#: AIP-193: UPPER_SNAKE_CASE, at most 63 characters.
REASON_FORMAT = re.compile(r"[A-Z][A-Z0-9_]+[A-Z0-9]")


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo among the status details of `err`."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no status details: {err}"
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status.details
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


def assert_reason(
    err: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str, **metadata: str
) -> error_details_pb2.ErrorInfo:
    """`err` has `code`, and an ErrorInfo with `reason`, the domain and `metadata`."""
    assert err.code() == code, err
    info = error_info(err)
    assert (info.reason, info.domain) == (reason, ERROR_DOMAIN), info
    for key, value in metadata.items():
        assert info.metadata.get(key) == value, (key, dict(info.metadata))
    return info


def detail_types(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    return [d.type_url.rsplit("/", 1)[1] for d in status.details]


def _identity(data: bytes) -> bytes:
    return data


# --- INVALID_ARGUMENT --------------------------------------------------------------------


async def test_flow_invalid(stub) -> None:
    flow = flow_pb(["noop"], {"noop": ("task9", "end")})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow), timeout=TIMEOUT)
    assert_reason(
        info.value,
        grpc.StatusCode.INVALID_ARGUMENT,
        "FLOW_INVALID",
        field="flow.conditions[0].target_task_success",
        violationCount="1",
    )
    # The BadRequest stays, first, as before.
    assert detail_types(info.value) == ["google.rpc.BadRequest", "google.rpc.ErrorInfo"]


async def test_argument_invalid(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetExecution(pb.GetExecutionRequest(flow_id="nope"), timeout=TIMEOUT)
    assert_reason(info.value, grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENT_INVALID", field="flow_id")
    assert detail_types(info.value) == ["google.rpc.BadRequest", "google.rpc.ErrorInfo"]


#: What a grpc client accepts in trailers by default: past it, a call may fail
#: RESOURCE_EXHAUSTED "Stream removed", with no status details (and past 16 KiB always).
CLIENT_METADATA_SOFT_LIMIT = 8192


def trailer_bytes(err: grpc.aio.AioRpcError) -> int:
    """The trailers' size as a grpc client counts it (name + value + 32 each, grpc-message
    percent-encoded, -bin values decoded) for the status of `err`."""
    status = rpc_status.from_call(err)
    assert status is not None
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.message.encode())
    fixed = len(":status") + 3 + len("content-type") + len("application/grpc") + 2 * 32
    grpc_status = len("grpc-status") + 2 + 32
    return (
        fixed
        + grpc_status
        + len("grpc-message")
        + message
        + 32
        + len("grpc-status-details-bin")
        + status.ByteSize()
        + 32
    )


async def test_long_non_ascii_field_keeps_the_trailers_under_the_client_limit(stub) -> None:
    # The field of the violation names the input's key: 1,000 emoji, 4 bytes each. The
    # message (percent-encoded: 12 bytes an emoji), the BadRequest and the ErrorInfo
    # together made trailers of 13 KB: the client saw RESOURCE_EXHAUSTED, no reason.
    flow = flow_pb(["noop"])
    request = pb.ExecuteFlowRequest(flow=flow)
    request.input.fields["\U0001f600" * 1000].number_value = float("nan")
    for _ in range(3):  # the client refuses between 8 and 16 KiB at random
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request, timeout=TIMEOUT)
        assert_reason(info.value, grpc.StatusCode.INVALID_ARGUMENT, "ARGUMENT_INVALID")
        assert trailer_bytes(info.value) <= CLIENT_METADATA_SOFT_LIMIT


@pytest.mark.parametrize("tampered", [True, False], ids=["tampered", "other-filters"])
async def test_page_token_invalid(stub, tampered: bool) -> None:
    for _ in range(2):
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=TIMEOUT)
    page = await stub.ListExecutions(pb.ListExecutionsRequest(page_size=1), timeout=TIMEOUT)
    assert page.next_page_token
    request = (
        pb.ListExecutionsRequest(page_size=1, page_token=page.next_page_token[:-4])
        if tampered
        else pb.ListExecutionsRequest(
            page_size=1, page_token=page.next_page_token, flow_name="other"
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListExecutions(request, timeout=TIMEOUT)
    assert_reason(
        info.value, grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID", field="page_token"
    )


async def test_flow_input_too_large(registry) -> None:
    settings = Settings(listen="127.0.0.1:0", db=":memory:", max_response_bytes=4000)
    async with serving(settings, registry) as (_, _, stub):
        request = pb.ExecuteFlowRequest(flow=chain("noop"))
        request.input.update({"blob": "z" * 5000})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request, timeout=TIMEOUT)
    got = assert_reason(
        info.value,
        grpc.StatusCode.INVALID_ARGUMENT,
        "FLOW_INPUT_TOO_LARGE",
        field="input",
        maxResponseBytes="4000",
    )
    assert int(got.metadata["inputBytes"]) > 5000 and int(got.metadata["flowBytes"]) > 0


@pytest.mark.parametrize(
    ("path", "request_type"),
    [
        ("/flowmanager.v1.FlowService/ExecuteFlow", "flowmanager.v1.ExecuteFlowRequest"),
        ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
    ],
    ids=["FlowService", "health"],
)
async def test_request_malformed(channel, path: str, request_type: str) -> None:
    call = channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"\xff\xff\xff\xff", timeout=TIMEOUT)
    assert_reason(
        info.value,
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_MALFORMED",
        requestType=request_type,
    )


# --- RESOURCE_EXHAUSTED ------------------------------------------------------------------


async def test_max_in_flight_exceeded(registry, settings) -> None:
    started, release, _ = gate(registry)
    async with serving(dataclasses.replace(settings, max_in_flight=1), registry) as served:
        first = served.stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("gated")), timeout=30)
        try:
            await asyncio.wait_for(started.wait(), TIMEOUT)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await served.stub.ExecuteFlow(
                    pb.ExecuteFlowRequest(flow=chain("noop")), timeout=TIMEOUT
                )
        finally:
            release.set()
        await first
    assert_reason(
        info.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "MAX_IN_FLIGHT_EXCEEDED", maxInFlight="1"
    )
    assert detail_types(info.value) == ["google.rpc.RetryInfo", "google.rpc.ErrorInfo"]


async def test_response_too_large(registry) -> None:
    settings = Settings(listen="127.0.0.1:0", db=":memory:", max_response_bytes=4000)
    async with serving(settings, registry) as (_, _, stub):
        flow = chain(("echo", {"blob": "x" * 500}), ("echo_2", {"blob": "y" * 500}))
        registry.register("echo_2", registry.get("echo").fn)
        request = pb.ExecuteFlowRequest(flow=flow)
        request.input.update({"blob": "z" * 1500})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request, timeout=TIMEOUT)
        got = assert_reason(
            info.value,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RESPONSE_TOO_LARGE",
            maxResponseBytes="4000",
        )
        # The flowId is the execution that ran: read it another way.
        basic = await stub.GetExecution(
            pb.GetExecutionRequest(flow_id=got.metadata["flowId"], view=pb.EXECUTION_VIEW_BASIC),
            timeout=TIMEOUT,
        )
        assert basic.execution.status == flow_pb2.FLOW_STATUS_SUCCEEDED


# --- NOT_FOUND ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GetExecution", "CancelExecution", "WatchExecution"])
async def test_execution_not_found(stub, method: str) -> None:
    flow_id = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if method == "GetExecution":
            await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id), timeout=TIMEOUT)
        elif method == "CancelExecution":
            await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id), timeout=TIMEOUT)
        else:
            await read_all(
                stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id), timeout=TIMEOUT)
            )
    assert_reason(info.value, grpc.StatusCode.NOT_FOUND, "EXECUTION_NOT_FOUND", flowId=flow_id)


async def test_service_not_found(health_stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health_stub.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
    assert_reason(
        info.value, grpc.StatusCode.NOT_FOUND, "SERVICE_NOT_FOUND", service="nope.v1.Nope"
    )
    assert "nope.v1.Nope" in (info.value.details() or "")
    # The names it has still answer.
    served = await health_stub.Check(
        health_pb2.HealthCheckRequest(service="flowmanager.v1.FlowService")
    )
    assert served.status == health_pb2.HealthCheckResponse.SERVING


# --- FAILED_PRECONDITION -----------------------------------------------------------------


async def test_execution_ended(stub) -> None:
    done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=done.flow_id))
    assert_reason(
        info.value,
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXECUTION_ENDED",
        flowId=done.flow_id,
        status="FLOW_STATUS_SUCCEEDED",
    )


async def test_execution_ended_before_cancel(tmp_path: Path, registry) -> None:
    """White-box, as in test_executions: the store's thread is held so that the end of an
    execution whose last task has finished waits for its commit while the cancel comes."""
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "late.db"))
    started, release, _ = gate(registry)
    async with serving(settings, registry) as (server, _, stub):
        held = StoreHold(server.manager.store)
        try:
            stream = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated")))
            flow_id = (await stream.read()).started.flow_id
            await started.wait()
            run = server.manager._live[flow_id]
            await held.hold()
            release.set()
            await eventually(lambda: run.unpublished == 2)
            cancel = asyncio.ensure_future(
                stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id), timeout=10)
            )
            await eventually(lambda: run.stop.reason is not None)
            await held.release()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cancel
            await read_all(stream)
        finally:
            held.let_go()
    assert_reason(
        info.value,
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXECUTION_ENDED_BEFORE_CANCEL",
        flowId=flow_id,
        status="FLOW_STATUS_SUCCEEDED",
    )


async def test_request_id_abandoned(stub, registry) -> None:
    flow, flow_id, _ = await left_during_a_task(stub, registry, "order-8")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow, request_id="order-8"), timeout=10)
    assert_reason(
        info.value,
        grpc.StatusCode.FAILED_PRECONDITION,
        "REQUEST_ID_ABANDONED",
        flowId=flow_id,
        requestId="order-8",
    )


# --- DEADLINE_EXCEEDED, ALREADY_EXISTS ---------------------------------------------------


async def test_execution_still_stopping(stub, registry, server) -> None:
    server.manager.settings = dataclasses.replace(server.manager.settings, cancel_wait_seconds=0.2)
    release, _ = stubborn(registry)
    call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("stubborn", "noop")))
    flow_id = (await call.read()).started.flow_id
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id), timeout=10)
    finally:
        release.set()
    await read_all(call)
    assert_reason(
        info.value,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "EXECUTION_STILL_STOPPING",
        flowId=flow_id,
        cancelWaitSeconds="0.2",
    )


async def test_request_id_reused(stub) -> None:
    first = pb.ExecuteFlowRequest(flow=chain("noop"), request_id="order-9")
    done = await stub.ExecuteFlow(first, timeout=TIMEOUT)
    other = pb.ExecuteFlowRequest(flow=chain("noop"), request_id="order-9")
    other.input.update({"amount": 3})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(other, timeout=TIMEOUT)
    assert_reason(
        info.value,
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        flowId=done.flow_id,
        requestId="order-9",
    )


# --- UNAVAILABLE -------------------------------------------------------------------------


async def test_server_shutting_down(registry, settings) -> None:
    started, release, _ = gate(registry)
    async with serving(settings, registry) as (server, channel, stub):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        first = stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("gated")), timeout=30)
        await asyncio.wait_for(started.wait(), TIMEOUT)
        stopping = asyncio.ensure_future(server.shutdown(grace=20))
        try:
            await eventually(lambda: server.manager.draining)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=10)
            # NOT_SERVING at once; the stream itself ends once the running flow has (not
            # waited for here: that is the grace period, 20 s).
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            release.set()
            with pytest.raises(grpc.aio.AioRpcError) as watched:
                await read_all(watch)
        finally:
            release.set()
            await first
            await stopping
    assert_reason(refused.value, grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
    assert_reason(watched.value, grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")


async def test_execution_interrupted(registry, settings) -> None:
    """A task that ignores every cancellation: shutdown cuts its execution off, and its
    caller is told so (its end is recorded INTERRUPTED)."""
    release = asyncio.Event()

    @registry.task("very_stubborn")
    async def very_stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    async with serving(settings, registry) as (server, _, stub):
        call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("very_stubborn")))
        flow_id = (await call.read()).started.flow_id
        stopping = asyncio.ensure_future(server.shutdown(grace=0.1))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all(call)
        finally:
            release.set()
            await stopping
    assert_reason(info.value, grpc.StatusCode.UNAVAILABLE, "EXECUTION_INTERRUPTED", flowId=flow_id)


async def test_store_unavailable(tmp_path: Path, registry) -> None:
    db = tmp_path / "locked.db"
    settings = Settings(listen="127.0.0.1:0", db=str(db), db_busy_timeout_ms=200)
    async with serving(settings, registry) as (_, _, stub):
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=TIMEOUT)
        locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=TIMEOUT)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
    assert_reason(info.value, grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")


# --- UNIMPLEMENTED, INTERNAL -------------------------------------------------------------


async def test_method_not_found(channel) -> None:
    path = "/flowmanager.v1.FlowService/ExecuteFlows"
    call = channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"", timeout=TIMEOUT)
    assert_reason(info.value, grpc.StatusCode.UNIMPLEMENTED, "METHOD_NOT_FOUND", method=path)


async def test_internal_error(stub, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def explode(flow_id, events, max_bytes=0):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(convert, "execute_response_from_events", explode)
    caplog.set_level(logging.ERROR, logger="flowsvc.servicer")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=TIMEOUT)
    error_id = re.search(r"error id ([0-9a-f]+)", info.value.details() or "")
    assert error_id, info.value.details()
    got = assert_reason(
        info.value, grpc.StatusCode.INTERNAL, "INTERNAL_ERROR", errorId=error_id.group(1)
    )
    assert "secret" not in str(got)


# --- the reasons of the code, of the table and of the README agree -----------------------


def _readme_reasons() -> dict[str, str]:
    """reason -> code, from the README's table of reasons (rows "| `REASON` | `CODE` |")."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Status codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([A-Z_]+)` \|", section, flags=re.MULTILINE)
    return dict(rows)


def _code_name(code: int) -> str:
    return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == code)).name


def test_every_reason_has_the_format_of_aip_193() -> None:
    for reason in REASONS:
        assert REASON_FORMAT.fullmatch(reason) and len(reason) <= 63, reason
    assert ERROR_DOMAIN == "flowsvc"


def test_the_readme_lists_every_reason_with_its_code() -> None:
    expected = {reason: _code_name(code) for reason, code in REASONS.items()}
    assert _readme_reasons() == expected


def _subclasses(cls: type[FlowsvcError]) -> list[type[FlowsvcError]]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))]


#: Raised while the server starts: they never reach a client.
STARTUP_ONLY = {"TaskRegistrationError", "TaskModuleError"}


def test_every_error_a_client_can_get_has_a_reason_of_the_table() -> None:
    # (flowsvc.servicer, imported above, defines one of them.)
    classes = _subclasses(FlowsvcError)[1:]
    for cls in classes:
        if cls.__name__ in STARTUP_ONLY:
            assert not cls.reason, cls
            continue
        assert cls.reason in REASONS, f"{cls.__name__} has no reason of servicer.REASONS"
    assert {cls.__name__ for cls in classes} >= STARTUP_ONLY


def test_every_reason_given_where_an_error_is_raised_is_in_the_table() -> None:
    given = set()
    for path in (ROOT / "flowsvc").rglob("*.py"):
        given |= set(re.findall(r'reason="([A-Z0-9_]+)"', path.read_text()))
    assert given, "no reason= found: the pattern is stale"
    assert given <= set(REASONS), given - set(REASONS)


def test_each_reason_has_its_test_here() -> None:
    tree = ast.parse(Path(__file__).read_text())
    tested = {
        node.args[2].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "assert_reason"
        and isinstance(node.args[2], ast.Constant)
    }
    missing = set(REASONS) - tested
    assert not missing, f"no test provokes {sorted(missing)}"
