#!/usr/bin/env python3
"""What memtop's leak probes cost, side by side with bcc's memleak on the same workloads.

Kernel mode: the listxattr loop of kmalloc_bench.py (one kmalloc and one kfree per call, millions a second)
runs untraced, under memtop's KernelLeakProbe (adaptive 1-in-N, and N fixed at 1), and under bcc's
memleak-bpfcc in kernel mode (tracepoints, every allocation). User mode: a C loop of malloc + free runs
untraced, under memtop's UserLeakProbe and under memleak-bpfcc -p PID. Each traced mode runs once plain
(for the slowdown) and once with the kernel's BPF run-time statistics on (for the programs' ns per event).
Rounds alternate the modes; the tables report medians.

Needs root, gcc, bpftool, and for the comparison /usr/sbin/memleak-bpfcc (apt install bpfcc-tools).
Usage: sudo .venv/bin/python bench/leaks_bench.py [--seconds S] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (the listxattr workload, bpftool helpers, BPF run-time stats)

MEMLEAK = Path("/usr/sbin/memleak-bpfcc")
ATTACH_TIMEOUT_S = 60.0
KERNEL_TRACEPOINTS = ("kmalloc", "kfree", "kmem_cache_alloc", "kmem_cache_free")
ALLOC_TRACEPOINT, FREE_TRACEPOINT = "kmalloc", "kfree"  # what the listxattr loop hits

MALLOC_LOOP_C = r"""
/* memtop bench workload: malloc + free in a tight loop for a fixed wall time, once told to start.
 * Prints "ready", waits for a line on stdin, then prints "<iterations> <elapsed seconds>". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile uintptr_t sink;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SECONDS\n", argv[0]);
        return 2;
    }
    double seconds = strtod(argv[1], NULL);
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    unsigned long long iterations = 0;
    double start = now(), end = start + seconds, t;
    for (;;) {
        for (int i = 0; i < 1024; i++) {
            void *p = malloc(16 + (i & 255));
            sink ^= (uintptr_t)p;  /* the pointer escapes: the pair is not optimized away */
            free(p);
        }
        iterations += 1024;
        t = now();
        if (t >= end)
            break;
    }
    printf("%llu %.9f\n", iterations, t - start);
    return 0;
}
"""

NONE = "none"
MEMTOP_ADAPTIVE = "memtop (adaptive N)"
MEMTOP_N1 = "memtop (N=1)"
MEMTOP_USER = "memtop"
MEMLEAK_MODE = "bcc memleak"
MEMLEAK_SAMPLED = (
    "bcc memleak -s"  # + N: memleak's own 1-in-N (a timestamp modulo), for an equal-N comparison
)


BenchError = h.BenchError
log = h.log


# -- tracers ---------------------------------------------------------------------------------------------


class MemtopTracer:
    """memtop's probe in this process, read every second from a thread (as the app's collector does); it
    times each read() (the probe's user-space cost)."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.pid = os.getpid()
        self.reader = h.PeriodicReader(probe)

    def start(self) -> None:
        self.probe.start()
        self.reader.start()

    def cpu_seconds(self) -> float:
        return sum(self.reader.read_seconds)

    def stop(self) -> None:
        self.reader.stop()
        self.probe.close()
        self.reader.check()


class MemleakTracer:
    """bcc's memleak-bpfcc in a child process, printing its report every second (its default report)."""

    def __init__(self, args: list[str], expect: str) -> None:
        self.args = args
        self.expect = expect  # a tracepoint name, or "uprobe"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._cpu_start = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(MEMLEAK), *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise BenchError(f"memleak exited with {self.proc.returncode}: {h.last_line(err)}")
            if self._attached():
                time.sleep(0.5)  # let it finish attaching the rest
                self._cpu_start = process_cpu_seconds(self.pid)
                return
            time.sleep(0.2)
        raise BenchError("memleak did not attach within a minute")

    def _attached(self) -> bool:
        for a in bpftool_perf_list():
            if a.get("pid") != self.pid:
                continue
            if self.expect == "uprobe" and a.get("fd_type") == "uretprobe":
                return True
            if a.get("fd_type") == "tracepoint" and a.get("tracepoint") == self.expect:
                return True
        return False

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid) - self._cpu_start

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # memleak exits on KeyboardInterrupt
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bpftool_perf_list() -> list[dict[str, Any]]:
    return h.perf_attachments()


