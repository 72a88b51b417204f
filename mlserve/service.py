"""``ModelService``: the data plane. A protocol-neutral ``Call`` is routed to a version, then run
(and, when an experiment shadows the model, copied to the shadow version after it answered).

Every protocol's handler decodes its own wire format into a ``Call`` and hands it here, so the
protocols share routing, readiness and batching and copy none of each other's internals. The
control plane changes what the registry holds; this module only reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable
from typing import Literal

import msgspec

from mlserve.batcher import NORMAL, BatchResult, Rows
from mlserve.cache import PredictionCache
from mlserve.errors import ModelNotReady
from mlserve.experiments import Experiment, Shadow
from mlserve.loopload import LoopLoad
from mlserve.metrics import Metrics
from mlserve.registry import Registry, ServedVersion
from mlserve.routing import Router
from mlserve.shadow import ShadowTraffic

Inputs = Literal["features", "image"]


class Call(msgspec.Struct, gc=False):
    """One prediction call, whatever protocol it came by."""

    model: str | None
    """None: the configured default model, else the one model of the call's kind of input."""
    version: str | None
    """None: the model's active version."""
    rows: Rows
    """Feature rows (lists of floats, validated against the routed version) or encoded images."""
    inputs: Inputs
    timeout_s: float
    """How long the call may take from now: the server's deadline or the client's, whichever is sooner."""
    routing_key: str | None = None
    """Who is calling (a user id), for sticky experiment arms; read only while experiments run."""
    fresh: bool = False
    """Skip the cache lookup (``Cache-Control: no-cache``); the answer is still stored."""
    priority: int | None = None
    """``batcher.HIGH``, ``NORMAL`` or ``LOW``; None until the handler reads it (``NORMAL`` by default)."""
    variant: str | None = None
    """Set by ``route`` when an experiment chose the version: that version."""
    shadow: Shadow | None = None
    """Set by ``route`` when the model's experiment copies calls to a shadow version."""


def _takes_images(served: ServedVersion) -> bool:
    return served.takes_images


def _takes_features(served: ServedVersion) -> bool:
    return not served.takes_images


_FITS = {"image": _takes_images, "features": _takes_features}


class ModelService:
    def __init__(
        self, registry: Registry, cache: PredictionCache, metrics: Metrics, load: LoopLoad,
        default_model: str | None = None,
    ) -> None:
        self._router = Router(registry, default_model)
        self._cache = cache
        self.shadow = ShadowTraffic(registry, metrics, load)
        self.experiments = registry.experiments()
        """Each model's running experiment: handlers read the caller's user key only while one runs."""

    def route(self, call: Call) -> ServedVersion:
        """The ready version that answers ``call``; raises ``ModelNotReady`` for one that is not."""
        served, arms = self._router.route(call.model, call.version, _FITS[call.inputs], call.routing_key)
        if arms is not None:
            if arms.versions:
                call.variant = served.spec.version
            call.shadow = arms.experiment.shadow
        if served.state != "ready":
            raise not_ready(served)
        return served

    def assigned(self, model: str, experiment: Experiment) -> dict[str, int]:
        """Calls this replica gave each of the experiment's variants since it began."""
        return dict(self._router.arms(model, experiment).assigned)

    def predict(self, served: ServedVersion, call: Call) -> Awaitable[BatchResult]:
        """Answer ``call``'s rows (validated against ``served``): from the cache, or the batcher.

        Without a cache, returns the batcher's future itself: a coroutine layer here would cost every
        request.
        """
        batcher = served.batcher
        if batcher is None:  # unloaded since it was routed
            raise not_ready(served)
        view = served.cache
        priority = NORMAL if call.priority is None else call.priority
        answer: Awaitable[BatchResult]
        if view is None:
            answer = batcher.submit(call.rows, call.timeout_s, None, priority)
        else:
            submit = batcher.submit if priority == NORMAL else functools.partial(batcher.submit, priority=priority)
            answer = self._cache.answer(view, call.rows, call.fresh, submit, call.timeout_s)
        if call.shadow is None:
            return answer
        return self.shadow.follow(served, call.shadow, call.rows, call.timeout_s, answer)


def not_ready(served: ServedVersion) -> ModelNotReady:
    """Why ``served`` takes no calls, and whether retrying soon can help (only while it loads)."""
    detail = f": {served.error}" if served.error else ""
    if served.state == "unloaded":
        detail = "; load or activate it through the admin API"
    retry = 1 if served.state == "loading" else None
    return ModelNotReady(f"{served.spec.key} is {served.state}{detail}", retry)
