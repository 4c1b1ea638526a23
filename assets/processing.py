"""How an asset version becomes work for the transcode workers, and how finished work is
published: the contract between the origin (which submits) and the workers (which run and
publish).

Why saq: it is asyncio-native like the rest of Kshipra; a job's ``key`` makes enqueueing
idempotent; worker heartbeats let another worker notice a SIGKILLed one within seconds (arq
only re-runs after the whole job timeout, an hour for a long lecture) and its sweep re-queues
the job while ``retries`` allow; progress rides on ``job.update``. We pin the retry count
above saq's default of 1, which would abort a swept job instead of re-running it.

The flow for one uploaded version:

1. the origin registers the version as ``processing`` and calls :class:`TranscodeSubmitter`:
   the asset version is added to the waiters of job key ``{kind}:{content hash}:{profile}``
   and the job is enqueued (a no-op if that key is already queued or running);
2. a worker (``transcode.jobs.run_job``) runs the pipeline into a temp dir, uploads every
   output under ``renditions/{profile}/{hash}/`` and writes ``outputs.json`` there **last**;
3. it then publishes each waiting asset version (:class:`Publisher`): one manifest write each
   (that write is the publish), and a soft purge of the asset's tag on the purge stream.

A crash before step 3 leaves only unreferenced outputs, which a re-run overwrites in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from saq import Queue

from assets.blobstore import BlobStore
from assets.catalogue import Catalogue, Manifest, Rendition, Version, now_utc
from cdn_config import KshipraConfig
from common.wire import (
    PROGRESS_PREFIX,
    PURGE_STREAM,
    PURGE_STREAM_MAXLEN,
    WAITERS_PREFIX,
    PurgeEntry,
)

log = logging.getLogger(__name__)

QUEUE_NAME = "kshipra-transcode"
"""The prefix of the queues' names: one queue per kind, ``kshipra-transcode-{kind}``."""
JOB_KINDS = ("bundle", "image", "lecture")
PROGRESS_TTL_S = 24 * 3600
CODING_SUFFIXES = {"br": "br", "gz": "gzip", "dcz": "dcz"}
"""Pre-compressed outputs are served with this Content-Encoding."""
PIPELINE_VERSION = "1"
"""Bump when a pipeline's output changes for the same settings: new profile ids, new jobs."""


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


class _Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageJob(_Job):
    """An image's variants: the widths to make (never upscaled)."""

    kind: Literal["image"] = "image"
    widths: tuple[int, ...]


class PreviousBundle(_Job):
    """An earlier published version of a bundle, downloaded by the worker for the deltas."""

    version: int
    path: str


class BundleJob(_Job):
    """A question bank's version: canonical form, compressed copies, deltas against the
    ``previous_versions`` before it (the worker fills ``previous``)."""

    kind: Literal["bundle"] = "bundle"
    asset_id: str
    version: int
    previous_versions: int
    previous: tuple[PreviousBundle, ...] = ()


class LectureJob(_Job):
    """A lecture's ladder by name, with the ffmpeg to run; ``hevc=False``: H.264 only."""

    kind: Literal["lecture"] = "lecture"
    ladder: str = "lecture"
    ffmpeg: str | None = None
    hevc: bool | None = None


JobSettings = Annotated[ImageJob | BundleJob | LectureJob, Field(discriminator="kind")]
"""What a pipeline needs beyond the source, by kind: built by the origin
(:func:`pipeline_settings`), carried in the job as JSON (:func:`job_json`), read back by the
worker (:func:`job_settings`)."""
_JOB_SETTINGS: TypeAdapter[ImageJob | BundleJob | LectureJob] = TypeAdapter(JobSettings)


def job_json(settings: ImageJob | BundleJob | LectureJob) -> dict[str, Any]:
    """The settings as the job carries them (the kind travels beside them)."""
    exclude = {"kind"} | ({"previous"} if isinstance(settings, BundleJob) else set())
    return settings.model_dump(mode="json", exclude_none=True, exclude=exclude)


def job_settings(kind: str, document: Any) -> ImageJob | BundleJob | LectureJob:
    """A job's settings read back; :class:`ValueError` naming the problem if they are not
    the settings of a *kind* job."""
    if not isinstance(document, dict):
        raise ValueError(f"a job's settings are a JSON object, not {type(document).__name__}")
    try:
        return _JOB_SETTINGS.validate_python({**document, "kind": kind})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise ValueError(f"bad {kind} job settings: {problems}") from None


def profile_id(settings: ImageJob | BundleJob | LectureJob) -> str:
    """A short stable id of everything that decides a pipeline's output (the same id the
    untyped settings of earlier versions gave, so stored outputs stay found)."""
    blob = json.dumps(
        {"kind": settings.kind, "v": PIPELINE_VERSION, **job_json(settings)}, sort_keys=True
    )
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
) -> ImageJob | BundleJob | LectureJob:
    """What the worker needs to know beyond the source, from the configuration."""
    transcode = config.transcode
    if manifest.kind == "image":
        return ImageJob(widths=tuple(transcode.image_widths))
    if manifest.kind == "bundle":
        return BundleJob(
            asset_id=manifest.id,
            version=version.version,
            previous_versions=transcode.bundle_previous_versions,
        )
    return LectureJob(ladder=transcode.ladder_name, ffmpeg=config.media.ffmpeg_binary or None)


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
        profile = profile_id(settings)
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
            settings=job_json(settings),
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
                PurgeEntry(  # type: ignore[arg-type]  # redis-py's stubs want a wider mapping
                    "tag",
                    manifest.cache_tag,
                    soft=True,
                    reason=f"published v{number}",
                    requested_at=time.time(),
                ).fields(),
                maxlen=PURGE_STREAM_MAXLEN,
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
