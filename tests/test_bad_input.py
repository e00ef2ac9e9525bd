"""Bad input over a real server: INVALID_ARGUMENT + BadRequest field violations, no task runs.

Every test talks to the real server fixture through a real grpc.aio channel. The
server here has small limits (max_tasks=3, max_steps_cap=50, 64 KiB requests) so
the limit checks are cheap to reach.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from flowsvc import convert
from flowsvc.config import Settings
from flowsvc.models import TaskResult
from flowsvc.registry import TaskRegistry
from tests.support import chain, flow_pb

MAX_TASKS = 3
MAX_STEPS_CAP = 50
MAX_MESSAGE_BYTES = 64 * 1024
TIMEOUT = 10

Violations = list[tuple[str, str]]


@pytest.fixture
def settings() -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        grace_seconds=5.0,
        log_level="DEBUG",
        max_tasks=MAX_TASKS,
        max_steps_cap=MAX_STEPS_CAP,
        default_max_steps=20,
        max_message_bytes=MAX_MESSAGE_BYTES,
        db=":memory:",
    )


@pytest.fixture
def calls(registry: TaskRegistry) -> list[str]:
    """Registers a task "count" that records every run in the returned list."""
    runs: list[str] = []

    async def count() -> TaskResult:
        """Record a run and succeed."""
        runs.append("count")
        return TaskResult.success()

    registry.register("count", count)
    return runs


# --- helpers -------------------------------------------------------------------------------


def bad_request(err: grpc.aio.AioRpcError) -> Violations:
    """The (field, description) pairs of the google.rpc.BadRequest carried by `err`."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no grpc-status-details-bin in the error: {err!r}"
    # The BadRequest, then the ErrorInfo every error carries (see test_error_reasons).
    assert len(status.details) == 2, status
    assert status.details[1].Is(error_details_pb2.ErrorInfo.DESCRIPTOR), status
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad), f"details[0] is {status.details[0].type_url}"
    return [(v.field, v.description) for v in bad.field_violations]


def fields(violations: Violations) -> list[str]:
    return [field for field, _ in violations]


async def execute_error(stub, flow: flow_pb2.Flow | None) -> grpc.aio.AioRpcError:
    """Call ExecuteFlow with `flow` (None: no flow field) and return the error it must raise."""
    request = flow_service_pb2.ExecuteFlowRequest()
    if flow is not None:
        request.flow.CopyFrom(flow)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(request, timeout=TIMEOUT)
    return info.value


async def execute_violations(stub, flow: flow_pb2.Flow | None) -> Violations:
    """ExecuteFlow must fail with INVALID_ARGUMENT; return its field violations."""
    err = await execute_error(stub, flow)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    return bad_request(err)


async def stream_error(stub, flow: flow_pb2.Flow | None) -> tuple[grpc.aio.AioRpcError, list]:
    """Call StreamFlow with `flow`; return the error and the messages received before it."""
    request = flow_service_pb2.StreamFlowRequest()
    if flow is not None:
        request.flow.CopyFrom(flow)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in stub.StreamFlow(request, timeout=TIMEOUT):
            received.append(message)
    return info.value, received


def one(violations: Violations, field: str) -> str:
    """Assert `violations` is exactly one violation of `field`; return its description."""
    assert fields(violations) == [field], violations
    return violations[0][1]


def valid_base() -> flow_pb2.Flow:
    """noop -> task1 -> end, the flow most cases below break in one place."""
    return chain("noop", ("task1", {"delay_seconds": 0}))


# --- 1-3: flow, name, start_task --------------------------------------------------------------


async def test_missing_flow_is_reported_as_field_flow(stub) -> None:
    violations = await execute_violations(stub, None)
    assert "required" in one(violations, "flow")


async def test_empty_flow_message_reports_name_tasks_and_start_task(stub) -> None:
    violations = await execute_violations(stub, flow_pb2.Flow())
    assert set(fields(violations)) == {"flow.name", "flow.tasks", "flow.start_task"}
    assert "at least one task" in dict(violations)["flow.tasks"]


@pytest.mark.parametrize("name", ["", "   "], ids=["empty", "blank"])
async def test_empty_flow_name(stub, name: str) -> None:
    flow = valid_base()
    flow.name = name
    assert "must not be empty" in one(await execute_violations(stub, flow), "flow.name")


async def test_a_flow_name_longer_than_a_list_page_can_carry_is_refused(stub) -> None:
    # It travels in every ListExecutions entry and `started` event: a 1 MB name made
    # every page holding its execution too large for clients, until retention.
    flow = valid_base()
    flow.name = "n" * 257
    assert one(await execute_violations(stub, flow), "flow.name") == (
        "is 257 characters; the limit is 256"
    )
    flow.name = "n" * 256
    response = await stub.ExecuteFlow(flow_service_pb2.ExecuteFlowRequest(flow=flow))
    assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED


