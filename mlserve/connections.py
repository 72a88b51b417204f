"""HTTP connection limits, so that thousands of idle or trickling connections cannot starve real clients.

aiohttp enforces part of them once given the settings: ``keepalive_timeout_s`` (it closes a connection
that has not sent its next complete request head that long after its previous answer, or after it
was accepted) and ``max_header_bytes`` (its parsers refuse a longer request line or header field).
This module adds what it lacks, none of it on the request path:

- **431.** A head over the limits is answered 431 Request Header Fields Too Large, not aiohttp's 400,
  and every head the parser refuses is answered in the server's JSON error shape. It is logged at
  debug level: it is the client's fault, and a traceback each would let any client flood the log.
- **Header and body deadlines.** A new connection with no complete request head ``header_timeout_s``
  after it was accepted is closed (idle, or slowloris: a head sent a byte at a time); a request
  whose body has not arrived in full ``body_timeout_s`` after its head is answered 408 and its
  connection closed. One sweep over the open connections, a few times per timeout and at least every
  second, keeps both: no timer per connection or request.
- **Open files.** Each connection is a file descriptor: at the soft limit accept fails with EMFILE,
  and asyncio stops accepting for a second, so every new client waits, real or not. The soft limit
  is raised to the hard one at start.
- **Backlog.** The listen queue holds ``backlog`` connections, not aiohttp's 128.
- **Shutdown.** The answers in flight when the server stops listening close their connections
  with ``Connection: close``, so no client sends a request on a connection that is closing.

``serve`` is ``web.run_app`` with this module's runner: run_app takes no runner and aiohttp's has no
knob for the connection class, so ``LimitedRunner`` swaps in ``LimitedServer``, which makes
``LimitedHandler`` connections and sweeps them.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import GracefulExit

from mlserve.schemas import ErrorResponse, encoder
from mlserve.settings import HttpSettings

log = logging.getLogger(__name__)

TOO_MANY_HEADERS = "Too many headers received"
"""The message of aiohttp's parsers (the C one and the Python one) for a head of more than
``max_headers`` (128) fields; it has no exception class of its own."""
SWEEPS_PER_TIMEOUT = 4
MAX_SWEEP_INTERVAL_S = 1.0
"""Sweeps per deadline, and at least one a second: a connection outlives its deadline by at most a
quarter of it, and at most a second."""


def raise_file_limit() -> None:
    """Raise the soft limit on open files to the hard one (workers spawned later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # macOS refuses an unlimited soft limit
        log.debug("the open files limit stays at %d (hard limit %d): %s", soft, hard, exc)
        return
    log.debug("open files limit raised from %d to %d", soft, hard)


class LimitedHandler(RequestHandler):
    """aiohttp's connection protocol, answering a request head its parser refuses in JSON: 431 for one
    over the limits, 400 for any other."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = HTTPStatus.INTERNAL_SERVER_ERROR,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp calls this with 400 and the parser's exception for a head it cannot parse (and with
        500 or 504 for a handler's failure, which stay aiohttp's)."""
        if status != HTTPStatus.BAD_REQUEST or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        limit = self._limit_exceeded(exc)
        status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE if limit else HTTPStatus.BAD_REQUEST
        text = f"request header fields too large: {limit}" if limit else f"malformed request: {exc.message}"
        log.debug("refused a request head from %s (%d): %s", request.remote, status, exc.message)
        response = web.Response(
            status=status, body=encoder.encode(ErrorResponse(error=text)), content_type="application/json"
        )
        response.force_close()
        return response

    def _limit_exceeded(self, exc: HttpProcessingError) -> str | None:
        """The limit on request heads that ``exc`` says was exceeded, in words; None for any other fault."""
        if isinstance(exc, LineTooLong):
            return f"the request line and each header field may have at most {self.max_field_size} bytes"
        if exc.message == TOO_MANY_HEADERS:
            return f"a request may have at most {self.max_headers} header fields"
        return None


class LimitedServer(web.Server):
    """aiohttp's server, whose connections are ``LimitedHandler``s, swept for the deadlines aiohttp
    does not keep: a new connection's first request head, and each request's body."""

    def __init__(self, made: web.Server, http: HttpSettings) -> None:
        """Take over the server aiohttp's runner ``made``: its handler, request factory and the
        arguments it gives each connection."""
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **made._kwargs,
        )
        self._http = http
        self._interval_s = min(
            MAX_SWEEP_INTERVAL_S,
            http.header_timeout_s / SWEEPS_PER_TIMEOUT,
            http.body_timeout_s / SWEEPS_PER_TIMEOUT,
        )
        self._waiting: dict[RequestHandler, tuple[web.BaseRequest | None, float]] = {}
        """Each connection found waiting by a sweep: for its first head (None) or for a request's body,
        and since when."""
        self._next_sweep: asyncio.TimerHandle | None = None

    def __call__(self) -> LimitedHandler:
        return LimitedHandler(self, loop=self._loop, **self._kwargs)

    def start_sweeping(self) -> None:
        self._tick()

    def _tick(self) -> None:
        self._next_sweep = self._loop.call_later(self._interval_s, self._tick)
        self.sweep(self._loop.time())

    def stop_sweeping(self) -> None:
        if self._next_sweep is not None:
            self._next_sweep.cancel()

    def pre_shutdown(self) -> None:
        """Graceful exit: each answer still to come says ``Connection: close`` before aiohttp closes its
        connection after it. Without it a keep-alive client, told nothing, sends its next request on
        the connection as it closes, and that request is lost unread."""
        for handler in self.connections:
            request = handler._current_request
            if request is not None:
                request._cache["keep_alive"] = False  # ``BaseRequest.keep_alive`` is reified there
        super().pre_shutdown()

    def sweep(self, now: float) -> None:
        """Close each connection waiting past its deadline, counted from the first sweep that found it
        waiting."""
        waiting: dict[RequestHandler, tuple[web.BaseRequest | None, float]] = {}
        closed = timed_out = 0
        for handler in self.connections:
            if handler._request_count == 0:  # no complete request head yet
                awaited, limit_s = None, self._http.header_timeout_s
            else:
                awaited = handler._current_request
                if awaited is None or awaited.content.is_eof():
                    continue
                limit_s = self._http.body_timeout_s
            seen = self._waiting.get(handler)
            since = seen[1] if seen is not None and seen[0] is awaited else now
            if now - since < limit_s:
                waiting[handler] = (awaited, since)
            elif awaited is None:
                handler.force_close()
                closed += 1
            else:
                _time_out_body(handler, awaited, limit_s)
                timed_out += 1
        self._waiting = waiting
        if closed or timed_out:
            log.debug("closed %d connections with no request head; timed out %d bodies", closed, timed_out)


