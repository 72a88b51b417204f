"""Every error status a client can meet, each as a JSON ``{"error": ...}`` with the right details.

Client mistakes (4xx) must never reach a model, never be a 500 and never log a traceback. Overload
(503 + Retry-After), deadlines (504) and a broken model must fail only the requests concerned.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mlserve.demo_models import IRIS
from serverproc import (
    ANY_PATH,
    Reply,
    ServerProc,
    assert_error,
    assert_ok,
    call,
    predict,
    predict_batch,
    scrape,
    serve,
)
from testmodels import SlowModel, WrongLengthModel, write_model

ROW = [5.1, 3.5, 1.4, 0.2]


@dataclass(frozen=True)
class Mistake:
    """One wrong request and the answer it must get."""

    id: str
    method: str
    path: str
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error_path: Any = ANY_PATH

    async def send(self, http: aiohttp.ClientSession, server: ServerProc) -> Reply:
        return await call(http, self.method, server.url(self.path), data=self.body, headers=self.headers)

    def check(self, reply: Reply) -> None:
        assert_error(reply, self.status, path=self.error_path)
        if self.status == 405:
            assert "Allow" in reply.headers, f"405 without Allow: {dict(reply.headers)}"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def timeout_header(value: str) -> Mistake:
    return Mistake(
        f"timeout-header-{value or 'empty'}",
        "POST",
        "/predict",
        400,
        body(features=ROW),
        {"X-Request-Timeout-Ms": value},
    )


MISTAKES = [
    # 400: the body or a header cannot be parsed at all
    Mistake("malformed-json", "POST", "/predict", 400, b'{"features": [5.1, 3.5,'),
    Mistake("not-json", "POST", "/predict", 400, b"features=5.1,3.5,1.4,0.2"),
    Mistake("empty-body", "POST", "/predict", 400, b""),
    Mistake("empty-body-batch", "POST", "/predict/batch", 400, b""),
    *(timeout_header(value) for value in ("abc", "0", "-5", "nan", "inf", "")),
    # 404: nothing by that name
    Mistake("unknown-model", "POST", "/predict", 404, body(features=ROW, model="nope")),
    Mistake("unknown-model-batch", "POST", "/predict/batch", 404, body(samples=[ROW], model="nope")),
    Mistake("unknown-version", "POST", "/predict", 404, body(features=ROW, model=IRIS, model_version="v9")),
    Mistake("unknown-version-default-model", "POST", "/predict/batch", 404, body(samples=[ROW], model_version="v9")),
    Mistake("unknown-model-versions", "GET", "/models/nope/versions", 404),
    Mistake("unknown-route", "GET", "/nope", 404),
    Mistake("unknown-route-post", "POST", "/predict/nope", 404, body(features=ROW)),
    # 405: a known route, the wrong method
    Mistake("get-predict", "GET", "/predict", 405),
    Mistake("get-predict-batch", "GET", "/predict/batch", 405),
    Mistake("post-models", "POST", "/models", 405, body(features=ROW)),
    Mistake("delete-health", "DELETE", "/health/ready", 405),
    # 422: parsed, but a value is wrong; the path names it
    Mistake("wrong-type", "POST", "/predict", 422, body(features=[5.1, "x", 1.4, 0.2]), error_path="$.features[1]"),
    Mistake("null-feature", "POST", "/predict", 422, body(features=[5.1, 3.5, None, 0.2]), error_path="$.features[2]"),
    Mistake("features-not-a-list", "POST", "/predict", 422, body(features=5.1), error_path="$.features"),
    Mistake("too-few-features", "POST", "/predict", 422, body(features=ROW[:3]), error_path="$.features"),
    Mistake("too-many-features", "POST", "/predict", 422, body(features=[*ROW, 1.0]), error_path="$.features"),
    Mistake("no-features", "POST", "/predict", 422, body(features=[]), error_path="$.features"),
    Mistake("infinity", "POST", "/predict", 422, b'{"features": [5.1, 1e999, 1.4, 0.2]}', error_path="$.features[1]"),
    Mistake(
        "infinity-in-batch",
        "POST",
        "/predict/batch",
        422,
        b'{"samples": [[5.1, 3.5, 1.4, 0.2], [5.1, 3.5, -1e999, 0.2]]}',
        error_path="$.samples[1][2]",
    ),
    Mistake("empty-samples", "POST", "/predict/batch", 422, body(samples=[]), error_path="$.samples"),
    Mistake(
        "ragged-batch", "POST", "/predict/batch", 422, body(samples=[ROW, ROW[:3], ROW]), error_path="$.samples[1]"
    ),
    Mistake("sample-not-a-list", "POST", "/predict/batch", 422, body(samples=[ROW, 5.1]), error_path="$.samples[1]"),
    Mistake("unknown-field", "POST", "/predict", 422, body(features=ROW, feature=ROW)),
    Mistake("samples-on-predict", "POST", "/predict", 422, body(samples=[ROW])),
    Mistake("missing-features", "POST", "/predict", 422, body(model=IRIS)),
    Mistake("model-not-a-string", "POST", "/predict", 422, body(features=ROW, model=5), error_path="$.model"),
    Mistake("body-is-an-array", "POST", "/predict", 422, json.dumps(ROW).encode()),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
async def test_client_mistake(http: aiohttp.ClientSession, iris: ServerProc, mistake: Mistake) -> None:
    """Each mistake gets its own status and a JSON error (naming the field where there is one)."""
    mistake.check(await mistake.send(http, iris))


async def test_client_mistakes_never_cause_500_or_traceback(http: aiohttp.ClientSession, iris: ServerProc) -> None:
    """All mistakes at once: none is a 5xx, none is logged as an error, and good requests still work."""
    since = iris.log_size()
    before = await scrape(http, iris)
    replies = await asyncio.gather(*(mistake.send(http, iris) for mistake in MISTAKES))
    assert_ok(await predict(http, iris, ROW))
    after = await scrape(http, iris)
    assert [r.status for r in replies] == [m.status for m in MISTAKES]
    for mistake, reply in zip(MISTAKES, replies, strict=True):
        mistake.check(reply)
    log = iris.log(since)
    assert "Traceback" not in log and " ERROR " not in log, log
    assert after.value("mlserve_requests_total", status="500") == before.value("mlserve_requests_total", status="500")


# -- limits: 413 ----------------------------------------------------------------------------------

MAX_BODY_BYTES = 2000
MAX_BATCH_ROWS = 10


@pytest.fixture(scope="module")
def limited(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """The demo models behind small limits: 2000-byte bodies, 10 rows a batch request."""
    env = {"MLSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "MLSERVE_MAX_BATCH_ROWS": str(MAX_BATCH_ROWS)}
    with serve(demo_models_dir, tmp_path_factory.mktemp("limited"), env=env) as server:
        yield server


async def test_body_over_max_body_bytes_is_413(http: aiohttp.ClientSession, limited: ServerProc) -> None:
    """A body over ``max_body_bytes`` is refused on both endpoints, whatever it holds."""
    big_single = body(features=[1.5] * 600)
    big_batch = body(samples=[ROW] * 120)
    assert len(big_single) > MAX_BODY_BYTES and len(big_batch) > MAX_BODY_BYTES
    for endpoint, data in (("/predict", big_single), ("/predict/batch", big_batch)):
        message = assert_error(await call(http, "POST", limited.url(endpoint), data=data), 413)
        assert str(MAX_BODY_BYTES) in message, message
    assert_ok(await predict(http, limited, ROW))


async def test_samples_over_max_batch_rows_is_413(
    http: aiohttp.ClientSession, limited: ServerProc, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    """11 rows is over a limit of 10 (413); exactly 10 rows is served."""
    too_many = iris_rows[: MAX_BATCH_ROWS + 1]
    assert len(body(samples=too_many)) < MAX_BODY_BYTES, "the rows, not the bytes, must be what is over"
    assert str(MAX_BATCH_ROWS) in assert_error(await predict_batch(http, limited, too_many), 413)
    at_limit = assert_ok(await predict_batch(http, limited, iris_rows[:MAX_BATCH_ROWS]))
    assert at_limit["predictions"] == offline["v2"][:MAX_BATCH_ROWS]


# -- two models, one of them broken ---------------------------------------------------------------

BROKEN = "broken"


@pytest.fixture(scope="module")
def two_models(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """The iris model next to a broken model whose predict returns one output too few."""
    models = tmp_path_factory.mktemp("two-models") / "models"
    shutil.copytree(demo_models_dir, models)
    write_model(models, BROKEN, "v1", WrongLengthModel())
    with serve(models, tmp_path_factory.mktemp("two-models-server"), wait="loaded") as server:
        yield server


@pytest.mark.parametrize("endpoint", ["/predict", "/predict/batch"])
async def test_model_is_required_when_two_models_are_served(
    http: aiohttp.ClientSession, two_models: ServerProc, endpoint: str
) -> None:
    """With two models the server cannot guess: 422 naming ``$.model``; naming the model works."""
    payload: dict[str, Any] = {"features": ROW} if endpoint == "/predict" else {"samples": [ROW]}
    assert_error(await call(http, "POST", two_models.url(endpoint), json_body=payload), 422, path="$.model")
    assert_ok(await call(http, "POST", two_models.url(endpoint), json_body={**payload, "model": IRIS}))


async def test_broken_model_is_refused_with_a_clear_error_and_others_keep_serving(
    http: aiohttp.ClientSession, two_models: ServerProc, iris_rows: list[list[float]], offline: dict[str, list[int]]
) -> None:
    """The wrong output count is caught by the load-time warm-up: the model is listed as failed with
    the reason, every caller gets a JSON error naming it (never a hang), and iris is unaffected.

    The warm-up means this model never serves, so the run-time check (a 500 for a batch whose output
    count is wrong) cannot be reached end to end with it; test_batcher.py covers that path.
    """
    listing = assert_ok(await call(http, "GET", two_models.url(f"/models/{BROKEN}/versions")))
    [version] = listing["versions"]
    assert version["state"] == "failed" and "outputs" in version["error"], version
    ready = await call(http, "GET", two_models.url("/health/ready"))
    assert ready.status == 503 and ready.body["status"] == "failed", ready.text
    assert ready.body["models"] == {f"{BROKEN}:v1": "failed", f"{IRIS}:v1": "ready", f"{IRIS}:v2": "ready"}
    replies = await asyncio.gather(
        *(predict(http, two_models, [float(i), 0, 0, 0], model=BROKEN) for i in range(8)),
        predict_batch(http, two_models, iris_rows[:5], model=BROKEN),
    )
    for reply in replies:
        message = assert_error(reply, 503, retry=False)
        assert "failed" in message and "outputs" in message, message
    iris_batch = assert_ok(await predict_batch(http, two_models, iris_rows, model=IRIS))
    assert iris_batch["predictions"] == offline["v2"]


# -- overload and deadlines: 503 and 504 ----------------------------------------------------------

SLOW = "slow"
SLOW_S = 1.0


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A 1 s model with no room to spare: one batch of one row in flight, one request queued."""
    models = tmp_path_factory.mktemp("slow") / "models"
    write_model(models, SLOW, "v1", SlowModel(SLOW_S))
    env = {
        "MLSERVE_BATCHING__MAX_QUEUE": "1",
        "MLSERVE_BATCHING__MAX_INFLIGHT": "1",
        "MLSERVE_BATCHING__MAX_BATCH_SIZE": "1",
    }
    with serve(models, tmp_path_factory.mktemp("slow-server"), env=env) as server:
        yield server


