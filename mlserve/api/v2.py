"""The Open Inference Protocol (KServe's "v2" REST protocol, Triton's HTTP protocol), so that
``tritonclient`` and KServe clients work unchanged.

- ``GET /v2``: server metadata; ``GET /v2/health/live`` and ``/v2/health/ready``: 200 when true
  (``/v2/health/ready`` answers 503 until ``/health/ready`` would say 200).
- ``GET /v2/models/{name}[/versions/{version}]``: model metadata; ``.../ready``: 200 when the version
  (the active one without ``versions/``) is ready, 503 otherwise, 404 for an unknown model.
- ``POST /v2/models/{name}[/versions/{version}]/infer``: inference, with JSON tensor data or the binary
  tensor data extension (``Inference-Header-Content-Length``).
- ``POST /v2/repository/index``, ``/v2/repository/models/{name}/load`` and ``/unload``: the model
  repository extension; load and unload need the admin token as the admin API does.

The tensors, for every model served here:

- a model that takes feature rows has one input, ``input-0``: shape ``[N, features]`` (``[-1, 4]`` for
  iris), any numeric datatype (converted to float64; ``FP64`` in the metadata); one output, ``predict``,
  shape ``[N]``: ``INT64`` for a classifier that names its classes (a class index), else the datatype
  of what the model answers (``FP64``, ``BOOL``, ``BYTES`` for strings).
- a model that takes images has one input, ``image``: ``BYTES``, shape ``[N]`` (or ``[N, 1]``), each
  element an encoded image; outputs ``class`` (``INT64 [N]``), ``confidence`` (``FP64 [N]``) and
  ``probabilities`` (``FP64 [N, classes]``).

An infer request of N rows (or N images) is one call through the same router (an explicit version in
the URL, else the experiment's arm by ``X-User-ID``, else the active version), cache and batcher as
``/predict``. Errors are the server's ``{"error", "path"}`` with the statuses of every other protocol:
400 for a body that cannot be read (malformed JSON, binary sizes that do not add up), 422 for one that
does not fit the model (datatype, shape, names), 404 for an unknown model or version.
"""

from __future__ import annotations

import importlib.metadata
import math
import struct
from collections.abc import Sequence
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
import numpy as np
from aiohttp import web

from mlserve.api.admin import admin, finish
from mlserve.api.errors import guard
from mlserve.api.http import decode, json_kind, respond, timeout
from mlserve.api.keys import CONTROL, REGISTRY, RESULT, SETTINGS
from mlserve.api.predict import add_prediction_route, answered, checked_rows, computed, counted, routed
from mlserve.api.routedoc import RouteDoc
from mlserve.batcher import HIGH, LOW, NORMAL, PRIORITIES
from mlserve.control import VersionState
from mlserve.errors import BadRequest, MlserveError, ModelNotReady, PayloadTooLarge, ValidationFailed
from mlserve.metrics import RequestRecorder
from mlserve.registry import Registry, ServedVersion
from mlserve.service import Call, not_ready
from mlserve.settings import Settings

ENDPOINT = "v2_infer"
SERVER_NAME = "mlserve"
SERVER_VERSION = importlib.metadata.version("mlserve")
EXTENSIONS = ["binary_tensor_data", "model_repository"]
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
FEATURES_INPUT = "input-0"
IMAGE_INPUT = "image"
PREDICT = "predict"
CLASS, CONFIDENCE, PROBABILITIES = "class", "confidence", "probabilities"
FEATURE_OUTPUTS = (PREDICT,)
IMAGE_OUTPUTS = (CLASS, CONFIDENCE, PROBABILITIES)
ALL_IN_JSON = tuple(tuple((name, False) for name in names) for names in (FEATURE_OUTPUTS, IMAGE_OUTPUTS))
"""What a request that names no outputs and no parameters gets, by whether the model takes images: every
output, in JSON."""
UNSUPPORTED = ("shared_memory_region", "classification")
"""Parameters of the protocol's other extensions, refused by name rather than ignored."""

