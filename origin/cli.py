"""``kshipra origin``, ``upload``, ``jobs`` and ``status``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cdn_config import ConfigError, KshipraConfig, load_config, parse_byte_size, parse_listen
from kshipra.embedded import EmbeddedValkey
from kshipra.serve import run, serve_apps
from kshipra.terminal import Terminal
from origin.app import create_app
from origin.client import (
    BadInput,
    ClientError,
    OriginClient,
    SilentListener,
    TransferListener,
    UploadReport,
    default_origin_url,
)
from origin.sniff import KINDS

EXIT_OK, EXIT_BAD_INPUT, EXIT_AUTH, EXIT_SERVER = 0, 2, 3, 4


def load_or_exit(config_file: str | None, overrides: dict[str, Any]) -> KshipraConfig:
    try:
        return load_config(config_file, environ=os.environ, overrides=overrides)
    except ConfigError as exc:
        Terminal().error(str(exc))
        sys.exit(EXIT_BAD_INPUT)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def require_upload_token(config: KshipraConfig) -> None:
    if config.secrets.upload_token is None:
        Terminal().error(
            "set KSHIPRA_UPLOAD_TOKEN (at least 16 characters) so the content team's API is "
            "protected; `kshipra dev` generates one for you"
        )
        sys.exit(EXIT_BAD_INPUT)


@click.command("origin")
@click.option("--listen", help="HOST:PORT to serve on [default 127.0.0.1:8080]")
@click.option("--storage", help="Directory, or s3://BUCKET")
@click.option("--s3-endpoint", help="S3 endpoint URL (MinIO, Ceph RGW, a test server)")
@click.option("--redis", "redis_url", help="redis://HOST:PORT[/DB], or 'embedded'")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file")
def origin_command(
    listen: str | None,
    storage: str | None,
    s3_endpoint: str | None,
    redis_url: str | None,
    config_file: str | None,
) -> None:
    """Run the origin: upload API, asset catalogue and content for edges."""
    config = load_or_exit(
        config_file,
        {
            "origin": {"listen": listen, "storage": storage, "s3_endpoint": s3_endpoint},
            "redis": {"url": redis_url},
        },
    )
    require_upload_token(config)
    configure_logging(config.log_level)
    embedded = EmbeddedValkey() if config.redis.url == "embedded" else None
    if embedded is not None:
        url = embedded.start()
        config = config.model_copy(update={"redis": config.redis.model_copy(update={"url": url})})
    host, port = parse_listen(config.origin.listen)
    terminal = Terminal()

    async def ready(urls: list[str]) -> None:
        terminal.info(
            f"origin listening on {urls[0]} (storage {config.origin.storage}, "
            f"redis {'embedded ' if embedded else ''}{config.redis.url})"
        )

    try:
        run(serve_apps([(create_app(config), host, port)], on_ready=ready))
    finally:
        if embedded is not None:
            embedded.stop()


class ProgressListener:
    """Shows a transfer as a rich progress bar with bytes/s and ETA."""

    def __init__(self, progress: Progress, description: str) -> None:
        self._progress = progress
        self._description = description
        self._task: TaskID | None = None

    def started(self, *, total_bytes: int, already_bytes: int, phase: str) -> None:
        self._task = self._progress.add_task(
            self._description, total=total_bytes, completed=already_bytes
        )

    def advanced(self, sent_bytes: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, sent_bytes)

    def finished(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, completed=task.total)


def _parse_rate(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_byte_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _report_json(report: UploadReport) -> dict[str, Any]:
    return {
        "asset": report.asset,
        "id": report.asset["id"],
        "kind": report.asset["kind"],
        "version": report.asset["version"],
        "newest_version": report.asset["newest_version"],
        "status": report.asset["status"],
        "created": report.created,
        "urls": report.asset["urls"],
        "upload": {
            "mode": report.mode,
            "size_bytes": report.size_bytes,
            "sent_bytes": report.sent_bytes,
            "parts_total": report.parts_total,
            "resumed_parts": report.resumed_parts,
            "duration_s": round(report.duration_s, 3),
            **report.extra,
        },
    }


@click.command("upload")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(KINDS), help="Checked against the file's bytes")
@click.option("--id", "asset_id", help="Asset id [default: from the file name]")
@click.option("--tag", "tags", multiple=True, help="Cache tag (repeatable)")
@click.option("--origin", "origin_url", envvar="KSHIPRA_ORIGIN_URL", help="Origin base URL")
@click.option("--wait", is_flag=True, help="Wait until the asset is processed and published")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object")
@click.option("--max-rate", help="Cap the upload rate, e.g. 2MiB (per second)")
def upload_command(
    path: Path,
    kind: str | None,
    asset_id: str | None,
    tags: tuple[str, ...],
    origin_url: str | None,
    wait: bool,
    json_output: bool,
    max_rate: str | None,
) -> None:
    """Upload a lecture, image or question-bank bundle; large files resume where they
    stopped.

    Exit codes: 0 done, 2 bad input, 3 authentication failed, 4 origin failed or unreachable.
    """
    terminal = Terminal(json_output=json_output)
    rate = _parse_rate(max_rate)
    token = os.environ.get("KSHIPRA_UPLOAD_TOKEN")
    base_url = origin_url or default_origin_url()

    async def main() -> UploadReport:
        async with OriginClient(base_url, token) as client:
            if terminal.interactive:
                columns = (
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(binary_units=True),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                )
                with Progress(*columns, console=terminal.err, transient=False) as progress:
                    listener: TransferListener = ProgressListener(progress, f"upload {path.name}")
                    report = await client.upload(
                        path,
                        kind=kind,
                        asset_id=asset_id,
                        tags=list(tags),
                        listener=listener,
                        max_rate_bytes_per_s=rate,
                    )
            else:
                report = await client.upload(
                    path,
                    kind=kind,
                    asset_id=asset_id,
                    tags=list(tags),
                    listener=SilentListener(),
                    max_rate_bytes_per_s=rate,
                )
            if wait:
                version = int(report.asset["newest_version"])
                if terminal.interactive:
                    with Progress(
                        TextColumn("{task.description}"),
                        BarColumn(),
                        TaskProgressColumn(),
                        TimeRemainingColumn(),
                        console=terminal.err,
                    ) as progress:
                        view = RichProcessingView(progress, f"process {path.name}")
                        report.asset = await _wait_published(
                            client, report.asset["id"], version, view
                        )
                else:
                    report.asset = await _wait_published(client, report.asset["id"], version, None)
            return report

    try:
        report = asyncio.run(main())
    except ClientError as exc:
        terminal.error(str(exc))
        sys.exit(exc.exit_code)
    if json_output:
        terminal.emit_json(_report_json(report))
        return
    asset = report.asset
    if asset["status"] == "published" and asset.get("version") is not None:
        verb = "published" if report.created else "already published"
        terminal.result(f"{verb}: {asset['kind']} [bold]{asset['id']}[/] v{asset['version']}")
    else:
        terminal.result(
            f"uploaded: {asset['kind']} [bold]{asset['id']}[/] v{asset['newest_version']} "
            f"({asset['newest_state']}; `kshipra status {asset['id']}` or --wait to follow)"
        )
    if report.mode == "resumable" and report.resumed_parts:
        terminal.result(
            f"resumed: {report.resumed_parts} of {report.parts_total} parts were already there"
        )
    for name, url in asset["urls"].items():
        terminal.result(f"  {name:<22} {url}")


class ProcessingView(Protocol):
    def show(self, stage: str, percent: float) -> None: ...


async def _wait_published(
    client: OriginClient, asset_id: str, version: int, view: ProcessingView | None
) -> dict[str, Any]:
    """Poll the catalogue until *version* of the asset is published (or failed), showing the
    worker's progress."""
    while True:
        asset = await client.asset(asset_id)
        if asset.get("version") is not None and asset["version"] >= version:
            if view is not None:
                view.show("published", 100.0)
            return asset
        newest_state = asset.get("newest_state")
        if asset.get("newest_version") == version and newest_state == "failed":
            raise BadInput(f"processing failed: {asset.get('status_reason')}")
        processing = asset.get("processing") or {}
        if view is not None:
            view.show(str(processing.get("stage", "queued")), float(processing.get("percent", 0)))
        await asyncio.sleep(0.5)


