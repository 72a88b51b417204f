"""What gets measured: the scenario catalogue, filters and the time budget.

Why separate: the plan (which servers, which concurrencies, how long) is
decided before anything starts, so the harness can print an honest time
estimate and refuse silly combinations up front instead of 8 minutes in.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """One server configuration; all its concurrency points share one server start."""

    name: str
    kind: str  # "floor" or "mlserve"
    version: str  # model_version sent by wrk (the floor ignores it)
    batching: bool | None  # None for the floor

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return "HTTP floor (bare aiohttp)"
        return f"{self.version} batching={'on' if self.batching else 'off'}"

    @property
    def env(self) -> dict[str, str]:
        """Env vars that define the scenario (batching off = max batch size 1)."""
        if self.kind == "mlserve" and self.batching is False:
            return {"MLSERVE_BATCHING__MAX_BATCH_SIZE": "1"}
        return {}


# Order matters a little on a noisy box: the floor goes first so every later
# ratio uses a floor measured minutes, not hours, apart.
CATALOGUE: tuple[Scenario, ...] = (
    Scenario("floor", "floor", "v1", None),
    Scenario("v1-on", "mlserve", "v1", True),
    Scenario("v1-off", "mlserve", "v1", False),
    Scenario("v2-on", "mlserve", "v2", True),
    Scenario("v2-off", "mlserve", "v2", False),
)
DEFAULT_CONCURRENCY: tuple[int, ...] = (1, 16, 64, 256)


@dataclass(frozen=True)
class Timing:
    """Per-point durations; ``quick`` trades precision for a ~1-2 minute smoke run."""

    duration_s: float
    warmup_s: float
    offline_s: float

    @classmethod
    def default(cls, quick: bool) -> Timing:
        if quick:
            return cls(duration_s=3.0, warmup_s=1.0, offline_s=0.5)
        return cls(duration_s=15.0, warmup_s=3.0, offline_s=2.0)


def select(patterns: str | None) -> list[Scenario]:
    """Filter the catalogue by comma-separated names or globs (``v1-*,floor``)."""
    if not patterns:
        return list(CATALOGUE)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in CATALOGUE if any(fnmatch.fnmatchcase(s.name, p) for p in wanted)]
    unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(s.name, p) for s in CATALOGUE)]
    if unknown:
        names = ", ".join(s.name for s in CATALOGUE)
        raise ValueError(f"unknown scenario(s) {unknown}; choose from: {names}")
    return chosen


def parse_concurrency(text: str | None) -> list[int]:
    """``"1,16,64"`` -> [1, 16, 64]; sorted, deduplicated, all >= 1."""
    if not text:
        return list(DEFAULT_CONCURRENCY)
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise ValueError("concurrency values must be integers >= 1")
    return values


def estimate_seconds(
    scenarios: list[Scenario], concurrency: list[int], timing: Timing, offline: bool
) -> float:
    """Rough wall-clock estimate: wrk time + ~0.5 s per point + ~4 s per server start/stop."""
    per_point = timing.duration_s + timing.warmup_s + 0.5
    servers = len(scenarios) * 4.0
    training = 5.0 if any(s.kind == "mlserve" for s in scenarios) else 0.0
    offline_s = (4 * timing.offline_s + 3.0) if offline else 0.0
    return len(scenarios) * len(concurrency) * per_point + servers + training + offline_s
