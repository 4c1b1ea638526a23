"""Question-bank bundles: schema errors with JSON paths, canonical bytes, br/gzip, dcz deltas."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard

from assets import bundle_schema, catalogue
from assets.processing import BundleJob, PreviousBundle
from transcode.base import PermanentFault
from transcode.bundles import (
    DCZ_MAGIC,
    BundleInvalid,
    BundleSettings,
    DczError,
    PreviousVersion,
    canonical_bytes,
    dcz_window_limit,
    dcz_window_log,
    decode_dcz,
    encode_dcz,
    json_path,
    parse_json,
    run,
    run_for_job,
    validate_bundle,
)

MiB = 1024 * 1024

# ---- a small generator of bilingual questions -----------------------------------------------

EN_TEXT = (
    "a body of mass m moves with velocity v under a constant force F on a rough incline "
    "find the acceleration time distance work energy momentum when the block slides down "
    "the string tension pulley friction coefficient is given neglect air resistance take g"
)
HI_TEXT = (
    "एक पिंड जिसका द्रव्यमान m है वेग v से नियत बल F के अंतर्गत खुरदरे आनत तल पर चलता है "
    "त्वरण समय दूरी कार्य ऊर्जा संवेग ज्ञात कीजिए जब गुटका नीचे फिसलता है डोरी में तनाव "
    "घिरनी घर्षण गुणांक दिया गया है वायु प्रतिरोध नगण्य मानिए g लीजिए"
)
EN, HI = EN_TEXT.split(), HI_TEXT.split()


def text(rnd: random.Random, words: int) -> dict[str, str]:
    def sentence(vocabulary: list[str]) -> str:
        picked = rnd.choices(vocabulary, k=words)
        picked[rnd.randrange(words)] = str(rnd.randint(2, 999))
        return " ".join(picked)

    return {"en": sentence(EN).capitalize() + ".", "hi": sentence(HI) + "।"}


def question(rnd: random.Random, index: int) -> dict[str, Any]:
    options = rnd.choice([2, 4, 4, 4, 5])
    return {
        "id": f"phy-{index:05d}",
        "subject": "Physics",
        "chapter": rnd.choice(["Kinematics", "Laws of Motion", "Work, Energy and Power"]),
        "stem": text(rnd, rnd.randint(10, 30)),
        "options": [text(rnd, rnd.randint(2, 6)) for _ in range(options)],
        "answer": rnd.randrange(options),
        "explanation": text(rnd, rnd.randint(20, 60)),
    }


def make_bundle(questions: int, seed: int = 1) -> dict[str, Any]:
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    return {
        "bundle": "JEE Main: mechanics",
        "questions": [question(rnd, i) for i in range(questions)],
    }


def corrected(document: dict[str, Any], fraction: float, seed: int = 2) -> dict[str, Any]:
    """A new version in which ``fraction`` of the questions got the usual correction: a new
    explanation, one option reworded and the answer key changed."""
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    new = copy.deepcopy(document)
    questions = new["questions"]
    for index in rnd.sample(range(len(questions)), round(len(questions) * fraction)):
        q = questions[index]
        option = rnd.randrange(len(q["options"]))
        q["options"][option] = text(rnd, rnd.randint(2, 6))
        q["answer"] = option
        q["explanation"] = text(rnd, rnd.randint(20, 60))
    return new


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def publish(
    tmp_path: Path, document: Any, settings: BundleSettings, name: str = "out"
) -> tuple[Any, Path]:
    out = tmp_path / name
    out.mkdir()
    reports: list[float] = []
    outputs = run(
        write_json(tmp_path / f"{name}.json", document),
        out,
        settings,
        lambda _stage, fraction: reports.append(fraction),
    )
    assert reports == sorted(reports)
    assert reports[-1] == 1.0
    return outputs, out


# ---- schema errors, each with its JSON path ----------------------------------------------------

Mutation = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets (or, for value ``...``, deletes) a dotted path like ``q.0.stem``."""

    def mutate(document: dict[str, Any]) -> dict[str, Any]:
        *parents, last = path.split(".")
        node: Any = document
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        key: Any = int(last) if last.isdigit() else last
        if value is ...:
            del node[key]
        else:
            node[key] = value
        return document

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(document: dict[str, Any]) -> Any:
        for m in mutations:
            document = m(document)
        return document

    return mutate


