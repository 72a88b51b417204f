"""Run ``mlserve serve`` as a real subprocess and talk to it over real sockets.

Nothing here is mocked: the server is the installed ``mlserve`` started with ``python -m mlserve``,
its workers are real spawned processes, and requests go through aiohttp over TCP. ``PYTHONPATH``
points at ``tests/`` so workers can unpickle the models of ``testmodels.py``.

The server's stdout and stderr go to a log file. The log is shown when the server fails to start or
a test fails, and a "Traceback" in it fails the test unless the test says it expects one.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
from multidict import CIMultiDictProxy

TESTS_DIR = Path(__file__).resolve().parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.05
ADDRESS_IN_USE = "address already in use"
IRIS_VERSIONS = ("v1", "v2")
"""The versions ``mlserve.demo_models.train_iris`` writes."""

WaitFor = Literal["ready", "loaded", "live"]
"""How far start-up must get: every version ready (200 on /health/ready), every version done
loading whether it succeeded or failed, or only the process answering (/health/live)."""


ALL_FRONTENDS_LISTEN = "front ends listen on"
"""What the supervisor of several front ends logs once every one of them has joined the port."""


class ServerFailed(AssertionError):
    """The server did not start, did not stop in time, or logged a traceback it should not have."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mlserve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlserve", *args]


def mlserve_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an ``mlserve`` process: none of the caller's ``MLSERVE_*``, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, read from ``/proc`` (works without CONFIG_PROC_CHILDREN)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``: a server and the workers it spawned."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return sorted(members)


