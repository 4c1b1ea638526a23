"""The transport boundary: what the request flow reads of a request and what it answers.

The flow (:mod:`edge.flow`) knows nothing of the server under it. A transport adapter —
aiohttp's HTTP/1.1 server (:mod:`edge.app`), our HTTP/2 protocol (:mod:`edge.h2`) — turns
each request into an :class:`EdgeRequest`, calls :meth:`edge.flow.Edge.serve`, and writes the
:class:`Answer` it gets back: a status, header fields and one of three bodies —

- ``bytes`` (a memory hit, an error, a 304);
- a :class:`FileBody` (a disk hit: the adapter sends it by ``sendfile`` where the transport
  allows, in chunks otherwise);
- a :class:`StreamBody` (a passed response or a sliced object, chunk by chunk as it arrives).

The adapter owns framing, keep-alive, back-pressure and stalls; the flow owns every decision.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from common.errors import error_json


class RequestBody(Protocol):
    """A request's body as it arrives (never buffered whole by the transport)."""

    @property
    def declared_length(self) -> int | None:
        """``Content-Length`` (HTTP/1.1) or ``content-length`` (HTTP/2), if sent."""

    async def read_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` at its end."""


@dataclass(frozen=True, slots=True)
class EdgeRequest:
    """One request, as every transport gives it to the flow."""

    method: str
    target: str
    """The request target as sent: path and query, not decoded (HTTP/2's ``:path``)."""
    version: tuple[int, int]
    headers: CIMultiDictProxy[str]
    peername: object
    """The client's socket address (``None`` if unknown): admission keys its per-client
    limits on it."""
    remote: str | None
    """The client's IP address."""
    body: RequestBody | None = None
    """``None``: the request has no body (no ``Content-Length`` or chunked framing)."""
    scheme: str = "http"
    header_bytes: int = 0
    """The size of the header block as received (names, values, separators)."""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class FileBody:
    """*length* bytes of an open file from *start*; the adapter closes the handle."""

    handle: BinaryIO
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class StreamBody:
    """Chunks as they come. The adapter calls *close* when it is done with them, read or not
    (an async generator never started does not run its ``finally`` on ``aclose``)."""

    chunks: AsyncGenerator[bytes, None]
    close: Callable[[], None] | None = None


Body = bytes | FileBody | StreamBody


@dataclass(slots=True)
class Answer:
    """What the flow answers. ``length`` is the ``Content-Length`` to declare: ``None`` for
    a ``bytes`` body means its own length; for a stream, that it is not known (chunked on
    HTTP/1.1). A ``HEAD`` answer declares the length of the body it does not send."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: Body = b""
    length: int | None = None
    sent: Callable[[int], None] | None = None
    """Called once with the body bytes written to the client (students' bytes, for
    ``/metrics``)."""
    close: bool = False
    """Close the connection after this answer (HTTP/1.1)."""

    def declared_length(self) -> int | None:
        if self.length is not None:
            return self.length
        if isinstance(self.body, bytes):
            return len(self.body)
        if isinstance(self.body, FileBody):
            return self.body.length
        return None


Writer = Callable[[Answer], Awaitable[None]]
"""A transport's way to send an answer: it returns when the body is written (or the client
is gone)."""


def json_answer(status: int, body: bytes, **headers: str) -> Answer:
    fields: CIMultiDict[str] = CIMultiDict(headers)
    fields["Content-Type"] = "application/json; charset=utf-8"
    return Answer(status, fields, body)


def error_answer(status: int, message: str, **headers: str) -> Answer:
    """The edge's own error answer: the one JSON error body of :mod:`common.errors`."""
    return json_answer(status, error_json(status, message), **headers)
