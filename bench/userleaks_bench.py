#!/usr/bin/env python3
"""What memtop's user leak probe costs the traced program per allocator call: a C loop of malloc(64) +
free runs a fixed number of iterations untraced, then under UserLeakProbe (every call tracked, N=1, and
1 in 64), and the difference per call is the uprobe cost (one uprobe + uretprobe on malloc, one uprobe on
free). Rounds alternate; medians are reported.

Needs root and gcc. Usage: sudo .venv/bin/python bench/userleaks_bench.py [--iterations N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static void *volatile sink;
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    char line[16];
    printf("ready\n"); fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) { void *p = malloc(64); sink = p; free(p); }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.9f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


def run_once(binary: Path, iterations: int, sample_every: int | None) -> float:
    """Seconds per malloc+free pair."""
    from memtop.probes.leaks import UserLeakProbe

    proc = subprocess.Popen(
        [str(binary), str(iterations)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    probe = None
    try:
        if sample_every is not None:
            probe = UserLeakProbe(proc.pid, sample_every=sample_every)
            probe.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        seconds = float(proc.stdout.readline())
    finally:
        if probe is not None:
            probe.close()
        proc.wait(timeout=60)
    return seconds / iterations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "loop.c"
        source.write_text(LOOP_C)
        binary = Path(tmp) / "loop"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
        modes: dict[str, int | None] = {"untraced": None, "traced, N=1": 1, "traced, 1 in 64": 64}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, rate in modes.items():
                times[mode].append(run_once(binary, args.iterations, rate))
    base = statistics.median(times["untraced"])
    print(f"{'mode':<18} {'ns per malloc+free':>20} {'uprobe cost per call (us)':>27}")
    summary = []
    for mode in modes:
        median = statistics.median(times[mode])
        per_call_us = (median - base) / 2 * 1e6  # two calls (malloc, free) per iteration
        print(f"{mode:<18} {median * 1e9:>20.0f} {per_call_us if mode != 'untraced' else 0:>27.2f}")
        summary.append({"mode": mode, "ns_per_pair": median * 1e9, "us_per_call": per_call_us})
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
