"""Execution stores: one Protocol, and SQLite (file or `:memory:`) behind it.

A store keeps every execution (its flow, input, request_id, status, times) and every
event of it, numbered 1, 2, ... per execution. Callers rely on one promise: an event
is sent to clients only from its `on_commit` callback, so only once it is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from flowsvc.models import Event, Flow, FlowFinished, FlowStarted, FlowStatus


class NewExecution(NamedTuple):
    """What create() records (a named tuple: one is built per execution started)."""

    flow_id: str
    flow: Flow
    flow_json: str  # the flow as the store keeps it (store.codec.flow_to_json, encoded)
    input: Mapping[str, Any]
    request_id: str | None
    request_hash: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """An execution as stored (without its events)."""

    flow_id: str
    flow: Flow
    input: Mapping[str, Any]
    request_id: str | None
    request_hash: str
    status: FlowStatus
    message: str
    created_at: datetime
    finished_at: datetime | None
    last_sequence: int
    cursor: int  # creation order; ListExecutions pages on it


@dataclass(frozen=True, slots=True)
class ExecutionSummary:
    """What ListExecutions shows of an execution: nothing to decode (no flow, no input)."""

    flow_id: str
    flow_name: str
    status: FlowStatus
    request_id: str | None
    created_at: datetime
    finished_at: datetime | None
    cursor: int  # creation order; ListExecutions pages on it


@dataclass(frozen=True, slots=True)
class StoredEvent:
    sequence: int
    event: Event


#: Called once per appended event: (the event, None) when committed, else (it, the error).
OnCommit = Callable[[Event, BaseException | None], None]


class ExecutionStore(Protocol):
    """Where executions live. Every method may raise StoreUnavailableError."""

    #: time.monotonic() when the job the store is running now began, None while idle: a
    #: store whose disk stalls (a frozen file system, a throttled volume) has one job
    #: running for long (see ExecutionManager._watch_store).
    busy_since: float | None

    async def open(self) -> None:
        """Create or migrate the schema."""

    async def close(self) -> None: ...

    def create_nowait(self, new: NewExecution) -> asyncio.Future[ExecutionRecord | None]:
        """Record a new RUNNING execution (the future's result is None) or, when
        `new.request_id` is already taken, return that execution instead (the caller
        compares request hashes). The future may be done already (the in-memory store)."""

    def append_nowait(self, flow_id: str, sequence: int, event: Event, on_commit: OnCommit) -> None:
        """Queue one event for commit; a FlowFinished also sets the execution's final
        status. `on_commit(event, None)` is called on the event loop's thread once it is
        committed, or `on_commit(event, StoreUnavailableError)` once it has failed, in the
        order events were queued; before this returns when the commit is immediate (the
        in-memory store). Once an event of an execution has failed, none of its later
        events is committed."""

    async def get(self, flow_id: str) -> ExecutionRecord | None: ...

    async def get_by_request_id(self, request_id: str) -> ExecutionRecord | None: ...

    async def execution(
        self, flow_id: str, after: int = 0, limit: int | None = None
    ) -> tuple[ExecutionRecord, list[StoredEvent]] | None:
        """The execution and its events with a sequence above `after`, in order, read
        together: the record says RUNNING only if no `finished` event is among them, and
        an execution that retention deletes is read whole or not at all. With `limit`,
        only the first events (at most `limit`, fewer if they are large, at least one);
        `events()` reads the rest, up to the record's last_sequence."""

    async def events(
        self, flow_id: str, after: int, upto: int, limit: int
    ) -> list[StoredEvent] | None:
        """The execution's events with a sequence above `after` and at most `upto`, in
        order: at most `limit` of them, fewer if they are large, at least one if there is
        one. None when the execution is gone (retention deleted it)."""

    async def page(
        self,
        limit: int,
        before_cursor: int | None,
        status: FlowStatus | None,
        flow_name: str | None,
    ) -> list[ExecutionSummary]:
        """Up to `limit` executions, newest first, created before `before_cursor`."""

    async def finish_running(
        self,
        make_final: Callable[[ExecutionRecord], FlowFinished],
        only: Collection[str] | None = None,
    ) -> list[str]:
        """Close every execution still RUNNING (or those of `only` that are) with the
        FlowFinished `make_final(record)` returns, numbered after the last committed
        event (crash recovery). Returns their ids."""

    async def delete_finished_before(self, cutoff: datetime, limit: int | None = None) -> int:
        """Delete executions that ended before `cutoff`, at most `limit` of them (the
        ones that ended first); returns how many."""

    async def forget_request_id(self, flow_id: str) -> None:
        """Free the execution's request_id, for a new execution to take (the execution
        stays, without one)."""

    async def check_writable(self) -> None:
        """Raise StoreUnavailableError unless a write can be committed now."""

    async def secret(self) -> bytes:
        """A random key kept with the data (signs page tokens across restarts)."""


def closing_events(record: ExecutionRecord, final: FlowFinished) -> list[tuple[int, Event]]:
    """The events that close a cut-off execution, numbered after its last committed one:
    `final`, preceded by a `started` when none was committed (a crash or a store failure
    between the commit of its record and that of its first event), since every stream of
    an execution begins with `started`."""
    if record.last_sequence:
        return [(record.last_sequence + 1, final)]
    started = FlowStarted(record.flow_id, record.flow.name, record.created_at)
    return [(1, started), (2, final)]


__all__ = [
    "ExecutionRecord",
    "ExecutionStore",
    "ExecutionSummary",
    "FlowFinished",
    "NewExecution",
    "OnCommit",
    "StoredEvent",
    "closing_events",
]
