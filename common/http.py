"""HTTP semantics every service shares (RFC 9110). Pure.

A server that answers a read asks two questions of these functions, in this order:

1. :func:`evaluate_preconditions` — answer 304 or 412 instead of the content?
2. :func:`select_range` — the whole representation, one byte range, or 416?

Also HTTP-dates (the three forms of RFC 9110 §5.6.7) and entity-tag lists (§8.8.3). The
origin's own answer to "what caching headers go with this URL" is ``origin.delivery``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Literal

# ---- validators ---------------------------------------------------------------------------


def format_http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = r"(\d{2}):(\d{2}):(\d{2})"
_IMF_FIXDATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{{2}}) {_MONTH} (\d{{4}}) {_TIME} GMT", re.ASCII
)
_RFC850_DATE = re.compile(
    rf"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (\d{{2}})-{_MONTH}-"
    rf"(\d{{2}}) {_TIME} GMT",
    re.ASCII,
)
_ASCTIME_DATE = re.compile(
    rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} ( \d|\d{{2}}) {_TIME} (\d{{4}})", re.ASCII
)


def parse_http_date(value: str | None, *, now: datetime | None = None) -> datetime | None:
    """An HTTP-date, or ``None`` when absent or invalid. RFC 9110 §5.6.7 allows three forms
    only, case-sensitive: IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete RFC 850
    form (``Sunday, 06-Nov-94 08:49:37 GMT``; a two-digit year more than 50 years ahead of *now*
    is the most recent past year with those digits) and asctime
    (``Sun Nov  6 08:49:37 1994``). Other zones, dashes in IMF dates, missing commas, two-digit
    years elsewhere and extra spaces are invalid: recipients then ignore a conditional, and
    an invalid ``Expires`` means already expired (RFC 9111 §5.3). A leap second (60) counts as
    59."""
    if not value:
        return None
    text = value.strip(" \t")
    year: int
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year_text, hour, minute, second = match.groups()
        year = int(year_text)
    elif match := _RFC850_DATE.fullmatch(text):
        day, month, year_text, hour, minute, second = match.groups()
        this_year = (now or datetime.now(UTC)).year
        year = this_year - this_year % 100 + int(year_text)
        if year > this_year + 50:
            year -= 100
    elif match := _ASCTIME_DATE.fullmatch(text):
        month, day, hour, minute, second, year_text = match.groups()
        year = int(year_text)
    else:
        return None
    try:
        return datetime(
            year,
            _MONTHS.index(month) + 1,
            int(day),
            int(hour),
            int(minute),
            min(int(second), 59),
            tzinfo=UTC,
        )
    except ValueError:
        return None


_ETAG_RE = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


def parse_etag_list(value: str) -> list[tuple[bool, str]] | Literal["*"]:
    """``If-None-Match`` / ``If-Match`` → ``"*"`` or a list of (weak, opaque-tag-with-quotes).
    Malformed members are skipped."""
    if value.strip() == "*":
        return "*"
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(value):
        match = _ETAG_RE.match(value, position)
        if not match:
            next_comma = value.find(",", position)
            if next_comma < 0:
                break
            position = next_comma + 1
            continue
        tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
    return tags


def _strong_match(tags: list[tuple[bool, str]], etag: str) -> bool:
    return any(not weak and tag == etag for weak, tag in tags)


def _weak_match(tags: list[tuple[bool, str]], etag: str) -> bool:
    return any(tag == etag.removeprefix("W/") for _, tag in tags)


Precondition = Literal["proceed", "not-modified", "failed"]


def evaluate_preconditions(
    method: str,
    headers: Mapping[str, str],
    *,
    etag: str,
    last_modified: datetime,
) -> Precondition:
    """RFC 9110 §13.2.2 order: If-Match, If-Unmodified-Since, If-None-Match,
    If-Modified-Since. *etag* is the strong tag with quotes."""
    safe = method in ("GET", "HEAD")
    last_modified = last_modified.replace(microsecond=0)
    if_match = headers.get("If-Match")
    if if_match is not None:
        tags = parse_etag_list(if_match)
        if tags != "*" and not _strong_match(tags, etag):
            return "failed"
    else:
        since = parse_http_date(headers.get("If-Unmodified-Since"))
        if since is not None and last_modified > since:
            return "failed"
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        tags = parse_etag_list(if_none_match)
        if tags == "*" or _weak_match(tags, etag):
            return "not-modified" if safe else "failed"
    elif safe:
        since = parse_http_date(headers.get("If-Modified-Since"))
        if since is not None and last_modified <= since:
            return "not-modified"
    return "proceed"


# ---- ranges -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WholeBody:
    """Send the whole representation (no Range, an ignored Range, or a failed If-Range)."""


@dataclass(frozen=True, slots=True)
class ByteSpan:
    """Send bytes ``start..end`` inclusive as a 206."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size_bytes: int) -> str:
        return f"bytes {self.start}-{self.end}/{size_bytes}"


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """Answer 416 with ``Content-Range: bytes */size``; *reason* goes in the error body."""

    reason: str


