"""The edge's request flow as named stages, after Varnish's (``vcl_recv`` → ``vcl_hash`` →
lookup → ``vcl_hit`` / ``vcl_miss`` → fetch → ``vcl_backend_response`` → ``vcl_deliver``).

Each stage is a pure function over frozen values that takes the time as ``now`` and returns
the next step; the edge (``edge.app``) runs one loop that does the IO a step asks for and
ends in ``assert_never``. Nothing here knows the HTTP server, the client library, the cache's
storage or the clock, so the decisions are table-tested without sockets
(``tests/unit/test_edge_stages.py``) and a new transport drives the same flow.

The steps:

* :func:`recv`: the request line → :class:`Refuse`, :class:`Lookup` (GET/HEAD) or
  :class:`PassUnsafe` (every other method, forwarded uncached; RFC 9110 §9.1).
* :func:`hash_key`: the cache key of a target (the upstream's authority, never the client's
  ``Host``).
* :func:`hit_or_miss`: what was found, against the request's ``Cache-Control`` →
  :class:`Deliver` (a fresh hit, or stale-while-revalidate with ``refresh``),
  :class:`Refuse` (``only-if-cached``) or :class:`Fetch` (a miss or a revalidation).
* :func:`miss`: :class:`Bypass` while the URL is remembered as uncacheable (hit-for-miss),
  else :class:`Collapse` (fetch once for every request waiting on the key).
* :func:`backend_response`: what upstream answered → :class:`Refresh` (a matching 304),
  :class:`DropStale` (a 304 that does not match), :class:`UpstreamFailed` (5xx),
  :class:`Uncacheable` or :class:`Store` (with the metadata to store, and a Vary marker).
* :func:`deliver`: a stored response against the request's preconditions and ``Range`` →
  :class:`Send` (whole, or one range), :class:`NotModified`, :class:`Refuse` (412) or
  :class:`RangeRefused` (416).
* :func:`after_fetch`: the fetch's outcome → :class:`LookupAgain` (stored or refreshed),
  :class:`StreamPassed` (the leader streams an uncacheable answer), :class:`PassAgain` (a
  waiter fetches for itself), :class:`DeliverStale` (stale-if-error, or the edge's grace when
  upstream is unreachable) or :class:`AnswerError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from common.http import (
    ByteSpan,
    Unsatisfiable,
    evaluate_preconditions,
    parse_http_date,
    select_range,
)
from edge.cache import Hit, VariantLookup
from edge.entry import VARIANT_SEP, EntryMeta
from edge.keys import BadTarget, Target, normalise_target, primary_key, secondary_key
from edge.rfc9111 import (
    Headers,
    RequestControls,
    freshen_headers,
    get_all,
    get_one,
    headers_to_store,
    may_serve_stale_on_error,
    may_serve_stale_when_unreachable,
    reuse,
    storability,
    validator_matches,
    vary_names,
)

CONTROL_PREFIX = "/v1/"
"""The origin's control API (uploads, jobs, purges): never reachable through an edge."""
UNREACHABLE = frozenset({"refused", "timeout", "protocol", "shed"})
"""Details of a fetch that never got an answer from upstream (see ``edge.upstream``)."""
_NO_TUNNELS = frozenset({"CONNECT", "TRACE"})


# ---- the steps ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the client with an error from the edge itself."""

    status: int
    message: str
    allow: str | None = None
    """``Allow`` for a 405."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """A GET or HEAD: hash the target and look it up."""

    target: Target


@dataclass(frozen=True, slots=True)
class PassUnsafe:
    """Forward upstream uncached, and invalidate what the answer says changed (RFC 9111 §4.4)."""

    target: Target


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send a stored response; ``refresh``: revalidate it in the background afterwards."""

    hit: Hit
    cache_status: str
    refresh: bool = False


@dataclass(frozen=True, slots=True)
class Fetch:
    """Go upstream: a miss, or a revalidation of *stale* (conditional when it is whole)."""

    stale: Hit | None
    fwd: str
    """``Cache-Status``'s ``fwd`` parameter (RFC 9211): ``uri-miss``, ``vary-miss``,
    ``stale`` or ``request``."""


@dataclass(frozen=True, slots=True)
class Bypass:
    """The URL was uncacheable a moment ago: pass it upstream without collapsing."""


