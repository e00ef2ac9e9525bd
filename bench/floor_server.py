"""The floor: FlowService on the same stack as flowsvc, answering from canned messages.

Same generated code, same grpc.aio server, same request deserializer and same process
model (one process, one event loop, uvloop when flowsvc uses it), but no engine, no
store, no tasks: ExecuteFlow returns a canned ExecuteFlowResponse and StreamFlow yields
canned StreamFlowResponse messages, of the same size as flowsvc's real answers to the
benchmark flow. What flowsvc adds on top of this is what it costs.

    python bench/floor_server.py --execute EXECUTE.bin --stream STREAM.bin [--uvloop]

EXECUTE.bin holds one serialized ExecuteFlowResponse; STREAM.bin holds the stream's
messages, each prefixed with its length (4 bytes, big-endian). Prints
"floor: serving on 127.0.0.1:PORT" once it listens.

With `--minimal` it is the **ceiling** instead: answers of the same shape, made for each
call by the least work any flow engine in Python must do (a new flow id, a timestamp
per step, one awaited coroutine per task, the answer built from what they returned),
with no validation, no store, no events and no cancellation. No Python flow manager on
this stack can go faster than this; scripts/bench reports it beside flowsvc.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from flowmanager.v1 import flow_pb2
from flowmanager.v1 import flow_service_pb2 as pb
from google.protobuf import timestamp_pb2

from flowsvc.servicer import safe_deserializer

SERVICE = "flowmanager.v1.FlowService"


def read_stream(path: Path) -> list[pb.StreamFlowResponse]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        out.append(pb.StreamFlowResponse.FromString(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return out


def canned(execute: pb.ExecuteFlowResponse, stream: list[pb.StreamFlowResponse]) -> Any:
    async def execute_flow(request: Any, context: Any) -> pb.ExecuteFlowResponse:
        return execute

    async def stream_flow(request: Any, context: Any) -> AsyncIterator[pb.StreamFlowResponse]:
        for message in stream:
            yield message

    return execute_flow, stream_flow


async def _noop() -> None:
    return None


def _now(out: timestamp_pb2.Timestamp) -> None:
    ns = time.time_ns()
    out.seconds, out.nanos = divmod(ns, 1_000_000_000)


def minimal() -> Any:
    """The ceiling's handlers: a task chain routed by the request's conditions (the route
    table cached by the flow's bytes, as any engine would), each task a no-op coroutine."""
    routes: dict[bytes, tuple[str, list[str]]] = {}

    def chain(request: Any) -> tuple[str, list[str]]:
        key = request.flow.SerializeToString(deterministic=True)
        found = routes.get(key)
        if found is None:
            nxt = {c.source_task: c.target_task_success for c in request.flow.conditions}
            names, current = [], request.flow.start_task
            while current and current != "end":
                names.append(current)
                current = nxt.get(current, "end")
            found = routes[key] = (request.flow.name, names)
        return found

    async def run_step(result: flow_pb2.TaskResult, name: str, step: int) -> None:
        _now(result.started_at)
        t0 = time.perf_counter_ns()
        await _noop()
        result.duration.nanos = time.perf_counter_ns() - t0
        result.task, result.status = name, flow_pb2.TASK_STATUS_SUCCESS
        result.step, result.attempt = step, 1

    def message(names: list[str]) -> str:
        return (
            f"Flow executed successfully: {len(names)} task run(s), "
            f"last task {names[-1]!r} succeeded"
        )

    async def execute_flow(request: Any, context: Any) -> pb.ExecuteFlowResponse:
        _, names = chain(request)
        out = pb.ExecuteFlowResponse(flow_id=str(uuid.uuid4()))
        for step, name in enumerate(names, 1):
            await run_step(out.execution_history.add(), name, step)
        out.status = flow_pb2.FLOW_STATUS_SUCCEEDED
        out.message = message(names)
        return out

    async def stream_flow(request: Any, context: Any) -> AsyncIterator[pb.StreamFlowResponse]:
        flow_name, names = chain(request)
        flow_id = str(uuid.uuid4())
        first = pb.StreamFlowResponse(sequence=1)
        first.started.flow_id, first.started.flow_name = flow_id, flow_name
        _now(first.started.started_at)
        yield first
        for step, name in enumerate(names, 1):
            out = pb.StreamFlowResponse(sequence=step + 1)
            await run_step(out.task_result, name, step)
            yield out
        last = pb.StreamFlowResponse(sequence=len(names) + 2)
        last.finished.status = flow_pb2.FLOW_STATUS_SUCCEEDED
        last.finished.message = message(names)
        _now(last.finished.finished_at)
        last.finished.steps = len(names)
        yield last

    return execute_flow, stream_flow


async def serve(handler_pair: Any) -> None:
    execute_flow, stream_flow = handler_pair
    handlers = {
        "ExecuteFlow": grpc.unary_unary_rpc_method_handler(
            execute_flow,
            request_deserializer=safe_deserializer(pb.ExecuteFlowRequest),
            response_serializer=pb.ExecuteFlowResponse.SerializeToString,
        ),
        "StreamFlow": grpc.unary_stream_rpc_method_handler(
            stream_flow,
            request_deserializer=safe_deserializer(pb.StreamFlowRequest),
            response_serializer=pb.StreamFlowResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", 100000),
            ("grpc.server.max_pending_requests_hard_limit", 200000),
        ]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"floor: serving on 127.0.0.1:{port}", flush=True)  # the ceiling's line too
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--execute", type=Path, required=True)
    parser.add_argument("--stream", type=Path, required=True)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--minimal", action="store_true", help="the ceiling (see above)")
    args = parser.parse_args()
    if args.minimal:
        handlers = minimal()
    else:
        execute = pb.ExecuteFlowResponse.FromString(args.execute.read_bytes())
        handlers = canned(execute, read_stream(args.stream))
    if args.uvloop:
        import uvloop

        uvloop.run(serve(handlers))
    else:
        asyncio.run(serve(handlers))


if __name__ == "__main__":
    main()
