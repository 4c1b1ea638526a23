"""``kshipra purge`` and ``kshipra warm``: the operator's commands for the edges' caches.

* ``purge`` asks the origin (``POST /v1/purge``, bearer ``KSHIPRA_PURGE_TOKEN``) to publish
  purges on the fleet's stream and reports how many live edges applied them, and how long the
  slowest took.
* ``warm`` fetches URLs through edges before a peak (the morning before an exam). For ``--tag``
  it asks the origin's catalogue (``GET /v1/assets``, bearer ``KSHIPRA_UPLOAD_TOKEN``) which
  assets carry the tag and warms their listed URLs except the original upload (``source``: large,
  and no student fetches it). For a lecture it also follows the HLS playlists: every media
  playlist, each one's init segment and its first :data:`LEADING_SEGMENTS` segments. Those
  decide how fast playback starts on a slow network; later segments are fetched while students
  watch, and warming whole lectures through every edge would compete with live traffic for the
  edges' upstream bandwidth for little gain. Each edge gets at most ``--concurrency`` requests at
  a time (default 4) so warming never starves live traffic.

Exit codes: 0 done, 2 bad input, 3 authentication failed, 4 origin or edge failed or
unreachable (for ``warm``: any URL failed to warm), 5 (``purge``) published, but no live edge
applied it or some live edge had not applied it within ``--wait``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kshipra.client import (
    AuthFailed,
    BadInput,
    ClientError,
    OriginClient,
    ServerFailed,
    default_origin_url,
)
from kshipra.exits import EXIT_AUTH, EXIT_BAD_INPUT, EXIT_NOT_APPLIED, EXIT_SERVER
from kshipra.terminal import Terminal

LEADING_SEGMENTS = 3
READ_CHUNK_BYTES = 256 * 1024

# ---- purge ------------------------------------------------------------------------------------


async def request_purge(
    base_url: str, token: str, body: dict[str, Any], *, wait_s: float
) -> dict[str, Any]:
    """``POST /v1/purge``; the origin's answer, or a :class:`ClientError`."""
    async with OriginClient(base_url, token, timeout_s=wait_s + 30) as client:
        status, answer = await client.request(
            "POST", "/v1/purge", json=body, expect=(200, 401, 403)
        )
    if status in (401, 403):
        message = (answer or {}).get("error", {}).get("message", f"HTTP {status}")
        raise AuthFailed(f"{message} (check KSHIPRA_PURGE_TOKEN)")
    if not isinstance(answer, dict) or "purges" not in answer:
        raise ServerFailed("the origin's answer to the purge is not what was expected")
    return answer


def purge_summary(answer: dict[str, Any]) -> list[str]:
    """The human-readable report (pure)."""
    count = len(answer["purges"])
    live, applied = answer["edges_live"], answer["edges_applied"]
    what = "soft purge" if answer.get("soft") else "purge"
    lines = [f"published {count} {what}{'s' if count != 1 else ''}"]
    if live == 0:
        lines.append(
            "NOT APPLIED: no edge is following the purge stream (start edges with --redis or "
            "a config; each edge applies it when it next reads the stream)"
        )
        return lines
    slowest = answer.get("slowest_ms")
    timing = f"; slowest edge took {slowest:.0f} ms" if slowest is not None else ""
    lines.append(f"applied by {applied} of {live} live edges{timing}")
    if not answer["complete"]:
        pending = ", ".join(answer.get("edges_pending", []))
        lines.append(f"not yet applied by: {pending} (they apply it when they catch up)")
    return lines


@click.command("purge")
@click.option("--url", "urls", multiple=True, help="A path or URL to purge (repeatable)")
@click.option("--prefix", "prefixes", multiple=True, help="A path prefix to purge (repeatable)")
@click.option("--tag", "tags", multiple=True, help="A cache tag to purge (repeatable)")
@click.option("--soft", is_flag=True, help="Mark stale (serve while revalidating), not remove")
@click.option("--origin", "origin_url", envvar="KSHIPRA_ORIGIN_URL", help="Origin base URL")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 30),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the live edges to apply it",
)
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object")
def purge_command(
    urls: tuple[str, ...],
    prefixes: tuple[str, ...],
    tags: tuple[str, ...],
    soft: bool,
    origin_url: str | None,
    wait_s: float,
    json_output: bool,
) -> None:
    """Purge URLs, prefixes or cache tags from every edge.

    Exit codes: 0 applied by every live edge, 2 bad input, 3 authentication failed, 4 origin
    failed, unreachable or without Redis, 5 published but no live edge applied it, or some
    live edge had not within --wait.
    """
    terminal = Terminal(json_output=json_output)
    if not (urls or prefixes or tags):
        terminal.error("name at least one --url, --prefix or --tag")
        sys.exit(EXIT_BAD_INPUT)
    token = os.environ.get("KSHIPRA_PURGE_TOKEN")
    if not token:
        terminal.error("set KSHIPRA_PURGE_TOKEN to the fleet's purge token")
        sys.exit(EXIT_AUTH)
    body = {
        "urls": list(urls),
        "prefixes": list(prefixes),
        "tags": list(tags),
        "soft": soft,
        "wait_s": wait_s,
    }
    try:
        answer = asyncio.run(
            request_purge(origin_url or default_origin_url(), token, body, wait_s=wait_s)
        )
    except ClientError as exc:
        terminal.error(str(exc))
        sys.exit(exc.exit_code)
    if json_output:
        terminal.emit_json(answer)
    else:
        lines = purge_summary(answer)
        for line in lines[:1]:
            terminal.result(line)
        for line in lines[1:]:
            (terminal.result if answer["complete"] else terminal.error)(line)
    if not answer["complete"]:
        sys.exit(EXIT_NOT_APPLIED)


