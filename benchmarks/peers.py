"""The peer, MLServer 1.7.1, served the same iris models so users can compare for themselves.

Why a virtualenv of its own (``make bench-peers`` makes ``.venv-peers``): MLServer pins versions of
FastAPI, uvicorn and uvloop that have nothing to do with mlserve, and its workers need
``uvloop==0.21.0``. Its scikit-learn is pinned to ours so it unpickles the very same joblib files.
Each scenario gets a fresh MLServer repository holding one model with adaptive batching on and as
many parallel workers as mlserve gets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.scenarios import Scenario
from benchmarks.servers import HOST, REPO_ROOT, free_port

VENV = REPO_ROOT / ".venv-peers"
# Adaptive batching as MLServer documents it: up to 64 requests a batch, waiting at most 2 ms.
MAX_BATCH_SIZE = 64
MAX_BATCH_TIME_S = 0.002


def command(venv: Path = VENV) -> Path | None:
    """The peer's ``mlserver`` command, or None when ``make bench-peers`` has not made its venv."""
    path = venv / "bin" / "mlserver"
    return path if path.exists() else None


def argv(
    mlserver: Path, scenario: Scenario, models_dir: Path, workdir: Path, port: int, workers: int
) -> list[str]:
    """Write the peer's repository for ``scenario`` into ``workdir``; its command line."""
    repo = workdir / scenario.name
    model_dir = repo / scenario.peer_model
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(models_dir / scenario.model / scenario.version / "model.joblib", model_dir)
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": scenario.peer_model,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_TIME_S,
    }))
    (repo / "settings.json").write_text(json.dumps({
        "host": HOST,
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": workers,
        "debug": False,
    }))
    return [str(mlserver), "start", str(repo)]
