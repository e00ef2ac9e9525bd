"""Many and long: a long execution, a large store, and the other clients meanwhile."""

from __future__ import annotations

import grpc
from flowmanager.v1 import flow_pb2, flow_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowsvc.config import Settings
from tests.support import flow_pb
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