# ---- warm: planning (pure) ---------------------------------------------------------------------


def playlist_references(text: str) -> list[str]:
    """Every URI an HLS playlist names, in order: ``URI="…"`` attributes (renditions, init
    segments, I-frame playlists) and the lines that are not tags."""
    found: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            rest = line
            while 'URI="' in rest:
                rest = rest.split('URI="', 1)[1]
                uri, _, rest = rest.partition('"')
                if uri:
                    found.append(uri)
            continue
        found.append(line)
    return list(dict.fromkeys(found))


def is_playlist(url: str) -> bool:
    return urlsplit(url).path.endswith(".m3u8")


def leading_media(references: Iterable[str], count: int = LEADING_SEGMENTS) -> list[str]:
    """Of a media playlist's references: the init segments and the first *count* media
    segments."""
    chosen: list[str] = []
    segments = 0
    for ref in references:
        if is_playlist(ref):
            continue
        name = urlsplit(ref).path.rsplit("/", 1)[-1]
        if "-init." in name or name.startswith("init"):
            chosen.append(ref)
        elif segments < count:
            chosen.append(ref)
            segments += 1
    return chosen


def asset_urls_for_tag(assets: Iterable[dict[str, Any]], tag: str) -> list[str]:
    """The catalogue's URLs of the assets carrying *tag*, except their original uploads."""
    urls: list[str] = []
    for asset in assets:
        if tag in asset.get("tags", []):
            for label, url in asset.get("urls", {}).items():
                if label != "source":
                    urls.append(url)
    return list(dict.fromkeys(urls))


def path_of(url: str) -> str:
    """What to ask an edge for: the path and query of *url* (or *url*, already a path)."""
    parts = urlsplit(url)
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


def cache_hit(cache_status: str | None) -> bool:
    """Did the edge answering (the last member of ``Cache-Status``, RFC 9211) serve it from
    its cache?"""
    if not cache_status:
        return False
    last = cache_status.split(",")[-1]
    return "hit" in {param.strip().split("=", 1)[0].lower() for param in last.split(";")[1:]}


# ---- warm: IO ------------------------------------------------------------------------------------


async def expand_playlists(session: aiohttp.ClientSession, urls: list[str]) -> list[str]:
    """*urls* plus, for each HLS playlist among them, what it leads to (fetched from the
    origin: planning does not disturb the edges' statistics)."""
    planned = list(urls)
    queue = [url for url in urls if is_playlist(url)]
    seen = set(queue)
    while queue:
        playlist = queue.pop(0)
        try:
            async with session.get(playlist) as response:
                if response.status != 200:
                    continue
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            continue
        references = [urljoin(playlist, ref) for ref in playlist_references(text)]
        for ref in references:
            if is_playlist(ref) and ref not in seen:
                seen.add(ref)
                queue.append(ref)
                planned.append(ref)
        planned.extend(leading_media(references))
    return list(dict.fromkeys(planned))


@dataclass
class EdgeReport:
    edge: str
    fetched: int = 0
    cached: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    bytes_total: int = 0
    duration_s: float = 0.0

    def view(self) -> dict[str, Any]:
        return {
            "edge": self.edge,
            "fetched": self.fetched,
            "cached": self.cached,
            "failed": self.failed,
            "failures": self.failures,
            "bytes": self.bytes_total,
            "duration_s": round(self.duration_s, 3),
        }


