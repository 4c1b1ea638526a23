"""Property tests (hypothesis) of the parsers the edge runs on every request and response:
Cache-Control, CDN-Cache-Control, Range, HTTP-date, Vary and request-target normalisation.

Two kinds of property for each: on any input at all, no exception but the documented one
(and no answer wider than the input allows); on well-formed input mixed with noise, exactly
the strict reading. Example counts are bounded so the test command stays fast; a longer run:
``HYPOTHESIS_PROFILE=long pytest tests/unit/test_parser_properties.py``.
"""

from __future__ import annotations

import os
import re
import string
from datetime import UTC, datetime

from http_sfv.dictionary import Dictionary as SfvDictionary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.http import (
    ByteSpan,
    Unsatisfiable,
    WholeBody,
    format_http_date,
    parse_http_date,
    select_range,
)
from edge.keys import BadTarget, normalise_target
from edge.rfc9111 import (
    MAX_DELTA_SECONDS,
    parse_cdn_directives,
    parse_directives,
    vary_names,
)

settings.register_profile(
    "default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Field values: any Latin-1 text (what a peer can put on the wire), and the punctuation the
# grammars care about, more often.
_FIELD_CHARS = st.sampled_from(list(string.printable + '\x00\x7f\xa0\xe9\xff=,;"\\-/'))
field_text = st.text(_FIELD_CHARS, max_size=80) | st.text(
    st.characters(max_codepoint=0xFF), max_size=40
)
TOKEN = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=12)

# ---- Cache-Control -------------------------------------------------------------------------


@given(st.lists(field_text, max_size=4))
def test_cache_control_never_raises_and_yields_tokens_and_bounded_seconds(
    values: list[str],
) -> None:
    directives = parse_directives(values)
    for name in directives.items:
        assert re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", name), name
        seconds = directives.seconds(name)
        assert seconds is not None
        assert 0 <= seconds <= MAX_DELTA_SECONDS


@given(
    st.lists(st.tuples(TOKEN, st.none() | st.integers(0, 10**12)), min_size=1, max_size=6),
    st.lists(field_text, max_size=3),
)
def test_cache_control_reads_well_formed_directives_exactly_among_noise(
    directives: list[tuple[str, int | None]], noise: list[str]
) -> None:
    items = [name if value is None else f"{name}={value}" for name, value in directives]
    # Noise in its own field lines: a broken line never hides a valid one.
    parsed = parse_directives([", ".join(items), *[n for n in noise if "," not in n]])
    first: dict[str, int | None] = {}
    for name, value in directives:
        first.setdefault(name, value)
    for name, value in first.items():
        assert parsed.has(name)
        expected = 0 if value is None else min(value, MAX_DELTA_SECONDS)
        assert parsed.seconds(name) == expected


# ---- CDN-Cache-Control ---------------------------------------------------------------------


@given(st.lists(field_text, max_size=3))
def test_cdn_cache_control_never_raises_and_ignores_invalid_fields_whole(
    values: list[str],
) -> None:
    parsed = parse_cdn_directives(values)
    if not values:
        assert parsed is None
        return
    try:
        SfvDictionary().parse(", ".join(values).encode("latin-1"))
        valid = True
    except (ValueError, UnicodeEncodeError):
        valid = False
    if not valid:
        assert parsed is None  # RFC 9213 §2.2: ignore the whole field
    if parsed is not None:
        for name in ("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"):
            raw = parsed.items.get(name)
            assert raw is None or raw.isdigit()


@given(st.integers(0, 10**15 - 1), st.sampled_from(["", ", no-store", ", private", ", foo=bar"]))
def test_cdn_cache_control_max_age_is_the_integer_given(seconds: int, more: str) -> None:
    """Any RFC 8941 Integer (at most 15 digits; a longer one makes the field invalid)."""
    parsed = parse_cdn_directives([f"max-age={seconds}{more}"])
    assert parsed is not None
    assert parsed.seconds("max-age") == min(seconds, MAX_DELTA_SECONDS)


