"""S3 bucket notifications → purges: changes that reach storage without the origin (an
operator's ``aws s3 cp``) still reach the edges. They arrive through an SQS queue (below) or,
from MinIO, as webhook posts to ``POST /v1/notifications/s3`` (:func:`make_webhook_handler`);
both go through :class:`BucketEvents`.

When ``origin.notifications_queue_url`` is set and storage is S3, the origin long-polls that SQS
queue (waiting the queue's ``ReceiveMessageWaitTimeSeconds``, else 20 s, per poll) for the
bucket's ``ObjectCreated:*`` and ``ObjectRemoved:*`` events and maps each object key to the cache
tags it affects:

* ``assets/{id}/manifest.json`` → ``{kind}:{id}``; the kind comes from the manifest (read fresh,
  which also refreshes the catalogue's cache), or for a deleted manifest from the kinds this
  consumer has seen, else every kind's tag (``lecture:{id}``, ``image:{id}``, ``bundle:{id}``);
* ``renditions/…`` and ``sources/…`` are content-addressed and immutable: logged, no purge;
* anything else: logged, no purge.

Each affected manifest gives soft tag purges on ``kshipra:purges`` (fields as in
:mod:`origin.purge`, ``reason`` naming the event). Duplicate and out-of-order deliveries are
harmless: per object key, the highest S3 ``sequencer`` seen is kept in the hash
``kshipra:s3-sequencers`` and an event whose sequencer is not higher is dropped. The comparison,
the hash update and the XADDs run in one Lua script, so two origins reading the same queue
publish each change once. (S3 compatibles that omit ``sequencer`` — moto does — get one made
from ``eventTime``'s milliseconds: duplicates still collapse; two writes to one key within a
millisecond would count as one.) A message is deleted from the queue once handled; one whose
handling failed (Redis down) comes back after the queue's visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import unquote_plus, urlsplit

import boto3.session
import redis.asyncio as aioredis
from aiohttp import web
from botocore.config import Config

from assets.blobstore import parse_s3_location
from assets.catalogue import ASSET_ID_RE, MANIFEST_NAME, Catalogue
from assets.sniff import KINDS
from cdn_config import KshipraConfig
from common.errors import BadRequest
from common.wire import (
    PURGE_ENTRY_FIELD_COUNT,
    PURGE_STREAM,
    PURGE_STREAM_MAXLEN,
    S3_SEQUENCERS_KEY,
    PurgeEntry,
)
from origin.purge import check_purge_token

log = logging.getLogger(__name__)

IMMUTABLE_PREFIXES = ("renditions/", "sources/")
MAX_LONG_POLL_S = 20

# ---- the pure core ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Change:
    """One record of an S3 event notification."""

    bucket: str
    key: str
    event: str
    """``ObjectCreated:Put``, ``ObjectRemoved:Delete``, …"""
    sequencer: str

    @property
    def removed(self) -> bool:
        return self.event.startswith("ObjectRemoved")


@dataclass(frozen=True, slots=True)
class ManifestChanged:
    asset_id: str


@dataclass(frozen=True, slots=True)
class Immutable:
    """Content-addressed: a change needs no purge."""


@dataclass(frozen=True, slots=True)
class Unrelated:
    """Not a key the origin serves from."""


Impact = ManifestChanged | Immutable | Unrelated

_MANIFEST_RE = re.compile(rf"^assets/(?P<id>[^/]+)/{re.escape(MANIFEST_NAME)}$")


def impact_of(key: str, prefix: str = "") -> Impact:
    """What a change to the object *key* (the bucket's key; the store may live under
    *prefix*) means for the edges' caches."""
    if prefix:
        if not key.startswith(prefix):
            return Unrelated()
        key = key[len(prefix) :]
    match = _MANIFEST_RE.match(key)
    if match and ASSET_ID_RE.match(match["id"]) and ".." not in match["id"]:
        return ManifestChanged(match["id"])
    if key.startswith(IMMUTABLE_PREFIXES):
        return Immutable()
    return Unrelated()


