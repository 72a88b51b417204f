"""Which model version answers a request: the version asked for, else the model's active version."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mlserve.errors import ModelNotFound, ValidationFailed

T = TypeVar("T")


class Router(Generic[T]):
    """Maps (model, version) to whatever the service serves them with; knows nothing of batching."""

    def __init__(self, default_model: str | None = None) -> None:
        self._default_model = default_model
        self._versions: dict[str, dict[str, T]] = {}
        self._active: dict[str, str] = {}

    def add(self, model: str, version: str, target: T) -> None:
        self._versions.setdefault(model, {})[version] = target

    def set_active(self, model: str, version: str) -> None:
        if version not in self._versions.get(model, {}):
            raise ModelNotFound(f"model {model!r} has no version {version!r}")
        self._active[model] = version

    def active(self, model: str) -> str | None:
        return self._active.get(model)

    def models(self) -> dict[str, dict[str, T]]:
        return self._versions

    def targets(self) -> Iterator[T]:
        """Every (model, version)'s target, model by model."""
        for versions in self._versions.values():
            yield from versions.values()

    def resolve(self, model: str | None, version: str | None, fits: Callable[[T], bool] | None = None) -> T:
        """The target asked for. Without a model: the configured default, else the one model there is
        (counting only those whose active version ``fits``, so each endpoint finds its own kind)."""
        if model is None:
            model = self._default_model or self._only_model(fits)
        versions = self._versions.get(model)
        if versions is None:
            raise ModelNotFound(f"unknown model {model!r}")
        if version is None:
            version = self._active.get(model)
            if version is None:
                raise ModelNotFound(f"model {model!r} has no active version")
        target = versions.get(version)
        if target is None:
            raise ModelNotFound(f"model {model!r} has no version {version!r}; it has {', '.join(versions)}")
        return target

    def _only_model(self, fits: Callable[[T], bool] | None) -> str:
        names = [
            name
            for name, versions in self._versions.items()
            if fits is None or (name in self._active and fits(versions[self._active[name]]))
        ]
        if len(names) != 1:
            raise ValidationFailed("`model` is required: this server serves several models", "$.model")
        return names[0]
