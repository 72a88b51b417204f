"""``mlserve serve --model DIR``: a bare model directory, laid out as KServe's storage initializer lays
out ``/mnt/models`` (one model file, no ``model.toml`` needed), served with its framework read from
its files.

The reference for every answer is the model itself, loaded or run here. A directory that cannot be
served must stop ``mlserve serve`` before it listens: exit status 2 and one clear line, no traceback.
"""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import numpy as np
import pytest
import torch

from mlserve.demo_models import IRIS
from serverproc import ServerProc, assert_ok, call, free_port, mlserve_command, mlserve_env, predict, predict_batch

StartServer = Callable[..., ServerProc]
EXIT_TIMEOUT_S = 120.0
"""Generous for two slow cores; a server that wrongly starts listening is killed here, failing the test."""


@pytest.fixture
def empty_repository(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.fixture(scope="module")
def torch_module() -> torch.nn.Module:
    """A small fixed network of four features to three scores (its weights are seeded)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def torchscript(torch_module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, yet it is what users bring
        torch.jit.save(torch.jit.trace(torch_module, torch.zeros(1, 4)), buffer)
    return buffer.getvalue()


def model_directory(parent: Path, name: str, files: dict[str, bytes]) -> Path:
    directory = parent / name
    directory.mkdir(parents=True)
    for file_name, content in files.items():
        (directory / file_name).write_bytes(content)
    return directory


async def infer_v2(
    http: aiohttp.ClientSession, server: ServerProc, model: str, rows: list[list[float]]
) -> list[Any]:
    """The Open Inference Protocol's answer, its flat data put back in the shape the answer gives."""
    tensor = {"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64", "data": rows}
    reply = await call(http, "POST", server.url(f"/v2/models/{model}/infer"), json_body={"inputs": [tensor]})
    output = assert_ok(reply)["outputs"][0]
    return np.reshape(output["data"], output["shape"]).tolist()


@pytest.mark.parametrize("artifact", ["model.joblib", "model.pkl"])
async def test_a_scikit_learn_file_answers_as_the_estimator_does(
    artifact: str, demo_models_dir: Path, iris_rows: list[list[float]], offline: dict[str, list[int]],
    start_server: StartServer, empty_repository: Path, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    directory = tmp_path / "mnt-models"
    directory.mkdir()
    fitted = demo_models_dir / IRIS / "v1" / "model.joblib"
    if artifact == "model.joblib":
        shutil.copy(fitted, directory / artifact)
    else:
        (directory / artifact).write_bytes(pickle.dumps(joblib.load(fitted)))
    server = start_server(empty_repository, args=["--model", str(directory), "--model-name", "iris"], workers=1)

    one = assert_ok(await predict(http, server, iris_rows[100], model="iris"))
    assert (one["model"], one["model_version"], one["prediction"]) == ("iris", "1", offline["v1"][100])
    assert await infer_v2(http, server, "iris", iris_rows) == offline["v1"]
    metadata = assert_ok(await call(http, "GET", server.url("/v2/models/iris")))
    assert (metadata["platform"], metadata["inputs"][0]["shape"]) == ("sklearn", [-1, 4])
    metrics = (await call(http, "GET", server.url("/metrics"))).text
    assert 'model="iris",version="1"' in metrics


async def test_a_torchscript_file_with_its_input_shape_answers_as_the_module_does(
    torchscript: bytes, torch_module: torch.nn.Module, iris_rows: list[list[float]], start_server: StartServer,
    empty_repository: Path, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """Served under its directory's name, as no --model-name is given."""
    files = {"scorer.pt": torchscript, "model.toml": b"input_shape = [4]\n"}
    directory = model_directory(tmp_path, "scorer", files)
    server = start_server(empty_repository, args=["--model", str(directory)], workers=1)

    rows = iris_rows[::10]
    with torch.inference_mode():
        expected = torch_module(torch.tensor(rows, dtype=torch.float32)).numpy()
    batch = assert_ok(await predict_batch(http, server, rows, model="scorer"))
    np.testing.assert_allclose(batch["predictions"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(await infer_v2(http, server, "scorer", rows), expected, rtol=1e-5, atol=1e-6)
    listed = assert_ok(await call(http, "GET", server.url("/models")))
    assert [entry["name"] for entry in listed["models"]] == ["scorer"]


def serve_and_exit(args: list[str]) -> subprocess.CompletedProcess[str]:
    command = mlserve_command("serve", "--host", "127.0.0.1", "--port", str(free_port()), *args)
    return subprocess.run(
        command, env=mlserve_env(), capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, stdin=subprocess.DEVNULL
    )


def assert_refused(run: subprocess.CompletedProcess[str], message: str) -> None:
    assert run.returncode == 2, f"exit status {run.returncode}:\n{run.stderr}"
    assert message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def state_dict(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "holds no model: expected one model file"),
        ({"notes.txt": b"not a model"}, "holds no model: expected one model file"),
        ({"model.joblib": b"a", "model.pt": b"b"}, "holds 2 model files (model.joblib, model.pt): keep only the one"),
        ({"model.joblib": b"not a pickle"}, "is not a model joblib can load"),
        ({"model.pkl": pickle.dumps({"not": "an estimator"})}, "holds a dict that does not say how many features"),
        ({"model.pt": "torchscript"}, "does not record the shape of its input: add a model.toml beside it"),
        ({"model.pth": "state_dict"}, "is not TorchScript"),
        ({"model.pkl": b"a", "model.toml": b'name = "other"\n'}, "name come from the command line"),
        ({"model.pt": "torchscript", "model.toml": b'input_shape = "four"\n'}, "model.toml: Expected `array`"),
    ],
    ids=["empty", "no-model-file", "two-model-files", "not-a-pickle", "not-an-estimator", "torchscript-without-shape", "state-dict-without-class",
         "toml-names-the-model", "toml-bad-shape"],
)
def test_a_directory_that_cannot_be_served_stops_the_server(
    files: dict[str, Any], message: str, torchscript: bytes, torch_module: torch.nn.Module, tmp_path: Path
) -> None:
    made = {"torchscript": torchscript, "state_dict": state_dict(torch_module)}
    directory = model_directory(tmp_path, "model", {name: made.get(content, content) for name, content in files.items()})
    run = serve_and_exit(["--model", str(directory)])
    assert_refused(run, message)
    assert f"mlserve: {directory}" in run.stderr


def test_model_name_is_refused_with_several_models(tmp_path: Path, demo_models_dir: Path) -> None:
    version = demo_models_dir / IRIS / "v1"
    run = serve_and_exit(["--model", str(version), "--model", str(tmp_path), "--model-name", "iris"])
    assert_refused(run, "--model-name names the model of a single --model")


def test_two_models_of_one_name_are_refused(tmp_path: Path, demo_models_dir: Path) -> None:
    fitted = (demo_models_dir / IRIS / "v1" / "model.joblib").read_bytes()
    first, second = (model_directory(tmp_path / side, "iris", {"model.joblib": fitted}) for side in ("a", "b"))
    run = serve_and_exit(["--model", str(first), "--model", str(second)])
    assert_refused(run, f"--model {first} and --model {second} are both named 'iris'")
