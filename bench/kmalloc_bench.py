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
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402  (the sibling module, found through the path set just above)
    STATS_ELSEWHERE,
    BenchError,
    PeriodicReader,
    RunTimeStats,
    Workload,
    add_common_args,
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
    # With the statistics on, the yardstick runs beside the probe: the least a kmalloc program can cost.
    minimal = (
        import_memtop("probes.base", "import_bcc")().BPF(text=MINIMAL_COUNTER_C.encode())
        if with_stats
        else None
    )
    try:
        minimal_ids = set(prog_ids_of(os.getpid()).get("kmalloc", []))
        probe.start()
        ids = {
            tp: min(set(progs) - minimal_ids)
            for tp, progs in prog_ids_of(os.getpid()).items()
            if set(progs) - minimal_ids
        }
        if "kmalloc" not in ids:
            raise BenchError(f"no BPF program of the probe is attached to kmalloc (bpftool saw {ids})")
        all_ids.update(ids.values())
        kmalloc_id = ids["kmalloc"]
        irq_ids = {i for name, i in ids.items() if name in IRQ_TRACEPOINTS}
        foreign = foreign_attachments(WATCHED_TRACEPOINTS)
        reader.start()
        before = prog_stats(set(ids.values()) | minimal_ids)
        t0 = time.monotonic()
        proc = start_workload(workload, seconds)
        iterations, elapsed = finish_workload(proc, seconds)
        window = time.monotonic() - t0
        after = prog_stats(set(ids.values()) | minimal_ids)
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
        if minimal is not None:
            minimal.cleanup()

    k = stat_delta(before, after, {kmalloc_id})
    yardstick = stat_delta(before, after, minimal_ids)
    irq = stat_delta(before, after, irq_ids)
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
        reads=reader.reads,
        prog_ids=ids,
        foreign=foreign,
    )


# -- every panel on, beside a minimal counter -----------------------------------------------------------

# The yardstick: the least a BPF program on kmem:kmalloc can do (a classic tracepoint, one per-CPU add).
MINIMAL_COUNTER_C = r"""
BPF_PERCPU_ARRAY(hits, u64, 1);
TRACEPOINT_PROBE(kmem, kmalloc) {
    int zero = 0;
    u64 *c = hits.lookup(&zero);
    if (c)
        (*c)++;
    return 0;
}
"""


PANELS_WARMUP_S = 4.0


def panel_probes() -> list[Any]:
    """memtop's live-mode probes as LiveSource builds them: kmalloc (with the kernel leak tracking
    compiled in where the probe supports it), oom, tcp, kernel leaks (adaptive sampling)."""
    kmalloc_probe = probe_class()
    leaks = import_memtop("probes.leaks", "KernelLeakProbe")()
    try:
        kmalloc = kmalloc_probe(leaks=leaks)
    except TypeError:  # a memtop from before the shared object: each probe loads its own
        kmalloc = kmalloc_probe()
    return [
        kmalloc,
        import_memtop("probes.oom", "OomProbe")(),
        import_memtop("probes.tcp", "TcpProbe")(),
        leaks,
    ]


class AllReader(PeriodicReader):
    """Reads every probe once a second, as the app's tick does."""

    def __init__(self, probes: list[Any]) -> None:
        self.probes = probes
        super().__init__(self)

    def read(self) -> None:
        for probe in self.probes:
            if probe.running:
                probe.read()


