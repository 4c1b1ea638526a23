"""The question-bank schema: what a bundle upload must be, as a pure function of its bytes.

Pure: pydantic and the standard library only (no aiohttp, boto3, redis, no transcode code), so
the origin checks an upload with it before storing anything (HTTP 422 with the problems) and
the worker (:mod:`transcode.bundles`) checks it again before publishing.

A bundle is a JSON object ``{"bundle": title, "questions": [...]}``; each question has ``id``,
``subject``, ``chapter``, ``stem``, ``options`` (2 to 6), ``answer`` (index into ``options``,
from 0) and ``explanation``, and may have ``image``.

* **Text** (title, subject, chapter, stem, explanation, an option) is either a plain string or
  an object mapping language codes to text, with at least one language:
  ``"Mole concept"``, ``{"en": "…"}``, ``{"hi": "…"}``, ``{"en": "…", "hi": "…", "ta": "…"}``.
  English (``en``) and Hindi (``hi``) are what the app shows today; any other language is
  allowed. A language code is a lowercase BCP 47 tag of a 2- or 3-letter language subtag,
  optionally a 4-letter script and a 2-letter or 3-digit region (:data:`LANGUAGE_RE`):
  ``en``, ``hi``, ``ta``, ``bn``, ``mr``, ``te``, ``gu``, ``kn``, ``ml``, ``pa``, ``or``,
  ``as``, ``ur``, ``hi-latn`` (romanised Hindi), ``en-in``, ``pa-arab-pk``. Every string is
  non-blank, valid Unicode, at most :data:`MAX_TEXT_BYTES` in UTF-8, and NFC-normalised.
* **Options** are text, or an object ``{"text": text, "image": ref}`` with at least one of the
  two (a figure as an option). An option object is one that has a ``text`` or ``image`` key;
  any other object is a language map.
* **Images** (``image`` on a question — the stem's figure — or on an option) are references,
  never bytes: an ``http://`` or ``https://`` URL, or the id of an asset in the catalogue (the
  asset id slug, :data:`ASSET_ID_RE`, the same pattern as :mod:`assets.catalogue`'s). Whether
  that asset exists is not checked here.
* **Fields the schema does not know** — on the bundle, a question or an option object, e.g.
  ``difficulty``, ``year``, ``marks``, ``topic``, ``exam`` — are kept and passed through to
  the published document as they are (strings NFC-normalised, nesting at most
  :data:`MAX_PASSTHROUGH_DEPTH` levels). Inside a language map every key must be a language
  code.
* **Rules beyond types**: question ids unique (1 to 64 ASCII letters, digits, ``._:-``),
  ``answer`` within the options, at most :data:`MAX_QUESTIONS` questions.
* **JSON** (:func:`parse_json`): UTF-8 (a BOM is tolerated), no duplicate keys in an object,
  no ``NaN``/``Infinity``.

Every problem is reported with its JSON path (``$.questions[3].answer``,
``$.questions[0].stem['hi-latn']``); :func:`check_bundle_bytes` raises :class:`BundleRefused`
with all of them.
"""

from __future__ import annotations

import json
import re
import unicodedata
import urllib.parse
from collections.abc import Sequence
from typing import Annotated, Any, Final, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

MAX_QUESTIONS: Final = 20_000
MAX_TEXT_BYTES: Final = 10 * 1024
"""Longest string, in UTF-8 bytes (Devanagari takes three bytes a character)."""
MIN_OPTIONS: Final = 2
MAX_OPTIONS: Final = 6
MAX_LANGUAGES: Final = 32
MAX_URL_BYTES: Final = 2048
MAX_PASSTHROUGH_DEPTH: Final = 32
MAX_REPORTED_PROBLEMS: Final = 5
"""Problems named in an exception's one-line message (all are on ``problems``)."""

LANGUAGE_RE: Final = re.compile(r"^[a-z]{2,3}(?:-[a-z]{4})?(?:-(?:[a-z]{2}|[0-9]{3}))?$")
ASSET_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
"""The catalogue's asset id pattern (``assets.catalogue.ASSET_ID_RE``; a test keeps the two the
same — importing the catalogue would bring the storage clients)."""

