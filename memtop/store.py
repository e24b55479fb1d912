"""The in-memory store: pure Python, no bcc, no textual.

Rates are a pure function of (previous totals, current totals, elapsed). Each process is keyed by
(pid, start time) so that a reused PID becomes a new row; processes that exit are kept, marked, for
`exited_keep_s`. Every tick produces an immutable Snapshot that views and exporters read.
"""

from __future__ import annotations

import math
import operator
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import compress
from typing import Any, NamedTuple, TypeVar

from memtop.containers import (
    ContainerMeta,
    ContainerRef,
    host_unit,
    parse_cgroup_path,
    runtime_cgroups_generation,
)
from memtop.leaks import KIND_USER, LeakReading, LeakRow, LeakTracker
from memtop.model import (
    IRQ_COMM,
    IRQ_TGID,
    FocusReading,
    KmallocCounters,
    KmallocReading,
    ProbeStatus,
    ProcInfo,
    RetiredCounters,
)
from memtop.oom import OomEvent, OomReading
from memtop.tcp import SlowConnect, TcpAggregator, TcpReading, TcpRow

HISTORY_S = 600.0  # at least ten minutes of per-process rate history
EXITED_KEEP_S = 60.0
OOM_LOG_MAX = 1000  # kills kept in the log (newest kept)
PRE_KILL_S = 60.0  # history kept with each kill
RECENT_S = 120.0  # histories keep every tick this far back, then one sample per COARSE_STEP_S
COARSE_STEP_S = 10.0
# The tick at which a store allocates its whole process history (HistoryTable.reserve): by then the host's
# processes have been found, so the columns are made at about their final size.
RESERVE_AT_TICK = 10


class ProcessKey(NamedTuple):
    """A process's identity across PID reuse. A tuple (C-level hash and compare): a tick looks keys up
    several times per process, thousands of times."""

    pid: int
    start_time: float


@dataclass(frozen=True)
class HistoryPoint:
    t: float  # seconds since the epoch
    kmalloc_bytes_per_s: float
    kmalloc_calls_per_s: float
    memory_bytes: int | None = None  # a process's RSS, a container's cgroup memory usage


@dataclass(frozen=True)
class ProcessRow:
    """One process as every view, sort key and export sees it: the field names are the vocabulary."""

    pid: int
    start_time: float
    comm: str
    cmdline: str = ""
    user: str = ""
    state: str = ""
    cgroup_path: str = ""
    container_id: str | None = None  # None: the host
    container: str = ""  # the container's name, or its short id when it has none
    unit: str = ""  # a host process's systemd unit (ssh.service, session-3.scope), where it has one
    kmalloc_bytes_per_s: float = 0.0
    kmalloc_calls_per_s: float = 0.0
    kmalloc_bytes: int = 0
    kmalloc_calls: int = 0
    kmalloc_bytes_req: int = 0
    rss_bytes: int | None = None
    vms_bytes: int | None = None
    threads: int | None = None
    exited: bool = False
    exited_at: float | None = None

    @property
    def key(self) -> ProcessKey:
        return ProcessKey(self.pid, self.start_time)

    @property
    def is_irq(self) -> bool:
        return self.pid == IRQ_TGID

    @property
    def kmalloc_avg_bytes(self) -> float | None:
        """Average bytes per allocation over the process's whole observed life."""
        return self.kmalloc_bytes / self.kmalloc_calls if self.kmalloc_calls else None

    @property
    def kmalloc_waste_pct(self) -> float | None:
        """Share of allocated bytes not requested (slab rounding): (alloc - req) / alloc."""
        if not self.kmalloc_bytes:
            return None
        return 100.0 * max(0, self.kmalloc_bytes - self.kmalloc_bytes_req) / self.kmalloc_bytes


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    kernel: str
    boot_time: float | None = None


@dataclass(frozen=True)
class ContainerState:
    """What the live source learned about one container by I/O (state files, cgroup files)."""

    ref: ContainerRef
    meta: ContainerMeta = ContainerMeta()
    memory_bytes: int | None = None  # working set: usage - inactive file (what `docker stats` shows)
    memory_limit_bytes: int | None = None  # effective (hierarchical) limit; None: unlimited (or unknown)
    pids: tuple[int, ...] = ()  # processes in its cgroup now (None of the probes needed to see them)
    memory_usage_bytes: int | None = None  # raw cgroup usage, page cache included


@dataclass(frozen=True)
class ContainerRow:
    """One container as the Containers panel, its sort keys and the snapshot see it."""

    id: str
    runtime: str
    cgroup_path: str
    name: str = ""
    pod_uid: str = ""
    pod_name: str = ""
    namespace: str = ""
    qos: str = ""
    image: str = ""
    pids: tuple[int, ...] = ()
    kmalloc_bytes_per_s: float = 0.0
    kmalloc_calls_per_s: float = 0.0
    kmalloc_bytes: int = 0  # since memtop started, including processes that have exited
    kmalloc_calls: int = 0
    memory_bytes: int | None = None  # working set = usage - inactive file (kubelet's, `docker stats`')
    memory_limit_bytes: int | None = None  # the effective limit: its own or an ancestor cgroup's, smallest
    oom_kills: int = 0  # kills of its processes memtop saw (since start, and in the kernel log before)
    memory_usage_bytes: int | None = None  # the cgroup's raw usage, page cache included

    @property
    def short_id(self) -> str:
        return self.id[:12] if len(self.id) == 64 and not self.id.strip("0123456789abcdef") else self.id

    @property
    def label(self) -> str:
        return self.name or self.short_id

    @property
    def processes(self) -> int:
        return len(self.pids)

    @property
    def memory_pct(self) -> float | None:
        """Working set against the effective limit, in percent."""
        if self.memory_bytes is None or not self.memory_limit_bytes:
            return None
        return 100.0 * self.memory_bytes / self.memory_limit_bytes


