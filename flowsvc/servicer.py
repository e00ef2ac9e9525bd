"""FlowService RPC methods: convert -> engine -> convert, and one error table.

Each method is a few lines; every exception is turned into a gRPC status in
`_status_for`, the single place where errors meet status codes. An error's `reason`
picks its code in `REASONS`; every status also carries a google.rpc.ErrorInfo (that
reason, domain `ERROR_DOMAIN`, the error's metadata), beside these details:

    InvalidArgumentError     -> INVALID_ARGUMENT + google.rpc.BadRequest field violations
    MalformedRequest         -> INVALID_ARGUMENT (bytes that do not parse as the request)
    TooManyExecutionsError   -> RESOURCE_EXHAUSTED + google.rpc.RetryInfo
    NotFoundError            -> NOT_FOUND
    FailedPreconditionError  -> FAILED_PRECONDITION
    StillStoppingError       -> DEADLINE_EXCEEDED
    AlreadyExistsError       -> ALREADY_EXISTS
    ShuttingDownError        -> UNAVAILABLE (the server is draining; retry elsewhere)
    StoreUnavailableError    -> UNAVAILABLE (the execution store cannot read or write)
    UnknownMethodError       -> UNIMPLEMENTED
    any other exception      -> INTERNAL with an error id; the traceback goes to the log only

A task that fails is not an error: it is in the response, with status FAILED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from flowmanager.v1 import flow_service_pb2 as pb
from flowmanager.v1 import flow_service_pb2_grpc as pb_grpc
from google.protobuf import message as pb_message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from flowsvc import convert
from flowsvc.errors import (
    FlowsvcError,
    FlowValidationError,
    InvalidArgumentError,
    ResponseTooLargeError,
    TooManyExecutionsError,
    Violation,
)
from flowsvc.executions import OFF_LOOP_BYTES, Attachment, ExecutionManager, parse_flow_id
from flowsvc.metrics import Metrics
from flowsvc.models import Event, Flow
from flowsvc.store import ExecutionRecord

logger = logging.getLogger("flowsvc.servicer")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class MalformedRequest:
    """What the request deserializer hands over when the bytes do not parse."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error


def safe_deserializer(
    cls: type[pb_message.Message], name: str | None = None
) -> Callable[[bytes], Any]:
    """A request deserializer that never raises (grpc would answer UNKNOWN/INTERNAL);
    `name`: the request type's name in errors, when not `cls`'s own."""
    own = cls.DESCRIPTOR.full_name
    name = name or own

    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except pb_message.DecodeError as exc:
            # protobuf's text names the class's type ("Error parsing message with type
            # '...'"): the one served is named, as in the rest of the message.
            return MalformedRequest(name, str(exc).replace(own, name) or "cannot decode")

    return deserialize


#: Budget for the BadRequest detail. It travels in the trailers, and gRPC clients refuse
#: trailers past 8-16 KiB by default (the call would fail RESOURCE_EXHAUSTED instead).
MAX_DETAIL_BYTES = 4096
#: The status message, in UTF-8 bytes: it travels twice, in grpc-status-details-bin and
#: percent-encoded in grpc-message (3 bytes for each byte past ASCII), so that counting
#: characters let a non-ASCII one take 12 times its budget in the trailers.
MAX_MESSAGE_BYTES = 512


def _clip(text: str, max_bytes: int) -> str:
    """`text` cut to `max_bytes` of UTF-8, at a character's boundary."""
    if len(text) * 4 <= max_bytes:
        return text  # the usual short text: no encoding
    return text.encode()[:max_bytes].decode(errors="ignore")


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


#: The domain of every google.rpc.ErrorInfo: the server, which owns the reasons below.
#: Not a proto service name: they are sent by its health service and for unknown
#: methods too, and a flowmanager.v2 would keep them.
ERROR_DOMAIN = "flowsvc"

