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
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from flowmanager.v1 import flow_service_pb2 as pb

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


async def serve(execute: pb.ExecuteFlowResponse, stream: list[pb.StreamFlowResponse]) -> None:
    async def execute_flow(request: Any, context: Any) -> pb.ExecuteFlowResponse:
        return execute

    async def stream_flow(request: Any, context: Any) -> AsyncIterator[pb.StreamFlowResponse]:
        for message in stream:
            yield message

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
    print(f"floor: serving on 127.0.0.1:{port}", flush=True)
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
    args = parser.parse_args()
    execute = pb.ExecuteFlowResponse.FromString(args.execute.read_bytes())
    stream = read_stream(args.stream)
    if args.uvloop:
        import uvloop

        uvloop.run(serve(execute, stream))
    else:
        asyncio.run(serve(execute, stream))


if __name__ == "__main__":
    main()
