"""The eviction-policy role, and the base class that keeps the byte books.

A policy decides *which* cached object to drop; a tier (memory, disk) stores the bytes and
does what the policy says. The policy sees keys and sizes only, never bodies, and the edge
drives it in exactly one way::

    if key in policy:                       # lookup
        policy.hit(key)
    else:                                   # miss, fetched upstream
        for dropped in policy.insert(key, size_bytes):
            tier.delete(dropped)            # may be `key` itself: not admitted

After every call: ``used_bytes`` equals the sum of the sizes of the present keys and is at
most ``capacity_bytes``; no key is present twice; a key returned by ``insert`` is no longer
present.

As in cachetools, the base class keeps the books (sizes, ``used_bytes``, validation, the
re-insert and too-large cases) and the policies differ only in how they order keys and which
one they pick as the victim. Every operation is O(1) amortised.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class EvictionPolicy(Protocol):
    """Decides which keys a size-bounded cache tier keeps."""

    capacity_bytes: int

    @property
    def used_bytes(self) -> int:
        """Sum of the sizes of the present keys."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def hit(self, key: str) -> None:
        """A lookup found ``key``; raises ``KeyError`` if it is not present."""
        ...

    def insert(self, key: str, size_bytes: int) -> list[str]:
        """Admit ``key`` after a miss; return the keys the tier must drop.

        The list may contain ``key`` itself when the policy declines to keep it (larger than
        the capacity, or refused by an admission filter). Re-inserting a present key updates
        its size and counts as an access.
        """
        ...

    def remove(self, key: str) -> None:
        """The tier dropped ``key`` (purge, corruption); an unknown key is a no-op."""
        ...

    def keys(self) -> Iterator[str]:
        """The present keys, in no particular order (a snapshot: safe to mutate meanwhile)."""
        ...


class SizeBookedPolicy(ABC):
    """Keeps ``key -> size_bytes`` and ``used_bytes``; subclasses choose victims.

    Subclasses implement :meth:`hit` (raising ``KeyError`` for an absent key) and four hooks
    that only maintain their own ordering structures; the books are kept here:

    - :meth:`_admit` — a new key enters (it is already known to fit);
    - :meth:`_pop_victim` — choose a present key to evict and drop it from the structures;
      the base class then removes it from the books;
    - :meth:`_forget` — a present key leaves through :meth:`remove`;
    - :meth:`_resized` — a present key was re-inserted with a (possibly) new size.

    A policy with an admission filter overrides :meth:`_insert_new` instead of relying on
    evict-then-admit.
    """

    __slots__ = ("_sizes", "_used_bytes", "capacity_bytes")

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._sizes: dict[str, int] = {}
        self._used_bytes = 0

    # ---- the books ---------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def keys(self) -> Iterator[str]:
        return iter(list(self._sizes))

    def size_of(self, key: str) -> int:
        """The size recorded for a present key; ``KeyError`` otherwise."""
        return self._sizes[key]

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the books or the policy's structures disagree.

        O(n): for tests and for the simulator after a run, never on the request path.
        """
        total = sum(self._sizes.values())
        if total != self._used_bytes:
            raise AssertionError(f"used_bytes {self._used_bytes} != sum of sizes {total}")
        if self._used_bytes > self.capacity_bytes:
            raise AssertionError(f"used_bytes {self._used_bytes} > {self.capacity_bytes}")
        if any(size < 0 for size in self._sizes.values()):
            raise AssertionError("negative size recorded")
        ordered = list(self._ordered_keys())
        if len(ordered) != len(set(ordered)):
            raise AssertionError("a key is present twice in the policy's structures")
        if set(ordered) != self._sizes.keys():
            raise AssertionError("the policy's structures and the books hold different keys")
        self._check_structures()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity_bytes={self.capacity_bytes}, "
            f"used_bytes={self._used_bytes}, keys={len(self._sizes)})"
        )

    # ---- events ------------------------------------------------------------------------------

    @abstractmethod
    def hit(self, key: str) -> None: ...

    def insert(self, key: str, size_bytes: int) -> list[str]:
        if key not in self._sizes and 0 <= size_bytes <= self.capacity_bytes:
            return self._insert_new(key, size_bytes)  # the common case: a miss that fits
        if size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {size_bytes} for {key!r}")
        old_size = self._sizes.get(key)
        if size_bytes > self.capacity_bytes:
            if old_size is not None:
                self.remove(key)
            return [key]
        if old_size is None:
            return self._insert_new(key, size_bytes)
        self._sizes[key] = size_bytes
        self._used_bytes += size_bytes - old_size
        self._resized(key, old_size, size_bytes)
        return self._evict_down_to(self.capacity_bytes)

    def remove(self, key: str) -> None:
        size_bytes = self._sizes.pop(key, None)
        if size_bytes is None:
            return
        self._used_bytes -= size_bytes
        self._forget(key, size_bytes)

    # ---- the template ------------------------------------------------------------------------

    def _insert_new(self, key: str, size_bytes: int) -> list[str]:
        """Evict until ``key`` fits, then admit it (``size_bytes <= capacity_bytes``)."""
        # _evict_down_to, inlined: this is the path of every miss.
        sizes, pop_victim = self._sizes, self._pop_victim
        limit_bytes = self.capacity_bytes - size_bytes
        used_bytes = self._used_bytes
        evicted: list[str] = []
        while used_bytes > limit_bytes:
            victim = pop_victim()
            used_bytes -= sizes.pop(victim)
            evicted.append(victim)
        self._admit(key, size_bytes)
        sizes[key] = size_bytes
        self._used_bytes = used_bytes + size_bytes
        return evicted

    def _evict_down_to(self, limit_bytes: int) -> list[str]:
        evicted: list[str] = []
        sizes, pop_victim = self._sizes, self._pop_victim
        used_bytes = self._used_bytes
        while used_bytes > limit_bytes:
            victim = pop_victim()
            used_bytes -= sizes.pop(victim)
            evicted.append(victim)
        self._used_bytes = used_bytes
        return evicted

    @abstractmethod
    def _ordered_keys(self) -> Iterator[str]:
        """Every key in the policy's own structures (for :meth:`check_invariants`)."""

    @abstractmethod
    def _check_structures(self) -> None:
        """Policy-specific invariants beyond the books; raise ``AssertionError``."""

    @abstractmethod
    def _admit(self, key: str, size_bytes: int) -> None: ...

    @abstractmethod
    def _pop_victim(self) -> str:
        """Pick a present key, drop it from the policy's own structures, and return it.

        Called only while ``used_bytes > 0``, so some key is present; the key is still in
        ``self._sizes`` during the call, but ``self._used_bytes`` is brought up to date only
        after the eviction loop, so a policy must not read it here.
        """

    @abstractmethod
    def _forget(self, key: str, size_bytes: int) -> None: ...

    @abstractmethod
    def _resized(self, key: str, old_size_bytes: int, new_size_bytes: int) -> None: ...
