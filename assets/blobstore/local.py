"""A blob store in a local directory: the embedded default.

Layout under the root directory::

    <root>/<key>                          the object's bytes, as a plain file (sendfile-able)
    <root>/.meta/<key>@<inode>.json       its record: etag, size, content type, user metadata
    <root>/.tmp/                          files being written (same filesystem as the data)
    <root>/.multipart/<upload_id>/        one open multipart upload:
        upload.json                         the key and content type it was started with
        00001, 00002, ...                   the parts received, one file per part number
        00001@<inode>.json, ...             each part's record (etag, size)

**Metadata consistency.** A record is named after the inode of the data file it describes, and
it is written (atomically: temp file, fsync, rename) *before* that data file is renamed into
place. A reader opens the data file, ``fstat``\\s the open descriptor and reads the record named
after that inode, so the pair it sees always belongs together, whatever writers do meanwhile:
a concurrent overwrite renames a different inode into place, and the descriptor keeps the old
bytes. After the rename the writer removes the record of the inode it replaced. If a reader
finds no record for its inode (it raced that removal, or the file was copied in by hand, or a
writer crashed), it re-opens once the path has moved on, and otherwise rebuilds the record from
the bytes (MD5, content type guessed from the key's extension) and stores it. A crash can leave
an orphan record or temp file behind; neither is ever read as current.

**Atomicity.** Writes stream into ``.tmp/``, hashing as they go, are fsynced and then renamed
into place (``os.replace``; ``os.link`` for ``if_none_match``, which fails if the key exists).
If the body iterator raises or the task is cancelled, the temp file is removed before the
exception propagates.

**Limitations.** A key cannot be both an object and a "folder" of other keys (``a`` and
``a/b``), since both are paths on one filesystem; such a write raises :class:`StorageError`.
ETags are the hex MD5 of the content (a multipart object's too, unlike S3's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import json
import mimetypes
import os
import re
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

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

__all__ = ["LocalDirBlobStore"]

T = TypeVar("T")

META_DIR = ".meta"
TMP_DIR = ".tmp"
MULTIPART_DIR = ".multipart"
READ_CHUNK_BYTES = 256 * 1024
WRITE_BATCH_BYTES = 1024 * 1024
MAX_PART_NUMBER = 10_000
_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_PART_NAME_RE = re.compile(r"^[0-9]{5}$")
_DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class _Record:
    """What the sidecar of one data file says."""

    etag: str
    size_bytes: int
    content_type: str = _DEFAULT_CONTENT_TYPE
    metadata: dict[str, str] | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "etag": self.etag,
                "size_bytes": self.size_bytes,
                "content_type": self.content_type,
                "metadata": self.metadata or {},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> _Record | None:
        try:
            doc = json.loads(raw)
            metadata = doc["metadata"]
            if not isinstance(metadata, dict):
                return None
            return cls(
                etag=str(doc["etag"]),
                size_bytes=int(doc["size_bytes"]),
                content_type=str(doc["content_type"]),
                metadata={str(k): str(v) for k, v in metadata.items()},
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one data file and its records live: ``data`` and ``<meta_base>@<inode>.json``."""

    data: Path
    meta_base: Path

    def meta_for(self, inode: int) -> Path:
        return self.meta_base.with_name(f"{self.meta_base.name}@{inode}.json")


@dataclass(slots=True)
class _Spooled:
    """A finished temp file: fsynced and closed."""

    path: Path
    size_bytes: int
    etag: str


