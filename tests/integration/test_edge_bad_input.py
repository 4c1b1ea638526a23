"""Hostile and broken requests at the edge: malformed messages, smuggling attempts, cache
poisoning through Host-like headers, path and query tricks, and invalid or absurd ranges.

Each gets a clear 4xx or the correct normalised answer: never a 5xx, never a poisoned entry,
and the edge keeps answering afterwards. Wire-level cases go over a raw socket to a real edge
server on loopback (an HTTP client library would refuse to send them, or would fix them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from tests.edge_fixtures import ScriptedOrigin, body_of

pytestmark = pytest.mark.integration

Upstream = tuple[ScriptedOrigin, TestServer]
Client = TestClient[Any, Any]

PAGE = b"<html>the real page</html>"
CACHEABLE = {"Cache-Control": "max-age=600", "Content-Type": "text/html"}
EVIL = "evil.example"


# ---- a raw HTTP/1.1 exchange -----------------------------------------------------------------


@dataclass
class Answer:
    status: int
    status_line: bytes
    headers: CIMultiDict[str]
    body: bytes
    rest: bytes
    """Bytes after the first response: must be empty (no second, smuggled response)."""

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, _, rest = data.partition(b"\r\n")
            return body, rest
        body, data = body + data[:size], data[size + 2 :]


def parse_answer(raw: bytes) -> Answer:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response, got {raw[:300]!r}"
    status_line, *lines = head.split(b"\r\n")
    assert status_line.startswith(b"HTTP/"), status_line
    status = int(status_line.split(b" ")[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(b":")
        headers.add(name.decode("latin-1").strip(), value.decode("latin-1").strip())
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body, rest = _dechunk(rest)
    else:
        length = int(headers.get("Content-Length", str(len(rest))))
        body, rest = rest[:length], rest[length:]
    return Answer(status, status_line, headers, body, rest)


async def exchange(edge: Client, data: bytes) -> Answer:
    """Send *data* on a fresh connection and read until the edge closes it (every request
    here asks for ``Connection: close``, and a server must close after a framing error)."""
    reader, writer = await asyncio.open_connection(edge.server.host, edge.server.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parse_answer(raw)


def request_bytes(
    target: str, *headers: str, method: str = "GET", host: str = "student.example"
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_get(
    edge: Client, target: str, *headers: str, host: str = "student.example"
) -> Answer:
    return await exchange(edge, request_bytes(target, *headers, host=host))


def cache_status(answer: Any) -> str:
    return str(answer.headers["Cache-Status"])


def assert_json_error(answer: Answer, status: int) -> None:
    assert answer.status == status, (answer.status_line, answer.body)
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["status"] == status
    assert error["message"]


async def assert_still_serving(edge: Client) -> None:
    response = await edge.get("/page")
    assert response.status == 200
    assert await response.read() == PAGE


# ---- malformed messages on the wire ------------------------------------------------------------

SMUGGLED = b"GET /poison HTTP/1.1\r\nHost: student.example\r\n\r\n"
H = b"Host: student.example\r\n"

WIRE_CASES = [
    pytest.param(b"GARBAGE\r\n\r\n", id="request-line-without-target-or-version"),
    pytest.param(b"GET /page HTTP/1.1 extra\r\n" + H + b"\r\n", id="request-line-extra-token"),
    pytest.param(b"GET /page HTTP/9.9\r\n" + H + b"\r\n", id="unknown-http-version"),
    pytest.param(b"G(T /page HTTP/1.1\r\n" + H + b"\r\n", id="method-with-separator"),
    pytest.param(b"GET /pa ge HTTP/1.1\r\n" + H + b"\r\n", id="space-in-target"),
    pytest.param(b"GET /page\x00 HTTP/1.1\r\n" + H + b"\r\n", id="nul-in-target"),
    pytest.param(b"GET /page\r\n\r\n", id="http-0.9-style-request"),
    pytest.param(b"GET /page HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n", id="header-without-colon"),
    pytest.param(b"GET /page HTTP/1.1\r\n" + H + b"Bad Name: v\r\n\r\n", id="space-in-field-name"),
    pytest.param(b"GET /page HTTP/1.1\r\n" + H + b"X-A : v\r\n\r\n", id="space-before-colon"),
    pytest.param(b"GET /page HTTP/1.1\r\n" + H + b"X-A: a\r\n  b\r\n\r\n", id="obs-fold"),
    pytest.param(
        b"GET /page HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", id="control-char-in-value"
    ),
    pytest.param(b"GET /page HTTP/1.1\r\n\r\n", id="http-1.1-without-host"),
    pytest.param(b"GET /page HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n", id="two-hosts"),
    pytest.param(
        b"GET /page HTTP/1.1\r\n" + H + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n",
        id="header-line-over-8190-bytes",
    ),
    pytest.param(
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", id="request-line-over-8190-bytes"
    ),
    pytest.param(
        b"GET /page HTTP/1.1\r\n" + H + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
        id="too-many-header-fields",
    ),
    pytest.param(
        b"POST /page HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        id="content-length-and-transfer-encoding",
    ),
    pytest.param(
        b"GET /page HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 44\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        id="transfer-encoding-and-content-length-on-get",
    ),
    pytest.param(
        b"POST /page HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nContent-Length: 49\r\n\r\nhello"
        + SMUGGLED,
        id="conflicting-content-lengths",
    ),
    pytest.param(
        b"POST /page HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", id="negative-content-length"
    ),
    pytest.param(
        b"POST /page HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n",
        id="content-length-overflow",
    ),
    pytest.param(
        b"POST /page HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        id="chunked-not-last-coding",
    ),
    pytest.param(
        b"POST /page HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        id="unknown-transfer-coding",
    ),
    pytest.param(
        b"POST /page HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"ZZ\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
        id="invalid-chunk-size",
    ),
    pytest.param(b"GET /page HTTP/1.1\n" + H.replace(b"\r", b"") + b"\n", id="bare-lf-everywhere"),
    pytest.param(b"GET /page HTTP/1.1\r\nHost: student.example\nX-A: b\r\n\r\n", id="bare-lf"),
    pytest.param(
        b"GET http://evil.example/page HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
        id="absolute-form-other-host",
    ),
]


@pytest.mark.parametrize("data", WIRE_CASES)
async def test_malformed_messages_get_a_4xx_and_the_edge_keeps_serving(
    upstream: Upstream, make_edge: Any, data: bytes
) -> None:
    origin, _ = upstream
    origin.script("/page", headers=CACHEABLE, body=PAGE)
    origin.script("/poison", headers=CACHEABLE, body=b"<html>poison</html>")
    edge = await make_edge()
    answer = await exchange(edge, data)
    assert answer.status_line.split(b" ")[1] in (b"400", b"413", b"431"), answer.status_line
    assert answer.rest == b"", "a second response followed the error: a request was smuggled"
    assert origin.count("/poison") == 0
    assert origin.count("/page") == 0  # refused before anything went upstream
    await assert_still_serving(edge)
    assert origin.count("/poison") == 0


async def test_an_enormous_header_block_is_refused(upstream: Upstream, make_edge: Any) -> None:
    """Every line is under aiohttp's 8190-byte limit and the count under its 128, yet the block
    is ~800 KB: an edge must not buffer that per request nor forward it to its upstream."""
    origin, _ = upstream
    origin.script("/page", headers=CACHEABLE, body=PAGE)
    edge = await make_edge()
    filler = [f"X-Filler-{i}: {'v' * 8000}" for i in range(100)]
    answer = await raw_get(edge, "/page", *filler)
    assert answer.status in (400, 431), answer.status_line
    assert origin.count("/page") == 0
    await assert_still_serving(edge)


# ---- the cache key's host comes from configuration ---------------------------------------------


async def test_host_and_x_forwarded_host_cannot_poison_the_cache(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, server = upstream
    origin.script("/page", headers=CACHEABLE, body=PAGE)
    edge = await make_edge()
    tricked = await raw_get(edge, "/page", f"X-Forwarded-Host: {EVIL}", host=EVIL)
    assert tricked.status == 200
    assert tricked.body == PAGE
    received = origin.seen[-1].headers
    assert received["Host"] == f"{server.host}:{server.port}"  # the upstream's own authority
    assert "X-Forwarded-Host" not in received
    assert EVIL not in json.dumps(received)

    plain = await edge.get("/page")  # an ordinary student, another Host: the same entry
    assert cache_status(plain).startswith("test-edge; hit")
    assert await plain.read() == PAGE
    other_host = await raw_get(edge, "/page", host="student.example:8443")
    assert cache_status(other_host).startswith("test-edge; hit")
    assert origin.count("/page") == 1


async def test_no_host_like_header_reaches_upstream_on_any_path(
    upstream: Upstream, make_edge: Any
) -> None:
    """Uncacheable GETs and unsafe methods are passed upstream: they must not carry the
    client's host either (an origin that builds links from it would answer for evil.example)."""
    origin, server = upstream
    origin.script("/private", headers={"Cache-Control": "private"}, body=b"mine")
    origin.script("/form", headers={"Cache-Control": "no-store"}, body=b"posted")
    edge = await make_edge()
    tricks = (f"X-Forwarded-Host: {EVIL}",)
    for _ in range(2):  # the second is a hit-for-miss bypass: another code path
        assert (await raw_get(edge, "/private", *tricks, host=EVIL)).status == 200
    posted = await exchange(
        edge,
        request_bytes("/form", *tricks, "Content-Length: 2", method="POST", host=EVIL) + b"ok",
    )
    assert posted.status == 200
    assert [seen.path for seen in origin.seen] == ["/private", "/private", "/form"]
    for seen in origin.seen:
        assert seen.headers["Host"] == f"{server.host}:{server.port}"
        assert EVIL not in json.dumps(seen.headers), seen