def prog_names(ids: set[int]) -> dict[int, str]:
    return {
        int(p["id"]): str(p.get("name", "")) for p in h.bpftool_json("prog", "show") or [] if p["id"] in ids
    }


def kernel_prog_ids(pid: int) -> dict[str, int]:
    """The tracer's programs on the kmem tracepoints, by tracepoint name."""
    ids = {name: progs[0] for name, progs in h.prog_ids_of(pid).items()}
    missing = [tp for tp in (ALLOC_TRACEPOINT, FREE_TRACEPOINT) if tp not in ids]
    if missing:
        raise BenchError(f"pid {pid} has no program on kmem:{', kmem:'.join(missing)} (saw {sorted(ids)})")
    return ids


def user_prog_ids(pid: int) -> dict[str, set[int]]:
    """The tracer's uprobe programs grouped as "alloc" (malloc entry and return) and "free" (free entry)."""
    ids = {
        int(a["prog_id"])
        for a in bpftool_perf_list()
        if a.get("pid") == pid and "uprobe" in a.get("fd_type", "")
    }
    groups: dict[str, set[int]] = {"alloc": set(), "free": set()}
    for prog_id, name in prog_names(ids).items():
        if name in ("malloc_enter", "malloc_exit", "alloc_return"):
            groups["alloc"].add(prog_id)
        elif name == "free_enter":
            groups["free"].add(prog_id)
    if not groups["alloc"] or not groups["free"]:
        raise BenchError(f"pid {pid}: no malloc/free uprobe programs found (saw {prog_names(ids)})")
    return groups


def foreign_tracers(own: set[int], tracepoints: tuple[str, ...] = KERNEL_TRACEPOINTS) -> list[str]:
    """Other processes' programs on the kmem tracepoints: they would skew every mode."""
    return h.foreign_attachments(tracepoints, own)


# -- runs ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    bench: str  # "kernel" or "user"
    mode: str
    stats: bool  # BPF run-time statistics on
    round: int
    iterations: int
    elapsed_s: float
    iterations_per_s: float
    alloc_run_time_ns: int = 0
    alloc_run_cnt: int = 0
    free_run_time_ns: int = 0
    free_run_cnt: int = 0
    tracer_cpu_s: float = 0.0
    window_s: float = 0.0
    sample_rate: int | None = None  # memtop's effective N at the end of the run
    foreign: list[str] = field(default_factory=list)


def stat_delta(
    before: dict[int, h.ProgStats], after: dict[int, h.ProgStats], ids: set[int]
) -> tuple[int, int]:
    d = h.stat_delta(before, after, ids)
    return d.run_time_ns, d.run_cnt


def make_kernel_tracer(mode: str) -> Any:
    if mode == MEMLEAK_MODE:
        return MemleakTracer(["1"], expect=ALLOC_TRACEPOINT)
    if mode.startswith(MEMLEAK_SAMPLED):
        return MemleakTracer(["-s", mode.rsplit(" ", 1)[1], "1"], expect=ALLOC_TRACEPOINT)
    from memtop.probes.leaks import KernelLeakProbe

    return MemtopTracer(KernelLeakProbe(sample_every=1 if mode == MEMTOP_N1 else None))


