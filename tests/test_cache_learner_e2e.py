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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


def test_held_slab_objects_are_counted_at_the_size_the_kernel_gives_their_cache(
    probe: Any, pipes: Driven
) -> None:
    assert probe.raw_cache_alloc, "kmem_cache_alloc's record is not (call_site, ptr, cache, ...) here"
    assert probe.learning and LEARNER_TP in probe.bpf.tracepoint_fds
    # A first round learns the caches pipes allocate from (each cache's first allocation in a learning
    # window is seen by the raw program before the learner has run: it is counted, not tracked).
    assert pipes.send("open") == "opened"
    assert pipes.send("close") == "closed"
    probe.read()
    sizes = learned(probe)
    assert sizes.get("filp") == slab_size("filp"), sizes
    checked = [name for name in sizes if (SLAB / name / "slab_size").exists()]
    assert len(checked) >= 3, sizes
    assert {name: sizes[name] for name in checked} == {name: slab_size(name) for name in checked}

    assert pipes.send("open") == "opened"
    reading = probe.read()
    # Each pipe: two struct files from the filp cache (its read and write ends), by alloc_empty_file.
    file_bytes, files = allocated_by(reading, "alloc_empty_file", pipes.pid)
    assert files >= 2 * PIPES, files
    assert file_bytes == files * slab_size("filp")
    assert reading.drops["cache_unlearned"] >= 1  # the first round's first allocations, counted


def test_the_learner_comes_off_after_its_window_and_back_for_an_unknown_cache(
    probe: Any, pipes: Driven
) -> None:
    assert probe.learning
    time.sleep(0.6)  # LEARN_WINDOW_S, shortened
    probe.read()
    assert not probe.learning and LEARNER_TP not in probe.bpf.tracepoint_fds
    assert probe.bpf[b"config"][0].learning == 0

    # A cache that was there is gone: what was learned is cleared (a new cache may take its address).
    assert probe.forget_destroyed_caches(frozenset())
    assert len(probe.bpf[b"cache_info"]) == 0
    unlearned = probe.counters()["cache_unlearned"]
    assert pipes.send("open") == "opened"
    reading = probe.read()  # sampled allocations from unknown caches: the learner goes on again
    assert reading.drops["cache_unlearned"] > unlearned
    assert probe.learning and LEARNER_TP in probe.bpf.tracepoint_fds and probe.learning_windows == 2
    assert pipes.send("close") == "closed"
    assert pipes.send("open") == "opened"
    reading = probe.read()
    assert learned(probe).get("filp") == slab_size("filp")
    file_bytes, files = allocated_by(reading, "alloc_empty_file", pipes.pid)
    assert files >= 2 * PIPES and file_bytes == files * slab_size("filp")
