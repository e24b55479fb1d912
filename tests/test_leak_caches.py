"""Unit tests: slab cache ids and limits used to retire allocations freed without a tracepoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtop.probes.leaks import KMALLOC_CLASS, cache_id, cache_limits, kmalloc_size_class, slab_active_objects
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
