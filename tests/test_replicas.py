"""Replicas that share one Redis act as one: an activation on any reaches all, and survives restarts.

Each test has its own ``redis-server`` on a free port; Redis is stopped mid-test to show that a dead
Redis costs the admin changes, never the predictions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp

from mlserve.demo_models import IRIS
from redisproc import RedisProc
from serverproc import ServerProc, assert_error, assert_ok, call, poll, predict

StartServer = Callable[..., ServerProc]
ROW = [5.1, 3.5, 1.4, 0.2]


async def activate(http: aiohttp.ClientSession, server: ServerProc, version: str) -> aiohttp.ClientResponse:
    return await call(http, "POST", server.url(f"/models/{IRIS}/versions/{version}/activate"))


async def answering(http: aiohttp.ClientSession, server: ServerProc) -> str:
    return assert_ok(await predict(http, server, ROW))["model_version"]


async def test_activation_on_one_replica_reaches_the_other_within_a_second(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, redis: RedisProc
) -> None:
    env = {"MLSERVE_REDIS_URL": redis.url}
    first, second = start_server(demo_models_dir, env=env), start_server(demo_models_dir, env=env)
    assert await answering(http, first) == await answering(http, second) == "v2"
    assert_ok(await activate(http, first, "v1"))

    async def second_serves_v1() -> bool:
        return await answering(http, second) == "v1"

    await poll(second_serves_v1, timeout_s=1.0, what="the other replica to serve v1", interval_s=0.01)
    assert "as another replica did" in second.log()

    third = start_server(demo_models_dir, env=env)
    assert await answering(http, third) == "v1", "a replica started later reads the shared state"
    assert not (Path(third.workdir) / "state.json").exists(), "with Redis, no state file is written"


async def test_dead_redis_refuses_changes_but_predictions_go_on(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, redis: RedisProc
) -> None:
    env = {"MLSERVE_REDIS_URL": redis.url, "MLSERVE_STATE_POLL_S": "0.5"}
    first, second = start_server(demo_models_dir, env=env), start_server(demo_models_dir, env=env)
    redis.stop()
    refused = await activate(http, first, "v1")
    assert "Redis is unavailable" in assert_error(refused, 503)
    answers = await asyncio.gather(*(predict(http, server, ROW) for server in (first, second) for _ in range(20)))
    assert {assert_ok(reply)["model_version"] for reply in answers} == {"v2"}, "nothing changed, nothing failed"

    redis.start()

    async def change_accepted() -> bool:
        return (await activate(http, first, "v1")).status == 200

    await poll(change_accepted, timeout_s=10, what="activation to work once Redis is back")

    async def second_serves_v1() -> bool:
        return await answering(http, second) == "v1"

    await poll(second_serves_v1, timeout_s=5, what="the other replica to follow once Redis is back")


async def test_replica_starts_and_serves_while_redis_is_down(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, redis: RedisProc
) -> None:
    redis.stop()
    server = start_server(demo_models_dir, env={"MLSERVE_REDIS_URL": redis.url, "MLSERVE_STATE_POLL_S": "0.5"})
    assert await answering(http, server) == "v2", "the configured active version, since Redis cannot be read"
    assert "Redis is unavailable" in server.log()
