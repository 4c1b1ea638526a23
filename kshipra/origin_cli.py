"""``kshipra origin``, ``upload``, ``jobs`` and ``status``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import click
from rich.markup import escape
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

from assets.sniff import KINDS
from cdn_config import ConfigError, KshipraConfig, load_config, parse_byte_size, parse_listen
from common.serving import run, serve_apps
from kshipra.client import (
    BadInput,
    ClientError,
    OriginClient,
    TransferListener,
    UploadReport,
    default_origin_url,
)
from kshipra.embedded import EmbeddedValkey
from kshipra.exits import EXIT_BAD_INPUT
from kshipra.terminal import Terminal
from origin.app import create_app

PLAIN_PROGRESS_INTERVAL_S = 5.0
"""Off a terminal, ``upload`` prints a progress line at least this often."""
WAIT_POLL_S = 0.5
"""How often ``upload --wait`` asks the origin how the processing is going."""


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
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0.01),
    default=PLAIN_PROGRESS_INTERVAL_S,
    hidden=True,
    help="Seconds between plain progress lines when not on a terminal (for tests)",
)
def upload_command(
    path: Path,
    kind: str | None,
    asset_id: str | None,
    tags: tuple[str, ...],
    origin_url: str | None,
    wait: bool,
    json_output: bool,
    max_rate: str | None,
    progress_interval: float,
) -> None:
    """Upload a lecture, image or question-bank bundle; large files resume where they
    stopped.

    Exit codes: 0 done, 2 bad input, 3 authentication failed, 4 origin failed or unreachable.
    """
    terminal = Terminal(json_output=json_output)
    rate = _parse_rate(max_rate)
    token = os.environ.get("KSHIPRA_UPLOAD_TOKEN")
    base_url = origin_url or default_origin_url()

    async def send(client: OriginClient, listener: TransferListener) -> UploadReport:
        return await client.upload(
            path,
            kind=kind,
            asset_id=asset_id,
            tags=list(tags),
            listener=listener,
            max_rate_bytes_per_s=rate,
        )

    async def main() -> UploadReport:
        async with OriginClient(base_url, token) as client:
            if terminal.interactive:
                return await interactive(client)
            plain = PlainProgress(terminal, path.name, progress_interval)
            ticker = asyncio.create_task(plain.run())
            try:
                report = await send(client, plain)
                if wait:
                    version = int(report.asset["newest_version"])
                    report.asset = await _wait_published(client, report.asset["id"], version, plain)
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            return report

    async def interactive(client: OriginClient) -> UploadReport:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=terminal.err, transient=False) as progress:
            listener: TransferListener = ProgressListener(progress, f"upload {path.name}")
            report = await send(client, listener)
        if wait:
            version = int(report.asset["newest_version"])
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                console=terminal.err,
            ) as progress:
                view = RichProcessingView(progress, f"process {path.name}")
                report.asset = await _wait_published(client, report.asset["id"], version, view)
        return report

    try:
        report = asyncio.run(main())
    except ClientError as exc:
        terminal.error(escape(str(exc)))  # a refused bundle's problems quote its keys
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


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 2 min``: for a person."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def describe_processing(processing: dict[str, Any] | None) -> str:
    """``encode 42%, ETA 1 min 5 s`` from a progress document (``stage``, ``percent``,
    ``eta_s``); ``queued`` when there is none yet."""
    if not processing:
        return "queued"
    stage = str(processing.get("stage") or "queued")
    percent = processing.get("percent")
    text = stage if percent is None or stage == "queued" else f"{stage} {float(percent):.0f}%"
    eta = processing.get("eta_s")
    if eta is not None:
        text += f", ETA {format_duration(float(eta))}"
    return text


class ProcessingView(Protocol):
    def show(self, processing: dict[str, Any] | None) -> None: ...

    def done(self) -> None: ...


async def _wait_published(
    client: OriginClient, asset_id: str, version: int, view: ProcessingView
) -> dict[str, Any]:
    """Poll the catalogue until *version* of the asset is published (or failed), showing the
    worker's progress."""
    while True:
        asset = await client.asset(asset_id)
        if asset.get("version") is not None and asset["version"] >= version:
            view.done()
            return asset
        newest_state = asset.get("newest_state")
        if asset.get("newest_version") == version and newest_state == "failed":
            raise BadInput(f"processing failed: {asset.get('status_reason')}")
        view.show(asset.get("processing"))
        await asyncio.sleep(WAIT_POLL_S)  # polling interval of the status API


