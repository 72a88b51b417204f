"""The table of served versions: what each (model, version) is, its state, and each model's active version.

A version moves ``unloaded -> loading -> ready -> draining -> unloaded``, or ``loading -> failed``
(with the reason). Only ``ready`` versions take traffic. The control plane makes every transition;
the data plane only reads. Each entry also holds what the hot path needs resolved once: the batcher,
the row shape, the class labels and the metric recorders.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np

from mlserve.batcher import Batcher
from mlserve.cache import CacheView
from mlserve.errors import ModelNotFound, ModelNotReady
from mlserve.experiments import Experiment
from mlserve.metrics import Metrics
from mlserve.repository import ModelSpec, version_order
from mlserve.schemas import WHOLE_COLUMN_TYPES
from mlserve.settings import BatchingSettings

State = Literal["unloaded", "loading", "ready", "draining", "failed"]
PREDICTION_ENDPOINTS = ("predict", "predict_ab", "predict_batch", "predict_image", "invocations", "v2_infer")


class ServedVersion:
    """One (model, version): its spec, effective batching knobs, state and, while ready, its batcher."""

    __slots__ = (
        "spec",
        "batching",
        "executor",
        "state",
        "error",
        "batcher",
        "mirror",
        "n_features",
        "row_shape",
        "takes_images",
        "columns",
        "integral",
        "labels",
        "queue_time",
        "compute_time",
        "batch_rows",
        "answered",
        "as_variant",
        "load_s",
        "warm_s",
        "cache",
    )

    def __init__(
        self, spec: ModelSpec, batching: BatchingSettings, metrics: Metrics, cache: CacheView | None = None
    ) -> None:
        self.spec = spec
        self.batching = batching
        self.executor = batching.executor
        """Where its batches run: ``batching.executor``, with ``auto`` resolved when it loads."""
        self.state: State = "unloaded"
        self.error: str | None = None
        self.batcher: Batcher | None = None
        self.mirror: Batcher | None = None
        """While ready: the lane that shadow calls take, one batch at a time (see ``shadow.py``)."""
        labels = {"model": spec.name, "version": spec.version}
        self.queue_time = metrics.queue_duration.get(labels)
        self.compute_time = metrics.inference_duration.get(labels)
        self.batch_rows = metrics.batch_size.get(labels)
        self.answered = {e: metrics.recorder(spec.name, spec.version, e, 200) for e in PREDICTION_ENDPOINTS}
        """Recorders of successful requests, by endpoint, resolved once for the hot path."""
        self.as_variant = {e: metrics.variant_recorder(spec.name, spec.version, e) for e in PREDICTION_ENDPOINTS}
        """The same, for requests an experiment assigned to this version."""
        self.row_shape = tuple(spec.metadata.input_shape)
        self.n_features = int(np.prod(self.row_shape))
        self.takes_images = spec.metadata.image is not None
        """An image model's rows are encoded images, decoded in the worker; others' are feature rows."""
        signature = spec.mlflow.signature if spec.mlflow is not None else []
        self.columns = tuple(column.name for column in signature)
        """The names of a row's features in order, when the model's signature names them (MLflow)."""
        self.integral = tuple(
            (index, column.name, column.type) for index, column in enumerate(signature) if column.type in WHOLE_COLUMN_TYPES
        )
        """The features whose declared type takes whole numbers only (and 0 or 1 for a boolean)."""
        self.labels = tuple(spec.metadata.class_labels)
        """Class names by index, so an integer prediction can be answered with its name too."""
        self.cache = cache
        """How this version uses the prediction cache; None when its predictions are not cached."""
        self.load_s: float | None = None
        self.warm_s: float | None = None
        """What the last load cost (the slowest worker's), for the metrics."""


class Registry:
    """Every known (model, version) and each model's active version."""

    def __init__(self) -> None:
        self._versions: dict[str, dict[str, ServedVersion]] = {}
        self._active: dict[str, str] = {}
        self._experiments: dict[str, Experiment] = {}
        self._unavailable: dict[str, str] = {}
        """Why each configured model without a version has none (its MLflow registry could not be reached)."""

    def add(self, served: ServedVersion) -> None:
        self._versions.setdefault(served.spec.name, {})[served.spec.version] = served

    def remove(self, model: str, version: str) -> None:
        """Forget a version (never the active one); a model left without versions goes too."""
        versions = self._versions.get(model, {})
        versions.pop(version, None)
        if not versions:
            self._versions.pop(model, None)
            self._active.pop(model, None)
            self._experiments.pop(model, None)

    def get(self, model: str, version: str) -> ServedVersion:
        versions = self._versions.get(model)
        if versions is None:
            reason = self._unavailable.get(model)
            if reason is not None:
                raise ModelNotReady(f"model {model!r} is unavailable: {reason}", None)
            raise ModelNotFound(f"unknown model {model!r}")
        served = versions.get(version)
        if served is None:
            raise ModelNotFound(f"model {model!r} has no version {version!r}; it has {', '.join(versions)}")
        return served

    def set_unavailable(self, model: str, reason: str | None) -> None:
        """Say why a configured model has no version to serve (None once it has one)."""
        if reason is None:
            self._unavailable.pop(model, None)
        else:
            self._unavailable[model] = reason

    def find(self, model: str, version: str) -> ServedVersion | None:
        return self._versions.get(model, {}).get(version)

    def versions(self, model: str) -> dict[str, ServedVersion]:
        """A model's versions in natural order (``v2`` before ``v10``); empty if unknown."""
        versions = self._versions.get(model, {})
        return {v: versions[v] for v in sorted(versions, key=version_order)}

    def models(self) -> dict[str, dict[str, ServedVersion]]:
        """Each model's versions as stored; the routing hot path reads this directly."""
        return self._versions

    def set_active(self, model: str, version: str) -> None:
        self.get(model, version)
        self._active[model] = version

    def active(self, model: str) -> str | None:
        return self._active.get(model)

    def actives(self) -> dict[str, str]:
        return self._active

    def set_experiment(self, model: str, experiment: Experiment | None) -> None:
        """Start, replace or (with None) end a model's experiment; the router sees it at once."""
        if experiment is None:
            self._experiments.pop(model, None)
        else:
            self._experiments[model] = experiment

    def experiment(self, model: str) -> Experiment | None:
        return self._experiments.get(model)

    def experiments(self) -> dict[str, Experiment]:
        """Each model's running experiment; the routing hot path reads this directly."""
        return self._experiments

    def __iter__(self) -> Iterator[ServedVersion]:
        """Every version, model by model."""
        for versions in list(self._versions.values()):
            yield from list(versions.values())

    def states(self) -> dict[str, str]:
        return {served.spec.key: served.state for served in self}
