#!/usr/bin/env python3
"""Eviction-policy simulator: Zipf traces with a scan, replayed against every policy.

For each Zipf exponent (``--alphas``) it generates one seeded trace: ``--objects`` catalogue
objects whose sizes are drawn once each from a log-normal around 30 KB (sigma 1.2, clipped to
[1 KiB, 4 MiB]: images, HLS segments, question-bank bundles), ``--requests`` Zipf-distributed
requests to them, and, as a contiguous burst in the middle, a one-off scan of ``--scan``
distinct objects that are never requested again (a crawler, or a warm-up walking a catalogue).

Each trace is replayed, for each cache size (``--sizes``, in percent of the catalogue's bytes),
against:

- the online policies of ``edge.policy``, driven exactly as the edge drives them — lookup
  ``key in policy``, then ``hit(key)`` or ``insert(key, size)`` and delete the returned keys
  from a mirror of the tier — with the invariants checked after each run and the mirror
  compared with the policy's keys;
- **belady**: the offline optimum for object hits, in its usual size-aware approximation:
  on a miss, evict the object whose next request is furthest in the future until the new one
  fits, and do not admit an object whose next request is further away than every cached
  object's (or that is never requested again);
- **oracle**: a static top-k cache that holds, from the start, the objects most requested in
  the trace, taken greedily by request count while they fit in the byte budget; it hits every
  request to them but the first.

It prints object and byte hit ratios, each policy's ratio to the oracle's (the project's goal
is >= 0.95x the oracle's object hit ratio at every point) and to Belady's; for the online
policies, the share of the bytes cached when the scan began that are still cached when it ends
("scan kept"), events/s (CPU time of the replay loop, driver included, so that other load on
the machine does not skew it) and the CPU time of one lookup + ``hit`` alone — the cost a
policy adds to the edge's hit path — timed after the replay over the trace's last requests
whose keys are present (best of three passes); and it writes ``bench/results/eviction.json``.

    .venv/bin/python bench/eviction.py                               # the full run
    .venv/bin/python bench/eviction.py --requests 200000 --objects 20000 --sizes 5   # quick
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.policy import POLICY_NAMES, EvictionPolicy, SizeBookedPolicy, make_policy  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "eviction.json"
MEDIAN_OBJECT_BYTES = 30_000
SIZE_SIGMA = 1.2
MIN_OBJECT_BYTES = 1024
MAX_OBJECT_BYTES = 4 * 1024 * 1024
GOAL_VS_ORACLE = 0.95
HIT_TIMING_REQUESTS = 100_000


# ---- traces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    alpha: float
    keys: list[str]  # by object id; ids >= n_objects are the scan's
    sizes: list[int]  # by object id
    requests: list[int]  # object ids, in order
    n_objects: int
    n_scan: int
    catalogue_bytes: int  # total size of the n_objects catalogue objects


def make_trace(alpha: float, n_objects: int, n_requests: int, n_scan: int, seed: int) -> Trace:
    rng = random.Random(f"kshipra-eviction-{seed}-{alpha}")  # noqa: S311 - a seeded trace
    mu = math.log(MEDIAN_OBJECT_BYTES)
    sizes = [
        min(MAX_OBJECT_BYTES, max(MIN_OBJECT_BYTES, round(rng.lognormvariate(mu, SIZE_SIGMA))))
        for _ in range(n_objects + n_scan)
    ]
    # Popularity rank is a random permutation of the ids, so rank and key are unrelated.
    ranked = list(range(n_objects))
    rng.shuffle(ranked)
    cum_weights: list[float] = []
    total = 0.0
    for rank in range(1, n_objects + 1):
        total += rank**-alpha
        cum_weights.append(total)
    zipf = rng.choices(ranked, cum_weights=cum_weights, k=n_requests)
    middle = n_requests // 2
    requests = zipf[:middle] + list(range(n_objects, n_objects + n_scan)) + zipf[middle:]
    keys = [f"/v1/a/{object_id:07d}/seg.m4s" for object_id in range(n_objects + n_scan)]
    return Trace(
        alpha=alpha,
        keys=keys,
        sizes=sizes,
        requests=requests,
        n_objects=n_objects,
        n_scan=n_scan,
        catalogue_bytes=sum(sizes[:n_objects]),
    )


# ---- replays ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    alpha: float
    cache_percent: float
    capacity_bytes: int
    policy: str
    requests: int
    hits: int
    hit_bytes: int
    requested_bytes: int
    evictions: int
    seconds: float
    object_hit_ratio: float = 0.0
    byte_hit_ratio: float = 0.0
    object_vs_oracle: float = 0.0
    byte_vs_oracle: float = 0.0
    object_vs_belady: float = 0.0
    events_per_s: float = 0.0
    hit_ns: float = 0.0  # CPU time of one lookup + hit, after the replay
    scan_kept: float = 0.0  # share of the bytes cached when the scan began still cached after it

    def finish(self) -> Outcome:
        self.object_hit_ratio = self.hits / self.requests
        self.byte_hit_ratio = self.hit_bytes / self.requested_bytes
        self.events_per_s = self.requests / self.seconds if self.seconds else 0.0
        return self


def replay_policy(name: str, trace: Trace, capacity_bytes: int, cache_percent: float) -> Outcome:
    """Drive a policy as the edge does, with a set standing in for the tier's storage."""
    policy = make_policy(name, capacity_bytes)
    keys, sizes = trace.keys, trace.sizes
    hit, insert = policy.hit, policy.insert
    tier: set[str] = set()
    store, delete = tier.add, tier.discard
    size_by_key = dict(zip(keys, sizes, strict=True))
    hits = hit_bytes = requested_bytes = evictions = 0
    seconds = 0.0
    # Replayed in three parts — before, during and after the scan — so that what the cache
    # held when the scan began can be compared with what it holds when the scan ends.
    scan_start = (len(trace.requests) - trace.n_scan) // 2
    scan_end = scan_start + trace.n_scan
    before_scan: set[str] = set()
    scan_kept = 1.0
    for start, stop in ((0, scan_start), (scan_start, scan_end), (scan_end, len(trace.requests))):
        if start == scan_start:
            before_scan = set(policy.keys())
        elif start == scan_end and before_scan:
            kept = before_scan.intersection(policy.keys())
            scan_kept = sum(size_by_key[key] for key in kept) / sum(
                size_by_key[key] for key in before_scan
            )
        started = time.process_time()
        for object_id in trace.requests[start:stop]:
            key = keys[object_id]
            size_bytes = sizes[object_id]
            requested_bytes += size_bytes
            if key in policy:
                hit(key)
                hits += 1
                hit_bytes += size_bytes
            else:
                store(key)  # the fetched body is written, then the policy says what to drop
                for dropped in insert(key, size_bytes):
                    delete(dropped)
                    evictions += 1
        seconds += time.process_time() - started
    # Invariants after the run, as Caffeine's simulator checks them.
    present = list(policy.keys())
    if tier != set(present) or len(present) != len(tier) or len(policy) != len(tier):
        raise AssertionError(f"{name}: the tier and the policy disagree about what is stored")
    stored_bytes = sum(size_by_key[key] for key in present)
    if not policy.used_bytes == stored_bytes <= capacity_bytes:
        raise AssertionError(f"{name}: used_bytes {policy.used_bytes} != {stored_bytes}")
    if isinstance(policy, SizeBookedPolicy):
        policy.check_invariants()
    outcome = Outcome(
        trace.alpha,
        cache_percent,
        capacity_bytes,
        name,
        len(trace.requests),
        hits,
        hit_bytes,
        requested_bytes,
        evictions,
        seconds,
    ).finish()
    outcome.scan_kept = scan_kept
    outcome.hit_ns = time_hits(policy, [keys[object_id] for object_id in trace.requests])
    return outcome


