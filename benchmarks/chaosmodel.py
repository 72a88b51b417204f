"""The model the chaos suite serves: its capacity is set by the suite, not by the machine's speed.

A real model's rows per second depend on the CPU and on batching, so "ten times capacity" would
mean a different load on every machine and could exceed what a Python load generator can offer.
This one sleeps a fixed time per row, so two workers answer a known number of rows a second
whatever the batch size, while leaving the cores to the front end and the load generator. Workers
unpickle it, so it lives in a module of its own that imports nothing heavy.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mlserve.runtimes import sklearn as sklearn_runtime

MODEL = "chaos"
VERSION = "v1"
FEATURES = 4


HANG = -777.0
"""A row whose first feature is this never returns: a model stuck in a loop or a lock."""
HOG = -555.0
"""A row whose first feature is this asks for about 4.8 GB: a batch too big to compute."""


class RowCostModel:
    """Predicts ``2 * x[0]`` after sleeping ``per_row_s`` for every row of the batch; hangs on a ``HANG``
    row and exhausts memory on a ``HOG`` row."""

    def __init__(self, per_row_s: float) -> None:
        self.per_row_s = per_row_s

    def predict(self, batch: np.ndarray) -> np.ndarray:
        first = batch[:, 0]
        if (first == HANG).any():
            time.sleep(3600)
        if (first == HOG).any():
            return np.ones(600_000_000)[: len(batch)]
        time.sleep(self.per_row_s * len(batch))
        return first * 2


def write_repository(models_dir: Path, per_row_s: float, max_batch_size: int) -> Path:
    """A repository that holds only ``chaos`` v1 with this row cost and batch size."""
    sklearn_runtime.save(
        models_dir, RowCostModel(per_row_s), MODEL, VERSION, input_shape=[FEATURES],
        description=f"chaos suite model, {per_row_s * 1000:g} ms a row", batching={"max_batch_size": max_batch_size},
    )
    return models_dir
