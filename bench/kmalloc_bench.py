#!/usr/bin/env python3
"""What memtop's kmalloc probe costs a kmalloc-heavy workload.

A small C program calls listxattr(path, buf, 256) in a tight loop: on current kernels each call does one
kmalloc (call site listxattr+0x7d), millions of them a second. Each round runs it three times: with no
tracing, with memtop's KmallocProbe attached (read once a second from a thread, as the app does), and with
the probe plus the kernel's BPF run-time statistics ("bpf_stats"). The script reports the median
iterations/s, the probe's slowdown (from the runs without bpf_stats, whose accounting has a cost of its
own), and from the bpf_stats runs the kernel's account of the BPF programs: ns per event and events/s.

Needs root. Usage: sudo make bench, or sudo .venv/bin/python bench/kmalloc_bench.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402  (the sibling module, found through the path set just above)
    MINIMAL_COUNTER_C,
    STATS_ELSEWHERE,
    AllReader,
    BenchError,
    PeriodicReader,
    ProgStats,
    RunTimeStats,
    Workload,
    add_common_args,
    attached_programs,
    build_workload,
    check_unloaded,
    compile_c,
    finish_workload,
    foreign_attachments,
    foreign_reasons,
    import_memtop,
    int_in,
    load_average,
    log,
    machine,
    machine_line,
    main_wrapper,
    markdown_table,
    maybe_stats,
    num,
    panel_probes,
    prog_ids_of,
    prog_stats,
    retry_while_foreign,
    run_workload,
    start_process,
    start_workload,
    stat_delta,
)
from tcp_bench import WORKLOAD_C as CONNECT_LOOP_C  # noqa: E402

__all__ = ["build_workload", "run_workload", "main"]  # the smoke test uses the first two

MAX_SAMPLE_EVERY = 1_000_000  # the same bound as memtop.probes.kmalloc.MAX_SAMPLE_EVERY
IRQ_TRACEPOINTS = ("softirq_entry", "softirq_exit", "irq_handler_entry", "irq_handler_exit")
WATCHED_TRACEPOINTS = ("kmalloc", *IRQ_TRACEPOINTS)


# -- one run -------------------------------------------------------------------------------------------

NONE, PROBE, PROBE_STATS = "none", "probe", "probe+bpf_stats"


@dataclass
class Run:
    mode: str  # NONE, PROBE (bpf_stats off: throughput) or PROBE_STATS (bpf_stats on: per-event cost)
    sample: int | None
    round: int
    iterations: int
    elapsed_s: float
    iterations_per_s: float
    window_s: float = 0.0  # between the two bpftool readings
    kmalloc_run_time_ns: int = 0
    kmalloc_run_cnt: int = 0
    irq_run_time_ns: int = 0
    irq_run_cnt: int = 0
    minimal_run_time_ns: int = 0  # the minimal kmem:kmalloc counter beside the probe (bpf_stats runs)
    minimal_run_cnt: int = 0
    kmalloc_kind: str = ""  # the probe's kmalloc program: RAW or CLASSIC
    floor_run_time_ns: dict[str, int] = field(default_factory=dict)  # empty programs beside it, by kind
    floor_run_cnt: dict[str, int] = field(default_factory=dict)
    workload_kmallocs: int = 0  # the probe's count for the workload's tgid (scaled when sampled)
    reads: int = 0
    prog_ids: dict[str, int] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)  # other tracers seen before or after the run
    attempt: int = 1


def run_none(workload: Workload, seconds: float, round_no: int) -> Run:
    foreign = foreign_attachments(WATCHED_TRACEPOINTS)
    iterations, elapsed = run_workload(workload, seconds)
    foreign += foreign_attachments(WATCHED_TRACEPOINTS)
    return Run(NONE, None, round_no, iterations, elapsed, iterations / elapsed, foreign=sorted(set(foreign)))


def probe_class() -> Any:
    """memtop's KmallocProbe, imported late so that --help and the root check work without BCC."""
    return import_memtop("probes.kmalloc", "KmallocProbe")


