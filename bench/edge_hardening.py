#!/usr/bin/env python3
"""Edge hardening under attack and overload (issue 11's measures), each against a peer run in
the same session:

1. **Hit throughput, this tree against a baseline commit** (``--baseline``, default the commit
   before the door and admission control): ``wrk -t1 -c32`` at 4 KiB and 1 MiB, rounds
   interleaved, medians. Goal: within 3 %.
2. **Slowloris**: normal load (``wrk -c32`` on a 4 KiB hit) with and without 1,000 slowloris
   connections (one header byte every 2 s, reopened as soon as the edge closes one; each from
   its own 127.x address, as a botnet's are; then all from one address), rounds
   interleaved. Goal: p99 with the attack ≤ 1.2x without. Also reports how many attack
   connections the edge held at the end of each run, and the baseline edge's numbers under
   the same attack.
3. **Uncacheable URLs**: 100,000 distinct URLs the origin answers 404 (uncacheable), through
   one edge; RSS growth. Goal: ≤ 32 MiB.
4. **Overload**: distinct cold URLs from an origin that takes 200 ms each (every request a
   miss), at 64 and at 1,024 connections: the edge's upstream-waiting limit (256) sheds the
   excess with 503 + Retry-After. Reports req/s, shed share, p99 of all answers, RSS.

    .venv/bin/python bench/edge_hardening.py [--rounds 3] [--duration 10] [--baseline REV]

Servers on CPU 1, wrk and the attacker on CPU 0. Writes ``bench/results/edge_hardening.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchlib import free_port, stop, wait_for_http
from edge_hits import (
    CLIENT_CPU,
    OBJ_PATH,
    RESULTS,
    ROOT,
    SEG_PATH,
    SERVER_CPU,
    Server,
    _clean_env,
    fetch,
    is_hit,
    pin,
    raise_nofile,
    rss_kib,
    run_origin,
    run_wrk,
    wait_for_quiet,
    write_bodies,
)

DEFAULT_BASELINE = "d669906"
ATTACK_CONNECTIONS = 1000

ATTACKER = r"""
import asyncio, sys, json
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
spread = sys.argv[4] == "spread"  # each connection from its own 127.x address (a botnet)
HEAD = b"GET /obj4k.json HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 4000
stats = {"opened": 0, "closed_by_edge": 0, "refused": 0}
open_now = 0

async def one(stop, number):
    global open_now
    local = (f"127.0.{number // 250 + 1}.{number % 250 + 1}", 0) if spread else None
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        except OSError:
            stats["refused"] += 1
            await asyncio.sleep(0.5)
            continue
        stats["opened"] += 1
        open_now += 1
        try:
            for byte in HEAD:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 2.0) == b"":
                        stats["closed_by_edge"] += 1
                        break
                except asyncio.TimeoutError:
                    pass
                if stop.is_set():
                    break
        except OSError:
            stats["closed_by_edge"] += 1
        finally:
            open_now -= 1
            writer.close()

async def main():
    stop = asyncio.Event()
    tasks = [asyncio.create_task(one(stop, number)) for number in range(count)]
    await asyncio.sleep(seconds)
    stats["open_at_end"] = open_now
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats), flush=True)

asyncio.run(main())
"""

RANDOM_PATHS = """
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", string.format("%s%d-%d", prefix, math.random(1, 1000000000), counter))
end
"""


def lua(work: Path, name: str, prefix: str) -> Path:
    path = work / f"{name}.lua"
    path.write_text(f'prefix = "{prefix}"\n' + RANDOM_PATHS)
    return path


@contextmanager
def edge(work: Path, upstream: str, *, source: Path, tag: str) -> Iterator[Server]:
    """``kshipra edge`` from *source* (a checkout: this tree or the baseline's worktree)."""
    port = free_port()
    log = work / f"{tag}.log"
    argv = [*pin(SERVER_CPU), sys.executable, "-m", "kshipra", "edge", "--upstream", upstream]
    argv += ["--listen", f"127.0.0.1:{port}", "--disk-dir", str(work / f"{tag}-disk")]
    argv += ["--memory-bytes", "256MiB", "--name", "bench-edge", "--proxy-prefix", "/"]
    env = {**_clean_env(), "PYTHONPATH": str(source)}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=source)
    server = Server(tag, process, f"http://127.0.0.1:{port}", port, log)
    try:
        wait_for_http(server.base_url + "/healthz", process)
        yield server
    finally:
        stop(process)


