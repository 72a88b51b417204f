"""Models in MLflow's format (a directory with an ``MLmodel`` file), run inside a worker.

The sklearn flavor loads as the estimator itself, so it predicts a stacked batch exactly as a model
from the disk repository does. Any other model loads through ``mlflow.pyfunc`` and gets each batch
as one DataFrame with its signature's columns and types (or one array, for a tensor signature), so it
is batched the same way.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from mlserve.repository import ModelSpec
from mlserve.runtimes.sklearn import SklearnRuntime
from mlserve.schemas import COLUMN_DTYPES, Column
from mlserve.settings import WorkerOptions



class PyfuncRuntime:
    def __init__(self, model: Any, columns: list[Column]) -> None:
        self._predict = model.predict
        self._names = [column.name for column in columns]
        self._dtypes = {column.name: COLUMN_DTYPES[column.type] for column in columns}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        model_input: Any = batch
        if self._names:
            import pandas as pd

            model_input = pd.DataFrame(batch, columns=self._names).astype(self._dtypes)
        return _as_array(self._predict(model_input))


def _as_array(output: Any) -> np.ndarray:
    """A pyfunc's answer (list, Series, DataFrame or array) as an array with one entry a row."""
    if hasattr(output, "to_numpy"):
        output = output.to_numpy()
    array = np.asarray(output)
    return array[:, 0] if array.ndim == 2 and array.shape[1] == 1 else array


def load(spec: ModelSpec, options: WorkerOptions) -> SklearnRuntime | PyfuncRuntime:
    info = spec.mlflow
    if info is None:
        raise ValueError(f"{spec.key} is not an MLflow model")
    if info.flavor == "sklearn":
        import mlflow.sklearn

        # Fitted on a DataFrame, an estimator warns at every batch that ours has no column names; the
        # server has already checked the rows against the signature's columns, in that order.
        warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)

        return SklearnRuntime(mlflow.sklearn.load_model(spec.directory), int(np.prod(spec.metadata.input_shape)))
    import mlflow.pyfunc

    return PyfuncRuntime(mlflow.pyfunc.load_model(spec.directory), info.signature)
