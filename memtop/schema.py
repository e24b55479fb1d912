"""The one declaration of memtop's records on the wire: snapshot files, recorded samples, `memtop dump`.

Every record of schema `memtop.snapshot/1` is a msgspec Struct here. msgspec owns encoding (JSON for
files, MessagePack for recordings), decoding with validation (types, ranges, required fields; an error
names the path, e.g. `$.processes[0].pid`), and the machine-readable JSON Schema in
docs/snapshot.schema.json (`scripts/gen_schema.py`; a test keeps it up to date). memtop/export.py only
maps these records to and from the store's frozen dataclasses, which carry the same field names.

Field names are the store's vocabulary; fields are only ever added within the version.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from memtop.leaks import KINDS, top_frame
from memtop.tcp import address_text, is_bucket_bound

SCHEMA: Final = "memtop.snapshot/1"

INT64_MAX = (1 << 63) - 1
# A byte or event count: a non-negative 64-bit integer (10**400 is a schema error, not a float overflow).
Count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
Uint64 = Annotated[int, Meta(ge=0)]  # a kernel address (checked against 2**64 where used)
Int64 = Annotated[int, Meta(ge=-INT64_MAX - 1, le=INT64_MAX)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Family = Literal[4, 6]
LeakKind = Literal["kernel", "kernel-pages", "user"]
assert set(KINDS) == {"kernel", "kernel-pages", "user"}


class Point(Struct, array_like=True, forbid_unknown_fields=True):
    """One history sample: [t (epoch s), kmalloc bytes/s, kmalloc calls/s, memory bytes or null].

    memory_bytes is a process's RSS or a container's cgroup memory usage; older files have 3 items."""

    t: float
    kmalloc_bytes_per_s: float
    kmalloc_calls_per_s: float
    memory_bytes: Count | None = None


class Host(Struct):
    hostname: str
    kernel: str
    boot_time: float | None = None


class Probe(Struct):
    status: str = ""
    detail: str = ""
    since: float | None = None  # when it attached (seconds since the epoch); its counts start there


class Process(Struct, kw_only=True):
    """A process row (store.ProcessRow, in its field order); rates are over the snapshot's last interval."""

    pid: Count
    start_time: float = 0.0
    comm: str
    cmdline: str = ""
    user: str = ""
    state: str = ""
    cgroup_path: str = ""
    container_id: str | None = None
    container: str = ""
    unit: str = ""
    kmalloc_bytes_per_s: float
    kmalloc_calls_per_s: float
    kmalloc_bytes: Count
    kmalloc_calls: Count
    kmalloc_bytes_req: Count = 0
    rss_bytes: Count | None = None
    vms_bytes: Count | None = None
    threads: Count | None = None
    exited: bool = False
    exited_at: float | None = None
    kmalloc_history: list[Point] | UnsetType = UNSET


class Container(Struct, kw_only=True):
    """A container row (store.ContainerRow)."""

    id: str
    name: str = ""
    runtime: str = ""
    pod_uid: str = ""
    pod_name: str = ""
    namespace: str = ""
    qos: str = ""
    cgroup_path: str = ""
    pids: list[Count] = []
    kmalloc_bytes_per_s: float = 0.0
    kmalloc_calls_per_s: float = 0.0
    memory_bytes: Count | None = None
    memory_limit_bytes: Count | None = None
    image: str = ""
    kmalloc_bytes: Count = 0
    kmalloc_calls: Count = 0
    oom_kills: Count = 0
    memory_usage_bytes: Count | None = (
        None  # raw cgroup usage, page cache included (memory_bytes: working set)
    )
    history: list[Point] | UnsetType = UNSET


class OomKill(Struct, kw_only=True):
    """An OOM kill (oom.OomEvent) with the samples memtop held over the minute before it."""

    time: float
    source: str = ""
    victim_pid: Count
    victim_comm: str = ""
    trigger_pid: Count | None = None
    trigger_comm: str = ""
    total_vm_bytes: Count | None = None
    anon_rss_bytes: Count | None = None
    file_rss_bytes: Count | None = None
    shmem_rss_bytes: Count | None = None
    oom_score_adj: Int64 | None = None
    constraint: str = ""
    cgroup_path: str = ""
    container_id: str | None = None
    pod_uid: str = ""
    pod_name: str = ""
    namespace: str = ""
    memcg_limit_bytes: Count | None = None
    memcg_usage_bytes: Count | None = None
    memcg_path: str = ""
    pgtables_bytes: Count | None = None
    uid: Count | None = None
    reaped_at: float | None = None
    history_of: str = ""
    container_name: str = ""  # the runtime's name for the container, kept after it is removed
    runtime: str = ""
    time_iso: str = ""  # written for readers; the reader uses `time`
    history: list[Point] = []
    victim_history: list[Point] = []


class Leak(Struct, kw_only=True):
    """Outstanding allocations of one stack (leaks.LeakRow)."""

    pid: Count | None
    comm: str
    kind: LeakKind
    outstanding_bytes: Count
    allocations: Count
    oldest_age_s: Annotated[float, Meta(ge=0)] | None = None
    growth_bytes_per_s: float
    stack: list[str]
    top_frame: str | None = None  # derived from the stack when absent
    pids: list[Count] | None = None  # [pid] when absent
    stack_id: Int64 = -1

    def __post_init__(self) -> None:
        if self.top_frame is None:
            self.top_frame = top_frame(self.kind, self.stack)
        if self.pids is None:
            self.pids = [self.pid] if self.pid is not None else []


def _address(text: str, family: int) -> str:
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if family not in (0, parsed.version):
        raise ValueError(f"{text!r} is not an IPv{family} address")
    return address_text(parsed)