def run_probe(
    workload: Workload, seconds: float, round_no: int, sample: int, with_stats: bool, all_ids: set[int]
) -> Run:
    """One run with the probe attached and read every second; the programs' stats when `with_stats`."""
    probe = probe_class()(sample_every=sample)
    reader = PeriodicReader(probe)
    # With the statistics on, the yardsticks run beside the probe: the least a kmalloc program can cost
    # (the minimal counter) and what the accounting itself costs per run (empty programs).
    sticks = Yardsticks() if with_stats else None
    try:
        minimal_ids = sticks.minimal_ids if sticks else set()
        floor_ids = set(sticks.floor_kinds) if sticks else set()
        probe.start()
        kinds = attached_programs(os.getpid())
        ids = {
            tp: min(set(progs) - minimal_ids - floor_ids)
            for tp, progs in prog_ids_of(os.getpid()).items()
            if set(progs) - minimal_ids - floor_ids
        }
        if "kmalloc" not in ids:
            raise BenchError(f"no BPF program of the probe is attached to kmalloc (bpftool saw {ids})")
        all_ids.update(ids.values())
        kmalloc_id = ids["kmalloc"]
        irq_ids = {i for name, i in ids.items() if name in IRQ_TRACEPOINTS}
        foreign = foreign_attachments(WATCHED_TRACEPOINTS)
        reader.start()
        before = prog_stats(set(ids.values()) | minimal_ids | floor_ids)
        t0 = time.monotonic()
        proc = start_workload(workload, seconds)
        iterations, elapsed = finish_workload(proc, seconds)
        window = time.monotonic() - t0
        after = prog_stats(set(ids.values()) | minimal_ids | floor_ids)
        foreign = sorted(set(foreign + foreign_attachments(WATCHED_TRACEPOINTS)))
        if not with_stats and after[kmalloc_id].run_cnt > before[kmalloc_id].run_cnt:
            foreign.append(STATS_ELSEWHERE)
        reader.stop()
        reader.check()
        counters = probe.read().per_tgid.get(proc.pid)
        workload_kmallocs = counters.calls if counters is not None else 0
    finally:
        reader.stop()
        probe.close()
        if sticks is not None:
            sticks.close()

    k = stat_delta(before, after, {kmalloc_id})
    yardstick = stat_delta(before, after, minimal_ids)
    irq = stat_delta(before, after, irq_ids)
    floor = floor_deltas(before, after, sticks.floor_kinds if sticks else {})
    return Run(
        PROBE_STATS if with_stats else PROBE,
        sample,
        round_no,
        iterations,
        elapsed,
        iterations / elapsed,
        window_s=window,
        kmalloc_run_time_ns=k.run_time_ns if with_stats else 0,
        kmalloc_run_cnt=k.run_cnt if with_stats else 0,
        irq_run_time_ns=irq.run_time_ns if with_stats else 0,
        irq_run_cnt=irq.run_cnt if with_stats else 0,
        minimal_run_time_ns=yardstick.run_time_ns,
        minimal_run_cnt=yardstick.run_cnt,
        workload_kmallocs=workload_kmallocs,
        kmalloc_kind=kinds[kmalloc_id][1],
        floor_run_time_ns={kind: d.run_time_ns for kind, d in floor.items()},
        floor_run_cnt={kind: d.run_cnt for kind, d in floor.items()},
        reads=reader.reads,
        prog_ids=ids,
        foreign=foreign,
    )


# -- every panel on, beside a minimal counter -----------------------------------------------------------

# The measurement floor. With the run-time statistics on, the kernel wraps every program run in two
# clock reads and a per-CPU add, and counts them in that program's run_time_ns; an empty program's
# ns/run is that floor alone. One on each tracepoint a listxattr iteration hits, of the kind memtop
# attaches there (raw: kmalloc, kfree, kmem_cache_alloc, kmem_cache_free), and a classic one on kmalloc
# beside the minimal counter. (The kernel leak probe's classic cache learner on kmem_cache_alloc is on only
# for 2 s windows: the one at start ends in the warm-up, and none begins during the measurements, so the
# per-tracepoint figures are the raw programs' alone.) A classic tracepoint also fills its record before
# any program runs; the statistics do not see that (the added ns/iteration with the statistics off do).
FLOOR_C = r"""
RAW_TRACEPOINT_PROBE(kmalloc) { return 0; }
TRACEPOINT_PROBE(kmem, kmalloc) { return 0; }
RAW_TRACEPOINT_PROBE(kfree) { return 0; }
RAW_TRACEPOINT_PROBE(kmem_cache_free) { return 0; }
RAW_TRACEPOINT_PROBE(kmem_cache_alloc) { return 0; }
"""
RAW, CLASSIC = "raw_tracepoint", "tracepoint"  # bpftool perf list's fd_type


class Yardsticks:
    """The minimal counter and (with_floor) the empty programs, loaded in this process before memtop's
    probes; their program ids, so that they can be told from memtop's."""

    def __init__(self, with_floor: bool = True) -> None:
        bcc = import_memtop("probes.base", "import_bcc")()
        self.objects: list[Any] = []
        self.floor_kinds: dict[int, tuple[str, str]] = {}  # prog id -> (tracepoint, kind)
        try:
            known = set(attached_programs(os.getpid()))
            self.objects.append(bcc.BPF(text=MINIMAL_COUNTER_C.encode()))
            now = attached_programs(os.getpid())
            self.minimal_ids = set(now) - known
            if with_floor:
                self.objects.append(bcc.BPF(text=FLOOR_C.encode()))
                self.floor_kinds = {i: k for i, k in attached_programs(os.getpid()).items() if i not in now}
        except BaseException:
            self.close()
            raise

    @property
    def ids(self) -> set[int]:
        return self.minimal_ids | set(self.floor_kinds)

    def close(self) -> None:
        while self.objects:
            self.objects.pop().cleanup()


