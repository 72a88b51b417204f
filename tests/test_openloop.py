"""The benchmark's own instruments: the open-loop generator and the batch-size histogram reader.

A benchmark that measures wrongly is worse than none, so the two things it cannot take from a
well-known tool are tested against real sockets: the generator must count the time a request waited
for a free connection (no coordinated omission), and must send at the rate it was asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from benchmarks import openloop, promtext

SLOW_S = 0.05


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """An aiohttp server on a real socket: ``/fast`` answers at once, ``/slow`` after 50 ms."""

    async def fast(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(SLOW_S)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/fast", fast)
    app.router.add_post("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def payloads(url: str) -> list[bytes]:
    return openloop.requests(url, openloop.iris_bodies("iris_classifier", "v1", count=64))


async def test_sends_at_the_asked_rate_and_counts_every_answer(server: str) -> None:
    url = f"{server}/fast"
    result = await openloop.drive(url, payloads(url), rate=400, duration_s=1.0, warmup_s=0.2, connections=8)
    assert 380 <= result["requests"] <= 420
    assert result["non2xx"] == 0 and result["unanswered"] == 0 and result["socket_errors"] == 0
    assert 0 < result["p50_ms"] < SLOW_S * 1000


async def test_waiting_for_a_busy_connection_counts_as_latency(server: str) -> None:
    """One connection, 50 ms an answer, 40 arrivals a second: a queue builds, as users would see.

    A closed-loop client would report 50 ms for every request; measured from the scheduled time, the
    last requests of the second have waited for the ones before them.
    """
    url = f"{server}/slow"
    result = await openloop.drive(url, payloads(url), rate=40, duration_s=1.0, warmup_s=0.0, connections=1)
    assert result["non2xx"] == 0 and result["unanswered"] == 0
    assert result["requests"] == 40
    assert result["p50_ms"] > 4 * SLOW_S * 1000
    assert result["max_ms"] > 15 * SLOW_S * 1000


def test_batch_histogram_is_read_per_bucket_and_differenced() -> None:
    def text(ones: int, twos: int, big: int) -> str:
        return "\n".join([
            "# TYPE mlserve_batch_size histogram",
            f'mlserve_batch_size_bucket{{model="m",version="v1",le="1"}} {ones}',
            f'mlserve_batch_size_bucket{{model="m",version="v1",le="2"}} {ones + twos}',
            f'mlserve_batch_size_bucket{{model="m",version="v1",le="+Inf"}} {ones + twos + big}',
            f'mlserve_batch_size_sum{{model="m",version="v1"}} {ones + 2 * twos + 100 * big}',
            f'mlserve_batch_size_count{{model="m",version="v1"}} {ones + twos + big}',
            'mlserve_batch_size_bucket{model="m",version="v2",le="1"} 999',
        ])

    before = promtext.histogram_totals(text(1, 1, 0), model="m", version="v1")
    after = promtext.histogram_totals(text(4, 3, 1), model="m", version="v1")
    delta = after.minus(before)
    assert delta.per_bucket() == {"1": 3, "2": 2, "+Inf": 1}
    assert (delta.sum, delta.count) == (3 + 4 + 100, 6)
