"""Offline compute ceiling: how many rows/s the model itself can predict.

Why: served throughput means little without knowing what the model costs with
no HTTP, no JSON and no queueing.  We load the same files the server loads, in
a plain separate Python process (no event loop) with one thread, as one worker
has, and time ``predict`` at batch 1 and batch 32.  Batch 32 is the ceiling a
batching server could approach; batch 1 is what an unbatched one pays.  For
the image model the timed call is the worker's whole pipeline (PNG decode,
transforms, CNN) on distinct PNGs; the CNN alone is reported beside it.

Run standalone: ``python -m benchmarks.offline --models-dir DIR [--seconds 2]``
prints one JSON object.  The harness calls :func:`measure`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.scenarios import IMAGES, IRIS, IRIS_RANGES

VERSIONS = ("v1", "v2")
BATCHES = (1, 32)


def _unwrap(obj: Any) -> Any:
    """Accept a bare estimator or a dict bundle holding one under a common key."""
    if hasattr(obj, "predict"):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "estimator", "pipeline", "clf"):
            if hasattr(obj.get(key), "predict"):
                return obj[key]
    raise TypeError(f"no predict() on loaded object of type {type(obj).__name__}")


def time_predict(model: Any, batch: int, seconds: float, pool: Any) -> dict[str, float]:
    """Call ``predict`` on fresh slices of ``pool`` for ~``seconds``; return rates."""
    n_rows = len(pool)
    for i in range(3):  # warm-up: first calls pay lazy init / thread-pool spin-up
        model.predict(pool[i * batch % (n_rows - batch) :][:batch])
    calls = 0
    offset = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        model.predict(pool[offset : offset + batch])
        calls += 1
        offset = (offset + batch) % (n_rows - batch)
        now = time.perf_counter()
        if now >= deadline and calls >= 5:
            break
    elapsed = now - start
    return {
        "batch": batch,
        "calls": calls,
        "seconds": round(elapsed, 4),
        "ms_per_call": round(1000.0 * elapsed / calls, 4),
        "rows_per_s": round(batch * calls / elapsed, 1),
    }


def run(models_dir: Path, seconds: float) -> dict[str, Any]:
    """Measure every version found in ``models_dir``; missing ones are reported."""
    import joblib

    rng = np.random.default_rng(1234)
    lo = np.array([r[0] for r in IRIS_RANGES])
    hi = np.array([r[1] for r in IRIS_RANGES])
    pool = np.round(lo + (hi - lo) * rng.random((4096, 4)), 3)

    result: dict[str, Any] = {"seconds_per_point": seconds, "threads": 1, "models": {}}
    for version in VERSIONS:
        key = f"{IRIS}:{version}"
        path = models_dir / IRIS / version / "model.joblib"
        if not path.exists():
            result["models"][key] = {"error": f"missing {path}"}
            continue
        t0 = time.perf_counter()
        model = _unwrap(joblib.load(path))
        entry: dict[str, Any] = {
            "path": str(path),
            "estimator": type(model).__name__,
            "load_s": round(time.perf_counter() - t0, 3),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # feature-name warnings etc. are noise here
            for batch in BATCHES:
                entry[f"batch_{batch}"] = time_predict(model, batch, seconds, pool)
        result["models"][key] = entry
    result["models"][f"{IMAGES}:v1"] = _images(models_dir, seconds)
    return result


def _images(models_dir: Path, seconds: float) -> dict[str, Any]:
    from mlserve import repository, runtimes
    from mlserve.images import ImageClassifier
    from mlserve.settings import WorkerOptions

    from benchmarks import imageset

    spec = next((s for s in repository.scan(models_dir) if s.key == f"{IMAGES}:v1"), None)
    if spec is None or spec.metadata.image is None:
        return {"error": f"no {IMAGES}:v1 in {models_dir}"}
    t0 = time.perf_counter()
    options = WorkerOptions(threads=1, device="cpu")
    runtime = runtimes.load(spec, options)
    pipeline = ImageClassifier(runtime, spec.metadata.image, options.max_image_pixels)
    entry: dict[str, Any] = {
        "path": spec.artifact_path,
        "estimator": "decode + transforms + CNN",
        "load_s": round(time.perf_counter() - t0, 3),
    }
    pngs = imageset.pngs(2048)
    for batch in BATCHES:
        entry[f"batch_{batch}"] = time_predict(pipeline, batch, seconds, pngs)
    tensors = np.zeros((2048, *spec.metadata.input_shape), dtype=np.float32)
    entry["cnn_only_batch_32"] = time_predict(runtime, 32, seconds, tensors)
    return entry


def measure(models_dir: Path, seconds: float, timeout: float = 300.0) -> dict[str, Any]:
    """Run :func:`run` in a fresh interpreter so harness state cannot skew it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.offline",
            "--models-dir",
            str(models_dir),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        return {"error": f"offline rc={proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Offline predict() throughput ceiling.")
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.models_dir, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
