"""The main screen: header, one tab per panel (Processes, Containers, ...), and the filter box."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Input, Static, TabbedContent, TabPane

from memtop.screens import MemtopScreen
from memtop.screens.leaks import LEAK_COLUMNS, OLDER_STEPS, LeakScreen, LeakTable, leak_key, leak_note
from memtop.screens.oom import OOM_COLUMNS, OomTable, oom_key, oom_rows, where
from memtop.screens.tables import CONTAINER_COLUMNS, PROCESS_COLUMNS, process_row_key
from memtop.screens.tcp import (
    GROUPINGS,
    RESOLUTION_NOTE,
    TCP_COLUMNS,
    TcpScreen,
    TcpTable,
    container_names,
    tcp_key,
    tcp_views,
)
from memtop.store import ContainerRow, ProcessRow, Snapshot, filter_containers, filter_rows, sort_rows
from memtop.tcp import filter_tcp_rows
from memtop.widgets import HeaderBar, SortedTable

__all__ = ["PROCESS_COLUMNS", "MainScreen", "ProcessTable", "ContainerTable", "row_key"]

row_key = process_row_key

# (tab id, title, the key that jumps to it)
TABS: tuple[tuple[str, str, str], ...] = (
    ("processes", "Processes", "P"),
    ("containers", "Containers", "C"),
    ("leaks", "Leaks", "L"),
    ("oom", "OOM", "O"),
    ("tcp", "TCP", "T"),
)


def probe_problem(snap: Snapshot, name: str) -> str:
    """Why a panel's probe is not delivering ("" when it is, or in a replay that recorded it)."""
    probe = snap.probes.get(name)
    if probe is None:
        return "" if snap.replay else f"{name} probe not started"
    if probe.status in ("running", "replay"):
        return ""
    return f"{name} probe {probe.status}" + (f": {probe.detail}" if probe.detail else "")


