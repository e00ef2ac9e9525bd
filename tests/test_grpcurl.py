"""The README's grpcurl walkthrough, run for real against a `flowsvc serve` subprocess.

Each command below is written exactly as the README shows it, with HOST:PORT standing
for the server's address (localhost:50051 in the README, a free loopback port here).
grpcurl learns the API from server reflection: no proto files are passed to it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import BIN, ROOT, SAMPLE_FLOW, ServerProcess, server_process

GRPCURL = BIN / "grpcurl"

# The README's commands, verbatim. `< FILE` is not part of the string: the test feeds
# the file's bytes on stdin, as the shell would.
LIST = "grpcurl -plaintext HOST:PORT list"
DESCRIBE_SERVICE = "grpcurl -plaintext HOST:PORT describe flowmanager.v1.FlowService"
DESCRIBE_FLOW = "grpcurl -plaintext HOST:PORT describe flowmanager.v1.Flow"
DESCRIBE_METHOD = "grpcurl -plaintext HOST:PORT describe flowmanager.v1.FlowService.ExecuteFlow"
LIST_TASKS = "grpcurl -plaintext HOST:PORT flowmanager.v1.FlowService/ListTasks"
EXECUTE_SAMPLE = "grpcurl -plaintext -d @ HOST:PORT flowmanager.v1.FlowService/ExecuteFlow"
STREAM_SAMPLE = "grpcurl -plaintext -d @ HOST:PORT flowmanager.v1.FlowService/StreamFlow"
VALIDATE_SAMPLE = "grpcurl -plaintext -d @ HOST:PORT flowmanager.v1.FlowService/ValidateFlow"
INVALID_FLOW = (
    '{"flow": {"name": "bad", "start_task": "task1", "tasks": [{"name": "task1"}], '
    '"conditions": [{"source_task": "task1", "target_task_success": "task9", '
    '"target_task_failure": "end"}]}}'
)
VALIDATE_INVALID = (
    f"grpcurl -plaintext -d '{INVALID_FLOW}' HOST:PORT flowmanager.v1.FlowService/ValidateFlow"
)
EXECUTE_INVALID = (
    f"grpcurl -plaintext -d '{INVALID_FLOW}' HOST:PORT flowmanager.v1.FlowService/ExecuteFlow"
)
HEALTH = "grpcurl -plaintext HOST:PORT grpc.health.v1.Health/Check"
HEALTH_SERVICE = (
    'grpcurl -plaintext -d \'{"service": "flowmanager.v1.FlowService"}\' '
    "HOST:PORT grpc.health.v1.Health/Check"
)
FAILING_FLOW = (
    '{"flow": {"name": "payment", "start_task": "fail", '
    '"tasks": [{"name": "fail", "params": {"message": "card declined"}}]}}'
)
EXECUTE_FAILING = (
    f"grpcurl -plaintext -d '{FAILING_FLOW}' HOST:PORT flowmanager.v1.FlowService/ExecuteFlow"
)

SEED_OUTPUTS = [
    ("task1", {"raw_data": "data"}),
    ("task2", {"processed_data": "data"}),
    ("task3", {"storage_id": "12345"}),
]
BUILTIN_TASKS = ["echo", "fail", "http", "noop", "sleep", "task1", "task2", "task3"]
# grpcurl exits with 64 + the gRPC status code when the RPC fails.
GRPCURL_STATUS_OFFSET = 64
INVALID_ARGUMENT = 3
NOT_FOUND = 5


@pytest.fixture(scope="module")
def grpcurl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with server_process(tmp_path_factory.mktemp("grpcurl-server")) as server:
        yield server


def grpcurl(
    server: ServerProcess, command: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run a README command line, HOST:PORT being the server's address."""
    argv = shlex.split(command.replace("HOST:PORT", server.address))
    assert argv[0] == "grpcurl"
    return subprocess.run(
        [str(GRPCURL), *argv[1:]], input=stdin, capture_output=True, timeout=60, check=False
    )


