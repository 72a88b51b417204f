"""Hostile input against one real server: malformed HTTP/1.1 on raw sockets, and hypothesis-made bodies
for every decoder. Nothing may earn a 5xx, hang the server for other clients, crash it or a worker, or
make it log a traceback.

tests/test_docs.py fuzzes the server from its OpenAPI document, which only produces well-formed HTTP and
bodies the schema can describe. This module covers the rest: broken framing (chunking, lying or repeated
``Content-Length``, smuggling), broken request lines and headers, requests that stall, and bodies built to
sit just beside what each decoder accepts (the right structure with wild values, deep nesting, truncated
or corrupted images and binary tensors) as well as random bytes.

One server (the demo iris versions and the digits CNN, one worker) serves the whole module. Every test
is ``watched``: the server must still run and have logged no traceback when it ends, and its worker must
be the process it was at the start (the pool replaces a worker that died, so only its pid tells).
``HOSTILE_EXAMPLES`` sets how many bodies hypothesis makes a decoder (``HOSTILE_EXAMPLES=2000`` for a
deeper run).
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import select
import socket
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import requests
from PIL import Image

from mlserve.demo_models import IMAGES, IRIS, digit_images
from serverproc import ServerProc, serve, watched

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "150"))
"""Bodies hypothesis makes each decoder."""
ANSWER_TIMEOUT_S = 5.0
"""How long a client waits for an answer before the server counts as hung."""
STALLED_CONNECTIONS = 8
"""Connections a stalled-request test leaves open at once while another client is served."""
ROW = [5.1, 3.5, 1.4, 0.2]
ROW_BODY = json.dumps({"features": ROW}).encode()
JSON = "application/json"
MULTIPART = "multipart/form-data; boundary=mlserve"


# -- the server ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(demo_and_digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with serve(demo_and_digits_dir, tmp_path_factory.mktemp("hostile-server"), workers=1) as started:
        yield started


@pytest.fixture(scope="module")
def workers_at_start(server: ServerProc) -> list[int]:
    workers = server.worker_pids()
    assert workers, "the server has no worker process"
    return workers


@pytest.fixture(autouse=True)
def serves_on(server: ServerProc, workers_at_start: list[int]) -> Iterator[None]:
    """Every test: the server still runs, logged no traceback, and kept its worker."""
    with watched(server):
        yield
    assert server.worker_pids() == workers_at_start, f"a worker died during this test:\n{server.log()}"


@pytest.fixture(scope="module")
def client() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# -- answers and their shape ---------------------------------------------------------------------------


class ErrorShape(Enum):
    """The error body each protocol answers with."""

    SERVER = "the server's {error, path}"
    MLFLOW = "MLflow's {error_code, message} (/invocations)"


def check_answer(status: int, content_type: str, body: bytes, shape: ErrorShape, sent: object) -> None:
    """No 5xx; an error is JSON in its protocol's shape, with a message a client can show."""
    assert status < 500, f"{status} for {sent!r}: {body[:2000]!r}"
    if status < 400:
        return
    assert content_type.split(";")[0].strip() == JSON, f"{status} error is {content_type}: {body[:500]!r}"
    error = json.loads(body)
    assert isinstance(error, dict), body
    if shape is ErrorShape.MLFLOW:
        assert set(error) == {"error_code", "message"}, error
        code = error["error_code"]
        assert isinstance(code, str) and code.isupper() and code.replace("_", "").isalpha(), error
        assert isinstance(error["message"], str) and error["message"], error
    else:
        assert set(error) <= {"error", "path"}, error
        assert isinstance(error.get("error"), str) and error["error"], error
        assert isinstance(error.get("path", ""), str), error


# -- raw HTTP/1.1 --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


def read_answer(reader: BinaryIO) -> Answer | None:
    """The next response on a connection; None when the server closed (or reset) it instead."""
    try:
        line = reader.readline(65_536)
    except ConnectionResetError:
        return None
    if not line:
        return None
    _version, status, *_ = line.split(None, 2)
    headers = http.client.parse_headers(reader)
    body = reader.read(int(headers.get("Content-Length", "0")))
    return Answer(int(status), headers.get("Content-Type", ""), body)


