#!/usr/bin/env python3
"""Edge hit throughput and latency against nginx proxy_cache and a bare aiohttp server.

Starts a tiny aiohttp origin (``/obj4k.json``: 4 KiB JSON; ``/seg1m.m4s``: 1 MiB of
``video/mp4``; both ``Cache-Control: public, max-age=3600`` with an ``ETag``), then three
servers on the same machine, each pinned to CPU 1:

- ``kshipra edge`` in front of the origin (one process, memory tier 256 MiB, disk tier);
- Debian's nginx as an equivalent caching proxy (``worker_processes 1``, ``proxy_cache`` in a
  temp dir, freshness from the origin's Cache-Control, HTTP/1.1 upstream keep-alive,
  ``sendfile on``, ``access_log off``);
- a bare aiohttp server on uvloop returning the same bytes from memory with the same
  headers: the ceiling for Python.

Both caches are warmed (the second request must be a HIT), then ``wrk -t1 -c32 -d10s
--latency`` (pinned to CPU 0) runs against each server for each size with no
Accept-Encoding, plus one edge row at 4 KiB with ``Accept-Encoding: br`` (the edge's stored
Brotli variant) and, for both caches, a 4 KiB row revalidating with ``If-None-Match`` (a
``304`` from cache: what a phone sends when its own copy expires). Prints req/s, p50/p99,
MB/s and server CPU, the ratios kshipra/nginx and
kshipra/bare-aiohttp against the goals (>= 0.5x nginx at 4 KiB, >= 1.0x at 1 MiB), and, for a
missed goal, a py-spy profile of the edge under the same load. Writes
``bench/results/edge_hits.json``.

    .venv/bin/python bench/edge_hits.py [--duration 10] [--connections 32] [--no-profile]

This module also holds the helpers the other edge benchmarks import (``thundering_herd.py``,
``edge_memory.py``): the origin, edge, nginx and bare-aiohttp launchers, the quiet-machine
gate, wrk parsing and a raw HTTP/1.1 client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchlib import children_of, free_port, stop, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
KSHIPRA = VENV_BIN / "kshipra"
PY_SPY = VENV_BIN / "py-spy"
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU, CLIENT_CPU = 1, 0
OBJ_PATH, SEG_PATH = "/obj4k.json", "/seg1m.m4s"
SIZES = {"4KiB": (OBJ_PATH, 4 * 1024), "1MiB": (SEG_PATH, 1024 * 1024)}
GOALS = {"4KiB": 0.5, "1MiB": 1.0}
"""Minimum kshipra/nginx req/s ratio per size."""
EDGE_NAME = "bench-edge"
CACHE_CONTROL = "public, max-age=3600"
SMALL_BODY_BYTES = 200
LOAD_THRESHOLD = 1.0


# ---- bodies --------------------------------------------------------------------------------------

_WORD_LIST = (
    "photosynthesis chlorophyll mitochondria equation fraction triangle velocity gravity "
    "molecule electron democracy monsoon river delta plateau glacier algebra theorem "
    "circuit resistance voltage harvest rainfall ecosystem vaccine protein enzyme "
    "geometry perimeter hypotenuse sonnet metaphor grammar syllable history empire"
)


def json_body(size: int) -> bytes:
    """A question-bank-like JSON document of exactly *size* bytes (deterministic)."""
    rng = random.Random(size)  # noqa: S311 - reproducible test data, not a secret
    words = _WORD_LIST.split()
    questions: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"lesson": "bench", "questions": questions, "pad": ""}
    while True:
        questions.append(
            {
                "id": len(questions) + 1,
                "text": " ".join(rng.choice(words) for _ in range(9)) + "?",
                "options": [rng.choice(words) for _ in range(4)],
                "answer": rng.randrange(4),
            }
        )
        if len(json.dumps(doc, separators=(",", ":"))) > size - 8:
            questions.pop()
            break
    doc["pad"] = " " * (size - len(json.dumps(doc, separators=(",", ":"))))
    body = json.dumps(doc, separators=(",", ":")).encode()
    if len(body) != size:
        raise AssertionError(f"JSON body is {len(body)} bytes, wanted {size}")
    return body


def segment_body(size: int) -> bytes:
    """A fragmented-MP4-looking segment: a ``styp`` box, then incompressible bytes."""
    head = (24).to_bytes(4, "big") + b"stypmsdh" + bytes(4) + b"msdhmsix"
    return head + os.urandom(size - len(head))


def write_bodies(directory: Path) -> dict[str, bytes]:
    """The two static bodies, written to *directory* for the origin and the bare server."""
    bodies = {OBJ_PATH: json_body(4 * 1024), SEG_PATH: segment_body(1024 * 1024)}
    directory.mkdir(parents=True, exist_ok=True)
    for path, body in bodies.items():
        (directory / path.lstrip("/")).write_bytes(body)
    return bodies


# ---- the origin and the bare server (run with ``python -c``) -------------------------------------

ORIGIN_SOURCE = r"""
import asyncio, collections, hashlib, sys
from pathlib import Path
import uvloop
from aiohttp import web

