"""`kshipra edge` as a real process in front of a real `kshipra origin` process: one worker,
several workers sharing a port, clean shutdown on SIGTERM, and refusals of bad invocations."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    AUTH,
    OriginProcess,
    bundle_bytes,
    child_env,
    eventually,
    free_port,
    kshipra_argv,
    wait_for_http,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CONFIG = REPO / "cdn_config" / "sample.toml"


def upload_bundle(origin: OriginProcess, asset_id: str) -> tuple[bytes, str]:
    """Upload a bundle; once published: (what the origin serves at its versioned URL, that
    URL's path)."""
    request = urllib.request.Request(
        f"{origin.url}/v1/assets?kind=bundle&id={asset_id}",
        data=bundle_bytes(questions=20),
        headers=AUTH,
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    urls: dict[str, str] = {}

    def published() -> bool:  # the origin may publish after processing: wait for it
        _, raw, _ = fetch(f"{origin.url}/v1/assets/{asset_id}", **AUTH)
        view = json.loads(raw)
        assert view.get("newest_state") != "failed", view
        if view["status"] == "published" and "versioned" in view["urls"]:
            urls.update(view["urls"])
        return bool(urls)

    eventually(published, timeout_s=30.0, what=f"{asset_id} being published", interval_s=0.05)
    path = "/" + urls["versioned"].split("/", 3)[3]
    status, body, _ = fetch(origin.url + path)
    assert status == 200
    return body, path


def fetch(url: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    """One request on a fresh connection (urllib does not keep connections alive)."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", **headers})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read(), dict(response.headers)


@pytest.fixture
def edge_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Edge processes a test starts; whatever is still running at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            for pid in children_of(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait(timeout=10)


def start_edge(
    started: list[subprocess.Popen[bytes]], log_path: Path, *args: str
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            kshipra_argv("edge", *args), env=child_env(), stdout=log, stderr=subprocess.STDOUT
        )
    started.append(process)
    return process


# ---- /proc: the process tree and who listens where -----------------------------------------------


def children_of(pid: int) -> dict[int, str]:
    """Live (not zombie) children of *pid*: pid → command line."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rpartition(")")[2].split()
        state, parent = fields[0], int(fields[1])
        if parent == pid and state != "Z":
            children[int(entry.name)] = cmdline
    return children


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def listening_socket_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rpartition(":")[2], 16) == port:
                    inodes.add(inode)
    return inodes


def listens_on(pid: int, port: int) -> bool:
    wanted = {f"socket:[{inode}]" for inode in listening_socket_inodes(port)}
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in wanted:
                return True
        except FileNotFoundError:
            continue
    return False


# ---- one worker -------------------------------------------------------------------------------


def test_edge_process_caches_in_front_of_the_origin_and_stops_on_sigterm(
    origin_process: OriginProcess,
    tmp_path: Path,
    edge_processes: list[subprocess.Popen[bytes]],
) -> None:
    body, path = upload_bundle(origin_process, "chem-mole")
    port = free_port()
    disk = tmp_path / "edge-disk"
    edge = start_edge(
        edge_processes,
        tmp_path / "edge.log",
        "--upstream", origin_process.url,
        "--listen", f"127.0.0.1:{port}",
        "--disk-dir", str(disk),
        "--name", "e1",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/healthz", process=edge)

    status, first, headers = fetch(url + path)
    assert (status, first) == (200, body)
    assert headers["Cache-Status"].startswith("e1; fwd=uri-miss; stored")
    assert "Surrogate-Key" not in headers
    status, second, headers = fetch(url + path)
    assert (status, second) == (200, body)
    assert headers["Cache-Status"].startswith("e1; hit")
    assert list(disk.rglob("*.body"))  # the disk tier holds it
    # A keep-alive client (urllib closes each connection) gets the express lane.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(2):
            connection.request("GET", path, headers={"Accept-Encoding": "identity"})
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, body)
            assert response.headers["Cache-Status"].startswith("e1; hit")
    finally:
        connection.close()

    status, health, _ = fetch(url + "/healthz")
    assert status == 200
    assert json.loads(health) == {"status": "ok", "edge": "e1"}
    status, metrics, _ = fetch(url + "/metrics")
    assert status == 200
    assert "kshipra_edge_hits_total 3.0" in metrics.decode()
    assert "kshipra_edge_express_hits_total 2.0" in metrics.decode()
    assert "kshipra_edge_misses_total 1.0" in metrics.decode()

    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=15) == 0, (tmp_path / "edge.log").read_text()


