"""Where every panel's time goes: a cpu-clock profile of a listxattr loop's CPU, untraced and traced.

attach_cost.py says what every panel costs a user; this says where that time is spent. A listxattr loop (per
call a kmalloc, a kfree, a slab allocation and its free; attach_cost.py's loop) runs pinned to one CPU, and
`perf record -e cpu-clock` samples that CPU in windows of --seconds, round after round (--rounds), each round
one window in each state, in a shuffled order so that the VM's slow drifts hit all alike: nothing on the
loop's tracepoints; the minimal counter (issue #11's yardstick: a classic kmem:kmalloc program, one per-CPU
add); every panel's programs. Every panel is loaded and settled first (the kernel leak
probe's caches learned and its 1 in N fixed, as attach_cost.py holds it) and read once a second on another
CPU, as the app does; its programs elsewhere (interrupts, scheduler events) stay attached throughout.
cpu-clock is a timer, so it works on VMs without hardware counters; its samples land in BPF programs' JIT
images and in the kernel's dispatch like anywhere else. Each sample of the loop's process is put in one class:

- a memtop program's body (`bpf_prog_<tag>_<function>`), one class per program;
- the dispatch that runs any program on a tracepoint: for a raw tracepoint `bpf_trace_run<N>` and
  `__bpf_trace_<event>`, for a classic one the record it fills and its guard (`perf_trace_<event>`,
  `perf_trace_run_bpf_submit`, `trace_call_bpf`, `perf_swevent_*_recursion_context`);
- the kernel functions behind the helpers the programs call (hash maps, ids, the clock, stack capture);
- everything else: the loop's own work (its system call, the allocator). This grows too while programs are
  attached: a tracepoint's call site in the allocator, the RCU read lock around each program, and the
  loop's data that the programs' data pushed out of the caches are all counted here.

The table gives each class's share of the samples and, from the loop's iterations and CPU time over the
same windows, its ns per iteration. Run it on a quiet machine: the shares are within one state's windows,
but the ns follow the VM's speed.

    sudo .venv/bin/python bench/profile_programs.py [--rounds 3] [--seconds 4] [--frequency 4999]
                                                    [--json FILE]

Needs root, two CPUs and perf (Debian: linux-perf).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attach_cost import LOOP_C, SharedCounter, Switch, close_all, pin_apart, prog_ids, start_loop, stop_loops
from harness import (
    MINIMAL_COUNTER_C,
    AllReader,
    BenchError,
    check_unloaded,
    compile_c,
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

DISPATCH = "dispatch (raw: bpf_trace_run*, __bpf_trace_*; classic: perf_trace_*, trace_call_bpf)"
DISPATCH_PREFIXES = ("bpf_trace_run", "__bpf_trace_", "perf_trace_", "trace_call_bpf", "perf_swevent_")
HELPERS = "helpers the programs call (maps, ids, clock, stack capture)"
REST = "the loop's own work"
# The kernel functions behind the helpers memtop's programs call, by name or prefix (6.x names).
HELPER_SYMBOLS = frozenset(
    {
        *("__bpf_get_stackid", "bpf_get_stackid", "bpf_get_stackid_raw_tp", "get_perf_callchain"),
        *("perf_callchain_kernel", "__orc_find", "orc_find", "__unwind_start", "stack_access_ok"),
        *("__kernel_text_address", "kernel_text_address", "is_bpf_text_address", "bpf_ksym_find"),
        *("bpf_ktime_get_ns", "bpf_user_rnd_u32", "alloc_htab_elem", "lookup_nulls_elem_raw"),
        *("lookup_elem_raw", "pcpu_freelist_pop", "pcpu_freelist_push", "__pcpu_freelist_push"),
        *("___pcpu_freelist_pop", "bpf_probe_read_kernel_str", "bpf_ringbuf_output"),
    }
)
HELPER_PREFIXES = ("htab_", "__htab_", "bpf_get_current_", "unwind_")
PROGRAM = re.compile(r"^bpf_prog_[0-9a-f]{16}_(?:raw_tracepoint__|tracepoint__)?(.+)$")
LOOP_NAME = "listxattr_loop"


def symbol_class(symbol: str) -> str:
    """The class of one sample's symbol (see the module docstring)."""
    match = PROGRAM.match(symbol)
    if match:
        return f"program: {match.group(1)}"
    if symbol.startswith(DISPATCH_PREFIXES):
        return DISPATCH
    if symbol in HELPER_SYMBOLS or symbol.startswith(HELPER_PREFIXES):
        return HELPERS
    return REST


