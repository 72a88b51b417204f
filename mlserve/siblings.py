"""What a front end among several (``mlserve.frontends``) knows of the others and asks of them.

``Role`` says which front end a process is and where its siblings answer: a Unix socket each in the
run directory, which also holds the cache's shared table. ``ask_siblings`` fetches one path from every
sibling, so ``/metrics`` and an experiment's ``GET`` describe the whole server whichever front end the
kernel sent the request to. Kept apart from the supervisor, which the HTTP layer has no business
importing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from mlserve.metrics import Metrics
from mlserve.metricsmerge import merge

log = logging.getLogger(__name__)

SOCKET_NAME = "frontend-{}.sock"
"""A front end's Unix socket in the run directory, by its index."""
TABLE_NAME = "cached-rows.table"
"""The cache's table that the front ends share (``mlserve.sharedtable``), in the run directory."""
SIBLING_TIMEOUT_S = 2.0
"""A sibling that does not answer within this is left out of the whole-server answer (and logged)."""
ONE_FRONTEND = "frontend"
"""``?scope=frontend`` (on ``/metrics`` and an experiment's ``GET``): this front end's figures alone,
what a sibling asks for."""
EXPOSITION = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
"""Prometheus's text format, as aioprometheus labels it."""


class Role(msgspec.Struct, frozen=True):
    """Which front end of how many a process is, and where its siblings answer."""

    index: int
    count: int
    run_dir: str
    """A private directory holding each front end's Unix socket and the cache's shared table."""

    def socket_path(self, index: int) -> str:
        return str(Path(self.run_dir) / SOCKET_NAME.format(index))

    @property
    def cache_table(self) -> str:
        return str(Path(self.run_dir) / TABLE_NAME)

    @property
    def own_socket(self) -> str:
        return self.socket_path(self.index)

    @property
    def siblings(self) -> list[str]:
        return [self.socket_path(i) for i in range(self.count) if i != self.index]


async def ask_siblings(role: Role, target: str) -> list[bytes]:
    """``GET target?scope=frontend`` of every sibling over its Unix socket: the bodies of those that
    answered (one that did not is left out, and logged)."""
    timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S)

    async def ask(path: str) -> bytes:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path), timeout=timeout) as session:
            async with session.get(f"http://frontend{target}", params={"scope": ONE_FRONTEND}) as response:
                response.raise_for_status()
                return await response.read()

    answers = await asyncio.gather(*(ask(path) for path in role.siblings), return_exceptions=True)
    bodies = []
    for path, answer in zip(role.siblings, answers):
        if isinstance(answer, BaseException):
            log.warning("front end at %s left out of this answer to %s: %s", path, target,
                        answer or type(answer).__name__)
        else:
            bodies.append(answer)
    return bodies


def whole_server_metrics(metrics: Metrics, role: Role) -> Callable[[web.Request], Any]:
    """The ``/metrics`` handler of a front end among several: its own figures merged with every
    sibling's, so a scrape describes the whole server wherever the kernel sent it.
    ``mlserve_frontends_scraped`` says how many front ends the answer holds."""

    async def handle(request: web.Request) -> web.Response:
        if request.query.get("scope") == ONE_FRONTEND:
            return web.Response(text=metrics.text(), headers=EXPOSITION)
        texts = [metrics.text(), *(body.decode() for body in await ask_siblings(role, "/metrics"))]
        scraped = (
            "# HELP mlserve_frontends_scraped Front ends whose figures this answer holds, of mlserve_frontends.\n"
            f"# TYPE mlserve_frontends_scraped gauge\nmlserve_frontends_scraped {len(texts)}\n"
            "# HELP mlserve_frontends Front-end processes the server runs.\n"
            f"# TYPE mlserve_frontends gauge\nmlserve_frontends {role.count}\n"
        )
        return web.Response(text=merge(texts) + scraped, headers=EXPOSITION)

    return handle