@dataclass(frozen=True)
class FocusDetail:
    """The drilled-in process: its history and the data collected only for it."""

    key: ProcessKey
    history: tuple[HistoryPoint, ...] = ()
    reading: FocusReading | None = None
    # Its own share of each stack with outstanding allocations (None: not known, as in an older file).
    leaks: tuple[LeakRow, ...] | None = None


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # seconds since the epoch
    duration_s: float  # how long the kmalloc counts cover (since its probe attached; rates divide by it)
    interval_s: float
    host: HostInfo
    probes: Mapping[str, ProbeStatus]
    processes: tuple[ProcessRow, ...]
    kmalloc_bytes_per_s: float = 0.0
    kmalloc_calls_per_s: float = 0.0
    sample_every: int = 1
    drops: Mapping[str, int] = field(default_factory=dict)
    focus: FocusDetail | None = None
    histories: Mapping[ProcessKey, tuple[HistoryPoint, ...]] = field(default_factory=dict)
    replay: bool = False
    containers: tuple[ContainerRow, ...] = ()
    container_histories: Mapping[str, tuple[HistoryPoint, ...]] = field(default_factory=dict)
    oom_events: tuple[OomEvent, ...] = ()  # newest first
    oom_kills_seen: int = 0  # kills seen live (tracepoint) since start: the header's counter
    tcp_connect: tuple[TcpRow, ...] = ()  # one per (process, destination), busiest first
    tcp_slow_connects: tuple[SlowConnect, ...] = ()  # newest first
    tcp_in_flight: int = 0  # connects sent and not yet answered
    tcp_slow_ms: int | None = None  # the slow threshold (None: no TCP data)
    leaks: tuple[LeakRow, ...] = ()  # outstanding allocations by stack, growing fastest first
    leak_sample_rate: int = 1  # kernel tracking was 1 in N (user-mode rows: leak_sample_rates["user"])
    leak_sample_rates: Mapping[str, int] = field(default_factory=dict)
    leak_older_s: float = 0.0  # rows hide allocations younger than this
    leak_user_pid: int | None = None  # the process whose user-space allocations are tracked

    def container(self, container_id: str) -> ContainerRow | None:
        for row in self.containers:
            if row.id == container_id:
                return row
        return None

    def process(self, key: ProcessKey) -> ProcessRow | None:
        for row in self.processes:
            if row.key == key:
                return row
        return None


def history_columns(interval_s: float, history_s: float) -> int:
    """Ticks a HistoryTable holds at most at this interval: every tick of the last RECENT_S (and the
    one at its start), one per COARSE_STEP_S back to the horizon and one at or before it, and the
    column being written."""
    recent = math.ceil(min(RECENT_S, history_s) / interval_s) + 1
    return recent + math.ceil(max(0.0, history_s - RECENT_S) / max(COARSE_STEP_S, interval_s)) + 2


class _Column:
    """One tick's samples of every row of a HistoryTable, indexed by slot."""

    __slots__ = ("t", "serial", "bytes_per_s", "calls_per_s", "memory")

    def __init__(self, capacity: int) -> None:
        self.t = 0.0
        self.serial = 0
        self.bytes_per_s = array("d", bytes(8 * capacity))
        self.calls_per_s = array("d", bytes(8 * capacity))
        self.memory = array("d", bytes(8 * capacity))  # bytes, or -1: unknown

    def grow(self, extra: int) -> None:
        zeros = bytes(8 * extra)
        for values in (self.bytes_per_s, self.calls_per_s, self.memory):
            values.frombytes(zeros)


