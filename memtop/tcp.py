"""TCP connect latency: records, log2-histogram percentiles, the aggregator, grouping and JSON.

Pure: imports neither bcc nor textual. The probe (memtop/probes/tcp.py) hands up cumulative per-key
counters read from the kernel map and the individual slow or failed connects from the ring buffer; the
aggregator turns them into per-interval rates and percentiles, and keeps totals that never go backwards
even when a kernel entry is removed or starts again from zero.

Latency histograms have log2 buckets in microseconds: bucket 0 counts connects under 1 us and bucket
b >= 1 counts [2**(b-1), 2**b) us. A percentile is therefore known to within a factor of 2 (one bucket);
`percentile` interpolates linearly inside the bucket by rank and never reports more than the maximum seen.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

LATENCY_BUCKETS = 32  # up to [2**30, 2**31) us, about 36 minutes: longer latencies land in the last bucket
GROUP_BY = ("destination", "process", "container")
SLOW_KEEP = 500  # slow/failed connects the aggregator keeps, newest first

# What a failed connect's error (errno) says, as shown to the user.
REASON_BY_ERRNO = {
    111: "refused",  # ECONNREFUSED: RST in reply to the SYN
    110: "timeout",  # ETIMEDOUT: SYN retransmits exhausted (net.ipv4.tcp_syn_retries) or TCP_USER_TIMEOUT
    113: "host unreachable",  # EHOSTUNREACH (ICMP)
    101: "network unreachable",  # ENETUNREACH (ICMP)
    104: "reset",  # ECONNRESET
    71: "protocol error",  # EPROTO (ICMP parameter problem)
    92: "protocol unavailable",  # ENOPROTOOPT (ICMP protocol unreachable)
    90: "message too long",  # EMSGSIZE
}
REASON_CLOSED = "closed"  # no kernel error: the application closed the socket (e.g. its own timeout)
REASON_NO_PORT = "no local port"  # failed before a source port was bound (EADDRNOTAVAIL and the like)


def address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as inet_ntop writes it: IPv4-mapped IPv6 as ::ffff:a.b.c.d (ipaddress before Python
    3.13 writes ::ffff:7f00:1)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def failure_reason(error: int, rst_seen: bool, sport: int) -> str:
    """The reason shown for a failed connect, from what the tracepoints could tell.

    `error` is the errno of the socket error reported right after the failure (0 if none was), `rst_seen`
    says a reset arrived while connecting, `sport` is the source port at failure (0: none was bound).
    """
    if error:
        return REASON_BY_ERRNO.get(error, f"error {error}")
    if rst_seen:
        return "refused"
    if sport == 0:
        return REASON_NO_PORT
    return REASON_CLOSED


# -- records from the probe ------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class TcpKey:
    """One process's connects to one destination."""

    pid: int  # the connecting thread's tgid, taken when it sent the SYN
    family: int  # 4 or 6 (an IPv4-mapped IPv6 destination is family 6)
    daddr: str  # text form (ipaddress)
    dport: int


@dataclass(frozen=True)
class TcpCounters:
    """Cumulative counters of one key since the probe started, as read from the kernel map."""

    comm: str
    cgroup_id: int  # cgroup2 id of the connecting task
    connects: int  # finished attempts: established + failed
    failed: int
    max_us: int  # slowest successful connect
    histogram: tuple[int, ...]  # log2 latency buckets of successful connects (index b, see module doc)
    syn_retransmits: int = 0  # SYN retransmissions of the finished attempts


@dataclass(frozen=True)
class SlowConnect:
    """One connect at or above the slow threshold, or one failed connect."""

    time: float  # wall clock when it finished (seconds since the epoch)
    pid: int
    tid: int
    comm: str
    cgroup_id: int
    family: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    latency_us: int  # SYN sent to established, or to the failure
    failed: bool
    reason: str = ""  # "" when it succeeded; see failure_reason
    syn_retransmits: int = 0
    error: int = 0  # the errno reported with the failure, 0 if none
    cgroup_path: str = ""  # filled in by the store
    container_id: str | None = None

    @property
    def key(self) -> TcpKey:
        return TcpKey(self.pid, self.family, self.daddr, self.dport)


