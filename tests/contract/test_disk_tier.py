"""The disk tier on real files: streaming, atomic publish, checksums, restart, eviction through
real policies, and several tiers (and a second process) over one directory."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import textwrap
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import edge.tiers.disk as disk_module
from edge.policy import POLICY_NAMES, make_policy
from edge.tiers import (
    BodySizeMismatchError,
    CorruptEntryError,
    DiskEntry,
    DiskTier,
    EntryGoneError,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

MakeTier = Callable[..., Awaitable[DiskTier]]


async def chunks_of(data: bytes, chunk_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk_bytes):
        yield data[start : start + chunk_bytes]


async def repeated(chunk: bytes, times: int) -> AsyncIterator[bytes]:
    for _ in range(times):
        yield chunk


def body_for(label: str, size_bytes: int) -> bytes:
    """Distinct, deterministic content per label."""
    seed = label.encode("utf-8", "surrogatepass") + b"|"
    return (seed * (size_bytes // len(seed) + 1))[:size_bytes]


def disk_files(root: Path) -> list[str]:
    """Every regular file under the cache directory, relative, sorted."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def bodies_on_disk(root: Path) -> list[Path]:
    return [path for path in root.glob("??/?/*.body")]


def metas_on_disk(root: Path) -> list[Path]:
    return [path for path in root.glob("??/?/*.meta")]


def keys_on_disk(root: Path) -> set[str]:
    return {json.loads(path.read_bytes())["key"] for path in metas_on_disk(root)}


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
async def make_tier(cache_dir: Path) -> AsyncIterator[MakeTier]:
    """Open tiers over one directory; all closed at the end."""
    opened: list[DiskTier] = []

    async def make(
        capacity_bytes: int = 1 << 30,
        policy: str = "lru",
        *,
        fsync: bool = False,
    ) -> DiskTier:
        tier = DiskTier(
            cache_dir,
            capacity_bytes=capacity_bytes,
            policy=make_policy(policy, capacity_bytes),
            fsync=fsync,
        )
        await tier.open()
        opened.append(tier)
        return tier

    yield make
    for tier in opened:
        await tier.close()


async def read_via_open_body(tier: DiskTier, entry: DiskEntry) -> bytes:
    file = await tier.open_body(entry)
    with file:
        assert file.tell() == 0
        return await asyncio.to_thread(file.readall)


# ---- round trips ---------------------------------------------------------------------------------


async def test_store_lookup_read_round_trip(make_tier: MakeTier, cache_dir: Path) -> None:
    tier = await make_tier()
    meta = {"status": 200, "headers": [("Content-Type", "text/plain")], "tags": ["a", "b"]}
    entry = await tier.store("k", meta, chunks_of(b"hello, world"), expected_size=12)

    assert entry is not None
    assert entry.key == "k"
    assert entry.size_bytes == 12
    assert entry.checksum == f"{zlib.crc32(b'hello, world'):08x}"
    assert entry.meta == {
        "status": 200,
        "headers": [["Content-Type", "text/plain"]],
        "tags": ["a", "b"],
    }
    assert entry.body_path.read_bytes() == b"hello, world"
    assert await tier.lookup("k") == entry
    assert await tier.read_body(entry) == b"hello, world"
    assert await read_via_open_body(tier, entry) == b"hello, world"
    assert (len(tier), tier.used_bytes, list(tier.keys()), list(tier.entries())) == (
        1,
        12,
        ["k"],
        [entry],
    )
    assert await tier.lookup("other") is None

    # The on-disk format: one immutable body and one JSON meta in a leaf of the fan-out.
    (meta_path,) = metas_on_disk(cache_dir)
    (body_path,) = bodies_on_disk(cache_dir)
    assert body_path == entry.body_path
    hash_hex = meta_path.name.removesuffix(".meta")
    assert meta_path.parent == cache_dir / hash_hex[:2] / hash_hex[2]
    assert body_path.name.startswith(hash_hex + ".")
    document = json.loads(meta_path.read_bytes())
    assert document == {
        "format": 1,
        "key": "k",
        "body": body_path.name,
        "size_bytes": 12,
        "checksum": entry.checksum,
        "checksum_algorithm": "crc32",
        "stored_at": entry.stored_at,
        "meta": entry.meta,
    }


