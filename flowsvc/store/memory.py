"""The in-memory execution store (`--db :memory:`): for tests and benchmarks.

Same Protocol and behaviour as the SQLite store, with nothing kept across restarts and
no thread: an append is "committed" the moment it is made, and its on_commit callback
is called before append_nowait returns.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime

from flowsvc.errors import StoreUnavailableError
from flowsvc.models import Event, FlowFinished, FlowStatus
from flowsvc.references import json_copy
from flowsvc.store import (
    ExecutionRecord,
    ExecutionSummary,
    NewExecution,
    OnCommit,
    StoredEvent,
    closing_events,
)


@dataclass(slots=True)
class _Entry:
    new: NewExecution
    cursor: int
    status: FlowStatus = FlowStatus.RUNNING
    message: str = ""
    finished_at: datetime | None = None
    events: list[Event] = field(default_factory=list)

    def record(self) -> ExecutionRecord:
        new = self.new
        return ExecutionRecord(
            flow_id=new.flow_id,
            flow=new.flow,
            input=new.input,
            request_id=new.request_id,
            request_hash=new.request_hash,
            status=self.status,
            message=self.message,
            created_at=new.created_at,
            finished_at=self.finished_at,
            last_sequence=len(self.events),
            cursor=self.cursor,
        )


class MemoryStore:
    """ExecutionStore in a dict."""

    def __init__(self) -> None:
        #: Never busy: every call is answered before it returns.
        self.busy_since: float | None = None
        self._entries: dict[str, _Entry] = {}  # in creation order
        # Every cursor and its flow id, in creation order, for ListExecutions to start a
        # page at its token's cursor by bisection: skipping the newer entries one by one
        # made each page cost as much as every page before it (200,000 executions: 40 ms
        # of the event loop for one entry near the end, and paging to the end, 4,000
        # pages of 50, took minutes). Ids that retention deleted stay until a compaction.
        self._cursors: list[int] = []
        self._ids: list[str] = []
        self._deleted = 0  # of the ids in _ids, those no longer in _entries
        self._by_request: dict[str, str] = {}
        self._cursor = 0
        self._secret = os.urandom(32)
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _check(self) -> None:
        if not self._open:
            raise StoreUnavailableError("execution store is closed")

    def create_nowait(self, new: NewExecution) -> asyncio.Future[ExecutionRecord | None]:
        future: asyncio.Future[ExecutionRecord | None]
        future = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._create(new))
        except StoreUnavailableError as exc:
            future.set_exception(exc)
        return future

    def _create(self, new: NewExecution) -> ExecutionRecord | None:
        self._check()
        if new.request_id is not None and new.request_id in self._by_request:
            return self._entries[self._by_request[new.request_id]].record()
        self._cursor += 1
        if new.input:
            # Its own copy, as SQLite keeps its JSON: a task writing into ctx.input (which
            # it should treat as read-only) must not change what GetExecution returns.
            new = new._replace(input=json_copy(new.input))
        entry = _Entry(new, self._cursor)
        self._entries[new.flow_id] = entry
        self._cursors.append(self._cursor)
        self._ids.append(new.flow_id)
        if new.request_id is not None:
            self._by_request[new.request_id] = new.flow_id
        return None

    def _append(self, flow_id: str, sequence: int, event: Event) -> None:
        entry = self._entries[flow_id]
        if sequence != len(entry.events) + 1:
            raise ValueError(f"event {sequence} of {flow_id} is out of order")
        entry.events.append(event)
        if isinstance(event, FlowFinished) and entry.status is FlowStatus.RUNNING:
            entry.status = event.status
            entry.message = event.message
            entry.finished_at = event.finished_at

    def append_nowait(self, flow_id: str, sequence: int, event: Event, on_commit: OnCommit) -> None:
        if not self._open:
            on_commit(event, StoreUnavailableError("execution store is closed"))
            return
        self._append(flow_id, sequence, event)
        on_commit(event, None)

    async def get(self, flow_id: str) -> ExecutionRecord | None:
        self._check()
        entry = self._entries.get(flow_id)
        return entry.record() if entry else None

    async def get_by_request_id(self, request_id: str) -> ExecutionRecord | None:
        self._check()
        flow_id = self._by_request.get(request_id)
        return self._entries[flow_id].record() if flow_id else None

    async def execution(
        self, flow_id: str, after: int = 0, limit: int | None = None
    ) -> tuple[ExecutionRecord, list[StoredEvent]] | None:
        self._check()
        entry = self._entries.get(flow_id)
        if entry is None:
            return None
        upto = len(entry.events) if limit is None else after + limit
        return entry.record(), self._slice(entry, after, upto)

    async def events(
        self, flow_id: str, after: int, upto: int, limit: int
    ) -> list[StoredEvent] | None:
        self._check()
        entry = self._entries.get(flow_id)
        return None if entry is None else self._slice(entry, after, min(upto, after + limit))

    @staticmethod
    def _slice(entry: _Entry, after: int, upto: int) -> list[StoredEvent]:
        """Events after `after` up to `upto` (sequences), without a scan of those before."""
        start = max(after, 0)
        return [StoredEvent(start + i + 1, e) for i, e in enumerate(entry.events[start:upto])]

    async def page(
        self,
        limit: int,
        before_cursor: int | None,
        status: FlowStatus | None,
        flow_name: str | None,
    ) -> list[ExecutionSummary]:
        self._check()
        out: list[ExecutionSummary] = []
        ids, entries = self._ids, self._entries
        end = (
            len(ids) if before_cursor is None else bisect.bisect_left(self._cursors, before_cursor)
        )
        for i in range(end - 1, -1, -1):  # newest first
            entry = entries.get(ids[i])
            if entry is None:  # deleted by retention
                continue
            if status is not None and entry.status is not status:
                continue
            if flow_name is not None and entry.new.flow.name != flow_name:
                continue
            new = entry.new
            out.append(
                ExecutionSummary(
                    flow_id=new.flow_id,
                    flow_name=new.flow.name,
                    status=entry.status,
                    request_id=new.request_id,
                    created_at=new.created_at,
                    finished_at=entry.finished_at,
                    cursor=entry.cursor,
                )
            )
            if len(out) == limit:
                break
        return out

    async def finish_running(
        self,
        make_final: Callable[[ExecutionRecord], FlowFinished],
        only: Collection[str] | None = None,
    ) -> list[str]:
        self._check()
        done = []
        for flow_id, entry in list(self._entries.items()):
            if entry.status is not FlowStatus.RUNNING or (only is not None and flow_id not in only):
                continue
            record = entry.record()
            for sequence, event in closing_events(record, make_final(record)):
                self._append(flow_id, sequence, event)
            done.append(flow_id)
        return done

    async def delete_finished_before(self, cutoff: datetime, limit: int | None = None) -> int:
        self._check()
        # Taken as found, `limit` at most: retention calls this again and again, a batch
        # at a time, and a list of every expired one for each batch grew with their
        # square (100,000 expired: 0.4 s, the event loop held; a million: a minute).
        old = list(
            itertools.islice(
                (
                    flow_id
                    for flow_id, entry in self._entries.items()
                    if entry.finished_at is not None and entry.finished_at < cutoff
                ),
                limit,
            )
        )
        for flow_id in old:
            entry = self._entries.pop(flow_id)
            if entry.new.request_id is not None:
                self._by_request.pop(entry.new.request_id, None)
        self._deleted += len(old)
        if self._deleted > len(self._ids) // 2:  # mostly deleted ids: kept only those left
            self._ids = list(self._entries)
            self._cursors = [entry.cursor for entry in self._entries.values()]
            self._deleted = 0
        return len(old)

    async def forget_request_id(self, flow_id: str) -> None:
        self._check()
        entry = self._entries.get(flow_id)
        if entry is not None and entry.new.request_id is not None:
            self._by_request.pop(entry.new.request_id, None)
            entry.new = entry.new._replace(request_id=None)

    async def check_writable(self) -> None:
        self._check()

    async def secret(self) -> bytes:
        return self._secret