async def test_full_queue_is_503_with_retry_after(http: aiohttp.ClientSession, slow: ServerProc) -> None:
    """Ten callers at once against room for two: the rest are refused at once, the two answered."""
    before = await scrape(http, slow)
    replies = await asyncio.gather(*(predict(http, slow, [float(i), 0, 0, 0]) for i in range(10)))
    after = await scrape(http, slow)
    accepted = [(i, r) for i, r in enumerate(replies) if r.status == 200]
    refused = [r for r in replies if r.status != 200]
    assert accepted and refused, [r.status for r in replies]
    for i, reply in accepted:
        assert assert_ok(reply)["prediction"] == 2.0 * i
    for reply in refused:
        assert "queue" in assert_error(reply, 503), reply.text
    refused_counted = after.value("mlserve_requests_total", status="503") - before.value(
        "mlserve_requests_total", status="503"
    )
    assert refused_counted == len(refused)


async def test_deadline_is_504_and_the_server_still_answers(http: aiohttp.ClientSession, slow: ServerProc) -> None:
    """A 200 ms deadline against a 1 s model is a 504; the next request (no deadline header) is a 200."""
    late = await call(
        http,
        "POST",
        slow.url("/predict"),
        json_body={"features": [1, 0, 0, 0]},
        headers={"X-Request-Timeout-Ms": "200"},
    )
    assert "deadline" in assert_error(late, 504)
    assert assert_ok(await predict(http, slow, [3.0, 0, 0, 0]))["prediction"] == 6.0
