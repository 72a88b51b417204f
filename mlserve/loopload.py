"""``LoopLoad``: how busy the front end's event loop has been lately, for work that should only run
with headroom (shadow copies).

A batcher's queue says whether one model's workers are behind, not whether the front end is: at 64
connections on the cheap model the event loop is the bottleneck while every worker has slots free,
and a copy sent then costs answers (the copy's own submit, compare and IPC, and on a small machine
the worker's CPU beside the front end). The loop's busy share is the signal that sees this: the
wall time it did not spend waiting in ``select`` for the next event. It is read off the loop's own
selector (two clock reads an iteration, which serves many requests at load), so it counts every
kind of front-end work, HTTP parsing included, and costs nothing a request.

The share is taken over windows of ``WINDOW_S``: a reading made after the window ended closes it and
opens the next, so nothing runs on a timer and an idle server does no work for this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

WINDOW_S = 0.1
"""The span each busy share is measured over: short enough to follow a burst within a tenth of a second."""


class LoopLoad:
    def __init__(self, max_busy: float) -> None:
        self._max_busy = max_busy
        self._idle_s = 0.0
        self._window_start = time.perf_counter()
        self.busy = 0.0
        self._select: Callable[..., Any] | None = None
        self._selector: Any = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time the waits of ``loop``'s selector (an asyncio ``SelectorEventLoop``; on another loop,
        such as uvloop, the share stays 0 and nothing is held back)."""
        selector = getattr(loop, "_selector", None)
        if selector is None or self._selector is not None:
            return
        select = selector.select
        clock = time.perf_counter

        def timed_select(timeout: float | None = None) -> Any:
            started = clock()
            try:
                return select(timeout)
            finally:
                self._idle_s += clock() - started

        self._selector, self._select = selector, select
        selector.select = timed_select
        self._window_start = clock()

    def detach(self) -> None:
        if self._selector is not None:
            self._selector.select = self._select
            self._selector = self._select = None

    def share(self) -> float:
        """The busy share of the last window that ended; a window of at least ``WINDOW_S`` that is
        still open ends now."""
        now = time.perf_counter()
        span = now - self._window_start
        if span >= WINDOW_S:
            self.busy = min(1.0, max(0.0, 1.0 - self._idle_s / span))
            self._idle_s = 0.0
            self._window_start = now
        return self.busy

    def has_room(self) -> bool:
        """Whether the loop was busy less than the configured share in the last window."""
        return self.share() < self._max_busy