def _time_out_body(handler: RequestHandler, request: web.BaseRequest, limit_s: float) -> None:
    """Fail the handler's read of the body with a 408 (answered through the handler's error mapping),
    and close the connection after that answer: the rest of the body is never read."""
    handler.close()
    reason = f"the request body did not arrive within {limit_s:g}s"
    request.content.set_exception(web.HTTPRequestTimeout(reason=reason))
    request.content.feed_eof()  # else aiohttp, after the answer, would read the rest of the body for up to 10 s


class LimitedRunner(web.AppRunner):
    """aiohttp's application runner, serving with a ``LimitedServer``."""

    __slots__ = ("_http",)

    def __init__(self, app: web.Application, http: HttpSettings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._http = http

    async def _make_server(self) -> web.Server:
        server = LimitedServer(await super()._make_server(), self._http)
        server.start_sweeping()
        return server

    async def _cleanup_server(self) -> None:
        if isinstance(self.server, LimitedServer):
            self.server.stop_sweeping()
        await super()._cleanup_server()


def serve(
    app: web.Application,
    http: HttpSettings,
    *,
    host: str,
    port: int,
    reuse_port: bool = False,
    unix_path: str | None = None,
    on_listening: Callable[[], None] | None = None,
    port_after: Callable[[], Awaitable[None]] | None = None,
    signals: bool = True,
    **options: Any,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then stop listening, drain and tear down, as ``web.run_app``
    does; ``options`` are ``AppRunner``'s. ``reuse_port`` lets several processes listen on one port
    (``mlserve.frontends``); ``unix_path`` adds a Unix socket beside the port, listening at once, while
    the port is taken only once ``port_after`` returns; ``on_listening`` is called after that. Without
    ``signals``, SIGINT is left as it is (SIGTERM is the app's, see ``app._drain_ctx``).

    The signal raises aiohttp's ``GracefulExit`` out of the loop; the runner's cleanup then runs while
    the requests in flight still do, and only after it are the tasks left cancelled (``asyncio.Runner``
    closing). A signal during start-up, or a start-up that fails, leaves nothing to drain.
    """
    raise_file_limit()
    runner = LimitedRunner(
        app,
        http,
        handle_signals=signals,
        keepalive_timeout=http.keepalive_timeout_s,
        max_line_size=http.max_header_bytes,
        max_field_size=http.max_header_bytes,
        **options,
    )
    with asyncio.Runner() as loop:
        try:
            loop.run(_listen(runner, host, port, http.backlog, reuse_port, unix_path, port_after))
            log.info("listening on http://%s:%d", host, port)
            if on_listening is not None:
                on_listening()
            loop.get_loop().run_forever()
        except (GracefulExit, KeyboardInterrupt):
            pass  # the way out: a signal, as in run_app
        finally:
            if runner.server is not None:
                loop.run(runner.cleanup())


async def _listen(
    runner: LimitedRunner,
    host: str,
    port: int,
    backlog: int,
    reuse_port: bool,
    unix_path: str | None,
    port_after: Callable[[], Awaitable[None]] | None,
) -> None:
    await runner.setup()
    try:
        if unix_path is not None:
            await web.UnixSite(runner, unix_path).start()
        if port_after is not None:
            await port_after()
        await web.TCPSite(runner, host, port, backlog=backlog, reuse_port=reuse_port or None).start()
    except BaseException:  # the port is taken, say: tear down what started, as run_app does
        await runner.cleanup()
        raise
