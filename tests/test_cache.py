"""The prediction cache: keys, L1, Redis, single-flight and what a failing Redis costs.

In-process tests cover the key and the LRU; the rest run a real server (and a real ``redis-server``
on a free port, stopped, killed or paused with SIGSTOP mid-test) and check what a client sees:
answers, ``X-Cache``, and how many rows the model really computed (``mlserve_batch_size_sum``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from mlserve.cache import CacheView, PredictionCache
from mlserve.demo_models import IRIS
from mlserve.settings import CacheSettings
from redisproc import RedisProc
from serverproc import Reply, ServerProc, assert_ok, call, predict, predict_batch, scrape
from testmodels import SlowModel, write_model

StartServer = Callable[..., ServerProc]
CACHE_ON = {"MLSERVE_CACHE__ENABLED": "true"}
DEADLINE_MS = 2000


def x_cache(reply: Reply) -> str | None:
    return reply.headers.get("X-Cache")


async def rows_computed(
    http: aiohttp.ClientSession, server: ServerProc, version: str = "v2", model: str = IRIS
) -> float:
    return (await scrape(http, server)).value("mlserve_batch_size_sum", model=model, version=version)


# -- in-process ----------------------------------------------------------------------------------------


def test_key_is_the_version_and_the_rows_float64_content() -> None:
    view = CacheView("m", "v1", 1)
    assert view.key([1, 2, 3, 4]) == view.key([1.0, 2.0, 3.0, 4.0])
    assert view.key([1.0, 2.0, 3.0, 4.0]) != view.key([1.0, 2.0, 3.0, 4.000001])
    assert view.key([1.0, 2.0]) != view.key([1.0, 2.0, 0.0]), "the width is part of the content"
    assert view.key(b"\x89PNG...") != view.key(b"\x89PNG..!")
    assert view.key([1.0]) != CacheView("m", "v2", 1).key([1.0]) != CacheView("m2", "v1", 1).key([1.0])
    assert view.key([1.0]) == CacheView("m", "v1", 1).key([1.0]), "one key in every process and replica"
    assert len(view.key(b"any image")) == 16


async def test_l1_is_an_lru_with_a_ttl() -> None:
    cache = PredictionCache(CacheSettings(enabled=True, l1_entries=2), None, "t")
    view = CacheView("m", "v1", ttl_s=0.2)
    rows = [[1.0], [2.0], [3.0]]
    keys, _, _ = cache.lookup(view, rows, bypass=False)
    cache.store(view, keys[:2], ["a", "b"])
    assert cache.lookup(view, rows[:1], bypass=False)[1] == ["a"], "a hit makes row 1 the most recent"
    cache.store(view, keys[2:], ["c"])
    _, values, missing = cache.lookup(view, rows, bypass=False)
    assert missing == [1] and values[0] == "a" and values[2] == "c", "row 2, least recently used, went"
    await asyncio.sleep(0.25)
    assert cache.lookup(view, rows, bypass=False)[2] == [0, 1, 2], "every entry expired"
    await cache.close()


async def test_a_hit_whose_caller_went_away_is_dropped_quietly() -> None:
    """A hit is resolved on the next loop iteration; a client that hung up meanwhile cancelled it (seen
    at the end of every load run as an ``InvalidStateError`` traceback a connection)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    cache = PredictionCache(CacheSettings(enabled=True), None, "t")
    view = CacheView("m", "v1", ttl_s=60)
    keys, _, _ = cache.lookup(view, [[1.0]], bypass=False)
    cache.store(view, keys, ["a"])
    answer = cache.answer(view, [[1.0]], False, submit=lambda *args: pytest.fail("a hit computes nothing"),
                          timeout_s=1.0)
    assert isinstance(answer, asyncio.Future)
    answer.cancel()
    await asyncio.sleep(0.01)
    assert errors == []
    await cache.close()


# -- a real server ---------------------------------------------------------------------------------------


async def test_hit_miss_no_cache_and_expiry(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, offline: dict[str, list[int]],
    iris_rows: list[list[float]],
) -> None:
    server = start_server(demo_models_dir, env={**CACHE_ON, "MLSERVE_CACHE__TTL_S": "1"})
    row = iris_rows[120]
    first = await predict(http, server, row)
    second = await predict(http, server, [int(x) if x == int(x) else x for x in row])
    assert (x_cache(first), x_cache(second)) == ("miss", "hit")
    assert assert_ok(first)["prediction"] == assert_ok(second)["prediction"] == offline["v2"][120]
    assert assert_ok(second)["label"] == assert_ok(first)["label"]
    computed = await rows_computed(http, server)
    fresh = await call(http, "POST", server.url("/predict"), json_body={"features": row},
                       headers={"Cache-Control": "no-cache"})
    assert x_cache(fresh) == "miss" and await rows_computed(http, server) == computed + 1
    await asyncio.sleep(1.1)
    assert x_cache(await predict(http, server, row)) == "miss", "the entry expired after ttl_s"
    listing = assert_ok(await call(http, "GET", server.url(f"/models/{IRIS}/versions")))
    assert {v["version"]: v["cache"] for v in listing["versions"]} == {
        "v1": {"enabled": True, "ttl_s": 1.0}, "v2": {"enabled": True, "ttl_s": 1.0}
    }
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_cache_requests_total", model=IRIS, version="v2", layer="l1", result="hit") == 1
    assert metrics.value("mlserve_cache_requests_total", model=IRIS, version="v2", layer="l1", result="bypass") == 1


async def test_cache_off_sends_no_header(http: aiohttp.ClientSession, iris: ServerProc) -> None:
    assert x_cache(await predict(http, iris, [5.1, 3.5, 1.4, 0.2])) is None


