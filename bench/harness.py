"""What every memtop benchmark shares: workloads, the kernel's BPF accounting, attachment checks, tables.

The scripts in bench/ import it as a sibling module (`import harness`); it imports nothing from memtop, so
`--help` and the root check work without BCC. The API, in the order a benchmark uses it:

- `main_wrapper(name, parse_args, bench)`: runs `bench(args)` as a script: root and bpftool checks, SIGTERM
  unwinds like Ctrl-C (so probes are closed), `BenchError` and memtop's `MemtopError` become one line.
- `MINIMAL_COUNTER_C`: the yardstick of issue #11 (a classic kmem:kmalloc program, one per-CPU add).
- `compile_c(workdir, name, source)` -> binary path (gcc -O2); `build_workload(workdir)` -> the listxattr
  loop (`Workload`: one kmalloc and one kfree per iteration on 6.18).
- `start_process(argv)` / `finish_workload(proc, seconds)` -> (count, elapsed s) of a program printing
  "<count> <seconds>"; `run_workload(workload, seconds)` does both for the listxattr loop.
- `RunTimeStats()` (a `with` block: the kernel's run_time_ns/run_cnt accounting on), `maybe_stats(on)`.
- `attached_programs(pid)` -> {prog id: (tracepoint, fd_type)}: a process's programs with their kind.
- `own_prog_ids(required)` -> {tracepoint: prog id} of this process's tracepoint programs (perf
  attachments, so raw tracepoints are included under their tracepoint name);
  `prog_stats(ids)` -> {id: ProgStats(run_time_ns, run_cnt, recursion_misses)}; `stat_delta(...)`.
- `foreign_attachments(watched, own_pids)` -> other processes' programs on the watched tracepoints, which
  skew every mode; `retry_while_foreign(run_once, attempts)` reruns a run that saw some.
- `PeriodicReader(probe)`: calls probe.read() every second on a thread, as the app's collector does;
  `AllReader(probes)` reads each running probe of a list so; `panel_probes()`: every panel's probes, as
  LiveSource builds them; `settle_kernel_leaks(probes)` holds their kernel leak probe in its steady state.
- `markdown_table(columns, rows)`, `num(value, fmt)`, `machine()`, `machine_line(info)`, `log(message)`.
- `check_unloaded(ids)`: raises when any of a run's program ids is still loaded.
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
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
READ_INTERVAL_S = 1.0  # how often the app reads the probes' maps
DEFAULT_ATTEMPTS = 3  # of a run during which another tracer was attached to the measured tracepoints
RETRY_WAIT_S = 5.0
STATS_ELSEWHERE = "BPF run-time stats on (kernel.bpf_stats_enabled=1 or another BPF_ENABLE_STATS)"
REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A failure worth one line on the terminal."""


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the tables."""
    print(message, file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def import_memtop(module: str, name: str) -> Any:
    """`from memtop.<module> import <name>`: the memtop Python finds (PYTHONPATH can point at another
    checkout, to compare), else this repository's."""
    import importlib

    try:
        return getattr(importlib.import_module(f"memtop.{module}"), name)
    except ImportError:
        if str(REPO) in sys.path:
            raise
        sys.path.insert(0, str(REPO))
    try:
        return getattr(importlib.import_module(f"memtop.{module}"), name)
    except ImportError as exc:
        raise BenchError(f"cannot import memtop ({exc}): run with .venv/bin/python") from None


# -- workloads -----------------------------------------------------------------------------------------

