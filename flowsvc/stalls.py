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
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType

from flowsvc.logs import event as log_event

logger = logging.getLogger("flowsvc.stalls")

#: How often the loop marks a tick, and the thread looks at the mark.
TICK_SECONDS = 0.1
#: A loop that has not ticked for this long is blocked: reported.
STALL_SECONDS = 0.5
#: The innermost frames of the loop thread's stack that a report shows.
STACK_FRAMES = 8
#: The most characters of a report's stack.
STACK_CHARS = 8192
#: Where flowsvc's own code lies: the frame it called last is the task's.
_PACKAGE = str(Path(__file__).resolve().parent)


def _ours(filename: str) -> bool:
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL: not a file of ours
        return False
    return resolved.startswith(_PACKAGE + os.sep)


def where(frame: FrameType) -> str:
    """The innermost STACK_FRAMES frames of a stack; and, when it is further out, first the
    frame of the code flowsvc called last (a task: its line that blocks), which a blocking
    call deep in a library (urllib, a database driver) left out of the innermost frames."""
    frames = traceback.StackSummary.extract(traceback.walk_stack(frame), lookup_lines=False)
    inner = traceback.StackSummary.from_list(frames[:STACK_FRAMES][::-1]).format()
    # walk_stack goes outwards: frames[0] is the innermost, each next one its caller.
    for i in range(len(frames) - 1):
        if _ours(frames[i + 1].filename) and not _ours(frames[i].filename):
            if i >= STACK_FRAMES:  # not among the innermost: shown first
                entry = "".join(traceback.StackSummary.from_list([frames[i]]).format())
                skipped = i - STACK_FRAMES
                inner = [entry, f"  ... {skipped} frames ...\n" if skipped else "", *inner]
            break
    text = "".join(inner)
    if len(text) <= STACK_CHARS:
        return text
    return text[: STACK_CHARS // 4] + "...\n" + text[-(STACK_CHARS * 3 // 4) :]


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
        # The tick and the mark of a report change together: a tick cannot fall between
        # the watch's last look at it and its mark (a report never followed by "unblocked").
        self._lock = threading.Lock()

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
        with self._lock:
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
            stack = where(frame) if frame else ""  # now: a frame is live, it moves on
            with self._lock:  # reported before the tick that follows says "unblocked"
                if self._tick != tick:
                    continue  # it ticked meanwhile: that stack is not the blocking code's
                self._stalled_since = tick
                log_event(
                    logger,
                    logging.WARNING,
                    "event loop blocked",
                    blocked_for_s=round(blocked, 3),
                    hint=(
                        "an async task that does not await stalls every flow: make a "
                        "blocking task a plain def (it runs in a thread)"
                    ),
                    stack=stack,
                )
