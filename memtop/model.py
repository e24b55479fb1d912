"""Plain records passed from the probe layer upward. No bcc, no textual: just data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from memtop.containers import ContainerRef

# The key under which interrupt-context allocations are counted (see memtop/bpf/kmalloc.c).
IRQ_TGID = 0xFFFFFFFF
IRQ_COMM = "[irq]"


class KmallocCounters(NamedTuple):
    """Cumulative kmalloc totals of one process since the probe started (already scaled by sampling).
    A tuple: a busy host's read makes thousands a tick (a frozen dataclass cost four times as much)."""

    calls: int
    bytes_alloc: int
    bytes_req: int
    comm: str = ""
    cgroup_id: int = 0  # cgroup2 id at the process's first kmalloc or its last exec (0: unknown)
    cgroup_path: str = ""  # the kernel's ids resolved to the path to attribute by ("" if unknown)
    memcg_id: int = 0  # the cgroup v1 memory cgroup's id, at the same moments (0: not followed/unknown)
    execs: int = 0  # execs the kernel counted for the process since its entry was made (names change)
    generation: int = 0  # the kernel entry's generation: a new one for a process that reused a PID


class KernelIdentity(NamedTuple):
    """What the kmalloc probe's kernel entry says a process is: KmallocCounters' fields after the counts.
    The same object from read to read while the entry is unchanged, so a consumer of thousands a tick
    (the /proc scanner) compares it by identity."""

    comm: str
    cgroup_id: int
    cgroup_path: str
    memcg_id: int
    execs: int
    generation: int


@dataclass(frozen=True)
class RetiredCounters:
    """The final kmalloc totals of a process whose PID a new process got before they were read (the
    kernel keeps them apart by a generation raised at the newcomer's fork): charged to the old process,
    never to the newcomer. Reported once, then dropped from the kernel."""

    tgid: int
    first_seen: float  # wall clock of the old process's first counted kmalloc (seconds since the epoch)
    counters: KmallocCounters


@dataclass(frozen=True)
class KmallocReading:
    """One read of the kmalloc probe's maps."""

    per_tgid: dict[int, KmallocCounters]
    sample_every: int = 1
    pid_map_full_drops: int = 0
    site_map_full_drops: int = 0
    tail_lost: int = 0  # ring buffer full
    tail_rate_limited: int = 0  # over the tail's per-second budget: counted, not sent
    memcg_map_full_drops: int = 0  # tasks whose cgroup v1 memory cgroup could not be followed
    # kmallocs a CPU's slot still held when their process's entry had been read and dropped (it exited)
    after_exit_calls: int = 0
    recursion_misses: int = 0  # kmallocs (and irq entries/exits) the kernel did not run the programs for
    retired: tuple[RetiredCounters, ...] = ()  # dead processes' totals whose PID was reused (see above)
    identities: Mapping[int, KernelIdentity] = field(default_factory=dict)  # tgid -> its per_tgid's identity
    exited: frozenset[int] = frozenset()  # tgids whose main thread exited since the last read


@dataclass(frozen=True)
class CallSite:
    address: int
    symbol: str
    calls: int
    bytes_alloc: int
    bytes_req: int


@dataclass(frozen=True)
class TailEvent:
    """One kmalloc of the drilled-in process, as sent through the ring buffer."""

    time: float  # wall clock, seconds since the epoch
    tid: int
    call_site: str
    bytes_req: int
    bytes_alloc: int
    gfp_flags: int
    gfp_text: str
    node: int
    ptr: int = 0


@dataclass(frozen=True)
class FocusReading:
    """Per-call-site and size data of the drilled-in process, collected only for it."""

    tgid: int
    call_sites: tuple[CallSite, ...] = ()
    size_log2_counts: tuple[int, ...] = ()  # index b counts allocations of 2**b .. 2**(b+1)-1 bytes
    tail: tuple[TailEvent, ...] = ()


@dataclass(frozen=True)
class ProbeStatus:
    status: str  # "starting", "running", "disabled", "error", "stopped", "replay"
    detail: str = ""
    since: float | None = None  # when it attached (seconds since the epoch): its counts start there


@dataclass(frozen=True)
class ProcInfo:
    """What /proc says about one process at one moment."""

    pid: int
    start_time: float  # seconds since the epoch; with pid, identifies a process across PID reuse
    comm: str = ""
    cmdline: str = ""
    user: str = ""
    state: str = ""
    rss_bytes: int | None = None
    vms_bytes: int | None = None
    threads: int | None = None
    cgroup_path: str = ""
    container: ContainerRef | None = None  # from every line of /proc/PID/cgroup (None: the host)
    ppid: int = 0
    kernel_thread: bool = False  # a kernel thread (no user memory: rss_bytes stays None)
    extra: dict[str, str] = field(default_factory=dict)
