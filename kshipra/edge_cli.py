"""``kshipra edge``: run an edge standalone in front of any HTTP origin, or by name from the
configuration's topology."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple

import click
from pydantic import ValidationError

from cdn_config import EdgeConfig, KshipraConfig, parse_byte_size, parse_listen
from common.serving import run, serve_apps
from edge.app import create_app
from kshipra.terminal import Terminal


class EdgeLaunch(NamedTuple):
    """One edge to serve: its configuration section and where it connects."""

    config: EdgeConfig
    upstream_url: str
    purge_token: str | None
    redis_url: str | None


def launch_from_config(config: KshipraConfig, name: str) -> EdgeLaunch:
    """The edge called *name* in *config*'s topology (:class:`KeyError` if there is none)."""
    return EdgeLaunch(
        config.edge(name),
        config.upstream_url(name),
        config.secrets.purge_token,
        config.purge_stream_url,  # the embedded default is the origin's own child server
    )


def _serve_one(launch: EdgeLaunch, host: str, port: int, reuse_port: bool) -> None:
    terminal = Terminal()
    name = launch.config.name

    async def ready(urls: list[str]) -> None:
        terminal.info(
            f"edge {name} (pid {os.getpid()}) listening on {urls[0]}, "
            f"upstream {launch.upstream_url}"
        )
        if launch.redis_url is not None:  # without one, Edge.start has warned loudly
            terminal.info(f"edge {name} follows the purge stream at {launch.redis_url}")

    app = create_app(
        launch.config,
        upstream_url=launch.upstream_url,
        purge_token=launch.purge_token,
        redis_url=launch.redis_url,
    )
    run(serve_apps([(app, host, port)], on_ready=ready, reuse_port=reuse_port))


def serve_edge(launch: EdgeLaunch, workers: int) -> None:
    """One process, or *workers* processes sharing the port (SO_REUSEPORT) and the disk
    tier."""
    host, port = parse_listen(launch.config.listen)
    if workers <= 1:
        _serve_one(launch, host, port, reuse_port=False)
        return
    if port == 0:
        raise click.BadParameter("several workers need a fixed port", param_hint="--listen")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_serve_one, args=(launch, host, port, True), daemon=False)
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
            launch = launch_from_config(config, name)
        except KeyError:
            Terminal().error(f"no edge named {name!r} in {config_file}")
            sys.exit(2)
    else:
        if upstream is None:
            raise click.UsageError("give --upstream URL (standalone) or --config FILE --name EDGE")
        if not upstream.startswith(("http://", "https://")):
            raise click.BadParameter("must be an http:// or https:// URL", param_hint="--upstream")
        launch = EdgeLaunch(
            EdgeConfig(name=name or "kshipra-edge", city="standalone"),
            upstream,
            config.secrets.purge_token,
            config.purge_stream_url,  # KSHIPRA_REDIS__URL reaches here too
        )
    overrides: dict[str, Any] = {}
    if listen is not None:
        overrides["listen"] = listen
    if disk_dir is not None:
        overrides["disk_dir"] = str(disk_dir)
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
        overrides["proxy_prefixes"] = proxy_prefixes
    if redis_url is not None:
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise click.BadParameter("expected redis://HOST:PORT[/DB]", param_hint="--redis")
        launch = launch._replace(redis_url=redis_url)
    if overrides:
        try:
            edge = EdgeConfig.model_validate({**launch.config.model_dump(), **overrides})
        except ValidationError as exc:
            raise click.BadParameter(
                "; ".join(
                    str(error["msg"]).removeprefix("Value error, ") for error in exc.errors()
                ),
                param_hint="--listen",
            ) from None
        launch = launch._replace(config=edge)
    serve_edge(launch, workers)
