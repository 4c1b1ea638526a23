"""The edge over aiohttp's HTTP/1.1 server: the first transport adapter.

Every request (the edge's own routes included) goes to :meth:`edge.flow.Edge.serve` as an
:class:`edge.transport.EdgeRequest`; the :class:`edge.transport.Answer` it writes back is
sent here — a disk hit by ``sendfile``, a stream chunk by chunk. Plain fresh memory hits are
answered before aiohttp's request cycle by the express lane (:mod:`edge.express`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp import web

from cdn_config import EdgeConfig
from common.serving import RUNNER
from edge.express import ExpressAppRunner, ExpressLane
from edge.flow import MAX_UNSAFE_BODY_BYTES, PURGE_PATH, SENDFILE_CHUNK_BYTES, Edge
from edge.heads import header_block_bytes
from edge.transport import Answer, Body, EdgeRequest, FileBody, StreamBody

__all__ = ["EDGE", "PURGE_PATH", "Edge", "create_app"]

EDGE = web.AppKey("edge", Edge)
EXPRESS = web.AppKey("express", ExpressLane)

NO_BODY_STATUSES = frozenset({204, 304})


class AiohttpBody:
    """An aiohttp request's body as :class:`edge.transport.RequestBody`."""

    __slots__ = ("_request",)

    def __init__(self, request: web.Request) -> None:
        self._request = request

    @property
    def declared_length(self) -> int | None:
        return self._request.content_length

    async def read_chunk(self) -> bytes:
        return await self._request.content.readany()


def edge_request(request: web.Request) -> EdgeRequest:
    """*request* as the flow reads it."""
    transport = request.transport
    return EdgeRequest(
        method=request.method,
        target=request.raw_path,
        version=(request.version.major, request.version.minor),
        headers=request.headers,
        peername=None if transport is None else transport.get_extra_info("peername"),
        remote=request.remote,
        body=AiohttpBody(request) if request.can_read_body else None,
        scheme=request.scheme,
        header_bytes=header_block_bytes(request.raw_headers),
    )


async def send_answer(request: web.Request, answer: Answer, edge: Edge) -> web.StreamResponse:
    """Write *answer* to *request*'s connection; returns the (prepared) response."""
    body = answer.body
    if isinstance(body, bytes) and answer.length is None:
        response: web.StreamResponse = web.Response(
            status=answer.status, headers=answer.headers, body=body
        )
    else:
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        length = answer.declared_length()
        if length is not None and answer.status not in NO_BODY_STATUSES:
            response.content_length = length
    if answer.close:
        response.force_close()
    written = 0
    try:
        await response.prepare(request)
        if request.method != "HEAD":
            written = await _write_body(request, response, body, edge)
        await response.write_eof()
    finally:
        if isinstance(body, FileBody):
            await asyncio.to_thread(body.handle.close)
        elif isinstance(body, StreamBody) and body.close is not None:
            body.close()
        if answer.sent is not None and written:
            answer.sent(written)
    return response


async def _write_body(
    request: web.Request, response: web.StreamResponse, body: Body, edge: Edge
) -> int:
    if isinstance(body, bytes):
        if isinstance(response, web.Response):
            return len(body)  # aiohttp writes it on write_eof
        await response.write(body)
        return len(body)
    if isinstance(body, FileBody):
        return await _send_file(request, response, body, edge)
    written = 0
    chunks = body.chunks
    try:
        async for chunk in chunks:
            await response.write(chunk)
            written += len(chunk)
    finally:
        await chunks.aclose()
    return written


async def _send_file(
    request: web.Request, response: web.StreamResponse, body: FileBody, edge: Edge
) -> int:
    transport = request.transport
    if transport is not None and not transport.is_closing():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            if not await _sendfile_unstalled(cast(asyncio.WriteTransport, transport), body, edge):
                return 0  # the client stopped reading: its connection is gone
            return body.length
    await asyncio.to_thread(body.handle.seek, body.start)
    remaining = body.length
    while remaining:
        chunk = await asyncio.to_thread(body.handle.read, min(SENDFILE_CHUNK_BYTES, remaining))
        if not chunk:
            break
        remaining -= len(chunk)
        await response.write(chunk)
    return body.length - remaining


async def _sendfile_unstalled(
    transport: asyncio.WriteTransport, body: FileBody, edge: Edge
) -> bool:
    """``loop.sendfile`` in pieces of :data:`SENDFILE_CHUNK_BYTES`, each given the door's
    ``send_stall_s`` (a kernel sendfile never pauses the protocol, so the door cannot see a
    client that stopped reading). ``False``: one stalled, and the connection is aborted. A
    piece per minute (the default) is 4 KiB/s, below any phone that is still reading."""
    loop = asyncio.get_running_loop()
    offset, end = body.start, body.start + body.length
    while offset < end:
        count = min(SENDFILE_CHUNK_BYTES, end - offset)
        try:
            async with asyncio.timeout(edge.door.send_stall_s):
                await loop.sendfile(transport, body.handle, offset, count)
        except TimeoutError:
            edge.doorman.counts.send_stalls += 1
            transport.abort()
            return False
        offset += count
    return True


async def proxy(request: web.Request) -> web.StreamResponse:
    edge = request.app[EDGE]
    sent: list[web.StreamResponse] = []

    async def write(answer: Answer) -> None:
        sent.append(await send_answer(request, answer, edge))

    await edge.serve(edge_request(request), write)
    return sent[0]


async def _close_after_a_body(request: web.Request, response: web.StreamResponse) -> None:
    """A connection's door stops watching for request heads once one declared a body
    (:mod:`edge.guard`): close it after answering, so every request head keeps its
    deadline. Bodies are rare at an edge (unsafe methods), so this costs no reuse."""
    if request.body_exists:
        response.force_close()
        response.headers["Connection"] = "close"  # the head is rendered before this hook


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    edge = app[EDGE]
    await edge.start()
    yield
    await edge.stop()


def express_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The edge's runner: its connections answer plain fresh hits on the express lane
    (:mod:`edge.express`)."""
    return ExpressAppRunner(
        app,
        express=lambda started: started[EXPRESS].answer,
        doorman=lambda started: started[EDGE].doorman,
        **kwargs,
    )


def create_app(
    config: EdgeConfig,
    *,
    upstream_url: str,
    purge_token: str | None = None,
    redis_url: str | None = None,
) -> web.Application:
    """The edge application: ``/healthz``, ``/readyz``, ``/metrics``, ``POST
    /.kshipra/purge`` and everything else proxied (see :class:`edge.flow.Edge` for the
    arguments)."""
    app = web.Application(client_max_size=MAX_UNSAFE_BODY_BYTES)
    edge = Edge(config, upstream_url=upstream_url, purge_token=purge_token, redis_url=redis_url)
    app[EDGE] = edge
    app[EXPRESS] = ExpressLane(
        memory=edge.cache.memory,
        metrics=edge.metrics,
        host=edge.host,
        name=config.name,
        clock=edge.clock,
    )
    app.cleanup_ctx.append(_lifecycle)
    app.on_response_prepare.append(_close_after_a_body)
    app[RUNNER] = express_runner
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
