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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import analysis, hoststat, imageset, offline, peers, promtext, report, servers
from benchmarks.mlflowregistry import MlflowRegistry
from benchmarks.openloop import CONNECTIONS, WARMUP_S, run_open
from benchmarks.redisserver import RedisServer
from benchmarks.scenarios import (IRIS_COLUMNS, OPEN_LOOP_FRACTIONS, OUTAGE_SLICES, Scenario, Timing,
                                  open_loop_runs)
from benchmarks.wrk_runner import LoadError, run_wrk, run_wrk2

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
    baseline_cmd: list[str] | None = None
    """Another mlserve build that serves the ``@baseline`` scenarios (``--baseline``)."""
    redis: RedisServer | None = None
    """The run's own redis-server, for the cache scenarios that use Redis."""
    peer_cmd: Path | None = None
    """MLServer's ``mlserver`` command, for the peer scenarios."""
    registry: MlflowRegistry | None = None
    """The run's own MLflow registry, for the scenarios that serve a model from one."""
    notes: list[str] = field(default_factory=list)
    image_file: Path | None = None
    """The distinct PNGs the image scenarios send, written once a run."""
    wrk2: str | None = None
    """wrk2's path: it runs the open-loop points; None: our own generator (``benchmarks.openloop``) does."""

    @property
    def open_loop_generator(self) -> str:
        return "wrk2" if self.wrk2 is not None else "openloop"

    def wrk_args(self, scenario: Scenario) -> list[str]:
        if scenario.kind == "mlserver":
            return []
        if scenario.images:
            assert self.image_file is not None
            return [str(self.image_file)]
        if scenario.protocol == "invocations":
            return [json.dumps(IRIS_COLUMNS)]
        if scenario.protocol == "v2":
            return [str(scenario.rows_per_request)] if scenario.rows_per_request > 1 else []
        version = scenario.version if scenario.names_version else "-"
        users = ["users"] if scenario.experiment is not None else []
        return [version, scenario.model, str(scenario.distinct), *users]

    def open_loop_args(self, scenario: Scenario) -> list[str]:
        if scenario.images:
            assert self.image_file is not None
            return ["--images", str(self.image_file)]
        return ["--iris", scenario.model, scenario.version]


