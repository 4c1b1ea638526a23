"""The origin's caching headers for the content read API (RFC 9111, RFC 9213). Pure.

After :func:`common.http.evaluate_preconditions` and :func:`common.http.select_range`, the
handler asks :func:`cache_headers` what ``Cache-Control``, ``CDN-Cache-Control`` and
``Surrogate-Key`` go with a URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IMMUTABLE_TTL_S = 31_536_000


# ---- cache policy headers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The TTLs of a mutable URL, from the configuration's cache rules."""

    edge_ttl_s: int
    browser_ttl_s: int
    stale_while_revalidate_s: int = 0
    stale_if_error_s: int = 0
    compress: bool = False
    tags: tuple[str, ...] = ()


DEFAULT_MUTABLE_POLICY = CachePolicy(
    edge_ttl_s=60, browser_ttl_s=30, stale_while_revalidate_s=600, stale_if_error_s=86400
)


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for piece in re.split(r"(\*\*/?|\*|\?)", pattern):
        if piece in ("**/", "**"):
            parts.append("(?:.*/)?" if piece == "**/" else ".*")
        elif piece == "*":
            parts.append("[^/]*")
        elif piece == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(piece))
    return re.compile("^" + "".join(parts) + "$")


class RuleMatcher:
    """First matching rule wins, in configuration order. ``*`` stays within a path segment,
    ``**`` crosses segments."""

    def __init__(self, rules: Sequence[tuple[str, CachePolicy]]) -> None:
        self._rules = [(_glob_to_regex(pattern), policy) for pattern, policy in rules]

    def match(self, path: str) -> CachePolicy | None:
        for regex, policy in self._rules:
            if regex.match(path):
                return policy
        return None


def cache_headers(
    *, immutable: bool, policy: CachePolicy | None, tags: Iterable[str]
) -> dict[str, str]:
    """``Cache-Control`` for browsers, ``CDN-Cache-Control`` (RFC 9213) for edges, and
    ``Surrogate-Key`` (space-separated cache tags, deduplicated, in order)."""
    if immutable:
        browser = f"public, max-age={IMMUTABLE_TTL_S}, immutable"
        edge = f"max-age={IMMUTABLE_TTL_S}"
        extra_tags: tuple[str, ...] = ()
    else:
        policy = policy or DEFAULT_MUTABLE_POLICY
        stale = []
        if policy.stale_while_revalidate_s:
            stale.append(f"stale-while-revalidate={policy.stale_while_revalidate_s}")
        if policy.stale_if_error_s:
            stale.append(f"stale-if-error={policy.stale_if_error_s}")
        browser = ", ".join(["public", f"max-age={policy.browser_ttl_s}", *stale])
        edge = ", ".join([f"max-age={policy.edge_ttl_s}", *stale])
        extra_tags = policy.tags
    unique = list(dict.fromkeys([*tags, *extra_tags]))
    return {
        "Cache-Control": browser,
        "CDN-Cache-Control": edge,
        "Surrogate-Key": " ".join(unique),
    }