async def warm_edge(
    session: aiohttp.ClientSession,
    edge: str,
    paths: list[str],
    *,
    concurrency: int,
    advanced: Callable[[], None],
) -> EdgeReport:
    """GET each path through *edge*, at most *concurrency* at a time, reading and discarding
    the bodies."""
    report = EdgeReport(edge)
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(path: str) -> None:
        async with gate:
            try:
                async with session.get(edge.rstrip("/") + path) as response:
                    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                        report.bytes_total += len(chunk)
                    if response.status >= 400:
                        report.failed += 1
                        report.failures.append({"path": path, "status": response.status})
                    elif cache_hit(response.headers.get("Cache-Status")):
                        report.cached += 1
                    else:
                        report.fetched += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                report.failed += 1
                report.failures.append({"path": path, "error": str(exc) or type(exc).__name__})
            advanced()

    await asyncio.gather(*(one(path) for path in paths))
    report.duration_s = time.monotonic() - started
    return report


async def plan_warm(
    base_url: str, token: str | None, urls: list[str], tag: str | None
) -> list[str]:
    """The paths to warm: the given URLs, or the tagged assets' URLs; playlists expanded."""
    if tag is not None:
        async with OriginClient(base_url, token) as client:
            assets = await client.list_assets()
        urls = asset_urls_for_tag(assets, tag)
        if not urls:
            raise BadInput(f"no published asset carries the tag {tag!r}")
    absolute = [url if "://" in url else base_url.rstrip("/") + url for url in urls]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        expanded = await expand_playlists(session, absolute)
    return list(dict.fromkeys(path_of(url) for url in expanded))


async def run_warm(
    edges: list[str],
    paths: list[str],
    *,
    concurrency: int,
    progress: Progress | None,
) -> list[EdgeReport]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=concurrency)
    headers = {"Accept-Encoding": "br, gzip", "User-Agent": "kshipra-warm"}
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, headers=headers
    ) as session:

        def advancer(edge: str) -> Callable[[], None]:
            if progress is None:
                return lambda: None
            task = progress.add_task(edge, total=len(paths))
            return lambda: progress.advance(task)

        return list(
            await asyncio.gather(
                *(
                    warm_edge(
                        session, edge, paths, concurrency=concurrency, advanced=advancer(edge)
                    )
                    for edge in edges
                )
            )
        )


@click.command("warm")
@click.option("--url", "urls", multiple=True, help="A path or URL to warm (repeatable)")
@click.option("--tag", help="Warm every asset carrying this cache tag")
@click.option("--edge", "edges", multiple=True, required=True, help="Edge base URL (repeatable)")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Requests in flight per edge",
)
@click.option("--origin", "origin_url", envvar="KSHIPRA_ORIGIN_URL", help="Origin base URL")
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object")
def warm_command(
    urls: tuple[str, ...],
    tag: str | None,
    edges: tuple[str, ...],
    concurrency: int,
    origin_url: str | None,
    json_output: bool,
) -> None:
    """Fetch URLs (or a tag's assets) through edges so their caches hold them before a peak.

    Exit codes: 0 every URL warmed, 2 bad input, 3 authentication failed, 4 the origin failed or
    some URL could not be warmed.
    """
    terminal = Terminal(json_output=json_output)
    if bool(urls) == (tag is not None):
        terminal.error("give either --url (repeatable) or --tag")
        sys.exit(EXIT_BAD_INPUT)
    for url in urls:
        if not url.startswith(("/", "http://", "https://")):
            terminal.error(f"{url!r} is neither a path nor an http(s) URL")
            sys.exit(EXIT_BAD_INPUT)
    for edge in edges:
        if not edge.startswith(("http://", "https://")):
            terminal.error(f"--edge {edge!r} must be an http(s) URL")
            sys.exit(EXIT_BAD_INPUT)
    base_url = origin_url or default_origin_url()
    token = os.environ.get("KSHIPRA_UPLOAD_TOKEN")

    async def main() -> tuple[list[str], list[EdgeReport]]:
        paths = await plan_warm(base_url, token, list(urls), tag)
        if terminal.interactive:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=terminal.err) as progress:
                reports = await run_warm(
                    list(edges), paths, concurrency=concurrency, progress=progress
                )
        else:
            reports = await run_warm(list(edges), paths, concurrency=concurrency, progress=None)
        return paths, reports

    try:
        paths, reports = asyncio.run(main())
    except ClientError as exc:
        terminal.error(str(exc))
        sys.exit(exc.exit_code)
    failed = any(report.failed for report in reports)
    if json_output:
        terminal.emit_json({"paths": paths, "edges": [report.view() for report in reports]})
    else:
        terminal.result(f"warmed {len(paths)} URLs through {len(reports)} edges")
        for report in reports:
            terminal.result(
                f"  {report.edge}: {report.fetched} fetched, {report.cached} already cached, "
                f"{report.failed} failed ({report.duration_s:.1f} s)"
            )
            for failure in report.failures[:10]:
                detail = failure.get("status") or failure.get("error")
                terminal.result(f"    failed {failure['path']}: {detail}")
    if failed:
        sys.exit(EXIT_SERVER)
