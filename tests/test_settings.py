"""Settings precedence and validation: the one place configuration comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlserve.errors import SettingsError
from mlserve.settings import load_settings


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    config = write(tmp_path / "s.toml", 'port = 9001\nhost = "0.0.0.0"\nworkers = 3\n')
    settings = load_settings(config, env={"MLSERVE_PORT": "9002", "MLSERVE_WORKERS": "4"}, overrides={"workers": 5})
    assert (settings.host, settings.port, settings.workers) == ("0.0.0.0", 9002, 5)
    assert settings.request_timeout_ms == 10_000


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = write(tmp_path / "s.toml", "max_batch_rows = 7\n")
    assert load_settings(env={"MLSERVE_CONFIG": config}).max_batch_rows == 7


def test_batching_knobs_merge_model_file_under_operator_settings(tmp_path: Path) -> None:
    config = write(
        tmp_path / "s.toml",
        "[batching]\nmax_queue = 10\n[models.iris.batching]\nmax_delay_ms = 3\n",
    )
    settings = load_settings(config, env={"MLSERVE_BATCHING__MAX_BATCH_SIZE": "1"})
    declared = {"max_batch_size": 64, "max_delay_ms": 1, "max_inflight": 2}
    iris = settings.batching_for("iris", declared)
    assert (iris.max_batch_size, iris.max_delay_ms, iris.max_queue, iris.max_inflight) == (1, 3.0, 10, 2)
    other = settings.batching_for("other", {})
    assert (other.max_batch_size, other.max_delay_ms, other.max_inflight) == (1, 0.0, None)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MLSERVE_PORT": "abc"}, "$.port"),
        ({"MLSERVE_PORT": "70000"}, "$.port"),
        ({"MLSERVE_BATCHING__MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"MLSERVE_BATCHING__MAX_BACH_SIZE": "2"}, "max_bach_size"),
        ({"MLSERVE_NO_SUCH_SETTING": "1"}, "no_such_setting"),
    ],
)
def test_invalid_values_name_the_field(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("$", r"\$")):
        load_settings(env=env)


def test_unreadable_or_invalid_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(str(tmp_path / "missing.toml"), env={})
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path / "bad.toml", "port = \n"), env={})
    with pytest.raises(SettingsError, match="max_delay_ms"):
        load_settings(write(tmp_path / "m.toml", "[models.x.batching]\nmax_delay_ms = -1\n"), env={})