LISTXATTR_LOOP_C = r"""
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


def compile_c(workdir: Path, name: str, source: str) -> Path:
    """Build `source` with gcc -O2 -Wall into workdir/name; BenchError when gcc is missing or fails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found (apt install gcc)")
    src, binary = workdir / f"{name}.c", workdir / name
    src.write_text(source)
    proc = subprocess.run([gcc, "-O2", "-Wall", "-o", str(binary), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"gcc failed to build {name}: {last_line(proc.stderr)}")
    return binary


@dataclass(frozen=True)
class Workload:
    binary: Path
    target: Path  # the file whose xattrs are listed

    def argv(self, seconds: float) -> list[str]:
        return [str(self.binary), str(self.target), repr(seconds)]


def build_workload(workdir: Path) -> Workload:
    """Compile the listxattr loop into `workdir` and create the (empty) file it lists."""
    target = workdir / "target"
    target.write_bytes(b"")
    return Workload(compile_c(workdir, "listxattr_loop", LISTXATTR_LOOP_C), target)


def start_process(argv: Sequence[str], stdin: bool = False) -> subprocess.Popen[str]:
    """A workload child with piped stdout/stderr (and stdin when asked), in text mode."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_workload(workload: Workload, seconds: float) -> subprocess.Popen[str]:
    return start_process(workload.argv(seconds))


def finish_workload(proc: subprocess.Popen[str], seconds: float) -> tuple[int, float]:
    """Wait for a workload printing "<count> <seconds>"; (count, elapsed seconds) as it measured them."""
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise BenchError(f"workload exited with {proc.returncode}: {last_line(err)}")
    try:
        count, elapsed = out.split()[-2:]
        return int(count), float(elapsed)
    except ValueError:
        raise BenchError(f"workload printed {out!r}, expected '<count> <seconds>'") from None


def run_workload(workload: Workload, seconds: float) -> tuple[int, float]:
    return finish_workload(start_workload(workload, seconds), seconds)


# -- bpftool and the kernel's BPF accounting -------------------------------------------------------------


def bpftool_json(*args: str) -> Any:
    proc = subprocess.run(["bpftool", *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"bpftool {' '.join(args)} failed: {last_line(proc.stderr or proc.stdout)}")
    return json.loads(proc.stdout or "null")


def loaded_prog_ids() -> set[int]:
    return {int(p["id"]) for p in bpftool_json("prog", "show") or []}


def perf_attachments() -> list[dict[str, Any]]:
    """`bpftool perf list`: pid, fd, prog_id, fd_type (tracepoint, raw_tracepoint, uprobe...) and the
    tracepoint's event name (no category) for both kinds of tracepoint."""
    return list(bpftool_json("perf", "list") or [])


def tracepoint_attachments() -> list[dict[str, Any]]:
    """Every program attached to a tracepoint, classic or raw, with its event name under "tracepoint"."""
    return [a for a in perf_attachments() if a.get("fd_type") in ("tracepoint", "raw_tracepoint")]


@dataclass(frozen=True)
class ProgStats:
    run_time_ns: int  # 0 unless the run-time accounting is on
    run_cnt: int
    recursion_misses: int  # runs the kernel skipped (always counted)


def prog_stats(ids: Iterable[int]) -> dict[int, ProgStats]:
    """The given programs' ProgStats, from one `bpftool prog show --json`; BenchError when one is gone."""
    wanted = set(ids)
    stats = {}
    for prog in bpftool_json("prog", "show") or []:
        if int(prog["id"]) in wanted:
            stats[int(prog["id"])] = ProgStats(
                int(prog.get("run_time_ns", 0)),
                int(prog.get("run_cnt", 0)),
                int(prog.get("recursion_misses", 0)),
            )
    missing = wanted - stats.keys()
    if missing:
        raise BenchError(f"bpftool does not list the programs {sorted(missing)}")
    return stats


def stat_delta(before: dict[int, ProgStats], after: dict[int, ProgStats], ids: Iterable[int]) -> ProgStats:
    """The sum over `ids` of after - before."""
    ids = list(ids)
    return ProgStats(
        sum(after[i].run_time_ns - before[i].run_time_ns for i in ids),
        sum(after[i].run_cnt - before[i].run_cnt for i in ids),
        sum(after[i].recursion_misses - before[i].recursion_misses for i in ids),
    )


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


@contextlib.contextmanager
def maybe_stats(on: bool) -> Iterator[None]:
    """RunTimeStats when `on`, nothing otherwise."""
    if on:
        with RunTimeStats():
            yield
    else:
        yield


def prog_ids_of(pid: int) -> dict[str, list[int]]:
    """A process's tracepoint programs (classic and raw) by tracepoint name; several per name possible."""
    out: dict[str, list[int]] = {}
    for a in tracepoint_attachments():
        if a.get("pid") == pid:
            out.setdefault(str(a["tracepoint"]), []).append(int(a["prog_id"]))
    return out


def attached_programs(pid: int) -> dict[int, tuple[str, str]]:
    """A process's tracepoint programs: {prog id: (tracepoint name, "tracepoint" or "raw_tracepoint")}."""
    return {
        int(a["prog_id"]): (str(a["tracepoint"]), str(a["fd_type"]))
        for a in tracepoint_attachments()
        if a.get("pid") == pid
    }


def own_prog_ids(required: str = "kmalloc") -> dict[str, int]:
    """This process's programs by tracepoint name (one each), from `bpftool perf list`; `required` must
    be one of them.

    bpftool's `prog show` names are unreliable to match: BCC drops the `tracepoint__` prefix of names
    longer than the kernel's 15 characters, and the kernel truncates the rest. The perf attachments,
    filtered by our pid, name the tracepoint itself, and other tracers' programs are ignored.
    """
    ids = {name: progs[0] for name, progs in prog_ids_of(os.getpid()).items()}
    if required not in ids:
        raise BenchError(f"no BPF program of this process is attached to {required} (bpftool saw {ids})")
    return ids


def foreign_attachments(watched: Iterable[str], own_pids: Iterable[int] = ()) -> list[str]:
    """Other processes' BPF programs on the watched tracepoints (and an enabled ftrace kmem:kmalloc):
    they would skew every mode. This process and `own_pids` are ours."""
    watched, ours = set(watched), {os.getpid(), *own_pids}
    by_pid: dict[Any, set[str]] = {}
    for a in tracepoint_attachments():
        if a.get("pid") not in ours and a.get("tracepoint") in watched:
            by_pid.setdefault(a.get("pid"), set()).add(str(a.get("tracepoint")))
    found = [f"pid {p} on {','.join(sorted(tps))}" for p, tps in sorted(by_pid.items(), key=str)]
    if "kmalloc" in watched:
        try:
            if Path("/sys/kernel/tracing/events/kmem/kmalloc/enable").read_text().strip() not in ("0", ""):
                found.append("the ftrace event kmem:kmalloc is enabled")
        except OSError:
            pass
    return found


def foreign_reasons(foreign: Iterable[str]) -> list[str]:
    """The distinct causes of a list of foreign_attachments() lines (pids without their tracepoints)."""
    return sorted({f.split(" on ")[0] if f.startswith("pid ") else f for f in foreign})


class HasForeign(Protocol):
    foreign: list[str]


def retry_while_foreign(run_once: Callable[[], Any], attempts: int, describe: Callable[[Any], str]) -> Any:
    """run_once() until its result's `.foreign` is empty or `attempts` are used up, RETRY_WAIT_S apart;
    logs describe(result) for each try. Returns the last result (with `.attempt` set when it has one)."""
    for attempt in range(1, attempts + 1):
        result = run_once()
        if hasattr(result, "attempt"):
            result.attempt = attempt
        log(describe(result))
        if not result.foreign or attempt == attempts:
            return result
        log(f"  other tracers ({'; '.join(result.foreign)}): again in {RETRY_WAIT_S:g} s")
        time.sleep(RETRY_WAIT_S)
    raise AssertionError("attempts must be at least 1")


def check_unloaded(ids: set[int], failed: bool = False) -> None:
    """After the runs: BenchError if any of `ids` is still loaded. With failed=True (called while another
    exception unwinds) it only logs, best effort."""
    if not ids:
        return
    try:
        leftover = loaded_prog_ids() & ids
    except BenchError:
        if failed:
            return
        raise
    if leftover and failed:
        log(f"probe programs still loaded after the failure: {sorted(leftover)}")
    elif leftover:
        raise BenchError(f"probe programs still loaded after close(): {sorted(leftover)}")


# -- the reader thread (the app's refresh tick) -----------------------------------------------------------


class PeriodicReader(threading.Thread):
    """Calls probe.read() every `interval` seconds, like memtop's collector worker; `reads` counts them,
    `read_seconds` times each (the probe's user-space cost), `error` keeps what a read raised."""

    def __init__(self, probe: Any, interval: float = READ_INTERVAL_S) -> None:
        super().__init__(name="probe-reader", daemon=True)
        self.probe = probe
        self.interval = interval
        self.stopped = threading.Event()
        self.reads = 0
        self.read_seconds: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.interval):
                started = time.perf_counter()
                self.probe.read()
                self.read_seconds.append(time.perf_counter() - started)
                self.reads += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join()

    def check(self) -> None:
        if self.error is not None:
            raise BenchError(f"probe.read() failed on the reader thread: {self.error}")


