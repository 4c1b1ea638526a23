"""Question-bank bundles → a canonical, versioned JSON document, pre-compressed, plus deltas.

The pipeline, step by step (each a function below):

1. :func:`parse_json` — strict JSON: UTF-8 (a BOM is tolerated), no duplicate keys, no
   ``NaN``/``Infinity``;
2. :func:`validate_bundle` — the schema, :mod:`assets.bundle_schema` (pydantic, strict types;
   the origin checks it too, at upload, and answers 422): text as a plain string or a map of
   language codes (``en``, ``hi``, ``ta``, ``hi-latn`` …) to text, ``image`` references (an
   http(s) URL or a catalogue asset id), the rules a schema cannot say (unique ids, answer
   within the options). Fields the schema does not know (``difficulty``, ``year``, ``marks``,
   ``topic`` …) are kept and published as given. The first few problems are reported with
   their JSON paths, e.g. ``$.questions[3].options: at least 2 options``;
3. :func:`canonical_bytes` — one byte sequence per content: sorted keys, compact separators,
   UTF-8 without ``\\u`` escapes, every string NFC-normalised (done by validation), the
   fields as the author gave them (known and passed-through; a text keeps its form, string or
   language map), and the caller's version number as ``"version"``. Questions keep the
   author's order: order is
   content (the app shows a set in that order, JSON arrays are ordered, RFC 8785 keeps array
   order), and sorting by id would make a deliberate reordering invisible; deltas handle moves;
4. :func:`encode_br` (Brotli quality 11) and :func:`encode_gzip` (level 9, mtime 0): the stored
   ``Content-Encoding`` variants of the identity form;
5. :func:`encode_dcz` against each of the previous K versions: RFC 9842 dictionary-compressed
   Zstandard, with the previous version's canonical (identity) bytes as a raw-content
   dictionary. :func:`decode_dcz` reverses it for tests, edges and clients.

``dcb`` (dictionary-compressed Brotli) is not produced: the ``brotli`` binding in this
environment has no shared-dictionary API (nor does any binding installed here). ``details``
says so.

Output names: ``bundle.json``, ``bundle.json.br``, ``bundle.json.gz`` and
``bundle.json.v{m}.dcz`` (a delta from version m). Every file's ``content_type`` is
``application/json``, the media type of the decoded document; the suffix names the
``Content-Encoding`` (``.br`` → ``br``, ``.gz`` → ``gzip``, ``.dcz`` → ``dcz``), as does
``details``. Plain blocking code: the worker runs :func:`run` in an executor.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import brotli
import zstandard

from assets import bundle_schema
from assets.bundle_schema import (
    MAX_OPTIONS,
    MAX_QUESTIONS,
    MAX_REPORTED_PROBLEMS,
    MAX_TEXT_BYTES,
    MIN_OPTIONS,
    Bundle,
    NotStrictJson,
    Problem,
    Question,
    SchemaProblems,
    json_path,
    summary,
)
from assets.processing import BundleJob
from transcode.base import (
    OutputFile,
    Outputs,
    PermanentFault,
    Progress,
    TranscodeError,
    no_progress,
)

__all__ = [
    "MAX_OPTIONS",
    "MAX_QUESTIONS",
    "MAX_REPORTED_PROBLEMS",
    "MAX_TEXT_BYTES",
    "MIN_OPTIONS",
    "Bundle",
    "BundleInvalid",
    "BundleSettings",
    "DczError",
    "PreviousVersion",
    "Question",
    "canonical_bytes",
    "decode_dcz",
    "encode_br",
    "encode_dcz",
    "encode_gzip",
    "json_path",
    "parse_json",
    "run",
    "run_for_job",
    "validate_bundle",
]

IDENTITY_NAME: Final = "bundle.json"
CONTENT_TYPE: Final = "application/json"

DCZ_MAGIC: Final = bytes.fromhex("5e2a4d1820000000")
"""RFC 9842 §5: a Zstandard skippable frame (magic 0x184D2A5E, 32 bytes of payload) whose
payload is the SHA-256 of the dictionary; the Zstandard frame follows."""
DCZ_HEADER_BYTES: Final = len(DCZ_MAGIC) + 32
DCZ_MIN_WINDOW_LIMIT: Final = 8 * 1024 * 1024
DCZ_MAX_WINDOW_LIMIT: Final = 128 * 1024 * 1024

DCB_SKIPPED: Final = (
    "skipped: the installed brotli binding has no shared-dictionary API, so no dcb deltas"
)


# ---- errors ---------------------------------------------------------------------------------


class BundleInvalid(PermanentFault):
    """The document is JSON but not a valid bundle; ``problems`` lists all that were found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = [Problem(*p) for p in problems]
        super().__init__(summary(self.problems))