class RichProcessingView:
    def __init__(self, progress: Progress, description: str) -> None:
        self._progress = progress
        self._task = progress.add_task(description, total=100.0)
        self._description = description

    def show(self, stage: str, percent: float) -> None:
        self._progress.update(
            self._task, completed=percent, description=f"{self._description} ({stage})"
        )


def _client_call(json_output: bool, origin_url: str | None, call: Any) -> Any:
    terminal = Terminal(json_output=json_output)
    token = os.environ.get("KSHIPRA_UPLOAD_TOKEN")

    async def main() -> Any:
        async with OriginClient(origin_url or default_origin_url(), token) as client:
            return await call(client)

    try:
        return terminal, asyncio.run(main())
    except ClientError as exc:
        terminal.error(str(exc))
        sys.exit(exc.exit_code)


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@click.command("jobs")
@click.option("--origin", "origin_url", envvar="KSHIPRA_ORIGIN_URL", help="Origin base URL")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object")
def jobs_command(origin_url: str | None, json_output: bool) -> None:
    """List the transcode queue's jobs and every asset's processing state."""

    async def call(client: OriginClient) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return await client.jobs(), await client.list_assets()

    terminal, (queue, assets) = _client_call(json_output, origin_url, call)
    if json_output:
        terminal.emit_json({"queue": queue, "assets": assets})
        return
    terminal.out.print(
        f"queue: {queue.get('queued', 0)} queued, {queue.get('active', 0)} active, "
        f"{queue.get('workers', 0)} worker(s)"
    )
    if queue.get("jobs"):
        jobs_table = Table("job", "status", "attempts", "stage", "progress", "eta")
        for job in queue["jobs"]:
            progress = job.get("progress") or {}
            eta = progress.get("eta_s")
            jobs_table.add_row(
                str(job["key"])[:60],
                str(job.get("status")),
                str(job.get("attempts")),
                str(progress.get("stage", "")),
                f"{progress.get('percent', 0):.0f}%",
                "" if eta is None else f"{eta:.0f} s",
            )
        terminal.out.print(jobs_table)
    table = Table("asset", "kind", "status", "published", "newest", "size", "updated")
    for asset in assets:
        version = asset.get("version")
        table.add_row(
            asset["id"],
            asset["kind"],
            asset["status"],
            "-" if version is None else f"v{version}",
            f"v{asset['newest_version']} ({asset['newest_state']})",
            _human_bytes(asset["size_bytes"]),
            asset["updated_at"],
        )
    terminal.out.print(table)


@click.command("status")
@click.argument("asset_id")
@click.option("--origin", "origin_url", envvar="KSHIPRA_ORIGIN_URL", help="Origin base URL")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object")
def status_command(asset_id: str, origin_url: str | None, json_output: bool) -> None:
    """Show what the catalogue knows about one asset."""

    async def call(client: OriginClient) -> dict[str, Any]:
        return await client.asset(asset_id)

    terminal, asset = _client_call(json_output, origin_url, call)
    if json_output:
        terminal.emit_json(asset)
        return
    terminal.result(f"[bold]{asset['id']}[/] ({asset['kind']}) — {asset['status']}")
    terminal.result(f"  version      v{asset['version']} of {asset['versions']}")
    terminal.result(f"  size         {_human_bytes(asset['size_bytes'])} ({asset['format']})")
    terminal.result(f"  content hash {asset['content_hash']}")
    terminal.result(f"  tags         {' '.join(asset['tags'])}")
    for name, url in asset["urls"].items():
        terminal.result(f"  {name:<12} {url}")
