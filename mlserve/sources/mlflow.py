"""Models whose versions come from MLflow: the registry (``models:/NAME@ALIAS``, ``models:/NAME/3``,
``models:/NAME/Production``) or a local model directory: an MLflow model, or a bare one (``sources.bare``).

The registry is asked in a thread (MLflow's client blocks). A version's artifacts are downloaded once
into a local cache, keyed by registry, name and version and published atomically, so a restart
reuses them; the cache also remembers the last version served for each URI, so a server that starts
while the registry is down serves it again. MLflow is imported only by a server that has such a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from mlserve.errors import LoadFailed, RegistryUnavailable, SettingsError
from mlserve.repository import ModelSpec, valid_name
from mlserve.schemas import COLUMN_DTYPES, Column, MlflowInfo, ModelMetadata, SourceStatus
from mlserve.sources.bare import bare_spec, is_bare

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<ref>[^/@]+))$")
INFO_FILE = "mlserve-mlflow.json"
SERVED_FILE = "served.json"
LOCAL_VERSION = "1"
"""The version a local model directory (MLflow or bare) is served as: it has no registry to number it,
and it holds one model, so a new model is a new directory (a new server), not a new version."""
MAX_EXAMPLE_ROWS = 64

log = logging.getLogger(__name__)


class Reference(msgspec.Struct, frozen=True):
    """A parsed source URI: a registry name with one of alias, version or stage, or a local path."""

    uri: str
    name: str
    alias: str | None = None
    version: str | None = None
    stage: str | None = None
    path: str | None = None

    @property
    def watched(self) -> bool:
        """An alias or a stage can move to another version; a number or a directory cannot."""
        return self.alias is not None or self.stage is not None


def parse(uri: str) -> Reference:
    match = REGISTRY_URI.match(uri)
    if match is not None:
        name, alias, ref = match["name"], match["alias"], match["ref"]
        if ref is None:
            return Reference(uri, name, alias=alias)
        if ref.isdigit():
            return Reference(uri, name, version=ref)
        return Reference(uri, name, stage=ref)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", uri):  # models:/ malformed, or runs:/, s3://...
        raise SettingsError(
            f"model source {uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/STAGE "
            "or the path of a local model directory"
        )
    path = Path(uri).expanduser().resolve()
    return Reference(uri, path.name, path=str(path))


def served_name(uri: str) -> str:
    """The name ``mlserve serve --model URI`` serves a model as: its registry name or its directory's."""
    name = parse(uri).name
    if not valid_name(name):
        raise SettingsError(f"model source {uri!r}: {name!r} is not a valid model name")
    return name


def _iso(millis: int | None) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat() if millis else ""


def _signature(mlmodel: dict[str, Any], where: str) -> tuple[list[Column], list[int]]:
    """The named columns (empty for a tensor) and the row shape the model's signature declares."""
    inputs = (mlmodel.get("signature") or {}).get("inputs")
    if not inputs:
        raise LoadFailed(f"{where} has no signature: log it with signature=infer_signature(X) so its inputs are known")
    specs = json.loads(inputs)
    if len(specs) == 1 and specs[0].get("type") == "tensor":
        shape = specs[0].get("tensor-spec", {}).get("shape", [])
        if len(shape) < 2 or any(size < 1 for size in shape[1:]):
            raise LoadFailed(f"{where}: a tensor input of shape {shape} is not rows of a fixed size")
        return [], list(shape[1:])
    columns = [Column(name=str(spec.get("name", index)), type=spec.get("type", "")) for index, spec in enumerate(specs)]
    for column in columns:
        if column.type not in COLUMN_DTYPES:
            raise LoadFailed(f"{where}: input {column.name!r} is {column.type}; mlserve serves numeric inputs only")
    return columns, [len(columns)]


def _example(directory: Path, mlmodel: dict[str, Any], width: int) -> list[list[float]]:
    """The logged ``input_example``'s rows, when they are numeric rows of the right width."""
    info = mlmodel.get("saved_input_example_info") or {}
    try:
        raw = json.loads((directory / info["artifact_path"]).read_text())
    except (KeyError, OSError, ValueError):
        return []
    rows = raw.get("data", raw.get("inputs")) if isinstance(raw, dict) else raw
    try:
        example = [[float(value) for value in row] for row in rows[:MAX_EXAMPLE_ROWS]]
    except (TypeError, ValueError):
        return []
    return example if example and all(len(row) == width for row in example) else []


def spec_of(model: str, version: str, directory: Path, info: MlflowInfo) -> ModelSpec:
    """The spec of an MLflow model directory; ``info`` is completed with its flavor and signature."""
    import yaml  # MLflow's own dependency; imported here, where an MLflow model is read

    where = f"{model}:{version} ({info.source})"
    try:
        mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LoadFailed(f"{where}: cannot read its MLmodel file: {exc}") from None
    flavors = mlmodel.get("flavors") or {}
    flavor = "sklearn" if "sklearn" in flavors else "python_function" if "python_function" in flavors else None
    if flavor is None:
        raise LoadFailed(f"{where} has neither a sklearn nor a python_function flavor: {', '.join(flavors)}")
    columns, shape = _signature(mlmodel, where)
    info = msgspec.structs.replace(info, flavor=flavor, signature=columns)
    metadata = ModelMetadata(
        name=model,
        version=version,
        framework="mlflow",
        artifact="MLmodel",
        input_shape=shape,
        created_at=info.created_at,
        accuracy=info.metrics.get("accuracy"),
        description=f"MLflow {flavor} model from {info.source}",
    )
    width = 1
    for size in shape:
        width *= size
    return ModelSpec(metadata, str(directory), example=_example(directory, mlmodel, width), mlflow=info)


