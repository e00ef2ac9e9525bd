"""What any gRPC client meets on the wire: keepalive pings."""

from __future__ import annotations

import grpc
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc

from flowsvc.server import FlowServer
from tests.support import chain

#: A client keepalive a little longer than the least the server accepts (5 s), and a task
#: long enough for gRPC's default policy to have closed the connection: a strike for each
#: ping while the server sends nothing, GOAWAY at the third (18 s).
CLIENT_KEEPALIVE_MS = 6_000
TASK_SECONDS = 21.0


async def test_a_client_with_keepalive_keeps_its_stream_through_a_long_task(
    server: FlowServer,
) -> None:
    options = [
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # grpc's own client otherwise stops pinging after two pings with no data sent.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        stub = flow_service_pb2_grpc.FlowServiceStub(ch)
        request = flow_service_pb2.StreamFlowRequest(
            flow=chain(("sleep", {"seconds": TASK_SECONDS}))
        )
        events = [m async for m in stub.StreamFlow(request, timeout=TASK_SECONDS + 20)]
    assert [m.WhichOneof("event") for m in events] == ["started", "task_result", "finished"]
    assert events[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED
