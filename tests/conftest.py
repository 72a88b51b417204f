"""Shared fixtures: the demo models, their offline predictions, one server on them, an HTTP client.

The demo models are trained once a session. ``iris_server`` serves them for the whole session; tests
that need other settings or the models of ``testmodels.py`` start their own with ``start_server``.
A failing test gets the logs of the servers it used attached to its report.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import pytest
from sklearn.datasets import load_iris

from mlserve.demo_models import IRIS, train_iris
from redisproc import RedisProc, redis_server
from serverproc import IRIS_VERSIONS, ServerProc, WaitFor, serve, watched

CLIENT_TIMEOUT_S = 60.0
"""Generous, but below pytest's own timeout, so a hung request fails as a hung request."""

_STARTED_BEFORE = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository, trained once: iris_classifier v1 (logistic regression), v2 (forest)."""
    models = tmp_path_factory.mktemp("demo") / "models"
    train_iris(models)
    return models


@pytest.fixture(scope="session")
def demo_and_digits_dir(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo iris versions (so ``offline`` holds their predictions) and the digits CNN, trained once."""
    from mlserve.demo_models import train_digits

    models = tmp_path_factory.mktemp("demo-and-digits") / "models"
    shutil.copytree(demo_models_dir, models)
    train_digits(models)
    return models


@pytest.fixture(scope="session")
def iris_rows() -> list[list[float]]:
    """Every row of the iris data, as a client would send it."""
    return [[float(x) for x in row] for row in load_iris().data]


@pytest.fixture(scope="session")
def offline(demo_models_dir: Path, iris_rows: list[list[float]]) -> dict[str, list[int]]:
    """What each version predicts (a class index) for every iris row, loaded straight from its artifact."""
    return {
        version: joblib.load(demo_models_dir / IRIS / version / "model.joblib").predict(iris_rows).tolist()
        for version in IRIS_VERSIONS
    }


@pytest.fixture(scope="session")
def iris_server(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with serve(demo_models_dir, tmp_path_factory.mktemp("iris-server")) as server:
        yield server


@pytest.fixture
def iris(iris_server: ServerProc) -> Iterator[ServerProc]:
    """The shared demo server; a traceback it logs during a test fails that test."""
    with watched(iris_server) as server:
        yield server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    """Start servers of the test's own (``serverproc.ServerProc`` arguments); stopped and checked after."""
    servers: list[ServerProc] = []

    def start(models_dir: Path, *, wait: WaitFor = "ready", **options: Any) -> ServerProc:
        server = ServerProc(models_dir, tmp_path / f"server-{len(servers)}", **options)
        servers.append(server)
        server.start(wait)
        return server

    yield start
    failures = []
    for server in servers:
        try:
            server.stop()
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session; its connection pool is large enough for 64 concurrent clients."""
    connector = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    ) as session:
        yield session


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED_BEFORE] = len(ServerProc.started)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the log of every server still running or started during the test."""
    report = yield
    if not report.failed:
        return report
    started_before = item.stash.get(_STARTED_BEFORE, len(ServerProc.started))
    for index, server in enumerate(ServerProc.started):
        if server.running() or index >= started_before:
            report.sections.append((f"mlserve log (port {server.port}, {server.log_path})", server.log()))
    return report


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProc]:
    """A fresh ``redis-server`` of this test's own on a free port."""
    with redis_server(tmp_path / "redis") as server:
        yield server
