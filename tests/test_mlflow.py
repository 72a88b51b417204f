"""Models served from a real MLflow registry (sqlite store, local artifacts in a temp dir).

One registry is built per module (MLflow's first use costs its migrations): iris versions 1 and 2
(the demo repository's logistic regression and forest), a version 3 whose artifact is broken, and a
pyfunc-only model. Tests that move aliases or take the registry down work on a copy of its database,
so they never disturb each other.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.models import infer_signature
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from sklearn.datasets import load_iris

from mlserve.demo_models import IRIS, log_iris_to_mlflow
from mlserve.errors import RegistryUnavailable
from mlserve.sources.mlflow import MlflowSource
from redisproc import RedisProc
from serverproc import ServerProc, assert_error, assert_ok, call, poll, predict, predict_batch, scrape

ALIAS = "champion"
WATCH_S = 0.5
BROKEN = "3"
COLUMNS = list(load_iris().feature_names)


class BatchSize(mlflow.pyfunc.PythonModel):
    """Answers each row with the number of rows in its batch, so a test can see batches form."""

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> list[int]:
        assert list(model_input.dtypes.astype(str)) == ["float64", "int64"], model_input.dtypes
        return [len(model_input)] * len(model_input)


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "db" / "mlflow.db"

    def uri(self, db: Path | None = None) -> str:
        return f"sqlite:///{db or self.db}"

    def copy(self, where: Path) -> str:
        """A registry of the test's own: a copy of the database (the artifacts stay shared, read-only)."""
        where.mkdir(parents=True)
        shutil.copy(self.db, where / "mlflow.db")
        return self.uri(where / "mlflow.db")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    registry = Registry(tmp_path_factory.mktemp("mlflow"))
    registry.db.parent.mkdir()
    uri = registry.uri()
    assert log_iris_to_mlflow(uri, artifact_location=str(registry.root / "artifacts")) == ["1", "2"]
    frame = pd.DataFrame(load_iris().data, columns=COLUMNS)
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            load_model(uri, "1"), name="model", registered_model_name="iris",
            signature=infer_signature(frame), input_example=frame.iloc[:2],
        )
    client = MlflowClient(uri)
    artifact = Path(client.get_model_version_download_uri("iris", BROKEN)) / "model.skops"
    artifact.write_bytes(b"this is not a model")
    counted = pd.DataFrame({"x": [0.5, 1.5], "n": [1, 2]})
    with mlflow.start_run():
        mlflow.pyfunc.log_model(
            name="model", python_model=BatchSize(), registered_model_name="counter",
            signature=infer_signature(counted), input_example=counted,
        )
    return registry


def load_model(uri: str, version: str) -> Any:
    mlflow.set_tracking_uri(uri)
    return mlflow.sklearn.load_model(f"models:/iris/{version}")


@pytest.fixture(scope="module")
def offline(registry: Registry) -> dict[str, list[int]]:
    frame = pd.DataFrame(load_iris().data, columns=COLUMNS)
    return {version: load_model(registry.uri(), version).predict(frame).tolist() for version in ("1", "2")}


def settings(tracking_uri: str, cache: Path, source: str = f"models:/iris@{ALIAS}", **extra: Any) -> str:
    lines = [
        f'mlflow_tracking_uri = "{tracking_uri}"',
        f'mlflow_cache_dir = "{cache}"',
        f"watch_interval_s = {WATCH_S}",
        *(f"{key} = {value}" for key, value in extra.items()),
        "[models.iris]",
        f'source = "{source}"',
    ]
    return "\n".join(lines) + "\n"


def take_down(directory: Path) -> None:
    """Make the registry in ``directory`` unreachable: a file where its directory was (MLflow would
    create a fresh, empty registry in a missing directory)."""
    directory.rename(directory.with_name("away"))
    directory.write_text("the registry is down")


def bring_back(directory: Path) -> None:
    directory.unlink()
    directory.with_name("away").rename(directory)


NULL_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"}
"""Each registry call opens the database anew, so a test can take the registry away under a running server."""


