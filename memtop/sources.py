"""Sources of Snapshots: LiveSource (probes on this kernel), ReplaySource (a snapshot file) and, in
memtop/recording.py, RecordingSource (a recording database).

The UI and the headless exporter only ever call tick(), set_focus() and close(); they cannot tell
which source they have, which is how the UI is tested without root.
"""

from __future__ import annotations

import platform
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import psutil

from memtop.config import Config
from memtop.containers import parse_cgroup_path
from memtop.errors import MemtopError
from memtop.export import read_snapshot
from memtop.leaks import LeakRow
from memtop.model import IRQ_TGID, KmallocReading, ProbeStatus
from memtop.oom import OomEvent
from memtop.store import HostInfo, ProcessKey, Snapshot, Store

if TYPE_CHECKING:
    from memtop.probes.base import Probe
    from memtop.probes.leaks import UserLeakProbe

R = TypeVar("R")


class Source(Protocol):
    live: bool

    def tick(self, include_histories: bool = False) -> Snapshot: ...

    def set_focus(self, key: ProcessKey | None) -> None: ...

    def set_focus_container(self, container_id: str | None) -> None: ...

    def set_interval(self, interval_s: float) -> None: ...

    def set_tail_min_bytes(self, min_bytes: int) -> None: ...

    def start_user_leaks(self, pid: int) -> None: ...

    def stop_user_leaks(self) -> None: ...

    def set_leak_older(self, older_s: float) -> None: ...

    def close(self) -> None: ...


def host_info() -> HostInfo:
    try:
        boot: float | None = psutil.boot_time()
    except (OSError, RuntimeError):
        boot = None
    return HostInfo(hostname=socket.gethostname(), kernel=platform.release(), boot_time=boot)


