"""A client of the origin's API, used by ``kshipra upload``, ``jobs`` and ``status``.

Transfer events (bytes sent, parts done) go to a listener object; the CLI decides how to show
them. Failures are :class:`ClientError` subclasses whose ``exit_code`` the CLI returns.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from assets.hashing import BLOCK_BYTES, content_hash_of_file
from kshipra.exits import EXIT_AUTH, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_SERVER

READ_CHUNK_BYTES = 256 * 1024
PART_ATTEMPTS = 4


class ClientError(Exception):
    exit_code = EXIT_FAILED


class BadInput(ClientError):
    """The file or the request is wrong (local checks, or a 4xx other than auth)."""

    exit_code = EXIT_BAD_INPUT


class AuthFailed(ClientError):
    exit_code = EXIT_AUTH


class ServerFailed(ClientError):
    """The origin failed or could not be reached; retrying later may work."""

    exit_code = EXIT_SERVER


class TransferListener(Protocol):
    def started(self, *, total_bytes: int, already_bytes: int, phase: str) -> None: ...

    def advanced(self, sent_bytes: int) -> None: ...

    def finished(self) -> None: ...


class SilentListener:
    def started(self, *, total_bytes: int, already_bytes: int, phase: str) -> None:
        pass

    def advanced(self, sent_bytes: int) -> None:
        pass

    def finished(self) -> None:
        pass


@dataclass
class UploadReport:
    asset: dict[str, Any]
    created: bool
    size_bytes: int
    sent_bytes: int = 0
    parts_total: int = 0
    resumed_parts: int = 0
    duration_s: float = 0.0
    mode: str = "single"
    extra: dict[str, Any] = field(default_factory=dict)


def _message(body: Any, status: int) -> str:
    """The error's message, then its ``problems`` (a refused bundle's), one per line."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        message = str(error.get("message", status))
        problems = error.get("problems")
        if not isinstance(problems, list):
            return message
        lines = [message]
        for problem in problems:
            if isinstance(problem, dict):
                line = f"{problem.get('path', '$')}: {problem.get('message', '')}"
                if len(problems) > 1 or str(problem.get("message")) not in message:
                    lines.append(f"  {line}")
        total = error.get("problems_total")
        if isinstance(total, int) and total > len(problems):
            lines.append(f"  ... and {total - len(problems)} more")
        return "\n".join(lines)
    return f"HTTP {status}"


class RateLimiter:
    """Caps a transfer at *bytes_per_s* (``None``: unlimited)."""

    def __init__(self, bytes_per_s: int | None) -> None:
        self._rate = bytes_per_s
        self._start = time.monotonic()
        self._sent = 0

    async def account(self, size: int) -> None:
        if not self._rate:
            return
        self._sent += size
        ahead_s = self._sent / self._rate - (time.monotonic() - self._start)
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)


