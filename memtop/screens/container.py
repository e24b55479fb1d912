"""The container drill-down: who it is (pod, namespace, runtime, cgroup), its memory against its limit,
its kmalloc graph, and its processes (Enter: the process drill-down)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Sparkline, Static

from memtop import format as fmt
from memtop.screens import MemtopScreen
from memtop.screens.tables import PROCESS_COLUMNS, process_row_key
from memtop.store import ContainerRow, ProcessRow, Snapshot, sort_rows
from memtop.widgets import HeaderBar, VirtualTable


def container_details(row: ContainerRow | None, container_id: str) -> Text | Table:
    if row is None:
        return Text(f"container {container_id[:12]}: no longer in the data", style="dim")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    pod = row.pod_name or "-"
    if row.pod_uid:
        pod += f"  (uid {row.pod_uid})"
    limit = "no limit" if row.memory_limit_bytes is None else f"limit {fmt.size(row.memory_limit_bytes)}"
    memory = f"{fmt.size(row.memory_bytes)}  {limit}  ({fmt.percent(row.memory_pct)})"
    if row.memory_usage_bytes is not None:  # absent in snapshots written before it was kept
        memory += f"  working set; usage with page cache {fmt.size(row.memory_usage_bytes)}"
    for label, value in (
        ("container", row.name or "-"),
        ("id", row.id),
        ("runtime", row.runtime),
        ("pod", pod),
        ("namespace", row.namespace or "-"),
        ("QoS", row.qos or "-"),
        ("image", row.image or "-"),
        ("cgroup", row.cgroup_path),
        ("memory", memory),
        ("processes", str(row.processes)),
        ("OOM kills", str(row.oom_kills)),
        (
            "kmalloc now",
            f"{fmt.size_rate(row.kmalloc_bytes_per_s)}  {fmt.count_rate(row.kmalloc_calls_per_s)} calls",
        ),
        ("kmalloc total", f"{fmt.size(row.kmalloc_bytes)} in {fmt.count(row.kmalloc_calls)} calls"),
    ):
        grid.add_row(label, value)
    return grid


class ContainerProcessTable(VirtualTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(PROCESS_COLUMNS, sort_group="processes", row_key=process_row_key, **kwargs)


class ContainerScreen(MemtopScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("enter", "drill", "Process details"),
    ]

    def __init__(self, container_id: str) -> None:
        super().__init__()
        self.container_id = container_id

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with Horizontal(id="container-top"):
            yield Static(id="container-details")
            with Vertical(id="container-graphs"):
                yield Static(id="kmalloc-label")
                yield Sparkline([], id="kmalloc-graph")
                yield Static(id="memory-label")
                yield Sparkline([], id="memory-graph")
        yield ContainerProcessTable(id="container-processes")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ContainerProcessTable).focus()
        self.refresh_view()

    def show_snapshot(self, snap: Snapshot) -> None:
        row = snap.container(self.container_id)
        self.query_one("#container-details", Static).update(container_details(row, self.container_id))
        history = snap.container_histories.get(self.container_id, ())
        rates = [p.kmalloc_bytes_per_s for p in history]
        memory = [float(p.memory_bytes) for p in history if p.memory_bytes is not None]
        span = history[-1].t - history[0].t if len(history) > 1 else 0.0
        self.query_one("#kmalloc-label", Static).update(
            Text.assemble(
                ("kmalloc bytes/s", "bold"),
                f"  last {fmt.short_duration(span)}  now {fmt.size_rate(rates[-1] if rates else None)}"
                f"  peak {fmt.size_rate(max(rates) if rates else None)}",
            )
        )
        self.query_one("#kmalloc-graph", Sparkline).data = rates or [0.0]
        limit = row.memory_limit_bytes if row else None
        self.query_one("#memory-label", Static).update(
            Text.assemble(
                ("memory", "bold"),
                f"  now {fmt.size(memory[-1] if memory else None)}"
                f"  peak {fmt.size(max(memory) if memory else None)}"
                f"  limit {fmt.size(limit) if limit is not None else 'none'}",
            )
        )
        self.query_one("#memory-graph", Sparkline).data = memory or [0.0]
        sort = self.memtop.sort_for("processes")
        procs = sort_rows((p for p in snap.processes if p.container_id == self.container_id), sort)
        table = self.query_one(ContainerProcessTable)
        table.set_rows(procs)
        table.set_header_marks(sort.column, sort.reverse)

    def on_virtual_table_row_selected(self, event: VirtualTable.RowSelected) -> None:
        event.stop()
        self.action_drill()

    def action_drill(self) -> None:
        row: ProcessRow | None = self.query_one(ContainerProcessTable).cursor_record()
        if row is not None:
            self.memtop.open_process(row.key)