async def test_forwarded_host_does_not_reach_upstream(upstream: Upstream, make_edge: Any) -> None:
    """RFC 7239 ``Forwarded: host=`` is the standard spelling of X-Forwarded-Host: an origin
    behind a proxy-aware framework builds absolute links from it, and the edge would cache
    that answer under the configured host for everyone."""
    origin, _ = upstream
    origin.script("/page", headers=CACHEABLE, body=PAGE)
    edge = await make_edge()
    answer = await raw_get(edge, "/page", f"Forwarded: host={EVIL};proto=http", host=EVIL)
    assert answer.status == 200
    assert EVIL not in json.dumps(origin.seen[-1].headers), origin.seen[-1].headers


OVERRIDES = [
    "X-Original-URL: /admin",
    "X-Rewrite-URL: /admin",
    "X-Forwarded-Scheme: nothttps",
    "X-Forwarded-Proto: nothttps",
    "X-Forwarded-Server: evil.example",
    "X-Forwarded-Prefix: /evil",
    "X-Forwarded-Port: 6666",
    "X-Host: evil.example",
    "X-HTTP-Method-Override: DELETE",
]


@pytest.mark.parametrize("header", OVERRIDES, ids=[h.split(":")[0] for h in OVERRIDES])
async def test_override_headers_the_edge_does_not_key_on_never_reach_upstream(
    upstream: Upstream, make_edge: Any, header: str
) -> None:
    """An origin framework that honours one of these would answer for another URL, scheme,
    host or method, and the edge would cache that answer for every student."""
    origin, _ = upstream
    origin.script("/page", headers=CACHEABLE, body=PAGE)
    origin.script("/private", headers={"Cache-Control": "private"}, body=b"mine")
    origin.script("/form", headers={"Cache-Control": "no-store"}, body=b"posted")
    edge = await make_edge()
    name, _, value = header.partition(": ")
    assert (await raw_get(edge, "/page", header)).status == 200
    assert (await raw_get(edge, "/private", header)).status == 200
    posted = await exchange(
        edge, request_bytes("/form", header, "Content-Length: 2", method="POST") + b"ok"
    )
    assert posted.status == 200
    assert len(origin.seen) == 3
    for seen in origin.seen:
        assert name.lower() not in {key.lower() for key in seen.headers}, seen
        assert value not in json.dumps(seen.headers)


