"""The worker process: saq's worker around :func:`transcode.jobs.run_job`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from saq import Queue, Worker
from saq.types import Context, PartialTimersDict

from assets.blobstore import open_blob_store
from assets.catalogue import Catalogue
from assets.processing import JOB_KINDS, TranscodeQueues
from cdn_config import JobConcurrency, KshipraConfig
from transcode.jobs import WorkerEnv, run_job
from transcode.pipelines import run_pipeline

log = logging.getLogger(__name__)


class _UpkeepStopNoise(logging.Filter):
    """saq's ``Worker.stop`` waits for all its tasks, its never-ending upkeep loops included,
    so every stop logs that "some tasks did not finish" and cancels them. That is how saq
    stops, not a problem; :func:`run_worker` says itself when a stop cancels a running job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Some tasks did not finish within the shutdown")


logging.getLogger("saq").addFilter(_UpkeepStopNoise())


async def run_worker(
    config: KshipraConfig, *, concurrency: JobConcurrency, stop: asyncio.Event
) -> None:
    """Take jobs until *stop* is set; finish or hand back the running ones. One saq worker per
    kind with its own queue and concurrency (see :class:`assets.processing.TranscodeQueues`)."""
    kinds = tuple(kind for kind in JOB_KINDS if getattr(concurrency, kind) > 0)
    queues = TranscodeQueues(config.redis.url, kinds)
    await queues.connect()
    store = open_blob_store(
        config.origin.storage,
        s3_endpoint=config.origin.s3_endpoint,
        s3_region=config.origin.s3_region,
    )
    redis_client = aioredis.Redis.from_url(config.redis.url, decode_responses=True)
    env = WorkerEnv(
        store=store,
        catalogue=Catalogue(store, cache_ttl_s=0.0),
        redis=redis_client,
        config=config,
        pipeline=run_pipeline,
    )

    async def transcode(ctx: Context, **kwargs: Any) -> dict[str, Any]:
        return await run_job(env, ctx["job"], **kwargs)

    name = f"{os.uname().nodename}-{os.getpid()}"
    workers = {
        kind: _saq_worker(queue, transcode, getattr(concurrency, kind), f"{name}-{kind}")
        for kind, queue in queues.by_kind.items()
    }
    sweep_interval_s = max(1.0, config.transcode.heartbeat_s / 2)
    # Before the workers start: their start-up sweep must already be ours (see below).
    sweeps = [_take_over_sweep(worker.queue) for worker in workers.values()]
    tasks = [asyncio.create_task(worker.start()) for worker in workers.values()]
    tasks += [asyncio.create_task(_sweep_forever(sweep, sweep_interval_s)) for sweep in sweeps]
    log.info(
        "worker %s taking jobs: %s",
        name,
        ", ".join(f"{kind} x{getattr(concurrency, kind)}" for kind in kinds),
    )
    try:
        await stop.wait()
    finally:
        running = sum(len(worker.job_task_contexts) for worker in workers.values())
        if running:
            log.warning(
                "stopping with %d job(s) running: they are cancelled here and another worker "
                "takes them over after the heartbeat timeout",
                running,
            )
        for worker in workers.values():
            await worker.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await queues.disconnect()
        await redis_client.aclose()
        await store.close()


def _saq_worker(
    queue: Queue,
    transcode: Callable[..., Awaitable[dict[str, Any]]],
    concurrency: int,
    worker_id: str,
) -> Worker[Context]:
    worker: Worker[Context] = Worker(
        queue,
        functions=[("transcode", transcode)],
        concurrency=concurrency,
        # saq's own sweep takes a 60 s lock; we sweep on our own, faster timer.
        timers=PartialTimersDict(sweep=3600, schedule=1, abort=1, worker_info=10),
        id=worker_id,
    )
    # Our process owns SIGINT/SIGTERM (they stop the servers too); saq would take them over.
    worker.SIGNALS = []
    return worker


Sweep = Callable[..., Awaitable[list[str]]]


def _take_over_sweep(queue: Queue) -> Sweep:
    """saq sweeps once as it starts, racing its own first dequeue (a job in the active list
    that is not yet marked active gets aborted, and is then never retried), so its own sweep
    is switched off and :func:`_sweep_forever` runs the original on our timer."""
    sweep = queue.sweep

    async def no_sweep(lock: int = 60, abort: float = 5.0) -> list[str]:
        return []

    queue.sweep = no_sweep  # type: ignore[method-assign]
    return sweep


async def _sweep_forever(sweep: Sweep, interval_s: float) -> None:
    """Not at once: saq's sweep also takes back jobs that sit in the active list before their
    worker marks them active, which is what a starting worker does."""
    await asyncio.sleep(interval_s)
    while True:
        try:
            swept = await sweep(lock=max(1, int(interval_s)))
            if swept:
                log.info("took over %d job(s) from silent workers: %s", len(swept), swept)
        except Exception:
            log.exception("sweep failed; will retry")
        await asyncio.sleep(interval_s)


def worker_context(
    config: KshipraConfig, *, concurrency: JobConcurrency, count: int = 1
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Run *count* workers alongside an aiohttp application (``kshipra dev``)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(run_worker(config, concurrency=concurrency, stop=stop))
            for _ in range(count)
        ]
        yield
        stop.set()
        await asyncio.gather(*tasks)

    return context