@pytest.mark.parametrize(
    ("start", "expected"),
    [("", "must not be empty"), ("task2", "'task2' is not one of the flow's tasks")],
    ids=["empty", "not-a-declared-task"],
)
async def test_bad_start_task(stub, start: str, expected: str) -> None:
    flow = valid_base()
    flow.start_task = start
    assert expected in one(await execute_violations(stub, flow), "flow.start_task")


# --- 4: duplicate task names --------------------------------------------------------------


async def test_duplicate_task_name_points_at_the_second_and_mentions_the_first(stub) -> None:
    flow = flow_pb(["noop", "noop"])
    description = one(await execute_violations(stub, flow), "flow.tasks[1].name")
    assert "duplicate" in description
    assert "'noop'" in description
    assert "flow.tasks[0]" in description


# --- 5-8: conditions ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["task2", "end"], ids=["undeclared", "end"])
async def test_condition_source_not_a_declared_task(stub, source: str) -> None:
    flow = valid_base()  # conditions[0] is noop -> task1
    flow.conditions.add(source_task=source, target_task_success="end", target_task_failure="end")
    description = one(await execute_violations(stub, flow), "flow.conditions[1].source_task")
    assert f"{source!r} is not one of the flow's tasks" in description


async def test_condition_with_empty_source(stub) -> None:
    flow = valid_base()
    flow.conditions[0].source_task = ""
    description = one(await execute_violations(stub, flow), "flow.conditions[0].source_task")
    assert "must not be empty" in description


@pytest.mark.parametrize("target_field", ["target_task_success", "target_task_failure"])
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("task2", "'task2' is neither one of the flow's tasks nor 'end'"),
        ("END", "'END' is neither one of the flow's tasks nor 'end'"),
        ("", "must not be empty"),
    ],
    ids=["undeclared", "wrong-case-end", "empty"],
)
async def test_condition_bad_target(stub, target_field: str, target: str, expected: str) -> None:
    flow = valid_base()
    flow.conditions.add(source_task="task1", target_task_success="end", target_task_failure="end")
    setattr(flow.conditions[1], target_field, target)
    field = f"flow.conditions[1].{target_field}"
    assert expected in one(await execute_violations(stub, flow), field)


async def test_two_conditions_for_one_source(stub) -> None:
    flow = valid_base()
    flow.conditions.add(source_task="noop", target_task_success="end", target_task_failure="end")
    description = one(await execute_violations(stub, flow), "flow.conditions[1].source_task")
    assert "'noop'" in description
    assert "flow.conditions[0]" in description
    assert "at most one" in description


@pytest.mark.parametrize("outcome", ["maybe", "Success", "succeeded", " "])
async def test_condition_outcome_other_than_success_or_failure(stub, outcome: str) -> None:
    flow = valid_base()
    flow.conditions[0].outcome = outcome
    description = one(await execute_violations(stub, flow), "flow.conditions[0].outcome")
    assert "'success' or 'failure'" in description
    assert repr(outcome) in description


@pytest.mark.parametrize("outcome", ["", "success", "failure"])
async def test_condition_outcomes_that_are_accepted(stub, outcome: str) -> None:
    flow = valid_base()
    flow.conditions[0].outcome = outcome
    response = await stub.ValidateFlow(flow_service_pb2.ValidateFlowRequest(flow=flow))
    assert response.valid, response


# --- 9: unregistered task -----------------------------------------------------------------


async def test_unregistered_task_lists_the_registered_ones(stub) -> None:
    flow = chain("noop", "no_such_task")
    description = one(await execute_violations(stub, flow), "flow.tasks[1].name")
    assert "'no_such_task'" in description
    assert "not registered" in description
    for registered in ("noop", "task1", "task2", "task3", "fail", "sleep", "echo"):
        assert registered in description


async def test_reserved_task_name_end(stub) -> None:
    flow = flow_pb(["noop", "end"])
    description = one(await execute_violations(stub, flow), "flow.tasks[1].name")
    assert "reserved" in description


# --- 10-11: limits ------------------------------------------------------------------------


async def test_max_steps_over_the_cap(stub) -> None:
    flow = valid_base()
    flow.max_steps = MAX_STEPS_CAP + 1
    description = one(await execute_violations(stub, flow), "flow.max_steps")
    assert str(MAX_STEPS_CAP + 1) in description
    assert str(MAX_STEPS_CAP) in description


async def test_max_steps_at_the_cap_is_accepted(stub) -> None:
    flow = valid_base()
    flow.max_steps = MAX_STEPS_CAP
    response = await stub.ExecuteFlow(
        flow_service_pb2.ExecuteFlowRequest(flow=flow), timeout=TIMEOUT
    )
    assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_more_tasks_than_the_limit(stub) -> None:
    flow = flow_pb(["noop", "task1", "task2", "task3"])  # 4 distinct, registered tasks
    description = one(await execute_violations(stub, flow), "flow.tasks")
    assert f"declares {MAX_TASKS + 1} tasks" in description
    assert f"limit is {MAX_TASKS}" in description


