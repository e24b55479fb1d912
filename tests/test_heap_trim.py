"""The live source hands the C library's free heap back to the kernel (malloc_trim) every
MALLOC_TRIM_EVERY_S, not on every tick. No BPF: a stand-in for malloc_trim."""

from __future__ import annotations

from memtop.sources import MALLOC_TRIM_EVERY_S, HeapTrimmer, _libc_malloc_trim


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
