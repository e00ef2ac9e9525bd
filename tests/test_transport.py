"""What any gRPC client meets on the wire: keepalive pings, a client that vanishes."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc

from flowsvc import server as server_module
from flowsvc.config import Settings
from flowsvc.registry import TaskRegistry
from flowsvc.server import build_server
from tests.support import chain

#: The least ping interval the server accepts from clients, lowered from 5 s so that the
#: test takes seconds; a client keepalive twice that, and a task long enough for gRPC's
#: default policy (5 minutes) to have closed the connection: a strike for each ping while
#: the server sends nothing, GOAWAY at the third (6 s).
CLIENT_MIN_PING_MS = 1_000
CLIENT_KEEPALIVE_MS = 2_000
TASK_SECONDS = 7.0


def test_the_least_ping_interval_admits_a_10_second_client_keepalive() -> None:
    # grpc-java and grpc-go allow no client keepalive under 10 s.
    assert server_module.CLIENT_MIN_PING_INTERVAL_MS <= 10_000


async def test_a_client_with_keepalive_keeps_its_stream_through_a_long_task(
    monkeypatch: pytest.MonkeyPatch, registry: TaskRegistry, settings: Settings
) -> None:
    monkeypatch.setattr(server_module, "CLIENT_MIN_PING_INTERVAL_MS", CLIENT_MIN_PING_MS)
    server = await build_server(settings, registry)
    options = [
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # grpc's own client otherwise stops pinging after two pings with no data sent.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
            stub = flow_service_pb2_grpc.FlowServiceStub(ch)
            request = flow_service_pb2.StreamFlowRequest(
                flow=chain(("sleep", {"seconds": TASK_SECONDS}))
            )
            events = [m async for m in stub.StreamFlow(request, timeout=TASK_SECONDS + 20)]
    finally:
        await server.shutdown(grace=0)
    assert [m.WhichOneof("event") for m in events] == ["started", "task_result", "finished"]
    assert events[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED


class _FreezableProxy:
    """A TCP relay to the server that can stop relaying while keeping its sockets open:
    the client's network path goes silent, as when a client machine or a NAT vanishes,
    and nothing tells the server (no FIN, no RST)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._relays: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            relay = asyncio.ensure_future(self._relay(source, sink))
            self._relays.add(relay)

    @staticmethod
    async def _relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()

    async def freeze(self) -> None:
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def close(self) -> None:
        await self.freeze()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


async def test_a_client_whose_network_vanished_is_found_gone_and_its_flow_cancelled(
    monkeypatch: pytest.MonkeyPatch, registry: TaskRegistry, settings: Settings
) -> None:
    # The server's keepalive shortened from 60 s + 20 s, so that the test takes seconds.
    monkeypatch.setattr(server_module, "SERVER_KEEPALIVE_TIME_MS", 1_000, raising=False)
    monkeypatch.setattr(server_module, "SERVER_KEEPALIVE_TIMEOUT_MS", 1_000, raising=False)
    srv = await build_server(settings, registry)
    proxy = _FreezableProxy(srv.port)
    try:
        proxy_port = await proxy.start()
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}") as far,
            grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as near,
        ):
            request = flow_service_pb2.StreamFlowRequest(flow=chain(("sleep", {"seconds": 60})))
            call = flow_service_pb2_grpc.FlowServiceStub(far).StreamFlow(request)
            started = await call.read()
            await proxy.freeze()
            stub = flow_service_pb2_grpc.FlowServiceStub(near)
            get = flow_service_pb2.GetExecutionRequest(flow_id=started.started.flow_id)
            deadline = time.monotonic() + 15
            while (execution := (await stub.GetExecution(get)).execution).status == (
                flow_pb2.FLOW_STATUS_RUNNING
            ):
                assert time.monotonic() < deadline, "the server never noticed its client gone"
                await asyncio.sleep(0.1)
            assert execution.status == flow_pb2.FLOW_STATUS_CANCELLED
            assert "caller went away" in execution.message
            call.cancel()
    finally:
        await proxy.close()
        await srv.shutdown(grace=0)


async def test_a_burst_far_over_the_cap_is_resource_exhausted_never_cancelled(
    registry: TaskRegistry, settings: Settings
) -> None:
    # grpc itself cancelled calls that came faster than the server took them, once more
    # than 3,000 were pending: status CANCELLED, which clients read as their own doing and
    # do not retry. Each one must reach the cap and get RESOURCE_EXHAUSTED instead.
    release = asyncio.Event()

    @registry.task("held")
    async def held() -> None:
        await release.wait()

    capped = dataclasses.replace(settings, max_in_flight=10)
    srv = await build_server(capped, registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            request = flow_service_pb2.ExecuteFlowRequest(flow=chain("held"))
            calls = [asyncio.ensure_future(stub.ExecuteFlow(request)) for _ in range(3500)]
            try:
                # All but the 10 running ones are answered while those are held.
                deadline = time.monotonic() + 60
                while sum(call.done() for call in calls) < 3490:
                    assert time.monotonic() < deadline, sum(call.done() for call in calls)
                    await asyncio.sleep(0.05)
            finally:
                release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await srv.shutdown(grace=0)
    codes = [
        r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results
    ]
    assert grpc.StatusCode.CANCELLED not in codes, collections.Counter(codes)
    assert collections.Counter(codes) == {
        grpc.StatusCode.OK: 10,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 3490,
    }
