"""Tell an upload's kind from its first bytes, never from its name or Content-Type.

Pure: takes bytes, returns a :class:`Sniffed` value or ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["lecture", "image", "bundle"]
KINDS: tuple[Kind, ...] = ("lecture", "image", "bundle")
SNIFF_BYTES = 512
"""Bytes of the head of a file :func:`sniff` wants (it copes with fewer at end of file)."""

_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"}
_VIDEO_BRANDS_QT = {b"qt  "}
_VIDEO_BRANDS = {b"isom", b"iso2", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"dash", b"M4V "}


@dataclass(frozen=True, slots=True)
class Sniffed:
    kind: Kind
    format: str
    """Short name of what was recognised, for messages: ``mp4``, ``png``, ``json`` …"""
    content_type: str
    extension: str


def _sniff_iso_bmff(head: bytes) -> Sniffed | None:
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    major = head[8:12]
    box_size = int.from_bytes(head[0:4], "big")
    compatible = {head[i : i + 4] for i in range(16, min(box_size, len(head)) - 3, 4)}
    image_like = bool(compatible & _IMAGE_BRANDS) and not compatible & _VIDEO_BRANDS
    if major in _IMAGE_BRANDS or image_like:
        fmt = "avif" if major in {b"avif", b"avis"} or b"avif" in compatible else "heic"
        return Sniffed("image", fmt, f"image/{fmt}", fmt)
    if major in _VIDEO_BRANDS_QT:
        return Sniffed("lecture", "mov", "video/quicktime", "mov")
    return Sniffed("lecture", "mp4", "video/mp4", "mp4")


def _sniff_json(head: bytes) -> Sniffed | None:
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if text[:1] not in (b"{", b"["):
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character may be cut at the end of the sniffed head.
        if exc.start < len(head) - 3:
            return None
    return Sniffed("bundle", "json", "application/json", "json")


def _sniff_mpeg_ts(head: bytes) -> Sniffed | None:
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:
        return Sniffed("lecture", "mpegts", "video/mp2t", "ts")
    return None


def sniff(head: bytes) -> Sniffed | None:  # noqa: PLR0911 - one return per container format
    """Recognise a lecture (MP4/MOV, Matroska/WebM, AVI, MPEG-TS), an image (JPEG, PNG, WebP,
    GIF, AVIF/HEIC) or a bundle (JSON object or array) from the first bytes of a file."""
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("image", "jpeg", "image/jpeg", "jpg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("image", "png", "image/png", "png")
    if head.startswith((b"GIF87a", b"GIF89a")):
        return Sniffed("image", "gif", "image/gif", "gif")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return Sniffed("image", "webp", "image/webp", "webp")
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return Sniffed("lecture", "avi", "video/x-msvideo", "avi")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        fmt = "webm" if b"webm" in head[:64] else "matroska"
        if fmt == "webm":
            return Sniffed("lecture", "webm", "video/webm", "webm")
        return Sniffed("lecture", "matroska", "video/x-matroska", "mkv")
    return _sniff_iso_bmff(head) or _sniff_mpeg_ts(head) or _sniff_json(head)
