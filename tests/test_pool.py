"""The worker pool with real spawned processes: correct results, and recovery from dead workers."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import joblib
import numpy as np
import pytest
import testmodels
from sklearn.datasets import load_iris

from mlserve import repository
from mlserve.demo_models import train_iris
from mlserve.errors import PredictionFailed, WorkerUnavailable
from mlserve.pool import WorkerPool
from mlserve.repository import ModelSpec


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    models = tmp_path_factory.mktemp("models")
    train_iris(models)
    testmodels.write_model(models, "slow", "v1", testmodels.SlowModel(1.0))
    testmodels.write_model(models, "crashing", "v1", testmodels.CrashingModel(0.0))
    broken = models / "broken" / "v1"
    testmodels.write_model(models, "broken", "v1", testmodels.SlowModel(0.0))
    (broken / "model.joblib").write_bytes(b"this is not a pickle")
    return {spec.key: spec for spec in repository.scan(models)}


@pytest.fixture
async def pool(specs: dict[str, ModelSpec]) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(size=2)
    await pool.start()
    for key in ("iris_classifier:v1", "iris_classifier:v2", "crashing:v1"):
        await pool.load(specs[key], warmup_rows=[1, 4])
    await pool.load(specs["slow:v1"], warmup_rows=[])
    try:
        yield pool
    finally:
        await pool.close()


async def wait_for_workers(pool: WorkerPool, count: int, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while pool.live_workers < count:
        assert asyncio.get_running_loop().time() < deadline, "the dead worker was not replaced"
        await asyncio.sleep(0.1)


async def test_predictions_equal_the_offline_model(pool: WorkerPool, specs: dict[str, ModelSpec]) -> None:
    iris = load_iris().data
    for key in ("iris_classifier:v1", "iris_classifier:v2"):
        offline = joblib.load(specs[key].artifact_path).predict(iris)
        served, compute_s = await pool.predict(key, iris)
        assert list(served) == list(offline)
        assert compute_s > 0


async def test_replies_split_over_reads_or_sharing_one_reach_their_callers(pool: WorkerPool) -> None:
    """A reply far larger than one socket read, and many small replies arriving together, each go
    whole to their own caller."""
    big = np.arange(400_000, dtype=np.float64).reshape(-1, 4)  # an 800 KB reply
    calls = [pool.predict("crashing:v1", big)]
    calls += [pool.predict("crashing:v1", np.full((1, 4), float(i))) for i in range(50)]
    results = await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert np.array_equal(results[0][0], big[:, 0] * 2)
    assert [list(out) for out, _ in results[1:]] == [[2.0 * i] for i in range(50)]


async def test_batches_spread_over_workers(pool: WorkerPool) -> None:
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(*(pool.predict("slow:v1", np.full((1, 4), float(i))) for i in range(2)))
    # Two one-second batches on two workers finish together, not one after the other.
    assert asyncio.get_running_loop().time() - started < 1.9
    assert [list(out) for out, _ in results] == [[0.0], [2.0]]


async def test_killed_worker_is_replaced_and_its_batch_retried(pool: WorkerPool) -> None:
    pids_before = set(pool.worker_pids())
    in_flight = asyncio.ensure_future(pool.predict("slow:v1", np.full((1, 4), 21.0)))
    await asyncio.sleep(0.3)
    busy = [w for w in pool._live if w.pending]
    assert len(busy) == 1
    os.kill(busy[0].pid, signal.SIGKILL)
    outputs, _ = await asyncio.wait_for(in_flight, 30)
    assert list(outputs) == [42.0]
    await wait_for_workers(pool, 2)
    assert pool.restart_count == 1
    assert set(pool.worker_pids()) != pids_before
    # The replacement holds every model: load both workers at once.
    answers = await asyncio.gather(*(pool.predict("iris_classifier:v1", load_iris().data[:3]) for _ in range(4)))
    assert all(list(out) == [0] * 3 for out, _ in answers), "setosa is class 0"


async def test_a_batch_that_kills_every_worker_fails_with_unavailable(pool: WorkerPool) -> None:
    poison = np.full((1, 4), testmodels.CRASH_VALUE)
    with pytest.raises(WorkerUnavailable):
        await asyncio.wait_for(pool.predict("crashing:v1", poison), 30)
    await wait_for_workers(pool, 2)
    outputs, _ = await pool.predict("crashing:v1", np.full((1, 4), 1.5))
    assert list(outputs) == [3.0]


async def test_model_error_fails_the_batch_but_not_the_worker(pool: WorkerPool) -> None:
    with pytest.raises(PredictionFailed, match="features"):
        await pool.predict("iris_classifier:v1", np.zeros((2, 3)))
    assert pool.live_workers == 2
    assert pool.restart_count == 0


async def test_load_failure_is_reported_and_workers_survive(pool: WorkerPool, specs: dict[str, ModelSpec]) -> None:
    with pytest.raises(PredictionFailed, match="loading broken:v1 failed"):
        await pool.load(specs["broken:v1"], warmup_rows=[1])
    assert pool.live_workers == 2
    outputs, _ = await pool.predict("iris_classifier:v2", load_iris().data[:1])
    assert list(outputs) == [0], "setosa is class 0"
    with pytest.raises(WorkerUnavailable):
        await pool.predict("broken:v1", np.zeros((1, 4)))


async def test_close_stops_every_worker(specs: dict[str, ModelSpec], tmp_path: Path) -> None:
    pool = WorkerPool(size=2)
    await pool.start()
    processes = [w.process for w in pool._live]
    await pool.close()
    assert all(not p.is_alive() for p in processes)
    assert all(p.exitcode == 0 for p in processes)
