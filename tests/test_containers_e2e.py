"""End-to-end: workloads in cgroups of the test's own, shaped like Docker's and Kubernetes', and what
memtop attributes to each container: ids, pod UIDs, QoS, memory against the limit, names from a state
directory shaped like Docker's, and a burst of processes that each live well under one refresh.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from memtop.config import Config
from memtop.export import snapshot_to_dict
from memtop.sources import LiveSource

from .cgroup_util import TestCgroup, test_cgroup, unique_name

pytestmark = pytest.mark.bpf

CALLS = 20_000  # listxattr calls: one 256-byte kmalloc each
LISTXATTR = f"""
import os, sys, tempfile
path = tempfile.mkstemp()[1]
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
for _ in range({CALLS}):
    os.listxattr(path)
os.unlink(path)
sys.stdout.write("done\\n"); sys.stdout.flush()
sys.stdin.read()
"""


def start(config: Config) -> LiveSource:
    source = LiveSource(config)
    source.start()
    return source


def run_listxattr(cg: TestCgroup) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTXATTR],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=cg.enter,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "ready\n"
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)


def docker_state_dir(root: Path, container_id: str, name: str) -> None:
    """A state directory shaped like /var/lib/docker/containers/<id>/config.v2.json."""
    (root / container_id).mkdir(parents=True)
    doc = {
        "ID": container_id,
        "Name": f"/{name}",
        "Config": {"Image": "registry.example/memtop-e2e:1", "Labels": {"com.example.test": "1"}},
    }
    (root / container_id / "config.v2.json").write_text(json.dumps(doc))


def test_docker_shaped_container_gets_its_allocations_memory_limit_and_name(tmp_path: Path) -> None:
    container_id = secrets.token_hex(32)
    docker_state_dir(tmp_path / "docker", container_id, "memtop-e2e-web")
    limit = 512 << 20
    with test_cgroup(f"{unique_name()}/docker/{container_id}", memory_limit_bytes=limit) as cg:
        source = start(Config(interval_s=0.5, runtime_roots=(("docker", str(tmp_path / "docker")),)))
        try:
            source.tick()
            proc = run_listxattr(cg)
            try:
                time.sleep(0.2)
                snap = source.tick()
            finally:
                stop(proc)
        finally:
            source.close()
    row = next(r for r in snap.processes if r.pid == proc.pid)
    assert row.container_id == container_id
    assert row.container == "memtop-e2e-web"
    container = snap.container(container_id)
    assert container is not None, [c.id for c in snap.containers]
    assert container.runtime == "docker" and container.name == "memtop-e2e-web"
    assert container.image == "registry.example/memtop-e2e:1"
    assert container.cgroup_path == cg.path
    assert proc.pid in container.pids
    assert container.kmalloc_calls >= CALLS and container.kmalloc_bytes >= CALLS * 256
    assert container.memory_limit_bytes == limit
    assert container.memory_bytes is not None and 0 < container.memory_bytes < limit

    doc = snapshot_to_dict(snap)
    item = next(c for c in doc["containers"] if c["id"] == container_id)
    for name in (
        "name",
        "runtime",
        "pod_uid",
        "pod_name",
        "namespace",
        "qos",
        "cgroup_path",
        "pids",
        "kmalloc_bytes_per_s",
        "kmalloc_calls_per_s",
        "memory_bytes",
        "memory_limit_bytes",
    ):
        assert name in item, name
    assert item["memory_limit_bytes"] == limit
    assert next(p for p in doc["processes"] if p["pid"] == proc.pid)["container_id"] == container_id
    host = [p for p in doc["processes"] if p["pid"] != proc.pid and p["cgroup_path"] == "/"]
    assert all(p["container_id"] is None for p in host)


def test_kubepods_systemd_shape_resolves_pod_uid_and_qos() -> None:
    container_id = secrets.token_hex(32)
    pod_uid = str(uuid.uuid4())
    slice_uid = pod_uid.replace("-", "_")
    relpath = (
        f"{unique_name()}/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{container_id}.scope"
    )
    with test_cgroup(relpath) as cg:
        source = start(Config(interval_s=0.5))
        try:
            source.tick()
            proc = run_listxattr(cg)
            try:
                snap = source.tick()
            finally:
                stop(proc)
        finally:
            source.close()
    container = snap.container(container_id)
    assert container is not None, [c.id for c in snap.containers]
    assert container.runtime == "containerd"
    assert container.pod_uid == pod_uid and container.qos == "burstable"
    assert container.memory_limit_bytes is None  # no limit set
    assert container.kmalloc_calls >= CALLS
    row = next(r for r in snap.processes if r.pid == proc.pid)
    assert row.container_id == container_id


BURST = 12
BURST_CALLS = 3_000
SHORT = (
    f"import os, tempfile\np = tempfile.mkstemp()[1]\nfor _ in range({BURST_CALLS}): os.listxattr(p)\n"
    "os.unlink(p)\n"
)


def test_burst_of_short_lived_processes_counts_for_their_pod() -> None:
    """Each process lives well under one refresh; their allocations still count for the container."""
    container_id = secrets.token_hex(32)
    pod_uid = str(uuid.uuid4())
    with test_cgroup(f"{unique_name()}/kubepods/pod{pod_uid}/{container_id}") as cg:
        source = start(Config(interval_s=5.0))
        try:
            source.tick()
            pids = []
            for _ in range(BURST):
                p = subprocess.Popen([sys.executable, "-c", SHORT], preexec_fn=cg.enter)
                pids.append(p.pid)
                assert p.wait(timeout=30) == 0
            snap = source.tick()  # one read after all of them have exited
        finally:
            source.close()
    container = snap.container(container_id)
    assert container is not None, [c.id for c in snap.containers]
    assert container.pod_uid == pod_uid and container.qos == "guaranteed"
    assert container.kmalloc_calls >= BURST * BURST_CALLS
    assert container.kmalloc_bytes >= BURST * BURST_CALLS * 256
    rows = {r.pid: r for r in snap.processes if r.pid in pids}
    assert set(rows) == set(pids), "a short-lived process is missing"
    for row in rows.values():
        assert row.exited and row.container_id == container_id and row.cgroup_path == cg.path, row


FORKS = 6
# Runs in the container from before memtop starts, then forks children that allocate and exit at once.
FORKER = f"""
import os, sys, tempfile
p = tempfile.mkstemp()[1]
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
children = []
for _ in range({FORKS}):
    pid = os.fork()
    if pid == 0:
        for _ in range({BURST_CALLS}): os.listxattr(p)
        os._exit(0)
    os.waitpid(pid, 0)
    children.append(pid)
