"""The publish loop from outside, with real processes: a new version reaches every edge behind a
shield at once, nothing one hop up undoes the purge, `kshipra dev`'s edge follows purges, and a
question bank does not wait behind a lecture."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import pytest

from tests.conftest import (
    OriginProcess,
    bundle_bytes,
    child_env,
    eventually,
    free_port,
    kshipra_argv,
    start_origin_process,
    start_worker_process,
    stop_process,
    wait_for_http,
)
from tests.integration.test_dev import read_until
from tests.integration.test_worker import api, make_clip

pytestmark = pytest.mark.integration


def fetch(url: str) -> tuple[dict[str, Any], str]:
    """(the JSON body, Cache-Status) of a GET."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read()), response.headers.get("Cache-Status", "")


def fetch_br(url: str) -> tuple[dict[str, Any], str]:
    """(the JSON body, Cache-Status) of a GET that takes Brotli only."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "br"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Encoding"] == "br"
        body = brotli.decompress(response.read())
        return json.loads(body), response.headers.get("Cache-Status", "")


def first_stem(document: dict[str, Any]) -> str:
    stem = document["questions"][0]["stem"]
    return str(stem["en"] if isinstance(stem, dict) else stem)


def published_version(origin: str, asset_id: str, number: int) -> bool:
    shown = api(f"{origin}/v1/assets/{asset_id}")
    assert shown["status"] != "failed", shown
    return bool(shown["status"] == "published" and shown["version"] == number)


class Poller:
    """Keeps asking the origin for one URL, as busy edges elsewhere would: the origin's
    in-process caches stay warm with whatever version it last read."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.requests = 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):  # the request rate of the load, not a wait for state
            try:
                with urllib.request.urlopen(self._url, timeout=5) as response:
                    response.read()
                self.requests += 1
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in reversed(started):
        stop_process(process)


