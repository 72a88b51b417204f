"""Run wrk (and wrk2, for open-loop points) pinned to one core and turn its output into numbers.

Why wrk + a Lua ``done()`` line instead of parsing wrk's human text: the text
format rounds latencies and changes units; the Lua callback prints exact
microsecond percentiles as one JSON line.  wrk's own CPU use is taken from
``os.wait4`` resource usage, so we can tell when the load generator, not the
server, is the bottleneck, without psutil or /usr/bin/time.

wrk2 (wrk with a fixed request rate, ``-R``, timing each request from when it
was due) runs the open-loop points when it is found: it is the well-known tool,
so its figures need no defence of ours.  Its output is parsed from its text,
the HdrHistogram percentile lines, which wrk2 prints to three significant
digits whatever script runs; the same request scripts serve both tools.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "wrk"
_MARKER = "WRKJSON "
WRK2_ENV = "MLSERVE_WRK2"
WRK2_CONNECT_GAP_S = 0.005
"""wrk2 opens its connections this far apart, and each keeps its own schedule from its connect."""


class LoadError(RuntimeError):
    """A load generator failed or printed no result line."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run.  Latencies in ms; ``non2xx`` is wrk's errors.status (HTTP >= 400)."""

    concurrency: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non2xx: int
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_timeout: int
    wrk_cpu_s: float
    wrk_wall_s: float

    @property
    def socket_errors(self) -> int:
        return self.errors_connect + self.errors_read + self.errors_write + self.errors_timeout

    @property
    def wrk_cpu_pct(self) -> float:
        """wrk's CPU as % of one core over its wall time (it is pinned to one)."""
        return 100.0 * self.wrk_cpu_s / self.wrk_wall_s if self.wrk_wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["socket_errors"] = self.socket_errors
        data["loadgen_cpu_pct"] = round(self.wrk_cpu_pct, 1)
        return data


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def built_wrk2() -> list[Path]:
    """Where ``tools/build-wrk2.sh`` of the shared tools leaves wrk2: its default output (the user's
    cache), or its source tree beside the repo (``../shared/tools``) after a ``make`` there."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    repo = Path(__file__).resolve().parents[1]
    return [cache / "wrk2" / "wrk", repo.parent / "shared" / "tools" / "wrk2-src" / "wrk"]


def find_wrk2(explicit: str | None = None, candidates: list[Path] | None = None) -> str | None:
    """wrk2's path: ``explicit`` (``--wrk2``), else ``$MLSERVE_WRK2``, else ``wrk2`` on PATH, else
    where the shared build script leaves it (``candidates``, by default ``built_wrk2()``).

    None when there is none: the open-loop points then run on our own generator, as users without
    the shared tools get.  A path that was asked for but is not an executable is an error, not a
    quiet fall-back to the other generator.
    """
    for asked, source in ((explicit, "--wrk2"), (os.environ.get(WRK2_ENV), f"${WRK2_ENV}")):
        if asked:
            found = shutil.which(asked)
            if found is None:
                raise ValueError(f"{source} {asked}: not an executable file")
            return found
    on_path = shutil.which("wrk2")
    if on_path is not None:
        return on_path
    for path in built_wrk2() if candidates is None else candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def whole_seconds(seconds: float) -> int:
    """wrk's ``-d`` and ``--timeout`` in whole seconds, at least one."""
    return max(1, round(seconds))


def build_argv(
    url: str,
    concurrency: int,
    duration_s: float,
    script: str,
    script_args: list[str],
    core: int | None,
    timeout_s: float,
    binary: str = "wrk",
    rate: float | None = None,
) -> list[str]:
    """wrk command line (wrk2's with ``binary`` and a ``rate``); one thread (one core) is enough
    for a 2-core box.

    ``--timeout`` is raised well above wrk's 2 s default: a saturated slow
    model at high concurrency legitimately queues for seconds, and we want
    that visible in p99, not hidden as "timeout" errors.
    """
    argv = [
        binary,
        "-t1",
        f"-c{concurrency}",
        f"-d{whole_seconds(duration_s)}s",
        f"--timeout={whole_seconds(timeout_s)}s",
        *([f"-R{max(1, round(rate))}"] if rate is not None else []),
        "--latency",
        "-s",
        str(SCRIPTS / script),
        url,
        "--",
        *script_args,
    ]
    return pinned(argv, core)


