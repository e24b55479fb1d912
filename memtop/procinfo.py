"""Every live process, read from /proc at a cost that stays flat per tick. Never used by views.

A busy container host runs thousands of processes, and every /proc file a tracer opens costs the kernel a
seq_file page (a 4 KiB kmalloc) and a path walk: reading each process's files on every tick made memtop
the busiest kmalloc user of the host it watched. So:

- what does not change for a process identity (PID, start time) is read once: name and start time from
  /proc/PID/stat, the command line from /proc/PID/cmdline, the owner from the /proc/PID inode, the cgroup
  from /proc/PID/cgroup (again when the kernel says the process was moved or exec'd);
- what changes (RSS, VMS) comes from /proc/PID/statm through a file descriptor kept open for the process's
  life and re-read with pread() at offset 0: the seq_file keeps its buffer, so a tick allocates nothing in
  the kernel. The descriptor pins the process's struct pid, so a read after the process was reaped fails
  with ESRCH even when the PID number has been reused: that is how an exit is seen;
- the list of PIDs is one readdir of /proc per tick.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import resource
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from memtop.cgroups import proc_cgroup_paths
from memtop.containers import ContainerRef, container_of_proc_cgroup
from memtop.model import KernelIdentity, ProcInfo

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000  # task flags bit of kernel threads (/proc/PID/stat field 9; stable uapi-visible)
FD_RESERVE = 512  # descriptors left for everything else (BPF maps and programs, the terminal, files)
# A process whose statm read the same several times is read less often, up to every QUIET_MAX_SKIP+1
# ticks: most processes of a busy host hold their RSS for long stretches (exits are still seen at once,
# from the /proc listing; an exec or a cgroup move, from the kernel's word, forces a read).
QUIET_MAX_SKIP = 4


def parse_proc_cgroup(text: str) -> str:
    """The memory controller's path if the process has one (v1), else its cgroup2 path."""
    memory, unified = proc_cgroup_paths(text)
    return memory or unified


@dataclass(frozen=True)
class StatFields:
    """The fields memtop takes from /proc/PID/stat (proc(5))."""

    comm: str
    state: str
    ppid: int
    flags: int
    threads: int
    start_ticks: int  # clock ticks after boot


def parse_stat(text: str) -> StatFields | None:
    """/proc/PID/stat text -> its fields; None when it is not one. The name is between the first '(' and
    the LAST ')' (a name may itself contain ') ')."""
    open_, close = text.find("("), text.rfind(")")
    if open_ < 0 or close < open_:
        return None
    rest = text[close + 2 :].split()
    try:
        # rest[0] is field 3 (state); field N is rest[N - 3]
        return StatFields(
            comm=text[open_ + 1 : close],
            state=rest[0],
            ppid=int(rest[1]),
            flags=int(rest[6]),
            threads=int(rest[17]),
            start_ticks=int(rest[19]),
        )
    except (IndexError, ValueError):
        return None


def parse_statm(data: bytes) -> tuple[int, int] | None:
    """/proc/PID/statm -> (vms bytes, rss bytes); None when it is not one."""
    fields = data.split(None, 2)
    try:
        return int(fields[0]) * PAGE_SIZE, int(fields[1]) * PAGE_SIZE
    except (IndexError, ValueError):
        return None


_STATE_NAMES = {
    "R": "running",
    "S": "sleeping",
    "D": "disk-sleep",
    "T": "stopped",
    "t": "tracing-stop",
    "Z": "zombie",
    "X": "dead",
    "I": "idle",
    "P": "parked",
    "W": "waking",
}