def _histogram(buckets: dict[int, int]) -> None:
    for bound, count in buckets.items():
        if not is_bucket_bound(bound):
            raise ValueError(f"histogram bucket {bound} is not 0 or a power of two (us)")
        if count < 0:
            raise ValueError("histogram counts must be >= 0")


class TcpConnect(Struct, kw_only=True):
    """Connect latency of one (process, destination), or a group of them (tcp.TcpRow).

    Histograms map a log2 bucket's lower bound (us) to its count."""

    pid: Count
    comm: str
    container_id: str | None = None
    cgroup_id: Count = 0
    cgroup_path: str = ""
    family: Literal[0, 4, 6]
    daddr: str
    dport: Port
    connects: Count
    failed: Count
    connects_per_s: Annotated[float, Meta(ge=0)] = 0.0
    failed_per_s: Annotated[float, Meta(ge=0)] = 0.0
    p50_us: Annotated[float, Meta(ge=0)] | None
    p90_us: Annotated[float, Meta(ge=0)] | None
    p99_us: Annotated[float, Meta(ge=0)] | None
    max_us: Count
    interval_p50_us: Annotated[float, Meta(ge=0)] | None = None
    interval_p90_us: Annotated[float, Meta(ge=0)] | None = None
    interval_p99_us: Annotated[float, Meta(ge=0)] | None = None
    interval_max_us: Annotated[float, Meta(ge=0)] | None = None
    histogram: dict[int, Count]
    interval_histogram: dict[int, Count] = {}
    syn_retransmits: Count = 0
    last_slow_at: Annotated[float, Meta(ge=0)] | None = None
    members: Annotated[int, Meta(ge=1, le=INT64_MAX)] = 1

    def __post_init__(self) -> None:
        if self.daddr or self.family:
            self.daddr = _address(self.daddr, self.family)
        _histogram(self.histogram)
        _histogram(self.interval_histogram)
        if self.failed > self.connects:
            raise ValueError(f"failed ({self.failed}) is more than connects ({self.connects})")


class SlowConnect(Struct, kw_only=True):
    """One slow or failed connect (tcp.SlowConnect)."""

    time: Annotated[float, Meta(ge=0)]
    pid: Count
    tid: Count
    comm: str
    container_id: str | None = None
    cgroup_id: Count = 0
    cgroup_path: str = ""
    family: Family
    saddr: str
    sport: Port
    daddr: str
    dport: Port
    latency_us: Count
    failed: bool
    reason: str = ""
    error: Count = 0
    syn_retransmits: Count = 0

    def __post_init__(self) -> None:
        self.saddr = _address(self.saddr, self.family)
        self.daddr = _address(self.daddr, self.family)


class CallSite(Struct, kw_only=True):
    symbol: str
    address: Uint64 = 0
    calls: Count
    bytes_alloc: Count
    bytes_req: Count = 0

    def __post_init__(self) -> None:
        if self.address >= 1 << 64:
            raise ValueError(f"address {self.address} does not fit in 64 bits")


class TailItem(Struct, kw_only=True):
    time: float
    tid: Count = 0
    call_site: str = ""
    bytes_req: Count
    bytes_alloc: Count
    gfp_flags: Count = 0
    gfp_text: str = ""
    node: Int64 = -1


class Focus(Struct, kw_only=True):
    """The drilled-in process: its history, call sites, log2 size counts, its tail, its own leaks."""

    pid: Count
    start_time: float = 0.0
    history: list[Point] = []
    call_sites: list[CallSite] = []
    size_log2_counts: list[Count] = []
    tail: list[TailItem] = []
    leaks: list[Leak] | UnsetType = UNSET


class Snapshot(Struct, kw_only=True):
    """A snapshot file (`memtop snapshot`, the e key), one line of `memtop dump`, one recorded sample."""

    schema: Literal["memtop.snapshot/1"]
    taken_at: str = ""  # ISO 8601 UTC; readers use taken_at_epoch when present
    taken_at_epoch: float | None = None
    duration_s: float
    interval_s: float = 1.0
    host: Host
    probes: dict[str, Probe] = {}
    sample_every: Annotated[int, Meta(ge=1, le=INT64_MAX)] = 1
    kmalloc_bytes_per_s: float = 0.0
    kmalloc_calls_per_s: float = 0.0
    drops: dict[str, Count] = {}
    processes: list[Process]
    containers: list[Container] = []
    oom_events: list[OomKill] = []
    oom_kills_seen: Count = 0
    tcp_slow_ms: Count | None = None
    tcp_in_flight: Count = 0
    sample_rate: Annotated[int, Meta(ge=1, le=INT64_MAX)] = 1  # kernel leak tracking was 1 in N
    leak_sample_rates: dict[str, Annotated[int, Meta(ge=1, le=INT64_MAX)]] = {}
    leak_older_s: Annotated[float, Meta(ge=0)] = 0.0
    leak_user_pid: Count | None = None
    leaks: list[Leak] = []
    tcp_connect: list[TcpConnect] = []
    tcp_slow_connects: list[SlowConnect] = []
    focus: Focus | UnsetType = UNSET


class Head(Struct):
    """Just the version, read first so a file of another schema gets that error and no other."""

    schema: Any = None


json_encoder = msgspec.json.Encoder()
json_decoder = msgspec.json.Decoder(Snapshot)
head_decoder = msgspec.json.Decoder(Head)
msgpack_encoder = msgspec.msgpack.Encoder()
msgpack_decoder = msgspec.msgpack.Decoder(Snapshot)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a snapshot document (docs/snapshot.schema.json)."""
    schema = msgspec.json.schema(Snapshot)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": SCHEMA,
        **schema,
    }
