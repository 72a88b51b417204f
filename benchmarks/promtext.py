"""Minimal Prometheus text-format reader for the batch-size histogram.

Why hand-rolled: we need two numbers (``_sum`` and ``_count`` of
``mlserve_batch_size`` for one model/version) and adding prometheus_client
as a benchmark dependency just to parse them is not worth it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>[^\s]+)"
)
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
BATCH_METRIC = "mlserve_batch_size"


@dataclass(frozen=True)
class HistTotals:
    """``_sum`` and ``_count`` summed over matching label sets."""

    sum: float
    count: float
    series: int  # how many label sets matched; 0 means the metric is absent

    def minus(self, before: HistTotals) -> HistTotals:
        return HistTotals(self.sum - before.sum, self.count - before.count, self.series)


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
    """Sum ``<metric>_sum`` / ``<metric>_count`` over label sets for model/version.

    The version label is accepted as ``version`` or ``model_version`` so a
    small naming change in the server does not silently zero the column.
    """
    total_sum = 0.0
    total_count = 0.0
    series: set[tuple[tuple[str, str], ...]] = set()
    for name, labels, value in parse_samples(text):
        if name not in (f"{metric}_sum", f"{metric}_count"):
            continue
        if model is not None and labels.get("model") != model:
            continue
        label_version = labels.get("version", labels.get("model_version"))
        if version is not None and label_version != version:
            continue
        series.add(tuple(sorted(labels.items())))
        if name.endswith("_sum"):
            total_sum += value
        else:
            total_count += value
    return HistTotals(total_sum, total_count, len(series))
