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
from aiohttp.http import SERVER_SOFTWARE, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from edge.guard import Doorman

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