def floor_deltas(
    before: dict[int, ProgStats], after: dict[int, ProgStats], kinds: dict[int, tuple[str, str]]
) -> dict[str, ProgStats]:
    """The empty programs' run time and runs, summed by kind (RAW, CLASSIC)."""
    return {
        kind: stat_delta(before, after, [i for i, (_tp, k) in kinds.items() if k == kind])
        for kind in sorted({k for _tp, k in kinds.values()})
    }


def per_run(d: ProgStats | None) -> float | None:
    return d.run_time_ns / d.run_cnt if d is not None and d.run_cnt and d.run_time_ns else None


def floor_of(kind: str, floor: dict[str, float | None]) -> float:
    """ns per run of the floor for a program of `kind` (the other kind's when only that was measured)."""
    value = floor.get(kind)
    if value is None:
        value = next((v for v in floor.values() if v is not None), None)
    if value is None:
        raise BenchError("the empty programs did not run: no measurement floor")
    return value


def net_run_time(
    before: dict[int, ProgStats],
    after: dict[int, ProgStats],
    kinds: dict[int, tuple[str, str]],
    floor: dict[str, float | None],
) -> tuple[int, float]:
    """(runs, run time net of the floor in ns) of the programs in `kinds`: each program's run_time_ns
    minus its runs times the floor of its kind."""
    runs, net = 0, 0.0
    for i, (_tp, kind) in kinds.items():
        d = stat_delta(before, after, [i])
        runs += d.run_cnt
        net += d.run_time_ns - d.run_cnt * floor_of(kind, floor)
    return runs, net


PANELS_WARMUP_S = 4.0


@dataclass
class PanelsRun:
    round: int
    iterations: int  # of the listxattr loop run alone
    elapsed_s: float
    memtop_ns_per_iteration: float  # all memtop programs' run time / loop iterations
    minimal_ns_per_iteration: float  # the minimal counter's, same window
    memtop_programs: int
    floor_ns_per_run: dict[str, float | None]  # empty programs, by kind (RAW, CLASSIC), same window
    memtop_runs_per_iteration: float
    memtop_net_ns_per_iteration: float  # gross - each run x the floor of its program's kind
    minimal_runs_per_iteration: float
    minimal_net_ns_per_iteration: float
    loaded_alone_misses: int  # memtop programs' recursion misses while the loop ran alone
    load_seconds: float  # the loop and a loopback connect loop together
    load_misses: int  # memtop programs' recursion misses during that
    load_misses_by_program: dict[str, int] = field(default_factory=dict)
    ns_per_iteration_by_program: dict[str, float] = field(default_factory=dict)
    tcp_outcomes_lost: int | None = None  # connects whose outcome the TCP probe never saw (None: not counted)
    foreign: list[str] = field(default_factory=list)
    attempt: int = 1


