"""What the edge keeps about a stored response, as plain data both tiers can hold.

Four shapes share one key space:

* ``full`` — a whole response (status, headers, body);
* ``vary`` — a marker at the URL's key naming the fields its responses vary on; the responses
  themselves live at ``key + VARIANT_SEP + secondary key``;
* ``sliced`` — the headers of an object too large to keep whole; its bytes live in fixed-size
  ``slice`` entries at ``key + SLICE_SEP + index``;
* ``slice`` — one slice's bytes.

Encoded copies the edge makes itself (Brotli, gzip) are ``full`` entries at
``key + ENCODING_SEP + coding``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from edge.compression import MAX_COMPRESS_BYTES, MIN_COMPRESS_BYTES, is_compressible
from edge.rfc9111 import (
    EDGE_ONLY,
    Freshness,
    FreshnessBasis,
    Headers,
    freshness_basis,
    get_all,
    get_one,
    split_list,
)

EntryKind = Literal["full", "vary", "sliced", "slice"]
VARIANT_SEP = "\x00v:"
SLICE_SEP = "\x00s:"
ENCODING_SEP = "\x00e:"


@dataclass(frozen=True)
class EntryMeta:
    kind: EntryKind
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    """Stored response headers: hop-by-hop removed; CDN-only fields kept for the record and
    stripped on delivery."""
    request_time: float = 0.0
    response_time: float = 0.0
    body_bytes: int = 0
    total_bytes: int = 0
    """For ``sliced``: the whole object's size. For ``slice``: ditto (to check consistency)."""
    slice_bytes: int = 0
    vary: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    url_key: str = ""
    """The primary (URL) key this entry belongs to: purges by URL and prefix match on it."""
    soft_purged: bool = False
    etag: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As the disk tier stores it (and its index holds it, for every entry): the fields
        from ``total_bytes`` on only when they differ from their defaults, which
        :meth:`from_dict` restores."""
        data: dict[str, Any] = {
            "kind": self.kind,
            "status": self.status,
            "headers": [list(pair) for pair in self.headers],
            "request_time": self.request_time,
            "response_time": self.response_time,
            "body_bytes": self.body_bytes,
        }
        if self.total_bytes:
            data["total_bytes"] = self.total_bytes
        if self.slice_bytes:
            data["slice_bytes"] = self.slice_bytes
        if self.vary:
            data["vary"] = list(self.vary)
        if self.tags:
            data["tags"] = list(self.tags)
        if self.url_key:
            data["url_key"] = self.url_key
        if self.soft_purged:
            data["soft_purged"] = True
        if self.etag is not None:
            data["etag"] = self.etag
        if self.extra:
            data["extra"] = self.extra
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntryMeta:
        return cls(
            kind=data["kind"],
            status=int(data["status"]),
            headers=tuple((sys.intern(str(k)), str(v)) for k, v in data["headers"]),
            request_time=float(data["request_time"]),
            response_time=float(data["response_time"]),
            body_bytes=int(data["body_bytes"]),
            total_bytes=int(data.get("total_bytes", 0)),
            slice_bytes=int(data.get("slice_bytes", 0)),
            vary=tuple(data.get("vary", ())),
            tags=tuple(data.get("tags", ())),
            url_key=str(data.get("url_key", "")),
            soft_purged=bool(data.get("soft_purged", False)),
            etag=data.get("etag"),
            extra=dict(data.get("extra", {})),
        )

    @cached_property
    def _basis(self) -> FreshnessBasis:
        return freshness_basis(
            self.headers,
            status=self.status,
            request_time=self.request_time,
            response_time=self.response_time,
        )

    @cached_property
    def delivery_headers(
        self,
    ) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], str | None, bool]:
        """Computed once per stored response for deliver: (client headers, CDN-only headers,
        an upstream Cache-Status to append to, whether a Date is present). Age,
        Content-Length and Cache-Status are left out: deliver sets them per response."""
        client: list[tuple[str, str]] = []
        edge_only: list[tuple[str, str]] = []
        prior: list[str] = []
        has_date = False
        for pair in self.headers:  # the stored pairs themselves: no copies kept per entry
            lowered = pair[0].lower()
            if lowered in ("age", "content-length"):
                continue
            if lowered == "cache-status":
                prior.append(pair[1])
                continue
            if lowered == "date":
                has_date = True
            (edge_only if lowered in EDGE_ONLY else client).append(pair)
        return tuple(client), tuple(edge_only), ", ".join(prior) or None, has_date

    @cached_property
    def etag_field(self) -> str | None:
        """The stored ``ETag`` field's value (what deliver compares conditionals with)."""
        return self.header("etag")

    @cached_property
    def encodable(self) -> bool:
        """The edge makes its own Brotli and gzip copies of this response: a compressible
        type, not encoded by upstream, of a size worth compressing."""
        return (
            self.header("content-encoding") is None
            and is_compressible(self.header("content-type"))
            and MIN_COMPRESS_BYTES <= self.body_bytes <= MAX_COMPRESS_BYTES
        )

    @cached_property
    def varies_on_encoding(self) -> bool:
        """Its delivery depends on the client's ``Accept-Encoding`` (``Vary`` says so): the edge
        makes encoded copies of it, or it is such a copy (or upstream's). A response the edge
        never encodes (too small, too large, not text) carries no ``Vary`` from the edge: Vary
        names only what chose the representation (RFC 9110 §12.5.5)."""
        if self.encodable:
            return True
        return self.header("content-encoding") in ("br", "gzip") and is_compressible(
            self.header("content-type")
        )

    @cached_property
    def lacks_vary_accept_encoding(self) -> bool:
        """Delivery must add ``Vary: Accept-Encoding``: the response :attr:`varies_on_encoding`
        and its stored ``Vary`` does not name it yet (the one rule for the full flow and the
        express lane)."""
        return self.varies_on_encoding and "accept-encoding" not in {
            v.strip().lower() for v in split_list(get_all(self.headers, "vary"))
        }

    def freshness(self, now: float) -> Freshness:
        return self._basis.at(now, soft_purged=self.soft_purged)

    def header(self, name: str) -> str | None:
        return get_one(self.headers, name)

    def with_headers(
        self, headers: Headers, *, request_time: float, response_time: float
    ) -> EntryMeta:
        return replace(
            self,
            headers=tuple(headers),
            request_time=request_time,
            response_time=response_time,
            soft_purged=False,
        )
