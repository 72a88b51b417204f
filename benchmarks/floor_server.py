"""HTTP floor: the cheapest aiohttp server that still does mlserve's request work.

Why it exists: "how fast is mlserve" is only meaningful relative to what the
same aiohttp, on the same machine, in the same run, can do with zero model
work.  This app reads the body, decodes it with a msgspec Struct decoder built
once at import (so it pays the parse cost a real server pays), and answers a
prebuilt constant JSON body.  No access log, no middleware.

By default it is one process, matching mlserve's single aiohttp front end
(mlserve's ``--workers`` are model processes behind it).  ``--workers N`` runs
N processes sharing the port via SO_REUSEPORT, to see what extra HTTP
processes would buy.

Run: ``python -m benchmarks.floor_server --host 127.0.0.1 --port 8000``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys

import msgspec
from aiohttp import web


class PredictRequest(msgspec.Struct):
    """Same shape as mlserve's request body; unknown fields are ignored."""

    features: list[float]
    model: str | None = None
    model_version: str | None = None


_DECODER = msgspec.json.Decoder(PredictRequest)
_BODY = msgspec.json.encode(
    {
        "prediction": 0,
        "model": "iris_classifier",
        "model_version": "floor",
        "inference_time_ms": 0.0,
    }
)
_ERROR_BODY = b'{"error":"invalid request"}'


async def predict(request: web.Request) -> web.Response:
    """Read + decode the body like a real handler would, then answer a constant."""
    raw = await request.read()
    try:
        _DECODER.decode(raw)
    except msgspec.DecodeError:
        return web.Response(body=_ERROR_BODY, status=422, content_type="application/json")
    return web.Response(body=_BODY, content_type="application/json")


async def ready(_request: web.Request) -> web.Response:
    """Readiness probe with the same path as mlserve so one waiter serves both."""
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")


def make_app() -> web.Application:
    """Build the minimal app; kept a function so tests can mount it in-process."""
    app = web.Application()
    app.router.add_post("/predict", predict)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/health/live", ready)
    return app


def _serve(host: str, port: int) -> None:
    """One worker: its own SO_REUSEPORT socket, kernel spreads connections."""
    web.run_app(
        make_app(),
        host=host,
        port=port,
        reuse_port=True,
        access_log=None,
        print=None,
        handle_signals=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Start ``--workers`` processes and keep the parent as their supervisor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    if args.workers <= 1:
        _serve(args.host, args.port)
        return 0

    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_serve, args=(args.host, args.port), daemon=True)
        for _ in range(args.workers)
    ]
    for proc in procs:
        proc.start()

    def _stop(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
