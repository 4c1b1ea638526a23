"""The wire contract between the origin, the workers and the edges, written once.

Everything one service writes into Redis (or into a header) for another to read is named
here: key names, the purge stream and the one codec of its entries. The origin's purge API,
the worker's publish, the S3 notification script and the edges' followers all encode and
decode a purge entry with :class:`PurgeEntry`, so the fields cannot drift apart.

The purge stream (``XADD`` with ``MAXLEN ~`` :data:`PURGE_STREAM_MAXLEN`) holds one entry per
target::

    kind=url|prefix|tag  value=…  soft=0|1  reason=…  requested_at=<Unix s>  id=<request id>

An edge applies entries in stream order, acknowledges each under :data:`ACK_PREFIX` and
heartbeats under :data:`EDGE_PREFIX`; a purge request waits for those acks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

# ---- Redis key names -------------------------------------------------------------------------

PURGE_STREAM: Final = "kshipra:purges"
"""The purge stream every edge (and the origin's own caches) follows."""
PURGE_STREAM_MAXLEN: Final = 100_000
"""Approximate trim length of the purge stream; an edge further behind than this soft-purges
everything (see ``edge.purge.missed_purges``)."""
ACK_PREFIX: Final = "kshipra:purge-acks:"
"""``{prefix}{stream id}``: a hash of edge name → application time, written by each edge."""
ACK_TTL_S: Final = 24 * 3600
EDGE_PREFIX: Final = "kshipra:edges:"
"""``{prefix}{edge name}``: an edge's heartbeat (a key with a short TTL)."""
UPLOAD_SESSION_PREFIX: Final = "kshipra:upload:"
"""The origin's resumable upload sessions."""
WAITERS_PREFIX: Final = "kshipra:waiters:"
"""``{prefix}{job key}``: the asset versions waiting for one job's outputs."""
PROGRESS_PREFIX: Final = "kshipra:progress:"
"""``{prefix}{job key}``: a job's newest progress document (JSON)."""
S3_SEQUENCERS_KEY: Final = "kshipra:s3-sequencers"
"""A hash of object key → newest S3 event sequencer seen (notifications are deduplicated)."""

# ---- headers between the services ------------------------------------------------------------

PURGE_SEEN_HEADER: Final = "Kshipra-Purge-Seen"
"""Sent by an edge to its parent (edge or origin) with the last purge it applied; the parent
catches up to that purge before answering, so a shield or the origin's own caches never refill
a child with what the child just purged."""

# ---- the purge entry -------------------------------------------------------------------------

PurgeKind = Literal["url", "prefix", "tag"]
PURGE_KINDS: Final[tuple[PurgeKind, ...]] = get_args(PurgeKind)
_STREAM_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")


class BadPurgeEntry(ValueError):
    """A purge entry that cannot be understood (skip it, or answer 400)."""


@dataclass(frozen=True, slots=True)
class PurgeEntry:
    """One purge: what to drop (or mark for revalidation), why, and when it was asked for."""

    kind: PurgeKind
    value: str
    soft: bool
    reason: str = ""
    requested_at: float = 0.0
    request_id: str = ""

    def fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        return {
            "kind": self.kind,
            "value": self.value,
            "soft": "1" if self.soft else "0",
            "reason": self.reason,
            "requested_at": f"{self.requested_at:.6f}",
            "id": self.request_id,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> PurgeEntry:
        """A stream entry's fields; :class:`BadPurgeEntry` if malformed."""
        kind = fields.get("kind", "")
        if kind not in PURGE_KINDS:
            raise BadPurgeEntry(f"unknown purge kind {kind!r}")
        value = fields.get("value", "")
        if not value:
            raise BadPurgeEntry("a purge needs a value")
        soft = fields.get("soft", "0")
        if soft not in ("0", "1"):
            raise BadPurgeEntry(f"soft must be '0' or '1', not {soft!r}")
        try:
            requested_at = float(fields.get("requested_at", "0"))
        except ValueError:
            raise BadPurgeEntry("requested_at must be Unix seconds") from None
        return cls(
            kind,
            value,
            soft == "1",
            fields.get("reason", ""),
            requested_at,
            fields.get("id", ""),
        )


PURGE_ENTRY_FIELD_COUNT: Final = len(PurgeEntry("tag", "x", soft=False).fields())
"""How many fields :meth:`PurgeEntry.fields` writes (a Lua script takes them as flat pairs)."""


def stream_position(stream_id: str) -> tuple[int, int] | None:
    """``"1700000000000-3"`` → ``(1700000000000, 3)``, for comparing stream ids; ``None`` for
    anything else."""
    match = _STREAM_ID_RE.match(stream_id)
    return None if match is None else (int(match.group(1)), int(match.group(2)))
