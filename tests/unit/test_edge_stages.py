"""The edge's stages (edge/stages.py) as tables: pure functions of frozen values and ``now``,
no sockets, no clock. The same flow through a real edge is in test_edge_caching.py and
test_edge_bad_input.py; these pin each decision on its own, as Varnish's builtin.vcl tests and
h11's state tables do."""

from __future__ import annotations

import pytest

from edge import stages
from edge.cache import Hit, VariantLookup
from edge.entry import EntryMeta
from edge.keys import Target
from edge.rfc9111 import RequestControls, request_controls

NOW = 1_800_000_000.0
CONTENT = ("/content/",)


def stored(cache_control: str, *, age_s: float = 0.0, kind: str = "full") -> Hit:
    """A response stored *age_s* seconds before :data:`NOW`."""
    meta = EntryMeta(
        kind,  # type: ignore[arg-type]
        headers=(("Cache-Control", cache_control),),
        request_time=NOW - age_s,
        response_time=NOW - age_s,
        body_bytes=3,
    )
    return Hit("k", meta, body=b"abc")


def found(hit: Hit | None, *, url_known: bool | None = None) -> VariantLookup:
    return VariantLookup(hit, "k", url_known=hit is not None if url_known is None else url_known)


def controls(cache_control: str = "") -> RequestControls:
    return request_controls([("Cache-Control", cache_control)] if cache_control else [])


# ---- recv -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "version", "target", "expected"),
    [
        ("GET", (1, 1), "/content/a.json", stages.Lookup(Target("/content/a.json", ""))),
        ("HEAD", (1, 0), "/content/a?x=1", stages.Lookup(Target("/content/a", "x=1"))),
        ("POST", (1, 1), "/content/a", stages.PassUnsafe(Target("/content/a", ""))),
        ("M-SEARCH", (1, 1), "/content/a", stages.PassUnsafe(Target("/content/a", ""))),
        (
            "TRACE",
            (1, 1),
            "/content/a",
            stages.Refuse(405, "method TRACE is not allowed here", allow="GET, HEAD"),
        ),
        (
            "CONNECT",
            (1, 1),
            "/content/a",
            stages.Refuse(405, "method CONNECT is not allowed here", allow="GET, HEAD"),
        ),
        ("GET", (0, 9), "/content/a", stages.Refuse(400, "HTTP/0.9 requests are not supported")),
        (
            "GET",
            (1, 1),
            "/v1/assets",
            stages.Refuse(404, "/v1/assets is not served through this edge"),
        ),
        (
            "GET",
            (1, 1),
            "/etc/passwd",
            stages.Refuse(404, "/etc/passwd is not served through this edge"),
        ),
        (
            "GET",
            (1, 1),
            "/content/../v1/purge",
            stages.Refuse(404, "/v1/purge is not served through this edge"),
        ),
    ],
)
def test_recv(
    method: str, version: tuple[int, int], target: str, expected: stages.RecvStep
) -> None:
    assert stages.recv(method, version, target, CONTENT) == expected


def test_recv_refuses_a_target_that_is_not_origin_form() -> None:
    step = stages.recv("GET", (1, 1), "http://elsewhere/content/a", CONTENT)
    assert isinstance(step, stages.Refuse)
    assert step.status == 400
    assert step.message.startswith("bad request target")


def test_hash_keys_on_the_upstream_authority_and_the_normalised_target() -> None:
    one = stages.hash_key("origin:8080", Target("/content/a", "x=1"))
    assert one == stages.hash_key("origin:8080", Target("/content/a", "x=1"))
    assert one != stages.hash_key("other:8080", Target("/content/a", "x=1"))
    assert one != stages.hash_key("origin:8080", Target("/content/a", "x=2"))


