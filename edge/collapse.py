"""Request collapsing: one upstream fetch per key, however many requests wait for it.

The first request for a key starts the fetch in a task of its own, so a client that leaves
does not cancel it for the others; later requests for the same key wait for the same future.
A fetch that raises gives every waiter the answer :attr:`Collapser.on_error` makes of the
exception, never an exception of its own. The collapser also owns the edge's other background
tasks (revalidations, the disk tier's sync) so that one :meth:`Collapser.close` stops them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Collapser(Generic[T]):
    """Fetches in flight, by collapse key, and the tasks that run them."""

    def __init__(
        self, *, on_error: Callable[[Exception], T], on_collapsed: Callable[[], None]
    ) -> None:
        self._on_error = on_error
        self._on_collapsed = on_collapsed
        self._inflight: dict[str, asyncio.Future[T]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def __contains__(self, key: object) -> bool:
        return key in self._inflight

    def join_or_start(
        self, key: str, fetch: Callable[[], Awaitable[T]]
    ) -> tuple[asyncio.Future[T], bool]:
        """The future of *key*'s fetch, and whether this call started it (the leader)."""
        existing = self._inflight.get(key)
        if existing is not None:
            self._on_collapsed()
            return existing, False
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future

        async def run() -> None:
            try:
                outcome = await fetch()
            except Exception as exc:
                log.exception("fetch for %r failed", key)
                outcome = self._on_error(exc)
            finally:
                if self._inflight.get(key) is future:
                    del self._inflight[key]
            if not future.done():
                future.set_result(outcome)

        self.spawn(run())
        return future, True

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run *work* in the background until it ends or :meth:`close` cancels it."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel every background task and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
