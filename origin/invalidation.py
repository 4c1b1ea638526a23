"""The origin's own caches follow the purge stream, so a purge is never undone one hop up.

The origin keeps two short-lived in-process caches on its read path: parsed manifests
(:class:`assets.catalogue.Catalogue`, 1 s) and resolved deliveries of content URLs
(:class:`origin.app.ContentCache`, 1 s for mutable pointers). A worker in another process
publishes by writing the manifest to storage and then appending a soft tag purge to
``kshipra:purges``. Edges apply it within milliseconds and revalidate at once; if the origin
then answered from its 1 s cache, the edge would get the OLD version's validator, a 304, and
re-freshen the old object for a whole TTL (seen: 60.5 s after the purge). So:

* **the origin follows the stream too** (:meth:`CacheInvalidator.run`): every entry drops the
  cached manifest of the asset it names (a ``{kind}:{id}`` tag; any other purge drops them all)
  and every resolved delivery that could have changed;
* **a request that has seen a newer purge waits for the origin to see it**: edges send
  ``Kshipra-Purge-Seen`` (their last applied entry) with every fetch; an origin behind that
  position reads the stream up to it (one non-blocking ``XREAD``, bounded by
  :data:`CATCH_UP_TIMEOUT_S`) before answering, so an edge's revalidation right after a purge
  always reads the manifest the purge was about;
* **no read that began before an invalidation is cached after it**: both caches keep a
  generation counter that every invalidation bumps; a read that started under an older
  generation answers its request but is not remembered.

Why this and not a validator in the purge entry: the mutable URLs of one asset are many
(``latest.json`` and its ``br``/``gzip``/``dcz`` variants, a lecture's playlists) and purges
also come from ``kshipra purge`` and S3 notifications, which know no validator; making every
hop apply a purge before it answers a request that has seen it covers all of them with one rule,
the same one shields already follow for their children.

The origin starts reading at the stream's end: its caches start empty, so history is moot.
Redis down: the caches expire by TTL as before (1 s), and the follower retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.wire import BadPurgeEntry, PurgeEntry, stream_position

log = logging.getLogger(__name__)

CATCH_UP_TIMEOUT_S = 0.5
READ_BLOCK_MS = 2_000
READ_BATCH = 1_000
BACKOFF_MAX_S = 5.0
_ASSET_TAG_RE = re.compile(r"^(lecture|image|bundle):([a-z0-9][a-z0-9._-]{0,99})$")

Invalidate = Callable[["str | None", "str | None"], None]
"""``invalidate(kind, asset_id)``: drop what is cached about one asset, or about every asset
when both are ``None``."""


def purge_scope(fields: dict[str, str]) -> tuple[str | None, str | None]:
    """Which asset a purge entry is about: ``(kind, id)`` for an asset's own tag, ``(None,
    None)`` (everything) for URLs, prefixes and other tags — cheap, as the caches live 1 s."""
    try:
        entry = PurgeEntry.from_fields(fields)
    except BadPurgeEntry:
        return None, None  # the edges skip it too; the origin's caches live 1 s
    if entry.kind == "tag":
        match = _ASSET_TAG_RE.match(entry.value)
        if match is not None:
            return match.group(1), match.group(2)
    return None, None


class CacheInvalidator:
    """Follows the purge stream for the origin's in-process caches."""

    def __init__(self, redis: aioredis.Redis, stream: str, invalidate: Invalidate) -> None:
        self._redis = redis
        self._stream = stream
        self._invalidate = invalidate
        self._position: tuple[int, int] | None = None
        self.last_applied: str | None = None
        self._lock = asyncio.Lock()
        self._catching_up = asyncio.Lock()

    async def start_position(self) -> None:
        """Begin at the stream's current end (nothing cached yet can predate it)."""
        try:
            info = await self._redis.xinfo_stream(self._stream)
        except RedisError as exc:
            if "no such key" not in str(exc).lower():
                raise
            self._set("0-0")
        else:
            self._set(str(info["last-generated-id"]))

    def _set(self, stream_id: str) -> None:
        self.last_applied = stream_id
        self._position = stream_position(stream_id)

    def behind(self, seen: str | None) -> bool:
        """Has a request seen a purge that we have not applied?"""
        if seen is None or self._position is None:
            return False
        wanted = stream_position(seen)
        return wanted is not None and wanted > self._position

    async def catch_up_to(self, seen: str) -> None:
        """Apply everything up to *seen* before answering (bounded; never raises). Requests
        that arrive together share one read."""
        try:
            async with asyncio.timeout(CATCH_UP_TIMEOUT_S), self._catching_up:
                if self.behind(seen):
                    await self._read_and_apply(block_ms=None)
        except (TimeoutError, RedisError, OSError) as exc:
            log.warning("origin: answering before catching up to purge %s (%s)", seen, exc)

    async def _read_and_apply(self, *, block_ms: int | None) -> int:
        assert self.last_applied is not None
        answer: Any = await self._redis.xread(
            {self._stream: self.last_applied}, count=READ_BATCH, block=block_ms
        )
        entries = [] if not answer else list(answer[0][1])
        async with self._lock:
            for stream_id, fields in entries:
                position = stream_position(stream_id)
                if position is None or (self._position is not None and position <= self._position):
                    continue
                self._invalidate(*purge_scope(fields))
                self._set(stream_id)
        return len(entries)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the stream until *stop* is set, retrying with backoff while Redis is down
        (the caches then expire by their TTL alone)."""
        delay = 0.1
        while not stop.is_set():
            try:
                if self.last_applied is None:
                    await self.start_position()
                await self._read_and_apply(block_ms=READ_BLOCK_MS)
                delay = 0.1
            except (RedisError, OSError) as exc:
                log.warning("origin: purge stream unavailable (%s); retrying", exc)
                self._invalidate(None, None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
