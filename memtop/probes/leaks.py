"""The leak probes: outstanding allocations by stack, kernel-wide (leaks_kernel.c) or for one process
(leaks_user.c). Both aggregate in the kernel per (stack, process); read() sums those aggregates, walks and
symbolizes their stacks, scans the address map for ages, prunes what went to zero and returns a LeakReading.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import math
import os
import random
import resource
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from memtop import tracefs
from memtop.errors import MemtopError
from memtop.leaks import (
    AGE_EDGES_S,
    DROP_NAMES,
    KIND_KERNEL,
    KIND_KERNEL_PAGES,
    KIND_USER,
    MAX_SAMPLE_RATE,
    STACK_LOST,
    USER_TRACK_BUDGET_PER_S,
    AdaptiveSampler,
    LeakReading,
    StackOutstanding,
)
from memtop.model import ProbeStatus
from memtop.probes import allocators
from memtop.probes.base import Probe, _one_line, int_cflag, raw_args_match
from memtop.probes.elf import ElfError, ElfInfo, Symbol, read_elf

# Indexes into the programs' `counters` array (see leaks_kernel.c / leaks_user.c).
COUNTER_NAMES = (
    "alloc_events",
    "tracked",
    "free_events",
    "frees_matched",
    "alloc_map_full",
    "aggregate_map_full",
    "stack_collisions",
    "stack_lost",
    "missed_frees",
    "aggregate_missing",
    "pending_map_full",  # user program only
)
KERNEL_COUNTER_NAMES = (*COUNTER_NAMES[:10], "cache_unlearned")  # leaks_kernel.h's CTR_CACHE_UNLEARNED

ALLOC_INFO = struct.Struct("<QQIiII")  # struct alloc_info: size, ts_ns, tgid, stack_id, weight, source
ALLOC_SOURCE_WORD = 7  # the source field's index in an alloc_info record read as 32-bit words
ALLOC_WEIGHT_WORD = 6  # the weight field's, likewise
ALLOC_TS_QWORD = 1  # the ts_ns field's index in a record read as 64-bit words
AGG_KEY = struct.Struct("<iIII")  # struct agg_key: stack_id, tgid, source, pad
AGG_VALUE = struct.Struct("<qq")  # struct agg_value (one per possible CPU): bytes, allocations

# Share of one core the age scans may take (a bigger map is scanned less often): 0.5 %, a twentieth of the
# whole collector's goal on a busy host (at 2 %, a map of 66,000 tracked allocations was rescanned at every
# read, an eighth of memtop's CPU).
AGE_SCAN_BUDGET = 0.005
AGE_SCAN_MAX_INTERVAL_S = 10.0
STACK_SWEEP_INTERVAL_S = 30.0  # how often unreferenced stacks are removed from the stack map


def _edges_ns() -> tuple[int, ...]:
    return tuple(int(edge * 1e9) for edge in AGE_EDGES_S)


AgeKey = tuple[int, int, int]  # (stack_id, tgid, source), as in struct agg_key


class _Ages:
    """Per (stack_id, tgid, source): the oldest timestamp and the age bins, from one scan of `allocs`."""

    def __init__(self, now_ns: int = 0) -> None:
        self.oldest: dict[AgeKey, int] = {}
        self.bins: dict[AgeKey, tuple[tuple[int, int], ...]] = {}
        self.now_ns = now_ns  # the bins are ages at this time
        self.entries = 0
        self.seconds = 0.0  # what the scan cost


def scan_ages(values: bytes, count: int, now_ns: int) -> _Ages:
    """Oldest timestamps and age bins of the tracked allocations (raw alloc_info records). About half a
    microsecond per record: the loop does no more than two dict lookups and a bisect each. One running
    sum list per (stack, process, source), nothing kept per record or bin: the scan's temporaries grow with
    the map (100k records), and a burst of them left Python's allocator holding megabytes after it."""
    started = time.perf_counter()
    ages = _Ages(now_ns)
    ages.entries = count
    edges = _edges_ns()
    oldest = ages.oldest
    sums: dict[AgeKey, list[int]] = {}  # per key: allocations, bytes, allocations, bytes, ... per bin
    zeros = [0] * (2 * len(edges))
    bisect_right = bisect.bisect_right
    for size, ts_ns, tgid, stack_id, weight, source in ALLOC_INFO.iter_unpack(
        memoryview(values)[: count * ALLOC_INFO.size]  # not a copy of the records
    ):
        key = (stack_id, tgid, source)
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = zeros.copy()
            oldest[key] = ts_ns
        elif ts_ns < oldest[key]:
            oldest[key] = ts_ns
        # bisect_right(...) - 1 is the bin; an allocation stamped after now_ns gives 0 -> bin 0 too.
        at = 2 * bisect_right(edges, now_ns - ts_ns) - 2
        if at < 0:
            at = 0
        acc[at] += weight
        acc[at + 1] += size * weight
    empty = (0, 0)
    ages.bins = {
        key: tuple((a, b) if a or b else empty for a, b in zip(acc[0::2], acc[1::2], strict=True))
        for key, acc in sums.items()
    }
    ages.seconds = time.perf_counter() - started
    return ages


ADAPT_FRESH_S = 0.5  # a read this soon after adapt() leaves the sampler alone


def _without_records(values: bytes, count: int, indices: list[int]) -> bytes:
    """The first `count` alloc_info records of `values` but those at `indices`."""
    size = ALLOC_INFO.size
    view = memoryview(values)
    parts = []
    start = 0
    for i in sorted(indices):
        parts.append(view[start * size : i * size])
        start = i + 1
    parts.append(view[start * size : count * size])
    return b"".join(parts)


def _tracked_now(counters: dict[str, int]) -> int:
    """Allocations in the address map now, from the programs' cumulative counters."""
    return max(
        0,
        counters["tracked"]
        - counters["alloc_map_full"]
        - counters["aggregate_map_full"]
        - counters["frees_matched"]
        - counters["missed_frees"],
    )


