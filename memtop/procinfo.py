"""What /proc says about a process (psutil), read by the live source on each tick. Never used by views."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psutil

from memtop.cgroups import proc_cgroup_paths
from memtop.containers import ContainerRef, container_of_proc_cgroup
from memtop.model import ProcInfo


def cgroup_of(pid: int, proc_root: Path = Path("/proc")) -> tuple[str, ContainerRef | None]:
    """The process's cgroup (the v1 memory controller's path if mounted, else the unified one) and its
    container, looked for in every hierarchy it is in (a runtime may place it in only some of them)."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return "", None
    return parse_proc_cgroup(text), container_of_proc_cgroup(text)


def parse_proc_cgroup(text: str) -> str:
    """The memory controller's path if the process has one (v1), else its cgroup2 path."""
    memory, unified = proc_cgroup_paths(text)
    return memory or unified


class ProcReader:
    """Reads ProcInfo for PIDs, caching psutil handles so static fields are read once per process."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[psutil.Process, ProcInfo]] = {}
        self._cgroup_ids: dict[int, tuple[int, int]] = {}

    def read(self, pid: int, cgroup_ids: tuple[int, int] = (0, 0)) -> ProcInfo | None:
        """Fresh info for `pid`, or None if no such process is running now.

        Static fields are read once per process; its cgroup again whenever `cgroup_ids` (the kernel's
        view: cgroup2 id and v1 memory cgroup id, refreshed at exec) change, since runtimes move a process
        into its container's cgroup after fork.
        """
        cached = self._cache.get(pid)
        try:
            if cached is not None:
                proc, static = cached
                if not proc.is_running():  # gone, or the PID now belongs to another process
                    del self._cache[pid]
                    return self.read(pid, cgroup_ids)
                if any(cgroup_ids) and self._cgroup_ids.get(pid, cgroup_ids) != cgroup_ids:
                    path, container = cgroup_of(pid)
                    static = replace(static, cgroup_path=path, container=container)
                    self._cache[pid] = (proc, static)
                self._cgroup_ids[pid] = cgroup_ids
            else:
                proc = psutil.Process(pid)
                path, container = cgroup_of(pid)
                with proc.oneshot():
                    static = ProcInfo(
                        pid=pid,
                        start_time=proc.create_time(),
                        comm=proc.name(),
                        cmdline=" ".join(proc.cmdline()),
                        user=_username(proc),
                        cgroup_path=path,
                        container=container,
                    )
                self._cache[pid] = (proc, static)
                self._cgroup_ids[pid] = cgroup_ids
            with proc.oneshot():
                state = proc.status()
                if state == psutil.STATUS_ZOMBIE:  # it has exited; only its parent has not reaped it yet
                    self.forget(pid)
                    return None
                mem = proc.memory_info()
                return ProcInfo(
                    pid=pid,
                    start_time=static.start_time,
                    comm=static.comm,
                    cmdline=static.cmdline,
                    user=static.user,
                    state=state,
                    rss_bytes=mem.rss,
                    vms_bytes=mem.vms,
                    threads=proc.num_threads(),
                    cgroup_path=static.cgroup_path,
                    container=static.container,
                )
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self.forget(pid)
            return None
        except psutil.AccessDenied:
            return None

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)
        self._cgroup_ids.pop(pid, None)


def _username(proc: psutil.Process) -> str:
    try:
        return proc.username()
    except (KeyError, psutil.Error):  # a uid with no passwd entry (common inside containers)
        try:
            return str(proc.uids().real)
        except psutil.Error:
            return ""
