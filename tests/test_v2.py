"""The Open Inference Protocol (``/v2``) as Triton's own client and hand-made raw requests use it.

One server, with an admin token, serves the demo iris versions and the digits CNN. The reference for
every iris prediction is the scikit-learn model loaded straight from its artifact (``offline``); for
the CNN, the same server's ``/predict/image``. Malformed requests must each get a 4xx JSON error and
leave the server healthy: the fixture fails a test whose requests made the server log a traceback.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from mlserve.demo_models import IMAGES, IRIS, digit_images
from serverproc import IRIS_VERSIONS, ServerProc, assert_error, assert_ok, call, scrape, serve, watched

TOKEN = "v2-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BATCH_ROWS = 200
HEADER = "Inference-Header-Content-Length"
ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def models_dir(demo_and_digits_dir: Path) -> Path:
    """The demo iris versions (so ``offline`` holds their predictions) and the digits CNN."""
    return demo_and_digits_dir


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    env = {"MLSERVE_ADMIN_TOKEN": TOKEN, "MLSERVE_MAX_BATCH_ROWS": str(MAX_BATCH_ROWS)}
    with serve(models_dir, tmp_path_factory.mktemp("v2-server"), env=env, workers=1) as started:
        yield started


@pytest.fixture(autouse=True)
def serves_on(server: ServerProc) -> Iterator[None]:
    """Every test: the server still runs when it ends, and a traceback it logged meanwhile fails it."""
    with watched(server):
        yield


@pytest.fixture
def client(server: ServerProc) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60.0)
    yield triton_client
    triton_client.close()


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    """Held-out digits, PNG-encoded as a client would send them."""
    images, _, held_out = digit_images()
    encoded = []
    for index in held_out[:24]:
        buffer = io.BytesIO()
        images[index].save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded


def features(rows: Any, datatype: str = "FP64", binary: bool = True) -> triton.InferInput:
    array = np.asarray(rows, dtype=triton_dtype(datatype))
    tensor = triton.InferInput("input-0", list(array.shape), datatype)
    return tensor.set_data_from_numpy(array, binary_data=binary)


def triton_dtype(datatype: str) -> Any:
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(datatype)


def images_input(pngs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(pngs)], "BYTES")
    return tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)


# -- Triton's client, unchanged -----------------------------------------------------------------------------


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for version in ("", "v1", "v2"):
        assert client.is_model_ready(IRIS, version)
    assert client.is_model_ready(IMAGES) and not client.is_model_ready("no_such_model")
    assert not client.is_model_ready(IRIS, "v9")
    server = client.get_server_metadata()
    assert server["name"] == "mlserve" and server["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
    iris = client.get_model_metadata(IRIS)
    assert (iris["name"], iris["versions"], iris["platform"]) == (IRIS, ["v1", "v2"], "sklearn")
    assert iris["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert iris["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [-1]}]
    assert client.get_model_metadata(IRIS, "v1")["versions"] == ["v1"]
    image = client.get_model_metadata(IMAGES, "v1")
    assert image["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert image["outputs"] == [
        {"name": "class", "datatype": "INT64", "shape": [-1]},
        {"name": "confidence", "datatype": "FP64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 10]},
    ]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("no_such_model")


@pytest.mark.parametrize("version", IRIS_VERSIONS)
@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_output", [None, True, False], ids=["default-out", "binary-out", "json-out"])
def test_iris_infer_equals_the_offline_model(
    client: triton.InferenceServerClient,
    iris_rows: list[list[float]],
    offline: dict[str, list[int]],
    version: str,
    binary_input: bool,
    binary_output: bool | None,
) -> None:
    outputs = None if binary_output is None else [triton.InferRequestedOutput("predict", binary_data=binary_output)]
    result = client.infer(IRIS, [features(iris_rows, binary=binary_input)], model_version=version,
                          outputs=outputs, request_id=f"req-{version}")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (IRIS, version, f"req-{version}")
    output = response["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("predict", "INT64", [len(iris_rows)])
    assert ("data" in output) is (binary_output is False)
    assert result.as_numpy("predict").tolist() == offline[version]


def test_without_a_version_the_active_one_answers(
    client: triton.InferenceServerClient, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    result = client.infer(IRIS, [features(iris_rows[:10])])
    assert result.get_response()["model_version"] == "v2"
    assert result.as_numpy("predict").tolist() == offline["v2"][:10]


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "INT64", "INT32", "UINT8"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_numeric_datatype_is_read_as_float64(
    client: triton.InferenceServerClient, models_dir: Path, iris_rows: list[list[float]], datatype: str, binary: bool
) -> None:
    rows = np.asarray(iris_rows[::7], dtype=triton_dtype(datatype)) if datatype.startswith("FP") else \
        np.rint(np.asarray(iris_rows[::7])).astype(triton_dtype(datatype))
    model = joblib.load(models_dir / IRIS / "v1" / "model.joblib")
    result = client.infer(IRIS, [features(rows, datatype, binary)], model_version="v1")
    assert result.as_numpy("predict").tolist() == model.predict(rows.astype(np.float64)).tolist()


async def test_nested_json_data_and_booleans(
    http: aiohttp.ClientSession, server: ServerProc, models_dir: Path, iris_rows: list[list[float]]
) -> None:
    model = joblib.load(models_dir / IRIS / "v1" / "model.joblib")
    rows = iris_rows[:3]
    body = {"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64", "data": rows}]}
    reply = await infer_json(http, server, body, "versions/v1/")
    assert reply["outputs"][0]["data"] == model.predict(rows).tolist()
    flags = [[True, False, True, False]]
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "BOOL", "data": flags}]}
    reply = await infer_json(http, server, body, "versions/v1/")
    assert reply["outputs"][0]["data"] == model.predict(np.array(flags, dtype=float)).tolist()


async def infer_json(http: aiohttp.ClientSession, server: ServerProc, body: Any, version: str = "") -> Any:
    return assert_ok(await call(http, "POST", server.url(f"/v2/models/{IRIS}/{version}infer"), json_body=body))


async def test_image_model_answers_as_predict_image(
    client: triton.InferenceServerClient, http: aiohttp.ClientSession, server: ServerProc, pngs: list[bytes]
) -> None:
    result = client.infer(IMAGES, [images_input(pngs)])
    classes, confidence = result.as_numpy("class"), result.as_numpy("confidence")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(pngs), 10)
    for index, png in enumerate(pngs):
        reply = await call(http, "POST", server.url(f"/predict/image?model={IMAGES}"), data=png,
                           headers={"Content-Type": "image/png"})
        alone = assert_ok(reply)
        assert classes[index] == alone["class"]
        assert confidence[index] == pytest.approx(alone["confidence"], abs=1e-6)
        np.testing.assert_allclose(probabilities[index], alone["probabilities"], atol=1e-6)
    outputs = [triton.InferRequestedOutput("class", binary_data=False)]
    only = client.infer(IMAGES, [images_input(pngs[:3])], outputs=outputs, model_version="v1").get_response()
    assert only["outputs"] == [{"name": "class", "datatype": "INT64", "shape": [3], "data": classes[:3].tolist()}]


def test_repository_index_unload_and_load(
    client: triton.InferenceServerClient, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        (IRIS, "v1", "READY"), (IRIS, "v2", "READY"), (IMAGES, "v1", "READY")
    }
    with pytest.raises(InferenceServerException) as refused:
        client.unload_model(IRIS)
    assert refused.value.status() == "401"
    client.unload_model(IRIS, headers=AUTH)
    try:
        assert not client.is_model_ready(IRIS) and not client.is_model_ready(IRIS, "v1")
        assert client.is_server_ready(), "a model unloaded on purpose does not make the server unready"
        assert client.is_model_ready(IMAGES)
        states = {(m["name"], m["version"]): (m["state"], m["reason"]) for m in client.get_model_repository_index()}
        assert states[(IRIS, "v1")] == states[(IRIS, "v2")] == ("UNAVAILABLE", "unloaded")
        for version in ("", "v1"):
            with pytest.raises(InferenceServerException, match="unloaded") as failed:
                client.infer(IRIS, [features([ROW])], model_version=version)
            assert failed.value.status() == "503"
        client.unload_model(IRIS, headers=AUTH)  # again: nothing left to unload
    finally:
        client.load_model(IRIS, headers=AUTH)
    assert client.is_model_ready(IRIS) and client.is_model_ready(IRIS, "v1")
    assert {m["state"] for m in client.get_model_repository_index()} == {"READY"}
    result = client.infer(IRIS, [features(iris_rows)])
    assert result.as_numpy("predict").tolist() == offline["v2"]
    client.load_model(IRIS, headers=AUTH)  # loading a loaded model changes nothing
    with pytest.raises(InferenceServerException, match="unknown model") as unknown:
        client.load_model("no_such_model", headers=AUTH)
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException, match="not supported"):
        client.load_model(IRIS, headers=AUTH, config='{"backend": "onnx"}')


async def test_experiment_arms_by_user_and_no_unload_while_it_runs(
    http: aiohttp.ClientSession, server: ServerProc
) -> None:
    experiment = server.url(f"/models/{IRIS}/experiment")
    document = {"variants": {"v1": 0.5, "v2": 0.5}, "salt": "v2-protocol"}
    assert (await call(http, "PUT", experiment, json_body=document, headers=AUTH)).status == 200
    try:
        seen = set()
        body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
        for user in (f"user-{n}" for n in range(12)):
            headers = {"X-User-ID": user}
            batch = await call(http, "POST", server.url("/predict/batch"), json_body={"samples": [ROW]}, headers=headers)
            reply = await call(http, "POST", server.url(f"/v2/models/{IRIS}/infer"), json_body=body, headers=headers)
            assert assert_ok(reply)["model_version"] == reply.headers["X-Variant"] == batch.headers["X-Variant"]
            seen.add(reply.headers["X-Variant"])
        assert seen == {"v1", "v2"}, "twelve users should reach both arms"
        refused = await call(http, "POST", server.url(f"/v2/repository/models/{IRIS}/unload"), data=b"", headers=AUTH)
        assert "experiment" in assert_error(refused, 409)
    finally:
        assert (await call(http, "DELETE", experiment, headers=AUTH)).status == 200


async def test_aio_client_under_64_concurrent_calls(
    server: ServerProc, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    client = triton_aio.InferenceServerClient(url=f"127.0.0.1:{server.port}", conn_limit=64)
    try:
        assert await client.is_server_ready()

        async def one(index: int) -> tuple[int, int, str]:
            version = IRIS_VERSIONS[index % 2]
            binary = index % 3 != 0
            tensor = triton.InferInput("input-0", [1, 4], "FP64")
            tensor.set_data_from_numpy(np.asarray([iris_rows[index]], dtype=np.float64), binary_data=binary)
            result = await client.infer(IRIS, [tensor], model_version=version)
            return index, int(result.as_numpy("predict")[0]), version

        answers = await asyncio.gather(*(one(index) for index in range(150)))
        assert all(predicted == offline[version][index] for index, predicted, version in answers)
    finally:
        await client.close()


async def test_requests_are_counted_under_their_own_endpoint(http: aiohttp.ClientSession, server: ServerProc) -> None:
    before = await scrape(http, server)
    good = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
    await infer_json(http, server, good, "versions/v1/")
    bad = {"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP64", "data": ROW[:3]}]}
    assert_error(await call(http, "POST", server.url(f"/v2/models/{IRIS}/versions/v1/infer"), json_body=bad), 422)
    after = await scrape(http, server)

    def grew(status: str) -> float:
        labels = {"model": IRIS, "version": "v1", "endpoint": "v2_infer", "status": status}
        return after.value("mlserve_requests_total", **labels) - before.value("mlserve_requests_total", **labels)

    assert (grew("200"), grew("422")) == (1, 1)


# -- malformed requests: each a 4xx JSON error, and the server serves on ---------------------------------------


def framed(header: dict[str, Any], *blobs: bytes, declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-data request: the JSON header, then the blobs; ``declared`` overrides the header's length."""
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {HEADER: str(len(text) if declared is None else declared)}