class _LeakProbe(Probe):
    """What the kernel-wide and the per-process leak probes share: reading, symbolizing and pruning."""

    counter_names: tuple[str, ...] = COUNTER_NAMES[:10]

    def __init__(
        self, max_allocs: int, max_stacks: int, max_aggregates: int, age_scan_budget: float = AGE_SCAN_BUDGET
    ) -> None:
        super().__init__()
        if not 0 < age_scan_budget <= 1:
            raise ValueError("age_scan_budget must be in (0, 1]")
        self.age_scan_budget = age_scan_budget
        self.max_allocs = max_allocs
        self.max_stacks = max_stacks
        self.max_aggregates = max_aggregates
        self.sample_rate = 1
        self._frames: dict[int, tuple[str, ...]] = {}  # stack id -> symbolized frames
        self._symbols: dict[int, str] = {}
        self._zero_before: set[bytes] = set()  # aggregate keys that were empty at the previous read
        self._referenced_before: set[int] = set()
        self._stacks_listed: set[int] = set()  # stack ids in the map at the previous sweep
        self._tgids_before: set[int] = set()
        self._last_sweep = 0.0
        self._ages = _Ages()
        self._last_age_scan = 0.0
        # The address map as this read's reconcile() read it, with the records it retired: the age scan
        # uses it (those left out) instead of reading the map again.
        self._allocs_read: tuple[bytes, int, list[int]] | None = None  # (records, count, indices retired)
        self._comms: dict[int, str] = {}
        # Where this object's sampling countdowns are (see _gap_allocations): (the object, map name).
        self._gap_map: tuple[weakref.ref[Any], bytes] | None = None

    def cflags(self) -> list[str]:
        return [
            int_cflag("MAX_ALLOCS", self.max_allocs, 1024, 1 << 22),
            int_cflag("MAX_STACKS", self.max_stacks, 256, 1 << 20),
            int_cflag("MAX_AGGREGATES", self.max_aggregates, 256, 1 << 20),
        ]

    # -- subclass hooks ------------------------------------------------------------------------------

    def kind_of(self, source: int) -> str:
        raise NotImplementedError

    def symbolize(self, address: int) -> str:
        raise NotImplementedError

    # -- reading -------------------------------------------------------------------------------------

    def _set_sample_rate(self, rate: int) -> None:
        config = self.bpf[b"config"]
        value = config[ctypes.c_int(0)]
        value.sample_every = rate
        config[ctypes.c_int(0)] = value
        self.sample_rate = rate

    def counters(self) -> dict[str, int]:
        table = self.bpf[b"counters"]
        counters = {name: sum(table.getvalue(i)) for i, name in enumerate(self.counter_names)}
        # Most allocations are counted in the sampling countdown's per-CPU value (see sample_gap_t).
        counters["alloc_events"] += self._gap_allocations()
        return counters

    def _gap_allocations(self) -> int:
        """Allocations counted in the sampling countdowns: in their own per-CPU array (sample_gap) or, when
        compiled into the kmalloc probe with its per-CPU slots, in each CPU's km_slot (LEAK_SAMPLE_GAP).
        Which of the two is decided once per BPF object (this runs every tick)."""
        if self._gap_map is None or self._gap_map[0]() is not self.bpf:
            try:
                self.bpf[b"sample_gap"]
                name = b"sample_gap"
            except KeyError:  # BCC's answer for a map the object does not have
                name = b"km_slot"
            self._gap_map = (weakref.ref(self.bpf), name)
        values = self.bpf[self._gap_map[1]].getvalue(0)
        if self._gap_map[1] == b"km_slot":
            return sum(slot.gap.allocations for slot in values)
        return sum(gap.allocations for gap in values)

    def _aggregates(self) -> dict[bytes, tuple[int, int]]:
        """Summed (bytes, allocations) per raw agg_key."""
        keys, values, count = self._entries(b"outstanding")
        if not count:
            return {}
        cpus = len(values) // count // AGG_VALUE.size  # a value is every possible CPU's agg_value
        rows = struct.Struct(f"<{2 * cpus}q").iter_unpack(values)
        size = AGG_KEY.size
        raw_keys = [keys[i : i + size] for i in range(0, count * size, size)]
        if cpus == 2:
            return {k: (v[0] + v[2], v[1] + v[3]) for k, v in zip(raw_keys, rows, strict=True)}
        return {k: (sum(v[0::2]), sum(v[1::2])) for k, v in zip(raw_keys, rows, strict=True)}

    def _read_ages(self, now_ns: int) -> _Ages:
        """A fresh scan of the address map, or the previous one while scanning would cost more than
        `age_scan_budget` of the time (a big map is scanned less often, at most AGE_SCAN_MAX_INTERVAL_S
        apart): ages and bins are then as of that scan."""
        now = time.monotonic()
        wait = min(AGE_SCAN_MAX_INTERVAL_S, self._ages.seconds / self.age_scan_budget)
        shared, self._allocs_read = self._allocs_read, None
        if self._last_age_scan and now - self._last_age_scan < wait:
            return self._ages
        if shared is not None:
            values, count, taken = shared
            values, count = _without_records(values, count, taken), count - len(taken)
        else:
            _keys, values, count = self._entries(b"allocs")
        self._ages = scan_ages(values, count, now_ns)
        self._last_age_scan = now
        return self._ages

    def stack_frames(self, stack_id: int) -> tuple[str, ...]:
        if stack_id < 0:
            return (STACK_LOST,)
        frames = self._frames.get(stack_id)
        if frames is None:
            table = self.bpf[b"stacks"]
            try:
                ips = table[table.Key(stack_id)].ip  # not walk(): it indexes past STACK_DEPTH frames
            except KeyError:  # swept away, or never stored: try again next read
                return (STACK_LOST,)
            addresses = []
            for address in ips:
                if not address:
                    break
                addresses.append(address)
            frames = tuple(self.symbol(address) for address in addresses) or (STACK_LOST,)
            self._frames[stack_id] = frames
        return frames

    def symbol(self, address: int) -> str:
        name = self._symbols.get(address)
        if name is None:
            name = self._symbols[address] = self.symbolize(address)
        return name

    def comm(self, tgid: int) -> str:
        name = self._comms.get(tgid)
        if name is None:
            name = ""
            with contextlib.suppress(KeyError):
                raw = self.bpf[b"comms"][ctypes.c_uint32(tgid)]
                name = bytes(raw.comm).split(b"\0", 1)[0].decode("utf-8", "replace")
            if not name:
                with contextlib.suppress(OSError):
                    name = Path(f"/proc/{tgid}/comm").read_text().strip()
            self._comms[tgid] = name
        return name

    def _read(self, reading_kind: str, aggregates: dict[bytes, tuple[int, int]] | None = None) -> LeakReading:
        """`aggregates`: this read's `_aggregates()` when the caller already has them."""
        now_ns = time.monotonic_ns()
        counters = self.counters()
        tracked_now = _tracked_now(counters)
        if aggregates is None:
            aggregates = self._aggregates()
            self._prune_empty(aggregates)
        ages = self._read_ages(now_ns)
        stacks = []
        referenced: set[int] = set()
        # Every process with an aggregate in the map, empty ones too: the BPF program writes a name when it
        # creates an aggregate, so a name whose process has none left can go (counting only the non-empty
        # ones left the names of processes whose allocations were all freed in the map for ever).
        tgids: set[int] = set()
        for raw_key, (outstanding, allocations) in aggregates.items():
            stack_id, tgid, source, _pad = AGG_KEY.unpack(raw_key)
            tgids.add(tgid)
            if outstanding == 0 and allocations == 0:
                continue
            referenced.add(stack_id)
            age_key = (stack_id, tgid, source)
            bins = ages.bins.get(age_key)
            stacks.append(
                StackOutstanding(
                    kind=self.kind_of(source),
                    stack_id=stack_id,
                    pid=tgid,
                    comm=self.comm(tgid),
                    outstanding_bytes=outstanding,
                    allocations=allocations,
                    oldest_ns=ages.oldest.get(age_key),
                    frames=self.stack_frames(stack_id),
                    age_bins=bins or (),
                )
            )
        self._prune(referenced, tgids)
        drops = {name: counters.get(name, 0) for name in DROP_NAMES}
        return LeakReading(
            kind=reading_kind,
            stacks=tuple(stacks),
            sample_rate=self.sample_rate,
            now_ns=now_ns,
            drops=drops,
            alloc_events=counters["alloc_events"],
            tracked=counters["tracked"],
            tracked_now=tracked_now,
        )

    def _prune_empty(self, aggregates: dict[bytes, tuple[int, int]]) -> None:
        """Delete the aggregates that read as empty now (`aggregates`, just read: call it at once) and at
        the previous read, in one bpf() call.

        An allocation that lands on one between this read and the delete (milliseconds, after seconds of
        emptiness) loses its accounting: when it is freed its aggregate is missing, counted as
        aggregate_missing. (Taking each one out with a lookup-and-delete and putting back what landed
        closed that window, but cost a bpf() call and a kernel allocation per key: thousands a read on a
        busy host, most of a leak read's time and of memtop's own kmallocs.)"""
        empty = {raw_key for raw_key, totals in aggregates.items() if totals == (0, 0)}
        with contextlib.suppress(OSError):  # not deleted now: the next read tries again
            self._delete(b"outstanding", sorted(empty & self._zero_before))
        self._zero_before = empty

    def _prune(self, referenced: set[int], tgids: set[int]) -> None:
        """Delete the names of processes that had an aggregate at the previous read and have none now
        (`tgids`: those with one, empty or not), and (now and then) stacks that no aggregate has referenced
        over two reads.

        A stack is only swept if it was already in the map at the previous sweep: one stored after this
        read's aggregates were taken is referenced by an allocation they do not show yet."""
        gone = self._tgids_before - tgids
        for tgid in gone:
            self._comms.pop(tgid, None)
        with contextlib.suppress(OSError):  # a name left behind costs a map slot, not a wrong figure
            self._delete(b"comms", [struct.pack("=I", tgid) for tgid in sorted(gone)])
        self._tgids_before = tgids
        now = time.monotonic()
        if now - self._last_sweep >= STACK_SWEEP_INTERVAL_S:
            self._last_sweep = now
            keep = referenced | self._referenced_before
            table = self.bpf[b"stacks"]
            listed = set()
            swept = []
            for key in list(table.keys()):
                if key.value in self._stacks_listed and key.value not in keep:
                    swept.append(key.value)
                    self._frames.pop(key.value, None)
                else:
                    listed.add(key.value)
            with contextlib.suppress(OSError):
                self._delete(b"stacks", [struct.pack("=i", stack_id) for stack_id in swept])
            self._stacks_listed = listed
        self._referenced_before = referenced

    def map_fill(self, tracked_now: int) -> float:
        return tracked_now / self.max_allocs