def panel_probes() -> list[Any]:
    """memtop's live-mode probes as LiveSource builds them: kmalloc (with the kernel leak tracking
    compiled in where the probe supports it), oom, tcp, kernel leaks (adaptive sampling)."""
    kmalloc_probe = import_memtop("probes.kmalloc", "KmallocProbe")
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


def settle_kernel_leaks(probes: list[Any], limit_s: float = 30.0) -> tuple[int, int]:
    """With every panel attached and the workload running, read the probes once a second (as the app's
    tick does) until the kernel leak probe is in its steady state, then hold it there; returns (learning
    windows since the probe started, the 1-in-N it settled at). Call it before any reader thread starts.

    - The slab caches' sizes: it learns them with a classic program that it attaches for a window while a
      sampled allocation's cache is unknown; here it learns the workload's caches, then no new window may
      start (hold_learning: a window would put the classic program in the measurement).
    - Its adaptive 1-in-N follows the allocation rate it counts; the N it settles at while attached all
      along, as it is for a user, is fixed from then on (a benchmark that attaches it only part of the
      time would otherwise see it track more allocations than it does for a user)."""
    learners = [p for p in probes if hasattr(p, "end_learning")]
    deadline = time.monotonic() + limit_s
    rates: list[tuple[int, ...]] = []
    while time.monotonic() < deadline:
        time.sleep(1.0)
        for probe in probes:
            if probe.running:
                probe.read()
        rates.append(tuple(p.sample_rate for p in learners))
        settled = len(rates) >= 5 and len(set(rates[-3:])) == 1
        if settled and not any(p.learning for p in learners):
            break
    else:
        log(f"kernel leaks: not settled after {limit_s:g} s (1 in N: {rates[-3:]}); holding it as it is")
    for probe in learners:
        probe.hold_learning = True
        probe.end_learning()
        probe.sampler = None  # the N it settled at, fixed
    rate = max((p.sample_rate for p in learners), default=0)
    return sum(p.learning_windows for p in learners), rate


