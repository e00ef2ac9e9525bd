"""flowsvc's own cost per flow, without gRPC: ExecutionManager + engine + store in-process.

    .venv/bin/python bench/overhead.py [--flows 20000] [--concurrency 64] [--db :memory:]
                                       [--metrics]  # count as --metrics-listen does

A tool for tuning the hot path (quick to run, and no network noise); scripts/bench is
what reports the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/tasks.py

import tasks  # noqa: F401  (registers the noop_* tasks in the default registry)
from flowmanager.v1 import flow_service_pb2 as pb
from run import sample_flow

from flowsvc import convert
from flowsvc.engine import FlowEngine
from flowsvc.executions import ExecutionManager, ManagerSettings
from flowsvc.metrics import Metrics
from flowsvc.registry import TaskRegistry, default_registry
from flowsvc.store.memory import MemoryStore
from flowsvc.store.sqlite import SQLiteStore


async def main(flows: int, concurrency: int, db: str, with_metrics: bool = False) -> None:
    metrics = Metrics() if with_metrics else None
    registry = TaskRegistry.with_builtins()
    registry.merge(default_registry)
    store = MemoryStore() if db == ":memory:" else SQLiteStore(db)
    manager = ExecutionManager(
        FlowEngine(registry),
        store,
        ManagerSettings(max_in_flight=10**6, retention_seconds=0),
        metrics=metrics,
    )
    await manager.open()
    request = pb.ExecuteFlowRequest(flow=sample_flow()).SerializeToString()

    async def one() -> None:
        if metrics is not None:
            metrics.rpc("ExecuteFlow")  # as the servicer counts each call
        req = pb.ExecuteFlowRequest.FromString(request)
        attachment = await manager.start(
            lambda: convert.request_flow_from_pb(req),
            convert.struct_from_pb(req.input),
            cache_key=req.flow.SerializeToString(deterministic=True),
        )
        events = await manager.drain(attachment)
        manager.release(attachment, completed=True)
        convert.execute_response_from_events(attachment.flow_id, events).SerializeToString()

    async def worker(count: int) -> None:  # `concurrency` of these run at once
        for _ in range(count):
            await one()

    await asyncio.gather(*(worker(500 // concurrency + 1) for _ in range(concurrency)))  # warm up
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(flows // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    flows = flows // concurrency * concurrency
    await manager.close()
    print(
        f"{flows / elapsed:,.0f} flows/s  ({elapsed / flows * 1e6:.1f} us per flow, db {db}"
        f"{', metrics on' if metrics is not None else ''})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flows", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--db", default=":memory:")
    parser.add_argument("--metrics", action="store_true", help="count as --metrics-listen does")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.flows, args.concurrency, args.db, args.metrics))
