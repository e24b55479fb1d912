"""Outstanding allocations by stack (a live memleak): records, growth, frame selection, rows and JSON.

Pure: no bcc, no textual. The probes in memtop/probes/leaks.py read the kernel's per-(stack, process)
aggregates into a LeakReading; LeakTracker keeps the recent ones and turns them into one LeakRow per stack
with its growth over the last minute, which is what the Leaks panel and the snapshot show.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KIND_KERNEL = "kernel"  # slab objects: kmalloc / kmem_cache_alloc
KIND_KERNEL_PAGES = "kernel-pages"  # page allocator (mm_page_alloc), off by default
KIND_USER = "user"  # one process's malloc & co and anonymous mmaps
KINDS = (KIND_KERNEL, KIND_KERNEL_PAGES, KIND_USER)

# Lower edges of the age bins (seconds) in which the probe counts outstanding allocations. A threshold for
# hiding young allocations is applied at bin precision: bins whose lower edge is below it are hidden.
AGE_EDGES_S: tuple[float, ...] = (0, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

STACK_LOST = "[stack lost]"  # the stack map was full (collision) or the walk failed; bytes still counted

# Names of the drop counters a LeakReading carries (cumulative since the probe started).
DROP_NAMES = (
    "alloc_map_full",  # allocation not tracked: the address map was full
    "aggregate_map_full",  # allocation not tracked: the (stack, process) map was full
    "stack_collisions",  # tracked under STACK_LOST: another stack held its bucket (-EEXIST)
    "stack_lost",  # tracked under STACK_LOST: the stack could not be walked
    "missed_frees",  # an address allocated again before its free was seen: treated as freed first
    "aggregate_missing",  # a free whose aggregate had already been pruned (a rare race)
    "pending_map_full",  # user mode: too many threads inside the allocator at once
    "cache_unlearned",  # kernel: a sampled slab allocation untracked: its cache's size was not learned yet
)


@dataclass(frozen=True, slots=True)
class StackOutstanding:
    """One (stack, process) aggregate read from the kernel, already scaled by the sample rate. Slotted: a
    busy host's reading holds tens of thousands."""

    kind: str
    stack_id: int
    pid: int
    comm: str
    outstanding_bytes: int
    allocations: int
    oldest_ns: int | None  # CLOCK_MONOTONIC ns of the oldest outstanding allocation; None if not known
    frames: tuple[str, ...]  # symbolized, innermost first
    # (allocations, bytes) per AGE_EDGES_S bin at the reading's now_ns, scaled; () when ages were not read.
    age_bins: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class LeakReading:
    """One read of a leak probe: every aggregate with something outstanding, and the counters."""

    kind: str  # the probe's kind: KIND_KERNEL (its stacks may include KIND_KERNEL_PAGES) or KIND_USER
    stacks: tuple[StackOutstanding, ...]
    sample_rate: int  # the 1-in-N in force now (earlier allocations keep the weight they were tracked with)
    now_ns: int  # CLOCK_MONOTONIC ns at the read, for ages
    drops: dict[str, int] = field(default_factory=dict)
    alloc_events: int = 0  # allocations seen (tracked or not), cumulative
    tracked: int = 0  # allocations tracked, cumulative
    tracked_now: int = 0  # entries in the address map at the read


@dataclass(frozen=True)
class LeakRow:
    """One row of the Leaks panel: one stack, summed over the processes that allocated on it."""

    kind: str
    stack_id: int
    pid: int | None  # None when several processes contributed (kernel stacks)
    comm: str  # the largest contributor's
    pids: tuple[int, ...]  # largest contributor first
    outstanding_bytes: int
    allocations: int
    oldest_age_s: float | None
    growth_bytes_per_s: float  # over the tracker's growth window (a minute by default)
    top_frame: str  # the first frame that is not allocator machinery
    stack: tuple[str, ...]


# -- frame selection -------------------------------------------------------------------------------------

_SUFFIXES = re.compile(r"(_noprof|\.(cold|constprop|isra|part|llvm)(\.\d+)*)+$")

