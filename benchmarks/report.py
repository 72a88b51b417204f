"""Write the run's JSON, markdown summary and PNG plots.

Why three outputs: JSON is the record other tools diff across days, the
markdown is what a human pastes into a PR, and the plots show the shape
(where throughput flattens, where p99 explodes) that a table hides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.analysis import headline_lines

_COLORS = {
    "floor": "black",
    "v1-on": "tab:blue",
    "v1-off": "tab:cyan",
    "v2-on": "tab:red",
    "v2-off": "tab:orange",
}


def write_all(run: dict[str, Any], out_dir: Path, date: str) -> dict[str, Path]:
    """Write every artefact; returns their paths keyed by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{date}.json",
        "markdown": out_dir / f"{date}.md",
        "throughput_png": out_dir / f"{date}-throughput.png",
        "latency_png": out_dir / f"{date}-latency.png",
    }
    run["artefacts"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(run, indent=2, sort_keys=False) + "\n")
    paths["markdown"].write_text(markdown(run))
    plot_throughput(run, paths["throughput_png"])
    plot_latency(run, paths["latency_png"])
    return paths


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(run: dict[str, Any]) -> str:
    """Short markdown: headline, one results table, offline ceiling, log health."""
    cfg = run["config"]
    host = run["host"]
    out = [
        f"# mlserve benchmark {run['date']}",
        "",
        f"{host['cpus']} CPUs, Python {host['python']}, aiohttp {host['aiohttp']}, "
        f"{host['wrk']}; wrk -t1 pinned to core {cfg['wrk_core']}, closed loop, "
        f"{cfg['duration_s']:.0f}s per point after {cfg['warmup_s']:.0f}s warm-up, "
        f"mlserve --workers {cfg['workers']}, floor processes {cfg.get('floor_workers', 1)}"
        f"{' (quick run)' if cfg['quick'] else ''}.",
        "",
    ]
    if run.get("notes"):
        out += [f"> {note}" for note in run["notes"]] + [""]
    lines = headline_lines(run.get("headline", {}))
    if lines:
        out += ["## Headline", ""] + [f"- {line}" for line in lines] + [""]

    out += [
        "## Results",
        "",
        "| scenario | c | req/s | % floor | on/off | % offline b32 | p50 ms | p99 ms "
        "| mean batch | non-2xx | sock err | wrk CPU | server CPU (front end) | other CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in run["points"]:
        if p.get("rps") is None:
            err = str(p.get('error', '?')).replace('|', '/').replace('\n', ' ')[:120]
            out.append(f"| {p['scenario']} | {p['concurrency']} | failed: {err} "
                       "| | | | | | | | | | | |")
            continue
        r = p.get("ratios", {})
        out.append(
            f"| {p['scenario']} | {p['concurrency']} | {p['rps']:.0f} | {_pct(r.get('vs_floor'))} "
            f"| {_fmt(r.get('on_off'), '.2f', 'x')} | {_pct(r.get('vs_offline_b32'))} "
            f"| {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {_fmt(p.get('mean_batch_size'), '.2f')} "
            f"| {p['non2xx']} | {p['socket_errors']} | {p['wrk_cpu_pct']:.0f}% "
            f"| {_fmt(p.get('server_cpu_pct'), '.0f', '%')} "
            f"({_fmt(p.get('frontend_cpu_pct'), '.0f', '%')}) "
            f"| {_fmt(p.get('other_cpu_pct'), '.0f', '%')} |"
        )
    out.append("")

    offline = run.get("offline") or {}
    if offline.get("versions"):
        out += ["## Offline compute ceiling (one process, no HTTP)", "",
                "| version | estimator | batch 1 rows/s | batch 1 ms/call | batch 32 rows/s "
                "| batch 32 ms/call |", "|---|---|--:|--:|--:|--:|"]
        for version, e in offline["versions"].items():
            if "error" in e:
                out.append(f"| {version} | error: {e['error']} | | | | |")
                continue
            b1, b32 = e["batch_1"], e["batch_32"]
            out.append(
                f"| {version} | {e['estimator']} | {b1['rows_per_s']:.0f} | {b1['ms_per_call']:.3f} "
                f"| {b32['rows_per_s']:.0f} | {b32['ms_per_call']:.3f} |"
            )
        out.append("")
    elif offline.get("error"):
        out += [f"Offline ceiling failed: {offline['error']}", ""]

    out += ["## Server logs", "", "| scenario | startup s | WARNING | ERROR | tracebacks | log |",
            "|---|--:|--:|--:|--:|---|"]
    for name, s in run["scenarios"].items():
        logs = s.get("log_levels", {})
        out.append(
            f"| {name} | {_fmt(s.get('startup_s'), '.1f')} | {logs.get('warning', '–')} "
            f"| {logs.get('error', '–')} | {logs.get('traceback', '–')} "
            f"| {Path(s['log_path']).name if s.get('log_path') else '–'} |"
        )
    out += [
        "",
        "non-2xx = wrk's errors.status (HTTP status >= 400). % floor = req/s over the bare "
        "aiohttp floor at the same concurrency in this run. mean batch = delta of "
        "`mlserve_batch_size` _sum/_count around the measured window. CPU % is of one core "
        "(server = all its processes; front end = the process we started; other = host busy "
        "CPU minus server and wrk, i.e. noise from unrelated processes).",
        "",
    ]
    return "\n".join(out)


def _series(run: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for p in run["points"]:
        if p.get("rps") is not None:
            by_scenario.setdefault(p["scenario"], []).append(p)
    for pts in by_scenario.values():
        pts.sort(key=lambda p: p["concurrency"])
    return by_scenario


def _axes_concurrency(ax: Any, concurrency: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency)
    ax.set_xticklabels([str(c) for c in concurrency])
    ax.set_xlabel("concurrent connections (closed loop)")
    ax.grid(True, which="both", alpha=0.3)


def plot_throughput(run: dict[str, Any], path: Path) -> None:
    """req/s vs concurrency, one line per scenario (log y: floor dwarfs v2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    for name, pts in _series(run).items():
        label = pts[0]["label"]
        ax.plot([p["concurrency"] for p in pts], [p["rps"] for p in pts], marker="o",
                color=_COLORS.get(name), label=label,
                linestyle="--" if name.endswith("-off") else "-")
    _axes_concurrency(ax, run["config"]["concurrency"])
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title(f"mlserve throughput {run['date']}" + (" (quick)" if run["config"]["quick"] else ""))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(run: dict[str, Any], path: Path) -> None:
    """p50 and p99 vs concurrency side by side, log y, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8), dpi=110, sharey=True)
    for ax, key, title in ((axes[0], "p50_ms", "p50"), (axes[1], "p99_ms", "p99")):
        for name, pts in _series(run).items():
            ax.plot([p["concurrency"] for p in pts], [max(p[key], 1e-3) for p in pts],
                    marker="o", color=_COLORS.get(name), label=pts[0]["label"],
                    linestyle="--" if name.endswith("-off") else "-")
        _axes_concurrency(ax, run["config"]["concurrency"])
        ax.set_yscale("log")
        ax.set_title(f"{title} latency")
    axes[0].set_ylabel("latency ms (log)")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"mlserve latency {run['date']}" + (" (quick)" if run["config"]["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
