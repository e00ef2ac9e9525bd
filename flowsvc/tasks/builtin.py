"""The built-in tasks.

task1, task2 and task3 are the prototype's, with its outputs and its simulated
0.5 s latency, but waiting with asyncio so that they never block the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from flowsvc.models import TaskContext, TaskResult
from flowsvc.registry import TaskRegistry

BUILTINS = TaskRegistry()

#: The prototype's simulated latency of task1..task3.
SEED_DELAY_SECONDS = 0.5


def _takes(**types: str) -> dict[str, Any]:
    """A params schema: these params, of these JSON types, and no other (a typo such as
    `secs` for `seconds` is refused when the flow is submitted, not silently ignored).
    Numbers may not be negative."""
    properties: dict[str, Any] = {}
    for name, json_type in types.items():
        properties[name] = {"type": json_type}
        if json_type == "number":
            properties[name]["minimum"] = 0
    return {"type": "object", "properties": properties, "additionalProperties": False}


async def _wait(params: Any, key: str, default: float) -> TaskResult | None:
    """Wait params[key] seconds; or, when that is not a non-negative number (a reference
    can only be checked now), the failure to return: not retried, no retry can fix it."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return TaskResult.failure(
            f"param {key!r} must be a non-negative number, not {value!r}", retryable=False
        )
    await asyncio.sleep(float(value))
    return None


@BUILTINS.task("task1", params=_takes(delay_seconds="number"))
async def fetch_data(ctx: TaskContext) -> TaskResult:
    """Fetch data (the prototype's task1). Param delay_seconds (default 0.5)."""
    return await _wait(ctx.params, "delay_seconds", SEED_DELAY_SECONDS) or TaskResult(
        status="success", data={"raw_data": "data"}
    )


@BUILTINS.task("task2", params=_takes(delay_seconds="number"))
async def process_data(ctx: TaskContext) -> TaskResult:
    """Process data (the prototype's task2). Param delay_seconds (default 0.5)."""
    return await _wait(ctx.params, "delay_seconds", SEED_DELAY_SECONDS) or TaskResult(
        status="success", data={"processed_data": "data"}
    )


@BUILTINS.task("task3", params=_takes(delay_seconds="number"))
async def store_data(ctx: TaskContext) -> TaskResult:
    """Store data (the prototype's task3). Param delay_seconds (default 0.5)."""
    return await _wait(ctx.params, "delay_seconds", SEED_DELAY_SECONDS) or TaskResult(
        status="success", data={"storage_id": "12345"}
    )


@BUILTINS.task("noop", params=_takes())
async def noop() -> TaskResult:
    """Succeed at once with no data."""
    return TaskResult.success()


@BUILTINS.task("fail", params=_takes(message="string"))
async def fail(ctx: TaskContext) -> TaskResult:
    """Fail at once. Param message (default "task failed") is the error text."""
    return TaskResult.failure(str(ctx.params.get("message", "task failed")))


@BUILTINS.task("sleep", params=_takes(seconds="number"))
async def sleep(ctx: TaskContext) -> TaskResult:
    """Wait asynchronously for param seconds (default 1), then succeed."""
    return await _wait(ctx.params, "seconds", 1.0) or TaskResult.success(
        {"slept_seconds": float(ctx.params.get("seconds", 1.0))}
    )


@BUILTINS.task("echo")
async def echo(ctx: TaskContext) -> TaskResult:
    """Succeed with its params and the flow input as data: {"params": ..., "input": ...}."""
    return TaskResult.success({"params": dict(ctx.params), "input": dict(ctx.input)})