def connect(port: int, parts: Sequence[bytes], half_close: bool = False, count: int = 1) -> list[socket.socket]:
    """``count`` connections that have each sent ``parts``, each part its own segment (a pause before the
    next, so it reaches a server already handling the earlier ones)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT_S) for _ in range(count)]
    for index, part in enumerate(parts):
        if index:
            time.sleep(0.2)
        for sock in socks:
            # A server that refused an earlier part may have hung up; what it answered is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(part)
    for sock in socks if half_close else ():
        sock.shutdown(socket.SHUT_WR)
    return socks


class Expect(Enum):
    CLOSED = "every answer under 500, the last a 4xx (or none at all), then the server hangs up"
    """HTTP framing the parser refuses: nothing after the fault may be read as a request."""
    REFUSED = "one 4xx answer, a JSON error in the route's shape"
    """Well framed, but a header or path the route reads is unreadable."""
    SERVED = "an answer under 500, or a hang-up"
    """Odd but allowed by HTTP or aiohttp (obs-text in a header value, a request line without a version)."""


@dataclass(frozen=True)
class Hostile:
    parts: tuple[bytes, ...]
    expect: Expect = Expect.CLOSED
    served: int = 0
    """2xx answers allowed ahead of the refusal: valid requests pipelined before the garbage. Zero
    elsewhere, so a smuggled request that is answered fails the test."""
    half_close: bool = False
    """The client shuts its side after sending: a request cut short rather than a stalled one."""
    shape: ErrorShape = ErrorShape.SERVER


def hostile(*parts: bytes, **options: Any) -> Hostile:
    return Hostile(parts, **options)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


POST = b"POST /predict HTTP/1.1\r\nHost: mlserve\r\nContent-Type: application/json\r\n"
READY = b"GET /health/ready HTTP/1.1\r\nHost: mlserve\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
LENGTH = b"Content-Length: %d\r\n" % len(ROW_BODY)
SMUGGLED = READY + b"\r\n"
"""A request hidden in a body: answering it (200) would mean the server split the stream where a proxy
in front of it would not."""
VALID = POST + LENGTH + b"\r\n" + ROW_BODY
GARBAGE = b"\x00\xff\xfeGARBAGE / HTTP/1.1\r\n\r\n"


def post(headers: bytes, body: bytes = ROW_BODY, head: bytes = POST) -> bytes:
    return head + headers + b"\r\n" + body


def chunked(data: bytes) -> bytes:
    """A /predict whose chunked body is ``data``, given as it goes on the wire."""
    return post(CHUNKED, data)


def get(headers: bytes) -> bytes:
    return READY + headers + b"\r\n"


MALFORMED: dict[str, Hostile] = {
    "chunk size not hex": hostile(chunked(b"zz\r\n" + ROW_BODY + b"\r\n0\r\n\r\n")),
    "chunk size negative": hostile(chunked(b"-22\r\n" + ROW_BODY + b"\r\n0\r\n\r\n")),
    "chunk size past 2**64": hostile(chunked(b"f" * 20 + b"\r\n" + ROW_BODY + b"\r\n0\r\n\r\n")),
    "chunk data without its CRLF": hostile(chunked(chunk(ROW_BODY)[:-2] + b"0\r\n\r\n")),
    "chunk longer than announced": hostile(chunked(b"4\r\n" + ROW_BODY + b"\r\n0\r\n\r\n")),
    "chunk extension with a NUL": hostile(chunked(b"%x;x=\x00\r\n%s\r\n0\r\n\r\n" % (len(ROW_BODY), ROW_BODY))),
    "no last chunk, then the client half-closes": hostile(chunked(chunk(ROW_BODY)), half_close=True),
    "Content-Length past the body, then the client half-closes": hostile(
        post(b"Content-Length: 1000\r\n"), half_close=True
    ),
    "Content-Length smaller than the body (the rest read as a request)": hostile(post(b"Content-Length: 10\r\n")),
    "Content-Length and Transfer-Encoding (CL.TE smuggling)": hostile(
        post(b"Content-Length: 5\r\n" + CHUNKED, b"0\r\n\r\n" + SMUGGLED)
    ),
    "Transfer-Encoding and Content-Length (TE.CL smuggling)": hostile(
        post(CHUNKED + b"Content-Length: 60\r\n", b"0\r\n\r\n" + SMUGGLED)
    ),
    "Transfer-Encoding: chunked, identity": hostile(
        post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + SMUGGLED)
    ),
    "a space before a header's colon": hostile(
        post(b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED)
    ),
    "Transfer-Encoding twice": hostile(post(CHUNKED + CHUNKED, chunk(ROW_BODY) + b"0\r\n\r\n")),
    "Transfer-Encoding of an unknown coding": hostile(post(b"Transfer-Encoding: gzip\r\n")),
    "negative Content-Length": hostile(post(b"Content-Length: -5\r\n")),
    "non-numeric Content-Length": hostile(post(b"Content-Length: abc\r\n")),
    "Content-Length with a sign": hostile(post(b"Content-Length: +%d\r\n" % len(ROW_BODY))),
    "Content-Length with an underscore": hostile(post(b"Content-Length: 3_4\r\n")),
    "Content-Length past 2**64": hostile(post(b"Content-Length: 99999999999999999999999\r\n")),
    "two different Content-Lengths": hostile(post(LENGTH + b"Content-Length: 10\r\n")),
    "the same Content-Length twice": hostile(post(LENGTH + LENGTH)),
    "pipelined: a valid request, then garbage, in one segment": hostile(VALID + GARBAGE, served=1),
    "pipelined: a valid request, then garbage, in a second segment": hostile(VALID, GARBAGE, served=1),
    "garbage request line": hostile(b"\x01\x02\x03 \xff\xfe\xfd junk\r\n\r\n"),
    "a TLS ClientHello": hostile(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n"),
    "the HTTP/2 preface": hostile(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    "an unknown HTTP version": hostile(b"GET /health/ready HTTP/9.9\r\nHost: mlserve\r\n\r\n"),
    "a control byte in the method": hostile(b"G\x01T /health/ready HTTP/1.1\r\nHost: mlserve\r\n\r\n"),
    "a NUL byte in the path": hostile(b"GET /health/\x00ready HTTP/1.1\r\nHost: mlserve\r\n\r\n"),
    "a 100 kB path": hostile(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: mlserve\r\n\r\n"),
    "a 100 kB header value": hostile(get(b"X-Big: " + b"a" * 100_000 + b"\r\n")),
    "more headers than max_headers": hostile(get(b"".join(b"X-H%d: v\r\n" % i for i in range(1000)))),
    "a header line without a colon": hostile(get(b"NoColonHere\r\n")),
    "a non-ASCII byte in a header name": hostile(get(b"X-Th\xffng: a\r\n")),
    "a NUL byte in a header value": hostile(get(b"X-A: a\x00b\r\n")),
    "obsolete line folding": hostile(get(b"X-A: a\r\n  folded\r\n")),
    "bare LF line endings": hostile(b"GET /health/ready HTTP/1.1\nHost: mlserve\n\n"),
    "non-ASCII bytes in X-Request-Timeout-Ms": hostile(
        post(LENGTH + b"X-Request-Timeout-Ms: \xd9\xa3\xff\r\n"), expect=Expect.REFUSED
    ),
    "non-ASCII bytes in the Content-Type of /invocations": hostile(
        post(b"Content-Type: application/json\xff\r\n" + LENGTH,
             head=b"POST /invocations HTTP/1.1\r\nHost: mlserve\r\n"),
        expect=Expect.REFUSED, shape=ErrorShape.MLFLOW,
    ),
    "non-ASCII digits in Inference-Header-Content-Length": hostile(
        post(b"Inference-Header-Content-Length: \xd9\xa3\r\n" + LENGTH,
             head=b"POST /v2/models/iris_classifier/infer HTTP/1.1\r\nHost: mlserve\r\n"),
        expect=Expect.REFUSED,
    ),
    "a percent-encoded NUL in the path": hostile(
        b"GET /health/%00ready HTTP/1.1\r\nHost: mlserve\r\n\r\n", expect=Expect.REFUSED
    ),
    "invalid UTF-8, percent-encoded, in a model name": hostile(
        post(LENGTH, head=b"POST /v2/models/%ff%00/infer HTTP/1.1\r\nHost: mlserve\r\n"), expect=Expect.REFUSED
    ),
    "an HTTP/0.9-style request line": hostile(b"GET /health/ready\r\n\r\n", expect=Expect.SERVED),
    "non-ASCII bytes in a header value": hostile(get(b"X-Thing: caf\xc3\xa9 \xff\xfe\r\n"), expect=Expect.SERVED),
    "non-ASCII bytes in X-User-ID": hostile(post(LENGTH + b"X-User-ID: \xff\xfe\x80\r\n"), expect=Expect.SERVED),
    "Transfer-Encoding: identity, chunked": hostile(
        post(b"Transfer-Encoding: identity, chunked\r\n", chunk(ROW_BODY) + b"0\r\n\r\n"), expect=Expect.SERVED
    ),
    "an unknown Expect": hostile(post(LENGTH + b"Expect: 100-whatever\r\n"), expect=Expect.SERVED),
    "an absolute-form target": hostile(
        b"GET http://elsewhere/health/ready HTTP/1.1\r\nHost: mlserve\r\n\r\n", expect=Expect.SERVED
    ),
    "a websocket Upgrade on a plain route": hostile(
        get(b"Connection: Upgrade\r\nUpgrade: websocket\r\n"), expect=Expect.SERVED
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_gets_no_5xx_and_nothing_past_the_fault(server: ServerProc, case: str) -> None:
    """Each case's ``Expect``, within ANSWER_TIMEOUT_S."""
    sent = MALFORMED[case]
    started = time.monotonic()
    answers: list[Answer] = []
    [sock] = connect(server.port, sent.parts, sent.half_close)
    with sock, sock.makefile("rb") as reader:
        try:
            while (answer := read_answer(reader)) is not None:
                answers.append(answer)
                if sent.expect is not Expect.CLOSED:
                    break
        except TimeoutError:
            pytest.fail(f"after {answers}, neither an answer nor a hang-up within {ANSWER_TIMEOUT_S}s")
    statuses = [answer.status for answer in answers]
    assert time.monotonic() - started < ANSWER_TIMEOUT_S, statuses
    assert all(status < 500 for status in statuses), answers
    if sent.expect is Expect.CLOSED:
        ok = [status for status in statuses if status < 400]
        assert statuses[: len(ok)] == ok and len(ok) <= sent.served, f"answered past the fault: {answers}"
        assert not statuses or statuses[-1] >= 400, answers
        return
    if sent.expect is Expect.REFUSED:
        assert len(answers) == 1 and 400 <= statuses[0] < 500, answers
        check_answer(answers[0].status, answers[0].content_type, answers[0].body, sent.shape, sent.parts)


