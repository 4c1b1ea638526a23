"""`kshipra worker` processes on the real queue: a SIGKILLed worker's job is finished by
another, and the published result is whole."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest

from tests.conftest import (
    UPLOAD_TOKEN,
    eventually,
    start_origin_process,
    start_worker_process,
    stop_process,
)

pytestmark = pytest.mark.integration


def api(url: str, *, method: str = "GET", body: bytes | None = None) -> Any:
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Authorization": f"Bearer {UPLOAD_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def make_clip(path: Path, seconds: int) -> None:
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=300:sample_rate=44100",
            "-t",
            str(seconds),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
            str(path),
        ],
        check=True,
    )


def test_a_killed_workers_job_is_completed_by_another(tmp_path: Path, valkey_url: str) -> None:
    storage = str(tmp_path / "storage")
    clip = tmp_path / "lecture.mp4"
    make_clip(clip, seconds=4)
    origin = start_origin_process(storage, valkey_url, tmp_path / "origin.log")
    first = start_worker_process(storage, valkey_url, tmp_path / "worker-1.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        answer = api(
            f"{origin.url}/v1/assets?id=killed-lecture&kind=lecture",
            method="POST",
            body=clip.read_bytes(),
        )
        assert answer["asset"]["status"] == "processing"

        def encoding() -> bool:
            shown = api(f"{origin.url}/v1/assets/killed-lecture")
            processing = shown.get("processing") or {}
            return processing.get("stage") == "encode" and processing.get("percent", 0) > 0

        eventually(
            encoding, timeout_s=60, what="the first worker starting to encode", interval_s=0.1
        )
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = time.monotonic()
        second = start_worker_process(storage, valkey_url, tmp_path / "worker-2.log")

        def published() -> dict[str, Any] | None:
            shown: dict[str, Any] = api(f"{origin.url}/v1/assets/killed-lecture")
            assert shown["newest_state"] != "failed", shown["status_reason"]
            return shown if shown["status"] == "published" else None

        shown = eventually(
            published, timeout_s=120, what="the second worker publishing", interval_s=0.1
        )
        recovery_s = time.monotonic() - killed_at
        assert recovery_s < 120
        master_url = shown["urls"]["versioned"]
        with urllib.request.urlopen(master_url, timeout=10) as response:
            master = response.read().decode()
        assert "#EXT-X-STREAM-INF" in master
        outputs = list((tmp_path / "storage" / "renditions").rglob("*"))
        names = [path.name for path in outputs if path.is_file()]
        assert len(names) == len(set(names))  # a re-run overwrote, never duplicated
        jobs = api(f"{origin.url}/v1/jobs")
        assert all(job["status"] != "failed" for job in jobs["jobs"])
    finally:
        stop_process(first)
        if second is not None:
            stop_process(second)
        stop_process(origin.process)
