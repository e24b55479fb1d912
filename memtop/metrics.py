"""Prometheus metrics: a sink that takes each new Snapshot, and a prometheus_client collector that serves it.

The collector (`MetricsSink`) never touches a probe: `on_snapshot(snap)` runs in the collector's thread after
each tick and turns the snapshot into plain series (label values -> numbers); `collect()` runs in the HTTP
server's thread at each scrape and wraps the latest series in prometheus_client metric families. A scrape
therefore costs what the exported series cost (bounded by `top`), never what the probes or the processes
cost, and a slow scrape cannot delay a tick (they share nothing but one reference swapped per tick).

Counters are kept here, not copied from the store: each member that feeds a series (a container, a host
process, a TCP (process, destination) key, a drop counter) hands over its cumulative total every tick, and
the series adds the member's growth since the previous tick (as `memtop.store.counter_delta`: a total
that went backwards was reset and counts from zero). So a series never goes backwards even when a process
leaves the store, when a group falls out of the top N (its later growth goes to the "[other]" series), or
when a container comes back with fresh totals; and the series of one metric always add up to the node's total.

Cardinality (see docs/metrics.md): every container present (bounded by the node), plus the top N (`top`)
host groups, leak (container, stack frame) pairs and TCP (container, port) pairs; the rest of each is summed
into a series labelled "[other]". A container or group that is gone stops being exported `grace_s` after it
was last seen (counters linger so that their last growth is scraped; gauges describe the present only).
"""

from __future__ import annotations

import ipaddress
import math
import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from memtop import __version__
from memtop.containers import parse_cgroup_path
from memtop.errors import MemtopError
from memtop.store import Snapshot
from memtop.tcp import LATENCY_BUCKETS

DEFAULT_LISTEN = "127.0.0.1:9640"
DEFAULT_TOP = 20
DEFAULT_GRACE_S = 300.0
RANK_WINDOW_S = 60.0  # the top N are ranked by their rate averaged (exponentially) over about this long
OTHER = "[other]"  # the label value of everything outside the top N

CONTAINER_LABELS = ("namespace", "pod", "container", "container_id", "runtime")
HOST_LABELS = ("unit", "command")
NO_CONTAINER = ("", "", "", "", "")  # host processes: every container label empty (absent in PromQL)

# TCP latency: memtop's log2 bucket b (see memtop/tcp.py) counts [2**(b-1), 2**b) us, so 2**b us is its
# upper bound. The exported buckets are those from 8 us to 33.6 s (2**3 .. 2**25 us, one per power of two:
# 23 and +Inf per series, a third fewer than all 32): connects faster than 8 us count in the 8 us bucket
# (cumulative buckets lose nothing, only resolution below it), slower than 33.6 s in +Inf only.
LATENCY_BUCKET_RANGE = range(3, 26)
LATENCY_LE_S: tuple[float, ...] = tuple((1 << b) / 1e6 for b in LATENCY_BUCKET_RANGE)
_LE_TEXT = tuple(floatToGoString(le) for le in LATENCY_LE_S)

# Drop counter names in Snapshot.drops -> (probe, reason).
_DROP_PREFIXES = (("leak_user_", "leaks-user"), ("leak_", "leaks"), ("tcp_", "tcp"), ("oom_", "oom"))

Labels = tuple[str, ...]


@dataclass(frozen=True)
class MetricsOptions:
    """What the metrics sink exports (validated by the command line)."""

    top: int = DEFAULT_TOP  # host groups, leak frames and TCP destinations exported one by one
    grace_s: float = DEFAULT_GRACE_S  # how long series of something gone are still exported
    dest_addr: bool = False  # label TCP series with the destination address too (more series)


