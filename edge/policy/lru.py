"""Least-recently-used: the baseline every other policy is measured against.

One ``OrderedDict`` (a C-implemented hash map threaded by a doubly linked list) holds the keys
from least to most recently used: a hit moves its key to the end, the victim is the first key.
Both are O(1). LRU is what nginx's ``proxy_cache`` and most CDNs' memory tiers do; its weakness
is that one scan of objects requested once flushes the whole working set, which the edge sees
when a crawler or a warm-up walks the catalogue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from edge.policy.base import SizeBookedPolicy


class LRUPolicy(SizeBookedPolicy):
    """Evict the least recently used key."""

    __slots__ = ("_order",)

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._order: OrderedDict[str, None] = OrderedDict()

    def hit(self, key: str) -> None:
        self._order.move_to_end(key)

    def _admit(self, key: str, size_bytes: int) -> None:
        self._order[key] = None

    def _pop_victim(self) -> str:
        return self._order.popitem(last=False)[0]

    def _forget(self, key: str, size_bytes: int) -> None:
        del self._order[key]

    def _resized(self, key: str, old_size_bytes: int, new_size_bytes: int) -> None:
        self._order.move_to_end(key)

    def _ordered_keys(self) -> Iterator[str]:
        return iter(self._order)

    def _check_structures(self) -> None:
        if len(self._order) != len(self._sizes):
            raise AssertionError("the recency order and the books differ in length")
