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
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
MAX_SAMPLE_EVERY = 1_000_000  # the same bound as memtop.probes.kmalloc.MAX_SAMPLE_EVERY
READ_INTERVAL_S = 1.0  # how often the app reads the probe's maps
DEFAULT_ATTEMPTS = 3  # of a run during which another tracer was attached to the measured tracepoints
RETRY_WAIT_S = 5.0
IRQ_TRACEPOINTS = ("softirq_entry", "softirq_exit", "irq_handler_entry", "irq_handler_exit")
WATCHED_TRACEPOINTS = ("kmalloc", *IRQ_TRACEPOINTS)

WORKLOAD_C = r"""
/* memtop bench workload: listxattr(path, buf, 256) in a tight loop for a fixed wall time.
 * Prints "<iterations> <elapsed seconds>". */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/xattr.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FILE SECONDS\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    double seconds = strtod(argv[2], NULL);
    char buf[256];
    unsigned long long iterations = 0;
    double start = now(), end = start + seconds, t;
    for (;;) {
        for (int i = 0; i < 1024; i++) {
            if (listxattr(path, buf, sizeof(buf)) < 0) {
                perror("listxattr");
                return 1;
            }
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


class BenchError(Exception):
    """A failure worth one line on the terminal."""


# -- the workload --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    binary: Path
    target: Path  # the file whose xattrs are listed


def build_workload(workdir: Path) -> Workload:
    """Compile the listxattr loop with gcc -O2 into `workdir` and create the file it lists."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found (apt install gcc)")
    source = workdir / "listxattr_loop.c"
    binary = workdir / "listxattr_loop"
    target = workdir / "target"
    source.write_text(WORKLOAD_C)
    target.write_bytes(b"")
    proc = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(binary), str(source)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise BenchError(f"gcc failed to build the workload: {_last_line(proc.stderr)}")
    return Workload(binary, target)


