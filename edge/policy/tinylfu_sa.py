"""Size-aware W-TinyLFU: a window, a segmented-LRU main area with its own byte budget, and a
frequency filter that admits a candidate only if it is more frequent than *every* object it
would displace.

Gil Einziger, Roy Friedman, Ben Manes. "TinyLFU: A Highly Efficient Cache Admission Policy".
ACM Transactions on Storage 13(4), 2017. https://doi.org/10.1145/3149371 — and Caffeine's
``BoundedLocalCache`` (``evictFromMain``, ``admit``) and ``FrequencySketch``, whose segments,
ratios, 4-bit counts, sample size and halving this follows.

Gil Einziger, Ohad Eytan, Roy Friedman, Ben Manes. "Lightweight Robust Size Aware Cache
Management". ACM Transactions on Storage, 2022 (article 27); https://arxiv.org/abs/2105.08770 —
for the idea of extending TinyLFU's one-candidate-against-one-victim comparison to objects of
different sizes by comparing a candidate with the victims it would displace.

Cristian Estan, George Varghese. "New Directions in Traffic Measurement and Accounting".
SIGCOMM 2002 — conservative update, the sketch's increment rule.

Why, compared with :mod:`edge.policy.tinylfu` (measured with ``bench/eviction.py``, see
``BENCHMARKS.md``): with sizes in bytes, that module compares a candidate with *one* victim and
then, if the candidate is larger, evicts further keys without comparing them; and a new key
that lands in a window that has room pushes the cache over capacity with no candidate to
compare, so a key the filter had admitted is evicted unconditionally. Both let infrequent
objects displace frequent ones. Here no key leaves main without losing a comparison (except
to make room when a re-insert grows a key), and both the object and the byte hit ratio rise
(the object hit ratio from ~0.92x to ~0.96x a static top-k oracle's on Zipf 0.8).

Layout, in bytes: the **window** (``window_ratio`` of the capacity, 1 % as in Caffeine's
default) takes every new key, in LRU order. **Main** has the rest of the capacity as its own
budget and is a segmented LRU: **probation**, and **protected** (``protected_ratio`` of main),
which holds keys hit while in main and demotes its LRU keys to probation when it overflows.

When the window overflows, its LRU key becomes a *candidate* for main. If main has room for it,
it enters probation. Otherwise the victims are main's keys in eviction order (probation's LRU
first, then protected's): walking them, the candidate must be strictly more frequent than each
victim, until the victims passed free enough bytes for it; then those victims are evicted and
the candidate enters probation. At the first victim at least as frequent, the candidate is
evicted instead and main is left untouched. So a large candidate displaces many small objects
only if it is more requested than each of them, and a one-off object (count 1) cannot displace
a key whose count is 1 or more: ties go to the victim. (Comparing the candidate with the *sum*
of its victims' counts — the rule that maximises the object hit ratio — raises the object hit
ratio further but lowers the byte hit ratio below the other policies'; ``BENCHMARKS.md`` has
the numbers.)

Frequencies: each present key's count (0..15) is kept as the value of its segment's
``OrderedDict``, so a hit increments it in place and never touches the sketch. The sketch
remembers the keys that are *not* present: a miss increments it (conservative update: only
the key's smallest counters rise) and the key enters the window with the estimate; a key that
leaves (evicted, refused or removed) writes its count back, raising its counters to at least
that count, so a popular key that was evicted is compared at its real frequency when it comes
back. Every ``10 x`` the number of keys the sketch is sized for, counted in requests that
raised a count (TinyLFU's sample size and "reset", as in Caffeine), the sketch's counters and
the present keys' counts are halved, so popularity can change; the halving is done at the next
miss, since only a miss compares counts, which keeps the check off the hit path.

The sketch has four rows of byte counters capped at 15, indexed by multiply-shift hashing of
Python's ``hash`` with Caffeine's seeds: 16 to 32 bytes per key it is sized for, which is the
larger of ``capacity_bytes / expected_object_bytes`` and the number of cached keys (it grows
with them). ``hash`` is salted per process, so an attacker cannot craft colliding keys; runs
therefore differ very slightly.

Not implemented: Caffeine's hill climber that resizes the window at run time (on the benchmark's
Zipf traces the hit-rate samples are too noisy for it to settle, and it lowered the hit ratio),
and its random admission of warm candidates against hash flooding (the salted hash covers that).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain

from edge.policy.base import SizeBookedPolicy
from edge.policy.tinylfu import row_indices

MAX_COUNT = 15
_ROWS = 4
_COUNTERS_PER_KEY = 4  # per row
_SAMPLE_FACTOR = 10  # requests per key between two halvings (TinyLFU's W / C)
_HALVED = bytes(value >> 1 for value in range(256))


class HistorySketch:
    """Count-min sketch of byte counters capped at :data:`MAX_COUNT`; halved on demand."""

    __slots__ = ("_shift", "_table", "_width")

    def __init__(self, expected_keys: int) -> None:
        wanted = max(16, expected_keys * _COUNTERS_PER_KEY)
        self._width = 1 << (wanted - 1).bit_length()
        self._shift = 64 - (self._width.bit_length() - 1)
        self._table = bytearray(_ROWS * self._width)

    @property
    def width(self) -> int:
        """Counters per row."""
        return self._width

    @property
    def expected_keys(self) -> int:
        """The number of keys the sketch is sized for."""
        return self._width // _COUNTERS_PER_KEY

    def _indices(self, key: str) -> tuple[int, int, int, int]:
        # Row i's index is the top bits of hash * SEED_i mod 2**64 (Caffeine's seeds), so the
        # four rows are independent (see edge.policy.tinylfu for why not double hashing).
        return row_indices(key, self._shift, self._width)

    def add(self, key: str) -> int:
        """Count one request for ``key``; return its estimate *before* this request."""
        table = self._table
        i0, i1, i2, i3 = self._indices(key)
        c0, c1, c2, c3 = table[i0], table[i1], table[i2], table[i3]
        before = min(c0, c1, c2, c3)
        if before < MAX_COUNT:
            after = before + 1  # conservative update: raise only the counters below it
            if c0 < after:
                table[i0] = after
            if c1 < after:
                table[i1] = after
            if c2 < after:
                table[i2] = after
            if c3 < after:
                table[i3] = after
        return before

    def record(self, key: str, count: int) -> None:
        """Raise ``key``'s counters to at least ``count`` (a leaving key's known count)."""
        table = self._table
        indices = self._indices(key)
        i0, i1, i2, i3 = indices
        if min(table[i0], table[i1], table[i2], table[i3]) >= count:
            return  # the common case: a key never hit while present (a one-off)
        for index in indices:
            table[index] = max(table[index], count)

    def estimate(self, key: str) -> int:
        table = self._table
        i0, i1, i2, i3 = self._indices(key)
        return min(table[i0], table[i1], table[i2], table[i3])

    def halve(self) -> None:
        self._table = self._table.translate(_HALVED)


class SizeAwareTinyLFUPolicy(SizeBookedPolicy):
    """Window LRU + segmented-LRU main with its own budget + TinyLFU admission that compares a
    candidate with every victim it would displace.

    ``window_ratio`` and ``protected_ratio`` are Caffeine's defaults. ``expected_object_bytes``
    only sizes the sketch up front; it grows with the key count anyway.
    """

    __slots__ = (
        "_counted",
        "_main_bytes",
        "_main_target_bytes",
        "_probation",
        "_protected",
        "_protected_bytes",
        "_protected_target_bytes",
        "_sample_size",
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
        self._main_target_bytes = capacity_bytes - self._window_target_bytes
        self._protected_target_bytes = int(self._main_target_bytes * protected_ratio)
        # key -> its count (0..MAX_COUNT), in LRU order, oldest first
        self._window: OrderedDict[str, int] = OrderedDict()
        self._probation: OrderedDict[str, int] = OrderedDict()
        self._protected: OrderedDict[str, int] = OrderedDict()
        self._window_bytes = 0
        self._main_bytes = 0  # probation + protected
        self._protected_bytes = 0
        self._sketch = HistorySketch(capacity_bytes // max(1, expected_object_bytes))
        self._sample_size = _SAMPLE_FACTOR * self._sketch.expected_keys
        self._counted = 0  # requests that raised a count since the last halving (halved too)

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
        """A present key's count; the sketch's estimate for an absent one."""
        for segment in (self._window, self._probation, self._protected):
            count = segment.get(key)
            if count is not None:
                return count
        return self._sketch.estimate(key)

    @property
    def main_bytes(self) -> int:
        return self._main_bytes

    @property
    def main_target_bytes(self) -> int:
        return self._main_target_bytes

    @property
    def sample_size(self) -> int:
        """Counted requests between two halvings of every count."""
        return self._sample_size

    # ---- events ------------------------------------------------------------------------------

    def hit(self, key: str) -> None:
        # A count that rises is counted towards the next halving, which waits for the next
        # miss: only a miss compares counts, so the check stays off the hit path.
        protected = self._protected
        count = protected.get(key)
        if count is not None:  # the common case first
            protected.move_to_end(key)
            if count < MAX_COUNT:
                protected[key] = count + 1
                self._counted += 1
            return
        window = self._window
        count = window.get(key)
        if count is not None:
            window.move_to_end(key)
            if count < MAX_COUNT:
                window[key] = count + 1
                self._counted += 1
            return
        count = self._probation.pop(key)  # KeyError when absent, as the protocol says
        if count < MAX_COUNT:
            count += 1
            self._counted += 1
        protected[key] = count
        self._protected_bytes += self._sizes[key]
        if self._protected_bytes > self._protected_target_bytes:
            self._demote()

    def _insert_new(self, key: str, size_bytes: int) -> list[str]:
        sizes, window, sketch = self._sizes, self._window, self._sketch
        before = sketch.add(key)
        sizes[key] = size_bytes
        self._used_bytes += size_bytes
        self._window_bytes += size_bytes
        if before < MAX_COUNT:
            window[key] = before + 1
            self._counted += 1
        else:
            window[key] = MAX_COUNT
        if self._counted >= self._sample_size:
            self._age()
        if len(sizes) > sketch.expected_keys:
            self._grow_sketch()

        evicted: list[str] = []
        probation = self._probation
        while self._window_bytes > self._window_target_bytes:
            candidate, count = window.popitem(last=False)
            candidate_bytes = sizes[candidate]
            self._window_bytes -= candidate_bytes
            needed = self._main_bytes + candidate_bytes - self._main_target_bytes
            if needed <= 0 or self._displace(needed, count, evicted):
                probation[candidate] = count
                self._main_bytes += candidate_bytes
            else:  # refused: it leaves, and the sketch remembers how often it was asked for
                self._used_bytes -= sizes.pop(candidate)
                sketch.record(candidate, count)
                evicted.append(candidate)
        if self._used_bytes > self.capacity_bytes:
            # Main is over its budget after a re-insert grew one of its keys.
            evicted.extend(self._evict_down_to(self.capacity_bytes))
        return evicted

    def _displace(self, needed_bytes: int, count: int, evicted: list[str]) -> bool:
        """Evict main's next victims, freeing ``needed_bytes``, if each is less frequent than
        ``count``; otherwise change nothing and return ``False``."""
        sizes = self._sizes
        victims: list[str] = []
        freed = 0
        for segment in (self._probation, self._protected):
            for victim, victim_count in segment.items():
                if victim_count >= count:
                    return False
                victims.append(victim)
                freed += sizes[victim]
                if freed >= needed_bytes:
                    break
            else:
                continue
            break
        else:
            return False  # main holds too few bytes to make room: the candidate is larger
        probation, protected, record = self._probation, self._protected, self._sketch.record
        for victim in victims:
            victim_count = probation.pop(victim, -1)
            if victim_count < 0:
                victim_count = protected.pop(victim)
                self._protected_bytes -= sizes[victim]
            record(victim, victim_count)
            size_bytes = sizes.pop(victim)
            self._main_bytes -= size_bytes
            self._used_bytes -= size_bytes
            evicted.append(victim)
        return True

    def _demote(self) -> None:
        protected, probation, sizes = self._protected, self._probation, self._sizes
        while self._protected_bytes > self._protected_target_bytes:
            key, count = protected.popitem(last=False)
            self._protected_bytes -= sizes[key]
            probation[key] = count

    def _age(self) -> None:
        """TinyLFU's reset: halve every count, the sketch's and the present keys'."""
        self._counted //= 2
        self._sketch.halve()
        for segment in (self._window, self._probation, self._protected):
            for key, count in segment.items():
                segment[key] = count >> 1

    def _grow_sketch(self) -> None:
        """Re-size the sketch for the key count; what it knew of absent keys is forgotten
        (present keys keep their counts, which live in the segments)."""
        self._sketch = HistorySketch(len(self._sizes))
        self._sample_size = _SAMPLE_FACTOR * self._sketch.expected_keys
        self._counted = 0

    def _admit(self, key: str, size_bytes: int) -> None:  # pragma: no cover - _insert_new
        raise NotImplementedError("SizeAwareTinyLFUPolicy admits through _insert_new")

    def _pop_victim(self) -> str:
        # Only after a re-insert grew a key: main's eviction order, then the window's.
        sizes = self._sizes
        if self._probation:
            key, count = self._probation.popitem(last=False)
            self._main_bytes -= sizes[key]
        elif self._protected:
            key, count = self._protected.popitem(last=False)
            self._main_bytes -= sizes[key]
            self._protected_bytes -= sizes[key]
        else:
            key, count = self._window.popitem(last=False)
            self._window_bytes -= sizes[key]
        self._sketch.record(key, count)
        return key

    def _forget(self, key: str, size_bytes: int) -> None:
        count = self._window.pop(key, -1)
        if count >= 0:
            self._window_bytes -= size_bytes
        else:
            count = self._probation.pop(key, -1)
            if count < 0:
                count = self._protected.pop(key)
                self._protected_bytes -= size_bytes
            self._main_bytes -= size_bytes
        self._sketch.record(key, count)  # a purged URL stays as popular as it was

    def _resized(self, key: str, old_size_bytes: int, new_size_bytes: int) -> None:
        delta = new_size_bytes - old_size_bytes
        if key in self._window:
            self._window_bytes += delta
        else:
            self._main_bytes += delta
            if key in self._protected:
                self._protected_bytes += delta
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
        main_bytes = protected_bytes + sum(sizes[key] for key in self._probation)
        if main_bytes != self._main_bytes:
            raise AssertionError(f"main_bytes {self._main_bytes} != {main_bytes}")
        counts = chain(self._window.values(), self._probation.values(), self._protected.values())
        if any(not 0 <= count <= MAX_COUNT for count in counts):
            raise AssertionError(f"a count outside [0, {MAX_COUNT}]")
