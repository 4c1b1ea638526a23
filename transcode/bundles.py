"""Question-bank bundles → a canonical, versioned JSON document, pre-compressed, plus deltas.

The pipeline, step by step (each a function below):

1. :func:`parse_json` — strict JSON: UTF-8 (a BOM is tolerated), no duplicate keys, no
   ``NaN``/``Infinity``;
2. :func:`validate_bundle` — the schema (:class:`Bundle`, pydantic, strict types) and the
   rules a schema cannot say (unique ids, answer within the options); the first few problems
   are reported with their JSON paths, e.g. ``questions[3].options: at least 2 options``;
3. :func:`canonical_bytes` — one byte sequence per content: sorted keys, compact separators,
   UTF-8 without ``\\u`` escapes, every string NFC-normalised (done by validation), and the
   caller's version number as ``"version"``. Questions keep the author's order: order is
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
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import brotli
import zstandard
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from transcode.base import (
    OutputFile,
    Outputs,
    PermanentFault,
    Progress,
    TranscodeError,
    no_progress,
)

MAX_QUESTIONS: Final = 20_000
MAX_TEXT_BYTES: Final = 10 * 1024
"""Longest string, in UTF-8 bytes (Devanagari takes three bytes a character)."""
MIN_OPTIONS: Final = 2
MAX_OPTIONS: Final = 6
MAX_REPORTED_PROBLEMS: Final = 5

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


Problem = tuple[str, str]
"""(JSON path, message), e.g. ``("questions[3].options", "at least 2 options")``."""


class BundleInvalid(PermanentFault):
    """The document is JSON but not a valid bundle; ``problems`` lists all that were found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        shown = "; ".join(
            f"{path}: {message}" for path, message in problems[:MAX_REPORTED_PROBLEMS]
        )
        more = len(problems) - MAX_REPORTED_PROBLEMS
        suffix = f" (and {more} more)" if more > 0 else ""
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid bundle, {len(problems)} {noun}: {shown}{suffix}")


class DczError(TranscodeError, ValueError):
    """A ``dcz`` stream that is malformed or was made with another dictionary."""


# ---- the schema -----------------------------------------------------------------------------


def _text(value: str) -> str:
    """Non-blank, valid Unicode, at most MAX_TEXT_BYTES in UTF-8; returned NFC-normalised."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "text_unicode", "not valid Unicode text (a lone surrogate escape)"
        ) from None
    if size > MAX_TEXT_BYTES:
        raise PydanticCustomError(
            "text_too_long",
            "longer than {limit} bytes in UTF-8 ({size})",
            {"limit": MAX_TEXT_BYTES, "size": size},
        )
    if not value.strip():
        raise PydanticCustomError("text_blank", "must not be empty or blank")
    return unicodedata.normalize("NFC", value)


def _question_id(value: str) -> str:
    if not (
        1 <= len(value) <= 64
        and value.isascii()
        and value[0].isalnum()
        and all(c.isalnum() or c in "._:-" for c in value)
    ):
        raise PydanticCustomError(
            "question_id",
            "must be 1 to 64 ASCII letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
        )
    return value


Text = Annotated[str, AfterValidator(_text)]
QuestionId = Annotated[str, AfterValidator(_question_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Bilingual(_Strict):
    en: Text
    hi: Text


class Question(_Strict):
    id: QuestionId
    subject: Text
    chapter: Text
    stem: Bilingual
    options: Annotated[list[Bilingual], Field(min_length=MIN_OPTIONS, max_length=MAX_OPTIONS)]
    answer: Annotated[int, Field(ge=0)]
    """Index into ``options``, from 0."""
    explanation: Bilingual


class Bundle(_Strict):
    bundle: Text
    """The bundle's title."""
    questions: Annotated[list[Question], Field(min_length=1, max_length=MAX_QUESTIONS)]
    version: int | None = None
    """Accepted so that a published document can be edited and uploaded again; replaced by the
    version the worker assigns."""


# ---- parse and validate ---------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r} in an object")
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes) -> Any:
    """Strict JSON from bytes; :class:`PermanentFault` for anything else."""
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PermanentFault(f"not UTF-8 text: bad byte at offset {exc.start}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise PermanentFault(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except ValueError as exc:
        raise PermanentFault(f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise PermanentFault("not valid JSON: nested too deeply") from exc


def json_path(loc: Sequence[int | str]) -> str:
    """``("questions", 3, "stem", "hi")`` → ``questions[3].stem.hi``; the root is ``$``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "$"


def _describe(error: ErrorDetails) -> str:
    kind, ctx, loc = error["type"], error.get("ctx", {}), error["loc"]
    noun = loc[-1] if loc and isinstance(loc[-1], str) else "items"
    if kind in ("too_short", "too_long"):
        count = ctx["min_length" if kind == "too_short" else "max_length"]
        noun = noun[:-1] if count == 1 and noun.endswith("s") else noun
        return f"{'at least' if kind == 'too_short' else 'at most'} {count} {noun}"
    messages = {
        "missing": "required",
        "extra_forbidden": "unknown field",
        "string_type": "must be a string",
        "int_type": "must be an integer",
        "model_type": "must be an object",
        "dict_type": "must be an object",
        "list_type": "must be an array",
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
    }
    return messages.get(kind, error["msg"])


def _rule_problems(bundle: Bundle) -> list[Problem]:
    """What the schema cannot check: unique ids, answer within the options."""
    problems: list[Problem] = []
    first_index: dict[str, int] = {}
    for index, question in enumerate(bundle.questions):
        first = first_index.setdefault(question.id, index)
        if first != index:
            problems.append(
                (f"questions[{index}].id", f"duplicate id {question.id!r}, as questions[{first}]")
            )
        if question.answer >= len(question.options):
            problems.append(
                (
                    f"questions[{index}].answer",
                    f"{question.answer} is out of range for {len(question.options)} options "
                    f"(0 to {len(question.options) - 1})",
                )
            )
    return problems


def validate_bundle(document: Any) -> Bundle:
    """A :class:`Bundle` from parsed JSON, or :class:`BundleInvalid` listing the problems."""
    if not isinstance(document, dict):
        raise BundleInvalid([("$", "must be a JSON object")])
    try:
        bundle = Bundle.model_validate(document)
    except ValidationError as exc:
        raise BundleInvalid(
            [(json_path(e["loc"]), _describe(e)) for e in exc.errors(include_url=False)]
        ) from None
    if problems := _rule_problems(bundle):
        raise BundleInvalid(problems)
    return bundle


# ---- canonical form -------------------------------------------------------------------------


def canonical_bytes(bundle: Bundle, version: int) -> bytes:
    """The one byte sequence for this content and version (see the module docstring)."""
    document = bundle.model_dump(exclude={"version"})
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


def settings_from_job(settings: Mapping[str, Any]) -> BundleSettings:
    """:class:`BundleSettings` from a job's JSON settings: ``version``, ``previous_versions``
    (K) and ``previous``, a list of ``{"version": m, "path": file of v{m}'s bundle.json}``."""
    previous = tuple(
        PreviousVersion(int(p["version"]), Path(p["path"]).read_bytes())
        for p in settings.get("previous", ())
    )
    return BundleSettings(
        version=int(settings["version"]),
        previous=previous,
        max_deltas=int(settings.get("previous_versions", 3)),
    )


def run_for_job(
    source: Path, out_dir: Path, settings: Mapping[str, Any], progress: Progress = no_progress
) -> Outputs:
    """:func:`run` with the settings a job carries as JSON (see :func:`settings_from_job`)."""
    return run(source, out_dir, settings_from_job(settings), progress)
