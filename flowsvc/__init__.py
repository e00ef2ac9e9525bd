"""flowsvc: a flow manager served over gRPC.

The public surface for task authors::

    from flowsvc import register_task, TaskResult

    @register_task("my_new_task")
    def my_new_task() -> TaskResult:
        return TaskResult(status="success", data={"result": "value"})

and for embedding the engine: FlowEngine, TaskRegistry, Flow, Task, Condition.
"""

from flowsvc.engine import FlowEngine, PreparedFlow, StopHandle
from flowsvc.errors import FlowsvcError, FlowValidationError, TaskRegistrationError, Violation
from flowsvc.models import (
    END,
    Condition,
    Execution,
    Flow,
    FlowStatus,
    StepRecord,
    Task,
    TaskContext,
    TaskResult,
    TaskStatus,
)
from flowsvc.references import AT_RUN_TIME
from flowsvc.registry import ParamsCheck, TaskRegistry, register_task
from flowsvc.validation import Limits

__all__ = [
    "AT_RUN_TIME",
    "END",
    "Condition",
    "Execution",
    "Flow",
    "FlowEngine",
    "FlowStatus",
    "FlowValidationError",
    "FlowsvcError",
    "Limits",
    "ParamsCheck",
    "PreparedFlow",
    "StepRecord",
    "StopHandle",
    "Task",
    "TaskContext",
    "TaskRegistrationError",
    "TaskRegistry",
    "TaskResult",
    "TaskStatus",
    "Violation",
    "register_task",
]