class ProcessTable(SortedTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(PROCESS_COLUMNS, sort_group="processes", **kwargs)


class ContainerTable(SortedTable):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(CONTAINER_COLUMNS, sort_group="containers", **kwargs)


class MainScreen(MemtopScreen):
    BINDINGS = [
        Binding("enter", "drill", "Details", show=True),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("tab", "next_tab(1)", "Next tab", show=False, priority=True),
        Binding("shift+tab", "next_tab(-1)", "Previous tab", show=False, priority=True),
        Binding("g", "tcp_grouping", "TCP: group by destination/process/container", show=False),
        Binding("o", "leak_older", "Leaks: hide younger than 10s/1m/5m/30m", show=False),
        *(Binding(key, f"show_tab('{tab}')", f"{title} tab", show=False) for tab, title, key in TABS),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter_text = ""
        self._processes: dict[str, ProcessRow] = {}
        self._containers: dict[str, ContainerRow] = {}
        self.tcp_grouping = 0  # index into GROUPINGS

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with TabbedContent(id="tabs"):
            with TabPane("Processes", id="processes"):
                yield ProcessTable(id="process-table")
            with TabPane("Containers", id="containers"):
                yield ContainerTable(id="container-table")
            with TabPane("Leaks", id="leaks"):
                yield Static(id="leaks-note")
                yield LeakTable(id="leak-table")
            with TabPane("OOM", id="oom"):
                yield Static(id="oom-note")
                yield OomTable(id="oom-table")
            with TabPane("TCP", id="tcp"):
                yield Static(id="tcp-note")
                yield TcpTable(id="tcp-table")
        yield Input(placeholder="filter — Enter keeps it, Esc clears", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ProcessTable).focus()
        self.refresh_view()

    @property
    def active_tab(self) -> str:
        return self.query_one("#tabs", TabbedContent).active or "processes"

    def show_snapshot(self, snap: Snapshot) -> None:
        app = self.memtop
        processes = filter_rows(snap.processes, self.filter_text)
        if app.hide_host:
            processes = [r for r in processes if r.container_id is not None]
        sort = app.sort_for("processes")
        rows = sort_rows(processes, sort)
        self._processes = {row_key(r.key): r for r in rows}
        table = self.query_one(ProcessTable)
        table.show_rows([(row_key(r.key), [c.render(r) for c in PROCESS_COLUMNS]) for r in rows])
        table.set_header_marks(sort.column, sort.reverse)

        csort = app.sort_for("containers")
        containers = sort_rows(
            filter_containers(snap.containers, self.filter_text), csort, tiebreak=lambda c: c.id
        )
        self._containers = {c.id: c for c in containers}
        ctable = self.query_one(ContainerTable)
        ctable.show_rows([(c.id, [col.render(c) for col in CONTAINER_COLUMNS]) for c in containers])
        ctable.set_header_marks(csort.column, csort.reverse)

        osort = app.sort_for("oom")
        events = [
            (k, v)
            for k, v in oom_rows(snap)
            if not self.filter_text
            or self.filter_text.lower() in f"{v.victim_comm} {v.victim_pid} {where(v.event)}".lower()
        ]
        ordered = sort_rows([v for _, v in events], osort, tiebreak=lambda v: (v.time, v.victim_pid))
        otable = self.query_one(OomTable)
        otable.show_rows([(oom_key(v.event), [col.render(v) for col in OOM_COLUMNS]) for v in ordered])
        otable.set_header_marks(osort.column, osort.reverse)
        problem = probe_problem(snap, "oom")
        kills = f"{snap.oom_kills_seen} kills seen live; " if not snap.replay else ""
        self.query_one("#oom-note", Static).update(
            Text.assemble(
                f"{kills}{len(snap.oom_events)} in the log",
                ' ("log": from the kernel log, before memtop started)',
                "  │ Enter: details and the minute before the kill",
                (f"  [{problem}]" if problem else "", "bold red"),
            )
        )

        self._show_tcp(snap)
        self._show_leaks(snap)

        tabs = self.query_one("#tabs", TabbedContent)
        suffix = f" [filter: {self.filter_text}]" if self.filter_text else ""
        hidden = " [containers only]" if app.hide_host else ""
        tabs.get_tab("processes").label = f"Processes{hidden}{suffix}"  # type: ignore[assignment]
        tabs.get_tab("containers").label = f"Containers ({len(snap.containers)}){suffix}"  # type: ignore[assignment]
        tabs.get_tab("oom").label = f"OOM ({len(snap.oom_events)}){suffix}"  # type: ignore[assignment]
        tabs.get_tab("tcp").label = f"TCP ({len(snap.tcp_connect)}){suffix}"  # type: ignore[assignment]

    def _show_leaks(self, snap: Snapshot) -> None:
        needle = self.filter_text.strip().lower()
        rows = [
            r
            for r in snap.leaks
            if not needle
            or needle in r.comm.lower()
            or needle in " ".join(r.stack).lower()
            or any(needle == str(p) for p in r.pids)
        ]
        lsort = self.memtop.sort_for("leaks")
        ordered = sort_rows(rows, lsort, tiebreak=lambda r: (r.kind, r.stack_id))
        table = self.query_one(LeakTable)
        table.show_rows([(leak_key(r), [c.render(r) for c in LEAK_COLUMNS]) for r in ordered])
        table.set_header_marks(lsort.column, lsort.reverse)
        note = leak_note(snap)
        problem = probe_problem(snap, "leaks")
        if problem:
            note.append(f"  [{problem}]", style="bold red")
        self.query_one("#leaks-note", Static).update(note)
        label = f"Leaks ({len(snap.leaks)})"
        self.query_one("#tabs", TabbedContent).get_tab("leaks").label = label  # type: ignore[assignment]

    def action_leak_older(self) -> None:
        app = self.memtop
        current = app.snapshot.leak_older_s if app.snapshot else 0.0
        later = [s for s in OLDER_STEPS if s > current]
        app.source.set_leak_older(later[0] if later else 0.0)
        app.refresh_now()

    def _show_tcp(self, snap: Snapshot) -> None:
        grouping, grouping_label = GROUPINGS[self.tcp_grouping]
        rows = filter_tcp_rows(snap.tcp_connect, self.filter_text, container_names(snap))
        views = tcp_views(snap, grouping, rows)
        tsort = self.memtop.sort_for("tcp")
        ordered = sort_rows(views, tsort, tiebreak=lambda v: (v.pid, v.daddr, v.dport))
        table = self.query_one(TcpTable)
        table.show_rows([(tcp_key(v.row), [c.render(v) for c in TCP_COLUMNS]) for v in ordered])
        table.set_header_marks(tsort.column, tsort.reverse)
        probe = snap.probes.get("tcp")
        status = (
            ""
            if probe is None or probe.status in ("running", "replay")
            else f"  [{probe.status}: {probe.detail}]"
        )
        slow = f"slow ≥ {snap.tcp_slow_ms} ms" if snap.tcp_slow_ms is not None else ""
        self.query_one("#tcp-note", Static).update(
            Text.assemble(
                ("grouping: ", "bold"),
                f"{grouping_label} (g)  │ {len(snap.tcp_slow_connects)} slow/failed, {slow}  │ "
                f"{snap.tcp_in_flight} in flight{_outcomes_lost(snap)}  │ ",
                (RESOLUTION_NOTE, "dim"),
                (f"  [{status}]" if status else "", "bold red"),
            )
        )

    def selected_process(self) -> ProcessRow | None:
        key = self.query_one(ProcessTable).cursor_key()
        return self._processes.get(key) if key else None

    def selected_container(self) -> ContainerRow | None:
        key = self.query_one(ContainerTable).cursor_key()
        return self._containers.get(key) if key else None

    # -- actions ----------------------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_drill()

    def action_tcp_grouping(self) -> None:
        if self.active_tab != "tcp":
            return
        self.tcp_grouping = (self.tcp_grouping + 1) % len(GROUPINGS)
        self.refresh_view()

    def action_drill(self) -> None:
        if self.active_tab == "leaks":
            key = self.query_one(LeakTable).cursor_key()
            if key is not None:
                self.app.push_screen(LeakScreen(key))
            return
        if self.active_tab == "tcp":
            key = self.query_one(TcpTable).cursor_key()
            if key is not None:
                self.app.push_screen(TcpScreen(key, GROUPINGS[self.tcp_grouping][0]))
            return
        if self.active_tab == "oom":
            key = self.query_one(OomTable).cursor_key()
            if key is not None:
                from memtop.screens.oom import OomScreen

                self.app.push_screen(OomScreen(key))
            return
        if self.active_tab == "containers":
            container = self.selected_container()
            if container is not None:
                self.memtop.open_container(container.id)
            return
        row = self.selected_process()
        if row is not None:
            self.memtop.open_process(row.key)

    def action_show_tab(self, tab: str) -> None:
        self.query_one("#tabs", TabbedContent).active = tab
        self._focus_active_table()

    def action_next_tab(self, step: int) -> None:
        ids = [tab for tab, _, _ in TABS]
        current = self.active_tab
        index = (ids.index(current) + step) % len(ids) if current in ids else 0
        self.action_show_tab(ids[index])

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self._focus_active_table()

    def _focus_active_table(self) -> None:
        pane = self.query_one("#tabs", TabbedContent).active_pane
        if pane is not None:
            tables = pane.query(SortedTable)
            if tables:
                tables.first().focus()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.value = self.filter_text
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("visible")
        self.filter_text = ""
        self._focus_active_table()
        self.refresh_view()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.refresh_view()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.filter_text = event.value
        if not self.filter_text:
            event.input.remove_class("visible")
        self._focus_active_table()
        self.refresh_view()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            event.stop()
            self.action_clear_filter()


def _outcomes_lost(snap: Snapshot) -> str:
    """Connects whose outcome never reached memtop (closed out, not left in flight), when there are any."""
    lost = snap.drops.get("tcp_outcome_lost", 0)
    return f", {lost:,} outcome lost" if lost else ""
