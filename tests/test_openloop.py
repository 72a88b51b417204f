"""The benchmark's own instruments: the open-loop generator and the batch-size histogram reader.

A benchmark that measures wrongly is worse than none, so the two things it cannot take from a
well-known tool are tested against real sockets: the generator must count the time a request waited
for a free connection (no coordinated omission), and must send at the rate it was asked for.

Where wrk2 is found it runs the open-loop points instead: its text is read from a captured real run,
into the same figures as our generator's, and the lookup must fall back to ours when there is none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from benchmarks import analysis, openloop, promtext, scenarios, wrk_runner

SLOW_S = 0.05
POINT_KEYS = {"generator", "target_rps", "duration_s", "connections", "requests", "rps", "p50_ms", "p90_ms",
              "p99_ms", "max_ms", "lag_p99_ms", "non2xx", "unanswered", "socket_errors"}
"""What an open-loop point holds whichever generator ran it (what the report reads)."""


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
    assert result.keys() == POINT_KEYS and result["generator"] == "openloop"
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


# wrk2 -t1 -c16 -d3s -R300 --latency -s benchmarks/wrk/predict.lua against the floor's unknown path /nope
# (every answer a 404), the floor killed two seconds in (then the writes fail); its detailed spectrum cut
# to a few lines, and the WRKJSON line common.lua's done() prints split in two.
WRK2_OUTPUT = """\
Running 3s test @ http://127.0.0.1:18931/nope
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.76ms    1.26ms  11.26ms   88.98%
    Req/Sec       -nan      -nan   0.00      0.00%
  Latency Distribution (HdrHistogram - Recorded Latency)
 50.000%    1.47ms
 75.000%    1.87ms
 90.000%    3.18ms
 99.000%    6.32ms
 99.900%    8.22ms
 99.990%   11.26ms
 99.999%   11.26ms
100.000%   11.26ms

  Detailed Percentile spectrum:
       Value   Percentile   TotalCount 1/(1-Percentile)

       0.379     0.000000            1         1.00
       0.775     0.100000           59         1.11
       1.467     0.500000          295         2.00
       1.874     0.750000          443         4.00
       3.185     0.900000          531        10.00
       6.575     0.990625          585       106.67
      11.263     0.998437          590       640.00
      11.263     1.000000          590          inf
#[Mean    =        1.760, StdDeviation   =        1.261]
#[Max     =       11.256, Total count    =          590]
#[Buckets =           27, SubBuckets     =         2048]
----------------------------------------------------------
  590 requests in 4.08s, 100.25KB read
  Socket errors: connect 0, read 1, write 27954, timeout 0
  Non-2xx or 3xx responses: 590
Requests/sec:    144.50
Transfer/sec:     24.55KB
WRKJSON {"requests":590,"duration_us":4083148,"bytes":102660,"non2xx":590,"errors":{"connect":0,"read":1,\
"write":27954,"timeout":0},"latency_us":{"p50":1467,"p90":3185,"p99":6323,"max":11256,"mean":1760.1,"stdev":1261.3}}
"""


def test_wrk2_output_is_read_as_an_open_loop_point() -> None:
    """The corrected percentiles, the footer's exact mean and max, errors, and answers per due second."""
    point = wrk_runner.parse_wrk2_output(WRK2_OUTPUT, rate=300, duration_s=3, connections=16)
    assert POINT_KEYS <= point.keys() and point["generator"] == "wrk2"
    assert (point["p50_ms"], point["p90_ms"], point["p99_ms"], point["p999_ms"]) == (1.47, 3.18, 6.32, 8.22)
    assert (point["mean_ms"], point["max_ms"]) == (1.76, 11.256)
    assert (point["requests"], point["non2xx"], point["socket_errors"]) == (590, 590, 27955)
    # 16 connections opened 5 ms apart, each at 18.75 req/s from its connect: 897 requests fell due in 3 s.
    assert wrk_runner.wrk2_due(300, 3, 16) == 897
    assert point["rps"] == pytest.approx(300 * 590 / 897)
    assert point["wrk2_rps"] == 144.5
    assert point["lag_p99_ms"] is None and point["unanswered"] is None


