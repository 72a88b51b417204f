"""Routing policy and the registry, in-process: which version answers, and what the table holds."""

from __future__ import annotations

import pytest

from mlserve.errors import ModelNotFound, ValidationFailed
from mlserve.metrics import Metrics
from mlserve.registry import Registry, ServedVersion
from mlserve.repository import ModelSpec
from mlserve.routing import Router
from mlserve.schemas import ImageInput, ModelMetadata
from mlserve.settings import BatchingSettings


def served(model: str, version: str, images: bool = False) -> ServedVersion:
    metadata = ModelMetadata(
        name=model,
        version=version,
        framework="sklearn",
        artifact="model.joblib",
        input_shape=[3, 8, 8] if images else [4],
        image=ImageInput(size=[8, 8]) if images else None,
        class_labels=["a", "b"],
    )
    return ServedVersion(ModelSpec(metadata, f"/repo/{model}/{version}"), BatchingSettings(), Metrics())


def registry_of(*entries: ServedVersion) -> Registry:
    registry = Registry()
    for entry in entries:
        registry.add(entry)
    return registry


def test_explicit_version_wins_else_the_active_one() -> None:
    registry = registry_of(served("iris", "v1"), served("iris", "v2"))
    registry.set_active("iris", "v1")
    router = Router(registry)
    assert router.route("iris", "v2").spec.version == "v2"
    assert router.route("iris", None).spec.version == "v1"
    registry.set_active("iris", "v2")
    assert router.route(None, None).spec.version == "v2", "the router sees an activation at once"


def test_without_a_model_the_one_model_of_the_calls_kind_answers() -> None:
    registry = registry_of(served("iris", "v1"), served("digits", "v1", images=True))
    registry.set_active("iris", "v1")
    registry.set_active("digits", "v1")
    router = Router(registry)
    assert router.route(None, None, lambda s: not s.takes_images).spec.name == "iris"
    assert router.route(None, None, lambda s: s.takes_images).spec.name == "digits"
    with pytest.raises(ValidationFailed, match="`model` is required"):
        router.route(None, None)
    assert Router(registry, default_model="digits").route(None, None).spec.name == "digits"


def test_unknown_model_or_version_is_not_found() -> None:
    registry = registry_of(served("iris", "v1"))
    router = Router(registry)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        router.route("nope", None)
    with pytest.raises(ModelNotFound, match="no active version"):
        router.route("iris", None)
    with pytest.raises(ModelNotFound, match="has no version 'v9'; it has v1"):
        router.route("iris", "v9")
    with pytest.raises(ModelNotFound):
        registry.set_active("iris", "v9")


def test_registry_orders_versions_naturally_and_forgets_empty_models() -> None:
    registry = registry_of(served("m", "v10"), served("m", "v9"), served("m", "v2"))
    registry.set_active("m", "v10")
    assert list(registry.versions("m")) == ["v2", "v9", "v10"]
    assert registry.states() == {"m:v10": "unloaded", "m:v9": "unloaded", "m:v2": "unloaded"}
    for version in ("v2", "v9", "v10"):
        registry.remove("m", version)
    assert registry.models() == {} and registry.active("m") is None
    assert registry.find("m", "v2") is None


def test_a_version_keeps_its_labels_for_answers() -> None:
    assert served("iris", "v1").labels == ("a", "b")
