"""End-to-end through the live pipeline: TCP connects from a process in a Docker-shaped cgroup of the
test's own, and the snapshot's tcp_connect rows (counts, failures, percentiles, container id)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time

import pytest

from memtop.config import Config
from memtop.export import snapshot_to_dict
from memtop.sources import LiveSource

from .cgroup_util import test_cgroup, unique_name

pytestmark = pytest.mark.bpf

CONNECTS = 40
REFUSED = 5

CLIENT = """
import socket, sys
port, closed = int(sys.argv[1]), int(sys.argv[2])
for _ in range({connects}):
    s = socket.create_connection(("127.0.0.1", port)); s.close()
for _ in range({refused}):
    try:
        socket.create_connection(("127.0.0.1", closed))
    except ConnectionRefusedError:
        pass
"""


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    return port


def test_connects_from_a_container_are_counted_with_failures_and_attributed() -> None:
    container_id = secrets.token_hex(32)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    port = server.getsockname()[1]
    closed = closed_port()
    with test_cgroup(f"{unique_name()}/docker/{container_id}") as cg:
        source = LiveSource(Config(interval_s=0.5))
        source.start()
        try:
            source.tick()
            script = CLIENT.format(connects=CONNECTS, refused=REFUSED)
            client = subprocess.Popen(
                [sys.executable, "-c", script, str(port), str(closed)], preexec_fn=cg.enter
            )
            accepted = 0
            server.settimeout(10)
            while accepted < CONNECTS:
                conn, _ = server.accept()
                conn.close()
                accepted += 1
            assert client.wait(timeout=30) == 0
            time.sleep(0.3)
            snap = source.tick()
        finally:
            source.close()
            server.close()
    rows = {(r.daddr, r.dport): r for r in snap.tcp_connect if r.pid == client.pid}
    ok = rows[("127.0.0.1", port)]
    assert ok.connects == CONNECTS and ok.failed == 0
    assert ok.container_id == container_id and ok.cgroup_path == cg.path
    assert ok.p50_us is not None and 0 < ok.p50_us < 1_000_000 and ok.max_us >= ok.p50_us
    bad = rows[("127.0.0.1", closed)]
    assert bad.failed == REFUSED and bad.container_id == container_id
    refused = [s for s in snap.tcp_slow_connects if s.pid == client.pid and s.failed]
    assert len(refused) == REFUSED and all(s.reason == "refused" for s in refused)
    doc = snapshot_to_dict(snap)
    item = next(t for t in doc["tcp_connect"] if t["pid"] == client.pid and t["dport"] == port)
    for name in (
        "pid",
        "comm",
        "container_id",
        "daddr",
        "dport",
        "family",
        "connects",
        "failed",
        "p50_us",
        "p90_us",
        "p99_us",
        "max_us",
        "histogram",
    ):
        assert name in item, name
    assert item["container_id"] == container_id and sum(item["histogram"].values()) == CONNECTS