# ---- path and query normalisation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "upstream_path"),
    [
        pytest.param(
            ["/b", "/a/../b", "//b", "/a/./../b", "/./b", "/a/%2e%2e/b", "///b"], "/b", id="dots"
        ),
        pytest.param(["/a~b", "/a%7Eb", "/a%7eb", "/%61~b"], "/a~b", id="unreserved"),
        pytest.param(["/x%3Ay", "/x%3ay"], "/x%3Ay", id="percent-case"),
        pytest.param(
            ["/q?a=1&b=2", "/q?b=2&a=1", "/q?&a=1&&b=2&", "/q?%61=1&b=2"], "/q?a=1&b=2", id="query"
        ),
    ],
)
async def test_equivalent_targets_share_one_entry(
    upstream: Upstream, make_edge: Any, targets: list[str], upstream_path: str
) -> None:
    origin, _ = upstream
    script_path = upstream_path.partition("?")[0].replace("%3A", ":")
    origin.script(script_path, headers=CACHEABLE, body=PAGE)
    edge = await make_edge()
    for target in targets:
        answer = await raw_get(edge, target)
        assert answer.status == 200, (target, answer.status_line, answer.body)
        assert answer.body == PAGE
    assert [seen.path for seen in origin.seen] == [upstream_path]  # one fetch, normalised
    hit = await raw_get(edge, targets[-1])
    assert cache_status(hit).startswith("test-edge; hit")