STALLED: dict[str, tuple[bytes, ...]] = {
    "Content-Length past the body": (post(b"Content-Length: 1000\r\n"),),
    "Content-Length past max_body_bytes": (post(b"Content-Length: 5000000\r\n"),),
    "a chunked body whose last chunk never comes": (chunked(chunk(ROW_BODY)),),
    "a bad chunk after the handler began reading": (chunked(chunk(b'{"fea')), b"zz\r\n"),
    "headers never finished": (b"POST /predict HTTP/1.1\r\nHost: mlserve\r\nContent-Ty",),
    "an HTTP/0.9-style request line alone": (b"GET /health/ready\r\n",),
    "an image upload stalled mid-file": (post(
        b"Content-Type: %s\r\nContent-Length: 5000\r\n" % MULTIPART.encode(),
        b'--mlserve\r\nContent-Disposition: form-data; name="file"\r\n\r\n\x89PNG\r\n\x1a\n',
        head=b"POST /predict/image HTTP/1.1\r\nHost: mlserve\r\n",
    ),),
    "a binary v2 request stalled mid-tensor": (post(
        b"Inference-Header-Content-Length: 2\r\nContent-Length: 5000\r\n", b"{}\x00\x00",
        head=b"POST /v2/models/iris_classifier/infer HTTP/1.1\r\nHost: mlserve\r\n",
    ),),
}


