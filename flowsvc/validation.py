"""Static checks of a flow, before anything runs.

`validate_flow` returns every violation it finds (not just the first), each with
the path of the field at fault as the client wrote it, e.g.
`flow.conditions[1].target_task_success`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowsvc.errors import Violation
from flowsvc.models import END, NO_RETRY, OUTCOMES, Flow, Task, clean_text
from flowsvc.references import (
    AT_RUN_TIME,
    INPUT,
    MAX_ECHO,
    ReferenceSyntaxError,
    Template,
    clip,
    compile_params,
    where,
)
from flowsvc.registry import TaskRegistry, TaskSpec

logger = logging.getLogger("flowsvc.validation")

#: The largest backoff multiplier a retry policy may use.
MAX_MULTIPLIER = 100.0
#: The most non_retryable_errors a retry policy may list: every failure is searched for
#: each of them, on the event loop.
MAX_NON_RETRYABLE_ERRORS = 100


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a server puts on every flow."""

    #: max_steps used when a flow leaves it at 0.
    default_max_steps: int = 1000
    #: The largest max_steps a flow may ask for.
    max_steps_cap: int = 100_000
    #: The most tasks one flow may declare.
    max_tasks: int = 1000
    #: The longest timeout a task may ask for, in seconds.
    max_task_timeout_s: float = 3600.0
    #: The longest timeout a flow may ask for, in seconds.
    max_flow_timeout_s: float = 86400.0
    #: The most attempts a retry policy may ask for.
    max_attempts: int = 10
    #: The longest backoff a retry policy may ask for, in seconds.
    max_backoff_s: float = 3600.0


#: Longest flow name, in characters. It travels in every ListExecutions entry and every
#: `started` event, which no size limit guards: a page of 1,000 entries stays far under
#: the 4 MiB a client takes by default.
MAX_FLOW_NAME = 256

#: How deep a JSON value (a flow's input, a task's params or data) may nest objects and
#: lists within each other: as deep as every answer that carries it back can be decoded.
#: Protobuf decoders refuse messages nested 100 deep (upb, which Python uses; C++ and
#: Java have the same default), each JSON level costs up to three (map entry, Value,
#: Struct), and GetExecution carries a task's params and data deepest. Measured with
#: Python's decoder: 32 levels are read back, 33 are refused (tests/test_bad_input.py).
MAX_JSON_DEPTH = 32


#: The most a task's result may hold (its data's strings in UTF-8, 8 bytes per other value): one
#: result is one StreamFlow/WatchExecution message, and gRPC clients refuse messages over
#: 4 MiB by default; at 1 MiB a few results still fit in one ExecuteFlow answer.
MAX_RESULT_BYTES = 1024 * 1024


def too_large() -> str:
    return f"holds more than {MAX_RESULT_BYTES:,} bytes, the most one task result may hold"


def nested_too_deep(value: Any, levels: int = MAX_JSON_DEPTH) -> bool:
    """True if `value` nests objects and lists more than `levels` deep (an object of
    scalars is one level). Looks no further than that, so any depth is safe to check."""
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return False
    if levels <= 0:
        return True
    return any(nested_too_deep(item, levels - 1) for item in items)


def too_deep(levels: int = MAX_JSON_DEPTH) -> str:
    return f"nests objects and lists more than {levels} levels deep, the most clients can read"


def _show(value: str) -> str:
    """repr() of a client-supplied value, cut short so that violations stay small."""
    if len(value) > MAX_ECHO:
        return repr(value[:MAX_ECHO]) + f"... ({len(value)} characters)"
    return repr(value)


def _registered_list(registry: TaskRegistry) -> str:
    names = registry.names()
    return ", ".join(names) if names else "(none)"


