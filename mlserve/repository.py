"""The model repository on disk: ``models/NAME/VERSION/model.toml`` plus the artifact it names.

Only what this scan finds can ever be loaded, and names are checked against a strict pattern, so a
request can never steer the server to a path of its choosing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from mlserve.errors import RepositoryError
from mlserve.schemas import MlflowInfo, ModelMetadata

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
METADATA_FILE = "model.toml"


class ModelSpec(msgspec.Struct, frozen=True):
    """One servable version: its metadata and the directory holding its artifact.

    It is what a worker process receives to load a model, so it stays small and picklable.
    """

    metadata: ModelMetadata
    directory: str
    example: list[list[float]] = []
    """Rows of realistic input to warm the model with (an MLflow model's ``input_example``); zeros
    when empty."""
    mlflow: MlflowInfo | None = None
    """Set for a version that came from MLflow (the registry or a local MLflow model)."""

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def key(self) -> str:
        return f"{self.metadata.name}:{self.metadata.version}"

    @property
    def artifact_path(self) -> str:
        return os.path.join(self.directory, self.metadata.artifact)


def valid_name(name: str) -> bool:
    return NAME_PATTERN.match(name) is not None


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order, so ``v10`` sorts after ``v9`` and the highest version is the newest."""
    parts = re.findall(r"\d+|\D+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def read_metadata(directory: Path) -> ModelMetadata:
    path = directory / METADATA_FILE
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
        metadata = msgspec.convert(raw, ModelMetadata)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise RepositoryError(f"{path}: {exc}") from None
    if (metadata.name, metadata.version) != (directory.parent.name, directory.name):
        raise RepositoryError(
            f"{path} says {metadata.name}/{metadata.version} but lies in "
            f"{directory.parent.name}/{directory.name}"
        )
    if os.sep in metadata.artifact or metadata.artifact.startswith("."):
        raise RepositoryError(f"{path}: artifact must be a file name inside its version directory")
    return metadata


def scan(models_dir: str | Path, errors: list[str] | None = None) -> list[ModelSpec]:
    """Every valid version under ``models_dir``, ordered by name and then version.

    A version with bad metadata raises, unless ``errors`` is given: then it is skipped and its
    fault appended there (a rescan must not fail because one new version is broken).
    """
    root = Path(models_dir)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist")
    specs = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and valid_name(p.name)):
        versions = [p for p in model_dir.iterdir() if p.is_dir() and valid_name(p.name)]
        for version_dir in sorted(versions, key=lambda p: version_order(p.name)):
            if not (version_dir / METADATA_FILE).is_file():
                continue
            try:
                specs.append(ModelSpec(read_metadata(version_dir), str(version_dir.resolve())))
            except RepositoryError as exc:
                if errors is None:
                    raise
                errors.append(str(exc))
    return specs


def _toml_value(value: object) -> str:
    # JSON's strings, numbers, booleans and arrays of them are valid TOML too.
    return json.dumps(value)


def _toml(metadata: ModelMetadata) -> str:
    """``model.toml`` text: plain fields first, then one table a nested field (``[batching]``, ``[image]``)."""
    fields = {key: value for key, value in msgspec.to_builtins(metadata).items() if value is not None}
    tables = {key: fields.pop(key) for key in list(fields) if isinstance(fields[key], dict)}
    lines = [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
    for table, values in tables.items():
        if values:
            lines.append(f"\n[{table}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_version(models_dir: str | Path, metadata: ModelMetadata, files: Mapping[str, bytes]) -> Path:
    """Publish a version atomically: readers see either no version directory or a complete one.

    ``files`` maps file names to contents and must hold the artifact ``metadata`` names.
    """
    if metadata.artifact not in files:
        raise RepositoryError(f"the files of {metadata.name}/{metadata.version} lack its artifact {metadata.artifact}")
    target = Path(models_dir) / metadata.name / metadata.version
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{metadata.version}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server running as another user
    for name, content in files.items():
        (staging / name).write_bytes(content)
    (staging / METADATA_FILE).write_text(_toml(metadata))
    if target.exists():
        retired = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(retired)
        staging.rename(target)
        for child in retired.iterdir():
            child.unlink()
        retired.rmdir()
    else:
        staging.rename(target)
    return target
