"""Traffic experiments: ``PUT``, ``GET`` and ``DELETE /models/{name}/experiment``.

Setting and ending one needs the admin token, as every change does; reading one is open, like
``/models``. The document's checks live in ``mlserve.experiments`` and the control plane; this module
only decodes and encodes.
"""

from __future__ import annotations

from aiohttp import web

from mlserve import experiments
from mlserve.api.admin import admin, finish
from mlserve.api.errors import guard
from mlserve.api.http import decode, respond
from mlserve.api.keys import CONTROL, REGISTRY, SERVICE
from mlserve.api.routedoc import RouteDoc
from mlserve.errors import ModelNotFound
from mlserve.experiments import Experiment
from mlserve.schemas import ExperimentView


def _view(request: web.Request, model: str, experiment: Experiment) -> web.Response:
    service = request.app[SERVICE]
    return respond(
        ExperimentView(
            model=model,
            variants=experiment.variants,
            salt=experiment.salt,
            shadow=experiment.shadow,
            assigned=service.assigned(model, experiment),
            shadow_results=service.shadow.counts(model) if experiment.shadow is not None else {},
        )
    )


async def set_experiment(request: web.Request) -> web.Response:
    model = request.match_info["name"]
    experiment = decode(experiments.decoder, await request.read())
    return _view(request, model, await finish(request.app[CONTROL].set_experiment(model, experiment)))


async def show_experiment(request: web.Request) -> web.Response:
    model = request.match_info["name"]
    registry = request.app[REGISTRY]
    if model not in registry.models():
        raise ModelNotFound(f"unknown model {model!r}")
    experiment = registry.experiment(model)
    if experiment is None:
        raise ModelNotFound(f"model {model!r} has no experiment")
    return _view(request, model, experiment)


async def end_experiment(request: web.Request) -> web.Response:
    model = request.match_info["name"]
    return _view(request, model, await finish(request.app[CONTROL].end_experiment(model)))


PATH = "/models/{name}/experiment"
DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("PUT", PATH, "Start or replace the model's traffic experiment", Experiment, response=ExperimentView,
             errors=(400, 404, 422, 503), admin=True, tag="experiments",
             example={"variants": {"v1": 0.8, "v2": 0.2}, "salt": "spring-test"}),
    RouteDoc("GET", PATH, "The running experiment and this replica's counts", response=ExperimentView,
             errors=(404,), tag="experiments"),
    RouteDoc("DELETE", PATH, "End the experiment: calls go to the active version again", response=ExperimentView,
             errors=(404, 503), admin=True, tag="experiments"),
)


def add_routes(app: web.Application) -> None:
    path = PATH
    app.router.add_put(path, admin(set_experiment), name="set_experiment")
    app.router.add_get(path, guard(show_experiment), name="experiment")
    app.router.add_delete(path, admin(end_experiment), name="end_experiment")
