"""The origin's HTTP service: ``create_app(config)`` → an aiohttp application.

Routes:

* ``GET /healthz`` (process alive), ``GET /readyz`` (storage and Redis reachable);
* ``/v1/…`` — the content team's API (bearer token ``KSHIPRA_UPLOAD_TOKEN``): uploads, resumable
  upload sessions, the asset catalogue;
* ``POST /v1/purge`` — purges for the edges (bearer token ``KSHIPRA_PURGE_TOKEN``; see
  :mod:`origin.purge`);
* ``GET|HEAD /content/{kind}s/{id}/v{n}/{name}`` and ``…/{id}/latest.{ext}`` — what edges fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from assets.blobstore import BlobStore, StorageError, open_blob_store
from assets.blobstore.local import LocalDirBlobStore
from assets.catalogue import (
    ASSET_ID_RE,
    Catalogue,
    Manifest,
    Rendition,
    Version,
    asset_id_from_filename,
    asset_urls,
    validate_asset_id,
)
from assets.processing import (
    JobLimits,
    TranscodeQueues,
    TranscodeSubmitter,
    job_key,
    pipeline_settings,
    profile_id,
    progress_of,
)
from cdn_config import KshipraConfig
from common.auth import bearer_check
from common.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    OriginError,
    Unauthorized,
    error_body,
)
from common.http import (
    ByteSpan,
    Unsatisfiable,
    evaluate_preconditions,
    format_http_date,
    select_range,
)
from common.wire import PURGE_SEEN_HEADER, PURGE_STREAM
from origin.delivery import CachePolicy, RuleMatcher, cache_headers
from origin.ingest import Ingest, PublishResult, check_kind, check_tags, session_view
from origin.invalidation import CacheInvalidator
from origin.notifications import (
    BUCKET_EVENTS,
    NOTIFICATIONS,
    WEBHOOK_PATH,
    bucket_events,
    make_webhook_handler,
    start_notifications,
)
from origin.purge import PURGE_PATH, make_purge_handler

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", KshipraConfig)
STORE = web.AppKey("store", BlobStore)
REDIS = web.AppKey("redis", aioredis.Redis)
CATALOGUE = web.AppKey("catalogue", Catalogue)
INGEST = web.AppKey("ingest", Ingest)
QUEUE = web.AppKey("queue", TranscodeQueues)
RULES = web.AppKey("rules", RuleMatcher)

STREAM_CHUNK_BYTES = 256 * 1024
FILE_CHUNK_BYTES = 1024 * 1024
DEFAULT_PAGE_ASSETS = 100
MAX_PAGE_ASSETS = 1000
STAGING_SWEEP_AGE_S = 24 * 3600
_CONTENT_RE = re.compile(
    r"^/content/(?P<kind>lecture|image|bundle)s/(?P<id>[^/]+)/"
    r"(?:v(?P<version>[1-9][0-9]{0,8})/(?P<name>[A-Za-z0-9._-]+)|latest\.(?P<ext>[a-z0-9]+))$"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One place maps exceptions to JSON answers."""
    try:
        return await handler(request)
    except OriginError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        body = error_body(exc.status, exc.message, exc.code, **exc.details)
        headers = getattr(exc, "headers", None)
        return web.json_response(body, status=exc.status, headers=headers)
    except StorageError as exc:
        log.exception("storage failed on %s %s", request.method, request.path)
        return web.json_response(
            error_body(503, f"storage failed: {exc}", "storage_unavailable"), status=503
        )
    except aioredis.RedisError as exc:
        log.exception("redis failed on %s %s", request.method, request.path)
        return web.json_response(
            error_body(503, f"redis failed: {exc}", "redis_unavailable"), status=503
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            error_body(exc.status, exc.reason, exc.reason.lower().replace(" ", "_")),
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The content team's API needs ``Authorization: Bearer $KSHIPRA_UPLOAD_TOKEN``."""
    # /v1/purge and the bucket-event webhook check the purge token themselves.
    if request.path.startswith("/v1/") and request.path not in (PURGE_PATH, WEBHOOK_PATH):
        expected = request.app[CONFIG].secrets.upload_token
        checked = bearer_check(request.headers.get("Authorization"), expected)
        if checked == "missing":
            raise Unauthorized(
                "missing_token", "send 'Authorization: Bearer <KSHIPRA_UPLOAD_TOKEN>'"
            )
        if checked == "wrong":
            raise Forbidden("wrong_token", "the upload token is not valid")
    return await handler(request)


# ---- health ---------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    try:
        await request.app[STORE].check()
        checks["storage"] = "ok"
    except StorageError as exc:
        checks["storage"] = f"failed: {exc}"
    try:
        await request.app[REDIS].ping()
        checks["redis"] = "ok"
    except (aioredis.RedisError, OSError) as exc:
        checks["redis"] = f"failed: {exc}"
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


# ---- the content team's API -----------------------------------------------------------------


def _base_url(request: web.Request) -> str:
    configured = request.app[CONFIG].origin.public_url
    return configured.rstrip("/") if configured else str(request.url.origin())


def asset_view(manifest: Manifest, base_url: str) -> dict[str, Any]:
    current = manifest.current
    newest = manifest.newest
    return {
        "id": manifest.id,
        "kind": manifest.kind,
        "status": manifest.status,
        "status_reason": manifest.status_reason,
        "tags": [manifest.cache_tag, *manifest.tags],
        "version": None if current is None else current.version,
        "newest_version": newest.version,
        "newest_state": newest.state,
        "versions": [v.version for v in manifest.versions],
        "content_hash": newest.source.content_hash,
        "size_bytes": newest.source.size_bytes,
        "format": newest.source.format,
        "created_at": manifest.created_at.isoformat(),
        "updated_at": manifest.updated_at.isoformat(),
        "urls": asset_urls(manifest, base_url),
    }


def _publish_response(request: web.Request, result: PublishResult) -> web.Response:
    body = {"created": result.created, "asset": asset_view(result.manifest, _base_url(request))}
    return web.json_response(body, status=201 if result.created else 200)


def _asset_id_for(asset_id: str | None, filename: str | None) -> str:
    if asset_id:
        return validate_asset_id(asset_id)
    if filename:
        return validate_asset_id(asset_id_from_filename(filename))
    raise BadRequest("missing_id", "give the asset an id (?id=…) or a filename (?filename=…)")


async def _request_chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(STREAM_CHUNK_BYTES):
        yield chunk


async def upload_asset(request: web.Request) -> web.Response:
    """``POST /v1/assets?kind=&id=&filename=&tag=…`` with the file as the raw body."""
    query = request.query
    filename = query.get("filename")
    result = await request.app[INGEST].upload_stream(
        _request_chunks(request),
        kind=check_kind(query.get("kind")),
        asset_id=_asset_id_for(query.get("id"), filename),
        filename=filename,
        tags=check_tags(query.getall("tag", [])),
        declared_bytes=request.content_length,
    )
    return _publish_response(request, result)


async def list_assets(request: web.Request) -> web.Response:
    """``GET /v1/assets?kind=&limit=&after=`` → one page of the catalogue, in id order as
    the store lists them, and ``next`` (the ``after`` of the next page, ``null`` at the end).
    Only the page's manifests are read."""
    catalogue = request.app[CATALOGUE]
    base_url = _base_url(request)
    query = request.query
    kind = check_kind(query.get("kind"))
    limit = _page_limit(query.get("limit"))
    after = query.get("after")
    if after is not None:
        after = validate_asset_id(after)
    assets: list[dict[str, Any]] = []
    next_after = None
    async for asset_id in catalogue.ids(after=after):
        manifest = await catalogue.get(asset_id)
        if manifest is not None and (kind is None or manifest.kind == kind):
            assets.append(asset_view(manifest, base_url))
            if len(assets) == limit:
                next_after = asset_id
                break
    return web.json_response({"assets": assets, "next": next_after})


def _page_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE_ASSETS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE_ASSETS:
        raise BadRequest("invalid_limit", f"limit must be an integer from 1 to {MAX_PAGE_ASSETS}")
    return limit


async def show_asset(request: web.Request) -> web.Response:
    asset_id = validate_asset_id(request.match_info["asset_id"])
    manifest = await request.app[CATALOGUE].get(asset_id, fresh=True)
    if manifest is None:
        raise NotFound("unknown_asset", f"no asset {asset_id!r}")
    view = asset_view(manifest, _base_url(request))
    view["manifest"] = manifest.model_dump(mode="json")
    view["processing"] = await _processing(request, manifest)
    return web.json_response(view)


async def _processing(request: web.Request, manifest: Manifest) -> dict[str, Any] | None:
    """Progress of the newest version's job, while it runs."""
    newest = manifest.newest
    if newest.state != "processing":
        return None
    settings = pipeline_settings(request.app[CONFIG], manifest, newest)
    key = job_key(manifest.kind, newest.source.content_hash, profile_id(settings))
    progress = await progress_of(request.app[REDIS], key)
    job = await request.app[QUEUE].job(key)
    return {
        "job": key,
        "job_status": None if job is None else job_status_text(job.status),
        "attempts": None if job is None else job.attempts,
        **(progress or {"stage": "queued", "percent": 0.0, "eta_s": None}),
    }


def job_status_text(status: object) -> str:
    """saq's job status as its plain value (``queued``, ``active``, ``complete``,
    ``failed``…), never an enum's repr. saq leaves a job's status out of its dict while it is
    the default, ``new``."""
    if status is None:
        return "new"
    value = getattr(status, "value", status)
    return str(value)


async def list_jobs(request: web.Request) -> web.Response:
    """``GET /v1/jobs``: the transcode queue's jobs and their states."""
    info = await request.app[QUEUE].info(jobs=True, limit=int(request.query.get("limit", "100")))
    jobs = []
    for job in info.get("jobs", []):
        key = job.get("key", "")
        jobs.append(
            {
                "key": key,
                "status": job_status_text(job.get("status")),
                "attempts": job.get("attempts"),
                "progress": await progress_of(request.app[REDIS], key),
                "error": job.get("error"),
                "kwargs": {k: v for k, v in (job.get("kwargs") or {}).items() if k != "settings"},
            }
        )
    return web.json_response(
        {
            "queued": info.get("queued"),
            "active": info.get("active"),
            "scheduled": info.get("scheduled"),
            "workers": len(info.get("workers", {})),
            "jobs": jobs,
        }
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    if (request.content_length or 0) > 64 * 1024:
        raise BadRequest("body_too_large", "a JSON request body may be at most 64 KiB")
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("invalid_json", "the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("invalid_json", "the request body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest("missing_field", f"{name!r} is required")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest("invalid_field", f"{name!r} must be a {kind.__name__}")
    return value


async def create_upload(request: web.Request) -> web.Response:
    """``POST /v1/uploads`` ``{"size_bytes", "content_hash", "kind"?, "id"?, "filename"?,
    "tags"?}`` → a session to send parts to, or the asset when no bytes need sending."""
    body = await _json_body(request)
    filename = _field(body, "filename", str)
    tags = _field(body, "tags", list) or []
    if not all(isinstance(tag, str) for tag in tags):
        raise BadRequest("invalid_field", "'tags' must be a list of strings")
    session, result, received = await request.app[INGEST].create_session(
        kind=check_kind(_field(body, "kind", str)),
        asset_id=_asset_id_for(_field(body, "id", str), filename),
        filename=filename,
        tags=check_tags(tags),
        size_bytes=_field(body, "size_bytes", int, required=True),
        content_hash=_field(body, "content_hash", str, required=True),
    )
    if result is not None:
        return _publish_response(request, result)
    assert session is not None
    return web.json_response(
        {"upload": session_view(session, received)}, status=200 if received else 201
    )


async def show_upload(request: web.Request) -> web.Response:
    session, received = await request.app[INGEST].session(request.match_info["upload_id"])
    return web.json_response({"upload": session_view(session, received)})


async def put_part(request: web.Request) -> web.Response:
    number_text = request.match_info["number"]
    if not number_text.isdigit() or len(number_text) > 6:
        raise BadRequest("invalid_part", "part numbers are positive integers")
    session, size = await request.app[INGEST].put_part(
        request.match_info["upload_id"], int(number_text), _request_chunks(request)
    )
    return web.json_response(
        {"upload_id": session.upload_id, "part": int(number_text), "size_bytes": size}
    )


async def complete_upload(request: web.Request) -> web.Response:
    result = await request.app[INGEST].complete(request.match_info["upload_id"])
    return _publish_response(request, result)


async def abort_upload(request: web.Request) -> web.Response:
    await request.app[INGEST].abort(request.match_info["upload_id"])
    return web.json_response({"aborted": True})


# ---- the content read API for edges -----------------------------------------------------------


def _rules_from_config(config: KshipraConfig) -> RuleMatcher:
    return RuleMatcher(
        [
            (
                rule.pattern,
                CachePolicy(
                    edge_ttl_s=rule.edge_ttl_s,
                    browser_ttl_s=rule.browser_ttl_s,
                    stale_while_revalidate_s=rule.stale_while_revalidate_s,
                    stale_if_error_s=rule.stale_if_error_s,
                    compress=rule.compress,
                    tags=rule.tags,
                ),
            )
            for rule in config.cache_rules
        ]
    )


async def _resolve(request: web.Request) -> tuple[Manifest, Rendition, int, bool]:
    """URL → (manifest, rendition, version, immutable) or 404."""
    match = _CONTENT_RE.match(request.path)
    if match is None:
        raise NotFound("not_found", f"nothing is published at {request.path}")
    asset_id = match["id"]
    if not ASSET_ID_RE.match(asset_id):
        raise NotFound("not_found", f"nothing is published at {request.path}")
    manifest = await request.app[CATALOGUE].get(asset_id)
    if manifest is None or manifest.kind != match["kind"]:
        raise NotFound("not_found", f"nothing is published at {request.path}")
    if match["version"] is not None:
        version = manifest.version(int(match["version"]))
        rendition = version.renditions.get(match["name"]) if version else None
        if version is None or rendition is None or version.state != "published":
            raise NotFound("not_found", f"nothing is published at {request.path}")
        return manifest, rendition, version.version, True
    current = manifest.current
    if current is None or not current.primary.endswith(f".{match['ext']}"):
        raise NotFound("not_found", f"nothing is published at {request.path}")
    return manifest, current.renditions[current.primary], current.version, False


@dataclass(frozen=True, slots=True)
class Delivery:
    """Everything about one content URL that does not depend on the request: resolved once
    and reused (immutable URLs until evicted, ``latest`` pointers for the catalogue's cache
    TTL)."""

    key: str
    size_bytes: int
    etag: str
    last_modified: datetime
    headers: dict[str, str]
    resolved_at: float
    immutable: bool
    alternates: dict[str, Delivery] = field(default_factory=dict)
    """Stored content codings of the same representation (``br``, ``gzip``)."""
    dictionaries: dict[str, Delivery] = field(default_factory=dict)
    """``dcz`` deltas by the ``Available-Dictionary`` value they need."""


class ContentCache:
    """Resolved deliveries by path, and the bytes of small objects by storage key. Source
    objects are content-addressed (``sources/{hash}``) and never change, so their bytes can
    be kept as long as memory allows."""

    def __init__(
        self,
        *,
        max_body_bytes: int = 1024 * 1024,
        budget_bytes: int = 64 * 1024 * 1024,
        mutable_ttl_s: float = 1.0,
    ) -> None:
        self._deliveries: dict[str, Delivery] = {}
        self.generation = 0
        """Bumped by :meth:`invalidate`; a delivery resolved under an older generation is
        not remembered (see :mod:`origin.invalidation`)."""
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._body_bytes = 0
        self.max_body_bytes = max_body_bytes
        self._budget_bytes = budget_bytes
        self._mutable_ttl_s = mutable_ttl_s

    def delivery(self, path: str, now: float) -> Delivery | None:
        found = self._deliveries.get(path)
        if found is None or (not found.immutable and now - found.resolved_at > self._mutable_ttl_s):
            return None
        return found

    def invalidate(self, kind: str | None, asset_id: str | None) -> None:
        """Forget every delivery of one asset, or every mutable one when *asset_id* is
        ``None`` (immutable versioned URLs cannot change without their asset's own tag)."""
        self.generation += 1
        if asset_id is None:
            self._deliveries = {p: d for p, d in self._deliveries.items() if d.immutable}
            return
        prefix = f"/content/{kind}s/{asset_id}/"
        self._deliveries = {p: d for p, d in self._deliveries.items() if not p.startswith(prefix)}

    def remember(self, path: str, delivery: Delivery, generation: int) -> None:
        if generation != self.generation:
            return
        if len(self._deliveries) >= 100_000:
            self._deliveries.clear()
        self._deliveries[path] = delivery

    def body(self, key: str) -> bytes | None:
        body = self._bodies.get(key)
        if body is not None:
            self._bodies.move_to_end(key)
        return body

    def keep_body(self, key: str, body: bytes) -> None:
        if len(body) > self.max_body_bytes or key in self._bodies:
            return
        self._bodies[key] = body
        self._body_bytes += len(body)
        while self._body_bytes > self._budget_bytes:
            _, dropped = self._bodies.popitem(last=False)
            self._body_bytes -= len(dropped)


CONTENT_CACHE = web.AppKey("content_cache", ContentCache)
INVALIDATOR = web.AppKey("invalidator", CacheInvalidator)


async def _delivery_for(request: web.Request) -> Delivery:
    cache = request.app[CONTENT_CACHE]
    invalidator = request.app.get(INVALIDATOR)
    seen = request.headers.get(PURGE_SEEN_HEADER)
    if invalidator is not None and invalidator.behind(seen):
        assert seen is not None
        await invalidator.catch_up_to(seen)
    now = time.monotonic()
    found = cache.delivery(request.path, now)
    if found is not None:
        return found
    generation = cache.generation
    manifest, rendition, version_number, immutable = await _resolve(request)
    version = manifest.version(version_number)
    assert version is not None
    common = {
        "Last-Modified": format_http_date(version.created_at),
        "Accept-Ranges": "bytes",
        **cache_headers(
            immutable=immutable,
            policy=request.app[RULES].match(request.path),
            tags=[manifest.cache_tag, *manifest.tags],
        ),
    }

    def plan(chosen: Rendition, extra: dict[str, str] | None = None) -> Delivery:
        headers = {"ETag": chosen.etag, "Content-Type": chosen.content_type, **common}
        if chosen.content_encoding:
            headers["Content-Encoding"] = chosen.content_encoding
        headers.update(extra or {})
        return Delivery(
            key=chosen.key,
            size_bytes=chosen.size_bytes,
            etag=chosen.etag,
            last_modified=version.created_at,
            headers=headers,
            resolved_at=now,
            immutable=immutable,
        )

    delivery = plan(rendition)
    if (
        manifest.kind == "bundle"
        and rendition.key == version.renditions.get(BUNDLE_IDENTITY, rendition).key
    ):
        delivery = _bundle_negotiation(manifest, version, plan)
    cache.remember(request.path, delivery, generation)
    return delivery


BUNDLE_IDENTITY = "bundle.json"


def _bundle_negotiation(
    manifest: Manifest, version: Version, plan: Callable[..., Delivery]
) -> Delivery:
    """A bundle's identity URL offers its stored encodings: Brotli 11, gzip -9, and RFC 9842
    ``dcz`` deltas against earlier versions the app may hold (``Available-Dictionary``).
    Every answer says it can serve as a dictionary for the next version."""
    extra = {
        "Vary": "Accept-Encoding, Available-Dictionary",
        "Use-As-Dictionary": f'match="/content/bundles/{manifest.id}/*"',
    }
    identity = plan(version.renditions[BUNDLE_IDENTITY], extra)
    alternates = {}
    for coding, suffix in (("br", ".br"), ("gzip", ".gz")):
        stored = version.renditions.get(BUNDLE_IDENTITY + suffix)
        if stored is not None:
            alternates[coding] = plan(stored, extra)
    dictionaries = {}
    for delta in version.details.get("deltas", []):
        stored = version.renditions.get(str(delta.get("file")))
        if stored is not None and delta.get("available_dictionary"):
            dictionaries[str(delta["available_dictionary"])] = plan(stored, extra)
    return replace(identity, alternates=alternates, dictionaries=dictionaries)


def negotiate(delivery: Delivery, request_headers: Any) -> Delivery:
    """Pick the stored encoding for this request (RFC 9110 §12.5.3, RFC 9842)."""
    if not delivery.alternates and not delivery.dictionaries:
        return delivery
    accepted = {
        item.split(";")[0].strip().lower(): item
        for value in request_headers.getall("Accept-Encoding", [])
        for item in value.split(",")
        if item.strip() and not re.search(r";\s*q=0(\.0*)?\s*$", item)
    }
    available = request_headers.get("Available-Dictionary", "").strip()
    if "dcz" in accepted and available in delivery.dictionaries:
        return delivery.dictionaries[available]
    for coding in ("br", "gzip"):
        if coding in accepted and coding in delivery.alternates:
            return delivery.alternates[coding]
    return delivery


_CONDITIONAL_HEADERS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since")


async def serve_content(request: web.Request) -> web.StreamResponse:
    delivery = negotiate(await _delivery_for(request), request.headers)
    headers = dict(delivery.headers)
    request_headers = request.headers
    if any(name in request_headers for name in _CONDITIONAL_HEADERS):
        precondition = evaluate_preconditions(
            request.method,
            request_headers,
            etag=delivery.etag,
            last_modified=delivery.last_modified,
        )
        if precondition == "not-modified":
            del headers["Content-Type"]
            return web.Response(status=304, headers=headers)
        if precondition == "failed":
            return web.json_response(
                error_body(412, "a precondition in the request did not hold"),
                status=412,
                headers={k: v for k, v in headers.items() if k != "Content-Type"},
            )
    size = delivery.size_bytes
    start, length, status = 0, size, 200
    if "Range" in request_headers:
        decision = select_range(
            request_headers.get("Range"),
            size_bytes=size,
            if_range=request_headers.get("If-Range"),
            etag=delivery.etag,
            last_modified=delivery.last_modified,
        )
        if isinstance(decision, Unsatisfiable):
            headers["Content-Range"] = f"bytes */{size}"
            del headers["Content-Type"]
            return web.json_response(
                error_body(416, decision.reason, "range_not_satisfiable"),
                status=416,
                headers=headers,
            )
        if isinstance(decision, ByteSpan):
            start, length, status = decision.start, decision.length, 206
            headers["Content-Range"] = decision.content_range(size)
    return await _send_body(request, delivery.key, size, start, length, status, headers)


async def _send_body(  # noqa: PLR0913 - one ranged send's values
    request: web.Request,
    key: str,
    size: int,
    start: int,
    length: int,
    status: int,
    headers: dict[str, str],
) -> web.StreamResponse:
    store = request.app[STORE]
    if request.method == "HEAD":
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(request)
        return response
    cache = request.app[CONTENT_CACHE]
    if size <= cache.max_body_bytes:
        body = cache.body(key)
        if body is None:
            reader = await store.get(key)
            body = await reader.read_all()
            cache.keep_body(key, body)
        if length != size:
            body = body[start : start + length]
        return web.Response(status=status, headers=headers, body=body)
    if isinstance(store, LocalDirBlobStore):
        return await _send_file(request, store.path_for(key), start, length, status, headers)
    reader = await store.get(key, start=start, end=start + length - 1)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    async for chunk in reader.chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


def _read_span(path: Path, start: int, length: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        return handle.read(length)


async def _send_file(
    request: web.Request, path: Path, start: int, length: int, status: int, headers: dict[str, str]
) -> web.StreamResponse:
    """Large local files, in 1 MiB reads off the event loop. (uvloop has no ``sendfile``,
    MagicStack/uvloop#228; objects this size are rare at the origin, whose edges cache.)"""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    position, end = start, start + length
    while position < end:
        chunk = await asyncio.to_thread(
            _read_span, path, position, min(FILE_CHUNK_BYTES, end - position)
        )
        if not chunk:
            raise StorageError(f"{path} is shorter than its catalogue entry")
        position += len(chunk)
        await response.write(chunk)
    await response.write_eof()
    return response


# ---- the factory ------------------------------------------------------------------------------


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = open_blob_store(
        config.origin.storage,
        s3_endpoint=config.origin.s3_endpoint,
        s3_region=config.origin.s3_region,
    )
    redis_client = aioredis.Redis.from_url(config.redis.url, decode_responses=True)
    app[STORE] = store
    app[REDIS] = redis_client
    app[CATALOGUE] = Catalogue(store)
    queue = TranscodeQueues(config.redis.url)
    await queue.connect()
    app[QUEUE] = queue
    submitter = TranscodeSubmitter(
        queues=queue,
        redis=redis_client,
        store=store,
        catalogue=app[CATALOGUE],
        config=config,
        limits=JobLimits(
            timeout_s=config.transcode.job_timeout_s,
            heartbeat_s=config.transcode.heartbeat_s,
            retries=config.transcode.retries,
        ),
    )
    app[INGEST] = Ingest(
        store=store,
        catalogue=app[CATALOGUE],
        redis=redis_client,
        limits=config.origin.upload_limits,
        session_ttl_s=config.origin.upload_session_ttl_s,
        submit=submitter,
    )
    try:
        removed = await app[INGEST].sweep_staging(older_than_s=STAGING_SWEEP_AGE_S)
        if removed:
            log.info("removed %d abandoned staged uploads", removed)
    except StorageError as exc:
        log.warning("could not sweep staged uploads: %s", exc)
    # ---- S3 bucket notifications → purges (origin/notifications.py), when configured ----
    events = bucket_events(config, redis_client, app[CATALOGUE])
    if events is not None:
        app[BUCKET_EVENTS] = events  # for MinIO's webhook
    notifications = start_notifications(config, events)
    if notifications is not None:
        app[NOTIFICATIONS] = notifications
    # ---- the origin's caches follow the purge stream (origin/invalidation.py) ----
    follower_redis = aioredis.Redis.from_url(config.redis.url, decode_responses=True)
    catalogue, content_cache = app[CATALOGUE], app[CONTENT_CACHE]

    def invalidate(kind: str | None, asset_id: str | None) -> None:
        catalogue.invalidate(asset_id)
        content_cache.invalidate(kind, asset_id)

    invalidator = CacheInvalidator(follower_redis, PURGE_STREAM, invalidate)
    try:
        await invalidator.start_position()
    except (aioredis.RedisError, OSError) as exc:
        log.warning(
            "origin: cannot read %s yet (%s); following it when Redis is up", PURGE_STREAM, exc
        )
    app[INVALIDATOR] = invalidator
    stop_following = asyncio.Event()
    following = asyncio.create_task(invalidator.run(stop_following))
    yield
    stop_following.set()
    following.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await following
    await follower_redis.aclose()
    if notifications is not None:
        await notifications.stop()
    # ---- end of notifications ----
    await queue.disconnect()
    await redis_client.aclose()
    await store.close()


def create_app(config: KshipraConfig) -> web.Application:
    """The origin application. ``config.redis.url`` must be a real URL (the CLI resolves
    ``embedded`` before calling this)."""
    if config.redis.url == "embedded":
        raise ValueError("create_app needs a Redis URL; start the embedded server first")
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app[CONFIG] = config
    app[RULES] = _rules_from_config(config)
    app[CONTENT_CACHE] = ContentCache()
    app.cleanup_ctx.append(_resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/assets", upload_asset)
    app.router.add_get("/v1/assets", list_assets)
    app.router.add_get("/v1/assets/{asset_id}", show_asset)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_post("/v1/uploads", create_upload)
    app.router.add_get("/v1/uploads/{upload_id}", show_upload)
    app.router.add_delete("/v1/uploads/{upload_id}", abort_upload)
    app.router.add_put("/v1/uploads/{upload_id}/parts/{number}", put_part)
    app.router.add_post("/v1/uploads/{upload_id}/complete", complete_upload)
    app.router.add_post(PURGE_PATH, make_purge_handler(CONFIG, REDIS))
    app.router.add_post(WEBHOOK_PATH, make_webhook_handler(CONFIG))
    app.router.add_route("GET", "/content/{tail:.*}", serve_content)
    app.router.add_route("HEAD", "/content/{tail:.*}", serve_content)
    return app