FOUR_OPTIONS = [{"en": f"option {i}", "hi": f"विकल्प {i}"} for i in range(4)]


def _duplicate_id(document: dict[str, Any]) -> dict[str, Any]:
    document["questions"][2]["id"] = document["questions"][0]["id"]
    return document


def _many_problems(document: dict[str, Any]) -> dict[str, Any]:
    for q in document["questions"]:
        q["answer"] = "0"
    return document


SCHEMA_CASES: list[tuple[str, Mutation, str]] = [
    ("missing stem", _set("questions.0.stem", ...), "$.questions[0].stem: required"),
    (
        "empty language map",
        _set("questions.0.stem", {}),
        "$.questions[0].stem: at least 1 language",
    ),
    (
        "answer out of range",
        _both(_set("questions.1.options", FOUR_OPTIONS), _set("questions.1.answer", 4)),
        "$.questions[1].answer: 4 is out of range for 4 options (0 to 3)",
    ),
    (
        "negative answer",
        _set("questions.1.answer", -1),
        "$.questions[1].answer: must be at least 0",
    ),
    (
        "duplicate ids",
        _duplicate_id,
        "$.questions[2].id: duplicate id 'phy-00000', as $.questions[0]",
    ),
    (
        "too few options",
        _set("questions.3.options", [{"en": "yes", "hi": "हाँ"}]),
        "questions[3].options: at least 2 options",
    ),
    (
        "too many options",
        _set("questions.3.options", [{"en": f"{i}", "hi": f"{i}"} for i in range(7)]),
        "questions[3].options: at most 6 options",
    ),
    (
        "answer as string",
        _set("questions.0.answer", "1"),
        "questions[0].answer: must be an integer",
    ),
    ("answer as bool", _set("questions.0.answer", True), "questions[0].answer: must be an integer"),
    ("answer as float", _set("questions.0.answer", 1.0), "questions[0].answer: must be an integer"),
    ("number for text", _set("questions.0.stem.en", 5), "$.questions[0].stem.en: must be a string"),
    (
        "number for a text",
        _set("questions.0.stem", 5),
        "$.questions[0].stem: must be a string or an object of language code to text",
    ),
    (
        "list for a text",
        _set("questions.0.explanation", ["why?"]),
        "$.questions[0].explanation: must be a string or an object of language code to text",
    ),
    ("object for array", _set("questions.0.options", {}), "questions[0].options: must be an array"),
    ("questions not array", _set("questions", "none"), "questions: must be an array"),
    ("no questions", _set("questions", []), "questions: at least 1 question"),
    ("missing title", _set("bundle", ...), "bundle: required"),
    ("blank text", _set("questions.0.explanation.hi", "  \n"), "must not be empty or blank"),
    ("empty text", _set("questions.0.options.1.en", ""), "questions[0].options[1].en: must not"),
    (
        "bad language code",
        _set("questions.0.stem.EN", "Why?"),
        "$.questions[0].stem.EN: not a language code",
    ),
    (
        "bad image",
        _set("questions.0.image", "ftp://example.org/fig.png"),
        "$.questions[0].image: must be an http(s) URL or a catalogue asset id",
    ),
    (
        "text too long",
        _set("questions.0.stem.hi", "क" * 3414),  # 10,242 bytes in UTF-8
        "$.questions[0].stem.hi: longer than 10240 bytes in UTF-8 (10242)",
    ),
    ("bad id", _set("questions.0.id", "q 1"), "$.questions[0].id: must be 1 to 64 ASCII"),
    ("id not a string", _set("questions.0.id", 7), "$.questions[0].id: must be a string"),
    ("not an object: array", lambda d: [d], "$: must be a JSON object"),
    ("not an object: string", lambda d: "bundle", "$: must be a JSON object"),
    (
        "many problems",
        _many_problems,
        "$.questions[4].answer: must be an integer (and 5 more)",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(m, e, id=name) for name, m, e in SCHEMA_CASES],
)
def test_schema_errors_name_their_json_path(
    tmp_path: Path, mutate: Mutation, expected: str
) -> None:
    document = mutate(make_bundle(10))
    with pytest.raises(BundleInvalid) as caught:
        publish(tmp_path, document, BundleSettings(version=1))
    assert expected in str(caught.value)
    assert isinstance(caught.value, PermanentFault)
    assert list((tmp_path / "out").iterdir()) == []