@dataclass(frozen=True)
class InFlightConnect:
    """A connect that has sent its SYN and not finished yet (from the kernel's pending map)."""

    pid: int
    tid: int
    comm: str
    cgroup_id: int
    family: int
    daddr: str
    dport: int
    started: float  # wall clock of the first SYN
    syn_retransmits: int = 0


@dataclass(frozen=True)
class TcpReading:
    """One read of the TCP probe. Drop counters are cumulative since the probe started."""

    per_key: Mapping[TcpKey, TcpCounters]
    slow: tuple[SlowConnect, ...] = ()
    in_flight: tuple[InFlightConnect, ...] = ()  # oldest first, at most the probe's in-flight limit
    in_flight_count: int = 0  # all pending connects, also those not listed
    pending_map_full: int = 0  # connects not tracked: the pending map was full
    key_map_full: int = 0  # finished connects not counted: the per-destination map was full
    slow_lost: int = 0  # slow/failed connects not sent: the ring buffer was full
    slow_rate_limited: int = 0  # slow/failed connects over the per-CPU rate cap: counted, not sent
    pending_destroyed: int = 0  # pending connects whose socket was destroyed before their outcome was seen
    # Connects whose outcome (established or failed) never reached the probe, closed out instead of being
    # left in flight: pending_destroyed plus those older than the longest SYN retry time (expired).
    outcome_lost: int = 0
    recursion_misses: int = 0  # events the kernel did not run the TCP programs for

    def drops(self) -> dict[str, int]:
        return {
            "pending_map_full": self.pending_map_full,
            "key_map_full": self.key_map_full,
            "slow_lost": self.slow_lost,
            "slow_rate_limited": self.slow_rate_limited,
            "outcome_lost": self.outcome_lost,
            "recursion_misses": self.recursion_misses,
        }


# -- histograms ------------------------------------------------------------------------------------------


def bucket_lower_bound(index: int) -> int:
    """Lower bound in us of log2 bucket `index` (0 for bucket 0, else 2**(index-1))."""
    if index < 0:
        raise ValueError(f"bucket index {index} < 0")
    return 0 if index == 0 else 1 << (index - 1)


def bucket_upper_bound(lower_bound: int) -> int:
    """Exclusive upper bound in us of the bucket starting at `lower_bound`."""
    return 1 if lower_bound == 0 else lower_bound * 2


def is_bucket_bound(value: int) -> bool:
    return value == 0 or (value > 0 and value & (value - 1) == 0)