async def test_new_active_version_never_answers_from_the_old_ones_entries(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, offline: dict[str, list[int]],
    iris_rows: list[list[float]],
) -> None:
    server = start_server(demo_models_dir, env=CACHE_ON, config=f'[models.{IRIS}]\nactive_version = "v1"\n')
    assert offline["v1"] != offline["v2"]
    first = assert_ok(await predict_batch(http, server, iris_rows))
    assert first["predictions"] == offline["v1"]
    assert x_cache(await predict_batch(http, server, iris_rows)) == "hit"
    assert_ok(await call(http, "POST", server.url(f"/models/{IRIS}/versions/v2/activate")))
    after = await predict_batch(http, server, iris_rows)
    assert x_cache(after) == "miss"
    assert assert_ok(after)["model_version"] == "v2" and after.body["predictions"] == offline["v2"]


async def test_batch_computes_only_rows_neither_cached_nor_repeated(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, offline: dict[str, list[int]],
    iris_rows: list[list[float]],
) -> None:
    server = start_server(demo_models_dir, env=CACHE_ON)
    assert_ok(await predict_batch(http, server, iris_rows[:10]))
    before = await rows_computed(http, server)
    order = [3, 50, 50, 7, 60, 61, 60, 9, 50]  # 3, 7, 9 cached; 50, 60, 61 new, some repeated
    reply = await predict_batch(http, server, [iris_rows[i] for i in order])
    assert assert_ok(reply)["predictions"] == [offline["v2"][i] for i in order]
    assert x_cache(reply) == "miss"
    assert await rows_computed(http, server) - before == 3, "only the three distinct new rows ran"


async def test_identical_requests_in_flight_share_one_computation(
    http: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    write_model(models, "slow", "v1", SlowModel(0.5))
    server = start_server(models, env=CACHE_ON)
    replies = await asyncio.gather(*(predict(http, server, [4.0, 1, 2, 3]) for _ in range(50)))
    assert {assert_ok(r)["prediction"] for r in replies} == {8.0}
    assert await rows_computed(http, server, "v1", "slow") == 1, "fifty callers, one row computed"


# -- Redis ------------------------------------------------------------------------------------------------


async def test_replicas_share_hits_through_redis(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, redis: RedisProc,
    offline: dict[str, list[int]], iris_rows: list[list[float]],
) -> None:
    env = {**CACHE_ON, "MLSERVE_CACHE__REDIS_URL": redis.url, "MLSERVE_CACHE__L1_ENTRIES": "0"}
    first, second = start_server(demo_models_dir, env=env), start_server(demo_models_dir, env=env)
    assert x_cache(await predict_batch(http, first, iris_rows)) == "miss"

    async def stored() -> bool:
        return x_cache(await predict_batch(http, first, iris_rows)) == "hit"

    for _ in range(100):  # writes are not awaited by the caller: give them a moment
        if await stored():
            break
        await asyncio.sleep(0.02)
    reply = await predict_batch(http, second, iris_rows)
    assert x_cache(reply) == "hit" and assert_ok(reply)["predictions"] == offline["v2"]
    assert await rows_computed(http, second) == 0, "the second replica computed nothing"
    metrics = await scrape(http, second)
    assert metrics.value("mlserve_cache_requests_total", layer="redis", result="hit") == len(iris_rows)


async def load(http: aiohttp.ClientSession, server: ServerProc, rows: list[list[float]], seconds: float,
               ) -> list[tuple[float, Reply]]:
    """64 clients for ``seconds``: each answer with its latency."""
    stop = time.monotonic() + seconds
    answers: list[tuple[float, Reply]] = []
    headers = {"X-Request-Timeout-Ms": str(DEADLINE_MS)}

    async def client(index: int) -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            reply = await call(http, "POST", server.url("/predict"), json_body={"features": rows[index % len(rows)]},
                               headers=headers)
            answers.append((time.monotonic() - started, reply))
            index += 64

    await asyncio.gather(*(client(i) for i in range(64)))
    return answers


@pytest.mark.parametrize("failure", ["killed", "paused"])
async def test_failing_redis_costs_hits_never_answers(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, redis: RedisProc,
    iris_rows: list[list[float]], failure: str,
) -> None:
    """Redis killed (or paused with SIGSTOP: it accepts connections and never answers) under 64
    clients: every answer is a 200 within the deadline; once Redis is back, hits come back."""
    env = {**CACHE_ON, "MLSERVE_CACHE__REDIS_URL": redis.url, "MLSERVE_CACHE__L1_ENTRIES": "0"}
    server = start_server(demo_models_dir, env=env)
    assert redis.proc is not None
    if failure == "killed":
        redis.stop()
    else:
        redis.proc.send_signal(signal.SIGSTOP)
    try:
        answers = await load(http, server, iris_rows, 3.0)
    finally:
        if failure == "paused":
            redis.proc.send_signal(signal.SIGCONT)
    bad = [r for _, r in answers if r.status != 200]
    assert not bad, f"{len(bad)} of {len(answers)} failed, first: {bad[0].status} {bad[0].text}"
    slowest = max(latency for latency, _ in answers)
    assert slowest < DEADLINE_MS / 1000, f"a request took {slowest:.2f}s"
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_cache_breaker_open") == 1
    errors = metrics.value("mlserve_cache_requests_total", model=IRIS, version="v2", layer="redis", result="error")
    assert errors == len(answers), "every row Redis was not asked for, or failed to answer, counts as an error"
    if failure == "killed":
        redis.start()

    async def hits_again() -> bool:
        return x_cache(await predict(http, server, iris_rows[0])) == "hit"

    for _ in range(200):
        if await hits_again():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("hits did not come back once Redis did")
    assert "prediction cache stops asking Redis" in server.log()
