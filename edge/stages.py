"""The edge's request flow as named stages, after Varnish's (``vcl_recv`` → ``vcl_hash`` →
lookup → ``vcl_hit`` / ``vcl_miss`` → fetch → ``vcl_backend_response`` → ``vcl_deliver``).

Each stage is a pure function over frozen values that takes the time as ``now`` and returns
the next step; the edge (``edge.app``) runs one loop that does the IO a step asks for and
ends in ``assert_never``. Nothing here knows the HTTP server, the client library, the cache's
storage or the clock, so the decisions are table-tested without sockets
(``tests/test_edge_stages.py``) and a new transport drives the same flow.

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
* :func:`after_fetch`: the fetch's outcome → :class:`LookupAgain` (stored or refreshed),
  :class:`StreamPassed` (the leader streams an uncacheable answer), :class:`PassAgain` (a
  waiter fetches for itself), :class:`DeliverStale` (stale-if-error, or the edge's grace when
  upstream is unreachable) or :class:`AnswerError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from edge.cache import Hit, VariantLookup
from edge.keys import BadTarget, Target, normalise_target, primary_key
from edge.rfc9111 import (
    RequestControls,
    may_serve_stale_on_error,
    may_serve_stale_when_unreachable,
    reuse,
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


def after_fetch(
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