class HistoryTable:
    """The samples of many rows (processes, containers), one column per tick rather than an array per
    row: every tick for the last `RECENT_S`, then one tick per `COARSE_STEP_S` back to `history_s` (one
    at or before that horizon is kept, so a history spans at least back to it).

    A row is a slot number; a tick writes each live row's sample into the columns `start_tick` returns
    (three array stores per row: a busy host writes thousands a tick). Columns that age out are reused
    for new ticks, so a steady host allocates nothing here: per-row arrays that grew, aged and were
    freed as processes came and went fragmented both allocators (RSS that crept up for an hour)."""

    __slots__ = (
        "history_s",
        "_capacity",
        "_born",
        "_free",
        "_recent",
        "_coarse",
        "_spare",
        "_serial",
        "_limit",
    )

    def __init__(self, history_s: float, capacity: int = 64) -> None:
        self.history_s = history_s
        self._capacity = capacity
        self._born = array("q", bytes(8 * capacity))  # per slot: the serial of its row's first tick
        self._free = list(range(capacity - 1, -1, -1))  # slots to hand out, lowest last
        self._recent: deque[_Column] = deque()  # oldest first
        self._coarse: deque[_Column] = deque()
        self._spare: list[_Column] = []
        self._serial = 0
        self._limit = 0  # columns to hold at most, once reserve() said (0: no limit)

    def add_row(self) -> int:
        """A slot for a new row, whose history starts with the current tick (call it within a tick)."""
        if not self._free:  # a quarter more (not double: every column grows)
            extra = max(64, self._capacity // 4)
            for column in (*self._recent, *self._coarse, *self._spare):
                column.grow(extra)
            self._born.frombytes(bytes(8 * extra))
            self._free = list(range(self._capacity + extra - 1, self._capacity - 1, -1))
            self._capacity += extra
        slot = self._free.pop()
        self._born[slot] = self._serial
        return slot

    def reserve(self, columns: int) -> None:
        """Hold the columns for `columns` ticks in all (a full history at the current interval): made now,
        so that the table's memory reaches its plateau early rather than over the first `history_s`; from
        then on, columns beyond that are freed as they age out (the interval grew)."""
        self._limit = columns
        made = len(self._recent) + len(self._coarse) + len(self._spare)
        self._spare.extend(_Column(self._capacity) for _ in range(columns - made))

    def drop_row(self, slot: int) -> None:
        """The row is gone: its slot goes to a later row (whose history starts after this one's)."""
        self._free.append(slot)

    def start_tick(self, now: float) -> tuple[array[float], array[float], array[float]]:
        """Open the column of the tick at `now` and age the old ones. Returns its (bytes/s, calls/s,
        memory bytes or -1) arrays: every live row's slot must be written before the next tick."""
        recent, coarse, spare = self._recent, self._coarse, self._spare
        horizon = now - self.history_s
        while recent and recent[0].t < now - RECENT_S:
            column = recent.popleft()
            if column.t >= horizon and (not coarse or column.t - coarse[-1].t >= COARSE_STEP_S):
                coarse.append(column)
            else:
                spare.append(column)
        while len(coarse) > 1 and coarse[1].t <= horizon:
            spare.append(coarse.popleft())
        if not coarse:
            while recent and recent[0].t < horizon:
                spare.append(recent.popleft())
        if self._limit and len(spare) > 1 and len(recent) + len(coarse) + len(spare) > self._limit:
            del spare[: len(recent) + len(coarse) + len(spare) - self._limit]  # the interval grew
        column = spare.pop() if spare else _Column(self._capacity)
        self._serial += 1
        column.t, column.serial = now, self._serial
        recent.append(column)
        return column.bytes_per_s, column.calls_per_s, column.memory

    def points(self, slot: int) -> tuple[HistoryPoint, ...]:
        """The row's samples, oldest first."""
        born = self._born[slot]
        return tuple(
            HistoryPoint(
                column.t,
                column.bytes_per_s[slot],
                column.calls_per_s[slot],
                None if column.memory[slot] < 0 else int(column.memory[slot]),
            )
            for column in (*self._coarse, *self._recent)
            if column.serial >= born
        )


@dataclass(slots=True)
class _ProcState:
    row: ProcessRow
    kernel_calls: int = 0  # the kernel's cumulative counters at the last tick (baseline for deltas)
    kernel_bytes: int = 0
    kernel_bytes_req: int = 0
    slot: int = -1  # its row in the store's HistoryTable
    info: ProcInfo | None = None  # what /proc said at the last tick (the row is rebuilt when it changes)


def counter_delta(previous: int, now: int) -> int:
    """Growth of a cumulative counter; one that went backwards (its entry was reset) counts from 0."""
    return now - previous if now >= previous else now


_NO_COUNTERS = KmallocCounters(0, 0, 0)
_NO_KEY = ProcessKey(-1, -1.0)  # no process has it


class Store:
    def __init__(
        self,
        host: HostInfo,
        started_at: float,
        interval_s: float = 1.0,
        history_s: float = HISTORY_S,
        exited_keep_s: float = EXITED_KEEP_S,
    ) -> None:
        self.host = host
        self.started_at = started_at  # wall clock when the data starts
        self.interval_s = interval_s
        self.history_s = history_s
        self.exited_keep_s = exited_keep_s
        self._states: dict[ProcessKey, _ProcState] = {}
        self._live_key: dict[int, ProcessKey] = {}  # pid -> key of the process now holding that pid
        self._last_tick: float = started_at
        # The kmalloc counters' window: from the probe's attach (None: not attached yet) to the last tick
        # that read them. Rates divide by the time the counts really cover, never by time before attach.
        self.kmalloc_since: float | None = started_at
        self._last_kmalloc: float = started_at
        self._kmalloc_baseline: dict[int, KmallocCounters] = {}  # tgid -> counts before the window
        self._placed_generation = runtime_cgroups_generation()  # rows placed against this container set
        self._totals = (0.0, 0.0)
        self._sample_every = 1
        self._drops: dict[str, int] = {}
        self.probes: dict[str, ProbeStatus] = {}
        self.focus_key: ProcessKey | None = None
        self._focus_reading: FocusReading | None = None
        self._refs: dict[str, ContainerRef] = {}  # every container any row has been attributed to
        self._container_totals: dict[str, list[float]] = {}  # id -> [bytes/s, calls/s, bytes, calls]
        self._container_states: dict[str, ContainerState] = {}
        self._histories = HistoryTable(history_s)  # every process row's, by _ProcState.slot
        self._ticks = 0
        self._reserved_for = 0.0  # the interval the history's columns were last reserved for
        self._container_histories = HistoryTable(history_s)
        self._container_slot: dict[str, int] = {}  # container id -> its slot there
        self.focus_container: str | None = None  # its history goes in every snapshot
        self._oom: deque[OomEvent] = deque(maxlen=OOM_LOG_MAX)  # oldest first
        self._oom_seen = 0
        self.tcp: TcpAggregator | None = None  # set when the TCP probe runs
        self.tcp_since: float | None = None  # when the TCP probe attached
        self.tcp_slow_ms: int | None = None
        self._cgroup_paths: dict[int, str] = {}  # cgroup2 id -> path, as resolved by the source
        self.leaks = LeakTracker()
        self.leak_older_s = 0.0
        self.leak_user_pid: int | None = None

    # -- ingest ---------------------------------------------------------------------------------------

    def kmalloc_attached(self, when: float, baseline: KmallocReading | None = None) -> None:
        """The kmalloc probe's window starts at `when`: its first rates are over (when, next tick], and
        the counts in `baseline` (read at `when`, made while the probe was still attaching) are not data:
        each process's totals count from there."""
        self.kmalloc_since = self._last_kmalloc = when
        self._kmalloc_baseline = dict(baseline.per_tgid) if baseline is not None else {}
        for tgid, counters in self._kmalloc_baseline.items():
            key = self._live_key.get(tgid)
            state = self._states.get(key) if key is not None else None
            if state is not None:
                state.kernel_calls, state.kernel_bytes = counters.calls, counters.bytes_alloc
                state.kernel_bytes_req = counters.bytes_req

    def ingest(
        self, now: float, reading: KmallocReading | None, procs: Mapping[int, ProcInfo | None]
    ) -> list[int]:
        """Apply one tick taken at wall time `now`.

        `reading` is the kmalloc probe's (None while it is not running: every rate is then 0).
        `procs` maps every live process to what /proc says now; a tgid of the reading with no live
        process (absent, or None) has exited. Returns the tgids whose kernel entries can be dropped
        (exited, totals now kept here).
        """
        self._last_tick = now
        per_tgid = reading.per_tgid if reading is not None else {}
        if reading is not None:
            elapsed = now - self._last_kmalloc
            self._last_kmalloc = now
            self._sample_every = reading.sample_every
            self._drops.update(
                pid_map_full=reading.pid_map_full_drops,
                call_site_map_full=reading.site_map_full_drops,
                tail_lost=reading.tail_lost,
                tail_rate_limited=reading.tail_rate_limited,
                memcg_map_full=reading.memcg_map_full_drops,
                kmalloc_after_exit=reading.after_exit_calls,
                kmalloc_recursion_misses=reading.recursion_misses,
            )
        else:
            elapsed = 0.0
        self._ticks += 1
        # Once the host's processes are known, and again whenever the interval changes.
        if self._ticks >= RESERVE_AT_TICK and self._reserved_for != self.interval_s:
            self._reserved_for = self.interval_s
            self._histories.reserve(history_columns(self.interval_s, self.history_s))
        history_bytes, history_calls, history_memory = self._histories.start_tick(now)
        forget: list[int] = []
        total_bytes = total_calls = 0.0
        seen: set[ProcessKey] = set()
        for totals in self._container_totals.values():
            totals[0] = totals[1] = 0.0
        # The hot loop of a busy host (thousands of processes a tick): plain locals, no per-row objects
        # but the rows that changed.
        rate = 1.0 / elapsed if elapsed > 0 else 0.0
        live_key, states = self._live_key, self._states
        generation = runtime_cgroups_generation()
        if generation != self._placed_generation:  # the runtimes named new containers: place rows again
            self._placed_generation = generation
            for state in states.values():
                state.info = None
        for retired in reading.retired if reading is not None else ():  # before the newcomers now
            state = self._ingest_retired(retired, elapsed, now)  # holding the PIDs
            row = state.row
            bytes_per_s, calls_per_s = row.kmalloc_bytes_per_s, row.kmalloc_calls_per_s
            history_bytes[state.slot], history_calls[state.slot], history_memory[state.slot] = (
                bytes_per_s,
                calls_per_s,
                -1.0,
            )
            seen.add(row.key)
            total_bytes += bytes_per_s
            total_calls += calls_per_s
        new_object, set_attribute = _new_object, _set_attribute
        fields: dict[str, object] | None
        for tgid in per_tgid.keys() | procs.keys():
            counters = per_tgid.get(tgid, _NO_COUNTERS)
            info = procs.get(tgid)
            key = live_key.get(tgid, _NO_KEY)
            found = states.get(key)
            if found is None or (info is not None and info.start_time != key.start_time):
                state = self._state_for(tgid, counters, info, now)
                key = state.row.key  # a property: built once here, not read per row
            else:
                state = found
            row = state.row
            seen.add(key)
            calls, bytes_alloc, bytes_req = counters[0], counters[1], counters[2]
            k_calls, k_bytes, k_req = state.kernel_calls, state.kernel_bytes, state.kernel_bytes_req
            # A changed row is a copy of the old one's fields with the new values: built in place, one dict
            # copy and one object (the row of the previous snapshot stays as it was).
            if calls != k_calls or bytes_alloc != k_bytes or bytes_req != k_req:
                d_calls = calls - k_calls if calls >= k_calls else calls
                d_bytes = bytes_alloc - k_bytes if bytes_alloc >= k_bytes else bytes_alloc
                d_req = bytes_req - k_req if bytes_req >= k_req else bytes_req
                state.kernel_calls, state.kernel_bytes, state.kernel_bytes_req = calls, bytes_alloc, bytes_req
                bytes_per_s = d_bytes * rate
                calls_per_s = d_calls * rate
                total_bytes += bytes_per_s
                total_calls += calls_per_s
                fields = row.__dict__.copy()
                fields["kmalloc_bytes_per_s"] = bytes_per_s
                fields["kmalloc_calls_per_s"] = calls_per_s
                fields["kmalloc_bytes"] = row.kmalloc_bytes + d_bytes
                fields["kmalloc_calls"] = row.kmalloc_calls + d_calls
                fields["kmalloc_bytes_req"] = row.kmalloc_bytes_req + d_req
            else:
                d_calls = d_bytes = 0
                bytes_per_s = calls_per_s = 0.0
                fields = None
                if row.kmalloc_calls_per_s or row.kmalloc_bytes_per_s:
                    fields = row.__dict__.copy()
                    fields["kmalloc_bytes_per_s"] = fields["kmalloc_calls_per_s"] = 0.0
            if info is not None and tgid != IRQ_TGID:
                if info is not state.info:
                    if fields is None:
                        fields = row.__dict__.copy()
                    fields.update(_live_fields(info, counters))
                    state.info = info
                    if info.container is not None:
                        self._refs.setdefault(info.container.container_id, info.container)
            elif tgid != IRQ_TGID and not row.exited:
                if fields is None:
                    fields = row.__dict__.copy()
                fields["exited"], fields["exited_at"] = True, now
                forget.append(tgid)
                live_key.pop(tgid, None)
            if fields is not None:
                row = new_object(ProcessRow)
                set_attribute(row, "__dict__", fields)
                state.row = row
            if (d_calls or d_bytes) and row.container_id is not None:
                self._count_for_container(row, bytes_per_s, calls_per_s, d_bytes, d_calls)
            slot = state.slot
            history_bytes[slot] = bytes_per_s
            history_calls[slot] = calls_per_s
            rss = row.rss_bytes
            history_memory[slot] = -1.0 if rss is None else rss

        for key in self._states.keys() - seen:  # a C-level difference: nearly every row was seen
            state = self._states[key]
            row = state.row
            if row.exited and row.exited_at is not None and now - row.exited_at > self.exited_keep_s:
                del self._states[key]
                self._histories.drop_row(state.slot)
                continue
            if not row.exited:  # its PID was listed no more and its kernel entry is gone: it exited
                state.row = row = replace(row, exited=True, exited_at=now)
                if self._live_key.get(row.pid) == key:
                    del self._live_key[row.pid]
            # No kernel entry any more (forgotten after exit): no allocations this tick.
            if row.kmalloc_bytes_per_s or row.kmalloc_calls_per_s:
                state.row = replace(row, kmalloc_bytes_per_s=0.0, kmalloc_calls_per_s=0.0)
            history_bytes[state.slot] = history_calls[state.slot] = 0.0
            history_memory[state.slot] = -1.0
        self._totals = (total_bytes, total_calls)
        if reading is not None:  # the attach baseline served the first reading; a later PID owner is new
            self._kmalloc_baseline.clear()
        container_bytes, container_calls, container_memory = self._container_histories.start_tick(now)
        for container_id in self._refs:
            totals = self._container_totals.setdefault(container_id, [0.0, 0.0, 0, 0])
            cstate = self._container_states.get(container_id)
            cslot = self._container_slot.get(container_id)
            if cslot is None:
                cslot = self._container_slot[container_id] = self._container_histories.add_row()
            memory = cstate.memory_bytes if cstate else None
            container_bytes[cslot], container_calls[cslot] = totals[0], totals[1]
            container_memory[cslot] = -1.0 if memory is None else memory
        return forget

    def _ingest_retired(self, retired: RetiredCounters, elapsed: float, now: float) -> _ProcState:
        """Charge a dead process's final kernel totals (its PID now belongs to another process) to its
        own row, marked exited, and stop mapping the PID to it. Returns its state (the row has its last
        rates; the caller writes its history)."""
        tgid, counters = retired.tgid, retired.counters
        key = self._live_key.get(tgid)
        state = self._states.get(key) if key is not None else None
        if state is None:  # it lived and died between two reads: a row from what the kernel kept
            cgroup = counters.cgroup_path
            placement = _placement(cgroup, parse_cgroup_path(cgroup) if cgroup else None)
            row = ProcessRow(pid=tgid, start_time=-retired.first_seen, comm=counters.comm or "?", **placement)  # type: ignore[arg-type]
            state = self._states.get(row.key)
            if state is None:
                state = self._states[row.key] = _ProcState(row=row, slot=self._histories.add_row())
        elif self._live_key.get(tgid) == key:
            del self._live_key[tgid]
        d_calls = counter_delta(state.kernel_calls, counters.calls)
        d_bytes = counter_delta(state.kernel_bytes, counters.bytes_alloc)
        d_req = counter_delta(state.kernel_bytes_req, counters.bytes_req)
        state.kernel_calls, state.kernel_bytes = counters.calls, counters.bytes_alloc
        state.kernel_bytes_req = counters.bytes_req
        bytes_per_s = d_bytes / elapsed if elapsed > 0 else 0.0
        calls_per_s = d_calls / elapsed if elapsed > 0 else 0.0
        row = state.row
        state.row = replace(
            row,
            kmalloc_bytes_per_s=bytes_per_s,
            kmalloc_calls_per_s=calls_per_s,
            kmalloc_bytes=row.kmalloc_bytes + d_bytes,
            kmalloc_calls=row.kmalloc_calls + d_calls,
            kmalloc_bytes_req=row.kmalloc_bytes_req + d_req,
            exited=True,
            exited_at=row.exited_at if row.exited_at is not None else now,
        )
        self._count_for_container(state.row, bytes_per_s, calls_per_s, d_bytes, d_calls)
        return state

    def _count_for_container(
        self, row: ProcessRow, bytes_per_s: float, calls_per_s: float, d_bytes: int, d_calls: int
    ) -> None:
        if row.container_id is None or not (d_bytes or d_calls):
            return
        if row.container_id not in self._refs:
            ref = parse_cgroup_path(row.cgroup_path)
            if ref is None:
                return
            self._refs[ref.container_id] = ref
        # The container, and any container it is nested in (docker-in-docker, kind): an outer container's
        # kmalloc counts its inner ones, as its process count and memory (its cgroup subtree) do.
        for container_id in (row.container_id, *_outer_containers(self._refs[row.container_id].cgroup_path)):
            totals = self._container_totals.setdefault(container_id, [0.0, 0.0, 0, 0])
            totals[0] += bytes_per_s
            totals[1] += calls_per_s
            totals[2] += d_bytes
            totals[3] += d_calls

    def _state_for(
        self, tgid: int, counters: KmallocCounters, info: ProcInfo | None, now: float
    ) -> _ProcState:
        key = self._live_key.get(tgid)
        if key is not None and info is not None and tgid != IRQ_TGID and info.start_time != key.start_time:
            # The PID was reused: the old process exited, this is a new one (a new row).
            old = self._states.get(key)
            if old is not None:
                old.row = replace(
                    old.row, exited=True, exited_at=now, kmalloc_bytes_per_s=0.0, kmalloc_calls_per_s=0.0
                )
                new_state = self._new_state(tgid, counters, info, now)
                # Counts the kernel had before the reuse belong to the old process.
                new_state.kernel_calls, new_state.kernel_bytes = old.kernel_calls, old.kernel_bytes
                new_state.kernel_bytes_req = old.kernel_bytes_req
                return new_state
            key = None
        if key is not None and key in self._states:
            return self._states[key]
        return self._new_state(tgid, counters, info, now)

    def _new_state(
        self, tgid: int, counters: KmallocCounters, info: ProcInfo | None, now: float
    ) -> _ProcState:
        if tgid == IRQ_TGID:
            row = ProcessRow(
                pid=tgid, start_time=0.0, comm=IRQ_COMM, cmdline="allocations in interrupt context"
            )
        elif info is not None:
            fields = _live_fields(info, counters)
            fields.setdefault("comm", counters.comm or "?")
            row = ProcessRow(pid=tgid, start_time=info.start_time, **fields)  # type: ignore[arg-type]
        else:
            # Exited before we could look: all we have is what the kernel recorded, its name and cgroup.
            cgroup = counters.cgroup_path
            placement = _placement(cgroup, parse_cgroup_path(cgroup) if cgroup else None)
            row = ProcessRow(pid=tgid, start_time=-now, comm=counters.comm or "?", **placement)  # type: ignore[arg-type]
        existing = self._states.get(row.key)
        if existing is not None:  # this very process had a row (retired a moment ago): keep its totals
            existing.row = _evolve(existing.row, {"exited": False, "exited_at": None})
            existing.info = None
            if info is not None or tgid == IRQ_TGID:
                self._live_key[tgid] = row.key
            return existing
        state = _ProcState(row=row, info=info, slot=self._histories.add_row())
        if info is not None and info.container is not None:
            self._refs.setdefault(info.container.container_id, info.container)
        base = self._kmalloc_baseline.pop(tgid, None)
        if base is not None:  # counted while the probe attached: a baseline, not data (kmalloc_attached)
            state.kernel_calls, state.kernel_bytes, state.kernel_bytes_req = (
                base.calls,
                base.bytes_alloc,
                base.bytes_req,
            )
        self._states[row.key] = state
        if info is not None or tgid == IRQ_TGID:
            self._live_key[tgid] = row.key
        return state

    def tcp_attached(self, when: float) -> None:
        """The TCP probe started at `when`: its rates are over the time since."""
        self.tcp_since = when

    # -- other inputs ---------------------------------------------------------------------------------

    def set_focus(self, key: ProcessKey | None) -> None:
        self.focus_key = key
        self.leaks.watch(key.pid if key is not None else None)
        self._focus_reading = None

    def set_focus_reading(self, reading: FocusReading | None) -> None:
        self._focus_reading = reading

    def ingest_oom(self, reading: OomReading) -> None:
        """New kills (already attributed to containers by the source) get the history memtop held for
        the victim's container, or else the victim itself, over the minute before the kill."""
        for event in reading.events:
            self._oom.append(self._with_history(event))
            if event.source == "tracepoint":
                self._oom_seen += 1
        if reading.reaped:
            reaped = {e.key: e.reaped_at for e in reading.reaped}
            for i, event in enumerate(self._oom):
                if event.key in reaped:
                    self._oom[i] = replace(event, reaped_at=reaped[event.key])
        self._drops.update(
            oom_lost=reading.lost,
            oom_task_map_full=reading.task_map_full,
            oom_cgroup_lost=reading.cgroup_lost,
            oom_recursion_misses=reading.recursion_misses,
        )

    def add_oom_backlog(self, events: Iterable[OomEvent]) -> None:
        """Kills found in the kernel log from before memtop started (oldest first)."""
        for event in sorted(events, key=lambda e: e.time):
            self._oom.append(event)

    def _with_history(self, event: OomEvent) -> OomEvent:
        def before_kill(points: Iterable[HistoryPoint]) -> tuple[HistoryPoint, ...]:
            return tuple(p for p in points if event.time - PRE_KILL_S <= p.t <= event.time + 1.0)

        victim: tuple[HistoryPoint, ...] = ()
        for state in self._states.values():
            if state.row.pid == event.victim_pid and state.row.start_time <= event.time:
                victim = before_kill(self._histories.points(state.slot))
                if victim:
                    break
        container: tuple[HistoryPoint, ...] = ()
        slot = self._container_slot.get(event.container_id) if event.container_id else None
        if slot is not None:
            container = before_kill(self._container_histories.points(slot))
        if container:  # the container's memory is what hit the limit; the victim's RSS goes alongside
            return replace(event, history=container, history_of="container", victim_history=victim)
        if victim:
            return replace(event, history=victim, history_of="process", victim_history=victim)
        return event

    def ingest_tcp(self, now: float, reading: TcpReading) -> None:
        if self.tcp is None:
            self.tcp = TcpAggregator(started_at=self.tcp_since or self.started_at)
        self.tcp.ingest(now, reading)
        self._drops.update({f"tcp_{name}": count for name, count in reading.drops().items()})

    def ingest_leaks(self, now: float, reading: LeakReading) -> None:
        self.leaks.ingest(now, reading)
        prefix = "leak_user_" if reading.kind == KIND_USER else "leak_"
        self._drops.update({prefix + name: count for name, count in reading.drops.items()})

    def forget_user_leaks(self) -> None:
        self.leaks.forget(KIND_USER)
        self.leak_user_pid = None
        for name in [n for n in self._drops if n.startswith("leak_user_")]:
            del self._drops[name]

    def cgroup_ids(self) -> set[int]:
        """cgroup2 ids the TCP data names that have no path yet (the source resolves them)."""
        if self.tcp is None:
            return set()
        ids = {r.cgroup_id for r in self.tcp.rows()} | {s.cgroup_id for s in self.tcp.slow_connects()}
        return {i for i in ids if i and i not in self._cgroup_paths}

    def set_cgroup_paths(self, paths: Mapping[int, str]) -> None:
        self._cgroup_paths.update(paths)

    def _place(self, cgroup_id: int) -> tuple[str, str | None]:
        path = self._cgroup_paths.get(cgroup_id, "")
        ref = parse_cgroup_path(path) if path else None
        return path, ref.container_id if ref else None

    def _tcp_rows(self) -> tuple[TcpRow, ...]:
        if self.tcp is None:
            return ()
        rows = []
        for row in self.tcp.rows():
            path, container_id = self._place(row.cgroup_id)
            proc = self._process_of(row.pid)
            if proc is not None:  # one attribution for every panel: the process's own (v1 memory cgroup too)
                rows.append(
                    replace(
                        row,
                        cgroup_path=proc.cgroup_path or path,
                        container_id=proc.container_id,
                        comm=proc.comm,
                    )
                )
            else:
                rows.append(replace(row, cgroup_path=path, container_id=container_id))
        return tuple(rows)

    def _process_of(self, pid: int) -> ProcessRow | None:
        """The process now holding `pid`, as the Processes panel shows it (its name, not a thread's)."""
        key = self._live_key.get(pid)
        state = self._states.get(key) if key is not None else None
        return state.row if state is not None else None

    def _tcp_slow(self) -> tuple[SlowConnect, ...]:
        if self.tcp is None:
            return ()
        slow = []
        for event in self.tcp.slow_connects():
            path, container_id = self._place(event.cgroup_id)
            proc = self._process_of(event.pid)
            if proc is not None:
                path, container_id = proc.cgroup_path or path, proc.container_id
            slow.append(replace(event, cgroup_path=path, container_id=container_id))
        return tuple(slow)

    def container_refs(self) -> dict[str, ContainerRef]:
        """Every container a process has been attributed to (the source looks up their state)."""
        return dict(self._refs)

    def set_containers(self, states: Mapping[str, ContainerState]) -> None:
        """The containers on the host now, with what the source read about them; those no longer present
        and with no process rows left are forgotten."""
        for container_id, cstate in states.items():
            self._refs.setdefault(container_id, cstate.ref)
        live_ids = set(map(_container_id, map(_state_row, self._states.values())))
        for container_id in list(self._refs):
            if container_id not in states and container_id not in live_ids:
                self._refs.pop(container_id, None)
                self._container_totals.pop(container_id, None)
                slot = self._container_slot.pop(container_id, None)
                if slot is not None:
                    self._container_histories.drop_row(slot)
        self._container_states = dict(states)

    def container_rows(self) -> tuple[ContainerRow, ...]:
        rows = []
        live_pids: dict[str, list[int]] = {}
        for state in self._in_containers():
            row = state.row
            if not row.exited:
                live_pids.setdefault(row.container_id, []).append(row.pid)  # type: ignore[arg-type]
        kills: dict[str, int] = {}
        for event in self._oom:
            if event.container_id:
                kills[event.container_id] = kills.get(event.container_id, 0) + 1
        for container_id, ref in self._refs.items():
            cstate = self._container_states.get(container_id)
            meta = cstate.meta if cstate else ContainerMeta()
            totals = self._container_totals.get(container_id, [0.0, 0.0, 0, 0])
            pids = cstate.pids if cstate and cstate.pids else tuple(sorted(live_pids.get(container_id, ())))
            rows.append(
                ContainerRow(
                    id=container_id,
                    runtime=meta.runtime or ref.runtime,
                    cgroup_path=ref.cgroup_path,
                    name=meta.name,
                    pod_uid=ref.pod_uid,
                    pod_name=meta.pod_name,
                    namespace=meta.namespace,
                    qos=ref.qos,
                    image=meta.image,
                    pids=pids,
                    kmalloc_bytes_per_s=totals[0],
                    kmalloc_calls_per_s=totals[1],
                    kmalloc_bytes=int(totals[2]),
                    kmalloc_calls=int(totals[3]),
                    memory_bytes=cstate.memory_bytes if cstate else None,
                    memory_limit_bytes=cstate.memory_limit_bytes if cstate else None,
                    oom_kills=kills.get(container_id, 0),
                    memory_usage_bytes=cstate.memory_usage_bytes if cstate else None,
                )
            )
        return tuple(rows)

    def _in_containers(self) -> Iterable[_ProcState]:
        """The states of rows placed in a container, picked in C (a busy host's rows are mostly the
        host's, and several passes a tick look only at these)."""
        states = self._states.values()
        return compress(states, map(_container_id, map(_state_row, states)))

    # -- output ---------------------------------------------------------------------------------------

    def history(self, key: ProcessKey) -> tuple[HistoryPoint, ...]:
        state = self._states.get(key)
        return self._histories.points(state.slot) if state else ()

    def snapshot(self, now: float | None = None, include_histories: bool = False) -> Snapshot:
        now = time.time() if now is None else now
        focus = None
        if self.focus_key is not None:
            focus = FocusDetail(
                self.focus_key,
                self.history(self.focus_key),
                self._focus_reading,
                self.leaks.rows(older_than_s=self.leak_older_s, pid=self.focus_key.pid),
            )
        histories = (
            {k: self._histories.points(s.slot) for k, s in self._states.items()} if include_histories else {}
        )
        containers = self.container_rows()
        labels = {c.id: c.label for c in containers}
        for s in self._in_containers():  # a container's name, once known, is kept on its rows
            if s.row.container != labels.get(s.row.container_id, ""):  # type: ignore[arg-type]
                s.row = _evolve(s.row, {"container": labels.get(s.row.container_id, "")})  # type: ignore[arg-type]
        processes = tuple(map(_state_row, self._states.values()))
        return Snapshot(
            taken_at=now,
            duration_s=max(0.0, now - (self.kmalloc_since or self.started_at)),
            interval_s=self.interval_s,
            host=self.host,
            probes=dict(self.probes),
            processes=processes,
            kmalloc_bytes_per_s=self._totals[0],
            kmalloc_calls_per_s=self._totals[1],
            sample_every=self._sample_every,
            drops=dict(self._drops),
            focus=focus,
            histories=histories,
            containers=containers,
            oom_events=tuple(reversed(self._oom)),
            oom_kills_seen=self._oom_seen,
            tcp_connect=self._tcp_rows(),
            tcp_slow_connects=self._tcp_slow(),
            tcp_in_flight=self.tcp.in_flight_count() if self.tcp else 0,
            tcp_slow_ms=self.tcp_slow_ms,
            leaks=self.leaks.rows(older_than_s=self.leak_older_s),
            leak_sample_rate=self.leaks.sample_rate,
            leak_sample_rates=self.leaks.sample_rates,
            leak_older_s=self.leak_older_s,
            leak_user_pid=self.leak_user_pid,
            container_histories={
                k: self._container_histories.points(slot)
                for k, slot in self._container_slot.items()
                if include_histories or k == self.focus_container
            },
        )


_state_row = operator.attrgetter("row")
_container_id = operator.attrgetter("container_id")
_new_object = object.__new__
_set_attribute = object.__setattr__  # the frozen class's own __setattr__ refuses


def _evolve(row: ProcessRow, changes: Mapping[str, object]) -> ProcessRow:
    """`replace(row, **changes)` without re-running __init__: a tick rebuilds thousands of rows, and
    dataclasses.replace was most of the store's time. Only for fields of the class (not validated)."""
    new = _new_object(ProcessRow)
    fields = row.__dict__.copy()
    fields.update(changes)
    _set_attribute(new, "__dict__", fields)
    return new


def _outer_containers(cgroup_path: str) -> tuple[str, ...]:
    """Ids of the containers a container's cgroup is nested in, innermost first (usually none)."""
    parts = [p for p in cgroup_path.split("/") if p]
    out: list[str] = []
    for n in range(len(parts) - 1, 0, -1):
        ref = parse_cgroup_path("/" + "/".join(parts[:n]))
        if ref is None:
            break
        if ref.cgroup_path != cgroup_path and ref.container_id not in out:
            out.append(ref.container_id)
    return tuple(out)


def _placement(cgroup: str, ref: ContainerRef | None) -> dict[str, object]:
    """A process's container id, or for a host process its systemd unit. A process placed on the host is
    looked at again (cached): a container the runtimes' state names may have become known since."""
    if ref is None and cgroup:
        ref = parse_cgroup_path(cgroup)
    return {
        "cgroup_path": cgroup,
        "container_id": ref.container_id if ref else None,
        "unit": "" if ref is not None or not cgroup else host_unit(cgroup),
    }


def _live_fields(info: ProcInfo, counters: KmallocCounters) -> dict[str, object]:
    if info.cgroup_path:
        placement = _placement(info.cgroup_path, info.container)
    else:  # /proc did not say: the kernel's cgroup id at first kmalloc/exec
        cgroup = counters.cgroup_path
        placement = _placement(cgroup, parse_cgroup_path(cgroup) if cgroup else None)
    fields: dict[str, object] = {
        **placement,
        "cmdline": info.cmdline,
        "user": info.user,
        "state": info.state,
        "rss_bytes": info.rss_bytes,
        "vms_bytes": info.vms_bytes,
        "threads": info.threads,
    }
    if info.comm:
        fields["comm"] = info.comm
    return fields


def whole_window_rates(snapshot: Snapshot) -> Snapshot:
    """Rates over the snapshot's whole duration (totals / duration_s), as a headless snapshot reports them."""
    window = snapshot.duration_s
    if window <= 0:
        return snapshot
    tcp = snapshot.probes.get("tcp")
    tcp_window = snapshot.taken_at - tcp.since if tcp is not None and tcp.since else window
    rows = tuple(
        replace(r, kmalloc_bytes_per_s=r.kmalloc_bytes / window, kmalloc_calls_per_s=r.kmalloc_calls / window)
        for r in snapshot.processes
    )
    containers = tuple(
        replace(c, kmalloc_bytes_per_s=c.kmalloc_bytes / window, kmalloc_calls_per_s=c.kmalloc_calls / window)
        for c in snapshot.containers
    )
    tcp_rows = tuple(
        replace(t, connects_per_s=t.connects / tcp_window, failed_per_s=t.failed / tcp_window)
        for t in snapshot.tcp_connect
    )
    return replace(
        snapshot,
        processes=rows,
        containers=containers,
        tcp_connect=tcp_rows,
        kmalloc_bytes_per_s=sum(r.kmalloc_bytes for r in rows) / window,
        kmalloc_calls_per_s=sum(r.kmalloc_calls for r in rows) / window,
    )


# -- sorting and filtering on raw values ----------------------------------------------------------------


@dataclass(frozen=True)
class SortKey:
    column: str
    reverse: bool = True


def _sort_value(column: str) -> Callable[[object], tuple[int, object]]:
    def value(row: object) -> tuple[int, object]:
        v = getattr(row, column)
        if v is None:
            return (0, 0)  # unknowns sort below every known value
        if isinstance(v, str):
            return (1, v.lower())
        return (1, v)

    return value


R = TypeVar("R")


def sort_rows(rows: Iterable[R], sort: SortKey, tiebreak: Callable[[R], Any] | None = None) -> list[R]:
    """Sorted on raw values; ties broken by pid (or `tiebreak`) so the order is stable tick to tick.
    Unknown (None) values sort below every known one, names case-insensitively."""
    ordered = sorted(rows, key=tiebreak or _pid_of)
    if ordered:
        getter = operator.attrgetter(sort.column)
        if not isinstance(getter(ordered[0]), str):
            try:  # the common case, thousands of numbers: compare them as they are
                return sorted(ordered, key=getter, reverse=sort.reverse)
            except TypeError:  # some are None (or a name column): the general key below
                pass
    return sorted(ordered, key=_sort_value(sort.column), reverse=sort.reverse)


def _pid_of(row: Any) -> Any:
    return getattr(row, "pid", 0)


def filter_rows(rows: Iterable[ProcessRow], text: str) -> list[ProcessRow]:
    """Rows whose command, command line, PID, container (name or id) or systemd unit contains `text`
    (case-insensitive); empty text keeps all."""
    needle = text.strip().lower()
    if not needle:
        return list(rows)
    return [
        r
        for r in rows
        if needle in r.comm.lower()
        or needle in r.cmdline.lower()
        or (not r.is_irq and needle in str(r.pid))
        or (r.container_id is not None and needle in f"{r.container.lower()} {r.container_id}")
        or (r.unit != "" and needle in r.unit.lower())
    ]


def filter_containers(rows: Iterable[ContainerRow], text: str) -> list[ContainerRow]:
    """Containers whose name, id, pod, namespace or runtime contains `text` (case-insensitive)."""
    needle = text.strip().lower()
    if not needle:
        return list(rows)
    return [
        c
        for c in rows
        if any(needle in v.lower() for v in (c.name, c.pod_name, c.namespace, c.runtime, c.image))
        or c.id.startswith(needle)
        or c.pod_uid.startswith(needle)
    ]