# -- listen addresses ------------------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[IPv6]:PORT" -> (host, port). Raises ValueError with a one-line reason.

    The host is required (binding beyond loopback must be asked for: "0.0.0.0:9640", "[::]:9640").
    Port 0 asks the kernel for a free port.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT (e.g. {DEFAULT_LISTEN}), got {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"an IPv6 address goes in brackets, e.g. [::1]:9640, got {text!r}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets, e.g. [::1]:9640, got {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


# -- building blocks ---------------------------------------------------------------------------------------


def _vector_delta(previous: tuple[int, ...] | None, now: tuple[int, ...]) -> tuple[int, ...]:
    """Growth of a cumulative vector (counts that belong together, like a histogram's buckets): all of it
    when new or when any count went backwards (the entry was reset), else the element-wise difference."""
    if previous is None or len(previous) != len(now):
        return now
    if any(n < p for n, p in zip(now, previous, strict=True)):
        return now
    return tuple(n - p for n, p in zip(now, previous, strict=True))


class _Members:
    """The last cumulative value of each member, to turn totals into per-tick growth."""

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[tuple[int, ...], float]] = {}

    def growth(self, key: Hashable, cumulative: tuple[int, ...], now: float) -> tuple[int, ...]:
        previous = self._last.get(key)
        self._last[key] = (cumulative, now)
        return _vector_delta(previous[0] if previous else None, cumulative)

    def expire(self, now: float, grace_s: float) -> None:
        for key in [k for k, (_, seen) in self._last.items() if now - seen > grace_s]:
            del self._last[key]


@dataclass
class _Series:
    values: list[float]
    seen: float


