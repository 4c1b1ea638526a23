"""One contract for every tier of the edge's cache (edge/tiers/base.py's CacheTier), run over
the memory tier and the disk tier alike: what a student's request relies on whichever tier
answers it. Real files in tmp_path for the disk tier; no sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from edge.entry import EntryMeta
from edge.memory import MemoryTier
from edge.policy import make_policy
from edge.tiers.adapters import DiskCacheTier, MemoryCacheTier, NoTier
from edge.tiers.base import BodySizeMismatch, CacheTier
from edge.tiers.disk import DiskTier

CAPACITY = 4 * 1024**2
MAX_OBJECT = 64 * 1024


def memory_tier(tmp_path: Path) -> CacheTier:
    return MemoryCacheTier(
        MemoryTier(
            capacity_bytes=CAPACITY,
            policy=make_policy("lru", CAPACITY),
            max_object_bytes=MAX_OBJECT,
        )
    )


def disk_tier(tmp_path: Path) -> CacheTier:
    return DiskCacheTier(
        DiskTier(
            tmp_path / "disk",
            capacity_bytes=CAPACITY,
            policy=make_policy("lru", CAPACITY),
            fsync=False,
        )
    )


@pytest.fixture(params=[memory_tier, disk_tier], ids=["memory", "disk"])
async def tier(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CacheTier]:
    make: Callable[[Path], CacheTier] = request.param
    made = make(tmp_path)
    await made.open()
    yield made
    await made.close()


def meta(url_key: str = "cdn/a", *, tags: tuple[str, ...] = ("t1",), size: int = 5) -> EntryMeta:
    return EntryMeta(
        "full",
        headers=(("Cache-Control", "max-age=60"), ("Content-Length", str(size))),
        response_time=1_800_000_000.0,
        body_bytes=size,
        url_key=url_key,
        tags=tags,
        etag='"v1"',
    )


async def chunks(*parts: bytes, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for number, part in enumerate(parts):
        if fail_after is not None and number == fail_after:
            raise ConnectionResetError("upstream went away")
        yield part


async def test_what_is_stored_is_what_is_read(tier: CacheTier) -> None:
    stored = await tier.store("k", meta(), chunks(b"he", b"llo"), expected_size=5)
    assert stored is not None
    found = await tier.lookup("k")
    assert found is not None
    assert found.meta == meta()
    assert found.size_bytes == 5
    assert await tier.read_body(found) == b"hello"
    with await tier.open_body(found) as handle:
        assert handle.read() == b"hello"
    assert len(tier) == 1
    assert tier.used_bytes >= 5


@pytest.mark.parametrize("parts", [(b"hell",), (b"hello", b"!")], ids=["short", "long"])
async def test_a_body_of_the_wrong_length_is_never_stored(
    tier: CacheTier, parts: tuple[bytes, ...]
) -> None:
    with pytest.raises(BodySizeMismatch):
        await tier.store("k", meta(), chunks(*parts), expected_size=5)
    assert await tier.lookup("k") is None
    assert len(tier) == 0


async def test_a_stream_that_fails_stores_nothing(tier: CacheTier) -> None:
    with pytest.raises(ConnectionResetError):
        await tier.store("k", meta(), chunks(b"he", b"llo", fail_after=1), expected_size=5)
    assert await tier.lookup("k") is None


async def test_a_body_of_unknown_length_is_stored_with_the_length_written(
    tier: CacheTier,
) -> None:
    def sized(size: int) -> EntryMeta:
        return meta(size=size)

    stored = await tier.store(
        "k", meta(size=0), chunks(b"abc", b"defg"), expected_size=None, meta_for_size=sized
    )
    assert stored is not None
    found = await tier.lookup("k")
    assert found is not None
    assert found.meta.body_bytes == 7
    assert found.meta.header("content-length") == "7"
    assert await tier.read_body(found) == b"abcdefg"


async def test_a_body_too_large_for_the_tier_is_declined_and_drained(tier: CacheTier) -> None:
    read: list[int] = []

    async def big() -> AsyncIterator[bytes]:
        for number in range(3):
            read.append(number)
            yield b"x" * (tier.max_object_bytes // 2 + 1)

    size = 3 * (tier.max_object_bytes // 2 + 1)
    assert await tier.store("big", meta(size=size), big(), expected_size=size) is None
    assert read == [0, 1, 2]  # a client being fed the same stream is not stalled
    assert await tier.lookup("big") is None


async def test_update_meta_keeps_the_body(tier: CacheTier) -> None:
    await tier.store("k", meta(), chunks(b"hello"), expected_size=5)
    refreshed = meta(tags=("t2",))
    await tier.update_meta("k", refreshed)
    found = await tier.lookup("k")
    assert found is not None
    assert found.meta == refreshed
    assert await tier.read_body(found) == b"hello"


async def test_remove(tier: CacheTier) -> None:
    await tier.store("k", meta(), chunks(b"hello"), expected_size=5)
    await tier.remove("k")
    await tier.remove("never-stored")  # not an error
    assert await tier.lookup("k") is None
    assert len(tier) == 0


async def test_the_index_is_what_purges_match_on(tier: CacheTier) -> None:
    await tier.store("k1", meta("cdn/a", tags=("bundle:x",)), chunks(b"hello"), expected_size=5)
    await tier.store("k2", meta("cdn/b", tags=()), chunks(b"hello"), expected_size=5)
    index = {key: (url_key, tuple(tags)) for key, url_key, tags in tier.index()}
    assert index == {"k1": ("cdn/a", ("bundle:x",)), "k2": ("cdn/b", ())}
    assert dict(tier.metas()) == {
        "k1": meta("cdn/a", tags=("bundle:x",)),
        "k2": meta("cdn/b", tags=()),
    }
    assert dict(tier.peek_metas({"k2", "absent"})) == {"k2": meta("cdn/b", tags=())}


async def test_no_tier_stores_nothing_and_drains_what_it_is_given() -> None:
    none = NoTier()
    read: list[int] = []

    async def stream() -> AsyncIterator[bytes]:
        for number in range(2):
            read.append(number)
            yield b"x"

    assert await none.store("k", meta(size=2), stream(), expected_size=2) is None
    assert read == [0, 1]
    assert await none.lookup("k") is None
    assert (len(none), none.used_bytes, none.max_object_bytes) == (0, 0, 0)
    assert list(none.index()) == []