port, body_dir, delay_s = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
small_bytes = int(sys.argv[4])
counts = collections.Counter()

def answer(body, content_type):
    return web.Response(body=body, headers={
        "Content-Type": content_type,
        "Cache-Control": "public, max-age=3600",
        "ETag": '"' + hashlib.sha256(body).hexdigest()[:20] + '"',
    })

STATIC = {
    "/obj4k.json": ((body_dir / "obj4k.json").read_bytes(), "application/json"),
    "/seg1m.m4s": ((body_dir / "seg1m.m4s").read_bytes(), "video/mp4"),
}

def small(name):
    head = '{"id":"%s","pad":"' % name
    return (head + "x" * (small_bytes - len(head) - 2) + '"}').encode()

async def count(request):
    return web.json_response(dict(counts))

async def serve(request):
    path = request.path
    counts[path] += 1
    if path in STATIC:
        return answer(*STATIC[path])
    if "/slow/" in path:  # the thundering herd: a cold object the origin is slow to produce
        await asyncio.sleep(delay_s)
        return answer(STATIC["/obj4k.json"][0], "application/json")
    if "/obj/" in path and path.endswith(".json"):
        return answer(small(path.rsplit("/", 1)[1][:-5]), "application/json")
    return web.Response(status=404, text="not found")