# Kernel functions that only allocate on someone else's behalf (after stripping leading underscores and
# _noprof/.cold suffixes); matched as prefixes.
_KERNEL_ALLOCATOR_PREFIXES = (
    "kmalloc",
    "kmem_cache_alloc",
    "kmem_cache_zalloc",
    "kzalloc",
    "kcalloc",
    "kvmalloc",
    "kvzalloc",
    "kvcalloc",
    "krealloc",
    "kvrealloc",
    "do_krealloc",
    "kmemdup",
    "kvmemdup",
    "memdup_user",
    "vmemdup_user",
    "kstrdup",
    "kstrndup",
    "slab_alloc",
    "alloc_slab_page",
    "allocate_slab",
    "new_slab",
    "alloc_page",
    "alloc_frozen_pages",
    "folio_alloc",
    "vma_alloc_folio",
    "alloc_anon_folio",
    "get_free_pages",
    "get_zeroed_page",
    "get_page_from_freelist",
    "rmqueue",
    "trace_",
    "perf_trace_",
    "bpf_trace_",
    "bpf_prog_",
    "traceiter_",
)

# User-space allocator entry points and their internals (glibc, libstdc++, common replacements).
_USER_ALLOCATOR_NAMES = frozenset(
    {
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "free",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "pvalloc",
        "mmap",
        "mmap64",
        "munmap",
        "strdup",
        "strndup",
        "wcsdup",
        "sysmalloc",
        "tcache_init",
        "_mid_memalign",
    }
)
_USER_ALLOCATOR_PREFIXES = (
    "__libc_",
    "_int_",
    "__GI_",
    "__mmap",
    "__strdup",
    "__strndup",
    "__posix_memalign",
    "__malloc",
    "operator new",
    "_Znw",
    "_Zna",
    "__interceptor_",
    "je_",
    "tc_",
)


def frame_function(frame: str) -> str:
    """The function name of a symbolized frame: 'f+0x1a [libc.so.6]' -> 'f'."""
    name = frame.strip()
    if name.endswith("]") and " [" in name:
        name = name[: name.rindex(" [")]
    plus = name.rfind("+0x")
    if plus > 0:
        name = name[:plus]
    return name


def is_allocator_frame(kind: str, frame: str) -> bool:
    """True for frames of the allocator itself (and tracing machinery), which say nothing about who leaks."""
    name = frame_function(frame)
    if not name or name == "[unknown]" or name == STACK_LOST:
        return True
    if kind == KIND_USER:
        return name in _USER_ALLOCATOR_NAMES or name.startswith(_USER_ALLOCATOR_PREFIXES)
    base = _SUFFIXES.sub("", name.lstrip("_"))
    return base.startswith(_KERNEL_ALLOCATOR_PREFIXES)


def top_frame(kind: str, frames: Sequence[str]) -> str:
    """The first meaningful frame's function: what the panel names a stack by."""
    for frame in frames:
        if not is_allocator_frame(kind, frame):
            return frame_function(frame)
    for frame in frames:  # all allocator machinery: name the innermost known one
        name = frame_function(frame)
        if name and name != "[unknown]":
            return name
    return STACK_LOST if not frames or frames == (STACK_LOST,) else "[unknown]"


# -- age bins --------------------------------------------------------------------------------------------


def age_bin(age_s: float) -> int:
    """Index into AGE_EDGES_S of the bin an age falls in."""
    index = 0
    for i, edge in enumerate(AGE_EDGES_S):
        if age_s >= edge:
            index = i
        else:
            break
    return index


def first_bin_at_least(older_than_s: float) -> int:
    """The first bin whose allocations are all at least `older_than_s` old (len(AGE_EDGES_S) if none)."""
    for i, edge in enumerate(AGE_EDGES_S):
        if edge >= older_than_s:
            return i
    return len(AGE_EDGES_S)


# -- adaptive sampling -----------------------------------------------------------------------------------

TRACK_BUDGET_PER_S = 10_000  # tracked allocations/s: each costs a stack walk and map updates (~0.6 us)
MAX_SAMPLE_RATE = 1 << 20
# What a uprobe costs the traced program per allocator call, measured with bench/userleaks_bench.py on the
# project's 2-core test VM (a malloc+free loop traced vs untraced; see the README). Sampling cannot remove it:
# every call still enters the kernel. Said where tracking starts (the drill-down's m, the README).
UPROBE_COST_US = 8
UPROBE_COST_NOTE = f"uprobes: ~{UPROBE_COST_US} us per call"

# User mode (uprobes): the probe itself already costs every call microseconds, and a tracked allocation adds
# its stack walk; what sampling protects there is mostly the address map, so the budget is higher.
USER_TRACK_BUDGET_PER_S = 20_000


def _pow2_at_least(value: float) -> int:
    if value <= 1:
        return 1
    return 1 << math.ceil(math.log2(value))