def symbol_counts(script_output: str, comm: str) -> collections.Counter[str]:
    """Sample counts per symbol from `perf script -F comm,ip,sym` lines, only the process named `comm`."""
    counts: collections.Counter[str] = collections.Counter()
    for line in script_output.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != comm[:15]:
            continue
        counts[fields[2] if len(fields) > 2 else "[unknown]"] += 1
    return counts


@dataclass
class Window:
    """The profiled windows of the loop in one state, summed."""

    name: str
    symbols: dict[str, int] = field(default_factory=dict)  # samples per symbol
    iterations: int = 0
    cpu_ns: int = 0

    @property
    def samples(self) -> dict[str, int]:
        """Samples per class (symbol_class)."""
        counts: collections.Counter[str] = collections.Counter()
        for symbol, n in self.symbols.items():
            counts[symbol_class(symbol)] += n
        return dict(counts)

    @property
    def ns_per_iteration(self) -> float | None:
        return self.cpu_ns / self.iterations if self.iterations else None

    def share(self, cls: str) -> float | None:
        total = sum(self.samples.values())
        return self.samples.get(cls, 0) / total if total else None

    def ns(self, cls: str) -> float | None:
        share, per = self.share(cls), self.ns_per_iteration
        return share * per if share is not None and per is not None else None