def kernel_run(
    workload: h.Workload, mode: str, stats: bool, seconds: float, round_no: int, warmup_s: float
) -> Run:
    """One run of the listxattr loop. A traced mode first runs the loop for `warmup_s` unmeasured, so that
    the adaptive sample rate has settled (it is re-chosen at every read, once a second): the figures are
    the steady state of an always-on probe."""
    if mode == NONE:
        foreign = foreign_tracers(set())
        iterations, elapsed = h.run_workload(workload, seconds)
        return Run(
            "kernel", mode, False, round_no, iterations, elapsed, iterations / elapsed, foreign=foreign
        )
    tracer = make_kernel_tracer(mode)
    with h.maybe_stats(stats):
        try:
            tracer.start()
            ids = kernel_prog_ids(tracer.pid)
            foreign = foreign_tracers({tracer.pid})
            if warmup_s:
                h.run_workload(workload, warmup_s)
            alloc_ids, free_ids = {ids[ALLOC_TRACEPOINT]}, {ids[FREE_TRACEPOINT]}
            before = h.prog_stats(alloc_ids | free_ids)
            cpu_before, t0 = tracer.cpu_seconds(), time.monotonic()
            iterations, elapsed = h.run_workload(workload, seconds)
            window = time.monotonic() - t0
            after = h.prog_stats(alloc_ids | free_ids)
            cpu = tracer.cpu_seconds() - cpu_before
            rate = getattr(getattr(tracer, "probe", None), "effective_sample_rate", None)
        finally:
            tracer.stop()
    a_ns, a_cnt = stat_delta(before, after, alloc_ids)
    f_ns, f_cnt = stat_delta(before, after, free_ids)
    if not stats and (a_cnt or f_cnt):
        foreign.append(h.STATS_ELSEWHERE)
    return Run(
        "kernel", mode, stats, round_no, iterations, elapsed, iterations / elapsed,
        a_ns, a_cnt, f_ns, f_cnt, cpu, window, rate, foreign,
    )  # fmt: skip


def build_malloc_loop(workdir: Path) -> Path:
    return h.compile_c(workdir, "malloc_loop", MALLOC_LOOP_C)


def user_run(binary: Path, mode: str, stats: bool, seconds: float, round_no: int) -> Run:
    child = h.start_process([str(binary), repr(seconds)], stdin=True)
    tracer: Any = None
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != "ready":
            raise BenchError("the malloc loop did not start")
        if mode == MEMLEAK_MODE:
            tracer = MemleakTracer(["-p", str(child.pid), "1"], expect="uprobe")
        elif mode == MEMTOP_USER:
            from memtop.probes.leaks import UserLeakProbe

            tracer = MemtopTracer(UserLeakProbe(child.pid))
        with h.maybe_stats(stats):
            groups: dict[str, set[int]] = {"alloc": set(), "free": set()}
            if tracer is not None:
                tracer.start()
                groups = user_prog_ids(tracer.pid)
            ids = groups["alloc"] | groups["free"]
            before = h.prog_stats(ids) if ids else {}
            cpu_before, t0 = (tracer.cpu_seconds() if tracer else 0.0), time.monotonic()
            child.stdin.write("go\n")
            child.stdin.flush()
            iterations, elapsed = h.finish_workload(child, seconds)
            window = time.monotonic() - t0
            after = h.prog_stats(ids) if ids else {}
            cpu = (tracer.cpu_seconds() - cpu_before) if tracer else 0.0
    finally:
        if tracer is not None:
            tracer.stop()
        if child.poll() is None:
            child.kill()
            child.wait()
    a_ns, a_cnt = stat_delta(before, after, groups["alloc"]) if ids else (0, 0)
    f_ns, f_cnt = stat_delta(before, after, groups["free"]) if ids else (0, 0)
    foreign = [h.STATS_ELSEWHERE] if not stats and (a_cnt or f_cnt) else []
    return Run(
        "user", mode, stats, round_no, iterations, elapsed, iterations / elapsed,
        a_ns, a_cnt, f_ns, f_cnt, cpu, window, 1 if mode == MEMTOP_USER else None, foreign,
    )  # fmt: skip


# -- summary ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    bench: str
    mode: str
    runs: int
    iterations_per_s_median: float
    slowdown_pct: float | None = None
    added_ns_per_iteration: float | None = None
    alloc_prog_ns_per_event: float | None = None  # pooled over the bpf_stats runs
    free_prog_ns_per_event: float | None = None
    alloc_events_per_iteration: float | None = None
    tracer_cpu_pct: float | None = None  # the tracer's user-space CPU (memtop: read() time) per wall second
    sample_rate: str = ""


