"""``kshipra edge``: run an edge standalone in front of any HTTP origin, or by name from the
configuration's topology."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from cdn_config import KshipraConfig, parse_byte_size, parse_listen
from common.serving import run, serve_apps
from edge.admission import AdmissionLimits
from edge.app import EdgeSettings, create_app
from edge.guard import DoorLimits
from kshipra.terminal import Terminal


def settings_from_config(config: KshipraConfig, name: str) -> tuple[EdgeSettings, str]:
    """(settings, listen) for the edge called *name*."""
    edge = config.edge(name)
    if edge.upstream == "origin":
        upstream = config.origin.base_url
    else:
        host, port = parse_listen(config.edge(edge.upstream).listen)
        upstream = f"http://{host}:{port}"
    settings = EdgeSettings(
        name=edge.name,
        upstream_url=upstream,
        memory_bytes=edge.memory_bytes,
        disk_dir=Path(edge.disk_dir) if edge.disk_dir else None,
        disk_bytes=edge.disk_bytes,
        slice_bytes=edge.slice_bytes,
        upstream_timeout_s=edge.upstream_timeout_s,
        max_upstream_connections=edge.max_upstream_connections,
        proxied_prefixes=edge.proxy_prefixes,
        stale_if_unreachable_s=edge.stale_if_unreachable_s,
        door=DoorLimits(
            header_timeout_s=edge.header_timeout_s,
            send_stall_s=edge.send_stall_s,
            connections_per_client=edge.connections_per_client,
        ),
        admission=AdmissionLimits(
            max_inflight_requests=edge.max_inflight_requests,
            max_upstream_fetches=edge.max_upstream_fetches,
            client_requests_per_s=edge.client_requests_per_s,
        ),
        purge_token=config.secrets.purge_token,
        # purge: follow the purge stream unless Redis is the origin's embedded child server
        redis_url=None if config.redis.url == "embedded" else config.redis.url,
    )
    return settings, edge.listen


def _serve_one(settings: EdgeSettings, host: str, port: int, reuse_port: bool) -> None:
    terminal = Terminal()

    async def ready(urls: list[str]) -> None:
        terminal.info(
            f"edge {settings.name} (pid {os.getpid()}) listening on {urls[0]}, "
            f"upstream {settings.upstream_url}"
        )
        if settings.redis_url is not None:  # without one, Edge.start has warned loudly
            terminal.info(f"edge {settings.name} follows the purge stream at {settings.redis_url}")

    run(serve_apps([(create_app(settings), host, port)], on_ready=ready, reuse_port=reuse_port))


def serve_edge(settings: EdgeSettings, listen: str, workers: int) -> None:
    """One process, or *workers* processes sharing the port (SO_REUSEPORT) and the disk
    tier."""
    host, port = parse_listen(listen)
    if workers <= 1:
        _serve_one(settings, host, port, reuse_port=False)
        return
    if port == 0:
        raise click.BadParameter("several workers need a fixed port", param_hint="--listen")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_serve_one, args=(settings, host, port, True), daemon=False)
        for _ in range(workers)
    ]
    for process in processes:
        process.start()

    def forward(signum: int, _frame: Any) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for process in processes:
        process.join()


def _size(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_byte_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


@click.command("edge")
@click.option("--upstream", help="Origin or parent edge URL (standalone mode)")
@click.option("--listen", help="HOST:PORT [default 127.0.0.1:8081, or the config's]")
@click.option("--name", help="This edge's name (Cache-Status); with --config, which edge")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file")
@click.option("--disk-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--memory-bytes", help="Memory tier budget, e.g. 256MiB")
@click.option("--disk-bytes", help="Disk tier budget, e.g. 50GiB")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option(
    "--redis",
    "redis_url",
    help="Follow the purge stream in this Redis (redis://HOST:PORT[/DB]); with --config, "
    "default: the config's redis url unless it is 'embedded'",
)
@click.option(
    "--proxy-prefix",
    "proxy_prefixes",
    multiple=True,
    help="Proxy only paths under this prefix (repeatable) [default /content/; the origin's "
    "/v1/ control API is never proxied]; '/' for any path of a third-party origin",
)
def edge_command(
    upstream: str | None,
    listen: str | None,
    name: str | None,
    config_file: str | None,
    disk_dir: Path | None,
    memory_bytes: str | None,
    disk_bytes: str | None,
    workers: int,
    redis_url: str | None,
    proxy_prefixes: tuple[str, ...],
) -> None:
    """Run an edge: an RFC 9111 caching reverse proxy with memory and disk tiers."""
    from kshipra.origin_cli import configure_logging, load_or_exit  # noqa: PLC0415 - shared helpers

    config = load_or_exit(config_file, {})
    configure_logging(config.log_level)
    if config_file is not None:
        if name is None:
            names = ", ".join(edge.name for edge in config.edges) or "none"
            raise click.UsageError(f"--config needs --name (edges in the file: {names})")
        try:
            settings, configured_listen = settings_from_config(config, name)
        except KeyError:
            Terminal().error(f"no edge named {name!r} in {config_file}")
            sys.exit(2)
        listen = listen or configured_listen
    else:
        if upstream is None:
            raise click.UsageError("give --upstream URL (standalone) or --config FILE --name EDGE")
        if not upstream.startswith(("http://", "https://")):
            raise click.BadParameter("must be an http:// or https:// URL", param_hint="--upstream")
        settings = EdgeSettings(
            name=name or "kshipra-edge",
            upstream_url=upstream,
            purge_token=config.secrets.purge_token,
            # KSHIPRA_REDIS__URL reaches here too; the embedded default is the origin's own.
            redis_url=None if config.redis.url == "embedded" else config.redis.url,
        )
        listen = listen or "127.0.0.1:8081"
    overrides: dict[str, Any] = {}
    if disk_dir is not None:
        overrides["disk_dir"] = disk_dir
    for key, value, option in (
        ("memory_bytes", memory_bytes, "--memory-bytes"),
        ("disk_bytes", disk_bytes, "--disk-bytes"),
    ):
        parsed = _size(value, option)
        if parsed is not None:
            overrides[key] = parsed
    if proxy_prefixes:
        if any(not prefix.startswith("/") for prefix in proxy_prefixes):
            raise click.BadParameter("a path prefix starts with '/'", param_hint="--proxy-prefix")
        overrides["proxied_prefixes"] = proxy_prefixes
    if redis_url is not None:
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise click.BadParameter("expected redis://HOST:PORT[/DB]", param_hint="--redis")
        overrides["redis_url"] = redis_url
    if overrides:
        settings = replace(settings, **overrides)
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    serve_edge(settings, listen, workers)