class AllReader(PeriodicReader):
    """Reads every probe once a second, as the app's tick does."""

    def __init__(self, probes: list[Any]) -> None:
        self.probes = probes
        super().__init__(self)

    def read(self) -> None:
        for probe in self.probes:
            if probe.running:
                probe.read()


# -- output ----------------------------------------------------------------------------------------------


def num(value: float | None, fmt: str = ",.0f") -> str:
    """A table cell: `value` formatted, or an en dash for none."""
    return "–" if value is None else format(value, fmt)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """A Markdown table; the first `left` columns are left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * left + "---:|" * (len(columns) - left)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
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


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# -- arguments and main -----------------------------------------------------------------------------------


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return value

    return parse


def add_common_args(parser: argparse.ArgumentParser, rounds: int = 5) -> None:
    """--seconds, --rounds, --attempts and --json, as every benchmark takes them."""
    parser.add_argument("--seconds", type=positive_float, default=3.0, help="length of each run (default 3)")
    parser.add_argument(
        "--rounds", type=int_in(1, 1000), default=rounds, help=f"runs of each mode (default {rounds})"
    )
    parser.add_argument(
        "--attempts",
        type=int_in(1, 10),
        default=DEFAULT_ATTEMPTS,
        help="tries per run while other tracers are attached to the same tracepoints "
        f"(default {DEFAULT_ATTEMPTS})",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the summary here")


def main_wrapper(
    name: str, parse_args: Callable[[list[str] | None], argparse.Namespace], bench: Callable[[Any], int],
    argv: list[str] | None = None,
) -> int:  # fmt: skip
    """The script's exit code: checks root and bpftool, makes SIGTERM unwind like Ctrl-C (so the probes
    are closed), and turns BenchError and memtop's MemtopError into one line on stderr."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(f"{name}: needs root (it loads BPF programs): sudo make bench", file=sys.stderr)
        return 1
    if shutil.which("bpftool") is None:
        print(f"{name}: bpftool not found (apt install bpftool, or sudo make setup)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    try:
        return bench(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__name__ == "MemtopError":  # memtop's one-line errors (probe failed to load, ...)
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        raise
