"""The door of every edge connection: a deadline for each request head, a stall limit for
students who stop reading, and a cap on connections per client address.

aiohttp's server has an idle keep-alive timeout and nothing else: a client that sends a
header byte every 2 s, or connects and says nothing, holds its socket (and a file descriptor)
forever, and 1,000 of them lock students out. :class:`Doorman` wraps each connection's
aiohttp protocol in a :class:`GuardedConnection` (an ``asyncio.Protocol`` passing every call
through, public asyncio interfaces only) that watches the bytes arriving:

- **Head deadline.** From a connection's start, and from the first byte of each later
  request, the head (up to its blank line) must arrive within ``header_timeout_s``, else the
  connection is closed, as nginx's ``client_header_timeout`` does. A silent connection is a
  head that never started. Request heads are found by their blank line only; a request that
  declares a body (``Content-Length`` other than 0, ``Transfer-Encoding``) hands the
  connection to the request flow, which reads bodies under its own timeouts and closes the
  connection after answering (see :func:`edge.app.proxy`), so body bytes are never taken for
  a head.
- **Send stall.** A response the client stopped reading (the transport's write buffer full,
  aiohttp paused) is given ``send_stall_s`` to drain; then the connection is aborted, as
  nginx's ``send_timeout``. A phone on 2G reads slowly but keeps reading.
- **Connections per client.** At most ``connections_per_client`` open connections per IPv4
  address or IPv6 /64; the next gets ``429`` and is closed. Mobile carriers put many students
  behind one address (carrier-grade NAT), so the default is generous: it stops one machine
  from holding every descriptor, not a crowded campus.

Deadlines are checked by one sweep per server every ``header_timeout_s / 4`` (at most 1 s),
over the connections waiting on a head or a stalled send only; a request whose head arrives
in one piece (nearly all) costs one ``bytes.find`` and a regular-expression search.
"""

from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass
from typing import Any, cast

from common.errors import error_json

HEAD_END = b"\r\n\r\n"
MAX_PARTIAL_HEAD_BYTES = 64 * 1024
"""A head still incomplete past this is left to aiohttp's parser, which refuses it (431)."""

_DECLARES_BODY = re.compile(
    rb"\r\n(?:content-length[ \t]*:[ \t]*(?!0*[ \t]*\r\n)|transfer-encoding[ \t]*:|upgrade[ \t]*:)",
    re.IGNORECASE,
)
"""A head with a body (or asking to switch protocols): after it, bytes are not heads."""


@dataclass(frozen=True, slots=True)
class DoorLimits:
    header_timeout_s: float = 10.0
    """A request head must arrive within this from its first byte (a new connection's first
    head: from the connection)."""
    send_stall_s: float = 60.0
    """A response whose client reads nothing for this long is abandoned."""
    connections_per_client: int = 256
    """Open connections per IPv4 address or IPv6 /64; ``0``: no cap."""


@dataclass(slots=True)
class DoorCounts:
    """What the door refused, for ``/metrics``."""

    head_timeouts: int = 0
    send_stalls: int = 0
    refused_connections: int = 0
    open_connections: int = 0


_TOO_MANY_BODY = error_json(429, "too many open connections from your address")
_TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 5\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_TOO_MANY_BODY)).encode() + b"\r\n\r\n" + _TOO_MANY_BODY
)
"""The edge's error body shape (see :func:`edge.app.error_response`), written before the
request is read."""