def _clean(runs: list[Run]) -> list[Run]:
    """The runs no other tracing skewed, when there are any."""
    return [r for r in runs if not r.foreign] or runs


def summarize(runs: list[Run], bench: str, modes: list[str]) -> list[Summary]:
    """Medians of iterations/s and BPF costs pooled over the runs, leaving out the runs that other tracing
    skewed whenever clean runs of the same mode exist."""
    none = _clean([r for r in runs if r.bench == bench and r.mode == NONE])
    base = statistics.median(r.iterations_per_s for r in none)
    out = [Summary(bench, NONE, len(none), base)]
    for mode in modes:
        plain = _clean([r for r in runs if r.bench == bench and r.mode == mode and not r.stats])
        with_stats = _clean([r for r in runs if r.bench == bench and r.mode == mode and r.stats])
        if not plain:
            continue
        median = statistics.median(r.iterations_per_s for r in plain)
        a_ns, a_cnt = sum(r.alloc_run_time_ns for r in with_stats), sum(r.alloc_run_cnt for r in with_stats)
        f_ns, f_cnt = sum(r.free_run_time_ns for r in with_stats), sum(r.free_run_cnt for r in with_stats)
        iterations = sum(r.iterations for r in with_stats)
        window = sum(r.window_s for r in plain)
        rates = sorted({r.sample_rate for r in plain + with_stats if r.sample_rate is not None})
        out.append(
            Summary(
                bench,
                mode,
                len(plain),
                median,
                slowdown_pct=(base - median) / base * 100,
                added_ns_per_iteration=1e9 / median - 1e9 / base,
                alloc_prog_ns_per_event=a_ns / a_cnt if a_cnt else None,
                free_prog_ns_per_event=f_ns / f_cnt if f_cnt else None,
                alloc_events_per_iteration=a_cnt / iterations if iterations else None,
                tracer_cpu_pct=100 * sum(r.tracer_cpu_s for r in plain) / window if window else None,
                sample_rate=", ".join(str(r) for r in rates),
            )
        )
    return out


COLUMNS = (
    "tracer",
    "runs",
    "1 in N",
    "iterations/s (median)",
    "slowdown %",
    "added ns/iteration",
    "alloc prog ns/event",
    "free prog ns/event",
    "tracer user-space CPU %",
)


def markdown_table(summary: list[Summary]) -> str:
    rows = [
        [
            s.mode,
            str(s.runs),
            s.sample_rate or _memleak_rate(s.mode),
            h.num(s.iterations_per_s_median),
            h.num(s.slowdown_pct, ".1f"),
            h.num(s.added_ns_per_iteration, ".0f"),
            h.num(s.alloc_prog_ns_per_event, ".0f"),
            h.num(s.free_prog_ns_per_event, ".0f"),
            h.num(s.tracer_cpu_pct, ".1f"),
        ]
        for s in summary
    ]
    return h.markdown_table(COLUMNS, rows).replace("|---|---:|---:|", "|---|---:|---|", 1)


def _memleak_rate(mode: str) -> str:
    if mode == MEMLEAK_MODE:
        return "1"
    if mode.startswith(MEMLEAK_SAMPLED):
        return mode.rsplit(" ", 1)[1] + " (ts % N)"
    return "–"


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="leaks_bench.py",
        description="Measure memtop's leak probes against bcc's memleak (kernel and user mode). Needs root.",
    )
    parser.add_argument(
        "--seconds", type=h.positive_float, default=3.0, help="length of each run (default 3)"
    )
    parser.add_argument("--rounds", type=h.int_in(1, 100), default=3, help="rounds of every mode (default 3)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.5,
        metavar="S",
        help="kernel mode: seconds the loop runs traced before each measured run, for the adaptive N to "
        "settle (default 2.5; 0 to measure from attach)",
    )
    parser.add_argument(
        "--attempts",
        type=h.int_in(1, 10),
        default=3,
        help="tries per run while other tracing is seen on the kmem tracepoints (default 3)",
    )
    parser.add_argument("--only", choices=("kernel", "user"), help="run one of the two benchmarks")
    parser.add_argument(
        "--memleak-sample",
        type=h.int_in(2, 1 << 20),
        default=1024,
        metavar="N",
        help="kernel mode: also run memleak -s N, at about the N memtop settles on (default 1024)",
    )
    parser.add_argument("--no-memleak", action="store_true", help="skip bcc's memleak")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the summary here")
    return parser.parse_args(argv)


