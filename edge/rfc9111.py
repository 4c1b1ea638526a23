"""HTTP caching rules for a shared cache (RFC 9111, with RFC 9213 and RFC 5861). Pure.

Nothing here does IO or reads a clock: times are ``float`` seconds since the epoch passed in
by the caller. Headers are ``Sequence[tuple[str, str]]`` in wire order (names in any case), so
repeated fields are kept as the RFCs require.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from http_sfv.dictionary import Dictionary as SfvDictionary
from http_sfv.item import Item as SfvItem

from common.http import parse_http_date

Headers = Sequence[tuple[str, str]]

MAX_DELTA_SECONDS = 2_147_483_648
"""RFC 9111 §1.2.2: larger delta-seconds are taken as this."""

HEURISTIC_FRACTION = 0.1
HEURISTIC_MAX_S = 86_400
"""RFC 9111 §4.2.2: a typical heuristic is 10% of the time since Last-Modified; we cap it at a
day so an ancient file is still revalidated daily."""

HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
"""RFC 9110 §15.1: status codes cacheable by default."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "trailer",
    }
)
"""RFC 9110 §7.6.1 connection-specific fields: never stored, never forwarded."""

EDGE_ONLY = frozenset({"surrogate-key", "cdn-cache-control", "surrogate-control"})
"""Fields meant for this CDN (RFC 9213; cache tags): recorded, stripped before clients."""


# ---- header helpers ---------------------------------------------------------------------------


def get_all(headers: Headers, name: str) -> list[str]:
    lowered = name.lower()
    return [value for key, value in headers if key.lower() == lowered]


def get_one(headers: Headers, name: str) -> str | None:
    values = get_all(headers, name)
    return values[0] if values else None


def split_list(values: Iterable[str]) -> list[str]:
    """An RFC 9110 §5.6.1 list across several field lines: ``a, b`` + ``c`` → [a, b, c]."""
    items: list[str] = []
    for value in values:
        items.extend(item.strip() for item in _split_outside_quotes(value) if item.strip())
    return items


def _split_outside_quotes(value: str) -> list[str]:
    parts, current, quoted, escaped = [], [], False, False
    for char in value:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            current.append(char)
            escaped = True
        elif char == '"':
            quoted = not quoted
            current.append(char)
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def connection_named(headers: Headers) -> set[str]:
    """Field names listed in ``Connection`` (hop-by-hop by declaration)."""
    return {name.lower() for name in split_list(get_all(headers, "connection"))}


def strip_hop_by_hop(headers: Headers) -> list[tuple[str, str]]:
    drop = HOP_BY_HOP | connection_named(headers)
    return [(key, value) for key, value in headers if key.lower() not in drop]


def http_date_seconds(value: str | None) -> float | None:
    """An HTTP-date as a Unix time, or ``None`` when absent or invalid (the parsing is
    :func:`common.http.parse_http_date`'s)."""
    parsed = parse_http_date(value)
    return None if parsed is None else parsed.timestamp()


# ---- Cache-Control ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Directives:
    """Parsed Cache-Control (or CDN-Cache-Control) directives. The first occurrence of a
    directive wins (RFC 9111 §4.2.1). Names are lowercase; values unquoted; ``None`` for a
    directive without a value."""

    items: Mapping[str, str | None]

    def has(self, name: str) -> bool:
        return name in self.items

    def seconds(self, name: str) -> int | None:
        """A delta-seconds directive; an unparseable value counts as 0 (treat as stale)."""
        if name not in self.items:
            return None
        return delta_seconds(self.items[name])

    def field_names(self, name: str) -> frozenset[str] | None:
        """For ``no-cache="a, b"`` / ``private="a"``: the lowercase field names, or ``None``
        when the directive is absent or unqualified."""
        raw = self.items.get(name)
        if name not in self.items or raw is None:
            return None
        return frozenset(part.strip().lower() for part in raw.split(",") if part.strip())

    def __bool__(self) -> bool:
        return bool(self.items)


_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def delta_seconds(raw: str | None) -> int:
    """RFC 9111 §1.2.2 delta-seconds: ASCII digits only (anything else counts as 0, i.e.
    stale), capped at 2^31 however many digits arrive."""
    if raw is None or not raw.isascii() or not raw.isdigit():
        return 0
    significant = raw.lstrip("0") or "0"
    return MAX_DELTA_SECONDS if len(significant) > 10 else min(int(significant), MAX_DELTA_SECONDS)