def client_key(peername: Any) -> bytes | str | None:
    """The unit connections are counted by: the IPv4 address, or the IPv6 /64."""
    if not isinstance(peername, tuple) or not peername:
        return None  # a Unix socket: not a client on the internet
    host = str(peername[0])
    if ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return host
    if packed[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return packed[:8]


class Doorman:
    """The door of one listening server: counts per client, the deadline sweep."""

    def __init__(self, limits: DoorLimits) -> None:
        self.limits = limits
        self.counts = DoorCounts()
        self._per_client: dict[bytes | str, int] = {}
        self._heads: dict[GuardedConnection, float] = {}
        """Connections waiting on a request head, and when it began."""
        self._stalls: dict[GuardedConnection, float] = {}
        """Connections whose writing is paused, and since when."""
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wrap(self, inner: asyncio.Protocol) -> GuardedConnection:
        return GuardedConnection(inner, self)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # ---- called by the connections -------------------------------------------------------

    def admit(self, key: bytes | str | None) -> bool:
        if key is None:
            return True
        cap = self.limits.connections_per_client
        count = self._per_client.get(key, 0)
        if cap and count >= cap:
            self.counts.refused_connections += 1
            return False
        self._per_client[key] = count + 1
        return True

    def release(self, key: bytes | str | None) -> None:
        if key is None:
            return
        count = self._per_client.get(key, 0) - 1
        if count > 0:
            self._per_client[key] = count
        else:
            self._per_client.pop(key, None)

    def head_began(self, connection: GuardedConnection) -> None:
        self._heads[connection] = self._now()

    def head_done(self, connection: GuardedConnection) -> None:
        self._heads.pop(connection, None)

    def writing_paused(self, connection: GuardedConnection) -> None:
        self._stalls[connection] = self._now()

    def writing_resumed(self, connection: GuardedConnection) -> None:
        self._stalls.pop(connection, None)

    def gone(self, connection: GuardedConnection) -> None:
        self._heads.pop(connection, None)
        self._stalls.pop(connection, None)

    # ---- the sweep -----------------------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        if self._sweep is None:
            self._sweep = loop.call_later(self._period(), self._check)
        return loop.time()

    def _period(self) -> float:
        return min(1.0, self.limits.header_timeout_s / 4)

    def _check(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        head_deadline = now - self.limits.header_timeout_s
        for connection, began in list(self._heads.items()):
            if began <= head_deadline:
                self.counts.head_timeouts += 1
                connection.close_now(abort=False)
        stall_deadline = now - self.limits.send_stall_s
        for connection, since in list(self._stalls.items()):
            if since <= stall_deadline:
                self.counts.send_stalls += 1
                connection.close_now(abort=True)
        self._sweep = self._loop.call_later(self._period(), self._check)


class GuardedConnection(asyncio.Protocol):
    """An aiohttp server protocol behind the door (see the module's docstring)."""

    __slots__ = (
        "_body_seen",
        "_client",
        "_doorman",
        "_inner",
        "_partial",
        "_refused",
        "_transport",
        "_waiting",
    )

    def __init__(self, inner: asyncio.Protocol, doorman: Doorman) -> None:
        self._inner = inner
        self._doorman = doorman
        self._transport: asyncio.Transport | None = None
        self._client: bytes | str | None = None
        self._refused = False
        self._partial = b""
        """The start of a request head whose end has not arrived."""
        self._body_seen = False
        """A head declared a body: the request flow owns this connection's bytes now."""
        self._waiting = False
        """The doorman's clock runs for this connection's head."""

    @property
    def inner(self) -> asyncio.Protocol:
        return self._inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        doorman = self._doorman
        self._client = client_key(transport.get_extra_info("peername"))
        if not doorman.admit(self._client):
            self._refused = True
            transport.write(_TOO_MANY)
            transport.close()
            return
        doorman.counts.open_connections += 1
        self._began()  # a silent connection is a head that never starts
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._body_seen:
            if (
                not self._partial
                and data.endswith(HEAD_END)
                and _DECLARES_BODY.search(data) is None
            ):
                # Nearly every request: whole heads only, none with a body.
                if self._waiting:
                    self._done()
            else:
                self._watch_heads(data)
        self._inner.data_received(data)

    def _began(self) -> None:
        self._waiting = True
        self._doorman.head_began(self)

    def _done(self) -> None:
        self._waiting = False
        self._doorman.head_done(self)

    def _watch_heads(self, data: bytes) -> None:
        buffer = self._partial + data if self._partial else data
        start = 0
        while True:
            # Empty lines before a request line are allowed (RFC 9112 §2.2).
            while buffer.startswith(b"\r\n", start):
                start += 2
            if start >= len(buffer):
                self._partial = b""
                self._done()
                return
            end = buffer.find(HEAD_END, start)
            if end < 0:
                break
            if _DECLARES_BODY.search(buffer, start, end + 2) is not None:
                self._body_seen = True
                self._partial = b""
                self._done()
                return
            start = end + 4
        began = not self._partial
        self._partial = buffer[start:] if start else buffer
        if len(self._partial) > MAX_PARTIAL_HEAD_BYTES:
            self._body_seen = True  # aiohttp's parser refuses it; stop watching
            self._partial = b""
            self._done()
            return
        if began or start:
            self._began()

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        doorman = self._doorman
        doorman.gone(self)
        if self._refused:
            return
        doorman.counts.open_connections -= 1
        doorman.release(self._client)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._doorman.writing_paused(self)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._doorman.writing_resumed(self)
        self._inner.resume_writing()

    def close_now(self, *, abort: bool) -> None:
        self._doorman.gone(self)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if abort:
            transport.abort()
        else:
            transport.close()