#: Every reason a client may be sent, and its code: the one table of errors to statuses.
#: The README's "Status codes" lists the same reasons (a test compares the two).
REASONS: dict[str, int] = {
    "FLOW_INVALID": code_pb2.INVALID_ARGUMENT,
    "ARGUMENT_INVALID": code_pb2.INVALID_ARGUMENT,
    "PAGE_TOKEN_INVALID": code_pb2.INVALID_ARGUMENT,
    "FLOW_INPUT_TOO_LARGE": code_pb2.INVALID_ARGUMENT,
    "REQUEST_MALFORMED": code_pb2.INVALID_ARGUMENT,
    "MAX_IN_FLIGHT_EXCEEDED": code_pb2.RESOURCE_EXHAUSTED,
    "RESPONSE_TOO_LARGE": code_pb2.RESOURCE_EXHAUSTED,
    "EXECUTION_NOT_FOUND": code_pb2.NOT_FOUND,
    "SERVICE_NOT_FOUND": code_pb2.NOT_FOUND,
    "EXECUTION_ENDED": code_pb2.FAILED_PRECONDITION,
    "EXECUTION_ENDED_BEFORE_CANCEL": code_pb2.FAILED_PRECONDITION,
    "REQUEST_ID_ABANDONED": code_pb2.FAILED_PRECONDITION,
    "EXECUTION_STILL_STOPPING": code_pb2.DEADLINE_EXCEEDED,
    "REQUEST_ID_REUSED": code_pb2.ALREADY_EXISTS,
    "SERVER_SHUTTING_DOWN": code_pb2.UNAVAILABLE,
    "EXECUTION_INTERRUPTED": code_pb2.UNAVAILABLE,
    "STORE_UNAVAILABLE": code_pb2.UNAVAILABLE,
    "METHOD_NOT_FOUND": code_pb2.UNIMPLEMENTED,
    "INTERNAL_ERROR": code_pb2.INTERNAL,
}

#: An ErrorInfo metadata value longer than this, in UTF-8 bytes, is cut (it travels in
#: the trailers too, beside the message and the BadRequest).
MAX_METADATA_BYTES = 256


def _error_info(reason: str, metadata: dict[str, str]) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    for key, value in metadata.items():
        info.metadata[key] = _clip(value, MAX_METADATA_BYTES)
    return info


def _status_for(exc: BaseException, method: str) -> status_pb2.Status:
    """The one table from exceptions to gRPC statuses: the code the error's reason has in
    REASONS, its message, its details and its ErrorInfo."""
    if isinstance(exc, FlowsvcError) and exc.reason in REASONS:
        status = status_pb2.Status(
            code=REASONS[exc.reason], message=_clip(str(exc), MAX_MESSAGE_BYTES)
        )
        if isinstance(exc, InvalidArgumentError):
            status.message = _clip(f"{exc.subject}: {exc}", MAX_MESSAGE_BYTES)
            status.details.add().Pack(_bad_request(exc.violations))
        elif isinstance(exc, _MalformedRequestError):
            status.message = f"request is not a valid {exc.request.type_name}: {exc.request.error}"
        elif isinstance(exc, TooManyExecutionsError):
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(round(exc.retry_after * 1e9))
            status.details.add().Pack(retry)
        status.details.add().Pack(_error_info(exc.reason, exc.metadata))
        return status
    error_id = uuid.uuid4().hex[:12]
    logger.error(
        "unexpected error",
        exc_info=exc,
        extra={"error_id": error_id, "method": method},
    )
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (error id {error_id}); the server log has the details",
    )
    status.details.add().Pack(_error_info("INTERNAL_ERROR", {"errorId": error_id}))
    return status


class _MalformedRequestError(FlowsvcError):
    reason = "REQUEST_MALFORMED"

    def __init__(self, request: MalformedRequest) -> None:
        super().__init__(request.error, metadata={"requestType": request.type_name})
        self.request = request


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: Exception,
    method: str,
    metrics: Metrics | None = None,
) -> None:
    if metrics is not None:
        metrics.rpc_error(method, _reason_for(exc))
    status = rpc_status.to_status(_status_for(exc, method))
    await context.abort(status.code, status.details, status.trailing_metadata)


def _reason_for(exc: BaseException) -> str:
    """The ErrorInfo reason `exc` is answered with (see _status_for)."""
    if isinstance(exc, FlowsvcError) and exc.reason in REASONS:
        return exc.reason
    return "INTERNAL_ERROR"