def run_panels(
    workload: Workload, connect_loop: Path, seconds: float, round_no: int, all_ids: set[int]
) -> PanelsRun:
    """Every panel's probes plus the minimal counter, with the run-time statistics on: the loop alone
    (BPF ns per iteration of each), then the loop beside a loopback connect loop (recursion misses)."""
    sticks = Yardsticks()
    probes: list[Any] = []
    reader = AllReader(probes)
    try:
        probes += panel_probes()
        for probe in probes:
            probe.start()
        kinds = {i: k for i, k in attached_programs(os.getpid()).items() if i not in sticks.ids}
        ids = set(kinds)
        names = {i: tp for i, (tp, _kind) in kinds.items()}
        all_ids.update(ids | sticks.ids)
        foreign = foreign_attachments(WATCHED_TRACEPOINTS)
        reader.start()
        run_workload(workload, PANELS_WARMUP_S)  # the leak probe's adaptive 1-in-N settles meanwhile
        for probe in probes:  # and its cache learner's window at start ends: no other during the windows
            if hasattr(probe, "hold_learning"):
                probe.hold_learning = True
                probe.end_learning()
        with RunTimeStats():
            before = prog_stats(ids | sticks.ids)
            iterations, elapsed = run_workload(workload, seconds)
            after = prog_stats(ids | sticks.ids)
        ours, yardstick = stat_delta(before, after, ids), stat_delta(before, after, sticks.minimal_ids)
        floor = {k: per_run(d) for k, d in floor_deltas(before, after, sticks.floor_kinds).items()}
        memtop_runs, memtop_net = net_run_time(before, after, kinds, floor)
        minimal_runs, minimal_net = net_run_time(
            before, after, {i: ("kmalloc", CLASSIC) for i in sticks.minimal_ids}, floor
        )
        load = start_process([str(connect_loop), repr(seconds)])
        mid = prog_stats(ids)
        t0 = time.monotonic()
        run_workload(workload, seconds)
        finish_workload(load, seconds)
        load_seconds = time.monotonic() - t0
        end = prog_stats(ids)
        reader.stop()
        reader.check()
        tcp_reading = probes[2].read() if probes[2].running else None
        tcp_lost = getattr(tcp_reading, "outcome_lost", None)  # None: a memtop from before it was counted
        foreign = sorted(set(foreign + foreign_attachments(WATCHED_TRACEPOINTS)))
    finally:
        reader.stop()
        for probe in reversed(probes):
            probe.close()
        sticks.close()
    cost: dict[str, float] = {}
    for i in ids:
        cost[names[i]] = cost.get(names[i], 0.0) + (after[i].run_time_ns - before[i].run_time_ns) / iterations
    by_program: dict[str, int] = {}
    for i in ids:
        by_program[names[i]] = by_program.get(names[i], 0) + end[i].recursion_misses - mid[i].recursion_misses
    return PanelsRun(
        round_no,
        iterations,
        elapsed,
        ours.run_time_ns / iterations,
        yardstick.run_time_ns / iterations,
        len(ids),
        floor,
        memtop_runs / iterations,
        memtop_net / iterations,
        minimal_runs / iterations,
        minimal_net / iterations,
        ours.recursion_misses,
        load_seconds,
        sum(by_program.values()),
        {k: v for k, v in sorted(by_program.items()) if v},
        {k: round(v, 1) for k, v in sorted(cost.items(), key=lambda kv: -kv[1]) if v >= 0.5},
        tcp_lost,
        foreign,
    )


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def panels_table(runs: list[PanelsRun]) -> str:
    columns = (
        "round",
        "floor ns/run, raw / classic",
        "memtop runs/iteration",
        "memtop BPF ns/iteration (all panels), gross / net",
        "minimal counter ns/iteration, gross / net",
        "ratio gross",
        "ratio net",
        "recursion misses, loop alone",
        "recursion misses/s, loop + loopback connects",
        "TCP outcomes lost",
    )
    rows = [
        [
            str(r.round),
            f"{num(r.floor_ns_per_run.get(RAW), '.1f')} / {num(r.floor_ns_per_run.get(CLASSIC), '.1f')}",
            num(r.memtop_runs_per_iteration, ".2f"),
            f"{num(r.memtop_ns_per_iteration, '.0f')} / {num(r.memtop_net_ns_per_iteration, '.0f')}",
            f"{num(r.minimal_ns_per_iteration, '.0f')} / {num(r.minimal_net_ns_per_iteration, '.1f')}",
            num(ratio(r.memtop_ns_per_iteration, r.minimal_ns_per_iteration), ".2f"),
            num(ratio(r.memtop_net_ns_per_iteration, r.minimal_net_ns_per_iteration), ".2f"),
            num(r.loaded_alone_misses),
            num(r.load_misses / r.load_seconds if r.load_seconds else None),
            num(r.tcp_outcomes_lost),
        ]
        for r in runs
    ]
    return markdown_table(columns, rows)


# -- what the user pays: the statistics off --------------------------------------------------------------

COST_NONE, COST_MINIMAL, COST_KMALLOC, COST_PANELS = (
    "untraced",
    "minimal counter",
    "kmalloc probe",
    "all panels",
)
COST_MODES = (COST_NONE, COST_MINIMAL, COST_KMALLOC, COST_PANELS)


@dataclass
class CostRun:
    mode: str
    round: int
    iterations: int
    elapsed_s: float
    iterations_per_s: float
    cpu_s: float = 0.0  # the loop's own user + system time (steal and waiting for a CPU excluded)
    foreign: list[str] = field(default_factory=list)
    attempt: int = 1

    @property
    def cpu_ns_per_iteration(self) -> float:
        return self.cpu_s * 1e9 / self.iterations


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cost(workload: Workload, seconds: float, round_no: int, mode: str, all_ids: set[int]) -> CostRun:
    """The listxattr loop with the run-time statistics off, untraced or under one set of programs: what
    the loop really loses, including a classic tracepoint's record and the dispatch, which the
    statistics do not see. The probes are read every second and warmed up as in run_panels.

    The loop's CPU time per iteration is the figure: on a shared 2-vCPU VM its wall-clock rate swings by
    ±25 % from run to run (other jobs, the hypervisor), while its CPU time excludes the time it waited
    for a CPU and (CONFIG_PARAVIRT_TIME_ACCOUNTING) the steal time. The BPF programs run in the loop's
    own system calls, so their time and the tracepoints' are in it."""
    sticks: Yardsticks | None = None
    probes: list[Any] = []
    reader = AllReader(probes)
    try:
        if mode == COST_MINIMAL:
            sticks = Yardsticks(with_floor=False)
        elif mode == COST_KMALLOC:
            probes.append(probe_class()(sample_every=1))
        elif mode == COST_PANELS:
            probes += panel_probes()
        for probe in probes:
            probe.start()
        ids = set(attached_programs(os.getpid()))
        all_ids.update(ids)
        foreign = foreign_attachments(WATCHED_TRACEPOINTS)
        if probes:
            reader.start()
        if mode == COST_PANELS:
            run_workload(workload, PANELS_WARMUP_S)  # the leak probe's adaptive 1-in-N settles meanwhile
        for probe in probes:  # and its cache learner's window at start ends: no other during the windows
            if hasattr(probe, "hold_learning"):
                probe.hold_learning = True
                probe.end_learning()
        before = prog_stats(ids)
        cpu_before = children_cpu_s()
        iterations, elapsed = run_workload(workload, seconds)
        cpu_s = children_cpu_s() - cpu_before
        after = prog_stats(ids)
        reader.stop()
        reader.check()
        foreign = sorted(set(foreign + foreign_attachments(WATCHED_TRACEPOINTS)))
        if stat_delta(before, after, ids).run_cnt:
            foreign.append(STATS_ELSEWHERE)
    finally:
        reader.stop()
        for probe in reversed(probes):
            probe.close()
        if sticks is not None:
            sticks.close()
    return CostRun(mode, round_no, iterations, elapsed, iterations / elapsed, cpu_s, foreign)


