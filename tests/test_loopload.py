"""``LoopLoad`` on a real event loop: a loop kept busy reads busy and has no room; an idle one does."""

from __future__ import annotations

import asyncio
import time

from mlserve.loopload import WINDOW_S, LoopLoad


async def spin(seconds: float) -> None:
    """Keep the loop working (short callbacks, never waiting) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        busy_until = time.perf_counter() + 0.002
        while time.perf_counter() < busy_until:
            pass
        await asyncio.sleep(0)


async def test_busy_loop_has_no_room_and_an_idle_one_has() -> None:
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    own_select = selector.select
    load = LoopLoad(max_busy=0.75)
    load.attach(asyncio.get_running_loop())
    try:
        await spin(WINDOW_S * 3)
        assert not load.has_room() and load.busy > 0.9, load.busy
        await asyncio.sleep(WINDOW_S * 3)
        assert load.has_room() and load.busy < 0.2, load.busy
        # A reading within a window does not end it: the last full window stands.
        await spin(WINDOW_S / 4)
        assert load.has_room()
    finally:
        load.detach()
    assert selector.select == own_select, "detach gives the loop its own select back"
