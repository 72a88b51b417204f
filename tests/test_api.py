"""The HTTP API as a client uses it: predictions equal the models' own, listings, health, metrics.

The reference for every prediction is the scikit-learn model loaded straight from its artifact, so a
server that mixes up rows, versions or labels cannot pass.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from mlserve.demo_models import IRIS
from serverproc import IRIS_VERSIONS, Reply, ServerProc, assert_error, assert_ok, call, predict, predict_batch, scrape

CLASS_NAMES = ["setosa", "versicolor", "virginica"]


async def predict_each(
    http: aiohttp.ClientSession, server: ServerProc, rows: list[list[float]], **fields: Any
) -> list[dict[str, Any]]:
    """``POST /predict`` once a row, in order; every answer must be a 200."""
    return [assert_ok(await predict(http, server, row, **fields)) for row in rows]


def check_prediction_fields(body: dict[str, Any], version: str) -> None:
    """The seed's shape: a numeric class index, plus its name from the version's ``class_labels``."""
    assert set(body) == {"prediction", "label", "model", "model_version", "inference_time_ms"}, body
    assert type(body["prediction"]) is int and body["label"] == CLASS_NAMES[body["prediction"]], body
    assert body["model"] == IRIS and body["model_version"] == version, body
    assert isinstance(body["inference_time_ms"], float) and body["inference_time_ms"] > 0, body


def check_batch_fields(body: dict[str, Any], version: str, rows: int) -> None:
    assert set(body) == {"predictions", "labels", "total", "model", "model_version", "inference_time_ms"}, body
    assert body["labels"] == [CLASS_NAMES[p] for p in body["predictions"]], body
    assert body["model"] == IRIS and body["model_version"] == version, body
    assert body["total"] == rows == len(body["predictions"]), body
    assert isinstance(body["inference_time_ms"], float) and body["inference_time_ms"] > 0, body


@pytest.mark.parametrize("version", IRIS_VERSIONS)
async def test_predict_matches_offline_model(
    http: aiohttp.ClientSession,
    iris: ServerProc,
    iris_rows: list[list[float]],
    offline: dict[str, list[int]],
    version: str,
) -> None:
    """Every iris row sent alone to a named version gets exactly what that model predicts offline."""
    answers = await predict_each(http, iris, iris_rows, model=IRIS, model_version=version)
    for answer in answers:
        check_prediction_fields(answer, version)
    assert [a["prediction"] for a in answers] == offline[version]


@pytest.mark.parametrize("version", IRIS_VERSIONS)
async def test_predict_batch_matches_offline_model(
    http: aiohttp.ClientSession,
    iris: ServerProc,
    iris_rows: list[list[float]],
    offline: dict[str, list[int]],
    version: str,
) -> None:
    """All 150 rows in one batch request come back as the offline predictions, in order."""
    body = assert_ok(await predict_batch(http, iris, iris_rows, model=IRIS, model_version=version))
    check_batch_fields(body, version, len(iris_rows))
    assert body["predictions"] == offline[version]


@pytest.mark.parametrize("fields", [{}, {"model": IRIS}], ids=["model-omitted", "model-named"])
async def test_default_version_is_the_highest(
    http: aiohttp.ClientSession,
    iris: ServerProc,
    iris_rows: list[list[float]],
    offline: dict[str, list[int]],
    fields: dict[str, str],
) -> None:
    """Without ``model_version`` v2 answers; with one model served, ``model`` may be left out too."""
    assert offline["v1"] != offline["v2"], "the two versions must disagree somewhere for this test to mean anything"
    answers = await predict_each(http, iris, iris_rows, **fields)
    assert {a["model_version"] for a in answers} == {"v2"}
    assert [a["prediction"] for a in answers] == offline["v2"]
    batch = assert_ok(await predict_batch(http, iris, iris_rows, **fields))
    check_batch_fields(batch, "v2", len(iris_rows))
    assert batch["predictions"] == offline["v2"]


async def test_large_batch_is_split_into_micro_batches_and_reassembled_in_order(
    http: aiohttp.ClientSession, iris: ServerProc, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    """150 shuffled rows against v1 (max_batch_size 64) run as 64 + 64 + 22 and come back in order."""
    order = np.random.default_rng(7).permutation(len(iris_rows))
    labels = {"model": IRIS, "version": "v1"}
    before = await scrape(http, iris)
    body = assert_ok(await predict_batch(http, iris, [iris_rows[i] for i in order], model=IRIS, model_version="v1"))
    after = await scrape(http, iris)
    check_batch_fields(body, "v1", len(order))
    assert body["predictions"] == [offline["v1"][i] for i in order]

    def grew(name: str, **extra: str) -> float:
        return after.value(name, **labels, **extra) - before.value(name, **labels, **extra)

    assert grew("mlserve_batch_size_count") == 3, "150 rows at 64 a batch are three batches"
    assert grew("mlserve_batch_size_sum") == 150
    assert grew("mlserve_batch_size_bucket", le="64.0") == 3, "no batch may exceed max_batch_size"


async def test_models_listing(http: aiohttp.ClientSession, iris: ServerProc, demo_models_dir: Path) -> None:
    """``GET /models`` lists the demo model, both versions ready, their metadata, and v2 active."""
    body = assert_ok(await call(http, "GET", iris.url("/models")))
    assert [m["name"] for m in body["models"]] == [IRIS]
    check_model_info(body["models"][0], demo_models_dir, active="v2")


async def test_model_versions(http: aiohttp.ClientSession, iris: ServerProc, demo_models_dir: Path) -> None:
    """``GET /models/iris_classifier/versions`` describes the one model the same way."""
    body = assert_ok(await call(http, "GET", iris.url(f"/models/{IRIS}/versions")))
    check_model_info(body, demo_models_dir, active="v2")


def check_model_info(model: dict[str, Any], models_dir: Path, active: str) -> None:
    """Versions in order, ready, with the accuracy and labels their ``model.toml`` declares."""
    assert model["name"] == IRIS and model["active_version"] == active, model
    assert [v["version"] for v in model["versions"]] == list(IRIS_VERSIONS), model
    for info in model["versions"]:
        declared = tomllib.loads((models_dir / IRIS / info["version"] / "model.toml").read_text())
        assert info["state"] == "ready", info
        assert info["active"] == (info["version"] == active), info
        assert info["framework"] == "sklearn" and info["input_shape"] == [4], info
        assert info["class_labels"] == CLASS_NAMES, info
        assert isinstance(info["accuracy"], float) and 0.8 < info["accuracy"] <= 1.0, info
        assert info["accuracy"] == declared["accuracy"], info


async def test_health(http: aiohttp.ClientSession, iris: ServerProc) -> None:
    """Liveness and readiness both answer 200 once the demo models are loaded."""
    live = assert_ok(await call(http, "GET", iris.url("/health/live")))
    assert live["status"] == "alive"
    ready = assert_ok(await call(http, "GET", iris.url("/health/ready")))
    assert ready["status"] == "ready"
    assert ready["models"] == {f"{IRIS}:v1": "ready", f"{IRIS}:v2": "ready"}


async def test_metrics_count_requests_with_their_labels(
    http: aiohttp.ClientSession, iris: ServerProc, iris_rows: list[list[float]]
) -> None:
    """A prediction and an error each show in the counters with model, version, endpoint and status."""
    before = await scrape(http, iris)
    assert_ok(await predict(http, iris, iris_rows[0], model_version="v1"))
    assert_ok(await predict_batch(http, iris, iris_rows[:3], model_version="v2"))
    assert_error(await predict(http, iris, iris_rows[0], model_version="v9"), 404)
    reply: Reply = await call(http, "GET", iris.url("/metrics"))
    assert reply.status == 200 and reply.content_type == "text/plain", reply.headers
    after = await scrape(http, iris)

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    v1, v2 = {"model": IRIS, "version": "v1"}, {"model": IRIS, "version": "v2"}
    assert grew("mlserve_requests_total", **v1, endpoint="predict", status="200") == 1
    assert grew("mlserve_requests_total", **v2, endpoint="predict_batch", status="200") == 1
    assert grew("mlserve_requests_total", endpoint="predict", status="404") == 1
    assert grew("mlserve_request_duration_seconds_count", **v1, endpoint="predict") == 1
    assert grew("mlserve_queue_duration_seconds_count", **v1) == 1
    assert grew("mlserve_inference_duration_seconds_count", **v2) == 1
    assert grew("mlserve_inference_duration_seconds_sum", **v2) > 0
    assert grew("mlserve_batch_size_sum", **v2) == 3
    assert {"model", "version"} <= set(after.labelsets("mlserve_queue_depth")[0])
    assert after.value("mlserve_queue_depth", **v1) == 0 and after.value("mlserve_queue_depth", **v2) == 0
    assert after.value("mlserve_workers_live") == 2


async def test_active_version_from_config_answers_by_default(
    http: aiohttp.ClientSession,
    start_server: Callable[..., ServerProc],
    demo_models_dir: Path,
    iris_rows: list[list[float]],
    offline: dict[str, list[int]],
) -> None:
    """``[models.NAME] active_version`` makes v1 the default, and per-model batching knobs apply."""
    config = f'[models.{IRIS}]\nactive_version = "v1"\n[models.{IRIS}.batching]\nmax_batch_size = 16\n'
    server = start_server(demo_models_dir, config=config)
    listing = assert_ok(await call(http, "GET", server.url(f"/models/{IRIS}/versions")))
    assert listing["active_version"] == "v1"
    assert {v["version"]: v["batching"]["max_batch_size"] for v in listing["versions"]} == {"v1": 16, "v2": 16}
    single = assert_ok(await predict(http, server, iris_rows[0]))
    assert single["model_version"] == "v1"
    before = await scrape(http, server)
    batch = assert_ok(await predict_batch(http, server, iris_rows))
    check_batch_fields(batch, "v1", len(iris_rows))
    assert batch["predictions"] == offline["v1"]
    after = await scrape(http, server)
    batches = after.value("mlserve_batch_size_count", model=IRIS, version="v1") - before.value(
        "mlserve_batch_size_count", model=IRIS, version="v1"
    )
    assert batches == 10, "150 rows at 16 a batch are ten batches"