def output(result: subprocess.CompletedProcess[bytes]) -> str:
    """stdout of a successful grpcurl run."""
    assert result.returncode == 0, (
        f"grpcurl exited {result.returncode}\n"
        f"stdout: {result.stdout.decode()}\nstderr: {result.stderr.decode()}"
    )
    return result.stdout.decode()


def json_output(result: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(output(result))


def json_stream(text: str) -> list[Any]:
    """The JSON objects grpcurl prints one after another for a server stream."""
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return objects
        obj, pos = decoder.raw_decode(text, pos)
        objects.append(obj)


def assert_uuid(value: str) -> None:
    assert str(uuid.UUID(value)) == value


def sample_bytes() -> bytes:
    """examples/sample_flow.json exactly as `< examples/sample_flow.json` feeds it."""
    return SAMPLE_FLOW.read_bytes()


def test_list_shows_services_through_reflection(grpcurl_server: ServerProcess) -> None:
    services = output(grpcurl(grpcurl_server, LIST)).split()
    assert services == [
        "flowmanager.v1.FlowService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


def test_describe_service_shows_rpcs(grpcurl_server: ServerProcess) -> None:
    text = output(grpcurl(grpcurl_server, DESCRIBE_SERVICE))
    assert "flowmanager.v1.FlowService is a service" in text
    rpcs = re.findall(r"^\s*rpc (\w+) \(", text, flags=re.MULTILINE)
    assert sorted(rpcs) == [
        "CancelExecution",
        "ExecuteFlow",
        "GetExecution",
        "ListExecutions",
        "ListTasks",
        "StreamFlow",
        "ValidateFlow",
        "WatchExecution",
    ]
    assert "returns ( stream .flowmanager.v1.StreamFlowResponse )" in text


def test_describe_flow_shows_fields(grpcurl_server: ServerProcess) -> None:
    text = output(grpcurl(grpcurl_server, DESCRIBE_FLOW))
    assert "flowmanager.v1.Flow is a message" in text
    fields = re.findall(r"^\s*(?:repeated )?\S+ (\w+) = \d+;", text, flags=re.MULTILINE)
    assert fields == ["name", "start_task", "tasks", "conditions", "max_steps", "timeout"]


def test_describe_shows_the_proto_comments(grpcurl_server: ServerProcess) -> None:
    # The contract's comments are its documentation; reflection used to send the files
    # without them, so describe showed bare fields.
    flow = output(grpcurl(grpcurl_server, DESCRIBE_FLOW))
    assert "// Required. The name of the task that runs first" in flow
    service = output(grpcurl(grpcurl_server, DESCRIBE_SERVICE))
    assert "// Runs a flow to completion and returns its whole execution history." in service


def test_describe_method(grpcurl_server: ServerProcess) -> None:
    # Reflection looks symbols up as "<package>.<service>[.<method>]"; a method used to be
    # NOT_FOUND ("Symbol not found"), as the descriptor pool's lookup knows no methods.
    text = output(grpcurl(grpcurl_server, DESCRIBE_METHOD))
    assert "flowmanager.v1.FlowService.ExecuteFlow is a method" in text
    assert "rpc ExecuteFlow ( .flowmanager.v1.ExecuteFlowRequest )" in text
    health = output(
        grpcurl(grpcurl_server, "grpcurl -plaintext HOST:PORT describe grpc.health.v1.Health.Check")
    )
    assert "grpc.health.v1.Health.Check is a method" in health


def test_list_tasks(grpcurl_server: ServerProcess) -> None:
    tasks = json_output(grpcurl(grpcurl_server, LIST_TASKS))["tasks"]
    # Only the built-ins: a task package installed in this Python (the README's
    # acme-flow-tasks, say) adds its tasks to every server, this one too.
    builtins = [t for t in tasks if t["source"].startswith("flowsvc.tasks.")]
    assert [t["name"] for t in builtins] == BUILTIN_TASKS
    for task in tasks:
        assert task["description"], task


def test_execute_sample_flow(grpcurl_server: ServerProcess) -> None:
    response = json_output(grpcurl(grpcurl_server, EXECUTE_SAMPLE, stdin=sample_bytes()))
    assert_uuid(response["flow_id"])
    assert response["status"] == "FLOW_STATUS_SUCCEEDED"
    history = response["execution_history"]
    assert [(r["task"], r["data"]) for r in history] == SEED_OUTPUTS
    assert [r["status"] for r in history] == ["TASK_STATUS_SUCCESS"] * 3
    assert [r["step"] for r in history] == [1, 2, 3]


def test_stream_sample_flow(grpcurl_server: ServerProcess) -> None:
    events = json_stream(output(grpcurl(grpcurl_server, STREAM_SAMPLE, stdin=sample_bytes())))
    assert len(events) == 5, events
    # Each message: its sequence number (uint64: a JSON string) and exactly one event.
    assert [e.pop("sequence") for e in events] == ["1", "2", "3", "4", "5"]
    assert all(len(e) == 1 for e in events), events
    first, *results, last = events
    assert_uuid(first["started"]["flow_id"])
    assert first["started"]["flow_name"] == "Data processing flow"
    assert [(e["task_result"]["task"], e["task_result"]["data"]) for e in results] == (SEED_OUTPUTS)
    assert last["finished"]["status"] == "FLOW_STATUS_SUCCEEDED"
    assert last["finished"]["steps"] == 3


def test_validate_sample_flow(grpcurl_server: ServerProcess) -> None:
    response = json_output(grpcurl(grpcurl_server, VALIDATE_SAMPLE, stdin=sample_bytes()))
    assert response == {"valid": True}


def test_validate_invalid_flow(grpcurl_server: ServerProcess) -> None:
    response = json_output(grpcurl(grpcurl_server, VALIDATE_INVALID))
    # grpcurl leaves false booleans out of its JSON: absent means false.
    assert response.get("valid", False) is False
    fields = [v["field"] for v in response["violations"]]
    assert fields == ["flow.conditions[0].target_task_success"]
    assert "task9" in response["violations"][0]["description"]


def test_execute_invalid_flow_is_invalid_argument(grpcurl_server: ServerProcess) -> None:
    result = grpcurl(grpcurl_server, EXECUTE_INVALID)
    assert result.returncode == GRPCURL_STATUS_OFFSET + INVALID_ARGUMENT, result
    text = result.stdout.decode() + result.stderr.decode()
    assert "Code: InvalidArgument" in text
    assert "flow.conditions[0].target_task_success" in text
    # grpcurl prints each status detail as JSON: the google.rpc.BadRequest.
    details = [
        json.loads(m) for m in re.findall(r"^\s*\d+\)\s+(\{.*\})$", text, flags=re.MULTILINE)
    ]
    assert details, text
    assert details[0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    violations = details[0]["field_violations"]
    assert [v["field"] for v in violations] == ["flow.conditions[0].target_task_success"]
    # ... and the google.rpc.ErrorInfo every error carries, as the README shows it.
    assert details[1] == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "FLOW_INVALID",
        "domain": "flowsvc",
        "metadata": {"field": "flow.conditions[0].target_task_success", "violationCount": "1"},
    }


def test_an_unknown_execution_prints_its_error_info(grpcurl_server: ServerProcess) -> None:
    flow_id = str(uuid.uuid4())
    result = grpcurl(grpcurl_server, GET_EXECUTION.replace("FLOW_ID", flow_id))
    assert result.returncode == GRPCURL_STATUS_OFFSET + NOT_FOUND, result
    text = result.stdout.decode() + result.stderr.decode()
    assert "Code: NotFound" in text
    details = [
        json.loads(m) for m in re.findall(r"^\s*\d+\)\s+(\{.*\})$", text, flags=re.MULTILINE)
    ]
    assert details == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "EXECUTION_NOT_FOUND",
            "domain": "flowsvc",
            "metadata": {"flowId": flow_id},
        }
    ], text


