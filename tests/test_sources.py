"""``mlserve.sources.mlflow``'s pure parts: what a source URI means, and what an MLflow model
directory's ``MLmodel`` says about its inputs (in-process, no registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlserve.errors import LoadFailed, SettingsError
from mlserve.schemas import Column, MlflowInfo
from mlserve.sources.mlflow import LOCAL_VERSION, Reference, parse, served_name, spec_of


@pytest.mark.parametrize(
    ("uri", "reference", "watched"),
    [
        ("models:/iris@champion", Reference("models:/iris@champion", "iris", alias="champion"), True),
        ("models:/iris/3", Reference("models:/iris/3", "iris", version="3"), False),
        ("models:/iris/Production", Reference("models:/iris/Production", "iris", stage="Production"), True),
    ],
)
def test_registry_uris_name_an_alias_a_version_or_a_stage(uri: str, reference: Reference, watched: bool) -> None:
    assert parse(uri) == reference
    assert parse(uri).watched is watched


def test_a_path_is_a_local_model_directory_served_under_its_own_name(tmp_path: Path) -> None:
    reference = parse(str(tmp_path / "fraud-model"))
    assert (reference.name, reference.path, reference.watched) == ("fraud-model", str(tmp_path / "fraud-model"), False)
    assert served_name(str(tmp_path / "fraud-model")) == "fraud-model"


@pytest.mark.parametrize("uri", ["models:/iris", "models:/iris@a/b", "models:/", "s3://bucket/model", "runs:/abc/model"])
def test_malformed_uris_are_refused_at_start(uri: str) -> None:
    with pytest.raises(SettingsError, match="expected models:/NAME@ALIAS"):
        parse(uri)


def test_a_name_that_cannot_be_served_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not a valid model name"):
        served_name(str(tmp_path / "bad name!"))


INFO = MlflowInfo(source="models:/m/1", registered_name="m", version="1", flavor="")


def model_dir(tmp_path: Path, inputs: list[dict[str, object]] | None, flavor: str = "sklearn",
              example: object = None) -> Path:
    signature = f"signature:\n  inputs: '{json.dumps(inputs)}'\n" if inputs is not None else ""
    text = f"flavors:\n  {flavor}:\n    pickled_model: model.pkl\n{signature}"
    if example is not None:
        (tmp_path / "input_example.json").write_text(json.dumps(example))
        text += "saved_input_example_info:\n  artifact_path: input_example.json\n  type: dataframe\n"
    (tmp_path / "MLmodel").write_text(text)
    return tmp_path


def test_a_column_signature_gives_the_row_width_names_types_and_example(tmp_path: Path) -> None:
    inputs = [{"type": "double", "name": "a"}, {"type": "long", "name": "b"}]
    example = {"columns": ["a", "b"], "data": [[0.5, 2], [1.5, 3]]}
    spec = spec_of("m", "1", model_dir(tmp_path, inputs, example=example), INFO)
    assert spec.metadata.input_shape == [2] and spec.metadata.framework == "mlflow"
    assert spec.mlflow is not None and spec.mlflow.flavor == "sklearn"
    assert spec.mlflow.signature == [Column("a", "double"), Column("b", "long")]
    assert spec.example == [[0.5, 2.0], [1.5, 3.0]]


def test_a_tensor_signature_gives_the_row_shape_and_no_names(tmp_path: Path) -> None:
    inputs = [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 4]}}]
    spec = spec_of("m", LOCAL_VERSION, model_dir(tmp_path, inputs, flavor="python_function"), INFO)
    assert spec.metadata.input_shape == [3, 4]
    assert spec.mlflow is not None and (spec.mlflow.flavor, spec.mlflow.signature) == ("python_function", [])


def test_an_example_of_the_wrong_width_is_not_used_to_warm(tmp_path: Path) -> None:
    inputs = [{"type": "double", "name": "a"}]
    spec = spec_of("m", "1", model_dir(tmp_path, inputs, example={"data": [[1.0, 2.0]]}), INFO)
    assert spec.example == []


@pytest.mark.parametrize(
    ("inputs", "flavor", "fault"),
    [
        (None, "sklearn", "has no signature"),
        ([{"type": "string", "name": "city"}], "sklearn", "'city' is string; mlserve serves numeric inputs only"),
        ([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, -1]}}], "sklearn", "not rows of a fixed size"),
        ([{"type": "double", "name": "a"}], "keras", "neither a sklearn nor a python_function flavor"),
    ],
)
def test_a_model_mlserve_cannot_serve_fails_with_the_reason(
    tmp_path: Path, inputs: list[dict[str, object]] | None, flavor: str, fault: str
) -> None:
    with pytest.raises(LoadFailed, match=fault):
        spec_of("m", "1", model_dir(tmp_path, inputs, flavor=flavor), INFO)


def test_a_directory_without_an_mlmodel_file_fails_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(LoadFailed, match="cannot read its MLmodel file"):
        spec_of("m", "1", tmp_path, INFO)
