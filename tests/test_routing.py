"""Routing policy and the registry, in-process: which version answers, and what the table holds."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from mlserve.errors import ModelNotFound, ValidationFailed
from mlserve.experiments import Experiment, Shadow, check
from mlserve.metrics import Metrics
from mlserve.registry import Registry, ServedVersion
from mlserve.repository import ModelSpec
from mlserve.routing import Arms, Router
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
    assert router.route("iris", "v2")[0].spec.version == "v2"
    assert router.route("iris", None)[0].spec.version == "v1"
    registry.set_active("iris", "v2")
    assert router.route(None, None)[0].spec.version == "v2", "the router sees an activation at once"


def test_without_a_model_the_one_model_of_the_calls_kind_answers() -> None:
    registry = registry_of(served("iris", "v1"), served("digits", "v1", images=True))
    registry.set_active("iris", "v1")
    registry.set_active("digits", "v1")
    router = Router(registry)
    assert router.route(None, None, lambda s: not s.takes_images)[0].spec.name == "iris"
    assert router.route(None, None, lambda s: s.takes_images)[0].spec.name == "digits"
    with pytest.raises(ValidationFailed, match="`model` is required"):
        router.route(None, None)
    assert Router(registry, default_model="digits").route(None, None)[0].spec.name == "digits"


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


# -- experiments ------------------------------------------------------------------------------------------

USERS = [f"user-{n}" for n in range(10_000)]


def arms_of(variants: dict[str, float], salt: str = "") -> Arms:
    return Arms("iris", Experiment(variants=variants, salt=salt))


def assignments(arms: Arms, users: list[str] = USERS) -> list[str]:
    return [arms.pick(user) for user in users]


def test_each_variant_gets_its_weight_of_distinct_users() -> None:
    chosen = assignments(arms_of({"v1": 0.8, "v2": 0.2}))
    assert abs(chosen.count("v2") / len(chosen) - 0.2) < 0.02
    three = assignments(arms_of({"v1": 0.5, "v2": 0.3, "v3": 0.2}))
    for version, weight in (("v1", 0.5), ("v2", 0.3), ("v3", 0.2)):
        assert abs(three.count(version) / len(three) - weight) < 0.02, version


def test_assignment_is_the_same_in_another_process() -> None:
    """Python's own ``hash()`` differs per process; the assignment must not."""
    script = (
        "from mlserve.experiments import Experiment\n"
        "from mlserve.routing import Arms\n"
        "arms = Arms('iris', Experiment(variants={'v1': 0.5, 'v2': 0.5}, salt='x'))\n"
        "print(''.join(arms.pick(f'user-{n}')[-1] for n in range(2000)))\n"
    )
    here = "".join(version[-1] for version in assignments(arms_of({"v1": 0.5, "v2": 0.5}, "x"), USERS[:2000]))
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        there = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert there.stdout.strip() == here


def test_reweighting_moves_only_the_users_it_must() -> None:
    before = assignments(arms_of({"v1": 0.8, "v2": 0.2}))
    after = assignments(arms_of({"v1": 0.7, "v2": 0.3}))
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert set(moved) == {("v1", "v2")}, "raising v2's weight only moves users to v2"
    assert abs(len(moved) / len(USERS) - 0.1) < 0.01


def test_a_new_variant_takes_users_from_the_others_and_shuffles_no_one_else() -> None:
    before = assignments(arms_of({"v1": 0.5, "v2": 0.5}))
    after = assignments(arms_of({"v1": 0.4, "v2": 0.4, "v3": 0.2}))
    moved = {(a, b) for a, b in zip(before, after) if a != b}
    assert moved == {("v1", "v3"), ("v2", "v3")}


def test_a_new_salt_deals_the_users_out_afresh() -> None:
    first = assignments(arms_of({"v1": 0.5, "v2": 0.5}, "a"))
    second = assignments(arms_of({"v1": 0.5, "v2": 0.5}, "b"))
    assert 0.4 < sum(a != b for a, b in zip(first, second)) / len(USERS) < 0.6


def test_without_a_user_key_the_split_is_random_by_weight() -> None:
    arms = arms_of({"v1": 0.25, "v2": 0.75, "v3": 0.0})
    chosen = [arms.pick(None) for _ in range(8000)]
    assert abs(chosen.count("v1") / 8000 - 0.25) < 0.03
    assert "v3" not in chosen, "a zero weight gets nothing"
    assert arms.assigned == {"v1": chosen.count("v1"), "v2": chosen.count("v2"), "v3": 0}


def test_router_follows_the_experiment_unless_a_version_is_named() -> None:
    registry = registry_of(served("iris", "v1"), served("iris", "v2"))
    registry.set_active("iris", "v1")
    router = Router(registry)
    registry.set_experiment("iris", Experiment(variants={"v2": 1.0}))
    version, arms = router.route("iris", None, user="u")
    assert version.spec.version == "v2" and arms is not None and arms.assigned == {"v2": 1}
    assert router.route("iris", "v1") == (registry.get("iris", "v1"), None), "an explicit version wins"
    registry.set_experiment("iris", Experiment(shadow=Shadow(version="v2", fraction=0.5)))
    version, arms = router.route("iris", None)
    assert version.spec.version == "v1", "a shadow-only experiment leaves the active version answering"
    assert arms is not None and arms.experiment.shadow == Shadow(version="v2", fraction=0.5)
    registry.set_experiment("iris", None)
    assert router.route("iris", None) == (registry.get("iris", "v1"), None)


@pytest.mark.parametrize(
    ("document", "path"),
    [
        (Experiment(variants={"v1": 0.8, "v2": 0.19}), "$.variants"),
        (Experiment(variants={"v1": 1.2, "v2": -0.2}), "$.variants.v2"),
        (Experiment(variants={"v1": math.inf}), "$.variants.v1"),
        (Experiment(), "$"),
    ],
)
def test_bad_experiments_are_refused_with_the_path(document: Experiment, path: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        check(document)
    assert refused.value.path == path


def test_weights_summing_to_one_within_float_error_are_accepted() -> None:
    check(Experiment(variants={"a": 0.7, "b": 0.2, "c": 0.1}))  # 0.7 + 0.2 + 0.1 is 0.9999999999999999
