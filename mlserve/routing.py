"""Which model version answers a call: the version asked for, else an experiment's arm, else the active one.

Pure policy over the registry: no I/O and no state beyond what it compiles from the registry, so it
is tested in-process and costs the hot path a few dictionary lookups (one more with an experiment).

Sticky assignment is weighted rendezvous hashing: each arm draws its own point ``u`` in (0, 1) from
a blake2b hash of the user key, salted with the arm's identity (model, experiment salt, version), and
the user goes to the arm with the smallest ``-ln(u) / weight``, which an arm wins with a probability
equal to its weight. The hash is the same in every process, on every replica and after every restart
(Python's ``hash()`` is not: it is salted per process). Raising one arm's weight only moves users to
it, and adding an arm only takes users from the others, never shuffles users between them.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections.abc import Callable

from mlserve.errors import ModelNotFound, ValidationFailed
from mlserve.experiments import Experiment
from mlserve.registry import Registry, ServedVersion

Fits = Callable[[ServedVersion], bool]
"""Whether a version can take an endpoint's kind of input, to find the one model of that kind."""
POINT_SCALE = 2.0**64


class Arms:
    """A model's running experiment, compiled for the hot path, with the calls each arm was given."""

    __slots__ = ("experiment", "versions", "weights", "salts", "cumulative", "assigned")

    def __init__(self, model: str, experiment: Experiment) -> None:
        self.experiment = experiment
        arms = [(version, weight) for version, weight in experiment.variants.items() if weight > 0]
        self.versions = [version for version, _ in arms]
        self.weights = [weight for _, weight in arms]
        self.salts = [_arm_salt(model, experiment.salt, version) for version in self.versions]
        self.cumulative = list(itertools.accumulate(self.weights))
        self.assigned = dict.fromkeys(experiment.variants, 0)
        """Calls this replica gave each arm since the experiment (in this form) began."""

    def pick(self, user: str | None) -> str:
        """The arm of ``user`` (always the same), or a random arm by weight when there is no user."""
        if user is None:
            index = bisect.bisect_right(self.cumulative, random.random() * self.cumulative[-1])
            version = self.versions[min(index, len(self.versions) - 1)]
        else:
            version = self.versions[_rendezvous(self.salts, self.weights, user.encode())]
        self.assigned[version] += 1
        return version


def _arm_salt(model: str, salt: str, version: str) -> bytes:
    """The arm's 16-byte blake2b salt: a parameter of the hash, so it costs no extra compression the
    way a keyed hash's key block does."""
    return hashlib.blake2b(f"{model}\0{salt}\0{version}".encode(), digest_size=16).digest()


def _rendezvous(salts: list[bytes], weights: list[float], user: bytes) -> int:
    best, best_score = 0, math.inf
    for index, salt in enumerate(salts):
        draw = int.from_bytes(hashlib.blake2b(user, digest_size=8, salt=salt).digest(), "big")
        score = -math.log((draw + 0.5) / POINT_SCALE) / weights[index]
        if score < best_score:
            best, best_score = index, score
    return best


class Router:
    def __init__(self, registry: Registry, default_model: str | None = None) -> None:
        self._registry = registry
        self._versions = registry.models()
        self._active = registry.actives()
        self._experiments = registry.experiments()
        self._arms: dict[str, Arms] = {}
        self._default_model = default_model

    def route(
        self, model: str | None, version: str | None, fits: Fits | None = None, user: str | None = None
    ) -> tuple[ServedVersion, Arms | None]:
        """The version asked for, with the model's experiment when it chose it or shadows it.

        Without a model: the configured default, else the one model there is (counting only those
        whose active version ``fits``, so each endpoint finds its own kind). Without a version: the
        experiment's arm for ``user``, else the active version.
        """
        if model is None:
            model = self._default_model or self._only_model(fits)
        arms = None
        if version is None:
            experiment = self._experiments.get(model)
            if experiment is not None:
                arms = self.arms(model, experiment)
                if arms.versions:
                    version = arms.pick(user)
            if version is None:
                version = self._active.get(model)
                if version is None and model in self._versions:
                    raise ModelNotFound(f"model {model!r} has no active version")
        return self._registry.get(model, version or ""), arms

    def arms(self, model: str, experiment: Experiment) -> Arms:
        """The compiled form of ``model``'s experiment, rebuilt (counts from zero) when it changes."""
        arms = self._arms.get(model)
        if arms is None or arms.experiment is not experiment:
            arms = self._arms[model] = Arms(model, experiment)
        return arms

    def _only_model(self, fits: Fits | None) -> str:
        names = [
            name
            for name, versions in self._versions.items()
            if fits is None or (name in self._active and fits(versions[self._active[name]]))
        ]
        if len(names) != 1:
            raise ValidationFailed("`model` is required: this server serves several models", "$.model")
        return names[0]
