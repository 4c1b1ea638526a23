"""deliver: which responses the edge compresses, and compressing them (once per object).

Text-like types (JSON, m3u8, text, SVG, JS, CSS, XML, WebVTT) are compressed; media (video,
audio, images other than SVG) and anything already encoded never are.
"""

from __future__ import annotations

import gzip

import brotli

COMPRESSIBLE_TYPES = frozenset(
    {
        "application/json",
        "application/vnd.apple.mpegurl",
        "application/x-mpegurl",
        "application/javascript",
        "application/xml",
        "application/manifest+json",
        "application/ld+json",
        "image/svg+xml",
        "text/vtt",
    }
)
MIN_COMPRESS_BYTES = 256
MAX_COMPRESS_BYTES = 32 * 1024 * 1024
INLINE_COMPRESS_BYTES = 16 * 1024
"""Bodies up to this size are compressed on the event loop (well under a millisecond);
larger ones in an executor."""
BROTLI_MAX_QUALITY_BYTES = 256 * 1024


def is_compressible(content_type: str | None) -> bool:
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return (
        media_type in COMPRESSIBLE_TYPES
        or media_type.startswith("text/")
        or media_type.endswith(("+json", "+xml"))
    )


def compress(body: bytes, coding: str) -> bytes:
    """Brotli at quality 11 for bodies up to 256 KiB (a few ms), 9 above (tens of ms per MiB
    instead of seconds); gzip at level 9. Done once per object and stored."""
    if coding == "br":
        quality = 11 if len(body) <= BROTLI_MAX_QUALITY_BYTES else 9
        mode = brotli.MODE_TEXT
        return bytes(brotli.compress(body, mode=mode, quality=quality))
    if coding == "gzip":
        return gzip.compress(body, compresslevel=9, mtime=0)
    raise ValueError(f"unknown coding {coding!r}")


def encoded_etag(etag: str | None, coding: str) -> str | None:
    """A distinct strong validator for the encoded representation (RFC 9110 §8.8.3)."""
    if etag is None:
        return None
    weak = etag.startswith("W/")
    opaque = etag.removeprefix("W/")
    if len(opaque) < 2 or not opaque.endswith('"'):
        return None
    return f'{"W/" if weak else ""}{opaque[:-1]}-{coding}"'
