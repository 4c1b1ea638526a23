"""``kshipra worker``."""

from __future__ import annotations

import asyncio
import signal

import click

from common.serving import run
from kshipra.terminal import Terminal


def concurrency_overrides(values: tuple[str, ...]) -> dict[str, int] | None:
    """``("lecture=2", "image=0")`` → ``{"lecture": 2, "image": 0}``; a bare ``N`` is
    lectures. Checked further by the configuration model."""
    if not values:
        return None
    wanted: dict[str, int] = {}
    for value in values:
        kind, _, number = value.rpartition("=")
        if not number.isdigit():
            raise click.BadParameter(
                f"expected [KIND=]N, got {value!r}", param_hint="--concurrency"
            )
        wanted[kind or "lecture"] = int(number)
    return wanted


@click.command("worker")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file")
@click.option("--redis", "redis_url", help="redis://HOST:PORT[/DB] (the origin's)")
@click.option("--storage", help="Directory, or s3://BUCKET (the origin's)")
@click.option("--s3-endpoint", help="S3 endpoint URL")
@click.option(
    "--concurrency",
    "concurrency",
    multiple=True,
    metavar="[KIND=]N",
    help="Jobs of a kind at once, e.g. lecture=2 or image=0 (none here); a bare N is "
    "lectures. Repeatable [default lecture=1 image=2 bundle=2, or the config's]",
)
def worker_command(
    config_file: str | None,
    redis_url: str | None,
    storage: str | None,
    s3_endpoint: str | None,
    concurrency: tuple[str, ...],
) -> None:
    """Run a transcode worker: lectures → HLS, images → variants, bundles → packs."""
    from kshipra.origin_cli import configure_logging, load_or_exit  # noqa: PLC0415 - shared helpers
    from transcode.worker import run_worker  # noqa: PLC0415 - heavy imports

    config = load_or_exit(
        config_file,
        {
            "redis": {"url": redis_url},
            "origin": {"storage": storage, "s3_endpoint": s3_endpoint},
            "transcode": {"concurrency": concurrency_overrides(concurrency)},
        },
    )
    configure_logging(config.log_level)
    if config.redis.url == "embedded":
        Terminal().error("a worker needs the origin's Redis: give --redis URL")
        raise SystemExit(2)
    workers = config.transcode.concurrency

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(config, concurrency=workers, stop=stop)

    run(main())
