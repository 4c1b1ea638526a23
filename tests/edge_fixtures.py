"""Test-side HTTP servers for the edge: a scripted upstream (any HTTP origin the edge may sit
in front of, answering exactly the headers a test wants), and the edge itself as a real server
on loopback."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cdn_config import EdgeConfig
from common.http import ByteSpan, Unsatisfiable, select_range
from common.serving import make_runner
from edge.app import create_app

_WIRING = ("upstream_url", "purge_token", "redis_url")


def edge_app(**fields: Any) -> web.Application:
    """An edge application from flat keyword arguments: ``upstream_url``, ``purge_token`` and
    ``redis_url`` (where it connects), the rest :class:`cdn_config.EdgeConfig`'s fields (a
    ``disk_dir`` may be a :class:`~pathlib.Path`; ``proxy_prefixes`` default to ``("/",)``:
    scripted upstreams serve any path)."""
    wiring = {name: fields.pop(name) for name in _WIRING if name in fields}
    if isinstance(fields.get("disk_dir"), Path):
        fields["disk_dir"] = str(fields["disk_dir"])
    fields.setdefault("proxy_prefixes", ("/",))
    fields.setdefault("city", "test")
    return create_app(EdgeConfig(**fields), **wiring)


class EdgeServer(TestServer):
    """An edge application on loopback with the runner ``kshipra edge`` uses (its
    connections take the express lane for plain fresh hits)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return make_runner(self.app, **kwargs)


@dataclass
class Script:
    """How the upstream answers one path. Tests change it between requests."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"hello"
    gate: asyncio.Event | None = None
    """When set, requests wait for the event before answering (to hold a fetch in flight)."""
    answer_304_to: str | None = None
    """An ETag: conditional requests carrying it get a 304 with ``headers_304``."""
    headers_304: dict[str, str] = field(default_factory=dict)
    ranges: bool = False
    """Honour Range requests (206) like a real file server."""
    drop_connection: bool = False


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class ScriptedOrigin:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.seen: list[Seen] = []
        self.bodies: list[bytes] = []
        self.arrived = asyncio.Event()

    def script(self, path: str, **kwargs: Any) -> Script:
        self.scripts[path] = Script(**kwargs)
        return self.scripts[path]

    def count(self, path: str) -> int:
        return sum(1 for seen in self.seen if seen.path == path)

    def requests_to(self, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path_qs, dict(request.headers)))
        self.arrived.set()
        script = self.scripts.get(request.path)
        if script is None:
            return web.Response(status=404, text="no script")
        if script.gate is not None:
            await script.gate.wait()
        if request.can_read_body:  # an origin reads the whole request before it answers
            self.bodies.append(await request.read())
        if script.drop_connection:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        if script.answer_304_to is not None and script.answer_304_to in request.headers.get(
            "If-None-Match", ""
        ):
            return web.Response(status=304, headers=script.headers_304)
        headers = dict(script.headers)
        range_header = request.headers.get("Range")
        if script.ranges and range_header and script.status == 200:
            etag = headers.get("ETag", '"x"')
            decision = select_range(
                range_header,
                size_bytes=len(script.body),
                etag=etag,
                last_modified=datetime.now(UTC),
            )
            if isinstance(decision, ByteSpan):
                if_match = request.headers.get("If-Match")
                if if_match is not None and if_match != etag:
                    return web.Response(status=412)
                headers["Content-Range"] = decision.content_range(len(script.body))
                return web.Response(
                    status=206,
                    headers=headers,
                    body=script.body[decision.start : decision.start + decision.length],
                )
            if isinstance(decision, Unsatisfiable):
                return web.Response(status=416)
        return web.Response(status=script.status, headers=headers, body=script.body)


def body_of(size: int, seed: str = "x") -> bytes:
    """*size* deterministic bytes that do not compress."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@pytest.fixture
async def upstream(aiohttp_server: Any) -> tuple[ScriptedOrigin, TestServer]:
    origin = ScriptedOrigin()
    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_route("*", "/{tail:.*}", origin.handle)
    server: TestServer = await aiohttp_server(app)
    return origin, server


@pytest.fixture
def make_edge(
    aiohttp_client: Any, upstream: tuple[ScriptedOrigin, TestServer], tmp_path: Path
) -> Callable[..., Any]:
    """``await make_edge(**settings)`` → a client of a real edge server in front of the
    scripted upstream (disk tier in tmp_path unless ``disk_dir=None``)."""
    _, server = upstream

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        values: dict[str, Any] = {
            "name": "test-edge",
            "upstream_url": str(server.make_url("")).rstrip("/"),
            "cache_host": "cdn.example",
            "disk_dir": tmp_path / "edge-disk",
            "memory_bytes": 16 * 1024**2,
            "disk_bytes": 256 * 1024**2,
            "upstream_timeout_s": 5.0,
        }
        client: TestClient[Any, Any] = await aiohttp_client(
            EdgeServer(edge_app(**{**values, **overrides}))
        )
        return client

    return make
