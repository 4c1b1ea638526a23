"""Bytes are right or not served: origins that frame bodies every way HTTP/1.x allows —
chunked, close-delimited (HTTP/1.0), truncated, with a lying Content-Length — through a real
edge with a memory tier, a disk tier, and large objects on disk."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.edge_fixtures import EdgeServer, body_of, edge_app

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
CACHEABLE = b"Cache-Control: public, max-age=600\r\nContent-Type: application/octet-stream\r\n"


@dataclass
class RawOrigin:
    """An origin that writes its answers byte by byte: ``answers[path]`` is a function of
    the request count for that path returning (head, body chunks, close after)."""

    answers: dict[str, Callable[[int], tuple[bytes, list[bytes], bool]]] = field(
        default_factory=dict
    )
    counts: dict[str, int] = field(default_factory=dict)
    heads: list[bytes] = field(default_factory=list)
    """Every request head received, in order (an answer may read the last one's Range)."""
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.heads.append(head)
                self.counts[path] = self.counts.get(path, 0) + 1
                status, chunks, close = self.answers[path](self.counts[path])
                writer.write(status)
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                if close:
                    break
        writer.close()


@pytest.fixture
async def raw_origin() -> AsyncIterator[RawOrigin]:
    origin = RawOrigin()
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    origin.port = server.sockets[0].getsockname()[1]
    yield origin
    server.close()
    await server.wait_closed()


@pytest.fixture
def raw_edge(aiohttp_client: Any, raw_origin: RawOrigin, tmp_path: Path) -> Callable[..., Any]:
    async def make(*, disk: bool, slice_bytes: int = 8 * 1024**2) -> Client:
        app = edge_app(
            name="integrity",
            upstream_url=f"http://127.0.0.1:{raw_origin.port}",
            cache_host="cdn.example",
            disk_dir=tmp_path / "disk" if disk else None,
            memory_bytes=16 * 1024**2,
            memory_max_object_bytes=1024**2,
            disk_bytes=256 * 1024**2,
            upstream_timeout_s=5.0,
            slice_bytes=slice_bytes,
        )
        client: Client = await aiohttp_client(EdgeServer(app))
        return client

    return make


def chunked(body: bytes, piece: int = 7_001) -> list[bytes]:
    out = [
        b"%x\r\n%s\r\n" % (len(body[i : i + piece]), body[i : i + piece])
        for i in range(0, len(body), piece)
    ]
    return [*out, b"0\r\n\r\n"]


# (disk tier?, size): in memory; unknown length (so to disk when there is one); over the
# memory tier's object limit (on disk only; a memory-only edge passes it, tested below).
CASES = [(False, 5), (False, 300_000), (True, 5), (True, 300_000), (True, 3 * 1024**2)]


@pytest.mark.parametrize(("disk", "size"), CASES)
async def test_a_chunked_body_is_stored_and_served_whole(
    raw_edge: Callable[..., Any], raw_origin: RawOrigin, disk: bool, size: int
) -> None:
    body = body_of(size, seed=f"chunked{size}")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + CACHEABLE + b"\r\n"
    raw_origin.answers["/c"] = lambda _n: (head, chunked(body), False)
    edge = await raw_edge(disk=disk)
    for expected in ("fwd=uri-miss", "hit"):
        response = await edge.get("/c")
        assert response.status == 200
        assert await response.read() == body
        assert expected in response.headers["Cache-Status"]
        assert response.headers.get("Content-Length") in (None, str(size))
    assert raw_origin.counts["/c"] == 1


async def test_a_large_chunked_body_on_a_memory_only_edge_is_passed_whole(
    raw_edge: Callable[..., Any], raw_origin: RawOrigin
) -> None:
    body = body_of(3 * 1024**2, seed="big")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + CACHEABLE + b"\r\n"
    raw_origin.answers["/big"] = lambda _n: (head, chunked(body), False)
    edge = await raw_edge(disk=False)
    for _ in range(2):
        response = await edge.get("/big")
        assert await response.read() == body


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "memory+disk"])
async def test_a_close_delimited_http10_body_is_stored_whole(
    raw_edge: Callable[..., Any], raw_origin: RawOrigin, disk: bool
) -> None:
    body = body_of(200_000, seed="http10")
    head = b"HTTP/1.0 200 OK\r\n" + CACHEABLE + b"\r\n"
    raw_origin.answers["/old"] = lambda _n: (head, [body[:99_999], body[99_999:]], True)
    edge = await raw_edge(disk=disk)
    for _ in range(2):
        response = await edge.get("/old")
        assert await response.read() == body
    assert raw_origin.counts["/old"] == 1


