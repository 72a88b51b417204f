"""The module table of DESIGN.md, as built: each module imports only the modules listed for it.

A module that reaches past its layer (the data plane importing the control plane, a core module
importing the HTTP layer, routing doing I/O) fails here, not in review. Imports inside functions and
under ``TYPE_CHECKING`` count too. Where this table differs from DESIGN.md's, the closing note of the
issue that made it says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mlserve

PACKAGE = Path(mlserve.__file__).parent

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "experiments": {"errors"},
    "schemas": {"experiments"},
    "metrics": set(),
    "settings": {"errors"},
    "repository": {"errors", "schemas"},
    "ipc": {"repository"},
    "runtimes": {"repository", "settings"},
    "runtimes.sklearn": {"repository", "schemas", "settings"},
    "runtimes.torch": {"repository", "schemas", "settings"},
    "runtimes.mlflow": {"repository", "runtimes.sklearn", "schemas", "settings"},
    "sources": set(),
    "sources.bare": {"errors", "repository", "schemas"},
    "sources.mlflow": {"errors", "repository", "schemas", "sources.bare"},
    "images": {"errors", "runtimes", "schemas"},
    "worker": {"images", "ipc", "repository", "runtimes", "settings"},
    "pool": {"errors", "ipc", "repository", "settings", "worker"},
    "inline": {"errors", "ipc", "repository", "settings", "worker"},
    "batcher": {"errors"},
    "redislink": set(),
    "sharedtable": set(),
    "cache": {"batcher", "errors", "redislink", "settings", "sharedtable"},
    "registry": {"batcher", "cache", "errors", "experiments", "metrics", "repository", "schemas", "settings"},
    "routing": {"errors", "experiments", "registry"},
    "state": {"errors", "experiments", "settings"},
    "control": {
        "batcher", "cache", "errors", "experiments", "inline", "metrics", "pool", "registry", "repository", "settings",
        "sources.mlflow", "state",
    },
    "loopload": set(),
    "shadow": {"batcher", "errors", "experiments", "loopload", "metrics", "registry"},
    "service": {"batcher", "cache", "errors", "experiments", "loopload", "metrics", "registry", "routing", "shadow"},
    "predictionlog": {"errors", "settings"},
    "digits_cnn": set(),
    "demo_models": {"digits_cnn", "repository", "runtimes", "schemas"},
    "api": set(),
    "api.keys": {
        "batcher", "cache", "control", "loopload", "metrics", "pool", "predictionlog", "registry", "service",
        "settings", "siblings",
    },
    "api.errors": {"api.keys", "errors", "metrics", "schemas"},
    "api.logged": {"api.errors", "api.keys", "batcher", "predictionlog", "registry", "schemas", "service"},
    "api.http": {"api.errors", "api.keys", "batcher", "errors", "schemas"},
    "api.uploads": {"errors", "images"},
    "api.routedoc": set(),
    "api.docs": {"api.errors", "api.routedoc", "api.uploads", "schemas"},
    "api.health": {"api.errors", "api.http", "api.keys", "api.routedoc", "schemas"},
    "api.models": {"api.errors", "api.http", "api.keys", "api.routedoc", "errors", "registry", "schemas"},
    "api.admin": {"api.errors", "api.http", "api.keys", "api.routedoc", "control", "errors", "settings"},
    "api.predict": {
        "api.errors", "api.http", "api.keys", "api.logged", "api.routedoc", "api.uploads", "batcher", "errors", "metrics",
        "registry", "schemas", "service",
    },
    "api.experiments": {
        "api.admin", "api.errors", "api.http", "api.keys", "api.routedoc", "errors", "experiments", "schemas",
        "siblings",
    },
    "api.invocations": {
        "api.errors", "api.http", "api.keys", "api.predict", "api.routedoc", "errors", "metrics", "schemas", "service",
    },
    "api.v2": {
        "api.admin", "api.errors", "api.http", "api.keys", "api.predict", "api.routedoc", "batcher", "control", "errors", "metrics",
        "registry", "service", "settings",
    },
    "app": {
        "api", "api.errors", "api.keys", "api.routedoc", "cache", "connections", "control", "loopload", "metrics",
        "pool", "predictionlog", "registry", "service", "settings", "sharedtable", "siblings", "state",
    },
    "connections": {"schemas", "settings"},
    "metricsmerge": set(),
    "siblings": {"metrics", "metricsmerge"},
    "frontends": {"settings", "siblings"},
    "cli": {"app", "demo_models", "errors", "frontends", "repository", "settings", "sources.bare", "sources.mlflow"},
    "": set(),
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlserve":
            if node.module == "mlserve":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.removeprefix("mlserve."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("mlserve.") for a in node.names if a.name.startswith("mlserve.")}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_imports_only_what_its_layer_allows(path: Path) -> None:
    name = module_name(path)
    assert name in ALLOWED, f"mlserve.{name} is new: give it a row in this table (and in DESIGN.md's)"
    extra = imports_of(path) - ALLOWED[name]
    assert not extra, f"mlserve.{name} imports {sorted(extra)}, outside its layer"


def test_the_data_plane_never_reaches_the_control_plane_or_the_http_layer() -> None:
    for name in ("service", "routing", "registry", "batcher", "cache"):
        assert not {"control", "state", "pool", "app"} & ALLOWED[name], name
    for name, allowed in ALLOWED.items():
        if not name.startswith("api") and name not in ("app", "cli", "__main__"):
            assert not any(a.startswith("api") or a == "app" for a in allowed), name
