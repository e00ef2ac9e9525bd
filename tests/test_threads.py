"""The threads of sync tasks: a task given up on does not take a thread from the others."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from flowsvc import Condition, Flow, FlowEngine, FlowStatus, Task, TaskRegistry, TaskResult
from flowsvc.threads import TaskThreads


def wait_until(predicate, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def pool():
    threads = TaskThreads(2, spare=2, name="test-task")
    yield threads
    threads.shutdown(wait=False, cancel_futures=True)


def test_runs_tasks_and_passes_results_and_errors(pool: TaskThreads) -> None:
    assert pool.submit(lambda a, b=0: a + b, 1, b=2).result(timeout=10) == 3
    failing = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)


def test_starts_no_more_threads_than_workers_for_tasks_waited_for(pool: TaskThreads) -> None:
    free = threading.Event()
    futures = [pool.submit(free.wait, 10) for _ in range(4)]
    wait_until(lambda: sum(f.running() for f in futures) == 2)
    assert pool.threads == 2 and not futures[2].running()  # the other two wait
    free.set()
    assert all(f.result(timeout=10) for f in futures)
    assert pool.threads == 2


def test_an_abandoned_task_is_replaced_by_a_thread_up_to_the_spare_ones(pool) -> None:
    stuck = threading.Event()
    held = [pool.submit(stuck.wait, 10) for _ in range(2)]
    wait_until(lambda: all(f.running() for f in held))
    waiting = pool.submit(lambda: "ran")
    for future in held:
        pool.abandon(future)  # nothing waits for them: their threads no longer count
    assert waiting.result(timeout=10) == "ran"  # on a third thread, in place of one held
    assert pool.abandoned == 2 and pool.threads == 3
    more = [pool.submit(stuck.wait, 10) for _ in range(2)]
    wait_until(lambda: all(f.running() for f in more))
    for future in more:
        pool.abandon(future)
    assert pool.threads == 4  # 2 workers + 2 spare: the limit
    beyond = pool.submit(lambda: "later")
    assert not beyond.done() and pool.threads == 4  # every thread held: it waits
    stuck.set()
    assert beyond.result(timeout=10) == "later"
    wait_until(lambda: pool.abandoned == 0)  # each returned, and stopped counting


def test_after_a_queue_formed_a_replacement_is_still_started(pool: TaskThreads) -> None:
    """A thread that went from one task straight to a waiting one was never idle in
    between: counting it idle would later start no thread in place of abandoned ones."""
    gate = threading.Event()
    first = [pool.submit(gate.wait, 10) for _ in range(3)]  # two threads: one task waits
    gate.set()
    assert all(f.result(timeout=10) for f in first)
    stuck = threading.Event()
    held = [pool.submit(stuck.wait, 30) for _ in range(2)]
    wait_until(lambda: all(f.running() for f in held))
    for future in held:
        pool.abandon(future)
    try:
        assert pool.submit(lambda: "ran").result(timeout=10) == "ran"
    finally:
        stuck.set()


def test_once_an_abandoned_task_returns_no_more_than_workers_run_at_once() -> None:
    """Its replacement stays, but the two threads run one task at a time again: a pool
    sized to a resource (a connection pool, a library that is not thread-safe) holds."""
    pool = TaskThreads(1, name="test-task")
    try:
        stuck = threading.Event()
        held = pool.submit(stuck.wait, 30)
        wait_until(held.running)
        pool.abandon(held)
        assert pool.submit(lambda: "ran").result(timeout=10) == "ran"  # on a replacement
        stuck.set()
        held.result(timeout=10)
        wait_until(lambda: pool.abandoned == 0)
        assert pool.threads == 2
        gate = threading.Event()
        first = pool.submit(gate.wait, 10)
        wait_until(first.running)
        second = pool.submit(lambda: "second")
        with pytest.raises(concurrent.futures.TimeoutError):
            second.result(timeout=0.2)  # a thread is idle, but one task runs already
        gate.set()
        assert second.result(timeout=10) == "second"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def test_abandoning_a_task_that_is_done_or_never_ran_changes_nothing(pool) -> None:
    done = pool.submit(lambda: 1)
    done.result(timeout=10)
    pool.abandon(done)
    free = threading.Event()
    busy = [pool.submit(free.wait, 10) for _ in range(2)]
    queued = pool.submit(lambda: 2)
    assert queued.cancel()
    pool.abandon(queued)
    assert pool.abandoned == 0
    free.set()
    assert all(f.result(timeout=10) for f in busy)


def test_shutdown_cancels_what_waits_and_refuses_more() -> None:
    pool = TaskThreads(1, name="test-task")
    free = threading.Event()
    running = pool.submit(free.wait, 10)
    wait_until(running.running)
    queued = pool.submit(lambda: 1)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 1)
    free.set()
    assert running.result(timeout=10) is True


def test_sync_tasks_of_timed_out_attempts_leave_threads_for_the_next_flows() -> None:
    """Through the engine: two sync tasks time out and run on (abandoned); a third flow's
    sync task still gets a thread at once, though the pool has only two workers."""
    stuck = threading.Event()

    def blocking() -> TaskResult:
        stuck.wait(30)
        return TaskResult.success()

    def quick() -> TaskResult:
        return TaskResult.success({"ran": True})

    registry = TaskRegistry.with_builtins()
    registry.register("blocking", blocking)
    registry.register("quick", quick)
    pool = TaskThreads(2, name="test-task")
    engine = FlowEngine(registry, executor=pool)
    stuck_flow = Flow(
        "stuck", "blocking", (Task("blocking", timeout_s=0.1), Task("noop")),
        (Condition("blocking", "end", "end"),),
    )  # fmt: skip

    async def main():
        plan = engine.prepare(stuck_flow)
        first = await asyncio.gather(engine.run(plan, {}), engine.run(plan, {}))
        # Without a thread in place of the held ones it would wait, and time out unrun.
        quick_flow = Flow("quick", "quick", (Task("quick", timeout_s=5),))
        later = await engine.run(engine.prepare(quick_flow), {})
        return first, later

    try:
        first, later = asyncio.run(main())
        assert all("abandoned" in (e.history[0].error or "") for e in first)
        assert later.status is FlowStatus.SUCCEEDED
        assert later.history[0].data == {"ran": True}
        assert pool.abandoned == 2
    finally:
        stuck.set()
        pool.shutdown(wait=False)


def test_sync_task_of_a_cancelled_flow_leaves_its_thread_to_the_next_flows() -> None:
    from flowsvc import StopHandle

    stuck, started = threading.Event(), threading.Event()

    def blocking() -> TaskResult:
        started.set()
        stuck.wait(30)
        return TaskResult.success()

    def quick() -> TaskResult:
        return TaskResult.success()

    registry = TaskRegistry.with_builtins()
    registry.register("blocking", blocking)
    registry.register("quick", quick)
    pool = TaskThreads(1, name="test-task")
    engine = FlowEngine(registry, executor=pool)

    async def main():
        stop = StopHandle()
        plan = engine.prepare(Flow("stuck", "blocking", (Task("blocking"),)))
        cancelled = asyncio.create_task(engine.run(plan, {}, stop=stop))
        assert await asyncio.to_thread(started.wait, 10)
        stop.request("the caller went away")
        ended = await cancelled
        quick_flow = Flow("quick", "quick", (Task("quick", timeout_s=5),))
        return ended, await engine.run(engine.prepare(quick_flow), {})

    try:
        ended, later = asyncio.run(asyncio.wait_for(main(), 20))
        assert ended.status is FlowStatus.CANCELLED
        assert later.status is FlowStatus.SUCCEEDED, later.history[0].error
        assert pool.abandoned == 1
    finally:
        stuck.set()
        pool.shutdown(wait=False)