async def read_or_fail(edge: Client, path: str) -> bytes | None:
    """The body, or ``None`` when the edge could not deliver it whole (an error status or a
    connection cut before the declared end)."""
    try:
        response = await edge.get(path)
        body = await response.read()
    except aiohttp.ClientPayloadError:
        return None
    return body if response.status == 200 else None


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "memory+disk"])
@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_truncated_body_is_never_stored_or_served_as_complete(
    raw_edge: Callable[..., Any], raw_origin: RawOrigin, disk: bool, framing: str
) -> None:
    body = body_of(300_000, seed="cut")
    whole = body_of(300_000, seed="whole")
    if framing == "chunked":
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + CACHEABLE + b"\r\n"
        cut = chunked(body)[:10]  # no last chunk: the origin closes mid-body
        good = chunked(whole)
    else:  # declares more than it sends
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n" + CACHEABLE + b"\r\n"
        cut = [body[:150_000]]
        good = [whole]

    def answer(count: int) -> tuple[bytes, list[bytes], bool]:
        return (head, cut, True) if count == 1 else (head, good, False)

    raw_origin.answers["/t"] = answer
    edge = await raw_edge(disk=disk)
    first = await read_or_fail(edge, "/t")
    assert first is None or first == body  # never a short body presented as whole
    assert first is None
    # Nothing of the truncated answer was kept: the next request fetches again, whole.
    assert await read_or_fail(edge, "/t") == whole
    assert raw_origin.counts["/t"] == 2
    assert await read_or_fail(edge, "/t") == whole
    assert raw_origin.counts["/t"] == 2


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "memory+disk"])
async def test_a_body_longer_than_declared_is_not_stored_longer(
    raw_edge: Callable[..., Any], raw_origin: RawOrigin, disk: bool
) -> None:
    body = body_of(1_000, seed="long")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n" + CACHEABLE + b"\r\n"
    raw_origin.answers["/l"] = lambda _n: (head, [body + b"EXTRA BYTES"], True)
    edge = await raw_edge(disk=disk)
    for _ in range(2):
        # The declared 1,000 bytes, or a failure (aiohttp reads the surplus as a broken next
        # response): never the longer body.
        assert await read_or_fail(edge, "/l") in (None, body)
        response = await edge.get("/l")
        assert b"EXTRA" not in await response.read()
        assert len(response.headers["Cache-Status"]) < 200


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "memory+disk"])
async def test_a_206_shorter_than_its_content_range_is_never_stored_as_a_slice(
    raw_edge: Callable[..., Any], raw_origin: RawOrigin, disk: bool
) -> None:
    """A sliced object's first slice cut short by the origin: the client gets the object
    whole (passed) or an error, never the short slice as the object; nothing short is kept:
    every later request is answered whole."""
    piece = 64 * 1024
    whole = body_of(200 * 1024, seed="sliced")

    def answer(count: int) -> tuple[bytes, list[bytes], bool]:
        match = re.search(rb"Range: bytes=(\d+)-(\d+)", raw_origin.heads[-1], re.IGNORECASE)
        if match is None:  # a plain GET: the whole object
            plain = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(whole)
            return plain + b'ETag: "s1"\r\n' + CACHEABLE + b"\r\n", [whole], False
        first, last = int(match.group(1)), min(int(match.group(2)), len(whole) - 1)
        head = (
            b"HTTP/1.1 206 Partial Content\r\n"
            + b"Content-Range: bytes %d-%d/%d\r\n" % (first, last, len(whole))
            + b"Content-Length: %d\r\n" % (last - first + 1)
            + b'ETag: "s1"\r\n'
            + CACHEABLE
            + b"\r\n"
        )
        part = whole[first : last + 1]
        if count == 1:
            return head, [part[: len(part) // 2]], True  # half the slice, then the close
        return head, [part], False

    raw_origin.answers["/s"] = answer
    edge = await raw_edge(disk=disk, slice_bytes=piece)
    # The edge passes the request on (whole) when a slice fails, or reports the failure:
    # never the short slice as if it were the object.
    assert await read_or_fail(edge, "/s") in (None, whole)
    for _ in range(3):
        assert await read_or_fail(edge, "/s") == whole