def test_problems_are_listed_in_full_on_the_exception() -> None:
    document = make_bundle(10)
    for q in document["questions"]:
        del q["stem"]
    with pytest.raises(BundleInvalid) as caught:
        validate_bundle(document)
    assert caught.value.problems == [(f"$.questions[{i}].stem", "required") for i in range(10)]
    assert str(caught.value).startswith("invalid bundle, 10 problems: $.questions[0].stem")


# ---- the schema for real banks: text forms, languages, images, passthrough --------------------

SAMPLE = Path(__file__).resolve().parents[2] / "kshipra" / "samples"


def one_question(**fields: Any) -> dict[str, Any]:
    """A one-question bank with English-only plain strings; ``fields`` override the question."""
    question = {
        "id": "q1",
        "subject": "Chemistry",
        "chapter": "Mole concept",
        "stem": "How many moles of O atoms are in 0.5 mol of CaCO3?",
        "options": ["0.5", "1.0", "1.5", "3.0"],
        "answer": 2,
        "explanation": "Three O atoms each: 0.5 x 3 = 1.5.",
    }
    question.update(fields)
    return {"bundle": "Mole concept", "questions": [question]}


def published_question(document: dict[str, Any]) -> dict[str, Any]:
    """The question as the canonical (published) bytes hold it."""
    canonical = json.loads(canonical_bytes(validate_bundle(document), 1))
    question: dict[str, Any] = canonical["questions"][0]
    return question


