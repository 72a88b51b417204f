"""The server's life: loading, readiness, graceful shutdown, dead workers, bad settings, the CLI.

Each test starts its own server on the models of ``testmodels.py`` (slow loads, slow predicts,
crashing workers) and waits on observable state (health, metrics, worker pids), never on sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import pytest

from mlserve.demo_models import IRIS
from serverproc import (
    IRIS_VERSIONS,
    Reply,
    ServerProc,
    assert_error,
    assert_ok,
    call,
    free_port,
    mlserve_command,
    mlserve_env,
    poll,
    predict,
    scrape,
    wait_group_gone,
)
from testmodels import (
    CRASH_VALUE,
    HANG_VALUE,
    HOG_VALUE,
    CrashingModel,
    HangingModel,
    MemoryHungryModel,
    SlowLoadingModel,
    SlowModel,
    write_model,
)

RECOVERY_S = 30.0
"""How long a restarted worker may take to come back and serve."""
CLI_TIMEOUT_S = 60.0


def models_with(tmp_path: Path, name: str, estimator: object) -> Path:
    """A repository holding one test model as ``name`` v1."""
    models = tmp_path / "models"
    write_model(models, name, "v1", estimator)
    return models


async def metric(http: aiohttp.ClientSession, server: ServerProc, name: str, **labels: str) -> float:
    return (await scrape(http, server)).value(name, **labels)


def doubled(reply: Reply, x: float) -> None:
    """A SlowModel-family answer: 200 and twice the first feature."""
    assert assert_ok(reply)["prediction"] == 2.0 * x, reply.text


async def one_batch_per_worker(
    http: aiohttp.ClientSession, server: ServerProc, xs: list[float]
) -> list[asyncio.Task[Reply]]:
    """Start one ``/predict`` a value, each only once the previous one's batch is dispatched, so each
    lands alone on the least busy worker: with two workers and two 1 s requests, both are busy."""
    calls = []
    for x in xs:
        rows_before = await metric(http, server, "mlserve_batch_size_sum")
        calls.append(asyncio.create_task(predict(http, server, [x, 0, 0, 0])))

        async def dispatched(rows: float = rows_before + 1) -> bool:
            return await metric(http, server, "mlserve_batch_size_sum") == rows

        await poll(dispatched, timeout_s=10, what=f"the request for {x} to be dispatched")
    return calls


async def test_not_ready_while_a_model_loads(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """During a 3 s load the process is live but not ready, and predictions get 503 + Retry-After."""
    server = start_server(models_with(tmp_path, "slowload", SlowLoadingModel(0.0, load_s=3.0)), wait="live")
    assert assert_ok(await call(http, "GET", server.url("/health/live")))["status"] == "alive"
    ready = await call(http, "GET", server.url("/health/ready"))
    assert ready.status == 503 and ready.content_type == "application/json", ready.text
    assert ready.body == {"status": "loading", "models": {"slowload:v1": "loading"}}
    assert "loading" in assert_error(await predict(http, server, [1.0, 0, 0, 0], model="slowload"), 503)

    async def is_ready() -> bool:
        return (await call(http, "GET", server.url("/health/ready"))).status == 200

    await poll(is_ready, timeout_s=60, what="/health/ready to turn 200")
    doubled(await predict(http, server, [2.0, 0, 0, 0]), 2.0)


async def test_sigterm_drains_in_flight_requests_then_exits_cleanly(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """SIGTERM with six 1 s requests in flight: all six are answered, exit code 0, then no listener."""
    server = start_server(models_with(tmp_path, "slow", SlowModel(1.0)))
    calls = [asyncio.create_task(predict(http, server, [float(i), 0, 0, 0])) for i in range(6)]

    async def all_arrived() -> bool:
        metrics = await scrape(http, server)
        return metrics.value("mlserve_batch_size_sum") + metrics.value("mlserve_queue_depth") == len(calls)

    await poll(all_arrived, timeout_s=10, what="all six requests to reach the batcher")
    server.terminate()
    replies = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    for i, reply in enumerate(replies):
        doubled(reply, i)
    assert await asyncio.to_thread(server.wait_exit) == 0, server.log()
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectorError):
            await call(fresh, "GET", server.url("/health/live"))


async def test_shutdown_timeout_cuts_off_a_long_request_cleanly(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """Past ``shutdown_timeout_s`` the server closes the worker's socket while the worker computes; the
    worker's reply must then end it quietly (it once died with a BrokenPipeError traceback). The caller
    may be cut off (503 or a dropped connection), but the exit is clean: code 0, no traceback, no
    worker left behind."""
    server = start_server(
        models_with(tmp_path, "slow", SlowModel(3.0)), env={"MLSERVE_SHUTDOWN_TIMEOUT_S": "0.5"}, expect_traceback=True
    )
    [call_] = await one_batch_per_worker(http, server, [1.0])
    server.terminate()
    try:
        reply = await asyncio.wait_for(call_, timeout=RECOVERY_S)
    except aiohttp.ClientConnectionError:
        pass  # cut off at the deadline: acceptable
    else:
        if reply.status != 200:
            assert_error(reply, 503)
    assert await asyncio.to_thread(server.wait_exit) == 0, server.log()
    assert wait_group_gone(server.pid) == [], "a worker outlived the server"
    assert "Traceback" not in server.log(), server.log()


async def test_requests_whose_clients_hung_up_are_dropped_not_computed(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """Five clients give up while queued behind a 1 s request. Their requests must cost no model time
    (dropped before a batch runs, counted as status 499), so the next caller is not stuck behind work
    nobody wants: the model runs exactly two batches, the first request's and the next one's."""
    one_at_a_time = {"MLSERVE_BATCHING__MAX_BATCH_SIZE": "1", "MLSERVE_BATCHING__MAX_INFLIGHT": "1"}
    server = start_server(models_with(tmp_path, "slow", SlowModel(1.0)), workers=1, env=one_at_a_time)
    [first] = await one_batch_per_worker(http, server, [1.0])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as impatient:
        gave_up = await asyncio.gather(
            *(predict(impatient, server, [float(x), 0, 0, 0]) for x in range(5)), return_exceptions=True
        )
    assert all(isinstance(outcome, asyncio.TimeoutError) for outcome in gave_up), gave_up
    doubled(await first, 1.0)
    doubled(await predict(http, server, [7.0, 0, 0, 0]), 7.0)
    assert await metric(http, server, "mlserve_batch_size_count") == 2
    assert await metric(http, server, "mlserve_requests_total", status="499") == 5


async def test_crashing_request_is_503_and_workers_come_back(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """A row that kills its worker kills the retry's worker too: 503, not a hang; then both restart."""
    server = start_server(models_with(tmp_path, "crashy", CrashingModel(0.0)))
    crash = await asyncio.wait_for(predict(http, server, [CRASH_VALUE, 0, 0, 0]), timeout=RECOVERY_S)
    assert "not tried on another" in assert_error(crash, 503), "a poison batch is named, not retried forever"

    async def answered() -> bool:
        reply = await predict(http, server, [2.0, 0, 0, 0])
        if reply.status == 503:
            assert_error(reply, 503)
            return False
        doubled(reply, 2.0)
        return True

    await poll(answered, timeout_s=RECOVERY_S, what="a 200 after the workers restart", interval_s=0.2)

    async def both_restarted() -> bool:
        return await metric(http, server, "mlserve_worker_restarts") >= 2

    await poll(both_restarted, timeout_s=RECOVERY_S, what="mlserve_worker_restarts to reach 2")
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_worker_restarts") == 2 and metrics.value("mlserve_workers_live") == 2
    assert len(server.worker_pids()) == 2


