"""Validated options, as frozen dataclasses: everything downstream trusts these values."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 3600.0
MAX_SAMPLE_EVERY = 1_000_000
MAX_DURATION_S = 7 * 86400.0


@dataclass(frozen=True)
class Config:
    interval_s: float = 1.0
    sample_every: int = 1  # 1-in-N kmalloc sampling for the per-process counters
    max_pids: int = 16384  # bound of the kernel's per-process map
    tail_min_bytes: int = 0  # drill-down tail: only kmallocs of at least this many bytes
    replay: Path | None = None
    focus_pid: int | None = None  # headless snapshot: collect call sites etc. for this process
    duration_s: float = 5.0  # headless snapshot window
    output: Path | None = None
    runtime_roots: tuple[tuple[str, str], ...] = ()  # (runtime, state directory) overrides
    hide_host: bool = False  # start with host processes hidden (only containers' processes shown)
    tcp_slow_ms: int = 200  # TCP connects at least this slow (or failed) are kept individually
    tcp_pids: tuple[int, ...] = ()  # trace only these processes' connects (a kernel-side filter)
    leak_sample: int | None = None  # kernel leak tracking: 1 in N allocations; None adapts N to the rate
    leak_pages: bool = False  # also track page allocations (kmem:mm_page_alloc/free)
    leaks_pid: int | None = None  # also track this process's user-space allocations from the start
    user_leak_sample: int | None = None  # user leak tracking (m, --leaks-pid): 1 in N; None adapts N
    older_s: float = 0.0  # the Leaks panel hides allocations younger than this
