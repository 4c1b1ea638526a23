#!/usr/bin/env python3
"""Upload of a large lecture to S3 (moto) through ``kshipra upload``: MiB/s, and the origin's
peak RSS, which should stay flat rather than grow with the file.

Runs moto's threaded S3 server inside this script (so moto's memory is this process's, not the
origin's), creates a versioned bucket, starts ``kshipra origin --storage s3://BUCKET`` with an
embedded Valkey, and uploads a small file (20 MiB) and a large one (``--size-mb``, 200 MiB) of
Matroska magic plus random bytes with ``kshipra upload FILE --json`` (resumable 8 MiB parts).
During each upload it samples the origin's VmRSS every 50 ms and reads VmHWM (reset through
``/proc/PID/clear_refs`` before each upload, where allowed). Then it downloads each versioned URL
and compares SHA-256. Writes ``bench/results/upload_s3.json``.

    .venv/bin/python bench/upload_s3.py [--size-mb 200] [--small-mb 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import boto3.session
from benchlib import alive, children_of, free_port, wait_for_http
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parent.parent
KSHIPRA = ROOT / ".venv" / "bin" / "kshipra"
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "upload_s3.json"
MIB = 1024 * 1024
MATROSKA_MAGIC = b"\x1a\x45\xdf\xa3"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, needs ptrace rights over *pid*)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def own_rss_mib() -> float:
    return status_kib(os.getpid(), "VmRSS") / 1024


class RssSampler:
    """Samples a process's VmRSS every *interval_s* in a thread; ``peak_kib`` is the largest."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._pid = pid
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = status_kib(self._pid, "VmRSS")
            except (OSError, KeyError):
                return
            self.samples.append((round(time.monotonic() - started, 3), rss))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_kib(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


@contextmanager
def moto_server() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def create_bucket(endpoint: str) -> str:
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    name = f"kshipra-bench-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    client.close()
    return name


@contextmanager
def run_origin(
    work: Path, bucket: str, endpoint: str, env: dict[str, str], report: dict[str, Any]
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    argv = [str(KSHIPRA), "origin", "--listen", f"127.0.0.1:{port}"]
    argv += ["--storage", f"s3://{bucket}", "--s3-endpoint", endpoint]
    origin_env = {
        **env,
        "KSHIPRA_ORIGIN__UPLOAD_LIMITS__LECTURE_BYTES": "4GiB",
    }
    log = (work / "origin.log").open("wb")
    process = subprocess.Popen(argv, env=origin_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    children: list[int] = []
    try:
        try:
            wait_for_http(url + "/readyz", process)
        except (RuntimeError, TimeoutError) as exc:
            log.flush()
            raise RuntimeError(f"{exc}:\n{(work / 'origin.log').read_text()}") from None
        children = children_of(process.pid)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        leftovers = [pid for pid in children if alive(pid)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        report["origin_children"] = children
        report["origin_children_left_after_sigterm"] = leftovers


def make_lecture(path: Path, size: int) -> str:
    """Matroska magic + random bytes, written in 1 MiB chunks; returns the SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        remaining = size
        first = True
        while remaining:
            chunk = os.urandom(min(MIB, remaining))
            if first:
                chunk = MATROSKA_MAGIC + chunk[len(MATROSKA_MAGIC) :]
                first = False
            handle.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def run_cli(argv: list[str], env: dict[str, str], out: Path) -> tuple[int, float, int]:
    """Run the CLI; (exit code, wall seconds, its own peak RSS in KiB).

    The peak comes from GNU time's ``%M`` where /usr/bin/time exists (``ru_maxrss`` from our
    own ``wait4`` would count the pages of this big process that the child had before its
    exec), else from sampling the child's VmRSS."""
    time_report = out.with_suffix(".time")
    wrapper = ["/usr/bin/time", "-f", "%M", "-o", str(time_report)]
    use_time = Path(wrapper[0]).exists()
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        started = time.monotonic()
        process = subprocess.Popen(
            [*wrapper, *argv] if use_time else argv, env=env, stdout=stdout, stderr=stderr
        )
        with RssSampler(process.pid) as sampler:
            code = process.wait()
        elapsed = time.monotonic() - started
    if use_time:
        return code, elapsed, int(time_report.read_text().split()[-1])
    return code, elapsed, sampler.peak_kib


def download_sha256(url: str) -> tuple[str, int, float]:
    digest = hashlib.sha256()
    size = 0
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=300) as response:
        while chunk := response.read(MIB):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size, time.monotonic() - started


def bench_one(
    label: str,
    size: int,
    work: Path,
    origin_pid: int,
    origin_url: str,
    env: dict[str, str],
) -> dict[str, Any]:
    path = work / f"lecture-{label}.mkv"
    sha256 = make_lecture(path, size)
    argv = [str(KSHIPRA), "upload", str(path), "--json", "--origin", origin_url]
    argv += ["--id", f"bench-{label}-{secrets.token_hex(3)}", "--kind", "lecture"]
    rss_before = status_kib(origin_pid, "VmRSS")
    hwm_reset = reset_peak_rss(origin_pid)
    with RssSampler(origin_pid) as sampler:
        code, elapsed, cli_peak_kib = run_cli(argv, env, work / f"upload-{label}.out")
    hwm_after = status_kib(origin_pid, "VmHWM")
    rss_after = status_kib(origin_pid, "VmRSS")
    output = (work / f"upload-{label}.out").read_text()
    if code != 0:
        errors = (work / f"upload-{label}.err").read_text()
        raise RuntimeError(f"kshipra upload failed ({code}):\n{output}{errors}")
    answer = json.loads(output)
    url = answer["urls"]["versioned"]
    with RssSampler(origin_pid) as download_sampler:
        got_sha256, got_size, download_s = download_sha256(url)
    path.unlink()
    return {
        "label": label,
        "size_bytes": size,
        "upload": answer["upload"],
        "versioned_url": url,
        "wall_s": round(elapsed, 2),
        "mib_per_s": round(size / MIB / elapsed, 1),
        "cli_reported_duration_s": answer["upload"]["duration_s"],
        "mib_per_s_cli_duration": round(size / MIB / answer["upload"]["duration_s"], 1),
        "cli_peak_rss_mib": round(cli_peak_kib / 1024, 1),
        "origin_rss_before_mib": round(rss_before / 1024, 1),
        "origin_rss_peak_sampled_mib": round(sampler.peak_kib / 1024, 1),
        "origin_vmhwm_after_mib": round(hwm_after / 1024, 1),
        "origin_vmhwm_was_reset": hwm_reset,
        "origin_rss_after_mib": round(rss_after / 1024, 1),
        "origin_rss_samples": len(sampler.samples),
        "roundtrip_ok": got_sha256 == sha256 and got_size == size,
        "sha256": sha256,
        "download_s": round(download_s, 2),
        "download_mib_per_s": round(size / MIB / download_s, 1),
        "origin_rss_peak_during_download_mib": round(download_sampler.peak_kib / 1024, 1),
        "script_rss_after_mib": round(own_rss_mib(), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200, help="large file, MiB [200]")
    parser.add_argument("--small-mb", type=int, default=20, help="small file, MiB [20]")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args()

    report: dict[str, Any] = {
        "benchmark": "upload_s3",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"small_mib": args.small_mb, "large_mib": args.size_mb},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "results": [],
    }
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kshipra-bench-")))
        nowhere = str(work / "no-aws-config")
        os.environ.update(FAKE_AWS_ENV)
        os.environ["AWS_CONFIG_FILE"] = nowhere
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = nowhere
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(name, None)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KSHIPRA_")}
        env["KSHIPRA_UPLOAD_TOKEN"] = secrets.token_hex(16)
        env["TERM"] = "dumb"
        endpoint = stack.enter_context(moto_server())
        bucket = create_bucket(endpoint)
        report["settings"]["bucket"] = bucket
        origin, origin_url = stack.enter_context(run_origin(work, bucket, endpoint, env, report))
        report["origin_rss_idle_mib"] = round(status_kib(origin.pid, "VmRSS") / 1024, 1)
        for label, mib in (("small", args.small_mb), ("large", args.size_mb)):
            result = bench_one(label, mib * MIB, work, origin.pid, origin_url, env)
            report["results"].append(result)
            print(
                f"  {label}: {mib} MiB in {result['wall_s']} s = {result['mib_per_s']} MiB/s, "
                f"origin peak RSS {result['origin_vmhwm_after_mib']} MiB",
                flush=True,
            )
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["script_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    small, large = report["results"]
    growth = large["origin_vmhwm_after_mib"] / max(small["origin_vmhwm_after_mib"], 1)
    report["peak_rss_ratio_large_over_small"] = round(growth, 2)
    report["flat"] = growth < 2 and all(r["roundtrip_ok"] for r in report["results"])
    print_table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0 if all(r["roundtrip_ok"] for r in report["results"]) else 1


def print_table(report: dict[str, Any]) -> None:
    header = (
        f"{'file':>8} {'wall s':>7} {'MiB/s':>7} {'CLI s':>6} {'MiB/s':>6} "
        f"{'origin RSS MiB: before':>22} "
        f"{'peak(50ms)':>10} {'VmHWM':>7} {'after':>7} {'CLI RSS':>8} {'down MiB/s':>10} "
        f"{'round-trip':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(
            f"{r['size_bytes'] // MIB:>4} MiB {r['wall_s']:>7.2f} {r['mib_per_s']:>7.1f} "
            f"{r['cli_reported_duration_s']:>6.2f} {r['mib_per_s_cli_duration']:>6.1f} "
            f"{r['origin_rss_before_mib']:>22.1f} {r['origin_rss_peak_sampled_mib']:>10.1f} "
            f"{r['origin_vmhwm_after_mib']:>7.1f} {r['origin_rss_after_mib']:>7.1f} "
            f"{r['cli_peak_rss_mib']:>8.1f} {r['download_mib_per_s']:>10.1f} "
            f"{'ok' if r['roundtrip_ok'] else 'MISMATCH':>10}"
        )
    print()
    print(
        "(wall s: the CLI process from start to exit, Python start-up included; CLI s: the "
        "upload's own duration_s from its JSON, hashing + parts + complete)"
    )
    print(
        f"origin idle RSS {report['origin_rss_idle_mib']} MiB; peak RSS large/small = "
        f"{report['peak_rss_ratio_large_over_small']} "
        f"({'flat' if report['flat'] else 'NOT flat'}); "
        f"script (moto) peak RSS {report['script_peak_rss_mib']} MiB"
    )


if __name__ == "__main__":
    sys.exit(main())