@pytest.mark.parametrize("case", list(STALLED))
def test_stalled_requests_hold_up_no_other_client(server: ServerProc, client: requests.Session, case: str) -> None:
    """A request that never completes may wait, or be refused with a 4xx, but other clients are served
    meanwhile, and hanging up on it leaves no trace in the log (``serves_on``)."""
    stalled = connect(server.port, STALLED[case], count=STALLED_CONNECTIONS)
    try:
        ready = client.get(server.url("/health/ready"), timeout=ANSWER_TIMEOUT_S)
        assert ready.status_code == 200, ready.text
        reply = client.post(server.url("/predict"), json={"features": ROW}, timeout=ANSWER_TIMEOUT_S)
        assert reply.status_code == 200 and reply.json()["prediction"] == 0, reply.text
        answered, _, _ = select.select(stalled, [], [], 0.2)  # the others still wait for the rest: allowed
        for sock in answered:
            with sock.makefile("rb") as reader:
                answer = read_answer(reader)
            assert answer is None or 400 <= answer.status < 500, answer
    finally:
        for sock in stalled:
            sock.close()


# -- hypothesis-made bodies ----------------------------------------------------------------------------


class Raw(str):
    """JSON text spliced into a document as it is: what ``json.dumps`` will not write (``1e999``, a number
    of 400 digits, a leading zero, nesting deeper than Python's recursion limit)."""