async def test_multi_mib_body_streamed_in_many_chunks(make_tier: MakeTier) -> None:
    tier = await make_tier(fsync=True)
    data = os.urandom(6 * MiB + 123)
    entry = await tier.store("big", {}, chunks_of(data, 4096), expected_size=len(data))

    assert entry is not None
    assert entry.size_bytes == len(data)
    assert await read_via_open_body(tier, entry) == data
    assert await tier.read_body(entry) == data
    assert await send_via_sendfile(tier, entry) == data


async def send_via_sendfile(tier: DiskTier, entry: DiskEntry) -> bytes:
    """What the edge does on a hit: sendfile the open body into a socket."""
    loop = asyncio.get_running_loop()
    sender, receiver = socket.socketpair()
    with sender, receiver:
        sender.setblocking(False)
        receiver.setblocking(False)

        async def receive() -> bytes:
            received = bytearray()
            while len(received) < entry.size_bytes:
                received += await loop.sock_recv(receiver, MiB)
            return bytes(received)

        receiving = asyncio.create_task(receive())
        with await tier.open_body(entry) as file:
            sent = await loop.sock_sendfile(sender, file, 0, entry.size_bytes, fallback=False)
        assert sent == entry.size_bytes
        return await receiving


async def test_store_never_holds_the_body_in_memory(make_tier: MakeTier) -> None:
    tier = await make_tier()
    chunk = os.urandom(64 * 1024)
    tracemalloc.start()
    try:
        entry = await tier.store("huge", {}, repeated(chunk, 512))  # 32 MiB
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert entry is not None
    assert entry.size_bytes == 32 * MiB
    assert entry.checksum == f"{zlib.crc32(chunk * 512):08x}"
    assert peak_bytes < 4 * MiB


