"""Exhaustion: slow and silent clients, too many connections, load past what the edge and its
upstream can carry, request bodies. Each is refused quickly and only its own connection
suffers; the edge keeps serving everyone else.

Real sockets against a real edge server on loopback (``tests.edge_fixtures``), with the door's
and admission's limits set low so that each case happens in well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import edge.flow as edge_flow
from edge.app import EDGE
from tests.edge_fixtures import ScriptedOrigin, body_of

pytestmark = pytest.mark.integration

Upstream = tuple[ScriptedOrigin, TestServer]

FAST_DOOR: dict[str, Any] = {
    "header_timeout_s": 0.5,
    "send_stall_s": 1.0,
    "connections_per_client": 8,
}
HEAD = b"GET /item HTTP/1.1\r\nHost: cdn.example\r\n\r\n"


async def connect(edge: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(edge.server.host, edge.server.port)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A response head and its Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """The edge closed the connection (EOF or reset) within *seconds*."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def test_a_silent_connection_is_closed_at_the_head_deadline(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/item", headers={"Cache-Control": "max-age=60"})
    edge = await make_edge(**FAST_DOOR)
    reader, writer = await connect(edge)
    started = time.monotonic()
    assert await closed_within(reader, 5), "a silent connection was kept open"
    assert time.monotonic() - started >= FAST_DOOR["header_timeout_s"]
    writer.close()
    assert edge.server.app[EDGE].doorman.counts.head_timeouts >= 1


