"""The edge's cache tiers. A tier stores bytes and never decides: its eviction policy
(:mod:`edge.policy`) says what to keep.

- :class:`edge.tiers.base.CacheTier` — what every tier does (one contract suite,
  ``tests/contract/test_tier_contract.py``, runs over each); :mod:`edge.tiers.adapters` puts it over
  the memory tier, the disk tier, and no tier.
- :class:`DiskTier` — bodies as files, streamed and published atomically, checksummed, served
  with ``sendfile``, shared by the worker processes of one edge (:mod:`edge.tiers.disk`).
"""

from __future__ import annotations

from edge.tiers.disk import (
    CHECKSUM_ALGORITHM,
    FORMAT_VERSION,
    BodySizeMismatchError,
    CorruptEntryError,
    DiskEntry,
    DiskTier,
    DiskTierError,
    EntryGoneError,
    EntryUnavailableError,
)

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FORMAT_VERSION",
    "BodySizeMismatchError",
    "CorruptEntryError",
    "DiskEntry",
    "DiskTier",
    "DiskTierError",
    "EntryGoneError",
    "EntryUnavailableError",
]
