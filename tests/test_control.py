"""The control plane end to end: activate, load, unload and rescan while a real server serves.

Every test starts its own server (they change its state) on a repository of its own where it edits
the repository, and checks what a client and an operator see: answers, versions, states, metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from mlserve import repository
from mlserve.demo_models import IRIS
from serverproc import Reply, ServerProc, assert_error, assert_ok, call, poll, predict, scrape
from testmodels import SlowModel, write_model

CLIENTS = 64
StartServer = Callable[..., ServerProc]


async def admin(http: aiohttp.ClientSession, server: ServerProc, action: str, version: str, model: str = IRIS) -> Reply:
    return await call(http, "POST", server.url(f"/models/{model}/versions/{version}/{action}"))


async def versions(http: aiohttp.ClientSession, server: ServerProc, model: str = IRIS) -> dict[str, Any]:
    return assert_ok(await call(http, "GET", server.url(f"/models/{model}/versions")))


def states(listing: dict[str, Any]) -> dict[str, str]:
    return {v["version"]: v["state"] for v in listing["versions"]}


def copy_versions(source: Path, target: Path, *wanted: str, model: str = IRIS) -> Path:
    """A repository of the test's own holding ``wanted`` versions of the demo model."""
    for version in wanted:
        shutil.copytree(source / model / version, target / model / version)
    return target


def publish_corrupt(models: Path, version: str) -> None:
    """``version`` of the iris model with valid metadata and an artifact that is not a pickle."""
    spec = next(s for s in repository.scan(models) if s.name == IRIS)
    metadata = msgspec.structs.replace(spec.metadata, version=version)
    repository.write_version(models, metadata, {metadata.artifact: b"this is not a joblib file"})


@dataclass(frozen=True)
class Answered:
    started: float
    ended: float
    row: int
    reply: Reply


async def test_switching_versions_under_load_fails_no_request(
    http: aiohttp.ClientSession,
    start_server: StartServer,
    demo_models_dir: Path,
    iris_rows: list[list[float]],
    offline: dict[str, list[int]],
) -> None:
    """64 clients call /predict without a version while v2 (not yet loaded), v1 and v2 are activated.

    Every answer is a 200 computed by the version it names; once an activate call has returned,
    every request that starts later (and ends before the next activation is asked for) is answered
    by the new version.
    """
    config = f'[models.{IRIS}]\nactive_version = "v1"\npreload = "active"\n'
    server = start_server(demo_models_dir, config=config)
    assert states(await versions(http, server)) == {"v1": "ready", "v2": "unloaded"}
    loop = asyncio.get_running_loop()
    answered: list[Answered] = []
    stop = asyncio.Event()

    async def client(first: int) -> None:
        row = first
        while not stop.is_set():
            started = loop.time()
            reply = await predict(http, server, iris_rows[row])
            answered.append(Answered(started, loop.time(), row, reply))
            row = (row + CLIENTS) % len(iris_rows)

    clients = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    switches: list[tuple[float, float, str]] = []
    try:
        await asyncio.sleep(0.5)
        for version in ("v2", "v1", "v2"):
            asked = loop.time()
            body = assert_ok(await admin(http, server, "activate", version))
            switches.append((asked, loop.time(), version))
            assert body["model"] == IRIS and body["active_version"] == version, body
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    failed = [a.reply for a in answered if a.reply.status != 200]
    assert not failed, f"{len(failed)} of {len(answered)} requests failed, first: {failed[0].status} {failed[0].text}"
    for a in answered:
        version = a.reply.body["model_version"]
        assert a.reply.body["prediction"] == offline[version][a.row], f"row {a.row} not computed by {version}"
    before = [a for a in answered if a.ended < switches[0][0]]
    assert before and {a.reply.body["model_version"] for a in before} == {"v1"}
    for index, (_, returned, version) in enumerate(switches):
        next_asked = switches[index + 1][0] if index + 1 < len(switches) else math.inf
        after = [a for a in answered if a.started > returned and a.ended < next_asked]
        assert len(after) >= 50, f"too few requests after switching to {version} for the test to mean anything"
        wrong = [a for a in after if a.reply.body["model_version"] != version]
        assert not wrong, f"{len(wrong)} requests started after {version} was activated were answered by another"
    assert states(await versions(http, server)) == {"v1": "ready", "v2": "ready"}
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_activations_total", model=IRIS) == 3
    assert metrics.value("mlserve_model_info", model=IRIS, version="v2", state="ready", active="true") == 1
    assert metrics.value("mlserve_model_info", model=IRIS, version="v1", state="ready", active="false") == 1
    assert metrics.value("mlserve_model_load_seconds", model=IRIS, version="v2") > 0
    assert metrics.labelsets("mlserve_model_warmup_seconds")