Datatype = Literal[
    "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64", "BYTES"
]
NUMPY: dict[str, np.dtype[Any]] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in (
        ("BOOL", np.bool_), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
        ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
        ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
    )
}
"""Every fixed-size datatype as numpy reads its binary form (little-endian, as the protocol sends it)."""
FLOATS = frozenset({"FP16", "FP32", "FP64"})
WHOLE = {name: (int(np.iinfo(kind).min), int(np.iinfo(kind).max)) for name, kind in NUMPY.items() if kind.kind in "iu"}
"""The range of each integer datatype, to check JSON numbers sent as one."""
LENGTH = struct.Struct("<I")
"""A BYTES element's length prefix in binary data."""

Data = TypeVar("Data")
Dim = Annotated[int, msgspec.Meta(ge=0)]


# -- wire types ------------------------------------------------------------------------------------------


class InferInput(msgspec.Struct, Generic[Data], forbid_unknown_fields=True, gc=False):
    name: str
    shape: list[Dim]
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    """``binary_data_size``: the input's bytes follow the JSON header instead of ``data``."""
    data: Data | None = None
    """The elements in row-major order, flat or nested as the shape."""


class RequestedOutput(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    name: str
    parameters: dict[str, Any] | None = None
    """``binary_data``: answer this output as binary data after the JSON header."""


class InferRequest(msgspec.Struct, Generic[Data], forbid_unknown_fields=True, gc=False):
    inputs: list[InferInput[Data]]
    id: str | None = None
    """Echoed in the answer."""
    parameters: dict[str, Any] | None = None
    """``binary_data_output``: the default of each output's ``binary_data``."""
    outputs: list[RequestedOutput] | None = None
    """The outputs to answer, and how; every output of the model, in JSON, when left out."""


class OutputTensor(msgspec.Struct, omit_defaults=True, gc=False):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None
    """``binary_data_size`` when the data follows the JSON header instead."""


class InferResponse(msgspec.Struct, omit_defaults=True, gc=False):
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


class TensorMetadata(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]
    """``-1`` where any size goes (the number of rows)."""


class ModelMetadataResponse(msgspec.Struct):
    name: str
    versions: list[str]
    platform: str
    """The framework: ``sklearn``, ``torch``, ``mlflow``."""
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadataResponse(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(msgspec.Struct):
    live: bool


class ReadyResponse(msgspec.Struct):
    ready: bool


class ModelReadyResponse(msgspec.Struct):
    name: str
    ready: bool


class RepositoryIndexRequest(msgspec.Struct, forbid_unknown_fields=True):
    ready: bool = False
    """Only the versions that are ready."""


class RepositoryModel(msgspec.Struct):
    name: str
    version: str
    state: str
    """``READY``, ``LOADING``, ``UNLOADING`` or ``UNAVAILABLE`` (unloaded or failed: ``reason`` says which)."""
    reason: str


class RepositoryRequest(msgspec.Struct, forbid_unknown_fields=True):
    parameters: dict[str, Any] | None = None
    """Read and ignored (``unload_dependents``: no model here has dependents), but for a load's
    ``config`` and ``file:`` overrides, which are refused: models come from the repository."""


_typed = msgspec.json.Decoder(InferRequest[list[float]])
_general = msgspec.json.Decoder(InferRequest[Any])
"""The common body (numbers in flat arrays) decodes in one typed pass; anything that refuses (nested
arrays, booleans, strings, or a fault) is decoded again with ``data`` as plain values, which names the
fault's place."""
_index = msgspec.json.Decoder(RepositoryIndexRequest)
_repository = msgspec.json.Decoder(RepositoryRequest)
STATES = {"ready": "READY", "loading": "LOADING", "draining": "UNLOADING", "unloaded": "UNAVAILABLE",
          "failed": "UNAVAILABLE"}


# -- reading a request ---------------------------------------------------------------------------------------


def parsed(body: bytes, declared: str | None) -> tuple[InferRequest[Any], bool, memoryview | None]:
    """The request's JSON header, whether its ``data`` came through the typed decoder (flat floats), and the
    binary data after the header when ``Inference-Header-Content-Length`` says where it starts."""
    if declared is None:
        header: bytes | memoryview = body
        binary = None
    else:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest(f"{HEADER_LENGTH} must be a number of bytes, got {declared!r}")
        length = int(declared)
        if length > len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {length}, beyond the body's {len(body)} bytes")
        view = memoryview(body)
        header, binary = view[:length], view[length:]
    try:
        return _typed.decode(header), True, binary
    except msgspec.ValidationError:
        pass  # data in another form, or a fault: the general decoder reads it and names the fault
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    return decode(_general, header), False, binary


def tensors(infer: InferRequest[Any], typed: bool, binary: memoryview | None) -> list[Any]:
    """Each input's elements, flat: floats (JSON numbers), a numpy array (binary numbers) or bytes (BYTES)."""
    values = []
    offset = 0
    for index, given in enumerate(infer.inputs):
        shape, data = given.shape, given.data
        count = shape[0] * shape[1] if len(shape) == 2 else math.prod(shape)
        size = None if given.parameters is None else _binary_size(given.parameters, index)
        if size is None:
            if typed and data is not None and len(data) == count and given.datatype in FLOATS:
                values.append(data)  # the common case, already checked by the typed decoder
                continue
            if data is None:
                raise ValidationFailed(f"input {given.name!r} has no data: send data, or binary data", f"$.inputs[{index}]")
            values.append(_from_json(data, typed, given.datatype, count, f"$.inputs[{index}]"))
            continue
        if given.data is not None:
            raise BadRequest(f"input {given.name!r} has both data and binary_data_size")
        if binary is None:
            raise BadRequest(f"input {given.name!r} has binary_data_size, but the request has no {HEADER_LENGTH}")
        end = offset + size
        if end > len(binary):
            raise BadRequest(
                f"the binary data of input {given.name!r} ends at byte {end} after the JSON header, "
                f"but the body has {len(binary)} bytes there"
            )
        values.append(_from_binary(binary[offset:end], given.datatype, count, given.name))
        offset = end
    if binary is not None and offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes after the JSON header belong to no input: "
            "the inputs' binary_data_size must add up to the binary data"
        )
    return values


def _refuse_extensions(parameters: dict[str, Any]) -> None:
    for name in UNSUPPORTED:
        if name in parameters:
            raise BadRequest(f"{name} is not supported (no shared memory or classification extension)")


def _binary_size(parameters: dict[str, Any], index: int) -> int | None:
    _refuse_extensions(parameters)
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        where = f"$.inputs[{index}].parameters.binary_data_size"
        raise ValidationFailed("binary_data_size must be a whole number of bytes", where)
    return size


def _from_json(data: Any, typed: bool, datatype: str, count: int, where: str) -> list[Any]:
    if typed:
        if datatype == "BYTES":
            raise ValidationFailed("BYTES data must be strings", f"{where}.data")
        if datatype == "BOOL" and not all(value in (0.0, 1.0) for value in data):
            raise ValidationFailed("BOOL data must be true or false (or 1 and 0)", f"{where}.data")
        values = data
    else:
        values = _elements(_flat(data, f"{where}.data"), datatype, f"{where}.data")
    if len(values) != count:
        raise ValidationFailed(f"the shape holds {count} elements, the data {len(values)}", f"{where}.shape")
    if datatype in WHOLE:
        _check_whole(values, datatype, f"{where}.data")
    return values


def _flat(data: Any, where: str) -> list[Any]:
    """Nested arrays flattened in row-major order (without recursion: the nesting is the client's)."""
    if type(data) is not list:
        raise ValidationFailed(f"expected an array, got {json_kind(data)}", where)
    if not any(type(item) is list for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _elements(values: list[Any], datatype: str, where: str) -> list[Any]:
    """JSON elements as the datatype takes them: true and false for BOOL, strings for BYTES, numbers else."""
    if datatype == "BYTES":
        wanted: tuple[type, ...] = (str,)
    elif datatype == "BOOL":
        wanted = (bool,)
    else:
        wanted = (int, float)
    for index, value in enumerate(values):
        if type(value) not in wanted:
            what = "a string" if datatype == "BYTES" else "true or false" if datatype == "BOOL" else "a number"
            raise ValidationFailed(f"{datatype} data must be {what}, got {json_kind(value)}", f"{where}[{index}]")
    if datatype == "BYTES":
        return [value.encode() for value in values]
    try:
        return [float(value) for value in values]
    except OverflowError:
        raise ValidationFailed("number out of range", where) from None


def _check_whole(values: Sequence[float], datatype: str, where: str) -> None:
    low, high = WHOLE[datatype]
    for index, value in enumerate(values):
        if not (math.isfinite(value) and value == int(value) and low <= value <= high):
            raise ValidationFailed(f"{value!r} is not an {datatype} value", f"{where}[{index}]")


def _from_binary(data: memoryview, datatype: str, count: int, name: str) -> Any:
    if datatype == "BYTES":
        return _byte_elements(data, count, name)
    dtype = NUMPY[datatype]
    if len(data) != count * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: {count} {datatype} elements take {count * dtype.itemsize} bytes, "
            f"binary_data_size says {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype)


def _byte_elements(data: memoryview, count: int, name: str) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then that many bytes."""
    elements, offset, end = [], 0, len(data)
    if count * LENGTH.size > end:
        raise BadRequest(f"input {name!r}: {count} BYTES elements take at least {count * LENGTH.size} bytes, "
                         f"binary_data_size says {end}")
    while offset < end and len(elements) <= count:
        if offset + LENGTH.size > end:
            raise BadRequest(f"input {name!r}: a BYTES element's length is cut off at byte {offset}")
        (length,) = LENGTH.unpack_from(data, offset)
        offset += LENGTH.size
        if offset + length > end:
            raise BadRequest(f"input {name!r}: a BYTES element of {length} bytes at byte {offset} is cut off")
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    if len(elements) != count:
        found = f"more than {count}" if len(elements) > count else str(len(elements))
        raise BadRequest(f"input {name!r}: the shape holds {count} elements, the binary data {found}")
    return elements


# -- fitting a request to the model --------------------------------------------------------------------------


def the_input(infer: InferRequest[Any], served: ServedVersion) -> int:
    """The index of the model's one input; a missing, unknown or repeated input is a 422."""
    wanted = IMAGE_INPUT if served.takes_images else FEATURES_INPUT
    inputs = infer.inputs
    if len(inputs) == 1 and inputs[0].name == wanted:
        return 0
    names = [given.name for given in inputs]
    for index, name in enumerate(names):
        if name != wanted:
            raise ValidationFailed(f"unknown input {name!r}: {served.spec.key} takes one input, {wanted!r}",
                                   f"$.inputs[{index}].name")
    if not names:
        raise ValidationFailed(f"missing input {wanted!r}: {served.spec.key} takes one input, {wanted!r}", "$.inputs")
    raise ValidationFailed(f"input {wanted!r} is given {len(names)} times", "$.inputs[1].name")


def feature_rows(given: InferInput[Any], values: Any, served: ServedVersion, where: str) -> list[list[float]]:
    if given.datatype == "BYTES":
        raise ValidationFailed(f"{served.spec.key} takes numbers (FP64 [-1, {served.n_features}]), not BYTES",
                               f"{where}.datatype")
    shape, width = given.shape, served.n_features
    if (len(shape) != 2 or shape[1] != width) and (len(shape) < 2 or tuple(shape[1:]) != served.row_shape):
        wanted = ", ".join(map(str, (-1, *served.row_shape)))
        raise ValidationFailed(f"{served.spec.key} takes the shape [{wanted}], got {shape}", f"{where}.shape")
    count = shape[0]
    if isinstance(values, np.ndarray):
        return values.astype(np.float64).reshape(count, width).tolist()
    if count == 1:
        return [values]
    return [values[start : start + width] for start in range(0, count * width, width)]


def image_rows(given: InferInput[Any], values: Any, served: ServedVersion, where: str, limit: int) -> list[bytes]:
    if given.datatype != "BYTES":
        raise ValidationFailed(f"{served.spec.key} takes images as BYTES [-1], not {given.datatype}",
                               f"{where}.datatype")
    if len(given.shape) not in (1, 2) or given.shape[1:] not in ([], [1]):
        raise ValidationFailed(f"{served.spec.key} takes the shape [-1] (one image an element), got {given.shape}",
                               f"{where}.shape")
    for index, image in enumerate(values):
        if not image:
            raise BadRequest(f"image {index} is empty")
        if len(image) > limit:
            raise PayloadTooLarge(f"image {index} is {len(image)} bytes, over the limit of {limit}")
    return values


def requested(infer: InferRequest[Any], names: tuple[str, ...], served: ServedVersion) -> Sequence[tuple[str, bool]]:
    """The outputs to answer, in order, and whether each goes in binary; an unknown name is a 422."""
    if infer.parameters is None:
        if infer.outputs is None:
            return ALL_IN_JSON[names is IMAGE_OUTPUTS]
        default = False
    else:
        default = _flag(infer.parameters, "binary_data_output", "$.parameters")
    if not infer.outputs:
        return [(name, default) for name in names]
    chosen: list[tuple[str, bool]] = []
    for index, output in enumerate(infer.outputs):
        where = f"$.outputs[{index}]"
        if output.name not in names:
            raise ValidationFailed(f"unknown output {output.name!r}: {served.spec.key} has {', '.join(names)}",
                                   f"{where}.name")
        if any(output.name == name for name, _ in chosen):
            raise ValidationFailed(f"output {output.name!r} is asked for twice", f"{where}.name")
        binary = default
        if output.parameters:
            _refuse_extensions(output.parameters)
            binary = _flag(output.parameters, "binary_data", f"{where}.parameters", default)
        chosen.append((output.name, binary))
    return chosen


def _priority(value: Any) -> int:
    """The request's ``priority`` parameter: ``high``, ``normal`` or ``low``, or Triton's whole number
    (1 is the highest level, 0 the default; with three levels, 3 and beyond are low)."""
    if type(value) is str and value.lower() in PRIORITIES:
        return PRIORITIES[value.lower()]
    if type(value) is int and value >= 0:
        return (NORMAL, HIGH, NORMAL)[value] if value < 3 else LOW
    raise ValidationFailed("priority must be high, normal or low, or a level from 0 (the default) and 1 (the highest)",
                           "$.parameters.priority")


def _flag(parameters: dict[str, Any], name: str, where: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if type(value) is not bool:
        raise ValidationFailed(f"{name} must be true or false", f"{where}.{name}")
    return value


# -- the answer ------------------------------------------------------------------------------------------------


def image_tensors(values: list[Any]) -> dict[str, OutputTensor]:
    for value in values:
        if isinstance(value, MlserveError):
            raise value  # this image's own fault, found by the worker that decoded it
    count = len(values)
    classes = len(values[0][2])
    return {
        CLASS: OutputTensor(CLASS, "INT64", [count], [value[0] for value in values]),
        CONFIDENCE: OutputTensor(CONFIDENCE, "FP64", [count], [value[1] for value in values]),
        PROBABILITIES: OutputTensor(PROBABILITIES, "FP64", [count, classes], [p for value in values for p in value[2]]),
    }


def tensor_of(values: list[Any], name: str = PREDICT) -> OutputTensor:
    """A feature model's predictions as a tensor of the datatype they are: ``[N]``, or ``[N, k]`` for rows
    of k numbers; anything else (mixed, nested deeper) as BYTES, each value as JSON."""
    count = len(values)
    if count == 1 and type(values[0]) is int:
        return OutputTensor(name, "INT64", [1], values)
    kinds = set(map(type, values))
    if kinds == INT:
        return OutputTensor(name, "INT64", [count], values)
    if kinds <= NUMBER:
        return OutputTensor(name, "FP64", [count], values)
    if kinds == {bool}:
        return OutputTensor(name, "BOOL", [count], values)
    if kinds == {str}:
        return OutputTensor(name, "BYTES", [count], values)
    if kinds == {list} and len({len(value) for value in values}) == 1:
        inner = tensor_of([item for value in values for item in value])
        if inner.datatype != "BYTES" or {type(item) for value in values for item in value} == {str}:
            return OutputTensor(name, inner.datatype, [count, len(values[0])], inner.data)
    return OutputTensor(name, "BYTES", [count], [msgspec.json.encode(value).decode() for value in values])


INT, NUMBER = {int}, {int, float}


def packed(tensor: OutputTensor) -> bytes:
    """An output's binary form: numbers little-endian, BYTES elements each after its 4-byte length."""
    if tensor.datatype == "BYTES":
        encoded = [item.encode() if type(item) is str else item for item in tensor.data]
        return b"".join(LENGTH.pack(len(item)) + item for item in encoded)
    return np.asarray(tensor.data, dtype=NUMPY[tensor.datatype]).tobytes()


FIRST_DATA = "$.inputs[0].data"


def one_row(infer: InferRequest[Any], typed: bool, binary: memoryview | None, width: int) -> list[float] | None:
    """The common request's row: one input of JSON floats, shape ``[1, width]``, nothing else; None for
    any other request, which ``call_rows`` reads (and checks) in full."""
    inputs = infer.inputs
    if not typed or binary or len(inputs) != 1:
        return None
    given = inputs[0]
    data, shape = given.data, given.shape
    if (
        given.parameters is None and data is not None and given.name == FEATURES_INPUT and given.datatype in FLOATS
        and len(shape) == 2 and shape[0] == 1 and shape[1] == width and len(data) == width
    ):
        return data
    return None


def call_rows(
    infer: InferRequest[Any], typed: bool, binary: memoryview | None, served: ServedVersion, settings: Settings
) -> tuple[list[Any], str]:
    """The call's rows (feature rows, or encoded images), and the JSON path of their data."""
    values = tensors(infer, typed, binary)
    index = the_input(infer, served)
    given, where = infer.inputs[index], f"$.inputs[{index}]"
    if served.takes_images:
        rows: list[Any] = image_rows(given, values[index], served, where, settings.max_image_bytes)
    else:
        rows = feature_rows(given, values[index], served, where)
    counted(rows, settings.max_batch_rows, "the input", where, unit="images" if served.takes_images else "rows")
    return rows, f"{where}.data"


# -- handlers ---------------------------------------------------------------------------------------------------


async def v2_infer(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    match = request.match_info
    call = Call(match["name"], match.get("version"), [], "features", timeout(request))
    served = routed(request, call)
    infer, typed, binary = parsed(await request.read(), request.headers.get(HEADER_LENGTH))
    if infer.parameters and "priority" in infer.parameters:
        call.priority = _priority(infer.parameters["priority"])
    if served.takes_images:
        call.inputs = "image"
        call.rows, _ = call_rows(infer, typed, binary, served, request.app[SETTINGS])
        outputs = requested(infer, IMAGE_OUTPUTS, served)
    else:
        row = one_row(infer, typed, binary, served.n_features)
        if row is not None:
            call.rows = [row]
            checked_rows(call.rows, served, FIRST_DATA, single=True)
        else:
            call.rows, where = call_rows(infer, typed, binary, served, request.app[SETTINGS])
            checked_rows(call.rows, served, where, single=len(call.rows) == 1)
        outputs = requested(infer, FEATURE_OUTPUTS, served)
    result = request[RESULT] = await computed(request, served, call)
    if served.takes_images:
        produced = image_tensors(result.values)
        answer = InferResponse(served.spec.name, served.spec.version, [produced[name] for name, _ in outputs], infer.id)
    else:
        answer = InferResponse(served.spec.name, served.spec.version, [tensor_of(result.values)], infer.id)
    blobs = []
    if outputs not in ALL_IN_JSON:
        for tensor, (_, binary_output) in zip(answer.outputs, outputs):
            if binary_output:
                blob = packed(tensor)
                blobs.append(blob)
                tensor.data, tensor.parameters = None, {"binary_data_size": len(blob)}
    response, recorder = answered(answer, served, call, result, ENDPOINT)
    if blobs:
        header = response.body
        assert isinstance(header, bytes)
        response.body = b"".join([header, *blobs])
        response.content_type = BINARY
        response.headers[HEADER_LENGTH] = str(len(header))
    return response, recorder


async def server_metadata(request: web.Request) -> web.Response:
    return respond(ServerMetadataResponse(SERVER_NAME, SERVER_VERSION, EXTENSIONS))


async def server_live(request: web.Request) -> web.Response:
    return respond(LiveResponse(live=True))


async def server_ready(request: web.Request) -> web.Response:
    """200 once ``/health/ready`` would say 200; 503 (retry) while a model loads, or when one failed."""
    if request.app[CONTROL].ready:
        return respond(ReadyResponse(ready=True))
    states = request.app[REGISTRY].states()
    waiting = [f"{key} is {state}" for key, state in states.items() if state != "ready"]
    retry = None if "failed" in states.values() else 1
    raise ModelNotReady(f"the server is not ready: {', '.join(waiting) or 'starting'}", retry)


def _version_of(request: web.Request) -> ServedVersion:
    """The version the URL names, else the model's active one."""
    registry = request.app[REGISTRY]
    name = request.match_info["name"]
    return registry.get(name, request.match_info.get("version") or registry.active(name) or "")


async def model_metadata(request: web.Request) -> web.Response:
    served = _version_of(request)
    name = served.spec.name
    versions = [served.spec.version] if "version" in request.match_info else list(request.app[REGISTRY].versions(name))
    if served.takes_images:
        classes = len(served.labels) or -1
        inputs = [TensorMetadata(IMAGE_INPUT, "BYTES", [-1])]
        outputs = [TensorMetadata(CLASS, "INT64", [-1]), TensorMetadata(CONFIDENCE, "FP64", [-1]),
                   TensorMetadata(PROBABILITIES, "FP64", [-1, classes])]
    else:
        inputs = [TensorMetadata(FEATURES_INPUT, "FP64", [-1, *served.row_shape])]
        outputs = [TensorMetadata(PREDICT, "INT64" if served.labels else "FP64", [-1])]
    platform = served.spec.metadata.framework
    return respond(ModelMetadataResponse(name, versions, platform, inputs, outputs))


async def model_ready(request: web.Request) -> web.Response:
    served = _version_of(request)
    if served.state != "ready":
        raise not_ready(served)
    return respond(ModelReadyResponse(served.spec.name, ready=True))


def _index_of(registry: Registry, models: Sequence[str], ready_only: bool = False) -> list[RepositoryModel]:
    return [
        RepositoryModel(model, version, STATES[served.state], _reason(served))
        for model in models
        for version, served in registry.versions(model).items()
        if served.state == "ready" or not ready_only
    ]


def _reason(served: ServedVersion) -> str:
    if served.state == "failed":
        return served.error or "failed to load"
    return "unloaded" if served.state == "unloaded" else ""


async def repository_index(request: web.Request) -> web.Response:
    body = await request.read()
    ready_only = decode(_index, body).ready if body.strip() else False
    registry = request.app[REGISTRY]
    return respond(_index_of(registry, sorted(registry.models()), ready_only))  # type: ignore[arg-type]


def _repository_request(body: bytes) -> RepositoryRequest:
    return decode(_repository, body) if body.strip() else RepositoryRequest()


async def repository_load(request: web.Request) -> web.Response:
    parameters = _repository_request(await request.read()).parameters or {}
    overrides = [key for key in parameters if key == "config" or key.startswith("file:")]
    if overrides:
        raise BadRequest(f"{overrides[0]} is not supported: models load from the repository as they are")
    states = await finish(request.app[CONTROL].load_model(request.match_info["name"]))
    return respond(_changed(request, states))  # type: ignore[arg-type]


async def repository_unload(request: web.Request) -> web.Response:
    _repository_request(await request.read())
    states = await finish(request.app[CONTROL].unload_model(request.match_info["name"]))
    return respond(_changed(request, states))  # type: ignore[arg-type]


def _changed(request: web.Request, states: list[VersionState]) -> list[RepositoryModel]:
    """The model's versions after the change, as the index lists them."""
    return _index_of(request.app[REGISTRY], [states[0].model] if states else [])


# -- routes -----------------------------------------------------------------------------------------------------

MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"
INFER_ERRORS = (400, 404, 413, 422, 429, 500, 503, 504)
DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("GET", "/v2", "Server metadata: name, version and the protocol extensions served",
             response=ServerMetadataResponse, tag="v2"),
    RouteDoc("GET", "/v2/health/live", "200 while the process is up", response=LiveResponse, tag="v2"),
    RouteDoc("GET", "/v2/health/ready", "200 once every model's active version serves, 503 before",
             response=ReadyResponse, errors=(503,), tag="v2"),
    *(
        doc
        for path, which in ((MODEL, "the active version"), (VERSION, "this version"))
        for doc in (
            RouteDoc("GET", path, f"Model metadata of {which}: inputs and outputs with datatype and shape",
                     response=ModelMetadataResponse, errors=(404, 503), tag="v2"),
            RouteDoc("GET", f"{path}/ready", f"200 when {which} is ready, 503 otherwise",
                     response=ModelReadyResponse, errors=(404, 503), tag="v2"),
            RouteDoc("POST", f"{path}/infer", f"Inference on {which}: JSON tensors, or binary tensor data after "
                     f"a JSON header of {HEADER_LENGTH} bytes", request=InferRequest, request_types=(BINARY,),
                     response=InferResponse, errors=INFER_ERRORS, tag="v2"),
        )
    ),
    RouteDoc("POST", "/v2/repository/index", "Every model version and its state; an optional body "
             '{"ready": true} lists only ready ones', response=list[RepositoryModel], errors=(400, 422), tag="v2"),
    RouteDoc("POST", "/v2/repository/models/{name}/load", "Load and warm the model's active version (and the "
             "others its preload names); the model serves again after an unload", request=RepositoryRequest,
             response=list[RepositoryModel], errors=(400, 404, 409, 422, 503), admin=True, tag="v2"),
    RouteDoc("POST", "/v2/repository/models/{name}/unload", "Drain and unload every version of the model: "
             "calls get 503 until it is loaded again", request=RepositoryRequest, response=list[RepositoryModel],
             errors=(400, 404, 409, 422, 503), admin=True, tag="v2"),
)


def add_routes(app: web.Application) -> None:
    # The infer routes first: aiohttp tries the /v2/models/... patterns one by one in the order they were added.
    infer = add_prediction_route(app, f"{VERSION}/infer", v2_infer)
    # The same metered (or logged) handler without a version, under the same endpoint label.
    app.router.add_post(f"{MODEL}/infer", infer, name="v2_model_infer")
    get = app.router.add_get
    get("/v2", guard(server_metadata), name="v2_server_metadata")
    get("/v2/health/live", guard(server_live), name="v2_health_live")
    get("/v2/health/ready", guard(server_ready), name="v2_health_ready")
    get(MODEL, guard(model_metadata), name="v2_model_metadata")
    get(f"{MODEL}/ready", guard(model_ready), name="v2_model_ready")
    get(VERSION, guard(model_metadata), name="v2_version_metadata")
    get(f"{VERSION}/ready", guard(model_ready), name="v2_version_ready")
    app.router.add_post("/v2/repository/index", guard(repository_index), name="v2_repository_index")
    app.router.add_post("/v2/repository/models/{name}/load", admin(repository_load), name="v2_repository_load")
    app.router.add_post("/v2/repository/models/{name}/unload", admin(repository_unload), name="v2_repository_unload")
