"""Unit tests: slab cache ids and limits used to retire allocations freed without a tracepoint."""

from __future__ import annotations

from pathlib import Path

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
