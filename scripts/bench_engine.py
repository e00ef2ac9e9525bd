"""Per-step cost of the engine, in-process, for loops of growing length.

    .venv/bin/python scripts/bench_engine.py [--quick] [--out bench-results/engine.json]

Runs a one-task loop (`noop`, which takes no context, and `echo`, which takes one) for
10, 100, 1,000 and 10,000 steps, best of several runs, and prints microseconds per step.
Flat figures across lengths mean routing and history cost O(1) per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from flowsvc import Condition, Flow, FlowEngine, Limits, Task, TaskRegistry


async def per_step_us(engine: FlowEngine, task: str, steps: int, repeats: int) -> float:
    flow = Flow("bench", task, (Task(task),), (Condition(task, task, "end"),), max_steps=steps)
    plan = engine.prepare(flow)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        execution = await engine.run(plan, {})
        best = min(best, time.perf_counter() - t0)
        assert len(execution.history) == steps
    return best / steps * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine.json"))
    args = parser.parse_args()
    lengths = [10, 100] if args.quick else [10, 100, 1_000, 10_000]
    repeats = 1 if args.quick else 5
    engine = FlowEngine(TaskRegistry.with_builtins(), Limits(max_steps_cap=10_000))
    rows = []
    print(f"{'task':<6} {'steps':>7} {'us/step':>9}")
    for task in ("noop", "echo"):
        for steps in lengths:
            us = await per_step_us(engine, task, steps, repeats)
            rows.append({"task": task, "steps": steps, "us_per_step": round(us, 2)})
            print(f"{task:<6} {steps:>7} {us:>9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.platform(), "python": platform.python_version(), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