class _Counters:
    """Monotonic series (label values -> a vector of counts) fed with growth."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.series: dict[Labels, _Series] = {}

    def add(self, labels: Labels, growth: Sequence[float], now: float) -> None:
        entry = self.series.get(labels)
        if entry is None:
            entry = self.series[labels] = _Series([0.0] * self.width, now)
        for i, g in enumerate(growth):
            entry.values[i] += g
        entry.seen = now

    def expire(self, now: float, grace_s: float) -> None:
        for labels in [k for k, s in self.series.items() if now - s.seen > grace_s]:
            del self.series[labels]

    def items(self) -> list[tuple[Labels, tuple[float, ...]]]:
        return [(labels, tuple(s.values)) for labels, s in self.series.items()]


class _Ranker:
    """Rates averaged over about RANK_WINDOW_S, to pick a stable top N (a single burst does not flap)."""

    def __init__(self) -> None:
        self._rates: dict[Hashable, tuple[float, float]] = {}  # key -> (averaged rate, last seen)

    def update(self, amounts: Mapping[Hashable, float], now: float, elapsed: float) -> None:
        weight = 1.0 - math.exp(-elapsed / RANK_WINDOW_S) if elapsed > 0 else 1.0
        for key, amount in amounts.items():
            rate = amount / elapsed if elapsed > 0 else 0.0
            previous = self._rates.get(key)
            average = rate if previous is None else previous[0] + weight * (rate - previous[0])
            self._rates[key] = (average, now)

    def top(self, n: int, among: Iterable[Hashable]) -> set[Hashable]:
        ranked = sorted(among, key=lambda k: (-self._rates.get(k, (0.0, 0.0))[0], repr(k)))
        return set(ranked[:n])

    def expire(self, now: float, grace_s: float) -> None:
        for key in [k for k, (_, seen) in self._rates.items() if now - seen > grace_s]:
            del self._rates[key]


@dataclass(frozen=True)
class _View:
    """Everything one scrape serves: plain values, built once per snapshot, never mutated."""

    counters: Mapping[str, list[tuple[Labels, float]]] = field(default_factory=dict)
    gauges: Mapping[str, list[tuple[Labels, float]]] = field(default_factory=dict)
    histograms: Mapping[str, list[tuple[Labels, tuple[float, ...]]]] = field(default_factory=dict)


# name -> (help, label names); the label names of TCP series depend on dest_addr (see MetricsSink).
COUNTERS: dict[str, tuple[str, Labels]] = {
    "memtop_kmalloc_bytes": (
        "Bytes allocated by kmalloc (slab size, sampling scaled up) by a container or a host group "
        '(systemd unit, else command; top N, the rest under command="[other]"), since memtop started',
        CONTAINER_LABELS + HOST_LABELS,
    ),
    "memtop_kmalloc_calls": (
        "kmalloc calls by a container or a host group, since memtop started",
        CONTAINER_LABELS + HOST_LABELS,
    ),
    "memtop_oom_kills": (
        "OOM kills seen by the oom:mark_victim tracepoint, by the victim's container, the constraint "
        "(memcg, global, cpuset, mempolicy), the victim's command and the command that triggered the kill",
        CONTAINER_LABELS + ("constraint", "victim_comm", "trigger_comm"),
    ),
    "memtop_tcp_connects": (
        "TCP connects finished (established or failed), by container and destination port",
        CONTAINER_LABELS + ("port",),
    ),
    "memtop_tcp_connect_failures": (
        "TCP connects that failed (refused, timed out, unreachable, closed), by container and port",
        CONTAINER_LABELS + ("port",),
    ),
    "memtop_dropped_events": (
        "Events a probe could not count or send (map full, ring buffer full, rate limited), by probe",
        ("probe", "reason"),
    ),
}
GAUGES: dict[str, tuple[str, Labels]] = {
    "memtop_container_memory_usage_bytes": (
        "A container's cgroup memory usage, page cache included (memory.current / memory.usage_in_bytes)",
        CONTAINER_LABELS,
    ),
    "memtop_container_memory_working_set_bytes": (
        "A container's working set: usage minus inactive file pages (what kubelet and docker stats show)",
        CONTAINER_LABELS,
    ),
    "memtop_container_memory_limit_bytes": (
        "A container's memory limit (absent when unlimited)",
        CONTAINER_LABELS,
    ),
    "memtop_container_processes": ("Processes in a container's cgroup", CONTAINER_LABELS),
    "memtop_leak_outstanding_bytes": (
        "Bytes allocated and not yet freed, by the container of the stack's largest allocating process, "
        "the tracked allocator (kind) and the stack's first non-allocator frame (top N per node, the rest "
        'of each container under top_frame="[other]"); sampled and scaled up',
        CONTAINER_LABELS + ("kind", "top_frame"),
    ),
    "memtop_leak_outstanding_allocations": (
        "Allocations not yet freed, by container, kind and top frame (as memtop_leak_outstanding_bytes)",
        CONTAINER_LABELS + ("kind", "top_frame"),
    ),
    "memtop_leak_growth_bytes_per_second": (
        "Growth of the outstanding bytes over memtop's growth window (a minute), as the Leaks panel shows",
        CONTAINER_LABELS + ("kind", "top_frame"),
    ),
    "memtop_tcp_connects_in_flight": ("TCP connects sent and not answered yet", ()),
    "memtop_probe_up": (
        "1 when a probe (a BPF program and its maps) is running, else 0; status says why",
        ("probe", "status"),
    ),
    "memtop_kmalloc_sample_every": ("kmalloc counting samples 1 in this many calls (1: all)", ()),
    "memtop_leak_sample_every": ("Leak tracking samples 1 in this many allocations, by kind", ("kind",)),
    "memtop_tracked_processes": ("Process rows memtop holds (alive, and exited ones kept a while)", ()),
    "memtop_containers": ("Containers memtop sees on this host", ()),
    "memtop_last_snapshot_timestamp_seconds": ("When memtop last read its probes (Unix time)", ()),
    "memtop_build_info": ("memtop's version and the kernel it runs on (always 1)", ("version", "kernel")),
}
HISTOGRAMS: dict[str, tuple[str, Labels]] = {
    "memtop_tcp_connect_latency_seconds": (
        "Latency of successful TCP connects (SYN sent to established), in log2 buckets; no _sum or _count: "
        "the kernel keeps buckets only (the +Inf bucket counts successful connects)",
        CONTAINER_LABELS + ("port",),
    ),
}


def metric_names() -> set[str]:
    """Every sample name the exporter can serve (counters with _total, histograms with _bucket), without
    the process_* metrics of prometheus_client's ProcessCollector."""
    names = {f"{n}_total" for n in COUNTERS} | set(GAUGES)
    names |= {f"{n}_bucket" for n in HISTOGRAMS}
    return names