async def main():
    app = web.Application()
    app.router.add_get("/_count", count)
    app.router.add_route("GET", "/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()

uvloop.run(main())
"""

BARE_SOURCE = r"""
import asyncio, hashlib, sys
from pathlib import Path
import uvloop
from aiohttp import web

port, body_dir = int(sys.argv[1]), Path(sys.argv[2])
RESPONSES = {}
for path, content_type in (("/obj4k.json", "application/json"), ("/seg1m.m4s", "video/mp4")):
    body = (body_dir / path.lstrip("/")).read_bytes()
    RESPONSES[path] = (body, {
        "Content-Type": content_type,
        "Cache-Control": "public, max-age=3600",
        "ETag": '"' + hashlib.sha256(body).hexdigest()[:20] + '"',
    })

async def handler(request):
    body, headers = RESPONSES[request.path]
    return web.Response(body=body, headers=headers)

async def main():
    app = web.Application()
    app.router.add_get("/obj4k.json", handler)
    app.router.add_get("/seg1m.m4s", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()

uvloop.run(main())
"""


# ---- small helpers -------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def pin_self(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(url: str, headers: dict[str, str] | None = None) -> Fetched:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Fetched(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as exc:
        return Fetched(exc.code, dict(exc.headers.items()), exc.read())


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_s() -> float:
    """CPU seconds spent non-idle by all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def descendants_of(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children_of(pending.pop()):
            found.append(child)
            pending.append(child)
    return found


def ancestors_of(pid: int) -> list[int]:
    found: list[int] = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ValueError, IndexError):
            break
        found.append(pid)
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else 0


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except FileNotFoundError:
            continue
    return count


# ---- the quiet-machine gate ----------------------------------------------------------------------


def other_benchmarks() -> list[str]:
    """``pgrep -af bench/`` minus this process, its ancestors (the shell that started it),
    its descendants (the servers it started) and its process group (``| tee …``)."""
    mine = {os.getpid(), *ancestors_of(os.getpid()), *descendants_of(os.getpid())}
    done = subprocess.run(["pgrep", "-af", "bench/"], capture_output=True, text=True, check=False)
    others = []
    for line in done.stdout.splitlines():
        pid_text, _, command = line.partition(" ")
        if not pid_text.isdigit() or int(pid_text) in mine or "pgrep" in command:
            continue
        try:
            if os.getpgid(int(pid_text)) == os.getpgrp():
                continue
        except ProcessLookupError:
            continue
        others.append(line.strip())
    return others


def wait_for_quiet(
    label: str, *, need_low_load: bool = True, max_wait_s: float = 600.0, poll_s: float = 10.0
) -> dict[str, Any]:
    """Wait until no other benchmark runs and (if *need_low_load*) the 1-minute load
    average is below 1.0; give up after *max_wait_s* and measure anyway. Returns what it saw,
    for the JSON."""
    started = time.monotonic()
    announced = False
    while True:
        others = other_benchmarks()
        load = os.getloadavg()
        quiet = not others and (not need_low_load or load[0] < LOAD_THRESHOLD)
        waited = time.monotonic() - started
        if quiet or waited >= max_wait_s:
            if not quiet:
                print(
                    f"[{label}] gave up waiting after {waited:.0f} s: load {load[0]:.2f}, "
                    f"other benchmarks: {others or 'none'}; measuring anyway",
                    flush=True,
                )
            return {
                "label": label,
                "waited_s": round(waited, 1),
                "gave_up": not quiet,
                "loadavg": [round(value, 2) for value in load],
                "other_benchmarks": others,
            }
        if not announced:
            print(
                f"[{label}] waiting for a quiet machine (load {load[0]:.2f}, "
                f"other benchmarks: {others or 'none'})",
                flush=True,
            )
            announced = True
        time.sleep(poll_s)


# ---- servers -------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    port: int
    log: Path
    pids: list[int] = field(default_factory=list)
    """Every process of the server (nginx: master, worker, cache manager/loader)."""

    def all_pids(self) -> list[int]:
        return [self.process.pid, *descendants_of(self.process.pid)]

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.all_pids():
            try:
                total += process_cpu_s(pid)
            except FileNotFoundError:
                continue
        return total

    def rss_kib(self) -> int:
        return sum(rss_kib(pid) for pid in self.all_pids())


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KSHIPRA_")}


@contextmanager
def run_python_server(
    name: str, source: str, args: Sequence[str], work: Path, cpu: int | None, ready_path: str
) -> Iterator[Server]:
    port = free_port()
    log = work / f"{name}.log"
    argv = [*pin(cpu), sys.executable, "-c", source, str(port), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_clean_env())
    server = Server(name, process, f"http://127.0.0.1:{port}", port, log)
    try:
        try:
            wait_for_http(server.base_url + ready_path, process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name}: {exc}:\n{log.read_text(errors='replace')}") from None
        yield server
    finally:
        stop(process)


@contextmanager
def run_origin(
    work: Path, bodies_dir: Path, cpu: int | None, delay_s: float = 0.2
) -> Iterator[Server]:
    """The upstream: static 4 KiB / 1 MiB bodies, ``/obj/{name}.json`` (small), ``…/slow/…``
    (delayed by *delay_s*), and request counts per path at ``/_count``."""
    args = [str(bodies_dir), str(delay_s), str(SMALL_BODY_BYTES)]
    with run_python_server("origin", ORIGIN_SOURCE, args, work, cpu, "/_count") as server:
        yield server


@contextmanager
def run_bare(work: Path, bodies_dir: Path, cpu: int | None) -> Iterator[Server]:
    with run_python_server(
        "bare-aiohttp", BARE_SOURCE, [str(bodies_dir)], work, cpu, OBJ_PATH
    ) as server:
        yield server


def origin_counts(origin: Server) -> dict[str, int]:
    counts: dict[str, int] = json.loads(fetch(origin.base_url + "/_count").body)
    return counts


@contextmanager
def run_edge(
    work: Path, upstream: str, cpu: int | None, *, memory: str = "256MiB", tag: str = "edge"
) -> Iterator[Server]:
    port = free_port()
    disk = work / f"{tag}-disk"
    log = work / f"{tag}.log"
    argv = [*pin(cpu), str(KSHIPRA), "edge", "--upstream", upstream]
    argv += ["--listen", f"127.0.0.1:{port}", "--disk-dir", str(disk)]
    argv += ["--memory-bytes", memory, "--name", EDGE_NAME, "--proxy-prefix", "/"]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_clean_env())
    server = Server("kshipra", process, f"http://127.0.0.1:{port}", port, log)
    try:
        try:
            wait_for_http(server.base_url + "/healthz", process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"edge: {exc}:\n{log.read_text(errors='replace')}") from None
        yield server
    finally:
        stop(process)


def nginx_conf(work: Path, port: int, upstream_port: int, *, lock: bool = True) -> str:
    user = "user root;" if os.geteuid() == 0 else ""
    cache_block = """
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache edge;
            proxy_cache_lock_timeout 30s;
            proxy_cache_lock_age 30s;
            add_header X-Cache $upstream_cache_status always;"""
    return f"""
{user}
daemon off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 300;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    proxy_cache_path {work}/nginx-cache levels=1:2 keys_zone=edge:64m max_size=1g
                     inactive=2h use_temp_path=off;
    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{{cache_block}
            proxy_cache_lock {"on" if lock else "off"};
        }}
        location /nolock/ {{{cache_block}
            proxy_cache_lock off;
        }}
    }}
}}
"""


@contextmanager
def run_nginx(work: Path, upstream_port: int, cpu: int | None) -> Iterator[Server]:
    """nginx as a caching proxy: master + 1 worker; ``/`` with ``proxy_cache_lock on``,
    ``/nolock/`` without."""
    port = free_port()
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(nginx_conf(work, port, upstream_port))
    log = work / "nginx.out"
    argv = [*pin(cpu), "nginx", "-p", str(work), "-e", str(work / "nginx-error.log")]
    argv += ["-c", str(conf)]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    server = Server("nginx", process, f"http://127.0.0.1:{port}", port, log)
    try:
        wait_for_port(port, process, work / "nginx-error.log")
        deadline = time.monotonic() + 5  # the worker comes up after the master binds
        while not children_of(process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield server
    finally:
        stop(process)


def cache_state(server: Server, fetched: Fetched) -> str:
    if server.name == "nginx":
        return fetched.headers.get("X-Cache", "-")
    if server.name == "kshipra":
        return fetched.headers.get("Cache-Status", "-")
    return "origin"


def is_hit(server: Server, fetched: Fetched) -> bool:
    state = cache_state(server, fetched)
    if server.name == "nginx":
        return state == "HIT"
    if server.name == "kshipra":
        return bool(re.search(r";\s*hit\b", state))
    return True


# ---- wrk -----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str) -> dict[str, Any]:
    def find(pattern: str) -> str:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match[1]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)$", output, re.MULTILINE)
    read = re.search(r"requests in \S+, ([0-9.]+)(B|KB|MB|GB|TB) read", output)
    return {
        "requests_per_s": float(find(r"^Requests/sec:\s+([0-9.]+)")),
        "latency_avg_ms": _ms(find(r"^\s+Latency\s+(\S+)")),
        "latency_p50_ms": _ms(find(r"^\s+50%\s+(\S+)")),
        "latency_p99_ms": _ms(find(r"^\s+99%\s+(\S+)")),
        "requests": int(find(r"^\s+(\d+) requests in")),
        "bytes_read": int(float(read[1]) * _BYTES[read[2]]) if read else 0,
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": errors[1].strip() if errors else None,
    }


@dataclass
class WrkResult:
    requests_per_s: float
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    requests: int
    bytes_read: int
    non_2xx: int
    socket_errors: str | None
    wrk_cpu_s: float
    server_cpu_s: float
    foreign_cpu_s: float
    duration_s: float


def run_wrk(
    url: str,
    server: Server,
    *,
    duration_s: float,
    connections: int,
    threads: int = 1,
    cpu: int | None,
    headers: Sequence[str] = (),
    script: str | None = None,
) -> WrkResult:
    argv = [*pin(cpu), "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", script]
    argv.append(url)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_s()
    busy_before = system_busy_s()
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - started
    busy = system_busy_s() - busy_before
    server_cpu = server.cpu_s() - server_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    return WrkResult(
        **parse_wrk(done.stdout),
        wrk_cpu_s=round(wrk_cpu, 2),
        server_cpu_s=round(server_cpu, 2),
        foreign_cpu_s=round(max(0.0, busy - wrk_cpu - server_cpu), 2),
        duration_s=round(elapsed, 2),
    )


# ---- a raw HTTP/1.1 client (for many connections at once) ----------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(path: str, port: int, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


# ---- versions and the machine --------------------------------------------------------------------


def tool_versions() -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).strip()

    return {
        "nginx": out(["nginx", "-v"]),
        "wrk": out(["wrk", "--version"]).splitlines()[0],
        "python": platform.python_version(),
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
        "kernel": platform.release(),
        "git_head": out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "edge_worktree_changes": out(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "edge", "kshipra"]
        ).splitlines(),
        "edge_source_sha256": source_digest(),
    }