async def abort_malformed(
    context: grpc.aio.ServicerContext[Any, Any], request: MalformedRequest
) -> None:
    """End the call INVALID_ARGUMENT for a request that did not parse (raises AbortError);
    for the health and reflection services, whose servicers are grpc's own."""
    await _abort(context, _MalformedRequestError(request), "")


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: FlowsvcError) -> None:
    """End the call with the status of `exc` (raises AbortError): for the calls the
    server answers outside FlowService (health, unknown methods), through the same table."""
    await _abort(context, exc, "")


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Wrap a unary method: malformed requests and exceptions become statuses."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        self.last_call = time.monotonic()
        if self.metrics is not None:
            self.metrics.rpc(fn.__name__)
        try:
            if isinstance(request, MalformedRequest):
                raise _MalformedRequestError(request)
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__, self.metrics)
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
        self.last_call = time.monotonic()
        if self.metrics is not None:
            self.metrics.rpc(fn.__name__)
        try:
            if isinstance(request, MalformedRequest):
                raise _MalformedRequestError(request)
            responses = fn(self, request, context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()  # what contextlib.aclosing does, a layer cheaper
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__name__, self.metrics)

    return wrapper


#: A call that ends this close to its deadline ended by its deadline. The client ends it
#: when its own deadline passes; the server's copy of the deadline counts from when the
#: request arrived, a few milliseconds (a network's latency) later.
DEADLINE_SLACK_SECONDS = 0.5


#: An answer holding more events than this is built in a thread, not on the event loop:
#: the 100,000 steps of a long loop (3.4 MB, under --max-response-bytes) took 0.3 to
#: 0.45 s to convert, a stall of every flow and health check for each ExecuteFlow or
#: GetExecution of it. (The thread shares the GIL: the loop runs between its slices.)
EVENTS_ON_LOOP = 1000


