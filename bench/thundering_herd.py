#!/usr/bin/env python3
"""Thundering herd: 1,000 concurrent requests for one cold object, through the kshipra edge
and through nginx proxy_cache, in the same run.

The origin (the tiny aiohttp server of ``edge_hits.py``) answers any ``…/slow/…`` path after
~200 ms with a 4 KiB JSON body (``Cache-Control: public, max-age=3600``), so requests pile up
while the first fetch is in flight, and it counts requests per path (``/_count``). The script
opens ``--connections`` keep-alive connections to the server first (not timed), then writes
one ``GET`` for the same cold URL on every connection in one tight loop and times each
answer from that moment. It reports how many requests reached the origin for that URL (goal:
1), the time to the first and the last answer, the median, errors, and the cache states the
server reported.

Servers: ``kshipra edge`` (request collapsing), nginx with ``proxy_cache_lock on`` (the fair
comparison) and nginx without the lock; each pinned to CPU 1, the client (this process, on
uvloop) and the origin to CPU 0. Each round uses a fresh URL per server. Writes
``bench/results/thundering_herd.json``.

    .venv/bin/python bench/thundering_herd.py [--connections 1000] [--rounds 3] [--delay-ms 200]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from edge_hits import (
    CLIENT_CPU,
    OBJ_PATH,
    RESULTS,
    SERVER_CPU,
    RawResponse,
    Server,
    check_tools,
    fetch,
    finish_versions,
    http_get,
    machine,
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

CONNECT_CONCURRENCY = 200
REQUEST_TIMEOUT_S = 60.0


@dataclass
class HerdResult:
    server: str
    round: int
    path: str
    requests: int
    answered_200: int
    errors: int
    error_samples: list[str]
    origin_fetches: int
    first_answer_ms: float | None
    median_answer_ms: float | None
    p99_answer_ms: float | None
    last_answer_ms: float | None
    send_loop_ms: float
    connect_s: float
    cache_states: dict[str, int]
    server_cpu_s: float
    collapsed_waits: float | None


def _state(server: Server, response: RawResponse) -> str:
    if server.name == "nginx":
        return response.headers.get("x-cache", "-")
    status = response.headers.get("cache-status", "-")
    return re.sub(r";\s*ttl=\d+", "", status.removeprefix("bench-edge; "))


def _metric(server: Server, name: str) -> float | None:
    if server.name != "kshipra":
        return None
    text = fetch(server.base_url + "/metrics").body.decode()
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match[1]) if match else None


async def _herd(server: Server, path: str, count: int, body: bytes) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with semaphore:
            return await asyncio.open_connection("127.0.0.1", server.port)

    connect_started = time.monotonic()
    opened = await asyncio.gather(*(connect() for _ in range(count)), return_exceptions=True)
    connect_s = time.monotonic() - connect_started
    connections = [item for item in opened if not isinstance(item, BaseException)]
    errors = [repr(item) for item in opened if isinstance(item, BaseException)]
    request = http_get(path, server.port)
    started = time.monotonic()

    async def answer(reader: asyncio.StreamReader) -> tuple[float, RawResponse]:
        response = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
        return (time.monotonic() - started) * 1000, response

    for _reader, writer in connections:
        writer.write(request)
    send_loop_ms = (time.monotonic() - started) * 1000
    answers = await asyncio.gather(
        *(answer(reader) for reader, _ in connections), return_exceptions=True
    )
    for _reader, writer in connections:
        writer.close()
    times: list[float] = []
    states: collections.Counter[str] = collections.Counter()
    for item in answers:
        if isinstance(item, BaseException):
            errors.append(repr(item))
            continue
        elapsed, response = item
        states[_state(server, response)] += 1
        if response.status != 200:
            errors.append(f"status {response.status}")
        elif response.body != body:
            errors.append(f"wrong body ({len(response.body)} bytes)")
        else:
            times.append(elapsed)
    times.sort()
    return {
        "times": times,
        "errors": errors,
        "states": dict(states),
        "send_loop_ms": send_loop_ms,
        "connect_s": connect_s,
    }


def one_round(
    server: Server,
    label: str,
    origin: Server,
    prefix: str,
    round_number: int,
    *,
    connections: int,
    body: bytes,
) -> HerdResult:
    path = f"{prefix}/slow/herd-{label}-{round_number}-{secrets.token_hex(4)}.json"
    cpu_before = server.cpu_s()
    collapsed_before = _metric(server, "kshipra_edge_collapsed_waits")
    outcome = uvloop.run(_herd(server, path, connections, body))
    server_cpu = server.cpu_s() - cpu_before
    collapsed_after = _metric(server, "kshipra_edge_collapsed_waits")
    time.sleep(0.2)  # let stragglers (nginx without the lock) reach the origin
    times: list[float] = outcome["times"]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return HerdResult(
        server=label,
        round=round_number,
        path=path,
        requests=connections,
        answered_200=len(times),
        errors=len(outcome["errors"]),
        error_samples=sorted(set(outcome["errors"]))[:5],
        origin_fetches=origin_counts(origin).get(path, 0),
        first_answer_ms=ms(times[0] if times else None),
        median_answer_ms=ms(statistics.median(times) if times else None),
        p99_answer_ms=ms(times[min(len(times) - 1, int(0.99 * len(times)))] if times else None),
        last_answer_ms=ms(times[-1] if times else None),
        send_loop_ms=round(outcome["send_loop_ms"], 1),
        connect_s=round(outcome["connect_s"], 2),
        cache_states=outcome["states"],
        server_cpu_s=round(server_cpu, 2),
        collapsed_waits=(
            None
            if collapsed_before is None or collapsed_after is None
            else collapsed_after - collapsed_before
        ),
    )


def print_table(results: list[HerdResult]) -> None:
    header = (
        f"{'server':<16} {'round':>5} {'origin fetches':>14} {'first ms':>9} {'median ms':>9} "
        f"{'p99 ms':>8} {'last ms':>8} {'errors':>6} {'srv CPU s':>9}  cache states"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        states = ", ".join(f"{k}: {v}" for k, v in sorted(r.cache_states.items()))
        print(
            f"{r.server:<16} {r.round:>5} {r.origin_fetches:>14} {r.first_answer_ms or 0:>9.1f} "
            f"{r.median_answer_ms or 0:>9.1f} {r.p99_answer_ms or 0:>8.1f} "
            f"{r.last_answer_ms or 0:>8.1f} {r.errors:>6} {r.server_cpu_s:>9.2f}  {states}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="concurrent requests")
    parser.add_argument("--rounds", type=int, default=3, help="fresh cold URLs per server [3]")
    parser.add_argument("--delay-ms", type=float, default=200, help="origin delay [200]")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    parser.add_argument("--skip-nolock", action="store_true", help="skip nginx without the lock")
    parser.add_argument("--max-wait", type=float, default=600, help="quiet-machine wait cap, s")
    parser.add_argument("--output", type=Path, default=RESULTS / "thundering_herd.json")
    args = parser.parse_args()
    check_tools(parser, ("nginx", "taskset"))
    server_cpu = None if args.no_pin or (os.cpu_count() or 1) < 2 else SERVER_CPU
    client_cpu = None if server_cpu is None else CLIENT_CPU
    nofile = raise_nofile()
    if nofile[0] < args.connections + 100:
        parser.error(f"RLIMIT_NOFILE is {nofile[0]}: too low for {args.connections} connections")

    report: dict[str, Any] = {
        "benchmark": "thundering_herd",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "connections": args.connections,
            "rounds": args.rounds,
            "origin_delay_ms": args.delay_ms,
            "server_cpu": server_cpu,
            "client_and_origin_cpu": client_cpu,
            "rlimit_nofile": list(nofile),
            "client": "this process on uvloop: connections opened first (untimed), then one "
            "GET per connection written in one loop; times from the start of that loop",
            "nginx": "master + 1 worker, proxy_cache, proxy_cache_lock on (lock_timeout 30s) "
            "under /, off under /nolock/; worker_connections 8192, worker_rlimit_nofile 16384",
        },
        "machine": machine(),
        "quiet_gates": [],
    }
    results: list[HerdResult] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kshipra-herdbench-")))
        bodies = write_bodies(work / "bodies")
        report["quiet_gates"].append(wait_for_quiet("start", max_wait_s=args.max_wait))
        report["versions"] = tool_versions()  # after the wait: the code that is measured
        origin = stack.enter_context(
            run_origin(work, work / "bodies", client_cpu, delay_s=args.delay_ms / 1000)
        )
        edge = stack.enter_context(run_edge(work, origin.base_url, server_cpu))
        nginx = stack.enter_context(run_nginx(work, origin.port, server_cpu))
        pin_self(client_cpu)
        targets: list[tuple[Server, str, str]] = [
            (edge, "kshipra", ""),
            (nginx, "nginx-lock", ""),
        ]
        if not args.skip_nolock:
            targets.append((nginx, "nginx-no-lock", "/nolock"))
        for round_number in range(1, args.rounds + 1):
            for server, label, prefix in targets:
                gate = wait_for_quiet(f"{label} round {round_number}", need_low_load=False)
                report["quiet_gates"].append(gate)
                result = one_round(
                    server,
                    label,
                    origin,
                    prefix,
                    round_number,
                    connections=args.connections,
                    body=bodies[OBJ_PATH],
                )
                results.append(result)
                print(
                    f"  round {round_number} {label:<14} origin fetches {result.origin_fetches:>4}"
                    f", last answer {result.last_answer_ms} ms, errors {result.errors}",
                    flush=True,
                )
        report["edge_log_tail"] = edge.log.read_text(errors="replace")[-2000:]
        report["nginx_error_log_tail"] = (work / "nginx-error.log").read_text(errors="replace")[
            -2000:
        ]

    report["runs"] = [asdict(r) for r in results]
    summary: dict[str, Any] = {}
    for label in dict.fromkeys(r.server for r in results):
        mine = [r for r in results if r.server == label]
        lasts = [r.last_answer_ms for r in mine if r.last_answer_ms is not None]
        firsts = [r.first_answer_ms for r in mine if r.first_answer_ms is not None]
        summary[label] = {
            "origin_fetches_per_round": [r.origin_fetches for r in mine],
            "errors_total": sum(r.errors for r in mine),
            "median_first_answer_ms": round(statistics.median(firsts), 1) if firsts else None,
            "median_last_answer_ms": round(statistics.median(lasts), 1) if lasts else None,
            "goal_one_fetch_met": all(r.origin_fetches == 1 for r in mine),
        }
    report["summary"] = summary
    print_table(results)
    print()
    for label, item in summary.items():
        print(
            f"{label:<14} origin fetches per round {item['origin_fetches_per_round']} "
            f"(goal 1: {'met' if item['goal_one_fetch_met'] else 'MISSED'}), median time to "
            f"first / last answer {item['median_first_answer_ms']} / "
            f"{item['median_last_answer_ms']} ms, errors {item['errors_total']}"
        )
    finish_versions(report)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
