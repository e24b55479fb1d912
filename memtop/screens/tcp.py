"""TCP connect latency: rows per process and destination (grouping toggles), and one row in detail
with its latency histogram and its recent slow or failed connects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Static

from memtop import format as fmt
from memtop.screens import MemtopScreen
from memtop.store import Snapshot
from memtop.tcp import SlowConnect, TcpRow, bucket_upper_bound, group_rows
from memtop.widgets import Column, HeaderBar, VirtualTable, right

# (grouping, what the tab says): per process and destination, then merged by each of the others.
GROUPINGS: tuple[tuple[str, str], ...] = (
    ("", "process × destination"),
    ("destination", "by destination"),
    ("process", "by process"),
    ("container", "by container"),
)
RESOLUTION_NOTE = "percentiles from log2 buckets (within ×2), max exact"


def latency(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.1f} ms"
    return f"{us / 1_000_000:.2f} s"


def destination(row: TcpRow) -> str:
    if not row.daddr:
        return f"{row.members} destinations" if row.members > 1 else "-"
    return f"[{row.daddr}]" if ":" in row.daddr else row.daddr


def tcp_key(row: TcpRow) -> str:
    return f"{row.pid}|{row.comm}|{row.daddr}|{row.dport}|{row.container_id or ''}"


class _RowView:
    """A TcpRow with the container's display name, for rendering and sorting."""

    def __init__(self, row: TcpRow, container: str) -> None:
        self.row = row
        self.container = container

    def __getattr__(self, name: str) -> Any:
        return getattr(self.row, name)


def _failed(v: _RowView) -> Text:
    return right(fmt.count(v.failed), style="bold red" if v.failed else "dim")


def _command(v: _RowView) -> str:
    if v.pid == 0 and not v.comm:
        return "(several)"
    return v.comm or "?"


TCP_COLUMNS: tuple[Column, ...] = (
    Column("pid", "PID", lambda v: right(str(v.pid) if v.pid else "-"), width=8),
    Column("comm", "COMMAND", _command, numeric=False, width=16),
    Column("container", "CONTAINER", lambda v: v.container, numeric=False, width=16),
    Column("daddr", "DESTINATION", lambda v: destination(v.row), numeric=False, width=26),
    Column("dport", "PORT", lambda v: right(str(v.dport) if v.dport else "-"), width=6),
    Column("connects_per_s", "CONN/s", lambda v: right(fmt.count_rate(v.connects_per_s)), width=9),
    Column("failed", "FAILED", _failed, width=7),
    Column("p50_us", "P50", lambda v: right(latency(v.p50_us)), width=9),
    Column("p99_us", "P99", lambda v: right(latency(v.p99_us)), width=9),
    Column("max_us", "MAX", lambda v: right(latency(v.max_us if v.histogram else None)), width=9),
    Column("last_slow_at", "LAST SLOW", lambda v: right(fmt.clock(v.last_slow_at, millis=False)), width=10),
)


class TcpTable(VirtualTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(TCP_COLUMNS, sort_group="tcp", row_key=lambda v: tcp_key(v.row), **kwargs)


def container_names(snap: Snapshot) -> dict[str, str]:
    return {c.id: c.label for c in snap.containers}


def tcp_views(snap: Snapshot, grouping: str, rows: Sequence[TcpRow]) -> list[_RowView]:
    names = container_names(snap)
    grouped = group_rows(rows, grouping) if grouping else tuple(rows)

    def label(row: TcpRow) -> str:
        if row.container_id is None:
            return "host" if row.members == 1 or grouping == "container" else "-"
        return names.get(row.container_id, row.container_id[:12])

    return [_RowView(r, label(r)) for r in grouped]


def histogram_text(histogram: Sequence[tuple[int, int]], width: int = 24) -> Text:
    text = Text("latency of successful connects (log2 buckets)\n", style="bold")
    if not histogram:
        text.append("no successful connects yet", style="dim")
        return text
    peak = max(c for _, c in histogram)
    total = sum(c for _, c in histogram)
    for low, count in histogram:
        bar = "█" * max(1, round(width * count / peak))
        span = f"{latency(low)} – {latency(bucket_upper_bound(low))}"
        text.append(f"{span:>22} ", style="dim")
        text.append(bar.ljust(width), style="green")
        text.append(f" {fmt.count(count):>6} {100 * count / total:5.1f}%\n")
    return text


def slow_text(events: Sequence[SlowConnect], slow_ms: int | None, limit: int = 40) -> Text:
    threshold = f"≥ {slow_ms} ms" if slow_ms is not None else "slow"
    text = Text(f"recent slow ({threshold}) and failed connects\n", style="bold")
    if not events:
        text.append("none", style="dim")
        return text
    for e in events[:limit]:
        outcome = Text(f"failed: {e.reason or 'closed'}", style="bold red") if e.failed else Text("ok")
        text.append(f"{fmt.clock(e.time)}  {e.comm}[{e.pid}]  → {e.daddr} port {e.dport}  ")
        text.append(latency(e.latency_us), style="bold")
        text.append("  ")
        text.append(outcome)
        if e.syn_retransmits:
            text.append(f"  {e.syn_retransmits} SYN retransmit(s)", style="yellow")
        text.append("\n")
    return text


def matches(row: TcpRow, event: SlowConnect) -> bool:
    """Whether a slow connect belongs to a (possibly grouped) row."""
    return (
        (not row.pid or row.pid == event.pid)
        and (not row.daddr or row.daddr == event.daddr)
        and (not row.dport or row.dport == event.dport)
        and (row.container_id is None or row.container_id == event.container_id)
    )


class TcpScreen(MemtopScreen):
    """One row of the TCP panel: its figures, histogram and recent slow/failed connects."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, key: str, grouping: str) -> None:
        super().__init__()
        self.key = key
        self.grouping = grouping

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(id="tcp-summary")
        with Horizontal(id="tcp-bottom"):
            yield Static(id="tcp-histogram")
            yield Static(id="tcp-slow")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_view()

    def show_snapshot(self, snap: Snapshot) -> None:
        view = next(
            (v for v in tcp_views(snap, self.grouping, snap.tcp_connect) if tcp_key(v.row) == self.key), None
        )
        if view is None:
            self.query_one("#tcp-summary", Static).update(Text("no longer in the data", style="dim"))
            return
        row = view.row
        self.query_one("#tcp-summary", Static).update(
            Text.assemble(
                (f"{_command(view)} ", "bold"),
                f"PID {row.pid or '-'}  container {view.container}  ",
                f"→ {destination(row)} port {row.dport or '-'}\n",
                f"{fmt.count(row.connects)} connects, {fmt.count(row.failed)} failed, "
                f"{fmt.count_rate(row.connects_per_s)} now;  since start p50 {latency(row.p50_us)}  "
                f"p90 {latency(row.p90_us)}  p99 {latency(row.p99_us)}  max {latency(row.max_us)};  "
                f"last interval p50 {latency(row.interval_p50_us)}  p90 {latency(row.interval_p90_us)}  "
                f"p99 {latency(row.interval_p99_us)}  max {latency(row.interval_max_us)}\n",
                (RESOLUTION_NOTE, "dim"),
            )
        )
        self.query_one("#tcp-histogram", Static).update(histogram_text(row.histogram))
        events = [e for e in snap.tcp_slow_connects if matches(row, e)]
        self.query_one("#tcp-slow", Static).update(slow_text(events, snap.tcp_slow_ms))
