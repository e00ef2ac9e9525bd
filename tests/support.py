"""Helpers shared by the tests: flow builders and a server subprocess runner."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowmanager.v1 import flow_pb2
from google.protobuf import json_format

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FLOW = ROOT / "examples" / "sample_flow.json"
BIN = Path(sys.executable).parent
#: `pip` as the tests build and install packages: offline, with the build backend the venv
#: already has (setuptools, a dev dependency), so that scripts/test runs without network
#: once bootstrap has installed everything.
PIP_OFFLINE = ("--no-index", "--no-build-isolation", "--no-deps")
#: What `flowsvc serve` prints on stdout once it listens, followed by host:port.
READY_PREFIX = "flowsvc: serving on "


def flow_pb(
    tasks: list[str | tuple[str, dict[str, Any]]],
    routes: dict[str, tuple[str, str]] | None = None,
    *,
    name: str = "test flow",
    start: str | None = None,
    max_steps: int = 0,
) -> flow_pb2.Flow:
    """A Flow message: tasks by name (or (name, params)), routes source -> (ok, fail)."""
    flow = flow_pb2.Flow(name=name, max_steps=max_steps)
    for task in tasks:
        task_name, params = (task, {}) if isinstance(task, str) else task
        t = flow.tasks.add(name=task_name)
        if params:
            t.params.update(params)
    flow.start_task = start if start is not None else flow.tasks[0].name
    for source, (ok, fail) in (routes or {}).items():
        flow.conditions.add(
            name=f"after {source}",
            source_task=source,
            outcome="success",
            target_task_success=ok,
            target_task_failure=fail,
        )
    return flow


def chain(*tasks: str | tuple[str, dict[str, Any]]) -> flow_pb2.Flow:
    """A flow running the tasks one after another, any failure ending it."""
    names = [t if isinstance(t, str) else t[0] for t in tasks]
    routes = {a: (b, "end") for a, b in itertools.pairwise(names)}
    return flow_pb(list(tasks), routes)


def sample_request_json() -> dict[str, Any]:
    """The seed README's request body, as committed in examples/."""
    return json.loads(SAMPLE_FLOW.read_text())


def to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def on_event_loop() -> bool:
    """Whether the calling thread runs an event loop (work done there holds every call)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class ServerProcess:
    """A `flowsvc serve` subprocess and the port it reported in its log."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


@contextmanager
def server_process(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    wrapper: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Run `python -m flowsvc serve --listen 127.0.0.1:0 ARGS` until the block ends
    (started by `wrapper`, such as `nohup`, when given)."""
    log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tmp_path,
        )
    try:

        def started() -> int | None:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log_path.read_text()}")
            for line in log_path.read_text().splitlines():
                if line.startswith(READY_PREFIX):
                    return int(line.rsplit(":", 1)[1])
            return None

        port = wait_until(started, timeout=timeout)
        yield ServerProcess(proc, port, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
