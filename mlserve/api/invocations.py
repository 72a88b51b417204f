"""MLflow's scoring protocol, so that a client of ``mlflow models serve`` only changes the URL.

``POST /invocations`` takes a JSON object with exactly one of MLflow's input fields, or a CSV table
(``Content-Type: text/csv``, a header row of column names, then one row a line):

- ``{"dataframe_split": {"columns": [...], "data": [[...], ...], "index": [...]}}`` (``columns`` and
  ``index`` optional; ``index`` is read and dropped);
- ``{"dataframe_records": [{"column": value, ...}, ...]}``;
- ``{"instances": [[...], ...]}`` or ``{"inputs": [[...], ...]}``, either as a list of records, and
  ``inputs`` also as ``{"column": [values], ...}``.

An optional ``"params"`` object is accepted, as MLflow accepts it, and not passed to the model: the
models served here take only feature rows. It answers ``{"predictions": [...]}``, one value a row as
the model output it. ``GET /ping`` and ``GET /health`` answer 200 once the server is ready (503 before,
as ``/health/ready``), ``GET /version`` the installed MLflow version.

The rows become the same feature call as ``POST /predict/batch``: the ``model`` query parameter names
the model (else the default, or the only one that takes feature rows), ``version`` a version (else the
active one or the experiment's arm, by ``X-User-ID`` or ``?user_id=``), and ``max_batch_rows`` limits
a request. When the model's signature names its columns and the request names them too, the values are
put in the model's order; a missing or unknown column is a 422. Otherwise columns are positional.
Errors are MLflow's ``{"error_code", "message"}`` with the statuses of every other protocol.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
from aiohttp import hdrs, web

from mlserve.api.errors import guard, mlflow_error, validation_path
from mlserve.api.http import JSON, json_kind, timeout
from mlserve.api.keys import CONTROL, RESULT, SETTINGS
from mlserve.api.predict import (
    PREDICTION_ERRORS, ROW_EXAMPLE, add_prediction_route, answered, checked_rows, computed, counted, routed,
)
from mlserve.api.routedoc import RouteDoc
from mlserve.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from mlserve.metrics import RequestRecorder
from mlserve.schemas import MlflowErrorResponse
from mlserve.service import Call

ENDPOINT = "invocations"
CSV = "text/csv"
FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS = "params"
QUERY = ("model", "version", "user_id")
REQUIRED = f"the body must be a JSON object with exactly one of the input fields {', '.join(FORMATS)}"
OUT_OF_RANGE = "Number out of range"
NUMBERS = (int, float, bool)
"""What a feature may be, as scikit-learn takes it: booleans count as 1 and 0."""


class Predictions(msgspec.Struct, gc=False):
    predictions: list[Any]


class Split(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    data: list[list[float]]
    columns: list[str] | None = None
    index: list[Any] | None = None


class Table(NamedTuple):
    """A request's rows in the order it sent their values, the columns' names if it gave them, and
    where the rows and the names are in the request (JSON paths)."""

    rows: list[list[float]]
    names: list[str] | None
    path: str
    names_path: str


class Common(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The bodies clients send most (a split frame, or rows), read in one typed pass."""

    dataframe_split: Split | None = None
    instances: list[list[float]] | None = None
    inputs: list[list[float]] | None = None
    params: dict[str, Any] | None = None


Value = float | bool
"""A feature value as MLflow reads it: booleans count as 1 and 0."""


class SplitFrame(msgspec.Struct, forbid_unknown_fields=True):
    """A ``dataframe_split`` as the documented schema states it; ``index`` is read and dropped."""

    data: list[list[Value]]
    columns: list[str | int] | None = None
    """Column names; pandas' default names are numbers, which count only by position."""
    index: list[Any] | None = None


class InvocationsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """MLflow's JSON input: exactly one of ``dataframe_split``, ``dataframe_records``, ``instances`` and
    ``inputs`` (rows, records, or for ``inputs`` an object of columns), and optionally ``params``.

    The body is read by ``parse_json``, which names the place of each fault; this type is only its
    schema, for ``/openapi.json``, and says no more than ``parse_json`` accepts."""

    dataframe_split: SplitFrame | None = None
    dataframe_records: list[dict[str, Value]] | None = None
    instances: list[list[Value] | dict[str, Value]] | None = None
    inputs: list[list[Value] | dict[str, Value]] | dict[str, list[Value]] | None = None
    params: dict[str, Any] | None = None
    """Accepted as MLflow accepts it, and not passed to the model."""