# -- kernel-wide -------------------------------------------------------------------------------------------

KERNEL_TRACEPOINTS = ("kmalloc", "kfree", "kmem_cache_alloc", "kmem_cache_free")
PAGE_TRACEPOINTS = ("mm_page_alloc", "mm_page_free", "mm_page_free_batched")
# The programs leaks_kernel.h adds to an object (kmalloc's is the host's when compiled into kmalloc.c).
LEAK_EVENTS = ("kfree", "kmem_cache_alloc", "kmem_cache_free", *PAGE_TRACEPOINTS)
# Frames the kernel's BPF dispatch puts on top of a raw tracepoint program's stack: not the allocation's.
BPF_DISPATCH_FRAMES = ("bpf_prog_", "__bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_")


# Page allocations made by the slab allocator to grow a cache: the objects in them are tracked (and shown)
# as slab allocations; counted again as pages they would be counted twice. (Large kmallocs, served by the
# page allocator directly, are matched in the kernel: see forget_backing_pages in leaks_kernel.h.)
SLAB_PAGE_FRAMES = ("allocate_slab", "new_slab", "alloc_slab_page")


def backs_slab(stack: StackOutstanding) -> bool:
    """Whether a page row's pages were allocated for a slab (its stack passes through the allocator's
    slab-growing functions)."""
    return stack.kind == KIND_KERNEL_PAGES and any(
        frame.split("+", 1)[0] in SLAB_PAGE_FRAMES for frame in stack.frames
    )


SOURCE_KIND_MASK = 0xFF  # struct alloc_info.source: the kind in bits 0-7, the slab cache above
CACHE_SHIFT = 8
KMALLOC_CLASS = 1 << 23  # a kmalloc's cache field: this | its bytes_alloc (see leaks_kernel.h)
SLABINFO = Path("/proc/slabinfo")


def cache_id(name: str) -> int:
    """The 23-bit id leaks_kernel.h's cache_id gives a slab cache name (its first 15 bytes)."""
    raw = name.encode()[:15].ljust(16, b"\0")
    lo, hi = struct.unpack("<QQ", raw)
    h = ((lo ^ (hi * 0x9E3779B97F4A7C15)) * 0xFF51AFD7ED558CCD) & (1 << 64) - 1
    return (h >> 41) & (KMALLOC_CLASS - 1)