_QUESTION_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_QUESTION_PATH_RE: Final = re.compile(r"^\$\.questions\[(\d+)\]")
_TAG_STRING: Final = "<string>"
_TAG_LANGUAGES: Final = "<languages>"
_TAG_OPTION: Final = "<option>"
_TAGS: Final = frozenset({_TAG_STRING, _TAG_LANGUAGES, _TAG_OPTION})


# ---- problems -------------------------------------------------------------------------------


class Problem(NamedTuple):
    """One thing wrong with a bundle: ``("$.questions[3].options", "at least 2 options")``."""

    path: str
    message: str


def summary(problems: Sequence[Problem]) -> str:
    """``invalid bundle, 2 problems: $.a: …; $.b: …`` naming the first few."""
    shown = "; ".join(f"{path}: {message}" for path, message in problems[:MAX_REPORTED_PROBLEMS])
    more = len(problems) - MAX_REPORTED_PROBLEMS
    suffix = f" (and {more} more)" if more > 0 else ""
    noun = "problem" if len(problems) == 1 else "problems"
    return f"invalid bundle, {len(problems)} {noun}: {shown}{suffix}"


class BundleRefused(ValueError):
    """The bytes are not a valid bundle. ``code`` is ``invalid_json`` (not strict JSON) or
    ``invalid_bundle`` (JSON, but not the schema); ``problems`` lists every problem found."""

    code = "invalid_bundle"

    def __init__(self, problems: Sequence[Problem], message: str | None = None) -> None:
        self.problems = [Problem(*p) for p in problems]
        super().__init__(message or summary(self.problems))


class NotStrictJson(BundleRefused):
    code = "invalid_json"

    def __init__(self, message: str) -> None:
        super().__init__([Problem("$", message)], message)


class SchemaProblems(BundleRefused):
    code = "invalid_bundle"


# ---- value types ----------------------------------------------------------------------------


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


def _language(value: str) -> str:
    if not LANGUAGE_RE.match(value):
        raise PydanticCustomError(
            "language_code",
            "not a language code: use a lowercase BCP 47 tag such as 'en', 'hi', 'ta' or 'hi-latn'",
        )
    return value


def _question_id(value: str) -> str:
    if not _QUESTION_ID_RE.match(value):
        raise PydanticCustomError(
            "question_id",
            "must be 1 to 64 ASCII letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
        )
    return value


def is_image_ref(value: str) -> bool:
    """An ``http(s)`` URL with a host, or a catalogue asset id."""
    if ASSET_ID_RE.match(value) and ".." not in value:
        return True
    if len(value.encode("utf-8", "replace")) > MAX_URL_BYTES:
        return False
    if any(c.isspace() or unicodedata.category(c).startswith("C") for c in value):
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # a malformed port raises
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _image_ref(value: str) -> str:
    if not is_image_ref(value):
        raise PydanticCustomError(
            "image_ref",
            "must be an http(s) URL or a catalogue asset id (a-z, 0-9, '.', '_', '-')",
        )
    return value


