"""The purge API: ``POST /v1/purge`` publishes purges on the Redis stream every edge reads, then
waits for the live edges to acknowledge them.

Request (``Authorization: Bearer $KSHIPRA_PURGE_TOKEN``, not the upload token)::

    {"urls": ["/content/images/x/latest.jpg"], "prefixes": ["/content/bundles/"],
     "tags": ["lecture:mole-1"], "soft": false, "wait_s": 5}

Answer::

    {"purges": [{"stream_id", "kind", "value"}], "edges_live": 2, "edges_applied": 2,
     "edges_pending": [], "slowest_ms": 41.3, "complete": true}

Redis keys (the edge side, ``edge/purge.py``, writes the last two):

* ``kshipra:purges`` — the stream; one entry per target with fields ``kind`` (url|prefix|tag),
  ``value``, ``soft`` ("1"/"0"), ``reason``, ``requested_at`` (epoch seconds) and ``id`` (the
  request's id, shared by its entries). All of one request's entries go in one transaction.
* ``kshipra:edges:{name}`` — an edge's heartbeat (JSON, short TTL): the edge is live.
* ``kshipra:purge-acks:{stream id}`` — hash: edge name → seconds from ``requested_at`` to
  applied (a decimal string).

The live edges are those with a heartbeat when the purges were published; an edge has
applied the request when it acknowledged every entry of it; its latency is the largest of its
acknowledgements. The edges answer in batches, so the wait polls the acknowledgement hashes
every 50 ms (the edge side offers no acknowledgement stream to block on).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from aiohttp import web
from yarl import URL

from assets.catalogue import TAG_RE
from cdn_config import KshipraConfig
from common.auth import bearer_check
from common.errors import BadRequest, Forbidden, Unauthorized, UpstreamFault
from common.wire import ACK_PREFIX, EDGE_PREFIX, PURGE_STREAM, PURGE_STREAM_MAXLEN, PurgeEntry

PURGE_PATH = "/v1/purge"
MAX_TARGET_BYTES = 2048
MAX_TARGETS = 1000
DEFAULT_WAIT_S = 5.0
MAX_WAIT_S = 30.0
POLL_INTERVAL_S = 0.05
MAX_BODY_BYTES = 4 * 1024 * 1024

TargetKind = Literal["url", "prefix", "tag"]
_FIELDS: dict[str, TargetKind] = {"urls": "url", "prefixes": "prefix", "tags": "tag"}


# ---- the pure core ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgeTarget:
    kind: TargetKind
    value: str


@dataclass(frozen=True, slots=True)
class PurgeRequest:
    targets: tuple[PurgeTarget, ...]
    soft: bool
    wait_s: float


def check_target(kind: TargetKind, value: object) -> str:
    """A purge target, or :class:`BadRequest` saying what is wrong with it."""
    if not isinstance(value, str) or not value:
        raise BadRequest("invalid_target", f"each {kind} must be a non-empty string")
    if len(value.encode()) > MAX_TARGET_BYTES:
        raise BadRequest("invalid_target", f"a {kind} may be at most {MAX_TARGET_BYTES} bytes")
    if kind == "tag":
        if not TAG_RE.match(value):
            raise BadRequest(
                "invalid_tag",
                f"tag {value!r} must be 1-128 characters of A-Z, a-z, 0-9, ':', '.', '_', '-'",
            )
        return value
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in value):
        raise BadRequest("invalid_target", f"{kind} {value!r} contains spaces or control bytes")
    if value.startswith("/") and not value.startswith("//"):
        return value
    if value.startswith(("http://", "https://")):
        try:
            parsed = URL(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.host:
            return value
    raise BadRequest(
        "invalid_target", f"{kind} {value!r} must be an absolute path ('/…') or an http(s) URL"
    )


def parse_purge_request(body: Mapping[str, Any]) -> PurgeRequest:
    unknown = sorted(set(body) - {*_FIELDS, "soft", "wait_s"})
    if unknown:
        raise BadRequest("unknown_field", f"unknown fields {unknown}; use urls, prefixes, tags")
    targets: list[PurgeTarget] = []
    for field_name, kind in _FIELDS.items():
        values = body.get(field_name)
        if values is None:
            continue
        if not isinstance(values, list):
            raise BadRequest("invalid_field", f"{field_name!r} must be a list of strings")
        targets.extend(PurgeTarget(kind, check_target(kind, value)) for value in values)
    if not targets:
        raise BadRequest("no_targets", "name at least one url, prefix or tag to purge")
    if len(targets) > MAX_TARGETS:
        raise BadRequest("too_many_targets", f"at most {MAX_TARGETS} targets per request")
    soft = body.get("soft", False)
    if not isinstance(soft, bool):
        raise BadRequest("invalid_field", "'soft' must be true or false")
    wait_s = body.get("wait_s", DEFAULT_WAIT_S)
    if (
        isinstance(wait_s, bool)
        or not isinstance(wait_s, int | float)
        or not math.isfinite(wait_s)
        or not 0 <= wait_s <= MAX_WAIT_S
    ):
        raise BadRequest("invalid_field", f"'wait_s' must be a number from 0 to {MAX_WAIT_S:g}")
    return PurgeRequest(tuple(dict.fromkeys(targets)), soft, float(wait_s))


def stream_fields(
    target: PurgeTarget, *, soft: bool, reason: str, requested_at: float, request_id: str
) -> dict[str, str]:
    """One stream entry's fields (the contract with the edges: :class:`common.wire.PurgeEntry`)."""
    return PurgeEntry(target.kind, target.value, soft, reason, requested_at, request_id).fields()


