"""The live source hands the C library's free heap back to the kernel (malloc_trim) every
MALLOC_TRIM_EVERY_S, not on every tick. No BPF: a stand-in for malloc_trim."""

from __future__ import annotations

import pytest

from memtop.sources import (
    MALLOC_MMAP_THRESHOLD_BYTES,
    MALLOC_TRIM_EVERY_S,
    HeapTrimmer,
    _libc_malloc_trim,
    fix_mmap_threshold,
)


def test_trims_at_most_every_interval() -> None:
    calls: list[int] = []
    trimmer = HeapTrimmer(every_s=30.0, trim=lambda: calls.append(1))
    start = trimmer._last
    ticks = [start + t for t in (1.0, 29.0, 30.0, 31.0, 59.0, 60.5, 61.0)]
    assert [trimmer.maybe_trim(now=t) for t in ticks] == [False, False, True, False, False, True, False]
    assert len(calls) == trimmer.trims == 2


def test_glibc_has_malloc_trim_and_it_runs() -> None:
    trim = _libc_malloc_trim()
    assert trim is not None  # Debian and Ubuntu: glibc
    assert trim() in (0, 1)  # 1: memory was released
    assert MALLOC_TRIM_EVERY_S >= 10  # a few ms each: rare enough to cost nothing a tick


def test_no_malloc_trim_means_no_trimming() -> None:
    trimmer = HeapTrimmer(every_s=0.0)
    trimmer._trim = None
    assert not trimmer.maybe_trim(now=trimmer._last + 100.0)


def test_fixed_mmap_threshold_gives_big_blocks_their_own_mapping() -> None:
    """After fix_mmap_threshold, a block over the threshold that no arena has free space for, freed and
    allocated again, is mmapped each time (mallinfo2's hblks counts them; glibc's dynamic threshold, raised
    by the first free, would have grown an arena for it instead); one under the threshold never is. It sets
    the threshold of the whole test process (harmless: memtop's own setting)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
            + ("fordblks", "keepcost")
        ]

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("no mallinfo2 (glibc before 2.33, or not glibc)")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert fix_mmap_threshold(MALLOC_MMAP_THRESHOLD_BYTES)
    kib = 1024
    for _ in range(3):
        before = libc.mallinfo2().hblks
        block = libc.malloc(64 * MALLOC_MMAP_THRESHOLD_BYTES)  # 16 MiB: bigger than any free space here
        assert libc.mallinfo2().hblks == before + 1
        libc.free(block)
    before = libc.mallinfo2().hblks
    block = libc.malloc(MALLOC_MMAP_THRESHOLD_BYTES - 64 * kib)  # under it: from an arena
    assert libc.mallinfo2().hblks == before
    libc.free(block)