def read_slabinfo(path: Path = SLABINFO) -> dict[str, tuple[int, int]]:
    """Per slab cache, (active objects, object size in bytes: the cache's `size`, what the kmem_cache_alloc
    tracepoint reports as bytes_alloc), from /proc/slabinfo; empty when unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines[2:]:
        fields = line.split()
        if len(fields) >= 4 and fields[1].isdigit() and fields[3].isdigit():
            out[fields[0]] = (int(fields[1]), int(fields[3]))
    return out


def slab_active_objects(path: Path = SLABINFO) -> dict[str, int]:
    """Active objects per slab cache, from /proc/slabinfo (empty when unreadable)."""
    return {name: active for name, (active, _size) in read_slabinfo(path).items()}


def kmalloc_size_class(name: str) -> int | None:
    """The object size of a kmalloc cache (kmalloc-64, kmalloc-cg-2k, dma-kmalloc-96, kmalloc-rnd-03-8k),
    None for any other cache."""
    if "kmalloc" not in name or name == "kmalloc_buckets":
        return None
    size = name.rsplit("-", 1)[-1]
    if size.endswith("k") and size[:-1].isdigit():
        return int(size[:-1]) * 1024
    return int(size) if size.isdigit() else None


def cache_limits(active: dict[str, int]) -> dict[int, tuple[str, int]]:
    """cache field (see leaks_kernel.h) -> (what to call it, objects the kernel says are live in it).
    Names whose ids collide are left out (not reconciled)."""
    limits: dict[int, tuple[str, int]] = {}
    collided: set[int] = set()
    classes: dict[int, int] = {}
    for name, objects in active.items():
        cid = cache_id(name)
        if cid in limits:
            collided.add(cid)
        limits[cid] = (name, objects)
        size = kmalloc_size_class(name)
        if size is not None:
            classes[size] = classes.get(size, 0) + objects
    for cid in collided:
        del limits[cid]
    for size, objects in classes.items():
        limits[KMALLOC_CLASS | size] = (f"kmalloc-{size}", objects)
    return limits


# kmem:kmem_cache_alloc's record as recent kernels (6.x, with the cache's name in it) build it from
# (call_site, ptr, cache, gfp_flags, node): bytes_req, bytes_alloc and name come from the cache, node and
# accounted from the last two. (Not one field per argument, as raw_args_match's other uses are: this exact
# list is the layout whose prototype is that one.)
CACHE_ALLOC_RECORD = (
    *("call_site", "ptr", "name", "bytes_req", "bytes_alloc"),
    *("gfp_flags", "node", "accounted"),
)
LEARNER = b"kmem_cache_alloc_learner"  # leaks_kernel.h's classic program that learns caches' sizes
LEARN_WINDOW_S = 2.0  # how long the learner stays attached each time
LEARN_RETRY_S = 30.0  # after the learner failed to attach, how long before it is tried again
LEARN_GAP_MAX_S = 300.0  # the longest wait after windows that learned nothing (the gap doubles up to it)
MAX_CACHES = 4096  # the slab caches cache_info holds (leaks_kernel.h's MAX_CACHES, set from here)


def raw_cache_alloc() -> bool:
    """Whether kmem_cache_alloc's raw tracepoint takes (call_site, ptr, cache, gfp_flags, node) here, and
    its record names the cache (what the learner reads): then its program can be a raw one."""
    return raw_args_match("kmem", "kmem_cache_alloc", CACHE_ALLOC_RECORD)


def raw_frees() -> tuple[bool, bool]:
    """Whether kfree's and kmem_cache_free's raw tracepoints take (call_site, ptr[, cache]) here."""
    kfree = raw_args_match("kmem", "kfree", ("call_site", "ptr"))
    cache_free = raw_args_match("kmem", "kmem_cache_free", ("call_site", "ptr", "name")) or raw_args_match(
        "kmem", "kmem_cache_free", ("call_site", "ptr")
    )
    return kfree, cache_free


class KernelLeakProbe(_LeakProbe):
    """Outstanding kmalloc / kmem_cache_alloc objects (and optionally pages) by kernel stack and process.

    sample_every None: adaptive 1-in-N (AdaptiveSampler, within a budget of tracked allocations per second);
    an integer fixes N.
    """

    name = "leaks"
    source = "leaks_kernel.c"
    counter_names = KERNEL_COUNTER_NAMES

    def __init__(
        self,
        sample_every: int | None = None,
        page_level: bool = False,
        max_allocs: int = 131072,
        max_stacks: int = 16384,
        max_aggregates: int = 32768,
        sampler: AdaptiveSampler | None = None,
        age_scan_budget: float = AGE_SCAN_BUDGET,
        reconcile_caches: bool = True,
    ) -> None:
        super().__init__(max_allocs, max_stacks, max_aggregates, age_scan_budget)
        if sample_every is not None:
            int_cflag("LEAK_SAMPLE", sample_every, 1, MAX_SAMPLE_RATE)  # validates: one-line MemtopError
        self.page_level = page_level
        self._overflows_seen = 0  # alloc + aggregate map overflows at the last adapt() or read()
        self._overflowing = False  # they grew at the last adapt()
        self._adapted_at = -math.inf  # time.monotonic() of the last adapt()
        self.sampler: AdaptiveSampler | None = None
        if sample_every is None:
            self.sampler = sampler or AdaptiveSampler()
            self.sample_rate = self.sampler.rate
        else:
            self.sample_rate = sample_every
        self.reconcile_caches = reconcile_caches
        self.freed_untraced: dict[str, int] = {}  # slab cache -> allocations retired by reconcile()
        # The raw kmem_cache_alloc program and its cache learner (see leaks_kernel.h's cache_info).
        self.raw_cache_alloc = False  # decided by cflags(), at compile
        self.learning = False  # the learner is attached
        self.learning_windows = 0  # times it was attached
        self.learner_error = ""  # why it could not be attached (then caches stay unlearned, counted)
        self.caches_relearned = 0  # learned entries dropped: their cache was gone or its size had changed
        self.hold_learning = False  # no new learning window (benchmarks hold the steady state)
        self._learn_lock = threading.RLock()  # the window's timer thread and the readers
        self._learn_timer: threading.Timer | None = None
        self._learning_closed = False  # close() began: no new window
        self._learner_retry_at = 0.0  # time.monotonic() before which a failed attach is not tried again
        self._unlearned_seen = 0  # the cache_unlearned counter at the last look
        # A cache whose allocations never join (say cache_info is full) would start a window at every read
        # that saw the counter grow, and keep the classic learner on most of the time: after a window that
        # learned no cache, the next one waits _learn_gap_s (2 s, doubling to LEARN_GAP_MAX_S; back to 0
        # after a window that learns one). Its sampled allocations stay counted as cache_unlearned.
        self.caches_learned = 0  # cache_info's entries when last counted (window starts and ends, reads)
        self._learned_before: set[bytes] = set()  # cache_info's keys when the current window began
        self._learn_gap_s = 0.0
        self._next_window_at = 0.0  # time.monotonic() before which no window begins
        self._host_bpf: Any = None  # the kmalloc probe's object this probe's programs were compiled into
        self.shared = False  # running inside that object
        self.embed_error = ""  # why compiling into it failed (then this probe runs on its own)

    def cflags(self) -> list[str]:
        page_shift = resource.getpagesize().bit_length() - 1
        raw_kfree, raw_cache_free = raw_frees()
        fields = tracefs.tracepoint_fields("kmem", "kmem_cache_alloc")
        name = fields.get("name")  # a __data_loc string
        self.raw_cache_alloc = raw_cache_alloc()
        from memtop.probes.kmalloc import raw_kmalloc

        raw_alloc_flags = []
        if self.raw_cache_alloc:
            raw_alloc_flags = [
                int_cflag("RAW_CACHE_ALLOC", 1, 0, 1),
                int_cflag("PTR_OFFSET", fields["ptr"].offset, 0, 4096),
                int_cflag("BYTES_ALLOC_OFFSET", fields["bytes_alloc"].offset, 0, 4096),
                int_cflag("CALL_SITE_OFFSET", fields["call_site"].offset, 0, 4096),
                int_cflag("MAX_CACHES", MAX_CACHES, 1, 1 << 20),
            ]
        return [
            *super().cflags(),
            *raw_alloc_flags,
            int_cflag("PAGE_LEVEL", int(self.page_level), 0, 1),
            int_cflag("PAGE_SHIFT_BITS", page_shift, 10, 20),
            int_cflag("RAW_KMALLOC", int(raw_kmalloc()), 0, 1),
            int_cflag("RAW_KFREE", int(raw_kfree), 0, 1),
            int_cflag("RAW_CACHE_FREE", int(raw_cache_free), 0, 1),
            int_cflag("HAVE_CACHE_NAME", int(name is not None), 0, 1),
            int_cflag("NAME_LOC_OFFSET", name.offset if name is not None else 0, 0, 4096),
        ]

    def _missing(self) -> list[str]:
        needed = KERNEL_TRACEPOINTS + (PAGE_TRACEPOINTS if self.page_level else ())
        return [f"kmem:{event}" for event in needed if not tracefs.tracepoint_exists("kmem", event)]

    # -- compiled into the kmalloc probe's object --------------------------------------------------

    def can_embed(self) -> bool:
        """Whether the kmalloc probe should try compiling this probe's programs into its own object."""
        return not self._missing()

    def adopt(self, bpf: Any) -> None:
        """The kmalloc probe's object, loaded with this probe's programs in it; start() will use it."""
        self._host_bpf = bpf

    def host_closed(self, bpf: Any) -> None:
        """The kmalloc probe is detaching the object this probe runs in."""
        if self.bpf is bpf:
            self.end_learning(closing=True)
        if self.shared and self.bpf is bpf:
            self.bpf = None
            self.shared = False
            if self.status.status == "running":
                self.status = ProbeStatus("stopped", "with the kmalloc probe, whose programs it shared")
        self._host_bpf = None

    def own_functions(self) -> list[bytes]:
        bpf = self.bpf if self.bpf is not None else self._host_bpf
        if bpf is None:
            return []
        if not self.shared and self._host_bpf is None:
            return list(bpf.funcs)
        return [name for name in bpf.funcs if any(event.encode() in name for event in LEAK_EVENTS)]

    def dump(self) -> str:
        return (
            super().dump()
            + "\n// (live mode compiles leaks_kernel.h into kmalloc.c with -DWITH_LEAKS=1; this file is its"
            " fallback)"
        )

    def start(self) -> None:
        missing = self._missing()
        if missing:
            raise MemtopError(
                f"tracepoint {', '.join(missing)} missing: the leaks probe needs it (run `memtop doctor`)"
            )
        if self._host_bpf is not None:
            self.bpf, self.shared = self._host_bpf, True
            self.status = ProbeStatus("running", self.describe())
        else:
            super().start()
        self._set_sample_rate(self.sample_rate)
        if self.raw_cache_alloc:
            self._unlearned_seen = 0
            self._learning_closed = False
            self.caches_learned = 0  # a new object: its cache_info is empty, and no window has waited yet
            self._learn_gap_s = self._next_window_at = 0.0
            self._start_learning()
            self.status = ProbeStatus("running", self.describe())

    # -- learning the slab caches' sizes (raw kmem_cache_alloc) ---------------------------------------

    def _set_learning(self, window: int) -> None:
        config = self.bpf[b"config"]
        value = config[ctypes.c_int(0)]
        value.learning = window
        config[ctypes.c_int(0)] = value

    def _set_sample_rate(self, rate: int) -> None:
        with self._learn_lock:  # config holds the learning window too: one writer at a time
            super()._set_sample_rate(rate)

    def _start_learning(self) -> None:
        """Attach the learner for one window of LEARN_WINDOW_S (a timer takes it off, ticking or not):
        every cache that allocates meanwhile is learned."""
        with self._learn_lock:
            if self.learning or self.bpf is None or self.hold_learning or self._learning_closed:
                return
            if time.monotonic() < max(self._learner_retry_at, self._next_window_at):
                return
            self._learned_before = self._learned_keys()
            self.learning = True  # first: whatever interrupts what follows, end_learning() tries the detach
            try:
                self.bpf.attach_tracepoint(tp=b"kmem:kmem_cache_alloc", fn_name=LEARNER)
            except Exception as exc:  # BCC raises bare Exception
                self.learning = False
                self.learner_error = _one_line(exc)
                self._learner_retry_at = time.monotonic() + LEARN_RETRY_S
                return
            self.learner_error = ""
            self.learning_windows += 1
            window = self.learning_windows
            try:
                self._set_learning(window)
                timer = threading.Timer(LEARN_WINDOW_S, self._window_over, args=(window,))
                timer.daemon = True
                timer.start()
            except Exception as exc:
                self.learner_error = _one_line(exc)
                self._end_learning()
                return
            self._learn_timer = timer

    def _window_over(self, window: int) -> None:
        with self._learn_lock:
            if not self.learning or window != self.learning_windows:
                return  # ended already, and maybe another one began
            self._end_learning()
            self._after_window()
            # The counter grows during a window too (a cache's first allocation there can reach the raw
            # program before the learner): that is the window's own, not a reason for another one.
            with contextlib.suppress(Exception):
                self._unlearned_seen = max(self._unlearned_seen, self.counters()["cache_unlearned"])

    def _learned_keys(self) -> set[bytes]:
        """cache_info's keys now (their number kept in caches_learned); none if the map cannot be read."""
        try:
            keys = {bytes(key) for key, _info in self._struct_entries(b"cache_info")}
        except Exception:  # BCC raises bare Exception
            return set()
        self.caches_learned = len(keys)
        return keys

    def _after_window(self) -> None:
        """A window's timer ended it: if it learned no cache (no key that was not there when it began: a
        read may drop stale entries meanwhile), the next one waits (see _learn_gap_s)."""
        if self._learned_keys() - self._learned_before:
            self._learn_gap_s = 0.0
        else:
            self._learn_gap_s = min(max(2 * self._learn_gap_s, LEARN_WINDOW_S), LEARN_GAP_MAX_S)
        self._next_window_at = time.monotonic() + self._learn_gap_s

    def end_learning(self, closing: bool = False) -> None:
        """Take the learner off now (if it is on); a later unknown cache attaches it again, unless `closing`
        (the probe is being closed: a tick still running cannot attach it after the detach; start() allows
        it again)."""
        with self._learn_lock:
            if closing:
                self._learning_closed = True
            if self._learn_timer is not None:
                self._learn_timer.cancel()
                self._learn_timer = None
            self._end_learning()

    def _end_learning(self) -> None:
        if not self.learning:
            return
        if self.bpf is not None:
            with contextlib.suppress(Exception):
                self._set_learning(0)
            with contextlib.suppress(Exception):
                self.bpf.detach_tracepoint(tp=b"kmem:kmem_cache_alloc")
        self.learning = False  # after the detach: `learning` False means the learner is off

    def tend_learning(self, unlearned: int) -> None:
        """Given the cache_unlearned counter (cumulative): attach the learner when it grew since the last
        look outside a window (a sampled allocation's cache is unknown)."""
        if not self.raw_cache_alloc or self.bpf is None:
            return
        with self._learn_lock:
            grew = unlearned > self._unlearned_seen
            self._unlearned_seen = max(self._unlearned_seen, unlearned)
            if grew and not self.learning:
                self._start_learning()

    def check_learned(self, slabinfo: dict[str, tuple[int, int]]) -> int:
        """Given /proc/slabinfo (read_slabinfo): drop each learned cache whose name is no longer there (it
        was destroyed: a new cache may get its address) or whose size is not the kernel's; they are learned
        again when they allocate. Names that share their first 15 bytes share a cache id: those are only
        checked for being there. Returns how many were dropped."""
        if not slabinfo or not self.raw_cache_alloc or self.bpf is None:
            return 0
        with self._learn_lock:  # the window's timer reads cache_info too (the same batch buffers)
            return self._check_learned(slabinfo)

    def _check_learned(self, slabinfo: dict[str, tuple[int, int]]) -> int:
        sizes: dict[int, int | None] = {}  # cache id -> its object size (None: two names share the id)
        for name, (_active, size) in slabinfo.items():
            cid = cache_id(name)
            sizes[cid] = None if cid in sizes else size
        stale = []
        entries = self._struct_entries(b"cache_info")  # batched: this runs on every read
        for key, info in entries:
            cid = info.source >> CACHE_SHIFT
            if cid not in sizes or sizes[cid] not in (None, info.bytes_alloc):
                stale.append(bytes(key))
        gone = self._delete(b"cache_info", stale)
        dropped = len(stale) - len(gone)
        self.caches_relearned += dropped
        self.caches_learned = len(entries) - dropped
        return dropped

    def close(self) -> None:
        """Standalone: detach and unload. Inside the kmalloc probe's object: switch tracking off and detach
        this probe's own programs (kfree, kmem_cache_*, pages); the shared kmalloc program stays."""
        self.end_learning(closing=True)
        if not self.shared:
            super().close()
            return
        bpf, self.bpf, self.shared = self.bpf, None, False
        if bpf is not None:
            with self._learn_lock, contextlib.suppress(Exception):
                config = bpf[b"config"]
                value = config[ctypes.c_int(0)]
                value.sample_every = 0
                config[ctypes.c_int(0)] = value
            for name in [n for n in bpf.funcs if any(e.encode() in n for e in LEAK_EVENTS)]:
                with contextlib.suppress(Exception):
                    if name.startswith(b"raw_tracepoint__"):
                        bpf.detach_raw_tracepoint(tp=name[len(b"raw_tracepoint__") :])
                    elif name.startswith(b"tracepoint__"):
                        category, _, event = name[len(b"tracepoint__") :].partition(b"__")
                        bpf.detach_tracepoint(tp=category + b":" + event)
        if self.status.status == "running":
            self.status = ProbeStatus("stopped", "")

    def describe(self) -> str:
        how = "adaptive" if self.sampler is not None else "fixed"
        pages = ", pages" if self.page_level else ""
        where = ", in the kmalloc probe's programs" if self.shared else ""
        if self.embed_error:
            where = f", on its own (compiling it into the kmalloc probe failed: {self.embed_error})"
        caches = ""
        if self.learner_error:
            caches = f", slab caches' sizes not learned ({self.learner_error})"
        elif self.raw_cache_alloc:
            caches = ", slab caches' sizes learned from the classic tracepoint"
            if self.caches_learned >= MAX_CACHES:
                caches += f" (its table is full at {MAX_CACHES:,} caches: others stay unlearned, counted)"
        return f"kmem slab alloc/free{pages}, 1 in {self.sample_rate} tracked ({how}){where}{caches}"

    @property
    def effective_sample_rate(self) -> int:
        return self.sample_rate

    def kind_of(self, source: int) -> str:
        return KIND_KERNEL_PAGES if source & SOURCE_KIND_MASK == 1 else KIND_KERNEL

    def symbolize(self, address: int) -> str:
        raw = self.bpf.ksym(address, show_offset=True)
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    def stack_frames(self, stack_id: int) -> tuple[str, ...]:
        """The allocation's frames: a raw tracepoint program's stack starts inside the BPF dispatch
        (the program, bpf_trace_run*, __bpf_trace_*), which is cut off."""
        frames = super().stack_frames(stack_id)
        start = 0
        while start < len(frames) - 1 and frames[start].startswith(BPF_DISPATCH_FRAMES):
            start += 1
        return frames[start:]

    # -- frees no tracepoint reports ------------------------------------------------------------------

    def reconcile(
        self, aggregates: dict[bytes, tuple[int, int]], active: dict[str, int] | None = None
    ) -> dict[bytes, tuple[int, int]]:
        """Hold each slab cache's outstanding count to what the kernel says is live in it; `aggregates`
        (`_aggregates()`) with what was retired taken off, as the map holds them now.

        Frees without a tracepoint (kmem_cache_free_bulk, the NAPI skb cache, kfree_rcu batches) leave
        their allocations tracked for ever. Where a cache's tracked objects (weighted) exceed its
        active objects in /proc/slabinfo (an upper bound of what is live: SLUB counts objects on per-CPU
        free lists as active), the oldest tracked ones cannot all be live: they are retired, oldest first,
        and counted per cache as freed untraced. kmalloc'd objects are held to the sum of the kmalloc-*
        caches of their size class.

        A BPF program updating one of the retired aggregates between this read and write loses that
        update (the same race as pruning, see _prune_empty)."""
        per_cache: dict[int, int] = {}
        for raw_key, (_bytes, allocations) in aggregates.items():
            cid = AGG_KEY.unpack(raw_key)[2] >> CACHE_SHIFT
            if cid and allocations > 0:
                per_cache[cid] = per_cache.get(cid, 0) + allocations
        if not per_cache:
            return aggregates
        limits = cache_limits(slab_active_objects() if active is None else active)
        excess = {
            cid: n - limits[cid][1] for cid, n in per_cache.items() if cid in limits and n > limits[cid][1]
        }
        if not excess:
            return aggregates
        keys, values, count = self._entries(b"allocs")
        key_size = len(keys) // count if count else 0
        # The source field of every record at once (a u32 at ALLOC_SOURCE_WORD of each): a map of 100k
        # tracked allocations is scanned in C, and only the records of caches over their count unpacked.
        records = memoryview(values)[: count * ALLOC_INFO.size]
        words = records.cast("I")
        sources = words[ALLOC_SOURCE_WORD :: ALLOC_INFO.size // 4]
        over = {source for source in set(sources) if source >> CACHE_SHIFT in excess}
        # Per cache over its count, its records' indices oldest first: an int per record, not a tuple
        # (a cache can have tens of thousands tracked, and a burst of tuples for each left Python's
        # allocator holding megabytes after the read).
        stamps = records.cast("Q")[ALLOC_TS_QWORD :: ALLOC_INFO.size // 8]
        weights = words[ALLOC_WEIGHT_WORD :: ALLOC_INFO.size // 4]
        candidates: dict[int, list[int]] = {}
        for i in [i for i, source in enumerate(sources) if source in over]:
            candidates.setdefault(sources[i] >> CACHE_SHIFT, []).append(i)
        chosen: list[tuple[bytes, int, int, int, int, int, int]] = []  # the oldest of each, up to its excess
        taken: list[int] = []  # their records' indices
        for cid, indices in candidates.items():
            indices.sort(key=stamps.__getitem__)
            left = excess[cid]
            for i in indices:
                if left <= 0:
                    break
                left -= weights[i]
                size, _ts_ns, tgid, stack_id, weight, source = ALLOC_INFO.unpack_from(
                    values, i * ALLOC_INFO.size
                )
                chosen.append(
                    (keys[i * key_size : (i + 1) * key_size], size, tgid, stack_id, weight, source, cid)
                )
                taken.append(i)
        self._allocs_read = (values, count, taken)
        # One batch; an allocation freed meanwhile is skipped (its free took it off its aggregate already).
        missing = set(self._delete(b"allocs", [entry[0] for entry in chosen]))
        adjust: dict[bytes, list[int]] = {}
        for raw, size, tgid, stack_id, weight, source, cid in chosen:
            if raw in missing:
                continue
            agg = adjust.setdefault(AGG_KEY.pack(stack_id, tgid, source, 0), [0, 0])
            agg[0] += size * weight
            agg[1] += weight
            name = limits[cid][0]
            self.freed_untraced[name] = self.freed_untraced.get(name, 0) + weight
        outstanding = self.bpf[b"outstanding"]
        corrected = dict(aggregates)
        for raw_key, (retired_bytes, retired) in adjust.items():
            key = outstanding.Key.from_buffer_copy(raw_key)
            try:
                value = outstanding[key]
            except KeyError:  # pruned meanwhile: nothing is left to show either
                corrected.pop(raw_key, None)
                continue
            value[0].bytes -= retired_bytes
            value[0].allocations -= retired
            outstanding[key] = value
            if raw_key in corrected:
                total_bytes, allocations = corrected[raw_key]
                corrected[raw_key] = (total_bytes - retired_bytes, allocations - retired)
        return corrected

    def outstanding_by_cache(self) -> dict[str, int]:
        """Tracked outstanding allocations (weighted) per slab cache, as reconcile() counts them."""
        names = {cid: name for cid, (name, _live) in cache_limits(slab_active_objects()).items()}
        out: dict[str, int] = {}
        for raw_key, (_bytes, allocations) in self._aggregates().items():
            cid = AGG_KEY.unpack(raw_key)[2] >> CACHE_SHIFT
            if cid in names:
                out[names[cid]] = out.get(names[cid], 0) + allocations
        return out

    def adapt(self) -> bool:
        """The cheap part of a read, for the ticks that do not read the aggregates (the live source reads
        them every few seconds while no view shows them): the adaptive 1 in N follows the allocation rate
        and the address map's fill every tick, from the counters alone (one per-CPU array). True when a
        full read (which also prunes) should come now: a map overflowed since the last look."""
        counters = self.counters()
        self.tend_learning(counters.get("cache_unlearned", 0))
        full = counters["alloc_map_full"] + counters["aggregate_map_full"]
        growing, self._overflows_seen = full != self._overflows_seen, full
        # Only when overflows start: a map that stays full (live objects, more stacks than it holds) is read
        # at the usual pace, not every tick.
        start, self._overflowing = growing and not self._overflowing, growing
        self._adapted_at = time.monotonic()
        if self.sampler is not None:
            rate = self.sampler.update(
                time.monotonic(), counters["alloc_events"], self.map_fill(_tracked_now(counters))
            )
            if rate != self.sample_rate:
                self._set_sample_rate(rate)
        return start

    def read(self) -> LeakReading:
        self._allocs_read = None
        aggregates = self._aggregates()  # read once: reconcile() and the reading share it
        self._prune_empty(aggregates)  # at once: see its docstring
        slabinfo = read_slabinfo() if self.reconcile_caches or self.raw_cache_alloc else {}
        if self.reconcile_caches:
            active = {name: objects for name, (objects, _size) in slabinfo.items()}
            aggregates = self.reconcile(aggregates, active)
        reading = self._read(KIND_KERNEL, aggregates)
        if self.freed_untraced:
            untraced = {f"freed_untraced:{name}": n for name, n in sorted(self.freed_untraced.items())}
            total = sum(self.freed_untraced.values())
            reading = dataclasses.replace(
                reading, drops={**reading.drops, "freed_untraced": total, **untraced}
            )
        if self.page_level:  # the pages of a slab are the objects' memory, counted on their own rows
            kept = tuple(s for s in reading.stacks if not backs_slab(s))
            reading = dataclasses.replace(reading, stacks=kept)
        if self.raw_cache_alloc:
            self.check_learned(slabinfo)
            self.tend_learning(reading.drops.get("cache_unlearned", 0))
        misses = self.recursion_misses()
        reading = dataclasses.replace(reading, drops={**reading.drops, "recursion_misses": misses})
        self._overflows_seen = reading.drops.get("alloc_map_full", 0) + reading.drops.get(
            "aggregate_map_full", 0
        )
        # adapt() just fed the sampler (this tick's read was forced by an overflow): a second rate over the
        # milliseconds in between would be noise.
        if self.sampler is not None and time.monotonic() - self._adapted_at > ADAPT_FRESH_S:
            rate = self.sampler.update(
                time.monotonic(), reading.alloc_events, self.map_fill(reading.tracked_now)
            )
            if rate != self.sample_rate:
                self._set_sample_rate(rate)
                reading = dataclasses.replace(reading, sample_rate=rate)  # the N in force from now on
        self.status_with_misses(misses)
        return reading


# -- one process ------------------------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), None if it is gone or a
    zombie: with the pid, it tells the process apart from a later one that reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def mapped_objects(pid: int) -> dict[str, str]:
    """The files mapped executable into a process, its executable first: {path as /proc/PID/maps names it:
    /proc/PID/map_files/<range> of one of its mappings}.

    The map_files link opens the very file the process mapped, wherever it lives: inside a container's
    mount namespace, under a chroot, or replaced (deleted) on disk since. The path alone can name another
    file from here (it is resolved against our root, or the container's), and uprobes go by inode.
    """
    objects = {o.path: o.open_path for o in allocators.mapped_objects(pid)}
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = ""
    if exe in objects:
        objects = {exe: objects[exe], **{k: v for k, v in objects.items() if k != exe}}
    return objects


MAX_NEW_SITES = 4096  # call sites of a throwing operator new hooked at most (each is one uprobe)
NEW_SITES_PER_READ = 256  # hooked per read at most (an attach takes a few ms)


class UserLeakProbe(_LeakProbe):
    """Outstanding heap allocations and anonymous mmaps of one process by user stack: uprobes on the
    allocator entry points the process really resolves (memtop.probes.allocators: its link map, by
    exported symbols), opened through /proc/PID/map_files so that containers and chroots get their own copy
    probed.

    sample_every None: adaptive 1-in-N (AdaptiveSampler starting at 1, so small programs are exact);
    an integer fixes N. Counts are then estimates (each tracked allocation stands for N).
    """

    name = "leaks-user"
    source = "leaks_user.c"
    counter_names = COUNTER_NAMES

    def __init__(
        self,
        pid: int,
        sample_every: int | None = None,
        max_allocs: int = 262144,
        max_stacks: int = 16384,
        max_aggregates: int = 32768,
        age_scan_budget: float = AGE_SCAN_BUDGET,
        sampler: AdaptiveSampler | None = None,
    ) -> None:
        super().__init__(max_allocs, max_stacks, max_aggregates, age_scan_budget)
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise MemtopError(f"PID must be a positive integer, got {pid!r}")
        if sample_every is not None:
            int_cflag("LEAK_SAMPLE", sample_every, 1, MAX_SAMPLE_RATE)  # validates: one-line MemtopError
        self.pid = pid
        self.sampler: AdaptiveSampler | None = None
        if sample_every is None:
            self.sampler = sampler or AdaptiveSampler(budget_per_s=USER_TRACK_BUDGET_PER_S, initial=1)
            self.sample_rate = self.sampler.rate
        else:
            self.sample_rate = sample_every
        self.start_time = process_start_time(pid)
        if self.start_time is None:
            raise MemtopError(f"no process with PID {pid}")
        self._module_symbols = ModuleSymbols(pid)
        self.allocator = ""  # the object whose malloc is probed, as the process sees it
        self.mapper = ""  # the object whose mmap is probed ("" when none was found)
        self.attached: list[str] = []
        self.hooks: list[allocators.Hook] = []
        self.alloc_events = 0
        # Thinning (see _thin): what the kernel's aggregates are off by, per raw agg_key, and the entries
        # it took out of the address map (which the counters do not know about).
        self._corrections: dict[bytes, tuple[int, int]] = {}
        self._thinned = 0
        # address key -> (its ts_ns, extra weight, size, raw agg_key) of entries kept by thinning
        self._extra: dict[bytes, tuple[int, int, int, bytes]] = {}
        self.new_sites_hooked = 0  # call sites of a throwing operator new with a uprobe on their return
        self.new_sites_failed = 0

    def cflags(self) -> list[str]:
        return [
            *super().cflags(),
            int_cflag("USER_PAGE_SIZE", resource.getpagesize(), 4096, 1 << 21),
            int_cflag("MAX_NEW_SITES", MAX_NEW_SITES, 16, 1 << 16),
        ]

    def find_functions(self) -> list[allocators.Hook]:
        """The uprobes to attach: each allocator entry point at the object the process resolves it to.
        Raises MemtopError (one line, naming the object that provides malloc) when malloc/free cannot be
        followed."""
        resolution = allocators.resolve(self.pid)
        reason = allocators.not_followed_reason(self.pid, resolution)
        if reason:
            raise MemtopError(reason)
        provider = resolution.malloc_provider
        self.allocator = provider.path if provider else ""
        mmap_found = resolution.providers.get("mmap")
        self.mapper = mmap_found[0].path if mmap_found else ""
        self.hooks = resolution.hooks
        return resolution.hooks

    def start(self) -> None:
        hooks = self.find_functions()
        super().start()
        try:
            self._set_sample_rate(self.sample_rate)
            for hook in hooks:
                self._attach(hook)
        except Exception as exc:
            self.close()
            if isinstance(exc, MemtopError):
                raise
            if process_start_time(self.pid) != self.start_time:
                raise MemtopError(f"PID {self.pid} exited") from None
            raise MemtopError(
                f"leaks-user probe failed to attach to PID {self.pid}: {_one_line(exc)}"
            ) from None
        if self.sampler is not None:
            self.sampler.update(time.monotonic(), 0)  # the first read already has a rate to adapt to
        self.status = type(self.status)("running", self.describe())

    def _attach(self, hook: allocators.Hook) -> None:
        path = hook.obj.open_path.encode()
        self.bpf.attach_uprobe(name=path, addr=hook.address, fn_name=hook.entry.encode(), pid=self.pid)
        if hook.ret is not None:
            self.bpf.attach_uretprobe(name=path, addr=hook.address, fn_name=hook.ret.encode(), pid=self.pid)
        self.attached.append(hook.symbol)

    def describe(self) -> str:
        objects = list(dict.fromkeys(os.path.basename(hook.obj.path) for hook in self.hooks))
        where = " + ".join(objects) or os.path.basename(self.allocator)
        mmap = "" if self.mapper else ", no mmap tracking"
        functions = ", ".join(self.attached)
        how = "adaptive" if self.sampler is not None else "fixed"
        estimate = " (estimates)" if self.sample_rate > 1 else ""
        sites = (
            f", operator new hooked at {self.new_sites_hooked} call sites" if self.new_sites_hooked else ""
        )
        return (
            f"pid {self.pid}: uprobes on {where} ({functions}){mmap}{sites}, 1 in {self.sample_rate} tracked "
            f"({how}){estimate}, {self.alloc_events:,} allocator calls seen"
        )

    @property
    def alive(self) -> bool:
        """False once the process has exited (or its pid belongs to another process now)."""
        return process_start_time(self.pid) == self.start_time

    @property
    def effective_sample_rate(self) -> int:
        return self.sample_rate

    def kind_of(self, source: int) -> str:
        return KIND_USER

    def comm(self, tgid: int) -> str:
        """The process's name now (it follows exec), else the name the BPF program saw."""
        name = self._comms.get(tgid)
        if name is None:
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{tgid}/comm").read_text().strip()
            if not name:
                self._comms.pop(tgid, None)
                name = super().comm(tgid)
            self._comms[tgid] = name
        return name

    def symbolize(self, address: int) -> str:
        raw = self.bpf.sym(address, self.pid, show_module=True, show_offset=True)
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return self._module_symbols.checked(address, name)

    def _aggregates(self) -> dict[bytes, tuple[int, int]]:
        totals = super()._aggregates()
        for raw_key in [k for k in self._corrections if k not in totals]:
            del self._corrections[raw_key]  # pruned: nothing is left to correct
        for raw_key, (extra_bytes, extra_allocations) in self._corrections.items():
            outstanding, allocations = totals[raw_key]
            totals[raw_key] = (outstanding + extra_bytes, allocations + extra_allocations)
        return totals

    def _thin(self, rate: int) -> None:
        """Bring the tracked allocations to the new 1-in-`rate`: each one tracked with a smaller weight w
        stays with probability w/rate (standing for `rate` from now on), else leaves the address map. The
        estimate stays unbiased and the map, full when the rate was raised for it, empties to about w/rate:
        without this, a map filled before the rate rose (or by a slow leak) would stay full and drop
        everything new.

        Nothing the BPF programs write is written from here (a BPF update racing with ours would be lost):
        the leaving entries are deleted in batches, and what the kernel's aggregates are then off by (the
        weight of those deleted, the extra weight of those kept) is kept in _corrections and added when they
        are read. A kept entry's extra weight is taken back once a scan finds it freed (_reconcile)."""
        keys, values, count = self._entries(b"allocs")
        chance = random.Random()
        leaving: list[bytes] = []
        leaving_deltas: list[tuple[bytes, int, int]] = []
        for i, (size, ts_ns, tgid, stack_id, weight, source) in enumerate(
            ALLOC_INFO.iter_unpack(values[: count * ALLOC_INFO.size])
        ):
            raw_key = keys[i * 8 : (i + 1) * 8]
            effective = weight + self._extra.get(raw_key, (0, 0, 0, b""))[1]
            if effective >= rate or effective <= 0:
                continue
            raw_agg = AGG_KEY.pack(stack_id, tgid, source, 0)
            if chance.random() * rate < effective:
                self._extra[raw_key] = (ts_ns, rate - weight, size, raw_agg)
                self._correct(raw_agg, size * (rate - effective), rate - effective)
            else:
                leaving.append(raw_key)
                leaving_deltas.append((raw_agg, -size * effective, -effective))
        self._delete_tracked(leaving, leaving_deltas)

    def _correct(self, raw_agg: bytes, delta_bytes: int, delta_allocations: int) -> None:
        extra_bytes, extra_allocations = self._corrections.get(raw_agg, (0, 0))
        self._corrections[raw_agg] = (extra_bytes + delta_bytes, extra_allocations + delta_allocations)

    def _read_ages(self, now_ns: int) -> _Ages:
        before = self._last_age_scan
        ages = super()._read_ages(now_ns)
        if self._extra and self._last_age_scan != before:
            self._reconcile()
        return ages

    def _reconcile(self) -> None:
        """Take back the extra weight of kept entries that have been freed (or reused by a new allocation)."""
        keys, values, count = self._entries(b"allocs")
        present = {
            keys[i * 8 : (i + 1) * 8]: ts_ns
            for i, (_, ts_ns, _, _, _, _) in enumerate(
                ALLOC_INFO.iter_unpack(values[: count * ALLOC_INFO.size])
            )
        }
        for raw_key, (ts_ns, extra, size, raw_agg) in list(self._extra.items()):
            if present.get(raw_key) != ts_ns:
                del self._extra[raw_key]
                self._correct(raw_agg, -size * extra, -extra)

    def hook_new_sites(self, budget: int = NEW_SITES_PER_READ) -> int:
        """Put a uprobe (cxx_new_site) on each new return address of a throwing operator new that the BPF
        program reported, at most `budget` per call; returns how many were hooked. See leaks_user.c: such a
        new gets no uretprobe, which an exception could not unwind through."""
        reported = self.bpf[b"new_sites"]
        hooked = self.bpf[b"hooked_sites"]
        one = ctypes.c_uint8(1)
        done = 0
        for key in list(reported.keys())[:budget]:
            site = key.value
            with contextlib.suppress(KeyError):
                del reported[key]
            if self.new_sites_hooked + self.new_sites_failed >= MAX_NEW_SITES:
                self.new_sites_failed += 1
                continue
            where = self._module_symbols.file_address(site)
            try:
                if where is None:
                    raise OSError("not in a mapped file")
                map_file, elf_address = where
                self.bpf.attach_uprobe(
                    name=map_file.encode(), addr=elf_address, fn_name=b"cxx_new_site", pid=self.pid
                )
            except Exception:  # unmapped meanwhile, or the kernel refused: that site stays unseen
                self.new_sites_failed += 1
                continue
            hooked[ctypes.c_uint64(site)] = one
            self.new_sites_hooked += 1
            done += 1
        return done

    def _after_execs(self) -> None:
        """Forget what processes tracked here allocated before their latest exec (the new image never frees
        it), re-read their symbols, and hook the allocator of the new image where it is another one."""
        execs = self.bpf[b"execs"]
        seen = [(key.value, value.value) for key, value in execs.items()]
        if not seen:
            return
        for tgid, _ in seen:
            with contextlib.suppress(KeyError):
                del execs[ctypes.c_uint32(tgid)]
        keys, values, count = self._entries(b"allocs")
        before = dict(seen)
        leaving: list[bytes] = []
        deltas: list[tuple[bytes, int, int]] = []
        for i, (size, ts_ns, tgid, stack_id, weight, source) in enumerate(
            ALLOC_INFO.iter_unpack(values[: count * ALLOC_INFO.size])
        ):
            if tgid in before and ts_ns < before[tgid]:
                raw_key = keys[i * 8 : (i + 1) * 8]
                effective = weight + self._extra.get(raw_key, (0, 0, 0, b""))[1]
                leaving.append(raw_key)
                deltas.append((AGG_KEY.pack(stack_id, tgid, source, 0), -size * effective, -effective))
        self._delete_tracked(leaving, deltas)
        _drop_symbol_cache(self.pid)
        self._module_symbols = ModuleSymbols(self.pid)
        self._symbols.clear()
        self._frames.clear()
        if self.pid in before:
            with contextlib.suppress(MemtopError):
                attached = {(hook.obj.path, hook.address) for hook in self.hooks}
                for hook in allocators.resolve(self.pid).hooks:
                    if (hook.obj.path, hook.address) not in attached:
                        with contextlib.suppress(Exception):
                            self._attach(hook)
                            self.hooks.append(hook)

    def _delete_tracked(self, leaving: list[bytes], deltas: list[tuple[bytes, int, int]]) -> None:
        """Take these address keys out of the map, correcting their aggregates by `deltas` (bytes,
        allocations) for each one deleted here (not freed meanwhile)."""
        missing = set(self._delete(b"allocs", leaving))
        for raw_key, (raw_agg, delta_bytes, delta_allocations) in zip(leaving, deltas, strict=True):
            if raw_key in missing:  # freed meanwhile: its free took it off its aggregate
                continue
            self._correct(raw_agg, delta_bytes, delta_allocations)
            self._extra.pop(raw_key, None)
            self._thinned += 1

    def read(self) -> LeakReading:
        self._after_execs()
        if "cxx_new_enter" in {hook.entry for hook in self.hooks}:
            self.hook_new_sites()
        self._comms.clear()  # names are read again: a process may have exec'd
        reading = self._read(KIND_USER)
        reading = dataclasses.replace(reading, tracked_now=max(0, reading.tracked_now - self._thinned))
        self.alloc_events = reading.alloc_events
        if self.sampler is not None:
            rate = self.sampler.update(
                time.monotonic(), reading.alloc_events, self.map_fill(reading.tracked_now)
            )
            if rate != self.sample_rate:
                raised = rate > self.sample_rate
                self._set_sample_rate(rate)
                if raised:
                    self._thin(rate)
                reading = dataclasses.replace(reading, sample_rate=rate)  # the N in force from now on
        self.status = type(self.status)("running", self.describe())
        return reading

    def close(self) -> None:
        super().close()
        _drop_symbol_cache(self.pid)


class ModuleSymbols:
    """Function symbols, with their sizes, of the files a process maps, read through /proc/PID/map_files.

    It checks BCC's names: BCC names an address after the nearest symbol before it, which in a stripped
    library is some unrelated exported function. A frame is named after a symbol only when the symbol is
    known to contain it ([value, value + size)); otherwise it reads `lib+0xADDR`, the address in the file's
    own terms (what addr2line or objdump take). It also names frames BCC left unknown because it looks for
    the file under /proc/PID/root (a chrooted process's files are not there). Names it finds itself are not
    demangled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._mappings: list[tuple[int, int, int, str, str]] = []  # start, end, file offset, path, map_file
        self._tables: dict[str, tuple[list[int], list[Symbol], ElfInfo | None]] = {}

    def _load_mappings(self) -> None:
        mappings = []
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/maps").read_text().splitlines():
                parts = line.split(None, 5)
                if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5].removesuffix(" (deleted)")
                mappings.append(
                    (start, end, int(parts[2], 16), path, f"/proc/{self.pid}/map_files/{parts[0]}")
                )
        self._mappings = mappings

    def _mapping(self, address: int) -> tuple[int, int, int, str, str] | None:
        for attempt in range(2):
            for mapping in self._mappings:
                if mapping[0] <= address < mapping[1]:
                    return mapping
            if attempt == 0:
                self._load_mappings()
        return None

    def _table(self, path: str, map_file: str) -> tuple[list[int], list[Symbol], ElfInfo | None]:
        table = self._tables.get(path)
        if table is None:
            info = None
            with contextlib.suppress(OSError, ElfError):
                info = read_elf(map_file, symbols=True)
            symbols = info.symbols if info else []
            table = self._tables[path] = ([s.value for s in symbols], symbols, info)
        return table

    def file_address(self, address: int) -> tuple[str, int] | None:
        """(the map_files path of the file mapped at `address`, the address in the file's own terms)."""
        mapping = self._mapping(address)
        if mapping is None:
            return None
        start, _end, offset, path, map_file = mapping
        info = self._table(path, map_file)[2]
        if info is None:
            return None
        elf_address = address if info.is_exec else info.vaddr(address - start + offset)
        return None if elf_address is None else (map_file, elf_address)

    def locate(self, address: int) -> tuple[str, int, Symbol | None] | None:
        """(file name, address in the file's own terms, the symbol containing it or None), or None when
        the address is in no mapped file this can read."""
        mapping = self._mapping(address)
        if mapping is None:
            return None
        start, _end, offset, path, map_file = mapping
        starts, symbols, info = self._table(path, map_file)
        if info is None:
            return None
        elf_address = address if info.is_exec else info.vaddr(address - start + offset)
        if elf_address is None:
            return None
        containing = None
        index = bisect.bisect_right(starts, elf_address) - 1
        # Symbols sorted by value: look back over the ones starting at or before the address for one that
        # contains it (nested or aliased symbols share starts).
        while index >= 0:
            symbol = symbols[index]
            if symbol.value <= elf_address < symbol.value + symbol.size:
                containing = symbol
                break
            if elf_address - symbol.value > 1 << 20:
                break
            index -= 1
        return os.path.basename(path), elf_address, containing

    def resolve(self, address: int) -> str | None:
        located = self.locate(address)
        return None if located is None else _located_name(*located)

    def checked(self, address: int, bcc_name: str) -> str:
        """BCC's name for `address` if a symbol of the file is known to contain it, else `lib+0xADDR`."""
        located = self.locate(address)
        if located is None:
            return bcc_name
        if located[2] is None or bcc_name.startswith("[unknown]"):  # [unknown]: BCC could not open the
            return _located_name(*located)  # module (a chroot); our own name
        return bcc_name


def _located_name(module: str, elf_address: int, symbol: Symbol | None) -> str:
    """`symbol+0xOFFSET [module]`, or `module+0xADDR` where no symbol contains the address."""
    if symbol is None:
        return f"{module}+0x{elf_address:x}"
    return f"{symbol.name}+0x{elf_address - symbol.value:x} [{module}]"


def _drop_symbol_cache(pid: int) -> None:
    """BCC keeps a symbol cache per pid for the life of the interpreter; a later process reusing the pid
    must not be symbolized with this one's."""
    with contextlib.suppress(Exception):
        import bcc

        caches: dict[int, Any] = bcc.BPF._sym_caches
        caches.pop(pid, None)
