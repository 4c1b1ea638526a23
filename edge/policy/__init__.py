"""Eviction and admission policies for the edge's cache tiers.

A policy sees keys and sizes, never bodies; a tier stores bytes and does what its policy says
(see :mod:`edge.policy.base` for the protocol and the exact calling sequence).

- :class:`LRUPolicy` — least recently used; the baseline.
- :class:`S3FIFOPolicy` — small + main + ghost FIFOs (Yang et al., SOSP'23).
- :class:`SIEVEPolicy` — one FIFO, a visited bit and a sweeping hand (Zhang et al., NSDI'24).
- :class:`TinyLFUPolicy` — W-TinyLFU with a count-min sketch (Einziger et al.; Caffeine).
- :class:`SizeAwareTinyLFUPolicy` — W-TinyLFU whose main area has its own byte budget and
  admits a candidate only if it is more frequent than every object it displaces.

``bench/eviction.py`` replays Zipf traces with a scan against all of them, Belady's optimum
and a static top-k oracle.
"""

from __future__ import annotations

from collections.abc import Callable

from edge.policy.base import EvictionPolicy, SizeBookedPolicy
from edge.policy.lru import LRUPolicy
from edge.policy.s3fifo import S3FIFOPolicy
from edge.policy.sieve import SIEVEPolicy
from edge.policy.tinylfu import CountMinSketch, TinyLFUPolicy
from edge.policy.tinylfu_sa import HistorySketch, SizeAwareTinyLFUPolicy

__all__ = [
    "POLICY_NAMES",
    "CountMinSketch",
    "EvictionPolicy",
    "HistorySketch",
    "LRUPolicy",
    "S3FIFOPolicy",
    "SIEVEPolicy",
    "SizeAwareTinyLFUPolicy",
    "SizeBookedPolicy",
    "TinyLFUPolicy",
    "make_policy",
]

_FACTORIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "s3fifo": S3FIFOPolicy,
    "sieve": SIEVEPolicy,
    "tinylfu": TinyLFUPolicy,
    "tinylfu-sa": SizeAwareTinyLFUPolicy,
}

POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """A new, empty policy by name: one of :data:`POLICY_NAMES`."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; expected one of {', '.join(POLICY_NAMES)}"
        ) from None
    return factory(capacity_bytes)