class AdaptiveSampler:
    """Chooses the 1-in-N sample rate that keeps tracked allocations within a budget per second.

    N is a power of two. It rises at once when the tracked rate goes over the budget (or the address map is
    filling up), and falls only after `calm_reads` consecutive reads in which a lower N would still track
    at most half the budget: the hysteresis keeps N from flapping with the allocation rate.
    """

    def __init__(
        self,
        budget_per_s: float = TRACK_BUDGET_PER_S,
        initial: int = 64,
        calm_reads: int = 3,
        max_rate: int = MAX_SAMPLE_RATE,
    ) -> None:
        if budget_per_s <= 0:
            raise ValueError("budget_per_s must be positive")
        self.budget_per_s = budget_per_s
        self.max_rate = max_rate
        self.rate = min(max(1, _pow2_at_least(initial)), max_rate)
        self.calm_reads = calm_reads
        self._calm = 0
        self._last: tuple[float, int] | None = None
        self.allocs_per_s = 0.0

    def update(self, now: float, alloc_events: int, map_fill: float = 0.0) -> int:
        """Feed the cumulative allocation count at time `now` (and how full the address map is, 0..1);
        returns the sample rate to use from now on."""
        last, self._last = self._last, (now, alloc_events)
        if last is None or now <= last[0] or alloc_events < last[1]:
            return self.rate
        self.allocs_per_s = (alloc_events - last[1]) / (now - last[0])
        needed = min(_pow2_at_least(self.allocs_per_s / self.budget_per_s), self.max_rate)
        if map_fill >= 0.75:
            needed = max(needed, min(self.rate * 2, self.max_rate))
        if needed > self.rate:
            self.rate = needed
            self._calm = 0
            return self.rate
        relaxed = min(_pow2_at_least(2 * self.allocs_per_s / self.budget_per_s), self.max_rate)
        if relaxed < self.rate and map_fill < 0.5:
            self._calm += 1
            if self._calm >= self.calm_reads:
                self.rate = relaxed
                self._calm = 0
        else:
            self._calm = 0
        return self.rate


# -- the tracker -----------------------------------------------------------------------------------------

_GroupKey = tuple[str, int]  # (kind, stack_id)


