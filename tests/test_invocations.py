"""MLflow's scoring protocol (``/invocations``, ``/ping``, ``/health``, ``/version``) as MLflow's own
client and hand-written MLflow bodies use it.

The reference for every prediction is the scikit-learn model loaded straight from its artifact. One
server serves the iris versions and the digits CNN, so ``?model=`` has two models to pick from.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import joblib
import msgspec
import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc.scoring_server.client import ScoringServerClient

from mlserve.api.errors import error_text, json_error, mlflow_error
from mlserve.api.invocations import Table, arranged, parse_json
from mlserve.demo_models import IMAGES, IRIS
from mlserve.errors import ValidationFailed
from serverproc import IRIS_VERSIONS, Reply, ServerProc, call, predict_batch, scrape, serve

MLFLOW_VERSION = importlib.metadata.version("mlflow")
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
MAX_BATCH_ROWS = 64


@pytest.fixture(scope="module")
def models_dir(demo_and_digits_dir: Path) -> Path:
    """The demo iris versions (so ``offline`` holds their predictions) and the digits CNN."""
    return demo_and_digits_dir


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """Its log is checked for tracebacks when it stops, after the module's last test."""
    env = {"MLSERVE_MAX_BATCH_ROWS": str(MAX_BATCH_ROWS)}
    with serve(models_dir, tmp_path_factory.mktemp("invocations-server"), env=env, workers=1) as started:
        yield started


@pytest.fixture(scope="module")
def rows(iris_rows: list[list[float]]) -> list[list[float]]:
    """The first rows of the iris data and some of each class, within the server's row limit."""
    return iris_rows[:20] + iris_rows[50:70] + iris_rows[100:120]


@pytest.fixture(scope="module")
def want(offline: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each iris version's own predictions for ``rows``."""
    return {version: values[:20] + values[50:70] + values[100:120] for version, values in offline.items()}


async def invoke(
    http: aiohttp.ClientSession, server: ServerProc, body: Any, query: str = "", **headers: str
) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await call(http, "POST", server.url(f"/invocations{query}"), data=data, headers=headers)


def predictions(reply: Reply) -> list[Any]:
    assert reply.status == 200, f"expected 200, got {reply.status}: {reply.text}"
    assert reply.content_type == "application/json", reply.headers
    assert set(reply.body) == {"predictions"}, reply.body
    return reply.body["predictions"]


def assert_mlflow_error(reply: Reply, status: int, code: str | None = None) -> str:
    """MLflow's error shape, ``{"error_code", "message"}``, with our status; returns the message."""
    assert reply.status == status, f"expected {status}, got {reply.status}: {reply.text}"
    assert reply.content_type == "application/json", reply.text
    assert set(reply.body) == {"error_code", "message"}, reply.body
    assert isinstance(reply.body["message"], str) and reply.body["message"], reply.body
    if code is not None:
        assert reply.body["error_code"] == code, reply.body
    return reply.body["message"]


def test_mlflow_client_unchanged(server: ServerProc, rows: list[list[float]], want: dict[str, list[int]]) -> None:
    """MLflow's own client: ping, version, and a DataFrame, an array and records all score as the model."""
    client = ScoringServerClient("127.0.0.1", server.port)
    client.ping()
    assert client.get_version() == MLFLOW_VERSION
    frame = pd.DataFrame(rows, columns=COLUMNS)
    records = frame.to_dict(orient="records")
    for data in (frame, pd.DataFrame(rows), np.array(rows), records):
        assert client.invoke(data)["predictions"] == want["v2"], type(data)
    assert client.invoke(frame, params={"temperature": 0.5})["predictions"] == want["v2"]


def formats(rows: list[list[float]]) -> dict[str, Any]:
    records = [dict(zip(COLUMNS, row)) for row in rows]
    return {
        "split": {"dataframe_split": {"columns": COLUMNS, "data": rows}},
        "split-no-columns": {"dataframe_split": {"data": rows}},
        "split-index-bools": {
            "dataframe_split": {
                "columns": [0, 1, 2, 3], "index": list(range(len(rows))), "data": [*rows[:-1], [*rows[-1][:3], True]]
            }
        },
        "records": {"dataframe_records": records},
        "instances": {"instances": rows},
        "instances-records": {"instances": records},
        "inputs": {"inputs": rows},
        "inputs-columns": {"inputs": {name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)}},
        "inputs-ints": {"inputs": [[int(value) for value in row] for row in rows]},
        "params": {"inputs": rows, "params": {"max_tokens": 3, "nested": {"a": [1]}}},
        "params-null": {"inputs": rows, "params": None},
    }


