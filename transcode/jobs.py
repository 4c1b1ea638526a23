"""The worker's side of a transcode job: download the source, run the pipeline with live
progress, upload the outputs, then publish the waiting versions (see ``assets.processing`` for
the queue, job keys and publishing that the origin shares)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from assets.blobstore import BlobStore
from assets.catalogue import Catalogue
from assets.processing import (
    PROGRESS_TTL_S,
    BundleJob,
    ImageJob,
    LectureJob,
    PreviousBundle,
    Publisher,
    job_key,
    job_settings,
    outputs_prefix,
)
from cdn_config import KshipraConfig
from common.wire import (
    PROGRESS_PREFIX,
)
from transcode.base import Outputs, PermanentFault

log = logging.getLogger(__name__)

JobSettings = ImageJob | BundleJob | LectureJob
Pipeline = Callable[[Path, Path, JobSettings, Callable[[str, float], None]], Outputs]
"""``pipeline(source, out_dir, settings, progress)``: blocking, run in a thread."""


@dataclass(frozen=True, slots=True)
class JobInput:
    """What one job works on: its key and outputs prefix, the source, the typed settings."""

    key: str
    prefix: str
    source_key: str
    source_format: str
    settings: JobSettings


# ---- the worker's side -----------------------------------------------------------------------


@dataclass
class WorkerEnv:
    store: BlobStore
    catalogue: Catalogue
    redis: aioredis.Redis
    config: KshipraConfig
    pipeline: Pipeline


async def _download(
    store: BlobStore, key: str, path: Path, progress: Callable[[float], None] | None = None
) -> None:
    """*key* into *path*; *progress* gets the share of the bytes written so far."""
    reader = await store.get(key)
    handle = await asyncio.to_thread(path.open, "wb")
    written = 0
    try:
        async for chunk in reader.chunks:
            await asyncio.to_thread(handle.write, chunk)
            written += len(chunk)
            if progress is not None and reader.length:
                progress(written / reader.length)
    finally:
        await asyncio.to_thread(handle.close)


async def _file_chunks(path: Path, chunk_bytes: int = 1024 * 1024) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)


def _etag_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return f'"{digest.hexdigest()[:40]}"'


PROGRESS_INTERVAL_S = 0.5
"""A job's progress document is written at most this often (the newest state is never lost)."""
PROGRESS_REFRESH_S = 5.0
"""…and at least this often while a job runs, so its ETA and ``updated`` stay current."""
ETA_AFTER_FRACTION = 0.05
"""No ETA before this much of the job is done: the first steps say little about the rest."""
JOB_BANDS = {"download": (0.0, 0.03), "pipeline": (0.03, 0.95), "upload": (0.95, 0.99)}
"""The share of a whole job each step takes (a pipeline's own 0-1 maps into its band)."""


class JobCancelled(Exception):
    """Raised into a pipeline's progress call once its job has stopped: the pipeline (and its
    ffmpeg) must not run on after saq cancelled the job (timeout, abort, worker stop)."""


def eta_seconds(elapsed_s: float, fraction: float) -> float | None:
    """Time left if the rest goes at the pace so far: ``elapsed * (1 - f) / f``."""
    if fraction >= 1.0:
        return 0.0
    if fraction < ETA_AFTER_FRACTION or elapsed_s <= 0:
        return None
    return elapsed_s * (1.0 - fraction) / fraction


