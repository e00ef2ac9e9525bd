"""JSON forms of engine models, as the store keeps them.

Round trips are exact: datetimes keep their microseconds and time zone, floats their
every bit (json writes the shortest repr that reads back the same), so an execution
read back converts to the very same protobuf bytes it was sent as.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

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

KIND_STARTED, KIND_TASK, KIND_FINISHED = "started", "task", "finished"


def _plain(value: Any) -> Any:
    """What json cannot encode by itself: read-only mappings (task params) as dicts."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


#: One encoder for all: json.dumps with options builds a new one per call.
dumps = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=True, default=_plain
).encode
#: JSON text of a str (the C function json itself uses).
_string = json.encoder.encode_basestring
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (event timestamps are kept as integers)."""
    return (moment - _EPOCH) // _MICROSECOND


def _from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _retry_to_json(retry: RetryPolicy) -> dict[str, Any]:
    return {
        "max_attempts": retry.max_attempts,
        "initial_backoff_s": retry.initial_backoff_s,
        "backoff_multiplier": retry.backoff_multiplier,
        "max_backoff_s": retry.max_backoff_s,
        "non_retryable_errors": list(retry.non_retryable_errors),
    }


def _keys_sorted(value: Any) -> Any:
    """`value` with the keys of every object in it sorted. A flow's params come from a
    protobuf Struct, whose keys come out in an order that differs from one process to
    the next: sorted, the same flow is the same JSON, and has the same digest, after a
    restart (a retry's request_id must still match its execution)."""
    if isinstance(value, Mapping):
        return {key: _keys_sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_keys_sorted(item) for item in value]
    return value


def _task_to_json(task: Task) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": task.name,
        "description": task.description,
        "params": _keys_sorted(task.params),
    }
    if task.timeout_s is not None:
        out["timeout_s"] = task.timeout_s
    if task.retry != NO_RETRY:
        out["retry"] = _retry_to_json(task.retry)
    return out


def _task_from_json(data: Mapping[str, Any]) -> Task:
    retry = data.get("retry")
    return Task(
        data["name"],
        data["description"],
        data["params"],
        timeout_s=data.get("timeout_s"),
        retry=(
            RetryPolicy(
                max_attempts=retry["max_attempts"],
                initial_backoff_s=retry["initial_backoff_s"],
                backoff_multiplier=retry["backoff_multiplier"],
                max_backoff_s=retry["max_backoff_s"],
                non_retryable_errors=tuple(retry["non_retryable_errors"]),
            )
            if retry
            else NO_RETRY
        ),
    )


def flow_to_json(flow: Flow) -> dict[str, Any]:
    return {
        "name": flow.name,
        "start_task": flow.start_task,
        "max_steps": flow.max_steps,
        "timeout_s": flow.timeout_s,
        "tasks": [_task_to_json(t) for t in flow.tasks],
        "conditions": [
            {
                "name": c.name,
                "description": c.description,
                "source_task": c.source_task,
                "outcome": c.outcome,
                "target_task_success": c.target_task_success,
                "target_task_failure": c.target_task_failure,
            }
            for c in flow.conditions
        ],
    }


def flow_from_json(data: Mapping[str, Any]) -> Flow:
    return Flow(
        name=data["name"],
        start_task=data["start_task"],
        max_steps=data["max_steps"],
        timeout_s=data.get("timeout_s"),
        tasks=tuple(_task_from_json(t) for t in data["tasks"]),
        conditions=tuple(
            Condition(
                source_task=c["source_task"],
                target_task_success=c["target_task_success"],
                target_task_failure=c["target_task_failure"],
                name=c["name"],
                description=c["description"],
                outcome=c["outcome"],
            )
            for c in data["conditions"]
        ),
    )


def request_hash(flow_digest: str, flow_input: Mapping[str, Any]) -> str:
    """A digest of what was asked (the flow's digest, and the input): the same flow and
    input give the same digest."""
    canonical = json.dumps(flow_input, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{flow_digest}:{canonical}".encode()).hexdigest()


def event_to_json(event: Event) -> tuple[str, str]:
    """(kind, body) of an event."""
    # Written by hand: one per event on the hot path, and dumps() of a dict costs more
    # than the rest of an event's commit. Only `data` goes through the encoder.
    if isinstance(event, TaskCompleted):
        r = event.record
        error = "null" if r.error is None else _string(r.error)
        data = dumps(r.data) if r.data else "{}"
        return KIND_TASK, (
            f'{{"step":{r.step},"task":{_string(r.task)},"status":"{r.status.value}",'
            f'"data":{data},"error":{error},"started_at_us":{_micros(r.started_at)},'
            f'"duration_s":{r.duration_s!r},"attempt":{r.attempt}}}'
        )
    if isinstance(event, FlowStarted):
        return KIND_STARTED, (
            f'{{"flow_name":{_string(event.flow_name)},'
            f'"started_at_us":{_micros(event.started_at)}}}'
        )
    return KIND_FINISHED, (
        f'{{"status":"{event.status.value}","message":{_string(event.message)},'
        f'"finished_at_us":{_micros(event.finished_at)},"steps":{event.steps}}}'
    )


def event_from_json(flow_id: str, kind: str, body: str) -> Event:
    data = json.loads(body)
    if kind == KIND_TASK:
        return TaskCompleted(
            flow_id,
            StepRecord(
                step=data["step"],
                task=data["task"],
                status=TaskStatus(data["status"]),
                data=data["data"],
                error=data["error"],
                started_at=_from_micros(data["started_at_us"]),
                duration_s=data["duration_s"],
                attempt=data.get("attempt", 1),
            ),
        )
    if kind == KIND_STARTED:
        return FlowStarted(flow_id, data["flow_name"], _from_micros(data["started_at_us"]))
    if kind == KIND_FINISHED:
        return FlowFinished(
            flow_id,
            FlowStatus(data["status"]),
            data["message"],
            _from_micros(data["finished_at_us"]),
            data["steps"],
        )
    raise ValueError(f"unknown event kind {kind!r}")
