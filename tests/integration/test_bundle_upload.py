"""A bad question bank is refused at upload, by a real origin: 4xx with its first problems and
their JSON paths, nothing stored (no source, no staging leftovers, no manifest, no S3 object
version or open multipart upload) and no job queued. A good real-world bank (one language,
plain strings, images, fields the schema does not know) is published with those fields."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from assets.blobstore import BlobStore, LocalDirBlobStore, S3BlobStore
from assets.hashing import TreeHasher
from assets.processing import BundleJob, job_key, profile_id
from common.wire import WAITERS_PREFIX
from origin.app import CONFIG, QUEUE, REDIS, STORE
from tests.conftest import AUTH, OriginProcess, asset_published, jpeg_bytes
from tests.fixtures_s3 import s3_client
from tests.integration.test_cli import kshipra

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]


def question(index: int, **fields: Any) -> dict[str, Any]:
    document = {
        "id": f"q{index}",
        "subject": "chemistry",
        "chapter": "mole-concept",
        "stem": {"en": f"Question {index}?", "hi": f"प्रश्न {index}?"},
        "options": [{"en": str(n), "hi": str(n)} for n in range(4)],
        "answer": 1,
        "explanation": {"en": "because", "hi": "क्योंकि"},
    }
    document.update(fields)
    return document


def bank(*questions: dict[str, Any], **fields: Any) -> bytes:
    document = {"bundle": "Mole concept", "questions": list(questions) or [question(0)], **fields}
    return json.dumps(document, ensure_ascii=False, indent=1).encode()


def app_of(client: Client) -> web.Application:
    app = client.app
    assert isinstance(app, web.Application)
    return app


def tree_hash(data: bytes) -> str:
    hasher = TreeHasher()
    hasher.update(data)
    return hasher.hexdigest()


def files_under(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file()]


async def leftovers(client: Client) -> list[str]:
    """Everything the store holds: keys, and beneath them files on disk (local) or object
    versions and open multipart uploads (S3)."""
    store: BlobStore = app_of(client)[STORE]
    found = [info.key async for info in store.list("")]
    if isinstance(store, LocalDirBlobStore):
        found += files_under(Path(app_of(client)[CONFIG].origin.storage))
    elif isinstance(store, S3BlobStore):
        config = app_of(client)[CONFIG].origin
        assert config.s3_endpoint is not None
        s3 = s3_client(config.s3_endpoint)
        bucket = config.storage.removeprefix("s3://").split("/", 1)[0]
        versions = s3.list_object_versions(Bucket=bucket)
        found += [
            v["Key"] for v in [*versions.get("Versions", []), *versions.get("DeleteMarkers", [])]
        ]
        found += [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    return found


def expected_job_key(client: Client, asset_id: str, body: bytes) -> str:
    """The key the submitter gives the job for v1 of ``asset_id`` with these bytes (checked
    against a real job in :func:`test_a_real_bank_is_published_with_its_extra_fields`)."""
    settings = BundleJob(
        asset_id=asset_id,
        version=1,
        previous_versions=app_of(client)[CONFIG].transcode.bundle_previous_versions,
    )
    return job_key("bundle", tree_hash(body), profile_id(settings))


async def assert_not_queued(client: Client, asset_id: str, body: bytes) -> None:
    """No job for these bytes and this asset, no waiter for it, the queue lists none, and the
    asset does not exist."""
    app = app_of(client)
    content_hash = tree_hash(body)
    key = expected_job_key(client, asset_id, body)
    assert await app[QUEUE].job(key) is None
    assert not await app[REDIS].exists(WAITERS_PREFIX + key)
    jobs = await (await client.get("/v1/jobs", headers=AUTH)).json()
    assert not [job for job in jobs["jobs"] if job["kwargs"].get("content_hash") == content_hash]
    missing = await client.get(f"/v1/assets/{asset_id}", headers=AUTH)
    assert missing.status == 404


def error_of(answer: dict[str, Any], status: int) -> dict[str, Any]:
    error: dict[str, Any] = answer["error"]
    assert error["status"] == status
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    return error


async def fifty_megabytes() -> AsyncIterator[bytes]:
    """A 50 MB bank, streamed (no Content-Length): one enormous stem."""
    yield b'{"bundle": "huge", "questions": [{"id": "q0", "stem": {"en": "'
    for _ in range(50 * 16):
        yield b"x" * 65536
    yield b'"}}]}'


BAD: list[tuple[str, Callable[[], Any], int, str, list[tuple[str, str]]]] = [
    # (name, body, status, code, [(path, words of the message)] expected among the problems)
    (
        "broken JSON",
        lambda: b'{"bundle": "x", "questions": [',
        422,
        "invalid_json",
        [("$", "line 1")],
    ),
    (
        "duplicate JSON keys",
        lambda: b'{"bundle": "x", "bundle": "y", "questions": []}',
        422,
        "invalid_json",
        [("$", "duplicate key 'bundle'")],
    ),
    ("NaN", lambda: b'{"bundle": "x", "answer": NaN}', 422, "invalid_json", [("$", "NaN")]),
    (
        "not an object",
        lambda: json.dumps([question(0)]).encode(),
        422,
        "invalid_bundle",
        [("$", "must be a JSON object")],
    ),
    (
        "schema errors",
        lambda: bank(
            question(0, stem=5),
            question(1, answer="2"),
            question(2, stem={"EN": "Why?"}),
            question(3, image="ftp://example.org/fig.png"),
            question(4, options=[{"en": "only one"}]),
            question(5, explanation={}),
        ),
        422,
        "invalid_bundle",
        [
            ("$.questions[0].stem", "must be a string or an object of language code to text"),
            ("$.questions[1].answer", "must be an integer"),
            ("$.questions[2].stem.EN", "not a language code"),
            ("$.questions[3].image", "must be an http(s) URL or a catalogue asset id"),
            ("$.questions[4].options", "at least 2 options"),
            ("$.questions[5].explanation", "at least 1 language"),
        ],
    ),
    (
        "duplicate question ids",
        lambda: bank(question(0), question(1), question(0)),
        422,
        "invalid_bundle",
        [("$.questions[2].id", "duplicate id 'q0', as $.questions[0]")],
    ),
    (
        "answer out of range",
        lambda: bank(question(0), question(1, answer=4)),
        422,
        "invalid_bundle",
        [("$.questions[1].answer", "4 is out of range for 4 options (0 to 3)")],
    ),
    (
        "a text too long",
        lambda: bank(question(0, stem={"en": "x" * 200_000})),
        422,
        "invalid_bundle",
        [("$.questions[0].stem.en", "longer than 10240 bytes in UTF-8 (200000)")],
    ),
    ("50 MB of text", fifty_megabytes, 413, "too_large", []),
    ("declared a bundle, bytes of a JPEG", jpeg_bytes, 415, "kind_mismatch", []),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "problems"),
    [pytest.param(b, s, c, p, id=name) for name, b, s, c, p in BAD],
)
async def test_a_bad_bank_is_refused_at_upload_and_nothing_is_kept(
    origin: Client,
    body: Callable[[], Any],
    status: int,
    code: str,
    problems: list[tuple[str, str]],
) -> None:
    data = body()
    response = await origin.post(
        "/v1/assets", params={"id": "bad-bank", "kind": "bundle"}, data=data, headers=AUTH
    )
    answer = await response.json()
    assert response.status == status, answer
    error = error_of(answer, status)
    assert error["code"] == code
    for path, words in problems:
        listed = [p["message"] for p in error["problems"] if p["path"] == path]
        assert listed, (path, error["problems"])
        assert any(words in message for message in listed), (path, words, listed)
    if problems:
        assert error["problems_total"] == len(error["problems"]) >= len(problems)
    assert await leftovers(origin) == []
    await assert_not_queued(origin, "bad-bank", data if isinstance(data, bytes) else b"")


async def test_the_first_twenty_problems_are_listed_and_all_are_counted(
    local_origin: Client,
) -> None:
    data = bank(*(question(i, answer=9) for i in range(25)))
    response = await local_origin.post(
        "/v1/assets", params={"id": "many-problems"}, data=data, headers=AUTH
    )
    error = error_of(await response.json(), 422)
    assert error["message"] == "invalid bundle: 25 problems, the first 20 listed"
    assert [p["path"] for p in error["problems"]] == [f"$.questions[{i}].answer" for i in range(20)]
    assert error["problems_total"] == 25
    assert await leftovers(local_origin) == []
    await assert_not_queued(local_origin, "many-problems", data)


async def test_a_bad_bank_sent_as_a_resumable_session_is_refused_at_complete(
    origin: Client,
) -> None:
    data = bank(question(0), question(0, answer=5))
    request = {"size_bytes": len(data), "content_hash": tree_hash(data), "id": "bad-session"}
    created = await origin.post("/v1/uploads", json=request, headers=AUTH)
    assert created.status == 201
    upload_id = (await created.json())["upload"]["upload_id"]
    part = await origin.put(f"/v1/uploads/{upload_id}/parts/1", data=data, headers=AUTH)
    assert part.status == 200
    done = await origin.post(f"/v1/uploads/{upload_id}/complete", headers=AUTH)
    error = error_of(await done.json(), 422)
    assert error["code"] == "invalid_bundle"
    assert [p["path"] for p in error["problems"]] == ["$.questions[1].id", "$.questions[1].answer"]
    store: BlobStore = app_of(origin)[STORE]
    assert [info.key async for info in store.list("")] == []
    if isinstance(store, S3BlobStore):
        config = app_of(origin)[CONFIG].origin
        assert config.s3_endpoint is not None
        uploads = s3_client(config.s3_endpoint).list_multipart_uploads(
            Bucket=config.storage.removeprefix("s3://")
        )
        assert uploads.get("Uploads", []) == []
    await assert_not_queued(origin, "bad-session", data)
    gone = await origin.get(f"/v1/uploads/{upload_id}", headers=AUTH)
    assert gone.status == 404


REAL_BANK = bank(
    question(0, stem="Plain English only?", options=["1", "2"], answer=0, explanation="Yes."),
    question(1, stem={"hi": "केवल हिंदी?"}, explanation={"hi": "हाँ"}, difficulty="hard"),
    question(
        2,
        stem={"en": "Which figure?", "ta": "எந்த படம்?", "hi-latn": "Kaun sa chitra?"},
        image="https://cdn.example.org/figs/q2.png",
        options=[{"image": "fig-q2-a"}, {"text": "none", "image": "fig-q2-b"}, "both"],
        answer=2,
        year=2019,
        marks={"correct": 4, "wrong": -1},
        topic="molar mass",
    ),
    exam="NEET",
)


async def test_a_real_bank_is_published_with_its_extra_fields(local_origin: Client) -> None:
    response = await local_origin.post(
        "/v1/assets", params={"id": "real-bank"}, data=REAL_BANK, headers=AUTH
    )
    assert response.status == 201, await response.text()
    job = await app_of(local_origin)[QUEUE].job(
        expected_job_key(local_origin, "real-bank", REAL_BANK)
    )
    assert job is not None  # the key assert_not_queued looks for is the real one
    asset = await asset_published(local_origin, "real-bank")
    path = "/" + asset["urls"]["versioned"].split("/", 3)[3]
    document = json.loads(await (await local_origin.get(path)).read())
    assert document["exam"] == "NEET"
    assert document["version"] == 1
    q0, q1, q2 = document["questions"]
    assert q0["stem"] == "Plain English only?"
    assert q0["options"] == ["1", "2"]
    assert q1["stem"] == {"hi": "केवल हिंदी?"}
    assert q1["difficulty"] == "hard"
    assert q2["image"] == "https://cdn.example.org/figs/q2.png"
    assert q2["options"] == [{"image": "fig-q2-a"}, {"image": "fig-q2-b", "text": "none"}, "both"]
    assert (q2["year"], q2["marks"], q2["topic"]) == (
        2019,
        {"correct": 4, "wrong": -1},
        "molar mass",
    )
    assert q2["stem"]["hi-latn"] == "Kaun sa chitra?"


async def test_a_session_for_bytes_already_held_checks_the_held_bank(
    local_origin: Client,
) -> None:
    first = await local_origin.post(
        "/v1/assets", params={"id": "bank-one"}, data=REAL_BANK, headers=AUTH
    )
    assert first.status == 201
    request = {"size_bytes": len(REAL_BANK), "content_hash": tree_hash(REAL_BANK), "id": "bank-two"}
    again = await local_origin.post("/v1/uploads", json=request, headers=AUTH)
    answer = await again.json()
    assert again.status == 201, answer
    assert answer["asset"]["id"] == "bank-two"
    for asset_id in ("bank-one", "bank-two"):
        shown = await asset_published(local_origin, asset_id)
        assert shown["content_hash"] == request["content_hash"]


# ---- `kshipra upload` -------------------------------------------------------------------------


def test_kshipra_upload_of_a_bad_bank_exits_2_and_prints_the_problems(
    origin_process: OriginProcess, tmp_path: Path
) -> None:
    bad = tmp_path / "bad bank.json"
    bad.write_bytes(bank(question(0), question(1, answer=7), question(2, stem={"[bold]x": "y"})))
    result = kshipra("upload", str(bad), origin=origin_process)
    assert result.returncode == 2, result
    assert "invalid bundle: 2 problems" in result.stderr
    assert "$.questions[1].answer: 7 is out of range for 4 options (0 to 3)" in result.stderr
    # Keys are printed as they are, not read as terminal markup.
    assert "$.questions[2].stem['[bold]x']: not a language code" in result.stderr

    broken = tmp_path / "broken.json"
    broken.write_bytes(b'{"bundle": "x", "questions": [}')
    result = kshipra("upload", str(broken), origin=origin_process)
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr
    assert "line 1" in result.stderr

    request = urllib.request.Request(
        f"{origin_process.url}/v1/assets?limit=10",
        headers={"Authorization": f"Bearer {origin_process.env['KSHIPRA_UPLOAD_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["assets"] == []
    assert files_under(Path(origin_process.storage)) == []
