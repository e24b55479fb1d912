"""TCP connect latency, pure parts: log2 percentiles, the aggregator, grouping, JSON and failure reasons."""

from __future__ import annotations

import ipaddress
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from memtop.tcp import (
    LATENCY_BUCKETS,
    SlowConnect,
    TcpAggregator,
    TcpCounters,
    TcpKey,
    TcpReading,
    TcpRow,
    address_text,
    bucket_lower_bound,
    bucket_upper_bound,
    failure_reason,
    group_rows,
    histogram_pairs,
    merge_histograms,
    percentile,
    row_from_json,
    rows_from_json,
    rows_to_json,
    slow_connects_from_json,
    slow_connects_to_json,
)

WEB = TcpKey(100, 4, "10.0.0.1", 443)
DB = TcpKey(100, 4, "10.0.0.2", 5432)
OTHER_PID_WEB = TcpKey(200, 4, "10.0.0.1", 443)


def hist(**buckets: int) -> tuple[int, ...]:
    """Indexed log2 counts from b<index>=count keywords."""
    counts = [0] * LATENCY_BUCKETS
    for name, count in buckets.items():
        counts[int(name[1:])] = count
    return tuple(counts)


def counters(
    connects: int, failed: int = 0, max_us: int = 0, comm: str = "curl", **buckets: int
) -> TcpCounters:
    return TcpCounters(comm, 7, connects, failed, max_us, hist(**buckets))


def slow(t: float, key: TcpKey = WEB, failed: bool = False, latency_us: int = 300_000) -> SlowConnect:
    return SlowConnect(
        time=t,
        pid=key.pid,
        tid=key.pid + 1,
        comm="curl",
        cgroup_id=7,
        family=key.family,
        saddr="10.0.0.9",
        sport=40000,
        daddr=key.daddr,
        dport=key.dport,
        latency_us=latency_us,
        failed=failed,
        reason="refused" if failed else "",
    )


# -- buckets and percentiles ------------------------------------------------------------------------


def test_bucket_bounds_are_log2_in_microseconds() -> None:
    assert [bucket_lower_bound(i) for i in range(5)] == [0, 1, 2, 4, 8]
    assert [bucket_upper_bound(b) for b in (0, 1, 2, 4, 8)] == [1, 2, 4, 8, 16]
    assert histogram_pairs(hist(b0=1, b3=2, b11=5)) == ((0, 1), (4, 2), (1024, 5))
    with pytest.raises(ValueError):
        bucket_lower_bound(-1)


def test_percentile_of_empty_histogram_is_none() -> None:
    assert percentile((), 50) is None
    assert percentile(((4, 0),), 99) is None


def test_percentile_interpolates_inside_the_bucket_by_rank() -> None:
    # 10 connects in [1024, 2048): the median is halfway through the bucket.
    assert percentile(((1024, 10),), 50) == pytest.approx(1536)
    assert percentile(((1024, 10),), 0) == pytest.approx(1024)
    assert percentile(((1024, 10),), 100) == pytest.approx(2048)
    # 99 fast and 1 slow: p50 in the fast bucket, p99 at the top of it, p100 in the slow one.
    h = ((8, 99), (524288, 1))
    assert 8 <= percentile(h, 50) < 16  # type: ignore[operator]
    assert percentile(h, 99) == pytest.approx(16)
    assert 524288 <= percentile(h, 99.5) < 1048576  # type: ignore[operator]


def test_percentile_is_capped_by_the_known_maximum_and_ignores_bucket_order() -> None:
    h = ((1048576, 1), (2, 3))
    assert percentile(h, 100) == pytest.approx(2097152)
    assert percentile(h, 100, max_us=1_002_411) == pytest.approx(1_002_411)
    assert percentile(h, 50, max_us=1_002_411) == pytest.approx(2 + 2 * (2 / 3))


@pytest.mark.parametrize("q", [-1, 100.5, math.nan])
def test_percentile_rejects_out_of_range_q(q: float) -> None:
    with pytest.raises(ValueError):
        percentile(((1, 1),), q)