def to_json(value: object) -> str:
    if isinstance(value, Raw):
        return value
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{to_json(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(to_json, value)) + "]"
    return json.dumps(value)  # NaN and Infinity come out as their (invalid) literals


Strategy = st.SearchStrategy[Any]


def mostly(right: Strategy, wrong: Strategy | None = None) -> Strategy:
    """Usually the right kind of value, else a wrong one (any JSON by default): a body that gets past the
    first check and fails deeper in."""
    return st.one_of(right, right, right, WILD if wrong is None else wrong)


ODD_NUMBERS = st.sampled_from([Raw(text) for text in (
    "NaN", "-Infinity", "1e999", "-1e999", "1e-999", "3.5e38", "-3.5e38", "1" + "0" * 400, "-0", "01", "1.", ".5",
    "+1", "0x1F", "1e", "--1",
)])
NUMBERS = st.one_of(st.floats(), st.integers(), st.integers(min_value=2**63 - 2, max_value=2**64 + 2), ODD_NUMBERS)
NUMBER_TEXT = st.sampled_from(["nan", "inf", "-inf", "1e999", "5.1", "", " ", "0x10", "1_000", "\u0663", "5,1"])
"""Strings that read as numbers to some parsers (the last but one an Arabic-Indic digit)."""
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20), NUMBER_TEXT)
DEEP = st.one_of(
    st.integers(min_value=1, max_value=5000).map(lambda depth: Raw("[" * depth + "]" * depth)),
    st.integers(min_value=1, max_value=5000).map(lambda depth: Raw('{"a":' * depth + "0" + "}" * depth)),
)
WILD: Strategy = st.recursive(
    st.one_of(SCALARS, DEEP),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
FEATURE = mostly(st.floats(min_value=0, max_value=8), NUMBERS)
ROWS = st.one_of(st.lists(FEATURE, min_size=4, max_size=4), st.lists(FEATURE, max_size=8))
MODELS = st.sampled_from([IRIS, IMAGES, "no_such_model", ""]) | st.text(max_size=12)
VERSIONS = st.sampled_from(["v1", "v2", "v9", ""]) | st.text(max_size=6)
COLUMNS = st.sampled_from(["sepal length (cm)", "a", "b", "c", "d", "0", ""]) | st.text(max_size=6)
ROUTING = {"model": mostly(MODELS), "model_version": mostly(VERSIONS), "user_id": mostly(st.text(max_size=300))}


def documents(required: dict[str, Strategy], optional: dict[str, Strategy]) -> Strategy:
    """Objects with the ``required`` keys, some of the ``optional`` ones, and now and then a key no decoder
    knows."""
    known = st.fixed_dictionaries(required, optional=optional)
    stranger = st.dictionaries(st.text(max_size=8), WILD, max_size=1)
    return st.one_of(known, known, known, st.builds(lambda doc, extra: {**doc, **extra}, known, stranger))


@st.composite
def mangled(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    """A valid-looking body cut short, or with a few of its bytes replaced: malformed in its middle."""
    body = draw(bodies)
    start = draw(st.integers(min_value=0, max_value=len(body)))
    end = draw(st.integers(min_value=start, max_value=min(len(body), start + 8)))
    return body[:start] + draw(st.binary(max_size=4)) + (body[end:] if draw(st.booleans()) else b"")


def bodies(near_valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Near-valid bodies most of the time; else mangled ones, or random bytes."""
    return st.one_of(near_valid, near_valid, mangled(near_valid), st.binary(max_size=300))


def json_bodies(docs: Strategy) -> st.SearchStrategy[bytes]:
    return bodies(st.one_of(docs, docs, WILD).map(lambda doc: to_json(doc).encode()))


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    headers: dict[str, str | bytes]


def requests_to(paths: Strategy, body: Strategy, content_types: Strategy, **headers: Strategy) -> Strategy:
    """Requests to one of ``paths``, with a ``Content-Type`` and maybe some of ``headers``."""
    return st.builds(Request, paths, body, st.fixed_dictionaries({"Content-Type": content_types}, optional=headers))


JSON_TYPES = mostly(st.just(JSON), st.sampled_from([
    "application/json; charset=utf-8", "Application/JSON", "application/json; charset=latin-1",
    "application/json; foo=bar", "text/plain", "text/csv", "",
]))

# /invocations: MLflow's four input fields, and CSV.
SPLIT = documents(
    {"data": mostly(st.lists(mostly(ROWS), max_size=4))},
    {"columns": mostly(st.lists(COLUMNS, max_size=6)), "index": mostly(st.lists(SCALARS, max_size=4))},
)
RECORDS = st.lists(mostly(st.dictionaries(COLUMNS, FEATURE, max_size=5)), max_size=4)
TENSOR = st.one_of(
    st.lists(mostly(ROWS), max_size=4), RECORDS, st.dictionaries(COLUMNS, st.lists(FEATURE, max_size=4), max_size=5)
)
PARAMS = {"params": mostly(st.dictionaries(st.text(max_size=6), WILD, max_size=3))}
INVOCATIONS = st.one_of(
    documents({"dataframe_split": mostly(SPLIT)}, PARAMS),
    documents({"dataframe_records": mostly(RECORDS)}, PARAMS),
    documents({"instances": mostly(TENSOR)}, PARAMS),
    documents({"inputs": mostly(TENSOR)}, PARAMS),
    documents({"instances": TENSOR, "inputs": TENSOR}, PARAMS),
)
INVOCATION_PATHS = mostly(st.sampled_from(["/invocations", "/invocations?model=iris_classifier&version=v1"]),
                          st.sampled_from(["/invocations?model=image_classifier", "/invocations?version=v9",
                                           "/invocations?bogus=1"]))
CELLS = st.one_of(
    st.floats().map(repr), st.integers().map(str), NUMBER_TEXT, st.text(max_size=8),
    st.integers(min_value=131_000, max_value=140_000).map(lambda size: "9" * size),  # past csv's field limit
)


def csv_text(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


MEASURE = st.floats(min_value=0, max_value=8).map(repr)
CSV = bodies(st.builds(
    csv_text,
    mostly(st.lists(COLUMNS, min_size=4, max_size=4), st.lists(COLUMNS, max_size=6)),
    st.lists(mostly(st.lists(MEASURE, min_size=4, max_size=4), st.lists(mostly(MEASURE, CELLS), max_size=6)),
             max_size=6),
))
CSV_TYPES = mostly(st.just("text/csv"), st.sampled_from(
    ["text/csv; charset=utf-8", "text/csv; charset=utf-16", "text/csv; header=present", "TEXT/CSV"]
))

# /v2/models/{name}/infer: JSON tensors, and binary tensor data.
DATATYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
    "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32,
    "FP64": np.float64,
}
"""The protocol's fixed-size datatypes, and numpy's type for each (for its size in binary data)."""
DATATYPE = mostly(st.sampled_from([*DATATYPES, "BYTES"]), st.text(max_size=6))
SHAPE = mostly(st.just([1, 4]) | st.lists(st.integers(min_value=0, max_value=6), max_size=3),
               st.lists(NUMBERS, max_size=3))
TENSOR_DATA = mostly(st.one_of(
    st.lists(FEATURE, max_size=12), st.lists(ROWS, max_size=3), st.lists(st.booleans(), max_size=8),
    st.lists(st.text(max_size=10), max_size=4),
))
V2_PARAMETERS = st.dictionaries(
    st.sampled_from(["binary_data_size", "binary_data", "binary_data_output", "shared_memory_region",
                     "classification", "x"]),
    mostly(st.integers(min_value=-2, max_value=64) | st.booleans()), max_size=3,
)
INFER_INPUT = documents(
    {"name": mostly(st.sampled_from(["input-0", "image"])), "shape": SHAPE, "datatype": DATATYPE},
    {"data": TENSOR_DATA, "parameters": mostly(V2_PARAMETERS)},
)
INFER_OUTPUT = documents(
    {"name": mostly(st.sampled_from(["predict", "class", "confidence", "probabilities"]))},
    {"parameters": mostly(V2_PARAMETERS)},
)
OUTPUTS = {"id": mostly(st.text(max_size=8)), "parameters": mostly(V2_PARAMETERS),
           "outputs": mostly(st.lists(mostly(INFER_OUTPUT), max_size=3))}


@st.composite
def feature_tensors(draw: st.DrawFn) -> dict[str, Any]:
    """An input as iris takes it, ``[N, 4]`` with as many values (flat or nested) of a numeric datatype:
    only the values are wild, and they mostly fit the datatype."""
    datatype = draw(st.sampled_from(list(DATATYPES)))
    value = FEATURE if datatype.startswith("FP") else mostly(st.integers(min_value=0, max_value=1), NUMBERS)
    rows = draw(st.lists(st.lists(value, min_size=4, max_size=4), min_size=1, max_size=3))
    data = [item for row in rows for item in row] if draw(st.booleans()) else rows
    return {"name": "input-0", "shape": [len(rows), 4], "datatype": datatype, "data": data}


INFER = documents(
    {"inputs": mostly(st.lists(feature_tensors(), min_size=1, max_size=1),
                      st.lists(feature_tensors() | INFER_INPUT, max_size=3))},
    OUTPUTS,
)
V2_PATHS = st.sampled_from([
    f"/v2/models/{IRIS}/infer", f"/v2/models/{IRIS}/versions/v1/infer", f"/v2/models/{IMAGES}/infer",
    f"/v2/models/{IMAGES}/versions/v1/infer", "/v2/models/no_such_model/infer",
])
HEADER_LENGTHS = {"Inference-Header-Content-Length": st.sampled_from(["0", "2", "x"])}
"""On a JSON body: the header says the JSON ends early, or is no number."""

# Images: made by Pillow in every mode and format it writes, crafted headers, and bytes that only begin
# like an image.
IMAGE_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "LA", "I;16"]
IMAGE_FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "TGA", "PPM"]
"""Those the server takes, and two Pillow reads that it does not (a 415)."""
IMAGE_SIZES = st.one_of(
    st.tuples(st.integers(min_value=1, max_value=48), st.integers(min_value=1, max_value=48)),
    st.sampled_from([(1, 3000), (3000, 1)]),
)


def _saves(mode: str, fmt: str) -> bool:
    try:
        for size in ((2, 2), (1, 3000)):
            encoded(Image.new(mode, size), fmt)
    except (OSError, ValueError, KeyError):
        return False
    return True


SAVABLE = [(mode, fmt) for mode in IMAGE_MODES for fmt in IMAGE_FORMATS if _saves(mode, fmt)]


@st.composite
def pillow_images(draw: st.DrawFn) -> bytes:
    mode, fmt = draw(st.sampled_from(SAVABLE))
    return encoded(Image.new(mode, draw(IMAGE_SIZES), draw(st.integers(min_value=0, max_value=255))), fmt)


def png_header(width: int, height: int, depth: int, color: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb when large), ``depth`` bits and
    ``color`` type, over a few bytes of pixel data."""

    def part(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + part(b"IHDR", header) + part(b"IDAT", zlib.compress(bytes(64))) + part(b"IEND", b"")


DIMENSION = st.integers(min_value=0, max_value=2**31 - 1)
MAGIC = st.sampled_from([
    b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"",
])
IMAGE_BYTES = bodies(st.one_of(
    pillow_images(),
    st.builds(png_header, DIMENSION, DIMENSION, st.sampled_from([1, 2, 4, 8, 16, 3]),
              st.sampled_from([0, 2, 3, 4, 6, 5])),
    st.builds(bytes.__add__, MAGIC, st.binary(max_size=200)),
))
IMAGE_TYPES = mostly(
    st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/bmp", "image/x-ms-bmp", "image/gif",
                     "image/tiff"]),
    st.sampled_from(["image/svg+xml", "image/PNG; q=1", "application/octet-stream", "text/plain", "", "image/"]),
)
IMAGE_PATHS = mostly(st.just("/predict/image"), st.sampled_from(
    ["/predict/image?model=iris_classifier", "/predict/image?model_version=v9", "/predict/image?bogus=1"]
))


@st.composite
def binary_infer(draw: st.DrawFn) -> Request:
    """A binary tensor request of the right structure for its model, its sizes true or lying: feature rows
    as raw numbers of a random datatype (so NaN, infinity and huge values), or images as BYTES elements."""
    count = draw(st.integers(min_value=0, max_value=3))
    if draw(st.sampled_from([IRIS, IMAGES])) == IRIS:
        datatype = draw(st.sampled_from(list(DATATYPES)))
        size = count * 4 * np.dtype(DATATYPES[datatype]).itemsize
        payload = draw(mostly(st.binary(min_size=size, max_size=size), st.binary(max_size=64)))
        given = {"name": "input-0", "shape": draw(mostly(st.just([count, 4]), SHAPE)), "datatype": datatype}
    else:
        elements = draw(st.lists(IMAGE_BYTES, min_size=count, max_size=count))
        lengths = [draw(mostly(st.just(len(item)), st.integers(0, 2**32 - 1))) for item in elements]
        payload = b"".join(struct.pack("<I", length) + item for length, item in zip(lengths, elements, strict=True))
        given = {"name": "image", "shape": draw(mostly(st.just([count]), SHAPE)), "datatype": "BYTES"}
    size_given = draw(mostly(st.just(len(payload)), st.integers(min_value=-1, max_value=2 * len(payload) + 8)))
    given["parameters"] = {"binary_data_size": size_given}
    header = to_json(draw(documents({"inputs": st.just([given])}, OUTPUTS))).encode()
    declared = draw(mostly(st.just(str(len(header))), st.one_of(
        st.integers(min_value=-1, max_value=len(header) + len(payload) + 8).map(str),
        st.sampled_from(["", "x", "12 ", "0x10", "1e2", "99999999999999999999999"]),
        st.just("\u0663".encode()),  # an Arabic-Indic digit: isdigit(), but not ASCII
    )))
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": declared}
    return Request(draw(V2_PATHS), draw(bodies(st.just(header + payload))), headers)


MANY_PART_HEADERS = b"\r\n".join(b"X-%d: a" % i for i in range(200))
PART_LINES = st.sampled_from([
    b"NoColonHere", b"X Bad: 1", b"X-Long: " + b"a" * 9000, MANY_PART_HEADERS,
    b"Content-Transfer-Encoding: base64", b"Content-Encoding: gzip", b"Content-Type: multipart/mixed",
    b"Content-Disposition: attachment", b"X-\xff: \xfe",
])
"""Part header lines a form parser may refuse: no colon, a bad name, too long, too many, odd codings."""


@st.composite
def forms(draw: st.DrawFn) -> Request:
    """A multipart form of a few parts (usually one, the field ``file``), each part's headers right or hostile."""
    printable = st.characters(min_codepoint=33, max_codepoint=126)
    boundary = draw(mostly(st.just("mlserve"), st.text(alphabet=printable, max_size=80)))
    body = b""
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        name = draw(mostly(st.just("file"), st.text(max_size=8)))
        lines = [f'Content-Disposition: form-data; name="{name}"; filename="x.png"'.encode(),
                 b"Content-Type: " + draw(IMAGE_TYPES).encode()]
        lines += draw(mostly(st.just([]), st.lists(PART_LINES, min_size=1, max_size=2)))
        body += b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), b"\r\n".join(lines), draw(IMAGE_BYTES))
    body += b"--%s--\r\n" % boundary.encode()
    content_type = draw(mostly(st.just(f"multipart/form-data; boundary={boundary}"),
                               st.sampled_from(["multipart/form-data", "multipart/mixed; boundary=mlserve"])))
    return Request(draw(IMAGE_PATHS), draw(bodies(st.just(body))), {"Content-Type": content_type})