class _Worker:
    """Runs one operation's blocking steps, in order, on the store's executor.

    Remembers the step in flight so that cleanup after a cancellation waits for it to finish
    before closing or removing the files it uses."""

    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self._executor = executor
        self._pending: concurrent.futures.Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        future = self._executor.submit(fn, *args)
        self._pending = future
        try:
            return await asyncio.wrap_future(future)
        except OSError as exc:
            raise StorageError(f"local blob store: {exc}") from exc

    async def cleanup(self, fn: Callable[..., None], *args: Any) -> None:
        """Run *fn* after the step in flight; it runs to the end even if we are cancelled."""
        pending = self._pending

        def job() -> None:
            if pending is not None:
                concurrent.futures.wait([pending])
            with contextlib.suppress(OSError):
                fn(*args)

        await asyncio.shield(asyncio.wrap_future(self._executor.submit(job)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_missing(exc: OSError) -> bool:
    return isinstance(exc, FileNotFoundError | NotADirectoryError)


class LocalDirBlobStore:
    """:class:`~assets.blobstore.base.BlobStore` over a directory (see the module docstring).

    Beyond the protocol: :meth:`path_for` gives the on-disk path of an object (for sendfile).
    """

    def __init__(self, root: str | os.PathLike[str], *, max_workers: int = 4) -> None:
        self._root = Path(root).absolute()
        self._tmp = self._root / TMP_DIR
        self._meta = self._root / META_DIR
        self._multipart = self._root / MULTIPART_DIR
        try:
            for directory in (self._root, self._tmp, self._meta, self._multipart):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create blob store directory {self._root}: {exc}") from exc
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="local-blobstore"
        )

    # ----------------------------------------------------------------- public API

    @property
    def description(self) -> str:
        return str(self._root)

    @property
    def root(self) -> Path:
        return self._root

    def path_for(self, key: str) -> Path:
        """The file holding *key*'s bytes (it may not exist). For sendfile: read the info with
        :meth:`head` first; a concurrent overwrite replaces the file, never changes it."""
        return self._slot(validate_key(key)).data

    async def check(self) -> None:
        await _Worker(self._executor).run(self._check_sync)

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterator[bytes],
        *,
        content_type: str = _DEFAULT_CONTENT_TYPE,
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
    ) -> BlobInfo:
        slot = self._slot(validate_key(key))
        worker = _Worker(self._executor)
        if if_none_match and await worker.run(os.path.lexists, slot.data):
            # Fail before reading the body; the link in _commit_sync still decides.
            raise PreconditionFailedError(f"put {key}: the key already exists")
        spooled = await self._spool(worker, data)
        try:
            record = _Record(
                etag=spooled.etag,
                size_bytes=spooled.size_bytes,
                content_type=content_type,
                metadata={k.lower(): v for k, v in (metadata or {}).items()},
            )
            st = await worker.run(
                self._commit_sync, spooled.path, slot, record, if_none_match, True
            )
        except BaseException:
            await worker.cleanup(_unlink_quietly, spooled.path)
            raise
        return self._info(key, st, record)

    async def head(self, key: str) -> BlobInfo | None:
        slot = self._slot(validate_key(key))
        try:
            return await _Worker(self._executor).run(self._info_sync, key, slot)
        except BlobNotFoundError:
            return None

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> BlobReader:
        slot = self._slot(validate_key(key))
        worker = _Worker(self._executor)
        file, st, record = await worker.run(self._open_sync, key, slot)
        size_bytes = record.size_bytes
        last = size_bytes - 1 if end is None else min(end, size_bytes - 1)
        if start < 0 or (start > last and not (start == 0 and end is None)):
            await worker.run(file.close)
            raise ValueError(f"range {start}-{end} is outside {key!r} ({size_bytes} bytes)")
        length = max(0, last - start + 1)
        return BlobReader(
            info=self._info(key, st, record),
            start=start,
            length=length,
            chunks=self._read_chunks(worker, file, start, length),
        )

    async def delete(self, key: str) -> None:
        slot = self._slot(validate_key(key))
        await _Worker(self._executor).run(self._delete_sync, slot)

    async def move(self, src: str, dst: str) -> BlobInfo:
        src_slot = self._slot(validate_key(src))
        dst_slot = self._slot(validate_key(dst))
        worker = _Worker(self._executor)
        if src == dst:
            return await worker.run(self._info_sync, src, src_slot)
        st, record = await worker.run(self._move_sync, src, src_slot, dst_slot)
        return self._info(dst, st, record)

    async def create_multipart(self, key: str, *, content_type: str) -> str:
        validate_key(key)
        upload_id = uuid.uuid4().hex
        doc = json.dumps({"key": key, "content_type": content_type}).encode()
        await _Worker(self._executor).run(self._create_upload_sync, upload_id, doc)
        return upload_id

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, data: bytes | AsyncIterator[bytes]
    ) -> PartInfo:
        validate_key(key)
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise ValueError(f"part number {part_number} is outside 1..{MAX_PART_NUMBER}")
        worker = _Worker(self._executor)
        upload_dir, _ = await worker.run(self._load_upload_sync, key, upload_id)
        spooled = await self._spool(worker, data)
        name = f"{part_number:05d}"
        slot = _Slot(upload_dir / name, upload_dir / name)
        try:
            record = _Record(etag=spooled.etag, size_bytes=spooled.size_bytes)
            await worker.run(self._commit_sync, spooled.path, slot, record, False, False)
        except BaseException:
            await worker.cleanup(_unlink_quietly, spooled.path)
            raise
        return PartInfo(part_number, spooled.size_bytes, spooled.etag)

    async def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        validate_key(key)
        return await _Worker(self._executor).run(self._list_parts_sync, key, upload_id)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[PartInfo]) -> BlobInfo:
        slot = self._slot(validate_key(key))
        worker = _Worker(self._executor)
        st, record = await worker.run(self._complete_sync, key, upload_id, parts, slot)
        return self._info(key, st, record)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        validate_key(key)
        await _Worker(self._executor).run(self._abort_sync, key, upload_id)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # ----------------------------------------------------------------- async helpers

    async def _spool(self, worker: _Worker, data: bytes | AsyncIterator[bytes]) -> _Spooled:
        """Stream *data* into a new temp file; on any failure remove it and re-raise."""
        path, file = await worker.run(self._new_temp_sync)
        hasher = hashlib.md5(usedforsecurity=False)
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                await worker.run(_write_hashed, file, hasher, bytes(data))
            else:
                batch = bytearray()
                async for chunk in data:
                    batch += chunk
                    if len(batch) >= WRITE_BATCH_BYTES:
                        await worker.run(_write_hashed, file, hasher, bytes(batch))
                        batch.clear()
                if batch:
                    await worker.run(_write_hashed, file, hasher, bytes(batch))
            size_bytes = await worker.run(_finish_file, file)
        except BaseException:
            await worker.cleanup(_discard, file, path)
            raise
        return _Spooled(path, size_bytes, hasher.hexdigest())

    async def _read_chunks(
        self, worker: _Worker, file: io.FileIO, start: int, length: int
    ) -> AsyncIterator[bytes]:
        try:
            offset, remaining = start, length
            while remaining > 0:
                size = min(READ_CHUNK_BYTES, remaining)
                chunk = await worker.run(os.pread, file.fileno(), size, offset)
                if not chunk:
                    raise StorageError(f"file shrank while being read at offset {offset}")
                offset += len(chunk)
                remaining -= len(chunk)
                yield chunk
        finally:
            await worker.cleanup(file.close)

    async def _walk(
        self, worker: _Worker, rel_dir: str, name_prefix: str, start_after: str | None
    ) -> AsyncIterator[str]:
        """Keys under *rel_dir* whose next segment starts with *name_prefix*, in key order,
        after *start_after*. A directory whose every key sorts before *start_after* is not
        entered."""
        entries = await worker.run(self._scan_sync, rel_dir, name_prefix)
        for name, is_dir in entries:
            if is_dir:
                sub_dir = f"{rel_dir}{name}/"
                if (
                    start_after is not None
                    and sub_dir < start_after
                    and not start_after.startswith(sub_dir)
                ):
                    continue
                async for key in self._walk(worker, sub_dir, "", start_after):
                    yield key
            else:
                key = f"{rel_dir}{name}"
                if start_after is None or key > start_after:
                    yield key

    # ----------------------------------------------------------------- pure helpers

    def _slot(self, key: str) -> _Slot:
        return _Slot(self._root / key, self._meta / key)

    @staticmethod
    def _info(key: str, st: os.stat_result, record: _Record) -> BlobInfo:
        return BlobInfo(
            key=key,
            size_bytes=record.size_bytes,
            etag=record.etag,
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            content_type=record.content_type,
            metadata=dict(record.metadata or {}),
        )

    # ----------------------------------------------------------------- blocking steps
    # Everything below runs on the executor, never on the event loop.

    def _check_sync(self) -> None:
        if not self._root.is_dir():
            raise StorageError(f"blob store root {self._root} is not a directory")
        path, file = self._new_temp_sync()
        _discard(file, path)

    def _new_temp_sync(self) -> tuple[Path, IO[bytes]]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        path = self._tmp / uuid.uuid4().hex
        return path, path.open("xb")

    def _write_record_sync(self, meta_path: Path, record: _Record) -> None:
        path, file = self._new_temp_sync()
        try:
            file.write(record.to_json())
            _finish_file(file)
            os.replace(path, meta_path)
        except BaseException:
            _discard(file, path)
            raise

    def _read_record_sync(self, slot: _Slot, st: os.stat_result) -> _Record | None:
        try:
            record = _Record.from_json(slot.meta_for(st.st_ino).read_bytes())
        except OSError as exc:
            if _is_missing(exc):
                return None
            raise
        if record is None or record.size_bytes != st.st_size:
            return None
        return record

    def _commit_sync(  # noqa: C901, PLR0912 - the commit's steps and their rollbacks read best together
        self, tmp: Path, slot: _Slot, record: _Record, if_none_match: bool, make_parents: bool
    ) -> os.stat_result:
        """Write *record* for *tmp*'s inode, then rename *tmp* to *slot.data*.

        With ``make_parents=False`` (parts of an upload) a vanished directory means the upload
        was aborted: :class:`BlobNotFoundError`."""
        st = tmp.stat()
        meta_path = slot.meta_for(st.st_ino)
        replaced: os.stat_result | None = None
        try:
            if make_parents:
                _make_parent(meta_path)
            self._write_record_sync(meta_path, record)
            for attempt in range(3):
                if make_parents:
                    _make_parent(slot.data)
                try:
                    if if_none_match:
                        os.link(tmp, slot.data)  # fails if the key exists: race-free
                        tmp.unlink()
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            replaced = slot.data.lstat()
                        os.replace(tmp, slot.data)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise  # a concurrent delete kept pruning our parent directory
        except FileNotFoundError:
            meta_path.unlink(missing_ok=True)
            if make_parents:
                raise
            raise BlobNotFoundError(f"{slot.data.parent} vanished (upload aborted?)") from None
        except FileExistsError:
            meta_path.unlink(missing_ok=True)
            raise PreconditionFailedError(f"{slot.data.name!r} already exists") from None
        except (IsADirectoryError, NotADirectoryError):
            meta_path.unlink(missing_ok=True)
            raise _conflict(slot.data) from None
        except BaseException:
            meta_path.unlink(missing_ok=True)
            raise
        _fsync_dir(slot.data.parent)
        if replaced is not None and replaced.st_ino != st.st_ino:
            slot.meta_for(replaced.st_ino).unlink(missing_ok=True)
        return st

    def _open_sync(self, key: str, slot: _Slot) -> tuple[io.FileIO, os.stat_result, _Record]:
        """Open *slot*'s data file and read the record belonging to that very inode. (A file
        object, not a bare descriptor, so that a reader dropped unread closes it when
        collected.)"""
        for attempt in range(3):
            try:
                file = io.FileIO(slot.data, "r")
            except OSError as exc:
                if _is_missing(exc) or isinstance(exc, IsADirectoryError):
                    raise BlobNotFoundError(key) from None
                raise
            try:
                st = os.fstat(file.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise BlobNotFoundError(key)
                record = self._read_record_sync(slot, st)
                if record is None:
                    if attempt < 2 and not self._still_at(slot.data, st):
                        file.close()
                        continue  # replaced under us: read the new pair
                    record = self._rebuild_record_sync(key, file, st, slot)
            except BaseException:
                file.close()
                raise
            return file, st, record
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _still_at(path: Path, st: os.stat_result) -> bool:
        try:
            return path.stat().st_ino == st.st_ino
        except OSError:
            return False

    def _rebuild_record_sync(
        self, key: str, file: io.FileIO, st: os.stat_result, slot: _Slot
    ) -> _Record:
        """A data file without its record (copied in by hand, or a crashed write): hash it."""
        hasher = hashlib.md5(usedforsecurity=False)
        offset = 0
        while chunk := os.pread(file.fileno(), READ_CHUNK_BYTES, offset):
            hasher.update(chunk)
            offset += len(chunk)
        record = _Record(
            etag=hasher.hexdigest(),
            size_bytes=offset,
            content_type=mimetypes.guess_type(key)[0] or _DEFAULT_CONTENT_TYPE,
            metadata={},
        )
        if offset == st.st_size:
            meta_path = slot.meta_for(st.st_ino)
            _make_parent(meta_path)
            self._write_record_sync(meta_path, record)
        return record

    def _info_sync(self, key: str, slot: _Slot) -> BlobInfo:
        file, st, record = self._open_sync(key, slot)
        file.close()
        return self._info(key, st, record)

    def _prune_sync(self, directory: Path, stop: Path) -> None:
        """Remove empty directories from *directory* up to (not including) *stop*."""
        while directory != stop and stop in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def _delete_sync(self, slot: _Slot) -> None:
        try:
            st = slot.data.lstat()
        except OSError as exc:
            if _is_missing(exc):
                return
            raise
        if stat.S_ISDIR(st.st_mode):
            return  # a "folder" of other keys is not an object
        slot.data.unlink(missing_ok=True)
        slot.meta_for(st.st_ino).unlink(missing_ok=True)
        self._prune_sync(slot.data.parent, self._root)
        self._prune_sync(slot.meta_base.parent, self._meta)

    def _move_sync(
        self, src: str, src_slot: _Slot, dst_slot: _Slot
    ) -> tuple[os.stat_result, _Record]:
        file, st, record = self._open_sync(src, src_slot)
        file.close()
        meta_path = dst_slot.meta_for(st.st_ino)
        _make_parent(meta_path)
        self._write_record_sync(meta_path, record)
        replaced: os.stat_result | None = None
        try:
            with contextlib.suppress(FileNotFoundError):
                replaced = dst_slot.data.lstat()
            _make_parent(dst_slot.data)
            os.replace(src_slot.data, dst_slot.data)
        except BaseException as exc:
            meta_path.unlink(missing_ok=True)
            if isinstance(exc, FileNotFoundError):
                raise BlobNotFoundError(src) from None
            if isinstance(exc, IsADirectoryError | NotADirectoryError):
                raise _conflict(dst_slot.data) from None
            raise
        moved = dst_slot.data.stat()
        if moved.st_ino != st.st_ino:
            # src was overwritten between our read and the rename: carry that file's record.
            meta_path.unlink(missing_ok=True)
            file, moved, record = self._open_sync(src, _Slot(dst_slot.data, src_slot.meta_base))
            file.close()
            self._write_record_sync(dst_slot.meta_for(moved.st_ino), record)
        _fsync_dir(dst_slot.data.parent)
        src_slot.meta_for(moved.st_ino).unlink(missing_ok=True)
        if replaced is not None and replaced.st_ino != moved.st_ino:
            dst_slot.meta_for(replaced.st_ino).unlink(missing_ok=True)
        self._prune_sync(src_slot.data.parent, self._root)
        self._prune_sync(src_slot.meta_base.parent, self._meta)
        return moved, record

    def _scan_sync(self, rel_dir: str, name_prefix: str) -> list[tuple[str, bool]]:
        """One directory's entries, sorted so that a depth-first walk yields keys in order:
        a directory ``a`` sorts as ``a/``, since every key inside it starts with that."""
        try:
            with os.scandir(self._root / rel_dir) as it:
                entries = [
                    (entry.name, entry.is_dir())
                    for entry in it
                    if entry.name.startswith(name_prefix) and not entry.name.startswith(".")
                ]
        except OSError as exc:
            if _is_missing(exc):
                return []
            raise
        entries = [(name, is_dir) for name, is_dir in entries if _is_key(rel_dir + name)]
        return sorted(entries, key=lambda e: e[0] + "/" if e[1] else e[0])

    def _create_upload_sync(self, upload_id: str, doc: bytes) -> None:
        upload_dir = self._multipart / upload_id
        upload_dir.mkdir(parents=True)
        path, file = self._new_temp_sync()
        try:
            file.write(doc)
            _finish_file(file)
            os.replace(path, upload_dir / "upload.json")
        except BaseException:
            _discard(file, path)
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise

    def _load_upload_sync(self, key: str, upload_id: str) -> tuple[Path, str]:
        """The upload's directory and content type; :class:`BlobNotFoundError` if unknown."""
        if not _UPLOAD_ID_RE.match(upload_id):
            raise BlobNotFoundError(f"no multipart upload {upload_id!r}")
        upload_dir = self._multipart / upload_id
        try:
            doc = json.loads((upload_dir / "upload.json").read_bytes())
        except FileNotFoundError:
            raise BlobNotFoundError(f"no multipart upload {upload_id!r}") from None
        except ValueError as exc:
            raise StorageError(f"corrupt multipart upload {upload_id!r}: {exc}") from exc
        if doc.get("key") != key:
            raise BlobNotFoundError(f"no multipart upload {upload_id!r} for {key!r}")
        return upload_dir, str(doc.get("content_type", _DEFAULT_CONTENT_TYPE))

    def _open_parts_sync(self, upload_dir: Path) -> Iterator[tuple[int, io.FileIO, _Record]]:
        """(part number, open file, record) for each part, by part number. The caller closes
        the files."""
        names = sorted(p.name for p in upload_dir.iterdir() if _PART_NAME_RE.match(p.name))
        for name in names:
            try:
                file, _st, record = self._open_sync(
                    name, _Slot(upload_dir / name, upload_dir / name)
                )
            except BlobNotFoundError:
                continue
            yield int(name), file, record

    def _list_parts_sync(self, key: str, upload_id: str) -> list[PartInfo]:
        upload_dir, _ = self._load_upload_sync(key, upload_id)
        parts = []
        for number, file, record in self._open_parts_sync(upload_dir):
            file.close()
            parts.append(PartInfo(number, record.size_bytes, record.etag))
        return parts

    def _complete_sync(
        self, key: str, upload_id: str, parts: list[PartInfo], slot: _Slot
    ) -> tuple[os.stat_result, _Record]:
        upload_dir, content_type = self._load_upload_sync(key, upload_id)
        files: dict[int, io.FileIO] = {}
        records: dict[int, _Record] = {}
        try:
            for number, part_file, part_record in self._open_parts_sync(upload_dir):
                files[number], records[number] = part_file, part_record
            _check_parts(parts, records)
            path, file = self._new_temp_sync()
            try:
                hasher = hashlib.md5(usedforsecurity=False)
                for part in parts:
                    offset, fd = 0, files[part.part_number].fileno()
                    while offset < records[part.part_number].size_bytes:
                        chunk = os.pread(fd, WRITE_BATCH_BYTES, offset)
                        if not chunk:
                            raise StorageError(f"part file shrank in upload {upload_id!r}")
                        _write_hashed(file, hasher, chunk)
                        offset += len(chunk)
                size_bytes = _finish_file(file)
                record = _Record(
                    etag=hasher.hexdigest(),
                    size_bytes=size_bytes,
                    content_type=content_type,
                    metadata={},
                )
                st = self._commit_sync(path, slot, record, False, True)
            except BaseException:
                _discard(file, path)
                raise
        finally:
            for part_file in files.values():
                part_file.close()
        shutil.rmtree(upload_dir, ignore_errors=True)
        return st, record

    def _abort_sync(self, key: str, upload_id: str) -> None:
        try:
            upload_dir, _ = self._load_upload_sync(key, upload_id)
        except BlobNotFoundError:
            return
        shutil.rmtree(upload_dir, ignore_errors=True)

    # Defined last: inside the class body the name `list` means this method.
    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[BlobInfo]:
        if prefix:
            validate_key(prefix + "x")  # a prefix may end in "/" or mid-segment
        directory, _, name_prefix = prefix.rpartition("/")
        worker = _Worker(self._executor)
        top = f"{directory}/" if directory else ""
        async for key in self._walk(worker, top, name_prefix, start_after):
            try:
                yield await worker.run(self._info_sync, key, self._slot(key))
            except BlobNotFoundError:
                continue  # deleted while we walked


def _check_parts(parts: list[PartInfo], stored: dict[int, _Record]) -> None:
    """Raise :class:`PreconditionFailedError` unless *parts* can be joined: ascending, each
    received with that etag, and all but the last at least :data:`MIN_PART_BYTES`."""
    if not parts:
        raise PreconditionFailedError("a multipart upload needs at least one part")
    numbers = [p.part_number for p in parts]
    if numbers != sorted(set(numbers)):
        raise PreconditionFailedError(f"parts must be in ascending order: {numbers}")
    for i, part in enumerate(parts):
        record = stored.get(part.part_number)
        if record is None:
            raise PreconditionFailedError(f"part {part.part_number} was not uploaded")
        if record.etag != part.etag.strip('"'):
            raise PreconditionFailedError(
                f"part {part.part_number}: etag {part.etag!r} is not the uploaded part's"
            )
        if i < len(parts) - 1 and record.size_bytes < MIN_PART_BYTES:
            raise PreconditionFailedError(
                f"part {part.part_number} is {record.size_bytes} bytes; every part but the "
                f"last must be at least {MIN_PART_BYTES} bytes"
            )


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _conflict(path) from None


def _conflict(path: Path) -> StorageError:
    return StorageError(
        f"cannot store {path}: in a local directory store a key cannot be both an object "
        "and a prefix of other keys (a and a/b)"
    )


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def _write_hashed(file: IO[bytes], hasher: Any, chunk: bytes) -> None:
    file.write(chunk)
    hasher.update(chunk)


def _finish_file(file: IO[bytes]) -> int:
    """Flush, fsync and close *file*; return its size in bytes."""
    with file:
        file.flush()
        os.fsync(file.fileno())
        return os.fstat(file.fileno()).st_size


def _discard(file: IO[bytes], path: Path) -> None:
    with contextlib.suppress(OSError):
        file.close()
    path.unlink(missing_ok=True)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
