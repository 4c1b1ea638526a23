"""The disk tier: cached response bodies as files, shared by the edge's worker processes.

The tier stores bytes and never decides: its :class:`~edge.policy.EvictionPolicy` says what
to keep, and the tier drops exactly the keys the policy returns.

**Layout.** A key (any string: the edge's cache key, variant included) is named by the hex
SHA-256 of its UTF-8 bytes, ``h``. Entries fan out over at most 256 x 16 = 4096 leaf
directories named by the first three hex digits (nginx's ``levels=2:1``), each created by
the first store into it::

    <dir>/.tmp/<pid>-<random>/          one per live DiskTier, flock-ed while it lives
    <dir>/ab/c/<h>.meta                 JSON: format, key, body, size_bytes, checksum,
                                        checksum_algorithm, stored_at, meta (last)
    <dir>/ab/c/<h>.<generation>.body    the body bytes; immutable; generation = random hex

4096 leaves rather than 65 536 (``ab/cd/``): at 100 k entries two levels of 256 would leave
one or two entries per directory and cost some 50 k directory inodes and blocks (about
200 MiB) and a slow start-up walk; 4096 leaves hold ~25 entries each at 100 k and ~250 at
1 M, which ext4's and XFS's hashed directories handle without noticing.

**Writing.** :meth:`DiskTier.store` streams the chunks into a temp file in its own ``.tmp``
directory, computing the checksum as it writes (in a worker thread; chunks are batched up to
1 MiB per thread hop and never joined), then fsyncs. Once the size is known the policy
decides; a declined body is deleted without ever being visible. An admitted one is
published under the entry's *leaf lock* (``flock`` on the leaf directory): rename the body
into place, rename a fsynced temp meta over ``<h>.meta`` (the atomic publish), unlink the
body the old meta named. :meth:`DiskTier.update_meta` (a 304 refreshed the headers) and
removals take the same lock; they compare the generation the meta names with the one the
caller meant, so a removal or a header refresh meant for one body can never land on a
newer body another worker published meanwhile.

**Reading.** Readers take no lock: ``<h>.meta`` only ever changes by rename, so it is always
a whole document, and a body file never changes once it has a name. An open body stays
readable after another worker replaces or evicts it (POSIX unlink semantics); a body that
vanished before it was opened is reported as :class:`EntryGoneError` after the tier has
re-read the meta once and re-indexed whatever the directory now holds.

**The index.** Each process keeps one small :class:`DiskEntry` per entry in its view. The
caller's metadata stays the JSON bytes of its meta file and is decoded when asked for (a
lookup, a soft purge marking it); what purges match every entry on (``url_key``, ``tags``) is
kept decoded. So the index costs about a kilobyte and one object the garbage collector walks
per entry, not a tree of dicts and lists.

**Checksums.** CRC-32 (``zlib.crc32``) of the body. It is there to catch accidents — a torn
or truncated write after a crash, a bad sector, a file edited by hand — not adversaries
(whoever can write the cache directory can rewrite the meta too). On these machines it runs
at ~3 GiB/s against ~1.2 GiB/s for SHA-256 and ~0.6 GiB/s for BLAKE2b, and it releases the
GIL on buffers over 5 KiB, so worker threads checksum while the event loop serves. The size
is checked separately (``fstat`` on every open), so truncation never depends on the 2^-32
odds. A body is verified (one full read) the first time *this process* serves it; bodies
this process wrote were checksummed as they were written. Verification is remembered per
body generation, and concurrent first serves of one body share one read.

**Crash consistency.** With ``fsync=True`` (the default) the body and the meta reach the
disk before they are renamed, so a published meta never names unwritten data. Whatever a
crash leaves — temp files, a body without a meta, a meta without its body, an unparseable
meta — :meth:`DiskTier.open` removes; a body that still fails its checksum is dropped the
first time it is served and never returned.

**Several worker processes** (``SO_REUSEPORT``) each open their own :class:`DiskTier` over one
directory. Guarantees: no reader ever sees a torn body or a body paired with another body's
meta; an entry one worker stores, another finds on its next miss for that key (:meth:`lookup`
adopts it from disk) or at its next :meth:`DiskTier.sync`; removing or replacing an entry
never disturbs a worker that has its body open; start-up cleanup never touches the temp files
of a live worker (their directory is flock-ed) nor a body that is being published (it runs
under the leaf locks). Needs a local POSIX filesystem (``flock``, ``rename``, ``sendfile``).

**The byte budget is per process view.** Each worker's policy holds the entries that worker
stored, loaded at start-up, adopted or synced, and keeps them within ``capacity_bytes``;
whatever a policy evicts or declines, its worker deletes. A file stays in the view of the
worker that stored it until that worker evicts it (a crashed worker's files are taken over
by the next :meth:`DiskTier.open` or :meth:`DiskTier.sync`), so with N workers the directory
holds at most N x ``capacity_bytes`` (plus the bodies being streamed, each at most
``capacity_bytes``). :meth:`DiskTier.sync` makes the caller's view the whole directory and
evicts it down to ``capacity_bytes``, so when every worker calls it every T seconds the
excess is at most what the other workers stored in the last T seconds. Two workers evicting
at once may both evict, leaving the directory briefly *under* budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from io import FileIO
from pathlib import Path
from typing import Any, Final, TypeVar, TypeVarTuple, Unpack

from edge.policy import EvictionPolicy
from edge.tiers.base import BodySizeMismatch

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FORMAT_VERSION",
    "BodySizeMismatchError",
    "CorruptEntryError",
    "DiskEntry",
    "DiskTier",
    "DiskTierError",
    "EntryGoneError",
    "EntryUnavailableError",
]

FORMAT_VERSION: Final = 1
CHECKSUM_ALGORITHM: Final = "crc32"

_TMP_DIR: Final = ".tmp"
_META_SUFFIX: Final = ".meta"
_BODY_SUFFIX: Final = ".body"
_HASH_HEX_CHARS: Final = 64
_TOP_NAMES: Final = frozenset(f"{top:02x}" for top in range(256))
_LOW_NAMES: Final = frozenset(f"{low:x}" for low in range(16))
_WRITE_BATCH_BYTES: Final = 1 << 20
_READ_BLOCK_BYTES: Final = 1 << 20
_SEPARATORS: Final = (",", ":")
_META_MEMBER_TEXT: Final = ',"meta":'
_META_MEMBER: Final = _META_MEMBER_TEXT.encode()
_DECODER: Final = json.JSONDecoder()
_OBJECT_END: Final = re.compile(r"[ \t\n\r]*\}[ \t\n\r]*")
_RECENT_NS: Final = 2_000_000_000
"""A leaf modified this recently is rescanned by the next sync even if its mtime is
unchanged: two changes within one tick of the kernel's coarse clock share an mtime."""

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


