"""The edge's HTTP caching behaviour, end to end: a real edge server in front of a scripted
upstream on loopback."""

from __future__ import annotations

import asyncio
import gzip
import time
from email.utils import formatdate
from typing import Any

import brotli
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.edge_fixtures import ScriptedOrigin, body_of

pytestmark = pytest.mark.integration

Upstream = tuple[ScriptedOrigin, TestServer]
Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}


async def until_collapsed(edge: Client, waiting: int) -> None:
    """Wait until *waiting* requests are queued behind an in-flight fetch."""
    pattern = f"kshipra_edge_collapsed_waits_total {float(waiting)}"
    for _ in range(10_000):
        if pattern in await (await edge.get("/metrics")).text():
            return
        await asyncio.sleep(0.001)  # yield while the clients connect
    raise AssertionError(f"never saw {waiting} collapsed waits")


def cache_status(response: Any) -> str:
    return str(response.headers["Cache-Status"])


# ---- miss, store, hit ------------------------------------------------------------------------


async def test_miss_then_hit_with_age_and_cache_status(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/a.txt", headers={"Cache-Control": "max-age=60", "ETag": '"v1"'}, body=b"A")
    edge = await make_edge()
    first = await edge.get("/a.txt")
    assert first.status == 200
    assert await first.read() == b"A"
    assert cache_status(first).startswith("test-edge; fwd=uri-miss; stored")
    second = await edge.get("/a.txt")
    assert await second.read() == b"A"
    assert cache_status(second).startswith("test-edge; hit; ttl=")
    assert int(second.headers["Age"]) >= 0
    assert "Date" in second.headers
    assert origin.count("/a.txt") == 1


async def test_cdn_cache_control_wins_and_cdn_fields_are_stripped(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script(
        "/b.json",
        headers={
            "Cache-Control": "no-store",
            "CDN-Cache-Control": "max-age=120",
            "Surrogate-Key": "bundle:x neet",
            **JSON,
        },
        body=b'{"a": 1}',
    )
    edge = await make_edge()
    for _ in range(3):
        response = await edge.get("/b.json")
        assert await response.read() == b'{"a": 1}'
        assert "CDN-Cache-Control" not in response.headers
        assert "Surrogate-Key" not in response.headers
        assert response.headers["Cache-Control"] == "no-store"
    assert origin.count("/b.json") == 1


async def test_incoming_age_counts_against_freshness(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/aged", headers={"Cache-Control": "max-age=100", "Age": "95"}, body=b"x")
    origin.script("/expired", headers={"Cache-Control": "max-age=100", "Age": "150"}, body=b"x")
    edge = await make_edge()
    await edge.get("/aged")
    second = await edge.get("/aged")
    assert cache_status(second).startswith("test-edge; hit")
    assert int(second.headers["Age"]) >= 95
    await edge.get("/expired")
    again = await edge.get("/expired")
    assert "fwd=stale" in cache_status(again)
    assert origin.count("/expired") == 2


async def test_expires_and_heuristic_freshness(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    now = time.time()
    origin.script(
        "/expires-bad",
        headers={"Expires": "not a date", "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"},
    )
    origin.script(
        "/expires-future",
        headers={
            "Date": formatdate(now, usegmt=True),
            "Expires": formatdate(now + 3600, usegmt=True),
        },
    )
    origin.script("/heuristic", headers={"Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"})
    origin.script("/no-info", headers={})
    origin.script("/teapot", status=418, headers={"Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"})
    edge = await make_edge()
    for path in ("/expires-bad", "/expires-future", "/heuristic", "/no-info", "/teapot"):
        await edge.get(path)
        await edge.get(path)
    assert origin.count("/expires-bad") == 2  # invalid Expires: stale at once
    assert origin.count("/expires-future") == 1  # an hour of freshness by Expires - Date
    assert origin.count("/heuristic") == 1  # Last-Modified heuristic on a 200
    assert origin.count("/no-info") == 2  # nothing to base freshness on: not stored
    assert origin.count("/teapot") == 2  # 418 is not heuristically cacheable


# ---- storability -----------------------------------------------------------------------------


async def test_what_a_shared_cache_must_not_store(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/no-store", headers={"Cache-Control": "max-age=60, no-store"})
    origin.script("/private", headers={"Cache-Control": "private, max-age=60"})
    origin.script("/cookie", headers={"Cache-Control": "max-age=60", "Set-Cookie": "s=1"})
    origin.script("/vary-star", headers={"Cache-Control": "max-age=60", "Vary": "*"})
    origin.script("/auth", headers={"Cache-Control": "max-age=60"})
    origin.script("/auth-public", headers={"Cache-Control": "public, max-age=60"})
    edge = await make_edge()
    auth = {"Authorization": "Bearer student-token"}
    for _ in range(2):
        for path in ("/no-store", "/private", "/cookie", "/vary-star"):
            response = await edge.get(path)
            assert response.status == 200
        await edge.get("/auth", headers=auth)
        await edge.get("/auth-public", headers=auth)
    for path in ("/no-store", "/private", "/cookie", "/vary-star", "/auth"):
        assert origin.count(path) == 2, path
    assert origin.count("/auth-public") == 1


async def test_hop_by_hop_and_connection_named_headers_are_not_stored(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script(
        "/hop",
        headers={
            "Cache-Control": "max-age=60",
            "Connection": "X-Secret",
            "X-Secret": "s",
            "X-Kept": "k",
        },
    )
    edge = await make_edge()
    await edge.get("/hop")
    hit = await edge.get("/hop")
    assert cache_status(hit).startswith("test-edge; hit")
    assert "X-Secret" not in hit.headers
    assert hit.headers["X-Kept"] == "k"


# ---- validation ------------------------------------------------------------------------------


async def test_stale_object_revalidates_with_its_etag_and_304_freshens(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script(
        "/doc",
        headers={"Cache-Control": "max-age=0", "ETag": '"v1"', "X-Version": "1"},
        body=b"document",
        answer_304_to='"v1"',
        headers_304={"Cache-Control": "max-age=300", "ETag": '"v1"', "X-Version": "2"},
    )
    edge = await make_edge()
    await edge.get("/doc")
    second = await edge.get("/doc")
    assert await second.read() == b"document"
    assert "fwd=stale; fwd-status=304" in cache_status(second)
    assert second.headers["X-Version"] == "2"
    assert origin.requests_to("/doc")[1].headers["If-None-Match"] == '"v1"'
    third = await edge.get("/doc")
    assert cache_status(third).startswith("test-edge; hit")
    assert origin.count("/doc") == 2


async def test_client_conditionals_are_answered_from_cache(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script(
        "/c",
        headers={
            "Cache-Control": "max-age=60",
            "ETag": '"abc"',
            "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT",
        },
        body=b"c" * 100,
    )
    edge = await make_edge()
    await edge.get("/c")
    not_modified = await edge.get("/c", headers={"If-None-Match": 'W/"abc"'})
    assert not_modified.status == 304
    by_date = await edge.get("/c", headers={"If-Modified-Since": "Tue, 02 Jan 2024 00:00:00 GMT"})
    assert by_date.status == 304
    inm_wins = await edge.get(
        "/c",
        headers={"If-None-Match": '"zzz"', "If-Modified-Since": "Tue, 02 Jan 2024 00:00:00 GMT"},
    )
    assert inm_wins.status == 200
    assert origin.count("/c") == 1


# ---- request directives ----------------------------------------------------------------------


async def test_request_cache_control(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script("/r", headers={"Cache-Control": "max-age=60", "ETag": '"r"'}, answer_304_to='"r"')
    edge = await make_edge()
    missing = await edge.get("/r", headers={"Cache-Control": "only-if-cached"})
    assert missing.status == 504
    assert origin.count("/r") == 0
    await edge.get("/r")
    no_cache = await edge.get("/r", headers={"Cache-Control": "no-cache"})
    assert "fwd=request" in cache_status(no_cache)
    assert origin.requests_to("/r")[-1].headers["If-None-Match"] == '"r"'
    zero = await edge.get("/r", headers={"Cache-Control": "max-age=0"})
    assert "fwd=" in cache_status(zero)
    fresh_enough = await edge.get("/r", headers={"Cache-Control": "min-fresh=10"})
    assert cache_status(fresh_enough).startswith("test-edge; hit")
    too_demanding = await edge.get("/r", headers={"Cache-Control": "min-fresh=600"})
    assert "fwd=" in cache_status(too_demanding)
    cached = await edge.get("/r", headers={"Cache-Control": "only-if-cached"})
    assert cached.status == 200


async def test_max_stale_allows_a_stale_answer_without_upstream(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script(
        "/s",
        headers={"Cache-Control": "max-age=0", "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"},
    )
    edge = await make_edge()
    await edge.get("/s")
    stale_ok = await edge.get("/s", headers={"Cache-Control": "max-stale=3600"})
    assert cache_status(stale_ok).startswith("test-edge; hit")
    assert origin.count("/s") == 1


# ---- Vary ------------------------------------------------------------------------------------


async def test_vary_stores_variants_side_by_side(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script(
        "/v",
        headers={
            "Cache-Control": "max-age=60",
            "Vary": "accept-language, Accept-Language",
            "Content-Language": "x",
        },
        body=b"variant",
    )
    edge = await make_edge()
    hindi = {"Accept-Language": "hi"}
    english = {"Accept-Language": "en"}
    await edge.get("/v", headers=hindi)
    second = await edge.get("/v", headers=english)
    assert "fwd=vary-miss" in cache_status(second)
    assert cache_status(await edge.get("/v", headers={"Accept-Language": " hi "})).startswith(
        "test-edge; hit"
    )
    assert cache_status(await edge.get("/v", headers=english)).startswith("test-edge; hit")
    assert origin.count("/v") == 2


async def test_accept_encoding_values_are_normalised(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    origin.script(
        "/enc",
        headers={
            "Cache-Control": "max-age=60",
            "Vary": "Accept-Encoding",
            "Content-Type": "image/png",
        },
        body=b"png",
    )
    edge = await make_edge()
    for value in ("gzip, deflate, br", "br, gzip", "br;q=1.0, gzip;q=0.5", "gzip, br, zstd"):
        await edge.get("/enc", headers={"Accept-Encoding": value})
    assert origin.count("/enc") == 1
    assert origin.requests_to("/enc")[0].headers["Accept-Encoding"] == "br"


# ---- unsafe methods --------------------------------------------------------------------------


async def test_successful_unsafe_request_invalidates(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    item = origin.script("/item", headers={"Cache-Control": "max-age=600"}, body=b"old")
    origin.script("/other", headers={"Cache-Control": "max-age=600"}, body=b"other")
    edge = await make_edge()
    await edge.get("/item")
    await edge.get("/other")
    item.body = b"new"
    post = await edge.post("/item", data=b"update")
    assert post.headers["Connection"] == "close"  # the door watches heads again on a new one
    assert post.status == 200
    assert await (await edge.get("/item")).read() == b"new"  # the POST invalidated it
    item.headers["Content-Location"] = "/other"
    await edge.put("/item", data=b"x")
    await edge.get("/other")
    assert origin.count("/other") == 2  # named by the PUT response's Content-Location
    item.status = 500
    await edge.get("/other")
    await edge.delete("/item")
    await edge.get("/other")
    assert origin.count("/other") == 2  # a failed unsafe request invalidates nothing


# ---- stale serving ---------------------------------------------------------------------------


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    script = origin.script(
        "/swr", headers={"Cache-Control": "max-age=0, stale-while-revalidate=300"}, body=b"v1"
    )
    edge = await make_edge()
    await edge.get("/swr")
    script.gate = asyncio.Event()
    script.body = b"v2"
    origin.arrived.clear()
    responses = await asyncio.gather(*(edge.get("/swr") for _ in range(10)))
    assert [await r.read() for r in responses] == [b"v1"] * 10  # nobody waited for upstream
    await origin.arrived.wait()
    assert origin.count("/swr") == 2  # one background refresh for ten stale hits
    script.gate.set()
    for _ in range(100):  # the refresh lands; a later request sees v2
        response = await edge.get("/swr")
        if await response.read() == b"v2":
            break
        await asyncio.sleep(0)  # yield to the refresh task, not a timed wait
    assert await (await edge.get("/swr")).read() == b"v2"


async def test_stale_if_error_serves_stale_and_errors_never_overwrite(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    script = origin.script(
        "/sie", headers={"Cache-Control": "max-age=0, stale-if-error=600"}, body=b"good"
    )
    edge = await make_edge()
    await edge.get("/sie")
    script.status, script.body, script.headers = 503, b"down", {}
    served = await edge.get("/sie")
    assert served.status == 200
    assert await served.read() == b"good"
    assert "fwd-status=503; detail=stale-if-error" in cache_status(served)
    script.drop_connection = True
    dropped = await edge.get("/sie")
    assert await dropped.read() == b"good"
    script.drop_connection = False
    script.status, script.body = 200, b"better"
    script.headers = {"Cache-Control": "max-age=60"}
    assert await (await edge.get("/sie")).read() == b"better"


async def test_must_revalidate_never_serves_stale_on_error(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    script = origin.script(
        "/mr",
        headers={"Cache-Control": "max-age=0, must-revalidate, stale-if-error=600"},
        body=b"x",
    )
    edge = await make_edge()
    await edge.get("/mr")
    script.status, script.headers = 500, {}
    response = await edge.get("/mr")
    assert response.status == 500


async def test_refused_upstream_without_stale_is_a_502(upstream: Upstream, make_edge: Any) -> None:
    _, server = upstream
    edge = await make_edge()
    await server.close()
    response = await edge.get("/nothing")
    assert response.status == 502
    assert "fwd=uri-miss" in cache_status(response)


# ---- collapsing ------------------------------------------------------------------------------


async def test_concurrent_misses_make_one_upstream_request(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    gate = asyncio.Event()
    origin.script("/hot", headers={"Cache-Control": "max-age=60"}, body=b"hot", gate=gate)
    edge = await make_edge()
    tasks = [asyncio.create_task(edge.get("/hot")) for _ in range(50)]
    await origin.arrived.wait()
    await until_collapsed(edge, 49)
    gate.set()
    responses = await asyncio.gather(*tasks)
    assert [await r.read() for r in responses] == [b"hot"] * 50
    assert origin.count("/hot") == 1
    metrics = await (await edge.get("/metrics")).text()
    assert "kshipra_edge_collapsed_waits_total 49.0" in metrics


async def test_a_failed_collapsed_fetch_fails_all_waiters_at_once(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    gate = asyncio.Event()
    origin.script("/flaky", status=503, body=b"busy", gate=gate)
    edge = await make_edge()
    tasks = [asyncio.create_task(edge.get("/flaky")) for _ in range(20)]
    await origin.arrived.wait()
    await until_collapsed(edge, 19)
    gate.set()
    responses = await asyncio.gather(*tasks)
    assert {r.status for r in responses} == {503}
    assert origin.count("/flaky") == 1


async def test_uncacheable_answers_do_not_queue_later_requests(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/private-feed", headers={"Cache-Control": "private"}, body=b"mine")
    edge = await make_edge()
    first = await edge.get("/private-feed")
    assert "uncacheable" in cache_status(first)
    gate = asyncio.Event()
    origin.scripts["/private-feed"].gate = gate
    origin.arrived.clear()
    tasks = [asyncio.create_task(edge.get("/private-feed")) for _ in range(5)]
    while origin.count("/private-feed") < 6:  # all five reach upstream on their own
        await origin.arrived.wait()
        origin.arrived.clear()
    gate.set()
    responses = await asyncio.gather(*tasks)
    assert all("fwd=bypass" in cache_status(r) for r in responses)


# ---- ranges and slices -----------------------------------------------------------------------


async def test_ranges_from_a_stored_object(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    body = body_of(10_000)
    origin.script(
        "/seg.m4s",
        headers={"Cache-Control": "max-age=60", "ETag": '"seg"', "Content-Type": "video/mp4"},
        body=body,
        ranges=True,
    )
    edge = await make_edge()
    first = await edge.get("/seg.m4s", headers={"Range": "bytes=0-"})
    assert first.status == 206  # bytes=0- on a miss is still a 206
    assert await first.read() == body
    part = await edge.get("/seg.m4s", headers={"Range": "bytes=100-199"})
    assert part.status == 206
    assert part.headers["Content-Range"] == "bytes 100-199/10000"
    assert await part.read() == body[100:200]
    assert (await edge.get("/seg.m4s", headers={"Range": "bytes=20000-"})).status == 416
    bad = await edge.get("/seg.m4s", headers={"Range": "bytes=x-y"})
    assert bad.status == 416
    stale_if_range = await edge.get("/seg.m4s", headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale_if_range.status == 200
    assert origin.count("/seg.m4s") == 1


async def test_large_objects_are_cached_in_slices(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    slice_bytes = 64 * 1024
    body = body_of(slice_bytes * 5 + 123)
    origin.script(
        "/lecture.mp4",
        headers={"Cache-Control": "max-age=600", "ETag": '"lec"', "Content-Type": "video/mp4"},
        body=body,
        ranges=True,
    )
    edge = await make_edge(slice_bytes=slice_bytes, memory_max_object_bytes=16 * 1024)
    seek = await edge.get(
        "/lecture.mp4", headers={"Range": f"bytes={slice_bytes * 3 + 10}-{slice_bytes * 3 + 20}"}
    )
    assert seek.status == 206
    assert await seek.read() == body[slice_bytes * 3 + 10 : slice_bytes * 3 + 21]
    fetched = [seen.headers.get("Range") for seen in origin.requests_to("/lecture.mp4")]
    assert fetched == [
        f"bytes=0-{slice_bytes - 1}",
        f"bytes={slice_bytes * 3}-{slice_bytes * 4 - 1}",
    ]
    whole = await edge.get("/lecture.mp4")
    assert whole.status == 200
    assert whole.headers["Content-Length"] == str(len(body))
    assert await whole.read() == body
    assert origin.count("/lecture.mp4") == 6  # every slice once, never again
    await edge.get("/lecture.mp4")
    assert origin.count("/lecture.mp4") == 6


# ---- compression -----------------------------------------------------------------------------


async def test_brotli_and_gzip_variants_are_made_once(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    document = b'{"questions": [' + b'{"q": "What is a mole?", "a": 1},' * 200 + b"{}]}"
    origin.script(
        "/bundle.json",
        headers={"Cache-Control": "max-age=60", "ETag": '"b1"', **JSON},
        body=document,
    )
    origin.script(
        "/photo.jpg",
        headers={"Cache-Control": "max-age=60", "Content-Type": "image/jpeg"},
        body=b"\xff\xd8\xff" + b"a" * 5000,
    )
    edge = await make_edge()
    br = await edge.get(
        "/bundle.json", headers={"Accept-Encoding": "gzip, deflate, br"}, auto_decompress=False
    )
    raw = await br.read()
    assert br.headers["Content-Encoding"] == "br"
    assert brotli.decompress(raw) == document
    assert len(raw) < len(document) / 10
    assert br.headers["ETag"] == '"b1-br"'
    assert "Accept-Encoding" in br.headers["Vary"]
    gz = await edge.get("/bundle.json", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert gz.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await gz.read()) == document
    plain = await edge.get("/bundle.json", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    assert await plain.read() == document
    again = await edge.get("/bundle.json", headers={"Accept-Encoding": "br"}, auto_decompress=False)
    assert await again.read() == raw
    assert origin.count("/bundle.json") == 1
    image = await edge.get("/photo.jpg", headers={"Accept-Encoding": "br"}, auto_decompress=False)
    assert "Content-Encoding" not in image.headers
    not_modified = await edge.get(
        "/bundle.json", headers={"Accept-Encoding": "br", "If-None-Match": '"b1-br"'}
    )
    assert not_modified.status == 304


async def test_origin_supplied_encodings_pass_through(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    document = b'{"k": "' + b"v" * 4000 + b'"}'
    origin.script(
        "/pre.json",
        headers={
            "Cache-Control": "max-age=60",
            "Content-Encoding": "br",
            "Vary": "Accept-Encoding",
            **JSON,
        },
        body=brotli.compress(document),
    )
    edge = await make_edge()
    response = await edge.get("/pre.json", headers={"Accept-Encoding": "br"}, auto_decompress=False)
    assert response.headers["Content-Encoding"] == "br"
    assert brotli.decompress(await response.read()) == document
