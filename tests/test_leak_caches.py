"""Unit tests: slab cache ids and limits used to retire allocations freed without a tracepoint."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memtop.probes.leaks import (
    CACHE_SHIFT,
    KMALLOC_CLASS,
    cache_id,
    cache_limits,
    kmalloc_size_class,
    slab_active_objects,
)
from memtop.screens.leaks import untraced_text


def test_kmalloc_size_classes() -> None:
    assert kmalloc_size_class("kmalloc-64") == 64
    assert kmalloc_size_class("kmalloc-cg-2k") == 2048
    assert kmalloc_size_class("dma-kmalloc-96") == 96
    assert kmalloc_size_class("kmalloc-rnd-03-8k") == 8192
    assert kmalloc_size_class("kmalloc_buckets") is None
    assert kmalloc_size_class("skbuff_head_cache") is None


def test_cache_ids_use_the_first_15_bytes_and_fit_23_bits() -> None:
    assert cache_id("ext4_groupinfo_4k") == cache_id("ext4_groupinfo_1k"[:15] + "zz")
    assert cache_id("skbuff_head_cache") != cache_id("skbuff_fclone_cache")
    assert all(0 <= cache_id(n) < KMALLOC_CLASS for n in ("a", "kmalloc-64", "x" * 40))


def test_limits_per_cache_and_per_kmalloc_size_class(tmp_path: Path) -> None:
    slabinfo = tmp_path / "slabinfo"
    slabinfo.write_text(
        "slabinfo - version: 2.1\n# name <active_objs> ...\n"
        "skbuff_head_cache 353 400 256 16 1 : tunables 0 0 0 : slabdata 25 25 0\n"
        "kmalloc-cg-64 256 256 64 64 1 : tunables 0 0 0 : slabdata 4 4 0\n"
        "kmalloc-64 3948 4032 64 64 1 : tunables 0 0 0 : slabdata 63 63 0\n"
    )
    active = slab_active_objects(slabinfo)
    assert active == {"skbuff_head_cache": 353, "kmalloc-cg-64": 256, "kmalloc-64": 3948}
    limits = cache_limits(active)
    assert limits[cache_id("skbuff_head_cache")] == ("skbuff_head_cache", 353)
    assert limits[KMALLOC_CLASS | 64] == ("kmalloc-64", 256 + 3948)


def test_panel_note_names_the_caches_with_untraced_frees() -> None:
    assert untraced_text({"leak_missed_frees": 3}) == ""
    text = untraced_text({"leak_freed_untraced:skbuff_head_cache": 900, "leak_freed_untraced:kmalloc-64": 10})
    assert text == " · freed untraced 910 (skbuff_head_cache, kmalloc-64)"


def test_raw_tracepoints_only_where_the_record_is_the_raw_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memtop import tracefs
    from memtop.probes.base import raw_args_match

    event = tmp_path / "events" / "kmem" / "kfree"
    event.mkdir(parents=True)
    event.joinpath("format").write_text(
        "name: kfree\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:unsigned long call_site;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\tfield:const void * ptr;\toffset:16;\tsize:8;\tsigned:0;\n"
    )
    monkeypatch.setattr(tracefs, "tracefs_root", lambda: tmp_path)
    assert raw_args_match("kmem", "kfree", ("call_site", "ptr"))
    assert not raw_args_match("kmem", "kfree", ("ptr", "call_site"))
    assert not raw_args_match("kmem", "kmalloc", ("call_site", "ptr"))  # no such event here


def test_the_longest_syn_retry_time() -> None:
    from memtop.probes.tcp import SYN_TIMEOUT_MARGIN_S, syn_timeout_s

    assert syn_timeout_s(6) == 127 + SYN_TIMEOUT_MARGIN_S  # 1+2+4+...+64 s
    assert syn_timeout_s(0) == 1 + SYN_TIMEOUT_MARGIN_S
    assert syn_timeout_s(8) == 1 + 2 + 4 + 8 + 16 + 32 + 64 + 120 + 120 + SYN_TIMEOUT_MARGIN_S  # capped RTO


# -- the cache learner's windows (raw kmem_cache_alloc) ----------------------------------------------------


class _FakeConfig:
    def __init__(self) -> None:
        self.value = type("Config", (), {"sample_every": 1, "learning": 0})()

    def __getitem__(self, _key: object) -> object:
        return self.value

    def __setitem__(self, _key: object, value: object) -> None:
        self.value = value


class _FakeBpf:
    """What the learner's logic touches of a bcc.BPF: the config map, cache_info, (de)attach."""

    def __init__(self) -> None:
        self.maps: dict[bytes, object] = {b"config": _FakeConfig(), b"cache_info": {}}
        self.attached: list[tuple[bytes, bytes]] = []

    def __getitem__(self, name: bytes) -> object:
        return self.maps[name]

    def attach_tracepoint(self, tp: bytes, fn_name: bytes) -> None:
        self.attached.append((tp, fn_name))

    def detach_tracepoint(self, tp: bytes) -> None:
        self.attached = [a for a in self.attached if a[0] != tp]


