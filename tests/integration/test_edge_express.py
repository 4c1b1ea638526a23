"""The express lane (edge/express.py): plain fresh hits answered as they are parsed must be
the same answers the full request flow gives, in the same order, and must never answer a
request that needs more than the stored bytes."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from edge.app import EDGE, Edge
from edge.purge import Purge
from tests.edge_fixtures import ScriptedOrigin, body_of

pytestmark = pytest.mark.integration

Upstream = tuple[ScriptedOrigin, TestServer]
Client = TestClient[Any, Any]
FRESH = {"Cache-Control": "public, max-age=600", "ETag": '"v1"'}
JSON = {**FRESH, "Content-Type": "application/json"}
PER_RESPONSE = {"age", "cache-status"}  # numbers that move with the clock


def edge_of(client: Client) -> Edge:
    app = client.app
    assert app is not None
    edge: Edge = app[EDGE]
    return edge


def express_hits(client: Client) -> int:
    return edge_of(client).metrics.express_hits


def without_clock(headers: Any) -> list[tuple[str, str]]:
    return sorted((k.lower(), v) for k, v in headers.items() if k.lower() not in PER_RESPONSE)


async def test_a_plain_hit_takes_the_express_lane_and_matches_the_full_flow(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/q.json", headers=JSON, body=b'{"q": 1}' * 100)
    edge = await make_edge()
    miss = await edge.get("/q.json")
    assert miss.status == 200
    assert express_hits(edge) == 0

    express = await edge.get("/q.json")
    assert express_hits(edge) == 1
    # A Pragma without no-cache changes nothing (RFC 9111 §5.4) but keeps the request off
    # the express lane: the full flow answers the same stored response.
    full = await edge.get("/q.json", headers={"Pragma": "x-kshipra-test"})
    assert express_hits(edge) == 1

    assert await express.read() == await full.read() == b'{"q": 1}' * 100
    assert express.status == full.status == 200
    assert without_clock(express.headers) == without_clock(full.headers)
    assert re.fullmatch(r"test-edge; hit; ttl=\d+", express.headers["Cache-Status"])
    assert int(express.headers["Age"]) >= 0
    assert express.headers["Vary"] == "Accept-Encoding"
    assert express.headers["Accept-Ranges"] == "bytes"
    assert origin.count("/q.json") == 1


async def test_encoded_copies_are_served_on_the_express_lane_once_made(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/big.json", headers=JSON, body=b'{"answer": "' + b"a" * 4000 + b'"}')
    edge = await make_edge()
    await (await edge.get("/big.json")).read()
    br = {"Accept-Encoding": "gzip, deflate, br"}
    made = await edge.get("/big.json", headers=br)  # the full flow makes the Brotli copy
    assert made.headers["Content-Encoding"] == "br"
    before = express_hits(edge)
    express = await edge.get("/big.json", headers=br)
    assert express_hits(edge) == before + 1
    assert express.headers["Content-Encoding"] == "br"
    assert await express.read() == await made.read()
    assert without_clock(express.headers) == without_clock(made.headers)
    identity = await edge.get("/big.json", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in identity.headers
    assert express_hits(edge) == before + 2
    assert origin.count("/big.json") == 1


IDENTITY = {"Accept-Encoding": "identity"}
BR = {"Accept-Encoding": "br"}


@pytest.mark.parametrize(
    ("validators", "status"),
    [
        ({**IDENTITY, "If-None-Match": '"v1"'}, 304),
        ({**IDENTITY, "If-None-Match": 'W/"v1"'}, 304),  # weak comparison (RFC 9110 §13.1.2)
        ({**IDENTITY, "If-None-Match": '"v0", "v1", "v2"'}, 304),
        ({**IDENTITY, "If-None-Match": 'v1, "v2"'}, 200),  # an unquoted tag is no tag
        ({**IDENTITY, "If-None-Match": "*"}, 304),
        ({**IDENTITY, "If-None-Match": '"v0"'}, 200),
        # If-None-Match decides; If-Modified-Since is then ignored (RFC 9110 §13.2.2)
        (
            {**IDENTITY, "If-None-Match": '"v0"', "If-Modified-Since": "Fri, 27 Nov 2099 0:0:0"},
            200,
        ),
        # The Brotli copy has its own validator; the identity one does not validate it.
        ({**BR, "If-None-Match": '"v1-br"'}, 304),
        ({**BR, "If-None-Match": '"v1"'}, 200),
    ],
)
async def test_revalidations_are_answered_on_the_express_lane_like_the_full_flow(
    upstream: Upstream, make_edge: Any, validators: dict[str, str], status: int
) -> None:
    origin, _ = upstream
    origin.script("/v.json", headers=JSON, body=b'{"v": 1}' * 64)
    edge = await make_edge()
    for warm in (IDENTITY, BR):  # the full flow stores the response and makes its br copy
        await (await edge.get("/v.json", headers=warm)).read()
    express = await edge.get("/v.json", headers=validators)
    assert express_hits(edge) == 1
    full = await edge.get("/v.json", headers={**validators, "Pragma": "x-kshipra-test"})
    assert express_hits(edge) == 1
    assert express.status == full.status == status
    assert without_clock(express.headers) == without_clock(full.headers)
    assert await express.read() == await full.read()
    if status == 304:
        assert "Content-Type" not in express.headers
        assert "Content-Length" not in express.headers
        br = validators["Accept-Encoding"] == "br"
        assert express.headers["ETag"] == ('"v1-br"' if br else '"v1"')
    assert origin.count("/v.json") == 1


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Range": "bytes=0-9"}, 206),
        ({"If-Modified-Since": "Fri, 27 Nov 2099 00:00:00 GMT"}, 304),
        ({"If-None-Match": '"v1"', "If-Range": '"v1"', "Range": "bytes=0-1"}, 304),
        ({"If-Match": '"other"'}, 412),
        ({"Cache-Control": "max-age=0"}, 200),
        ({"Cache-Control": "only-if-cached"}, 200),
        ({"Pragma": "no-cache"}, 200),
    ],
)
async def test_requests_that_ask_for_more_take_the_full_flow(
    upstream: Upstream, make_edge: Any, headers: dict[str, str], status: int
) -> None:
    origin, _ = upstream
    origin.script("/r.bin", headers={**FRESH, "Content-Type": "video/mp4"}, body=body_of(5000))
    edge = await make_edge()
    await (await edge.get("/r.bin")).read()
    response = await edge.get("/r.bin", headers=headers)
    assert response.status == status
    assert express_hits(edge) == 0
    if status == 206:
        assert response.headers["Content-Range"] == "bytes 0-9/5000"
        assert await response.read() == body_of(5000)[:10]


async def test_stale_soft_purged_and_non_get_requests_are_not_express(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/s.txt", headers={"Cache-Control": "max-age=0", "ETag": '"s"'}, body=b"S")
    origin.script("/p.txt", headers=FRESH, body=b"P")
    edge = await make_edge()
    for path in ("/s.txt", "/p.txt"):
        await (await edge.get(path)).read()
    stale = await edge.get("/s.txt")  # stored but never fresh: revalidated upstream
    assert await stale.read() == b"S"
    assert origin.count("/s.txt") == 2

    head = await edge.head("/p.txt")
    assert head.status == 200
    assert head.headers["Content-Length"] == "1"
    assert express_hits(edge) == 0

    await edge_of(edge).apply_purges([Purge("url", "/p.txt", True, "local-1", 0.0)])
    after = await edge.get("/p.txt")  # soft-purged: revalidated before it is served
    assert await after.read() == b"P"
    assert after.headers["Cache-Status"].startswith("test-edge; fwd=stale")
    assert express_hits(edge) == 0


async def test_an_oversized_header_block_is_refused_even_for_a_hit(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/h.txt", headers=FRESH, body=b"H")
    edge = await make_edge()
    await (await edge.get("/h.txt")).read()
    headers = {f"X-Pad-{i}": "p" * 4000 for i in range(9)}  # 36 KB in all, each line legal
    response = await edge.get("/h.txt", headers=headers)
    assert response.status == 431
    assert express_hits(edge) == 0


# ---- one connection, several requests ---------------------------------------------------------


async def raw_exchange(client: Client, payload: bytes, responses: int) -> list[tuple[int, bytes]]:
    """Write *payload* (pipelined requests) on one connection; read *responses* answers as
    (status, body), in order."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(payload)
        await writer.drain()
        answers = []
        for _ in range(responses):
            status_line = await reader.readline()
            status = int(status_line.split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            answers.append((status, await reader.readexactly(length)))
        return answers
    finally:
        writer.close()
        await writer.wait_closed()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: cdn.example\r\n\r\n".encode()


async def test_pipelined_requests_keep_their_order_across_both_lanes(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    for name in "abc":
        origin.script(f"/{name}", headers=FRESH, body=name.encode() * 10)
    gate = asyncio.Event()
    origin.script("/slow", headers=FRESH, body=b"slow", gate=gate)
    edge = await make_edge()
    for name in "abc":
        await (await edge.get(f"/{name}")).read()

    # hit, miss held upstream, hits queued behind it, a 404, a hit: answers in request order
    payload = get("/a") + get("/slow") + get("/b") + get("/c") + get("/none") + get("/a")
    exchange = asyncio.create_task(raw_exchange(edge, payload, 6))
    while origin.count("/slow") == 0:
        await origin.arrived.wait()
        origin.arrived.clear()
    assert not exchange.done()
    gate.set()
    answers = await exchange
    assert answers == [
        (200, b"a" * 10),
        (200, b"slow"),
        (200, b"b" * 10),
        (200, b"c" * 10),
        (404, b"no script"),
        (200, b"a" * 10),
    ]
    assert express_hits(edge) == 1  # only the first: the rest queued behind the miss


async def test_a_reader_that_falls_behind_gets_every_response_whole_and_in_order(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    big = body_of(1024 * 1024, "seg")
    origin.script("/seg.m4s", headers={**FRESH, "Content-Type": "video/mp4"}, body=big)
    origin.script("/tiny", headers=FRESH, body=b"t")
    edge = await make_edge()
    for path in ("/seg.m4s", "/tiny"):
        await (await edge.get(path)).read()
    # 30 MiB of answers asked for before reading any: the socket fills, writing pauses and
    # the rest must wait for it rather than jump the queue.
    paths = ["/seg.m4s", "/tiny"] * 15
    answers = await raw_exchange(edge, b"".join(get(path) for path in paths), len(paths))
    assert [body for _, body in answers] == [big if p == "/seg.m4s" else b"t" for p in paths]
    assert all(status == 200 for status, _ in answers)
    assert 0 < express_hits(edge) <= len(paths)


async def test_a_keep_alive_connection_moves_between_the_lanes(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/k", headers=FRESH, body=b"k")
    origin.script("/m", headers={"Cache-Control": "no-store"}, body=b"m")
    edge = await make_edge()
    await (await edge.get("/k")).read()
    answers = []
    for path in ["/k", "/m", "/k", "/k", "/m", "/k"]:
        payload = get(path)
        answers += await raw_exchange(edge, payload, 1)
    assert [body for _, body in answers] == [b"k", b"m", b"k", b"k", b"m", b"k"]
    # Each new connection's first request takes the lane (4); on one connection, the hit
    # behind a request handed to the full flow waits its turn there (1 more, not 2).
    one = await raw_exchange(edge, b"".join(get(p) for p in ["/k", "/m", "/k"]), 3)
    assert [body for _, body in one] == [b"k", b"m", b"k"]
    assert express_hits(edge) == 5


async def test_http10_and_connection_close_take_the_full_flow(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/c", headers=FRESH, body=b"c")
    edge = await make_edge()
    await (await edge.get("/c")).read()
    for request in (
        b"GET /c HTTP/1.0\r\nHost: cdn.example\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: cdn.example\r\nConnection: close\r\n\r\n",
    ):
        assert await raw_exchange(edge, request, 1) == [(200, b"c")]
    assert express_hits(edge) == 0