# ---- hit or miss ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hit", "request_cc", "expected"),
    [
        (stored("max-age=60", age_s=10), "", "deliver"),
        (stored("max-age=60", age_s=70), "", "fetch stale"),
        (stored("max-age=60, stale-while-revalidate=30", age_s=70), "", "deliver refresh"),
        (stored("max-age=60, stale-while-revalidate=30", age_s=100), "", "fetch stale"),
        (stored("max-age=60", age_s=10), "no-cache", "fetch request"),
        (stored("max-age=60", age_s=10), "max-age=5", "fetch stale"),
        (stored("max-age=60", age_s=70), "max-stale=20", "deliver"),
        (stored("max-age=60", age_s=10), "min-fresh=55", "fetch stale"),
        (stored("max-age=60", age_s=70), "only-if-cached", "refuse 504"),
        (stored("max-age=60", age_s=10), "only-if-cached", "deliver"),
        (stored("no-cache", age_s=0), "", "fetch stale"),
        (stored("max-age=60", kind="vary"), "", "fetch vary-miss"),
    ],
)
def test_hit_or_miss(hit: Hit, request_cc: str, expected: str) -> None:
    step = stages.hit_or_miss(found(hit), controls(request_cc), NOW)
    match step:
        case stages.Deliver(served, cache_status, refresh):
            assert served is hit
            assert cache_status.startswith("hit; ttl=")
            assert expected == ("deliver refresh" if refresh else "deliver")
        case stages.Fetch(stale, fwd):
            assert expected == f"fetch {fwd}"
            assert stale is (hit if hit.meta.kind == "full" else None)
        case stages.Refuse(status):
            assert expected == f"refuse {status}"


def test_a_fresh_hit_says_its_remaining_ttl() -> None:
    step = stages.hit_or_miss(found(stored("max-age=60", age_s=10)), controls(), NOW)
    assert isinstance(step, stages.Deliver)
    assert step.cache_status == "hit; ttl=50"


@pytest.mark.parametrize(
    ("url_known", "request_cc", "expected"),
    [
        (False, "", stages.Fetch(None, "uri-miss")),
        (True, "", stages.Fetch(None, "vary-miss")),
        (
            False,
            "only-if-cached",
            stages.Refuse(504, "only-if-cached: nothing stored for this URL"),
        ),
    ],
)
def test_a_miss(url_known: bool, request_cc: str, expected: stages.HitStep) -> None:
    lookup = found(None, url_known=url_known)
    assert stages.hit_or_miss(lookup, controls(request_cc), NOW) == expected


@pytest.mark.parametrize(
    ("pass_until", "expected"),
    [
        (None, stages.Collapse()),
        (NOW + 1, stages.Bypass()),
        (NOW, stages.Collapse()),
        (NOW - 1, stages.Collapse()),
    ],
)
def test_miss_passes_while_the_url_is_marked_uncacheable(
    pass_until: float | None, expected: stages.MissStep
) -> None:
    assert stages.miss(pass_until, NOW) == expected


# ---- after the fetch ---------------------------------------------------------------------------


def after(
    result: stages.FetchResult,
    *,
    stale: Hit | None = None,
    request_cc: str = "",
    leader: bool = True,
    grace_s: float = 3600.0,
) -> stages.AfterFetchStep:
    return stages.after_fetch(
        result,
        stale=stale,
        controls=controls(request_cc),
        fwd="stale",
        leader=leader,
        now=NOW,
        grace_s=grace_s,
    )


def test_a_stored_or_refreshed_fetch_is_looked_up_again() -> None:
    assert after(stages.FetchResult("stored")) == stages.LookupAgain("fwd=stale; stored")
    assert after(stages.FetchResult("refreshed")) == stages.LookupAgain("fwd=stale; fwd-status=304")


@pytest.mark.parametrize(
    ("leader", "streamable", "expected"),
    [
        (True, True, stages.StreamPassed("uncacheable-private")),
        (True, False, stages.PassAgain()),
        (False, True, stages.PassAgain()),
        (False, False, stages.PassAgain()),
    ],
)
def test_only_the_leader_streams_a_passed_answer(
    leader: bool, streamable: bool, expected: stages.AfterFetchStep
) -> None:
    result = stages.FetchResult("passed", "uncacheable-private", streamable=streamable)
    assert after(result, leader=leader) == expected


@pytest.mark.parametrize(
    ("stale_cc", "age_s", "detail", "request_cc", "grace_s", "expected"),
    [
        # stale-if-error (RFC 5861 §4), from the response or the request's max-stale
        ("max-age=60, stale-if-error=600", 100, "upstream-5xx", "", 3600, "stale-if-error"),
        ("max-age=60", 100, "upstream-5xx", "max-stale=100", 3600, "stale-if-error"),
        ("max-age=60, stale-if-error=10", 100, "upstream-5xx", "", 3600, "error"),
        # the edge's grace covers an unreachable upstream, never a 5xx it answered
        ("max-age=60", 100, "refused", "", 3600, "stale-if-unreachable"),
        ("max-age=60", 100, "timeout", "", 3600, "stale-if-unreachable"),
        ("max-age=60", 100, "shed", "", 3600, "stale-if-unreachable"),
        ("max-age=60", 100, "upstream-5xx", "", 3600, "error"),
        ("max-age=60", 5000, "refused", "", 3600, "error"),
        ("max-age=60", 100, "refused", "", 0, "error"),
        # never past must-revalidate
        ("max-age=60, must-revalidate, stale-if-error=600", 100, "refused", "", 3600, "error"),
    ],
)
def test_a_failed_fetch_serves_stale_only_where_allowed(
    stale_cc: str, age_s: float, detail: str, request_cc: str, grace_s: float, expected: str
) -> None:
    stale = stored(stale_cc, age_s=age_s)
    step = after(
        stages.FetchResult("error", detail, status=502),
        stale=stale,
        request_cc=request_cc,
        grace_s=grace_s,
    )
    if expected == "error":
        assert isinstance(step, stages.AnswerError)
        assert step.cache_status == f"fwd=stale; fwd-status=502; detail={detail}"
    else:
        assert step == stages.DeliverStale(stale, f"fwd=stale; fwd-status=502; detail={expected}")