def histogram_pairs(counts: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Indexed bucket counts -> ((lower bound us, count), ...) of the non-empty buckets."""
    return tuple((bucket_lower_bound(i), n) for i, n in enumerate(counts) if n)


def merge_histograms(*histograms: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    totals: dict[int, int] = {}
    for histogram in histograms:
        for bound, count in histogram:
            totals[bound] = totals.get(bound, 0) + count
    return tuple(sorted((b, n) for b, n in totals.items() if n))


def percentile(histogram: Iterable[tuple[int, int]], q: float, max_us: float | None = None) -> float | None:
    """The q-th percentile (0..100) in us of a log2 histogram of (bucket lower bound us, count) pairs.

    Resolution is one bucket, a factor of 2: the value is interpolated linearly inside the bucket that
    holds the q-th ranked connect, and capped at `max_us` when the true maximum is known. None when empty.
    """
    if not 0 <= q <= 100 or math.isnan(q):
        raise ValueError(f"percentile must be within 0..100, got {q!r}")
    buckets = sorted((b, n) for b, n in histogram if n > 0)
    total = sum(n for _, n in buckets)
    if total == 0:
        return None
    rank = q / 100 * total
    seen = 0
    value = float(buckets[-1][0])
    for bound, count in buckets:
        if seen + count >= rank:
            fraction = (rank - seen) / count
            value = bound + fraction * (bucket_upper_bound(bound) - bound)
            break
        seen += count
    if max_us is not None and value > max_us:
        value = float(max_us)
    return value


class _Percentiles(TypedDict):
    p50_us: float | None
    p90_us: float | None
    p99_us: float | None
    interval_p50_us: float | None
    interval_p90_us: float | None
    interval_p99_us: float | None
    interval_max_us: float | None


def _percentiles(
    histogram: tuple[tuple[int, int], ...], interval_histogram: tuple[tuple[int, int], ...], max_us: int
) -> _Percentiles:
    """A row's percentile fields: since start and over the last interval, capped at the true max."""
    return {
        "p50_us": percentile(histogram, 50, max_us),
        "p90_us": percentile(histogram, 90, max_us),
        "p99_us": percentile(histogram, 99, max_us),
        "interval_p50_us": percentile(interval_histogram, 50, max_us),
        "interval_p90_us": percentile(interval_histogram, 90, max_us),
        "interval_p99_us": percentile(interval_histogram, 99, max_us),
        "interval_max_us": percentile(interval_histogram, 100, max_us),
    }


# -- rows and the aggregator ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpRow:
    """One process and destination (or a group of them) as views and snapshots show it."""

    pid: int  # 0 in a group of several processes
    comm: str  # "" in a group of processes with different names
    cgroup_id: int
    family: int  # 0 in a group of several destinations
    daddr: str  # "" in a group of several destinations
    dport: int  # 0 in a group of several destinations
    connects: int  # finished attempts since start (established + failed)
    failed: int
    connects_per_s: float  # over the last interval
    failed_per_s: float
    p50_us: float | None  # successful connects since start
    p90_us: float | None
    p99_us: float | None
    max_us: int
    interval_p50_us: float | None  # successful connects in the last interval
    interval_p99_us: float | None
    histogram: tuple[tuple[int, int], ...]  # (bucket lower bound us, count), non-empty, since start
    interval_histogram: tuple[tuple[int, int], ...] = ()  # the same, last interval only
    interval_p90_us: float | None = None
    interval_max_us: float | None = None  # top of the interval's highest bucket (capped at max_us)
    syn_retransmits: int = 0
    last_slow_at: float | None = None  # wall clock of the newest slow or failed connect
    cgroup_path: str = ""  # filled in by the store
    container_id: str | None = None
    members: int = 1  # rows merged into this one by group_rows

    @property
    def key(self) -> TcpKey:
        return TcpKey(self.pid, self.family, self.daddr, self.dport)


@dataclass
class _Totals:
    connects: int = 0
    failed: int = 0
    syn_retransmits: int = 0
    max_us: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)


def _counts(c: TcpCounters) -> tuple[int, ...]:
    hist = tuple(c.histogram[:LATENCY_BUCKETS]) + (0,) * (LATENCY_BUCKETS - len(c.histogram))
    return (c.connects, c.failed, c.syn_retransmits, *hist)


@dataclass
class _KeyState:
    totals: _Totals
    comm: str
    cgroup_id: int
    kernel_last: tuple[int, ...] | None = None  # counts of the kernel entry as last read; None: absent
    interval: tuple[int, ...] = ()  # counts added in the last interval
    last_slow_at: float | None = None