@dataclass
class CostSummary:
    mode: str
    rounds: int
    iterations_per_s_median: float
    iterations_per_s_min: float
    iterations_per_s_max: float
    cpu_ns_median: float  # the loop's CPU ns per iteration
    cpu_ns_min: float
    cpu_ns_max: float
    added_ns_median: float | None = None  # per round: CPU ns/iteration traced - untraced of the same round
    added_ns_min: float | None = None
    added_ns_max: float | None = None
    added_best_ns: float | None = None  # the quickest run's CPU ns/iteration - the quickest untraced run's


def summarize_cost(runs: list[CostRun]) -> list[CostSummary]:
    untraced = {r.round: r.cpu_ns_per_iteration for r in runs if r.mode == COST_NONE}
    best_untraced = min(untraced.values(), default=None)
    out = []
    for mode in COST_MODES:
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        rates = [r.iterations_per_s for r in mine]
        cpu = [r.cpu_ns_per_iteration for r in mine]
        m = CostSummary(
            mode,
            len(mine),
            statistics.median(rates),
            min(rates),
            max(rates),
            statistics.median(cpu),
            min(cpu),
            max(cpu),
        )
        added = [r.cpu_ns_per_iteration - untraced[r.round] for r in mine if r.round in untraced]
        if mode != COST_NONE and added:
            m.added_ns_median, m.added_ns_min, m.added_ns_max = (
                statistics.median(added),
                min(added),
                max(added),
            )
            m.added_best_ns = m.cpu_ns_min - best_untraced if best_untraced is not None else None
        out.append(m)
    return out


def cost_table(summary: list[CostSummary]) -> str:
    minimal = next((m for m in summary if m.mode == COST_MINIMAL), None)
    columns = (
        "statistics off",
        "rounds",
        "iterations/s (wall clock), median (min–max)",
        "CPU ns/iteration, median (min–max)",
        "added CPU ns/iteration, median (min–max) of the rounds",
        "added CPU ns/iteration, best runs",
        "× minimal counter, median / best",
    )
    rows = [
        [
            m.mode,
            str(m.rounds),
            f"{num(m.iterations_per_s_median)} ({num(m.iterations_per_s_min)}–{num(m.iterations_per_s_max)})",
            f"{num(m.cpu_ns_median, '.1f')} ({num(m.cpu_ns_min, '.1f')}–{num(m.cpu_ns_max, '.1f')})",
            "–"
            if m.added_ns_median is None
            else f"{num(m.added_ns_median, '.1f')} "
            f"({num(m.added_ns_min, '.1f')}–{num(m.added_ns_max, '.1f')})",
            num(m.added_best_ns, ".1f"),
            f"{num(ratio(m.added_ns_median, minimal.added_ns_median), '.2f')} / "
            f"{num(ratio(m.added_best_ns, minimal.added_best_ns), '.2f')}"
            if minimal is not None and m.mode not in (COST_NONE, COST_MINIMAL)
            else "–",
        ]
        for m in summary
    ]
    return markdown_table(columns, rows)


# -- summary ---------------------------------------------------------------------------------------------


@dataclass
class ModeSummary:
    mode: str
    sample: int | None
    runs: int
    iterations_per_s_median: float
    slowdown_pct: float | None = None
    added_ns_per_iteration: float | None = None
    slowdown_pct_with_bpf_stats: float | None = None
    kmalloc_ns_per_event: float | None = None
    minimal_ns_per_event: float | None = None
    floor_ns_per_run: dict[str, float | None] = field(default_factory=dict)  # empty programs, by kind
    kmalloc_net_ns_per_event: float | None = None  # minus the floor of its kind
    minimal_net_ns_per_event: float | None = None  # minus the classic floor
    kmalloc_events_per_s: float | None = None
    irq_ns_per_event: float | None = None
    irq_events_per_s: float | None = None
    workload_kmallocs_per_iteration: float | None = None