def source_digest() -> str:
    """SHA-256 over the edge's (and the serving helpers') sources as they are on disk now:
    other people edit them while benchmarks run."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "edge").rglob("*.py"), *(ROOT / "kshipra").rglob("*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def finish_versions(report: dict[str, Any]) -> None:
    """Record the sources at the end too; warn when they changed during the measurement."""
    end = source_digest()
    report["edge_source_sha256_end"] = end
    report["code_changed_during_run"] = end != report["versions"]["edge_source_sha256"]
    if report["code_changed_during_run"]:
        print("warning: edge/ or kshipra/ sources changed during the run", file=sys.stderr)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def write_report(report: dict[str, Any], output: Path) -> None:
    report.setdefault("machine", {})["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {output}")


def check_tools(parser: argparse.ArgumentParser, tools: Sequence[str]) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install -y nginx wrk)")


# ---- py-spy --------------------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """``handle (edge/app.py:228)`` → ``handle (edge/app.py)``: lines folded."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    if match is None:
        return frame
    path = match[2]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match[1]} ({path})"


_LAUNCHER = re.compile(
    r"^<module> \(kshipra\)|\(click/|\(kshipra/serve\.py\)|\(edge/cli\.py\)"
    r"|\(uvloop/__init__\.py\)|\(asyncio/runners\.py\)|\(asyncio/base_events\.py\)"
)
EVENT_LOOP = "[event loop: uvloop/C, no Python frame]"