class TcpAggregator:
    """Cumulative kernel counters -> totals since start, per-interval rates and percentiles.

    A kernel entry that disappears (removed to make room) keeps its totals here and adds nothing to
    the interval; one whose counters go backwards (removed and created again between two reads) counts
    as new from zero. Totals therefore never decrease.
    """

    def __init__(self, started_at: float | None = None, slow_keep: int = SLOW_KEEP) -> None:
        self._previous_time = started_at
        self._elapsed = 0.0
        self._states: dict[TcpKey, _KeyState] = {}
        self._slow: list[SlowConnect] = []
        self._slow_keep = slow_keep
        self._drops: dict[str, int] = {}
        self._in_flight: tuple[InFlightConnect, ...] = ()
        self._in_flight_count = 0

    def ingest(self, now: float, reading: TcpReading) -> None:
        self._elapsed = now - self._previous_time if self._previous_time is not None else 0.0
        self._previous_time = now
        for key, counters in reading.per_key.items():
            current = _counts(counters)
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = _KeyState(_Totals(), counters.comm, counters.cgroup_id)
            last = state.kernel_last
            if last is not None and all(c >= p for c, p in zip(current, last, strict=True)):
                delta = tuple(c - p for c, p in zip(current, last, strict=True))
            else:  # new, back after removal, or reset: everything in it arrived since
                delta = current
            totals = state.totals
            totals.connects += delta[0]
            totals.failed += delta[1]
            totals.syn_retransmits += delta[2]
            for i, n in enumerate(delta[3:]):
                totals.histogram[i] += n
            totals.max_us = max(totals.max_us, counters.max_us)
            state.kernel_last = current
            state.interval = delta
            state.comm = counters.comm or state.comm
            state.cgroup_id = counters.cgroup_id or state.cgroup_id
        for key, state in self._states.items():
            if key not in reading.per_key:
                state.kernel_last = None
                state.interval = ()
        for slow in reading.slow:
            state = self._states.get(slow.key)
            if state is None:  # the slow event can arrive before the map is read with its key
                state = self._states[slow.key] = _KeyState(_Totals(), slow.comm, slow.cgroup_id)
            if state.last_slow_at is None or slow.time > state.last_slow_at:
                state.last_slow_at = slow.time
        if reading.slow:
            self._slow = sorted((*reading.slow, *self._slow), key=lambda s: s.time, reverse=True)
            del self._slow[self._slow_keep :]
        self._drops = reading.drops()
        self._in_flight = reading.in_flight
        self._in_flight_count = reading.in_flight_count

    def rows(self) -> tuple[TcpRow, ...]:
        """One row per (process, destination) seen since start, busiest first."""
        rows = [self._row(key, state) for key, state in self._states.items()]
        rows.sort(key=lambda r: (-r.connects, r.key))
        return tuple(rows)

    def _row(self, key: TcpKey, state: _KeyState) -> TcpRow:
        totals = state.totals
        interval = state.interval or (0,) * (3 + LATENCY_BUCKETS)
        elapsed = self._elapsed
        histogram = histogram_pairs(totals.histogram)
        interval_histogram = histogram_pairs(interval[3:])
        max_us = totals.max_us
        return TcpRow(
            pid=key.pid,
            comm=state.comm,
            cgroup_id=state.cgroup_id,
            family=key.family,
            daddr=key.daddr,
            dport=key.dport,
            connects=totals.connects,
            failed=totals.failed,
            connects_per_s=interval[0] / elapsed if elapsed > 0 else 0.0,
            failed_per_s=interval[1] / elapsed if elapsed > 0 else 0.0,
            max_us=max_us,
            **_percentiles(histogram, interval_histogram, max_us),
            histogram=histogram,
            interval_histogram=interval_histogram,
            syn_retransmits=totals.syn_retransmits,
            last_slow_at=state.last_slow_at,
        )

    def slow_connects(self) -> tuple[SlowConnect, ...]:
        """The most recent slow or failed connects, newest first (at most `slow_keep`)."""
        return tuple(self._slow)

    def in_flight(self) -> tuple[InFlightConnect, ...]:
        """Connects still waiting for an answer at the last read, oldest first."""
        return self._in_flight

    def in_flight_count(self) -> int:
        return self._in_flight_count

    def drops(self) -> dict[str, int]:
        """Cumulative drop counters of the last reading (see TcpReading)."""
        return dict(self._drops)

    def forget(self, pids: Iterable[int]) -> None:
        """Drop the rows and slow connects of these processes (for example, long exited ones)."""
        gone = set(pids)
        self._states = {k: s for k, s in self._states.items() if k.pid not in gone}
        self._slow = [s for s in self._slow if s.pid not in gone]


# -- grouping ---------------------------------------------------------------------------------------------


def _common(values: Iterable[Any], mixed: Any) -> Any:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else mixed


def endpoint(family: int, daddr: str, dport: int) -> tuple[int, str, int]:
    """(family, address, port) with an IPv4-mapped IPv6 address (::ffff:a.b.c.d, a dual-stack socket's
    connect to an IPv4 peer) as the IPv4 endpoint it is, so both group together."""
    if family == 6 and daddr.startswith("::ffff:") and daddr.count(".") == 3:
        return 4, daddr[len("::ffff:") :], dport
    return family, daddr, dport


def _group_key(row: TcpRow, by: str) -> tuple[Any, ...]:
    if by == "destination":
        return endpoint(row.family, row.daddr, row.dport)
    if by == "process":
        return (row.pid,)
    return (row.container_id,)