def test_merge_histograms_adds_counts_per_bucket() -> None:
    assert merge_histograms(((4, 1), (8, 2)), ((8, 3), (0, 1)), ()) == ((0, 1), (4, 1), (8, 5))


# -- the aggregator --------------------------------------------------------------------------------


def test_first_ingest_counts_everything_since_the_probe_started() -> None:
    agg = TcpAggregator(started_at=100.0)
    agg.ingest(102.0, TcpReading({WEB: counters(10, failed=2, max_us=900, b10=8)}))
    (row,) = agg.rows()
    assert (row.pid, row.daddr, row.dport, row.comm, row.cgroup_id) == (100, "10.0.0.1", 443, "curl", 7)
    assert (row.connects, row.failed) == (10, 2)
    assert row.connects_per_s == pytest.approx(5.0)
    assert row.failed_per_s == pytest.approx(1.0)
    assert row.histogram == ((512, 8),)
    assert row.max_us == 900
    assert 512 <= row.p50_us <= 900  # type: ignore[operator]
    assert row.p99_us == pytest.approx(900)  # capped by the maximum


def test_without_a_start_time_the_first_rates_are_zero() -> None:
    agg = TcpAggregator()
    agg.ingest(5.0, TcpReading({WEB: counters(4, b3=4)}))
    (row,) = agg.rows()
    assert row.connects == 4
    assert row.connects_per_s == 0.0


def test_interval_deltas_rates_and_percentiles_cover_only_the_last_interval() -> None:
    agg = TcpAggregator(started_at=0.0)
    agg.ingest(1.0, TcpReading({WEB: counters(100, b3=100, max_us=7)}))
    agg.ingest(3.0, TcpReading({WEB: counters(110, failed=4, b3=100, b20=6, max_us=1_000_000)}))
    (row,) = agg.rows()
    assert row.connects == 110 and row.failed == 4
    assert row.connects_per_s == pytest.approx(5.0)
    assert row.failed_per_s == pytest.approx(2.0)
    assert row.interval_histogram == ((524288, 6),)
    assert 524288 <= row.interval_p50_us <= 1_000_000  # type: ignore[operator]
    assert 524288 <= row.interval_p90_us <= 1_000_000  # type: ignore[operator]
    assert row.interval_max_us == 1_000_000  # the top of bucket [512 ms, 1 s), capped at the true max
    assert row.p50_us is not None and row.p50_us < 8  # since start the fast ones dominate
    assert row.p90_us is not None and row.p90_us < 8
    assert row.max_us == 1_000_000
    # A quiet interval: no rates, no interval percentiles, totals unchanged.
    agg.ingest(4.0, TcpReading({WEB: counters(110, failed=4, b3=100, b20=6, max_us=1_000_000)}))
    (row,) = agg.rows()
    assert (row.connects_per_s, row.failed_per_s) == (0.0, 0.0)
    assert row.interval_p50_us is None and row.interval_histogram == ()
    assert row.interval_p90_us is None and row.interval_max_us is None
    assert row.connects == 110


def test_a_reset_kernel_entry_counts_as_new_and_totals_never_go_back() -> None:
    agg = TcpAggregator(started_at=0.0)
    agg.ingest(1.0, TcpReading({WEB: counters(50, b4=50, max_us=20)}))
    agg.ingest(2.0, TcpReading({WEB: counters(3, b4=3, max_us=17)}))  # removed and created again
    (row,) = agg.rows()
    assert row.connects == 53
    assert row.connects_per_s == pytest.approx(3.0)
    assert row.histogram == ((8, 53),)
    assert row.max_us == 20
    agg.ingest(3.0, TcpReading({WEB: counters(5, b4=5, max_us=17)}))
    (row,) = agg.rows()
    assert row.connects == 55 and row.connects_per_s == pytest.approx(2.0)


