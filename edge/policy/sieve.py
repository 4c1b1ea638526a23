"""SIEVE: one FIFO queue, a visited bit, and a hand that sweeps from the oldest to the newest.

Yazhuo Zhang, Juncheng Yang, Yao Yue, Ymir Vigfusson, K. V. Rashmi. "SIEVE is Simpler than
LRU: an Efficient Turn-Key Eviction Algorithm for Web Caches". NSDI 2024.
https://www.usenix.org/conference/nsdi24/presentation/zhang-yazhuo

Why: as simple as CLOCK, yet new objects that are never hit are evicted quickly (the hand
"sieves" them out) while hit objects stay put, so it resists scans better than LRU and beats
it on most of the paper's web and CDN traces. A hit only sets a bit.

New objects enter at the head (newest). To evict, the hand, starting where it last stopped
(initially at the tail, the oldest), moves toward the head: a visited object has its bit
cleared and is kept *in place*; the first unvisited object is evicted; past the head the hand
wraps to the tail.

Because objects never move, the queue is insertion order. It is kept as an append-only
Python list with lazy deletion — evicted or removed slots become ``None`` — and the hand is an
index into it. The list is compacted when the dead slots outnumber the live ones, which keeps
every operation O(1) amortised and the sweep a tight loop over a list.
"""

from __future__ import annotations

from collections.abc import Iterator

from edge.policy.base import SizeBookedPolicy

_MIN_COMPACT_SLOTS = 64


class SIEVEPolicy(SizeBookedPolicy):
    """FIFO with a visited bit and a sweeping hand (Zhang et al., NSDI'24)."""

    __slots__ = ("_dead", "_hand", "_log", "_slot", "_visited")

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._log: list[str | None] = []  # oldest first; None marks a dead slot
        self._slot: dict[str, int] = {}  # present key -> its index in _log
        self._visited: set[str] = set()
        self._hand = 0
        self._dead = 0

    def is_visited(self, key: str) -> bool:
        return key in self._visited

    def hit(self, key: str) -> None:
        if key not in self._slot:
            raise KeyError(key)
        self._visited.add(key)

    def _admit(self, key: str, size_bytes: int) -> None:
        self._slot[key] = len(self._log)
        self._log.append(key)

    def _pop_victim(self) -> str:
        log, visited = self._log, self._visited
        end = len(log)
        index = self._hand
        while True:
            if index >= end:
                index = 0
            key = log[index]
            if key is None:
                index += 1
            elif key in visited:
                visited.remove(key)
                index += 1
            else:
                break
        log[index] = None
        del self._slot[key]
        self._hand = index + 1
        self._dead += 1
        self._maybe_compact()
        return key

    def _forget(self, key: str, size_bytes: int) -> None:
        self._log[self._slot.pop(key)] = None
        self._visited.discard(key)
        self._dead += 1
        self._maybe_compact()

    def _resized(self, key: str, old_size_bytes: int, new_size_bytes: int) -> None:
        self._visited.add(key)

    def _maybe_compact(self) -> None:
        if self._dead <= len(self._slot) or self._dead < _MIN_COMPACT_SLOTS:
            return
        old_log, hand = self._log, self._hand
        live_before_hand = hand - old_log[:hand].count(None)
        live = [key for key in old_log if key is not None]
        slot = self._slot
        for index, key in enumerate(live):
            slot[key] = index
        self._log = list[str | None](live)
        self._hand = live_before_hand
        self._dead = 0

    def _ordered_keys(self) -> Iterator[str]:
        return (key for key in self._log if key is not None)

    def _check_structures(self) -> None:
        if any(self._log[index] != key for key, index in self._slot.items()):
            raise AssertionError("a slot does not point at its key")
        if self._log.count(None) != self._dead:
            raise AssertionError("dead-slot count is wrong")
        if not self._visited <= self._slot.keys():
            raise AssertionError("an absent key is marked visited")
        if not 0 <= self._hand <= len(self._log):
            raise AssertionError("the hand is off the queue")