class LiveSource:
    """Probes on the running kernel, read on every tick. Thread-safe: the UI sets focus from its thread."""

    live = True

    def __init__(self, config: Config) -> None:
        from memtop.cgroups import current_layout, current_memory_hierarchy_id
        from memtop.containers import CgroupIdResolver, RuntimeRoots
        from memtop.containerwatch import ContainerWatcher
        from memtop.probes.kmalloc import KmallocProbe  # the probe layer is the only one importing bcc
        from memtop.probes.leaks import KernelLeakProbe
        from memtop.probes.oom import OomProbe
        from memtop.probes.tcp import TcpProbe
        from memtop.procinfo import ProcReader

        self.config = config
        layout = current_layout()
        self.cgroup_ids = CgroupIdResolver(layout.v2_root)
        self.memcg_ids = CgroupIdResolver(layout.v1_memory_root)  # v1 ids are directory inodes too
        self.containers = ContainerWatcher(layout, RuntimeRoots.from_overrides(dict(config.runtime_roots)))
        self.kmalloc = KmallocProbe(
            sample_every=config.sample_every,
            max_pids=config.max_pids,
            resolve_cgroup_id=self.cgroup_ids.path,
            memcg_hierarchy=current_memory_hierarchy_id() if layout.v1_memory_root else 0,
            v1_memory_root=layout.v1_memory_root,
            resolve_memcg_id=self.memcg_ids.path,
        )
        self.oom = OomProbe(resolve_cgroup_id=self.cgroup_ids.path)
        self.tcp = TcpProbe(slow_ms=config.tcp_slow_ms)
        self.leaks = KernelLeakProbe(sample_every=config.leak_sample, page_level=config.leak_pages)
        self.user_leaks: Probe | None = None  # UserLeakProbe of one process, while asked for
        self.probes: list[Probe] = [self.kmalloc, self.oom, self.tcp, self.leaks]
        self.procs = ProcReader()
        self.store = Store(host_info(), started_at=time.time(), interval_s=config.interval_s)
        self._lock = threading.Lock()
        self._focus: ProcessKey | None = None

    def start(self) -> None:
        """Start every probe; one that fails is marked with its reason. Raises if none could start, or
        if what was asked for cannot be done (--leaks-pid); then every probe started is detached."""
        user_leaks = None
        if self.config.leaks_pid is not None:
            from memtop.probes.leaks import UserLeakProbe

            user_leaks = UserLeakProbe(self.config.leaks_pid)  # checks the PID before anything compiles
        try:
            self._start(user_leaks)
        except BaseException:
            self.close()
            raise

    def _start(self, user_leaks: UserLeakProbe | None) -> None:
        errors = []
        for probe in self.probes:
            try:
                probe.start()
            except MemtopError as exc:
                probe.status = ProbeStatus("error", str(exc))
                errors.append(str(exc))
            self.store.probes[probe.name] = probe.status
        if not any(p.running for p in self.probes):
            raise MemtopError("; ".join(errors) or "no probe could start")
        if self.oom.running:
            self.store.add_oom_backlog(self._attribute_oom(e) for e in self.oom.backlog())
        self.store.leak_older_s = self.config.older_s
        if user_leaks is not None:
            self._track_user_leaks(user_leaks)
        if self.tcp.running:
            self.store.tcp_slow_ms = self.config.tcp_slow_ms
            if self.config.tcp_pids:
                self.tcp.set_pid_filter(self.config.tcp_pids)
        self.store.restart_clock(time.time())  # compiling took a while: count from attach time

    def _read(self, probe: Probe, read: Callable[[], R]) -> R | None:
        """A probe's reading, or None when it is not running; a probe whose read fails is marked with
        the reason and the others keep going."""
        if not probe.running:
            return None
        try:
            return read()
        except Exception as exc:  # BCC raises bare Exception; keep the rest of the dashboard alive
            probe.status = ProbeStatus("error", f"read failed: {exc.__class__.__name__}: {exc}")
            probe.close()
            return None

    def _attribute_oom(self, event: OomEvent) -> OomEvent:
        """The victim's container, pod and names, looked up right away (the container may go soon)."""
        ref = parse_cgroup_path(event.cgroup_path) if event.cgroup_path else None
        if ref is None:
            return event
        meta = self.containers.metadata.lookup(ref)
        return replace(
            event,
            container_id=ref.container_id,
            pod_uid=ref.pod_uid,
            pod_name=meta.pod_name,
            namespace=meta.namespace,
        )

    def tick(self, include_histories: bool = False) -> Snapshot:
        with self._lock:
            now = time.time()
            reading = self._read(self.kmalloc, self.kmalloc.read) or KmallocReading({})
            procs = {
                tgid: None
                if tgid == IRQ_TGID
                else self.procs.read(tgid, (counters.cgroup_id, counters.memcg_id))
                for tgid, counters in reading.per_tgid.items()
            }
            forget = self.store.ingest(now, reading, procs)
            self.store.set_containers(self.containers.states(self.store.container_refs().values()))
            oom = self._read(self.oom, self.oom.read)
            if oom is not None:
                self.store.ingest_oom(replace(oom, events=tuple(self._attribute_oom(e) for e in oom.events)))
            tcp = self._read(self.tcp, self.tcp.read)
            if tcp is not None:
                self.store.ingest_tcp(now, tcp)
                self.store.set_cgroup_paths({i: self.cgroup_ids.path(i) for i in self.store.cgroup_ids()})
            leaks = self._read(self.leaks, self.leaks.read)
            if leaks is not None:
                self.store.ingest_leaks(now, leaks)
            self._read_user_leaks(now)
            if self.kmalloc.running:
                self.kmalloc.forget(forget)
            for pid in forget:
                self.procs.forget(pid)
            if self._focus is not None and self.kmalloc.running:
                self.store.set_focus_reading(self._read(self.kmalloc, self.kmalloc.read_focus))
            for probe in self.probes:
                self.store.probes[probe.name] = probe.status
            if self.user_leaks is not None:
                self.store.probes[self.user_leaks.name] = self.user_leaks.status
            return self.store.snapshot(now, include_histories=include_histories)

    def set_focus(self, key: ProcessKey | None) -> None:
        with self._lock:
            self._focus = key
            pid = key.pid if key is not None and key.pid != IRQ_TGID else None
            if self.kmalloc.running:
                self.kmalloc.set_focus(pid, self.config.tail_min_bytes if pid else None)
            self.store.set_focus(key)

    def set_focus_container(self, container_id: str | None) -> None:
        with self._lock:
            self.store.focus_container = container_id

    # -- user-space leak tracking of one process ----------------------------------------------------

    def start_user_leaks(self, pid: int) -> None:
        """Track `pid`'s own allocator (uprobes); replaces any process tracked before. Raises MemtopError
        (one line) when it cannot: no such process, no allocator found, uprobes refused."""
        from memtop.probes.leaks import UserLeakProbe

        self._track_user_leaks(UserLeakProbe(pid))  # validates the pid before compiling anything

    def _track_user_leaks(self, probe: UserLeakProbe) -> None:
        probe.start()  # compiles outside the lock: ticks go on meanwhile
        with self._lock:
            self._stop_user_leaks()
            self.user_leaks = probe
            self.store.leak_user_pid = probe.pid
            self.store.probes[probe.name] = probe.status

    def stop_user_leaks(self) -> None:
        with self._lock:
            self._stop_user_leaks()

    def _stop_user_leaks(self) -> None:
        if self.user_leaks is not None:
            self.user_leaks.close()
            self.store.probes.pop(self.user_leaks.name, None)
            self.user_leaks = None
            self.store.forget_user_leaks()

    def _read_user_leaks(self, now: float) -> None:
        probe = self.user_leaks
        if probe is None:
            return
        if not getattr(probe, "alive", True):  # the process exited: detach its uprobes
            pid = self.store.leak_user_pid
            self._stop_user_leaks()
            self.store.probes["leaks-user"] = ProbeStatus("stopped", f"PID {pid} exited")
            return
        reading = self._read(probe, probe.read)  # type: ignore[attr-defined]
        if reading is not None:
            self.store.ingest_leaks(now, reading)

    def set_leak_older(self, older_s: float) -> None:
        with self._lock:
            self.store.leak_older_s = older_s

    def set_interval(self, interval_s: float) -> None:
        self.store.interval_s = interval_s

    def set_tail_min_bytes(self, min_bytes: int) -> None:
        with self._lock:
            self.config = replace(self.config, tail_min_bytes=min_bytes)
            pid = self._focus.pid if self._focus is not None and self._focus.pid != IRQ_TGID else None
            if pid and self.kmalloc.running:
                self.kmalloc.set_focus(pid, min_bytes)

    def close(self) -> None:
        """Detach every probe (safe to call more than once)."""
        with self._lock:
            self._stop_user_leaks()
            for probe in self.probes:
                probe.close()