class MlflowSource:
    """One served model's MLflow source: resolves its URI, fetches versions, remembers the last served."""

    def __init__(self, model: str, uri: str, tracking_uri: str | None, cache_dir: str) -> None:
        self.model = model
        self.ref = parse(uri)
        self.status = SourceStatus(uri=uri, watched=self.ref.watched)
        self._tracking_uri = tracking_uri
        registry = hashlib.blake2b((tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")).encode(), digest_size=6)
        self._cache = Path(cache_dir) / registry.hexdigest() / self.ref.name
        self._client: Any = None

    def _mlflow_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            # MLflow logs a traceback for every database call that fails; the watch says it in one line.
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

            self._client = MlflowClient(tracking_uri=self._tracking_uri, registry_uri=self._tracking_uri)
        return self._client

    async def resolve(self) -> str:
        """The version the URI points to now; raises ``RegistryUnavailable`` when the registry cannot say."""
        try:
            version = await asyncio.to_thread(self._resolve)
        except RegistryUnavailable as exc:
            self.status.error, self.status.checked_at = str(exc), _now()
            raise
        self.status.version, self.status.checked_at = version, _now()
        return version

    def _resolve(self) -> str:
        ref = self.ref
        if ref.path is not None:
            return LOCAL_VERSION
        if ref.version is not None:
            return ref.version
        try:
            client = self._mlflow_client()
            if ref.alias is not None:
                return str(client.get_model_version_by_alias(ref.name, ref.alias).version)
            found = client.get_latest_versions(ref.name, stages=[ref.stage])
        except Exception as exc:  # MLflow raises its own, SQLAlchemy's and requests' errors alike
            raise RegistryUnavailable(f"cannot resolve {ref.uri}: {_reason(exc)}") from None
        if not found:
            raise RegistryUnavailable(f"cannot resolve {ref.uri}: no version of {ref.name} is in stage {ref.stage}")
        return str(found[0].version)

    async def fetch(self, version: str) -> ModelSpec:
        """The spec of ``version``, its artifacts downloaded into the cache unless already there.

        Raises ``LoadFailed`` when the version cannot be fetched or is not a model mlserve can serve.
        """
        return await asyncio.to_thread(self._fetch, version)

    def _fetch(self, version: str) -> ModelSpec:
        if self.ref.path is not None and is_bare(Path(self.ref.path)):
            return bare_spec(self.model, version, Path(self.ref.path))
        if self.ref.path is not None:
            info = MlflowInfo(source=self.ref.uri, registered_name=self.ref.name, version=version, flavor="")
            return spec_of(self.model, version, Path(self.ref.path), info)
        target = self._cache / version
        if not (target / INFO_FILE).is_file():
            self._download(version, target)
        try:
            info = msgspec.json.decode((target / INFO_FILE).read_bytes(), type=MlflowInfo)
        except (OSError, msgspec.DecodeError) as exc:
            raise LoadFailed(f"the cached {self.ref.name} version {version} is unreadable: {exc}") from None
        return spec_of(self.model, version, target, info)

    def _download(self, version: str, target: Path) -> None:
        """Download into a staging directory beside ``target``, then rename it into place: readers see
        a complete version or none, even if the server dies halfway (a dead download's staging
        directory starts with a dot and is never read)."""
        name = self.ref.name
        try:
            from mlflow.artifacts import download_artifacts

            client = self._mlflow_client()
            found = client.get_model_version(name, version)
            metrics = client.get_run(found.run_id).data.metrics if found.run_id else {}
            uri = client.get_model_version_download_uri(name, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
            try:
                # The artifacts land in a directory under ``staging`` named after the URI's last part.
                local = Path(download_artifacts(artifact_uri=uri, dst_path=str(staging), tracking_uri=self._tracking_uri))
                info = MlflowInfo(
                    source=self.ref.uri,
                    registered_name=name,
                    version=version,
                    flavor="",
                    aliases=list(found.aliases or []),
                    run_id=found.run_id,
                    created_at=_iso(found.creation_timestamp),
                    metrics={key: float(value) for key, value in metrics.items()},
                )
                (local / INFO_FILE).write_bytes(msgspec.json.encode(info))
                local.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except Exception as exc:
            raise LoadFailed(f"cannot download {name} version {version}: {_reason(exc)}") from None

    def last_served(self) -> str | None:
        """The version this URI was last served as, if its artifacts are still in the cache."""
        try:
            version = json.loads((self._cache / SERVED_FILE).read_text()).get(self.ref.uri)
        except (OSError, ValueError, AttributeError):
            return None
        return version if isinstance(version, str) and (self._cache / version / INFO_FILE).is_file() else None

    def remember(self, version: str) -> None:
        """Record ``version`` as the one served for this URI (atomically; a failure only costs the
        start-without-registry fallback, so it is not raised)."""
        if self.ref.path is not None:
            return
        path = self._cache / SERVED_FILE
        try:
            served = json.loads(path.read_text()) if path.is_file() else {}
            served[self.ref.uri] = version
            self._cache.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(prefix=".served-", dir=self._cache)
            with os.fdopen(fd, "w") as fh:
                json.dump(served, fh)
            os.replace(staging, path)
        except (OSError, ValueError) as exc:
            log.warning("cannot record %s:%s as served in %s: %s", self.model, version, path, exc)


def _reason(exc: BaseException) -> str:
    """The first line of an error, without MLflow's and SQLAlchemy's long tails."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