class OriginClient:
    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OriginClient:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use 'async with OriginClient(...)'"
        return self._session

    async def request(
        self, method: str, path: str, *, expect: tuple[int, ...] = (200,), **kwargs: Any
    ) -> tuple[int, Any]:
        url = self.base_url + path
        try:
            async with self.session.request(method, url, **kwargs) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                status = response.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise ServerFailed(f"cannot reach the origin at {self.base_url}: {exc}") from exc
        if status in expect:
            return status, body
        message = _message(body, status)
        if status in (401, 403):
            raise AuthFailed(f"{message} (check KSHIPRA_UPLOAD_TOKEN)")
        if 400 <= status < 500:
            raise BadInput(message)
        raise ServerFailed(f"the origin failed: {message}")

    async def list_assets(self) -> list[dict[str, Any]]:
        """The whole catalogue, page by page."""
        assets: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            path = "/v1/assets?limit=1000" + ("" if after is None else f"&after={after}")
            _, body = await self.request("GET", path)
            assets.extend(body["assets"])
            after = body.get("next")
            if after is None:
                return assets

    async def jobs(self) -> dict[str, Any]:
        _, body = await self.request("GET", "/v1/jobs")
        return dict(body)

    async def asset(self, asset_id: str) -> dict[str, Any]:
        _, body = await self.request("GET", f"/v1/assets/{asset_id}")
        return dict(body)

    async def upload(
        self,
        path: Path,
        *,
        kind: str | None,
        asset_id: str | None,
        tags: list[str],
        listener: TransferListener,
        max_rate_bytes_per_s: int | None = None,
    ) -> UploadReport:
        """Upload *path*: one request when it fits one block, else a resumable session."""
        if not await asyncio.to_thread(path.is_file):
            raise BadInput(f"{path}: not a file")
        size = (await asyncio.to_thread(path.stat)).st_size
        if size == 0:
            raise BadInput(f"{path}: the file is empty")
        started = time.monotonic()
        limiter = RateLimiter(max_rate_bytes_per_s)
        if size <= BLOCK_BYTES:
            report = await self._upload_single(path, size, kind, asset_id, tags, listener, limiter)
        else:
            report = await self._upload_resumable(
                path, size, kind, asset_id, tags, listener, limiter
            )
        report.duration_s = time.monotonic() - started
        return report

    async def _upload_single(  # noqa: PLR0913 - one upload's values, passed down the transfer
        self,
        path: Path,
        size: int,
        kind: str | None,
        asset_id: str | None,
        tags: list[str],
        listener: TransferListener,
        limiter: RateLimiter,
    ) -> UploadReport:
        params: list[tuple[str, str]] = [("filename", path.name)]
        if kind:
            params.append(("kind", kind))
        if asset_id:
            params.append(("id", asset_id))
        params.extend(("tag", tag) for tag in tags)
        listener.started(total_bytes=size, already_bytes=0, phase="upload")
        body = _file_span(path, 0, size, listener, limiter)
        _, answer = await self.request(
            "POST",
            "/v1/assets",
            params=params,
            data=body,
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            expect=(200, 201),
        )
        listener.finished()
        return UploadReport(
            asset=answer["asset"], created=answer["created"], size_bytes=size, sent_bytes=size
        )

    async def _upload_resumable(  # noqa: PLR0913 - one upload's values, passed down the transfer
        self,
        path: Path,
        size: int,
        kind: str | None,
        asset_id: str | None,
        tags: list[str],
        listener: TransferListener,
        limiter: RateLimiter,
    ) -> UploadReport:
        content_hash, _ = await asyncio.to_thread(content_hash_of_file, str(path))
        request = {
            "size_bytes": size,
            "content_hash": content_hash,
            "filename": path.name,
            "kind": kind,
            "id": asset_id,
            "tags": tags,
        }
        _, answer = await self.request("POST", "/v1/uploads", json=request, expect=(200, 201))
        if "asset" in answer:
            return UploadReport(
                asset=answer["asset"], created=answer["created"], size_bytes=size, mode="dedup"
            )
        upload = answer["upload"]
        upload_id = upload["upload_id"]
        part_bytes = int(upload["part_bytes"])
        received = set(upload["received_parts"])
        total = int(upload["parts_total"])
        already = sum(min(part_bytes, size - (n - 1) * part_bytes) for n in received)
        listener.started(total_bytes=size, already_bytes=already, phase="upload")
        sent = 0
        for number in range(1, total + 1):
            if number in received:
                continue
            offset = (number - 1) * part_bytes
            length = min(part_bytes, size - offset)
            await self._send_part(upload_id, number, path, offset, length, listener, limiter)
            sent += length
        _, done = await self.request("POST", f"/v1/uploads/{upload_id}/complete", expect=(200, 201))
        listener.finished()
        return UploadReport(
            asset=done["asset"],
            created=done["created"],
            size_bytes=size,
            sent_bytes=sent,
            parts_total=total,
            resumed_parts=len(received),
            mode="resumable",
            extra={"upload_id": upload_id},
        )

    async def _send_part(  # noqa: PLR0913 - one part's values, passed down the transfer
        self,
        upload_id: str,
        number: int,
        path: Path,
        offset: int,
        length: int,
        listener: TransferListener,
        limiter: RateLimiter,
    ) -> None:
        for attempt in range(1, PART_ATTEMPTS + 1):
            try:
                await self.request(
                    "PUT",
                    f"/v1/uploads/{upload_id}/parts/{number}",
                    data=_file_span(path, offset, length, listener, limiter),
                    headers={
                        "Content-Length": str(length),
                        "Content-Type": "application/octet-stream",
                    },
                )
                return
            except ServerFailed:
                if attempt == PART_ATTEMPTS:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)


async def _file_span(
    path: Path, offset: int, length: int, listener: TransferListener, limiter: RateLimiter
) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(handle.seek, offset)
        remaining = length
        while remaining:
            chunk = await asyncio.to_thread(handle.read, min(READ_CHUNK_BYTES, remaining))
            if not chunk:
                raise BadInput(f"{path} shrank while it was being uploaded")
            remaining -= len(chunk)
            await limiter.account(len(chunk))
            listener.advanced(len(chunk))
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)


def default_origin_url() -> str:
    return os.environ.get("KSHIPRA_ORIGIN_URL", "http://127.0.0.1:8080")
