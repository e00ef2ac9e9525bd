"""Pure conversions between generated protobuf messages and engine models.

The only module besides the servicer that builds or reads generated messages.
Functions are named `x_from_pb` / `x_to_pb`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from flowmanager.v1 import flow_pb2, flow_service_pb2
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from flowsvc.errors import (
    FlowValidationError,
    InvalidArgumentError,
    ResponseTooLargeError,
    Violation,
)
from flowsvc.models import (
    NO_RETRY,
    Condition,
    Event,
    Flow,
    FlowFinished,
    FlowStarted,
    FlowStatus,
    RetryPolicy,
    StepRecord,
    Task,
    TaskCompleted,
    TaskStatus,
)
from flowsvc.references import json_copy, where
from flowsvc.registry import TaskSpec
from flowsvc.store import ExecutionRecord, ExecutionSummary

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TASK_STATUS_TO_PB = {
    TaskStatus.SUCCESS: flow_pb2.TASK_STATUS_SUCCESS,
    TaskStatus.FAILURE: flow_pb2.TASK_STATUS_FAILURE,
}
_FLOW_STATUS_TO_PB = {
    FlowStatus.RUNNING: flow_pb2.FLOW_STATUS_RUNNING,
    FlowStatus.SUCCEEDED: flow_pb2.FLOW_STATUS_SUCCEEDED,
    FlowStatus.FAILED: flow_pb2.FLOW_STATUS_FAILED,
    FlowStatus.CANCELLED: flow_pb2.FLOW_STATUS_CANCELLED,
    FlowStatus.INTERRUPTED: flow_pb2.FLOW_STATUS_INTERRUPTED,
    FlowStatus.TIMED_OUT: flow_pb2.FLOW_STATUS_TIMED_OUT,
}


def struct_from_pb(
    struct: struct_pb2.Struct,
    field: str = "",
    error: type[InvalidArgumentError] = InvalidArgumentError,
) -> dict[str, Any]:
    """A Struct as a plain dict (numbers come back as floats, as in JSON). A number that
    is NaN or Infinity, which JSON has not (protobuf's own JSON refuses it in a Value),
    is `error` naming it below `field`."""
    if not struct.fields:
        return {}  # most inputs: MessageToDict costs microseconds even for nothing
    try:
        return json_format.MessageToDict(struct)
    except ValueError:
        for key, value in struct.fields.items():
            if (found := _not_finite(value)) is not None:
                inner, number = found
                path = f"{field}{where((key, *reversed(inner)))}"
                raise error.one(path, f"is {number}, not a JSON number") from None
        raise


def _not_finite(value: struct_pb2.Value) -> tuple[list[str | int], float] | None:
    """The first NaN or Infinity in `value`, and where it is below `value` (keys and
    indexes, innermost first: no path is written for the values passed by, whose every
    one cost the length of the keys above it again). The decoder bounds how deep this
    recurses."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return None if math.isfinite(value.number_value) else ([], value.number_value)
    segment: str | int
    if kind == "struct_value":
        for segment, item in value.struct_value.fields.items():
            if (found := _not_finite(item)) is not None:
                found[0].append(segment)
                return found
    elif kind == "list_value":
        for segment, item in enumerate(value.list_value.values):
            if (found := _not_finite(item)) is not None:
                found[0].append(segment)
                return found
    return None


def struct_to_pb(data: Mapping[str, Any], out: struct_pb2.Struct) -> None:
    """Fill `out` from a JSON-compatible mapping (read-only mappings and tuples too)."""
    if data:
        try:
            out.update(data)
        except (TypeError, ValueError):
            out.Clear()
            out.update(json_copy(data))


#: A Duration's nanos, as protobuf defines it: within a second, of the sign of its seconds.
_MAX_NANOS = 999_999_999


def _seconds(duration: duration_pb2.Duration, field: str) -> float:
    """A Duration in seconds; FlowValidationError naming `field` for one that protobuf
    calls invalid (nanos past a second, or of the other sign than seconds), which an
    encoder that checks nothing sends as given: adding them up would run, and store, a
    length that nobody wrote."""
    seconds, nanos = duration.seconds, duration.nanos
    if abs(nanos) > _MAX_NANOS or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise FlowValidationError.one(
            field,
            f"is not a valid Duration (seconds {seconds}, nanos {nanos}): nanos must be "
            f"within +-{_MAX_NANOS:,} and of the sign of seconds",
        )
    return seconds + nanos / 1e9


def _duration(seconds: float, out: duration_pb2.Duration) -> None:
    out.FromNanoseconds(round(seconds * 1e9))


def retry_from_pb(pb: flow_pb2.RetryPolicy, prefix: str = "retry") -> RetryPolicy:
    """Unset fields take their documented defaults."""
    return RetryPolicy(
        max_attempts=pb.max_attempts or 1,
        initial_backoff_s=_seconds(pb.initial_backoff, f"{prefix}.initial_backoff")
        if pb.HasField("initial_backoff")
        else 1.0,
        backoff_multiplier=pb.backoff_multiplier or 2.0,
        max_backoff_s=_seconds(pb.max_backoff, f"{prefix}.max_backoff")
        if pb.HasField("max_backoff")
        else 60.0,
        non_retryable_errors=tuple(pb.non_retryable_errors),
    )


def task_from_pb(pb: flow_pb2.Task, prefix: str = "task") -> Task:
    return Task(
        name=pb.name,
        description=pb.description,
        params=struct_from_pb(pb.params, f"{prefix}.params", FlowValidationError),
        timeout_s=_seconds(pb.timeout, f"{prefix}.timeout") if pb.HasField("timeout") else None,
        retry=retry_from_pb(pb.retry, f"{prefix}.retry") if pb.HasField("retry") else NO_RETRY,
    )


def flow_from_pb(pb: flow_pb2.Flow) -> Flow:
    """A Flow model from its message (not validated)."""
    return Flow(
        name=pb.name,
        start_task=pb.start_task,
        timeout_s=_seconds(pb.timeout, "flow.timeout") if pb.HasField("timeout") else None,
        tasks=tuple(task_from_pb(t, f"flow.tasks[{i}]") for i, t in enumerate(pb.tasks)),
        conditions=tuple(
            Condition(
                source_task=c.source_task,
                target_task_success=c.target_task_success,
                target_task_failure=c.target_task_failure,
                name=c.name,
                description=c.description,
                outcome=c.outcome,
            )
            for c in pb.conditions
        ),
        max_steps=pb.max_steps,
    )


def request_flow_from_pb(
    request: flow_service_pb2.ExecuteFlowRequest
    | flow_service_pb2.StreamFlowRequest
    | flow_service_pb2.ValidateFlowRequest,
) -> Flow | None:
    """The request's flow, or None when the field is absent."""
    return flow_from_pb(request.flow) if request.HasField("flow") else None


def _set_time(out: timestamp_pb2.Timestamp, moment: datetime) -> None:
    """out = moment (aware): what Timestamp.FromDatetime() does, several times faster."""
    delta = moment - _EPOCH
    out.seconds = delta.days * 86400 + delta.seconds
    out.nanos = delta.microseconds * 1000


def step_to_pb(record: StepRecord, out: flow_pb2.TaskResult) -> None:
    """Fill a TaskResult message from a StepRecord."""
    out.task = record.task
    out.status = _TASK_STATUS_TO_PB[record.status]
    if record.data:
        struct_to_pb(record.data, out.data)
    if record.error is not None:
        out.error = record.error
    _set_time(out.started_at, record.started_at)
    # Only the fields that are not zero: each field set costs a fifth of a microsecond,
    # and a task's duration is mostly under a second.
    nanos = round(record.duration_s * 1e9)
    if nanos >= 1_000_000_000:
        out.duration.seconds, out.duration.nanos = divmod(nanos, 1_000_000_000)
    elif nanos:
        out.duration.nanos = nanos
    out.step = record.step
    out.attempt = record.attempt


StreamMessage = TypeVar(
    "StreamMessage", flow_service_pb2.StreamFlowResponse, flow_service_pb2.WatchExecutionResponse
)


def event_to_pb(
    event: Event,
    sequence: int = 0,
    cls: type[StreamMessage] = flow_service_pb2.StreamFlowResponse,  # type: ignore[assignment]
) -> StreamMessage:
    """One StreamFlow (or WatchExecution: the same fields) message for an engine event."""
    out = cls(sequence=sequence)
    if isinstance(event, TaskCompleted):
        step_to_pb(event.record, out.task_result)
    elif isinstance(event, FlowStarted):
        out.started.flow_id = event.flow_id
        out.started.flow_name = event.flow_name
        _set_time(out.started.started_at, event.started_at)
    elif isinstance(event, FlowFinished):
        out.finished.status = _FLOW_STATUS_TO_PB[event.status]
        out.finished.message = event.message
        _set_time(out.finished.finished_at, event.finished_at)
        out.finished.steps = event.steps
    else:  # pragma: no cover - Event is a closed union
        raise TypeError(f"unknown event {event!r}")
    return out


#: Bytes kept free in a ValidateFlow answer for the violation saying how many more there are.
_MORE_VIOLATIONS_BYTES = 256


def violations_to_pb(
    violations: Sequence[Violation], max_bytes: int = 0
) -> flow_service_pb2.ValidateFlowResponse:
    """The ValidateFlow response for a list of violations: all of them, or (`max_bytes`,
    0: no limit) as many as fit in that many bytes, and a last one on field "flow" saying
    how many more there are."""
    out = flow_service_pb2.ValidateFlowResponse(valid=not violations)
    add = out.violations.add
    size, budget = 2, max_bytes - _MORE_VIOLATIONS_BYTES
    for shown, v in enumerate(violations):
        item = flow_pb2.FlowViolation(field=v.field, description=v.description)
        if max_bytes:
            item_size = item.ByteSize()
            size += 1 + _varint_size(item_size) + item_size  # its tag is 1 byte
            if size > budget:
                more = len(violations) - shown
                add(
                    field="flow",
                    description=f"and {more:,} more violation{'s' if more > 1 else ''}, not "
                    f"shown: the answer would be over this server's limit of {max_bytes:,} "
                    "bytes (--max-response-bytes)",
                )
                break
        add().CopyFrom(item)
    return out


def tasks_to_pb(specs: Sequence[TaskSpec]) -> flow_service_pb2.ListTasksResponse:
    """The ListTasks response for the registry's tasks."""
    return flow_service_pb2.ListTasksResponse(tasks=[_task_info(s) for s in specs])


def _task_info(spec: TaskSpec) -> flow_pb2.TaskInfo:
    info = flow_pb2.TaskInfo(
        name=spec.name,
        description=spec.description,
        source=spec.source,
        is_async=spec.is_async,
        takes_context=spec.takes_context,
    )
    if spec.params_schema:
        struct_to_pb(spec.params_schema, info.params_schema)
    return info


_FLOW_STATUS_FROM_PB = {v: k for k, v in _FLOW_STATUS_TO_PB.items()}


def flow_status_from_pb(value: int) -> FlowStatus | None:
    """A FlowStatus filter: None for UNSPECIFIED; ValueError for numbers the enum lacks."""
    if value == flow_pb2.FLOW_STATUS_UNSPECIFIED:
        return None
    try:
        return _FLOW_STATUS_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"{value} is not a FlowStatus") from None


