"""How often the live source reads the kernel leak aggregates (thousands of stacks on a busy host): every
tick while a view shows them, otherwise about every LEAK_READ_EVERY_S. No BPF: the probes are not started."""

from __future__ import annotations

from memtop.config import Config
from memtop.sources import LEAK_READ_EVERY_S, LiveSource


def due_ticks(source: LiveSource, interval: float, ticks: int, visible_from: int | None = None) -> list[int]:
    out = []
    for n in range(ticks):
        if visible_from is not None and n == visible_from:
            source.set_leaks_visible(True)
        if source._leaks_due(False, now=1000.0 + n * interval):
            out.append(n)
    return out


def test_hidden_leaks_are_read_every_5_s_at_a_1_s_interval() -> None:
    source = LiveSource(Config(interval_s=1.0))
    assert LEAK_READ_EVERY_S == 5.0
    assert due_ticks(source, 1.0, 16) == [0, 5, 10, 15]


def test_shown_leaks_are_read_every_tick() -> None:
    source = LiveSource(Config(interval_s=1.0))
    assert due_ticks(source, 1.0, 8, visible_from=3) == [0, 3, 4, 5, 6, 7]
    source.set_leaks_visible(False)
    assert not source._leaks_due(False, now=1008.0)
    assert source._leaks_due(True, now=1008.0)  # a full snapshot (export, headless) always reads


def test_a_5_s_recorder_reads_every_tick_even_a_little_early() -> None:
    source = LiveSource(Config(interval_s=5.0))
    assert due_ticks(source, 4.9, 5) == [0, 1, 2, 3, 4]


def test_adapt_asks_for_a_read_when_map_overflows_start_not_while_they_go_on() -> None:
    """A map that stays full (live objects, more stacks than it holds) makes no full read every tick."""
    from memtop.probes.leaks import KernelLeakProbe

    probe = KernelLeakProbe(sample_every=64)  # a fixed 1 in N: nothing else in adapt() needs the kernel
    full = iter([0, 0, 5, 9, 12, 12, 12, 20, 20])
    names = ("alloc_events", "tracked", "frees_matched", "missed_frees", "aggregate_map_full")
    probe.counters = lambda: {"alloc_map_full": next(full), **dict.fromkeys(names, 0)}  # type: ignore[method-assign]
    assert [probe.adapt() for _ in range(9)] == [False, False, True, False, False, False, False, True, False]