def test_a_flow_far_over_the_task_limit_is_refused_quickly(registry) -> None:
    # Each task referring to the one before, in a chain: checking that every reference
    # can have run took time in the square of the tasks (12,000 tasks, a 650 KB request,
    # held the server's event loop for a minute). Over the limit, the order is not
    # checked: the flow is refused for its size.
    from flowsvc.engine import FlowEngine
    from flowsvc.models import Condition, Flow, Task
    from flowsvc.validation import Limits

    n = 6000
    tasks = tuple(Task(f"t{i}", params={"x": f"${{t{i - 1}.data}}"} if i else {}) for i in range(n))
    routes = tuple(Condition(f"t{i}", f"t{i + 1}", "end") for i in range(n - 1))
    engine = FlowEngine(registry, Limits(max_tasks=MAX_TASKS))
    found = engine.validate(Flow("f", "t0", tasks, routes))
    # (Its params unchecked show the order was not walked; no timed assertion.)
    assert found[0].field == "flow.tasks" and f"declares {n} tasks" in found[0].description
    assert not any(".params" in v.field for v in found)
    # Within the limit, the order is still checked.
    backwards = Flow("f", "t0", (Task("t0", params={"x": "${t1.data}"}), Task("t1")), routes[:1])
    assert [v.field for v in engine.validate(backwards)] == [
        "flow.tasks[0].params.x",
        "flow.tasks[0].name",
        "flow.tasks[1].name",
    ]


@pytest.mark.parametrize("method", ["ValidateFlow", "ExecuteFlow"])
async def test_a_flow_of_too_many_tasks_or_conditions_is_refused_on_their_number(
    stub, monkeypatch, method: str
) -> None:
    # Every task and condition of a flow over the limit was converted and checked: a
    # few bytes each, a 3.8 MB request of 1.9 million empty conditions made 5.7 million
    # violations, 1.6 GB, and held the event loop for 12 s. Such a flow now gets one
    # violation for each count over the limit, and none of it is converted.
    converted: list[int] = []
    real = convert.task_from_pb

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        converted.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "task_from_pb", counting)
    flow = flow_pb2.Flow(name="f", start_task="noop")
    for _ in range(MAX_TASKS + 1000):
        flow.tasks.add()
        flow.conditions.add()
    if method == "ValidateFlow":
        response = await stub.ValidateFlow(
            flow_service_pb2.ValidateFlowRequest(flow=flow), timeout=TIMEOUT
        )
        found = [(v.field, v.description) for v in response.violations]
    else:
        found = await execute_violations(stub, flow)
    assert found == [
        ("flow.tasks", f"declares {MAX_TASKS + 1000} tasks; the limit is {MAX_TASKS}"),
        (
            "flow.conditions",
            f"declares {MAX_TASKS + 1000} conditions; each task has at most one, and the "
            f"limit is {MAX_TASKS} tasks",
        ),
    ]
    assert converted == []


async def test_tasks_at_the_limit_are_accepted(stub) -> None:
    flow = flow_pb(["noop", "task1", "task2"])
    response = await stub.ValidateFlow(flow_service_pb2.ValidateFlowRequest(flow=flow))
    assert response.valid, response


# --- 12: several problems at once -----------------------------------------------------------


def many_problems_flow() -> flow_pb2.Flow:
    flow = flow_pb2.Flow(name="", start_task="noop", max_steps=MAX_STEPS_CAP + 1)
    flow.tasks.add(name="noop")
    flow.tasks.add(name="ghost")  # not registered
    flow.tasks.add(name="noop")  # duplicate
    flow.conditions.add(
        source_task="noop",
        outcome="perhaps",
        target_task_success="nowhere",
        target_task_failure="",
    )
    flow.conditions.add(source_task="phantom", target_task_success="end", target_task_failure="end")
    return flow


MANY_PROBLEMS_FIELDS = [
    "flow.name",
    "flow.tasks[1].name",
    "flow.tasks[2].name",
    "flow.conditions[0].outcome",
    "flow.conditions[0].target_task_success",
    "flow.conditions[0].target_task_failure",
    "flow.conditions[1].source_task",
    "flow.max_steps",
]


async def test_several_problems_are_all_reported_in_field_order(stub) -> None:
    violations = await execute_violations(stub, many_problems_flow())
    assert fields(violations) == MANY_PROBLEMS_FIELDS
    assert all(description for _, description in violations)


async def test_several_problems_including_start_task_are_all_reported(stub) -> None:
    flow = many_problems_flow()
    flow.start_task = "missing"
    violations = await execute_violations(stub, flow)
    assert sorted(fields(violations)) == sorted([*MANY_PROBLEMS_FIELDS, "flow.start_task"])


async def test_start_task_violation_comes_before_task_violations(stub) -> None:
    flow = many_problems_flow()
    flow.start_task = "missing"
    violations = await execute_violations(stub, flow)
    assert fields(violations) == [
        MANY_PROBLEMS_FIELDS[0],
        "flow.start_task",
        *MANY_PROBLEMS_FIELDS[1:],
    ]