def parse_directives(values: Iterable[str]) -> Directives:
    items: dict[str, str | None] = {}
    for item in split_list(values):
        name, sep, raw = item.partition("=")
        name = name.strip().lower()
        if not name or not _TOKEN_RE.match(name):
            continue
        value: str | None = None
        if sep:
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            value = raw
        items.setdefault(name, value)
    return Directives(items)


@dataclass(frozen=True, slots=True)
class ResponseControls:
    """The directives that govern this edge: ``CDN-Cache-Control`` when present (RFC 9213
    §2.1: it replaces Cache-Control for the CDN), else ``Cache-Control``."""

    directives: Directives
    from_cdn_header: bool


_DELTA_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})
_FIELD_LIST_DIRECTIVES = frozenset({"no-cache", "private"})


def parse_cdn_directives(values: Sequence[str]) -> Directives | None:
    """``CDN-Cache-Control`` (RFC 9213 §2.1): a structured-field Dictionary (RFC 8941), parsed
    by http-sfv. ``None`` when the field is absent or is not a valid Dictionary: then the whole
    field is ignored and Cache-Control governs (§2.2). A directive whose value has the wrong
    type (``max-age=1.5``, ``max-age="60"``, ``no-store=?0``, an inner list) is not consumed
    (§2.1), rather than read the way a lenient Cache-Control parser would."""
    if not values:
        return None
    field = SfvDictionary()
    try:
        field.parse(", ".join(values).encode("latin-1"))
    except (ValueError, UnicodeEncodeError):
        return None
    items: dict[str, str | None] = {}
    for name, member in field.items():
        if not isinstance(member, SfvItem):
            continue  # an inner list: no cache directive takes one
        value = member.value
        if name in _DELTA_DIRECTIVES:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                items[name] = str(min(value, MAX_DELTA_SECONDS))
        elif value is True:
            items[name] = None
        elif name in _FIELD_LIST_DIRECTIVES and isinstance(value, str):
            items[name] = value
    return Directives(items) if field else None


def response_controls(headers: Headers) -> ResponseControls:
    cdn = parse_cdn_directives(get_all(headers, "cdn-cache-control"))
    if cdn is not None:
        return ResponseControls(cdn, True)
    return ResponseControls(parse_directives(get_all(headers, "cache-control")), False)


# ---- storability (RFC 9111 §3) -----------------------------------------------------------------

NotStorableReason = Literal[
    "method",
    "status",
    "no-store",
    "private",
    "authorization",
    "vary-star",
    "no-freshness",
    "set-cookie",
    "partial",
]


def storability(  # noqa: C901, PLR0911 - one return per RFC 9111 §3 reason a response is not stored
    *,
    method: str,
    status: int,
    request_headers: Headers,
    response_headers: Headers,
) -> NotStorableReason | None:
    """``None`` when a shared cache may store the response, else why not.

    Beyond RFC 9111 we refuse responses carrying ``Set-Cookie`` unless the origin opted in
    explicitly (``public`` or a CDN-Cache-Control header): a cached session cookie handed to
    the next student is the worst failure a school CDN can have.
    """
    if method not in ("GET", "HEAD"):
        return "method"
    if status == 206:
        return "partial"
    controls = response_controls(response_headers)
    directives = controls.directives
    request_cc = parse_directives(get_all(request_headers, "cache-control"))
    if request_cc.has("no-store") or directives.has("no-store"):
        return "no-store"
    if directives.has("private") and directives.field_names("private") is None:
        return "private"
    if "*" in vary_names(response_headers):
        return "vary-star"
    if get_one(request_headers, "authorization") is not None and not (
        directives.has("public") or directives.has("s-maxage") or directives.has("must-revalidate")
    ):
        return "authorization"
    explicit = (
        directives.has("s-maxage")
        or directives.has("max-age")
        or (not controls.from_cdn_header and get_one(response_headers, "expires") is not None)
    )
    heuristic_ok = status in HEURISTICALLY_CACHEABLE or directives.has("public")
    if not explicit:
        if not heuristic_ok:
            return "status" if status not in HEURISTICALLY_CACHEABLE else "no-freshness"
        if get_one(response_headers, "last-modified") is None:
            return "no-freshness"
    if get_one(response_headers, "set-cookie") is not None and not (
        directives.has("public") or controls.from_cdn_header
    ):
        return "set-cookie"
    return None


