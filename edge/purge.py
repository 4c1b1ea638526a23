"""Invalidation on the edge: purge matching (pure), applying purges to the cache, the operator
endpoint, and the consumer of the fleet's purge stream.

A purge names a URL (every variant, encoding and slice of it), a prefix of URLs, or a cache tag
(from the origin's ``Surrogate-Key``), and is *soft* (mark stale: revalidated with its stored
ETag before it is next served, so an unchanged object costs a 304, and served as it was only if
upstream fails; see :func:`edge.rfc9111.reuse`) or *hard* (remove).

Applying is a scan of the tiers' metadata — no tag index to keep consistent with evictions,
promotions and other workers' disk stores. A batch of purges is applied in one scan: hard wins
over soft for an entry, which is exactly what applying them one by one in order gives (remove
and mark are idempotent and commute except that a removed entry cannot be marked). Measured
(100,000 objects under 10,000 tags, 10 objects per tag): one tag purge takes about 40 ms on a
memory-only edge and 200-320 ms with a disk tier (the scan plus the file deletions); a batch
of 1,000 tag purges costs about one scan plus its deletions, so a replay after an outage is
bounded by the deletions, not by the number of purges. The scan runs on the event loop.

Redis keys (the origin side, ``kshipra purge``, reads and writes these):

``kshipra:purges`` (stream, :data:`common.wire.PURGE_STREAM`)
    One entry per purge, fields ``kind`` (``url`` | ``prefix`` | ``tag``), ``value`` (a path or
    full URL, a path prefix, or a tag), ``soft`` (``"1"`` / ``"0"``), ``reason``, and
    ``requested_at`` (Unix seconds as a decimal string). Every edge reads it with plain
    ``XREAD`` (no consumer group: every edge must see every purge) from the last id it applied.
``kshipra:purge-acks:<stream id>`` (hash, expires after :data:`ACK_TTL_S`)
    One field per edge that applied the purge: ``<edge name>`` → seconds from ``requested_at``
    to applied, as a decimal string. ``HLEN`` counts the acks, ``HGETALL`` gives latencies.
    Applying twice (replays, several workers of one edge) overwrites the same field.
``kshipra:edges:<edge name>`` (string, ``EX`` :data:`HEARTBEAT_TTL_S`)
    Refreshed every :data:`HEARTBEAT_INTERVAL_S` while the edge runs: JSON
    ``{"name", "upstream", "last_applied", "pid", "at"}``. ``SCAN MATCH kshipra:edges:*``
    lists the live edges.

Where an edge starts reading, and why:

* with a disk tier, from the id in ``<disk_dir>/.purge-cursor`` (written atomically after each
  applied batch). No cursor file but a non-empty disk cache: from the beginning of the stream.
  No cursor and an empty cache: from the stream's current end (nothing stored can be stale);
* memory only: from the stream's current end — the cache starts empty, so replaying history
  would only cost time;
* if the stream was trimmed past our cursor (see :func:`missed_purges`), purges were lost:
  everything stored is soft-purged (revalidated, 304s when unchanged) before serving.

Catch-up happens in :meth:`PurgeConsumer.start`, before the edge serves. If Redis cannot be
reached at start-up, the edge waits up to ``startup_timeout_s`` and then serves from cache
while the consumer keeps retrying with backoff; the same happens during an outage.

Shields: an edge sends its parent edge :data:`PURGE_SEEN_HEADER` (its last applied id); a
parent that has not applied that id yet catches up (bounded by :data:`PURGE_SEEN_WAIT_S`)
before answering, so a child cannot refill from its shield what it has just purged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.auth import bearer_check
from common.wire import (
    ACK_PREFIX,
    ACK_TTL_S,
    EDGE_PREFIX,
    PURGE_STREAM,
    BadPurgeEntry,
    PurgeEntry,
    PurgeKind,
    stream_position,
)
from edge.cache import TieredCache
from edge.keys import BadTarget, normalise_target, primary_key
from edge.transport import Answer, error_answer, json_answer

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 15
READ_BLOCK_MS = 2_000
READ_BATCH = 1_000
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
STARTUP_TIMEOUT_S = 30.0
CURSOR_FILE = ".purge-cursor"
PURGE_SEEN_WAIT_S = 2.0
MAX_PURGES_PER_REQUEST = 10_000

Action = Literal["remove", "mark"]


class PurgeError(Exception):
    """Root of this module's errors."""