def tags_for(asset_id: str, kind: str | None) -> list[str]:
    """The cache tags to purge for a changed manifest: its kind's, or every kind's."""
    return [f"{kind}:{asset_id}"] if kind else [f"{k}:{asset_id}" for k in KINDS]


def sequencer_from_time(event_time: str) -> str:
    """A stand-in sequencer from ``eventTime`` (milliseconds since the epoch, in hex)."""
    moment = datetime.fromisoformat(event_time.replace("Z", "+00:00"))
    return f"{round(moment.timestamp() * 1000):x}"


def newer(candidate: str, seen: str | None) -> bool:
    """S3 sequencers are hex strings; left-pad both to one length, then compare."""
    if seen is None:
        return True
    width = max(len(candidate), len(seen))
    return candidate.upper().rjust(width, "0") > seen.upper().rjust(width, "0")


_HEX_RE = re.compile(r"^[0-9A-Fa-f]{1,64}$")


def parse_message(body: str) -> list[S3Change]:
    """The S3 records in one SQS message body (raw, or wrapped by SNS). Test events and
    anything that is not an object event give no records; a malformed body raises
    ``ValueError``."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    if document.get("Type") == "Notification" and isinstance(document.get("Message"), str):
        return parse_message(document["Message"])
    changes = []
    for record in document.get("Records", []):
        if not isinstance(record, dict):
            continue
        event = str(record.get("eventName", "")).removeprefix(
            "s3:"
        )  # MinIO: "s3:ObjectCreated:Put"
        s3 = record.get("s3") or {}
        if not event.startswith(("ObjectCreated", "ObjectRemoved")) or not isinstance(s3, dict):
            continue
        obj = s3.get("object") or {}
        key = obj.get("key")
        if not isinstance(key, str):
            raise ValueError("an object record has no key")
        sequencer = obj.get("sequencer")
        if not isinstance(sequencer, str) or not _HEX_RE.match(sequencer):
            sequencer = sequencer_from_time(str(record.get("eventTime")))
        changes.append(
            S3Change(
                bucket=str((s3.get("bucket") or {}).get("name", "")),
                key=unquote_plus(key),
                event=event,
                sequencer=sequencer.upper(),
            )
        )
    return changes


# ---- IO: Redis -------------------------------------------------------------------------------

# KEYS: sequencer hash, purge stream. ARGV: object key, sequencer, then each purge entry's
# fields as flat name/value pairs (PurgeEntry.fields(), {width} items an entry) → how many
# purges were added (0: not newer than what was seen).
_PUBLISH_IF_NEWER = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local new = string.upper(ARGV[2])
if old then
  old = string.upper(old)
  local width = math.max(#old, #new)
  local a = string.rep('0', width - #old) .. old
  local b = string.rep('0', width - #new) .. new
  if b <= a then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], new)
local added = 0
for i = 3, #ARGV, {width} do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '{maxlen}', '*', unpack(ARGV, i, i + {width} - 1))
  added = added + 1
end
return added
""".replace("{maxlen}", str(PURGE_STREAM_MAXLEN)).replace(
    "{width}", str(2 * PURGE_ENTRY_FIELD_COUNT)
)


async def publish_if_newer(
    redis: aioredis.Redis, change: S3Change, tags: list[str], *, now: float
) -> int:
    """Purge *tags* (soft) unless an equal or newer event for this key was handled."""
    request_id = uuid.uuid4().hex
    reason = f"s3 {change.event} {change.key}"[:512]
    entries = [
        item
        for tag in tags
        for pair in PurgeEntry("tag", tag, True, reason, now, request_id).fields().items()
        for item in pair
    ]
    result = await redis.eval(
        _PUBLISH_IF_NEWER,
        2,
        S3_SEQUENCERS_KEY,
        PURGE_STREAM,
        change.key,
        change.sequencer,
        *entries,
    )
    return int(result)


# ---- IO: the SQS consumer ----------------------------------------------------------------------


def sqs_endpoint_and_region(queue_url: str, default_region: str | None) -> tuple[str, str | None]:
    """The endpoint is the queue URL's origin (AWS: ``https://sqs.{region}.amazonaws.com``,
    moto or ElasticMQ: their own address)."""
    parts = urlsplit(queue_url)
    match = re.match(r"^sqs[.-]([a-z0-9-]+)\.amazonaws\.com", parts.netloc)
    return f"{parts.scheme}://{parts.netloc}", match[1] if match else default_region