class ProgressReporter:
    """A job's progress → Redis (a key per job, plus pub/sub) and the saq job (which doubles as
    its heartbeat), from any thread.

    Calling it (``reporter(stage, fraction)``, fraction of the whole job) only records the state
    and wakes a task on the event loop, so a pipeline's thread can report as often as it likes.
    That task writes the newest state at most every *interval_s* — a report inside the interval
    is sent at its end, never dropped — and every *refresh_s* while nothing changes. The
    fraction never goes back within a job; a stage's own 0-1 maps into the job with
    :meth:`scaled`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        redis: aioredis.Redis,
        job: Any,
        key: str,
        *,
        interval_s: float = PROGRESS_INTERVAL_S,
        refresh_s: float = PROGRESS_REFRESH_S,
    ) -> None:
        self._loop = loop
        self._redis = redis
        self._job = job
        self._key = key
        self._interval_s = interval_s
        self._refresh_s = refresh_s
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.stage = "queued"
        self.fraction = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        if self._closed:
            raise JobCancelled(f"job {self._key} has stopped")
        with self._lock:
            self.stage = stage
            self.fraction = max(self.fraction, min(1.0, max(0.0, fraction)))
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to tell
            self._loop.call_soon_threadsafe(self._changed.set)

    def scaled(self, low: float, high: float) -> Callable[[str, float], None]:
        """A progress callback whose 0-1 is this job's *low*..*high*."""

        def report(stage: str, fraction: float) -> None:
            self(stage, low + (high - low) * min(1.0, max(0.0, fraction)))

        return report

    def document(self) -> dict[str, Any]:
        with self._lock:
            stage, fraction = self.stage, self.fraction
        elapsed = time.monotonic() - self._started
        eta = eta_seconds(elapsed, fraction)
        return {
            "stage": stage,
            "percent": round(fraction * 100, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(elapsed, 1),
            "updated": time.time(),
        }

    async def start(self) -> None:
        """Write the current state now, then keep writing it while the job runs."""
        await self.send()
        self._task = asyncio.create_task(self._send_changes(), name=f"progress {self._key}")

    async def stop(self, *, final: bool = True) -> None:
        """Stop writing (a later report raises :class:`JobCancelled`); with *final*, write the
        state once more."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if final:
            await self.send()

    async def _send_changes(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._refresh_s)
            self._changed.clear()
            await self.send()
            await asyncio.sleep(self._interval_s)

    async def send(self) -> None:
        state = self.document()
        document = json.dumps(state)
        try:
            await self._redis.set(PROGRESS_PREFIX + self._key, document, ex=PROGRESS_TTL_S)
            await self._redis.publish(PROGRESS_PREFIX + self._key, document)
            await self._job.update(progress=state["percent"] / 100, meta={"stage": state["stage"]})
        except (aioredis.RedisError, OSError):
            log.warning("could not publish progress for %s", self._key)


async def run_job(  # noqa: PLR0913 - saq passes the job's fields as keyword arguments
    env: WorkerEnv,
    job: Any,
    *,
    kind: str,
    content_hash: str,
    profile: str,
    source_key: str,
    source_format: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    key = job_key(kind, content_hash, profile)
    prefix = outputs_prefix(profile, content_hash)
    publisher = Publisher(store=env.store, catalogue=env.catalogue, redis=env.redis)
    try:
        work = JobInput(key, prefix, source_key, source_format, job_settings(kind, settings))
    except ValueError as exc:  # a job no pipeline can run: retrying cannot help
        await publisher.fail_waiters(key, str(exc))
        return {"failed": str(exc)}
    loop = asyncio.get_running_loop()
    reporter = ProgressReporter(loop, env.redis, job, key)
    reporter("download", 0.0)
    await reporter.start()
    try:
        failed = None
        if await env.store.head(prefix + "outputs.json") is None:
            failed = await _make_outputs(env, job, reporter, publisher, work)
        if failed is not None:
            await reporter.stop(final=False)
            await env.redis.delete(PROGRESS_PREFIX + key)
            return failed
        reporter("publish", JOB_BANDS["upload"][1])
        published = await publisher.publish_waiters(key, profile, content_hash)
        reporter("done", 1.0)
        await reporter.stop()
        return {"published": published}
    finally:
        # Cancelled (timeout, abort, worker stop) or failed: stop writing at once; the
        # pipeline's next progress report raises JobCancelled, which stops it and its ffmpeg.
        await reporter.stop(final=False)


async def _make_outputs(
    env: WorkerEnv,
    job: Any,
    reporter: ProgressReporter,
    publisher: Publisher,
    work: JobInput,
) -> dict[str, Any] | None:
    """Download, run the pipeline, upload its outputs and ``outputs.json``; the job's result
    when the input is refused for good (``None`` when the outputs are in)."""
    key, prefix = work.key, work.prefix
    with tempfile.TemporaryDirectory(prefix="kshipra-job-") as temp:
        source = Path(temp) / f"source.{work.source_format}"
        out_dir = Path(temp) / "out"
        out_dir.mkdir()
        download = reporter.scaled(*JOB_BANDS["download"])
        await _download(env.store, work.source_key, source, lambda done: download("download", done))
        settings = work.settings
        if isinstance(settings, BundleJob):
            settings = await _previous_bundles(env, settings, Path(temp))
        heartbeat = asyncio.create_task(_heartbeat(job, env.config))
        try:
            outputs = await asyncio.to_thread(
                env.pipeline, source, out_dir, settings, reporter.scaled(*JOB_BANDS["pipeline"])
            )
        except PermanentFault as exc:
            await publisher.fail_waiters(key, str(exc))
            return {"failed": str(exc)}
        finally:
            heartbeat.cancel()
        upload = reporter.scaled(*JOB_BANDS["upload"])
        upload("upload", 0.0)
        sizes = [(await asyncio.to_thread(output.path.stat)).st_size for output in outputs.files]
        total, sent = max(1, sum(sizes)), 0
        files = []
        for output, size in zip(outputs.files, sizes, strict=True):
            etag = await asyncio.to_thread(_etag_of, output.path)
            await env.store.put(
                prefix + output.name,
                _file_chunks(output.path),
                content_type=output.content_type,
            )
            sent += size
            upload("upload", sent / total)
            files.append(
                {
                    "name": output.name,
                    "key": prefix + output.name,
                    "size_bytes": size,
                    "content_type": output.content_type,
                    "etag": etag,
                }
            )
        record = {"files": files, "primary": outputs.primary, "details": outputs.details}
        await env.store.put(
            prefix + "outputs.json",
            json.dumps(record, indent=1).encode(),
            content_type="application/json",
        )
    return None


async def _previous_bundles(env: WorkerEnv, settings: BundleJob, work: Path) -> BundleJob:
    """Write the previous K published versions' canonical bytes to files for the delta step."""
    manifest = await env.catalogue.get(settings.asset_id, fresh=True)
    previous: list[PreviousBundle] = []
    if manifest is not None:
        earlier = sorted(
            (
                v
                for v in manifest.versions
                if v.state == "published"
                and v.version < settings.version
                and "bundle.json" in v.renditions
            ),
            key=lambda v: v.version,
            reverse=True,
        )[: settings.previous_versions]
        for version in earlier:
            path = work / f"previous-v{version.version}.json"
            await _download(env.store, version.renditions["bundle.json"].key, path)
            previous.append(PreviousBundle(version=version.version, path=str(path)))
    return settings.model_copy(update={"previous": tuple(previous)})


async def _heartbeat(job: Any, config: KshipraConfig) -> None:
    """Keep the job alive while a pipeline step reports nothing for a while."""
    interval = max(1.0, config.transcode.heartbeat_s / 3)
    while True:
        await asyncio.sleep(interval)
        try:
            await job.update()
        except aioredis.RedisError:
            log.warning("heartbeat for job %s failed", job.key)