@dataclass(frozen=True)
class Decoder:
    requests: Strategy
    shape: ErrorShape = ErrorShape.SERVER


DECODERS: dict[str, Decoder] = {
    "predict": Decoder(requests_to(st.just("/predict"), json_bodies(documents({"features": mostly(ROWS)}, ROUTING)),
                                   JSON_TYPES)),
    "predict_batch": Decoder(requests_to(
        st.just("/predict/batch"),
        json_bodies(documents({"samples": mostly(st.lists(mostly(ROWS), max_size=6))}, ROUTING)),
        JSON_TYPES,
    )),
    "invocations_json": Decoder(requests_to(INVOCATION_PATHS, json_bodies(INVOCATIONS), JSON_TYPES), ErrorShape.MLFLOW),
    "invocations_csv": Decoder(requests_to(INVOCATION_PATHS, CSV, CSV_TYPES), ErrorShape.MLFLOW),
    "v2_json": Decoder(requests_to(V2_PATHS, json_bodies(INFER), JSON_TYPES, **HEADER_LENGTHS)),
    "v2_binary": Decoder(binary_infer()),
    "image_raw": Decoder(requests_to(IMAGE_PATHS, IMAGE_BYTES, IMAGE_TYPES)),
    "image_form": Decoder(forms()),
}


