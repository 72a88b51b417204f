"""Who may change what the server serves: the admin token, and the refusal on an open address.

Read routes stay open; every mutating route needs ``Authorization: Bearer <token>`` once a token is
set, and the token never shows up in the log (even at DEBUG with the access log on), in listings or
in error bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from mlserve.demo_models import IRIS
from serverproc import ServerProc, assert_error, assert_ok, call

TOKEN = "s3cret-admin-token-9f8e7d"
MUTATING = [
    f"/models/{IRIS}/versions/v1/activate",
    f"/models/{IRIS}/versions/v1/load",
    f"/models/{IRIS}/versions/v1/unload",
    "/models/rescan",
]
StartServer = Callable[..., ServerProc]


async def test_mutating_routes_need_the_token(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    server = start_server(demo_models_dir, env={"MLSERVE_ADMIN_TOKEN": TOKEN, "MLSERVE_LOG_LEVEL": "DEBUG",
                                                "MLSERVE_ACCESS_LOG": "true"})
    refusals = []
    for path in MUTATING:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}):
            reply = await call(http, "POST", server.url(path), headers=headers)
            assert_error(reply, 401)
            assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer"), dict(reply.headers)
            refusals.append(reply.text)
    assert (await call(http, "GET", server.url("/models"))).status == 200, "read routes stay open"
    assert (await call(http, "GET", server.url(f"/models/{IRIS}/versions"))).status == 200
    versions = assert_ok(await call(http, "GET", server.url(f"/models/{IRIS}/versions")))
    assert versions["active_version"] == "v2", "no refused call changed anything"

    authorized = {"Authorization": f"Bearer {TOKEN}"}
    body = assert_ok(await call(http, "POST", server.url(MUTATING[0]), headers=authorized))
    assert body == {"model": IRIS, "active_version": "v1", "previous_version": "v2"}
    refused = await call(http, "POST", server.url(f"/models/{IRIS}/versions/v1/unload"), headers=authorized)
    assert_error(refused, 409)
    assert assert_ok(await call(http, "POST", server.url("/models/rescan"), headers=authorized))["added"] == []

    listing = (await call(http, "GET", server.url("/models"))).text
    metrics = (await call(http, "GET", server.url("/metrics"))).text
    server.stop()
    for where, text in [("the log", server.log()), ("/models", listing), ("/metrics", metrics),
                        ("error bodies", "\n".join(refusals + [refused.text]))]:
        assert TOKEN not in text, f"the token shows in {where}"
    assert "POST /models/rescan" in server.log(), "the access log was on, so the test saw requests logged"


@pytest.mark.parametrize("host", ["0.0.0.0"])
async def test_open_address_without_a_token_refuses_admin_routes(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path, host: str
) -> None:
    """Listening beyond loopback with no token: 403 saying how to set one, and a warning at start.

    The test binds every interface but talks to it over 127.0.0.1 only."""
    server = start_server(demo_models_dir, host=host)
    for path in MUTATING:
        message = assert_error(await call(http, "POST", server.url(path)), 403)
        assert "MLSERVE_ADMIN_TOKEN" in message, message
    assert "WARNING" in server.log() and "admin routes" in server.log()
    assert (await call(http, "GET", server.url("/models"))).status == 200
    assert assert_ok(await call(http, "POST", server.url("/predict"), json_body={"features": [5.1, 3.5, 1.4, 0.2]}))


async def test_open_address_with_a_token_accepts_it(
    http: aiohttp.ClientSession, start_server: StartServer, demo_models_dir: Path
) -> None:
    server = start_server(demo_models_dir, host="0.0.0.0", env={"MLSERVE_ADMIN_TOKEN": TOKEN})
    assert_error(await call(http, "POST", server.url(MUTATING[0])), 401)
    reply = await call(http, "POST", server.url(MUTATING[0]), headers={"Authorization": f"bearer {TOKEN}"})
    assert assert_ok(reply)["active_version"] == "v1", "the scheme is case-insensitive"
    assert "admin routes" not in server.log()
