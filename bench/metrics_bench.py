#!/usr/bin/env python3
"""What the Prometheus exporter costs: per tick (MetricsSink.on_snapshot) and per scrape (collect and
serialize, Prometheus text and OpenMetrics), on a synthetic snapshot of a busy node.

No root, no BPF: the snapshot is made up (5,000 processes by default: host processes in 300 commands and
40 systemd units, 100 containers, 400 TCP (process, destination) rows, 300 leak stacks, 20 OOM kills), and
each tick every process's counters grow, as on a live host. The per-scrape figure is what one HTTP scrape
costs the exporter's thread minus the socket; the series count is what Prometheus ingests per scrape.

    .venv/bin/python bench/metrics_bench.py [--processes 5000] [--ticks 30] [--scrapes 30] [--top 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics  # noqa: E402

from memtop.leaks import LeakRow  # noqa: E402
from memtop.metrics import MetricsOptions, MetricsSink  # noqa: E402
from memtop.model import ProbeStatus  # noqa: E402
from memtop.oom import OomEvent  # noqa: E402
from memtop.store import ContainerRow, HostInfo, ProcessRow, Snapshot  # noqa: E402
from memtop.tcp import TcpRow, histogram_pairs  # noqa: E402


def synthetic(processes: int, containers: int, seed: int = 1) -> Snapshot:
    rng = random.Random(seed)
    cids = [f"{i:064x}" for i in range(1, containers + 1)]
    rows = []
    for pid in range(1, processes + 1):
        in_container = rng.random() < 0.6
        cid = rng.choice(cids) if in_container else None
        unit = f"svc{rng.randrange(40)}.service" if not in_container and rng.random() < 0.3 else ""
        rows.append(
            ProcessRow(
                pid=pid,
                start_time=1000.0 + pid,
                comm=f"cmd{rng.randrange(300)}",
                container_id=cid,
                unit=unit,
                kmalloc_bytes=rng.randrange(1 << 20),
                kmalloc_calls=rng.randrange(1 << 14),
            )
        )
    crow = tuple(
        ContainerRow(
            id=cid,
            runtime="containerd",
            cgroup_path=f"/kubepods/burstable/pod{i}/{cid}",
            name=f"c{i}",
            pod_name=f"pod-{i}",
            namespace=f"ns{i % 10}",
            kmalloc_bytes=rng.randrange(1 << 30),
            kmalloc_calls=rng.randrange(1 << 20),
            memory_bytes=rng.randrange(1 << 30),
            memory_limit_bytes=1 << 30,
            pids=(1, 2, 3),
        )
        for i, cid in enumerate(cids)
    )
    tcp = []
    for i in range(400):
        counts = [0] * 32
        for _ in range(20):
            counts[rng.randrange(5, 20)] += rng.randrange(100)
        tcp.append(
            TcpRow(
                pid=rng.randrange(1, processes),
                comm="client",
                cgroup_id=i,
                family=4,
                daddr=f"10.0.{i % 250}.{i % 7}",
                dport=rng.choice((80, 443, 5432, 6379, 8080, 9090, 3306)) + i % 3,
                connects=sum(counts) + 5,
                failed=5,
                connects_per_s=0.0,
                failed_per_s=0.0,
                p50_us=None,
                p90_us=None,
                p99_us=None,
                max_us=0,
                interval_p50_us=None,
                interval_p99_us=None,
                histogram=histogram_pairs(counts),
                container_id=rng.choice(cids),
            )
        )
    leaks = tuple(
        LeakRow(
            "kernel",
            i,
            None,
            "w",
            (rng.randrange(1, processes),),
            rng.randrange(1 << 24),
            100,
            60.0,
            rng.random() * 100,
            f"frame_{i % 120}",
            (f"frame_{i % 120}",),
        )
        for i in range(300)
    )
    ooms = tuple(
        OomEvent(
            time=1000.0 + i,
            source="tracepoint",
            victim_pid=i,
            victim_comm=f"v{i % 5}",
            trigger_comm="t",
            constraint="memcg",
            container_id=cids[i % containers],
        )
        for i in range(20)
    )
    return Snapshot(
        taken_at=2000.0,
        duration_s=1000.0,
        interval_s=5.0,
        host=HostInfo("bench", platform.release()),
        probes={name: ProbeStatus("running") for name in ("kmalloc", "oom", "tcp", "leaks")},
        processes=tuple(rows),
        containers=crow,
        tcp_connect=tuple(tcp),
        leaks=leaks,
        oom_events=ooms,
        drops={"pid_map_full": 0, "tcp_slow_lost": 0, "leak_alloc_map_full": 0},
    )


def grown(snap: Snapshot, tick: int, interval: float) -> Snapshot:
    """The next tick: every process and container allocated a little more."""
    return replace(
        snap,
        taken_at=snap.taken_at + tick * interval,
        processes=tuple(
            replace(
                p,
                kmalloc_bytes=p.kmalloc_bytes + tick * (p.pid % 97) * 64,
                kmalloc_calls=p.kmalloc_calls + tick,
            )
            for p in snap.processes
        ),
        containers=tuple(replace(c, kmalloc_bytes=c.kmalloc_bytes + tick * 4096) for c in snap.containers),
    )


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"{statistics.median(values) * 1e3:.2f} ms (p95 {p95 * 1e3:.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5000)
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    base = synthetic(args.processes, args.containers)
    ticks = [grown(base, i, 5.0) for i in range(args.ticks)]  # built before timing
    sink = MetricsSink(MetricsOptions(top=args.top))
    tick_s = []
    for snap in ticks:
        t0 = time.perf_counter()
        sink.on_snapshot(snap)
        tick_s.append(time.perf_counter() - t0)
    text_s, om_s = [], []
    for _ in range(args.scrapes):
        t0 = time.perf_counter()
        text = generate_latest(sink.registry)
        text_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate_openmetrics(sink.registry)
        om_s.append(time.perf_counter() - t0)
    series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))

    print(f"| what ({args.processes} processes, {args.containers} containers, top {args.top}) | cost |")
    print("|---|---|")
    print(f"| per tick: on_snapshot | {ms(tick_s)} |")
    print(f"| per scrape: Prometheus text | {ms(text_s)} |")
    print(f"| per scrape: OpenMetrics | {ms(om_s)} |")
    print(f"| series per scrape | {series} ({len(text) / 1024:.0f} KiB of text) |")
    print(f"\nmachine: {platform.machine()}, Python {platform.python_version()}, {platform.release()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "processes": args.processes,
                    "containers": args.containers,
                    "top": args.top,
                    "tick_s": tick_s,
                    "scrape_text_s": text_s,
                    "scrape_openmetrics_s": om_s,
                    "series": series,
                    "bytes": len(text),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