Outcome = Literal["purged", "duplicate", "immutable", "unrelated"]


class BucketEvents:
    """Turns the bucket's object events into purges, however they arrive (the SQS consumer
    below, or MinIO's webhook: :func:`make_webhook_handler`)."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        catalogue: Catalogue,
        bucket: str,
        prefix: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._catalogue = catalogue
        self._bucket = bucket
        self._prefix = prefix
        self._clock = clock
        self._kinds: dict[str, str] = {}
        self.outcomes: dict[str, int] = {}

    async def apply(self, changes: list[S3Change]) -> list[Outcome]:
        outcomes = [await self._apply(change) for change in changes]
        for outcome in outcomes:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return outcomes

    async def _apply(self, change: S3Change) -> Outcome:
        if change.bucket and change.bucket != self._bucket:
            log.info("s3 notifications: %s is in bucket %s, not ours", change.key, change.bucket)
            return "unrelated"
        impact = impact_of(change.key, self._prefix)
        if isinstance(impact, Immutable):
            log.info("s3 %s %s: content-addressed, no purge", change.event, change.key)
            return "immutable"
        if isinstance(impact, Unrelated):
            log.info("s3 %s %s: not served, no purge", change.event, change.key)
            return "unrelated"
        manifest = await self._catalogue.get(impact.asset_id, fresh=True)
        if manifest is not None:
            self._kinds[impact.asset_id] = manifest.kind
        kind = manifest.kind if manifest is not None else self._kinds.get(impact.asset_id)
        tags = tags_for(impact.asset_id, kind)
        added = await publish_if_newer(self._redis, change, tags, now=self._clock())
        if not added:
            log.info("s3 %s %s: already handled (sequencer)", change.event, change.key)
            return "duplicate"
        log.info("s3 %s %s: purged %s", change.event, change.key, " ".join(tags))
        return "purged"


class NotificationConsumer:
    """Long-polls the queue on a thread; handles each message on the event loop."""

    def __init__(self, *, sqs: Any, queue_url: str, events: BucketEvents) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._events = events
        self._wait_time_s: int | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kshipra-sqs")
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.handled_messages = 0
        self.failed_attempts = 0

    @property
    def outcomes(self) -> dict[str, int]:
        return self._events.outcomes

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="s3-notifications")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A long poll in flight finishes on its own within wait_time_s; do not wait for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait_handled(self, count: int) -> None:
        """Until at least *count* messages have been handled (for tests and status)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.handled_messages >= count)

    async def wait_failed(self, count: int) -> None:
        """Until at least *count* attempts to receive or handle have failed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.failed_attempts >= count)

    async def _run(self) -> None:
        """Receive, handle, delete, forever. A message whose handling fails stays in the queue
        and comes back after its visibility timeout (a redrive policy on the queue moves a
        message that never succeeds to a dead-letter queue)."""
        failures = 0
        while True:
            try:
                messages = await self._receive()
                for message in messages:
                    await self._handle_and_delete(message)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the consumer outlives any failure
                failures += 1
                async with self._changed:
                    self.failed_attempts += 1
                    self._changed.notify_all()
                backoff_s = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning(
                    "s3 notifications: %s (%s); unhandled messages come back after the queue's "
                    "visibility timeout; receiving again in %.1f s",
                    exc,
                    type(exc).__name__,
                    backoff_s,
                )
                await asyncio.sleep(backoff_s)

    async def _handle_and_delete(self, message: dict[str, Any]) -> None:
        await self.handle(message["Body"])
        await self._delete(message["ReceiptHandle"])
        async with self._changed:
            self.handled_messages += 1
            self._changed.notify_all()

    async def _receive(self) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            if self._wait_time_s is None:
                self._wait_time_s = self._long_poll_s()
            answer = self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=self._wait_time_s,
            )
            return list(answer.get("Messages", []))

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _long_poll_s(self) -> int:
        """The queue's own ``ReceiveMessageWaitTimeSeconds`` when the operator set one, else
        the longest long poll SQS allows (20 s)."""
        answer = self._sqs.get_queue_attributes(
            QueueUrl=self._queue_url, AttributeNames=["ReceiveMessageWaitTimeSeconds"]
        )
        configured = int(answer.get("Attributes", {}).get("ReceiveMessageWaitTimeSeconds", 0))
        return configured if configured > 0 else MAX_LONG_POLL_S

    async def _delete(self, receipt: str) -> None:
        def call() -> None:
            self._sqs.delete_message(QueueUrl=self._queue_url, ReceiptHandle=receipt)

        await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def handle(self, body: str) -> list[Outcome]:
        """Handle one message body; malformed ones are logged and dropped (a retry cannot fix
        them)."""
        try:
            changes = parse_message(body)
        except (ValueError, TypeError) as exc:
            log.warning("s3 notifications: dropping a malformed message: %s", exc)
            return []
        return await self._events.apply(changes)


NOTIFICATIONS = web.AppKey("notifications", NotificationConsumer)


def bucket_events(
    config: KshipraConfig, redis: aioredis.Redis, catalogue: Catalogue
) -> BucketEvents | None:
    """The bucket's event handler when storage is S3 (or an S3 compatible); ``None`` for
    local storage."""
    location = parse_s3_location(config.origin.storage)
    if location is None:
        return None
    bucket, prefix = location
    return BucketEvents(redis=redis, catalogue=catalogue, bucket=bucket, prefix=prefix)


def start_notifications(
    config: KshipraConfig, events: BucketEvents | None
) -> NotificationConsumer | None:
    """Start consuming the SQS queue when configured (call inside a running loop); ``None``
    otherwise."""
    queue_url = config.origin.notifications_queue_url
    if not queue_url:
        return None
    if events is None:
        log.warning("origin.notifications_queue_url is set, but storage is not S3: ignored")
        return None
    endpoint, region = sqs_endpoint_and_region(queue_url, config.origin.s3_region)
    sqs = boto3.session.Session().client(
        "sqs",
        endpoint_url=endpoint,
        region_name=region,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}),
    )
    consumer = NotificationConsumer(sqs=sqs, queue_url=queue_url, events=events)
    consumer.start()
    return consumer


# ---- MinIO's webhook -------------------------------------------------------------------------

WEBHOOK_PATH = "/v1/notifications/s3"
MAX_WEBHOOK_BODY_BYTES = 1024 * 1024
BUCKET_EVENTS = web.AppKey("bucket-events", BucketEvents)


def make_webhook_handler(
    config_key: web.AppKey[KshipraConfig],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /v1/notifications/s3``: a bucket event posted by MinIO's webhook target
    (``mc admin config set ALIAS notify_webhook:kshipra endpoint=…/v1/notifications/s3
    auth_token=$KSHIPRA_PURGE_TOKEN``), or anything that posts S3 event JSON. Bearer purge
    token. A malformed body gets a 400 (a retry cannot fix it); Redis down, a 503, so MinIO
    delivers the event again later. Duplicates are dropped by sequencer, as for SQS."""

    async def webhook(request: web.Request) -> web.Response:
        check_purge_token(request.app[config_key], request.headers.get("Authorization", ""))
        events = request.app.get(BUCKET_EVENTS)
        if events is None:
            raise BadRequest(
                "not_s3_storage", "bucket notifications need S3 (or S3-compatible) storage"
            )
        if (request.content_length or 0) > MAX_WEBHOOK_BODY_BYTES:
            raise BadRequest("body_too_large", "an event may be at most 1 MiB")
        body = await request.content.read(MAX_WEBHOOK_BODY_BYTES + 1)
        if len(body) > MAX_WEBHOOK_BODY_BYTES:
            raise BadRequest("body_too_large", "an event may be at most 1 MiB")
        try:
            changes = parse_message(body.decode())
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise BadRequest("invalid_event", f"not an S3 event document: {exc}") from None
        outcomes = await events.apply(changes)
        return web.json_response({"changes": len(changes), "outcomes": outcomes})

    return webhook