def headers_to_store(response_headers: Headers) -> list[tuple[str, str]]:
    """Strip connection-specific fields and the fields that ``private="…"`` or
    ``no-cache="…"`` name (RFC 9111 §5.2.2.4, §5.2.2.7: those may not be reused without
    revalidation, so we do not keep them)."""
    directives = response_controls(response_headers).directives
    drop: set[str] = set()
    for name in ("private", "no-cache"):
        drop |= directives.field_names(name) or set()
    kept = strip_hop_by_hop(response_headers)
    return [(key, value) for key, value in kept if key.lower() not in drop]


# ---- freshness and age (RFC 9111 §4.2) ----------------------------------------------------------


def freshness_lifetime_s(
    response_headers: Headers, *, status: int, response_time: float
) -> tuple[float, bool]:
    """(freshness lifetime in seconds, whether it is heuristic). §4.2.1 order: s-maxage,
    max-age, Expires - Date; then a heuristic from Last-Modified where §4.2.2 allows."""
    controls = response_controls(response_headers)
    directives = controls.directives
    s_maxage = directives.seconds("s-maxage")
    if s_maxage is not None:
        return float(s_maxage), False
    max_age = directives.seconds("max-age")
    if max_age is not None:
        return float(max_age), False
    if not controls.from_cdn_header:
        expires_values = get_all(response_headers, "expires")
        if expires_values:
            expires = http_date_seconds(expires_values[0])
            if expires is None:
                return 0.0, False  # an invalid Expires means already expired (§5.3)
            date = http_date_seconds(get_one(response_headers, "date")) or response_time
            return max(0.0, expires - date), False
    if status in HEURISTICALLY_CACHEABLE or directives.has("public"):
        last_modified = http_date_seconds(get_one(response_headers, "last-modified"))
        if last_modified is not None:
            date = http_date_seconds(get_one(response_headers, "date")) or response_time
            return min(max(0.0, (date - last_modified) * HEURISTIC_FRACTION), HEURISTIC_MAX_S), True
    return 0.0, False


def age_seconds(values: Sequence[str]) -> int:
    """The ``Age`` field (RFC 9111 §5.1): the first member of a list-based value (``7200, 0``
    is 7200), the others discarded; an invalid value means the response is stale (the largest
    age), never fresh; absent, 0."""
    members = split_list(values)
    if not members:
        return 0
    first = members[0]
    if not first.isascii() or not first.isdigit():
        return MAX_DELTA_SECONDS
    return delta_seconds(first)