def send(client: requests.Session, server: ServerProc, request: Request) -> requests.Response:
    return client.post(server.url(request.path), data=request.body, headers=request.headers, timeout=30)


def checked(reply: requests.Response, shape: ErrorShape, request: Request) -> None:
    check_answer(reply.status_code, reply.headers.get("Content-Type", ""), reply.content, shape, request)


@pytest.mark.parametrize("decoder", list(DECODERS))
@hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    # serves_on is function-scoped on purpose: it wraps the whole run, which the server must survive.
    suppress_health_check=[
        hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large,
        hypothesis.HealthCheck.large_base_example, hypothesis.HealthCheck.function_scoped_fixture,
    ],
)
@hypothesis.given(data=st.data())
def test_every_decoder_answers_hostile_bodies_below_500_in_its_error_shape(
    server: ServerProc, client: requests.Session, decoder: str, data: st.DataObject
) -> None:
    chosen = DECODERS[decoder]
    request = data.draw(chosen.requests, label="request")
    checked(send(client, server, request), chosen.shape, request)


DEEP_ARRAY = b"[" * 5000 + b"]" * 5000
INFER_HEAD = b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":[5.1,3.5,1.4,0.2]}]'
PREDICT = Request("/predict", ROW_BODY, {"Content-Type": JSON})
BATCH = Request("/predict/batch", b'{"samples":[[1,2,3,4]]}', {"Content-Type": JSON})
INSTANCES = Request("/invocations", b'{"instances":[[1,2,3,4]]}', {"Content-Type": JSON})
TABLE = Request("/invocations", b"a,b,c,d\n1,2,3,4\n", {"Content-Type": "text/csv"})
INFER_ONE = Request(f"/v2/models/{IRIS}/infer", INFER_HEAD + b"}", {"Content-Type": JSON})
PNG_START = Request("/predict/image", b"\x89PNG\r\n\x1a\nxx", {"Content-Type": "image/png"})


