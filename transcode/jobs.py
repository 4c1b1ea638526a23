"""Transcode jobs on a Redis-backed queue (saq), and publishing their outputs.

Why saq: it is asyncio-native like the rest of Kshipra; a job's ``key`` makes enqueueing
idempotent; worker heartbeats let another worker notice a SIGKILLed one within seconds (arq
only re-runs after the whole job timeout, an hour for a long lecture) and its sweep re-queues
the job while ``retries`` allow; progress rides on ``job.update``. We pin the retry count
above saq's default of 1, which would abort a swept job instead of re-running it.

The flow for one uploaded version:

1. the origin registers the version as ``processing`` and calls :class:`TranscodeSubmitter`:
   the asset version is added to the waiters of job key ``{kind}:{content hash}:{profile}``
   and the job is enqueued (a no-op if that key is already queued or running);
2. a worker runs the pipeline into a temp dir, uploads every output under
   ``renditions/{profile}/{hash}/`` and writes ``outputs.json`` there **last**;
3. it then publishes each waiting asset version: one manifest write each (that write is the
   publish), and an invalidation event for the asset's tag on the purge stream.

A crash before step 3 leaves only unreferenced outputs, which a re-run overwrites in place.
"""

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
from saq import Queue

from cdn_config import KshipraConfig
from origin.blobstore import BlobStore
from origin.catalogue import Catalogue, Manifest, Rendition, Version, now_utc
from transcode.base import Outputs, PermanentFault

log = logging.getLogger(__name__)

QUEUE_NAME = "kshipra-transcode"
"""The prefix of the queues' names: one queue per kind, ``kshipra-transcode-{kind}``."""
JOB_KINDS = ("bundle", "image", "lecture")
WAITERS_PREFIX = "kshipra:waiters:"
PROGRESS_PREFIX = "kshipra:progress:"
PURGE_STREAM = "kshipra:purges"
PROGRESS_TTL_S = 24 * 3600
CODING_SUFFIXES = {"br": "br", "gz": "gzip", "dcz": "dcz"}
"""Pre-compressed outputs are served with this Content-Encoding."""
PIPELINE_VERSION = "1"
"""Bump when a pipeline's output changes for the same settings: new profile ids, new jobs."""

Pipeline = Callable[[str, Path, Path, dict[str, Any], Callable[[str, float], None]], Outputs]


def make_queue(redis_url: str, kind: str) -> Queue:
    if kind not in JOB_KINDS:
        raise ValueError(f"no transcode queue for kind {kind!r}")
    return Queue.from_url(redis_url, name=f"{QUEUE_NAME}-{kind}")


class TranscodeQueues:
    """One saq queue per kind, so no small job waits behind a long one.

    A FIFO queue shared by every kind put a 2.4 MB question bank behind a 10-minute lecture
    for half an hour (its ladder takes about 3 CPU-seconds per second of video). With a queue
    per kind, a worker runs each kind with its own concurrency (``transcode.concurrency``),
    so bundles and images start at once whatever lectures are doing; lecture encodes also run
    at a lower CPU priority (:data:`transcode.hls.FFMPEG_NICENESS`), so a bundle's Brotli pass
    is not slowed by the ffmpeg beside it.
    """

    def __init__(self, redis_url: str, kinds: tuple[str, ...] = JOB_KINDS) -> None:
        self.by_kind = {kind: make_queue(redis_url, kind) for kind in kinds}

    async def connect(self) -> None:
        for queue in self.by_kind.values():
            await queue.connect()

    async def disconnect(self) -> None:
        for queue in self.by_kind.values():
            await queue.disconnect()

    def for_key(self, key: str) -> Queue:
        """The queue of a job key (``{kind}:{hash}:{profile}``)."""
        return self.by_kind[key.split(":", 1)[0]]

    async def enqueue(self, kind: str, **kwargs: Any) -> Any:
        return await self.by_kind[kind].enqueue("transcode", kind=kind, **kwargs)

    async def job(self, key: str) -> Any:
        try:
            queue = self.for_key(key)
        except KeyError:
            return None
        return await queue.job(key)

    async def info(self, *, jobs: bool = False, limit: int = 10) -> dict[str, Any]:
        """saq's ``Queue.info`` summed over the kinds' queues; each job names its kind."""
        merged: dict[str, Any] = {"queued": 0, "active": 0, "scheduled": 0, "workers": {}}
        merged["jobs"] = []
        for kind, queue in self.by_kind.items():
            info: Any = await queue.info(jobs=jobs, limit=limit)
            for field in ("queued", "active", "scheduled"):
                merged[field] += int(info.get(field) or 0)
            merged["workers"].update(info.get("workers") or {})
            merged["jobs"].extend({**job, "queue": kind} for job in info.get("jobs") or [])
        merged["jobs"] = merged["jobs"][:limit]
        return merged


