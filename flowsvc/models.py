"""Plain models of the engine: flows, tasks, conditions, results and events.

Frozen dataclasses, named tuples and enums only; nothing here knows about gRPC or
protobuf. The records an execution makes at every step (StepRecord and the three
events) are named tuples: as immutable as a frozen dataclass, and built four times
faster (a frozen dataclass sets each field through object.__setattr__), which is a
measurable part of a step's cost in a server.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, overload

#: The routing target that ends a flow. The one place the word lives.
END = "end"

JSON = dict[str, Any]


class TaskStatus(enum.Enum):
    """Outcome of one task run. Values are the prototype's words."""

    SUCCESS = "success"
    FAILURE = "failure"


class FlowStatus(enum.Enum):
    """State of a whole execution."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    TIMED_OUT = "timed_out"

    @property
    def is_final(self) -> bool:
        return self is not FlowStatus.RUNNING


#: The words a condition's `outcome` may hold.
OUTCOMES = frozenset(status.value for status in TaskStatus)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and how long apart, a failed task is tried again."""

    max_attempts: int = 1
    initial_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    max_backoff_s: float = 60.0
    #: Failures whose error text contains one of these are not retried.
    non_retryable_errors: tuple[str, ...] = ()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        try:
            delay: float = self.initial_backoff_s * self.backoff_multiplier ** (attempt - 1)
        except OverflowError:  # a long run of attempts: far past any max_backoff
            return self.max_backoff_s
        return min(delay, self.max_backoff_s)