class Progress:
    """``[i/N] label ...`` on one line per step, the result, time spent and time left when done."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.t0 = time.perf_counter()

    def start(self, label: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {label} ...", end="", flush=True)

    def end(self, result: str) -> None:
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        print(f" {result} ({elapsed:.0f}s elapsed, ~{left / 60:.1f} min left)", flush=True)


def _sigterm_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def count_steps(plan: Plan, train: bool) -> int:
    registry = any(s.registry for s in plan.scenarios)
    return int(train) + int(plan.run_offline) + int(registry) + _scenario_steps(plan)


def _scenario_steps(plan: Plan) -> int:
    per_server = sum(1 + len(s.concurrency(plan.concurrency)) + s.outage for s in plan.scenarios)
    open_loop = open_loop_runs(plan.scenarios)
    second_starts = sum(s.open_loop_at is not None for s in open_loop)
    return per_server + second_starts + len(open_loop) * len(OPEN_LOOP_FRACTIONS)


def _wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].split(" [")[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "wrk ?"


def _read_batch_metrics(base_url: str, scenario: Scenario) -> promtext.HistTotals | None:
    try:
        status, body = servers.http_get(f"{base_url}/metrics", timeout=5.0)
    except OSError:
        return None
    if status != 200:
        return None
    return promtext.histogram_totals(
        body.decode(errors="replace"), model=scenario.model, version=scenario.version
    )


def _sanity(server: servers.Server, scenario: Scenario) -> dict[str, Any]:
    """One real request before load: a broken contract should be loud, not a 0 req/s row."""
    if scenario.kind == "mlserver" or scenario.protocol == "v2":
        payload = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                               "data": [5.1, 3.5, 1.4, 0.2]}]}
        body, content_type = json.dumps(payload).encode(), "application/json"
        expected: tuple[str, ...] = ("model_name", "outputs")
    elif scenario.images:
        body, content_type = imageset.pngs(1)[0], "image/png"
        expected = ("class", "confidence", "probabilities", "model", "model_version")
    elif scenario.protocol == "invocations":
        payload = {"dataframe_split": {"columns": list(IRIS_COLUMNS), "data": [[5.1, 3.5, 1.4, 0.2]]}}
        body, content_type = json.dumps(payload).encode(), "application/json"
        expected = ("predictions",)
    else:
        payload = {"features": [5.1, 3.5, 1.4, 0.2], "model": scenario.model}
        if not scenario.registry:  # from the registry, the alias picks the version (checked below)
            payload["model_version"] = scenario.version
        body, content_type = json.dumps(payload).encode(), "application/json"
        expected = ("prediction", "model", "model_version", "inference_time_ms")
    try:
        status, raw = servers.http_post(f"{server.base_url}{scenario.path}", body, content_type)
    except OSError as exc:
        return {"ok": False, "error": repr(exc)}
    result: dict[str, Any] = {"status": status, "body": raw[:300].decode(errors="replace")}
    ok = status == 200
    if ok and scenario.kind == "mlserve":
        try:
            data = json.loads(raw)
            missing = [k for k in expected if k not in data]
            if missing:
                result["missing_keys"] = missing
            ok = not missing and data.get("model_version", scenario.version) == scenario.version
        except ValueError:
            ok = False
    result["ok"] = ok
    return result


@dataclass(frozen=True)
class Load:
    """What a load generator reports that the harness needs besides its own figures."""

    figures: dict[str, Any]
    requests: int
    wall_s: float
    cpu_s: float


def measure_point(
    server: servers.Server, scenario: Scenario, concurrency: int, plan: Plan
) -> dict[str, Any]:
    """Warm up, then one measured closed-loop wrk run."""
    url = f"{server.base_url}{scenario.path}"
    timeout_s = max(10.0, 2 * plan.timing.duration_s)
    script, args = scenario.script, plan.wrk_args(scenario)
    if plan.timing.warmup_s > 0:
        run_wrk(url, concurrency, plan.timing.warmup_s, script, args, plan.wrk_core, timeout_s)
        time.sleep(0.2)  # let warm-up stragglers drain before the "before" snapshot

    def load() -> Load:
        res = run_wrk(url, concurrency, plan.timing.duration_s, script, args, plan.wrk_core, timeout_s)
        return Load(res.to_dict(), res.requests, res.wrk_wall_s, res.wrk_cpu_s)

    return _observe(server, scenario, load)


def measure_open_point(
    server: servers.Server, scenario: Scenario, rate: float, plan: Plan
) -> dict[str, Any]:
    """One open-loop run at ``rate`` req/s, after ``WARMUP_S`` at that rate that is not measured.

    Our generator sends the warm-up in the same process and leaves it out of its figures. wrk2's own
    calibration (it restarts its histogram after 10 s plus 5 ms a connection) is longer than a point,
    so it gets a separate warm-up call first, as the closed-loop points do; the measured call's first
    second still has wrk2 opening its connections one by one (``wrk_runner.parse_wrk2_output``).
    """
    url = f"{server.base_url}{scenario.path}"

    def generate(seconds: float) -> dict[str, Any]:
        if plan.wrk2 is None:
            return run_open(url, rate, seconds, plan.open_loop_args(scenario), plan.wrk_core)
        return run_wrk2(plan.wrk2, url, rate, seconds, CONNECTIONS, scenario.script, plan.wrk_args(scenario),
                        plan.wrk_core)

    if plan.wrk2 is not None:
        generate(WARMUP_S)
        time.sleep(0.2)  # let warm-up stragglers drain before the "before" snapshot

    def load() -> Load:
        res = generate(plan.timing.open_loop_s)
        return Load(res, int(res["requests"]), float(res["wall_s"]), float(res["loadgen_cpu_s"]))

    return _observe(server, scenario, load)


def _observe(server: servers.Server, scenario: Scenario, load: Callable[[], Load]) -> dict[str, Any]:
    """Run ``load`` with the server's CPU, the host's CPU and the batch histogram read around it."""
    mlserve = scenario.kind == "mlserve"
    before = _read_batch_metrics(server.base_url, scenario) if mlserve else None
    cpu_before = server.cpu_seconds()
    host_before = hoststat.sample()
    res = load()
    host_after = hoststat.sample()
    cpu_after = server.cpu_seconds()
    after = _read_batch_metrics(server.base_url, scenario) if mlserve else None
    point = dict(res.figures)
    wall = res.wall_s
    point["server_cpu_s"] = round(cpu_after[0] - cpu_before[0], 3)
    point["server_cpu_pct"] = round(100 * (cpu_after[0] - cpu_before[0]) / wall, 1)
    point["frontend_cpu_pct"] = round(100 * (cpu_after[1] - cpu_before[1]) / wall, 1)
    # Host-wide busy CPU minus server and load generator: what other processes took.
    host_busy = host_after.busy_seconds_since(host_before)
    other = host_busy - (cpu_after[0] - cpu_before[0]) - res.cpu_s
    point["host_busy_pct"] = round(100 * host_busy / wall, 1)
    point["other_cpu_pct"] = round(max(0.0, 100 * other / wall), 1)
    point["steal_pct"] = round(100 * host_after.steal_seconds_since(host_before) / wall, 1)
    point["mean_batch_size"] = None
    if before is not None and after is not None:
        delta = after.minus(before)
        point["batch_metric_series"] = after.series
        point["batch_rows"] = delta.sum
        point["batch_count"] = delta.count
        point["batch_size_buckets"] = delta.per_bucket()
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
    if point["loadgen_cpu_pct"] > 90:
        text += " (load generator CPU-bound)"
    if point.get("other_cpu_pct", 0) > NOISY_OTHER_CPU_PCT:
        text += f" (noisy: other processes used {point['other_cpu_pct']:.0f}% CPU)"
    return text


def run(plan: Plan) -> dict[str, Any]:
    """Run the whole plan and write the report; returns the run record."""
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    date = dt.date.today().isoformat()
    started = time.time()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    needs_models = any(s.kind != "floor" for s in plan.scenarios) or plan.run_offline
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
            "wrk2": plan.wrk2,
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
            "open_loop_generator": plan.open_loop_generator,
            "open_loop_s": plan.timing.open_loop_s,
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
                progress.total = progress.done + count_steps(plan, False) - int(plan.run_offline)
            else:
                run_record["train_s"] = round(took, 2)
                progress.end(f"done in {took:.1f}s")
        if any(s.images for s in plan.scenarios):
            plan.image_file = imageset.write(Path(tempfile.mkstemp(prefix="mlserve-bench-", suffix=".png.bin")[1]))
        if plan.run_offline and models_dir is not None:
            progress.start("offline ceiling (predict in a plain process, batch 1 / 32)")
            run_record["offline"] = offline.measure(models_dir, plan.timing.offline_s)
            progress.end(_offline_summary(run_record["offline"]))
        if any(s.needs_redis for s in plan.scenarios):
            _start_redis(plan)
        if any(s.registry for s in plan.scenarios):
            _build_registry(plan, date, run_record, progress)
        open_loop = open_loop_runs(plan.scenarios)
        for scenario in plan.scenarios:
            _run_scenario(scenario, plan, models_dir, date, run_record, progress)
            for follower in (s for s in open_loop if s.open_loop_at == scenario.name):
                if _open_loop_reference(run_record["points"], scenario) > 0:
                    _run_scenario(follower, plan, models_dir, date, run_record, progress, at_rates_of=scenario)
                else:
                    plan.notes.append(f"{scenario.name} has no closed-loop capacity: no open loop for {follower.name}")
                    progress.total -= 1 + len(OPEN_LOOP_FRACTIONS)
    except KeyboardInterrupt:
        run_record["interrupted"] = True
        plan.notes.append("run interrupted; results are partial")
        print("\ninterrupted: servers stopped, writing partial report", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if tmp_models is not None:
            shutil.rmtree(tmp_models, ignore_errors=True)
            Path(f"{tmp_models}.state.json").unlink(missing_ok=True)  # the servers' default state file
        if plan.image_file is not None:
            plan.image_file.unlink(missing_ok=True)
        if plan.redis is not None:
            plan.redis.close()
        if plan.registry is not None:
            plan.registry.close()

    analysis.add_ratios(run_record["points"], run_record["offline"] or {})
    run_record["open_loop_tails"] = analysis.open_loop_tails(run_record["points"])
    run_record["frontends"] = analysis.frontend_rows(run_record["points"])
    run_record["headline"] = analysis.headline(run_record["points"])
    run_record["finished_at"] = dt.datetime.now().isoformat(timespec="seconds")
    run_record["host"]["loadavg_at_end"] = hoststat.loadavg()
    noisy = [f"{p['scenario']}@{p['concurrency']}" if p["loop"] == "closed" else f"{p['scenario']}@{p['target_rps']:.0f}req/s"
             for p in run_record["points"] if p.get("other_cpu_pct", 0) > NOISY_OTHER_CPU_PCT]
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
    for key, e in result.get("models", {}).items():
        if "error" in e:
            parts.append(f"{key}: {e['error']}")
        else:
            parts.append(f"{key} b1 {e['batch_1']['rows_per_s']:.0f} rows/s, "
                         f"b32 {e['batch_32']['rows_per_s']:.0f} rows/s")
    return "; ".join(parts)


def _run_scenario(
    scenario: Scenario,
    plan: Plan,
    models_dir: Path | None,
    date: str,
    run_record: dict[str, Any],
    progress: Progress,
    at_rates_of: Scenario | None = None,
) -> None:
    """Start one server, measure every concurrency, always stop it.

    With ``at_rates_of``, a second start that measures only the open-loop points, at the arrival
    rates of that scenario, just measured: the floor's tails against v1-on's at the same rates,
    minutes apart rather than a whole run.
    """
    port = servers.free_port()
    name = scenario.name if at_rates_of is None else f"{scenario.name}@open-loop"
    open_loop = at_rates_of is not None or (scenario.open_loop and scenario.open_loop_at is None)
    closed_points = scenario.concurrency(plan.concurrency) if at_rates_of is None else []
    log_path = plan.out_dir / f"{date}-server-{name}.log"
    workdir: Path | None = None
    if scenario.kind == "floor":
        argv = servers.floor_argv(port, scenario.frontends)
    elif scenario.kind == "mlserver":
        assert plan.peer_cmd is not None and models_dir is not None
        workdir = Path(tempfile.mkdtemp(prefix="mlserve-bench-peer-"))
        argv = peers.argv(plan.peer_cmd, scenario, models_dir, workdir, port, plan.workers)
    else:
        command = plan.baseline_cmd if scenario.baseline else plan.mlserve_cmd
        assert command is not None and models_dir is not None
        argv = servers.mlserve_argv(command, port, models_dir, plan.workers, scenario.frontends)
    env = dict(scenario.env)
    if scenario.experiment is not None:
        workdir = Path(tempfile.mkdtemp(prefix="mlserve-bench-state-"))
        state = workdir / "state.json"
        state.write_text(f'{{"experiments": {{"{scenario.model}": {scenario.experiment}}}}}')
        env["MLSERVE_STATE_PATH"] = str(state)
    if scenario.prediction_log:
        workdir = workdir or Path(tempfile.mkdtemp(prefix="mlserve-bench-log-"))
        env["MLSERVE_PREDICTION_LOG__PATH"] = str(workdir / "predictions.jsonl")
    if scenario.registry and plan.registry is not None and models_dir is not None:
        workdir = workdir or Path(tempfile.mkdtemp(prefix="mlserve-bench-config-"))
        config = workdir / "mlserve.toml"
        config.write_text(plan.registry.settings(scenario.model, scenario.version, models_dir))
        env["MLSERVE_CONFIG"] = str(config)
    if scenario.needs_redis and plan.redis is not None:
        plan.redis.flush()  # each scenario starts from a cold shared cache
        env["MLSERVE_CACHE__REDIS_URL"] = plan.redis.url
    server = servers.Server(scenario.name, argv, port, log_path, servers.clean_env(env),
                            ready_path=scenario.ready_path)
    info: dict[str, Any] = {"label": scenario.label, "argv": argv, "env": scenario.env,
                            "log_path": str(log_path)}
    run_record["scenarios"][name] = info
    again = "" if at_rates_of is None else f" again, for open loop at {at_rates_of.name}'s rates,"
    progress.start(f"start {scenario.label}{again} on :{port}")
    try:
        try:
            server.start()
            info["startup_s"] = round(server.wait_ready(), 2)
        except servers.ServerStartError as exc:
            info["error"] = str(exc)[:3000]
            progress.end("FAILED to start (see log)")
            for c in closed_points:
                progress.start(f"{scenario.label} c={c}")
                progress.end("skipped")
                run_record["points"].append(_failed_point(scenario, c, "server did not start"))
            progress.total -= len(OPEN_LOOP_FRACTIONS) if open_loop else 0
            return
        info["sanity"] = _sanity(server, scenario)
        progress.end(f"ready in {info['startup_s']:.1f}s, sanity "
                     f"{'ok' if info['sanity'].get('ok') else 'FAILED ' + str(info['sanity'])[:200]}")
        for c in closed_points:
            header = _point_header(scenario, c)
            if not _step(header, lambda: measure_point(server, scenario, c, plan), server, info,
                         run_record, progress):
                return
        if scenario.outage and plan.redis is not None and at_rates_of is None:
            progress.start(f"{scenario.label}: {sum(OUTAGE_SLICES)} one-second slices")
            outage = _measure_outage(server, scenario, plan, plan.redis)
            run_record.setdefault("outages", []).append(outage)  # one a build, with --baseline
            progress.end(_outage_summary(outage))
        rates_of = at_rates_of or scenario
        reference = _open_loop_reference(run_record["points"], rates_of)
        for fraction in OPEN_LOOP_FRACTIONS if open_loop and reference else ():
            rate = fraction * reference
            header = _point_header(scenario, CONNECTIONS, "open") | {
                "target_rps": round(rate, 1), "fraction": fraction, "rates_of": rates_of.name}
            if not _step(header, lambda: measure_open_point(server, scenario, rate, plan), server, info,
                         run_record, progress):
                return
    finally:
        info["exit_code"] = server.stop()
        info["log_levels"] = servers.count_log_levels(log_path)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _build_registry(plan: Plan, date: str, run_record: dict[str, Any], progress: Progress) -> None:
    """Build the run's MLflow registry, or drop the scenarios that need one (with a note)."""
    progress.start("log the iris versions to an MLflow registry of the run's own")
    registry = MlflowRegistry()
    try:
        took = registry.build(plan.out_dir / f"{date}-mlflow.log")
    except (servers.ServerStartError, subprocess.TimeoutExpired, OSError) as exc:
        registry.close()
        progress.end(f"FAILED: {str(exc)[:300]}")
        plan.notes.append(f"the MLflow registry failed, its scenarios skipped: {exc}"[:500])
        steps = _scenario_steps(plan)
        plan.scenarios = [s for s in plan.scenarios if not s.registry]
        progress.total -= steps - _scenario_steps(plan)
        return
    plan.registry = registry
    run_record["registry_s"] = round(took, 2)
    progress.end(f"done in {took:.1f}s")


