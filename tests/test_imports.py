"""Every module imports on its own in a fresh interpreter, so an import cycle fails here first.

The CLI must stay light: spawned workers re-import the parent's main module, so anything heavy it
imports at module level is paid again by every worker.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import mlserve

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(mlserve.__path__, prefix="mlserve.") if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=120)


def test_cli_and_worker_import_no_heavy_libraries() -> None:
    code = (
        "import sys, mlserve.cli, mlserve.worker\n"
        "heavy = {'numpy', 'aiohttp', 'sklearn', 'torch', 'mlflow'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