#: One attempt, no retry.
NO_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Task:
    """One step of a flow: a registered task name and its params."""

    name: str
    description: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds one attempt may run (None: no limit but the server's cap).
    timeout_s: float | None = None
    retry: RetryPolicy = NO_RETRY


@dataclass(frozen=True, slots=True)
class Condition:
    """Routes the result of `source_task` to the next task (or END)."""

    source_task: str
    target_task_success: str
    target_task_failure: str
    name: str = ""
    description: str = ""
    outcome: str = ""


@dataclass(frozen=True, slots=True)
class Flow:
    """A flow definition as the client sent it (not yet validated)."""

    name: str
    start_task: str
    tasks: tuple[Task, ...] = ()
    conditions: tuple[Condition, ...] = ()
    max_steps: int = 0  # 0: the server default
    #: Seconds the whole flow may run (None: no limit but the server's cap).
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What a task returns.

    `status` accepts the prototype's strings ("success" / "failure") as well as
    TaskStatus, so `TaskResult(status="success", data={...})` works unchanged.
    """

    status: TaskStatus | str
    data: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: False: a failure that retrying cannot fix (the retry policy is not applied).
    retryable: bool = True
    #: Seconds the failed call asked to be left alone (an HTTP Retry-After): the wait
    #: before the next attempt is at least this, within the server's backoff cap.
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.status, TaskStatus):
            try:
                status = TaskStatus(self.status)
            except ValueError:
                raise ValueError(
                    f"TaskResult.status must be 'success' or 'failure', not {self.status!r}"
                ) from None
            object.__setattr__(self, "status", status)
        if self.data is None:
            object.__setattr__(self, "data", {})
        if self.error is not None and not isinstance(self.error, str):
            object.__setattr__(self, "error", str(self.error))  # error=exc: its text
        if self.retry_after_s is not None:
            _check_retry_after(self.retry_after_s)

    @property
    def succeeded(self) -> bool:
        return self.status is TaskStatus.SUCCESS

    @classmethod
    def success(cls, data: Mapping[str, Any] | None = None) -> TaskResult:
        return _built(cls, TaskStatus.SUCCESS, dict(data) if data else {}, None, True)

    @classmethod
    def failure(
        cls,
        error: str,
        data: Mapping[str, Any] | None = None,
        *,
        retryable: bool = True,
        retry_after_s: float | None = None,
    ) -> TaskResult:
        text = error if isinstance(error, str) else str(error)  # error=exc: its text
        if retry_after_s is not None:
            _check_retry_after(retry_after_s)
        return _built(
            cls, TaskStatus.FAILURE, dict(data) if data else {}, text, retryable, retry_after_s
        )


def _check_retry_after(value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value < float("inf")
    ):
        raise ValueError(
            f"TaskResult.retry_after_s must be a finite number of seconds >= 0, not {value!r}"
        )


# What success() and failure() build with: their fields need no normalising, so they
# skip the frozen dataclass's __init__ (object.__setattr__ per field, and __post_init__)
# and set the slots directly, three times faster: most tasks return through them.
_SET_STATUS, _SET_DATA, _SET_ERROR, _SET_RETRYABLE, _SET_RETRY_AFTER = (
    vars(TaskResult)[name].__set__
    for name in ("status", "data", "error", "retryable", "retry_after_s")
)


def _built(
    cls: type[TaskResult],
    status: TaskStatus,
    data: Mapping[str, Any],
    error: str | None,
    retryable: bool,
    retry_after_s: float | None = None,
) -> TaskResult:
    result = object.__new__(cls)
    _SET_STATUS(result, status)
    _SET_DATA(result, data)
    _SET_ERROR(result, error)
    _SET_RETRYABLE(result, retryable)
    _SET_RETRY_AFTER(result, retry_after_s)
    return result


class StepRecord(NamedTuple):
    """One task run as recorded in an execution's history."""

    step: int  # 1-based position in the execution
    task: str
    status: TaskStatus
    data: Mapping[str, Any]
    error: str | None
    started_at: datetime
    duration_s: float
    attempt: int = 1  # 1, 2, ... when the task is retried


_READ_ONLY = (
    "a task's ctx.input and ctx.results are read-only: copy what you would change (copy.deepcopy)"
)


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes: what a task is given of the input and of earlier
    results. Still a dict (json.dumps, isinstance), and its copies (dict(), .copy(),
    copy.deepcopy) are plain dicts, the task's own; only copy.deepcopy copies what is
    inside too (dict() and .copy() keep the same read-only objects and lists)."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_READ_ONLY)

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> Any:  # copy, deepcopy, pickle: a plain dict
        return dict, (dict(self),)


class FrozenList(list[Any]):
    """A list that refuses changes (see FrozenDict); `+`, slices and copies are lists."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_READ_ONLY)

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = clear = extend = insert = pop = remove = reverse = sort = _refuse

    def __reduce__(self) -> Any:
        return list, (list(self),)


_SCALARS = frozenset((str, float, int, bool, type(None)))


def frozen_json(value: Any) -> Any:
    """A JSON value with every object and list in it a new FrozenDict or FrozenList."""
    if type(value) in _SCALARS:  # most values: no ABC check to pay for
        return value
    if isinstance(value, Mapping):
        return FrozenDict({k: frozen_json(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return FrozenList([frozen_json(v) for v in value])
    return value


class HistoryView(Sequence[StepRecord]):
    """The first `length` records of a growing history list, without copying them.

    Built once per step in O(1), so a long loop does not pay for its own history. A
    record read from it has read-only data (frozen_json): that data is the execution's
    own, which the answer and the store show. Only a task that reads its history pays
    for that copy, when it reads.
    """

    __slots__ = ("_length", "_records")

    def __init__(self, records: list[StepRecord], length: int) -> None:
        self._records = records
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> StepRecord: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[StepRecord]: ...
    def __getitem__(self, index: int | slice) -> StepRecord | Sequence[StepRecord]:
        if isinstance(index, slice):
            return [_read_only(r) for r in self._records[: self._length][index]]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("history index out of range")
        return _read_only(self._records[index])

    def __repr__(self) -> str:
        return f"HistoryView({list(self)!r})"


def _read_only(record: StepRecord) -> StepRecord:
    return record._replace(data=frozen_json(record.data))


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a one-argument task receives. `input` and the data in `results` refuse
    changes (TypeError): they are the execution's own, which the answer, the store and
    later tasks read."""

    flow_id: str
    flow_name: str
    task: str
    step: int
    input: Mapping[str, Any]
    params: Mapping[str, Any]
    #: The runs before this one, oldest first (a read-only view: no copy per step; each
    #: record read has read-only data).
    results: Sequence[StepRecord]
    #: 1 for the first attempt of this step, then 2, 3 ... as its retry policy retries it
    #: (what makes a retry's request to an outside system tell itself apart, or not).
    attempt: int = 1


class FlowStarted(NamedTuple):
    """Event: the execution began; sent before the first task runs."""

    flow_id: str
    flow_name: str
    started_at: datetime


class TaskCompleted(NamedTuple):
    """Event: a task run finished (successfully or not)."""

    flow_id: str
    record: StepRecord


class FlowFinished(NamedTuple):
    """Event: the execution ended; always the last event."""

    flow_id: str
    status: FlowStatus
    message: str
    finished_at: datetime
    steps: int


Event = FlowStarted | TaskCompleted | FlowFinished


@dataclass(frozen=True, slots=True)
class Execution:
    """A finished execution: what ExecuteFlow returns."""

    flow_id: str
    flow_name: str
    status: FlowStatus
    message: str
    history: tuple[StepRecord, ...]
    started_at: datetime
    finished_at: datetime


def new_flow_id() -> str:
    """A version 7 UUID (RFC 9562) in its canonical text form: the time in milliseconds,
    then 74 random bits. Ids made later sort later, so each new execution's rows go at the
    end of the store's indexes instead of at random places in them: a batch of commits
    then writes a few pages, not two per execution (+27 % ExecuteFlow throughput on
    SQLite). Built as text, without a UUID object."""
    ms = f"{time.time_ns() // 1_000_000:012x}"
    r = os.urandom(10).hex()
    return f"{ms[:8]}-{ms[8:]}-7{r[:3]}-{_VARIANT[int(r[3], 16) & 3]}{r[4:7]}-{r[7:19]}"


_VARIANT = "89ab"  # the RFC 4122 variant: the top two bits of the 17th digit are 10


def has_lone_surrogate(text: str) -> bool:
    """True for a str that cannot be encoded as UTF-8 (it holds a lone surrogate): no
    store, no protobuf message and no client could take it."""
    if text.isascii():
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def clean_text(text: str) -> str:
    """`text` with any lone surrogate escaped (\\udc80): safe to store and send."""
    if not has_lone_surrogate(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode()