def profile(window: Window, cpu: int, counter: SharedCounter, args: argparse.Namespace, tmp: Path) -> None:
    """One window of --seconds, added to `window`."""
    data = tmp / "window.data"
    i0, c0 = counter.read()
    subprocess.run(
        ["perf", "record", "-q", "-e", "cpu-clock", "-C", str(cpu), "-F", str(args.frequency)]
        + ["-o", str(data), "--", "sleep", str(args.seconds)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    i1, c1 = counter.read()
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,ip,sym"], capture_output=True, text=True, check=True
    ).stdout
    samples = symbol_counts(script, LOOP_NAME)
    window.symbols = dict(collections.Counter(window.symbols) + samples)
    window.iterations += i1 - i0
    window.cpu_ns += c1 - c0
    per = num((c1 - c0) / (i1 - i0) if i1 > i0 else None, ".1f")
    log(f"{window.name}: {sum(samples.values()):,} samples, {per} ns/iteration")


def percent(window: Window, cls: str) -> str:
    share = window.share(cls)
    return num(None if share is None else 100 * share, ".1f")


def result_table(untraced: Window, traced: list[Window]) -> str:
    """Per class: its share of each state's samples, and its ns per iteration added to the untraced loop's."""
    main = traced[-1]
    classes = sorted(
        {c for w in (untraced, *traced) for c in w.samples},
        key=lambda c: (c == REST, c == HELPERS, c == DISPATCH, -(main.samples.get(c, 0))),
    )
    rows = [
        [
            cls,
            percent(untraced, cls),
            *(cell for w in traced for cell in (percent(w, cls), added_ns(untraced, w, cls))),
        ]
        for cls in classes
    ]
    rows.append(
        [
            f"all: the loop's CPU ns per iteration (untraced {num(untraced.ns_per_iteration, '.1f')})",
            "100",
            *(
                cell
                for w in traced
                for cell in ("100", num(added(untraced.ns_per_iteration, w.ns_per_iteration), ".1f"))
            ),
        ]
    )
    columns = (
        "samples of the loop's CPU",
        "untraced, %",
        *(column for w in traced for column in (f"{w.name}, %", f"{w.name}, added ns/iteration")),
    )
    return markdown_table(columns, rows)


def added_ns(untraced: Window, window: Window, cls: str) -> str:
    return num(added(untraced.ns(cls), window.ns(cls)), ".1f")


def added(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def measure(args: argparse.Namespace) -> int:
    if shutil.which("perf") is None:
        raise BenchError("needs perf (Debian: apt install linux-perf)")
    bcc = import_memtop("probes.base", "import_bcc")()
    info = machine()
    loop_cpu, _own_cpu = pin_apart()
    load_before = load_average()
    ids: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="memtop-profile-") as name:
        tmp = Path(name)
        binary = compile_c(tmp, LOOP_NAME, LOOP_C)
        (tmp / "target").write_bytes(b"")
        counter = SharedCounter(tmp / "shared")
        loop = start_loop(binary, tmp / "target", tmp / "shared", loop_cpu)
        probes: list[Any] = []
        things: list[Any] = []  # other BPF objects
        reader: AllReader | None = None
        untraced, minimal, panels = Window("untraced"), Window("minimal counter"), Window("every panel")
        try:
            counter.read()
            probes = panel_probes()
            for probe in probes:
                probe.start()
            minimal_bpf = bcc.BPF(text=MINIMAL_COUNTER_C.encode())
            things.append(minimal_bpf)
            ids = prog_ids([*probes, *things])
            windows, rate = settle_kernel_leaks(probes)
            ids |= prog_ids(probes)  # the cache learner's program too (loaded for its windows)
            log(f"kernel leaks: {windows} learning window(s); 1 in {rate} tracked")
            switches = {
                id(panels): Switch(list({id(p.bpf): p.bpf for p in probes if p.bpf is not None}.values())),
                id(minimal): Switch([minimal_bpf]),
            }
            reader = AllReader(probes)
            reader.start()
            states = [untraced, minimal, panels]
            for _round in range(args.rounds):
                random.shuffle(states)
                for window in states:
                    switch = switches.get(id(window))
                    if switch is not None:
                        switch.on()
                    try:
                        profile(window, loop_cpu, counter, args, tmp)
                    finally:
                        if switch is not None:
                            switch.off()
            reader.stop()
            reader.check()
        finally:
            stop_loops([counter], [loop])
            if reader is not None:
                reader.stop()
            close_all([*probes, *things])
            counter.close()
    check_unloaded(ids)
    print(result_table(untraced, [minimal, panels]))
    print()
    print(
        f"perf record -e cpu-clock -F {args.frequency} on CPU {loop_cpu}: {args.rounds} rounds of a "
        f"window of {args.seconds:g} s per state; the kernel leak probe tracked 1 in {rate} allocations, "
        "held."
    )
    print(machine_line(info))
    print(f"1-minute load average before: {load_before}.")
    print(f"bpftool: none of the {len(ids)} program IDs loaded remain loaded.")
    if args.json:
        doc = {
            "schema": "memtop.bench.profile_programs/1",
            "machine": info,
            "config": {"rounds": args.rounds, "seconds": args.seconds, "frequency": args.frequency},
            "windows": [asdict(untraced), asdict(minimal), asdict(panels)],
            "load_average_before": load_before,
            "kernel_leaks": {"sample_every": rate, "learning_windows": windows},
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="profile_programs.py",
        description="Where every panel's time goes: a cpu-clock profile of a listxattr loop's CPU, "
        "untraced, under the minimal counter and with every panel attached. Needs root, two CPUs and perf.",
    )
    parser.add_argument(
        "--rounds", type=int_in(1, 1000), default=3, help="rounds of one window per state (default 3)"
    )
    parser.add_argument(
        "--seconds", type=positive_float, default=4.0, help="length of each profiled window (default 4)"
    )
    parser.add_argument(
        "--frequency", type=int_in(100, 20_000), default=4999, help="samples per second (default 4999)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the sample counts here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return main_wrapper("profile_programs.py", parse_args, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
