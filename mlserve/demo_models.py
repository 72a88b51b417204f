"""The bundled demo models, trained from data that ships inside scikit-learn (no downloads).

Training is deterministic (fixed seeds and split). The iris versions take a second; like the seed's
model they are trained on ``load_iris()``'s integer targets, so a prediction is the class index
(``0``) and the server adds its name (``"label": "setosa"``) from ``class_labels``. The image classifier is
a small CNN trained on the digits data rendered as 32x32 RGB images, in about half a minute.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.datasets import load_digits, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

from mlserve import repository
from mlserve.runtimes import sklearn as sklearn_runtime

if TYPE_CHECKING:
    from PIL.Image import Image

IRIS = "iris_classifier"
IMAGES = "image_classifier"
SEED = 42
DIGIT_SIZE = 32
DIGIT_EPOCHS = 8


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


def _iris_split() -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    iris = load_iris()
    return iris, *train_test_split(iris.data, iris.target, test_size=0.3, random_state=SEED, stratify=iris.target)


def train_iris(models_dir: str | Path, force: bool = False) -> list[str]:
    """Train the versions missing from ``models_dir`` (all of them with ``force``); return their keys."""
    iris, x_train, x_test, y_train, y_test = _iris_split()
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


def log_iris_to_mlflow(
    tracking_uri: str, name: str = "iris", alias: str = "champion", artifact_location: str | None = None
) -> list[str]:
    """Log the iris versions to an MLflow registry as versions of ``name`` (v1 first), with their
    signature, an input example and their held-out accuracy, and point ``alias`` at the first one.

    The estimators are the disk repository's, so a registry-sourced model and the same model from disk
    can be compared. Artifacts go to ``artifact_location`` (default: MLflow's, ``./mlruns`` for a
    database store). Returns the registry's version numbers.
    """
    import mlflow
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature

    iris, x_train, x_test, y_train, y_test = _iris_split()
    columns = list(iris.feature_names)
    frame = pd.DataFrame(x_train, columns=columns)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(name, artifact_location=artifact_location))
    else:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
    versions = []
    for version, (estimator, description, _) in _iris_versions().items():
        estimator.fit(frame, y_train)
        accuracy = float(accuracy_score(y_test, estimator.predict(pd.DataFrame(x_test, columns=columns))))
        with mlflow.start_run(run_name=f"{name}-{version}", description=description):
            mlflow.log_metric("accuracy", round(accuracy, 4))
            logged = mlflow.sklearn.log_model(
                estimator,
                name="model",
                registered_model_name=name,
                signature=infer_signature(frame, estimator.predict(frame)),
                input_example=frame.iloc[:2],
                # Our own forest: skops refuses tree storage it has not been told to trust.
                skops_trusted_types=["sklearn.tree._tree.Tree"],
            )
        versions.append(str(logged.registered_model_version))
    mlflow.MlflowClient().set_registered_model_alias(name, alias, versions[0])
    return versions


def digit_images() -> tuple[list[Image], np.ndarray, np.ndarray]:
    """Every digit as a 32x32 RGB image, its label, and the held-out indices (a quarter, stratified).

    Tests send these same images, encoded, so served accuracy is comparable to the recorded one.
    """
    from PIL import Image as PILImage

    digits = load_digits()
    images = [
        PILImage.fromarray(np.uint8(np.round(pixels * 255 / 16)))
        .resize((DIGIT_SIZE, DIGIT_SIZE), PILImage.Resampling.BILINEAR)
        .convert("RGB")
        for pixels in digits.images
    ]
    _, held_out = train_test_split(
        np.arange(len(images)), test_size=0.25, random_state=SEED, stratify=digits.target
    )
    return images, digits.target, np.sort(held_out)


def train_digits(models_dir: str | Path, force: bool = False) -> list[str]:
    """Train ``image_classifier`` v1 unless it exists (or with ``force``); return its key."""
    if not force and (Path(models_dir) / IMAGES / "v1" / repository.METADATA_FILE).is_file():
        return []
    import torch
    from torchvision import transforms

    from mlserve.digits_cnn import DigitsCNN
    from mlserve.runtimes import torch as torch_runtime
    from mlserve.schemas import ImageInput

    image_input = ImageInput(size=[DIGIT_SIZE, DIGIT_SIZE])
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(image_input.mean, image_input.std)])
    images, labels, held_out = digit_images()
    inputs = torch.stack([to_input(image) for image in images])
    targets = torch.as_tensor(labels)
    train = np.setdiff1d(np.arange(len(images)), held_out)

    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.as_tensor(train)
    for _ in range(DIGIT_EPOCHS):
        model.train()
        for batch in order[torch.randperm(len(order))].split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        predicted = model(inputs[held_out]).argmax(dim=1)
    accuracy = float((predicted == targets[held_out]).float().mean())
    torch_runtime.save(
        models_dir,
        model,
        inputs[:1],
        IMAGES,
        "v1",
        input_shape=[3, DIGIT_SIZE, DIGIT_SIZE],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        accuracy=round(accuracy, 4),
        class_labels=[str(digit) for digit in range(10)],
        description="Small CNN on scikit-learn's digits rendered as 32x32 RGB; POST images to /predict/image.",
        batching={"max_batch_size": 32},
        image=image_input,
    )
    return [f"{IMAGES}:v1 (held-out accuracy {accuracy:.3f})"]
