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


def test_secrets_never_show_in_repr_or_str() -> None:
    settings = load_settings(env={"MLSERVE_ADMIN_TOKEN": "tok-123", "MLSERVE_REDIS_URL": "redis://:pw-456@h:6379/0"})
    assert settings.admin_token is not None and settings.admin_token.reveal() == "tok-123"
    assert settings.redis_url is not None and settings.redis_url.reveal().endswith("@h:6379/0")
    for text in (repr(settings), str(settings), repr(settings.admin_token), f"{settings.redis_url}"):
        assert "tok-123" not in text and "pw-456" not in text, text


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("10.1.2.3", False), ("myhost", False)],
)
def test_loopback_only_tells_whether_other_machines_can_reach_the_server(host: str, loopback: bool) -> None:
    assert load_settings(env={"MLSERVE_HOST": host}).loopback_only is loopback


def test_preload_takes_all_active_or_a_list(tmp_path: Path) -> None:
    config = write(tmp_path / "s.toml", '[models.a]\npreload = "active"\n[models.b]\npreload = ["v1", "v3"]\n')
    settings = load_settings(config, env={})
    assert settings.models["a"].preload == "active" and settings.models["b"].preload == ["v1", "v3"]
    assert load_settings(env={}).models.get("c") is None
    with pytest.raises(SettingsError, match="preload"):
        load_settings(write(tmp_path / "bad.toml", '[models.a]\npreload = "some"\n'), env={})


def test_state_file_defaults_to_beside_the_repository(tmp_path: Path) -> None:
    settings = load_settings(env={"MLSERVE_MODELS_DIR": str(tmp_path / "repo")})
    assert settings.state_file == str(tmp_path / "repo.state.json")
    assert load_settings(env={"MLSERVE_STATE_PATH": "/x/s.json"}).state_file == "/x/s.json"


@pytest.mark.parametrize("variable", ["MLSERVE_REDIS_URL", "MLSERVE_CACHE__REDIS_URL"])
def test_a_redis_url_the_client_would_refuse_stops_the_start_without_showing_it(variable: str) -> None:
    with pytest.raises(SettingsError, match="redis://") as caught:
        load_settings(env={variable: "localhost:6379?password=hunter2"})
    assert "hunter2" not in str(caught.value)
    assert load_settings(env={variable: "redis://:hunter2@localhost:6379/0"})