def open_replay(path: Path, at: float | None = None) -> Source:
    """--replay: a recording database (told by its content, not its name) or a snapshot file."""
    from memtop.recording import RecordingSource, is_sqlite

    if is_sqlite(path):
        return RecordingSource(path, at)
    if at is not None:
        raise MemtopError(f"--at needs a recording database; {path} is not one (a snapshot holds one time)")
    return ReplaySource(path)


class ReplaySource:
    """A snapshot file, shown as it was taken: paused, marked as replay."""

    live = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.snapshot = read_snapshot(path)
        self._focus: ProcessKey | None = None
        self._older_s = 0.0

    def tick(self, include_histories: bool = False) -> Snapshot:
        snap = self.snapshot
        focus = None
        if self._focus is not None:
            if snap.focus is not None and snap.focus.key.pid == self._focus.pid:
                focus = replace(snap.focus, key=self._focus)
            else:
                from memtop.store import FocusDetail

                focus = FocusDetail(self._focus, snap.histories.get(self._focus, ()), None)
        leaks = self._old_enough(snap.leaks)
        if focus is not None and focus.leaks is not None:
            focus = replace(focus, leaks=self._old_enough(focus.leaks))
        return replace(snap, focus=focus, leaks=leaks, leak_older_s=self._older_s or snap.leak_older_s)

    def _old_enough(self, rows: tuple[LeakRow, ...]) -> tuple[LeakRow, ...]:
        """A recording has no ages per allocation: with an age filter, hide stacks whose oldest is younger."""
        if not self._older_s:
            return rows
        return tuple(r for r in rows if r.oldest_age_s is not None and r.oldest_age_s >= self._older_s)

    def set_focus(self, key: ProcessKey | None) -> None:
        self._focus = key

    def set_focus_container(self, container_id: str | None) -> None:
        pass  # a recording holds the histories it was written with

    def set_interval(self, interval_s: float) -> None:
        pass

    def set_tail_min_bytes(self, min_bytes: int) -> None:
        pass  # a recording's tail is what it is

    def start_user_leaks(self, pid: int) -> None:
        raise MemtopError("replay: a recording cannot start tracking a process")

    def stop_user_leaks(self) -> None:
        pass

    def set_leak_older(self, older_s: float) -> None:
        self._older_s = older_s

    def close(self) -> None:
        pass