def initial_age_s(response_headers: Headers, *, request_time: float, response_time: float) -> float:
    """``corrected_initial_age`` of RFC 9111 §4.2.3."""
    date = http_date_seconds(get_one(response_headers, "date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    age_value = age_seconds(get_all(response_headers, "age"))
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)


def current_age_s(initial_age: float, *, response_time: float, now: float) -> float:
    """``current_age`` of RFC 9111 §4.2.3: initial age plus time resident here."""
    return initial_age + max(0.0, now - response_time)


# ---- reuse (RFC 9111 §4, §4.2.4, RFC 5861) ------------------------------------------------------

Reuse = Literal["fresh", "stale-while-revalidate", "must-validate", "stale-if-error-only"]


@dataclass(frozen=True, slots=True)
class RequestControls:
    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None
    min_fresh: int | None = None
    max_stale: int | None = None
    """``max-stale`` without a value is :data:`MAX_DELTA_SECONDS` (any staleness)."""
    only_if_cached: bool = False


def request_controls(request_headers: Headers) -> RequestControls:
    directives = parse_directives(get_all(request_headers, "cache-control"))
    no_cache = directives.has("no-cache")
    if not directives and "no-cache" in (get_one(request_headers, "pragma") or "").lower():
        no_cache = True  # RFC 9111 §5.4: Pragma only when Cache-Control is absent
    max_stale: int | None = None
    if directives.has("max-stale"):
        max_stale = (
            MAX_DELTA_SECONDS
            if directives.items["max-stale"] is None
            else directives.seconds("max-stale")
        )
    return RequestControls(
        no_cache=no_cache,
        no_store=directives.has("no-store"),
        max_age=directives.seconds("max-age"),
        min_fresh=directives.seconds("min-fresh"),
        max_stale=max_stale,
        only_if_cached=directives.has("only-if-cached"),
    )


@dataclass(frozen=True, slots=True)
class Freshness:
    """What the cache knows about one stored response at one moment."""

    lifetime_s: float
    age_s: float
    stale_while_revalidate_s: float
    stale_if_error_s: float
    must_revalidate: bool
    """``must-revalidate`` or ``proxy-revalidate`` (or ``s-maxage``, §5.2.2.10): never serve
    stale, not even on errors."""
    no_cache: bool
    """Unqualified ``no-cache``: validate every time."""
    soft_purged: bool = False

    @property
    def staleness_s(self) -> float:
        return self.age_s - self.lifetime_s

    @property
    def ttl_s(self) -> float:
        """Remaining freshness (RFC 9211 ``ttl``): negative once stale, and at most 0 once
        soft-purged (the purge ended its freshness)."""
        remaining = self.lifetime_s - self.age_s
        return min(remaining, 0.0) if self.soft_purged else remaining


@dataclass(frozen=True, slots=True)
class FreshnessBasis:
    """Everything about a stored response's freshness that does not depend on the clock:
    computed once per stored response, so a hit does not re-parse its headers."""

    lifetime_s: float
    initial_age_s: float
    response_time: float
    stale_while_revalidate_s: float
    stale_if_error_s: float
    must_revalidate: bool
    no_cache: bool

    def at(self, now: float, *, soft_purged: bool = False) -> Freshness:
        return Freshness(
            lifetime_s=self.lifetime_s,
            age_s=current_age_s(self.initial_age_s, response_time=self.response_time, now=now),
            stale_while_revalidate_s=self.stale_while_revalidate_s,
            stale_if_error_s=self.stale_if_error_s,
            must_revalidate=self.must_revalidate,
            no_cache=self.no_cache,
            soft_purged=soft_purged,
        )


def freshness_basis(
    response_headers: Headers, *, status: int, request_time: float, response_time: float
) -> FreshnessBasis:
    directives = response_controls(response_headers).directives
    lifetime, _ = freshness_lifetime_s(response_headers, status=status, response_time=response_time)
    return FreshnessBasis(
        lifetime_s=lifetime,
        initial_age_s=initial_age_s(
            response_headers, request_time=request_time, response_time=response_time
        ),
        response_time=response_time,
        stale_while_revalidate_s=float(directives.seconds("stale-while-revalidate") or 0),
        stale_if_error_s=float(directives.seconds("stale-if-error") or 0),
        must_revalidate=directives.has("must-revalidate")
        or directives.has("proxy-revalidate")
        or directives.has("s-maxage"),
        no_cache=directives.has("no-cache") and directives.field_names("no-cache") is None,
    )


def freshness_of(
    response_headers: Headers,
    *,
    status: int,
    request_time: float,
    response_time: float,
    now: float,
    soft_purged: bool = False,
) -> Freshness:
    basis = freshness_basis(
        response_headers, status=status, request_time=request_time, response_time=response_time
    )
    return basis.at(now, soft_purged=soft_purged)


def reuse(freshness: Freshness, request: RequestControls) -> Reuse:  # noqa: PLR0911 - one return per RFC 9111 §4.2.4 / RFC 5861 outcome
    """May a stored response answer this request, and how (RFC 9111 §4, §4.2.4; RFC 5861)?

    * ``fresh`` — serve it;
    * ``stale-while-revalidate`` — serve it now and revalidate in the background;
    * ``must-validate`` — ask upstream (conditionally) before serving;
    * ``stale-if-error-only`` — ask upstream; serve this only if upstream fails.
    """
    if freshness.no_cache or request.no_cache:
        return "must-validate"
    if request.max_age is not None and freshness.age_s > request.max_age:
        return "must-validate"
    fresh = freshness.ttl_s > 0 and not freshness.soft_purged
    if fresh and request.min_fresh is not None and freshness.ttl_s < request.min_fresh:
        return "must-validate"
    if fresh:
        return "fresh"
    if freshness.must_revalidate:
        return "must-validate"
    if freshness.soft_purged:
        # A soft purge ends the object's use until it is revalidated (a 304 keeps it cheap):
        # served stale, the first student after a publish would get the old version. Only an
        # upstream failure may still bring it out (stale-if-error).
        return "stale-if-error-only"
    staleness = max(0.0, freshness.staleness_s)
    if request.max_stale is not None and staleness <= request.max_stale:
        return "fresh"
    if staleness <= freshness.stale_while_revalidate_s:
        return "stale-while-revalidate"
    return "must-validate"


def may_serve_stale_on_error(freshness: Freshness, request: RequestControls) -> bool:
    """RFC 5861 §4 ``stale-if-error`` (response or request), never past ``must-revalidate``."""
    if freshness.must_revalidate or freshness.no_cache:
        return False
    staleness = max(0.0, freshness.staleness_s)
    allowance = max(freshness.stale_if_error_s, float(request.max_stale or 0))
    return staleness <= allowance


def may_serve_stale_when_unreachable(freshness: Freshness, grace_s: float) -> bool:
    """The edge's own grace (Varnish's grace, a CDN's always-online): when upstream cannot be
    reached at all (refused, timed out, the connection dropped), a stored response up to
    *grace_s* stale is better than an error for a student, even without ``stale-if-error``;
    never past ``must-revalidate`` or ``no-cache``. Upstream 5xx answers are not covered: the
    origin spoke, and ``stale-if-error`` says whether it allows that."""
    if freshness.must_revalidate or freshness.no_cache:
        return False
    return max(0.0, freshness.staleness_s) <= grace_s


# ---- validation (RFC 9111 §4.3) ----------------------------------------------------------------


def conditional_headers(stored_headers: Headers) -> list[tuple[str, str]]:
    """The validators to send when revalidating a stored response (§4.3.1)."""
    conditions = []
    etag = get_one(stored_headers, "etag")
    if etag:
        conditions.append(("If-None-Match", etag))
    last_modified = get_one(stored_headers, "last-modified")
    if last_modified:
        conditions.append(("If-Modified-Since", last_modified))
    return conditions


_NOT_UPDATED_BY_304 = frozenset({"content-length", "content-encoding", "content-range"})


def freshen_headers(stored: Headers, not_modified: Headers) -> list[tuple[str, str]]:
    """RFC 9111 §4.3.4: replace stored fields with those in the 304 (except those describing
    the stored content itself), keep the rest."""
    incoming = strip_hop_by_hop(not_modified)
    replaced = {key.lower() for key, _ in incoming} - _NOT_UPDATED_BY_304
    kept = [(key, value) for key, value in stored if key.lower() not in replaced]
    return kept + [(key, value) for key, value in incoming if key.lower() in replaced]


def validator_matches(stored: Headers, not_modified: Headers) -> bool:
    """§4.3.4: a 304 freshens the stored response it selects; with a strong ETag in the 304
    it must be the stored one."""
    new_etag = get_one(not_modified, "etag")
    if new_etag is None:
        return True
    old_etag = get_one(stored, "etag")
    return old_etag is not None and old_etag.removeprefix("W/") == new_etag.removeprefix("W/")


# ---- Vary (RFC 9111 §4.1) -----------------------------------------------------------------------


def vary_names(response_headers: Headers) -> tuple[str, ...]:
    """Normalised (lowercase, deduplicated, sorted) field names across all Vary lines. A
    member that is not a field name (RFC 9110 §12.5.5: ``#( "*" / field-name )``) counts as
    ``*``: nothing tells which requests the response may be reused for, so it is not."""
    names = {
        name.lower() if name == "*" or _TOKEN_RE.match(name) else "*"
        for name in split_list(get_all(response_headers, "vary"))
    }
    return tuple(sorted(names))


def unsafe_invalidations(
    *, method: str, status: int, request_url: str, response_headers: Headers
) -> list[str]:
    """RFC 9111 §4.4: after a non-error response to an unsafe method, the target URL and the
    same-origin ``Location`` / ``Content-Location`` URLs are invalidated. Returns the URLs
    (possibly relative) to invalidate; the caller resolves and same-origin-checks them."""
    if method in ("GET", "HEAD", "OPTIONS", "TRACE") or not 200 <= status < 400:
        return []
    urls = [request_url]
    for name in ("location", "content-location"):
        value = get_one(response_headers, name)
        if value:
            urls.append(value)
    return urls