def start_edge(
    started: list[subprocess.Popen[bytes]], log_path: Path, *args: str
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            kshipra_argv("edge", "--listen", f"127.0.0.1:{port}", *args),
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    started.append(process)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/readyz", process=process)
    return url, process


def test_a_publish_reaches_every_edge_behind_a_shield_and_stays(
    tmp_path: Path, valkey_url: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    storage = str(tmp_path / "storage")
    origin = start_origin_process(storage, valkey_url, tmp_path / "origin.log")
    processes.append(origin.process)
    processes.append(start_worker_process(storage, valkey_url, tmp_path / "worker.log"))
    shield, _ = start_edge(
        processes,
        tmp_path / "shield.log",
        "--upstream", origin.url, "--name", "loop-shield", "--redis", valkey_url,
        "--disk-dir", str(tmp_path / "shield-cache"),
    )  # fmt: skip
    edges = [
        start_edge(
            processes,
            tmp_path / f"edge-{n}.log",
            "--upstream", shield, "--name", f"loop-edge-{n}", "--redis", valkey_url,
        )[0]
        for n in range(2)
    ]  # fmt: skip
    for url in [shield, *edges]:
        assert api(url + "/readyz")["purges"] == "following"
    latest = "/content/bundles/loop-bank/latest.json"
    api(f"{origin.url}/v1/assets?id=loop-bank&kind=bundle", method="POST", body=bundle_bytes())
    eventually(
        lambda: published_version(origin.url, "loop-bank", 1), timeout_s=60, what="v1 published"
    )
    for edge in edges:
        fetch(edge + latest)
        document, status = fetch(edge + latest)
        assert status.endswith("; hit; ttl=59") or "; hit;" in status.rsplit(",", 1)[-1], status
        assert first_stem(document) == "Question 0 a"
    with Poller(origin.url + latest) as poller:
        eventually(lambda: poller.requests > 5, timeout_s=10, what="the origin answering load")
        api(
            f"{origin.url}/v1/assets?id=loop-bank&kind=bundle",
            method="POST",
            body=bundle_bytes(version="b"),
        )
        eventually(
            lambda: published_version(origin.url, "loop-bank", 2),
            timeout_s=60,
            what="v2 published",
        )
        # Far under the TTL (60 s) that an undone purge would cost, and under the origin's
        # own cache lifetime (1 s) plus the time the edges need to see the purge.
        for edge in edges:
            eventually(
                lambda edge=edge: first_stem(fetch(edge + latest)[0]) == "Question 0 b",
                timeout_s=5,
                what=f"{edge} serving v2",
            )
        # ... and it stays: no hop re-freshened the old object with a 304.
        for _ in range(3):
            for edge in [shield, *edges]:
                assert first_stem(fetch(edge + latest)[0]) == "Question 0 b", edge


def sample_v2(path: Path) -> Path:
    sample = Path(__file__).parent.parent.parent / "kshipra" / "samples"
    document = json.loads((sample / "neet-chemistry-mole-concept.json").read_text())
    stem = document["questions"][0]["stem"]
    if isinstance(stem, dict):
        stem["en"] = stem.get("en", "") + " (revised)"
    else:
        document["questions"][0]["stem"] = stem + " (revised)"
    path.write_text(json.dumps(document, ensure_ascii=False))
    return path


def run_kshipra(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kshipra_argv(*args),
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_dev_stack_edge_follows_publishes_and_purges(tmp_path: Path) -> None:
    port, edge_port = free_port(), free_port()
    process = subprocess.Popen(
        kshipra_argv(
            "dev",
            "--origin-listen", f"127.0.0.1:{port}",
            "--edge-listen", f"127.0.0.1:{edge_port}",
            "--data", str(tmp_path / "dev"),
        ),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        lines = read_until(process, "Ctrl-C stops everything")
        sample = next(line for line in lines if line.startswith("sample")).split()[1]
        edge = f"http://127.0.0.1:{edge_port}"
        assert api(edge + "/readyz")["purges"] == "following"
        fetch(sample)
        before, status = fetch(sample)
        assert "hit" in status
        fetch_br(sample)
        assert "hit" in fetch_br(sample)[1]
        origin = f"http://127.0.0.1:{port}"
        upload = run_kshipra(
            "upload", str(sample_v2(tmp_path / "bank.json")), "--id", "sample-chem-mole",
            "--kind", "bundle", "--wait", KSHIPRA_ORIGIN_URL=origin,
        )  # fmt: skip
        assert upload.returncode == 0, upload.stderr
        eventually(
            lambda: first_stem(fetch(sample)[0]).endswith("(revised)"),
            timeout_s=5,
            what="the dev edge serving the new version",
        )
        assert first_stem(before) != first_stem(fetch(sample)[0])
        # The Brotli copy, cached before the publish and not asked for since: its first
        # request after the purge is already the new version (revalidated, never served old).
        document, status = fetch_br(sample)
        assert first_stem(document).endswith("(revised)"), status
        path = sample.removeprefix(edge)
        purge = run_kshipra("purge", "--url", path, KSHIPRA_ORIGIN_URL=origin)
        assert purge.returncode == 0, purge.stdout + purge.stderr
        assert "applied by 1 of 1 live edges" in purge.stdout
        _, status = fetch(sample)
        assert "fwd=uri-miss" in status, status
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_bundle_is_published_while_a_lecture_transcodes(
    tmp_path: Path, origin_process: OriginProcess
) -> None:
    clip = tmp_path / "long.mp4"
    make_clip(clip, seconds=40)
    origin = origin_process.url
    api(f"{origin}/v1/assets?id=queue-lecture&kind=lecture", method="POST", body=clip.read_bytes())
    eventually(
        lambda: api(f"{origin}/v1/jobs")["active"] >= 1,
        timeout_s=60,
        what="the lecture job running",
    )
    api(f"{origin}/v1/assets?id=queue-bank&kind=bundle", method="POST", body=bundle_bytes())
    eventually(
        lambda: published_version(origin, "queue-bank", 1),
        timeout_s=60,
        what="the bundle published",
    )
    lecture = api(f"{origin}/v1/assets/queue-lecture")
    assert lecture["status"] == "processing", "the lecture finished first: nothing to show"
    # The lecture's ffmpeg runs at a lower CPU priority than the work beside it.
    encoders = eventually(
        lambda: ffmpeg_children_of_worker(str(tmp_path)), timeout_s=30, what="ffmpeg running"
    )
    assert all(niceness == 10 for niceness in encoders), encoders


def ffmpeg_children_of_worker(marker: str) -> list[int]:
    """The niceness of every ffmpeg whose parent's command line names *marker*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command line first: once it names ffmpeg the child has exec'd, so its
            # niceness (set before exec) is final. Read the other way round, a stat taken
            # between fork and exec would show the worker's niceness.
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
            parent = int(stat.rpartition(")")[2].split()[1])
            parent_cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if b"ffmpeg" in cmdline.split(b"\0", 1)[0] and marker.encode() in parent_cmdline:
            found.append(int(stat.rpartition(")")[2].split()[16]))
    return found


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_an_edge_without_redis_says_it_receives_no_purges(
    tmp_path: Path, valkey_url: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "lonely.log"
    lonely, _ = start_edge(processes, log, "--upstream", "http://127.0.0.1:9", "--name", "lonely")
    ready = api(lonely + "/readyz")
    assert (ready["status"], ready["purges"]) == ("ready", "off")
    assert "receives no purges" in ready["warning"]
    assert metric(lonely, "kshipra_edge_purge_stream_following") == 0
    eventually(lambda: "receives NO PURGES" in log.read_text(), timeout_s=10, what="the warning")
    # The environment's Redis (as a config would give it) is followed without --redis.
    port = free_port()
    with (tmp_path / "env.log").open("wb") as out:
        process = subprocess.Popen(
            kshipra_argv(
                "edge", "--upstream", "http://127.0.0.1:9", "--name", "from-env",
                "--listen", f"127.0.0.1:{port}",
            ),
            env=child_env(KSHIPRA_REDIS__URL=valkey_url),
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    processes.append(process)
    followed = f"http://127.0.0.1:{port}"
    wait_for_http(followed + "/readyz", process=process)
    assert api(followed + "/readyz")["purges"] == "following"
    assert metric(followed, "kshipra_edge_purge_stream_following") == 1


def test_a_served_process_raises_its_open_file_limit(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """1,124 silent sockets exhausted the default soft limit of 1,024 descriptors."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def low_soft_limit() -> None:  # what a fresh login shell often gives
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    port = free_port()
    with (tmp_path / "fd.log").open("wb") as log:
        process = subprocess.Popen(
            kshipra_argv(
                "edge", "--upstream", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}"
            ),
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=low_soft_limit,  # noqa: PLW1509 - no threads in the child before exec
        )
    processes.append(process)
    wait_for_http(f"http://127.0.0.1:{port}/readyz", process=process)
    limits = Path(f"/proc/{process.pid}/limits").read_text()
    [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
    soft, limit = line.split()[3:5]
    assert soft == limit != "256", line
