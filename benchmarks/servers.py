"""Start, probe and reliably stop the servers under test.

Why a module of its own: a benchmark that leaks a server process poisons every
later run on a 2-core box, so process lifetime is handled in one place: each
server gets its own session (process group), is stopped with SIGTERM then
SIGKILL after a timeout, and an ``atexit`` hook reaps anything a crash or
Ctrl-C left behind.  Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MLSERVE = REPO_ROOT / ".venv" / "bin" / "mlserve"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LOG_LEVEL_RE = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|Traceback \(most recent")


class ServerStartError(RuntimeError):
    """The server exited or never became ready; the message carries its log tail."""


def free_port() -> int:
    """Ask the kernel for an unused port on 127.0.0.1.

    There is a small race between closing this socket and the server binding,
    which is acceptable for a local benchmark and far simpler than fd passing.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def mlserve_command(spec: str | None) -> list[str] | None:
    """Resolve the mlserve CLI to run, or None if it is not installed yet.

    ``spec`` may be a full command line (e.g. ``python -m mlserve``), so the harness can
    measure another build or install of mlserve.
    """
    if spec:
        return shlex.split(spec)
    if DEFAULT_MLSERVE.exists() and os.access(DEFAULT_MLSERVE, os.X_OK):
        return [str(DEFAULT_MLSERVE)]
    return None