_common = msgspec.json.Decoder(Common)
_document = msgspec.json.Decoder(dict[str, msgspec.Raw])
_split = msgspec.json.Decoder(Split)
_records = msgspec.json.Decoder(list[dict[str, float]])
_tensor = msgspec.json.Decoder(list[list[float]] | dict[str, list[float]])
"""The common, well-formed bodies decode in one typed pass; anything they refuse (a fault, but also
booleans or numeric column names) is walked again in Python, which accepts what MLflow's parsing does
and names the exact place of a fault."""


def media_type(header: str) -> str:
    """``application/json`` or ``text/csv``, with no parameter but a UTF-8 ``charset``; 415 otherwise."""
    if header == JSON:
        return JSON
    mime, *parameters = (part.strip() for part in header.split(";"))
    mime = mime.lower()
    if mime not in (JSON, CSV):
        raise UnsupportedMediaType(f"content type {header or '(none)'!r}: send {JSON} or {CSV}")
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        if key.strip().lower() != "charset":
            raise UnsupportedMediaType(f"unknown content type parameter {key.strip()!r}: only charset is read")
        if value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"charset {value.strip()!r}: only UTF-8 is read")
    return mime


def parse_json(body: bytes) -> Table:
    """MLflow's JSON bodies as a table; ``params`` must be an object (or null) and is dropped."""
    try:
        common = _common.decode(body)
    except msgspec.DecodeError:
        pass  # another format, or a fault: the general path below reads it and names the fault
    else:
        if common.dataframe_split is not None and common.instances is None and common.inputs is None:
            return _split_checked(common.dataframe_split.data, common.dataframe_split.columns,
                                  common.dataframe_split.index, "$.dataframe_split")
        rows = common.instances if common.inputs is None else common.inputs
        if common.dataframe_split is None and rows is not None and (common.instances is None or common.inputs is None):
            path = "$.instances" if common.inputs is None else "$.inputs"
            return Table(rows, None, path, path)
    try:
        document = _document.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"{REQUIRED} ({exc})") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    given = [key for key in FORMATS if key in document]
    unknown = [key for key in document if key not in FORMATS and key != PARAMS]
    if len(given) != 1 or unknown:
        raise BadRequest(f"{REQUIRED} (and optionally {PARAMS}); got {', '.join(map(repr, document)) or 'none'}")
    params = document.get(PARAMS)
    if params is not None and not bytes(params).startswith((b"{", b"null")):
        raise ValidationFailed(f"{PARAMS} must be a JSON object", f"$.{PARAMS}")
    key = given[0]
    return PARSERS[key](document[key], f"$.{key}")


def parse_csv(body: bytes, limit: int) -> Table:
    """A header row of names, then rows of numbers; stops reading at ``limit`` rows (413)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the CSV body is not UTF-8: {exc}") from None
    reader = csv.reader(io.StringIO(text))
    try:
        names = next(reader, None)
        if names is None:
            raise BadRequest("the CSV body is empty: send a header row of column names, then the rows")
        rows: list[list[float]] = []
        for record in reader:
            if not record:
                continue  # a blank line
            where = f"csv[{len(rows)}]"
            if len(record) != len(names):
                raise ValidationFailed(f"{len(record)} values in a row under {len(names)} column names", where)
            try:
                rows.append([float(cell) for cell in record])
            except ValueError:
                column, cell = next((j, cell) for j, cell in enumerate(record) if not _is_float(cell))
                raise ValidationFailed(f"expected a number, got {cell!r}", f"{where}[{column}]") from None
            if len(rows) > limit:
                raise PayloadTooLarge(f"more than {limit} rows is over the limit of {limit} a request")
    except csv.Error as exc:
        raise BadRequest(f"malformed CSV: {exc}") from None
    return Table(rows, names, "csv", "csv header")


def arranged(table: Table, columns: tuple[str, ...]) -> list[list[float]]:
    """The rows in the model's column order, when the model and the request both name columns."""
    names = table.names
    if not columns or names is None or tuple(names) == columns:
        return table.rows
    position = {name: index for index, name in enumerate(names)}
    if len(position) != len(names):
        twice = next(name for index, name in enumerate(names) if position[name] != index)
        raise ValidationFailed(f"column {twice!r} is named twice", table.names_path)
    missing = [column for column in columns if column not in position]
    if missing:
        raise ValidationFailed(f"missing column {missing[0]!r}; the model takes {', '.join(columns)}", table.names_path)
    known = set(columns)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValidationFailed(f"unknown column {unknown[0]!r}; the model takes {', '.join(columns)}", table.names_path)
    order = [position[column] for column in columns]
    return [[row[index] for index in order] for row in table.rows]


