"""A student's app that holds last week's question bank fetches this week's as an RFC 9842
``dcz`` delta through the edge: a few kilobytes instead of the whole bank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cdn_config import KshipraConfig
from tests.conftest import AUTH, asset_published, bundle_bytes, origin_with_worker
from tests.edge_fixtures import edge_app
from transcode.bundles import decode_dcz

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]


async def publish(origin: Client, body: bytes, asset_id: str) -> dict[str, Any]:
    response = await origin.post("/v1/assets", params={"id": asset_id}, data=body, headers=AUTH)
    version = (await response.json())["asset"]["newest_version"]

    return await asset_published(origin, asset_id, version=version)


async def test_bundle_deltas_reach_students_through_the_edge(
    aiohttp_client: Any, local_origin_config: KshipraConfig, tmp_path: Path
) -> None:
    origin: Client = await aiohttp_client(origin_with_worker(local_origin_config))
    edge: Client = await aiohttp_client(
        edge_app(
            name="patna",
            upstream_url=str(origin.make_url("")).rstrip("/"),
            disk_dir=tmp_path / "edge",
        )
    )
    await publish(origin, bundle_bytes(questions=60, version="a"), "physics-units")
    v1 = await (await edge.get("/content/bundles/physics-units/v1/bundle.json")).read()
    shown = await publish(origin, bundle_bytes(questions=60, version="b"), "physics-units")
    deltas = shown["manifest"]["versions"][1]["details"]["deltas"]
    dictionary = next(d["available_dictionary"] for d in deltas if d["from_version"] == 1)
    app_holding_v1 = {"Accept-Encoding": "gzip, br, zstd, dcz", "Available-Dictionary": dictionary}

    first = await edge.get(
        "/content/bundles/physics-units/latest.json", headers=app_holding_v1, auto_decompress=False
    )
    assert first.headers["Content-Encoding"] == "dcz"
    delta = await first.read()
    v2 = decode_dcz(delta, v1)
    assert b'"version":2' in v2
    assert "Available-Dictionary" in first.headers["Vary"]
    second = await edge.get(
        "/content/bundles/physics-units/latest.json", headers=app_holding_v1, auto_decompress=False
    )
    assert "hit" in second.headers["Cache-Status"].split(",")[-1]
    assert await second.read() == delta

    fresh_install = await edge.get(
        "/content/bundles/physics-units/latest.json",
        headers={"Accept-Encoding": "gzip, br"},
        auto_decompress=False,
    )
    assert fresh_install.headers["Content-Encoding"] == "br"
    assert len(delta) < len(await fresh_install.read()) / 2
