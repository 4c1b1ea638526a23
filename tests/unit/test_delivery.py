"""HTTP delivery semantics: preconditions, byte ranges, cache headers and cache rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from common.http import (
    ByteSpan,
    RangeDecision,
    Unsatisfiable,
    WholeBody,
    evaluate_preconditions,
    format_http_date,
    parse_etag_list,
    parse_http_date,
    select_range,
)
from origin.delivery import CachePolicy, RuleMatcher, cache_headers

ETAG = '"5df6e0e2761359d30a82"'
# Stored timestamps carry microseconds; HTTP dates have whole seconds.
LAST_MODIFIED = datetime(2024, 3, 5, 10, 20, 30, 654_321, tzinfo=UTC)
LM_HTTP = "Tue, 05 Mar 2024 10:20:30 GMT"
EARLIER = "Mon, 04 Mar 2024 10:20:30 GMT"
LATER = "Wed, 06 Mar 2024 10:20:30 GMT"
SIZE = 1000

UNSATISFIABLE = Unsatisfiable  # marker in the tables: any Unsatisfiable, whatever the reason


def check_range(decision: RangeDecision, expected: RangeDecision | type[Unsatisfiable]) -> None:
    if expected is Unsatisfiable:
        assert isinstance(decision, Unsatisfiable), decision
        assert decision.reason
    else:
        assert decision == expected


# ---- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "expected"),
    [
        pytest.param(None, WholeBody(), id="no-range"),
        pytest.param("bytes=0-0", ByteSpan(0, 0), id="first-byte"),
        pytest.param("bytes=0-", ByteSpan(0, 999), id="open-ended"),
        pytest.param("bytes=200-299", ByteSpan(200, 299), id="middle"),
        pytest.param("bytes=999-999", ByteSpan(999, 999), id="last-byte"),
        pytest.param("bytes=-500", ByteSpan(500, 999), id="suffix"),
        pytest.param("bytes=-1", ByteSpan(999, 999), id="suffix-one"),
        pytest.param("bytes=-5000", ByteSpan(0, 999), id="suffix-longer-than-file"),
        pytest.param("bytes=900-5000", ByteSpan(900, 999), id="last-past-end-clamps"),
        pytest.param("bytes=0-1,", ByteSpan(0, 1), id="trailing-comma"),
        pytest.param("BYTES=0-9", ByteSpan(0, 9), id="unit-case-insensitive"),
        pytest.param("bytes= 5 - 9 ", ByteSpan(5, 9), id="spaces"),
        pytest.param("bytes=100-50", UNSATISFIABLE, id="last-before-first"),
        pytest.param("bytes=1000-", UNSATISFIABLE, id="start-at-end"),
        pytest.param("bytes=5000-6000", UNSATISFIABLE, id="start-past-end"),
        pytest.param("bytes=-0", UNSATISFIABLE, id="empty-suffix"),
        pytest.param("bytes=abc", UNSATISFIABLE, id="malformed-abc"),
        pytest.param("bytes=", UNSATISFIABLE, id="malformed-empty"),
        pytest.param("bytes=-", UNSATISFIABLE, id="malformed-dash"),
        pytest.param("bytes=1-2-3", UNSATISFIABLE, id="malformed-two-dashes"),
        pytest.param("items=0-1", WholeBody(), id="unknown-unit"),
        pytest.param("0-1", WholeBody(), id="no-unit"),
        pytest.param("bytes=0-1,5-9", WholeBody(), id="multiple-ranges"),
        pytest.param("bytes=0-1, -5", WholeBody(), id="multiple-with-suffix"),
    ],
)
def test_select_range(
    range_header: str | None, expected: RangeDecision | type[Unsatisfiable]
) -> None:
    decision = select_range(range_header, size_bytes=SIZE, etag=ETAG, last_modified=LAST_MODIFIED)
    check_range(decision, expected)


@pytest.mark.parametrize(
    ("if_range", "expected"),
    [
        pytest.param(None, ByteSpan(0, 9), id="absent"),
        pytest.param(ETAG, ByteSpan(0, 9), id="same-strong-etag"),
        pytest.param(f" {ETAG} ", ByteSpan(0, 9), id="same-etag-spaces"),
        pytest.param('"another-version"', WholeBody(), id="different-etag"),
        pytest.param(f"W/{ETAG}", WholeBody(), id="weak-etag-never-matches"),
        pytest.param(LM_HTTP, ByteSpan(0, 9), id="exact-last-modified"),
        pytest.param(EARLIER, WholeBody(), id="earlier-date"),
        pytest.param(LATER, WholeBody(), id="later-date"),
        pytest.param("Tue, 05 Mar 2024 10:20:31 GMT", WholeBody(), id="one-second-off"),
        pytest.param("yesterday", WholeBody(), id="garbage"),
    ],
)
def test_if_range(if_range: str | None, expected: RangeDecision) -> None:
    decision = select_range(
        "bytes=0-9",
        size_bytes=SIZE,
        if_range=if_range,
        etag=ETAG,
        last_modified=LAST_MODIFIED,
    )
    assert decision == expected


def test_if_range_without_range_is_whole_body() -> None:
    decision = select_range(
        None, size_bytes=SIZE, if_range=ETAG, etag=ETAG, last_modified=LAST_MODIFIED
    )
    assert decision == WholeBody()


@pytest.mark.parametrize(
    ("range_header", "expected"),
    [
        (None, WholeBody()),
        ("bytes=0-", UNSATISFIABLE),
        ("bytes=0-0", UNSATISFIABLE),
        ("bytes=-1", UNSATISFIABLE),
        ("bytes=-500", UNSATISFIABLE),
        ("items=0-1", WholeBody()),
    ],
)
def test_zero_length_representation_never_gets_a_byte_span(
    range_header: str | None, expected: RangeDecision | type[Unsatisfiable]
) -> None:
    decision = select_range(range_header, size_bytes=0, etag=ETAG, last_modified=LAST_MODIFIED)
    check_range(decision, expected)


@pytest.mark.parametrize(
    ("range_header", "size", "fragment"),
    [
        ("bytes=abc", SIZE, "malformed"),
        ("bytes=", SIZE, "malformed"),
        ("bytes=100-50", SIZE, "last byte before first"),
        ("bytes=-0", SIZE, "selects no bytes"),
        ("bytes=1000-", SIZE, "past the end"),
        ("bytes=1000-2000", SIZE, "past the end"),
        # The 416 body explains a well-formed request for an empty file as such, not as
        # "malformed ... last byte before first".
        ("bytes=0-", 0, "past the end"),
    ],
)
def test_unsatisfiable_reason_says_why(range_header: str, size: int, fragment: str) -> None:
    decision = select_range(range_header, size_bytes=size, etag=ETAG, last_modified=LAST_MODIFIED)
    assert isinstance(decision, Unsatisfiable)
    assert fragment in decision.reason
    assert range_header in decision.reason


@pytest.mark.parametrize(
    ("span", "size", "content_range", "length"),
    [
        (ByteSpan(0, 0), 1000, "bytes 0-0/1000", 1),
        (ByteSpan(500, 999), 1000, "bytes 500-999/1000", 500),
        (ByteSpan(0, 8_388_607), 9_000_000_000, "bytes 0-8388607/9000000000", 8_388_608),
    ],
)
def test_byte_span_content_range(
    span: ByteSpan, size: int, content_range: str, length: int
) -> None:
    assert span.content_range(size) == content_range
    assert span.length == length


# ---- preconditions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        pytest.param("GET", {}, "proceed", id="no-conditions"),
        # If-None-Match (weak comparison)
        pytest.param("GET", {"If-None-Match": ETAG}, "not-modified", id="inm-exact"),
        pytest.param("HEAD", {"If-None-Match": ETAG}, "not-modified", id="inm-head"),
        pytest.param("GET", {"If-None-Match": f"W/{ETAG}"}, "not-modified", id="inm-weak"),
        pytest.param(
            "GET", {"If-None-Match": f'"old", W/"older", {ETAG}'}, "not-modified", id="inm-list"
        ),
        pytest.param("GET", {"If-None-Match": "*"}, "not-modified", id="inm-star"),
        pytest.param("GET", {"If-None-Match": '"old", W/"older"'}, "proceed", id="inm-no-match"),
        pytest.param("GET", {"If-None-Match": ETAG.strip('"')}, "proceed", id="inm-unquoted"),
        pytest.param("PUT", {"If-None-Match": ETAG}, "failed", id="inm-put"),
        pytest.param("POST", {"If-None-Match": "*"}, "failed", id="inm-star-post"),
        pytest.param("DELETE", {"If-None-Match": f"W/{ETAG}"}, "failed", id="inm-weak-delete"),
        pytest.param("PUT", {"If-None-Match": '"old"'}, "proceed", id="inm-put-no-match"),
        # If-None-Match takes precedence over If-Modified-Since
        pytest.param(
            "GET",
            {"If-None-Match": '"old"', "If-Modified-Since": LATER},
            "proceed",
            id="inm-mismatch-beats-ims",
        ),
        pytest.param(
            "GET",
            {"If-None-Match": ETAG, "If-Modified-Since": EARLIER},
            "not-modified",
            id="inm-match-beats-ims",
        ),
        # If-Modified-Since
        pytest.param("GET", {"If-Modified-Since": LM_HTTP}, "not-modified", id="ims-equal"),
        pytest.param("GET", {"If-Modified-Since": LATER}, "not-modified", id="ims-later"),
        pytest.param("HEAD", {"If-Modified-Since": LATER}, "not-modified", id="ims-head"),
        pytest.param("GET", {"If-Modified-Since": EARLIER}, "proceed", id="ims-earlier"),
        pytest.param("GET", {"If-Modified-Since": "last tuesday"}, "proceed", id="ims-invalid"),
        pytest.param("POST", {"If-Modified-Since": LATER}, "proceed", id="ims-ignored-for-post"),
        # If-Match (strong comparison)
        pytest.param("GET", {"If-Match": ETAG}, "proceed", id="im-match"),
        pytest.param("PUT", {"If-Match": f'"old", {ETAG}'}, "proceed", id="im-list"),
        pytest.param("PUT", {"If-Match": "*"}, "proceed", id="im-star"),
        pytest.param("PUT", {"If-Match": '"old"'}, "failed", id="im-mismatch"),
        pytest.param("GET", {"If-Match": '"old"'}, "failed", id="im-mismatch-get"),
        pytest.param("PUT", {"If-Match": f"W/{ETAG}"}, "failed", id="im-weak-never-matches"),
        pytest.param(
            "GET",
            {"If-Match": '"old"', "If-None-Match": ETAG},
            "failed",
            id="im-evaluated-before-inm",
        ),
        # If-Unmodified-Since
        pytest.param("PUT", {"If-Unmodified-Since": EARLIER}, "failed", id="ius-earlier"),
        pytest.param("GET", {"If-Unmodified-Since": EARLIER}, "failed", id="ius-earlier-get"),
        pytest.param("PUT", {"If-Unmodified-Since": LM_HTTP}, "proceed", id="ius-equal"),
        pytest.param("PUT", {"If-Unmodified-Since": LATER}, "proceed", id="ius-later"),
        pytest.param("PUT", {"If-Unmodified-Since": "soon"}, "proceed", id="ius-invalid"),
        pytest.param(
            "PUT",
            {"If-Match": ETAG, "If-Unmodified-Since": EARLIER},
            "proceed",
            id="im-present-ius-ignored",
        ),
    ],
)
def test_evaluate_preconditions(method: str, headers: dict[str, str], expected: str) -> None:
    result = evaluate_preconditions(method, headers, etag=ETAG, last_modified=LAST_MODIFIED)
    assert result == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"a"', [(False, '"a"')]),
        ('W/"a"', [(True, '"a"')]),
        ('"a", W/"b" ,"c"', [(False, '"a"'), (True, '"b"'), (False, '"c"')]),
        ('""', [(False, '""')]),
        ('"a,b", "c"', [(False, '"a,b"'), (False, '"c"')]),
        ("*", "*"),
        (" * ", "*"),
        ("", []),
        ("abc", []),
        ('abc, "b"', [(False, '"b"')]),
        ('"a" junk, "b"', [(False, '"b"')]),
        ('w/"a"', []),
    ],
)
def test_parse_etag_list(value: str, expected: object) -> None:
    assert parse_etag_list(value) == expected


# ---- cache headers --------------------------------------------------------------------------

POINTER_POLICY = CachePolicy(
    edge_ttl_s=60, browser_ttl_s=30, stale_while_revalidate_s=600, stale_if_error_s=86400
)


@pytest.mark.parametrize(
    ("immutable", "policy", "tags", "expected"),
    [
        pytest.param(
            True,
            None,
            ["asset:chem-mole", "kind:bundle"],
            {
                "Cache-Control": "public, max-age=31536000, immutable",
                "CDN-Cache-Control": "max-age=31536000",
                "Surrogate-Key": "asset:chem-mole kind:bundle",
            },
            id="immutable",
        ),
        pytest.param(
            True,
            CachePolicy(edge_ttl_s=10, browser_ttl_s=5),
            ["asset:x"],
            {
                "Cache-Control": "public, max-age=31536000, immutable",
                "CDN-Cache-Control": "max-age=31536000",
                "Surrogate-Key": "asset:x",
            },
            id="immutable-ignores-ttls",
        ),
        pytest.param(
            False,
            POINTER_POLICY,
            ["asset:x"],
            {
                "Cache-Control": (
                    "public, max-age=30, stale-while-revalidate=600, stale-if-error=86400"
                ),
                "CDN-Cache-Control": "max-age=60, stale-while-revalidate=600, stale-if-error=86400",
                "Surrogate-Key": "asset:x",
            },
            id="mutable-with-stale",
        ),
        pytest.param(
            False,
            CachePolicy(edge_ttl_s=10, browser_ttl_s=5),
            ["asset:x"],
            {
                "Cache-Control": "public, max-age=5",
                "CDN-Cache-Control": "max-age=10",
                "Surrogate-Key": "asset:x",
            },
            id="mutable-no-stale",
        ),
        pytest.param(
            False,
            CachePolicy(edge_ttl_s=10, browser_ttl_s=0, stale_if_error_s=3600),
            ["asset:x"],
            {
                "Cache-Control": "public, max-age=0, stale-if-error=3600",
                "CDN-Cache-Control": "max-age=10, stale-if-error=3600",
                "Surrogate-Key": "asset:x",
            },
            id="mutable-only-stale-if-error",
        ),
        pytest.param(
            False,
            None,
            ["asset:x"],
            {
                "Cache-Control": (
                    "public, max-age=30, stale-while-revalidate=600, stale-if-error=86400"
                ),
                "CDN-Cache-Control": "max-age=60, stale-while-revalidate=600, stale-if-error=86400",
                "Surrogate-Key": "asset:x",
            },
            id="mutable-default-policy",
        ),
        pytest.param(
            False,
            CachePolicy(edge_ttl_s=60, browser_ttl_s=30, tags=("question-bank", "kind:bundle")),
            ["asset:chem-mole", "kind:bundle", "asset:chem-mole", "subject:chemistry"],
            {
                "Cache-Control": "public, max-age=30",
                "CDN-Cache-Control": "max-age=60",
                "Surrogate-Key": "asset:chem-mole kind:bundle subject:chemistry question-bank",
            },
            id="tags-deduplicated-order-kept-rule-tags-appended",
        ),
    ],
)
def test_cache_headers(
    immutable: bool, policy: CachePolicy | None, tags: list[str], expected: dict[str, str]
) -> None:
    assert cache_headers(immutable=immutable, policy=policy, tags=tags) == expected


def test_cache_headers_accept_any_iterable_of_tags() -> None:
    headers = cache_headers(immutable=True, policy=None, tags=(t for t in ["a", "b", "a"]))
    assert headers["Surrogate-Key"] == "a b"


# ---- cache rules ----------------------------------------------------------------------------

LATEST = CachePolicy(edge_ttl_s=60, browser_ttl_s=30, tags=("latest",))
PLAYLIST = CachePolicy(edge_ttl_s=10, browser_ttl_s=5, tags=("playlist",))
JSON = CachePolicy(edge_ttl_s=60, browser_ttl_s=30, tags=("json",))
THUMB = CachePolicy(edge_ttl_s=300, browser_ttl_s=300, tags=("thumb",))
VERSIONED = CachePolicy(edge_ttl_s=1, browser_ttl_s=1, tags=("versioned",))
MATCHER = RuleMatcher(
    [
        ("/content/**/latest*", LATEST),
        ("/content/**/*.m3u8", PLAYLIST),
        ("/content/**/*.json", JSON),
        ("/thumbs/*.jpg", THUMB),
        ("/v?/**", VERSIONED),
    ]
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/content/bundles/x/latest.json", LATEST),  # first match wins over *.json
        ("/content/latest.json", LATEST),  # ** also matches zero segments
        ("/content/lectures/a/latest", LATEST),
        ("/content/lectures/a/latest-720p.m3u8", LATEST),
        ("/content/lectures/a/master.m3u8", PLAYLIST),
        ("/content/lectures/a/hls/720p/index.m3u8", PLAYLIST),
        ("/content/bundles/x/v3/bundle.json", JSON),
        ("/content/a.json", JSON),
        ("/content/bundles/x/v3/bundle.json.gz", None),
        ("/content/lectures/a/hls/720p/seg-00001.ts", None),
        ("/content/bundles/x/notlatest.json", JSON),  # latest* anchors at the segment start
        ("/thumbs/a.jpg", THUMB),
        ("/thumbs/2024/a.jpg", None),  # * stays within one segment
        ("/thumbs/.jpg", THUMB),
        ("/v1/anything/at/all", VERSIONED),
        ("/v10/x", None),  # ? is exactly one character
        ("/other/latest.json", None),
        ("/contentx/latest.json", None),
        ("", None),
    ],
)
def test_rule_matcher(path: str, expected: CachePolicy | None) -> None:
    assert MATCHER.match(path) is expected


def test_rule_matcher_first_rule_in_order_wins() -> None:
    broad = ("/content/**", JSON)
    narrow = ("/content/**/latest*", LATEST)
    path = "/content/bundles/x/latest.json"
    assert RuleMatcher([broad, narrow]).match(path) is JSON
    assert RuleMatcher([narrow, broad]).match(path) is LATEST
    assert RuleMatcher([]).match(path) is None


@pytest.mark.parametrize(
    "path", ["/content/a.b/x.json", "/content/a+b/x.json", "/content/(a)/x.json"]
)
def test_rule_patterns_treat_regex_characters_literally(path: str) -> None:
    literal = RuleMatcher([(path, JSON)])
    assert literal.match(path) is JSON
    assert literal.match(path.replace("/x.json", "/y.json")) is None
    assert RuleMatcher([("/content/a.b/*", JSON)]).match("/content/aXb/x.json") is None


# ---- HTTP dates -----------------------------------------------------------------------------

IST = timezone(timedelta(hours=5, minutes=30))


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (LAST_MODIFIED, LM_HTTP),
        (datetime(2024, 3, 5, 15, 50, 30, tzinfo=IST), LM_HTTP),
        (datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC), "Sun, 06 Nov 1994 08:49:37 GMT"),
        (datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC), "Tue, 19 Jan 2038 03:14:08 GMT"),
    ],
)
def test_http_date_round_trip(moment: datetime, text: str) -> None:
    assert format_http_date(moment) == text
    parsed = parse_http_date(text)
    assert parsed == moment.replace(microsecond=0)
    assert parsed is not None
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850
        "Sun Nov  6 08:49:37 1994",  # obsolete asctime
    ],
)
def test_parse_http_date_accepts_the_three_formats(text: str) -> None:
    assert parse_http_date(text) == datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "garbage",
        "Sun, 32 Nov 1994 08:49:37 GMT",
        "Tue, 05 Mar 2024 25:20:30 GMT",
        "2024-03-05T10:20:30Z",
        "1709634030",
        # RFC 9110 §5.6.7 allows three forms only (email.utils took all of these):
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "Sun, 06 Nov 1994 18:49:37 AEST",
        "Sun, 06 Nov 94 08:49:37 GMT",  # two-digit year in an IMF-fixdate
        "Sun, 06-Nov-1994 08:49:37 GMT",  # dashes in an IMF-fixdate
        "Sun 06 Nov 1994 08:49:37 GMT",  # no comma
        "Sun,  06 Nov 1994 08:49:37 GMT",  # two spaces
        "sun, 06 nov 1994 08:49:37 gmt",  # case-sensitive
        "Sun, 6 Nov 1994 08:49:37 GMT",  # one-digit day
        "Sun, 06 Nov 1994 8:49:37 GMT",
        "Sunday, 06-Nov-1994 08:49:37 GMT",  # RFC 850 has two digits
        "Sun, 06 Nov 1994 08:49:37 GMT junk",
        "Sun, \uff10\uff16 Nov 1994 08:49:37 GMT",  # full-width digits
    ],
)
def test_parse_http_date_invalid_is_none(text: str | None) -> None:
    assert parse_http_date(text) is None


@pytest.mark.parametrize(
    ("text", "year"),
    [
        ("Sunday, 06-Nov-94 08:49:37 GMT", 1994),
        ("Wednesday, 06-Nov-30 08:49:37 GMT", 2030),  # 4 years ahead: not "in the future"
        ("Friday, 06-Nov-76 08:49:37 GMT", 2076),  # 50 years ahead: still ahead
        ("Monday, 06-Nov-77 08:49:37 GMT", 1977),  # more than 50: the past
    ],
)
def test_rfc850_two_digit_years(text: str, year: int) -> None:
    parsed = parse_http_date(text, now=datetime(2026, 12, 4, tzinfo=UTC))
    assert parsed is not None
    assert parsed.year == year


def test_a_leap_second_counts_as_59() -> None:
    assert parse_http_date("Sat, 31 Dec 2016 23:59:60 GMT") == datetime(
        2016, 12, 31, 23, 59, 59, tzinfo=UTC
    )
