"""Admission control: the edge sheds load it cannot carry instead of queueing it.

Three limits, each answered at once (a refusal costs microseconds, not a place in a queue
that grows until every student waits):

- **In-flight requests** in the full request flow (misses, disk hits, passes, slices): past
  ``max_inflight_requests``, ``503`` with ``Retry-After``.
- **Upstream fetches** (collapsed requests count once; enforced by
  :class:`edge.upstream.Upstream`, waiting for a connection or for headers): past
  ``max_upstream_fetches`` a miss
  is served stale if anything is stored for it, else ``503`` with ``Retry-After``; a
  background refresh is skipped. The origin is protected exactly when a purge or a new edge
  sends every request its way.
- **Requests per client** (an IPv4 address or an IPv6 /64) in the full flow, a sliding window
  counter from the ``limits`` library: past ``client_requests_per_s``, ``429`` with
  ``Retry-After``.

Fresh hits from the memory tier (the express lane) are not counted against any of these:
answering one costs less than refusing it would, and a crowd behind one carrier NAT reading
the same playlist must not be refused for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from edge.guard import client_key


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_inflight_requests: int = 4096
    """Requests in the full flow at once; ``0``: no limit."""
    max_upstream_fetches: int = 256
    """Upstream requests at once (above the pool's connections they wait for one, up to this
    many); ``0``: no limit."""
    client_requests_per_s: int = 500
    """Full-flow requests per client address per second; ``0``: no limit. Generous: a
    carrier-grade NAT puts a whole town's students behind one address."""


@dataclass(slots=True)
class ShedCounts:
    inflight: int = 0
    rate: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str
    retry_after_s: int


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.inflight = 0
        self.shed = ShedCounts()
        self._rate = (
            RateLimitItemPerSecond(limits.client_requests_per_s)
            if limits.client_requests_per_s
            else None
        )
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    async def admit(self, peername: object) -> Refusal | None:
        """Count a full-flow request in, or say why not (then nothing is counted). A
        request admitted must be let out with :meth:`done`."""
        cap = self.limits.max_inflight_requests
        if cap and self.inflight >= cap:
            self.shed.inflight += 1
            return Refusal(503, "the edge is at its limit of requests in flight", 1)
        rate = self._rate
        if rate is not None:
            key = client_key(peername)
            if key is not None:
                identity = key if isinstance(key, str) else key.hex()
                if not await self._limiter.hit(rate, identity):
                    self.shed.rate += 1
                    stats = await self._limiter.get_window_stats(rate, identity)
                    wait = max(1, math.ceil(stats.reset_time - time.time()))
                    return Refusal(429, "too many requests from your address", wait)
        self.inflight += 1
        return None

    def done(self) -> None:
        self.inflight -= 1