def warm(server: Server, path: str) -> None:
    for _ in range(3):
        fetched = fetch(server.base_url + path)
    if not is_hit(server, fetched):
        raise RuntimeError(f"{server.name}: {path} is not a hit after warming")


def baseline_tree(work: Path, rev: str) -> Path:
    tree = work / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    return tree


def wrk(server: Server, path: str, duration: int, connections: int, **kw: Any) -> dict[str, Any]:
    result = run_wrk(
        server.base_url + path,
        server,
        duration_s=duration,
        connections=connections,
        cpu=CLIENT_CPU,
        **kw,
    )
    return {**result.__dict__, "rss_kib": server.rss_kib()}


def hits(work: Path, origin: Server, base: Path, rounds: int, duration: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[float]]] = {"4KiB": {}, "1MiB": {}}
    with (
        edge(work, origin.base_url, source=ROOT, tag="current") as current,
        edge(work, origin.base_url, source=base, tag="baseline") as old,
    ):
        for server in (current, old):
            warm(server, OBJ_PATH)
            warm(server, SEG_PATH)
        for number in range(rounds):
            order = (current, old) if number % 2 == 0 else (old, current)
            for size, path in (("4KiB", OBJ_PATH), ("1MiB", SEG_PATH)):
                for server in order:
                    result = wrk(server, path, duration, 32)
                    runs[size].setdefault(server.name, []).append(result["requests_per_s"])
    summary = {}
    for size, by_server in runs.items():
        ratio = statistics.median(by_server["current"]) / statistics.median(by_server["baseline"])
        summary[size] = {"runs": by_server, "current/baseline": round(ratio, 3)}
        print(
            f"hits {size}: current {statistics.median(by_server['current']):,.0f} req/s, "
            f"baseline {statistics.median(by_server['baseline']):,.0f} req/s, ratio {ratio:.3f}",
            flush=True,
        )
    return summary


