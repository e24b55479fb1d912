"""The kmalloc probe's flush of its per-CPU slots, without BPF: retries, deferral and CPU lists."""

from __future__ import annotations

import errno

import pytest

from memtop.probes import kmalloc as kmalloc_module
from memtop.probes.kmalloc import FLUSH_TRIES, KmallocProbe, parse_cpu_list


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0\n", [0]), ("0-3\n", [0, 1, 2, 3]), ("0-1,4,6-7\n", [0, 1, 4, 6, 7]), ("", [])],
)
def test_cpu_lists_in_the_kernels_format(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


def flushing_probe(monkeypatch, answers):  # type: ignore[no-untyped-def]
    """A probe whose km_flush runs answer from `answers[cpu]` (a list of return values or exceptions)."""
    runs: list[int] = []

    def run_on_cpu(fd: int, cpu: int) -> int:
        runs.append(cpu)
        answer = answers[cpu].pop(0) if len(answers[cpu]) > 1 else answers[cpu][0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(kmalloc_module, "run_on_cpu", run_on_cpu)
    monkeypatch.setattr(kmalloc_module.time, "sleep", lambda _s: None)
    probe = KmallocProbe()
    probe._flush_fd = 7
    probe._online_cpus = sorted(answers)
    return probe, runs


def test_a_busy_slot_is_flushed_again_until_it_is_free(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [0], 1: [1, 1, 0]})
    assert probe.flush() is True
    assert runs == [0, 1, 1, 1]
    assert probe.flushes_deferred == 0


def test_a_slot_busy_through_every_try_is_left_to_the_next_read(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [1], 1: [0]})
    assert probe.flush() is False
    assert runs == [0] * FLUSH_TRIES + [1]
    assert probe.flushes_deferred == 1


def test_a_cpu_gone_offline_makes_the_flush_read_the_online_list_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [0], 1: [OSError(errno.ENXIO, "offline")]})
    monkeypatch.setattr(kmalloc_module, "online_cpus", lambda: [0])
    assert probe.flush() is True  # nothing of an offline CPU can be read: not a deferral
    assert probe._online_cpus == [0]
    runs.clear()
    probe.flush()
    assert runs == [0]


def test_without_slots_nothing_is_run(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [0]})
    probe._flush_fd = -1
    assert probe.flush() is True and runs == []


class _Table:
    class Key:
        def __init__(self, tgid: int, gen: int) -> None:
            self.key = (tgid, gen)

    def __init__(self) -> None:
        self.deleted: list[tuple[int, int]] = []

    def getvalue(self, _index: int) -> list[int]:
        return [1, 0]  # every counter 1 on one CPU: PIDs were reused, names were written

    def __delitem__(self, key: Key) -> None:
        self.deleted.append(key.key)


@pytest.mark.parametrize("complete", [True, False])
def test_a_retired_generation_is_final_only_after_a_complete_flush(complete: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """tgid 5's generation 0 was retired (gens says 1). Its counts are final, and deleted from the kernel,
    only when every CPU's slot was flushed; otherwise a slot may still hold some: it is left for the next
    read (and not shown as the live process either)."""
    probe = KmallocProbe()
    tables = {name: _Table() for name in (b"km_counters", b"pid_stats", b"proc_comms")}
    probe.bpf = tables
    monkeypatch.setattr(probe, "flush", lambda: complete)
    monkeypatch.setattr(
        probe, "_read_pid_stats", lambda: [((5, 0), (10, 2560, 2560)), ((5, 1), (3, 768, 768))]
    )
    monkeypatch.setattr(
        probe, "_read_names", lambda: {(5, 0): ("old", 0, 0, 0, 7), (5, 1): ("new", 0, 0, 0, 9)}
    )
    monkeypatch.setattr(probe, "_int_entries", lambda name: {5: 1} if name == b"gens" else {})
    monkeypatch.setattr(probe, "recursion_misses", lambda: 0)
    reading = probe.read()
    assert reading.per_tgid[5].calls == 3  # the live generation either way
    if complete:
        assert [(r.tgid, r.counters.calls) for r in reading.retired] == [(5, 10)]
        assert tables[b"pid_stats"].deleted == [(5, 0)] and tables[b"proc_comms"].deleted == [(5, 0)]
    else:
        assert reading.retired == () and tables[b"pid_stats"].deleted == []