# The BadRequest travels in the trailing metadata (grpc-status-details-bin), and a
# grpc client by default refuses trailers over 8 KiB (soft limit, random rejection)
# and always over 16 KiB (hard limit). Bad input that makes the details that big
# would reach the client as RESOURCE_EXHAUSTED "Stream removed", with no BadRequest:
# the server caps the details and echoes of client values, and says what it left out.


def many_violations_flow(count: int = 300) -> flow_pb2.Flow:
    """sleep with `count` params it does not take: a 4 KB request, `count` violations.
    (Not tasks over the limit: such a flow gets the one violation for their number.)"""
    return chain(("sleep", {f"p{i:03}": 1 for i in range(count)}))


async def test_many_violations_still_give_invalid_argument(stub) -> None:
    flow = many_violations_flow()
    assert flow.ByteSize() < MAX_MESSAGE_BYTES
    violations = await execute_violations(stub, flow)
    assert fields(violations)[0].startswith("flow.tasks[0].params.p")
    assert "more violation" in violations[-1][1] and "ValidateFlow" in violations[-1][1]


async def test_long_unregistered_task_name_still_gives_invalid_argument(stub) -> None:
    flow = flow_pb(["noop", "y" * 8000])  # an 8 KB request, one violation
    assert flow.ByteSize() < MAX_MESSAGE_BYTES
    violations = await execute_violations(stub, flow)
    assert fields(violations) == ["flow.tasks[1].name"]


async def test_validate_flow_reports_every_one_of_many_violations(stub) -> None:
    """ValidateFlow carries violations in the response body, so size is no problem there."""
    response = await stub.ValidateFlow(
        flow_service_pb2.ValidateFlowRequest(flow=many_violations_flow()), timeout=TIMEOUT
    )
    assert response.valid is False
    # Sorted: each request's Struct keys come in an order of their own.
    assert sorted(v.field for v in response.violations) == [
        f"flow.tasks[0].params.p{i:03}" for i in range(300)
    ]


# --- 13-14: nothing runs on bad input; StreamFlow -----------------------------------------


def _with_bad_target(flow: flow_pb2.Flow) -> None:
    flow.conditions[0].target_task_success = "nowhere"


def _with_unregistered_task(flow: flow_pb2.Flow) -> None:
    flow.tasks.add(name="ghost")


def _with_max_steps_over_cap(flow: flow_pb2.Flow) -> None:
    flow.max_steps = MAX_STEPS_CAP + 1


def _with_empty_name(flow: flow_pb2.Flow) -> None:
    flow.name = ""


def _with_too_many_tasks(flow: flow_pb2.Flow) -> None:
    flow.tasks.add(name="task1")
    flow.tasks.add(name="task2")


BREAKERS: dict[str, tuple[Callable[[flow_pb2.Flow], None], str]] = {
    "bad-target": (_with_bad_target, "flow.conditions[0].target_task_success"),
    "unregistered-task": (_with_unregistered_task, "flow.tasks[2].name"),
    "max-steps": (_with_max_steps_over_cap, "flow.max_steps"),
    "empty-name": (_with_empty_name, "flow.name"),
    "too-many-tasks": (_with_too_many_tasks, "flow.tasks"),
}


def counting_flow(breaker: str) -> tuple[flow_pb2.Flow, str]:
    """count -> noop -> end, broken by BREAKERS[breaker]; and the field it breaks."""
    flow = chain("count", "noop")
    fn, field = BREAKERS[breaker]
    fn(flow)
    return flow, field


@pytest.mark.parametrize("breaker", list(BREAKERS))
async def test_no_task_runs_on_bad_execute(stub, calls: list[str], breaker: str) -> None:
    flow, field = counting_flow(breaker)
    assert fields(await execute_violations(stub, flow)) == [field]
    assert calls == []


@pytest.mark.parametrize("breaker", list(BREAKERS))
async def test_stream_fails_before_any_message_and_no_task_runs(
    stub, calls: list[str], breaker: str
) -> None:
    flow, field = counting_flow(breaker)
    err, received = await stream_error(stub, flow)
    assert received == []
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert fields(bad_request(err)) == [field]
    assert calls == []


async def test_stream_missing_flow(stub, calls: list[str]) -> None:
    err, received = await stream_error(stub, None)
    assert received == []
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert fields(bad_request(err)) == ["flow"]


async def test_counting_task_does_run_on_a_valid_flow(stub, calls: list[str]) -> None:
    """Control for the tests above: the counter counts when the flow is good."""
    response = await stub.ExecuteFlow(
        flow_service_pb2.ExecuteFlowRequest(flow=chain("count", "noop")), timeout=TIMEOUT
    )
    assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    assert calls == ["count"]


# --- 15: ValidateFlow ---------------------------------------------------------------------


@pytest.mark.parametrize("breaker", list(BREAKERS))
async def test_validate_flow_reports_the_same_violations_as_execute(
    stub, calls: list[str], breaker: str
) -> None:
    flow, _ = counting_flow(breaker)
    executed = await execute_violations(stub, flow)
    response = await stub.ValidateFlow(
        flow_service_pb2.ValidateFlowRequest(flow=flow), timeout=TIMEOUT
    )
    assert response.valid is False
    assert [(v.field, v.description) for v in response.violations] == executed
    assert calls == []