class DczError(TranscodeError, ValueError):
    """A ``dcz`` stream that is malformed or was made with another dictionary."""


# ---- parse and validate (the schema is assets.bundle_schema's) ------------------------------


def parse_json(data: bytes) -> Any:
    """Strict JSON from bytes; :class:`PermanentFault` for anything else."""
    try:
        return bundle_schema.parse_json(data)
    except NotStrictJson as exc:
        raise PermanentFault(str(exc)) from exc


def validate_bundle(document: Any) -> Bundle:
    """A :class:`Bundle` from parsed JSON, or :class:`BundleInvalid` listing the problems."""
    try:
        return bundle_schema.validate_bundle(document)
    except SchemaProblems as exc:
        raise BundleInvalid(exc.problems) from None


# ---- canonical form -------------------------------------------------------------------------


def canonical_bytes(bundle: Bundle, version: int) -> bytes:
    """The one byte sequence for this content and version (see the module docstring)."""
    document = bundle.document()
    document["version"] = version
    return json.dumps(
        document, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def structured_field_hash(data: bytes) -> str:
    """The SHA-256 of ``data`` as an RFC 8941 byte sequence, ``:base64:``: how
    ``Available-Dictionary`` names a dictionary (RFC 9842 §2.2)."""
    return f":{base64.b64encode(hashlib.sha256(data).digest()).decode('ascii')}:"


# ---- encodings ------------------------------------------------------------------------------


def encode_br(data: bytes, quality: int = 11) -> bytes:
    """Brotli with the smallest window (10 to 24 bits) that holds the whole document, so that a
    phone's decoder allocates no more than it needs."""
    lgwin = 10
    while lgwin < 24 and (1 << lgwin) - 16 < len(data):
        lgwin += 1
    result: bytes = brotli.compress(data, quality=quality, lgwin=lgwin)
    return result


def encode_gzip(data: bytes, level: int = 9) -> bytes:
    """gzip with mtime 0 and no file name: the same bytes for the same input."""
    return gzip.compress(data, compresslevel=level, mtime=0)


def dcz_window_limit(dictionary_bytes: int) -> int:
    """RFC 9842 §5: a ``dcz`` window is at most the larger of 8 MB and 1.25 x the
    dictionary, and never more than 128 MB."""
    return min(max(DCZ_MIN_WINDOW_LIMIT, dictionary_bytes * 5 // 4), DCZ_MAX_WINDOW_LIMIT)


def dcz_window_log(content_bytes: int, dictionary_bytes: int) -> int:
    """The window for a delta: large enough to hold the whole new version (a Zstandard
    dictionary stays reachable only while the frame's content fits in the window), within
    the RFC's limit."""
    wanted = max(10, math.ceil(math.log2(max(content_bytes, 1))))
    allowed = math.floor(math.log2(dcz_window_limit(dictionary_bytes)))
    return min(wanted, allowed)


def _raw_dictionary(dictionary: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode_dcz(content: bytes, dictionary: bytes, level: int = 19) -> bytes:
    """``content`` as RFC 9842 ``dcz``: the 40-byte header, then a Zstandard frame compressed
    with ``dictionary`` as raw content (content size and checksum written, no dictionary id).

    Use level >= 6: with a dictionary of megabytes, level 3's small search tables find almost
    nothing in it (measured: 85% of full Brotli at level 3, 2% at 6, 1.5% at 19)."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(content),
        dict_size=len(dictionary),
        window_log=dcz_window_log(len(content), len(dictionary)),
        write_content_size=1,
        write_checksum=1,
        write_dict_id=0,
    )
    compressor = zstandard.ZstdCompressor(
        dict_data=_raw_dictionary(dictionary), compression_params=params
    )
    return DCZ_MAGIC + hashlib.sha256(dictionary).digest() + compressor.compress(content)


def decode_dcz(stream: bytes, dictionary: bytes) -> bytes:
    """The content of a ``dcz`` stream made with ``dictionary``.

    Checks the header and that the stream names this dictionary's SHA-256, and refuses a
    window above the RFC's limit for this dictionary; :class:`DczError` otherwise."""
    if len(stream) < DCZ_HEADER_BYTES or not stream.startswith(DCZ_MAGIC):
        raise DczError("not a dcz stream: the RFC 9842 header is missing")
    if stream[len(DCZ_MAGIC) : DCZ_HEADER_BYTES] != hashlib.sha256(dictionary).digest():
        raise DczError("the dcz stream was compressed with a different dictionary")
    decompressor = zstandard.ZstdDecompressor(
        dict_data=_raw_dictionary(dictionary),
        max_window_size=dcz_window_limit(len(dictionary)),
    )
    try:
        return decompressor.decompress(stream[DCZ_HEADER_BYTES:], allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DczError(f"corrupt dcz stream: {exc}") from exc


# ---- settings and the pipeline --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreviousVersion:
    version: int
    canonical: bytes
    """That version's identity bytes as published (``bundle.json``): the dictionary clients
    hold and name by its SHA-256."""


@dataclass(frozen=True, slots=True)
class BundleSettings:
    version: int
    """The number this version is published as (``v{n}``), written into the document."""
    previous: tuple[PreviousVersion, ...] = ()
    """Earlier versions, in any order; deltas are made from the ``max_deltas`` newest."""
    max_deltas: int = 3
    brotli_quality: int = 11
    gzip_level: int = 9
    zstd_level: int = 19

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"version must be at least 1: {self.version}")
        numbers = [p.version for p in self.previous]
        if len(set(numbers)) != len(numbers) or any(not 1 <= n < self.version for n in numbers):
            raise ValueError(
                f"previous versions must be distinct and in [1, {self.version}): {numbers}"
            )
        if self.max_deltas < 0:
            raise ValueError(f"max_deltas must not be negative: {self.max_deltas}")
        if not 6 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level must be in [6, 22]: {self.zstd_level}")

    def delta_bases(self) -> list[PreviousVersion]:
        """The previous versions to make deltas from, newest first."""
        newest_first = sorted(self.previous, key=lambda p: p.version, reverse=True)
        return newest_first[: self.max_deltas]


def delta_name(from_version: int) -> str:
    return f"{IDENTITY_NAME}.v{from_version}.dcz"


def run(
    source: Path,
    out_dir: Path,
    settings: BundleSettings,
    progress: Progress = no_progress,
) -> Outputs:
    """Validate, canonicalise, compress and delta-encode the bundle at ``source``."""
    progress("validate", 0.0)
    bundle = validate_bundle(parse_json(source.read_bytes()))
    canonical = canonical_bytes(bundle, settings.version)
    bases = settings.delta_bases()
    steps = 3 + len(bases)
    progress("encode", 1 / steps)

    files: list[OutputFile] = []

    def write(name: str, body: bytes) -> int:
        path = out_dir / name
        path.write_bytes(body)
        files.append(OutputFile(name, path, CONTENT_TYPE))
        return len(body)

    encodings = {"identity": {"file": IDENTITY_NAME, "bytes": write(IDENTITY_NAME, canonical)}}
    br_name, gzip_name = IDENTITY_NAME + ".br", IDENTITY_NAME + ".gz"
    br_bytes = write(br_name, encode_br(canonical, settings.brotli_quality))
    encodings["br"] = {"file": br_name, "bytes": br_bytes}
    progress("encode", 2 / steps)
    gzip_bytes = write(gzip_name, encode_gzip(canonical, settings.gzip_level))
    encodings["gzip"] = {"file": gzip_name, "bytes": gzip_bytes}
    progress("encode", 3 / steps)

    deltas: list[dict[str, Any]] = []
    for step, base in enumerate(bases, start=4):
        name = delta_name(base.version)
        size = write(name, encode_dcz(canonical, base.canonical, settings.zstd_level))
        deltas.append(
            {
                "from_version": base.version,
                "file": name,
                "encoding": "dcz",
                "dictionary_sha256": sha256_hex(base.canonical),
                "available_dictionary": structured_field_hash(base.canonical),
                "bytes": size,
            }
        )
        progress("delta", step / steps)
    progress("done", 1.0)

    details: dict[str, Any] = {
        "version": settings.version,
        "questions": len(bundle.questions),
        "sha256": sha256_hex(canonical),
        "available_dictionary": structured_field_hash(canonical),
        "encodings": encodings,
        "deltas": deltas,
        "dcb": DCB_SKIPPED,
    }
    return Outputs(files=files, primary=IDENTITY_NAME, details=details)


def settings_from_job(settings: BundleJob) -> BundleSettings:
    """:class:`BundleSettings` from a bundle job's: its version, the K previous versions to
    make deltas against, and the files the worker downloaded them to."""
    previous = tuple(
        PreviousVersion(p.version, Path(p.path).read_bytes()) for p in settings.previous
    )
    return BundleSettings(
        version=settings.version, previous=previous, max_deltas=settings.previous_versions
    )


def run_for_job(
    source: Path, out_dir: Path, settings: BundleJob, progress: Progress = no_progress
) -> Outputs:
    """:func:`run` with a bundle job's settings (see :func:`settings_from_job`)."""
    return run(source, out_dir, settings_from_job(settings), progress)