class _History:
    """(time, bytes) samples of one series, trimmed to the growth window plus one baseline sample. A list,
    not a deque: a deque's first block is 528 bytes (glibc's heap, not Python's small-object arenas), and a
    busy host holds thousands of these, one per stack and process."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def add(self, now: float, value: int, window_s: float) -> None:
        samples = self.samples
        samples.append((now, value))
        old = 0
        while len(samples) - old >= 2 and samples[old + 1][0] <= now - window_s:
            old += 1
        if old:
            del samples[:old]

    def growth(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0

    def idle(self) -> bool:
        return all(v == 0 for _, v in self.samples)


class LeakTracker:
    """The latest reading of each probe kind, and the history that growth is computed from.

    Growth per stack is kept for every stack; growth per stack *and process* only for the watched process
    (`watch`, the drill-down's): a busy host's map holds thousands of (stack, process) aggregates, most of
    them of processes that have exited, and a history for each held megabytes that nothing showed."""

    def __init__(self, growth_window_s: float = 60.0) -> None:
        if not growth_window_s > 0:
            raise ValueError("growth_window_s must be positive")
        self.growth_window_s = growth_window_s
        self._readings: dict[str, LeakReading] = {}
        self._stack_history: dict[_GroupKey, _History] = {}
        self._pid_history: dict[tuple[str, int, int], _History] = {}
        self._frames: dict[_GroupKey, tuple[str, ...]] = {}
        self.watched_pid: int | None = None

    def watch(self, pid: int | None) -> None:
        """Keep per-process growth for `pid` (tgid) from the next reading on; None for no process. Watching
        another process drops the previous one's histories."""
        if pid != self.watched_pid:
            self.watched_pid = pid
            self._pid_history.clear()

    @property
    def sample_rate(self) -> int:
        """The kernel probe's sample rate (else the user probe's; 1 with no reading)."""
        for kind in (KIND_KERNEL, KIND_USER):
            if kind in self._readings:
                return self._readings[kind].sample_rate
        return 1

    @property
    def sample_rates(self) -> dict[str, int]:
        return {kind: reading.sample_rate for kind, reading in self._readings.items()}

    @property
    def drops(self) -> dict[str, int]:
        """Drop counters summed over the probes (cumulative)."""
        total: dict[str, int] = {}
        for reading in self._readings.values():
            for name, value in reading.drops.items():
                total[name] = total.get(name, 0) + value
        return total

    def reading(self, kind: str) -> LeakReading | None:
        return self._readings.get(kind)

    def ingest(self, now: float, reading: LeakReading) -> None:
        """Take a probe's reading taken at `now` (seconds, any monotonic clock)."""
        window = self.growth_window_s
        stack_totals: dict[_GroupKey, int] = {}
        pid_totals: dict[tuple[str, int, int], int] = {}
        watched = self.watched_pid
        for s in reading.stacks:
            group = (s.kind, s.stack_id)
            if self._frames.get(group, s.frames) != s.frames:  # the id now names another stack
                self._forget_group(group)
            self._frames[group] = s.frames
            stack_totals[group] = stack_totals.get(group, 0) + s.outstanding_bytes
            if s.pid == watched:
                pid_key = (s.kind, s.stack_id, s.pid)
                pid_totals[pid_key] = pid_totals.get(pid_key, 0) + s.outstanding_bytes

        kinds_in_reading = {reading.kind} | {s.kind for s in reading.stacks}
        if reading.kind == KIND_KERNEL:
            kinds_in_reading.add(KIND_KERNEL_PAGES)
        _update_histories(self._stack_history, stack_totals, kinds_in_reading, now, window)
        _update_histories(self._pid_history, pid_totals, kinds_in_reading, now, window)
        for group in [g for g in self._frames if g not in self._stack_history]:
            del self._frames[group]
        self._readings[reading.kind] = reading

    def forget(self, kind: str) -> None:
        """Drop a probe's reading and history (its probe was closed)."""
        self._readings.pop(kind, None)
        kinds = {kind, KIND_KERNEL_PAGES} if kind == KIND_KERNEL else {kind}
        self._stack_history = {k: v for k, v in self._stack_history.items() if k[0] not in kinds}
        self._pid_history = {k: v for k, v in self._pid_history.items() if k[0] not in kinds}
        self._frames = {k: v for k, v in self._frames.items() if k[0] not in kinds}

    def _forget_group(self, group: _GroupKey) -> None:
        self._stack_history.pop(group, None)
        for key in [k for k in self._pid_history if k[:2] == group]:
            del self._pid_history[key]

    def rows(self, older_than_s: float = 0.0, pid: int | None = None) -> tuple[LeakRow, ...]:
        """One row per stack with something outstanding, by growth then bytes (largest first).

        `older_than_s` hides allocations younger than that (at age-bin precision, see AGE_EDGES_S);
        `pid` keeps only that process's share (its growth is 0 unless it is the watched process).
        """
        groups: dict[_GroupKey, list[tuple[StackOutstanding, int, int]]] = {}
        now_ns_by_kind: dict[str, int] = {}
        for reading in self._readings.values():
            for s in reading.stacks:
                if pid is not None and s.pid != pid:
                    continue
                now_ns_by_kind[s.kind] = reading.now_ns
                counted = _older_share(s, reading.now_ns, older_than_s)
                if counted is None:
                    continue
                groups.setdefault((s.kind, s.stack_id), []).append((s, *counted))

        rows = []
        for group, members in groups.items():
            members.sort(key=lambda m: m[2], reverse=True)
            allocations = sum(m[1] for m in members)
            outstanding = sum(m[2] for m in members)
            if allocations <= 0 and outstanding <= 0:
                continue
            pids = tuple(dict.fromkeys(m[0].pid for m in members))
            now_ns = now_ns_by_kind[group[0]]
            oldest = [m[0].oldest_ns for m in members if m[0].oldest_ns is not None]
            if pid is not None:
                history = self._pid_history.get((group[0], group[1], pid))
            else:
                history = self._stack_history.get(group)
            frames = members[0][0].frames
            rows.append(
                LeakRow(
                    kind=group[0],
                    stack_id=group[1],
                    pid=pids[0] if len(pids) == 1 else None,
                    comm=members[0][0].comm,
                    pids=pids,
                    outstanding_bytes=max(0, outstanding),
                    allocations=max(0, allocations),
                    oldest_age_s=max(0.0, (now_ns - min(oldest)) / 1e9) if oldest else None,
                    growth_bytes_per_s=history.growth() if history else 0.0,
                    top_frame=top_frame(group[0], frames),
                    stack=frames,
                )
            )
        rows.sort(key=lambda r: (r.growth_bytes_per_s, r.outstanding_bytes), reverse=True)
        return tuple(rows)


def _older_share(s: StackOutstanding, now_ns: int, older_than_s: float) -> tuple[int, int] | None:
    """(allocations, bytes) of `s` at least `older_than_s` old, or None when nothing is."""
    if older_than_s <= 0:
        return s.allocations, s.outstanding_bytes
    if s.age_bins:
        first = first_bin_at_least(older_than_s)
        allocations = sum(a for a, _ in s.age_bins[first:])
        outstanding = sum(b for _, b in s.age_bins[first:])
        return (allocations, outstanding) if allocations > 0 else None
    if s.oldest_ns is not None and (now_ns - s.oldest_ns) / 1e9 >= older_than_s:
        return s.allocations, s.outstanding_bytes  # ages not binned: the whole aggregate, by its oldest
    return None


def _update_histories(
    histories: dict[Any, _History], totals: Mapping[Any, int], kinds: set[str], now: float, window: float
) -> None:
    for key, value in totals.items():
        histories.setdefault(key, _History()).add(now, value, window)
    for key in [k for k in histories if k[0] in kinds and k not in totals]:
        history = histories[key]
        history.add(now, 0, window)  # all freed (or pruned): its bytes went to zero
        if history.idle():
            del histories[key]


# -- JSON (the snapshot's `leaks` list) ------------------------------------------------------------------


def rows_to_json(rows: Iterable[LeakRow]) -> list[dict[str, Any]]:
    return [
        {
            "pid": row.pid,
            "comm": row.comm,
            "kind": row.kind,
            "outstanding_bytes": row.outstanding_bytes,
            "allocations": row.allocations,
            "oldest_age_s": row.oldest_age_s,
            "growth_bytes_per_s": row.growth_bytes_per_s,
            "stack": list(row.stack),
            "top_frame": row.top_frame,
            "pids": list(row.pids),
            "stack_id": row.stack_id,
        }
        for row in rows
    ]


def rows_from_json(data: Any) -> tuple[LeakRow, ...]:
    """Rows from a snapshot's `leaks` list; ValueError (saying where) on anything malformed."""
    if not isinstance(data, list):
        raise ValueError("leaks: expected a list")
    return tuple(_row_from_json(item, f"leaks[{i}]") for i, item in enumerate(data))


def _row_from_json(item: Any, where: str) -> LeakRow:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object")
    kind = _field(item, where, "kind", str)
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    pid = _optional_int(item, where, "pid")
    stack = _str_list(item, where, "stack")
    pids_raw = item.get("pids")
    if pids_raw is None:
        pids = (pid,) if pid is not None else ()
    else:
        if not isinstance(pids_raw, list) or not all(_is_int(p) and p >= 0 for p in pids_raw):
            raise ValueError(f"{where}.pids: expected a list of non-negative integers")
        pids = tuple(pids_raw)
    top = item.get("top_frame")
    if top is None:
        top = top_frame(kind, stack)
    elif not isinstance(top, str):
        raise ValueError(f"{where}.top_frame: expected a string")
    stack_id = item.get("stack_id", -1)
    if not _is_int(stack_id):
        raise ValueError(f"{where}.stack_id: expected an integer")
    oldest = item.get("oldest_age_s", None)
    if oldest is not None:
        oldest = _number(oldest, f"{where}.oldest_age_s")
        if oldest < 0:
            raise ValueError(f"{where}.oldest_age_s: must not be negative")
    return LeakRow(
        kind=kind,
        stack_id=stack_id,
        pid=pid,
        comm=_field(item, where, "comm", str),
        pids=pids,
        outstanding_bytes=_count(item, where, "outstanding_bytes"),
        allocations=_count(item, where, "allocations"),
        oldest_age_s=oldest,
        growth_bytes_per_s=_number(item.get("growth_bytes_per_s"), f"{where}.growth_bytes_per_s"),
        top_frame=top,
        stack=stack,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(item: dict[str, Any], where: str, name: str, type_: type) -> Any:
    if name not in item:
        raise ValueError(f"{where}: missing {name!r}")
    value = item[name]
    if not isinstance(value, type_) or isinstance(value, bool):
        raise ValueError(f"{where}.{name}: expected {type_.__name__}, got {type(value).__name__}")
    return value


def _count(item: dict[str, Any], where: str, name: str) -> int:
    value = _field(item, where, name, int)
    if value < 0:
        raise ValueError(f"{where}.{name}: must not be negative")
    return int(value)


def _optional_int(item: dict[str, Any], where: str, name: str) -> int | None:
    if name not in item:
        raise ValueError(f"{where}: missing {name!r}")
    value = item[name]
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise ValueError(f"{where}.{name}: expected a non-negative integer or null")
    return int(value)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _str_list(item: dict[str, Any], where: str, name: str) -> tuple[str, ...]:
    value = item.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}.{name}: expected a list of strings")
    return tuple(value)
