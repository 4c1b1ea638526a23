"""Pure RFC 9111 rules of the edge, as tables (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from edge.rfc9111 import MAX_DELTA_SECONDS, age_seconds, initial_age_s
from tests.edge_fixtures import ScriptedOrigin


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
