"""lookup and store: the memory tier in front of the (optional) disk tier.

Small objects live in both (memory for speed, disk to survive restarts); large objects on disk
only. Each tier has its own byte budget and eviction policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from edge.entry import VARIANT_SEP, EntryMeta
from edge.keys import secondary_key
from edge.memory import MemoryTier
from edge.rfc9111 import Headers
from edge.tiers.disk import CorruptEntryError, DiskEntry, DiskTier


@dataclass(frozen=True, slots=True)
class Hit:
    key: str
    meta: EntryMeta
    body: bytes | None = None
    """In memory (small objects)."""
    disk: DiskEntry | None = None
    """On disk: sendfile from here."""


@dataclass(frozen=True, slots=True)
class VariantLookup:
    """Result of resolving a URL key to the variant for one request."""

    hit: Hit | None
    variant_key: str
    url_known: bool
    """Some response for this URL is stored (a miss is then a ``vary-miss``)."""


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


class TieredCache:
    def __init__(self, memory: MemoryTier, disk: DiskTier | None) -> None:
        self.memory = memory
        self.disk = disk

    async def lookup(self, key: str) -> Hit | None:
        entry = self.memory.get(key)
        if entry is not None:
            return Hit(key, entry.meta, body=entry.body)
        if self.disk is None:
            return None
        found = await self.disk.lookup(key)
        if found is None:
            return None
        meta = EntryMeta.from_dict(found.meta)
        if found.size_bytes <= self.memory.max_object_bytes:
            try:
                body = await self.disk.read_body(found)
            except (CorruptEntryError, FileNotFoundError):
                return None
            self.memory.put(key, meta, body)
            return Hit(key, meta, body=body)
        return Hit(key, meta, disk=found)

    async def lookup_variant(self, url_key: str, request_headers: Headers) -> VariantLookup:
        first = await self.lookup(url_key)
        if first is None:
            return VariantLookup(None, url_key, url_known=False)
        if first.meta.kind != "vary":
            return VariantLookup(first, url_key, url_known=True)
        variant_key = url_key + VARIANT_SEP + secondary_key(first.meta.vary, request_headers)
        return VariantLookup(await self.lookup(variant_key), variant_key, url_known=True)

    async def store_bytes(self, key: str, meta: EntryMeta, body: bytes) -> Hit:
        self.memory.put(key, meta, body)
        if self.disk is not None:
            await self.disk.store(key, meta.to_dict(), _one_chunk(body), expected_size=len(body))
        return Hit(key, meta, body=body)

    async def store_stream(
        self,
        key: str,
        meta: EntryMeta,
        chunks: AsyncIterator[bytes],
        *,
        expected_size: int | None,
        meta_for_size: Callable[[int], EntryMeta] | None = None,
    ) -> Hit | None:
        """Stream a large body to disk. ``None`` if there is no disk tier or it declined. A
        body of unknown length gives *meta_for_size*: the metadata stored is made from the
        size written (see :meth:`DiskTier.store`)."""
        if self.disk is None:
            return None
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
        self.memory.update_meta(key, meta)
        if self.disk is not None:
            await self.disk.update_meta(key, meta.to_dict())

    async def remove(self, key: str) -> None:
        self.memory.remove(key)
        if self.disk is not None:
            await self.disk.remove(key)

    async def open_body(self, hit: Hit) -> BinaryIO:
        """An open file of a disk hit's body, checksum-verified; :class:`CorruptEntryError`
        drops the entry."""
        assert hit.disk is not None
        assert self.disk is not None
        try:
            return await self.disk.open_body(hit.disk)
        except CorruptEntryError:
            self.memory.remove(hit.key)
            raise

    def metas(self) -> Iterator[tuple[str, EntryMeta]]:
        """Every stored entry's key and metadata (memory and disk), for purges."""
        seen = set()
        for entry in self.memory.entries():
            seen.add(entry.key)
            yield entry.key, entry.meta
        if self.disk is not None:
            for disk_entry in self.disk.entries():
                if disk_entry.key not in seen:
                    yield disk_entry.key, EntryMeta.from_dict(disk_entry.meta)

    def url_keys(self) -> Iterator[tuple[str, str]]:
        """Every stored entry's key and URL key (memory and disk), without decoding any disk
        metadata: what invalidating a URL matches on."""
        seen = set()
        for entry in self.memory.entries():
            seen.add(entry.key)
            yield entry.key, entry.meta.url_key
        if self.disk is not None:
            for disk_entry in self.disk.entries():
                if disk_entry.key not in seen:
                    yield disk_entry.key, disk_entry.url_key

    @property
    def disk_used_bytes(self) -> int:
        return 0 if self.disk is None else self.disk.used_bytes
