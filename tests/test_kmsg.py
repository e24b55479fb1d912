"""OOM kills from kernel log lines (recorded from several kernel versions), the memory cgroup counters that
tell a cgroup limit from a system-wide OOM, and the OOM probe's handling of its ring buffer records.

None of this needs root or BPF: the recorded logs are in tests/data/kmsg/, the cgroup trees are made in
tmp_path, and the probe's callbacks are fed ctypes records directly.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
from pathlib import Path

import pytest

from memtop import oom
from memtop.oom import (
    KmsgOomParser,
    MemcgOomTracker,
    OomEvent,
    parse_kmsg,
    read_kmsg_backlog,
    split_log_line,
)

from .conftest import DATA

KMSG = DATA / "kmsg"
BOOT = 1_700_000_000.0
KiB = 1024
MiB = 1 << 20


def events_of(name: str) -> list[OomEvent]:
    return parse_kmsg((KMSG / name).read_text(errors="replace").splitlines(), BOOT)


# -- recorded logs, oldest kernel first ------------------------------------------------------------------


def test_3_10_old_kill_lines_sacrificed_child_and_task_in_line() -> None:
    """3.10 (RHEL 7), dmesg -T: "Kill process ... or sacrifice child", then a child is killed."""
    (ev,) = events_of("3.10-el7-memcg-dmesg-T.txt")
    pod = "/kubepods/pod95387fa4-da9c-11e7-9d36-5254b24cbf5e/"
    assert ev.victim_pid == 28438 and ev.victim_comm == "java"  # the child actually killed
    assert ev.source == "kmsg"
    assert ev.trigger_pid == 24590 and ev.trigger_comm == "java"
    assert ev.constraint == "memcg"
    assert ev.cgroup_path.startswith(pod) and ev.memcg_path == ev.cgroup_path
    assert ev.memcg_limit_bytes == ev.memcg_usage_bytes == 524288 * KiB  # memory+swap is unlimited
    assert ev.total_vm_bytes == 20255636 * KiB and ev.anon_rss_bytes == 466160 * KiB
    assert ev.file_rss_bytes == 13684 * KiB
    assert ev.shmem_rss_bytes is None and ev.pgtables_bytes is None and ev.uid is None  # not in 3.10
    # dmesg -T carries the wall clock (local time; TZ=UTC in tests)
    assert ev.time == pytest.approx(1512605115.0)


def test_4_19_docker_memcg_with_reaper() -> None:
    (ev,) = events_of("4.19-memcg-v1-docker.txt")
    docker = "/docker/2f0d5c1e8b7a4d3c9e6f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d"
    assert (ev.victim_pid, ev.victim_comm, ev.trigger_pid, ev.trigger_comm) == (
        4312,
        "stress",
        4312,
        "stress",
    )
    assert ev.constraint == "memcg" and ev.cgroup_path == docker and ev.memcg_path == docker
    assert ev.memcg_limit_bytes == 262144 * KiB
    assert ev.anon_rss_bytes == 260648 * KiB and ev.shmem_rss_bytes == 0
    assert ev.time == pytest.approx(BOOT + 5012.551166)
    assert ev.reaped_at == pytest.approx(BOOT + 5012.562284)


def test_5_4_syslog_kubepods_then_a_rate_limited_kill_without_header() -> None:
    first, second = events_of("5.4-kubepods-v1-syslog.txt")
    pod = "/kubepods/burstable/pod7f1c2d3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f/"
    assert first.victim_pid == 63214 and first.trigger_pid == 63635 and first.trigger_comm == "uwsgi"
    assert first.constraint == "memcg" and first.cgroup_path.startswith(pod)
    assert first.memcg_path == first.cgroup_path and first.memcg_limit_bytes == 409600 * KiB
    assert (first.uid, first.oom_score_adj, first.pgtables_bytes) == (0, 986, 1372 * KiB)
    assert first.reaped_at == pytest.approx(BOOT + 7093.563325)
    # The next kill printed no header (rate limit): it must not inherit the first kill's context.
    assert second.victim_pid == 63101 and second.constraint == "memcg"
    assert second.trigger_pid is None and second.cgroup_path == "" and second.memcg_limit_bytes is None
    assert second.reaped_at is None


def test_5_15_cgroup_v2_oom_group_kills_every_task_of_the_container() -> None:
    sh, java = events_of("5.15-kubepods-v2-oom-group.txt")
    scope = (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3c4d5e6f_7a8b_4c9d_8e0f_1a2b3c4d5e6f"
        ".slice/cri-containerd-9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0.scope"
    )
    for ev in (sh, java):
        assert ev.constraint == "memcg" and ev.memcg_path == scope and ev.cgroup_path == scope
        assert ev.trigger_pid == 1893412 and ev.memcg_limit_bytes == 1 << 30 and ev.uid == 1000
    assert (sh.victim_pid, sh.victim_comm, java.victim_pid, java.victim_comm) == (
        1893380,
        "sh",
        1893390,
        "java",
    )
    assert java.anon_rss_bytes == 1035220 * KiB and java.oom_score_adj == -997
    assert java.reaped_at is not None and sh.reaped_at is None


def test_6_1_global_oom() -> None:
    (ev,) = events_of("6.1-global-oom.txt")
    assert (ev.victim_pid, ev.victim_comm, ev.trigger_pid, ev.trigger_comm) == (5188, "python3", 5120, "node")
    assert ev.constraint == "global"
    assert (
        ev.cgroup_path == "/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-code-4410.scope"
    )
    assert ev.memcg_path == "" and ev.memcg_limit_bytes is None and ev.memcg_usage_bytes is None
    assert ev.anon_rss_bytes == 15484952 * KiB and ev.uid == 1000 and ev.oom_score_adj == 200


def test_6_8_raw_kmsg_records_escapes_truncation_and_garbage() -> None:
    """Raw /dev/kmsg records: multi-line records escaped as \\x0a, device property lines, a summary line cut
    short, and garbage."""
    docker, cut_short, truncated_kill = events_of("6.8-docker-v2-kmsg.txt")
    scope = "/system.slice/docker-" + "3e9b1f0c7d2a" * 5 + "3e9b.scope"
    assert docker.victim_pid == 2211 and docker.constraint == "memcg" and docker.cgroup_path == scope
    assert docker.memcg_limit_bytes == 64 * MiB and docker.anon_rss_bytes == 65008 * KiB
    assert docker.time == pytest.approx(BOOT + 90213.551150)
    # The oom-kill: line lost its end: what was whole (the limit's cgroup) is kept, the cut path is not.
    assert cut_short.victim_pid == 2405 and cut_short.victim_comm == "stress-ng-vm"
    assert cut_short.trigger_pid == 2402 and cut_short.constraint == "memcg"
    assert cut_short.memcg_path == "/system.slice/docker-" + "c0ffee12" * 8 + ".scope"
    assert cut_short.cgroup_path == "" and cut_short.memcg_limit_bytes == 128 * MiB
    # A kill line cut right after the pid still says who was killed.
    assert truncated_kill.victim_pid == 77 and truncated_kill.constraint == "global"
    assert truncated_kill.victim_comm == "" and truncated_kill.anon_rss_bytes is None


def test_6_18_this_machine() -> None:
    """Recorded on the development VM (6.18, hybrid cgroups, v1 memory) after the end-to-end kills: a fast
    allocator in a docker-shaped cgroup, then a holder killed because another process pushed its pod over."""
    docker, kubepods = events_of("6.18-this-machine-kmsg.txt")
    assert (docker.victim_pid, docker.victim_comm, docker.trigger_pid) == (4808, "python", 4808)
    assert docker.constraint == "memcg" and docker.cgroup_path == docker.memcg_path
    assert docker.cgroup_path.startswith("/memtop-test-887a9a00/docker/")
    assert docker.memcg_limit_bytes == docker.memcg_usage_bytes == 48 * MiB
    assert (docker.anon_rss_bytes, docker.file_rss_bytes, docker.pgtables_bytes) == (
        48896 * KiB,
        5416 * KiB,
        152 * KiB,
    )
    assert (kubepods.victim_pid, kubepods.trigger_pid, kubepods.trigger_comm) == (4815, 4816, "python")
    assert kubepods.cgroup_path.startswith("/memtop-test-a64a7714/kubepods/burstable/pod23f8aefa-")
    assert kubepods.constraint == "memcg" and kubepods.anon_rss_bytes == 29184 * KiB


def test_kmsg_records_and_dmesg_text_give_the_same_events() -> None:
    """The same kill written as a /dev/kmsg record and as dmesg text gives the same event."""
    kmsg_lines = (KMSG / "6.8-docker-v2-kmsg.txt").read_text().splitlines()[:24]
    dmesg_lines = []
    for line in kmsg_lines:
        mono, _wall, texts = split_log_line(line)
        if mono is not None:
            dmesg_lines += [f"[{mono:12.6f}] {t}" for t in texts]
    assert parse_kmsg(kmsg_lines, BOOT) == parse_kmsg(dmesg_lines, BOOT)


# -- robustness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        [],
        [""],
        ["\x00\xff\xfe"],
        ["Killed process"],
        ["Killed process x (y) total-vm:zzkB"],
        ["oom-kill:"],
        ["oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg="],
        ["x invoked oom-killer: "] * 3,
        ["6,1,2,-;" + "\\x" * 10],
        ["[ 99999999999999999999.1] Out of memory: Killed process 1 (a) total-vm:1kB"],
        [b"Out of memory: Killed process 5 (a) total-vm:1kB\xff"],  # bytes are accepted too
        [None, 3, object()],  # type: ignore[list-item]
    ],
)
def test_garbage_never_raises(lines: list) -> None:  # type: ignore[type-arg]
    events = parse_kmsg(lines, BOOT)
    assert all(isinstance(e, OomEvent) for e in events)


def test_unrelated_warnings_do_not_become_the_trigger() -> None:
    lines = [
        "[ 1.0] CPU: 0 PID: 99 Comm: kworker/0:1 Not tainted 6.1.0 #1",  # a WARN before any OOM
        "[ 2.0] a invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "[ 2.0] CPU: 1 UID: 0 PID: 42 Comm: a b c Not tainted 6.12.0 #1",  # 6.11+ prints UID; comm has spaces
        "[ 2.1] Out of memory: Killed process 43 (victim) total-vm:4kB, anon-rss:4kB, file-rss:0kB",
    ]
    (ev,) = parse_kmsg(lines, BOOT)
    assert (ev.trigger_pid, ev.trigger_comm, ev.victim_comm) == (42, "a", "victim")


def test_comm_with_parentheses_and_comma_cpu_lists() -> None:
    lines = [
        "[ 5.0] (sd-pam) invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "[ 5.0] oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=0-1,3,cpuset=/,mems_allowed=0,2,"
        "oom_memcg=/a,b,task_memcg=/a,b/c,task=(sd-pam),pid=7,uid=1000",
        "[ 5.0] Memory cgroup out of memory: Killed process 7 ((sd-pam)) total-vm:10kB, anon-rss:2kB, "
        "file-rss:1kB, shmem-rss:0kB, UID:1000 pgtables:4kB oom_score_adj:100",
    ]
    (ev,) = parse_kmsg(lines, BOOT)
    assert ev.victim_comm == "(sd-pam)" and ev.memcg_path == "/a,b" and ev.cgroup_path == "/a,b/c"
    assert ev.uid == 1000 and ev.oom_score_adj == 100 and ev.anon_rss_bytes == 2 * KiB


def test_cpuset_constraint_is_named() -> None:
    lines = [
        "[ 5.0] oom-kill:constraint=CONSTRAINT_CPUSET,nodemask=(null),cpuset=/x,mems_allowed=1,global_oom,"
        "task_memcg=/x,task=a,pid=7,uid=0",
        "[ 5.0] Out of memory: Killed process 7 (a) total-vm:10kB, anon-rss:2kB, file-rss:1kB, shmem-rss:0kB",
    ]
    (ev,) = parse_kmsg(lines, BOOT)
    assert ev.constraint == "cpuset" and ev.memcg_path == "" and ev.cgroup_path == "/x"


def test_sharing_same_memory_lines_are_not_separate_kills() -> None:
    lines = [
        "[ 5.0] Out of memory: Killed process 7 (a) total-vm:10kB, anon-rss:2kB, file-rss:1kB, shmem-rss:0kB",
        "[ 5.0] Killed process 8 (b) sharing same memory",
    ]
    assert [e.victim_pid for e in parse_kmsg(lines, BOOT)] == [7]


def test_live_parser_hands_out_the_summary_before_the_kill_line() -> None:
    """The kernel prints oom-kill: before marking the victim, the kill line after: the live probe takes the
    summary by pid, once, and not for a different command (a reused pid)."""
    parser = KmsgOomParser(BOOT)
    for line in (KMSG / "6.8-docker-v2-kmsg.txt").read_text().splitlines()[:18]:  # up to oom-kill:
        parser.feed(line)
    assert parser.events == []
    assert parser.take_context(2211, "bash") is None
    parser.feed(
        "6,41228,90213551119,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,"
        "mems_allowed=0,oom_memcg=/a,task_memcg=/a/b,task=python3,pid=2211,uid=0"
    )
    ctx = parser.take_context(2211, "python3")
    assert ctx is not None and ctx.constraint == "memcg" and ctx.cgroup_path == "/a/b"
    assert ctx.memcg_path == "/a" and ctx.trigger_pid == 2211
    assert parser.take_context(2211, "python3") is None


# -- reading /dev/kmsg -----------------------------------------------------------------------------------


def test_backlog_of_a_missing_log_says_why(tmp_path: Path) -> None:
    records, problem = read_kmsg_backlog(str(tmp_path / "nope"))
    assert records == [] and "No such file" in problem


def test_backlog_skips_overwritten_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """EPIPE: the record at our position was overwritten; the next read returns the next record."""
    script: list[bytes | BaseException] = [
        b"6,1,10,-;first\n SUBSYSTEM=x\n",
        OSError(errno.EPIPE, "Broken pipe"),
        b"6,5,20,-;after the gap\n",
        BlockingIOError(errno.EAGAIN, "again"),
    ]

    def fake_read(_fd: int, _n: int) -> bytes:
        item = script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(oom.os, "open", lambda *_a, **_k: 99)
    monkeypatch.setattr(oom.os, "read", fake_read)
    monkeypatch.setattr(oom.os, "close", lambda _fd: None)
    reader = oom.KmsgReader("/dev/kmsg")
    assert reader.read_available() == ["6,1,10,-;first", "6,5,20,-;after the gap"]
    assert reader.overwritten == 1 and reader.problem == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="/dev/kmsg needs root (or CAP_SYSLOG)")
def test_backlog_of_this_kernel_is_records() -> None:
    records, problem = read_kmsg_backlog(max_records=50)
    assert problem == "" and 0 < len(records) <= 50
    assert all(oom._KMSG_RECORD.match(r) for r in records)
    parse_kmsg(records, oom.kmsg_boot_time())  # whatever is there parses


# -- which limit was hit: memory cgroup counters -----------------------------------------------------------


class FakeMemcgs:
    """A memory cgroup tree in tmp_path with the files the kernel shows (v1 or v2)."""

    def __init__(self, root: Path, v1: bool) -> None:
        self.root, self.v1 = root, v1

    def set(self, path: str, **values: int | str) -> None:
        d = self.root / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        cur = dict(getattr(self, "_vals", {}).get(path, {}))
        cur.update(values)
        self.__dict__.setdefault("_vals", {})[path] = cur
        if self.v1:
            files = {
                "memory.oom_control": f"oom_kill_disable 0\nunder_oom 0\noom_kill {cur.get('oom_kill', 0)}\n",
                "memory.limit_in_bytes": str(cur.get("limit", 9223372036854771712)),
                "memory.usage_in_bytes": str(cur.get("usage", 0)),
                "memory.max_usage_in_bytes": str(cur.get("peak", 0)),
                "memory.failcnt": str(cur.get("failcnt", 0)),
            }
        else:
            files = {
                "memory.events": f"low 0\nhigh 0\nmax 0\noom {cur.get('oom', 0)}\n"
                f"oom_kill {cur.get('oom_kill', 0)}\noom_group_kill 0\n",
                "memory.max": str(cur.get("limit", "max")),
                "memory.current": str(cur.get("usage", 0)),
            }
        for name, text in files.items():
            (d / name).write_text(text)


def v2_tree(tmp_path: Path) -> tuple[FakeMemcgs, MemcgOomTracker]:
    t = FakeMemcgs(tmp_path, v1=False)
    t.set("/kubepods", limit=8 << 30)
    t.set("/kubepods/pod1", limit=256 * MiB)
    t.set("/kubepods/pod1/ctr", limit=128 * MiB)
    t.set("/kubepods/pod1/other")
    tracker = MemcgOomTracker(str(tmp_path), v1=False)
    assert tracker.prime() == 4
    return t, tracker


def test_v2_container_limit(tmp_path: Path) -> None:
    t, tracker = v2_tree(tmp_path)
    # the container's own limit: "oom" counted there and (hierarchically) above, never below
    for path in ("/kubepods/pod1/ctr", "/kubepods/pod1", "/kubepods"):
        t.set(path, oom=1, oom_kill=1)
    t.set("/kubepods/pod1/ctr", usage=128 * MiB)
    cause = tracker.cause("/kubepods/pod1/ctr", now=0.0)
    assert cause == oom.OomCause("memcg", "/kubepods/pod1/ctr", 128 * MiB, 128 * MiB)
    assert tracker.cause("/kubepods/pod1/ctr", now=60.0).constraint == ""  # nothing new since: unknown


def test_v2_pod_limit_above_the_container(tmp_path: Path) -> None:
    t, tracker = v2_tree(tmp_path)
    t.set("/kubepods/pod1/ctr", oom_kill=1)
    t.set("/kubepods/pod1", oom=1, oom_kill=1)
    t.set("/kubepods", oom=1, oom_kill=1)
    assert tracker.cause("/kubepods/pod1/ctr").memcg_path == "/kubepods/pod1"


def test_v2_global_oom_of_a_limited_container(tmp_path: Path) -> None:
    t, tracker = v2_tree(tmp_path)
    for path in ("/kubepods/pod1/ctr", "/kubepods/pod1", "/kubepods"):
        t.set(path, oom_kill=1)  # a kill, but no cgroup's limit was hit
    assert tracker.cause("/kubepods/pod1/ctr") == oom.OomCause("global")


def test_v2_cgroup_made_after_priming_counts_its_first_oom(tmp_path: Path) -> None:
    t, tracker = v2_tree(tmp_path)
    t.set("/kubepods/pod1/new", limit=32 * MiB, oom=1, oom_kill=1)
    assert tracker.cause("/kubepods/pod1/new").memcg_path == "/kubepods/pod1/new"


def test_v2_oom_group_victims_share_the_cause(tmp_path: Path) -> None:
    """memory.oom.group: one OOM ("oom" +1), several kills; the later victims are inside the same cgroup."""
    t, tracker = v2_tree(tmp_path)
    for path in ("/kubepods/pod1/ctr", "/kubepods/pod1", "/kubepods"):
        t.set(path, oom=1, oom_kill=2)
    first = tracker.cause("/kubepods/pod1/ctr", now=100.0)
    assert first.memcg_path == "/kubepods/pod1/ctr"
    assert tracker.cause("/kubepods/pod1/ctr", now=100.1) == first
    assert tracker.cause("/kubepods/pod1/other", now=100.2).constraint == ""  # not inside that cgroup
    assert tracker.cause("/kubepods/pod1/ctr", now=110.0).constraint == ""  # long after: not the same OOM


def test_root_victims_and_gone_cgroups(tmp_path: Path) -> None:
    _t, tracker = v2_tree(tmp_path)
    assert tracker.cause("/").constraint == "global"
    assert tracker.cause("/gone/away") == oom.OomCause()
    assert MemcgOomTracker(None, v1=False).cause("/a") == oom.OomCause()


def v1_tree(tmp_path: Path) -> tuple[FakeMemcgs, MemcgOomTracker]:
    t = FakeMemcgs(tmp_path, v1=True)
    t.set("/docker")
    t.set("/docker/a", limit=64 * MiB, peak=10 * MiB)
    t.set("/pod", limit=256 * MiB, peak=10 * MiB)
    t.set("/pod/ctr", peak=10 * MiB)
    tracker = MemcgOomTracker(str(tmp_path), v1=True)
    tracker.prime()
    return t, tracker


def test_v1_leaf_limit_without_failcnt(tmp_path: Path) -> None:
    """Recent kernels leave v1 failcnt at 0: the peak newly at the limit tells."""
    t, tracker = v1_tree(tmp_path)
    t.set("/docker/a", oom_kill=1, peak=64 * MiB, usage=64 * MiB - 4096)
    assert tracker.cause("/docker/a") == oom.OomCause("memcg", "/docker/a", 64 * MiB, 64 * MiB - 4096)
    # a second OOM: the peak was already there; the victim's own oom_kill grew and its peak reached the limit
    t.set("/docker/a", oom_kill=2)
    assert tracker.cause("/docker/a").memcg_path == "/docker/a"


def test_v1_parent_limit(tmp_path: Path) -> None:
    t, tracker = v1_tree(tmp_path)
    t.set("/pod/ctr", oom_kill=1, peak=250 * MiB)  # v1 counts the kill only where the victim lives
    t.set("/pod", peak=256 * MiB)
    assert tracker.cause("/pod/ctr").memcg_path == "/pod"


def test_v1_failcnt_on_kernels_that_count_it(tmp_path: Path) -> None:
    t, tracker = v1_tree(tmp_path)
    t.set("/pod", failcnt=3)
    t.set("/pod/ctr", oom_kill=1)
    assert tracker.cause("/pod/ctr").memcg_path == "/pod"


def test_v1_global_oom_of_a_limited_container(tmp_path: Path) -> None:
    t, tracker = v1_tree(tmp_path)
    t.set("/docker/a", oom_kill=1, peak=20 * MiB)  # killed, far below its limit
    assert tracker.cause("/docker/a") == oom.OomCause("global")


def test_v1_memsw_limit_only(tmp_path: Path) -> None:
    d = tmp_path / "sw"
    d.mkdir()
    for name, value in {
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        "memory.limit_in_bytes": "9223372036854771712",
        "memory.usage_in_bytes": "1000",
        "memory.max_usage_in_bytes": "2000",
        "memory.memsw.limit_in_bytes": str(32 * MiB),
        "memory.memsw.usage_in_bytes": str(32 * MiB),
        "memory.memsw.max_usage_in_bytes": str(32 * MiB),
    }.items():
        (d / name).write_text(value)
    state = oom.read_memcg_state(d, v1=True)
    assert state is not None and state.limit_bytes == 32 * MiB and state.reached_limit()
    assert MemcgOomTracker(str(tmp_path), v1=True).cause("/sw").memcg_path == "/sw"


def test_proc_cgroup_lines(tmp_path: Path) -> None:
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "cgroup").write_text(
        "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpu,cpuacct:/x\n0::/unified/path\n"
    )
    assert oom.memory_cgroup_of(12, str(tmp_path)) == ("/process_api/abc", "/unified/path")
    assert oom.memory_cgroup_of(13, str(tmp_path)) == ("", "")


# -- the probe's ring buffer handling (no BPF: records are fed to its callbacks) ---------------------------


def fed_probe(tmp_path: Path, known: dict[int, str] | None = None):  # type: ignore[no-untyped-def]
    from memtop.probes.oom import VICTIM_FIELDS, OomProbe

    probe = OomProbe(resolve_cgroup_id=lambda i: (known or {}).get(i, ""))
    probe.fields = VICTIM_FIELDS
    probe._boot_offset = 1000.0
    return probe


def victim_record(pid: int, **fields: object):  # type: ignore[no-untyped-def]
    from memtop.probes.oom import KIND_VICTIM, _Event

    raw = _Event(kind=KIND_VICTIM, victim_pid=pid, ts_ns=5_000_000_000, trigger_pid=pid, trigger_tid=pid)
    raw.victim_comm = b"hog"
    raw.trigger_comm = b"hog"
    raw.anon_rss_kb = 1000
    for name, value in fields.items():
        setattr(raw, name, value)
    return raw


def feed(probe, raw) -> None:  # type: ignore[no-untyped-def]
    probe._on_event(None, ctypes.addressof(raw), ctypes.sizeof(raw))


def test_probe_event_fields_and_units(tmp_path: Path) -> None:
    probe = fed_probe(tmp_path, {77: "/docker/abc"})
    feed(probe, victim_record(4242, victim_cgroup_id=77, victim_cgroup_from=1, oom_score_adj=-5, uid=1000))
    (ev,) = probe.read().events
    assert (ev.source, ev.victim_pid, ev.victim_comm, ev.trigger_pid) == ("tracepoint", 4242, "hog", 4242)
    assert ev.time == pytest.approx(1005.0)
    assert ev.anon_rss_bytes == 1000 * KiB and ev.oom_score_adj == -5 and ev.uid == 1000
    assert ev.cgroup_path == "/docker/abc" and probe.attributed_by == {"current": 1}
    assert probe.read().events == ()


def test_probe_pid_only_kernel_leaves_the_rest_unknown(tmp_path: Path) -> None:
    probe = fed_probe(tmp_path)
    probe.fields = ()
    feed(probe, victim_record(4242))
    (ev,) = probe.read().events
    assert ev.victim_comm == "" and ev.anon_rss_bytes is None and ev.uid is None and ev.oom_score_adj is None
    assert ev.total_vm_bytes is None and ev.pgtables_bytes is None


def test_probe_reaping_updates_the_victim_before_and_after_it_was_read(tmp_path: Path) -> None:
    from memtop.probes.oom import KIND_REAPED, _Event

    probe = fed_probe(tmp_path)
    feed(probe, victim_record(1))
    feed(probe, victim_record(2))
    feed(probe, _Event(kind=KIND_REAPED, victim_pid=1, ts_ns=6_000_000_000))
    first = probe.read()
    assert [e.reaped_at for e in first.events] == [pytest.approx(1006.0), None]
    feed(probe, _Event(kind=KIND_REAPED, victim_pid=2, ts_ns=7_000_000_000))
    later = probe.read()
    assert later.events == ()
    (updated,) = later.reaped
    assert updated.key == first.events[1].key and updated.reaped_at == pytest.approx(1007.0)
    assert dataclasses.replace(updated, reaped_at=None) == first.events[1]


def test_probe_names_cgroups_from_their_mkdir_even_after_removal(tmp_path: Path) -> None:
    from memtop.probes.oom import KIND_CGROUP, _CgroupEvent

    probe = fed_probe(tmp_path)  # the resolver knows nothing (the cgroup is gone)
    mkdir = _CgroupEvent(kind=KIND_CGROUP, level=3, id=991, path=b"/kubepods/podx/ctr")
    probe._on_cgroup_event(None, ctypes.addressof(mkdir), ctypes.sizeof(mkdir))
    feed(probe, victim_record(5, victim_cgroup_id=991, victim_cgroup_from=2, trigger_pid=6, trigger_tid=6))
    (ev,) = probe.read().events
    assert ev.cgroup_path == "/kubepods/podx/ctr" and probe.attributed_by == {"task_map": 1}


def test_probe_cflags_follow_the_tracepoint_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel whose mark_victim has only the pid (before 6.8) and no optional tracepoints."""
    from memtop.probes.oom import OomProbe

    fake = tmp_path / "tracing"
    (fake / "events" / "oom" / "mark_victim").mkdir(parents=True)
    (fake / "events" / "oom" / "mark_victim" / "format").write_text(PID_ONLY_FORMAT)
    monkeypatch.setenv("MEMTOP_TRACEFS", str(fake))
    probe = OomProbe()
    flags = probe.cflags()
    assert "-DHAVE_COMM=0" in flags and "-DHAVE_ANON_RSS=0" in flags and "-DHAVE_REAPING_TP=0" in flags
    assert "-DHAVE_FORK_TP=0" in flags and "-DHAVE_CGROUP_MKDIR_TP=0" in flags
    assert probe.fields == ()
    monkeypatch.setenv("MEMTOP_TRACEFS", "/sys/kernel/tracing")
    if os.access("/sys/kernel/tracing/events/oom/mark_victim/format", os.R_OK):  # this kernel: 6.8 or later
        assert "-DHAVE_COMM=1" in OomProbe().cflags()