@pytest.fixture
def empty_repository(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


StartServer = Callable[..., ServerProc]


async def models_entry(http: aiohttp.ClientSession, server: ServerProc, name: str = "iris") -> dict[str, Any]:
    body = assert_ok(await call(http, "GET", server.url("/models")))
    return next(model for model in body["models"] if model["name"] == name)


async def answers(http: aiohttp.ClientSession, server: ServerProc, model: str = "iris") -> tuple[list[int], set[str]]:
    body = assert_ok(await predict_batch(http, server, load_iris().data.tolist(), model=model))
    return body["predictions"], {body["model_version"]}


async def test_serves_the_alias_with_answers_equal_to_offline_and_registry_details(
    registry: Registry, offline: dict[str, list[int]], start_server: StartServer, empty_repository: Path,
    tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    server = start_server(empty_repository, config=settings(registry.uri(), tmp_path / "cache"), workers=1)
    predictions, versions = await answers(http, server)
    assert versions == {"1"} and predictions == offline["1"]
    one = assert_ok(await predict(http, server, load_iris().data[100].tolist()))
    assert (one["model"], one["model_version"], one["prediction"]) == ("iris", "1", offline["1"][100])

    entry = await models_entry(http, server)
    assert entry["active_version"] == "1"
    assert entry["source"] == {**entry["source"], "uri": f"models:/iris@{ALIAS}", "watched": True, "version": "1"}
    assert "error" not in entry["source"]
    (version,) = entry["versions"]
    details = version["mlflow"]
    assert (version["state"], version["framework"], details["flavor"]) == ("ready", "mlflow", "sklearn")
    assert details["registered_name"] == "iris" and details["version"] == "1" and ALIAS in details["aliases"]
    assert details["run_id"] and details["created_at"].startswith("20")
    assert [column["name"] for column in details["signature"]] == COLUMNS
    assert 0.8 < details["metrics"]["accuracy"] == version["accuracy"]
    assert Path(version["path"]).is_relative_to(tmp_path / "cache")

    wrong = await predict(http, server, [1.0, 2.0, 3.0])
    assert_error(wrong, 422, path="$.features")

    # MLflow's own scoring client, unchanged: columns are matched to the signature by name.
    scoring = ScoringServerClient("127.0.0.1", server.port)
    frame = pd.DataFrame(load_iris().data, columns=COLUMNS)
    response = await asyncio.to_thread(scoring.invoke, frame[COLUMNS[::-1]])
    assert response["predictions"] == offline["1"]
    with pytest.raises(Exception, match="error code 422.*INVALID_PARAMETER_VALUE"):
        await asyncio.to_thread(scoring.invoke, frame[COLUMNS[:3]])


async def alias_move_under_load(
    http: aiohttp.ClientSession, server: ServerProc, move: Callable[[], None], clients: int = 64
) -> tuple[list[tuple[float, float, int, str | None]], float]:
    """Hammer ``/predict`` from ``clients`` clients, call ``move`` once they run, and go on until every
    client has seen version 2 answer. Returns each reply (sent, answered, status, version) and when
    ``move`` ran."""
    replies: list[tuple[float, float, int, str | None]] = []
    moved_at = 0.0
    done = asyncio.Event()
    row = load_iris().data[120].tolist()

    async def client() -> None:
        seen_new = 0
        while not done.is_set() or seen_new < 5:
            sent = time.monotonic()
            reply = await predict(http, server, row)
            version = reply.body.get("model_version") if reply.status == 200 else reply.text
            replies.append((sent, time.monotonic(), reply.status, version))
            seen_new += version == "2"
            if reply.status != 200 or time.monotonic() - moved_at > 60 and moved_at:
                done.set()
                return

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(1.0)
    moved_at = time.monotonic()
    await asyncio.to_thread(move)
    await poll(lambda: _any_new(replies), timeout_s=60, what="version 2 to answer")
    done.set()
    await asyncio.gather(*tasks)
    return replies, moved_at


async def _any_new(replies: list[tuple[float, float, int, str | None]]) -> bool:
    return any(version == "2" for *_, version in replies)


async def test_moving_the_alias_under_64_clients_switches_every_answer_without_an_error(
    registry: Registry, start_server: StartServer, empty_repository: Path, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    uri = registry.copy(tmp_path / "registry")
    server = start_server(empty_repository, config=settings(uri, tmp_path / "cache"), env=NULL_POOL)
    replies, moved_at = await alias_move_under_load(
        http, server, lambda: MlflowClient(uri).set_registered_model_alias("iris", ALIAS, "2")
    )
    statuses = {status for _, _, status, _ in replies}
    assert statuses == {200}, [reply for reply in replies if reply[2] != 200][:5]
    assert {version for *_, version in replies} == {"1", "2"}
    first_new = min(answered for _, answered, _, version in replies if version == "2") - moved_at
    last_old = max(answered for _, answered, _, version in replies if version == "1") - moved_at
    late_old = [sent - moved_at for sent, _, _, version in replies if version == "1" and sent > moved_at + last_old]
    assert not late_old
    print(f"\nalias move: {len(replies)} answers, first from version 2 at {first_new:.2f}s, "
          f"last from version 1 at {last_old:.2f}s after the move")
    assert last_old < WATCH_S + 30, "version 1 answered long after the move"

    entry = await models_entry(http, server)
    assert entry["active_version"] == "2"
    assert [version["version"] for version in entry["versions"]] == ["2"], "version 1 was not unloaded"
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_model_source_checks_total", model="iris", result="switched") == 1
    assert metrics.value("mlserve_activations_total", model="iris") == 1
    assert "activated iris:2 (was 1), models:/iris@champion moved" in server.log()


async def test_a_broken_new_version_leaves_the_old_one_serving_and_says_why(
    registry: Registry, offline: dict[str, list[int]], start_server: StartServer, empty_repository: Path,
    tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    uri = registry.copy(tmp_path / "registry")
    server = start_server(
        empty_repository, config=settings(uri, tmp_path / "cache"), env=NULL_POOL, workers=1, expect_traceback=True
    )
    client = MlflowClient(uri)
    client.set_registered_model_alias("iris", ALIAS, BROKEN)

    async def failed() -> bool:
        return "error" in (await models_entry(http, server))["source"]

    await poll(failed, timeout_s=60, what="the broken version to fail")
    entry = await models_entry(http, server)
    assert entry["active_version"] == "1"
    assert f"version {BROKEN}:" in entry["source"]["error"]
    states = {version["version"]: (version["state"], version["error"]) for version in entry["versions"]}
    assert states["1"] == ("ready", None)
    assert states[BROKEN][0] == "failed" and states[BROKEN][1]
    predictions, versions = await answers(http, server)
    assert versions == {"1"} and predictions == offline["1"]
    metrics = await scrape(http, server)
    assert metrics.value("mlserve_model_source_checks_total", model="iris", result="failed") == 1
    assert metrics.value("mlserve_model_info", model="iris", version=BROKEN, state="failed", active="false") == 1
    await asyncio.sleep(WATCH_S * 4)
    assert metrics.value("mlserve_model_source_checks_total", model="iris", result="failed") == 1, "retried"

    client.set_registered_model_alias("iris", ALIAS, "2")  # the next move is tried

    async def switched() -> bool:
        entry = await models_entry(http, server)
        # The other versions are drained, unloaded and forgotten just after the switch, not with it.
        return entry["active_version"] == "2" and [version["version"] for version in entry["versions"]] == ["2"]

    await poll(switched, timeout_s=60, what="the switch to version 2 and the old versions to go")
    entry = await models_entry(http, server)
    assert "error" not in entry["source"]
    predictions, _ = await answers(http, server)
    assert predictions == offline["2"]


async def test_registry_down_at_start_serves_the_cached_version_and_down_during_the_watch_keeps_serving(
    registry: Registry, offline: dict[str, list[int]], start_server: StartServer, empty_repository: Path,
    tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    uri = registry.copy(tmp_path / "registry")
    config = settings(uri, tmp_path / "cache")
    start_server(empty_repository, config=config, env=NULL_POOL, workers=1).stop()
    take_down(tmp_path / "registry")

    server = start_server(empty_repository, config=config, env=NULL_POOL, workers=1)
    predictions, versions = await answers(http, server)
    assert versions == {"1"} and predictions == offline["1"]
    assert "serving iris:1 from the cache until the registry answers" in server.log()
    assert "cannot resolve models:/iris@champion" in (await models_entry(http, server))["source"]["error"]

    bring_back(tmp_path / "registry")
    MlflowClient(uri).set_registered_model_alias("iris", ALIAS, "2")

    async def switched() -> bool:
        return (await models_entry(http, server))["active_version"] == "2"

    await poll(switched, timeout_s=60, what="the switch once the registry answers again")

    take_down(tmp_path / "registry")

    async def unreachable() -> bool:
        metrics = await scrape(http, server)
        return metrics.value("mlserve_model_source_checks_total", model="iris", result="unreachable") >= 3

    await poll(unreachable, timeout_s=60, what="the watch to find the registry gone")
    predictions, versions = await answers(http, server)
    assert versions == {"2"} and predictions == offline["2"]
    assert_ok(await call(http, "GET", server.url("/health/ready")))


async def test_registry_down_with_nothing_cached_fails_that_model_only(
    registry: Registry, demo_models_dir: Path, start_server: StartServer, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    (tmp_path / "down").write_text("the registry is down")
    gone = registry.uri(tmp_path / "down" / "mlflow.db")
    server = start_server(demo_models_dir, config=settings(gone, tmp_path / "cache"), env=NULL_POOL, workers=1)
    entry = await models_entry(http, server)
    assert entry["versions"] == [] and entry["active_version"] is None
    assert "cannot resolve models:/iris@champion" in entry["source"]["error"]
    assert_ok(await predict(http, server, [5.1, 3.5, 1.4, 0.2], model=IRIS))
    refused = assert_error(await predict(http, server, [5.1, 3.5, 1.4, 0.2], model="iris"), 503, retry=False)
    assert refused.startswith("model 'iris' is unavailable: cannot resolve models:/iris@champion")
    assert_ok(await call(http, "GET", server.url("/health/ready")))
    assert "iris is unavailable" in server.log()


async def test_a_pyfunc_only_model_serves_batches_and_has_its_signature_checked(
    registry: Registry, start_server: StartServer, empty_repository: Path, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    config = settings(registry.uri(), tmp_path / "cache", source="models:/counter/1").replace("models.iris", "models.counter")
    server = start_server(empty_repository, config=config, workers=1)
    entry = await models_entry(http, server, "counter")
    assert entry["versions"][0]["mlflow"]["flavor"] == "python_function"
    assert entry["source"]["watched"] is False

    replies = await asyncio.gather(*(predict(http, server, [0.5, 3]) for _ in range(64)))
    sizes = [assert_ok(reply)["prediction"] for reply in replies]
    assert max(sizes) > 1, f"every call ran alone: {sizes}"
    body = assert_ok(await predict_batch(http, server, [[0.5, 1], [1.5, 2], [2.5, 3]]))
    assert body["predictions"] == [3, 3, 3]

    assert_error(await predict(http, server, [0.5, 1.5]), 422, path="$.features[1]")
    assert_error(await predict_batch(http, server, [[0.5, 1], [0.5, 2.25]]), 422, path="$.samples[1][1]")


async def test_serve_model_flag_serves_a_pinned_version_and_a_local_model_directory(
    registry: Registry, offline: dict[str, list[int]], start_server: StartServer, empty_repository: Path,
    tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    local = tmp_path / "local-iris"
    mlflow.sklearn.save_model(
        load_model(registry.uri(), "1"), local, signature=infer_signature(pd.DataFrame(load_iris().data, columns=COLUMNS))
    )
    env = {"MLFLOW_TRACKING_URI": registry.uri(), "MLSERVE_MLFLOW_CACHE_DIR": str(tmp_path / "cache")}
    server = start_server(empty_repository, args=["--model", "models:/iris/2", "--model", str(local)], env=env, workers=1)
    predictions, versions = await answers(http, server)
    assert versions == {"2"} and predictions == offline["2"]
    predictions, versions = await answers(http, server, "local-iris")
    assert versions == {"1"} and predictions == offline["1"]
    entry = await models_entry(http, server, "local-iris")
    assert entry["versions"][0]["path"] == str(local)
    assert len(list((tmp_path / "cache").rglob("MLmodel"))) == 1, "only the registry's version is downloaded"


async def test_with_redis_one_replicas_switch_is_the_fleets(
    registry: Registry, start_server: StartServer, empty_repository: Path, tmp_path: Path,
    http: aiohttp.ClientSession, redis: RedisProc,
) -> None:
    """The second replica never looks at the registry after start (its watch interval is ten
    minutes): it switches because the first one recorded its switch in the shared state."""
    uri = registry.copy(tmp_path / "registry")
    env = {**NULL_POOL, "MLSERVE_REDIS_URL": redis.url}
    watching = start_server(empty_repository, config=settings(uri, tmp_path / "cache-1"), env=env, workers=1)
    config = settings(uri, tmp_path / "cache-2").replace(f"watch_interval_s = {WATCH_S}", "watch_interval_s = 600")
    following = start_server(empty_repository, config=config, env=env, workers=1)
    for server in (watching, following):
        assert (await answers(http, server))[1] == {"1"}
    MlflowClient(uri).set_registered_model_alias("iris", ALIAS, "2")

    async def fleet_on_2() -> bool:
        return all([(await answers(http, server))[1] == {"2"} for server in (watching, following)])

    await poll(fleet_on_2, timeout_s=60, what="both replicas to serve version 2")
    assert "activated iris:2 (was 1), as another replica did" in following.log()


async def test_a_stage_source_resolves_to_the_version_in_that_stage(registry: Registry, tmp_path: Path) -> None:
    """The seed's ``models:/NAME/Production`` form, as long as MLflow still has stages."""
    uri = registry.copy(tmp_path / "registry")
    source = MlflowSource("iris", "models:/iris/Production", uri, str(tmp_path / "cache"))
    with pytest.raises(RegistryUnavailable, match="no version of iris is in stage Production"):
        await source.resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        MlflowClient(uri).transition_model_version_stage("iris", "2", "Production")
    assert await source.resolve() == "2"
    spec = await source.fetch("2")
    assert spec.mlflow is not None and spec.mlflow.version == "2" and spec.metadata.input_shape == [4]
    assert source.status.version == "2" and source.ref.watched