def start_workload(workload: Workload, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(workload.binary), str(workload.target), repr(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_workload(proc: subprocess.Popen[str], seconds: float) -> tuple[int, float]:
    """Wait for a workload printing "<count> <seconds>"; (count, elapsed seconds) as it measured them."""
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise BenchError(f"workload exited with {proc.returncode}: {_last_line(err)}")
    try:
        count, elapsed = out.split()
        return int(count), float(elapsed)
    except ValueError:
        raise BenchError(f"workload printed {out!r}, expected '<count> <seconds>'") from None


def run_workload(workload: Workload, seconds: float) -> tuple[int, float]:
    return finish_workload(start_workload(workload, seconds), seconds)


# -- bpftool and the kernel's BPF run-time accounting ---------------------------------------------------


def bpftool_json(*args: str) -> Any:
    proc = subprocess.run(["bpftool", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"bpftool {' '.join(args)} failed: {_last_line(proc.stderr or proc.stdout)}")
    return json.loads(proc.stdout or "null")


def loaded_prog_ids() -> set[int]:
    return {int(p["id"]) for p in bpftool_json("prog", "show") or []}


def tracepoint_attachments() -> list[dict[str, Any]]:
    """Every BPF program attached to a tracepoint via perf: pid, prog_id, tracepoint (event name only)."""
    return [a for a in bpftool_json("perf", "list") or [] if a.get("fd_type") == "tracepoint"]


@dataclass(frozen=True)
class ProgStats:
    run_time_ns: int
    run_cnt: int


def prog_stats(ids: set[int]) -> dict[int, ProgStats]:
    """run_time_ns and run_cnt of the given programs (0 when bpf_stats is off), from one bpftool call."""
    stats = {}
    for prog in bpftool_json("prog", "show") or []:
        if int(prog["id"]) in ids:
            stats[int(prog["id"])] = ProgStats(int(prog.get("run_time_ns", 0)), int(prog.get("run_cnt", 0)))
    missing = ids - stats.keys()
    if missing:
        raise BenchError(f"bpftool does not list the probe's programs {sorted(missing)}")
    return stats


BPF_ENABLE_STATS = 32  # enum bpf_cmd in linux/bpf.h
BPF_STATS_RUN_TIME = 0
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "s390x": 351, "ppc64le": 361}


class RunTimeStats:
    """The kernel's BPF run-time accounting (run_time_ns, run_cnt), on for the `with` block.

    It holds the fd that bpf(BPF_ENABLE_STATS) returns. The kernel counts the holders (and
    kernel.bpf_stats_enabled=1 as one more), so the accounting goes off again when the fd is closed, even if
    this process is killed, and two benchmarks at once cannot undo each other, as they could by writing the
    sysctl and restoring it. Where the bpf syscall's number is not known, it falls back to the sysctl and
    writes the old value back on exit, also on failure.
    """

    def __init__(self) -> None:
        self.fd = -1
        self.sysctl_old: str | None = None

    def __enter__(self) -> RunTimeStats:
        number = SYS_BPF.get(platform.machine())
        if number is None:
            try:
                old = BPF_STATS_SYSCTL.read_text().strip()
                BPF_STATS_SYSCTL.write_text("1\n")
            except OSError as exc:
                raise BenchError(f"cannot switch on {BPF_STATS_SYSCTL}: {exc.strerror}") from None
            self.sysctl_old = old
            return self
        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint32 * 4)(BPF_STATS_RUN_TIME)  # union bpf_attr: .enable_stats.type, rest zero
        fd = libc.syscall(
            ctypes.c_long(number), ctypes.c_int(BPF_ENABLE_STATS), ctypes.byref(attr), ctypes.sizeof(attr)
        )
        if fd < 0:
            raise BenchError(f"bpf(BPF_ENABLE_STATS) failed: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.sysctl_old is not None:
            BPF_STATS_SYSCTL.write_text(self.sysctl_old + "\n")
            self.sysctl_old = None


def own_prog_ids(required: str = "kmalloc") -> dict[str, int]:
    """This process's programs by tracepoint name, from `bpftool perf list`; `required` must be one.

    bpftool's `prog show` names are unreliable to match: BCC drops the `tracepoint__` prefix of names
    longer than the kernel's 15 characters, so the kmalloc program shows up as `kmem__kmalloc`, while the
    irq ones are truncated in the kernel and shown by bpftool under their full BTF name. The perf
    attachments, filtered by our pid, name the tracepoint itself, and other tracers' programs are ignored.
    """
    pid = os.getpid()
    ids = {a["tracepoint"]: int(a["prog_id"]) for a in tracepoint_attachments() if a.get("pid") == pid}
    if required not in ids:
        raise BenchError(f"no BPF program of this process is attached to {required} (bpftool saw {ids})")
    return ids


def foreign_attachments(watched: tuple[str, ...] = WATCHED_TRACEPOINTS) -> list[str]:
    """Other processes' BPF programs on the tracepoints we measure: they would skew every mode."""
    pid = os.getpid()
    by_pid: dict[Any, set[str]] = {}
    for a in tracepoint_attachments():
        if a.get("pid") != pid and a.get("tracepoint") in watched:
            by_pid.setdefault(a.get("pid"), set()).add(str(a.get("tracepoint")))
    found = [f"pid {p} on {','.join(sorted(tps))}" for p, tps in sorted(by_pid.items(), key=str)]
    enable = Path("/sys/kernel/tracing/events/kmem/kmalloc/enable")
    try:
        if enable.read_text().strip() not in ("0", ""):
            found.append("the ftrace event kmem:kmalloc is enabled")
    except OSError:
        pass
    return found


# -- the reader thread (the app's refresh tick) -----------------------------------------------------------


class PeriodicReader(threading.Thread):
    """Calls probe.read() every second, like memtop's collector worker."""

    def __init__(self, probe: Any, interval: float = READ_INTERVAL_S) -> None:
        super().__init__(name="probe-reader", daemon=True)
        self.probe = probe
        self.interval = interval
        self.stopped = threading.Event()
        self.reads = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.interval):
                self.probe.read()
                self.reads += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join()


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
    workload_kmallocs: int = 0  # the probe's count for the workload's tgid (scaled when sampled)
    reads: int = 0
    prog_ids: dict[str, int] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)  # other tracers seen before or after the run
    attempt: int = 1


def run_none(workload: Workload, seconds: float, round_no: int) -> Run:
    foreign = foreign_attachments()
    iterations, elapsed = run_workload(workload, seconds)
    foreign += foreign_attachments()
    return Run(NONE, None, round_no, iterations, elapsed, iterations / elapsed, foreign=sorted(set(foreign)))


