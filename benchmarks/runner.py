"""Execute a benchmark plan: train, offline ceiling, then every server x concurrency.

Why one sequential runner: everything is measured in one process run, in a
fixed order, so the ratios between scenarios are taken minutes apart on the
same machine state.  Failures are recorded per scenario/point and the run
goes on; Ctrl-C stops the servers and still writes a partial report.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import analysis, hoststat, offline, promtext, report, servers
from benchmarks.scenarios import Scenario, Timing
from benchmarks.wrk_runner import WrkError, run_wrk

MODEL = "iris_classifier"
# Other processes using more than this (% of one core) during a point make it suspect.
NOISY_OTHER_CPU_PCT = 20.0


@dataclass
class Plan:
    """Everything decided before the first process starts."""

    scenarios: list[Scenario]
    concurrency: list[int]
    timing: Timing
    quick: bool
    workers: int
    floor_workers: int
    wrk_core: int | None
    out_dir: Path
    models_dir: Path | None
    mlserve_cmd: list[str] | None
    run_offline: bool
    notes: list[str] = field(default_factory=list)


class Progress:
    """``[i/N] label ...`` on one line per step, result appended when done."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.t0 = time.perf_counter()

    def start(self, label: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {label} ...", end="", flush=True)

    def end(self, result: str) -> None:
        print(f" {result} ({time.perf_counter() - self.t0:.0f}s elapsed)", flush=True)


def _sigterm_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def count_steps(plan: Plan, train: bool) -> int:
    per_server = 1 + len(plan.concurrency)
    return int(train) + int(plan.run_offline) + len(plan.scenarios) * per_server


def _wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].split(" [")[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "wrk ?"


def _read_batch_metrics(base_url: str, version: str) -> promtext.HistTotals | None:
    try:
        status, body = servers.http_get(f"{base_url}/metrics", timeout=5.0)
    except OSError:
        return None
    if status != 200:
        return None
    return promtext.histogram_totals(body.decode(errors="replace"), model=MODEL, version=version)


def _sanity(server: servers.Server, scenario: Scenario) -> dict[str, Any]:
    """One real request before load: a broken contract should be loud, not a 0 req/s row."""
    body = json.dumps(
        {"features": [5.1, 3.5, 1.4, 0.2], "model": MODEL, "model_version": scenario.version}
    ).encode()
    try:
        status, raw = servers.http_post_json(f"{server.base_url}/predict", body)
    except OSError as exc:
        return {"ok": False, "error": repr(exc)}
    result: dict[str, Any] = {"status": status, "body": raw[:300].decode(errors="replace")}
    ok = status == 200
    if ok and scenario.kind == "mlserve":
        try:
            data = json.loads(raw)
            missing = [k for k in ("prediction", "model", "model_version", "inference_time_ms")
                       if k not in data]
            if missing:
                result["missing_keys"] = missing
            ok = not missing and data.get("model_version") == scenario.version
        except ValueError:
            ok = False
    result["ok"] = ok
    return result


def measure_point(
    server: servers.Server, scenario: Scenario, concurrency: int, plan: Plan
) -> dict[str, Any]:
    """Warm up, then one measured wrk run with metrics and server CPU around it."""
    url = f"{server.base_url}/predict"
    point = _point_header(scenario, concurrency)
    timeout_s = max(10.0, 2 * plan.timing.duration_s)
    if plan.timing.warmup_s > 0:
        run_wrk(url, concurrency, plan.timing.warmup_s, scenario.version, MODEL,
                plan.wrk_core, timeout_s)
        time.sleep(0.2)  # let warm-up stragglers drain before the "before" snapshot
    before = _read_batch_metrics(server.base_url, scenario.version) if scenario.kind == "mlserve" else None
    cpu_before = server.cpu_seconds()
    host_before = hoststat.sample()
    res = run_wrk(url, concurrency, plan.timing.duration_s, scenario.version, MODEL,
                  plan.wrk_core, timeout_s)
    host_after = hoststat.sample()
    cpu_after = server.cpu_seconds()
    after = _read_batch_metrics(server.base_url, scenario.version) if scenario.kind == "mlserve" else None
    point.update(res.to_dict())
    wall = res.wrk_wall_s
    point["server_cpu_s"] = round(cpu_after[0] - cpu_before[0], 3)
    point["server_cpu_pct"] = round(100 * (cpu_after[0] - cpu_before[0]) / wall, 1)
    point["frontend_cpu_pct"] = round(100 * (cpu_after[1] - cpu_before[1]) / wall, 1)
    # Host-wide busy CPU minus server and wrk: what other processes took.
    host_busy = host_after.busy_seconds_since(host_before)
    other = host_busy - (cpu_after[0] - cpu_before[0]) - res.wrk_cpu_s
    point["host_busy_pct"] = round(100 * host_busy / wall, 1)
    point["other_cpu_pct"] = round(max(0.0, 100 * other / wall), 1)
    point["steal_pct"] = round(100 * host_after.steal_seconds_since(host_before) / wall, 1)
    point["mean_batch_size"] = None
    if before is not None and after is not None:
        delta = after.minus(before)
        point["batch_metric_series"] = after.series
        point["batch_rows"] = delta.sum
        point["batch_count"] = delta.count
        if delta.count > 0:
            point["mean_batch_size"] = round(delta.sum / delta.count, 3)
        # Rows seen by /metrics vs requests sent: far from 1 means the metric
        # is per worker (not aggregated) or not recorded on this path.
        point["batch_rows_per_request"] = round(delta.sum / res.requests, 3) if res.requests else None
    return point


def _describe(point: dict[str, Any]) -> str:
    text = f"{point['rps']:.0f} req/s p50 {point['p50_ms']:.2f} ms p99 {point['p99_ms']:.2f} ms"
    if point.get("mean_batch_size") is not None:
        text += f" batch {point['mean_batch_size']:.1f}"
    bad = point["non2xx"] + point["socket_errors"]
    if bad:
        text += f" !! {point['non2xx']} non-2xx {point['socket_errors']} socket errors"
    if point["wrk_cpu_pct"] > 90:
        text += " (wrk CPU-bound)"
    if point.get("other_cpu_pct", 0) > NOISY_OTHER_CPU_PCT:
        text += f" (noisy: other processes used {point['other_cpu_pct']:.0f}% CPU)"
    return text


def run(plan: Plan) -> dict[str, Any]:
    """Run the whole plan and write the report; returns the run record."""
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    date = dt.date.today().isoformat()
    started = time.time()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    needs_models = any(s.kind == "mlserve" for s in plan.scenarios) or plan.run_offline
    tmp_models: Path | None = None
    models_dir = plan.models_dir
    if needs_models and models_dir is None:
        tmp_models = Path(tempfile.mkdtemp(prefix="mlserve-bench-models-"))
        models_dir = tmp_models
    train = needs_models and models_dir is not None and not servers.models_present(models_dir)
    if train and plan.mlserve_cmd is None:
        plan.notes.append("no mlserve CLI to train models; offline ceiling skipped")
        plan.run_offline = False
        train = False

    run_record: dict[str, Any] = {
        "date": date,
        "started_at": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_at_start": hoststat.loadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "wrk": _wrk_version(),
        },
        "config": {
            "quick": plan.quick,
            "duration_s": plan.timing.duration_s,
            "warmup_s": plan.timing.warmup_s,
            "offline_s": plan.timing.offline_s,
            "concurrency": plan.concurrency,
            "scenarios": [s.name for s in plan.scenarios],
            "workers": plan.workers,
            "floor_workers": plan.floor_workers,
            "wrk_core": plan.wrk_core,
            "models_dir": str(models_dir) if models_dir else None,
            "mlserve_cmd": plan.mlserve_cmd,
            "argv": sys.argv,
        },
        "notes": plan.notes,
        "offline": {},
        "scenarios": {},
        "points": [],
        "interrupted": False,
    }
    progress = Progress(count_steps(plan, train))
    try:
        if train and models_dir is not None and plan.mlserve_cmd is not None:
            progress.start(f"train models into {models_dir}")
            try:
                took = servers.train_models(plan.mlserve_cmd, models_dir,
                                            plan.out_dir / f"{date}-train.log")
            except (servers.ServerStartError, subprocess.TimeoutExpired, OSError) as exc:
                # No models: nothing mlserve-side can run, but the floor still can.
                progress.end(f"FAILED: {str(exc)[:300]}")
                plan.notes.append(f"model training failed, mlserve scenarios skipped: {exc}"[:500])
                plan.scenarios = [s for s in plan.scenarios if s.kind != "mlserve"]
                plan.run_offline = False
                progress.total = progress.done + len(plan.scenarios) * (1 + len(plan.concurrency))
            else:
                run_record["train_s"] = round(took, 2)
                progress.end(f"done in {took:.1f}s")
        if plan.run_offline and models_dir is not None:
            progress.start("offline ceiling (joblib predict, batch 1 / 32)")
            run_record["offline"] = offline.measure(models_dir, plan.timing.offline_s)
            progress.end(_offline_summary(run_record["offline"]))
        for scenario in plan.scenarios:
            _run_scenario(scenario, plan, models_dir, date, run_record, progress)
    except KeyboardInterrupt:
        run_record["interrupted"] = True
        plan.notes.append("run interrupted; results are partial")
        print("\ninterrupted: servers stopped, writing partial report", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if tmp_models is not None:
            shutil.rmtree(tmp_models, ignore_errors=True)

    analysis.add_ratios(run_record["points"], run_record["offline"] or {})
    run_record["headline"] = analysis.headline(run_record["points"])
    run_record["finished_at"] = dt.datetime.now().isoformat(timespec="seconds")
    run_record["host"]["loadavg_at_end"] = hoststat.loadavg()
    noisy = [f"{p['scenario']}@{p['concurrency']}" for p in run_record["points"]
             if p.get("other_cpu_pct", 0) > NOISY_OTHER_CPU_PCT]
    if noisy:
        plan.notes.append(f"other processes used >{NOISY_OTHER_CPU_PCT:.0f}% CPU during: "
                          + ", ".join(noisy) + " (see other CPU column)")
    run_record["elapsed_s"] = round(time.time() - started, 1)
    paths = report.write_all(run_record, plan.out_dir, date)
    print(f"\nfinished in {run_record['elapsed_s']:.0f}s")
    for line in analysis.headline_lines(run_record["headline"]):
        print(f"  {line}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return run_record


def _offline_summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"FAILED: {result['error'][:200]}"
    parts = []
    for version, e in result.get("versions", {}).items():
        if "error" in e:
            parts.append(f"{version}: {e['error']}")
        else:
            parts.append(f"{version} b1 {e['batch_1']['rows_per_s']:.0f} rows/s, "
                         f"b32 {e['batch_32']['rows_per_s']:.0f} rows/s")
    return "; ".join(parts)


def _run_scenario(
    scenario: Scenario,
    plan: Plan,
    models_dir: Path | None,
    date: str,
    run_record: dict[str, Any],
    progress: Progress,
) -> None:
    """Start one server, measure every concurrency, always stop it."""
    port = servers.free_port()
    log_path = plan.out_dir / f"{date}-server-{scenario.name}.log"
    if scenario.kind == "floor":
        argv = servers.floor_argv(port, plan.floor_workers)
    else:
        assert plan.mlserve_cmd is not None and models_dir is not None
        argv = servers.mlserve_argv(plan.mlserve_cmd, port, models_dir, plan.workers)
    server = servers.Server(scenario.name, argv, port, log_path, servers.clean_env(scenario.env))
    info: dict[str, Any] = {"label": scenario.label, "argv": argv, "env": scenario.env,
                            "log_path": str(log_path)}
    run_record["scenarios"][scenario.name] = info
    progress.start(f"start {scenario.label} on :{port}")
    try:
        try:
            server.start()
            info["startup_s"] = round(server.wait_ready(), 2)
        except servers.ServerStartError as exc:
            info["error"] = str(exc)[:3000]
            progress.end("FAILED to start (see log)")
            for c in plan.concurrency:
                progress.start(f"{scenario.label} c={c}")
                progress.end("skipped")
                run_record["points"].append(_failed_point(scenario, c, "server did not start"))
            return
        info["sanity"] = _sanity(server, scenario)
        progress.end(f"ready in {info['startup_s']:.1f}s, sanity "
                     f"{'ok' if info['sanity'].get('ok') else 'FAILED ' + str(info['sanity'])[:200]}")
        for c in plan.concurrency:
            progress.start(f"{scenario.label} c={c}")
            try:
                point = measure_point(server, scenario, c, plan)
            except WrkError as exc:
                point = _failed_point(scenario, c, str(exc)[:500])
                progress.end(f"FAILED: {str(exc)[:200]}")
            else:
                progress.end(_describe(point))
            run_record["points"].append(point)
            if server.proc is not None and server.proc.poll() is not None:
                info["error"] = f"server exited mid-run rc={server.proc.returncode}"
                break
    finally:
        info["exit_code"] = server.stop()
        info["log_levels"] = servers.count_log_levels(log_path)


def _point_header(scenario: Scenario, concurrency: int) -> dict[str, Any]:
    """What identifies a measured point, the same for a good one and a failed one."""
    return {
        "scenario": scenario.name,
        "label": scenario.label,
        "kind": scenario.kind,
        "version": scenario.version,
        "batching": scenario.batching,
        "concurrency": concurrency,
    }


def _failed_point(scenario: Scenario, concurrency: int, error: str) -> dict[str, Any]:
    return _point_header(scenario, concurrency) | {"rps": None, "error": error}
