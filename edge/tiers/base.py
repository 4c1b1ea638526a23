"""What every tier of the edge's cache does: the :class:`CacheTier` Protocol.

A tier stores bodies with their metadata and never decides what to keep: its eviction policy
does (:mod:`edge.policy`). :class:`edge.cache.TieredCache` puts the memory tier in front of the
others and speaks to all of them through this Protocol;
``tests/contract/test_tier_contract.py`` runs one contract suite over every implementation.
Whatever a tier stores, it returns exactly: a body shorter or longer than declared is refused
(:class:`BodySizeMismatch`), never stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from edge.entry import EntryMeta


class BodySizeMismatch(ValueError):
    """A body's length differed from the length it was stored with: nothing was stored."""


class StoredFile(Protocol):
    """A body stored as a file by a tier (the disk tier's ``DiskEntry``)."""

    @property
    def size_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Hit:
    key: str
    meta: EntryMeta
    body: bytes | None = None
    """In memory (small objects)."""
    disk: StoredFile | None = None
    """On disk: sendfile from here (the tier that made the hit opens it)."""

    @property
    def size_bytes(self) -> int:
        """The stored body's length."""
        if self.body is not None:
            return len(self.body)
        return 0 if self.disk is None else self.disk.size_bytes


MetaForSize = Callable[[int], EntryMeta]
"""For a body of unknown length: the metadata to publish it with, made from the size
written."""


class CacheTier(Protocol):
    """One tier: memory, disk, or none."""

    @property
    def max_object_bytes(self) -> int:
        """Bodies larger than this are not stored here."""
        ...

    @property
    def used_bytes(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    def __len__(self) -> int: ...

    async def open(self) -> int:
        """Get ready to serve; how many entries the tier holds already."""
        ...

    async def close(self) -> None: ...

    async def sync(self) -> int:
        """Learn of what other processes sharing the tier stored or removed; how many
        entries changed."""
        ...

    async def lookup(self, key: str) -> Hit | None:
        """The entry for *key* (counted as an access), or ``None``."""
        ...

    async def read_body(self, hit: Hit) -> bytes:
        """A hit's whole body (verified); :class:`edge.tiers.CorruptEntryError` or
        ``FileNotFoundError`` when it cannot be read, and the entry is gone."""
        ...

    async def open_body(self, hit: Hit) -> BinaryIO:
        """A hit's body as an open file at offset 0 (for sendfile); errors as
        :meth:`read_body`."""
        ...

    async def store(
        self,
        key: str,
        meta: EntryMeta,
        chunks: AsyncIterator[bytes],
        *,
        expected_size: int | None,
        meta_for_size: MetaForSize | None = None,
    ) -> Hit | None:
        """Store a body streamed in *chunks*; ``None`` when the tier declined it (too large,
        or its policy did not admit it). A body of *expected_size* that arrives shorter or
        longer raises :class:`BodySizeMismatch` and nothing is stored; one of unknown size
        is stored with ``meta_for_size(size)``."""
        ...

    async def update_meta(self, key: str, meta: EntryMeta) -> None:
        """Replace the metadata of a stored entry, keeping its body (a 304, a soft purge)."""
        ...

    async def remove(self, key: str) -> None: ...

    def peek_metas(self, keys: Collection[str]) -> Iterator[tuple[str, EntryMeta]]:
        """``(key, meta)`` of the stored entries among *keys*, without counting an access
        (and without decoding the metadata of any other entry)."""
        ...

    def index(self) -> Iterator[tuple[str, str, Sequence[str]]]:
        """Every entry's ``(key, url_key, tags)``, without decoding stored metadata (what
        purges match on; cheap for 100,000 entries)."""
        ...

    def metas(self) -> Iterator[tuple[str, EntryMeta]]:
        """Every entry's key and metadata."""
        ...