def flow_to_pb(flow: Flow, out: flow_pb2.Flow) -> None:
    """Fill a Flow message from the model (as GetExecution returns it)."""
    out.name = flow.name
    out.start_task = flow.start_task
    out.max_steps = flow.max_steps
    if flow.timeout_s is not None:
        _duration(flow.timeout_s, out.timeout)
    for task in flow.tasks:
        t = out.tasks.add(name=task.name, description=task.description)
        struct_to_pb(task.params, t.params)
        if task.timeout_s is not None:
            _duration(task.timeout_s, t.timeout)
        if task.retry != NO_RETRY:
            r = task.retry
            t.retry.max_attempts = r.max_attempts
            _duration(r.initial_backoff_s, t.retry.initial_backoff)
            t.retry.backoff_multiplier = r.backoff_multiplier
            _duration(r.max_backoff_s, t.retry.max_backoff)
            t.retry.non_retryable_errors.extend(r.non_retryable_errors)
    for c in flow.conditions:
        out.conditions.add(
            name=c.name,
            description=c.description,
            source_task=c.source_task,
            outcome=c.outcome,
            target_task_success=c.target_task_success,
            target_task_failure=c.target_task_failure,
        )


def flow_bytes(flow: Flow) -> int:
    """The size of `flow` in an Execution message (its field, tag and length included)."""
    out = flow_service_pb2.Execution()
    flow_to_pb(flow, out.flow)
    return out.ByteSize()


