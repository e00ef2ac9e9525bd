"""Finds what blocks the event loop: an async task that does not await (time.sleep, a
long computation, a blocking client library in an `async def`) stalls every flow, health
checks and all, and nothing else in the log says which task it was.

A callback on the loop marks each tick; a thread checks the mark, and when the loop has
not ticked for STALL_SECONDS it logs one WARNING, "event loop blocked", with where the
loop's thread is at that moment (the innermost frames of its stack: the blocking code).
When the loop ticks again, a second WARNING says how long it was blocked. Costs a
callback every TICK_SECONDS on the loop and a thread that wakes as often.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from flowsvc.logs import event as log_event

logger = logging.getLogger("flowsvc.stalls")

#: How often the loop marks a tick, and the thread looks at the mark.
TICK_SECONDS = 0.1
#: A loop that has not ticked for this long is blocked: reported.
STALL_SECONDS = 0.5
#: The innermost frames of the loop thread's stack that a report shows.
STACK_FRAMES = 8


class StallWatch:
    """Watches one event loop from a thread of its own (start() on the loop's thread)."""

    def __init__(self) -> None:
        self._tick = time.monotonic()
        self._stalled_since: float | None = None  # reported, and not ticked since
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._loop_thread = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="flowsvc-stalls", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._handle is not None:
            self._handle.cancel()

    def _beat(self) -> None:  # on the loop
        now = time.monotonic()
        if self._stalled_since is not None and self._stalled_since == self._tick:
            log_event(
                logger,
                logging.WARNING,
                "event loop unblocked",
                blocked_for_s=round(now - self._tick, 3),
            )
        self._stalled_since = None
        self._tick = now
        assert self._loop is not None
        self._handle = self._loop.call_later(TICK_SECONDS, self._beat)

    def _watch(self) -> None:  # on the thread
        while not self._done.wait(TICK_SECONDS):
            loop = self._loop
            if loop is None or loop.is_closed():
                return  # its loop ended without stop() (no shutdown): nothing to watch
            if not loop.is_running():
                continue  # not ticking, but not blocked: nothing runs on it
            tick = self._tick
            blocked = time.monotonic() - tick
            if blocked < STALL_SECONDS or self._stalled_since == tick:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            where = traceback.format_stack(frame, limit=STACK_FRAMES) if frame else []
            if self._tick != tick:
                continue  # it ticked meanwhile: that stack is not the blocking code's
            self._stalled_since = tick
            log_event(
                logger,
                logging.WARNING,
                "event loop blocked",
                blocked_for_s=round(blocked, 3),
                hint=(
                    "an async task that does not await stalls every flow: make a blocking "
                    "task a plain def (it runs in a thread)"
                ),
                stack="".join(where)[-8192:],
            )
