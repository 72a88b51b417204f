"""The inline executor: a model's batches computed in the front end, with the same answers, and
without the worker pool in the way."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp

from mlserve.demo_models import IRIS
from serverproc import ServerProc, assert_error, assert_ok, call, predict_batch, scrape
from testmodels import RaisingModel, write_model

StartServer = Callable[..., ServerProc]
INLINE = {"MLSERVE_BATCHING__EXECUTOR": "inline"}


async def test_inline_versions_answer_as_offline_even_with_every_worker_dead(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, offline: dict[str, list[int]],
    iris_rows: list[list[float]],
) -> None:
    server = start_server(demo_models_dir, env=INLINE)
    listing = assert_ok(await call(http, "GET", server.url(f"/models/{IRIS}/versions")))
    assert {v["batching"]["executor"] for v in listing["versions"]} == {"inline"}
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    for version in ("v1", "v2"):
        replies = await asyncio.gather(*(
            predict_batch(http, server, iris_rows[i:i + 10], model_version=version) for i in range(0, 150, 10)
        ))
        assert [p for r in replies for p in assert_ok(r)["predictions"]] == offline[version]
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_inference_duration_seconds_count", model=IRIS, version="v1") >= 1


async def test_an_inline_model_that_fails_fails_its_batch_not_the_front_end(
    http: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    write_model(models, "flaky", "v1", RaisingModel())
    server = start_server(models, env=INLINE)
    message = assert_error(await call(http, "POST", server.url("/predict"), json_body={"features": [1.0, 2, 3, 4]}), 500)
    assert "this model is broken" in message
    assert (await call(http, "GET", server.url("/health/ready"))).status == 200


async def test_auto_runs_the_cheap_version_inline_and_the_dear_one_on_the_workers(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, offline: dict[str, list[int]],
    iris_rows: list[list[float]],
) -> None:
    server = start_server(demo_models_dir, env={"MLSERVE_BATCHING__EXECUTOR": "auto"})
    listing = assert_ok(await call(http, "GET", server.url(f"/models/{IRIS}/versions")))
    assert {v["version"]: v["batching"]["executor"] for v in listing["versions"]} == {"v1": "inline", "v2": "pool"}
    assert re.search(r"iris_classifier:v1 runs inline: a warm batch of 64 rows took \d+ us \(inline below 200 us\)",
                     server.log()), "the log says what was measured"
    for version in ("v1", "v2"):
        assert assert_ok(await predict_batch(http, server, iris_rows, model_version=version))["predictions"] == (
            offline[version]
        )
