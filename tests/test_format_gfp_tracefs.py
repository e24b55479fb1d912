from memtop import format as fmt
from memtop.gfp import decode_gfp, parse_gfp_table
from memtop.procinfo import parse_proc_cgroup
from memtop.tracefs import parse_format

from .conftest import DATA

KMALLOC_FORMAT = """name: kmalloc
ID: 658
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned long call_site;\toffset:8;\tsize:8;\tsigned:0;
\tfield:size_t bytes_req;\toffset:24;\tsize:8;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;
"""


def test_sizes_and_rates() -> None:
    assert fmt.size(512) == "512 B"
    assert fmt.size(1536) == "1.5 KiB"
    assert fmt.size_rate(3 * 1024 * 1024) == "3.0 MiB/s"
    assert fmt.size(None) == "-"


def test_counts_and_durations() -> None:
    assert fmt.count(999) == "999"
    assert fmt.count(1_234_567) == "1.23M"
    assert fmt.count_rate(2500) == "2.50k/s"
    assert fmt.short_duration(93784) == "1d 2h"
    assert fmt.short_duration(42) == "42s"
    assert fmt.iso_utc(0) == "1970-01-01T00:00:00Z"
    assert fmt.size_bucket(8) == "256 B–511 B"


def test_gfp_decoding_uses_the_kernel_table() -> None:
    table = parse_gfp_table((DATA / "kmalloc_print_fmt_6.18.txt").read_text())
    assert len(table) > 20
    assert decode_gfp(0xCC0, table) == "GFP_KERNEL"
    assert decode_gfp(0xDC0, table) == "GFP_KERNEL|__GFP_ZERO"
    assert decode_gfp(0x400CC0, table) == "GFP_KERNEL_ACCOUNT"
    assert decode_gfp(0x820, table) == "GFP_ATOMIC"
    assert decode_gfp(0, table) == "none"
    assert decode_gfp(1 << 40, table) == hex(1 << 40)
    assert decode_gfp(0xCC0, []) == "0xcc0"


def test_parse_format_fields() -> None:
    fields = parse_format(KMALLOC_FORMAT)
    assert fields["call_site"].offset == 8 and fields["call_site"].size == 8
    assert fields["daddr_v6"].size == 16
    assert "common_type" in fields


def test_proc_cgroup_prefers_v1_memory_then_unified() -> None:
    hybrid = "12:memory:/docker/abc\n1:name=systemd:/system.slice/x\n0::/system.slice/x\n"
    assert parse_proc_cgroup(hybrid) == "/docker/abc"
    assert parse_proc_cgroup("0::/kubepods/pod1/c1\n") == "/kubepods/pod1/c1"
    assert parse_proc_cgroup("garbage") == ""
