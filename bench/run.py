"""flowsvc's benchmarks, held against the gRPC floor: `scripts/bench [--quick] [--only ...]`.

Starts what it needs: the server under test (`flowsvc serve`), the floor server
(bench/floor_server.py: same generated code and grpc.aio stack, canned answers of the
same size), the ceiling (the same server making each answer with the least work any
Python flow engine must do: what flowsvc could reach at best), and h2load (Debian's
nghttp2-client) as the load generator for the throughput scenarios, so that the client
is not the bottleneck. Every throughput figure is also given as a ratio to the floor
measured in the same run: the machines are shared and noisy, absolute numbers drift.
Prints a table, writes the figures as JSON.

Scenarios (--only takes a comma-separated subset):
  execute         ExecuteFlow of the 3-task sample flow (no delay), in-memory store
  stream          StreamFlow of the same flow (started + 3 results + finished)
  execute_sqlite  ExecuteFlow with the default durable SQLite store (WAL, synchronous FULL)
  stream_sqlite   StreamFlow with the default durable SQLite store
  slow_async      1,000 executions at once of three async 1 s sleeps (+ health p99)
  slow_sync       64 executions at once of three sync 0.2 s sleeps (+ health p99)
  steps           per-step cost of 100- and 10,000-step noop loops, in-process
  memory          resident memory per in-flight streamed execution (5,000 waiting)
  latency         task completion -> task_result at the client, at 1x1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc

pb = flow_service_pb2
ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = [
    "execute",
    "stream",
    "execute_sqlite",
    "stream_sqlite",
    "slow_async",
    "slow_sync",
    "steps",
    "memory",
    "latency",
]
LOADS = [(1, 1), (4, 16), (16, 64)]  # h2load connections x streams


# -- processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    address: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@contextmanager
def started(argv: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[Proc]:
    """Run argv until the block ends; wait (with a deadline) for its `ready` line."""
    popen = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(popen.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout=60)
    if not found or not found[0].startswith(ready):
        popen.kill()
        raise RuntimeError(f"{argv[:4]} did not start: {found}")
    try:
        yield Proc(popen, found[0].strip().rsplit(" ", 1)[1])
    finally:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def flowsvc_server(db: str, args: argparse.Namespace, *extra: str) -> Any:
    argv = [
        sys.executable,
        "-m",
        "flowsvc",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db,
        "--log-level",
        args.log_level,
        "--max-in-flight",
        "100000",
        "--retention-seconds",
        "0",
        "--task-modules",
        "tasks",
        "--event-loop",
        "uvloop" if args.uvloop else "asyncio",
        *extra,
    ]
    pythonpath = os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    return started(argv, "flowsvc: serving on", env={"PYTHONPATH": pythonpath})


def floor_server(execute: Path, stream: Path, uvloop: bool, minimal: bool = False) -> Any:
    """The floor (canned answers) or, `minimal`, the ceiling (floor_server.py says more)."""
    argv = [
        sys.executable,
        str(ROOT / "bench" / "floor_server.py"),
        "--execute",
        str(execute),
        "--stream",
        str(stream),
    ]
    if uvloop:
        argv.append("--uvloop")
    if minimal:
        argv.append("--minimal")
    return started(argv, "floor: serving on")


# -- requests -----------------------------------------------------------------------------


def sample_flow() -> flow_pb2.Flow:
    """The prototype's sample flow (3 tasks, 2 conditions), its tasks three noops."""
    flow = flow_pb2.Flow(name="Data processing flow", start_task="noop_a")
    for name, description in (("noop_a", "Fetch data"), ("noop_b", "Process data"),
                              ("noop_c", "Store data")):  # fmt: skip
        flow.tasks.add(name=name, description=description)
    for a, b in (("noop_a", "noop_b"), ("noop_b", "noop_c")):
        flow.conditions.add(
            source_task=a, outcome="success", target_task_success=b, target_task_failure="end"
        )
    return flow


