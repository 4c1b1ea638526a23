"""Progress that works: a real encode's stage, percent and ETA reach Redis while it runs, and
the API, ``kshipra status``, ``kshipra jobs`` and a piped ``kshipra upload --wait`` show them.

Real components throughout: ffmpeg on generated clips, Valkey, saq jobs, and for the end-to-end
test `kshipra origin` and `kshipra worker` as processes (the worker in its own process group so
that the test can freeze it, ffmpeg included, mid-encode with SIGSTOP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from saq import Queue

from assets.processing import progress_of
from common.wire import PROGRESS_PREFIX
from kshipra.origin_cli import jobs_command, status_command
from tests.conftest import (
    UPLOAD_TOKEN,
    OriginProcess,
    child_env,
    eventually,
    eventually_async,
    kshipra_argv,
    start_origin_process,
    stop_process,
)
from tests.integration.test_hls import SMALL, make_clip
from transcode import hls
from transcode.jobs import JobCancelled, ProgressReporter

pytestmark = pytest.mark.integration

# ---- ProgressReporter: a real encode, real Valkey, a real saq job ---------------------------


@pytest.fixture
async def saq_job(valkey_url: str) -> Any:
    queue = Queue.from_url(valkey_url, name=f"test-progress-{uuid.uuid4().hex[:8]}")
    await queue.connect()
    job = await queue.enqueue("transcode", key=f"lecture:{uuid.uuid4().hex}:test")
    assert job is not None
    try:
        yield job
    finally:
        await queue.disconnect()


@pytest.fixture
async def redis_client(valkey_url: str) -> Any:
    client = aioredis.Redis.from_url(valkey_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_real_encode_reports_progress_to_redis_while_it_runs(
    tmp_path: Path, redis_client: aioredis.Redis, saq_job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hls, "PROGRESS_POLL_S", 0.02)
    clip = make_clip(tmp_path / "clip.mp4", size="320x180", seconds=12)
    out = tmp_path / "out"
    out.mkdir()
    key = str(saq_job.key)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(PROGRESS_PREFIX + key)
    running = True
    during: list[dict[str, Any]] = []

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message" and running:
                during.append(json.loads(message["data"]))

    listener = asyncio.create_task(listen())
    # A clip of seconds encodes in about one: write more often than the default interval.
    reporter = ProgressReporter(
        asyncio.get_running_loop(), redis_client, saq_job, key, interval_s=0.05
    )
    reporter("download", 0.0)
    await reporter.start()
    started = time.monotonic()
    try:
        await asyncio.to_thread(
            hls.run, clip, out, replace(SMALL, segment_s=2), reporter.scaled(0.03, 0.95)
        )
        running = False
        elapsed = time.monotonic() - started
        reporter("done", 1.0)
        await reporter.stop()
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()

    encode = [document for document in during if document["stage"] == "encode"]
    percents = [document["percent"] for document in encode]
    assert percents == sorted(percents)
    inside = sorted({p for p in percents if 0 < p < 100})
    assert len(inside) >= 3, during  # it moved while ffmpeg ran, not only at the end
    etas = [d["eta_s"] for d in encode if d["eta_s"] is not None]
    assert etas, during
    assert all(0 < eta < 10 * elapsed for eta in etas)
    final = await progress_of(redis_client, key)
    assert final is not None
    assert (final["stage"], final["percent"], final["eta_s"]) == ("done", 100.0, 0.0)
    await saq_job.refresh()
    assert saq_job.progress == 1.0
    assert saq_job.meta == {"stage": "done"}
    with pytest.raises(JobCancelled):
        reporter("encode", 0.5)  # a stopped job's pipeline is told to stop
    await redis_client.delete(PROGRESS_PREFIX + key)


async def test_the_newest_state_is_sent_after_the_interval_never_dropped(
    redis_client: aioredis.Redis, saq_job: Any
) -> None:
    key = str(saq_job.key)
    reporter = ProgressReporter(
        asyncio.get_running_loop(), redis_client, saq_job, key, interval_s=0.2, refresh_s=0.3
    )
    reporter("encode", 0.1)
    await reporter.start()
    try:

        async def percent_is(value: float) -> bool:
            document = await progress_of(redis_client, key)
            return document is not None and document["percent"] == value

        await eventually_async(lambda: percent_is(10.0), timeout_s=5, what="10 %", interval_s=0.01)
        for fraction in (0.4, 0.5, 0.6):  # inside one interval: only the last matters
            reporter("encode", fraction)
        await eventually_async(
            lambda: percent_is(60.0), timeout_s=5, what="60 % sent later", interval_s=0.01
        )
        reporter("encode", 0.3)  # never backwards within a job
        assert reporter.fraction == 0.6
        first = await progress_of(redis_client, key)
        assert first is not None

        async def refreshed() -> bool:
            document = await progress_of(redis_client, key)
            return document is not None and document["updated"] > first["updated"]

        await eventually_async(
            refreshed, timeout_s=5, what="a refresh while nothing changes", interval_s=0.01
        )
    finally:
        await reporter.stop(final=False)
        await redis_client.delete(PROGRESS_PREFIX + key)


# ---- the API and the CLI against real processes ---------------------------------------------


def api(url: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {UPLOAD_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, body: bytes) -> Any:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Authorization": f"Bearer {UPLOAD_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def cli(command: Any, *args: str, origin: OriginProcess) -> str:
    """A click command in this process (fast, while the worker is frozen)."""
    result = CliRunner().invoke(
        command,
        [*args, "--origin", origin.url],
        env={"KSHIPRA_UPLOAD_TOKEN": UPLOAD_TOKEN},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return result.output


def kshipra(*args: str, origin: OriginProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kshipra_argv(*args),
        env=child_env(KSHIPRA_ORIGIN_URL=origin.url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def origin_and_frozen_worker(
    tmp_path: Path, valkey_url: str
) -> Iterator[tuple[OriginProcess, int]]:
    """`kshipra origin`, and a `kshipra worker` leading its own process group (its ffmpeg
    too), so ``os.killpg(group, SIGSTOP)`` freezes the job mid-encode."""
    storage = str(tmp_path / "storage")
    origin = start_origin_process(storage, valkey_url, tmp_path / "origin.log")
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        kshipra_argv("worker", "--storage", storage, "--redis", valkey_url),
        env=child_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield origin, worker.pid
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGCONT)
        stop_process(worker)
        stop_process(origin.process)
        log.close()


def test_status_jobs_api_and_a_piped_upload_follow_a_real_job(
    origin_and_frozen_worker: tuple[OriginProcess, int], tmp_path: Path
) -> None:
    origin, worker_group = origin_and_frozen_worker
    clip = make_clip(tmp_path / "Cell Division.mp4", size="320x180", seconds=40)
    upload = subprocess.Popen(
        kshipra_argv("upload", str(clip), "--wait", "--progress-interval", "0.2"),
        env=child_env(KSHIPRA_ORIGIN_URL=origin.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert upload.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(upload.stderr or ()), daemon=True)
    reader.start()
    asset_url = f"{origin.url}/v1/assets/cell-division"
    try:
        seen: list[float] = []

        def encoding() -> dict[str, Any] | None:
            try:
                shown: dict[str, Any] = api(asset_url)
            except urllib.error.HTTPError:
                return None  # not uploaded yet
            processing = shown.get("processing") or {}
            if processing.get("stage") == "encode" and 0 < processing["percent"] < 100:
                seen.append(processing["percent"])
            moved = len(set(seen)) >= 2 and processing.get("eta_s") is not None
            return shown if moved and processing.get("stage") == "encode" else None

        eventually(
            encoding,
            timeout_s=120,
            what="the encode visibly moving with an ETA",
            interval_s=0.05,
        )
        os.killpg(worker_group, signal.SIGSTOP)
        frozen_at = len(lines)
        try:
            shown = api(asset_url)
            processing = shown["processing"]
            assert processing["job_status"] == "active"
            assert processing["stage"] == "encode"
            assert 0 < processing["percent"] < 100
            assert processing["eta_s"] > 0
            queue = api(f"{origin.url}/v1/jobs")
            (job,) = [j for j in queue["jobs"] if j["key"] == processing["job"]]
            assert job["status"] == "active"
            assert job["progress"]["stage"] == "encode"

            status = cli(status_command, "cell-division", origin=origin)
            assert "cell-division (lecture) - processing" in status
            assert "not yet published" in status
            assert "v1 processing" in status
            assert f"v1: encode {processing['percent']:.0f}%, ETA " in status
            assert "(job active, attempt 1)" in status
            assert "none until a version is published" in status
            assert "vNone" not in status
            jobs = cli(jobs_command, origin=origin)
            assert "active" in jobs
            assert "Status." not in jobs
            assert f"v1 (processing): encode {processing['percent']:.0f}%" in jobs

            # Nothing changes while the worker is frozen; the piped upload still says so.
            eventually(
                lambda: sum(line.startswith("process ") for line in lines[frozen_at:]) >= 2,
                timeout_s=10,
                what="two progress lines while nothing changes",
                interval_s=0.05,
            )
        finally:
            os.killpg(worker_group, signal.SIGCONT)
        upload.wait(timeout=180)  # its stdout is a few lines: the pipe never fills
        reader.join(timeout=10)
        assert upload.stdout is not None
        out = upload.stdout.read()
    finally:
        if upload.poll() is None:
            upload.kill()
            upload.wait()
    assert upload.returncode == 0, "".join(lines)
    assert "published: lecture cell-division v1" in out
    uploads = [line for line in lines if line.startswith("upload Cell Division.mp4: ")]
    assert uploads
    assert " of " in uploads[-1]
    assert "(100%)" in uploads[-1]
    processes = [line for line in lines if line.startswith("process Cell Division.mp4: ")]
    assert len(processes) >= 2
    assert any("encode" in line and "%, ETA " in line for line in processes), lines
    assert processes[-1].strip() == "process Cell Division.mp4: published"

    published = kshipra("status", "cell-division", origin=origin)
    assert published.returncode == 0, published.stderr
    text = published.stdout
    assert "cell-division (lecture) - published" in text
    assert "v1 (served as latest)" in text
    assert "v1 published at " in text
    assert "/content/lectures/cell-division/latest.m3u8" in text
    assert "processing " not in text
    assert "vNone" not in text

    # Not a video: the worker refuses it for good, and status says why.
    broken = b"\x1a\x45\xdf\xa3" + b"\x00" * 60 + os.urandom(64 * 1024)
    post(f"{origin.url}/v1/assets?id=broken-lecture&kind=lecture", broken)
    failed = eventually(
        lambda: (
            (shown := api(f"{origin.url}/v1/assets/broken-lecture"))["status"] == "failed" and shown
        ),
        timeout_s=60,
        what="the broken lecture failing",
        interval_s=0.05,
    )
    reason = failed["status_reason"]
    assert reason
    result = kshipra("status", "broken-lecture", origin=origin)
    assert result.returncode == 0, result.stderr
    assert "broken-lecture (lecture) - failed: " in result.stdout
    assert "not yet published" in result.stdout
    assert "v1 failed: " in result.stdout
    assert reason.split("\n")[0][:40] in result.stdout
    assert "vNone" not in result.stdout
