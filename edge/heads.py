"""Header rules both of the edge's lanes follow (the full flow in ``edge.app`` and the express
lane in ``edge.express``), written once so the two cannot answer differently."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from common.wire import PURGE_SEEN_HEADER
from edge.compression import encoded_etag
from edge.entry import EntryMeta

MAX_HEADER_BLOCK_BYTES = 32 * 1024
"""A request whose header block is larger gets 431."""
FLEET_HEADER = "Kshipra-Edge-Key"
"""Sent by an edge to its parent. A parent that recognises the key (derived from the purge
token, which every edge of one fleet shares) keeps the CDN-only fields — cache tags and
CDN-Cache-Control — in its answer, so edges behind a shield can purge by tag and use the edge
TTLs. Anyone else gets them stripped."""
HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
METRICS_PATH = "/metrics"
OWN_ROUTES = frozenset({HEALTHZ_PATH, READYZ_PATH, METRICS_PATH})
"""The edge's own routes (and everything under ``/.kshipra``): never proxied, never express."""
NOT_IN_304 = frozenset({"content-type", "content-encoding", "content-range", "accept-ranges"})
"""What deliver leaves out of a 304 (RFC 9110 §15.4.5 keeps the validators and caching
fields)."""
EXPRESS_BLOCKERS = (
    "Range",
    "If-Range",
    "If-Match",
    "If-Unmodified-Since",
    "Cache-Control",
    "Pragma",
    "Available-Dictionary",
    FLEET_HEADER,
    PURGE_SEEN_HEADER,
    "Expect",
    "Content-Length",
    "Transfer-Encoding",
)
"""Request fields that ask the edge for more than a stored response's bytes: such requests
take the full flow, never the express lane."""


def http_date(moment: float) -> str:
    """An IMF-fixdate (RFC 9110 §5.6.7)."""
    return format_datetime(datetime.fromtimestamp(moment, UTC), usegmt=True)


def header_block_bytes(raw_headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The request's header block as counted against :data:`MAX_HEADER_BLOCK_BYTES`."""
    return sum(len(name) + len(value) + 4 for name, value in raw_headers)


def made_from(encoded: EntryMeta, identity: EntryMeta, coding: str) -> bool:
    """*encoded* is the *coding* copy of this very stored *identity* response (same
    validator, same response, same purge state): it can be sent as it is."""
    return (
        encoded.etag == encoded_etag(identity.etag, coding)
        and encoded.response_time == identity.response_time
        and encoded.soft_purged == identity.soft_purged
    )