def _start_redis(plan: Plan) -> None:
    """Start the run's redis-server, or drop the scenarios that need one (with a note)."""
    if RedisServer.available():
        plan.redis = RedisServer()
        plan.redis.start()
        return
    plan.notes.append("redis-server not installed: the Redis cache scenarios were skipped")
    plan.scenarios = [s for s in plan.scenarios if not s.needs_redis]


def _measure_outage(
    server: servers.Server, scenario: Scenario, plan: Plan, redis: RedisServer
) -> dict[str, Any]:
    """Closed loop at 64 connections in one-second wrk runs: Redis up, then killed, then restarted.

    Per slice: req/s, p99 and non-2xx, so the report shows how fast throughput falls back to the
    cache-off figure and comes back once Redis does.
    """
    url = server.base_url + scenario.path
    args = plan.wrk_args(scenario)
    run_wrk(url, CONNECTIONS, plan.timing.warmup_s, scenario.script, args, plan.wrk_core)
    up, down, back = OUTAGE_SLICES
    slices: list[dict[str, Any]] = []
    for index in range(up + down + back):
        if index == up:
            redis.kill()
        elif index == up + down:
            redis.start()
        result = run_wrk(url, CONNECTIONS, 1.0, scenario.script, args, plan.wrk_core)
        phase = "up" if index < up else "down" if index < up + down else "back"
        slices.append({"second": index, "redis": phase, "rps": round(result.rps, 1),
                       "p99_ms": round(result.p99_ms, 2), "non2xx": result.non2xx,
                       "socket_errors": result.errors_connect + result.errors_read + result.errors_write
                       + result.errors_timeout})
    return {"scenario": scenario.name, "label": scenario.label, "baseline": scenario.baseline, "slices": slices}