def _package(frame: str) -> str:
    match = re.search(r"\(([^)]*)\)$", frame)
    path = match[1] if match else ""
    if frame == EVENT_LOOP:
        return "event loop (uvloop, C)"
    for prefix, name in (
        ("edge/", "kshipra edge/"),
        ("origin/", "kshipra origin/ (shared delivery helpers)"),
        ("aiohttp/", "aiohttp"),
        ("multidict/", "multidict"),
        ("yarl/", "yarl"),
        ("asyncio/", "asyncio"),
        ("<string>", "dataclass-generated __init__"),
    ):
        if path.startswith(prefix):
            return name
    return "stdlib/other: " + (path.rsplit("/", 1)[-1] or "?")


def summarise_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's ``--format raw``, with the launcher
    frames (CLI, ``uvloop.run``) stripped: a sample with nothing else is time in the event
    loop's C code."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";") if frame]
        while frames and _LAUNCHER.search(frames[0]):
            frames.pop(0)
        frames = frames or [EVENT_LOOP]
        total += count
        self_counts[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for name in set(frames):
            inclusive[name] += count
    total = max(total, 1)

    def shares(counter: collections.Counter[str], limit: int) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(limit)]

    ours = collections.Counter(
        {name: n for name, n in inclusive.items() if "(edge/" in name or "(origin/" in name}
    )
    return {
        "samples": total,
        "self_by_package": shares(packages, top),
        "self": shares(self_counts, top),
        "inclusive": shares(inclusive, top),
        "inclusive_kshipra_functions": shares(ours, top),
    }


