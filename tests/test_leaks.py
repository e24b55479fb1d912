"""Unit tests of memtop.leaks: frame selection, age bins, growth, the tracker's rows, JSON and adaptive N."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest

from memtop.leaks import (
    AGE_EDGES_S,
    KIND_KERNEL,
    KIND_KERNEL_PAGES,
    KIND_USER,
    STACK_LOST,
    AdaptiveSampler,
    LeakReading,
    LeakRow,
    LeakTracker,
    StackOutstanding,
    age_bin,
    first_bin_at_least,
    frame_function,
    is_allocator_frame,
    rows_from_json,
    rows_to_json,
    top_frame,
)

KERNEL_PIPE_STACK = (
    "__kmalloc_cache_noprof+0x237",
    "alloc_pipe_info+0x5d",
    "create_pipe_files+0x3f",
    "do_pipe2+0x4d",
)
USER_STACK = (
    "memtop_test_leak_here+0x18 [leaky]",
    "run+0x22 [leaky]",
    "main+0x5e [leaky]",
)
S = 1_000_000_000  # ns per second


def stack(
    pid: int = 100,
    stack_id: int = 1,
    outstanding: int = 1000,
    allocations: int = 10,
    oldest_ns: int | None = None,
    kind: str = KIND_KERNEL,
    frames: tuple[str, ...] = KERNEL_PIPE_STACK,
    comm: str = "proc",
    age_bins: tuple[tuple[int, int], ...] = (),
) -> StackOutstanding:
    return StackOutstanding(kind, stack_id, pid, comm, outstanding, allocations, oldest_ns, frames, age_bins)


def reading(
    *stacks: StackOutstanding, now_ns: int = 100 * S, kind: str = KIND_KERNEL, rate: int = 1
) -> LeakReading:
    return LeakReading(kind, tuple(stacks), rate, now_ns, {"missed_frees": 3})


# -- frame selection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "function"),
    [
        ("alloc_pipe_info+0x5d", "alloc_pipe_info"),
        ("memtop_test_leak_here+0x18 [leaky]", "memtop_test_leak_here"),
        ("operator new(unsigned long)+0x1c [libstdc++.so.6]", "operator new(unsigned long)"),
        ("[unknown]", "[unknown]"),
        ("plain", "plain"),
    ],
)
def test_frame_function_strips_offset_and_module(frame: str, function: str) -> None:
    assert frame_function(frame) == function


@pytest.mark.parametrize(
    "frame",
    [
        "__kmalloc_noprof+0x244",
        "__kmalloc_cache_noprof+0x237",
        "kmem_cache_alloc_lru_noprof+0x22c",
        "kmem_cache_alloc_noprof+0x227",
        "__kvmalloc_node_noprof+0x303",
        "kmalloc_reserve+0x60",
        "kmemdup_noprof+0x20",
        "vmemdup_user+0x2e",
        "__alloc_pages_noprof+0x10",
        "alloc_pages_mpol_noprof+0x90",
        "get_page_from_freelist+0x300",
        "new_slab+0x2a",
        "___slab_alloc+0x500",
        "krealloc_noprof.cold+0x3",
        "__alloc_frozen_pages_noprof+0x26b",
        "vma_alloc_folio_noprof+0x61",
        "[unknown]",
    ],
)
def test_kernel_allocator_frames_are_skipped(frame: str) -> None:
    assert is_allocator_frame(KIND_KERNEL, frame)


@pytest.mark.parametrize(
    "frame",
    [
        "alloc_pipe_info+0x5d",
        "alloc_inode+0xa3",
        "sock_alloc_inode+0x1f",
        "map_lookup_elem+0x148",
        "do_anonymous_page+0x31e",
    ],
)
def test_kernel_callers_are_meaningful(frame: str) -> None:
    assert not is_allocator_frame(KIND_KERNEL, frame)


@pytest.mark.parametrize(
    "frame",
    [
        "malloc+0x10 [libc.so.6]",
        "__libc_malloc+0x10 [libc.so.6]",
        "_int_malloc+0x3a [libc.so.6]",
        "realloc+0x1 [libc.so.6]",
        "__strdup+0x1a [libc.so.6]",
        "operator new(unsigned long)+0x1c [libstdc++.so.6]",
        "_Znwm+0x1c [libstdc++.so.6]",
        "__mmap64+0x13 [libc.so.6]",
    ],
)
def test_user_allocator_frames_are_skipped(frame: str) -> None:
    assert is_allocator_frame(KIND_USER, frame)


def test_user_mode_does_not_apply_kernel_prefixes() -> None:
    # A user function that happens to be called kmalloc_something is the user's code, not the allocator.
    assert not is_allocator_frame(KIND_USER, "kmalloc_pool_get+0x10 [app]")
    assert not is_allocator_frame(KIND_USER, "memtop_test_leak_here+0x18 [leaky]")


def test_top_frame_skips_allocator_internals() -> None:
    assert top_frame(KIND_KERNEL, KERNEL_PIPE_STACK) == "alloc_pipe_info"
    assert top_frame(KIND_USER, ("malloc+0x1 [libc.so.6]", *USER_STACK)) == "memtop_test_leak_here"
    assert top_frame(KIND_USER, ("[unknown]", "strdup+0x3 [libc.so.6]", "parse+0x9 [app]")) == "parse"


def test_top_frame_when_nothing_is_meaningful() -> None:
    assert (
        top_frame(KIND_KERNEL, ("__kmalloc_noprof+0x1", "kmem_cache_alloc_noprof+0x2")) == "__kmalloc_noprof"
    )
    assert top_frame(KIND_KERNEL, ()) == STACK_LOST
    assert top_frame(KIND_KERNEL, (STACK_LOST,)) == STACK_LOST
    assert top_frame(KIND_USER, ("[unknown]",)) == "[unknown]"


# -- age bins ----------------------------------------------------------------------------------------------


def test_age_bins_cover_every_age() -> None:
    assert age_bin(0) == 0
    assert age_bin(0.99) == 0
    assert age_bin(1) == 1
    assert age_bin(59.9) == AGE_EDGES_S.index(30)
    assert age_bin(60) == AGE_EDGES_S.index(60)
    assert age_bin(10**9) == len(AGE_EDGES_S) - 1


def test_threshold_is_rounded_up_to_a_bin_edge() -> None:
    assert first_bin_at_least(0) == 0
    assert first_bin_at_least(60) == AGE_EDGES_S.index(60)
    assert first_bin_at_least(45) == AGE_EDGES_S.index(60)
    assert first_bin_at_least(10**9) == len(AGE_EDGES_S)


# -- the tracker -------------------------------------------------------------------------------------------


def test_rows_merge_processes_per_stack_and_keep_the_largest_first() -> None:
    tracker = LeakTracker()
    tracker.ingest(
        0.0,
        reading(
            stack(pid=100, outstanding=1000, allocations=10, oldest_ns=90 * S, comm="small"),
            stack(pid=200, outstanding=5000, allocations=20, oldest_ns=95 * S, comm="big"),
            stack(
                pid=100,
                stack_id=2,
                outstanding=64,
                allocations=1,
                frames=("kmem_cache_alloc_noprof+0x1", "f+0x1"),
            ),
        ),
    )
    rows = {row.stack_id: row for row in tracker.rows()}
    merged = rows[1]
    assert merged.pid is None
    assert merged.pids == (200, 100)
    assert merged.comm == "big"
    assert (merged.outstanding_bytes, merged.allocations) == (6000, 30)
    assert merged.oldest_age_s == pytest.approx(10.0)
    assert merged.top_frame == "alloc_pipe_info"
    assert merged.stack == KERNEL_PIPE_STACK
    assert rows[2].pid == 100 and rows[2].top_frame == "f"
    assert rows[2].oldest_age_s is None


def test_rows_for_one_process_keep_only_its_share() -> None:
    tracker = LeakTracker()
    tracker.ingest(0.0, reading(stack(pid=100, outstanding=1000), stack(pid=200, outstanding=5000)))
    (row,) = tracker.rows(pid=100)
    assert row.pid == 100 and row.pids == (100,) and row.outstanding_bytes == 1000
    assert tracker.rows(pid=300) == ()


def test_growth_over_the_window() -> None:
    tracker = LeakTracker(growth_window_s=60.0)
    for t in range(0, 121, 10):  # 100 bytes/s for two minutes
        tracker.ingest(float(t), reading(stack(outstanding=100 * t + 1)))
    (row,) = tracker.rows()
    assert row.growth_bytes_per_s == pytest.approx(100.0)
    # It stops growing: after a further minute the growth is zero, the bytes remain.
    for t in range(130, 200, 10):
        tracker.ingest(float(t), reading(stack(outstanding=12001)))
    (row,) = tracker.rows()
    assert row.growth_bytes_per_s == pytest.approx(0.0)
    assert row.outstanding_bytes == 12001


def test_growth_needs_two_readings_and_uses_what_history_there_is() -> None:
    tracker = LeakTracker(growth_window_s=60.0)
    tracker.ingest(0.0, reading(stack(outstanding=1000)))
    assert tracker.rows()[0].growth_bytes_per_s == 0.0
    tracker.ingest(5.0, reading(stack(outstanding=2000)))
    assert tracker.rows()[0].growth_bytes_per_s == pytest.approx(200.0)


def test_freed_stack_disappears_and_its_history_goes_negative_then_away() -> None:
    tracker = LeakTracker(growth_window_s=60.0)
    tracker.ingest(0.0, reading(stack(outstanding=6000)))
    tracker.ingest(10.0, reading(stack(stack_id=9, outstanding=1, frames=("g+0x1",))))
    assert [row.stack_id for row in tracker.rows()] == [9]
    # Its history still holds the drop to zero until the window has passed.
    assert tracker._stack_history[(KIND_KERNEL, 1)].growth() == pytest.approx(-600.0)
    for t in (80.0, 150.0):
        tracker.ingest(t, reading(stack(stack_id=9, outstanding=1, frames=("g+0x1",))))
    assert (KIND_KERNEL, 1) not in tracker._stack_history


def test_per_process_growth() -> None:
    tracker = LeakTracker()
    tracker.watch(1)
    tracker.ingest(0.0, reading(stack(pid=1, outstanding=0, allocations=1), stack(pid=2, outstanding=100)))
    tracker.ingest(10.0, reading(stack(pid=1, outstanding=1000), stack(pid=2, outstanding=100)))
    assert tracker.rows(pid=1)[0].growth_bytes_per_s == pytest.approx(100.0)
    assert tracker.rows(pid=2)[0].growth_bytes_per_s == pytest.approx(0.0)
    assert tracker.rows()[0].growth_bytes_per_s == pytest.approx(100.0)


def test_per_process_histories_only_for_the_watched_process() -> None:
    tracker = LeakTracker()
    tracker.ingest(0.0, reading(stack(pid=1, outstanding=0, allocations=1), stack(pid=2, outstanding=100)))
    tracker.ingest(10.0, reading(stack(pid=1, outstanding=1000), stack(pid=2, outstanding=100)))
    assert tracker._pid_history == {}  # nothing watched: no per-process history kept
    assert tracker.rows(pid=1)[0].growth_bytes_per_s == 0.0
    assert tracker.rows()[0].growth_bytes_per_s == pytest.approx(100.0)  # per stack: kept for all
    tracker.watch(2)
    tracker.ingest(20.0, reading(stack(pid=1, outstanding=2000), stack(pid=2, outstanding=300)))
    tracker.ingest(30.0, reading(stack(pid=1, outstanding=3000), stack(pid=2, outstanding=500)))
    assert {key[2] for key in tracker._pid_history} == {2}
    assert tracker.rows(pid=2)[0].growth_bytes_per_s == pytest.approx(20.0)
    tracker.watch(1)  # another process: the previous one's histories go, growth starts from its next reading
    assert tracker._pid_history == {}
    tracker.ingest(40.0, reading(stack(pid=1, outstanding=4000), stack(pid=2, outstanding=500)))
    tracker.ingest(50.0, reading(stack(pid=1, outstanding=4500), stack(pid=2, outstanding=500)))
    assert tracker.rows(pid=1)[0].growth_bytes_per_s == pytest.approx(50.0)
    assert {key[2] for key in tracker._pid_history} == {1}


def test_a_stack_id_naming_another_stack_restarts_its_history() -> None:
    tracker = LeakTracker()
    tracker.ingest(0.0, reading(stack(outstanding=100_000)))
    tracker.ingest(10.0, reading(stack(outstanding=10, frames=("other+0x1",))))
    (row,) = tracker.rows()
    assert row.top_frame == "other"
    assert row.growth_bytes_per_s == 0.0  # not -9999: it is a different stack


def test_rows_sorted_by_growth_then_bytes() -> None:
    tracker = LeakTracker()
    tracker.ingest(0.0, reading(stack(stack_id=1, outstanding=10), stack(stack_id=2, outstanding=5000)))
    tracker.ingest(
        10.0,
        reading(
            stack(stack_id=1, outstanding=1010),
            stack(stack_id=2, outstanding=5000),
            stack(stack_id=3, outstanding=9000),
        ),
    )
    assert [row.stack_id for row in tracker.rows()] == [1, 3, 2]


def test_empty_and_negative_aggregates_are_not_rows() -> None:
    tracker = LeakTracker()
    tracker.ingest(
        0.0, reading(stack(outstanding=0, allocations=0), stack(stack_id=2, outstanding=-5, allocations=-1))
    )
    assert tracker.rows() == ()


def test_older_than_uses_age_bins() -> None:
    bins = [(0, 0)] * len(AGE_EDGES_S)
    bins[0] = (5, 500)  # younger than a second
    bins[AGE_EDGES_S.index(60)] = (2, 200)  # a minute old
    bins[AGE_EDGES_S.index(3600)] = (1, 100)  # an hour old
    tracker = LeakTracker()
    tracker.ingest(0.0, reading(stack(outstanding=800, allocations=8, oldest_ns=0, age_bins=tuple(bins))))
    assert tracker.rows()[0].outstanding_bytes == 800
    assert (
        tracker.rows(older_than_s=60)[0].outstanding_bytes,
        tracker.rows(older_than_s=60)[0].allocations,
    ) == (
        300,
        3,
    )
    assert tracker.rows(older_than_s=45)[0].outstanding_bytes == 300  # rounded up to the 60 s edge
    assert tracker.rows(older_than_s=3600)[0].outstanding_bytes == 100
    assert tracker.rows(older_than_s=7200) == ()


def test_older_than_without_bins_uses_the_oldest_allocation() -> None:
    tracker = LeakTracker()
    tracker.ingest(
        0.0,
        reading(
            stack(stack_id=1, oldest_ns=10 * S),
            stack(stack_id=2, oldest_ns=99 * S),
            stack(stack_id=3),
            now_ns=100 * S,
        ),
    )
    assert [row.stack_id for row in tracker.rows(older_than_s=30)] == [1]


def test_kernel_and_user_readings_live_side_by_side() -> None:
    tracker = LeakTracker()
    tracker.ingest(0.0, reading(stack(), rate=64))
    tracker.ingest(
        0.0,
        reading(stack(kind=KIND_USER, frames=USER_STACK, stack_id=1), kind=KIND_USER, rate=1, now_ns=5 * S),
    )
    assert {row.kind for row in tracker.rows()} == {KIND_KERNEL, KIND_USER}
    assert tracker.sample_rate == 64
    assert tracker.sample_rates == {KIND_KERNEL: 64, KIND_USER: 1}
    assert tracker.drops == {"missed_frees": 6}
    tracker.ingest(1.0, reading(stack(), rate=64))  # a kernel reading does not remove the user rows
    assert {row.kind for row in tracker.rows()} == {KIND_KERNEL, KIND_USER}
    tracker.forget(KIND_USER)
    assert {row.kind for row in tracker.rows()} == {KIND_KERNEL}
    assert tracker.reading(KIND_USER) is None


def test_page_level_stacks_are_their_own_kind() -> None:
    tracker = LeakTracker()
    tracker.ingest(
        0.0, reading(stack(), stack(kind=KIND_KERNEL_PAGES, frames=("__alloc_pages_noprof+0x1", "f+0x2")))
    )
    kinds = sorted(row.kind for row in tracker.rows())
    assert kinds == [KIND_KERNEL, KIND_KERNEL_PAGES]
    tracker.forget(KIND_KERNEL)
    assert tracker.rows() == ()


def test_tracker_rejects_a_bad_window() -> None:
    with pytest.raises(ValueError):
        LeakTracker(growth_window_s=0)


# -- JSON ----------------------------------------------------------------------------------------------------


def sample_rows() -> tuple[LeakRow, ...]:
    tracker = LeakTracker()
    tracker.ingest(0.0, reading(stack(pid=1, oldest_ns=50 * S), stack(pid=2)))
    tracker.ingest(0.0, reading(stack(kind=KIND_USER, frames=USER_STACK, pid=7, oldest_ns=S), kind=KIND_USER))
    return tracker.rows()


def test_json_round_trip() -> None:
    rows = sample_rows()
    data = json.loads(json.dumps(rows_to_json(rows)))
    assert rows_from_json(data) == rows
    kernel = next(item for item in data if item["kind"] == KIND_KERNEL)
    assert kernel["pid"] is None and kernel["pids"] == [1, 2]
    assert kernel["stack"] == list(KERNEL_PIPE_STACK)
    user = next(item for item in data if item["kind"] == KIND_USER)
    assert user["pid"] == 7 and user["top_frame"] == "memtop_test_leak_here"
    assert set(user) >= {
        "pid",
        "comm",
        "kind",
        "outstanding_bytes",
        "allocations",
        "oldest_age_s",
        "growth_bytes_per_s",
        "stack",
    }


def test_json_optional_fields_are_derived() -> None:
    (item,) = rows_to_json(sample_rows()[-1:])
    for name in ("top_frame", "pids", "stack_id"):
        del item[name]
    (row,) = rows_from_json([item])
    assert row.pids == ((item["pid"],) if item["pid"] is not None else ())
    assert row.top_frame == top_frame(row.kind, row.stack)
    assert row.stack_id == -1


def _good() -> dict[str, Any]:
    return rows_to_json(sample_rows())[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("kind"), "missing 'kind'"),
        (lambda d: d.update(kind="heap"), "kind"),
        (lambda d: d.update(pid=-1), "pid"),
        (lambda d: d.update(pid="7"), "pid"),
        (lambda d: d.pop("pid"), "missing 'pid'"),
        (lambda d: d.update(outstanding_bytes=-1), "outstanding_bytes"),
        (lambda d: d.update(outstanding_bytes=1.5), "outstanding_bytes"),
        (lambda d: d.update(allocations=True), "allocations"),
        (lambda d: d.update(oldest_age_s=-3), "oldest_age_s"),
        (lambda d: d.update(oldest_age_s="old"), "oldest_age_s"),
        (lambda d: d.update(growth_bytes_per_s=math.nan), "growth_bytes_per_s"),
        (lambda d: d.pop("growth_bytes_per_s"), "growth_bytes_per_s"),
        (lambda d: d.update(stack="f"), "stack"),
        (lambda d: d.update(stack=[1]), "stack"),
        (lambda d: d.update(comm=None), "comm"),
        (lambda d: d.update(pids=[-1]), "pids"),
        (lambda d: d.update(top_frame=3), "top_frame"),
        (lambda d: d.update(stack_id="x"), "stack_id"),
    ],
)
def test_json_bad_input_raises_value_error(change: Any, message: str) -> None:
    item = _good()
    change(item)
    with pytest.raises(ValueError, match=message):
        rows_from_json([item])


@pytest.mark.parametrize("data", [None, {}, "leaks", [1], [[]]])
def test_json_bad_containers(data: Any) -> None:
    with pytest.raises(ValueError):
        rows_from_json(data)


# -- adaptive sampling ---------------------------------------------------------------------------------------


def feed(
    sampler: AdaptiveSampler, rate_per_s: float, seconds: int, start: float = 0.0, fill: float = 0.0
) -> int:
    """Feed `seconds` one-second reads at a steady allocation rate; returns the last N."""
    total: float = sampler._last[1] if sampler._last else 0
    result = sampler.rate
    for i in range(seconds + 1):
        result = sampler.update(start + i, int(total), fill)
        total += rate_per_s
    return result


def test_adaptive_rate_rises_at_once_to_stay_within_budget() -> None:
    sampler = AdaptiveSampler(budget_per_s=1000, initial=1)
    assert sampler.update(0.0, 0) == 1  # the first read only sets the baseline
    assert sampler.update(1.0, 100_000) == 128  # 100k/s over 1000/s: the next power of two above 100
    assert 100_000 / sampler.rate <= 1000


def test_adaptive_rate_falls_only_after_calm_reads_and_with_headroom() -> None:
    sampler = AdaptiveSampler(budget_per_s=1000, initial=1024, calm_reads=3)
    sampler.update(0.0, 0)
    assert sampler.update(1.0, 10_000) == 1024
    assert sampler.update(2.0, 20_000) == 1024
    assert sampler.update(3.0, 30_000) == 32  # third calm read: 10k/s with headroom 2 -> 20 -> 32
    assert 10_000 / 32 <= 1000 / 2


def test_adaptive_rate_has_hysteresis() -> None:
    sampler = AdaptiveSampler(budget_per_s=1000, initial=1)
    n = feed(sampler, 60_000, 5)
    assert n == 64
    # A rate that would fit N=32 but not with the 2x headroom does not lower N.
    assert feed(sampler, 30_000, 20, start=10) == 64
    # Noise around the budget does not flap N either.
    values = {
        feed(sampler, rate, 1, start=40 + i * 2) for i, rate in enumerate([50_000, 62_000, 45_000, 63_000])
    }
    assert values == {64}


def test_adaptive_rate_rises_when_the_address_map_fills() -> None:
    sampler = AdaptiveSampler(budget_per_s=1000, initial=4)
    sampler.update(0.0, 0)
    assert sampler.update(1.0, 10, map_fill=0.8) == 8
    assert sampler.update(2.0, 20, map_fill=0.8) == 16
    assert feed(sampler, 10, 10, start=3, fill=0.6) == 16  # not lowered while the map is over half full
    assert feed(sampler, 10, 10, start=20, fill=0.1) == 1


def test_adaptive_rate_ignores_counter_resets_and_clock_trouble() -> None:
    sampler = AdaptiveSampler(budget_per_s=1000, initial=8)
    sampler.update(5.0, 1000)
    assert sampler.update(5.0, 2000) == 8  # no time passed
    assert sampler.update(6.0, 10) == 8  # the counter went back: a new baseline
    assert sampler.update(4.0, 20) == 8


def test_adaptive_rate_is_bounded() -> None:
    sampler = AdaptiveSampler(budget_per_s=1, initial=1, max_rate=1024)
    sampler.update(0.0, 0)
    assert sampler.update(1.0, 10**9) == 1024
    with pytest.raises(ValueError):
        AdaptiveSampler(budget_per_s=0)


# -- the probe's pure helpers -------------------------------------------------------------------------


def test_scan_ages_weights_and_bins() -> None:
    from memtop.probes.leaks import ALLOC_INFO, scan_ages

    now = 1000 * S
    records = [
        # size, ts_ns, tgid, stack_id, weight, source
        (100, now - 500_000_000, 7, 3, 4, 0),  # half a second old, tracked at 1 in 4
        (100, now - 90 * S, 7, 3, 1, 0),  # 90 s old
        (64, now - 2 * S, 8, -14, 1, 0),  # a lost stack, another process
        (10, now + 5, 7, 3, 1, 0),  # stamped after `now` was taken: age 0
    ]
    raw = b"".join(ALLOC_INFO.pack(*r) for r in records)
    ages = scan_ages(raw + b"\0" * ALLOC_INFO.size, len(records), now)
    assert ages.oldest[(3, 7, 0)] == now - 90 * S
    bins = ages.bins[(3, 7, 0)]
    assert bins[0] == (5, 410)
    assert bins[AGE_EDGES_S.index(60)] == (1, 100)
    assert sum(a for a, _ in bins) == 6 and len(bins) == len(AGE_EDGES_S)
    assert ages.bins[(-14, 8, 0)][AGE_EDGES_S.index(2)] == (1, 64)
    assert ages.entries == 4


def test_struct_layouts_match_the_bpf_programs() -> None:
    from memtop.probes.leaks import AGG_KEY, AGG_VALUE, ALLOC_INFO

    assert ALLOC_INFO.size == 32 and AGG_KEY.size == 16 and AGG_VALUE.size == 16
    assert struct.calcsize("<QQIiII") == ALLOC_INFO.size


def test_mapped_objects_put_the_executable_first(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from memtop.probes import leaks as probe_module

    maps = (
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f01-7f02 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "5500-5501 r-xp 00000000 08:01 2 /opt/app/bin/app\n"
        "7f02-7f03 r-xp 00000000 08:01 3 /opt/app/lib/libjemalloc.so.2\n"
        "7f03-7f04 r-xp 00000000 08:01 4 /tmp/gone.so (deleted)\n"
        "7f04-7f05 rw-p 00000000 00:00 0 \n"
        "7ffd-7ffe r-xp 00000000 00:00 0 [vdso]\n"
    )
    real_read_text = probe_module.Path.read_text

    def fake_read_text(self: Any, *args: Any, **kwargs: Any) -> str:
        if str(self) == "/proc/4242/maps":
            return maps
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(probe_module.Path, "read_text", fake_read_text)
    monkeypatch.setattr(os, "readlink", lambda path: "/opt/app/bin/app")
    objects = probe_module.mapped_objects(4242)
    assert list(objects) == [
        "/opt/app/bin/app",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/opt/app/lib/libjemalloc.so.2",
        "/tmp/gone.so",  # deleted on disk (an upgraded library): map_files still opens what is mapped
    ]
    assert objects["/usr/lib/x86_64-linux-gnu/libc.so.6"] == "/proc/4242/map_files/7f00-7f01"
    assert objects["/opt/app/bin/app"] == "/proc/4242/map_files/5500-5501"
    assert objects["/tmp/gone.so"] == "/proc/4242/map_files/7f03-7f04"


def test_user_probe_refuses_a_missing_process() -> None:
    from memtop.errors import MemtopError
    from memtop.probes.leaks import UserLeakProbe

    with pytest.raises(MemtopError, match="no process with PID"):
        UserLeakProbe(2**22 + 12345)
    with pytest.raises(MemtopError, match="PID must be"):
        UserLeakProbe(0)
    with pytest.raises(MemtopError, match="LEAK_SAMPLE"):
        UserLeakProbe(1, sample_every=0)


def test_kernel_probe_validates_the_sample_rate_and_bounds() -> None:
    from memtop.errors import MemtopError
    from memtop.probes.leaks import KernelLeakProbe

    with pytest.raises(MemtopError, match="LEAK_SAMPLE"):
        KernelLeakProbe(sample_every=0)
    probe = KernelLeakProbe(sample_every=8, max_allocs=4096)
    assert probe.effective_sample_rate == 8
    assert "-DMAX_ALLOCS=4096" in probe.cflags()
    with pytest.raises(MemtopError, match="MAX_ALLOCS"):
        KernelLeakProbe(max_allocs=10).cflags()
    assert KernelLeakProbe().effective_sample_rate == AdaptiveSampler().rate


def test_stack_sweep_keeps_stacks_stored_after_the_aggregates_were_read(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A stack stored between reading the aggregates and sweeping belongs to a new allocation: keep it.
    Only a stack already in the map at the previous sweep and referenced by neither read goes. (Sweeping
    it at once put a burst of new allocations on [stack lost] in a real recording.)"""
    import memtop.probes.leaks as probes_leaks
    from memtop.probes.leaks import KernelLeakProbe

    class Key:
        def __init__(self, value: int) -> None:
            self.value = value

    class Table(dict):  # type: ignore[type-arg]
        def keys(self):  # type: ignore[no-untyped-def]
            return [Key(k) for k in list(super().keys())]

    stacks = Table({1: "referenced", 2: "stored after the aggregates were read"})
    probe = KernelLeakProbe(sample_every=1)
    probe.bpf = {b"stacks": stacks, b"outstanding": Table(), b"comms": Table()}

    def delete(name: bytes, keys: list[bytes]) -> list[bytes]:  # BatchDeleter's contract, on the dicts
        fmt = "=i" if name == b"stacks" else "=I"
        for key in keys:
            probe.bpf[name].pop(struct.unpack(fmt, key)[0])
        return []

    monkeypatch.setattr(probe, "_delete", delete)
    clock = iter([100.0, 200.0])
    monkeypatch.setattr(probes_leaks.time, "monotonic", lambda: next(clock))
    probe._prune({1}, set())
    assert set(stacks) == {1, 2}  # the new stack survives its first sweep
    probe._prune({1}, set())
    assert set(stacks) == {1}  # listed at the previous sweep, unreferenced by two reads: swept


