"""The TCP connect probe (memtop/bpf/tcpconnect.c): connect latency and failures per process and destination.

Per-key counters and log2 latency histograms are aggregated in the kernel and read on the refresh tick;
slow and failed connects arrive one by one through a ring buffer. A failed connect is held back here for
a moment so that the error record the kernel sends right after it (sock:inet_sk_error_report) can say why.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memtop import tracefs
from memtop.errors import MemtopError
from memtop.probes.base import Probe, int_cflag, map_items
from memtop.tcp import (
    LATENCY_BUCKETS,
    InFlightConnect,
    SlowConnect,
    TcpCounters,
    TcpKey,
    TcpReading,
    address_text,
    failure_reason,
)

# Indexes into the kernel's `counters` (see tcpconnect.c).
CTR_PENDING_MAP_FULL = 0
CTR_KEY_MAP_FULL = 1
CTR_EVENTS_LOST = 2
CTR_EVENTS_RATE_LIMITED = 3
CTR_OUTCOME_LOST = 4
N_COUNTERS = 5
EV_CONNECT, EV_ERROR = 1, 2
MAX_SLOW_MS = 3_600_000
MAX_FILTER_PIDS = 4096
ERROR_WAIT_S = 0.05  # how long a failure waits for its error record before it is reported without one
IN_FLIGHT_LIST_MAX = 256  # in-flight connects listed per read (oldest first); all are counted
EVICT_DEAD_AT = 0.75  # when the per-key map is this full, entries of processes that have exited are removed

# The optional tracepoints and the -D flag that says whether each one is there.
OPTIONAL_TRACEPOINTS = (
    ("tcp", "tcp_destroy_sock", "HAVE_DESTROY_TP"),
    ("tcp", "tcp_receive_reset", "HAVE_RESET_TP"),
    ("tcp", "tcp_retransmit_skb", "HAVE_RETRANSMIT_TP"),
    ("sock", "inet_sk_error_report", "HAVE_ERROR_TP"),
)


SYN_TIMEOUT_MARGIN_S = 10.0


def syn_timeout_s(retries: int | None = None) -> float:
    """The longest a connect can stay in SYN_SENT (seconds): the initial 1 s RTO doubled on each of
    net.ipv4.tcp_syn_retries retransmits (each wait capped at TCP_RTO_MAX, 120 s), plus a margin. A
    socket's own TCP_SYNCNT can ask for more retries; such a connect that outlives this is expired too."""
    if retries is None:
        try:
            retries = int(Path("/proc/sys/net/ipv4/tcp_syn_retries").read_text())
        except (OSError, ValueError):
            retries = 6
    total = sum(min(2.0**i, 120.0) for i in range(max(0, min(retries, 127)) + 1))
    return total + SYN_TIMEOUT_MARGIN_S