def _outage_summary(outage: dict[str, Any]) -> str:
    by_phase: dict[str, list[float]] = {}
    for s in outage["slices"]:
        by_phase.setdefault(s["redis"], []).append(s["rps"])
    errors = sum(s["non2xx"] + s["socket_errors"] for s in outage["slices"])
    return ", ".join(f"Redis {phase}: {sum(r) / len(r):.0f} req/s" for phase, r in by_phase.items()) + (
        f", {errors} errors")


def _open_loop_reference(points: list[dict[str, Any]], scenario: Scenario) -> float:
    """The closed-loop req/s the arrival rates are fractions of: the best at up to 64 connections.

    Not the best at any concurrency: at 256 connections a slow model's queue builds batches of a
    hundred rows, a throughput bought with latency that an open-loop client would not accept.
    """
    rates = [p["rps"] for p in points
             if p["scenario"] == scenario.name and p.get("rps") and p["concurrency"] <= 64]
    return max(rates, default=0.0)


def _step(
    header: dict[str, Any],
    measure: Callable[[], dict[str, Any]],
    server: servers.Server,
    info: dict[str, Any],
    run_record: dict[str, Any],
    progress: Progress,
) -> bool:
    """Measure one point and record it under ``header``; False once the server has died."""
    what = f"open loop at {header['target_rps']:.0f} req/s" if header["loop"] == "open" else f"c={header['concurrency']}"
    progress.start(f"{header['label']} {what}")
    try:
        point = header | measure()
    except LoadError as exc:
        point = header | {"rps": None, "error": str(exc)[:500]}
        progress.end(f"FAILED: {str(exc)[:200]}")
    else:
        progress.end(_describe(point))
    run_record["points"].append(point)
    if server.proc is not None and server.proc.poll() is not None:
        info["error"] = f"server exited mid-run rc={server.proc.returncode}"
        return False
    return True


def _point_header(scenario: Scenario, concurrency: int, loop: str = "closed") -> dict[str, Any]:
    """What identifies a measured point, the same for a good one and a failed one."""
    return {
        "scenario": scenario.name,
        "label": scenario.label,
        "kind": scenario.kind,
        "model": scenario.model,
        "version": scenario.version,
        "batching": scenario.batching,
        "cache": scenario.cache,
        "reference": scenario.reference,
        "rows_per_request": scenario.rows_per_request,
        "frontends": scenario.frontends,
        "executor": scenario.executor if scenario.kind == "mlserve" else None,
        "frontend_series": scenario.frontend_series,
        "concurrency": concurrency,
        "loop": loop,
    }


def _failed_point(scenario: Scenario, concurrency: int, error: str) -> dict[str, Any]:
    return _point_header(scenario, concurrency) | {"rps": None, "error": error}
