#!/usr/bin/env python3
"""Recording budget: bytes per sample, the recorder's CPU, and the time to open a sample.

Synthetic snapshots of a busy host (default 1,000 active processes, 50 containers, 200 leak stacks,
20 TCP rows, 5 OOM kills with their pre-kill histories) go through the recorder's real writer
(msgspec MessagePack + zstd with key-frame dictionaries + SQLite WAL). Rates drift every sample and a
few processes come and go, as on a real host.

  python bench/record_bench.py                  # 720 samples (an hour at 5 s), extrapolated to 24 h
  python bench/record_bench.py --open-gib 1     # also grow the file to 1 GiB and time opening samples
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memtop.leaks import LeakRow  # noqa: E402
from memtop.model import ProbeStatus  # noqa: E402
from memtop.oom import OomEvent  # noqa: E402
from memtop.recording import RecordingSource, RecordingWriter  # noqa: E402
from memtop.store import ContainerRow, HistoryPoint, HostInfo, ProcessRow, Snapshot  # noqa: E402
from memtop.tcp import TcpRow  # noqa: E402

T0 = 1_790_000_000.0


class Host:
    """A host whose processes' counters grow a little every sample."""

    def __init__(self, processes: int, containers: int, stacks: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.containers = [f"{self.rng.getrandbits(256):064x}" for _ in range(containers)]
        self.next_pid = 1000
        self.procs = [self._new_proc(T0) for _ in range(processes)]
        self.stacks = stacks
        self.kills = [
            OomEvent(
                time=T0 - 3600 * (i + 1),
                source="kmsg",
                victim_pid=50000 + i,
                victim_comm="java",
                cgroup_path=f"/kubepods/pod{i}/{self.containers[i % containers]}",
                container_id=self.containers[i % containers],
                history=tuple(HistoryPoint(T0 - 60 + s, 1e6 * s, 1e3 * s, 1 << 28) for s in range(0, 60, 5)),
            )
            for i in range(5)
        ]

    def _new_proc(self, t: float) -> ProcessRow:
        self.next_pid += 1
        cid = self.rng.choice(self.containers) if self.rng.random() < 0.7 else None
        name = self.rng.choice(["nginx", "java", "python3", "postgres", "envoy", "node", "redis-server"])
        return ProcessRow(
            pid=self.next_pid,
            start_time=t - self.rng.random() * 86400,
            comm=name,
            cmdline=f"/usr/bin/{name} --config /etc/{name}/{self.next_pid}.conf --workers 4",
            user="www-data",
            state="S",
            cgroup_path=f"/kubepods/burstable/pod{cid[:8]}/{cid}" if cid else "/system.slice/x.service",
            container_id=cid,
            container=cid[:12] if cid else "",
            unit="" if cid else "x.service",
            rss_bytes=self.rng.randrange(1 << 20, 1 << 30, 4096),
            vms_bytes=self.rng.randrange(1 << 28, 1 << 34, 4096),
            threads=self.rng.randrange(1, 64),
        )

    def snapshot(self, i: int, interval: float) -> Snapshot:
        t = T0 + i * interval
        rng = self.rng
        procs = []
        for row in self.procs:
            rate = rng.expovariate(1 / 20000.0)
            calls = rate / 128
            procs.append(
                ProcessRow(
                    **{
                        **row.__dict__,
                        "kmalloc_bytes_per_s": rate,
                        "kmalloc_calls_per_s": calls,
                        "kmalloc_bytes": row.kmalloc_bytes + int(rate * interval),
                        "kmalloc_calls": row.kmalloc_calls + int(calls * interval),
                        "kmalloc_bytes_req": row.kmalloc_bytes_req + int(rate * interval * 0.8),
                        "rss_bytes": (row.rss_bytes or 0) + rng.randrange(-8192, 16384, 4096),
                    }
                )
            )
        for _ in range(3):  # churn: a few processes exit, a few start
            procs.pop(rng.randrange(len(procs)))
            procs.append(self._new_proc(t))
        self.procs = procs
        containers = tuple(
            ContainerRow(
                id=cid,
                runtime="containerd",
                cgroup_path=f"/kubepods/burstable/pod{cid[:8]}/{cid}",
                name=f"app-{n}",
                pod_name=f"app-{n}-7d9f8",
                namespace="prod",
                pids=tuple(p.pid for p in procs if p.container_id == cid),
                kmalloc_bytes_per_s=sum(p.kmalloc_bytes_per_s for p in procs if p.container_id == cid),
                memory_bytes=rng.randrange(1 << 28, 1 << 31, 4096),
                memory_limit_bytes=1 << 31,
            )
            for n, cid in enumerate(self.containers)
        )
        leaks = tuple(
            LeakRow(
                kind="kernel",
                stack_id=s,
                pid=None,
                comm="kworker",
                pids=(1000 + s, 2000 + s),
                outstanding_bytes=s * 4096 + i * 64,
                allocations=s * 10 + i,
                oldest_age_s=float(i * interval),
                growth_bytes_per_s=12.5 * s,
                top_frame=f"fn_{s}+0x1a",
                stack=tuple(f"kernel_fn_{s}_{d}+0x{d * 7:x}" for d in range(12)),
            )
            for s in range(self.stacks)
        )
        tcp = tuple(
            TcpRow(
                pid=1000 + k,
                comm="envoy",
                cgroup_id=k,
                family=4,
                daddr=f"10.0.0.{k}",
                dport=443,
                connects=i * 10 + k,
                failed=k,
                connects_per_s=2.0,
                failed_per_s=0.0,
                p50_us=800.0,
                p90_us=1600.0,
                p99_us=3200.0,
                max_us=6400,
                interval_p50_us=None,
                interval_p99_us=None,
                histogram=((512, i + 1), (1024, i + 2)),
            )
            for k in range(20)
        )
        return Snapshot(
            taken_at=t,
            duration_s=i * interval,
            interval_s=interval,
            host=HostInfo("bench", "6.18.0", T0 - 86400),
            probes={n: ProbeStatus("running") for n in ("kmalloc", "oom", "tcpconnect", "leaks")},
            processes=tuple(procs),
            kmalloc_bytes_per_s=sum(p.kmalloc_bytes_per_s for p in procs),
            containers=containers,
            oom_events=tuple(self.kills),
            leaks=leaks,
            tcp_connect=tcp,
            tcp_slow_ms=200,
        )


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=720)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--stacks", type=int, default=200)
    parser.add_argument("--open-gib", type=float, default=0.0, help="grow the file to this size, time opens")
    parser.add_argument("--db", type=Path, default=None)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="memtop-record-bench."))
    try:
        return run(args, args.db or directory / "bench.db")
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # the database too, unless --db put it elsewhere