def time_hits(policy: EvictionPolicy, requested_keys: list[str]) -> float:
    """CPU nanoseconds of ``key in policy`` + ``hit(key)`` for present keys, best of three."""
    present = [key for key in requested_keys[-HIT_TIMING_REQUESTS:] if key in policy]
    if not present:
        return 0.0
    hit = policy.hit
    best = math.inf
    for _ in range(3):
        started = time.process_time()
        for key in present:
            if key in policy:
                hit(key)
        best = min(best, time.process_time() - started)
    return best / len(present) * 1e9


def replay_belady(trace: Trace, capacity_bytes: int, cache_percent: float) -> Outcome:
    """Size-aware Belady: evict furthest next use until the new object fits (or bypass it)."""
    requests, sizes = trace.requests, trace.sizes
    never = len(requests)
    started = time.perf_counter()
    next_use = [never] * len(requests)
    upcoming = [never] * len(sizes)
    for index in range(len(requests) - 1, -1, -1):
        object_id = requests[index]
        next_use[index] = upcoming[object_id]
        upcoming[object_id] = index

    cached: dict[int, int] = {}  # object id -> index of its next request
    heap: list[tuple[int, int]] = []  # (-next use, object id); stale entries skipped lazily
    used_bytes = hits = hit_bytes = requested_bytes = evictions = 0
    for index, object_id in enumerate(requests):
        size_bytes = sizes[object_id]
        requested_bytes += size_bytes
        upcoming_index = next_use[index]
        if object_id in cached:
            hits += 1
            hit_bytes += size_bytes
            if upcoming_index == never:
                del cached[object_id]
                used_bytes -= size_bytes
            else:
                cached[object_id] = upcoming_index
                heapq.heappush(heap, (-upcoming_index, object_id))
            continue
        if upcoming_index == never or size_bytes > capacity_bytes:
            continue
        while used_bytes + size_bytes > capacity_bytes:
            negated, victim = heap[0]
            if cached.get(victim) != -negated:
                heapq.heappop(heap)
                continue
            if -negated < upcoming_index:
                break  # every cached object is wanted sooner than the new one: bypass it
            heapq.heappop(heap)
            del cached[victim]
            used_bytes -= sizes[victim]
            evictions += 1
        if used_bytes + size_bytes <= capacity_bytes:
            cached[object_id] = upcoming_index
            used_bytes += size_bytes
            heapq.heappush(heap, (-upcoming_index, object_id))
        if len(heap) > 4 * len(cached) + 4096:
            heap = [(-upcoming, cached_id) for cached_id, upcoming in cached.items()]
            heapq.heapify(heap)
    seconds = time.perf_counter() - started
    return Outcome(
        trace.alpha,
        cache_percent,
        capacity_bytes,
        "belady",
        len(requests),
        hits,
        hit_bytes,
        requested_bytes,
        evictions,
        seconds,
    ).finish()


