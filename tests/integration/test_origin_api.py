"""The origin over real HTTP: uploads, the catalogue and the content read API, on local and
S3 (moto) storage."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import brotli
import pytest
from aiohttp.test_utils import TestClient

from assets.blobstore import BlobStore
from assets.catalogue import AssetLayout
from assets.hashing import BLOCK_BYTES, TreeHasher
from origin.app import STORE
from tests.conftest import (
    AUTH,
    asset_published,
    bundle_bytes,
    eventually_async,
    jpeg_bytes,
    png_bytes,
)
from transcode.bundles import decode_dcz

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]


async def upload(client: Client, body: bytes, **params: str) -> tuple[int, dict[str, Any]]:
    """Upload, then wait (polling the catalogue, with a deadline) until the worker has
    published the new version; returns the upload's status and the published asset."""
    response = await client.post("/v1/assets", params=params, data=body, headers=AUTH)
    answer = await response.json()
    if response.status in (200, 201):
        answer["asset"] = await asset_published(
            client, answer["asset"]["id"], version=answer["asset"]["newest_version"]
        )
    return response.status, answer


async def stored_keys(client: Client) -> list[str]:
    store: BlobStore = client.server.app[STORE]
    return [info.key async for info in store.list("")]


async def settled(client: Client, asset_id: str) -> dict[str, Any]:
    """Wait until the asset's newest version is no longer processing."""

    async def shown_once_settled() -> dict[str, Any] | None:
        shown = await (await client.get(f"/v1/assets/{asset_id}", headers=AUTH)).json()
        return dict(shown) if shown["newest_state"] != "processing" else None

    asset: dict[str, Any] = await eventually_async(
        shown_once_settled,
        timeout_s=60,
        what=f"{asset_id} finishing processing",
        interval_s=0.05,
    )
    return asset


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


# ---- upload → fetch ---------------------------------------------------------------------------


async def test_bundle_upload_is_served_with_validators_and_cache_headers(origin: Client) -> None:
    body = bundle_bytes()
    status, answer = await upload(origin, body, kind="bundle", id="chem-mole", tag="neet")
    assert status == 201
    asset = answer["asset"]
    assert asset["id"] == "chem-mole"
    assert asset["kind"] == "bundle"
    assert asset["status"] == "published"
    assert asset["tags"] == ["bundle:chem-mole", "neet"]
    assert asset["urls"]["versioned"].endswith("/content/bundles/chem-mole/v1/bundle.json")
    assert asset["urls"]["latest"].endswith("/content/bundles/chem-mole/latest.json")

    identity = {"Accept-Encoding": "identity"}
    versioned = await origin.get(path_of(asset["urls"]["versioned"]), headers=identity)
    assert versioned.status == 200
    canonical = await versioned.read()
    assert json.loads(canonical)["questions"] == json.loads(body)["questions"]
    source = await origin.get(path_of(asset["urls"]["source"]))
    assert await source.read() == body
    headers = versioned.headers
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Content-Length"] == str(len(canonical))
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"].startswith('"')  # strong, not W/"…"
    assert "GMT" in headers["Last-Modified"]
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert headers["CDN-Cache-Control"] == "max-age=31536000"
    assert headers["Surrogate-Key"].split() == ["bundle:chem-mole", "neet"]

    latest = await origin.get(path_of(asset["urls"]["latest"]), headers=identity)
    assert latest.status == 200
    assert await latest.read() == canonical
    assert latest.headers["ETag"] == headers["ETag"]
    assert "immutable" not in latest.headers["Cache-Control"]
    assert "max-age=30" in latest.headers["Cache-Control"]
    assert "stale-while-revalidate=600" in latest.headers["CDN-Cache-Control"]
    assert "max-age=60" in latest.headers["CDN-Cache-Control"]
    assert "question-bank" not in latest.headers["Surrogate-Key"]