@dataclass(frozen=True, slots=True)
class Collapse:
    """Join the fetch already running for this key, or start it."""


@dataclass(frozen=True, slots=True)
class LookupAgain:
    """The fetch stored or refreshed the response: look it up and deliver it."""

    cache_status: str
    """Up to the ``ttl`` parameter, which the lookup adds."""


@dataclass(frozen=True, slots=True)
class StreamPassed:
    """The leader of an uncacheable fetch streams the upstream answer to its client."""

    detail: str


@dataclass(frozen=True, slots=True)
class PassAgain:
    """A waiter on an uncacheable (or other-variant) fetch fetches for itself."""


@dataclass(frozen=True, slots=True)
class DeliverStale:
    """Upstream failed: serve the stored response instead."""

    hit: Hit
    cache_status: str


@dataclass(frozen=True, slots=True)
class AnswerError:
    """Upstream failed and nothing may stand in: send its error (or the edge's)."""

    cache_status: str


RecvStep = Refuse | Lookup | PassUnsafe
HitStep = Deliver | Refuse | Fetch
MissStep = Bypass | Collapse
AfterFetchStep = LookupAgain | StreamPassed | PassAgain | DeliverStale | AnswerError


# ---- what a fetch came back with (the loop's summary of it) -------------------------------------


@dataclass(frozen=True, slots=True)
class FetchResult:
    """A fetch's outcome as :func:`after_fetch` needs it."""

    kind: Literal["stored", "refreshed", "passed", "error"]
    detail: str = ""
    """Why it passed, or what failed (``refused``, ``timeout``, ``upstream-5xx``, …)."""
    status: int = 0
    """The error's status, for ``kind="error"``."""
    streamable: bool = False
    """A passed answer is still unread, so its leader can stream it."""


# ---- the stages ---------------------------------------------------------------------------------


def proxied(path: str, prefixes: Sequence[str]) -> bool:
    """Does the edge proxy *path* (normalised)? Only under *prefixes*, never the origin's
    control API."""
    if path == CONTROL_PREFIX.rstrip("/") or path.startswith(CONTROL_PREFIX):
        return False
    return any(path.startswith(prefix) for prefix in prefixes)


def recv(
    method: str, version: tuple[int, int], raw_target: str, proxied_prefixes: Sequence[str]
) -> RecvStep:
    """vcl_recv: refuse what the edge never serves, else look up or pass."""
    if version < (1, 0):
        return Refuse(400, "HTTP/0.9 requests are not supported")
    try:
        target = normalise_target(raw_target)
    except BadTarget as exc:
        return Refuse(400, f"bad request target: {exc}")
    if not proxied(target.path, proxied_prefixes):
        return Refuse(404, f"{target.path} is not served through this edge")
    if method in ("GET", "HEAD"):
        return Lookup(target)
    if method in _NO_TUNNELS:
        # No tunnels through a reverse proxy; TRACE would echo students' headers (cookies,
        # tokens) to a script that can make one (cross-site tracing).
        return Refuse(405, f"method {method} is not allowed here", allow="GET, HEAD")
    # RFC 9110 §9.1: a proxy forwards methods it does not know (M-SEARCH, WebDAV, ...),
    # uncached, and treats them as unsafe (RFC 9111 §4.4 invalidation).
    return PassUnsafe(target)


def hash_key(host: str, target: Target) -> str:
    """vcl_hash: the primary cache key (see :func:`edge.keys.primary_key`)."""
    return primary_key(host, target)


def hit_or_miss(found: VariantLookup, controls: RequestControls, now: float) -> HitStep:
    """vcl_hit / vcl_miss: serve what is stored, or go upstream (RFC 9111 §4, RFC 5861)."""
    hit = found.hit
    if hit is not None and hit.meta.kind in ("full", "sliced"):
        freshness = hit.meta.freshness(now)
        decision = reuse(freshness, controls)
        if decision in ("fresh", "stale-while-revalidate"):
            return Deliver(
                hit,
                f"hit; ttl={int(freshness.ttl_s)}",
                refresh=decision == "stale-while-revalidate",
            )
        if controls.only_if_cached:
            return Refuse(504, "only-if-cached: the stored response is stale")
        return Fetch(hit, "request" if controls.no_cache else "stale")
    if controls.only_if_cached:
        return Refuse(504, "only-if-cached: nothing stored for this URL")
    return Fetch(None, "vary-miss" if found.url_known else "uri-miss")


