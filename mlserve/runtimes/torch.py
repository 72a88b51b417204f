"""PyTorch models, saved either way a user brings one: a ``state_dict`` plus the import path of its
``nn.Module`` class, or TorchScript.

A ``state_dict`` is read with ``weights_only=True``, so it cannot run code; TorchScript, like
pickle, is for trusted artifacts only. Inference runs under ``torch.inference_mode()`` with the
worker's thread count set explicitly, on a CUDA device when one is present and the settings allow it.
"""

from __future__ import annotations

import importlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlserve import repository
from mlserve.repository import ModelSpec
from mlserve.schemas import ModelMetadata
from mlserve.settings import WorkerOptions

STATE_DICT = "model.pt"
TORCHSCRIPT = "model.torchscript.pt"


class TorchRuntime:
    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self._module = module
        self._device = device

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device, torch.float32)
            return self._module(inputs).float().cpu().numpy()


def choose_device(wanted: str) -> torch.device:
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch sees no CUDA device")
    return torch.device("cuda")


def module_class(path: str) -> type[torch.nn.Module]:
    module_name, _, class_name = path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None) if class_name else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"module_class {path!r} does not name an nn.Module class (package.module:Class)")
    return cls


def load(spec: ModelSpec, options: WorkerOptions) -> TorchRuntime:
    torch.set_num_threads(options.threads)
    device = choose_device(options.device)
    if spec.metadata.module_class:
        module = module_class(spec.metadata.module_class)()
        module.load_state_dict(torch.load(spec.artifact_path, map_location=device, weights_only=True))
    else:
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is what users bring today.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(spec.artifact_path, map_location=device)
    return TorchRuntime(module.to(device).eval(), device)


def save(
    models_dir: str | Path, module: torch.nn.Module, example: torch.Tensor, name: str, version: str, **metadata: Any
) -> Path:
    """Publish ``module`` both ways: ``model.pt`` (state_dict, served) and ``model.torchscript.pt``.

    ``model.toml`` names the state_dict and the module's class; pointing ``artifact`` at the
    TorchScript file and dropping ``module_class`` serves the same weights without importing the class.
    """
    module = module.eval()
    weights, script = io.BytesIO(), io.BytesIO()
    torch.save(module.state_dict(), weights)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(module, example), script)
    cls = type(module)
    spec = ModelMetadata(
        name=name,
        version=version,
        framework="torch",
        artifact=STATE_DICT,
        module_class=f"{cls.__module__}:{cls.__qualname__}",
        **metadata,
    )
    return repository.write_version(models_dir, spec, {STATE_DICT: weights.getvalue(), TORCHSCRIPT: script.getvalue()})