@dataclass(frozen=True, slots=True)
class AckTally:
    edges_live: int
    edges_applied: int
    edges_pending: tuple[str, ...]
    slowest_ms: float | None

    @property
    def complete(self) -> bool:
        """Every live edge applied it, and there was at least one: a purge nobody applied
        is never reported complete."""
        return self.edges_live > 0 and not self.edges_pending


def tally(live: Sequence[str], acks: Sequence[Mapping[str, str]]) -> AckTally:
    """Which live edges acknowledged every entry (*acks*: one ``edge → seconds from
    requested_at to applied`` map per entry), and how long the slowest of them took."""
    applied: dict[str, float] = {}
    for edge in live:
        latencies = [entry.get(edge) for entry in acks]
        if all(latency is not None for latency in latencies):
            applied[edge] = max((_seconds(t) for t in latencies if t is not None), default=0.0)
    pending = tuple(sorted(edge for edge in live if edge not in applied))
    slowest = max(applied.values(), default=None)
    slowest_ms = None if slowest is None else round(max(0.0, slowest) * 1000, 1)
    return AckTally(len(live), len(applied), pending, slowest_ms)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


# ---- IO: Redis --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Published:
    stream_id: str
    target: PurgeTarget


async def publish(
    redis: aioredis.Redis,
    targets: Sequence[PurgeTarget],
    *,
    soft: bool,
    reason: str,
    requested_at: float,
    request_id: str | None = None,
) -> list[Published]:
    """XADD one entry per target, all or none (one MULTI/EXEC)."""
    request_id = request_id or uuid.uuid4().hex
    async with redis.pipeline(transaction=True) as pipe:
        for target in targets:
            pipe.xadd(
                PURGE_STREAM,
                stream_fields(  # type: ignore[arg-type]
                    target,
                    soft=soft,
                    reason=reason,
                    requested_at=requested_at,
                    request_id=request_id,
                ),
                maxlen=PURGE_STREAM_MAXLEN,
                approximate=True,
            )
        ids = await pipe.execute()
    return [Published(_text(i), t) for i, t in zip(ids, targets, strict=True)]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def live_edges(redis: aioredis.Redis) -> list[str]:
    names = set()
    async for key in redis.scan_iter(match=EDGE_PREFIX + "*", count=500):
        names.add(_text(key).removeprefix(EDGE_PREFIX))
    return sorted(names)


async def read_acks(redis: aioredis.Redis, stream_ids: Sequence[str]) -> list[dict[str, str]]:
    async with redis.pipeline(transaction=False) as pipe:
        for stream_id in stream_ids:
            pipe.hgetall(ACK_PREFIX + stream_id)
        raw = await pipe.execute()
    return [{_text(k): _text(v) for k, v in entry.items()} for entry in raw]


async def wait_for_acks(
    redis: aioredis.Redis,
    stream_ids: Sequence[str],
    live: Sequence[str],
    *,
    wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AckTally:
    """Poll the acknowledgement hashes until every live edge applied every entry or *wait_s*
    passes."""
    deadline = clock() + wait_s
    while True:
        result = tally(live, await read_acks(redis, stream_ids))
        remaining = deadline - clock()
        if result.complete or remaining <= 0:
            return result
        await pause(min(POLL_INTERVAL_S, remaining))


# ---- the HTTP handler ----------------------------------------------------------------------------


def check_purge_token(config: KshipraConfig, header: str) -> None:
    checked = bearer_check(header, config.secrets.purge_token)
    if checked == "missing":
        raise Unauthorized("missing_token", "send 'Authorization: Bearer <KSHIPRA_PURGE_TOKEN>'")
    if config.secrets.purge_token is None:
        raise Forbidden("purge_disabled", "the origin has no KSHIPRA_PURGE_TOKEN: purging is off")
    if checked == "wrong":
        raise Forbidden("wrong_token", "the purge token is not valid")


async def _body(request: web.Request) -> dict[str, Any]:
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise BadRequest("body_too_large", "a purge request may be at most 4 MiB")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("invalid_json", "the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("invalid_json", "the request body must be a JSON object")
    return body


def make_purge_handler(
    config_key: web.AppKey[KshipraConfig], redis_key: web.AppKey[aioredis.Redis]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /v1/purge`` reading the app's configuration and Redis client under these keys
    (passed in so this module does not import :mod:`origin.app`)."""

    async def purge(request: web.Request) -> web.Response:
        check_purge_token(request.app[config_key], request.headers.get("Authorization", ""))
        wanted = parse_purge_request(await _body(request))
        redis = request.app[redis_key]
        requested_at = time.time()
        try:
            live = await live_edges(redis)
            published = await publish(
                redis,
                wanted.targets,
                soft=wanted.soft,
                reason="kshipra purge",
                requested_at=requested_at,
            )
        except (aioredis.RedisError, OSError) as exc:
            raise UpstreamFault(
                "redis_unavailable", f"Redis is unreachable; nothing was purged: {exc}"
            ) from exc
        views = [
            {"stream_id": p.stream_id, "kind": p.target.kind, "value": p.target.value}
            for p in published
        ]
        try:
            result = await wait_for_acks(
                redis,
                [p.stream_id for p in published],
                live,
                wait_s=wanted.wait_s,
            )
        except (aioredis.RedisError, OSError) as exc:
            raise UpstreamFault(
                "redis_unavailable",
                f"the purges were published, but Redis failed while waiting for the edges: {exc}",
                purges=views,
            ) from exc
        return web.json_response(
            {
                "purges": views,
                "soft": wanted.soft,
                "edges_live": result.edges_live,
                "edges_applied": result.edges_applied,
                "edges_pending": list(result.edges_pending),
                "slowest_ms": result.slowest_ms,
                "complete": result.complete,
            }
        )

    return purge