def run(args: argparse.Namespace, path: Path) -> int:
    host = Host(args.processes, 50, args.stacks)
    snaps = [host.snapshot(i, args.interval) for i in range(args.samples)]  # made before timing
    writer = RecordingWriter(path, retention_s=1e9, max_bytes=1 << 40, interval_s=args.interval)
    raw_total = 0
    start_cpu, start = cpu(), time.perf_counter()
    for snap in snaps:
        raw_total += len(writer.encode(snap))
    encode_cpu = cpu() - start_cpu
    start_cpu, start = cpu(), time.perf_counter()
    for snap in snaps:
        writer.write(snap)
    write_cpu = cpu() - start_cpu
    wall = time.perf_counter() - start
    writer.close()
    size = path.stat().st_size
    per_sample = size / args.samples
    day = 86400 / args.interval * per_sample
    cpu_share = write_cpu / (args.samples * args.interval) * 100
    print(f"samples: {args.samples} of {args.processes} processes, {args.stacks} leak stacks, 50 containers")
    print(
        f"encoded (MessagePack) per sample: {raw_total / args.samples / 1024:.0f} KiB "
        f"(encode alone {encode_cpu / args.samples * 1000:.1f} ms)"
    )
    print(
        f"on disk per sample: {per_sample / 1024:.1f} KiB"
        f"  -> 24 h at {args.interval:g}s: {day / 2**30:.2f} GiB"
    )
    print(
        f"recorder CPU per sample: {write_cpu / args.samples * 1000:.1f} ms "
        f"(wall {wall / args.samples * 1000:.1f} ms) = {cpu_share:.2f} % of a core at {args.interval:g}s"
    )
    if args.open_gib:
        grow(path, int(args.open_gib * 2**30), args.interval)
        time_opens(path)
    return 0


def grow(path: Path, target: int, interval: float) -> None:
    """Copy the recorded hour forward in time until the file holds `target` bytes (same blobs)."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    ids = conn.execute("SELECT min(id), max(id), max(t) - min(t) FROM samples").fetchone()
    first, last, span = ids
    count = last - first + 1
    shift = 0
    while path.stat().st_size < target:
        shift += 1
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO samples(id, t, key_id, size, data) SELECT id + ?, t + ?, key_id + ?, size, data "
            "FROM samples WHERE id BETWEEN ? AND ?",
            (shift * count, shift * (span + interval), shift * count, first, last),
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    n = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
    conn.close()
    print(f"grown to {path.stat().st_size / 2**30:.2f} GiB, {n} samples")


def source_interval(source: RecordingSource) -> float:
    times = source.reader.times
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def time_opens(path: Path) -> None:
    rng = random.Random(2)
    start = time.perf_counter()
    source = RecordingSource(path)
    source.tick()
    first_open = time.perf_counter() - start
    times = []
    for _ in range(20):
        t0, t1 = source.span
        target = rng.uniform(t0, t1)
        start = time.perf_counter()
        source.seek(target)
        source.tick()
        times.append(time.perf_counter() - start)
    drill = []
    for _ in range(5):
        t0, t1 = source.span
        source.seek(rng.uniform(t0, t1))
        snap = source.tick()
        source.set_focus(snap.processes[0].key)
        start = time.perf_counter()
        source.tick()
        drill.append(time.perf_counter() - start)
        source.set_focus(None)
    source.close()
    drill.sort()
    neighbours = round(600 / source_interval(source))
    print(
        f"drill into a process (10 min of history rebuilt from {neighbours} samples): "
        f"median {drill[len(drill) // 2] * 1000:.0f} ms"
    )
    times.sort()
    print(f"open the recording and show its newest sample: {first_open * 1000:.0f} ms")
    print(
        f"jump to a random sample: median {times[len(times) // 2] * 1000:.0f} ms,"
        f" max {times[-1] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
