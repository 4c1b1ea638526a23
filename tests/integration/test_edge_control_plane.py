"""The edge is not a door to the control plane: only content paths are proxied, the origin's
``/v1/`` API never, and ``/metrics`` is for this machine or the fleet's token."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from edge.stages import proxied
from tests.conftest import PURGE_TOKEN
from tests.edge_fixtures import ScriptedOrigin

pytestmark = pytest.mark.integration

Upstream = tuple[ScriptedOrigin, TestServer]
CONTENT = ("/content/",)


@pytest.mark.parametrize(
    ("path", "prefixes", "expected"),
    [
        ("/content/bundles/a/latest.json", CONTENT, True),
        ("/content", CONTENT, False),
        ("/v1/jobs", CONTENT, False),
        ("/v1/jobs", ("/",), False),  # never, whatever the configuration says
        ("/v1", ("/",), False),
        ("/v1/purge", ("/v1/",), False),
        ("/v10/x", ("/",), True),
        ("/static/app.js", ("/content/", "/static/"), True),
        ("/readme", CONTENT, False),
    ],
)
def test_what_is_proxied(path: str, prefixes: tuple[str, ...], expected: bool) -> None:
    assert proxied(path, prefixes) is expected


@pytest.mark.parametrize(
    "target",
    [
        "/v1/jobs",
        "/v1/purge",
        "/content/../v1/jobs",
        "/content/%2e%2e/v1/jobs",
        "/%761/jobs",
        "//v1/jobs",
        "/v1/assets?limit=1",
        "/admin",
    ],
)
async def test_the_control_api_is_not_reachable_through_the_edge(
    upstream: Upstream, make_edge: Any, target: str
) -> None:
    origin, _ = upstream
    origin.script("/v1/jobs", body=b"secret queue")
    origin.script("/v1/purge", body=b"purged!")
    origin.script("/v1/assets", body=b"catalogue")
    origin.script("/admin", body=b"admin")
    edge = await make_edge(proxy_prefixes=CONTENT)
    assert edge.server.port is not None
    for method in ("GET", "POST"):
        # Raw bytes: an HTTP client library would tidy the target before sending it.
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.server.port)
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: cdn.example\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404 "), (method, target, answer[:80])
        assert b"not served through this edge" in answer
    assert origin.seen == []  # nothing reached the origin


async def test_content_is_proxied(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/content/x", headers={"Cache-Control": "max-age=60"}, body=b"lesson")
    edge = await make_edge(proxy_prefixes=CONTENT)
    response = await edge.get("/content/x")
    assert (response.status, await response.read()) == (200, b"lesson")


async def test_metrics_from_another_host_need_the_fleet_token(
    make_edge: Any,
) -> None:
    edge = await make_edge(proxy_prefixes=CONTENT, purge_token=PURGE_TOKEN)
    assert (await edge.get("/metrics")).status == 200  # this machine: open
    url = str(edge.make_url("/metrics"))
    # 127.0.0.2 is another source address: the edge sees a peer that is not this host's
    # loopback address.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url) as response:
            assert response.status == 401
        async with session.get(url, headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 403
        async with session.get(url, headers={"Authorization": f"bearer {PURGE_TOKEN}"}) as response:
            assert response.status == 200
            assert "kshipra_edge_hits_total" in await response.text()
