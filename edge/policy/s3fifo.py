"""S3-FIFO: three static FIFO queues, measured in bytes.

Juncheng Yang, Yazhuo Zhang, Ziyue Qiu, Yao Yue, K. V. Rashmi. "FIFO queues are all you need
for cache eviction". SOSP 2023. https://doi.org/10.1145/3600006.3613147

Why: most objects in CDN traces are requested once ("one-hit wonders"), and LRU spends its
space on them; S3-FIFO filters them out in a small probationary FIFO and matches or beats
LRU's and ARC's miss ratios on the paper's CDN traces, with no list reordering on a hit (a hit
only bumps a 2-bit counter, so hits never contend on a lock in a threaded tier).

The three queues (Algorithm 1 of the paper), here with sizes in bytes:

- **small** (S), ~10 % of the capacity: every new object enters here with ``freq = 0``;
- **main** (M), the rest;
- **ghost** (G): keys only, of objects evicted from small without having been hit. A miss
  whose key is still in the ghost is inserted straight into main.

A hit sets ``freq = min(freq + 1, 3)`` and moves nothing. To make room, the policy evicts
from small while small holds at least its share of the bytes (or main is empty), else from
main. Small's tail goes to main if it was hit at least ``promote_threshold`` times (default 1:
"accessed more than once", counting the request that inserted it), keeping its counter;
otherwise it is evicted and remembered in the ghost. Main's tail is reinserted at the head
with ``freq - 1`` while ``freq > 0``, else evicted (CLOCK with a 2-bit counter).

The ghost is a FIFO bounded in bytes by main's share of the capacity (90 %), counting each
ghost entry at the size of the object it stands for, as in the authors' libCacheSim
implementation; it therefore remembers about as many keys as main holds objects.

The authors' current libCacheSim ``S3FIFO.c`` differs in details that this module leaves as
options or as the paper has them: it promotes after 2 hits (``promote_threshold=2``), resets
the counter on promotion, and refuses objects larger than the small queue. On the Zipf traces
of ``bench/eviction.py`` the first two change the hit ratio by less than 1 %.

All queues are ``OrderedDict``: O(1) append, pop from the tail and removal from the middle
(for :meth:`remove`), so no lazy deletion is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain

from edge.policy.base import SizeBookedPolicy

MAX_FREQ = 3


class S3FIFOPolicy(SizeBookedPolicy):
    """Small FIFO + main FIFO + ghost FIFO (Yang et al., SOSP'23), byte-sized."""

    __slots__ = (
        "_freq",
        "_ghost",
        "_ghost_bytes",
        "_ghost_capacity_bytes",
        "_main",
        "_promote_threshold",
        "_small",
        "_small_bytes",
        "_small_target_bytes",
    )

    def __init__(
        self, capacity_bytes: int, small_ratio: float = 0.1, promote_threshold: int = 1
    ) -> None:
        super().__init__(capacity_bytes)
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio}")
        if not 1 <= promote_threshold <= MAX_FREQ:
            raise ValueError(f"promote_threshold must be in [1, {MAX_FREQ}]")
        self._small_target_bytes = int(capacity_bytes * small_ratio)
        self._ghost_capacity_bytes = capacity_bytes - self._small_target_bytes
        self._promote_threshold = promote_threshold
        self._small: OrderedDict[str, None] = OrderedDict()
        self._main: OrderedDict[str, None] = OrderedDict()
        self._ghost: OrderedDict[str, int] = OrderedDict()  # key -> size it stands for
        self._freq: dict[str, int] = {}  # present keys only
        self._small_bytes = 0
        self._ghost_bytes = 0

    # ---- introspection (tests, metrics) --------------------------------------------------------

    @property
    def small_bytes(self) -> int:
        return self._small_bytes

    def in_small(self, key: str) -> bool:
        return key in self._small

    def in_main(self, key: str) -> bool:
        return key in self._main

    def in_ghost(self, key: str) -> bool:
        return key in self._ghost

    def frequency(self, key: str) -> int:
        """The 2-bit counter of a present key (0..3); ``KeyError`` otherwise."""
        return self._freq[key]

    # ---- events ------------------------------------------------------------------------------

    def hit(self, key: str) -> None:
        freq = self._freq[key]  # KeyError when absent, as the protocol says
        if freq < MAX_FREQ:
            self._freq[key] = freq + 1

    def _admit(self, key: str, size_bytes: int) -> None:
        ghost_size = self._ghost.pop(key, None)
        if ghost_size is None:
            self._small[key] = None
            self._small_bytes += size_bytes
        else:
            self._ghost_bytes -= ghost_size
            self._main[key] = None
        self._freq[key] = 0

    def _pop_victim(self) -> str:
        small = self._small
        if small and (self._small_bytes >= self._small_target_bytes or not self._main):
            sizes, freq, main = self._sizes, self._freq, self._main
            threshold = self._promote_threshold
            while small:
                key = small.popitem(last=False)[0]
                size_bytes = sizes[key]
                self._small_bytes -= size_bytes
                if freq[key] >= threshold:
                    main[key] = None
                else:  # evicted, and remembered in the ghost
                    del freq[key]
                    ghost = self._ghost
                    ghost[key] = size_bytes
                    ghost_bytes = self._ghost_bytes + size_bytes
                    while ghost_bytes > self._ghost_capacity_bytes:
                        ghost_bytes -= ghost.popitem(last=False)[1]
                    self._ghost_bytes = ghost_bytes
                    return key
        # Main: CLOCK with a 2-bit counter — reinsert at the head with freq - 1 until freq == 0.
        main, freq = self._main, self._freq
        while True:
            key = main.popitem(last=False)[0]
            count = freq[key]
            if count == 0:
                del freq[key]
                return key
            freq[key] = count - 1
            main[key] = None

    def _forget(self, key: str, size_bytes: int) -> None:
        del self._freq[key]
        if key in self._small:
            del self._small[key]
            self._small_bytes -= size_bytes
        else:
            del self._main[key]

    def _resized(self, key: str, old_size_bytes: int, new_size_bytes: int) -> None:
        if key in self._small:
            self._small_bytes += new_size_bytes - old_size_bytes
        self.hit(key)

    def _ordered_keys(self) -> Iterator[str]:
        return chain(self._small, self._main)

    def _check_structures(self) -> None:
        sizes = self._sizes
        small_bytes = sum(sizes[key] for key in self._small)
        if small_bytes != self._small_bytes:
            raise AssertionError(f"small_bytes {self._small_bytes} != {small_bytes}")
        if self._freq.keys() != sizes.keys():
            raise AssertionError("freq is not kept for exactly the present keys")
        if any(not 0 <= count <= MAX_FREQ for count in self._freq.values()):
            raise AssertionError("freq out of [0, 3]")
        if any(key in sizes for key in self._ghost):
            raise AssertionError("a present key is in the ghost")
        ghost_bytes = sum(self._ghost.values())
        if ghost_bytes != self._ghost_bytes or ghost_bytes > self._ghost_capacity_bytes:
            raise AssertionError(f"ghost_bytes {self._ghost_bytes}, counted {ghost_bytes}")