@pytest.mark.parametrize(
    "target",
    [
        "/../x",
        "/%2e%2e/x",
        "/%2E%2E/x",
        "/.%2e/x",
        "/a/../../x",
        "/a/%2e%2e/%2e%2e/x",
        "/a%2Fb",
        "/a%2fb",
        "/a/..%2fx",
        "/a%5Cb",
        "/a%00b",
        "/a%zzb",
        "/a%4",
        "/a\\b",
    ],
)
async def test_path_tricks_are_refused_with_a_json_400(
    upstream: Upstream, make_edge: Any, target: str
) -> None:
    origin, _ = upstream
    origin.script("/x", headers=CACHEABLE, body=b"x")
    edge = await make_edge()
    answer = await raw_get(edge, target)
    assert_json_error(answer, 400)
    assert origin.seen == []


# ---- Range ---------------------------------------------------------------------------------------

DOC = body_of(1000)


async def cached_doc(upstream: Upstream, make_edge: Any) -> Client:
    origin, _ = upstream
    origin.script(
        "/doc",
        headers={
            "Cache-Control": "max-age=600",
            "ETag": '"doc"',
            "Content-Type": "application/octet-stream",
        },
        body=DOC,
        ranges=True,
    )
    edge = await make_edge()
    assert await (await edge.get("/doc")).read() == DOC
    return edge


@pytest.mark.parametrize(
    "value",
    [
        "bytes=abc",
        "bytes=5-1",
        "bytes=99999999999999999999-",
        "bytes=-0",
        "bytes=",
        "bytes=-",
        "bytes=1-2-3",
        "bytes=1000-",
        pytest.param("bytes=" + "9" * 5000 + "-", id="5000-digit-first-byte"),
        # Arabic-Indic digits are not DIGIT (RFC 9110 §14.1.1)
        pytest.param("bytes=\u0661-\u0662", id="non-ascii-digits"),
    ],
)
async def test_invalid_and_unsatisfiable_ranges_are_416(
    upstream: Upstream, make_edge: Any, value: str
) -> None:
    origin, _ = upstream
    edge = await cached_doc(upstream, make_edge)
    answer = await raw_get(edge, "/doc", f"Range: {value}")
    assert_json_error(answer, 416)
    assert answer.headers["Content-Range"] == f"bytes */{len(DOC)}"
    whole = await edge.get("/doc")  # the stored object is untouched
    assert whole.status == 200
    assert await whole.read() == DOC
    assert origin.count("/doc") == 1


@pytest.mark.parametrize(
    "value", ["items=0-1", "bytes=0-1,5-9", "bytes=0-1, -5", "0-1", "bytes 0-1", "none"]
)
async def test_ranges_the_edge_may_ignore_get_the_full_object(
    upstream: Upstream, make_edge: Any, value: str
) -> None:
    origin, _ = upstream
    edge = await cached_doc(upstream, make_edge)
    response = await edge.get("/doc", headers={"Range": value})
    assert response.status == 200
    assert "Content-Range" not in response.headers
    assert await response.read() == DOC
    assert origin.count("/doc") == 1


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("bytes=990-99999999999999999999999", id="23-digit-last-byte"),
        pytest.param("bytes=990-" + "9" * 5000, id="5000-digit-last-byte"),
    ],
)
async def test_an_absurd_last_byte_is_clamped(
    upstream: Upstream, make_edge: Any, value: str
) -> None:
    edge = await cached_doc(upstream, make_edge)
    answer = await raw_get(edge, "/doc", f"Range: {value}")
    assert answer.status == 206, (answer.status_line, answer.body[:200])
    assert answer.headers["Content-Range"] == "bytes 990-999/1000"
    assert answer.body == DOC[990:]