def pinned(argv: list[str], core: int | None) -> list[str]:
    """``argv`` under ``taskset`` on ``core`` when the machine has that core."""
    if core is not None and (os.cpu_count() or 1) > core and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *argv]
    return argv


def run_wrk(
    url: str,
    concurrency: int,
    duration_s: float,
    script: str = "predict.lua",
    script_args: list[str] | None = None,
    core: int | None = 1,
    timeout_s: float = 30.0,
) -> WrkResult:
    """Run one closed-loop wrk measurement with ``script`` and parse its JSON line."""
    argv = build_argv(url, concurrency, duration_s, script, script_args or [], core, timeout_s)
    run = run_process(argv, duration_s + timeout_s + 30.0)
    return parse_output(run.stdout, concurrency, run.cpu_s, run.wall_s)


@dataclass(frozen=True)
class ProcessRun:
    stdout: str
    cpu_s: float
    wall_s: float


def run_process(argv: list[str], limit_s: float) -> ProcessRun:
    """Run a load generator to its end and take its own CPU time from ``os.wait4``.

    A watchdog kills it after ``limit_s``: a generator should end by itself, and must never hang
    the harness.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        killer = threading.Timer(limit_s, _kill, args=(proc.pid,))
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill(proc.pid)
            proc.wait()
            raise
        finally:
            killer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise LoadError(f"{argv[0]} rc={proc.returncode}: {stderr.strip()[-500:]} {stdout[-500:]}")
    return ProcessRun(stdout, usage.ru_utime + usage.ru_stime, wall)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def parse_output(stdout: str, concurrency: int, cpu_s: float, wall_s: float) -> WrkResult:
    """Extract the ``WRKJSON {...}`` line printed by common.lua's done()."""
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER) :])
            break
    else:
        raise LoadError(f"no {_MARKER.strip()} line in wrk output:\n{stdout[-1000:]}")
    lat = data["latency_us"]
    errs = data["errors"]
    duration_s = data["duration_us"] / 1e6
    return WrkResult(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=int(data["requests"]),
        rps=data["requests"] / duration_s if duration_s > 0 else 0.0,
        p50_ms=lat["p50"] / 1000.0,
        p90_ms=lat["p90"] / 1000.0,
        p99_ms=lat["p99"] / 1000.0,
        max_ms=lat["max"] / 1000.0,
        mean_ms=lat["mean"] / 1000.0,
        non2xx=int(data["non2xx"]),
        errors_connect=int(errs["connect"]),
        errors_read=int(errs["read"]),
        errors_write=int(errs["write"]),
        errors_timeout=int(errs["timeout"]),
        wrk_cpu_s=cpu_s,
        wrk_wall_s=wall_s,
    )


def with_own_cpu(result: dict[str, object], run: ProcessRun) -> dict[str, object]:
    """``result`` with the generator's own CPU and wall time, as every open-loop point reports them."""
    result["loadgen_cpu_s"] = run.cpu_s
    result["loadgen_cpu_pct"] = round(100 * run.cpu_s / run.wall_s, 1) if run.wall_s > 0 else 0.0
    result["wall_s"] = run.wall_s
    return result


