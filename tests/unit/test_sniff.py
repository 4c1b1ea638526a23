"""Upload kinds are recognised from the first bytes of a file, never from names."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from typing import Final

import pytest
from PIL import Image

from assets.sniff import SNIFF_BYTES, Sniffed, sniff

# ---- hand-built heads with real magic numbers -----------------------------------------------


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    """An ISO-BMFF file head: the ftyp box, then the start of the next box."""
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    box = struct.pack(">I", 8 + len(body)) + b"ftyp" + body
    return box + struct.pack(">I", 8) + b"free" + struct.pack(">I", 1024) + b"mdat"


def riff(form: bytes, first_chunk: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 123_456) + form + first_chunk


def ebml(doc_type: bytes, doc_type_version: int) -> bytes:
    """The EBML header every Matroska/WebM file starts with, then a Segment ID."""
    elements = (
        b"\x42\x86\x81\x01"  # EBMLVersion 1
        + b"\x42\xf7\x81\x01"  # EBMLReadVersion 1
        + b"\x42\xf2\x81\x04"  # EBMLMaxIDLength 4
        + b"\x42\xf3\x81\x08"  # EBMLMaxSizeLength 8
        + b"\x42\x82"
        + bytes([0x80 | len(doc_type)])
        + doc_type  # DocType
        + b"\x42\x87\x81"
        + bytes([doc_type_version])  # DocTypeVersion
        + b"\x42\x85\x81\x02"  # DocTypeReadVersion 2
    )
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(elements)]) + elements + b"\x18\x53\x80\x67"


def ts_packet(pid: int) -> bytes:
    header = bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10])
    return header + b"\xff" * 184


JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdb"
JPEG_EXIF_HEAD = b"\xff\xd8\xff\xe1\x1c\x45Exif\x00\x00MM\x00\x2a"
PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00\x02\x80\x00\x00\x01\xe0\x08\x02"
GIF87_HEAD = b"GIF87a\x40\x01\xf0\x00\xf7\x00\x00"
GIF89_HEAD = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff"

IMAGE: Final = "image"
LECTURE: Final = "lecture"
BUNDLE: Final = "bundle"

RECOGNISED = [
    pytest.param(JPEG_HEAD, Sniffed(IMAGE, "jpeg", "image/jpeg", "jpg"), id="jpeg-jfif"),
    pytest.param(JPEG_EXIF_HEAD, Sniffed(IMAGE, "jpeg", "image/jpeg", "jpg"), id="jpeg-exif"),
    pytest.param(PNG_HEAD, Sniffed(IMAGE, "png", "image/png", "png"), id="png"),
    pytest.param(GIF87_HEAD, Sniffed(IMAGE, "gif", "image/gif", "gif"), id="gif87a"),
    pytest.param(GIF89_HEAD, Sniffed(IMAGE, "gif", "image/gif", "gif"), id="gif89a"),
    pytest.param(
        riff(b"WEBP", b"VP8 \x2c\x00\x00\x00"),
        Sniffed(IMAGE, "webp", "image/webp", "webp"),
        id="webp-lossy",
    ),
    pytest.param(
        riff(b"WEBP", b"VP8L\x2c\x00\x00\x00"),
        Sniffed(IMAGE, "webp", "image/webp", "webp"),
        id="webp-lossless",
    ),
    pytest.param(
        ftyp(b"avif", b"avif", b"mif1", b"miaf", b"MA1B"),
        Sniffed(IMAGE, "avif", "image/avif", "avif"),
        id="avif",
    ),
    pytest.param(
        ftyp(b"mif1", b"mif1", b"avif", b"miaf"),
        Sniffed(IMAGE, "avif", "image/avif", "avif"),
        id="avif-major-mif1",
    ),
    pytest.param(
        ftyp(b"avis", b"avis", b"msf1", b"miaf"),
        Sniffed(IMAGE, "avif", "image/avif", "avif"),
        id="avif-sequence",
    ),
    pytest.param(
        ftyp(b"heic", b"mif1", b"heic"),
        Sniffed(IMAGE, "heic", "image/heic", "heic"),
        id="heic-iphone",
    ),
    pytest.param(
        ftyp(b"mif1", b"mif1", b"heic", b"miaf"),
        Sniffed(IMAGE, "heic", "image/heic", "heic"),
        id="heic-major-mif1",
    ),
    pytest.param(
        ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"),
        Sniffed(LECTURE, "mp4", "video/mp4", "mp4"),
        id="mp4-isom",
    ),
    pytest.param(
        ftyp(b"mp42", b"mp42", b"isom"),
        Sniffed(LECTURE, "mp4", "video/mp4", "mp4"),
        id="mp4-mp42",
    ),
    pytest.param(
        ftyp(b"qt  ", b"qt  "),
        Sniffed(LECTURE, "mov", "video/quicktime", "mov"),
        id="mov-quicktime",
    ),
    pytest.param(
        ebml(b"matroska", 4),
        Sniffed(LECTURE, "matroska", "video/x-matroska", "mkv"),
        id="matroska",
    ),
    pytest.param(
        ebml(b"webm", 2),
        Sniffed(LECTURE, "webm", "video/webm", "webm"),
        id="webm",
    ),
    pytest.param(
        riff(b"AVI ", b"LIST\x94\x11\x00\x00hdrlavih"),
        Sniffed(LECTURE, "avi", "video/x-msvideo", "avi"),
        id="avi",
    ),
    pytest.param(
        ts_packet(0) + ts_packet(0x1000) + ts_packet(0x100)[:100],
        Sniffed(LECTURE, "mpegts", "video/mp2t", "ts"),
        id="mpeg-ts",
    ),
]

BUNDLE_JSON = Sniffed(BUNDLE, "json", "application/json", "json")
QUESTION = json.dumps(
    {"bundle": "chem-mole", "stem": {"hi": "प्रश्न 1 🧪"}}, ensure_ascii=False
).encode()


@pytest.mark.parametrize(("head", "expected"), RECOGNISED)
def test_recognised_formats(head: bytes, expected: Sniffed) -> None:
    assert sniff(head) == expected


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b'{"bundle": "chem-mole", "questions": []}', id="object"),
        pytest.param(b'[{"id": "q1"}, {"id": "q2"}]', id="array"),
        pytest.param(b' \t\r\n  {"id": "q1"}', id="leading-whitespace"),
        pytest.param(b'\xef\xbb\xbf{"id": "q1"}', id="utf8-bom"),
        pytest.param(b"\xef\xbb\xbf\n\n[1, 2, 3]", id="bom-then-newlines"),
        pytest.param(QUESTION, id="devanagari-and-emoji"),
        pytest.param(b"{", id="just-a-brace"),
    ],
)
def test_json_bundles(head: bytes) -> None:
    assert sniff(head) == BUNDLE_JSON


def _cut_inside(text: bytes, char: str, keep: int) -> bytes:
    """*text* cut after the first *keep* bytes of the UTF-8 encoding of *char*."""
    start = text.index(char.encode())
    return text[: start + keep]


@pytest.mark.parametrize(
    ("char", "keep"),
    [
        ("प", 1),  # 3-byte Devanagari letter, 1 of 3 bytes kept
        ("प", 2),
        ("🧪", 1),  # 4-byte emoji, 1 of 4 bytes kept
        ("🧪", 2),
        ("🧪", 3),
    ],
)
def test_json_head_cut_inside_a_multibyte_character_is_still_a_bundle(char: str, keep: int) -> None:
    head = _cut_inside(QUESTION, char, keep)
    with pytest.raises(UnicodeDecodeError):
        head.decode("utf-8")
    assert sniff(head) == BUNDLE_JSON


def test_json_head_cut_at_the_sniff_size_is_still_a_bundle() -> None:
    document = json.dumps({"stem": "प्रश्न " * 200}, ensure_ascii=False).encode()
    cut = next(n for n in range(SNIFF_BYTES, SNIFF_BYTES - 4, -1) if (document[n] & 0xC0) == 0x80)
    assert sniff(document[:cut]) == BUNDLE_JSON


def _deterministic_bytes(size: int) -> bytes:
    blocks = (hashlib.sha256(b"kshipra-%d" % i).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def _plain_text_starting_with_g() -> bytes:
    text = b"Good morning, learners! Today we revise the mole concept. " * 8
    assert text[0] == 0x47
    assert text[188] != 0x47
    return text


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"Hello, learners! This is a plain text note.\n", id="plain-text"),
        pytest.param(_plain_text_starting_with_g(), id="text-starting-with-G-not-ts"),
        pytest.param(_deterministic_bytes(SNIFF_BYTES), id="random-bytes"),
        pytest.param(b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00", id="elf"),
        pytest.param(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(20), id="zip"),
        pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", id="pdf"),
        pytest.param(riff(b"WAVE", b"fmt \x10\x00\x00\x00"), id="riff-wave"),
        pytest.param(b"ID3\x04\x00\x00\x00\x00\x00\x00", id="mp3"),
        pytest.param(b"\xff\xd8", id="truncated-jpeg-marker"),
        pytest.param(b"\x89PNG\r\n", id="truncated-png-signature"),
        pytest.param(ts_packet(0)[:188], id="single-ts-packet"),
        pytest.param(b"<html><body>{}</body></html>", id="html"),
        pytest.param(b'{"name": "\xe9t\xe9 latin-1", "q": 1}', id="json-looking-latin1"),
    ],
)
def test_unsupported_heads_are_not_recognised(head: bytes) -> None:
    assert sniff(head) is None


# ---- real files made by Pillow --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pillow_format", "expected_format", "content_type"),
    [
        ("JPEG", "jpeg", "image/jpeg"),
        ("PNG", "png", "image/png"),
        ("GIF", "gif", "image/gif"),
        ("WEBP", "webp", "image/webp"),
    ],
)
def test_images_made_by_pillow(pillow_format: str, expected_format: str, content_type: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, pillow_format)
    sniffed = sniff(buffer.getvalue()[:SNIFF_BYTES])
    assert sniffed is not None
    assert (sniffed.kind, sniffed.format, sniffed.content_type) == (
        "image",
        expected_format,
        content_type,
    )