async def test_restart_finds_the_entries_with_their_meta(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    keys = ["https://e/p?q=1\x00v:br", "ключ/हिंदी", "lone \ud800 surrogate", "plain"]
    first = await make_tier()
    stored = {}
    for key in keys:
        entry = await first.store(key, {"status": 200, "key": key}, chunks_of(body_for(key, 5000)))
        assert entry is not None
        stored[key] = entry
    await first.close()

    second = DiskTier(cache_dir, capacity_bytes=1 << 30, policy=make_policy("s3fifo", 1 << 30))
    assert await second.open() == len(keys)
    try:
        for key in keys:
            found = await second.lookup(key)
            assert found == stored[key]
            assert await second.read_body(found) == body_for(key, 5000)
        assert second.used_bytes == 5000 * len(keys)
    finally:
        await second.close()


async def test_metadata_and_what_purges_match_on_survive_a_restart_however_the_file_is_laid_out(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    meta = {
        "url_key": "cdn/page",
        "tags": ["bundle:1", "lang:hi"],
        "note": ',"meta":{"x":1}} ',  # the meta file's own syntax, inside a string
        "meta": {"meta": [1, 2.5, None, True, "ключ"]},  # and as member names
    }
    first = await make_tier()
    entries = {}
    for key in ("as written", "rewritten by hand", "reordered"):
        entry = await first.store(key, meta, chunks_of(body_for(key, 100)))
        assert entry is not None
        entries[key] = entry
    untagged = await first.store("cdn/page", {"url_key": "cdn/page"}, chunks_of(b"x"))
    assert untagged is not None
    await first.close()
    for key, rewrite in (
        ("rewritten by hand", lambda doc: json.dumps(doc, indent=2)),
        ("reordered", lambda doc: json.dumps(dict(reversed(doc.items())))),
    ):
        body = entries[key].body_path
        meta_file = body.with_name(body.name.split(".")[0] + ".meta")
        meta_file.write_text(rewrite(json.loads(meta_file.read_bytes())))

    second = await make_tier()
    assert len(second) == 4
    by_key = {entry.key: entry for entry in second.entries()}
    for key in entries:
        found = by_key[key]
        assert found.meta == meta
        assert (found.url_key, found.tags) == ("cdn/page", ("bundle:1", "lang:hi"))
        assert await second.read_body(found) == body_for(key, 100)
    assert (by_key["cdn/page"].url_key, by_key["cdn/page"].tags) == ("cdn/page", ())


# ---- start-up cleanup ----------------------------------------------------------------------------


async def test_open_removes_temp_files_orphan_bodies_and_superseded_bodies(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    first = await make_tier()
    entry = await first.store("kept", {}, chunks_of(b"kept body"))
    assert entry is not None
    await first.close()
    kept = disk_files(cache_dir)

    (cache_dir / ".tmp" / "stray.tmp").write_bytes(b"x")
    dead = cache_dir / ".tmp" / "4242-deadbeef"
    dead.mkdir()
    (dead / "half.body").write_bytes(b"half a body")
    orphan = cache_dir / "ab" / "c" / ("abc" + "0" * 61 + ".0123456789abcdef.body")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody names me")
    superseded = entry.body_path.with_name(entry.body_path.name.split(".")[0] + ".00ff.body")
    superseded.write_bytes(b"an older generation")
    stray_meta_tmp = cache_dir / ".tmp" / "x.meta"
    stray_meta_tmp.write_bytes(b"{")

    second = await make_tier()
    assert len(second) == 1
    assert disk_files(cache_dir) == kept
    assert sorted(os.listdir(cache_dir / ".tmp")) == [second._tmp().rsplit("/", 1)[1]]
    found = await second.lookup("kept")
    assert found is not None
    assert await second.read_body(found) == b"kept body"


async def test_open_spares_a_live_tiers_temp_files(make_tier: MakeTier, cache_dir: Path) -> None:
    writer = await make_tier()
    streaming = asyncio.Event()
    release = asyncio.Event()
    data = os.urandom(3 * MiB)

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[: 2 * MiB]  # a full batch: the temp file is being written
        streaming.set()
        await release.wait()
        yield data[2 * MiB :]

    store = asyncio.create_task(writer.store("slow", {}, slow_body()))
    await streaming.wait()
    other = await make_tier()  # a worker (re)starting meanwhile cleans up at open
    release.set()
    entry = await store

    assert entry is not None
    found = await other.lookup("slow")
    assert found == entry
    assert await other.read_body(found) == data


async def test_corrupt_or_half_written_meta_is_dropped_at_open(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    first = await make_tier()
    entries = {}
    for key in ("good", "garbage", "half", "wrong-key", "bad-size"):
        entry = await first.store(key, {"k": key}, chunks_of(body_for(key, 300)))
        assert entry is not None
        entries[key] = entry
    await first.close()

    def meta_path(key: str) -> Path:
        body = entries[key].body_path
        return body.with_name(body.name.split(".")[0] + ".meta")

    meta_path("garbage").write_bytes(b"\x00\xff not json")
    half = meta_path("half").read_bytes()
    meta_path("half").write_bytes(half[: len(half) // 2])
    document = json.loads(meta_path("wrong-key").read_bytes())
    meta_path("wrong-key").write_text(json.dumps({**document, "key": "another key"}))
    document = json.loads(meta_path("bad-size").read_bytes())
    meta_path("bad-size").write_text(json.dumps({**document, "size_bytes": "300"}))

    second = await make_tier()
    assert list(second.keys()) == ["good"]
    assert keys_on_disk(cache_dir) == {"good"}
    assert bodies_on_disk(cache_dir) == [entries["good"].body_path]
    for key in ("garbage", "half", "wrong-key", "bad-size"):
        assert await second.lookup(key) is None


# ---- corruption ----------------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


READERS: dict[str, Callable[[DiskTier, DiskEntry], Awaitable[bytes]]] = {
    "open_body": read_via_open_body,
    "read_body": DiskTier.read_body,
}


@pytest.mark.parametrize("damage", [flip_a_byte, truncate], ids=["flipped", "truncated"])
@pytest.mark.parametrize("reader", list(READERS))
async def test_damaged_body_is_dropped_on_first_serve_never_returned(
    make_tier: MakeTier, cache_dir: Path, damage: Callable[[Path], None], reader: str
) -> None:
    first = await make_tier()
    entry = await first.store("k", {}, chunks_of(os.urandom(256 * 1024)))
    assert entry is not None
    await first.close()
    damage(entry.body_path)

    restarted = await make_tier()
    found = await restarted.lookup("k")
    assert found == entry  # open() reads metas only; the body is checked when served
    with pytest.raises(CorruptEntryError):
        await READERS[reader](restarted, found)

    assert disk_files(cache_dir) == []
    assert (len(restarted), restarted.used_bytes) == (0, 0)
    assert await restarted.lookup("k") is None


@pytest.mark.parametrize("reader", list(READERS))
async def test_body_truncated_after_it_was_verified_is_still_caught(
    make_tier: MakeTier, cache_dir: Path, reader: str
) -> None:
    tier = await make_tier()
    entry = await tier.store("k", {}, chunks_of(b"0123456789" * 1000))
    assert entry is not None
    assert await READERS[reader](tier, entry) == b"0123456789" * 1000  # verified here
    truncate(entry.body_path)

    with pytest.raises(CorruptEntryError):
        await READERS[reader](tier, entry)
    assert disk_files(cache_dir) == []
    assert await tier.lookup("k") is None


async def test_concurrent_first_serves_share_one_verification(
    make_tier: MakeTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await make_tier()
    entry = await first.store("k", {}, chunks_of(os.urandom(MiB)))
    assert entry is not None
    other = await make_tier()
    found = await other.lookup("k")
    assert found is not None
    calls = []
    verify = disk_module._verify_body

    def counting_verify(path: str, size_bytes: int, checksum: str) -> bool:
        calls.append(path)
        return verify(path, size_bytes, checksum)

    monkeypatch.setattr(disk_module, "_verify_body", counting_verify)
    files = await asyncio.gather(*(other.open_body(found) for _ in range(5)))
    for file in files:
        file.close()
    await read_via_open_body(other, found)
    assert calls == [str(found.body_path)]


# ---- failed stores publish nothing ---------------------------------------------------------------


async def test_iterator_raising_mid_stream_publishes_nothing(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    tier = await make_tier()
    before = await tier.store("k", {"v": 1}, chunks_of(b"version one"))
    assert before is not None

    async def broken() -> AsyncIterator[bytes]:
        for _ in range(48):
            yield os.urandom(64 * 1024)  # 3 MiB: several batches reach the temp file
        raise ConnectionResetError("upstream went away")

    with pytest.raises(ConnectionResetError):
        await tier.store("k", {"v": 2}, broken())
    with pytest.raises(ConnectionResetError):
        await tier.store("new", {}, broken())

    assert disk_files(cache_dir) == sorted(
        str(path.relative_to(cache_dir)) for path in (*metas_on_disk(cache_dir), before.body_path)
    )
    assert await tier.lookup("k") == before
    assert await tier.read_body(before) == b"version one"
    assert await tier.lookup("new") is None
    assert (len(tier), tier.used_bytes) == (1, len(b"version one"))


async def test_cancelled_store_leaves_no_temp_file(make_tier: MakeTier, cache_dir: Path) -> None:
    tier = await make_tier()
    streaming = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield os.urandom(2 * MiB)
        streaming.set()
        await asyncio.Event().wait()  # never set
        yield b""  # pragma: no cover

    store = asyncio.create_task(tier.store("k", {}, stalled()))
    await streaming.wait()
    store.cancel()
    with pytest.raises(asyncio.CancelledError):
        await store

    assert disk_files(cache_dir) == []
    assert (len(tier), tier.used_bytes) == (0, 0)


@pytest.mark.parametrize("actual_bytes", [999, 1001, 3 * MiB])
async def test_expected_size_mismatch_publishes_nothing(
    make_tier: MakeTier, cache_dir: Path, actual_bytes: int
) -> None:
    tier = await make_tier()
    with pytest.raises(BodySizeMismatchError) as raised:
        await tier.store("k", {}, chunks_of(bytes(actual_bytes)), expected_size=1000)

    assert isinstance(raised.value, ValueError)
    assert (raised.value.expected_size, raised.value.actual_size) == (1000, actual_bytes)
    assert disk_files(cache_dir) == []
    assert await tier.lookup("k") is None
    assert (len(tier), tier.used_bytes) == (0, 0)


async def test_meta_that_json_cannot_hold_is_refused_before_streaming(make_tier: MakeTier) -> None:
    tier = await make_tier()
    with pytest.raises(TypeError):
        await tier.store("k", {"when": object()}, chunks_of(b"x"))
    with pytest.raises(ValueError, match="Out of range float"):
        await tier.store("k", {"ttl": float("nan")}, chunks_of(b"x"))
    assert len(tier) == 0


# ---- the policy decides --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_NAMES)
async def test_eviction_deletes_the_victims_files(
    make_tier: MakeTier, cache_dir: Path, policy: str
) -> None:
    tier = await make_tier(capacity_bytes=3000, policy=policy)
    for i in range(12):
        await tier.store(f"k{i}", {"i": i}, chunks_of(body_for(f"k{i}", 1000)))
        if i % 3 == 0:
            await tier.lookup("k0")
        assert tier.used_bytes <= 3000
        assert set(tier.keys()) == keys_on_disk(cache_dir)
        assert sum(path.stat().st_size for path in bodies_on_disk(cache_dir)) == tier.used_bytes
        assert len(bodies_on_disk(cache_dir)) == len(tier)

    assert 0 < len(tier) <= 3
    for i in range(12):
        entry = await tier.lookup(f"k{i}")
        assert (entry is not None) == (f"k{i}" in set(tier.keys()))


async def test_a_hit_is_reported_to_the_policy(make_tier: MakeTier) -> None:
    tier = await make_tier(capacity_bytes=2000, policy="lru")
    await tier.store("a", {}, chunks_of(bytes(1000)))
    await tier.store("b", {}, chunks_of(bytes(1000)))
    assert await tier.lookup("a") is not None  # a is now the most recently used
    await tier.store("c", {}, chunks_of(bytes(1000)))
    assert sorted(tier.keys()) == ["a", "c"]


async def test_policy_declines_a_body_larger_than_the_capacity(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    tier = await make_tier(capacity_bytes=1000)
    assert await tier.store("big", {}, chunks_of(bytes(5000), 1024)) is None
    assert await tier.store("big", {}, chunks_of(bytes(5000)), expected_size=5000) is None
    assert disk_files(cache_dir) == []

    small = await tier.store("k", {}, chunks_of(bytes(100)))
    assert small is not None
    assert await tier.store("k", {}, chunks_of(bytes(2000))) is None  # policy drops the old one
    assert disk_files(cache_dir) == []
    assert (len(tier), tier.used_bytes) == (0, 0)
    assert await tier.lookup("k") is None


async def test_capacity_must_match_the_policys(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        DiskTier(cache_dir, capacity_bytes=10, policy=make_policy("lru", 20))


# ---- meta updates and removal --------------------------------------------------------------------


async def test_update_meta_keeps_the_body(make_tier: MakeTier, cache_dir: Path) -> None:
    tier = await make_tier()
    entry = await tier.store("k", {"etag": "v1", "response_time": 1.0}, chunks_of(b"body"))
    assert entry is not None

    updated = await tier.update_meta(entry, {"etag": "v1", "response_time": 2.0})
    assert updated is not None
    assert (updated.body_path, updated.checksum, updated.stored_at) == (
        entry.body_path,
        entry.checksum,
        entry.stored_at,
    )
    assert updated.meta == {"etag": "v1", "response_time": 2.0}
    assert await tier.lookup("k") == updated
    assert await tier.read_body(updated) == b"body"
    assert len(bodies_on_disk(cache_dir)) == 1
    assert not os.listdir(tier._tmp())

    by_key = await tier.update_meta("k", {"etag": "v1", "response_time": 3.0})
    assert by_key is not None
    assert by_key.meta == {"etag": "v1", "response_time": 3.0}
    assert by_key.body_file == entry.body_file
    assert await tier.update_meta("never stored", {}) is None

    await tier.close()
    restarted = await make_tier()
    assert await restarted.lookup("k") == by_key


async def test_update_meta_of_a_replaced_body_is_refused(make_tier: MakeTier) -> None:
    first = await make_tier()
    second = await make_tier()
    old = await first.store("k", {"etag": "v1"}, chunks_of(b"one"))
    assert old is not None
    new = await second.store("k", {"etag": "v2"}, chunks_of(b"two"))
    assert new is not None

    assert await first.lookup("k") == old  # first's index still holds the old body
    assert await first.update_meta("k", {"etag": "v1", "refreshed": True}) is None
    assert await first.update_meta(old, {"etag": "v1", "refreshed": True}) is None
    found = await first.lookup("k")
    assert found == new
    assert await first.read_body(found) == b"two"


async def test_remove_deletes_files_index_and_policy(make_tier: MakeTier, cache_dir: Path) -> None:
    tier = await make_tier()
    await tier.store("k", {}, chunks_of(b"body"))
    await tier.store("other", {}, chunks_of(b"other"))
    await tier.remove("k")
    await tier.remove("never stored")

    assert list(tier.keys()) == ["other"]
    assert tier.used_bytes == 5
    assert keys_on_disk(cache_dir) == {"other"}
    assert await tier.lookup("k") is None


# ---- several tiers over one directory ------------------------------------------------------------


async def test_a_tier_adopts_what_another_stored(make_tier: MakeTier) -> None:
    first = await make_tier()
    second = await make_tier()
    entry = await first.store("k", {"from": "first"}, chunks_of(b"shared body"))

    assert "k" not in second
    found = await second.lookup("k")
    assert found is not None
    assert found == entry
    assert "k" in second
    assert second.used_bytes == len(b"shared body")
    assert await read_via_open_body(second, found) == b"shared body"


async def test_replace_and_remove_while_another_tier_holds_the_body_open(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    writer = await make_tier()
    reader = await make_tier()
    one, two = os.urandom(300_000), os.urandom(200_000)
    await writer.store("k", {"v": 1}, chunks_of(one))
    old = await reader.lookup("k")
    assert old is not None
    held = await reader.open_body(old)

    await writer.store("k", {"v": 2}, chunks_of(two))
    assert not old.body_path.exists()
    with held:
        assert held.readall() == one  # the open file keeps the old bytes

    with pytest.raises(EntryGoneError) as raised:
        await reader.open_body(old)
    assert isinstance(raised.value, FileNotFoundError)
    new = await reader.lookup("k")  # re-indexed when the body was found gone
    assert new is not None
    assert new.meta == {"v": 2}
    held = await reader.open_body(new)

    await writer.remove("k")
    assert disk_files(cache_dir) == []
    with held:
        assert held.readall() == two
    with pytest.raises(EntryGoneError):
        await reader.read_body(new)
    assert await reader.lookup("k") is None
    assert (len(reader), reader.used_bytes) == (0, 0)


async def test_sync_adopts_forgets_updates_and_enforces_the_budget(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    first = await make_tier(capacity_bytes=4000)
    second = await make_tier(capacity_bytes=4000)
    for i in range(3):
        await first.store(f"a{i}", {"i": i}, chunks_of(bytes(1000)))
        await second.store(f"b{i}", {"i": i}, chunks_of(bytes(1000)))
    assert sum(path.stat().st_size for path in bodies_on_disk(cache_dir)) == 6000  # 2 views

    assert await second.sync() > 0
    assert second.used_bytes <= 4000
    assert sum(path.stat().st_size for path in bodies_on_disk(cache_dir)) <= 4000
    assert set(second.keys()) == keys_on_disk(cache_dir)
    assert await second.sync() == 0

    survivor = next(key for key in sorted(second.keys()) if key.startswith("a"))
    stale = await first.lookup(survivor)
    assert stale is not None
    await first.update_meta(stale, {"i": "updated"})
    await first.store("a-new", {}, chunks_of(b""))  # empty: adopting it evicts nothing
    gone = next(key for key in sorted(second.keys()) if key.startswith("b"))
    await first.remove(gone)

    assert await second.sync() == 3
    assert set(second.keys()) == keys_on_disk(cache_dir)
    entry = await second.lookup(survivor)
    assert entry is not None
    assert entry.meta == {"i": "updated"}
    empty = await second.lookup("a-new")
    assert empty is not None
    assert await read_via_open_body(second, empty) == b""


# ---- a real second process -----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys, threading
    from pathlib import Path

    from edge.policy import make_policy
    from edge.tiers import DiskTier


    def body(label, size):
        seed = label.encode() + b"|"
        return (seed * (size // len(seed) + 1))[:size]


    async def chunks(data):
        for start in range(0, len(data), 8192):
            yield data[start : start + 8192]


    async def main(directory, mode):
        tier = DiskTier(
            Path(directory), capacity_bytes=1 << 30, policy=make_policy("lru", 1 << 30),
            fsync=False,
        )
        await tier.open()
        if mode == "fill":
            for i in range(20):
                key = f"child-{i}"
                await tier.store(key, {"i": i}, chunks(body(key, 1000 + 997 * i)))
        else:
            stop = threading.Event()
            threading.Thread(target=lambda: (sys.stdin.readline(), stop.set())).start()
            version = 0
            while not stop.is_set():
                version += 1
                label = f"hot-{version}"
                await tier.store("hot", {"label": label}, chunks(body(label, 40000 + version)))
                if version == 1:
                    print("ready", flush=True)
        await tier.close()


    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def start_child(directory: Path, mode: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(directory),
        mode,
        cwd=REPO_ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def test_a_second_process_stores_what_the_first_then_finds(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    tier = await make_tier()  # open before the child: everything it stores is new to us
    child = await start_child(cache_dir, "fill")
    await child.communicate()
    assert child.returncode == 0

    for i in range(20):
        key = f"child-{i}"
        entry = await tier.lookup(key)
        assert entry is not None
        assert entry.meta == {"i": i}
        assert await read_via_open_body(tier, entry) == body_for(key, 1000 + 997 * i)
    assert len(tier) == 20
    assert os.listdir(cache_dir / ".tmp") == [tier._tmp().rsplit("/", 1)[1]]


async def test_a_body_replaced_by_another_process_is_never_served_torn_or_mismatched(
    make_tier: MakeTier, cache_dir: Path
) -> None:
    tier = await make_tier()
    child = await start_child(cache_dir, "churn")
    assert child.stdin is not None
    assert child.stdout is not None
    assert await child.stdout.readline() == b"ready\n"

    labels_served: set[str] = set()
    outcomes = {"served": 0, "gone": 0, "corrupt": 0}
    try:
        for _ in range(20_000):
            entry = await tier.lookup("hot")
            assert entry is not None
            try:
                data = await read_via_open_body(tier, entry)
            except CorruptEntryError:
                outcomes["corrupt"] += 1
                continue
            except EntryGoneError:
                outcomes["gone"] += 1
                continue
            label = entry.meta["label"]
            assert data == body_for(label, 40000 + int(label.split("-")[1]))
            labels_served.add(label)
            outcomes["served"] += 1
            if len(labels_served) >= 25:
                break
    finally:
        child.stdin.write(b"stop\n")
        await child.stdin.drain()
        await child.wait()

    assert child.returncode == 0
    assert outcomes["corrupt"] == 0
    assert len(labels_served) >= 25, outcomes


async def test_entries_iterates_a_snapshot(make_tier: MakeTier) -> None:
    tier = await make_tier()
    for i in range(5):
        await tier.store(f"k{i}", {"tags": [f"t{i % 2}"]}, chunks_of(b"x"))
    tagged = [entry.key for entry in tier.entries() if "t0" in entry.meta["tags"]]
    for key in tagged:
        await tier.remove(key)  # mutating while iterating a snapshot is fine
    assert sorted(tier.keys()) == ["k1", "k3"]