def test_wrk2_latency_units_are_read_as_ms() -> None:
    text = WRK2_OUTPUT.replace(" 50.000%    1.47ms", " 50.000%  847.00us").replace(" 99.000%    6.32ms",
                                                                                  " 99.000%    1.02s")
    point = wrk_runner.parse_wrk2_output(text, rate=300, duration_s=3, connections=16)
    assert (point["p50_ms"], point["p99_ms"]) == (0.847, 1020.0)


def test_wrk_output_is_not_taken_for_wrk2() -> None:
    """Plain wrk (no -R, no HdrHistogram lines) given as wrk2 is an error, not a point of zeros."""
    wrk = "  Latency Distribution\n     50%    1.20ms\n     99%    6.00ms\n  590 requests in 3.00s\n"
    with pytest.raises(wrk_runner.LoadError, match="no latency distribution"):
        wrk_runner.parse_wrk2_output(wrk, rate=300, duration_s=3, connections=16)


def executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_wrk2_is_looked_up_by_flag_then_env_then_path_then_the_shared_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag, env, built = (executable(tmp_path / name) for name in ("flag-wrk2", "env-wrk2", "built-wrk"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv(wrk_runner.WRK2_ENV, str(env))
    assert wrk_runner.find_wrk2(str(flag), candidates=[]) == str(flag)
    assert wrk_runner.find_wrk2(None, candidates=[]) == str(env)
    monkeypatch.delenv(wrk_runner.WRK2_ENV)
    assert wrk_runner.find_wrk2(None, candidates=[tmp_path / "missing", built]) == str(built)
    (tmp_path / "bin").mkdir()
    on_path = executable(tmp_path / "bin" / "wrk2")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert wrk_runner.find_wrk2(None, candidates=[built]) == str(on_path)


def test_no_wrk2_means_our_generator_and_a_wrong_one_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(wrk_runner.WRK2_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert wrk_runner.find_wrk2(None, candidates=[tmp_path / "missing"]) is None
    assert str(tmp_path / "cache" / "wrk2" / "wrk") in map(str, wrk_runner.built_wrk2())
    monkeypatch.setenv(wrk_runner.WRK2_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=wrk_runner.WRK2_ENV):
        wrk_runner.find_wrk2(None, candidates=[])


def test_the_floor_runs_open_loop_at_v1_rates_only_beside_v1() -> None:
    assert [s.name for s in scenarios.open_loop_runs(scenarios.select("floor,v1-on"))] == ["v1-on", "floor"]
    assert scenarios.open_loop_runs(scenarios.select("floor,v2-on"))[-1].name == "v2-on"
    assert scenarios.open_loop_runs(scenarios.select("floor")) == []


def test_open_loop_tails_pair_each_floor_point_with_v1_at_the_same_rate() -> None:
    def point(scenario: str, fraction: float, p99: float) -> dict[str, object]:
        return {"scenario": scenario, "loop": "open", "fraction": fraction, "rates_of": "v1-on",
                "target_rps": 1000 * fraction, "rps": 1000 * fraction, "p50_ms": 1.0, "p99_ms": p99,
                "generator": "wrk2"}

    points = [point("v1-on", 0.25, 4.0), point("v1-on", 0.5, 9.0), point("floor", 0.5, 3.0),
              point("floor", 0.25, 2.0), {"scenario": "v1-on", "loop": "closed", "concurrency": 64, "rps": 2000}]
    rows = analysis.open_loop_tails(points)
    assert [(r["target_rps"], r["p99_ms"], r["floor_p99_ms"], r["p99_vs_floor"]) for r in rows] == [
        (250, 4.0, 2.0, 2.0), (500, 9.0, 3.0, 3.0)]
    assert analysis.headline(points[:-1])["open_loop_p99_vs_floor_at_half"] == [rows[1]]
