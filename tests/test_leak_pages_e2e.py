"""End-to-end: with --leak-pages, memory the page allocator hands to a kmalloc is counted once.

A kmalloc above the biggest kmalloc cache (8 KiB) is served by the page allocator and fires both
kmem:mm_page_alloc and kmem:kmalloc. 100 pipes resized to 1 MiB (F_SETPIPE_SZ) hold 100 ring arrays of
256 x 40-byte pipe_buffers: 10,240 bytes each, served as 16 KiB of pages. The right total is 1,638,400 B
with and without page-level tracking.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import pytest

from memtop.leaks import KIND_KERNEL, frame_function

from .test_leaks_e2e import STACKS, Driven

pytestmark = pytest.mark.bpf

RESIZED_PIPES = 100
RING_BYTES = 16 * 1024  # kcalloc(256, 40) = 10,240 B, rounded up to an order-2 page allocation

PIPE_RESIZER = r"""
import fcntl, os, sys
F_SETPIPE_SZ = 1031
PIPES = int(sys.argv[1])
pipes = []
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "resize":
        for _ in range(PIPES):
            r, w = os.pipe()
            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
            pipes.append((r, w))
        print("resized", flush=True)
    elif line.strip() == "close":
        for r, w in pipes:
            os.close(r)
            os.close(w)
        pipes.clear()
        print("closed", flush=True)
"""


@pytest.fixture
def resizer() -> Iterator[Driven]:
    child = Driven([sys.executable, "-c", PIPE_RESIZER, str(RESIZED_PIPES)])
    try:
        yield child
    finally:
        child.stop()


@pytest.mark.parametrize("page_level", [False, True], ids=["slab-only", "leak-pages"])
def test_large_kmallocs_are_not_counted_again_as_pages(resizer: Driven, page_level: bool) -> None:
    from memtop.probes.leaks import KernelLeakProbe

    probe = KernelLeakProbe(sample_every=1, page_level=page_level, max_stacks=STACKS)
    probe.start()
    try:
        probe.read()
        assert resizer.send("resize") == "resized"
        time.sleep(0.3)
        reading = probe.read()
        rows = [
            s
            for s in reading.stacks
            if s.pid == resizer.pid and any(frame_function(f) == "pipe_resize_ring" for f in s.frames)
        ]
        by_kind: dict[str, int] = {}
        for s in rows:
            by_kind[s.kind] = by_kind.get(s.kind, 0) + s.outstanding_bytes
        assert by_kind == {KIND_KERNEL: RESIZED_PIPES * RING_BYTES}, (by_kind, reading.drops)
        assert resizer.send("close") == "closed"
        time.sleep(0.3)
        after = probe.read()
        left = sum(
            s.outstanding_bytes
            for s in after.stacks
            if s.pid == resizer.pid and any(frame_function(f) == "pipe_resize_ring" for f in s.frames)
        )
        assert left == 0
    finally:
        probe.close()


def test_slab_pages_are_not_page_rows() -> None:
    """Pages the slab allocator takes to grow its caches hold objects tracked on their own rows."""
    from memtop.probes.leaks import SLAB_PAGE_FRAMES, KernelLeakProbe

    probe = KernelLeakProbe(sample_every=1, page_level=True, max_stacks=STACKS)
    probe.start()
    try:
        probe.read()
        pipes = [os.pipe() for _ in range(500)]  # new slabs for the pipe and file caches
        time.sleep(0.3)
        reading = probe.read()
        for r, w in pipes:
            os.close(r)
            os.close(w)
    finally:
        probe.close()
    slab_pages = [s for s in reading.stacks if any(f.split("+", 1)[0] in SLAB_PAGE_FRAMES for f in s.frames)]
    assert not [s for s in slab_pages if s.kind != KIND_KERNEL], slab_pages[:3]