async def test_images_become_variants_and_lectures_an_hls_ladder(
    origin: Client, lecture_clip: bytes
) -> None:
    image = jpeg_bytes(200, 150)
    status, answer = await upload(origin, image, filename="Cell Diagram.jpg")
    assert status == 201
    asset = answer["asset"]
    assert asset["id"] == "cell-diagram"
    assert asset["kind"] == "image"
    urls = asset["urls"]
    assert {"rendition:w64.avif", "rendition:w128.webp", "rendition:w128.jpg"} <= set(urls)
    fetched = await origin.get(path_of(urls["rendition:w64.avif"]))
    assert fetched.headers["Content-Type"] == "image/avif"
    assert (await origin.get(path_of(urls["source"]))).headers["Content-Type"] == "image/jpeg"
    assert await (await origin.get(path_of(urls["source"]))).read() == image

    status, answer = await upload(origin, lecture_clip, id="mole-lecture-1", kind="lecture")
    assert status == 201
    urls = answer["asset"]["urls"]
    assert urls["versioned"].endswith("/v1/master.m3u8")
    assert urls["latest"].endswith("/content/lectures/mole-lecture-1/latest.m3u8")
    master = await origin.get(path_of(urls["versioned"]))
    assert master.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert "#EXT-X-STREAM-INF" in await master.text()
    latest = await (await origin.get(path_of(urls["latest"]))).text()
    assert "v1/" in latest  # the pointer names versioned, immutable rungs
    source = await origin.get(path_of(urls["source"]))
    assert await source.read() == lecture_clip


async def test_same_bytes_twice_are_stored_once(origin: Client) -> None:
    body = png_bytes()
    first_status, first = await upload(origin, body, id="diagram")
    second_status, second = await upload(origin, body, id="diagram")
    assert (first_status, second_status) == (201, 200)
    assert second["created"] is False
    assert second["asset"]["version"] == 1
    # The same bytes under another id reuse the stored source too.
    third_status, third = await upload(origin, body, id="diagram-copy")
    assert third_status == 201
    keys = await stored_keys(origin)
    assert len([key for key in keys if key.startswith("sources/")]) == 1
    assert not [key for key in keys if key.startswith("staging/")]
    assert third["asset"]["content_hash"] == first["asset"]["content_hash"]


async def test_new_bytes_make_a_new_version_and_move_latest(origin: Client) -> None:
    _, v1 = await upload(origin, bundle_bytes(version="a"), id="bio-cell", kind="bundle")
    _, v2 = await upload(origin, bundle_bytes(version="b"), id="bio-cell", kind="bundle")
    assert v2["asset"]["version"] == 2
    assert v2["asset"]["versions"] == [1, 2]
    old = await origin.get("/content/bundles/bio-cell/v1/bundle.json")
    assert "Question 0 a" in (await old.read()).decode()
    latest = await origin.get("/content/bundles/bio-cell/latest.json")
    assert "Question 0 b" in (await latest.read()).decode()
    assert latest.headers["ETag"] != old.headers["ETag"]
    assert v1["asset"]["content_hash"] != v2["asset"]["content_hash"]


# ---- conditional requests and ranges ------------------------------------------------------------


async def test_conditional_get_answers_304(origin: Client) -> None:
    _, answer = await upload(origin, bundle_bytes(), id="physics-units", kind="bundle")
    path = path_of(answer["asset"]["urls"]["versioned"])
    first = await origin.get(path)
    etag, last_modified = first.headers["ETag"], first.headers["Last-Modified"]

    not_modified = await origin.get(path, headers={"If-None-Match": etag})
    assert not_modified.status == 304
    assert await not_modified.read() == b""
    assert not_modified.headers["ETag"] == etag
    assert "immutable" in not_modified.headers["Cache-Control"]

    weak = await origin.get(path, headers={"If-None-Match": f'"other", W/{etag}'})
    assert weak.status == 304
    by_date = await origin.get(path, headers={"If-Modified-Since": last_modified})
    assert by_date.status == 304
    # If-None-Match wins over If-Modified-Since.
    changed = await origin.get(
        path, headers={"If-None-Match": '"stale"', "If-Modified-Since": last_modified}
    )
    assert changed.status == 200
    failed = await origin.get(path, headers={"If-Match": '"stale"'})
    assert failed.status == 412


