"""What a traffic experiment is: the document an operator sends, and the checks it needs no server for.

An experiment splits the calls to one model that name no version over ready versions by weight
(``variants``), mirrors a fraction of them to a challenger (``shadow``), or both. The same document
is the wire type of ``PUT /models/{name}/experiment`` and what the state store keeps, so replicas and
restarts see exactly what the operator sent. Whether its versions are loaded is the control plane's
check; how a user is assigned an arm is ``routing.py``'s.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from mlserve.errors import ValidationFailed

WEIGHT_TOLERANCE = 1e-9
"""How far the weights' sum may be from 1: floats like 0.7 + 0.2 + 0.1 are not exactly 1."""
MAX_SALT_CHARS = 200


class Shadow(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Mirror ``fraction`` of the model's calls to ``version`` after the primary answered."""

    version: str
    fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Experiment(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    variants: dict[str, float] = {}
    """Version -> share of the model's calls that name no version; empty: the active version answers."""
    salt: Annotated[str, msgspec.Meta(max_length=MAX_SALT_CHARS)] = ""
    """Part of the assignment hash: a new salt deals the users out afresh."""
    shadow: Shadow | None = None

    def versions(self) -> list[tuple[str, str]]:
        """Every version the experiment sends calls to, with the JSON path that names it."""
        named = [(version, f"$.variants.{version}") for version in self.variants]
        if self.shadow is not None:
            named.append((self.shadow.version, "$.shadow.version"))
        return named


def check(experiment: Experiment) -> None:
    """Refuse a document that cannot split traffic, with the JSON path of the fault."""
    if not experiment.variants and experiment.shadow is None:
        raise ValidationFailed("an experiment needs variants, a shadow, or both", "$")
    for version, weight in experiment.variants.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValidationFailed(f"weight {weight!r} is not a non-negative number", f"$.variants.{version}")
    if experiment.variants:
        total = math.fsum(experiment.variants.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise ValidationFailed(f"the weights must sum to 1, they sum to {total!r}", "$.variants")


decoder = msgspec.json.Decoder(Experiment)
