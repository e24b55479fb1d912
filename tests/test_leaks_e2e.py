"""End-to-end: the leak probes on this kernel against programs whose leaks are known.

User mode: tests/data/leaky.c, built here with symbols and frame pointers, leaks known blocks from
distinctively named functions while allocating and freeing a lot elsewhere. Kernel mode: a process holding
pipes open shows their objects on stacks through alloc_pipe_info, and closing them makes the bytes go away.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memtop.leaks import KIND_KERNEL, KIND_USER, LeakReading, LeakTracker, frame_function

from .conftest import DATA
from .test_bpf_e2e import loaded_prog_ids, prog_ids_held_by

pytestmark = pytest.mark.bpf

# What tests/data/leaky.c does (keep in step with its #defines).
LEAK_BLOCKS, LEAK_SIZE = 200, 4096
CALLOC_BLOCKS, CALLOC_SIZE = 50, 1000
MEMALIGN_SIZE = 8192
MMAP_SIZE = 256 * 1024
CHAIN_FINAL_SIZE = 16 * 13 * 100
CHURN_ROUNDS, CHURN_PER_ROUND = 200, 100

PIPES = 1000
# The stack map is a hash of 2**k buckets and a stack whose bucket is taken is lost (counted as a
# stack collision, as in bcc's memleak). Addresses move with (K)ASLR, so each boot is a fresh draw: with
# about 90 stacks stored, the product's 16384 buckets lose a given new stack about 0.5 % of the time.
# These tests are about tracking, not sizing: 4x the buckets makes that four times rarer.
STACKS = 1 << 16


# -- helpers -----------------------------------------------------------------------------------------------


def on_stack(reading: LeakReading, function: str, pid: int | None = None) -> tuple[int, int]:
    """(bytes, allocations) outstanding on stacks whose frames name `function` (of `pid` if given)."""
    total_bytes = total_allocations = 0
    for s in reading.stacks:
        if (pid is None or s.pid == pid) and any(frame_function(f) == function for f in s.frames):
            total_bytes += s.outstanding_bytes
            total_allocations += s.allocations
    return total_bytes, total_allocations


class Driven:
    """A child process that replies with one line to each command line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.reply_line() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reply_line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply_line()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def leaky_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build tests/data/leaky.c")
    binary = tmp_path_factory.mktemp("leaky") / "leaky"
    subprocess.run(
        [
            gcc,
            "-g",
            "-O0",
            "-fno-omit-frame-pointer",
            "-fno-inline",
            "-Wall",
            "-o",
            str(binary),
            str(DATA / "leaky.c"),
        ],
        check=True,
    )
    return binary


@pytest.fixture
def leaky(leaky_binary: Path) -> Iterator[Driven]:
    child = Driven([str(leaky_binary)])
    try:
        yield child
    finally:
        child.stop()


# -- user mode ---------------------------------------------------------------------------------------------


