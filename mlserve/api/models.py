"""Read-only model listing: ``GET /models`` and ``GET /models/{name}/versions``; open to everyone."""

from __future__ import annotations

import msgspec
from aiohttp import web

from mlserve.api.errors import guard
from mlserve.api.http import respond
from mlserve.api.keys import CONTROL, REGISTRY
from mlserve.api.routedoc import RouteDoc
from mlserve.errors import ModelNotFound
from mlserve.registry import Registry
from mlserve.schemas import CacheInfo, ModelInfo, ModelsResponse, ModelVersionInfo, SourceStatus


def describe(registry: Registry, model: str, source: SourceStatus | None = None) -> ModelInfo:
    active = registry.active(model)
    infos = [
        ModelVersionInfo(
            name=model,
            version=version,
            state=served.state,
            active=version == active,
            framework=served.spec.metadata.framework,
            created_at=served.spec.metadata.created_at,
            accuracy=served.spec.metadata.accuracy,
            input_shape=served.spec.metadata.input_shape,
            class_labels=served.spec.metadata.class_labels,
            description=served.spec.metadata.description,
            batching={**msgspec.structs.asdict(served.batching), "executor": served.executor},
            inputs="image" if served.takes_images else "features",
            path=served.spec.directory,
            cache=CacheInfo(enabled=served.cache is not None, ttl_s=served.cache.ttl_s if served.cache else None),
            error=served.error,
            mlflow=served.spec.mlflow,
        )
        for version, served in registry.versions(model).items()
    ]
    return ModelInfo(name=model, active_version=active, versions=infos, source=source)


def _sources(request: web.Request) -> dict[str, SourceStatus]:
    """What each MLflow-sourced model's source last said; such a model is listed even while it has
    no version (its registry could not be reached at start), so the listing says why."""
    return {model: source.status for model, source in request.app[CONTROL].sources.items()}


async def list_models(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    sources = _sources(request)
    names = sorted(set(registry.models()) | set(sources))
    return respond(ModelsResponse(models=[describe(registry, name, sources.get(name)) for name in names]))


async def list_versions(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    registry = request.app[REGISTRY]
    sources = _sources(request)
    if name not in registry.models() and name not in sources:
        raise ModelNotFound(f"unknown model {name!r}")
    return respond(describe(registry, name, sources.get(name)))


DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("GET", "/models", "Every model, its versions with their metadata and state, and the active version",
             response=ModelsResponse, tag="models"),
    RouteDoc("GET", "/models/{name}/versions", "One model's versions", response=ModelInfo, errors=(404,), tag="models"),
)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/models", guard(list_models), name="models")
    app.router.add_get("/models/{name}/versions", guard(list_versions), name="model_versions")
