"""Uploads: from request bytes to a published asset version.

Two ways in, one way out:

* a single streamed request (``POST /v1/assets``) — for small files and plain ``curl``;
* a resumable session (``/v1/uploads``) — the file in 8 MiB parts (one part per block of the
  content hash), each part stored as a storage multipart part; an interrupted upload resumes by
  sending only the parts the origin does not hold.

Either way the bytes land under ``staging/…`` while they are checked (kind from the bytes, size
limit, content hash); only then are they moved to ``sources/{hash}`` and the asset's manifest
written — the manifest write is what publishes.
Any failure deletes the staged bytes, so nothing half-written stays in storage.

A bundle is checked against the whole schema of :mod:`assets.bundle_schema` (in a thread: up
to a second of CPU for the largest banks); a bad bank is a 422 listing its first problems with
their JSON paths, and no job is queued. A single request's bundle is checked in memory before
anything is stored; a session's when its parts are joined, and the joined object is deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict

from assets.blobstore import BlobNotFoundError, BlobStore, PartInfo
from assets.bundle_schema import BundleRefused, check_bundle_bytes
from assets.catalogue import (
    AssetLayout,
    Catalogue,
    Manifest,
    Rendition,
    SourceRecord,
    Version,
    now_utc,
    validate_asset_id,
    validate_tag,
)
from assets.hashing import BLOCK_BYTES, TreeHasher, combine_block_digests
from assets.sniff import KINDS, SNIFF_BYTES, Kind, Sniffed, sniff
from cdn_config import UploadLimits
from common.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMedia,
)
from common.wire import UPLOAD_SESSION_PREFIX

log = logging.getLogger(__name__)
MAX_TAGS = 32
MAX_PROBLEMS_SHOWN = 20
"""Problems listed in a refused bundle's 422 (``problems_total`` counts them all)."""