async def test_a_batch_past_max_compute_s_is_504_and_its_worker_replaced_while_the_others_serve(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """A model that hangs: its caller gets 504 once the batch has run max_compute_s (long before the
    request's own deadline), the stuck worker is killed and replaced, and the other one serves
    throughout."""
    models = tmp_path / "models"
    write_model(models, "stuck", "v1", HangingModel(0.0), batching={"max_compute_s": 1.0, "overlap_after_ms": 0})
    server = start_server(models)
    victim_pids = server.worker_pids()
    started = time.monotonic()
    hung = asyncio.create_task(predict(http, server, [HANG_VALUE, 0, 0, 0]))

    async def stuck() -> bool:
        return await metric(http, server, "mlserve_batch_size_sum") == 1

    await poll(stuck, timeout_s=RECOVERY_S, what="the hanging batch to be dispatched")
    for x in (1.0, 2.0, 3.0):  # answered by the other worker while one hangs
        doubled(await asyncio.wait_for(predict(http, server, [x, 0, 0, 0]), 0.9), x)
    reply = await asyncio.wait_for(hung, RECOVERY_S)
    assert "max_compute_s" in assert_error(reply, 504)
    assert 1.0 <= time.monotonic() - started < 5.0, "killed after max_compute_s, not at the 10 s deadline"

    async def replaced() -> bool:
        pids = server.worker_pids()
        return len(pids) == 2 and len(set(pids) - set(victim_pids)) == 1 and await metric(
            http, server, "mlserve_workers_live") == 2

    await poll(replaced, timeout_s=RECOVERY_S, what="a new worker in place of the hung one")
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_workers_hung") == 1 and metrics.value("mlserve_worker_restarts") == 1
    calls = await one_batch_per_worker(http, server, [5.0, 6.0])
    for x, answer in zip([5.0, 6.0], await asyncio.gather(*calls), strict=True):
        doubled(answer, x)
    assert "max_compute_s" in server.log()


async def test_a_batch_over_the_worker_memory_limit_fails_alone_and_the_worker_serves_on(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    server = start_server(models_with(tmp_path, "hog", MemoryHungryModel(0.0)),
                          env={"MLSERVE_WORKER_MAX_MEMORY_MB": "1024", "MLSERVE_WORKERS": "1"})
    pids = server.worker_pids()
    reply = await asyncio.wait_for(predict(http, server, [HOG_VALUE, 0, 0, 0]), RECOVERY_S)
    assert "worker_max_memory_mb" in assert_error(reply, 500)
    doubled(await predict(http, server, [3.0, 0, 0, 0]), 3.0)
    assert server.worker_pids() == pids and await metric(http, server, "mlserve_worker_restarts") == 0


async def test_sigkilled_worker_is_replaced_and_its_caller_answered(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """SIGKILL a worker mid-batch: its caller gets 200 (retried) or 503, never a hang; a new worker
    replaces it and serves."""
    server = start_server(models_with(tmp_path, "slow", SlowModel(1.0)))
    workers = server.worker_pids()
    assert len(workers) == 2, workers
    calls = await one_batch_per_worker(http, server, [0.0, 1.0])
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    replies = await asyncio.wait_for(asyncio.gather(*calls), timeout=RECOVERY_S)
    for x, reply in zip([0.0, 1.0], replies, strict=True):
        if reply.status == 503:
            assert_error(reply, 503)
        else:
            doubled(reply, x)

    async def replaced() -> bool:
        pids = server.worker_pids()
        return len(pids) == 2 and victim not in pids and await metric(http, server, "mlserve_workers_live") == 2

    await poll(replaced, timeout_s=RECOVERY_S, what="a new worker to replace the killed one")
    assert await metric(http, server, "mlserve_worker_restarts") == 1
    calls = await one_batch_per_worker(http, server, [5.0, 6.0])  # the new worker takes one of them
    for x, reply in zip([5.0, 6.0], await asyncio.gather(*calls), strict=True):
        doubled(reply, x)
    assert "died" in server.log()


BAD_SETTINGS = [
    pytest.param({"MLSERVE_PORT": "abc"}, [], "port", id="port-not-a-number"),
    pytest.param({"MLSERVE_WORKERS": "-1"}, [], "workers", id="negative-workers"),
    pytest.param({"MLSERVE_BATCHING__MAX_BATCH_SIZE": "0"}, [], "max_batch_size", id="zero-batch-size"),
    pytest.param({"MLSERVE_REQUEST_TIMOUT_MS": "5"}, [], "request_timout_ms", id="misspelt-setting"),
    pytest.param({}, ["--models-dir", "/nonexistent/models"], "/nonexistent/models", id="missing-models-dir"),
]


@pytest.mark.parametrize(("env", "args", "named"), BAD_SETTINGS)
def test_bad_settings_exit_with_a_clear_message(
    env: dict[str, str], args: list[str], named: str, tmp_path: Path
) -> None:
    """A bad value stops ``mlserve serve`` with a non-zero code and one line naming it, no traceback."""
    args = args or ["--models-dir", str(tmp_path)]
    process = subprocess.Popen(
        mlserve_command("serve", "--host", "127.0.0.1", *args),
        env=mlserve_env({"MLSERVE_PORT": str(free_port()), "MLSERVE_WORKERS": "2", **env}),  # flags would win
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        left = wait_group_gone(process.pid)
    assert process.returncode != 0, stderr
    assert not left, f"processes {left} outlived mlserve (killed now)"
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("mlserve:")]
    assert len(errors) == 1 and named in errors[0], stderr


def run_models_command(models: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        mlserve_command("models", "--models-dir", str(models)),
        env=mlserve_env(),
        cwd=models.parent,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_models_command_trains_both_versions_once(tmp_path: Path, iris_rows: list[list[float]]) -> None:
    """``mlserve models`` writes v1 and v2 with their model.toml; a second run leaves them alone."""
    models = tmp_path / "models"
    first = run_models_command(models)
    written: dict[str, bytes] = {}
    for version in IRIS_VERSIONS:
        assert f"trained {IRIS}:{version}" in first.stdout, first.stdout
        directory = models / IRIS / version
        written[version] = (directory / "model.toml").read_bytes()
        metadata: dict[str, Any] = tomllib.loads(written[version].decode())
        assert (metadata["name"], metadata["version"], metadata["framework"]) == (IRIS, version, "sklearn")
        assert metadata["input_shape"] == [4] and 0.8 < metadata["accuracy"] <= 1.0, metadata
        assert metadata["batching"]["max_batch_size"] >= 1, metadata
        estimator = joblib.load(directory / metadata["artifact"])
        assert estimator.predict([iris_rows[0]])[0] == 0 and metadata["class_labels"][0] == "setosa"
    second = run_models_command(models)
    assert "trained" not in second.stdout and "already" in second.stdout, second.stdout
    for version in IRIS_VERSIONS:
        assert (models / IRIS / version / "model.toml").read_bytes() == written[version], "a second run retrained"


async def test_sigterm_turns_readiness_503_at_once_and_serves_through_the_drain_delay(
    http: aiohttp.ClientSession, start_server: Callable[..., ServerProc], tmp_path: Path
) -> None:
    """With ``drain_delay_s``, a load balancer's health check sees 503 ``draining`` right after SIGTERM
    while calls are still answered; then the listener goes and the exit is clean."""
    server = start_server(models_with(tmp_path, "slow", SlowModel(0.0)), env={"MLSERVE_DRAIN_DELAY_S": "1.5"})
    server.terminate()
    started = time.monotonic()

    async def draining() -> bool:
        reply = await call(http, "GET", server.url("/health/ready"))
        return reply.status == 503 and reply.body["status"] == "draining"

    await poll(draining, timeout_s=0.5, what="readiness to answer 503 draining", interval_s=0.02)
    while time.monotonic() - started < 1.0:
        doubled(await predict(http, server, [3.0, 0, 0, 0]), 3.0)
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(server.wait_exit) == 0, server.log()
    assert time.monotonic() - started >= 1.5, "it kept listening for the drain delay"