def validate_flow(
    flow: Flow | None, registry: TaskRegistry, limits: Limits, prefix: str = "flow"
) -> list[Violation]:
    """Every problem that would stop `flow` from running, in field order."""
    if flow is None:
        return [Violation(prefix, "is required: the request has no flow")]
    too_many = count_violations(len(flow.tasks), len(flow.conditions), limits, prefix)
    if too_many:
        return too_many
    out: list[Violation] = []

    def bad(path: str, description: str) -> None:
        out.append(Violation(f"{prefix}{path}", description))

    if not flow.name.strip():
        bad(".name", "must not be empty")
    elif len(flow.name) > MAX_FLOW_NAME:
        bad(".name", f"is {len(flow.name):,} characters; the limit is {MAX_FLOW_NAME}")

    # Fields are reported in the proto's order: name, start_task, tasks, conditions, max_steps.
    declared = {t.name for t in flow.tasks if t.name and t.name != END}
    if not flow.start_task:
        bad(".start_task", "must not be empty")
    elif flow.start_task not in declared:
        bad(".start_task", f"{_show(flow.start_task)} is not one of the flow's tasks")

    if not flow.tasks:
        bad(".tasks", "must declare at least one task")

    graph = _Graph(flow, declared)
    first_index: dict[str, int] = {}
    for i, task in enumerate(flow.tasks):
        _check_policy(f".tasks[{i}]", task, limits, bad)
        _check_params(f".tasks[{i}]", task, registry.get(task.name), graph, bad)
        if not task.name:
            bad(f".tasks[{i}].name", "must not be empty")
            continue
        if task.name == END:
            bad(f".tasks[{i}].name", f"{END!r} is reserved: it is the target that ends a flow")
            continue
        if task.name in first_index:
            bad(
                f".tasks[{i}].name",
                f"duplicate task name {_show(task.name)} (first declared at "
                f"{prefix}.tasks[{first_index[task.name]}])",
            )
            continue
        first_index[task.name] = i
        if task.name not in registry:
            bad(
                f".tasks[{i}].name",
                f"task {_show(task.name)} is not registered on this server; "
                f"registered tasks: {_registered_list(registry)}",
            )

    first_condition: dict[str, int] = {}
    for i, cond in enumerate(flow.conditions):
        path = f".conditions[{i}]"
        if not cond.source_task:
            bad(f"{path}.source_task", "must not be empty")
        elif cond.source_task not in first_index:
            bad(f"{path}.source_task", f"{_show(cond.source_task)} is not one of the flow's tasks")
        elif cond.source_task in first_condition:
            bad(
                f"{path}.source_task",
                f"a second condition for {_show(cond.source_task)} (the first is "
                f"{prefix}.conditions[{first_condition[cond.source_task]}]); "
                "each task has at most one",
            )
        else:
            first_condition[cond.source_task] = i
        if cond.outcome and cond.outcome not in OUTCOMES:
            bad(f"{path}.outcome", f"must be 'success' or 'failure', not {_show(cond.outcome)}")
        for target_field in ("target_task_success", "target_task_failure"):
            target = getattr(cond, target_field)
            if not target:
                bad(f"{path}.{target_field}", f"must not be empty: name a task or {END!r}")
            elif target != END and target not in first_index:
                bad(
                    f"{path}.{target_field}",
                    f"{_show(target)} is neither one of the flow's tasks nor {END!r}",
                )

    if flow.max_steps > limits.max_steps_cap:
        bad(
            ".max_steps",
            f"{flow.max_steps} is over this server's cap of {limits.max_steps_cap}",
        )
    _check_seconds(".timeout", flow.timeout_s, limits.max_flow_timeout_s, bad)
    return out


def count_violations(
    tasks: int, conditions: int, limits: Limits, prefix: str = "flow"
) -> list[Violation]:
    """A violation for more tasks than `limits.max_tasks`, and one for more conditions
    (each task has at most one). A flow over either limit gets only these: nothing else
    in it is checked (nor need it be converted first), for a request of a few MB holds
    hundreds of thousands of tasks or conditions of a few bytes each, and checking each
    held the event loop for seconds (1.9 million empty conditions: 12 s, and 1.6 GB)."""
    out = []
    if tasks > limits.max_tasks:
        out.append(
            Violation(f"{prefix}.tasks", f"declares {tasks} tasks; the limit is {limits.max_tasks}")
        )
    if conditions > limits.max_tasks:
        out.append(
            Violation(
                f"{prefix}.conditions",
                f"declares {conditions} conditions; each task has at most one, and the "
                f"limit is {limits.max_tasks} tasks",
            )
        )
    return out


Bad = Callable[[str, str], None]


def _check_seconds(path: str, value: float | None, cap: float, bad: Bad) -> None:
    if value is None:
        return
    if value <= 0:
        bad(path, f"must be positive, not {_seconds(value)}s")
    elif value > cap:
        bad(path, f"{_seconds(value)}s is over this server's cap of {_seconds(cap)}s")


