"""Tasks the benchmarks load into the server under test (`--task-modules tasks`)."""

from __future__ import annotations

import asyncio
import time

from flowsvc import TaskContext, TaskResult, register_task


async def _sleep(ctx: TaskContext) -> TaskResult:
    await asyncio.sleep(float(ctx.params.get("seconds", 1.0)))
    return TaskResult.success()


def _sync_sleep(ctx: TaskContext) -> TaskResult:
    time.sleep(float(ctx.params.get("seconds", 0.2)))  # blocking on purpose: a thread's job
    return TaskResult.success()


# Three distinct names, so that one flow can run three sleeps one after the other.
for _name in ("sleep_a", "sleep_b", "sleep_c"):
    register_task(_name)(_sleep)
for _name in ("sync_sleep_a", "sync_sleep_b", "sync_sleep_c"):
    register_task(_name)(_sync_sleep)


async def _noop() -> TaskResult:
    return TaskResult.success()


# The sample flow's three steps as noops: what flowsvc adds, without any task's own work.
for _name in ("noop_a", "noop_b", "noop_c"):
    register_task(_name)(_noop)


@register_task("tick")
async def tick(ctx: TaskContext) -> TaskResult:
    """Sleep param seconds; succeed until step param n, then fail (ends a tick loop)."""
    await asyncio.sleep(float(ctx.params.get("seconds", 0.01)))
    if ctx.step >= int(ctx.params.get("n", 10)):
        return TaskResult.failure("done")
    return TaskResult.success()
