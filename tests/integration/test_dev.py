"""`kshipra dev`: the embedded default comes up, serves a sample, and Ctrl-C leaves nothing
running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import child_env, free_port, kshipra_argv

pytestmark = pytest.mark.integration


def read_until(process: subprocess.Popen[str], marker: str) -> list[str]:
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"dev exited before printing {marker!r}: {lines}")


def test_dev_serves_a_sample_and_stops_cleanly(tmp_path: Path) -> None:
    port, edge_port = free_port(), free_port()
    env = child_env()
    for variable in ("KSHIPRA_UPLOAD_TOKEN", "KSHIPRA_PURGE_TOKEN"):
        env.pop(variable)
    process = subprocess.Popen(
        kshipra_argv(
            "dev",
            "--origin-listen",
            f"127.0.0.1:{port}",
            "--edge-listen",
            f"127.0.0.1:{edge_port}",
            "--data",
            str(tmp_path),
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = read_until(process, "Ctrl-C stops everything")
        by_label = {line.split()[0]: line for line in lines if line.strip()}
        sample_url = by_label["sample"].split()[1]
        valkey_pid = int(by_label["valkey"].split("pid ")[1].rstrip(")"))
        with urllib.request.urlopen(sample_url, timeout=10) as response:
            assert response.status == 200
            document = json.loads(response.read())
            assert document["questions"][0]["stem"]["hi"]
            assert "fwd=uri-miss" in response.headers["Cache-Status"]
        edge_url = by_label["edge"].split()[1]
        assert sample_url.startswith(edge_url)
        with urllib.request.urlopen(sample_url, timeout=10) as response:
            assert "hit" in response.headers["Cache-Status"]
            assert "Surrogate-Key" not in response.headers
        # The generated upload token is printed, and it works.
        token = by_label["upload"].split("KSHIPRA_UPLOAD_TOKEN=")[1].split()[0]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/assets", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    try:
        os.kill(valkey_pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"embedded valkey (pid {valkey_pid}) still running after Ctrl-C")
    assert (tmp_path / "storage" / "assets").is_dir()