def test_user_probe_finds_the_leaks_and_not_the_freed_blocks(leaky: Driven) -> None:
    from memtop.probes.leaks import UserLeakProbe

    probe = UserLeakProbe(leaky.pid, sample_every=1, max_stacks=STACKS)  # exact
    probe.start()
    ours = prog_ids_held_by(os.getpid())
    try:
        assert probe.alive
        assert "libc" in probe.allocator and probe.mapper
        assert {"malloc", "calloc", "realloc", "free", "posix_memalign", "mmap", "munmap"} <= set(
            probe.attached
        )
        assert leaky.send("run") == "ran"
        reading = probe.read()
        tracker = LeakTracker()
        tracker.ingest(time.monotonic(), reading)
        rows = {row.top_frame: row for row in tracker.rows()}

        # At least 90% of the leaked bytes on a stack naming the leaking function (exact, unsampled).
        leaked_bytes, leaked_blocks = on_stack(reading, "memtop_test_leak_here")
        assert leaked_bytes >= 0.9 * LEAK_BLOCKS * LEAK_SIZE, reading.stacks
        assert leaked_blocks == LEAK_BLOCKS
        row = rows["memtop_test_leak_here"]
        assert row.kind == KIND_USER and row.pid == leaky.pid and row.comm == "leaky"
        assert row.outstanding_bytes == LEAK_BLOCKS * LEAK_SIZE
        assert row.oldest_age_s is not None and row.oldest_age_s >= 0

        # The churn allocated and freed CHURN_ROUNDS * CHURN_PER_ROUND blocks: none is outstanding.
        assert reading.alloc_events >= CHURN_ROUNDS * CHURN_PER_ROUND
        assert "memtop_test_churn" not in rows
        assert on_stack(reading, "memtop_test_churn") == (0, 0)

        # The realloc chain ends with its final block only.
        chain = rows["memtop_test_realloc_chain"]
        assert (chain.allocations, chain.outstanding_bytes) == (1, CHAIN_FINAL_SIZE)

        # calloc, posix_memalign and an anonymous mmap, each under its own caller.
        assert (
            rows["memtop_test_calloc_leak"].allocations,
            rows["memtop_test_calloc_leak"].outstanding_bytes,
        ) == (
            CALLOC_BLOCKS,
            CALLOC_BLOCKS * CALLOC_SIZE,
        )
        assert rows["memtop_test_memalign_leak"].outstanding_bytes == MEMALIGN_SIZE
        assert rows["memtop_test_mmap_leak"].outstanding_bytes == MMAP_SIZE
        assert not any(v for k, v in reading.drops.items() if k != "missed_frees"), reading.drops
        assert reading.drops["missed_frees"] == 0
        assert reading.sample_rate == 1

        # Everything freed: nothing of it stays.
        assert leaky.send("free") == "freed"
        reading = probe.read()
        for function in (
            "memtop_test_leak_here",
            "memtop_test_calloc_leak",
            "memtop_test_memalign_leak",
            "memtop_test_mmap_leak",
            "memtop_test_realloc_chain",
        ):
            assert on_stack(reading, function) == (0, 0), function

        # A free the probe could not see is counted when the address comes back, and not left outstanding.
        if leaky.send("miss") == "same":
            reading = probe.read()
            assert reading.drops["missed_frees"] == 1
            assert on_stack(reading, "memtop_test_missed_free") == (0, 0)

        assert leaky.send("exit") == "bye"
        leaky.proc.wait(timeout=10)
        assert not probe.alive
    finally:
        probe.close()
    assert ours and not (ours & loaded_prog_ids()), "user leak programs still loaded after close()"


def chroot_with(binary: Path, root: Path) -> Path:
    """A directory holding `binary` and copies of the libraries it loads (new inodes, as in a container
    image); returns the binary's path inside it."""
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    for word in listing.split():
        if word.startswith("/") and Path(word).exists():
            target = root / word.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(word, target)
    shutil.copy2(binary, root / binary.name)
    return Path("/") / binary.name


def test_user_probe_in_a_chroot_probes_the_process_own_libc(leaky_binary: Path, tmp_path: Path) -> None:
    """The process maps its own copy of libc (another inode than ours): uprobes go by inode, so the copy
    is what must be probed, and its symbols read from it."""
    from memtop.probes.leaks import UserLeakProbe

    if shutil.which("chroot") is None:
        pytest.fail("chroot (coreutils) is needed")
    inside = chroot_with(leaky_binary, tmp_path)
    child = Driven(["chroot", str(tmp_path), str(inside)])
    probe = UserLeakProbe(child.pid, sample_every=1, max_stacks=STACKS)
    try:
        probe.start()
        assert probe.allocator.startswith(str(tmp_path)), probe.allocator  # the copy, as maps names it
        assert child.send("run") == "ran"
        reading = probe.read()
        leaked_bytes, leaked_blocks = on_stack(reading, "memtop_test_leak_here")
        assert (leaked_bytes, leaked_blocks) == (LEAK_BLOCKS * LEAK_SIZE, LEAK_BLOCKS)
        assert on_stack(reading, "memtop_test_churn") == (0, 0)
    finally:
        probe.close()
        child.stop()


def test_user_probe_sampling_scales_the_estimate(leaky: Driven) -> None:
    from memtop.probes.leaks import UserLeakProbe

    probe = UserLeakProbe(leaky.pid, sample_every=4, max_stacks=STACKS)
    probe.start()
    try:
        assert leaky.send("run") == "ran"
        reading = probe.read()
        assert reading.sample_rate == 4
        leaked_bytes, leaked_blocks = on_stack(reading, "memtop_test_leak_here")
        # 200 blocks sampled 1 in 4: about 50 tracked, each standing for 4 (sd of the estimate about 12%).
        assert leaked_blocks % 4 == 0 and leaked_bytes == leaked_blocks * LEAK_SIZE
        assert 0.5 * LEAK_BLOCKS <= leaked_blocks <= 1.5 * LEAK_BLOCKS
        assert on_stack(reading, "memtop_test_churn") == (0, 0)
    finally:
        probe.close()