class _Config(ctypes.Structure):
    _fields_ = [("slow_ns", ctypes.c_uint64), ("set", ctypes.c_uint32), ("filter_on", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("latency_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("seq", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("error", ctypes.c_int32),
        ("kind", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("syn_retransmits", ctypes.c_uint16),
        ("failed", ctypes.c_uint8),
        ("rst", ctypes.c_uint8),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


def kernel_address(family: int, raw: Any) -> str:
    """16 bytes from the kernel (IPv4 in the first 4) as text."""
    data = bytes(raw)
    if family == socket.AF_INET:
        return address_text(ipaddress.IPv4Address(data[:4]))
    return address_text(ipaddress.IPv6Address(data[:16]))


def family_number(af: int) -> int:
    return 4 if af == socket.AF_INET else 6


def _comm(raw: Any) -> str:
    data = raw if isinstance(raw, bytes) else bytes(raw)
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


class TcpProbe(Probe):
    name = "tcp"
    source = "tcpconnect.c"

    def __init__(
        self,
        slow_ms: int = 200,
        max_pending: int = 65536,
        max_keys: int = 16384,
        events_per_s: int = 200,
    ) -> None:
        super().__init__()
        self.slow_ms = _check_slow_ms(slow_ms)
        self.max_pending = max_pending
        self.max_keys = max_keys
        self.events_per_s = events_per_s
        self.optional: dict[str, bool] = {}
        self.expired = 0  # pending connects older than the longest SYN retry time, deleted by read()
        self._boot_offset = 0.0  # wall clock minus CLOCK_MONOTONIC
        self._held: dict[int, tuple[_EventCopy, float]] = {}  # failures waiting for their error record
        self._ready: list[SlowConnect] = []
        self._filter: frozenset[int] | None = None

    def cflags(self) -> list[str]:
        flags = [
            int_cflag("MAX_PENDING", self.max_pending, 64, 1 << 22),
            int_cflag("MAX_KEYS", self.max_keys, 64, 1 << 20),
            int_cflag("SLOW_US_DEFAULT", self.slow_ms * 1000, 0, MAX_SLOW_MS * 1000),
            int_cflag("EVENTS_MAX_PER_SEC", self.events_per_s, 1, 1_000_000),
            int_cflag("MAX_FILTER_PIDS", MAX_FILTER_PIDS, 1, 1 << 20),
        ]
        for category, event, macro in OPTIONAL_TRACEPOINTS:
            present = tracefs.tracepoint_exists(category, event)
            self.optional[f"{category}:{event}"] = present
            flags.append(int_cflag(macro, int(present), 0, 1))
        return flags

    def start(self) -> None:
        if not tracefs.tracepoint_exists("sock", "inet_sock_set_state"):
            raise MemtopError(
                "tracepoint sock:inet_sock_set_state is missing (kernel older than 4.16, or tracefs not "
                "mounted? run `memtop doctor`)"
            )
        self._boot_offset = time.time() - time.monotonic()
        super().start()
        try:
            self.set_slow_ms(self.slow_ms)
            self.bpf[b"events"].open_ring_buffer(self._on_event)
        except Exception:
            self.close()
            raise

    def describe(self) -> str:
        missing = [name for name, present in self.optional.items() if not present]
        text = f"sock:inet_sock_set_state, slow >= {self.slow_ms} ms"
        return text + (f" (without {', '.join(missing)})" if missing else "")

    # -- run-time settings ---------------------------------------------------------------------------

    def set_slow_ms(self, slow_ms: int) -> None:
        """Send connects at least this slow (ms) to user space; 0 sends every connect (rate-capped)."""
        self.slow_ms = _check_slow_ms(slow_ms)
        self._write_config()

    def set_pid_filter(self, pids: Iterable[int] | None) -> None:
        """Track only connects made by these processes (tgids); None tracks every process.

        Applies to connects that start afterwards; counters already collected stay.
        """
        wanted = None if pids is None else frozenset(int(p) for p in pids)
        if wanted is not None and len(wanted) > MAX_FILTER_PIDS:
            raise MemtopError(
                f"the TCP PID filter holds at most {MAX_FILTER_PIDS} processes, got {len(wanted)}"
            )
        if wanted is not None and any(not 0 < p < 1 << 32 for p in wanted):
            raise MemtopError("PIDs in the TCP PID filter must be positive integers")
        table = self.bpf[b"pid_filter"]
        one = table.Leaf(1)
        if wanted is None:
            self._filter = None
            self._write_config()  # filter off first, so no connect is dropped while the map empties
            table.clear()
            return
        for key, _ in map_items(table):
            if key not in wanted:
                with contextlib.suppress(KeyError):
                    del table[table.Key(key)]
        for pid in wanted:
            table[table.Key(pid)] = one
        self._filter = wanted
        self._write_config()  # filter on last, once the map holds every wanted PID

    def _write_config(self) -> None:
        if self.bpf is None:
            return
        cfg = _Config(self.slow_ms * 1_000_000, 1, int(self._filter is not None))
        self.bpf[b"config"][ctypes.c_int(0)] = cfg

    # -- reading ---------------------------------------------------------------------------------------

    def read(self) -> TcpReading:
        """Cumulative per-key counters, the slow/failed connects since the last read, and drop counters."""
        if self.bpf is None:
            raise MemtopError("the tcp probe is not running")
        self.bpf.ring_buffer_consume()
        slow = self._take_slow()
        per_key: dict[TcpKey, TcpCounters] = {}
        table = self.bpf[b"tcp_stats"]
        raw_entries = self._struct_entries(b"tcp_stats")
        for key, value in raw_entries:
            tcp_key = TcpKey(
                key.tgid, family_number(key.family), kernel_address(key.family, key.daddr), key.dport
            )
            per_key[tcp_key] = TcpCounters(
                comm=_comm(value.comm),
                cgroup_id=value.cgroup_id,
                connects=value.connects,
                failed=value.failed,
                max_us=value.max_us,
                histogram=tuple(value.latency_log2[i] for i in range(LATENCY_BUCKETS)),
                syn_retransmits=value.syn_retransmits,
            )
        if len(raw_entries) >= EVICT_DEAD_AT * self.max_keys:
            self._evict_dead(table, raw_entries)
        in_flight, in_flight_count = self._in_flight()
        misses = self.recursion_misses()
        self.status_with_misses(misses)
        counters = self.bpf[b"counters"]
        sums = [sum(counters.getvalue(i)) for i in range(N_COUNTERS)]
        return TcpReading(
            per_key=per_key,
            slow=slow,
            in_flight=in_flight,
            in_flight_count=in_flight_count,
            pending_map_full=sums[CTR_PENDING_MAP_FULL],
            key_map_full=sums[CTR_KEY_MAP_FULL],
            slow_lost=sums[CTR_EVENTS_LOST],
            slow_rate_limited=sums[CTR_EVENTS_RATE_LIMITED],
            pending_destroyed=sums[CTR_OUTCOME_LOST],
            outcome_lost=sums[CTR_OUTCOME_LOST] + self.expired,
            recursion_misses=misses,
        )

    def forget(self, pids: Iterable[int]) -> None:
        """Remove the kernel entries of these processes (their totals stay in the aggregator)."""
        gone = set(pids)
        table = self.bpf[b"tcp_stats"]
        for key, _ in self._struct_entries(b"tcp_stats"):
            if key.tgid in gone:
                with contextlib.suppress(KeyError):
                    del table[key]

    def _evict_dead(self, table: Any, entries: list[tuple[Any, Any]]) -> None:
        """Make room in a nearly full per-key map: entries of exited processes have just been read."""
        for key, _ in entries:
            if not os.path.exists(f"/proc/{key.tgid}"):
                with contextlib.suppress(KeyError):
                    del table[key]

    def _in_flight(self) -> tuple[tuple[InFlightConnect, ...], int]:
        """Pending connects, oldest first. One older than any SYN retry can last (its outcome was lost
        and its socket's destruction too) is deleted and counted in `expired`."""
        table = self.bpf[b"pending"]
        cutoff = time.monotonic_ns() - int(syn_timeout_s() * 1e9)
        entries = []
        for key, value in self._struct_entries(b"pending"):
            if value.start_ns < cutoff:
                with contextlib.suppress(KeyError):
                    del table[key if isinstance(key, table.Key) else table.Key(key)]
                    self.expired += 1
                continue
            entries.append(value)
        entries.sort(key=lambda v: v.start_ns)
        listed = tuple(
            InFlightConnect(
                pid=v.tgid,
                tid=v.tid,
                comm=_comm(v.comm),
                cgroup_id=v.cgroup_id,
                family=family_number(v.family),
                daddr=kernel_address(v.family, v.daddr),
                dport=v.dport,
                started=self._boot_offset + v.start_ns / 1e9,
                syn_retransmits=v.syn_retransmits,
            )
            for v in entries[:IN_FLIGHT_LIST_MAX]
        )
        return listed, len(entries)

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        if size < ctypes.sizeof(_Event):
            return
        ev = _EventCopy(ctypes.cast(data, ctypes.POINTER(_Event)).contents)
        if ev.kind == EV_ERROR:
            held = self._held.pop(ev.seq, None)
            if held is not None:
                self._ready.append(self._slow_connect(held[0], ev.error))
            return
        if ev.kind != EV_CONNECT:
            return
        if ev.failed:
            self._held[ev.seq] = (ev, time.monotonic())
        else:
            self._ready.append(self._slow_connect(ev, 0))

    def _take_slow(self) -> tuple[SlowConnect, ...]:
        """Connects ready to report; a failure whose error record has not come within ERROR_WAIT_S goes
        out without one."""
        now = time.monotonic()
        for seq, (ev, seen) in list(self._held.items()):
            if now - seen >= ERROR_WAIT_S:
                del self._held[seq]
                self._ready.append(self._slow_connect(ev, 0))
        ready, self._ready = self._ready, []
        ready.sort(key=lambda s: s.time)
        return tuple(ready)

    def _slow_connect(self, ev: _EventCopy, error: int) -> SlowConnect:
        return SlowConnect(
            time=self._boot_offset + ev.ts_ns / 1e9,
            pid=ev.tgid,
            tid=ev.tid,
            comm=ev.comm,
            cgroup_id=ev.cgroup_id,
            family=family_number(ev.family),
            saddr=kernel_address(ev.family, ev.saddr),
            sport=ev.sport,
            daddr=kernel_address(ev.family, ev.daddr),
            dport=ev.dport,
            latency_us=ev.latency_ns // 1000,
            failed=bool(ev.failed),
            reason=failure_reason(error, bool(ev.rst), ev.sport) if ev.failed else "",
            syn_retransmits=ev.syn_retransmits,
            error=error,
        )

    def close(self) -> None:
        super().close()
        self._held.clear()
        self._ready.clear()


class _EventCopy:
    """The fields of one ring-buffer record, copied out before the buffer slot is reused."""

    __slots__ = tuple(field[0] for field in _Event._fields_)

    def __init__(self, ev: _Event) -> None:
        for name in self.__slots__:
            value = getattr(ev, name)
            setattr(self, name, bytes(value) if not isinstance(value, int | bytes) else value)
        self.comm = _comm(ev.comm)

    ts_ns: int
    latency_ns: int
    cgroup_id: int
    seq: int
    tgid: int
    tid: int
    error: int
    kind: int
    family: int
    sport: int
    dport: int
    syn_retransmits: int
    failed: int
    rst: int
    saddr: bytes
    daddr: bytes
    comm: str


def _check_slow_ms(slow_ms: int) -> int:
    if isinstance(slow_ms, bool) or not isinstance(slow_ms, int) or not 0 <= slow_ms <= MAX_SLOW_MS:
        raise MemtopError(f"--tcp-slow-ms must be an integer from 0 to {MAX_SLOW_MS}, got {slow_ms!r}")
    return slow_ms
