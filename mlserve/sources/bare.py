"""Bare model directories: one artifact and nothing else, as KServe's storage initializer lays out
``/mnt/models``. Named for what such a directory lacks (the repository's ``NAME/VERSION/model.toml``,
an MLflow ``MLmodel``), not for where it came from: any copy of a bucket looks the same.

The framework is read from the files: a pickle (``*.joblib``, ``*.pkl``, ``*.pickle``) is a
scikit-learn model, as KServe's sklearn server takes it; a ``*.pt`` or ``*.pth`` is a torch model,
TorchScript unless its ``model.toml`` names the ``nn.Module`` class of a ``state_dict``. What the
files cannot say (a torch model's input shape, class labels, batching) an optional ``model.toml``
beside them adds, in the repository's format less the fields the directory itself settles (name,
version, framework, artifact). The result is the same ``ModelSpec`` a repository version gives, so
everything downstream serves it unchanged.
"""

from __future__ import annotations

import numbers
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import msgspec

from mlserve.errors import LoadFailed
from mlserve.repository import METADATA_FILE, ModelSpec
from mlserve.schemas import ModelMetadata

MLFLOW_MODEL = "MLmodel"
"""The file that makes a directory an MLflow model, served by ``sources.mlflow`` instead."""
SUFFIXES = {".joblib": "sklearn", ".pkl": "sklearn", ".pickle": "sklearn", ".pt": "torch", ".pth": "torch"}
"""The framework of each artifact suffix."""
SETTLED = ("name", "version", "framework", "artifact")
"""What a bare directory's ``model.toml`` may not say: the command line and the files settle it."""
DESCRIPTIONS = {"sklearn": "scikit-learn model", "torch": "PyTorch model"}


def is_bare(directory: Path) -> bool:
    """Whether a local model directory is served from here: it is not an MLflow model."""
    return not (directory / MLFLOW_MODEL).is_file()


def bare_spec(model: str, version: str, directory: Path) -> ModelSpec:
    """The spec of a bare directory, served as ``model``:``version``; raises ``LoadFailed`` saying what
    to change when it cannot be served.

    A scikit-learn model's row width is asked of the estimator itself (``n_features_in_``, set by
    ``fit``), loaded here and let go: the server needs it before any worker loads the model, to stack
    batches and check requests. ``input_shape`` in ``model.toml`` spares that load.
    """
    metadata = _metadata(model, version, directory)
    if not metadata.input_shape:
        metadata = msgspec.structs.replace(metadata, input_shape=_estimator_width(directory / metadata.artifact))
    return ModelSpec(metadata, str(directory.resolve()))


def _metadata(model: str, version: str, directory: Path) -> ModelMetadata:
    """The metadata of a bare directory, from its file names, its torch archive's listing and its
    ``model.toml``, without unpickling anything.

    ``input_shape`` is empty for a scikit-learn model whose ``model.toml`` does not give it.
    """
    artifact = _artifact(directory)
    framework = SUFFIXES[artifact.suffix.lower()]
    described = _described(directory)
    if framework == "torch":
        _check_torch(artifact, described)
    fields = {
        "input_shape": [],
        "description": f"{DESCRIPTIONS[framework]} from {directory}",
        **described,
        "name": model,
        "version": version,
        "framework": framework,
        "artifact": artifact.name,
    }
    try:
        return msgspec.convert(fields, ModelMetadata)
    except msgspec.ValidationError as exc:
        raise LoadFailed(f"{directory / METADATA_FILE}: {exc}") from None


def _artifact(directory: Path) -> Path:
    """The one model file in ``directory`` (hidden files, such as Kubernetes' ``..data``, are not looked at)."""
    if not directory.is_dir():
        raise LoadFailed(f"{directory} is not a directory")
    found = sorted(
        path for path in directory.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in SUFFIXES
    )
    if not found:
        raise LoadFailed(
            f"{directory} holds no model: expected one model file (scikit-learn *.joblib, *.pkl or *.pickle; "
            f"TorchScript *.pt or *.pth) or an MLflow model ({MLFLOW_MODEL} file)"
        )
    if len(found) > 1:
        raise LoadFailed(
            f"{directory} holds {len(found)} model files ({', '.join(path.name for path in found)}): "
            "keep only the one to serve"
        )
    return found[0]


def _described(directory: Path) -> dict[str, Any]:
    """The fields of the optional ``model.toml``; those the directory settles are refused, not ignored."""
    path = directory / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            described = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LoadFailed(f"{path}: {exc}") from None
    settled = [field for field in SETTLED if field in described]
    if settled:
        raise LoadFailed(
            f"{path}: {', '.join(settled)} come from the command line and the files beside it in a bare "
            "model directory: remove them"
        )
    return described


def _check_torch(artifact: Path, described: dict[str, Any]) -> None:
    """A torch file serves as TorchScript, or as a ``state_dict`` whose class ``model.toml`` names;
    either way only ``model.toml`` can say the shape of an input row."""
    if not described.get("module_class") and not _is_torchscript(artifact):
        raise LoadFailed(
            f"{artifact} is not TorchScript (torch.save writes a pickle that needs its class): save it with "
            f'torch.jit.save, or add module_class = "package.module:Class" to a {METADATA_FILE} beside it'
        )
    if not described.get("input_shape"):
        raise LoadFailed(
            f"{artifact} does not record the shape of its input: add a {METADATA_FILE} beside it with "
            "input_shape = [...] (one row's shape, such as [4] or [3, 32, 32]), and an [image] table if the "
            "model takes images (see the demo image_classifier's model.toml)"
        )


def _is_torchscript(artifact: Path) -> bool:
    """TorchScript archives hold the module's code (``ARCHIVE/code/...``); ``torch.save`` archives do not."""
    try:
        with zipfile.ZipFile(artifact) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _estimator_width(path: Path) -> list[int]:
    """``[n_features_in_]`` of the estimator in ``path`` (a trusted pickle, as the workers load it)."""
    import joblib

    try:
        estimator = joblib.load(path)
    except Exception as exc:  # unpickling raises whatever the pickled classes raise
        raise LoadFailed(f"{path} is not a model joblib can load: {type(exc).__name__}: {exc}") from None
    width = getattr(estimator, "n_features_in_", None)
    if not isinstance(width, numbers.Integral):
        raise LoadFailed(
            f"{path} holds a {type(estimator).__name__} that does not say how many features it takes "
            f"(no n_features_in_): add input_shape = [N] to a {METADATA_FILE} beside it"
        )
    return [int(width)]