RangeDecision = WholeBody | ByteSpan | Unsatisfiable
_RANGE_SPEC_RE = re.compile(r"^\s*([0-9]*)\s*-\s*([0-9]*)\s*$")
_HUGE_POSITION = 10**18


def _position(digits: str) -> int:
    """A byte position from ASCII digits; absurdly long numbers are simply 'past the end'."""
    significant = digits.lstrip("0") or "0"
    return _HUGE_POSITION if len(significant) > 18 else int(significant)


def _if_range_holds(if_range: str, etag: str, last_modified: datetime) -> bool:
    """RFC 9110 §13.1.5: a strong ETag must match exactly; a date must equal Last-Modified."""
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == etag
    date = parse_http_date(if_range)
    return date is not None and date == last_modified.replace(microsecond=0)


def select_range(  # noqa: C901, PLR0911 - one return per case of RFC 9110 §14.1.2-14.2
    range_header: str | None,
    *,
    size_bytes: int,
    if_range: str | None = None,
    etag: str,
    last_modified: datetime,
) -> RangeDecision:
    """One ``bytes`` range → :class:`ByteSpan`; unsatisfiable or malformed byte ranges →
    :class:`Unsatisfiable`; no Range, another unit, several ranges, or an If-Range that no
    longer holds → :class:`WholeBody` (RFC 9110 §14.2 lets a server ignore those)."""
    if range_header is None:
        return WholeBody()
    if if_range is not None and not _if_range_holds(if_range, etag, last_modified):
        return WholeBody()
    unit, sep, spec_list = range_header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return WholeBody()
    specs = [spec for spec in spec_list.split(",") if spec.strip()]
    if not specs:
        return Unsatisfiable(f"malformed Range header {range_header!r}")
    if len(specs) > 1:
        return WholeBody()
    match = _RANGE_SPEC_RE.match(specs[0])
    if not match or match.groups() == ("", ""):
        return Unsatisfiable(f"malformed Range header {range_header!r}")
    first_text, last_text = match.groups()
    if first_text == "":
        suffix_length = _position(last_text)
        if suffix_length == 0 or size_bytes == 0:
            return Unsatisfiable(f"range {range_header!r} selects no bytes of {size_bytes}")
        return ByteSpan(max(0, size_bytes - suffix_length), size_bytes - 1)
    first = _position(first_text)
    if last_text and _position(last_text) < first:
        return Unsatisfiable(f"malformed Range header {range_header!r}: last byte before first")
    last = _position(last_text) if last_text else size_bytes - 1
    if first >= size_bytes:
        return Unsatisfiable(
            f"range {range_header!r} starts past the end of a {size_bytes}-byte representation"
        )
    return ByteSpan(first, min(last, size_bytes - 1))