def input_bytes(data: Mapping[str, Any]) -> int:
    """The size of an input (or any Struct) as an answer carries it back from `data`,
    what the store keeps, without its field's tag and length."""
    out = struct_pb2.Struct()
    struct_to_pb(data, out)
    return out.ByteSize()


def _final(events: Sequence[Event]) -> FlowFinished | None:
    last = events[-1] if events else None
    return last if isinstance(last, FlowFinished) else None


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


#: Answers with at most this many task results are built whole, then measured once (the
#: common case, and the cheapest); longer ones are measured as each result is added.
_BUILT_WHOLE = 16


def _add_history(
    flow_id: str, events: Sequence[Event], message: Any, max_bytes: int, nested: bool
) -> None:
    """Add each task result of `events` to `message.execution_history`;
    ResponseTooLargeError as soon as the answer grows past `max_bytes` (0: no limit).
    Built whole first, an answer a thousand times too large took that much memory, and
    more, to refuse; so a long history is counted as it is built, and the rest is not.
    `nested`: `message` is itself a field (1-byte tag) of the answer."""

    def check(size: int) -> None:
        total = size + 1 + _varint_size(size) if nested else size
        if total > max_bytes:
            raise ResponseTooLargeError(
                f"the answer for execution {flow_id} is over this server's limit of "
                f"{max_bytes:,} bytes (--max-response-bytes; gRPC clients accept 4 MiB by "
                "default): read it with GetExecution's view EXECUTION_VIEW_BASIC and its "
                "results one message each with WatchExecution",
                metadata={"flowId": flow_id, "maxResponseBytes": max_bytes},
            )

    add = message.execution_history.add
    if not max_bytes or len(events) <= _BUILT_WHOLE:
        for event in events:
            if isinstance(event, TaskCompleted):
                step_to_pb(event.record, add())
        if max_bytes:
            check(message.ByteSize())
        return
    size = message.ByteSize()
    check(size)
    for event in events:
        if isinstance(event, TaskCompleted):
            step = add()
            step_to_pb(event.record, step)
            step_size = step.ByteSize()
            size += 1 + _varint_size(step_size) + step_size  # its tag is 1 byte
            check(size)


