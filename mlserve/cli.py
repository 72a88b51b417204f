"""``mlserve serve`` and ``mlserve models``.

Kept light at import time: worker processes are spawned, and a spawned child re-imports the parent's
main module, so anything heavy imported here would be paid again by every worker.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mlserve.errors import MlserveError, SettingsError
from mlserve.settings import load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlserve", description="Serve scikit-learn, PyTorch and MLflow models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve every model version in the repository")
    serve.add_argument("--host", help="address to listen on (MLSERVE_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (MLSERVE_PORT; default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (MLSERVE_WORKERS; default: one per core)")
    serve.add_argument(
        "--frontends",
        type=_frontends,
        help="front-end processes sharing the port, splitting the workers between them (MLSERVE_FRONTENDS; "
        "default 1; auto: one per core the workers leave free)",
    )
    serve.add_argument(
        "--model",
        action="append",
        metavar="PATH_OR_URI",
        help="serve one model: a directory holding one model file, as KServe lays out /mnt/models (a scikit-learn "
        "*.joblib or *.pkl; a TorchScript *.pt or *.pth, with a model.toml giving its input_shape), a local MLflow "
        "model directory, models:/NAME@ALIAS (followed as the alias moves) or models:/NAME/VERSION; may be "
        "repeated. Only these are served, unless --models-dir is given too",
    )
    serve.add_argument(
        "--model-name",
        metavar="NAME",
        help="the name to serve a single --model as (default: its directory's name, or its registry name)",
    )
    models = commands.add_parser("models", help="train the bundled demo models into the repository")
    models.add_argument("--force", action="store_true", help="retrain versions that already exist")
    models.add_argument(
        "--mlflow",
        metavar="TRACKING_URI",
        help="instead, log the iris versions to this MLflow registry as versions 1 and 2 of 'iris', @champion on 1",
    )
    for command in (serve, models):
        command.add_argument("--config", help="TOML settings file (MLSERVE_CONFIG)")
        command.add_argument("--models-dir", help="model repository (MLSERVE_MODELS_DIR; default ./models)")
    return parser


def _frontends(value: str) -> int:
    """``--frontends``: a count, or ``auto`` (the setting's 0)."""
    if value == "auto":
        return 0
    count = int(value)
    if count < 1:
        raise argparse.ArgumentTypeError("--frontends takes a count of at least 1, or auto")
    return count


def _sources(uris: list[str], name: str | None) -> dict[str, dict[str, str]]:
    """The ``[models.NAME] source`` settings that ``--model`` and ``--model-name`` stand for.

    A bare model directory is read here, estimator and all, so one that cannot be served stops the
    server before it starts: its source reads it again once the server runs, and a sourced model
    that fails there only makes that model unavailable, not the server unready.
    """
    from mlserve.repository import valid_name
    from mlserve.sources.bare import bare_spec, is_bare
    from mlserve.sources.mlflow import LOCAL_VERSION, parse, served_name

    if name is not None and len(uris) != 1:
        raise SettingsError("--model-name names the model of a single --model; with several, each keeps its own name")
    if name is not None and not valid_name(name):
        raise SettingsError(f"--model-name {name!r} is not a valid model name")
    sources: dict[str, dict[str, str]] = {}
    for uri in uris:
        served = name or served_name(uri)
        if served in sources:
            raise SettingsError(f"--model {sources[served]['source']} and --model {uri} are both named {served!r}")
        path = parse(uri).path
        if path is not None and is_bare(Path(path)):
            bare_spec(served, LOCAL_VERSION, Path(path))
        sources[served] = {"source": uri}
    return sources


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {"models_dir": args.models_dir}
    try:
        if args.command == "serve":
            overrides |= {"host": args.host, "port": args.port, "workers": args.workers, "frontends": args.frontends}
            if args.model or args.model_name is not None:
                overrides["models"] = _sources(args.model or [], args.model_name)
                if args.models_dir is None:
                    overrides["models_dir"] = ""
        settings = load_settings(args.config, overrides=overrides)
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
        if args.command == "models" and args.mlflow:
            from mlserve.demo_models import log_iris_to_mlflow

            versions = log_iris_to_mlflow(args.mlflow)
            print(f"registered iris versions {', '.join(versions)} in {args.mlflow}; iris@champion is {versions[0]}")
            return 0
        if args.command == "models":
            from mlserve.demo_models import train_digits, train_iris

            trained = train_iris(settings.models_dir, force=args.force)
            trained += train_digits(settings.models_dir, force=args.force)
            print("\n".join(f"trained {key}" for key in trained) or f"demo models already in {settings.models_dir}")
            return 0
        from mlserve.app import run

        if settings.frontend_count > 1:
            from mlserve.frontends import supervise

            return supervise(settings, run)
        run(settings)
        return 0
    except MlserveError as exc:
        print(f"mlserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