# ---- errors ------------------------------------------------------------------------------------


class DiskTierError(Exception):
    """Root of the disk tier's errors."""


class EntryUnavailableError(DiskTierError):
    """The entry cannot be served: treat it as a miss."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"disk entry {key!r}: {reason}")
        self.key = key


class CorruptEntryError(EntryUnavailableError):
    """The body failed its checksum or size check; the entry has been dropped."""


class EntryGoneError(EntryUnavailableError, FileNotFoundError):
    """The body was removed or replaced (by another worker) before it could be opened.

    The tier has re-read the entry's meta and indexed what the directory holds now, so one
    more :meth:`DiskTier.lookup` finds the newer entry, if any, without touching the disk.
    Also a ``FileNotFoundError``, which is what it is."""


class BodySizeMismatchError(DiskTierError, BodySizeMismatch):
    """The streamed body's size differs from ``expected_size``; nothing was published."""

    def __init__(self, key: str, expected_size: int, actual_size: int) -> None:
        super().__init__(
            f"body of {key!r} is {actual_size} bytes, expected {expected_size}; not stored"
        )
        self.key = key
        self.expected_size = expected_size
        self.actual_size = actual_size


# ---- entries -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskEntry:
    """One stored response as the index knows it; the index holds one per entry in the
    directory, so it is kept small.

    The caller's metadata stays the compact JSON it is in the meta file (:attr:`meta_json`)
    and is decoded by :attr:`meta` when asked for; only what purges match every entry on,
    :attr:`url_key` and :attr:`tags`, is kept decoded. ``stored_at`` is when the body was
    written (Unix time); a meta update keeps it."""

    key: str
    leaf: str
    """Absolute path of the entry's leaf directory (one string per leaf, shared)."""
    body_name: str
    """The body's file name, ``<sha256 of key>.<generation>.body``."""
    size_bytes: int
    checksum: str
    """Hex CRC-32 of the body (:data:`CHECKSUM_ALGORITHM`)."""
    meta_json: bytes
    """The caller's metadata, as JSON."""
    stored_at: float
    url_key: str
    """The metadata's ``url_key`` if it is a string, else ``""`` (purges by URL and prefix
    match on it)."""
    tags: tuple[str, ...]
    """The strings of the metadata's ``tags`` list, if it has one (purges by tag match on
    them)."""

    @property
    def meta(self) -> dict[str, Any]:
        """The caller's metadata as it reads back from JSON (tuples become lists), decoded
        afresh on each access."""
        meta: dict[str, Any] = json.loads(self.meta_json)
        return meta

    @property
    def body_file(self) -> str:
        """Absolute path of the body file (also as :attr:`body_path`)."""
        return f"{self.leaf}/{self.body_name}"

    @property
    def body_path(self) -> Path:
        return Path(self.body_file)


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _leaf_id(hash_hex: str) -> str:
    return f"{hash_hex[:2]}/{hash_hex[2]}"


def _encode_meta(meta: Mapping[str, Any]) -> bytes:
    """The caller's metadata as the meta file holds it; raises ``TypeError``/``ValueError``
    early for what JSON cannot hold."""
    return json.dumps(dict(meta), separators=_SEPARATORS, allow_nan=False).encode()