ACCEPTED: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (name, fields of the question, what the published question holds)
    ("plain strings", {}, {"stem": "How many moles of O atoms are in 0.5 mol of CaCO3?"}),
    ("english only", {"stem": {"en": "Why?"}}, {"stem": {"en": "Why?"}}),
    ("hindi only", {"stem": {"hi": "क्यों?"}}, {"stem": {"hi": "क्यों?"}}),
    ("tamil", {"stem": {"ta": "ஏன்?"}}, {"stem": {"ta": "ஏன்?"}}),
    (
        "several languages and a script",
        {"stem": {"en": "Why?", "hi": "क्यों?", "hi-latn": "Kyon?", "bn": "কেন?", "ur": "کیوں؟"}},
        {"stem": {"bn": "কেন?", "en": "Why?", "hi": "क्यों?", "hi-latn": "Kyon?", "ur": "کیوں؟"}},
    ),
    ("region", {"explanation": {"en-in": "Because."}}, {"explanation": {"en-in": "Because."}}),
    (
        "options in any form",
        {"options": ["0.5", {"en": "1.0", "hi": "1.0"}, {"text": "1.5"}, {"image": "fig-3"}]},
        {"options": ["0.5", {"en": "1.0", "hi": "1.0"}, {"text": "1.5"}, {"image": "fig-3"}]},
    ),
    (
        "image URL on the question",
        {"image": "https://cdn.example.org/diagrams/q1.png?w=640"},
        {"image": "https://cdn.example.org/diagrams/q1.png?w=640"},
    ),
    (
        "catalogue id on the question",
        {"image": "chem-mole-fig-1.v2"},
        {"image": "chem-mole-fig-1.v2"},
    ),
    (
        "option with text and image",
        {"options": [{"text": {"en": "A"}, "image": "http://example.org/a.png"}, "B"], "answer": 0},
        {"options": [{"image": "http://example.org/a.png", "text": {"en": "A"}}, "B"]},
    ),
    (
        "unknown fields are kept",
        {"difficulty": 3, "year": 2019, "marks": {"correct": 4, "wrong": -1}, "topic": "moles"},
        {"difficulty": 3, "year": 2019, "marks": {"correct": 4, "wrong": -1}, "topic": "moles"},
    ),
    (
        "unknown fields on an option object are kept",
        {"options": [{"text": "A", "label": "(a)"}, "B"], "answer": 1},
        {"options": [{"label": "(a)", "text": "A"}, "B"]},
    ),
    (
        "passthrough strings are NFC-normalised",
        {"source": ["Cafe\u0301", {"note": "e\u0301"}]},
        {"source": ["Caf\u00e9", {"note": "\u00e9"}]},
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"), [pytest.param(f, e, id=name) for name, f, e in ACCEPTED]
)
def test_real_banks_are_accepted_and_published_as_given(
    fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    question = published_question(one_question(**fields))
    for name, value in expected.items():
        assert question[name] == value
    assert set(question) == {*one_question()["questions"][0], *fields}  # nothing added or lost


def test_unknown_bundle_fields_are_kept_and_version_is_the_callers() -> None:
    document = {**one_question(), "exam": "NEET", "year": 2024, "version": 7}
    canonical = json.loads(canonical_bytes(validate_bundle(document), 2))
    assert canonical["exam"] == "NEET"
    assert canonical["year"] == 2024
    assert canonical["version"] == 2
    assert "image" not in canonical["questions"][0]


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    # (name, fields of the question, the problem)
    ("empty map", {"stem": {}}, "$.questions[0].stem: at least 1 language"),
    ("empty string", {"stem": ""}, "$.questions[0].stem: must not be empty or blank"),
    ("blank in a map", {"stem": {"en": " "}}, "$.questions[0].stem.en: must not be empty"),
    ("uppercase code", {"stem": {"EN": "Why?"}}, "$.questions[0].stem.EN: not a language code"),
    ("a name, not a code", {"stem": {"english": "Why?"}}, ".stem.english: not a language code"),
    ("underscore", {"stem": {"hi_IN": "क्यों?"}}, "$.questions[0].stem.hi_IN: not a language"),
    ("script not lowercase", {"stem": {"hi-Latn": "Kyon"}}, "stem['hi-Latn']: not a language"),
    ("one letter", {"stem": {"e": "Why?"}}, "$.questions[0].stem.e: not a language code"),
    ("empty code", {"stem": {"": "Why?"}}, "$.questions[0].stem['']: not a language code"),
    ("number in a map", {"stem": {"en": 5}}, "$.questions[0].stem.en: must be a string"),
    (
        "too many languages",
        {
            "stem": {f"a{c}": "x" for c in "abcdefghijklmnopqrstuvwxyz"}
            | {f"b{c}": "x" for c in "abcdefghijklmnopqrstuvwxyz"}
        },
        "$.questions[0].stem: at most 32 languages",
    ),
    ("ftp image", {"image": "ftp://example.org/a.png"}, "$.questions[0].image: must be an http(s)"),
    ("script image", {"image": "javascript:alert(1)"}, "$.questions[0].image: must be an http(s)"),
    ("relative image", {"image": "../fig.png"}, "$.questions[0].image: must be an http(s)"),
    ("image with a space", {"image": "Fig 1"}, "$.questions[0].image: must be an http(s)"),
    ("uppercase id", {"image": "Fig-1"}, "$.questions[0].image: must be an http(s)"),
    ("URL without host", {"image": "https:///a.png"}, "$.questions[0].image: must be an http(s)"),
    ("URL with a space", {"image": "http://a b/c.png"}, "$.questions[0].image: must be an http(s)"),
    ("URL bad port", {"image": "http://a:99999/c"}, "$.questions[0].image: must be an http(s)"),
    ("URL too long", {"image": "https://a.org/" + "x" * 2048}, "$.questions[0].image: must be"),
    ("image not a string", {"image": 7}, "$.questions[0].image: must be a string"),
    (
        "bad option image",
        {"options": [{"image": "data:image/png;base64,AAAA"}, "B"]},
        "$.questions[0].options[0].image: must be an http(s) URL",
    ),
    (
        "option object with neither",
        {"options": [{"text": None}, "B"]},
        "$.questions[0].options[0]: an option needs 'text' or 'image'",
    ),
    (
        "option of the wrong type",
        {"options": [1, "B"]},
        "$.questions[0].options[0]: must be a string or an object of language code to text",
    ),
    (
        "lone surrogate passed through",
        {"topic": "\ud800"},
        "$.questions[0].topic: not valid Unicode",
    ),
    (
        "passthrough nested too deeply",
        {"deep": json.loads("[" * 40 + "]" * 40)},
        "$.questions[0].deep: nested more than 32 levels",
    ),
    (
        "passthrough keys equal after NFC",
        {"notes": {"e\u0301": 1, "\u00e9": 2}},
        "$.questions[0].notes: two keys are the same after Unicode normalisation",
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"), [pytest.param(f, e, id=name) for name, f, e in REFUSED]
)
def test_what_real_banks_must_not_hold(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(BundleInvalid) as caught:
        validate_bundle(one_question(**fields))
    assert expected in str(caught.value)


def test_the_sample_bundle_validates() -> None:
    for path in sorted(SAMPLE.glob("*.json")):
        bundle = validate_bundle(parse_json(path.read_bytes()))
        assert len(bundle.questions) >= 1, path


def test_image_ids_are_the_catalogues_asset_ids() -> None:
    assert bundle_schema.ASSET_ID_RE.pattern == catalogue.ASSET_ID_RE.pattern


def test_the_schema_module_imports_no_servers_or_transcode_code() -> None:
    code = (
        "import sys, assets.bundle_schema; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'aiohttp', 'boto3', 'botocore', 'redis', 'saq', 'transcode'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"bundle": "x", ', "not valid JSON: Expecting property name"),
        (b'{"bundle": "x", "bundle": "y"}', "duplicate key 'bundle'"),
        (b'{"answer": NaN}', "NaN is not JSON"),
        (b'{"bundle": "\xff"}', "not UTF-8 text: bad byte at offset 12"),
        (b"", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_what_is_not_strict_json_is_refused(data: bytes, expected: str) -> None:
    with pytest.raises(PermanentFault, match=expected):
        parse_json(data)


def test_lone_surrogate_is_refused() -> None:
    document = parse_json(b'{"bundle": "\\ud800"}')
    with pytest.raises(BundleInvalid, match=r"\$\.bundle: not valid Unicode"):
        validate_bundle({**make_bundle(2), "bundle": document["bundle"]})


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        ((), "$"),
        (("bundle",), "$.bundle"),
        (("questions", 3, "options", 1, "hi"), "$.questions[3].options[1].hi"),
        (("questions", 0, "stem", "hi-latn"), "$.questions[0].stem['hi-latn']"),
        (("questions", 0, "it's"), "$.questions[0]['it\\'s']"),
    ],
)
def test_json_path(loc: tuple[int | str, ...], path: str) -> None:
    assert json_path(loc) == path


# ---- canonical form ---------------------------------------------------------------------------


def test_canonical_bytes_are_stable(tmp_path: Path) -> None:
    document = make_bundle(5)
    document["questions"][0]["stem"]["en"] = "Caf\u00e9 question"  # é precomposed
    document["questions"][0]["stem"]["hi"] = "\u0958 से शुरू"  # QA: a composition exclusion
    other = copy.deepcopy(document)
    other["questions"][0]["stem"]["en"] = "Cafe\u0301 question"  # é decomposed
    other["questions"][0]["stem"]["hi"] = "\u0915\u093c से शुरू"
    other["version"] = 99  # ignored: the caller's number wins
    reordered = json.dumps(
        {"version": 99, **dict(reversed(list(other.items())))}, ensure_ascii=True, indent=7
    )
    a = canonical_bytes(validate_bundle(document), 3)
    b = canonical_bytes(validate_bundle(parse_json(reordered.encode())), 3)
    assert a == b
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()

    text = a.decode("utf-8")
    assert "\\u" not in text
    assert "से शुरू" in text
    parsed = json.loads(text)
    compact = json.dumps(parsed, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert text == compact
    assert list(parsed) == ["bundle", "questions", "version"]
    assert parsed["version"] == 3
    assert list(parsed["questions"][0]) == sorted(parsed["questions"][0])
    assert [q["id"] for q in parsed["questions"]] == [q["id"] for q in document["questions"]]


def test_question_order_is_kept() -> None:
    document = make_bundle(4)
    document["questions"].reverse()
    ids = [q["id"] for q in json.loads(canonical_bytes(validate_bundle(document), 1))["questions"]]
    assert ids == ["phy-00003", "phy-00002", "phy-00001", "phy-00000"]


def test_published_files_and_details(tmp_path: Path) -> None:
    document = make_bundle(30)
    outputs, out = publish(tmp_path, document, BundleSettings(version=1))
    names = sorted(f.name for f in outputs.files)
    assert names == ["bundle.json", "bundle.json.br", "bundle.json.gz"]
    assert outputs.primary == "bundle.json"
    assert {f.content_type for f in outputs.files} == {"application/json"}

    canonical = (out / "bundle.json").read_bytes()
    assert canonical == canonical_bytes(validate_bundle(document), 1)
    assert brotli.decompress((out / "bundle.json.br").read_bytes()) == canonical
    gz = (out / "bundle.json.gz").read_bytes()
    assert gzip.decompress(gz) == canonical
    assert gz[4:8] == b"\0\0\0\0"  # mtime 0: the same input gives the same bytes

    details = outputs.details
    assert details["version"] == 1
    assert details["questions"] == 30
    assert details["sha256"] == hashlib.sha256(canonical).hexdigest()
    sf = details["available_dictionary"]
    assert sf.startswith(":")
    assert sf.endswith(":")
    assert base64.b64decode(sf[1:-1]) == hashlib.sha256(canonical).digest()
    for encoding in ("identity", "br", "gzip"):
        entry = details["encodings"][encoding]
        assert entry["bytes"] == (out / entry["file"]).stat().st_size
    assert details["deltas"] == []
    assert details["dcb"].startswith("skipped")
    json.dumps(details)  # JSON-serialisable for the manifest


# ---- dcz deltas -------------------------------------------------------------------------------


def test_dcz_header_and_round_trip() -> None:
    old = canonical_bytes(validate_bundle(make_bundle(40)), 1)
    new = canonical_bytes(validate_bundle(corrected(make_bundle(40), 0.1)), 2)
    stream = encode_dcz(new, old)
    assert stream[:8] == bytes([0x5E, 0x2A, 0x4D, 0x18, 0x20, 0x00, 0x00, 0x00]) == DCZ_MAGIC
    assert stream[8:40] == hashlib.sha256(old).digest()
    frame = zstandard.get_frame_parameters(stream[40:])
    assert frame.content_size == len(new)
    assert frame.dict_id == 0
    assert frame.has_checksum
    assert decode_dcz(stream, old) == new


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (lambda s, d: (s, d + b" "), "different dictionary"),
        (lambda s, d: (s[:30], d), "header is missing"),
        (lambda s, d: (b"\x28\xb5\x2f\xfd" + s[4:], d), "header is missing"),
        (lambda s, d: (s[:-10], d), "corrupt dcz stream"),
        (lambda s, d: (s + b"extra", d), "corrupt dcz stream"),
    ],
)
def test_dcz_decoding_refuses_bad_streams(
    mangle: Callable[[bytes, bytes], tuple[bytes, bytes]], expected: str
) -> None:
    old, new = b'{"v":1,"text":"' + b"abc" * 500 + b'"}', b'{"v":2,"text":"' + b"abc" * 501 + b'"}'
    stream, dictionary = mangle(encode_dcz(new, old), old)
    with pytest.raises(DczError, match=expected):
        decode_dcz(stream, dictionary)


@pytest.mark.parametrize(
    ("content", "dictionary", "window_log"),
    [
        (100, 100, 10),
        (2_700_000, 2_700_000, 22),
        (5 * MiB, 5 * MiB, 23),
        (12 * MiB, 2 * MiB, 23),  # capped at 8 MiB: the RFC's floor for small dictionaries
        (30 * MiB, 28 * MiB, 25),  # 1.25 x 28 MiB = 35 MiB allows a 32 MiB window
        (300 * MiB, 300 * MiB, 27),  # never above 128 MiB
    ],
)
def test_dcz_window_stays_within_rfc_9842(content: int, dictionary: int, window_log: int) -> None:
    assert dcz_window_log(content, dictionary) == window_log
    assert 1 << window_log <= dcz_window_limit(dictionary)


def test_k_deltas_from_the_newest_previous_versions(tmp_path: Path) -> None:
    versions = [make_bundle(20)]
    for seed in range(4):
        versions.append(corrected(versions[-1], 0.1, seed=seed))
    canonicals = [canonical_bytes(validate_bundle(d), n) for n, d in enumerate(versions, start=1)]
    previous = tuple(PreviousVersion(n, canonicals[n - 1]) for n in (2, 4, 1, 3))
    outputs, out = publish(tmp_path, versions[4], BundleSettings(version=5, previous=previous))

    assert [d["from_version"] for d in outputs.details["deltas"]] == [4, 3, 2]
    assert sorted(f.name for f in outputs.files) == [
        "bundle.json",
        "bundle.json.br",
        "bundle.json.gz",
        "bundle.json.v2.dcz",
        "bundle.json.v3.dcz",
        "bundle.json.v4.dcz",
    ]
    new = (out / "bundle.json").read_bytes()
    assert new == canonicals[4]
    for delta in outputs.details["deltas"]:
        dictionary = canonicals[delta["from_version"] - 1]
        stream = (out / delta["file"]).read_bytes()
        assert delta["bytes"] == len(stream)
        assert delta["dictionary_sha256"] == hashlib.sha256(dictionary).hexdigest()
        expected_sf = base64.b64encode(hashlib.sha256(dictionary).digest()).decode()
        assert delta["available_dictionary"] == f":{expected_sf}:"
        assert decode_dcz(stream, dictionary) == new


def test_fewer_previous_versions_than_k(tmp_path: Path) -> None:
    v1 = canonical_bytes(validate_bundle(make_bundle(5)), 1)
    outputs, _ = publish(
        tmp_path, make_bundle(5), BundleSettings(version=2, previous=(PreviousVersion(1, v1),))
    )
    assert [d["file"] for d in outputs.details["deltas"]] == ["bundle.json.v1.dcz"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"version": 0},
        {"version": 2, "previous": (PreviousVersion(2, b"{}"),)},
        {"version": 3, "previous": (PreviousVersion(1, b"{}"), PreviousVersion(1, b"{}"))},
        {"version": 2, "max_deltas": -1},
        {"version": 2, "zstd_level": 3},
    ],
)
def test_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its field
        BundleSettings(**kwargs)


