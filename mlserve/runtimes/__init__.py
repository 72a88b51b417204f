"""One module a framework. Each loads a spec and predicts a stacked batch; nothing else.

Modules are imported on first use, inside the worker, so a server of scikit-learn models never pays
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from mlserve.repository import ModelSpec
from mlserve.settings import WorkerOptions

FRAMEWORKS = {
    "sklearn": "mlserve.runtimes.sklearn",
    "torch": "mlserve.runtimes.torch",
    "mlflow": "mlserve.runtimes.mlflow",
}


class Runtime(Protocol):
    def predict(self, batch: np.ndarray) -> np.ndarray: ...


def load(spec: ModelSpec, options: WorkerOptions) -> Runtime:
    module_name = FRAMEWORKS.get(spec.metadata.framework)
    if module_name is None:
        raise ValueError(
            f"unknown framework {spec.metadata.framework!r}; known: {', '.join(sorted(FRAMEWORKS))}"
        )
    return importlib.import_module(module_name).load(spec, options)
