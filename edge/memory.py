"""The memory tier: hot small objects as bytes, within a byte budget. Stores; never decides —
its eviction policy picks what to drop."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from edge.entry import EntryMeta
from edge.policy import EvictionPolicy

ENTRY_OVERHEAD_BYTES = 2048
"""Charged per entry on top of its body, for its metadata, index and rendered heads (measured
at about 2.5-2.7 KB per entry, see BENCHMARKS.md "Memory"; the budget counts the larger part
of it): a budget of many tiny objects must not overflow memory."""


@dataclass(slots=True)
class MemoryEntry:
    key: str
    meta: EntryMeta
    body: bytes
    express_head: bytes | None = None
    """The response head the express lane rendered for this entry (see
    :mod:`edge.express`), kept with it so that it goes when the entry or its metadata does."""
    express_304_head: bytes | None = None
    """Ditto, for a ``304`` to a matching ``If-None-Match``."""


class MemoryTier:
    def __init__(
        self, *, capacity_bytes: int, policy: EvictionPolicy, max_object_bytes: int
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.max_object_bytes = max_object_bytes
        self._policy = policy
        self._entries: dict[str, MemoryEntry] = {}
        self.evictions = 0

    def get(self, key: str) -> MemoryEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._policy.hit(key)
        return entry

    def touch(self, key: str) -> None:
        """Count an access to a present key (after a :meth:`peek` that served it)."""
        self._policy.hit(key)

    def peek(self, key: str) -> MemoryEntry | None:
        """Look without counting an access (purges, background refreshes)."""
        return self._entries.get(key)

    def put(self, key: str, meta: EntryMeta, body: bytes) -> bool:
        """Store; returns False when the object is too big or the policy did not admit it."""
        if len(body) > self.max_object_bytes:
            self.remove(key)
            return False
        self._entries[key] = MemoryEntry(key, meta, body)
        admitted = True
        for dropped in self._policy.insert(key, len(body) + ENTRY_OVERHEAD_BYTES):
            if dropped == key:
                admitted = False
            else:
                self.evictions += 1
            self._entries.pop(dropped, None)
        return admitted

    def update_meta(self, key: str, meta: EntryMeta) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = MemoryEntry(key, meta, entry.body)

    def remove(self, key: str) -> None:
        if self._entries.pop(key, None) is not None:
            self._policy.remove(key)

    @property
    def used_bytes(self) -> int:
        return self._policy.used_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> Iterator[MemoryEntry]:
        return iter(list(self._entries.values()))
