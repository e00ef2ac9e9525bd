"""The engine on its own: routing, loops, failures, task shapes. No gRPC here."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
import uuid

import grpc
import pytest

import flowsvc
from flowsvc import (
    Condition,
    Flow,
    FlowEngine,
    FlowStatus,
    FlowValidationError,
    Limits,
    Task,
    TaskContext,
    TaskRegistrationError,
    TaskRegistry,
    TaskResult,
    TaskStatus,
)
from flowsvc.models import FlowFinished, FlowStarted, TaskCompleted


def linear(*names: str, fail_route: str = "end") -> Flow:
    return Flow(
        name="linear",
        start_task=names[0],
        tasks=tuple(Task(n) for n in names),
        conditions=tuple(Condition(a, b, fail_route) for a, b in itertools.pairwise(names)),
    )


def run(engine: FlowEngine, flow: Flow, flow_input: dict[str, object] | None = None):
    return asyncio.run(engine.run(engine.prepare(flow), flow_input or {}))


def test_seed_readme_task_example_works_with_only_the_import_changed(monkeypatch) -> None:
    # The seed README's "Adding New Tasks" example, import line changed. The default
    # registry is swapped for a fresh one so that no other test sees this task.
    import logging

    from flowsvc import TaskResult, register_task

    default_registry = TaskRegistry()
    monkeypatch.setattr("flowsvc.registry.default_registry", default_registry)

    logger = logging.getLogger(__name__)

    @register_task("my_new_task")
    def my_new_task() -> TaskResult:
        """
        Description of what this task does.
        """
        logger.info("Executing my_new_task...")
        # Your task logic here
        return TaskResult(status="success", data={"result": "value"})

    registry = TaskRegistry()
    registry.merge(default_registry)
    engine = FlowEngine(registry)
    execution = run(engine, linear("my_new_task"))
    assert execution.status is FlowStatus.SUCCEEDED
    assert execution.history[0].data == {"result": "value"}
    assert registry.get("my_new_task").description == "Description of what this task does."


def test_routes_success_and_failure(registry: TaskRegistry) -> None:
    engine = FlowEngine(registry)
    flow = Flow(
        name="branch",
        start_task="fail",
        tasks=(Task("fail"), Task("echo"), Task("noop")),
        conditions=(Condition("fail", target_task_success="noop", target_task_failure="echo"),),
    )
    execution = run(engine, flow)
    assert [r.task for r in execution.history] == ["fail", "echo"]
    # The last task that ran succeeded, so the flow did.
    assert execution.status is FlowStatus.SUCCEEDED


def test_failure_routed_to_end_fails_the_flow_and_says_why(registry: TaskRegistry) -> None:
    flow = Flow(
        name="f",
        start_task="noop",
        tasks=(Task("noop"), Task("fail", params={"message": "card declined"}), Task("echo")),
        conditions=(Condition("noop", "fail", "end"), Condition("fail", "echo", "end")),
    )
    execution = run(FlowEngine(registry), flow)
    assert [r.task for r in execution.history] == ["noop", "fail"]
    assert execution.status is FlowStatus.FAILED
    assert execution.history[1].status is TaskStatus.FAILURE
    assert execution.history[1].error == "card declined"
    assert "card declined" in execution.message


def test_a_task_that_runs_twice_appears_twice(registry: TaskRegistry) -> None:
    counter = {"n": 0}

    def twice() -> TaskResult:
        counter["n"] += 1
        return TaskResult("success" if counter["n"] >= 2 else "failure", {"n": counter["n"]})

    registry.register("twice", twice)
    flow = Flow(
        name="retry loop",
        start_task="twice",
        tasks=(Task("twice"),),
        conditions=(Condition("twice", "end", "twice"),),
    )
    execution = run(FlowEngine(registry), flow)
    assert [(r.task, r.step, r.data["n"]) for r in execution.history] == [
        ("twice", 1, 1),
        ("twice", 2, 2),
    ]
    assert execution.status is FlowStatus.SUCCEEDED


def test_endless_loop_stops_at_max_steps_and_names_the_limit(registry: TaskRegistry) -> None:
    flow = Flow(
        name="forever",
        start_task="noop",
        tasks=(Task("noop"),),
        conditions=(Condition("noop", "noop", "noop"),),
        max_steps=25,
    )
    execution = run(FlowEngine(registry), flow)
    assert len(execution.history) == 25
    assert execution.status is FlowStatus.FAILED
    assert execution.message == (
        "Flow stopped: it reached its max_steps limit of 25 before running 'noop' again"
    )


def test_max_steps_before_a_task_that_never_ran_does_not_say_again(registry) -> None:
    flow = Flow("once", "noop", (Task("noop"), Task("echo")), (Condition("noop", "echo", "end"),))
    execution = run(FlowEngine(registry), dataclasses.replace(flow, max_steps=1))
    assert execution.message == (
        "Flow stopped: it reached its max_steps limit of 1 before running 'echo'"
    )


def test_server_default_max_steps_applies_when_flow_leaves_it_zero(registry) -> None:
    engine = FlowEngine(registry, Limits(default_max_steps=7))
    flow = Flow("f", "noop", (Task("noop"),), (Condition("noop", "noop", "end"),))
    execution = run(engine, flow)
    assert len(execution.history) == 7
    assert "7" in execution.message


def test_raising_task_is_a_failure_result_not_an_error(registry: TaskRegistry) -> None:
    def boom() -> TaskResult:
        raise ConnectionError("upstream refused")

    registry.register("boom", boom)
    execution = run(FlowEngine(registry), linear("boom", "noop"))
    assert execution.status is FlowStatus.FAILED
    assert execution.history[0].error == "ConnectionError: upstream refused"
    assert [r.task for r in execution.history] == ["boom"]


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (SystemExit(3), "SystemExit: 3"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),  # no text: no dangling ": "
        (asyncio.CancelledError("my own"), "CancelledError: my own"),
    ],
)
def test_a_task_raising_what_ends_programs_fails_alone(
    registry: TaskRegistry, is_async: bool, raised: BaseException, expected: str
) -> None:
    """exit(), KeyboardInterrupt and a CancelledError of the task's own are its failure:
    they must not end the server, nor leave the execution cut off as if it were stopped."""

    def boom() -> TaskResult:
        raise raised

    async def boom_async() -> TaskResult:
        raise raised

    registry.register("boom", boom_async if is_async else boom)
    execution = run(FlowEngine(registry), linear("boom", "noop", fail_route="noop"))
    assert execution.history[0].error == expected
    assert [r.task for r in execution.history] == ["boom", "noop"]
    assert execution.status is FlowStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ({"status": "success"}, "not a TaskResult"),
        (None, "not a TaskResult"),
        (TaskResult("success", {"when": object()}), "not JSON"),
        (TaskResult("success", [1, 2]), "not a mapping"),  # type: ignore[arg-type]
    ],
)
def test_bad_return_value_is_a_failure(registry: TaskRegistry, returned, expected) -> None:
    registry.register("bad", lambda: returned)
    execution = run(FlowEngine(registry), linear("bad"))
    assert execution.status is FlowStatus.FAILED
    assert expected in execution.history[0].error


def test_data_that_cannot_be_read_is_the_tasks_failure(registry: TaskRegistry) -> None:
    """A mapping that raises as it is read (here: a shelf closed before the engine reads
    it) fails the task; it used to escape the engine and end the call INTERNAL."""
    import shelve
    import tempfile

    def hands_back_a_closed_shelf() -> TaskResult:
        with tempfile.TemporaryDirectory() as tmp, shelve.open(f"{tmp}/s") as shelf:
            shelf["a"] = 1
        return TaskResult(status="success", data=shelf)

    registry.register("closed", hands_back_a_closed_shelf)
    execution = run(FlowEngine(registry), linear("closed", "noop", fail_route="noop"))
    error = execution.history[0].error
    assert error.startswith("task returned data that cannot be read: ValueError"), error
    assert [r.task for r in execution.history] == ["closed", "noop"]


def test_an_error_that_is_not_text_is_kept_as_its_text(registry: TaskRegistry) -> None:
    registry.register("number", lambda: TaskResult(status="failure", error=123))  # type: ignore[arg-type]
    registry.register("exc", lambda: TaskResult.failure(TimeoutError("upstream slow")))  # type: ignore[arg-type]
    for name, expected in (("number", "123"), ("exc", "upstream slow")):
        execution = run(FlowEngine(registry), linear(name))
        assert execution.status is FlowStatus.FAILED
        assert execution.history[0].error == expected


def test_bad_status_string_is_a_failure(registry: TaskRegistry) -> None:
    registry.register("typo", lambda: TaskResult(status="succes"))
    execution = run(FlowEngine(registry), linear("typo"))
    assert execution.status is FlowStatus.FAILED
    assert "'success' or 'failure'" in execution.history[0].error


def test_context_task_sees_flow_id_input_params_and_results(registry: TaskRegistry) -> None:
    seen: list[TaskContext] = []

    async def inspect_ctx(ctx: TaskContext) -> TaskResult:
        seen.append(ctx)
        return TaskResult.success({"customer": ctx.input["customer_id"]})

    registry.register("inspect", inspect_ctx)
    flow = Flow(
        name="ctx",
        start_task="echo",
        tasks=(Task("echo", params={"a": 1}), Task("inspect", params={"b": "two"})),
        conditions=(Condition("echo", "inspect", "end"),),
    )
    engine = FlowEngine(registry)
    execution = asyncio.run(engine.run(engine.prepare(flow), {"customer_id": "c-1"}, "fixed-id"))
    ctx = seen[0]
    assert ctx.flow_id == "fixed-id" == execution.flow_id
    assert ctx.params == {"b": "two"}
    assert ctx.input == {"customer_id": "c-1"}
    assert [r.task for r in ctx.results] == ["echo"]
    assert ctx.results[0].data == {"params": {"a": 1}, "input": {"customer_id": "c-1"}}
    assert execution.history[1].data == {"customer": "c-1"}


def test_sync_task_runs_in_a_worker_thread(registry: TaskRegistry) -> None:
    threads: list[str] = []

    def where() -> TaskResult:
        threads.append(threading.current_thread().name)
        return TaskResult.success()

    registry.register("where", where)
    run(FlowEngine(registry), linear("where"))
    assert threads and threads[0] != threading.main_thread().name


def test_sync_sleep_does_not_block_the_event_loop(registry: TaskRegistry) -> None:
    release = threading.Event()

    def blocking() -> TaskResult:
        release.wait(timeout=10)
        return TaskResult.success()

    registry.register("blocking", blocking)
    engine = FlowEngine(registry)

    async def main() -> float:
        flow_task = asyncio.create_task(engine.run(engine.prepare(linear("blocking")), {}))
        # While the sync task blocks its thread, the loop still runs other work at once.
        t0 = time.perf_counter()
        await asyncio.sleep(0)
        latency = time.perf_counter() - t0
        release.set()
        execution = await flow_task
        assert execution.status is FlowStatus.SUCCEEDED
        return latency

    assert asyncio.run(main()) < 1.0


def test_events_order_and_single_code_path(registry: TaskRegistry) -> None:
    engine = FlowEngine(registry)
    plan = engine.prepare(linear("noop", "echo"))

    async def collect() -> list[object]:
        return [ev async for ev in engine.events(plan, {})]

    events = asyncio.run(collect())
    assert isinstance(events[0], FlowStarted)
    assert [type(e) for e in events[1:-1]] == [TaskCompleted, TaskCompleted]
    assert isinstance(events[-1], FlowFinished)
    assert events[-1].status is FlowStatus.SUCCEEDED and events[-1].steps == 2


def test_cancelling_the_consumer_cancels_the_running_async_task(registry) -> None:
    started, cancelled = asyncio.Event(), []

    async def long(ctx: TaskContext) -> TaskResult:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.task)
            raise
        return TaskResult.success()

    ran_after: list[str] = []
    registry.register("long", long)
    registry.register("after", lambda: ran_after.append("x") or TaskResult.success())
    engine = FlowEngine(registry)

    async def main() -> None:
        task = asyncio.create_task(engine.run(engine.prepare(linear("long", "after")), {}))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cancelled == ["long"]
    assert ran_after == []


def test_prepare_rejects_bad_flows_with_all_violations(registry: TaskRegistry) -> None:
    engine = FlowEngine(registry)
    with pytest.raises(FlowValidationError) as info:
        engine.prepare(Flow(name="", start_task="x", tasks=(Task("nope"),)))
    fields = [v.field for v in info.value.violations]
    assert fields == ["flow.name", "flow.start_task", "flow.tasks[0].name"]


def test_registry_refuses_clashes_naming_both_sources() -> None:
    registry = TaskRegistry()

    def one() -> TaskResult:
        return TaskResult.success()

    def two() -> TaskResult:
        return TaskResult.success()

    registry.register("same", one)
    registry.register("same", one)  # the same function again is harmless
    with pytest.raises(TaskRegistrationError, match=r"one.*two"):
        registry.register("same", two)


def test_a_task_taking_no_params_refuses_those_a_flow_gives_it(registry) -> None:
    # Neither a context nor keyword-only params: a flow's params could never reach it.
    def plain(x: int = 1) -> TaskResult:
        return TaskResult.success({"x": x})

    registry.register("plain", plain)
    engine = FlowEngine(registry)
    with pytest.raises(FlowValidationError) as info:
        engine.prepare(Flow("p", "plain", (Task("plain", params={"x": 5}),)))
    assert [(v.field, v.description) for v in info.value.violations] == [
        ("flow.tasks[0].params.x", "is not a param of this task (it takes: none)")
    ]
    engine.prepare(Flow("p", "plain", (Task("plain"),)))


async def test_one_annotation_that_cannot_be_resolved_does_not_hide_the_others(
    stub, registry
) -> None:
    # A name imported only under TYPE_CHECKING (with `from __future__ import annotations`)
    # made every annotation of the task unreadable: `n: int` got 3.0, "abc" was taken
    # for it, and ListTasks showed no type at all.
    from flowmanager.v1 import flow_service_pb2

    from tests.support import chain, to_dict

    def typed(*, n: int, label: str = "x", price: object = None) -> TaskResult:
        return TaskResult.success({"n": type(n).__name__})

    typed.__annotations__["price"] = "NotImportedAtRunTime | None"
    registry.register("typed", typed)
    tasks = await stub.ListTasks(flow_service_pb2.ListTasksRequest(), timeout=10)
    (listed,) = [task for task in tasks.tasks if task.name == "typed"]
    properties = to_dict(listed.params_schema)["properties"]
    assert (properties["n"]["type"], properties["label"]["type"]) == ("integer", "string")
    assert "type" not in properties["price"]
    request = flow_service_pb2.ExecuteFlowRequest(flow=chain(("typed", {"n": 3})))
    response = await stub.ExecuteFlow(request, timeout=10)
    assert dict(response.execution_history[0].data) == {"n": "int"}, response.message
    request = flow_service_pb2.ExecuteFlowRequest(flow=chain(("typed", {"n": "abc"})))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "flow.tasks[0].params.n: must be integer, not string" in info.value.details()


def test_a_param_annotated_int_gets_an_int(registry) -> None:
    # JSON numbers arrive as floats: 7 in the flow, 7.0 in Python, without this.
    seen: list[tuple[object, ...]] = []

    def counted(
        ctx: TaskContext, *, n: int, maybe: int | None = None, ratio: float = 0.0
    ) -> TaskResult:
        seen.append((n, maybe, ratio, ctx.params["n"]))
        return TaskResult.success()

    registry.register("counted", counted)
    engine = FlowEngine(registry)
    params = {"n": 7.0, "maybe": "${input.m}", "ratio": 2.0}
    run(engine, Flow("c", "counted", (Task("counted", params=params),)), {"m": 3.0})
    assert seen == [(7, 3, 2.0, 7.0)]
    assert [type(v) for v in seen[0]] == [int, int, float, float]


def test_a_task_s_own_check_refuses_params_before_the_flow_runs(registry, caplog) -> None:
    seen: list[dict[str, object]] = []

    def check(params):
        seen.append(dict(params))
        if params.get("low", 0) > params.get("high", 0):
            yield "low", "must not be over high"
        if "a" in params and "b" in params:
            yield "", "give a or b, not both"

    def ranged(*, low: int = 0, high: int = 0, a: str = "", b: str = "") -> TaskResult:
        return TaskResult.success({"low": low})

    registry.register("ranged", ranged, check=check)
    engine = FlowEngine(registry)

    def prepare(**params: object):
        return engine.prepare(Flow("r", "ranged", (Task("ranged", params=params),)))

    with pytest.raises(FlowValidationError) as info:
        prepare(low=5, high=1, a="x", b="y")
    assert [(v.field, v.description) for v in info.value.violations] == [
        ("flow.tasks[0].params.low", "must not be over high"),
        ("flow.tasks[0].params", "give a or b, not both"),
    ]
    # A param holding a reference is known only when the task runs.
    prepare(low="${input.low}", high=1, a="$${x}")
    assert seen[-1] == {"low": flowsvc.AT_RUN_TIME, "high": 1, "a": "${x}"}

    def broken(params):
        raise RuntimeError("the check's own defect")

    registry.register("lenient", ranged, check=broken)
    engine.prepare(Flow("l", "lenient", (Task("lenient", params={"low": 5}),)))
    assert "params check failed" in caplog.text and "the check's own defect" in caplog.text
    with pytest.raises(TaskRegistrationError, match="not callable"):
        registry.register("odd", ranged, check="yes")

    # An async check is never awaited: it would be logged as failed, and skipped, for
    # every flow. Refused when it is registered, as a generator task is.
    async def awaits(params):
        return []

    async def streams(params):
        yield "low", "never seen"

    for check in (awaits, streams):
        with pytest.raises(TaskRegistrationError, match="is async: a check is a plain def"):
            registry.register("odd", ranged, check=check)


@pytest.mark.parametrize("name", ["end", "input", "a.b", "x}", "a${b", " padded"])
def test_registry_refuses_names_no_flow_could_use(name: str) -> None:
    # "end" routes to the end, "input" is the input's reference root, "." or "}" cut
    # a reference to the task short, and "${" would nest one (refused): registered, they
    # would only fail later.
    with pytest.raises(TaskRegistrationError, match="no flow could use it"):
        TaskRegistry().register(name, TaskResult.success)


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        (["a"], "is a list, not an object"),
        ({"properties": ["a"]}, "properties is a list, not an object"),
        ({"properties": {"a": "integer"}}, "properties.a is a str, not an object"),
        ({"properties": {"a": {"type": 5}}}, "properties.a.type is 5"),
        ({"properties": {"a": {"type": "int"}}}, "properties.a.type is 'int'"),
        ({"properties": {"a": {"type": ["integer", "nul"]}}}, "properties.a.type is ['integer"),
        ({"properties": {"a": {"type": {"anyOf": ["string"]}}}}, "properties.a.type is {'anyOf"),
        ({"properties": {"a": {"type": ["string", ["null"]]}}}, "properties.a.type is ['string"),
        ({"properties": {"a": {"minimum": "3"}}}, "properties.a.minimum is '3', not a number"),
        ({"required": "ab"}, "required is 'ab', not a list of param names"),
        ({"required": ["a", 1]}, "required is ['a', 1], not a list of param names"),
    ],
)
def test_a_declared_params_schema_flowsvc_cannot_read_is_refused_when_registered(
    schema: object, problem: str
) -> None:
    # Accepted, such a schema made every flow using the task INTERNAL (a list as
    # properties, a string as a property, a type that is not a name), or ListTasks
    # INTERNAL for every client (a list as the schema); a type name flowsvc does not
    # know ("int") checked nothing, and a string as `required` required each letter.
    def declared(ctx: TaskContext) -> TaskResult:
        return TaskResult.success()

    with pytest.raises(TaskRegistrationError, match="its params schema") as info:
        TaskRegistry().register("declared", declared, params=schema)  # type: ignore[arg-type]
    assert problem in str(info.value)


def test_registry_refuses_tasks_with_two_required_arguments() -> None:
    with pytest.raises(TaskRegistrationError, match="no argument or one"):
        TaskRegistry().register("bad", lambda a, b: None)


def test_registry_refuses_generator_functions() -> None:
    # Called, a generator function returns a generator, never a TaskResult: registered,
    # every run of it would fail ("task returned async_generator").
    async def streams(ctx: TaskContext):
        yield TaskResult.success()

    def yields():
        yield TaskResult.success()

    for fn in (streams, yields):
        with pytest.raises(TaskRegistrationError, match="generator function"):
            TaskRegistry().register("gen", fn)


def test_routing_cost_is_flat_structure(registry: TaskRegistry) -> None:
    # Routing is a table built once: a 10,000-step loop runs every step.
    engine = FlowEngine(registry, Limits(max_steps_cap=20_000))
    flow = Flow("loop", "noop", (Task("noop"),), (Condition("noop", "noop", "end"),), 10_000)
    execution = run(engine, flow)
    assert len(execution.history) == 10_000
    assert execution.history[-1].step == 10_000


def test_context_results_is_a_stable_view_of_earlier_runs(registry: TaskRegistry) -> None:
    seen: list[TaskContext] = []

    def look(ctx: TaskContext) -> TaskResult:
        seen.append(ctx)
        return TaskResult.success({"step": ctx.step})

    registry.register("look", look)
    flow = Flow("f", "look", (Task("look"),), (Condition("look", "look", "end"),), max_steps=4)
    run(FlowEngine(registry), flow)
    # Each context still shows exactly the runs before it, though the history grew later.
    assert [len(ctx.results) for ctx in seen] == [0, 1, 2, 3]
    last = seen[-1].results
    assert [r.data["step"] for r in last] == [1, 2, 3]
    assert last[-1].step == 3 and [r.step for r in last[1:]] == [2, 3]
    with pytest.raises(IndexError):
        last[3]


def _stoppable(registry: TaskRegistry):
    state = {"started": asyncio.Event(), "cancelled": [], "after": []}

    async def long(ctx: TaskContext) -> TaskResult:
        state["started"].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"].append(ctx.step)
            raise
        return TaskResult.success()

    registry.register("long", long)
    registry.register("after", lambda: state["after"].append(1) or TaskResult.success())
    return state


def test_stop_cancels_the_running_task_and_ends_cancelled(registry: TaskRegistry) -> None:
    from flowsvc import StopHandle

    state = _stoppable(registry)
    engine = FlowEngine(registry)
    stop = StopHandle()

    async def main():
        flow_task = asyncio.create_task(
            engine.run(engine.prepare(linear("noop", "long", "after")), {}, stop=stop)
        )
        await state["started"].wait()
        stop.request("operator said so")
        return await flow_task  # returns normally: the stop is not an exception

    execution = asyncio.run(main())
    assert execution.status is FlowStatus.CANCELLED
    assert "operator said so" in execution.message and "'long'" in execution.message
    assert [r.task for r in execution.history] == ["noop"]  # the interrupted run is not recorded
    assert state["cancelled"] == [2]
    assert state["after"] == []


def test_finished_steps_counts_the_recorded_runs_when_a_run_is_cut_short(
    registry: TaskRegistry,
) -> None:
    """`steps` is how many task runs the history holds: the run a stop cut short is not
    one of them (it is not recorded), so the count matches the task_result events."""
    from flowsvc import StopHandle

    state = _stoppable(registry)
    engine = FlowEngine(registry)
    stop = StopHandle()

    async def main():
        events = []

        async def consume() -> None:
            plan = engine.prepare(linear("noop", "long", "after"))
            async for event in engine.events(plan, {}, stop=stop):
                events.append(event)

        consumer = asyncio.create_task(consume())
        await state["started"].wait()
        stop.request("enough")
        await consumer
        return events

    events = asyncio.run(main())
    results = [e for e in events if isinstance(e, TaskCompleted)]
    assert events[-1].status is FlowStatus.CANCELLED
    assert events[-1].steps == len(results) == 1


def test_stop_between_tasks_starts_no_further_task(registry: TaskRegistry) -> None:
    from flowsvc import StopHandle

    stop = StopHandle()

    async def stopper() -> TaskResult:
        # Runs to completion: request() only cancels a task that is still awaited.
        stop.request("enough")
        return TaskResult.success()

    registry.register("stopper", stopper)
    engine = FlowEngine(registry)
    execution = asyncio.run(engine.run(engine.prepare(linear("stopper", "noop")), {}, stop=stop))
    assert execution.status is FlowStatus.CANCELLED
    assert [r.task for r in execution.history] == ["stopper"]
    assert "before step 2" in execution.message


def test_stop_while_an_attempt_is_handed_on_skips_the_backoff_wait(
    registry: TaskRegistry,
) -> None:
    """A stop that comes while the engine waits at a yield (its consumer storing the
    failed attempt, or a task stopping its own flow) ends the flow at once: the wait
    before the next attempt is cut short as a stop during it is, not slept through."""
    from flowsvc import StopHandle
    from flowsvc.models import Execution, RetryPolicy

    stop = StopHandle()

    async def stopper() -> TaskResult:
        stop.request("enough")  # runs to completion: nothing is cancelled
        return TaskResult.failure("failed after stopping its flow")

    registry.register("stopper", stopper)
    engine = FlowEngine(registry)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=30)
    flow = Flow("t", "stopper", (Task("stopper", retry=policy),))

    async def main() -> Execution:
        return await asyncio.wait_for(engine.run(engine.prepare(flow), {}, stop=stop), 10)

    t0 = time.monotonic()
    execution = asyncio.run(main())
    assert time.monotonic() - t0 < 5  # not the 30 s backoff
    assert execution.status is FlowStatus.CANCELLED
    assert "enough" in execution.message
    assert [r.attempt for r in execution.history] == [1]


def test_outside_cancel_still_propagates_after_a_stop_request(registry: TaskRegistry) -> None:
    from flowsvc import StopHandle

    state = _stoppable(registry)
    engine = FlowEngine(registry)
    stop = StopHandle()

    async def main() -> None:
        flow_task = asyncio.create_task(
            engine.run(engine.prepare(linear("long", "after")), {}, stop=stop)
        )
        await state["started"].wait()
        flow_task.cancel()  # the client went away ...
        stop.request("and an operator stopped it too")
        with pytest.raises(asyncio.CancelledError):
            await flow_task

    asyncio.run(main())
    assert state["after"] == []


def test_params_are_read_only_so_executions_cannot_leak_into_each_other(registry) -> None:
    def meddle(ctx: TaskContext) -> TaskResult:
        try:
            ctx.params["x"] = "changed"  # type: ignore[index]
        except TypeError:
            return TaskResult.success({"seen": ctx.params["x"], "params": ctx.params})
        return TaskResult.failure("params were writable")

    registry.register("meddle", meddle)
    engine = FlowEngine(registry)
    plan = engine.prepare(Flow("f", "meddle", (Task("meddle", params={"x": "original"}),)))
    for _ in range(2):  # one prepared flow, two executions
        execution = asyncio.run(engine.run(plan, {}))
        assert execution.status is FlowStatus.SUCCEEDED, execution.history[0].error
        assert execution.history[0].data["seen"] == "original"


async def test_read_only_params_returned_as_data_are_stored(stub, registry) -> None:
    from flowmanager.v1 import flow_service_pb2

    from tests.support import chain

    registry.register("give_back", lambda ctx: TaskResult.success({"params": ctx.params}))
    request = flow_service_pb2.ExecuteFlowRequest(flow=chain(("give_back", {"k": "v"})))
    response = await stub.ExecuteFlow(request, timeout=10)
    got = await stub.GetExecution(flow_service_pb2.GetExecutionRequest(flow_id=response.flow_id))
    assert got.execution.execution_history[0] == response.execution_history[0]


async def test_params_are_read_only_whether_or_not_they_hold_a_reference(stub, registry) -> None:
    # ctx.params refused changes when its params were literal, and was a plain dict when
    # one held a reference: the same task worked in one flow and failed in another.
    from flowmanager.v1 import flow_service_pb2

    from tests.support import chain

    def meddle(ctx: TaskContext) -> TaskResult:
        try:
            ctx.params["x"] = "changed"  # type: ignore[index]
        except TypeError:
            return TaskResult.success({"refused": True, "seen": ctx.params["x"]})
        return TaskResult.success({"refused": False, "seen": ctx.params["x"]})

    registry.register("meddle", meddle)
    for params in ({"x": "original"}, {"x": "${input.x}"}, {"x": "${input.x}", "o": {}}):
        request = flow_service_pb2.ExecuteFlowRequest(flow=chain(("meddle", params)))
        request.input.update({"x": "original"})
        response = await stub.ExecuteFlow(request, timeout=10)
        data = dict(response.execution_history[0].data)
        assert data == {"refused": True, "seen": "original"}, params


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


class _Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_a_task_whose_exception_or_return_value_cannot_be_shown_fails_alone(
    stub, registry
) -> None:
    from flowmanager.v1 import flow_pb2, flow_service_pb2

    from tests.support import chain

    def unprintable() -> TaskResult:
        raise _Unprintable()

    registry.register("unprintable", unprintable)
    registry.register("unrepresentable", _Unrepresentable)  # a class: its instance
    for name, expected in (
        ("unprintable", "_Unprintable"),
        ("unrepresentable", "not a TaskResult"),
    ):
        request = flow_service_pb2.ExecuteFlowRequest(flow=chain(name))
        response = await stub.ExecuteFlow(request, timeout=10)  # OK: not INTERNAL
        assert response.status == flow_pb2.FLOW_STATUS_FAILED
        assert expected in response.execution_history[0].error
        get = flow_service_pb2.GetExecutionRequest(flow_id=response.flow_id)
        got = await stub.GetExecution(get)
        assert got.execution.status == flow_pb2.FLOW_STATUS_FAILED


async def test_an_integer_no_json_number_can_hold_fails_the_task(stub, registry) -> None:
    from flowmanager.v1 import flow_pb2, flow_service_pb2

    from tests.support import chain

    registry.register("huge_int", lambda: TaskResult.success({"n": 10**400}))
    request = flow_service_pb2.ExecuteFlowRequest(flow=chain("huge_int"))
    response = await stub.ExecuteFlow(request, timeout=10)
    assert response.status == flow_pb2.FLOW_STATUS_FAILED
    assert "data.n is an integer too large" in response.execution_history[0].error
    get = flow_service_pb2.GetExecutionRequest(flow_id=response.flow_id)
    got = await stub.GetExecution(get)  # readable, not INTERNAL
    assert got.execution.execution_history == response.execution_history


async def test_a_huge_error_text_is_cut_so_every_message_stays_readable(stub, registry) -> None:
    from flowmanager.v1 import flow_pb2, flow_service_pb2

    from tests.support import chain

    attempts: list[int] = []

    def loud() -> TaskResult:
        attempts.append(1)
        raise ValueError("x" * 5_000_000 + " card declined")  # a whole response body

    registry.register("loud", loud)
    flow = chain("loud")
    flow.tasks[0].retry.max_attempts = 3
    flow.tasks[0].retry.non_retryable_errors.append("card declined")  # past the cut
    request = flow_service_pb2.ExecuteFlowRequest(flow=flow)
    # StreamFlow with the client's default 4 MiB limit: every message is readable.
    messages = [m async for m in stub.StreamFlow(request, timeout=10)]
    assert messages[-1].finished.status == flow_pb2.FLOW_STATUS_FAILED
    assert len(attempts) == 1  # the marker was found in the whole text
    error = messages[1].task_result.error
    assert error.startswith("ValueError: xxx") and "cut" in error and len(error) < 100_000
    flow_id = messages[0].started.flow_id
    got = await stub.GetExecution(flow_service_pb2.GetExecutionRequest(flow_id=flow_id))
    assert got.execution.execution_history[0].error == error


async def test_a_task_changing_a_param_s_inner_object_changes_no_other_run(stub, registry) -> None:
    from flowmanager.v1 import flow_service_pb2

    from tests.support import chain, to_dict

    def add_header(*, headers: dict[str, str]) -> TaskResult:
        seen = dict(headers)
        headers["Authorization"] = "customer-1's token"  # its own argument: a normal thing
        return TaskResult.success({"seen": seen})

    registry.register("add_header", add_header)
    registry.register("make", lambda: TaskResult.success({"x": {"v": 1}}))
    flow = chain(("add_header", {"headers": {"Accept": "json"}}))
    for _ in range(2):  # the same flow twice: one prepared (cached) flow
        request = flow_service_pb2.ExecuteFlowRequest(flow=flow)
        response = await stub.ExecuteFlow(request, timeout=10)
        assert to_dict(response)["execution_history"][0]["data"] == {"seen": {"Accept": "json"}}
    # A referenced object: changing it does not rewrite the result it came from.
    request = flow_service_pb2.ExecuteFlowRequest(
        flow=chain("make", ("add_header", {"headers": "${make.data.x}"}))
    )
    response = await stub.ExecuteFlow(request, timeout=10)
    assert to_dict(response)["execution_history"][0]["data"] == {"x": {"v": 1}}
    got = await stub.GetExecution(flow_service_pb2.GetExecutionRequest(flow_id=response.flow_id))
    assert to_dict(got.execution)["execution_history"][0]["data"] == {"x": {"v": 1}}


async def test_list_tasks_survives_a_task_whose_schema_is_not_json(stub, registry) -> None:
    from flowmanager.v1 import flow_service_pb2

    def huge_default(*, n: int = 10**400, f: float = float("inf"), s: str = "x") -> TaskResult:
        return TaskResult.success()

    registry.register("huge_default", huge_default)  # defaults no JSON can say: left out
    with pytest.raises(TaskRegistrationError, match=r"params schema.*set"):
        registry.register("set_schema", noop_task, params={"type": "object", "enum": {"a"}})
    listed = await stub.ListTasks(flow_service_pb2.ListTasksRequest(), timeout=10)
    (info,) = [t for t in listed.tasks if t.name == "huge_default"]
    properties = info.params_schema["properties"]
    assert "default" not in properties["n"] and "default" not in properties["f"]
    assert properties["s"]["default"] == "x"


async def test_list_tasks_survives_a_task_module_text_with_a_lone_surrogate(stub, registry) -> None:
    # No protobuf message can carry a lone surrogate: registered, such a name, schema or
    # docstring made every ListTasks call INTERNAL for as long as the server ran.
    from flowmanager.v1 import flow_service_pb2

    def odd(*, s: str = "bad \udc80 default") -> TaskResult:
        return TaskResult.success()

    # Set, not written as a docstring: Python 3.13's compiler refuses a lone surrogate in a
    # docstring, and so the whole module, while a module can still set __doc__ at run time.
    odd.__doc__ = "A docstring with a lone surrogate \ud800 in it."
    registry.register("odd", odd)  # a default no message can carry: left out
    with pytest.raises(TaskRegistrationError, match="no flow could use it"):
        registry.register("bad\ud800name", noop_task)
    with pytest.raises(TaskRegistrationError, match=r"params schema is not JSON"):
        registry.register("odd_schema", noop_task, params={"properties": {"k\udc80": {}}})
    with pytest.raises(TaskRegistrationError, match=r"params schema is not JSON"):
        registry.register("odd_value", noop_task, params={"description": "v\udc80"})
    listed = await stub.ListTasks(flow_service_pb2.ListTasksRequest(), timeout=10)
    (info,) = [t for t in listed.tasks if t.name == "odd"]
    assert info.description == "A docstring with a lone surrogate \\ud800 in it."
    assert "default" not in info.params_schema["properties"]["s"]
    assert {"bad\ud800name", "odd_schema", "odd_value"}.isdisjoint(registry.names())


def noop_task(ctx: TaskContext) -> TaskResult:
    return TaskResult.success()


def _first_match() -> TaskResult:
    row = next(r for r in [] if r)  # none: StopIteration, a common slip in a sync task
    return TaskResult.success({"row": row})


def _closes() -> TaskResult:
    raise GeneratorExit


async def test_a_sync_task_raising_stopiteration_or_generatorexit_fails_and_the_flow_ends(
    stub, registry
) -> None:
    from flowmanager.v1 import flow_pb2, flow_service_pb2

    from tests.support import chain

    for name, fn, expected in (
        ("first_match", _first_match, "StopIteration"),
        ("closes", _closes, "GeneratorExit"),
    ):
        registry.register(name, fn)
        request = flow_service_pb2.ExecuteFlowRequest(flow=chain(name, "noop"))
        response = await stub.ExecuteFlow(request, timeout=10)  # neither hangs nor INTERNAL
        assert response.status == flow_pb2.FLOW_STATUS_FAILED, name
        assert expected in response.execution_history[0].error, name


class _TasksOwnBaseException(BaseException):
    """A task's own exception outside Exception (as some libraries define them)."""


