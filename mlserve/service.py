"""``ModelService``: the data plane (``predict``) and the control plane (load, warm, activate, close).

It owns the router, one batcher per served version, and the pool's view of them. Handlers call it
and never touch a batcher or the pool themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
import numpy as np

from mlserve import repository
from mlserve.batcher import Batcher, BatchResult, Rows
from mlserve.errors import ModelNotReady, PredictionFailed, SettingsError
from mlserve.metrics import Metrics
from mlserve.pool import WorkerPool
from mlserve.repository import ModelSpec
from mlserve.routing import Router
from mlserve.schemas import ModelInfo, ModelsResponse, ModelVersionInfo
from mlserve.settings import BatchingSettings, Settings

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed"]
PREDICTION_ENDPOINTS = ("predict", "predict_batch", "predict_image")


class ServedVersion:
    """One (model, version): its spec, effective batching knobs, load state and batcher."""

    __slots__ = (
        "spec",
        "batching",
        "state",
        "error",
        "batcher",
        "n_features",
        "row_shape",
        "takes_images",
        "queue_time",
        "compute_time",
        "batch_rows",
        "answered",
    )

    def __init__(self, spec: ModelSpec, batching: BatchingSettings, metrics: Metrics) -> None:
        self.spec = spec
        self.batching = batching
        self.state: State = "loading"
        self.error: str | None = None
        self.batcher: Batcher | None = None
        labels = {"model": spec.name, "version": spec.version}
        self.queue_time = metrics.queue_duration.get(labels)
        self.compute_time = metrics.inference_duration.get(labels)
        self.batch_rows = metrics.batch_size.get(labels)
        self.answered = {e: metrics.recorder(spec.name, spec.version, e, 200) for e in PREDICTION_ENDPOINTS}
        """Recorders of successful requests, by endpoint, resolved once for the hot path."""
        self.row_shape = tuple(spec.metadata.input_shape)
        self.n_features = int(np.prod(self.row_shape))
        self.takes_images = spec.metadata.image is not None
        """An image model's rows are encoded images, decoded in the worker; others' are feature rows."""


def _takes_images(served: ServedVersion) -> bool:
    return served.takes_images


def _takes_features(served: ServedVersion) -> bool:
    return not served.takes_images


def _unchanged(rows: Rows) -> Rows:
    return rows


def _stacker(shape: tuple[int, ...]) -> Callable[[Rows], np.ndarray]:
    def stack(rows: Rows) -> np.ndarray:
        try:
            return np.array(rows, dtype=np.float64).reshape(len(rows), *shape)
        except ValueError as exc:
            raise PredictionFailed(f"could not stack the batch: {exc}") from None

    return stack


class ModelService:
    def __init__(self, settings: Settings, pool: WorkerPool, metrics: Metrics) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._router: Router[ServedVersion] = Router(settings.default_model)
        self._loading: asyncio.Task[None] | None = None
        metrics.on_scrape(self._refresh_gauges)

    def discover(self) -> None:
        """Register every version in the repository and pick active versions; fast and strict.

        Bad metadata or an active version that does not exist stops the server here, before it
        listens, rather than surfacing later as a model that never becomes ready.
        """
        specs = repository.scan(self._settings.models_dir)
        for spec in specs:
            batching = self._settings.batching_for(spec.name, spec.metadata.batching)
            self._router.add(spec.name, spec.version, ServedVersion(spec, batching, self._metrics))
        for name, versions in self._router.models().items():
            override = self._settings.models.get(name)
            wanted = override.active_version if override and override.active_version else None
            if wanted is not None and wanted not in versions:
                raise SettingsError(f"active_version {wanted!r} of model {name!r} is not in the repository")
            self._router.set_active(name, wanted or max(versions, key=repository.version_order))
        unknown = set(self._settings.models) - set(self._router.models())
        if unknown:
            log.warning("settings name models the repository does not hold: %s", ", ".join(sorted(unknown)))
        if not specs:
            log.warning("the model repository %s holds no models", self._settings.models_dir)

    def start_loading(self) -> None:
        self._loading = asyncio.get_running_loop().create_task(self._load_all())

    async def _load_all(self) -> None:
        for served in self._router.targets():
            await self._load(served)
        states = [served.state for served in self._router.targets()]
        if self.ready:
            log.info("ready: %d model version(s) loaded and warm on %d worker(s)", len(states), self._pool.size)
        else:
            log.error("%d of %d model version(s) failed to load", states.count("failed"), len(states))

    async def _load(self, served: ServedVersion) -> None:
        spec, knobs = served.spec, served.batching
        warmup_rows = sorted({1, knobs.max_batch_size})
        try:
            await self._pool.load(spec, warmup_rows)
        except Exception as exc:
            served.state, served.error = "failed", str(exc)
            log.error("loading %s failed: %s", spec.key, exc)
            return
        served.batcher = Batcher(
            self._runner(served),
            max_batch_size=knobs.max_batch_size,
            max_delay_ms=knobs.max_delay_ms,
            max_queue=knobs.max_queue,
            max_inflight=knobs.max_inflight or self._pool.size,
            overlap_after_ms=knobs.overlap_after_ms,
            name=spec.key,
            on_batch=served.batch_rows.observe,
            on_queued=served.queue_time.observe,
            on_computed=served.compute_time.observe,
        )
        served.state = "ready"
        log.info("loaded %s (%s)", spec.key, spec.metadata.framework)

    def _runner(self, served: ServedVersion) -> Callable[[Rows], asyncio.Future[tuple[Any, float]]]:
        key, pool = served.spec.key, self._pool
        # An image model's rows are encoded images that its worker decodes; feature rows stack here.
        prepare = _unchanged if served.takes_images else _stacker(served.row_shape)

        def run_batch(rows: Rows) -> asyncio.Future[tuple[Any, float]]:
            return pool.predict(key, prepare(rows))

        return run_batch

    @property
    def ready(self) -> bool:
        return all(served.state == "ready" for served in self._router.targets())

    def resolve(self, model: str | None, version: str | None, images: bool = False) -> ServedVersion:
        """The version that answers; without a model, the one model there is of the endpoint's kind."""
        served = self._router.resolve(model, version, _takes_images if images else _takes_features)
        if served.state != "ready":
            detail = f": {served.error}" if served.error else ""
            raise ModelNotReady(f"{served.spec.key} is {served.state}{detail}", 1 if served.state == "loading" else None)
        return served

    def predict(self, served: ServedVersion, rows: Rows, timeout_s: float) -> Awaitable[BatchResult]:
        """Run validated ``rows`` through the version's batcher, waiting at most ``timeout_s``.

        Returns the batcher's awaitable itself: a coroutine layer here would cost every request.
        """
        assert served.batcher is not None
        return served.batcher.submit(rows, timeout_s)

    def describe(self, name: str | None = None) -> ModelsResponse:
        models = []
        for model, versions in self._router.models().items():
            if name is not None and model != name:
                continue
            active = self._router.active(model)
            infos = [
                ModelVersionInfo(
                    name=model,
                    version=version,
                    state=served.state,
                    active=version == active,
                    framework=served.spec.metadata.framework,
                    created_at=served.spec.metadata.created_at,
                    accuracy=served.spec.metadata.accuracy,
                    input_shape=served.spec.metadata.input_shape,
                    class_labels=served.spec.metadata.class_labels,
                    description=served.spec.metadata.description,
                    batching=msgspec.structs.asdict(served.batching),
                    inputs="image" if served.takes_images else "features",
                    error=served.error,
                )
                for version, served in sorted(versions.items(), key=lambda item: repository.version_order(item[0]))
            ]
            models.append(ModelInfo(name=model, active_version=active, versions=infos))
        return ModelsResponse(models=models)

    def states(self) -> dict[str, str]:
        return {served.spec.key: served.state for served in self._router.targets()}

    def _refresh_gauges(self, metrics: Metrics) -> None:
        for served in self._router.targets():
            if served.batcher is not None:
                labels = {"model": served.spec.name, "version": served.spec.version}
                metrics.queue_depth.set(labels, served.batcher.queue_depth)
        metrics.workers_live.set({}, self._pool.live_workers)
        metrics.worker_restarts.set({}, self._pool.restart_count)

    async def close(self, timeout_s: float) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        batchers = [served.batcher for served in self._router.targets() if served.batcher]
        await asyncio.gather(*(b.close(timeout_s) for b in batchers))
