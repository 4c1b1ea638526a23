"""The configuration's shape: typed, validated models with units in their names.

Everything here is pure data and validation; :mod:`cdn_config.load` reads TOML files and the
environment and turns validation failures into :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}


def parse_byte_size(value: object) -> int:
    """Accept an integer number of bytes or a string such as ``"64MiB"``, ``"2 GB"``."""
    if isinstance(value, bool):
        raise ValueError("a byte size must be a number or a string like '64MiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"not a byte size: {value!r} (use e.g. 1048576, '512KiB', '64MiB')")
        number, unit = match.groups()
        return int(float(number) * _UNITS[(unit or "").upper()])
    raise ValueError("a byte size must be a number or a string like '64MiB'")


ByteSize = Annotated[int, BeforeValidator(parse_byte_size), Field(ge=0)]
PositiveByteSize = Annotated[int, BeforeValidator(parse_byte_size), Field(gt=0)]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port). IPv6 hosts in brackets: ``[::1]:8080``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0-65535, got {port_text!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.-]+$", host):
                raise ValueError(f"not a host name or address: {host!r}") from None
    return host, int(port_text)


def _check_listen(value: str) -> str:
    parse_listen(value)
    return value


Listen = Annotated[str, BeforeValidator(str), Field(min_length=3)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UploadLimits(_Section):
    """Largest accepted source per kind."""

    lecture_bytes: PositiveByteSize = 8 * 1024**3
    image_bytes: PositiveByteSize = 64 * 1024**2
    bundle_bytes: PositiveByteSize = 32 * 1024**2

    def for_kind(self, kind: str) -> int:
        limits = {
            "lecture": self.lecture_bytes,
            "image": self.image_bytes,
            "bundle": self.bundle_bytes,
        }
        return limits[kind]


class OriginConfig(_Section):
    listen: Listen = "127.0.0.1:8080"
    storage: str = Field(default="./data", min_length=1)
    """A local directory, or ``s3://BUCKET`` for S3 and S3-compatible stores."""
    s3_endpoint: str | None = None
    """Endpoint URL for MinIO, Ceph RGW or a test server; unset means AWS."""
    s3_region: str | None = None
    public_url: str | None = None
    """Base URL clients use to reach the origin; defaults to ``http://{listen}``."""
    upload_limits: UploadLimits = UploadLimits()
    upload_session_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    """How long an unfinished resumable upload can wait for its remaining parts."""
    notifications_queue_url: str | None = None
    """SQS queue URL receiving the S3 bucket's event notifications; the origin turns changes
    made behind its back (``aws s3 cp``) into purges. Unset: no notifications."""

    _listen_ok = field_validator("listen")(_check_listen)

    @field_validator("storage")
    @classmethod
    def _storage_ok(cls, value: str) -> str:
        if value.startswith("s3://"):
            bucket = value.removeprefix("s3://").split("/", 1)[0]
            if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
                raise ValueError(f"not a valid S3 bucket name: {bucket!r}")
        elif "://" in value:
            raise ValueError("storage is a directory path or s3://BUCKET")
        return value

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = parse_listen(self.listen)
        return f"http://{host}:{port}"


class RedisConfig(_Section):
    url: str = "embedded"
    """``redis://…``, ``rediss://…``, ``unix://…`` or ``embedded`` (a child Valkey server)."""

    @field_validator("url")
    @classmethod
    def _url_ok(cls, value: str) -> str:
        if value != "embedded" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://HOST:PORT[/DB], rediss://…, unix://PATH or embedded")
        return value


class MediaConfig(_Section):
    ffmpeg_binary: str | None = None
    """Path to ffmpeg; unset means the binary shipped in the imageio-ffmpeg wheel."""


class JobConcurrency(_Section):
    """Jobs of each kind one worker runs at once; ``0``: this worker takes none of that kind
    (a fleet can keep lecture workers apart from the quick ones). Each kind has its own
    queue, so a question bank never waits behind a lecture."""

    lecture: int = Field(default=1, ge=0, le=64)
    image: int = Field(default=2, ge=0, le=64)
    bundle: int = Field(default=2, ge=0, le=64)

    @model_validator(mode="after")
    def _some_work(self) -> JobConcurrency:
        if self.lecture + self.image + self.bundle == 0:
            raise ValueError("a worker must take at least one kind of job")
        return self