class BadPurge(PurgeError, ValueError):
    """A purge that cannot be understood (answer 400; skip a stream entry)."""


# ---- the model (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purge:
    kind: PurgeKind
    value: str
    soft: bool
    id: str
    """The stream entry id, or ``local-…`` for the operator endpoint."""
    requested_at: float


def stream_id_order(stream_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` → ``(1700000000000, 3)``, for comparing stream ids."""
    position = stream_position(stream_id)
    if position is None:
        raise BadPurge(f"not a stream id: {stream_id!r}")
    return position


def missed_purges(cursor: str, info: dict[str, Any], *, cursor_present: bool) -> bool:
    """Did the stream lose entries after *cursor* (``XINFO STREAM`` *info*)? Trimming drops the
    oldest entries, so a cursor older than the first entry, when entries were trimmed and the
    cursor's own entry is gone, may have lost some; an ``XDEL`` after the cursor certainly
    did. Errs towards yes: the price is a soft purge of everything (revalidations)."""
    position = stream_id_order(cursor)
    deleted = str(info.get("max-deleted-entry-id") or "0-0")
    if stream_id_order(deleted) > position:
        return True
    first = info.get("first-entry")
    if not first or cursor_present:
        return False
    trimmed = int(info.get("entries-added") or 0) > int(info.get("length") or 0)
    return trimmed and stream_id_order(str(first[0])) > position


def purge_from_fields(stream_id: str, fields: dict[str, str]) -> Purge:
    """A stream entry's fields as a :class:`Purge`; :class:`BadPurge` if malformed."""
    try:
        entry = PurgeEntry.from_fields(fields)
    except BadPurgeEntry as bad:
        raise BadPurge(str(bad)) from None
    return Purge(entry.kind, entry.value, entry.soft, stream_id, entry.requested_at)


def purges_from_request(document: Any, *, id_prefix: str, now: float) -> list[Purge]:
    """The operator endpoint's JSON, ``{"urls": [...], "prefixes": [...], "tags": [...],
    "soft": bool}``, as purges; :class:`BadPurge` if malformed."""
    if not isinstance(document, dict):
        raise BadPurge("expected a JSON object")
    unknown = set(document) - {"urls", "prefixes", "tags", "soft"}
    if unknown:
        raise BadPurge(f"unknown fields: {', '.join(sorted(unknown))}")
    soft = document.get("soft", False)
    if not isinstance(soft, bool):
        raise BadPurge("soft must be true or false")
    purges: list[Purge] = []
    for field_name, kind in (("urls", "url"), ("prefixes", "prefix"), ("tags", "tag")):
        values = document.get(field_name, [])
        if not isinstance(values, list) or not all(
            isinstance(value, str) and value for value in values
        ):
            raise BadPurge(f"{field_name} must be a list of non-empty strings")
        purges += [
            Purge(kind, value, soft, f"{id_prefix}-{len(purges)}", now)  # type: ignore[arg-type]
            for value in values
        ]
    if not purges:
        raise BadPurge("name at least one URL, prefix or tag")
    if len(purges) > MAX_PURGES_PER_REQUEST:
        raise BadPurge(f"at most {MAX_PURGES_PER_REQUEST} purges per request")
    return purges


def _path_of(value: str) -> str:
    """A full URL's path and query, or *value* itself if it is already a path."""
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(.*)$", value)
    if match is not None:
        return match.group(1) or "/"
    return value


def url_key_of(host: str, value: str) -> str:
    """The edge's primary key for a purge's URL (a path or a full URL: only the path and
    query count, since the public host need not be the cache key's host)."""
    try:
        return primary_key(host, normalise_target(_path_of(value)))
    except BadTarget as exc:
        raise BadPurge(f"bad URL {value!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Matcher:
    """A batch of purges compiled for one edge's keys."""

    hard_urls: frozenset[str]
    soft_urls: frozenset[str]
    hard_prefixes: tuple[str, ...]
    soft_prefixes: tuple[str, ...]
    hard_tags: frozenset[str]
    soft_tags: frozenset[str]

    @classmethod
    def compile(cls, host: str, purges: Iterable[Purge]) -> Matcher:
        urls: dict[bool, set[str]] = {True: set(), False: set()}
        prefixes: dict[bool, set[str]] = {True: set(), False: set()}
        tags: dict[bool, set[str]] = {True: set(), False: set()}
        for purge in purges:
            if purge.kind == "url":
                urls[purge.soft].add(url_key_of(host, purge.value))
            elif purge.kind == "prefix":
                prefixes[purge.soft].add(url_key_of(host, purge.value))
            else:
                tags[purge.soft].add(purge.value)
        return cls(
            frozenset(urls[False]),
            frozenset(urls[True]),
            tuple(sorted(prefixes[False])),
            tuple(sorted(prefixes[True])),
            frozenset(tags[False]),
            frozenset(tags[True]),
        )

    def action(self, key: str, url_key: str, tags: Sequence[str]) -> Action | None:
        """What the batch does to one stored entry (``url_key`` empty: the key is the URL)."""
        url = url_key or key
        if (
            url in self.hard_urls
            or (self.hard_prefixes and url.startswith(self.hard_prefixes))
            or not self.hard_tags.isdisjoint(tags)
        ):
            return "remove"
        if (
            url in self.soft_urls
            or (self.soft_prefixes and url.startswith(self.soft_prefixes))
            or not self.soft_tags.isdisjoint(tags)
        ):
            return "mark"
        return None


def plan(matcher: Matcher, entries: Iterable[tuple[str, str, Sequence[str]]]) -> dict[str, Action]:
    """``(key, url_key, tags)`` of every stored entry → what to do to the affected ones."""
    actions: dict[str, Action] = {}
    for key, url_key, tags in entries:
        action = matcher.action(key, url_key, tags)
        if action is not None:
            actions[key] = action
    return actions


# ---- applying to the cache ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Applied:
    removed: int
    marked: int

    @property
    def affected(self) -> int:
        return self.removed + self.marked


def _stored(cache: TieredCache) -> Iterator[tuple[str, str, Sequence[str]]]:
    """Every stored entry's ``(key, url_key, tags)``, read from the tiers' indexes without
    decoding disk metadata (that is what keeps a scan of 100,000 entries cheap)."""
    return cache.index()  # entries in both tiers come twice: plan() keeps one


async def apply_purges(cache: TieredCache, host: str, purges: Sequence[Purge]) -> Applied:
    """Apply a batch of purges (in stream order) to every tier of *cache*."""
    if not purges:
        return Applied(0, 0)
    actions = plan(Matcher.compile(host, purges), _stored(cache))
    metas = cache.peek_metas({key for key, action in actions.items() if action == "mark"})
    removed = marked = 0
    for key, action in actions.items():
        if action == "remove":
            await cache.remove(key)
            removed += 1
            continue
        meta = metas.get(key)
        if meta is None:
            continue  # evicted meanwhile
        if not meta.soft_purged:
            await cache.update_meta(key, replace(meta, soft_purged=True))
        marked += 1
    return Applied(removed, marked)


# ---- the operator endpoint ----------------------------------------------------------------


def _unauthorised(authorization: str | None, token: str | None) -> Answer | None:
    if token is None:
        return error_answer(404, "purging is disabled on this edge: no purge token is configured")
    checked = bearer_check(authorization, token)
    if checked == "missing":
        return error_answer(401, "a bearer token is required", **{"WWW-Authenticate": "Bearer"})
    if checked == "wrong":
        return error_answer(403, "the purge token is not valid")
    return None


PURGE_BODY_LIMIT_BYTES = 8 * 1024 * 1024
"""An operator's purge request: thousands of URLs or tags fit in far less."""


async def purge_endpoint(
    authorization: str | None,
    read_body: Callable[[int], Awaitable[bytes | None]],
    *,
    token: str | None,
    apply: Callable[[Sequence[Purge]], Awaitable[Applied]],
    clock: Callable[[], float] = time.time,
) -> Answer:
    """``POST /.kshipra/purge`` with ``Authorization: Bearer <KSHIPRA_PURGE_TOKEN>``: purge
    this edge now. Answers ``{"purges": n, "removed": n, "marked": n, "affected": n}``.
    *read_body* reads the request body up to a limit (``None``: it is larger)."""
    refusal = _unauthorised(authorization, token)
    if refusal is not None:
        return refusal
    body = await read_body(PURGE_BODY_LIMIT_BYTES)
    if body is None:
        return error_answer(413, f"a purge request is limited to {PURGE_BODY_LIMIT_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return error_answer(400, "the body must be JSON")
    now = clock()
    try:
        purges = purges_from_request(document, id_prefix=f"local-{now:.6f}", now=now)
        applied = await apply(purges)
    except BadPurge as exc:
        return error_answer(400, str(exc))
    return json_answer(
        200,
        json.dumps(
            {
                "purges": len(purges),
                "removed": applied.removed,
                "marked": applied.marked,
                "affected": applied.affected,
            }
        ).encode(),
    )


# ---- the stream consumer ------------------------------------------------------------------


class CursorFile:
    """The last applied stream id, in a small file replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> str | None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            stream_id_order(text)
        except BadPurge:
            log.warning("ignoring unreadable purge cursor %s", self.path)
            return None
        return text

    def save(self, stream_id: str) -> None:
        temp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with temp.open("w") as handle:
            handle.write(stream_id + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)


class PurgeConsumer:
    """Reads the purge stream, applies purges in order, remembers and acknowledges them."""

    def __init__(  # noqa: PLR0913 - keyword-only wiring of one consumer
        self,
        *,
        edge_name: str,
        redis_url: str,
        apply: Callable[[Sequence[Purge]], Awaitable[Applied]],
        cursor: CursorFile | None,
        cache_is_empty: Callable[[], bool],
        upstream: str = "",
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.edge_name = edge_name
        self._clock = clock
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=READ_BLOCK_MS / 1000 + 5,
            socket_connect_timeout=2.0,
        )
        self._apply = apply
        self._cursor = cursor
        self._cache_is_empty = cache_is_empty
        self._upstream = upstream
        self._startup_timeout_s = startup_timeout_s
        self.last_applied: str | None = None
        self.caught_up = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        """Set by :meth:`stop`. The loops check it too: redis-py can swallow a cancellation
        that arrives while it reads a reply."""

    async def start(self) -> None:
        """Catch up with the stream (bounded by ``startup_timeout_s``), then follow it and
        send heartbeats in the background."""
        self.last_applied = None if self._cursor is None else self._cursor.load()
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                await self._catch_up_with_retries()
        except TimeoutError:
            log.error(
                "%s: could not catch up with %s in %.0f s; serving from cache while retrying",
                self.edge_name,
                PURGE_STREAM,
                self._startup_timeout_s,
            )
        self._tasks = [
            asyncio.create_task(self._follow_forever()),
            asyncio.create_task(self._heartbeat_forever()),
        ]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(EDGE_PREFIX + self.edge_name)
        await self._redis.aclose()

    async def _catch_up_with_retries(self) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            try:
                await self.catch_up()
                return
            except (RedisError, OSError) as exc:
                log.warning("%s: purge stream unavailable (%s); retrying", self.edge_name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _start_position(self) -> str:
        """Where to read from when we have no cursor (see the module docs)."""
        if not self._cache_is_empty():
            return "0-0"
        info = await self._stream_info()
        return "0-0" if info is None else str(info["last-generated-id"])

    async def _stream_info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self._redis.xinfo_stream(PURGE_STREAM)
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        return info

    async def catch_up(self) -> None:
        """Apply everything after our cursor, until the stream has nothing newer."""
        async with self._lock:
            if self.last_applied is None:
                self._save(await self._start_position())
            assert self.last_applied is not None
            info = await self._stream_info()
            if info is not None and missed_purges(
                self.last_applied,
                info,
                cursor_present=bool(
                    await self._redis.xrange(
                        PURGE_STREAM, self.last_applied, self.last_applied, count=1
                    )
                ),
            ):
                log.warning(
                    "%s: %s was trimmed past our cursor %s: soft-purging everything",
                    self.edge_name,
                    PURGE_STREAM,
                    self.last_applied,
                )
                await self._apply([Purge("prefix", "/", True, "trimmed", self._clock())])
            while await self._apply_entries(await self._read(block_ms=None)):
                pass
        self.caught_up.set()

    async def wait_until_applied(self, stream_id: str, *, timeout_s: float) -> bool:
        """A child edge has applied *stream_id*: make sure we have too before answering it,
        so it cannot refill from us what it purged (see :data:`PURGE_SEEN_HEADER`). Bounded
        by *timeout_s*; ``False`` if we could not catch up (Redis down or an id from the
        future)."""
        try:
            wanted = stream_id_order(stream_id)
        except BadPurge:
            return False
        if self.last_applied is not None and stream_id_order(self.last_applied) >= wanted:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self.catch_up()
        except (TimeoutError, RedisError, OSError):
            return False
        return self.last_applied is not None and stream_id_order(self.last_applied) >= wanted

    async def _read(self, *, block_ms: int | None) -> list[tuple[str, dict[str, str]]]:
        """One XREAD after the cursor."""
        assert self.last_applied is not None
        answer: Any = await self._redis.xread(
            {PURGE_STREAM: self.last_applied}, count=READ_BATCH, block=block_ms
        )
        return [] if not answer else list(answer[0][1])

    async def _apply_entries(self, read: list[tuple[str, dict[str, str]]]) -> int:
        """Apply and acknowledge the entries newer than the cursor (hold ``_lock``: another
        catch-up may have applied some of them meanwhile). Returns how many were new."""
        assert self.last_applied is not None
        position = stream_id_order(self.last_applied)
        entries = [(i, fields) for i, fields in read if stream_id_order(i) > position]
        if not entries:
            return 0
        purges: list[Purge] = []
        for stream_id, fields in entries:
            try:
                purges.append(purge_from_fields(stream_id, fields))
            except BadPurge as exc:
                log.error("%s: skipping purge %s: %s", self.edge_name, stream_id, exc)
        applied = await self._apply(purges)
        applied_at = self._clock()
        log.info(
            "%s: applied %d purges up to %s (%d entries affected)",
            self.edge_name,
            len(purges),
            entries[-1][0],
            applied.affected,
        )
        self._save(entries[-1][0])
        async with self._redis.pipeline(transaction=False) as pipe:
            for purge in purges:
                pipe.hset(
                    ACK_PREFIX + purge.id,
                    self.edge_name,
                    f"{max(0.0, applied_at - purge.requested_at):.6f}",
                )
                pipe.expire(ACK_PREFIX + purge.id, ACK_TTL_S)
            await pipe.execute()
        return len(entries)

    def _save(self, stream_id: str) -> None:
        self.last_applied = stream_id
        if self._cursor is not None:
            self._cursor.save(stream_id)

    async def _follow_forever(self) -> None:
        delay = BACKOFF_FIRST_S
        needs_catch_up = not self.caught_up.is_set()
        while not self._stopping.is_set():
            try:
                if needs_catch_up:
                    await self.catch_up()
                    needs_catch_up = False
                entries = await self._read(block_ms=READ_BLOCK_MS)  # not under the lock
                async with self._lock:
                    await self._apply_entries(entries)
                delay = BACKOFF_FIRST_S
            except (RedisError, OSError) as exc:
                log.warning(
                    "%s: purge stream unavailable (%s); retrying in %.1f s",
                    self.edge_name,
                    exc,
                    delay,
                )
                needs_catch_up = True
                await self._pause(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _heartbeat_forever(self) -> None:
        while not self._stopping.is_set():
            record = {
                "name": self.edge_name,
                "upstream": self._upstream,
                "last_applied": self.last_applied,
                "pid": os.getpid(),
                "at": self._clock(),
            }
            with contextlib.suppress(RedisError, OSError):
                await self._redis.set(
                    EDGE_PREFIX + self.edge_name, json.dumps(record), ex=HEARTBEAT_TTL_S
                )
            await self._pause(HEARTBEAT_INTERVAL_S)
