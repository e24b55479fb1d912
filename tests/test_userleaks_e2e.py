"""End-to-end: user-mode leak tracking on programs that fail allocator calls, allocate a lot, use another
allocator (tcmalloc, jemalloc, a static musl binary), exec, or run code from a stripped library.
Every expected value is what the program really holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from memtop.leaks import LeakTracker

from .conftest import DATA
from .test_bpf_e2e import loaded_prog_ids, prog_ids_held_by
from .test_leaks_e2e import STACKS, Driven, on_stack

pytestmark = pytest.mark.bpf

CFLAGS = ["-g", "-O0", "-fno-omit-frame-pointer", "-fno-inline", "-Wall"]


def build(compiler: str, source: Path, out: Path, *extra: str) -> Path:
    path = shutil.which(compiler)
    if path is None:
        pytest.fail(f"{compiler} is needed (scripts/setup.sh installs it)")
    subprocess.run([path, *CFLAGS, "-o", str(out), str(source), *extra], check=True)
    return out


# -- 1. failed calls change nothing ---------------------------------------------------------------------

# command -> (function on the stack, bytes, allocations) outstanding after it ran
FAILURES: dict[str, tuple[str, int, int]] = {
    "realloc_fail": ("memtop_kept_by_failed_realloc", 100_000, 1000),
    "realloc_zero": ("memtop_freed_by_realloc_zero", 0, 0),
    "realloc_null": ("memtop_realloc_null", 3000, 10),
    "reallocarray_fail": ("memtop_kept_by_failed_reallocarray", 100_000, 500),
    "memalign_fail": ("memtop_failed_memalign", 0, 0),
    "aligned_fail": ("memtop_failed_aligned", 0, 0),
    "mmap_fail": ("memtop_failed_mmap", 0, 0),
    "mremap_fail": ("memtop_kept_by_failed_mremap", 65536, 1),
    "mremap_move": ("memtop_moved_by_mremap", 131072, 1),
    "munmap_partial": ("memtop_partly_unmapped", 3 * 4096, 1),
    "munmap_fail": ("memtop_kept_by_failed_munmap", 2 * 4096, 1),
}


@pytest.fixture(scope="module")
def failing_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("gcc", DATA / "failing_allocs.c", tmp_path_factory.mktemp("failing") / "failing")


@pytest.mark.parametrize("command", list(FAILURES))
def test_failed_calls_do_not_change_what_is_outstanding(failing_binary: Path, command: str) -> None:
    from memtop.probes.leaks import UserLeakProbe

    child = Driven([str(failing_binary)])
    probe = UserLeakProbe(child.pid, sample_every=1, max_stacks=STACKS)
    try:
        probe.start()
        assert {"realloc", "reallocarray", "posix_memalign", "mremap", "munmap"} <= set(probe.attached)
        assert child.send(command) == "done"
        function, expected_bytes, expected_allocations = FAILURES[command]
        reading = probe.read()
        assert on_stack(reading, function) == (expected_bytes, expected_allocations), reading.stacks
        # A failed call never puts anything on the stack of the call itself (the sentinel, MAP_FAILED).
        assert not any(s.outstanding_bytes < 0 or s.allocations < 0 for s in reading.stacks)
        assert reading.drops["missed_frees"] == 0
    finally:
        probe.close()
        child.stop()


# -- 2. big programs get estimates ----------------------------------------------------------------------

MANY_THREADS, MANY_PER_THREAD, MANY_SIZE = 8, 1_000_000, 4


def test_big_program_gets_a_sampled_estimate_not_a_cap(tmp_path: Path) -> None:
    """8 x 1,000,000 malloc(4) kept: 32x what the address map holds. Read once a second as the live view
    does; the adaptive 1-in-N makes the row an estimate within 10 % of the truth, and says so."""
    import select

    from memtop.probes.leaks import UserLeakProbe

    binary = build("gcc", DATA / "many_mallocs.c", tmp_path / "many", "-pthread")
    # nice 19, and a read every 0.5 s (the live view at `-i 0.5`): on a small shared machine the 8
    # allocating threads would otherwise starve the reads, and the map would fill between two of them
    # before the adaptive N rose (a CI run read 7.19M at nice 10 and once a second).
    child = Driven(["nice", "-n", "19", str(binary)])
    probe = UserLeakProbe(child.pid, max_stacks=STACKS)  # adaptive: the default
    try:
        probe.start()
        assert child.proc.stdin is not None and child.proc.stdout is not None
        child.proc.stdin.write("run\n")
        child.proc.stdin.flush()
        while not select.select([child.proc.stdout], [], [], 0.5)[0]:
            probe.read()  # a live tick
        assert child.reply_line() == "done"
        reading = probe.read()
        outstanding, allocations = on_stack(reading, "memtop_many_small")
        expected = MANY_THREADS * MANY_PER_THREAD
        assert abs(allocations - expected) <= 0.1 * expected, (allocations, reading.drops)
        assert outstanding == allocations * MANY_SIZE
        # Allocations the full map could not take are counted, never hidden: a few while N rose (more on a
        # loaded machine, whose reads come late), never enough to take the estimate out of its 10 %.
        assert reading.drops["alloc_map_full"] <= 0.1 * expected
        assert reading.sample_rate > 1
        assert "(estimates)" in probe.describe() and f"1 in {probe.sample_rate}" in probe.describe()
    finally:
        probe.close()
        child.stop()


# -- 3. the allocator the process really uses -----------------------------------------------------------

NEW_BLOCKS, NEW_BLOCK_SIZE, NODE_SIZE = 100, 10000, 48


@pytest.mark.parametrize("allocator", ["tcmalloc", "jemalloc"])
def test_cpp_program_on_another_allocator(tmp_path: Path, allocator: str) -> None:
    """tcmalloc and jemalloc provide malloc, free and operator new/delete themselves: libc's are never
    called. The probe hooks the object that exports them (found by its symbols) and sees new[] leak.

    A throwing operator new is followed at its call sites (no uretprobe, which a bad_alloc could not
    unwind through): the first run reports the sites, the read hooks them, the second run is seen whole."""
    from memtop.probes.leaks import UserLeakProbe

    binary = build("g++", DATA / "leaky_new.cc", tmp_path / f"leaky_{allocator}", f"-l{allocator}")
    ours: set[int] = set()
    child = Driven([str(binary)])
    probe = UserLeakProbe(child.pid, sample_every=1, max_stacks=STACKS)
    try:
        probe.start()
        assert allocator in Path(probe.allocator).name, probe.allocator
        # Aliases (new[] = new, delete = free in tcmalloc) share one uprobe.
        assert {"malloc", "free", "_Znwm"} <= set(probe.attached), probe.attached  # delete may be free
        assert {hook.obj.path for hook in probe.hooks if hook.symbol.startswith(("malloc", "_Zn"))} == {
            probe.allocator
        }
        # new throws through the hooked operator new and the program catches it, as without memtop.
        assert child.send("throw") == "caught 3"
        assert child.send("run") == "ran"
        probe.read()  # hooks the call sites reported by the first run
        assert probe.new_sites_hooked >= 2
        before = probe.read()
        assert child.send("run") == "ran"
        assert child.send("throw") == "caught 3"
        reading = probe.read()
        assert child.proc.poll() is None

        # C++ frames come demangled: "f()".
        def second_run(function: str) -> tuple[int, int]:
            now, then = on_stack(reading, function), on_stack(before, function)
            return now[0] - then[0], now[1] - then[1]

        assert second_run("memtop_leak_new_array()") == (NEW_BLOCKS * NEW_BLOCK_SIZE, NEW_BLOCKS)
        assert second_run("memtop_leak_new_object()") == (NEW_BLOCKS * NODE_SIZE, NEW_BLOCKS)
        ours = prog_ids_held_by(os.getpid())
        assert on_stack(reading, "memtop_new_and_delete()") == (0, 0)
        tracker = LeakTracker()
        tracker.ingest(0.0, reading)
        tops = {row.top_frame for row in tracker.rows()}
        assert {"memtop_leak_new_array()", "memtop_leak_new_object()"} <= tops, tops
    finally:
        probe.close()
        child.stop()
    assert ours and not (ours & loaded_prog_ids()), "programs (and call-site uprobes) left after close()"


def test_static_musl_program(tmp_path: Path) -> None:
    """A static executable: malloc is a function of the executable itself (its .symtab)."""
    from memtop.probes.leaks import UserLeakProbe

    binary = build("musl-gcc", DATA / "leaky_static.c", tmp_path / "leaky_static", "-static")
    child = Driven([str(binary)])
    probe = UserLeakProbe(child.pid, sample_every=1, max_stacks=STACKS)
    ours: set[int] = set()
    try:
        probe.start()
        ours = prog_ids_held_by(os.getpid())
        assert probe.allocator == str(binary)
        assert {"malloc", "free"} <= set(probe.attached)
        assert child.send("run") == "ran"
        reading = probe.read()
        assert on_stack(reading, "memtop_static_leak") == (100 * 3000, 100)
    finally:
        probe.close()
        child.stop()
    assert ours and not (ours & loaded_prog_ids())


def test_a_stripped_static_program_is_said_not_followed(tmp_path: Path) -> None:
    from memtop.errors import MemtopError
    from memtop.probes.leaks import UserLeakProbe

    binary = build("musl-gcc", DATA / "leaky_static.c", tmp_path / "stripped_static", "-static", "-s")
    child = Driven([str(binary)])
    try:
        probe = UserLeakProbe(child.pid)
        with pytest.raises(MemtopError) as raised:
            probe.start()
        message = str(raised.value)
        assert "\n" not in message and "not followed" in message and "malloc" in message
        assert "static" in message
        assert probe.bpf is None
    finally:
        child.stop()


# -- 4. names and stacks users can read -----------------------------------------------------------------

EXEC_SCRIPT = """
echo ready
read line
words="$line $line $line"  # bash allocates while tracked: the probe first sees this process as bash
echo allocated
read line
exec python3 -c 'import sys; print("started", flush=True); keep = [bytearray(5000) for _ in range(50)]; \
sys.stdin.readline()'
"""


def test_rows_name_the_process_after_exec() -> None:
    """Tracking starts on a shell that allocates, then execs python3: every row says python3, and what the
    shell had allocated (never freed: exec discards it) is forgotten."""
    from memtop.probes.leaks import UserLeakProbe

    child = Driven(["bash", "-c", EXEC_SCRIPT])
    probe = UserLeakProbe(child.pid, sample_every=1, max_stacks=STACKS)
    try:
        probe.start()
        assert child.send("allocate") == "allocated"
        shell_allocated = time.monotonic_ns()  # the clock of bpf_ktime_get_ns
        assert child.send("go") == "started"
        reading = probe.read()
        names = {s.comm for s in reading.stacks if s.pid == child.pid}
        assert names == {"python3"}, names
        from_the_shell = [
            s for s in reading.stacks if s.oldest_ns is not None and s.oldest_ns < shell_allocated
        ]
        assert not from_the_shell, from_the_shell
    finally:
        probe.close()
        child.stop()


def test_frames_in_a_stripped_library_read_lib_plus_offset(tmp_path: Path) -> None:
    from memtop.probes.leaks import UserLeakProbe

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed")
    lib = tmp_path / "libmemtopstrip.so"
    subprocess.run(
        [gcc, *CFLAGS, "-shared", "-fPIC", "-o", str(lib), str(DATA / "stripped_lib.c")], check=True
    )
    subprocess.run(["strip", "--strip-unneeded", str(lib)], check=True)
    binary = build(
        "gcc",
        DATA / "stripped_main.c",
        tmp_path / "stripped_main",
        f"-L{tmp_path}",
        "-lmemtopstrip",
        f"-Wl,-rpath,{tmp_path}",
    )
    child = Driven([str(binary)])
    probe = UserLeakProbe(child.pid, sample_every=1, max_stacks=STACKS)
    try:
        probe.start()
        assert child.send("run") == "ran"
        reading = probe.read()
        stacks = [s for s in reading.stacks if any("memtop_exported_entry" in f for f in s.frames)]
        assert (
            sum(s.allocations for s in stacks) == 20 and sum(s.outstanding_bytes for s in stacks) == 20 * 512
        )
        for s in stacks:
            # The innermost frame is the hidden helper: no symbol is known to contain it.
            assert s.frames[0].startswith("libmemtopstrip.so+0x"), s.frames
            assert s.frames[1].startswith("memtop_exported_entry+0x"), s.frames
    finally:
        probe.close()
        child.stop()


def test_userleaks_bench_smoke(tmp_path: Path) -> None:
    """bench/userleaks_bench.py end to end, briefly: it prints its table and writes JSON. No timing is
    asserted."""
    import json
    import sys

    bench = Path(__file__).resolve().parent.parent / "bench" / "userleaks_bench.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(bench), "--iterations", "2000", "--rounds", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "uprobe cost per call" in proc.stdout
    modes = {row["mode"] for row in json.loads(out.read_text())["summary"]}
    assert modes == {"untraced", "traced, N=1", "traced, 1 in 64"}
