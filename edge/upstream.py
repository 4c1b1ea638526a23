"""fetch: the edge's one way to its upstream (the origin or a parent edge).

Keep-alive pooling and a bound on concurrent upstream requests come from aiohttp's connector;
timeouts from configuration. Failures come back as :class:`UpstreamError` with the kind of
failure, which decides whether stale content may be served instead.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from yarl import URL

from edge.rfc9111 import Headers, strip_hop_by_hop

FailureKind = Literal["timeout", "refused", "reset", "protocol", "shed"]
"""``shed``: not sent at all, the edge's limit of upstream requests at once was reached."""
READ_CHUNK_BYTES = 256 * 1024
Body = bytes | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def status(self) -> int:
        """What a client is answered when nothing stored can be served instead."""
        return {"timeout": 504, "shed": 503}.get(self.kind, 502)


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]
    """End-to-end headers as received (hop-by-hop removed)."""
    request_time: float
    response_time: float
    _response: aiohttp.ClientResponse
    _on_bytes: Callable[[int], None] | None = None

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._response.content.iter_chunked(READ_CHUNK_BYTES):
                if self._on_bytes is not None:
                    self._on_bytes(len(chunk))
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError("reset", f"upstream body failed: {exc}") from exc
        finally:
            self._response.release()

    async def read(self, limit_bytes: int) -> bytes:
        parts, total = [], 0
        async for chunk in self.chunks():
            total += len(chunk)
            if total > limit_bytes:
                raise UpstreamError("protocol", f"upstream body larger than {limit_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        self._response.close()


UPSTREAM_IDLE_S = 4.0
"""A pooled upstream connection is dropped after this long idle: below the idle timeouts of
the servers it talks to (our own 15 s, many origins' 5 s), so the edge rarely reuses a
connection the other side is closing. aiohttp retries an idempotent request once when a reused
connection was closed under it; a POST is not retried (it may have been applied)."""


class Upstream:
    """A pooled HTTP client for one upstream base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        max_connections: int,
        max_waiting: int = 0,
        on_body_bytes: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._on_body_bytes = on_body_bytes
        self._clock = clock
        """Unix seconds: the request and response times of RFC 9111 §4.2.3's age."""
        self.max_waiting = max_waiting
        """At most this many requests waiting for a connection or for response headers at
        once (``0``: no limit); past it :meth:`request` fails at once with ``shed``."""
        self.waiting = 0
        self.shed = 0
        self.base_url = URL(base_url.rstrip("/"))
        self.host_header = self.base_url.raw_authority
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout_s, 10.0), sock_read=timeout_s
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=UPSTREAM_IDLE_S,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, path_and_query: str, headers: Headers, body: Body = None
    ) -> UpstreamResponse:
        """Send a request; the caller reads or closes the response. A body is bytes or an
        async iterator of chunks (a client's request body, streamed)."""
        assert self._session is not None, "Upstream.start() first"
        if self.max_waiting and self.waiting >= self.max_waiting:
            self.shed += 1
            raise UpstreamError(
                "shed", f"the edge already has {self.waiting} requests waiting on upstream"
            )
        self.waiting += 1
        try:
            return await self._request(method, path_and_query, headers, body)
        finally:
            self.waiting -= 1

    async def _request(
        self, method: str, path_and_query: str, headers: Headers, body: Body
    ) -> UpstreamResponse:
        assert self._session is not None
        url = URL(str(self.base_url) + path_and_query, encoded=True)
        request_time = self._clock()
        try:
            response = await self._session.request(
                method,
                url,
                headers=list(headers),
                data=body,
                allow_redirects=False,
            )
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"upstream timed out: {self.base_url}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                "refused", f"cannot connect to upstream {self.base_url}: {exc}"
            ) from exc
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError("protocol", f"upstream failed: {str(exc)[:200]}") from exc
        headers_out = strip_hop_by_hop(  # field names interned: every stored response has them
            [
                (sys.intern(k.decode("latin-1")), v.decode("latin-1"))
                for k, v in response.raw_headers
            ]
        )
        return UpstreamResponse(
            status=response.status,
            headers=headers_out,
            request_time=request_time,
            response_time=self._clock(),
            _response=response,
            _on_bytes=self._on_body_bytes,
        )
