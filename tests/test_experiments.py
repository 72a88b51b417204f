"""Traffic experiments end to end: sticky splits across replicas and restarts, bad documents, shadows.

Real servers, real workers, a real ``redis-server`` where replicas share state. A user's variant is
read from what clients see: the ``X-Variant`` header and the ``variant`` field of the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mlserve.demo_models import IRIS
from redisproc import RedisProc
from serverproc import Reply, ServerProc, assert_error, assert_ok, call, poll, predict, scrape
from testmodels import RaisingModel, ScaledModel, SlowModel, write_model

StartServer = Callable[..., ServerProc]
ROW = [5.1, 3.5, 1.4, 0.2]
CLIENTS = 32
EXPERIMENT = f"/models/{IRIS}/experiment"


async def put_experiment(http: aiohttp.ClientSession, server: ServerProc, document: Any, **headers: str) -> Reply:
    return await call(http, "PUT", server.url(EXPERIMENT), json_body=document, headers=headers)


async def variants_of(
    http: aiohttp.ClientSession, server: ServerProc, users: Sequence[str], how: str = "header"
) -> dict[str, str]:
    """Each user's variant, asking as the seed's clients do: by header, query parameter or body field."""
    limit = asyncio.Semaphore(CLIENTS)

    async def ask(user: str) -> tuple[str, str]:
        async with limit:
            if how == "header":
                reply = await call(http, "POST", server.url("/predict"), json_body={"features": ROW},
                                   headers={"X-User-ID": user})
            elif how == "query":
                reply = await call(http, "POST", server.url(f"/predict/ab?user_id={user}"), json_body={"features": ROW})
            else:
                reply = await predict(http, server, ROW, user_id=user)
            body = assert_ok(reply)
            assert body["variant"] == body["model_version"] == reply.headers["X-Variant"], reply
            return user, body["variant"]

    return dict(await asyncio.gather(*(ask(user) for user in users)))


def share(assigned: dict[str, str], version: str) -> float:
    return sum(v == version for v in assigned.values()) / len(assigned)


async def test_split_is_sticky_across_replicas_and_restarts_and_reweighting_moves_few(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, redis: RedisProc
) -> None:
    env = {"MLSERVE_REDIS_URL": redis.url}
    first, second, third = (start_server(demo_models_dir, env=env) for _ in range(3))
    split = {"variants": {"v1": 0.8, "v2": 0.2}, "salt": "spring"}
    assert assert_ok(await put_experiment(http, first, split))["variants"] == split["variants"]

    async def third_follows() -> bool:
        return (await call(http, "GET", third.url(EXPERIMENT))).status == 200

    await poll(third_follows, timeout_s=1.0, what="the third replica to start the experiment", interval_s=0.01)

    users = [f"user-{n}" for n in range(10_000)]
    assigned = await variants_of(http, first, users)
    assert abs(share(assigned, "v2") - 0.2) < 0.02, share(assigned, "v2")
    shown = assert_ok(await call(http, "GET", first.url(EXPERIMENT)))
    assert shown["assigned"] == {"v1": 10_000 - len([v for v in assigned.values() if v == "v2"]),
                                 "v2": len([v for v in assigned.values() if v == "v2"])}
    metrics = await scrape(http, first)
    assert metrics.value("mlserve_variant_request_duration_seconds_count", model=IRIS, variant="v2") == (
        shown["assigned"]["v2"]
    )

    sample = users[:2000]
    expected = {user: assigned[user] for user in sample}
    assert await variants_of(http, second, sample, how="query") == expected, "another replica, by ?user_id="
    assert await variants_of(http, third, sample, how="body") == expected, "a third replica, by the body's user_id"
    first.stop()
    first.start()
    assert await variants_of(http, first, sample) == expected, "the same replica after a restart"

    reweighted = {"variants": {"v1": 0.7, "v2": 0.3}, "salt": "spring"}
    assert_ok(await put_experiment(http, second, reweighted))

    async def first_follows() -> bool:
        body = assert_ok(await call(http, "GET", first.url(EXPERIMENT)))
        return bool(body["variants"] == reweighted["variants"])

    await poll(first_follows, timeout_s=1.0, what="the first replica to take the new weights", interval_s=0.01)
    after = await variants_of(http, first, users)
    moved = {(assigned[user], after[user]) for user in users if assigned[user] != after[user]}
    moved_share = sum(assigned[user] != after[user] for user in users) / len(users)
    assert moved == {("v1", "v2")}, "only users that v2's larger share needs move, and only to v2"
    assert abs(moved_share - 0.1) < 0.015, moved_share


async def test_bad_experiments_are_refused_with_a_path_and_change_nothing(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path
) -> None:
    token = "experiment-token"
    server = start_server(
        demo_models_dir,
        config=f'[models.{IRIS}]\npreload = "active"\n',
        env={"MLSERVE_ADMIN_TOKEN": token},
    )
    auth = {"Authorization": f"Bearer {token}"}
    assert_error(await call(http, "GET", server.url(EXPERIMENT)), 404)
    assert_error(await put_experiment(http, server, {"variants": {"v2": 1.0}}), 401)
    assert_error(await call(http, "DELETE", server.url(EXPERIMENT), headers=auth), 404)
    assert_ok(await call(http, "POST", server.url(f"/models/{IRIS}/versions/v1/load"), headers=auth))
    running = {"variants": {"v1": 0.5, "v2": 0.5}, "salt": "", "shadow": None}
    assert_ok(await put_experiment(http, server, running, **auth))

    bad: list[tuple[Any, str]] = [
        ({"variants": {"v1": 0.8, "v2": 0.19}}, "$.variants"),
        ({"variants": {"v1": 1.2, "v2": -0.2}}, "$.variants.v2"),
        ({"variants": {"v1": 0.5, "v9": 0.5}}, "$.variants.v9"),
        ({"variants": {"v1": 0.5, "v2": 0.5}, "sticky": True}, "$.sticky"),
        ({"variants": {"v1": "half", "v2": 0.5}}, "$.variants[...]"),
        ({"shadow": {"version": "v2", "fraction": 1.5}}, "$.shadow.fraction"),
        ({}, "$"),
    ]
    for document, path in bad:
        assert_error(await put_experiment(http, server, document, **auth), 422, path=path)
    malformed = await call(http, "PUT", server.url(EXPERIMENT), data=b'{"variants": ', headers=auth)
    assert_error(malformed, 400)
    shown = assert_ok(await call(http, "GET", server.url(EXPERIMENT)))
    assert {key: shown[key] for key in running} == running, "the running experiment is unchanged"

    refused = await call(http, "POST", server.url(f"/models/{IRIS}/versions/v1/unload"), headers=auth)
    assert "experiment" in assert_error(refused, 409), "a version in a running experiment stays loaded"
    assert_ok(await call(http, "DELETE", server.url(EXPERIMENT), headers=auth))
    assert_ok(await call(http, "POST", server.url(f"/models/{IRIS}/versions/v1/unload"), headers=auth))
    unloaded = await put_experiment(http, server, {"variants": {"v1": 0.5, "v2": 0.5}}, **auth)
    assert "load it first" in assert_error(unloaded, 422, path="$.variants.v1")
    assert "variant" not in assert_ok(await predict(http, server, ROW)), "no experiment, no variant"


async def test_explicit_version_wins_and_no_user_key_splits_at_random(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    server = start_server(demo_models_dir)
    assert_ok(await put_experiment(http, server, {"variants": {"v1": 0.5, "v2": 0.5}}))
    pinned = assert_ok(await predict(http, server, ROW, model_version="v1", user_id="someone"))
    assert pinned["model_version"] == "v1" and "variant" not in pinned
    anonymous = await asyncio.gather(*(predict(http, server, ROW) for _ in range(100)))
    seen = [assert_ok(reply)["variant"] for reply in anonymous]
    assert 20 < seen.count("v1") < 80, "without a user key, each call is drawn by weight"
    batch = assert_ok(await call(http, "POST", server.url("/predict/batch"), json_body={"samples": [ROW, ROW]},
                                 headers={"X-User-ID": "someone"}))
    assert batch["variant"] == batch["model_version"], "/predict/batch follows the experiment"
    too_long = await call(http, "POST", server.url("/predict"), json_body={"features": ROW},
                          headers={"X-User-ID": "u" * 300})
    assert_error(too_long, 422, path="X-User-ID")

    users = [f"user-{n}" for n in range(200)]
    before = await variants_of(http, server, users)
    server.stop()
    server.start()
    assert assert_ok(await call(http, "GET", server.url(EXPERIMENT)))["variants"] == {"v1": 0.5, "v2": 0.5}
    assert await variants_of(http, server, users) == before, "the state file keeps the experiment over a restart"


# -- shadow traffic ------------------------------------------------------------------------------------


@pytest.fixture
def shadow_models(tmp_path: Path) -> Path:
    """``m``: v1 answers 2*x, v2 raises on every real input, v3 answers after 1 s, v4 answers 3*x."""
    models = tmp_path / "models"
    write_model(models, "m", "v1", SlowModel(0.0))
    write_model(models, "m", "v2", RaisingModel())
    write_model(models, "m", "v3", SlowModel(1.0))
    write_model(models, "m", "v4", ScaledModel(3.0))
    return models


async def shadow_round(http: aiohttp.ClientSession, server: ServerProc, version: str, calls: int) -> list[float]:
    """Shadow ``version`` on every call, make ``calls`` calls four at a time; each call's latency."""
    document = {"shadow": {"version": version, "fraction": 1.0}}
    assert_ok(await call(http, "PUT", server.url("/models/m/experiment"), json_body=document))
    limit = asyncio.Semaphore(4)

    async def one(n: int) -> float:
        async with limit:
            started = time.perf_counter()
            body = assert_ok(await predict(http, server, [float(n), 0, 0, 0], model="m"))
            assert body["model_version"] == "v1" and body["prediction"] == 2.0 * n, body
            return time.perf_counter() - started

    return list(await asyncio.gather(*(one(n) for n in range(1, calls + 1))))