async def invocations(request: web.Request) -> tuple[web.Response, RequestRecorder]:
    kind = media_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    query = request.query
    unknown = [key for key in query if key not in QUERY]
    if unknown:
        raise ValidationFailed(f"unknown query parameter {unknown[0]!r}; known: {', '.join(QUERY)}", unknown[0])
    limit = request.app[SETTINGS].max_batch_rows
    body = await request.read()
    table = parse_json(body) if kind == JSON else parse_csv(body, limit)
    counted(table.rows, limit, "the input", table.path, unit="rows")
    call = Call(query.get("model"), query.get("version"), table.rows, "features", timeout(request))
    served = routed(request, call)
    call.rows = arranged(table, served.columns)
    checked_rows(call.rows, served, table.path, single=False)
    result = request[RESULT] = await computed(request, served, call)
    return answered(Predictions(result.values), served, call, result, ENDPOINT)


async def ping(request: web.Request) -> web.Response:
    """MLflow's health check: 200 and a newline once every model serves, 503 before (``/health/ready``)."""
    return web.Response(text="\n", content_type="text/plain", status=200 if request.app[CONTROL].ready else 503)


def _mlflow_version() -> str | None:
    """The installed MLflow's version, read from its metadata: importing mlflow takes seconds."""
    try:
        return importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return None


MLFLOW_VERSION = _mlflow_version()
DOCS: tuple[RouteDoc, ...] = (
    RouteDoc("POST", "/invocations", "MLflow's scoring protocol: JSON (dataframe_split, dataframe_records, instances, "
             "inputs) or CSV in, {\"predictions\": [...]} out", InvocationsRequest, request_types=(CSV,),
             response=Predictions, errors=(*PREDICTION_ERRORS, 415), error=MlflowErrorResponse, tag="mlflow",
             query=QUERY, example={"dataframe_split": {"data": [ROW_EXAMPLE]}}),
    RouteDoc("GET", "/ping", "MLflow's health check: 200 once every model serves, 503 before", also=(503,),
             response_type="text/plain", tag="mlflow"),
    RouteDoc("GET", "/health", "The same as /ping", also=(503,), response_type="text/plain", tag="mlflow"),
    *([RouteDoc("GET", "/version", "The installed MLflow's version", response_type="text/plain", tag="mlflow")]
      if MLFLOW_VERSION is not None else []),
)


def add_routes(app: web.Application) -> None:
    """``/invocations``, ``/ping``, ``/health`` and, when MLflow is installed, ``/version``."""
    add_prediction_route(app, "/invocations", invocations, mlflow_error)
    app.router.add_get("/ping", guard(ping, mlflow_error), name="ping")
    app.router.add_get("/health", guard(ping, mlflow_error), name="health")
    mlflow_version = MLFLOW_VERSION
    if mlflow_version is None:
        return

    async def version(request: web.Request) -> web.Response:
        return web.Response(text=mlflow_version, content_type="text/plain")

    app.router.add_get("/version", guard(version, mlflow_error), name="mlflow_version")


# -- MLflow's input fields ---------------------------------------------------------------------------


def _split_table(raw: msgspec.Raw, path: str) -> Table:
    split = _typed(_split, raw, path)
    if split is not None:
        rows, names, index = split.data, split.columns, split.index
    else:
        value = _walk(raw, path)
        if type(value) is not dict:
            raise ValidationFailed(f"expected an object with data, columns and index, got {json_kind(value)}", path)
        extra = [key for key in value if key not in ("data", "columns", "index")]
        if extra or "data" not in value:
            what = f"unknown field {extra[0]!r}" if extra else "no data"
            raise ValidationFailed(f"{what}: dataframe_split holds data, and optionally columns and index", path)
        rows = _rows(value["data"], f"{path}.data")
        names, index = value.get("columns"), value.get("index")
        if names is not None:
            names = _names(names, f"{path}.columns")
        if index is not None and type(index) is not list:
            raise ValidationFailed(f"expected an array, got {json_kind(index)}", f"{path}.index")
    return _split_checked(rows, names, index, path)


def _split_checked(rows: list[list[float]], names: list[str] | None, index: list[Any] | None, path: str) -> Table:
    """A split frame whose rows each have a value a column, and whose index (if any) a row."""
    if names is not None:
        for number, row in enumerate(rows):
            if len(row) != len(names):
                where = f"{path}.data[{number}]"
                raise ValidationFailed(f"{len(row)} values in a row under {len(names)} columns", where)
    if index is not None and len(index) != len(rows):
        raise ValidationFailed(f"{len(index)} index values for {len(rows)} rows", f"{path}.index")
    return Table(rows, names, f"{path}.data", f"{path}.columns")


