"""Overload through a real server: a call that cannot meet its deadline behind the queue is refused at
once with 429 and a Retry-After, not queued to time out with 504; high-priority calls go first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from serverproc import Reply, ServerProc, assert_error, assert_ok, call, predict
from testmodels import SlowModel, write_model

StartServer = Callable[..., ServerProc]
DEADLINE_MS = 400
URGENT_MS = 800
CALLS = 40


async def flood(http: aiohttp.ClientSession, server: ServerProc) -> list[tuple[int, float, dict[str, str], object]]:
    """Three calls one at a time (the server learns the model's pace), then 40 at once, each with a
    400 ms deadline, to a model that answers two rows every 100 ms: each call's status, latency,
    headers and body."""
    # 40 connections open first, so the flood's timings hold no TCP handshakes (a dropped SYN on a
    # busy machine costs a second).
    await asyncio.gather(*(call(http, "GET", server.url("/health/live")) for _ in range(CALLS)))
    for n in range(3):
        assert_ok(await predict(http, server, [float(n), 0, 0, 0], model="slow"))

    async def one(n: int) -> tuple[int, float, dict[str, str], object]:
        started = time.perf_counter()
        reply = await call(http, "POST", server.url("/predict"), json_body={"model": "slow", "features": [n, 0, 0, 0]},
                           headers={"X-Request-Timeout-Ms": str(DEADLINE_MS)})
        return reply.status, time.perf_counter() - started, dict(reply.headers), reply.body

    return list(await asyncio.gather(*(one(n) for n in range(CALLS))))


def slow_models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    write_model(models, "slow", "v1", SlowModel(0.1), batching={"max_batch_size": 2})
    return models


async def test_calls_that_would_miss_their_deadline_are_refused_at_once_with_429_and_retry_after(
    http: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(slow_models(tmp_path), env={"MLSERVE_WORKERS": "1"})
    replies = await flood(http, server)
    statuses = [status for status, _, _, _ in replies]
    assert set(statuses) == {200, 429}, f"taken calls are answered in time, the rest refused: {statuses}"
    refusals = sorted(latency for status, latency, _, _ in replies if status == 429)
    for status, _, headers, body in replies:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1, headers
            assert "queued ahead" in body["error"], body  # type: ignore[index]
    median = refusals[len(refusals) // 2]
    assert median < DEADLINE_MS / 1000 / 2, f"refusals took {median:.3f}s (median): they waited instead"


async def test_queue_admission_keeps_the_old_behaviour_waiting_and_timing_out(
    http: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(slow_models(tmp_path), env={"MLSERVE_WORKERS": "1", "MLSERVE_ADMISSION": "queue"})
    statuses = [status for status, _, _, _ in await flood(http, server)]
    assert 429 not in statuses and 504 in statuses, statuses


async def test_high_priority_calls_jump_a_low_priority_backlog_and_the_low_ones_are_shed(
    http: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    """60 low-priority calls with 3 s deadlines fill seconds of queue (the rest are refused); then
    high-priority calls with 800 ms deadlines, by ``X-Priority`` and by the v2 ``priority`` parameter
    (Triton's level 1): each is taken and answered in time, ahead of the backlog."""
    server = start_server(slow_models(tmp_path), env={"MLSERVE_WORKERS": "1"})
    await asyncio.gather(*(call(http, "GET", server.url("/health/live")) for _ in range(CALLS)))
    for n in range(3):
        assert_ok(await predict(http, server, [float(n), 0, 0, 0], model="slow"))

    async def low(n: int) -> Reply:
        return await call(http, "POST", server.url("/predict"), json_body={"model": "slow", "features": [n, 0, 0, 0]},
                          headers={"X-Request-Timeout-Ms": "3000", "X-Priority": "low"})

    async def high(n: int) -> tuple[Reply, float]:
        started = time.perf_counter()
        headers = {"X-Request-Timeout-Ms": str(URGENT_MS)}
        if n % 2:
            infer = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [n, 0, 0, 0]}],
                     "parameters": {"priority": 1}}
            reply = await call(http, "POST", server.url("/v2/models/slow/infer"), json_body=infer, headers=headers)
        else:
            reply = await call(http, "POST", server.url("/predict"), json_body={"model": "slow", "features": [n, 0, 0, 0]},
                               headers=headers | {"X-Priority": "high"})
        return reply, time.perf_counter() - started

    backlog = [asyncio.create_task(low(n)) for n in range(60)]
    await asyncio.sleep(0.15)
    urgent = await asyncio.gather(*(high(n) for n in range(3)))
    for reply, latency in urgent:
        assert_ok(reply)
        assert latency < URGENT_MS / 1000, f"a high-priority call took {latency:.3f}s"
    statuses = [reply.status for reply in await asyncio.gather(*backlog)]
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429, 504}, statuses


async def test_an_unknown_priority_is_a_clear_client_error(http: aiohttp.ClientSession, iris: ServerProc) -> None:
    body = {"features": [5.1, 3.5, 1.4, 0.2]}
    reply = await call(http, "POST", iris.url("/predict"), json_body=body, headers={"X-Priority": "urgent"})
    assert "X-Priority" in assert_error(reply, 400)
    infer = {"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}],
             "parameters": {"priority": "urgent"}}
    reply = await call(http, "POST", iris.url("/v2/models/iris_classifier/infer"), json_body=infer)
    assert_error(reply, 422, path="$.parameters.priority")
    assert_ok(await call(http, "POST", iris.url("/predict"), json_body=body, headers={"X-Priority": "High"}))
