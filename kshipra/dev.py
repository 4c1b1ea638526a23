"""``kshipra dev``: everything on one machine, on loopback, with local-directory storage and an
embedded Valkey. Ctrl-C stops it all."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import click

from cdn_config import parse_listen
from common.serving import run, serve_apps
from kshipra.embedded import EmbeddedValkey
from kshipra.terminal import Terminal

SAMPLE_BUNDLE = "neet-chemistry-mole-concept.json"
SAMPLE_ID = "sample-chem-mole"


def with_worker(app: Any, context: Any) -> Any:
    """The origin app, also running a transcode worker for its lifetime."""
    app.cleanup_ctx.append(context)
    return app


def _token(variable: str, terminal: Terminal) -> str:
    value = os.environ.get(variable)
    if value:
        return value
    value = secrets.token_urlsafe(24)
    os.environ[variable] = value
    terminal.info(f"generated {variable}={value}")
    return value


async def _upload_sample(origin_url: str, token: str) -> dict[str, Any]:
    body = files("kshipra.samples").joinpath(SAMPLE_BUNDLE).read_bytes()
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session,
        session.post(
            f"{origin_url}/v1/assets",
            params={"id": SAMPLE_ID, "kind": "bundle", "filename": SAMPLE_BUNDLE},
            data=body,
        ) as response,
    ):
        answer: dict[str, Any] = await response.json()
        if response.status not in (200, 201):
            raise RuntimeError(f"sample upload failed: {answer}")
        return answer


async def _wait_for_latest(origin_url: str, token: str, asset_id: str) -> str:
    """The sample's latest URL once the worker has published it."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for _ in range(600):
            async with session.get(f"{origin_url}/v1/assets/{asset_id}") as response:
                asset = await response.json()
            if asset["status"] == "published":
                return str(asset["urls"]["latest"])
            if asset["status"] == "failed":
                raise RuntimeError(f"the sample failed to process: {asset['status_reason']}")
            await asyncio.sleep(0.1)
    raise RuntimeError("the sample was not processed within a minute")


def _kshipra_command() -> str:
    """How to run ``kshipra`` from the user's shell: the bare name when it is on their PATH,
    else this install's own script (``./scripts/dev`` runs it from ``./.venv/bin``)."""
    beside = Path(sys.executable).parent / "kshipra"
    on_path = shutil.which("kshipra")
    if on_path is not None and Path(on_path).resolve() == beside.resolve():
        return "kshipra"
    return str(beside) if beside.exists() else "kshipra"


@click.command("dev")
@click.option("--origin-listen", default="127.0.0.1:8080", show_default=True)
@click.option(
    "--edge-listen",
    default="127.0.0.1:8081",
    show_default=True,
    help="Where the edge listens",
)
@click.option(
    "--data",
    "data_dir",
    default="./dev-data",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Storage, Valkey data and caches",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="Transcode workers in this process (each runs lectures, images and bundles on "
    "their own queues: a bundle never waits behind a lecture)",
)
def dev_command(origin_listen: str, edge_listen: str, data_dir: Path, workers: int) -> None:
    """Run origin, worker and edge on loopback with an embedded Valkey, upload a sample
    question bank, and print the URLs."""
    # Imported here so `kshipra --help` and the client commands start fast.
    from cdn_config import ConfigError, EdgeConfig, load_config  # noqa: PLC0415
    from edge.app import create_app as create_edge_app  # noqa: PLC0415
    from origin.app import create_app  # noqa: PLC0415
    from transcode.worker import worker_context  # noqa: PLC0415

    terminal = Terminal()
    try:
        parse_listen(origin_listen)
        parse_listen(edge_listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    upload_token = _token("KSHIPRA_UPLOAD_TOKEN", terminal)
    _token("KSHIPRA_PURGE_TOKEN", terminal)
    data_dir = data_dir.resolve()
    (data_dir / "storage").mkdir(parents=True, exist_ok=True)
    valkey = EmbeddedValkey(data_dir / "valkey")
    redis_url = valkey.start()
    try:
        config = load_config(
            None,
            environ=os.environ,
            overrides={
                "origin": {"listen": origin_listen, "storage": str(data_dir / "storage")},
                "redis": {"url": redis_url},
            },
        )
    except ConfigError as exc:
        valkey.stop()
        terminal.error(str(exc))
        sys.exit(2)
    host, port = parse_listen(origin_listen)
    edge_host, edge_port = parse_listen(edge_listen)
    edge_app = create_edge_app(
        EdgeConfig(
            name="kshipra-dev-edge",
            city="dev",
            listen=edge_listen,
            disk_dir=str(data_dir / "edge-cache"),
            memory_bytes=64 * 1024**2,
            disk_bytes=1024**3,
        ),
        upstream_url=f"http://{host}:{port}",
        purge_token=os.environ["KSHIPRA_PURGE_TOKEN"],
        redis_url=redis_url,  # the dev edge follows the purge stream like any fleet edge
    )

    async def ready(urls: list[str]) -> None:
        origin_url, edge_url = urls
        answer = await _upload_sample(origin_url, upload_token)
        latest = await _wait_for_latest(origin_url, upload_token, answer["asset"]["id"])
        through_edge = edge_url + latest.removeprefix(origin_url)
        terminal.result(f"origin   {origin_url}   (storage {data_dir / 'storage'})")
        terminal.result(f"edge     {edge_url}   (cache {data_dir / 'edge-cache'})")
        terminal.result(f"valkey   {redis_url}   (embedded, pid {valkey.pid})")
        lanes = config.transcode.concurrency
        terminal.result(
            f"workers  {workers} in this process (each: lecture x{lanes.lecture}, "
            f"image x{lanes.image}, bundle x{lanes.bundle}, one queue per kind)"
        )
        terminal.result(f"sample   {through_edge}")
        terminal.result(f"try      curl -si --compressed {through_edge} | grep -i cache-status")
        terminal.result(
            f"upload   KSHIPRA_UPLOAD_TOKEN={upload_token} "
            f"{_kshipra_command()} upload FILE --wait --origin {origin_url}"
        )
        terminal.result(
            f"purge    KSHIPRA_PURGE_TOKEN={os.environ['KSHIPRA_PURGE_TOKEN']} "
            f"{_kshipra_command()} purge --tag TAG --origin {origin_url}"
        )
        terminal.result("Ctrl-C stops everything.")

    try:
        run(
            serve_apps(
                [
                    (
                        with_worker(
                            create_app(config),
                            worker_context(
                                config, concurrency=config.transcode.concurrency, count=workers
                            ),
                        ),
                        host,
                        port,
                    ),
                    (edge_app, edge_host, edge_port),
                ],
                on_ready=ready,
            )
        )
    finally:
        valkey.stop()
        terminal.info("stopped")