def test_an_error_detail_is_made_safe_for_cache_status() -> None:
    step = after(stages.FetchResult("error", 'bad "thing"; x=1\r\n' + "y" * 60, status=504))
    assert isinstance(step, stages.AnswerError)
    detail = step.cache_status.rsplit("detail=", 1)[1]
    assert len(detail) == 40
    assert set(detail) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


# ---- backend_response ---------------------------------------------------------------------------


def upstream(status: int, *headers: tuple[str, str]) -> stages.BackendResponse:
    return stages.BackendResponse(status, headers, NOW - 0.1, NOW)


def backend(
    response: stages.BackendResponse,
    *,
    stale: Hit | None = None,
    request_headers: tuple[tuple[str, str], ...] = (),
    purged_meanwhile: bool = False,
) -> stages.BackendStep:
    return stages.backend_response(
        response,
        key="k",
        stale=stale,
        request_headers=list(request_headers),
        purged_meanwhile=purged_meanwhile,
    )


def test_a_matching_304_refreshes_the_stored_response() -> None:
    stale = Hit(
        "k",
        EntryMeta("full", headers=(("Cache-Control", "max-age=60"), ("ETag", '"v1"'))),
        body=b"abc",
    )
    step = backend(upstream(304, ("ETag", '"v1"'), ("Cache-Control", "max-age=120")), stale=stale)
    assert isinstance(step, stages.Refresh)
    assert step.key == "k"
    assert step.meta.header("cache-control") == "max-age=120"
    assert step.meta.response_time == NOW


def test_a_304_for_another_version_drops_what_is_stored() -> None:
    stale = Hit("k", EntryMeta("full", headers=(("ETag", '"v1"'),)), body=b"abc")
    assert backend(upstream(304, ("ETag", '"v2"')), stale=stale) == stages.DropStale("k")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (upstream(503), stages.UpstreamFailed()),
        (upstream(500, ("Cache-Control", "max-age=60")), stages.UpstreamFailed()),
        (upstream(200, ("Cache-Control", "private")), stages.Uncacheable("uncacheable-private")),
        (
            upstream(200, ("Cache-Control", "no-store")),
            stages.Uncacheable("uncacheable-no-store"),
        ),
        (
            upstream(206, ("Content-Range", "bytes 5-9/100")),
            stages.Uncacheable("bad-content-range", remember=False),
        ),
        (
            upstream(206, ("Content-Range", "bytes 0-9/5")),
            stages.Uncacheable("bad-content-range", remember=False),
        ),
    ],
)
def test_what_is_not_stored(response: stages.BackendResponse, expected: stages.BackendStep) -> None:
    step = backend(response)
    if isinstance(expected, stages.Uncacheable) and expected.remember:
        assert isinstance(step, stages.Uncacheable)
        assert step.reason.startswith(expected.reason)
    else:
        assert step == expected


def test_a_storable_answer_is_stored_with_its_tags_and_validator() -> None:
    step = backend(
        upstream(
            200,
            ("Cache-Control", "max-age=60"),
            ("ETag", '"v3"'),
            ("Surrogate-Key", "bundle:x  all"),
            ("Content-Length", "3"),
        ),
        purged_meanwhile=True,
    )
    assert isinstance(step, stages.Store)
    assert (step.key, step.marker, step.total) == ("k", None, None)
    assert step.meta.tags == ("bundle:x", "all")
    assert step.meta.etag == '"v3"'
    assert step.meta.soft_purged  # revalidated before it is served as fresh


