"""kill -9 of a real server mid-flow, restart on the same database: nothing a client saw is lost.

The promise (README, "Durability"): every event is committed before it is sent to any
client. So whatever a client received must be in the store after a SIGKILL, byte for
byte, and the execution must be final (INTERRUPTED: it is not resumed).
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path

import grpc
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc

from flowsvc.convert import flow_from_pb
from flowsvc.models import new_flow_id
from flowsvc.store import NewExecution
from flowsvc.store.codec import dumps, flow_to_json
from flowsvc.store.sqlite import SQLiteStore
from tests.support import chain, flow_pb, server_process

pb = flow_service_pb2


async def _kill(srv) -> None:
    srv.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(srv.proc.wait, 30)


async def test_sigkill_mid_stream_then_restart_keeps_every_received_result(tmp_path: Path) -> None:
    db = str(tmp_path / "crash.db")
    flow = chain(
        ("task1", {"delay_seconds": 0.01}),
        ("task2", {"delay_seconds": 0.01}),
        ("sleep", {"seconds": 60}),
        "noop",
    )
    received: list[pb.StreamFlowResponse] = []
    with server_process(tmp_path, "--db", db) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = stub.StreamFlow(pb.StreamFlowRequest(flow=flow))
            for _ in range(3):  # started, task1, task2; `sleep` is now running
                received.append(await call.read())
            await _kill(srv)
    flow_id = received[0].started.flow_id

    with server_process(tmp_path, "--db", db) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
            assert got.status == flow_pb2.FLOW_STATUS_INTERRUPTED
            assert [r.SerializeToString() for r in got.execution_history] == [
                m.task_result.SerializeToString() for m in received[1:]
            ]
            assert got.flow == flow
            watched = [
                m async for m in stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
            ]
            assert [m.SerializeToString() for m in watched[:3]] == [
                m.SerializeToString() for m in received
            ]
            assert [m.WhichOneof("event") for m in watched[3:]] == ["finished"]
            assert watched[3].sequence == 4
            assert watched[3].finished.status == flow_pb2.FLOW_STATUS_INTERRUPTED
        messages = [line["msg"] for line in srv.log_lines()]
        assert "execution interrupted by a crash" in messages


async def test_sigkill_under_load_loses_nothing_any_client_received(tmp_path: Path) -> None:
    """Many executions streaming at once share group commits; kill mid-way."""
    db = str(tmp_path / "load.db")
    loop_flow = flow_pb(["noop"], {"noop": ("noop", "end")}, name="loop", max_steps=100_000)
    streams = 16
    received: dict[int, list[pb.StreamFlowResponse]] = {i: [] for i in range(streams)}
    with server_process(tmp_path, "--db", db, "--max-steps-cap", "100000") as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            enough = asyncio.Event()

            async def consume(i: int) -> None:
                call = stub.StreamFlow(pb.StreamFlowRequest(flow=loop_flow))
                try:
                    while (message := await call.read()) is not grpc.aio.EOF:
                        received[i].append(message)
                        # Every stream under way (one may start late under this load),
                        # and plenty received.
                        if all(received.values()) and sum(map(len, received.values())) >= 2000:
                            enough.set()
                except grpc.aio.AioRpcError:
                    pass  # the server died under us: expected

            consumers = [asyncio.ensure_future(consume(i)) for i in range(streams)]
            await enough.wait()
            await _kill(srv)
            await asyncio.gather(*consumers)

    with server_process(tmp_path, "--db", db) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            for messages in received.values():
                assert messages, "every stream got at least its started event"
                flow_id = messages[0].started.flow_id
                watched = [
                    m async for m in stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
                ]
                n = len(messages)
                assert [m.SerializeToString() for m in watched[:n]] == [
                    m.SerializeToString() for m in messages
                ]
                assert watched[-1].finished.status == flow_pb2.FLOW_STATUS_INTERRUPTED


async def test_a_retry_after_a_restart_gets_the_execution_its_request_id_made(
    tmp_path: Path,
) -> None:
    """The request a client retries after a crash is the one it sent: the same flow,
    input and request_id give the execution recorded before, whatever order protobuf
    hands a Struct's keys over in this process (it differs from one process to the next)."""
    db = str(tmp_path / "retry.db")
    params = {"customer": "c-42", "amount": 10, "currency": "EUR", "note": "n", "tag": "t"}
    flow = chain(("echo", {**params, "nested": dict(params)}))
    request = pb.ExecuteFlowRequest(flow=flow, request_id="order-42")
    request.input.update({"cart": dict(params)})
    answers = []
    for _ in range(2):  # a restart in between: a new process
        with server_process(tmp_path, "--db", db) as srv:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                stub = flow_service_pb2_grpc.FlowServiceStub(channel)
                answers.append(await stub.ExecuteFlow(request, timeout=10))
            await _kill(srv)
    assert answers[1].flow_id == answers[0].flow_id
    assert answers[1] == answers[0]  # the same answer: the recorded execution


async def test_an_execution_cut_off_before_its_started_event_streams_started_first(
    tmp_path: Path,
) -> None:
    """A kill -9 between the commit of an execution's record (made before anything runs)
    and the commit of its `started` event left it with no event at all: recovery closed it
    with a lone `finished` at sequence 1, so a WatchExecution of it began without the
    `started` every stream begins with."""
    db = str(tmp_path / "early.db")
    flow = flow_from_pb(chain("noop"))
    store = SQLiteStore(db)
    await store.open()
    flow_id = new_flow_id()
    created = store.create_nowait(
        NewExecution(
            flow_id=flow_id,
            flow=flow,
            flow_json=dumps(flow_to_json(flow)),
            input={},
            request_id="early",
            request_hash="",
            created_at=datetime.now(UTC),
        )
    )
    assert await created is None  # the record is committed; the crash comes now
    await store.close()

    with server_process(tmp_path, "--db", db) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            watched = [
                m async for m in stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
            ]
            assert [(m.sequence, m.WhichOneof("event")) for m in watched] == [
                (1, "started"),
                (2, "finished"),
            ]
            assert watched[0].started.flow_id == flow_id
            assert watched[0].started.flow_name == flow.name
            assert watched[1].finished.status == flow_pb2.FLOW_STATUS_INTERRUPTED
            assert watched[1].finished.steps == 0
            got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
            assert got.status == flow_pb2.FLOW_STATUS_INTERRUPTED
            assert got.last_sequence == 2
            assert not got.execution_history