def test_empty_aggregates_are_pruned_in_one_call_once_empty_over_two_reads(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An aggregate that reads empty once may be refilled by the next allocation on its stack: only one empty
    at two reads in a row goes, and all of those go in one delete (a call each was most of a busy host's
    leak read)."""
    from memtop.probes.leaks import KernelLeakProbe

    calls: list[tuple[bytes, list[bytes]]] = []
    probe = KernelLeakProbe(sample_every=1)
    monkeypatch.setattr(probe, "_delete", lambda name, keys: calls.append((name, list(keys))) or [])
    probe._prune_empty({b"a": (0, 0), b"b": (0, 0), b"x": (64, 1)})
    probe._prune_empty({b"b": (0, 0), b"c": (0, 0), b"a": (0, 0), b"x": (0, 0)})
    probe._prune_empty({b"d": (0, 0), b"x": (-64, -1)})  # negative: a free's CPU copy without its alloc's
    assert calls == [(b"outstanding", []), (b"outstanding", [b"a", b"b"]), (b"outstanding", [])]


def test_thinning_corrects_only_the_entries_it_deleted(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An address freed between the scan and the delete took itself off its aggregate: not corrected."""
    from memtop.probes.leaks import UserLeakProbe

    probe = UserLeakProbe(pid=1)
    monkeypatch.setattr(probe, "_delete", lambda name, keys: [b"freed..."])
    probe._extra = {b"kept....": (0, 1, 8, b"agg"), b"freed...": (0, 1, 8, b"agg")}
    probe._delete_tracked([b"kept....", b"freed..."], [(b"agg", -64, -4), (b"agg", -32, -2)])
    assert probe._corrections == {b"agg": (-64, -4)}
    assert probe._thinned == 1 and b"kept...." not in probe._extra and b"freed..." in probe._extra


@pytest.mark.parametrize("cpus", [1, 2, 3, 4])
def test_aggregates_sum_every_cpus_copy(monkeypatch, cpus: int) -> None:  # type: ignore[no-untyped-def]
    """A per-CPU aggregate holds each CPU's (bytes, allocations); a free on another CPU than its allocation
    makes a copy negative: only the sum means anything."""
    from memtop.probes.leaks import AGG_KEY, KernelLeakProbe

    entries = {
        AGG_KEY.pack(1, 100, 0, 0): [(64, 1)] + [(0, 0)] * (cpus - 1),
        AGG_KEY.pack(2, 100, 0, 0): [(-32 * (c % 2) or 96, -(c % 2) or 3) for c in range(cpus)],
    }
    keys = b"".join(entries)
    values = b"".join(struct.pack("<qq", b, a) for per_cpu in entries.values() for b, a in per_cpu)
    probe = KernelLeakProbe(sample_every=1)
    monkeypatch.setattr(probe, "_entries", lambda name: (keys, values, len(entries)))
    expected = {
        key: (sum(b for b, _ in per_cpu), sum(a for _, a in per_cpu)) for key, per_cpu in entries.items()
    }
    assert probe._aggregates() == expected
    assert expected[AGG_KEY.pack(1, 100, 0, 0)] == (64, 1)
    monkeypatch.setattr(probe, "_entries", lambda name: (b"", b"", 0))
    assert probe._aggregates() == {}


def test_names_go_once_a_process_has_no_aggregate_left_empty_or_not(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The BPF program writes a process's name when it creates one of its aggregates. A process whose tracked
    allocations were all freed keeps only empty aggregates: its name must still go once those are pruned
    (counting only non-empty aggregates left such names in the map until it was full: 15,648 of 16,384
    after 20 minutes of 5,000 busy processes, 10 % replaced a minute)."""
    from memtop.probes.leaks import AGG_KEY, COUNTER_NAMES, KernelLeakProbe, _Ages

    probe = KernelLeakProbe(sample_every=1)
    seen: list[set[int]] = []
    monkeypatch.setattr(probe, "counters", lambda: dict.fromkeys(COUNTER_NAMES, 0))
    monkeypatch.setattr(probe, "_read_ages", lambda now_ns: _Ages(now_ns))
    monkeypatch.setattr(probe, "_prune_empty", lambda aggregates: None)
    monkeypatch.setattr(probe, "comm", lambda tgid: "x")
    monkeypatch.setattr(probe, "stack_frames", lambda stack_id: ("f",))
    monkeypatch.setattr(probe, "_prune", lambda referenced, tgids: seen.append(tgids))
    live, freed = AGG_KEY.pack(1, 100, 0, 0), AGG_KEY.pack(2, 200, 0, 0)
    reading = probe._read("kernel", {live: (64, 1), freed: (0, 0)})
    assert [s.pid for s in reading.stacks] == [100]  # the empty one is not shown...
    assert seen == [{100, 200}]  # ...but its process still has an aggregate: its name stays for now


def test_reconcile_and_the_age_scan_share_one_read_of_the_address_map(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """reconcile() retires the oldest records of a cache over its live count; the age scan of the same read
    uses that read of the address map (one batch lookup of up to 100k records, not two), without the
    records just retired: their ages must not show as the oldest."""
    import ctypes

    import memtop.probes.leaks as probes_leaks
    from memtop.probes.leaks import AGG_KEY, ALLOC_INFO, CACHE_SHIFT, KernelLeakProbe

    cid = 5
    source = cid << CACHE_SHIFT
    now = 1000 * S
    records = [(256, now - (10 - i) * S, 7, 3, 1, source) for i in range(6)]  # oldest first
    records.append((64, now - 50 * S, 8, 4, 1, 0))  # another process, no cache: never retired
    keys = b"".join(struct.pack("<Q", 0x1000 + i) for i in range(len(records)))
    values = b"".join(ALLOC_INFO.pack(*r) for r in records)
    reads: list[bytes] = []

    def entries(name: bytes) -> tuple[bytes, bytes, int]:
        reads.append(name)
        assert name == b"allocs"
        return keys, values, len(records)

    class Value(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_int64), ("allocations", ctypes.c_int64)]

    agg = AGG_KEY.pack(3, 7, source, 0)

    class Outstanding(dict):  # type: ignore[type-arg]
        class Key:
            @staticmethod
            def from_buffer_copy(raw: bytes) -> bytes:
                return raw

    outstanding = Outstanding({agg: [Value(6 * 256, 6)]})
    probe = KernelLeakProbe(sample_every=1)
    probe.bpf = {b"outstanding": outstanding}
    monkeypatch.setattr(probe, "_entries", entries)
    monkeypatch.setattr(probe, "_delete", lambda name, keys: [])
    monkeypatch.setattr(probes_leaks, "slab_active_objects", lambda: {})
    monkeypatch.setattr(probes_leaks, "cache_limits", lambda active: {cid: ("skbuff_head_cache", 2)})
    corrected = probe.reconcile({agg: (6 * 256, 6)})
    assert corrected[agg] == (2 * 256, 2) and probe.freed_untraced == {"skbuff_head_cache": 4}
    ages = probe._read_ages(now)
    assert reads == [b"allocs"]  # read once, by reconcile
    assert ages.entries == 3 and ages.oldest[(3, 7, source)] == now - 6 * S  # the two newest are left
    assert ages.oldest[(4, 8, 0)] == now - 50 * S
    assert probe._allocs_read is None  # used once: a later read reads the map itself


def test_reconcile_retires_the_oldest_records_of_each_cache_by_weight(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Records in map order (not age order), two with the same timestamp, one of weight 3: reconcile()
    retires the oldest first (ties in map order) until their weights cover the cache's excess, and never a
    record of a cache within its count."""
    import ctypes

    import memtop.probes.leaks as probes_leaks
    from memtop.probes.leaks import AGG_KEY, ALLOC_INFO, CACHE_SHIFT, KernelLeakProbe

    over, within = 5 << CACHE_SHIFT, 6 << CACHE_SHIFT
    now = 1000 * S
    records = [
        (128, now - 3 * S, 7, 3, 1, over),  # 0
        (128, now - 9 * S, 7, 3, 1, over),  # 1: the oldest
        (128, now - 5 * S, 7, 3, 3, over),  # 2: weight 3
        (128, now - 7 * S, 7, 3, 1, over),  # 3: same age as 4, first in the map
        (128, now - 7 * S, 7, 3, 1, over),  # 4
        (64, now - 90 * S, 8, 4, 1, within),  # 5: older than all, but its cache is within its count
    ]
    keys = b"".join(struct.pack("<Q", 0x1000 + i) for i in range(len(records)))
    values = b"".join(ALLOC_INFO.pack(*r) for r in records)
    deleted: list[list[bytes]] = []

    class Value(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_int64), ("allocations", ctypes.c_int64)]

    agg_over, agg_within = AGG_KEY.pack(3, 7, over, 0), AGG_KEY.pack(4, 8, within, 0)

    class Outstanding(dict):  # type: ignore[type-arg]
        class Key:
            @staticmethod
            def from_buffer_copy(raw: bytes) -> bytes:
                return raw

    outstanding = Outstanding({agg_over: [Value(7 * 128, 7)], agg_within: [Value(64, 1)]})
    probe = KernelLeakProbe(sample_every=1)
    probe.bpf = {b"outstanding": outstanding}
    monkeypatch.setattr(probe, "_entries", lambda name: (keys, values, len(records)))
    monkeypatch.setattr(probe, "_delete", lambda name, batch: deleted.append(list(batch)) or [])
    monkeypatch.setattr(probes_leaks, "slab_active_objects", lambda: {})
    limits = {5: ("kmalloc-128", 3), 6: ("dentry", 1)}  # cache 5: 7 tracked, 3 live: 4 to retire
    monkeypatch.setattr(probes_leaks, "cache_limits", lambda active: limits)
    corrected = probe.reconcile({agg_over: (7 * 128, 7), agg_within: (64, 1)})
    # Oldest first: 1 (9 s), then 3 and 4 (7 s, map order), then 2 (5 s, weight 3): 1+1+1+3 = 6 >= 4.
    retired = [struct.unpack("<Q", raw)[0] - 0x1000 for raw in deleted[0]]
    assert retired == [1, 3, 4, 2]
    assert probe.freed_untraced == {"kmalloc-128": 6}
    assert corrected[agg_over] == (128, 1) and corrected[agg_within] == (64, 1)


def test_growth_history_keeps_the_window_and_one_baseline_sample() -> None:
    from memtop.leaks import _History

    history = _History()
    for t in range(0, 100, 5):
        history.add(float(t), t * 10, window_s=60.0)
    times = [t for t, _ in history.samples]
    assert times[0] <= 95 - 60 < times[1] and times[-1] == 95.0  # one sample at or before the window
    assert history.growth() == 10.0 and not history.idle()
    for t in range(100, 200, 5):
        history.add(float(t), 0, window_s=60.0)
    assert history.idle() and len(history.samples) <= 60 // 5 + 1