def probe_class() -> Any:
    """memtop's KmallocProbe, imported late so that --help and the root check work without BCC."""
    try:
        from memtop.probes.kmalloc import KmallocProbe
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        try:
            from memtop.probes.kmalloc import KmallocProbe
        except ImportError as exc:
            raise BenchError(f"cannot import memtop ({exc}): run with .venv/bin/python") from None
    return KmallocProbe


def run_probe(
    workload: Workload, seconds: float, round_no: int, sample: int, with_stats: bool, all_ids: set[int]
) -> Run:
    """One run with the probe attached and read every second; the programs' stats when `with_stats`."""
    probe = probe_class()(sample_every=sample)
    reader = PeriodicReader(probe)
    try:
        probe.start()
        ids = own_prog_ids()
        all_ids.update(ids.values())
        kmalloc_id = ids["kmalloc"]
        irq_ids = {i for name, i in ids.items() if name in IRQ_TRACEPOINTS}
        foreign = foreign_attachments()
        reader.start()
        before = prog_stats(set(ids.values()))
        t0 = time.monotonic()
        proc = start_workload(workload, seconds)
        iterations, elapsed = finish_workload(proc, seconds)
        window = time.monotonic() - t0
        after = prog_stats(set(ids.values()))
        foreign = sorted(set(foreign + foreign_attachments()))
        if not with_stats and after[kmalloc_id].run_cnt > before[kmalloc_id].run_cnt:
            foreign.append("BPF run-time stats on (kernel.bpf_stats_enabled=1 or another BPF_ENABLE_STATS)")
        reader.stop()
        if reader.error is not None:
            raise BenchError(f"probe.read() failed on the reader thread: {reader.error}")
        counters = probe.read().per_tgid.get(proc.pid)
        workload_kmallocs = counters.calls if counters is not None else 0
    finally:
        reader.stop()
        probe.close()

    def delta(prog_ids: set[int]) -> tuple[int, int]:
        if not with_stats:
            return 0, 0
        return (
            sum(after[i].run_time_ns - before[i].run_time_ns for i in prog_ids),
            sum(after[i].run_cnt - before[i].run_cnt for i in prog_ids),
        )

    k_ns, k_cnt = delta({kmalloc_id})
    irq_ns, irq_cnt = delta(irq_ids)
    return Run(
        PROBE_STATS if with_stats else PROBE,
        sample,
        round_no,
        iterations,
        elapsed,
        iterations / elapsed,
        window_s=window,
        kmalloc_run_time_ns=k_ns,
        kmalloc_run_cnt=k_cnt,
        irq_run_time_ns=irq_ns,
        irq_run_cnt=irq_cnt,
        workload_kmallocs=workload_kmallocs,
        reads=reader.reads,
        prog_ids=ids,
        foreign=foreign,
    )


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
                kmalloc_events_per_s=k_cnt / window if window else None,
                irq_ns_per_event=i_ns / i_cnt if i_ns and i_cnt else None,
                irq_events_per_s=i_cnt / window if window else None,
                workload_kmallocs_per_iteration=kmallocs / iterations if iterations else None,
            )
        )
    return out


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "–" if value is None else format(value, fmt)


TABLE_COLUMNS = (
    "mode",
    "sample 1 in N",
    "iterations/s (median)",
    "slowdown %",
    "added ns/iteration",
    "slowdown % with bpf_stats",
    "kmalloc prog ns/event",
    "kmalloc events/s",
    "irq/softirq progs ns/event",
    "irq/softirq events/s",
)