def _concurrency_form(value: object) -> object:
    """``concurrency = 2`` (the older form) means two lectures at once."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"lecture": value}
    return value


class TranscodeConfig(_Section):
    """What workers make of uploads, and how their jobs run."""

    image_widths: tuple[int, ...] = (320, 640, 1280)
    bundle_previous_versions: int = Field(default=3, ge=0, le=16)
    """Deltas (RFC 9842 ``dcz``) against this many earlier versions of a bundle."""
    ladder_name: Literal["lecture"] = "lecture"
    job_timeout_s: int = Field(default=3 * 3600, gt=0)
    heartbeat_s: int = Field(default=30, ge=2)
    """A job whose worker is silent this long is taken over by another worker."""
    retries: int = Field(default=4, ge=1, le=20)
    concurrency: Annotated[JobConcurrency, BeforeValidator(_concurrency_form)] = Field(
        default_factory=JobConcurrency
    )

    @field_validator("image_widths")
    @classmethod
    def _widths_ok(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(width < 16 or width > 8192 for width in value):
            raise ValueError("image widths are 16-8192 pixels, at least one")
        return tuple(sorted(set(value)))


EvictionPolicyName = Literal["lru", "s3fifo", "sieve", "tinylfu", "tinylfu-sa"]
"""The tiers' eviction policies (``edge.policy``)."""


class EdgeConfig(_Section):
    """One edge: the only configuration type of ``edge/`` (a standalone ``kshipra edge
    --upstream URL`` makes one too). Where it connects and its secrets come from the rest of
    :class:`KshipraConfig` (:meth:`KshipraConfig.upstream_url`, ``secrets``, ``redis``)."""

    name: str
    city: str
    """Where its students are (a label for people and dashboards)."""
    listen: Listen = "127.0.0.1:8081"
    upstream: str = "origin"
    """``origin`` or the name of a parent edge (a shield)."""
    cache_host: str | None = None
    """Host used in cache keys; default: the upstream's authority. Never the client's Host
    header (upstream always receives its own authority as Host)."""
    memory_bytes: ByteSize = 256 * 1024**2
    memory_max_object_bytes: PositiveByteSize = 2 * 1024**2
    """Larger objects live on disk only."""
    disk_bytes: ByteSize = 10 * 1024**3
    disk_dir: str | None = None
    disk_sync_interval_s: float = Field(default=5.0, gt=0)
    """How often the disk tier's index is reconciled with the other processes of this edge."""
    policy: EvictionPolicyName = "tinylfu-sa"
    slice_bytes: PositiveByteSize = 8 * 1024**2
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    max_upstream_connections: int = Field(default=64, gt=0)
    stale_if_unreachable_s: float = Field(default=3600.0, ge=0)
    """Serve a stored response up to this stale when upstream cannot be reached at all, even
    without ``stale-if-error``; ``0`` turns it off."""
    hit_for_miss_s: float = Field(default=120.0, ge=0)
    """A URL found uncacheable is passed upstream, uncollapsed, for this long."""
    hit_for_miss_max_keys: int = Field(default=10_000, gt=0)
    """At most this many URLs remembered as uncacheable: an attacker walking random 404s must
    not grow the edge without bound (about 150 B each)."""
    proxy_prefixes: tuple[str, ...] = ("/content/",)
    """Paths the edge proxies; anything else is a 404 from the edge, and the origin's
    ``/v1/`` control API never passes whatever this says."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A request head must arrive within this (a slowloris or silent socket is closed)."""
    send_stall_s: float = Field(default=60.0, gt=0)
    """A response the client stops reading for this long is abandoned."""
    connections_per_client: int = Field(default=256, ge=0)
    """Open connections per IPv4 address or IPv6 /64 (0: no cap); generous for carrier NAT."""
    max_inflight_requests: int = Field(default=4096, ge=0)
    """Full-flow requests at once; past it 503 + Retry-After (0: no limit)."""
    max_upstream_fetches: int = Field(default=256, ge=0)
    """Upstream requests waiting at once; past it stale or 503 + Retry-After (0: no limit)."""
    client_requests_per_s: int = Field(default=500, ge=0)
    """Full-flow requests per client address per second; past it 429 (0: no limit). Fresh
    memory hits are not counted."""

    _listen_ok = field_validator("listen")(_check_listen)

    @field_validator("proxy_prefixes")
    @classmethod
    def _prefixes_ok(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not prefix.startswith("/") for prefix in value):
            raise ValueError("at least one path prefix, each starting with '/'")
        return value

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("edge names are lowercase letters, digits and '-', 1-63 chars")
        return value


