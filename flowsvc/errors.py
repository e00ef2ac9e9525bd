"""The exception tree of flowsvc.

    FlowsvcError                      base of every error raised on purpose
    ├── InvalidArgumentError          a request field is malformed; carries field violations
    │   └── FlowValidationError       ... the flow itself is (nothing was run)
    ├── NotFoundError                 no execution (health: no service) has that id
    ├── FailedPreconditionError       the execution is not in a state that allows this
    ├── StillStoppingError            a cancel was asked for, but the execution has not stopped
    ├── AlreadyExistsError            a request_id was used for another flow or input
    ├── TooManyExecutionsError        the in-flight cap is reached; carries retry_after
    ├── ShuttingDownError             the server takes no new executions
    ├── StoreUnavailableError         the execution store cannot read or write
    ├── ResponseTooLargeError         an answer is larger than the server may send
    ├── UnknownMethodError            no service of the server has the method called
    ├── TaskRegistrationError         a task cannot be registered (name clash, bad signature)
    └── TaskModuleError               a --task-modules module could not be imported

A task that fails is data (a TaskResult with status FAILURE), never one of these.
The servicer maps these to gRPC status codes in a single table.

Each error also names its situation for clients: `reason`, a stable UPPER_SNAKE_CASE
identifier (a class default; given where raised when one class covers situations a client
tells apart, such as the FAILED_PRECONDITION of a cancel and of a retry), and `metadata`,
the ids that go with it under lowerCamelCase keys (flowId, requestId ...). The servicer
sends them as a google.rpc.ErrorInfo beside the status; nothing here knows of gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    """One problem in a request: the path of the field and what is wrong."""

    field: str
    description: str


class FlowsvcError(Exception):
    """Base class of flowsvc's own errors.

    `reason` (a class default, or the `reason` given where it is raised) and `metadata`
    (its values made strings) are what a client branches on: see the module docstring."""

    #: The situation, for clients; "" only on classes that never reach one.
    reason: str = ""

    def __init__(
        self, *args: object, reason: str = "", metadata: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(*args)
        if reason:
            self.reason = reason
        self.metadata: dict[str, str] = {key: str(value) for key, value in (metadata or {}).items()}


class InvalidArgumentError(FlowsvcError):
    """A request field is invalid; nothing was done."""

    #: What was invalid, for the status message.
    subject = "invalid request"
    reason = "ARGUMENT_INVALID"

    def __init__(
        self,
        violations: Sequence[Violation],
        *,
        reason: str = "",
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        self.violations = tuple(violations)
        first = self.violations[0] if self.violations else None
        summary = f"{first.field}: {first.description}" if first else self.subject
        more = len(self.violations) - 1
        if more > 0:
            summary += f" (and {more} more violation{'s' if more > 1 else ''})"
        # The first field, and how many there are (the BadRequest detail may list fewer).
        found = {"field": first.field} if first else {}
        found["violationCount"] = str(len(self.violations))
        super().__init__(summary, reason=reason, metadata={**found, **(metadata or {})})

    @classmethod
    def one(
        cls,
        field: str,
        description: str,
        *,
        reason: str = "",
        metadata: Mapping[str, object] | None = None,
    ) -> InvalidArgumentError:
        return cls([Violation(field, description)], reason=reason, metadata=metadata)


class FlowValidationError(InvalidArgumentError):
    """The flow is invalid; nothing was run."""

    subject = "invalid flow"
    reason = "FLOW_INVALID"


class NotFoundError(FlowsvcError):
    """No execution has the given id."""

    reason = "EXECUTION_NOT_FOUND"


class FailedPreconditionError(FlowsvcError):
    """The execution's state does not allow the operation (e.g. cancelling a finished one):
    raised with the reason of the situation, each of which a client handles its own way."""

    reason = "EXECUTION_ENDED"


class StillStoppingError(FlowsvcError):
    """A cancel is requested, but the execution's running task has not stopped within the
    server's wait: the execution ends CANCELLED once that task returns."""

    reason = "EXECUTION_STILL_STOPPING"


class AlreadyExistsError(FlowsvcError):
    """The request_id belongs to an execution of another flow or input."""

    reason = "REQUEST_ID_REUSED"


class TooManyExecutionsError(FlowsvcError):
    """The server runs as many executions as it may; retry after `retry_after` seconds."""

    reason = "MAX_IN_FLIGHT_EXCEEDED"

    def __init__(
        self, message: str, retry_after: float, metadata: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after


class ShuttingDownError(FlowsvcError):
    """The server is shutting down and takes no new executions."""

    reason = "SERVER_SHUTTING_DOWN"


class ResponseTooLargeError(FlowsvcError):
    """An execution's answer is larger than the server may send in one message."""

    reason = "RESPONSE_TOO_LARGE"


class StoreUnavailableError(FlowsvcError):
    """The execution store cannot be read or written (disk full, database locked ...)."""

    reason = "STORE_UNAVAILABLE"


class UnknownMethodError(FlowsvcError):
    """A call to a method that no service of the server has (a typo, a newer .proto)."""

    reason = "METHOD_NOT_FOUND"


class TaskRegistrationError(FlowsvcError):
    """A task could not be registered."""

    # Raised while the server starts: never sent to a client, so no reason.


class TaskModuleError(FlowsvcError):
    """A task module named in the configuration could not be imported."""

    # Raised while the server starts: never sent to a client, so no reason.