def tensor(name: str = "input-0", shape: list[int] | None = None, datatype: str = "FP64", **fields: Any) -> dict[str, Any]:
    return {"name": name, "shape": [1, 4] if shape is None else shape, "datatype": datatype, **fields}


def floats(*values: float) -> bytes:
    return np.asarray(values, dtype="<f8").tobytes()


def elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def body_of(inputs: list[dict[str, Any]], **fields: Any) -> bytes:
    return json.dumps({"inputs": inputs, **fields}).encode()


GOOD = tensor(data=ROW)
BINARY = tensor(parameters={"binary_data_size": 32})
MALFORMED: dict[str, tuple[str, bytes, dict[str, str], int]] = {
    "bad JSON": (IRIS, b'{"inputs": [', {}, 400),
    "not an object": (IRIS, b"[1, 2]", {}, 422),
    "no inputs field": (IRIS, b"{}", {}, 422),
    "unknown field": (IRIS, json.dumps({"inptus": [GOOD]}).encode(), {}, 422),
    "missing inputs": (IRIS, body_of([]), {}, 422),
    "unknown datatype": (IRIS, body_of([tensor(datatype="FP128", data=ROW)]), {}, 422),
    "BYTES to the iris model": (IRIS, body_of([tensor(datatype="BYTES", data=["a", "b", "c", "d"])]), {}, 422),
    "shape and data disagree": (IRIS, body_of([tensor(data=ROW[:3])]), {}, 422),
    "wrong width": (IRIS, body_of([tensor(shape=[1, 3], data=ROW[:3])]), {}, 422),
    "one-dimensional rows": (IRIS, body_of([tensor(shape=[4], data=ROW)]), {}, 422),
    "negative shape": (IRIS, body_of([tensor(shape=[-1, 4], data=ROW)]), {}, 422),
    "non-numeric data": (IRIS, body_of([tensor(data=["5.1", 3.5, 1.4, 0.2])]), {}, 422),
    "non-numeric nested data": (IRIS, body_of([tensor(data=[[5.1, None, 1.4, 0.2]])]), {}, 422),
    "data not an array": (IRIS, body_of([tensor(data={"a": 1})]), {}, 422),
    "fraction as INT32": (IRIS, body_of([tensor(datatype="INT32", data=[5.1, 3, 1, 0])]), {}, 422),
    "INT8 out of range": (IRIS, body_of([tensor(datatype="INT8", data=[500, 3, 1, 0])]), {}, 422),
    "no data": (IRIS, body_of([tensor()]), {}, 422),
    "extra input": (IRIS, body_of([GOOD, tensor(name="extra", data=ROW)]), {}, 422),
    "unknown input name": (IRIS, body_of([tensor(name="features", data=ROW)]), {}, 422),
    "input twice": (IRIS, body_of([GOOD, GOOD]), {}, 422),
    "unknown output": (IRIS, body_of([GOOD], outputs=[{"name": "probabilities"}]), {}, 422),
    "output twice": (IRIS, body_of([GOOD], outputs=[{"name": "predict"}, {"name": "predict"}]), {}, 422),
    "classification output": (IRIS, body_of([GOOD], outputs=[{"name": "predict", "parameters": {"classification": 2}}]), {}, 400),
    "binary_data_output not a flag": (IRIS, body_of([GOOD], parameters={"binary_data_output": "yes"}), {}, 422),
    "id of the wrong type": (IRIS, body_of([GOOD], id=7), {}, 422),
    "not finite": (IRIS, *framed({"inputs": [BINARY]}, floats(5.1, float("nan"), 1.4, 0.2)), 422),
    "too many rows": (IRIS, body_of([tensor(shape=[MAX_BATCH_ROWS + 1, 4], data=ROW * (MAX_BATCH_ROWS + 1))]), {}, 413),
    "truncated binary": (IRIS, *framed({"inputs": [BINARY]}, floats(5.1, 3.5)), 400),
    "binary size lies": (IRIS, *framed({"inputs": [tensor(parameters={"binary_data_size": 24})]}, floats(5.1, 3.5, 1.4)), 400),
    "bytes left over": (IRIS, *framed({"inputs": [BINARY]}, floats(*ROW), b"\0" * 8), 400),
    "header length past the body": (IRIS, *framed({"inputs": [BINARY]}, floats(*ROW), declared=10_000), 400),
    "header length cuts the JSON": (IRIS, *framed({"inputs": [BINARY]}, floats(*ROW), declared=10), 400),
    "header length not a number": (IRIS, body_of([GOOD]), {HEADER: "-5"}, 400),
    "binary size without a header": (IRIS, body_of([BINARY]), {}, 400),
    "binary size negative": (IRIS, body_of([tensor(parameters={"binary_data_size": -1})]), {}, 422),
    "data and binary size": (IRIS, *framed({"inputs": [tensor(data=ROW, parameters={"binary_data_size": 32})]}, floats(*ROW)), 400),
    "FP32 to the image model": (IMAGES, body_of([tensor(name="image", shape=[1, 4], datatype="FP32", data=ROW)]), {}, 422),
    "image shape": (IMAGES, *framed({"inputs": [tensor(name="image", shape=[1, 2], datatype="BYTES", parameters={"binary_data_size": 10})]}, elements(b"a", b"b")), 422),
    "BYTES length cut off": (IMAGES, *framed({"inputs": [tensor(name="image", shape=[1], datatype="BYTES", parameters={"binary_data_size": 2})]}, b"\x05\x00"), 400),
    "BYTES element cut off": (IMAGES, *framed({"inputs": [tensor(name="image", shape=[1], datatype="BYTES", parameters={"binary_data_size": 7})]}, b"\x09\x00\x00\x00abc"), 400),
    "BYTES count and shape disagree": (IMAGES, *framed({"inputs": [tensor(name="image", shape=[2], datatype="BYTES", parameters={"binary_data_size": 5})]}, elements(b"a")), 400),
    "empty image": (IMAGES, *framed({"inputs": [tensor(name="image", shape=[1], datatype="BYTES", parameters={"binary_data_size": 4})]}, elements(b"")), 400),
    "not an image": (IMAGES, body_of([tensor(name="image", shape=[1], datatype="BYTES", data=["hello, not a PNG"])]), {}, 400),
    "numbers as BYTES": (IMAGES, body_of([tensor(name="image", shape=[1], datatype="BYTES", data=[1.0])]), {}, 422),
    "unknown model": ("no_such_model", body_of([GOOD]), {}, 404),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_request_is_a_4xx_and_the_server_serves_on(
    http: aiohttp.ClientSession, server: ServerProc, case: str
) -> None:
    model, body, headers, status = MALFORMED[case]
    reply = await call(http, "POST", server.url(f"/v2/models/{model}/infer"), data=body, headers=headers)
    assert_error(reply, status)
    good = await call(http, "POST", server.url(f"/v2/models/{IRIS}/infer"), data=body_of([GOOD]))
    assert assert_ok(good)["outputs"][0]["data"] == [0]


async def test_unknown_version_and_wrong_method(http: aiohttp.ClientSession, server: ServerProc) -> None:
    reply = await call(http, "POST", server.url(f"/v2/models/{IRIS}/versions/v9/infer"), data=body_of([GOOD]))
    assert "v9" in assert_error(reply, 404)
    assert_error(await call(http, "GET", server.url(f"/v2/models/{IRIS}/versions/v9/ready")), 404)
    wrong = await call(http, "GET", server.url(f"/v2/models/{IRIS}/infer"))
    assert wrong.status == 405 and "POST" in wrong.headers["Allow"]
    index = await call(http, "POST", server.url("/v2/repository/index"), json_body={"ready": "yes"})
    assert_error(index, 422)
    ready_only = await call(http, "POST", server.url("/v2/repository/index"), json_body={"ready": True})
    assert {entry["state"] for entry in ready_only.body} == {"READY"}
