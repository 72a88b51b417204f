"""Write the run's JSON, markdown summary and PNG plots.

Why three outputs: JSON is the record other tools diff across days, the
markdown is what a human pastes into a PR, and the plots show the shape
(where throughput flattens, where p99 explodes) that a table hides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.analysis import against_reference, closed, headline_lines, times

_COLORS = {
    "floor": "black",
    "v1-on": "tab:blue",
    "v1-off": "tab:cyan",
    "v2-on": "tab:red",
    "v2-off": "tab:orange",
    "image-on": "tab:green",
    "image-off": "tab:olive",
    "mlserver-v1": "tab:purple",
    "mlserver-v2": "tab:brown",
    "mlflow-v1": "tab:pink",
    "v1-invocations": "tab:gray",
}
_FRONTEND_LINES = (("pool", "v1, batches in the worker pool", "tab:blue"),
                   ("inline", "v1, batches inline in each front end", "tab:green"),
                   ("floor", "HTTP floor processes", "black"))
"""The front-ends plot's lines: series, legend, colour."""
_REFERENCE_RATIOS = (("vs_reference", "req/s"), ("p50_vs_reference", "p50"), ("p99_vs_reference", "p99"))


def write_all(run: dict[str, Any], out_dir: Path, date: str) -> dict[str, Path]:
    """Write every artefact; returns their paths keyed by kind.

    The plots only some runs make are decided first, so that the JSON, written before any plot (a plot
    that fails must not cost the record), lists every artefact.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{date}.json",
        "markdown": out_dir / f"{date}.md",
        "throughput_png": out_dir / f"{date}-throughput.png",
        "latency_png": out_dir / f"{date}-latency.png",
        "open_loop_png": out_dir / f"{date}-open-loop.png",
        "batches_png": out_dir / f"{date}-batches.png",
    }
    if any(p.get("cache") for p in run["points"]) or run.get("outages"):
        paths["cache_png"] = out_dir / f"{date}-cache.png"
    if run.get("frontends"):
        paths["frontends_png"] = out_dir / f"{date}-frontends.png"
    if against_reference(run["points"]):
        paths["references_png"] = out_dir / f"{date}-references.png"
    run["artefacts"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(run, indent=2, sort_keys=False) + "\n")
    paths["markdown"].write_text(markdown(run))
    plot_throughput(run, paths["throughput_png"])
    plot_latency(run, paths["latency_png"])
    plot_open_loop(run, paths["open_loop_png"])
    plot_batches(run, paths["batches_png"])
    if "cache_png" in paths:
        plot_cache(run, paths["cache_png"])
    if "frontends_png" in paths:
        plot_frontends(run, paths["frontends_png"])
    if "references_png" in paths:
        plot_references(run, paths["references_png"])
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
        f"{' (quick run)' if cfg['quick'] else ''}; open-loop points on "
        f"{'wrk2 (' + host['wrk2'] + ')' if host.get('wrk2') else 'benchmarks/openloop.py'}.",
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
        "| scenario | c | req/s | % floor | on/off | vs MLServer | % offline b32 | p50 ms | p99 ms "
        "| mean batch | non-2xx | sock err | wrk CPU | server CPU (front end) | other CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in closed(run["points"]):
        if p.get("rps") is None:
            err = str(p.get('error', '?')).replace('|', '/').replace('\n', ' ')[:120]
            out.append(f"| {p['scenario']} | {p['concurrency']} | failed: {err} "
                       "| | | | | | | | | | | | |")
            continue
        r = p.get("ratios", {})
        out.append(
            f"| {p['scenario']} | {p['concurrency']} | {p['rps']:.0f} | {_pct(r.get('vs_floor'))} "
            f"| {_fmt(r.get('on_off'), '.2f', 'x')} | {_fmt(r.get('vs_peer'), '.2f', 'x')} "
            f"| {_pct(r.get('vs_offline_b32'))} "
            f"| {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {_fmt(p.get('mean_batch_size'), '.2f')} "
            f"| {p['non2xx']} | {p['socket_errors']} | {p['loadgen_cpu_pct']:.0f}% "
            f"| {_fmt(p.get('server_cpu_pct'), '.0f', '%')} "
            f"({_fmt(p.get('frontend_cpu_pct'), '.0f', '%')}) "
            f"| {_fmt(p.get('other_cpu_pct'), '.0f', '%')} |"
        )
    out.append("")
    out += _reference_table(run["points"])
    out += frontends_table(run.get("frontends", []))
    out += _cache_tables(run)
    out += _open_loop_table(run["points"])
    out += _open_loop_tails_table(run.get("open_loop_tails", []))

    offline = run.get("offline") or {}
    if offline.get("models"):
        out += ["## Offline compute ceiling (one process, one thread, no HTTP)", "",
                "| model:version | what is timed | batch 1 rows/s | batch 1 ms/call | batch 32 rows/s "
                "| batch 32 ms/call |", "|---|---|--:|--:|--:|--:|"]
        for key, e in offline["models"].items():
            if "error" in e:
                out.append(f"| {key} | error: {e['error']} | | | | |")
                continue
            b1, b32 = e["batch_1"], e["batch_32"]
            out.append(
                f"| {key} | {e['estimator']} | {b1['rows_per_s']:.0f} | {b1['ms_per_call']:.3f} "
                f"| {b32['rows_per_s']:.0f} | {b32['ms_per_call']:.3f} |"
            )
            cnn = e.get("cnn_only_batch_32")
            if cnn:
                out.append(f"| {key} | CNN alone | | | {cnn['rows_per_s']:.0f} | {cnn['ms_per_call']:.3f} |")
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
        "(server = all its processes; front end = the process we started, with several front ends their "
        "supervisor; other = host busy "
        "CPU minus server and wrk, i.e. noise from unrelated processes).",
        "",
    ]
    return "\n".join(out)


def _cache_tables(run: dict[str, Any]) -> list[str]:
    """The cache scenarios against the floor and against the same model with the cache off."""
    rows = [p for p in closed(run["points"]) if p.get("cache") and p.get("rps") is not None]
    out: list[str] = []
    if rows:
        out += ["## Prediction cache", "", "| scenario | c | req/s | % floor | vs cache off | p50 ms | p99 ms | non-2xx |",
                "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for p in rows:
            r = p.get("ratios", {})
            out.append(f"| {p['label']} | {p['concurrency']} | {p['rps']:.0f} | {_pct(r.get('vs_floor'))} "
                       f"| {_pct(r.get('vs_cache_off'))} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['non2xx']} |")
        out.append("")
    for outage in run.get("outages", []):
        out += [f"### {outage['label']}", "", "| second | Redis | req/s | p99 ms | non-2xx | socket errors |",
                "|--:|---|--:|--:|--:|--:|"]
        for s in outage["slices"]:
            out.append(f"| {s['second']} | {s['redis']} | {s['rps']:.0f} | {s['p99_ms']:.2f} | {s['non2xx']} "
                       f"| {s['socket_errors']} |")
        out.append("")
    return out


def _rows_ratio(point: dict[str, Any], reference: dict[str, Any]) -> str:
    """`` (rows/s 98304 / 14000 = 7.02x)`` where either point carries more than one row a request."""
    ratio = point["ratios"].get("rows_vs_reference")
    if ratio is None:
        return ""
    rows, reference_rows = (p["rps"] * p.get("rows_per_request", 1) for p in (point, reference))
    return f" (rows/s {rows:.0f} / {reference_rows:.0f} = {times(ratio)})"


def _reference_table(points: list[dict[str, Any]]) -> list[str]:
    """Each scenario against its reference (the same model served the plain way) at the same concurrency."""
    pairs = against_reference(points)
    if not pairs:
        return []
    out = ["## Against a reference scenario", "",
           "Ratios over the reference measured in this run: above 1 is more req/s or a longer latency. Where a "
           "request carries more than one row, the req/s ratio is followed by the rows/s ratio.", "",
           "| scenario / reference | c | req/s | req/s ratio | p50 ms | p50 ratio | p99 ms | p99 ratio |",
           "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for p, ref in pairs:
        r = p["ratios"]
        out.append(
            f"| {p['scenario']} / {ref['scenario']} | {p['concurrency']} | {p['rps']:.0f} / {ref['rps']:.0f} "
            f"| {times(r.get('vs_reference'))}{_rows_ratio(p, ref)} | {p['p50_ms']:.2f} / {ref['p50_ms']:.2f} "
            f"| {times(r.get('p50_vs_reference'))} | {p['p99_ms']:.2f} / {ref['p99_ms']:.2f} "
            f"| {times(r.get('p99_vs_reference'))} |"
        )
    return out + [""]


def frontends_table(rows: list[dict[str, Any]]) -> list[str]:
    """The front-ends table (``analysis.frontend_rows``): req/s at 64 connections by front ends and executor,
    over the single-process floor of this run."""
    if not rows:
        return []
    out = ["## Front ends (64 connections)", "",
           "Processes sharing the port with SO_REUSEPORT: mlserve's `--frontends` (the workers split between "
           "them) and the floor's processes. The ratio is over the single-process floor in this run, the ceiling "
           "one aiohttp process sets. Server CPU counts every process of the server; other CPU is what unrelated "
           "processes took meanwhile (noise).", "",
           "| scenario | front ends | executor | req/s | / 1-process floor | p50 ms | p99 ms | non-2xx | server CPU "
           "| other CPU |",
           "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        out.append(
            f"| {r['scenario']} | {r['frontends']} | {r['executor'] or '–'} | {r['rps']:.0f} "
            f"| {times(r['vs_single_floor'])} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non2xx']} "
            f"| {_fmt(r.get('server_cpu_pct'), '.0f', '%')} | {_fmt(r.get('other_cpu_pct'), '.0f', '%')} |"
        )
    return out + [""]


def _open_loop_table(points: list[dict[str, Any]]) -> list[str]:
    rows = [p for p in points if p.get("loop") == "open"]
    if not rows:
        return []
    out = [
        "## Open loop (fixed arrival rate, 256 connections)",
        "",
        "Latency counts from when a request fell due, waiting for a free connection included. "
        "Generator openloop (ours): lag is how late its ~1 ms timer saw requests fall due (not counted as "
        "latency), unanswered what was still in flight after the drain. Generator wrk2: answered req/s is the rate "
        "times the share of the requests its schedule made due that were answered (it opens its connections 5 ms "
        "apart, each on a schedule of its own); it reports neither lag nor unanswered, and its timer's lateness "
        "counts as latency. The generator shares the two cores with the server, so its CPU is the server's loss.",
        "",
        "| scenario | generator | target req/s | answered req/s | p50 ms | p99 ms | max ms | mean batch | non-2xx "
        "| unanswered | generator lag p99 ms | generator CPU | server CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in rows:
        if p.get("rps") is None:
            out.append(f"| {p['scenario']} | | {p['target_rps']:.0f} | failed | | | | | | | | | |")
            continue
        out.append(
            f"| {p['scenario']} | {p.get('generator', 'openloop')} | {p['target_rps']:.0f} | {p['rps']:.0f} "
            f"| {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['max_ms']:.1f} | {_fmt(p.get('mean_batch_size'), '.2f')} "
            f"| {p['non2xx']} | {_fmt(p.get('unanswered'), 'd')} | {_fmt(p.get('lag_p99_ms'), '.2f')} "
            f"| {p['loadgen_cpu_pct']:.0f}% | {_fmt(p.get('server_cpu_pct'), '.0f', '%')} |"
        )
    return out + [""]


def _open_loop_tails_table(rows: list[dict[str, Any]]) -> list[str]:
    """The served model's open-loop tails over the floor's at the same arrival rates, in this run."""
    if not rows:
        return []
    out = [
        "## Open-loop tails against the floor",
        "",
        "The floor runs at the served scenario's arrival rates (fractions of its closed-loop capacity), just "
        "after it, with the same generator: the p99 ratio is what serving the model adds to the tail.",
        "",
        "| scenario / floor | % capacity | target req/s | p50 ms | p99 ms | p99 ratio | generator |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['scenario']} / {r['floor']} | {100 * r['fraction']:.0f}% | {r['target_rps']:.0f} "
            f"| {r['p50_ms']:.2f} / {r['floor_p50_ms']:.2f} | {r['p99_ms']:.2f} / {r['floor_p99_ms']:.2f} "
            f"| {times(r['p99_vs_floor'])} | {r['generator']} |"
        )
    return out + [""]


def _series(run: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for p in closed(run["points"]):
        if p.get("rps") is not None:
            by_scenario.setdefault(p["scenario"], []).append(p)
    for pts in by_scenario.values():
        pts.sort(key=lambda p: p["concurrency"])
    return by_scenario


def _axes_log2(ax: Any, ticks: list[int], label: str) -> None:
    """A log-2 x axis ticked at the counts measured (connections, front ends), written plainly."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)