def miss(pass_until: float | None, now: float) -> MissStep:
    """Hit-for-miss: a URL found uncacheable is passed, uncollapsed, until *pass_until*."""
    if pass_until is not None and pass_until > now:
        return Bypass()
    return Collapse()


def after_fetch(  # noqa: PLR0913 - keyword-only values the stage decides on
    result: FetchResult,
    *,
    stale: Hit | None,
    controls: RequestControls,
    fwd: str,
    leader: bool,
    now: float,
    grace_s: float,
) -> AfterFetchStep:
    """What the request does with its (possibly collapsed) fetch's outcome. *grace_s*: how
    stale a stored response may be served when upstream cannot be reached at all."""
    if result.kind in ("stored", "refreshed"):
        detail = "fwd-status=304" if result.kind == "refreshed" else "stored"
        return LookupAgain(f"fwd={fwd}; {detail}")
    if result.kind == "passed":
        if leader and result.streamable:
            return StreamPassed(result.detail)
        return PassAgain()
    if stale is not None:
        freshness = stale.meta.freshness(now)
        why = None
        if may_serve_stale_on_error(freshness, controls):
            why = "stale-if-error"
        elif result.detail in UNREACHABLE and may_serve_stale_when_unreachable(freshness, grace_s):
            why = "stale-if-unreachable"
        if why is not None:
            return DeliverStale(stale, f"fwd={fwd}; fwd-status={result.status}; detail={why}")
    detail = re.sub(r"[^A-Za-z0-9-]", "-", result.detail)[:40]
    return AnswerError(f"fwd={fwd}; fwd-status={result.status}; detail={detail}")


# ---- backend_response ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendResponse:
    """What arrived from upstream, without its body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    request_time: float
    response_time: float


@dataclass(frozen=True, slots=True)
class Refresh:
    """A 304 that matches the stored response: store *meta* (freshened) in its place."""

    key: str
    meta: EntryMeta


@dataclass(frozen=True, slots=True)
class DropStale:
    """A 304 whose validators do not match what is stored: drop that, and pass."""

    key: str


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """A 5xx: read its (small) body and answer it, or stale where allowed."""


@dataclass(frozen=True, slots=True)
class Uncacheable:
    """Pass the answer to the client; remember the URL as uncacheable for a while
    (hit-for-miss) when *remember*."""

    reason: str
    remember: bool = True


@dataclass(frozen=True, slots=True)
class Store:
    """Store the body under *key* with *meta*; first a Vary marker under the URL key, when
    there is one. *total*: the object's whole size when this is its first slice (a 206)."""

    key: str
    meta: EntryMeta
    marker: EntryMeta | None
    total: int | None


BackendStep = Refresh | DropStale | UpstreamFailed | Uncacheable | Store

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def content_range(value: str | None) -> tuple[int, int, int] | None:
    """``Content-Range: bytes first-last/total`` (RFC 9110 §14.4), or ``None`` if invalid."""
    if value is None:
        return None
    match = _CONTENT_RANGE_RE.match(value.strip())
    if match is None:
        return None
    first, last, total = (int(group) for group in match.groups())
    if last < first or last >= total:
        return None
    return first, last, total


