"""Run aiohttp applications on uvloop until SIGINT/SIGTERM, then shut them down cleanly."""

from __future__ import annotations

import asyncio
import resource
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import uvloop
from aiohttp import web

KEEPALIVE_TIMEOUT_S = 15.0
"""An idle keep-alive connection is closed after this (aiohttp's default is 3,630 s: 1,024
idle phones would hold every file descriptor). Long enough for a player's next segment
request; OkHttp and browsers reopen as needed."""

RunnerFactory = Callable[..., web.AppRunner]
RUNNER: web.AppKey[RunnerFactory] = web.AppKey("runner")
"""An application that needs its own runner (the edge: its express lane) sets this; the
factory is called like :class:`aiohttp.web.AppRunner`."""


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner *app* asks for under :data:`RUNNER`, else a plain ``AppRunner``."""
    factory = app.get(RUNNER, web.AppRunner)
    return factory(app, **kwargs)


async def serve_apps(
    sites: Sequence[tuple[web.Application, str, int]],
    *,
    on_ready: Callable[[list[str]], Awaitable[None]] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve each ``(app, host, port)``; call *on_ready* with their base URLs; stop on a
    signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    urls: list[str] = []
    try:
        for app, host, port in sites:
            runner = make_runner(
                app,
                access_log=None,
                handle_signals=False,
                keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            )
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
            await site.start()
            bound_host, bound_port = runner.addresses[0][:2]
            urls.append(f"http://{bound_host}:{bound_port}")
        if on_ready is not None:
            await on_ready(urls)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def raise_open_file_limit() -> int:
    """The soft limit on open files raised to the hard limit (a server's connections are file
    descriptors; the default soft limit, 1,024, let 1,124 silent sockets lock students out).
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to completion on uvloop, with the open-file limit raised."""
    raise_open_file_limit()
    uvloop.run(main)
