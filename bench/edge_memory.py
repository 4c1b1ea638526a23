#!/usr/bin/env python3
"""Edge memory: index bytes per cached object, and RSS per idle keep-alive connection.

(a) **Per cached object.** Starts ``kshipra edge`` (one process, disk tier) in front of the
tiny origin of ``edge_hits.py``, warms it with a few hundred objects, reads its RSS
(``VmRSS``), fills it with ``--objects`` distinct small objects (``/obj/{i}.json``, 200-byte
JSON, ``Cache-Control: public, max-age=3600``) over ``--fill-concurrency`` keep-alive
connections (in two halves, reading it between them too), and reads the RSS again. Index +
metadata bytes per object = (RSS after - RSS before - bodies held in memory) / objects, where
the bodies held in memory are the memory tier's new entries x 200 bytes (from ``/metrics``);
the same between N/2 and N objects is the marginal cost, without one-time growth. It does
this twice, each time with a fresh edge: with ``--memory-bytes 256MiB`` (every object in the
memory tier *and* indexed by the disk tier) and with ``--memory-bytes 1MiB`` (bodies on disk
only: the disk tier's per-object index cost, plus a small memory tier).

(b) **Per idle connection.** With a fresh edge holding one 4 KiB object, opens
``--connections`` keep-alive connections, each sending one request for it and then staying
open, and reads the RSS before and while they are held (then after closing them); the same
for nginx (master + 1 worker + cache helpers, RSS summed) configured as in ``edge_hits.py``.
Reports KiB per connection.

Servers pinned to CPU 1, the client (this process, uvloop) and the origin to CPU 0. Writes
``bench/results/edge_memory.json``.

    .venv/bin/python bench/edge_memory.py [--objects 20000] [--connections 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import uvloop
from edge_hits import (
    CLIENT_CPU,
    OBJ_PATH,
    RESULTS,
    SERVER_CPU,
    SMALL_BODY_BYTES,
    Server,
    check_tools,
    fetch,
    finish_versions,
    http_get,
    machine,
    open_sockets,
    origin_counts,
    pin_self,
    raise_nofile,
    read_response,
    run_edge,
    run_nginx,
    run_origin,
    tool_versions,
    wait_for_quiet,
    write_bodies,
    write_report,
)

WARM_OBJECTS = 300
SETTLE_S = 1.5
CONNECT_CONCURRENCY = 200
MEMORY_CONFIGS = ("256MiB", "1MiB")


def edge_metrics(server: Server) -> dict[str, float]:
    text = fetch(server.base_url + "/metrics").body.decode()
    found: dict[str, float] = {}
    for name in (
        "kshipra_edge_memory_tier_entries",
        "kshipra_edge_memory_tier_bytes",
        "kshipra_edge_disk_tier_entries",
        "kshipra_edge_memory_evictions",
        "kshipra_edge_misses",
    ):
        match = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.MULTILINE)
        found[name] = float(match[1]) if match else float("nan")
    return found


# ---- (a) objects ---------------------------------------------------------------------------------


async def _fill(port: int, paths: Iterator[str], concurrency: int) -> dict[str, Any]:
    """GET every path once over *concurrency* keep-alive connections."""
    states: collections.Counter[str] = collections.Counter()
    errors: list[str] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for path in paths:  # one shared iterator: next() never yields to the loop
                try:
                    writer.write(http_get(path, port))
                    response = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    errors.append(f"{path}: {exc!r}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                status = response.headers.get("cache-status", "-")
                states[re.sub(r";\s*ttl=\d+", "", status.removeprefix("bench-edge; "))] += 1
                if response.status != 200 or len(response.body) != SMALL_BODY_BYTES:
                    errors.append(f"{path}: status {response.status}, {len(response.body)} B")
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "seconds": round(time.monotonic() - started, 2),
        "cache_states": dict(states),
        "errors": len(errors),
        "error_samples": errors[:5],
    }


def rss_anon_kib(pid: int) -> int:
    match = re.search(r"^RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match[1]) if match else 0


def objects_run(
    work: Path, origin: Server, cpu: int | None, memory: str, objects: int, concurrency: int
) -> dict[str, Any]:
    """Fill a fresh edge with *objects* objects in two halves, reading RSS and the tier
    counts before, between and after."""
    tag = f"edge-{memory.lower()}"
    half = objects // 2
    readings: list[dict[str, Any]] = []
    fills: list[dict[str, Any]] = []
    with run_edge(work, origin.base_url, cpu, memory=memory, tag=tag) as edge:
        warm = iter(f"/obj/warm-{tag}-{i}.json" for i in range(WARM_OBJECTS))
        uvloop.run(_fill(edge.port, warm, 8))
        for lo, hi in ((0, 0), (0, half), (half, objects)):
            if hi > lo:
                paths = iter(f"/obj/{tag}-{i}.json" for i in range(lo, hi))
                fills.append(uvloop.run(_fill(edge.port, paths, concurrency)))
            time.sleep(SETTLE_S)
            readings.append(
                {
                    "objects": hi,
                    "rss_kib": edge.rss_kib(),
                    "rss_anon_kib": rss_anon_kib(edge.process.pid),
                    **edge_metrics(edge),
                }
            )
        counts = origin_counts(origin)
    fetched = sum(n for path, n in counts.items() if path.startswith(f"/obj/{tag}-"))
    before, middle, after = readings

    def per_object(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
        count = last["objects"] - first["objects"]
        memory_new = (
            last["kshipra_edge_memory_tier_entries"] - first["kshipra_edge_memory_tier_entries"]
        )
        bodies = int(memory_new) * SMALL_BODY_BYTES
        delta = (last["rss_kib"] - first["rss_kib"]) * 1024
        return {
            "objects": count,
            "rss_delta_kib": last["rss_kib"] - first["rss_kib"],
            "rss_anon_delta_kib": last["rss_anon_kib"] - first["rss_anon_kib"],
            "memory_tier_new_entries": memory_new,
            "disk_tier_new_entries": last["kshipra_edge_disk_tier_entries"]
            - first["kshipra_edge_disk_tier_entries"],
            "body_bytes_in_memory": bodies,
            "index_bytes_per_object": round((delta - bodies) / count),
        }

    fill_s = sum(fill["seconds"] for fill in fills)
    return {
        "memory_bytes": memory,
        "objects": objects,
        "fills": fills,
        "fill_errors": sum(fill["errors"] for fill in fills),
        "fill_objects_per_s": round(objects / max(fill_s, 1e-3)),
        "origin_fetches": fetched,
        "readings": readings,
        "rss_before_kib": before["rss_kib"],
        "rss_after_kib": after["rss_kib"],
        "whole": per_object(before, after),
        "second_half": per_object(middle, after),
    }


# ---- (b) connections -----------------------------------------------------------------------------


async def _hold(server: Server, count: int, body: bytes) -> dict[str, Any]:
    """Open *count* connections, one request each, measure while they are held, close."""
    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)
    errors: list[str] = []

    async def open_one() -> asyncio.StreamWriter | None:
        async with semaphore:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(http_get(OBJ_PATH, server.port))
                response = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors.append(repr(exc))
                return None
            if response.status != 200 or response.body != body:
                errors.append(f"status {response.status}, {len(response.body)} B")
            return writer

    loop = asyncio.get_running_loop()
    rss_before = server.rss_kib()
    sockets_before = sum(open_sockets(pid) for pid in server.all_pids())
    started = time.monotonic()
    writers = [w for w in await asyncio.gather(*(open_one() for _ in range(count))) if w]
    opened_s = time.monotonic() - started
    await asyncio.sleep(SETTLE_S)
    rss_held = await loop.run_in_executor(None, server.rss_kib)
    sockets_held = sum(open_sockets(pid) for pid in server.all_pids())
    still_open = sum(1 for w in writers if not w.transport.is_closing())
    for writer in writers:
        writer.close()
    await asyncio.sleep(SETTLE_S)
    rss_closed = server.rss_kib()
    held = len(writers)
    return {
        "server": server.name,
        "connections_requested": count,
        "connections_held": held,
        "client_side_still_open": still_open,
        "server_sockets_before": sockets_before,
        "server_sockets_held": sockets_held,
        "open_seconds": round(opened_s, 2),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "rss_before_kib": rss_before,
        "rss_held_kib": rss_held,
        "rss_after_close_kib": rss_closed,
        "kib_per_connection": round((rss_held - rss_before) / max(held, 1), 2),
        "processes": len(server.all_pids()),
    }


def connections_run(server: Server, count: int, body: bytes) -> dict[str, Any]:
    for _ in range(3):  # warm: cached and a hit, code paths loaded
        fetch(server.base_url + OBJ_PATH)
    time.sleep(SETTLE_S)
    result: dict[str, Any] = uvloop.run(_hold(server, count, body))
    return result


# ---- output --------------------------------------------------------------------------------------


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def print_tables(objects: list[dict[str, Any]], conns: list[dict[str, Any]]) -> None:
    header = (
        f"{'--memory-bytes':>14} {'objects':>7} {'RSS before':>10} {'RSS after':>9} "
        f"{'delta':>6} {'mem-tier new':>12} {'disk new':>8} {'bodies in mem':>13} "
        f"{'index B/obj':>11} {'2nd half B/obj':>14} {'fill obj/s':>10}"
    )
    print("\n(a) per cached object (RSS in MiB)")
    print(header)
    print("-" * len(header))
    for r in objects:
        whole = r["whole"]
        print(
            f"{r['memory_bytes']:>14} {r['objects']:>7} {_mib(r['rss_before_kib']):>10} "
            f"{_mib(r['rss_after_kib']):>9} {_mib(whole['rss_delta_kib']):>6} "
            f"{whole['memory_tier_new_entries']:>12.0f} {whole['disk_tier_new_entries']:>8.0f} "
            f"{whole['body_bytes_in_memory']:>13} {whole['index_bytes_per_object']:>11} "
            f"{r['second_half']['index_bytes_per_object']:>14} {r['fill_objects_per_s']:>10}"
        )
    print(
        "(index B/obj = (RSS after - RSS before - bodies in memory) / objects; 2nd half: the "
        "same between N/2 and N objects, without one-time growth)"
    )
    header = (
        f"{'server':<8} {'held':>6} {'RSS before':>10} {'RSS held':>9} {'after close':>11} "
        f"{'KiB/conn':>8} {'server sockets':>14} {'open s':>6} {'errors':>6}"
    )
    print("\n(b) idle keep-alive connections (RSS in MiB; nginx: all its processes summed)")
    print(header)
    print("-" * len(header))
    for r in conns:
        print(
            f"{r['server']:<8} {r['connections_held']:>6} {_mib(r['rss_before_kib']):>10} "
            f"{_mib(r['rss_held_kib']):>9} {_mib(r['rss_after_close_kib']):>11} "
            f"{r['kib_per_connection']:>8.2f} {r['server_sockets_held']:>14} "
            f"{r['open_seconds']:>6.1f} {r['errors']:>6}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=20_000, help="objects to cache [20000]")
    parser.add_argument("--connections", type=int, default=5000, help="idle connections [5000]")
    parser.add_argument("--fill-concurrency", type=int, default=32, help="fill connections [32]")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    parser.add_argument("--max-wait", type=float, default=600, help="quiet-machine wait cap, s")
    parser.add_argument("--output", type=Path, default=RESULTS / "edge_memory.json")
    args = parser.parse_args()
    check_tools(parser, ("nginx", "taskset"))
    server_cpu = None if args.no_pin or (os.cpu_count() or 1) < 2 else SERVER_CPU
    client_cpu = None if server_cpu is None else CLIENT_CPU
    nofile = raise_nofile()
    if nofile[0] < args.connections + 200:
        parser.error(f"RLIMIT_NOFILE is {nofile[0]}: too low for {args.connections} connections")

    report: dict[str, Any] = {
        "benchmark": "edge_memory",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "objects": args.objects,
            "object_body_bytes": SMALL_BODY_BYTES,
            "fill_concurrency": args.fill_concurrency,
            "warm_objects": WARM_OBJECTS,
            "connections": args.connections,
            "memory_configs": list(MEMORY_CONFIGS),
            "server_cpu": server_cpu,
            "client_and_origin_cpu": client_cpu,
            "rlimit_nofile": list(nofile),
            "rss": "VmRSS from /proc/PID/status, read after a 1.5 s settle",
        },
        "machine": machine(),
        "quiet_gates": [],
    }
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kshipra-membench-")))
        bodies = write_bodies(work / "bodies")
        report["quiet_gates"].append(wait_for_quiet("start", max_wait_s=args.max_wait))
        report["versions"] = tool_versions()  # after the wait: the code that is measured
        origin = stack.enter_context(run_origin(work, work / "bodies", client_cpu))
        pin_self(client_cpu)
        objects = []
        for memory in MEMORY_CONFIGS:
            report["quiet_gates"].append(
                wait_for_quiet(f"objects {memory}", need_low_load=False, max_wait_s=120)
            )
            result = objects_run(
                work, origin, server_cpu, memory, args.objects, args.fill_concurrency
            )
            objects.append(result)
            print(
                f"  objects, --memory-bytes {memory}: RSS +{_mib(result['whole']['rss_delta_kib'])}"
                f" MiB, {result['whole']['index_bytes_per_object']} B/object beyond bodies "
                f"({result['fill_errors']} errors)",
                flush=True,
            )
        conns = []
        for name in ("kshipra", "nginx"):
            report["quiet_gates"].append(
                wait_for_quiet(f"connections {name}", need_low_load=False, max_wait_s=120)
            )
            with ExitStack() as inner:
                if name == "kshipra":
                    server = inner.enter_context(
                        run_edge(work, origin.base_url, server_cpu, tag="edge-conns")
                    )
                else:
                    server = inner.enter_context(run_nginx(work, origin.port, server_cpu))
                result = connections_run(server, args.connections, bodies[OBJ_PATH])
            conns.append(result)
            print(
                f"  connections, {name}: {result['connections_held']} held, "
                f"{result['kib_per_connection']:.2f} KiB/connection ({result['errors']} errors)",
                flush=True,
            )
    report["objects"] = objects
    report["connections"] = conns
    print_tables(objects, conns)
    by = {r["server"]: r for r in conns}
    if "kshipra" in by and "nginx" in by and by["nginx"]["kib_per_connection"] > 0:
        ratio = by["kshipra"]["kib_per_connection"] / by["nginx"]["kib_per_connection"]
        report["kib_per_connection_kshipra_over_nginx"] = round(ratio, 1)
        print(f"\nKiB per idle connection, kshipra/nginx: {ratio:.1f}x")
    finish_versions(report)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