async def test_a_head_dripped_byte_by_byte_is_cut_off(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/item", headers={"Cache-Control": "max-age=60"})
    edge = await make_edge(**FAST_DOOR)
    reader, writer = await connect(edge)
    sent = 0
    closed = False
    for byte in HEAD[:-1]:  # 40 bytes, 0.1 s apart: 4 s, eight times the deadline
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        sent += 1
        if await closed_within(reader, 0.1):
            closed = True
            break
    writer.close()
    assert closed, "a slowloris head was allowed to take forever"
    assert sent < len(HEAD) - 1
    # Everyone else is still served.
    response = await edge.get("/item")
    assert response.status == 200


async def test_keep_alive_between_requests_is_not_a_head_deadline(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/item", headers={"Cache-Control": "max-age=60"}, body=b"x" * 10)
    edge = await make_edge(**FAST_DOOR)
    reader, writer = await connect(edge)
    writer.write(HEAD)
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    # An idle keep-alive connection is aiohttp's keep-alive timeout's business (15 s), not
    # the head deadline's: waiting past the deadline here is the behaviour under test.
    assert not await closed_within(reader, FAST_DOOR["header_timeout_s"] * 3)
    writer.write(HEAD[:10])  # a head split over two writes, each well within the deadline
    await writer.drain()
    writer.write(HEAD[10:])
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"x" * 10
    writer.close()


async def test_pipelined_heads_in_one_write_are_all_answered(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/item", headers={"Cache-Control": "max-age=60"}, body=b"y" * 5)
    edge = await make_edge(**FAST_DOOR)
    reader, writer = await connect(edge)
    writer.write(b"\r\n" + HEAD * 3)
    for _ in range(3):
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        assert body == b"y" * 5
    writer.close()


async def test_connections_per_client_are_capped(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/item", headers={"Cache-Control": "max-age=60"})
    edge = await make_edge(connections_per_client=3)
    held = [await connect(edge) for _ in range(3)]
    for reader, writer in held:  # each is a working connection
        writer.write(HEAD)
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
    reader, writer = await connect(edge)
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 429"), head
    assert b"Retry-After: 5" in head
    assert b"too many open connections" in body
    assert await closed_within(reader, 5)
    writer.close()
    # Closing one frees its place.
    held[0][1].close()
    await held[0][1].wait_closed()
    doorman = edge.server.app[EDGE].doorman
    for _ in range(100):
        if doorman.counts.open_connections < 3:
            break
        await asyncio.sleep(0.01)  # the edge sees the close on its next loop turn
    reader, writer = await connect(edge)
    writer.write(HEAD)
    head, _ = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    for _, other in held[1:]:
        other.close()
    assert doorman.counts.refused_connections == 1


async def test_a_client_that_stops_reading_is_dropped(
    upstream: Upstream, make_edge: Any, tmp_path: Any
) -> None:
    """From memory (the door sees writing paused) and from disk (sendfile, in pieces)."""
    origin, _ = upstream
    big = body_of(12 * 1024 * 1024)
    origin.script("/big", headers={"Cache-Control": "max-age=60"}, body=big)
    in_memory = await make_edge(
        **FAST_DOOR, memory_bytes=32 * 1024**2, memory_max_object_bytes=16 * 1024**2
    )
    on_disk = await make_edge(
        **FAST_DOOR, memory_max_object_bytes=1024**2, disk_dir=tmp_path / "disk-only"
    )
    for edge in (in_memory, on_disk):
        assert (await (await edge.get("/big")).read()) == big  # stored
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((edge.server.host, edge.server.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /big HTTP/1.1\r\nHost: cdn.example\r\n\r\n")
        counts = edge.server.app[EDGE].doorman.counts
        for _ in range(500):  # noticed within send_stall_s plus one sweep
            if counts.send_stalls:
                break
            await asyncio.sleep(0.02)
        assert counts.send_stalls == 1
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                received += len(chunk)
        assert received < len(big), "the stalled response was not abandoned"
        writer.close()
        assert (await edge.get("/big")).status == 200  # the edge serves on


async def test_in_flight_requests_past_the_limit_are_shed_at_once(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    gate = asyncio.Event()
    origin.script("/slow", headers={"Cache-Control": "max-age=60"}, gate=gate)
    edge = await make_edge(max_inflight_requests=2)
    holders = [asyncio.create_task(edge.get(f"/slow?n={n}")) for n in range(2)]
    while len(origin.seen) < 2:
        origin.arrived.clear()
        await origin.arrived.wait()
    started = time.monotonic()
    shed = await edge.get("/slow?n=3")
    elapsed = time.monotonic() - started
    assert shed.status == 503
    assert shed.headers["Retry-After"] == "1"
    assert "in flight" in (await shed.json())["error"]["message"]
    assert elapsed < 1.0  # answered at once, not queued (a loose bound on a shared machine)
    gate.set()
    for holder in holders:
        assert (await holder).status == 200
    assert (await edge.get("/slow?n=4")).status == 200  # the slots were given back
    metrics = await (await edge.get("/metrics")).text()
    assert 'kshipra_edge_shed_total{reason="inflight"} 1.0' in metrics


async def test_upstream_fetches_past_the_limit_are_shed_or_served_stale(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    gate = asyncio.Event()
    origin.script("/slow", headers={"Cache-Control": "max-age=60"}, gate=gate)
    stale = origin.script("/stale", headers={"Cache-Control": "max-age=0"}, body=b"kept")
    edge = await make_edge(max_upstream_fetches=1)
    assert (await (await edge.get("/stale")).read()) == b"kept"
    stale.body = b"new"
    holder = asyncio.create_task(edge.get("/slow"))
    while origin.count("/slow") < 1:
        origin.arrived.clear()
        await origin.arrived.wait()
    # A miss with nothing stored: refused at once, not queued behind the slow fetch.
    shed = await edge.get("/other")
    assert shed.status == 503
    assert shed.headers["Retry-After"] == "1"
    assert origin.count("/other") == 0
    # A miss with a stored (stale) response: served stale rather than refused.
    served = await edge.get("/stale")
    assert served.status == 200
    assert await served.read() == b"kept"
    assert "detail=stale-if-unreachable" in served.headers["Cache-Status"]
    gate.set()
    assert (await holder).status == 200
    assert (await (await edge.get("/stale")).read()) == b"new"
    metrics = await (await edge.get("/metrics")).text()
    assert 'kshipra_edge_shed_total{reason="upstream"} 2.0' in metrics


async def test_a_client_over_its_request_rate_gets_429(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/private", headers={"Cache-Control": "private"})  # every request passes
    origin.script("/item", headers={"Cache-Control": "max-age=60"})
    edge = await make_edge(client_requests_per_s=5)
    assert (await edge.get("/item")).status == 200  # stored: later hits take the express lane
    statuses = []
    for _ in range(30):
        response = await edge.get("/private")
        statuses.append(response.status)
        if response.status == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert "too many requests" in (await response.json())["error"]["message"]
    assert statuses[:4] == [200] * 4
    assert 429 in statuses
    # Fresh memory hits are not counted: refusing one would cost as much as serving it.
    for _ in range(20):
        assert (await edge.get("/item")).status == 200


async def test_a_request_body_is_streamed_upstream_not_buffered(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/upload", headers={"Cache-Control": "no-store"}, body=b"ok")
    edge = await make_edge()

    async def chunks() -> Any:
        yield b"z" * (1024 * 1024)
        # Upstream has the request before the client sends the rest: the edge forwards as it
        # receives (an edge that buffered bodies would wait here for ever).
        while not origin.seen:
            origin.arrived.clear()
            await asyncio.wait_for(origin.arrived.wait(), 10)
        for _ in range(7):
            yield b"z" * (1024 * 1024)

    response = await edge.post("/upload", data=chunks())
    assert response.status == 200
    assert origin.bodies == [b"z" * (8 * 1024 * 1024)]


async def test_a_chunked_body_over_the_limit_is_refused(
    upstream: Upstream, make_edge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_flow, "MAX_UNSAFE_BODY_BYTES", 1024 * 1024)
    origin, _ = upstream
    origin.script("/upload", headers={"Cache-Control": "no-store"}, body=b"ok")
    edge = await make_edge()

    async def chunks() -> Any:
        for _ in range(4):
            yield b"z" * (512 * 1024)

    response = await edge.post("/upload", data=chunks())  # no Content-Length: chunked
    assert response.status == 413
    assert "limited to 1048576 bytes" in (await response.json())["error"]["message"]


async def test_a_stalled_request_body_gets_408(
    upstream: Upstream, make_edge: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_flow, "REQUEST_BODY_TIMEOUT_S", 0.3)
    origin, _ = upstream
    origin.script("/upload", headers={"Cache-Control": "no-store"}, body=b"ok")
    edge = await make_edge()
    reader, writer = await connect(edge)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: cdn.example\r\nContent-Length: 100\r\n\r\nabc")
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"stopped arriving" in body
    assert b"Connection: close" in head
    writer.close()
    assert (await edge.get("/upload")).status == 200  # the edge serves on


async def test_a_purge_body_is_not_read_without_the_token(make_edge: Any) -> None:
    edge = await make_edge(purge_token="s3cret")
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            edge.make_url("/.kshipra/purge"),
            data=b"x" * (8 * 1024 * 1024),
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 401