@given(st.sampled_from(["1.5", '"60"', "?1", "(1 2)", "-1", "abc"]))
def test_cdn_cache_control_wrong_typed_max_age_is_not_consumed(value: str) -> None:
    parsed = parse_cdn_directives([f"max-age={value}"])
    assert parsed is None or not parsed.has("max-age")


# ---- Range ---------------------------------------------------------------------------------

_ETAG = '"v1"'
_MODIFIED = datetime(2026, 1, 1, tzinfo=UTC)


@given(field_text, st.integers(0, 10**7))
def test_a_range_never_raises_and_never_reaches_outside_the_representation(
    header: str, size: int
) -> None:
    decision = select_range(header, size_bytes=size, etag=_ETAG, last_modified=_MODIFIED)
    assert isinstance(decision, ByteSpan | Unsatisfiable | WholeBody)
    if isinstance(decision, ByteSpan):
        assert 0 <= decision.start <= decision.end < size


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(1, 10**9))
def test_a_well_formed_range_is_read_exactly(first: int, length: int, size: int) -> None:
    last = first + length
    decision = select_range(
        f"bytes={first}-{last}", size_bytes=size, etag=_ETAG, last_modified=_MODIFIED
    )
    if first >= size:
        assert isinstance(decision, Unsatisfiable)
    else:
        assert decision == ByteSpan(first, min(last, size - 1))


# ---- HTTP-date -----------------------------------------------------------------------------


@given(field_text)
def test_an_http_date_never_raises_and_is_utc_when_read(text: str) -> None:
    parsed = parse_http_date(text)
    assert parsed is None or parsed.tzinfo is UTC


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31)))
def test_an_imf_fixdate_round_trips(moment: datetime) -> None:
    moment = moment.replace(microsecond=0, tzinfo=UTC)
    text = format_http_date(moment)
    assert parse_http_date(text) == moment
    # Each lenient variant a browser-era parser would take is invalid here (RFC 9110 §5.6.7).
    for variant in (
        text.replace("GMT", "UTC"),
        text.replace(",", ""),
        text.replace(" ", "  ", 1),
        text.lower(),
        text.replace(" ", "-", 2).replace("-", " ", 1),
    ):
        assert parse_http_date(variant) is None, variant


# ---- Vary ----------------------------------------------------------------------------------


@given(st.lists(field_text, max_size=4))
def test_vary_names_are_field_names_from_the_field_or_star(values: list[str]) -> None:
    names = vary_names([("Vary", value) for value in values])
    assert list(names) == sorted(set(names))
    joined = " ".join(values).lower()
    for name in names:
        assert name == "*" or re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", name), name
        assert name in joined or name == "*"  # "*" also stands for a member that is no name


# ---- request-target ------------------------------------------------------------------------

_TARGET_CHARS = st.sampled_from([*"/.%?&=#~_-+aAzZ09:@!$'()*;, \x00\\", "%2f", "%2e", "%7E"])
target_text = st.lists(_TARGET_CHARS, max_size=40).map("".join) | field_text


@given(target_text)
@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
def test_a_target_is_refused_or_normalised_to_a_fixed_point_under_the_root(raw: str) -> None:
    try:
        target = normalise_target(raw)
    except BadTarget:
        return
    path = target.path
    assert path.startswith("/")
    segments = path.split("/")[1:]
    assert ".." not in segments
    assert "." not in segments
    assert "" not in segments[:-1]  # no empty segment but a trailing slash
    assert "%2f" not in path.lower()
    assert "\x00" not in path
    assert normalise_target(target.path_and_query) == target  # normalising is idempotent


def test_a_vary_member_that_is_no_field_name_is_not_reusable() -> None:
    assert vary_names([("Vary", 'Accept-Encoding, "x"')]) == ("*", "accept-encoding")
    assert vary_names([("Vary", "Accept-Encoding, Save-Data")]) == ("accept-encoding", "save-data")
