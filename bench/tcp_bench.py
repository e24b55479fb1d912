#!/usr/bin/env python3
"""What memtop's TCP connect probe costs a connect-heavy workload.

A small C program connects to a listener of its own on 127.0.0.1 in a tight loop: the client (the parent
process) does socket(), connect(), close() with SO_LINGER 0 (a reset instead of TIME_WAIT, so ports never
run out), while a forked child accepts and closes. Each connect crosses the probe's tracepoints about ten
times (four or five state changes, two socket destructions, a reset and an error report).

Each round runs it three times: with no tracing, with memtop's TcpProbe attached (read once a second from a
thread, as the app does), and with the probe plus the kernel's BPF run-time statistics. The script reports
the median connects/s, the probe's slowdown and added ns per connect (from the runs without bpf_stats), and
from the bpf_stats runs the kernel's account of each BPF program: ns per event, events/s and the BPF time
per connect. Helpers (bpftool, bpf_stats, the reader thread, machine description) come from
harness.py.

Needs root, gcc and bpftool: sudo .venv/bin/python bench/tcp_bench.py --help
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402  (the sibling module, found through the path set just above)
    STATS_ELSEWHERE,
    PeriodicReader,
    add_common_args,
    check_unloaded,
    compile_c,
    finish_workload,
    foreign_attachments,
    foreign_reasons,
    import_memtop,
    load_average,
    log,
    machine,
    machine_line,
    main_wrapper,
    maybe_stats,
    num,
    own_prog_ids,
    prog_stats,
    retry_while_foreign,
    start_process,
)

# The probe's tracepoints (event names as bpftool perf list shows them); kmem:kmalloc is watched too
# because another tracer there (memtop's kmalloc probe) slows every socket allocation in every mode.
PROBE_TRACEPOINTS = (
    "inet_sock_set_state",
    "tcp_destroy_sock",
    "tcp_receive_reset",
    "tcp_retransmit_skb",
    "inet_sk_error_report",
)
WATCHED_TRACEPOINTS = (*PROBE_TRACEPOINTS, "kmalloc")

WORKLOAD_C = r"""
/* memtop TCP bench workload: connect to our own 127.0.0.1 listener in a loop for a fixed wall time.
 * A forked child accepts and closes; the client closes with SO_LINGER 0 (RST, no TIME_WAIT).
 * Prints "<connects> <elapsed seconds>". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

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
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        listen(listener, 4096) < 0 || getsockname(listener, (struct sockaddr *)&addr, &len) < 0) {
        perror("listener");
        return 1;
    }
    pid_t server = fork();
    if (server == 0) {
        for (;;) {
            int c = accept(listener, NULL, NULL);
            if (c >= 0)
                close(c);
        }
    }
    close(listener);
    struct linger abort_on_close = {.l_onoff = 1, .l_linger = 0};
    unsigned long long connects = 0;
    double start = now(), end = start + seconds, t;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
                perror("connect");
                kill(server, SIGKILL);
                return 1;
            }
            setsockopt(s, SOL_SOCKET, SO_LINGER, &abort_on_close, sizeof(abort_on_close));
            close(s);
        }
        connects += 64;
        t = now();
        if (t >= end)
            break;
    }
    kill(server, SIGKILL);
    waitpid(server, NULL, 0);
    printf("%llu %.9f\n", connects, t - start);
    return 0;
}
"""


# -- the workload --------------------------------------------------------------------------------------


def build_workload(workdir: Path) -> Path:
    return compile_c(workdir, "connect_loop", WORKLOAD_C)


def start_workload(binary: Path, seconds: float) -> subprocess.Popen[str]:
    return start_process([str(binary), repr(seconds)])


def run_workload(binary: Path, seconds: float) -> tuple[int, float]:
    return finish_workload(start_workload(binary, seconds), seconds)


def probe_class() -> Any:
    return import_memtop("probes.tcp", "TcpProbe")


# -- one run -------------------------------------------------------------------------------------------

NONE, PROBE, PROBE_STATS = "none", "probe", "probe+bpf_stats"


@dataclass
class Run:
    mode: str
    round: int
    connects: int
    elapsed_s: float
    connects_per_s: float
    window_s: float = 0.0
    prog_run_time_ns: dict[str, int] = field(default_factory=dict)  # by tracepoint (bpf_stats runs)
    prog_run_cnt: dict[str, int] = field(default_factory=dict)
    workload_connects: int = 0  # what the probe counted for the workload's pid
    workload_failed: int = 0
    reads: int = 0
    foreign: list[str] = field(default_factory=list)
    attempt: int = 1


def run_none(binary: Path, seconds: float, round_no: int) -> Run:
    foreign = foreign_attachments(WATCHED_TRACEPOINTS)
    connects, elapsed = run_workload(binary, seconds)
    foreign += foreign_attachments(WATCHED_TRACEPOINTS)
    return Run(NONE, round_no, connects, elapsed, connects / elapsed, foreign=sorted(set(foreign)))


def run_probe(binary: Path, seconds: float, round_no: int, with_stats: bool, all_ids: set[int]) -> Run:
    probe = probe_class()()
    reader = PeriodicReader(probe)
    try:
        probe.start()
        ids = own_prog_ids("inet_sock_set_state")
        all_ids.update(ids.values())
        foreign = foreign_attachments(WATCHED_TRACEPOINTS)
        reader.start()
        before = prog_stats(ids.values())
        t0 = time.monotonic()
        proc = start_workload(binary, seconds)
        connects, elapsed = finish_workload(proc, seconds)
        window = time.monotonic() - t0
        after = prog_stats(ids.values())
        foreign = sorted(set(foreign + foreign_attachments(WATCHED_TRACEPOINTS)))
        main_id = ids["inet_sock_set_state"]
        if not with_stats and after[main_id].run_cnt > before[main_id].run_cnt:
            foreign.append(STATS_ELSEWHERE)
        reader.stop()
        reader.check()
        reading = probe.read()
        ours = [c for k, c in reading.per_key.items() if k.pid == proc.pid]
    finally:
        reader.stop()
        probe.close()
    run = Run(
        PROBE_STATS if with_stats else PROBE,
        round_no,
        connects,
        elapsed,
        connects / elapsed,
        window_s=window,
        workload_connects=sum(c.connects for c in ours),
        workload_failed=sum(c.failed for c in ours),
        reads=reader.reads,
        foreign=foreign,
    )
    if with_stats:
        for name, prog_id in ids.items():
            run.prog_run_time_ns[name] = after[prog_id].run_time_ns - before[prog_id].run_time_ns
            run.prog_run_cnt[name] = after[prog_id].run_cnt - before[prog_id].run_cnt
    return run


# -- summary -------------------------------------------------------------------------------------------


@dataclass
class ProgSummary:
    tracepoint: str
    ns_per_event: float | None
    events_per_s: float
    events_per_connect: float


@dataclass
class Summary:
    runs_per_mode: int
    none_connects_per_s: float
    probe_connects_per_s: float
    probe_stats_connects_per_s: float
    slowdown_pct: float
    added_ns_per_connect: float
    slowdown_pct_with_bpf_stats: float
    paired_slowdown_pct: float  # median over rounds of each probe run against that round's none run
    bpf_ns_per_connect: float | None  # all programs' run time / workload connects (bpf_stats runs)
    programs: list[ProgSummary]
    probe_counted_per_connect: float | None  # the probe's count for the workload / what it reported


def summarize(runs: list[Run]) -> Summary:
    """Medians of connects/s per mode; BPF costs pooled over the bpf_stats rounds."""
    none = statistics.median(r.connects_per_s for r in runs if r.mode == NONE)
    probe = statistics.median(r.connects_per_s for r in runs if r.mode == PROBE)
    stats_runs = [r for r in runs if r.mode == PROBE_STATS]
    probe_stats = statistics.median(r.connects_per_s for r in stats_runs)
    window = sum(r.window_s for r in stats_runs)
    connects = sum(r.connects for r in stats_runs)
    names = sorted(
        {n for r in stats_runs for n in r.prog_run_cnt}, key=lambda n: (n != PROBE_TRACEPOINTS[0], n)
    )
    programs = []
    total_ns = 0
    for name in names:
        ns = sum(r.prog_run_time_ns.get(name, 0) for r in stats_runs)
        cnt = sum(r.prog_run_cnt.get(name, 0) for r in stats_runs)
        total_ns += ns
        programs.append(
            ProgSummary(
                name,
                ns / cnt if cnt else None,
                cnt / window if window else 0.0,
                cnt / connects if connects else 0.0,
            )
        )
    by_round = {(r.round, r.mode): r for r in runs}
    paired = [
        (by_round[(n, NONE)].connects_per_s - by_round[(n, PROBE)].connects_per_s)
        / by_round[(n, NONE)].connects_per_s
        * 100
        for n in sorted({r.round for r in runs})
        if (n, NONE) in by_round and (n, PROBE) in by_round
    ]
    traced = [r for r in runs if r.mode != NONE]
    counted = sum(r.workload_connects for r in traced)
    reported = sum(r.connects for r in traced)
    return Summary(
        runs_per_mode=len(stats_runs),
        none_connects_per_s=none,
        probe_connects_per_s=probe,
        probe_stats_connects_per_s=probe_stats,
        slowdown_pct=(none - probe) / none * 100,
        added_ns_per_connect=1e9 / probe - 1e9 / none,
        slowdown_pct_with_bpf_stats=(none - probe_stats) / none * 100,
        paired_slowdown_pct=statistics.median(paired),
        bpf_ns_per_connect=total_ns / connects if connects and total_ns else None,
        programs=programs,
        probe_counted_per_connect=counted / reported if reported else None,
    )


def markdown(summary: Summary) -> str:
    lines = [
        "| mode | connects/s (median) | slowdown % | slowdown % (median of rounds) | added ns/connect |",
        "|---|---:|---:|---:|---:|",
        f"| none | {num(summary.none_connects_per_s)} | – | – | – |",
        f"| memtop tcp probe | {num(summary.probe_connects_per_s)} | {num(summary.slowdown_pct, '.1f')} "
        f"| {num(summary.paired_slowdown_pct, '.1f')} | {num(summary.added_ns_per_connect, ',.0f')} |",
        f"| memtop tcp probe + bpf_stats | {num(summary.probe_stats_connects_per_s)} "
        f"| {num(summary.slowdown_pct_with_bpf_stats, '.1f')} | – | – |",
        "",
        "| BPF program (tracepoint) | ns/event | events/s | events/connect |",
        "|---|---:|---:|---:|",
    ]
    for p in summary.programs:
        lines.append(
            f"| {p.tracepoint} | {num(p.ns_per_event, '.1f')} | {num(p.events_per_s)} "
            f"| {num(p.events_per_connect, '.2f')} |"
        )
    lines.append(f"| all programs, per connect | {num(summary.bpf_ns_per_connect, '.0f')} ns | | |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tcp_bench.py",
        description="Measure what memtop's TCP connect probe costs a loopback connect loop. Needs root.",
    )
    add_common_args(parser)
    return parser.parse_args(argv)


def _progress(run: Run) -> str:
    text = f"round {run.round}: {run.mode:<16} {run.connects_per_s:>10,.0f} connects/s"
    if run.mode == PROBE_STATS and run.prog_run_cnt.get("inet_sock_set_state"):
        name = "inet_sock_set_state"
        text += f", set_state prog {run.prog_run_time_ns[name] / run.prog_run_cnt[name]:.1f} ns/event"
    if run.mode != NONE:
        text += f", {run.reads} reads, probe counted {run.workload_connects / run.connects:.3f}/connect"
    return text


def bench(args: argparse.Namespace) -> int:
    info = machine()
    runs: list[Run] = []
    all_ids: set[int] = set()
    load_before = load_average()
    probe_class()
    try:
        with tempfile.TemporaryDirectory(prefix="memtop-tcp-bench-") as tmp:
            binary = build_workload(Path(tmp))
            log(f"workload built; {args.rounds} round(s) of {args.seconds:g} s per mode")
            for round_no in range(1, args.rounds + 1):
                for mode in (NONE, PROBE, PROBE_STATS):

                    def once(mode: str = mode, round_no: int = round_no) -> Run:
                        with maybe_stats(mode == PROBE_STATS):
                            if mode == NONE:
                                return run_none(binary, args.seconds, round_no)
                            return run_probe(binary, args.seconds, round_no, mode == PROBE_STATS, all_ids)

                    runs.append(retry_while_foreign(once, args.attempts, _progress))
    except BaseException:
        check_unloaded(all_ids, failed=True)
        raise
    check_unloaded(all_ids)

    summary = summarize(runs)
    skewed = [r for r in runs if r.foreign]
    print(markdown(summary))
    print()
    print(machine_line(info))
    print()
    if summary.probe_counted_per_connect is not None:
        print(
            f"Sanity: the probe counted {summary.probe_counted_per_connect:.3f} connects of the workload's "
            "process per connect it reported (expect 1.000)."
        )
    print(f"1-minute load average before the runs: {load_before}.")
    print(f"bpftool: none of the probe's {len(all_ids)} program IDs remain loaded.")
    if skewed:
        reasons = foreign_reasons(f for r in skewed for f in r.foreign)
        print(
            f"WARNING: {len(skewed)} of {len(runs)} runs had other tracers on the measured tracepoints "
            f"even after {args.attempts} attempt(s) ({'; '.join(reasons)}): their numbers are skewed."
        )
    if args.json:
        doc = {
            "schema": "memtop.bench.tcp/1",
            "machine": info,
            "config": {"seconds": args.seconds, "rounds": args.rounds, "attempts": args.attempts},
            "summary": asdict(summary),
            "runs": [asdict(r) for r in runs],
            "runs_with_other_tracers": len(skewed),
            "load_average_before": load_before,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("tcp_bench.py", parse_args, bench, argv)


if __name__ == "__main__":
    sys.exit(main())
