"""The kmalloc probe (memtop/bpf/kmalloc.c): per-process kmalloc counters, drill-down call sites, tail."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import operator
import os
import platform
import struct
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from memtop import tracefs
from memtop.cgroups import running_cgroup_ids
from memtop.containers import kernel_cgroup_path
from memtop.errors import MemtopError
from memtop.gfp import decode_gfp, parse_gfp_table
from memtop.model import (
    CallSite,
    FocusReading,
    KernelIdentity,
    KmallocCounters,
    KmallocReading,
    RetiredCounters,
    TailEvent,
)
from memtop.probes.base import (
    Probe,
    ProbeStatus,
    _one_line,
    int_cflag,
    map_items,
    raw_args_match,
    run_on_cpu,
)

SIZE_BUCKETS = 64
(
    CTR_PID_MAP_FULL,
    CTR_SITE_MAP_FULL,
    CTR_TAIL_LOST,
    CTR_SAMPLED,
    CTR_TAIL_RATE_LIMITED,
    CTR_MEMCG_MAP_FULL,
    CTR_PIDS_REUSED,
    CTR_NAMES_WRITTEN,
    CTR_SLOT_ORPHANED,
) = range(9)
ENOTSUPP = 524  # the kernel's internal "operation not supported"
FLUSH_TRIES = 20  # km_flush found a CPU's slot busy: tries on that CPU before leaving it to the next read
# What following cgroup v1 memory cgroups takes (see memcg_of in kmalloc.c).
MEMCG_TRACEPOINTS = (
    ("cgroup", "cgroup_attach_task"),
    ("task", "task_newtask"),
    ("sched", "sched_process_exit"),
)
MAX_SAMPLE_EVERY = 1_000_000
# The raw tracepoint kmalloc(call_site, ptr, bytes_req, bytes_alloc, gfp_flags, node) of 6.1+: the classic
# record carries the same values in the same order.
KMALLOC_RAW_ARGS = ("call_site", "ptr", "bytes_req", "bytes_alloc", "gfp_flags", "node")


def _reason(exc: BaseException) -> str:
    """One line saying why km_flush could not run (ENOTSUPP, 524, has no text in libc)."""
    if isinstance(exc, OSError) and exc.errno == ENOTSUPP:
        return "BPF_PROG_TEST_RUN on a CPU is not supported by this kernel (Linux 5.10+)"
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc).strip() or repr(exc)
    return text.splitlines()[-1]


def slots_supported(release: str) -> bool:
    """Whether a kernel of this `uname -r` can run km_flush on a given CPU (BPF_PROG_TEST_RUN of a raw
    tracepoint program with BPF_F_TEST_RUN_ON_CPU: Linux 5.10). Unparsable: try it."""
    try:
        major, minor = (int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (5, 10)


def raw_kmalloc() -> bool:
    """Whether kmem:kmalloc's raw tracepoint arguments are KMALLOC_RAW_ARGS on this kernel."""
    return raw_args_match("kmem", "kmalloc", KMALLOC_RAW_ARGS)


class _FocusCfg(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("tail_on", ctypes.c_uint32), ("tail_min_bytes", ctypes.c_uint64)]


class _TailEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("call_site", ctypes.c_uint64),
        ("ptr", ctypes.c_uint64),
        ("bytes_req", ctypes.c_uint64),
        ("bytes_alloc", ctypes.c_uint64),
        ("gfp_flags", ctypes.c_uint64),
        ("node", ctypes.c_int32),
        ("tid", ctypes.c_uint32),
    ]


_first, _second = itemgetter(0), itemgetter(1)


def _sum_percpu(values: Any, fields: tuple[str, ...]) -> list[int]:
    """Each field summed over the CPUs. A value made of u64 fields only is unpacked in one go (thousands
    of entries a tick: reading them field by field through ctypes was most of the read)."""
    n = len(fields)
    if values and ctypes.sizeof(values[0]) == 8 * n:
        raw = struct.unpack(f"={n * len(values)}Q", bytes(values))
        return [sum(raw[i::n]) for i in range(n)]
    totals = [0] * n
    for cpu_value in values:
        for i, name in enumerate(fields):
            totals[i] += getattr(cpu_value, name)
    return totals