def wait_group_gone(pgid: int, timeout_s: float = STOP_TIMEOUT_S) -> list[int]:
    """Wait for every process of group ``pgid`` to exit; SIGKILL and return those that did not."""
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return left


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class ServerProc:
    """One ``mlserve serve`` process on a free port, with its log file."""

    started: ClassVar[list[ServerProc]] = []
    """Every server started in this test session, so a failing test can show their logs."""

    def __init__(
        self,
        models_dir: Path,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        config: str | None = None,
        workers: int = 2,
        expect_traceback: bool = False,
        host: str = "127.0.0.1",
        args: Sequence[str] = (),
        frontends: int = 1,
    ) -> None:
        self.models_dir = models_dir
        self.frontends = frontends
        """With more than one, ``start`` waits until every front end listens (each joins the port only
        once its models are loaded)."""
        self.args = list(args)
        """More ``mlserve serve`` arguments (``--model URI``)."""
        self.workdir = workdir
        self.host = host
        self.env = {"MLSERVE_STATE_PATH": str(workdir / "state.json"), **(env or {})}
        """A state file of its own unless the test says otherwise, so servers on one repository never
        share activations by accident."""
        self.config = config
        self.workers = workers
        self.expect_traceback = expect_traceback
        self.port = 0
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process control -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: WaitFor = "ready", attempts: int = 3) -> None:
        """Start on a free port and wait for ``wait``; retry on a port taken in the meantime."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self._spawn()
            try:
                self.wait_until(wait)
                return
            except ServerFailed:
                if attempt + 1 < attempts and not self.running() and ADDRESS_IN_USE in self.log().lower():
                    continue
                self.stop(check=False)
                raise

    def _spawn(self) -> None:
        self.port = free_port()
        args = ["serve", "--host", self.host, "--port", str(self.port)]
        args += ["--models-dir", str(self.models_dir), "--workers", str(self.workers), *self.args]
        if self.frontends != 1:
            args += ["--frontends", str(self.frontends)]
        if self.config is not None:
            config_path = self.workdir / "mlserve.toml"
            config_path.write_text(self.config)
            args += ["--config", str(config_path)]
        with self.log_path.open("ab") as log:
            shown = {k: "***" if "TOKEN" in k else v for k, v in self.env.items()}  # the log is checked for leaks
            log.write(f"--- mlserve {' '.join(args)} (env {shown})\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                mlserve_command(*args),
                env=mlserve_env(self.env),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ServerProc.started.append(self)

    def wait_until(self, wait: WaitFor, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll the health endpoints until ``wait`` holds; fail with the log if the process exits."""
        path = "/health/live" if wait == "live" else "/health/ready"
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            if not self.running():
                raise ServerFailed(
                    f"mlserve exited with {self.proc and self.proc.returncode} before {wait}:\n{self.log()}"
                )
            try:
                status, body = self.get_sync(path)
            except OSError as exc:
                last = repr(exc)
            else:
                last = f"{status} {body}"
                if (status == 200 or (
                    wait == "loaded" and "loading" not in body.get("models", {"": "loading"}).values()
                )) and (self.frontends == 1 or wait == "live" or ALL_FRONTENDS_LISTEN in self.log()):
                    return
            if time.monotonic() > deadline:
                raise ServerFailed(f"mlserve not {wait} within {timeout_s:.0f}s (last: {last}):\n{self.log()}")
            time.sleep(POLL_INTERVAL_S)

    def get_sync(self, path: str) -> tuple[int, Any]:
        """A blocking GET for polling from synchronous fixtures; the tests themselves use aiohttp."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def terminate(self) -> None:
        """Send SIGTERM (the graceful-shutdown signal) without waiting."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for exit; past ``timeout_s`` kill the whole process group and fail."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise ServerFailed(
                f"mlserve did not exit within {timeout_s:.0f}s of SIGTERM; killed:\n{self.log()}"
            ) from None

    def stop(self, check: bool = True) -> None:
        """SIGTERM and wait (kill after 20 s); then, with ``check``, refuse workers that outlive the
        server and a log with a traceback."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.wait_exit()
            except ServerFailed:
                if check:
                    raise
        left = wait_group_gone(self.pid)
        if check:
            assert not left, f"processes {left} outlived the server (killed now):\n{self.log()}"
            self.check_log()

    def worker_pids(self) -> list[int]:
        """The worker processes: children of the server started by multiprocessing's spawn."""
        return [pid for pid in child_pids(self.pid) if "spawn_main" in _cmdline(pid)]

    # -- the log ---------------------------------------------------------------------------------

    def log(self, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(since)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def check_log(self, since: int = 0) -> None:
        """Fail if the log (from byte ``since``) holds a traceback this server was not told to expect."""
        text = self.log(since)
        if "Traceback" in text and not self.expect_traceback:
            raise ServerFailed(f"mlserve logged a traceback:\n{text}")


@contextlib.contextmanager
def watched(server: ServerProc) -> Iterator[ServerProc]:
    """A server shared by several tests, for one of them: it must still run when the test ends and have
    logged no traceback during it."""
    since = server.log_size()
    yield server
    assert server.running(), f"the server died:\n{server.log()}"
    server.check_log(since)


@contextlib.contextmanager
def serve(
    models_dir: Path,
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    config: str | None = None,
    workers: int = 2,
    wait: WaitFor = "ready",
    expect_traceback: bool = False,
    frontends: int = 1,
) -> Iterator[ServerProc]:
    """A started server that is always stopped afterwards, and whose log is checked if all went well."""
    server = ServerProc(
        models_dir, workdir, env=env, config=config, workers=workers, expect_traceback=expect_traceback,
        frontends=frontends,
    )
    server.start(wait)
    try:
        yield server
    except BaseException:
        server.stop(check=False)
        raise
    server.stop()


# -- talking to it ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What a client sees: the status, the headers, and the body (parsed when it is JSON)."""

    status: int
    headers: CIMultiDictProxy[str]
    text: str
    body: Any

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """One request; ``json_body`` is encoded as JSON, ``data`` is sent as given (to send bad JSON)."""
    if json_body is not None:
        data = json.dumps(json_body).encode()
    send_headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else headers
    async with http.request(method, url, data=data, headers=send_headers) as response:
        text = await response.text()
        body = json.loads(text) if response.content_type == "application/json" else None
        return Reply(response.status, response.headers, text, body)


async def predict(http: aiohttp.ClientSession, server: ServerProc, features: Sequence[float], **fields: Any) -> Reply:
    """``POST /predict``; ``fields`` adds ``model`` / ``model_version`` (or anything else)."""
    return await call(http, "POST", server.url("/predict"), json_body={"features": list(features), **fields})


async def predict_batch(
    http: aiohttp.ClientSession, server: ServerProc, samples: Sequence[Sequence[float]], **fields: Any
) -> Reply:
    body = {"samples": [list(row) for row in samples], **fields}
    return await call(http, "POST", server.url("/predict/batch"), json_body=body)


def assert_ok(reply: Reply) -> dict[str, Any]:
    assert reply.status == 200, f"expected 200, got {reply.status}: {reply.text}"
    assert reply.content_type == "application/json", reply.headers
    assert isinstance(reply.body, dict), reply.text
    return reply.body


ANY_PATH: Any = object()
"""``assert_error``'s default: the error need not name a field."""


def assert_error(reply: Reply, status: int, *, path: object = ANY_PATH, retry: bool = True) -> str:
    """The error contract: ``status``, a JSON object with an ``error`` string, ``path`` where given,
    and a positive integer ``Retry-After`` on a 503 that is worth retrying (none on one that is not,
    such as a model that failed to load). Returns the error message."""
    assert reply.status == status, f"expected {status}, got {reply.status}: {reply.text}"
    assert reply.content_type == "application/json", f"error is not JSON ({reply.content_type}): {reply.text}"
    assert isinstance(reply.body, dict), reply.text
    message = reply.body.get("error")
    assert isinstance(message, str) and message, reply.text
    if path is not ANY_PATH:
        assert reply.body.get("path") == path, f"expected path {path!r}: {reply.text}"
    if status == 503 and not retry:
        assert "Retry-After" not in reply.headers, f"Retry-After on a 503 that will not clear: {dict(reply.headers)}"
    elif status == 503:
        retry_after = reply.headers.get("Retry-After", "")
        assert retry_after.isdigit() and int(retry_after) >= 1, (
            f"503 without a valid Retry-After: {dict(reply.headers)}"
        )
    return message


async def poll(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str, interval_s: float = POLL_INTERVAL_S
) -> None:
    """Await ``check`` until it returns True, or fail after ``timeout_s`` naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


# -- /metrics ---------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Metrics:
    """A parsed Prometheus text scrape: (name, labels, value) samples."""

    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = []
        for line in text.splitlines():
            match = _SAMPLE.match(line.strip())
            if match is None or line.startswith("#"):
                continue
            name, labels, value = match.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
        return cls(tuple(samples))

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [labels for sample, labels, _ in self.samples if sample == name]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over samples whose labels include ``labels`` (0 when there are none)."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(key) == want for key, want in labels.items())
        )


async def scrape(http: aiohttp.ClientSession, server: ServerProc) -> Metrics:
    reply = await call(http, "GET", server.url("/metrics"))
    assert reply.status == 200, reply.text
    return Metrics.parse(reply.text)
