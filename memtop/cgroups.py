"""Which cgroup layout this host uses, and where the memory controller lives.

Hosts differ: pure cgroup v2 (cgroup2 at /sys/fs/cgroup), pure v1 (one mount per controller) and the
systemd "hybrid" mix (v1 controllers plus cgroup2 at /sys/fs/cgroup/unified, usually without the memory
controller). Detection is a pure function of the mounts text so every layout can be tested anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CGROUP_ROOT = "/sys/fs/cgroup"

LayoutKind = Literal["v1", "v2", "hybrid", "none"]


@dataclass(frozen=True)
class CgroupLayout:
    kind: LayoutKind
    v1_memory_root: str | None  # mount point of the v1 memory controller hierarchy
    v2_root: str | None  # mount point of the cgroup2 hierarchy


def _unescape(field: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as octal (\\040 and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def detect_layout(mounts_text: str) -> CgroupLayout:
    """Classify the cgroup layout from the text of /proc/self/mounts (or /proc/mounts)."""
    v1_memory_root: str | None = None
    has_v1 = False
    v2_roots: list[str] = []
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mount_point, fstype, options = _unescape(parts[1]), parts[2], parts[3].split(",")
        if fstype == "cgroup":
            has_v1 = True
            if "memory" in options and v1_memory_root is None:
                v1_memory_root = mount_point
        elif fstype == "cgroup2":
            v2_roots.append(mount_point)

    v2_root = CGROUP_ROOT if CGROUP_ROOT in v2_roots else (v2_roots[0] if v2_roots else None)
    kind: LayoutKind
    if v2_root is not None and (v2_root == CGROUP_ROOT or not has_v1):
        kind = "v2"
    elif v2_root is not None:
        kind = "hybrid"
    elif has_v1:
        kind = "v1"
    else:
        kind = "none"
    return CgroupLayout(kind=kind, v1_memory_root=v1_memory_root, v2_root=v2_root)


def current_layout() -> CgroupLayout:
    """The layout seen by this process (its mount namespace)."""
    try:
        return detect_layout(Path("/proc/self/mounts").read_text())
    except OSError:
        return CgroupLayout(kind="none", v1_memory_root=None, v2_root=None)


def hierarchy_id(proc_cgroups_text: str, controller: str = "memory") -> int:
    """The v1 hierarchy id of `controller` from the text of /proc/cgroups; 0 when it is on cgroup2 (or
    absent, or disabled). The id is what the cgroup:cgroup_attach_task tracepoint calls dst_root."""
    for line in proc_cgroups_text.splitlines():
        fields = line.split()
        if line.startswith("#") or len(fields) < 4 or fields[0] != controller:
            continue
        try:
            hierarchy, enabled = int(fields[1]), int(fields[3])
        except ValueError:
            return 0
        return hierarchy if enabled and hierarchy > 0 else 0
    return 0


def current_memory_hierarchy_id() -> int:
    try:
        return hierarchy_id(Path("/proc/cgroups").read_text())
    except OSError:
        return 0


def v2_controllers(v2_root: str) -> list[str]:
    """Controllers enabled at the root of a cgroup2 hierarchy; empty when unreadable."""
    try:
        return (Path(v2_root) / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def proc_cgroup_paths(text: str) -> tuple[str, str]:
    """(memory controller path, cgroup2 path) from the text of /proc/PID/cgroup; "" where absent.

    On a hybrid host a process has both: the v1 memory hierarchy's path and the unified one's.
    """
    memory = unified = ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "memory" in controllers.split(",") and not memory:
            memory = path
    return memory, unified


def running_cgroup_ids(
    root: str, hierarchy: Literal["memory", "unified"], proc_root: str = "/proc"
) -> Iterator[tuple[int, int, str]]:
    """(pid, cgroup id, path) of every process running now, in the memory controller's hierarchy or the
    cgroup2 one mounted at `root`. The id is the cgroup directory's inode number: what the kernel's
    tracepoints and bpf_get_current_cgroup_id() call it. Processes that exit, or whose cgroup is removed,
    while we look are left out. For probes that must know the processes that predate their attach."""
    ids_by_path: dict[str, int] = {}
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        try:
            memory, unified = proc_cgroup_paths(Path(entry.path, "cgroup").read_text())
        except OSError:
            continue
        path = memory if hierarchy == "memory" else unified
        if not path:
            continue
        cgroup_id = ids_by_path.get(path)
        if cgroup_id is None:
            try:
                cgroup_id = os.stat(os.path.join(root, path.lstrip("/")), follow_symlinks=False).st_ino
            except (OSError, ValueError):
                continue
            ids_by_path[path] = cgroup_id
        yield int(entry.name), cgroup_id, path