def test_user_probe_errors_are_one_line() -> None:
    from memtop.errors import MemtopError
    from memtop.probes.leaks import UserLeakProbe

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        probe = UserLeakProbe(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(MemtopError) as raised:
        probe.start()  # the process is gone by now
    assert "\n" not in str(raised.value)
    assert probe.bpf is None


# -- kernel mode -------------------------------------------------------------------------------------------

PIPE_HOLDER = f"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
print("ready", flush=True)
fds = []
for line in sys.stdin:
    if line.startswith("open"):
        for _ in range({PIPES}):
            fds.extend(os.pipe())
        print("opened", flush=True)
    elif line.startswith("close"):
        for fd in fds:
            os.close(fd)
        fds.clear()
        print("closed", flush=True)
"""


@pytest.fixture
def pipe_holder() -> Iterator[Driven]:
    child = Driven([sys.executable, "-c", PIPE_HOLDER])
    try:
        yield child
    finally:
        child.stop()


def test_kernel_probe_sees_pipes_held_open_and_their_release(pipe_holder: Driven) -> None:
    from memtop.probes.leaks import KernelLeakProbe

    probe = KernelLeakProbe(
        sample_every=1, age_scan_budget=1.0, max_stacks=STACKS
    )  # ages from a fresh scan at every read
    probe.start()
    ours = prog_ids_held_by(os.getpid())
    try:
        probe.read()
        assert pipe_holder.send("open") == "opened"
        time.sleep(1.2)  # old enough for the 1 s age bin
        reading = probe.read()
        held_bytes, held_allocations = on_stack(reading, "alloc_pipe_info", pipe_holder.pid)
        # Each pipe: its pipe_inode_info and its array of pipe_buffers, both kmalloc'd in alloc_pipe_info.
        assert held_allocations >= 0.9 * 2 * PIPES, held_allocations
        assert held_bytes >= 0.9 * PIPES * 512, held_bytes

        tracker = LeakTracker()
        tracker.ingest(time.monotonic(), reading)
        rows = [r for r in tracker.rows(pid=pipe_holder.pid) if r.top_frame == "alloc_pipe_info"]
        assert rows and all(r.kind == KIND_KERNEL and r.pid == pipe_holder.pid for r in rows)
        assert sum(r.outstanding_bytes for r in rows) >= 0.9 * held_bytes  # the rest: deeper helpers
        assert all(r.comm.startswith("python") for r in rows)
        assert all(r.oldest_age_s is not None and r.oldest_age_s >= 1.0 for r in rows), (
            rows,
            reading.tracked_now,
        )
        older = [
            r for r in tracker.rows(older_than_s=1, pid=pipe_holder.pid) if r.top_frame == "alloc_pipe_info"
        ]
        assert sum(r.outstanding_bytes for r in older) >= 0.9 * held_bytes
        # The inode and file objects of those pipes are on other stacks of the same process.
        inode_bytes, _ = on_stack(reading, "alloc_inode", pipe_holder.pid)
        assert inode_bytes > 0

        assert pipe_holder.send("close") == "closed"
        time.sleep(0.5)
        reading = probe.read()
        after_bytes, _ = on_stack(reading, "alloc_pipe_info", pipe_holder.pid)
        assert after_bytes <= 0.1 * held_bytes, (held_bytes, after_bytes)
        assert reading.drops["alloc_map_full"] == 0
    finally:
        probe.close()
    assert ours and not (ours & loaded_prog_ids()), "kernel leak programs still loaded after close()"


PAGE_HOLDER = """
import mmap, sys
print("ready", flush=True)
region = None
for line in sys.stdin:
    if line.startswith("map"):
        region = mmap.mmap(-1, %d, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, len(region), mmap.PAGESIZE):
            region[offset] = 1
        print("mapped", flush=True)
    elif line.startswith("unmap"):
        region.close()
        print("unmapped", flush=True)
"""
PAGE_BYTES = 32 << 20


def test_kernel_probe_page_level() -> None:
    from memtop.leaks import KIND_KERNEL_PAGES
    from memtop.probes.leaks import KernelLeakProbe

    child = Driven([sys.executable, "-c", PAGE_HOLDER % PAGE_BYTES])
    probe = KernelLeakProbe(sample_every=1, page_level=True, max_stacks=STACKS)
    try:
        probe.start()
        assert child.send("map") == "mapped"
        reading = probe.read()
        pages = [s for s in reading.stacks if s.pid == child.pid and s.kind == KIND_KERNEL_PAGES]
        # Faulted-in anonymous memory (4 KiB pages or larger folios, each counted at its size).
        assert sum(s.outstanding_bytes for s in pages) >= 0.9 * PAGE_BYTES
        tracker = LeakTracker()
        tracker.ingest(time.monotonic(), reading)
        top = max(tracker.rows(pid=child.pid), key=lambda row: row.outstanding_bytes)
        assert top.kind == KIND_KERNEL_PAGES and top.top_frame == "do_anonymous_page", top
        assert child.send("unmap") == "unmapped"
        time.sleep(0.3)
        reading = probe.read()
        pages = [s for s in reading.stacks if s.pid == child.pid and s.kind == KIND_KERNEL_PAGES]
        assert sum(s.outstanding_bytes for s in pages) <= 0.1 * PAGE_BYTES
    finally:
        probe.close()
        child.stop()


def test_kernel_probe_sampled_estimate(pipe_holder: Driven) -> None:
    from memtop.probes.leaks import KernelLeakProbe

    probe = KernelLeakProbe(sample_every=4, max_stacks=STACKS)
    probe.start()
    try:
        assert pipe_holder.send("open") == "opened"
        reading = probe.read()
        assert reading.sample_rate == 4
        _, held_allocations = on_stack(reading, "alloc_pipe_info", pipe_holder.pid)
        # 2000 objects sampled 1 in 4: each tracked one stands for 4 (sd of the estimate about 4%).
        assert held_allocations % 4 == 0
        assert 0.7 * 2 * PIPES <= held_allocations <= 1.3 * 2 * PIPES, held_allocations
    finally:
        probe.close()


@pytest.mark.parametrize("step", ["read", "adapt"])
def test_kernel_probe_adapts_its_sample_rate(step: str) -> None:
    """Through full reads, and through adapt() alone: the ticks on which the live source does not read the
    aggregates (no view shows them) still move the 1 in N."""
    from memtop.leaks import AdaptiveSampler
    from memtop.probes.leaks import KernelLeakProbe

    sampler = AdaptiveSampler(budget_per_s=1, initial=1, calm_reads=1)  # a budget any system exceeds
    probe = KernelLeakProbe(sampler=sampler)
    probe.start()
    try:
        assert probe.effective_sample_rate == 1
        update = probe.read if step == "read" else probe.adapt
        update()
        reads = 0
        while probe.effective_sample_rate == 1 and reads < 20:
            os.listdir("/proc/self/fd")  # a few kmallocs of our own
            time.sleep(0.2)
            update()
            reads += 1
        rate = probe.effective_sample_rate
        assert rate > 1 and rate & (rate - 1) == 0, rate
        config = probe.bpf[b"config"]
        assert config[config.Key(0)].sample_every == rate  # what the kernel side now uses
        assert probe.read().sample_rate == probe.effective_sample_rate
        assert f"1 in {probe.effective_sample_rate}" in probe.describe()
    finally:
        probe.close()


# -- the benchmark still runs --------------------------------------------------------------------------------


def test_leaks_bench_smoke(tmp_path: Path) -> None:
    """bench/leaks_bench.py end to end, briefly and without memleak: it prints both tables and writes JSON.
    No timing is asserted."""
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is needed by bench/leaks_bench.py")
    bench = Path(__file__).resolve().parent.parent / "bench" / "leaks_bench.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(bench), "--rounds", "1", "--seconds", "0.3", "--warmup", "0", "--attempts", "1"]
        + ["--no-memleak", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Kernel mode" in proc.stdout and "User mode" in proc.stdout
    doc = json.loads(out.read_text())
    modes = {(s["bench"], s["mode"]) for s in doc["summary"]}
    assert {("kernel", "memtop (adaptive N)"), ("kernel", "memtop (N=1)"), ("user", "memtop")} <= modes
    stats_runs = [r for r in doc["runs"] if r["stats"]]
    assert stats_runs and all(r["alloc_run_cnt"] > 0 for r in stats_runs)
