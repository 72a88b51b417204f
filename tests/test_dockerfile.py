"""Static checks of the Dockerfile: it cannot be built here (no Docker engine), so check what can be.

Every file it copies exists, the command it runs is a console script the package installs, and the
settings it sets through the environment are real settings.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from mlserve.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_copied_sources_exist() -> None:
    copies = [shlex.split(args)[:-1] for op, args in instructions() if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source


def test_entrypoint_is_an_installed_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = [args for op, args in instructions() if op == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1].startswith('["mlserve"')
    assert "mlserve" in scripts


def test_environment_is_valid_settings() -> None:
    env: dict[str, str] = {}
    for op, args in instructions():
        if op == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(args))
    settings = load_settings(env={k: v for k, v in env.items() if k.startswith("MLSERVE_")})
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)


def test_torch_pins_match_the_project() -> None:
    """torch is installed first from its CPU index; its pins must be the project's, or pip reinstalls."""
    text = (ROOT / "Dockerfile").read_text()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        pinned = next(d for d in dependencies if re.match(rf"{package}\s*==", d))
        assert re.search(rf"\b{package}=={re.escape(pinned.split('==')[1].strip())}\b", text), package