def _passthrough(value: Any, depth: int = 0) -> Any:
    """A field the schema does not know, as parsed JSON: strings and keys NFC-normalised."""
    if depth > MAX_PASSTHROUGH_DEPTH:
        raise PydanticCustomError(
            "passthrough_depth",
            "nested more than {limit} levels",
            {"limit": MAX_PASSTHROUGH_DEPTH},
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError(
                "text_unicode", "not valid Unicode text (a lone surrogate escape)"
            ) from None
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [_passthrough(item, depth + 1) for item in value]
    if isinstance(value, dict):
        result: dict[str, Any] = {}
        for key, item in value.items():
            name = _passthrough(key, depth + 1)
            if name in result:
                raise PydanticCustomError(
                    "passthrough_keys",
                    "two keys are the same after Unicode normalisation: '{key}'",
                    {"key": name},
                )
            result[name] = _passthrough(item, depth + 1)
        return result
    return value  # int, float, bool, None: JSON parsing already refused NaN and Infinity


TextString = Annotated[str, AfterValidator(_text)]
LanguageCode = Annotated[str, AfterValidator(_language)]
QuestionId = Annotated[str, AfterValidator(_question_id)]
ImageRef = Annotated[str, AfterValidator(_image_ref)]
Passthrough = Annotated[Any, AfterValidator(_passthrough)]
LanguageMap = Annotated[
    dict[LanguageCode, TextString], Field(min_length=1, max_length=MAX_LANGUAGES)
]


def _text_form(value: Any) -> str | None:
    if isinstance(value, str):
        return _TAG_STRING
    if isinstance(value, dict):
        return _TAG_LANGUAGES
    return None


def _option_form(value: Any) -> str | None:
    if isinstance(value, BaseModel) or (
        isinstance(value, dict) and ("text" in value or "image" in value)
    ):
        return _TAG_OPTION  # a model: serialising a validated OptionObject
    return _text_form(value)


_TEXT_TYPE_MESSAGE: Final = "must be a string or an object of language code to text"

Text = Annotated[
    Annotated[TextString, Tag(_TAG_STRING)] | Annotated[LanguageMap, Tag(_TAG_LANGUAGES)],
    Discriminator(
        _text_form, custom_error_type="text_type", custom_error_message=_TEXT_TYPE_MESSAGE
    ),
]
"""A plain string, or ``{language code: string}`` with at least one language."""


class _Object(BaseModel):
    """Strict types; unknown fields kept (validated as :data:`Passthrough`)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Passthrough] = Field(init=False)

    @model_validator(mode="after")
    def _extra_names(self) -> _Object:
        """Unknown fields' names: valid Unicode, NFC-normalised, not a known field's."""
        extra = self.__pydantic_extra__
        if not extra or all(name.isascii() for name in extra):
            return self
        renamed: dict[str, Any] = {}
        for name, value in extra.items():
            key = _passthrough(name)
            if key in renamed or key in type(self).model_fields:
                raise PydanticCustomError(
                    "passthrough_keys",
                    "two keys are the same after Unicode normalisation: '{key}'",
                    {"key": key},
                )
            renamed[key] = value
        extra.clear()
        extra.update(renamed)
        return self


class OptionObject(_Object):
    text: Text | None = None
    image: ImageRef | None = None

    @model_validator(mode="after")
    def _text_or_image(self) -> OptionObject:
        if self.text is None and self.image is None:
            raise PydanticCustomError("option_empty", "an option needs 'text' or 'image'")
        return self


Option = Annotated[
    Annotated[TextString, Tag(_TAG_STRING)]
    | Annotated[LanguageMap, Tag(_TAG_LANGUAGES)]
    | Annotated[OptionObject, Tag(_TAG_OPTION)],
    Discriminator(
        _option_form,
        custom_error_type="option_type",
        custom_error_message=f"{_TEXT_TYPE_MESSAGE}, or an object with 'text' and/or 'image'",
    ),
]


class Question(_Object):
    id: QuestionId
    subject: Text
    chapter: Text
    stem: Text
    image: ImageRef | None = None
    """The stem's figure."""
    options: Annotated[list[Option], Field(min_length=MIN_OPTIONS, max_length=MAX_OPTIONS)]
    answer: Annotated[int, Field(ge=0)]
    """Index into ``options``, from 0."""
    explanation: Text


class Bundle(_Object):
    bundle: Text
    """The bundle's title."""
    questions: Annotated[list[Question], Field(min_length=1, max_length=MAX_QUESTIONS)]
    version: int | None = None
    """Accepted so that a published document can be edited and uploaded again; replaced by the
    version the worker assigns."""

    def document(self) -> dict[str, Any]:
        """The bundle as JSON-ready data: the fields given (known and passed through), without
        ``version``."""
        document = self.model_dump(exclude_unset=True)
        document.pop("version", None)
        return document


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
    """Strict JSON from bytes; :class:`NotStrictJson` for anything else."""
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotStrictJson(f"not UTF-8 text: bad byte at offset {exc.start}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise NotStrictJson(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except ValueError as exc:
        raise NotStrictJson(f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise NotStrictJson("not valid JSON: nested too deeply") from exc


def _clean_loc(loc: Sequence[int | str]) -> list[int | str]:
    """pydantic's location without the union tags (a tag is never followed by ``[key]``, a
    user's key in a language map may be) and without the ``[key]`` marker."""
    parts = list(loc)
    return [
        part
        for i, part in enumerate(parts)
        if part != "[key]"
        and not (part in _TAGS and (i + 1 == len(parts) or parts[i + 1] != "[key]"))
    ]


def json_path(loc: Sequence[int | str]) -> str:
    """``("questions", 3, "stem", "hi-latn")`` → ``$.questions[3].stem['hi-latn']``."""
    path = "$"
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _NAME_RE.match(part):
            path += f".{part}"
        else:
            quoted = json.dumps(part, ensure_ascii=False)[1:-1].replace('\\"', '"')
            quoted = quoted.replace("'", "\\'").encode("utf-8", "backslashreplace").decode()
            path += f"['{quoted}']"
    return path


def _describe(error: ErrorDetails, loc: Sequence[int | str]) -> str:
    kind, ctx, raw_loc = error["type"], error.get("ctx", {}), error["loc"]
    if kind in ("too_short", "too_long"):
        count = ctx["min_length" if kind == "too_short" else "max_length"]
        if raw_loc and raw_loc[-1] == _TAG_LANGUAGES:
            noun = "languages"
        else:
            noun = loc[-1] if loc and isinstance(loc[-1], str) else "items"
        noun = noun[:-1] if count == 1 and noun.endswith("s") else noun
        return f"{'at least' if kind == 'too_short' else 'at most'} {count} {noun}"
    messages = {
        "missing": "required",
        "string_type": "must be a string",
        "int_type": "must be an integer",
        "model_type": "must be an object",
        "dict_type": "must be an object",
        "list_type": "must be an array",
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
        "string_unicode": "a field name or text is not valid Unicode (a lone surrogate escape)",
    }
    return messages.get(kind, error["msg"])


def _problems_of(exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = _clean_loc(error["loc"])
        problems.append(Problem(json_path(loc), _describe(error, loc)))
    return problems


def _rule_problems(document: dict[str, Any]) -> list[Problem]:
    """What the schema cannot check: unique ids, answer within the options. On the parsed
    JSON, so that they are reported together with the schema's problems."""
    problems: list[Problem] = []
    questions = document.get("questions")
    first_index: dict[str, int] = {}
    for index, question in enumerate(questions if isinstance(questions, list) else ()):
        if not isinstance(question, dict):
            continue
        qid, answer, options = question.get("id"), question.get("answer"), question.get("options")
        if isinstance(qid, str):
            first = first_index.setdefault(qid, index)
            if first != index:
                problems.append(
                    Problem(
                        f"$.questions[{index}].id", f"duplicate id {qid!r}, as $.questions[{first}]"
                    )
                )
        if (
            type(answer) is int
            and isinstance(options, list)
            and MIN_OPTIONS <= len(options) <= MAX_OPTIONS
            and answer >= len(options)
        ):
            problems.append(
                Problem(
                    f"$.questions[{index}].answer",
                    f"{answer} is out of range for {len(options)} options "
                    f"(0 to {len(options) - 1})",
                )
            )
    return problems


def _question_index(problem: Problem) -> int:
    match = _QUESTION_PATH_RE.match(problem.path)
    return int(match[1]) if match else -1


def validate_bundle(document: Any) -> Bundle:
    """A :class:`Bundle` from parsed JSON, or :class:`SchemaProblems` listing the problems: the
    schema's and the rules', in document order (by question)."""
    if not isinstance(document, dict):
        raise SchemaProblems([Problem("$", "must be a JSON object")])
    problems = _rule_problems(document)
    try:
        bundle = Bundle.model_validate(document)
    except ValidationError as exc:
        problems = [*_problems_of(exc), *problems]
        raise SchemaProblems(sorted(problems, key=_question_index)) from None
    if problems:
        raise SchemaProblems(problems)
    return bundle


def check_bundle_bytes(data: bytes) -> Bundle:
    """Parse and validate; :class:`BundleRefused` (``NotStrictJson`` or ``SchemaProblems``).

    Blocking CPU work (about a second for the largest bundles): run it in an executor."""
    return validate_bundle(parse_json(data))
