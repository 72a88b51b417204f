"""What a chaos scenario reports, and the run's three outputs: chaos.json, chaos.md and chaos.png.

A scenario's verdict is a list of checks (criterion, the figure measured, pass or fail) so the
markdown table, the exit status and the tests all read the same thing. Its time series (status codes
and latency percentiles per time bucket, by when each request fell due) is what the plot shows: a
table of p99s cannot show that refusals came in one second or that answers stopped while a worker
restarted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.chaosload import HUNG, LOST, REFUSED, RESET, Outcome

STATUS_LABELS = {LOST: "lost", RESET: "reset", REFUSED: "refused", HUNG: "hung"}
_COLORS = {
    "200": "tab:green", "429": "tab:orange", "503": "tab:red", "504": "tab:purple",
    "lost": "black", "reset": "sienna", "refused": "tab:gray", "hung": "magenta",
}


def label(status: int) -> str:
    return STATUS_LABELS.get(status, str(status))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank), 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def status_counts(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = label(outcome.status)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def series(outcomes: Sequence[Outcome], bucket_s: float) -> list[dict[str, Any]]:
    """Per ``bucket_s`` of due time: the count of each status, and the p50/p99 latency of each HTTP status."""
    buckets: dict[int, list[Outcome]] = {}
    for outcome in outcomes:
        buckets.setdefault(int(outcome.due // bucket_s), []).append(outcome)
    rows = []
    for index in range(min(buckets, default=0), max(buckets, default=-1) + 1):
        members = buckets.get(index, [])
        by_status: dict[str, list[float]] = {}
        for outcome in members:
            if outcome.status > 0:
                by_status.setdefault(label(outcome.status), []).append(outcome.latency)
        rows.append({
            "t": round(index * bucket_s, 3),
            "counts": status_counts(members),
            "latency_ms": {status: {"p50": ms(percentile(latencies, 0.50)), "p99": ms(percentile(latencies, 0.99))}
                           for status, latencies in sorted(by_status.items())},
        })
    return rows


@dataclass(frozen=True)
class Check:
    """One criterion of the issue, the figure that decides it, and whether it held."""

    key: str
    criterion: str
    figure: str
    passed: bool


@dataclass
class ScenarioResult:
    name: str
    title: str
    deadline_ms: float
    bucket_s: float
    figures: dict[str, Any]
    checks: list[Check]
    series: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> str:
        """The failed checks, one a line, for an assertion message."""
        return "\n".join(f"{c.key}: {c.criterion}: {c.figure}" for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def write_all(run: dict[str, Any], results: Sequence[ScenarioResult], out_dir: Path) -> dict[str, Path]:
    """chaos.json (everything), chaos.md (the verdict table) and chaos.png (the time series)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "chaos.json", "markdown": out_dir / "chaos.md", "png": out_dir / "chaos.png"}
    record = {**run, "passed": all(r.passed for r in results), "scenarios": [r.to_dict() for r in results]}
    paths["json"].write_text(json.dumps(record, indent=1) + "\n")
    paths["markdown"].write_text(markdown(run, results))
    if results:
        plot(results, paths["png"])
    return paths


def markdown(run: dict[str, Any], results: Sequence[ScenarioResult]) -> str:
    out = [
        f"# mlserve chaos suite {run['date']}",
        "",
        f"{run['cpus']} CPUs, Python {run['python']}, {'short' if run['short'] else 'full'} form, "
        f"{run['wall_s']:.0f} s in all. Real server processes, real Redis, loopback only; the load generator "
        "runs beside the server on the same cores. Latencies are from when a request fell due to its answer.",
        "",
        "| scenario | criterion | figure | pass |",
        "|---|---|---|:-:|",
    ]
    for result in results:
        for check in result.checks:
            verdict = "yes" if check.passed else "**no**"
            out.append(f"| {result.title} | {check.criterion} | {check.figure} | {verdict} |")
    out += ["", "## Figures", ""]
    for result in results:
        out.append(f"- **{result.title}** ({result.wall_s:.0f} s): " + ", ".join(
            f"{key} {_shown(value)}" for key, value in result.figures.items()))
    out += ["", "The plot (chaos.png) shows, per scenario, the statuses of the requests that fell due in each "
            "time bucket and the p50/p99 latency of those answered; dashed lines mark the chaos events.", ""]
    return "\n".join(out)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def plot(results: Sequence[ScenarioResult], path: Path) -> None:
    """One row a scenario: stacked status counts per bucket, and p50/p99 latency (log) with the deadline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(15, 3.1 * len(results)), dpi=100, squeeze=False)
    for (counts_ax, latency_ax), result in zip(axes, results, strict=True):
        _plot_counts(counts_ax, result)
        _plot_latency(latency_ax, result)
        for ax in (counts_ax, latency_ax):
            for at, _ in result.events:
                ax.axvline(at, color="grey", linestyle="--", linewidth=0.8)
            ax.set_xlabel("seconds")
            ax.grid(True, alpha=0.3)
        _name_events(counts_ax, result.events)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_counts(ax: Any, result: ScenarioResult) -> None:
    times = [row["t"] for row in result.series]
    statuses = sorted({key for row in result.series for key in row["counts"]}, key=lambda k: (k not in _COLORS, k))
    bottom = [0] * len(times)
    for status in statuses:
        counts = [row["counts"].get(status, 0) for row in result.series]
        ax.bar(times, counts, width=result.bucket_s, bottom=bottom, align="edge", label=status,
               color=_COLORS.get(status, "tab:brown"))
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_ylabel(f"requests / {result.bucket_s:g} s")
    ax.set_title(f"{result.title}: statuses ({'pass' if result.passed else 'FAIL'})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _plot_latency(ax: Any, result: ScenarioResult) -> None:
    """p50 and p99 of the 200s, and the p99 of every other status answered, per bucket."""
    statuses = sorted({status for row in result.series for status in row["latency_ms"]})
    lines = [("200", "p50", ":")] + [(status, "p99", "-" if status == "200" else "--") for status in statuses]
    for status, quantile, style in lines:
        points = [(row["t"] + result.bucket_s / 2, row["latency_ms"][status][quantile])
                  for row in result.series if status in row["latency_ms"]]
        if points:
            ax.plot([t for t, _ in points], [max(v, 0.01) for _, v in points], linestyle=style, marker=".",
                    color=_COLORS.get(status, "tab:brown"), label=f"{status} {quantile}")
    ax.axhline(result.deadline_ms, color="tab:red", linewidth=0.8, label="deadline")
    ax.set_yscale("log")
    ax.set_ylabel("latency ms")
    ax.set_title(f"{result.title}: latency by status", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _name_events(ax: Any, events: Sequence[tuple[float, str]]) -> None:
    """Label the events along the top; many of one kind (a kill every 2 s, each its pid) are named once."""
    named: set[str] = set()
    for at, what in events:
        kind = re.sub(r"\d+", "", what)
        if kind in named:
            continue
        named.add(kind)
        ax.annotate(what, (at, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="top", ha="right", color="dimgray")
