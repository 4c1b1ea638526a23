"""The asset catalogue: one small JSON manifest per asset, kept in the blob store.

``assets/{id}/manifest.json`` holds the asset's kind, tags, status and its versions; each version
names its source (by content hash) and its renditions (the files served under
``/content/{kind}s/{id}/v{n}/{name}``). Writing the manifest is what publishes a version.

:class:`AssetLayout` (pure) maps ids and versions to keys and URLs; :class:`Catalogue` does the
storage IO.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from assets.blobstore import BlobNotFoundError, BlobStore
from assets.sniff import Kind
from common.errors import BadRequest

ASSET_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,127}$")
MANIFEST_NAME = "manifest.json"
Status = Literal["processing", "published", "failed"]


def validate_asset_id(asset_id: str) -> str:
    """Asset ids are lowercase slugs: letters, digits, ``.``, ``_``, ``-``; never a path."""
    if not ASSET_ID_RE.match(asset_id) or ".." in asset_id:
        raise BadRequest(
            "invalid_asset_id",
            f"asset id {asset_id!r} must be 1-100 characters of a-z, 0-9, '.', '_', '-', "
            "start with a letter or digit, and contain no '..' or '/'",
        )
    return asset_id


def validate_tag(tag: str) -> str:
    if not TAG_RE.match(tag):
        raise BadRequest(
            "invalid_tag",
            f"tag {tag!r} must be 1-128 characters of A-Z, a-z, 0-9, ':', '.', '_', '-'",
        )
    return tag


def asset_id_from_filename(filename: str) -> str:
    """A slug from a file name: ``Mole Concept (Part 1).mp4`` → ``mole-concept-part-1``."""
    stem = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem.lstrip(".") else stem
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:100]
    return slug or "asset"


class Rendition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    size_bytes: int
    content_type: str
    etag: str
    """Strong entity tag with quotes, derived from the content hash."""
    content_encoding: str | None = None
    """``br``, ``gzip`` or ``dcz`` for pre-compressed files."""


class SourceRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content_hash: str
    size_bytes: int
    content_type: str
    format: str
    filename: str | None = None
    key: str


class Version(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    created_at: datetime
    source: SourceRecord
    renditions: dict[str, Rendition]
    primary: str
    """The rendition a ``latest`` URL serves."""
    state: Status = "published"
    """``processing`` until the worker's outputs are in; only published versions are
    served."""
    state_reason: str | None = None
    published_at: datetime | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    """What the pipeline reported (ladder rungs, image sizes, bundle facts)."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    kind: Kind
    status: Status
    status_reason: str | None = None
    tags: list[str] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    current_version: int | None
    """The newest *published* version: what ``latest`` serves. ``None`` until the first
    version is processed."""
    versions: list[Version]

    def version(self, number: int) -> Version | None:
        for version in self.versions:
            if version.version == number:
                return version
        return None

    @property
    def current(self) -> Version | None:
        return None if self.current_version is None else self.version(self.current_version)

    @property
    def newest(self) -> Version:
        """The most recently uploaded version, whatever its state."""
        return max(self.versions, key=lambda v: v.version)

    @property
    def cache_tag(self) -> str:
        return f"{self.kind}:{self.id}"


class AssetLayout:
    """Where things live. Keys in the blob store, paths under the content URL space."""

    @staticmethod
    def manifest_key(asset_id: str) -> str:
        return f"assets/{asset_id}/{MANIFEST_NAME}"

    @staticmethod
    def source_key(content_hash: str) -> str:
        return f"sources/{content_hash[:2]}/{content_hash}"

    @staticmethod
    def staging_key(upload_id: str) -> str:
        return f"staging/{upload_id}"

    @staticmethod
    def content_path(kind: Kind, asset_id: str, version: int, name: str) -> str:
        return f"/content/{kind}s/{asset_id}/v{version}/{name}"

    @staticmethod
    def latest_path(kind: Kind, asset_id: str, primary: str) -> str:
        extension = primary.rsplit(".", 1)[-1]
        return f"/content/{kind}s/{asset_id}/latest.{extension}"

    @staticmethod
    def source_rendition_name(kind: Kind, extension: str) -> str:
        """The uploaded file as it came, kept beside the processed outputs."""
        return f"source.{extension}"


_UNLISTED_SUFFIXES = (".m4s", ".ts")


def asset_urls(manifest: Manifest, base_url: str) -> dict[str, str]:
    """The URLs worth showing for an asset's current version: ``latest``, ``versioned`` (the
    main output), ``source``, and every output except media segments."""
    current = manifest.current
    if current is None:
        return {}
    main = str(current.details.get("primary", current.primary))

    def url(name: str) -> str:
        return base_url + AssetLayout.content_path(
            manifest.kind, manifest.id, current.version, name
        )

    urls = {
        "latest": base_url + AssetLayout.latest_path(manifest.kind, manifest.id, current.primary),
        "versioned": url(main),
    }
    for name in sorted(current.renditions):
        if name == current.primary and name != main:
            continue
        if name.endswith(_UNLISTED_SUFFIXES) or "-init." in name:
            continue
        label = "source" if name.startswith("source.") else f"rendition:{name}"
        urls[label] = url(name)
    return urls


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Catalogue:
    """Manifests in the blob store, with a short-lived in-process cache for the read path."""

    def __init__(self, store: BlobStore, *, cache_ttl_s: float = 1.0) -> None:
        self._store = store
        self._cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Manifest | None]] = {}
        self._generation = 0
        """Bumped by :meth:`invalidate`: a read that began before is not remembered."""

    def invalidate(self, asset_id: str | None = None) -> None:
        """Forget the cached manifest of *asset_id* (every manifest when ``None``); a read in
        flight is answered but not cached (see :mod:`origin.invalidation`)."""
        self._generation += 1
        if asset_id is None:
            self._cache.clear()
        else:
            self._cache.pop(asset_id, None)

    async def get(self, asset_id: str, *, fresh: bool = False) -> Manifest | None:
        """The manifest, or ``None`` if the asset does not exist. ``fresh`` bypasses the cache
        (writers read fresh)."""
        now = time.monotonic()
        generation = self._generation
        cached = self._cache.get(asset_id)
        if not fresh and cached is not None and now - cached[0] < self._cache_ttl_s:
            return cached[1]
        try:
            reader = await self._store.get(AssetLayout.manifest_key(asset_id))
        except BlobNotFoundError:
            manifest = None
        else:
            raw = await reader.read_all()
            try:
                manifest = Manifest.model_validate_json(raw)
            except ValidationError as exc:
                raise RuntimeError(f"manifest of {asset_id!r} is corrupt: {exc}") from exc
        if generation != self._generation:
            return manifest
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[asset_id] = (now, manifest)
        return manifest

    async def put(self, manifest: Manifest) -> None:
        body = manifest.model_dump_json(indent=2).encode()
        await self._store.put(
            AssetLayout.manifest_key(manifest.id), body, content_type="application/json"
        )
        self._cache[manifest.id] = (time.monotonic(), manifest)

    async def ids(self, *, after: str | None = None) -> AsyncIterator[str]:
        """Asset ids in the store's key order, from the one after *after* (a page cursor:
        the listing starts there rather than walking from the beginning)."""
        start_after = None if after is None else AssetLayout.manifest_key(after)
        async for info in self._store.list("assets/", start_after=start_after):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == MANIFEST_NAME:
                yield parts[1]