@dataclass
class PanelsRun:
    round: int
    iterations: int  # of the listxattr loop run alone
    elapsed_s: float
    memtop_ns_per_iteration: float  # all memtop programs' run time / loop iterations
    minimal_ns_per_iteration: float  # the minimal counter's, same window
    memtop_programs: int
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
    bcc = import_memtop("probes.base", "import_bcc")()
    minimal = bcc.BPF(text=MINIMAL_COUNTER_C.encode())
    probes = panel_probes()
    reader = AllReader(probes)
    try:
        minimal_ids = set(prog_ids_of(os.getpid()).get("kmalloc", []))
        for probe in probes:
            probe.start()
        by_tp = prog_ids_of(os.getpid())
        ids = {i for progs in by_tp.values() for i in progs} - minimal_ids
        names = {i: tp for tp, progs in by_tp.items() for i in progs}
        all_ids.update(ids | minimal_ids)
        foreign = foreign_attachments(WATCHED_TRACEPOINTS)
        reader.start()
        run_workload(workload, PANELS_WARMUP_S)  # the leak probe's adaptive 1-in-N settles meanwhile
        with RunTimeStats():
            before = prog_stats(ids | minimal_ids)
            iterations, elapsed = run_workload(workload, seconds)
            after = prog_stats(ids | minimal_ids)
        ours, yardstick = stat_delta(before, after, ids), stat_delta(before, after, minimal_ids)
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
        minimal.cleanup()
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
        ours.recursion_misses,
        load_seconds,
        sum(by_program.values()),
        {k: v for k, v in sorted(by_program.items()) if v},
        {k: round(v, 1) for k, v in sorted(cost.items(), key=lambda kv: -kv[1]) if v >= 0.5},
        tcp_lost,
        foreign,
    )


def panels_table(runs: list[PanelsRun]) -> str:
    columns = (
        "round",
        "memtop BPF ns/iteration (all panels)",
        "minimal counter ns/iteration",
        "ratio",
        "recursion misses, loop alone",
        "recursion misses/s, loop + loopback connects",
        "TCP outcomes lost",
    )
    rows = [
        [
            str(r.round),
            num(r.memtop_ns_per_iteration, ".0f"),
            num(r.minimal_ns_per_iteration, ".0f"),
            num(
                r.memtop_ns_per_iteration / r.minimal_ns_per_iteration
                if r.minimal_ns_per_iteration
                else None,
                ".2f",
            ),
            num(r.loaded_alone_misses),
            num(r.load_misses / r.load_seconds if r.load_seconds else None),
            num(r.tcp_outcomes_lost),
        ]
        for r in runs
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
                kmalloc_ns_per_event=k_ns / k_cnt if k_ns and k_cnt else None,
                minimal_ns_per_event=m_ns / m_cnt if m_ns and m_cnt else None,
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
    "kmalloc prog ns/event",
    "minimal counter ns/event",
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
            num(m.kmalloc_ns_per_event, ".1f"),
            num(m.minimal_ns_per_event, ".1f"),
            num(m.kmalloc_events_per_s),
            num(m.irq_ns_per_event, ".1f"),
            num(m.irq_events_per_s),
        ]
        for m in summary
    ]
    return markdown_table(TABLE_COLUMNS, rows)


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
        help="also run every panel's probes beside a minimal kmem:kmalloc counter: BPF ns per iteration "
        "of both, and recursion misses under a loopback connect load",
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
    except BaseException:
        check_unloaded(all_ids, failed=True)  # best effort: say so if a failure left programs behind
        raise
    check_unloaded(all_ids)

    summary = summarize(runs, samples)
    skewed = [r for r in runs if r.foreign]
    print(table(summary))
    print()
    if panels:
        print(panels_table(panels))
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
            f"WARNING: {len(skewed)} of {len(runs)} runs had other tracers on the measured tracepoints "
            f"even after {args.attempts} attempt(s) ({'; '.join(reasons)}): their numbers are skewed."
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
            },
            "summary": [asdict(m) for m in summary],
            "runs": [asdict(r) for r in runs],
            "panels": [asdict(r) for r in panels],
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
    return (
        f"round {run.round}: all panels {run.memtop_ns_per_iteration:.0f} ns/iteration vs minimal counter "
        f"{run.minimal_ns_per_iteration:.0f}; recursion misses {run.loaded_alone_misses} alone, "
        f"{run.load_misses} under loopback load {run.load_misses_by_program}; ns/iteration by program "
        f"{run.ns_per_iteration_by_program}"
    )


def _id_ranges(ids: set[int]) -> str:
    if not ids:
        return "none"
    return f"{min(ids)}..{max(ids)}" if len(ids) > 1 else str(min(ids))


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("kmalloc_bench.py", parse_args, bench, argv)


if __name__ == "__main__":
    sys.exit(main())
