"""A blob store in an S3 bucket (AWS S3, or an S3-compatible store such as MinIO or Ceph RGW).

boto3 is blocking, so every call runs on a dedicated thread pool; the event loop only awaits.
The client comes from a plain ``boto3.session.Session()``, so the standard AWS credential chain
applies (environment, shared files, instance or task roles).

* ``put`` buffers a streamed body up to :data:`PUT_PART_BYTES`: a body that fits is one
  ``PutObject``; a longer one becomes a multipart upload of :data:`PUT_PART_BYTES` parts,
  aborted on any failure (including cancellation), so nothing half-written is ever visible.
* ``if_none_match`` is S3's conditional write (``If-None-Match: *`` on ``PutObject`` and on
  ``CompleteMultipartUpload``); moto's server implements both, so no head-check fallback is
  needed. (A body long enough for multipart is also checked with a HEAD first, only to fail
  before uploading it; the conditional completion is what decides.)
* ``move`` is boto3's managed copy (multipart copy for large objects, metadata preserved) and
  then a delete of the source. Readers of the destination see the old or the new object.
* On versioned buckets ``BlobInfo.version_id`` is the S3 version id; ``delete`` leaves a
  delete marker.
* ``list`` returns only what ``ListObjectsV2`` knows: key, size, etag and date. Its
  ``content_type`` and ``metadata`` are the defaults; :meth:`S3BlobStore.head` has them.
* Keys may live under a prefix of the bucket (``s3://bucket/some/prefix``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import boto3.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from assets.blobstore.base import (
    MIN_PART_BYTES,
    BlobInfo,
    BlobNotFoundError,
    BlobReader,
    PartInfo,
    PreconditionFailedError,
    StorageError,
    validate_key,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CompleteMultipartUploadRequestTypeDef,
        GetObjectOutputTypeDef,
        HeadObjectOutputTypeDef,
        PutObjectRequestTypeDef,
    )

__all__ = ["PUT_PART_BYTES", "S3BlobStore"]

T = TypeVar("T")

PUT_PART_BYTES = 8 * 1024 * 1024
"""A streamed ``put`` up to this size is one request; above it, parts of this size."""
READ_CHUNK_BYTES = 256 * 1024
MAX_PART_NUMBER = 10_000
_DEFAULT_CONTENT_TYPE = "application/octet-stream"
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchUpload", "NoSuchVersion"})
_PART_CODES = frozenset({"EntityTooSmall", "InvalidPart", "InvalidPartOrder"})


def _map_error(exc: Exception, what: str) -> Exception:  # noqa: PLR0911 - one return per S3 error family
    """The storage error (or caller error) that a boto3 exception means."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")) or code
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND_CODES:
            return BlobNotFoundError(f"{what}: {message}")
        if code in ("PreconditionFailed", "412") or status == 412:
            return PreconditionFailedError(f"{what}: the key already exists ({message})")
        if code == "EntityTooSmall":
            return PreconditionFailedError(
                f"{what}: every part but the last must be at least {MIN_PART_BYTES} bytes"
            )
        if code in _PART_CODES:
            return PreconditionFailedError(f"{what}: {code}: {message}")
        if code == "InvalidRange":
            return ValueError(f"{what}: {message}")
        return StorageError(f"S3 {what} failed: {code}: {message}")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"S3 {what} failed: {exc}")
    return exc


def _etag(raw: str) -> str:
    return raw.strip('"')


def _version(raw: str | None) -> str | None:
    return None if raw in (None, "", "null") else raw