def boot_time(proc_root: Path = Path("/proc")) -> float:
    """The boot time in seconds since the epoch (/proc/stat btime), as psutil computes it."""
    try:
        for line in (proc_root / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards `wanted` (never above the hard limit); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


@dataclass
class _Proc:
    info: ProcInfo
    statm_fd: int = -1  # -1: no descriptor kept (over the budget): open and close per read
    kernel_ids: tuple[int, int] = (0, 0)  # the kernel's (cgroup2 id, v1 memcg id) when last placed
    kernel_name: tuple[int, str] | None = None  # the kernel's (exec count, name) when last named
    kernel_seen: KernelIdentity | None = (
        None  # the kernel's identity last compared (the same object: no news)
    )
    statm: bytes = b""  # the last /proc/PID/statm read: unchanged bytes mean an unchanged process
    quiet: int = 0  # reads in a row that found statm unchanged
    skip: int = 0  # ticks to leave out before statm is read again (a quiet process is read less often)
    read_at: int = 0  # the scan (ProcScanner._tick) that reads it next


class ProcScanner:
    """The live processes of this host, scanned once per tick (see the module docstring for the cost).

    `scan()` returns {pid: ProcInfo} for every process alive now (kernel threads included, with no RSS),
    zombies excluded (they have exited; only their parent has not reaped them). Not thread-safe: one
    collector calls it.
    """

    def __init__(self, proc_root: Path = Path("/proc"), max_fds: int | None = None) -> None:
        self.proc_root = proc_root
        self._root = str(proc_root)
        self._boot = boot_time(proc_root)
        self._procs: dict[int, _Proc] = {}
        self._users: dict[int, str] = {}
        self._placements: dict[bytes, tuple[str, ContainerRef | None]] = {}  # cgroup text -> placement
        limit = raise_fd_limit(65536) if max_fds is None else max_fds + FD_RESERVE
        self._fd_budget = max(0, limit - FD_RESERVE)
        self._fds_open = 0
        self._out: dict[int, ProcInfo] = {}  # what the last scan returned
        self._tick = 0  # scans made
        self._due: dict[int, list[int]] = {}  # scan number -> PIDs to read then (stale entries are skipped)
        self._kernel_last: Mapping[int, KernelIdentity] = {}  # the kernel's word at the last scan
        # Counters of the work done, for tests and the benchmark (the cost per tick must stay flat).
        self.files_opened = 0

    def __len__(self) -> int:
        return len(self._procs)

    def close(self) -> None:
        """Close every kept descriptor (safe to call twice)."""
        for proc in self._procs.values():
            self._drop_fd(proc)
        self._procs.clear()
        self._out.clear()
        self._due.clear()

    def __del__(self) -> None:  # pragma: no cover - a safety net; close() is the API
        with contextlib.suppress(Exception):
            self.close()

    # -- the tick ---------------------------------------------------------------------------------------

    def scan(
        self,
        kernel: Mapping[int, KernelIdentity] | None = None,
        discover_budget_s: float | None = None,
        refresh: Iterable[int] = (),
    ) -> dict[int, ProcInfo]:
        """Every live process now.

        `kernel` maps a tgid to what the kmalloc probe's kernel entry says of it (KmallocReading's
        identities): a change of its cgroup ids re-reads the process's cgroup, a change of its exec count
        or generation its name and command line (an exec replaces them; the kmalloc probe counts execs at
        sched:sched_process_exec). Compared by identity first: an unchanged entry is the same object.
        `discover_budget_s`: stop reading new processes' static facts after this long (they are left out
        of this scan and read by the next): a first scan of thousands of processes draws its first
        screen sooner. Only for scans whose result nobody takes as "the others exited". `refresh`: PIDs
        read now even if quiet (the kernel saw their process die and the PID reused).
        """
        forced = set(refresh)
        deadline = time.monotonic() + discover_budget_s if discover_budget_s is not None else None
        kernel = kernel or {}
        try:
            names = os.listdir(self._root)
        except OSError:
            return {}
        pids = list(map(int, filter(str.isdigit, names)))  # C-level loops: thousands of names a tick
        listed = set(pids)
        procs, out = self._procs, self._out
        for pid in procs.keys() - listed:  # listed no more: exited and reaped
            self._forget(pid)
        self._tick += 1
        # Only some processes need a look this tick, picked with set operations in C: the new ones, those
        # due for a read (read_at, see _schedule), those the kernel says something of that it did not say
        # at the last scan, and those asked for. The others (most of a busy host) keep their last reading.
        news = {pid for pid, _identity in kernel.items() - self._kernel_last.items()}
        self._kernel_last = kernel
        look = (listed - procs.keys()) | news | forced
        look.update(self._due.pop(self._tick, ()))
        try:
            self._look(pids, look, kernel, forced, deadline)
        except BaseException:  # what was due and not read yet is due at the next scan
            self._due.setdefault(self._tick + 1, []).extend(look)
            raise
        return dict(out)

    def _look(
        self,
        pids: list[int],
        look: set[int],
        kernel: Mapping[int, KernelIdentity],
        forced: set[int],
        deadline: float | None,
    ) -> None:
        procs, out = self._procs, self._out
        ids: tuple[int, int] | None
        kname: tuple[int, str] | None
        info: ProcInfo | None
        for pid in filter(look.__contains__, pids):  # in listing order (a first scan's budget cuts it)
            proc = procs.get(pid)
            seen = kernel.get(pid)
            if proc is not None:
                if seen is None or seen is proc.kernel_seen:  # nothing new from the kernel
                    ids = kname = None
                    has_news = False
                else:
                    proc.kernel_seen = seen
                    ids, kname = (seen[1], seen[3]), (seen[4] | seen[5] << 32, seen[0])
                    has_news = kname != proc.kernel_name or (ids != proc.kernel_ids and any(ids))
                if proc.read_at > self._tick and not has_news and pid not in forced:
                    continue  # quiet, and the kernel says nothing new of it: its last reading stays
                info = self._refresh(pid, proc, ids, kname)
            elif deadline is not None and time.monotonic() > deadline:
                continue
            else:
                ids = kname = None
                if seen is not None:
                    ids, kname = (seen[1], seen[3]), (seen[4] | seen[5] << 32, seen[0])
                info = self._discover(pid, ids, kname)
            proc = procs.get(pid)
            if proc is not None:  # a zombie too (read again now and then until it is reaped)
                self._schedule(pid, proc)
            if info is None:
                out.pop(pid, None)
            else:
                out[pid] = info

    def _schedule(self, pid: int, proc: _Proc) -> None:
        """Read `pid` again at the tick after next `proc.skip` ticks (a quiet process less often)."""
        proc.read_at = self._tick + 1 + proc.skip
        self._due.setdefault(proc.read_at, []).append(pid)

    def read(self, pid: int) -> ProcInfo | None:
        """One process now (for a PID asked for by a user); None if it does not exist."""
        proc = self._procs.get(pid)
        info = self._refresh(pid, proc, None, None) if proc is not None else self._discover(pid, None, None)
        proc = self._procs.get(pid)
        if proc is not None:  # known now: the scans look at it from the next on (a new one is not "new" then)
            self._schedule(pid, proc)
            if info is not None:
                self._out[pid] = info
        return info

    # -- internals --------------------------------------------------------------------------------------

    def _refresh(
        self, pid: int, proc: _Proc, ids: tuple[int, int] | None, name: tuple[int, str] | None
    ) -> ProcInfo | None:
        if proc.statm_fd >= 0:
            try:
                data = os.pread(proc.statm_fd, 256, 0)
            except OSError as exc:
                if exc.errno not in (errno.ESRCH, errno.ENOENT, errno.EINVAL, errno.EIO):
                    raise
                data = b""
            if (
                data == proc.statm
                and data
                and (name is None or name == proc.kernel_name)
                and (ids is None or ids == proc.kernel_ids or not any(ids))
            ):
                # Unchanged again: read it less often (every 2nd, 3rd, ... up to QUIET_MAX_SKIP+1th tick).
                proc.quiet += 1
                proc.skip = min(QUIET_MAX_SKIP, proc.quiet // 2)
                return proc.info if _alive(proc.info) else None
            proc.quiet = proc.skip = 0
            statm = parse_statm(data) if data else None
            if data:
                proc.statm = data
        else:
            statm = self._read_statm(pid, proc)
        if statm is None:  # reaped (ESRCH through the kept descriptor): maybe a new process has the PID
            self._forget(pid)
            return self._discover(pid, ids, name)
        info = proc.info
        if name is not None and name != proc.kernel_name and not self._same_name(proc, name):
            fresh = self._read_static(pid)  # exec'd: a new name and command line
            if fresh is None or fresh.start_time != info.start_time:
                self._forget(pid)
                return self._discover(pid, ids, name)
            info = replace(info, comm=fresh.comm, cmdline=fresh.cmdline, user=fresh.user)
            ids = ids or proc.kernel_ids
            proc.kernel_ids = (-1, -1)  # re-place too: a runtime's exec follows its move into the cgroup
        if ids is not None and any(ids) and ids != proc.kernel_ids:
            try:
                text = _read_file(f"{self._root}/{pid}/cgroup")
            except OSError:  # gone meanwhile: the next scan sees it
                text = b""
            self.files_opened += 1
            if text:
                path, container = self._placement(text)
                info = replace(info, cgroup_path=path, container=container)
            proc.kernel_ids = ids
        vms, rss = statm
        if not info.kernel_thread and rss == 0 and vms == 0:  # its mm is gone: a zombie or exiting
            proc.info = replace(info, rss_bytes=0, vms_bytes=0)
            return None
        if not info.kernel_thread and (rss != info.rss_bytes or vms != info.vms_bytes):
            info = replace(info, rss_bytes=rss, vms_bytes=vms)
        proc.info = info
        return info

    def _read_statm(self, pid: int, proc: _Proc) -> tuple[int, int] | None:
        if proc.statm_fd < 0:
            try:
                with open(f"{self._root}/{pid}/statm", "rb") as f:
                    self.files_opened += 1
                    data = f.read()
            except OSError:
                return None
            return parse_statm(data) or (0, 0)
        try:
            data = os.pread(proc.statm_fd, 256, 0)
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL, errno.EIO):
                return None
            raise
        return parse_statm(data) or (0, 0)

    def _read_static(self, pid: int, with_cgroup: bool = False) -> ProcInfo | None:
        """Name, start, owner, command line (and, asked, the cgroup) of `pid`; None when it is gone.
        Plain os.open/os.read: Python's buffered open() was most of a first scan's cost."""
        base = f"{self._root}/{pid}"
        try:
            stat = parse_stat(_read_file(f"{base}/stat").decode("utf-8", "replace"))
            raw = _read_file(f"{base}/cmdline")
            uid = os.stat(base).st_uid
            cgroup = _read_file(f"{base}/cgroup") if with_cgroup else b""
        except OSError:
            return None
        finally:
            self.files_opened += 3 if with_cgroup else 2
        if stat is None:
            return None
        path, container = self._placement(cgroup) if with_cgroup else ("", None)
        kthread = bool(stat.flags & PF_KTHREAD)
        cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        return ProcInfo(
            pid=pid,
            start_time=self._boot + stat.start_ticks / CLOCK_TICKS,
            comm=stat.comm,
            cmdline=cmdline or (f"[{stat.comm}]" if kthread else ""),
            user=self._user(uid),
            state=_STATE_NAMES.get(stat.state, stat.state),
            threads=stat.threads,
            ppid=stat.ppid,
            kernel_thread=kthread,
            cgroup_path=path,
            container=container,
        )

    def _placement(self, cgroup_text: bytes) -> tuple[str, ContainerRef | None]:
        """(cgroup path, container) of a /proc/PID/cgroup text; most processes share a few texts."""
        found = self._placements.get(cgroup_text)
        if found is None:
            text = cgroup_text.decode("utf-8", "replace")
            found = (parse_proc_cgroup(text), container_of_proc_cgroup(text))
            if len(self._placements) > 4096:
                self._placements.clear()
            self._placements[cgroup_text] = found
        return found

    @staticmethod
    def _same_name(proc: _Proc, name: tuple[int, str]) -> bool:
        """Whether the kernel's (exec count, name), seen for the first time, says nothing new (records
        it either way: a later change is an exec)."""
        first = proc.kernel_name is None
        proc.kernel_name = name
        return first and name[-1] == proc.info.comm[: len(name[-1])]

    def _discover(
        self, pid: int, ids: tuple[int, int] | None, name: tuple[int, str] | None
    ) -> ProcInfo | None:
        info = self._read_static(pid, with_cgroup=True)
        if info is None or info.state == "zombie":
            return None
        proc = _Proc(info=info, kernel_ids=ids or (0, 0), kernel_name=name)
        if self._fds_open < self._fd_budget:
            try:
                proc.statm_fd = os.open(f"{self._root}/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
                self._fds_open += 1
                self.files_opened += 1
            except OSError:
                return None
        statm = self._read_statm(pid, proc)
        if statm is None:
            self._drop_fd(proc)
            return None
        vms, rss = statm
        if not info.kernel_thread:
            if rss == 0 and vms == 0:
                self._drop_fd(proc)
                return None
            object.__setattr__(info, "rss_bytes", rss)  # our own new record: set before anyone sees it
            object.__setattr__(info, "vms_bytes", vms)
        proc.info = info
        self._procs[pid] = proc
        return info

    def _forget(self, pid: int) -> None:
        self._out.pop(pid, None)
        proc = self._procs.pop(pid, None)
        if proc is not None:
            self._drop_fd(proc)

    def _drop_fd(self, proc: _Proc) -> None:
        if proc.statm_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(proc.statm_fd)
            proc.statm_fd = -1
            self._fds_open -= 1

    def _user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:  # a uid with no passwd entry (common inside containers)
                name = str(uid)
            self._users[uid] = name
        return name


def _alive(info: ProcInfo) -> bool:
    """A kept reading is of a live process: a kernel thread, or one with an address space (a zombie's
    statm reads all zeros, and its reading was kept with rss and vms 0)."""
    return info.kernel_thread or bool(info.rss_bytes or info.vms_bytes)


def _read_file(path: str, size: int = 1 << 16) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)