async def _async_closes() -> TaskResult:
    raise GeneratorExit


async def _async_own_base() -> TaskResult:
    raise _TasksOwnBaseException("mine")


def _sync_own_base() -> TaskResult:
    raise _TasksOwnBaseException("mine")


def _sync_returns_closing_coroutine():  # a plain function handing back a coroutine
    return _async_closes()


async def test_a_task_raising_any_baseexception_fails_and_frees_its_slot(
    settings, registry
) -> None:
    """GeneratorExit from an async task, or a BaseException subclass of the task's own,
    is the task's failure (retryable, as any raise): the flow ends FAILED, its in-flight
    slot is free again (a cap of 1 admits the next flow), and the server goes on."""
    from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc

    from flowsvc.server import build_server
    from tests.support import chain

    tasks = {
        "async_closes": (_async_closes, "GeneratorExit"),
        "async_own_base": (_async_own_base, "_TasksOwnBaseException: mine"),
        "sync_own_base": (_sync_own_base, "_TasksOwnBaseException: mine"),
        "sync_closing_coroutine": (_sync_returns_closing_coroutine, "GeneratorExit"),
    }
    for name, (fn, _) in tasks.items():
        registry.register(name, fn)
    server = await build_server(dataclasses.replace(settings, max_in_flight=1), registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            for name, (_, expected) in tasks.items():
                request = flow_service_pb2.ExecuteFlowRequest(flow=chain(name, "noop"))
                response = await stub.ExecuteFlow(request, timeout=10)  # no hang, no INTERNAL
                assert response.status == flow_pb2.FLOW_STATUS_FAILED, name
                assert [r.task for r in response.execution_history] == [name]
                assert expected in response.execution_history[0].error, name
                got = await stub.GetExecution(
                    flow_service_pb2.GetExecutionRequest(flow_id=response.flow_id), timeout=10
                )
                assert got.execution.status == flow_pb2.FLOW_STATUS_FAILED, name
            ok = await stub.ExecuteFlow(
                flow_service_pb2.ExecuteFlowRequest(flow=chain("noop")), timeout=10
            )
            assert ok.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    finally:
        await server.shutdown(grace=0)


def _produce() -> TaskResult:
    return TaskResult.success({"items": [1], "who": "produce"})


def _meddle(ctx: TaskContext) -> TaskResult:
    """Tries to change what it was given; data: which tries were refused."""
    import copy
    import json

    tries = {
        "result": lambda: ctx.results[0].data.__setitem__("who", "meddle"),
        "result_list": lambda: ctx.results[0].data["items"].append(99),
        "result_by_slice": lambda: ctx.results[:1][0].data.pop("who"),
        "input": lambda: ctx.input.__setitem__("injected", True),
        "input_nested": lambda: ctx.input["nested"].update(k="changed"),
        "input_list": lambda: ctx.input["list"].extend([2, 3]),
    }
    refused = {}
    for name, attempt in tries.items():
        try:
            attempt()
            refused[name] = False
        except TypeError:
            refused[name] = True
    mine = copy.deepcopy(ctx.input)  # a copy is the task's own, to change at will
    mine["nested"]["k"] = "in my copy"
    return TaskResult.success(
        {"refused": refused, "as_json": json.loads(json.dumps(ctx.input)), "copy": mine}
    )


def _look(ctx: TaskContext) -> TaskResult:
    return TaskResult.success({"input": dict(ctx.input), "first": dict(ctx.results[0].data)})


async def test_a_task_cannot_change_the_input_or_earlier_results_it_is_given(
    stub, registry
) -> None:
    """ctx.input and ctx.results are read-only: a task that writes into them is refused
    (TypeError), and neither the answer, the store nor a later task sees a change."""
    from flowmanager.v1 import flow_service_pb2

    from tests.support import chain, to_dict

    registry.register("produce", _produce)
    registry.register("meddle", _meddle)
    registry.register("look", _look)
    flow_input = {"nested": {"k": "orig"}, "list": [1.0]}
    request = flow_service_pb2.ExecuteFlowRequest(flow=chain("produce", "meddle", "look"))
    request.input.update(flow_input)
    response = await stub.ExecuteFlow(request, timeout=10)
    got = await stub.GetExecution(
        flow_service_pb2.GetExecutionRequest(flow_id=response.flow_id), timeout=10
    )
    for history in (response.execution_history, got.execution.execution_history):
        produce, meddle, look = (to_dict(r).get("data") for r in history)
        assert produce == {"items": [1.0], "who": "produce"}
        assert all(meddle["refused"].values()), meddle["refused"]
        assert meddle["as_json"] == flow_input
        assert meddle["copy"] == {**flow_input, "nested": {"k": "in my copy"}}
        assert look == {"input": flow_input, "first": produce}
    assert to_dict(got.execution)["input"] == flow_input


def test_an_execution_run_without_an_id_gets_a_version_7_one(registry: TaskRegistry) -> None:
    # `flowsvc run` runs the engine without a manager: its id is made as the server's are
    # (it was a version 4 UUID there, version 7 everywhere else).
    execution = run(FlowEngine(registry), linear("echo"))
    assert uuid.UUID(execution.flow_id).version == 7