def chain(*names: str, **params: Any) -> flow_pb2.Flow:
    flow = flow_pb2.Flow(name="bench", start_task=names[0])
    for name in names:
        flow.tasks.add(name=name).params.update(params)
    for a, b in itertools.pairwise(names):
        flow.conditions.add(source_task=a, target_task_success=b, target_task_failure="end")
    return flow


def grpc_frame(message: Any) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


async def capture(address: str, workdir: Path) -> tuple[Path, Path, int, int]:
    """Real answers to the sample flow, to can for the floor; and their sizes."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = flow_service_pb2_grpc.FlowServiceStub(channel)
        response = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=sample_flow()))
        assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED, response.message
        messages = [m async for m in stub.StreamFlow(pb.StreamFlowRequest(flow=sample_flow()))]
    execute, stream = workdir / "execute.bin", workdir / "stream.bin"
    execute.write_bytes(response.SerializeToString())
    stream.write_bytes(
        b"".join(struct.pack(">I", m.ByteSize()) + m.SerializeToString() for m in messages)
    )
    return execute, stream, response.ByteSize(), sum(m.ByteSize() for m in messages)


# -- h2load ---------------------------------------------------------------------------------


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each thread of process `pid` has used so far."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_split(
    pid: int, before: dict[int, float], after: dict[int, float], wall: float
) -> dict[str, float]:
    """How busy the event loop's thread (the main thread: tid == pid) and the process's
    other threads (store thread, gRPC's pollers, task threads) were, as fractions of one core."""
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = used.pop(pid, 0.0)
    return {"loop": round(loop / wall, 3), "other_threads": round(sum(used.values()) / wall, 3)}


def h2load(
    address: str,
    method: str,
    body: Path,
    conns: int,
    streams: int,
    quick: bool,
    duration: float,
    expect_bytes: int,
    pid: int | None = None,
) -> dict[str, Any]:
    """One h2load run. Unless `quick`, and given the server's `pid`, also how busy the
    server's threads were between the end of the warm-up and the end of the run."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        argv = [
            "h2load",
            "-c",
            str(conns),
            "-m",
            str(streams),
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--log-file",
            log.name,
        ]
        if quick:
            argv += ["-n", str(max(100, conns * streams * 4))]
        else:
            argv += ["-D", str(max(1, round(duration))), "--warm-up-time", "1"]
        argv.append(f"http://{address}/flowmanager.v1.FlowService/{method}")
        cpu: dict[str, float] | None = None
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
            if pid is not None and not quick:
                # A measuring window, not a wait for readiness: from the end of h2load's
                # 1 s warm-up to shortly before the end of its run.
                window = max(1, round(duration)) - 0.5
                time.sleep(1.25)
                before, t0 = thread_cpu(pid), time.perf_counter()
                time.sleep(window)
                cpu = cpu_split(pid, before, thread_cpu(pid), time.perf_counter() - t0)
            out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv, out)
        times_us = sorted(
            int(line.split("\t")[2]) for line in Path(log.name).read_text().splitlines() if line
        )
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
    data = int(re.search(r"\((\d+)\) data", out).group(1))  # type: ignore[union-attr]
    # A gRPC error is an HTTP 200 too: check that real answers came back (5-byte frames).
    ok = done > 0 and data >= done * expect_bytes * 0.98
    result = {
        "rps": round(rps, 1),
        "p50_ms": round(_pct(times_us, 50) / 1000, 2),
        "p99_ms": round(_pct(times_us, 99) / 1000, 2),
        "requests": done,
        "answers_ok": ok,
    }
    if cpu is not None and rps:
        # CPU per call: how busy a thread was, divided by the calls per second.
        result["cpu"] = {
            **cpu,
            "loop_us_per_call": round(cpu["loop"] / rps * 1e6, 1),
            "other_us_per_call": round(cpu["other_threads"] / rps * 1e6, 1),
        }
    return result


def _pct(values: list[int] | list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return float(sorted(values)[index])


def throughput(
    results: dict[str, Any],
    name: str,
    db: str,
    method: str,
    args: argparse.Namespace,
    workdir: Path,
) -> None:
    request = pb.ExecuteFlowRequest if method == "ExecuteFlow" else pb.StreamFlowRequest
    body = workdir / f"{method}.req"
    body.write_bytes(grpc_frame(request(flow=sample_flow())))
    rows = []
    with flowsvc_server(db, args) as server:
        execute, stream, execute_size, stream_size = asyncio.run(capture(server.address, workdir))
        size = (execute_size + 5) if method == "ExecuteFlow" else (stream_size + 5 * 5)
        with (
            floor_server(execute, stream, args.uvloop) as floor,
            floor_server(execute, stream, args.uvloop, minimal=True) as ceiling,
        ):
            loads = [(4, 16)] if args.quick else LOADS
            for conns, streams in loads:
                runs = {
                    who: h2load(
                        proc.address,
                        method,
                        body,
                        conns,
                        streams,
                        args.quick,
                        args.duration,
                        size,
                        pid=proc.pid,
                    )
                    for who, proc in (("floor", floor), ("flowsvc", server), ("ceiling", ceiling))
                }
                floor_rps = runs["floor"]["rps"]
                ratio = runs["flowsvc"]["rps"] / floor_rps if floor_rps else float("nan")
                ceiling_ratio = runs["ceiling"]["rps"] / floor_rps if floor_rps else float("nan")
                rows.append(
                    {
                        "load": f"{conns}x{streams}",
                        **runs,
                        "ratio": round(ratio, 3),
                        "ceiling_ratio": round(ceiling_ratio, 3),
                    }
                )
                real_run = runs["flowsvc"]
                print(
                    f"  {name:<15} {conns:>2}x{streams:<3} flowsvc {real_run['rps']:>8.0f}/s "
                    f"p50 {real_run['p50_ms']:>6.2f} ms p99 {real_run['p99_ms']:>7.2f} ms | "
                    f"floor {floor_rps:>8.0f}/s | ratio {ratio:.2f} | "
                    f"ceiling {runs['ceiling']['rps']:>8.0f}/s, ratio {ceiling_ratio:.2f}"
                    + ("" if all(run["answers_ok"] for run in runs.values()) else "  ANSWERS?"),
                    flush=True,
                )
                if all("cpu" in run for run in runs.values()):
                    print(
                        "  "
                        + " " * 21
                        + "loop's thread, us of CPU per call (busy): "
                        + ", ".join(
                            f"{who} {run['cpu']['loop_us_per_call']:.0f} ({run['cpu']['loop']:.0%})"
                            for who, run in runs.items()
                        )
                        + f"; flowsvc's other threads {real_run['cpu']['other_us_per_call']:.0f}",
                        flush=True,
                    )
    results[name] = {"method": method, "db": db, "rows": rows}


# -- scenarios driven by a Python client ------------------------------------------------------


async def concurrent_flows(
    address: str, flow: flow_pb2.Flow, count: int, channels: int = 8
) -> tuple[float, list[int], list[float]]:
    """Start `count` ExecuteFlows at once; (wall seconds, statuses, health latencies).

    Health is probed from a process of its own: in this one, the probe's latency would
    include this client's own event loop, busy with `count` calls.
    """
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "health_probe.py"),
        address,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert probe.stdout is not None
    assert (await probe.stdout.readline()).strip() == b"ready"
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    try:
        stubs = [flow_service_pb2_grpc.FlowServiceStub(c) for c in chans]
        t0 = time.perf_counter()
        responses = await asyncio.gather(
            *(
                stubs[i % channels].ExecuteFlow(pb.ExecuteFlowRequest(flow=flow), timeout=120)
                for i in range(count)
            )
        )
        wall = time.perf_counter() - t0
    finally:
        out, _ = await probe.communicate(b"")
        for c in chans:
            await c.close()
    health: list[float] = json.loads(out)
    return wall, [r.status for r in responses], health


def slow(results: dict[str, Any], name: str, args: argparse.Namespace) -> None:
    sync = name == "slow_sync"
    count = (16 if sync else 100) if args.quick else (64 if sync else 1000)
    seconds = (0.05 if sync else 0.2) if args.quick else (0.2 if sync else 1.0)
    names = (
        ("sync_sleep_a", "sync_sleep_b", "sync_sleep_c")
        if sync
        else ("sleep_a", "sleep_b", "sleep_c")
    )
    extra = ["--sync-task-workers", str(count)] if sync else []
    with flowsvc_server(":memory:", args, *extra) as server:
        wall, statuses, health = asyncio.run(
            concurrent_flows(server.address, chain(*names, seconds=seconds), count)
        )
    ok = all(s == flow_pb2.FLOW_STATUS_SUCCEEDED for s in statuses)
    critical = 3 * seconds
    results[name] = {
        "executions": count,
        "task_seconds": seconds,
        "wall_s": round(wall, 3),
        "critical_path_s": critical,
        "ratio_to_critical_path": round(wall / critical, 3),
        "all_succeeded": ok,
        "health_p99_ms": round(_pct(sorted(health), 99), 2),
        "health_checks": len(health),
    }
    print(
        f"  {name:<15} {count} executions of 3 x {seconds}s: {wall:.2f}s "
        f"({wall / critical:.2f}x the critical path), all succeeded: {ok}, "
        f"health p99 {results[name]['health_p99_ms']} ms over {len(health)} checks",
        flush=True,
    )


def steps(results: dict[str, Any], args: argparse.Namespace) -> None:
    from flowsvc import Condition, Flow, FlowEngine, Limits, Task, TaskRegistry

    engine = FlowEngine(TaskRegistry.with_builtins(), Limits(max_steps_cap=10_000))

    async def per_step(n: int) -> float:
        flow = Flow("loop", "noop", (Task("noop"),), (Condition("noop", "noop", "end"),), n)
        plan = engine.prepare(flow)
        best = float("inf")
        # Best of enough runs that a short loop (100 steps: half a millisecond) is not
        # measured only during another process's burst: 200 runs of it, 5 of the long one.
        for _ in range(1 if args.quick else max(5, 20_000 // n)):
            t0 = time.perf_counter()
            execution = await engine.run(plan, {})
            best = min(best, time.perf_counter() - t0)
            assert len(execution.history) == n
        return best / n * 1e6

    short, long = asyncio.run(per_step(100)), asyncio.run(per_step(10_000))
    results["steps"] = {
        "us_per_step_100": round(short, 2),
        "us_per_step_10000": round(long, 2),
        "growth": round(long / short, 3),
    }
    print(
        f"  steps           {short:.2f} us/step at 100 steps, {long:.2f} us/step at 10,000 "
        f"({long / short:.2f}x)",
        flush=True,
    )


async def _hold_streams(
    address: str, count: int, channels: int = 16
) -> tuple[list[Any], list[Any]]:
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [flow_service_pb2_grpc.FlowServiceStub(c) for c in chans]
    flow = chain("sleep", seconds=600)
    calls = [stubs[i % channels].StreamFlow(pb.StreamFlowRequest(flow=flow)) for i in range(count)]
    firsts = await asyncio.gather(*(call.read() for call in calls))
    assert all(f.WhichOneof("event") == "started" for f in firsts)
    return chans, calls


def memory(results: dict[str, Any], args: argparse.Namespace) -> None:
    count = 300 if args.quick else 5000

    async def measure(server: Proc) -> tuple[int, int]:
        # Warm up (imports, pools, first allocations), then the baseline.
        chans, calls = await _hold_streams(server.address, 50)
        for call in calls:
            call.cancel()
        for c in chans:
            await c.close()
        await asyncio.sleep(0.5)
        before = server.rss_kib()
        chans, calls = await _hold_streams(server.address, count)
        during = server.rss_kib()
        for call in calls:
            call.cancel()
        for c in chans:
            await c.close()
        return before, during

    with flowsvc_server(":memory:", args) as server:
        before, during = asyncio.run(measure(server))
    per = (during - before) * 1024 / count
    results["memory"] = {
        "in_flight": count,
        "rss_before_kib": before,
        "rss_during_kib": during,
        "bytes_per_execution": round(per),
    }
    print(
        f"  memory          {count} streamed executions waiting: {per / 1024:.1f} KiB each "
        f"(RSS {before} -> {during} KiB)",
        flush=True,
    )


def latency(results: dict[str, Any], args: argparse.Namespace) -> None:
    flows, ticks = (3, 10) if args.quick else (20, 50)

    async def measure(address: str) -> list[float]:
        out: list[float] = []
        flow = flow_pb2.Flow(name="ticks", start_task="tick", max_steps=ticks + 1)
        flow.tasks.add(name="tick").params.update({"seconds": 0.005, "n": ticks})
        flow.conditions.add(
            source_task="tick", target_task_success="tick", target_task_failure="end"
        )
        async with grpc.aio.insecure_channel(address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            for _ in range(flows):
                async for message in stub.StreamFlow(pb.StreamFlowRequest(flow=flow)):
                    now = time.time()
                    if message.HasField("task_result"):
                        r = message.task_result
                        done = r.started_at.ToNanoseconds() + r.duration.ToNanoseconds()
                        out.append((now * 1e9 - done) / 1e6)
        return out

    with flowsvc_server(":memory:", args) as server:
        samples = asyncio.run(measure(server.address))
    results["latency"] = {
        "samples": len(samples),
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(_pct(sorted(samples), 99), 3),
    }
    print(
        f"  latency         task done -> task_result at the client: p50 "
        f"{results['latency']['p50_ms']} ms, p99 {results['latency']['p99_ms']} ms "
        f"({len(samples)} results, 1x1)",
        flush=True,
    )


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--duration", type=int, default=5, help="seconds per h2load run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=_has_uvloop(),
        help="server and floor on uvloop (default: when installed)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="flowsvc's log level (default WARNING: the figures leave logging out)",
    )
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s] or SCENARIOS
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if shutil.which("h2load") is None and {
        "execute",
        "stream",
        "execute_sqlite",
        "stream_sqlite",
    } & set(chosen):
        print(
            "h2load not found: install Debian's nghttp2-client (scripts/bench does)",
            file=sys.stderr,
        )
        return 2
    results: dict[str, Any] = {}
    started_at = time.time()
    length = "quick" if args.quick else f"{args.duration:g}s per h2load run"
    print(
        f"flowsvc bench: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"uvloop {'on' if args.uvloop else 'off'}, {length}, server log level {args.log_level}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        memory_db = ":memory:"
        runners: dict[str, Callable[[], None]] = {
            "execute": lambda: throughput(
                results, "execute", memory_db, "ExecuteFlow", args, workdir
            ),
            "stream": lambda: throughput(results, "stream", memory_db, "StreamFlow", args, workdir),
            "execute_sqlite": lambda: throughput(
                results, "execute_sqlite", str(workdir / "e.db"), "ExecuteFlow", args, workdir
            ),
            "stream_sqlite": lambda: throughput(
                results, "stream_sqlite", str(workdir / "s.db"), "StreamFlow", args, workdir
            ),
            "slow_async": lambda: slow(results, "slow_async", args),
            "slow_sync": lambda: slow(results, "slow_sync", args),
            "steps": lambda: steps(results, args),
            "memory": lambda: memory(results, args),
            "latency": lambda: latency(results, args),
        }
        for name in chosen:
            runners[name]()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "uvloop": args.uvloop,
        "log_level": args.log_level,
        "quick": args.quick,
        "duration_s": args.duration,
        "started_at": started_at,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
