"""The blob-store role: what the origin and the workers need from object storage.

Two implementations live beside this module, named by mechanism: :class:`LocalDirBlobStore`
(the embedded default) and :class:`S3BlobStore` (S3 and S3-compatible stores). Both pass one
contract-test suite (``tests/contract/test_blobstore_contract.py``).

Keys are ``/``-separated relative paths. :func:`validate_key` is the single gate every
implementation calls before touching storage.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

MAX_KEY_BYTES = 1024
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._~@+=,-]+$")


class StorageError(Exception):
    """Root of storage failures: the store (S3, disk) failed, not the caller."""


class InvalidKeyError(StorageError, ValueError):
    """A key that could escape its namespace or that no backend can store."""


class BlobNotFoundError(StorageError, LookupError):
    """The key (or multipart upload) does not exist."""


class PreconditionFailedError(StorageError):
    """A conditional write or read did not hold (e.g. the key already exists)."""


def validate_key(key: str) -> str:
    """Return *key* if it is a safe relative key, else raise :class:`InvalidKeyError`.

    Refused: empty keys, absolute paths, ``.`` and ``..`` segments, empty segments (``a//b``),
    segments starting with ``.`` (backends keep their own bookkeeping there), backslashes,
    control characters, and anything outside a conservative character set.
    """
    if not key:
        raise InvalidKeyError("empty key")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"key longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidKeyError("key contains control characters")
    if key.startswith("/") or "\\" in key:
        raise InvalidKeyError(f"key must be a relative path with '/' separators: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"key has an empty, '.' or '..' segment: {key!r}")
        if segment.startswith("."):
            raise InvalidKeyError(f"key segments may not start with '.': {key!r}")
        if not _SEGMENT_RE.match(segment):
            raise InvalidKeyError(
                f"key segment has characters outside [A-Za-z0-9._~@+=,-]: {key!r}"
            )
    return key


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What storage knows about one stored object."""

    key: str
    size_bytes: int
    etag: str
    """Backend's entity tag, without quotes. Opaque; changes whenever the content changes."""
    last_modified: datetime
    """Timezone-aware (UTC)."""
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)
    version_id: str | None = None
    """The S3 version id on versioned buckets; ``None`` where the backend has no versions."""


@dataclass(frozen=True, slots=True)
class PartInfo:
    """One uploaded part of a multipart upload."""

    part_number: int
    size_bytes: int
    etag: str


@dataclass(slots=True)
class BlobReader:
    """An open read: the object's info, the byte span being read, and its bytes as chunks."""

    info: BlobInfo
    start: int
    """First byte offset of the span (0 for a whole read)."""
    length: int
    """Number of bytes the chunks will yield."""
    chunks: AsyncIterator[bytes]

    async def read_all(self) -> bytes:
        """Collect the whole span: only for objects known to be small (manifests, bundles)."""
        return b"".join([chunk async for chunk in self.chunks])


@runtime_checkable
class BlobStore(Protocol):
    """Object storage as Kshipra uses it. All methods are coroutines; blocking IO runs in
    executors inside each implementation, never on the event loop."""

    @property
    def description(self) -> str:
        """Human-readable location, e.g. ``s3://bucket`` or ``/var/lib/kshipra``."""
        ...

    async def check(self) -> None:
        """Raise :class:`StorageError` unless the store is reachable and writable (readiness)."""
        ...

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterator[bytes],
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
    ) -> BlobInfo:
        """Store *data* under *key* atomically: readers see the old object or the whole new one,
        never a part. A streamed body is never held whole in memory (S3 uses multipart above
        a threshold). With ``if_none_match`` the write fails with
        :class:`PreconditionFailedError` if *key* exists. If the data iterator raises, nothing
        is stored and the exception propagates."""
        ...

    async def head(self, key: str) -> BlobInfo | None:
        """Info for *key*, or ``None`` if absent (absence is a value, not an error)."""
        ...

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> BlobReader:
        """Open *key* for reading bytes ``start..end`` inclusive (``end=None``: to the last
        byte). Raises :class:`BlobNotFoundError`. Callers validate the range first."""
        ...

    async def delete(self, key: str) -> None:
        """Remove *key* (all of it, on versioned buckets: a delete marker). Absent is not an
        error."""
        ...

    async def move(self, src: str, dst: str) -> BlobInfo:
        """Make *src*'s content available at *dst* and remove *src*. Atomic for readers of
        *dst*. Raises :class:`BlobNotFoundError` if *src* is absent."""
        ...

    def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[BlobInfo]:
        """Every object whose key starts with *prefix* (a string prefix, not only a folder),
        in key order; with *start_after*, only keys after it (S3's ``StartAfter``: a page
        cursor, so that a listing need not walk what it already returned)."""
        ...

    # Multipart uploads: used by resumable uploads. Part numbers start at 1; every part but
    # the last must be at least MIN_PART_BYTES (S3's rule, enforced by both backends).

    async def create_multipart(self, key: str, *, content_type: str) -> str:
        """Start a multipart upload for *key*; return its upload id."""
        ...

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, data: bytes | AsyncIterator[bytes]
    ) -> PartInfo:
        """Store one part (replacing an earlier upload of the same part number). If the data
        iterator raises, the part is not recorded."""
        ...

    async def list_parts(self, key: str, upload_id: str) -> builtins.list[PartInfo]:
        """Parts received so far, by part number. :class:`BlobNotFoundError` if the upload is
        unknown (completed, aborted or never started)."""
        ...

    async def complete_multipart(
        self, key: str, upload_id: str, parts: builtins.list[PartInfo]
    ) -> BlobInfo:
        """Join *parts* (in order) into the object at *key*, atomically."""
        ...

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Discard an upload and its parts. Unknown uploads are not an error."""
        ...

    async def close(self) -> None:
        """Release clients and executors."""
        ...


MIN_PART_BYTES = 5 * 1024 * 1024
"""S3's minimum size for every part but the last."""