@pytest.mark.parametrize("name", list(formats([[0.0] * 4])))
async def test_each_input_format_scores_as_the_model(
    http: aiohttp.ClientSession, server: ServerProc, rows: list[list[float]], name: str, models_dir: Path
) -> None:
    body = formats(rows)[name]
    model = joblib.load(models_dir / IRIS / "v2" / "model.joblib")
    if name == "split-index-bools":
        sent = body["dataframe_split"]["data"]
    elif name == "inputs-ints":
        sent = body["inputs"]
    else:
        sent = rows
    assert predictions(await invoke(http, server, body)) == model.predict(np.array(sent, dtype=float)).tolist()


@pytest.mark.parametrize("content_type", ["text/csv", "text/csv; charset=utf-8", "TEXT/CSV;charset=UTF-8"])
async def test_csv_body(
    http: aiohttp.ClientSession,
    server: ServerProc,
    rows: list[list[float]],
    want: dict[str, list[int]],
    content_type: str,
) -> None:
    text = pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False)
    reply = await invoke(http, server, text.encode(), **{"Content-Type": content_type})
    assert predictions(reply) == want["v2"]


async def test_json_with_charset_and_the_same_answer_as_predict_batch(
    http: aiohttp.ClientSession, server: ServerProc, rows: list[list[float]]
) -> None:
    reply = await invoke(http, server, {"inputs": rows}, **{"Content-Type": "application/json; charset=utf-8"})
    batch = await predict_batch(http, server, rows)
    assert batch.status == 200, batch.text
    assert predictions(reply) == batch.body["predictions"]


@pytest.mark.parametrize("version", IRIS_VERSIONS)
async def test_model_and_version_query(
    http: aiohttp.ClientSession, server: ServerProc, rows: list[list[float]], want: dict[str, list[int]], version: str
) -> None:
    assert want["v1"] != want["v2"], "the versions must disagree somewhere for this test to mean anything"
    reply = await invoke(http, server, {"inputs": rows}, f"?model={IRIS}&version={version}")
    assert predictions(reply) == want[version]
    assert predictions(await invoke(http, server, {"inputs": rows}, f"?version={version}")) == want[version]


async def test_unknown_model_or_version_is_a_404(http: aiohttp.ClientSession, server: ServerProc) -> None:
    body = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
    message = assert_mlflow_error(await invoke(http, server, body, "?model=nope"), 404, "RESOURCE_DOES_NOT_EXIST")
    assert "nope" in message
    assert_mlflow_error(await invoke(http, server, body, f"?model={IRIS}&version=v9"), 404, "RESOURCE_DOES_NOT_EXIST")


async def test_wrong_width_is_a_422_naming_the_row(http: aiohttp.ClientSession, server: ServerProc) -> None:
    body = {"dataframe_split": {"data": [[5.1, 3.5, 1.4, 0.2], [5.1, 3.5, 1.4]]}}
    message = assert_mlflow_error(await invoke(http, server, body), 422, "INVALID_PARAMETER_VALUE")
    assert "expected 4 features, got 3" in message and "$.dataframe_split.data[1]" in message, message


async def test_an_image_model_is_refused(http: aiohttp.ClientSession, server: ServerProc) -> None:
    body = {"inputs": [[0.0] * 4]}
    message = assert_mlflow_error(await invoke(http, server, body, f"?model={IMAGES}"), 422, "INVALID_PARAMETER_VALUE")
    assert "takes images" in message, message


ROW = [5.1, 3.5, 1.4, 0.2]
CSV = {"Content-Type": "text/csv"}
CSV_HEADER = "a,b,c,d\n"


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


