"""`kshipra upload`, `jobs`, `status` and `origin` as real processes against a real origin."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.conftest import (
    UPLOAD_TOKEN,
    OriginProcess,
    bundle_bytes,
    child_env,
    eventually,
    free_port,
    jpeg_bytes,
    kshipra_argv,
)

pytestmark = pytest.mark.integration


def kshipra(
    *args: str, origin: OriginProcess | None = None, token: str | None = UPLOAD_TOKEN
) -> subprocess.CompletedProcess[str]:
    env = child_env()
    if token is None:
        env.pop("KSHIPRA_UPLOAD_TOKEN")
    else:
        env["KSHIPRA_UPLOAD_TOKEN"] = token
    if origin is not None:
        env["KSHIPRA_ORIGIN_URL"] = origin.url
    return subprocess.run(
        kshipra_argv(*args), env=env, capture_output=True, text=True, timeout=120, check=False
    )


def fetch(url: str) -> tuple[int, bytes, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read(), dict(response.headers)


def test_upload_prints_one_json_object_and_the_urls_serve_the_file(
    origin_process: OriginProcess, tmp_path: Path
) -> None:
    bundle = tmp_path / "Chem Mole.json"
    bundle.write_bytes(bundle_bytes())
    result = kshipra(
        "upload", str(bundle), "--kind", "bundle", "--tag", "neet", "--json", "--wait",
        origin=origin_process,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["id"] == "chem-mole"
    assert report["kind"] == "bundle"
    assert report["created"] is True
    assert report["status"] == "published"
    assert report["urls"]["latest"].endswith("/content/bundles/chem-mole/latest.json")
    assert report["urls"]["rendition:bundle.json.br"].endswith("/v1/bundle.json.br")
    status, body, _ = fetch(report["urls"]["source"])
    assert (status, body) == (200, bundle.read_bytes())
    status, body, headers = fetch(report["urls"]["versioned"])
    assert json.loads(body)["questions"] == json.loads(bundle.read_bytes())["questions"]
    assert headers["Surrogate-Key"] == "bundle:chem-mole neet"

    again = kshipra("upload", str(bundle), "--json", origin=origin_process)
    assert again.returncode == 0
    assert json.loads(again.stdout)["created"] is False

    human = kshipra("upload", str(bundle), "--id", "chem-copy", "--wait", origin=origin_process)
    assert human.returncode == 0
    assert "published: bundle chem-copy v1" in human.stdout
    assert "/content/bundles/chem-copy/latest.json" in human.stdout


def test_exit_codes_distinguish_bad_input_auth_and_server_failure(
    origin_process: OriginProcess, tmp_path: Path
) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes())
    not_json = tmp_path / "broken.json"
    not_json.write_bytes(b'{"questions": [')

    missing = kshipra("upload", str(tmp_path / "nope.mp4"), origin=origin_process)
    assert missing.returncode == 2
    assert "not a file" in missing.stderr

    mismatch = kshipra("upload", str(image), "--kind", "lecture", origin=origin_process)
    assert mismatch.returncode == 2
    assert "declared a lecture" in mismatch.stderr

    invalid = kshipra("upload", str(not_json), "--kind", "bundle", origin=origin_process)
    assert invalid.returncode == 2

    no_token = kshipra("upload", str(image), origin=origin_process, token=None)
    assert no_token.returncode == 3
    wrong_token = kshipra("upload", str(image), origin=origin_process, token="x" * 24)
    assert wrong_token.returncode == 3
    assert "KSHIPRA_UPLOAD_TOKEN" in wrong_token.stderr

    nobody = kshipra("upload", str(image), "--origin", f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 4
    assert "cannot reach the origin" in nobody.stderr


def test_jobs_and_status_show_the_catalogue(origin_process: OriginProcess, tmp_path: Path) -> None:
    image = tmp_path / "Leaf Cross Section.jpg"
    image.write_bytes(jpeg_bytes())
    assert kshipra("upload", str(image), "--wait", origin=origin_process).returncode == 0

    jobs = kshipra("jobs", "--json", origin=origin_process)
    assert jobs.returncode == 0
    document = json.loads(jobs.stdout)
    listed = {asset["id"]: asset for asset in document["assets"]}
    assert listed["leaf-cross-section"]["status"] == "published"
    assert document["queue"]["workers"] >= 1
    assert document["queue"]["active"] == 0  # the finished job left the queue
    human = kshipra("jobs", origin=origin_process)
    assert "leaf-cross-section" in human.stdout
    assert "v1 (published)" in human.stdout

    status = kshipra("status", "leaf-cross-section", origin=origin_process)
    assert status.returncode == 0
    assert "leaf-cross-section (image) - published" in status.stdout
    assert "v1 (served as latest)" in status.stdout
    assert "v1 published at " in status.stdout
    assert "image:leaf-cross-section" in status.stdout
    assert "/content/images/leaf-cross-section/" in status.stdout
    assert "vNone" not in status.stdout

    unknown = kshipra("status", "no-such-thing", origin=origin_process)
    assert unknown.returncode == 2
    assert "no asset" in unknown.stderr


def test_an_interrupted_large_upload_resumes(origin_process: OriginProcess, tmp_path: Path) -> None:
    """SIGKILL the CLI mid-upload of a 40 MiB lecture; the next run sends only what is missing."""
    lecture = tmp_path / "lecture.mkv"
    with lecture.open("wb") as handle:
        handle.write(b"\x1a\x45\xdf\xa3" + b"\x00" * 60)
        handle.write(os.urandom(40 * 1024 * 1024))
    env = child_env(KSHIPRA_ORIGIN_URL=origin_process.url)
    argv = kshipra_argv("upload", str(lecture), "--id", "long-lecture", "--max-rate", "16MiB")
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        received = wait_for_parts(origin_process, "long-lecture", at_least=2, process=first)
    finally:
        first.kill()
        first.wait()
    assert first.returncode != 0

    second = kshipra(
        "upload", str(lecture), "--id", "long-lecture", "--json", origin=origin_process
    )
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)["upload"]
    assert report["mode"] == "resumable"
    assert report["parts_total"] == 6
    assert report["resumed_parts"] >= received
    assert report["sent_bytes"] <= lecture.stat().st_size - received * 8 * 1024 * 1024
    # The whole file arrived intact: the origin verified it part by part against the hash
    # the CLI declared, and it is stored once under that hash.
    content_hash = json.loads(second.stdout)["asset"]["content_hash"]
    stored = Path(origin_process.storage) / "sources" / content_hash[:2] / content_hash
    assert stored.read_bytes() == lecture.read_bytes()
    # Its bytes are random, not a video: the worker refuses it for good, with a reason.
    failed = kshipra(
        "upload", str(lecture), "--id", "long-lecture", "--wait", origin=origin_process
    )
    assert failed.returncode == 2
    assert "processing failed" in failed.stderr
    status = kshipra("status", "long-lecture", origin=origin_process)
    assert status.returncode == 0
    assert "long-lecture (lecture) - failed: " in status.stdout
    assert "v1 failed: " in status.stdout
    assert "not yet published" in status.stdout


def wait_for_parts(
    origin: OriginProcess, asset_id: str, *, at_least: int, process: subprocess.Popen[bytes]
) -> int:
    """Watch the origin's Redis-backed session list through the API until *at_least* parts
    of the upload for *asset_id* have arrived."""
    client = redis.Redis.from_url(origin_redis_url(origin))

    def enough_parts() -> int | None:
        assert process.poll() is None, "the upload finished before it could be interrupted"
        for key in client.scan_iter(f"kshipra:upload:index:{asset_id}:*"):
            upload_id = client.get(key)
            assert isinstance(upload_id, bytes)
            request = urllib.request.Request(
                f"{origin.url}/v1/uploads/{upload_id.decode()}",
                headers={"Authorization": f"Bearer {UPLOAD_TOKEN}"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                received = len(json.loads(response.read())["upload"]["received_parts"])
            if received >= at_least:
                return received
        return None

    parts: int = eventually(
        enough_parts, timeout_s=60, what=f"the upload reaching {at_least} parts"
    )
    return parts


def origin_redis_url(origin: OriginProcess) -> str:
    argv = origin.process.args
    assert isinstance(argv, list)
    return str(argv[argv.index("--redis") + 1])


def test_origin_refuses_to_start_without_a_token_or_with_bad_config(tmp_path: Path) -> None:
    env = child_env()
    env.pop("KSHIPRA_UPLOAD_TOKEN")
    result = subprocess.run(
        kshipra_argv("origin", "--storage", str(tmp_path), "--listen", "127.0.0.1:0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "KSHIPRA_UPLOAD_TOKEN" in result.stderr

    bad = subprocess.run(
        kshipra_argv("origin", "--storage", str(tmp_path), "--listen", "nowhere"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "origin.listen" in bad.stderr