def summarize(runs: list[Run], samples: list[int]) -> list[ModeSummary]:
    """Medians of iterations/s; BPF costs pooled over the rounds (total run_time_ns / total run_cnt)."""
    none = [r.iterations_per_s for r in runs if r.mode == NONE]
    none_median = statistics.median(none)
    out = [ModeSummary(NONE, None, len(none), none_median)]
    for sample in samples:
        plain = [r for r in runs if r.mode == PROBE and r.sample == sample]
        stats = [r for r in runs if r.mode == PROBE_STATS and r.sample == sample]
        median = statistics.median(r.iterations_per_s for r in plain)
        median_stats = statistics.median(r.iterations_per_s for r in stats)
        window = sum(r.window_s for r in stats)
        k_ns, k_cnt = sum(r.kmalloc_run_time_ns for r in stats), sum(r.kmalloc_run_cnt for r in stats)
        m_ns, m_cnt = sum(r.minimal_run_time_ns for r in stats), sum(r.minimal_run_cnt for r in stats)
        i_ns, i_cnt = sum(r.irq_run_time_ns for r in stats), sum(r.irq_run_cnt for r in stats)
        floor: dict[str, float | None] = {
            kind: per_run(
                ProgStats(
                    sum(r.floor_run_time_ns.get(kind, 0) for r in stats),
                    sum(r.floor_run_cnt.get(kind, 0) for r in stats),
                    0,
                )
            )
            for kind in (RAW, CLASSIC)
        }
        kmalloc_ns = k_ns / k_cnt if k_ns and k_cnt else None
        minimal_ns = m_ns / m_cnt if m_ns and m_cnt else None
        kind = stats[0].kmalloc_kind if stats else RAW
        has_floor = any(v is not None for v in floor.values())
        iterations = sum(r.iterations for r in plain + stats)
        kmallocs = sum(r.workload_kmallocs for r in plain + stats)
        out.append(
            ModeSummary(
                PROBE,
                sample,
                len(plain),
                median,
                slowdown_pct=(none_median - median) / none_median * 100,
                added_ns_per_iteration=1e9 / median - 1e9 / none_median,
                slowdown_pct_with_bpf_stats=(none_median - median_stats) / none_median * 100,
                kmalloc_ns_per_event=kmalloc_ns,
                minimal_ns_per_event=minimal_ns,
                floor_ns_per_run=floor,
                kmalloc_net_ns_per_event=kmalloc_ns - floor_of(kind, floor)
                if kmalloc_ns is not None and has_floor
                else None,
                minimal_net_ns_per_event=minimal_ns - floor_of(CLASSIC, floor)
                if minimal_ns is not None and has_floor
                else None,
                kmalloc_events_per_s=k_cnt / window if window else None,
                irq_ns_per_event=i_ns / i_cnt if i_ns and i_cnt else None,
                irq_events_per_s=i_cnt / window if window else None,
                workload_kmallocs_per_iteration=kmallocs / iterations if iterations else None,
            )
        )
    return out


TABLE_COLUMNS = (
    "mode",
    "sample 1 in N",
    "iterations/s (median)",
    "slowdown %",
    "added ns/iteration",
    "slowdown % with bpf_stats",
    "floor ns/run, raw / classic",
    "kmalloc prog ns/event, gross / net",
    "minimal counter ns/event, gross / net",
    "kmalloc events/s",
    "irq/softirq progs ns/event",
    "irq/softirq events/s",
)


def table(summary: list[ModeSummary]) -> str:
    rows = [
        [
            "none" if m.mode == NONE else "memtop probe",
            "–" if m.sample is None else str(m.sample),
            num(m.iterations_per_s_median),
            num(m.slowdown_pct, ".1f"),
            num(m.added_ns_per_iteration, ".1f"),
            num(m.slowdown_pct_with_bpf_stats, ".1f"),
            "–"
            if m.mode == NONE
            else f"{num(m.floor_ns_per_run.get(RAW), '.1f')} / {num(m.floor_ns_per_run.get(CLASSIC), '.1f')}",
            f"{num(m.kmalloc_ns_per_event, '.1f')} / {num(m.kmalloc_net_ns_per_event, '.1f')}",
            f"{num(m.minimal_ns_per_event, '.1f')} / {num(m.minimal_net_ns_per_event, '.1f')}",
            num(m.kmalloc_events_per_s),
            num(m.irq_ns_per_event, ".1f"),
            num(m.irq_events_per_s),
        ]
        for m in summary
    ]
    return markdown_table(TABLE_COLUMNS, rows)


def spread(values: list[float], fmt: str) -> str:
    """median (min–max), or the one value."""
    if not values:
        return "–"
    if len(values) == 1:
        return num(values[0], fmt)
    return f"{num(statistics.median(values), fmt)} ({num(min(values), fmt)}–{num(max(values), fmt)})"


