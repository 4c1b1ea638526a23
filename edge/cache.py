"""lookup and store: the memory tier in front of a lower tier (disk, or none).

Small objects live in both (memory for speed, disk to survive restarts); large objects in the
lower tier only. Each tier has its own byte budget and eviction policy, and every tier is a
:class:`edge.tiers.base.CacheTier`: the cache has no ``None`` checks, an edge without a disk
has :class:`edge.tiers.adapters.NoTier` below its memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from edge.entry import VARIANT_SEP, EntryMeta
from edge.keys import secondary_key
from edge.memory import MemoryTier
from edge.rfc9111 import Headers
from edge.tiers.adapters import MemoryCacheTier, NoTier
from edge.tiers.base import CacheTier, Hit, MetaForSize
from edge.tiers.disk import CorruptEntryError

__all__ = ["Hit", "TieredCache", "VariantLookup"]


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
    def __init__(self, memory: MemoryTier, lower: CacheTier | None = None) -> None:
        self.memory = memory
        """The memory tier itself: the express lane reads it synchronously."""
        self.lower: CacheTier = NoTier() if lower is None else lower
        self.tiers: tuple[CacheTier, ...] = (MemoryCacheTier(memory), self.lower)

    @property
    def has_lower(self) -> bool:
        """Objects too large for memory can be stored (there is a disk)."""
        return self.lower.max_object_bytes > 0

    async def lookup(self, key: str) -> Hit | None:
        entry = self.memory.get(key)
        if entry is not None:
            return Hit(key, entry.meta, body=entry.body)
        found = await self.lower.lookup(key)
        if found is None:
            return None
        if found.body is None and found.size_bytes <= self.memory.max_object_bytes:
            try:
                body = await self.lower.read_body(found)
            except (CorruptEntryError, FileNotFoundError):
                return None
            self.memory.put(key, found.meta, body)
            return Hit(key, found.meta, body=body)
        return found

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
        await self.lower.store(key, meta, _one_chunk(body), expected_size=len(body))
        return Hit(key, meta, body=body)

    async def store_stream(
        self,
        key: str,
        meta: EntryMeta,
        chunks: AsyncIterator[bytes],
        *,
        expected_size: int | None,
        meta_for_size: MetaForSize | None = None,
    ) -> Hit | None:
        """Stream a large body to the lower tier. ``None`` if it declined (or there is
        none). A body of unknown length gives *meta_for_size*: the metadata stored is made
        from the size written (see :meth:`edge.tiers.base.CacheTier.store`)."""
        return await self.lower.store(
            key, meta, chunks, expected_size=expected_size, meta_for_size=meta_for_size
        )

    async def update_meta(self, key: str, meta: EntryMeta) -> None:
        for tier in self.tiers:
            await tier.update_meta(key, meta)

    async def remove(self, key: str) -> None:
        for tier in self.tiers:
            await tier.remove(key)

    async def open_body(self, hit: Hit) -> BinaryIO:
        """An open file of a lower-tier hit's body, checksum-verified;
        :class:`CorruptEntryError` drops the entry."""
        try:
            return await self.lower.open_body(hit)
        except CorruptEntryError:
            self.memory.remove(hit.key)
            raise

    def metas(self) -> Iterator[tuple[str, EntryMeta]]:
        """Every stored entry's key and metadata (each key once), for purges."""
        seen = set()
        for tier in self.tiers:
            for key, meta in tier.metas():
                if key not in seen:
                    seen.add(key)
                    yield key, meta

    def index(self) -> Iterator[tuple[str, str, Sequence[str]]]:
        """Every stored entry's ``(key, url_key, tags)`` in every tier (an entry in two tiers
        comes twice), without decoding stored metadata: what purges match on."""
        for tier in self.tiers:
            yield from tier.index()

    def url_keys(self) -> Iterator[tuple[str, str]]:
        """Every stored entry's key and URL key (each key once): what invalidating a URL
        matches on."""
        seen = set()
        for key, url_key, _tags in self.index():
            if key not in seen:
                seen.add(key)
                yield key, url_key

    def peek_metas(self, keys: set[str]) -> dict[str, EntryMeta]:
        """The metadata of the stored entries among *keys* (the memory tier's copy first),
        without counting accesses."""
        found: dict[str, EntryMeta] = {}
        for tier in self.tiers:
            wanted = keys - found.keys()
            if not wanted:
                break
            found.update(tier.peek_metas(wanted))
        return found
