"""Many clients at once: every caller gets its own row's answer, and batches form under load.

64 clients share one aiohttp session and each request carries a different iris row, so any mix-up
of rows between batch-mates shows as a wrong prediction against the offline model.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from mlserve.demo_models import IRIS
from serverproc import IRIS_VERSIONS, Metrics, ServerProc, assert_ok, call, predict, scrape

CLIENTS = 64

Job = tuple[str, int]
"""(version, iris row index)."""


def every_row(versions: tuple[str, ...], rows: int, seed: int = 3) -> list[Job]:
    """Each row once for each version, shuffled so that batches mix versions and rows."""
    jobs = [(version, index) for version in versions for index in range(rows)]
    random.Random(seed).shuffle(jobs)
    return jobs


async def run_clients(
    http: aiohttp.ClientSession, server: ServerProc, rows: list[list[float]], jobs: list[Job]
) -> list[dict[str, Any]]:
    """``CLIENTS`` concurrent clients work through ``jobs``, one ``/predict`` each; answers by job."""
    answers: list[dict[str, Any]] = [{} for _ in jobs]
    pending = iter(range(len(jobs)))

    async def client() -> None:
        for job in pending:
            version, index = jobs[job]
            answers[job] = assert_ok(await predict(http, server, rows[index], model=IRIS, model_version=version))

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return answers


def check_answers(jobs: list[Job], answers: list[dict[str, Any]], offline: dict[str, list[int]]) -> None:
    wrong = [
        (version, index, answer)
        for (version, index), answer in zip(jobs, answers, strict=True)
        if (answer["model_version"], answer["prediction"]) != (version, offline[version][index])
    ]
    assert not wrong, f"{len(wrong)} of {len(jobs)} answers are wrong, e.g. {wrong[:3]}"


def batch_growth(before: Metrics, after: Metrics, version: str, series: str) -> float:
    labels = {"model": IRIS, "version": version}
    return after.value(f"mlserve_batch_size_{series}", **labels) - before.value(
        f"mlserve_batch_size_{series}", **labels
    )


async def test_64_clients_each_get_their_own_answer(
    http: aiohttp.ClientSession, iris: ServerProc, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    """300 requests (every row, both versions, mixed) from 64 clients: each equals the offline answer."""
    jobs = every_row(IRIS_VERSIONS, len(iris_rows))
    check_answers(jobs, await run_clients(http, iris, iris_rows, jobs), offline)


async def test_batches_grow_under_load(
    http: aiohttp.ClientSession, iris: ServerProc, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    """With 64 clients on v2 (two workers), requests pile up behind busy workers and share batches."""
    jobs = every_row(("v2",), len(iris_rows)) * 2
    before = await scrape(http, iris)
    answers = await run_clients(http, iris, iris_rows, jobs)
    after = await scrape(http, iris)
    check_answers(jobs, answers, offline)
    rows, batches = batch_growth(before, after, "v2", "sum"), batch_growth(before, after, "v2", "count")
    assert rows == len(jobs), "every request's row is counted in exactly one batch"
    assert batches < rows, f"{len(jobs)} concurrent requests ran as {batches:.0f} batches: no batching"


async def test_batching_off_still_answers_correctly(
    http: aiohttp.ClientSession,
    start_server: Callable[..., ServerProc],
    demo_models_dir: Path,
    iris_rows: list[list[float]],
    offline: dict[str, list[int]],
) -> None:
    """``MLSERVE_BATCHING__MAX_BATCH_SIZE=1`` overrides model.toml: one row a batch, answers still right."""
    server = start_server(demo_models_dir, env={"MLSERVE_BATCHING__MAX_BATCH_SIZE": "1"})
    listing = assert_ok(await call(http, "GET", server.url(f"/models/{IRIS}/versions")))
    assert {v["version"]: v["batching"]["max_batch_size"] for v in listing["versions"]} == {"v1": 1, "v2": 1}
    jobs = every_row(IRIS_VERSIONS, len(iris_rows))
    before = await scrape(http, server)
    answers = await run_clients(http, server, iris_rows, jobs)
    after = await scrape(http, server)
    check_answers(jobs, answers, offline)
    for version in IRIS_VERSIONS:
        sent = sum(1 for v, _ in jobs if v == version)
        assert batch_growth(before, after, version, "count") == sent, "one batch a request"
        assert batch_growth(before, after, version, "sum") == sent, "one row a batch"
        ones = after.value("mlserve_batch_size_bucket", model=IRIS, version=version, le="1.0")
        assert ones == after.value("mlserve_batch_size_count", model=IRIS, version=version), "a batch over one row"
