"""Object storage for the origin and the workers: one role, two mechanisms.

:func:`open_blob_store` turns a configured location into a store: ``s3://bucket`` (or
``s3://bucket/prefix``) is an :class:`S3BlobStore`; anything else is a directory for a
:class:`LocalDirBlobStore`, created if missing.
"""

from __future__ import annotations

from assets.blobstore.base import (
    MAX_KEY_BYTES,
    MIN_PART_BYTES,
    BlobInfo,
    BlobNotFoundError,
    BlobReader,
    BlobStore,
    InvalidKeyError,
    PartInfo,
    PreconditionFailedError,
    StorageError,
    validate_key,
)
from assets.blobstore.local import LocalDirBlobStore
from assets.blobstore.s3 import S3BlobStore

__all__ = [
    "MAX_KEY_BYTES",
    "MIN_PART_BYTES",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobReader",
    "BlobStore",
    "InvalidKeyError",
    "LocalDirBlobStore",
    "PartInfo",
    "PreconditionFailedError",
    "S3BlobStore",
    "StorageError",
    "open_blob_store",
    "parse_s3_location",
    "validate_key",
]

_S3_SCHEME = "s3://"


def parse_s3_location(location: str) -> tuple[str, str] | None:
    """``(bucket, prefix)`` for an ``s3://bucket[/prefix]`` location, else ``None``.

    Raises :class:`ValueError` for an ``s3://`` location without a bucket or with a prefix
    that is not a valid key."""
    if not location.startswith(_S3_SCHEME):
        return None
    bucket, _, prefix = location[len(_S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"S3 location {location!r} names no bucket (expected s3://bucket)")
    prefix = prefix.strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except InvalidKeyError as exc:
            raise ValueError(f"S3 location {location!r} has an invalid prefix: {exc}") from exc
    return bucket, prefix


def open_blob_store(
    location: str, *, s3_endpoint: str | None = None, s3_region: str | None = None
) -> BlobStore:
    """The store at *location*: ``s3://bucket[/prefix]`` or a local directory path."""
    s3 = parse_s3_location(location)
    if s3 is not None:
        bucket, prefix = s3
        return S3BlobStore(bucket, prefix=prefix, endpoint_url=s3_endpoint, region_name=s3_region)
    if not location:
        raise ValueError("empty blob store location")
    return LocalDirBlobStore(location)