async def test_single_ranges_and_head(origin: Client, lecture_clip: bytes) -> None:
    _, answer = await upload(origin, lecture_clip, id="range-lecture", kind="lecture")
    path = path_of(answer["asset"]["urls"]["source"])
    size = len(lecture_clip)

    part = await origin.get(path, headers={"Range": "bytes=10-109"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 10-109/{size}"
    assert part.headers["Content-Length"] == "100"
    assert await part.read() == lecture_clip[10:110]

    suffix = await origin.get(path, headers={"Range": "bytes=-16"})
    assert suffix.status == 206
    assert await suffix.read() == lecture_clip[-16:]

    open_ended = await origin.get(path, headers={"Range": "bytes=0-"})
    assert open_ended.status == 206
    assert await open_ended.read() == lecture_clip

    etag = part.headers["ETag"]
    if_range_ok = await origin.get(path, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert if_range_ok.status == 206
    if_range_stale = await origin.get(path, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert if_range_stale.status == 200
    assert await if_range_stale.read() == lecture_clip

    head = await origin.head(path)
    assert head.status == 200
    assert head.headers["Content-Length"] == str(size)
    assert await head.read() == b""


async def test_large_object_streams_whole_and_in_ranges(origin: Client) -> None:
    # Above the small-body threshold: the sendfile path (local) and streamed chunks (S3).
    body = bytes(range(256)) * 4096 + b"\xff\xd8"  # 1 MiB + 2 bytes, not a known format...
    image = jpeg_bytes(800, 600) + body[: 200 * 1024]  # ...so prefix a real JPEG head
    _, answer = await upload(origin, image, id="big-image", kind="image")
    path = path_of(answer["asset"]["urls"]["source"])
    whole = await origin.get(path)
    assert await whole.read() == image
    middle = await origin.get(path, headers={"Range": "bytes=70000-170000"})
    assert middle.status == 206
    assert await middle.read() == image[70000:170001]


async def test_malformed_and_unsatisfiable_ranges_get_416(origin: Client) -> None:
    _, answer = await upload(origin, png_bytes(), id="range-bad", kind="image")
    path = path_of(answer["asset"]["urls"]["source"])
    size = answer["asset"]["size_bytes"]
    for header in ("bytes=abc", "bytes=20-10", "bytes=", f"bytes={size}-", f"bytes={size + 5}-"):
        response = await origin.get(path, headers={"Range": header})
        assert response.status == 416, header
        assert response.headers["Content-Range"] == f"bytes */{size}"
        error = (await response.json())["error"]
        assert error["code"] == "range_not_satisfiable"
        assert error["message"]


async def test_unknown_content_is_a_json_404(origin: Client) -> None:
    for path in (
        "/content/bundles/nothing/latest.json",
        "/content/bundles/nothing/v1/bundle.json",
        "/content/bundles/..%2F..%2Fassets/v1/manifest.json",
        "/content/secret",
        "/nowhere",
    ):
        response = await origin.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"]["status"] == 404


# ---- the catalogue ------------------------------------------------------------------------------


async def test_catalogue_lists_and_shows_assets(origin: Client) -> None:
    await upload(origin, bundle_bytes(), id="list-a", kind="bundle")
    await upload(origin, png_bytes(), id="list-b", tag="botany")
    listing = await origin.get("/v1/assets", headers=AUTH)
    ids = {asset["id"]: asset for asset in (await listing.json())["assets"]}
    assert {"list-a", "list-b"} <= set(ids)
    assert ids["list-b"]["tags"] == ["image:list-b", "botany"]
    shown = await origin.get("/v1/assets/list-a", headers=AUTH)
    detail = await shown.json()
    manifest = detail["manifest"]
    assert manifest["kind"] == "bundle"
    assert manifest["status"] == "published"
    assert manifest["versions"][0]["source"]["content_hash"] == detail["content_hash"]
    assert {"bundle.json", "bundle.json.br", "bundle.json.gz", "source.json"} <= set(
        manifest["versions"][0]["renditions"]
    )
    missing = await origin.get("/v1/assets/no-such-asset", headers=AUTH)
    assert missing.status == 404


async def test_the_catalogue_pages_and_reads_only_the_page(origin: Client) -> None:
    ids = [f"page-{n}" for n in range(5)]
    for asset_id in ids:
        await upload(origin, bundle_bytes(version=asset_id), id=asset_id, kind="bundle")
    await upload(origin, png_bytes(), id="page-img")
    seen: list[str] = []
    pages = 0
    after: str | None = None
    while True:
        query = "/v1/assets?kind=bundle&limit=2" + (f"&after={after}" if after else "")
        page = await (await origin.get(query, headers=AUTH)).json()
        pages += 1
        assert len(page["assets"]) <= 2
        assert all(asset["kind"] == "bundle" for asset in page["assets"])
        seen += [asset["id"] for asset in page["assets"]]
        after = page["next"]
        if after is None:
            break
        assert after == seen[-1]
    assert [asset_id for asset_id in seen if asset_id.startswith("page-")] == ids
    assert len(seen) == len(set(seen))
    assert pages >= 3
    whole = await (await origin.get("/v1/assets", headers=AUTH)).json()
    assert whole["next"] is None
    assert {"page-img", *ids} <= {asset["id"] for asset in whole["assets"]}


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("kind=podcast", "invalid_kind"),
        ("after=..%2Fetc", "invalid_asset_id"),
    ],
)
async def test_bad_catalogue_queries_are_refused(origin: Client, query: str, code: str) -> None:
    response = await origin.get(f"/v1/assets?{query}", headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == code


async def test_health_and_readiness(origin: Client) -> None:
    assert (await origin.get("/healthz")).status == 200
    ready = await origin.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"storage": "ok", "redis": "ok"}


# ---- bad input: a clear 4xx JSON error and nothing left in storage -------------------------------


async def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    error: dict[str, Any] = (await response.json())["error"]
    assert error["status"] == status
    assert len(error["message"]) > 10
    if code is not None:
        assert error["code"] == code
    return error


async def assert_nothing_stored(client: Client) -> None:
    keys = await stored_keys(client)
    assert [key for key in keys if not key.startswith("assets/")] == [] or all(
        not key.startswith("staging/") for key in keys
    )
    assert not [key for key in keys if key.startswith("staging/")]


async def test_no_token_and_wrong_token(origin: Client) -> None:
    response = await origin.post("/v1/assets", params={"id": "x"}, data=png_bytes())
    await assert_error(response, 401, "missing_token")
    response = await origin.post(
        "/v1/assets",
        params={"id": "x"},
        data=png_bytes(),
        headers={"Authorization": "Bearer wrong-token-wrong-token"},
    )
    await assert_error(response, 403, "wrong_token")
    response = await origin.get("/v1/assets", headers={"Authorization": "Basic abc"})
    await assert_error(response, 401)
    assert await stored_keys(origin) == []


async def test_empty_upload(origin: Client) -> None:
    response = await origin.post("/v1/assets", params={"id": "empty"}, data=b"", headers=AUTH)
    await assert_error(response, 400, "empty_upload")
    assert await stored_keys(origin) == []


async def test_upload_over_the_size_limit(origin: Client) -> None:
    too_big = jpeg_bytes() + b"\0" * (1024 * 1024)  # image limit in the tests: 1 MiB
    response = await origin.post(
        "/v1/assets", params={"id": "huge", "kind": "image"}, data=too_big, headers=AUTH
    )
    await assert_error(response, 413, "too_large")

    async def chunked() -> Any:  # no Content-Length: refused while streaming
        yield jpeg_bytes()
        for _ in range(20):
            yield b"\0" * 65536

    response = await origin.post("/v1/assets", params={"id": "huge"}, data=chunked(), headers=AUTH)
    await assert_error(response, 413, "too_large")
    assert await stored_keys(origin) == []


async def test_bundle_that_is_not_json(origin: Client) -> None:
    response = await origin.post(
        "/v1/assets",
        params={"id": "broken", "kind": "bundle"},
        data=b'{"questions": [1, 2,,]}',
        headers=AUTH,
    )
    error = await assert_error(response, 422, "invalid_json")
    assert "line 1" in error["message"]
    response = await origin.post(
        "/v1/assets", params={"id": "broken", "kind": "bundle"}, data=b"hello", headers=AUTH
    )
    await assert_error(response, 415)
    assert await stored_keys(origin) == []


async def test_bytes_that_do_not_match_the_claimed_kind(origin: Client) -> None:
    response = await origin.post(
        "/v1/assets", params={"id": "fake", "kind": "lecture"}, data=png_bytes(), headers=AUTH
    )
    error = await assert_error(response, 415, "kind_mismatch")
    assert "png" in error["message"]
    response = await origin.post(
        "/v1/assets",
        params={"id": "fake", "kind": "image"},
        data=b"MZ\x90\x00" + b"\0" * 600,
        headers=AUTH,
    )
    await assert_error(response, 415, "unknown_format")
    assert await stored_keys(origin) == []


async def test_path_traversal_in_asset_id(origin: Client) -> None:
    for asset_id in ("../../etc/passwd", "a/b", "..", ".hidden", "UPPER", "a b", "x" * 101):
        response = await origin.post(
            "/v1/assets", params={"id": asset_id}, data=png_bytes(), headers=AUTH
        )
        await assert_error(response, 400, "invalid_asset_id")
    response = await origin.get("/v1/assets/..%2F..%2Fetc", headers=AUTH)
    assert response.status in (400, 404)
    assert await stored_keys(origin) == []


async def test_existing_asset_of_another_kind_is_a_conflict(origin: Client) -> None:
    await upload(origin, png_bytes(), id="shared-name")
    response = await origin.post(
        "/v1/assets", params={"id": "shared-name"}, data=bundle_bytes(), headers=AUTH
    )
    await assert_error(response, 409, "kind_conflict")
    keys = await stored_keys(origin)
    assert len([key for key in keys if key.startswith("sources/")]) == 1
    assert not [key for key in keys if key.startswith("staging/")]


# ---- resumable sessions over HTTP ---------------------------------------------------------------


def tree_hash(data: bytes) -> str:
    hasher = TreeHasher()
    hasher.update(data)
    return hasher.hexdigest()


async def test_resumable_session_verifies_parts_and_publishes(origin: Client) -> None:
    data = jpeg_bytes() + hashlib.sha256(b"seed").digest() * (BLOCK_BYTES // 32)
    data = data[: BLOCK_BYTES + 1000]  # two parts
    request = {
        "size_bytes": len(data),
        "content_hash": tree_hash(data),
        "id": "resumable-photo",
        "kind": "image",
    }
    limits_ok = await origin.post("/v1/uploads", json=request, headers=AUTH)
    # 8 MiB is over the test image limit (1 MiB): refused before any byte is sent.
    await assert_error(limits_ok, 413, "too_large")

    data = b"\x1a\x45\xdf\xa3" + b"webm" + data[8:]
    request.update(kind="lecture", content_hash=tree_hash(data), id="resumable-lecture")
    created = await origin.post("/v1/uploads", json=request, headers=AUTH)
    assert created.status == 201
    session = (await created.json())["upload"]
    assert session["parts_total"] == 2
    upload_id = session["upload_id"]

    part2 = await origin.put(
        f"/v1/uploads/{upload_id}/parts/2", data=data[BLOCK_BYTES:], headers=AUTH
    )
    assert part2.status == 200
    early = await origin.post(f"/v1/uploads/{upload_id}/complete", headers=AUTH)
    await assert_error(early, 409, "parts_missing")

    again = await origin.post("/v1/uploads", json=request, headers=AUTH)
    assert again.status == 200
    assert (await again.json())["upload"]["received_parts"] == [2]

    wrong_size = await origin.put(f"/v1/uploads/{upload_id}/parts/1", data=b"abc", headers=AUTH)
    await assert_error(wrong_size, 400)
    part1 = await origin.put(
        f"/v1/uploads/{upload_id}/parts/1", data=data[:BLOCK_BYTES], headers=AUTH
    )
    assert part1.status == 200
    done = await origin.post(f"/v1/uploads/{upload_id}/complete", headers=AUTH)
    assert done.status == 201
    asset = (await done.json())["asset"]
    assert asset["content_hash"] == request["content_hash"]
    store: BlobStore = origin.server.app[STORE]
    reader = await store.get(AssetLayout.source_key(str(request["content_hash"])))
    assert await reader.read_all() == data
    # The bytes only look like WebM: the worker refuses them for good, with a reason.
    failed = await settled(origin, "resumable-lecture")
    assert failed["status"] == "failed"
    assert failed["status_reason"]
    assert failed["urls"] == {}
    keys = await stored_keys(origin)
    assert not [key for key in keys if key.startswith("staging/")]


async def test_resumable_session_with_a_wrong_hash_is_discarded(origin: Client) -> None:
    data = b"\x1a\x45\xdf\xa3" + b"\0" * (BLOCK_BYTES + 10)
    request = {"size_bytes": len(data), "content_hash": "0" * 64, "id": "liar", "kind": "lecture"}
    created = await origin.post("/v1/uploads", json=request, headers=AUTH)
    upload_id = (await created.json())["upload"]["upload_id"]
    for number, part in ((1, data[:BLOCK_BYTES]), (2, data[BLOCK_BYTES:])):
        response = await origin.put(
            f"/v1/uploads/{upload_id}/parts/{number}", data=part, headers=AUTH
        )
        assert response.status == 200
    done = await origin.post(f"/v1/uploads/{upload_id}/complete", headers=AUTH)
    await assert_error(done, 422, "hash_mismatch")
    gone = await origin.get(f"/v1/uploads/{upload_id}", headers=AUTH)
    assert gone.status == 404
    assert await stored_keys(origin) == []


async def test_resumable_upload_into_an_asset_of_another_kind_is_refused_at_part_one(
    origin: Client,
) -> None:
    await upload(origin, png_bytes(), id="taken-by-image")
    data = b"\x1a\x45\xdf\xa3" + b"\1" * (BLOCK_BYTES + 10)
    request = {"size_bytes": len(data), "content_hash": tree_hash(data), "id": "taken-by-image"}
    created = await origin.post("/v1/uploads", json=request, headers=AUTH)
    upload_id = (await created.json())["upload"]["upload_id"]
    part = await origin.put(
        f"/v1/uploads/{upload_id}/parts/1", data=data[:BLOCK_BYTES], headers=AUTH
    )
    await assert_error(part, 409, "kind_conflict")
    gone = await origin.get(f"/v1/uploads/{upload_id}", headers=AUTH)
    assert gone.status == 404
    keys = await stored_keys(origin)
    assert len([key for key in keys if key.startswith("sources/")]) == 1


async def test_bundles_negotiate_brotli_gzip_and_dictionary_deltas(origin: Client) -> None:
    await upload(origin, bundle_bytes(questions=40, version="a"), id="neet-bio")
    v1 = await (await origin.get("/content/bundles/neet-bio/v1/bundle.json")).read()
    _, second = await upload(origin, bundle_bytes(questions=40, version="b"), id="neet-bio")
    assert second["asset"]["version"] == 2
    v2 = await (await origin.get("/content/bundles/neet-bio/v2/bundle.json")).read()
    assert json.loads(v2)["version"] == 2

    plain = await origin.get(
        "/content/bundles/neet-bio/latest.json", headers={"Accept-Encoding": "identity"}
    )
    assert plain.headers["Vary"] == "Accept-Encoding, Available-Dictionary"
    assert plain.headers["Use-As-Dictionary"] == 'match="/content/bundles/neet-bio/*"'
    assert "Content-Encoding" not in plain.headers

    br = await origin.get(
        "/content/bundles/neet-bio/latest.json",
        headers={"Accept-Encoding": "gzip, br"},
        auto_decompress=False,
    )
    assert br.headers["Content-Encoding"] == "br"
    assert brotli.decompress(await br.read()) == v2
    assert br.headers["ETag"] != plain.headers["ETag"]

    shown = await (await origin.get("/v1/assets/neet-bio", headers=AUTH)).json()
    v2_details = shown["manifest"]["versions"][1]["details"]
    dictionary = next(d for d in v2_details["deltas"] if d["from_version"] == 1)
    delta = await origin.get(
        "/content/bundles/neet-bio/latest.json",
        headers={
            "Accept-Encoding": "gzip, br, dcz",
            "Available-Dictionary": dictionary["available_dictionary"],
        },
        auto_decompress=False,
    )
    assert delta.headers["Content-Encoding"] == "dcz"
    body = await delta.read()
    assert decode_dcz(body, v1) == v2
    assert len(body) < len(brotli.compress(v2)) / 2
    unknown = await origin.get(
        "/content/bundles/neet-bio/latest.json",
        headers={"Accept-Encoding": "dcz", "Available-Dictionary": ":AAAA:"},
        auto_decompress=False,
    )
    assert "Content-Encoding" not in unknown.headers
