"""The edge: an RFC 9111 shared cache in front of the origin or a parent edge.

A request goes through the stages DESIGN.md names after Varnish's:

``recv`` (normalise, refuse what is malformed, route) → ``hash`` (cache key) → ``lookup``
(memory, then disk) → ``hit`` (fresh / stale-while-revalidate / must validate) → ``fetch``
(collapsed: one upstream request per key) → ``backend_response`` (304 freshens; storability;
errors never overwrite) → ``store`` → ``deliver`` (conditionals, ranges, encodings, ``Age``,
``Cache-Status``).

The decisions are pure functions in :mod:`edge.stages`, :mod:`edge.rfc9111` and
:mod:`edge.keys`; this module is the loop that does the IO. It knows nothing of the server
under it: a transport (:mod:`edge.app` for HTTP/1.1, :mod:`edge.h2` for HTTP/2) gives it an
:class:`edge.transport.EdgeRequest` and writes the :class:`edge.transport.Answer` it returns.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import assert_never

from multidict import CIMultiDict

from cdn_config import EdgeConfig
from common.auth import bearer_check
from common.errors import error_json
from common.wire import PURGE_SEEN_HEADER
from edge import stages
from edge.admission import Admission, AdmissionLimits
from edge.cache import Hit, TieredCache
from edge.collapse import Collapser
from edge.compression import (
    INLINE_COMPRESS_BYTES,
    compress,
    encoded_etag,
)
from edge.entry import ENCODING_SEP, SLICE_SEP, VARIANT_SEP, EntryMeta
from edge.guard import DoorLimits, Doorman
from edge.heads import (
    FLEET_HEADER,
    HEALTHZ_PATH,
    MAX_HEADER_BLOCK_BYTES,
    METRICS_PATH,
    NOT_IN_304,
    READYZ_PATH,
    http_date,
    made_from,
)
from edge.keys import (
    BadTarget,
    Target,
    normalise_target,
    preferred_encoding,
    primary_key,
    upstream_accept_encoding,
)
from edge.memory import MemoryTier
from edge.metrics import EdgeMetrics
from edge.policy import make_policy
from edge.purge import (  # purge: stream consumer and operator endpoint
    CURSOR_FILE,
    PURGE_SEEN_WAIT_S,
    Applied,
    CursorFile,
    Purge,
    PurgeConsumer,
    apply_purges,
    purge_endpoint,
)
from edge.rfc9111 import (
    EDGE_ONLY,
    Headers,
    RequestControls,
    conditional_headers,
    get_one,
    request_controls,
    strip_hop_by_hop,
    unsafe_invalidations,
)
from edge.tiers.adapters import DiskCacheTier
from edge.tiers.disk import CorruptEntryError, DiskTier
from edge.transport import (
    Answer,
    EdgeRequest,
    FileBody,
    RequestBody,
    StreamBody,
    Writer,
    error_answer,
    json_answer,
)
from edge.upstream import Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

MAX_UNSAFE_BODY_BYTES = 64 * 1024 * 1024
REQUEST_BODY_TIMEOUT_S = 30.0
ERROR_BODY_LIMIT_BYTES = 256 * 1024
SENDFILE_CHUNK_BYTES = 256 * 1024


# ---- outcomes of a fetch, shared with collapsed waiters -----------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """The response is in the cache now: look it up again."""


@dataclass(frozen=True, slots=True)
class Refreshed:
    """A 304 freshened the stored response."""


@dataclass(slots=True)
class Passed:
    """Uncacheable: the leader streams this to its client; waiters fetch for themselves."""

    response: UpstreamResponse | None
    reason: str


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An upstream 5xx (body read, small) or a failure to reach upstream."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    detail: str


Outcome = Stored | Refreshed | Passed | ErrorAnswer


def refusal_answer(refusal: stages.Refuse) -> Answer:
    """The edge's own error answer for a :class:`edge.stages.Refuse` step."""
    extra = {} if refusal.allow is None else {"Allow": refusal.allow}
    return error_answer(refusal.status, refusal.message, **extra)


def fetch_result(outcome: Outcome) -> stages.FetchResult:
    """A fetch's outcome as :func:`edge.stages.after_fetch` reads it."""
    if isinstance(outcome, Stored):
        return stages.FetchResult("stored")
    if isinstance(outcome, Refreshed):
        return stages.FetchResult("refreshed")
    if isinstance(outcome, Passed):
        return stages.FetchResult("passed", outcome.reason, streamable=outcome.response is not None)
    return stages.FetchResult("error", outcome.detail, status=outcome.status)


SHED_RETRY_AFTER_S = 1
"""``Retry-After`` on a 503 shed for load: players retry a segment within a second or two
anyway; the next try usually lands once the peak's first wave is stored."""


def upstream_error_answer(exc: UpstreamError, **extra: str) -> Answer:
    """The answer when upstream failed (or was not asked: shed) and nothing stored serves."""
    if exc.kind == "shed":
        extra = {"Retry-After": str(SHED_RETRY_AFTER_S), **extra}
    return error_answer(exc.status, str(exc), **extra)


UNKEYED_OVERRIDES = frozenset(
    {
        "forwarded",
        "x-original-url",
        "x-rewrite-url",
        "x-original-host",
        "x-host",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
    }
)
"""Request fields that frameworks read as a different URL, host, scheme or method, which the
edge does not key on: forwarded, one request would poison the object cached for every student
(with ``X-Forwarded-*``, dropped by prefix)."""