def run_wrk2(
    binary: str,
    url: str,
    rate: float,
    duration_s: float,
    connections: int,
    script: str,
    script_args: list[str],
    core: int | None,
) -> dict[str, object]:
    """One wrk2 run at ``rate`` req/s: its figures, in the shape of our own generator's, and its CPU.

    Everything wrk2 answered in the run is measured: its own calibration, which restarts its
    histogram after 10 s plus 5 ms a connection, is longer than a point, so a warm-up is a separate,
    earlier call (the caller's).
    """
    seconds, per_second = whole_seconds(duration_s), max(1, round(rate))
    timeout_s = max(10.0, 2.0 * seconds)
    argv = build_argv(url, connections, seconds, script, script_args, core, timeout_s, binary, per_second)
    run = run_process(argv, seconds + timeout_s + 30.0)
    return with_own_cpu(parse_wrk2_output(run.stdout, per_second, seconds, connections), run)


def wrk2_due(rate: float, duration_s: float, connections: int) -> int:
    """How many requests wrk2's schedule makes due in a run: connection ``i`` connects
    ``WRK2_CONNECT_GAP_S * i`` in and sends its k-th request k / (rate / connections) s after that."""
    per_connection = rate / connections
    starts = (WRK2_CONNECT_GAP_S * i for i in range(connections))
    return sum(math.ceil((duration_s - start) * per_connection) for start in starts if start < duration_s)


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)(us|ms|s|m|h)\s*$")
_FOOTER = re.compile(r"#\[(\w+)\s*=\s*([\d.]+),\s*(\w+(?: \w+)?)\s*=\s*([\d.]+)\]")


def _wrk2_number(pattern: str, text: str, default: str = "0") -> float:
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1) if found else default)


def parse_wrk2_output(text: str, rate: float, duration_s: float, connections: int) -> dict[str, object]:
    """wrk2's ``--latency`` text as an open-loop point: the same keys as our generator's result.

    Latencies are wrk2's corrected ones ("Recorded Latency": from when each request was due), from
    the percentile lines (p50 to p99.999) and the histogram's footer (mean, max: microseconds).
    wrk2 has no generator lag or unanswered count of its own: those are None.

    ``rps`` is the rate times the share of the requests due (``wrk2_due``) that were answered, not
    the answers over the run: wrk2 opens its connections one by one and each starts its own schedule
    when connected, so over a short run it is asked for fewer than rate x seconds, and the answers over
    the run would read as a server falling behind.  wrk2's own figure is kept as ``wrk2_rps``.
    """
    percentiles: dict[float, float] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "Latency Distribution (HdrHistogram - Recorded Latency)" in line:
            break
    for line in lines:
        match = _PERCENTILE.match(line)
        if match is None:
            break
        percentiles[float(match.group(1))] = float(match.group(2)) * _UNIT_MS[match.group(3)]
    if 99.0 not in percentiles:
        raise LoadError(f"no latency distribution in wrk2's output (is it wrk2, run with --latency?):\n{text[-1000:]}")
    footer = {name: float(value) for match in _FOOTER.finditer(text)
              for name, value in (match.group(1, 2), match.group(3, 4))}
    requests = int(_wrk2_number(r"^\s*(\d+) requests in ", text))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    due = wrk2_due(rate, duration_s, connections)
    return {
        "generator": "wrk2",
        "target_rps": rate,
        "duration_s": duration_s,
        "connections": connections,
        "requests": requests,
        "rps": rate * requests / due if due else 0.0,
        "wrk2_rps": _wrk2_number(r"^Requests/sec:\s+([\d.]+)", text),
        "p50_ms": percentiles.get(50.0),
        "p75_ms": percentiles.get(75.0),
        "p90_ms": percentiles.get(90.0),
        "p99_ms": percentiles[99.0],
        "p999_ms": percentiles.get(99.9),
        "mean_ms": footer.get("Mean"),
        "max_ms": footer.get("Max", percentiles.get(100.0)),
        "lag_p99_ms": None,
        "non2xx": int(_wrk2_number(r"Non-2xx or 3xx responses: (\d+)", text)),
        "unanswered": None,
        "socket_errors": sum(int(n) for n in socket.groups()) if socket else 0,
    }
