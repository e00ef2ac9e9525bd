"""FlowService RPC methods: convert -> engine -> convert, and one error table.

Each method is a few lines; every exception is turned into a gRPC status in
`_status_for`, the single place where errors meet status codes:

    FlowValidationError  -> INVALID_ARGUMENT + google.rpc.BadRequest field violations
    MalformedRequest     -> INVALID_ARGUMENT (bytes that do not parse as the request)
    ShuttingDown         -> UNAVAILABLE (the server is draining; retry elsewhere)
    any other exception  -> INTERNAL with an error id; the traceback goes to the log only

A task that fails is not an error: it is in the response, with status FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from flowmanager.v1 import flow_service_pb2 as pb
from flowmanager.v1 import flow_service_pb2_grpc as pb_grpc
from google.protobuf import message as pb_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from flowsvc import convert
from flowsvc.engine import FlowEngine, StopHandle
from flowsvc.errors import FlowValidationError, Violation

logger = logging.getLogger("flowsvc.servicer")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class MalformedRequest:
    """What the request deserializer hands over when the bytes do not parse."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error


def safe_deserializer(cls: type[pb_message.Message]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises (grpc would answer UNKNOWN/INTERNAL)."""
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except pb_message.DecodeError as exc:
            return MalformedRequest(name, str(exc) or "cannot decode")

    return deserialize


class ShuttingDownError(Exception):
    """A new flow arrived after shutdown began."""


#: Budget for the BadRequest detail. It travels in the trailers, and gRPC clients refuse
#: trailers past 8-16 KiB by default (the call would fail RESOURCE_EXHAUSTED instead).
MAX_DETAIL_BYTES = 4096
MAX_MESSAGE_CHARS = 512


def _bad_request(violations: Sequence[Violation]) -> error_details_pb2.BadRequest:
    """As many violations as fit the budget, then one line saying how many were left out."""
    bad = error_details_pb2.BadRequest()
    for i, v in enumerate(violations):
        bad.field_violations.add(field=v.field, description=v.description)
        if bad.ByteSize() > MAX_DETAIL_BYTES:
            del bad.field_violations[-1]
            left = len(violations) - i
            bad.field_violations.add(
                field="flow",
                description=f"... and {left} more violation(s); ValidateFlow returns them all",
            )
            break
    return bad


def _status_for(exc: BaseException, method: str) -> status_pb2.Status:
    """The one table from exceptions to gRPC statuses."""
    if isinstance(exc, FlowValidationError):
        status = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT,
            message=f"invalid flow: {exc}"[:MAX_MESSAGE_CHARS],
        )
        status.details.add().Pack(_bad_request(exc.violations))
        return status
    if isinstance(exc, _MalformedRequestError):
        return status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT,
            message=f"request is not a valid {exc.request.type_name}: {exc.request.error}",
        )
    if isinstance(exc, ShuttingDownError):
        return status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message="server is shutting down; retry on another instance",
        )
    error_id = uuid.uuid4().hex[:12]
    logger.error(
        "unexpected error",
        exc_info=exc,
        extra={"error_id": error_id, "method": method},
    )
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (error id {error_id}); the server log has the details",
    )


class _MalformedRequestError(Exception):
    def __init__(self, request: MalformedRequest) -> None:
        super().__init__(request.error)
        self.request = request


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    status = rpc_status.to_status(_status_for(exc, method))
    await context.abort(status.code, status.details, status.trailing_metadata)


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Wrap a unary method: malformed requests and exceptions become statuses."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            if isinstance(request, MalformedRequest):
                raise _MalformedRequestError(request)
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)
            raise AssertionError("abort returned") from exc  # pragma: no cover

    return wrapper


def streaming(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp, None]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp, None]]:
    """Wrap a server-streaming method the same way as `unary`."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncGenerator[Resp, None]:
        try:
            if isinstance(request, MalformedRequest):
                raise _MalformedRequestError(request)
            async with contextlib.aclosing(fn(self, request, context)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__)

    return wrapper


class FlowServicer(pb_grpc.FlowServiceServicer):
    """flowmanager.v1.FlowService on top of a FlowEngine."""

    def __init__(self, engine: FlowEngine) -> None:
        self.engine = engine
        self.draining = False
        self._running: set[StopHandle] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active_flows(self) -> int:
        return len(self._running)

    @contextlib.contextmanager
    def _flow_slot(self) -> Iterator[StopHandle]:
        """Track a running flow, refusing new ones once shutdown has begun."""
        if self.draining:
            raise ShuttingDownError
        handle = StopHandle()
        self._running.add(handle)
        self._idle.clear()
        try:
            yield handle
        finally:
            self._running.discard(handle)
            if not self._running:
                self._idle.set()

    def stop_all(self, reason: str) -> None:
        """Ask every running flow to stop (it ends CANCELLED and its RPC returns OK)."""
        for handle in list(self._running):
            handle.request(reason)

    async def wait_idle(self) -> None:
        """Return once no flow is running."""
        await self._idle.wait()

    @unary
    async def ExecuteFlow(
        self, request: pb.ExecuteFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteFlowResponse:
        plan = self.engine.prepare(convert.request_flow_from_pb(request))
        with self._flow_slot() as stop:
            execution = await self.engine.run(
                plan, convert.struct_from_pb(request.input), stop=stop
            )
        return convert.execution_to_pb(execution)

    @streaming
    async def StreamFlow(
        self, request: pb.StreamFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[pb.StreamFlowResponse, None]:
        plan = self.engine.prepare(convert.request_flow_from_pb(request))
        with self._flow_slot() as stop:
            events = self.engine.events(plan, convert.struct_from_pb(request.input), stop=stop)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield convert.event_to_pb(event)

    @unary
    async def ValidateFlow(
        self, request: pb.ValidateFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ValidateFlowResponse:
        return convert.violations_to_pb(self.engine.validate(convert.request_flow_from_pb(request)))

    @unary
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTasksResponse:
        return convert.tasks_to_pb(list(self.engine.registry))


__all__ = ["FlowServicer", "MalformedRequest", "safe_deserializer"]
