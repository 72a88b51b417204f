"""``/openapi.json`` and ``/docs``: every route is documented, the document is valid OpenAPI 3.1, the
server answers fuzzed calls as the document says, and the docs page renders in a real browser.

One server with an admin token serves the module, so every mutating admin call the fuzzer makes
answers 401 and the models it needs stay loaded. Its log is checked for tracebacks when it stops: a
500 the fuzzer caused fails the module even if it was documented.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis

from mlserve.api.docs import DOCS, STATIC_FILES, openapi
from mlserve.app import create_app, documented
from mlserve.settings import Settings
from serverproc import ServerProc, serve

ADMIN_TOKEN = "docs-test-token"
CHROMIUM = "/usr/bin/chromium"
BROWSER_TIMEOUT_S = 90
FUZZ_EXAMPLES = int(os.environ.get("DOCS_FUZZ_EXAMPLES", "25"))
"""Examples an operation; raise it for a deeper run (``DOCS_FUZZ_EXAMPLES=500``)."""
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
"""What a fuzzed call must satisfy: no 5xx, a documented status, content type and headers, a body
that matches its schema, and a call outside the schema refused. Not ``positive_data_acceptance``:
a call within the schema may still name a model that does not exist (404), and not the checks that
need more than one call (``use_after_free``, ``ensure_resource_availability``: nothing here creates
a resource), send undocumented methods (``unsupported_method``: the fallback route's 405 is tested in
test_errors.py) or look for auth holes (``ignored_auth``: test_admin.py sends wrong tokens)."""


@pytest.fixture(scope="module")
def docs_server(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    env = {"MLSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    with serve(demo_models_dir, tmp_path_factory.mktemp("docs-server"), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def document(docs_server: ServerProc) -> dict[str, Any]:
    reply = requests.get(docs_server.url("/openapi.json"), timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    return reply.json()


def registered_routes(models_dir: Path, workdir: Path) -> set[tuple[str, str]]:
    """(method, path) of every route ``create_app`` registers but the catch-all and HEAD (aiohttp
    adds HEAD to each GET)."""
    app = create_app(Settings(models_dir=str(models_dir), state_path=str(workdir / "state.json")))
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.name != "unmatched" and route.resource is not None
    }


def test_every_route_the_app_serves_is_documented_and_nothing_else(
    document: dict[str, Any], demo_models_dir: Path, tmp_path: Path
) -> None:
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    registered = registered_routes(demo_models_dir, tmp_path)
    assert registered - documented == set(), "routes missing from /openapi.json"
    assert documented - registered == set(), "documented routes the app does not serve"
    for expected in [("POST", "/predict"), ("POST", "/invocations"), ("GET", "/metrics"), ("GET", "/docs")]:
        assert expected in documented


def test_the_document_is_valid_openapi_3_1(docs_server: ServerProc, document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    schemathesis.openapi.from_url(docs_server.url("/openapi.json")).validate()
    broken = {**document, "paths": {"/predict": {"post": {"responses": {"200": {}}}}}}  # a response needs a description
    with pytest.raises(Exception, match="description"):
        schemathesis.openapi.from_dict(broken).validate()


def test_the_document_describes_bodies_errors_and_auth(document: dict[str, Any]) -> None:
    paths, schemas = document["paths"], document["components"]["schemas"]
    predict = paths["/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/PredictRequest"} and body["example"]["features"]
    assert schemas["PredictRequest"]["required"] == ["features"]
    assert predict["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    image = paths["/predict/image"]["post"]["requestBody"]["content"]
    assert image["multipart/form-data"]["schema"]["properties"]["file"] == {"type": "string", "format": "binary"}
    assert image["image/png"]["schema"] == {"type": "string", "format": "binary"}
    invocations = paths["/invocations"]["post"]
    assert set(invocations["requestBody"]["content"]) == {"application/json", "text/csv"}
    error = invocations["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/MlflowErrorResponse")
    assert set(schemas["MlflowErrorResponse"]["required"]) == {"error_code", "message"}
    assert {p["name"] for p in invocations["parameters"]} == {"model", "version", "user_id"}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(paths["/health/ready"]["get"]["responses"]) == {"200", "503"}
    activate = paths["/models/{name}/versions/{version}/activate"]["post"]
    assert [p["name"] for p in activate["parameters"]] == ["name", "version"]
    assert activate["security"] == [{"adminToken": []}]
    assert {"401", "403"} <= set(activate["responses"])
    assert document["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    assert "security" not in paths["/models"]["get"] and "security" not in paths["/openapi.json"]["get"]


# -- fuzzing the live server from its own document ------------------------------------------------------


def built_document() -> dict[str, Any]:
    """The document as ``create_app`` builds it, here in the test process: schemathesis needs it when
    it makes the tests, before any server runs. The test below checks the server serves this one."""
    return openapi([*documented(), *DOCS])


FUZZ_CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "phases": {"stateful": {"enabled": False}},
        "request-timeout": 30,
    }
)
fuzzed = schemathesis.openapi.from_dict(built_document(), config=FUZZ_CONFIG)
# Raw image bodies of the types schemathesis has no serializer for go as the bytes it generated, as
# it sends image/png's.
schemathesis.serializer.alias(["image/bmp", "image/x-ms-bmp", "image/tiff"], "application/octet-stream")


def test_the_server_serves_the_document_the_fuzzer_reads(document: dict[str, Any]) -> None:
    assert document == built_document()


ROW = [5.1, 3.5, 1.4, 0.2]
IRIS = {"name": "iris_classifier"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = "application/json"
V1, V2 = {**IRIS, "version": "v1"}, {**IRIS, "version": "v2"}
VERSION = "/models/{name}/versions/{version}"
EXPERIMENT = "/models/{name}/experiment"
TOUR: list[tuple[str, str, dict[str, Any], int]] = [
    ("GET", "/models", {}, 200),
    ("GET", "/models/{name}/versions", {"path_parameters": IRIS}, 200),
    ("POST", "/predict", {"body": {"features": ROW}}, 200),
    ("POST", "/predict", {"body": {"features": ROW, "model_version": "v9"}}, 404),
    ("POST", "/predict/ab", {"body": {"features": ROW}, "query": {"user_id": "alice"}}, 200),
    ("POST", "/predict/batch", {"body": {"samples": [ROW, ROW]}}, 200),
    ("POST", "/invocations", {"body": {"dataframe_split": {"data": [ROW]}}, "media_type": JSON}, 200),
    ("POST", "/invocations", {"body": {"instances": [{"a": 1.0}]}, "media_type": JSON}, 422),
    ("POST", "/invocations", {"body": "a,b,c,d\n5.1,3.5,1.4,0.2\n", "media_type": "text/csv"}, 200),
    ("POST", f"{VERSION}/load", {"path_parameters": V1, "headers": ADMIN}, 200),
    ("POST", f"{VERSION}/activate", {"path_parameters": V2, "headers": ADMIN}, 200),
    ("POST", f"{VERSION}/unload", {"path_parameters": V2, "headers": ADMIN}, 409),
    ("POST", f"{VERSION}/activate", {"path_parameters": V2}, 401),
    ("PUT", EXPERIMENT, {"path_parameters": IRIS, "headers": ADMIN, "body": {
        "variants": {"v1": 0.5, "v2": 0.5}, "shadow": {"version": "v1", "fraction": 1.0}}}, 200),
    ("GET", EXPERIMENT, {"path_parameters": IRIS}, 200),
    ("POST", "/predict", {"body": {"features": ROW, "user_id": "bob"}}, 200),
    ("DELETE", EXPERIMENT, {"path_parameters": IRIS, "headers": ADMIN}, 200),
    ("GET", EXPERIMENT, {"path_parameters": IRIS}, 404),
    ("POST", "/models/rescan", {"headers": ADMIN}, 200),
    ("GET", "/health/live", {}, 200),
    ("GET", "/health/ready", {}, 200),
    ("GET", "/ping", {}, 200),
    ("GET", "/health", {}, 200),
    ("GET", "/version", {}, 200),
    ("GET", "/metrics", {}, 200),
    ("GET", "/openapi.json", {}, 200),
    ("GET", "/docs", {}, 200),
    ("GET", "/docs/static/{name}", {"path_parameters": {"name": "swagger-ui.css"}}, 200),
    ("GET", "/docs/static/{name}", {"path_parameters": {"name": "index.html"}}, 404),
]
"""Calls that succeed (and a few that fail) on the demo models, so every documented answer, not only
the errors random input finds, is checked against its schema; the admin calls leave the server as
they found it (v2 active, both versions loaded, no experiment)."""


def test_known_calls_answer_as_documented(docs_server: ServerProc) -> None:
    toured = {(method, path) for method, path, _, _ in TOUR}
    for method, path, fields, status in TOUR:
        response = fuzzed[path][method].Case(**fields).call_and_validate(base_url=docs_server.base_url)
        assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text[:500]}"
    paths = built_document()["paths"]
    untoured = {(method.upper(), path) for path, item in paths.items() for method in item} - toured
    # The demo has no image model; the Open Inference Protocol's answers are toured by tests/test_v2.py,
    # and fuzzed below like every route.
    untoured -= {("POST", "/predict/image"), *((method, path) for method, path in untoured if path.startswith("/v2"))}
    assert untoured == set(), "give each new route a call here"


def test_a_value_beyond_float32_is_refused_before_it_is_batched(docs_server: ServerProc) -> None:
    """The fuzzer's first find: 3.3e72 is a finite float64, but the forest computes in float32, so it
    raised (500), and would have failed every call batched with it. Now it is a 422 naming the value."""
    huge = [5.1, 3.5, 3.2898292626133446e72, 0.2]
    calls = [
        ("/predict", {"json": {"features": huge}}, "$.features[2]"),
        ("/predict/batch", {"json": {"samples": [ROW] * 12 + [[-1e39, *ROW[1:]]]}}, "$.samples[12][0]"),
        ("/invocations", {"json": {"instances": [ROW, huge]}}, "$.instances[1][2]"),
        # A few rows are checked through their float64 sums: two finite values whose sum overflows.
        ("/predict", {"json": {"features": [1e308, 1e308, 1.0, 1.0]}}, "$.features[0]"),
    ]
    for path, body, where in calls:
        reply = requests.post(docs_server.url(path), timeout=10, **body)
        assert reply.status_code == 422, f"{path}: {reply.status_code} {reply.text}"
        assert "float32" in reply.text and where in reply.text, reply.text
    assert requests.post(docs_server.url("/predict"), json={"features": ROW}, timeout=10).status_code == 200


@fuzzed.parametrize()
@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzzed_calls_answer_as_documented(case: schemathesis.Case, docs_server: ServerProc) -> None:
    case.call_and_validate(base_url=docs_server.base_url)


# -- the docs page in a real browser ----------------------------------------------------------------


def chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def browse(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium, headless, given 10 s of virtual time so Swagger UI fetches the document and renders."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args, url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


class _Text(HTMLParser):
    """The text a person reads: no scripts or styles, no zero-width spaces (Swagger UI breaks paths with them)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)

    def text(self) -> str:
        return re.sub(r"[\u200b\u00ad]", "", "".join(self.parts))