def test_a_disappearing_key_keeps_its_totals_and_counts_fully_when_it_comes_back() -> None:
    agg = TcpAggregator(started_at=0.0)
    agg.ingest(1.0, TcpReading({WEB: counters(10, b2=10), DB: counters(4, b5=4)}))
    agg.ingest(2.0, TcpReading({DB: counters(6, b5=6)}))
    rows = {r.key: r for r in agg.rows()}
    assert rows[WEB].connects == 10 and rows[WEB].connects_per_s == 0.0
    assert rows[WEB].interval_histogram == ()
    assert rows[DB].connects == 6 and rows[DB].connects_per_s == pytest.approx(2.0)
    agg.ingest(3.0, TcpReading({WEB: counters(2, b2=2), DB: counters(6, b5=6)}))
    rows = {r.key: r for r in agg.rows()}
    assert rows[WEB].connects == 12 and rows[WEB].connects_per_s == pytest.approx(2.0)


def test_rows_are_busiest_first() -> None:
    agg = TcpAggregator(started_at=0.0)
    agg.ingest(1.0, TcpReading({WEB: counters(1, b1=1), DB: counters(9, b1=9)}))
    assert [r.key for r in agg.rows()] == [DB, WEB]


def test_slow_connects_are_kept_newest_first_bounded_and_mark_their_rows() -> None:
    agg = TcpAggregator(started_at=0.0, slow_keep=3)
    agg.ingest(1.0, TcpReading({WEB: counters(2, b19=2)}, slow=(slow(10.0), slow(11.0))))
    agg.ingest(2.0, TcpReading({WEB: counters(3, b19=3)}, slow=(slow(12.0), slow(9.0, key=DB, failed=True))))
    assert [s.time for s in agg.slow_connects()] == [12.0, 11.0, 10.0]
    rows = {r.key: r for r in agg.rows()}
    assert rows[WEB].last_slow_at == 12.0
    # A failure whose key the map did not have yet still gets a row (it counts once the map shows it).
    assert rows[DB].last_slow_at == 9.0 and rows[DB].connects == 0


def test_drops_and_in_flight_come_from_the_latest_reading() -> None:
    agg = TcpAggregator(started_at=0.0)
    reading = TcpReading(
        {}, pending_map_full=3, key_map_full=1, slow_lost=2, slow_rate_limited=5, outcome_lost=4
    )
    agg.ingest(1.0, reading)
    assert agg.drops() == {
        "pending_map_full": 3,
        "key_map_full": 1,
        "slow_lost": 2,
        "slow_rate_limited": 5,
        "outcome_lost": 4,
        "recursion_misses": 0,
    }
    assert agg.in_flight() == () and agg.in_flight_count() == 0


def test_forget_drops_rows_and_slow_connects_of_those_processes() -> None:
    agg = TcpAggregator(started_at=0.0)
    agg.ingest(1.0, TcpReading({WEB: counters(1, b1=1), OTHER_PID_WEB: counters(1, b1=1)}, slow=(slow(1.0),)))
    agg.forget([100])
    assert [r.pid for r in agg.rows()] == [200]
    assert agg.slow_connects() == ()


# -- grouping --------------------------------------------------------------------------------------


def _rows() -> tuple[TcpRow, ...]:
    agg = TcpAggregator(started_at=0.0)
    agg.ingest(
        1.0,
        TcpReading(
            {
                WEB: counters(10, failed=1, b4=9, max_us=15),
                DB: counters(5, b10=5, max_us=1000),
                OTHER_PID_WEB: TcpCounters("wget", 9, 4, 0, 2_000_000, hist(b21=4)),
            },
            slow=(slow(0.5, key=OTHER_PID_WEB),),
        ),
    )
    ids = {100: "c0ffee", 200: None}
    return tuple(replace(r, container_id=ids[r.pid]) for r in agg.rows())


def test_group_by_destination_merges_processes() -> None:
    groups = {(g.daddr, g.dport): g for g in group_rows(_rows(), "destination")}
    web = groups[("10.0.0.1", 443)]
    assert web.members == 2
    assert (web.pid, web.comm, web.cgroup_id) == (0, "", 0)  # mixed
    assert (web.connects, web.failed) == (14, 1)
    assert web.connects_per_s == pytest.approx(14.0)
    assert web.histogram == ((8, 9), (1048576, 4))
    assert web.max_us == 2_000_000
    assert web.p99_us is not None and web.p99_us > 1_000_000
    assert web.p50_us is not None and web.p50_us < 16
    assert web.last_slow_at == 0.5
    assert groups[("10.0.0.2", 5432)].members == 1


