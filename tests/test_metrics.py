"""The metrics sink on synthetic snapshots: names, labels, monotonic counters, top N, grace period, real
histogram buckets, the exposition checked by `promtool check metrics`, content negotiation over HTTP, and
the command line's checks of --metrics-listen. No root, no BPF."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Mapping
from dataclasses import replace

import pytest

from memtop.cli import main
from memtop.errors import MemtopError
from memtop.leaks import LeakRow
from memtop.metrics import (
    LATENCY_LE_S,
    OTHER,
    MetricsOptions,
    MetricsServer,
    MetricsSink,
    describe_series,
    metric_names,
    parse_listen,
    render,
)
from memtop.model import ProbeStatus
from memtop.oom import OomEvent
from memtop.store import ContainerRow, HostInfo, ProcessRow, Snapshot
from memtop.tcp import TcpRow, histogram_pairs

CID = "a" * 64
CID2 = "b" * 64


def container(cid: str = CID, kbytes: int = 0, kcalls: int = 0, **kw: object) -> ContainerRow:
    fields: dict[str, object] = dict(
        id=cid,
        runtime="containerd",
        cgroup_path=f"/kubepods/burstable/pod1234/{cid}",
        name="web",
        pod_name="web-0",
        namespace="shop",
        kmalloc_bytes=kbytes,
        kmalloc_calls=kcalls,
        memory_bytes=300 << 20,  # the working set
        memory_usage_bytes=340 << 20,  # raw usage, page cache included
        memory_limit_bytes=512 << 20,
        pids=(10, 11),
    )
    fields.update(kw)
    return ContainerRow(**fields)  # type: ignore[arg-type]


def proc(
    pid: int, comm: str, kbytes: int, unit: str = "", cid: str | None = None, **kw: object
) -> ProcessRow:
    return ProcessRow(
        pid=pid,
        start_time=100.0 + pid,
        comm=comm,
        unit=unit,
        container_id=cid,
        kmalloc_bytes=kbytes,
        kmalloc_calls=kbytes // 64,
        **kw,  # type: ignore[arg-type]
    )


def tcp_row(
    pid: int, dport: int, connects: int, failed: int, latencies_us: Mapping[int, int], **kw: object
) -> TcpRow:
    counts = [0] * 32
    for bucket, n in latencies_us.items():
        counts[bucket] += n
    return TcpRow(
        pid=pid,
        comm="curl",
        cgroup_id=7,
        family=4,
        daddr="127.0.0.1",
        dport=dport,
        connects=connects,
        failed=failed,
        connects_per_s=0.0,
        failed_per_s=0.0,
        p50_us=None,
        p90_us=None,
        p99_us=None,
        max_us=0,
        interval_p50_us=None,
        interval_p99_us=None,
        histogram=histogram_pairs(counts),
        **kw,  # type: ignore[arg-type]
    )


def snap(t: float, **kw: object) -> Snapshot:
    fields: dict[str, object] = dict(
        taken_at=t,
        duration_s=t - 1000.0,
        interval_s=1.0,
        host=HostInfo("node-1", "6.18.0"),
        probes={"kmalloc": ProbeStatus("running"), "tcp": ProbeStatus("error", "no tracepoint")},
        processes=(),
    )
    fields.update(kw)
    return Snapshot(**fields)  # type: ignore[arg-type]


def samples(sink: MetricsSink, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(labels.items())): value for n, labels, value in describe_series(sink) if n == name}


def value(sink: MetricsSink, name: str, **labels: str) -> float | None:
    found = [
        v
        for n, lab, v in describe_series(sink)
        if n == name and all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


# -- listen addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9640", ("127.0.0.1", 9640)), ("[::1]:0", ("::1", 0)), ("0.0.0.0:80", ("0.0.0.0", 80))],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9640", ":9640", "::1:9640", "[::1:9640", "[nothost]:1", "h:99999", "h:x"])
def test_bad_listen_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_bad_listen_address_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["exporter", "--metrics-listen", "9640"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HOST:PORT" in err


@pytest.mark.parametrize("args", [["--metrics-top", "0"], ["--metrics-grace", "-1"]])
def test_bad_metrics_options_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["exporter", *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_port_in_use_is_a_one_line_error() -> None:
    sink = MetricsSink(process_metrics=False)
    first = MetricsServer(sink.registry, "127.0.0.1", 0)
    try:
        with pytest.raises(MemtopError, match="cannot serve metrics on 127.0.0.1:"):
            MetricsServer(sink.registry, "127.0.0.1", first.port)
    finally:
        first.close()


# -- what is exported ---------------------------------------------------------------------------------


def test_containers_are_labelled_as_kubernetes_users_join_on() -> None:
    sink = MetricsSink(process_metrics=False)
    sink.on_snapshot(snap(1001.0, containers=(container(kbytes=4096, kcalls=16),)))
    labels = dict(namespace="shop", pod="web-0", container="web", container_id=CID, runtime="containerd")
    assert value(sink, "memtop_kmalloc_bytes_total", **labels) == 4096
    assert value(sink, "memtop_kmalloc_calls_total", **labels) == 16
    assert value(sink, "memtop_container_memory_limit_bytes", **labels) == 512 << 20
    assert value(sink, "memtop_container_memory_usage_bytes", **labels) == 340 << 20
    assert value(sink, "memtop_container_memory_working_set_bytes", **labels) == 300 << 20
    assert value(sink, "memtop_container_processes", **labels) == 2
    assert value(sink, "memtop_containers") == 1
    assert value(sink, "memtop_build_info", kernel="6.18.0") == 1


def test_unlimited_container_has_no_limit_series() -> None:
    sink = MetricsSink(process_metrics=False)
    sink.on_snapshot(snap(1001.0, containers=(container(memory_limit_bytes=None),)))
    assert value(sink, "memtop_container_memory_limit_bytes") is None


def test_counters_add_growth_and_never_go_back() -> None:
    """A container whose totals restart (it left the store and came back) keeps counting up."""
    sink = MetricsSink(process_metrics=False)
    sink.on_snapshot(snap(1001.0, containers=(container(kbytes=1000),)))
    sink.on_snapshot(snap(1002.0, containers=(container(kbytes=1500),)))
    assert value(sink, "memtop_kmalloc_bytes_total", container_id=CID) == 1500
    sink.on_snapshot(snap(1003.0, containers=(container(kbytes=200),)))  # reset: 200 new bytes
    assert value(sink, "memtop_kmalloc_bytes_total", container_id=CID) == 1700


def test_host_processes_group_by_unit_else_command_and_exits_do_not_lower_counters() -> None:
    sink = MetricsSink(process_metrics=False)
    procs = (
        proc(1, "sshd", 100, unit="ssh.service"),
        proc(2, "sshd", 50, unit="ssh.service"),
        proc(3, "bash", 30),
    )
    sink.on_snapshot(snap(1001.0, processes=procs))
    assert value(sink, "memtop_kmalloc_bytes_total", unit="ssh.service", command="") == 150
    assert value(sink, "memtop_kmalloc_bytes_total", unit="", command="bash") == 30
    # pid 2 leaves the store (exited long ago); pid 1 goes on
    sink.on_snapshot(snap(1002.0, processes=(proc(1, "sshd", 400, unit="ssh.service"), procs[2])))
    assert value(sink, "memtop_kmalloc_bytes_total", unit="ssh.service") == 450


def test_top_n_host_groups_and_the_rest_as_other_add_up_to_the_total() -> None:
    sink = MetricsSink(MetricsOptions(top=2), process_metrics=False)
    procs = tuple(proc(i, f"cmd{i}", i * 1000) for i in range(1, 6))
    sink.on_snapshot(snap(1001.0, processes=procs))
    host = samples(sink, "memtop_kmalloc_bytes_total")
    commands = {dict(k)["command"] for k in host}
    assert commands == {"cmd5", "cmd4", OTHER}
    assert sum(host.values()) == sum(p.kmalloc_bytes for p in procs)
    # cmd1 becomes the busiest for a long while: it enters the top 2, and nothing goes backwards
    before = samples(sink, "memtop_kmalloc_bytes_total")
    t = 1001.0
    for _ in range(300):
        t += 1.0
        procs = tuple(
            replace(p, kmalloc_bytes=p.kmalloc_bytes + (10_000 if p.pid == 1 else 0)) for p in procs
        )
        sink.on_snapshot(snap(t, processes=procs))
    after = samples(sink, "memtop_kmalloc_bytes_total")
    assert "cmd1" in {dict(k)["command"] for k in after}
    assert all(after.get(k, v) >= v for k, v in before.items())
    assert sum(after.values()) == sum(p.kmalloc_bytes for p in procs)


def test_gone_container_is_exported_for_the_grace_period_then_dropped() -> None:
    sink = MetricsSink(MetricsOptions(grace_s=30), process_metrics=False)
    sink.on_snapshot(snap(1001.0, containers=(container(kbytes=10),)))
    sink.on_snapshot(snap(1020.0))
    assert value(sink, "memtop_kmalloc_bytes_total", container_id=CID) == 10  # the counter lingers
    assert value(sink, "memtop_container_memory_usage_bytes", container_id=CID) is None  # gauges do not
    sink.on_snapshot(snap(1040.0))
    assert value(sink, "memtop_kmalloc_bytes_total", container_id=CID) is None


def oom(t: float, pid: int, source: str = "tracepoint", cid: str | None = CID, **kw: object) -> OomEvent:
    fields: dict[str, object] = dict(
        time=t,
        source=source,
        victim_pid=pid,
        victim_comm="java",
        trigger_comm="java",
        constraint="memcg",
        container_id=cid,
        pod_name="web-0" if cid else "",
        namespace="shop" if cid else "",
        cgroup_path=f"/kubepods/burstable/pod1234/{cid}" if cid else "/user.slice",
    )
    fields.update(kw)
    return OomEvent(**fields)  # type: ignore[arg-type]


def test_oom_kills_count_each_live_kill_once_with_its_cause() -> None:
    sink = MetricsSink(process_metrics=False)
    backlog = oom(900.0, 5, source="kmsg")  # before memtop started: not counted
    sink.on_snapshot(snap(1001.0, containers=(container(),), oom_events=(backlog,)))
    assert value(sink, "memtop_oom_kills_total") is None
    first = oom(1001.5, 10)
    sink.on_snapshot(snap(1002.0, containers=(container(),), oom_events=(first, backlog)))
    sink.on_snapshot(snap(1003.0, containers=(container(),), oom_events=(first, backlog)))
    labels = dict(container_id=CID, pod="web-0", namespace="shop", container="web", constraint="memcg")
    assert value(sink, "memtop_oom_kills_total", victim_comm="java", trigger_comm="java", **labels) == 1
    host = oom(1003.5, 11, cid=None, constraint="global", victim_comm="chrome", trigger_comm="kswapd0")
    sink.on_snapshot(snap(1004.0, oom_events=(host, first, backlog)))  # the container is gone now
    assert (
        value(sink, "memtop_oom_kills_total", container_id="", constraint="global", victim_comm="chrome") == 1
    )
    assert value(sink, "memtop_oom_kills_total", container_id=CID) == 1  # within the grace period


def test_oom_kill_of_a_container_memtop_never_listed_takes_labels_from_the_event() -> None:
    sink = MetricsSink(process_metrics=False)
    sink.on_snapshot(snap(1002.0, oom_events=(oom(1001.5, 10, cid=CID2),)))
    assert value(sink, "memtop_oom_kills_total", container_id=CID2, container=CID2[:12], pod="web-0") == 1


def test_tcp_histogram_has_real_cumulative_buckets_in_seconds() -> None:
    sink = MetricsSink(process_metrics=False)
    # bucket 5 = [16, 32) us, bucket 11 = [1024, 2048) us; 3 connects failed
    row = tcp_row(10, 8080, connects=10, failed=3, latencies_us={5: 4, 11: 3}, container_id=CID)
    sink.on_snapshot(snap(1001.0, containers=(container(),), tcp_connect=(row,)))
    assert value(sink, "memtop_tcp_connects_total", container_id=CID, port="8080") == 10
    assert value(sink, "memtop_tcp_connect_failures_total", container_id=CID, port="8080") == 3
    buckets = {
        float(labels["le"]): v
        for n, labels, v in describe_series(sink)
        if n == "memtop_tcp_connect_latency_seconds_bucket"
    }
    assert len(buckets) == len(LATENCY_LE_S) + 1
    assert buckets[16e-6] == 0 and buckets[32e-6] == 4
    assert buckets[1024e-6] == 4 and buckets[2048e-6] == 7
    assert buckets[float("inf")] == 7
    assert "address" not in next(
        lab for n, lab, _ in describe_series(sink) if n == "memtop_tcp_connects_total"
    )


def test_tcp_destination_address_only_when_asked() -> None:
    sink = MetricsSink(MetricsOptions(dest_addr=True), process_metrics=False)
    row = tcp_row(10, 443, connects=2, failed=0, latencies_us={9: 2})
    sink.on_snapshot(snap(1001.0, tcp_connect=(row,)))
    assert value(sink, "memtop_tcp_connects_total", address="127.0.0.1", port="443", container_id="") == 2


def test_tcp_ports_beyond_the_top_n_go_to_other_per_container() -> None:
    sink = MetricsSink(MetricsOptions(top=1), process_metrics=False)
    rows = (tcp_row(10, 80, 5, 0, {9: 5}), tcp_row(10, 81, 2, 0, {9: 2}), tcp_row(10, 82, 1, 1, {}))
    sink.on_snapshot(snap(1001.0, tcp_connect=rows))
    connects = {dict(k)["port"]: v for k, v in samples(sink, "memtop_tcp_connects_total").items()}
    assert connects == {"80": 5, OTHER: 3}


def leak(pid: int, frame: str, outstanding: int, growth: float = 0.0) -> LeakRow:
    return LeakRow(
        "kernel", pid, None, "w", (pid,), outstanding, outstanding // 64, 5.0, growth, frame, (frame,)
    )


def test_leaks_by_container_and_top_frame_with_the_rest_as_other() -> None:
    sink = MetricsSink(MetricsOptions(top=2), process_metrics=False)
    procs = (proc(10, "web", 0, cid=CID), proc(20, "bash", 0))
    leaks = (
        leak(10, "alloc_a", 9000, 10.0),
        leak(10, "alloc_b", 5000),
        leak(10, "alloc_c", 100),
        leak(20, "h", 7000),
    )
    sink.on_snapshot(snap(1001.0, containers=(container(),), processes=procs, leaks=leaks))
    series = {
        (dict(k)["container_id"], dict(k)["top_frame"]): v
        for k, v in samples(sink, "memtop_leak_outstanding_bytes").items()
    }
    assert series == {(CID, "alloc_a"): 9000, ("", "h"): 7000, (CID, OTHER): 5100}
    assert value(sink, "memtop_leak_growth_bytes_per_second", top_frame="alloc_a") == 10.0


def test_probe_health_and_drops() -> None:
    sink = MetricsSink(process_metrics=False)
    sink.on_snapshot(
        snap(1001.0, drops={"pid_map_full": 3, "tcp_slow_lost": 2, "leak_user_alloc_map_full": 1})
    )
    sink.on_snapshot(
        snap(1002.0, drops={"pid_map_full": 5, "tcp_slow_lost": 2, "leak_user_alloc_map_full": 1})
    )
    assert value(sink, "memtop_probe_up", probe="kmalloc", status="running") == 1
    assert value(sink, "memtop_probe_up", probe="tcp", status="error") == 0
    assert value(sink, "memtop_dropped_events_total", probe="kmalloc", reason="pid_map_full") == 5
    assert value(sink, "memtop_dropped_events_total", probe="tcp", reason="slow_lost") == 2
    assert value(sink, "memtop_dropped_events_total", probe="leaks-user", reason="alloc_map_full") == 1


def test_every_served_name_is_declared() -> None:
    sink = MetricsSink()
    row = tcp_row(10, 80, 5, 0, {9: 5})
    sink.on_snapshot(
        snap(
            1001.0,
            containers=(container(),),
            processes=(proc(10, "web", 10, cid=CID), proc(1, "init", 5)),
            oom_events=(oom(1000.5, 3),),
            tcp_connect=(row,),
            leaks=(leak(10, "f", 100),),
            drops={"pid_map_full": 1},
            leak_sample_rates={"kernel": 4},
        )
    )
    served = {n for n, _, _ in describe_series(sink) if not n.startswith("process_")}
    assert served == metric_names()


# -- the exposition, checked by the real linter -------------------------------------------------------


def busy_sink() -> MetricsSink:
    sink = MetricsSink(MetricsOptions(dest_addr=True))
    sink.on_snapshot(
        snap(
            1001.0,
            containers=(
                container(kbytes=10),
                container(CID2, name="", pod_name="", namespace="", runtime="docker"),
            ),
            processes=(proc(10, 'we"ird\\name', 10, cid=CID), proc(1, "init", 5, unit="init.scope")),
            oom_events=(oom(1000.5, 3),),
            tcp_connect=(tcp_row(10, 80, 5, 1, {0: 1, 9: 2, 31: 1}, container_id=CID),),
            leaks=(leak(10, "f", 100),),
            drops={"pid_map_full": 1},
        )
    )
    return sink


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed"
)
def test_promtool_check_metrics_passes() -> None:
    """promtool lints the Prometheus text format (it does not read OpenMetrics: see the next test)."""
    text = render(busy_sink())
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_openmetrics_output_parses_strictly() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(render(busy_sink(), openmetrics=True))}
    assert families["memtop_kmalloc_bytes"].type == "counter"
    assert families["memtop_tcp_connect_latency_seconds"].type == "histogram"
    assert families["memtop_oom_kills"].samples[0].name == "memtop_oom_kills_total"


@pytest.mark.parametrize(
    ("accept", "content_type", "tail"),
    [
        ("", "text/plain; version=0.0.4", "\n"),
        ("application/openmetrics-text; version=1.0.0", "application/openmetrics-text", "# EOF\n"),
    ],
)
def test_server_negotiates_the_format(accept: str, content_type: str, tail: str) -> None:
    sink = busy_sink()
    server = MetricsServer(sink.registry, "127.0.0.1", 0)
    try:
        request = urllib.request.Request(server.url, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith(content_type)
    finally:
        server.close()
    assert body.endswith(tail)
    assert "memtop_kmalloc_bytes_total{" in body and "process_resident_memory_bytes" in body


def test_the_metrics_sink_imports_neither_textual_nor_bcc() -> None:
    """An exporter is a sink: no probe work, no UI (checked in a fresh interpreter)."""
    import sys

    code = (
        "import sys, memtop.metrics\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'bcc'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_a_stuck_scrape_does_not_hold_up_the_next_snapshot() -> None:
    """The collector thread never waits for a scrape: while one is stuck inside collect(), on_snapshot
    still completes and the next scrape serves the new snapshot."""
    import threading

    sink = MetricsSink(process_metrics=False)
    sink.on_snapshot(snap(1001.0, containers=(container(kbytes=10),)))
    inside, release = threading.Event(), threading.Event()

    class Stuck:
        def collect(self):  # type: ignore[no-untyped-def]
            inside.set()
            release.wait(30)
            return iter(())

    sink.registry.register(Stuck())  # type: ignore[arg-type]
    server = MetricsServer(sink.registry, "127.0.0.1", 0)
    scrape = threading.Thread(target=lambda: urllib.request.urlopen(server.url, timeout=60).read())
    scrape.start()
    try:
        assert inside.wait(30), "the scrape never reached collect()"
        sink.on_snapshot(snap(1002.0, containers=(container(kbytes=50),)))  # returns while it is stuck
        assert scrape.is_alive()
        served = {
            s.labels["container_id"]: s.value
            for family in sink.collect()  # the sink itself: the registry would wait on the stuck collector
            for s in family.samples
            if s.name == "memtop_kmalloc_bytes_total"
        }
        assert served[CID] == 50
    finally:
        release.set()
        scrape.join(timeout=30)
        server.close()
