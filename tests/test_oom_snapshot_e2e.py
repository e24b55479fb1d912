"""End-to-end through the whole live pipeline: a real OOM kill in a container-shaped memory cgroup of the
test's own, and the snapshot's `oom_events` entry (victim, memcg cause, cgroup, container id, pod UID,
anon RSS and, for a victim that grew over a few seconds, a pre-kill history showing the growth)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest

from memtop.config import Config
from memtop.export import snapshot_to_dict
from memtop.sources import LiveSource

from .cgroup_util import test_cgroup, unique_name
from .test_oom_e2e import COMM, FAST, LIMIT, SLOW, checked_limit

pytestmark = pytest.mark.bpf


@pytest.fixture(autouse=True)
def _memcg_oom_is_safe() -> None:
    with open("/proc/sys/vm/panic_on_oom") as f:
        if f.read().strip() == "2":
            pytest.skip("vm.panic_on_oom=2: a cgroup OOM would panic the machine")


def kill_in_live_source(relpath: str, script: str, v2: bool = True) -> tuple[dict, int]:  # type: ignore[type-arg]
    """Start the live source, kill a workload in the cgroup while ticking, return the exported
    snapshot and the victim's pid."""
    source = LiveSource(Config(interval_s=0.5))
    source.start()
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            source.tick()
            time.sleep(0.25)

    thread = threading.Thread(target=ticker, daemon=True)
    try:
        with test_cgroup(relpath, memory_limit_bytes=LIMIT, v2=v2) as cg:
            checked_limit(cg)
            thread.start()
            proc = subprocess.Popen([sys.executable, "-c", script], preexec_fn=cg.enter)
            assert proc.wait(timeout=60) == -9, "expected an OOM kill"
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                snap = source.tick()
                if any(e.victim_pid == proc.pid for e in snap.oom_events):
                    break
                time.sleep(0.2)
            stop.set()
            thread.join(timeout=10)
            doc = snapshot_to_dict(source.tick())
            doc["_cgroup_path"] = cg.path
    finally:
        stop.set()
        source.close()
    return doc, proc.pid


@pytest.mark.parametrize("script", [FAST, SLOW], ids=["dies-at-once", "grows-slowly"])
def test_kill_in_a_kubepods_container_is_attributed_in_the_snapshot(script: str) -> None:
    container_id = uuid.uuid4().hex + uuid.uuid4().hex
    pod_uid = str(uuid.uuid4())
    relpath = f"{unique_name()}/kubepods/burstable/pod{pod_uid}/{container_id}"
    doc, pid = kill_in_live_source(relpath, script)
    event = next((e for e in doc["oom_events"] if e["victim_pid"] == pid), None)
    assert event is not None, doc["oom_events"]
    assert event["source"] == "tracepoint" and event["victim_comm"] == COMM
    assert event["constraint"] == "memcg" and event["memcg_limit_bytes"] == LIMIT
    assert event["cgroup_path"] == doc["_cgroup_path"]
    assert event["container_id"] == container_id and event["pod_uid"] == pod_uid
    assert event["anon_rss_bytes"] > 0
    assert doc["oom_kills_seen"] >= 1
    container = next(c for c in doc["containers"] if c["id"] == container_id)
    assert container["oom_kills"] == 1
    if script is SLOW:
        assert event["history_of"] == "container"
        memory = [point[3] for point in event["history"] if point[3] is not None]
        assert len(memory) >= 3, event["history"]
        assert memory[-1] > memory[0] + 8 * (1 << 20), memory  # it grew by more than 8 MiB before the kill
        # ... and the victim's own RSS alongside, over the same minute. From its smallest: a tick can land
        # between fork and exec, when the child still has pytest's RSS (seen: 143 MiB, then 14 MiB).
        rss = [point[3] for point in event["victim_history"] if point[3] is not None]
        assert len(rss) >= 3 and rss[-1] > min(rss) + 8 * (1 << 20), event["victim_history"]


@pytest.mark.parametrize("v2", [True, False], ids=["v1-and-cgroup2", "v1-only"])
def test_kill_in_a_docker_container_is_attributed_in_the_snapshot(v2: bool) -> None:
    """Docker's shape, also as a v1-only runtime leaves it (no cgroup2 directory: the victim's cgroup2
    path is the root, which must not hide the container the kernel log names)."""
    container_id = uuid.uuid4().hex + uuid.uuid4().hex
    doc, pid = kill_in_live_source(f"{unique_name()}/docker/{container_id}", FAST, v2=v2)
    event = next((e for e in doc["oom_events"] if e["victim_pid"] == pid), None)
    assert event is not None, doc["oom_events"]
    assert event["cgroup_path"] == doc["_cgroup_path"] and event["container_id"] == container_id
    assert not event["pod_uid"]
    assert event["constraint"] == "memcg" and event["memcg_limit_bytes"] == LIMIT
    assert event["memcg_path"] == doc["_cgroup_path"]
