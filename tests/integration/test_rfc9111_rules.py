"""Pure RFC 9111 rules of the edge, as tables, and the same rules seen through a real edge on
loopback (hence the ``integration`` marker)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from edge.rfc9111 import (
    MAX_DELTA_SECONDS,
    Freshness,
    RequestControls,
    age_seconds,
    initial_age_s,
    may_serve_stale_when_unreachable,
    parse_cdn_directives,
    reuse,
)
from tests.edge_fixtures import ScriptedOrigin

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], 0),
        (["0"], 0),
        (["7200"], 7200),
        (["7200, 0"], 7200),  # §5.1: the first member of a list-based value
        (["7200", "0"], 7200),  # two field lines: the same list
        (["  30 "], 30),
        (["-5"], MAX_DELTA_SECONDS),  # invalid: stale, never fresh
        (["ten"], MAX_DELTA_SECONDS),
        (["1e3"], MAX_DELTA_SECONDS),
        (["٣"], MAX_DELTA_SECONDS),  # a non-ASCII digit is not a digit here
        (["99999999999999999999"], MAX_DELTA_SECONDS),
    ],
)
def test_age_field(values: list[str], expected: int) -> None:
    assert age_seconds(values) == expected


def test_an_invalid_age_makes_the_response_stale() -> None:
    age = initial_age_s([("Age", "soon")], request_time=100.0, response_time=100.0)
    assert age >= MAX_DELTA_SECONDS


async def test_a_list_based_age_over_the_lifetime_is_stale_through_the_edge(
    upstream: tuple[ScriptedOrigin, TestServer], make_edge: Any
) -> None:
    origin, _ = upstream
    origin.script("/old", headers={"Cache-Control": "max-age=3600", "Age": "7200, 0"}, body=b"o")
    edge = await make_edge()
    for _ in range(2):
        response = await edge.get("/old")
        assert await response.read() == b"o"
        assert "hit" not in response.headers["Cache-Status"]
    assert origin.count("/old") == 2


def freshness(*, age_s: float, soft_purged: bool = False) -> Freshness:
    return Freshness(
        lifetime_s=60,
        age_s=age_s,
        stale_while_revalidate_s=600,
        stale_if_error_s=86_400,
        must_revalidate=False,
        no_cache=False,
        soft_purged=soft_purged,
    )


@pytest.mark.parametrize(
    ("stored", "controls", "expected"),
    [
        (freshness(age_s=10), RequestControls(), "fresh"),
        (freshness(age_s=100), RequestControls(), "stale-while-revalidate"),
        (freshness(age_s=1000), RequestControls(), "must-validate"),
        # A soft purge: revalidated before use, whatever the age or window; only an
        # upstream failure may bring the old copy out.
        (freshness(age_s=10, soft_purged=True), RequestControls(), "stale-if-error-only"),
        (freshness(age_s=100, soft_purged=True), RequestControls(), "stale-if-error-only"),
        (
            freshness(age_s=10, soft_purged=True),
            RequestControls(max_stale=MAX_DELTA_SECONDS),
            "stale-if-error-only",
        ),
    ],
)
def test_reuse(stored: Freshness, controls: RequestControls, expected: str) -> None:
    assert reuse(stored, controls) == expected


async def test_an_expires_in_a_form_http_does_not_allow_is_already_expired(
    upstream: tuple[ScriptedOrigin, TestServer], make_edge: Any
) -> None:
    """RFC 9110 §5.6.7 + RFC 9111 §5.3: ``UTC`` is not an HTTP-date zone, so this Expires is
    invalid, and an invalid Expires means already expired."""
    origin, _ = upstream
    origin.script("/e", headers={"Expires": "Sun, 06 Nov 2099 08:49:37 UTC"}, body=b"e")
    edge = await make_edge()
    for _ in range(2):
        response = await edge.get("/e")
        assert await response.read() == b"e"
        assert "hit" not in response.headers["Cache-Status"]
    assert origin.count("/e") == 2


@pytest.mark.parametrize(
    ("body", "vary"),
    [
        (b'{"a": 1}', False),  # under the compression threshold: never encoded here
        (b'{"a": "' + b"x" * 4000 + b'"}', True),  # encoded copies are made: Vary says so
    ],
)
async def test_vary_accept_encoding_only_where_the_edge_encodes(
    upstream: tuple[ScriptedOrigin, TestServer], make_edge: Any, body: bytes, vary: bool
) -> None:
    origin, _ = upstream
    origin.script(
        "/j", headers={"Cache-Control": "max-age=60", "Content-Type": "application/json"}, body=body
    )
    edge = await make_edge()
    for _ in range(2):  # the miss and the (express) hit
        response = await edge.get("/j", headers={"Accept-Encoding": "identity"})
        assert await response.read() == body
        assert ("Accept-Encoding" in response.headers.get("Vary", "")) is vary


@pytest.mark.parametrize(
    ("cdn", "expected"),
    [
        ([], None),  # absent: Cache-Control governs
        (["max-age=60"], {"max-age": "60"}),
        (["max-age=60, public"], {"max-age": "60", "public": None}),
        (["max-age=60", "stale-if-error=30"], {"max-age": "60", "stale-if-error": "30"}),
        (["max-age=60;x=1"], {"max-age": "60"}),  # parameters are not directives
        (['private="set-cookie"'], {"private": "set-cookie"}),
        (["none"], {"none": None}),  # RFC 9213 §3.1: a valid field with no known directive
        # A valid Dictionary whose members have the wrong type: not consumed (§2.1).
        (["max-age=1.5"], {}),
        (['max-age="60"'], {}),
        (["max-age=-1"], {}),
        (["no-store=?0"], {}),
        (["max-age=(1 2)"], {}),
        # Not a Dictionary at all: the whole field is ignored (§2.2).
        (["max-age=60 60"], None),
        (["MAX-AGE=60"], None),
        (["max-age=60,"], None),
        (["max-age=60; no-store"], {"max-age": "60"}),  # ';' starts a parameter
        (["max-age==60"], None),
    ],
)
def test_cdn_cache_control_is_a_structured_field(
    cdn: list[str], expected: dict[str, str | None] | None
) -> None:
    parsed = parse_cdn_directives(cdn)
    assert (None if parsed is None else dict(parsed.items)) == expected


async def test_an_invalid_cdn_cache_control_falls_back_to_cache_control(
    upstream: tuple[ScriptedOrigin, TestServer], make_edge: Any
) -> None:
    """A lenient reading of ``max-age=600 600`` would store the object for 10 minutes; the
    field is not a valid Dictionary, so the edge follows Cache-Control (no-store)."""
    origin, _ = upstream
    origin.script(
        "/c",
        headers={"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600 600"},
        body=b"c",
    )
    origin.script(
        "/ok",
        headers={"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600"},
        body=b"k",
    )
    edge = await make_edge()
    for _ in range(2):
        assert "hit" not in (await edge.get("/c")).headers["Cache-Status"]
    assert origin.count("/c") == 2
    await (await edge.get("/ok")).read()
    assert "hit" in (await edge.get("/ok")).headers["Cache-Status"]


@pytest.mark.parametrize(
    ("stored", "grace_s", "expected"),
    [
        (freshness(age_s=100), 3600, True),
        (freshness(age_s=4000), 3600, False),
        (freshness(age_s=100), 0, False),
        (freshness(age_s=100, soft_purged=True), 3600, True),
        (
            Freshness(
                lifetime_s=60,
                age_s=100,
                stale_while_revalidate_s=0,
                stale_if_error_s=0,
                must_revalidate=True,
                no_cache=False,
            ),
            3600,
            False,
        ),
    ],
)
def test_stale_when_unreachable(stored: Freshness, grace_s: float, expected: bool) -> None:
    assert may_serve_stale_when_unreachable(stored, grace_s) is expected


@pytest.mark.parametrize(("grace_s", "served"), [(3600.0, True), (0.0, False)])
async def test_an_unreachable_origin_gets_stale_content_within_the_grace(
    upstream: tuple[ScriptedOrigin, TestServer], make_edge: Any, grace_s: float, served: bool
) -> None:
    """No stale-if-error from the origin: a dropped connection still gets the stored copy
    (the default grace), not a 502, for a student who was reading it."""
    origin, _ = upstream
    script = origin.script("/g", headers={"Cache-Control": "max-age=1", "Age": "5"}, body=b"g")
    edge = await make_edge(stale_if_unreachable_s=grace_s)
    await (await edge.get("/g")).read()
    script.drop_connection = True
    response = await edge.get("/g")
    if served:
        assert response.status == 200
        assert await response.read() == b"g"
        assert "detail=stale-if-unreachable" in response.headers["Cache-Status"]
    else:
        assert response.status == 502
    script.drop_connection = False
    script.status = 503  # the origin answers: only stale-if-error could allow the old copy
    assert (await edge.get("/g")).status == 503