async def test_unload_drains_queued_and_running_requests_then_refuses(
    http: aiohttp.ClientSession, start_server: StartServer, tmp_path: Path
) -> None:
    """Six 1 s requests to v2 (two running, four queued) all finish although v2 is unloaded under
    them; a request that arrives while it drains, or after, gets a clear 503, and none hangs."""
    models = tmp_path / "models"
    write_model(models, "slow", "v1", SlowModel(0.0))
    write_model(models, "slow", "v2", SlowModel(1.0))
    server = start_server(models, config='[models.slow]\nactive_version = "v1"\n')
    calls = []
    for x in range(6):
        calls.append(asyncio.create_task(predict(http, server, [x, 0, 0, 0], model_version="v2")))
        if x < 2:  # one batch on each worker first, so the other four queue behind them

            async def dispatched(count: int = x + 1) -> bool:
                metrics = await scrape(http, server)
                return metrics.value("mlserve_batch_size_count", model="slow", version="v2") == count

            await poll(dispatched, timeout_s=10, what=f"batch {x + 1} to be dispatched")

    async def four_queued() -> bool:
        return (await scrape(http, server)).value("mlserve_queue_depth", model="slow", version="v2") == 4

    await poll(four_queued, timeout_s=10, what="four requests queued behind two running batches")
    unload = asyncio.create_task(admin(http, server, "unload", "v2", model="slow"))

    async def draining() -> bool:
        return states(await versions(http, server, "slow"))["v2"] == "draining"

    await poll(draining, timeout_s=5, what="v2 to drain")
    late = await predict(http, server, [7, 0, 0, 0], model_version="v2")
    assert "draining" in assert_error(late, 503, retry=False)
    for x, reply in enumerate(await asyncio.gather(*calls)):
        assert assert_ok(reply)["prediction"] == 2.0 * x, reply.text
    assert assert_ok(await unload) == {"model": "slow", "version": "v2", "state": "unloaded"}
    after = await predict(http, server, [7, 0, 0, 0], model_version="v2")
    assert "unloaded" in assert_error(after, 503, retry=False)
    assert assert_ok(await predict(http, server, [3, 0, 0, 0], model="slow"))["model_version"] == "v1"
    assert assert_ok(await admin(http, server, "load", "v2", model="slow"))["state"] == "ready"
    assert assert_ok(await predict(http, server, [4, 0, 0, 0], model_version="v2"))["prediction"] == 8.0


