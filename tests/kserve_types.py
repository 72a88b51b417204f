"""Build KServe manifests into the KServe SDK's own model classes; run it with ``.venv-kserve/bin/python``.

The SDK (the ``kserve`` package) pins pandas and protobuf below what mlserve needs, so it lives in a venv
of its own (``make .venv-kserve/.installed``) and tests/test_deploy.py runs this script there. Each
serving.kserve.io object becomes the SDK class its apiVersion and kind name (``V1alpha1ServingRuntime``,
``V1beta1InferenceService``, ...), field by field through each class's ``attribute_map`` and
``openapi_types``, down through nested KServe and ``kubernetes.client`` models such as ``V1Container``:
a field the SDK's type does not have, or a value of another type, fails with its JSON path. What was built
is printed back as JSON, so the caller can check that nothing was dropped on the way.

Usage: ``kserve_types.py FILE.yaml...``, or a JSON list of objects on stdin. Prints a JSON list of the
objects as the SDK serializes them, or exits with status 1 and the failing field's path on stderr.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import kserve
import kubernetes.client
import yaml

GROUP = "serving.kserve.io"

LIST = re.compile(r"(?:list|List)\[(?P<item>.+)\]")
DICT = re.compile(r"(?:dict\(|Dict\[)str, (?P<value>.+)[)\]]")
"""The generated containers in ``openapi_types``: older generators write ``list[X]`` and ``dict(str, X)``,
the kubernetes client's newer models ``List[X]`` and ``Dict[str, X]``."""

SCALARS: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "object": object,
    # Kept as the RFC 3339 strings a manifest holds, which is also how the SDK serializes them.
    "datetime": str,
    "date": str,
}
"""The JSON value each scalar type in ``openapi_types`` takes (``object``: any, e.g. an int-or-string port)."""


class FieldError(Exception):
    """A field the SDK's types reject, at a JSON path such as ``$.spec.containers[0].ports``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def expect(value: Any, kind: type | tuple[type, ...], type_name: str, path: str) -> Any:
    """``value`` if it is a ``kind``; booleans are not numbers here although Python's bool is an int."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind not in (bool, object)):
        raise FieldError(path, f"expected {type_name}, got {type(value).__name__} {value!r}")
    return value


def model_class(name: str, path: str) -> type:
    """The SDK class an ``openapi_types`` entry names: KServe's own, or one of the Kubernetes types it embeds."""
    for module in (kserve, kubernetes.client):
        if isinstance(cls := getattr(module, name, None), type):
            return cls
    # The SDK has dangling names (V1alpha1WorkerSpec, ResourceQuantity, ...): it cannot check such a field.
    raise FieldError(path, f"the SDK has no class {name} to check it against")


def build(value: Any, type_name: str, path: str) -> Any:
    """``value`` as the SDK holds a field declared ``type_name``: a model, a list or dict of them, or a scalar."""
    if match := LIST.fullmatch(type_name):
        items = expect(value, list, type_name, path)
        return [build(item, match["item"], f"{path}[{index}]") for index, item in enumerate(items)]
    if match := DICT.fullmatch(type_name):
        entries = expect(value, dict, type_name, path)
        return {key: build(item, match["value"], f"{path}.{key}") for key, item in entries.items()}
    if type_name in SCALARS:
        return expect(value, SCALARS[type_name], type_name, path)
    return build_model(value, model_class(type_name, path), path)


def build_model(value: Any, cls: type, path: str) -> Any:
    """An instance of the generated class ``cls`` from its JSON form, every field checked against the class."""
    fields = {json_name: attribute for attribute, json_name in cls.attribute_map.items()}  # type: ignore[attr-defined]
    arguments = {}
    for key, item in expect(value, dict, cls.__name__, path).items():
        if key not in fields:
            raise FieldError(f"{path}.{key}", f"not a field of {cls.__name__}")
        attribute = fields[key]
        arguments[attribute] = build(item, cls.openapi_types[attribute], f"{path}.{key}")  # type: ignore[attr-defined]
    try:
        return cls(**arguments)
    except ValueError as error:  # the SDK's own checks, e.g. a required field left out
        raise FieldError(path, str(error)) from error


def build_object(document: Any) -> Any:
    """A whole serving.kserve.io object, as the SDK class named by its apiVersion and kind."""
    expect(document, dict, "object", "$")
    group, _, version = str(document.get("apiVersion")).partition("/")
    if group != GROUP:
        raise FieldError("$.apiVersion", f"not a {GROUP} object")
    return build_model(document, model_class(f"{version.capitalize()}{document.get('kind')}", "$"), "$")


def main(paths: list[str]) -> None:
    sources = [(path, [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]) for path in paths]
    built = []
    for source, documents in sources or [("stdin", json.load(sys.stdin))]:
        for index, document in enumerate(documents):
            try:
                built.append(build_object(document))
            except FieldError as error:
                sys.exit(f"{source}, document {index + 1}: {error}")
    # KServe's serializer, not the kubernetes client's: it maps both libraries' models through attribute_map.
    json.dump(kserve.ApiClient().sanitize_for_serialization(built), sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