def mlserve_serve_works(cmd: Sequence[str]) -> bool:
    """True if ``mlserve serve --help`` exits 0, i.e. the subcommand exists."""
    try:
        proc = subprocess.run(
            [*cmd, "serve", "--help"], capture_output=True, timeout=60, cwd=REPO_ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def models_present(models_dir: Path) -> bool:
    """Every demo version trained already (lets ``--models-dir`` skip training)."""
    versions = ("iris_classifier/v1", "iris_classifier/v2", "image_classifier/v1")
    return all((models_dir / version / "model.toml").exists() for version in versions)


def train_models(cmd: Sequence[str], models_dir: Path, log_path: Path) -> float:
    """Run ``mlserve models`` once; returns seconds taken.  Raises on failure."""
    models_dir.mkdir(parents=True, exist_ok=True)
    return run_logged([*cmd, "models", "--models-dir", str(models_dir)], log_path, "`mlserve models`",
                      lambda: models_present(models_dir))


def run_logged(
    argv: Sequence[str], log_path: Path, what: str, made: Callable[[], bool] = lambda: True
) -> float:
    """Run a one-off preparation step to its end, its output in ``log_path``; returns seconds taken.

    Raises ``ServerStartError`` with the log's tail when it fails or ``made()`` says its result is missing.
    """
    start = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, timeout=600)
    if proc.returncode != 0 or not made():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise ServerStartError(f"{what} failed (rc={proc.returncode}):\n{tail}")
    return time.perf_counter() - start


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Tiny blocking GET; a fresh connection each time so SO_REUSEPORT spreads probes."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def http_post(url: str, body: bytes, content_type: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """Tiny blocking POST used for the pre-run sanity request."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@dataclass
class Server:
    """A running server process group plus where its log goes."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str]
    ready_path: str = "/health/ready"
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None
    _log_file: object | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        """Spawn in a new session so stop() can signal every worker at once."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self._log_file = log
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        _LIVE[self.proc.pid] = self.proc

    def wait_ready(self, timeout: float = 120.0, consecutive: int = 3) -> float:
        """Poll the readiness path until it answers 200 ``consecutive`` times.

        Several successes in a row (each a new connection) because with
        multiple SO_REUSEPORT workers one ready worker says nothing about the
        others.  Returns seconds from spawn to ready.
        """
        assert self.proc is not None
        start = time.perf_counter()
        deadline = start + timeout
        streak = 0
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with rc={self.proc.returncode} before ready:\n"
                    + self.log_tail()
                )
            try:
                status, _ = http_get(f"{self.base_url}{self.ready_path}", timeout=2.0)
            except (OSError, urllib.error.URLError):
                status = 0
            streak = streak + 1 if status == 200 else 0
            if streak >= consecutive:
                self.startup_s = time.perf_counter() - start
                return self.startup_s
            time.sleep(0.1)
        raise ServerStartError(f"{self.name} not ready after {timeout:.0f}s:\n" + self.log_tail())

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the whole group, SIGKILL after ``timeout``; always closes the log."""
        proc = self.proc
        rc: int | None = None
        if proc is not None:
            rc = stop_process_group(proc, timeout)
            _LIVE.pop(proc.pid, None)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        return rc

    def cpu_seconds(self) -> tuple[float, float]:
        """(all processes, front-end process only) user+system CPU seconds.

        Read from /proc so no psutil is needed.  The split matters: a server
        whose front end sits at 100% of one core while model workers idle is
        HTTP-bound, not compute-bound.  Workers that already exited are not
        counted, which only matters if one crashes mid-run.
        """
        if self.proc is None:
            return 0.0, 0.0
        return session_cpu_seconds(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        """Last part of the captured log, for error messages."""
        if self._log_file is not None:
            self._log_file.flush()  # type: ignore[attr-defined]
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM then SIGKILL the process group led by ``proc``; returns its rc."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    # Workers may outlive a parent that died first; make sure none stay.
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def session_cpu_seconds(sid: int) -> tuple[float, float]:
    """utime+stime (fields 14/15 of /proc/PID/stat): (sum over session ``sid``, leader only)."""
    total_ticks = 0
    leader_ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read().decode(errors="replace")
        except OSError:
            continue
        # comm may contain spaces/parens; fields after the last ')' are fixed.
        rest = raw[raw.rfind(")") + 2 :].split()
        # rest[0] is field 3 (state); session is field 6, utime/stime 14/15.
        if len(rest) < 13 or int(rest[3]) != sid:
            continue
        ticks = int(rest[11]) + int(rest[12])
        total_ticks += ticks
        if int(entry) == sid:
            leader_ticks = ticks
    return total_ticks / _CLK_TCK, leader_ticks / _CLK_TCK


def count_log_levels(log_path: Path, samples: int = 5) -> dict[str, object]:
    """Count WARNING/ERROR-ish lines in a server log and keep a few examples."""
    counts = {"warning": 0, "error": 0, "traceback": 0}
    examples: list[str] = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        match = _LOG_LEVEL_RE.search(line)
        if not match:
            continue
        level = match.group(1)
        if level in ("WARNING", "WARN"):
            counts["warning"] += 1
        elif level is None:
            counts["traceback"] += 1
        else:
            counts["error"] += 1
        if len(examples) < samples:
            examples.append(line[:300])
    return {**counts, "lines": len(lines), "examples": examples}


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Inherit the environment minus any MLSERVE_* knobs, then apply ``extra``.

    Stray MLSERVE_* variables in the caller's shell would silently change the
    scenario (e.g. leave batching off in the "batching on" run).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVE_")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def floor_argv(port: int, workers: int) -> list[str]:
    """Command line for the HTTP floor server."""
    return [
        sys.executable,
        "-m",
        "benchmarks.floor_server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def mlserve_argv(cmd: Sequence[str], port: int, models_dir: Path, workers: int, frontends: int = 1) -> list[str]:
    """Command line for ``mlserve serve`` per the server's CLI contract.

    ``--frontends`` is passed only above 1, so that a ``--baseline`` build from before the flag still
    serves every one-front-end scenario.
    """
    return [
        *cmd,
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--models-dir",
        str(models_dir),
        "--workers",
        str(workers),
        *(["--frontends", str(frontends)] if frontends != 1 else []),
    ]


def _reap_all() -> None:
    """atexit safety net: nothing we started may outlive the harness."""
    for proc in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            stop_process_group(proc, timeout=5.0)
    _LIVE.clear()


atexit.register(_reap_all)