def goal_table(panels: list[PanelsRun], summary: list[ModeSummary], cost: list[CostSummary]) -> str:
    """Issue #11's two cost goals, gross and net of the measurement floor, and with the statistics off."""
    alone = next((m for m in summary if m.mode == PROBE and m.sample == 1), None)
    added = {m.mode: m.added_ns_median for m in cost}
    best = {m.mode: m.added_best_ns for m in cost}
    rows = [
        [
            "empty program (measurement floor), ns/run: raw / classic",
            spread([v for r in panels if (v := r.floor_ns_per_run.get(RAW)) is not None], ".1f")
            + " / "
            + spread([v for r in panels if (v := r.floor_ns_per_run.get(CLASSIC)) is not None], ".1f"),
            "–",
        ],
        [
            "memtop program runs per iteration",
            spread([r.memtop_runs_per_iteration for r in panels], ".2f"),
            "–",
        ],
        [
            "all panels, BPF ns/iteration",
            spread([r.memtop_ns_per_iteration for r in panels], ".0f"),
            spread([r.memtop_net_ns_per_iteration for r in panels], ".0f"),
        ],
        [
            "minimal counter, BPF ns/iteration",
            spread([r.minimal_ns_per_iteration for r in panels], ".0f"),
            spread([r.minimal_net_ns_per_iteration for r in panels], ".1f"),
        ],
        [
            "ratio (goal ≤ 2)",
            spread(
                [v for r in panels if (v := ratio(r.memtop_ns_per_iteration, r.minimal_ns_per_iteration))],
                ".2f",
            ),
            spread(
                [
                    v
                    for r in panels
                    if (v := ratio(r.memtop_net_ns_per_iteration, r.minimal_net_ns_per_iteration))
                ],
                ".2f",
            ),
        ],
    ]
    if alone is not None:
        rows += [
            [
                "kmalloc probe alone, kmalloc program ns/event",
                num(alone.kmalloc_ns_per_event, ".1f"),
                num(alone.kmalloc_net_ns_per_event, ".1f"),
            ],
            [
                "minimal counter beside it, ns/event",
                num(alone.minimal_ns_per_event, ".1f"),
                num(alone.minimal_net_ns_per_event, ".1f"),
            ],
            [
                "ratio (goal ≤ 1)",
                num(ratio(alone.kmalloc_ns_per_event, alone.minimal_ns_per_event), ".2f"),
                num(ratio(alone.kmalloc_net_ns_per_event, alone.minimal_net_ns_per_event), ".2f"),
            ],
        ]
    if added.get(COST_MINIMAL):
        rows += [
            [
                f"statistics off, added CPU ns/iteration: {mode} / minimal counter (median; best runs)",
                f"{num(added.get(mode), '.1f')} / {num(added[COST_MINIMAL], '.1f')} = "
                + num(ratio(added.get(mode), added[COST_MINIMAL]), ".2f")
                + f"; {num(best.get(mode), '.1f')} / {num(best.get(COST_MINIMAL), '.1f')} = "
                + num(ratio(best.get(mode), best.get(COST_MINIMAL)), ".2f"),
                "–",
            ]
            for mode in (COST_KMALLOC, COST_PANELS)
        ]
    return markdown_table(("figure, median (min–max) over rounds", "gross", "net of the floor"), rows)


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kmalloc_bench.py",
        description="Measure what memtop's kmalloc probe costs a listxattr loop (one kmalloc per call). "
        "Needs root.",
    )
    add_common_args(parser)
    parser.add_argument(
        "--panels",
        action="store_true",
        help="also run every panel's probes beside a minimal kmem:kmalloc counter and empty programs (the "
        "statistics' own floor): BPF ns per iteration of both, gross and net of the floor, recursion misses "
        "under a loopback connect load, and (--cost-rounds) the loop's added ns with the statistics off",
    )
    parser.add_argument(
        "--cost-rounds",
        type=int_in(0, 1000),
        default=10,
        metavar="N",
        help="with --panels: rounds of the loop with the statistics off, untraced, under the minimal "
        "counter, the kmalloc probe alone and every panel, in rotating order (default 10; 0 skips them)",
    )
    parser.add_argument(
        "--sample",
        type=int_in(1, MAX_SAMPLE_EVERY),
        action="append",
        metavar="N",
        help="measure the probe counting 1 in N kmallocs; repeat for several (default: just 1, every call)",
    )
    return parser.parse_args(argv)


