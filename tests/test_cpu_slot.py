"""The kmalloc probe's flush of its per-CPU slots, without BPF: retries, deferral and CPU lists."""

from __future__ import annotations

import ctypes
import errno

import pytest

from memtop.errors import MemtopError
from memtop.probes import kmalloc as kmalloc_module
from memtop.probes.base import _TestRunAttr
from memtop.probes.kmalloc import FLUSH_TRIES, KmallocProbe, slots_supported


class _Slot:
    def __init__(self, calls: int) -> None:
        self.calls = calls


class _Slots:
    """km_slot: one value per possible CPU."""

    def __init__(self, calls: list[int]) -> None:
        self.calls = calls

    def getvalue(self, _index: int) -> list[_Slot]:
        return [_Slot(c) for c in self.calls]


def flushing_probe(monkeypatch, answers, pending=None):  # type: ignore[no-untyped-def]
    """A probe whose km_flush runs answer from `answers[cpu]` (return values or exceptions, the last one
    repeated); `pending`: each CPU's slot calls (default: every CPU of `answers` holds some)."""
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
    probe.bpf = {b"km_slot": _Slots(pending if pending is not None else [5] * len(answers))}
    return probe, runs


def test_a_busy_slot_is_flushed_again_until_it_is_free(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [0], 1: [1, 1, 0]})
    assert probe.flush() is True
    assert runs == [0, 1, 1, 1]
    assert probe.flushes_deferred == 0


def test_only_cpus_whose_slot_holds_counts_are_flushed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [0], 1: [0], 2: [0], 3: [0]}, pending=[0, 9, 0, 1])
    assert probe.flush() is True
    assert runs == [1, 3]


def test_a_slot_busy_through_every_try_is_left_to_the_next_read(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [1], 1: [0]})
    assert probe.flush() is False
    assert runs == [0] * FLUSH_TRIES + [1]
    assert probe.flushes_deferred == 1
    assert "1 reads left a CPU's slot for later: busy" in probe.describe()


def test_an_offline_cpu_waits_but_any_other_failure_makes_the_flush_incomplete(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [0], 1: [OSError(errno.ENXIO, "offline")]})
    assert probe.flush() is True  # nothing of an offline CPU can be read: it waits for the CPU
    probe, runs = flushing_probe(monkeypatch, {0: [OSError(errno.EPERM, "BPF_PROG_TEST_RUN: denied")]})
    assert probe.flush() is False and probe.flushes_deferred == 1
    assert "left a CPU's slot for later: BPF_PROG_TEST_RUN: denied" in probe.describe()


def test_without_slots_nothing_is_run(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    probe, runs = flushing_probe(monkeypatch, {0: [0]})
    probe._flush_fd = -1
    assert probe.flush() is True and runs == []


@pytest.mark.parametrize(
    ("release", "supported"),
    [("6.18.44-fc-v657", True), ("5.10.0-28-amd64", True), ("5.4.0-150-generic", False), ("weird", True)],
)
def test_slots_need_linux_5_10(release: str, supported: bool) -> None:
    assert slots_supported(release) is supported


def test_the_test_run_attr_matches_linux_bpf_h() -> None:
    attr = _TestRunAttr
    offsets = {name: getattr(attr, name).offset for name in ("prog_fd", "ctx_size_in", "flags", "cpu")}
    assert offsets == {"prog_fd": 0, "ctx_size_in": 40, "flags": 64, "cpu": 68}
    assert attr.batch_size.offset == 72 and ctypes.sizeof(attr) == 80


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


class _AttachRecorder:
    """What KmallocProbe._attach_irq touches of a bcc.BPF: raw tracepoint attaches, in order."""

    def __init__(self, refuse: bytes = b"") -> None:
        self.refuse = refuse
        self.raw_tracepoint_fds: dict[bytes, int] = {}
        self.order: list[tuple[bytes, bytes]] = []
        self.cleaned = False

    def attach_raw_tracepoint(self, tp: bytes, fn_name: bytes) -> None:
        if tp == self.refuse:
            raise Exception(f"Failed to attach BPF to raw tracepoint {tp!r}")
        self.order.append((tp, fn_name))
        self.raw_tracepoint_fds[tp] = len(self.order)

    def detach_raw_tracepoint(self, tp: bytes) -> None:
        del self.raw_tracepoint_fds[tp]

    def cleanup(self) -> None:
        self.cleaned = True


def test_the_interrupt_depth_programs_attach_every_exit_before_any_entry() -> None:
    """An entry seen whose exit is not would leave its CPU's depth raised (every later kmallocs there
    charged to [irq]); an exit first only saturates at 0. No reset of the depth follows the attach."""
    probe = KmallocProbe()
    probe._irq_tracepoints = [
        (b"softirq", b"softirq_entry", b"softirq_exit"),
        (b"hardirq", b"irq_handler_entry", b"irq_handler_exit"),
    ]
    bpf = _AttachRecorder()
    probe.bpf = bpf
    probe._attach_irq()
    # One program per tracepoint: a hardirq during a softirq's exit program must not find its own exit
    # program already running (the kernel would skip it, and the depth would stay raised).
    assert bpf.order == [
        (b"softirq_exit", b"km_softirq_exit"),
        (b"irq_handler_exit", b"km_hardirq_exit"),
        (b"softirq_entry", b"km_softirq_enter"),
        (b"irq_handler_entry", b"km_hardirq_enter"),
    ]


def test_an_interrupt_program_that_cannot_attach_fails_the_probe_with_nothing_left_attached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = KmallocProbe()
    probe.cpu_slot = False
    probe._irq_tracepoints = [(b"softirq", b"softirq_entry", b"softirq_exit")]
    bpf = _AttachRecorder(refuse=b"softirq_entry")
    monkeypatch.setattr(kmalloc_module.tracefs, "tracepoint_exists", lambda *a: True)
    monkeypatch.setattr(kmalloc_module.tracefs, "tracepoint_dir", lambda *a: None)
    monkeypatch.setattr(probe, "_compile", lambda: setattr(probe, "bpf", bpf))
    with pytest.raises(MemtopError, match="kmalloc probe failed to start: Failed to attach"):
        probe.start()
    assert bpf.order == [(b"softirq_exit", b"km_softirq_exit")]  # attached, then taken off again
    assert bpf.raw_tracepoint_fds == {} and bpf.cleaned and probe.bpf is None
    assert probe.status.status == "error"


def test_a_start_that_fails_after_the_attach_detaches_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever fails after the programs are attached (here the ring buffer), start() closes the probe and
    says why in one line, never leaving the programs attached."""

    class _Ring:
        def open_ring_buffer(self, callback: object) -> None:
            raise Exception("Could not open ring buffer")

    probe = KmallocProbe()
    probe.cpu_slot = False
    closed: list[bool] = []
    monkeypatch.setattr(kmalloc_module.tracefs, "tracepoint_exists", lambda *a: True)
    monkeypatch.setattr(kmalloc_module.tracefs, "tracepoint_dir", lambda *a: None)
    monkeypatch.setattr(probe, "_compile", lambda: setattr(probe, "bpf", {b"tail_events": _Ring()}))
    monkeypatch.setattr(probe, "_track_memcg", lambda: False)
    monkeypatch.setattr(probe, "close", lambda: closed.append(True))
    with pytest.raises(MemtopError, match="kmalloc probe failed to start: Could not open ring buffer"):
        probe.start()
    assert closed == [True] and probe.status.status == "error"
