"""The process drill-down: details, live kmalloc graph, size distribution, call sites, live tail."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Sparkline, Static

from memtop import format as fmt
from memtop.leaks import UPROBE_COST_NOTE
from memtop.model import IRQ_TGID, FocusReading
from memtop.screens import MemtopScreen
from memtop.screens.leaks import LEAK_COLUMNS, LeakScreen, leak_key, rows_for, sampling_text
from memtop.store import ProcessKey, ProcessRow, Snapshot, sort_rows
from memtop.widgets import Column, HeaderBar, VirtualTable, right

CALL_SITE_COLUMNS = (
    Column("symbol", "CALL SITE", lambda s: s.symbol, numeric=False, width=30),
    Column("calls", "CALLS", lambda s: right(fmt.count(s.calls)), width=8),
    Column("bytes_alloc", "BYTES", lambda s: right(fmt.size(s.bytes_alloc)), width=10),
    Column("avg", "AVG", lambda s: right(fmt.size(s.bytes_alloc / s.calls if s.calls else None)), width=9),
)
TAIL_ROWS = 200


class ProcessLeakTable(VirtualTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(LEAK_COLUMNS, sort_group="leaks", row_key=leak_key, **kwargs)


TAIL_MAX_PER_SEC = 200  # the kernel-side tail budget (memtop/bpf/kmalloc.c)


def details_text(row: ProcessRow | None, key: ProcessKey, snap: Snapshot) -> Text:
    if row is None:
        return Text(f"PID {key.pid}: no longer in the data", style="dim")
    state = (
        f"exited {fmt.short_duration(snap.taken_at - row.exited_at)} ago"
        if (row.exited and row.exited_at)
        else (row.state or "-")
    )
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in (
        ("command", row.comm),
        ("cmdline", " ↵ ".join(row.cmdline.splitlines()) or "-"),
        ("user", row.user or "-"),
        ("state", state),
        ("memory", f"RSS {fmt.size(row.rss_bytes)}  VMS {fmt.size(row.vms_bytes)}"),
        ("threads", "-" if row.threads is None else str(row.threads)),
        ("started", fmt.datetime(row.start_time)),
        ("cgroup", row.cgroup_path or "-"),
        ("container", f"{row.container}  ({row.container_id})" if row.container_id else "host"),
        ("OOM kills", _kill_counts(row, snap)),
        ("TCP connects", _destinations(row, snap)),
        (
            "kmalloc now",
            f"{fmt.size_rate(row.kmalloc_bytes_per_s)}  {fmt.count_rate(row.kmalloc_calls_per_s)} calls",
        ),
        (
            "kmalloc total",
            f"{fmt.size(row.kmalloc_bytes)} in {fmt.count(row.kmalloc_calls)} calls, "
            f"avg {fmt.size(row.kmalloc_avg_bytes)}, waste {fmt.percent(row.kmalloc_waste_pct)}",
        ),
    ):
        grid.add_row(label, value)
    return grid  # type: ignore[return-value]


def _destinations(row: ProcessRow, snap: Snapshot, top: int = 3) -> str:
    mine = sorted((t for t in snap.tcp_connect if t.pid == row.pid), key=lambda t: t.connects, reverse=True)
    if not mine:
        return "none seen"
    parts = [
        f"{t.daddr}:{t.dport} ×{fmt.count(t.connects)}"
        + (f" ({fmt.count(t.failed)} failed)" if t.failed else "")
        + (f" p99 {t.p99_us / 1000:.1f} ms" if t.p99_us is not None else "")
        for t in mine[:top]
    ]
    more = f"  +{len(mine) - top} more (TCP tab)" if len(mine) > top else ""
    return "; ".join(parts) + more


def _kill_counts(row: ProcessRow, snap: Snapshot) -> str:
    victim = sum(1 for e in snap.oom_events if e.victim_pid == row.pid and e.time >= row.start_time)
    trigger = sum(
        1
        for e in snap.oom_events
        if e.trigger_pid == row.pid and e.victim_pid != row.pid and e.time >= row.start_time
    )
    return f"{victim} as victim, {trigger} triggered (killing another process)"


def sizes_text(reading: FocusReading | None, width: int = 30) -> Text:
    text = Text("kmalloc sizes (log2 buckets)\n", style="bold")
    counts = reading.size_log2_counts if reading else ()
    used = [(i, c) for i, c in enumerate(counts) if c]
    if not used:
        text.append("no allocations seen yet", style="dim")
        return text
    peak = max(c for _, c in used)
    total = sum(c for _, c in used)
    for i, c in used:
        bar = "█" * max(1, round(width * c / peak))
        text.append(f"{fmt.size_bucket(i):>19} ", style="dim")
        text.append(bar.ljust(width), style="green")
        text.append(f" {fmt.count(c):>6} {100 * c / total:5.1f}%\n")
    return text


def tail_text(reading: FocusReading | None, min_bytes: int, drops: Mapping[str, int], live: bool) -> Text:
    header = Text.assemble(
        ("live tail", "bold"),
        f"  ≥ {fmt.size(min_bytes)} ([ ] change)  lost {fmt.count(drops.get('tail_lost', 0))}"
        f"  over {TAIL_MAX_PER_SEC}/s/CPU skipped {fmt.count(drops.get('tail_rate_limited', 0))}",
        ("" if live else "  (recorded)", "dim"),
        "\n",
    )
    header.no_wrap = True
    header.overflow = "ellipsis"
    events = list(reading.tail)[-TAIL_ROWS:] if reading else []
    if not events:
        header.append("no kmallocs of that size yet", style="dim")
        return header
    table = Text(no_wrap=True, overflow="ellipsis")
    table.append(
        f"{'TIME':12} {'TID':>7} {'REQ':>8} {'ALLOC':>8} {'NODE':>4} {'CALL SITE':26} GFP\n", style="bold"
    )
    for ev in reversed(events[-40:]):
        node = "-" if ev.node < 0 else str(ev.node)
        table.append(
            f"{fmt.clock(ev.time):12} {ev.tid:>7} {fmt.size(ev.bytes_req):>8} {fmt.size(ev.bytes_alloc):>8} "
            f"{node:>4} {ev.call_site[:26]:26} {ev.gfp_text}\n"
        )
    return header + table


class ProcessScreen(MemtopScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("left_square_bracket", "tail_min(-1)", "Tail min ÷2"),
        Binding("right_square_bracket", "tail_min(1)", "Tail min ×2"),
        Binding("m", "user_leaks", "Track malloc (leaks)"),
        Binding("enter", "leak_stack", "Leak stack", show=False),
    ]
    shows_leaks = True  # the process's own kernel leak rows

    def __init__(self, key: ProcessKey) -> None:
        super().__init__()
        self.key = key

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with Horizontal(id="process-top"):
            yield Static(id="details")
            with Vertical(id="graph-box"):
                yield Static(id="graph-label")
                yield Sparkline([], id="graph")
                yield Static(id="sizes")
        with Horizontal(id="process-bottom"):
            yield VirtualTable(CALL_SITE_COLUMNS, row_key=lambda s: s.address, id="call-sites")
            yield Static(id="tail")
        yield Static(id="process-leaks-label")
        yield ProcessLeakTable(id="process-leaks")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#call-sites").focus()
        self.refresh_view()

    def show_snapshot(self, snap: Snapshot) -> None:
        app = self.memtop
        row = snap.process(self.key)
        self.query_one("#details", Static).update(details_text(row, self.key, snap))
        focus = snap.focus if snap.focus is not None and snap.focus.key == self.key else None
        history = focus.history if focus else snap.histories.get(self.key, ())
        values = [p.kmalloc_bytes_per_s for p in history]
        span = history[-1].t - history[0].t if len(history) > 1 else 0.0
        peak = max(values) if values else 0.0
        self.query_one("#graph-label", Static).update(
            Text.assemble(
                ("kmalloc bytes/s", "bold"),
                f"  last {fmt.short_duration(span)}  now {fmt.size_rate(values[-1] if values else None)}"
                f"  peak {fmt.size_rate(peak)}",
            )
        )
        self.query_one("#graph", Sparkline).data = values or [0.0]
        reading = focus.reading if focus else None
        self.query_one("#sizes", Static).update(sizes_text(reading))
        sites = reading.call_sites if reading else ()
        self.query_one("#call-sites", VirtualTable).set_rows(sites[:200])
        self.query_one("#tail", Static).update(
            tail_text(reading, app.tail_min_bytes, snap.drops, not snap.replay)
        )
        own = snap.focus.leaks if snap.focus is not None and snap.focus.key.pid == self.key.pid else None
        leaks = own if own is not None else rows_for(snap, self.key.pid)  # a file without the focus's share
        tracking = snap.leak_user_pid == self.key.pid
        self.query_one("#process-leaks-label", Static).update(
            Text.assemble(
                ("outstanding allocations of this process", "bold"),
                f"  kernel ({sampling_text(snap).split(',')[0]})",
                (
                    "  + its own malloc (tracking: m stops)"
                    if tracking
                    else f"  │ m: also track its malloc/free ({UPROBE_COST_NOTE})"
                ),
                "  │ Enter: whole stack",
            )
        )
        lsort = app.sort_for("leaks")
        ordered = sort_rows(leaks, lsort, tiebreak=lambda r: (r.kind, r.stack_id))
        table = self.query_one(ProcessLeakTable)
        table.set_rows(ordered)
        table.set_header_marks(lsort.column, lsort.reverse)

    def action_user_leaks(self) -> None:
        if self.key.pid == IRQ_TGID:
            return
        self.memtop.toggle_user_leaks(self.key.pid)

    def on_virtual_table_row_selected(self, event: VirtualTable.RowSelected) -> None:
        if event.table.id == "process-leaks":
            event.stop()
            self.action_leak_stack()

    def action_leak_stack(self) -> None:
        key = self.query_one(ProcessLeakTable).cursor_key()
        if key is not None:
            self.app.push_screen(LeakScreen(key))

    def action_tail_min(self, direction: int) -> None:
        self.memtop.change_tail_min(direction)
        self.refresh_view()
