"""Shadow traffic: copy a fraction of a model's calls to a challenger version and compare the answers.

The copy is sent only once the primary answer is ready and its handler has run, and nothing waits
for it, so it never delays, changes or fails the answer. It is dropped while the front end's event
loop has no headroom (``LoopLoad``: busy more than ``shadow_max_loop_busy`` of the last tenth of a
second) or the primary's batcher is saturated (calls wait, or every batch slot is busy); otherwise
it takes the shadow version's mirror lane: one batch at a time, only on an idle worker that other
batches then avoid, behind a short queue (see ``ControlPlane._runner``). So under load shadow copies
go first, and a slow shadow slows no answer. Each copy ends as one of ``agree``, ``disagree``,
``error`` (the shadow failed or ran out of time) or ``dropped``.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
from collections.abc import Awaitable
from functools import partial
from typing import Any

from mlserve.batcher import BatchResult, Rows
from mlserve.errors import MlserveError, QueueFull, ShuttingDown
from mlserve.experiments import Shadow
from mlserve.loopload import LoopLoad
from mlserve.metrics import Metrics, Series
from mlserve.registry import Registry, ServedVersion

Outcome = tuple[str, str, str, str]
"""(model, primary version, shadow version, result)."""
RELATIVE_TOLERANCE = 1e-6
"""Floats this close agree: the same model on another batch size may differ in the last bits."""


class ShadowTraffic:
    def __init__(self, registry: Registry, metrics: Metrics, load: LoopLoad) -> None:
        self._registry = registry
        self._metrics = metrics
        self._load = load
        self.outcomes: collections.Counter[Outcome] = collections.Counter()

    def follow(
        self, served: ServedVersion, shadow: Shadow, rows: Rows, timeout_s: float, answer: Awaitable[BatchResult]
    ) -> Awaitable[BatchResult]:
        """``answer`` itself, after arranging (for ``shadow.fraction`` of calls) its copy to the shadow."""
        if shadow.version == served.spec.version or random.random() >= shadow.fraction:
            return answer
        primary = asyncio.ensure_future(answer)
        loop = primary.get_loop()
        mirror = partial(self._mirror, served, shadow.version, rows, timeout_s)
        # call_soon from the done-callback: the copy goes after the waiting handler has resumed.
        primary.add_done_callback(lambda done: loop.call_soon(mirror, done))
        return primary

    def _mirror(
        self, served: ServedVersion, version: str, rows: Rows, timeout_s: float, primary: asyncio.Future[BatchResult]
    ) -> None:
        if primary.cancelled() or primary.exception() is not None:
            return  # no answer to compare with
        outcome = (served.spec.name, served.spec.version, version)
        target = self._registry.find(served.spec.name, version)
        lane = target.mirror if target is not None else None
        primaries = served.batcher
        if lane is None or not self._load.has_room() or (primaries is not None and primaries.saturated):
            # The front end or the primary's workers are busy: shadow copies are the first to go.
            self.outcomes[(*outcome, "dropped")] += 1
            return
        loop = primary.get_loop()
        try:
            copy = lane.submit(rows, timeout_s)
        except MlserveError:
            self.outcomes[(*outcome, "dropped")] += 1
            return
        latency = self._metrics.shadow_duration.get({"model": served.spec.name, "version": version})
        copy.add_done_callback(partial(self._compare, outcome, primary.result().values, loop.time(), latency))

    def _compare(
        self, outcome: tuple[str, str, str], expected: list[Any], sent: float, latency: Series,
        copy: asyncio.Future[BatchResult],
    ) -> None:
        if copy.cancelled() or isinstance(copy.exception(), (QueueFull, ShuttingDown)):
            result = "dropped"
        elif copy.exception() is not None:
            result = "error"
        else:
            latency.observe(copy.get_loop().time() - sent)
            result = "agree" if _same(expected, copy.result().values) else "disagree"
        self.outcomes[(*outcome, result)] += 1

    def counts(self, model: str) -> dict[str, int]:
        """Outcomes of ``model``'s shadow copies on this replica, by result."""
        totals: collections.Counter[str] = collections.Counter()
        for (name, _, _, result), count in self.outcomes.items():
            if name == model:
                totals[result] += count
        return dict(totals)

    def refresh_gauges(self, metrics: Metrics) -> None:
        for (model, primary, shadow, result), count in self.outcomes.items():
            metrics.shadow.set({"model": model, "primary": primary, "shadow": shadow, "result": result}, count)


def _same(expected: Any, got: Any) -> bool:
    """Whether two outputs agree: floats within a relative tolerance, an image's answers by class."""
    if isinstance(expected, float) and isinstance(got, float):
        return math.isclose(expected, got, rel_tol=RELATIVE_TOLERANCE, abs_tol=RELATIVE_TOLERANCE)
    if isinstance(expected, tuple) and isinstance(got, tuple):
        return bool(expected) and bool(got) and expected[0] == got[0]  # (class, confidence, probabilities)
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(map(_same, expected, got))
    return bool(expected == got)