def progress(run: Run) -> str:
    label = f"{run.bench} {run.mode}{' +bpf_stats' if run.stats else ''}"
    text = f"round {run.round}: {label:<42} {run.iterations_per_s:>14,.0f} it/s"
    if run.alloc_run_cnt:
        text += f", alloc prog {run.alloc_run_time_ns / run.alloc_run_cnt:.0f} ns/event"
    if run.free_run_cnt:
        text += f", free prog {run.free_run_time_ns / run.free_run_cnt:.0f} ns/event"
    if run.sample_rate is not None:
        text += f", N={run.sample_rate}"
    if run.foreign:
        text += f" (other tracers: {'; '.join(run.foreign)})"
    return text


def bench(args: argparse.Namespace) -> int:
    memleak = not args.no_memleak
    if memleak and not MEMLEAK.exists():
        raise BenchError(f"{MEMLEAK} not found (apt install bpfcc-tools), or pass --no-memleak")
    kernel_modes = [MEMTOP_ADAPTIVE, MEMTOP_N1]
    if memleak:
        kernel_modes += [MEMLEAK_MODE, f"{MEMLEAK_SAMPLED} {args.memleak_sample}"]
    user_modes = [MEMTOP_USER] + ([MEMLEAK_MODE] if memleak else [])
    benches = [args.only] if args.only else ["kernel", "user"]
    load_before = h.load_average()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="memtop-leaks-bench-") as tmp:
        workload = h.build_workload(Path(tmp))
        malloc_loop = build_malloc_loop(Path(tmp))
        for round_no in range(1, args.rounds + 1):
            for which in benches:
                for mode in [NONE, *(kernel_modes if which == "kernel" else user_modes)]:
                    for stats in (False, True) if mode != NONE else (False,):

                        def once(
                            which: str = which, mode: str = mode, stats: bool = stats, n: int = round_no
                        ) -> Run:
                            if which == "kernel":
                                return kernel_run(workload, mode, stats, args.seconds, n, args.warmup)
                            return user_run(malloc_loop, mode, stats, args.seconds, n)

                        runs.append(h.retry_while_foreign(once, args.attempts, progress))
    load_after = h.load_average()

    summaries: list[Summary] = []
    info = h.machine()
    if "kernel" in benches:
        summary = summarize(runs, "kernel", kernel_modes)
        summaries += summary
        print("Kernel mode: listxattr loop (one kmalloc + one kfree per iteration)\n")
        print(markdown_table(summary))
        print()
    if "user" in benches:
        summary = summarize(runs, "user", user_modes)
        summaries += summary
        print("User mode: malloc + free loop (glibc)\n")
        print(markdown_table(summary))
        print()
    print(h.machine_line(info))
    print(f"1-minute load average: {load_before} before, {load_after} after (other jobs share the CPUs).")
    skewed = [r for r in runs if r.foreign]
    if skewed:
        reasons = h.foreign_reasons(f for r in skewed for f in r.foreign)
        print(
            f"WARNING: {len(skewed)} of {len(runs)} runs saw other tracing even after {args.attempts} "
            f"attempt(s) ({'; '.join(reasons)}); the tables use each mode's clean runs where there are any."
        )
    if args.json:
        doc = {
            "schema": "memtop.bench.leaks/1",
            "machine": info,
            "config": {
                "seconds": args.seconds,
                "rounds": args.rounds,
                "memleak": memleak,
                "benches": benches,
            },
            "summary": [asdict(s) for s in summaries],
            "runs": [asdict(r) for r in runs],
            "load_average": [load_before, load_after],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return h.main_wrapper("leaks_bench.py", parse_args, bench, argv)


if __name__ == "__main__":
    sys.exit(main())