def _purge_fields(key: str, meta: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """:attr:`DiskEntry.url_key` and :attr:`DiskEntry.tags` from the caller's metadata,
    sharing strings: the key itself when it is the URL key, one copy of each tag."""
    url_key = meta.get("url_key")
    if not isinstance(url_key, str):
        url_key = ""
    elif url_key == key:
        url_key = key
    elif url_key:
        url_key = sys.intern(url_key)
    tags = meta.get("tags")
    if not tags or not isinstance(tags, list | tuple):
        return url_key, ()
    return url_key, tuple(sys.intern(tag) for tag in tags if isinstance(tag, str))


def _meta_document(
    key: str, body_name: str, size_bytes: int, checksum: str, stored_at: float, meta_json: bytes
) -> bytes:
    """The meta file: one compact JSON object, the caller's metadata last."""
    record = {
        "format": FORMAT_VERSION,
        "key": key,
        "body": body_name,
        "size_bytes": size_bytes,
        "checksum": checksum,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "stored_at": stored_at,
    }
    head = json.dumps(record, separators=_SEPARATORS, allow_nan=False).encode()
    return b"".join((head[:-1], _META_MEMBER, meta_json, b"}"))


def _split_written(raw: bytes) -> tuple[dict[str, Any], Any, bytes] | None:
    """:func:`_split_document` for a document as :func:`_meta_document` writes it (the
    caller's metadata last, no space before it): the fields before the metadata are parsed on
    their own, the metadata once, and its JSON is a slice of ``raw``. ``None`` for any other
    document."""
    try:
        text = raw.decode()
        cut = text.find(_META_MEMBER_TEXT)
        if cut <= 0:
            return None
        # A JSON object only if the cut is at its top level, outside any string.
        fields = json.loads(text[:cut] + "}")
        if type(fields) is not dict or "meta" in fields:
            return None
        start = cut + len(_META_MEMBER_TEXT)
        meta, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        return None
    if _OBJECT_END.fullmatch(text, end) is None:
        return None
    meta_json = raw[start:end] if len(text) == len(raw) else text[start:end].encode()
    return fields, meta, meta_json


def _split_document(raw: bytes) -> tuple[dict[str, Any], Any, bytes] | None:
    """A meta file's ``(fields but the metadata, the caller's metadata, the metadata's
    JSON)``, or ``None`` if it is not a JSON object with a ``meta`` member."""
    written = _split_written(raw)
    if written is not None:
        return written
    try:  # not as this module writes it (edited by hand?): parse it whole, re-encode the meta
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or "meta" not in doc:
        return None
    meta = doc.pop("meta")
    try:
        meta_json = json.dumps(meta, separators=_SEPARATORS).encode()
    except (ValueError, RecursionError):
        return None
    return doc, meta, meta_json


def _parse_meta(raw: bytes, hash_hex: str, leaf: str) -> DiskEntry | None:
    """The entry a meta document describes, or ``None`` if it is not a valid one for
    ``hash_hex``."""
    split = _split_document(raw)
    if split is None:
        return None
    doc, meta, meta_json = split
    if doc.get("format") != FORMAT_VERSION:
        return None
    key, body, size, checksum, stored_at = (
        doc.get("key"),
        doc.get("body"),
        doc.get("size_bytes"),
        doc.get("checksum"),
        doc.get("stored_at"),
    )
    if (
        not isinstance(key, str)
        or not isinstance(body, str)
        or type(size) is not int
        or size < 0
        or not isinstance(checksum, str)
        or doc.get("checksum_algorithm") != CHECKSUM_ALGORITHM
        or not isinstance(stored_at, int | float)
        or isinstance(stored_at, bool)
        or not isinstance(meta, dict)
        or not body.startswith(hash_hex + ".")
        or not body.endswith(_BODY_SUFFIX)
        or "/" in body
        or _hash_key(key) != hash_hex
    ):
        return None
    url_key, tags = _purge_fields(key, meta)
    return DiskEntry(key, leaf, body, size, checksum, meta_json, float(stored_at), url_key, tags)


# ---- blocking helpers (run in worker threads) ---------------------------------------------------


def _lock_leaf(leaf: str) -> int | None:
    """Open a leaf directory and take its exclusive ``flock``: the fd (closing it releases
    the lock), or ``None`` if the leaf does not exist.

    The leaf lock serialises the publish, meta rewrite and removal of the entries in one
    leaf across threads and processes (``flock`` belongs to the open file description, so
    two opens conflict even in one process). Readers never take it."""
    try:
        fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_new_leaf(leaf: str) -> int:
    """:func:`_lock_leaf`, creating the leaf (and its parent) first if need be."""
    fd = _lock_leaf(leaf)
    if fd is None:
        os.makedirs(leaf, exist_ok=True)
        fd = _lock_leaf(leaf)
        if fd is None:
            raise FileNotFoundError(leaf)
    return fd


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb", buffering=0) as file:
            return file.readall()
    except FileNotFoundError:
        return None


def _body_named_by(meta_path: str) -> str | None:
    """The body file name the meta at ``meta_path`` names, if it is readable."""
    raw = _read_file(meta_path)
    if raw is None:
        return None
    try:
        body = json.loads(raw).get("body")
    except (ValueError, AttributeError, RecursionError):
        return None
    return body if isinstance(body, str) and "/" not in body else None


def _write_new_file(path: str, data: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _Doomed:
    """Files to delete: the entry at ``hash_hex`` in ``leaf`` if its meta still names
    ``body_name`` (any generation when ``None``), and the body ``body_name`` in any case."""

    leaf: str
    hash_hex: str
    body_name: str | None


def _delete_entries(doomed: Iterable[_Doomed]) -> None:
    for item in doomed:
        lock_fd = _lock_leaf(item.leaf)
        if lock_fd is None:
            continue
        try:
            meta_path = os.path.join(item.leaf, item.hash_hex + _META_SUFFIX)
            current = _body_named_by(meta_path)
            if item.body_name is None or current == item.body_name:
                _unlink_quietly(meta_path)
                if current is not None:
                    _unlink_quietly(os.path.join(item.leaf, current))
            if item.body_name is not None and item.body_name != current:
                _unlink_quietly(os.path.join(item.leaf, item.body_name))
        finally:
            os.close(lock_fd)


class _TempBody:
    """A body being written into the tier's temp directory by worker threads, one batch at a
    time. Thread-safe: :meth:`discard` waits for a write in progress, and no write recreates
    the file afterwards."""

    __slots__ = ("_discarded", "_file", "_lock", "crc", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.crc = 0
        self._file: FileIO | None = None
        self._discarded = False
        self._lock = threading.Lock()

    def _opened(self) -> FileIO:
        if self._discarded:
            raise DiskTierError(f"temp body {self.path} was discarded")
        if self._file is None:
            self._file = FileIO(self.path, "xb")
        return self._file

    def write(self, chunks: list[bytes]) -> None:
        with self._lock:
            file = self._opened()
            crc = self.crc
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)
                view = memoryview(chunk)
                while view:
                    view = view[file.write(view) or 0 :]
            self.crc = crc

    def finish(self, fsync: bool) -> None:
        with self._lock:
            file = self._opened()
            if fsync:
                os.fsync(file.fileno())
            file.close()
            self._discarded = True  # closed: nothing may write to it again

    def discard(self) -> None:
        with self._lock:
            self._discarded = True
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _commit(
    temp: _TempBody,
    last_batch: list[bytes],
    fsync: bool,
    tmp_dir: str,
    entry: DiskEntry,
    doomed: list[_Doomed],
) -> str:
    """Write the last batch, make the body durable and publish body + meta atomically under
    the leaf lock; then delete the policy's victims. Returns the body's checksum, which
    completes ``entry`` (its ``checksum`` is not known before)."""
    temp.write(last_batch)
    temp.finish(fsync)
    checksum = f"{temp.crc:08x}"
    leaf, body_name, hash_hex = entry.leaf, entry.body_name, _hash_key(entry.key)
    document = _meta_document(
        entry.key, body_name, entry.size_bytes, checksum, entry.stored_at, entry.meta_json
    )
    meta_tmp = os.path.join(tmp_dir, f"{hash_hex}.{os.urandom(4).hex()}{_META_SUFFIX}")
    _write_new_file(meta_tmp, document, fsync)
    meta_path = os.path.join(leaf, hash_hex + _META_SUFFIX)
    try:
        lock_fd = _lock_new_leaf(leaf)
        try:
            previous = _body_named_by(meta_path)
            os.rename(temp.path, os.path.join(leaf, body_name))
            os.rename(meta_tmp, meta_path)
            if previous is not None and previous != body_name:
                _unlink_quietly(os.path.join(leaf, previous))
        finally:
            os.close(lock_fd)
    except BaseException:
        _unlink_quietly(meta_tmp)
        raise
    _delete_entries(doomed)
    return checksum


def _discard(temp: _TempBody, doomed: list[_Doomed]) -> None:
    temp.discard()
    _delete_entries(doomed)


def _rewrite_meta(
    tmp_dir: str, leaf: str, hash_hex: str, body_name: str, meta_document: bytes, fsync: bool
) -> bool:
    """Replace the meta if it still names ``body_name``; whether it did."""
    meta_tmp = os.path.join(tmp_dir, f"{hash_hex}.{os.urandom(4).hex()}{_META_SUFFIX}")
    _write_new_file(meta_tmp, meta_document, fsync)
    meta_path = os.path.join(leaf, hash_hex + _META_SUFFIX)
    lock_fd = _lock_leaf(leaf)
    if lock_fd is not None:
        try:
            if _body_named_by(meta_path) == body_name:
                os.rename(meta_tmp, meta_path)
                return True
        finally:
            os.close(lock_fd)
    _unlink_quietly(meta_tmp)
    return False


def _open_body(path: str, size_bytes: int) -> FileIO | None:
    """The body, open at offset 0; ``None`` if its size is wrong. ``FileNotFoundError`` if
    it is gone."""
    file = FileIO(path, "rb")
    try:
        if os.fstat(file.fileno()).st_size == size_bytes:
            return file
    except BaseException:
        file.close()
        raise
    file.close()
    return None


def _verify_body(path: str, size_bytes: int, checksum: str) -> bool:
    with FileIO(path, "rb") as file:
        if os.fstat(file.fileno()).st_size != size_bytes:
            return False
        buffer = bytearray(max(1, min(size_bytes, _READ_BLOCK_BYTES)))
        view = memoryview(buffer)
        crc = total = 0
        while count := file.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
            total += count
    return total == size_bytes and f"{crc:08x}" == checksum


def _read_body(path: str, size_bytes: int, checksum: str | None) -> bytes | None:
    """The whole body, checked against ``checksum`` unless it is ``None``; ``None`` if it is
    corrupt."""
    with FileIO(path, "rb") as file:
        data = file.readall()
    if len(data) != size_bytes:
        return None
    if checksum is not None and f"{zlib.crc32(data):08x}" != checksum:
        return None
    return data


_ScannedLeaf = tuple[str, int | None, list[DiskEntry]]


def _scan_leaf(leaf_id: str, leaf: str, clean: bool, now_ns: int) -> _ScannedLeaf:
    """The valid entries in the leaf ``leaf_id`` at path ``leaf``, and its mtime (``None``
    when too recent to prove a later change). With ``clean`` (start-up), under the leaf lock,
    also delete invalid metas, metas whose body is missing and bodies no meta names."""
    try:
        fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return leaf_id, None, []
    try:
        if clean:
            fcntl.flock(fd, fcntl.LOCK_EX)
        mtime_ns = os.fstat(fd).st_mtime_ns  # before the listing: later changes show
        names = os.listdir(leaf)
        bodies = {name for name in names if name.endswith(_BODY_SUFFIX)}
        entries: list[DiskEntry] = []
        for name in names:
            if not name.endswith(_META_SUFFIX) or len(name) != _HASH_HEX_CHARS + 5:
                continue
            path = os.path.join(leaf, name)
            raw = _read_file(path)
            entry = None if raw is None else _parse_meta(raw, name[:_HASH_HEX_CHARS], leaf)
            if entry is not None and (not clean or entry.body_name in bodies):
                entries.append(entry)
                bodies.discard(entry.body_name)
            elif clean and raw is not None:
                _unlink_quietly(path)
        if clean:
            for name in bodies:
                _unlink_quietly(os.path.join(leaf, name))
    finally:
        os.close(fd)
    return leaf_id, (mtime_ns if mtime_ns < now_ns - _RECENT_NS else None), entries


def _existing_leaves(root: str) -> Iterator[os.DirEntry[str]]:
    """The leaf directories that exist (they are created by the first store into them)."""
    with os.scandir(root) as tops:
        for top in tops:
            if top.name in _TOP_NAMES and top.is_dir(follow_symlinks=False):
                with os.scandir(top.path) as lows:
                    for low in lows:
                        if low.name in _LOW_NAMES and low.is_dir(follow_symlinks=False):
                            yield low


def _leaf_id_of(leaf: os.DirEntry[str]) -> str:
    return leaf.path[-4:]  # "ab/c"


def _scan_leaves(
    root: str, leaf_ids: Iterable[str] | None, clean: bool, leaf_path: Callable[[str], str]
) -> list[_ScannedLeaf]:
    """:func:`_scan_leaf` over ``leaf_ids``, or over every existing leaf when ``None``;
    ``leaf_path`` names a leaf's directory (the tier's shared strings)."""
    now_ns = time.time_ns()
    if leaf_ids is None:
        leaf_ids = [_leaf_id_of(leaf) for leaf in _existing_leaves(root)]
    return [_scan_leaf(leaf_id, leaf_path(leaf_id), clean, now_ns) for leaf_id in leaf_ids]


def _changed_leaves(root: str, stamps: Mapping[str, int]) -> list[str]:
    """The existing leaves whose mtime differs from ``stamps`` (or that have none)."""
    changed = []
    for leaf in _existing_leaves(root):
        leaf_id = _leaf_id_of(leaf)
        stamp = stamps.get(leaf_id)
        if stamp is None or leaf.stat().st_mtime_ns != stamp:
            changed.append(leaf_id)
    return changed


def _prepare_directory(root: str) -> tuple[str, int]:
    """Create the layout, delete the temp files of dead tiers, and create and lock this
    tier's own temp directory: ``(its path, the fd holding its lock)``."""
    tmp_root = os.path.join(root, _TMP_DIR)
    os.makedirs(tmp_root, exist_ok=True)
    for entry in os.scandir(tmp_root):
        if not entry.is_dir(follow_symlinks=False):
            _unlink_quietly(entry.path)
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live tier's
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)
    own = os.path.join(tmp_root, f"{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(own)
    fd = os.open(own, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return own, fd


def _release_directory(own: str, fd: int) -> None:
    shutil.rmtree(own, ignore_errors=True)
    os.close(fd)


# ---- the tier -----------------------------------------------------------------------------------


class DiskTier:
    """The edge's disk cache tier over ``directory``; see the module docs for the format and
    the guarantees.

    One object per worker process; all methods are called from that process's event loop,
    and all blocking file IO runs in ``executor`` (the loop's default when ``None``). The
    caller serves a body with ``loop.sendfile`` from the file :meth:`open_body` returns.

    ``capacity_bytes`` must equal ``policy.capacity_bytes``: it is the budget of *this
    process's view*; with N workers on one directory the directory can exceed it (at most
    N x ``capacity_bytes``) until the workers :meth:`sync`. ``fsync=False`` skips the fsyncs
    (tests, benchmarks): after a power loss, bodies then fail their checksum and are
    dropped instead of being served.
    """

    def __init__(
        self,
        directory: Path,
        *,
        capacity_bytes: int,
        policy: EvictionPolicy,
        executor: Executor | None = None,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if policy.capacity_bytes != capacity_bytes:
            raise ValueError(
                f"capacity_bytes={capacity_bytes} but the policy's is {policy.capacity_bytes}"
            )
        if len(policy):
            raise ValueError("the policy must start empty: the tier fills it from the disk")
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self._root = os.fspath(self.directory.absolute())
        self._policy = policy
        self._executor = executor
        self._fsync = fsync
        self._clock = clock
        self._index: dict[str, DiskEntry] = {}
        self._leaf_keys: dict[str, list[str]] = {}  # leaf id -> indexed keys (a few each)
        self._leaf_paths: dict[str, str] = {}
        self._verified: set[str] = set()  # body file names checked (or written) here
        self._verifying: dict[str, asyncio.Future[bool]] = {}
        self._stamps: dict[str, int] = {}  # leaf id -> mtime when last scanned
        self._tmp_dir: str | None = None
        self._tmp_lock_fd = -1

    def _run(self, function: Callable[[Unpack[_Ts]], _T], *args: *_Ts) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _leaf(self, hash_hex: str) -> str:
        return self._leaf_path(_leaf_id(hash_hex))

    def _leaf_path(self, leaf_id: str) -> str:
        """The path of a leaf directory: one string per leaf, which the entries in it share.
        Also called from worker threads (at worst two threads make two equal strings)."""
        path = self._leaf_paths.get(leaf_id)
        if path is None:
            path = self._leaf_paths[leaf_id] = f"{self._root}/{leaf_id}"
        return path

    def _tmp(self) -> str:
        if self._tmp_dir is None:
            raise RuntimeError("DiskTier used before open() or after close()")
        return self._tmp_dir

    # ---- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> int:
        """Create the directory layout, remove what crashed or dead workers left behind, and
        load every valid entry into the index and the policy (oldest first, evicting if over
        budget). Returns the number of entries indexed."""
        if self._tmp_dir is not None:
            raise RuntimeError("DiskTier.open() called twice")
        self._tmp_dir, self._tmp_lock_fd = await self._run(_prepare_directory, self._root)
        scanned = await self._run(self._scan_all)
        loaded: list[DiskEntry] = []
        for leaf_id, stamp, entries in scanned:
            self._set_stamp(leaf_id, stamp)
            loaded.extend(entries)
        loaded.sort(key=lambda entry: entry.stored_at)
        doomed: list[_Doomed] = []
        for entry in loaded:
            doomed.extend(self._adopt(entry))
        if doomed:
            await self._run(_delete_entries, doomed)
        return len(self._index)

    def _scan_all(self) -> list[_ScannedLeaf]:
        return _scan_leaves(self._root, None, True, self._leaf_path)

    async def close(self) -> None:
        """Remove this tier's temp directory. In-flight stores fail; call it after the
        server has stopped."""
        if self._tmp_dir is not None:
            tmp_dir, fd = self._tmp_dir, self._tmp_lock_fd
            self._tmp_dir, self._tmp_lock_fd = None, -1
            await self._run(_release_directory, tmp_dir, fd)

    # ---- reading -------------------------------------------------------------------------------

    async def lookup(self, key: str) -> DiskEntry | None:
        """The entry for ``key``: from the index (no IO), else from the disk if another worker
        stored it (adopted into this process's index and policy), else ``None``."""
        entry = self._index.get(key)
        if entry is not None:
            self._policy.hit(key)
            return entry
        hash_hex = _hash_key(key)
        leaf = self._leaf(hash_hex)
        raw = await self._run(_read_file, f"{leaf}/{hash_hex}{_META_SUFFIX}")
        found = None if raw is None else _parse_meta(raw, hash_hex, leaf)
        if found is None:
            return None
        entry = self._index.get(key)
        if entry is not None:  # indexed while we read
            self._policy.hit(key)
            return entry
        if key in self._policy:  # a store of this key is being published here
            return None
        doomed = self._adopt(found)
        if doomed:
            await self._run(_delete_entries, doomed)
        return self._index.get(key)

    async def open_body(self, entry: DiskEntry) -> FileIO:
        """The body of exactly this entry, open for reading at offset 0; the caller closes it
        (``loop.sendfile(transport, file, 0, entry.size_bytes)``).

        Raises :class:`CorruptEntryError` (the entry has been dropped) or
        :class:`EntryGoneError`; both are misses."""
        name = entry.body_name
        if name not in self._verified:
            await self._verify(entry)
        try:
            file = await self._run(_open_body, entry.body_file, entry.size_bytes)
        except FileNotFoundError:
            raise await self._gone(entry) from None
        if file is None:
            raise await self._corrupt(entry, "body size differs from its meta")
        return file

    async def read_body(self, entry: DiskEntry) -> bytes:
        """The whole body of this entry as bytes (for small bodies); errors as
        :meth:`open_body`."""
        name = entry.body_name
        checksum = None if name in self._verified else entry.checksum
        try:
            data = await self._run(_read_body, entry.body_file, entry.size_bytes, checksum)
        except FileNotFoundError:
            raise await self._gone(entry) from None
        if data is None:
            raise await self._corrupt(entry, "body failed its checksum or size check")
        self._verified.add(name)
        return data

    async def _verify(self, entry: DiskEntry) -> None:
        name = entry.body_name
        pending = self._verifying.get(name)
        if pending is None:
            pending = self._run(_verify_body, entry.body_file, entry.size_bytes, entry.checksum)
            self._verifying[name] = pending
            pending.add_done_callback(self._verified_callback(name))
        try:
            intact = await asyncio.shield(pending)
        except FileNotFoundError:
            raise await self._gone(entry) from None
        if not intact:
            raise await self._corrupt(entry, "body failed its checksum")
        self._verified.add(name)

    def _verified_callback(self, name: str) -> Callable[[asyncio.Future[bool]], None]:
        def done(future: asyncio.Future[bool]) -> None:
            self._verifying.pop(name, None)
            if not future.cancelled():
                future.exception()  # retrieved, even if every waiter was cancelled

        return done

    async def _corrupt(self, entry: DiskEntry, reason: str) -> CorruptEntryError:
        """Drop a corrupt entry (index, policy, files of that generation)."""
        hash_hex = _hash_key(entry.key)
        if self._holds(entry):
            self._forget(entry.key)
        self._verified.discard(entry.body_name)
        await self._run(_delete_entries, [_Doomed(self._leaf(hash_hex), hash_hex, entry.body_name)])
        return CorruptEntryError(entry.key, reason)

    async def _gone(self, entry: DiskEntry) -> EntryGoneError:
        """Re-read the meta of an entry whose body vanished and index what is there now."""
        hash_hex = _hash_key(entry.key)
        leaf = self._leaf(hash_hex)
        raw = await self._run(_read_file, f"{leaf}/{hash_hex}{_META_SUFFIX}")
        found = None if raw is None else _parse_meta(raw, hash_hex, leaf)
        if self._holds(entry):
            if found is None or found.body_name == entry.body_name:
                self._forget(entry.key)
            else:
                doomed = self._adopt(found)
                if doomed:
                    await self._run(_delete_entries, doomed)
        if found is not None and found.body_name == entry.body_name:
            # The meta names a body that is not there: broken (edited by hand?); drop it.
            await self._run(_delete_entries, [_Doomed(leaf, hash_hex, entry.body_name)])
        return EntryGoneError(entry.key, "body removed or replaced")

    # ---- writing -------------------------------------------------------------------------------

    async def store(
        self,
        key: str,
        meta: Mapping[str, Any],
        chunks: AsyncIterator[bytes],
        *,
        expected_size: int | None = None,
        meta_for_size: Callable[[int], Mapping[str, Any]] | None = None,
    ) -> DiskEntry | None:
        """Stream a body to disk, let the policy decide, publish atomically; ``None`` when the
        policy declined it (nothing was published, and any older entry for ``key`` is gone
        if the policy dropped it).

        A body of unknown length (chunked or close-delimited upstream) passes
        ``meta_for_size``: the metadata published with it is ``meta_for_size(size)``, made once
        the whole body is on disk, so its declared length is the written one from the first
        moment anyone can read it.

        Chunks are written in batches by worker threads and must not be mutated after they
        are yielded. A body larger than ``capacity_bytes`` is not written (no policy can
        keep it) but the iterator is still drained, so a caller teeing it to a client is not
        stalled. If the iterator raises or the task is cancelled, nothing is published, the
        temp file is removed and the exception propagates. If ``expected_size`` is given and
        the body's size differs, nothing is published and :class:`BodySizeMismatchError`
        (a ``ValueError``) is raised.
        """
        tmp_dir = self._tmp()
        meta_json = _encode_meta(meta)
        url_key, tags = _purge_fields(key, meta)
        hash_hex = _hash_key(key)
        body_name = f"{hash_hex}.{os.urandom(8).hex()}{_BODY_SUFFIX}"
        temp = _TempBody(os.path.join(tmp_dir, body_name))
        limit_bytes = self.capacity_bytes if expected_size is None else expected_size
        decided = False
        try:
            size_bytes, batch = await self._write_chunks(temp, chunks, limit_bytes)
            if expected_size is not None and size_bytes != expected_size:
                raise BodySizeMismatchError(key, expected_size, size_bytes)
            if meta_for_size is not None:
                meta_json = _encode_meta(meta_for_size(size_bytes))

            decided = True
            doomed = self._drop_victims(self._policy.insert(key, size_bytes), keep=key)
            if key not in self._policy:  # declined: nothing was ever visible
                doomed.extend(self._forget_files(key, hash_hex))
                await self._run(_discard, temp, doomed)
                return None
            leaf = self._leaf(hash_hex)
            entry = DiskEntry(
                key, leaf, body_name, size_bytes, "", meta_json, self._clock(), url_key, tags
            )
            checksum = await self._run(_commit, temp, batch, self._fsync, tmp_dir, entry, doomed)
        except BaseException:
            if decided:
                self._forget(key)  # whatever is on disk now, a later lookup adopts
            await asyncio.shield(self._run(temp.discard))
            raise
        if key not in self._policy:  # evicted by a concurrent store while we published
            await self._run(_delete_entries, [_Doomed(leaf, hash_hex, body_name)])
            return None
        entry = replace(entry, checksum=checksum)
        self._index_put(entry, hash_hex)
        self._verified.add(body_name)  # checksummed as it was written
        return entry

    async def _write_chunks(
        self, temp: _TempBody, chunks: AsyncIterator[bytes], limit_bytes: int
    ) -> tuple[int, list[bytes]]:
        """Write the chunks into ``temp`` in batches, one batch on the disk while the next
        arrives: ``(body size, the last batch, not yet written)``. Past ``limit_bytes`` the
        temp file is discarded and the rest is only counted."""
        writing = limit_bytes <= self.capacity_bytes
        size_bytes = batch_bytes = 0
        batch: list[bytes] = []
        in_flight: asyncio.Future[None] | None = None
        try:
            async for chunk in chunks:
                size_bytes += len(chunk)
                if not writing:
                    continue
                if size_bytes > limit_bytes:
                    writing, batch = False, []
                    if in_flight is not None:
                        await in_flight
                        in_flight = None
                    await self._run(temp.discard)
                    continue
                batch.append(chunk)
                batch_bytes += len(chunk)
                if batch_bytes >= _WRITE_BATCH_BYTES:
                    if in_flight is not None:
                        await in_flight
                    in_flight = self._run(temp.write, batch)
                    batch, batch_bytes = [], 0
            if in_flight is not None:
                await in_flight
        except BaseException:
            if in_flight is not None:
                in_flight.cancel()  # the caller's discard waits for a write in progress
            raise
        return size_bytes, batch

    async def update_meta(
        self, entry: DiskEntry | str, meta: Mapping[str, Any]
    ) -> DiskEntry | None:
        """Replace the caller's metadata of an entry (a 304 refreshed its headers), keeping
        its body; only while the directory still holds that entry's body generation.

        Pass the :class:`DiskEntry` the 304 revalidated: with a key, the update applies to
        the generation this process's index holds (``None`` if it holds none), which may be
        newer than the one revalidated if another worker replaced it meanwhile. Returns the
        updated entry, or ``None`` when that body is no longer the one on disk (removed, or
        replaced by a newer body whose headers these are not)."""
        if isinstance(entry, str):
            indexed = self._index.get(entry)
            if indexed is None:
                return None
            entry = indexed
        meta_json = _encode_meta(meta)
        url_key, tags = _purge_fields(entry.key, meta)
        hash_hex = _hash_key(entry.key)
        body_name = entry.body_name
        updated = replace(entry, meta_json=meta_json, url_key=url_key, tags=tags)
        document = _meta_document(
            entry.key, body_name, entry.size_bytes, entry.checksum, entry.stored_at, meta_json
        )
        rewritten = await self._run(
            _rewrite_meta,
            self._tmp(),
            self._leaf(hash_hex),
            hash_hex,
            body_name,
            document,
            self._fsync,
        )
        current = self._index.get(entry.key)
        if not rewritten:
            if current is not None and current.body_name == body_name:
                self._forget(entry.key)  # the next lookup re-reads the disk
            return None
        if current is not None and current.body_name == body_name:
            self._index[entry.key] = updated
            return updated
        if current is None and entry.key not in self._policy:
            doomed = self._adopt(updated)
            if doomed:
                await self._run(_delete_entries, doomed)
        return updated

    async def remove(self, key: str) -> None:
        """Delete ``key`` whatever generation is on disk (a hard purge): files, index and
        policy. A worker that has the body open keeps reading it."""
        hash_hex = _hash_key(key)
        entry = self._forget(key)
        doomed = [_Doomed(self._leaf(hash_hex), hash_hex, None)]
        if entry is not None:
            doomed.append(_Doomed(self._leaf(hash_hex), hash_hex, entry.body_name))
        await self._run(_delete_entries, doomed)

    # ---- other workers' changes ----------------------------------------------------------------

    async def sync(self) -> int:
        """Catch up with what other workers did to the directory: adopt entries they stored
        (evicting down to the budget), pick up their meta updates, forget entries they
        removed. Reads only the leaf directories whose mtime changed since the last scan
        (one ``stat`` per leaf otherwise). Returns the number of index changes."""
        changed = await self._run(_changed_leaves, self._root, dict(self._stamps))
        if not changed:
            return 0
        before = {
            leaf_id: {key: self._index[key] for key in self._leaf_keys.get(leaf_id, ())}
            for leaf_id in changed
        }
        scanned = await self._run(_scan_leaves, self._root, changed, False, self._leaf_path)
        changes = 0
        doomed: list[_Doomed] = []
        for leaf_id, stamp, entries in scanned:
            self._set_stamp(leaf_id, stamp)
            known = before[leaf_id]
            for found in entries:
                previous = known.pop(found.key, None)
                current = self._index.get(found.key)
                if current is not previous or current == found:
                    continue  # unchanged, or changed here while we were reading
                if current is None and found.key in self._policy:
                    continue  # being stored here
                doomed.extend(self._adopt(found))
                changes += 1
            for key, previous in known.items():
                if self._index.get(key) is previous:
                    self._forget(key)
                    changes += 1
        if doomed:
            await self._run(_delete_entries, doomed)
        return changes

    def _set_stamp(self, leaf_id: str, stamp: int | None) -> None:
        if stamp is None:
            self._stamps.pop(leaf_id, None)
        else:
            self._stamps[leaf_id] = stamp

    # ---- the books -----------------------------------------------------------------------------

    def _adopt(self, entry: DiskEntry) -> list[_Doomed]:
        """Index an entry found on disk (new to this view, or a newer version of an indexed
        one); returns the files to delete: the policy's victims, and the entry itself if the
        policy declined it (this view is full, whoever stored it)."""
        key = entry.key
        hash_hex = _hash_key(key)
        current = self._index.get(key)
        if current is not None and current.size_bytes == entry.size_bytes:
            victims: list[str] = []
        else:
            victims = self._policy.insert(key, entry.size_bytes)
        doomed = self._drop_victims(victims, keep=key)
        if key in self._policy:
            self._index_put(entry, hash_hex)
        else:
            self._forget(key)
            doomed.append(_Doomed(self._leaf(hash_hex), hash_hex, entry.body_name))
        return doomed

    def _drop_victims(self, victims: list[str], *, keep: str) -> list[_Doomed]:
        """Unindex the policy's victims other than ``keep``; their files to delete."""
        doomed = []
        for victim in victims:
            if victim != keep:
                entry = self._index_pop(victim)
                if entry is not None:
                    hash_hex = _hash_key(victim)
                    doomed.append(_Doomed(self._leaf(hash_hex), hash_hex, entry.body_name))
        return doomed

    def _forget_files(self, key: str, hash_hex: str) -> list[_Doomed]:
        """Unindex ``key`` (the policy no longer has it); its files to delete."""
        entry = self._forget(key)
        if entry is None:
            return []
        return [_Doomed(self._leaf(hash_hex), hash_hex, entry.body_name)]

    def _forget(self, key: str) -> DiskEntry | None:
        self._policy.remove(key)
        return self._index_pop(key)

    def _holds(self, entry: DiskEntry) -> bool:
        """Whether the index holds this entry's body generation."""
        current = self._index.get(entry.key)
        return current is not None and current.body_name == entry.body_name

    def _index_put(self, entry: DiskEntry, hash_hex: str) -> None:
        current = self._index.get(entry.key)
        if current is None:
            self._leaf_keys.setdefault(_leaf_id(hash_hex), []).append(entry.key)
        elif current.body_name != entry.body_name:
            self._verified.discard(current.body_name)
        self._index[entry.key] = entry

    def _index_pop(self, key: str) -> DiskEntry | None:
        entry = self._index.pop(key, None)
        if entry is not None:
            self._verified.discard(entry.body_name)
            keys = self._leaf_keys.get(_leaf_id(_hash_key(key)))
            if keys is not None and key in keys:  # a short list: a leaf holds a few entries
                keys.remove(key)
        return entry

    # ---- views ---------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of the bodies in this process's view (its policy's books)."""
        return self._policy.used_bytes

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is in this process's index (no IO, no policy event)."""
        return key in self._index

    def keys(self) -> Iterator[str]:
        """The indexed keys (a snapshot)."""
        return iter(list(self._index))

    def entries(self) -> Iterator[DiskEntry]:
        """The indexed entries (a snapshot), e.g. for purge-by-tag scans."""
        return iter(list(self._index.values()))
