"""detect_layout on mounts texts captured from real hosts of each kind."""

from __future__ import annotations

import os
from pathlib import Path

from memtop.cgroups import CgroupLayout, current_layout, detect_layout, hierarchy_id, running_cgroup_ids

V2 = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
none /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
"""

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
"""

V1 = """\
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
"""

NONE = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
"""


def test_v2() -> None:
    assert detect_layout(V2) == CgroupLayout("v2", None, "/sys/fs/cgroup")


def test_hybrid() -> None:
    assert detect_layout(HYBRID) == CgroupLayout("hybrid", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified")


def test_v1() -> None:
    assert detect_layout(V1) == CgroupLayout("v1", "/sys/fs/cgroup/memory", None)


def test_none() -> None:
    assert detect_layout(NONE) == CgroupLayout("none", None, None)
    assert detect_layout("") == CgroupLayout("none", None, None)


def test_v1_memory_sharing_a_hierarchy_and_escaped_mount_point() -> None:
    text = "cgroup /cg\\040roups/mem,cpu cgroup rw,memory,cpu 0 0\n"
    assert detect_layout(text) == CgroupLayout("v1", "/cg roups/mem,cpu", None)


def test_memory_as_substring_of_an_option_is_not_the_memory_controller() -> None:
    text = "cgroup /sys/fs/cgroup/x cgroup rw,name=memory_like 0 0\n"
    assert detect_layout(text).v1_memory_root is None


def test_cgroup2_elsewhere_without_v1_is_v2() -> None:
    assert detect_layout("cgroup2 /mnt/cg2 cgroup2 rw 0 0\n") == CgroupLayout("v2", None, "/mnt/cg2")


def test_current_layout_reads_this_host() -> None:
    assert current_layout().kind in ("v1", "v2", "hybrid", "none")


# /proc/cgroups of this hybrid host (memory on v1 hierarchy 4), and of a pure cgroup2 host.
PROC_CGROUPS_HYBRID = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
cpu\t1\t1\t1
memory\t4\t97\t1
net_cls\t0\t2\t1
pids\t8\t1\t1
"""
PROC_CGROUPS_V2 = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t0\t143\t1
memory\t0\t143\t1
"""


def test_memory_hierarchy_id() -> None:
    assert hierarchy_id(PROC_CGROUPS_HYBRID) == 4
    assert hierarchy_id(PROC_CGROUPS_HYBRID, "pids") == 8
    assert hierarchy_id(PROC_CGROUPS_V2) == 0  # on cgroup2
    assert hierarchy_id(PROC_CGROUPS_HYBRID.replace("memory\t4\t97\t1", "memory\t4\t97\t0")) == 0  # disabled
    assert hierarchy_id("#subsys_name\thierarchy\n") == 0  # no memory controller at all
    assert hierarchy_id("memory\tx\t1\t1\n") == 0  # garbage
    assert hierarchy_id("memoryless\t4\t1\t1\n") == 0


def test_running_cgroup_ids_of_each_hierarchy(tmp_path: Path) -> None:
    proc, memory, unified = tmp_path / "proc", tmp_path / "memory", tmp_path / "unified"
    for d in (memory / "docker" / "abc", unified / "user.slice"):
        d.mkdir(parents=True)
    for pid, text in {
        "10": "4:memory:/docker/abc\n0::/user.slice\n",
        "11": "4:memory:/docker/abc\n0::/user.slice\n",
        "12": "4:memory:/gone\n0::/\n",  # its memory cgroup was removed meanwhile
        "13": "0::/user.slice\n",  # no v1 memory line (a pure cgroup2 view)
    }.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "cgroup").write_text(text)
    (proc / "self").mkdir()  # not a pid
    (proc / "14").mkdir()  # exited: no cgroup file
    docker = os.stat(memory / "docker" / "abc").st_ino
    assert sorted(running_cgroup_ids(str(memory), "memory", str(proc))) == [
        (10, docker, "/docker/abc"),
        (11, docker, "/docker/abc"),
    ]
    slice_id, root_id = os.stat(unified / "user.slice").st_ino, os.stat(unified).st_ino
    assert sorted(running_cgroup_ids(str(unified), "unified", str(proc))) == [
        (10, slice_id, "/user.slice"),
        (11, slice_id, "/user.slice"),
        (12, root_id, "/"),
        (13, slice_id, "/user.slice"),
    ]
