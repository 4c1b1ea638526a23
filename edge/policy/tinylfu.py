"""W-TinyLFU: a small LRU window, a segmented-LRU main area, and a frequency-based admission
filter backed by a count-min sketch, with sizes in bytes.

Gil Einziger, Roy Friedman, Ben Manes. "TinyLFU: A Highly Efficient Cache Admission Policy".
ACM Transactions on Storage 13(4), 2017. https://doi.org/10.1145/3149371 — and Caffeine's
``BoundedLocalCache`` / ``FrequencySketch``, whose weighted eviction this follows.

Why: on skewed (Zipf-like) popularity the best a cache can do is keep the most frequently
requested objects; TinyLFU approximates that with a few bits per key of *recent* frequency
(the sketch is halved periodically, so popularity can change), and the LRU window lets a
burst of new requests for a fresh object (a just-published lecture) in before the sketch has
seen it often. A scan of objects requested once never gets past the filter.

Layout, in bytes: the **window** (``window_ratio`` of the capacity, 1 % as in Caffeine's
default) takes every new key. Keys that overflow the window become *candidates* at the tail
of **probation**; main's other segment, **protected** (``protected_ratio`` of main), holds keys
hit while in probation, and demotes its LRU keys back to probation when it overflows. While the
cache is over capacity, the next candidate is compared with the *victim* (probation's LRU key):
the one with the lower sketched frequency is evicted, the candidate losing ties. A candidate
can be the key being inserted, so :meth:`insert` may refuse it.

The sketch has four rows of 4-bit saturating counters (values 0..15) and halves every counter
after 10 increments per key it is sized for (TinyLFU's "reset", Caffeine's sample size). Its
width follows the number of cached keys: when the cache outgrows it, it is re-sized (as
Caffeine re-sizes its sketch) and the cached keys' estimates are carried over. Row indices
come from Python's ``hash``, which is salted per process, so an attacker cannot craft keys
that collide in the sketch; the cost is that runs differ very slightly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from itertools import chain

from edge.policy.base import SizeBookedPolicy

_COUNTER_MAX = 15
_DEPTH = 4
_COUNTERS_PER_KEY = 4  # per row, so 16 counters per cached key in all
_RESET_FACTOR = 10
# Row i's index is the top bits of hash * SEED_i mod 2**64 (multiply-shift hashing), so the four
# rows are independent: two keys share all four counters with probability ~ width**-4. (Deriving
# rows from one index plus multiples of a step, double hashing, would make that ~ width**-2,
# and a popular key would then lend its count to one in every few thousand new keys.) The
# seeds are Caffeine's FrequencySketch seeds.
_MASK64 = (1 << 64) - 1
_SEED0 = 0xC3A5C85C97CB3127
_SEED1 = 0xB492B66FBE98F273
_SEED2 = 0x9AE16A3B2F90404F
_SEED3 = 0xCBF29CE484222325


def row_indices(key: str, shift: int, width: int) -> tuple[int, int, int, int]:
    """*key*'s counter in each of four rows of *width* counters laid end to end (*shift* is
    ``64 - log2(width)``): multiply-shift hashing of Python's ``hash`` with Caffeine's seeds."""
    h = hash(key) & _MASK64
    return (
        ((h * _SEED0) & _MASK64) >> shift,
        width + (((h * _SEED1) & _MASK64) >> shift),
        2 * width + (((h * _SEED2) & _MASK64) >> shift),
        3 * width + (((h * _SEED3) & _MASK64) >> shift),
    )


class CountMinSketch:
    """Approximate, aging frequency counts: four rows of 4-bit counters."""

    __slots__ = ("_additions", "_sample_size", "_shift", "_table", "_width")

    def __init__(self, expected_keys: int) -> None:
        self._width = 0
        self._shift = 64
        self._table: list[int] = []
        self._additions = 0
        self._sample_size = 0
        self.ensure_capacity(expected_keys)

    @property
    def width(self) -> int:
        return self._width

    def ensure_capacity(self, expected_keys: int, keep: Iterable[str] = ()) -> None:
        """Grow the table to suit ``expected_keys`` keys; never shrinks.

        The estimates of the keys in ``keep`` (the cached keys) carry over into the new table;
        everything else is forgotten.
        """
        wanted = max(16, expected_keys * _COUNTERS_PER_KEY)
        width = 1 << (wanted - 1).bit_length()
        if width <= self._width:
            return
        kept = [(key, self.frequency(key)) for key in keep] if self._width else []
        self._width = width
        self._shift = 64 - (width.bit_length() - 1)
        self._table = [0] * (width * _DEPTH)
        self._sample_size = _RESET_FACTOR * max(1, width // _COUNTERS_PER_KEY)
        table = self._table
        for key, count in kept:
            for index in self._indices(key):
                table[index] = max(table[index], count)
        self._additions = sum(count for _, count in kept)

    def _indices(self, key: str) -> tuple[int, int, int, int]:
        return row_indices(key, self._shift, self._width)

    def increment(self, key: str) -> None:
        table = self._table
        added = False
        for index in row_indices(key, self._shift, self._width):
            if table[index] < _COUNTER_MAX:
                table[index] += 1
                added = True
        if added:
            self._additions += 1
            if self._additions >= self._sample_size:
                self._reset()

    def frequency(self, key: str) -> int:
        table = self._table
        i0, i1, i2, i3 = self._indices(key)
        return min(table[i0], table[i1], table[i2], table[i3])

    def _reset(self) -> None:
        self._table = [count >> 1 for count in self._table]
        self._additions //= 2


class TinyLFUPolicy(SizeBookedPolicy):
    """Window LRU + segmented LRU main + TinyLFU admission (Einziger et al.; Caffeine).

    ``window_ratio`` and ``protected_ratio`` are Caffeine's defaults (its hill climber, which
    resizes the window at run time, is not implemented). ``expected_object_bytes`` only sizes
    the sketch up front; it grows with the key count anyway.
    """

    __slots__ = (
        "_probation",
        "_protected",
        "_protected_bytes",
        "_protected_target_bytes",
        "_sketch",
        "_window",
        "_window_bytes",
        "_window_target_bytes",
    )

    def __init__(
        self,
        capacity_bytes: int,
        window_ratio: float = 0.01,
        protected_ratio: float = 0.8,
        expected_object_bytes: int = 64 * 1024,
    ) -> None:
        super().__init__(capacity_bytes)
        if not 0.0 <= window_ratio < 1.0:
            raise ValueError(f"window_ratio must be in [0, 1), got {window_ratio}")
        if not 0.0 <= protected_ratio < 1.0:
            raise ValueError(f"protected_ratio must be in [0, 1), got {protected_ratio}")
        self._window_target_bytes = int(capacity_bytes * window_ratio)
        self._protected_target_bytes = int(
            (capacity_bytes - self._window_target_bytes) * protected_ratio
        )
        self._window: OrderedDict[str, None] = OrderedDict()
        self._probation: OrderedDict[str, None] = OrderedDict()
        self._protected: OrderedDict[str, None] = OrderedDict()
        self._window_bytes = 0
        self._protected_bytes = 0
        self._sketch = CountMinSketch(capacity_bytes // max(1, expected_object_bytes))

    # ---- introspection (tests, metrics) --------------------------------------------------------

    def segment_of(self, key: str) -> str | None:
        """``"window"``, ``"probation"``, ``"protected"``, or ``None`` when absent."""
        if key in self._window:
            return "window"
        if key in self._probation:
            return "probation"
        if key in self._protected:
            return "protected"
        return None

    def frequency(self, key: str) -> int:
        return self._sketch.frequency(key)

    # ---- events ------------------------------------------------------------------------------

    def hit(self, key: str) -> None:
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._protected:
            self._protected.move_to_end(key)
        else:
            del self._probation[key]  # KeyError when absent, as the protocol says
            self._protected[key] = None
            self._protected_bytes += self._sizes[key]
            if self._protected_bytes > self._protected_target_bytes:
                self._demote()
        self._sketch.increment(key)

    def _demote(self) -> None:
        protected, probation, sizes = self._protected, self._probation, self._sizes
        while self._protected_bytes > self._protected_target_bytes:
            key = protected.popitem(last=False)[0]
            self._protected_bytes -= sizes[key]
            probation[key] = None

    def _insert_new(self, key: str, size_bytes: int) -> list[str]:
        sizes, window, probation = self._sizes, self._window, self._probation
        self._sketch.increment(key)
        sizes[key] = size_bytes
        self._used_bytes += size_bytes
        window[key] = None
        self._window_bytes += size_bytes
        if len(sizes) * _COUNTERS_PER_KEY > self._sketch.width:
            self._sketch.ensure_capacity(len(sizes), keep=sizes)

        candidates: list[str] = []  # moved from the window to probation's tail, oldest first
        while self._window_bytes > self._window_target_bytes:
            moved = window.popitem(last=False)[0]
            self._window_bytes -= sizes[moved]
            probation[moved] = None
            candidates.append(moved)

        evicted: list[str] = []
        pending = 0  # candidates[pending:] still await a verdict
        capacity, frequency = self.capacity_bytes, self._sketch.frequency
        while self._used_bytes > capacity:
            if pending == len(candidates):
                loser = self._pop_victim()
            else:
                candidate = candidates[pending]
                pending += 1
                victim = self._victim_for(candidate)
                if victim is not None and frequency(candidate) > frequency(victim):
                    loser = victim
                    self._drop(victim)
                else:
                    loser = candidate
                    del probation[candidate]
            self._used_bytes -= sizes.pop(loser)
            evicted.append(loser)
        return evicted

    def _victim_for(self, candidate: str) -> str | None:
        """Probation's LRU key; protected's or the window's when probation holds only
        candidates (Caffeine's order)."""
        for segment in (self._probation, self._protected, self._window):
            victim = next(iter(segment), None)
            if victim is not None and victim != candidate:
                return victim
        return None

    def _drop(self, key: str) -> None:
        """Take a present key out of its segment (not out of the books)."""
        if key in self._probation:
            del self._probation[key]
        elif key in self._protected:
            del self._protected[key]
            self._protected_bytes -= self._sizes[key]
        else:
            del self._window[key]
            self._window_bytes -= self._sizes[key]

    def _admit(self, key: str, size_bytes: int) -> None:  # pragma: no cover - _insert_new
        raise NotImplementedError("TinyLFUPolicy admits through _insert_new")

    def _pop_victim(self) -> str:
        for segment in (self._probation, self._protected, self._window):
            if segment:
                key = next(iter(segment))
                self._drop(key)
                return key
        raise AssertionError("_pop_victim called on an empty policy")  # pragma: no cover

    def _forget(self, key: str, size_bytes: int) -> None:
        if key in self._probation:
            del self._probation[key]
        elif key in self._protected:
            del self._protected[key]
            self._protected_bytes -= size_bytes
        else:
            del self._window[key]
            self._window_bytes -= size_bytes

    def _resized(self, key: str, old_size_bytes: int, new_size_bytes: int) -> None:
        if key in self._window:
            self._window_bytes += new_size_bytes - old_size_bytes
        elif key in self._protected:
            self._protected_bytes += new_size_bytes - old_size_bytes
        self.hit(key)
        if self._protected_bytes > self._protected_target_bytes:
            self._demote()

    def _ordered_keys(self) -> Iterator[str]:
        return chain(self._window, self._probation, self._protected)

    def _check_structures(self) -> None:
        sizes = self._sizes
        window_bytes = sum(sizes[key] for key in self._window)
        if window_bytes != self._window_bytes:
            raise AssertionError(f"window_bytes {self._window_bytes} != {window_bytes}")
        protected_bytes = sum(sizes[key] for key in self._protected)
        if protected_bytes != self._protected_bytes:
            raise AssertionError(f"protected_bytes {self._protected_bytes} != {protected_bytes}")