def test_group_by_process_merges_destinations() -> None:
    groups = {g.pid: g for g in group_rows(_rows(), "process")}
    curl = groups[100]
    assert curl.members == 2 and curl.comm == "curl"
    assert (curl.family, curl.daddr, curl.dport) == (0, "", 0)
    assert curl.connects == 15
    assert curl.histogram == ((8, 9), (512, 5))
    assert groups[200].daddr == "10.0.0.1"  # a single row stays as it was


def test_group_by_container_puts_the_host_in_one_group_and_rejects_unknown_groupings() -> None:
    groups = {g.container_id: g for g in group_rows(_rows(), "container")}
    assert set(groups) == {"c0ffee", None}
    assert groups["c0ffee"].connects == 15 and groups["c0ffee"].pid == 100
    assert [g.connects for g in group_rows(_rows(), "container")] == [15, 4]  # busiest first
    with pytest.raises(ValueError):
        group_rows(_rows(), "port")


# -- JSON ------------------------------------------------------------------------------------------


def test_rows_round_trip_through_json_with_the_snapshot_fields() -> None:
    rows = _rows() + group_rows(_rows(), "destination")
    doc = json.loads(json.dumps(rows_to_json(rows)))
    for field_name in (
        "pid", "comm", "container_id", "daddr", "dport", "family", "connects", "failed",
        "p50_us", "p90_us", "p99_us", "max_us", "histogram",
    ):  # fmt: skip
        assert field_name in doc[0]
    assert doc[0]["histogram"] == {"8": 9}
    assert rows_from_json(doc) == rows


def test_slow_connects_round_trip_through_json() -> None:
    items = (
        slow(1.5),
        slow(2.5, key=DB, failed=True),
        replace(slow(3.0), family=6, saddr="::1", daddr="::1"),
    )
    doc = json.loads(json.dumps(slow_connects_to_json(items)))
    assert slow_connects_from_json(doc) == items


def _good_row() -> dict[str, object]:
    return rows_to_json(_rows()[:1])[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pid": "100"}, "pid"),
        ({"pid": True}, "pid"),
        ({"connects": -1}, "connects"),
        ({"dport": 70000}, "dport"),
        ({"family": 5}, "family"),
        ({"daddr": "10.0.0"}, "daddr"),
        ({"daddr": "::1"}, "daddr"),  # family 4
        ({"p50_us": "fast"}, "p50_us"),
        ({"p99_us": math.inf}, "p99_us"),
        ({"histogram": [[8, 9]]}, "histogram"),
        ({"histogram": {"3": 1}}, "histogram"),
        ({"histogram": {"08": 1}}, "histogram"),
        ({"histogram": {"eight": 1}}, "histogram"),
        ({"histogram": {"8": -1}}, "histogram"),
        ({"failed": 99}, "failed"),
        ({"container_id": 5}, "container_id"),
    ],
)
def test_row_from_json_rejects_bad_input(change: dict[str, object], message: str) -> None:
    item = {**_good_row(), **change}
    with pytest.raises(ValueError, match=message):
        row_from_json(item)


def test_rows_from_json_rejects_non_lists_non_objects_and_missing_fields() -> None:
    with pytest.raises(ValueError, match="list"):
        rows_from_json({"pid": 1})
    with pytest.raises(ValueError, match=r"tcp_connect\[0\]"):
        rows_from_json([3])
    item = _good_row()
    del item["histogram"]
    with pytest.raises(ValueError, match="missing field 'histogram'"):
        rows_from_json([item])


@pytest.mark.parametrize(
    "change",
    [
        {"failed": "yes"},
        {"family": 10},
        {"saddr": "nowhere"},
        {"sport": -1},
        {"time": None},
        {"latency_us": 1.5},
    ],
)
def test_slow_from_json_rejects_bad_input(change: dict[str, object]) -> None:
    item = {**slow_connects_to_json([slow(1.0)])[0], **change}
    with pytest.raises(ValueError):
        slow_connects_from_json([item])
    with pytest.raises(ValueError, match="list"):
        slow_connects_from_json("nope")