async def test_an_invalid_range_on_a_miss_stores_the_whole_object(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script(
        "/fresh",
        headers={"Cache-Control": "max-age=600", "Content-Type": "application/octet-stream"},
        body=DOC,
        ranges=True,
    )
    edge = await make_edge()
    first = await edge.get("/fresh", headers={"Range": "bytes=abc"})
    assert first.status == 416
    assert first.headers["Content-Range"] == "bytes */1000"
    second = await edge.get("/fresh")
    assert cache_status(second).startswith("test-edge; hit")
    assert await second.read() == DOC
    assert origin.count("/fresh") == 1


# ---- absurd values in the fields the edge interprets --------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        pytest.param("Cache-Control: max-stale=" + "9" * 5000, id="5000-digit-max-stale"),
        pytest.param("Cache-Control: max-age=" + "9" * 5000, id="5000-digit-max-age"),
        pytest.param("Cache-Control: min-fresh=" + "9" * 5000, id="5000-digit-min-fresh"),
        # str.isdigit() says yes to a superscript two; int() says no
        pytest.param("Cache-Control: max-age=\u00b2", id="superscript-digit-max-age"),
        "Cache-Control: max-age=-5, min-fresh=abc, max-stale=1.5",
        'Cache-Control: no-cache="unterminated',
        "Accept-Encoding: br;q=nan, gzip;q=inf, *;q=-1",
        pytest.param("Accept-Encoding: " + ", ".join(["x;q=abc"] * 300), id="300-codings"),
        "If-Modified-Since: Mon, 99 Foo 99999 99:99:99 GMT",
        "If-Modified-Since: Fri, 31 Dec 9999 23:59:59 -2359",
        pytest.param("If-Unmodified-Since: " + "9" * 5000, id="5000-digit-date"),
        'If-None-Match: "unterminated',
        'If-None-Match: ,,,W/,"",',
    ],
)
async def test_absurd_request_fields_never_make_a_5xx(
    upstream: Upstream, make_edge: Any, field: str
) -> None:
    edge = await cached_doc(upstream, make_edge)
    answer = await raw_get(edge, "/doc", field)
    assert answer.status < 500, (answer.status_line, answer.body[:200])
    assert answer.status in (200, 304, 412), answer.status_line
    if answer.status == 200:
        assert answer.body == DOC
    await assert_doc_still_served(edge)


async def assert_doc_still_served(edge: Client) -> None:
    response = await edge.get("/doc")
    assert response.status == 200
    assert await response.read() == DOC


async def test_uncacheable_urls_are_remembered_within_a_bound(
    upstream: Upstream, make_edge: Any
) -> None:
    """An attacker walking random 404 URLs: the hit-for-miss table stays bounded."""
    origin, _ = upstream
    origin.script("/page", headers=CACHEABLE, body=PAGE)
    edge = await make_edge(hit_for_miss_max_keys=50)
    for number in range(200):
        assert (await edge.get(f"/nothing-{number}")).status == 404
    metrics = await (await edge.get("/metrics")).text()
    [line] = [x for x in metrics.splitlines() if x.startswith("kshipra_edge_hit_for_miss_keys ")]
    assert 0 < float(line.split()[1]) <= 50
    await assert_still_serving(edge)


@pytest.mark.parametrize("method", ["M-SEARCH", "PROPFIND", "PURGE", "LINK"])
async def test_extension_methods_are_forwarded_and_invalidate(
    upstream: Upstream, make_edge: Any, method: str
) -> None:
    """RFC 9110 §9.1: a proxy forwards a method it does not know; RFC 9111 §4.4: a
    successful unknown (so unsafe) method invalidates the stored target."""
    origin, _ = upstream
    origin.script("/page", headers=CACHEABLE, body=PAGE)
    edge = await make_edge()
    await (await edge.get("/page")).read()
    answer = await exchange(
        edge, request_bytes("/page", "Content-Length: 2", method=method) + b"hi"
    )
    assert answer.status == 200, answer.status_line
    assert [seen.path for seen in origin.seen] == ["/page", "/page"]
    refetched = await edge.get("/page")
    assert "hit" not in cache_status(refetched)
    assert origin.count("/page") == 3


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
async def test_trace_and_connect_are_refused(
    upstream: Upstream, make_edge: Any, method: str
) -> None:
    origin, _ = upstream
    edge = await make_edge()
    answer = await exchange(edge, request_bytes("/page", method=method))
    # CONNECT's target is an authority, so aiohttp's router finds no route (404) for it.
    assert answer.status in ((405,) if method == "TRACE" else (404, 405)), answer.status_line
    assert origin.seen == []
