"""Durable executions through the gRPC API: look-up, listing, cancel, watch, retries, limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from flowsvc import TaskContext, TaskResult
from flowsvc.config import Settings
from flowsvc.executions import Run
from flowsvc.server import FlowServer, build_server
from tests.support import chain, flow_pb, on_event_loop, to_dict

pb = flow_service_pb2


async def eventually(predicate, limit: float = 10.0, interval: float = 0.02):
    """Await `predicate()` (sync or async) until truthy, failing after `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


class Served(NamedTuple):
    server: FlowServer
    channel: grpc.aio.Channel
    stub: flow_service_pb2_grpc.FlowServiceStub


@contextlib.asynccontextmanager
async def serving(settings: Settings, registry) -> AsyncIterator[Served]:
    """A server of its own for a test (its settings or a restart), with a channel and a
    stub; shut down at the end, however the test ends."""
    server = await build_server(settings, registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Served(server, channel, flow_service_pb2_grpc.FlowServiceStub(channel))
    finally:
        await server.shutdown(grace=0)


async def read_all(call) -> list:
    out = []
    while (message := await call.read()) is not grpc.aio.EOF:
        out.append(message)
    return out


class StoreHold:
    """Holds the SQLite store's one thread with a job that waits, so that the jobs after
    it queue behind (white-box tests of what happens between two commits)."""

    def __init__(self, store) -> None:
        self.store = store
        self._gate = threading.Event()
        self._holding = threading.Event()
        self._job: asyncio.Future[object] | None = None

    async def hold(self) -> None:
        self._gate.clear()
        self._holding.clear()

        def held(conn) -> bool:
            self._holding.set()
            return self._gate.wait(10)

        self._job = self.store._submit(held, write=False)
        # Running, not merely taken: on Python 3.13 a put hands the job to the waiting
        # thread at once (qsize() is 0 before the thread runs), and the jobs queued before
        # it wakes went into the held job's batch instead of waiting behind it.
        await eventually(self._holding.is_set)

    async def release(self) -> None:
        self._gate.set()
        if self._job is not None:
            await self._job

    def let_go(self) -> None:
        """Never leave the thread held, whatever happened (a `finally`)."""
        self._gate.set()


def stubborn(registry) -> tuple[asyncio.Event, list[bool]]:
    """Register an async task "stubborn" that ignores its cancellation and finishes once
    released; returns (release, ignored: one True per cancel ignored)."""
    release, ignored = asyncio.Event(), []

    @registry.task("stubborn")
    async def stubborn() -> TaskResult:
        try:
            await release.wait()
        except asyncio.CancelledError:
            ignored.append(True)
            await release.wait()  # goes on regardless
        return TaskResult.success({"finished": True})

    return release, ignored


def gate(registry, name: str = "gated"):
    """Register an async task that waits until released; returns (started, release, cancelled)."""
    started, release, cancelled = asyncio.Event(), asyncio.Event(), []

    async def gated(ctx: TaskContext) -> TaskResult:
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.flow_id)
            raise
        return TaskResult.success({"released": True})

    registry.register(name, gated)
    return started, release, cancelled


def violation_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    return [v.field for v in bad.field_violations]


# -- GetExecution ------------------------------------------------------------------------


async def test_get_execution_returns_what_execute_returned(stub) -> None:
    request = pb.ExecuteFlowRequest(flow=chain("noop", ("echo", {"k": [1, "two"]})))
    request.input.update({"customer_id": "c-7"})
    executed = await stub.ExecuteFlow(request, timeout=10)
    got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=executed.flow_id))).execution
    assert got.flow_id == executed.flow_id
    assert got.status == flow_pb2.FLOW_STATUS_SUCCEEDED == executed.status
    assert got.message == executed.message
    assert [r.SerializeToString() for r in got.execution_history] == [
        r.SerializeToString() for r in executed.execution_history
    ]
    assert got.flow == request.flow
    assert to_dict(got.input) == {"customer_id": "c-7"}
    assert got.create_time.ToDatetime() <= got.end_time.ToDatetime()
    assert got.last_sequence == 4  # started, 2 results, finished


async def test_get_execution_unknown_and_malformed_ids(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetExecution(pb.GetExecutionRequest(flow_id=str(uuid.uuid4())))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in ("", "not-a-uuid", "x" * 500):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExecution(pb.GetExecutionRequest(flow_id=bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violation_fields(info.value) == ["flow_id"]


async def test_running_execution_is_visible_while_it_runs(stub, registry) -> None:
    started, release, _ = gate(registry)
    call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("noop", "gated")))
    first = await call.read()
    await started.wait()
    got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=first.started.flow_id))).execution
    assert got.status == flow_pb2.FLOW_STATUS_RUNNING
    assert [r.task for r in got.execution_history] == ["noop"]
    assert not got.HasField("end_time")
    release.set()
    rest = await read_all(call)
    assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED


# -- ListExecutions ----------------------------------------------------------------------


async def test_list_executions_pages_with_filters(stub) -> None:
    ids = {"alpha": [], "beta": []}
    for i in range(7):
        name = "alpha" if i % 2 == 0 else "beta"  # alpha: 4, beta: 3
        flow = flow_pb(["noop" if name == "alpha" else "fail"], name=name)
        ids[name].append((await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))).flow_id)

    async def all_pages(**filters) -> tuple[list[str], int]:
        seen, pages, token = [], 0, ""
        while True:
            page = await stub.ListExecutions(
                pb.ListExecutionsRequest(page_size=2, page_token=token, **filters)
            )
            pages += 1
            assert len(page.executions) <= 2
            seen += [e.flow_id for e in page.executions]
            token = page.next_page_token
            if not token:
                return seen, pages

    seen, pages = await all_pages(flow_name="alpha")
    assert seen == ids["alpha"][::-1]  # newest first
    assert pages == 2
    seen, pages = await all_pages(status=flow_pb2.FLOW_STATUS_FAILED)
    assert seen == ids["beta"][::-1]
    assert pages == 2
    seen, _ = await all_pages()
    assert len(seen) == 7 and len(set(seen)) == 7
    page = await stub.ListExecutions(pb.ListExecutionsRequest(flow_name="beta"))
    summary = page.executions[0]
    assert summary.flow_name == "beta" and summary.status == flow_pb2.FLOW_STATUS_FAILED
    assert summary.create_time.seconds and summary.end_time.seconds


async def test_list_executions_rejects_bad_tokens_and_sizes(stub) -> None:
    for _ in range(3):
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
    page = await stub.ListExecutions(pb.ListExecutionsRequest(page_size=1))
    token = page.next_page_token
    assert token
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    cases = [
        (pb.ListExecutionsRequest(page_token=tampered), "page_token"),
        (pb.ListExecutionsRequest(page_token="garbage!"), "page_token"),
        (pb.ListExecutionsRequest(page_token=token, flow_name="other"), "page_token"),
        (pb.ListExecutionsRequest(page_size=-1), "page_size"),
        (pb.ListExecutionsRequest(status=99), "status"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListExecutions(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violation_fields(info.value) == [field]
    # The untampered token still works, with another page size (AIP-158 allows that).
    page = await stub.ListExecutions(pb.ListExecutionsRequest(page_token=token, page_size=5))
    assert len(page.executions) == 2 and not page.next_page_token


# -- CancelExecution -----------------------------------------------------------------------


async def test_cancel_while_a_sleep_task_runs(stub, registry) -> None:
    started, _, cancelled = gate(registry)
    ran_after = []
    registry.register("after", lambda: ran_after.append(1) or TaskResult.success())
    call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("noop", "gated", "after")))
    flow_id = (await call.read()).started.flow_id
    await started.wait()
    response = await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id), timeout=10)
    assert response.execution.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert "CancelExecution" in response.execution.message
    assert [r.task for r in response.execution.execution_history] == ["noop"]
    assert cancelled == [flow_id] and ran_after == []
    rest = await read_all(call)
    assert await call.code() == grpc.StatusCode.OK
    assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=str(uuid.uuid4())))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_cuts_off_a_task_with_a_timeout_that_ignores_it(stub, registry) -> None:
    release, _ = stubborn(registry)

    flow = chain("stubborn", "noop")
    flow.tasks[0].timeout.FromSeconds(60)  # the attempt runs under a timer
    call = stub.StreamFlow(pb.StreamFlowRequest(flow=flow))
    flow_id = (await call.read()).started.flow_id
    try:
        got = await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id))
        assert got.execution.status == flow_pb2.FLOW_STATUS_CANCELLED, got.execution
        rest = await read_all(call)
        assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_CANCELLED
        assert [m.task_result.task for m in rest[:-1]] == []  # noop never started
    finally:
        release.set()


async def test_cancel_of_a_task_that_ignores_it_without_a_timer_is_not_ok(
    stub, registry, server
) -> None:
    # No timer can cut the task off: the cancel cannot say CANCELLED when it answers.
    server.manager.settings = dataclasses.replace(server.manager.settings, cancel_wait_seconds=0.2)
    release, _ = stubborn(registry)

    call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("stubborn", "noop")))
    flow_id = (await call.read()).started.flow_id
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "ends FLOW_STATUS_CANCELLED when the task returns" in info.value.details()
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
        assert got.execution.status == flow_pb2.FLOW_STATUS_RUNNING
    finally:
        release.set()
    rest = await read_all(call)  # it ends as the message said, and noop never started
    assert [m.task_result.task for m in rest[:-1]] == ["stubborn"]
    assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_CANCELLED


@pytest.mark.parametrize("after", [("noop",), ()], ids=["then-noop", "last"])
async def test_a_task_that_ignores_a_cancel_keeps_its_result_and_nothing_runs_after(
    stub, registry, after: tuple[str, ...]
) -> None:
    release, ignored = stubborn(registry)

    call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("stubborn", *after)))
    flow_id = (await call.read()).started.flow_id
    cancel = asyncio.ensure_future(stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id)))
    await eventually(lambda: ignored)
    release.set()  # the task finishes: its result is kept, and nothing starts after it
    got = (await cancel).execution
    assert got.status == flow_pb2.FLOW_STATUS_CANCELLED, got
    rest = await read_all(call)
    assert [m.task_result.task for m in rest[:-1]] == ["stubborn"]
    assert rest[0].task_result.status == flow_pb2.TASK_STATUS_SUCCESS
    assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert "cancelled during step 1 ('stubborn')" in rest[-1].finished.message


async def test_a_database_file_removed_under_the_server_stops_the_store(
    tmp_path: Path, registry
) -> None:
    """Commits to a removed file would be lost without a word: the store says so, every
    call that needs it is UNAVAILABLE, and health is NOT_SERVING."""
    db = tmp_path / "gone.db"
    async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, channel, stub):
        first = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert first.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240 (a test's rm)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "gone.db is gone" in (info.value.details() or "")
        await eventually(lambda: health_is(channel, health_pb2.HealthCheckResponse.NOT_SERVING))


@pytest.mark.parametrize("symlinked", [False, True], ids=["file", "symlink"])
async def test_a_write_ahead_log_removed_under_the_server_stops_the_store(
    tmp_path: Path, registry, symlinked: bool
) -> None:
    """The -wal file removed alone (to free a full disk): SQLite went on committing to the
    unlinked file, clients were told OK, and a kill -9 then lost it all. The store says
    so as for the database file (UNAVAILABLE, health NOT_SERVING), and first copies the
    removed log's commits into the database file. With --db a symlink (a volume's path),
    SQLite keeps the -wal beside the file the link points to: the store looked beside the
    link, found none, and never noticed it removed."""
    real = tmp_path / "volume" / "wal.db"
    real.parent.mkdir()
    db = real
    if symlinked:
        db = tmp_path / "flowsvc.db"
        db.symlink_to(real)
    async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, channel, stub):
        first = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert first.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        Path(f"{real}-wal").unlink()  # noqa: ASYNC240 (a test's rm)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "wal.db-wal is gone" in (info.value.details() or "")
        # What a kill -9 would leave, the database file alone, holds what clients were told.
        copy = tmp_path / "copy.db"
        copy.write_bytes(real.read_bytes())
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            row = conn.execute(
                "SELECT status FROM executions WHERE flow_id = ?", (first.flow_id,)
            ).fetchone()
        assert row == ("succeeded",)
        await eventually(lambda: health_is(channel, health_pb2.HealthCheckResponse.NOT_SERVING))


async def health_is(channel: grpc.aio.Channel, status: int) -> bool:
    """Whether the server's health Check answers `status` now."""
    check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return bool(check.status == status)


async def test_ends_a_failed_store_cannot_record_at_shutdown_are_logged(
    tmp_path: Path, registry, caplog
) -> None:
    """A store that cannot write at shutdown (a full disk) leaves the executions it cut
    off RUNNING, for the next start to record as a crash's: the shutdown used to say
    nothing of them. The failure here: the -wal file removed under the server."""
    caplog.set_level(logging.INFO, logger="flowsvc.executions")
    started, release, _ = gate(registry)
    db = tmp_path / "left.db"
    async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, _, stub):
        stream = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated")))
        flow_id = (await stream.read()).started.flow_id
        await started.wait()
        Path(f"{db}-wal").unlink()  # noqa: ASYNC240 (a test's rm)
        release.set()  # its result cannot be committed: the execution is cut off
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_all(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    [line] = [r for r in caplog.records if r.getMessage().startswith("execution ends not recorded")]
    assert line.levelno == logging.ERROR
    assert getattr(line, "flow_ids", None) == [flow_id]


async def test_a_read_that_shares_a_failed_commit_is_still_answered(
    tmp_path: Path, registry
) -> None:
    """A batch whose BEGIN or COMMIT fails (database locked; on a full disk, the commit's
    write-ahead log) failed its reads too: GetExecution UNAVAILABLE, "database or disk is
    full" on a full disk, now and then, though a read needs no room. White-box: the
    store's thread is held while a write and a read queue behind it, and an outside
    connection holds the write lock."""
    db = tmp_path / "reads.db"
    settings = Settings(listen="127.0.0.1:0", db=str(db), db_busy_timeout_ms=200)
    async with serving(settings, registry) as (server, _, stub):
        first = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        store = server.manager.store
        held = StoreHold(store)
        outside = sqlite3.connect(db, isolation_level=None, timeout=0)
        try:
            outside.execute("BEGIN IMMEDIATE")  # the write lock, held
            await held.hold()
            write = asyncio.ensure_future(
                stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=10)
            )
            read = asyncio.ensure_future(
                stub.GetExecution(pb.GetExecutionRequest(flow_id=first.flow_id), timeout=10)
            )
            await eventually(lambda: store._jobs.qsize() >= 2)  # one batch: both
            await held.release()
            got = await read
            assert got.execution.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await write
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "locked" in (info.value.details() or "")
        finally:
            held.let_go()
            outside.close()


async def test_a_cancel_that_comes_as_the_flow_ends_is_failed_precondition(
    tmp_path: Path, registry
) -> None:
    """OK from CancelExecution means the execution ended CANCELLED. One whose last task
    had already finished when the cancel came ends as it would have (SUCCEEDED): that
    cancel is FAILED_PRECONDITION, as for an execution that had ended. White-box: the
    store's thread is held, so that the execution's end waits for its commit while the
    cancel comes in."""
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "late.db"))
    server = await build_server(settings, registry)
    started, release, _ = gate(registry)
    held = StoreHold(server.manager.store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            stream = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated")))
            flow_id = (await stream.read()).started.flow_id
            await started.wait()
            run = server.manager._live[flow_id]
            await held.hold()
            release.set()  # the task succeeds; its result and the end queue behind `held`
            await eventually(lambda: run.unpublished == 2)
            cancel = asyncio.ensure_future(
                stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id), timeout=10)
            )
            await eventually(lambda: run.stop.reason is not None)
            await held.release()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await cancel
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "succeeded" in (info.value.details() or "")
            messages = await read_all(stream)
            assert messages[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    finally:
        held.let_go()
        await server.shutdown(grace=0)


async def test_get_execution_as_its_end_commits_agrees_with_itself(
    tmp_path: Path, registry
) -> None:
    """GetExecution reads the record and the events at one moment. Read apart, the end
    could commit in between: RUNNING with no end time, yet last_sequence counting the
    `finished` event, so that watching from it gave an empty stream and never the end.
    White-box: the store's thread is held while the read and the end queue behind it."""
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "snapshot.db"))
    started, release, _ = gate(registry)
    async with serving(settings, registry) as (server, _, stub):
        store = server.manager.store
        held = StoreHold(store)
        try:
            stream = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated")))
            flow_id = (await stream.read()).started.flow_id
            await started.wait()
            run = server.manager._live[flow_id]
            await held.hold()
            get = asyncio.ensure_future(
                stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id), timeout=10)
            )
            await eventually(lambda: store._jobs.qsize() == 1)  # the read waits
            release.set()  # gated's result and the end queue after the read
            await eventually(lambda: run.unpublished == 2)
            await held.release()
            got = (await get).execution
            watched = [
                m.WhichOneof("event")
                async for m in stub.WatchExecution(
                    pb.WatchExecutionRequest(flow_id=flow_id, after_sequence=got.last_sequence)
                )
            ]
            assert got.status == flow_pb2.FLOW_STATUS_RUNNING
            assert not got.HasField("end_time")
            assert watched[-1:] == ["finished"], (got.last_sequence, watched)
            await read_all(stream)
        finally:
            held.let_go()


async def test_an_execution_deleted_by_retention_while_read_is_not_found(
    tmp_path: Path, registry
) -> None:
    """Retention deleting an execution as it is read: GetExecution and WatchExecution
    answer it whole or NOT_FOUND, never OK with no history and no event. White-box: the
    store's thread is held while the read and the sweep queue behind it, in that order."""
    from datetime import UTC, datetime, timedelta

    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "swept.db"))
    async with serving(settings, registry) as (server, _, stub):
        store = server.manager.store
        held = StoreHold(store)
        try:
            for read in ("get", "watch"):
                done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop", "echo")))
                await held.hold()
                if read == "get":
                    call = asyncio.ensure_future(
                        stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))
                    )
                else:
                    request = pb.WatchExecutionRequest(flow_id=done.flow_id)
                    call = asyncio.ensure_future(read_all(stub.WatchExecution(request)))
                await eventually(lambda: store._jobs.qsize() == 1)  # the read waits
                sweep = asyncio.ensure_future(
                    store.delete_finished_before(datetime.now(UTC) + timedelta(seconds=1))
                )
                await eventually(lambda: store._jobs.qsize() == 2)  # the sweep waits behind
                await held.release()
                assert await sweep >= 1
                try:
                    answer = await call
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, (read, err)
                    continue
                if read == "get":
                    assert len(answer.execution.execution_history) == 2, answer
                    assert answer.execution.last_sequence == 4
                else:
                    assert [m.sequence for m in answer] == [1, 2, 3, 4], answer
        finally:
            held.let_go()


async def test_a_retry_whose_execution_retention_deletes_meanwhile_runs_the_flow_anew(
    tmp_path: Path, registry
) -> None:
    """A retry (same request_id) finds its ended execution, and retention deletes it
    before the retry reads its events: the request_id is forgotten with it, so the retry
    runs the flow as a new execution (README: a request_id is remembered as long as its
    execution is retained), never NOT_FOUND for an id the client did not ask about.
    White-box: the store's thread is held while the look-up and the sweep queue behind
    it, in that order."""
    from datetime import UTC, datetime, timedelta

    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "swept.db"))
    async with serving(settings, registry) as (server, _, stub):
        store = server.manager.store
        held = StoreHold(store)
        try:
            for rpc in ("execute", "stream"):
                request_id = str(uuid.uuid4())
                flow = chain("noop", "echo")
                first = await stub.ExecuteFlow(
                    pb.ExecuteFlowRequest(flow=flow, request_id=request_id)
                )
                await held.hold()
                if rpc == "execute":
                    request = pb.ExecuteFlowRequest(flow=flow, request_id=request_id)
                    call = asyncio.ensure_future(stub.ExecuteFlow(request))
                else:
                    retry = pb.StreamFlowRequest(flow=flow, request_id=request_id)
                    call = asyncio.ensure_future(read_all(stub.StreamFlow(retry)))
                await eventually(lambda: store._jobs.qsize() == 1)  # the look-up waits
                sweep = asyncio.ensure_future(
                    store.delete_finished_before(datetime.now(UTC) + timedelta(seconds=1))
                )
                await eventually(lambda: store._jobs.qsize() == 2)  # the sweep waits behind
                await held.release()
                assert await sweep >= 1
                answer = await call
                if rpc == "execute":
                    flow_id, status = answer.flow_id, answer.status
                else:
                    flow_id = answer[0].started.flow_id
                    status = answer[-1].finished.status
                assert flow_id != first.flow_id, rpc
                assert status == flow_pb2.FLOW_STATUS_SUCCEEDED, rpc
        finally:
            held.let_go()


async def test_cancel_ends_a_watcher_with_finished_and_ok(stub, registry) -> None:
    started, _, _ = gate(registry)
    request = pb.ExecuteFlowRequest(flow=chain("gated"), continue_on_disconnect=True)
    execute = asyncio.ensure_future(stub.ExecuteFlow(request, timeout=10))
    await started.wait()
    flow_id = (await stub.ListExecutions(pb.ListExecutionsRequest())).executions[0].flow_id
    watch = stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
    assert (await watch.read()).WhichOneof("event") == "started"
    await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id))
    rest = await read_all(watch)
    assert await watch.code() == grpc.StatusCode.OK
    assert [m.WhichOneof("event") for m in rest] == ["finished"]
    assert rest[0].finished.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert (await execute).status == flow_pb2.FLOW_STATUS_CANCELLED


# -- WatchExecution and resuming ----------------------------------------------------------


async def test_dropped_stream_resumes_with_watch_exactly_once(stub, registry) -> None:
    first_started, release_first, _ = gate(registry, "first")
    _, release_second, _ = gate(registry, "second")
    flow = chain("noop", "first", "echo", "second", "noop_again")
    registry.register("noop_again", registry.get("noop").fn)
    request = pb.StreamFlowRequest(flow=flow, continue_on_disconnect=True)
    call = stub.StreamFlow(request)
    seen = [await call.read(), await call.read()]  # started, noop's result
    await first_started.wait()
    call.cancel()  # the connection "drops"
    flow_id = seen[0].started.flow_id
    release_first.set()  # the execution goes on without its caller
    await eventually(lambda: _history_len(stub, flow_id, 3))  # first and echo finished meanwhile
    watch = stub.WatchExecution(
        pb.WatchExecutionRequest(flow_id=flow_id, after_sequence=seen[-1].sequence)
    )
    resumed = [await watch.read(), await watch.read()]  # stored: first, echo
    release_second.set()
    resumed += await read_all(watch)  # live: second, noop_again, finished
    everything = seen + resumed
    assert [m.sequence for m in everything] == list(range(1, 8))  # no gap, no repeat
    assert [m.WhichOneof("event") for m in everything] == (
        ["started"] + ["task_result"] * 5 + ["finished"]
    )
    got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
    streamed = [m.task_result.SerializeToString() for m in everything if m.HasField("task_result")]
    assert streamed == [r.SerializeToString() for r in got.execution_history]
    assert got.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def _history_len(stub, flow_id: str, n: int) -> bool:
    got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
    return len(got.execution.execution_history) >= n


async def test_watch_of_a_finished_execution_replays_the_same_messages(stub) -> None:
    flow = chain("noop", ("fail", {"message": "nope"}))
    streamed = [m async for m in stub.StreamFlow(pb.StreamFlowRequest(flow=flow))]
    flow_id = streamed[0].started.flow_id
    watched = [m async for m in stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))]
    # Same fields and numbers: the bytes are identical.
    assert [m.SerializeToString() for m in watched] == [m.SerializeToString() for m in streamed]
    tail = [
        m
        async for m in stub.WatchExecution(
            pb.WatchExecutionRequest(flow_id=flow_id, after_sequence=2)
        )
    ]
    assert [m.sequence for m in tail] == [3, 4]
    # after_sequence is a uint64: past the end, even beyond SQLite's int64, is nothing.
    for after in (4, 2**63 - 1, 2**63, 2**64 - 1):
        request = pb.WatchExecutionRequest(flow_id=flow_id, after_sequence=after)
        assert [m async for m in stub.WatchExecution(request)] == []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchExecution(pb.WatchExecutionRequest(flow_id=str(uuid.uuid4()))):
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_dropping_a_stream_cancels_its_execution_by_default(stub, registry) -> None:
    started, _, cancelled = gate(registry)
    call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated", "noop")))
    flow_id = (await call.read()).started.flow_id
    await started.wait()
    call.cancel()

    async def status() -> int:
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
        return got.execution.status == flow_pb2.FLOW_STATUS_CANCELLED

    await eventually(status)
    assert cancelled == [flow_id]


async def test_continue_on_disconnect_keeps_running_after_a_deadline(stub, registry) -> None:
    started, release, cancelled = gate(registry)
    request = pb.ExecuteFlowRequest(flow=chain("gated", "noop"), continue_on_disconnect=True)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(request, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert started.is_set()
    flow_id = (await stub.ListExecutions(pb.ListExecutionsRequest())).executions[0].flow_id
    release.set()

    async def succeeded() -> bool:
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
        return got.execution.status == flow_pb2.FLOW_STATUS_SUCCEEDED

    await eventually(succeeded)
    assert cancelled == []


async def test_callers_that_leave_a_long_task_leave_nothing_behind(server, stub, registry) -> None:
    """Watchers and retries that go away while an execution waits on a long task keep no
    waiter of theirs on it: one that polls it for hours grew its lists by one a call."""
    started, release, _ = gate(registry)
    request = pb.ExecuteFlowRequest(
        flow=chain("gated", "noop"), request_id="long", continue_on_disconnect=True
    )
    stream = stub.StreamFlow(
        pb.StreamFlowRequest(flow=request.flow, request_id="long", continue_on_disconnect=True)
    )
    flow_id = (await stream.read()).started.flow_id
    await started.wait()
    stream.cancel()
    run = server.manager._live[flow_id]
    await eventually(lambda: not run._waiters)
    for _ in range(100):
        watch = stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
        await watch.read()
        await eventually(lambda: run._waiters)  # it waits for the next event
        watch.cancel()
        retry = stub.ExecuteFlow(request)
        await eventually(lambda: run._done_waiters)  # attached: it waits for the end
        retry.cancel()
        await eventually(lambda: not run._waiters and not run._done_waiters)
    assert run.callers == 0
    release.set()
    got = await stub.ExecuteFlow(request)  # the same execution, run to its end
    assert got.flow_id == flow_id
    assert got.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_an_ended_execution_is_not_kept_in_memory_by_the_sqlite_store(
    tmp_path: Path, registry
) -> None:
    """Once its stream has ended, nothing holds an execution's Run (and so its whole
    history) in memory: the SQLite store's thread, waiting for its next job, held its last
    batch, and through its callbacks the last execution's every event, until the next
    write (retention's, an hour later, on an idle server)."""
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "idle.db"))
    async with serving(settings, registry) as (server, _, stub):
        loop = flow_pb(["noop"], {"noop": ("noop", "end")}, max_steps=50)
        messages = await read_all(stub.StreamFlow(pb.StreamFlowRequest(flow=loop)))
        flow_id = messages[0].started.flow_id
        assert messages[-1].sequence == 52
        await eventually(lambda: flow_id not in server.manager._live)

        def kept() -> list[Run]:
            gc.collect()
            return [o for o in gc.get_objects() if isinstance(o, Run) and o.flow_id == flow_id]

        await eventually(lambda: not kept(), limit=3.0)


# -- idempotency -------------------------------------------------------------------------


def counting_task(registry, path: Path) -> None:
    def record() -> TaskResult:
        with path.open("a") as f:
            f.write("ran\n")
        return TaskResult.success({"ran": True})

    registry.register("side_effect", record)


async def test_idempotent_retry_runs_the_flow_once(stub, registry, tmp_path: Path) -> None:
    marker = tmp_path / "side-effects.txt"
    counting_task(registry, marker)
    request = pb.ExecuteFlowRequest(flow=chain("side_effect"), request_id="order-42")
    request.input.update({"amount": 10})
    first = await stub.ExecuteFlow(request, timeout=10)
    retry = await stub.ExecuteFlow(request, timeout=10)
    assert retry.flow_id == first.flow_id
    assert retry.SerializeToString() == first.SerializeToString()
    streamed = [m async for m in stub.StreamFlow(pb.StreamFlowRequest(
        flow=request.flow, input=request.input, request_id="order-42"
    ))]  # fmt: skip
    assert streamed[0].started.flow_id == first.flow_id
    assert marker.read_text() == "ran\n"

    other_input = pb.ExecuteFlowRequest(flow=request.flow, request_id="order-42")
    other_input.input.update({"amount": 11})
    other_flow = pb.ExecuteFlowRequest(
        flow=chain("noop"), request_id="order-42", input=request.input
    )
    for conflicting in (other_input, other_flow):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(conflicting)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert first.flow_id in info.value.details()
    assert marker.read_text() == "ran\n"


async def test_retry_while_the_first_still_runs_attaches_to_it(
    stub, registry, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="flowsvc.executions")
    marker = tmp_path / "side-effects.txt"
    counting_task(registry, marker)
    started, release, _ = gate(registry)
    flow = chain("side_effect", "gated")
    stream = stub.StreamFlow(pb.StreamFlowRequest(flow=flow, request_id="r-1"))
    flow_id = (await stream.read()).started.flow_id
    await started.wait()
    retry = asyncio.ensure_future(
        stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow, request_id="r-1"), timeout=10)
    )
    # Released only once the server says the retry joined the running execution.
    await eventually(
        lambda: any(
            r.getMessage() == "retry attached to the running execution"
            and getattr(r, "flow_id", None) == flow_id
            for r in caplog.records
        )
    )
    release.set()
    response = await retry
    assert response.flow_id == flow_id
    assert [r.task for r in response.execution_history] == ["side_effect", "gated"]
    await read_all(stream)
    assert marker.read_text() == "ran\n"


async def test_a_retry_asking_to_continue_on_disconnect_keeps_the_execution_running(
    registry,
) -> None:
    # The first call did not ask for continue_on_disconnect; its retry did, for a client
    # that will reattach. The retry attached, and once both calls had gone away the
    # execution was cancelled all the same: the retry's continue_on_disconnect was ignored.
    settings = Settings(listen="127.0.0.1:0", db=":memory:")
    started, release, cancelled = gate(registry)
    flow = chain("gated", "noop")
    async with serving(settings, registry) as served:
        first = served.stub.StreamFlow(pb.StreamFlowRequest(flow=flow, request_id="r-cod"))
        flow_id = (await first.read()).started.flow_id
        await started.wait()
        run = served.server.manager._live[flow_id]
        retry = served.stub.StreamFlow(
            pb.StreamFlowRequest(flow=flow, request_id="r-cod", continue_on_disconnect=True)
        )
        await eventually(lambda: run.callers == 2)  # the retry attached
        first.cancel()
        retry.cancel()
        await eventually(lambda: run.callers == 0)  # both are gone, as the server sees it
        release.set()

        async def ended() -> pb.Execution | None:
            got = await served.stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
            return got.execution if got.execution.HasField("end_time") else None

        execution = await eventually(ended)
        assert execution.status == flow_pb2.FLOW_STATUS_SUCCEEDED, execution.message
        assert cancelled == []


async def test_simultaneous_retries_all_get_the_one_execution(settings, registry) -> None:
    """Retries that arrive together, while the first call's record is being written, all
    attach to the one execution: none is told the store failed (the store answers a
    retry's read of the record before the first call has resumed and launched it)."""

    server = await build_server(dataclasses.replace(settings, max_in_flight=100), registry)
    flow = chain("noop", ("sleep", {"seconds": 0.05}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            for round_ in range(10):
                request = pb.ExecuteFlowRequest(flow=flow, request_id=f"together-{round_}")
                calls = []
                for _ in range(4):
                    calls.append(asyncio.ensure_future(stub.ExecuteFlow(request, timeout=10)))
                    await asyncio.sleep(0)  # a loop turn apart, as retries arrive
                responses = await asyncio.gather(*calls, return_exceptions=True)
                errors = [r for r in responses if isinstance(r, Exception)]
                assert not errors, [(e.code(), e.details()) for e in errors]
                assert len({r.flow_id for r in responses}) == 1
                assert all(r.status == flow_pb2.FLOW_STATUS_SUCCEEDED for r in responses)
    finally:
        await server.shutdown(grace=0)


async def leave_while_the_record_is_written(server: FlowServer, stub, request, monkeypatch) -> str:
    """Send `request`, its caller going away (a 1 ms deadline) while its execution's
    record is written, so that the execution is cancelled before any task starts; return
    its flow_id once it has ended. White-box: the store's thread is held once the
    request_id has been looked up, so that the caller leaves while the record waits."""
    store = server.manager.store
    gate_open = threading.Event()
    create = store.create_nowait

    watchers: list[object] = []  # callbacks on the write of the first call's record

    class Watched(asyncio.Future):
        def add_done_callback(self, fn, *, context=None) -> None:
            watchers.append(fn)
            super().add_done_callback(fn, context=context)

    def create_held(new):
        monkeypatch.setattr(store, "create_nowait", create)  # the retries' at once
        store._submit(lambda conn: gate_open.wait(10), write=False)
        written, watched = create(new), Watched()
        written.add_done_callback(lambda done: watched.set_result(done.result()))
        return watched

    monkeypatch.setattr(store, "create_nowait", create_held)
    try:
        first = stub.ExecuteFlow(request, timeout=20)
        await eventually(lambda: server.manager._starting == 1)  # its record waits
        callbacks = len(watchers)
        first.cancel()
        # The server has seen the caller go away: it will launch the execution itself.
        await eventually(lambda: len(watchers) > callbacks)
    finally:
        gate_open.set()

    async def cancelled() -> list[str]:
        page = await stub.ListExecutions(pb.ListExecutionsRequest())
        return [e.flow_id for e in page.executions if e.status == flow_pb2.FLOW_STATUS_CANCELLED]

    [left] = await eventually(cancelled)
    await eventually(lambda: server.manager.in_flight == 0)
    return left


async def test_a_retry_runs_the_flow_when_its_first_caller_left_before_anything_ran(
    tmp_path: Path, registry, monkeypatch
) -> None:
    """A first call that goes away (a 1 ms deadline) while its record is written leaves an
    execution that is cancelled before any task starts. Its request_id is freed: a retry
    runs the flow, instead of being answered that CANCELLED execution on every retry, for
    ever."""
    marker = tmp_path / "side-effects.txt"
    counting_task(registry, marker)
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "left.db"))
    async with serving(settings, registry) as (server, _, stub):
        request = pb.ExecuteFlowRequest(flow=chain("side_effect"), request_id="order-7")
        left = await leave_while_the_record_is_written(server, stub, request, monkeypatch)
        retry = await stub.ExecuteFlow(request, timeout=20)
        assert retry.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert retry.flow_id != left
        assert (await stub.ExecuteFlow(request, timeout=20)).flow_id == retry.flow_id
        assert marker.read_text() == "ran\n"
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=left))).execution
        assert got.status == flow_pb2.FLOW_STATUS_CANCELLED and got.request_id == ""


async def test_a_retry_runs_the_flow_when_a_crash_kept_the_request_id_of_one_that_ran_nothing(
    tmp_path: Path, registry, monkeypatch
) -> None:
    """The execution that ran nothing gives up its request_id in a commit of its own,
    after its `finished` one: a crash (or a store failure) between the two left the
    request_id with it, and every retry, after the restart too, was told
    FAILED_PRECONDITION, "after a task had begun", though none had. A retry now sees from
    the record that nothing ran, frees the request_id and runs the flow. White-box: the
    second commit is lost, as in a kill -9 between the two."""
    marker = tmp_path / "side-effects.txt"
    counting_task(registry, marker)
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "crash.db"))
    request = pb.ExecuteFlowRequest(flow=chain("side_effect"), request_id="order-7c")
    async with serving(settings, registry) as (server, _, stub):

        async def lost(flow_id: str) -> None:
            """The server died before this commit."""

        monkeypatch.setattr(server.manager.store, "forget_request_id", lost)
        left = await leave_while_the_record_is_written(server, stub, request, monkeypatch)
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=left))).execution
        assert got.request_id == "order-7c"  # what the crash left
    async with serving(settings, registry) as (server, _, stub):  # restarted
        retry = await stub.ExecuteFlow(request, timeout=20)
        assert retry.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert retry.flow_id != left
        assert (await stub.ExecuteFlow(request, timeout=20)).flow_id == retry.flow_id
        assert marker.read_text() == "ran\n"
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=left))).execution
        assert got.status == flow_pb2.FLOW_STATUS_CANCELLED and got.request_id == ""


async def left_during_a_task(
    stub, registry, request_id: str
) -> tuple[flow_pb2.Flow, str, list[bool]]:
    """A StreamFlow of one gated task with `request_id`, its caller gone once the task has
    begun, its execution ended CANCELLED: (its flow, its flow_id, the task's cancels)."""
    started, _, cancelled = gate(registry)
    flow = chain("gated")
    first = stub.StreamFlow(pb.StreamFlowRequest(flow=flow, request_id=request_id))
    flow_id = (await first.read()).started.flow_id
    await started.wait()
    first.cancel()
    await eventually(lambda: cancelled)

    async def ended() -> bool:
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
        return got.execution.status == flow_pb2.FLOW_STATUS_CANCELLED

    await eventually(ended)
    return flow, flow_id, cancelled


async def test_a_retry_after_its_first_caller_left_during_a_task_is_failed_precondition(
    stub, registry
) -> None:
    """A first call that goes away while a task runs cancels the execution (no
    continue_on_disconnect). The task may have done part of its work, so a retry does not
    run the flow again; nor is it answered OK with that CANCELLED execution, as if
    someone had cancelled it: FAILED_PRECONDITION says what happened and what to do."""
    flow, flow_id, cancelled = await left_during_a_task(stub, registry, "order-8")
    retries = [
        stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow, request_id="order-8"), timeout=10),
        read_all(stub.StreamFlow(pb.StreamFlowRequest(flow=flow, request_id="order-8"))),
    ]
    for retry in retries:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await retry
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details() or ""
        assert flow_id in details and "caller went away" in details
        assert "new request_id" in details and "continue_on_disconnect" in details
    assert len(cancelled) == 1  # not run again


async def test_a_retry_after_its_caller_left_names_where_a_task_whose_name_has_a_colon_stopped(
    stub, registry
) -> None:
    """The FAILED_PRECONDITION of a retry says where the cancelled execution stopped:
    its message up to the reason. Cut at the message's first ": ", a task named
    "charge: card" read "(Flow cancelled during step 1 ('charge)"."""
    started, _, cancelled = gate(registry, "charge: card")
    flow = chain("charge: card")
    first = stub.StreamFlow(pb.StreamFlowRequest(flow=flow, request_id="order-10"))
    await first.read()
    await started.wait()
    first.cancel()
    await eventually(lambda: cancelled)  # stopping: a retry now waits for its end
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow, request_id="order-10"), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert details.endswith("(Flow cancelled during step 1 ('charge: card'))"), details


async def test_a_retry_while_the_left_execution_still_stops_waits_for_its_end(
    stub, registry, caplog
) -> None:
    """A retry that comes while an execution its caller left is still stopping (its task
    ignores the cancellation) is not attached to it, to be answered OK and CANCELLED: it
    waits for its end, then gets what a later retry gets."""
    release, ignored = stubborn(registry)
    flow = chain("stubborn")
    first = stub.StreamFlow(pb.StreamFlowRequest(flow=flow, request_id="order-9"))
    flow_id = (await first.read()).started.flow_id
    first.cancel()
    await eventually(lambda: ignored)
    retry = stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow, request_id="order-9"), timeout=10)
    retry_task = asyncio.ensure_future(retry)
    caplog.set_level(logging.INFO, logger="flowsvc.executions")
    # Released once the server has found the execution for the retry.
    await eventually(
        lambda: any(getattr(r, "request_id", None) == "order-9" for r in caplog.records)
    )
    release.set()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await retry_task
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert flow_id in (info.value.details() or "")


# -- limits -----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Every test here runs against both stores: in memory, and a SQLite file."""
    db = ":memory:" if request.param == "memory" else str(tmp_path / "executions.db")
    return Settings(listen="127.0.0.1:0", db=db, max_in_flight=2, grace_seconds=5.0)


async def test_in_flight_cap_gives_resource_exhausted_with_retry_info(stub, registry) -> None:
    _started, release, _ = gate(registry)
    calls = [
        stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated"), request_id=f"cap-{i}"))
        for i in range(2)
    ]
    for call in calls:
        await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(info.value)
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToTimedelta().total_seconds() > 0
    # A retry of a running execution still attaches, full or not.
    again = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated"), request_id="cap-0"))
    assert (await again.read()).sequence == 1
    release.set()
    for call in [*calls, again]:
        await read_all(call)

    async def accepts() -> bool:
        try:
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(accepts)


async def test_retries_together_at_the_cap_attach_instead_of_resource_exhausted(
    stub, registry
) -> None:
    """Retries that arrive together when the first of them takes the last free slot all
    get its execution: none is told the server is full by its own execution."""
    _started, release, _ = gate(registry)
    held = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated")))  # 1 of the 2 slots
    await held.read()
    flow = chain(("sleep", {"seconds": 0.05}))
    for round_ in range(5):
        request = pb.ExecuteFlowRequest(flow=flow, request_id=f"last-slot-{round_}")
        responses = await asyncio.gather(
            *(stub.ExecuteFlow(request, timeout=10) for _ in range(4)), return_exceptions=True
        )
        errors = [r for r in responses if isinstance(r, Exception)]
        assert not errors, [(e.code(), e.details()) for e in errors]
        assert len({r.flow_id for r in responses}) == 1
    release.set()
    await read_all(held)


async def test_an_answer_too_large_for_clients_is_a_clear_error_naming_the_execution(
    tmp_path: Path, registry
) -> None:
    # A client refuses a message over its limit (4 MiB by default), and would not even
    # learn the flow_id. The server says so itself, and WatchExecution still reads it.

    settings = Settings(listen="127.0.0.1:0", db=":memory:", max_response_bytes=4000)
    async with serving(settings, registry) as (_, _, stub):
        small = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert small.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        # Each result echoes its params and the input: together over the limit.
        flow = chain(("echo", {"blob": "x" * 500}), ("echo_2", {"blob": "y" * 500}))
        registry.register("echo_2", registry.get("echo").fn)
        request = pb.ExecuteFlowRequest(flow=flow)
        request.input.update({"blob": "z" * 1500})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert "WatchExecution" in details and "limit of 4,000" in details
        flow_id = re.search(r"execution ([0-9a-f-]{36})", details).group(1)  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watched = [m async for m in stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))]
        assert [m.task_result.task for m in watched[1:-1]] == ["echo", "echo_2"]
        assert watched[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_validate_flow_shows_the_violations_that_fit_and_counts_the_rest(registry) -> None:
    # 60,000 bad conditions made a 16.8 MB answer no default client could read.
    flow = flow_pb(["noop"])
    for i in range(400):
        flow.conditions.add(source_task=f"ghost{i}", target_task_success="end")
    request = flow_service_pb2.ValidateFlowRequest(flow=flow)
    settings = Settings(listen="127.0.0.1:0", db=":memory:", max_response_bytes=4000)
    async with serving(settings, registry) as (_, _, stub):
        response = await stub.ValidateFlow(request)
    assert not response.valid and response.ByteSize() <= 4000
    *shown, last = response.violations
    assert len(shown) > 10, len(shown)
    more = int(re.search(r"and ([\d,]+) more violations, not shown", last.description)[1])  # type: ignore[index]
    assert last.field == "flow" and "limit of 4,000 bytes" in last.description
    async with serving(dataclasses.replace(settings, max_response_bytes=0), registry) as served:
        every = (await served.stub.ValidateFlow(request)).violations
    assert len(every) == len(shown) + more
    assert [(v.field, v.description) for v in shown] == [
        (v.field, v.description) for v in every[: len(shown)]
    ]


@pytest.mark.parametrize("db", [":memory:", "sqlite"])
async def test_an_answer_far_too_large_is_refused_without_being_built(
    tmp_path: Path, registry, monkeypatch: pytest.MonkeyPatch, db: str
) -> None:
    # A 256 KiB input echoed 1,000 times made a 262 MB answer, built whole (about 1 GB
    # at its peak) just to be refused; with max_steps up to the cap, enough to kill the
    # server. The answer is now refused as soon as it outgrows the limit.
    from flowsvc import convert

    built: list[str] = []
    step_to_pb = convert.step_to_pb

    def counting(record, out) -> None:  # type: ignore[no-untyped-def]
        built.append(record.task)
        step_to_pb(record, out)

    monkeypatch.setattr(convert, "step_to_pb", counting)
    path = ":memory:" if db == ":memory:" else str(tmp_path / "big.db")
    settings = Settings(listen="127.0.0.1:0", db=path, max_response_bytes=10_000)
    async with serving(settings, registry) as (_, _, stub):
        flow = flow_pb(["echo"], {"echo": ("echo", "end")}, max_steps=50)
        request = flow_service_pb2.ExecuteFlowRequest(flow=flow)
        request.input.update({"blob": "x" * 3000})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert "limit of 10,000" in details
        assert len(built) <= 4, len(built)  # 3 results fit, the 4th does not: 50 ran
        flow_id = re.search(r"execution ([0-9a-f-]{36})", details).group(1)  # type: ignore[union-attr]
        built.clear()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExecution(flow_service_pb2.GetExecutionRequest(flow_id=flow_id))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(built) <= 4, len(built)


# -- the store: errors, health, retention, shutdown ----------------------------------------


async def test_locked_database_is_unavailable_and_health_follows(tmp_path: Path, registry) -> None:
    db = tmp_path / "locked.db"
    settings = Settings(listen="127.0.0.1:0", db=str(db), db_busy_timeout_ms=200)
    server = await build_server(settings, registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            from grpc_health.v1 import health_pb2_grpc

            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
            locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                pending = asyncio.ensure_future(
                    stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=10)
                )
                # While the write waits for the lock, the event loop still answers.
                check = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert check.status in (
                    health_pb2.HealthCheckResponse.SERVING,
                    health_pb2.HealthCheckResponse.NOT_SERVING,
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pending
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "locked" in info.value.details()

                async def not_serving() -> bool:
                    r = await health.Check(health_pb2.HealthCheckRequest())
                    return r.status == health_pb2.HealthCheckResponse.NOT_SERVING

                await eventually(not_serving)
            finally:
                locker.execute("ROLLBACK")
                locker.close()

            async def serving() -> bool:
                r = await health.Check(
                    health_pb2.HealthCheckRequest(service="flowmanager.v1.FlowService")
                )
                return r.status == health_pb2.HealthCheckResponse.SERVING

            await eventually(serving)
            ok = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
            assert ok.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    finally:
        await server.shutdown(grace=0)


async def test_full_database_is_unavailable_not_unknown(tmp_path: Path, registry) -> None:
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "small.db"), db_max_bytes=64 * 1024)
    server = await build_server(settings, registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            big = {"blob": "x" * 2000}
            codes = []
            for _ in range(100):
                request = pb.ExecuteFlowRequest(flow=chain(("echo", big)))
                try:
                    await stub.ExecuteFlow(request, timeout=10)
                except grpc.aio.AioRpcError as err:
                    codes.append((err.code(), err.details()))
                    break
            assert codes, "the database never filled up"
            code, details = codes[0]
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "full" in details
    finally:
        await server.shutdown(grace=0)


async def test_a_submission_too_large_for_the_cap_fails_alone_not_the_flows_beside_it(
    tmp_path: Path, registry
) -> None:
    """A record that does not fit under --db-max-bytes makes SQLite roll back the whole
    transaction, and so the whole batch: the running flows whose small events were
    committed in that batch were stopped with it (UNAVAILABLE, recorded INTERRUPTED),
    though there was room for them. Now the batch is run again job by job, and only the
    submission that does not fit fails. White-box: the store's thread is held, so that
    both are in one batch."""
    started, release, _ = gate(registry)
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "cap.db"), db_max_bytes=1_000_000)
    server = await build_server(settings, registry)
    held = StoreHold(server.manager.store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated")))
            flow_id = (await call.read()).started.flow_id
            await started.wait()
            await held.hold()
            release.set()  # gated's result and the flow's end wait behind the hold
            await eventually(lambda: server.manager._live[flow_id].unpublished == 2)
            too_large = pb.ExecuteFlowRequest(flow=chain("noop"))
            too_large.input.update({"pad": "x" * 1_500_000})
            refused = asyncio.ensure_future(stub.ExecuteFlow(too_large, timeout=20))
            await eventually(lambda: server.manager._starting == 1)  # its record waits
            await held.release()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await refused
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "full" in (info.value.details() or "")
            streamed = await read_all(call)
            assert streamed[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
            assert got.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    finally:
        held.let_go()
        await server.shutdown(grace=0)


async def test_an_execution_the_store_fails_while_the_probe_checks_is_recorded_too(
    tmp_path: Path, registry
) -> None:
    """The store probe records the ends of the executions a store failure stopped, then
    checks that the store can write, and turns healthy. An execution stopped by a failure
    after the probe had taken the ends to record was never recorded: the probe ended
    healthy, and it stayed RUNNING (its watchers and cancels UNAVAILABLE) until another
    failure or the shutdown. Here a result too large for --db-max-bytes fails `second`
    while the probe records `first`'s end. White-box: the store's thread is held."""
    _, release_second, _ = gate(registry)

    @registry.task("too_large")
    async def too_large() -> TaskResult:
        return TaskResult.success({"pad": "x" * 400_000})

    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "probe.db"), db_max_bytes=300_000)
    server = await build_server(settings, registry)
    manager = server.manager
    held = StoreHold(manager.store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            second = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated", "too_large")))
            second_id = (await second.read()).started.flow_id
            first = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("too_large")))
            first_id = (await first.read()).started.flow_id
            await eventually(lambda: first_id in manager._unrecorded)  # the probe starts
            await held.hold()  # before it wakes (0.25 s)
            release_second.set()
            await eventually(lambda: manager._live[second_id].unpublished == 3)  # and its end
            # The probe has woken, and the job that records `first`'s end waits behind them.
            await eventually(lambda: manager.store._jobs.qsize() == 4)
            await held.release()
            await eventually(lambda: manager.store_healthy, limit=20)

            async def recorded(flow_id: str) -> bool:
                got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
                return got.execution.status == flow_pb2.FLOW_STATUS_INTERRUPTED

            await eventually(lambda: recorded(first_id))
            await eventually(lambda: recorded(second_id))
            assert not manager._unrecorded
    finally:
        held.let_go()
        await server.shutdown(grace=0)


async def test_the_store_failure_log_line_says_why(
    tmp_path: Path, registry, caplog: pytest.LogCaptureFixture
) -> None:
    # The operator's one ERROR line for a store that stopped writing named no reason,
    # while every client was told "database or disk is full".
    caplog.set_level(logging.INFO, logger="flowsvc.executions")
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "small.db"), db_max_bytes=64 * 1024)
    async with serving(settings, registry) as (_, _, stub):
        big = {"blob": "x" * 2000}
        for _ in range(100):
            try:
                await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain(("echo", big))), timeout=10)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                break
        else:
            pytest.fail("the database never filled up")
    (failed,) = [r for r in caplog.records if r.getMessage() == "execution store failed"]
    assert failed.levelno == logging.ERROR
    assert "full" in failed.error  # type: ignore[attr-defined]


async def test_a_full_database_frees_room_before_recovery_so_the_server_starts_again(
    tmp_path: Path, registry
) -> None:
    # A server that crashed while its database was full leaves an execution RUNNING. The
    # next start must record its end (with the room kept for ends), and retention must
    # then free room for new flows. Before, that start failed ("database or disk is
    # full"), again and again.

    db = str(tmp_path / "full.db")
    cap = 128 * 1024
    async with serving(Settings(listen="127.0.0.1:0", db=db), registry) as (_, _, stub):
        old = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        cut = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop", "echo")))
    # The state a kill -9 leaves mid-flow (`cut` RUNNING, its last event never written),
    # in a database packed up to the server's cap right where `cut`'s end must go: filler
    # events of an old finished execution whose id sorts just after `cut`'s.
    filler_id = cut.flow_id + "~"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE executions SET status = 'running', message = '', finished_at = NULL"
            " WHERE flow_id = ?",
            (cut.flow_id,),
        )
        conn.execute("DELETE FROM events WHERE flow_id = ? AND kind = 'finished'", (cut.flow_id,))
        conn.execute(
            "INSERT INTO executions (flow_id, flow_name, flow_json, input_json, request_hash,"
            " status, created_at, finished_at) SELECT ?, flow_name, flow_json, input_json,"
            " request_hash, status, created_at, finished_at FROM executions WHERE flow_id = ?",
            (filler_id, old.flow_id),
        )
        # Ended long ago, for retention to take; `cut` ends when the restart records it.
        long_ago = "2000-01-01T00:00:00.000000+00:00"
        conn.execute(
            "UPDATE executions SET created_at = ?, finished_at = ? WHERE flow_id IN (?, ?)",
            (long_ago, long_ago, old.flow_id, filler_id),
        )
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {cap // page_size}")
        sequence = 0
        for size in (4000, 1000, 200, 40, 1):
            while True:
                sequence += 1
                try:
                    conn.execute(
                        "INSERT INTO events (flow_id, sequence, kind, body) VALUES (?, ?, ?, ?)",
                        (filler_id, sequence, "filler", "x" * size),
                    )
                except sqlite3.OperationalError as exc:
                    assert "full" in str(exc)
                    break
    finally:
        conn.close()
    restarted = Settings(listen="127.0.0.1:0", db=db, db_max_bytes=cap, retention_seconds=3600)
    async with serving(restarted, registry) as (_, _, stub):
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=cut.flow_id))).execution
        assert got.status == flow_pb2.FLOW_STATUS_INTERRUPTED
        with pytest.raises(grpc.aio.AioRpcError) as info:  # retention took the old one
            await stub.GetExecution(pb.GetExecutionRequest(flow_id=old.flow_id))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def _fill_with_ends_not_recorded(stub, registry) -> list[str]:
    """Fill a capped database with RUNNING executions only, then fail every one's next
    event for lack of room (a task result of 20 KB): a store that retention cannot free
    (nothing has ended) and whose executions' ends are not recorded. Returns their ids."""
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> TaskResult:
        await release.wait()
        return TaskResult.success({"blob": "x" * 20_000})

    registry.register("held", held)
    calls, ids, size = [], [], 8000
    while size:  # started until not even the smallest fits
        call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain(("held", {"pad": "x" * size}))))
        try:
            ids.append((await call.read()).started.flow_id)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            size //= 2
            continue
        calls.append(call)
    release.set()
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_all(call)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "full" in (info.value.details() or "")
    return ids


async def test_a_database_full_of_executions_whose_end_was_not_written_recovers(
    tmp_path: Path, registry
) -> None:
    # A database full of executions a store failure stopped stayed NOT_SERVING for
    # good: their ends (INTERRUPTED) could not be written for lack of room, retention
    # deletes only ended executions, so nothing ever freed room, and the write check
    # (which came before recording the ends) failed every 0.25 s. Ends are now written
    # with the store's reserve; retention then frees their room, and the store is back.
    db = tmp_path / "full.db"
    cap = 256 * 1024
    settings = Settings(listen="127.0.0.1:0", db=str(db), db_max_bytes=cap, retention_seconds=1)
    async with serving(settings, registry) as (server, _, stub):
        ids = await _fill_with_ends_not_recorded(stub, registry)
        assert len(ids) > 10
        assert not server.manager.store_healthy

        async def ended_or_gone() -> bool:
            for flow_id in ids:
                try:
                    got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND  # retention took it
                    continue
                if got.execution.status != flow_pb2.FLOW_STATUS_INTERRUPTED:
                    return False
            return True

        await eventually(ended_or_gone)
        await eventually(lambda: server.manager.store_healthy)
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert db.stat().st_size <= cap  # the reserve sits within the cap


def _snapshot(db: Path, snapshot: Path) -> None:
    """A copy of a live database, as a crash would leave it."""
    with sqlite3.connect(db) as source, sqlite3.connect(snapshot) as target:
        source.backup(target)
    source.close()
    target.close()


def _running(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        running = conn.execute("SELECT COUNT(*) FROM executions WHERE status = 'running'")
        count: int = running.fetchone()[0]
    conn.close()
    return count


async def _restart_records_every_end(settings: Settings, registry) -> None:
    """Start on a crashed full database: the ends of its RUNNING executions are recorded
    first (the start may still fail "full": retention frees their room once they are
    old, 1 ms here), and the next start serves."""
    from flowsvc.errors import StoreUnavailableError

    restarted = dataclasses.replace(settings, retention_seconds=0.001)
    try:
        await (await build_server(restarted, registry)).shutdown(grace=0)
    except StoreUnavailableError as exc:
        assert "full" in str(exc)
    assert _running(Path(restarted.db)) == 0
    async with serving(restarted, registry) as (_, _, stub):
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_a_server_restarted_on_a_database_full_of_running_executions_starts(
    tmp_path: Path, registry
) -> None:
    # The same database as a crash leaves it (a snapshot taken while full): a restart at
    # the same cap failed, "database or disk is full", every time: the write check came
    # before crash recovery, which needs room to record the ends it writes.
    db, snapshot = tmp_path / "full.db", tmp_path / "crashed.db"
    cap = 256 * 1024
    settings = Settings(listen="127.0.0.1:0", db=str(db), db_max_bytes=cap)
    async with serving(settings, registry) as (_, _, stub):
        ids = await _fill_with_ends_not_recorded(stub, registry)
        _snapshot(db, snapshot)
    assert _running(snapshot) == len(ids)
    await _restart_records_every_end(dataclasses.replace(settings, db=str(snapshot)), registry)
    assert snapshot.stat().st_size <= cap


async def test_a_restart_records_the_ends_of_many_small_executions_a_full_database_holds(
    tmp_path: Path, registry
) -> None:
    # Crash recovery lifted the cap by one record and 16 KiB: a full database of a few
    # hundred small RUNNING executions needs more for their ends' events, so recording
    # them failed "database or disk is full" at every restart, and nothing ever ended
    # for retention to free. The room now counts every end.
    db, snapshot = tmp_path / "full.db", tmp_path / "crashed.db"
    settings = Settings(
        listen="127.0.0.1:0", db=str(db), db_max_bytes=256 * 1024, max_in_flight=10_000
    )
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> TaskResult:
        await release.wait()
        return TaskResult.success()

    registry.register("held", held)
    async with serving(settings, registry) as (_, _, stub):
        while True:  # small executions started until the database is full
            call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("held")))
            try:
                await call.read()
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                break
        _snapshot(db, snapshot)
        release.set()
    assert _running(snapshot) > 100
    await _restart_records_every_end(dataclasses.replace(settings, db=str(snapshot)), registry)


async def test_retention_deletes_old_finished_executions(tmp_path: Path, registry) -> None:
    settings = Settings(listen="127.0.0.1:0", db=":memory:", retention_seconds=0.5)
    server = await build_server(settings, registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))

            async def gone() -> bool:
                try:
                    await stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))
                except grpc.aio.AioRpcError as err:
                    return err.code() == grpc.StatusCode.NOT_FOUND
                return False

            await eventually(gone, limit=15)
    finally:
        await server.shutdown(grace=0)


async def test_retention_and_the_store_probe_outlive_an_unexpected_error(
    tmp_path: Path, registry, caplog
) -> None:
    # An error other than the store's own (a bug) ended the retention loop, or the store
    # probe, for good and unseen: no execution was deleted again (the database grew for
    # ever), or health stayed NOT_SERVING once the store could write again.
    from flowsvc.errors import StoreUnavailableError

    caplog.set_level(logging.ERROR, logger="flowsvc.executions")
    settings = Settings(listen="127.0.0.1:0", db=":memory:", retention_seconds=0.5)
    async with serving(settings, registry) as (server, channel, stub):
        store = server.manager.store
        failures = {"delete_finished_before": 1, "check_writable": 3}

        def failing_once(name: str) -> Any:
            method = getattr(store, name)

            async def call(*args: Any, **kwargs: Any) -> Any:
                if failures[name]:
                    failures[name] -= 1
                    raise RuntimeError(f"injected: {name}")
                return await method(*args, **kwargs)

            return call

        for name in failures:
            setattr(store, name, failing_once(name))
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        server.manager._set_store_health(False, StoreUnavailableError("injected"))
        health = health_pb2_grpc.HealthStub(channel)

        async def recovered() -> bool:
            try:
                await stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))
                return False
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    return False
            checked = await health.Check(health_pb2.HealthCheckRequest())
            return checked.status == health_pb2.HealthCheckResponse.SERVING

        await eventually(recovered, limit=15)
    assert failures == {"delete_finished_before": 0, "check_writable": 0}
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert {"retention sweep failed", "store probe failed"} <= set(logged)
    # The same error again and again (a probe every 0.25 s) is logged once.
    assert logged.count("store probe failed") == 1


async def test_a_large_input_or_flow_is_converted_and_checked_off_the_event_loop(
    registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 3.6 MB input of 900,000 nulls (or params of as many) took 1.3 s of conversion and
    # checks on the event loop: every flow and health check waited (p46 measured a 1.4 s
    # gap between health answers; 0.1 s once they run in a thread).
    from flowsvc import convert, executions

    where: dict[str, list[bool]] = {"convert": [], "check": []}
    convert_struct, too_deep = convert.struct_from_pb, executions.nested_too_deep

    def struct_from_pb(struct: Any, field: str = "", *args: Any) -> Any:
        if field in ("input", "flow.tasks[0].params"):
            where["convert"].append(on_event_loop())
        return convert_struct(struct, field, *args)

    def nested_too_deep(value: Any, *args: Any) -> bool:
        where["check"].append(on_event_loop())
        return too_deep(value, *args)

    monkeypatch.setattr(convert, "struct_from_pb", struct_from_pb)
    monkeypatch.setattr(executions, "nested_too_deep", nested_too_deep)
    big = ["x" * 8] * 10_000  # about 100 KB serialized

    def request(flow: flow_pb2.Flow, value: Any) -> pb.ExecuteFlowRequest:
        out = pb.ExecuteFlowRequest(flow=flow)
        out.input.update({"a": value})
        return out

    async with serving(Settings(listen="127.0.0.1:0", db=":memory:"), registry) as (_, _, stub):
        small = chain(("echo", {"n": 1}))
        await stub.ExecuteFlow(request(small, 1))
        assert where == {"convert": [True, True], "check": [True]}  # small: on the loop
        for found in where.values():
            found.clear()
        await stub.ExecuteFlow(request(small, big))
        await stub.ExecuteFlow(request(chain(("echo", {"n": big})), 1))
    # The large input in a thread; then the small input on the loop and the large flow's
    # params in a thread. (The small flow of the second call came from the cache of
    # prepared flows: not converted again.)
    assert where == {"convert": [False, True, False], "check": [False, True]}


async def test_a_large_flow_is_validated_off_the_event_loop(
    stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ValidateFlow converted and validated a large flow on the event loop when
    # ExecuteFlow and StreamFlow had moved it to a thread: a 3.6 MB flow held every flow
    # and health check 1.4 s. Same answer either way.
    from flowsvc import convert

    where: list[bool] = []
    convert_struct = convert.struct_from_pb

    def struct_from_pb(struct: Any, field: str = "", *args: Any) -> Any:
        if field == "flow.tasks[0].params":
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                where.append(False)
            else:
                where.append(True)
        return convert_struct(struct, field, *args)

    monkeypatch.setattr(convert, "struct_from_pb", struct_from_pb)
    answers = []
    for size in (10, 100_000):  # the second over OFF_LOOP_BYTES
        flow = chain(("nosuch", {"pad": "p" * size}))
        answers.append(await stub.ValidateFlow(pb.ValidateFlowRequest(flow=flow)))
    assert where == [True, False]
    assert answers[0] == answers[1] and len(answers[0].violations) == 1, answers[0]


async def test_a_large_flow_built_after_its_caller_left_is_still_cached(
    stub, server: FlowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A large flow is built in a thread. A caller whose deadline passed while it was
    # built left the flow out of the cache: a client retrying with the same deadline
    # had it built again, and cancelled again, on every try (on the loop, before the
    # build moved to a thread, the first try cached it and the second was answered).
    from flowsvc.executions import ExecutionManager

    go, built = threading.Event(), []
    build = ExecutionManager._build

    def held_build(self: ExecutionManager, *args: Any) -> Any:
        built.append(1)
        go.wait(10)
        return build(self, *args)

    monkeypatch.setattr(ExecutionManager, "_build", held_build)
    flow = chain("noop")
    flow.tasks[0].description = "d" * 100_000  # over OFF_LOOP_BYTES: built in a thread
    try:
        with pytest.raises(grpc.aio.AioRpcError) as left:
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow), timeout=0.2)
        assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        go.set()
    await eventually(lambda: len(server.manager._prepared) == 1)
    resp = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow), timeout=10)
    assert resp.status == flow_pb2.FLOW_STATUS_SUCCEEDED, resp.message
    assert len(built) == 1  # the retry found it in the cache


async def test_shutdown_gives_its_grace_to_an_execution_whose_record_is_being_written(
    tmp_path: Path, registry
) -> None:
    """A start that passed the draining check is accepted: it runs, and gets the grace
    period like any other. Before, a shutdown that began while its record was written
    counted no running flow, went on at once, and cut the call short two seconds later
    (UNAVAILABLE; recorded CANCELLED, "the caller went away"). White-box: the store's
    thread is held, so that the record waits to be written while the shutdown begins."""
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "starting.db"))
    server = await build_server(settings, registry)
    started, release, _ = gate(registry)
    held = StoreHold(server.manager.store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            await held.hold()
            execute = asyncio.ensure_future(
                stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("gated")), timeout=20)
            )
            await eventually(lambda: server.manager._starting == 1)  # its record waits
            shutdown = asyncio.ensure_future(server.shutdown(grace=10))
            await eventually(lambda: server.manager.draining)
            await held.release()
            await started.wait()
            # The shutdown waits for it: it has not gone on to end the calls.
            assert not server.health._closing.is_set()
            release.set()
            executed = await execute
            assert executed.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            await shutdown
    finally:
        held.let_go()
        await server.shutdown(grace=0)
    async with serving(settings, registry) as (_, _, stub):
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=executed.flow_id))).execution
        assert got.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_an_execution_launched_after_the_grace_period_is_stopped_too(
    tmp_path: Path, registry
) -> None:
    """An execution whose record was still being written when the grace period ended is
    stopped as soon as it is launched, like every other: CANCELLED ("the server is
    shutting down"), its call OK. Before, stop_all() had missed it (not running yet): its
    task ran on, was cut off as if it ignored its cancellation, and the execution was
    recorded INTERRUPTED, its call UNAVAILABLE. White-box: the store's thread is held."""
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "late.db"))
    server = await build_server(settings, registry)
    _, _, cancelled = gate(registry)
    held = StoreHold(server.manager.store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            await held.hold()
            execute = asyncio.ensure_future(
                stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("gated")), timeout=20)
            )
            await eventually(lambda: server.manager._starting == 1)  # its record waits
            shutdown = asyncio.ensure_future(server.shutdown(grace=0.1))
            await eventually(lambda: server.flows_stopped_at is not None)  # grace over
            await held.release()
            executed = await execute
            await shutdown
    finally:
        held.let_go()
        await server.shutdown(grace=0)
    assert executed.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert "shutting down" in executed.message
    assert cancelled == []  # stopped before its task started
    async with serving(settings, registry) as (_, _, stub):
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=executed.flow_id))).execution
        assert got.status == flow_pb2.FLOW_STATUS_CANCELLED


async def test_a_record_written_only_as_the_store_closes_is_not_taken_for_a_crash(
    tmp_path: Path, registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A record still being written when the server has ended its calls (its store held
    all through the shutdown): its execution is launched and stopped before the store
    closes, recorded CANCELLED. Before, the store closed behind the record: left RUNNING
    with no event, the next start took it for one a crash had cut off, and a store probe
    ran on after close. White-box: the store's thread is held."""
    caplog.set_level(logging.INFO, logger="flowsvc.executions")
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "closing.db"))
    server = await build_server(settings, registry)
    gate(registry)
    held = StoreHold(server.manager.store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            await held.hold()
            execute = asyncio.ensure_future(
                stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("gated")), timeout=20)
            )
            await eventually(lambda: server.manager._starting == 1)  # its record waits
            shutdown = asyncio.ensure_future(server.shutdown(grace=0.1))
            await eventually(execute.done)  # the server has ended its calls
            await held.release()
            await shutdown
            assert server.manager._probe is None
    finally:
        held.let_go()
        await server.shutdown(grace=0)
    assert not [r for r in caplog.records if r.getMessage() == "execution store failed"]
    async with serving(settings, registry) as (_, _, stub):
        (listed,) = (await stub.ListExecutions(pb.ListExecutionsRequest())).executions
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=listed.flow_id))).execution
        assert got.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert not [r for r in caplog.records if r.getMessage() == "execution interrupted by a crash"]


async def test_shutdown_records_running_executions_cancelled(tmp_path: Path, registry) -> None:
    db = str(tmp_path / "shutdown.db")
    settings = Settings(listen="127.0.0.1:0", db=db)
    started, _, _ = gate(registry)
    server = await build_server(settings, registry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = flow_service_pb2_grpc.FlowServiceStub(channel)
        request = pb.StreamFlowRequest(flow=chain("gated"), continue_on_disconnect=True)
        call = stub.StreamFlow(request)
        flow_id = (await call.read()).started.flow_id
        await started.wait()
        call.cancel()  # nobody is attached any more; it keeps running
        await server.shutdown(grace=0.2)
    async with serving(settings, registry) as (_, _, stub):
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
        assert got.status == flow_pb2.FLOW_STATUS_CANCELLED
        assert "shutting down" in got.message


async def test_a_task_back_after_its_cut_off_is_not_an_internal_error(
    tmp_path: Path, registry, caplog
) -> None:
    """A task ignores every cancellation, so shutdown cuts its execution off (recorded
    INTERRUPTED). When it does come back, its drive ends quietly: no "execution drive
    failed" error with a traceback, which says a bug, and the record keeps its reason."""
    caplog.set_level(logging.INFO, logger="flowsvc.executions")
    release, ignored = asyncio.Event(), []

    @registry.task("very_stubborn")
    async def very_stubborn() -> TaskResult:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                ignored.append(True)
        return TaskResult.success()

    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "back.db"))
    server = await build_server(settings, registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            request = pb.StreamFlowRequest(flow=chain("very_stubborn"), continue_on_disconnect=True)
            call = stub.StreamFlow(request)
            flow_id = (await call.read()).started.flow_id
            run = server.manager._live[flow_id]
            shutdown = asyncio.ensure_future(server.shutdown(grace=0.1))
            await eventually(lambda: run.error is not None)  # cut off
            release.set()
            await eventually(lambda: run.task is not None and run.task.done())
            await shutdown
    finally:
        release.set()
        await server.shutdown(grace=0)
    assert len(ignored) >= 2
    failed = [r for r in caplog.records if r.getMessage() == "execution drive failed"]
    assert failed == []
    async with serving(settings, registry) as (_, _, stub):
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
        assert got.status == flow_pb2.FLOW_STATUS_INTERRUPTED
        assert "ignored cancellation" in got.message


async def test_a_second_server_on_the_same_database_is_refused(tmp_path: Path, registry) -> None:
    # Two servers on one file would each take the other's running executions for ones a
    # crash left behind and mark them INTERRUPTED under it.

    from flowsvc.errors import StoreUnavailableError

    db = str(tmp_path / "shared.db")
    settings = Settings(listen="127.0.0.1:0", db=db)
    started, release, _ = gate(registry)
    async with serving(settings, registry) as (_, _, stub):
        call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated", "noop")))
        flow_id = (await call.read()).started.flow_id
        await started.wait()
        with pytest.raises(StoreUnavailableError, match="in use by another flowsvc server"):
            await build_server(settings, registry)
        release.set()
        rest = await read_all(call)
        assert rest[-1].finished.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert [m.task_result.task for m in rest[:-1]] == ["gated", "noop"]
    # Once the first has stopped, the lock is free again and nothing was interrupted.
    async with serving(settings, registry) as (_, _, stub):
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
        assert got.status == flow_pb2.FLOW_STATUS_SUCCEEDED


async def test_schema_is_versioned_and_a_newer_one_is_refused(tmp_path: Path, registry) -> None:
    db = tmp_path / "versioned.db"
    server = await build_server(Settings(listen="127.0.0.1:0", db=str(db)), registry)
    await server.shutdown(grace=0)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("PRAGMA user_version = 99")
    from flowsvc.errors import StoreUnavailableError

    with pytest.raises(StoreUnavailableError, match="schema version 99"):
        await build_server(Settings(listen="127.0.0.1:0", db=str(db)), registry)
    # The refused start let go of the database: it opens again once its schema is known.
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 1")
    server = await build_server(Settings(listen="127.0.0.1:0", db=str(db)), registry)
    await server.shutdown(grace=0)


def _insert_executions(db: Path, statuses: list[str], flow_name: str) -> list[str]:
    """Ended executions written straight into the database (as many as a busy server
    keeps for a week, fast); their ids in creation order."""
    ids = [str(uuid.uuid4()) for _ in statuses]
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO executions (flow_id, flow_name, flow_json, input_json, request_hash,"
            " status, created_at, finished_at) VALUES (?, ?, '{}', '{}', '', ?, ?, ?)",
            [
                (
                    flow_id,
                    flow_name,
                    status,
                    "2026-01-01T00:00:00+00:00",
                    "2026-01-01T00:00:01+00:00",
                )
                for flow_id, status in zip(ids, statuses, strict=True)
            ],
        )
    return ids


async def test_listing_by_status_and_flow_name_reads_an_index_not_every_run_of_that_name(
    tmp_path: Path, registry
) -> None:
    # "Which onboarding runs failed?": filtered both ways, ListExecutions read every
    # execution of that name through the name's index (30 ms per 100,000 of them, on the
    # thread every commit waits for, and again for each page). Every combination of the
    # filters now reads an index made for it, with no sort.
    from flowsvc.models import FlowStatus
    from flowsvc.store.sqlite import page_query

    db = tmp_path / "list.db"
    statuses = ["failed" if i % 500 == 7 else "succeeded" for i in range(2000)]
    async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, _, stub):
        ids = _insert_executions(db, statuses, "onboarding")
        failed = [f for f, s in zip(ids, statuses, strict=True) if s == "failed"][::-1]
        listed = await stub.ListExecutions(
            flow_service_pb2.ListExecutionsRequest(
                status=flow_pb2.FLOW_STATUS_FAILED, flow_name="onboarding", page_size=3
            )
        )
        assert [e.flow_id for e in listed.executions] == failed[:3]  # newest first
        rest = await stub.ListExecutions(
            flow_service_pb2.ListExecutionsRequest(
                status=flow_pb2.FLOW_STATUS_FAILED,
                flow_name="onboarding",
                page_size=3,
                page_token=listed.next_page_token,
            )
        )
        assert [e.flow_id for e in rest.executions] == failed[3:]
    with sqlite3.connect(db) as conn:
        for status in (None, FlowStatus.FAILED):
            for name in (None, "onboarding"):
                for before in (None, 1000):
                    sql, args = page_query(50, before, status, name)
                    plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
                    assert "TEMP B-TREE" not in plan, plan  # no sort of what it read
                    if status is not None and name is not None:
                        assert "USING INDEX executions_by_name_status" in plan, plan
                    elif status is not None or name is not None:
                        assert plan.startswith("SEARCH executions USING INDEX"), plan


async def test_a_database_from_before_an_index_gets_it_at_start_and_keeps_its_version(
    tmp_path: Path, registry, caplog
) -> None:
    # Indexes added later are made at start, with no new schema version: a flowsvc from
    # before them (a deploy rolled back) still opens the file, where a new version would
    # be refused.
    from flowsvc.store.sqlite import ADDED_INDEXES

    caplog.set_level(logging.INFO, logger="flowsvc.store")
    db = tmp_path / "older.db"
    server = await build_server(Settings(listen="127.0.0.1:0", db=str(db)), registry)
    await server.shutdown(grace=0)
    assert not [r for r in caplog.records if r.getMessage() == "store index created"]
    names = [name for name, _ in ADDED_INDEXES]
    assert "executions_by_name_status" in names
    with sqlite3.connect(db) as conn:
        for name in names:
            conn.execute(f"DROP INDEX {name}")
    server = await build_server(Settings(listen="127.0.0.1:0", db=str(db)), registry)
    await server.shutdown(grace=0)
    created = [r for r in caplog.records if r.getMessage() == "store index created"]
    assert [r.index for r in created] == names  # type: ignore[attr-defined]
    with sqlite3.connect(db) as conn:
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert set(names) <= indexes
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


async def test_a_database_too_full_for_a_new_index_opens_without_it(tmp_path: Path, caplog) -> None:
    # A full database must still start (crash recovery and retention need it to): the
    # index is left for a start with room, and said so.
    from flowsvc.store.sqlite import ADDED_INDEXES, SQLiteStore

    caplog.set_level(logging.INFO, logger="flowsvc.store")
    db = tmp_path / "full.db"
    store = SQLiteStore(str(db))
    await store.open()
    await store.close()
    _insert_executions(db, ["succeeded"] * 3000, "onboarding")
    with sqlite3.connect(db) as conn:
        for name, _ in ADDED_INDEXES:
            conn.execute(f"DROP INDEX {name}")
        conn.execute("VACUUM")  # no free page left for the index to take
    full = SQLiteStore(str(db), max_bytes=db.stat().st_size)
    await full.open()
    await full.close()
    warned = [r for r in caplog.records if r.getMessage().startswith("store index not created")]
    assert "executions_by_name_status" in [r.index for r in warned]  # type: ignore[attr-defined]
    roomy = SQLiteStore(str(db))
    await roomy.open()
    await roomy.close()
    with sqlite3.connect(db) as conn:
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {name for name, _ in ADDED_INDEXES} <= indexes


async def test_a_job_that_fails_unexpectedly_when_run_alone_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch with a failing job is run again one job a transaction. An unexpected error
    # there (a bug, MemoryError's kin) escaped the store's thread and ended it: every
    # later call, each execution's events, waited for ever.
    from flowsvc.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "jobs.db"))
    await store.open()
    try:
        held, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            held.set()
            release.wait(10)

        def bad(conn: sqlite3.Connection) -> None:
            raise sqlite3.IntegrityError("fails the batch: its jobs run again one by one")

        def good(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('good', 'yes')")
            return "done"

        alone = SQLiteStore._transaction

        def transaction(self: SQLiteStore, conn: sqlite3.Connection, batch: list) -> None:
            if len(batch) == 1 and batch[0].fn is bad:
                raise RuntimeError("injected: the bug")
            alone(self, conn, batch)

        monkeypatch.setattr(SQLiteStore, "_transaction", transaction)
        holding = store._submit(hold, write=False)
        await asyncio.to_thread(held.wait, 10)
        failing, passing = store._submit(bad, write=True), store._submit(good, write=True)
        release.set()
        await holding
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(failing, 10)
        assert await asyncio.wait_for(passing, 10) == "done"
        # The thread serves on.
        assert await asyncio.wait_for(store._call(good, write=True), 10) == "done"
    finally:
        release.set()
        await store.close()


async def test_cancel_while_the_builtin_sleep_task_runs(stub) -> None:
    call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain(("sleep", {"seconds": 60}), "noop")))
    flow_id = (await call.read()).started.flow_id

    async def running() -> bool:
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
        return got.execution.status == flow_pb2.FLOW_STATUS_RUNNING

    await eventually(running)
    t0 = time.monotonic()
    response = await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id), timeout=10)
    assert time.monotonic() - t0 < 30  # the 60 s sleep was cut short, not waited out
    assert response.execution.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert list(response.execution.execution_history) == []
    rest = await read_all(call)
    assert [m.WhichOneof("event") for m in rest] == ["finished"]


async def test_store_failure_mid_run_ends_the_stream_and_records_interrupted(
    tmp_path: Path, registry
) -> None:
    db = tmp_path / "midrun.db"
    started, release, _ = gate(registry)
    server = await build_server(
        Settings(listen="127.0.0.1:0", db=str(db), db_busy_timeout_ms=200), registry
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("noop", "gated", "noop_2")))
            registry.register("noop_2", registry.get("noop").fn)
            seen = [await call.read(), await call.read()]  # started, noop
            flow_id = seen[0].started.flow_id
            await started.wait()
            locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                release.set()  # gated's result cannot be committed, so it is never sent
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await read_all(call)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                # Until its end is recorded: no stream that ends without `finished`, no
                # "has already ended (running)".
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await read_all(stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id)))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "recorded as soon as the store can write" in (info.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id))
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                locker.execute("ROLLBACK")
                locker.close()

            async def interrupted() -> bool:
                got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
                return got.execution.status == flow_pb2.FLOW_STATUS_INTERRUPTED and got

            got = (await eventually(interrupted)).execution
            assert "store failed" in got.message
            assert [r.task for r in got.execution_history] == ["noop"]  # what was sent, only
            watched = [
                m async for m in stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
            ]
            assert [m.sequence for m in watched] == [1, 2, 3]
    finally:
        await server.shutdown(grace=0)


async def test_executions_a_store_failure_stopped_are_forgotten_once_recorded(
    tmp_path: Path, registry
) -> None:
    """The store keeps the executions an event failed to commit for (no later event of
    theirs may commit) only until their end is recorded: it kept them for ever, a set that
    grew with every store failure of a server that runs for weeks."""
    db = tmp_path / "forgotten.db"
    started, release, _ = gate(registry)
    registry.register("noop_2", registry.get("noop").fn)
    server = await build_server(
        Settings(listen="127.0.0.1:0", db=str(db), db_busy_timeout_ms=200), registry
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            flow = chain("noop", "gated", "noop_2")
            calls = [stub.StreamFlow(pb.StreamFlowRequest(flow=flow)) for _ in range(20)]
            ids = [(await call.read()).started.flow_id for call in calls]
            await started.wait()
            locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                release.set()  # their results cannot be committed
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await read_all(call)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert server.manager.store._broken
            finally:
                locker.execute("ROLLBACK")
                locker.close()

            async def interrupted() -> bool:
                for flow_id in ids:
                    got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
                    if got.execution.status != flow_pb2.FLOW_STATUS_INTERRUPTED:
                        return False
                return True

            await eventually(interrupted)
            assert not server.manager.store._broken
    finally:
        await server.shutdown(grace=0)


async def test_a_cancel_whose_end_cannot_be_committed_is_unavailable(
    tmp_path: Path, registry
) -> None:
    """The cancel stops the execution, but its `finished` event cannot be committed (the
    database is locked): the record still says RUNNING. The cancel is UNAVAILABLE, like
    its stream, never OK with status RUNNING; the end is recorded once the store is back."""
    db = tmp_path / "cancel-locked.db"
    started, _, cancelled = gate(registry)
    settings = Settings(listen="127.0.0.1:0", db=str(db), db_busy_timeout_ms=200)
    async with serving(settings, registry) as (_, _, stub):
        call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("gated")))
        flow_id = (await call.read()).started.flow_id
        await started.wait()
        locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "locked" in (info.value.details() or "")
            assert cancelled == [flow_id]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_all(call)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            locker.execute("ROLLBACK")
            locker.close()

        async def interrupted() -> bool:
            got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
            return got.execution.status == flow_pb2.FLOW_STATUS_INTERRUPTED

        await eventually(interrupted)


async def _newest_flow_id(stub) -> str:
    return (await stub.ListExecutions(pb.ListExecutionsRequest())).executions[0].flow_id


async def test_cancel_of_an_execute_flow_while_its_caller_waits(stub, registry) -> None:
    started, _, cancelled = gate(registry)
    execute = asyncio.ensure_future(
        stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop", "gated", "echo")), timeout=10)
    )
    await started.wait()
    flow_id = await _newest_flow_id(stub)
    watch = stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
    response = await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id))
    assert response.execution.status == flow_pb2.FLOW_STATUS_CANCELLED
    result = await execute  # the caller gets the cancelled execution, with OK
    assert result.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert [r.task for r in result.execution_history] == ["noop"]
    assert cancelled == [flow_id]
    watched = await read_all(watch)
    assert watched[-1].finished.status == flow_pb2.FLOW_STATUS_CANCELLED


async def test_execute_flow_caller_leaving_ends_it_for_its_watchers_too(stub, registry) -> None:
    started, _, cancelled = gate(registry)
    execute = asyncio.ensure_future(
        stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("gated", "echo")), timeout=10)
    )
    await started.wait()
    flow_id = await _newest_flow_id(stub)
    watch = stub.WatchExecution(pb.WatchExecutionRequest(flow_id=flow_id))
    assert (await watch.read()).WhichOneof("event") == "started"
    execute.cancel()  # the caller goes away
    rest = await read_all(watch)
    assert await watch.code() == grpc.StatusCode.OK
    assert [m.WhichOneof("event") for m in rest] == ["finished"]
    assert rest[0].finished.status == flow_pb2.FLOW_STATUS_CANCELLED
    assert rest[0].sequence == 2
    got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
    assert got.status == flow_pb2.FLOW_STATUS_CANCELLED and "caller went away" in got.message
    assert cancelled == [flow_id]


# -- text no store or client could take --------------------------------------------------


async def test_a_lone_surrogate_from_a_task_fails_that_task_and_nothing_else(
    registry, stub
) -> None:
    """A str with a lone surrogate cannot be stored (UTF-8) nor sent (protobuf): the task's
    result fails with a clear error, escaped error text is kept, and the store goes on."""

    @registry.task("surrogate_data")
    async def surrogate_data() -> TaskResult:
        return TaskResult.success({"name": "caf\udce9"})

    @registry.task("surrogate_error")
    async def surrogate_error() -> TaskResult:
        raise ValueError("bad byte \udcff in input")

    executed = await stub.ExecuteFlow(
        pb.ExecuteFlowRequest(flow=chain("surrogate_data")), timeout=10
    )
    assert executed.status == flow_pb2.FLOW_STATUS_FAILED
    (result,) = executed.execution_history
    assert result.status == flow_pb2.TASK_STATUS_FAILURE
    assert "data.name is a string with a lone surrogate" in result.error

    raised = await stub.ExecuteFlow(
        pb.ExecuteFlowRequest(flow=chain("surrogate_error")), timeout=10
    )
    (result,) = raised.execution_history
    assert result.error == "ValueError: bad byte \\udcff in input"

    # Both were recorded as they were answered, and the store still takes new executions.
    for answered in (executed, raised):
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=answered.flow_id))
        assert got.execution.execution_history[0].error == answered.execution_history[0].error
    after = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=10)
    assert after.status == flow_pb2.FLOW_STATUS_SUCCEEDED


# -- back-pressure of the commit pipeline ---------------------------------------------------


async def test_an_engine_faster_than_its_commits_waits_and_loses_nothing(
    stub, settings, monkeypatch
) -> None:
    """The engine may run ahead of the store by MAX_UNCOMMITTED events; past that it
    waits. With a tiny limit, a 200-step loop of no-ops must wait many times (SQLite) and
    still have every result committed, in order, and streamed in order."""
    from flowsvc import executions

    monkeypatch.setattr(executions, "MAX_UNCOMMITTED", 2)
    waits = []
    real_wait = executions.Run.commits_down_to

    async def counting_wait(run, count: int) -> None:
        waits.append(count)
        await real_wait(run, count)

    monkeypatch.setattr(executions.Run, "commits_down_to", counting_wait)
    loop = flow_pb(["noop"], {"noop": ("noop", "end")}, max_steps=200)
    streamed = [m async for m in stub.StreamFlow(pb.StreamFlowRequest(flow=loop))]
    assert [m.sequence for m in streamed] == list(range(1, 203))
    assert [m.task_result.step for m in streamed[1:-1]] == list(range(1, 201))
    assert streamed[-1].finished.status == flow_pb2.FLOW_STATUS_FAILED  # max_steps reached
    flow_id = streamed[0].started.flow_id
    got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))).execution
    assert [r.step for r in got.execution_history] == list(range(1, 201))
    assert got.last_sequence == 202
    if settings.db != ":memory:":
        # Commits in a thread lag the engine: it had to wait (down to half the limit).
        assert 1 in waits
    else:
        # The in-memory store commits at once: the engine never waits.
        assert 1 not in waits


async def test_retention_of_many_executions_never_holds_up_the_flows(
    tmp_path: Path, registry
) -> None:
    # Retention deleted every expired execution in one statement, one transaction: 200,000
    # of them held the store's thread for 7.5 s, and every flow waited that long for its
    # commits. It deletes them a batch at a time now, so that other writes come between.
    from datetime import UTC, datetime, timedelta

    from flowsvc.executions import RETENTION_BATCH

    db = str(tmp_path / "many.db")
    settings = Settings(listen="127.0.0.1:0", db=db, retention_seconds=3600)
    async with serving(settings, registry) as (server, _, stub):
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        expired = 10 * RETENTION_BATCH
        long_ago = (datetime.now(UTC) - timedelta(days=1)).isoformat(timespec="microseconds")
        with sqlite3.connect(db, timeout=10) as conn:  # beside the server: WAL lets it
            conn.executemany(
                "INSERT INTO executions (flow_id, flow_name, flow_json, input_json,"
                " request_hash, status, created_at, finished_at) SELECT ?, flow_name,"
                " flow_json, input_json, request_hash, status, ?, ? FROM executions"
                " WHERE flow_id = ?",
                [(str(uuid.uuid4()), long_ago, long_ago, done.flow_id) for _ in range(expired)],
            )
        sweep = asyncio.ensure_future(server.manager._sweep())
        await asyncio.sleep(0)  # the sweep's first batch is queued
        flowed = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=30)
        assert flowed.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert not sweep.done(), "the flow waited for the whole sweep"
        await sweep
        with sqlite3.connect(db) as conn:
            (left,) = conn.execute("SELECT COUNT(*) FROM executions").fetchone()
        assert left == 2  # the two recent ones


async def test_retention_of_many_executions_in_memory_takes_each_batch_as_found(
    registry,
) -> None:
    # The in-memory store listed every expired execution for each batch of 500, then kept
    # the first 500: a sweep grew with the square of what had expired, and held the
    # event loop all along (100,000: 0.4 s; a million: about a minute).
    import dataclasses
    from datetime import UTC, datetime, timedelta

    from flowsvc.executions import RETENTION_BATCH

    class Counted(dict):
        examined = 0

        def items(self):
            for item in super().items():
                self.examined += 1
                yield item

    settings = Settings(listen="127.0.0.1:0", db=":memory:", retention_seconds=3600)
    async with serving(settings, registry) as (server, _, stub):
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        store = server.manager.store
        entry = store._entries[done.flow_id]
        long_ago = datetime.now(UTC) - timedelta(days=1)
        expired = 10 * RETENTION_BATCH
        entries = Counted(
            (f"old-{i}", dataclasses.replace(entry, finished_at=long_ago)) for i in range(expired)
        )
        entries.update(store._entries)
        store._entries = entries
        await server.manager._sweep()
        assert list(store._entries) == [done.flow_id]
        assert entries.examined < 2 * expired


async def test_the_write_ahead_log_shrinks_back_after_a_long_outside_read(
    tmp_path: Path, registry
) -> None:
    # A read held open from outside (a backup, an operator's sqlite3 shell) keeps the
    # WAL from being checkpointed, so it grows: 70 MB here. Once the read ended it was
    # checkpointed again, but the file stayed 70 MB for the server's whole life.
    from flowsvc.store.sqlite import WAL_SIZE_LIMIT

    db = tmp_path / "wal.db"
    wal = tmp_path / "wal.db-wal"
    settings = Settings(listen="127.0.0.1:0", db=str(db))
    big = chain(("echo", {"pad": "x" * 100_000}))
    async with serving(settings, registry) as (_, _, stub):
        await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=big))
        reader = sqlite3.connect(db, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM events").fetchone()
            while wal.stat().st_size <= 2 * WAL_SIZE_LIMIT:
                await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=big))
        finally:
            reader.close()
        for _ in range(200):
            if wal.stat().st_size <= WAL_SIZE_LIMIT:
                break
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=big))
        assert wal.stat().st_size <= WAL_SIZE_LIMIT


async def test_a_full_database_is_not_reported_writable_while_flows_fail(
    tmp_path: Path, registry
) -> None:
    # The store's write check rewrote one small row in place, which a full database
    # still takes: 0.25 s after the first failure health was SERVING again, and stayed
    # so, while every ExecuteFlow failed UNAVAILABLE "database or disk is full" (and
    # the log said "failed" / "writable again" twice a request).
    from flowsvc.errors import StoreUnavailableError

    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "small.db"), db_max_bytes=64 * 1024)
    async with serving(settings, registry) as (server, _, stub):
        big = {"blob": "x" * 2000}
        for _ in range(100):
            try:
                await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain(("echo", big))))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                break
        else:
            pytest.fail("the database never filled up")
        with pytest.raises(StoreUnavailableError, match="full"):
            await server.manager.store.check_writable()
        with pytest.raises(grpc.aio.AioRpcError) as info:  # and indeed, still full
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain(("echo", big))))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not server.manager.store_healthy


async def test_a_database_restored_from_a_dump_is_refused_saying_why(
    tmp_path: Path, registry
) -> None:
    # sqlite3's .dump does not carry PRAGMA user_version: a database restored from one
    # has flowsvc's tables at "version 0", and the start failed with "table executions
    # already exists", which tells the operator nothing of what to do.
    from flowsvc.errors import StoreUnavailableError

    db = tmp_path / "dumped.db"
    server = await build_server(Settings(listen="127.0.0.1:0", db=str(db)), registry)
    await server.shutdown(grace=0)
    restored = tmp_path / "restored.db"
    with sqlite3.connect(db) as source, sqlite3.connect(restored) as target:
        target.executescript("\n".join(source.iterdump()))
    source.close()
    target.close()
    with pytest.raises(StoreUnavailableError, match="no schema version") as info:
        await build_server(Settings(listen="127.0.0.1:0", db=str(restored)), registry)
    assert "PRAGMA user_version = 1" in str(info.value)


def _foreign_database(db: Path, *statements: str) -> Path:
    """Another application's SQLite file at `db`, made by `statements` (rollback journal,
    SQLite's default)."""
    with sqlite3.connect(db) as other:
        for statement in statements:
            other.execute(statement)
    other.close()
    return db


async def _refused_as_foreign(db: Path, registry, named: str) -> None:
    """The start on `db` is refused as not flowsvc's, naming the file and `named` (one of
    its tables); the file is left exactly as it was, in SQLite's default journal mode."""
    from flowsvc.errors import StoreUnavailableError

    before = _as_it_is(db)
    assert before[2] == "delete"
    with pytest.raises(StoreUnavailableError, match="not a flowsvc database") as info:
        await build_server(Settings(listen="127.0.0.1:0", db=str(db)), registry)
    assert str(db) in str(info.value) and named in str(info.value)
    assert _as_it_is(db) == before


def _as_it_is(db: Path) -> tuple[bytes, list[str], str]:
    """A database file's bytes, tables and journal mode."""
    content = db.read_bytes()
    with sqlite3.connect(db) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    return content, tables, mode


async def test_another_applications_database_is_refused_and_left_as_it_was(
    tmp_path: Path, registry
) -> None:
    # --db pointing at another application's SQLite file (a typo, a shared volume): one
    # with a table named like one of flowsvc's stopped the start with "execution store
    # unavailable: table events already exists", naming no file; one without got
    # flowsvc's tables added to it, and served.
    for table in ("events", "customers"):
        db = _foreign_database(tmp_path / f"{table}.db", f"CREATE TABLE {table} (id INTEGER)")
        await _refused_as_foreign(db, registry, table)
        assert _as_it_is(db)[1] == [table]


@pytest.mark.parametrize("version", [0, 1])
async def test_another_applications_database_with_an_executions_table_is_refused(
    tmp_path: Path, registry, version: int
) -> None:
    # "executions" is a common table name: a file that had one was taken for flowsvc's,
    # switched to WAL (a lasting change to the other application's file), then refused
    # "has flowsvc's tables but no schema version" (at 0) or failed "execution store
    # unavailable: no such column: flow_name" (at 1), naming no file.
    db = _foreign_database(
        tmp_path / "other.db",
        "CREATE TABLE executions (id INTEGER, job TEXT)",
        f"PRAGMA user_version = {version}",
    )
    await _refused_as_foreign(db, registry, "executions")


@pytest.mark.parametrize("version", [1, 7])
async def test_another_applications_database_with_a_user_version_is_refused(
    tmp_path: Path, registry, version: int
) -> None:
    # Many applications set user_version too. At 1 the file was taken for a flowsvc
    # database: the start failed "execution store unavailable: no such table:
    # executions", naming no file; past 1, "this flowsvc knows versions up to 1".
    db = _foreign_database(
        tmp_path / "other.db",
        "CREATE TABLE customers (id INTEGER)",
        f"PRAGMA user_version = {version}",
    )
    await _refused_as_foreign(db, registry, "customers")


async def test_another_applications_database_keeps_its_journal_mode(
    tmp_path: Path, registry
) -> None:
    # The store switched the file to WAL (a change written in its header, that lasts)
    # before it looked at its tables: refused, the other application's file was changed
    # all the same, for an application that may not work with WAL (a network share).
    db = _foreign_database(tmp_path / "other.db", "CREATE TABLE customers (id INTEGER)")
    await _refused_as_foreign(db, registry, "customers")


async def test_list_executions_reads_no_flow_and_no_input(
    tmp_path: Path, registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ListExecutions entry shows a flow's name, yet each page decoded every listed
    # execution's whole flow and input on the store's thread: a page of 1,000 flows of
    # 110 KB took 580 ms, and held every flow's commits up that long (up to 783 ms).
    import flowsvc.store.sqlite as sqlite_store

    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "list.db"))
    async with serving(settings, registry) as (_, _, stub):
        for _ in range(3):
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
        decoded = []

        def spy(data):  # type: ignore[no-untyped-def]
            decoded.append(data)
            return real(data)

        real = sqlite_store.flow_from_json
        monkeypatch.setattr(sqlite_store, "flow_from_json", spy)
        listed = await stub.ListExecutions(pb.ListExecutionsRequest(page_size=2))
        assert [e.flow_name for e in listed.executions] == ["test flow", "test flow"]
        assert listed.next_page_token
        assert decoded == []


async def test_a_task_writing_into_its_input_does_not_change_the_stored_input(
    stub, registry
) -> None:
    # ctx.input is to be read only; a task that writes into it anyway must not rewrite
    # what the execution records (SQLite kept the JSON; the in-memory store kept the dict).
    @registry.task("scribble")
    def scribble(ctx: TaskContext) -> TaskResult:
        ctx.input["added"] = True  # type: ignore[index]
        ctx.input["order"]["id"] = 0  # type: ignore[index]
        return TaskResult.success()

    request = pb.ExecuteFlowRequest(flow=chain("scribble"))
    request.input.update({"order": {"id": 7}})
    done = await stub.ExecuteFlow(request)
    got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))
    assert to_dict(got.execution.input) == {"order": {"id": 7}}


async def test_a_task_changing_data_it_returned_does_not_change_its_recorded_result(
    stub, registry
) -> None:
    # A task that keeps what it returned (a cache, a running tally) and changes it later
    # must not rewrite a result already told: the in-memory store kept the task's own
    # objects (GetExecution showed them changed by later runs), and the SQLite store
    # kept the JSON while the history ExecuteFlow answered and StreamFlow sent could
    # show them changed after the step.
    tally: dict[str, Any] = {"runs": []}

    @registry.task("tally")
    def count() -> TaskResult:
        tally["runs"].append(len(tally["runs"]) + 1)
        return TaskResult.success({"tally": tally})

    loop = flow_pb(["tally"], {"tally": ("tally", "end")}, max_steps=3)

    def runs(results: Any) -> list[list[float]]:
        return [to_dict(r.data)["tally"]["runs"] for r in results]

    # Each step's result as it was when the task returned it: the runs up to that step.
    first_runs = [[1], [1, 2], [1, 2, 3]]
    second_runs = [[1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]]
    streamed = await read_all(stub.StreamFlow(pb.StreamFlowRequest(flow=loop)))
    first = streamed[0].started.flow_id
    assert runs(m.task_result for m in streamed if m.HasField("task_result")) == first_runs
    done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=loop))
    assert runs(done.execution_history) == second_runs
    for flow_id, told in ((first, first_runs), (done.flow_id, second_runs)):
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id))
        assert runs(got.execution.execution_history) == told


async def test_the_prepared_flow_cache_is_bounded_by_bytes(stub, server: FlowServer) -> None:
    # The cache kept 512 flows whatever their size: 512 distinct flows of 3.5 MB (13 MB
    # each in memory) let one client take the server to 7 GB. 40 flows of 1 MB held 80 MB
    # of request bytes and JSON; the bound is 32 MiB (PREPARED_CACHE_BYTES).
    for i in range(40):
        flow = chain("noop")
        flow.tasks[0].description = f"{i:02d}" + "d" * 1_000_000
        resp = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
        assert resp.status == flow_pb2.FLOW_STATUS_SUCCEEDED, resp.message
    cached = server.manager._prepared
    held = sum(len(key) + len(prepared.flow_json) for key, prepared in cached.items())
    assert held <= 32 * 1024 * 1024, (len(cached), held)
    assert len(cached) >= 10  # flows of 2 MB (request and JSON) are still cached


async def test_the_prepared_flow_cache_counts_what_references_hold_in_memory(
    stub, server: FlowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache counted a flow's request bytes and JSON only, "about twice that in
    # memory". A compiled "${input.a}" (13 bytes of request and JSON) holds about 430
    # bytes: flows of references held 18 times what was counted (17 flows of under 1 MB
    # each, 31 MB counted, held 600 MB). With a cache of 1 MiB, 30 flows of 2,000
    # references held 18 MB.
    import tracemalloc

    from flowsvc import executions

    monkeypatch.setattr(executions, "PREPARED_CACHE_BYTES", 1024 * 1024)
    cached = server.manager._prepared
    tracemalloc.start()
    try:
        for i in range(30):
            flow = chain(("echo", {"p": ["${input.a}"] * 2000}))
            flow.name = f"flow {i}"
            resp = await stub.ExecuteFlow(
                pb.ExecuteFlowRequest(flow=flow, input={"a": 1}), timeout=30
            )
            assert resp.status == flow_pb2.FLOW_STATUS_SUCCEEDED, resp.message
        gc.collect()
        with_cache = tracemalloc.get_traced_memory()[0]
        entries = len(cached)
        cached.clear()
        gc.collect()
        held = with_cache - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held <= 3 * 1024 * 1024, (entries, held)
    # A flow with a few references is still cached.
    flow = chain(("echo", {"p": "${input.a}", "q": ["${input.a}"] * 3}))
    resp = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow, input={"a": 1}), timeout=30)
    assert resp.status == flow_pb2.FLOW_STATUS_SUCCEEDED, resp.message
    assert len(cached) == 1


async def test_a_new_database_is_readable_by_its_owner_only(tmp_path: Path, registry) -> None:
    # It holds every execution's input and params (an http task's Authorization header):
    # under the usual umask 022 it, its WAL and its lock file were created world-readable.
    import os
    import stat

    db = tmp_path / "private.db"
    saved = os.umask(0o022)
    try:
        async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, _, stub):
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
            modes = {
                name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
                for name in os.listdir(tmp_path)
            }
    finally:
        os.umask(saved)
    assert {"private.db", "private.db-wal", "private.db.lock"} <= modes.keys(), modes
    assert all(mode & 0o077 == 0 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}


async def test_a_new_database_behind_a_symlink_is_readable_by_its_owner_only(
    tmp_path: Path, registry
) -> None:
    # --db names a symlink to a file not made yet (a volume's path): SQLite makes the
    # file where the link points, and it was made world-readable there.
    import os
    import stat

    (tmp_path / "volume").mkdir()
    link = tmp_path / "flowsvc.db"
    link.symlink_to(tmp_path / "volume" / "real.db")
    saved = os.umask(0o022)
    try:
        async with serving(Settings(listen="127.0.0.1:0", db=str(link)), registry) as (_, _, stub):
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
            modes = {
                name: stat.S_IMODE(os.stat(tmp_path / "volume" / name).st_mode)
                for name in os.listdir(tmp_path / "volume")
            }
    finally:
        os.umask(saved)
    assert {"real.db", "real.db-wal", "real.db.lock"} <= modes.keys(), modes
    assert all(mode & 0o077 == 0 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}


@pytest.mark.parametrize("db", [":memory:", "sqlite"])
async def test_an_input_too_large_to_read_back_is_refused_before_it_runs(
    tmp_path: Path, registry, db: str
) -> None:
    # A request just under the receive limit was accepted and run, but its execution's
    # record (the flow and input again, with ids and times) was over the answer limit:
    # GetExecution said RESOURCE_EXHAUSTED, and no call could ever return its input.
    limit = 20_000
    path = ":memory:" if db == ":memory:" else str(tmp_path / "big.db")
    settings = Settings(
        listen="127.0.0.1:0", db=path, max_message_bytes=limit, max_response_bytes=limit
    )
    async with serving(settings, registry) as (_, _, stub):
        request = pb.ExecuteFlowRequest(flow=chain("noop"))
        request.input.update({"blob": "x" * (limit - 200)})
        assert request.ByteSize() < limit
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violation_fields(info.value) == ["input"]
        assert "--max-response-bytes" in (info.value.details() or "")
        stream = pb.StreamFlowRequest(flow=request.flow, input=request.input)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_all(stub.StreamFlow(stream))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not (await stub.ListExecutions(pb.ListExecutionsRequest())).executions
        # What is accepted can be read back whole.
        request.input.update({"blob": "x" * (limit - 2000)})
        done = await stub.ExecuteFlow(request)
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))
        assert got.execution.input == request.input


async def test_an_input_that_grows_when_stored_is_measured_as_it_is_read_back(
    registry,
) -> None:
    # A Value with no kind set takes 2 bytes in a request's list, and comes back as
    # null_value, 4 bytes: the size check measured the request's input, so an input half
    # the limit was accepted and run, and no view of GetExecution could ever return it.
    limit = 20_000
    settings = Settings(
        listen="127.0.0.1:0", db=":memory:", max_message_bytes=limit, max_response_bytes=limit
    )
    async with serving(settings, registry) as (_, _, stub):
        request = pb.ExecuteFlowRequest(flow=chain("noop"))
        values = request.input.fields["x"].list_value.values
        for _ in range(8000):
            values.add()  # no kind: read as null
        assert request.input.ByteSize() < limit - 2000
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violation_fields(info.value) == ["input"]
        assert not (await stub.ListExecutions(pb.ListExecutionsRequest())).executions
        # Half as many fit, and are read back whole (as nulls).
        del values[4000:]
        done = await stub.ExecuteFlow(request)
        got = await stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))
        assert len(got.execution.input.fields["x"].list_value.values) == 4000


@pytest.mark.parametrize("db", [":memory:", "sqlite"])
async def test_the_basic_view_reads_back_an_execution_whose_history_is_too_large(
    tmp_path: Path, registry, db: str
) -> None:
    # Its whole answer is over the limit, and WatchExecution streams only its events:
    # the flow and input it was submitted with could be read by no call at all.
    path = ":memory:" if db == ":memory:" else str(tmp_path / "big.db")
    settings = Settings(listen="127.0.0.1:0", db=path, max_response_bytes=4000)
    async with serving(settings, registry) as (_, _, stub):
        registry.register("echo_2", registry.get("echo").fn)
        request = pb.ExecuteFlowRequest(flow=chain("echo", "echo_2"), request_id="r-1")
        request.input.update({"blob": "z" * 2500})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert "EXECUTION_VIEW_BASIC" in details
        flow_id = re.search(r"execution ([0-9a-f-]{36})", details).group(1)  # type: ignore[union-attr]
        for view in (pb.EXECUTION_VIEW_UNSPECIFIED, pb.EXECUTION_VIEW_FULL):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id, view=view))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        got = (
            await stub.GetExecution(
                pb.GetExecutionRequest(flow_id=flow_id, view=pb.EXECUTION_VIEW_BASIC)
            )
        ).execution
        assert got.flow == request.flow and got.input == request.input
        assert got.request_id == "r-1" and got.status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert got.message.startswith("Flow executed successfully")
        assert got.last_sequence == 4 and not got.execution_history
        assert got.HasField("end_time")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExecution(pb.GetExecutionRequest(flow_id=flow_id, view=7))  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violation_fields(info.value) == ["view"]


async def test_the_basic_view_cuts_a_final_message_too_long_to_fit(registry) -> None:
    # A failing task's error (up to 65,536 characters) is also in the final message.
    settings = Settings(listen="127.0.0.1:0", db=":memory:", max_response_bytes=8000)
    async with serving(settings, registry) as (_, _, stub):
        registry.register("long_fail", lambda: TaskResult.failure("é" * 5000))
        request = pb.ExecuteFlowRequest(flow=chain("long_fail"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ExecuteFlow(request)
        flow_id = re.search(r"execution ([0-9a-f-]{36})", info.value.details() or "").group(1)  # type: ignore[union-attr]
        response = await stub.GetExecution(
            pb.GetExecutionRequest(flow_id=flow_id, view=pb.EXECUTION_VIEW_BASIC)
        )
        assert response.ByteSize() <= 8000
        got = response.execution
        assert got.status == flow_pb2.FLOW_STATUS_FAILED and got.last_sequence == 3
        assert got.message.startswith("Flow failed: task 'long_fail' (step 1) failed: éé")
        assert "cut to fit" in got.message


async def test_a_long_execution_is_read_in_bounded_jobs_of_the_store_thread(
    tmp_path: Path, registry
) -> None:
    # GetExecution and WatchExecution read a stored execution's every event in one job of
    # the store's one thread, which every flow's commits wait for: with 10,000 steps a
    # concurrent ExecuteFlow took 75-110 ms instead of 2; with 50,000, 0.4-0.55 s. Read in
    # jobs of a few hundred events, the commits queued meanwhile go in between.
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "long.db"))
    async with serving(settings, registry) as (server, _, stub):
        store = server.manager.store
        flow = flow_pb(["noop"], {"noop": ("noop", "end")}, max_steps=1500)
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
        assert len(done.execution_history) == 1500
        before = store.jobs
        got = (await stub.GetExecution(pb.GetExecutionRequest(flow_id=done.flow_id))).execution
        assert store.jobs - before >= 4, store.jobs - before
        assert [r.step for r in got.execution_history] == list(range(1, 1501))
        assert got.last_sequence == 1502 and got.status == done.status
        for after in (0, 255, 256, 257, 1000, 1501, 1502, 5000):
            before = store.jobs
            request = pb.WatchExecutionRequest(flow_id=done.flow_id, after_sequence=after)
            watched = [m.sequence for m in await read_all(stub.WatchExecution(request))]
            assert watched == list(range(after + 1, 1503)), after
            if after == 0:
                assert store.jobs - before >= 4, store.jobs - before


async def test_a_cancel_that_took_effect_is_ok_even_when_the_whole_execution_is_too_large(
    registry,
) -> None:
    # The cancel stopped the execution, but its answer (the whole execution) was over the
    # limit: RESOURCE_EXHAUSTED, and a retry FAILED_PRECONDITION; never told it worked.
    settings = Settings(listen="127.0.0.1:0", db=":memory:", max_response_bytes=8000)
    async with serving(settings, registry) as (_, _, stub):
        flow = chain("echo", ("sleep", {"seconds": 30}))
        request = pb.StreamFlowRequest(flow=flow, continue_on_disconnect=True)
        request.input.update({"blob": "x" * 5000})
        call = stub.StreamFlow(request)
        flow_id = (await call.read()).started.flow_id
        await call.read()  # echo's result: the history alone is over the limit now
        cancelled = await stub.CancelExecution(pb.CancelExecutionRequest(flow_id=flow_id))
        got = cancelled.execution
        assert got.status == flow_pb2.FLOW_STATUS_CANCELLED and got.input == request.input
        assert got.last_sequence == 3 and not got.execution_history
        assert cancelled.ByteSize() <= 8000
        assert (await read_all(call))[-1].finished.status == flow_pb2.FLOW_STATUS_CANCELLED


@pytest.mark.parametrize("db", [":memory:", "file"])
async def test_a_retry_attaches_to_its_running_execution_while_the_server_drains(
    tmp_path: Path, registry, db: str
) -> None:
    """A shutdown refuses new executions (UNAVAILABLE, "retry on another instance"), and it
    refused a retry of one still running here too: sent elsewhere, with another store, it
    would have run the flow a second time. The retry now attaches and gets its result."""
    started, release, _ = gate(registry)
    settings = Settings(
        listen="127.0.0.1:0", db=db if db == ":memory:" else str(tmp_path / "drain.db")
    )
    server = await build_server(settings, registry)
    stopping = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            request = pb.ExecuteFlowRequest(flow=chain("gated"), request_id="drain-1")
            first = stub.ExecuteFlow(request, timeout=30)
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.ensure_future(server.shutdown(grace=20))
            await eventually(lambda: server.manager.draining)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            retry = stub.ExecuteFlow(request, timeout=30)
            # Attached: the execution now has two callers.
            await eventually(lambda: next(iter(server.manager._live.values())).callers == 2)
            release.set()
            done, again = await first, await retry
            assert done.status == again.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            assert done.flow_id == again.flow_id
            await stopping
    finally:
        release.set()
        await (server.shutdown(grace=0) if stopping is None else stopping)


async def test_a_watch_that_retention_overtakes_between_its_reads_ends_not_found(
    tmp_path: Path, registry, monkeypatch
) -> None:
    """A long execution is read in several store jobs: retention deleting it between two
    of them ends the stream NOT_FOUND after the events it sent, never OK with a part of
    them. White-box: the stream's second read waits until the sweep has deleted it."""
    from datetime import UTC, datetime, timedelta

    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "overtaken.db"))
    async with serving(settings, registry) as (server, _, stub):
        store = server.manager.store
        flow = flow_pb(["noop"], {"noop": ("noop", "end")}, max_steps=2000)
        done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=flow))
        asked, swept = asyncio.Event(), asyncio.Event()
        read_on = store.events

        async def events_after_the_sweep(*args):
            asked.set()
            await swept.wait()
            return await read_on(*args)

        monkeypatch.setattr(store, "events", events_after_the_sweep)
        stream = stub.WatchExecution(pb.WatchExecutionRequest(flow_id=done.flow_id))
        sequences: list[int] = []

        async def watch() -> None:
            while (message := await stream.read()) is not grpc.aio.EOF:
                sequences.append(message.sequence)

        watching = asyncio.ensure_future(watch())
        try:
            await asyncio.wait_for(asked.wait(), 10)  # the first job's events are sent
            cutoff = datetime.now(UTC) + timedelta(seconds=1)
            assert await store.delete_finished_before(cutoff) == 1
        finally:
            swept.set()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watching
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert sequences == list(range(1, 257))  # the first job's, and no more


async def test_a_database_full_at_start_is_refused_naming_it_and_what_to_do(
    tmp_path: Path, registry
) -> None:
    # A database that is full at start (here: a cap lowered below its size) stopped the
    # server with "execution store unavailable: database or disk is full", naming neither
    # the file, nor the cap, nor what to do about it.
    from flowsvc.errors import StoreUnavailableError

    @registry.task("large_result")
    async def large_result() -> TaskResult:
        return TaskResult.success({"pad": "x" * 30_000})

    db = tmp_path / "full.db"
    async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, _, stub):
        for _ in range(10):
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("large_result")))
    capped = Settings(listen="127.0.0.1:0", db=str(db), db_max_bytes=100_000)
    with pytest.raises(StoreUnavailableError, match="database or disk is full") as info:
        await build_server(capped, registry)
    message = str(info.value)
    assert str(db) in message
    assert "--db-max-bytes 100000" in message and "larger --db-max-bytes" in message
    assert "delete ended executions" in message


def test_a_disk_full_at_start_without_a_cap_says_to_free_the_disk(tmp_path: Path) -> None:
    # Without --db-max-bytes, only the file system can be full (a new database on a full
    # disk, seen on a full tmpfs): the message told to start "with a larger
    # --db-max-bytes" and to "delete ended executions", neither of which frees a disk.
    from flowsvc.errors import StoreUnavailableError
    from flowsvc.server import _full_at_start

    db = tmp_path / "new.db"
    full = StoreUnavailableError(f"cannot open database {db}: database or disk is full")
    message = str(_full_at_start(Settings(db=str(db)), full))
    assert str(db) in message and "disk holding it is full" in message
    assert "free room on its file system" in message
    assert "--db-max-bytes" not in message and "delete ended executions" not in message


async def test_a_start_refused_once_the_store_is_open_closes_it_and_frees_the_database(
    tmp_path: Path, registry
) -> None:
    """A start that fails after the store has opened (here: full at the write check) closes
    the store again. It was left open: its thread ran on, and it held the database's lock,
    so that a server started again in the same process (with a larger cap) was refused,
    "in use by another flowsvc server"."""
    from flowsvc.errors import StoreUnavailableError

    @registry.task("large_result")
    async def large_result() -> TaskResult:
        return TaskResult.success({"pad": "x" * 30_000})

    db = tmp_path / "refused.db"
    async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, _, stub):
        for _ in range(10):
            await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("large_result")))
    capped = Settings(listen="127.0.0.1:0", db=str(db), db_max_bytes=100_000)
    with pytest.raises(StoreUnavailableError, match="is full"):
        await build_server(capped, registry)
    assert "flowsvc-store" not in [thread.name for thread in threading.enumerate()]
    async with serving(Settings(listen="127.0.0.1:0", db=str(db)), registry) as (_, _, stub):
        listed = await stub.ListExecutions(pb.ListExecutionsRequest())
        assert len(listed.executions) == 10


async def test_a_stalled_store_turns_health_not_serving_until_it_writes_again(
    tmp_path: Path, registry, monkeypatch, caplog
) -> None:
    """A disk that stalls (fsfreeze, a throttled volume: found by p61) held every call while
    health said SERVING, so an orchestrator saw nothing wrong. A store job running past
    STORE_STALL_SECONDS now turns health NOT_SERVING, and the store's first write after it
    turns it back; nothing fails for it. White-box: the store's thread is held."""
    import flowsvc.executions as executions

    monkeypatch.setattr(executions, "STORE_STALL_SECONDS", 0.2)
    monkeypatch.setattr(executions, "STORE_STALL_CHECK_SECONDS", 0.02)
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "stall.db"))
    async with serving(settings, registry) as (server, channel, stub):
        held = StoreHold(server.manager.store)
        try:
            await held.hold()
            waiting = asyncio.ensure_future(
                stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=30)
            )
            await eventually(lambda: health_is(channel, health_pb2.HealthCheckResponse.NOT_SERVING))
            assert not waiting.done()  # it waits for the store, as before
            await held.release()
            done = await waiting
            assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            await eventually(lambda: health_is(channel, health_pb2.HealthCheckResponse.SERVING))
        finally:
            held.let_go()
    stalled = [r for r in caplog.records if "stalled" in getattr(r, "error", "")]
    assert stalled, caplog.text


async def test_a_store_slow_at_every_write_keeps_health_not_serving(
    tmp_path: Path, registry, monkeypatch
) -> None:
    """A throttled disk makes every write slower than STORE_STALL_SECONDS. The store
    probe's write went through (slowly) and turned health SERVING, the watch turned it
    NOT_SERVING again a few seconds later, and so on: health flapped, SERVING a third of
    the time. It stays NOT_SERVING until a write is quick again. White-box: every batch
    of the store's thread is slowed."""
    import flowsvc.executions as executions

    monkeypatch.setattr(executions, "STORE_STALL_SECONDS", 0.3)
    monkeypatch.setattr(executions, "STORE_STALL_CHECK_SECONDS", 0.05)
    settings = Settings(listen="127.0.0.1:0", db=str(tmp_path / "slow.db"))
    async with serving(settings, registry) as (server, channel, stub):
        health = health_pb2_grpc.HealthStub(channel)
        store = server.manager.store
        slow = threading.Event()
        run_batch = store._run_batch

        def slow_batch(conn: sqlite3.Connection, batch: list[Any]) -> None:
            if slow.is_set():
                time.sleep(0.5)
            run_batch(conn, batch)

        monkeypatch.setattr(store, "_run_batch", slow_batch)
        seen: list[int] = []

        async def watch() -> None:
            async for answer in health.Watch(health_pb2.HealthCheckRequest()):
                seen.append(answer.status)

        watching = asyncio.ensure_future(watch())
        try:
            slow.set()
            # Flows run all along, every write of theirs slow: several probe writes go
            # through meanwhile.
            for _ in range(4):
                done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")))
                assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            slow.clear()
            await eventually(lambda: _serving_again(seen))
        finally:
            watching.cancel()
    serving_status = health_pb2.HealthCheckResponse.SERVING
    # SERVING, then NOT_SERVING for the whole slow stretch, then SERVING once quick again.
    assert seen == [serving_status, health_pb2.HealthCheckResponse.NOT_SERVING, serving_status]


async def _serving_again(seen: list[int]) -> bool:
    return seen.count(health_pb2.HealthCheckResponse.SERVING) >= 2