class CacheRule(_Section):
    """Cache policy for paths matching a glob (``*`` within a segment, ``**`` across them)."""

    pattern: str = Field(min_length=1)
    edge_ttl_s: int = Field(ge=0)
    browser_ttl_s: int = Field(ge=0)
    stale_while_revalidate_s: int = Field(default=0, ge=0)
    stale_if_error_s: int = Field(default=0, ge=0)
    compress: bool = False
    tags: tuple[str, ...] = ()

    @field_validator("pattern")
    @classmethod
    def _pattern_ok(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("patterns are absolute paths starting with '/'")
        return value


def _default_cache_rules() -> tuple[CacheRule, ...]:
    return (
        CacheRule(
            pattern="/content/**/latest*",
            edge_ttl_s=60,
            browser_ttl_s=30,
            stale_while_revalidate_s=600,
            stale_if_error_s=86400,
            compress=True,
        ),
        CacheRule(
            pattern="/content/**/*.m3u8",
            edge_ttl_s=10,
            browser_ttl_s=5,
            stale_while_revalidate_s=60,
            stale_if_error_s=86400,
            compress=True,
        ),
        CacheRule(
            pattern="/content/**/*.json",
            edge_ttl_s=60,
            browser_ttl_s=30,
            stale_while_revalidate_s=600,
            stale_if_error_s=86400,
            compress=True,
        ),
    )


class Secrets(BaseModel):
    """Read from the environment only (``KSHIPRA_UPLOAD_TOKEN`` …), never from a file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upload_token: str | None = Field(default=None, min_length=16, repr=False)
    purge_token: str | None = Field(default=None, min_length=16, repr=False)
    signing_key: str | None = Field(default=None, min_length=32, repr=False)


class KshipraConfig(_Section):
    origin: OriginConfig = OriginConfig()
    redis: RedisConfig = RedisConfig()
    media: MediaConfig = MediaConfig()
    transcode: TranscodeConfig = TranscodeConfig()
    edges: tuple[EdgeConfig, ...] = ()
    cache_rules: tuple[CacheRule, ...] = Field(default_factory=_default_cache_rules)
    secrets: Secrets = Secrets()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _topology_ok(self) -> KshipraConfig:
        names = [edge.name for edge in self.edges]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"edges: duplicate names {duplicates}")
        by_name = {edge.name: edge for edge in self.edges}
        for edge in self.edges:
            if edge.upstream != "origin" and edge.upstream not in by_name:
                raise ValueError(
                    f"edges.{edge.name}.upstream: {edge.upstream!r} is neither 'origin' "
                    "nor the name of another edge"
                )
            seen = [edge.name]
            hop = edge.upstream
            while hop != "origin":
                if hop in seen:
                    raise ValueError(f"edges: upstream cycle {' -> '.join([*seen, hop])}")
                seen.append(hop)
                hop = by_name[hop].upstream
        listens = [self.origin.listen, *(edge.listen for edge in self.edges)]
        clashes = sorted(
            {lst for lst in listens if listens.count(lst) > 1 and not lst.endswith(":0")}
        )
        if clashes:
            raise ValueError(f"two services listen on the same address: {clashes}")
        return self

    def edge(self, name: str) -> EdgeConfig:
        for edge in self.edges:
            if edge.name == name:
                return edge
        raise KeyError(name)

    def upstream_url(self, name: str) -> str:
        """The base URL edge *name* fetches from: the origin's, or its parent edge's."""
        edge = self.edge(name)
        if edge.upstream == "origin":
            return self.origin.base_url
        host, port = parse_listen(self.edge(edge.upstream).listen)
        return f"http://{host}:{port}"

    @property
    def purge_stream_url(self) -> str | None:
        """The Redis an edge follows the purge stream at; ``None`` when Redis is the origin's
        embedded child server (``kshipra dev`` hands its edge the real address)."""
        return None if self.redis.url == "embedded" else self.redis.url
