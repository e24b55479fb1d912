"""The OOM log: every kill, newest first (the tab), and one kill in detail with its pre-kill graphs."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Sparkline, Static

from memtop import format as fmt
from memtop.oom import OomEvent
from memtop.screens import MemtopScreen
from memtop.store import Snapshot
from memtop.widgets import Column, HeaderBar, VirtualTable, right


def oom_key(event: OomEvent) -> str:
    return f"{event.time!r}:{event.victim_pid}"


def cause(event: OomEvent) -> str:
    if event.constraint == "memcg":
        return "cgroup limit"
    if event.constraint == "global":
        return "system-wide"
    if event.constraint in ("cpuset", "mempolicy"):
        return f"{event.constraint} (node)"
    return "unknown"


def where(event: OomEvent) -> str:
    if event.pod_name:
        pod = f"{event.namespace}/{event.pod_name}" if event.namespace else event.pod_name
        return f"{pod} {event.container_name}" if event.container_name else pod
    if event.container_name:
        return event.container_name
    if event.container_id:
        return event.container_id[:12] if len(event.container_id) == 64 else event.container_id
    return event.cgroup_path or "-"


def _time(event: OomEvent) -> Text:
    text = Text(fmt.datetime(event.time))
    if event.source == "kmsg":
        text.append(" log", style="dim")
    return text


def _victim(event: OomEvent) -> Text:
    return Text.assemble((event.victim_comm or "?", "bold"), f" {event.victim_pid}")


def _trigger(event: OomEvent) -> str:
    if event.trigger_pid is None and not event.trigger_comm:
        return "-"
    if event.trigger_pid == event.victim_pid:
        return "itself"
    return f"{event.trigger_comm or '?'} {event.trigger_pid if event.trigger_pid is not None else ''}".strip()


class _EventView:
    """Attribute access for sorting: the columns' fields are OomEvent's own plus a few derived."""

    def __init__(self, event: OomEvent) -> None:
        self.event = event

    def __getattr__(self, name: str) -> Any:
        if name == "cause":
            return cause(self.event)
        if name == "where":
            return where(self.event)
        return getattr(self.event, name)


OOM_COLUMNS: tuple[Column, ...] = (
    Column("time", "TIME", lambda v: _time(v.event), width=23),
    Column("victim_comm", "VICTIM", lambda v: _victim(v.event), numeric=False, width=22),
    Column("where", "CONTAINER / POD / CGROUP", lambda v: where(v.event), numeric=False, width=34),
    Column("cause", "CAUSE", lambda v: cause(v.event), numeric=False, width=14),
    Column("anon_rss_bytes", "ANON RSS", lambda v: right(fmt.size(v.anon_rss_bytes)), width=10),
    Column("memcg_limit_bytes", "LIMIT", lambda v: right(fmt.size(v.memcg_limit_bytes)), width=10),
    Column("trigger_comm", "TRIGGER", lambda v: _trigger(v.event), numeric=False, width=18),
)


class OomTable(VirtualTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(OOM_COLUMNS, sort_group="oom", row_key=lambda v: oom_key(v.event), **kwargs)


def oom_rows(snap: Snapshot) -> list[tuple[str, _EventView]]:
    return [(oom_key(e), _EventView(e)) for e in snap.oom_events]


def oom_details(event: OomEvent) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    limit = ""
    if event.constraint == "memcg":
        limit = f"limit {fmt.size(event.memcg_limit_bytes)}, usage {fmt.size(event.memcg_usage_bytes)}"
        if event.memcg_path:
            limit += f" in {event.memcg_path}"
    for label, value in (
        ("time", f"{fmt.datetime(event.time)}  ({'kernel log' if event.source == 'kmsg' else 'tracepoint'})"),
        ("victim", f"{event.victim_comm or '?'} (PID {event.victim_pid})"),
        ("uid", "-" if event.uid is None else str(event.uid)),
        ("oom_score_adj", "-" if event.oom_score_adj is None else str(event.oom_score_adj)),
        ("cause", f"{cause(event)}  {limit}".rstrip()),
        ("trigger", _trigger(event)),
        ("cgroup", event.cgroup_path or "-"),
        (
            "container",
            f"{event.container_name or '-'}  {event.runtime}  id {event.container_id}"
            if event.container_id
            else "host",
        ),
        ("pod", f"{event.pod_name or '-'}  uid {event.pod_uid or '-'}"),
        ("namespace", event.namespace or "-"),
        (
            "memory held",
            f"anon {fmt.size(event.anon_rss_bytes)}  file {fmt.size(event.file_rss_bytes)}  "
            f"shmem {fmt.size(event.shmem_rss_bytes)}  page tables {fmt.size(event.pgtables_bytes)}  "
            f"total VM {fmt.size(event.total_vm_bytes)}",
        ),
        ("reaped", fmt.clock(event.reaped_at) if event.reaped_at else "-"),
    ):
        grid.add_row(label, value)
    return grid


class OomScreen(MemtopScreen):
    """One kill: who, where, why, and the minute before it."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with Horizontal(id="oom-top"):
            yield Static(id="oom-details")
        with Vertical(id="oom-graphs"):
            yield Static(id="oom-memory-label")
            yield Sparkline([], id="oom-memory-graph")
            yield Static(id="oom-kmalloc-label")
            yield Sparkline([], id="oom-kmalloc-graph")
            yield Static(id="oom-victim-label")
            yield Sparkline([], id="oom-victim-graph")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_view()

    def show_snapshot(self, snap: Snapshot) -> None:
        event = next((e for e in snap.oom_events if oom_key(e) == self.key), None)
        if event is None:
            self.query_one("#oom-details", Static).update(
                Text("this kill is no longer in the log", style="dim")
            )
            return
        self.query_one("#oom-details", Static).update(oom_details(event))
        history = event.history
        whose = {"container": "the container's cgroup", "process": "the victim's RSS"}.get(
            event.history_of, ""
        )
        memory = [float(p.memory_bytes) for p in history if p.memory_bytes is not None]
        rates = [p.kmalloc_bytes_per_s for p in history]
        span = history[-1].t - history[0].t if len(history) > 1 else 0.0
        if not history:
            note = "memtop held no samples of this victim before the kill"
        else:
            note = f"the {fmt.short_duration(span)} before the kill, {len(history)} samples"
        self.query_one("#oom-memory-label", Static).update(
            Text.assemble(
                ("memory", "bold"),
                f" of {whose}  " if whose else "  ",
                f"first {fmt.size(memory[0] if memory else None)}"
                f" → last {fmt.size(memory[-1] if memory else None)}  ({note})",
            )
        )
        self.query_one("#oom-memory-graph", Sparkline).data = memory or [0.0]
        self.query_one("#oom-kmalloc-label", Static).update(
            Text.assemble(
                ("kmalloc bytes/s", "bold"), f"  peak {fmt.size_rate(max(rates) if rates else None)}"
            )
        )
        self.query_one("#oom-kmalloc-graph", Sparkline).data = rates or [0.0]
        # Beside the container's memory: the victim's own RSS and kmalloc rate over the same minute.
        separate = event.history_of == "container"
        victim = event.victim_history if separate else ()
        rss = [float(p.memory_bytes) for p in victim if p.memory_bytes is not None]
        victim_rates = [p.kmalloc_bytes_per_s for p in victim]
        label = Text.assemble(("the victim's RSS", "bold"))
        if not separate:
            label.append("  (the graphs above)" if history else "  -", style="dim")
        elif not victim:
            label.append("  memtop held no samples of the process itself", style="dim")
        else:
            label.append(
                f"  first {fmt.size(rss[0] if rss else None)} → last {fmt.size(rss[-1] if rss else None)}"
                f"  │ its kmalloc peak {fmt.size_rate(max(victim_rates) if victim_rates else None)}"
            )
        self.query_one("#oom-victim-label", Static).update(label)
        graph = self.query_one("#oom-victim-graph", Sparkline)
        graph.data = rss or [0.0]
        graph.display = bool(separate and victim)