class _FakeTimer:
    """threading.Timer, fired by the test."""

    made: list[_FakeTimer] = []

    def __init__(self, interval: float, function: Callable[..., None], args: tuple[object, ...] = ()) -> None:
        self.interval, self.function, self.args = interval, function, args
        self.daemon = False
        self.started = self.cancelled = False
        _FakeTimer.made.append(self)

    def start(self) -> None:
        self.started = True

    def cancel(self) -> None:
        self.cancelled = True


def _learning_probe(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, _FakeBpf, list[float]]:
    from memtop.probes import leaks

    clock = [100.0]
    monkeypatch.setattr(leaks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(leaks.threading, "Timer", _FakeTimer)
    _FakeTimer.made = []
    probe = leaks.KernelLeakProbe(sample_every=1)
    probe.raw_cache_alloc = True
    bpf = _FakeBpf()
    probe.bpf = bpf
    return probe, bpf, clock


def test_the_learner_is_on_for_one_timed_window_and_again_only_for_an_unknown_cache_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memtop.probes.leaks import LEARN_WINDOW_S, LEARNER

    probe, bpf, _clock = _learning_probe(monkeypatch)
    config = bpf.maps[b"config"]
    new_key = itertools.count()
    monkeypatch.setattr(probe, "_learned_keys", lambda: {next(new_key)})  # every window learns one more
    probe._start_learning()  # as start() does
    assert probe.learning and bpf.attached == [(b"kmem:kmem_cache_alloc", LEARNER)]
    assert config.value.learning == 1  # the window's number
    (timer,) = _FakeTimer.made
    assert timer.started and timer.daemon and timer.interval == LEARN_WINDOW_S  # ends it, ticks or not
    probe.tend_learning(5)  # the counter grows during the window (caches' first allocations): no change
    assert probe.learning and len(bpf.attached) == 1 and len(_FakeTimer.made) == 1
    monkeypatch.setattr(probe, "counters", lambda: {"cache_unlearned": 7})
    timer.function(*timer.args)  # the window is over
    assert not probe.learning and bpf.attached == [] and config.value.learning == 0
    probe.tend_learning(6)  # a read that began before the window ended: its growth was the window's
    probe.tend_learning(7)
    assert not probe.learning and probe.learning_windows == 1
    probe.tend_learning(8)  # a sampled allocation from an unknown cache, after the window
    assert probe.learning and config.value.learning == 2 and len(bpf.attached) == 1
    probe.end_learning()  # close() and the benchmarks: off at once, its timer cancelled
    assert not probe.learning and bpf.attached == [] and _FakeTimer.made[-1].cancelled
    # A timer that had already fired (its callback waiting for the lock) when it was cancelled must not
    # end the window that began since.
    late = _FakeTimer.made[-1]
    probe.tend_learning(20)
    assert probe.learning and config.value.learning == 3
    late.function(*late.args)
    assert probe.learning and len(bpf.attached) == 1
    probe.end_learning()
    probe.hold_learning = True
    probe.tend_learning(25)
    assert not probe.learning and probe.learning_windows == 3
    probe.hold_learning = False
    probe.end_learning(closing=True)  # close(): a tick still running cannot start a window after it
    probe.tend_learning(30)
    assert not probe.learning and bpf.attached == [] and probe.learning_windows == 3


def test_a_learner_that_cannot_attach_is_reported_and_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memtop.probes.leaks import LEARN_RETRY_S

    probe, bpf, clock = _learning_probe(monkeypatch)
    attach = bpf.attach_tracepoint

    def refuse(tp: bytes, fn_name: bytes) -> None:
        raise Exception("Failed to attach BPF program b'kmem_cache_alloc_learner' to tracepoint")

    monkeypatch.setattr(bpf, "attach_tracepoint", refuse)
    probe.tend_learning(1)
    assert not probe.learning and probe.learner_error.startswith("Failed to attach")
    assert "sizes not learned (Failed to attach" in probe.describe()
    monkeypatch.setattr(bpf, "attach_tracepoint", attach)
    probe.tend_learning(2)  # not on every tick
    assert not probe.learning
    clock[0] += LEARN_RETRY_S
    probe.tend_learning(3)
    assert probe.learning and probe.learner_error == "" and "learned from the classic" in probe.describe()


class _Learned:
    def __init__(self, name: str, bytes_alloc: int) -> None:
        self.source = cache_id(name) << CACHE_SHIFT
        self.bytes_alloc = bytes_alloc


def test_learned_caches_that_are_gone_or_of_another_size_are_dropped_to_be_learned_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe, _bpf, _clock = _learning_probe(monkeypatch)
    learned = {
        struct.pack("<Q", 1): _Learned("filp", 192),
        struct.pack("<Q", 2): _Learned("gone_cache", 64),
        struct.pack("<Q", 3): _Learned("dentry", 200),
    }

    def entries(name: bytes) -> list[tuple[bytes, _Learned]]:
        assert name == b"cache_info"
        return list(learned.items())

    def delete(name: bytes, keys: list[bytes]) -> list[bytes]:
        return [key for key in keys if learned.pop(key, None) is None]

    monkeypatch.setattr(probe, "_struct_entries", entries)
    monkeypatch.setattr(probe, "_delete", delete)
    slabinfo = {"filp": (203, 192), "dentry": (100, 192)}
    assert probe.check_learned(slabinfo) == 2  # destroyed; at a destroyed cache's address, another size
    assert set(learned) == {struct.pack("<Q", 1)} and probe.caches_relearned == 2
    assert probe.check_learned({}) == 0 and len(learned) == 1  # slabinfo unreadable: nothing is dropped


def test_a_window_whose_config_write_fails_takes_the_learner_off_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe, bpf, _clock = _learning_probe(monkeypatch)

    def broken(window: int) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(probe, "_set_learning", broken)
    probe._start_learning()
    assert not probe.learning and bpf.attached == [] and "Operation not permitted" in probe.learner_error


def test_windows_that_learn_no_cache_wait_longer_each_time_and_a_full_table_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache whose allocations never join (cache_info full, say) must not keep the classic learner on."""
    from memtop.probes.leaks import LEARN_GAP_MAX_S, LEARN_WINDOW_S, MAX_CACHES

    probe, _bpf, clock = _learning_probe(monkeypatch)
    learned: dict[bytes, object] = {}
    monkeypatch.setattr(probe, "_struct_entries", lambda name: list(learned.items()))
    monkeypatch.setattr(probe, "counters", lambda: {"cache_unlearned": 0})
    unlearned = [0]

    def read() -> bool:  # a read that saw a sampled allocation from an unknown cache
        unlearned[0] += 1
        probe.tend_learning(unlearned[0])
        return probe.learning

    def window_ends() -> None:
        timer = _FakeTimer.made[-1]
        clock[0] += LEARN_WINDOW_S
        timer.function(*timer.args)

    probe._start_learning()
    learned[b"a"] = object()
    window_ends()  # it learned a cache: the next window may begin at once
    assert read()
    gaps = []
    for _ in range(10):
        window_ends()  # it learned nothing
        start = clock[0]
        while not read():
            clock[0] += 0.5
        gaps.append(clock[0] - start)
    assert gaps == [2, 4, 8, 16, 32, 64, 128, 256, LEARN_GAP_MAX_S, LEARN_GAP_MAX_S]
    learned[b"b"] = object()
    window_ends()  # it learned one: no wait again
    assert read()
    window_ends()
    assert "table is full" not in probe.describe()
    # A window during which a read dropped a stale entry and the learner learned another one learned one.
    clock[0] += LEARN_GAP_MAX_S  # past the last window's wait
    assert read()
    del learned[b"a"]
    learned[b"c"] = object()
    window_ends()
    assert probe._learn_gap_s == 0 and read()
    window_ends()
    learned.update({i.to_bytes(8, "little"): object() for i in range(MAX_CACHES)})
    probe._learned_keys()
    assert f"table is full at {MAX_CACHES:,} caches" in probe.describe()
    # A probe started again (a new object) does not inherit the wait, nor the full table.
    probe._learn_gap_s, probe._next_window_at = LEARN_GAP_MAX_S, clock[0] + LEARN_GAP_MAX_S
    probe.end_learning(closing=True)
    learned.clear()
    monkeypatch.setattr(probe, "_missing", lambda: [])
    probe._host_bpf = probe.bpf  # started inside the kmalloc probe's object: no compile here
    probe.start()
    assert probe.learning and "table is full" not in probe.describe()