MISTAKES: list[tuple[str, bytes, dict[str, str], str, int, str | None]] = [
    # (id, body, headers, query, status, text the message must hold)
    ("malformed-json", b'{"inputs": [[5.1, 3.5,', {}, "", 400, "malformed JSON"),
    ("not-utf8", b'{"inputs": [[\xff]]}', {}, "", 400, "malformed JSON"),
    ("empty-body", b"", {}, "", 400, "malformed JSON"),
    ("a-list", js([ROW]), {}, "", 400, "exactly one"),
    ("two-input-keys", js({"inputs": [ROW], "instances": [ROW]}), {}, "", 400, "exactly one"),
    ("no-input-key", js({"params": {}}), {}, "", 400, "exactly one"),
    ("unknown-key", js({"inputs": [ROW], "data": 1}), {}, "", 400, "'data'"),
    ("old-protocol", js({"columns": ["a"], "data": [[1]]}), {}, "", 400, "exactly one"),
    ("string-value", js({"dataframe_split": {"data": [ROW, ROW, ROW, [5.1, "x", 1.4, 0.2]]}}), {}, "", 422,
     "$.dataframe_split.data[3][1]"),
    ("null-value", js({"inputs": [[5.1, None, 1.4, 0.2]]}), {}, "", 422, "$.inputs[0][1]"),
    ("null-record-value", js({"dataframe_records": [{"a": None}]}), {}, "", 422, "$.dataframe_records[0].a"),
    ("null-input", js({"inputs": None}), {}, "", 422, "$.inputs"),
    ("empty-data", js({"dataframe_split": {"columns": [], "data": []}}), {}, "", 422, "at least one row"),
    ("empty-records", js({"dataframe_records": []}), {}, "", 422, "at least one row"),
    ("flat-inputs", js({"inputs": ROW}), {}, "", 422, "$.inputs[0]"),
    ("ragged-columns", js({"inputs": {"a": [1, 2], "b": [1]}}), {}, "", 422, "different lengths"),
    ("records-differ", js({"dataframe_records": [{"a": 1, "b": 2}, {"a": 1}]}), {}, "", 422, "no 'b'"),
    ("split-extra-field", js({"dataframe_split": {"data": [ROW], "dtypes": {}}}), {}, "", 422, "dtypes"),
    ("split-columns-width", js({"dataframe_split": {"columns": ["a"], "data": [ROW]}}), {}, "", 422, "under 1 columns"),
    ("out-of-range", b'{"inputs": [[5.1, 1e999, 1.4, 0.2]]}', {}, "", 422, "$.inputs[0][1]"),
    ("params-not-object", js({"inputs": [ROW], "params": [1]}), {}, "", 422, "$.params"),
    ("too-many-rows", js({"inputs": [ROW] * (MAX_BATCH_ROWS + 1)}), {}, "", 413, "over the limit"),
    ("too-many-csv-rows", (CSV_HEADER + "5.1,3.5,1.4,0.2\n" * (MAX_BATCH_ROWS + 1)).encode(), CSV, "", 413,
     "over the limit"),
    ("csv-text", (CSV_HEADER + "5.1,x,1.4,0.2\n").encode(), CSV, "", 422, "csv[0][1]"),
    ("csv-short-row", (CSV_HEADER + "5.1,1.4,0.2\n").encode(), CSV, "", 422, "csv[0]"),
    ("csv-empty", b"", CSV, "", 400, "empty"),
    ("csv-header-only", CSV_HEADER.encode(), CSV, "", 422, "at least one row"),
    ("csv-nan", (CSV_HEADER + "5.1,nan,1.4,0.2\n").encode(), CSV, "", 422, "finite"),
    ("form", b"inputs=1", {"Content-Type": "application/x-www-form-urlencoded"}, "", 415, None),
    ("text-plain", b"{}", {"Content-Type": "text/plain"}, "", 415, None),
    ("latin-1", js({"inputs": [ROW]}), {"Content-Type": "application/json; charset=latin-1"}, "", 415, "UTF-8"),
    ("unknown-parameter", js({"inputs": [ROW]}), {"Content-Type": "application/json; format=split"}, "", 415, "format"),
    ("unknown-query", js({"inputs": [ROW]}), {}, "?model_version=v1", 422, "model_version"),
    ("bad-timeout", js({"inputs": [ROW]}), {"X-Request-Timeout-Ms": "abc"}, "", 400, "Timeout"),
]


async def test_mistakes_get_a_4xx_in_mlflow_shape_and_the_server_stays_healthy(
    http: aiohttp.ClientSession, server: ServerProc, want: dict[str, list[int]], rows: list[list[float]]
) -> None:
    for name, body, headers, query, status, text in MISTAKES:
        reply = await call(
            http, "POST", server.url(f"/invocations{query}"), data=body,
            headers={"Content-Type": "application/json", **headers},
        )
        message = assert_mlflow_error(reply, status, "INVALID_PARAMETER_VALUE" if status == 422 else "BAD_REQUEST")
        assert text is None or text in message, (name, message)
    too_big = await invoke(http, server, b"[" + b"0," * (1 << 20) + b"0]")
    assert_mlflow_error(too_big, 413, "BAD_REQUEST")
    assert (await call(http, "GET", server.url("/ping"))).status == 200
    assert predictions(await invoke(http, server, {"inputs": rows})) == want["v2"]