def test_run_for_job_reads_previous_versions_from_files(tmp_path: Path) -> None:
    v1 = canonical_bytes(validate_bundle(make_bundle(6)), 1)
    (tmp_path / "previous-v1.json").write_bytes(v1)
    source = write_json(tmp_path / "source.json", corrected(make_bundle(6), 0.5))
    out = tmp_path / "out"
    out.mkdir()
    settings = BundleJob(
        asset_id="b1",
        version=2,
        previous_versions=3,
        previous=(PreviousBundle(version=1, path=str(tmp_path / "previous-v1.json")),),
    )
    outputs = run_for_job(source, out, settings)
    assert outputs.details["version"] == 2
    assert (
        decode_dcz((out / "bundle.json.v1.dcz").read_bytes(), v1)
        == (out / "bundle.json").read_bytes()
    )


# ---- the project's goal: a 2% correction costs under 2% of a full download --------------------


@pytest.fixture(scope="module")
def two_percent_changed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    tmp_path = tmp_path_factory.mktemp("delta")
    v1_doc = make_bundle(1000)
    v1 = canonical_bytes(validate_bundle(v1_doc), 1)
    outputs, out = publish(
        tmp_path,
        corrected(v1_doc, 0.02),
        BundleSettings(version=2, previous=(PreviousVersion(1, v1),)),
    )
    assert (
        decode_dcz((out / "bundle.json.v1.dcz").read_bytes(), v1)
        == (out / "bundle.json").read_bytes()
    )
    return {
        "identity": outputs.details["encodings"]["identity"]["bytes"],
        "br": outputs.details["encodings"]["br"]["bytes"],
        "dcz": outputs.details["deltas"][0]["bytes"],
    }


def test_two_percent_change_costs_under_two_percent_of_brotli(
    two_percent_changed: dict[str, int],
) -> None:
    sizes = two_percent_changed
    print(f"1,000 questions, 2% corrected: {sizes}, dcz/br = {sizes['dcz'] / sizes['br']:.2%}")
    assert sizes["identity"] > 500_000  # a realistic 1,000-question bundle
    assert sizes["dcz"] < 0.02 * sizes["br"], sizes
