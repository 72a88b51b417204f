"""Traffic experiments: ``PUT``, ``GET`` and ``DELETE /models/{name}/experiment``.

Setting and ending one needs the admin token, as every change does; reading one is open, like
``/models``. The document's checks live in ``mlserve.experiments`` and the control plane; this module
only decodes and encodes. With several front ends, ``GET`` adds up every front end's counts, so it
describes the whole server whichever front end answers (``?scope=frontend``: the one alone).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from mlserve import experiments
from mlserve.api.admin import admin, finish
from mlserve.api.errors import guard
from mlserve.api.http import decode, respond
from mlserve.api.keys import CONTROL, REGISTRY, ROLE, SERVICE
from mlserve.api.routedoc import RouteDoc
from mlserve.errors import ModelNotFound
from mlserve.experiments import Experiment
from mlserve.siblings import ONE_FRONTEND, ask_siblings
from mlserve.schemas import ExperimentView

_view_decoder = msgspec.json.Decoder(ExperimentView)


def _view(request: web.Request, model: str, experiment: Experiment) -> ExperimentView:
    """The experiment with this front end's counts."""
    service = request.app[SERVICE]
    return ExperimentView(
        model=model,
        variants=experiment.variants,
        salt=experiment.salt,
        shadow=experiment.shadow,
        assigned=service.assigned(model, experiment),
        shadow_results=service.shadow.counts(model) if experiment.shadow is not None else {},
    )


async def _whole_server(request: web.Request, view: ExperimentView) -> ExperimentView:
    """``view`` with every sibling front end's counts added, from those already running the same
    experiment (one that has not yet seen a change counts for the experiment it runs)."""
    role = request.app.get(ROLE)
    if role is None or request.query.get("scope") == ONE_FRONTEND:
        return view
    for body in await ask_siblings(role, request.path):
        try:
            other = _view_decoder.decode(body)
        except msgspec.DecodeError:
            continue
        if (other.variants, other.salt, other.shadow) == (view.variants, view.salt, view.shadow):
            _add(view.assigned, other.assigned)
            _add(view.shadow_results, other.shadow_results)
    return view


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


async def set_experiment(request: web.Request) -> web.Response:
    model = request.match_info["name"]
    experiment = decode(experiments.decoder, await request.read())
    return respond(_view(request, model, await finish(request.app[CONTROL].set_experiment(model, experiment))))


async def show_experiment(request: web.Request) -> web.Response:
    model = request.match_info["name"]
    registry = request.app[REGISTRY]
    if model not in registry.models():
        raise ModelNotFound(f"unknown model {model!r}")
    experiment = registry.experiment(model)
    if experiment is None:
        raise ModelNotFound(f"model {model!r} has no experiment")
    return respond(await _whole_server(request, _view(request, model, experiment)))


async def end_experiment(request: web.Request) -> web.Response:
    model = request.match_info["name"]
    return respond(_view(request, model, await finish(request.app[CONTROL].end_experiment(model))))


PATH = "/models/{name}/experiment"
DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("PUT", PATH, "Start or replace the model's traffic experiment", Experiment, response=ExperimentView,
             errors=(400, 404, 422, 503), admin=True, tag="experiments",
             example={"variants": {"v1": 0.8, "v2": 0.2}, "salt": "spring-test"}),
    RouteDoc("GET", PATH, "The running experiment and this replica's counts (every front end's)",
             response=ExperimentView, errors=(404,), tag="experiments"),
    RouteDoc("DELETE", PATH, "End the experiment: calls go to the active version again", response=ExperimentView,
             errors=(404, 503), admin=True, tag="experiments"),
)


def add_routes(app: web.Application) -> None:
    path = PATH
    app.router.add_put(path, admin(set_experiment), name="set_experiment")
    app.router.add_get(path, guard(show_experiment), name="experiment")
    app.router.add_delete(path, admin(end_experiment), name="end_experiment")