# -- failure reasons -------------------------------------------------------------------------------


def test_addresses_are_written_as_inet_ntop_does() -> None:
    assert address_text(ipaddress.ip_address("::ffff:7f00:1")) == "::ffff:127.0.0.1"
    assert address_text(ipaddress.ip_address("2001:db8::1")) == "2001:db8::1"
    assert address_text(ipaddress.ip_address("10.0.0.1")) == "10.0.0.1"
    item = {**rows_to_json(_rows()[:1])[0], "family": 6, "daddr": "::FFFF:7f00:1"}
    assert row_from_json(item).daddr == "::ffff:127.0.0.1"


def test_failure_reason_prefers_the_reported_error() -> None:
    assert failure_reason(111, rst_seen=True, sport=40000) == "refused"
    assert failure_reason(110, rst_seen=False, sport=40000) == "timeout"
    assert failure_reason(113, rst_seen=False, sport=40000) == "host unreachable"
    assert failure_reason(999, rst_seen=False, sport=40000) == "error 999"
    assert failure_reason(0, rst_seen=True, sport=40000) == "refused"
    assert failure_reason(0, rst_seen=False, sport=40000) == "closed"
    assert failure_reason(0, rst_seen=False, sport=0) == "no local port"


def test_tcp_module_imports_neither_textual_nor_bcc() -> None:
    code = (
        "import sys, memtop.tcp\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'bcc')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_view_filter_by_port_address_prefix_network_pid_and_word() -> None:
    from memtop.tcp import TcpRow, filter_tcp_rows

    def row(pid: int, comm: str, daddr: str, dport: int, container: str | None = None) -> TcpRow:
        return TcpRow(pid, comm, 0, 6 if ":" in daddr else 4, daddr, dport, 1, 0, 0.0, 0.0,
                      None, None, None, 0, None, None, (), container_id=container)  # fmt: skip

    rows = [
        row(1, "curl", "10.1.2.3", 443),
        row(2, "nginx", "192.168.0.9", 8080, "c" * 64),
        row(3, "java", "::ffff:10.9.9.9", 5432),
        row(4, "redis-cli", "fd00::1", 6379),
    ]
    pids = lambda text, **kw: [r.pid for r in filter_tcp_rows(rows, text, **kw)]  # noqa: E731
    assert pids("port:443") == [1]
    assert pids("addr:10.0.0.0/8") == [1, 3]  # the v4-mapped address too
    assert pids("addr:fd00::/8") == [4]
    assert pids("10.1.") == [1]
    assert pids("pid:2") == [2]
    assert pids("nginx") == [2] and pids("web", container_names={"c" * 64: "web-1"}) == [2]
    assert pids("port:443 curl") == [1] and pids("port:443 java") == []
    assert pids("addr:not-a-network/99") == []
    assert len(pids("")) == 4


def test_ipv4_mapped_ipv6_destination_groups_with_its_ipv4_address() -> None:
    """A dual-stack socket's connect to ::ffff:10.0.0.1 is the same endpoint as 10.0.0.1 (issue #13)."""
    agg = TcpAggregator(started_at=0.0)
    mapped = TcpKey(300, 6, "::ffff:10.0.0.1", 443)
    agg.ingest(1.0, TcpReading({WEB: counters(3, b4=3), mapped: counters(2, b4=2), DB: counters(1, b4=1)}))
    groups = {(g.family, g.daddr, g.dport): g for g in group_rows(agg.rows(), "destination")}
    assert set(groups) == {(4, "10.0.0.1", 443), (4, "10.0.0.2", 5432)}
    assert groups[(4, "10.0.0.1", 443)].members == 2 and groups[(4, "10.0.0.1", 443)].connects == 5
    # a real IPv6 destination stays itself
    v6 = TcpKey(300, 6, "fd00::1", 443)
    agg.ingest(2.0, TcpReading({v6: counters(1, b4=1)}))
    assert (6, "fd00::1", 443) in {
        (g.family, g.daddr, g.dport) for g in group_rows(agg.rows(), "destination")
    }
