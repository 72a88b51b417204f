"""scikit-learn models saved with joblib (trusted artifacts only: joblib is pickle)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from mlserve import repository
from mlserve.repository import ModelSpec
from mlserve.schemas import ModelMetadata
from mlserve.settings import WorkerOptions

ARTIFACT = "model.joblib"


class SklearnRuntime:
    def __init__(self, estimator: object) -> None:
        self._predict = estimator.predict  # type: ignore[attr-defined]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(batch))


def load(spec: ModelSpec, options: WorkerOptions) -> SklearnRuntime:
    estimator = joblib.load(spec.artifact_path)
    if not callable(getattr(estimator, "predict", None)):
        raise TypeError(f"{spec.artifact_path} holds a {type(estimator).__name__}, which has no predict")
    return SklearnRuntime(estimator)


def save(models_dir: str | Path, estimator: object, name: str, version: str, **metadata: Any) -> Path:
    """Publish a fitted estimator as ``models_dir/name/version`` with its ``model.toml``."""
    artifact = io.BytesIO()
    joblib.dump(estimator, artifact)
    spec = ModelMetadata(name=name, version=version, framework="sklearn", artifact=ARTIFACT, **metadata)
    return repository.write_version(models_dir, spec, {ARTIFACT: artifact.getvalue()})