os.unlink(p)
sys.stdout.write(" ".join(map(str, children)) + "\\n"); sys.stdout.flush()
sys.stdin.read()
"""


def test_v1_only_container_follows_short_lived_processes_from_fork_and_moves() -> None:
    """A container only in the cgroup v1 memory hierarchy (as on a v1-only host): its cgroup2 path is
    pytest's own, so the kernel's v1 memory cgroup is what must place the short-lived processes. Some
    were moved in by a cgroup.procs write (cgroup_attach_task), some forked by a process that was already
    inside before memtop started (seeded from /proc, then inherited at fork)."""
    container_id = secrets.token_hex(32)
    with test_cgroup(f"{unique_name()}/docker/{container_id}", v2=False) as cg:
        assert cg.v2_dir is None and cg.v1_dir is not None
        forker = subprocess.Popen(
            [sys.executable, "-c", FORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=cg.enter,
        )
        source = start(Config(interval_s=5.0))
        try:
            assert forker.stdin is not None and forker.stdout is not None
            assert forker.stdout.readline() == "ready\n"
            assert source.kmalloc.memcg_seeded > 0 and "followed from fork" in source.kmalloc.describe()
            memcg_of = source.kmalloc.bpf[b"memcg_of"]
            assert memcg_of[memcg_of.Key(forker.pid)].value == cg.v1_dir.stat().st_ino  # seeded
            source.tick()
            moved = []
            for _ in range(BURST):
                p = subprocess.Popen([sys.executable, "-c", SHORT], preexec_fn=cg.enter)
                moved.append(p.pid)
                assert p.wait(timeout=30) == 0
            forker.stdin.write("go\n")
            forker.stdin.flush()
            forked = [int(pid) for pid in forker.stdout.readline().split()]
            snap = source.tick()  # one read after all of them have exited
            left = {key.value for key, _ in memcg_of.items()} & set(moved + forked)
        finally:
            source.close()
            stop(forker)  # type: ignore[arg-type]
    assert len(forked) == FORKS and not left, f"exited tasks still in memcg_of: {left}"
    rows = {r.pid: r for r in snap.processes if r.pid in moved + forked}
    assert set(rows) == set(moved + forked), "a short-lived process is missing"
    for row in rows.values():
        assert row.exited and row.container_id == container_id and row.cgroup_path == cg.path, row
    container = snap.container(container_id)
    assert container is not None and container.kmalloc_calls >= (BURST + FORKS) * BURST_CALLS
    assert snap.drops.get("memcg_map_full") == 0