async def test_unloading_the_active_version_is_refused(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    server = start_server(demo_models_dir)
    assert "active version" in assert_error(await admin(http, server, "unload", "v2"), 409)
    assert assert_ok(await predict(http, server, [5.1, 3.5, 1.4, 0.2]))["model_version"] == "v2"
    assert_error(await admin(http, server, "activate", "v9"), 404)
    assert_error(await admin(http, server, "load", "v1", model="nope"), 404)
    assert_error(await call(http, "GET", server.url(f"/models/{IRIS}/versions/v1/activate")), 405)
    assert assert_ok(await admin(http, server, "unload", "v1"))["state"] == "unloaded"
    assert assert_ok(await admin(http, server, "unload", "v1"))["state"] == "unloaded", "unload is idempotent"


async def test_corrupt_version_fails_to_load_with_its_reason_and_the_active_one_serves(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path
) -> None:
    models = copy_versions(demo_models_dir, tmp_path / "models", "v1")
    publish_corrupt(models, "v3")
    server = start_server(models, config=f'[models.{IRIS}]\nactive_version = "v1"\npreload = "active"\n')
    for action in ("load", "activate"):
        message = assert_error(await admin(http, server, action, "v3"), 422)
        assert "loading iris_classifier:v3 failed" in message and "Error" in message, message
    listing = await versions(http, server)
    assert listing["active_version"] == "v1"
    v3 = next(v for v in listing["versions"] if v["version"] == "v3")
    assert v3["state"] == "failed" and "loading iris_classifier:v3 failed" in v3["error"], v3
    assert assert_ok(await predict(http, server, [5.1, 3.5, 1.4, 0.2]))["model_version"] == "v1"
    assert (await call(http, "GET", server.url("/health/ready"))).status == 200, "the active version still serves"
    assert_error(await predict(http, server, [5.1, 3.5, 1.4, 0.2], model_version="v3"), 503, retry=False)


async def test_rescan_picks_up_new_versions_and_forgets_removed_ones(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path
) -> None:
    models = copy_versions(demo_models_dir, tmp_path / "models", "v1")
    server = start_server(models)
    copy_versions(demo_models_dir, models, "v2")
    (models / "broken" / "v1").mkdir(parents=True)
    (models / "broken" / "v1" / "model.toml").write_text("name = [")
    report = assert_ok(await call(http, "POST", server.url("/models/rescan")))
    assert report == {
        "added": [{"model": IRIS, "version": "v2", "state": "ready"}],
        "removed": [],
        "missing_active": [],
    }, "the broken version is skipped (and logged), not fatal"
    listing = await versions(http, server)
    assert listing["active_version"] == "v1", "a new version does not become active by itself"
    assert assert_ok(await predict(http, server, [6, 3, 5, 2], model_version="v2"))["model_version"] == "v2"

    shutil.rmtree(models / IRIS / "v2")
    report = assert_ok(await call(http, "POST", server.url("/models/rescan")))
    assert report["removed"] == [{"model": IRIS, "version": "v2", "state": "unloaded"}], report
    assert_error(await predict(http, server, [6, 3, 5, 2], model_version="v2"), 404)

    shutil.rmtree(models / IRIS / "v1")
    report = assert_ok(await call(http, "POST", server.url("/models/rescan")))
    assert report["missing_active"] == [{"model": IRIS, "version": "v1", "state": "ready"}], report
    assert assert_ok(await predict(http, server, [6, 3, 5, 2]))["model_version"] == "v1", "it serves on from memory"


async def test_restart_keeps_the_activated_version(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state" / "mlserve.json"
    env = {"MLSERVE_STATE_PATH": str(state)}
    first = start_server(demo_models_dir, env=env)
    assert (await versions(http, first))["active_version"] == "v2", "the highest version, before any activation"
    assert assert_ok(await admin(http, first, "activate", "v1"))["previous_version"] == "v2"
    assert json.loads(state.read_text()) == {"active": {IRIS: "v1"}}
    first.stop()
    second = start_server(demo_models_dir, env=env)
    assert (await versions(http, second))["active_version"] == "v1"
    assert assert_ok(await predict(http, second, [5.1, 3.5, 1.4, 0.2]))["model_version"] == "v1"


@pytest.mark.parametrize("preload", ['"active"', '["v1"]'])
async def test_preload_chooses_what_loads_at_start(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, preload: str
) -> None:
    """Only the named versions (and always the active one) load; the others load on demand."""
    server = start_server(demo_models_dir, config=f"[models.{IRIS}]\npreload = {preload}\n")
    expected = {"v1": "unloaded", "v2": "ready"} if preload == '"active"' else {"v1": "ready", "v2": "ready"}
    assert states(await versions(http, server)) == expected
    ready = await call(http, "GET", server.url("/health/ready"))
    assert ready.status == 200, ready.text


async def test_rescan_serves_a_new_model_from_its_highest_version(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    write_model(models, "slow", "v1", SlowModel(0.0))
    server = start_server(models)
    copy_versions(demo_models_dir, models, "v1", "v2")
    report = assert_ok(await call(http, "POST", server.url("/models/rescan")))
    assert report["added"] == [
        {"model": IRIS, "version": "v1", "state": "ready"},
        {"model": IRIS, "version": "v2", "state": "ready"},
    ]
    assert (await versions(http, server))["active_version"] == "v2"
    reply = await predict(http, server, [5.1, 3.5, 1.4, 0.2], model=IRIS)
    assert assert_ok(reply)["model_version"] == "v2" and reply.body["label"] == "setosa"


async def test_saved_active_version_that_no_longer_loads_falls_back_to_one_that_does(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, tmp_path: Path
) -> None:
    """The state says v3, whose artifact is now corrupt: the replica serves v2 and says why."""
    models = copy_versions(demo_models_dir, tmp_path / "models", "v1", "v2")
    publish_corrupt(models, "v3")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"active": {IRIS: "v3"}}))
    config = f'[models.{IRIS}]\npreload = "active"\n'
    server = start_server(models, env={"MLSERVE_STATE_PATH": str(state)}, config=config)
    listing = await versions(http, server)
    assert listing["active_version"] == "v2" and states(listing) == {"v1": "unloaded", "v2": "ready", "v3": "failed"}
    assert assert_ok(await predict(http, server, [5.1, 3.5, 1.4, 0.2]))["model_version"] == "v2"
    assert "iris_classifier:v3 failed to load; serving iris_classifier:v2" in server.log()
    assert json.loads(state.read_text()) == {"active": {IRIS: "v3"}}, "the operator's choice is kept"


async def test_concurrent_admin_calls_never_leave_the_active_version_unserved(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    """Activations, loads and unloads of both versions fired at once: each is applied whole, under
    the model's lock, and the model always ends with a ready active version that answers."""
    server = start_server(demo_models_dir)
    actions = [("activate", "v1"), ("unload", "v2"), ("activate", "v2"), ("unload", "v1"), ("load", "v1"),
               ("activate", "v1"), ("unload", "v2"), ("load", "v2"), ("activate", "v2"), ("unload", "v1")] * 3
    replies = await asyncio.gather(*(admin(http, server, action, version) for action, version in actions))
    for (action, version), reply in zip(actions, replies):
        if reply.status == 409:
            assert action == "unload", f"{action} {version}: {reply.text}"
        else:
            assert_ok(reply)
    listing = await versions(http, server)
    active = listing["active_version"]
    assert states(listing)[active] == "ready", listing
    assert assert_ok(await predict(http, server, [5.1, 3.5, 1.4, 0.2]))["model_version"] == active