def attacked(
    server: Server, duration: int, *, spread: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    argv = [*pin(CLIENT_CPU), sys.executable, "-c", ATTACKER, str(server.port)]
    argv += [str(ATTACK_CONNECTIONS), str(duration + 6), "spread" if spread else "one"]
    attacker = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(4)  # the attack's connections open and start dripping before measuring
        result = wrk(server, OBJ_PATH, duration, 32)
        out, _ = attacker.communicate(timeout=duration + 60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
    return result, json.loads(out.strip().splitlines()[-1])


def slowloris(work: Path, origin: Server, base: Path, rounds: int, duration: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {
        "quiet": [],
        "attack": [],
        "baseline-attack": [],
        "attack-one-address": [],
    }
    with (
        edge(work, origin.base_url, source=ROOT, tag="current") as current,
        edge(work, origin.base_url, source=base, tag="baseline") as old,
    ):
        warm(current, OBJ_PATH)
        warm(old, OBJ_PATH)
        for _ in range(rounds):
            runs["quiet"].append(wrk(current, OBJ_PATH, duration, 32))
            result, stats = attacked(current, duration)
            runs["attack"].append({**result, "attacker": stats})
            result, stats = attacked(old, duration)
            runs["baseline-attack"].append({**result, "attacker": stats})
            # All 1,000 from one address: past connections_per_client (256) each is refused
            # with 429 at once, and this attacker reconnects at once, as fast as it can.
            result, stats = attacked(current, duration, spread=False)
            runs["attack-one-address"].append({**result, "attacker": stats})
    p99 = {name: statistics.median(r["latency_p99_ms"] for r in rs) for name, rs in runs.items()}
    rps = {name: statistics.median(r["requests_per_s"] for r in rs) for name, rs in runs.items()}
    held = {
        name: statistics.median(r["attacker"]["open_at_end"] for r in rs)
        for name, rs in runs.items()
        if name != "quiet"
    }
    ratio = p99["attack"] / p99["quiet"]
    print(
        f"slowloris: p99 quiet {p99['quiet']:.2f} ms, attacked {p99['attack']:.2f} ms "
        f"(ratio {ratio:.2f}); req/s {rps['quiet']:,.0f} vs {rps['attack']:,.0f}; attack "
        f"connections held at the end: {held['attack']:.0f} (baseline edge "
        f"{held['baseline-attack']:.0f}, its p99 {p99['baseline-attack']:.2f} ms); from one "
        f"address: p99 {p99['attack-one-address']:.2f} ms, req/s "
        f"{rps['attack-one-address']:,.0f}",
        flush=True,
    )
    return {"runs": runs, "p99_ms": p99, "rps": rps, "held": held, "p99_ratio": round(ratio, 2)}


def uncacheable(work: Path, origin: Server, base: Path, target: int) -> dict[str, Any]:
    out = {}
    for tag, source in (("current", ROOT), ("baseline", base)):
        with edge(work, origin.base_url, source=source, tag=f"{tag}-404") as server:
            fetch(server.base_url + "/nope/warm")
            time.sleep(1)
            before = rss_kib(server.process.pid)
            done = 0
            script = lua(work, "nope", "/nope/")
            while done < target:
                result = run_wrk(
                    server.base_url + "/",
                    server,
                    duration_s=10,
                    connections=32,
                    cpu=CLIENT_CPU,
                    headers=(),
                    script=str(script),
                )
                done += result.requests
            after = rss_kib(server.process.pid)
        growth = (after - before) / 1024
        per_100k = growth * 100_000 / done
        out[tag] = {
            "urls": done,
            "rss_before_mib": before / 1024,
            "rss_after_mib": after / 1024,
            "growth_mib": round(growth, 1),
            "growth_per_100k_mib": round(per_100k, 1),
        }
        print(
            f"uncacheable ({tag}): {done:,} distinct URLs, RSS {before / 1024:.0f} → "
            f"{after / 1024:.0f} MiB ({per_100k:.1f} MiB per 100k)",
            flush=True,
        )
    return out


def overload(work: Path, origin: Server, base: Path, rounds: int, duration: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    with (
        edge(work, origin.base_url, source=ROOT, tag="current") as current,
        edge(work, origin.base_url, source=base, tag="baseline") as old,
    ):
        script = lua(work, "slow", "/slow/")
        for number in range(rounds):
            order = (current, old) if number % 2 == 0 else (old, current)
            for connections in (64, 1024):
                for server in order:
                    before = server.rss_kib()
                    result = run_wrk(
                        server.base_url + "/",
                        server,
                        duration_s=duration,
                        connections=connections,
                        cpu=CLIENT_CPU,
                        script=str(script),
                    )
                    runs.setdefault(f"{server.name} c={connections}", []).append(
                        {
                            **result.__dict__,
                            "shed_share": round(result.non_2xx / max(1, result.requests), 3),
                            "rss_before_kib": before,
                            "rss_kib": server.rss_kib(),
                        }
                    )
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "rps": round(statistics.median(r["requests_per_s"] for r in rs)),
            "ok_per_s": round(
                statistics.median((r["requests"] - r["non_2xx"]) / r["duration_s"] for r in rs)
            ),
            "shed_share": statistics.median(r["shed_share"] for r in rs),
            "p50_ms": statistics.median(r["latency_p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["latency_p99_ms"] for r in rs),
            "rss_mib": round(statistics.median(r["rss_kib"] for r in rs) / 1024, 1),
            "socket_errors": [r["socket_errors"] for r in rs],
        }
        print(f"overload {name}: {summary[name]}", flush=True)
    return {"runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--only", choices=["hits", "slowloris", "uncacheable", "overload"])
    args = parser.parse_args()
    raise_nofile()
    quiet = wait_for_quiet("edge_hardening")
    results: dict[str, Any] = {"machine": quiet, "baseline": args.baseline}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kshipra-harden-")))
        bodies = work / "bodies"
        bodies.mkdir()
        write_bodies(bodies)
        base = baseline_tree(work, args.baseline)
        stack.callback(
            subprocess.run,
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
            check=False,
        )
        origin = stack.enter_context(run_origin(work, bodies, CLIENT_CPU, delay_s=0.2))
        parts = [args.only] if args.only else ["hits", "slowloris", "uncacheable", "overload"]
        for part in parts:
            if part == "hits":
                results["hits"] = hits(work, origin, base, args.rounds, args.duration)
            elif part == "slowloris":
                results["slowloris"] = slowloris(work, origin, base, args.rounds, args.duration)
            elif part == "uncacheable":
                results["uncacheable"] = uncacheable(work, origin, base, args.urls)
            else:
                results["overload"] = overload(work, origin, base, args.rounds, args.duration)
    results["loadavg_end"] = [round(value, 2) for value in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge_hardening.json").write_text(json.dumps(results, indent=2))
    print(f"load average at the end: {results['loadavg_end']}")


if __name__ == "__main__":
    main()