async def shadow_results(http: aiohttp.ClientSession, server: ServerProc, shadow: str) -> dict[str, float]:
    metrics = await scrape(http, server)
    return {
        result: metrics.value("mlserve_shadow_total", model="m", primary="v1", shadow=shadow, result=result)
        for result in ("agree", "disagree", "error", "dropped")
    }


async def test_shadow_never_delays_changes_or_fails_the_answer(
    http: aiohttp.ClientSession, start_server: StartServer, shadow_models: Path, tmp_path: Path
) -> None:
    server = start_server(shadow_models, config='[models.m]\nactive_version = "v1"\n')

    await shadow_round(http, server, "v2", 40)

    async def settled(shadow: str, calls: int) -> bool:
        return sum((await shadow_results(http, server, shadow)).values()) == calls

    await poll(lambda: settled("v2", 40), timeout_s=10, what="every copy to the broken shadow to end")
    broken = await shadow_results(http, server, "v2")
    assert broken["error"] > 0 and broken["agree"] == broken["disagree"] == 0, broken

    # One copy runs (1 s), 64 wait in the shadow's short queue, the rest are dropped: no copy waits
    # in a queue that clients' calls use.
    latencies = await shadow_round(http, server, "v3", 100)
    assert max(latencies) < 0.5, f"a shadow that takes 1 s held up an answer: {max(latencies):.2f}s"
    await poll(lambda: settled("v3", 100), timeout_s=30, what="every copy to the slow shadow to end")
    slow = await shadow_results(http, server, "v3")
    assert slow["agree"] >= 1 and slow["dropped"] >= 1, f"it answers when it can, else drops: {slow}"

    await shadow_round(http, server, "v4", 40)
    await poll(lambda: settled("v4", 40), timeout_s=10, what="every copy to the disagreeing shadow to end")
    differing = await shadow_results(http, server, "v4")
    assert differing["disagree"] > 0 and differing["agree"] == differing["error"] == 0, differing
    shown = assert_ok(await call(http, "GET", server.url("/models/m/experiment")))
    assert shown["shadow_results"]["disagree"] == differing["disagree"]
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_shadow_duration_seconds_count", model="m", version="v4") == (
        differing["disagree"]
    ), "the shadow's latency is recorded for every answer it gave"


