"""Overload through a real server: a call that cannot meet its deadline behind the queue is refused at
once with 429 and a Retry-After, not queued to time out with 504."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from serverproc import ServerProc, assert_ok, call, predict
from testmodels import SlowModel, write_model

StartServer = Callable[..., ServerProc]
DEADLINE_MS = 400
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