# ---- several workers on one port --------------------------------------------------------------


def test_workers_share_the_port_and_sigterm_stops_them_all(
    origin_process: OriginProcess,
    tmp_path: Path,
    edge_processes: list[subprocess.Popen[bytes]],
) -> None:
    body, path = upload_bundle(origin_process, "bio-cell")
    port = free_port()
    parent = start_edge(
        edge_processes,
        tmp_path / "edge.log",
        "--upstream", origin_process.url,
        "--listen", f"127.0.0.1:{port}",
        "--disk-dir", str(tmp_path / "edge-disk"),
        "--name", "e2",
        "--workers", "2",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/healthz", process=parent)

    def workers() -> list[int]:
        return [pid for pid, cmd in children_of(parent.pid).items() if "spawn_main" in cmd]

    eventually(
        lambda: len(workers()) == 2 and all(listens_on(pid, port) for pid in workers()),
        timeout_s=30.0,
        what="two workers listening on the port",
        interval_s=0.05,
    )
    everyone = set(children_of(parent.pid))
    assert not listens_on(parent.pid, port)  # the parent only supervises

    for _ in range(20):  # fresh connections, spread over the workers by the kernel
        status, answer, headers = fetch(url + path)
        assert (status, answer) == (200, body)
        assert headers["Cache-Status"].startswith("e2; ")
    assert len(workers()) == 2  # nobody crashed

    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=20) == 0, (tmp_path / "edge.log").read_text()
    eventually(
        lambda: not any(alive(pid) for pid in everyone),
        timeout_s=30.0,
        what="every child exiting",
        interval_s=0.05,
    )


# ---- bad invocations ---------------------------------------------------------------------------


def test_bad_invocations_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    cases = {
        ("--config", str(SAMPLE_CONFIG), "--name", "nowhere"): "no edge named 'nowhere'",
        (): "--upstream",
        ("--config", str(SAMPLE_CONFIG)): "indore",  # lists the edges it could be
        ("--upstream", "http://127.0.0.1:9", "--workers", "2", "--listen", "127.0.0.1:0"): (
            "fixed port"
        ),
    }
    running = {
        args: subprocess.Popen(
            kshipra_argv("edge", *args),
            env=child_env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for args in cases
    }
    for args, process in running.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 2, (args, out, err)
        assert cases[args] in (out + err).decode(), (args, out, err)


def test_an_edge_from_a_config_applies_its_door_limits(
    origin_process: OriginProcess, tmp_path: Path, edge_processes: list[subprocess.Popen[bytes]]
) -> None:
    """The door's limits as an operator sets them (the edge's section of the config), seen
    from outside: a silent socket is closed at the head deadline, a client past its
    connection cap gets 429, and /metrics counts both."""
    body, path = upload_bundle(origin_process, "door-bank")
    port = free_port()
    config = tmp_path / "kshipra.toml"
    config.write_text(
        f"""
[origin]
listen = "{origin_process.url.removeprefix("http://")}"
storage = "{tmp_path / "unused"}"
public_url = "{origin_process.url}"

[[edges]]
name = "door"
city = "Indore"
listen = "127.0.0.1:{port}"
upstream = "origin"
header_timeout_s = 0.5
connections_per_client = 3
"""
    )
    edge = start_edge(
        edge_processes, tmp_path / "edge.log", "--config", str(config), "--name", "door"
    )
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url + "/healthz", process=edge)
    assert fetch(url + path)[:2] == (200, body)

    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert silent.recv(1) == b""  # closed by the edge at the deadline, long before 10 s
    silent.close()

    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    refused = socket.create_connection(("127.0.0.1", port), timeout=10)
    answer = refused.recv(4096)
    assert answer.startswith(b"HTTP/1.1 429"), answer
    for sock in [*held, refused]:
        sock.close()

    def counted() -> bool:
        try:
            metrics = fetch(url + "/metrics")[1].decode()
        except urllib.error.HTTPError as refused_again:
            # The four closes above may not have reached the edge yet: still at the cap.
            if refused_again.code != 429:
                raise
            return False
        closed = {
            reason: float(value)
            for reason, value in re.findall(
                r'kshipra_edge_connections_closed_total\{reason="(\w+)"\} (\S+)', metrics
            )
        }
        # At least: the silent socket, and the connection refused above (a scrape refused
        # while the closes were on their way counts too).
        return closed.get("head_timeout", 0) >= 1 and closed.get("per_client_cap", 0) >= 1

    eventually(counted, timeout_s=30.0, what="the door's counters on /metrics", interval_s=0.05)