async def test_validate_flow_many_problems_and_missing_flow_match_execute(stub) -> None:
    for flow in (many_problems_flow(), None):
        executed = await execute_violations(stub, flow)
        request = flow_service_pb2.ValidateFlowRequest()
        if flow is not None:
            request.flow.CopyFrom(flow)
        response = await stub.ValidateFlow(request, timeout=TIMEOUT)
        assert response.valid is False
        assert [(v.field, v.description) for v in response.violations] == executed


async def test_validate_flow_good_flow(stub, calls: list[str]) -> None:
    response = await stub.ValidateFlow(
        flow_service_pb2.ValidateFlowRequest(flow=chain("count", "noop")), timeout=TIMEOUT
    )
    assert response.valid is True
    assert list(response.violations) == []
    assert calls == []  # validating runs nothing


async def test_a_malformed_reference_points_at_its_param_and_hides_no_other_problem(
    stub,
) -> None:
    # A "${" that could not be read used to be reported on the task's whole `params`, and
    # to end the checks of that task's params: the unknown param beside it, and a second
    # malformed reference, went unreported until the first was fixed.
    flow = chain(
        ("sleep", {"seconds": "${input.x", "secs": 1}),
        ("echo", {"a": [1, {"b": "${}"}], "c": "${input..y}", "ok": "${input.z}"}),
    )
    expected = [
        ("flow.tasks[0].params.seconds", "'${input.x' has a '${' without its closing '}'"),
        ("flow.tasks[0].params.secs", "is not a param of this task (it takes: seconds)"),
        ("flow.tasks[1].params.a[1].b", "'${}' is not a reference like ${input.key}"),
        ("flow.tasks[1].params.c", "'${input..y}' is not a reference like ${input.key}"),
    ]
    executed = await execute_violations(stub, flow)
    assert sorted(executed) == expected  # a Struct's keys come in no set order
    response = await stub.ValidateFlow(
        flow_service_pb2.ValidateFlowRequest(flow=flow), timeout=TIMEOUT
    )
    # The same violations; each request's Struct comes in an order of its own.
    assert sorted((v.field, v.description) for v in response.violations) == expected


async def test_a_nested_reference_is_refused_at_submission(stub) -> None:
    # References do not nest: "${input.${input.key}}" used to be read as a reference to
    # the key "${input" followed by the text "key}}", accepted, and then failed the
    # task at run time with "input has no key '${input'".
    flow = chain(("echo", {"x": "${input.${input.key}}"}))
    (violation,) = await execute_violations(stub, flow)
    assert violation == (
        "flow.tasks[0].params.x",
        "'${input.${input.key}' holds a '${': references do not nest",
    )


def test_references_under_a_long_key_cost_no_copy_of_it_each(registry) -> None:
    # Each value below a key had its path written out when its params were compiled, and
    # each reference kept its own: a 200 KB key over a list of 20,000 references, a
    # 480 KB request, made 4 GB of paths and held the event loop for 12 s (a 2.4 MB one
    # took the server down). A path is now written only for a violation, its keys cut.
    import tracemalloc

    from flowsvc.engine import FlowEngine
    from flowsvc.models import Flow, Task
    from flowsvc.references import MAX_ECHO
    from flowsvc.validation import Limits

    key, n = "k" * 50_000, 1000
    refs = ["${input.a}"] * n + ["${ghost.data}"] * n
    flow = Flow("f", "echo", (Task("echo", params={key: refs}),), ())
    engine = FlowEngine(registry, Limits())
    tracemalloc.start()
    try:
        found = engine.validate(flow)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024  # was over 100 MB: a copy of the key for each reference
    assert len(found) == n
    shown = f"flow.tasks[0].params.{key[:MAX_ECHO]}...[{n}]"
    assert found[0].field == shown
    assert "'${ghost.data}' refers to 'ghost'" in found[0].description


# --- 16: oversized requests -----------------------------------------------------------------


def oversized_flow() -> flow_pb2.Flow:
    flow = chain("count", "noop")
    flow.tasks[0].description = "x" * (200 * 1024)
    assert flow.ByteSize() > MAX_MESSAGE_BYTES
    return flow


async def test_request_over_the_receive_limit_is_resource_exhausted(stub, calls: list[str]) -> None:
    err = await execute_error(stub, oversized_flow())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert calls == []


async def test_stream_request_over_the_receive_limit_is_resource_exhausted(
    stub, calls: list[str]
) -> None:
    err, received = await stream_error(stub, oversized_flow())
    assert received == []
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert calls == []


# --- 17: bytes that are not a request -------------------------------------------------------

GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12", b"\x0a\x04\x0a\x02\xff\xfe"]
GARBAGE_IDS = ["ff", "truncated-flow", "truncated-input", "bad-utf8-name"]


