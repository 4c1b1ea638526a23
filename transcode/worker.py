"""The worker process: saq's worker around :func:`transcode.jobs.run_job`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from saq import Worker
from saq.types import Context, PartialTimersDict

from cdn_config import KshipraConfig
from origin.blobstore import open_blob_store
from origin.catalogue import Catalogue
from transcode.jobs import WorkerEnv, make_queue, run_job
from transcode.pipelines import run_pipeline

log = logging.getLogger(__name__)


class _UpkeepStopNoise(logging.Filter):
    """saq's ``Worker.stop`` waits for all its tasks, its never-ending upkeep loops included,
    so every stop logs that "some tasks did not finish" and cancels them. That is how saq
    stops, not a problem; :func:`run_worker` says itself when a stop cancels a running job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Some tasks did not finish within the shutdown")


logging.getLogger("saq").addFilter(_UpkeepStopNoise())


async def run_worker(config: KshipraConfig, *, concurrency: int, stop: asyncio.Event) -> None:
    """Take jobs until *stop* is set; finish or hand back the running ones."""
    queue = make_queue(config.redis.url)
    await queue.connect()
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

    worker = Worker(
        queue,
        functions=[("transcode", transcode)],
        concurrency=concurrency,
        # saq's own sweep takes a 60 s lock; we sweep on our own, faster timer below.
        timers=PartialTimersDict(sweep=3600, schedule=1, abort=1, worker_info=10),
        id=f"{os.uname().nodename}-{os.getpid()}",
    )
    # Our process owns SIGINT/SIGTERM (they stop the servers too); saq would take them over.
    worker.SIGNALS = []
    # saq sweeps once as it starts, racing its own first dequeue (a job in the active list
    # that is not yet marked active gets aborted). We sweep on our own timer instead.
    sweep = queue.sweep

    async def no_sweep(lock: int = 60, abort: float = 5.0) -> list[str]:
        return []

    queue.sweep = no_sweep  # type: ignore[method-assign]
    sweep_interval_s = max(1.0, config.transcode.heartbeat_s / 2)

    async def sweep_forever() -> None:
        # Not at once: saq's sweep also takes back jobs that sit in the active list before
        # their worker marks them active, which is exactly what a starting worker does.
        await asyncio.sleep(sweep_interval_s)
        while True:
            try:
                swept = await sweep(lock=max(1, int(sweep_interval_s)))
                if swept:
                    log.info("took over %d job(s) from silent workers: %s", len(swept), swept)
            except Exception:
                log.exception("sweep failed; will retry")
            await asyncio.sleep(sweep_interval_s)

    worker_task = asyncio.create_task(worker.start())
    sweeper = asyncio.create_task(sweep_forever())
    log.info("worker %s taking jobs (concurrency %d)", worker.id, concurrency)
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        running = len(worker.job_task_contexts)
        if running:
            log.warning(
                "stopping with %d job(s) running: they are cancelled here and another worker "
                "takes them over after the heartbeat timeout",
                running,
            )
        await worker.stop()
        worker_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task
        await queue.disconnect()
        await redis_client.aclose()
        await store.close()


def worker_context(
    config: KshipraConfig, *, concurrency: int
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Run a worker alongside an aiohttp application (``kshipra dev``)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(run_worker(config, concurrency=concurrency, stop=stop))
        yield
        stop.set()
        await task

    return context
