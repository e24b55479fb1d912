#!/usr/bin/env python3
"""memtop's TUI on a busy host, with htop measured in the same run as the peer.

For each process count N (default 300, 1000, 3000, 5000): N processes that each make one kmalloc every
500 ms (tests/data/busy_children.c), then, one after the other, memtop's TUI and htop in a real
pseudo-terminal of 200x50 at a 1 s interval. For each it reports:

- CPU: its user+system time over the window (/proc/PID/stat), as % of one core;
- key to screen: memtop, a sort key pressed until the header shows the new sort mark ("CALLS/s ▼");
  htop, a sort key pressed until its first output after the key (median and p95);
- its own kmalloc rate (bytes/s and calls/s), counted by memtop's kmalloc probe loaded in this process;
- start to first row (launch until the first process row is drawn) and quit to prompt (q until the
  process has exited), and for memtop that none of its BPF programs is left loaded.

`--soak SECONDS`: memtop's RSS and CPU (per 5-minute window) over a long run with N processes of which 10 %
are replaced every minute
(the issue's one-hour check is `--soak 3600`; `--quick` makes everything short for development).

    sudo .venv/bin/python bench/ui_bench.py [--counts 300,1000] [--window 20] [--soak 3600] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness

NAME = "ui_bench"
BUSY_SOURCE = harness.REPO / "tests" / "data" / "busy_children.c"
COLUMNS, LINES = 200, 50
CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMTOP_FIRST_ROW = b" processes over "  # the header's second line, drawn with the first snapshot
MEMTOP_SORT_MARKS = (b"CALLS/s \xe2\x96\xbc", b"KMALLOC/s \xe2\x96\xbc")  # "▼" after the sorted column
MEMTOP_SORT_KEYS = (b"6", b"5")


@dataclass
class Result:
    tool: str
    processes: int
    cpu_pct: float
    key_median_ms: float | None
    key_p95_ms: float | None
    kmalloc_bytes_per_s: float | None
    kmalloc_calls_per_s: float | None
    start_to_first_row_s: float | None
    quit_to_prompt_s: float | None
    programs_left: int = 0
    notes: list[str] = field(default_factory=list)


# -- a program in a pseudo-terminal --------------------------------------------------------------------------


class Terminal:
    """A child process on a pty of COLUMNS x LINES; its output is collected by a reader thread."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "TERM": "xterm-256color", **(env or {})},
            start_new_session=True,
            cwd=harness.REPO,
        )
        os.close(slave)
        self.output = bytearray()
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.5)
                if not ready:
                    if self.proc.poll() is not None:
                        return
                    continue
                chunk = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            with self.changed:
                self.output.extend(chunk)
                self.changed.notify_all()

    def wait_for(self, marker: bytes, since: int = 0, timeout: float = 60.0) -> float | None:
        """Seconds until `marker` appears in the output after byte `since` (None: timed out)."""
        start = time.monotonic()
        with self.changed:
            while self.output.find(marker, since) < 0:
                left = timeout - (time.monotonic() - start)
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.changed.wait(left)
        return time.monotonic() - start

    def wait_for_any_output(self, since: int, timeout: float = 10.0) -> float | None:
        start = time.monotonic()
        with self.changed:
            while len(self.output) <= since:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    return None
                self.changed.wait(left)
        return time.monotonic() - start

    def press(self, key: bytes) -> int:
        """Send `key`; the output offset before it (to look for its effect after)."""
        with self.changed:
            offset = len(self.output)
        os.write(self.master, key)
        return offset

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)

    def quit(self, key: bytes = b"q", timeout: float = 30.0) -> float | None:
        start = time.monotonic()
        os.write(self.master, key)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.master)


# -- the host's load ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def busy_processes(workdir: Path, count: int, groups: int = 1) -> Iterator[list[subprocess.Popen[str]]]:
    """`count` processes in `groups` groups (each a parent and its children), each process one kmalloc
    every 500 ms; killed (with their children) on exit."""
    binary = harness.compile_c(workdir, "busy_children", BUSY_SOURCE.read_text())
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(groups):
            size = count // groups + (1 if i < count % groups else 0)
            procs.append(start_group(binary, size))
        yield procs
    finally:
        for proc in procs:
            stop_group(proc)