def _total_size(content_range: str | None, content_length: int) -> int:
    """The object's size from a ``Content-Range: bytes a-b/total`` header."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return content_length


class S3BlobStore:
    """:class:`~assets.blobstore.base.BlobStore` over an S3 bucket (see the module docstring).

    Beyond the protocol: :meth:`ensure_bucket` creates the bucket with versioning enabled.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_workers: int = 8,
        client: S3Client | None = None,
    ) -> None:
        """*client*: an existing boto3 S3 client to share (thread-safe; creating one takes
        ~0.1 s). The store then neither configures nor closes it. Without one, the store
        makes its own on first use, on its executor."""
        if prefix:
            validate_key(prefix.strip("/"))
        self._bucket = bucket
        self._prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._endpoint_url = endpoint_url
        self._region_name = region_name
        self._max_workers = max_workers
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="s3-blobstore"
        )
        self._client_lock = threading.Lock()
        self._client: S3Client | None = client
        self._owns_client = client is None

    # ----------------------------------------------------------------- public API

    @property
    def description(self) -> str:
        where = f"s3://{self._bucket}/{self._prefix}".rstrip("/")
        return f"{where} at {self._endpoint_url}" if self._endpoint_url else where

    @property
    def bucket(self) -> str:
        return self._bucket

    async def ensure_bucket(self) -> None:
        """Create the bucket if it is missing and enable versioning on it."""

        def create(client: S3Client) -> None:
            try:
                if self._region_name in (None, "us-east-1"):
                    client.create_bucket(Bucket=self._bucket)
                else:
                    region = cast("BucketLocationConstraintType", self._region_name)
                    client.create_bucket(
                        Bucket=self._bucket,
                        CreateBucketConfiguration={"LocationConstraint": region},
                    )
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            client.put_bucket_versioning(
                Bucket=self._bucket, VersioningConfiguration={"Status": "Enabled"}
            )

        await self._call(f"create bucket {self._bucket}", create)

    async def check(self) -> None:
        try:
            await self._call(
                f"head bucket {self._bucket}", lambda c: c.head_bucket(Bucket=self._bucket)
            )
        except BlobNotFoundError:
            raise StorageError(f"S3 bucket {self._bucket} does not exist") from None

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterator[bytes],
        *,
        content_type: str = _DEFAULT_CONTENT_TYPE,
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
    ) -> BlobInfo:
        full = self._full(validate_key(key))
        meta = {k.lower(): v for k, v in (metadata or {}).items()}
        chunks = _slices(bytes(data)) if isinstance(data, bytes | bytearray) else data
        it = aiter(chunks)
        buffer = bytearray()
        async for chunk in it:
            buffer += chunk
            if len(buffer) > PUT_PART_BYTES:
                break
        else:
            request: PutObjectRequestTypeDef = {
                "Bucket": self._bucket,
                "Key": full,
                "Body": bytes(buffer),
                "ContentType": content_type,
                "Metadata": meta,
            }
            if if_none_match:
                request["IfNoneMatch"] = "*"
            return await self._put_object(key, request)

        if if_none_match and await self.head(key) is not None:
            # Fail before uploading the rest; the conditional completion below still decides.
            raise PreconditionFailedError(f"put {key}: the key already exists")
        upload_id = await self._create(key, content_type, meta)
        try:
            parts: list[PartInfo] = []
            while True:
                while len(buffer) >= PUT_PART_BYTES:
                    part = bytes(buffer[:PUT_PART_BYTES])
                    del buffer[:PUT_PART_BYTES]
                    parts.append(await self.upload_part(key, upload_id, len(parts) + 1, part))
                try:
                    buffer += await anext(it)
                except StopAsyncIteration:
                    break
            if buffer:
                parts.append(await self.upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
            return await self._complete(key, upload_id, parts, if_none_match=if_none_match)
        except BaseException:
            with contextlib.suppress(StorageError):
                await self.abort_multipart(key, upload_id)
            raise

    async def head(self, key: str) -> BlobInfo | None:
        full = self._full(validate_key(key))
        try:
            response = await self._call(
                f"head {key}", lambda c: c.head_object(Bucket=self._bucket, Key=full)
            )
        except BlobNotFoundError:
            return None
        return self._info_from_head(key, response)

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> BlobReader:
        full = self._full(validate_key(key))
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"range {start}-{end} is not a byte range")

        def get_object(client: S3Client) -> GetObjectOutputTypeDef:
            if start == 0 and end is None:  # no Range: an empty object is readable whole
                return client.get_object(Bucket=self._bucket, Key=full)
            span = f"bytes={start}-{'' if end is None else end}"
            return client.get_object(Bucket=self._bucket, Key=full, Range=span)

        response = await self._call(f"get {key}", get_object)
        length = response["ContentLength"]
        info = BlobInfo(
            key=key,
            size_bytes=_total_size(response.get("ContentRange"), length),
            etag=_etag(response["ETag"]),
            last_modified=response["LastModified"],
            content_type=response.get("ContentType", _DEFAULT_CONTENT_TYPE),
            metadata=dict(response.get("Metadata", {})),
            version_id=_version(response.get("VersionId")),
        )
        return BlobReader(info=info, start=start, length=length, chunks=self._read(response))

    async def delete(self, key: str) -> None:
        full = self._full(validate_key(key))
        await self._call(f"delete {key}", lambda c: c.delete_object(Bucket=self._bucket, Key=full))

    async def move(self, src: str, dst: str) -> BlobInfo:
        full_src = self._full(validate_key(src))
        full_dst = self._full(validate_key(dst))
        if src == dst:
            info = await self.head(src)
            if info is None:
                raise BlobNotFoundError(f"move {src}: no such key")
            return info
        await self._call(
            f"move {src} to {dst}",
            lambda c: c.copy(
                CopySource={"Bucket": self._bucket, "Key": full_src},
                Bucket=self._bucket,
                Key=full_dst,
                Config=TransferConfig(max_concurrency=4),
            ),
        )
        await self.delete(src)
        info = await self.head(dst)
        if info is None:
            raise StorageError(f"move {src} to {dst}: the copy vanished")
        return info

    async def create_multipart(self, key: str, *, content_type: str) -> str:
        return await self._create(key, content_type, {})

    async def _create(self, key: str, content_type: str, metadata: dict[str, str]) -> str:
        full = self._full(validate_key(key))
        response = await self._call(
            f"start upload of {key}",
            lambda c: c.create_multipart_upload(
                Bucket=self._bucket,
                Key=full,
                ContentType=content_type,
                Metadata=metadata,
            ),
        )
        return response["UploadId"]

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, data: bytes | AsyncIterator[bytes]
    ) -> PartInfo:
        full = self._full(validate_key(key))
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise ValueError(f"part number {part_number} is outside 1..{MAX_PART_NUMBER}")
        what = f"upload part {part_number} of {key}"
        if isinstance(data, bytes | bytearray):
            body = bytes(data)
            response = await self._call(
                what,
                lambda c: c.upload_part(
                    Bucket=self._bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=part_number,
                    Body=body,
                ),
            )
            return PartInfo(part_number, len(body), _etag(response["ETag"]))
        # A part's length must be known before sending it: spool it (memory, then disk).
        spool = await self._run(
            functools.partial(tempfile.SpooledTemporaryFile, PUT_PART_BYTES, prefix="kshipra-")
        )
        try:
            async for chunk in data:
                await self._run(spool.write, chunk)
            size_bytes = await self._run(spool.tell)
            await self._run(spool.seek, 0)
            response = await self._call(
                what,
                lambda c: c.upload_part(
                    Bucket=self._bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=part_number,
                    Body=spool,
                    ContentLength=size_bytes,
                ),
            )
        finally:
            await asyncio.shield(self._run(spool.close))
        return PartInfo(part_number, size_bytes, _etag(response["ETag"]))

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        full = self._full(validate_key(key))

        def list_all(client: S3Client) -> list[PartInfo]:
            pages = client.get_paginator("list_parts").paginate(
                Bucket=self._bucket, Key=full, UploadId=upload_id
            )
            return [
                PartInfo(part["PartNumber"], part["Size"], _etag(part["ETag"]))
                for page in pages
                for part in page.get("Parts", [])
            ]

        return await self._call(f"list parts of {key}", list_all)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[PartInfo]) -> BlobInfo:
        return await self._complete(key, upload_id, parts, if_none_match=False)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        full = self._full(validate_key(key))
        with contextlib.suppress(BlobNotFoundError):
            await self._call(
                f"abort upload of {key}",
                lambda c: c.abort_multipart_upload(
                    Bucket=self._bucket, Key=full, UploadId=upload_id
                ),
            )

    async def close(self) -> None:
        def shut_down() -> None:
            self._executor.shutdown(wait=True)
            with self._client_lock:
                if self._client is not None and self._owns_client:
                    self._client.close()
                    self._client = None

        await asyncio.to_thread(shut_down)

    # ----------------------------------------------------------------- helpers

    def _full(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def _make_client(self) -> S3Client:
        with self._client_lock:
            if self._client is None:
                options: dict[str, Any] = {
                    "retries": {"max_attempts": 3, "mode": "standard"},
                    "max_pool_connections": self._max_workers * 2,
                }
                if self._endpoint_url:
                    # S3-compatible stores: path-style addressing, and no default CRC
                    # checksums, which older MinIO and Ceph releases reject.
                    options["s3"] = {"addressing_style": "path"}
                    options["request_checksum_calculation"] = "when_required"
                    options["response_checksum_validation"] = "when_required"
                session = boto3.session.Session()
                self._client = session.client(
                    "s3",
                    endpoint_url=self._endpoint_url,
                    region_name=self._region_name,
                    config=Config(**options),
                )
            return self._client

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

    async def _call(self, what: str, fn: Callable[[S3Client], T]) -> T:
        """Run ``fn(client)`` on the executor, mapping boto3 errors to storage errors."""

        def job() -> T:
            try:
                return fn(self._make_client())
            except (ClientError, BotoCoreError) as exc:
                raise _map_error(exc, what) from exc

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, job)

    async def _read(self, response: GetObjectOutputTypeDef) -> AsyncIterator[bytes]:
        body = response["Body"]
        try:
            while chunk := await self._run(body.read, READ_CHUNK_BYTES):
                yield chunk
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"S3 read failed: {exc}") from exc
        finally:
            await asyncio.shield(self._run(body.close))

    async def _put_object(self, key: str, request: PutObjectRequestTypeDef) -> BlobInfo:
        version_id = await self._call(
            f"put {key}", lambda c: c.put_object(**request).get("VersionId")
        )
        return await self._head_written(key, version_id)

    def _info_from_head(self, key: str, response: HeadObjectOutputTypeDef) -> BlobInfo:
        return BlobInfo(
            key=key,
            size_bytes=response["ContentLength"],
            etag=_etag(response["ETag"]),
            last_modified=response["LastModified"],
            content_type=response.get("ContentType", _DEFAULT_CONTENT_TYPE),
            metadata=dict(response.get("Metadata", {})),
            version_id=_version(response.get("VersionId")),
        )

    async def _head_written(self, key: str, version_id: str | None) -> BlobInfo:
        """Info of what we just wrote: the exact version where the bucket is versioned."""
        full = self._full(key)

        def head(client: S3Client) -> HeadObjectOutputTypeDef:
            if version_id is not None and version_id != "null":
                return client.head_object(Bucket=self._bucket, Key=full, VersionId=version_id)
            return client.head_object(Bucket=self._bucket, Key=full)

        return self._info_from_head(key, await self._call(f"head {key}", head))

    async def _complete(
        self, key: str, upload_id: str, parts: list[PartInfo], *, if_none_match: bool
    ) -> BlobInfo:
        full = self._full(validate_key(key))
        if not parts:
            raise PreconditionFailedError(f"complete upload of {key}: no parts")
        completed: list[CompletedPartTypeDef] = [
            {"PartNumber": p.part_number, "ETag": f'"{_etag(p.etag)}"'} for p in parts
        ]

        request: CompleteMultipartUploadRequestTypeDef = {
            "Bucket": self._bucket,
            "Key": full,
            "UploadId": upload_id,
            "MultipartUpload": {"Parts": completed},
        }
        if if_none_match:
            request["IfNoneMatch"] = "*"

        def complete(client: S3Client) -> str | None:
            return client.complete_multipart_upload(**request).get("VersionId")

        version_id = await self._call(f"complete upload of {key}", complete)
        return await self._head_written(key, version_id)

    # Defined last: inside the class body the name `list` means this method.
    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[BlobInfo]:
        if prefix:
            validate_key(prefix + "x")  # a prefix may end in "/" or mid-segment
        paginator = await self._call("list", lambda c: c.get_paginator("list_objects_v2"))
        full_prefix = self._full(prefix)
        if start_after is None:
            pages = iter(paginator.paginate(Bucket=self._bucket, Prefix=full_prefix))
        else:
            pages = iter(
                paginator.paginate(
                    Bucket=self._bucket, Prefix=full_prefix, StartAfter=self._full(start_after)
                )
            )
        while True:
            page = await self._call(f"list {prefix!r}", lambda _c: next(pages, None))
            if page is None:
                return
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self._prefix) :]
                if not _is_key(key):
                    continue  # written by another tool; get() would refuse it too
                yield BlobInfo(
                    key=key,
                    size_bytes=obj["Size"],
                    etag=_etag(obj["ETag"]),
                    last_modified=obj["LastModified"],
                )


async def _slices(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for offset in range(0, len(view), PUT_PART_BYTES):
        yield bytes(view[offset : offset + PUT_PART_BYTES])


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True
