"""The exception tree of flowsvc.

    FlowsvcError                      base of every error raised on purpose
    ├── InvalidArgumentError          a request field is malformed; carries field violations
    │   └── FlowValidationError       ... the flow itself is (nothing was run)
    ├── NotFoundError                 no execution has that id
    ├── FailedPreconditionError       the execution is not in a state that allows this
    ├── StillStoppingError            a cancel was asked for, but the execution has not stopped
    ├── AlreadyExistsError            a request_id was used for another flow or input
    ├── TooManyExecutionsError        the in-flight cap is reached; carries retry_after
    ├── ShuttingDownError             the server takes no new executions
    ├── StoreUnavailableError         the execution store cannot read or write
    ├── TaskRegistrationError         a task cannot be registered (name clash, bad signature)
    └── TaskModuleError               a --task-modules module could not be imported

A task that fails is data (a TaskResult with status FAILURE), never one of these.
The servicer maps these to gRPC status codes in a single table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    """One problem in a request: the path of the field and what is wrong."""

    field: str
    description: str


class FlowsvcError(Exception):
    """Base class of flowsvc's own errors."""


class InvalidArgumentError(FlowsvcError):
    """A request field is invalid; nothing was done."""

    #: What was invalid, for the status message.
    subject = "invalid request"

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        first = self.violations[0] if self.violations else None
        summary = f"{first.field}: {first.description}" if first else self.subject
        more = len(self.violations) - 1
        if more > 0:
            summary += f" (and {more} more violation{'s' if more > 1 else ''})"
        super().__init__(summary)

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgumentError:
        return cls([Violation(field, description)])


class FlowValidationError(InvalidArgumentError):
    """The flow is invalid; nothing was run."""

    subject = "invalid flow"


class NotFoundError(FlowsvcError):
    """No execution has the given id."""


class FailedPreconditionError(FlowsvcError):
    """The execution's state does not allow the operation (e.g. cancelling a finished one)."""


class StillStoppingError(FlowsvcError):
    """A cancel is requested, but the execution's running task has not stopped within the
    server's wait: the execution ends CANCELLED once that task returns."""


class AlreadyExistsError(FlowsvcError):
    """The request_id belongs to an execution of another flow or input."""


class TooManyExecutionsError(FlowsvcError):
    """The server runs as many executions as it may; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(FlowsvcError):
    """The server is shutting down and takes no new executions."""


class ResponseTooLargeError(FlowsvcError):
    """An execution's answer is larger than the server may send in one message."""


class StoreUnavailableError(FlowsvcError):
    """The execution store cannot be read or written (disk full, database locked ...)."""


class TaskRegistrationError(FlowsvcError):
    """A task could not be registered."""


class TaskModuleError(FlowsvcError):
    """A task module named in the configuration could not be imported."""