def replay_oracle(trace: Trace, capacity_bytes: int, cache_percent: float) -> Outcome:
    """Static top-k: the most requested objects that fit, greedily by count; first use misses."""
    requests, sizes = trace.requests, trace.sizes
    started = time.perf_counter()
    counts = [0] * len(sizes)
    for object_id in requests:
        counts[object_id] += 1
    ranked = sorted(
        (object_id for object_id, count in enumerate(counts) if count > 1),
        key=lambda object_id: (-counts[object_id], sizes[object_id]),
    )
    used_bytes = hits = hit_bytes = 0
    for object_id in ranked:
        size_bytes = sizes[object_id]
        if used_bytes + size_bytes <= capacity_bytes:
            used_bytes += size_bytes
            hits += counts[object_id] - 1
            hit_bytes += (counts[object_id] - 1) * size_bytes
    seconds = time.perf_counter() - started
    requested_bytes = sum(sizes[object_id] for object_id in requests)
    return Outcome(
        trace.alpha,
        cache_percent,
        capacity_bytes,
        "oracle",
        len(requests),
        hits,
        hit_bytes,
        requested_bytes,
        0,
        seconds,
    ).finish()


# ---- the run ---------------------------------------------------------------------------------


def parse_floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="Zipf requests")
    parser.add_argument("--objects", type=int, default=100_000, help="catalogue objects")
    parser.add_argument(
        "--scan", type=int, default=None, help="one-off scan objects (default: 2x --objects)"
    )
    parser.add_argument("--alphas", type=parse_floats, default=[0.8, 1.0], help="e.g. 0.8,1.0")
    parser.add_argument(
        "--sizes", type=parse_floats, default=[1, 5, 10], help="cache sizes, %% of catalogue bytes"
    )
    parser.add_argument(
        "--policies",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(POLICY_NAMES),
        help=f"online policies (default: {','.join(POLICY_NAMES)})",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.scan is None:
        args.scan = 2 * args.objects
    unknown = sorted(set(args.policies) - set(POLICY_NAMES))
    if unknown:
        parser.error(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}")
    return args


def print_point(outcomes: list[Outcome]) -> None:
    first = outcomes[0]
    print(
        f"\nalpha={first.alpha}  cache={first.cache_percent:g}% of catalogue "
        f"= {first.capacity_bytes / 1e6:,.1f} MB"
    )
    print(
        f"  {'policy':<10} {'obj hit':>8} {'byte hit':>9} {'obj/orc':>8} {'byte/orc':>9} "
        f"{'obj/bel':>8} {'scan kept':>9} {'events/s':>10} {'hit ns':>7}  goal"
    )
    for outcome in outcomes:
        online = outcome.policy not in {"belady", "oracle"}
        goal = ""
        if online:
            goal = "ok" if outcome.object_vs_oracle >= GOAL_VS_ORACLE else "MISS"
        speed = (
            f"{outcome.scan_kept:>9.3f} {outcome.events_per_s:>10,.0f} {outcome.hit_ns:>7,.0f}"
            if online
            else f"{'-':>9} {'-':>10} {'-':>7}"
        )
        print(
            f"  {outcome.policy:<10} {outcome.object_hit_ratio:>8.4f} "
            f"{outcome.byte_hit_ratio:>9.4f} {outcome.object_vs_oracle:>8.3f} "
            f"{outcome.byte_vs_oracle:>9.3f} {outcome.object_vs_belady:>8.3f} {speed}  {goal}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.perf_counter()
    outcomes: list[Outcome] = []
    trace_info = []
    for alpha in args.alphas:
        started = time.perf_counter()
        trace = make_trace(alpha, args.objects, args.requests, args.scan, args.seed)
        trace_info.append(
            {
                "alpha": alpha,
                "requests": len(trace.requests),
                "catalogue_bytes": trace.catalogue_bytes,
                "mean_object_bytes": trace.catalogue_bytes / trace.n_objects,
                "generate_s": round(time.perf_counter() - started, 3),
            }
        )
        print(
            f"trace alpha={alpha}: {len(trace.requests):,} requests "
            f"({args.requests:,} Zipf + {args.scan:,} scan), catalogue {trace.n_objects:,} "
            f"objects = {trace.catalogue_bytes / 1e9:.2f} GB, mean "
            f"{trace.catalogue_bytes / trace.n_objects / 1e3:.1f} KB",
            flush=True,
        )
        for percent in args.sizes:
            capacity_bytes = int(trace.catalogue_bytes * percent / 100)
            point = [replay_oracle(trace, capacity_bytes, percent)]
            point.append(replay_belady(trace, capacity_bytes, percent))
            point.extend(
                replay_policy(name, trace, capacity_bytes, percent) for name in args.policies
            )
            oracle, belady = point[0], point[1]
            for outcome in point:
                outcome.object_vs_oracle = outcome.object_hit_ratio / oracle.object_hit_ratio
                outcome.byte_vs_oracle = outcome.byte_hit_ratio / oracle.byte_hit_ratio
                outcome.object_vs_belady = outcome.object_hit_ratio / belady.object_hit_ratio
            print_point(point)
            sys.stdout.flush()
            outcomes.extend(point)

    wall_s = time.perf_counter() - run_started
    speeds = {
        name: statistics.median(o.events_per_s for o in outcomes if o.policy == name)
        for name in args.policies
    }
    hit_costs = {
        name: statistics.median(o.hit_ns for o in outcomes if o.policy == name)
        for name in args.policies
    }
    goal_summary = {}
    print(f"\nper policy, over all points (goal: object hit ratio >= {GOAL_VS_ORACLE}x oracle):")
    for name in args.policies:
        mine = [o for o in outcomes if o.policy == name]
        met = sum(o.object_vs_oracle >= GOAL_VS_ORACLE for o in mine)
        worst = min(mine, key=lambda o: o.object_vs_oracle)
        goal_summary[name] = {
            "points_meeting_goal": met,
            "points": len(mine),
            "worst_object_vs_oracle": round(worst.object_vs_oracle, 4),
            "worst_at": {"alpha": worst.alpha, "cache_percent": worst.cache_percent},
        }
        print(
            f"  {name:<10} goal met at {met}/{len(mine)} points; "
            f"worst {worst.object_vs_oracle:.3f}x (alpha {worst.alpha}, {worst.cache_percent:g}%); "
            f"median {speeds[name]:,.0f} events/s, {hit_costs[name]:,.0f} ns per hit (CPU time)"
        )
    print(f"wall time: {wall_s:.1f} s")
    report = {
        "config": {
            "requests": args.requests,
            "objects": args.objects,
            "scan": args.scan,
            "alphas": args.alphas,
            "cache_percents": args.sizes,
            "policies": args.policies,
            "seed": args.seed,
            "size_distribution": (
                f"lognormal(median={MEDIAN_OBJECT_BYTES} B, sigma={SIZE_SIGMA}) clipped to "
                f"[{MIN_OBJECT_BYTES}, {MAX_OBJECT_BYTES}] B"
            ),
            "goal_object_hit_ratio_vs_oracle": GOAL_VS_ORACLE,
        },
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "traces": trace_info,
        "median_events_per_s": speeds,
        "median_hit_ns": hit_costs,
        "goal": goal_summary,
        "wall_s": round(wall_s, 1),
        "results": [asdict(outcome) for outcome in outcomes],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