class MetricsSink:
    """A sink of Snapshots and a prometheus_client collector of the latest one (see the module doc).

    `on_snapshot` must be called from one thread (the collector's); `collect` may run in any thread, any
    number of times. `registry` holds this collector and the process_* metrics of memtop's own process.
    """

    def __init__(self, options: MetricsOptions = MetricsOptions(), process_metrics: bool = True) -> None:
        if options.top < 1:
            raise ValueError("top must be at least 1")
        self.options = options
        self._tcp_labels = CONTAINER_LABELS + (("port", "address") if options.dest_addr else ("port",))
        self._view = _View()
        self._lock = threading.Lock()  # only against two on_snapshot calls racing (a misuse), not scrapes
        self._previous_at: float | None = None
        self._members = _Members()
        self._kmalloc = _Counters(2)  # bytes, calls
        self._host_rank = _Ranker()
        self._tcp = _Counters(2 + LATENCY_BUCKETS)  # connects, failed, per-bucket counts
        self._tcp_rank = _Ranker()
        self._oom = _Counters(1)
        self._oom_seen: set[tuple[float, int]] = set()
        self._drops = _Counters(1)
        self._labels: dict[str, Labels] = {}  # container id -> its label values, while remembered
        self._container_seen: dict[str, float] = {}  # container id -> last snapshot that had it
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        if process_metrics:
            ProcessCollector(registry=self.registry)

    # -- the sink ------------------------------------------------------------------------------------------

    def on_snapshot(self, snap: Snapshot) -> None:
        """Take a new snapshot: update the counters and publish the series the next scrapes serve."""
        with self._lock:
            now = snap.taken_at
            elapsed = now - self._previous_at if self._previous_at is not None else snap.duration_s
            self._previous_at = now
            for row in snap.containers:
                self._labels[row.id] = (row.namespace, row.pod_name, row.label, row.id, row.runtime)
                self._container_seen[row.id] = now
            counters: dict[str, list[tuple[Labels, float]]] = {}
            gauges: dict[str, list[tuple[Labels, float]]] = {}
            histograms: dict[str, list[tuple[Labels, tuple[float, ...]]]] = {}
            self._ingest_kmalloc(snap, now, elapsed)
            self._ingest_oom(snap, now)
            self._ingest_tcp(snap, now, elapsed)
            self._ingest_drops(snap, now)
            grace = self.options.grace_s
            for table in (self._kmalloc, self._tcp, self._oom):
                table.expire(now, grace)
            for ranker in (self._host_rank, self._tcp_rank):
                ranker.expire(now, grace)
            self._members.expire(now, grace)
            for cid in [c for c, seen in self._container_seen.items() if now - seen > grace]:
                del self._container_seen[cid]
                self._labels.pop(cid, None)

            kmalloc = self._kmalloc.items()
            counters["memtop_kmalloc_bytes"] = [(labels, v[0]) for labels, v in kmalloc]
            counters["memtop_kmalloc_calls"] = [(labels, v[1]) for labels, v in kmalloc]
            counters["memtop_oom_kills"] = [(labels, v[0]) for labels, v in self._oom.items()]
            tcp = self._tcp.items()
            counters["memtop_tcp_connects"] = [(labels, v[0]) for labels, v in tcp]
            counters["memtop_tcp_connect_failures"] = [(labels, v[1]) for labels, v in tcp]
            histograms["memtop_tcp_connect_latency_seconds"] = [(labels, v[2:]) for labels, v in tcp]
            counters["memtop_dropped_events"] = [(labels, v[0]) for labels, v in self._drops.items()]
            gauges.update(self._container_gauges(snap))
            gauges.update(self._leak_gauges(snap))
            gauges.update(self._health_gauges(snap))
            self._view = _View(counters, gauges, histograms)

    def _container_of(self, cid: str | None) -> Labels | None:
        """A container's label values, NO_CONTAINER for the host, None for a container gone too long."""
        if not cid:
            return NO_CONTAINER
        return self._labels.get(cid)

    def _ingest_kmalloc(self, snap: Snapshot, now: float, elapsed: float) -> None:
        for row in snap.containers:
            growth = self._members.growth(("container", row.id), (row.kmalloc_bytes, row.kmalloc_calls), now)
            self._kmalloc.add(self._labels[row.id] + ("", ""), growth, now)
        host: dict[Labels, list[float]] = {}
        for proc in snap.processes:
            if proc.container_id is not None:
                continue
            member = ("process", proc.pid, proc.start_time)
            growth = self._members.growth(member, (proc.kmalloc_bytes, proc.kmalloc_calls), now)
            group: Labels = (proc.unit, "") if proc.unit else ("", proc.comm)
            total = host.setdefault(group, [0.0, 0.0])
            total[0] += growth[0]
            total[1] += growth[1]
        self._host_rank.update({g: v[0] for g, v in host.items()}, now, elapsed)
        top = self._host_rank.top(self.options.top, host)
        for key, amounts in host.items():
            self._kmalloc.add(NO_CONTAINER + (key if key in top else ("", OTHER)), amounts, now)

    def _ingest_oom(self, snap: Snapshot, now: float) -> None:
        """Kills seen live (the tracepoint), each counted once; kills found in the kernel log from before
        memtop started are not counted (a restarted exporter would count them again)."""
        keys = set()
        for event in snap.oom_events:
            keys.add(event.key)
            if event.source != "tracepoint" or event.key in self._oom_seen:
                continue
            container = self._container_of(event.container_id)
            if container is None:
                ref = parse_cgroup_path(event.cgroup_path) if event.cgroup_path else None
                cid = event.container_id or ""
                container = (event.namespace, event.pod_name, cid[:12], cid, ref.runtime if ref else "")
            cause = (event.constraint, event.victim_comm, event.trigger_comm)
            labels = container + cause
            if labels not in self._oom.series and len(self._oom.series) >= self.options.top:
                labels = container + (event.constraint, OTHER, OTHER)
            self._oom.add(labels, (1,), now)
        self._oom_seen = keys  # a kill that left memtop's log (1,000 newest) cannot come back
        for labels, entry in self._oom.series.items():  # alive while its container is (the host always)
            if (
                labels[3] == ""
                or labels[3] in self._container_seen
                and self._container_seen[labels[3]] == now
            ):
                entry.seen = now

    def _ingest_tcp(self, snap: Snapshot, now: float, elapsed: float) -> None:
        groups: dict[Labels, list[float]] = {}
        for row in snap.tcp_connect:
            container = self._container_of(row.container_id)
            if container is None:
                continue  # a container gone longer than the grace period
            hist = [0] * LATENCY_BUCKETS
            for lower_bound, count in row.histogram:
                hist[min(lower_bound.bit_length(), LATENCY_BUCKETS - 1)] += count
            member = ("tcp", row.key, row.cgroup_id)
            growth = self._members.growth(member, (row.connects, row.failed, *hist), now)
            port = (str(row.dport), row.daddr) if self.options.dest_addr else (str(row.dport),)
            total = groups.setdefault(container + port, [0.0] * (2 + LATENCY_BUCKETS))
            for i, g in enumerate(growth):
                total[i] += g
        self._tcp_rank.update({g: v[0] for g, v in groups.items()}, now, elapsed)
        top = self._tcp_rank.top(self.options.top, groups)
        other = (OTHER, OTHER) if self.options.dest_addr else (OTHER,)
        for labels, amounts in groups.items():
            target = labels if labels in top else labels[: len(CONTAINER_LABELS)] + other
            self._tcp.add(target, amounts, now)

    def _ingest_drops(self, snap: Snapshot, now: float) -> None:
        for name, count in snap.drops.items():
            probe, reason = "kmalloc", name
            for prefix, owner in _DROP_PREFIXES:
                if name.startswith(prefix):
                    probe, reason = owner, name[len(prefix) :]
                    break
            growth = self._members.growth(("drops", name), (int(count),), now)
            self._drops.add((probe, reason), growth, now)

    def _container_gauges(self, snap: Snapshot) -> dict[str, list[tuple[Labels, float]]]:
        usage: list[tuple[Labels, float]] = []
        working_set: list[tuple[Labels, float]] = []
        limit: list[tuple[Labels, float]] = []
        processes: list[tuple[Labels, float]] = []
        for row in snap.containers:
            labels = self._labels[row.id]
            # memory_bytes is the working set (usage - inactive file, as kubelet's), memory_usage_bytes the
            # cgroup's raw usage with page cache.
            if row.memory_usage_bytes is not None:
                usage.append((labels, float(row.memory_usage_bytes)))
            if row.memory_bytes is not None:
                working_set.append((labels, float(row.memory_bytes)))
            if row.memory_limit_bytes:
                limit.append((labels, float(row.memory_limit_bytes)))
            processes.append((labels, float(row.processes)))
        return {
            "memtop_container_memory_usage_bytes": usage,
            "memtop_container_memory_working_set_bytes": working_set,
            "memtop_container_memory_limit_bytes": limit,
            "memtop_container_processes": processes,
        }

    def _leak_gauges(self, snap: Snapshot) -> dict[str, list[tuple[Labels, float]]]:
        """Each stack goes to the container of its largest allocating process (a stack shared across
        containers is not split: the snapshot keeps per-process shares only for the focused process)."""
        container_of_pid: dict[int, str | None] = {}
        for proc in snap.processes:
            if proc.pid not in container_of_pid or not proc.exited:
                container_of_pid[proc.pid] = proc.container_id
        groups: dict[Labels, list[float]] = {}
        for row in snap.leaks:
            cid = container_of_pid.get(row.pids[0]) if row.pids else None
            container = self._container_of(cid) or NO_CONTAINER
            total = groups.setdefault(container + (row.kind, row.top_frame), [0.0, 0.0, 0.0])
            total[0] += row.outstanding_bytes
            total[1] += row.allocations
            total[2] += row.growth_bytes_per_s
        ranked = sorted(groups, key=lambda g: (-groups[g][0], g))
        top = set(ranked[: self.options.top])
        series: dict[Labels, list[float]] = {}
        for labels, values in groups.items():
            target = labels if labels in top else labels[:-1] + (OTHER,)
            total = series.setdefault(target, [0.0, 0.0, 0.0])
            for i, v in enumerate(values):
                total[i] += v
        return {
            "memtop_leak_outstanding_bytes": [(k, v[0]) for k, v in series.items()],
            "memtop_leak_outstanding_allocations": [(k, v[1]) for k, v in series.items()],
            "memtop_leak_growth_bytes_per_second": [(k, v[2]) for k, v in series.items()],
        }

    def _health_gauges(self, snap: Snapshot) -> dict[str, list[tuple[Labels, float]]]:
        return {
            "memtop_probe_up": [
                ((name, status.status), 1.0 if status.status == "running" else 0.0)
                for name, status in sorted(snap.probes.items())
            ],
            "memtop_tcp_connects_in_flight": [((), float(snap.tcp_in_flight))],
            "memtop_kmalloc_sample_every": [((), float(snap.sample_every))],
            "memtop_leak_sample_every": [((k,), float(v)) for k, v in sorted(snap.leak_sample_rates.items())],
            "memtop_tracked_processes": [((), float(len(snap.processes)))],
            "memtop_containers": [((), float(len(snap.containers)))],
            "memtop_last_snapshot_timestamp_seconds": [((), snap.taken_at)],
            "memtop_build_info": [((__version__, snap.host.kernel), 1.0)],
        }

    # -- the collector ---------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The latest snapshot's series as metric families (called by prometheus_client at each scrape)."""
        view = self._view
        for name, (doc, labels) in COUNTERS.items():
            if name not in view.counters:
                continue
            counter = CounterMetricFamily(name, doc, labels=self._label_names(name, labels))
            for values, value in view.counters[name]:
                counter.add_metric(values, value)
            yield counter
        for name, (doc, labels) in GAUGES.items():
            if name not in view.gauges:
                continue
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for values, value in view.gauges[name]:
                gauge.add_metric(values, value)
            yield gauge
        for name, (doc, labels) in HISTOGRAMS.items():
            if name not in view.histograms:
                continue
            histogram = HistogramMetricFamily(name, doc, labels=self._label_names(name, labels))
            for values, counts in view.histograms[name]:
                histogram.add_metric(values, _cumulative_buckets(counts), sum_value=None)
            yield histogram

    def _label_names(self, name: str, labels: Labels) -> Labels:
        return self._tcp_labels if name.startswith("memtop_tcp_connect") else labels