def _identity(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize("garbage", GARBAGE, ids=GARBAGE_IDS)
@pytest.mark.parametrize(
    ("method", "request_cls"),
    [
        ("ExecuteFlow", flow_service_pb2.ExecuteFlowRequest),
        ("ValidateFlow", flow_service_pb2.ValidateFlowRequest),
    ],
)
async def test_unparsable_unary_request_is_invalid_argument(
    channel, calls: list[str], method: str, request_cls, garbage: bytes
) -> None:
    with pytest.raises(pb_message.DecodeError):
        request_cls.FromString(garbage)
    call = channel.unary_unary(
        f"/flowmanager.v1.FlowService/{method}",
        request_serializer=_identity,
        response_deserializer=_identity,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(garbage, timeout=TIMEOUT)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert request_cls.DESCRIPTOR.full_name in err.details()
    assert calls == []


@pytest.mark.parametrize("garbage", GARBAGE, ids=GARBAGE_IDS)
async def test_unparsable_stream_request_is_invalid_argument(
    channel, calls: list[str], garbage: bytes
) -> None:
    with pytest.raises(pb_message.DecodeError):
        flow_service_pb2.StreamFlowRequest.FromString(garbage)
    call = channel.unary_stream(
        "/flowmanager.v1.FlowService/StreamFlow",
        request_serializer=_identity,
        response_deserializer=_identity,
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in call(garbage, timeout=TIMEOUT):
            received.append(message)
    err = info.value
    assert received == []
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "flowmanager.v1.StreamFlowRequest" in err.details()
    assert calls == []


@pytest.mark.parametrize(
    ("path", "kind", "request_name"),
    [
        ("/grpc.health.v1.Health/Check", "unary_unary", "grpc.health.v1.HealthCheckRequest"),
        ("/grpc.health.v1.Health/Watch", "unary_stream", "grpc.health.v1.HealthCheckRequest"),
        (
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "stream_stream",
            "grpc.reflection.v1.ServerReflectionRequest",  # v1's own name, not v1alpha's
        ),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "stream_stream",
            "grpc.reflection.v1alpha.ServerReflectionRequest",
        ),
    ],
)
async def test_unparsable_health_or_reflection_request_is_invalid_argument(
    channel, caplog: pytest.LogCaptureFixture, path: str, kind: str, request_name: str
) -> None:
    """Not UNKNOWN with grpc's "Unexpected <class ...DecodeError>", nor an ERROR line with
    a traceback in the server's log for each such request."""
    caplog.set_level(logging.ERROR)
    garbage = GARBAGE[0]
    call = getattr(channel, kind)(
        path, request_serializer=_identity, response_deserializer=_identity
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if kind == "unary_unary":
            await call(garbage, timeout=TIMEOUT)
        elif kind == "unary_stream":
            async for _ in call(garbage, timeout=TIMEOUT):
                pass
        else:
            async for _ in call(iter([garbage]), timeout=TIMEOUT):
                pass
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert request_name in err.details()
    # v1 is served by v1alpha's classes: protobuf's own error text named v1alpha's type
    # ("... Error parsing message with type 'grpc.reflection.v1alpha...'") after v1's.
    if ".v1." in request_name:
        assert "v1alpha" not in err.details(), err.details()
    assert "class" not in err.details()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- 18: unexpected server errors -----------------------------------------------------------


async def test_unexpected_error_is_internal_with_an_error_id_and_no_internals(
    stub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(flow_id, events, max_bytes=0):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(convert, "execute_response_from_events", explode)
    caplog.set_level(logging.ERROR, logger="flowsvc.servicer")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(
            flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")), timeout=TIMEOUT
        )
    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL, err
    details = err.details()
    assert "error id" in details
    for leak in ("secret", "Traceback", "RuntimeError"):
        assert leak not in details
        assert leak not in str(err)
        for _, value in err.trailing_metadata() or ():
            assert leak not in (
                value.decode(errors="replace") if isinstance(value, bytes) else value
            )
    match = re.search(r"error id ([0-9a-f]+)", details)
    assert match, details
    error_id = match.group(1)
    logged = [
        r
        for r in caplog.records
        if r.name == "flowsvc.servicer" and getattr(r, "error_id", None) == error_id
    ]
    assert len(logged) == 1, [r.__dict__ for r in caplog.records]
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert "secret internal detail" in str(logged[0].exc_info[1])


# --- how deep JSON may nest --------------------------------------------------------------


def nested(levels: int) -> dict:
    """An object `levels` deep: {"a": {"a": ... 1}}."""
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value  # type: ignore[return-value]


async def test_json_as_deep_as_clients_can_read_is_kept_and_read_back(stub, registry) -> None:
    # Every answer below is decoded by this Python client (upb): one level more in any of
    # them, and it refuses the message ("Exceeded upb_DecodeOptions_MaxDepth").
    from flowsvc.validation import MAX_JSON_DEPTH

    deepest = nested(MAX_JSON_DEPTH)
    registry.register("deep_data", lambda ctx: TaskResult.success(deepest))  # reads params
    flow = chain(("deep_data", {"a": nested(MAX_JSON_DEPTH - 1)}))  # params: as deep
    request = flow_service_pb2.ExecuteFlowRequest(flow=flow)
    request.input.update(deepest)
    done = await stub.ExecuteFlow(request, timeout=TIMEOUT)
    assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED, done.message
    assert convert.struct_from_pb(done.execution_history[0].data) == deepest
    got = (
        await stub.GetExecution(
            flow_service_pb2.GetExecutionRequest(flow_id=done.flow_id), timeout=TIMEOUT
        )
    ).execution
    assert convert.struct_from_pb(got.input) == deepest
    assert convert.struct_from_pb(got.flow.tasks[0].params) == deepest
    assert got.execution_history[0].data == done.execution_history[0].data
    listed = await stub.ListExecutions(flow_service_pb2.ListExecutionsRequest(), timeout=TIMEOUT)
    assert [e.flow_id for e in listed.executions] == [done.flow_id]
    watch = flow_service_pb2.WatchExecutionRequest(flow_id=done.flow_id)
    watched = [m async for m in stub.WatchExecution(watch, timeout=TIMEOUT)]
    assert watched[1].task_result.data == done.execution_history[0].data


async def test_input_or_params_nested_too_deep_are_invalid_argument(stub, calls) -> None:
    from flowsvc.validation import MAX_JSON_DEPTH

    request = flow_service_pb2.ExecuteFlowRequest(flow=chain("count"))
    request.input.update(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than {MAX_JSON_DEPTH} levels deep" in one(bad_request(info.value), "input")

    # Params one level deeper do not even decode (a request carries them as deep as
    # GetExecution does): INVALID_ARGUMENT before the server sees them ...
    flow = chain(("count", {"x": nested(MAX_JSON_DEPTH)}))
    err = await execute_error(stub, flow)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid flowmanager.v1.ExecuteFlowRequest" in (err.details() or "")
    assert calls == []


def test_validation_refuses_params_nested_too_deep(registry) -> None:
    # ... and from any other way in (flowsvc run, the engine API) validation refuses them.
    from flowsvc.engine import FlowEngine
    from flowsvc.models import Flow, Task
    from flowsvc.validation import MAX_JSON_DEPTH

    engine = FlowEngine(registry)
    too_deep = Flow("f", "echo", (Task("echo", params={"x": nested(MAX_JSON_DEPTH)}),), ())
    assert [(v.field, v.description) for v in engine.validate(too_deep)] == [
        (
            "flow.tasks[0].params",
            f"nests objects and lists more than {MAX_JSON_DEPTH} levels deep, the most "
            "clients can read",
        )
    ]
    deepest = Flow("f", "echo", (Task("echo", params={"x": nested(MAX_JSON_DEPTH - 1)}),), ())
    assert engine.validate(deepest) == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (nested(33), "more than 32 levels deep"),
        (nested(2000), "more than 32 levels deep"),  # was a RecursionError: INTERNAL
        ({"x": [nested(31)]}, "data.x.0.a"),  # lists count as levels too
        ({"blob": "x" * (1024 * 1024)}, "data holds more than 1,048,576 bytes"),
        ({"a": "é" * 300_000, "b": "é" * 300_000}, "data holds more than 1,048,576 bytes"),
        # Only a string's own bytes could tip the count over: a long key, or many numbers,
        # passed whatever their size (a 5 MB result then reached no client, StreamFlow and
        # WatchExecution included); and keys were counted in characters, not UTF-8.
        ({"k" * (2 * 1024 * 1024): None}, "data holds more than 1,048,576 bytes"),
        ({"n": [1.0] * 200_000}, "data holds more than 1,048,576 bytes"),
        ({"\U0001f680" * 300_000: None}, "data holds more than 1,048,576 bytes"),
        ({"x": float("nan")}, "data.x is nan, not a JSON number"),
        ({"x": [float("inf")]}, "data.x.0 is inf, not a JSON number"),
    ],
    ids=["33", "2000", "list", "1MiB", "1MiB-utf8", "key", "numbers", "utf8-key", "nan", "inf"],
)
async def test_task_data_no_client_could_read_fails_that_task(
    stub, registry, data: dict, problem: str
) -> None:
    registry.register("bad_data", lambda: TaskResult.success(data))
    done = await stub.ExecuteFlow(
        flow_service_pb2.ExecuteFlowRequest(flow=chain("noop", "bad_data")), timeout=TIMEOUT
    )
    assert done.status == flow_pb2.FLOW_STATUS_FAILED, done.message
    failed = done.execution_history[-1]
    assert failed.status == flow_pb2.TASK_STATUS_FAILURE
    assert "task returned data that is not JSON" in failed.error and problem in failed.error
    got = await stub.GetExecution(
        flow_service_pb2.GetExecutionRequest(flow_id=done.flow_id), timeout=TIMEOUT
    )
    assert got.execution.status == flow_pb2.FLOW_STATUS_FAILED


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
async def test_nan_or_infinity_in_input_or_params_is_invalid_argument(
    stub, calls, number: float
) -> None:
    # JSON has no NaN or Infinity (protobuf's JSON refuses them in a Value): they were
    # an INTERNAL error, with a traceback in the log.
    request = flow_service_pb2.ExecuteFlowRequest(flow=chain("count"))
    request.input.update({"ok": 1, "a": {"b": [0, number]}})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert one(bad_request(info.value), "input.a.b[1]") == f"is {number}, not a JSON number"

    flow = chain("count", ("echo", {"x": {"y": number}}))
    assert fields(await execute_violations(stub, flow)) == ["flow.tasks[1].params.x.y"]
    err, received = await stream_error(stub, flow)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and received == []
    checked = await stub.ValidateFlow(
        flow_service_pb2.ValidateFlowRequest(flow=flow), timeout=TIMEOUT
    )
    assert not checked.valid
    assert [(v.field, v.description) for v in checked.violations] == [
        ("flow.tasks[1].params.x.y", f"is {number}, not a JSON number")
    ]
    assert calls == []


def test_a_nan_after_many_values_under_a_long_key_is_found_in_one_pass() -> None:
    # Looking for the NaN wrote out the path of every value passed by, each with the key
    # above it again: a 2 MB key over 400,000 nulls (a 3.6 MB request) held the event
    # loop for 53 s. A path is now written only for the NaN found, its key cut (which
    # the field below shows; no timed assertion: the old code took minutes to fail here).
    from google.protobuf import struct_pb2

    from flowsvc.errors import InvalidArgumentError
    from flowsvc.references import MAX_ECHO

    key = "k" * 2_000_000
    struct = struct_pb2.Struct()
    items = struct.fields[key].list_value.values
    for _ in range(200_000):
        items.add().null_value = struct_pb2.NULL_VALUE
    items.add().number_value = float("nan")
    with pytest.raises(InvalidArgumentError) as info:
        convert.struct_from_pb(struct, "input")
    (violation,) = info.value.violations
    assert violation.field == f"input.{key[:MAX_ECHO]}...[200000]"
    assert violation.description == "is nan, not a JSON number"


@pytest.mark.parametrize(
    "path",
    ["/flowmanager.v1.FlowService/ExecuteFlows", "/flowmanager.v2.FlowService/ExecuteFlow"],
)
async def test_an_unknown_method_is_unimplemented_naming_it(channel, path: str) -> None:
    call = channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"", timeout=TIMEOUT)
    err = info.value
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
    assert path in err.details()
    assert "flowmanager.v1.FlowService" in err.details()


# --- Durations that protobuf calls invalid -------------------------------------------------


@pytest.mark.parametrize(
    ("place", "seconds", "nanos"),
    [
        ("flow.timeout", 1, 2_000_000_000),  # nanos past a second: read as 3 s
        ("flow.tasks[0].timeout", 1, -500_000_000),  # signs differ: read as 0.5 s
        ("flow.tasks[0].retry.initial_backoff", 0, 1_000_000_000),
        ("flow.tasks[0].retry.max_backoff", -1, 1),
    ],
)
async def test_an_invalid_duration_is_refused_not_read_as_another_length(
    stub, calls: list[str], place: str, seconds: int, nanos: int
) -> None:
    # Encoders that check nothing (protobufjs in Node) send what the caller gave, and
    # seconds + nanos would have run the flow with a length nobody wrote, stored as if
    # it had been submitted so.
    flow = chain("count")
    task = flow.tasks[0]
    task.retry.max_attempts = 2
    duration = {
        "flow.timeout": flow.timeout,
        "flow.tasks[0].timeout": task.timeout,
        "flow.tasks[0].retry.initial_backoff": task.retry.initial_backoff,
        "flow.tasks[0].retry.max_backoff": task.retry.max_backoff,
    }[place]
    duration.seconds, duration.nanos = seconds, nanos
    description = one(await execute_violations(stub, flow), place)
    assert "not a valid Duration" in description, description
    validated = await stub.ValidateFlow(
        flow_service_pb2.ValidateFlowRequest(flow=flow), timeout=TIMEOUT
    )
    assert [(v.field, v.description) for v in validated.violations] == [(place, description)]
    assert calls == []


async def test_a_params_check_whose_text_holds_a_lone_surrogate_is_invalid_argument(
    stub, registry
) -> None:
    # A check's problem (or param name) is the task module's text, which may hold what
    # no UTF-8 message can carry: it was UNKNOWN with the server's exception text sent
    # (ExecuteFlow), or INTERNAL (ValidateFlow). Escaped, as a task's error text is.
    def check(params):
        yield "x", "bad \udc80 value"
        yield "\udc81", "no such param"

    def checked(ctx) -> TaskResult:
        return TaskResult.success()

    registry.register("checked", checked, check=check)
    flow = chain(("checked", {"x": 1}))
    expected = [
        ("flow.tasks[0].params.x", "bad \\udc80 value"),
        ("flow.tasks[0].params.\\udc81", "no such param"),
    ]
    assert await execute_violations(stub, flow) == expected
    answer = await stub.ValidateFlow(
        flow_service_pb2.ValidateFlowRequest(flow=flow), timeout=TIMEOUT
    )
    assert [(v.field, v.description) for v in answer.violations] == expected
