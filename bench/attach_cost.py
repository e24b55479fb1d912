"""What memtop's BPF programs cost a kmalloc-heavy loop, measured with nothing measuring the programs.

kmalloc_bench.py's per-program figures come from the kernel's run-time statistics, which add two clock
reads to every program run (30-37 ns here, more than most of memtop's programs do) and do not see a classic
tracepoint's record or the dispatch; its whole-run comparisons with the statistics off drowned in this
VM's slow swings between a fast and a slow state. This script measures what a user pays instead, paired:

- One listxattr loop (per call: a kmalloc, a kfree, a slab allocation and its free) runs pinned to one CPU
  for the whole benchmark and publishes its iteration count and its own CPU time (CLOCK_THREAD_CPUTIME_ID:
  the programs run inside its system calls) to shared memory every 1024 calls. This process runs on
  another CPU.
- Every set of programs is loaded once, up front. Then, rotation after rotation in a shuffled order, each
  set's programs on the loop's four tracepoints (kmalloc, kfree, kmem_cache_alloc, kmem_cache_free) are
  attached for one short slice and detached again. Every rotation has an untraced slice.
- A set's cost is its slice's CPU ns per iteration minus the untraced slice's of the same rotation; the
  table gives the median and mean (± standard error) of those differences over all rotations.

The sets: untraced; the minimal counter (a classic kmem:kmalloc program doing one per-CPU add: the
yardstick of issue #11); an empty raw tracepoint program on kmalloc (the dispatch alone); empty raw programs
on all four tracepoints (the dispatch floor of any tracer that sees every allocation and free); memtop's
kmalloc counters alone (KmallocProbe without the leak part) with its per-CPU slots and without them; every
panel (kmalloc with the kernel leak tracking compiled in, oom, tcp, as LiveSource builds them); the kmalloc
counters with empty programs on the other three tracepoints (every panel as it would cost were the leak
tracking's own work free: the least it can cost beside these counters). memtop's other
programs (irq entry/exit, task and sched events) stay attached in every slice alike; all probes are read
once a second on a thread, as the app does.

    sudo .venv/bin/python bench/attach_cost.py [--rotations 60] [--slice 0.2] [--switching] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    MINIMAL_COUNTER_C,
    AllReader,
    BenchError,
    check_unloaded,
    compile_c,
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
    num,
    panel_probes,
    positive_float,
    settle_kernel_leaks,
)

LOOP_C = r"""
/* listxattr(path, buf, 256) in a tight loop; every 1024 calls it publishes (iterations, its thread's CPU
 * ns) to the shared file argv[2] under a sequence word (odd while writing). Stops when word 3 is set.
 * With a third argument it yields the CPU after every call (two of them on one CPU: every kmalloc is
 * another process's than the last one on that CPU). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/xattr.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s FILE SHARED [yield]\n", argv[0]);
        return 2;
    }
    int fd = open(argv[2], O_RDWR);
    volatile unsigned long long *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fd < 0 || shared == MAP_FAILED) {
        perror("shared file");
        return 1;
    }
    char buf[256];
    int yield = argc == 4;
    unsigned long long iterations = 0;
    struct timespec ts;
    while (!shared[3]) {
        for (int i = 0; i < 1024; i++) {
            if (listxattr(argv[1], buf, sizeof(buf)) < 0) {
                perror("listxattr");
                return 1;
            }
            if (yield)
                sched_yield();
        }
        iterations += 1024;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        shared[2]++;
        __sync_synchronize();
        shared[0] = iterations;
        shared[1] = ts.tv_sec * 1000000000ULL + ts.tv_nsec;
        __sync_synchronize();
        shared[2]++;
    }
    return 0;
}
"""

EMPTY_RAW_C = "RAW_TRACEPOINT_PROBE(kmalloc) { return 0; }\n"
# One empty raw program on each of the loop's four tracepoints: the dispatch floor of any tracer that sees
# every kmalloc, kfree, slab allocation and slab free, as the kernel leak tracking must.
EMPTY_OTHER_THREE_C = "".join(
    f"RAW_TRACEPOINT_PROBE({tp}) {{ return 0; }}\n" for tp in ("kfree", "kmem_cache_alloc", "kmem_cache_free")
)
EMPTY_FOUR_C = "".join(
    f"RAW_TRACEPOINT_PROBE({tp}) {{ return 0; }}\n"
    for tp in ("kmalloc", "kfree", "kmem_cache_alloc", "kmem_cache_free")
)

HOT_RAW = (b"kmalloc", b"kfree", b"kmem_cache_free", b"kmem_cache_alloc")
HOT_CLASSIC = tuple(b"kmem:" + name for name in HOT_RAW)
WATCHED_TRACEPOINTS = [name.decode() for name in HOT_RAW]

UNTRACED = "untraced"
MINIMAL = "minimal counter (classic, one per-CPU add)"
EMPTY_RAW = "empty raw tracepoint program on kmalloc"
EMPTY_FOUR = "empty raw tracepoint programs on all four (the dispatch floor)"
KMALLOC_FLOOR = "memtop kmalloc counters + empty raw programs on the other three (leak tracking at no cost)"
KMALLOC = "memtop kmalloc counters alone"
KMALLOC_NO_SLOTS = "memtop kmalloc counters alone, no per-CPU slots"
PANELS = "memtop, every panel"
SETTLE_S = 0.03  # after an attach, before the slice starts


class Switch:
    """The programs of some BCC objects on the loop's tracepoints: taken off at start, then attached and
    detached slice by slice (the objects stay loaded)."""

    def __init__(self, objects: list[Any]) -> None:
        self.attached: list[tuple[Any, str, bytes, bytes]] = []  # (bpf, kind, tracepoint, function)
        for bpf in objects:
            for tp in list(getattr(bpf, "raw_tracepoint_fds", {})):
                if tp in HOT_RAW:
                    self.attached.append((bpf, "raw", tp, b"raw_tracepoint__" + tp))
                    bpf.detach_raw_tracepoint(tp)
            for tp in list(getattr(bpf, "tracepoint_fds", {})):
                if tp in HOT_CLASSIC:
                    self.attached.append((bpf, "classic", tp, b"tracepoint__" + tp.replace(b":", b"__")))
                    bpf.detach_tracepoint(tp)
        if not self.attached:
            raise BenchError("a set has no program on the loop's tracepoints")

    @classmethod
    def only(cls, switch: Switch, tracepoint: bytes) -> Switch:
        """The part of `switch` on one tracepoint (its programs already taken off)."""
        part = cls.__new__(cls)
        part.attached = [entry for entry in switch.attached if entry[2] == tracepoint]
        return part

    @classmethod
    def joined(cls, *switches: Switch) -> Switch:
        """The programs of several switches together (their programs already taken off)."""
        both = cls.__new__(cls)
        both.attached = [entry for switch in switches for entry in switch.attached]
        return both

    @property
    def tracepoints(self) -> list[str]:
        return sorted(f"{tp.decode()} ({kind})" for _bpf, kind, tp, _fn in self.attached)

    def on(self) -> None:
        for bpf, kind, tp, fn in self.attached:
            if kind == "raw":
                bpf.attach_raw_tracepoint(tp=tp, fn_name=fn)
            else:
                bpf.attach_tracepoint(tp=tp, fn_name=fn)

    def off(self) -> None:
        for bpf, kind, tp, _fn in self.attached:
            if kind == "raw":
                bpf.detach_raw_tracepoint(tp)
            else:
                bpf.detach_tracepoint(tp)


class SharedCounter:
    """The loop's published (iterations, CPU ns), read consistently."""

    def __init__(self, path: Path) -> None:
        path.write_bytes(b"\0" * 4096)
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 4096)

    def read(self, timeout: float = 5.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seq = struct.unpack_from("=Q", self._map, 16)[0]
            iterations, cpu_ns = struct.unpack_from("=QQ", self._map, 0)
            if seq % 2 == 0 and struct.unpack_from("=Q", self._map, 16)[0] == seq and iterations:
                return iterations, cpu_ns
            time.sleep(0.001)
        raise BenchError("the loop published nothing (is it running?)")

    def stop(self) -> None:
        struct.pack_into("=Q", self._map, 24, 1)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


@dataclass
class SetResult:
    name: str
    tracepoints: list[str]
    ns_per_iteration: list[float] = field(default_factory=list)  # the loop's CPU ns/iteration, per slice
    added_ns: list[float] = field(default_factory=list)  # minus the same rotation's untraced slice

    def median_added(self) -> float | None:
        return statistics.median(self.added_ns) if self.added_ns else None

    def mean_added(self) -> tuple[float, float] | None:
        if len(self.added_ns) < 2:
            return None
        return statistics.mean(self.added_ns), statistics.stdev(self.added_ns) / len(self.added_ns) ** 0.5


def load_sets(bcc: Any, per_program: bool = False) -> tuple[dict[str, Switch], list[Any]]:
    """Every set's objects loaded and their hot programs detached; also the probes to read and close.
    per_program: also every panel's program on each of the loop's tracepoints on its own."""
    kmalloc_class = import_memtop("probes.kmalloc", "KmallocProbe")
    alone = kmalloc_class(sample_every=1)
    no_slots = kmalloc_class(sample_every=1)
    no_slots.cpu_slot = False
    panels = panel_probes()
    probes: list[Any] = [alone, no_slots, *panels]
    objects: list[Any] = []
    try:
        for probe in probes:
            probe.start()
        if not alone.cpu_slot:
            raise BenchError(f"the kmalloc probe runs without its per-CPU slots: {alone.cpu_slot_off_reason}")
        minimal = bcc.BPF(text=MINIMAL_COUNTER_C.encode())
        objects.append(minimal)
        empty = bcc.BPF(text=EMPTY_RAW_C.encode())
        objects.append(empty)
        empty_four = bcc.BPF(text=EMPTY_FOUR_C.encode())
        objects.append(empty_four)
        empty_other_three = bcc.BPF(text=EMPTY_OTHER_THREE_C.encode())
        objects.append(empty_other_three)
        panel_objects = list({id(p.bpf): p.bpf for p in panels if p.bpf is not None}.values())
        for probe in panels:  # the sets switch the steady state's programs: see settle_leaks
            if hasattr(probe, "end_learning"):
                probe.end_learning()
        sets = {
            MINIMAL: Switch([minimal]),
            EMPTY_RAW: Switch([empty]),
            EMPTY_FOUR: Switch([empty_four]),
            KMALLOC: Switch([alone.bpf]),
            KMALLOC_NO_SLOTS: Switch([no_slots.bpf]),
            PANELS: Switch(panel_objects),
        }
        sets[KMALLOC_FLOOR] = Switch.joined(sets[KMALLOC], Switch([empty_other_three]))
        if per_program:
            for tp in sorted({entry[2] for entry in sets[PANELS].attached}):
                sets[f"{PANELS}: only {tp.decode()}"] = Switch.only(sets[PANELS], tp)
    except BaseException:
        for probe in reversed(probes):
            probe.close()
        for obj in objects:
            obj.cleanup()
        raise
    return sets, [*probes, *objects]


def settle_leaks(panels: Switch, probes: list[Any], limit_s: float = 30.0) -> tuple[int, int]:
    """Every panel on, with the loop running, until the kernel leak probe is in its steady state, then held
    there (harness.settle_kernel_leaks): returns (learning windows since the probe started, the 1-in-N it
    settled at). Runs before the reader thread starts."""
    panels.on()
    try:
        return settle_kernel_leaks(probes, limit_s)
    finally:
        panels.off()


def close_all(things: list[Any]) -> None:
    for thing in reversed(things):
        if hasattr(thing, "close"):
            thing.close()
        else:
            thing.cleanup()


def pin_apart() -> tuple[int, int]:
    """(the loop's CPU, this process's CPU): the last and the first this process may run on, and this
    process pinned to its own. Call it before any thread starts, so the reader stays off the loop's CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError("needs two CPUs: the loop on one, this process on another")
    loop_cpu, own_cpu = cpus[-1], cpus[0]
    os.sched_setaffinity(0, {own_cpu})
    return loop_cpu, own_cpu


def start_loop(
    binary: Path, target: Path, shared: Path, cpu: int, yields: bool = False
) -> subprocess.Popen[bytes]:
    """LOOP_C's loop, pinned to `cpu`, publishing to `shared` (yields: after every call)."""
    return subprocess.Popen(
        [str(binary), str(target), str(shared), *(["yield"] if yields else [])],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )


def stop_loops(counters: list[SharedCounter], procs: list[subprocess.Popen[bytes]]) -> None:
    """Tell the loops to stop (their shared word), and wait for them (killed after 10 s)."""
    for counter in counters:
        counter.stop()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(args: argparse.Namespace) -> int:
    bcc = import_memtop("probes.base", "import_bcc")()
    info = machine()
    loop_cpu, own_cpu = pin_apart()
    load_before = load_average()
    all_ids: set[int] = set()
    foreign: list[str] = []
    windows, leak_rate, unlearned = 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="memtop-attach-cost-") as tmp:
        binary = compile_c(Path(tmp), "listxattr_shared", LOOP_C)
        target = Path(tmp) / "target"
        target.write_bytes(b"")
        loops = 2 if args.switching else 1
        counters = [SharedCounter(Path(tmp) / f"shared{i}") for i in range(loops)]
        sets, things = load_sets(bcc, args.per_program)
        names = [UNTRACED, *sets]
        results = {name: SetResult(name, []) for name in names}
        probes = [t for t in things if hasattr(t, "read")]
        all_ids |= prog_ids(things)
        for name, switch in sets.items():
            results[name].tracepoints = switch.tracepoints
        reader = AllReader(probes)
        shared = [Path(tmp) / f"shared{i}" for i in range(loops)]
        procs = [start_loop(binary, target, path, loop_cpu, args.switching) for path in shared]

        def read_all() -> tuple[int, int]:
            values = [c.read() for c in counters]
            return sum(v[0] for v in values), sum(v[1] for v in values)

        try:
            read_all()
            windows, leak_rate = settle_leaks(sets[PANELS], probes)
            log(f"kernel leaks: {windows} learning window(s) since start; 1 in {leak_rate} tracked")
            learners = [p for p in probes if hasattr(p, "end_learning")]
            unlearned_before = sum(p.counters()["cache_unlearned"] for p in learners)
            reader.start()
            log(f"{loops} loop(s) on CPU {loop_cpu}, this process on CPU {own_cpu}; "
                f"{args.rotations} rotations of {len(names)} slices of {args.slice:g} s")  # fmt: skip
            foreign += foreign_attachments(WATCHED_TRACEPOINTS)
            for rotation in range(args.rotations):
                order = list(names)
                random.shuffle(order)
                slices: dict[str, float] = {}
                for name in order:
                    switch = sets.get(name)
                    if switch is not None:
                        switch.on()
                    try:
                        time.sleep(SETTLE_S)
                        i0, c0 = read_all()
                        time.sleep(args.slice)
                        i1, c1 = read_all()
                    finally:
                        if switch is not None:
                            switch.off()
                    if i1 > i0:
                        slices[name] = (c1 - c0) / (i1 - i0)
                if UNTRACED in slices:
                    for name, value in slices.items():
                        results[name].ns_per_iteration.append(value)
                        results[name].added_ns.append(value - slices[UNTRACED])
                if (rotation + 1) % 10 == 0:
                    log(f"rotation {rotation + 1}: " + ", ".join(
                        f"{name.split(' (')[0]} {num(results[name].median_added(), '.1f')}"
                        for name in names[1:]
                    ))  # fmt: skip
            foreign += foreign_attachments(WATCHED_TRACEPOINTS)
            reader.stop()
            reader.check()
            unlearned = sum(p.counters()["cache_unlearned"] for p in learners) - unlearned_before
        finally:
            stop_loops(counters, procs)
            reader.stop()
            close_all(things)
            for counter in counters:
                counter.close()
    check_unloaded(all_ids)
    print(result_table(results))
    print()
    print(goal_lines(results))
    print()
    if args.switching:
        print("Workload: two loops on one CPU, each yielding after every call (the slots' worst case).")
    print(f"Kernel leaks: 1 in {leak_rate} allocations tracked (the adaptive N it settled at with every "
          f"panel attached); {windows} learning window(s) from its start to the rotations, none during "
          f"them; {unlearned} sampled allocations from caches not learned during them.")  # fmt: skip
    print(machine_line(info))
    print(f"1-minute load average before: {load_before}.")
    print(f"bpftool: none of the {len(all_ids)} program IDs loaded for the sets remain loaded.")
    if foreign:
        print(f"WARNING: other tracers on the loop's tracepoints ({'; '.join(foreign_reasons(foreign))}): "
              "every slice carried them.")  # fmt: skip
    if args.json:
        doc = {
            "schema": "memtop.bench.attach_cost/1",
            "machine": info,
            "config": {
                "rotations": args.rotations,
                "slice_s": args.slice,
                "switching": args.switching,
                "per_program": args.per_program,
            },
            "sets": [asdict(r) for r in results.values()],
            "load_average_before": load_before,
            "foreign": foreign,
            "kernel_leaks": {
                "sample_every": leak_rate,
                "learning_windows": windows,
                "unlearned_during_rotations": unlearned,
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def prog_ids(things: list[Any]) -> set[int]:
    """The ids of every program the objects loaded (for the check that none is left)."""
    prog_info = import_memtop("probes.base", "_prog_info")
    ids = set()
    for thing in things:
        bpf = getattr(thing, "bpf", thing)
        for fn in list(getattr(bpf, "funcs", {}).values()):
            info = prog_info(fn.fd)
            if info is not None:
                ids.add(info.id)
    return ids


def result_table(results: dict[str, SetResult]) -> str:
    minimal = results[MINIMAL].median_added()
    rows = []
    for r in results.values():
        mean = r.mean_added()
        rows.append([
            r.name,
            ", ".join(r.tracepoints) or "–",
            str(len(r.ns_per_iteration)),
            num(statistics.median(r.ns_per_iteration), ".1f") if r.ns_per_iteration else "–",
            "–" if r.name == UNTRACED else num(r.median_added(), ".1f"),
            "–" if r.name == UNTRACED or mean is None else f"{mean[0]:.1f} ± {mean[1]:.1f}",
            "–" if r.name in (UNTRACED, MINIMAL) else num(ratio(r.median_added(), minimal), ".2f"),
        ])  # fmt: skip
    columns = (
        "programs on the loop's tracepoints",
        "attached to",
        "slices",
        "loop CPU ns/iteration, median",
        "added ns/iteration, median of paired differences",
        "added, mean ± standard error",
        "× minimal counter (medians)",
    )
    return markdown_table(columns, rows)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goal_lines(results: dict[str, SetResult]) -> str:
    minimal = results[MINIMAL].median_added()
    lines = []
    for name, goal in ((KMALLOC, 1.0), (PANELS, 2.0)):
        value = ratio(results[name].median_added(), minimal)
        verdict = "–" if value is None else ("met" if value <= goal else "not met")
        lines.append(
            f"- {name}: {num(value, '.2f')}x the minimal counter (issue #11's goal ≤ {goal:g}x): {verdict}"
        )
    floor = results[EMPTY_FOUR].median_added()
    panels = results[PANELS].median_added()
    above = None if floor is None or panels is None else panels - floor
    lines.append(
        f"- the dispatch floor (four empty raw programs) is {num(ratio(floor, minimal), '.2f')}x the minimal "
        f"counter; every panel's work above it {num(ratio(above, minimal), '.2f')}x"
    )
    lines.append(
        f"- the kmalloc counters with empty programs on the other three tracepoints (every panel, were leak "
        f"tracking's own work free): {num(ratio(results[KMALLOC_FLOOR].median_added(), minimal), '.2f')}x"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="attach_cost.py",
        description="What memtop's programs cost a listxattr loop, paired slice by slice against the loop "
        "untraced, with no run-time statistics. Needs root and two CPUs.",
    )
    parser.add_argument(
        "--rotations", type=int_in(2, 10_000), default=60, help="rotations of every set (default 60)"
    )
    parser.add_argument(
        "--slice",
        type=positive_float,
        default=0.2,
        help="seconds each set is attached per rotation (default 0.2)",
    )
    parser.add_argument(
        "--switching",
        action="store_true",
        help="the slots' worst case: two loops on the loop CPU, each yielding after every call, so that "
        "every kmalloc there is another process's than the last one",
    )
    parser.add_argument(
        "--per-program",
        action="store_true",
        help="also every panel's program on each of the loop's tracepoints on its own (where the cost is)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write every slice and the summary here"
    )
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("attach_cost.py", parse_args, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