def profile_under_load(
    url: str,
    server: Server,
    work: Path,
    *,
    label: str,
    connections: int,
    cpu: int | None,
    seconds: int = 5,
    headers: Sequence[str] = (),
) -> dict[str, Any]:
    """Run wrk against *server* and py-spy on it for *seconds*; a flame graph SVG and the
    summary of the raw stacks go to ``bench/results/``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"edge_hits_profile_{label}"
    raw_path = work / f"{stem}.txt"
    svg_path = RESULTS / f"{stem}.svg"
    wrk_argv = [*pin(cpu), "wrk", "-t1", f"-c{connections}", f"-d{2 * seconds + 6}s"]
    for header in headers:
        wrk_argv += ["-H", header]
    wrk = subprocess.Popen([*wrk_argv, url], stdout=subprocess.DEVNULL)
    summary: dict[str, Any] = {}
    spy = [*pin(cpu), str(PY_SPY), "record", "--pid", str(server.process.pid), "--nonblocking"]
    try:
        time.sleep(1)
        raw_done = subprocess.run(
            [*spy, "--duration", str(seconds), "--format", "raw", "-o", str(raw_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if raw_done.returncode != 0:
            return {"error": raw_done.stderr.strip()[-500:]}
        summary = summarise_profile(raw_path.read_text())
        shutil.copy(raw_path, RESULTS / raw_path.name)
        summary["raw"] = str((RESULTS / raw_path.name).relative_to(ROOT))
        svg_done = subprocess.run(
            [*spy, "--duration", str(seconds), "-o", str(svg_path)],
            capture_output=True,
            check=False,
        )
        if svg_done.returncode == 0:
            summary["flamegraph"] = str(svg_path.relative_to(ROOT))
    finally:
        if wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)
        wrk.wait()
    return summary


def print_profile(label: str, summary: dict[str, Any]) -> None:
    if "error" in summary:
        print(f"\npy-spy failed for {label}: {summary['error']}")
        return
    print(f"\npy-spy, edge under wrk at {label} ({summary['samples']} busy samples):")
    for title, key, limit in (
        ("self time by package", "self_by_package", 8),
        ("self time by function", "self", 12),
        ("inclusive time, kshipra functions", "inclusive_kshipra_functions", 15),
    ):
        print(f"  {title}:")
        for name, pct in summary[key][:limit]:
            print(f"    {pct:5.1f}%  {name}")


# ---- the benchmark -------------------------------------------------------------------------------


def result_row(
    label: str, size: int, server: str, variant: str, result: WrkResult
) -> dict[str, Any]:
    return {
        "size": label,
        "body_bytes": size,
        "server": server,
        "variant": variant,
        **asdict(result),
        "payload_mb_per_s": round(result.requests_per_s * size / 1e6, 1),
        "wire_bytes_per_response": round(result.bytes_read / max(result.requests, 1)),
        "server_cpu_percent": round(100 * result.server_cpu_s / result.duration_s),
        "requests_per_server_cpu_s": round(result.requests / max(result.server_cpu_s, 0.01)),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'size':>5}  {'server':<14} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'MB/s':>7} "
        f"{'B/resp':>8} {'srv CPU':>7} {'req/CPU-s':>9} {'other CPU s':>11} {'errors':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        errors = row["non_2xx"] + (1 if row["socket_errors"] else 0)
        name = row["server"] + (f" ({row['variant']})" if row["variant"] != "identity" else "")
        print(
            f"{row['size']:>5}  {name:<14} {row['requests_per_s']:>8.0f} "
            f"{row['latency_p50_ms']:>7.2f} {row['latency_p99_ms']:>7.2f} "
            f"{row['payload_mb_per_s']:>7.1f} {row['wire_bytes_per_response']:>8} "
            f"{row['server_cpu_percent']:>6}% {row['requests_per_server_cpu_s']:>9} "
            f"{row['foreign_cpu_s']:>11.1f} {errors:>6}"
        )
    print(
        "(MB/s: body bytes x req/s; B/resp: bytes on the wire per response, headers included; "
        "srv CPU: 100% = one core; other CPU s: CPU used by neither wrk nor the server)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run [10]")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured wrk seconds [1]")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c [32]")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers/wrk to CPUs")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy on missed goals")
    parser.add_argument("--max-wait", type=float, default=600, help="quiet-machine wait cap, s")
    parser.add_argument("--output", type=Path, default=RESULTS / "edge_hits.json")
    args = parser.parse_args()
    check_tools(parser, ("wrk", "nginx", "taskset"))
    server_cpu = None if args.no_pin or (os.cpu_count() or 1) < 2 else SERVER_CPU
    client_cpu = None if server_cpu is None else CLIENT_CPU
    raise_nofile()

    report: dict[str, Any] = {
        "benchmark": "edge_hits",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "wrk_threads": 1,
            "server_cpu": server_cpu,
            "wrk_cpu": client_cpu,
            "accept_encoding": "not sent (identity), except the kshipra br row",
            "if_none_match": "sent only in the 304 rows (the stored ETag)",
            "kshipra": "kshipra edge, one process, --memory-bytes 256MiB, disk tier",
            "nginx": "master + worker_processes 1, proxy_cache (keys_zone 64m, max_size 1g), "
            "freshness from upstream Cache-Control, proxy_http_version 1.1, upstream keepalive "
            "64, sendfile on, access_log off",
            "bare_aiohttp": "uvloop, one handler returning bytes from memory, same headers",
        },
        "machine": machine(),
        "quiet_gates": [],
    }
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kshipra-edgebench-")))
        bodies_dir = work / "bodies"
        bodies = write_bodies(bodies_dir)
        report["quiet_gates"].append(wait_for_quiet("start", max_wait_s=args.max_wait))
        report["versions"] = tool_versions()  # after the wait: the code that is measured
        origin = stack.enter_context(run_origin(work, bodies_dir, client_cpu))
        edge = stack.enter_context(run_edge(work, origin.base_url, server_cpu))
        nginx = stack.enter_context(run_nginx(work, origin.port, server_cpu))
        bare = stack.enter_context(run_bare(work, bodies_dir, server_cpu))
        servers = [nginx, edge, bare]
        warm: dict[str, Any] = {}
        for label, (path, _size) in SIZES.items():
            for server in servers:
                first = fetch(server.base_url + path)
                second = fetch(server.base_url + path)
                if second.body != bodies[path] or first.body != bodies[path]:
                    raise RuntimeError(f"{server.name} serves other bytes for {path}")
                if not is_hit(server, second):
                    raise RuntimeError(
                        f"{server.name}: second request for {path} is not a hit: "
                        f"{cache_state(server, second)!r}"
                    )
                warm[f"{label}/{server.name}"] = [
                    cache_state(server, first),
                    cache_state(server, second),
                ]
        br = fetch(edge.base_url + OBJ_PATH, {"Accept-Encoding": "br"})  # makes the variant
        br = fetch(edge.base_url + OBJ_PATH, {"Accept-Encoding": "br"})
        if br.headers.get("Content-Encoding") != "br" or not is_hit(edge, br):
            raise RuntimeError(f"edge br variant is not a stored hit: {br.headers}")
        warm["4KiB/kshipra-br"] = cache_state(edge, br)
        # Revalidation: the phone's own copy expired and it asks with the ETag it holds.
        etag = fetch(edge.base_url + OBJ_PATH).headers["ETag"]
        for server in (nginx, edge):
            revalidated = fetch(server.base_url + OBJ_PATH, {"If-None-Match": etag})
            if revalidated.status != 304:
                raise RuntimeError(f"{server.name} answers If-None-Match with {revalidated.status}")
            warm[f"4KiB/{server.name}-304"] = cache_state(server, revalidated)
        report["warm_up"] = warm
        report["br_body_bytes"] = len(br.body)
        report["origin_counts_after_warmup"] = origin_counts(origin)
        print(f"warm: {json.dumps(warm)}", flush=True)

        plan: list[tuple[str, int, Server, str, list[str]]] = [
            (label, size, server, "identity", [])
            for label, (_path, size) in SIZES.items()
            for server in servers
        ]
        plan.append(("4KiB", 4 * 1024, edge, "br", ["Accept-Encoding: br"]))
        for server in (nginx, edge):
            plan.append(("4KiB", 4 * 1024, server, "304", [f"If-None-Match: {etag}"]))
        for label, size, server, variant, headers in plan:
            gate = wait_for_quiet(f"{label} {server.name}", need_low_load=False, max_wait_s=60)
            report["quiet_gates"].append(gate)
            url = server.base_url + SIZES[label][0]
            if args.warmup:
                run_wrk(
                    url,
                    server,
                    duration_s=args.warmup,
                    connections=args.connections,
                    cpu=client_cpu,
                    headers=headers,
                )
            result = run_wrk(
                url,
                server,
                duration_s=args.duration,
                connections=args.connections,
                cpu=client_cpu,
                headers=headers,
            )
            row = result_row(label, size, server.name, variant, result)
            row["load_1min"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(
                f"  {label:>5} {server.name:<12} {variant:<8} {result.requests_per_s:>9.0f} req/s "
                f"p99 {result.latency_p99_ms:.2f} ms (other CPU {result.foreign_cpu_s:.1f} s)",
                flush=True,
            )
        report["origin_counts_after_runs"] = origin_counts(origin)

        ratios: dict[str, dict[str, Any]] = {}
        for label in SIZES:
            by = {r["server"]: r for r in rows if r["size"] == label and r["variant"] == "identity"}
            ours = by["kshipra"]
            vs_nginx = ours["requests_per_s"] / by["nginx"]["requests_per_s"]
            ratios[label] = {
                "kshipra_over_nginx": round(vs_nginx, 3),
                "kshipra_over_bare_aiohttp": round(
                    ours["requests_per_s"] / by["bare-aiohttp"]["requests_per_s"], 3
                ),
                "per_cpu_s_kshipra_over_nginx": round(
                    ours["requests_per_server_cpu_s"] / by["nginx"]["requests_per_server_cpu_s"], 3
                ),
                "p99_kshipra_over_nginx": round(
                    ours["latency_p99_ms"] / max(by["nginx"]["latency_p99_ms"], 1e-3), 2
                ),
                "goal_kshipra_over_nginx": GOALS[label],
                "goal_met": vs_nginx >= GOALS[label],
            }
        if not args.no_profile:
            for label, ratio in ratios.items():
                if not ratio["goal_met"]:
                    print(f"\nprofiling the edge at {label} (goal missed) ...", flush=True)
                    profiles[label] = profile_under_load(
                        edge.base_url + SIZES[label][0],
                        edge,
                        work,
                        label=label,
                        connections=args.connections,
                        cpu=client_cpu,
                    )
        report["edge_log_tail"] = edge.log.read_text(errors="replace")[-2000:]

    report["runs"] = rows
    report["ratios"] = ratios
    report["profiles"] = profiles
    report["disturbed"] = any(r["foreign_cpu_s"] > 0.1 * r["duration_s"] for r in rows)
    print_table(rows)
    print()
    for label, ratio in ratios.items():
        print(
            f"{label}: kshipra/nginx {ratio['kshipra_over_nginx']:.3f} "
            f"(goal >= {ratio['goal_kshipra_over_nginx']}: "
            f"{'met' if ratio['goal_met'] else 'MISSED'}), "
            f"kshipra/bare-aiohttp {ratio['kshipra_over_bare_aiohttp']:.3f}, "
            f"per server CPU-s kshipra/nginx {ratio['per_cpu_s_kshipra_over_nginx']:.3f}, "
            f"p99 kshipra/nginx {ratio['p99_kshipra_over_nginx']:.2f}x"
        )
    br_row = next(r for r in rows if r["variant"] == "br")
    print(
        f"4KiB kshipra br: {br_row['requests_per_s']:.0f} req/s, body {report['br_body_bytes']} B "
        f"(identity 4096 B), {br_row['wire_bytes_per_response']} B/response on the wire"
    )
    not_modified = {r["server"]: r for r in rows if r["variant"] == "304"}
    report["not_modified_kshipra_over_nginx"] = round(
        not_modified["kshipra"]["requests_per_s"] / not_modified["nginx"]["requests_per_s"], 3
    )
    print(
        f"4KiB If-None-Match -> 304: kshipra {not_modified['kshipra']['requests_per_s']:.0f} "
        f"req/s, nginx {not_modified['nginx']['requests_per_s']:.0f} req/s "
        f"({report['not_modified_kshipra_over_nginx']:.3f}x)"
    )
    for label, summary in profiles.items():
        print_profile(label, summary)
    if report["disturbed"]:
        print(
            "\nwarning: some runs shared the machine with other work (other CPU > 10% of the "
            "run); prefer the req/CPU-s ratios",
            file=sys.stderr,
        )
    finish_versions(report)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
