"""The edge tiers as they are deployed: the real origin, a regional shield in front of it and
three city edges fetching through the shield, all real servers on loopback; and an edge's
disk tier across restarts (including a corrupted file)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cdn_config import KshipraConfig
from edge.app import EDGE
from tests.conftest import (
    AUTH,
    PURGE_TOKEN,
    bundle_bytes,
    eventually_async,
    jpeg_bytes,
    origin_with_worker,
)
from tests.edge_fixtures import EdgeServer, ScriptedOrigin, body_of, edge_app

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
Upstream = tuple[ScriptedOrigin, TestServer]
CITIES = ("indore", "patna", "jaipur")
EDGE_ONLY_FIELDS = ("Surrogate-Key", "CDN-Cache-Control", "Surrogate-Control")
IMMUTABLE_TTL_FLOOR_S = 31_000_000


@dataclass
class Asset:
    versioned: str
    latest: str
    bodies: dict[str, bytes]
    """What the origin itself serves at each URL: what every edge must serve, byte for byte."""


@dataclass
class Topology:
    origin: Client
    served: Counter[str]
    """GETs of /content/… the origin answered, by path (counted by the origin's own
    on_response_prepare signal)."""
    shield: Client
    cities: dict[str, Client]

    async def upload(self, body: bytes, **params: str) -> Asset:
        response = await self.origin.post("/v1/assets", params=params, data=body, headers=AUTH)
        assert response.status == 201, await response.text()
        asset_id = (await response.json())["asset"]["id"]
        urls = await self.published_urls(asset_id)
        versioned, latest = path_of(urls["versioned"]), path_of(urls["latest"])
        bodies = {}
        for path in (versioned, latest):
            direct = await self.origin.get(path)
            assert direct.status == 200, path
            bodies[path] = await direct.read()
            self.served.pop(path, None)  # this reference fetch is not edge traffic
        return Asset(versioned, latest, bodies)

    async def published_urls(self, asset_id: str, timeout_s: float = 30.0) -> dict[str, str]:
        """The asset's URLs once the origin has published it (readiness poll, deadline)."""
        view: dict[str, Any] = {}

        async def urls_once_published() -> dict[str, str] | None:
            view.clear()
            view.update(
                await (await self.origin.get(f"/v1/assets/{asset_id}", headers=AUTH)).json()
            )
            if view["status"] == "published" and "versioned" in view["urls"]:
                return dict(view["urls"])
            assert view.get("newest_state") != "failed", view
            return None

        try:
            urls: dict[str, str] = await eventually_async(
                urls_once_published,
                timeout_s=timeout_s,
                what=f"{asset_id} being published",
                interval_s=0.05,
            )
        except TimeoutError:  # the last view the origin gave says why
            raise AssertionError(f"{asset_id} was not published: {view}") from None
        return urls


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def topology_edge(name: str, upstream: str, disk_dir: Path) -> web.Application:
    return edge_app(
        name=name,
        upstream_url=upstream,
        disk_dir=disk_dir,
        memory_bytes=16 * 1024**2,
        disk_bytes=256 * 1024**2,
        upstream_timeout_s=10.0,
        purge_token=PURGE_TOKEN,  # one fleet: the shield keeps tags for its city edges
    )


@pytest.fixture
async def topology(
    aiohttp_client: Any, local_origin_config: KshipraConfig, tmp_path: Path
) -> Topology:
    served: Counter[str] = Counter()

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "GET" and request.path.startswith("/content/"):
            served[request.path] += 1

    origin_app = origin_with_worker(local_origin_config)  # publishes what is uploaded
    origin_app.on_response_prepare.append(count)
    origin: Client = await aiohttp_client(origin_app)
    origin_url = str(origin.make_url("")).rstrip("/")
    shield: Client = await aiohttp_client(
        EdgeServer(topology_edge("mumbai-shield", origin_url, tmp_path / "shield"))
    )
    shield_url = str(shield.make_url("")).rstrip("/")
    cities = {
        name: await aiohttp_client(EdgeServer(topology_edge(name, shield_url, tmp_path / name)))
        for name in CITIES
    }
    return Topology(origin, served, shield, cities)


def cache_status(response: Any) -> list[str]:
    """The Cache-Status entries, first (nearest the origin) to last (nearest the client)."""
    return [entry.strip() for entry in response.headers["Cache-Status"].split(",")]


def ttl_of(entry: str) -> int:
    match = re.search(r"; ttl=(-?\d+)", entry)
    assert match is not None, entry
    return int(match.group(1))


