"""Minimal Prometheus text-format reader for the batch-size histogram.

Why hand-rolled: we need one histogram (``_sum``, ``_count`` and the buckets
of ``mlserve_batch_size`` for one model/version) and adding prometheus_client
as a benchmark dependency just to parse it is not worth it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>[^\s]+)"
)
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
BATCH_METRIC = "mlserve_batch_size"


@dataclass(frozen=True)
class HistTotals:
    """``_sum``, ``_count`` and cumulative buckets summed over matching label sets."""

    sum: float
    count: float
    series: int  # how many label sets matched; 0 means the metric is absent
    buckets: dict[str, float] = field(default_factory=dict)  # upper bound ("le") -> cumulative count

    def minus(self, before: HistTotals) -> HistTotals:
        buckets = {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return HistTotals(self.sum - before.sum, self.count - before.count, self.series, buckets)

    def per_bucket(self) -> dict[str, float]:
        """Observations in each bucket alone (not cumulative), in bound order."""
        ordered = sorted(self.buckets.items(), key=lambda item: float(item[0]))
        out, below = {}, 0.0
        for le, cumulative in ordered:
            out[le] = cumulative - below
            below = cumulative
        return out


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Return (name, labels, value) for every sample line; comments skipped."""
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if not match:
            continue
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        labels = dict(_LABEL_RE.findall(match.group("labels") or ""))
        samples.append((match.group("name"), labels, value))
    return samples


def histogram_totals(
    text: str,
    metric: str = BATCH_METRIC,
    model: str | None = None,
    version: str | None = None,
) -> HistTotals:
    """Sum ``<metric>_sum`` / ``_count`` / ``_bucket`` over label sets for model/version.

    The version label is accepted as ``version`` or ``model_version`` so a
    small naming change in the server does not silently zero the column.
    """
    total_sum = 0.0
    total_count = 0.0
    buckets: dict[str, float] = {}
    series: set[tuple[tuple[str, str], ...]] = set()
    for name, labels, value in parse_samples(text):
        if name == f"{metric}_bucket" and "le" in labels:
            le = labels.pop("le")
        elif name not in (f"{metric}_sum", f"{metric}_count"):
            continue
        if model is not None and labels.get("model") != model:
            continue
        label_version = labels.get("version", labels.get("model_version"))
        if version is not None and label_version != version:
            continue
        series.add(tuple(sorted(labels.items())))
        if name.endswith("_bucket"):
            buckets[le] = buckets.get(le, 0.0) + value
        elif name.endswith("_sum"):
            total_sum += value
        else:
            total_count += value
    return HistTotals(total_sum, total_count, len(series), buckets)
