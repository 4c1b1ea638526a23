"""The blob-store contract: one suite, run against every implementation.

``local`` is :class:`LocalDirBlobStore` in a temp directory; ``s3`` is :class:`S3BlobStore`
speaking real boto3 over HTTP to moto's threaded server on loopback (tests/fixtures_s3.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from assets.blobstore import (
    MAX_KEY_BYTES,
    MIN_PART_BYTES,
    BlobNotFoundError,
    BlobStore,
    InvalidKeyError,
    LocalDirBlobStore,
    PartInfo,
    PreconditionFailedError,
    S3BlobStore,
    StorageError,
    open_blob_store,
    validate_key,
)
from assets.blobstore.s3 import PUT_PART_BYTES
from tests.fixtures_s3 import REGION, s3_client

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    blob_store: LocalDirBlobStore | S3BlobStore
    if request.param == "local":
        blob_store = LocalDirBlobStore(tmp_path / "blobs")
    else:
        endpoint = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        blob_store = S3BlobStore(
            bucket, endpoint_url=endpoint, region_name=REGION, client=s3_client(endpoint)
        )
    yield blob_store
    await blob_store.close()


@pytest.fixture
def leftovers(store: BlobStore, request: pytest.FixtureRequest) -> Callable[[], list[str]]:
    """What a failed write could leave behind: temp files (local) or open uploads (S3)."""
    if isinstance(store, LocalDirBlobStore):
        return lambda: sorted(p.name for p in (store.root / ".tmp").iterdir())
    assert isinstance(store, S3BlobStore)
    client = s3_client(request.getfixturevalue("moto_server"))
    return lambda: [
        u["Key"] for u in client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    ]


def pattern(size_bytes: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes."""
    block = hashlib.sha256(f"{seed}".encode()).digest() * 8  # 256 bytes
    return (block * (size_bytes // len(block) + 1))[:size_bytes]


async def stream(data: bytes, chunk_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), chunk_bytes):
        yield data[offset : offset + chunk_bytes]


async def generated(size_bytes: int, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
    """*size_bytes* of pattern() made chunk by chunk (never held whole)."""
    chunk = pattern(chunk_bytes, seed=7)
    sent = 0
    while sent < size_bytes:
        piece = chunk[: min(chunk_bytes, size_bytes - sent)]
        sent += len(piece)
        yield piece


class ClientWentAwayError(Exception):
    pass


async def failing(size_bytes: int) -> AsyncIterator[bytes]:
    """A body that yields *size_bytes* and then fails, like a dropped upload."""
    async for chunk in generated(size_bytes, chunk_bytes=MiB):
        yield chunk
    raise ClientWentAwayError


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# ---- the Protocol ---------------------------------------------------------------------------


async def test_implements_protocol_and_is_ready(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)
    assert store.description
    await store.check()


async def test_put_and_get_bytes(store: BlobStore) -> None:
    info = await store.put("lectures/intro.txt", b"hello, learner")
    assert info.key == "lectures/intro.txt"
    assert info.size_bytes == 14
    assert info.etag
    assert '"' not in info.etag
    assert info.last_modified.tzinfo is not None
    assert abs((datetime.now(UTC) - info.last_modified).total_seconds()) < 60

    reader = await store.get("lectures/intro.txt")
    assert (reader.start, reader.length) == (0, 14)
    assert reader.info.etag == info.etag
    assert await reader.read_all() == b"hello, learner"
    head = await store.head("lectures/intro.txt")
    assert head is not None
    assert (head.size_bytes, head.etag) == (14, info.etag)


async def test_put_streamed(store: BlobStore) -> None:
    data = pattern(300_000)
    info = await store.put("streamed.bin", stream(data, chunk_bytes=7_000))
    assert info.size_bytes == len(data)
    assert await (await store.get("streamed.bin")).read_all() == data


async def test_empty_object(store: BlobStore) -> None:
    await store.put("empty", b"")
    reader = await store.get("empty")
    assert (reader.length, reader.info.size_bytes) == (0, 0)
    assert await reader.read_all() == b""


async def test_missing_key(store: BlobStore) -> None:
    assert await store.head("no/such/key") is None
    with pytest.raises(BlobNotFoundError):
        await store.get("no/such/key")


async def test_ranged_get(store: BlobStore) -> None:
    data = pattern(1000)
    await store.put("range.bin", data)

    reader = await store.get("range.bin", start=10, end=19)
    assert (reader.start, reader.length, reader.info.size_bytes) == (10, 10, 1000)
    assert await reader.read_all() == data[10:20]

    tail = await store.get("range.bin", start=990)
    assert tail.length == 10
    assert await tail.read_all() == data[990:]

    clamped = await store.get("range.bin", start=995, end=5000)
    assert await clamped.read_all() == data[995:]


async def test_content_type_and_metadata_round_trip(store: BlobStore) -> None:
    metadata = {"source-sha256": "ab" * 32, "uploaded-by": "teacher-7"}
    await store.put("img/a.png", b"\x89PNG...", content_type="image/png", metadata=metadata)
    head = await store.head("img/a.png")
    assert head is not None
    assert head.content_type == "image/png"
    assert head.metadata == metadata
    reader = await store.get("img/a.png")
    assert (reader.info.content_type, reader.info.metadata) == ("image/png", metadata)


async def test_overwrite_changes_etag(store: BlobStore) -> None:
    first = await store.put("doc", b"version one", content_type="text/plain")
    second = await store.put("doc", b"version two", content_type="text/markdown")
    assert first.etag != second.etag
    head = await store.head("doc")
    assert head is not None
    assert (head.etag, head.content_type) == (second.etag, "text/markdown")
    assert await (await store.get("doc")).read_all() == b"version two"


async def test_if_none_match(store: BlobStore, leftovers: Callable[[], list[str]]) -> None:
    created = await store.put("once", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        await store.put("once", b"second", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        await store.put("once", generated(9 * MiB), if_none_match=True)  # multipart on S3
    head = await store.head("once")
    assert head is not None
    assert head.etag == created.etag
    assert await (await store.get("once")).read_all() == b"first"
    assert leftovers() == []


async def test_if_none_match_loses_a_race(
    store: BlobStore, leftovers: Callable[[], list[str]]
) -> None:
    """The key appears while the body streams in: the final conditional write decides (S3:
    If-None-Match on CompleteMultipartUpload; local: the link that fails if the key exists)."""

    async def body_then_rival() -> AsyncIterator[bytes]:
        async for chunk in generated(9 * MiB):
            yield chunk
        await store.put("contested", b"the rival won")

    with pytest.raises(PreconditionFailedError):
        await store.put("contested", body_then_rival(), if_none_match=True)
    assert await (await store.get("contested")).read_all() == b"the rival won"
    assert leftovers() == []


@pytest.mark.parametrize("size_bytes", [MiB, 9 * MiB])
async def test_cancelled_put_stores_nothing(
    store: BlobStore, leftovers: Callable[[], list[str]], size_bytes: int
) -> None:
    streamed, never = asyncio.Event(), asyncio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        async for chunk in generated(size_bytes, chunk_bytes=MiB):
            yield chunk
        streamed.set()
        await never.wait()  # the client stalls; the server gives up on it
        yield b"never sent"

    task = asyncio.create_task(store.put("cancelled", stalled_body()))
    await streamed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.head("cancelled") is None
    assert leftovers() == []


async def test_concurrent_readers_see_matching_info_and_bytes(store: BlobStore) -> None:
    """Overwrites race reads: every read's info (type, size, etag) belongs to its bytes."""
    versions = {f"application/x-v{i}": pattern(40_000 + 1000 * i, seed=i) for i in range(4)}
    etags = {}
    for content_type, data in versions.items():
        etags[content_type] = (await store.put("hot", data, content_type=content_type)).etag

    async def overwrite() -> None:
        for _ in range(5):
            for content_type, data in versions.items():
                await store.put("hot", data, content_type=content_type)

    async def read() -> None:
        for _ in range(20):
            reader = await store.get("hot")
            body = await reader.read_all()
            assert body == versions[reader.info.content_type]
            assert reader.info.size_bytes == len(body)
            assert reader.info.etag == etags[reader.info.content_type]

    await asyncio.gather(overwrite(), read(), read())


async def test_delete_is_idempotent(store: BlobStore) -> None:
    await store.put("a/b/c", b"x")
    await store.delete("a/b/c")
    assert await store.head("a/b/c") is None
    await store.delete("a/b/c")
    await store.delete("never/existed")
    await store.put("a/b", b"a key where a folder was")  # local: the empty dirs went too
    assert await store.head("a/b") is not None


async def test_move(store: BlobStore) -> None:
    put = await store.put("staging/x", b"payload", content_type="video/mp4", metadata={"k": "v"})
    moved = await store.move("staging/x", "published/x")
    assert moved.key == "published/x"
    assert (moved.size_bytes, moved.content_type, moved.metadata) == (7, "video/mp4", {"k": "v"})
    assert await store.head("staging/x") is None
    assert await (await store.get("published/x")).read_all() == b"payload"
    assert put.size_bytes == moved.size_bytes

    await store.put("staging/y", b"newer")
    await store.move("staging/y", "published/x")  # replaces
    assert await (await store.get("published/x")).read_all() == b"newer"

    with pytest.raises(BlobNotFoundError):
        await store.move("staging/absent", "published/z")


async def test_list_prefix_in_key_order(store: BlobStore) -> None:
    keys = ["lectures/x.mp4", "lectures-old/y", "lectures/a/b.ts", "lecture", "images/z.png"]
    for i, key in enumerate(keys):
        await store.put(key, pattern(10 + i))
    upload_id = await store.create_multipart("pending/upload", content_type="video/mp4")

    async def listed(prefix: str = "") -> list[str]:
        return [info.key async for info in store.list(prefix)]

    # "-" sorts before "/", so "lectures-old/y" comes before everything in "lectures/".
    assert await listed() == sorted(keys)
    assert await listed("lect") == [
        "lecture",
        "lectures-old/y",
        "lectures/a/b.ts",
        "lectures/x.mp4",
    ]
    assert await listed("lectures") == ["lectures-old/y", "lectures/a/b.ts", "lectures/x.mp4"]
    assert await listed("lectures/") == ["lectures/a/b.ts", "lectures/x.mp4"]
    assert await listed("lectures/a") == ["lectures/a/b.ts"]
    assert await listed("nothing") == []
    assert await listed("lecture/") == []  # "lecture" is an object, not a folder

    # start_after: a page cursor — only keys after it, whatever folders lie in between.
    async def after(prefix: str, start_after: str) -> list[str]:
        return [info.key async for info in store.list(prefix, start_after=start_after)]

    assert await after("", "lectures-old/y") == ["lectures/a/b.ts", "lectures/x.mp4"]
    assert await after("lect", "lecture") == [
        "lectures-old/y",
        "lectures/a/b.ts",
        "lectures/x.mp4",
    ]
    assert await after("lectures/", "lectures/a") == ["lectures/a/b.ts", "lectures/x.mp4"]
    assert await after("lectures/", "lectures/a/b.ts") == ["lectures/x.mp4"]
    assert await after("", "images/z.png") == sorted(keys)[1:]
    assert await after("", "zzz") == []

    infos = {info.key: info async for info in store.list("images/")}
    head = await store.head("images/z.png")
    assert head is not None
    assert (infos["images/z.png"].size_bytes, infos["images/z.png"].etag) == (14, head.etag)
    await store.abort_multipart("pending/upload", upload_id)


async def test_local_list_hides_bookkeeping(tmp_path: Path) -> None:
    store = LocalDirBlobStore(tmp_path / "blobs")
    try:
        await store.put("visible", b"x")
        await store.create_multipart("upload", content_type="text/plain")
        (store.root / "has space").write_bytes(b"not a valid key")
        names = sorted(p.name for p in store.root.iterdir())
        assert {".meta", ".tmp", ".multipart"} <= set(names)
        assert [info.key async for info in store.list()] == ["visible"]
        assert store.path_for("visible") == store.root / "visible"
        assert store.path_for("visible").read_bytes() == b"x"
    finally:
        await store.close()


async def test_local_file_copied_in_by_hand_is_served(tmp_path: Path) -> None:
    store = LocalDirBlobStore(tmp_path / "blobs")
    try:
        (store.root / "hand").mkdir()
        (store.root / "hand" / "notes.txt").write_bytes(b"copied by an operator")
        head = await store.head("hand/notes.txt")
        assert head is not None
        assert head.etag == md5(b"copied by an operator")
        assert head.content_type == "text/plain"
    finally:
        await store.close()


@pytest.mark.parametrize("size_bytes", [MiB, 9 * MiB])
async def test_failing_body_stores_nothing(
    store: BlobStore, leftovers: Callable[[], list[str]], size_bytes: int
) -> None:
    with pytest.raises(ClientWentAwayError):
        await store.put("half", failing(size_bytes))
    assert await store.head("half") is None
    assert [info.key async for info in store.list()] == []
    assert leftovers() == []

    await store.put("kept", b"old")
    with pytest.raises(ClientWentAwayError):
        await store.put("kept", failing(size_bytes))
    assert await (await store.get("kept")).read_all() == b"old"
    assert leftovers() == []


async def test_failing_part_is_not_recorded(
    store: BlobStore, leftovers: Callable[[], list[str]]
) -> None:
    upload_id = await store.create_multipart("video", content_type="video/mp4")
    await store.upload_part("video", upload_id, 1, b"part one")
    with pytest.raises(ClientWentAwayError):
        await store.upload_part("video", upload_id, 2, failing(MiB))
    parts = await store.list_parts("video", upload_id)
    assert [p.part_number for p in parts] == [1]
    if isinstance(store, LocalDirBlobStore):
        assert leftovers() == []
    await store.abort_multipart("video", upload_id)
    assert leftovers() == []


async def test_multipart_upload(store: BlobStore) -> None:
    part1_old = pattern(MIN_PART_BYTES, seed=1)
    part1 = pattern(MIN_PART_BYTES, seed=2)
    part2 = b"the short last part"
    upload_id = await store.create_multipart("lectures/long.mp4", content_type="video/mp4")

    got2 = await store.upload_part("lectures/long.mp4", upload_id, 2, part2)  # out of order
    got1_old = await store.upload_part("lectures/long.mp4", upload_id, 1, stream(part1_old))
    assert (got2.part_number, got2.size_bytes) == (2, len(part2))
    listed = await store.list_parts("lectures/long.mp4", upload_id)
    assert [(p.part_number, p.size_bytes) for p in listed] == [(1, MIN_PART_BYTES), (2, len(part2))]
    assert listed[0].etag == got1_old.etag

    got1 = await store.upload_part("lectures/long.mp4", upload_id, 1, part1)  # re-upload
    assert got1.etag != got1_old.etag
    listed = await store.list_parts("lectures/long.mp4", upload_id)
    assert [p.etag for p in listed] == [got1.etag, got2.etag]
    assert await store.head("lectures/long.mp4") is None  # nothing visible before completion

    info = await store.complete_multipart("lectures/long.mp4", upload_id, listed)
    assert info.size_bytes == MIN_PART_BYTES + len(part2)
    assert info.content_type == "video/mp4"
    body = await (await store.get("lectures/long.mp4")).read_all()
    assert body == part1 + part2
    with pytest.raises(BlobNotFoundError):
        await store.list_parts("lectures/long.mp4", upload_id)


async def test_multipart_refuses_small_non_final_part(store: BlobStore) -> None:
    upload_id = await store.create_multipart("small", content_type="text/plain")
    parts = [
        await store.upload_part("small", upload_id, 1, b"too small"),
        await store.upload_part("small", upload_id, 2, b"last"),
    ]
    with pytest.raises(PreconditionFailedError, match=str(MIN_PART_BYTES)):
        await store.complete_multipart("small", upload_id, parts)
    assert await store.head("small") is None
    await store.abort_multipart("small", upload_id)


async def test_multipart_refuses_unknown_part(store: BlobStore) -> None:
    upload_id = await store.create_multipart("k", content_type="text/plain")
    real = await store.upload_part("k", upload_id, 1, b"one")
    with pytest.raises(PreconditionFailedError):
        await store.complete_multipart("k", upload_id, [PartInfo(1, 3, md5(b"other"))])
    with pytest.raises(PreconditionFailedError):
        await store.complete_multipart("k", upload_id, [real, PartInfo(2, 3, real.etag)])
    assert await store.head("k") is None
    await store.abort_multipart("k", upload_id)


async def test_abort_multipart(store: BlobStore, leftovers: Callable[[], list[str]]) -> None:
    upload_id = await store.create_multipart("gone", content_type="video/mp4")
    await store.upload_part("gone", upload_id, 1, b"data")
    await store.abort_multipart("gone", upload_id)
    with pytest.raises(BlobNotFoundError):
        await store.list_parts("gone", upload_id)
    await store.abort_multipart("gone", upload_id)  # unknown: not an error
    assert await store.head("gone") is None
    assert leftovers() == []


@pytest.mark.parametrize("upload_id", ["0" * 32, "not-an-upload", "../../etc"])
async def test_unknown_upload(store: BlobStore, upload_id: str) -> None:
    with pytest.raises(BlobNotFoundError):
        await store.list_parts("some/key", upload_id)
    await store.abort_multipart("some/key", upload_id)


async def test_local_upload_belongs_to_its_key(tmp_path: Path) -> None:
    # Local only: real S3 answers NoSuchUpload here too, but moto (5.2) ignores the key.
    store = LocalDirBlobStore(tmp_path / "blobs")
    try:
        upload_id = await store.create_multipart("mine", content_type="text/plain")
        with pytest.raises(BlobNotFoundError):
            await store.list_parts("theirs", upload_id)
        await store.abort_multipart("theirs", upload_id)  # not theirs to abort
        assert await store.list_parts("mine", upload_id) == []
    finally:
        await store.close()


async def test_large_streamed_put(store: BlobStore) -> None:
    """Above PUT_PART_BYTES: a multipart upload on S3, streamed on both."""
    size_bytes = 9 * MiB
    assert size_bytes > PUT_PART_BYTES
    expected = hashlib.sha256()
    async for chunk in generated(size_bytes):
        expected.update(chunk)

    info = await store.put("big.bin", generated(size_bytes), content_type="video/mp4")
    assert info.size_bytes == size_bytes
    assert info.content_type == "video/mp4"

    reader = await store.get("big.bin")
    got = hashlib.sha256()
    async for chunk in reader.chunks:
        assert len(chunk) <= MiB
        got.update(chunk)
    assert got.hexdigest() == expected.hexdigest()

    boundary = PUT_PART_BYTES
    span = await (await store.get("big.bin", start=boundary - 5, end=boundary + 4)).read_all()
    whole = pattern(256 * 1024, seed=7)
    offset = (boundary - 5) % len(whole)
    assert span == (whole + whole)[offset : offset + 10]

    moved = await store.move("big.bin", "archive/big.bin")  # S3: a multipart copy
    assert (moved.size_bytes, moved.content_type) == (size_bytes, "video/mp4")


async def test_s3_version_ids(moto_server: str, s3_bucket: str) -> None:
    store = S3BlobStore(s3_bucket, endpoint_url=moto_server, region_name=REGION)
    try:
        first = await store.put("v", b"1")
        second = await store.put("v", b"2")
        assert first.version_id
        assert second.version_id
        assert first.version_id != second.version_id
        head = await store.head("v")
        assert head is not None
        assert head.version_id == second.version_id
    finally:
        await store.close()


async def test_s3_unreachable_is_a_storage_error(moto_server: str) -> None:
    store = S3BlobStore("no-such-bucket-anywhere", endpoint_url=moto_server, region_name=REGION)
    try:
        with pytest.raises(StorageError):
            await store.check()
        with pytest.raises(StorageError):
            await store.put("x", b"y")
    finally:
        await store.close()


async def test_s3_ensure_bucket(moto_server: str) -> None:
    bucket = f"kshipra-ensured-{uuid.uuid4().hex[:12]}"
    store = S3BlobStore(bucket, endpoint_url=moto_server, region_name=REGION)
    try:
        await store.ensure_bucket()
        await store.ensure_bucket()  # idempotent
        await store.check()
        status = s3_client(moto_server).get_bucket_versioning(Bucket=bucket)
        assert status["Status"] == "Enabled"
    finally:
        await store.close()
        s3_client(moto_server).delete_bucket(Bucket=bucket)


# ---- keys -----------------------------------------------------------------------------------

GOOD_KEYS = [
    "a",
    "lectures/chem/mole-concept/intro.mp4",
    "a/b/c.d",
    "v1.2/seg_00001.ts",
    "user@example.com/x~y+z=w,v",
    "a" * MAX_KEY_BYTES,
    "with..dots/in.the..middle",
]
BAD_KEYS = [
    "",
    "/abs",
    "a/../b",
    "..",
    ".",
    "a//b",
    "a/",
    "a\\b",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    ".hidden/x",
    "a/.tmp/x",
    ".meta",
    "a b",
    "ünïcode",
    "a" * (MAX_KEY_BYTES + 1),
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_validate_key_accepts(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_refuses(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


async def test_every_method_refuses_bad_keys(store: BlobStore) -> None:
    bad = "../etc/passwd"
    await store.put("good", b"x")
    upload_id = await store.create_multipart("good", content_type="text/plain")
    calls = {
        "put": store.put(bad, b"x"),
        "head": store.head(bad),
        "get": store.get(bad),
        "delete": store.delete(bad),
        "move from": store.move(bad, "good2"),
        "move to": store.move("good", bad),
        "create_multipart": store.create_multipart(bad, content_type="text/plain"),
        "upload_part": store.upload_part(bad, upload_id, 1, b"x"),
        "list_parts": store.list_parts(bad, upload_id),
        "complete_multipart": store.complete_multipart(bad, upload_id, []),
        "abort_multipart": store.abort_multipart(bad, upload_id),
    }
    for name, call in calls.items():
        try:
            await call
        except InvalidKeyError:
            continue
        pytest.fail(f"{name} accepted {bad!r}")
    for prefix in ("../", ".tmp", "a//"):
        with pytest.raises(InvalidKeyError):
            [info async for info in store.list(prefix)]
    if isinstance(store, LocalDirBlobStore):
        with pytest.raises(InvalidKeyError):
            store.path_for(bad)
        assert not (store.root.parent / "etc").exists()
    assert await store.head("good") is not None
    assert [p.part_number for p in await store.list_parts("good", upload_id)] == []
    await store.abort_multipart("good", upload_id)


# ---- open_blob_store ------------------------------------------------------------------------


async def test_open_local(tmp_path: Path) -> None:
    store = open_blob_store(str(tmp_path / "new" / "dir"))
    try:
        assert isinstance(store, LocalDirBlobStore)
        assert (tmp_path / "new" / "dir").is_dir()
        await store.put("k", b"v")
        assert (tmp_path / "new" / "dir" / "k").read_bytes() == b"v"
    finally:
        await store.close()


async def test_open_s3_with_prefix(moto_server: str, s3_bucket: str) -> None:
    store = open_blob_store(f"s3://{s3_bucket}/tenant/a/", s3_endpoint=moto_server)
    try:
        assert isinstance(store, S3BlobStore)
        assert store.description.startswith(f"s3://{s3_bucket}/tenant/a")
        await store.put("x/y", b"v")
        raw = s3_client(moto_server).list_objects_v2(Bucket=s3_bucket)
        assert [o["Key"] for o in raw.get("Contents", [])] == ["tenant/a/x/y"]
        assert [info.key async for info in store.list()] == ["x/y"]
        assert [info.key async for info in store.list("x")] == ["x/y"]
        await store.move("x/y", "z")
        assert await (await store.get("z")).read_all() == b"v"
    finally:
        await store.close()


@pytest.mark.parametrize("location", ["s3://", "s3:///prefix", "s3://bucket/../x", ""])
def test_open_refuses_bad_locations(location: str) -> None:
    with pytest.raises(ValueError, match=r"bucket|prefix|empty"):
        open_blob_store(location)


def test_env_has_fake_credentials(moto_server: str) -> None:
    assert moto_server.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