def start_group(binary: Path, size: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([str(binary), str(max(size - 1, 0)), "500"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith("ready"):
        raise harness.BenchError("busy_children did not start (fork limit?)")
    return proc


def stop_group(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
    proc.wait()


# -- measuring --------------------------------------------------------------------------------


class KmallocMeter:
    """Kmalloc bytes and calls of given PIDs over a window, from memtop's kmalloc probe in this process."""

    def __init__(self) -> None:
        probe_class = harness.import_memtop("probes.kmalloc", "KmallocProbe")
        self.probe = probe_class()
        self.probe.start()

    def totals(self, pid: int) -> tuple[int, int]:
        counters = self.probe.read().per_tgid.get(pid)
        return (counters.bytes_alloc, counters.calls) if counters else (0, 0)

    def close(self) -> None:
        self.probe.close()


def measure(
    tool: str, term: Terminal, count: int, window: float, meter: KmallocMeter, presses: int, first_row: float
) -> Result:
    pid = term.proc.pid
    time.sleep(3.0)  # past start-up (compiling, first scans)
    bytes0, calls0 = meter.totals(pid)
    cpu0, t0 = term.cpu_seconds(), time.monotonic()
    latencies: list[float] = []
    spacing = window / max(presses, 1)
    deadline = t0 + window
    i = 0
    while time.monotonic() < deadline and i < presses:
        time.sleep(spacing * 0.5)
        if tool == "memtop":
            key, mark = MEMTOP_SORT_KEYS[i % 2], MEMTOP_SORT_MARKS[i % 2]
            offset = term.press(key)
            took = term.wait_for(mark, since=offset, timeout=10.0)
        else:
            offset = term.press(b"M" if i % 2 == 0 else b"P")  # htop: sort by MEM%, by CPU%
            took = term.wait_for_any_output(offset, timeout=10.0)
        if took is not None:
            latencies.append(took)
        i += 1
        time.sleep(max(0.0, spacing * 0.5 - (took or 0.0)))
    time.sleep(max(0.0, deadline - time.monotonic()))
    cpu1, t1 = term.cpu_seconds(), time.monotonic()
    bytes1, calls1 = meter.totals(pid)
    elapsed = t1 - t0
    lat = sorted(latencies)
    return Result(
        tool=tool,
        processes=count,
        cpu_pct=100.0 * (cpu1 - cpu0) / elapsed,
        key_median_ms=1000 * statistics.median(lat) if lat else None,
        key_p95_ms=1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        kmalloc_bytes_per_s=(bytes1 - bytes0) / elapsed,
        kmalloc_calls_per_s=(calls1 - calls0) / elapsed,
        start_to_first_row_s=first_row,
        quit_to_prompt_s=None,
        notes=[f"{len(lat)}/{i} key presses seen"],
    )


def memtop_prog_ids(pid: int) -> set[int]:
    return {i for ids in harness.prog_ids_of(pid).values() for i in ids}


def run_memtop(count: int, window: float, meter: KmallocMeter, presses: int) -> Result:
    term = Terminal([sys.executable, "-m", "memtop", "--interval", "1"])
    try:
        first_row = term.wait_for(MEMTOP_FIRST_ROW, timeout=60.0)
        if first_row is None:
            raise harness.BenchError("memtop drew no process row within 60 s")
        # Its probes attach in the background: wait for them before measuring.
        for _ in range(600):
            if memtop_prog_ids(term.proc.pid):
                break
            time.sleep(0.1)
        time.sleep(2.0)
        result = measure("memtop", term, count, window, meter, presses, first_row)
        ids = memtop_prog_ids(term.proc.pid)
        result.quit_to_prompt_s = term.quit()
        left = ids & harness.loaded_prog_ids() if ids else set()
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left &= harness.loaded_prog_ids()
        result.programs_left = len(left)
        return result
    finally:
        term.close()


def run_htop(count: int, window: float, meter: KmallocMeter, presses: int) -> Result | None:
    htop = "/usr/bin/htop"
    if not Path(htop).exists():
        harness.log("htop not installed (apt install htop): no peer column")
        return None
    with tempfile.TemporaryDirectory() as home:  # a fresh htoprc: default columns and settings
        term = Terminal([htop, "-d", "10"], env={"HOME": home, "XDG_CONFIG_HOME": home})
        try:
            first_row = term.wait_for(b"PID", timeout=30.0)
            result = measure("htop", term, count, window, meter, presses, first_row or 0.0)
            result.quit_to_prompt_s = term.quit()
            return result
        finally:
            term.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def soak_terminal(tool: str) -> Iterator[Terminal]:
    """memtop's TUI, or htop with default settings, at a 1 s interval, once it shows its first rows."""
    with tempfile.TemporaryDirectory() as home:
        if tool == "htop":
            term = Terminal(["/usr/bin/htop", "-d", "10"], env={"HOME": home, "XDG_CONFIG_HOME": home})
            first = b"PID"
        else:
            term = Terminal([sys.executable, "-m", "memtop", "--interval", "1"])
            first = MEMTOP_FIRST_ROW
        try:
            if term.wait_for(first, timeout=60.0) is None:
                raise harness.BenchError(f"{tool} drew no process row within 60 s")
            yield term
        finally:
            term.close()


def soak(
    workdir: Path, count: int, seconds: float, replace_every: float, tool: str = "memtop"
) -> dict[str, Any]:
    """`tool`'s (memtop's, or htop's as the peer) RSS and CPU over `seconds` with `count` processes, a tenth
    of them replaced every `replace_every`: samples of (seconds since the first row, RSS bytes, CPU seconds
    used so far), and the CPU per 5-minute window (a cost that grows with the run shows there, not in the
    short runs)."""
    groups = 10
    samples: list[tuple[float, int, float]] = []
    with busy_processes(workdir, count, groups=groups) as procs:
        binary = workdir / "busy_children"
        with soak_terminal(tool) as term:
            start = time.monotonic()
            next_replace = start + replace_every
            victim = 0
            while (now := time.monotonic()) - start < seconds:
                samples.append((now - start, rss_bytes(term.proc.pid), term.cpu_seconds()))
                if now >= next_replace:
                    stop_group(procs[victim])
                    procs[victim] = start_group(binary, count // groups)
                    victim = (victim + 1) % groups
                    next_replace += replace_every
                time.sleep(min(10.0, max(1.0, seconds / 60)))
            term.quit()
    five_min = min(300.0, seconds / 2)
    after = [rss for t, rss, _cpu in samples if t >= five_min]
    return {
        "tool": tool,
        "processes": count,
        "seconds": seconds,
        "replaced_every_s": replace_every,
        "rss_at_start_bytes": samples[0][1] if samples else None,
        "rss_at_settle_bytes": after[0] if after else None,
        "rss_at_end_bytes": samples[-1][1] if samples else None,
        "growth_after_settle_bytes": (max(after) - after[0]) if after else None,
        "settle_s": five_min,
        "cpu_pct_windows": cpu_windows(samples, five_min),
        "samples": samples,
    }


def cpu_windows(samples: list[tuple[float, int, float]], window: float) -> list[tuple[float, float]]:
    """(window start s, memtop CPU % of one core over it) for each whole `window` of the samples."""
    out: list[tuple[float, float]] = []
    begin = 0
    for i, (t, _rss, cpu) in enumerate(samples):
        t0, _, cpu0 = samples[begin]
        if t - t0 >= window:
            out.append((t0, 100.0 * (cpu - cpu0) / (t - t0)))
            begin = i
    return out


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--counts", default="300,1000,3000,5000", help="process counts (default 300,1000,3000,5000)"
    )
    parser.add_argument(
        "--window", type=harness.positive_float, default=20.0, help="seconds measured per tool"
    )
    parser.add_argument(
        "--presses", type=harness.int_in(1, 1000), default=20, help="sort keys pressed per tool"
    )
    parser.add_argument("--soak", type=harness.positive_float, metavar="SECONDS", help="also the RSS soak")
    parser.add_argument(
        "--soak-peer",
        type=harness.positive_float,
        metavar="SECONDS",
        help="after the soak, htop under the same churn for this long (its CPU per window)",
    )
    parser.add_argument("--quick", action="store_true", help="short everything (300,1000; 8 s; soak 120 s)")
    parser.add_argument("--no-htop", action="store_true", help="leave the peer out")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every result here")
    args = parser.parse_args(argv)
    try:
        args.counts = [int(c) for c in str(args.counts).split(",") if c.strip()]
    except ValueError:
        parser.error(f"--counts must be integers separated by commas, got {args.counts!r}")
    if args.quick:
        args.counts, args.window, args.presses = [300, 1000], 8.0, 8
        args.soak = args.soak or 120.0
    return args


def bench(args: argparse.Namespace) -> int:
    info = harness.machine()
    results: list[Result] = []
    soak_result: dict[str, Any] | None = None
    peer_soak: dict[str, Any] | None = None
    meter = KmallocMeter()
    try:
        with tempfile.TemporaryDirectory(prefix="memtop-ui-bench-") as tmp:
            workdir = Path(tmp)
            for count in args.counts:
                harness.log(f"{NAME}: {count} busy processes")
                with busy_processes(workdir, count):
                    time.sleep(2.0)
                    results.append(run_memtop(count, args.window, meter, args.presses))
                    harness.log(f"  memtop: {asdict(results[-1])}")
                    if not args.no_htop:
                        peer = run_htop(count, args.window, meter, args.presses)
                        if peer is not None:
                            results.append(peer)
                            harness.log(f"  htop: {asdict(peer)}")
            if args.soak:
                count = max(args.counts)
                replace_every = 60.0 if args.soak >= 600 else max(10.0, args.soak / 10)
                harness.log(f"{NAME}: soak, {count} processes, {args.soak:g} s")
                soak_result = soak(workdir, count, args.soak, replace_every)
                if args.soak_peer and not args.no_htop and Path("/usr/bin/htop").exists():
                    harness.log(f"{NAME}: htop under the same churn, {args.soak_peer:g} s")
                    try:
                        peer_soak = soak(workdir, count, args.soak_peer, replace_every, tool="htop")
                    except Exception as exc:  # memtop's hour is kept and printed whatever the peer does
                        harness.log(f"  htop soak failed: {exc}")
    finally:
        meter.close()

    def ms(v: float | None) -> str:
        return harness.num(v, ",.0f")

    rows = [
        (
            r.tool,
            f"{r.processes:,}",
            harness.num(r.cpu_pct, ".1f"),
            ms(r.key_median_ms),
            ms(r.key_p95_ms),
            harness.num((r.kmalloc_bytes_per_s or 0) / 1024, ",.1f"),
            harness.num(r.kmalloc_calls_per_s, ",.0f"),
            harness.num(r.start_to_first_row_s, ".2f"),
            harness.num(r.quit_to_prompt_s, ".2f"),
        )
        for r in results
    ]
    print(harness.machine_line(info))
    print(
        harness.markdown_table(
            (
                "tool",
                "processes",
                "CPU % of a core",
                "key→screen median ms",
                "p95 ms",
                "own kmalloc KiB/s",
                "own kmalloc calls/s",
                "start→first row s",
                "quit→prompt s",
            ),
            rows,
        )
    )
    left = sum(r.programs_left for r in results)
    print(f"\nBPF programs left loaded after quitting: {left}")
    if soak_result:
        mib = 1 / (1 << 20)
        r = soak_result
        print(
            f"\nSoak: {r['processes']:,} processes for {r['seconds']:g} s, 10 % replaced every "
            f"{r['replaced_every_s']:g} s: RSS {r['rss_at_start_bytes'] * mib:.1f} MiB at start, "
            f"{r['rss_at_settle_bytes'] * mib:.1f} MiB at {r['settle_s']:g} s, "
            f"{r['rss_at_end_bytes'] * mib:.1f} MiB at the end (growth after settling: "
            f"{r['growth_after_settle_bytes'] * mib:.1f} MiB)"
        )
        for result in (r, peer_soak):
            if result is None:
                continue
            windows = ", ".join(f"{t / 60:.0f} min: {pct:.1f} %" for t, pct in result["cpu_pct_windows"])
            print(f"{result['tool']} CPU per window (start: % of a core): {windows or 'no whole window'}")
            if result is peer_soak and result["samples"]:
                first, last = result["samples"][0], result["samples"][-1]
                overall = 100.0 * (last[2] - first[2]) / max(1e-9, last[0] - first[0])
                length = result["seconds"]
                print(f"htop CPU over its {length:g} s under the same churn: {overall:.1f} % of a core")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "results": [asdict(r) for r in results],
                    "soak": soak_result,
                    "peer_soak": peer_soak,
                },
                indent=2,
            )
        )
    return 1 if left else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(harness.main_wrapper(NAME, parse_args, bench))
