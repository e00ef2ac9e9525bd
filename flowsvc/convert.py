"""Pure conversions between generated protobuf messages and engine models.

The only module besides the servicer that builds or reads generated messages.
Functions are named `x_from_pb` / `x_to_pb`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from flowmanager.v1 import flow_pb2, flow_service_pb2
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from flowsvc.errors import Violation
from flowsvc.models import (
    Condition,
    Event,
    Execution,
    Flow,
    FlowFinished,
    FlowStarted,
    FlowStatus,
    StepRecord,
    Task,
    TaskCompleted,
    TaskStatus,
)
from flowsvc.registry import TaskSpec

_TASK_STATUS_TO_PB = {
    TaskStatus.SUCCESS: flow_pb2.TASK_STATUS_SUCCESS,
    TaskStatus.FAILURE: flow_pb2.TASK_STATUS_FAILURE,
}
_FLOW_STATUS_TO_PB = {
    FlowStatus.RUNNING: flow_pb2.FLOW_STATUS_RUNNING,
    FlowStatus.SUCCEEDED: flow_pb2.FLOW_STATUS_SUCCEEDED,
    FlowStatus.FAILED: flow_pb2.FLOW_STATUS_FAILED,
    FlowStatus.CANCELLED: flow_pb2.FLOW_STATUS_CANCELLED,
}


def struct_from_pb(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict (numbers come back as floats, as in JSON)."""
    return json_format.MessageToDict(struct)


def struct_to_pb(data: Mapping[str, Any], out: struct_pb2.Struct) -> None:
    """Fill `out` from a JSON-compatible mapping."""
    if data:
        out.update(data)


def flow_from_pb(pb: flow_pb2.Flow) -> Flow:
    """A Flow model from its message (not validated)."""
    return Flow(
        name=pb.name,
        start_task=pb.start_task,
        tasks=tuple(
            Task(name=t.name, description=t.description, params=struct_from_pb(t.params))
            for t in pb.tasks
        ),
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


def _timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def step_to_pb(record: StepRecord, out: flow_pb2.TaskResult) -> None:
    """Fill a TaskResult message from a StepRecord."""
    out.task = record.task
    out.status = _TASK_STATUS_TO_PB[record.status]
    struct_to_pb(record.data, out.data)
    if record.error is not None:
        out.error = record.error
    out.started_at.FromDatetime(record.started_at)
    out.duration.FromNanoseconds(round(record.duration_s * 1e9))
    out.step = record.step


def execution_to_pb(execution: Execution) -> flow_service_pb2.ExecuteFlowResponse:
    """The ExecuteFlow response for a finished execution."""
    out = flow_service_pb2.ExecuteFlowResponse(
        flow_id=execution.flow_id,
        status=_FLOW_STATUS_TO_PB[execution.status],
        message=execution.message,
    )
    for record in execution.history:
        step_to_pb(record, out.execution_history.add())
    return out


def event_to_pb(event: Event) -> flow_service_pb2.StreamFlowResponse:
    """One StreamFlow message for an engine event."""
    out = flow_service_pb2.StreamFlowResponse()
    if isinstance(event, TaskCompleted):
        step_to_pb(event.record, out.task_result)
    elif isinstance(event, FlowStarted):
        out.started.flow_id = event.flow_id
        out.started.flow_name = event.flow_name
        out.started.started_at.CopyFrom(_timestamp(event.started_at))
    elif isinstance(event, FlowFinished):
        out.finished.status = _FLOW_STATUS_TO_PB[event.status]
        out.finished.message = event.message
        out.finished.finished_at.CopyFrom(_timestamp(event.finished_at))
        out.finished.steps = event.steps
    else:  # pragma: no cover - Event is a closed union
        raise TypeError(f"unknown event {event!r}")
    return out


def violations_to_pb(
    violations: Sequence[Violation],
) -> flow_service_pb2.ValidateFlowResponse:
    """The ValidateFlow response for a list of violations."""
    return flow_service_pb2.ValidateFlowResponse(
        valid=not violations,
        violations=[
            flow_pb2.FlowViolation(field=v.field, description=v.description) for v in violations
        ],
    )


def tasks_to_pb(specs: Sequence[TaskSpec]) -> flow_service_pb2.ListTasksResponse:
    """The ListTasks response for the registry's tasks."""
    return flow_service_pb2.ListTasksResponse(
        tasks=[
            flow_pb2.TaskInfo(
                name=s.name,
                description=s.description,
                source=s.source,
                is_async=s.is_async,
                takes_context=s.takes_context,
            )
            for s in specs
        ]
    )