def profile_id(kind: str, settings: dict[str, Any]) -> str:
    """A short stable id of everything that decides a pipeline's output."""
    blob = json.dumps({"kind": kind, "v": PIPELINE_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def job_key(kind: str, content_hash: str, profile: str) -> str:
    return f"{kind}:{content_hash}:{profile}"


def outputs_prefix(profile: str, content_hash: str) -> str:
    return f"renditions/{profile}/{content_hash}/"


@dataclass(frozen=True, slots=True)
class JobLimits:
    timeout_s: int = 3 * 3600
    heartbeat_s: int = 30
    retries: int = 4
    retry_delay_s: float = 5.0


def pipeline_settings(
    config: KshipraConfig, manifest: Manifest, version: Version
) -> dict[str, Any]:
    """What the worker needs to know beyond the source, as JSON (it travels in the job)."""
    transcode = config.transcode
    if manifest.kind == "image":
        return {"widths": list(transcode.image_widths)}
    if manifest.kind == "bundle":
        return {
            "asset_id": manifest.id,
            "version": version.version,
            "previous_versions": transcode.bundle_previous_versions,
        }
    settings: dict[str, Any] = {"ladder": transcode.ladder_name}
    if config.media.ffmpeg_binary:
        settings["ffmpeg"] = config.media.ffmpeg_binary
    return settings


class TranscodeSubmitter:
    """The origin's side: hand a new version to the queue."""

    def __init__(
        self,
        *,
        queues: TranscodeQueues,
        redis: aioredis.Redis,
        store: BlobStore,
        catalogue: Catalogue,
        config: KshipraConfig,
        limits: JobLimits,
    ) -> None:
        self._queues = queues
        self._redis = redis
        self._store = store
        self._catalogue = catalogue
        self._config = config
        self._limits = limits

    async def __call__(self, manifest: Manifest, version: Version) -> None:
        settings = pipeline_settings(self._config, manifest, version)
        profile = profile_id(manifest.kind, settings)
        content_hash = version.source.content_hash
        key = job_key(manifest.kind, content_hash, profile)
        await self._redis.sadd(WAITERS_PREFIX + key, f"{manifest.id}:{version.version}")
        await self._redis.expire(WAITERS_PREFIX + key, 30 * 24 * 3600)
        publisher = Publisher(store=self._store, catalogue=self._catalogue, redis=self._redis)
        if await self._store.head(outputs_prefix(profile, content_hash) + "outputs.json"):
            await publisher.publish_waiters(key, profile, content_hash)
            return
        job = await self._queues.enqueue(
            manifest.kind,
            key=key,
            timeout=self._limits.timeout_s,
            heartbeat=self._limits.heartbeat_s,
            retries=self._limits.retries,
            retry_delay=self._limits.retry_delay_s,
            retry_backoff=True,
            content_hash=content_hash,
            profile=profile,
            source_key=version.source.key,
            source_format=version.source.format,
            settings=settings,
        )
        log.info(
            "%s %s v%d: job %s %s",
            manifest.kind,
            manifest.id,
            version.version,
            key,
            "queued" if job is not None else "already queued",
        )


class Publisher:
    """Turns finished outputs into published asset versions."""

    def __init__(self, *, store: BlobStore, catalogue: Catalogue, redis: aioredis.Redis) -> None:
        self._store = store
        self._catalogue = catalogue
        self._redis = redis

    async def _record(self, profile: str, content_hash: str) -> dict[str, Any]:
        reader = await self._store.get(outputs_prefix(profile, content_hash) + "outputs.json")
        record: dict[str, Any] = json.loads(await reader.read_all())
        return record

    async def publish_waiters(self, key: str, profile: str, content_hash: str) -> int:
        record = await self._record(profile, content_hash)
        published = 0
        for member in await self._redis.smembers(WAITERS_PREFIX + key):
            asset_id, _, number = str(member).rpartition(":")
            if await self._settle(asset_id, int(number), failed=None, record=record):
                published += 1
            await self._redis.srem(WAITERS_PREFIX + key, member)
        return published

    async def fail_waiters(self, key: str, reason: str) -> None:
        for member in await self._redis.smembers(WAITERS_PREFIX + key):
            asset_id, _, number = str(member).rpartition(":")
            await self._settle(asset_id, int(number), failed=reason, record=None)
            await self._redis.srem(WAITERS_PREFIX + key, member)

    async def _settle(
        self, asset_id: str, number: int, *, failed: str | None, record: dict[str, Any] | None
    ) -> bool:
        async with self._redis.lock(
            f"kshipra:lock:asset:{asset_id}", timeout=60, blocking_timeout=30
        ):
            manifest = await self._catalogue.get(asset_id, fresh=True)
            version = manifest.version(number) if manifest is not None else None
            if manifest is None or version is None or version.state != "processing":
                return False
            now = now_utc()
            if failed is not None:
                version = version.model_copy(update={"state": "failed", "state_reason": failed})
            else:
                assert record is not None
                renditions = dict(version.renditions)
                for item in record["files"]:
                    renditions[item["name"]] = Rendition(
                        key=item["key"],
                        size_bytes=item["size_bytes"],
                        content_type=item["content_type"],
                        etag=item["etag"],
                        content_encoding=CODING_SUFFIXES.get(item["name"].rsplit(".", 1)[-1]),
                    )
                pointer = await self._pointer(manifest, number, record, renditions)
                version = version.model_copy(
                    update={
                        "state": "published",
                        "published_at": now,
                        "renditions": renditions,
                        "primary": pointer,
                        "details": {**record.get("details", {}), "primary": record["primary"]},
                    }
                )
            versions = [version if v.version == number else v for v in manifest.versions]
            published = [v.version for v in versions if v.state == "published"]
            newest = max(versions, key=lambda v: v.version)
            manifest = manifest.model_copy(
                update={
                    "versions": versions,
                    "current_version": max(published) if published else None,
                    "status": newest.state,
                    "status_reason": newest.state_reason,
                    "updated_at": now,
                }
            )
            await self._catalogue.put(manifest)
        if failed is None:
            await self._redis.xadd(
                PURGE_STREAM,
                {
                    "kind": "tag",
                    "value": manifest.cache_tag,
                    "soft": "1",
                    "reason": f"published v{number}",
                    "requested_at": f"{time.time():.6f}",
                },
                maxlen=100_000,
                approximate=True,
            )
            log.info("published %s v%d", asset_id, number)
        else:
            log.warning("%s v%d failed: %s", asset_id, number, failed)
        return True

    async def _pointer(
        self,
        manifest: Manifest,
        number: int,
        record: dict[str, Any],
        renditions: dict[str, Rendition],
    ) -> str:
        """The rendition ``latest`` serves. A lecture's master playlist names its rungs
        relatively, so ``latest.m3u8`` gets a copy whose URIs point into ``v{n}/``."""
        primary: str = record["primary"]
        if manifest.kind != "lecture" or not primary.endswith(".m3u8"):
            return primary
        reader = await self._store.get(renditions[primary].key)
        rewritten = rewrite_playlist_uris((await reader.read_all()).decode(), f"v{number}/")
        body = rewritten.encode()
        key = f"assets/{manifest.id}/v{number}-latest.m3u8"
        await self._store.put(key, body, content_type="application/vnd.apple.mpegurl")
        name = "latest-master.m3u8"
        renditions[name] = Rendition(
            key=key,
            size_bytes=len(body),
            content_type="application/vnd.apple.mpegurl",
            etag=f'"{hashlib.sha256(body).hexdigest()[:40]}"',
        )
        return name


def rewrite_playlist_uris(playlist: str, prefix: str) -> str:
    """Prefix every relative URI in an HLS playlist (URI lines and ``URI="…"`` attributes)."""
    out = []
    for line in playlist.splitlines():
        rewritten = line
        if line and not line.startswith("#") and "://" not in line and not line.startswith("/"):
            rewritten = prefix + line
        elif 'URI="' in line:
            head, _, rest = line.partition('URI="')
            if "://" not in rest.split('"', 1)[0] and not rest.startswith("/"):
                rewritten = f'{head}URI="{prefix}{rest}'
        out.append(rewritten)
    return "\n".join(out) + "\n"


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


async def run_job(
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
    loop = asyncio.get_running_loop()
    reporter = ProgressReporter(loop, env.redis, job, key)
    reporter("download", 0.0)
    await reporter.start()
    try:
        failed = None
        if await env.store.head(prefix + "outputs.json") is None:
            failed = await _make_outputs(
                env, job, reporter, publisher, key, prefix, kind, source_key, source_format,
                settings,
            )  # fmt: skip
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
    key: str,
    prefix: str,
    kind: str,
    source_key: str,
    source_format: str,
    settings: dict[str, Any],
) -> dict[str, Any] | None:
    """Download, run the pipeline, upload its outputs and ``outputs.json``; the job's result
    when the input is refused for good (``None`` when the outputs are in)."""
    with tempfile.TemporaryDirectory(prefix="kshipra-job-") as work:
        source = Path(work) / f"source.{source_format}"
        out_dir = Path(work) / "out"
        out_dir.mkdir()
        download = reporter.scaled(*JOB_BANDS["download"])
        await _download(env.store, source_key, source, lambda done: download("download", done))
        if kind == "bundle":
            settings = await _previous_bundles(env, settings, Path(work))
        heartbeat = asyncio.create_task(_heartbeat(job, env.config))
        try:
            outputs = await asyncio.to_thread(
                env.pipeline,
                kind,
                source,
                out_dir,
                settings,
                reporter.scaled(*JOB_BANDS["pipeline"]),
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


async def _previous_bundles(env: WorkerEnv, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """Write the previous K published versions' canonical bytes to files for the delta step."""
    manifest = await env.catalogue.get(settings["asset_id"], fresh=True)
    previous: list[dict[str, Any]] = []
    if manifest is not None:
        earlier = sorted(
            (
                v
                for v in manifest.versions
                if v.state == "published"
                and v.version < settings["version"]
                and "bundle.json" in v.renditions
            ),
            key=lambda v: v.version,
            reverse=True,
        )[: settings["previous_versions"]]
        for version in earlier:
            path = work / f"previous-v{version.version}.json"
            await _download(env.store, version.renditions["bundle.json"].key, path)
            previous.append({"version": version.version, "path": str(path)})
    return {**settings, "previous": previous}


async def _heartbeat(job: Any, config: KshipraConfig) -> None:
    """Keep the job alive while a pipeline step reports nothing for a while."""
    interval = max(1.0, config.transcode.heartbeat_s / 3)
    while True:
        await asyncio.sleep(interval)
        try:
            await job.update()
        except aioredis.RedisError:
            log.warning("heartbeat for job %s failed", job.key)


async def progress_of(redis: aioredis.Redis, key: str) -> dict[str, Any] | None:
    """The newest progress document of job *key* (see :meth:`ProgressReporter.document`):
    ``stage``, ``percent`` (0-100), ``eta_s`` (seconds, or ``None`` while too early to
    tell), ``elapsed_s`` and ``updated`` (Unix time); ``None`` when none is stored."""
    raw = await redis.get(PROGRESS_PREFIX + key)
    if raw is None:
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    return dict(document) if isinstance(document, dict) else None


__all__ = [
    "JOB_KINDS",
    "PURGE_STREAM",
    "QUEUE_NAME",
    "JobLimits",
    "Publisher",
    "TranscodeQueues",
    "TranscodeSubmitter",
    "WorkerEnv",
    "make_queue",
    "progress_of",
    "run_job",
]