def _records_table(raw: msgspec.Raw, path: str) -> Table:
    records = _typed(_records, raw, path)
    if records is None:
        value = _walk(raw, path)
        if type(value) is not list:
            raise ValidationFailed(f"expected an array of records, got {json_kind(value)}", path)
        records = [_record(item, f"{path}[{number}]") for number, item in enumerate(value)]
    return _from_records(records, path)


def _tensor_table(raw: msgspec.Raw, path: str) -> Table:
    """``instances`` or ``inputs``: rows, records, or (``inputs`` in MLflow's docs) columns."""
    value: Any = _typed(_tensor, raw, path)
    if value is None:
        value = _walk(raw, path)
        if type(value) is dict:
            value = {name: _row(column, f"{path}.{name}") for name, column in value.items()}
        elif type(value) is not list:
            raise ValidationFailed(f"expected an array of rows or an object of columns, got {json_kind(value)}", path)
        elif value and type(value[0]) is dict:
            return _from_records([_record(item, f"{path}[{number}]") for number, item in enumerate(value)], path)
        else:
            value = _rows(value, path)
    if type(value) is list:
        return Table(value, None, path, path)
    lengths = {len(column) for column in value.values()}
    if len(lengths) > 1:
        raise ValidationFailed(f"columns of different lengths ({', '.join(map(str, sorted(lengths)))})", path)
    return Table([list(row) for row in zip(*value.values())], list(value), path, path)


PARSERS: dict[str, Callable[[msgspec.Raw, str], Table]] = {
    "dataframe_split": _split_table,
    "dataframe_records": _records_table,
    "instances": _tensor_table,
    "inputs": _tensor_table,
}


def _from_records(records: list[dict[str, float]], path: str) -> Table:
    """Rows with the first record's keys as the columns, in its order; every record has the same keys."""
    if not records:
        return Table([], None, path, path)
    names = list(records[0])
    keys = records[0].keys()
    rows = []
    for number, record in enumerate(records):
        if record.keys() != keys:
            missing = [name for name in names if name not in record]
            extra = [name for name in record if name not in keys]
            what = f"no {missing[0]!r}" if missing else f"{extra[0]!r}, which record 0 has not"
            raise ValidationFailed(f"every record must have the same columns; this one has {what}", f"{path}[{number}]")
        rows.append([record[name] for name in names])
    return Table(rows, names, path, f"{path}[0]")


def _typed(decoder: msgspec.json.Decoder[Any], raw: msgspec.Raw, path: str) -> Any:
    """The field as the fast decoder reads it; None where it refuses it, but for a number too large for
    a float, which the slow walk refuses too (msgspec's path names the fields on this one)."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        if str(exc).startswith(OUT_OF_RANGE):
            raise _out_of_range(exc, path) from None
        return None


def _walk(raw: msgspec.Raw, path: str) -> Any:
    """The field decoded to plain values, for the slow, precise checks."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.ValidationError as exc:  # a number out of range after something the fast decoder refused
        raise _out_of_range(exc, path) from None


def _out_of_range(exc: msgspec.ValidationError, path: str) -> ValidationFailed:
    return ValidationFailed("number out of range", path + validation_path(exc)[1:])


def _rows(value: Any, path: str) -> list[list[float]]:
    if type(value) is not list:
        raise ValidationFailed(f"expected an array of rows, got {json_kind(value)}", path)
    return [_row(row, f"{path}[{number}]") for number, row in enumerate(value)]


def _row(value: Any, path: str) -> list[float]:
    if type(value) is not list:
        raise ValidationFailed(f"expected a row (an array of numbers), got {json_kind(value)}", path)
    return [_number(item, f"{path}[{column}]") for column, item in enumerate(value)]


def _record(value: Any, path: str) -> dict[str, float]:
    if type(value) is not dict:
        raise ValidationFailed(f"expected a record (an object of numbers), got {json_kind(value)}", path)
    return {name: _number(item, f"{path}.{name}") for name, item in value.items()}


def _number(value: Any, path: str) -> float:
    if type(value) not in NUMBERS:
        raise ValidationFailed(f"expected a number, got {json_kind(value)}", path)
    try:
        return float(value)
    except OverflowError:
        raise ValidationFailed("number out of range", path) from None


def _names(value: Any, path: str) -> list[str]:
    """Column names; pandas' default names are numbers, which count only by position."""
    if type(value) is not list:
        raise ValidationFailed(f"expected an array of column names, got {json_kind(value)}", path)
    for number, name in enumerate(value):
        if type(name) not in (str, int):
            raise ValidationFailed(f"expected a column name, got {json_kind(name)}", f"{path}[{number}]")
    return [str(name) for name in value]


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
