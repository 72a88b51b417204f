"""scikit-learn models saved with joblib (trusted artifacts only: joblib is pickle)."""

from __future__ import annotations

import joblib
import numpy as np

from mlserve.repository import ModelSpec


class SklearnRuntime:
    def __init__(self, estimator: object) -> None:
        self._predict = estimator.predict  # type: ignore[attr-defined]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(batch))


def load(spec: ModelSpec) -> SklearnRuntime:
    estimator = joblib.load(spec.artifact_path)
    if not callable(getattr(estimator, "predict", None)):
        raise TypeError(f"{spec.artifact_path} holds a {type(estimator).__name__}, which has no predict")
    return SklearnRuntime(estimator)
