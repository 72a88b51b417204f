"""Run wrk pinned to one core and turn its output into numbers.

Why wrk + a Lua ``done()`` line instead of parsing wrk's human text: the text
format rounds latencies and changes units; the Lua callback prints exact
microsecond percentiles as one JSON line.  wrk's own CPU use is taken from
``os.wait4`` resource usage, so we can tell when the load generator, not the
server, is the bottleneck, without psutil or /usr/bin/time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "wrk"
_MARKER = "WRKJSON "


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


def build_argv(
    url: str,
    concurrency: int,
    duration_s: float,
    script: str,
    script_args: list[str],
    core: int | None,
    timeout_s: float,
) -> list[str]:
    """wrk command line; one thread (one core) is enough for a 2-core box.

    ``--timeout`` is raised well above wrk's 2 s default: a saturated slow
    model at high concurrency legitimately queues for seconds, and we want
    that visible in p99, not hidden as "timeout" errors.
    """
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
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
