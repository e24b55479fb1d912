"""End-to-end: events the kernel never ran memtop's programs for are counted and shown, and memtop's own
programs cause as few as it can (one program per tracepoint, raw tracepoints where the arguments are plain
values)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest

from memtop.config import Config
from memtop.errors import MemtopError
from memtop.export import snapshot_to_dict
from memtop.sources import LiveSource

from .test_bpf_e2e import loaded_prog_ids, prog_ids_held_by

pytestmark = pytest.mark.bpf


def attachments_of(pid: int) -> list[dict]:  # type: ignore[type-arg]
    out = subprocess.run(["bpftool", "perf", "list", "--json"], capture_output=True, text=True, check=True)
    return [a for a in json.loads(out.stdout or "[]") if a.get("pid") == pid]


def kernel_panels() -> tuple[Any, Any, set[int]]:
    """The kmalloc probe with the kernel leak tracking compiled in, both started as live mode starts them:
    (kmalloc, leaks, the program ids this process holds then)."""
    from memtop.probes.kmalloc import KmallocProbe
    from memtop.probes.leaks import KernelLeakProbe

    leaks = KernelLeakProbe(sample_every=1)
    kmalloc = KmallocProbe(leaks=leaks)
    kmalloc.start()
    leaks.start()
    return kmalloc, leaks, prog_ids_held_by(os.getpid())


def misses_by_id() -> dict[int, int]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True)
    return {int(p["id"]): int(p.get("recursion_misses", 0)) for p in json.loads(out.stdout or "[]")}


def test_one_raw_tracepoint_program_per_hot_tracepoint_for_both_kernel_panels() -> None:
    kmalloc, leaks, ours = kernel_panels()
    try:
        assert kmalloc.running and leaks.running and leaks.shared
        mine = attachments_of(os.getpid())
        by_event: dict[str, list[str]] = {}
        for a in mine:
            by_event.setdefault(a["tracepoint"], []).append(a["fd_type"])
        hot = ("kmalloc", "kfree", "kmem_cache_free", "softirq_entry", "softirq_exit")
        hot += ("irq_handler_entry", "irq_handler_exit")
        assert {e: by_event.get(e) for e in hot} == {e: ["raw_tracepoint"] for e in hot}, by_event
        # The raw program, and while the slab caches' sizes are learned (from start on), the classic learner.
        assert sorted(by_event["kmem_cache_alloc"]) == ["raw_tracepoint", "tracepoint"], by_event
        leaks.end_learning()
        now = attachments_of(os.getpid())
        assert [a["fd_type"] for a in now if a["tracepoint"] == "kmem_cache_alloc"] == ["raw_tracepoint"]
        reading = leaks.read()
        assert "recursion_misses" in reading.drops
        # The probe's count is the kernel's, over its own programs.
        kmalloc_ids = {a["prog_id"] for a in mine if a["tracepoint"] not in ("kfree", "kmem_cache_alloc")}
        kmalloc_ids -= {a["prog_id"] for a in mine if a["tracepoint"] == "kmem_cache_free"}
        before = sum(v for i, v in misses_by_id().items() if i in kmalloc_ids)
        counted = kmalloc.read().recursion_misses
        after = sum(v for i, v in misses_by_id().items() if i in kmalloc_ids)
        assert before <= counted <= after
        # The leak panel off: its own programs are detached, kmalloc's counters go on.
        leaks.close()
        left = {a["tracepoint"] for a in attachments_of(os.getpid())}
        assert left.isdisjoint({"kfree", "kmem_cache_alloc"})
        assert kmalloc.running and kmalloc.read().per_tgid
    finally:
        leaks.close()
        kmalloc.close()
    assert ours and not (ours & loaded_prog_ids())


def test_a_leak_part_that_cannot_load_does_not_take_the_kmalloc_counters_down() -> None:
    from memtop.probes.kmalloc import KmallocProbe
    from memtop.probes.leaks import KernelLeakProbe

    class Broken(KernelLeakProbe):
        def cflags(self) -> list[str]:
            return [*super().cflags(), "-DMEMTOP_TEST_BROKEN=1", "-include", "/nonexistent/memtop-test.h"]

    leaks = Broken(sample_every=1)
    kmalloc = KmallocProbe(leaks=leaks)
    kmalloc.start()
    try:
        assert kmalloc.running and "shared with kernel leaks" not in kmalloc.status.detail
        assert leaks.embed_error
        with pytest.raises(MemtopError, match="failed to load"):  # on its own too: its panel says why
            leaks.start()
        time.sleep(0.2)
        assert kmalloc.read().per_tgid
    finally:
        leaks.close()
        kmalloc.close()


def test_the_snapshot_counts_every_panels_recursion_misses_as_drops() -> None:
    source = LiveSource(Config(interval_s=0.5, leak_sample=1))
    source.start()
    try:
        source.tick()
        time.sleep(0.3)
        doc = snapshot_to_dict(source.tick())
    finally:
        source.close()
    for name in ("kmalloc_recursion_misses", "leak_recursion_misses", "tcp_recursion_misses"):
        assert name in doc["drops"] and doc["drops"][name] >= 0, doc["drops"]
    assert doc["probes"]["leaks"]["status"] == "running"
    assert "in the kmalloc probe's programs" in doc["probes"]["leaks"]["detail"]
