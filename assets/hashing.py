"""The content hash that names a source: SHA-256 over the SHA-256 digests of its 8 MiB blocks.

A tree hash lets the origin verify a resumable upload from the digests of its parts (one part
is one block) without reading the assembled object back from storage, and lets a client learn
whether the origin already holds a file before sending a byte of it. It is deterministic for
the same bytes whichever way they were uploaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

BLOCK_BYTES = 8 * 1024 * 1024
"""Block size of the tree hash, and the part size of resumable uploads."""


def combine_block_digests(digests: Iterable[bytes]) -> str:
    """The content hash (hex) of a file whose blocks have these SHA-256 digests, in order."""
    outer = hashlib.sha256()
    for digest in digests:
        outer.update(digest)
    return outer.hexdigest()


class TreeHasher:
    """Incremental tree hash: feed bytes in any chunking, read :meth:`hexdigest` at the end."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._block = hashlib.sha256()
        self._block_fill = 0
        self.size_bytes = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.size_bytes += len(view)
        while view:
            take = min(len(view), BLOCK_BYTES - self._block_fill)
            self._block.update(view[:take])
            self._block_fill += take
            view = view[take:]
            if self._block_fill == BLOCK_BYTES:
                self._digests.append(self._block.digest())
                self._block = hashlib.sha256()
                self._block_fill = 0

    def block_digests(self) -> list[bytes]:
        tail = [self._block.digest()] if self._block_fill or not self._digests else []
        return [*self._digests, *tail]

    def hexdigest(self) -> str:
        return combine_block_digests(self.block_digests())


def content_hash_of_file(path: str, *, chunk_bytes: int = 1024 * 1024) -> tuple[str, int]:
    """(content hash, size) of a local file, read in chunks."""
    hasher = TreeHasher()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            hasher.update(chunk)
    return hasher.hexdigest(), hasher.size_bytes
