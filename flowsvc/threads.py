"""The threads that run sync (`def`) tasks.

A thread cannot be stopped. A sync task the engine gives up on (it timed out, or its flow
was cancelled) runs on in its thread until it returns, and a plain thread pool would count
that thread as taken: a few stuck tasks of cancelled flows would hold up every other
flow's sync tasks. TaskThreads keeps `workers` threads for the tasks that are still
waited for: for each task given up while it runs (`abandon`), it may start one more
thread, up to `workers + spare` threads in all; past that, tasks wait for a thread.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_Item = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class TaskThreads(Executor):
    """An Executor that runs at most `workers` tasks at once, not counting the abandoned
    ones that still run: each of those may have a thread started in its place, up to
    `workers + spare` threads in all. Threads are started as needed and kept."""

    def __init__(self, workers: int, *, spare: int | None = None, name: str = "task") -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.limit = workers + (workers if spare is None else spare)
        self._name = name
        # One lock for the queue and the counts, so that a thread taking an item and
        # ceasing to be idle is one step (a count that lags would start no thread when
        # one is needed, and a task would wait behind stuck ones).
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._items: collections.deque[_Item] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for an item (or for their turn to run one)
        self._busy = 0  # threads running a task, abandoned ones included
        self._starting = 0  # threads started that have not yet looked for one
        self._abandoned = 0  # tasks given up on that still run in their thread
        self._closed = False

    @property
    def abandoned(self) -> int:
        """Tasks given up on that still run."""
        return self._abandoned

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._items.append((future, fn, args, kwargs))
            self._serve_items()
        return future

    def abandon(self, future: Future[Any]) -> None:
        """Nothing waits for `future`'s task any more. If it still runs, its thread stops
        counting until it returns, and a thread may be started in its place."""
        with self._lock:
            if not future.running():
                return  # done, or never started (cancelled): it holds no thread
            self._abandoned += 1
            self._serve_items()
        future.add_done_callback(self._returned)  # at once if it has just returned

    def _returned(self, future: Future[Any]) -> None:
        with self._lock:
            self._abandoned -= 1

    def _room(self) -> int:  # with self._lock held
        """How many more tasks may start now: `workers`, less those running that count."""
        return self.workers - (self._busy - self._abandoned)

    def _serve_items(self) -> None:  # with self._lock held
        """Wake an idle thread for each item that may start now; start threads for the
        rest (fewer than `limit` in all)."""
        startable = min(len(self._items), self._room())
        if startable <= 0:
            return
        self._wake.notify(startable)
        missing = startable - self._idle - self._starting
        while missing > 0 and len(self._threads) < self.limit:
            thread = threading.Thread(
                target=self._work,
                name=f"{self._name}_{len(self._threads)}",
                daemon=True,  # a task that never returns must not keep the process alive
            )
            self._threads.append(thread)
            self._starting += 1
            thread.start()
            missing -= 1

    def _next(self, first: bool, finished: bool) -> _Item | None:
        """The next item, once one waits and there is room to run it (`finished`: this
        thread has just ended a task); None once shut down and drained."""
        with self._lock:
            if first:
                self._starting -= 1
            if finished:
                self._busy -= 1
            while not self._items or self._room() <= 0:
                if self._closed and not self._items:
                    return None
                self._idle += 1
                try:
                    self._wake.wait()
                finally:
                    self._idle -= 1
            self._busy += 1
            item = self._items.popleft()
            if self._closed and not self._items:
                self._wake.notify_all()  # shut down and drained: the waiting ones may end
            return item

    def _work(self) -> None:
        first, finished = True, False
        while (item := self._next(first, finished)) is not None:
            first, finished = False, True
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # what ThreadPoolExecutor does too
                    future.set_exception(exc)
            del item, future, fn, args, kwargs  # nothing of the task kept while idle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._items:
                    self._items.popleft()[0].cancel()
            self._wake.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
