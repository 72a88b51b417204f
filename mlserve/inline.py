"""The inline executor: a model's batches run in the front end's own process, on its event loop.

For a model whose batch costs less than the trip to a worker (pickling the rows, two socket writes,
two wake-ups, unpickling the answer), that trip is most of the cost of a prediction. Inline, a batch
is one call: the batcher still groups the requests of a loop iteration, and the answer is ready when
the call returns. The price is isolation: an inline model that hangs stops the front end, one that
crashes takes it down, and ``max_compute_s`` and ``worker_max_memory_mb`` do not apply. So it is
chosen per model (``executor = "inline"`` in its batching settings), for cheap models only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from mlserve import ipc
from mlserve.errors import PredictionFailed
from mlserve.repository import ModelSpec
from mlserve.settings import WorkerOptions
from mlserve.worker import ModelTable, warmup_input

INLINE_BELOW_S = 0.0002
"""``executor = "auto"`` runs a version inline when its warm batch of ``max_batch_size`` rows takes
less than this: about what the trip to a worker and back costs the front end and the answer's wait."""
TIMED_BATCHES = 5
"""Batches timed to decide (the quickest counts: the others met a busy machine)."""


class InlineExecutor:
    """Loads models into this process and runs their batches at once, behind the pool's interface."""

    def __init__(self, options: WorkerOptions) -> None:
        self._table = ModelTable(options)

    async def load(self, spec: ModelSpec, warmup_rows: list[int]) -> ipc.LoadTimes:
        """Load and warm in a thread: reading an artifact may take long, the loop serves meanwhile."""
        try:
            return await asyncio.to_thread(self._table.load, spec, warmup_rows)
        except Exception as exc:
            raise PredictionFailed(f"{type(exc).__name__}: {exc}") from None

    async def batch_s(self, spec: ModelSpec, rows: int) -> float:
        """What a loaded version's warm batch of ``rows`` costs here: under ``INLINE_BELOW_S``, less than
        a trip to a worker."""
        batch = warmup_input(spec, rows)

        def quickest() -> float:
            times = []
            for _ in range(TIMED_BATCHES):
                started = time.perf_counter()
                self._table.predict(spec.key, batch)
                times.append(time.perf_counter() - started)
            return min(times)

        return await asyncio.to_thread(quickest)

    def unload(self, key: str) -> None:
        self._table.unload(key)

    def predict(self, key: str, rows: np.ndarray | list[bytes]) -> asyncio.Future[tuple[Any, float]]:
        """Run the batch now; the future is done when this returns, as the batcher expects of a pool's."""
        result: asyncio.Future[tuple[Any, float]] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        try:
            outputs = self._table.predict(key, rows)
        except Exception as exc:  # MemoryError too: the batch fails alone, as in a worker
            result.set_exception(PredictionFailed(f"{type(exc).__name__}: {exc}"))
        else:
            result.set_result((outputs, time.perf_counter() - started))
        return result