def json_with(path: str, body: bytes) -> Request:
    return Request(path, body, {"Content-Type": JSON})


def form_with(part_line: bytes) -> Request:
    """A form of one field ``file`` whose part headers end with ``part_line``."""
    head = b'--mlserve\r\nContent-Disposition: form-data; name="file"\r\n%s\r\n\r\n' % part_line
    body = head + b"\x89PNG\r\n--mlserve--\r\n"
    return Request("/predict/image", body, {"Content-Type": MULTIPART})


def encoded_as(coding: str, request: Request) -> Request:
    """``request`` declaring a ``Content-Encoding`` its body is not in."""
    return Request(request.path, request.body, {**request.headers, "Content-Encoding": coding})


KNOWN: dict[str, tuple[str, Request]] = {
    "JSON nested 5000 deep, /predict": (
        "predict", json_with("/predict", b'{"features":[1,2,3,4],"model":' + DEEP_ARRAY + b"}"),
    ),
    "JSON nested 5000 deep, /invocations instances": (
        "invocations_json", json_with("/invocations", b'{"instances":' + DEEP_ARRAY + b"}"),
    ),
    "JSON nested 5000 deep, /invocations params": (
        "invocations_json", json_with("/invocations", b'{"instances":[[1,2,3,4]],"params":{"a":' + DEEP_ARRAY + b"}}"),
    ),
    "JSON nested 5000 deep, v2 data": ("v2_json", json_with(
        f"/v2/models/{IRIS}/infer", b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":'
        + DEEP_ARRAY + b"}]}",
    )),
    "JSON nested 5000 deep, v2 parameters": (
        "v2_json", json_with(f"/v2/models/{IRIS}/infer", INFER_HEAD + b',"parameters":{"a":' + DEEP_ARRAY + b"}}"),
    ),
    "gzip declared, /predict": ("predict", encoded_as("gzip", PREDICT)),
    "deflate declared, /predict/batch": ("predict_batch", encoded_as("deflate", BATCH)),
    "br declared, /invocations JSON": ("invocations_json", encoded_as("br", INSTANCES)),
    "gzip declared, /invocations CSV": ("invocations_csv", encoded_as("gzip", TABLE)),
    "gzip declared, v2 infer": ("v2_json", encoded_as("gzip", INFER_ONE)),
    "gzip declared, a raw image": ("image_raw", encoded_as("gzip", PNG_START)),
    "gzip declared, a form": ("image_form", encoded_as("gzip", form_with(b"Content-Type: image/png"))),
    "a form part header without a colon": ("image_form", form_with(b"NoColonHere")),
    "a form part header name with a space": ("image_form", form_with(b"X Bad: 1")),
    "a form part header line over 8190 bytes": ("image_form", form_with(b"X-Long: " + b"a" * 9000)),
    "more form part headers than 128": ("image_form", form_with(MANY_PART_HEADERS)),
}
"""Bodies each decoder must refuse with a 4xx, kept as they are so that each runs every time: hypothesis
finds them only now and then. "declared": a ``Content-Encoding`` the body is not in."""


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_hostile_bodies_are_refused_with_a_4xx(server: ServerProc, client: requests.Session, case: str) -> None:
    decoder, request = KNOWN[case]
    reply = send(client, server, request)
    assert 400 <= reply.status_code < 500, f"{reply.status_code}: {reply.text[:2000]}"
    checked(reply, DECODERS[decoder].shape, request)


# -- afterwards ----------------------------------------------------------------------------------------


def test_the_server_is_healthy_after_the_battery(server: ServerProc) -> None:
    """Last in the module, so after everything above: still ready, 50 concurrent predictions and an image
    answered, and no traceback anywhere in the log since the server started (``serves_on`` checks the
    worker)."""
    assert requests.get(server.url("/health/ready"), timeout=ANSWER_TIMEOUT_S).status_code == 200

    def predict(_: int) -> requests.Response:
        return requests.post(server.url("/predict"), json={"features": ROW}, timeout=ANSWER_TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(predict, range(50)))
    assert [reply.status_code for reply in replies] == [200] * 50, [r.text for r in replies if r.status_code != 200]
    assert {reply.json()["prediction"] for reply in replies} == {0}
    png = encoded(digit_images()[0][0], "PNG")  # the first digit of scikit-learn's set: a 0
    image = requests.post(server.url("/predict/image"), data=png, headers={"Content-Type": "image/png"},
                          timeout=ANSWER_TIMEOUT_S)
    assert image.status_code == 200 and image.json()["class"] == 0, image.text
    assert server.running()
    server.check_log()
