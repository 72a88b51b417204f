"""An MLflow registry of the run's own, for the scenarios that serve a model from one.

Built once a run, and only when a chosen scenario needs it (MLflow's first use costs ~20 s): a sqlite
database, its artifacts and the servers' download cache in one temp dir, removed at the end. It holds
the disk repository's iris estimators as versions "1" and "2" of ``iris``
(``mlserve.demo_models.log_iris_to_mlflow``), the alias ``champion`` on "1". They are logged in a
subprocess, so MLflow never loads into the harness.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from benchmarks.scenarios import IRIS, REGISTRY_ALIAS, REGISTRY_MODEL
from benchmarks.servers import run_logged

_LOG = (
    "import sys; from mlserve.demo_models import log_iris_to_mlflow; "
    "print('registry versions', log_iris_to_mlflow(*sys.argv[1:4], artifact_location=sys.argv[4]))"
)


class MlflowRegistry:
    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mlserve-bench-mlflow-"))

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'mlflow.db'}"

    def build(self, log_path: Path) -> float:
        """Log the iris versions; returns seconds taken. Raises ``ServerStartError`` on failure."""
        argv = [sys.executable, "-c", _LOG, self.tracking_uri, REGISTRY_MODEL, REGISTRY_ALIAS,
                str(self.workdir / "artifacts")]
        return run_logged(argv, log_path, "logging the iris versions to MLflow")

    def settings(self, model: str, version: str, models_dir: Path) -> str:
        """The TOML settings that serve ``model`` from ``models:/MODEL@champion``, with the batching
        knobs of the disk version its ``version`` was logged from ("1" is v1), so that it is batched
        as that one is."""
        with (models_dir / IRIS / f"v{version}" / "model.toml").open("rb") as fh:
            batching = tomllib.load(fh).get("batching", {})
        lines = [
            f"mlflow_tracking_uri = {json.dumps(self.tracking_uri)}",
            f"mlflow_cache_dir = {json.dumps(str(self.workdir / 'cache'))}",
            "",
            f"[models.{model}]",
            f'source = "models:/{model}@{REGISTRY_ALIAS}"',
            "",
            f"[models.{model}.batching]",
            *(f"{knob} = {json.dumps(value)}" for knob, value in batching.items()),
        ]
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