class KmallocProbe(Probe):
    name = "kmalloc"
    source = "kmalloc.c"

    def __init__(
        self,
        sample_every: int = 1,
        max_pids: int = 16384,
        tail_max: int = 2000,
        resolve_cgroup_id: Callable[[int], str] = lambda _id: "",
        memcg_hierarchy: int = 0,
        v1_memory_root: str | None = None,
        resolve_memcg_id: Callable[[int], str] = lambda _id: "",
        leaks: Any = None,
    ) -> None:
        super().__init__()
        # A KernelLeakProbe whose programs are compiled into this probe's object (one program per
        # tracepoint for both panels); when that fails, this probe starts without them and the leak probe
        # starts on its own (see KernelLeakProbe.start).
        self.leaks = leaks
        self._with_leaks = leaks is not None  # decided again at start
        self.resolve_cgroup_id = resolve_cgroup_id  # cgroup2 id -> path (memtop.containers.CgroupIdResolver)
        # cgroup v1: the memory controller's hierarchy id (0: not on v1) and mount point; ids -> paths
        self.memcg_hierarchy = memcg_hierarchy
        self.v1_memory_root = v1_memory_root
        self.resolve_memcg_id = resolve_memcg_id
        self.memcg_tracking = ""  # how a process's v1 memory cgroup is known ("" until started)
        self.memcg_seeded = 0  # processes whose memory cgroup was read from /proc at start
        self.sample_every = sample_every
        self.max_pids = max_pids
        self.tail_max = tail_max
        self._tail: list[TailEvent] = []
        self._focus_tgid = 0
        self._gfp_table: list[tuple[int, str]] = []
        self._boot_offset = 0.0  # wall clock minus CLOCK_MONOTONIC, for tail timestamps
        self._symbols: dict[int, str] = {}
        self._paths: dict[tuple[int, int], str] = {}  # (cgroup2 id, memcg id) -> path to attribute by
        self.irq_tracking = ""
        # (kind, entry tracepoint, exit tracepoint), set with the cflags: kmalloc.c's km_<kind>_enter/_exit
        self._irq_tracepoints: list[tuple[bytes, bytes, bytes]] = []
        self._identities_read: dict[int, KernelIdentity] = {}  # tgid -> its identity at the last read
        self._exit_tp = False  # sched:sched_process_exit followed (set with the cflags)
        # (tgid, generation) -> (name, cgroup2 id, memcg id, execs, first_ns), as proc_comms held them when
        # its KM_NAMES_WRITTEN counter was _names_written.
        self._names: dict[tuple[int, int], tuple[str, int, int, int, int]] = {}
        self._names_written = -1
        self._identities: dict[tuple[int, int], KernelIdentity] = {}  # built from _names, kept while it is
        self.raw = False  # kmem:kmalloc is attached as a raw tracepoint (set with the cflags)
        # Per-CPU slots (CPU_SLOT in kmalloc.c): on until km_flush cannot be run on a CPU at start
        self.cpu_slot = slots_supported(platform.release())
        self.cpu_slot_off_reason = "" if self.cpu_slot else "km_flush needs Linux 5.10+"
        self._flush_fd = -1
        self.flushes_deferred = 0  # reads at which some CPU's slot could not be flushed (see flush)
        self.flush_error = ""  # the last reason km_flush failed on a CPU, if it ever did

    def cflags(self) -> list[str]:
        self.raw = raw_kmalloc()
        softirq = all(tracefs.tracepoint_exists("irq", e) for e in ("softirq_entry", "softirq_exit"))
        hardirq = all(tracefs.tracepoint_exists("irq", e) for e in ("irq_handler_entry", "irq_handler_exit"))
        self.irq_tracking = (
            "+".join(n for n, ok in (("softirq", softirq), ("hardirq", hardirq)) if ok) or "none"
        )
        self._irq_tracepoints = [
            *([(b"softirq", b"softirq_entry", b"softirq_exit")] if softirq else []),
            *([(b"hardirq", b"irq_handler_entry", b"irq_handler_exit")] if hardirq else []),
        ]
        self._exit_tp = tracefs.tracepoint_exists("sched", "sched_process_exit")
        return [
            int_cflag("SAMPLE_EVERY", self.sample_every, 1, MAX_SAMPLE_EVERY),
            int_cflag("MAX_PIDS", self.max_pids, 64, 1 << 20),
            int_cflag("HAVE_EXEC_TP", int(tracefs.tracepoint_exists("sched", "sched_process_exec")), 0, 1),
            int_cflag("TRACK_V1_MEMCG", int(self._track_memcg()), 0, 1),
            int_cflag("V1_MEMCG_HIERARCHY", self.memcg_hierarchy, 0, 1 << 30),
            int_cflag("RAW_KMALLOC", int(self.raw), 0, 1),
            int_cflag("HAVE_NEWTASK_TP", int(tracefs.tracepoint_exists("task", "task_newtask")), 0, 1),
            int_cflag("HAVE_EXIT_TP", int(self._exit_tp), 0, 1),
            int_cflag("CPU_SLOT", int(self.cpu_slot), 0, 1),
            *(["-DWITH_LEAKS=1", *self.leaks.cflags()] if self._with_leaks else []),
        ]

    def _track_memcg(self) -> bool:
        """Whether to follow each task's v1 memory cgroup in the kernel (sets `memcg_tracking`)."""
        if not self.memcg_hierarchy or self.v1_memory_root is None:
            self.memcg_tracking = "off (the memory controller is not on cgroup v1)"
            return False
        missing = [f"{c}:{e}" for c, e in MEMCG_TRACEPOINTS if not tracefs.tracepoint_exists(c, e)]
        if missing:
            self.memcg_tracking = f"from /proc only ({', '.join(missing)} missing)"
            return False
        self.memcg_tracking = "followed from fork and cgroup moves"
        return True

    def start(self) -> None:
        if not tracefs.tracepoint_exists("kmem", "kmalloc"):
            raise MemtopError("tracepoint kmem:kmalloc is missing (is tracefs mounted? run `memtop doctor`)")
        path = tracefs.tracepoint_dir("kmem", "kmalloc")
        try:
            fmt = (path / "format").read_text() if path else ""
        except OSError:
            fmt = ""
        self._gfp_table = parse_gfp_table(fmt)
        self._boot_offset = time.time() - time.monotonic()
        self._with_leaks = self.leaks is not None and self.leaks.can_embed()
        self._compile()
        try:
            self._attach_irq()
            if self.cpu_slot and not self._start_flush():
                self._restart_without_slot()
            if self._with_leaks and self.leaks is not None:
                self.leaks.adopt(self.bpf)
            if self._track_memcg():
                self._seed_memcg()
            self.bpf[b"tail_events"].open_ring_buffer(self._on_tail_event)
        except BaseException as exc:  # attached by now: a failed start must not leave its programs attached
            self.close()
            if not isinstance(exc, Exception):
                raise
            self.status = ProbeStatus("error", _one_line(exc))
            if isinstance(exc, MemtopError):
                raise
            raise MemtopError(f"{self.name} probe failed to start: {_one_line(exc)}") from None

    def _compile(self) -> None:
        """Compile, load and attach (Probe.start), with the leak part when asked; if that fails, without it
        (the leak part must not take the kmalloc counters down: the leak probe then starts on its own)."""
        if self._with_leaks and self.leaks is not None:
            try:
                super().start()
            except MemtopError as exc:
                self.leaks.embed_error = str(exc)
                self._with_leaks = False
        if not self._with_leaks:
            super().start()

    def _attach_irq(self) -> None:
        """Attach the interrupt depth's programs (kmalloc.c's km_softirq_enter, km_softirq_exit,
        km_hardirq_enter, km_hardirq_exit), every exit before any entry: an interrupt that began before its
        entry's program was attached then never leaves its CPU's depth raised (its exit saturates at 0), so
        no reset is needed after the attach. A failure is start()'s to clean up."""
        for kind, _entry, exit_tp in self._irq_tracepoints:
            self.bpf.attach_raw_tracepoint(tp=exit_tp, fn_name=b"km_" + kind + b"_exit")
        for kind, entry_tp, _exit in self._irq_tracepoints:
            self.bpf.attach_raw_tracepoint(tp=entry_tp, fn_name=b"km_" + kind + b"_enter")

    def _start_flush(self) -> bool:
        """Load km_flush and run it once on each CPU this process may run on; False (and the reason kept) if
        the kernel cannot run it so: then the slots cannot be read, and the probe is compiled without them."""
        import bcc

        try:
            self._flush_fd = self.bpf.load_func(b"km_flush", bcc.BPF.RAW_TRACEPOINT).fd
            for cpu in sorted(os.sched_getaffinity(0)):  # the own CPU runs it directly, the others by IPI
                run_on_cpu(self._flush_fd, cpu)
        except Exception as exc:  # BCC raises bare Exception; OSError from the syscall
            self.cpu_slot_off_reason = _reason(exc)
            return False
        return True

    def _restart_without_slot(self) -> None:
        """Compile and attach again with CPU_SLOT=0 (every count straight into pid_stats)."""
        from memtop.probes.detach import detach_all

        bpf, self.bpf = self.bpf, None
        detach_all([bpf])
        self.cpu_slot = False
        self._flush_fd = -1
        self._compile()
        self._attach_irq()

    def flush(self) -> bool:
        """Move every CPU's slot into pid_stats: km_flush runs on each CPU whose slot holds counts (one
        read of the per-CPU slots says which: idle CPUs get no IPI). False when a CPU's slot stayed busy
        through FLUSH_TRIES runs, or km_flush failed there for a reason other than the CPU being offline
        (kept in flush_error): those counts are read at a later flush, not lost. An offline CPU's slot
        waits for it to come back."""
        if self._flush_fd < 0:
            return True
        complete = True
        for cpu, pending in enumerate(self.bpf[b"km_slot"].getvalue(0)):
            if not pending.calls:
                continue
            for attempt in range(FLUSH_TRIES):
                try:
                    busy = run_on_cpu(self._flush_fd, cpu)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        self.flush_error = _reason(exc)
                        complete = False
                    break
                if not busy:
                    break
                if attempt:
                    time.sleep(0.0002)  # a preempted kmalloc program holds it: let it finish
            else:
                complete = False
        if not complete:
            self.flushes_deferred += 1
        return complete

    def _seed_memcg(self) -> None:
        """Enter the processes that were running before the attach: their memory cgroup from /proc.

        Runs after the attach, so a process created meanwhile already has an entry (inherited or moved):
        it is left alone.
        """
        assert self.v1_memory_root is not None
        table = self.bpf[b"memcg_of"]
        known = {key for key, _ in map_items(table)}
        seeded = 0
        for pid, memcg_id, _path in running_cgroup_ids(self.v1_memory_root, "memory"):
            if pid in known:
                continue
            try:
                table[table.Key(pid)] = table.Leaf(memcg_id)
            except Exception:  # the map is full (MAX_TASKS): the rest are placed from /proc while they run
                break
            seeded += 1
        self.memcg_seeded = seeded

    def own_functions(self) -> list[bytes]:
        if self.bpf is None:
            return []
        leak_functions = set(self.leaks.own_functions()) if self._with_leaks and self.leaks else set()
        return [name for name in self.bpf.funcs if name not in leak_functions]

    def close(self) -> None:
        if self._with_leaks and self.leaks is not None:
            self.leaks.host_closed(self.bpf)
        super().close()

    def describe(self) -> str:
        sampling = f"1 in {self.sample_every} sampled" if self.sample_every > 1 else "every call"
        kind = "raw tracepoint" if self.raw else "tracepoint"
        text = f"kmem:kmalloc ({kind}), {sampling}, irq split: {self.irq_tracking}"
        if self._with_leaks:
            text += ", shared with kernel leaks"
        if not self.cpu_slot and self.cpu_slot_off_reason:
            text += f", no per-CPU slots ({self.cpu_slot_off_reason})"
        if self.flushes_deferred:
            why = f": {self.flush_error}" if self.flush_error else ": busy"
            text += f", {self.flushes_deferred:,} reads left a CPU's slot for later{why}"
        return f"{text}, v1 memory cgroups: {self.memcg_tracking}" if self.memcg_hierarchy else text

    # -- the per-process counters ------------------------------------------------------------------

    def read(self) -> KmallocReading:
        """Cumulative totals per tgid (scaled by the sampling rate), the final totals of processes whose
        PID was reused (retired: deleted from the kernel once read), and the drop counters.

        Names and cgroups (proc_comms) are read again only when the kernel wrote some since the last
        read (a new entry, an exec: its KM_NAMES_WRITTEN counter) or a counted key has none cached: on a
        busy host the per-process counters are the only map read every tick."""
        complete = self.flush()  # every CPU's slot into pid_stats: the read below sees every count
        counters = self.bpf[b"km_counters"]
        sums = [sum(counters.getvalue(i)) for i in range(CTR_SLOT_ORPHANED + 1)]  # before the maps below
        stats = self._read_pid_stats()
        names, identities_known = self._names, self._identities
        # A key with no identity yet: its name was written after the counter was read (or it has none,
        # like the [irq] row: then it is remembered with an empty one, and does not cause a read again).
        stat_keys = set(map(_first, stats))  # C-level loops below: thousands of keys a tick
        if sums[CTR_NAMES_WRITTEN] != self._names_written or stat_keys.difference(names).difference(
            identities_known
        ):
            old_names = names
            names = self._names = self._read_names()
            self._names_written = sums[CTR_NAMES_WRITTEN]
            # Identities of unchanged entries stay the same objects (a busy host writes a few names a tick)
            self._identities = {
                key: identity
                for key, identity in identities_known.items()
                if names.get(key) == old_names.get(key)
            }
        # After pid_stats: an entry read there has a generation at most the one read here.
        gens = (
            self._int_entries(b"gens")
            if sums[CTR_PIDS_REUSED] or any(map(_second, stat_keys))
            else {}  # no PID was ever reused: `gens` is empty
        )
        per_tgid: dict[int, KmallocCounters] = {}
        identities: dict[int, KernelIdentity] = {}
        retired: list[RetiredCounters] = []
        scale = self.sample_every
        make = KmallocCounters._make
        known = self._identities
        done: list[tuple[int, int]] = []
        for key, totals in stats:
            tgid, gen = key
            identity = known.get(key)
            if identity is None:
                identity = self._identity(key, names.get(key))
            if scale != 1:
                totals = (totals[0] * scale, totals[1] * scale, totals[2] * scale)
            counters = make(totals + identity)
            if gens and gen < gens.get(tgid, 0):
                if not complete:  # a slot not flushed may still hold some of its counts: final next time
                    continue
                named = names.get(key)
                first_ns = named[4] if named is not None else 0
                retired.append(RetiredCounters(tgid, self._boot_offset + first_ns / 1e9, counters))
                done.append((tgid, gen))
            else:
                per_tgid[tgid] = counters
                identities[tgid] = identity
        self._identities_read = identities  # forget() drops the generation read last
        for tgid, gen in done:  # final: nothing counts into a retired generation any more
            self._drop_cached((tgid, gen))
            for name in (b"pid_stats", b"proc_comms"):
                table = self.bpf[name]
                with contextlib.suppress(KeyError):
                    del table[table.Key(tgid, gen)]
        misses = self.recursion_misses()
        self.status_with_misses(misses)
        return KmallocReading(
            per_tgid=per_tgid,
            sample_every=self.sample_every,
            pid_map_full_drops=sums[CTR_PID_MAP_FULL],
            site_map_full_drops=sums[CTR_SITE_MAP_FULL],
            tail_lost=sums[CTR_TAIL_LOST],
            tail_rate_limited=sums[CTR_TAIL_RATE_LIMITED],
            memcg_map_full_drops=sums[CTR_MEMCG_MAP_FULL],
            after_exit_calls=sums[CTR_SLOT_ORPHANED] * self.sample_every,
            recursion_misses=misses,
            retired=tuple(retired),
            identities=identities,
            exited=self._read_exits(),
        )

    def _read_exits(self) -> frozenset[int]:
        """Processes whose main thread exited since the last read (taken out of the kernel's `exits`). Only
        an optimisation (a quiet process's exit seen at once): any failure reads as none."""
        if not self._exit_tp:
            return frozenset()
        try:
            tgids = list(self._int_entries(b"exits"))  # then only these are deleted: a newer exit stays
            self._delete(b"exits", [struct.pack("=I", tgid) for tgid in tgids])
            return frozenset(tgids)
        except Exception:
            return frozenset()

    def _drop_cached(self, key: tuple[int, int]) -> None:
        self._names.pop(key, None)
        self._identities.pop(key, None)

    def _identity(self, key: tuple[int, int], named: tuple[str, int, int, int, int] | None) -> KernelIdentity:
        """A counted entry's identity from its proc_comms entry, kept (the same object every read) once its
        cgroup path is resolved, until names are read again."""
        if named is None:
            # None in the kernel: the [irq] row, or proc_comms was full at the first kmalloc (it is written
            # only then). Kept: a later write counts KM_NAMES_WRITTEN, and the re-read replaces it.
            identity = self._identities[key] = KernelIdentity("", 0, "", 0, 0, key[1])
            return identity
        comm, cgroup_id, memcg_id, execs, _first = named
        identity = KernelIdentity(
            comm, cgroup_id, self._cgroup_path(cgroup_id, memcg_id), memcg_id, execs, key[1]
        )
        if (cgroup_id, memcg_id) in self._paths or not (cgroup_id or memcg_id):
            self._identities[key] = identity
        return identity

    def _read_names(self) -> dict[tuple[int, int], tuple[str, int, int, int, int]]:
        """(tgid, generation) -> (name, cgroup2 id, memcg id, execs, first_ns), from proc_comms."""
        try:
            keys, values, _count = self._entries(b"proc_comms")
        except OSError:  # no batch lookup: entry by entry
            return {
                (key.tgid, key.gen): (
                    bytes(value.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
                    value.cgroup_id,
                    value.memcg_id,
                    value.execs,
                    value.first_ns,
                )
                for key, value in self._struct_entries(b"proc_comms")
            }
        return {
            key: (raw.split(b"\0", 1)[0].decode("utf-8", "replace"), cgroup_id, memcg_id, execs, first)
            for key, (raw, cgroup_id, memcg_id, execs, first) in zip(
                struct.iter_unpack("=II", keys), struct.iter_unpack("=16sQQQQ", values), strict=True
            )
        }

    def _read_pid_stats(self) -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
        """[((tgid, generation), (calls, bytes_alloc, bytes_req) summed over the CPUs)] from pid_stats."""
        try:
            keys, values, _count = self._entries(b"pid_stats")
        except OSError:  # no batch lookup: entry by entry
            fields = ("calls", "bytes_alloc", "bytes_req")
            slow = []
            for key, per_cpu in self._struct_entries(b"pid_stats"):
                calls, bytes_alloc, bytes_req = _sum_percpu(per_cpu, fields)
                slow.append(((key.tgid, key.gen), (calls, bytes_alloc, bytes_req)))
            return slow
        per_entry = ctypes.sizeof(self.bpf[b"pid_stats"].Leaf) // 8  # each CPU's (calls, bytes, req)
        if per_entry == 6:  # two CPUs: the sums column by column, in C (thousands of entries a tick)
            q = memoryview(values).cast("Q")
            add = operator.add
            totals = zip(
                map(add, q[0::6], q[3::6]),
                map(add, q[1::6], q[4::6]),
                map(add, q[2::6], q[5::6]),
                strict=True,
            )
            return list(zip(struct.iter_unpack("=II", keys), totals, strict=True))
        entries = zip(
            struct.iter_unpack("=II", keys), struct.iter_unpack(f"={per_entry}Q", values), strict=True
        )
        if per_entry == 3:
            return list(entries)
        return [(key, (sum(v[0::3]), sum(v[1::3]), sum(v[2::3]))) for key, v in entries]

    def _cgroup_path(self, cgroup_id: int, memcg_id: int) -> str:
        """The path to attribute by, for the kernel's ids; cached once both resolved (ids are inodes of
        directories: a path, once known, stays right for the id)."""
        ids = (cgroup_id, memcg_id)
        path = self._paths.get(ids)
        if path is None:
            memory = self.resolve_memcg_id(memcg_id) if memcg_id else ""
            unified = self.resolve_cgroup_id(cgroup_id) if cgroup_id else ""
            path = kernel_cgroup_path(memory, unified)
            if (memory or not memcg_id) and (unified or not cgroup_id) and len(self._paths) < 65536:
                self._paths[ids] = path
        return path

    def forget(self, tgids: list[int]) -> None:
        """Drop the kernel entries of processes that have exited (their totals are already read): the
        generation read last for each tgid, and its `gens` entry when no newer one was started."""
        stats, comms, gens = self.bpf[b"pid_stats"], self.bpf[b"proc_comms"], self.bpf[b"gens"]
        for tgid in tgids:
            seen = self._identities_read.get(tgid)
            gen = seen.generation if seen is not None else 0
            self._drop_cached((tgid, gen))  # a later process with the same key is looked up afresh
            for table in (stats, comms):
                with contextlib.suppress(KeyError):
                    del table[table.Key(tgid, gen)]
            with contextlib.suppress(KeyError):
                if gens[gens.Key(tgid)].value == gen:
                    del gens[gens.Key(tgid)]
        # A CPU's slot may hold kmallocs such a process made after the read's flush (its exit path). Flushed
        # now, they find no entry and are counted as kmalloc_after_exit; left there, a new process given the
        # PID (same key: nothing raised its generation) would add its own to them on that CPU.
        if tgids:
            self.flush()

    # -- the drilled-in process ------------------------------------------------------------------------

    def set_focus(self, tgid: int | None, tail_min_bytes: int | None = None) -> None:
        """Collect call sites and sizes for `tgid` only (0/None: nobody); tail its kmallocs >= min bytes."""
        tgid = tgid or 0
        if tgid != self._focus_tgid:
            self.bpf[b"focus_sites"].clear()
            self.bpf[b"focus_sizes"].clear()
            self._tail.clear()
        self._focus_tgid = tgid
        cfg = _FocusCfg(tgid, int(tail_min_bytes is not None and tgid != 0), max(0, tail_min_bytes or 0))
        self.bpf[b"focus"][ctypes.c_int(0)] = cfg

    def read_focus(self) -> FocusReading | None:
        if not self._focus_tgid:
            return None
        self.bpf.ring_buffer_consume()
        sites = []
        for key, values in map_items(self.bpf[b"focus_sites"]):
            calls, bytes_alloc, bytes_req = _sum_percpu(values, ("calls", "bytes_alloc", "bytes_req"))
            sites.append(CallSite(key, self.symbol(key), calls, bytes_alloc, bytes_req))
        sites.sort(key=lambda s: s.bytes_alloc, reverse=True)
        sizes_table = self.bpf[b"focus_sizes"]
        # bpf_log2l(v) is floor(log2 v) + 1: shift so that index b counts sizes in [2**b, 2**(b+1)).
        raw = [sum(sizes_table.getvalue(i)) for i in range(SIZE_BUCKETS)]
        sizes = tuple([raw[0] + raw[1], *raw[2:], 0])
        return FocusReading(self._focus_tgid, tuple(sites), sizes, tuple(self._tail))

    def symbol(self, address: int) -> str:
        name = self._symbols.get(address)
        if name is None:
            raw = self.bpf.ksym(address, show_offset=True) if self.bpf else b"[unknown]"
            name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            self._symbols[address] = name
        return name

    def _on_tail_event(self, _ctx: Any, data: Any, _size: int) -> None:
        ev = ctypes.cast(data, ctypes.POINTER(_TailEvent)).contents
        self._tail.append(
            TailEvent(
                time=self._boot_offset + ev.ts_ns / 1e9,
                tid=ev.tid,
                call_site=self.symbol(ev.call_site),
                bytes_req=ev.bytes_req,
                bytes_alloc=ev.bytes_alloc,
                gfp_flags=ev.gfp_flags,
                gfp_text=decode_gfp(ev.gfp_flags, self._gfp_table),
                node=ev.node,
                ptr=ev.ptr,
            )
        )
        if len(self._tail) > self.tail_max:
            del self._tail[: len(self._tail) - self.tail_max]