def check_kind(kind: str | None) -> Kind | None:
    if kind is None or kind == "":
        return None
    for known in KINDS:
        if kind == known:
            return known
    raise BadRequest("invalid_kind", f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def bundle_refused(exc: BundleRefused) -> Unprocessable:
    """A 422 naming the first :data:`MAX_PROBLEMS_SHOWN` problems, each with its JSON path:
    ``{"error": {"status", "code", "message", "problems": [{"path", "message"}],
    "problems_total"}}``."""
    problems = exc.problems
    total = len(problems)
    if exc.code == "invalid_json":
        message = f"invalid bundle: {problems[0].message}"
    else:
        noun = "problem" if total == 1 else "problems"
        shown = f", the first {MAX_PROBLEMS_SHOWN} listed" if total > MAX_PROBLEMS_SHOWN else ""
        message = f"invalid bundle: {total} {noun}{shown}"
    return Unprocessable(
        exc.code,
        message,
        problems=[{"path": p.path, "message": p.message} for p in problems[:MAX_PROBLEMS_SHOWN]],
        problems_total=total,
    )


def check_tags(tags: list[str]) -> list[str]:
    if len(tags) > MAX_TAGS:
        raise BadRequest("too_many_tags", f"at most {MAX_TAGS} tags per asset")
    return [validate_tag(tag) for tag in tags]


def _kind_mismatch(claimed: Kind, sniffed: Sniffed | None) -> UnsupportedMedia:
    seen = f"{sniffed.format} ({sniffed.kind})" if sniffed else "no supported format"
    return UnsupportedMedia(
        "kind_mismatch",
        f"the upload was declared a {claimed}, but its bytes look like {seen}",
    )


class _Guard:
    """Watches bytes as they stream: recognises the kind from the head, enforces the size
    limit, and feeds a hash. Raises client faults that abort the stream."""

    def __init__(
        self,
        *,
        claimed: Kind | None,
        limits: UploadLimits,
        on_bytes: Callable[[bytes], None],
        sniff_head: bool = True,
        exact_bytes: int | None = None,
    ) -> None:
        self.claimed = claimed
        self.limits = limits
        self.sniffed: Sniffed | None = None
        self.size_bytes = 0
        self._head = b""
        self._sniff_head = sniff_head
        self._on_bytes = on_bytes
        self._exact_bytes = exact_bytes

    def limit_bytes(self) -> int:
        kind = self.sniffed.kind if self.sniffed else self.claimed
        if kind is not None:
            return self.limits.for_kind(kind)
        return max(self.limits.for_kind(k) for k in KINDS)

    def _settle_kind(self) -> None:
        self.sniffed = sniff(self._head)
        if self.sniffed is None:
            raise UnsupportedMedia(
                "unknown_format",
                "the bytes are not a supported lecture (MP4, MOV, MKV, WebM, AVI, MPEG-TS), "
                "image (JPEG, PNG, WebP, GIF, AVIF, HEIC) or bundle (JSON)",
            )
        if self.claimed is not None and self.sniffed.kind != self.claimed:
            raise _kind_mismatch(self.claimed, self.sniffed)

    async def watch(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if not chunk:
                continue
            self.size_bytes += len(chunk)
            if self._exact_bytes is not None and self.size_bytes > self._exact_bytes:
                raise BadRequest("part_size", f"this part must be {self._exact_bytes} bytes")
            if self._sniff_head and self.sniffed is None:
                self._head += chunk[: SNIFF_BYTES - len(self._head)]
                if len(self._head) >= SNIFF_BYTES:
                    self._settle_kind()
            if self.size_bytes > self.limit_bytes():
                kind = self.sniffed.kind if self.sniffed else self.claimed or "upload"
                raise PayloadTooLarge(
                    "too_large", f"a {kind} may be at most {self.limit_bytes()} bytes"
                )
            self._on_bytes(chunk)
            yield chunk
        if self.size_bytes == 0:
            raise BadRequest("empty_upload", "the upload is empty")
        if self._exact_bytes is not None and self.size_bytes != self._exact_bytes:
            raise BadRequest(
                "part_size", f"this part must be {self._exact_bytes} bytes, got {self.size_bytes}"
            )
        if self._sniff_head and self.sniffed is None:
            self._settle_kind()


@dataclass(frozen=True, slots=True)
class PublishResult:
    manifest: Manifest
    created: bool
    """False when the same bytes were already the asset's newest version."""
    version: int


Submit = Callable[[Manifest, Version], Awaitable[None]]
"""Hands a new version to processing (the transcode queue)."""


class SessionRecord(BaseModel):
    """A resumable upload, kept in Redis while it is open."""

    model_config = ConfigDict(extra="forbid")

    upload_id: str
    storage_upload_id: str
    staging_key: str
    asset_id: str
    kind: Kind | None
    tags: list[str]
    filename: str | None
    size_bytes: int
    content_hash: str
    part_bytes: int
    state: str = "open"
    """``open`` or ``completed`` (a completed record answers a repeated complete)."""

    @property
    def parts_total(self) -> int:
        return max(1, math.ceil(self.size_bytes / self.part_bytes))

    def expected_part_bytes(self, number: int) -> int:
        if number < self.parts_total:
            return self.part_bytes
        return self.size_bytes - self.part_bytes * (self.parts_total - 1)


class Ingest:
    """The upload pipeline. One per origin process."""

    def __init__(
        self,
        *,
        store: BlobStore,
        catalogue: Catalogue,
        redis: aioredis.Redis,
        limits: UploadLimits,
        session_ttl_s: int,
        submit: Submit,
    ) -> None:
        self._submit = submit
        self._store = store
        self._catalogue = catalogue
        self._redis = redis
        self._limits = limits
        self._session_ttl_s = session_ttl_s

    # ---- single streamed request ----------------------------------------------------------

    async def upload_stream(
        self,
        chunks: AsyncIterator[bytes],
        *,
        kind: Kind | None,
        asset_id: str,
        filename: str | None,
        tags: list[str],
        declared_bytes: int | None,
    ) -> PublishResult:
        validate_asset_id(asset_id)
        check_tags(tags)
        if declared_bytes == 0:
            raise BadRequest("empty_upload", "the upload is empty")
        hasher = TreeHasher()
        guard = _Guard(claimed=kind, limits=self._limits, on_bytes=hasher.update)
        if declared_bytes is not None and declared_bytes > guard.limit_bytes():
            raise PayloadTooLarge(
                "too_large",
                f"a {kind or 'upload'} may be at most {guard.limit_bytes()} bytes; "
                f"this one is {declared_bytes}",
            )
        watched = guard.watch(chunks)
        head: list[bytes] = []
        if kind in (None, "bundle"):
            async for chunk in watched:  # until the kind is known (the first 512 bytes)
                head.append(chunk)
                if guard.sniffed is not None:
                    break
        staging_key = AssetLayout.staging_key(secrets.token_hex(16))
        checked = guard.sniffed is not None and guard.sniffed.kind == "bundle"
        if checked:
            # A bundle (at most the bundle limit) is checked in memory: a bad bank is refused
            # before any byte of it is stored.
            head.extend([chunk async for chunk in watched])
            data = b"".join(head)
            head.clear()
            await self._check_bundle(data)
            await self._store.put(staging_key, data)
        else:
            await self._store.put(staging_key, _chain(head, watched))
        assert guard.sniffed is not None
        return await self._publish_staged(
            staging_key,
            checked=checked,
            sniffed=guard.sniffed,
            content_hash=hasher.hexdigest(),
            size_bytes=guard.size_bytes,
            asset_id=asset_id,
            filename=filename,
            tags=tags,
        )

    # ---- publishing -----------------------------------------------------------------------

    async def _check_bundle(self, data: bytes) -> None:
        """The bundle schema (:mod:`assets.bundle_schema`); :class:`Unprocessable` with the
        first problems, each with its JSON path."""
        try:
            # Up to a second of CPU for the largest banks: off the event loop.
            await asyncio.to_thread(check_bundle_bytes, data)
        except BundleRefused as exc:
            raise bundle_refused(exc) from None

    async def _validate_bundle(self, key: str) -> None:
        """:meth:`_check_bundle` on the bytes stored at ``key``."""
        reader = await self._store.get(key)
        await self._check_bundle(await reader.read_all())

    async def _publish_staged(  # noqa: PLR0913 - keyword-only values of one staged upload
        self,
        staging_key: str,
        *,
        bytes_key: str | None = None,
        checked: bool = False,
        sniffed: Sniffed,
        content_hash: str,
        size_bytes: int,
        asset_id: str,
        filename: str | None,
        tags: list[str],
    ) -> PublishResult:
        at_source = staging_key == AssetLayout.source_key(content_hash)
        try:
            if sniffed.kind == "bundle" and not checked:
                try:
                    await self._validate_bundle(bytes_key or staging_key)
                except Unprocessable:
                    if at_source:  # invalid bytes: nothing can reference them
                        await self._store.delete(staging_key)
                    raise
            async with self._redis.lock(
                f"kshipra:lock:asset:{asset_id}", timeout=60, blocking_timeout=30
            ):
                result = await self._publish_locked(
                    staging_key,
                    sniffed=sniffed,
                    content_hash=content_hash,
                    size_bytes=size_bytes,
                    asset_id=asset_id,
                    filename=filename,
                    tags=tags,
                )
            if result.created:
                # Outside the lock: a job that already ran publishes under the same lock.
                version = result.manifest.version(result.version)
                assert version is not None
                await self._submit(result.manifest, version)
            return result
        finally:
            if not at_source:
                await self._store.delete(staging_key)

    async def _publish_locked(  # noqa: PLR0913 - keyword-only values of one staged upload
        self,
        staging_key: str,
        *,
        sniffed: Sniffed,
        content_hash: str,
        size_bytes: int,
        asset_id: str,
        filename: str | None,
        tags: list[str],
    ) -> PublishResult:
        manifest = await self._catalogue.get(asset_id, fresh=True)
        if manifest is not None and manifest.kind != sniffed.kind:
            raise Conflict(
                "kind_conflict",
                f"asset {asset_id!r} is a {manifest.kind}; this upload is a {sniffed.kind}",
            )
        newest = manifest.newest if manifest is not None else None
        if (
            manifest is not None
            and newest is not None
            and newest.source.content_hash == content_hash
            and newest.state != "failed"
        ):
            new_tags = [tag for tag in tags if tag not in manifest.tags]
            if new_tags:
                manifest = manifest.model_copy(
                    update={"tags": [*manifest.tags, *new_tags], "updated_at": now_utc()}
                )
                await self._catalogue.put(manifest)
            return PublishResult(manifest, created=False, version=newest.version)
        source_key = AssetLayout.source_key(content_hash)
        if await self._store.head(source_key) is None:
            await self._store.move(staging_key, source_key)
        now = now_utc()
        number = max((v.version for v in manifest.versions), default=0) + 1 if manifest else 1
        name = AssetLayout.source_rendition_name(sniffed.kind, sniffed.extension)
        version = Version(
            version=number,
            created_at=now,
            source=SourceRecord(
                content_hash=content_hash,
                size_bytes=size_bytes,
                content_type=sniffed.content_type,
                format=sniffed.format,
                filename=filename,
                key=source_key,
            ),
            renditions={
                name: Rendition(
                    key=source_key,
                    size_bytes=size_bytes,
                    content_type=sniffed.content_type,
                    etag=f'"{content_hash[:40]}"',
                )
            },
            primary=name,
            state="processing",
        )
        if manifest is None:
            manifest = Manifest(
                id=asset_id,
                kind=sniffed.kind,
                status="processing",
                tags=list(dict.fromkeys(tags)),
                created_at=now,
                updated_at=now,
                current_version=None,
                versions=[version],
            )
        else:
            manifest = manifest.model_copy(
                update={
                    "status": "processing",
                    "status_reason": None,
                    "tags": list(dict.fromkeys([*manifest.tags, *tags])),
                    "updated_at": now,
                    "versions": [*manifest.versions, version],
                }
            )
        await self._catalogue.put(manifest)
        log.info("stored %s v%d (%d bytes, %s)", asset_id, number, size_bytes, content_hash)
        return PublishResult(manifest, created=True, version=number)

    async def publish_existing_source(
        self, *, content_hash: str, asset_id: str, filename: str | None, tags: list[str]
    ) -> PublishResult | None:
        """Publish a version from bytes the origin already holds (same file, other asset id);
        ``None`` if it does not hold them."""
        source = await self._store.head(AssetLayout.source_key(content_hash))
        if source is None:
            return None
        reader = await self._store.get(source.key, end=min(source.size_bytes, SNIFF_BYTES) - 1)
        sniffed = sniff(await reader.read_all())
        if sniffed is None:
            return None
        staging_key = AssetLayout.staging_key(secrets.token_hex(16))
        return await self._publish_staged(
            staging_key,
            bytes_key=source.key,
            sniffed=sniffed,
            content_hash=content_hash,
            size_bytes=source.size_bytes,
            asset_id=asset_id,
            filename=filename,
            tags=tags,
        )

    # ---- resumable sessions ---------------------------------------------------------------

    def _session_key(self, upload_id: str) -> str:
        return f"{UPLOAD_SESSION_PREFIX}{upload_id}"

    async def _load_session(self, upload_id: str) -> SessionRecord:
        if not upload_id.isalnum() or len(upload_id) > 64:
            raise NotFound("unknown_upload", f"no upload {upload_id!r}")
        raw = await self._redis.get(self._session_key(upload_id))
        if raw is None:
            raise NotFound(
                "unknown_upload", f"no open upload {upload_id!r} (finished, aborted or expired)"
            )
        return SessionRecord.model_validate_json(raw)

    async def _save_session(self, session: SessionRecord) -> None:
        await self._redis.set(
            self._session_key(session.upload_id),
            session.model_dump_json(),
            ex=self._session_ttl_s,
        )

    async def create_session(  # noqa: C901 - one branch per session field the client may send
        self,
        *,
        kind: Kind | None,
        asset_id: str,
        filename: str | None,
        tags: list[str],
        size_bytes: int,
        content_hash: str,
    ) -> tuple[SessionRecord | None, PublishResult | None, list[int]]:
        """Open (or find again) a session for this file. Returns ``(session, None, received)``,
        or ``(None, result, [])`` when the origin already holds these bytes and nothing needs
        to be sent."""
        validate_asset_id(asset_id)
        check_tags(tags)
        if size_bytes <= 0:
            raise BadRequest("empty_upload", "the upload is empty")
        if len(content_hash) != 64 or any(c not in "0123456789abcdef" for c in content_hash):
            raise BadRequest("invalid_hash", "content_hash must be 64 lowercase hex digits")
        limit = (
            self._limits.for_kind(kind) if kind else max(self._limits.for_kind(k) for k in KINDS)
        )
        if size_bytes > limit:
            raise PayloadTooLarge(
                "too_large",
                f"a {kind or 'upload'} may be at most {limit} bytes; this one is {size_bytes}",
            )
        existing = await self._catalogue.get(asset_id, fresh=True)
        if (
            existing is not None
            and existing.newest.source.content_hash == content_hash
            and existing.newest.state != "failed"
        ):
            return (
                None,
                PublishResult(existing, created=False, version=existing.newest.version),
                [],
            )
        reused = await self.publish_existing_source(
            content_hash=content_hash, asset_id=asset_id, filename=filename, tags=tags
        )
        if reused is not None:
            if kind is not None and reused.manifest.kind != kind:
                raise _kind_mismatch(kind, None)
            return None, reused, []
        index_key = f"{UPLOAD_SESSION_PREFIX}index:{asset_id}:{content_hash}"
        upload_id = await self._redis.get(index_key)
        if upload_id is not None:
            try:
                session = await self._load_session(str(upload_id))
            except NotFound:
                pass
            else:
                if session.state == "open":
                    return session, None, await self.received_parts(session)
        if existing is not None and kind is not None and existing.kind != kind:
            raise Conflict(
                "kind_conflict", f"asset {asset_id!r} is a {existing.kind}; this upload is a {kind}"
            )
        upload_id = secrets.token_hex(16)
        # Parts go straight to the content-addressed key: the object appears there only when
        # the verified parts are joined, and publishing then needs no copy.
        staging_key = AssetLayout.source_key(content_hash)
        storage_upload_id = await self._store.create_multipart(
            staging_key, content_type="application/octet-stream"
        )
        session = SessionRecord(
            upload_id=upload_id,
            storage_upload_id=storage_upload_id,
            staging_key=staging_key,
            asset_id=asset_id,
            kind=kind,
            tags=tags,
            filename=filename,
            size_bytes=size_bytes,
            content_hash=content_hash,
            part_bytes=BLOCK_BYTES,
        )
        await self._save_session(session)
        await self._redis.set(index_key, upload_id, ex=self._session_ttl_s)
        return session, None, []

    async def session(self, upload_id: str) -> tuple[SessionRecord, list[int]]:
        session = await self._load_session(upload_id)
        return session, await self.received_parts(session)

    async def _received(self, session: SessionRecord) -> dict[int, tuple[PartInfo, str]]:
        """Parts both stored and recorded with the same size: number → (part, sha256 hex)."""
        digests = await self._redis.hgetall(self._session_key(session.upload_id) + ":parts")
        try:
            stored = await self._store.list_parts(session.staging_key, session.storage_upload_id)
        except BlobNotFoundError:
            return {}
        by_number = {part.part_number: part for part in stored}
        received = {}
        for raw_number, value in digests.items():
            size_text, _, digest = str(value).partition(":")
            part = by_number.get(int(raw_number))
            if part is not None and part.size_bytes == int(size_text):
                received[part.part_number] = (part, digest)
        return received

    async def received_parts(self, session: SessionRecord) -> list[int]:
        return sorted(await self._received(session))

    async def put_part(
        self, upload_id: str, number: int, chunks: AsyncIterator[bytes]
    ) -> tuple[SessionRecord, int]:
        session = await self._load_session(upload_id)
        if session.state != "open":
            raise Conflict("upload_completed", "this upload is already complete")
        if not 1 <= number <= session.parts_total:
            raise BadRequest(
                "invalid_part", f"part numbers run from 1 to {session.parts_total}, got {number}"
            )
        expected = session.expected_part_bytes(number)
        digest = hashlib.sha256()
        guard = _Guard(
            claimed=session.kind,
            limits=self._limits,
            on_bytes=digest.update,
            sniff_head=number == 1,
            exact_bytes=expected,
        )
        try:
            part = await self._store.upload_part(
                session.staging_key, session.storage_upload_id, number, guard.watch(chunks)
            )
        except UnsupportedMedia:
            await self.abort(upload_id)
            raise
        if part.size_bytes != expected:
            raise BadRequest(
                "part_size", f"part {number} must be {expected} bytes, got {part.size_bytes}"
            )
        if number == 1 and guard.sniffed is not None:
            existing = await self._catalogue.get(session.asset_id, fresh=True)
            if existing is not None and existing.kind != guard.sniffed.kind:
                await self.abort(upload_id)
                raise Conflict(
                    "kind_conflict",
                    f"asset {session.asset_id!r} is a {existing.kind}; "
                    f"this upload is a {guard.sniffed.kind}",
                )
            limit = self._limits.for_kind(guard.sniffed.kind)
            if session.size_bytes > limit:
                await self.abort(upload_id)
                raise PayloadTooLarge(
                    "too_large", f"a {guard.sniffed.kind} may be at most {limit} bytes"
                )
        await self._redis.hset(
            self._session_key(upload_id) + ":parts",
            str(number),
            f"{part.size_bytes}:{digest.hexdigest()}",
        )
        await self._redis.expire(self._session_key(upload_id) + ":parts", self._session_ttl_s)
        return session, part.size_bytes

    async def complete(self, upload_id: str) -> PublishResult:
        session = await self._load_session(upload_id)
        if session.state == "completed":
            manifest = await self._catalogue.get(session.asset_id, fresh=True)
            if manifest is None:
                raise NotFound("unknown_asset", f"asset {session.asset_id!r} no longer exists")
            return PublishResult(manifest, created=False, version=manifest.newest.version)
        received = await self._received(session)
        missing = sorted(set(range(1, session.parts_total + 1)) - set(received))
        if missing:
            raise Conflict(
                "parts_missing",
                f"{len(missing)} of {session.parts_total} parts still missing "
                f"(first: {missing[0]})",
                missing=missing[:100],
            )
        actual_hash = combine_block_digests(
            bytes.fromhex(received[n][1]) for n in range(1, session.parts_total + 1)
        )
        if actual_hash != session.content_hash:
            await self.abort(upload_id)
            raise Unprocessable(
                "hash_mismatch",
                f"the parts hash to {actual_hash}, not the declared {session.content_hash}; "
                "the upload was discarded",
            )
        parts = [received[n][0] for n in range(1, session.parts_total + 1)]
        await self._store.complete_multipart(session.staging_key, session.storage_upload_id, parts)
        head = await self._store.get(
            session.staging_key, end=min(session.size_bytes, SNIFF_BYTES) - 1
        )
        sniffed = sniff(await head.read_all())
        if sniffed is None or (session.kind is not None and sniffed.kind != session.kind):
            # Part 1 was checked on arrival, so this is a bytes-changed-under-us case; only
            # unrecognisable bytes are surely unreferenced.
            if sniffed is None:
                await self._store.delete(session.staging_key)
            await self._forget(session)
            raise (
                _kind_mismatch(session.kind, sniffed)
                if session.kind
                else UnsupportedMedia(
                    "unknown_format", "the bytes are not a supported lecture, image or bundle"
                )
            )
        try:
            result = await self._publish_staged(
                session.staging_key,
                sniffed=sniffed,
                content_hash=session.content_hash,
                size_bytes=session.size_bytes,
                asset_id=session.asset_id,
                filename=session.filename,
                tags=session.tags,
            )
        except Exception:
            await self._forget(session)
            raise
        session.state = "completed"
        await self._save_session(session)
        await self._redis.delete(self._session_key(upload_id) + ":parts")
        return result

    async def _forget(self, session: SessionRecord) -> None:
        await self._redis.delete(
            self._session_key(session.upload_id),
            self._session_key(session.upload_id) + ":parts",
            f"{UPLOAD_SESSION_PREFIX}index:{session.asset_id}:{session.content_hash}",
        )

    async def abort(self, upload_id: str) -> None:
        session = await self._load_session(upload_id)
        if session.state == "open":
            await self._store.abort_multipart(session.staging_key, session.storage_upload_id)
        await self._forget(session)

    async def sweep_staging(self, *, older_than_s: int) -> int:
        """Delete staged bytes left behind by a crashed origin. Returns how many."""
        removed = 0
        cutoff = now_utc().timestamp() - older_than_s
        async for info in self._store.list("staging/"):
            if info.last_modified.timestamp() < cutoff:
                await self._store.delete(info.key)
                removed += 1
        return removed


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def session_view(session: SessionRecord, received: list[int]) -> dict[str, Any]:
    return {
        "upload_id": session.upload_id,
        "asset_id": session.asset_id,
        "kind": session.kind,
        "size_bytes": session.size_bytes,
        "content_hash": session.content_hash,
        "part_bytes": session.part_bytes,
        "parts_total": session.parts_total,
        "received_parts": received,
        "state": session.state,
    }
