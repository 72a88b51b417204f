"""``GET /openapi.json`` (OpenAPI 3.1) and ``GET /docs`` (Swagger UI), built once when the app is.

The document is made from the ``DOCS`` tuples the handler modules declare beside their routes
(``app.py`` collects them, so this module imports no handler module): paths and operations from the
``RouteDoc``s, and every schema from the msgspec Structs they name, by
``msgspec.json.schema_components``, so the document says what the decoders and encoders do. The docs
page is Swagger UI from the ``swagger-ui-bundle`` package, served from here: the server needs no
network to show it. Both are open, like the read routes.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec
import swagger_ui_bundle
from aiohttp import web

from mlserve.api.errors import guard, json_error
from mlserve.api.routedoc import JSON, RouteDoc
from mlserve.api.uploads import FIELD, FORM
from mlserve.schemas import ErrorResponse

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{name}"
SECURITY = "adminToken"
PATH_PARAMETER = re.compile(r"\{(\w+)(?::[^}]*)?\}")
TEXT_TYPES = ("text/csv", "text/plain", "text/html")
"""Bodies documented as text; every other non-JSON body (images, octet-stream) as binary."""

SWAGGER_UI = Path(str(swagger_ui_bundle.swagger_ui_path))
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
STATIC_FILES = (
    "swagger-ui.css", "swagger-ui-bundle.js", "favicon-16x16.png", "favicon-32x32.png",
)
"""What the docs page loads from the bundle; nothing else in its directory is served."""

DESCRIPTION = """\
A model server: predictions over feature rows and images, MLflow's scoring protocol, and an admin
API that loads, activates and unloads model versions and runs traffic experiments.

Every error is a JSON object `{"error": "...", "path": "$.features[2]"}` (`path` where a field is
at fault), but MLflow's routes answer MLflow's `{"error_code", "message"}`. A path that no route
serves answers 404, and a known path asked with another method 405 with an `Allow` header, in the
same shape. The admin routes need `Authorization: Bearer <token>` when the server has an admin token
(401 without it), and answer 403 on a server that listens beyond loopback without one.
"""

# Swagger UI 4 (the one swagger-ui-bundle ships) renders OpenAPI 3.0 documents only: the page hands it
# this 3.1 document marked 3.0.3, which it then shows whole (its anyOf-with-null reads as it should).
PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>mlserve API</title>
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="docs/static/favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script>
    fetch("openapi.json").then((response) => response.json()).then((spec) => {
      spec.openapi = "3.0.3";  // Swagger UI 4 refuses the 3.1 version field, not what the document says
      window.ui = SwaggerUIBundle({
        spec: spec,
        dom_id: "#swagger-ui",
        deepLinking: true,
        validatorUrl: null,
        presets: [SwaggerUIBundle.presets.apis],
      });
    });
  </script>
</body>
</html>
"""

DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("GET", "/openapi.json", "This document: every route, with schemas generated from the wire types",
             response_type=JSON, tag="docs"),
    RouteDoc("GET", "/docs", "Swagger UI over this document", response_type="text/html", tag="docs"),
    RouteDoc("GET", "/docs/static/{name}", "The Swagger UI files the docs page loads", errors=(404,),
             response_type="*/*", tag="docs"),
)