def test_a_varying_answer_is_stored_under_its_variant_with_a_marker() -> None:
    step = backend(
        upstream(200, ("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")),
        request_headers=(("Accept-Language", "hi"),),
    )
    assert isinstance(step, stages.Store)
    assert step.marker is not None
    assert step.marker.kind == "vary"
    assert step.marker.vary == ("accept-language",)
    assert step.key.startswith("k")
    assert step.key != "k"
    other = backend(
        upstream(200, ("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")),
        request_headers=(("Accept-Language", "en"),),
    )
    assert isinstance(other, stages.Store)
    assert other.key != step.key


def test_a_first_slice_keeps_the_total_and_a_whole_one_becomes_a_200() -> None:
    first = backend(
        upstream(206, ("Cache-Control", "max-age=60"), ("Content-Range", "bytes 0-9/100"))
    )
    assert isinstance(first, stages.Store)
    assert (first.meta.status, first.total) == (206, 100)
    whole = backend(
        upstream(
            206,
            ("Cache-Control", "max-age=60"),
            ("Content-Range", "bytes 0-9/10"),
            ("Content-Length", "10"),
        )
    )
    assert isinstance(whole, stages.Store)
    assert (whole.meta.status, whole.total) == (200, None)
    assert whole.meta.header("content-length") == "10"
    assert whole.meta.header("content-range") is None


# ---- deliver ----------------------------------------------------------------------------------

STORED = EntryMeta(
    "full",
    headers=(("ETag", '"v1"'), ("Last-Modified", "Tue, 01 Dec 2026 10:00:00 GMT")),
    response_time=NOW,
    body_bytes=100,
)


@pytest.mark.parametrize(
    ("method", "request_headers", "expected"),
    [
        ("GET", {}, stages.Send(200, 0, 100)),
        ("GET", {"If-None-Match": '"v1"'}, stages.NotModified()),
        ("HEAD", {"If-None-Match": 'W/"v1"'}, stages.NotModified()),
        ("GET", {"If-None-Match": '"v0"'}, stages.Send(200, 0, 100)),
        (
            "GET",
            {"If-Match": '"v0"'},
            stages.Refuse(412, "a precondition in the request did not hold"),
        ),
        ("GET", {"If-Modified-Since": "Wed, 02 Dec 2026 10:00:00 GMT"}, stages.NotModified()),
        ("GET", {"If-Modified-Since": "Mon, 30 Nov 2026 10:00:00 GMT"}, stages.Send(200, 0, 100)),
        ("GET", {"Range": "bytes=10-19"}, stages.Send(206, 10, 10, "bytes 10-19/100")),
        ("GET", {"Range": "bytes=-5"}, stages.Send(206, 95, 5, "bytes 95-99/100")),
        (
            "GET",
            {"Range": "bytes=10-19", "If-Range": '"v1"'},
            stages.Send(206, 10, 10, "bytes 10-19/100"),
        ),
        ("GET", {"Range": "bytes=10-19", "If-Range": '"v0"'}, stages.Send(200, 0, 100)),
        ("GET", {"Range": "bytes=0-1,5-6"}, stages.Send(200, 0, 100)),
    ],
)
def test_deliver(
    method: str, request_headers: dict[str, str], expected: stages.DeliverStep
) -> None:
    assert stages.deliver(STORED, method, request_headers) == expected


def test_an_unsatisfiable_range_is_a_416_with_the_size() -> None:
    step = stages.deliver(STORED, "GET", {"Range": "bytes=200-300"})
    assert isinstance(step, stages.RangeRefused)
    assert step.size == 100


def test_without_an_etag_if_none_match_never_matches_and_if_match_fails() -> None:
    plain = EntryMeta("full", response_time=NOW, body_bytes=3)
    assert stages.deliver(plain, "GET", {"If-None-Match": '"-"'}) == stages.Send(200, 0, 3)
    step = stages.deliver(plain, "GET", {"If-Match": '"v1"'})
    assert isinstance(step, stages.Refuse)
    assert step.status == 412


def test_a_stored_non_200_is_sent_whole_whatever_the_request_asks() -> None:
    gone = EntryMeta("full", status=404, response_time=NOW, body_bytes=7)
    assert stages.deliver(gone, "GET", {"Range": "bytes=0-1"}) == stages.Send(404, 0, 7)


def test_a_sliced_object_is_delivered_by_its_total_size() -> None:
    sliced = EntryMeta("sliced", response_time=NOW, body_bytes=10, total_bytes=1000)
    assert stages.deliver(sliced, "GET", {}) == stages.Send(200, 0, 1000)
    assert stages.deliver(sliced, "GET", {"Range": "bytes=990-"}) == stages.Send(
        206, 990, 10, "bytes 990-999/1000"
    )