def _gone(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """How a caller that did not take its answer went away, as far as the server can tell
    (gRPC shows a client's cancel and a lost connection alike)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining < DEADLINE_SLACK_SECONDS:
        return "its deadline passed"
    return "it cancelled the call or disconnected"


class FlowServicer(pb_grpc.FlowServiceServicer):
    """flowmanager.v1.FlowService: convert, call the manager or engine, convert back."""

    def __init__(
        self,
        manager: ExecutionManager,
        max_response_bytes: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.manager = manager
        self.engine = manager.engine
        #: Counts calls and error statuses, if given.
        self.metrics = metrics
        #: The largest answer carrying a whole execution (0: no limit).
        self.max_response_bytes = max_response_bytes
        #: When (monotonic) the last call reached a method: a draining server waits for
        #: the calls still coming to stop before it stops listening (see FlowServer).
        self.last_call = 0.0

    async def _start(self, request: pb.ExecuteFlowRequest | pb.StreamFlowRequest) -> Attachment:
        # The flow's bytes key the manager's cache of validated flows: a flow sent before
        # is neither converted nor validated again.
        key = (
            request.flow.SerializeToString(deterministic=True) if request.HasField("flow") else None
        )
        input_bytes = request.input.ByteSize()
        if input_bytes > OFF_LOOP_BYTES:  # converted in a thread, as a large flow is
            flow_input = await asyncio.to_thread(convert.struct_from_pb, request.input, "input")
        else:
            flow_input = convert.struct_from_pb(request.input, "input")
        return await self.manager.start(
            lambda: self._flow_of(request),
            flow_input,
            request_id=request.request_id,
            continue_on_disconnect=request.continue_on_disconnect,
            cache_key=key,
            input_bytes=input_bytes,
        )

    def _flow_of(
        self,
        request: pb.ExecuteFlowRequest | pb.StreamFlowRequest | pb.ValidateFlowRequest,
    ) -> Flow | None:
        """The request's flow as a model. A flow of more tasks or conditions than the
        server takes is refused on their counts, before they are converted (seconds of
        the event loop for the million a few MB can hold)."""
        if request.HasField("flow"):
            flow = request.flow
            too_many = self.engine.count_violations(len(flow.tasks), len(flow.conditions))
            if too_many:
                raise FlowValidationError(too_many)
        return convert.request_flow_from_pb(request)

    @unary
    async def ExecuteFlow(
        self, request: pb.ExecuteFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteFlowResponse:
        attachment = await self._start(request)
        completed = False
        try:
            events = await self.manager.drain(attachment)
            completed = True
        finally:
            self.manager.release(
                attachment, completed=completed, gone="" if completed else _gone(context)
            )
        if len(events) > EVENTS_ON_LOOP:
            return await asyncio.to_thread(
                convert.execute_response_from_events,
                attachment.flow_id,
                events,
                self.max_response_bytes,
            )
        return convert.execute_response_from_events(
            attachment.flow_id, events, self.max_response_bytes
        )

    @streaming
    async def StreamFlow(
        self, request: pb.StreamFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[pb.StreamFlowResponse, None]:
        attachment = await self._start(request)
        completed = False
        try:
            async for sequence, event in self.manager.events(attachment):
                yield convert.event_to_pb(event, sequence, pb.StreamFlowResponse)
            completed = True
        finally:
            self.manager.release(
                attachment, completed=completed, gone="" if completed else _gone(context)
            )

    @streaming
    async def WatchExecution(
        self, request: pb.WatchExecutionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[pb.WatchExecutionResponse, None]:
        flow_id = parse_flow_id(request.flow_id)
        async for sequence, event in self.manager.follow(flow_id, request.after_sequence):
            yield convert.event_to_pb(event, sequence, pb.WatchExecutionResponse)

    @unary
    async def GetExecution(
        self, request: pb.GetExecutionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetExecutionResponse:
        flow_id = parse_flow_id(request.flow_id)
        response = pb.GetExecutionResponse()
        if request.view == pb.EXECUTION_VIEW_BASIC:
            record = await self.manager.record(flow_id)
            convert.basic_execution_to_pb(record, response.execution, self.max_response_bytes)
            return response
        if request.view not in (pb.EXECUTION_VIEW_UNSPECIFIED, pb.EXECUTION_VIEW_FULL):
            raise InvalidArgumentError.one("view", f"{request.view} is not an ExecutionView")
        record, events = await self.manager.get(flow_id)
        await self._execution_to_pb(record, events, response.execution)
        return response

    async def _execution_to_pb(
        self, record: ExecutionRecord, events: list[Event], out: pb.Execution
    ) -> None:
        """Fill `out` with the execution and its history (in a thread, when it is long)."""
        if len(events) > EVENTS_ON_LOOP:
            await asyncio.to_thread(
                convert.stored_execution_to_pb, record, events, out, self.max_response_bytes
            )
        else:
            convert.stored_execution_to_pb(record, events, out, self.max_response_bytes)

    @unary
    async def CancelExecution(
        self, request: pb.CancelExecutionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelExecutionResponse:
        record, events = await self.manager.cancel(parse_flow_id(request.flow_id))
        response = pb.CancelExecutionResponse()
        try:
            await self._execution_to_pb(record, events, response.execution)
        except ResponseTooLargeError:
            # The cancel took effect: say so, without the history that does not fit.
            response.execution.Clear()
            convert.basic_execution_to_pb(record, response.execution, self.max_response_bytes)
        return response

    @unary
    async def ListExecutions(
        self, request: pb.ListExecutionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListExecutionsResponse:
        try:
            status = convert.flow_status_from_pb(request.status)
        except ValueError as exc:
            raise InvalidArgumentError.one("status", str(exc)) from None
        records, next_token = await self.manager.page(
            request.page_size, request.page_token, status, request.flow_name
        )
        response = pb.ListExecutionsResponse(next_page_token=next_token)
        for record in records:
            convert.summary_to_pb(record, response.executions.add())
        return response

    @unary
    async def ValidateFlow(
        self, request: pb.ValidateFlowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ValidateFlowResponse:
        if request.flow.ByteSize() > OFF_LOOP_BYTES:  # in a thread, as ExecuteFlow's
            return await asyncio.to_thread(self._validate, request)
        return self._validate(request)

    def _validate(self, request: pb.ValidateFlowRequest) -> pb.ValidateFlowResponse:
        """The violations of the request's flow (on the loop, or in a thread: it touches
        nothing shared, and the answer is a message of its own)."""
        try:
            flow = self._flow_of(request)
        except FlowValidationError as exc:  # too large, or params no JSON can hold: data
            return convert.violations_to_pb(exc.violations, self.max_response_bytes)
        return convert.violations_to_pb(self.engine.validate(flow), self.max_response_bytes)

    @unary
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTasksResponse:
        return convert.tasks_to_pb(list(self.engine.registry))


__all__ = [
    "ERROR_DOMAIN",
    "REASONS",
    "FlowServicer",
    "MalformedRequest",
    "abort_malformed",
    "abort_with",
    "safe_deserializer",
]