class RichProcessingView:
    def __init__(self, progress: Progress, description: str) -> None:
        self._progress = progress
        self._task = progress.add_task(description, total=100.0)
        self._description = description

    def show(self, processing: dict[str, Any] | None) -> None:
        percent = float((processing or {}).get("percent") or 0.0)
        self._progress.update(
            self._task,
            completed=percent,
            description=f"{self._description} ({escape(describe_processing(processing))})",
        )

    def done(self) -> None:
        self._progress.update(
            self._task, completed=100.0, description=f"{self._description} (published)"
        )


class PlainProgress:
    """``upload`` off a terminal (a pipe, a CI log): one plain line on stderr when the upload
    or the processing starts, ends or changes stage, and every *interval_s* in between even
    when nothing changed, so whoever reads the log can tell the command is alive. It is the
    upload's transfer listener, then its processing view."""

    def __init__(self, terminal: Terminal, name: str, interval_s: float) -> None:
        self._terminal = terminal
        self._name = name
        self._interval_s = interval_s
        self._phase = "upload"
        self._total = 0
        self._already = 0
        self._sent = 0
        self._started = time.monotonic()
        self._processing: dict[str, Any] | None = None
        self._stage: str | None = None

    # -- TransferListener
    def started(self, *, total_bytes: int, already_bytes: int, phase: str) -> None:
        self._total, self._already, self._sent = total_bytes, already_bytes, already_bytes
        self._started = time.monotonic()
        self.print()

    def advanced(self, sent_bytes: int) -> None:
        self._sent += sent_bytes

    def finished(self) -> None:
        self._sent = max(self._sent, self._total)
        self.print()

    # -- ProcessingView
    def show(self, processing: dict[str, Any] | None) -> None:
        first = self._phase != "process"
        self._phase, self._processing = "process", processing
        stage = str((processing or {}).get("stage") or "queued")
        if first or stage != self._stage:
            self._stage = stage
            self.print()

    def done(self) -> None:
        self._phase = "published"
        self.print()

    def line(self) -> str:
        if self._phase == "published":
            return f"process {self._name}: published"
        if self._phase == "process":
            return f"process {self._name}: {describe_processing(self._processing)}"
        if not self._total:
            return f"upload {self._name}: starting"
        percent = 100.0 * self._sent / self._total
        text = (
            f"upload {self._name}: {_human_bytes(self._sent)} of {_human_bytes(self._total)} "
            f"({percent:.0f}%)"
        )
        elapsed = time.monotonic() - self._started
        moved = self._sent - self._already
        if moved > 0 and self._sent < self._total and elapsed > 0:
            rate = moved / elapsed
            eta = (self._total - self._sent) / rate
            text += f", {_human_bytes(round(rate))}/s, ETA {format_duration(eta)}"
        return text

    def print(self) -> None:
        self._terminal.progress_line(self.line())

    async def run(self) -> None:
        """Print the current line every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            self.print()


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


def _processing_by_hash(queue: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each queued or running job's status and progress, by the content hash it transcodes."""
    found: dict[str, dict[str, Any]] = {}
    for job in queue.get("jobs") or []:
        content_hash = (job.get("kwargs") or {}).get("content_hash")
        if content_hash:
            found[str(content_hash)] = job
    return found


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
                escape(str(job["key"])[:60]),
                escape(str(job.get("status") or "")),
                str(job.get("attempts") or 0),
                escape(str(progress.get("stage", ""))),
                f"{float(progress.get('percent') or 0):.0f}%",
                "" if eta is None else format_duration(float(eta)),
            )
        terminal.out.print(jobs_table)
    by_hash = _processing_by_hash(queue)
    table = Table("asset", "kind", "status", "published", "newest", "size", "updated")
    for asset in assets:
        version = asset.get("version")
        newest = f"v{asset['newest_version']} ({asset['newest_state']})"
        job = by_hash.get(str(asset.get("content_hash")))
        if asset["newest_state"] == "processing":
            newest += ": " + describe_processing(None if job is None else job.get("progress"))
        table.add_row(
            escape(asset["id"]),
            asset["kind"],
            asset["status"],
            "-" if version is None else f"v{version}",
            escape(newest),
            _human_bytes(asset["size_bytes"]),
            asset["updated_at"],
        )
    terminal.out.print(table)


