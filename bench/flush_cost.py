"""What moving the kmalloc counters' per-CPU slots into the per-process map adds to each read.

Before every read the kmalloc probe runs km_flush (a BPF program run by BPF_PROG_TEST_RUN) on each CPU whose
slot holds counts: directly on the reader's own CPU, by IPI on the others. This times KmallocProbe.flush()
`--reads` times, 5 ms apart, twice: with a kmallocing process pinned to every CPU (every slot full at each
flush), then with those stopped (the host's own activity only).

    sudo .venv/bin/python bench/flush_cost.py [--reads 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    BenchError,
    import_memtop,
    int_in,
    load_average,
    machine,
    machine_line,
    main_wrapper,
    markdown_table,
    num,
)

KMALLOC_LOOP = "import os, sys\nwhile True:\n    os.listxattr(sys.argv[1])\n"


def time_flushes(probe: object, reads: int) -> list[float]:
    """Seconds per probe.flush(), `reads` of them, 5 ms apart."""
    times = []
    for _ in range(reads):
        started = time.perf_counter()
        probe.flush()  # type: ignore[attr-defined]
        times.append(time.perf_counter() - started)
        time.sleep(0.005)
    return times


def measure(args: argparse.Namespace) -> int:
    info = machine()
    load_before = load_average()
    probe = import_memtop("probes.kmalloc", "KmallocProbe")()
    probe.start()
    try:
        if not probe.cpu_slot:
            raise BenchError(f"the kmalloc probe runs without per-CPU slots: {probe.cpu_slot_off_reason}")
        with tempfile.TemporaryDirectory(prefix="memtop-flush-cost-") as tmp:
            target = Path(tmp) / "target"
            target.write_bytes(b"")
            loops = [
                subprocess.Popen(
                    [sys.executable, "-c", KMALLOC_LOOP, str(target)],
                    preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}),
                )
                for cpu in sorted(os.sched_getaffinity(0))
            ]
            try:
                time.sleep(0.5)
                busy = time_flushes(probe, args.reads)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
        idle = time_flushes(probe, args.reads)
        deferred = probe.flushes_deferred
    finally:
        probe.close()
    rows = [
        [
            label,
            str(len(times)),
            num(statistics.median(times) * 1e6, ".0f"),
            num(statistics.quantiles(times, n=10)[8] * 1e6, ".0f"),
            num(max(times) * 1e6, ".0f"),
        ]
        for label, times in (("a kmallocing process on every CPU", busy), ("those stopped", idle))
    ]
    columns = ("flush before a read", "reads", "µs, median", "µs, p90", "µs, max")
    print(markdown_table(columns, rows))
    print()
    print(machine_line(info))
    print(f"1-minute load average before: {load_before}. Flushes that left a slot for later: {deferred}.")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flush_cost.py",
        description="What flushing the kmalloc probe's per-CPU slots adds to each read. Needs root.",
    )
    parser.add_argument("--reads", type=int_in(10, 100_000), default=200, help="flushes timed per case")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("flush_cost.py", parse_args, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