async def test_shadow_copies_stop_while_the_front_end_is_busy_and_resume_when_it_is_not(
    http: aiohttp.ClientSession, start_server: StartServer, shadow_models: Path
) -> None:
    # Slots to spare and no overlap wait: the primary's batcher is never what drops a copy here, so
    # only the event loop's load can.
    server = start_server(shadow_models, config=(
        'shadow_max_loop_busy = 0.5\n[models.m]\nactive_version = "v1"\n'
        "[models.m.batching]\nmax_inflight = 64\noverlap_after_ms = 0\n"
    ))
    document = {"shadow": {"version": "v4", "fraction": 1.0}}
    assert_ok(await call(http, "PUT", server.url("/models/m/experiment"), json_body=document))
    body = b'{"model": "m", "features": [1.0, 0, 0, 0]}'
    busy: list[float] = []
    stop = time.monotonic() + 3.0

    async def client() -> int:
        calls = 0
        while time.monotonic() < stop:
            async with http.post(server.url("/predict"), data=body) as reply:
                assert reply.status == 200, await reply.text()
                await reply.read()
            calls += 1
        return calls

    async def gauge() -> None:
        while time.monotonic() < stop - 0.5:
            await asyncio.sleep(0.5)
            busy.append((await scrape(http, server)).value("mlserve_event_loop_busy_ratio"))

    calls = sum((await asyncio.gather(gauge(), *(client() for _ in range(CLIENTS))))[1:])

    async def settled(total: int) -> bool:
        return sum((await shadow_results(http, server, "v4")).values()) == total

    await poll(lambda: settled(calls), timeout_s=10, what="every copy made under load to end")
    loaded = await shadow_results(http, server, "v4")
    assert max(busy) > 0.5, f"{CLIENTS} clients kept the event loop busy: {busy}"
    assert loaded["dropped"] >= 0.8 * calls, f"copies under load are dropped first: {loaded} of {calls} calls"

    await asyncio.sleep(0.3)  # a window of quiet
    for n in range(20):
        await predict(http, server, [float(n), 0, 0, 0], model="m")
        await asyncio.sleep(0.05)
    await poll(lambda: settled(calls + 20), timeout_s=10, what="every copy made at light load to end")
    light = await shadow_results(http, server, "v4")
    assert light["disagree"] - loaded["disagree"] >= 18, f"copies go again once the loop has room: {light}"