def _axes_concurrency(ax: Any, concurrency: list[int]) -> None:
    _axes_log2(ax, concurrency, "concurrent connections (closed loop)")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, legend_ax: Any, path: Path) -> None:
    """Legend to the right of ``legend_ax`` (when it has lines), then write and free the figure."""
    if legend_ax.get_legend_handles_labels()[0]:
        legend_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_throughput(run: dict[str, Any], path: Path) -> None:
    """req/s vs concurrency, one line per scenario (log y: floor dwarfs v2)."""
    plt = _pyplot()
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
    _save(plt, fig, ax, path)


def plot_latency(run: dict[str, Any], path: Path) -> None:
    """p50 and p99 vs concurrency side by side, log y, one line per scenario."""
    plt = _pyplot()
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
    fig.suptitle(f"mlserve latency {run['date']}" + (" (quick)" if run["config"]["quick"] else ""))
    _save(plt, fig, axes[1], path)


def plot_frontends(run: dict[str, Any], path: Path) -> None:
    """req/s at 64 connections against front ends (processes), one line per executor and the floor's
    processes, with the single-process floor across: where more processes stop paying."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    rows = run["frontends"]
    for series, label, color in _FRONTEND_LINES:
        by_count: dict[int, float] = {}
        for r in rows:
            if r["series"] == series:
                by_count.setdefault(r["frontends"], r["rps"])  # the first, where two measured the same
        if series == "floor" and set(by_count) <= {1}:
            continue  # the single-process floor alone: the line across says it
        counts = sorted(by_count)
        ax.plot(counts, [by_count[c] for c in counts], marker="o", color=color, label=label)
    single = next((r for r in rows if r["series"] == "floor" and r["frontends"] == 1), None)
    if single is not None:
        ax.axhline(single["rps"], color="grey", linestyle="--",
                   label=f"single-process floor ({single['rps']:.0f} req/s)")
    _axes_log2(ax, sorted({r["frontends"] for r in rows}), "front-end processes on one port (SO_REUSEPORT)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("requests/s at 64 connections")
    ax.set_title(f"mlserve front ends {run['date']}" + (" (quick)" if run["config"]["quick"] else ""))
    _save(plt, fig, ax, path)


def plot_open_loop(run: dict[str, Any], path: Path) -> None:
    """p50 and p99 against answered req/s at fixed arrival rates: where latency bends upward."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for p in run["points"]:
        if p.get("loop") == "open" and p.get("rps") is not None:
            by_scenario.setdefault(p["scenario"], []).append(p)
    for name, pts in by_scenario.items():
        pts.sort(key=lambda p: p["target_rps"])
        rates = [p["rps"] for p in pts]
        color = _COLORS.get(name)
        ax.plot(rates, [p["p99_ms"] for p in pts], marker="o", color=color, label=f"{pts[0]['label']} p99")
        ax.plot(rates, [p["p50_ms"] for p in pts], marker=".", color=color, linestyle=":",
                label=f"{pts[0]['label']} p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = plt.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    generators = sorted({p.get("generator", "openloop") for pts in by_scenario.values() for p in pts})
    ax.set_xlabel(f"answered requests/s (open loop, fixed arrival rate; {', '.join(generators) or 'no'} generator)")
    ax.set_ylabel("latency ms (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"mlserve latency against load {run['date']}")
    _save(plt, fig, ax, path)


def plot_cache(run: dict[str, Any], path: Path) -> None:
    """Left: req/s at 64 connections of the floor, cache off and each cache scenario. Right: req/s a
    second while the run's Redis is killed and restarted, against cache off."""
    plt = _pyplot()
    fig, (bars, timeline) = plt.subplots(1, 2, figsize=(13, 5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    at64 = {p["scenario"]: p for p in closed(run["points"]) if p["concurrency"] == 64 and p.get("rps")}
    names = [n for n in ("floor", "v1-on") if n in at64] + [n for n, p in at64.items() if p.get("cache")]
    bars.barh(range(len(names)), [at64[n]["rps"] for n in names], color="#4c72b0")
    bars.set_yticks(range(len(names)))
    bars.set_yticklabels(["v1 cache off" if n == "v1-on" else n for n in names])
    bars.invert_yaxis()
    bars.set_xlabel("req/s at 64 connections")
    bars.grid(True, axis="x", alpha=0.3)
    outages = run.get("outages", [])
    for outage in outages:
        seconds = [s["second"] for s in outage["slices"]]
        build = " (baseline build)" if outage.get("baseline") else ""
        timeline.plot(seconds, [s["rps"] for s in outage["slices"]], marker="o",
                      label=f"cache on Redis (L1 off){build}")
    if outages:
        down = [s["second"] for s in outages[0]["slices"] if s["redis"] == "down"]
        if down:
            timeline.axvspan(min(down) - 0.5, max(down) + 0.5, color="red", alpha=0.12, label="Redis killed")
        if "v1-on" in at64:
            timeline.axhline(at64["v1-on"]["rps"], color="grey", linestyle="--", label="cache off")
        timeline.set_xlabel("second")
        timeline.set_ylabel("req/s")
        timeline.set_ylim(bottom=0)
        timeline.grid(True, alpha=0.3)
        timeline.legend(fontsize=8)
    else:
        timeline.set_visible(False)
    fig.suptitle(f"mlserve prediction cache {run['date']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_references(run: dict[str, Any], path: Path) -> None:
    """Each scenario over its reference at the same concurrency: req/s, p50 and p99 ratios (1: the same)."""
    plt = _pyplot()
    pairs = against_reference(run["points"])
    fig, ax = plt.subplots(figsize=(9.5, 1.5 + 0.8 * len(pairs)), dpi=110)
    height = 0.8 / len(_REFERENCE_RATIOS)
    for i, (key, name) in enumerate(_REFERENCE_RATIOS):
        ax.barh([j + i * height for j in range(len(pairs))], [p["ratios"].get(key) or 0.0 for p, _ in pairs],
                height, label=name)
    ax.axvline(1.0, color="grey", linestyle="--")
    ax.set_yticks([j + height for j in range(len(pairs))])
    ax.set_yticklabels([f"{p['scenario']} / {ref['scenario']}\nc={p['concurrency']}" for p, ref in pairs],
                       fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to the reference in this run (req/s: higher is better; p50, p99: lower)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"mlserve against a reference scenario {run['date']}")
    _save(plt, fig, ax, path)


def plot_batches(run: dict[str, Any], path: Path) -> None:
    """Share of rows that ran in batches of each size, per batching-on scenario and concurrency."""
    plt = _pyplot()
    series = {name: [p for p in pts if p.get("batch_size_buckets")]
              for name, pts in _series(run).items() if pts[0]["batching"] and pts[0]["kind"] == "mlserve"}
    series = {name: pts for name, pts in series.items() if pts}
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(4.2 * max(1, len(series)), 4), dpi=110,
                             sharey=True, squeeze=False)
    for ax, (name, pts) in zip(axes[0], series.items()):
        bounds = [le for le in pts[0]["batch_size_buckets"] if le != "+Inf"]
        width = 0.8 / len(pts)
        for i, p in enumerate(pts):
            counts = p["batch_size_buckets"]
            # A bucket's rows are estimated at its upper bound: batches of 33-64 rows count as 64.
            rows = [counts.get(le, 0.0) * float(le) for le in bounds]
            total = sum(rows) or 1.0
            ax.bar([j + i * width for j in range(len(bounds))], [r / total for r in rows], width,
                   label=f"c={p['concurrency']}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bounds))])
        ax.set_xticklabels([f"{float(le):g}" for le in bounds], fontsize=7)
        ax.set_xlabel("batch size (rows, bucket upper bound)")
        ax.set_title(pts[0]["label"], fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of rows")
    fig.suptitle(f"mlserve batch sizes {run['date']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