def bench(args: argparse.Namespace) -> int:
    samples = sorted(set(args.sample or [1]))
    info = machine()
    runs: list[Run] = []
    panels: list[PanelsRun] = []
    cost_runs: list[CostRun] = []
    connect_loop: Path | None = None
    all_ids: set[int] = set()
    load_before = load_average()
    probe_class()  # fail early, before building anything
    try:
        with tempfile.TemporaryDirectory(prefix="memtop-bench-") as tmp:
            workload = build_workload(Path(tmp))
            log(f"workload built; {args.rounds} round(s) of {args.seconds:g} s per mode, samples {samples}")
            for round_no in range(1, args.rounds + 1):
                for sample in samples:
                    for mode in (NONE, PROBE, PROBE_STATS):

                        def once(mode: str = mode, sample: int = sample, round_no: int = round_no) -> Run:
                            with maybe_stats(mode == PROBE_STATS):
                                if mode == NONE:
                                    return run_none(workload, args.seconds, round_no)
                                return run_probe(
                                    workload, args.seconds, round_no, sample, mode == PROBE_STATS, all_ids
                                )

                        runs.append(retry_while_foreign(once, args.attempts, _progress))
                if args.panels:
                    connect_loop = connect_loop or compile_c(Path(tmp), "connect_loop", CONNECT_LOOP_C)

                    def panels_once(round_no: int = round_no, loop: Path = connect_loop) -> PanelsRun:
                        return run_panels(workload, loop, args.seconds, round_no, all_ids)

                    panels.append(retry_while_foreign(panels_once, args.attempts, _panels_progress))
            for round_no in range(1, (args.cost_rounds if args.panels else 0) + 1):
                shift = (round_no - 1) % len(COST_MODES)  # each mode takes each place in the order
                for mode in COST_MODES[shift:] + COST_MODES[:shift]:

                    def cost_once(mode: str = mode, round_no: int = round_no) -> CostRun:
                        return run_cost(workload, args.seconds, round_no, mode, all_ids)

                    cost_runs.append(retry_while_foreign(cost_once, args.attempts, _cost_progress))
    except BaseException:
        check_unloaded(all_ids, failed=True)  # best effort: say so if a failure left programs behind
        raise
    check_unloaded(all_ids)

    summary = summarize(runs, samples)
    cost = summarize_cost(cost_runs)
    skewed: list[Run | CostRun] = [r for r in runs if r.foreign] + [r for r in cost_runs if r.foreign]
    print(table(summary))
    print()
    if panels:
        print(panels_table(panels))
        print()
    if cost:
        print(cost_table(cost))
        print()
    if panels:
        print(goal_table(panels, summary, cost))
        print()
    print(machine_line(info))
    print()
    for m in summary:
        if m.mode == PROBE and m.workload_kmallocs_per_iteration is not None:
            print(
                f"Sanity (sample 1 in {m.sample}): the probe counted {m.workload_kmallocs_per_iteration:.3f} "
                "kmallocs per workload iteration (expect about 1)."
            )
    print(f"1-minute load average before the runs: {load_before}.")
    print(f"bpftool: none of the probe's {len(all_ids)} program IDs ({_id_ranges(all_ids)}) remain loaded.")
    if skewed:
        reasons = foreign_reasons(f for r in skewed for f in r.foreign)
        print(
            f"WARNING: {len(skewed)} of {len(runs) + len(cost_runs)} runs had other tracers on the measured "
            f"tracepoints even after {args.attempts} attempt(s) ({'; '.join(reasons)}): their numbers are "
            "skewed."
        )

    if args.json:
        doc = {
            "schema": "memtop.bench.kmalloc/1",
            "machine": info,
            "config": {
                "seconds": args.seconds,
                "rounds": args.rounds,
                "samples": samples,
                "attempts": args.attempts,
                "cost_rounds": args.cost_rounds if args.panels else 0,
            },
            "summary": [asdict(m) for m in summary],
            "runs": [asdict(r) for r in runs],
            "panels": [asdict(r) for r in panels],
            "cost_summary": [asdict(m) for m in cost],
            "cost_runs": [asdict(r) for r in cost_runs],
            "runs_with_other_tracers": len(skewed),
            "load_average_before": load_before,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _progress(run: Run) -> str:
    label = run.mode if run.sample is None else f"{run.mode} 1 in {run.sample}"
    text = f"round {run.round}: {label:<25} {run.iterations_per_s:>12,.0f} iterations/s"
    if run.mode == PROBE_STATS and run.kmalloc_run_cnt:
        text += f", kmalloc prog {run.kmalloc_run_time_ns / run.kmalloc_run_cnt:.1f} ns/event"
    if run.mode != NONE:
        text += f", {run.reads} reads, probe counted {run.workload_kmallocs / run.iterations:.3f}/iteration"
    return text


def _panels_progress(run: PanelsRun) -> str:
    floor = ", ".join(f"{k} {v:.1f}" for k, v in run.floor_ns_per_run.items() if v is not None)
    return (
        f"round {run.round}: all panels {run.memtop_ns_per_iteration:.0f} ns/iteration "
        f"(net {run.memtop_net_ns_per_iteration:.0f}, {run.memtop_runs_per_iteration:.2f} runs) vs minimal "
        f"counter {run.minimal_ns_per_iteration:.0f} (net {run.minimal_net_ns_per_iteration:.1f}); floor "
        f"ns/run {floor}; recursion misses {run.loaded_alone_misses} alone, "
        f"{run.load_misses} under loopback load {run.load_misses_by_program}; ns/iteration by program "
        f"{run.ns_per_iteration_by_program}"
    )


def _cost_progress(run: CostRun) -> str:
    return (
        f"cost round {run.round}: {run.mode:<16} {run.iterations_per_s:>12,.0f} iterations/s, "
        f"{run.cpu_ns_per_iteration:.1f} CPU ns/iteration (statistics off)"
    )


def _id_ranges(ids: set[int]) -> str:
    if not ids:
        return "none"
    return f"{min(ids)}..{max(ids)}" if len(ids) > 1 else str(min(ids))


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("kmalloc_bench.py", parse_args, bench, argv)


if __name__ == "__main__":
    sys.exit(main())