def _version() -> str:
    try:
        return importlib.metadata.version("mlserve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def openapi(routes: Iterable[RouteDoc]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``; every Struct they name becomes a component schema."""
    listed = list(routes)
    structs: list[type] = [ErrorResponse]
    for route in listed:
        for struct in (route.request, route.response, route.error):
            if struct is not None and struct not in structs:
                structs.append(struct)
    refs, components = msgspec.json.schema_components(structs, ref_template=REF)
    schema_of = dict(zip(structs, refs))
    paths: dict[str, dict[str, Any]] = {}
    for route in listed:
        path = PATH_PARAMETER.sub(r"{\1}", route.path)
        operations = paths.setdefault(path, {})
        method = route.method.lower()
        if method in operations:
            raise ValueError(f"{route.method} {route.path} is documented twice")
        operations[method] = _operation(route, path, schema_of)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "mlserve", "version": _version(), "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": components},
    }
    tags = list(dict.fromkeys(route.tag for route in listed if route.tag))
    if tags:
        document["tags"] = [{"name": tag} for tag in tags]
    if any(route.admin for route in listed):
        document["components"]["securitySchemes"] = {
            SECURITY: {
                "type": "http",
                "scheme": "bearer",
                "description": "The server's admin token (`admin_token` or `MLSERVE_ADMIN_TOKEN`).",
            }
        }
    return document


def _operation(route: RouteDoc, path: str, schema_of: dict[type, dict[str, Any]]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.method.lower() + re.sub(r"\W+", "_", path.replace("{", "by_")).rstrip("_"),
        "summary": route.summary,
    }
    if route.tag:
        operation["tags"] = [route.tag]
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in PATH_PARAMETER.findall(route.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}} for name in route.query
    ]
    if parameters:
        operation["parameters"] = parameters
    content: dict[str, Any] = {}
    if route.request is not None:
        content[JSON] = {"schema": schema_of[route.request]}
        if route.example is not None:
            content[JSON]["example"] = route.example
    for media in route.request_types:
        content[media] = {"schema": _body_schema(media)}
    if content:
        operation["requestBody"] = {"required": True, "content": content}
    answer = {"schema": schema_of[route.response] if route.response is not None else _body_schema(route.response_type)}
    responses: dict[str, Any] = {
        str(status): {"description": HTTPStatus(status).phrase, "content": {route.response_type: answer}}
        for status in (200, *route.also)
    }
    error = {"schema": schema_of[route.error or ErrorResponse]}
    admin = (401, 403) if route.admin else ()
    for status in sorted({*route.errors, *admin}):
        # An admin refusal comes before the handler, in the server's own shape whatever the protocol.
        body = {"schema": schema_of[ErrorResponse]} if status in admin else error
        responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": {JSON: body}}
        if status == 401:
            responses["401"]["headers"] = {
                "WWW-Authenticate": {"required": True, "schema": {"type": "string"}, "description": "`Bearer`"}
            }
        elif status == 503:
            responses["503"]["headers"] = {
                "Retry-After": {
                    "schema": {"type": "integer"},
                    "description": "Seconds to wait: sent when retrying can help (a full queue, a model still loading)",
                }
            }
    operation["responses"] = responses
    if route.admin:
        operation["security"] = [{SECURITY: []}]
    return operation


def _body_schema(media: str) -> dict[str, Any]:
    if media == FORM:
        return {
            "type": "object",
            "properties": {FIELD: {"type": "string", "format": "binary"}},
            "required": [FIELD],
        }
    if media in TEXT_TYPES:
        return {"type": "string"}
    if media == JSON:
        return {"type": "object"}
    return {"type": "string", "format": "binary"}


def add_routes(app: web.Application, routes: Iterable[RouteDoc]) -> None:
    """``/openapi.json`` of ``routes`` and of these docs routes, the docs page and its files."""
    body = msgspec.json.encode(openapi([*routes, *DOCS]))
    page = PAGE.encode()
    files = {name: SWAGGER_UI / name for name in STATIC_FILES}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"swagger-ui-bundle lacks {', '.join(missing)}")

    async def document(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    async def docs_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = files.get(name)
        if path is None:
            return json_error(404, f"no such docs file: {name}")
        return web.FileResponse(path, headers={"Content-Type": STATIC_TYPES[path.suffix]})

    app.router.add_get("/openapi.json", guard(document), name="openapi")
    app.router.add_get("/docs", guard(docs_page), name="docs")
    app.router.add_get("/docs/static/{name}", guard(static), name="docs_static")
