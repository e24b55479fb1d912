"""The OOM probe (memtop/bpf/oom.c): every OOM victim from oom:mark_victim, attributed and explained.

A thread owned by the probe polls the ring buffer on a short timeout, so that each kill is explained the
moment it arrives, while the victim's cgroup still exists: its cgroup path (from the cgroup2 id the kernel
remembered for it), and the cause (which memory cgroup's limit was hit, read from the cgroups' OOM
counters and, where the kernel log has it, the kernel's own oom-kill summary line).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from memtop import cgroups, tracefs
from memtop.errors import MemtopError
from memtop.model import ProbeStatus
from memtop.oom import (
    KB,
    KmsgOomParser,
    KmsgReader,
    MemcgOomTracker,
    OomEvent,
    OomReading,
    kmsg_boot_time,
    memory_cgroup_of,
    parse_kmsg,
)
from memtop.probes.base import Probe, int_cflag

log = logging.getLogger(__name__)

KIND_VICTIM, KIND_REAPED, KIND_CGROUP = 1, 2, 3
CTR_RINGBUF_LOST, CTR_TASK_MAP_FULL, CTR_CGROUP_LOST = 0, 1, 2
CGROUP_FROM_CURRENT, CGROUP_FROM_TASK_MAP = 1, 2
CGROUP_PATH_LEN = 512
MAX_KNOWN_CGROUPS = 65536

# oom:mark_victim fields beyond the pid (kernels before 6.8 have only the pid), and their -D flags.
VICTIM_FIELDS = ("comm", "total_vm", "anon_rss", "file_rss", "shmem_rss", "uid", "pgtables", "oom_score_adj")

COMM_LEN = 16
RECENT_EVENTS = 256  # delivered events kept so that a later reaping can update them


class _Event(ctypes.Structure):
    """struct oom_event in memtop/bpf/oom.c."""

    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("victim_pid", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("victim_cgroup_id", ctypes.c_uint64),
        ("trigger_cgroup_id", ctypes.c_uint64),
        ("total_vm_kb", ctypes.c_uint64),
        ("anon_rss_kb", ctypes.c_uint64),
        ("file_rss_kb", ctypes.c_uint64),
        ("shmem_rss_kb", ctypes.c_uint64),
        ("pgtables_kb", ctypes.c_uint64),
        ("trigger_pid", ctypes.c_uint32),
        ("trigger_tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("oom_score_adj", ctypes.c_int32),
        ("victim_cgroup_from", ctypes.c_uint32),
        ("victim_comm", ctypes.c_char * COMM_LEN),
        ("trigger_comm", ctypes.c_char * COMM_LEN),
    ]


class _CgroupEvent(ctypes.Structure):
    """struct cgroup_event in memtop/bpf/oom.c."""

    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("level", ctypes.c_uint32),
        ("id", ctypes.c_uint64),
        ("path", ctypes.c_char * CGROUP_PATH_LEN),
    ]


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class OomProbe(Probe):
    name = "oom"
    source = "oom.c"

    def __init__(
        self,
        resolve_cgroup_id: Callable[[int], str] = lambda _id: "",
        max_tasks: int = 32768,
        follow_kmsg: bool = True,
        kmsg_path: str = "/dev/kmsg",
        poll_timeout_ms: int = 100,
        on_victim_cgroup: Callable[[str], None] | None = None,
        on_cgroup_created: Callable[[str], None] | None = None,
    ) -> None:
        """resolve_cgroup_id maps a cgroup2 id (the inode of its directory) to its path, "" if unknown.
        on_victim_cgroup, if given, is called from the probe's thread with each victim's cgroup path the
        moment the kill is explained: the source looks up the container's names then, before a runtime
        removes it (`docker run --rm`). on_cgroup_created, likewise, with the path of each cgroup2 directory
        created (cgroup:cgroup_mkdir): a runtime has written its state by then, and a container that
        lives less than a refresh is named too."""
        super().__init__()
        self.resolve_cgroup_id = resolve_cgroup_id
        self.on_victim_cgroup = on_victim_cgroup
        self.on_cgroup_created = on_cgroup_created
        self.max_tasks = max_tasks
        self.follow_kmsg = follow_kmsg
        self.kmsg_path = kmsg_path
        self.poll_timeout_ms = poll_timeout_ms
        self.fields: tuple[str, ...] = ()  # the mark_victim fields compiled in
        self.optional: dict[str, bool] = {}  # optional tracepoints used
        self.backlog_problem = ""  # why the kernel log backlog could not be read ("" if it was)
        self.kmsg_problem = ""  # why the kernel log is not followed live
        self.resolve_errors = 0  # events whose explanation failed part-way (the event is still kept)
        self._backlog: list[OomEvent] = []
        self._lock = threading.Lock()
        self._pending: list[OomEvent] = []
        self._reaped_updates: list[OomEvent] = []
        self._delivered: deque[OomEvent] = deque(maxlen=RECENT_EVENTS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kmsg: KmsgReader | None = None
        self._kmsg_parser: KmsgOomParser | None = None
        self._boot_offset = 0.0
        self._v2_root: str | None = None
        self._v1_memory = False
        self._tracker = MemcgOomTracker(None, False)
        self._known_paths: dict[int, str] = {}  # cgroup2 id -> path, from cgroup_mkdir and /proc at start
        # Where each victim's cgroup came from: "current", "task_map", "kmsg", "proc", "memcg_counters",
        # "trigger", "none".
        self.attributed_by: dict[str, int] = {}

    # -- set-up ------------------------------------------------------------------------------------------

    def cflags(self) -> list[str]:
        fields = tracefs.tracepoint_fields("oom", "mark_victim")
        comm = fields.get("comm")
        have_comm = 0
        if comm is not None:
            have_comm = 1 if comm.type.startswith("__data_loc") else 2 if comm.size > 1 else 0
        self.fields = tuple(f for f in VICTIM_FIELDS if f in fields and (f != "comm" or have_comm))
        self.optional = {
            "reaping": tracefs.tracepoint_exists("oom", "finish_task_reaping"),
            "fork": tracefs.tracepoint_exists("sched", "sched_process_fork"),
            "exec": tracefs.tracepoint_exists("sched", "sched_process_exec"),
            "exit": tracefs.tracepoint_exists("sched", "sched_process_exit"),
            "cgroup_mkdir": tracefs.tracepoint_exists("cgroup", "cgroup_mkdir"),
        }
        flags = [
            int_cflag("MAX_TASKS", self.max_tasks, 1024, 1 << 22),
            int_cflag("HAVE_COMM", have_comm, 0, 2),
        ]
        flags += [int_cflag(f"HAVE_{f.upper()}", int(f in fields), 0, 1) for f in VICTIM_FIELDS[1:]]
        flags += [int_cflag(f"HAVE_{tp.upper()}_TP", int(ok), 0, 1) for tp, ok in self.optional.items()]
        return flags

    def start(self) -> None:
        if not tracefs.tracepoint_exists("oom", "mark_victim"):
            raise MemtopError(
                "tracepoint oom:mark_victim is missing (is tracefs mounted? run `memtop doctor`)"
            )
        layout = cgroups.current_layout()
        self._v2_root = layout.v2_root
        if layout.v1_memory_root:
            self._v1_memory = True
            self._tracker = MemcgOomTracker(layout.v1_memory_root, v1=True)
        elif layout.v2_root and "memory" in cgroups.v2_controllers(layout.v2_root):
            self._tracker = MemcgOomTracker(layout.v2_root, v1=False)
        # Counters as they are before we watch: growth from here on belongs to kills we see.
        self._tracker.prime()
        self._boot_offset = time.time() - time.monotonic()
        super().start()
        # A consume reads the rings in the order they were opened: mkdirs first, so that a kill read in
        # the same pass as its cgroup's creation finds the cgroup's path already known.
        self.bpf[b"cgroup_events"].open_ring_buffer(self._on_cgroup_event)
        self.bpf[b"events"].open_ring_buffer(self._on_event)
        self._fill_task_map()
        # The backlog is read after attaching (so no kill falls between the two); the same reader then
        # follows the log for the summary lines the kernel prints just before marking each victim.
        reader = KmsgReader(self.kmsg_path)
        self._backlog = parse_kmsg(reader.read_available(), kmsg_boot_time())
        self.backlog_problem = reader.problem
        if self.follow_kmsg and reader.fd is not None:
            self._kmsg, self._kmsg_parser = reader, KmsgOomParser(kmsg_boot_time())
        else:
            self.kmsg_problem = reader.problem or "not asked to"
            reader.close()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name="memtop-oom", daemon=True)
        self._thread.start()
        self.status = ProbeStatus("running", self.describe())

    def describe(self) -> str:
        fields = ",".join(self.fields) or "pid only"
        used = "+".join(k for k, ok in self.optional.items() if ok) or "none"
        kmsg = "following kmsg" if self._kmsg is not None else f"kmsg not followed: {self.kmsg_problem}"
        return f"oom:mark_victim ({fields}); optional tracepoints: {used}; {kmsg}"

    def _fill_task_map(self) -> None:
        """Remember the cgroup of every process running now (later ones are caught at fork/exec)."""
        if self._v2_root is None or self.bpf is None:
            return
        table = self.bpf[b"task_cgroups"]
        for pid, cgroup_id, path in cgroups.running_cgroup_ids(self._v2_root, "unified"):
            if cgroup_id not in self._known_paths:
                self._remember_cgroup(cgroup_id, path)
            key = table.Key(pid)
            try:
                table[key]  # an exec/fork since attaching already told us
            except KeyError:
                try:
                    table[key] = table.Leaf(cgroup_id)
                except Exception:  # map full: counted nowhere else, so log it once
                    log.warning("oom probe: task map full while filling it from /proc")
                    return

    # -- the polling thread --------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            bpf = self.bpf
            if bpf is None:
                return
            try:
                bpf.ring_buffer_poll(self.poll_timeout_ms)
                self._drain_kmsg()
            except Exception as exc:  # pragma: no cover - keep polling whatever one event did
                log.warning("oom probe poll: %s", exc)
                self._stop.wait(0.1)

    def _drain_kmsg(self) -> None:
        if self._kmsg is None or self._kmsg_parser is None:
            return
        for record in self._kmsg.read_available(10_000):
            self._kmsg_parser.feed(record)
        self._kmsg_parser.events.clear()  # the live kills come from the tracepoint

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        try:
            raw = ctypes.cast(data, ctypes.POINTER(_Event)).contents
            when = self._boot_offset + raw.ts_ns / 1e9
            if raw.kind == KIND_REAPED:
                self._reaped(raw.victim_pid, when)
            elif raw.kind == KIND_VICTIM:
                event = self._explain(raw, when)
                with self._lock:
                    self._pending.append(event)
        except Exception as exc:  # pragma: no cover - a callback must never raise into BCC
            log.warning("oom probe event: %s", exc)

    def _explain(self, raw: _Event, when: float) -> OomEvent:
        """The event with its victim's cgroup and the cause, resolved now while the cgroup still exists."""
        present = set(self.fields)
        pid = raw.victim_pid
        comm = _comm(bytes(raw.victim_comm)) if "comm" in present else ""
        event = OomEvent(
            time=when,
            source="tracepoint",
            victim_pid=pid,
            victim_comm=comm,
            trigger_pid=raw.trigger_pid,
            trigger_comm=_comm(bytes(raw.trigger_comm)),
            total_vm_bytes=raw.total_vm_kb * KB if "total_vm" in present else None,
            anon_rss_bytes=raw.anon_rss_kb * KB if "anon_rss" in present else None,
            file_rss_bytes=raw.file_rss_kb * KB if "file_rss" in present else None,
            shmem_rss_bytes=raw.shmem_rss_kb * KB if "shmem_rss" in present else None,
            pgtables_bytes=raw.pgtables_kb * KB if "pgtables" in present else None,
            uid=raw.uid if "uid" in present else None,
            oom_score_adj=raw.oom_score_adj if "oom_score_adj" in present else None,
        )
        try:
            event = self._attribute(event, raw)
        except Exception as exc:
            self.resolve_errors += 1
            log.warning("oom probe: explaining the kill of %d: %s", pid, exc)
            return event
        if self.on_victim_cgroup is not None and event.cgroup_path:
            try:
                self.on_victim_cgroup(event.cgroup_path)
            except Exception as exc:  # names are a nicety: the kill itself is kept
                log.warning("oom probe: looking up the container of %d: %s", pid, exc)
        return event

    def _attribute(self, event: OomEvent, raw: _Event) -> OomEvent:
        pid = event.victim_pid
        self._drain_kmsg()
        kernel_log = self._kmsg_parser.take_context(pid, event.victim_comm) if self._kmsg_parser else None
        in_kernel = "current" if raw.victim_cgroup_from == CGROUP_FROM_CURRENT else "task_map"
        from_id = self._cgroup_path(raw.victim_cgroup_id) if raw.victim_cgroup_id else ""
        # /proc while the victim dies: once it has exited its cgroup reads "/", which is no answer.
        proc_memory, proc_unified = (p if p != "/" else "" for p in memory_cgroup_of(pid))
        from_log = kernel_log.cgroup_path if kernel_log else ""
        # The victim's memory cgroup. The kernel's own words first (its log line names the memory cgroup;
        # the id was captured in the kernel). With the memory controller on cgroup v1 (hybrid and v1
        # hosts) the log's task_memcg *is* the memory cgroup, so it leads; a cgroup2 path stands in for
        # it only where the same path exists there, and never the cgroup2 root: a process placed only in
        # v1 hierarchies (a v1-only runtime) sits at "/" in cgroup2, which says nothing.
        id_is_memcg = self._v1_memory and from_id not in ("", "/") and self._tracker.exists(from_id)
        candidates: list[tuple[str, str]]
        if self._v1_memory:
            candidates = [
                ("kmsg", from_log),
                (in_kernel, from_id if id_is_memcg else ""),
                ("proc", proc_memory),
                (in_kernel, from_id),
            ]
        else:
            candidates = [(in_kernel, from_id), ("kmsg", from_log), ("proc", proc_unified)]
        if raw.trigger_cgroup_id:  # a guess of last resort: the victim's own is unknown
            candidates.append(("trigger", self._cgroup_path(raw.trigger_cgroup_id)))
        source, cgroup_path = next(((s, c) for s, c in candidates if c), ("none", ""))
        memcg_of_victim = cgroup_path
        if self._v1_memory:
            memcg_of_victim = from_log or (from_id if id_is_memcg else "") or proc_memory or cgroup_path
            if memcg_of_victim in ("", "/"):
                # Nothing named the victim's memory cgroup (no log line: past the kernel log's rate limit;
                # a v1-only runtime's process sits at the cgroup2 root): the one whose own OOM kill count
                # grew is its.
                by_counters = self._tracker.victim_by_counters()
                if by_counters:
                    source, cgroup_path, memcg_of_victim = "memcg_counters", by_counters, by_counters
        self.attributed_by[source] = self.attributed_by.get(source, 0) + 1
        cause = self._tracker.cause(memcg_of_victim)  # always: it also remembers counters for next time
        constraint, memcg_path = cause.constraint, cause.memcg_path
        limit, usage = cause.memcg_limit_bytes, cause.memcg_usage_bytes
        if kernel_log is not None and kernel_log.constraint:
            constraint = kernel_log.constraint
            if constraint == "memcg":
                memcg_path = kernel_log.memcg_path or memcg_path
                limit = kernel_log.memcg_limit_bytes if kernel_log.memcg_limit_bytes is not None else limit
                usage = kernel_log.memcg_usage_bytes if kernel_log.memcg_usage_bytes is not None else usage
            else:
                memcg_path, limit, usage = "", None, None
        return dataclasses.replace(
            event,
            cgroup_path=cgroup_path,
            constraint=constraint,
            memcg_path=memcg_path,
            memcg_limit_bytes=limit,
            memcg_usage_bytes=usage,
            uid=event.uid if event.uid is not None else (kernel_log.uid if kernel_log else None),
        )

    def _cgroup_path(self, cgroup_id: int) -> str:
        """The path of a cgroup2 id: from its mkdir (works after it was removed), else the resolver."""
        path = self._known_paths.get(cgroup_id, "")
        if not path:
            try:
                path = self.resolve_cgroup_id(cgroup_id)
            except Exception:
                path = ""
        return path

    def _remember_cgroup(self, cgroup_id: int, path: str) -> None:
        self._known_paths.pop(cgroup_id, None)
        self._known_paths[cgroup_id] = path
        while len(self._known_paths) > MAX_KNOWN_CGROUPS:
            del self._known_paths[next(iter(self._known_paths))]

    def _on_cgroup_event(self, _ctx: Any, data: Any, _size: int) -> None:
        try:
            raw = ctypes.cast(data, ctypes.POINTER(_CgroupEvent)).contents
            path = _comm(bytes(raw.path))
            if raw.kind == KIND_CGROUP and path.startswith("/") and len(path) < CGROUP_PATH_LEN - 1:
                self._remember_cgroup(raw.id, path)  # (a path that filled the buffer may be cut short)
                if self.on_cgroup_created is not None:
                    self.on_cgroup_created(path)
        except Exception as exc:  # pragma: no cover - a callback must never raise into BCC
            log.warning("oom probe cgroup event: %s", exc)

    def _reaped(self, pid: int, when: float) -> None:
        with self._lock:
            for i in range(len(self._pending) - 1, -1, -1):
                ev = self._pending[i]
                if ev.victim_pid == pid and ev.reaped_at is None:
                    self._pending[i] = dataclasses.replace(ev, reaped_at=when)
                    return
            for i in range(len(self._delivered) - 1, -1, -1):
                ev = self._delivered[i]
                if ev.victim_pid == pid and ev.reaped_at is None:
                    updated = dataclasses.replace(ev, reaped_at=when)
                    self._delivered[i] = updated
                    self._reaped_updates.append(updated)
                    return

    # -- reading ------------------------------------------------------------------------------------------

    def read(self) -> OomReading:
        """The victims seen since the last read, earlier victims since reaped, and the drop counters."""
        with self._lock:
            events, self._pending = tuple(self._pending), []
            reaped, self._reaped_updates = tuple(self._reaped_updates), []
            self._delivered.extend(events)
        lost = task_map_full = cgroup_lost = 0
        if self.bpf is not None:
            counters = self.bpf[b"counters"]
            lost = sum(counters.getvalue(CTR_RINGBUF_LOST))
            task_map_full = sum(counters.getvalue(CTR_TASK_MAP_FULL))
            cgroup_lost = sum(counters.getvalue(CTR_CGROUP_LOST))
        misses = self.recursion_misses()
        self.status_with_misses(misses)
        return OomReading(
            events=events,
            lost=lost,
            task_map_full=task_map_full,
            cgroup_lost=cgroup_lost,
            reaped=reaped,
            recursion_misses=misses,
        )

    def backlog(self) -> list[OomEvent]:
        """The kills in the kernel log from before the probe started (source "kmsg"); see backlog_problem."""
        return list(self._backlog)

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5 + self.poll_timeout_ms / 1000)
            if thread.is_alive():  # pragma: no cover - a resolver hung; do not pull the maps from under it
                log.warning("oom probe: polling thread did not stop")
        reader, self._kmsg = self._kmsg, None
        if reader is not None:
            with contextlib.suppress(OSError):
                reader.close()
        super().close()
