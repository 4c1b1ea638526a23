"""``/metrics``: Prometheus counters, a latency histogram and tier gauges for one edge."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from edge.admission import Admission
    from edge.cache import TieredCache
    from edge.guard import Doorman
    from edge.upstream import Upstream


class Edge(Protocol):
    """What ``/metrics`` reads of an edge, at scrape time (the edge itself is ``edge.app``,
    which imports this module)."""

    @property
    def cache(self) -> TieredCache: ...

    @property
    def upstream(self) -> Upstream: ...

    @property
    def doorman(self) -> Doorman: ...

    @property
    def admission(self) -> Admission: ...

    def hit_for_miss_keys(self) -> int: ...

    def purge_state(self) -> str: ...


class _HitCounters(Collector):
    """The counters every hit bumps, kept as plain integers (a ``Counter.inc`` takes a lock
    and costs about as much as the rest of an express hit) and read at scrape time."""

    def __init__(self, metrics: EdgeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield CounterMetricFamily(
            "kshipra_edge_hits", "Requests answered from cache", value=metrics.hits
        )
        yield CounterMetricFamily(
            "kshipra_edge_express_hits",
            "Hits answered on the express lane (also counted in kshipra_edge_hits)",
            value=metrics.express_hits,
        )
        yield CounterMetricFamily(
            "kshipra_edge_client_bytes", "Body bytes sent to clients", value=metrics.client_bytes
        )


class _Shedding(Collector):
    """What admission control and the connection door refused, read at scrape time."""

    def __init__(self, edge: Edge) -> None:
        self._edge = edge

    def collect(self) -> Iterator[Metric]:
        edge = self._edge
        shed = CounterMetricFamily(
            "kshipra_edge_shed",
            "Requests refused for load: inflight (503), upstream (503 or served stale), "
            "rate (429 per client)",
            labels=["reason"],
        )
        shed.add_metric(["inflight"], edge.admission.shed.inflight)
        shed.add_metric(["upstream"], edge.upstream.shed)
        shed.add_metric(["rate"], edge.admission.shed.rate)
        yield shed
        door = edge.doorman.counts
        closed = CounterMetricFamily(
            "kshipra_edge_connections_closed",
            "Connections the edge closed: head_timeout (a request head too slow or never "
            "sent), send_stall (a client that stopped reading), per_client_cap (refused 429)",
            labels=["reason"],
        )
        closed.add_metric(["head_timeout"], door.head_timeouts)
        closed.add_metric(["send_stall"], door.send_stalls)
        closed.add_metric(["per_client_cap"], door.refused_connections)
        yield closed
        yield GaugeMetricFamily(
            "kshipra_edge_open_connections", "Client connections open", value=door.open_connections
        )
        yield GaugeMetricFamily(
            "kshipra_edge_inflight_requests",
            "Requests in the full request flow (bounded by max_inflight_requests)",
            value=edge.admission.inflight,
        )
        yield GaugeMetricFamily(
            "kshipra_edge_upstream_waiting",
            "Upstream requests waiting for a connection or headers (bounded by "
            "max_upstream_fetches)",
            value=edge.upstream.waiting,
        )


class EdgeMetrics:
    def __init__(self, edge: Edge) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.hits = 0
        self.express_hits = 0
        self.client_bytes = 0
        registry.register(_HitCounters(self))
        registry.register(_Shedding(edge))
        self._misses = Counter(
            "kshipra_edge_misses", "Requests that needed upstream", registry=registry
        )
        self._stale = Counter(
            "kshipra_edge_stale_serves",
            "Stale responses served (stale-while-revalidate, stale-if-error)",
            registry=registry,
        )
        self._collapsed = Counter(
            "kshipra_edge_collapsed_waits",
            "Requests that waited for another request's upstream fetch",
            registry=registry,
        )
        self._from_upstream = Counter(
            "kshipra_edge_upstream_bytes", "Body bytes received from upstream", registry=registry
        )
        self._latency = Histogram(
            "kshipra_edge_upstream_latency_seconds",
            "Time to upstream response headers",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        marks = Gauge(
            "kshipra_edge_hit_for_miss_keys",
            "URLs remembered as uncacheable (bounded by hit_for_miss_max_keys)",
            registry=registry,
        )
        marks.set_function(lambda: float(edge.hit_for_miss_keys()))
        following = Gauge(
            "kshipra_edge_purge_stream_following",
            "1 while this edge follows the fleet's purge stream and has caught up; 0 with no "
            "Redis configured (it receives no purges) or while catching up",
            registry=registry,
        )
        following.set_function(lambda: 1.0 if edge.purge_state() == "following" else 0.0)
        memory_bytes = Gauge(
            "kshipra_edge_memory_tier_bytes", "Bytes held by the memory tier", registry=registry
        )
        memory_bytes.set_function(lambda: edge.cache.memory.used_bytes)
        memory_entries = Gauge(
            "kshipra_edge_memory_tier_entries", "Entries in the memory tier", registry=registry
        )
        memory_entries.set_function(lambda: len(edge.cache.memory))
        disk_bytes = Gauge(
            "kshipra_edge_disk_tier_bytes", "Bytes held by the disk tier", registry=registry
        )
        disk_bytes.set_function(lambda: edge.cache.lower.used_bytes)
        disk_entries = Gauge(
            "kshipra_edge_disk_tier_entries", "Entries in the disk tier", registry=registry
        )
        disk_entries.set_function(lambda: len(edge.cache.lower))
        evictions = Gauge(
            "kshipra_edge_memory_evictions",
            "Objects evicted from the memory tier",
            registry=registry,
        )
        evictions.set_function(lambda: edge.cache.memory.evictions)
        disk_evictions = Gauge(
            "kshipra_edge_disk_evictions", "Objects evicted from the disk tier", registry=registry
        )
        disk_evictions.set_function(lambda: edge.cache.lower.evictions)

    def hit(self) -> None:
        self.hits += 1

    def miss(self) -> None:
        self._misses.inc()

    def stale(self) -> None:
        self._stale.inc()

    def collapsed(self) -> None:
        self._collapsed.inc()

    def bytes_to_clients(self, count: int) -> None:
        self.client_bytes += count

    def bytes_from_upstream(self, count: int) -> None:
        self._from_upstream.inc(count)

    def upstream_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