async def test_ping_health_version(http: aiohttp.ClientSession, server: ServerProc) -> None:
    for path in ("/ping", "/health"):
        reply = await call(http, "GET", server.url(path))
        assert (reply.status, reply.text) == (200, "\n"), (path, reply)
    reply = await call(http, "GET", server.url("/version"))
    assert (reply.status, reply.content_type, reply.text) == (200, "text/plain", MLFLOW_VERSION)
    wrong = await call(http, "GET", server.url("/invocations"))
    assert wrong.status == 405 and "POST" in wrong.headers["Allow"]


async def test_requests_are_counted_under_their_own_endpoint(
    http: aiohttp.ClientSession, server: ServerProc, rows: list[list[float]]
) -> None:
    before = await scrape(http, server)
    predictions(await invoke(http, server, {"inputs": rows}, f"?model={IRIS}&version=v1"))
    assert_mlflow_error(await invoke(http, server, {"inputs": [[1.0]]}, f"?model={IRIS}&version=v1"), 422)
    after = await scrape(http, server)

    def grew(status: str) -> float:
        labels = {"model": IRIS, "version": "v1", "endpoint": "invocations", "status": status}
        return after.value("mlserve_requests_total", **labels) - before.value("mlserve_requests_total", **labels)

    assert (grew("200"), grew("422")) == (1, 1)


async def test_user_id_follows_the_experiment_as_predict_batch_does(
    http: aiohttp.ClientSession, server: ServerProc
) -> None:
    experiment = server.url(f"/models/{IRIS}/experiment")
    document = {"variants": {"v1": 0.5, "v2": 0.5}, "salt": "invocations"}
    assert (await call(http, "PUT", experiment, json_body=document)).status == 200
    try:
        seen = set()
        for user in (f"user-{n}" for n in range(12)):
            headers = {"X-User-ID": user}
            batch = await call(http, "POST", server.url("/predict/batch"), json_body={"samples": [ROW]},
                               headers=headers)
            reply = await invoke(http, server, {"inputs": [ROW]}, **headers)
            predictions(reply)
            assert reply.headers["X-Variant"] == batch.headers["X-Variant"] == batch.body["variant"], user
            seen.add(reply.headers["X-Variant"])
        assert seen == {"v1", "v2"}, "twelve users should reach both arms"
        too_long = await invoke(http, server, {"inputs": [ROW]}, **{"X-User-ID": "u" * 300})
        assert "X-User-ID" in assert_mlflow_error(too_long, 422)
    finally:
        assert (await call(http, "DELETE", experiment)).status == 200


# -- in process: named columns, which only models with a signature have --------------------------------


def table(body: dict[str, Any]) -> Table:
    return parse_json(json.dumps(body).encode())


NAMED = {
    "split": {"dataframe_split": {"columns": ["b", "a"], "data": [[2, 1], [4, 3]]}},
    "records": {"dataframe_records": [{"b": 2, "a": 1}, {"a": 3, "b": 4}]},
    "instances": {"instances": [{"b": 2, "a": 1}, {"a": 3, "b": 4}]},
    "inputs-columns": {"inputs": {"b": [2, 4], "a": [1, 3]}},
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_columns_are_put_in_the_model_order(name: str) -> None:
    parsed = table(NAMED[name])
    assert arranged(parsed, ("a", "b")) == [[1.0, 2.0], [3.0, 4.0]]
    assert arranged(parsed, ()) == parsed.rows, "unnamed inputs: positional"
    with pytest.raises(ValidationFailed, match="missing column 'c'"):
        arranged(parsed, ("a", "b", "c"))
    with pytest.raises(ValidationFailed, match="unknown column 'b'"):
        arranged(parsed, ("a",))


def test_csv_and_positional_bodies_keep_their_order() -> None:
    rows = [[1.0, 2.0]]
    assert arranged(table({"inputs": rows}), ("a", "b")) == rows, "no names in the request: positional"
    assert arranged(table({"dataframe_split": {"data": rows}}), ("b", "a")) == rows
    with pytest.raises(ValidationFailed, match="named twice"):
        arranged(table({"dataframe_split": {"columns": ["a", "a"], "data": rows}}), ("a", "b"))


def test_error_encoders_share_the_status_and_message() -> None:
    for encode in (json_error, mlflow_error):
        response = encode(422, "bad value", "$.x", None)
        assert response.status == 422 and "bad value" in error_text(response)
    body = msgspec.json.decode(mlflow_error(503, "loading", None, {"Retry-After": "1"}).body)
    assert body == {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "loading"}
