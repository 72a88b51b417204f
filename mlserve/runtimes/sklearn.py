"""scikit-learn models saved with joblib (trusted artifacts only: joblib is pickle)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from mlserve import repository
from mlserve.repository import ModelSpec
from mlserve.schemas import ModelMetadata
from mlserve.settings import WorkerOptions

ARTIFACT = "model.joblib"


PROBE_ROWS = 256
"""Rows on which a fast path must agree exactly with the estimator's own ``predict`` to be used."""


class SklearnRuntime:
    def __init__(self, estimator: object, n_features: int) -> None:
        self._predict = _linear_classifier(estimator, n_features) or estimator.predict  # type: ignore[attr-defined]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(batch))


def _linear_classifier(estimator: object, n_features: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """A linear classifier's ``predict`` as scikit-learn computes it, without its per-call checks.

    For a few rows, ``predict`` is almost all input validation (dataframe and array-API detection,
    feature names, finiteness), ten times the arithmetic; the server has already checked that a batch
    is a numeric matrix of the right width, and a batch with a score that is not finite goes to
    ``predict``, which refuses it as it always has. Taken only for an estimator that uses
    ``LinearClassifierMixin``'s own ``predict`` and ``decision_function``, and only if it agrees
    exactly with ``predict`` on random rows at load; anything else keeps ``predict``.
    """
    if getattr(getattr(type(estimator), "predict", None), "__qualname__", "") != "LinearClassifierMixin.predict":
        return None  # settled without importing scikit-learn's linear models into a worker that has no use for them
    try:
        from sklearn.linear_model._base import LinearClassifierMixin
    except ImportError:  # a scikit-learn that moved it: no fast path
        return None
    kind = type(estimator)
    if kind.predict is not LinearClassifierMixin.predict or kind.decision_function is not LinearClassifierMixin.decision_function:
        return None
    coef = np.asarray(getattr(estimator, "coef_", None))
    intercept = np.asarray(getattr(estimator, "intercept_", None))
    classes = np.asarray(getattr(estimator, "classes_", None))
    if coef.ndim != 2 or coef.shape[1] != n_features or coef.dtype != np.float64:
        return None
    weights = np.ascontiguousarray(coef.T)

    def predict(batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 2 or batch.shape[1] != n_features:
            return estimator.predict(batch)  # type: ignore[attr-defined,no-any-return]  # its own error for the shape
        scores = batch @ weights + intercept
        if not np.isfinite(scores).all():
            return estimator.predict(batch)  # type: ignore[attr-defined,no-any-return]  # its own error for NaN or inf
        if scores.shape[1] == 1:
            return classes[(scores[:, 0] > 0).astype(np.intp)]
        return classes[scores.argmax(axis=1)]

    probe = np.random.default_rng(0).normal(scale=10.0, size=(PROBE_ROWS, n_features))
    try:
        agrees = np.array_equal(predict(probe), estimator.predict(probe))  # type: ignore[attr-defined]
    except Exception:
        return None
    return predict if agrees else None


def load(spec: ModelSpec, options: WorkerOptions) -> SklearnRuntime:
    estimator = joblib.load(spec.artifact_path)
    if not callable(getattr(estimator, "predict", None)):
        raise TypeError(f"{spec.artifact_path} holds a {type(estimator).__name__}, which has no predict")
    return SklearnRuntime(estimator, int(np.prod(spec.metadata.input_shape)))


def save(models_dir: str | Path, estimator: object, name: str, version: str, **metadata: Any) -> Path:
    """Publish a fitted estimator as ``models_dir/name/version`` with its ``model.toml``."""
    artifact = io.BytesIO()
    joblib.dump(estimator, artifact)
    spec = ModelMetadata(name=name, version=version, framework="sklearn", artifact=ARTIFACT, **metadata)
    return repository.write_version(models_dir, spec, {ARTIFACT: artifact.getvalue()})
