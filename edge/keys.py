"""recv and hash: normalise the request target and build cache keys. Pure.

The key's host comes from configuration, never from the client's ``Host`` or
``X-Forwarded-Host`` (a header that is not part of the key must not change the answer). The
path is normalised the way RFC 3986 §6.2.2 allows — unreserved characters decoded, percent
encodings uppercased, dot segments removed, empty segments collapsed — and the normalised form
is both the key and what goes upstream, so the two can never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from edge.rfc9111 import Headers, get_all, split_list

MAX_TARGET_BYTES = 8192
_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ALLOWED_PATH_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"
)


class BadTarget(ValueError):
    """The request target cannot be normalised; answer 400 with this message."""


def _normalise_percent(text: str) -> str:
    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else f"%{match.group(1).upper()}"

    return _PERCENT_RE.sub(fix, text)


def normalise_path(raw_path: str) -> str:  # noqa: C901 - one branch per RFC 3986 §5.2.4 dot-segment rule
    """``/a/./b/../c//d%7e`` → ``/a/c/d~``. Raises :class:`BadTarget` for paths that climb
    above the root, contain encoded slashes or NULs, or characters not allowed in a path."""
    if not raw_path.startswith("/"):
        raise BadTarget("the request target must be an absolute path")
    if len(raw_path) > MAX_TARGET_BYTES:
        raise BadTarget("the request target is too long")
    if any(char not in _ALLOWED_PATH_CHARS for char in raw_path):
        raise BadTarget("the path contains characters that must be percent-encoded")
    if "%" in raw_path and re.search(r"%(?![0-9A-Fa-f]{2})", raw_path):
        raise BadTarget("the path has a malformed percent-encoding")
    path = _normalise_percent(raw_path)
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
        raise BadTarget("encoded '/', '\\' or NUL in the path")
    segments: list[str] = []
    for segment in path.split("/")[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise BadTarget("the path climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    normalised = "/" + "/".join(segments)
    if path.endswith(("/", "/.", "/..")) and segments:
        normalised += "/"
    return normalised


def normalise_query(raw_query: str) -> str:
    """Percent-encodings normalised, parameters sorted by name (stable for equal names), empty
    parameters dropped. The upstream receives exactly this."""
    if not raw_query:
        return ""
    if any(ord(char) < 0x21 or ord(char) > 0x7E for char in raw_query):
        raise BadTarget("the query contains characters that must be percent-encoded")
    params = [part for part in raw_query.split("&") if part]
    normalised = [_normalise_percent(part) for part in params]
    normalised.sort(key=lambda part: part.partition("=")[0])
    return "&".join(normalised)


@dataclass(frozen=True, slots=True)
class Target:
    path: str
    query: str

    @property
    def path_and_query(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def normalise_target(raw_target: str) -> Target:
    """The request-target of an origin-form request (RFC 9112 §3.2.1)."""
    path, _, query = raw_target.partition("?")
    query = query.partition("#")[0]
    return Target(normalise_path(path), normalise_query(query))


def primary_key(host: str, target: Target) -> str:
    """The URL part of the cache key."""
    return f"{host}{target.path_and_query}"


# ---- secondary keys (Vary) ------------------------------------------------------------------

Encoding = str
SUPPORTED_ENCODINGS: tuple[Encoding, ...] = ("br", "gzip")


def preferred_encoding(accept_encoding_values: Sequence[str]) -> Encoding:
    """Accept-Encoding → ``br``, ``gzip`` or ``identity`` (RFC 9110 §12.5.3 with q-values),
    so stored variants stay at three whatever browsers send."""
    weights: dict[str, float] = {}
    for item in split_list(accept_encoding_values):
        coding, *params = [part.strip() for part in item.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[coding.lower()] = q
    star = weights.get("*")
    best, best_q = "identity", 0.0
    for coding in SUPPORTED_ENCODINGS:
        q = weights.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    return best


def accepts_dictionary_encoding(values: Sequence[str]) -> bool:
    """The client takes RFC 9842 ``dcz`` (a delta against a dictionary it holds)."""
    for item in split_list(values):
        coding, *params = [part.strip() for part in item.split(";")]
        if coding.lower() == "dcz":
            return not any(p.replace(" ", "").lower() in ("q=0", "q=0.0", "q=0.00") for p in params)
    return False


def upstream_accept_encoding(values: Sequence[str]) -> str:
    """What the edge asks upstream for: the one preferred coding, plus ``dcz`` for clients
    that take dictionary deltas (the origin sends one only for a dictionary it knows, named by
    the request's ``Available-Dictionary``)."""
    preferred = preferred_encoding(values)
    return f"dcz, {preferred}" if accepts_dictionary_encoding(values) else preferred


def normalise_field(name: str, values: Sequence[str]) -> str:
    """A request field's value as a Vary secondary key component."""
    if name == "accept-encoding":
        return upstream_accept_encoding(values)
    if name == "accept":
        accepted = {item.split(";")[0].strip().lower() for item in split_list(values)}
        for image_format in ("image/avif", "image/webp"):
            if image_format in accepted:
                return image_format
        return "*"
    return ",".join(" ".join(value.split()) for value in values).lower()


def secondary_key(vary: tuple[str, ...], request_headers: Headers) -> str:
    """The request's values for the fields a stored response varies on, normalised."""
    return "&".join(
        f"{name}={normalise_field(name, get_all(request_headers, name))}" for name in vary
    )
