"""The express lane: plain fresh hits on the memory tier answered as the request is parsed.

Most of an edge's traffic in the evening peak is the same few thousand small objects (HLS
playlists, question-bank JSON, thumbnails) requested by phones that send nothing but
``GET``, a path and ``Accept-Encoding``. For those, aiohttp's full request cycle — a request
object, a handler task switch, a response object, header serialisation — costs more than
the cache lookup itself (see BENCHMARKS.md: one aiohttp process reaches about 0.4x nginx's
requests/s for a 4 KiB object before any caching work). So the edge's connections use
:class:`ExpressRequestHandler`, a subclass of aiohttp's server protocol that, as each batch of
requests is parsed (by aiohttp's own parser), asks the edge's *express* function for every
request at the head of the connection's queue:

- the function returns the complete response (status line, headers, body) for a request it
  can answer exactly as the full request flow would — a ``GET`` for a fresh, stored ``200``
  held in memory, with nothing in the request that asks for more (no ranges, no conditionals
  but ``If-None-Match``, no cache directives, fleet or dictionary fields; see
  :meth:`edge.app.Edge.express`);
- the handler writes it at once and moves on to the next queued request;
- the first request it cannot answer, and everything after it on that connection, goes to
  aiohttp's request cycle as usual, so pipelined responses keep their order.

While aiohttp's handler task is busy with a request (or a response is waiting on a slow
reader: writing paused), every request is queued for it, never answered ahead of it. A new
connection's first requests qualify too: the handler task has had nothing to do yet.

This relies on a handful of aiohttp's protocol attributes (the message queue, the handler
waiter, the keep-alive deadline). :data:`SUPPORTED` checks that they exist in the installed
aiohttp; when they do not, edges run without the express lane (slower, not wrong), and log it.

Response heads are rendered once per stored entry (:func:`render_head`), leaving only the
``ttl`` and ``Age`` numbers to fill in per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDictProxy

from edge import stages
from edge.entry import ENCODING_SEP, VARIANT_SEP, EntryMeta
from edge.guard import Doorman
from edge.heads import (
    EXPRESS_BLOCKERS,
    MAX_HEADER_BLOCK_BYTES,
    NOT_IN_304,
    OWN_ROUTES,
    header_block_bytes,
    http_date,
    made_from,
)
from edge.keys import BadTarget, normalise_target, preferred_encoding, secondary_key
from edge.memory import MemoryEntry, MemoryTier
from edge.metrics import EdgeMetrics
from edge.rfc9111 import RequestControls, get_one, reuse

log = logging.getLogger(__name__)

Express = Callable[[RawRequestMessage], "tuple[bytes, ...] | None"]
"""Given a parsed request, the response's buffers (written in order), or ``None``: take the
full request flow."""

_INTERNALS = (
    "_waiter",
    "_messages",
    "_parser",
    "_paused",
    "_buffer_paused",
    "_msg_queue_resume_size",
    "_resume_reading_if_drained",
    "_next_keepalive_close_time",
    "_keepalive_timeout",
    "_loop",
)
SUPPORTED = all(hasattr(RequestHandler, name) for name in _INTERNALS) and hasattr(
    RequestHandler, "data_received"
)
"""The installed aiohttp has the protocol internals the express lane uses."""


class ExpressRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 server protocol, answering express requests as they are parsed."""

    __slots__ = ("_express", "_handed_over")

    def __init__(self, manager: web.Server, *, express: Express, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._express = express
        self._handed_over = False
        """A request was left to aiohttp's handler task on this connection."""

    def _handler_idle(self) -> bool:
        """aiohttp's handler task has no request in hand: it waits for one, or it never got
        one (a new connection, whose task may not have started yet)."""
        if self._messages:
            return False
        waiter = self._waiter
        if waiter is None:
            return not self._handed_over
        return not waiter.done()

    def data_received(self, data: bytes) -> None:  # noqa: C901 - aiohttp's protocol callback: the express loop must stay in one frame
        if not self._handler_idle():
            # The handler task is busy or has work queued: keep the connection's order.
            super().data_received(data)
            return
        waiter = self._waiter
        self._waiter = None  # parse (aiohttp's parser, errors included) without waking it
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        messages = self._messages
        answered = False
        while messages and not self._paused:
            message, payload = messages[0]
            if (
                payload is not EMPTY_PAYLOAD
                or not isinstance(message, RawRequestMessage)
                or message.should_close
                or message.upgrade
            ):
                break
            try:
                buffers = self._express(message)
            except Exception:  # a bug here must cost speed, not the connection
                log.exception("express lane failed; the full request flow answers instead")
                buffers = None
            if buffers is None:
                break
            messages.popleft()
            parser = self._parser
            if parser is not None:
                parser.message_consumed()
            transport = self.transport
            if transport is None or transport.is_closing():
                messages.clear()
                return
            transport.writelines(buffers)
            answered = True
        if answered:
            # An answered request counts as activity for the keep-alive timer.
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()
        if messages:
            self._handed_over = True
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class ExpressServer(web.Server):
    """aiohttp's low-level server, making :class:`ExpressRequestHandler` protocols (plain
    ones without an express function), each behind the *doorman*'s door if there is one."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        express: Express | None,
        doorman: Doorman | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, **kwargs)
        self._express = express
        self._doorman = doorman

    def __call__(self) -> Any:
        handler: RequestHandler
        if self._express is None:
            handler = RequestHandler(self, loop=self._loop, **self._kwargs)
        else:
            handler = ExpressRequestHandler(
                self, express=self._express, loop=self._loop, **self._kwargs
            )
        return handler if self._doorman is None else self._doorman.wrap(handler)


class ExpressAppRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections take the express lane.

    ``express`` is asked for the application's express function after its start-up hooks
    ran (the edge exists by then); it may return ``None`` for a plain aiohttp server.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        express: Callable[[web.Application], Express | None],
        doorman: Callable[[web.Application], Doorman | None] = lambda _app: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._express_for = express
        self._doorman_for = doorman

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        express = self._express_for(self.app)
        doorman = self._doorman_for(self.app)
        if express is not None and not SUPPORTED:
            log.warning(
                "this aiohttp lacks the protocol internals the express lane uses; "
                "serving every request through the full request cycle"
            )
            express = None
        if express is None and doorman is None:
            return server
        return ExpressServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=asyncio.get_running_loop(),
            express=express,
            doorman=doorman,
            **self._kwargs,
        )


_KEYS_MAX = 4096
"""Remembered raw targets and ``Accept-Encoding`` values, each (cleared when full)."""
_NO_CONTROLS = RequestControls()


class ExpressLane:
    """Plain fresh memory hits, answered from the parsed request as bytes: the decisions are
    the full flow's own (the hash stage, the rfc9111 reuse rule, the deliver stage for
    revalidations, the header rules of :mod:`edge.heads`)."""

    def __init__(
        self,
        *,
        memory: MemoryTier,
        metrics: EdgeMetrics,
        host: str,
        name: str,
        clock: Callable[[], float],
    ) -> None:
        self.memory = memory
        self.metrics = metrics
        self.host = host
        self.name = name
        self.clock = clock
        self._keys: dict[str, str] = {}
        self._codings: dict[str, str] = {}

    def _cache_status(self, status: str) -> str:
        return f"{self.name}; {status}"

    # The express lane's checks in request order; each return hands the request to the full
    # flow.
    def answer(  # noqa: C901, PLR0911, PLR0912
        self, message: RawRequestMessage
    ) -> tuple[bytes, ...] | None:
        """The complete response to a request that the full flow would answer with a plain
        fresh hit from the memory tier, or ``None``: the request goes through
        :meth:`edge.app.Edge.handle`.

        It qualifies when it is an HTTP/1.1 ``GET`` without fields asking for more than the
        stored bytes (see :data:`EXPRESS_BLOCKERS`), for a path outside the edge's own
        routes, whose stored response is a fresh, whole ``200`` in memory — and, when the
        client takes Brotli or gzip and the response is compressible, whose encoded copy was
        already made from that very response. ``If-None-Match`` (the revalidation phones send
        when their own copy expires) is answered here too: ``304`` or the whole ``200``. The
        bytes are what :meth:`edge.app.Edge.deliver` would send
        (``tests/integration/test_edge_express.py`` compares the two).
        """
        if message.method != "GET" or message.version != HttpVersion11:
            return None
        headers = message.headers
        for name in EXPRESS_BLOCKERS:
            if name in headers:
                return None
        if_none_match = headers.get("If-None-Match")
        if if_none_match is None and "If-Modified-Since" in headers:
            return None  # (with If-None-Match, If-Modified-Since is ignored: RFC 9110 §13.2.2)
        if header_block_bytes(message.raw_headers) > MAX_HEADER_BLOCK_BYTES:
            return None  # the full flow answers 431
        url_key = self._keys.get(message.path)
        if url_key is None:
            url_key = self._key(message.path)
            if url_key is None:
                return None
        memory = self.memory
        entry = memory.peek(url_key)
        if entry is None:
            return None
        marker = None
        if entry.meta.kind == "vary":
            marker = entry
            entry = memory.peek(
                url_key + VARIANT_SEP + secondary_key(entry.meta.vary, list(headers.items()))
            )
            if entry is None:
                return None
        meta = entry.meta
        if meta.kind != "full" or meta.status != 200:
            return None
        freshness = meta.freshness(self.clock())
        if reuse(freshness, _NO_CONTROLS) != "fresh":
            return None
        served = self._encoded(entry, headers) if meta.encodable else entry
        if served is None:
            return None  # the full flow makes (or refreshes) the encoded copy
        not_modified = False
        if if_none_match is not None:
            revalidated = _revalidation(served.meta, if_none_match, headers)
            if revalidated is None:
                return None
            not_modified = revalidated
        head = self._head_of(served, not_modified=not_modified)
        if head is None:
            return None
        if marker is not None:
            memory.touch(marker.key)
        memory.touch(entry.key)
        if served is not entry:
            memory.touch(served.key)
        metrics = self.metrics
        metrics.hits += 1
        metrics.express_hits += 1
        tail = f"{int(freshness.ttl_s)}\r\nAge: {int(freshness.age_s)}\r\n\r\n".encode()
        if not_modified:
            return head, tail
        body = served.body
        metrics.client_bytes += len(body)
        return head, tail, body

    def _encoded(self, entry: MemoryEntry, headers: CIMultiDictProxy[str]) -> MemoryEntry | None:
        """The entry to send a client that takes Brotli or gzip: the encoded copy made from
        this very response (``None`` if there is none yet), or *entry* itself."""
        coding = self._coding(headers.getall("Accept-Encoding", []))
        if coding == "identity":
            return entry
        meta = entry.meta
        encoded = self.memory.peek(entry.key + ENCODING_SEP + coding)
        if encoded is None or not made_from(encoded.meta, meta, coding):
            return None
        return encoded

    def _key(self, raw_target: str) -> str | None:
        """The cache key of an express candidate's target, or ``None`` for a target the full
        flow must see (the edge's own routes, a malformed target). Remembered per raw
        target, within a bound."""
        path = raw_target.partition("?")[0]
        if path in OWN_ROUTES or path.startswith("/.kshipra"):
            return None
        try:
            target = normalise_target(raw_target)
        except BadTarget:
            return None
        if target.path in OWN_ROUTES or target.path.startswith("/.kshipra"):
            return None
        key = stages.hash_key(self.host, target)
        keys = self._keys
        if len(keys) >= _KEYS_MAX:
            keys.clear()
        keys[raw_target] = key
        return key

    def _coding(self, accept_encoding: list[str]) -> str:
        """:func:`preferred_encoding`, remembered per ``Accept-Encoding`` value (phones send
        a handful of distinct ones)."""
        if not accept_encoding:
            return "identity"
        if len(accept_encoding) != 1:
            return preferred_encoding(accept_encoding)
        value = accept_encoding[0]
        codings = self._codings
        coding = codings.get(value)
        if coding is None:
            coding = preferred_encoding(accept_encoding)
            if len(codings) >= _KEYS_MAX:
                codings.clear()
            codings[value] = coding
        return coding

    def _head_of(self, entry: MemoryEntry, *, not_modified: bool) -> bytes | None:
        """*entry*'s rendered head (``304`` or ``200``), rendered on first use."""
        if not_modified:
            head = entry.express_304_head
            if head is None:
                head = entry.express_304_head = self._head(entry.meta, status=304)
        else:
            head = entry.express_head
            if head is None:
                head = entry.express_head = self._head(entry.meta, status=200)
        return head

    def _head(self, meta: EntryMeta, *, status: int) -> bytes | None:
        """The response head :meth:`edge.app.Edge.deliver` sends for a fresh hit on *meta*
        (``200``, or ``304`` to a matching ``If-None-Match``), up to the ``ttl`` of its
        ``Cache-Status``."""
        client, _edge_only, prior, has_date = meta.delivery_headers
        fields = list(client)
        if status == 304:
            fields = [(k, v) for k, v in fields if k.lower() not in NOT_IN_304]
        if not has_date:
            fields.append(("Date", http_date(meta.response_time)))
        if meta.lacks_vary_accept_encoding:
            fields.append(("Vary", "Accept-Encoding"))
        if status == 200:
            fields.append(("Accept-Ranges", "bytes"))
            fields.append(("Content-Length", str(meta.body_bytes)))
            if meta.body_bytes and get_one(client, "content-type") is None:
                fields.append(("Content-Type", "application/octet-stream"))  # as aiohttp does
        own = self._cache_status("hit; ttl=")
        return render_head(
            status_line=b"HTTP/1.1 200 OK\r\n"
            if status == 200
            else b"HTTP/1.1 304 Not Modified\r\n",
            fields=fields,
            cache_status_prefix=own if prior is None else f"{prior}, {own}",
        )


def _revalidation(
    meta: EntryMeta, if_none_match: str, headers: CIMultiDictProxy[str]
) -> bool | None:
    """An express ``If-None-Match``: ``True`` for a 304, ``False`` for the whole 200, ``None``
    when the full flow must answer (no stored tag, or the deliver stage wants more). The usual
    revalidation echoes the stored tag: that is a match (RFC 9110 §13.1.2) without parsing a
    list; anything else, the deliver stage decides."""
    etag = meta.etag_field
    if etag is None:
        return None
    if if_none_match == etag:
        return True
    step = stages.deliver(meta, "GET", headers)
    if isinstance(step, stages.NotModified):
        return True
    return False if step == stages.Send(200, 0, meta.body_bytes) else None


def render_head(
    *,
    status_line: bytes,
    fields: list[tuple[str, str]],
    cache_status_prefix: str,
) -> bytes | None:
    """A response head up to the ``ttl`` value of its ``Cache-Status``: the status line, the
    stored fields, then ``Cache-Status: <prefix>``. ``None`` if a field could not be sent
    as is (a CR or LF in it: the full flow then answers, and aiohttp refuses it loudly)."""
    parts = [status_line]
    has_server = False
    for name, value in fields:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            return None
        if name.lower() == "server":
            has_server = True
        parts.append(f"{name}: {value}\r\n".encode())
    if not has_server:
        parts.append(f"Server: {SERVER_SOFTWARE}\r\n".encode())
    parts.append(f"Cache-Status: {cache_status_prefix}".encode())
    return b"".join(parts)