def unkeyed_override(name: str) -> bool:
    """Is *name* one of :data:`UNKEYED_OVERRIDES` or ``X-Forwarded-*``?"""
    lowered = name.lower()
    return lowered in UNKEYED_OVERRIDES or lowered.startswith("x-forwarded-")


def forwarded_request_headers(request: EdgeRequest, *, encoding: str) -> list[tuple[str, str]]:
    """End-to-end request headers for upstream: hop-by-hop, Host, conditionals, Range and
    Accept-Encoding replaced by ours."""
    drop = {
        "host",
        "accept-encoding",
        "range",
        "if-range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "content-length",
        "expect",
        FLEET_HEADER.lower(),
        PURGE_SEEN_HEADER.lower(),  # purge
    }
    headers = [
        (key, value)
        for key, value in strip_hop_by_hop(list(request.headers.items()))
        if key.lower() not in drop and not unkeyed_override(key)
    ]
    headers.append(("Accept-Encoding", encoding))
    return headers


class Edge:
    """One edge process: its tiers, its upstream, its in-flight fetches."""

    def __init__(
        self,
        config: EdgeConfig,
        *,
        upstream_url: str,
        purge_token: str | None = None,
        redis_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """*upstream_url*: the origin or parent edge to fetch from; *purge_token*: the fleet's
        (the operator purge endpoint, ``/metrics`` from afar, the fleet key); *redis_url*:
        follow the fleet's purge stream there (``None``: only the operator endpoint purges)."""
        self.clock = clock
        """Unix seconds now: every freshness decision of the full flow reads this clock."""
        self.config = config
        self.upstream_url = upstream_url
        self.purge_token = purge_token
        self.redis_url = redis_url
        self.metrics = EdgeMetrics(self)  # reads the tiers lazily, at scrape time
        admission = AdmissionLimits(
            max_inflight_requests=config.max_inflight_requests,
            max_upstream_fetches=config.max_upstream_fetches,
            client_requests_per_s=config.client_requests_per_s,
        )
        self.door = DoorLimits(
            header_timeout_s=config.header_timeout_s,
            send_stall_s=config.send_stall_s,
            connections_per_client=config.connections_per_client,
        )
        self.upstream = Upstream(
            upstream_url,
            timeout_s=config.upstream_timeout_s,
            max_connections=config.max_upstream_connections,
            max_waiting=admission.max_upstream_fetches,
            on_body_bytes=self.metrics.bytes_from_upstream,
            clock=clock,
        )
        self.doorman = Doorman(self.door)
        self.admission = Admission(admission)
        self.host = config.cache_host or self.upstream.host_header
        self.fleet_key = (
            None
            if purge_token is None
            else hmac.new(purge_token.encode(), b"kshipra-fleet", "sha256").hexdigest()[:32]
        )
        memory = MemoryTier(
            capacity_bytes=config.memory_bytes,
            policy=make_policy(config.policy, config.memory_bytes),
            max_object_bytes=min(config.memory_max_object_bytes, config.memory_bytes),
        )
        disk = None
        if config.disk_dir is not None:
            disk = DiskTier(
                Path(config.disk_dir),
                capacity_bytes=config.disk_bytes,
                policy=make_policy(config.policy, config.disk_bytes),
            )
        self.cache = TieredCache(memory, None if disk is None else DiskCacheTier(disk))
        self.collapser: Collapser[Outcome] = Collapser(
            on_error=lambda exc: ErrorAnswer(
                502, (), error_json(502, f"edge fetch failed: {exc}"), "edge"
            ),
            on_collapsed=self.metrics.collapsed,
        )
        """Fetches in flight, and every background task of this edge."""
        self.purge_epoch = 0
        """Counts applied purge batches; a fetch that spans one stores its answer soft-purged."""
        self._hit_for_miss: dict[str, float] = {}
        self.purge_consumer: PurgeConsumer | None = None

    async def start(self) -> None:
        await self.upstream.start()
        if self.cache.has_lower:
            count = await self.cache.lower.open()
            log.info("%s: disk tier holds %d entries", self.config.name, count)
            self.collapser.spawn(self._sync_disk_forever())
        # purge: catch up with the purge stream before serving
        if self.redis_url is not None:
            disk_dir = self.config.disk_dir
            self.purge_consumer = PurgeConsumer(
                edge_name=self.config.name,
                redis_url=self.redis_url,
                apply=self.apply_purges,
                cursor=None if disk_dir is None else CursorFile(Path(disk_dir) / CURSOR_FILE),
                cache_is_empty=lambda: next(self.cache.metas(), None) is None,
                upstream=self.upstream_url,
                clock=self.clock,
            )
            await self.purge_consumer.start()
        else:
            log.warning(
                "%s receives NO PURGES: it follows no purge stream (no Redis configured), so "
                "publishes and `kshipra purge` will not reach it; objects change here only "
                "when their TTL runs out. Start it with --redis URL or a config with redis.url.",
                self.config.name,
            )

    def hit_for_miss_keys(self) -> int:
        return len(self._hit_for_miss)

    def purge_state(self) -> str:
        """``off`` (no Redis configured), ``catching-up`` (replaying before it serves fresh
        purges), or ``following``."""
        if self.purge_consumer is None:
            return "off"
        return "following" if self.purge_consumer.caught_up.is_set() else "catching-up"

    async def apply_purges(self, purges: Sequence[Purge]) -> Applied:
        """purge: apply a batch of purges to every tier (see :mod:`edge.purge`)."""
        self.purge_epoch += 1
        # A URL marked hit-for-miss (say a 404 before its asset was published) must not pass
        # every request upstream for two minutes after the publish that fixed it.
        self._hit_for_miss.clear()
        return await apply_purges(self.cache, self.host, purges)

    async def _sync_disk_forever(self) -> None:
        """Workers sharing one disk directory learn of each other's stores and removals, and
        each keeps the directory within its byte budget (see :class:`DiskTier`)."""
        while True:
            await asyncio.sleep(self.config.disk_sync_interval_s)
            try:
                await self.cache.lower.sync()
            except OSError:
                log.exception("%s: disk sync failed", self.config.name)

    async def stop(self) -> None:
        if self.purge_consumer is not None:  # purge
            await self.purge_consumer.stop()
            self.purge_consumer = None
        await self.collapser.close()
        await self.upstream.close()
        self.doorman.close()
        await self.cache.lower.close()

    def _forward(self, request: EdgeRequest, *, encoding: str) -> list[tuple[str, str]]:
        if encoding != "identity" and "Available-Dictionary" in request.headers:
            encoding = upstream_accept_encoding(request.headers.getall("Accept-Encoding", []))
        headers = forwarded_request_headers(request, encoding=encoding)
        if self.fleet_key is not None:
            headers.append((FLEET_HEADER, self.fleet_key))
        if self.purge_consumer is not None and self.purge_consumer.last_applied is not None:
            headers.append((PURGE_SEEN_HEADER, self.purge_consumer.last_applied))  # purge
        return headers

    def from_fleet(self, request: EdgeRequest) -> bool:
        """The request comes from one of our own edges (see :data:`FLEET_HEADER`)."""
        offered = request.headers.get(FLEET_HEADER)
        return (
            offered is not None
            and self.fleet_key is not None
            and hmac.compare_digest(offered.encode(), self.fleet_key.encode())
        )

    # ---- recv ----------------------------------------------------------------------------

    async def serve(self, request: EdgeRequest, write: Writer) -> None:
        """Answer one request from any transport: the edge's own routes, else the request
        flow. *write* sends an answer; the flow awaits it (so a request counts as in flight,
        for admission, until its body is sent)."""
        # The transport limits each header line; we also limit the whole block (RFC 6585).
        if request.header_bytes > MAX_HEADER_BLOCK_BYTES:
            await write(error_answer(431, f"request headers exceed {MAX_HEADER_BLOCK_BYTES} bytes"))
            return
        route = OWN_ROUTE_METHODS.get(request.path)
        if route is None:
            await self.handle(request, write)
            return
        allowed, answer_with = route
        if request.method not in allowed:
            await write(
                error_answer(
                    405,
                    f"method {request.method} is not allowed on {request.path}",
                    Allow=", ".join(sorted(allowed)),
                )
            )
            return
        await write(await answer_with(self, request))

    async def handle(self, request: EdgeRequest, write: Writer) -> None:
        step = stages.recv(
            request.method, request.version, request.target, self.config.proxy_prefixes
        )
        if isinstance(step, stages.Refuse):
            await write(refusal_answer(step))  # before admission: costs nothing upstream
            return
        refusal = await self.admission.admit(request.peername)
        if refusal is not None:
            await write(
                error_answer(
                    refusal.status, refusal.message, **{"Retry-After": str(refusal.retry_after_s)}
                )
            )
            return
        try:
            await self._catch_up_with_child(request)  # purge
            match step:
                case stages.Lookup(target):
                    answer = await self.cacheable(request, target)
                case stages.PassUnsafe(target):
                    answer = await self.pass_unsafe(request, target)
                case _:
                    assert_never(step)
            await write(answer)
        finally:
            self.admission.done()

    async def _catch_up_with_child(self, request: EdgeRequest) -> None:
        """purge: a child edge that applied a purge we have not must not refill from us what
        it purged (see :data:`edge.purge.PURGE_SEEN_HEADER`)."""
        seen = request.headers.get(PURGE_SEEN_HEADER)
        if seen is None or self.purge_consumer is None or not self.from_fleet(request):
            return
        if not await self.purge_consumer.wait_until_applied(seen, timeout_s=PURGE_SEEN_WAIT_S):
            log.warning("%s: answering before applying purge %s", self.config.name, seen)

    # ---- hash, lookup, hit ---------------------------------------------------------------

    async def cacheable(self, request: EdgeRequest, target: Target) -> Answer:
        key = stages.hash_key(self.host, target)
        headers = list(request.headers.items())
        controls = request_controls(headers)
        found = await self.cache.lookup_variant(key, headers)
        step = stages.hit_or_miss(found, controls, self.clock())
        match step:
            case stages.Deliver(hit, cache_status, refresh):
                if refresh:
                    self.metrics.stale()
                    self.refresh_in_background(request, target, key)
                else:
                    self.metrics.hit()
                return await self.deliver(request, hit, status=cache_status)
            case stages.Refuse():
                return refusal_answer(step)
            case stages.Fetch(stale, fwd):
                return await self.fetch_and_deliver(request, target, key, stale, controls, fwd=fwd)
            case _:
                assert_never(step)

    # ---- fetch (collapsed) ---------------------------------------------------------------

    def _collapse_key(self, key: str, request: EdgeRequest) -> str:
        accept_encoding = upstream_accept_encoding(request.headers.getall("Accept-Encoding", []))
        dictionary = request.headers.get("Available-Dictionary", "")
        return f"{key}{VARIANT_SEP}{accept_encoding}{VARIANT_SEP}{dictionary}"

    async def fetch_and_deliver(
        self,
        request: EdgeRequest,
        target: Target,
        key: str,
        stale: Hit | None,
        controls: RequestControls,
        *,
        fwd: str,
    ) -> Answer:
        self.metrics.miss()
        if isinstance(stages.miss(self._hit_for_miss.get(key), self.clock()), stages.Bypass):
            return await self.pass_get(request, target, fwd="bypass")
        future, leader = self.collapser.join_or_start(
            self._collapse_key(key, request), lambda: self.fetch(request, target, key, stale)
        )
        try:
            outcome = await asyncio.shield(future)
        except asyncio.CancelledError:
            if leader:  # our client left; nobody else will read a passed response
                future.add_done_callback(_close_passed)
            raise
        return await self.after_fetch(
            request, target, key, stale, controls, outcome, fwd, leader=leader
        )

    async def after_fetch(  # noqa: PLR0913 - the request's stage values; shrinks with the transport boundary (issue 12)
        self,
        request: EdgeRequest,
        target: Target,
        key: str,
        stale: Hit | None,
        controls: RequestControls,
        outcome: Outcome,
        fwd: str,
        *,
        leader: bool,
    ) -> Answer:
        step = stages.after_fetch(
            fetch_result(outcome),
            stale=stale,
            controls=controls,
            fwd=fwd,
            leader=leader,
            now=self.clock(),
            grace_s=self.config.stale_if_unreachable_s,
        )
        match step:
            case stages.LookupAgain(cache_status):
                found = await self.cache.lookup_variant(key, list(request.headers.items()))
                if found.hit is not None and found.hit.meta.kind in ("full", "sliced"):
                    ttl = int(found.hit.meta.freshness(self.clock()).ttl_s)
                    return await self.deliver(
                        request, found.hit, status=f"{cache_status}; ttl={ttl}"
                    )
                # Stored under another variant (a Vary field we do not collapse on): fetch ours.
                return await self.pass_get(request, target, fwd=fwd)
            case stages.StreamPassed(detail):
                assert isinstance(outcome, Passed)
                assert outcome.response is not None
                return await self.stream_passed(request, outcome.response, fwd=fwd, detail=detail)
            case stages.PassAgain():
                return await self.pass_get(request, target, fwd=fwd)
            case stages.DeliverStale(hit, cache_status):
                self.metrics.stale()
                return await self.deliver(request, hit, status=cache_status)
            case stages.AnswerError(cache_status):
                assert isinstance(outcome, ErrorAnswer)
                headers = CIMultiDict(outcome.headers)
                headers["Cache-Status"] = self._cache_status(cache_status)
                return Answer(outcome.status, headers, outcome.body)
            case _:
                assert_never(step)

    def _upstream_headers(self, request: EdgeRequest, stale: Hit | None) -> list[tuple[str, str]]:
        headers = self._forward(
            request, encoding=preferred_encoding(request.headers.getall("Accept-Encoding", []))
        )
        if stale is not None and stale.meta.kind == "full":
            headers.extend(conditional_headers(stale.meta.headers))
        elif stale is None or stale.meta.kind != "full":
            headers.append(("Range", f"bytes=0-{self.config.slice_bytes - 1}"))
        return headers

    async def fetch(
        self, request: EdgeRequest, target: Target, key: str, stale: Hit | None
    ) -> Outcome:
        """One upstream request for a key, then backend_response and store."""
        epoch = self.purge_epoch
        headers = self._upstream_headers(request, stale)
        try:
            started = time.monotonic()
            response = await self.upstream.request("GET", target.path_and_query, headers)
            self.metrics.upstream_latency(time.monotonic() - started)
        except UpstreamError as exc:
            fields: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
            if exc.kind == "shed":
                fields += (("Retry-After", str(SHED_RETRY_AFTER_S)),)
            return ErrorAnswer(exc.status, fields, error_json(exc.status, str(exc)), exc.kind)
        return await self.backend_response(request, key, stale, response, purge_epoch=epoch)

    # ---- backend_response and store ------------------------------------------------------

    async def backend_response(  # noqa: C901, PLR0911 - one return per backend_response step
        self,
        request: EdgeRequest,
        key: str,
        stale: Hit | None,
        response: UpstreamResponse,
        *,
        purge_epoch: int | None = None,
    ) -> Outcome:
        step = stages.backend_response(
            stages.BackendResponse(
                response.status,
                tuple(response.headers),
                response.request_time,
                response.response_time,
            ),
            key=key,
            stale=stale,
            request_headers=list(request.headers.items()),
            purged_meanwhile=purge_epoch is not None and purge_epoch != self.purge_epoch,
        )
        match step:
            case stages.Refresh(stale_key, meta):
                response.close()
                await self.cache.update_meta(stale_key, meta)
                return Refreshed()
            case stages.DropStale(stale_key):
                response.close()
                await self.cache.remove(stale_key)
                return Passed(None, "304-mismatch")
            case stages.UpstreamFailed():
                try:
                    body = await response.read(ERROR_BODY_LIMIT_BYTES)
                except UpstreamError:
                    body = b""
                return ErrorAnswer(
                    response.status, tuple(_deliverable(response.headers)), body, "upstream-error"
                )
            case stages.Uncacheable(reason, remember):
                if not remember:
                    response.close()
                    return Passed(None, reason)
                self._remember_uncacheable(key)
                return Passed(response, reason)
            case stages.Store(store_key, meta, marker, total):
                self._hit_for_miss.pop(key, None)
                if marker is not None:
                    await self.cache.store_bytes(key, marker, b"")
                try:
                    if total is not None:
                        return await self._store_sliced(store_key, meta, response, total)
                    return await self._store_full(store_key, meta, response)
                except UpstreamError as exc:
                    return ErrorAnswer(502, (), error_json(502, str(exc)), "upstream-body")
            case _:
                assert_never(step)

    def _remember_uncacheable(self, key: str) -> None:
        """Hit-for-miss: pass *key* uncollapsed for ``hit_for_miss_s``."""
        marks = self._hit_for_miss
        if len(marks) >= self.config.hit_for_miss_max_keys:
            # Bounded: an attacker walking random uncacheable URLs must not grow the edge
            # without limit. Forgetting marks costs only their queueing shortcut.
            now = self.clock()
            self._hit_for_miss = marks = {k: t for k, t in marks.items() if t > now}
            if len(marks) >= self.config.hit_for_miss_max_keys:
                marks.clear()
        marks[key] = self.clock() + self.config.hit_for_miss_s

    async def _store_full(self, key: str, base: EntryMeta, response: UpstreamResponse) -> Outcome:
        length_text = get_one(base.headers, "content-length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        small = length is not None and length <= self.cache.memory.max_object_bytes
        if small or not self.cache.has_lower:
            limit = self.cache.memory.max_object_bytes
            try:
                body = await response.read(limit)
            except UpstreamError as exc:
                if exc.kind == "protocol":  # too large for memory and no disk tier
                    return Passed(None, "too-large-without-disk")
                raise
            meta = replace(
                base, body_bytes=len(body), headers=_with_length(base.headers, len(body))
            )
            await self.cache.store_bytes(key, meta, body)
            return Stored()
        meta = replace(base, body_bytes=length or 0)

        def sized(size: int) -> EntryMeta:
            """A chunked or close-delimited body: its length is what arrived, whole."""
            return replace(base, body_bytes=size, headers=_with_length(base.headers, size))

        try:
            stored = await self.cache.store_stream(
                key,
                meta,
                response.chunks(),
                expected_size=length,
                meta_for_size=sized if length is None else None,
            )
        except ValueError:
            return ErrorAnswer(
                502, (), error_json(502, "upstream body length mismatch"), "short-body"
            )
        if stored is None:
            return Passed(None, "not-admitted")
        return Stored()

    async def _store_sliced(
        self, key: str, base: EntryMeta, response: UpstreamResponse, total: int
    ) -> Outcome:
        slice_bytes = self.config.slice_bytes
        headers = [
            (k, v) for k, v in base.headers if k.lower() not in ("content-range", "content-length")
        ]
        headers.append(("Content-Length", str(total)))
        index = replace(
            base,
            kind="sliced",
            headers=tuple(headers),
            total_bytes=total,
            slice_bytes=slice_bytes,
            status=200,
        )
        first = replace(
            base,
            kind="slice",
            total_bytes=total,
            slice_bytes=slice_bytes,
            body_bytes=min(slice_bytes, total),
        )
        stored = await self.cache.store_stream(
            key + SLICE_SEP + "0", first, response.chunks(), expected_size=min(slice_bytes, total)
        )
        if stored is None:
            return Passed(None, "not-admitted")
        await self.cache.store_bytes(key, index, b"")
        return Stored()

    async def fetch_slice(self, request: EdgeRequest, index: Hit, number: int) -> Hit:
        """A slice of a sliced object, from cache or (collapsed) from upstream."""
        slice_key = index.key + SLICE_SEP + str(number)
        found = await self.cache.lookup(slice_key)
        if found is not None and found.meta.etag == index.meta.etag:
            return found
        future, _ = self.collapser.join_or_start(
            slice_key, lambda: self._fetch_slice(request, index, number)
        )
        outcome = await asyncio.shield(future)
        if isinstance(outcome, ErrorAnswer):
            raise UpstreamError("protocol", outcome.detail)
        found = await self.cache.lookup(slice_key)
        if found is None:
            raise UpstreamError("protocol", f"slice {number} could not be fetched")
        return found

    async def _fetch_slice(self, request: EdgeRequest, index: Hit, number: int) -> Outcome:
        meta = index.meta
        start = number * meta.slice_bytes
        end = min(start + meta.slice_bytes, meta.total_bytes) - 1
        headers = self._forward(request, encoding="identity")
        headers.append(("Range", f"bytes={start}-{end}"))
        if meta.etag:
            headers.append(("If-Match", meta.etag))
        target = normalise_target(request.target)
        response = await self.upstream.request("GET", target.path_and_query, headers)
        parsed = stages.content_range(get_one(response.headers, "content-range"))
        if (
            response.status != 206
            or parsed != (start, end, meta.total_bytes)
            or get_one(response.headers, "etag") != meta.etag
        ):
            response.close()
            await self.cache.remove(index.key)
            raise UpstreamError("protocol", "the object changed upstream while being sliced")
        slice_meta = replace(meta, kind="slice", body_bytes=end - start + 1)
        stored = await self.cache.store_stream(
            index.key + SLICE_SEP + str(number),
            slice_meta,
            response.chunks(),
            expected_size=end - start + 1,
        )
        return Stored() if stored is not None else Passed(None, "not-admitted")

    # ---- background refresh (stale-while-revalidate) -------------------------------------

    def refresh_in_background(self, request: EdgeRequest, target: Target, key: str) -> None:
        """stale-while-revalidate: one background refresh per key; clients are not kept
        waiting."""
        collapse_key = self._collapse_key(key, request)
        if collapse_key in self.collapser:
            return
        request_headers = list(request.headers.items())

        async def refresh() -> Outcome:
            found = await self.cache.lookup_variant(key, request_headers)
            return await self.fetch(request, target, key, found.hit)

        future, _ = self.collapser.join_or_start(collapse_key, refresh)
        future.add_done_callback(_close_passed)

    # ---- pass ----------------------------------------------------------------------------

    async def pass_get(self, request: EdgeRequest, target: Target, *, fwd: str) -> Answer:
        headers = self._forward(
            request, encoding=preferred_encoding(request.headers.getall("Accept-Encoding", []))
        )
        for name in ("Range", "If-Range", "If-None-Match", "If-Modified-Since"):
            value = request.headers.get(name)
            if value is not None:
                headers.append((name, value))
        try:
            response = await self.upstream.request(request.method, target.path_and_query, headers)
        except UpstreamError as exc:
            return upstream_error_answer(
                exc, **{"Cache-Status": f"{self.config.name}; fwd={fwd}; detail={exc.kind}"}
            )
        return await self.stream_passed(request, response, fwd=fwd, detail="pass")

    async def stream_passed(
        self, request: EdgeRequest, response: UpstreamResponse, *, fwd: str, detail: str
    ) -> Answer:
        headers = CIMultiDict(
            _deliverable(response.headers, keep_edge_fields=self.from_fleet(request))
        )
        headers["Cache-Status"] = (
            f"{self.config.name}; fwd={fwd}; fwd-status={response.status}; detail={detail}"
        )
        if "Date" not in headers:
            headers["Date"] = http_date(self.clock())
        length_field = headers.get("Content-Length")
        length = int(length_field) if length_field is not None and length_field.isdigit() else None
        if request.method == "HEAD":
            response.close()
            return Answer(response.status, headers, b"", length=length)
        return Answer(
            response.status,
            headers,
            StreamBody(response.chunks(), close=response.close),
            length=length,
            sent=self.metrics.bytes_to_clients,
        )

    async def pass_unsafe(self, request: EdgeRequest, target: Target) -> Answer:
        """Unsafe methods go upstream uncached; success invalidates the URL and its
        Location / Content-Location (RFC 9111 §4.4)."""
        too_large = f"request bodies through the edge are limited to {MAX_UNSAFE_BODY_BYTES} bytes"
        declared = None if request.body is None else request.body.declared_length
        if declared is not None and declared > MAX_UNSAFE_BODY_BYTES:
            return error_answer(413, too_large)
        refused: list[Answer] = []
        body = None if request.body is None else _streamed_body(request.body, refused, too_large)
        headers = [
            (k, v)
            for k, v in strip_hop_by_hop(list(request.headers.items()))
            if k.lower() not in ("host", "content-length", FLEET_HEADER.lower())
            and not unkeyed_override(k)
        ]
        try:
            response = await self.upstream.request(
                request.method, target.path_and_query, headers, body
            )
        except UpstreamError as exc:
            return refused[0] if refused else upstream_error_answer(exc)
        if refused:  # the body failed after upstream had answered: not a complete request
            response.close()
            return refused[0]
        for url in unsafe_invalidations(
            method=request.method,
            status=response.status,
            request_url=target.path_and_query,
            response_headers=response.headers,
        ):
            path = self._same_origin_path(url)
            if path is not None:
                await self.invalidate_url(primary_key(self.host, path))
        return await self.stream_passed(request, response, fwd="method", detail="unsafe")

    def _same_origin_path(self, url: str) -> Target | None:
        if url.startswith("/"):
            candidate = url
        else:
            match = re.match(r"^https?://([^/]+)(/.*)?$", url)
            if match is None or match.group(1).lower() != self.host.lower():
                return None
            candidate = match.group(2) or "/"
        try:
            return normalise_target(candidate)
        except BadTarget:
            return None

    async def invalidate_url(self, url_key: str) -> int:
        """Remove every stored variant, encoding and slice of a URL."""
        doomed = [key for key, url in self.cache.url_keys() if url_key in (url, key)]
        for key in doomed:
            await self.cache.remove(key)
        return len(doomed)

    # ---- deliver -------------------------------------------------------------------------

    def _cache_status(self, status: str) -> str:
        return f"{self.config.name}; {status}"

    def _response_headers(
        self, meta: EntryMeta, now: float, cache_status: str, *, keep_edge_fields: bool
    ) -> CIMultiDict[str]:
        client, edge_only, prior, has_date = meta.delivery_headers
        headers: CIMultiDict[str] = CIMultiDict(client)
        if keep_edge_fields:
            headers.extend(edge_only)
        headers["Age"] = str(int(meta.freshness(now).age_s))
        if not has_date:
            headers["Date"] = http_date(meta.response_time)
        own = self._cache_status(cache_status)
        headers["Cache-Status"] = own if prior is None else f"{prior}, {own}"
        return headers

    async def deliver(self, request: EdgeRequest, hit: Hit, *, status: str) -> Answer:
        now = self.clock()
        meta = hit.meta
        if meta.kind == "full" and meta.status == 200 and "Range" not in request.headers:
            hit, meta = await self._encoded_variant(request, hit)
        headers = self._response_headers(
            meta, now, status, keep_edge_fields=self.from_fleet(request)
        )
        if meta.lacks_vary_accept_encoding:
            headers.add("Vary", "Accept-Encoding")
        if meta.status == 200:
            headers["Accept-Ranges"] = "bytes"
        step = stages.deliver(meta, request.method, request.headers)
        match step:
            case stages.Send(code, start, length, content_range):
                if content_range is not None:
                    headers["Content-Range"] = content_range
                return await self._send(request, hit, headers, code, start, length)
            case stages.NotModified():
                for name in NOT_IN_304:
                    headers.popall(name, None)
                return Answer(304, headers)
            case stages.Refuse():
                return refusal_answer(step)
            case stages.RangeRefused(size, reason):
                headers["Content-Range"] = f"bytes */{size}"
                headers["Content-Type"] = "application/json"
                return Answer(416, headers, error_json(416, reason))
            case _:
                assert_never(step)

    async def _send(
        self,
        request: EdgeRequest,
        hit: Hit,
        headers: CIMultiDict[str],
        status: int,
        start: int,
        length: int,
    ) -> Answer:
        if request.method == "HEAD":
            return Answer(status, headers, b"", length=length)
        if hit.meta.kind == "sliced":
            return await self._send_sliced(request, hit, headers, status, start, length)
        if hit.body is not None:
            body = (
                hit.body
                if start == 0 and length == len(hit.body)
                else hit.body[start : start + length]
            )
            return Answer(status, headers, body, sent=self.metrics.bytes_to_clients)
        try:
            handle = await self.cache.open_body(hit)
        except (CorruptEntryError, FileNotFoundError):
            # The tier dropped the bad copy: this is a miss, answered from upstream.
            return await self.fetch_and_deliver(
                request,
                normalise_target(request.target),
                hit.meta.url_key or hit.key,
                None,
                request_controls(list(request.headers.items())),
                fwd="miss",
            )
        return Answer(
            status, headers, FileBody(handle, start, length), sent=self.metrics.bytes_to_clients
        )

    async def _send_sliced(
        self,
        request: EdgeRequest,
        index: Hit,
        headers: CIMultiDict[str],
        status: int,
        start: int,
        length: int,
    ) -> Answer:
        meta = index.meta
        first_slice = start // meta.slice_bytes
        # Fetch the first slice before committing to a status, so a failure can still be a 502.
        try:
            current = await self.fetch_slice(request, index, first_slice)
        except UpstreamError as exc:
            return error_answer(502, f"could not fetch part of the object: {exc}")
        chunks = self._slice_chunks(request, index, current, start, length)
        return Answer(
            status,
            headers,
            StreamBody(chunks),
            length=length,
            sent=self.metrics.bytes_to_clients,
        )

    async def _slice_chunks(
        self, request: EdgeRequest, index: Hit, current: Hit, start: int, length: int
    ) -> AsyncGenerator[bytes, None]:
        """The bytes *start* to *start* + *length* of a sliced object, the slice holding
        *start* (*current*) in hand; the others fetched (collapsed) as they are reached."""
        meta = index.meta
        first_slice = start // meta.slice_bytes
        last_slice = (start + length - 1) // meta.slice_bytes
        position = start
        end = start + length
        for number in range(first_slice, last_slice + 1):
            if number != first_slice:
                current = await self.fetch_slice(request, index, number)
            slice_start = number * meta.slice_bytes
            lo = position - slice_start
            hi = min(end - slice_start, current.meta.body_bytes)
            if current.body is not None:
                yield current.body[lo:hi]
            else:
                async for chunk in self._file_chunks(current, lo, hi - lo):
                    yield chunk
            position = slice_start + hi

    async def _file_chunks(self, hit: Hit, start: int, length: int) -> AsyncGenerator[bytes, None]:
        handle = await self.cache.open_body(hit)
        try:
            await asyncio.to_thread(handle.seek, start)
            remaining = length
            while remaining:
                chunk = await asyncio.to_thread(handle.read, min(SENDFILE_CHUNK_BYTES, remaining))
                if not chunk:
                    raise UpstreamError("protocol", "a cached slice is shorter than recorded")
                remaining -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    async def _encoded_variant(self, request: EdgeRequest, hit: Hit) -> tuple[Hit, EntryMeta]:  # noqa: PLR0911 - one return per way an encoded copy is found, made or declined
        """deliver with the best encoding the client accepts, making and storing it once."""
        meta = hit.meta
        if not meta.encodable:
            return hit, meta
        coding = preferred_encoding(request.headers.getall("Accept-Encoding", []))
        if coding == "identity":
            return hit, meta
        encoded_key = hit.key + ENCODING_SEP + coding
        found = await self.cache.lookup(encoded_key)
        if (
            found is not None
            and found.meta.etag == encoded_etag(meta.etag, coding)
            and found.meta.response_time >= meta.response_time
        ):
            if made_from(found.meta, meta, coding):
                return found, found.meta  # reuse as is
            return found, replace(
                found.meta,
                headers=_merge_fresh(meta, found.meta),
                request_time=meta.request_time,
                response_time=meta.response_time,
                soft_purged=meta.soft_purged,
            )
        body = hit.body
        if body is None:
            try:
                handle = await self.cache.open_body(hit)
            except (CorruptEntryError, FileNotFoundError):
                return hit, meta
            try:
                body = await asyncio.to_thread(handle.read)
            finally:
                await asyncio.to_thread(handle.close)
        if len(body) <= INLINE_COMPRESS_BYTES:
            encoded = compress(body, coding)
        else:
            encoded = await asyncio.to_thread(compress, body, coding)
        if len(encoded) >= len(body):
            return hit, meta
        headers = [(k, v) for k, v in meta.headers if k.lower() not in ("content-length", "etag")]
        headers.append(("Content-Encoding", coding))
        new_etag = encoded_etag(meta.etag, coding)
        if new_etag is not None:
            headers.append(("ETag", new_etag))
        headers.append(("Content-Length", str(len(encoded))))
        encoded_meta = replace(meta, headers=tuple(headers), body_bytes=len(encoded), etag=new_etag)
        stored = await self.cache.store_bytes(encoded_key, encoded_meta, encoded)
        return stored, encoded_meta


def _merge_fresh(identity: EntryMeta, encoded: EntryMeta) -> tuple[tuple[str, str], ...]:
    """The encoded copy's headers, with freshness fields from the (possibly refreshed)
    identity entry."""
    fresh_fields = {
        "date",
        "cache-control",
        "cdn-cache-control",
        "expires",
        "age",
        "last-modified",
        "surrogate-key",
    }
    kept = [(k, v) for k, v in encoded.headers if k.lower() not in fresh_fields]
    return tuple(kept + [(k, v) for k, v in identity.headers if k.lower() in fresh_fields])


def _close_passed(future: asyncio.Future[Outcome]) -> None:
    if not future.cancelled():
        outcome = future.result()
        if isinstance(outcome, Passed) and outcome.response is not None:
            outcome.response.close()


def _deliverable(headers: Headers, *, keep_edge_fields: bool = False) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, v in strip_hop_by_hop(headers)
        if keep_edge_fields or k.lower() not in EDGE_ONLY
    ]


def _with_length(headers: tuple[tuple[str, str], ...], length: int) -> tuple[tuple[str, str], ...]:
    return tuple(
        [(k, v) for k, v in headers if k.lower() != "content-length"]
        + [("Content-Length", str(length))]
    )


async def _streamed_body(
    request_body: RequestBody, refused: list[Answer], too_large: str
) -> AsyncIterator[bytes]:
    """A client's request body, chunk by chunk as it arrives (never buffered whole), to send
    upstream. A body larger than :data:`MAX_UNSAFE_BODY_BYTES`, or one that stalls for
    :data:`REQUEST_BODY_TIMEOUT_S`, ends the upload; the reason is left in *refused* (the
    upstream request fails with it, whatever aiohttp makes of the error)."""
    total = 0
    while True:
        try:
            async with asyncio.timeout(REQUEST_BODY_TIMEOUT_S):
                chunk = await request_body.read_chunk()
        except TimeoutError:
            refused.append(error_answer(408, "the request body stopped arriving"))
            raise
        if not chunk:
            return
        total += len(chunk)
        if total > MAX_UNSAFE_BODY_BYTES:
            refused.append(error_answer(413, too_large))
            raise RequestBodyRefused(too_large)
        yield chunk


class RequestBodyRefused(Exception):
    """A client's request body was cut off by the edge (too large or too slow)."""


# ---- the edge's own routes -----------------------------------------------------------------------

PURGE_PATH = "/.kshipra/purge"
"""A dot-segment under a reserved name: not a path an origin serves content at."""
_LOOPBACK = frozenset({"127.0.0.1", "::1"})


async def read_body(request: EdgeRequest, limit: int) -> bytes | None:
    """A small request body read whole (an operator's purge), or ``None`` past *limit*."""
    if request.body is None:
        return b""
    declared = request.body.declared_length
    if declared is not None and declared > limit:
        return None
    parts: list[bytes] = []
    total = 0
    async with asyncio.timeout(REQUEST_BODY_TIMEOUT_S):
        while chunk := await request.body.read_chunk():
            total += len(chunk)
            if total > limit:
                return None
            parts.append(chunk)
    return b"".join(parts)


async def healthz(edge: Edge, _request: EdgeRequest) -> Answer:
    return json_answer(200, json.dumps({"status": "ok", "edge": edge.config.name}).encode())


async def readyz(edge: Edge, _request: EdgeRequest) -> Answer:
    """``200`` when the edge serves with its purge stream followed (or deliberately without
    one: ``purges: off``, said loudly at start-up too); ``503`` while it has not caught up."""
    state = edge.purge_state()
    consumer = edge.purge_consumer
    body = {
        "status": "not-ready" if state == "catching-up" else "ready",
        "edge": edge.config.name,
        "purges": state,
        "purge_last_applied": None if consumer is None else consumer.last_applied,
    }
    if state == "off":
        body["warning"] = "this edge receives no purges: start it with --redis or a config"
    return json_answer(503 if state == "catching-up" else 200, json.dumps(body).encode())


async def metrics_route(edge: Edge, request: EdgeRequest) -> Answer:
    """``/metrics``: open to this machine (a local Prometheus or agent); from elsewhere only
    with ``Authorization: Bearer <KSHIPRA_PURGE_TOKEN>`` (Prometheus' ``authorization``)."""
    if request.remote not in _LOOPBACK:
        token = edge.purge_token
        checked = (
            "missing"
            if token is None
            else bearer_check(request.headers.get("Authorization"), token)
        )
        if checked == "missing":
            return error_answer(401, "metrics need a bearer token (the fleet's purge token)")
        if checked == "wrong":
            return error_answer(403, "wrong token for metrics")
    body, content_type = edge.metrics.render()
    return Answer(200, CIMultiDict({"Content-Type": content_type}), body)


async def purge_route(edge: Edge, request: EdgeRequest) -> Answer:
    """``POST /.kshipra/purge`` (see :func:`edge.purge.purge_endpoint`)."""
    return await purge_endpoint(
        request.headers.get("Authorization"),
        lambda limit: read_body(request, limit),
        token=edge.purge_token,
        apply=edge.apply_purges,
        clock=edge.clock,
    )


OwnRoute = Callable[[Edge, EdgeRequest], Awaitable[Answer]]
OWN_ROUTE_METHODS: dict[str, tuple[frozenset[str], OwnRoute]] = {
    HEALTHZ_PATH: (frozenset({"GET", "HEAD"}), healthz),
    READYZ_PATH: (frozenset({"GET", "HEAD"}), readyz),
    METRICS_PATH: (frozenset({"GET"}), metrics_route),
    PURGE_PATH: (frozenset({"POST"}), purge_route),
}
"""The edge's own routes by path: the methods each allows, and its answer."""
