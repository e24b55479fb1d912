"""Sources of Snapshots: LiveSource (probes on this kernel), ReplaySource (a snapshot file) and, in
memtop/recording.py, RecordingSource (a recording database).

The UI and the headless exporter only ever call tick(), set_focus() and close(); they cannot tell
which source they have, which is how the UI is tested without root.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
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
from memtop.errors import MemtopError
from memtop.export import read_snapshot
from memtop.leaks import LeakRow
from memtop.model import IRQ_TGID, ProbeStatus
from memtop.oom import OomEvent
from memtop.readonly import ReadOnlySource
from memtop.store import HostInfo, ProcessKey, Snapshot, Store

if TYPE_CHECKING:
    from memtop.probes.base import Probe
    from memtop.probes.leaks import UserLeakProbe

R = TypeVar("R")
CLOSE_LOCK_WAIT_S = 1.0
FIRST_SCAN_BUDGET_S = 0.2  # per tick, reading new processes while no kmalloc counts arrive yet
STARTER_NICE = 10  # the probe-starting thread's nice value (Linux sets it per thread)
# The kernel leak aggregates (thousands of stacks x processes on a busy host) are read every tick only while
# a view shows them (set_leaks_visible), otherwise at most this often: a tick's cost stays flat.
LEAK_READ_EVERY_S = 5.0
# Python's cycle collector, tuned for a collector that makes and drops tens of thousands of objects a tick
# (rows, counters): at the default gen-0 threshold of 700 a tick at 5,000 processes ran about 37 collections
# (15 of its 90 ms), each gen-2 one walking every long-lived object. The tick's objects are freed by
# reference counting; the cycles some libraries make (Textual, asyncio) are still collected, less often.
# What exists once the probes are attached (modules, BCC, the UI) is frozen out of later collections.
# Measured in the TUI at 5,000 busy processes (gc.DEBUG_SAVEALL): about 100 cyclic objects a second (Textual's
# strips and caches, workers), a gen-0 collection about every minute: the memory they hold is small.
GC_GEN0_THRESHOLD = 50_000


# glibc keeps what the collector and the UI free (thousands of rows' buffers a tick, from two threads'
# arenas) for reuse, and on a host whose processes come and go that free space fragments: in a one-hour
# soak at 5,000 processes (10 % replaced a minute) the TUI's RSS crept up by 22.7 MiB after the first 5
# minutes, in steps, while the memory Python's objects held grew by about 5 MiB (tracemalloc).
# malloc_trim(0) returns the free pages of every arena to the kernel (about 0.1 ms); the collector calls it
# this often. With it (and the leak probes' read buffers kept, see mapread.py) a 13-minute soak held
# 223.9 MiB at 5 minutes (267.4 before both) and grew 8.7 MiB in the 8 minutes after (12.8 before).
MALLOC_TRIM_EVERY_S = 30.0
# glibc gives a block of M_MMAP_THRESHOLD or more that its arena has no free space for a mapping of its own,
# returned to the kernel on free, rather than growing the arena; but after the first such free it raises the
# threshold to that block's size (up to 32 MiB), and from then on blocks that big grow the arenas. The leak
# probe's map reads are such blocks (megabytes each, a little bigger at every read while its maps fill).
# In a 15-minute soak at 5,000 processes the arenas grew 3.1 MiB in the 3.5 minutes after the fifth, of
# which 2.2 MiB free (mallinfo2); with the threshold fixed (which also turns the raising off) they stayed
# within 0.8 MiB from the fifth minute to the fifteenth.
MALLOC_MMAP_THRESHOLD_BYTES = 256 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt()'s parameter number (malloc.h)


def _libc_malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def fix_mmap_threshold(threshold: int = MALLOC_MMAP_THRESHOLD_BYTES) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold): a block of `threshold` bytes or more that no arena has free
    space for gets a mapping of its own instead of growing the arena, from now on (glibc no longer raises
    the threshold; see MALLOC_MMAP_THRESHOLD_BYTES). False where the C library has no mallopt (musl) or
    refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


class HeapTrimmer:
    """Calls malloc_trim(0) at most every `every_s` seconds (see MALLOC_TRIM_EVERY_S)."""

    def __init__(
        self, every_s: float = MALLOC_TRIM_EVERY_S, trim: Callable[[], object] | None = None
    ) -> None:
        self.every_s = every_s
        self._trim = trim if trim is not None else _libc_malloc_trim()
        self._last = time.monotonic()
        self.trims = 0

    def maybe_trim(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self._trim is None or now - self._last < self.every_s:
            return False
        self._last = now
        self._trim()
        self.trims += 1
        return True


def tune_gc(freeze: bool = False) -> None:
    """Collect cycles less often; with `freeze`, first collect, then leave every object that exists now
    out of later collections."""
    if freeze:
        gc.collect()
        gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(_gen0, GC_GEN0_THRESHOLD), gen1, gen2)


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

    def set_leaks_visible(self, visible: bool) -> None: ...

    def close(self, exiting: bool = False) -> None: ...


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
        from memtop.procinfo import ProcScanner

        self.config = config
        tune_gc()
        fix_mmap_threshold()
        self.heap = HeapTrimmer()
        layout = current_layout()
        self.cgroup_ids = CgroupIdResolver(layout.v2_root)
        self.memcg_ids = CgroupIdResolver(layout.v1_memory_root)  # v1 ids are directory inodes too
        self.containers = ContainerWatcher(layout, RuntimeRoots.with_added(config.runtime_roots))
        # The kernel leak programs are compiled into the kmalloc probe's object (one program per
        # tracepoint); the leak probe falls back to its own object when that fails.
        self.leaks = KernelLeakProbe(sample_every=config.leak_sample, page_level=config.leak_pages)
        self.kmalloc = KmallocProbe(
            sample_every=config.sample_every,
            max_pids=config.max_pids,
            resolve_cgroup_id=self.cgroup_ids.path,
            memcg_hierarchy=current_memory_hierarchy_id() if layout.v1_memory_root else 0,
            v1_memory_root=layout.v1_memory_root,
            resolve_memcg_id=self.memcg_ids.path,
            leaks=self.leaks,
        )
        self.oom = OomProbe(
            resolve_cgroup_id=self.cgroup_ids.path,
            on_victim_cgroup=self.containers.remember,
            on_cgroup_created=self.containers.remember_new,
        )
        self.tcp = TcpProbe(slow_ms=config.tcp_slow_ms)
        self.user_leaks: Probe | None = None  # UserLeakProbe of one process, while asked for
        self.probes: list[Probe] = [self.kmalloc, self.oom, self.tcp, self.leaks]
        self.procs = ProcScanner()
        self.store = Store(host_info(), started_at=time.time(), interval_s=config.interval_s)
        self.store.kmalloc_since = None  # no kmalloc counts until the probe attaches
        self._lock = threading.Lock()
        self._focus: ProcessKey | None = None
        self._attached: set[str] = set()  # probes whose readings the tick may use (set under the lock)
        self._starter: threading.Thread | None = None
        self._closed = False
        self._leaks_visible = False
        self._leaks_read_at = -math.inf  # time.monotonic() of the last leak read
        for probe in self.probes:
            probe.status = ProbeStatus("starting", "compiling and attaching")
            self.store.probes[probe.name] = probe.status

    def start(self) -> None:
        """Start every probe and return when all have attached or failed; one that fails is marked with
        its reason. Raises if none could start, or if what was asked for cannot be done (--leaks-pid);
        then every probe started is detached."""
        user_leaks = self._user_leaks_asked()
        try:
            self._start(user_leaks)
            if not any(p.running for p in self.probes):
                errors = [p.status.detail for p in self.probes if p.status.status == "error"]
                raise MemtopError("; ".join(errors) or "no probe could start")
        except BaseException:
            self.close()
            raise

    def start_in_background(self) -> None:
        """Start the probes from a thread and return at once: ticks show /proc's rows meanwhile, and each
        probe's panel fills in as it attaches (its status says "starting" until then). --leaks-pid is
        checked here, before anything compiles (MemtopError)."""
        user_leaks = self._user_leaks_asked()
        self._starter = threading.Thread(
            target=self._start_quietly, args=(user_leaks,), name="memtop-probe-start", daemon=True
        )
        self._starter.start()

    def _user_leaks_asked(self) -> UserLeakProbe | None:
        if self.config.leaks_pid is None:
            return None
        from memtop.probes.leaks import UserLeakProbe

        # checks the PID before anything compiles
        probe = UserLeakProbe(self.config.leaks_pid, sample_every=self.config.user_leak_sample)
        probe.find_functions()  # and that it has an allocator to hook (MemtopError: one line, no UI)
        return probe

    def _start_quietly(self, user_leaks: UserLeakProbe | None) -> None:
        # Compiling (clang, in this thread) must not slow the first screens: run it at a lower priority.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), STARTER_NICE)
        try:
            self._start(user_leaks)
        except MemtopError as exc:  # --leaks-pid could not start: say so in its panel
            self.store.probes["leaks-user"] = ProbeStatus("error", str(exc))
        except Exception as exc:  # a bug: show it rather than die in a thread
            self.store.probes["start"] = ProbeStatus("error", f"{exc.__class__.__name__}: {exc}")

    def _start(self, user_leaks: UserLeakProbe | None) -> None:
        for probe in self.probes:
            if self._closed:
                return
            try:
                probe.start()  # compiles and attaches outside the lock: ticks go on meanwhile
            except MemtopError as exc:
                probe.status = ProbeStatus("error", str(exc))
            self._attach_done(probe)
        if self._closed:
            return
        if self.oom.running:
            backlog = [self._attribute_oom(e) for e in self.oom.backlog()]
            with self._lock:
                self.store.add_oom_backlog(backlog)
        if user_leaks is not None:
            self._track_user_leaks(user_leaks)
        tune_gc(freeze=True)  # what startup made (BCC, the UI) lives as long as memtop

    def _attach_done(self, probe: Probe) -> None:
        """A probe finished starting: from now on ticks read it, and its counts start now."""
        with self._lock:
            if self._closed:
                probe.close()
                return
            if probe.running:
                since = time.time()
                probe.status = replace(probe.status, since=since)
                if probe is self.kmalloc:
                    # Counts made while it attached (tracepoint by tracepoint) are a baseline, not data:
                    # every rate is over (since, tick], and every total counts from `since`.
                    baseline = self._read(self.kmalloc, self.kmalloc.read)
                    self.store.kmalloc_attached(since, baseline)
                elif probe is self.tcp:
                    self.store.tcp_attached(since)
                    self.store.tcp_slow_ms = self.config.tcp_slow_ms
                    if self.config.tcp_pids:
                        self.tcp.set_pid_filter(self.config.tcp_pids)
                elif probe is self.leaks:
                    self.store.leak_older_s = self.config.older_s
                self._attached.add(probe.name)
            self.store.probes[probe.name] = probe.status

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

    def _ready(self, probe: Probe) -> bool:
        """Attached, with its window started (called under the lock)."""
        return probe.name in self._attached and probe.running

    def _attribute_oom(self, event: OomEvent) -> OomEvent:
        """The victim's container, pod and names, looked up right away (the container may go soon)."""
        ref = self.containers.ref_of(event.cgroup_path)
        if ref is None:
            return event
        meta = self.containers.metadata.lookup(ref)
        return replace(
            event,
            container_id=ref.container_id,
            pod_uid=ref.pod_uid,
            pod_name=meta.pod_name,
            namespace=meta.namespace,
            container_name=meta.name,
            runtime=meta.runtime or ref.runtime,
        )

    def tick(self, include_histories: bool = False) -> Snapshot:
        with self._lock:
            now = time.time()
            if self._closed:  # closing: no probe to read, no /proc scan to start again; what we had
                return self.store.snapshot(now, include_histories=include_histories)
            reading = self._read(self.kmalloc, self.kmalloc.read) if self._ready(self.kmalloc) else None
            # Before the kmalloc probe attaches nothing is taken as exited: the first scans may leave
            # some processes for the next, and the first screen comes sooner on a busy host.
            # A PID whose process died and was reused (retired counters) is read again now, even if quiet.
            # and so is one whose main thread exited (a zombie stays in /proc until reaped: not live).
            refresh = {r.tgid for r in reading.retired} | reading.exited if reading is not None else set()
            procs = self.procs.scan(
                reading.identities if reading is not None else None,
                discover_budget_s=None if reading else FIRST_SCAN_BUDGET_S,
                refresh=refresh,
            )
            forget = self.store.ingest(now, reading, procs)
            self.store.set_containers(self.containers.states(self.store.container_refs().values()))
            oom = self._read(self.oom, self.oom.read) if self._ready(self.oom) else None
            if oom is not None:
                self.store.ingest_oom(replace(oom, events=tuple(self._attribute_oom(e) for e in oom.events)))
            tcp = self._read(self.tcp, self.tcp.read) if self._ready(self.tcp) else None
            if tcp is not None:
                self.store.ingest_tcp(now, tcp)
                self.store.set_cgroup_paths({i: self.cgroup_ids.path(i) for i in self.store.cgroup_ids()})
            leaks = None
            if self._ready(self.leaks):
                due = self._leaks_due(include_histories)
                # The other ticks adapt the 1 in N; a map that overflowed is read (and pruned) now.
                if not due and self._read(self.leaks, self.leaks.adapt):
                    due = True
                if due:
                    leaks = self._read(self.leaks, self.leaks.read)
            if leaks is not None:
                self.store.ingest_leaks(now, leaks)
            self._read_user_leaks(now)
            if self.kmalloc.running and forget:
                self.kmalloc.forget(forget)
            if self._focus is not None and self._ready(self.kmalloc):
                self.store.set_focus_reading(self._read(self.kmalloc, self.kmalloc.read_focus))
            for probe in self.probes:
                self.store.probes[probe.name] = probe.status
            if self.user_leaks is not None:
                self.store.probes[self.user_leaks.name] = self.user_leaks.status
            snapshot = self.store.snapshot(now, include_histories=include_histories)
            self.heap.maybe_trim()
            return snapshot

    def _leaks_due(self, fresh: bool, now: float | None = None) -> bool:
        """Whether this tick reads the kernel leak aggregates: every tick while a view shows them or a
        full snapshot is asked for, otherwise every LEAK_READ_EVERY_S (the last figures are kept)."""
        now = time.monotonic() if now is None else now
        # Half an interval early: ticks every 5 s (record, exporter) that come a little early still read.
        due = LEAK_READ_EVERY_S - self.store.interval_s / 2
        if fresh or self._leaks_visible or now - self._leaks_read_at >= due:
            self._leaks_read_at = now
            return True
        return False

    def set_leaks_visible(self, visible: bool) -> None:
        """A view shows (True) or no longer shows the kernel leak rows: read them every tick meanwhile."""
        self._leaks_visible = visible

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

        # validates the pid before compiling anything
        self._track_user_leaks(UserLeakProbe(pid, sample_every=self.config.user_leak_sample))

    def _track_user_leaks(self, probe: UserLeakProbe) -> None:
        try:
            probe.start()  # compiles outside the lock: ticks go on meanwhile
        except MemtopError as exc:  # the Leaks panel says why (which object provides malloc, ...)
            with self._lock:
                self.store.probes[probe.name] = ProbeStatus("error", str(exc))
            raise
        with self._lock:
            if self._closed:  # closed while it compiled: its uprobes must not outlive the source
                probe.close()
                return
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

    def close(self, exiting: bool = False) -> None:
        """Detach every probe, all at once (safe to call more than once, from any thread). A probe still
        compiling is detached by the starting thread as soon as it attaches (`_attach_done`).
        Otherwise it returns once the kernel has freed the programs. `exiting`: the process ends right
        after: close every attachment (so tracing stops now) and leave the rest (program and map
        descriptors, BCC's module) to the process's exit, which releases them without waiting."""
        # A tick stuck in a read must not keep the probes attached: wait for it a little, then go on.
        locked = self._lock.acquire(timeout=CLOSE_LOCK_WAIT_S)
        try:
            self._closed = True
            # A leak probe running inside the kmalloc probe's object goes with it (closing both at once
            # would detach the same object's programs from two threads).
            probes = [
                p
                for p in (*self.probes, self.user_leaks)
                if p is not None and not (p is self.leaks and getattr(p, "shared", False))
            ]
            self.user_leaks = None
            for p in probes:
                p.exiting = exiting
            closers = [threading.Thread(target=p.close, name=f"close-{p.name}") for p in probes]
            for t in closers:
                t.start()
            for t in closers:
                t.join()
            if locked:
                self.procs.close()
        finally:
            if locked:
                self._lock.release()


def open_replay(path: Path, at: float | None = None) -> Source:
    """--replay: a recording database (told by its content, not its name) or a snapshot file."""
    from memtop.recording import RecordingSource, is_sqlite

    if is_sqlite(path):
        return RecordingSource(path, at)
    if at is not None:
        raise MemtopError(f"--at needs a recording database; {path} is not one (a snapshot holds one time)")
    return ReplaySource(path)


class ReplaySource(ReadOnlySource):
    """A snapshot file, shown as it was taken: paused, marked as replay."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.snapshot = read_snapshot(path)

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