def test_the_docs_page_renders_every_route_in_a_browser(
    docs_server: ServerProc, document: dict[str, Any], tmp_path: Path
) -> None:
    chromium()
    for name in STATIC_FILES:
        assert requests.get(docs_server.url(f"/docs/static/{name}"), timeout=10).status_code == 200, name
    missing = requests.get(docs_server.url("/docs/static/index.html"), timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]
    page = requests.get(docs_server.url("/docs"), timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    urls = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert urls and not [url for url in urls if re.match(r"[a-z]+:|//", url)], f"the page loads from elsewhere: {urls}"

    dom = browse(docs_server.url("/docs"), tmp_path / "profile", "--dump-dom").stdout
    parser = _Text()
    parser.feed(dom)
    text = parser.text()
    assert "Unable to render" not in text, text[:2000]
    assert "mlserve" in text, text[:2000]
    for path in ("/predict", "/invocations", "/models/{name}/versions/{version}/activate"):
        assert path in text, f"{path} is not on the page:\n{text[:4000]}"
    shown = [path for path in document["paths"] if path not in text]
    assert shown == [], f"documented paths missing from the page: {shown}"

    screenshot = tmp_path / "docs.png"
    browse(docs_server.url("/docs"), tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000")
    assert screenshot.is_file() and screenshot.stat().st_size > 20_000, "the screenshot is missing or blank"
    assert screenshot.read_bytes().startswith(b"\x89PNG")