def _seconds(value: float) -> str:
    """Seconds as they were written ("30", "10000000", "0.5"), never rounded to another
    value: a duration a nanosecond over its cap must not read as the cap itself. Whole
    seconds are shown whole (not "3.15576e+11" nor "315576000001.0"); past 1e15 they
    are shown as a float, every digit of which a double still holds."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.10g}"
    return text if float(text) == value else repr(value)


def _check_policy(path: str, task: Task, limits: Limits, bad: Bad) -> None:
    _check_seconds(f"{path}.timeout", task.timeout_s, limits.max_task_timeout_s, bad)
    retry = task.retry
    if retry.max_attempts < 1:
        bad(f"{path}.retry.max_attempts", "must be at least 1")
    elif retry.max_attempts > limits.max_attempts:
        bad(
            f"{path}.retry.max_attempts",
            f"{retry.max_attempts} is over this server's cap of {limits.max_attempts}",
        )
    for name, seconds, default in (
        ("initial_backoff", retry.initial_backoff_s, NO_RETRY.initial_backoff_s),
        ("max_backoff", retry.max_backoff_s, NO_RETRY.max_backoff_s),
    ):
        # The defaults (1 s, 60 s) are not the flow's asking: over a lower cap they are
        # lowered to it (the engine bounds every backoff by the cap), not refused. The
        # model cannot tell a default from the same value written out: both are lowered.
        if seconds < 0:
            bad(f"{path}.retry.{name}", "must not be negative")
        elif seconds > limits.max_backoff_s and seconds != default:
            bad(
                f"{path}.retry.{name}",
                f"{_seconds(seconds)}s is over this server's cap of "
                f"{_seconds(limits.max_backoff_s)}s",
            )
    if not 1 <= retry.backoff_multiplier <= MAX_MULTIPLIER:
        bad(
            f"{path}.retry.backoff_multiplier",
            f"must be between 1 and {MAX_MULTIPLIER:g}, not {retry.backoff_multiplier:g}",
        )
    markers = len(retry.non_retryable_errors)
    if markers > MAX_NON_RETRYABLE_ERRORS:
        bad(
            f"{path}.retry.non_retryable_errors",
            f"{markers:,} strings: at most {MAX_NON_RETRYABLE_ERRORS}",
        )
        return  # one violation for them all, not one per empty string
    for i, marker in enumerate(retry.non_retryable_errors):
        if not marker:
            bad(
                f"{path}.retry.non_retryable_errors[{i}]",
                "must not be empty: it would be found in every error, and stop every retry",
            )


class _Graph:
    """Which tasks can run before which, from the routing: what each task reaches is
    found when a reference first asks, once. The work grows with the square of the
    tasks (a 650 KB flow of 12,000 held the event loop for a minute): a flow over the
    task limit is refused for that before it is looked at (count_violations)."""

    def __init__(self, flow: Flow, declared: set[str]) -> None:
        self._flow = flow
        self._declared = declared
        self._edges: dict[str, set[str]] | None = None
        self._reach: dict[str, set[str]] = {}

    def _build(self) -> dict[str, set[str]]:
        edges: dict[str, set[str]] = {name: set() for name in self._declared}
        seen: set[str] = set()
        for c in self._flow.conditions:
            if c.source_task in edges and c.source_task not in seen:
                seen.add(c.source_task)
                for target in (c.target_task_success, c.target_task_failure):
                    if target in edges:
                        edges[c.source_task].add(target)
        return edges

    def _reached_from(self, source: str) -> set[str]:
        """The tasks `source` reaches in one step or more."""
        found = self._reach.get(source)
        if found is None:
            if self._edges is None:
                self._edges = self._build()
            edges = self._edges
            found = set()
            todo = list(edges.get(source, ()))
            while todo:
                node = todo.pop()
                if node not in found:
                    found.add(node)
                    todo.extend(edges[node])
            self._reach[source] = found
        return found

    def declares(self, name: str) -> bool:
        return name in self._declared

    def may_run_before(self, earlier: str, later: str) -> bool:
        start = self._flow.start_task
        return (earlier == start or earlier in self._reached_from(start)) and (
            later in self._reached_from(earlier)
        )


def _compile_each(path: str, params: Mapping[str, Any], bad: Bad) -> tuple[Template, set[str]]:
    """The template of `params`, and the names of those with a malformed reference: each
    is reported at its own path, and left out of the template, so that the other params
    are still checked (one bad "${" must not hide the problems beside it)."""
    try:
        return compile_params(params), set()
    except ReferenceSyntaxError:
        pass
    good: dict[str, Any] = {}
    broken: set[str] = set()
    for name, value in params.items():
        try:
            compile_params({name: value})
        except ReferenceSyntaxError as exc:
            bad(f"{path}.params{exc.where}", str(exc))
            broken.add(name)
        else:
            good[name] = value
    return compile_params(good), broken


def _check_params(path: str, task: Task, spec: TaskSpec | None, graph: _Graph, bad: Bad) -> None:
    template, broken = _compile_each(path, task.params, bad)
    for segments, ref in template.refs():
        if ref.root == INPUT:
            continue
        # Written out only for a violation: a path for each reference cost the length
        # of its keys again for every one of them.
        if not graph.declares(ref.root):
            bad(
                f"{path}.params{where(segments)}",
                f"'${{{clip(ref.text)}}}' refers to {_show(ref.root)}, which is neither "
                f"{INPUT!r} nor a task of the flow",
            )
        elif task.name and not graph.may_run_before(ref.root, task.name):
            bad(
                f"{path}.params{where(segments)}",
                f"'${{{clip(ref.text)}}}' refers to {_show(ref.root)}, which cannot have "
                f"run before {_show(task.name)}",
            )
    if nested_too_deep(task.params):
        bad(f"{path}.params", too_deep())
    schema = spec.params_schema if spec is not None else None
    if schema:
        _check_against_schema(f"{path}.params", task.params, template.known(), schema, bad)
    if spec is not None and spec.check is not None:
        given = template.given()
        if broken:  # already reported: the check sees them as it sees any reference
            given = {name: given.get(name, AT_RUN_TIME) for name in task.params}
        _run_check(f"{path}.params", spec, given, bad)


def _run_check(path: str, spec: TaskSpec, given: Mapping[str, Any], bad: Bad) -> None:
    """The task's own check (TaskSpec.check). A check that raises is a defect of the
    task's module, not of the flow: it is logged and the params meet the task at run time."""
    assert spec.check is not None
    try:
        # Escaped as a task's error text is: a lone surrogate would fail the status itself.
        problems = [
            (clean_text(str(name)), clean_text(str(problem))) for name, problem in spec.check(given)
        ]
    except BaseException:
        # Whatever it raises, as a task's own exit(), KeyboardInterrupt or CancelledError
        # (engine._invoke): a plain call that never awaits cannot be cancelled from
        # outside, so each is the check's own. Let through, exit() and KeyboardInterrupt
        # stopped the server, and a CancelledError left the call unanswered.
        logger.exception("params check failed", extra={"task": spec.name})
        return
    for name, problem in problems:
        bad(f"{path}.{name}" if name else path, problem)


