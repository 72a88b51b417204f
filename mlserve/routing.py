"""Which model version answers a call: the version asked for, else the model's active version.

Pure policy over the registry: no I/O, no state of its own beyond the configured default model, so it
is tested in-process and costs the hot path a few dictionary lookups.
"""

from __future__ import annotations

from collections.abc import Callable

from mlserve.errors import ModelNotFound, ValidationFailed
from mlserve.registry import Registry, ServedVersion

Fits = Callable[[ServedVersion], bool]
"""Whether a version can take an endpoint's kind of input, to find the one model of that kind."""


class Router:
    def __init__(self, registry: Registry, default_model: str | None = None) -> None:
        self._registry = registry
        self._versions = registry.models()
        self._active = registry.actives()
        self._default_model = default_model

    def route(self, model: str | None, version: str | None, fits: Fits | None = None) -> ServedVersion:
        """The version asked for. Without a model: the configured default, else the one model there is
        (counting only those whose active version ``fits``, so each endpoint finds its own kind)."""
        if model is None:
            model = self._default_model or self._only_model(fits)
        if version is None:
            version = self._active.get(model)
            if version is None and model in self._versions:
                raise ModelNotFound(f"model {model!r} has no active version")
        return self._registry.get(model, version or "")

    def _only_model(self, fits: Fits | None) -> str:
        names = [
            name
            for name, versions in self._versions.items()
            if fits is None or (name in self._active and fits(versions[self._active[name]]))
        ]
        if len(names) != 1:
            raise ValidationFailed("`model` is required: this server serves several models", "$.model")
        return names[0]