def backend_response(
    response: BackendResponse,
    *,
    key: str,
    stale: Hit | None,
    request_headers: Headers,
    purged_meanwhile: bool,
) -> BackendStep:
    """vcl_backend_response: what to do with an upstream answer for cache key *key*, fetched
    to revalidate *stale* (or on a miss). *purged_meanwhile*: a purge was applied while the
    answer was on its way, so it may have been meant for it (keep it, but revalidate before
    serving it as fresh)."""
    if response.status == 304 and stale is not None:
        if not validator_matches(stale.meta.headers, response.headers):
            return DropStale(stale.key)
        meta = stale.meta.with_headers(
            freshen_headers(stale.meta.headers, response.headers),
            request_time=response.request_time,
            response_time=response.response_time,
        )
        return Refresh(stale.key, meta)
    if response.status >= 500:
        return UpstreamFailed()
    status, headers, total = _first_slice(response)
    if status is None:
        return Uncacheable("bad-content-range", remember=False)
    reason = storability(
        method="GET",
        status=status if total is None else 200,
        request_headers=request_headers,
        response_headers=headers,
    )
    if reason is not None:
        return Uncacheable(f"uncacheable-{reason}")
    stored_headers = tuple(headers_to_store(headers))
    vary = vary_names(stored_headers)
    tags = tuple(tag for value in get_all(stored_headers, "surrogate-key") for tag in value.split())
    store_key, marker = key, None
    if vary:
        marker = EntryMeta(
            kind="vary", vary=vary, url_key=key, response_time=response.response_time
        )
        store_key = key + VARIANT_SEP + secondary_key(vary, request_headers)
    elif stale is not None and stale.key != key:
        store_key = stale.key
    meta = EntryMeta(
        kind="full",
        status=status,
        headers=stored_headers,
        request_time=response.request_time,
        response_time=response.response_time,
        vary=vary,
        tags=tags,
        url_key=key,
        etag=get_one(stored_headers, "etag"),
        soft_purged=purged_meanwhile,
    )
    return Store(store_key, meta, marker, total)


def _first_slice(
    response: BackendResponse,
) -> tuple[int | None, tuple[tuple[str, str], ...], int | None]:
    """``(status, headers, total)``: a 206 that holds the whole object is a 200 with its
    length; one that starts a larger object keeps its total; an invalid one has status
    ``None``."""
    status, headers = response.status, response.headers
    if status != 206:
        return status, headers, None
    parsed = content_range(get_one(headers, "content-range"))
    if parsed is None or parsed[0] != 0:
        return None, headers, None
    _, last, total = parsed
    if last != total - 1:
        return status, headers, total
    whole = tuple(
        (k, v) for k, v in headers if k.lower() not in ("content-range", "content-length")
    )
    return 200, (*whole, ("Content-Length", str(total))), None


# ---- deliver ----------------------------------------------------------------------------------

CONDITIONALS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since")


@dataclass(frozen=True, slots=True)
class Send:
    """Send *length* bytes of the stored body from *start*, with *status*; a 206 carries
    *content_range*."""

    status: int
    start: int
    length: int
    content_range: str | None = None


@dataclass(frozen=True, slots=True)
class NotModified:
    """Answer 304: the client's copy is current."""


@dataclass(frozen=True, slots=True)
class RangeRefused:
    """Answer 416 with ``Content-Range: bytes */size``."""

    size: int
    reason: str


DeliverStep = Send | NotModified | Refuse | RangeRefused


def deliver(meta: EntryMeta, method: str, request_headers: Mapping[str, str]) -> DeliverStep:  # noqa: PLR0911 - one return per deliver step
    """vcl_deliver: the whole stored response, a 304 or 412 for the request's preconditions
    (RFC 9110 §13.2.2), one byte range or a 416 (§14). *request_headers* is looked up case-
    insensitively. A stored response without an ``ETag`` never matches ``If-None-Match`` or
    ``If-Match``; one without ``Last-Modified`` was last modified when it was received."""
    size = meta.total_bytes if meta.kind == "sliced" else meta.body_bytes
    if meta.status != 200:
        return Send(meta.status, 0, size)
    conditional = any(name in request_headers for name in CONDITIONALS)
    if not conditional and "Range" not in request_headers:
        return Send(200, 0, size)
    etag = meta.header("etag")
    last_modified = parse_http_date(meta.header("last-modified")) or datetime.fromtimestamp(
        meta.response_time, UTC
    )
    if conditional:
        precondition = evaluate_preconditions(
            method, request_headers, etag=etag or '"-"', last_modified=last_modified
        )
        if etag is None and any(h in request_headers for h in ("If-None-Match", "If-Match")):
            precondition = "proceed" if "If-Match" not in request_headers else "failed"
        if precondition == "not-modified":
            return NotModified()
        if precondition == "failed":
            return Refuse(412, "a precondition in the request did not hold")
    decision = select_range(
        request_headers.get("Range"),
        size_bytes=size,
        if_range=request_headers.get("If-Range"),
        etag=etag or '"-"',
        last_modified=last_modified,
    )
    if isinstance(decision, Unsatisfiable):
        return RangeRefused(size, decision.reason)
    if isinstance(decision, ByteSpan):
        return Send(206, decision.start, decision.length, decision.content_range(size))
    return Send(200, 0, size)