def _cumulative_buckets(counts: Sequence[float]) -> list[tuple[str, float]]:
    """memtop's per-bucket counts -> Prometheus' cumulative (le, count) pairs, +Inf last."""
    running = [0.0] * len(counts)
    total = 0.0
    for b, count in enumerate(counts):
        total += count
        running[b] = total
    buckets = [(le, running[b]) for le, b in zip(_LE_TEXT, LATENCY_BUCKET_RANGE, strict=True)]
    buckets.append(("+Inf", total))
    return buckets


# -- the HTTP endpoint ---------------------------------------------------------------------------------


class MetricsServer:
    """/metrics over HTTP in a thread of its own (prometheus_client's WSGI server: Prometheus text or
    OpenMetrics by the Accept header, gzip when asked). `close()` stops it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MemtopError(f"cannot serve metrics on {_join(host, port)}: {exc.strerror or exc}") from None
        self.host = host
        self.port = int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{_join(self.host, self.port)}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsEndpoint:
    """The sink and its server together: what `memtop exporter` (and `memtop record --metrics-listen`)
    attach to their tick loop. Bind first (a taken port fails before any probe compiles), then call
    `on_snapshot` after every tick, and `close()` on the way out."""

    def __init__(self, listen: str, options: MetricsOptions = MetricsOptions()) -> None:
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            raise MemtopError(f"--metrics-listen: {exc}") from None
        self.sink = MetricsSink(options)
        self.server = MetricsServer(self.sink.registry, host, port)

    def on_snapshot(self, snap: Snapshot) -> None:
        self.sink.on_snapshot(snap)

    def close(self) -> None:
        self.server.close()


def render(sink: MetricsSink, openmetrics: bool = False) -> str:
    """The exposition text a scrape would get (tests, bench and `promtool check metrics`)."""
    if openmetrics:
        from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

        return generate_openmetrics(sink.registry).decode()
    from prometheus_client import generate_latest

    return generate_latest(sink.registry).decode()


def describe_series(sink: MetricsSink) -> Iterable[tuple[str, Mapping[str, str], float]]:
    """(sample name, labels, value) of every sample a scrape would get, for tests."""
    for family in sink.registry.collect():
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


__all__: list[str] = [
    "DEFAULT_GRACE_S",
    "DEFAULT_LISTEN",
    "DEFAULT_TOP",
    "MetricsEndpoint",
    "MetricsOptions",
    "MetricsServer",
    "MetricsSink",
    "metric_names",
    "parse_listen",
    "render",
]