def status_lines(asset: dict[str, Any]) -> list[str]:
    """``kshipra status`` for a person: the asset's state (with the reason when it failed),
    the version served or "not yet published", every version with its state, the newest
    one's stage, percent and ETA while it is processed, then the URLs. Rich markup."""
    status = str(asset["status"])
    title = f"[bold]{escape(asset['id'])}[/] ({asset['kind']}) - {status}"
    if status == "failed" and asset.get("status_reason"):
        title += f": {escape(str(asset['status_reason']))}"
    lines = [title]
    current = asset.get("version")
    lines.append(
        "  published     "
        + ("not yet published" if current is None else f"v{current} (served as latest)")
    )
    versions = (asset.get("manifest") or {}).get("versions") or [
        {"version": number, "state": None} for number in asset.get("versions") or []
    ]
    for index, version in enumerate(sorted(versions, key=lambda v: int(v["version"]))):
        number = int(version["version"])
        state = version.get("state")
        if state is None:
            state = asset["newest_state"] if number == asset["newest_version"] else "published"
        text = f"v{number} {state}"
        if state == "published" and version.get("published_at"):
            text += f" at {version['published_at']}"
        if state == "failed" and version.get("state_reason"):
            text += f": {version['state_reason']}"
        label = "versions      " if index == 0 else " " * 14
        lines.append(f"  {label}{escape(text)}")
    if asset.get("newest_state") == "processing":
        processing = asset.get("processing")
        text = f"v{asset['newest_version']}: {describe_processing(processing)}"
        if processing and processing.get("job_status"):
            text += f" (job {processing['job_status']}"
            if processing.get("attempts"):
                text += f", attempt {processing['attempts']}"
            text += ")"
        lines.append(f"  processing    {escape(text)}")
    lines.append(f"  size          {_human_bytes(asset['size_bytes'])} ({asset['format']})")
    lines.append(f"  content hash  {asset['content_hash']}")
    lines.append(f"  tags          {escape(' '.join(asset['tags']))}")
    urls = asset.get("urls") or {}
    if not urls:
        lines.append("  urls          none until a version is published")
    else:
        lines.append("  urls")
        for name, url in urls.items():
            lines.append(f"    {escape(name):<24} {url}")
    return lines


@click.command("status")
@click.argument("asset_id")
@click.option("--origin", "origin_url", envvar="KSHIPRA_ORIGIN_URL", help="Origin base URL")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object")
def status_command(asset_id: str, origin_url: str | None, json_output: bool) -> None:
    """Show one asset: its versions and their states, what is published, the progress of a
    version being processed, and its URLs."""

    async def call(client: OriginClient) -> dict[str, Any]:
        return await client.asset(asset_id)

    terminal, asset = _client_call(json_output, origin_url, call)
    if json_output:
        terminal.emit_json(asset)
        return
    for line in status_lines(asset):
        terminal.result(line)
