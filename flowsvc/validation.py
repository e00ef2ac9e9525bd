"""Static checks of a flow, before anything runs.

`validate_flow` returns every violation it finds (not just the first), each with
the path of the field at fault as the client wrote it, e.g.
`flow.conditions[1].target_task_success`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowsvc.errors import Violation
from flowsvc.models import END, OUTCOMES, Flow
from flowsvc.registry import TaskRegistry


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a server puts on every flow."""

    #: max_steps used when a flow leaves it at 0.
    default_max_steps: int = 1000
    #: The largest max_steps a flow may ask for.
    max_steps_cap: int = 100_000
    #: The most tasks one flow may declare.
    max_tasks: int = 1000


#: Longest echo of a client's value in a violation (violations travel in trailers).
MAX_ECHO = 64


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
    out: list[Violation] = []

    def bad(path: str, description: str) -> None:
        out.append(Violation(f"{prefix}{path}", description))

    if not flow.name.strip():
        bad(".name", "must not be empty")

    # Fields are reported in the proto's order: name, start_task, tasks, conditions, max_steps.
    declared = {t.name for t in flow.tasks if t.name and t.name != END}
    if not flow.start_task:
        bad(".start_task", "must not be empty")
    elif flow.start_task not in declared:
        bad(".start_task", f"{_show(flow.start_task)} is not one of the flow's tasks")

    if not flow.tasks:
        bad(".tasks", "must declare at least one task")
    elif len(flow.tasks) > limits.max_tasks:
        bad(".tasks", f"declares {len(flow.tasks)} tasks; the limit is {limits.max_tasks}")

    first_index: dict[str, int] = {}
    for i, task in enumerate(flow.tasks):
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
    return out
