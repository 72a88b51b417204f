"""The loopback cluster of ``make cluster``: Redis, three replicas and HAProxy, acting as one server.

One cluster for the module (starting three replicas is the slow part). Each test leaves the cluster
as it found it: v2 active, no experiment, Redis up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from mlserve.demo_models import IRIS
from serverproc import free_port, poll

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy" / "cluster"))
from cluster import LoopbackCluster  # noqa: E402

REPLICAS = 3
CLIENTS = 64
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def cluster(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    if shutil.which("haproxy", path="/usr/sbin:/usr/bin") is None:
        pytest.fail("haproxy is not installed; .ci/run installs it (apt-get install haproxy)")
    running = LoopbackCluster(
        tmp_path_factory.mktemp("cluster"), demo_models_dir, port=free_port(),
        replica_ports=[free_port() for _ in range(REPLICAS)], redis_port=free_port(),
    )
    running.up()
    yield running
    running.down()


async def predict(http: aiohttp.ClientSession, base: str, row: list[float], **headers: str) -> aiohttp.ClientResponse:
    async with http.post(f"{base}/predict", json={"features": row}, headers=headers) as reply:
        await reply.read()
        return reply


async def version_at(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}) as reply:
        body = await reply.json()
        assert reply.status == 200, body
        return str(body["model_version"])


async def activate(http: aiohttp.ClientSession, base: str, version: str) -> None:
    async with http.post(f"{base}/models/{IRIS}/versions/{version}/activate") as reply:
        assert reply.status == 200, await reply.text()


async def test_activation_through_one_replica_reaches_all_three_within_a_second(
    http: aiohttp.ClientSession, cluster: LoopbackCluster
) -> None:
    replicas = [cluster.replica_url(i) for i in range(REPLICAS)]
    assert {await version_at(http, base) for base in replicas} == {"v2"}
    try:
        started = time.monotonic()
        await activate(http, replicas[0], "v1")

        async def all_serve_v1() -> bool:
            return {await version_at(http, base) for base in replicas} == {"v1"}

        await poll(all_serve_v1, timeout_s=1.0, what="every replica to serve v1", interval_s=0.01)
        print(f"activation reached all {REPLICAS} replicas in {time.monotonic() - started:.3f}s")
        assert await version_at(http, cluster.url) == "v1"
    finally:
        await activate(http, replicas[1], "v2")


async def test_a_prediction_cached_through_one_replica_is_a_hit_through_the_others(
    http: aiohttp.ClientSession, cluster: LoopbackCluster
) -> None:
    row = [6.1, 2.8, 4.7, time.time() % 1]  # a row no other test sends
    first = await predict(http, cluster.replica_url(0), row)
    assert first.headers["X-Cache"] == "miss"
    for index in (1, 2):
        base = cluster.replica_url(index)

        async def hit(base: str = base) -> bool:
            return (await predict(http, base, row)).headers["X-Cache"] == "hit"

        await poll(hit, timeout_s=2.0, what=f"replica {index} to answer from the shared cache", interval_s=0.02)


async def test_an_experiment_set_through_one_replica_assigns_each_user_the_same_variant_everywhere(
    http: aiohttp.ClientSession, cluster: LoopbackCluster
) -> None:
    document = {"variants": {"v1": 0.5, "v2": 0.5}, "salt": "cluster"}
    async with http.put(f"{cluster.replica_url(0)}/models/{IRIS}/experiment", json=document) as reply:
        assert reply.status == 200, await reply.text()
    try:
        async def running_everywhere() -> bool:
            for index in range(REPLICAS):
                async with http.get(f"{cluster.replica_url(index)}/models/{IRIS}/experiment") as reply:
                    if reply.status != 200:
                        return False
            return True

        await poll(running_everywhere, timeout_s=2.0, what="every replica to run the experiment")
        for user in (f"user-{n}" for n in range(40)):
            seen = {
                (await predict(http, cluster.replica_url(index), [5.0, 3.0, 1.5, 0.2], **{"X-User-ID": user}))
                .headers["X-Variant"]
                for index in range(REPLICAS)
            }
            assert len(seen) == 1, f"{user} got {seen} from the three replicas"
    finally:
        async with http.delete(f"{cluster.replica_url(2)}/models/{IRIS}/experiment") as reply:
            assert reply.status in (200, 204), await reply.text()


@contextlib.asynccontextmanager
async def under_load(http: aiohttp.ClientSession, base: str) -> AsyncIterator[collections.Counter[str]]:
    """64 clients calling ``base`` from half a second before the block until its end; what they got,
    by status or error, counted once the block is over."""
    outcomes: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    async def client(n: int) -> None:
        while not done.is_set():
            try:
                reply = await predict(http, base, [4.3 + n % 30 / 10, 3.0, 1.4, 0.2])
                outcomes[str(reply.status)] += 1
            except aiohttp.ClientError as exc:
                outcomes[type(exc).__name__] += 1

    clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
    await asyncio.sleep(0.5)
    try:
        yield outcomes
    finally:
        done.set()
        await asyncio.gather(*clients)


async def test_rolling_restart_under_load_through_haproxy_fails_no_request(
    http: aiohttp.ClientSession, cluster: LoopbackCluster
) -> None:
    async with under_load(http, cluster.url) as outcomes:
        for index in range(REPLICAS):
            await asyncio.to_thread(cluster.restart_replica, index)
            await asyncio.sleep(1.0)  # HAProxy's checks see it up again (rise 2)
    print(f"rolling restart under {CLIENTS} clients: {dict(outcomes)}")
    assert outcomes["200"] > 0 and set(outcomes) == {"200"}, f"requests failed during the restart: {dict(outcomes)}"


async def test_redis_killed_under_load_every_replica_answers_and_back_it_resyncs(
    http: aiohttp.ClientSession, cluster: LoopbackCluster
) -> None:
    async with under_load(http, cluster.url) as outcomes:
        cluster.stop_redis()
        await asyncio.sleep(1.5)
        for index in range(REPLICAS):
            assert (await predict(http, cluster.replica_url(index), [5.5, 2.5, 4.0, 1.3])).status == 200
    assert set(outcomes) == {"200"}, f"a dead Redis failed requests: {dict(outcomes)}"

    cluster.start_redis()
    replicas = [cluster.replica_url(i) for i in range(REPLICAS)]

    async def change_reaches_all() -> bool:
        async with http.post(f"{replicas[0]}/models/{IRIS}/versions/v1/activate") as reply:
            if reply.status != 200:
                return False  # Redis not reconnected yet: changes are refused, not lost
        await asyncio.sleep(0.5)
        return {await version_at(http, base) for base in replicas} == {"v1"}

    try:
        await poll(change_reaches_all, timeout_s=20.0, what="an activation to reach every replica with Redis back")
    finally:
        await activate(http, replicas[1], "v2")
    row = [7.0, 3.2, 4.7, time.time() % 1]
    assert (await predict(http, replicas[0], row)).headers["X-Cache"] == "miss"

    async def shared_hit() -> bool:
        return (await predict(http, replicas[2], row)).headers["X-Cache"] == "hit"

    await poll(shared_hit, timeout_s=5.0, what="the shared cache to answer again")


async def test_prometheus_scrapes_a_series_per_replica(
    http: aiohttp.ClientSession, cluster: LoopbackCluster, tmp_path: Path
) -> None:
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed; .ci/run installs it (apt-get install prometheus)")
    for index in range(REPLICAS):
        await predict(http, cluster.replica_url(index), [5.1, 3.5, 1.4, 0.2])
    targets = ", ".join(f"'127.0.0.1:{port}'" for port in cluster.replica_ports)
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mlserve\n"
                      f"    static_configs:\n      - targets: [{targets}]\n")
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        query = f"http://127.0.0.1:{port}/api/v1/query?query=sum%20by%20(instance)(mlserve_requests_total)"

        async def a_series_per_replica() -> bool:
            try:
                async with http.get(query) as reply:
                    body = await reply.json()
            except aiohttp.ClientError:
                return False
            instances = {series["metric"]["instance"] for series in body.get("data", {}).get("result", [])}
            return instances == {f"127.0.0.1:{p}" for p in cluster.replica_ports}

        await poll(a_series_per_replica, timeout_s=30.0, what="PromQL to return a series per replica")
    finally:
        process.terminate()
        process.wait(10)