def markdown_table(summary: list[ModeSummary]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---:|" * (len(TABLE_COLUMNS) - 1)]
    for m in summary:
        cells = [
            "none" if m.mode == NONE else "memtop probe",
            "–" if m.sample is None else str(m.sample),
            _num(m.iterations_per_s_median),
            _num(m.slowdown_pct, ".1f"),
            _num(m.added_ns_per_iteration, ".1f"),
            _num(m.slowdown_pct_with_bpf_stats, ".1f"),
            _num(m.kmalloc_ns_per_event, ".1f"),
            _num(m.kmalloc_events_per_s),
            _num(m.irq_ns_per_event, ".1f"),
            _num(m.irq_events_per_s),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    virtual = False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            if key.strip() == "flags" and "hypervisor" in value.split():
                virtual = True
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpu_model": model,
        "nproc": os.cpu_count() or 0,
        "virtual_machine": virtual,
        "python": platform.python_version(),
    }


def machine_line(info: dict[str, Any]) -> str:
    vm = " (virtual machine)" if info["virtual_machine"] else ""
    return f"Machine: Linux {info['kernel']}, {info['cpu_model']}, nproc {info['nproc']}{vm}."


# -- main ------------------------------------------------------------------------------------------------


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600")
    return value


def int_in(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kmalloc_bench.py",
        description="Measure what memtop's kmalloc probe costs a listxattr loop (one kmalloc per call). "
        "Needs root.",
    )
    parser.add_argument("--seconds", type=positive_float, default=3.0, help="length of each run (default 3)")
    parser.add_argument("--rounds", type=int_in(1, 1000), default=5, help="runs of each mode (default 5)")
    parser.add_argument(
        "--sample",
        type=int_in(1, MAX_SAMPLE_EVERY),
        action="append",
        metavar="N",
        help="measure the probe counting 1 in N kmallocs; repeat for several (default: just 1, every call)",
    )
    parser.add_argument(
        "--attempts",
        type=int_in(1, 10),
        default=DEFAULT_ATTEMPTS,
        help="tries per run while other tracers are attached to the same tracepoints (default 3)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the summary here")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench(args: argparse.Namespace) -> int:
    samples = sorted(set(args.sample or [1]))
    info = machine()
    runs: list[Run] = []
    all_ids: set[int] = set()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    probe_class()  # fail early, before building anything
    try:
        with tempfile.TemporaryDirectory(prefix="memtop-bench-") as tmp:
            workload = build_workload(Path(tmp))
            log(f"workload built; {args.rounds} round(s) of {args.seconds:g} s per mode, samples {samples}")
            for round_no in range(1, args.rounds + 1):
                for sample in samples:
                    for mode in (NONE, PROBE, PROBE_STATS):
                        for attempt in range(1, args.attempts + 1):
                            stats = RunTimeStats() if mode == PROBE_STATS else contextlib.nullcontext()
                            with stats:
                                if mode == NONE:
                                    run = run_none(workload, args.seconds, round_no)
                                else:
                                    run = run_probe(
                                        workload, args.seconds, round_no, sample, mode == PROBE_STATS, all_ids
                                    )
                            run.attempt = attempt
                            log(_progress(run))
                            if not run.foreign or attempt == args.attempts:
                                break
                            log(f"  other tracers ({'; '.join(run.foreign)}): again in {RETRY_WAIT_S:g} s")
                            time.sleep(RETRY_WAIT_S)
                        runs.append(run)
    except BaseException:
        if all_ids:  # best effort: say so if a failure left programs behind, then report the failure
            try:
                leftover = loaded_prog_ids() & all_ids
            except BenchError:
                leftover = set()
            if leftover:
                log(f"probe programs still loaded after the failure: {sorted(leftover)}")
        raise
    leftover = loaded_prog_ids() & all_ids
    if leftover:
        raise BenchError(f"probe programs still loaded after close(): {sorted(leftover)}")

    summary = summarize(runs, samples)
    skewed = [r for r in runs if r.foreign]
    reasons = sorted({f.split(" on ")[0] if f.startswith("pid ") else f for r in skewed for f in r.foreign})
    print(markdown_table(summary))
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
            "runs_with_other_tracers": len(skewed),
            "load_average_before": float(load_before),
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


def _id_ranges(ids: set[int]) -> str:
    if not ids:
        return "none"
    return f"{min(ids)}..{max(ids)}" if len(ids) > 1 else str(min(ids))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("kmalloc_bench.py: needs root (it loads BPF programs): sudo make bench", file=sys.stderr)
        return 1
    if shutil.which("bpftool") is None:
        print(
            "kmalloc_bench.py: bpftool not found (apt install bpftool, or sudo make setup)", file=sys.stderr
        )
        return 1
    # SIGTERM unwinds like Ctrl-C, so the probe is closed (and a sysctl fallback restored).
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    try:
        return bench(args)
    except KeyboardInterrupt:
        print("kmalloc_bench.py: interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"kmalloc_bench.py: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__name__ == "MemtopError":  # memtop's one-line errors (probe failed to load, ...)
            print(f"kmalloc_bench.py: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
