"""The `flowsvc` command: serve as a subprocess (signals, config, task modules), run, probe."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowsvc.validation import MAX_JSON_DEPTH, too_deep
from tests.support import BIN, SAMPLE_FLOW, chain, server_process, wait_until


def flowsvc(*args: str, cwd: Path | None = None, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowsvc", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


async def read_all(call) -> list[flow_service_pb2.StreamFlowResponse]:
    """The rest of a stream read with read() (grpc forbids mixing read() and iteration)."""
    out = []
    while (message := await call.read()) is not grpc.aio.EOF:
        out.append(message)
    return out


def write_module(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


#: A task module: `stubborn`, an async task that swallows every cancel, and `stuck_sync`,
#: a sync task whose thread never returns.
STUCK_TASKS = """
    import asyncio, threading
    from flowsvc import register_task, TaskResult

    @register_task("stubborn")
    async def stubborn():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # ignores every cancel

    @register_task("stuck_sync")
    def stuck_sync():
        threading.Event().wait()
        return TaskResult(status="success")

    @register_task("quick_sync")
    def quick_sync():
        return TaskResult(status="success")
    """


async def sleeping(stub, seconds: float):
    """A StreamFlow of one `sleep` task, once its `started` event has come."""
    call = stub.StreamFlow(
        flow_service_pb2.StreamFlowRequest(flow=chain(("sleep", {"seconds": seconds})))
    )
    assert (await call.read()).WhichOneof("event") == "started"
    return call


async def test_sighup_drains_like_sigterm_unless_it_is_ignored(tmp_path: Path) -> None:
    # A closed terminal's SIGHUP ended the server at once (exit 129): no grace for its
    # flows, left RUNNING until the next start marked them interrupted.
    with server_process(tmp_path, "--grace-seconds", "30") as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = await sleeping(stub, 0.5)
            srv.proc.send_signal(signal.SIGHUP)
            rest = await read_all(call)
            assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert await asyncio.to_thread(srv.proc.wait, 30) == 0
        assert "shutting down" in [line["msg"] for line in srv.log_lines()]
    # Started under nohup (SIGHUP ignored), it stays so: the server serves on.
    with server_process(tmp_path, wrapper=["nohup"]) as srv:
        srv.proc.send_signal(signal.SIGHUP)
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            done = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")))
            assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert srv.proc.poll() is None


async def test_sigterm_drains_running_flow_then_exits(tmp_path: Path) -> None:
    with server_process(tmp_path, "--grace-seconds", "30") as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            call = await sleeping(stub, 1.0)
            srv.proc.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = await read_all(call)
            assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert await asyncio.to_thread(srv.proc.wait, 30) == 0
        lines = srv.log_lines()
        messages = [line["msg"] for line in lines]
        assert messages.index("shutting down") < messages.index("stopped")
        # Every line is one JSON object with a UTC timestamp to the millisecond.
        import re

        assert all(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["ts"])
            for line in lines
        )
        ended = [line for line in lines if line["msg"] == "flow ended"]
        assert ended and {"flow_id", "flow", "status", "steps", "duration_s"} <= set(ended[0])
        # Nothing went wrong on the way out: no error lines (e.g. a cancelled health Watch).
        assert [line for line in lines if line["level"] == "error"] == []


async def test_sigint_with_no_flows_exits_at_once(tmp_path: Path) -> None:
    with server_process(tmp_path, "--grace-seconds", "60") as srv:
        srv.proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(srv.proc.wait, 20) == 0


async def test_grace_period_over_cancels_the_flow(tmp_path: Path) -> None:
    with server_process(tmp_path, env={"FLOWSVC_GRACE_SECONDS": "0.2"}) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = await sleeping(stub, 60)
            srv.proc.send_signal(signal.SIGTERM)
            # Past the grace period the flow is stopped: the stream still ends with its
            # `finished` event, CANCELLED, and the call with OK.
            rest = await read_all(call)
            assert await call.code() == grpc.StatusCode.OK
            assert [m.WhichOneof("event") for m in rest] == ["finished"]
            assert rest[0].finished.status == flow_pb2.FLOW_STATUS_CANCELLED
            assert "shutting down" in rest[0].finished.message
        assert await asyncio.to_thread(srv.proc.wait, 20) == 0
        lines = srv.log_lines()
        ended = [line for line in lines if line["msg"] == "flow ended"]
        assert ended and ended[-1]["status"] == "cancelled"
        assert [line for line in lines if line["level"] == "error"] == []


async def test_task_modules_and_env_configuration(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "acme_tasks",
        '''
        from flowsvc import register_task, TaskResult

        @register_task("acme_greet")
        def greet(ctx):
            """Greet the customer."""
            return TaskResult(status="success", data={"hello": ctx.input["name"]})
        ''',
    )
    env = {
        "PYTHONPATH": str(tmp_path),
        "FLOWSVC_TASK_MODULES": "acme_tasks",
        "FLOWSVC_DEFAULT_MAX_STEPS": "5",
        "FLOWSVC_MAX_STEPS_CAP": "10",
        "FLOWSVC_LOG_LEVEL": "warning",
    }
    # A flag wins over its environment variable.
    with server_process(tmp_path, "--max-steps-cap", "20", env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            tasks = {
                t.name: t for t in (await stub.ListTasks(flow_service_pb2.ListTasksRequest())).tasks
            }
            assert tasks["acme_greet"].description == "Greet the customer."
            assert tasks["acme_greet"].source == "acme_tasks:greet"
            request = flow_service_pb2.ExecuteFlowRequest(flow=chain("acme_greet"))
            request.input.update({"name": "Ada"})
            response = await stub.ExecuteFlow(request, timeout=10)
            assert response.execution_history[0].data["hello"] == "Ada"
            loop = chain("noop")
            loop.conditions.add(
                source_task="noop", target_task_success="noop", target_task_failure="end"
            )
            response = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=loop))
            assert len(response.execution_history) == 5  # FLOWSVC_DEFAULT_MAX_STEPS
            loop.max_steps = 15  # over the env cap (10) but under the flag's (20)
            response = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=loop))
            assert len(response.execution_history) == 15
        # log level warning: no info lines were written
        assert not [line for line in srv.log_lines() if line["level"] == "info"]


def test_task_name_clash_refuses_to_start(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "clashing",
        """
        from flowsvc import register_task, TaskResult

        @register_task("noop")
        def my_noop():
            return TaskResult(status="success")
        """,
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(BIN)}
    result = flowsvc(
        "serve", "--listen", "127.0.0.1:0", "--task-modules", "clashing", cwd=tmp_path, env=env
    )
    assert result.returncode == 2
    assert "flowsvc.tasks.builtin:noop" in result.stderr and "clashing:my_noop" in result.stderr


def test_missing_task_module_is_a_clear_error(tmp_path: Path) -> None:
    result = flowsvc("serve", "--listen", "127.0.0.1:0", "--task-modules", "no_such_module_xyz")
    assert result.returncode == 2
    assert "no_such_module_xyz" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--default-max-steps", "zero"], {}, "--default-max-steps"),
        ([], {"FLOWSVC_EVENT_LOOP": "trio"}, "FLOWSVC_EVENT_LOOP"),
        ([], {"FLOWSVC_GRACE_SECONDS": "-1"}, "FLOWSVC_GRACE_SECONDS"),
        ([], {"FLOWSVC_LOG_LEVEL": "loud"}, "FLOWSVC_LOG_LEVEL"),
        (["--default-max-steps", "50", "--max-steps-cap", "10"], {}, "--max-steps-cap"),
        (["--listen", "127.0.0.1:99999"], {}, "--listen"),  # gRPC would wrap it to 34463
        (["--listen", "bogus"], {}, "--listen"),
        ([], {"FLOWSVC_GRACE_SECONDS": "nan"}, "FLOWSVC_GRACE_SECONDS"),
        (["--retention-seconds", "inf"], {}, "--retention-seconds"),
        (["--retention-seconds", "1e11"], {}, "--retention-seconds"),
        (["--max-message-bytes", "99999999999"], {}, "--max-message-bytes"),
    ],
)
def test_bad_configuration_is_refused(tmp_path: Path, args, env, needle) -> None:
    import os

    # In a folder of its own: a setting taken by mistake would open flowsvc.db there.
    result = flowsvc(
        "serve", "--listen", "127.0.0.1:0", *args, env={**os.environ, **env}, cwd=tmp_path
    )
    assert result.returncode == 2
    assert needle in result.stderr


def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    def refused(*args: str) -> str:
        result = flowsvc("serve", *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        # Ours is the last line (gRPC's C core may log its own before it).
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("flowsvc: "), result.stderr
        return last

    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    line = refused("--listen", "127.0.0.1:0", "--db", str(missing))
    assert "cannot open database" in line and "does not exist" in line
    db = tmp_path / "one.db"
    with server_process(tmp_path, "--db", str(db)) as srv:
        assert "in use by another flowsvc server" in refused(
            "--listen", "127.0.0.1:0", "--db", str(db)
        )
        in_use = refused("--listen", srv.address, "--db", ":memory:")
        assert "cannot listen on" in in_use and "Address already in use" in in_use
    # A unix socket's reason, too (it was "cannot resolve 'unix': invalid literal for int()").
    no_dir = refused("--listen", f"unix:{tmp_path / 'no' / 'x.sock'}", "--db", ":memory:")
    assert no_dir.endswith("No such file or directory"), no_dir


@pytest.mark.parametrize("name", ["ro.db", "data"])
async def test_a_read_only_database_is_refused_at_start(tmp_path: Path, name: str) -> None:
    # It used to start, stay NOT_SERVING for good and fail every flow with UNAVAILABLE.
    # A file named "data" (in "readonly database") was taken for named, and was not.
    db = tmp_path / name
    with server_process(tmp_path, "--db", str(db)) as srv:
        srv.proc.send_signal(signal.SIGKILL)  # leaves its -wal and -shm files: readable
        await asyncio.to_thread(srv.proc.wait, 30)
    db.chmod(0o444)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root writes anyway, unless it gives up that capability
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    result = await asyncio.to_thread(
        subprocess.run,
        [
            *prefix,
            sys.executable,
            "-m",
            "flowsvc",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            name,  # relative, as an operator gives it (cwd: tmp_path)
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "readonly database" in last
    assert f"database {name} cannot be written" in last, last  # which file, as the README says
    assert "serving on" not in result.stdout


def test_console_script_serves(tmp_path: Path) -> None:
    # `flowsvc serve`, the installed console script, not just `python -m flowsvc`. In a
    # folder of its own: its default store, flowsvc.db, is not the one of the tree.
    proc = subprocess.Popen(
        [str(BIN / "flowsvc"), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        probe = flowsvc("probe", "--address", f"127.0.0.1:{port}")
        assert probe.returncode == 0 and probe.stdout.strip() == "SERVING"
        probe = flowsvc(
            "probe", "--address", f"127.0.0.1:{port}", "--service", "flowmanager.v1.FlowService"
        )
        assert probe.returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_scripts_serve_finds_task_modules_where_it_is_started(tmp_path: Path) -> None:
    # The README's "Adding a task": FLOWSVC_TASK_MODULES=acme_tasks scripts/serve, run from
    # the folder that holds acme_tasks.py (the script itself runs from the repo's root).
    from tests.support import ROOT

    write_module(
        tmp_path,
        "acme_tasks",
        """
        from flowsvc import TaskResult, register_task

        @register_task("my_new_task")
        def my_new_task() -> TaskResult:
            return TaskResult(status="success", data={"result": "value"})
        """,
    )
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "serve"), "--listen", "127.0.0.1:0", "--db", ":memory:"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "FLOWSVC_TASK_MODULES": "acme_tasks"},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("flowsvc: serving on"), line
        with grpc.insecure_channel(f"127.0.0.1:{line.rsplit(':', 1)[1].strip()}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            tasks = stub.ListTasks(flow_service_pb2.ListTasksRequest(), timeout=30)
            assert "my_new_task" in {t.name for t in tasks.tasks}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_serve_on_a_unix_socket_says_its_path(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 's.sock'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsvc", "serve", "--listen", address, "--db", ":memory:"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == f"flowsvc: serving on {address}"
        with grpc.insecure_channel(address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            assert stub.ListTasks(flow_service_pb2.ListTasksRequest(), timeout=30).tasks
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_probe_refuses_a_bad_flowsvc_listen(tmp_path: Path) -> None:
    for bad in ("[::]:", "[::]:-1", "[::]:70000"):
        result = flowsvc("probe", env={**os.environ, "FLOWSVC_LISTEN": bad})
        assert result.returncode == 2, result
        assert "FLOWSVC_LISTEN" in result.stderr


def test_probe_fails_when_nothing_listens(tmp_path: Path) -> None:
    # A port that was just free: bind, note the port, close.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = flowsvc("probe", "--address", f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout


def test_run_sample_flow_in_process(tmp_path: Path) -> None:
    result = flowsvc("run", str(SAMPLE_FLOW))
    assert result.returncode == 0, result.stderr
    execution = json.loads(result.stdout)
    assert execution["status"] == "FLOW_STATUS_SUCCEEDED"
    assert "flow_id" in execution  # the proto's field names, as grpcurl shows them
    assert [r["data"] for r in execution["execution_history"]] == [
        {"raw_data": "data"},
        {"processed_data": "data"},
        {"storage_id": "12345"},
    ]


def test_run_accepts_a_bare_flow_with_input(tmp_path: Path) -> None:
    flow = {"name": "f", "start_task": "echo", "tasks": [{"name": "echo", "params": {"p": 1}}]}
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow))
    result = flowsvc("run", str(path), "--input", '{"customer_id": "c-1"}')
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["execution_history"][0]["data"]
    assert data == {"params": {"p": 1}, "input": {"customer_id": "c-1"}}


def test_run_prints_whole_numbers_as_grpcurl_does(tmp_path: Path) -> None:
    """A Struct holds every number as a double: 3 must still print as 3, not 3.0."""
    flow = {
        "name": "f",
        "start_task": "echo",
        "tasks": [{"name": "echo", "params": {"whole": 3, "half": 2.5, "big": 1e300}}],
    }
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow))
    result = flowsvc("run", str(path), "--input", '{"n": -7}')
    assert result.returncode == 0, result.stderr
    # The numbers as printed: a float's text is kept as such.
    printed = json.loads(result.stdout, parse_float=lambda text: ("float", text))
    data = printed["execution_history"][0]["data"]
    # 1e300 is past 2**53, where a double no longer holds every whole number: as it is.
    assert data["params"] == {"whole": 3, "half": ("float", "2.5"), "big": ("float", "1e+300")}
    assert data["input"] == {"n": -7}


def test_run_prints_every_number_as_grpcurl_does(tmp_path: Path) -> None:
    """grpcurl (Go's protojson) prints a double in its shortest digits, with no exponent
    from 1e-6 up to 1e21, and keeps the sign of -0: its text for each input below, as
    it printed them for the same execution."""
    numbers = {
        "negative_zero": (-0.0, "-0"),
        "two_53": (2.0**53, "9007199254740992"),
        "two_53_and_2": (2.0**53 + 2, "9007199254740994"),
        "two_60": (2.0**60, "1152921504606847000"),
        "e20": (1e20, "100000000000000000000"),
        "e21": (1e21, "1e+21"),
        "e300": (1e300, "1e+300"),
        "small": (0.00001, "0.00001"),
        "tiny": (1e-7, "1e-7"),
        "tinier": (1.5e-100, "1.5e-100"),
        "fraction": (-123456789.125, "-123456789.125"),
    }
    flow = {"name": "f", "start_task": "echo", "tasks": [{"name": "echo"}]}
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow))
    given = json.dumps({key: number for key, (number, _) in numbers.items()})
    result = flowsvc("run", str(path), "--input", given)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout, parse_float=str, parse_int=str)
    shown = printed["execution_history"][0]["data"]["input"]
    assert shown == {key: text for key, (_, text) in numbers.items()}


def test_run_prints_non_ascii_text_on_a_stdout_that_cannot_encode_it(tmp_path: Path) -> None:
    """Text past ASCII is printed as \\u escapes, as it always was: a stdout whose
    encoding has no such character (a C locale, a Windows console) still prints it."""
    flow = {"name": "f", "start_task": "echo", "tasks": [{"name": "echo"}]}
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(flow))
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    text = "h\u00e9llo \u2713 \U0001f600"
    result = flowsvc("run", str(path), "--input", json.dumps({"t": text}), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["execution_history"][0]["data"]["input"] == {"t": text}


def test_run_reports_failure_and_invalid_flows(tmp_path: Path) -> None:
    path = tmp_path / "failing.json"
    path.write_text(json.dumps({"name": "f", "start_task": "fail", "tasks": [{"name": "fail"}]}))
    result = flowsvc("run", str(path))
    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "FLOW_STATUS_FAILED"

    path.write_text(json.dumps({"name": "f", "start_task": "nope", "tasks": [{"name": "nope"}]}))
    result = flowsvc("run", str(path))
    assert result.returncode == 2
    assert "flow.tasks[0].name" in result.stderr and "registered tasks" in result.stderr

    path.write_text(json.dumps({"name": "f", "start_task": "x", "tasks": [], "bogus": 1}))
    result = flowsvc("run", str(path))
    assert result.returncode == 2 and "bogus" in result.stderr


@pytest.mark.parametrize("task", ["stuck_sync", "stubborn"])
def test_run_prints_and_exits_despite_a_task_it_had_to_abandon(tmp_path: Path, task: str) -> None:
    # Timed out, the task is abandoned (a thread cannot be killed; this coroutine ignores
    # every cancel): `run` must not wait for it at exit, which would be forever.
    write_module(tmp_path, "hanging_tasks", STUCK_TASKS)
    flow = {
        "name": "hang",
        "start_task": task,
        "tasks": [{"name": task, "timeout": "0.2s"}, {"name": "noop"}],
        "conditions": [
            {"source_task": task, "target_task_success": "end", "target_task_failure": "noop"}
        ],
    }
    path = tmp_path / "hang.json"
    path.write_text(json.dumps(flow))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "hanging_tasks"}
    result = flowsvc("run", str(path), env=env)  # its timeout (60 s) fails a hang
    assert result.returncode == 0, result.stderr
    history = json.loads(result.stdout)["execution_history"]
    assert [r["task"] for r in history] == [task, "noop"]
    assert (
        history[0]["error"].startswith("timed out after 0.2s")
        and "abandoned" in history[0]["error"]
    )


def test_run_of_a_sync_task_that_returned_exits_at_once_and_quietly(tmp_path: Path) -> None:
    # Its thread is idle, not stuck: `run` neither waits for it nor warns about it.
    write_module(
        tmp_path,
        "plain_tasks",
        """
        from flowsvc import register_task, TaskResult

        @register_task("plain_sync")
        def plain_sync():
            return TaskResult(status="success")
        """,
    )
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"name": "p", "start_task": "plain_sync",
                                "tasks": [{"name": "plain_sync"}]}))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "plain_tasks"}
    result = flowsvc("run", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert "still running" not in result.stderr, result.stderr


@pytest.mark.parametrize("task", ["mark_then_wait", "mark_then_block", "mark_then_ignore"])
def test_ctrl_c_during_run_is_one_line_and_exit_130(tmp_path: Path, task: str) -> None:
    write_module(
        tmp_path,
        "marking_tasks",
        f"""
        import asyncio, pathlib, threading
        from flowsvc import register_task, TaskResult

        @register_task("mark_then_wait")
        async def mark_then_wait():
            pathlib.Path({str(tmp_path / "started")!r}).touch()
            await asyncio.sleep(60)
            return TaskResult(status="success")

        @register_task("mark_then_block")
        def mark_then_block():  # a thread that never returns: exit must not wait for it
            pathlib.Path({str(tmp_path / "started")!r}).touch()
            threading.Event().wait()

        @register_task("mark_then_ignore")
        async def mark_then_ignore():  # swallows every cancel: Ctrl-C must still stop
            pathlib.Path({str(tmp_path / "started")!r}).touch()
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass
        """,
    )
    path = tmp_path / "wait.json"
    path.write_text(json.dumps({"name": "w", "start_task": task, "tasks": [{"name": task}]}))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "marking_tasks"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsvc", "run", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until((tmp_path / "started").exists, timeout=30)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[0] == "flowsvc: interrupted", err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_file_nested_too_deep_to_read_is_one_line_and_exit_2(
    tmp_path: Path, command: str
) -> None:
    # json.loads recurses once per level: a file nested past Python's recursion limit was a
    # RecursionError traceback and exit 1, the code that means "the flow failed".
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    result = flowsvc(command, str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"flowsvc: {path}: nests objects and lists too deeply to read"

    path.write_text("{not json")
    result = flowsvc(command, str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"flowsvc: {path}: not JSON: "), result.stderr


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_file_not_in_utf8_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, command: str, encoding: str
) -> None:
    # PowerShell's `>` writes UTF-16, older editors Latin-1: the error was only Python's
    # "'utf-8' codec can't decode byte 0xff in position 0", naming neither file nor fix.
    path = tmp_path / "flow.json"
    path.write_text(SAMPLE_FLOW.read_text(encoding="utf-8").replace("Data", "D\u00e4ta"), encoding)
    result = flowsvc(command, str(path))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"flowsvc: {path}: not UTF-8 text (byte 0x"), result.stderr
    assert result.stderr.rstrip().endswith("save it as UTF-8"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_input_nested_too_deep_to_read_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = flowsvc("run", str(SAMPLE_FLOW), "--input", "[" * 20_000 + "]" * 20_000)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "flowsvc: --input: nests objects and lists too deeply to read"


def test_run_refuses_an_input_the_server_refuses(tmp_path: Path) -> None:
    # A server refuses an input nested past MAX_JSON_DEPTH (INVALID_ARGUMENT, field
    # "input"); `flowsvc run`, where flows are tried out, ran it.
    def nested(levels: int) -> str:
        return '{"a": ' * levels + "1" + "}" * levels

    result = flowsvc("run", str(SAMPLE_FLOW), "--input", nested(MAX_JSON_DEPTH + 1))
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert result.stderr.strip() == f"flowsvc: input: {too_deep()}"

    result = flowsvc("run", str(SAMPLE_FLOW), "--input", nested(MAX_JSON_DEPTH))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["run", "validate"])
def test_run_and_validate_take_only_the_settings_of_a_flow(tmp_path: Path, command: str) -> None:
    # They run no server: its address, store and limits on calls mean nothing to them. A
    # server's setting in the environment stopped them ("bad configuration: FLOWSVC_DB=''")
    # and their --help offered --listen, --db ... flags that did nothing.
    env = {
        **os.environ,
        "FLOWSVC_DB": "",
        "FLOWSVC_LISTEN": "nowhere",
        "FLOWSVC_GRACE_SECONDS": "-1",
    }
    result = flowsvc(command, str(SAMPLE_FLOW), env=env)
    assert result.returncode == 0, result.stderr

    usage = flowsvc(command, "--help").stdout
    assert "--listen" not in usage and "--db" not in usage and "--grace-seconds" not in usage
    assert "--task-modules" in usage and "--max-tasks" in usage
    assert flowsvc(command, str(SAMPLE_FLOW), "--db", "x.db").returncode == 2

    # What shapes a flow still applies, from a flag or the environment.
    result = flowsvc(command, str(SAMPLE_FLOW), env={**env, "FLOWSVC_MAX_TASKS": "2"})
    assert result.returncode == (2 if command == "run" else 1), result.stderr
    assert "flow.tasks" in result.stdout + result.stderr


def test_validate_command(tmp_path: Path) -> None:
    result = flowsvc("validate", str(SAMPLE_FLOW))
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"valid": True}


def test_wait_until_polls(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    marker.write_text("x")
    assert wait_until(marker.exists, timeout=1)


async def test_shutdown_does_not_hang_on_a_stuck_sync_task(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "stuck_tasks",
        """
        import threading
        from flowsvc import register_task, TaskResult

        @register_task("stuck")
        def stuck():
            threading.Event().wait()  # never returns; a thread cannot be killed
            return TaskResult(status="success")
        """,
    )
    env = {"PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "stuck_tasks"}
    with server_process(tmp_path, "--grace-seconds", "0.2", env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=chain("stuck", "noop")))
            assert (await call.read()).WhichOneof("event") == "started"
            srv.proc.send_signal(signal.SIGTERM)
            rest = await read_all(call)
            assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_CANCELLED
        assert await asyncio.to_thread(srv.proc.wait, 20) == 0
        assert "exiting with sync tasks still running" in [m["msg"] for m in srv.log_lines()]


async def test_shutdown_names_stuck_sync_threads_beside_tasks_ignoring_cancel(
    tmp_path: Path,
) -> None:
    write_module(tmp_path, "both_stuck", STUCK_TASKS)
    env = {"PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "both_stuck"}
    with server_process(tmp_path, "--grace-seconds", "0.2", env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            calls = [
                stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=chain(name)))
                for name in ("stubborn", "stuck_sync")
            ]
            for call in calls:
                await call.read()
            srv.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(srv.proc.wait, 60) == 0
        lines = srv.log_lines()
        last = [m for m in lines if m["logger"] == "flowsvc.cli"][-1]
        assert last["msg"] == (
            "exiting with tasks that ignore cancellation and sync tasks still running"
        )
        assert last["tasks"] == 1 and len(last["threads"]) == 1, last
        # Both kinds of straggler share the one second after the grace period (before:
        # a second for the task, then another for the thread: the image's 8 s grace
        # ended past docker stop's 10 s).
        over = next(line["ts"] for line in lines if line["msg"].startswith("grace period over"))
        gap = datetime.fromisoformat(last["ts"]) - datetime.fromisoformat(over)
        assert gap.total_seconds() < 1.7, gap


async def test_shutdown_does_not_name_idle_sync_threads_as_still_running(
    tmp_path: Path,
) -> None:
    """A sync task that has returned leaves its thread idle in the pool: at exit, after a
    task that ignores its cancellation used up the time left, that thread was named among
    "sync tasks still running" (it was looked at without a moment to end)."""
    write_module(tmp_path, "idle_thread", STUCK_TASKS)
    env = {"PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "idle_thread"}
    with server_process(tmp_path, "--grace-seconds", "0.2", env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            done = await stub.ExecuteFlow(
                flow_service_pb2.ExecuteFlowRequest(flow=chain("quick_sync"))
            )
            assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            call = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=chain("stubborn")))
            await call.read()
            srv.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(srv.proc.wait, 60) == 0
        last = [m for m in srv.log_lines() if m["logger"] == "flowsvc.cli"][-1]
        assert last["msg"] == "exiting with tasks that ignore cancellation", last
        assert "threads" not in last, last


async def test_shutdown_cuts_off_a_task_that_ignores_cancellation(tmp_path: Path) -> None:
    """Its caller is told at once, the execution is recorded INTERRUPTED with its "flow
    ended" line, and the server exits about a second after the grace period, not six
    later (the image's 8 s grace must end before docker stop's 10 s kill)."""
    write_module(tmp_path, "stubborn_tasks", STUCK_TASKS)
    env = {"PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "stubborn_tasks"}
    db = tmp_path / "cut.db"
    with server_process(tmp_path, "--db", str(db), "--grace-seconds", "0.2", env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=chain("stubborn")))
            flow_id = (await call.read()).started.flow_id
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the server stopped while the flow's task ran" in (info.value.details() or "")
            # Waiting for the task would mean never exiting.
            assert await asyncio.to_thread(srv.proc.wait, 60) == 0
            took = time.monotonic() - signalled
        lines = srv.log_lines()
        assert "exiting with tasks that ignore cancellation" in [m["msg"] for m in lines]
        ended = [line for line in lines if line["msg"] == "flow ended"]
        assert [(line["flow_id"], line["status"]) for line in ended] == [(flow_id, "interrupted")]
        # The fields every "flow ended" line has (the README lists them).
        assert ended[0]["flow"] == "test flow" and ended[0]["steps"] == 0, ended[0]
        assert 0.2 <= ended[0]["duration_s"] < 5.0, ended[0]
        # One second, CUT_OFF_SECONDS, from the grace period's end to the cut-off (before:
        # two, one of them a second wait for the same task), then no further wait for it.
        over = next(line["ts"] for line in lines if line["msg"].startswith("grace period over"))
        gap = datetime.fromisoformat(ended[0]["ts"]) - datetime.fromisoformat(over)
        assert gap.total_seconds() < 1.7, gap
        assert took < 5.0, took  # before: 6.2 s and more
    with server_process(tmp_path, "--db", str(db), env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            got = await stub.GetExecution(flow_service_pb2.GetExecutionRequest(flow_id=flow_id))
            assert got.execution.status == flow_pb2.FLOW_STATUS_INTERRUPTED
            assert "ignored cancellation" in got.execution.message


async def test_a_client_that_stopped_reading_does_not_hold_the_exit(tmp_path: Path) -> None:
    """A flow running past the grace period, and a stream whose client stopped reading:
    the server waited a further 2 s for that stream's RPC (FINAL_RPC_GRACE_SECONDS), and
    the image's 8 s grace ended at 10 s, when docker stop kills."""
    with server_process(tmp_path, "--grace-seconds", "0.2", "--db", ":memory:") as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            slow = stub.StreamFlow(
                flow_service_pb2.StreamFlowRequest(flow=chain(("sleep", {"seconds": 60})))
            )
            await slow.read()
            # 500 steps of 20 KB each: far more than the stream's flow-control window.
            big = chain(("echo", {"x": "y" * 20_000}))
            big.name, big.max_steps = "big", 500
            big.conditions.add(
                source_task="echo", target_task_success="echo", target_task_failure="end"
            )
            unread = stub.StreamFlow(flow_service_pb2.StreamFlowRequest(flow=big))
            await unread.read()  # and never again

            async def big_ended() -> bool:
                listed = await stub.ListExecutions(
                    flow_service_pb2.ListExecutionsRequest(flow_name="big")
                )
                return listed.executions[0].status != flow_pb2.FLOW_STATUS_RUNNING

            deadline = time.monotonic() + 20
            while not await big_ended():
                assert time.monotonic() < deadline, "the big flow never ended"
                await asyncio.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(srv.proc.wait, 30) == 0
            unread.cancel()
        lines = srv.log_lines()
        over = next(line["ts"] for line in lines if line["msg"].startswith("grace period over"))
        stopped = next(line["ts"] for line in lines if line["msg"] == "stopped")
        gap = datetime.fromisoformat(stopped) - datetime.fromisoformat(over)
        assert gap.total_seconds() < 1.6, gap  # before: 2 s


async def test_policy_caps_are_configurable(tmp_path: Path) -> None:
    with server_process(
        tmp_path, "--max-attempts", "3", env={"FLOWSVC_MAX_TASK_TIMEOUT_SECONDS": "1"}
    ) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            flow = chain("noop")
            flow.tasks[0].retry.max_attempts = 4
            flow.tasks[0].timeout.FromSeconds(2)
            response = await stub.ValidateFlow(flow_service_pb2.ValidateFlowRequest(flow=flow))
            assert {v.field: v.description for v in response.violations} == {
                "flow.tasks[0].timeout": "2s is over this server's cap of 1s",
                "flow.tasks[0].retry.max_attempts": "4 is over this server's cap of 3",
            }


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_both_event_loops_serve(tmp_path: Path, loop: str) -> None:
    with server_process(tmp_path, "--event-loop", loop, "--db", ":memory:") as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            response = await stub.ExecuteFlow(
                flow_service_pb2.ExecuteFlowRequest(flow=chain("noop"))
            )
            assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED


def test_a_damaged_database_is_refused_at_start(tmp_path: Path) -> None:
    # It used to start and stay SERVING, while every flow and every listing failed
    # UNAVAILABLE ("database disk image is malformed"), which clients retry for ever.
    import sqlite3

    db = tmp_path / "damaged.db"
    with server_process(tmp_path, "--db", str(db)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")))
        srv.proc.send_signal(signal.SIGTERM)  # a clean stop: everything in the main file
        assert srv.proc.wait(30) == 0
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'executions'"
        ).fetchone()
    conn.close()
    with db.open("r+b") as file:  # the executions table's first page: garbage
        file.seek((root - 1) * page_size)
        file.write(b"\xde\xad" * (page_size // 2))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0", "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()  # "serving on", or EOF
        assert "serving on" not in first
        assert proc.wait(30) == 2
        last = proc.stderr.read().strip().splitlines()[-1]
        assert "damaged" in last and str(db) in last, last
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("args", [["--version"], ["serve", "--version"], ["run", "--version"]])
def test_version_prints_the_installed_package_version(tmp_path: Path, args: list[str]) -> None:
    from importlib.metadata import version

    result = flowsvc(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"flowsvc {version('flowsvc')}"
    assert not list(tmp_path.iterdir())  # it opened no database: it served nothing


@pytest.mark.parametrize(
    ("name", "value", "range_text"),
    [
        ("sync_task_workers", str(10**9), "at least 1 and at most 10,000"),
        ("retention_seconds", "-1", "at least 0 and at most 3,155,760,000"),
        ("max_attempts", "0", "at least 1 and at most 4,294,967,295"),
        ("db_max_bytes", str(10**30), "at least 0 and at most 281,474,976,579,584"),
        ("max_tasks", "1e3", "at least 1 and at most 2,147,483,647"),
    ],
)
@pytest.mark.parametrize("through", ["flag", "env"])
def test_a_number_out_of_range_is_one_line_naming_the_setting_and_its_range(
    tmp_path: Path, name: str, value: str, range_text: str, through: str
) -> None:
    flag, variable = "--" + name.replace("_", "-"), "FLOWSVC_" + name.upper()
    args = [f"{flag}={value}"] if through == "flag" else []
    env = {**os.environ, variable: value} if through == "env" else None
    result = flowsvc("serve", "--listen", "127.0.0.1:0", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    named = flag if through == "flag" else variable
    assert line.startswith(f"flowsvc: bad configuration: {named}={value!r}: must be "), line
    assert range_text in line, line
    assert not list(tmp_path.iterdir())  # refused before opening a database


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1e300", "soon"])
def test_probe_refuses_a_timeout_it_cannot_wait(tmp_path: Path, value: str) -> None:
    # These reached gRPC, whose DEADLINE_EXCEEDED at once (exit 1) called a healthy
    # server unhealthy.
    result = flowsvc("probe", "--address", "127.0.0.1:1", f"--timeout={value}", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "--timeout" in result.stderr
    assert "above 0 and at most 3,600" in result.stderr
    assert "Traceback" not in result.stderr
