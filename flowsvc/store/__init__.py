"""Execution stores: one Protocol, and SQLite (file or `:memory:`) behind it.

A store keeps every execution (its flow, input, request_id, status, times) and every
event of it, numbered 1, 2, ... per execution. Callers rely on one promise: when
`append` returns, the event is committed, so it may be sent to clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from flowsvc.models import Event, Flow, FlowFinished, FlowStatus


@dataclass(frozen=True, slots=True)
class NewExecution:
    """What create() records."""

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
class StoredEvent:
    sequence: int
    event: Event


class ExecutionStore(Protocol):
    """Where executions live. Every method may raise StoreUnavailableError."""

    async def open(self) -> None:
        """Create or migrate the schema."""

    async def close(self) -> None: ...

    async def create(self, new: NewExecution) -> tuple[ExecutionRecord, bool]:
        """Record a new RUNNING execution, or, when `new.request_id` is already taken,
        return that execution and False (the caller compares request hashes)."""

    async def append(self, flow_id: str, sequence: int, event: Event) -> None:
        """Commit one event; a FlowFinished also sets the execution's final status."""

    def append_nowait(self, flow_id: str, sequence: int, event: Event) -> asyncio.Future[None]:
        """Queue one event for commit; the future is done once it is committed (in the
        order events were queued) or has failed with StoreUnavailableError."""

    async def get(self, flow_id: str) -> ExecutionRecord | None: ...

    async def get_by_request_id(self, request_id: str) -> ExecutionRecord | None: ...

    async def events(self, flow_id: str, after: int = 0) -> list[StoredEvent]:
        """The execution's events with a sequence above `after`, in order."""

    async def page(
        self,
        limit: int,
        before_cursor: int | None,
        status: FlowStatus | None,
        flow_name: str | None,
    ) -> list[ExecutionRecord]:
        """Up to `limit` executions, newest first, created before `before_cursor`."""

    async def finish_running(
        self,
        make_final: Callable[[ExecutionRecord], FlowFinished],
        only: Collection[str] | None = None,
    ) -> list[str]:
        """Close every execution still RUNNING (or those of `only` that are) with the
        FlowFinished `make_final(record)` returns, numbered after the last committed
        event (crash recovery). Returns their ids."""

    async def delete_finished_before(self, cutoff: datetime) -> int:
        """Delete executions that ended before `cutoff`; returns how many."""

    async def check_writable(self) -> None:
        """Raise StoreUnavailableError unless a write can be committed now."""

    async def secret(self) -> bytes:
        """A random key kept with the data (signs page tokens across restarts)."""


__all__ = [
    "ExecutionRecord",
    "ExecutionStore",
    "FlowFinished",
    "NewExecution",
    "StoredEvent",
]