def group_rows(rows: Iterable[TcpRow], by: str) -> tuple[TcpRow, ...]:
    """Merge rows per destination, per process or per container (None: the host, one group).

    Counters, rates and histograms add up and percentiles come from the merged histograms; a field that
    differs inside a group becomes its "mixed" value (pid 0, comm "", daddr "", ...). `members` counts the
    merged rows. Busiest groups first.
    """
    if by not in GROUP_BY:
        raise ValueError(f"group by must be one of {', '.join(GROUP_BY)}, got {by!r}")
    groups: dict[tuple[Any, ...], list[TcpRow]] = {}
    for row in rows:
        groups.setdefault(_group_key(row, by), []).append(row)
    merged = [_merge(members) for members in groups.values()]
    merged.sort(key=lambda r: (-r.connects, r.pid, r.daddr, r.dport, r.container_id or ""))
    return tuple(merged)


def _merge(rows: list[TcpRow]) -> TcpRow:
    if len(rows) == 1:
        return rows[0]
    histogram = merge_histograms(*(r.histogram for r in rows))
    interval_histogram = merge_histograms(*(r.interval_histogram for r in rows))
    max_us = max(r.max_us for r in rows)
    destinations = {endpoint(r.family, r.daddr, r.dport) for r in rows}
    family, daddr, dport = destinations.pop() if len(destinations) == 1 else (0, "", 0)
    slow_times = [r.last_slow_at for r in rows if r.last_slow_at is not None]
    return TcpRow(
        pid=_common((r.pid for r in rows), 0),
        comm=_common((r.comm for r in rows), ""),
        cgroup_id=_common((r.cgroup_id for r in rows), 0),
        family=family,
        daddr=daddr,
        dport=dport,
        connects=sum(r.connects for r in rows),
        failed=sum(r.failed for r in rows),
        connects_per_s=sum(r.connects_per_s for r in rows),
        failed_per_s=sum(r.failed_per_s for r in rows),
        max_us=max_us,
        **_percentiles(histogram, interval_histogram, max_us),
        histogram=histogram,
        interval_histogram=interval_histogram,
        syn_retransmits=sum(r.syn_retransmits for r in rows),
        last_slow_at=max(slow_times) if slow_times else None,
        cgroup_path=_common((r.cgroup_path for r in rows), ""),
        container_id=_common((r.container_id for r in rows), None),
        members=sum(r.members for r in rows),
    )


# -- JSON (the snapshot's tcp_connect and tcp_slow_connects lists) -----------------------------------------


def _histogram_to_json(histogram: Iterable[tuple[int, int]]) -> dict[str, int]:
    return {str(bound): count for bound, count in histogram}


def row_to_json(row: TcpRow) -> dict[str, Any]:
    return {
        "pid": row.pid,
        "comm": row.comm,
        "container_id": row.container_id,
        "cgroup_id": row.cgroup_id,
        "cgroup_path": row.cgroup_path,
        "family": row.family,
        "daddr": row.daddr,
        "dport": row.dport,
        "connects": row.connects,
        "failed": row.failed,
        "connects_per_s": row.connects_per_s,
        "failed_per_s": row.failed_per_s,
        "p50_us": row.p50_us,
        "p90_us": row.p90_us,
        "p99_us": row.p99_us,
        "max_us": row.max_us,
        "interval_p50_us": row.interval_p50_us,
        "interval_p90_us": row.interval_p90_us,
        "interval_p99_us": row.interval_p99_us,
        "interval_max_us": row.interval_max_us,
        "histogram": _histogram_to_json(row.histogram),
        "interval_histogram": _histogram_to_json(row.interval_histogram),
        "syn_retransmits": row.syn_retransmits,
        "last_slow_at": row.last_slow_at,
        "members": row.members,
    }


def rows_to_json(rows: Iterable[TcpRow]) -> list[dict[str, Any]]:
    return [row_to_json(r) for r in rows]


