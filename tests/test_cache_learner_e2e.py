"""End-to-end: the raw kmem_cache_alloc program and its cache learner on this kernel.

The raw program sees a slab allocation's cache only as a pointer; the object size and the cache's name come
from a classic program on the same tracepoint, attached only while caches are being learned. These tests
check the learned sizes against the kernel's own (/sys/kernel/slab/<cache>/slab_size, the size the
kmem_cache_alloc tracepoint reports as bytes_alloc), that a process's held slab objects are counted at that
size, and that the learner comes off after its window and comes back for a cache it does not know.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memtop.probes.leaks import read_slabinfo

from .test_bpf_e2e import loaded_prog_ids, prog_ids_held_by
from .test_leaks_e2e import PIPE_HOLDER, PIPES, STACKS, Driven

pytestmark = pytest.mark.bpf

SLAB = Path("/sys/kernel/slab")
LEARNER_TP = b"kmem:kmem_cache_alloc"


def slab_size(cache: str) -> int:
    return int((SLAB / cache / "slab_size").read_text())


def learned(probe: Any) -> dict[str, int]:
    """Cache name -> object size, as the probe learned them (names from /proc/slabinfo by cache id)."""
    from memtop.probes.leaks import CACHE_SHIFT, cache_limits, slab_active_objects

    names = {cid: name for cid, (name, _live) in cache_limits(slab_active_objects()).items()}
    out = {}
    for _pointer, info in probe.bpf[b"cache_info"].items():
        name = names.get(info.source >> CACHE_SHIFT)
        if name is not None:
            out[name] = info.bytes_alloc
    return out


def allocated_by(reading: Any, function: str, pid: int) -> tuple[int, int]:
    """(bytes, allocations) outstanding on `pid`'s stacks whose allocating function (the first frame
    below the allocator's own) is `function`: deeper allocations (the LSM's blob of a file) left out."""
    from memtop.leaks import frame_function, top_frame

    total_bytes = total = 0
    for s in reading.stacks:
        if s.pid == pid and frame_function(top_frame(s.kind, s.frames)) == function:
            total_bytes += s.outstanding_bytes
            total += s.allocations
    return total_bytes, total


@pytest.fixture
def pipes() -> Iterator[Driven]:
    """A process that opens (and closes) PIPES pipes on command."""
    child = Driven([sys.executable, "-c", PIPE_HOLDER])
    try:
        yield child
    finally:
        child.stop()


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from memtop.probes import leaks

    monkeypatch.setattr(leaks, "LEARN_WINDOW_S", 0.5)
    probe = leaks.KernelLeakProbe(sample_every=1, max_stacks=STACKS)
    probe.start()
    ours = prog_ids_held_by(os.getpid())
    try:
        yield probe
    finally:
        probe.close()
    assert ours and not (ours & loaded_prog_ids()), "kernel leak programs still loaded after close()"


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def learn_filp(probe: Any) -> None:
    """Until filp is learned: struct files are allocated (the test's own opens), and each read that saw
    one untracked because filp was unknown opens a learning window."""

    def learned_now() -> bool:
        Path("/dev/null").open().close()
        probe.read()
        return "filp" in learned(probe)

    assert wait_for(learned_now, timeout=10.0), learned(probe)


def test_held_slab_objects_are_counted_at_the_size_the_kernel_gives_their_cache(
    pipes: Driven, probe: Any
) -> None:
    assert probe.raw_cache_alloc, "kmem_cache_alloc's record is not (call_site, ptr, cache, ...) here"
    assert probe.learning_windows >= 1  # the window at start
    # Pipes allocate from filp (their files), dentry, inode caches...: learned in a window.
    assert pipes.send("open") == "opened"
    assert pipes.send("close") == "closed"
    learn_filp(probe)
    sizes = learned(probe)
    assert sizes["filp"] == slab_size("filp")
    checked = [name for name in sizes if (SLAB / name / "slab_size").exists()]
    assert len(checked) >= 3, sizes
    assert {name: sizes[name] for name in checked} == {name: slab_size(name) for name in checked}

    assert pipes.send("open") == "opened"
    reading = probe.read()
    # Each pipe: two struct files from the filp cache (its read and write ends), by alloc_empty_file.
    file_bytes, files = allocated_by(reading, "alloc_empty_file", pipes.pid)
    assert files >= 2 * PIPES, files
    assert file_bytes == files * slab_size("filp")


def test_the_learner_comes_off_after_its_window_and_back_for_an_unknown_cache(
    pipes: Driven, probe: Any
) -> None:
    learn_filp(probe)
    # A timer ends each window (LEARN_WINDOW_S, shortened here), whether anything reads or not (a paused
    # view does not). Nothing reads from here on but the test: no window can begin unseen.
    assert wait_for(lambda: not probe.learning)
    assert LEARNER_TP not in probe.bpf.tracepoint_fds and probe.bpf[b"config"][0].learning == 0
    windows = probe.learning_windows

    # filp's learned size is not the kernel's (as when a new cache took a destroyed one's address): it is
    # dropped, and learned again in a new window.
    wrong = read_slabinfo()
    wrong["filp"] = (wrong["filp"][0], slab_size("filp") + 8)
    assert probe.check_learned(wrong) == 1 and "filp" not in learned(probe)
    unlearned = probe.counters()["cache_unlearned"]
    Path("/dev/null").open().close()  # sampled (1 in 1), its cache unknown: not tracked, counted
    reading = probe.read()
    assert reading.drops["cache_unlearned"] > unlearned
    assert probe.learning and LEARNER_TP in probe.bpf.tracepoint_fds
    assert probe.learning_windows == windows + 1 and probe.bpf[b"config"][0].learning == windows + 1
    learn_filp(probe)
    assert learned(probe)["filp"] == slab_size("filp")
    assert pipes.send("open") == "opened"
    reading = probe.read()
    file_bytes, files = allocated_by(reading, "alloc_empty_file", pipes.pid)
    assert files >= 2 * PIPES and file_bytes == files * slab_size("filp")


@pytest.mark.parametrize("first", ["leaks", "kmalloc"])
def test_closing_either_probe_while_learning_detaches_the_learner(first: str) -> None:
    """In live mode the leak programs, the learner among them, are compiled into the kmalloc probe's object:
    closing the leak panel, or the kmalloc probe first, must take the learner off too."""
    from .test_misses_e2e import attachments_of, kernel_panels

    kmalloc, leaks, ours = kernel_panels()
    try:
        assert leaks.shared and leaks.learning
        mine = [a["fd_type"] for a in attachments_of(os.getpid()) if a["tracepoint"] == "kmem_cache_alloc"]
        assert sorted(mine) == ["raw_tracepoint", "tracepoint"]
        (leaks if first == "leaks" else kmalloc).close()
        left = [a for a in attachments_of(os.getpid()) if a["tracepoint"] == "kmem_cache_alloc"]
        assert left == [] and not leaks.learning
    finally:
        leaks.close()
        kmalloc.close()
    assert ours and not (ours & loaded_prog_ids())