def execute_response_from_events(
    flow_id: str, events: Sequence[Event], max_bytes: int = 0
) -> flow_service_pb2.ExecuteFlowResponse:
    """The ExecuteFlow response for an ended execution's events; ResponseTooLargeError
    if it would be larger than `max_bytes` (0: no limit)."""
    final = _final(events)
    out = flow_service_pb2.ExecuteFlowResponse(
        flow_id=flow_id,
        status=_FLOW_STATUS_TO_PB[final.status] if final else flow_pb2.FLOW_STATUS_RUNNING,
        message=final.message if final else "",
    )
    _add_history(flow_id, events, out, max_bytes, nested=False)
    return out


def stored_execution_to_pb(
    record: ExecutionRecord,
    events: Sequence[Event],
    out: flow_service_pb2.Execution,
    max_bytes: int = 0,
) -> None:
    """Fill an Execution message from its record and events; ResponseTooLargeError if
    the answer holding it (as its one field) would be larger than `max_bytes` (0: no
    limit)."""
    _execution_fields(record, out)
    out.last_sequence = len(events)
    _add_history(record.flow_id, events, out, max_bytes, nested=True)


#: Ends a final message cut to fit a basic view.
_CUT_NOTE = "... (cut to fit this server's largest answer; WatchExecution has every event)"


def basic_execution_to_pb(
    record: ExecutionRecord, out: flow_service_pb2.Execution, max_bytes: int = 0
) -> None:
    """Fill an Execution message from its record, without history (EXECUTION_VIEW_BASIC).
    A final message too long for the answer (holding it as its one field) to fit in
    `max_bytes` is cut to fit; ResponseTooLargeError if even that is not enough (a
    flow and input stored before the server's limit was lowered)."""
    _execution_fields(record, out)
    out.last_sequence = record.last_sequence
    if not max_bytes:
        return
    size = out.ByteSize()
    excess = size + 1 + _varint_size(size) - max_bytes
    if excess <= 0:
        return
    message = out.message.encode()
    keep = len(message) - excess - len(_CUT_NOTE)
    if keep >= 0:
        out.message = message[:keep].decode(errors="ignore") + _CUT_NOTE
        return
    raise ResponseTooLargeError(
        f"execution {record.flow_id}'s flow and input are over this server's limit of "
        f"{max_bytes:,} bytes (--max-response-bytes): no answer can carry them; the "
        "limit was lowered after it was submitted",
        metadata={"flowId": record.flow_id, "maxResponseBytes": max_bytes},
    )


def _execution_fields(record: ExecutionRecord, out: flow_service_pb2.Execution) -> None:
    """Every field of an Execution but its history and last_sequence."""
    out.flow_id = record.flow_id
    flow_to_pb(record.flow, out.flow)
    struct_to_pb(record.input, out.input)
    out.status = _FLOW_STATUS_TO_PB[record.status]
    out.message = record.message
    if record.request_id:
        out.request_id = record.request_id
    _set_time(out.create_time, record.created_at)
    if record.finished_at is not None:
        _set_time(out.end_time, record.finished_at)


def summary_to_pb(record: ExecutionSummary, out: flow_service_pb2.ExecutionSummary) -> None:
    """Fill a ListExecutions entry."""
    out.flow_id = record.flow_id
    out.flow_name = record.flow_name
    out.status = _FLOW_STATUS_TO_PB[record.status]
    _set_time(out.create_time, record.created_at)
    if record.finished_at is not None:
        _set_time(out.end_time, record.finished_at)
    if record.request_id:
        out.request_id = record.request_id