def _check_against_schema(
    path: str,
    params: Mapping[str, Any],
    values: Mapping[str, Any],
    schema: Mapping[str, Any],
    bad: Bad,
) -> None:
    """The checks of a JSON Schema that matter before running: names, required, and the
    type and minimum of each of the `values` known before running (Template.known)."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in params:
            bad(f"{path}.{name}", "is required by this task")
    if schema.get("additionalProperties") is False:
        for name in params:
            if name not in properties:
                known = ", ".join(sorted(properties)) or "none"
                bad(f"{path}.{name}", f"is not a param of this task (it takes: {known})")
    for name, value in values.items():
        expected = properties.get(name, {}).get("type")
        if expected is None:
            continue
        allowed = [expected] if isinstance(expected, str) else list(expected)
        if not any(_is_json_type(value, t) for t in allowed):
            bad(f"{path}.{name}", f"must be {' or '.join(allowed)}, not {json_type_name(value)}")
            continue
        minimum = properties[name].get("minimum")
        if minimum is not None and _is_json_type(value, "number") and value < minimum:
            bad(f"{path}.{name}", f"must be at least {minimum:g}, not {value:g}")


def _is_json_type(value: Any, json_type: str) -> bool:
    if json_type == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if json_type == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()  # JSON numbers arrive as floats
        )
    checks = {
        "string": str,
        "boolean": bool,
        "object": Mapping,
        "array": list | tuple,
        "null": type(None),
    }
    expected = checks.get(json_type)
    return expected is None or isinstance(value, expected)


def json_type_name(value: Any) -> str:
    """The JSON type of a value, as a schema names it ("integer" for 3.0, as JSON reads)."""
    for name in ("boolean", "integer", "number", "string", "object", "array", "null"):
        if _is_json_type(value, name):
            return name
    return type(value).__name__
