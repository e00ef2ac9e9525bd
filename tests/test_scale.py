"""Many and long: a long execution, a large store, and the other clients meanwhile."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowsvc.config import Settings
from tests.support import flow_pb, on_event_loop
from tests.test_executions import read_all, serving

pb = flow_service_pb2


async def test_a_long_loop_of_quick_async_tasks_leaves_the_event_loop_turns(registry) -> None:
    # With the in-memory store nothing in an execution's drive awaits, and an async task
    # that returns at once (noop) never gives the loop up either: a flow of 100,000 such
    # steps held the event loop (every other flow, every health check) about a second,
    # and its own `started` reached the client only once it had ended. 20,000 steps are
    # enough to show it: without a turn they end before the client reads `started`.
    steps = 20_000
    loop = flow_pb(["noop"], {"noop": ("noop", "noop")}, max_steps=steps)
    async with serving(Settings(listen="127.0.0.1:0", db=":memory:"), registry) as served:
        health = health_pb2_grpc.HealthStub(served.channel)
        call = served.stub.StreamFlow(pb.StreamFlowRequest(flow=loop))
        started = await call.read()
        assert started.WhichOneof("event") == "started"
        # Other calls are answered while it runs, not once it has ended.
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        basic = await served.stub.GetExecution(
            pb.GetExecutionRequest(flow_id=started.started.flow_id, view=pb.EXECUTION_VIEW_BASIC)
        )
        assert basic.execution.status == flow_pb2.FLOW_STATUS_RUNNING
        assert basic.execution.last_sequence < steps
        rest = await read_all(call)
        assert len(rest) == steps + 1  # every step, then `finished`
        assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_FAILED  # max_steps reached
        assert await call.code() == grpc.StatusCode.OK


class _CountingDict(dict[str, Any]):
    """The in-memory store's executions, counting the look-ups of one."""

    looked_up = 0

    def __getitem__(self, key: str) -> Any:
        _CountingDict.looked_up += 1
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        _CountingDict.looked_up += 1
        return super().get(key, default)


async def test_a_page_of_the_in_memory_store_costs_its_size_not_its_place(registry) -> None:
    # The in-memory store skipped every newer execution, one by one, to reach a page
    # token's place: near the end of 200,000 executions one entry cost 40 ms of the
    # event loop, and paging to the end by 50 took minutes (quadratic).
    count = 1200
    flow = flow_pb(["noop"], name="many")
    async with serving(Settings(listen="127.0.0.1:0", db=":memory:"), registry) as served:
        stub = served.stub
        for _ in range(count // 100):
            await asyncio.gather(
                *(stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow)) for _ in range(100))
            )
        store: Any = served.server.manager.store
        # Retention deletes the oldest 300 (a compaction of the index follows later).
        assert await store.delete_finished_before(datetime.now(UTC) + timedelta(1), 300) == 300
        expected = [flow_id for flow_id in reversed(store._entries)]
        assert len(expected) == count - 300
        store._entries = _CountingDict(store._entries)

        seen: list[str] = []
        token = ""
        while True:
            _CountingDict.looked_up = 0
            page = await stub.ListExecutions(
                pb.ListExecutionsRequest(page_size=7, page_token=token)
            )
            seen += [execution.flow_id for execution in page.executions]
            token = page.next_page_token
            if not token:
                # The last looks past the oldest, at the ids deleted since a compaction.
                assert _CountingDict.looked_up <= 7 + 300
                break
            # A page looks at its own entries, and the one after for the token.
            assert _CountingDict.looked_up <= 8
        assert seen == expected
        # Most of them deleted: the index is compacted, and still agrees.
        assert await store.delete_finished_before(datetime.now(UTC) + timedelta(1), 800) == 800
        latest = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
        page = await stub.ListExecutions(pb.ListExecutionsRequest(page_size=1000))
        assert [execution.flow_id for execution in page.executions] == [
            latest.flow_id,
            *expected[:100],
        ]


async def test_a_long_history_is_converted_off_the_event_loop(
    registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer of a 100,000-step loop (3.4 MB, within --max-response-bytes) was built
    # on the event loop: 0.3 to 0.45 s of every flow and health check held, for each
    # ExecuteFlow, GetExecution or CancelExecution of it. A short one stays on the loop.
    from flowsvc import convert

    where: list[tuple[str, bool]] = []
    execute, stored = convert.execute_response_from_events, convert.stored_execution_to_pb

    def execute_response_from_events(*args: Any) -> Any:
        where.append(("execute", on_event_loop()))
        return execute(*args)

    def stored_execution_to_pb(*args: Any) -> Any:
        where.append(("get", on_event_loop()))
        return stored(*args)

    monkeypatch.setattr(convert, "execute_response_from_events", execute_response_from_events)
    monkeypatch.setattr(convert, "stored_execution_to_pb", stored_execution_to_pb)
    async with serving(Settings(listen="127.0.0.1:0", db=":memory:"), registry) as served:
        stub = served.stub
        for steps in (10, 5000):
            loop = flow_pb(["noop"], {"noop": ("noop", "noop")}, max_steps=steps)
            done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=loop))
            assert len(done.execution_history) == steps
            got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))
            assert list(got.execution.execution_history) == list(done.execution_history)
            assert got.execution.last_sequence == steps + 2
    assert where == [("execute", True), ("get", True), ("execute", False), ("get", False)]