async def metric(client: Client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


async def get_checked(client: Client, path: str, body: bytes, **headers: str) -> Any:
    response = await client.get(path, headers=headers)
    assert response.status == 200, await response.text()
    assert await response.read() == body
    for name in EDGE_ONLY_FIELDS:
        assert name not in response.headers, (name, path)
    return response


# ---- origin → shield → city edges -----------------------------------------------------------


async def test_each_object_leaves_the_origin_once_for_all_cities(topology: Topology) -> None:
    bundle = await topology.upload(bundle_bytes(), kind="bundle", id="chem-mole", tag="neet")
    image = await topology.upload(jpeg_bytes(), kind="image", id="cell-diagram")
    paths = {**bundle.bodies, **image.bodies}
    for path, body in paths.items():
        for number, name in enumerate(CITIES):
            first = await get_checked(topology.cities[name], path, body)
            shield_entry, city_entry = cache_status(first)
            # The city edge appends its entry to the shield's, comma-separated.
            assert city_entry.startswith(f"{name}; fwd=uri-miss; stored"), city_entry
            expected_shield = "fwd=uri-miss; stored" if number == 0 else "hit"
            assert shield_entry.startswith(f"mumbai-shield; {expected_shield}"), shield_entry
            again = await get_checked(topology.cities[name], path, body)
            assert cache_status(again)[-1].startswith(f"{name}; hit")
    assert topology.served == dict.fromkeys(paths, 1)
    shield = topology.shield
    assert await metric(shield, "kshipra_edge_misses_total") == len(paths)
    assert await metric(shield, "kshipra_edge_hits_total") == len(paths) * (len(CITIES) - 1)
    for city in topology.cities.values():
        assert await metric(city, "kshipra_edge_misses_total") == len(paths)
        assert await metric(city, "kshipra_edge_hits_total") == len(paths)


async def test_concurrent_students_in_every_city_make_one_origin_fetch(
    topology: Topology,
) -> None:
    bundle = await topology.upload(bundle_bytes(questions=40), kind="bundle", id="phy-units")
    image = await topology.upload(jpeg_bytes(320, 240), kind="image", id="lens-diagram")
    paths = {**bundle.bodies, **image.bodies}

    def students(each: int) -> list[Any]:
        return [
            get_checked(city, path, body)
            for _ in range(each)
            for city in topology.cities.values()
            for path, body in paths.items()
        ]

    await asyncio.gather(*students(4))  # 48 requests at once: collapsed at both tiers
    await asyncio.gather(*students(2))  # and again, from the city edges' caches
    assert topology.served == dict.fromkeys(paths, 1)
    shield = topology.shield
    leaders = await metric(shield, "kshipra_edge_misses_total") - await metric(
        shield, "kshipra_edge_collapsed_waits_total"
    )
    assert leaders == len(paths)  # one upstream fetch per object at the shield


async def test_bodies_are_byte_identical_and_ttls_follow_the_url_kind(topology: Topology) -> None:
    bundle = await topology.upload(bundle_bytes(), kind="bundle", id="bio-cell")
    city = topology.cities["indore"]
    body = bundle.bodies[bundle.versioned]
    versioned = await get_checked(city, bundle.versioned, body, **{"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in versioned.headers
    assert versioned.headers["Content-Length"] == str(len(body))
    assert versioned.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    for entry in cache_status(versioned):
        assert ttl_of(entry) >= IMMUTABLE_TTL_FLOOR_S, entry  # about a year at every tier
    latest_body = bundle.bodies[bundle.latest]
    latest = await get_checked(city, bundle.latest, latest_body, **{"Accept-Encoding": "identity"})
    for entry in cache_status(latest):
        assert 0 < ttl_of(entry) <= 60, entry  # the mutable pointer's short TTL
    # A compressed answer decodes to the same bytes.
    encoded = await city.get(bundle.versioned, headers={"Accept-Encoding": "br, gzip"})
    assert await encoded.read() == body
    assert encoded.headers.get("Content-Encoding") in ("br", "gzip")
    for name in EDGE_ONLY_FIELDS:
        assert name not in encoded.headers
    await get_checked(topology.shield, bundle.latest, latest_body)  # nor from the shield


async def test_city_edges_keep_the_origins_edge_directives_and_cache_tags(
    topology: Topology,
) -> None:
    """Surrogate-Key and CDN-Cache-Control are stripped "before the response leaves the
    network" (DESIGN.md): the shield → city hop is inside it. A city edge that never sees the
    tags cannot apply a purge by tag, and one that never sees CDN-Cache-Control caches a
    mutable URL for the browser TTL (30 s) instead of the edge TTL (60 s)."""
    bundle = await topology.upload(bundle_bytes(), kind="bundle", id="org-chem", tag="neet")
    city = topology.cities["patna"]
    latest = await get_checked(city, bundle.latest, bundle.bodies[bundle.latest])
    shield_entry, city_entry = cache_status(latest)
    assert ttl_of(city_entry) > 30, (shield_entry, city_entry)
    stored_tags = {
        tag
        for _, meta in city.server.app[EDGE].cache.metas()
        if meta.kind == "full"
        for tag in meta.tags
    }
    assert {"bundle:org-chem", "neet"} <= stored_tags


async def test_bytes_from_upstream_are_counted_at_each_tier(topology: Topology) -> None:
    """``kshipra_edge_upstream_bytes_total`` is what an operator watches for origin egress."""
    image = await topology.upload(jpeg_bytes(320, 240), kind="image", id="eye-diagram")
    city = topology.cities["jaipur"]
    body = image.bodies[image.versioned]
    await get_checked(city, image.versioned, body)
    await get_checked(city, image.versioned, body)  # a hit adds nothing
    for tier in (topology.shield, city):
        assert await metric(tier, "kshipra_edge_upstream_bytes_total") == len(body)


# ---- the disk tier across restarts -------------------------------------------------------------

SMALL = body_of(4 * 1024, seed="small")
LARGE = body_of(200 * 1024, seed="large")
MEMORY_MAX_OBJECT = 64 * 1024
OBJECTS = {"/small.bin": SMALL, "/large.bin": LARGE}


def script_objects(origin: ScriptedOrigin) -> None:
    for path, body in OBJECTS.items():
        origin.script(
            path,
            headers={
                "Cache-Control": "max-age=3600",
                "ETag": f'"{path}"',
                "Content-Type": "application/octet-stream",
            },
            body=body,
            ranges=True,
        )


async def restarted(make_edge: Callable[..., Any], before: Client) -> Client:
    await before.close()
    edge: Client = await make_edge(memory_max_object_bytes=MEMORY_MAX_OBJECT)
    return edge


async def test_a_restarted_edge_answers_from_its_disk(
    upstream: Upstream, make_edge: Callable[..., Any]
) -> None:
    origin, _ = upstream
    script_objects(origin)
    edge = await make_edge(memory_max_object_bytes=MEMORY_MAX_OBJECT)
    for path, body in OBJECTS.items():
        assert await (await edge.get(path)).read() == body
    edge = await restarted(make_edge, edge)
    for path, body in OBJECTS.items():
        response = await edge.get(path)
        assert response.status == 200
        assert response.headers["Cache-Status"].startswith("test-edge; hit"), path
        assert await response.read() == body
        part = await edge.get(path, headers={"Range": "bytes=100-199"})
        assert part.status == 206
        assert await part.read() == body[100:200]
    assert [seen.path for seen in origin.seen] == list(OBJECTS)


@pytest.mark.parametrize("path", list(OBJECTS))
async def test_a_corrupted_body_on_disk_is_never_served(
    upstream: Upstream, make_edge: Callable[..., Any], tmp_path: Path, path: str
) -> None:
    """A flipped byte (a bad sector, a torn write) fails the checksum: the edge drops the
    entry and answers as for a miss: the right bytes, fetched again, not an error."""
    origin, _ = upstream
    script_objects(origin)
    body = OBJECTS[path]
    edge = await make_edge(memory_max_object_bytes=MEMORY_MAX_OBJECT)
    assert await (await edge.get(path)).read() == body
    await edge.close()
    body_files = list((tmp_path / "edge-disk").rglob("*.body"))
    assert len(body_files) == 1, body_files
    data = bytearray(body_files[0].read_bytes())
    assert data == body
    data[len(data) // 2] ^= 0xFF
    body_files[0].write_bytes(bytes(data))

    edge = await make_edge(memory_max_object_bytes=MEMORY_MAX_OBJECT)
    response = await edge.get(path)
    served = await response.read()
    assert served != bytes(data), "the edge served the corrupted bytes"
    assert response.status == 200, (response.status, served[:200])
    assert served == body
    assert origin.count(path) == 2  # fetched again
    again = await edge.get(path)
    assert again.headers["Cache-Status"].startswith("test-edge; hit")
    assert await again.read() == body
