"""The edge's tiers as :class:`edge.tiers.base.CacheTier`: memory, disk, and none.

:class:`MemoryCacheTier` and :class:`DiskCacheTier` put the Protocol over
:class:`edge.memory.MemoryTier` (bytes in a dict, synchronous: the express lane reads it
directly) and :class:`edge.tiers.disk.DiskTier` (files; its metadata travels as JSON
dictionaries); :class:`NoTier` stands where an edge has no disk, so the cache needs no
``None`` checks.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from typing import BinaryIO

from edge.entry import EntryMeta
from edge.memory import MemoryTier
from edge.tiers.base import BodySizeMismatch, Hit, MetaForSize
from edge.tiers.disk import DiskEntry, DiskTier


class MemoryCacheTier:
    """The memory tier: whole bodies as bytes, up to ``max_object_bytes`` each."""

    def __init__(self, memory: MemoryTier) -> None:
        self.memory = memory

    @property
    def max_object_bytes(self) -> int:
        return self.memory.max_object_bytes

    @property
    def used_bytes(self) -> int:
        return self.memory.used_bytes

    @property
    def evictions(self) -> int:
        return self.memory.evictions

    def __len__(self) -> int:
        return len(self.memory)

    async def open(self) -> int:
        return len(self.memory)

    async def close(self) -> None:
        return None

    async def sync(self) -> int:
        return 0  # one process's memory: nothing to learn from others

    async def lookup(self, key: str) -> Hit | None:
        entry = self.memory.get(key)
        return None if entry is None else Hit(key, entry.meta, body=entry.body)

    async def read_body(self, hit: Hit) -> bytes:
        if hit.body is None:
            raise FileNotFoundError(hit.key)
        return hit.body

    async def open_body(self, hit: Hit) -> BinaryIO:
        return io.BytesIO(await self.read_body(hit))

    async def store(
        self,
        key: str,
        meta: EntryMeta,
        chunks: AsyncIterator[bytes],
        *,
        expected_size: int | None,
        meta_for_size: MetaForSize | None = None,
    ) -> Hit | None:
        limit = self.memory.max_object_bytes
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:  # drained whole: a caller may be teeing it to a client
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
        if expected_size is not None and size != expected_size:
            raise BodySizeMismatch(f"{key}: {size} bytes arrived, {expected_size} declared")
        if size > limit:
            self.memory.remove(key)
            return None
        if meta_for_size is not None:
            meta = meta_for_size(size)
        body = b"".join(parts)
        if not self.memory.put(key, meta, body):
            return None
        return Hit(key, meta, body=body)

    async def update_meta(self, key: str, meta: EntryMeta) -> None:
        self.memory.update_meta(key, meta)

    async def remove(self, key: str) -> None:
        self.memory.remove(key)

    def peek_metas(self, keys: Collection[str]) -> Iterator[tuple[str, EntryMeta]]:
        for key in keys:
            entry = self.memory.peek(key)
            if entry is not None:
                yield key, entry.meta

    def index(self) -> Iterator[tuple[str, str, Sequence[str]]]:
        for entry in self.memory.entries():
            yield entry.key, entry.meta.url_key, entry.meta.tags

    def metas(self) -> Iterator[tuple[str, EntryMeta]]:
        for entry in self.memory.entries():
            yield entry.key, entry.meta


class DiskCacheTier:
    """The disk tier: bodies as checksummed files, any size up to the tier's budget."""

    def __init__(self, disk: DiskTier) -> None:
        self.disk = disk

    @property
    def max_object_bytes(self) -> int:
        return self.disk.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.disk.used_bytes

    @property
    def evictions(self) -> int:
        return 0  # the disk tier does not count them (yet); its used_bytes shows the budget

    def __len__(self) -> int:
        return len(self.disk)

    async def open(self) -> int:
        return await self.disk.open()

    async def close(self) -> None:
        await self.disk.close()

    async def sync(self) -> int:
        return await self.disk.sync()

    async def lookup(self, key: str) -> Hit | None:
        found = await self.disk.lookup(key)
        return None if found is None else Hit(key, EntryMeta.from_dict(found.meta), disk=found)

    async def read_body(self, hit: Hit) -> bytes:
        return await self.disk.read_body(_entry_of(hit))

    async def open_body(self, hit: Hit) -> BinaryIO:
        return await self.disk.open_body(_entry_of(hit))

    async def store(
        self,
        key: str,
        meta: EntryMeta,
        chunks: AsyncIterator[bytes],
        *,
        expected_size: int | None,
        meta_for_size: MetaForSize | None = None,
    ) -> Hit | None:
        stored = await self.disk.store(
            key,
            meta.to_dict(),
            chunks,
            expected_size=expected_size,
            meta_for_size=None if meta_for_size is None else lambda n: meta_for_size(n).to_dict(),
        )
        if stored is None:
            return None
        if meta_for_size is not None:
            meta = meta_for_size(stored.size_bytes)
        return Hit(key, meta, disk=stored)

    async def update_meta(self, key: str, meta: EntryMeta) -> None:
        await self.disk.update_meta(key, meta.to_dict())

    async def remove(self, key: str) -> None:
        await self.disk.remove(key)

    def peek_metas(self, keys: Collection[str]) -> Iterator[tuple[str, EntryMeta]]:
        for entry in self.disk.entries():  # decodes only the entries asked for
            if entry.key in keys:
                yield entry.key, EntryMeta.from_dict(entry.meta)

    def index(self) -> Iterator[tuple[str, str, Sequence[str]]]:
        for entry in self.disk.entries():
            yield entry.key, entry.url_key, entry.tags

    def metas(self) -> Iterator[tuple[str, EntryMeta]]:
        for entry in self.disk.entries():
            yield entry.key, EntryMeta.from_dict(entry.meta)


def _entry_of(hit: Hit) -> DiskEntry:
    """The disk entry of a hit the disk tier made."""
    if not isinstance(hit.disk, DiskEntry):
        raise TypeError(f"{hit.key}: not a disk tier hit")
    return hit.disk


class NoTier:
    """No tier: stores nothing (an edge without a disk)."""

    max_object_bytes = 0
    used_bytes = 0
    evictions = 0

    def __len__(self) -> int:
        return 0

    async def open(self) -> int:
        return 0

    async def close(self) -> None:
        return None

    async def sync(self) -> int:
        return 0

    async def lookup(self, key: str) -> Hit | None:
        return None

    async def read_body(self, hit: Hit) -> bytes:
        raise FileNotFoundError(hit.key)

    async def open_body(self, hit: Hit) -> BinaryIO:
        raise FileNotFoundError(hit.key)

    async def store(
        self,
        key: str,
        meta: EntryMeta,
        chunks: AsyncIterator[bytes],
        *,
        expected_size: int | None,
        meta_for_size: MetaForSize | None = None,
    ) -> Hit | None:
        async for _chunk in chunks:  # drained: a caller may be teeing it to a client
            pass
        return None

    async def update_meta(self, key: str, meta: EntryMeta) -> None:
        return None

    async def remove(self, key: str) -> None:
        return None

    def peek_metas(self, keys: Collection[str]) -> Iterator[tuple[str, EntryMeta]]:
        return iter(())

    def index(self) -> Iterator[tuple[str, str, Sequence[str]]]:
        return iter(())

    def metas(self) -> Iterator[tuple[str, EntryMeta]]:
        return iter(())