@pytest.mark.parametrize("command", [HEALTH, HEALTH_SERVICE], ids=["server", "FlowService"])
def test_health_check(grpcurl_server: ServerProcess, command: str) -> None:
    assert json_output(grpcurl(grpcurl_server, command)) == {"status": "SERVING"}


def test_failing_task_is_not_an_rpc_error(grpcurl_server: ServerProcess) -> None:
    response = json_output(grpcurl(grpcurl_server, EXECUTE_FAILING))
    assert_uuid(response["flow_id"])
    assert response["status"] == "FLOW_STATUS_FAILED"
    [entry] = response["execution_history"]
    assert entry["task"] == "fail"
    assert entry["status"] == "TASK_STATUS_FAILURE"
    assert entry["error"] == "card declined"


# Executions are kept: look them up, list them, watch them, as the README shows.
GET_EXECUTION = (
    'grpcurl -plaintext -d \'{"flow_id": "FLOW_ID"}\' '
    "HOST:PORT flowmanager.v1.FlowService/GetExecution"
)
GET_EXECUTION_BASIC = (
    'grpcurl -plaintext -d \'{"flow_id": "FLOW_ID", "view": "EXECUTION_VIEW_BASIC"}\' '
    "HOST:PORT flowmanager.v1.FlowService/GetExecution"
)
LIST_EXECUTIONS = (
    'grpcurl -plaintext -d \'{"page_size": 2, "flow_name": "Data processing flow"}\' '
    "HOST:PORT flowmanager.v1.FlowService/ListExecutions"
)
WATCH_EXECUTION = (
    'grpcurl -plaintext -d \'{"flow_id": "FLOW_ID", "after_sequence": 2}\' '
    "HOST:PORT flowmanager.v1.FlowService/WatchExecution"
)
CANCEL_EXECUTION = (
    'grpcurl -plaintext -d \'{"flow_id": "FLOW_ID"}\' '
    "HOST:PORT flowmanager.v1.FlowService/CancelExecution"
)
FAILED_PRECONDITION = 9


