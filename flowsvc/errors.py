"""The exception tree of flowsvc.

    FlowsvcError                     base of every error raised on purpose
    ├── FlowValidationError          a flow (or request) is malformed; carries field violations
    ├── TaskRegistrationError        a task cannot be registered (name clash, bad signature)
    └── TaskModuleError              a --task-modules module could not be imported

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


class FlowValidationError(FlowsvcError):
    """The flow or the request is invalid; nothing was run."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        first = self.violations[0] if self.violations else None
        summary = f"{first.field}: {first.description}" if first else "invalid request"
        more = len(self.violations) - 1
        if more > 0:
            summary += f" (and {more} more violation{'s' if more > 1 else ''})"
        super().__init__(summary)


class TaskRegistrationError(FlowsvcError):
    """A task could not be registered."""


class TaskModuleError(FlowsvcError):
    """A task module named in the configuration could not be imported."""
