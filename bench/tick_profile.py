#!/usr/bin/env python3
"""Where a headless tick's time goes on a busy host: the collector `memtop snapshot`, `record` and the TUI
share (LiveSource.tick), per phase, in CPU milliseconds of the collecting thread.

N processes that each make one kmalloc every 500 ms (tests/data/busy_children.c, as ui_bench.py), every
probe attached as live mode attaches them, a warm-up, then T ticks a second apart. Each phase is timed with
time.thread_time() around the method; Python's cycle collections during the ticks are counted and timed
too (gc.callbacks). The figures are for finding what to work on; ui_bench.py measures the whole TUI. It also
prints the kernel leak probe's drop counters at the end (allocations it could not account for, e.g.
aggregate_missing: a free whose aggregate had been pruned in a race).

    sudo .venv/bin/python bench/tick_profile.py [--processes 5000] [--ticks 15] [--leaks-visible]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import ui_bench

NAME = "tick_profile"
WARMUP_TICKS = 5
# (attribute of the LiveSource, method): each phase of a tick, as LiveSource.tick calls them
PHASES = (
    ("kmalloc", "read"),
    ("procs", "scan"),
    ("store", "ingest"),
    ("store", "set_containers"),
    ("oom", "read"),
    ("tcp", "read"),
    ("leaks", "read"),
    ("leaks", "adapt"),
    ("store", "ingest_leaks"),
    ("store", "snapshot"),
)
# Parts of a kernel leak read (leaks.read above includes them), timed only with --leaks-visible.
LEAK_PARTS = ("_aggregates", "reconcile", "_prune_empty", "_read_ages", "_prune", "recursion_misses")


def timed(spent: dict[str, float], label: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start

    return wrapper


def profile(processes: int, ticks: int, leaks_visible: bool = False) -> dict[str, Any]:
    config = harness.import_memtop("config", "Config")
    live_source = harness.import_memtop("sources", "LiveSource")
    spent: dict[str, float] = collections.defaultdict(float)
    collections_run: dict[int, int] = collections.defaultdict(int)
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            spent[f"gc gen{info['generation']}"] += time.thread_time() - started[0]
            collections_run[info["generation"]] += 1

    with (
        tempfile.TemporaryDirectory(prefix="memtop-tick-profile-") as tmp,
        ui_bench.busy_processes(Path(tmp), processes),
    ):
        source = live_source(config())
        try:
            source.start()
            for owner, method in PHASES:
                target = getattr(source, owner)
                if hasattr(target, method):
                    setattr(target, method, timed(spent, f"{owner}.{method}", getattr(target, method)))
            if leaks_visible:  # as while the Leaks tab is on screen: the aggregates are read every tick
                source.set_leaks_visible(True)
                for method in LEAK_PARTS:
                    if hasattr(source.leaks, method):
                        label = f"  leaks.read: {method}"
                        setattr(source.leaks, method, timed(spent, label, getattr(source.leaks, method)))
            for _ in range(WARMUP_TICKS):
                source.tick()
                time.sleep(1.0)
            spent.clear()
            gc.callbacks.append(on_gc)
            total = 0.0
            rows = 0
            drops: dict[str, int] = {}
            for _ in range(ticks):
                start = time.thread_time()
                snapshot = source.tick()
                total += time.thread_time() - start
                rows = len(snapshot.processes)
                drops = dict(snapshot.drops)
                time.sleep(1.0)
            gc.callbacks.remove(on_gc)
        finally:
            source.close()
    return {
        "processes": processes,
        "leaks_visible": leaks_visible,
        "rows": rows,
        "ticks": ticks,
        "tick_ms": 1000 * total / ticks,
        "phases_ms": {k: 1000 * v / ticks for k, v in sorted(spent.items(), key=lambda kv: -kv[1])},
        "gc_collections_per_tick": {f"gen{g}": n / ticks for g, n in sorted(collections_run.items())},
        # What the kernel leak probe could not account for since it attached (a pruning race shows here)
        "leak_drops": {k: v for k, v in sorted(drops.items()) if k.startswith("leak_")},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=NAME, description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=harness.int_in(1, 20000), default=5000)
    parser.add_argument("--ticks", type=harness.int_in(1, 3600), default=15)
    parser.add_argument(
        "--leaks-visible",
        action="store_true",
        help="read the leak aggregates every tick, as the Leaks tab does",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    return parser.parse_args(argv)


def bench(args: argparse.Namespace) -> int:
    result = profile(args.processes, args.ticks, args.leaks_visible)
    print(f"{result['rows']} rows; a tick: {result['tick_ms']:.1f} ms of the collecting thread's CPU")
    print(
        harness.markdown_table(
            ("phase", "ms a tick"), ((k, f"{v:.1f}") for k, v in result["phases_ms"].items())
        )
    )
    print(
        "cycle collections a tick: "
        + (", ".join(f"{g} {n:.1f}" for g, n in result["gc_collections_per_tick"].items()) or "none")
    )
    print(
        "leak drops since attach: "
        + (", ".join(f"{k} {v:,}" for k, v in result["leak_drops"].items()) or "none")
    )
    print(harness.machine_line(harness.machine()))
    if args.json:
        args.json.write_text(json.dumps({"machine": harness.machine(), **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(harness.main_wrapper(NAME, parse_args, bench))