def test_executions_are_kept_and_can_be_looked_up(grpcurl_server: ServerProcess) -> None:
    executed = json_output(grpcurl(grpcurl_server, EXECUTE_SAMPLE, stdin=sample_bytes()))
    flow_id = executed["flow_id"]

    got = json_output(grpcurl(grpcurl_server, GET_EXECUTION.replace("FLOW_ID", flow_id)))
    execution = got["execution"]
    assert execution["status"] == "FLOW_STATUS_SUCCEEDED"
    assert execution["execution_history"] == executed["execution_history"]
    assert execution["flow"]["name"] == "Data processing flow"

    basic = json_output(grpcurl(grpcurl_server, GET_EXECUTION_BASIC.replace("FLOW_ID", flow_id)))
    assert "execution_history" not in basic["execution"]
    assert basic["execution"]["last_sequence"] == "5"  # started, 3 results, finished
    assert basic["execution"]["status"] == "FLOW_STATUS_SUCCEEDED"

    listed = json_output(grpcurl(grpcurl_server, LIST_EXECUTIONS))
    assert listed["executions"][0]["flow_id"] == flow_id  # newest first
    assert len(listed["executions"]) <= 2

    tail = json_stream(output(grpcurl(grpcurl_server, WATCH_EXECUTION.replace("FLOW_ID", flow_id))))
    assert [m["sequence"] for m in tail] == ["3", "4", "5"]
    assert tail[-1]["finished"]["status"] == "FLOW_STATUS_SUCCEEDED"

    result = grpcurl(grpcurl_server, CANCEL_EXECUTION.replace("FLOW_ID", flow_id))
    assert result.returncode == GRPCURL_STATUS_OFFSET + FAILED_PRECONDITION
    assert "FailedPrecondition" in result.stderr.decode()


def test_every_grpcurl_command_of_the_readme_is_one_run_here() -> None:
    # The README says each of its grpcurl commands is run, as written, by this file: a
    # command added there (or changed) without its twin here would go untested.
    from tests import test_tls  # its TLS command, run against a server with TLS

    readme = (ROOT / "README.md").read_text()
    tested = {
        value.replace("HOST:PORT", "localhost:50051")
        for module in (globals(), vars(test_tls))
        for value in module.values()
        if isinstance(value, str) and value.startswith("grpcurl ")
    }
    shown = [line.split(" < ")[0] for line in readme.splitlines() if line.startswith("grpcurl ")]
    assert shown, "the README shows no grpcurl command"
    assert [c for c in shown if c not in tested] == []