PID_ONLY_FORMAT = """name: mark_victim
ID: 499
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;

print fmt: "pid=%d", REC->pid
"""


@pytest.mark.parametrize("from_where", [1, 2], ids=["current", "task_map"])
def test_probe_v1_only_container_is_named_by_the_kernel_log_not_the_cgroup2_root(
    tmp_path: Path, from_where: int
) -> None:
    """The memory controller on v1 and a runtime that placed the victim only in v1 hierarchies: its
    cgroup2 id resolves to "/", which exists in the v1 tree too but says nothing; the kernel log's
    task_memcg names the container."""
    container = "ab" * 32
    (tmp_path / "t" / "docker" / container).mkdir(parents=True)
    probe = fed_probe(tmp_path, {1: "/"})
    probe._v1_memory = True
    probe._tracker = MemcgOomTracker(str(tmp_path), v1=True)
    probe._kmsg_parser = KmsgOomParser(BOOT)
    probe._kmsg_parser.feed(
        "6,41228,90213551119,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
        f"oom_memcg=/t/docker/{container},task_memcg=/t/docker/{container},task=hog,pid=4242,uid=0"
    )
    feed(probe, victim_record(4242, victim_cgroup_id=1, victim_cgroup_from=from_where))
    (ev,) = probe.read().events
    assert ev.cgroup_path == f"/t/docker/{container}" and probe.attributed_by == {"kmsg": 1}
    assert ev.constraint == "memcg" and ev.memcg_path == f"/t/docker/{container}"


def test_v1_victim_by_counters_is_the_cgroup_whose_own_oom_kill_grew(tmp_path: Path) -> None:
    """No log line and no cgroup from the kernel or /proc: the memory cgroup whose own oom_kill count grew
    is the victim's (issue #13, fault 6); each kill is counted once."""
    t, tracker = v1_tree(tmp_path)
    assert tracker.victim_by_counters() == ""  # nothing grew since prime
    t.set("/docker/a", oom_kill=1, peak=64 * MiB)
    assert tracker.victim_by_counters() == "/docker/a"
    assert tracker.victim_by_counters() == ""  # that kill was counted
    t.set("/docker/a", oom_kill=2)
    assert tracker.cause("/docker/a").memcg_path == "/docker/a"  # the cause's read is remembered too
    assert tracker.victim_by_counters() == ""
    t.set("/docker/a", oom_kill=3)
    t.set("/new", oom_kill=4)  # first seen, with kills: only when no known count grew
    assert tracker.victim_by_counters() == "/docker/a"
    t.set("/late/x", oom_kill=1)
    assert tracker.victim_by_counters() == "/late/x"
    assert MemcgOomTracker(str(tmp_path), v1=False).victim_by_counters() == ""
