"""Real models with controllable behaviour, served by the real server and worker processes.

They are not mocks: they are pickled with joblib, loaded by the sklearn runtime inside spawned
workers, and answer real requests. They exist to make races and failures reproducible: a predict
that takes a known time, one that kills its own worker process, a load that takes a while.
Workers must be able to import this module: tests put ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlserve.runtimes import sklearn as sklearn_runtime

CRASH_VALUE = -999.0
HANG_VALUE = -777.0
HOG_VALUE = -555.0


class SlowModel:
    """Predicts ``2 * x[0]`` after sleeping ``delay_s`` a call (whatever the batch size)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def predict(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        return batch[:, 0] * 2


class ScaledModel(SlowModel):
    """Predicts ``factor * x[0]``: a version that disagrees with ``SlowModel`` on every row."""

    def __init__(self, factor: float, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.factor = factor

    def predict(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        return batch[:, 0] * self.factor


class RaisingModel:
    """Raises on every real input. Warm-up rows (all zeros) pass, so the version loads and turns
    ready: a version broken only at predict time."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch.any():
            raise ValueError("this model is broken")
        return batch[:, 0]


class SlowRaisingModel(SlowModel):
    """Like ``RaisingModel``, after sleeping ``delay_s`` a call: a batch that fails while callers wait."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch.any():
            time.sleep(self.delay_s)
            raise ValueError("this model is broken")
        return batch[:, 0]


class CrashingModel(SlowModel):
    """Kills its worker process when a row's first feature is ``CRASH_VALUE``."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if (batch[:, 0] == CRASH_VALUE).any():
            os._exit(17)
        return super().predict(batch)


class HangingModel(SlowModel):
    """Never returns when a row's first feature is ``HANG_VALUE`` (a model stuck in a loop or a lock)."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if (batch[:, 0] == HANG_VALUE).any():
            time.sleep(3600)
        return super().predict(batch)


class MemoryHungryModel(SlowModel):
    """Asks for about 4.8 GB when a row's first feature is ``HOG_VALUE`` (a batch too big to compute)."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if (batch[:, 0] == HOG_VALUE).any():
            return np.ones(600_000_000)[: len(batch)]
        return super().predict(batch)


class WrongLengthModel:
    """Returns one output fewer than it was given rows: a broken model."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return batch[1:, 0]


class SlowLoadingModel(SlowModel):
    """Takes ``load_s`` to unpickle, so a test can see the server while models load."""

    def __init__(self, delay_s: float, load_s: float) -> None:
        super().__init__(delay_s)
        self.load_s = load_s

    def __setstate__(self, state: dict[str, Any]) -> None:
        time.sleep(state["load_s"])
        self.__dict__.update(state)


def write_model(
    models_dir: str | Path,
    name: str,
    version: str,
    estimator: object,
    n_features: int = 4,
    batching: dict[str, float] | None = None,
) -> Path:
    description = f"test model {type(estimator).__name__}"
    return sklearn_runtime.save(
        models_dir, estimator, name, version, input_shape=[n_features], description=description, batching=batching or {}
    )
