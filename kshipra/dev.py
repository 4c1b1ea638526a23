"""``kshipra dev``: everything on one machine, on loopback, with local-directory storage and an
embedded Valkey. Ctrl-C stops it all."""

from __future__ import annotations

import os
import secrets
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import click

from cdn_config import parse_listen
from kshipra.embedded import EmbeddedValkey
from kshipra.serve import run, serve_apps
from kshipra.terminal import Terminal

SAMPLE_BUNDLE = "neet-chemistry-mole-concept.json"
SAMPLE_ID = "sample-chem-mole"


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


@click.command("dev")
@click.option("--origin-listen", default="127.0.0.1:8080", show_default=True)
@click.option(
    "--edge-listen",
    default="127.0.0.1:8081",
    show_default=True,
    help="Where the edge will listen once it is part of the build",
)
@click.option(
    "--data",
    "data_dir",
    default="./dev-data",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Storage, Valkey data and caches",
)
def dev_command(origin_listen: str, edge_listen: str, data_dir: Path) -> None:
    """Run origin (and, as they land, worker and edge) on loopback with an embedded Valkey,
    upload a sample question bank, and print the URLs."""
    # Imported here so `kshipra --help` and the client commands start fast.
    from cdn_config import ConfigError, load_config  # noqa: PLC0415
    from origin.app import create_app  # noqa: PLC0415

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

    async def ready(urls: list[str]) -> None:
        origin_url = urls[0]
        answer = await _upload_sample(origin_url, upload_token)
        latest = answer["asset"]["urls"]["latest"]
        terminal.result(f"origin   {origin_url}   (storage {data_dir / 'storage'})")
        terminal.result(f"valkey   {redis_url}   (embedded, pid {valkey.pid})")
        terminal.result("edge     not part of this build yet")
        terminal.result(f"sample   {latest}")
        terminal.result(f"try      curl -i {latest}")
        terminal.result(
            f"upload   KSHIPRA_UPLOAD_TOKEN={upload_token} "
            f"kshipra upload FILE --origin {origin_url}"
        )
        terminal.result("Ctrl-C stops everything.")

    try:
        run(serve_apps([(create_app(config), host, port)], on_ready=ready))
    finally:
        valkey.stop()
        terminal.info("stopped")