def slow_to_json(slow: SlowConnect) -> dict[str, Any]:
    return {
        "time": slow.time,
        "pid": slow.pid,
        "tid": slow.tid,
        "comm": slow.comm,
        "container_id": slow.container_id,
        "cgroup_id": slow.cgroup_id,
        "cgroup_path": slow.cgroup_path,
        "family": slow.family,
        "saddr": slow.saddr,
        "sport": slow.sport,
        "daddr": slow.daddr,
        "dport": slow.dport,
        "latency_us": slow.latency_us,
        "failed": slow.failed,
        "reason": slow.reason,
        "error": slow.error,
        "syn_retransmits": slow.syn_retransmits,
    }


def slow_connects_to_json(slow: Iterable[SlowConnect]) -> list[dict[str, Any]]:
    return [slow_to_json(s) for s in slow]


class _Fields:
    """Typed access to one JSON object, raising ValueError that names the item and field."""

    def __init__(self, item: Any, where: str) -> None:
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        self.item = item
        self.where = where

    def _get(self, name: str, default: Any = ...) -> Any:
        if name in self.item:
            return self.item[name]
        if default is ...:
            raise ValueError(f"{self.where}: missing field {name!r}")
        return default

    def _bad(self, name: str, what: str) -> ValueError:
        return ValueError(f"{self.where}: {name} must be {what}, got {self.item.get(name)!r}")

    def integer(self, name: str, low: int = 0, high: int | None = None, default: Any = ...) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self._bad(name, f"an integer >= {low}")
        if high is not None and value > high:
            raise self._bad(name, f"an integer from {low} to {high}")
        return value

    def number(self, name: str, optional: bool = False, default: Any = ...) -> float | None:
        value = self._get(name, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self._bad(name, "a finite number" + (" or null" if optional else ""))
        if value < 0:
            raise self._bad(name, "a number >= 0")
        return float(value)

    def text(self, name: str, optional: bool = False, default: Any = ...) -> str | None:
        value = self._get(name, default)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self._bad(name, "a string" + (" or null" if optional else ""))
        return value

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def histogram(self, name: str, default: Any = ...) -> tuple[tuple[int, int], ...]:
        value = self._get(name, default)
        if not isinstance(value, Mapping):
            raise self._bad(name, "an object of bucket lower bound (us) to count")
        pairs = []
        for bound_text, count in value.items():
            try:
                bound = int(bound_text)
            except (TypeError, ValueError):
                raise self._bad(name, "keyed by integer bucket lower bounds") from None
            if str(bound) != bound_text or not is_bucket_bound(bound):
                raise self._bad(name, "keyed by 0 or powers of two (log2 bucket lower bounds in us)")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise self._bad(name, "counts that are integers >= 0")
            if count:
                pairs.append((bound, count))
        return tuple(sorted(pairs))

    def address(self, name: str, family: int, allow_empty: bool) -> str:
        text = self.text(name)
        assert text is not None
        if text == "" and allow_empty:
            return text
        try:
            parsed = ipaddress.ip_address(text)
        except ValueError:
            raise self._bad(name, "an IP address") from None
        if family not in (0, parsed.version):
            raise self._bad(name, f"an IPv{family} address (family {family})")
        return address_text(parsed)


def row_from_json(item: Any, where: str = "tcp_connect item") -> TcpRow:
    f = _Fields(item, where)
    family = f.integer("family", 0, 6)
    if family not in (0, 4, 6):
        raise f._bad("family", "4, 6 (or 0 for a group of destinations)")
    members = f.integer("members", 1, default=1)
    row = TcpRow(
        pid=f.integer("pid"),
        comm=f.text("comm") or "",
        cgroup_id=f.integer("cgroup_id", default=0),
        family=family,
        daddr=f.address("daddr", family, allow_empty=family == 0),
        dport=f.integer("dport", 0, 65535),
        connects=f.integer("connects"),
        failed=f.integer("failed"),
        connects_per_s=f.number("connects_per_s", default=0.0) or 0.0,
        failed_per_s=f.number("failed_per_s", default=0.0) or 0.0,
        p50_us=f.number("p50_us", optional=True),
        p90_us=f.number("p90_us", optional=True),
        p99_us=f.number("p99_us", optional=True),
        max_us=f.integer("max_us"),
        interval_p50_us=f.number("interval_p50_us", optional=True, default=None),
        interval_p99_us=f.number("interval_p99_us", optional=True, default=None),
        interval_p90_us=f.number("interval_p90_us", optional=True, default=None),
        interval_max_us=f.number("interval_max_us", optional=True, default=None),
        histogram=f.histogram("histogram"),
        interval_histogram=f.histogram("interval_histogram", default={}),
        syn_retransmits=f.integer("syn_retransmits", default=0),
        last_slow_at=f.number("last_slow_at", optional=True, default=None),
        cgroup_path=f.text("cgroup_path", default="") or "",
        container_id=f.text("container_id", optional=True),
        members=members,
    )
    if row.failed > row.connects:
        raise ValueError(f"{where}: failed ({row.failed}) is more than connects ({row.connects})")
    return row


def rows_from_json(items: Any) -> tuple[TcpRow, ...]:
    """The snapshot's tcp_connect list -> rows; ValueError naming the bad item and field."""
    if not isinstance(items, list):
        raise ValueError(f"tcp_connect must be a list, got {type(items).__name__}")
    return tuple(row_from_json(item, f"tcp_connect[{i}]") for i, item in enumerate(items))


def slow_from_json(item: Any, where: str = "tcp_slow_connects item") -> SlowConnect:
    f = _Fields(item, where)
    family = f.integer("family", 4, 6)
    if family not in (4, 6):
        raise f._bad("family", "4 or 6")
    return SlowConnect(
        time=f.number("time") or 0.0,
        pid=f.integer("pid"),
        tid=f.integer("tid"),
        comm=f.text("comm") or "",
        cgroup_id=f.integer("cgroup_id", default=0),
        family=family,
        saddr=f.address("saddr", family, allow_empty=False),
        sport=f.integer("sport", 0, 65535),
        daddr=f.address("daddr", family, allow_empty=False),
        dport=f.integer("dport", 0, 65535),
        latency_us=f.integer("latency_us"),
        failed=f.flag("failed"),
        reason=f.text("reason", default="") or "",
        syn_retransmits=f.integer("syn_retransmits", default=0),
        error=f.integer("error", default=0),
        cgroup_path=f.text("cgroup_path", default="") or "",
        container_id=f.text("container_id", optional=True, default=None),
    )


def slow_connects_from_json(items: Any) -> tuple[SlowConnect, ...]:
    if not isinstance(items, list):
        raise ValueError(f"tcp_slow_connects must be a list, got {type(items).__name__}")
    return tuple(slow_from_json(item, f"tcp_slow_connects[{i}]") for i, item in enumerate(items))


# -- the view's filter -------------------------------------------------------------------------------------


def _address_matches(daddr: str, wanted: str) -> bool:
    """`wanted` is an address, a network (10.0.0.0/8, fd00::/8) or a text prefix ("10.1.")."""
    if not daddr:
        return False
    if "/" in wanted:
        try:
            network = ipaddress.ip_network(wanted, strict=False)
            address = ipaddress.ip_address(daddr)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped and network.version == 4:
            return address.ipv4_mapped in network
        return address.version == network.version and address in network
    return daddr.startswith(wanted) or daddr.startswith(f"::ffff:{wanted}")


def filter_tcp_rows(
    rows: Iterable[TcpRow], text: str, container_names: Mapping[str, str] | None = None
) -> list[TcpRow]:
    """Rows matching every word of `text`: `port:443`, `addr:10.0.0.0/8` (or an address prefix),
    `pid:1234`, or a bare word matched against the command, container, destination, port and PID."""
    names = container_names or {}
    rows = list(rows)
    for word in text.lower().split():
        key, sep, value = word.partition(":")
        if sep and key == "port":
            rows = [r for r in rows if str(r.dport) == value]
        elif sep and key in ("addr", "dst", "daddr"):
            rows = [r for r in rows if _address_matches(r.daddr, value)]
        elif sep and key == "pid":
            rows = [r for r in rows if str(r.pid) == value]
        else:
            rows = [
                r
                for r in rows
                if word in r.comm.lower()
                or word in names.get(r.container_id or "", "").lower()
                or _address_matches(r.daddr, word)
                or word in (str(r.dport), str(r.pid))
            ]
    return rows
