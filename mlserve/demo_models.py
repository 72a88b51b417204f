"""The bundled demo models, trained from data that ships inside scikit-learn (no downloads).

Training is deterministic (fixed seeds and split) and takes a few seconds. Labels are the iris class
names, so a prediction reads ``"setosa"`` rather than ``0``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

from mlserve import repository
from mlserve.runtimes import sklearn as sklearn_runtime

IRIS = "iris_classifier"
SEED = 42


def _iris_versions() -> dict[str, tuple[Any, str, dict[str, float]]]:
    return {
        "v1": (
            LogisticRegression(max_iter=1000),
            "Logistic regression on the four iris measurements; microseconds a batch.",
            {"max_batch_size": 64},
        ),
        "v2": (
            RandomForestClassifier(n_estimators=100, random_state=SEED),
            "Random forest of 100 trees; its cost is per call, not per row, so it gains most from batching.",
            {"max_batch_size": 128},
        ),
    }


def train_iris(models_dir: str | Path, force: bool = False) -> list[str]:
    """Train the versions missing from ``models_dir`` (all of them with ``force``); return their keys."""
    iris = load_iris()
    labels = iris.target_names[iris.target]
    x_train, x_test, y_train, y_test = train_test_split(
        iris.data, labels, test_size=0.3, random_state=SEED, stratify=labels
    )
    trained = []
    for version, (estimator, description, batching) in _iris_versions().items():
        if not force and (Path(models_dir) / IRIS / version / repository.METADATA_FILE).is_file():
            continue
        estimator.fit(x_train, y_train)
        accuracy = float(accuracy_score(y_test, estimator.predict(x_test)))
        sklearn_runtime.save(
            models_dir,
            estimator,
            IRIS,
            version,
            input_shape=[x_train.shape[1]],
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            accuracy=round(accuracy, 4),
            class_labels=[str(name) for name in iris.target_names],
            description=description,
            batching=batching,
        )
        trained.append(f"{IRIS}:{version} (held-out accuracy {accuracy:.3f})")
    return trained
